"""Checkpoints and exact resume.

A zeroth-order run is determined by its initial weights and, step by step, the loss values its
optimizer saw: feeding those values back to the same optimizer code (`ReplayLoss`) redoes every
perturbation, seed draw and update with the same floating-point operations, without a forward pass,
so the weights come back bit for bit. That trajectory (trajectory.jsonl, a line per step: kilobytes)
is the ZO checkpoint; `checkpoint.weights=true` adds the weights for a fast resume. First-order runs
(and any optimizer that needs real gradients) always checkpoint weights + optimizer state. Saved
weights are the trained parameters only (with an adapter: the adapter, not the whole model).

checkpoint/state.pt holds the rest: the step, the run's counters, the best-dev bookkeeping, the
optimizer's state and the torch RNG state. It is written after a whole step, never in the middle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .models import trained_parameters

TRAJECTORY = "trajectory.jsonl"
STATE = "checkpoint/state.pt"
WEIGHTS = "checkpoint/weights.safetensors"


class RecordingLoss:
    """Wraps the loss closure and remembers, for the current step, every value it returned."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn
        self.values: list[float] = []

    def __call__(self, batch):
        loss = self.loss_fn(batch)
        self.values.append(float(loss.detach()))
        return loss

    def take(self) -> list[float]:
        values, self.values = self.values, []
        return values


class ReplayLoss:
    """Returns recorded values in order instead of running the model (float32, as the objective)."""

    def __init__(self):
        self.values: list[float] = []

    def __call__(self, batch):
        if not self.values:
            raise RuntimeError("the trajectory holds fewer loss values than the optimizer asks for")
        return torch.tensor(self.values.pop(0), dtype=torch.float32)


def replay(optimizer, records: list[dict[str, Any]], on_step=None) -> None:
    """Redo the recorded steps on `optimizer` (its model at the run's initial weights)."""
    recorded_loss, stub = optimizer.loss_fn, ReplayLoss()
    optimizer.loss_fn = stub
    try:
        for record in records:
            stub.values = list(record["losses"])
            optimizer.step(None)
            if stub.values:
                raise RuntimeError(f"step {record['step']}: the optimizer used fewer loss values than recorded")
            if on_step is not None:
                on_step(record["step"])
    finally:
        optimizer.loss_fn = recorded_loss


def read_trajectory(run_dir: Path, up_to: int | None = None) -> list[dict[str, Any]]:
    """Whole lines only (a killed run may leave half a line), steps 1..up_to in order."""
    path = Path(run_dir) / TRAJECTORY
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if up_to is not None and record["step"] > up_to:
                break
            records.append(record)
    if [r["step"] for r in records] != list(range(1, len(records) + 1)):
        raise RuntimeError(f"{path} is not a gapless sequence of steps")
    return records


def keep_lines_up_to(path: Path, step: int) -> None:
    """Drop the JSONL lines (and any half line) logged after `step`: they will be written again."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record.get("step", 0) <= step:
            kept.append(line)
    from .records import atomic_write_text

    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class Checkpointer:
    def __init__(self, run_dir: Path, model, optimizer, save_weights: bool):
        self.run_dir = Path(run_dir)
        self.model, self.optimizer = model, optimizer
        self.with_weights = save_weights or not getattr(optimizer, "replayable", False)
        self._trajectory = open(self.run_dir / TRAJECTORY, "a", buffering=1)

    @property
    def mode(self) -> str:
        return "weights" if self.with_weights else "trajectory"

    def record_step(self, step: int, losses: list[float], lr: float) -> None:
        record = {"step": step, "lr": lr, "losses": losses}
        directions = getattr(self.optimizer, "last_projected_grads", None)
        if directions:
            record["directions"] = [[int(seed), float(g)] for seed, g in directions]
        self._trajectory.write(json.dumps(record) + "\n")
        self._trajectory.flush()

    def save(self, step: int, job_state: dict[str, Any]) -> None:
        folder = self.run_dir / "checkpoint"
        folder.mkdir(exist_ok=True)
        state = {"step": step, "mode": self.mode, "job": job_state,
                 "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        if self.with_weights:
            from safetensors.torch import save_file

            weights = {n: p.detach().contiguous().cpu() for n, p in trained_parameters(self.model).items()}
            save_file(weights, str(self.run_dir / f"{WEIGHTS}.tmp"))
            os.replace(self.run_dir / f"{WEIGHTS}.tmp", self.run_dir / WEIGHTS)
        torch.save(state, self.run_dir / f"{STATE}.tmp")
        os.replace(self.run_dir / f"{STATE}.tmp", self.run_dir / STATE)

    @staticmethod
    def load_state(run_dir: Path) -> dict[str, Any] | None:
        path = Path(run_dir) / STATE
        return torch.load(path, weights_only=False) if path.exists() else None

    @torch.no_grad()
    def restore_weights(self) -> None:
        from safetensors import safe_open

        params = trained_parameters(self.model)
        with safe_open(str(self.run_dir / WEIGHTS), framework="pt") as saved:
            for name in saved.keys():
                params[name].copy_(saved.get_tensor(name))

    def finish(self) -> None:
        """A completed run keeps its trajectory (for zobench-replay), not its bulky weights."""
        (self.run_dir / WEIGHTS).unlink(missing_ok=True)

    def close(self) -> None:
        self._trajectory.close()
