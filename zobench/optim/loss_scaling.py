"""Dynamic loss scaling for first-order steps with fp16 gradients (precision.loss_scaling=dynamic).

The loss is multiplied by `scale` before backward, so small fp16 gradients do not flush to zero; the
gradients are divided by it again (in fp32) before they are used. A step whose gradients overflow
(inf/NaN) is skipped and the scale halved; after `growth_interval` clean steps in a row it doubles.
The constants are torch.amp.GradScaler's (init 2**16, growth 2.0 every 2000 clean steps, backoff 0.5),
which HF Trainer `--fp16` (MeZO's FT row) uses. LOMO's DynamicLossScaler (OpenLMLab/LOMO,
lomo/src/utils.py, update_scale, ~lines 332-365) follows the same rule with a floor of 1 and stops the
run when an overflow happens at that floor (it could only mean the gradient overflows unscaled): so do we.
Shared by the torch baselines (first_order.py) and the in-place ones (ip_sgd.py, Addax's FO half).
Its state is plain Python numbers, so a checkpoint resumes with the same scale.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import Diverged

log = logging.getLogger(__name__)


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, min_scale: float = 1.0):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.min_scale = int(growth_interval), float(min_scale)
        self.clean_steps = 0     # clean steps since the last overflow or growth (GradScaler's growth tracker)
        self.skipped_steps = 0   # overflowing steps over the run, for the log

    def update(self, overflow: bool) -> None:
        """After a step: back off on overflow (the caller skipped the step), grow after enough clean steps."""
        if overflow:
            if self.scale <= self.min_scale:
                raise Diverged(f"fp16 gradients overflow even at loss scale {self.scale:g}")
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
            self.skipped_steps += 1
            log.info("fp16 gradients overflowed: step skipped, loss scale lowered to %g", self.scale)
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])


def scaler_for(precision) -> DynamicLossScaler | None:
    """The run's scaler: one where precision.loss_scaling is dynamic (auto resolves to it for fp16 weights)."""
    return DynamicLossScaler() if precision.loss_scaling == "dynamic" else None
