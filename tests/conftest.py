"""Shared helpers: configs composed exactly as the CLI composes them, tiny models, CLI subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zobench.configs import compose

# Every test is offline: a test that reached for the hub would hang on retries instead of failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

QUICK = ["model=opt-tiny", "task.samples=true", "data.n_train=16", "data.n_dev=8", "data.n_test=12",
         "max_length=256", "train.batch_size=4", "train.log_interval=1", "eval.batch_size=8"]


@pytest.fixture
def quick_cfg():
    """compose(overrides) with the small offline settings; later overrides win."""

    def make(*overrides: str):
        return compose(QUICK + list(overrides))

    return make


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`zobench ARGS` in a subprocess, as a user types it."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "zobench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def only_run_dir(root: Path) -> Path:
    dirs = [p.parent for p in Path(root).rglob("metrics.json")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def fail_once_at(monkeypatch, steps_done: int) -> None:
    """The next optimizer step taken after `steps_done` steps raises MemoryError, once (a run dies there)."""
    from zobench.optim.base import Optimizer

    original, failed = Optimizer.step, []

    def step(self, batch):
        if self.steps_done == steps_done and not failed:
            failed.append(True)
            raise MemoryError
        return original(self, batch)

    monkeypatch.setattr(Optimizer, "step", step)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: 16-bit CPU kernels on tiny tensors run fastest so (and do not fight
    the machine's other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
