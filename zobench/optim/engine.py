"""The one perturbation engine every zeroth-order method uses.

A direction z is never stored: z_i for parameter i is regenerated from (step seed, i) with one
torch.Generator per device, so it depends neither on the parameters' order across devices nor on
how a model is sharded. MeZO (Malladi et al. 2023, Algorithm 1; large_models/trainer.py) perturbs
+eps·z, -2eps·z, +eps·z and regenerates z a fourth time for the update; here the restore and the
update are one fused pass, so a step costs 3 regenerations of z instead of 4.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


def decays(name: str) -> bool:
    """MeZO's rule (trainer.py zo_update): no weight decay on biases and layer norms."""
    return not ("bias" in name or "layer_norm" in name or "layernorm" in name)


class PerturbationEngine:
    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], seed: int):
        # named_parameters() yields a tied weight (OPT's embedding = LM head) once: perturbed once.
        self.named = [(name, p) for name, p in named_parameters if p.requires_grad]
        self.decays = [decays(name) for name, _ in self.named]
        self._seeds = np.random.RandomState(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def draw_seed(self) -> int:
        """A fresh direction seed (MeZO: np.random.randint(1000000000) per step)."""
        return int(self._seeds.randint(1_000_000_000))

    def seed_state(self):
        return self._seeds.get_state()

    def set_seed_state(self, state) -> None:
        self._seeds.set_state(state)

    def direction(self, seed: int, index: int, param: torch.Tensor) -> torch.Tensor:
        """z for parameter `index` under `seed`: N(0, 1) in the parameter's dtype, on its device."""
        generator = self._generators.get(param.device)
        if generator is None:
            generator = self._generators[param.device] = torch.Generator(device=param.device)
        generator.manual_seed((seed << 20) + index)
        return torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype)

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """θ ← θ + scale·z(seed)."""
        for index, (_, param) in enumerate(self.named):
            param.add_(self.direction(seed, index, param), alpha=scale)

    @torch.no_grad()
    def apply(self, terms: list[tuple[int, float, float]], lr_times_wd: float = 0.0) -> None:
        """One pass: restore, decay and update, regenerating each term's z once.

        Each term (seed, restore, step) means θ ← θ + restore·z(seed) (undo a perturbation), then
        θ ← θ − step·z(seed) (the update); on parameters that decay, the restored θ is first scaled by
        (1 − lr·wd): θ ← (1 − lr·wd)(θ + Σ restore·z) − Σ step·z, the MeZO update θ − lr(g·z + wd·θ).
        """
        for index, (_, param) in enumerate(self.named):
            keep = 1.0 - lr_times_wd if self.decays[index] else 1.0
            if keep != 1.0:
                param.mul_(keep)
            for seed, restore, step in terms:
                coefficient = keep * restore - step
                if coefficient != 0.0:
                    param.add_(self.direction(seed, index, param), alpha=coefficient)
