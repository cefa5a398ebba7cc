"""First-order baselines in 16-bit (issue 13, item 3): the torch baselines with fp32 master weights, autocast,
loss scaling and clipping (HF Trainer --fp16); IP-SGD with per-parameter fp32 arithmetic and LOMO's scaler."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from test_mezo import SAMPLE_ROWS
from zobench.configs import compose
from zobench.encoding import Encoder, collate
from zobench.errors import ZobenchError
from zobench.models import load_model
from zobench.objective import Objective
from zobench.optim import build_optimizer
from zobench.optim import ip_sgd
from zobench.optim.engine import decays
from zobench.optim.loss_scaling import DynamicLossScaler
from zobench.precision import from_config
from zobench.tasks import PromptTemplate, load_task_definition

from conftest import QUICK

HALF = [torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 16-bit CPU kernels on tiny tensors


def setup(name: str, dtype: torch.dtype, *overrides: str, **precision):
    """(model in `dtype`, its optimizer under the precision policy `precision`, one SST-2 batch)."""
    cfg = compose(QUICK + [f"optimizer={name}", *overrides])
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True), torch.device("cpu"), dtype)
    template, encoder = PromptTemplate(load_task_definition("sst2")), Encoder(tokenizer, 256)
    batch = collate([encoder.encode(template.render(row)) for row in SAMPLE_ROWS], tokenizer.pad_token_id,
                    classification=True)
    policy = from_config(OmegaConf.merge(cfg.precision, precision), dtype)
    optimizer = build_optimizer(cfg.optimizer, model, Objective(model), seed=0, total_steps=1000, precision=policy)
    return model, optimizer, batch


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- the scaler ------------------------------------------------------------------------------------------
def test_scaler_follows_grad_scalers_rule():
    scaler = DynamicLossScaler()
    assert scaler.scale == 2.0**16
    for _ in range(1999):
        scaler.update(overflow=False)
    assert scaler.scale == 2.0**16
    scaler.update(overflow=False)  # the 2000th clean step in a row
    assert scaler.scale == 2.0**17
    scaler.update(overflow=True)
    assert (scaler.scale, scaler.clean_steps, scaler.skipped_steps) == (2.0**16, 0, 1)
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
    assert all(type(v) in (int, float) for v in scaler.state_dict().values())  # a weights_only checkpoint loads it


# -- IP-SGD -------------------------------------------------------------------------------------------------
def test_ip_sgd_fp16_overflow_skips_the_step_and_lowers_the_scale():
    model, optimizer, batch = setup("ip_sgd", torch.float16, "optimizer.lr=1e-3")
    scaler = optimizer.in_place.scaler
    assert scaler is not None  # precision.loss_scaling=auto: dynamic for fp16 weights
    scaler.scale = 2.0**40  # the scaled gradients cannot fit fp16
    before = snapshot(model)
    loss = optimizer.step(batch)
    assert math.isfinite(loss)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # not one weight changed
    assert all(p.grad is None for p in model.parameters())
    assert (scaler.scale, scaler.skipped_steps) == (2.0**39, 1)
    scaler.scale = 2.0**16
    optimizer.step(batch)  # a clean step updates, every weight finite
    assert not torch.equal(model.get_input_embeddings().weight, before["model.decoder.embed_tokens.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert scaler.clean_steps == 1


def test_ip_sgd_scale_grows_after_enough_clean_steps():
    model, optimizer, batch = setup("ip_sgd", torch.float16)
    scaler = optimizer.in_place.scaler
    scaler.growth_interval = 3  # GradScaler's 2000, shortened for the test
    for _ in range(3):
        optimizer.step(batch)
    assert scaler.scale == 2.0**17 and scaler.skipped_steps == 0


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_ip_sgd_fp32_arithmetic_is_the_fp32_update_rounded_once(dtype, monkeypatch):
    """θ' = round(θ − lr·(c·g/scale + wd·θ)), computed in fp32 from the (scaled) 16-bit gradient, for every
    weight, clipped (c) at grad_clip: the oracle takes g from a plain backward of the same batch. The fp32
    copies are made a chunk at a time: chunks of 1000 elements here, so the tiny model's matrices split."""
    monkeypatch.setattr(ip_sgd, "CHUNK", 1000)
    lr, wd, clip = 1e-4, 0.1, 0.5
    model, optimizer, batch = setup("ip_sgd", dtype, f"optimizer.lr={lr}", f"optimizer.weight_decay={wd}",
                                    grad_clip=clip)
    scale = optimizer.in_place.scaler.scale if optimizer.in_place.scaler is not None else 1.0
    assert (scale == 2.0**16) == (dtype == torch.float16)
    reference = copy.deepcopy(model)
    reference.train()
    (Objective(reference)(batch) * scale).backward()
    grads = {n: p.grad.float() / scale for n, p in reference.named_parameters()}
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    coefficient = min(1.0, clip / (norm + 1e-6))
    before = snapshot(model)
    optimizer.step(batch)
    assert optimizer.in_place.grad_norm == pytest.approx(norm, rel=1e-5)
    for name, param in model.named_parameters():
        theta = before[name].float()
        step = grads[name] * coefficient + (wd * theta if decays(name) else 0.0)
        assert param.dtype == dtype
        assert torch.equal(param, (theta - lr * step).to(dtype)), name


