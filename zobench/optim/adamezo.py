"""AdaMeZO (Cai, Chen, Zhu, arXiv 2605.00650, ICML 2026): Adam-style zeroth-order steps, no moment tensors.

Each step keeps only its direction seed s_t and projected gradient c_t (MeZO's Eq. 1). The update
regenerates the last h directions, block by block, and forms the truncated moments
  m = Σ_{k=0}^{h-1} β1^k · c_{t-k} · z_{t-k},     v = Σ_{k=0}^{h-1} β2^k · c_{t-k}² · z_{t-k}²
  θ ← θ − lr·(scale · m / (√v + δ) + wd·θ)        (wd on weights only, not biases and layer norms)
The paper's own equations could not be read; this follows its reference code (shawnnn3di/AdaMeZO,
MeZO/medium_models/src/trainer.py, Trainer.train): no (1 − β) factors and no bias correction, δ = 1e-5
outside the root and scale = 100 (constants there, config here), β2 = 0 meaning v = 1, and the first
h + 1 steps (all of them if h < 2) plain MeZO steps. A third-party summary writes (1 − β) factors and δ
inside the root; where it differs, the code is what produced the paper's numbers.
Cost: h regenerations of z per step for the update plus MeZO's two perturbation passes, the restore
fused in (h + 2; the reference makes h + 3). Memory: m and v exist for one block of 2^20 weights at a
time, never for a whole layer: the peak stays MeZO's. 16-bit: see `update` for the sums' dtype; θ's update
rounds as precision.zo_update says (numerics.py: reference = trainer.py's param.data - lr*(g + wd*param.data)).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..errors import ZobenchError
from .mezo import MeZO


class AdaMeZO(MeZO):
    @dataclass(frozen=True)
    class Settings(MeZO.Settings):
        horizon: int  # h: directions the moments look back over (the reference's HESS_WINDOW)
        beta1: float
        beta2: float
        scale: float  # the fixed factor on m / (sqrt(v) + delta)
        delta: float

    @classmethod
    def check_settings(cls, settings, prefix: str) -> None:
        super().check_settings(settings, prefix)
        if settings.q != 1:
            raise ZobenchError(f"{prefix}.q must be 1: adamezo keeps one direction per step (q=1, as its reference "
                               f"code), got q={settings.q}")

    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, settings, seed=seed, total_steps=total_steps, precision=precision)
        self.horizon = settings.horizon
        self.beta1, self.beta2 = settings.beta1, settings.beta2
        self.scale, self.delta = settings.scale, settings.delta
        self.history: deque[tuple[int, float]] = deque(maxlen=max(self.horizon, 1))  # (seed, c), oldest first
        self.updates = 0

    def update(self, pairs, lr: float, lr_times_wd: float, restore: bool) -> None:
        (seed, _), = pairs
        self.history.extend(pairs)
        warming_up = self.horizon < 2 or self.updates <= self.horizon
        self.updates += 1
        if warming_up:
            super().update(pairs, lr, lr_times_wd, restore)
            return
        newest = len(self.history) - 1
        weights = [(c * self.beta1 ** (newest - i), c * c * self.beta2 ** (newest - i))
                   for i, (_, c) in enumerate(self.history)]

        numerics = self.engine.numerics
        # the sums in precision.state_dtype: `weights` as the reference (its temp_grad/temp_hess are zeros of the
        # param's dtype), each accumulation rounded there and saturating at its largest finite value (c²z² can
        # pass fp16's 65504, where the reference's √v is inf); `float32` by default. δ and the division in fp32.
        in_state_dtype = self.precision.half and self.precision.state_dtype == "weights"

        def rule(index, theta, zs, offset):
            m = self.engine.scratch(theta, "m", torch.float32).zero_()
            v = self.engine.scratch(theta, "v", torch.float32).zero_()
            limit = torch.finfo(theta.dtype).max
            for (w1, w2), z in zip(weights, zs):
                z = numerics.f32(theta, z, "n_a")
                m.add_(z, alpha=w1)
                v.addcmul_(z, z, value=w2)
                if in_state_dtype:
                    numerics.round_(theta, m.clamp_(-limit, limit))
                    numerics.round_(theta, v.clamp_(max=limit))
            if self.beta2 == 0:
                v.fill_(1.0)  # the reference's momentum-only mode
            m.div_(v.sqrt_().add_(self.delta)).mul_(self.scale)
            numerics.descend(theta, m, lr, lr_times_wd if self.engine.decays[index] else 0.0)

        self.engine.update([s for s, _ in self.history], rule, restore=(seed, self.eps) if restore else None)
        self.last_projected_grads = pairs

    def state_dict(self) -> dict:
        """For a resume from saved weights: the (seed, c) window and the step count, a few scalars."""
        return {**super().state_dict(), "history": list(self.history), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history = deque(state["history"], maxlen=self.history.maxlen)
        self.updates = state["updates"]
