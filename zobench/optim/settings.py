"""A method's settings: its conf/optimizer/<name>.yaml read into the method's frozen `Settings` dataclass.

Each method class declares `Settings` (a frozen dataclass, no defaults: they live in the YAML) and may add a
`check_settings` classmethod for rules between settings. `read_method` is the one reader of an optimizer
node (zobench/spec.py calls it; so do tests and benchmarks that build a method alone): a missing
key, a wrong type or a value out of range is one line naming `optimizer.KEY`, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from dataclasses import dataclass
from types import MappingProxyType, NoneType, UnionType
from typing import Any, Callable, Mapping

from ..errors import ZobenchError

log = logging.getLogger(__name__)
Rule = tuple[Callable[[Any], bool], str]

# A setting's range, by its name, wherever a method has it (also in Addax's zo_options and a torch
# optimizer's kwargs), so a new method's `eps` or `alpha` is covered without a line here.
RULES: dict[str, Rule] = {
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
    "max_grad_norm": (lambda v: v > 0, "> 0, or null"),
}
WHOLE_NUMBERS = ("q", "k0", "k1", "l_t", "horizon", "cv", "max_iter")
FLAGS = ("fit_intercept", "untie", "nesterov", "amsgrad", "maximize")
NOT_SETTINGS = ("_target_", "name")  # the class and the label: MethodSpec's, not the method's settings


@dataclass(frozen=True)
class MethodSpec:
    """optimizer=NAME, read: its label, its registered class and its typed settings."""
    name: str
    target: str
    cls: type
    settings: Any  # cls.Settings


def read_method(node: Mapping, prefix: str = "optimizer") -> MethodSpec:
    """The method of an optimizer config node (conf/optimizer/<name>.yaml with the run's overrides)."""
    from omegaconf import DictConfig, OmegaConf

    from . import optimizer_class

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    target = node.get("_target_")
    cls = optimizer_class(target)  # zobench's own classes only, else one line
    name = node.get("name")
    if not isinstance(name, str) or not name:
        raise ZobenchError(f"{prefix}.name must be the optimizer's name (a string), got {name!r:.60}")
    settings = read_settings(cls, node, prefix)
    return MethodSpec(name=name, target=target, cls=cls, settings=settings)


def read_settings(cls: type, node: Mapping, prefix: str = "optimizer"):
    """`cls.Settings` from `node`: every field present, no other key, each typed and in range."""
    fields = {f.name: f for f in dataclasses.fields(cls.Settings)}
    hints = typing.get_type_hints(cls.Settings)
    given = {key: node[key] for key in node if key not in NOT_SETTINGS}
    unknown = sorted(set(given) - set(fields))
    if unknown:  # a preset's setting for another method (quickstart's eps, then optimizer=adam): unused, said
        check_numbers({key: given[key] for key in unknown}, prefix)  # a value out of range is still a mistake
        log.warning("%s: not a setting of %s, ignored: %s (its settings: %s)", prefix,
                    node.get("name") or cls.__name__, ", ".join(unknown), ", ".join(sorted(fields)) or "none")
    missing = sorted(set(fields) - set(given))
    if missing:
        raise ZobenchError(f"{prefix}.{missing[0]} is missing: conf/optimizer/*.yaml sets it (add "
                           f"+{prefix}.{missing[0]}=VALUE)")
    values = {key: typed(f"{prefix}.{key}", given[key], hints[key]) for key in fields}
    settings = cls.Settings(**values)
    check = getattr(cls, "check_settings", None)
    if check is not None:
        check(settings, prefix)
    return settings


def preset_settings(cls: type, **values):
    """`cls.Settings` from its conf/optimizer/<name>.yaml (the first preset naming the class), with `values`
    over it: the defaults of a method built alone (tests, benchmarks) are the YAML's, as a run's are."""
    from omegaconf import OmegaConf

    from ..paths import conf_dir

    target = f"{cls.__module__}.{cls.__qualname__}"
    for path in sorted((conf_dir() / "optimizer").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        if node.get("_target_") == target:
            return read_settings(cls, {**node, **values})
    raise ZobenchError(f"no conf/optimizer/*.yaml names {target}")


def typed(key: str, value: Any, kind) -> Any:
    """`value` as `kind` (float, int, bool, str, X | None, tuple[float, ...], Mapping), range by RULES[name]."""
    name = key.rsplit(".", 1)[-1]
    if isinstance(kind, UnionType):  # X | None
        if value is None:
            return None
        (kind,) = [k for k in typing.get_args(kind) if k is not NoneType]
    if kind is bool:
        return flag(key, value)
    if kind is str:
        if not isinstance(value, str):
            raise ZobenchError(f"{key} must be a string, got {value!r:.60}")
        return value
    if kind in (int, float):
        number = whole_number(key, value) if kind is int or name in WHOLE_NUMBERS else value
        if not is_number(number):
            raise ZobenchError(f"{key} must be a number{_range(name)}, got {value!r:.60}")
        check_rule(key, number, RULES.get(name))
        return kind(number)
    if typing.get_origin(kind) is tuple:
        return _numbers(key, value)
    if kind is Mapping or typing.get_origin(kind) is Mapping:
        if not isinstance(value, Mapping):
            raise ZobenchError(f"{key} must be a mapping, e.g. {{a: 1}}, got {value!r:.60}")
        return MappingProxyType(dict(value))
    raise TypeError(f"{key}: no reader for settings of type {kind}")  # a Settings class zobench got wrong


def check_numbers(node: Mapping, prefix: str) -> None:
    """The settings of a mapping without a dataclass (a torch optimizer's kwargs, Addax's zo_options): each
    key with a rule in range, each flag a bool."""
    for key, value in node.items():
        if key in FLAGS:
            flag(f"{prefix}.{key}", value)
        elif key == "betas":
            _numbers(f"{prefix}.betas", value)
        elif key in RULES:
            typed(f"{prefix}.{key}", value, int if key in WHOLE_NUMBERS else float)


def _numbers(key: str, value: Any) -> tuple[float, ...]:
    """betas: two numbers in [0, 1)."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(is_number(b) and 0 <= b < 1 for b in value)):
        raise ZobenchError(f"{key} must be two numbers in [0, 1), e.g. [0.9, 0.999], got {value!r:.60}")
    return tuple(float(b) for b in value)


def _range(name: str) -> str:
    rule = RULES.get(name)
    return f" {rule[1]}" if rule else ""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole_number(key: str, value: Any) -> int:
    """The value as an int, or one line naming the key (1e3 is 1000.0 to Hydra: accepted, int() is exact;
    3.7 is refused rather than truncated to 3 while config.yaml keeps 3.7)."""
    if isinstance(value, bool):
        raise ZobenchError(f"{key} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value) < 30:  # ${oc.env:STEPS}
        return int(value)
    raise ZobenchError(f"{key} must be a whole number, got {value!r:.60}")


def flag(key: str, value: Any) -> bool:
    """true or false: bool("false") is True, so a quoted flag would silently mean the opposite."""
    if not isinstance(value, bool):
        raise ZobenchError(f"{key} must be true or false, got {value!r:.60}")
    return value


def check_rule(key: str, value: Any, rule: Rule | None) -> None:
    if rule is None:
        return
    test, wanted = rule
    try:
        ok = not isinstance(value, bool) and test(value)
    except TypeError:
        ok = False
    if not ok:
        raise ZobenchError(f"{key} must be {wanted}, got {value!r:.60}")
