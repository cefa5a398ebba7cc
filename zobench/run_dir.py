"""The run directory: the one object that owns a run's folder and the rules for what is in it.

- Recognised by its marker `.zobench-run`, the first file zobench writes into a folder. zobench writes only
  into a folder that holds its marker, or that is new or empty (Hydra's own `.hydra/` and `zobench.log`
  aside, which Hydra writes before a job starts): a user's folder is refused, never overwritten.
- One writer: the marker is also the lock file. A process holds an exclusive `flock` on it for the job's
  whole lifetime; a second process (a second command on the same `hydra.run.dir`, a resume of a live run)
  is refused with one line. The kernel drops the lock when its process dies, so a killed run's directory
  is never blocked.
- Atomic writes: whole files are written beside their target and renamed over it; appended records
  (log.jsonl, trajectory.jsonl) are counted and hashed as they are written, so a checkpoint pins the
  exact bytes it goes with; a checkpoint is a folder written in full, then swapped in by renames
  (`checkpoint.next` -> `checkpoint`, the old one kept as `checkpoint.old` until the swap is done).
- Nothing is loaded in a way that can run code: state is JSON beside safetensors (`to_plain`/`from_plain`),
  never a pickle.
- Fingerprints of the config and the data sample go into every checkpoint; a resume that does not match
  them, or whose records were edited, truncated or deleted since, is refused.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import ZobenchError

MARKER = ".zobench-run"
OVERRIDES = "overrides.yaml"  # the command line that started the run, for `zobench resume=`
HYDRA_OUTPUTS = frozenset({".hydra", "zobench.log"})  # written by Hydra before our job starts
CHECKPOINT, NEXT, OLD = "checkpoint", "checkpoint.next", "checkpoint.old"
MANIFEST = "state.json"  # written last inside a checkpoint folder: its presence means "complete"
STATE_TENSORS = "state.safetensors"
WEIGHTS = "weights.safetensors"
CHECKPOINT_FORMAT = 1

_held: dict[Path, list] = {}  # locks this process holds: resolved path -> [fd, claims]


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fingerprints: dict[str, str] = {}
        self.saved_fingerprints: dict[str, str] | None = None  # the resumed checkpoint's
        self._records: dict[str, RecordFile] = {}

    # -- ownership -----------------------------------------------------------------------------
    def claim(self) -> "RunDir":
        """Take the lock (reentrant within a process), marking the folder as zobench's first if new."""
        key = self.path.resolve()
        if key in _held:
            _held[key][1] += 1
            return self
        for name in os.listdir(self.path) if self.path.is_dir() else ():
            if (self.path / name).is_symlink() and name in _OWN_NAMES:
                raise ZobenchError(f"{self.path / name} is a symbolic link: zobench does not write through links "
                                   f"in a run directory")
        marker = self.path / MARKER
        if not marker.exists():
            if self.path.exists() and not self.path.is_dir():
                raise ZobenchError(f"{self.path} is a file, not a run directory")
            foreign = sorted(set(os.listdir(self.path)) - HYDRA_OUTPUTS) if self.path.is_dir() else []
            if foreign:
                raise ZobenchError(f"{self.path} is not a zobench run directory (no {MARKER}; it holds "
                                   f"{', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}): zobench never "
                                   f"writes into a folder it did not create; choose a new or empty hydra.run.dir")
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(marker, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            raise ZobenchError(f"cannot open {marker}: {error.strerror}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ZobenchError(f"{self.path} is in use by another zobench process (it holds the lock on {MARKER}): "
                               f"wait for it to end, or stop it, then resume") from None
        _held[key] = [fd, 1]
        if os.fstat(fd).st_size == 0:
            note = {"zobench_run_directory": True, "zobench_version": __version__,
                    "created_at": now(),
                    "note": "zobench writes only into folders holding this file; a running job locks it"}
            os.write(fd, (json.dumps(note) + "\n").encode())
            os.fsync(fd)
        self._clean_partial_writes()
        return self

    def release(self) -> None:
        for records in self._records.values():
            records.close()
        self._records.clear()
        key = self.path.resolve()
        if key in _held:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                os.close(_held.pop(key)[0])  # closing the descriptor drops the flock

    def _clean_partial_writes(self) -> None:
        """What a killed or failed write left: temp files, a half-written model or checkpoint folder. A link
        under one of these names is not zobench's: refused, never followed (rmtree, rename, glob into it)."""
        from .safe_files import refuse_link

        for name in (CHECKPOINT, NEXT, OLD, "model.partial"):
            refuse_link(self.path / name)
        for tmp in list(self.path.glob("*.tmp")) + list(self.path.glob(".*.tmp")):
            tmp.unlink(missing_ok=True)  # a link named *.tmp: the link goes, not its target
        shutil.rmtree(self.path / "model.partial", ignore_errors=True)
        current, new, old = self.path / CHECKPOINT, self.path / NEXT, self.path / OLD
        if not current.exists():  # killed between the two renames of a swap: the complete one wins
            for candidate in (new, old):
                if (candidate / MANIFEST).exists():
                    candidate.rename(current)
                    break
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        for tmp in current.glob("*.tmp") if current.is_dir() else ():
            tmp.unlink(missing_ok=True)

    def start(self, config_yaml: str, overrides: list[str] | None) -> None:
        """A fresh run: its config (and the command line `zobench resume=` repeats) before anything else."""
        self.write_text("config.yaml", config_yaml)
        self.fingerprint("config", config_yaml)
        if overrides is not None:
            import yaml

            self.write_text(OVERRIDES, yaml.safe_dump([o for o in overrides if not o.startswith("hydra.run.dir=")]))

    def refuse_leftovers(self) -> None:
        """Records without metrics.json are not this run's: never appended to."""
        left = [name for name in ("log.jsonl", "trajectory.jsonl", CHECKPOINT) if (self.path / name).exists()]
        if left:
            raise ZobenchError(f"{self.path} holds {', '.join(left)} but no metrics.json: zobench does not add to "
                               f"records it cannot account for; start the run in a new folder")

    # -- whole files ---------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_json(self.path / name, data)

    def write_metrics(self, metrics: dict[str, Any], final: bool = False) -> None:
        """metrics.json; the run's last write (`final`) that fails is one line, not a traceback."""
        try:
            self.write_json("metrics.json", metrics)
        except OSError as error:
            if not final:
                raise
            raise ZobenchError(f"could not record the run's end ({metrics.get('status')}) in "
                               f"{self.path / 'metrics.json'}: {error}") from error

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON object of the folder (metrics.json), read by safe_files' rules: a regular file, size and
        depth limits; None if there is none."""
        from . import safe_files

        path = self.path / name
        try:
            data = safe_files.read_json(path)
        except FileNotFoundError:
            return None
        except safe_files.InvalidJson as error:
            raise ZobenchError(f"{error}; zobench cannot tell what this run did") from None
        if not isinstance(data, dict):
            raise ZobenchError(f"{path} does not hold a JSON object")
        return data

    def save_folder(self, name: str, write) -> Path:
        """A folder written in full as NAME.partial by `write(folder)`, then renamed to NAME. An earlier
        NAME of this same unfinished run (it failed after saving) is replaced."""
        from .safe_files import refuse_link

        target, partial = self.path / name, self.path / f"{name}.partial"
        refuse_link(target)  # rmtree and rename would act on the link's folder, save_pretrained write into it
        refuse_link(partial)
        shutil.rmtree(partial, ignore_errors=True)
        try:
            write(partial)
            if target.exists():
                shutil.rmtree(target)
            partial.rename(target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return target

    # -- appended records ----------------------------------------------------------------------
    def records(self, name: str) -> "RecordFile":
        if name not in self._records:
            self._records[name] = RecordFile(self.path / name)
        return self._records[name]

    def marks(self) -> dict[str, dict[str, Any]]:
        return {name: records.mark() for name, records in self._records.items()}

    def rewind(self, marks: dict[str, dict[str, Any]], step: int) -> None:
        """Before a resume: each record file must still begin with the bytes the checkpoint saw; what was
        appended after it is cut (the resumed run writes it again)."""
        for name, mark in marks.items():
            path = self.path / name
            size = path.stat().st_size if path.exists() else -1
            if size < mark["bytes"]:
                what = "was deleted" if size < 0 else "was truncated"
                raise ZobenchError(f"{path} {what} after the checkpoint of step {step} was taken (it held "
                                   f"{mark['bytes']} bytes then): the run's records are incomplete, cannot resume")
            with open(path, "rb") as handle:
                kept = handle.read(mark["bytes"])
            if hashlib.sha256(kept).hexdigest() != mark["sha256"]:
                raise ZobenchError(f"{path} was edited after the checkpoint of step {step} was taken: "
                                   f"cannot resume from records that do not match")
            os.truncate(path, mark["bytes"])

    # -- fingerprints --------------------------------------------------------------------------
    def fingerprint(self, what: str, value: Any) -> None:
        """Remember what this run is made of; on a resume, refuse what differs from the checkpoint's."""
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        self.fingerprints[what] = digest
        saved = (self.saved_fingerprints or {}).get(what)
        if saved is not None and saved != digest:
            raise ZobenchError(f"the {what} of {self.path} changed since its checkpoint was taken "
                               f"({'the data files were edited' if what == 'data' else 'edited'}): "
                               f"resuming would mix two runs; start a new run")

    # -- the checkpoint ------------------------------------------------------------------------
    def save_checkpoint(self, step: int, state: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write a whole checkpoint into checkpoint.next, then swap it in: a kill at any point leaves one
        complete checkpoint, old or new (see _clean_partial_writes)."""
        from safetensors.torch import save_file

        current, new, old = self.path / CHECKPOINT, self.path / NEXT, self.path / OLD
        shutil.rmtree(new, ignore_errors=True)
        try:
            new.mkdir()
            files = {}
            for name, named in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, str(new / name),
                          metadata={"step": str(step)})
                files[name] = {"bytes": (new / name).stat().st_size}
            _write_synced(new / MANIFEST, json.dumps({"format": CHECKPOINT_FORMAT, "step": step, "files": files,
                                                      "state": state}) + "\n")
            _sync_dir(new)
            if current.exists():
                current.rename(old)
            new.rename(current)
            _sync_dir(self.path)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise

    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, Path]] | None:
        """(state, {file name: path}) of the checkpoint, each file checked against the manifest; None if
        there is none."""
        folder = self.path / CHECKPOINT
        if (folder / "state.pt").exists() and not (folder / MANIFEST).exists():
            raise ZobenchError(f"{folder / 'state.pt'} is a checkpoint of an older zobench (a pickle, which "
                               f"zobench never loads: it could run code); start a new run")
        manifest_path = folder / MANIFEST
        if not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            step, files, state = int(manifest["step"]), dict(manifest["files"]), manifest["state"]
            if manifest.get("format") != CHECKPOINT_FORMAT or not isinstance(state, dict):
                raise ValueError(f"format {manifest.get('format')!r}")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            raise ZobenchError(f"{manifest_path} is not a readable zobench checkpoint ({error}); "
                               f"cannot resume") from None
        paths = {}
        for name, expected in files.items():
            path = folder / Path(name).name  # names from a file never leave the folder
            size = path.stat().st_size if path.exists() else -1
            if size != expected.get("bytes"):
                raise ZobenchError(f"{path} is {'missing' if size < 0 else 'truncated or replaced'} "
                                   f"(expected {expected.get('bytes')} bytes): cannot resume")
            saved_step = safetensors_step(path)
            if saved_step != step:
                raise ZobenchError(f"{path} belongs to step {saved_step}, the checkpoint to step {step}: "
                                   f"cannot resume from a mixed checkpoint")
            paths[Path(name).name] = path
        self.saved_fingerprints = state.get("fingerprints")
        return state, paths


def claim_named_run_dir(argv: list[str]) -> None:
    """The CLI's claim of an explicit `hydra.run.dir=DIR` (a resume's too), taken before Hydra writes its
    .hydra/ and zobench.log there; the job's own claim reuses it."""
    if any(arg in ("-m", "--multirun") for arg in argv):
        return  # each job of a sweep claims its own folder
    if any(arg.split("=")[0] in ("-c", "--cfg", "-h", "--help", "--hydra-help", "--info", "-i") for arg in argv):
        return  # Hydra prints something and runs no job
    named = [arg.split("=", 1)[1] for arg in argv if arg.startswith("hydra.run.dir=")]
    if named and "${" not in named[-1]:
        RunDir(Path(named[-1]).expanduser()).claim()


class RecordFile:
    """An append-only file of lines, flushed at once, whose length and SHA-256 are kept as it grows.

    Opened once, for reading and appending, by safe_files.open_for_write: never through a link, never a
    FIFO or device; what a resumed run's file already holds is hashed through that same descriptor."""

    def __init__(self, path: Path):
        from . import safe_files

        self.path = Path(path)
        self._hash = hashlib.sha256()
        self.bytes = 0
        self._handle = safe_files.open_for_write(self.path, "a+b")
        try:
            size = os.fstat(self._handle.fileno()).st_size
            if size > safe_files.RECORDS_LIMIT:
                raise ZobenchError(f"{self.path} is {size:,} bytes, more than the {safe_files.RECORDS_LIMIT:,} "
                                   f"zobench reads from a record file: not a file zobench wrote")
            self._handle.seek(0)
            for chunk in iter(lambda: self._handle.read(1 << 20), b""):
                self._hash.update(chunk)
                self.bytes += len(chunk)
        except BaseException:
            self._handle.close()
            raise

    def write_line(self, line: str) -> None:
        data = (line + "\n").encode()
        self._handle.write(data)  # O_APPEND: at the end, wherever reading left the position
        self._handle.flush()
        self._hash.update(data)
        self.bytes += len(data)

    def mark(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self._hash.hexdigest()}

    def close(self) -> None:
        self._handle.close()


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
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"$tensor": key}
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
        return tensors[value["$tensor"]]
    if "$ndarray" in value:
        return tensors[value["$ndarray"]].numpy().astype(np.dtype(value["dtype"]))
    if "$tuple" in value:
        return tuple(from_plain(v, tensors) for v in value["$tuple"])
    if "$items" in value:
        return {_hashable(from_plain(k, tensors)): from_plain(v, tensors) for k, v in value["$items"]}
    return {k: from_plain(v, tensors) for k, v in value.items()}


# -- atomic whole-file writes ------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target. A target that is a link is
    refused (the rename would replace the link, but a link there is not zobench's)."""
    path = Path(path)
    from .safe_files import refuse_link

    refuse_link(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from colleagues on a shared server
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=jsonable) + "\n")


def now() -> str:
    """UTC, to the second: the marker's created_at, metrics.json's started_at / finished_at."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safetensors_step(path: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as saved:
            step = (saved.metadata() or {}).get("step")
        return int(step) if step is not None else None
    except Exception as error:  # safetensors' own errors: a corrupt header
        raise ZobenchError(f"{path} is not a readable safetensors file ({error}); cannot resume") from None


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


# Files a run directory's writer creates; none of them may be a link into somewhere else.
_OWN_NAMES = frozenset({MARKER, "config.yaml", "overrides.yaml", "metrics.json", "log.jsonl", "trajectory.jsonl",
                        CHECKPOINT, NEXT, OLD, "model", "model.partial", "best_weights.safetensors"})
