"""ZO-SGD-Sign as ZO-Bench ran it (Zhang et al., ICML 2024; ZO-Bench/ZO-LLM at bf210fa): the signed
estimate ĝ = (1/q)·Σ_k sign(g_k)·z_k (zo-bench/trainer.py zo_step ~1055-1073: `np.sign(projected_grad) * z`
set as param.grad) is handed to the optimizer the HF Trainer holds, which in its sign sweeps is HF's default
AdamW: `run.py` defaults `--optimizer adamw`, no sign_sgd sweep overrides it, and trainer.py's overload
(~314-331) replaces it only for adam/sgd. transformers 4.28.1 (its requirements.txt) defaults to `adamw_hf`,
transformers.optimization.AdamW, with TrainingArguments' betas 0.9/0.999, eps 1e-8, bias correction, wd 0:
  m ← β1·m + (1 − β1)·ĝ,   v ← β2·v + (1 − β2)·ĝ²
  θ ← θ − lr·√(1 − β2^t)/(1 − β1^t) · m / (√v + ε)          (ε added before the bias correction, as HF does)
Two stored moments per parameter, as ZO-Adam. Plain signed SGD is `zo_sgd_sign_plain` (zo_sgd_sign.py).
"""

from __future__ import annotations

import math

import torch

from ..errors import ZobenchError
from .zo_adam import ZOAdam


class ZOSignAdamW(ZOAdam):
    @classmethod
    def check_settings(cls, settings, prefix: str) -> None:
        super().check_settings(settings, prefix)
        if settings.weight_decay:  # HF's decoupled decay is not L2 on the estimate (StatefulZO's wd): refuse it
            raise ZobenchError(f"{prefix}.weight_decay must be 0 for zo_sgd_sign (ZO-Bench's sign sweeps pass 0), "
                               f"got {settings.weight_decay}")

    def update(self, pairs, lr: float, lr_times_wd: float, restore: bool) -> None:
        signed = [(seed, math.copysign(1.0, g) if g != 0 else 0.0) for seed, g in pairs]
        super().update(signed, lr, lr_times_wd, restore)
        self.last_projected_grads = pairs  # the trajectory keeps g itself; the sign is taken again on replay

    def step_block(self, grad, state, lr, keep):
        """StatefulZO's rule: returns (d, s) with θ ← θ − s·d (HF AdamW: ε before the bias correction, then
        param.addcdiv_(m, √v + ε, value=-lr·√(1 − β2^t)/(1 − β1^t)))."""
        exp_avg, exp_avg_sq = state
        keep(keep(exp_avg.mul_(self.beta1)).add_(grad, alpha=1 - self.beta1))
        keep(keep(exp_avg_sq.mul_(self.beta2)).addcmul_(grad, grad, value=1 - self.beta2))
        step_size = lr * math.sqrt(1 - self.beta2 ** self.updates) / (1 - self.beta1 ** self.updates)
        denominator = keep(torch.sqrt(exp_avg_sq, out=self.engine.scratch(grad, "denominator")))
        return torch.div(exp_avg, denominator.add_(self.adam_eps), out=denominator), step_size
