"""Sparse MeZO: sparsity 0 is MeZO; frozen weights never move; one mask per step for +eps, -eps and update."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import zobench.optim.engine as engine_module
from test_mezo import _setup, _snapshot
from zobench.errors import ZobenchError
from zobench.run import run


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 1,000 weights, so the tiny model's matrices span several blocks of z and of masks."""
    monkeypatch.setattr(engine_module, "BLOCK", 1000)


def test_sparsity_zero_behaves_as_mezo(quick_cfg, small_blocks):
    # eps 1e-2: the fp32 losses then fix g to ~1e-5 (MeZO perturbs in place, S-MeZO in the forward:
    # the perturbed weights agree to rounding, not bit for bit).
    common = ("optimizer.lr=1e-2", "optimizer.eps=1e-2")
    sparse_model, _, sparse, batch = _setup(quick_cfg("optimizer=sparse_mezo", "optimizer.sparsity=0", *common))
    mezo_model, _, mezo, _ = _setup(quick_cfg("optimizer=mezo", *common))
    for _ in range(2):
        assert sparse.step(batch) == pytest.approx(mezo.step(batch), rel=1e-5)
        (seed, g), = sparse.last_projected_grads
        assert seed == mezo.last_projected_grads[0][0] and g == pytest.approx(mezo.last_projected_grads[0][1], abs=1e-4)
    moved = {n: p for n, p in sparse_model.named_parameters()}
    for name, param in mezo_model.named_parameters():
        torch.testing.assert_close(moved[name], param, atol=1e-6, rtol=1e-5, msg=name)


def test_weights_above_the_threshold_never_change(quick_cfg, small_blocks):
    model, _, optimizer, batch = _setup(quick_cfg("optimizer=sparse_mezo", "optimizer.sparsity=0.8",
                                                  "optimizer.lr=1e-2", "optimizer.weight_decay=0.1"))
    start = _snapshot(model)
    for _ in range(3):
        optimizer.step(batch)
    named = optimizer.engine.named
    assert {named[i][1].dim() for i in optimizer.thresholds} == {2}  # every matrix, nothing else, is masked
    assert len(optimizer.thresholds) == sum(p.dim() >= 2 for _, p in named)
    for index, threshold in optimizer.thresholds.items():
        name, param = named[index]
        frozen = start[name].abs() > threshold
        assert 0.75 < float(frozen.float().mean()) <= 0.8 + 1e-3, name  # about 80% frozen
        assert torch.equal(param[frozen], start[name][frozen]), name
        assert float((param[~frozen] != start[name][~frozen]).float().mean()) > 0.9, name
    assert any(not torch.equal(p, start[n]) for n, p in named if p.dim() == 1)  # 1-D tensors train densely


def test_one_mask_per_step_for_both_perturbations_and_the_update(quick_cfg, small_blocks):
    model, _, optimizer, batch = _setup(quick_cfg("optimizer=sparse_mezo", "optimizer.lr=1e-1"))
    masks, original = defaultdict(list), optimizer.mask

    def recording(index, theta):
        mask = original(index, theta)
        if mask is not None:
            masks[(index, theta.data_ptr())].append(mask.clone())
        return mask

    optimizer.engine.mask = recording
    optimizer.step(batch)
    tied = optimizer.engine.named.index(("model.decoder.embed_tokens.weight", model.get_input_embeddings().weight))
    assert masks and {index for index, _ in masks} == set(optimizer.thresholds)
    for (index, _), seen in masks.items():
        assert len(seen) == (5 if index == tied else 3)  # +eps, -eps (twice each: embedding and LM head), update
        assert all(torch.equal(seen[0], mask) for mask in seen[1:])
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # hooks removed


def test_sparsity_must_leave_something_to_train(quick_cfg):
    with pytest.raises(ZobenchError, match="sparsity"):
        _setup(quick_cfg("optimizer=sparse_mezo", "optimizer.sparsity=1.0"))


def test_sparse_mezo_run_end_to_end(quick_cfg, tmp_path):
    metrics = run(quick_cfg("optimizer=sparse_mezo", "train.steps=3"), tmp_path)
    assert metrics["status"] == "completed"
    assert (metrics["forward_passes"], metrics["backward_passes"]) == (6, 0)
