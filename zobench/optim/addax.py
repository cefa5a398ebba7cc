"""Addax (Li et al., ICLR 2025, arXiv 2410.06441, Algorithm 1 and Eq. (3)): zeroth- and in-place first-order.

The training set is split once by tokenized length at L_T (Algorithm 1, lines 2-5): D1 = examples of
length ≤ L_T (first-order), D0 = the longer ones (zeroth-order). Each step draws K0 examples B0 from D0
and K1 examples B1 from D1 and updates
  g0 = [L(θ + εz; B0) − L(θ − εz; B0)] / (2ε),   g1 = ∇L(θ; B1)
  θ ← θ − η·(α·g0·z + (1 − α)·g1)                                                       (Eq. 3, our reading)
The paper's text could not be read: this form is the issue's and two third-party summaries'; the
official README confirms only that the update is "Equation (3)", built on MeZO's code. Both halves are
taken at the same θ_t: the ZO half evaluates its two losses and restores θ, the FO half runs IP-SGD on
B1 with step (1 − α)·η (applied in place during backward), then the ZO update regenerates z once more.
So the ZO half stays at inference memory and the FO half holds only B1's activations.
The ZO half is any of zobench's ZO methods (`zo`: mezo, sparse_mezo or adamezo, with their own
conf/optimizer/<zo>.yaml defaults and `zo_options` on top): a combination no paper's code offers.
α = 0 is IP-SGD on B1 (no ZO passes), α = 1 the ZO method on B0 (no backward).
The FO half is IP-SGD's step (ip_sgd.InPlaceSGDStep) with its 16-bit numerics: per-parameter fp32 update
arithmetic and, in fp16, LOMO's loss scaling (an overflowing FO half is skipped; the ZO half still applies).
Under torchrun (every parallel.zo mode) the ZO half runs as a ZO method does and the FO half as
zobench/parallel/in_place.py says.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
from omegaconf import OmegaConf

from ..errors import ZobenchError
from ..paths import conf_dir
from .base import Optimizer
from .ip_sgd import InPlaceSGDStep

log = logging.getLogger(__name__)
ZO_METHODS = ("mezo", "sparse_mezo", "adamezo")


class Addax(Optimizer):
    @dataclass(frozen=True)
    class Settings(Optimizer.Settings):
        eps: float  # the ZO half's perturbation (MeZO's)
        alpha: float  # weight of the ZO estimate
        k0: int  # long examples per step, zeroth-order
        k1: int  # short examples per step, first-order
        l_t: int | None  # length threshold in tokens; None: the median training length
        zo: str  # the ZO half: one of ZO_METHODS
        zo_options: Mapping  # overrides of the ZO half's settings

    @classmethod
    def check_settings(cls, settings, prefix: str) -> None:
        super().check_settings(settings, prefix)
        zo_half(settings, prefix)  # the ZO half's settings, checked as its own optimizer's

    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, settings, seed=seed, total_steps=total_steps, precision=precision)
        self.alpha, self.k0, self.k1, self.l_t = settings.alpha, settings.k0, settings.k1, settings.l_t
        from . import build_optimizer  # the package's builder; imported here to avoid a cycle

        self.zo = build_optimizer(zo_half(settings), model, loss_fn, seed=seed, total_steps=total_steps,
                                  precision=precision)
        self.fo = InPlaceSGDStep(model, self.precision)  # the FO half: IP-SGD's numerics and loss scaler
        # under torchrun, the FO half's own loss: the whole B1's from this rank's slice (parallel/in_place.py)
        self.fo_loss_fn = None

    # -- data: the split by length and the pair of batches per step --------------------------------
    def split(self, lengths: list[int]) -> tuple[list[int], list[int], int]:
        """(D0: indices longer than L_T, D1: the others, L_T); l_t null means the median length."""
        threshold = self.l_t if self.l_t is not None else int(statistics.median_low(lengths))
        long = [i for i, n in enumerate(lengths) if n > threshold]
        short = [i for i, n in enumerate(lengths) if n <= threshold]
        if not long or not short:
            empty = "D0 (longer than l_t, zeroth-order)" if not long else "D1 (at most l_t, first-order)"
            raise ZobenchError(
                f"addax: optimizer.l_t={threshold} leaves {empty} empty: the {len(lengths)} training examples "
                f"are {min(lengths)} to {max(lengths)} tokens long; choose l_t from {min(lengths)} to "
                f"{max(lengths) - 1}, or use optimizer=ip_sgd / a ZO optimizer alone")
        return long, short, threshold

    def batches(self, lengths: list[int], batch_size: int, seed: int) -> Iterator[tuple[list[int], list[int]]]:
        """Endless (K0 indices from D0, K1 indices from D1); train.batch_size is not used (k0 + k1 is)."""
        long, short, threshold = self.split(lengths)
        log.info("addax: l_t=%d splits %d examples into %d long (zeroth-order, k0=%d a step) and %d short "
                 "(first-order, k1=%d a step)", threshold, len(lengths), len(long), self.k0, len(short), self.k1)
        rng = np.random.RandomState(seed)
        longs, shorts = _shuffled_forever(long, rng), _shuffled_forever(short, rng)
        while True:
            yield [next(longs) for _ in range(self.k0)], [next(shorts) for _ in range(self.k1)]

    # -- the step -------------------------------------------------------------------------------
    def _step(self, batch) -> float:
        if not (isinstance(batch, tuple) and len(batch) == 2):
            raise ZobenchError("addax steps on a pair of batches (long B0 for the zeroth-order half, short B1 "
                               "for the first-order half), as Addax.batches yields them")
        long_batch, short_batch = batch
        lr, alpha = self.lr, self.alpha
        fo_loss_fn = self.loss_fn if self.fo_loss_fn is None else self.fo_loss_fn
        if alpha == 0.0:
            return self.fo(fo_loss_fn, short_batch, lr, self.weight_decay)
        self.model.eval()  # the ZO half as MeZO: no dropout
        pairs, zo_loss = self.zo.projected_gradients(long_batch)
        if alpha == 1.0:
            self.zo.update(pairs, lr, lr * self.weight_decay, restore=True)
            return zo_loss
        self.zo.restore(pairs)  # g1 is taken at θ_t, as g0
        fo_loss = self.fo(fo_loss_fn, short_batch, (1.0 - alpha) * lr)
        self.zo.update(pairs, alpha * lr, lr * self.weight_decay, restore=False)
        return (self.k0 * zo_loss + self.k1 * fo_loss) / (self.k0 + self.k1)


    def state_dict(self) -> dict:
        """Addax takes real gradients, so it resumes from saved weights; its ZO half's state comes along."""
        return {**super().state_dict(), "zo": self.zo.state_dict(), **self.fo.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.zo.load_state_dict(state["zo"])
        self.fo.load_state_dict(state)


def zo_half(settings, prefix: str = "optimizer"):
    """The ZO half's method (optim/settings.MethodSpec): conf/optimizer/<zo>.yaml, Addax's lr and eps, then
    `zo_options`, read and checked as that optimizer's own settings."""
    from .settings import read_method

    if settings.zo not in ZO_METHODS:
        raise ZobenchError(f"{prefix}.zo {settings.zo!r:.60} is not a ZO method addax can use; valid: "
                           f"{', '.join(ZO_METHODS)}")
    base = OmegaConf.to_container(OmegaConf.load(conf_dir() / "optimizer" / f"{settings.zo}.yaml"))
    own = {"lr": settings.lr, "eps": settings.eps, "weight_decay": 0.0, "schedule": "constant"}  # Addax applies both
    options = dict(settings.zo_options)
    if "_target_" in options or "name" in options:
        raise ZobenchError(f"{prefix}.zo_options sets the ZO half's settings; its method is {prefix}.zo")
    return read_method({**base, **own, **options}, f"{prefix}.zo_options")


def _shuffled_forever(indices: list[int], rng: np.random.RandomState) -> Iterator[int]:
    """The indices, reshuffled at every pass (each subset is its own epoch of HF's random sampler)."""
    while True:
        yield from (indices[i] for i in rng.permutation(len(indices)))
