"""AdaMeZO: the update equals its rule computed with stored z's and explicit m, v; nothing but scalars kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import zobench.optim.engine as engine_module
from zobench.optim.adamezo import AdaMeZO
from zobench.optim.settings import preset_settings
from zobench.run import run


def toy(optimizer_class, **settings):
    """A 2-layer regression net (41 weights) and an optimizer on it; blocks of 7 weights for z."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    batch = SimpleNamespace(x=torch.randn(16, 6), y=torch.randn(16, 1))
    chosen = preset_settings(optimizer_class, **{"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.0, **settings})
    optimizer = optimizer_class(model, lambda b: ((model(b.x) - b.y) ** 2).mean(), chosen, seed=0, total_steps=100)
    return model, optimizer, batch


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(engine_module, "BLOCK", 7)


ADAMEZO = dict(horizon=3, beta1=0.7, beta2=0.9, scale=100.0, delta=1e-5, weight_decay=0.1, q=1)


def test_update_equals_the_rule_with_stored_directions(small_blocks):
    model, optimizer, batch = toy(AdaMeZO, **ADAMEZO)
    engine, seen = optimizer.engine, []
    for step in range(7):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step(batch)
        seen += optimizer.last_projected_grads
        lr = optimizer.lr
        for index, (name, param) in enumerate(engine.named):
            decayed = before[name] * (1 - lr * 0.1) if engine.decays[index] else before[name]
            z = [engine.direction(s, index, param) for s, _ in seen]  # stored z's, whole tensors
            if step <= 3:  # the first h + 1 steps are MeZO steps
                expected = decayed - lr * seen[-1][1] * z[-1]
            else:
                m = sum(0.7 ** k * c * z[-1 - k] for k, (_, c) in enumerate(reversed(seen[-3:])))
                v = sum(0.9 ** k * c ** 2 * z[-1 - k] ** 2 for k, (_, c) in enumerate(reversed(seen[-3:])))
                expected = decayed - lr * 100.0 * m / (v.sqrt() + 1e-5)
            torch.testing.assert_close(param.detach(), expected, atol=1e-6, rtol=1e-5, msg=f"{name} step {step}")
    assert not torch.equal(before["0.weight"], model[0].weight)


def test_it_keeps_only_seeds_and_scalars_and_regenerates_h_plus_2_times(small_blocks, monkeypatch):
    model, optimizer, batch = toy(AdaMeZO, **ADAMEZO)
    for _ in range(4):
        optimizer.step(batch)
    assert len(optimizer.history) == 3
    assert all(isinstance(s, int) and isinstance(c, float) for s, c in optimizer.history)
    assert not [v for v in vars(optimizer).values() if isinstance(v, torch.Tensor)]
    fills, original = [], engine_module.PerturbationEngine._fill
    monkeypatch.setattr(engine_module.PerturbationEngine, "_fill",
                        lambda self, out, *args: fills.append(out.numel()) or original(self, out, *args))
    optimizer.step(batch)  # an adaptive step: 2 perturbation passes + h = 3 directions, restore fused
    assert sum(fills) == (2 + 3) * sum(p.numel() for p in model.parameters())


def test_q_must_be_one():
    with pytest.raises(Exception, match="q=1"):
        toy(AdaMeZO, **{**ADAMEZO, "q": 2})


def test_adamezo_run_end_to_end(quick_cfg, tmp_path):
    metrics = run(quick_cfg("optimizer=adamezo", "optimizer.horizon=2", "train.steps=4"), tmp_path)
    assert metrics["status"] == "completed"
    assert (metrics["forward_passes"], metrics["backward_passes"]) == (8, 0)
