"""Every paper preset in conf/experiment/ composes, with its sweep grid, into configs the runner accepts.

A preset may name optimizers or tasks that are not in the tree yet: such a test is skipped, saying
which are missing, rather than failing.
"""

from __future__ import annotations

import pytest
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from zobench.configs import GROUPS, compose, group_options, register_tasks
from zobench.paths import conf_dir

PRESETS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml") if p.stem != "quickstart")


def compose_with_hydra(overrides: list[str]):
    """As compose(), with the `hydra` node (where the sweep grid lives) kept."""
    register_tasks()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def raw_preset(name: str) -> dict:
    return yaml.safe_load((conf_dir() / "experiment" / f"{name}.yaml").read_text())


def preset_groups(name: str) -> dict[str, str]:
    """The groups a preset's defaults list overrides: {'optimizer': 'mezo', ...}."""
    chosen = {}
    for entry in raw_preset(name).get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                chosen[key.removeprefix("override ").lstrip("/")] = value
    return chosen


def grid(name: str) -> dict[str, list[str]]:
    params = raw_preset(name).get("hydra", {}).get("sweeper", {}).get("params", {}) or {}
    parser = OverridesParser.create()
    values = {}
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        values[key] = list(override.sweep_string_iterator()) if override.is_sweep_override() \
            else [override.get_value_element_as_str()]
    return values


def skip_unless_present(name: str) -> None:
    wanted = {group: {value} for group, value in preset_groups(name).items() if group in GROUPS}
    for key, values in grid(name).items():
        if key in GROUPS:
            wanted.setdefault(key, set()).update(values)
    missing = [f"{group} {value}" for group, values in wanted.items() for value in sorted(values)
               if value not in group_options(group)]
    if missing:
        pytest.skip(f"preset {name} needs what is not in the tree yet: {', '.join(missing)}")


def test_there_are_paper_presets_and_the_smoke_table():
    assert "mezo_opt13b" in PRESETS and "cpu_smoke_table" in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_with_its_sweep_grid(name):
    skip_unless_present(name)
    cfg = compose([f"experiment={name}"])
    assert cfg.model.name and cfg.task.name and cfg.optimizer.name
    with_hydra = compose_with_hydra([f"experiment={name}"])
    params = with_hydra.hydra.sweeper.params
    assert params, f"{name}: no hydra.sweeper.params grid"
    # every value of every swept key composes (one key at a time: the full product would be slow)
    for key, values in grid(name).items():
        for value in values:
            job = compose([f"experiment={name}", f"{key}={value}"])
            got = job[key].name if key in GROUPS else OmegaConf.select(job, key)
            assert _same(got, value), (name, key, value, got)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_sets_only_keys_its_optimizers_have(name):
    """A misspelt hyperparameter would otherwise be added silently and never read."""
    skip_unless_present(name)
    block = raw_preset(name).get("optimizer") or {}
    optimizers = grid(name).get("optimizer") or [preset_groups(name).get("optimizer", "mezo")]
    for optimizer in optimizers:
        own = compose([f"optimizer={optimizer}"]).optimizer
        unknown = [key for key in block if key not in own]
        assert not unknown, f"{name}: optimizer {optimizer} has no {', '.join(unknown)}"
        swept = [key.split(".", 1)[1] for key in grid(name) if key.startswith("optimizer.")]
        assert all(key in own for key in swept), (name, optimizer, swept)


def _same(got, text: str) -> bool:
    try:
        return float(got) == float(text)
    except (TypeError, ValueError):
        return str(got) == text
