"""A run directory can be trusted: one writer, nothing loaded that can run code, nothing written into what
zobench did not create, and a resume refused (one line) when its records do not match its checkpoint."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUICK, fail_once_at, run_cli
from zobench.configs import compose
from zobench.errors import ZobenchError
from zobench.paths import tasks_dir
from zobench.replay import main as replay_main
from zobench.run import run
from zobench.checkpoint import from_plain, to_plain
from zobench.run_dir import MARKER, RunDir

SMALL = [*QUICK, "data.n_dev=4", "data.n_test=4", "train.steps=6", "train.eval_interval=3", "checkpoint.every=2"]


def _interrupted(tmp_path: Path, monkeypatch, *extra: str) -> tuple[list[str], Path]:
    """A run that died at its fifth step (its checkpoint of step 4 kept), made as the CLI makes it."""
    overrides = [*SMALL, *extra]
    run_dir = tmp_path / "run"
    fail_once_at(monkeypatch, steps_done=4)
    with pytest.raises(ZobenchError, match="out of memory at step 4"):
        run(compose(overrides), run_dir, overrides=overrides)
    monkeypatch.undo()
    return overrides, run_dir


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


class _Evil:
    """Unpickling this creates the file it names: what a crafted state.pt would do."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def test_a_crafted_pickle_in_a_run_dir_never_runs_on_resume(tmp_path, monkeypatch):
    _, run_dir = _interrupted(tmp_path, monkeypatch)
    pwned = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(pwned))
    pickle.loads(payload).close()  # the payload works: loading it creates the file
    assert pwned.exists()
    pwned.unlink()
    for name in ("state.pt", "state.json", "state.safetensors", "weights.safetensors"):
        (run_dir / "checkpoint" / name).write_bytes(payload)
    torch.save({"state": _Evil(pwned)}, run_dir / "checkpoint" / "state.pt")
    result = run_cli(f"resume={run_dir}")
    assert result.returncode != 0 and not pwned.exists()
    assert "state.json" in _one_line(result.stderr)


def test_state_round_trips_through_json_and_tensors_alone():
    seeds = torch.zeros(1)  # numpy RandomState's tuple, a torch optimizer's int-keyed state, tuples, inf
    import numpy as np

    state = {"engine_seeds": np.random.RandomState(3).get_state(), "best": float("inf"),
             "torch_optimizer": {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.ones(3)}},
                                 "param_groups": [{"params": [0], "betas": (0.9, 0.999), "foreach": None}]},
             "history": [(5, 0.5)], "rng": torch.get_rng_state(), "x": seeds}
    tensors: dict[str, torch.Tensor] = {}
    plain = json.loads(json.dumps(to_plain(state, tensors)))
    back = from_plain(plain, tensors)
    engine = np.random.RandomState()
    engine.set_state(back["engine_seeds"])
    assert engine.randint(10**9) == np.random.RandomState(3).randint(10**9)
    assert back["torch_optimizer"]["state"][0]["exp_avg"].equal(torch.ones(3))
    assert back["torch_optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["history"] == [(5, 0.5)] and back["best"] == float("inf")
    assert back["rng"].equal(state["rng"])


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock, as a live zobench job does."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run_dir / MARKER)!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_live_run_is_refused_and_a_dead_ones_lock_is_not(tmp_path, monkeypatch):
    overrides, run_dir = _interrupted(tmp_path, monkeypatch)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(ZobenchError, match="in use by another zobench process"):
            run(compose(overrides), run_dir)
        result = run_cli(f"resume={run_dir}")  # the README's way to resume, while the run still runs
        assert result.returncode == 2 and "in use by another zobench process" in _one_line(result.stderr)
        assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before  # not a byte written
    finally:
        holder.kill()
        holder.wait()
    resumed = run(compose(overrides), run_dir)  # the holder died: its lock went with it
    assert resumed["status"] == "completed" and resumed["resumed_at_step"] == 4


def test_a_folder_zobench_did_not_create_is_never_written(tmp_path, quick_cfg):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    (mine / "log.jsonl").write_text('{"my": "log"}\n')
    with pytest.raises(ZobenchError, match="not a zobench run directory"):
        run(quick_cfg("train.steps=1"), mine)
    result = run_cli(*QUICK, "train.steps=1", f"hydra.run.dir={mine}")
    assert result.returncode == 2 and "not a zobench run directory" in _one_line(result.stderr)
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "log.jsonl"]  # not even Hydra's .hydra/
    assert (mine / "config.yaml").read_text() == "my: own\n"


def test_leftover_records_without_metrics_are_not_appended_to(tmp_path, quick_cfg):
    run_dir = tmp_path / "run"
    RunDir(run_dir).claim().release()  # zobench's folder, but its metrics.json is gone
    (run_dir / "trajectory.jsonl").write_text('{"step": 1}\n')
    run(quick_cfg("train.steps=1"), run_dir)  # a start-up killed before metrics.json: it starts again
    assert (run_dir / "attempts" / "1" / "trajectory.jsonl").read_text() == '{"step": 1}\n'  # kept, not added to
    (run_dir / "metrics.json").unlink()
    with pytest.raises(ZobenchError, match="no metrics.json"):  # a checkpoint it cannot account for
        run(quick_cfg("train.steps=1"), run_dir)


