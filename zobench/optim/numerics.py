"""How a zeroth-order step rounds (`precision.zo_update`), block by block; the engine and the rules call it.

Two modes, both computing every op in fp32 and rounding its result to θ's dtype, as CUDA's elementwise
kernels do for 16-bit tensors (their "opmath" is fp32). CPU kernels differ (`add_(z, alpha=c)` rounds c to
θ's dtype first: in bf16, eps − lr·g in steps of ~7.6e-6), so neither mode leaves rounding to them.

- `reference`: MeZO's large_models/trainer.py, op by op, each result rounded to θ's dtype:
    perturb / restore  θ ← r(θ + r(z·s))                 (zo_perturb_parameters ~711: param.data + scaling_factor*z*eps;
                                                           r(r(f·z)·eps) = r(z·(f·eps)) for f = ±1, ±2)
    update             θ ← r(θ − r(lr·r(r(g·z) + r(wd·θ))))  (zo_update ~800: param.data - lr*(g*z + wd*param.data))
    g                  r((r(L+ − L−)) / (2·eps)) in the loss's dtype (zo_step ~780, then .item())
  At lr·g = 1e-6 on fp16 weights ~N(0, 0.02²) about a quarter of the step survives (issue 13).
- `fused` (zobench): the restore folded into the update and the whole step rounded once,
    θ ← r((1 − lr·wd)·(θ + eps·z) − lr·g·z), the coefficients at full precision; a perturbation θ ← r(θ + s·z).
  fp32 weights take torch's ops directly (nothing to round).
"""

from __future__ import annotations

import torch

from ..precision import Precision

F32 = torch.float32
WIDE = (torch.float32, torch.float64)  # dtypes whose own ops need no rounding care (fp64: benchmarks' exact runs)


