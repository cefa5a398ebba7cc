"""Config checks at start-up, before anything is loaded: each bad value gets one clear line.

Optimizer hyperparameters are checked by name wherever an optimizer config has them, so a new
optimizer's `eps` or `alpha` is covered without a line here.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig

from .errors import ZobenchError
from .precision import from_config as precision_from_config

# key in the optimizer config -> (is the value acceptable?, what is acceptable)
OPTIMIZER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v >= 0, ">= 0"),
    "eps": (lambda v: v > 0, "> 0"),
    "q": (lambda v: v >= 1, ">= 1"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "sparsity": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "k0": (lambda v: v >= 1, ">= 1"),
    "k1": (lambda v: v >= 1, ">= 1"),
    "l_t": (lambda v: v >= 1, ">= 1"),
    "h": (lambda v: v >= 1, ">= 1"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
}

# Keys that count something: a whole number (1e3 is fine, 3.7 is refused rather than truncated to 3 while
# config.yaml keeps 3.7; "abc" is refused by name rather than by a bare int() ValueError later).
INTEGER_KEYS = ("train.steps", "train.epochs", "train.batch_size", "train.log_interval", "train.eval_interval", "eval.batch_size",
                "checkpoint.every", "data.n_train", "data.n_dev", "data.n_test", "max_length", "seed", "data.seed",
                "icl.k", "optimizer.q", "optimizer.k0", "optimizer.k1", "optimizer.l_t", "optimizer.h")
# numpy's RandomState (MeZO's sampling) and torch.manual_seed both take seeds in [0, 2**32)
SEED_KEYS = {"seed": "the optimizer seed: ZO directions and batch order",
             "data.seed": "the data sampling seed: which rows are train, dev and test"}

RUN_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "train.steps": (lambda v: v >= 1, ">= 1"),
    "train.epochs": (lambda v: v >= 1, ">= 1, or null to train train.steps steps"),
    "train.batch_size": (lambda v: v >= 1, ">= 1"),
    "train.log_interval": (lambda v: v >= 1, ">= 1"),
    "train.eval_interval": (lambda v: v >= 0, ">= 0 (0: evaluate at the end only)"),
    "train.select_by": (lambda v: v in ("loss", "metric"), "loss or metric"),
    "train.keep_best": (lambda v: v in ("disk", "host", "none"), "disk, host or none"),
    "eval.batch_size": (lambda v: v >= 1, ">= 1"),
    "checkpoint.every": (lambda v: v >= 1, ">= 1"),
    "eval.score": (lambda v: v in ("mean", "sum"), "mean or sum"),
    "data.n_train": (lambda v: v >= 1, ">= 1"),
    "data.n_dev": (lambda v: v >= 0, ">= 0"),
    "data.n_test": (lambda v: v >= 0, ">= 0"),
    "max_length": (lambda v: v >= 8, ">= 8"),
}


def _lookup(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def _whole_number(key: str, value: Any) -> int:
    """The value as an int, or one line naming the key (1e3 is 1000.0 to Hydra: accepted, int() is exact)."""
    if isinstance(value, bool):
        raise ZobenchError(f"{key} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():  # e.g. from ${oc.env:STEPS}
        return int(value)
    raise ZobenchError(f"{key} must be a whole number, got {value!r}")


def _check(name: str, value: Any, rule: Callable[[Any], bool], wanted: str) -> None:
    try:
        ok = rule(value)
    except TypeError:
        ok = False
    if not ok:
        raise ZobenchError(f"{name} must be {wanted}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    for key in INTEGER_KEYS:
        value = _lookup(cfg, key)
        if value is not None:
            _whole_number(key, value)
    for key, meaning in SEED_KEYS.items():
        value = _lookup(cfg, key)
        if value is not None and not 0 <= value < 2**32:
            raise ZobenchError(f"{key} must be in [0, 2**32 - 1] ({meaning}), got {value}")
    for key, (rule, wanted) in RUN_RULES.items():
        value = _lookup(cfg, key)
        if value is not None:
            _check(key, value, rule, wanted)
    for key, (rule, wanted) in OPTIMIZER_RULES.items():
        value = cfg.optimizer.get(key)
        if value is not None:
            _check(f"optimizer.{key}", value, rule, wanted)
    dtype = _check_device_dtype(str(cfg.device), str(cfg.dtype))
    precision_from_config(cfg.get("precision"), dtype)  # each precision key against its choices


def _check_device_dtype(device_name: str, dtype_name: str) -> torch.dtype:
    from .models import resolve_device, resolve_dtype

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)  # refuses unknown names
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ZobenchError(f"dtype={dtype_name}: {torch.cuda.get_device_name(device)} cannot run bfloat16; "
                           f"use float16")
    return dtype
