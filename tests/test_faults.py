"""Fault injection: a run killed at each write point of a checkpoint, then resumed, ends exactly where an
uninterrupted run ends; two writers on one directory never interleave."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import torch as safetensors_torch
from safetensors.torch import load_file

from conftest import QUICK
from zobench import checkpoint as checkpoint_module
from zobench import run_dir as run_dir_module
from zobench.configs import compose
from zobench.run import run

SETTINGS = [*QUICK, "data.n_dev=4", "data.n_test=4", "train.steps=6", "train.eval_interval=0",
            "checkpoint.every=2", "checkpoint.weights=true", "save_model=true"]
# The write points of one checkpoint (checkpoint.write_checkpoint), in order; a kill "at" one comes before it.
POINTS = ["rmtree checkpoint.next", "save_file state", "save_file weights", "write state.json",
          "sync checkpoint.next", "rename checkpoint -> checkpoint.old", "rename checkpoint.next -> checkpoint",
          "sync run dir", "rmtree checkpoint.old", "after the swap"]
DEFAULT = ("save_file weights", "write state.json", "rename checkpoint.next -> checkpoint")  # weights, no state


class Killed(BaseException):
    """The process died here (not an Exception: nothing in zobench handles it)."""


class KillAt:
    """Counts the write calls of the second checkpoint and 'kills' the process before call number `index`:
    from then on nothing is cleaned up, as after a real kill."""

    def __init__(self, monkeypatch, index: int):
        self.index, self.calls, self.saves, self.dead = index, 0, 0, False
        original_save = checkpoint_module.write_checkpoint

        def write_checkpoint(*args, **kwargs):
            self.saves += 1
            original_save(*args, **kwargs)
            if self.saves == 2:
                self._point()  # the last point: the swap done, nothing returned yet

        monkeypatch.setattr(checkpoint_module, "write_checkpoint", write_checkpoint)
        for owner, name in ((safetensors_torch, "save_file"), (checkpoint_module, "atomic_write_text"),
                            (run_dir_module, "sync_dir"), (pathlib.Path, "rename"), (shutil, "rmtree")):
            monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _point(self) -> None:
        if self.saves == 2 and not self.dead:
            if self.calls == self.index:
                self.dead = True
                raise Killed
            self.calls += 1

    def _wrap(self, name, function):
        def wrapped(*args, **kwargs):
            if self.dead:
                if name == "rmtree":
                    return None  # a dead process cleans nothing up
                raise Killed
            self._point()
            return function(*args, **kwargs)

        return wrapped


def _outcome(run_dir: pathlib.Path, metrics: dict) -> dict:
    log = [{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "train_s")}
           for line in (run_dir / "log.jsonl").read_text().splitlines()]
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    return {"metrics": {k: metrics[k] for k in ("status", "test_metric", "dev_loss", "best_step", "steps",
                                                 "forward_passes", "tokens")},
            "log": log, "trajectory": (run_dir / "trajectory.jsonl").read_text(), "weights": weights}


@pytest.fixture(scope="module")
def one_go(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_go") / "run"
    return _outcome(run_dir, run(compose(SETTINGS), run_dir))


@pytest.mark.parametrize("point", [pytest.param(p, marks=() if p in DEFAULT else pytest.mark.slow) for p in POINTS])
def test_a_kill_at_each_checkpoint_write_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, one_go, point):
    run_dir = tmp_path / "run"
    KillAt(monkeypatch, POINTS.index(point))
    with pytest.raises(Killed):
        run(compose(SETTINGS), run_dir)
    monkeypatch.undo()
    resumed = run(compose(SETTINGS), run_dir)
    assert resumed["resumed_at_step"] in (2, 4)  # the old checkpoint or the new one, never a mix
    outcome = _outcome(run_dir, resumed)
    assert outcome["metrics"] == one_go["metrics"]
    assert outcome["log"] == one_go["log"] and outcome["trajectory"] == one_go["trajectory"]
    assert all(torch.equal(outcome["weights"][k], one_go["weights"][k]) for k in one_go["weights"])
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint.") or p.name.endswith(".tmp")]


def test_two_zobench_processes_on_one_directory_never_interleave(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "zobench.cli", *QUICK, "train.steps=5000", "train.eval_interval=0",
               "checkpoint.every=1000", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        trajectory = run_dir / "trajectory.jsonl"
        deadline = time.time() + 300
        while not (trajectory.exists() and trajectory.read_text()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)  # the same command
        assert second.returncode == 2 and "in use by another zobench process" in second.stderr
        assert len([line for line in second.stderr.splitlines() if line.strip()]) == 1
        first.send_signal(signal.SIGTERM)  # the first run stops after its step, as a pre-empted job does
        assert first.wait(timeout=300) == 130, first.stderr.read()
    finally:
        first.kill()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = [json.loads(line)["step"] for line in trajectory.read_text().splitlines()]
    assert metrics["status"] == "interrupted" and steps == list(range(1, metrics["steps"] + 1))
