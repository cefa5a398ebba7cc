"""MeZO on the shared perturbation engine: exact restore, unbiased direction, it learns."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from zobench.encoding import Encoder, collate
from zobench.models import load_model
from zobench.objective import Objective
from zobench.optim import build_optimizer
from zobench.optim import engine as engine_module
from zobench.optim.engine import PerturbationEngine
from zobench.tasks import PromptTemplate, load_task_definition

SAMPLE_ROWS = [{"sentence": s, "label": l} for s, l in [
    ("a bright and lovely story", 1), ("a dull and tired mess", 0), ("warm, funny and wise", 1),
    ("clumsy, loud and boring", 0), ("a joy from start to end", 1), ("a chore to sit through", 0),
    ("moving and beautifully acted", 1), ("lifeless and far too long", 0)]]


def _setup(cfg, arch=None):
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    if arch:
        spec["arch"].update(arch)
    model, tokenizer = load_model(spec, torch.device("cpu"), torch.float32)
    template = PromptTemplate(load_task_definition("sst2"))
    encoder = Encoder(tokenizer, 256)
    examples = [encoder.encode(template.render(row)) for row in SAMPLE_ROWS]
    batch = collate(examples, tokenizer.pad_token_id, classification=True)
    objective = Objective(model)
    optimizer = build_optimizer(cfg.optimizer, model, objective, seed=0, total_steps=1000)
    return model, objective, optimizer, batch


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lr_zero_restores_the_weights_to_rounding(quick_cfg):
    """Tolerance: +eps·z, −2eps·z, +eps·z are three float32 roundings, each at most half an ulp of
    |θ| + 2eps·|z|; restoring by adding the perturbation back cannot be bit-exact for every weight
    without keeping a copy of them, which MeZO's memory budget forbids."""
    model, _, optimizer, batch = _setup(quick_cfg("optimizer.lr=0"))
    before = _snapshot(model)
    optimizer.step(batch)
    (seed, _), = optimizer.last_projected_grads
    engine, exact, total = optimizer.engine, 0, 0
    for index, (name, param) in enumerate(engine.named):
        z = engine.direction(seed, index, param)
        bound = 2 * torch.finfo(torch.float32).eps * (before[name].abs() + 2 * optimizer.eps * z.abs())
        assert torch.all((param - before[name]).abs() <= bound), name
        exact += int((param == before[name]).sum())
        total += param.numel()
    assert exact > 0.5 * total  # most weights come back bit for bit


def test_step_regenerates_z_three_times_per_parameter(quick_cfg, monkeypatch):
    model, _, optimizer, batch = _setup(quick_cfg())
    calls = []
    original = PerturbationEngine._fill
    monkeypatch.setattr(PerturbationEngine, "_fill",
                        lambda self, out, seed, index, block: calls.append((index, block)) or
                        original(self, out, seed, index, block))
    optimizer.step(batch)
    blocks = sum(-(-p.numel() // engine_module.BLOCK) for p in model.parameters())
    assert len(calls) == 3 * blocks  # every block of z drawn three times: +eps, -2eps, restore+update
    assert {index for index, _ in calls} == set(range(len(list(model.parameters()))))


def test_average_zo_estimate_points_along_the_true_gradient(quick_cfg):
    # A very small OPT (about 4k weights) so that 1,500 directions give a clear average.
    model, objective, optimizer, batch = _setup(
        quick_cfg("optimizer.eps=1e-3"),
        arch={"hidden_size": 8, "ffn_dim": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
              "word_embed_proj_dim": 8, "max_position_embeddings": 128})
    model.eval()
    loss = objective(batch)
    loss.backward()
    true_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    engine = optimizer.engine
    estimate = torch.zeros_like(true_grad)
    for _ in range(1500):
        (seed, g), = optimizer.projected_gradients(batch)[0]
        engine.perturb(seed, optimizer.eps)  # back to θ
        estimate += g * torch.cat([engine.direction(seed, i, p).flatten() for i, (_, p) in enumerate(engine.named)])
    cosine = torch.nn.functional.cosine_similarity(estimate, true_grad, dim=0)
    assert cosine > 0.3, float(cosine)


def test_mezo_lowers_the_training_loss(quick_cfg):
    model, objective, optimizer, batch = _setup(quick_cfg("optimizer.lr=2e-3", "optimizer.eps=1e-3"))
    with torch.inference_mode():
        before = float(objective(batch))
    for _ in range(300):
        optimizer.step(batch)
    with torch.inference_mode():
        after = float(objective(batch))
    assert after < before - 0.05, (before, after)


def test_several_directions_are_evaluated_at_the_same_weights(quick_cfg):
    """q > 1: every direction's pair of losses is taken at θ, and the update averages g·z over them."""
    cfg = quick_cfg("optimizer.q=3", "optimizer.lr=1e-2")
    model, objective, optimizer, batch = _setup(cfg)
    start = _snapshot(model)
    optimizer.step(batch)
    pairs = optimizer.last_projected_grads
    assert len(pairs) == 3 and len({seed for seed, _ in pairs}) == 3
    moved = _snapshot(model)
    engine = optimizer.engine
    for index, (name, param) in enumerate(engine.named):
        expected = start[name] - 1e-2 / 3 * sum(g * engine.direction(s, index, param) for s, g in pairs)
        torch.testing.assert_close(moved[name], expected, atol=1e-6, rtol=1e-5)
    # The losses of each direction are those at θ: recompute the first one by hand.
    model.load_state_dict(start, strict=False)
    seed, g = pairs[0]
    engine.perturb(seed, optimizer.eps)
    with torch.inference_mode():
        plus = float(objective(batch))
    engine.perturb(seed, -2 * optimizer.eps)
    with torch.inference_mode():
        minus = float(objective(batch))
    assert abs((plus - minus) / (2 * optimizer.eps) - g) < 1e-3 * max(1.0, abs(g))
