"""16-bit numerics on a real CUDA device (pytest -m gpu; benchmarks/gpu_check.sh runs them).

The CPU tests emulate CUDA's rounding (each op in fp32, one rounding); these check that emulation against
CUDA's own fp16 kernels, and the landed fractions and first-order baselines on the device itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from zobench.optim.engine import PerturbationEngine
from zobench.precision import Precision

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def _gaussian(n=1 << 22, dtype=torch.float16):
    return (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype).to(CUDA)


def _mezo_step(mode, theta0, lr, g=1.0, eps=1e-3, seed=5):
    param = torch.nn.Parameter(theta0.clone())
    engine = PerturbationEngine([("w", param)], seed=0, precision=Precision(weights=theta0.dtype, zo_update=mode))
    with torch.no_grad():
        engine.perturb(seed, eps)
        engine.perturb(seed, -2 * eps)
        engine.apply([(seed, eps, g)], lr=lr)
    return param.detach(), engine.direction(seed, 0, param)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_mode_is_trainer_py_run_on_cuda_bit_for_bit(dtype):
    """MeZO's own ops on CUDA's 16-bit kernels: param.data + s*z*eps, then param.data - lr*(g*z)."""
    theta0, lr, g, eps = _gaussian(dtype=dtype), 1e-6, 0.75, 1e-3
    moved, z = _mezo_step("reference", theta0, lr, g, eps)
    theta = theta0
    for s in (1, -2, 1):
        theta = theta + s * z * eps
    theta = theta - lr * (g * z)
    assert torch.equal(moved, theta)


def test_landed_fractions_on_cuda_fp16():
    theta0 = _gaussian()

    def fraction(mode):
        moved, z = _mezo_step(mode, theta0, 1e-6)
        intended = -1e-6 * z.double()
        return float(((moved.double() - theta0.double()) * intended).sum() / (intended * intended).sum())

    fused, reference = fraction("fused"), fraction("reference")
    print(f"landed at lr·g = 1e-6, fp16 on CUDA: reference {reference:.3f}, fused {fused:.3f}")
    assert abs(fused - 1) < 0.10
    assert 0.18 < reference < 0.28


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_fp16_first_order_baselines_stay_finite_on_cuda(quick_cfg, name):
    from test_precision_zo import _tiny_opt_and_batch

    from zobench.objective import Objective
    from zobench.optim import build_optimizer

    model, batch = _tiny_opt_and_batch(torch.float16)
    model, batch = copy.deepcopy(model).to(CUDA), batch.to(CUDA)
    precision = Precision(weights=torch.float16, master_weights=True, loss_scaling="dynamic", grad_clip=1.0)
    cfg = OmegaConf.merge(quick_cfg(f"optimizer={name}").optimizer, {"lr": 1e-4})
    optimizer = build_optimizer(cfg, model, Objective(model), seed=0, total_steps=20, precision=precision)
    losses = [optimizer.step(batch) for _ in range(20)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]
