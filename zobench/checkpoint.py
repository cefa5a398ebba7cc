"""Checkpoints and exact resume.

A zeroth-order run is determined by its initial weights and, step by step, the loss values its
optimizer saw: feeding those values back to the same optimizer code (`ReplayLoss`) redoes every
perturbation, seed draw and update with the same floating-point operations, without a forward pass,
so the weights come back bit for bit. That trajectory (trajectory.jsonl, a line per step: kilobytes)
is the ZO checkpoint; `checkpoint.weights=true` adds the weights for a fast resume. First-order runs
(and any optimizer that needs real gradients) always checkpoint weights + optimizer state. Saved
weights are the trained parameters only (with an adapter: the adapter, not the whole model).

checkpoint/ holds the rest: the step, the run's counters, the best-dev bookkeeping (with the SHA-256 of
best_weights.safetensors), the losses since the last log line, the optimizer's state, the torch RNG state,
the config and data fingerprints and the exact length and hash of log.jsonl and trajectory.jsonl at that
step: JSON (state.json, its shape checked on load) beside safetensors, never a pickle. It is written
after a whole step, never in the middle, and switched in atomically (zobench/run_dir.py).

Each trajectory line carries a checksum chained to the line before ("check"), so an edited or corrupt
loss value is refused, not replayed into different weights.
"""

from __future__ import annotations

import json
import hashlib
from pathlib import Path
from typing import Any

import torch

from .errors import ZobenchError
from .models import trained_parameters
from .run_dir import STATE_TENSORS, WEIGHTS, RunDir, from_plain, to_plain

TRAJECTORY = "trajectory.jsonl"


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


