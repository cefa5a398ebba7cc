"""ZO-Bench's baselines: each does its documented update, checked against torch.optim fed the ZO estimate."""

from __future__ import annotations

import pytest
import torch

from test_optim_adamezo import small_blocks, toy  # noqa: F401  (a fixture)
from zobench.optim.engine import decays
from zobench.optim.zo_adam import ZOAdam
from zobench.optim.zo_sgd_momentum import ZOSGDMomentum
from zobench.optim.zo_sgd_sign import ZOSGDSign
from zobench.run import run


def _replay_with_torch(optimizer_class, torch_class, settings, torch_settings, steps=3):
    """Runs the ZO optimizer, then gives torch's optimizer param.grad = ĝ = g·z of the same steps."""
    model, optimizer, batch = toy(optimizer_class, **settings)
    reference, _, _ = toy(optimizer_class, **settings)  # the same initial weights
    named = dict(reference.named_parameters())
    groups = [{"params": [p for n, p in named.items() if decays(n)], "weight_decay": settings["weight_decay"]},
              {"params": [p for n, p in named.items() if not decays(n)], "weight_decay": 0.0}]
    replay = torch_class(groups, lr=optimizer.lr, **torch_settings)
    for _ in range(steps):
        optimizer.step(batch)
        for index, (name, _) in enumerate(optimizer.engine.named):
            named[name].grad = sum(g * optimizer.engine.direction(s, index, named[name])
                                   for s, g in optimizer.last_projected_grads) / optimizer.q
        replay.step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), named[name].detach(), atol=1e-6, rtol=1e-5, msg=name)
    return optimizer


def test_zo_sgd_momentum_is_torch_sgd_with_momentum_on_the_estimate(small_blocks):
    optimizer = _replay_with_torch(ZOSGDMomentum, torch.optim.SGD, dict(momentum=0.9, weight_decay=0.1, q=2),
                                   dict(momentum=0.9))
    assert len(optimizer.state) == 4  # one stored buffer per parameter


def test_zo_adam_is_torch_adam_on_the_estimate(small_blocks):
    optimizer = _replay_with_torch(ZOAdam, torch.optim.Adam, dict(betas=[0.9, 0.999], adam_eps=1e-8, weight_decay=0.0),
                                   dict(betas=(0.9, 0.999), eps=1e-8))
    assert all(len(s) == 2 for s in optimizer.state.values())  # m and v stored


def test_zo_sgd_sign_steps_along_the_sign_of_g(small_blocks):
    model, optimizer, batch = toy(ZOSGDSign, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step(batch)
    (seed, g), = optimizer.last_projected_grads
    assert g != 0
    for index, (name, param) in enumerate(optimizer.engine.named):
        keep = 1 - 1e-2 * 0.1 if optimizer.engine.decays[index] else 1.0
        z = optimizer.engine.direction(seed, index, param)
        expected = keep * before[name] - 1e-2 * (1.0 if g > 0 else -1.0) * z
        torch.testing.assert_close(param.detach(), expected, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["zo_adam", "zo_sgd_sign", "zo_sgd_momentum"])
def test_zo_baseline_runs_end_to_end(quick_cfg, tmp_path, name):
    metrics = run(quick_cfg(f"optimizer={name}", "train.steps=2"), tmp_path)
    assert metrics["status"] == "completed"
    assert (metrics["forward_passes"], metrics["backward_passes"]) == (4, 0)
