"""ZO-SGD-Sign as ZO-Bench ran it: sign(g)·z fed to HF's default AdamW (zobench/optim/zo_sign_adamw.py)."""

from __future__ import annotations

import math

import pytest
import torch

from test_optim_adamezo import small_blocks, toy  # noqa: F401  (a fixture)
from zobench.errors import ZobenchError
from zobench.optim.zo_sgd_sign import ZOSGDSign
from zobench.optim.zo_sign_adamw import ZOSignAdamW

ADAMW = dict(betas=[0.9, 0.999], adam_eps=1e-8, weight_decay=0.0)


def _torch_adamw_fed_the_signed_estimate(settings, steps):
    """The oracle: torch.optim.AdamW given param.grad = (1/q)·Σ sign(g_k)·z_k of the same steps. HF's AdamW
    adds eps to √v before the bias correction, torch's after: HF's eps equals torch's eps/√(1 − β2^t), set
    on the group at each step t."""
    model, optimizer, batch = toy(ZOSignAdamW, **settings)
    reference, _, _ = toy(ZOSignAdamW, **settings)  # the same initial weights
    named = dict(reference.named_parameters())
    eps = settings["adam_eps"]
    oracle = torch.optim.AdamW(named.values(), lr=optimizer.lr, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)
    signs = []
    for t in range(1, steps + 1):
        optimizer.step(batch)
        signs += [math.copysign(1.0, g) for _, g in optimizer.last_projected_grads]
        for index, (name, _) in enumerate(optimizer.engine.named):
            named[name].grad = sum(math.copysign(1.0, g) * optimizer.engine.direction(s, index, named[name])
                                   for s, g in optimizer.last_projected_grads) / optimizer.q
        oracle.param_groups[0]["eps"] = eps / math.sqrt(1 - 0.999 ** t)
        oracle.step()
    return model, named, signs


@pytest.mark.parametrize("q, adam_eps", [(1, 1e-8), (2, 1e-8), (1, 1e-2)])  # 1e-2: where eps sits shows
def test_step_equals_torch_adamw_fed_sign_g_times_z(small_blocks, q, adam_eps):
    model, expected, signs = _torch_adamw_fed_the_signed_estimate({**ADAMW, "q": q, "adam_eps": adam_eps}, steps=6)
    assert len(set(signs)) == 2  # both signs occurred: the sign is taken, not g
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name].detach(), atol=1e-6, rtol=1e-5, msg=name)


def test_it_is_not_plain_signed_sgd(small_blocks):
    """One AdamW step moves each weight by about lr (m/√v = ±1 after bias correction), whatever |z| is;
    plain signed SGD moves it by lr·|z|."""
    adamw_model, adamw, batch = toy(ZOSignAdamW, **ADAMW)
    plain_model, _, _ = toy(ZOSGDSign)
    before = [p.detach().clone() for p in adamw_model.parameters()]
    adamw.step(batch)
    moved = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(adamw_model.parameters(), before)])
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-2), atol=1e-7, rtol=1e-4)
    assert all(len(s) == 2 for s in adamw.state.values())  # m and v stored per parameter


def test_the_trajectory_keeps_g_not_its_sign(small_blocks):
    _, optimizer, batch = toy(ZOSignAdamW, **ADAMW)
    optimizer.step(batch)
    (_, g), = optimizer.last_projected_grads
    assert abs(g) != 1.0


def test_weight_decay_is_refused(small_blocks):
    with pytest.raises(ZobenchError, match="weight_decay must be 0"):
        toy(ZOSignAdamW, **{**ADAMW, "weight_decay": 0.1})


@pytest.mark.parametrize("preset, dtype, optimizers", [
    ("zobench_sst2_opt1.3b", "float32", "mezo,zo_adam"),  # the other two methods: their own grids (issue 22)
    ("zobench_copa_opt13b_bf16", "bfloat16", "zo_sgd_sign,zo_adam"),
    ("zobench_copa_opt13b_fp16", "float16", "mezo"),  # ZO-SGD-MMT: its own grid (issue 22)
])
def test_zobench_presets_carry_its_protocol(preset, dtype, optimizers):
    from test_report_presets import compose_with_hydra

    cfg = compose_with_hydra([f"experiment={preset}", "optimizer=zo_sgd_sign"])
    assert cfg.dtype == dtype and cfg.train.eval_interval == 500 and cfg.train.steps == 20000
    assert cfg.train.batch_size == 16 and cfg.seed == 42 and cfg.data.seed == 0
    assert cfg.hydra.sweeper.params.optimizer == optimizers
    assert cfg.optimizer._target_.endswith("ZOSignAdamW")  # ZO-Bench's zo_sgd_sign is the AdamW one


def test_a_zobench_preset_prints_from_the_cli():
    from conftest import run_cli

    result = run_cli("--cfg", "job", "experiment=zobench_copa_opt13b_bf16", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "zobench.optim.zo_sign_adamw.ZOSignAdamW" in result.stdout and "dtype: bfloat16" in result.stdout
