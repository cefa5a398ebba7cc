"""The Hydra config tree: conf/ plus the `task` group built from tasks/*.yaml (the one list of tasks)."""

from __future__ import annotations

import os

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from .errors import ZobenchError
from .paths import conf_dir
from .tasks import load_task_definition, task_names

GROUPS = ("model", "task", "optimizer", "experiment", "peft", "logger")


def register_resolvers() -> None:
    """${pid:} in run directory names: two runs started in the same microsecond still differ."""
    if not OmegaConf.has_resolver("pid"):
        # Cached: the value travels with the config, so sweep jobs in child processes keep the parent's.
        OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True)


def register_tasks() -> None:
    """Every tasks/<name>.yaml becomes the Hydra option task=<name> (defaults from TASK_DEFAULTS)."""
    store = ConfigStore.instance()
    for name in task_names():
        store.store(group="task", name=name, node=OmegaConf.create(load_task_definition(name)))


def group_options(group: str) -> list[str]:
    if group == "task":
        return task_names()
    folder = conf_dir() / group
    return sorted(path.stem for path in folder.glob("*.yaml")) if folder.is_dir() else []


def check_overrides(overrides: list[str]) -> None:
    """Unknown model/task/optimizer/experiment names: one line listing the valid ones."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return  # let Hydra report syntax errors itself
    for override in parsed:
        group = override.key_or_group
        if group not in GROUPS or override.is_delete():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        valid = group_options(group)
        for value in values:
            if isinstance(value, str) and value not in valid:
                raise ZobenchError(f"unknown {group} '{value}'; valid: {', '.join(valid)}")


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config a `zobench OVERRIDES...` run would get (for tests and scripts), without running it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides or [])
    check_overrides(overrides)
    register_resolvers()
    register_tasks()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
