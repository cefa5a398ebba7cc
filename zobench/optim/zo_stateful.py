"""ZO-Bench's stateful baselines (Zhang et al., ICML 2024; ZO-Bench/ZO-LLM, zo-bench/trainer.py zo_step):
the zeroth-order estimate ĝ = (1/q)·Σ_k g_k·z_k (MeZO's Eq. 1 per direction) is handed, as a gradient,
to a first-order rule whose state tensors are stored in full, one per parameter and state: the memory
cost these baselines are there to show. ZO-Bench sets param.grad = ĝ and calls a torch optimizer
parameter by parameter; here the rule runs block by block (the engine's `update`), with the restore
after the −eps evaluation fused into the same pass, and torch.optim's arithmetic. Weight decay, as in
torch.optim, is L2 added to the estimate (ZO-Bench passes none; 0 by default).
"""

from __future__ import annotations

import torch

from .mezo import MeZO


class StatefulZO(MeZO):
    state_names: tuple[str, ...] = ()

    def __init__(self, model, loss_fn, cfg, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, cfg, seed=seed, total_steps=total_steps, precision=precision)
        self.state: dict[int, list[torch.Tensor]] = {}  # parameter index -> its full-size state tensors
        self.updates = 0

    def step_block(self, theta: torch.Tensor, grad: torch.Tensor, state: list[torch.Tensor], lr: float) -> None:
        raise NotImplementedError

    def update(self, pairs, lr: float, lr_times_wd: float, restore: bool) -> None:
        self.updates += 1
        coefficients = [g / self.q for _, g in pairs]
        for index in range(len(self.engine.named)):  # here, not in the rule: blocks run on several threads
            self._state(index)

        def rule(index, theta, zs, offset):
            grad = self.engine.scratch(theta, "grad").zero_()
            for coefficient, z in zip(coefficients, zs):
                grad.add_(z, alpha=coefficient)
            if self.weight_decay and self.engine.decays[index]:
                grad.add_(theta, alpha=self.weight_decay)
            state = [s.view(-1)[offset:offset + theta.numel()] for s in self._state(index)]
            self.step_block(theta, grad, state, lr)

        self.engine.update([seed for seed, _ in pairs], rule, restore=(pairs[-1][0], self.eps) if restore else None)
        self.last_projected_grads = pairs

    def _state(self, index: int) -> list[torch.Tensor]:
        if index not in self.state:
            param = self.engine.named[index][1]
            self.state[index] = [torch.zeros_like(param, memory_format=torch.contiguous_format)
                                 for _ in self.state_names]
        return self.state[index]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "zo_state": self.state, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.state = {index: [t.clone() for t in tensors] for index, tensors in state["zo_state"].items()}
        self.updates = state["updates"]
