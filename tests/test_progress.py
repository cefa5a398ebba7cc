"""A log without a terminal (SLURM output, zobench.log) shows what a long evaluation, model load and replay are
doing: a line at most every run_record.PROGRESS_EVERY_S seconds (0 here: every batch or step is 30 s later)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

from conftest import QUICK

# The real CLI, in a process without a terminal, with the progress interval at 0.
_SLOW_CLI = ("import sys; import zobench.run_record as r; r.PROGRESS_EVERY_S = 0.0; "
             "from zobench.cli import main; sys.argv[0] = 'zobench'; main()")


def test_the_log_of_a_run_without_a_terminal_shows_evaluation_and_model_load_progress(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", _SLOW_CLI, *QUICK, "train.steps=2", "train.eval_interval=0",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run_dir / "zobench.log").read_text()
    # 8 dev examples then 12 test examples, eval.batch_size=8: a line per batch
    evaluating = re.findall(r"evaluating: (\d+)/(\d+) examples  [\d.]+ examples/s  ETA \d+:\d\d:\d\d", log)
    assert evaluating == [("8", "8"), ("8", "12"), ("12", "12")], log
    assert re.search(r"loading model opt-tiny \(random weights, float32 on cpu\)", log)
    assert re.search(r"model opt-tiny loaded in [\d.]+ s", log)
    assert log.index("loading model") < log.index("loaded in") < log.index("evaluating:")


def test_a_short_evaluation_writes_no_progress_line(quick_cfg, tmp_path, caplog):
    """Under 30 s, the log is not flooded: the dev and test results are its lines."""
    from zobench.run import run

    with caplog.at_level(logging.INFO, logger="zobench"):
        run(quick_cfg("train.steps=2", "train.eval_interval=0"), tmp_path)
    assert not [r for r in caplog.records if r.getMessage().startswith("evaluating:")]


def test_zobench_replay_logs_its_steps(quick_cfg, tmp_path, monkeypatch, caplog):
    from zobench import replay, run_record
    from zobench.run import run

    run(quick_cfg("train.steps=3", "train.eval_interval=0", "train.keep_best=none"), tmp_path / "run")
    monkeypatch.setattr(run_record, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="zobench"):
        assert replay.main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    lines = [r.getMessage() for r in caplog.records]
    steps = [m.group(1) for line in lines if (m := re.match(r"replaying the trajectory: (\d)/3 steps", line))]
    assert steps == ["1", "2", "3"], lines
    assert any(line.startswith("model opt-tiny loaded in") for line in lines)
