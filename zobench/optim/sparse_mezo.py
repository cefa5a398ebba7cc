"""Sparse MeZO (Liu et al., arXiv 2402.15751, §3, Algorithm 1 "S-MeZO" with GetMask): MeZO on small weights.

  ẑ = m ⊙ z,  m_ij = 1 where |θ_ij| ≤ h_i                      (GetMask, per layer i)
  g = [L(θ + ε·ẑ; B) − L(θ − ε·ẑ; B)] / (2ε),   θ ← θ − η·g·ẑ   (the gradient estimate g_ẑ and its update)

- Which tensors: every weight matrix (each tensor of 2 or more dimensions: linear layers, embeddings) gets
  a mask; 1-D tensors (biases, layer norms, under 0.1% of the weights) are perturbed densely, as MeZO.
  The paper perturbs the layers' weights, y = (θ + ε·m⊙z)·x + b, and does not say more.
- h_i: set once before training, the `sparsity` quantile of |θ_i| (0.8 ⇒ the smallest 20% are trained,
  the paper's best); m is recomputed every step from the current, unperturbed θ (the paper's dynamic
  mask). GetMask's pseudocode compares θ ≤ h; the text means magnitude, so |θ| ≤ h here.
- Memory as the paper's S-MeZO-EI: θ is never perturbed in place; each module builds its perturbed
  weights in its own forward and frees them (engine.perturbed_in_forward), masks exist one block of
  2^20 weights at a time. So m is the same for +ε, −ε and the update. The −ε copy and the update replay
  MeZO's in-place chain (θ + ε·z, then − 2ε·z, then the restore), rounded as MeZO's (engine numerics), so
  sparsity 0 is MeZO bit for bit in every dtype and precision.zo_update mode.
- Weight decay (not in the paper; 0 by default) shrinks only the trained, masked-in weights.
- A matrix whose threshold is 0 (at least 1 − sparsity of it exactly zero: LoRA's zero-initialised B)
  has no magnitudes to choose by: masked by |θ| ≤ 0 it would freeze after its first update, so it is
  perturbed densely (the paper fine-tunes full weights and does not meet this case).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import Diverged
from ..parallel.zo_shard import whole
from . import engine as engine_module
from .engine import PerturbationEngine
from .mezo import MeZO


class SparseMeZO(MeZO):
    @dataclass(frozen=True)
    class Settings(MeZO.Settings):
        sparsity: float  # the fraction of each weight matrix left frozen (the largest magnitudes)

    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, settings, seed=seed, total_steps=total_steps, precision=precision)
        sparsity = settings.sparsity
        self.engine = PerturbationEngine(model.named_parameters(), seed, mask=self.mask, precision=self.precision)
        # a sharded parameter's quantile is its whole tensor's: gathered here once, one parameter at a time
        thresholds = {index: magnitude_threshold(whole(param), 1.0 - sparsity)
                      for index, (_, param) in enumerate(self.engine.named) if sparsity > 0 and param.dim() >= 2}
        self.thresholds = {index: h for index, h in thresholds.items() if h > 0}

    def mask(self, index: int, theta: torch.Tensor) -> torch.Tensor | None:
        """Where a block of parameter `index` may move: 1 where |θ| ≤ h, else 0, in θ's dtype (a float
        mask multiplies several times faster than a bool one on CPU); None: everywhere."""
        threshold = self.thresholds.get(index)
        if threshold is None:
            return None
        return torch.abs(theta, out=self.engine.scratch(theta, "mask")).le_(threshold)

    def direction_losses(self, batch, evaluated) -> tuple[list[int], list[float | None]]:
        """The step's q seeds and [loss+, loss−] of the directions k in `evaluated` (others None); θ itself is
        never moved."""
        seeds, values = [], []
        for k in range(self.q):
            seed = self.engine.draw_seed()
            seeds.append(seed)
            if k not in evaluated:
                values += [None, None]
                continue
            # θ + eps·z, then (θ + eps·z) − 2eps·z: MeZO's in-place chain, rounded as MeZO's (sparsity 0 ≡ MeZO)
            loss_plus = self._loss_at(batch, seed, self.eps)
            loss_minus = self._loss_at(batch, seed, self.eps, -2 * self.eps)
            if self.directions is None and not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
                raise Diverged(f"loss is {loss_plus if not math.isfinite(loss_plus) else loss_minus}")
            values += [loss_plus, loss_minus]
        return seeds, values

    def _loss_at(self, batch, seed: int, *scales: float) -> float:
        with self.engine.perturbed_in_forward(self.model, seed, *scales):
            return self._loss(batch)

    def restore(self, pairs) -> None:
        """Nothing to undo: the perturbation only ever existed inside the forward passes."""

    def update(self, pairs, lr: float, lr_times_wd: float, restore: bool) -> None:
        """MeZO's update on the masked z; with `restore`, θ first replays the perturbations MeZO would have
        left on it (+eps, −2eps, rounded as MeZO's), so that sparsity 0 is MeZO bit for bit in every dtype."""
        replay = (self.eps, -2 * self.eps) if restore else ()
        self.engine.apply(self._terms(pairs, restore), lr, lr_times_wd, replay=replay)
        self.last_projected_grads = pairs


@torch.no_grad()
def magnitude_threshold(param: torch.Tensor, fraction: float) -> float:
    """The k-th smallest |θ|, k = ⌈fraction·n⌉, exactly, in blocks (never a sorted copy of a layer).

    A strided sample of 2^16 magnitudes brackets it; one pass counts the magnitudes below the bracket
    and gathers those inside it (a few percent), and the k-th is picked among them. A bracket that
    missed (rare) is widened and the pass repeated.
    """
    flat = param.detach().reshape(-1)
    n, block = flat.numel(), engine_module.BLOCK
    k = max(1, math.ceil(fraction * n))
    sample = flat[:: max(1, n // 2**16)].abs().float()
    margin = 0.01
    while True:
        low = float(torch.quantile(sample, max(0.0, k / n - margin))) if margin < 1 else 0.0
        high = float(torch.quantile(sample, min(1.0, k / n + margin))) if margin < 1 else math.inf
        below, inside = 0, []
        for start in range(0, n, block):
            magnitudes = flat[start:start + block].abs()
            below += int((magnitudes < low).sum())
            inside.append(magnitudes[(magnitudes >= low) & (magnitudes <= high)])
        inside = torch.cat(inside)
        if below < k <= below + inside.numel():
            return float(inside.kthvalue(k - below).values)
        margin *= 4
