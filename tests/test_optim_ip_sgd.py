"""IP-SGD: the in-place update equals torch's SGD step, tied weights included."""

from __future__ import annotations

import torch

from test_mezo import _setup, _snapshot
from zobench.run import run


def test_one_step_equals_torch_sgd_with_tied_weights(quick_cfg):
    model, _, ip_sgd, batch = _setup(quick_cfg("optimizer=ip_sgd", "optimizer.lr=0.05", "optimizer.weight_decay=0.1"))
    reference, _, sgd, _ = _setup(quick_cfg("optimizer=sgd", "optimizer.lr=0.05", "optimizer.weight_decay=0.1"))
    assert model.lm_head.weight is model.get_input_embeddings().weight  # OPT ties them: one Parameter
    start = _snapshot(model)
    assert ip_sgd.step(batch) == sgd.step(batch)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name], param, rtol=0, atol=0, msg=name)
    assert all(p.grad is None for p in model.parameters())  # every gradient was freed
    assert not torch.equal(start["model.decoder.embed_tokens.weight"], model.get_input_embeddings().weight)


def test_each_parameter_is_updated_once_per_step(quick_cfg):
    model, _, ip_sgd, batch = _setup(quick_cfg("optimizer=ip_sgd"))
    calls = {}
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    ip_sgd.step(batch)
    assert calls == {name: 1 for name, _ in model.named_parameters()}


def test_ip_sgd_run_end_to_end(quick_cfg, tmp_path):
    metrics = run(quick_cfg("optimizer=ip_sgd", "train.steps=2"), tmp_path)
    assert metrics["status"] == "completed"
    assert (metrics["forward_passes"], metrics["backward_passes"]) == (2, 2)
