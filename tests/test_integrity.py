"""Tampering and faults are never silent: checkpoint and best-weights files are hashed and tied to their run,
replay checks the config it rebuilds from, a resumed log is line-identical, and a run that left no checkpoint
starts again instead of being refused forever."""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import QUICK, fail_once_at
from zobench.configs import compose
from zobench.errors import ZobenchError
from zobench.replay import main as replay_main
from zobench.run import run

SMALL = [*QUICK, "data.n_dev=4", "data.n_test=4", "train.steps=6", "train.eval_interval=3", "checkpoint.every=2"]


class Killed(BaseException):
    """The process died here (kill -9): nothing in zobench handles it, metrics.json keeps saying "running"."""


def _interrupted(run_dir: Path, monkeypatch, *extra: str) -> list[str]:
    """A run that failed at its fifth step, its checkpoint of step 4 kept (best-on-dev weights of step 3)."""
    overrides = [*SMALL, *extra]
    fail_once_at(monkeypatch, steps_done=4)
    with pytest.raises(ZobenchError, match="out of memory at step 4"):
        run(compose(overrides), run_dir, overrides=overrides)
    monkeypatch.undo()
    return overrides


def _zero_400_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # past the safetensors header: tensor data, as a bad disk block would hit it
    assert 8 + int.from_bytes(data[:8], "little") < middle
    data[middle:middle + 400] = bytes(400)
    path.write_bytes(bytes(data))


def _log_without_clock(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "train_s")}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _one_line(message: str) -> str:
    lines = [line for line in message.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in message, message
    return lines[0]


@pytest.mark.parametrize("damaged", ["checkpoint/weights.safetensors", "best_weights.safetensors"])
def test_zeroed_bytes_in_saved_weights_are_refused_on_resume(tmp_path, monkeypatch, damaged):
    run_dir = tmp_path / "run"
    overrides = _interrupted(run_dir, monkeypatch, "checkpoint.weights=true")
    _zero_400_bytes(run_dir / damaged)  # same size, same step in its header: only the bytes differ
    with pytest.raises(ZobenchError, match="does not match the SHA-256") as caught:
        run(compose(overrides), run_dir)
    assert Path(damaged).name in _one_line(str(caught.value))
    assert json.loads((run_dir / "metrics.json").read_text())["status"] != "completed"


@pytest.mark.parametrize("copied", ["best_weights.safetensors", "checkpoint"])
def test_another_runs_file_of_the_same_step_is_refused(tmp_path, monkeypatch, copied):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    overrides = _interrupted(mine, monkeypatch, "checkpoint.weights=true")
    _interrupted(theirs, monkeypatch, "checkpoint.weights=true")  # same config, same step, another run
    if copied == "checkpoint":
        shutil.rmtree(mine / copied)
        shutil.copytree(theirs / copied, mine / copied)
    else:
        shutil.copy(theirs / copied, mine / copied)
    with pytest.raises(ZobenchError, match="belongs to another run") as caught:
        run(compose(overrides), mine)
    _one_line(str(caught.value))


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("completed") / "run"
    run(compose([*QUICK, "data.n_dev=4", "data.n_test=4", "train.steps=3", "train.eval_interval=0",
                 "train.keep_best=none"]), run_dir)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def test_replay_refuses_an_edited_config(completed, tmp_path, capsys):
    run_dir = _copy(completed, tmp_path)
    assert replay_main([str(run_dir), "--out", str(tmp_path / "as_run")]) == 0  # as the run left it
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0\n", "seed: 1\n", 1))  # still a valid config
    capsys.readouterr()
    assert replay_main([str(run_dir), "--out", str(tmp_path / "edited")]) == 1
    assert "config.yaml was edited after the run started" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "edited").exists()


def test_replay_says_the_trajectory_is_missing_or_short(completed, tmp_path, capsys):
    run_dir = _copy(completed, tmp_path)
    trajectory = run_dir / "trajectory.jsonl"
    lines = trajectory.read_text().splitlines(keepends=True)
    trajectory.write_text(lines[0])
    capsys.readouterr()
    assert replay_main([str(run_dir)]) == 1  # would have rebuilt step 1's weights as the tested ones
    assert "holds steps 1..1, not 3: it is short (the run recorded 3 steps)" in _one_line(capsys.readouterr().err)
    trajectory.unlink()
    assert replay_main([str(run_dir)]) == 1
    assert "trajectory.jsonl is missing" in _one_line(capsys.readouterr().err)


def test_a_resumed_log_is_line_identical_when_checkpoints_fall_between_log_lines(tmp_path, monkeypatch):
    settings = [*QUICK, "data.n_dev=4", "data.n_test=4", "train.steps=8", "train.eval_interval=0",
                "train.log_interval=2", "checkpoint.every=3"]  # the checkpoint of step 3 is mid-average
    whole = run(compose(settings), tmp_path / "whole")
    broken = tmp_path / "broken"
    fail_once_at(monkeypatch, steps_done=4)
    with pytest.raises(ZobenchError):
        run(compose(settings), broken)
    monkeypatch.undo()
    resumed = run(compose(settings), broken)
    assert resumed["resumed_at_step"] == 3
    assert _log_without_clock(broken) == _log_without_clock(tmp_path / "whole")
    assert resumed["test_metric"] == whole["test_metric"]


