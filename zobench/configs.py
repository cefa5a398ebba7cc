"""The Hydra config tree: conf/ plus the `task` group built from tasks/*.yaml (the one list of tasks)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from .errors import ZobenchError
from .failures import one_line
from .optim import REGISTERED
from .paths import conf_dir
from .tasks import load_task_definition, task_names

GROUPS = ("model", "task", "optimizer", "experiment", "peft", "logger")
# Keys by which Hydra's instantiate imports and calls what a config names: never in a received folder's overrides.
INSTANTIATION_KEYS = ("_target_", "_args_", "_partial_", "_convert_", "_recursive_")


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


# Launchers from Hydra plugins (the `cluster` extra): the plugin's module and the package it runs jobs with.
LAUNCHER_NEEDS = {"slurm_gpu": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
                  "slurm_multigpu": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
                  "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
                  "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
                  "local_parallel": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
                  "joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib")}


def _check_launcher(override) -> None:
    """`hydra/launcher=slurm_gpu` without its plugin: one line naming the extra (Hydra says "Could not load
    'hydra/launcher/submitit_slurm'", or the job fails on a missing import)."""
    import importlib.util

    if override.key_or_group != "hydra/launcher" or override.is_sweep_override() or override.is_delete():
        return
    needs = LAUNCHER_NEEDS.get(str(override.value()))
    if needs is None:
        return
    for module in needs:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ZobenchError(f"hydra/launcher={override.value()} needs {module.split('.')[-1]}, which is not "
                               f"installed: pip install -e '.[cluster]' (or pip install 'zobench[cluster]')")


def check_overrides(overrides: list[str]) -> None:
    """Unknown model/task/optimizer/experiment names: one line listing the valid ones. A `_target_` (in a key
    or inside a value) must name one of zobench's own classes: what the user types chooses, never imports."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return  # let Hydra report syntax errors itself
    for override in parsed:
        _refuse_foreign_targets(override)
        _check_launcher(override)
        group = override.key_or_group
        if group not in GROUPS or override.is_delete():
            continue
        try:
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        except Exception:  # glob(): Hydra expands it to option names, which exist
            continue
        valid = group_options(group)
        for value in values:
            if isinstance(value, str) and value not in valid:
                raise ZobenchError(f"unknown {group} '{value}'; valid: {', '.join(valid)}")


def received_overrides(items, where: Path) -> list[str]:
    """A received run folder's recorded overrides (`where`), checked as data before Hydra sees them: each must
    set a key of zobench's own config tree (conf/config.yaml's keys and groups), with no instantiation key at any
    depth, no `@package`, no sweep. Anything else is refused in one line naming the file and the override.

    hydra.* and hydra/... are refused, not skipped: zobench never records them there (Hydra keeps them apart
    from the task's overrides), so one in the file means the file was edited to change how zobench runs; a
    resume runs with the user's own Hydra settings, and config.yaml, compared on resume, never holds hydra.*."""
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ZobenchError(f"{where} is not a list of overrides (strings): not a file zobench wrote")
    own_keys = _own_keys()
    parser = OverridesParser.create()
    for item in items:
        try:
            override = parser.parse_override(item)
        except Exception as error:
            raise ZobenchError(f"{where}: {item!r} is not an override Hydra can parse ({one_line(error)})") from None
        key = override.key_or_group
        refuse = None
        if _path_parts(key)[0] == "hydra":
            refuse = f"sets Hydra's own {key}"
        elif _path_parts(key)[0] not in own_keys:
            refuse = f"sets {key}, which is not a key of zobench's config"
        elif override.package is not None:
            refuse = "moves a config with @package"
        elif override.is_sweep_override():
            refuse = "is a sweep (a run records one value per key)"
        elif _mentions_instantiation(key) or _mentions_instantiation(override.value()):
            refuse = f"holds an instantiation key ({', '.join(INSTANTIATION_KEYS)})"
        elif _points_elsewhere(key, override.value()):
            refuse = "chooses where a tracker writes or sends outside the run folder (type it yourself beside resume=)"
        if refuse:
            raise ZobenchError(f"{where}: {item!r} {refuse}: a received run folder's overrides are data, not "
                               f"settings of Hydra or code to run; remove that line to resume")
    return list(items)


def _points_elsewhere(key: str, value) -> bool:
    """A tracker's place that is not inside the run folder: an absolute or `..` logger.dir, a tracking server,
    an online mode (zobench's trackers write under the run folder, offline, by default)."""
    if key == "logger.dir":
        return (not isinstance(value, str) or "${" in value  # an interpolation may resolve anywhere
                or Path(value).is_absolute() or ".." in Path(value).parts)
    if key == "logger.tracking_uri":
        return value is not None
    if key == "logger.mode":
        return value not in ("offline", "disabled")
    return key == "logger" and isinstance(value, dict)  # a whole logger config given as a value


def _own_keys() -> frozenset[str]:
    import yaml

    top = yaml.safe_load((conf_dir() / "config.yaml").read_text(encoding="utf-8"))  # zobench's own file
    return frozenset(set(top) - {"defaults", "hydra"}) | frozenset(GROUPS)


def _path_parts(key: str) -> list[str]:
    return key.replace("/", ".").split(".")


def _mentions_instantiation(value) -> bool:
    """An instantiation key anywhere: a key's part, a dict key or any string at any depth (an interpolation
    such as ${oc.decode:'{_target_: …}'} builds one from a string)."""
    if isinstance(value, str):
        return any(word in value for word in INSTANTIATION_KEYS)
    if isinstance(value, dict):
        return any(_mentions_instantiation(k) or _mentions_instantiation(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_mentions_instantiation(v) for v in value)
    return False


def _refuse_foreign_targets(override) -> None:
    try:
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    except Exception:  # a glob() over a group needs Hydra's config loader: Hydra expands it to option names
        values = []
    for value in values:
        for target in _targets(override.key_or_group, value):
            if target not in REGISTERED:
                raise ZobenchError(f"{override.input_line}: _target_ {target!r} is not one of zobench's optimizer "
                                   f"classes (a config chooses among zobench's own, never imports another); choose "
                                   f"one with optimizer=NAME: {', '.join(group_options('optimizer'))}")


def _targets(key: str, value):
    """The `_target_` values an override sets: as its key's last part, or as keys inside its value."""
    if _path_parts(str(key))[-1] == "_target_":
        yield value
    if isinstance(value, dict):
        for inner_key, inner in value.items():
            yield from _targets(str(inner_key), inner)
    elif isinstance(value, (list, tuple)):
        for inner in value:
            yield from _targets("", inner)


def hydra_config(overrides: list[str]) -> DictConfig:
    """The config Hydra composes for these overrides with its own `hydra` node (run and sweep folders, mode,
    the sweeper's params), nothing run: what the CLI must know before Hydra writes anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def resolved_run_dir(overrides: list[str]) -> str | None:
    """hydra.run.dir exactly as Hydra will resolve it for these overrides (`++`, quotes and `${…}` read as Hydra
    reads them: composed with Hydra's own API), absolute; None when the overrides make it a multirun."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = hydra_config(overrides)
        if "MULTIRUN" in str(OmegaConf.select(cfg, "hydra.mode")):
            return None
        value = OmegaConf.select(cfg, "hydra.run.dir", throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise ZobenchError(one_line(error) or type(error).__name__) from None
    if not isinstance(value, str) or not value:
        raise ZobenchError(f"hydra.run.dir={value!r}: a run needs a folder name")
    return os.path.abspath(value)


def resolved_sweep_dir(overrides: list[str]) -> Path | None:
    """hydra.sweep.dir as Hydra will resolve it (the sweep's own overrides left out: compose takes one value
    per key); None where it cannot be told before Hydra runs (Hydra then reports what is wrong)."""
    try:
        value = OmegaConf.select(hydra_config(single_valued(overrides)), "hydra.sweep.dir", throw_on_missing=True)
    except Exception:
        return None
    return Path(os.path.abspath(value)) if isinstance(value, str) and value else None


def single_valued(overrides: list[str]) -> list[str]:
    """The overrides that are not sweeps (`key=a,b`): what one composition can take."""
    parser = OverridesParser.create()
    return [item for item in overrides if not parser.parse_override(item).is_sweep_override()]


def run_dir_override(path: str) -> str:
    """`hydra.run.dir='PATH'`, which Hydra reads back as exactly PATH. A name Hydra or a shell would read
    otherwise (a quote, a backslash, `$`, a newline or another control character) is refused."""
    odd = sorted({char for char in path if char in "'\"$\\" or ord(char) < 32 or ord(char) == 127})
    if odd:
        raise ZobenchError(f"hydra.run.dir={path!r}: a run folder's name may not hold {', '.join(map(repr, odd))} "
                           f"(Hydra or a shell would read it otherwise); choose another folder name")
    return f"hydra.run.dir='{path}'"


def pin_run_dir(argv: list[str], path: str) -> list[str]:
    """argv with every form of hydra.run.dir (`+`, `++`, quoted) replaced by `path`, quoted, at the end."""
    parser = OverridesParser.create()

    def sets_run_dir(arg: str) -> bool:
        if "=" not in arg or arg.startswith("-"):
            return False
        try:
            return parser.parse_override(arg).key_or_group == "hydra.run.dir"
        except Exception:
            return False  # Hydra reports it

    return [arg for arg in argv if not sets_run_dir(arg)] + [run_dir_override(path)]


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
