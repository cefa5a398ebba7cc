"""First-order baselines through torch.optim (SGD, Adam, AdamW): backward, step, free the gradients.

Weight decay skips biases and layer norms, as HF Trainer (the papers' FT baselines) does.
"""

from __future__ import annotations

import math

import torch

from ..errors import Diverged, ZobenchError
from ..models import trained_parameters
from .base import Optimizer
from .engine import decays

TORCH_OPTIMIZERS = ("SGD", "Adam", "AdamW")


class TorchOptimizer(Optimizer):
    def __init__(self, model, loss_fn, cfg, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, cfg, seed=seed, total_steps=total_steps, precision=precision)
        name = str(cfg.torch_class)
        if name not in TORCH_OPTIMIZERS:
            raise ZobenchError(f"optimizer.torch_class must be one of {', '.join(TORCH_OPTIMIZERS)}, got {name}")
        wd = float(cfg.get("weight_decay", 0.0))
        named = list(trained_parameters(model).items())
        groups = [{"params": [p for n, p in named if decays(n)], "weight_decay": wd},
                  {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
        extra = dict(cfg.get("kwargs") or {})
        if "betas" in extra:
            extra["betas"] = tuple(extra["betas"])
        self.optimizer = getattr(torch.optim, name)(groups, lr=self.base_lr, **extra)

    def _step(self, batch) -> float:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        loss = self.loss_fn(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise Diverged(f"loss is {value}")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value
