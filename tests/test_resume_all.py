"""Every optimizer resumes exactly: fail a run mid-way, resume it, compare with one uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import fail_once_at
from zobench.configs import group_options
from zobench.errors import ZobenchError
from zobench.run import run

# The default suite resumes one optimizer of each kind (ZO, ZO with stored moments, FO, mixed); the
# rest run with `pytest -m slow`.
DEFAULT = ("mezo", "zo_adam", "adam", "addax")
TRAINING = [pytest.param(name, marks=() if name in DEFAULT else pytest.mark.slow)
            for name in group_options("optimizer") if name not in ("zero_shot", "lp")]
SETTINGS = ["train.steps=6", "train.eval_interval=3", "checkpoint.every=2", "save_model=true"]


@pytest.mark.parametrize("weights", [False, True], ids=["trajectory", "weights"])
@pytest.mark.parametrize("name", TRAINING)
def test_every_optimizer_resumes_bit_identically(quick_cfg, tmp_path, monkeypatch, name, weights):
    cfg = quick_cfg(f"optimizer={name}", *SETTINGS, f"checkpoint.weights={str(weights).lower()}")
    one_go = run(cfg, tmp_path / "one_go")
    fail_once_at(monkeypatch, steps_done=4)  # the fifth step; the checkpoint of step 4 survives
    with pytest.raises(ZobenchError, match="out of memory at step 4"):
        run(cfg, tmp_path / "resumed")
    resumed = run(cfg, tmp_path / "resumed")
    assert resumed["status"] == "completed" and resumed["resumed_at_step"] == 4
    for key in ("test_metric", "dev_loss", "best_step", "forward_passes", "backward_passes", "tokens"):
        assert resumed[key] == one_go[key], key
    expected = load_file(str(tmp_path / "one_go" / "model" / "model.safetensors"))
    final = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)
