"""IP-SGD: in-place SGD, the memory-lean first-order baseline of Addax (Li et al., ICLR 2025, §2).

Each parameter is updated the moment its gradient is complete during backward, θ ← θ − lr·(g + wd·θ)
(torch.optim.SGD's arithmetic, momentum 0), and its gradient is freed at once: no full set of gradients
is ever held, only the activations of the batch. The hook is torch's post-accumulate-grad hook; a tied
weight (OPT's embedding = LM head, one Parameter used twice) gets it once, after both uses have
accumulated into its gradient, so it is updated with its full gradient. Every module that reads a
parameter runs its backward before that parameter's gradient is complete, so an update never changes
a value that backward still needs.
"""

from __future__ import annotations

import math

import torch

from ..errors import Diverged
from ..models import trained_parameters
from .base import Optimizer
from .engine import decays


def in_place_sgd_step(model, loss_fn, batch, lr: float, weight_decay: float = 0.0) -> float:
    """One forward and backward on `batch`, each gradient applied and freed as soon as it is complete."""
    model.train()
    named = list(trained_parameters(model).items())

    def hook_for(wd: float):
        @torch.no_grad()
        def apply(param: torch.Tensor) -> None:
            grad = param.grad
            if wd != 0.0:
                grad.add_(param, alpha=wd)  # torch.optim.SGD: d_p = g + wd·θ
            param.add_(grad, alpha=-lr)
            param.grad = None
        return apply

    for _, param in named:
        param.grad = None  # the hook must see this step's gradient alone
    handles = [p.register_post_accumulate_grad_hook(hook_for(weight_decay if decays(name) else 0.0))
               for name, p in named]
    try:
        loss = loss_fn(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise Diverged(f"loss is {value}")
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return value


class InPlaceSGD(Optimizer):
    def __init__(self, model, loss_fn, cfg, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, cfg, seed=seed, total_steps=total_steps, precision=precision)
        self.weight_decay = float(cfg.get("weight_decay", 0.0))

    def _step(self, batch) -> float:
        return in_place_sgd_step(self.model, self.loss_fn, batch, self.lr, self.weight_decay)
