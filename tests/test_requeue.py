"""A real requeue through submitit's local executor (hydra/launcher=submitit_local), as on SLURM: the job gets
submitit's timeout signal (SIGUSR2) mid-training, stops after its step with a checkpoint, submitit's own handler
requeues it (exit 144, which the local controller restarts, as SLURM's `scontrol requeue` would), and the
restarted job resumes in the same run folder and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_resume import SETTINGS, _log_without_clock, _start, _wait_for_steps

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def submitit_tasks(marker: str) -> list[int]:
    """The pids of submitit's task processes (`python -u -m submitit.core._submit FOLDER`) whose folder holds
    `marker`: the processes submitit's own Job._interrupt() signals."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in command and any(marker.encode() in part for part in command):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_submitit_job_signalled_with_sigusr2_is_requeued_and_ends_as_one_uninterrupted_run(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "zobench.cli", "-m", "hydra/launcher=submitit_local",
                                 "hydra.launcher.timeout_min=30", *SETTINGS, "seed=0",  # a one-job sweep
                                 f"hydra.sweep.dir={sweep}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 300
        while (run_dir := next(iter(sweep.glob("0_*")), None)) is None and time.time() < deadline:
            time.sleep(0.1)
        assert run_dir is not None, launcher.stderr.read() if launcher.poll() is not None else "no run folder"
        _wait_for_steps(run_dir, 50, launcher)
        task = next(iter(submitit_tasks(str(sweep))), None)
        assert task is not None
        os.kill(task, signal.SIGUSR2)  # what submitit's controller sends signal_delay_s before the time limit
        assert launcher.wait(timeout=900) == 0, launcher.stderr.read()[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    whole = tmp_path / "whole"
    assert _start(whole).wait(timeout=600) == 0
    resumed, expected = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, whole))
    assert resumed["status"] == "completed" and 50 <= resumed["resumed_at_step"] < 240
    for key in ("test_metric", "dev_metric", "best_step", "steps", "forward_passes"):
        assert resumed[key] == expected[key], key
    assert _log_without_clock(run_dir) == _log_without_clock(whole)
    # the job's logs (each attempt appends): zobench stopped after its step, submitit's own handler was called
    # (it then exits 144, and the controller starts the job again), and the second attempt resumed
    logs = {kind: "".join(p.read_text() for p in (sweep / ".submitit").rglob(f"*_log.{kind}"))
            for kind in ("out", "err")}
    assert "Caught signal SIGUSR2" in logs["err"], logs["err"][-3000:]
    assert "stopping after this step" in logs["out"], logs["out"][-3000:]
    assert f"resumed at step {resumed['resumed_at_step']}" in logs["out"], logs["out"][-3000:]
    assert logs["out"].count("loading model") == 2  # two attempts of the one job
