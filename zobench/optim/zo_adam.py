"""ZO-Adam, ZO-Bench's adaptive baseline with stored moments (Zhang et al., ICML 2024; ZO-Bench/ZO-LLM
trainer `zo_adam`: torch.optim.Adam with its defaults), the memory-hungry method AdaMeZO is compared to.
With ĝ the zeroth-order estimate (MeZO's Eq. 1 times z) and t the step (Kingma & Ba, Algorithm 1):
  m ← β1·m + (1 − β1)·ĝ,   v ← β2·v + (1 − β2)·ĝ²
  θ ← θ − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε_adam)     (torch.optim.Adam's arithmetic)
Two stored moments per parameter: three times MeZO's parameter memory (in fp32 state: five times, with fp16 weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .zo_stateful import StatefulZO


class ZOAdam(StatefulZO):
    state_names = ("exp_avg", "exp_avg_sq")

    @dataclass(frozen=True)
    class Settings(StatefulZO.Settings):
        betas: tuple[float, float]
        adam_eps: float  # Adam's own epsilon (eps is the perturbation size)

    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, settings, seed=seed, total_steps=total_steps, precision=precision)
        self.beta1, self.beta2 = settings.betas
        self.adam_eps = settings.adam_eps

    def step_block(self, grad, state, lr, keep):
        """torch.optim.Adam's operations (foreach, as on CUDA): lerp_, mul_, addcmul_, sqrt, div_, add_(ε), then
        param.addcdiv_(m, denominator, value=-lr/(1 − β1^t))."""
        exp_avg, exp_avg_sq = state
        keep(exp_avg.lerp_(grad, 1 - self.beta1))
        keep(keep(exp_avg_sq.mul_(self.beta2)).addcmul_(grad, grad, value=1 - self.beta2))
        correction1 = 1 - self.beta1 ** self.updates
        correction2_root = math.sqrt(1 - self.beta2 ** self.updates)
        # ε added in fp32, to the fp32 √v̂ of this block: torch adds it in the state's dtype, where 1e-8
        # rounds to 0 in fp16 and a v that underflowed (|ĝ| < ~8e-3) then divides by zero (issue 13)
        denominator = keep(torch.sqrt(exp_avg_sq, out=self.engine.scratch(grad, "denominator")))
        keep(denominator.div_(correction2_root)).add_(self.adam_eps)
        return torch.div(exp_avg, denominator, out=denominator), lr / correction1
