"""A completed run's disk: its checkpoint tensors (weights, optimizer state) are dropped once it is recorded
completed, an interrupted run keeps them and resumes, replay and the report still work, and metrics.json
says how many bytes the run folder holds."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK
from zobench.configs import compose
from zobench.errors import Interrupted
from zobench.run import run

ADAM = [*QUICK, "optimizer=adam", "optimizer.lr=1e-3", "checkpoint.every=1", "train.steps=4",
        "train.eval_interval=2", "data.n_dev=4", "data.n_test=4"]


def files_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture
def stop_handlers():
    """A stopped run leaves its own handlers on the stop signals (the process is on its way out): put
    pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_completed_adam_run_keeps_no_optimizer_state_and_records_its_disk_bytes(tmp_path):
    metrics = run(compose(ADAM), tmp_path)
    assert metrics["status"] == "completed"
    checkpoint = tmp_path / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["state.json"]  # no state/weights .safetensors
    n = metrics["n_trainable_params"]
    recorded = json.loads((tmp_path / "metrics.json").read_text())["disk_bytes"]
    # the folder as it ended: metrics.json's own rewrite with the number changes it by a few bytes at most
    assert abs(recorded - files_bytes(tmp_path)) < 64
    assert recorded < n * 4  # Adam's moments alone were 2 x 4 bytes per trained parameter


def test_an_interrupted_adam_run_keeps_its_optimizer_state_and_resumes_to_the_one_go_result(tmp_path, monkeypatch,
                                                                                             stop_handlers):
    from zobench.optim.base import Optimizer

    whole = run(compose(ADAM), tmp_path / "whole")
    original = Optimizer.step

    def stopped_in_step_3(self, batch):
        if self.steps_done == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # SLURM's pre-emption: stop after this step, with a checkpoint
        return original(self, batch)

    monkeypatch.setattr(Optimizer, "step", stopped_in_step_3)
    with pytest.raises(Interrupted):
        run(compose(ADAM), tmp_path / "run")
    monkeypatch.setattr(Optimizer, "step", original)
    checkpoint = tmp_path / "run" / "checkpoint"
    assert {"state.json", "state.safetensors", "weights.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    stopped = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["disk_bytes"] > stopped["n_trainable_params"] * 4
    moments = load_file(str(checkpoint / "state.safetensors"))
    assert sum(t.numel() for t in moments.values()) >= 2 * stopped["n_trainable_params"]  # Adam's exp_avg(_sq)
    resumed = run(compose(ADAM), tmp_path / "run")
    assert resumed["status"] == "completed" and resumed["resumed_at_step"] == 3
    for key in ("test_metric", "dev_loss", "best_step", "forward_passes"):
        assert resumed[key] == whole[key], key
    assert sorted(p.name for p in checkpoint.iterdir()) == ["state.json"]


def test_replay_and_the_report_still_work_on_a_completed_zo_run(tmp_path):
    from zobench.replay import replay_run
    from zobench.report.cli import main as report

    runs = tmp_path / "runs"
    metrics = run(compose([*QUICK, "optimizer.lr=1e-3", "train.steps=6", "train.eval_interval=3", "checkpoint.every=2",
                           "checkpoint.weights=true", "save_model=true", "data.n_dev=4", "data.n_test=4"]),
                  runs / "0_mezo")
    run_dir = runs / "0_mezo"
    assert metrics["status"] == "completed" and sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == [
        "state.json"]  # checkpoint.weights=true: its weights went with the run's end
    out = replay_run(run_dir)  # the tested (best-on-dev) step, from trajectory.jsonl alone
    replayed, saved = (load_file(str(folder / "model.safetensors")) for folder in (out, run_dir / "model"))
    assert replayed.keys() == saved.keys() and all(torch.equal(replayed[k], saved[k]) for k in saved)
    assert report([str(runs), "--no-plots", "-o", str(tmp_path / "report")]) == 0
    import csv

    with open(tmp_path / "report" / "runs.csv") as table:
        rows = list(csv.DictReader(table))
    assert [(row["status"], float(row["test_metric"])) for row in rows] == [("completed", metrics["test_metric"])]
