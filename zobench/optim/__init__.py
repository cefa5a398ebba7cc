"""Optimizers. Each conf/optimizer/<name>.yaml names its class in `_target_`, one of REGISTERED.

A config is data (a received run folder's config.yaml and overrides.yaml included): it may choose among
zobench's own classes, never import one of its choosing (`builtins.open`, `os.system`). So `_target_` is
looked up in this fixed list, never handed to an importer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ZobenchError

if TYPE_CHECKING:  # torch stays unimported until an optimizer is built: the CLI checks targets at start-up
    from ..precision import Precision
    from .base import Optimizer

REGISTERED = frozenset({
    "zobench.optim.mezo.MeZO",
    "zobench.optim.sparse_mezo.SparseMeZO",
    "zobench.optim.adamezo.AdaMeZO",
    "zobench.optim.addax.Addax",
    "zobench.optim.ip_sgd.InPlaceSGD",
    "zobench.optim.first_order.TorchOptimizer",
    "zobench.optim.zero_shot.ZeroShot",
    "zobench.optim.zo_adam.ZOAdam",
    "zobench.optim.zo_sgd_momentum.ZOSGDMomentum",
    "zobench.optim.zo_sgd_sign.ZOSGDSign",
    "zobench.optim.zo_sign_adamw.ZOSignAdamW",
    "zobench.optim.head_tuning.HeadTuning",
    "zobench.optim.linear_probe.LinearProbe",
})


# Classes that moved: a run folder written before names them by their old path (its resume and replay)
MOVED = {"zobench.head_tuning.HeadTuning": "zobench.optim.head_tuning.HeadTuning",
         "zobench.linear_probe.LinearProbe": "zobench.optim.linear_probe.LinearProbe"}


def check_target(target) -> str:
    """`target` if it is one of zobench's optimizer classes; else one line naming the key and the fix."""
    target = MOVED.get(target, target) if isinstance(target, str) else target
    if not isinstance(target, str) or target not in REGISTERED:
        raise ZobenchError(f"optimizer._target_={target!r} is not one of zobench's optimizer classes: zobench "
                           f"builds only its own ({', '.join(sorted(REGISTERED))}); choose one with optimizer=NAME")
    return target


def optimizer_class(target) -> type:
    """The registered class named by `target` (only zobench's own modules are ever imported here)."""
    module, name = check_target(target).rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def build_optimizer(method, model, loss_fn, *, seed: int, total_steps: int, precision: Precision | None = None) -> Optimizer:
    """The method over `model`: `method` is a MethodSpec (settings.py), or an optimizer config node, read
    (and checked) into one first."""
    from .settings import MethodSpec, read_method

    if not isinstance(method, MethodSpec):
        method = read_method(method)
    return method.cls(model, loss_fn, method.settings, seed=seed, total_steps=total_steps, precision=precision)
