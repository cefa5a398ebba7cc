"""Optimizers. Each conf/optimizer/<name>.yaml names its class in `_target_`."""

from __future__ import annotations

from hydra.utils import get_class

from ..errors import ZobenchError
from ..precision import Precision
from .base import Optimizer


def build_optimizer(cfg, model, loss_fn, *, seed: int, total_steps: int, precision: Precision | None = None) -> Optimizer:
    try:
        cls = get_class(cfg._target_)
    except Exception as error:
        raise ZobenchError(f"optimizer '{cfg.get('name')}': cannot import {cfg.get('_target_')} ({error})") from error
    optimizer = cls(model, loss_fn, cfg, seed=seed, total_steps=total_steps, precision=precision)
    return optimizer
