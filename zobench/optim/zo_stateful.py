"""ZO-Bench's stateful baselines (Zhang et al., ICML 2024; ZO-Bench/ZO-LLM, zo-bench/trainer.py zo_step):
the zeroth-order estimate ĝ = (1/q)·Σ_k g_k·z_k (MeZO's Eq. 1 per direction) is handed, as a gradient,
to a first-order rule whose state tensors are stored in full, one per parameter and state: the memory
cost these baselines are there to show. ZO-Bench sets param.grad = ĝ and calls a torch optimizer
parameter by parameter; here the rule runs block by block (the engine's `update`), with the restore
after the −eps evaluation fused into the same pass, and torch.optim's arithmetic. Weight decay, as in
torch.optim, is L2 added to the estimate (ZO-Bench passes none; 0 by default).
16-bit weights: the restore rounds as precision.zo_update says (numerics.py); θ then moves by the rule's step
rounded once, θ ← r(θ − s·d), as torch's optimizers end (`param.addcdiv_` / `param.add_`, fp32 opmath on
CUDA), in either mode. The state is kept in precision.state_dtype (`weights` = the reference's, torch's
zeros_like(param); `float32` by default). In `reference` mode with 16-bit state the rule also rounds as
ZO-Bench's does: ĝ = g·z handed over in the weights' dtype (`param.grad = graddiff_times_z`), and each of
torch's state operations (lerp_, mul_, addcmul_, sqrt, div_) rounded into the state's dtype; one difference
is kept on purpose: Adam's ε is added in fp32 (in fp16 torch's 1e-8 rounds to 0, and a v that underflowed
then divides by zero: issue 13). `fused` mode and fp32 state run the rule in fp32, the state rounded once.
"""

from __future__ import annotations

import torch

from .mezo import MeZO
from .numerics import WIDE


class StatefulZO(MeZO):
    state_names: tuple[str, ...] = ()

    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, settings, seed=seed, total_steps=total_steps, precision=precision)
        self.state: dict[int, list[torch.Tensor]] = {}  # parameter index -> its full-size state tensors
        self.updates = 0

    def step_block(self, grad: torch.Tensor, state: list[torch.Tensor], lr: float, keep) -> tuple[torch.Tensor, float]:
        """Advances the fp32 state blocks by the fp32 gradient block; returns (d, s) with θ ← θ − s·d.
        `keep(t)`: t rounded in place to the state's dtype where the reference rounds each operation (else t)."""
        raise NotImplementedError

    def update(self, pairs, lr: float, lr_times_wd: float, restore: bool) -> None:
        self.updates += 1
        coefficients = [g / self.q for _, g in pairs]
        for index in range(len(self.engine.named)):  # here, not in the rule: blocks run on several threads
            self._state(index)

        numerics = self.engine.numerics

        def rule(index, theta, zs, offset):
            wide = theta.dtype if theta.dtype in WIDE else torch.float32  # the rule's arithmetic
            grad = self.engine.scratch(theta, "grad", wide).zero_()
            for coefficient, z in zip(coefficients, zs):
                grad.add_(numerics.f32(theta, z, "n_a"), alpha=coefficient)
            if self.weight_decay and self.engine.decays[index]:
                grad.add_(numerics.f32(theta, theta, "n_a"), alpha=self.weight_decay)
            stored = [s.view(-1)[offset:offset + theta.numel()] for s in self._state(index)]
            per_op = numerics.reference and stored and stored[0].dtype == theta.dtype and theta.dtype not in WIDE
            if per_op:  # ZO-Bench: param.grad = g·z, a tensor in the weights' dtype
                numerics.round_(theta, grad)
            keep = (lambda t: numerics.round_(theta, t)) if per_op else (lambda t: t)
            # the rule's arithmetic in fp32 (torch's kernels compute 16-bit in fp32 too), state stored back in its
            # dtype, saturating at its largest finite value so a 16-bit state never holds inf
            state = [s if s.dtype == wide else self.engine.scratch(theta, f"state{i}", wide).copy_(s)
                     for i, s in enumerate(stored)]
            direction, scale = self.step_block(grad, state, lr, keep)
            for s, s32 in zip(stored, state):
                if s is not s32:
                    limit = torch.finfo(s.dtype).max
                    s.copy_(s32.clamp_(-limit, limit))
            numerics.step_once(theta, direction, scale)

        self.engine.update([seed for seed, _ in pairs], rule, restore=(pairs[-1][0], self.eps) if restore else None)
        self.last_projected_grads = pairs

    def _state(self, index: int) -> list[torch.Tensor]:
        """The parameter's state tensors, in precision.state_dtype: `weights` as ZO-Bench's torch optimizers keep
        them (zeros_like(param)), or `float32`."""
        if index not in self.state:
            param = self.engine.local(index)  # the part held here: with θ sharded (parallel.zo=shard), its shard's
            dtype = self.precision.dtype_of(self.precision.state_dtype) if self.precision.half else param.dtype
            self.state[index] = [torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
                                 for _ in self.state_names]
        return self.state[index]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "zo_state": self.state, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.state = {index: [t.clone() for t in tensors] for index, tensors in state["zo_state"].items()}
        self.updates = state["updates"]
