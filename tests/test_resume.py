"""Checkpoints and exact resume: a killed run, resumed, ends where an uninterrupted one ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, run_cli
from zobench.replay import replay_run

SETTINGS = [*QUICK, "train.steps=240", "train.eval_interval=80", "train.log_interval=10",
            "checkpoint.every=30", "save_model=true"]


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "zobench.cli", *SETTINGS, *extra, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_steps(run_dir: Path, steps: int, process: subprocess.Popen) -> None:
    trajectory = run_dir / "trajectory.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if trajectory.exists() and trajectory.read_text().count("\n") >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {steps}: {process.poll()}")


def _log_without_clock(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("elapsed_s", "train_s")} for line in lines]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize("optimizer", ["mezo", "adam"])
def test_sigkill_then_resume_is_bit_identical_to_one_go(tmp_path, optimizer):
    extra = [f"optimizer={optimizer}"] + (["optimizer.lr=1e-3"] if optimizer == "adam" else [])
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert _start(whole, *extra).wait(timeout=600) == 0

    process = _start(broken, *extra)
    _wait_for_steps(broken, 100, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    state = json.loads((broken / "metrics.json").read_text())
    assert state["status"] == "running" and state["steps"] < 240  # killed: nothing could record it

    resumed = run_cli(f"resume={broken}")
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((broken / "metrics.json").read_text())
    assert metrics["status"] == "completed" and 30 <= metrics["resumed_at_step"] < 240
    expected = json.loads((whole / "metrics.json").read_text())
    for key in ("test_metric", "dev_metric", "dev_loss", "best_step", "steps", "forward_passes",
                "backward_passes", "tokens", "eval_forward_passes"):
        assert metrics[key] == expected[key], key
    assert _log_without_clock(broken) == _log_without_clock(whole)
    final, reference = _weights(broken), _weights(whole)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], reference[name]) for name in reference)
    assert not (broken / "checkpoint" / "weights.safetensors").exists()  # cleaned up once completed


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path):
    run_dir = tmp_path / "run"
    process = _start(run_dir)
    _wait_for_steps(run_dir, 50, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["steps"] >= 50
    assert metrics["wall_clock_s"] > 0 and metrics["peak_memory_bytes"] > 0
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        json.loads(line)  # every line whole
    assert (run_dir / "checkpoint" / "state.json").exists()
    again = _start(run_dir)  # the same command, the same directory
    assert again.wait(timeout=600) == 0, again.stderr.read()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


def test_completed_runs_and_changed_configs_are_not_resumed(tmp_path):
    run_dir = tmp_path / "run"
    process = _start(run_dir, "train.steps=400")
    _wait_for_steps(run_dir, 40, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    changed = run_cli(*SETTINGS, "train.steps=400", "optimizer.lr=0.5", f"hydra.run.dir={run_dir}")
    assert changed.returncode == 1 and "was started with another config" in changed.stderr
    assert run_cli(f"resume={run_dir}").returncode == 0
    done = run_cli(f"resume={run_dir}")
    assert done.returncode == 2 and "already holds a completed run" in done.stderr


def test_replay_rebuilds_the_tested_weights_from_the_trajectory(tmp_path):
    run_dir = tmp_path / "run"
    assert _start(run_dir).wait(timeout=600) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = replay_run(run_dir)
    assert out == run_dir / f"model-step-{metrics['best_step']}"
    rebuilt, tested = load_file(str(out / "model.safetensors")), _weights(run_dir)
    assert all(torch.equal(rebuilt[name], tested[name]) for name in tested)
    trajectory = (run_dir / "trajectory.jsonl").read_text().splitlines()
    first = json.loads(trajectory[0])
    assert len(trajectory) == 240 and len(first["losses"]) == 2 and len(first["directions"]) == 1
    assert (run_dir / "trajectory.jsonl").stat().st_size < 100_000  # kilobytes, not weights


def test_a_failed_run_with_a_checkpoint_resumes(quick_cfg, tmp_path, monkeypatch):
    from zobench.errors import ZobenchError
    from zobench.objective import Objective
    from zobench.run import run

    cfg = quick_cfg("train.steps=6", "train.eval_interval=0", "checkpoint.every=2")
    original, calls = Objective.option_logprobs, []

    def fails_once(self, batch):
        calls.append(1)
        if len(calls) == 7:  # the fourth MeZO step runs out of memory
            raise MemoryError
        return original(self, batch)

    monkeypatch.setattr(Objective, "option_logprobs", fails_once)
    with pytest.raises(ZobenchError, match="out of memory at step 3"):
        run(cfg, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["resumed_at_step"] == 2
    assert metrics["forward_passes"] == 12 and metrics["steps"] == 6
