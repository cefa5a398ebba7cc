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
loss value is refused, not replayed into different weights. Step 1's line names where z was drawn ("z": the
engine's z_source(), e.g. "cuda (NVIDIA H100 80GB HBM3, 132 SMs), float16"): a resume or a replay whose engine
draws z otherwise is refused (`check_z_source`, exit 2), as the same losses would build other weights.

The format is this module's: `write_checkpoint` / `read_checkpoint` (the folder's safetensors files and their
manifest), `check_manifest` (every value of a received state.json of its type and range), `to_plain` /
`from_plain` (state as JSON beside tensors). The run directory only swaps the folder in whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .best_weights import FILE as BEST_WEIGHTS
from .errors import RefusedInput, ZobenchError
from .models import trained_parameters
from .parallel import sharded_checkpoint as shards
from .parallel.world import World
from .run_dir import CHECKPOINT, HEX_DIGITS, MANIFEST, MARKER, RunDir, atomic_write_text, file_sha256
from .safe_files import read_json
from .tensor_files import write_safetensors

TRAJECTORY = "trajectory.jsonl"
STATE_TENSORS = "state.safetensors"
WEIGHTS = "weights.safetensors"
log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 2  # 2: every file's SHA-256 and the run id recorded (1 had sizes only)


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
    from .progress import Counted

    recorded_loss, stub = optimizer.loss_fn, ReplayLoss()
    optimizer.loss_fn = stub
    try:
        with Counted("replaying the trajectory", len(records), "step") as progress:  # hours of steps on 66B
            for record in records:
                stub.values = list(record["losses"])
                optimizer.step(None)
                if stub.values:
                    raise RuntimeError(f"step {record['step']}: the optimizer used fewer loss values than recorded")
                if on_step is not None:
                    on_step(record["step"])
                progress.update()
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
            if not (isinstance(step, int) and isinstance(losses, list) and isinstance(record.get("z", ""), str)):
                raise TypeError("step, losses or z of the wrong type")
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
    """Records each step's trajectory line and saves/loads checkpoints through the run directory.

    Under torchrun (`world`) every rank calls save and restore; rank 0 alone writes the checkpoint, each rank's
    shards of an FSDP2 model included (parallel/sharded_checkpoint.py); a rank without a run directory of its
    own (`directory` None) records no trajectory."""

    def __init__(self, directory: RunDir | None, model, optimizer, save_weights: bool, world: World | None = None):
        self.directory = directory
        self.model, self.optimizer = model, optimizer
        self.world = world or World()
        self.sharded = self.world.distributed and shards.is_sharded(model)
        self.with_weights = save_weights or not getattr(optimizer, "replayable", False)
        self._trajectory = directory.records(TRAJECTORY) if directory is not None else None  # rank 0's alone
        earlier = read_trajectory(directory.path) if directory is not None else []  # a resumed run's, rewound
        self._previous = earlier[-1]["check"] if earlier else ""  # the chain goes on from its last line
        engine = perturbation_engine(optimizer)
        # noted on step 1's line: a resume goes on only where z is drawn the same way (check_z_source)
        self._z_source = engine.z_source() if engine is not None and not earlier else None

    @property
    def mode(self) -> str:
        return "weights" if self.with_weights else "trajectory"

    def record_step(self, step: int, losses: list[float], lr: float) -> None:
        if self._trajectory is None:  # not rank 0
            return
        record = {"step": step, "lr": lr, "losses": losses}
        directions = getattr(self.optimizer, "last_projected_grads", None)
        if directions:
            record["directions"] = [[int(seed), float(g)] for seed, g in directions]
        if self._z_source is not None:
            record["z"], self._z_source = self._z_source, None
        record["check"] = self._previous = _check(self._previous, record)
        self._trajectory.write_line(json.dumps(record))

    def pending_step(self) -> bool:
        """Did a step start (its loss computed) that was never recorded? (a step that raised)"""
        return bool(getattr(getattr(self.optimizer, "loss_fn", None), "values", None))

    def save(self, step: int, job_state: dict[str, Any]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        directory = self.directory
        state = to_plain({"step": step, "mode": self.mode, "job": job_state,
                          "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                          "fingerprints": dict(directory.fingerprints) if directory is not None else {},
                          "records": directory.marks() if directory is not None else {}}, tensors)
        files: dict[str, Any] = {STATE_TENSORS: tensors}
        if self.with_weights:
            files[WEIGHTS] = dict(trained_parameters(self.model))
        if self.sharded:  # each rank's local shards, gathered file by file to rank 0
            state["shards"] = self.world.size
            files = shards.gather_files(files, self.world)
        if self.world.main:  # DDP's replicas are rank 0's: it saves them as one process does
            write_checkpoint(directory, step, state, files)

    @staticmethod
    def load_state(directory: RunDir, world: World | None = None) -> dict[str, Any] | None:
        """The checkpoint's state (tensors in place), checked file by file; None if there is none. Under torchrun
        (`world`) every rank reads its copy of the run folder and takes its own shards."""
        loaded = read_checkpoint(directory)
        if loaded is None:
            return None
        plain, paths = loaded
        paths = shards.own_files(plain, paths, world or World())
        from safetensors import safe_open

        try:  # tensor by tensor, each onto the device it was saved from (to_plain): no host copy of the state
            with safe_open(str(paths[STATE_TENSORS]), framework="pt") as saved:
                state = from_plain(plain, _Lazy(saved.get_tensor))
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
        records = read_trajectory(self.directory.path, up_to=step)
        check_z_source(self.optimizer, records, self.directory.path / TRAJECTORY, "resume the run")
        if state["mode"] == "weights":
            if state.get("shards", 1) != (self.world.size if self.sharded else 1):
                raise ZobenchError(f"checkpoint/state.json: the checkpoint holds the shards of {state.get('shards', 1)}"
                                   f" rank(s), this run {self.world.size if self.sharded else 1}: resume with the "
                                   f"same world size and parallel.fo as saved")
            self.restore_weights(state["weights_path"])
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
                raise ZobenchError(f"{self.directory.path / 'checkpoint' / 'state.json'}: its optimizer state "
                                   f"does not fit this optimizer ({type(error).__name__}: {error}); cannot "
                                   f"resume") from None
            best_kept = best_step is None or best.adopt_saved(best_step, state["job"].get("best_weights"))
        else:  # the trajectory rebuilds the weights, and the best-on-dev copy on the way
            if len(records) != step:
                path = self.directory.path / TRAJECTORY
                raise ZobenchError(f"{path} {'is missing' if not path.exists() else f'holds {len(records)} steps'}, "
                                   f"the checkpoint {step}; cannot resume")
            replay(self.optimizer, records, on_step=lambda s: best.save(s) if s == best_step else None)
        torch.set_rng_state(state["torch_rng"])
        return best_kept

    @torch.no_grad()
    def restore_weights(self, path: Path) -> None:
        """The saved weights back into the model (sharded: this rank's shards, from its own file)."""
        from safetensors import safe_open

        if path is None:
            raise ZobenchError(f"{self.directory.path / 'checkpoint'} holds no weights.safetensors; cannot resume")
        params = {name: shards.local(p) for name, p in trained_parameters(self.model).items()}
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
        """A completed run's checkpoint tensors are of no use again: a completed run is never resumed,
        zobench-replay rebuilds from trajectory.jsonl and the report reads metrics.json and log.jsonl. The
        weights and the optimizer state (Adam: twice the trained weights) go; state.json stays, kilobytes of
        counters and scalar state (the loss scale) as a record. Called once metrics.json says completed, so a
        stop before leaves a resumable run; a deletion that fails leaves the run completed, with a warning."""
        folder = self.directory.path / CHECKPOINT
        if folder.is_symlink():  # not zobench's folder: nothing is deleted through a link
            return
        try:
            for name in (STATE_TENSORS, WEIGHTS):
                (folder / name).unlink(missing_ok=True)
        except OSError as error:
            log.warning("could not delete the completed run's checkpoint tensors in %s (%s)", folder,
                        error.strerror or error)


def perturbation_engine(optimizer):
    """The optimizer's ZO engine (Addax's in its zeroth-order half), or None: a first-order method draws no z."""
    engine = getattr(optimizer, "engine", None)
    return engine if engine is not None else getattr(getattr(optimizer, "zo", None), "engine", None)


def check_z_source(optimizer, records: list[dict[str, Any]], path: Path, doing: str) -> None:
    """Refuses, in one line naming both, to go on from `records` with an engine that draws z otherwise than
    their steps did (another device, GPU model or dtype): the same losses would move other weights."""
    engine = perturbation_engine(optimizer)
    recorded = sorted({record["z"] for record in records if "z" in record})
    if engine is None or not recorded:  # no z, or a trajectory of a zobench that did not record it
        return
    here = engine.z_source()
    other = [source for source in recorded if source != here]
    if other:
        raise RefusedInput(f"{path} drew z with {other[0]}, this machine draws it with {here}: the same losses "
                           f"would move other weights, so zobench does not {doing} here; {doing} where it ran (same "
                           f"device, GPU model and dtype), or start runs that must move between machines with "
                           f"precision.zo_generator=portable")


# -- the checkpoint folder: safetensors files and their manifest (state.json) -----------------------------
def write_checkpoint(directory: RunDir, step: int, state: dict[str, Any],
                     tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """A whole checkpoint, swapped in by the run directory: each safetensors file (with the run id and step in
    its metadata), then the manifest with each file's size and SHA-256 and the run id, written last. Tensors
    go to disk one at a time from wherever they live (tensor_files): host memory never holds the model."""
    def write(folder: Path) -> None:
        files = {}
        for name, named in tensors.items():
            named = shards.tensors_of(named)  # a rank's shards arrive as rank 0 writes them
            size, digest = write_safetensors(folder / name, named, directory.file_metadata(step))
            files[name] = {"bytes": size, "sha256": digest}
        atomic_write_text(folder / MANIFEST, json.dumps({"format": CHECKPOINT_FORMAT, "run_id": directory.run_id,
                                                         "step": step, "files": files, "state": state}) + "\n")

    directory.swap_in_checkpoint(write)


def read_checkpoint(directory: RunDir) -> tuple[dict[str, Any], dict[str, Path]] | None:
    """(state, {file name: path}) of the checkpoint, each file checked against the manifest (size,
    SHA-256, run id, step); None if there is none."""
    folder = directory.path / CHECKPOINT
    if (folder / "state.pt").exists() and not (folder / MANIFEST).exists():
        raise ZobenchError(f"{folder / 'state.pt'} is a checkpoint of an older zobench (a pickle, which "
                           f"zobench never loads: it could run code); start a new run")
    manifest_path = folder / MANIFEST
    if not manifest_path.exists() and not manifest_path.is_symlink():
        return None
    step, files, state = check_manifest(read_json(manifest_path), manifest_path, directory.run_id)
    paths = {}
    for name, expected in files.items():
        path = folder / name
        size = path.stat().st_size if path.exists() else -1
        if size != expected["bytes"]:
            raise ZobenchError(f"{path} is {'missing' if size < 0 else 'truncated or replaced'} "
                               f"(expected {expected['bytes']} bytes): cannot resume")
        if file_sha256(path) != expected["sha256"]:
            raise ZobenchError(f"{path} does not match the SHA-256 its checkpoint recorded: the file is "
                               f"corrupt or was modified; cannot resume")
        directory.check_own_file(path, step)
        paths[name] = path
    directory.saved_fingerprints = state.get("fingerprints")
    return state, paths


# -- the checkpoint manifest's shape: a crafted state.json is one line, not an OverflowError later ---------
_MAX_COUNT = 10 ** 18  # steps, bytes, passes, tokens: far above any real run, far below float trouble
_MAX_RANKS = 1 << 16  # ranks of a sharded checkpoint: each names two files in the manifest
_COUNTS = ("steps", "forward_passes", "backward_passes", "tokens", "eval_forward_passes")


class _Bad(ValueError):
    """A manifest value of the wrong shape: (its key, what it should be)."""


def check_manifest(manifest: Any, path: Path, run_id: str | None) -> tuple[int, dict[str, dict], dict[str, Any]]:
    """(step, files, state) of a checkpoint's state.json once every value zobench uses is of its type and
    range; anything else is refused in one line naming the key."""
    try:
        _expect(manifest, dict, "the file")
        if manifest.get("format") == 1:
            raise ZobenchError(f"{path} is a checkpoint of an older zobench (no file hashes, no run id): it "
                               f"cannot be checked; start a new run")
        if manifest.get("format") != CHECKPOINT_FORMAT or isinstance(manifest.get("format"), bool):
            raise _Bad("format", f"{CHECKPOINT_FORMAT}")
        step = _count(manifest.get("step"), "step")
        files = _expect(manifest.get("files"), dict, "files")
        state = _expect(manifest.get("state"), dict, "state")
        ranks = state.get("shards", 1)  # an FSDP2 run's: a file per rank and kind
        if not isinstance(ranks, int) or isinstance(ranks, bool) or not 1 <= ranks <= _MAX_RANKS:
            raise _Bad("state.shards", f"an integer from 1 to {_MAX_RANKS}")
        names = [shards.rank_file(n, r) for r in range(ranks) for n in (STATE_TENSORS, WEIGHTS)] if ranks > 1 \
            else [STATE_TENSORS, WEIGHTS]
        if not set(names[0::2]) <= set(files) <= set(names):
            raise _Bad("files", f"{' '.join(names[0::2])} and at most {' '.join(names[1::2])}")
        for name, entry in files.items():
            _file_entry(entry, f"files.{name}")
        if state.get("step") != step or isinstance(state.get("step"), bool):
            raise _Bad("state.step", f"the manifest's step {step}")
        if state.get("mode") not in ("weights", "trajectory"):
            raise _Bad("state.mode", "'weights' or 'trajectory'")
        held = set(names[1::2]) & set(files)
        if held != (set(names[1::2]) if state["mode"] == "weights" else set()):
            raise _Bad("files", f"{' '.join(names[1::2])} exactly when state.mode is 'weights'")
        for name, entry in _expect(state.get("records"), dict, "state.records").items():
            if name not in ("log.jsonl", "trajectory.jsonl"):
                raise _Bad(f"state.records.{name}", "log.jsonl or trajectory.jsonl")
            _file_entry(entry, f"state.records.{name}")
        for name, digest in _expect(state.get("fingerprints"), dict, "state.fingerprints").items():
            _sha256(digest, f"state.fingerprints.{name}")
        rng = _expect(state.get("torch_rng"), dict, "state.torch_rng")
        _expect(rng.get("$tensor"), str, "state.torch_rng")
        _expect(state.get("optimizer"), dict, "state.optimizer")
        _check_job(_expect(state.get("job"), dict, "state.job"))
    except _Bad as bad:
        key, should = bad.args
        raise ZobenchError(f"{path} is not a checkpoint zobench wrote: {key} must be {should}; cannot "
                           f"resume") from None
    if manifest.get("run_id") != run_id:
        raise ZobenchError(f"{path} belongs to another run (run id {str(manifest.get('run_id'))[:40]!r}, this run "
                           f"{run_id}, see {path.parent.parent / MARKER}): zobench does not resume from another "
                           f"run's checkpoint; remove it or start a new run")
    return step, files, state


def _check_job(job: dict[str, Any]) -> None:
    metrics = _expect(job.get("metrics"), dict, "state.job.metrics")
    for key in _COUNTS:
        _count(metrics.get(key), f"state.job.metrics.{key}")
    if metrics.get("best_step") is not None:
        _count(metrics["best_step"], "state.job.metrics.best_step")
    counter = _expect(job.get("counter"), dict, "state.job.counter")
    if set(counter) != {"forward_passes", "backward_passes", "tokens"}:  # zobench.objective.PassCounter's
        raise _Bad("state.job.counter", "an object of forward_passes, backward_passes and tokens")
    for key, value in counter.items():
        _count(value, f"state.job.counter.{key}")
    _count(job.get("eval_tokens"), "state.job.eval_tokens")
    _number(job.get("best_score"), "state.job.best_score", finite=False)
    seconds = _expect(job.get("seconds"), dict, "state.job.seconds")
    for key in ("total", "train"):
        _number(seconds.get(key), f"state.job.seconds.{key}")
    for index, loss in enumerate(_expect(job.get("recent_losses"), list, "state.job.recent_losses")):
        _number(loss, f"state.job.recent_losses[{index}]")
    if job.get("early_stop"):  # zobench.early_stopping.EarlyStopping.state_dict()
        stop = _expect(job["early_stop"], dict, "state.job.early_stop")
        _count(stop.get("bad_evaluations"), "state.job.early_stop.bad_evaluations")
        for key in ("best_step", "stopped_at"):
            if stop.get(key) is not None:
                _count(stop[key], f"state.job.early_stop.{key}")
        if stop.get("best") is not None:
            _number(stop["best"], "state.job.early_stop.best", finite=False)
    best = job.get("best_weights")
    if best is not None:
        _expect(best, dict, "state.job.best_weights")
        _count(best.get("step"), "state.job.best_weights.step")
        if "files" in best:  # FSDP2: a file per rank (best_weights.py), named as it names them
            files = _expect(best["files"], dict, "state.job.best_weights.files")
            ranks = range(min(len(files), _MAX_RANKS))
            if set(files) != {shards.rank_file(BEST_WEIGHTS, r) for r in ranks}:
                raise _Bad("state.job.best_weights.files", "best_weights.rank<r>.safetensors for r = 0, 1, …")
            for name, entry in files.items():
                _file_entry(entry, f"state.job.best_weights.files.{name}")
        else:
            _sha256(best.get("sha256"), "state.job.best_weights.sha256")


def _expect(value: Any, kind: type, key: str) -> Any:
    if not isinstance(value, kind):
        raise _Bad(key, {dict: "an object", list: "a list", str: "a string"}.get(kind, kind.__name__))
    return value


def _count(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_COUNT:
        raise _Bad(key, f"an integer from 0 to {_MAX_COUNT:.0e}")
    return value


def _number(value: Any, key: str, finite: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
            (finite and not math.isfinite(value)):
        raise _Bad(key, "a finite number" if finite else "a number")


def _sha256(value: Any, key: str) -> None:
    if not (isinstance(value, str) and len(value) == 64 and set(value) <= HEX_DIGITS):
        raise _Bad(key, "a SHA-256 (64 hex digits)")


def _file_entry(entry: Any, key: str) -> None:
    _expect(entry, dict, key)
    _count(entry.get("bytes"), f"{key}.bytes")
    _sha256(entry.get("sha256"), f"{key}.sha256")


# -- state as JSON + tensors: nothing in it can run code when read --------------------------------
def to_plain(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of optimizer/job state; tensors (and numpy arrays, e.g. RandomState's) move into
    `tensors` and are referred to by key."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):  # left where it is: the writer streams it to disk (tensor_files)
        key = f"t{len(tensors)}"
        value = shards.local(value).detach()  # an FSDP2 shard: this rank's part
        tensors[key] = value
        return {"$tensor": key, **({"device": str(value.device)} if value.device.type != "cpu" else {})}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        wide = np.int64 if value.dtype.kind in "iub" else np.float64
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value.astype(wide)))
        return {"$ndarray": key, "dtype": value.dtype.str}
    if isinstance(value, tuple):
        return {"$tuple": [to_plain(v, tensors) for v in value]}
    if isinstance(value, (list, deque)):
        return [to_plain(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: to_plain(v, tensors) for k, v in value.items()}
        return {"$items": [[to_plain(k, tensors), to_plain(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def from_plain(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [from_plain(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return tensors[value["$tensor"]].to(_saved_device(value.get("device")))
    if "$ndarray" in value:
        return tensors[value["$ndarray"]].numpy().astype(np.dtype(value["dtype"]))
    if "$tuple" in value:
        return tuple(from_plain(v, tensors) for v in value["$tuple"])
    if "$items" in value:
        return {_hashable(from_plain(k, tensors)): from_plain(v, tensors) for k, v in value["$items"]}
    return {k: from_plain(v, tensors) for k, v in value.items()}


class _Lazy:
    """A mapping that loads a tensor when it is asked for (from_plain asks once per tensor)."""

    def __init__(self, load):
        self.load = load

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.load(key)


def _saved_device(name: Any) -> torch.device:
    """The CUDA device a state tensor was saved from, if this machine has it; else the host (as before)."""
    if isinstance(name, str) and name.startswith("cuda") and torch.cuda.is_available():
        try:
            device = torch.device(name)
        except RuntimeError:
            return torch.device("cpu")
        if device.index is None or device.index < torch.cuda.device_count():
            return device
    return torch.device("cpu")


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key