def test_a_run_killed_before_its_first_checkpoint_runs_again_keeping_its_records(tmp_path, monkeypatch):
    from zobench.optim.base import Optimizer

    settings = [*QUICK, "data.n_dev=4", "data.n_test=4", "train.steps=4", "train.eval_interval=0",
                "checkpoint.every=500"]
    run_dir = tmp_path / "run"
    original = Optimizer.step

    def killed_at_step_3(self, batch):
        if self.steps_done == 2:
            raise Killed
        return original(self, batch)

    monkeypatch.setattr(Optimizer, "step", killed_at_step_3)
    with pytest.raises(Killed):
        run(compose(settings), run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"
    assert not (run_dir / "checkpoint").exists()
    killed_log = _log_without_clock(run_dir)
    with pytest.raises(Killed):  # requeued, and killed again at the same point
        run(compose(settings), run_dir)
    monkeypatch.undo()

    metrics = run(compose(settings), run_dir)  # what a SLURM requeue does: the same command again
    assert metrics["status"] == "completed" and metrics["steps"] == 4 and metrics["resumed_at_step"] is None
    assert metrics["earlier_attempts"] == ["attempts/1", "attempts/2"]
    kept = run_dir / "attempts" / "1"
    assert _log_without_clock(run_dir / "attempts" / "2") == killed_log
    assert json.loads((kept / "metrics.json").read_text())["status"] == "running"
    assert _log_without_clock(kept) == killed_log and len(killed_log) == 2
    assert len((kept / "trajectory.jsonl").read_text().splitlines()) == 2
    assert (kept / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    whole = run(compose(settings), tmp_path / "whole")
    assert _log_without_clock(run_dir) == _log_without_clock(tmp_path / "whole")
    assert metrics["test_metric"] == whole["test_metric"]
    from zobench.report.runs import find_runs

    assert [r["run_dir"] for r in find_runs([tmp_path])] == [str(run_dir), str(tmp_path / "whole")]  # attempts/ not runs
    with pytest.raises(ZobenchError, match="already holds a completed run"):  # completed: never again
        run(compose(settings), run_dir)


_BIG = "__1e999__"


@pytest.mark.parametrize("key,value", [("step", _BIG), ("state.step", "x"), ("files", ["state.safetensors"]),
                                       ("state.job.counter.forward_passes", _BIG),
                                       ("state.job.seconds.total", _BIG)])
def test_a_crafted_state_json_is_one_line_naming_it(tmp_path, monkeypatch, key, value):
    run_dir = tmp_path / "run"
    overrides = _interrupted(run_dir, monkeypatch)
    path = run_dir / "checkpoint" / "state.json"
    manifest = json.loads(path.read_text())
    *parents, last = key.split(".")
    node = manifest
    for part in parents:
        node = node[part]
    node[last] = value
    path.write_text(json.dumps(manifest).replace(f'"{_BIG}"', "1e999"))  # valid JSON: Python reads inf
    with pytest.raises(ZobenchError, match="state.json") as caught:
        run(compose(overrides), run_dir)
    line = _one_line(str(caught.value))
    # 1e999 is refused as it is read (safe_files: too large for a float); other bad values name their key
    assert ("too large" in line) if value == _BIG else (key.split(".")[-1] in line), line


def test_a_full_disk_at_the_end_says_the_end_was_not_recorded(tmp_path, monkeypatch, capsys):
    from zobench import cli
    from zobench import run_dir as run_dir_module

    original = run_dir_module.atomic_write_text

    def full_for_the_last_write(path, text):
        if Path(path).name == "metrics.json" and '"running"' not in text:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(path, text)

    def full_for_log_lines(self, line):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(run_dir_module, "atomic_write_text", full_for_the_last_write)
    monkeypatch.setattr(run_dir_module.RecordFile, "write_line", full_for_log_lines)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["zobench", *QUICK, "train.steps=2", "train.eval_interval=0",
                                      f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    line = _one_line(capsys.readouterr().err)
    assert "could not record the run's end" in line and "it still says 'running' at step 0" in line
    assert "the run itself ended 'failed'" in line and "No space left on device" in line
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"


@pytest.mark.slow
def test_the_same_command_after_a_kill_9_before_the_first_checkpoint_completes(tmp_path):
    """A SLURM requeue of a job killed at step ~3 of a run checkpointing every 500 steps: exit 0, not a refusal."""
    import os
    import signal
    import subprocess
    import time

    from conftest import run_cli

    run_dir = tmp_path / "run"
    args = [*QUICK, "data.n_dev=4", "data.n_test=4", "train.steps=30", "train.eval_interval=0",
            "checkpoint.every=500", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "zobench.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    trajectory, deadline = run_dir / "trajectory.jsonl", time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if trajectory.exists() and trajectory.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"
    assert not (run_dir / "checkpoint").exists()

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 30
    assert metrics["earlier_attempts"] == ["attempts/1"]
    assert (run_dir / "attempts" / "1" / "trajectory.jsonl").read_text().count("\n") >= 3


@pytest.mark.slow
def test_sigterm_then_the_same_command_gives_the_uninterrupted_log(tmp_path):
    """SIGTERM checkpoints between two train lines (log_interval above train.steps: one line averaging every
    step); the resumed log.jsonl equals the one-go log but for the clock."""
    import os
    import signal
    import subprocess
    import time

    from conftest import run_cli

    args = [*QUICK, "data.n_dev=4", "data.n_test=4", "train.steps=40", "train.eval_interval=0",
            "train.log_interval=1000", "checkpoint.every=500"]
    assert run_cli(*args, f"hydra.run.dir={tmp_path / 'whole'}").returncode == 0
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "zobench.cli", *args, f"hydra.run.dir={run_dir}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    trajectory, deadline = run_dir / "trajectory.jsonl", time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if trajectory.exists() and trajectory.read_text().count("\n") >= 5:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    stopped = json.loads((run_dir / "checkpoint" / "state.json").read_text())["state"]
    assert 5 <= stopped["step"] < 40 and len(stopped["job"]["recent_losses"]) == stopped["step"]
    again = run_cli(*args, f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.stderr
    assert _log_without_clock(run_dir) == _log_without_clock(tmp_path / "whole")
