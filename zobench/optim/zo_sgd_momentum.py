"""ZO-SGD-MMT, ZO-Bench's momentum baseline (Zhang et al., ICML 2024; ZO-Bench/ZO-LLM trainer `zo_sgd` with
`--momentum 0.9`, i.e. torch.optim.SGD): with ĝ the zeroth-order estimate (MeZO's Eq. 1 times z),
  b ← μ·b + ĝ,   θ ← θ − lr·b          (torch.optim.SGD, dampening 0, no Nesterov; b starts at 0)
One stored buffer b per parameter: twice MeZO's parameter memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from .zo_stateful import StatefulZO


class ZOSGDMomentum(StatefulZO):
    state_names = ("momentum_buffer",)

    @dataclass(frozen=True)
    class Settings(StatefulZO.Settings):
        momentum: float

    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, settings, seed=seed, total_steps=total_steps, precision=precision)
        self.momentum = settings.momentum

    def step_block(self, grad, state, lr, keep):
        buffer, = state  # torch.optim.SGD: buf.mul_(momentum).add_(grad), then param.add_(buf, alpha=-lr)
        return keep(keep(buffer.mul_(self.momentum)).add_(grad)), lr