def _check(previous: str, record: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "check"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((previous + body).encode()).hexdigest()[:16]


def read_trajectory(run_dir: Path, up_to: int | None = None) -> list[dict[str, Any]]:
    """Steps 1..up_to in order, each line's checksum verified; a half last line (a killed run's) is dropped."""
    path = Path(run_dir) / TRAJECTORY
    if not path.exists():
        return []
    try:
        from .safe_files import read_jsonl_lines  # a received file: regular, bounded, shallow lines

        lines = read_jsonl_lines(path)
    except UnicodeDecodeError as error:
        raise ZobenchError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    records, previous = [], ""
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step, losses = record["step"], record["losses"]
            if not (isinstance(step, int) and isinstance(losses, list)):
                raise TypeError("step or losses of the wrong type")
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            if number == len(lines):
                break  # a killed run's half line
            raise ZobenchError(f"{path} line {number} is not a trajectory record ({error})") from None
        if record.get("check") != _check(previous, record):
            raise ZobenchError(f"{path} line {number} (step {step}) fails its checksum: the trajectory was "
                               f"edited or is corrupt; zobench will not replay it")
        previous = record["check"]
        if up_to is not None and step > up_to:
            break
        if step != len(records) + 1:
            raise ZobenchError(f"{path} line {number} holds step {step}, expected {len(records) + 1}: "
                               f"not a gapless sequence of steps")
        records.append(record)
    return records


class Checkpointer:
    """Records each step's trajectory line and saves/loads checkpoints through the run directory."""

    def __init__(self, directory: RunDir, model, optimizer, save_weights: bool):
        self.directory = directory
        self.model, self.optimizer = model, optimizer
        self.with_weights = save_weights or not getattr(optimizer, "replayable", False)
        self._trajectory = directory.records(TRAJECTORY)
        self._previous = _last_check(directory.path / TRAJECTORY)

    @property
    def mode(self) -> str:
        return "weights" if self.with_weights else "trajectory"

    def record_step(self, step: int, losses: list[float], lr: float) -> None:
        record = {"step": step, "lr": lr, "losses": losses}
        directions = getattr(self.optimizer, "last_projected_grads", None)
        if directions:
            record["directions"] = [[int(seed), float(g)] for seed, g in directions]
        record["check"] = self._previous = _check(self._previous, record)
        self._trajectory.write_line(json.dumps(record))

    def pending_step(self) -> bool:
        """Did a step start (its loss computed) that was never recorded? (a step that raised)"""
        return bool(getattr(getattr(self.optimizer, "loss_fn", None), "values", None))

    def save(self, step: int, job_state: dict[str, Any]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        state = to_plain({"step": step, "mode": self.mode, "job": job_state,
                          "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                          "fingerprints": dict(self.directory.fingerprints), "records": self.directory.marks()},
                         tensors)
        files = {STATE_TENSORS: tensors}
        if self.with_weights:
            files[WEIGHTS] = dict(trained_parameters(self.model))
        self.directory.save_checkpoint(step, state, files)

    @staticmethod
    def load_state(directory: RunDir) -> dict[str, Any] | None:
        """The checkpoint's state (tensors in place), checked file by file; None if there is none."""
        loaded = directory.load_checkpoint()
        if loaded is None:
            return None
        plain, paths = loaded
        from safetensors.torch import load_file

        try:
            state = from_plain(plain, load_file(str(paths[STATE_TENSORS])))
            state["step"], state["mode"], state["job"]  # noqa: B018  (present)
        except Exception as error:
            raise ZobenchError(f"{paths.get(STATE_TENSORS, directory.path / 'checkpoint')} does not match its "
                               f"state.json ({type(error).__name__}: {error}); cannot resume") from None
        state["weights_path"] = paths.get(WEIGHTS)
        return state

    def restore(self, state: dict[str, Any], best, best_step: int | None) -> bool:
        """Bring model, optimizer and torch RNG to the checkpoint `state`; returns whether the best-on-dev
        weights of `best_step` are still at hand (`best`, a BestWeights)."""
        step, best_kept = state["step"], True
        if state["mode"] != self.mode:
            raise ZobenchError(f"{self.directory.path}: the checkpoint holds a {state['mode']} checkpoint, this "
                               f"run writes {self.mode} checkpoints; cannot resume")
        if state["mode"] == "weights":
            self.restore_weights(state["weights_path"])
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
                raise ZobenchError(f"{self.directory.path / 'checkpoint' / 'state.json'}: its optimizer state "
                                   f"does not fit this optimizer ({type(error).__name__}: {error}); cannot "
                                   f"resume") from None
            best_kept = best_step is None or best.adopt_saved(best_step, state["job"].get("best_weights"))
        else:  # the trajectory rebuilds the weights, and the best-on-dev copy on the way
            records = read_trajectory(self.directory.path, up_to=step)
            if len(records) != step:
                path = self.directory.path / TRAJECTORY
                raise ZobenchError(f"{path} {'is missing' if not path.exists() else f'holds {len(records)} steps'}, "
                                   f"the checkpoint {step}; cannot resume")
            replay(self.optimizer, records, on_step=lambda s: best.save(s) if s == best_step else None)
        torch.set_rng_state(state["torch_rng"])
        return best_kept

    @torch.no_grad()
    def restore_weights(self, path: Path) -> None:
        from safetensors import safe_open

        if path is None:
            raise ZobenchError(f"{self.directory.path / 'checkpoint'} holds no weights.safetensors; cannot resume")
        params = trained_parameters(self.model)
        with safe_open(str(path), framework="pt") as saved:
            if set(saved.keys()) != set(params):
                raise ZobenchError(f"{path} holds other parameters than the model trains; cannot resume")
            for name in saved.keys():
                value = saved.get_tensor(name)
                if value.shape != params[name].shape:
                    raise ZobenchError(f"{path}: {name} has shape {tuple(value.shape)}, the model's "
                                       f"{tuple(params[name].shape)}; cannot resume")
                params[name].copy_(value)

    def finish(self) -> None:
        """A completed run keeps its trajectory (for zobench-replay), not its bulky weights."""
        (self.directory.path / "checkpoint" / WEIGHTS).unlink(missing_ok=True)


def _last_check(path: Path) -> str:
    """The checksum of the trajectory's last whole line (a resume continues the chain from it)."""
    records = read_trajectory(path.parent) if path.exists() else []
    return records[-1]["check"] if records else ""