def test_replay_never_writes_over_a_runs_tested_weights(tmp_path, quick_cfg, capsys):
    run_dir = tmp_path / "run"
    run(quick_cfg("train.steps=2", "train.eval_interval=0", "save_model=true"), run_dir)
    tested = (run_dir / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert replay_main([str(run_dir), "--out", str(run_dir / "model")]) == 1
    assert "already exists" in _one_line(capsys.readouterr().err)
    assert (run_dir / "model" / "model.safetensors").read_bytes() == tested
    out = tmp_path / "replayed"
    assert replay_main([str(run_dir), "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists() and not list(tmp_path.glob(".replayed.partial*"))


def test_an_edited_trajectory_is_refused_by_resume_and_replay(tmp_path, monkeypatch, capsys):
    overrides, run_dir = _interrupted(tmp_path, monkeypatch)
    capsys.readouterr()
    lines = (run_dir / "trajectory.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["losses"][0] += 1e-3  # one loss value of step 2
    lines[1] = json.dumps(record)
    (run_dir / "trajectory.jsonl").write_text("".join(f"{line}\n" for line in lines))
    with pytest.raises(ZobenchError, match="trajectory.jsonl was edited after the checkpoint of step 4"):
        run(compose(overrides), run_dir)
    assert replay_main([str(run_dir), "--step", "3"]) == 1
    assert "line 2 (step 2) fails its checksum" in _one_line(capsys.readouterr().err)
    (run_dir / "trajectory.jsonl").write_text("not json\n" + "\n".join(lines[1:]) + "\n")
    assert replay_main([str(run_dir)]) == 1
    assert "line 1 is not a trajectory record" in _one_line(capsys.readouterr().err)
    (run_dir / "config.yaml").write_text("train: [unclosed\n")
    assert replay_main([str(run_dir)]) == 1
    assert "config.yaml is not a zobench run's config" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_log_is_refused(tmp_path, monkeypatch, damage):
    overrides, run_dir = _interrupted(tmp_path, monkeypatch)
    log = run_dir / "log.jsonl"
    if damage == "deleted":
        log.unlink()
    else:
        log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(ZobenchError, match=f"log.jsonl {'was deleted' if damage == 'deleted' else 'was truncated'}"):
        run(compose(overrides), run_dir)


def test_changed_data_files_are_refused(tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(tasks_dir() / "samples" / "sst2", data)
    overrides, run_dir = _interrupted(tmp_path, monkeypatch, "task.samples=false", f"task.data_dir={data}")
    train = next(p for p in data.iterdir() if p.name.startswith("train"))
    text = train.read_text()
    train.write_text(text.replace(" the ", " a "))
    with pytest.raises(ZobenchError, match="the data of .* changed since its checkpoint"):
        run(compose(overrides), run_dir)
    train.write_text(text)  # the data as it was: the run resumes
    assert run(compose(overrides), run_dir)["status"] == "completed"


@pytest.mark.parametrize("name,damage", [("state.json", b""), ("state.json", b"{not json"),
                                         ("state.safetensors", b"\x00" * 10), ("weights.safetensors", None)])
def test_a_corrupt_checkpoint_is_named_in_one_line(tmp_path, monkeypatch, name, damage):
    overrides, run_dir = _interrupted(tmp_path, monkeypatch, "checkpoint.weights=true")
    path = run_dir / "checkpoint" / name
    path.write_bytes(path.read_bytes()[:100] if damage is None else damage)  # None: truncated
    with pytest.raises(ZobenchError, match=name.replace(".", r"\.")) as caught:
        run(compose(overrides), run_dir)
    assert "\n" not in str(caught.value)


def test_divergence_names_the_step_that_diverged(quick_cfg, tmp_path, monkeypatch):
    from zobench.objective import Objective

    original, calls = Objective.option_logprobs, []

    def nan_at_step_two(self, batch):
        calls.append(1)
        sums, counts = original(self, batch)
        return (sums * float("nan") if len(calls) == 3 else sums), counts  # MeZO: two forward passes a step

    monkeypatch.setattr(Objective, "option_logprobs", nan_at_step_two)
    metrics = run(quick_cfg("train.steps=5", "train.eval_interval=0"), tmp_path / "run")
    assert metrics["status"] == "diverged" and metrics["error"].startswith("diverged at step 2:")


def test_a_full_disk_is_recorded_and_leaves_no_temp_files(tmp_path, monkeypatch, quick_cfg):
    from zobench import checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_write_text", full)  # the checkpoint's manifest cannot be written
    with pytest.raises(ZobenchError, match="No space left on device"):
        run(quick_cfg("train.steps=4", "train.eval_interval=0", "checkpoint.every=2"), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "No space left on device" in metrics["error"]
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith((".tmp", ".next", ".old"))]


def test_when_even_metrics_cannot_be_written_one_line_says_so(tmp_path, monkeypatch, quick_cfg):
    from zobench import run_dir as run_dir_module

    original = run_dir_module.atomic_write_text

    def full_once_completed(path, text):
        if Path(path).name == "metrics.json" and '"completed"' in text:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, text)

    monkeypatch.setattr(run_dir_module, "atomic_write_text", full_once_completed)
    with pytest.raises(ZobenchError, match="could not record the run's end"):
        run(quick_cfg("train.steps=1", "train.eval_interval=0"), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] != "completed"
