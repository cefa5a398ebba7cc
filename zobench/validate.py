"""Config checks at start-up, before any data or model is read: each bad value gets one line naming its key.

Every key of conf/config.yaml and conf/*/*.yaml that the code reads as a number, a flag or a choice is
checked here, so a wrong type or range exits 2 before a run starts instead of failing (exit 1) after the data
load. Optimizer hyperparameters are checked by name wherever an optimizer config has them (also inside
Addax's `zo_options` and a torch optimizer's `kwargs`), so a new optimizer's `eps` or `alpha` is covered
without a line here. The task's templates are compiled and tried on placeholder values (a template over its
rendering budget whatever the data holds is refused here), and max_length is checked against the model's
positions where its config is known without loading anything (an `arch`, a local model.path).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import ZobenchError
from .parallel.first_order import FirstOrderParallel
from .precision import from_config as precision_from_config

Rule = tuple[Callable[[Any], bool], str]

# key in an optimizer config (also in optimizer.zo_options and optimizer.kwargs) -> rule; each is a number
OPTIMIZER_RULES: dict[str, Rule] = {
    "lr": (lambda v: v >= 0, ">= 0"),
    "eps": (lambda v: v > 0, "> 0"),
    "q": (lambda v: v >= 1, ">= 1"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "sparsity": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "k0": (lambda v: v >= 1, ">= 1"),
    "k1": (lambda v: v >= 1, ">= 1"),
    "l_t": (lambda v: v >= 1, ">= 1"),
    "horizon": (lambda v: v >= 0, ">= 0 (< 2: plain MeZO)"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "scale": (lambda v: v > 0, "> 0"),
    "delta": (lambda v: v > 0, "> 0"),
    "adam_eps": (lambda v: v > 0, "> 0"),
    "dampening": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "cv": (lambda v: v >= 2, ">= 2"),
    "max_iter": (lambda v: v >= 1, ">= 1"),
    "tol": (lambda v: v > 0, "> 0"),
}
OPTIMIZER_WHOLE_NUMBERS = ("q", "k0", "k1", "l_t", "horizon", "cv", "max_iter")
OPTIMIZER_FLAGS = ("fit_intercept", "untie", "nesterov", "amsgrad", "maximize")

# Keys that count something: a whole number (1e3 is fine, 3.7 is refused rather than truncated to 3 while
# config.yaml keeps 3.7; "abc" is refused by name rather than by a bare int() ValueError later).
INTEGER_KEYS = ("train.steps", "train.epochs", "train.batch_size", "train.log_interval", "train.eval_interval", "eval.batch_size",
                "checkpoint.every", "data.n_train", "data.n_dev", "data.n_test", "max_length", "seed", "data.seed",
                "icl.k", "model.init_seed", "model.bos_token_id", "model.arch.vocab_size",
                "model.arch.max_position_embeddings", "peft.r", "peft.alpha", "peft.num_virtual_tokens",
                "task.sizes.n_train", "task.sizes.n_dev", "task.sizes.n_test")
# numpy's RandomState (MeZO's sampling) and torch.manual_seed both take seeds in [0, 2**32)
SEED_KEYS = {"seed": "the optimizer seed: ZO directions and batch order",
             "data.seed": "the data sampling seed: which rows are train, dev and test",
             "model.init_seed": "the seed of a random init's weights"}
FLAG_KEYS = ("save_model", "checkpoint.weights", "precision.master_weights", "task.samples",
             "task.train_as_classification")

RUN_RULES: dict[str, Rule] = {
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
    "icl.k": (lambda v: v >= 0, ">= 0 (0: no demonstrations)"),
    "model.init": (lambda v: v in ("pretrained", "random"), "pretrained or random"),
    "model.bos_token_id": (lambda v: v >= 0, "a token id >= 0, or null"),
    "model.arch.vocab_size": (lambda v: v >= 1, ">= 1"),
    "model.arch.max_position_embeddings": (lambda v: v >= 1, ">= 1"),
    "peft.r": (lambda v: v >= 1, ">= 1"),
    "peft.alpha": (lambda v: v >= 1, ">= 1"),
    "peft.dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "peft.num_virtual_tokens": (lambda v: v >= 1, ">= 1"),
    "peft.target_modules": (lambda v: isinstance(v, (list, ListConfig)) and v and all(isinstance(m, str) for m in v),
                            "a non-empty list of module names"),
    "precision.grad_clip": (lambda v: _is_number(v) and v > 0, "a number > 0, or null (no clipping)"),
    "task.sizes.n_train": (lambda v: v >= 1, ">= 1"),
    "task.sizes.n_dev": (lambda v: v >= 0, ">= 0"),
    "task.sizes.n_test": (lambda v: v >= 0, ">= 0"),
    "task.kind": (lambda v: v in ("classification", "multiple_choice", "generation"),
                  "classification, multiple_choice or generation"),
    "task.metric": (lambda v: v in ("accuracy", "f1", "em"), "accuracy, f1 or em"),
}


def validate(cfg: DictConfig) -> None:
    for key in INTEGER_KEYS:
        value = _lookup(cfg, key)
        if value is not None:
            _whole_number(key, value)
    for key, meaning in SEED_KEYS.items():
        value = _lookup(cfg, key)
        if value is not None and not 0 <= _whole_number(key, value) < 2**32:
            raise ZobenchError(f"{key} must be in [0, 2**32 - 1] ({meaning}), got {value}")
    for key in FLAG_KEYS:
        _flag(key, _lookup(cfg, key))
    for key, (rule, wanted) in RUN_RULES.items():
        value = _lookup(cfg, key)
        if value is not None:
            _check(key, value, rule, wanted)
    _check_optimizer(cfg.optimizer)
    _check_peft(cfg.get("peft"))
    _check_early_stop(cfg)
    dtype = _check_device_dtype(str(cfg.device), str(cfg.dtype))
    precision_from_config(cfg.get("precision"), dtype)  # each precision key against its choices
    FirstOrderParallel.from_config(cfg.parallel)  # parallel.fo and parallel.fsdp_param_dtype against their choices
    _check_task(cfg)
    _check_model(cfg)


def _lookup(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node[part]
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole_number(key: str, value: Any) -> int:
    """The value as an int, or one line naming the key (1e3 is 1000.0 to Hydra: accepted, int() is exact)."""
    if isinstance(value, bool):
        raise ZobenchError(f"{key} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value) < 30:  # ${oc.env:STEPS}
        return int(value)
    raise ZobenchError(f"{key} must be a whole number, got {value!r:.60}")


def _flag(key: str, value: Any) -> None:
    """true or false: bool("false") is True, so a quoted flag would silently mean the opposite."""
    if value is not None and not isinstance(value, bool):
        raise ZobenchError(f"{key} must be true or false, got {value!r:.60}")


def _check(name: str, value: Any, rule: Callable[[Any], bool], wanted: str) -> None:
    try:
        ok = not isinstance(value, bool) and rule(value)
    except TypeError:
        ok = False
    if not ok:
        raise ZobenchError(f"{name} must be {wanted}, got {value!r:.60}")


def _check_hyperparameters(node: DictConfig, prefix: str) -> None:
    """The numbers and flags of one optimizer config (or of its zo_options / kwargs) named `prefix`.KEY."""
    for key, (rule, wanted) in OPTIMIZER_RULES.items():
        value = node.get(key)
        if value is None:
            continue
        if not _is_number(value):
            raise ZobenchError(f"{prefix}.{key} must be a number {wanted}, got {value!r:.60}")
        if key in OPTIMIZER_WHOLE_NUMBERS:
            _whole_number(f"{prefix}.{key}", value)
        _check(f"{prefix}.{key}", value, rule, wanted)
    for key in OPTIMIZER_FLAGS:
        _flag(f"{prefix}.{key}", node.get(key))
    betas = node.get("betas")
    if betas is not None:
        if (not isinstance(betas, (list, ListConfig)) or len(betas) != 2
                or not all(_is_number(b) and 0 <= b < 1 for b in betas)):
            shown = list(betas) if isinstance(betas, ListConfig) else betas
            raise ZobenchError(f"{prefix}.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {shown!r:.60}")


def _check_optimizer(optimizer: DictConfig) -> None:
    from .optim.base import SCHEDULES

    _check_hyperparameters(optimizer, "optimizer")
    schedule = optimizer.get("schedule")
    if schedule is not None and schedule not in SCHEDULES:
        raise ZobenchError(f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r:.60}")
    if "zo" in optimizer or "zo_options" in optimizer:
        _check_zo_half(optimizer)
    if "torch_class" in optimizer:
        _check_torch_optimizer(optimizer)


def _check_zo_half(optimizer: DictConfig) -> None:
    """Addax's ZO half: its method and `zo_options`, checked as the optimizer it becomes."""
    from .optim.addax import ZO_METHODS

    zo = optimizer.get("zo", "mezo")
    if zo not in ZO_METHODS:
        raise ZobenchError(f"optimizer.zo must be one of {', '.join(ZO_METHODS)}, got {zo!r:.60}")
    options = optimizer.get("zo_options")
    if options is None:
        return
    if not isinstance(options, DictConfig):
        raise ZobenchError(f"optimizer.zo_options must be a mapping of the ZO method's settings, e.g. "
                           f"+optimizer.zo_options.sparsity=0.5, got {options!r:.60}")
    _check_hyperparameters(options, "optimizer.zo_options")