class Numerics:
    """The arithmetic of one `zo_update` mode; `scratch(theta, slot, dtype)` gives block-sized buffers."""

    def __init__(self, precision: Precision | None, scratch):
        self.reference = precision is not None and precision.zo_update == "reference"
        self.loss_dtype = precision.dtype_of(precision.loss_dtype) if precision is not None else F32
        self.scratch = scratch

    # -- helpers -----------------------------------------------------------------------------------
    def _f32(self, theta: torch.Tensor, source: torch.Tensor, slot: str) -> torch.Tensor:
        """A fp32 scratch copy of `source` (a block the size of θ's)."""
        return self.scratch(theta, slot, F32).copy_(source)

    def f32(self, theta: torch.Tensor, source: torch.Tensor, slot: str) -> torch.Tensor:
        """`source` as fp32: itself if it is, else a scratch copy (read-only use)."""
        return source if source.dtype in WIDE else self._f32(theta, source, slot)

    def round_(self, theta: torch.Tensor, t32: torch.Tensor) -> torch.Tensor:
        """t32 ← its value rounded to θ's dtype (round to nearest even, overflow to ±inf as a kernel does)."""
        if theta.dtype not in WIDE:
            t32.copy_(self.scratch(theta, "round", theta.dtype).copy_(t32))
        return t32

    def _store(self, theta: torch.Tensor, acc32: torch.Tensor) -> None:
        if acc32 is not theta:
            theta.copy_(acc32)  # the one rounding to θ's dtype

    # -- the ops -----------------------------------------------------------------------------------
    def shift(self, theta: torch.Tensor, z: torch.Tensor, scale: float) -> None:
        """θ ← θ + scale·z: a MeZO perturbation or its restore."""
        if self.reference:
            step = self.round_(theta, self._f32(theta, z, "n_a").mul_(scale))
            if theta.dtype in WIDE:
                theta.add_(step)
            else:
                self._store(theta, self._f32(theta, theta, "n_b").add_(step))
        elif theta.dtype in WIDE:
            theta.add_(z, alpha=scale)
        else:
            self._store(theta, self._f32(theta, theta, "n_b").add_(self._f32(theta, z, "n_a"), alpha=scale))

    def descend(self, theta: torch.Tensor, direction32: torch.Tensor, lr: float, lr_times_wd: float,
                mask: torch.Tensor | None = None) -> None:
        """θ ← θ − lr·(d + wd·θ), d a fp32 block (g·z, or an adaptive rule's step); the decay only where
        `mask` (0/1) is 1. Reference: each op rounded as trainer.py's zo_update; fused: one rounding."""
        if self.reference:
            if lr == 0.0:
                return
            d = self.round_(theta, self._f32(theta, direction32, "n_d"))  # g*z in θ's dtype
            if lr_times_wd:
                decay = self.round_(theta, self._f32(theta, theta, "n_b").mul_(lr_times_wd / lr))
                if mask is not None:
                    decay.mul_(mask)
                self.round_(theta, d.add_(decay))
            self.round_(theta, d.mul_(lr))
            if theta.dtype in WIDE:
                theta.sub_(d)
            else:
                self._store(theta, self._f32(theta, theta, "n_b").sub_(d))
            return
        acc = theta if theta.dtype in WIDE else self._f32(theta, theta, "n_b")
        self._decay(acc, lr_times_wd, mask)
        acc.add_(direction32, alpha=-lr)
        self._store(theta, acc)

    def step_once(self, theta: torch.Tensor, direction32: torch.Tensor, scale: float) -> None:
        """θ ← r(θ − scale·d) in either mode: a torch optimizer's last operation (Adam's addcdiv_, SGD's add_),
        which ZO-Bench's stateful baselines end with (zo-bench/trainer.py zo_step: optimizer.step())."""
        acc = theta if theta.dtype in WIDE else self._f32(theta, theta, "n_b")
        acc.add_(direction32, alpha=-scale)
        self._store(theta, acc)

    def _decay(self, acc: torch.Tensor, lr_times_wd: float, mask: torch.Tensor | None) -> None:
        if not lr_times_wd:
            return
        if mask is None:
            acc.mul_(1.0 - lr_times_wd)
        else:
            acc.addcmul_(acc, mask, value=-lr_times_wd)

    def restore_and_descend(self, theta, terms, lr: float, lr_times_wd: float, mask=None, replay=()) -> None:
        """terms: ((restore, c), z) pairs. θ ← θ + Σ restore·z (undo the perturbations), then
        θ ← θ − lr·(Σ c·z + wd·θ). `replay`: scales by which θ is first shifted along the first term's z
        (a method that never moved θ in place replays MeZO's perturbations, so it rounds as MeZO does)."""
        if self.reference:
            direction = None
            for i, ((restore, c), z) in enumerate(terms):
                for scale in replay if i == 0 else ():
                    self.shift(theta, z, scale)
                if restore:
                    self.shift(theta, z, restore)
                if direction is None:
                    direction = self._f32(theta, z, "n_dir").mul_(c)
                elif c:
                    direction.add_(self._f32(theta, z, "n_a"), alpha=c)
            if direction is not None:
                self.descend(theta, direction, lr, lr_times_wd, mask)
            return
        acc = None
        for i, ((restore, c), z) in enumerate(terms):
            if i == 0:
                for scale in replay:
                    self.shift(theta, z, scale)
                acc = theta if theta.dtype in WIDE else self._f32(theta, theta, "n_b")
                self._decay(acc, lr_times_wd, mask)
            coefficient = (1.0 - lr_times_wd) * restore - lr * c
            if coefficient != 0.0:
                acc.add_(z if theta.dtype in WIDE else self._f32(theta, z, "n_a"), alpha=coefficient)
        if acc is not None:
            self._store(theta, acc)

    def projected_gradient(self, loss_plus: float, loss_minus: float, eps: float) -> float:
        """(L+ − L−)/(2·eps): in double (fused), or as MeZO's zo_step computes it on its loss tensors."""
        if not self.reference:
            return (loss_plus - loss_minus) / (2 * eps)
        difference = torch.tensor(loss_plus, dtype=F32) - torch.tensor(loss_minus, dtype=F32)
        difference = difference.to(self.loss_dtype).float()
        return float((difference / (2 * eps)).to(self.loss_dtype))
