"""Head-tuning (MeZO --head_tuning, ht_opt.py): the LM head alone trains, through the head only."""

from __future__ import annotations

import copy

import pytest
import torch

from test_mezo import _setup
from zobench.errors import ZobenchError
from zobench.optim.head_tuning import train_head_only
from zobench.run import run


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("untie", [False, True])
def test_one_step_changes_the_head_alone(quick_cfg, untie):
    model, _, optimizer, batch = _setup(quick_cfg("optimizer=head_tuning", "optimizer.lr=1e-2",
                                                  f"optimizer.untie={str(untie).lower()}"))
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert [p for p in model.parameters() if p.requires_grad] == [head]
    before = _weights(model)
    optimizer.step(batch)
    after = _weights(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # Tied (MeZO's default) the one matrix is both the head and the input embeddings; untied, only the head.
    expected = {"lm_head.weight"} | ({"model.decoder.embed_tokens.weight"} if not untie else set())
    assert changed == expected
    assert (head is embeddings) == (not untie)


def test_tied_gradient_comes_through_the_head_only(quick_cfg):
    """ht_opt.py runs the body under no_grad: with the tie, the shared matrix gets the gradient its head use
    gives, the same as an untied head's at the same weights (not the input-embedding path's share)."""
    model, objective, _, batch = _setup(quick_cfg("optimizer=zero_shot"))  # the model as loaded
    tied, untied = copy.deepcopy(model), copy.deepcopy(model)
    train_head_only(tied, untie=False)
    train_head_only(untied, untie=True)
    type(objective)(tied)(batch).backward()
    type(objective)(untied)(batch).backward()
    head_grad = untied.get_output_embeddings().weight.grad
    torch.testing.assert_close(tied.get_output_embeddings().weight.grad, head_grad, rtol=1e-5, atol=1e-7)
    assert untied.get_input_embeddings().weight.grad is None


def test_head_tuning_refuses_an_adapter(quick_cfg):
    model, _, _, _ = _setup(quick_cfg("optimizer=zero_shot"))
    model.model.decoder.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # as an adapter leaves it
    with pytest.raises(ZobenchError, match="use peft=none"):
        train_head_only(model, untie=False)


def test_head_tuning_runs_end_to_end_on_a_generation_task(quick_cfg, tmp_path):
    cfg = quick_cfg("optimizer=head_tuning", "task=squad", "train.steps=2", "train.batch_size=2",
                    "data.n_dev=2", "data.n_test=2", "max_length=512")
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["metric"] == "f1"
    assert 0 <= metrics["test_metric"] <= 1 and metrics["dev_loss"] is not None
    assert (metrics["steps"], metrics["forward_passes"], metrics["backward_passes"]) == (2, 2, 2)
    model, _, _, _ = _setup(cfg)
    assert metrics["n_trainable_params"] == model.get_output_embeddings().weight.numel() < metrics["n_params"]
