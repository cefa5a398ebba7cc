"""On a cluster: submitit's timeout signal, file systems without flock, progress lines in a log, sharded norms."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal

import pytest
import torch

from zobench.errors import Interrupted, ZobenchError
from zobench.run_dir import RunDir

from conftest import QUICK, run_cli
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


def test_without_a_terminal_the_log_shows_progress_and_dev_results_but_is_not_flooded(tmp_path):
    """A SLURM job's output: the last step's line with loss, speed and ETA, and each dev result with
    whether it is the new best; a run of under 30 s writes no line per log_interval."""
    done = run_cli(*QUICK, "train.steps=40", "train.log_interval=5", "train.eval_interval=20",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    for shown in (done.stdout + done.stderr, (tmp_path / "run" / "zobench.log").read_text()):
        steps = re.findall(r"step (\d+)/40  loss [\d.]+  [\d.]+ steps/s  ETA \d+:\d\d:\d\d", shown)
        assert steps == ["40"]
        assert re.search(r"dev at step 20: metric [\d.]+  loss [\d.]+  \(new best\)", shown)
        assert re.search(r"dev at step 40: metric [\d.]+  loss [\d.]+", shown)


def test_a_progress_line_every_log_interval_once_30_seconds_have_passed(quick_cfg, tmp_path, monkeypatch, caplog):
    from zobench import run_record
    from zobench.run import run

    monkeypatch.setattr(run_record, "PROGRESS_EVERY_S", 0.0)  # a slow run: every train line is 30 s later
    with caplog.at_level(logging.INFO, logger="zobench"):
        run(quick_cfg("train.steps=12", "train.log_interval=4", "train.eval_interval=0"), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "zobench.run_record"]
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["4/12", "8/12", "12/12"]
    assert progress[-1].endswith("ETA 0:00:00") and not progress[0].endswith("ETA ?")


def test_per_parameter_norms_on_different_devices_are_summed_on_the_first_ones():
    """A model split over GPUs has its gradients' norms on several devices; "meta" and "cpu" are two
    devices on any machine, and torch.stack refuses them together as it refuses cuda:0 with cuda:1."""
    from zobench.optim.ip_sgd import sum_on_one_device

    squares = [torch.tensor(1.0, device="meta"), torch.tensor(4.0), torch.tensor(9.0)]
    with pytest.raises(RuntimeError, match="device"):
        torch.stack(squares)  # the failure on a sharded model
    total = sum_on_one_device(squares)
    assert total.device == torch.device("meta") and total.shape == ()
    assert float(sum_on_one_device([torch.tensor(1.0), torch.tensor(4.0), torch.tensor(9.0)])) == 14.0
