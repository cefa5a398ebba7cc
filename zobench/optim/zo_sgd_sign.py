"""ZO-SGD-Sign, ZO-Bench's sign baseline (Zhang et al., ICML 2024; ZO-Bench/ZO-LLM trainer `zo_sign_opt`,
`np.sign(projected_grad) * z`): MeZO with the projected gradient g (Eq. 1) replaced by its sign,
  θ ← θ − lr·((1/q)·Σ_k sign(g_k)·z_k + wd·θ)
ZO-Bench's sweeps fed sign(g)·z to HF's default AdamW (optimizer=zo_sgd_sign, zo_sign_adamw.py); this is the
signed-SGD rule its name and code intend (optimizer=zo_sgd_sign_plain). No state: MeZO's memory, MeZO's 3
regenerations of z.
"""

from __future__ import annotations

import math

from .mezo import MeZO


class ZOSGDSign(MeZO):
    def step_scale(self, g: float) -> float:
        return math.copysign(1.0, g) if g != 0 else 0.0
