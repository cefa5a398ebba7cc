"""MeZO: zeroth-order SGD with the SPSA estimate (Malladi et al. 2023, Algorithm 1 and Eq. 1).

Per direction k (q of them, all evaluated at the same θ):
  g_k = (L(θ + eps·z_k) − L(θ − eps·z_k)) / (2·eps)                       (Eq. 1, projected gradient)
  θ ← θ − lr·((1/q)·Σ_k g_k·z_k + wd·θ)                                   (Algorithm 1; wd as trainer.py)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import Diverged
from .base import ZEROTH_ORDER, Optimizer
from .engine import PerturbationEngine


class MeZO(Optimizer):
    kind = ZEROTH_ORDER

    @dataclass(frozen=True)
    class Settings(Optimizer.Settings):
        eps: float  # the perturbation size
        q: int  # directions per step

    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, settings, seed=seed, total_steps=total_steps, precision=precision)
        self.eps, self.q = settings.eps, settings.q
        self.engine = PerturbationEngine(model.named_parameters(), seed, precision=self.precision)
        self.last_projected_grads: list[tuple[int, float]] = []  # (seed, g) of the last step
        # parallel.zo=directions under torchrun (zobench/parallel/zo.py): the q directions spread over ranks
        self.directions = None

    def _loss(self, batch) -> float:
        with torch.inference_mode():  # MeZO zo_forward: eval mode, no autograd graph
            return float(self.loss_fn(batch))

    def projected_gradients(self, batch) -> tuple[list[tuple[int, float]], float]:
        """q (seed, g) pairs at θ; θ is left perturbed by −eps·z of the last direction. Under torchrun with
        parallel.zo=directions the ranks share the directions out (zobench/parallel/zo.py SpreadDirections)."""
        if self.directions is not None:
            return self.directions.projected_gradients(self, batch)
        return self.pairs_from(*self.direction_losses(batch, range(self.q)))

    def direction_losses(self, batch, evaluated) -> tuple[list[int], list[float | None]]:
        """The step's q seeds and [loss+, loss−] of each, of those directions k in `evaluated` (the others
        None): every direction's perturbations are made in place, in order, evaluated or not, so θ moves
        through the same values (and roundings) on every rank."""
        seeds, values = [], []
        for k in range(self.q):
            seed = self.engine.draw_seed()
            seeds.append(seed)
            self.engine.perturb(seed, self.eps)
            loss_plus = self._loss(batch) if k in evaluated else None
            self.engine.perturb(seed, -2 * self.eps)
            loss_minus = self._loss(batch) if k in evaluated else None
            if self.directions is None and not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
                self.engine.perturb(seed, self.eps)
                raise Diverged(f"loss is {loss_plus if not math.isfinite(loss_plus) else loss_minus}")
            if k < self.q - 1:  # every direction is evaluated at the same θ
                self.engine.perturb(seed, self.eps)
            values += [loss_plus, loss_minus]
        return seeds, values

    def pairs_from(self, seeds: list[int], values: list[float]) -> tuple[list[tuple[int, float]], float]:
        """(seed, g) per direction from its [loss+, loss−], and the step's mean loss; a loss that is not finite
        (seen first here under torchrun, once every rank has it) restores θ and ends the run as diverged."""
        pairs, losses = [], []
        for seed, loss_plus, loss_minus in zip(seeds, values[0::2], values[1::2]):
            if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
                self.restore([(seeds[-1], 0.0)])
                raise Diverged(f"loss is {loss_plus if not math.isfinite(loss_plus) else loss_minus}")
            pairs.append((seed, self.engine.numerics.projected_gradient(loss_plus, loss_minus, self.eps)))
            losses.append((loss_plus + loss_minus) / 2)
        return pairs, sum(losses) / len(losses)

    def restore(self, pairs: list[tuple[int, float]]) -> None:
        """Back to θ after projected_gradients (Addax's first-order half needs θ between the two)."""
        self.engine.perturb(pairs[-1][0], self.eps)

    def update(self, pairs: list[tuple[int, float]], lr: float, lr_times_wd: float, restore: bool) -> None:
        """θ ← θ − lr·(1/q)·Σ scale(g_k)·z_k, decayed by (1 − lr_times_wd); `restore` fuses the restore in."""
        self.engine.apply(self._terms(pairs, restore), lr, lr_times_wd)
        self.last_projected_grads = pairs

    def _terms(self, pairs, restore: bool) -> list[tuple[int, float, float]]:
        """The engine's (seed, restore, c) terms: the last direction's restore, c = scale(g_k)/q."""
        last_seed = pairs[-1][0]
        return [(seed, self.eps if restore and seed == last_seed else 0.0, self.step_scale(g) / self.q)
                for seed, g in pairs]

    def step_scale(self, g: float) -> float:
        """What multiplies z in the update: g itself (ZO-SGD-Sign uses its sign)."""
        return g

    def _step(self, batch) -> float:
        self.model.eval()
        pairs, loss = self.projected_gradients(batch)
        lr = self.lr
        self.update(pairs, lr, lr * self.weight_decay, restore=True)
        return loss