# -- the torch baselines ---------------------------------------------------------------------------------
def test_adam_on_plain_fp16_weights_is_refused_with_the_fix():
    with pytest.raises(ZobenchError, match="precision.master_weights=true"):
        setup("adam", torch.float16, master_weights=False)


def test_adam_on_plain_bf16_weights_stays_finite():
    """bf16 has fp32's exponent range: eps and v do not flush to zero (the updates are coarse, not NaN)."""
    model, optimizer, batch = setup("adam", torch.bfloat16, master_weights=False)
    for _ in range(2):
        optimizer.step(batch)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_master_weights_stay_fp32_and_steps_stay_finite(name, dtype):
    model, optimizer, batch = setup(name, dtype, master_weights=True, grad_clip=1.0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in optimizer.optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim())
    losses = [optimizer.step(batch) for _ in range(3)]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert (optimizer.scaler is not None) == (dtype == torch.float16)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_forward_runs_in_16_bit_under_autocast(dtype):
    model, optimizer, batch = setup("sgd", dtype, master_weights=True)
    seen = []
    handle = model.model.decoder.layers[0].fc1.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    optimizer.step(batch)
    handle.remove()
    assert seen == [dtype]


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_clipping_at_1_bounds_the_applied_gradient_norm(dtype):
    """SGD, momentum 0: the step is lr·ĝ, so ‖Δθ‖/lr is the norm of the gradient that was applied."""
    lr = 1.0
    model, optimizer, batch = setup("sgd", dtype, f"optimizer.lr={lr}", master_weights=True, grad_clip=1.0)
    optimizer.scaler and setattr(optimizer.scaler, "scale", 2.0**8)  # big gradients: no overflow at this scale
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30.0)  # a steep start: the raw gradient norm is well above 1
    before = snapshot(model)
    optimizer.step(batch)
    applied = math.sqrt(sum(float((p.detach().double() - before[n].double()).square().sum())
                            for n, p in model.named_parameters())) / lr
    assert optimizer.grad_norm > 2.0
    assert applied == pytest.approx(1.0, rel=1e-3)


def test_adam_fp16_overflow_skips_the_step_and_lowers_the_scale():
    model, optimizer, batch = setup("adam", torch.float16, master_weights=True, grad_clip=1.0)
    optimizer.scaler.scale = 2.0**200  # the scaled loss overflows fp32: inf gradients
    before = snapshot(model)
    optimizer.step(batch)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert optimizer.scaler.scale == 2.0**199 and not optimizer.optimizer.state  # Adam never stepped


# -- resume ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ip_sgd", "adam"])
def test_fp16_resume_continues_with_the_same_loss_scale(quick_cfg, tmp_path, monkeypatch, name):
    """The scale grows every 2 clean steps here, so a resume that restarted it at 2**10 would step differently (2**10: no overflow on the tiny model)."""
    from conftest import fail_once_at
    from safetensors.torch import load_file

    from zobench.optim import loss_scaling
    from zobench.run import run

    monkeypatch.setattr(loss_scaling.DynamicLossScaler.__init__, "__defaults__", (2.0**10, 2.0, 0.5, 2, 1.0))
    cfg = quick_cfg(f"optimizer={name}", "dtype=float16", "precision.master_weights=true", "train.steps=6",
                    "train.eval_interval=0", "checkpoint.every=2", "save_model=true", "data.n_dev=2", "data.n_test=2")
    one_go = run(cfg, tmp_path / "one_go")
    fail_once_at(monkeypatch, steps_done=4)
    with pytest.raises(ZobenchError, match="out of memory at step 4"):
        run(cfg, tmp_path / "resumed")
    resumed = run(cfg, tmp_path / "resumed")
    assert resumed["status"] == one_go["status"] == "completed" and resumed["resumed_at_step"] == 4
    expected = load_file(str(tmp_path / "one_go" / "model" / "model.safetensors"))
    final = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    # a completed run keeps its checkpoint's state.json (its bulky weights are dropped)
    scales = [json.loads((tmp_path / run_name / "checkpoint" / "state.json").read_text())["state"]["optimizer"]
              ["loss_scaler"] for run_name in ("one_go", "resumed")]
    assert scales[0] == scales[1] and scales[0]["scale"] == 2.0**13  # grown at steps 2, 4, 6 (saved at step 6)
