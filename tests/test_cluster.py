"""On a cluster: submitit's timeout signal, file systems without flock, progress lines in a log, sharded norms."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest

from zobench.errors import Interrupted, ZobenchError
from zobench.run_dir import RunDir

from test_resume import SETTINGS, _log_without_clock, _start, _wait_for_steps


def test_sigusr2_checkpoints_and_the_same_command_resumes_to_the_one_go_result(tmp_path):
    """submitit warns of SLURM's time limit with SIGUSR2: the run stops after its step with a checkpoint,
    and the requeued command (the same one) ends where an uninterrupted run ends."""
    whole, run_dir = tmp_path / "whole", tmp_path / "run"
    process = _start(run_dir)
    _wait_for_steps(run_dir, 50, process)
    process.send_signal(signal.SIGUSR2)
    assert process.wait(timeout=120) == 130, process.stderr.read()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and 50 <= metrics["steps"] < 240
    assert (run_dir / "checkpoint" / "state.json").exists()
    assert _start(run_dir).wait(timeout=600) == 0
    assert _start(whole).wait(timeout=600) == 0
    resumed, expected = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, whole))
    assert resumed["status"] == "completed"
    for key in ("test_metric", "dev_metric", "best_step", "steps", "forward_passes"):
        assert resumed[key] == expected[key], key
    assert _log_without_clock(run_dir) == _log_without_clock(whole)


def test_submitits_own_sigusr2_handler_is_called_once_the_run_is_recorded(quick_cfg, tmp_path, monkeypatch):
    """submitit requeues the job from its SIGUSR2 handler: zobench hands the signal on to it after the
    run is recorded `interrupted` with its checkpoint and the folder unlocked, not before, not never."""
    from zobench.objective import Objective
    from zobench.run import run

    seen = []

    def submitit_handler(signum, frame):
        seen.append((signum, json.loads((tmp_path / "metrics.json").read_text())["status"]))
        RunDir(tmp_path).claim().release()  # unlocked: the requeued job can take the folder

    original, calls = Objective.option_logprobs, []

    def signalled(self, batch):
        calls.append(1)
        if len(calls) == 5:  # during the third MeZO step
            os.kill(os.getpid(), signal.SIGUSR2)
        return original(self, batch)

    monkeypatch.setattr(Objective, "option_logprobs", signalled)
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(Interrupted):
            run(quick_cfg("train.steps=20", "train.eval_interval=0", "checkpoint.every=100"), tmp_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, "interrupted")]
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 3


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_file_system_without_flock_is_named_in_one_line_with_the_way_out(tmp_path, monkeypatch, code):
    import fcntl

    def refuses(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refuses)
    with pytest.raises(ZobenchError) as refused:
        RunDir(tmp_path / "run").claim()
    message = str(refused.value)
    assert "\n" not in message and "refuses the lock" in message and os.strerror(code) in message
    assert "hydra.run.dir" in message and "nolock" in message
