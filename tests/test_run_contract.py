"""What every run leaves behind, whatever happens to it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from zobench.best_weights import BestWeights
from zobench.errors import ZobenchError
from zobench.run_dir import atomic_write_json
from zobench.run import run


def test_first_order_runs_count_backward_passes(quick_cfg, tmp_path):
    metrics = run(quick_cfg("optimizer=adam", "train.steps=3", "optimizer.lr=1e-3"), tmp_path / "adam")
    assert metrics["status"] == "completed"
    assert (metrics["forward_passes"], metrics["backward_passes"]) == (3, 3)
    sgd = run(quick_cfg("optimizer=sgd", "train.steps=2"), tmp_path / "sgd")
    assert (sgd["forward_passes"], sgd["backward_passes"]) == (2, 2)


def test_llama_tiny_runs(quick_cfg, tmp_path):
    metrics = run(quick_cfg("model=llama-tiny", "train.steps=3"), tmp_path)
    assert metrics["status"] == "completed" and metrics["model"] == "llama-tiny"
    assert metrics["forward_passes"] == 6


def test_nan_loss_ends_the_run_as_diverged(quick_cfg, tmp_path):
    metrics = run(quick_cfg("optimizer=sgd", "optimizer.lr=1e12", "train.steps=50"), tmp_path)
    assert metrics["status"] == "diverged"
    assert 1 <= metrics["steps"] < 50 and "diverged at step" in metrics["error"]
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == "diverged" and on_disk["test_metric"] is None


def test_a_run_never_overwrites_another(quick_cfg, tmp_path):
    run(quick_cfg("train.steps=1"), tmp_path)
    first = (tmp_path / "metrics.json").read_text()
    with pytest.raises(ZobenchError, match="never overwrites"):
        run(quick_cfg("train.steps=1", "seed=5"), tmp_path)
    assert (tmp_path / "metrics.json").read_text() == first


@pytest.mark.parametrize("mode", ["disk", "host"])
def test_best_weights_come_back_exactly(tmp_path, mode):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    keeper = BestWeights(model, mode, tmp_path)
    keeper.save()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    keeper.restore()
    for name, param in model.named_parameters():
        assert torch.equal(param, saved[name])
    assert not (tmp_path / "best_weights.safetensors").exists()


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"status": "running"})

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", explode)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(target, {"status": "completed"})
    assert json.loads(target.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
