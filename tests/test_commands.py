"""Every command: one line on stderr for what goes wrong, and the exit status the README promises."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from conftest import QUICK, run_cli

from zobench.report.cli import main as report_main
from zobench.run_dir import MARKER


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _completed_run(folder: Path, task: str = "sst2") -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "task": task, "model": "opt-tiny", "optimizer": "mezo", "seed": 0, "status": "completed",
        "metric": "accuracy", "test_metric": 0.5, "dev_metric": 0.5, "steps": 2, "forward_passes": 4}))
    (folder / "log.jsonl").write_text(json.dumps({"event": "train", "step": 1, "loss": 1.0, "forward_passes": 2,
                                                  "elapsed_s": 0.1}) + "\n")
    return folder


# -- zobench-report -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, reason", [(b'{"task": "caf\xe9"}', "not UTF-8"),
                                             (b'["a", "b"]', "a JSON list, not an object")])
def test_report_warns_once_about_an_unreadable_metrics_file_and_goes_on(tmp_path, capsys, content, reason):
    _completed_run(tmp_path / "runs" / "good")
    bad = tmp_path / "runs" / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_bytes(content)
    assert report_main([str(tmp_path / "runs"), "-o", str(tmp_path / "out"), "--no-plots"]) == 0
    line = _one_line(capsys.readouterr().err)
    assert str(bad / "metrics.json") in line and reason in line and "unreadable" in line
    assert "unreadable" in (tmp_path / "out" / "failures.md").read_text()


def test_report_never_writes_outside_its_folder_whatever_a_task_is_called(tmp_path):
    _completed_run(tmp_path / "runs" / "a", task="../../escaped")
    out = tmp_path / "deep" / "er" / "out"
    assert report_main([str(tmp_path / "runs"), "-o", str(out), "--no-reference"]) == 0
    written = [p for p in tmp_path.rglob("*.png")]
    assert written and all(out / "plots" in p.parents for p in written), written
    assert not list(tmp_path.rglob("escaped.png"))


def test_report_on_a_folder_it_cannot_write_is_one_line_and_exit_1(tmp_path, capsys):
    _completed_run(tmp_path / "runs" / "a")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert report_main([str(tmp_path / "runs"), "-o", str(blocker / "out"), "--no-plots"]) == 1
    assert f"cannot read or write {blocker}" in _one_line(capsys.readouterr().err)


def test_report_on_a_full_disk_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    _completed_run(tmp_path / "runs" / "a")

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("zobench.report.names.open_for_write", full)  # every file the report writes
    assert report_main([str(tmp_path / "runs"), "-o", str(tmp_path / "out"), "--no-plots"]) == 1
    assert "No space left on device" in _one_line(capsys.readouterr().err)


# -- zobench ------------------------------------------------------------------------------------------------
def test_bad_config_values_exit_2_naming_the_key(tmp_path):
    result = run_cli(*QUICK, "train.steps=abc", f"results_dir={tmp_path}")
    assert result.returncode == 2
    assert "train.steps must be a whole number, got 'abc'" in _one_line(result.stderr)
    result = run_cli(*QUICK, "train.stepz=3", f"results_dir={tmp_path}")  # Hydra's own refusal: one line too
    assert result.returncode == 2 and "train.stepz" in _one_line(result.stderr)
    assert not list(tmp_path.rglob("metrics.json"))


def test_a_run_folder_that_cannot_be_created_is_one_line_and_exit_1(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli(*QUICK, f"hydra.run.dir={blocker / 'run'}")
    assert result.returncode == 1
    assert f"cannot read or write {blocker / 'run'}" in _one_line(result.stderr)


def test_a_sweep_with_a_failed_job_finishes_the_others_then_exits_1(tmp_path):
    result = run_cli("-m", *QUICK, "optimizer=zero_shot", "data.n_dev=0", "data.n_test=2", "data.seed=-1,0",
                     f"results_dir={tmp_path}")
    assert result.returncode == 1, result.stderr
    assert "1 of 2 jobs failed" in result.stderr.splitlines()[-1]
    [metrics] = [json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    assert metrics["status"] == "completed" and metrics["n_test"] == 2


def test_a_template_in_a_copied_run_folder_cannot_run_a_command_on_resume(tmp_path):
    """resume=DIR re-applies DIR/overrides.yaml: a payload there is refused by the sandbox."""
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    run_dir.mkdir()
    (run_dir / MARKER).write_text("")  # a zobench run folder, copied from elsewhere
    payload = f"task.prompt='{{{{ cycler.__init__.__globals__.os.popen(\"touch {marker}\").read() }}}}'"
    (run_dir / "overrides.yaml").write_text(json.dumps([*QUICK, "train.steps=2", payload]))
    result = run_cli(f"resume={run_dir}")
    assert result.returncode == 1
    assert "refused by Jinja's sandbox" in _one_line(result.stderr)
    assert not marker.exists()


def test_a_full_disk_during_a_run_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    import sys

    from zobench import cli, run

    def disk_full(cfg, run_dir, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(run_dir) / "log.jsonl"))

    monkeypatch.setattr(run, "run", disk_full)
    monkeypatch.setattr(sys, "argv", ["zobench", *QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    line = _one_line(capsys.readouterr().err)
    assert f"cannot read or write {tmp_path / 'run' / 'log.jsonl'}: No space left on device" in line


@pytest.mark.parametrize("command", ["lengths", "replay"])
def test_lengths_and_replay_say_one_line_on_a_read_only_folder(tmp_path, monkeypatch, capsys, command):
    from zobench import lengths, replay

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out"))

    if command == "lengths":
        monkeypatch.setattr(lengths, "length_report", read_only)
        with pytest.raises(SystemExit) as exit_:
            lengths.main([*QUICK])
        code = exit_.value.code
    else:
        monkeypatch.setattr(replay, "replay_run", read_only)
        code = replay.main([str(tmp_path)])
    assert code == 1
    assert f"cannot read or write {tmp_path / 'out'}: Read-only file system" in _one_line(capsys.readouterr().err)


# -- the hub ------------------------------------------------------------------------------------------------
def test_a_hub_dataset_is_announced_before_the_hub_is_asked(monkeypatch, caplog):
    import logging

    import datasets

    from zobench.data import load_split_pools
    from zobench.tasks import load_task_definition

    said_first = []

    def unreachable(*args, **kwargs):
        said_first.append(any("from the hub" in r.getMessage() for r in caplog.records))
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with caplog.at_level(logging.INFO, logger="zobench"), pytest.raises(Exception, match="task.data_dir"):
        load_split_pools(load_task_definition("sst2"))
    assert said_first == [True]
    line = next(r.getMessage() for r in caplog.records if "from the hub" in r.getMessage())
    assert "nyu-mll/glue/sst2" in line and "HF_HUB_OFFLINE=1" in line and "task.data_dir" in line


def test_a_hub_model_is_announced_with_model_path_as_the_way_round(monkeypatch, caplog):
    import logging

    import transformers

    from zobench.errors import ZobenchError
    from zobench.models import load_tokenizer

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    with caplog.at_level(logging.INFO, logger="zobench"), pytest.raises(ZobenchError, match="model.path"):
        load_tokenizer({"name": "opt-125m", "hub_id": "facebook/opt-125m"})
    assert any("facebook/opt-125m from the hub" in r.getMessage() and "model.path" in r.getMessage()
               for r in caplog.records)
