"""The engine's CPU thread pool is only a speed-up: every zeroth-order method's steps come out bit for bit
the same on one thread as on two (in place, in the forward and block-by-block updates alike)."""

from __future__ import annotations

import pytest
import torch

import zobench.optim.engine as engine_module
from test_mezo import _setup

METHODS = [("mezo",), ("sparse_mezo", "optimizer.sparsity=0.5"), ("adamezo", "optimizer.horizon=2"), ("zo_adam",)]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m[0])
def test_one_thread_and_two_give_identical_steps(quick_cfg, monkeypatch, method):
    monkeypatch.setattr(engine_module, "BLOCK", 1000)  # the tiny model's matrices span several blocks
    name, *extra = method
    runs = []
    for threads in (1, 2):
        model, _, optimizer, batch = _setup(quick_cfg(f"optimizer={name}", "optimizer.lr=1e-2", *extra))
        optimizer.engine.threads = threads
        losses = [optimizer.step(batch) for _ in range(4)]  # AdaMeZO: adaptive from step h + 2
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (losses_1, weights_1), (losses_2, weights_2) = runs
    assert losses_1 == losses_2
    for name, weight in weights_1.items():
        assert torch.equal(weight, weights_2[name]), name