def _check_torch_optimizer(optimizer: DictConfig) -> None:
    from .optim.first_order import TORCH_OPTIMIZERS

    name = optimizer.torch_class
    if name not in TORCH_OPTIMIZERS:
        raise ZobenchError(f"optimizer.torch_class must be one of {', '.join(TORCH_OPTIMIZERS)}, got {name!r:.60}")
    kwargs = optimizer.get("kwargs")
    if kwargs is None:
        return
    if not isinstance(kwargs, DictConfig):
        raise ZobenchError(f"optimizer.kwargs must be a mapping of {name}'s arguments, got {kwargs!r:.60}")
    accepted = set(inspect.signature(TORCH_OPTIMIZERS[name]).parameters) - {"params", "lr", "weight_decay"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ZobenchError(f"optimizer.kwargs.{unknown[0]} is not an argument of {name} (lr and "
                           f"weight_decay are optimizer.lr, optimizer.weight_decay); it takes: {', '.join(sorted(accepted))}")
    _check_hyperparameters(kwargs, "optimizer.kwargs")


def _check_peft(peft: DictConfig | None) -> None:
    if peft is None:
        return
    from .peft_adapters import METHODS, PREFIX_INITS

    name = peft.get("name", "none")
    if name not in METHODS:
        raise ZobenchError(f"peft.name must be one of {', '.join(METHODS)}, got {name!r:.60}")
    if name == "prefix" and peft.get("init") not in (None, *PREFIX_INITS):
        raise ZobenchError(f"peft.init must be one of {', '.join(PREFIX_INITS)}, got {peft.init!r:.60}")


def _check_early_stop(cfg: DictConfig) -> None:
    from .early_stopping import EarlyStopping

    n_dev, cap = _lookup(cfg, "data.n_dev"), _lookup(cfg, "task.sizes.n_dev")  # whole numbers (checked above)
    has_dev = n_dev is None or (_whole_number("data.n_dev", n_dev) > 0
                                and (cap is None or _whole_number("task.sizes.n_dev", cap) > 0))
    EarlyStopping.from_config(OmegaConf.select(cfg, "train.early_stop", default=None), has_dev)


def _check_task(cfg: DictConfig) -> None:
    """The task's templates compile, none is over its rendering budget on placeholder values, and the method
    can run it (the runner's own check: icl.k with a training optimizer, an adapter without training, ...)."""
    if "task" not in cfg or "prompt" not in cfg.task:
        return
    from .build import check_method
    from .tasks import TASK_DEFAULTS, PromptTemplate

    task = {**TASK_DEFAULTS, **OmegaConf.to_container(cfg.task, resolve=True)}
    PromptTemplate(task).check_budget()
    check_method(cfg, task)


def _check_model(cfg: DictConfig) -> None:
    """A local model.path holds a model, and max_length fits the positions of a model whose config is at hand:
    a random init's `arch`, or a local model.path's config.json (a hub model: zobench/models.py checks once
    its config is read)."""
    model = cfg.get("model")
    if model is None:
        return
    from .models import check_model_folder, check_positions, local_model_config

    max_length = int(cfg.max_length)
    if model.get("path"):
        check_model_folder(OmegaConf.to_container(model, resolve=True))
    if model.get("init", "pretrained") == "random":
        positions = _lookup(cfg, "model.arch.max_position_embeddings")
        check_positions(max_length, positions, f"model.arch.max_position_embeddings of model={model.get('name')}")
    elif model.get("path"):
        config, where = local_model_config(str(model.path))
        if config is not None:
            check_positions(max_length, config.get("max_position_embeddings"), f"max_position_embeddings in {where}")


def _check_device_dtype(device_name: str, dtype_name: str) -> torch.dtype:
    from .models import resolve_device, resolve_dtype

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)  # refuses unknown names
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ZobenchError(f"dtype={dtype_name}: {torch.cuda.get_device_name(device)} cannot run bfloat16; "
                           f"use float16")
    return dtype
