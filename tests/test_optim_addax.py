"""Addax: α=0 is IP-SGD on B1, α=1 is MeZO on B0, 0<α<1 is Eq. (3) at θ_t; the split respects L_T."""

from __future__ import annotations

import pytest
import torch

from test_mezo import SAMPLE_ROWS, _setup, _snapshot
from zobench.optim.addax import zo_half
from zobench.encoding import Encoder, collate
from zobench.errors import ZobenchError
from zobench.models import load_model
from zobench.run import run
from zobench.tasks import PromptTemplate, load_task_definition


def _two_batches(cfg):
    from omegaconf import OmegaConf

    _, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True), torch.device("cpu"), torch.float32)
    template, encoder = PromptTemplate(load_task_definition("sst2")), Encoder(tokenizer, 256)
    examples = [encoder.encode(template.render(row)) for row in SAMPLE_ROWS]
    return (collate(examples[:5], tokenizer.pad_token_id, classification=True),   # B0, "long"
            collate(examples[5:], tokenizer.pad_token_id, classification=True))   # B1, "short"


def _addax(quick_cfg, *overrides):
    cfg = quick_cfg("optimizer=addax", "optimizer.lr=1e-2", *overrides)
    model, objective, addax, _ = _setup(cfg)
    return model, objective, addax, _two_batches(cfg)


def test_alpha_zero_is_ip_sgd_on_the_short_batch(quick_cfg):
    model, _, addax, (long_batch, short_batch) = _addax(quick_cfg, "optimizer.alpha=0")
    reference, _, ip_sgd, _ = _setup(quick_cfg("optimizer=ip_sgd", "optimizer.lr=1e-2"))
    assert addax.step((long_batch, short_batch)) == ip_sgd.step(short_batch)
    for name, param in reference.named_parameters():
        assert torch.equal(dict(model.named_parameters())[name], param), name


def test_alpha_one_is_mezo_on_the_long_batch_with_the_same_seed(quick_cfg):
    model, _, addax, (long_batch, short_batch) = _addax(quick_cfg, "optimizer.alpha=1")
    reference, objective, mezo, _ = _setup(quick_cfg("optimizer=mezo", "optimizer.lr=1e-2"))
    backward_before = objective.counter.backward_passes
    assert addax.step((long_batch, short_batch)) == mezo.step(long_batch)
    assert addax.zo.last_projected_grads == mezo.last_projected_grads
    for name, param in reference.named_parameters():
        assert torch.equal(dict(model.named_parameters())[name], param), name
    assert objective.counter.backward_passes == backward_before


def test_mixed_step_is_equation_3_at_the_same_weights(quick_cfg):
    alpha, lr = 0.3, 1e-2
    model, objective, addax, (long_batch, short_batch) = _addax(quick_cfg, f"optimizer.alpha={alpha}")
    start = _snapshot(model)
    model.train()
    objective(short_batch).backward()  # g1 at θ_t
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    addax.step((long_batch, short_batch))
    (seed, g0), = addax.zo.last_projected_grads
    engine = addax.zo.engine
    for index, (name, param) in enumerate(engine.named):
        z = engine.direction(seed, index, param)
        expected = start[name] - lr * (alpha * g0 * z + (1 - alpha) * g1[name])
        torch.testing.assert_close(param.detach(), expected, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("zo, option", [("sparse_mezo", "sparsity=0.5"), ("adamezo", "horizon=2")])
def test_any_zo_method_can_be_the_zeroth_order_half(quick_cfg, zo, option):
    model, _, addax, batches = _addax(quick_cfg, "optimizer.alpha=0.5", f"optimizer.zo={zo}",
                                      f"+optimizer.zo_options.{option}")
    key, value = option.split("=")
    assert zo_half(addax.settings).name == zo and str(getattr(addax.zo.settings, key)) == value
    start = _snapshot(model)
    for _ in range(4):  # AdaMeZO with h = 2: 3 MeZO steps, then an adaptive one
        addax.step(batches)
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())


def test_unknown_zo_method_is_one_clear_error(quick_cfg):
    with pytest.raises(ZobenchError, match="valid: mezo, sparse_mezo, adamezo"):
        _setup(quick_cfg("optimizer=addax", "optimizer.zo=zo_adam"))


def test_the_split_respects_l_t(quick_cfg):
    _, _, addax, _ = _setup(quick_cfg("optimizer=addax", "optimizer.l_t=30", "optimizer.k0=3", "optimizer.k1=2"))
    lengths = [10, 45, 30, 31, 5, 80, 29, 30, 100]
    batches, seen_long = addax.batches(lengths, 16, seed=0), set()
    for _ in range(12):
        long, short = next(batches)
        assert len(long) == 3 and len(short) == 2
        assert all(lengths[i] > 30 for i in long) and all(lengths[i] <= 30 for i in short)
        seen_long |= set(long)
    assert seen_long == {1, 3, 5, 8}  # every long example is drawn
    with pytest.raises(ZobenchError, match=r"l_t=100 leaves D0 .* empty.* 10 to 100 tokens"):
        addax.l_t = 100
        next(addax.batches([10, 20, 100], 16, seed=0))
    addax.l_t = None  # null: the median length
    assert addax.split([10, 20, 30, 40]) == ([2, 3], [0, 1], 20)


def test_addax_run_end_to_end(quick_cfg, tmp_path):
    metrics = run(quick_cfg("optimizer=addax", "train.steps=2"), tmp_path)
    assert metrics["status"] == "completed"
    assert (metrics["forward_passes"], metrics["backward_passes"]) == (6, 2)  # 2 ZO + 1 FO forward a step
