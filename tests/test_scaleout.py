"""Launchers, sharding, validation, out-of-memory and run-directory uniqueness (issue #7)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import QUICK, run_cli
from zobench.errors import ZobenchError
from zobench.models import load_model
from zobench.objective import Objective
from zobench.optim.engine import PerturbationEngine
from zobench.run import run


def test_slurm_preset_composes_with_one_gpu_per_job():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = run_cli("--cfg", "hydra", "-p", "hydra.launcher", "hydra/launcher=slurm_gpu")
    assert result.returncode == 0, result.stderr
    launcher = result.stdout
    assert "SlurmLauncher" in launcher and "gpus_per_node: 1" in launcher and "timeout_min: 720" in launcher


def test_submitit_local_runs_a_tiny_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = run_cli("-m", "hydra/launcher=submitit_local", *QUICK, "train.steps=2", "train.eval_interval=0",
                     f"results_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    (metrics_file,) = tmp_path.rglob("metrics.json")
    assert json.loads(metrics_file.read_text())["status"] == "completed"


def test_joblib_jobs_share_one_sweep_dir_and_each_has_its_own_process(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    result = run_cli("-m", "hydra/launcher=local_parallel", *QUICK, "train.steps=2", "train.eval_interval=0",
                     "seed=0,1", f"results_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    files = sorted(tmp_path.rglob("metrics.json"))
    assert len(files) == 2 and files[0].parent.parent == files[1].parent.parent
    assert all(json.loads(f.read_text())["peak_memory_bytes"] > 0 for f in files)


def test_two_runs_started_together_get_two_directories(tmp_path):
    args = [sys.executable, "-m", "zobench.cli", *QUICK, "train.steps=1", "train.eval_interval=0",
            f"results_dir={tmp_path}"]
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    processes = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in processes)
    assert len({f.parent for f in tmp_path.rglob("metrics.json")}) == 2


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-1", "optimizer.lr must be >= 0"),
    ("optimizer.eps=0", "optimizer.eps must be > 0"),
    ("+optimizer.sparsity=1.0", "optimizer.sparsity must be in [0, 1)"),
    ("+optimizer.alpha=1.5", "optimizer.alpha must be in [0, 1]"),
    ("+optimizer.k0=0", "optimizer.k0 must be >= 1"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("precision.zo_update=fast", "precision.zo_update must be one of reference, fused, got fast"),
    ("dtype=float8", "unknown dtype 'float8'"),
])
def test_bad_settings_are_refused_at_start_up(quick_cfg, tmp_path, override, message):
    with pytest.raises(ZobenchError, match=re.escape(message)):
        run(quick_cfg(override), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["steps"] == 0


@pytest.mark.parametrize("override, message", [
    ("optimizer.eps=-1", "optimizer.eps must be > 0, got -1"),
    ("precision.loss_dtype=float64", "precision.loss_dtype must be one of weights, float32, got float64"),
])
def test_bad_setting_is_one_line_on_the_command_line(tmp_path, override, message):
    result = run_cli(*QUICK, override, f"results_dir={tmp_path}")
    assert result.returncode == 2  # a config value: refused before the run starts (README, Exit codes)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]
    assert not list(tmp_path.rglob("metrics.json"))  # before any run folder is written


def test_out_of_memory_fails_with_the_step_the_peak_and_the_knobs(quick_cfg, tmp_path, monkeypatch):
    original = Objective.option_logprobs
    calls = []

    def starved(self, batch):
        calls.append(1)
        if len(calls) > 4:  # two MeZO steps, then the machine runs dry
            raise MemoryError
        return original(self, batch)

    monkeypatch.setattr(Objective, "option_logprobs", starved)
    with pytest.raises(ZobenchError, match="out of memory at step 2"):
        run(quick_cfg("train.steps=10", "train.eval_interval=0"), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "train.batch_size" in metrics["error"]
    assert "GiB" in metrics["error"] and metrics["peak_memory_bytes"] > 0


def test_z_depends_only_on_seed_and_parameter_not_on_visiting_order(quick_cfg):
    cfg = quick_cfg()
    model, _ = load_model(OmegaConf.to_container(cfg.model, resolve=True), torch.device("cpu"), torch.float32)
    forward_order = PerturbationEngine(model.named_parameters(), seed=0)
    other = PerturbationEngine(model.named_parameters(), seed=1)
    visited = {i: forward_order.direction(7, i, p) for i, (_, p) in enumerate(forward_order.named)}
    for i, (_, p) in reversed(list(enumerate(other.named))):  # another engine, the other way round
        assert torch.equal(other.direction(7, i, p), visited[i])


def test_a_model_dispatched_by_accelerate_takes_the_same_step(quick_cfg, tmp_path):
    plain = run(quick_cfg("train.steps=3", "train.eval_interval=0", "train.keep_best=none"), tmp_path / "a")
    sharded = run(quick_cfg("train.steps=3", "train.eval_interval=0", "train.keep_best=none",
                            "+model.device_map={model.decoder: cpu, lm_head: cpu}"), tmp_path / "b")
    assert sharded["status"] == "completed"
    assert sharded["test_metric"] == plain["test_metric"] and sharded["dev_loss"] == plain["dev_loss"]
