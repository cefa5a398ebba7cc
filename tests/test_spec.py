"""Issue 19: the run spec is the one reader of the config: typed, frozen, every check before any I/O."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import QUICK
from zobench.configs import compose
from zobench.errors import ZobenchError
from zobench.optim import build_optimizer
from zobench.optim.settings import read_method
from zobench.spec import RunSpec

OPTIMIZERS = sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "optimizer").glob("*.yaml"))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_preset_reads_into_its_typed_settings(name):
    spec = RunSpec.from_cfg(compose([*QUICK, f"optimizer={name}"]))
    assert spec.method.name == name and isinstance(spec.method.settings, spec.method.cls.Settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.method.settings.__setattr__("lr", 1.0)


def test_the_spec_is_typed_and_frozen():
    spec = RunSpec.from_cfg(compose([*QUICK, "train.steps=1e3", "dtype=bfloat16"]))
    assert spec.train.steps == 1000 and isinstance(spec.train.steps, int)  # 1e3 is a float to Hydra
    assert spec.dtype is torch.bfloat16 and spec.precision.weights is torch.bfloat16
    assert spec.precision.loss_scaling == "none"  # auto, resolved for bf16 weights
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.train.steps = 5


@pytest.mark.parametrize("override, message", [
    ("optimizer.horizon=2.5", "optimizer.horizon must be a whole number, got 2.5"),  # was silently truncated
    ("optimizer.q=2", "optimizer.q must be 1"),  # AdaMeZO keeps one direction per step
    ("optimizer.beta1=1.5", "optimizer.beta1 must be in [0, 1)"),
    ("optimizer.scale=abc", "optimizer.scale must be a number > 0"),
])
def test_a_method_setting_out_of_range_is_refused_by_name(override, message):
    with pytest.raises(ZobenchError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RunSpec.from_cfg(compose([*QUICK, "optimizer=adamezo", override]))


def test_addax_zo_half_is_checked_as_its_own_optimizer():
    with pytest.raises(ZobenchError, match=r"optimizer.zo_options.sparsity must be in \[0, 1\)"):
        RunSpec.from_cfg(compose([*QUICK, "optimizer=addax", "optimizer.zo=sparse_mezo",
                                  "+optimizer.zo_options.sparsity=1.5"]))


def test_a_missing_key_is_named_never_filled_in():
    """A config.yaml of another zobench version, say: the YAML holds the defaults, the code fills in none."""
    for section, key in (("precision", "loss_scaling"), ("optimizer", "eps"), ("parallel", "zo")):
        cfg = compose([*QUICK])
        OmegaConf.set_struct(cfg, False)
        del cfg[section][key]
        with pytest.raises(ZobenchError, match=f"{section}.{key} is missing"):
            RunSpec.from_cfg(cfg)


def test_a_preset_setting_of_another_method_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        spec = RunSpec.from_cfg(compose(["experiment=quickstart", "optimizer=adam"]))  # quickstart sets eps
    assert not hasattr(spec.method.settings, "eps")
    assert "not a setting of adam, ignored: eps" in caplog.text


@pytest.mark.parametrize("override, key", [("parallel.zo=everywhere", "parallel.zo"),
                                           ("parallel.fo=zero3", "parallel.fo")])
def test_parallel_modes_are_checked(override, key):
    with pytest.raises(ZobenchError, match=key):
        RunSpec.from_cfg(compose([*QUICK, override]))


def test_epochs_resolve_to_steps_on_a_copy():
    spec = RunSpec.from_cfg(compose([*QUICK, "train.epochs=2", "train.batch_size=5"]))
    resolved = spec.for_training_size(16)
    assert (resolved.train.steps, resolved.train.eval_interval) == (8, 4)  # 2 * ceil(16 / 5), one eval per epoch
    assert spec.train.steps != 8  # the spec itself is unchanged


def test_a_method_is_built_from_its_spec_or_from_a_config_node(quick_cfg):
    cfg = quick_cfg("optimizer=zo_adam")
    model = torch.nn.Linear(2, 1)
    built = [build_optimizer(m, model, lambda b: None, seed=0, total_steps=1)
             for m in (read_method(cfg.optimizer), cfg.optimizer)]
    assert built[0].settings == built[1].settings and (built[0].beta1, built[0].beta2) == (0.9, 0.999)
