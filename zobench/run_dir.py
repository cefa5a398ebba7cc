"""The run directory: the one object that owns a run's folder and the rules for what is in it: ownership, the
lock and atomic I/O, an API on paths (the command line is the CLI's; the checkpoint's format is checkpoint.py's).

- Recognised by its marker `.zobench-run`, the first file zobench writes into a folder. zobench writes only
  into a folder that holds its marker, or that is new or empty (Hydra's own `.hydra/` and `zobench.log`
  aside, which Hydra writes before a job starts): a user's folder is refused, never overwritten.
- One writer: the marker is also the lock file. A process holds an exclusive `flock` on it for the job's
  whole lifetime; a second process (a second command on the same `hydra.run.dir`, a resume of a live run)
  is refused with one line. The kernel drops the lock when its process dies, so a killed run's directory
  is never blocked.
- Atomic writes: whole files are written beside their target and renamed over it (`atomic_write`, the one
  writer of whole files); appended records
  (log.jsonl, trajectory.jsonl) are counted and hashed as they are written, so a checkpoint pins the
  exact bytes it goes with; a checkpoint is a folder written in full, then swapped in by renames
  (`checkpoint.next` -> `checkpoint`, the old one kept as `checkpoint.old` until the swap is done).
- Nothing is loaded in a way that can run code: state is JSON beside safetensors (checkpoint.py's
  `to_plain`/`from_plain`), never a pickle.
- Fingerprints of the config and the data sample go into every checkpoint; a resume that does not match
  them, or whose records were edited, truncated or deleted since, is refused.
- Every file is tied to its run: the marker holds a random run id, written into every checkpoint manifest
  and safetensors file (checkpoint and best weights) with the file's SHA-256; a damaged file, or another
  run's copied in, is refused before it is loaded. metrics.json keeps the run id and config.yaml's SHA-256.
- A run that ended before its first checkpoint has nothing to resume: its command starts it again from
  step 0, what it recorded moved to attempts/N (never overwritten, never appended to).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

from . import __version__, safe_files
from .errors import ZobenchError
from .safe_files import refuse_link

MARKER = ".zobench-run"
OVERRIDES = "overrides.yaml"  # the command line that started the run, for `zobench resume=`
HYDRA_OUTPUTS = frozenset({".hydra", "zobench.log"})  # written by Hydra before our job starts
CHECKPOINT, NEXT, OLD = "checkpoint", "checkpoint.next", "checkpoint.old"
MANIFEST = "state.json"  # written last inside a checkpoint folder: its presence means "complete"
ATTEMPTS = "attempts"  # records of earlier attempts that ended before their first checkpoint
HASH_CHUNK = 16 << 20  # checkpoint files are tens of GB for real models: hashed as a stream
HEX_DIGITS = frozenset("0123456789abcdef")  # of run ids and SHA-256s

_held: dict[Path, list] = {}  # locks this process holds: resolved path -> [fd, claims, run id]


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fingerprints: dict[str, str] = {}
        self.saved_fingerprints: dict[str, str] | None = None  # the resumed checkpoint's
        self.run_id: str | None = None  # from the marker: every checkpoint and best-weights file carries it
        self.config_sha256: str | None = None  # of config.yaml's text: zobench-replay checks it
        self._recorded: tuple | None = None  # (status, steps) of the last metrics.json written
        self._records: dict[str, RecordFile] = {}

    # -- ownership -----------------------------------------------------------------------------
    def claim(self) -> "RunDir":
        """Take the lock (reentrant within a process), marking the folder as zobench's first if new."""
        key = self.path.resolve()
        if key in _held:
            _held[key][1] += 1
            self.run_id = _held[key][2]
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
        except OSError as error:  # ENOLCK, ENOSYS, EOPNOTSUPP: NFS mounted `nolock`, some FUSE file systems
            os.close(fd)
            raise ZobenchError(f"{self.path}: this file system refuses the lock on {MARKER} ({error.strerror}); "
                               f"zobench locks every run folder so two runs never write into one: put "
                               f"hydra.run.dir (hydra.sweep.dir) on a local or lock-capable disk, or mount "
                               f"the NFS share with locking (without `nolock`)") from None
        try:
            self.run_id = _marker_run_id(fd, marker)
        except BaseException:
            os.close(fd)
            raise
        _held[key] = [fd, 1, self.run_id]
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
        self.config_sha256 = text_sha256(config_yaml)
        if overrides is not None:
            import yaml

            self.write_text(OVERRIDES, yaml.safe_dump([o for o in overrides if not o.startswith("hydra.run.dir=")]))

    def refuse_leftovers(self) -> None:
        """Records without metrics.json (a kill between opening log.jsonl and the first metrics.json) are
        never appended to: they move to attempts/N. A checkpoint without metrics.json is refused."""
        if (self.path / CHECKPOINT).exists():
            raise ZobenchError(f"{self.path} holds a checkpoint but no metrics.json: zobench does not add to "
                               f"records it cannot account for; start the run in a new folder")
        self.set_aside_attempt()

    def set_aside_attempt(self) -> str | None:
        """A run that ended before its first checkpoint starts again from step 0 in its folder: what it
        recorded moves to attempts/N (N = 1, 2, …), never overwritten; returns that folder's name."""
        names = [name for name in ("metrics.json", "log.jsonl", "trajectory.jsonl") if (self.path / name).exists()]
        if not names:
            return None
        attempts = self.path / ATTEMPTS
        refuse_link(attempts)
        attempts.mkdir(exist_ok=True)
        number = 1 + max((int(p.name) for p in attempts.iterdir() if p.name.isdigit()), default=0)
        folder = attempts / str(number)
        folder.mkdir()
        for name in names:
            os.rename(self.path / name, folder / name)
        for name in ("config.yaml", OVERRIDES):  # the attempt's command; start() may write another one
            if (self.path / name).is_file() and not (self.path / name).is_symlink():
                shutil.copyfile(self.path / name, folder / name)
        for best in self.path.glob("best_weights*.safetensors"):  # the abandoned attempt's (FSDP2: one per rank)
            best.unlink(missing_ok=True)
        sync_dir(self.path)
        return f"{ATTEMPTS}/{number}"

    def provenance(self) -> dict[str, Any]:
        """What metrics.json records to tie the run's files to it (kept when its checkpoint is gone), and
        the attempts/N folders of its restarts."""
        noted: dict[str, Any] = {"run_id": self.run_id, "config_sha256": self.config_sha256}
        attempts = self.path / ATTEMPTS
        if attempts.is_dir() and not attempts.is_symlink():
            numbers = sorted(int(p.name) for p in attempts.iterdir() if p.name.isdigit())
            noted["earlier_attempts"] = [f"{ATTEMPTS}/{n}" for n in numbers]
        return noted

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
            was = self._recorded
            still = (f"it still says {was[0]!r} at step {was[1]}" if was else "it was never written")
            why = f": {metrics['error']}" if metrics.get("error") else ""
            raise ZobenchError(f"could not record the run's end in {self.path / 'metrics.json'} "
                               f"({error.strerror or error}), {still}; the run itself ended "
                               f"{metrics.get('status')!r} at step {metrics.get('steps')}{why}") from error
        self._recorded = (metrics.get("status"), metrics.get("steps"))

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON object of the folder (metrics.json), read by safe_files' rules: a regular file, size and
        depth limits; None if there is none."""
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

    def disk_bytes(self) -> int:
        """Bytes of the folder's files (apparent sizes, as `du -sb`), links not followed: metrics.json's disk_bytes."""
        total = 0
        for root, _, files in os.walk(self.path):  # linked folders are not descended into
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:  # gone meanwhile (a temp file renamed)
                    pass
        return total

    def holds_completed_run(self) -> bool:
        """Whether metrics.json says `completed`: a result, never resumed, re-run or written over."""
        metrics = self.read_json("metrics.json")
        return metrics is not None and metrics.get("status") == "completed"

    def save_folder(self, name: str, write) -> Path:
        """A folder written in full as NAME.partial by `write(folder)`, then renamed to NAME. An earlier
        NAME of this same unfinished run (it failed after saving) is replaced."""
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
            if file_sha256(path, mark["bytes"]) != mark["sha256"]:
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

    # -- the checkpoint folder: swapped in whole (its format is checkpoint.py's) ------------------------
    def swap_in_checkpoint(self, write) -> None:
        """`write(folder)` fills checkpoint.next (MANIFEST last), which is then swapped in: a kill at any point
        leaves one complete checkpoint, old or new (see _clean_partial_writes)."""
        current, new, old = self.path / CHECKPOINT, self.path / NEXT, self.path / OLD
        shutil.rmtree(new, ignore_errors=True)
        try:
            new.mkdir()
            write(new)
            sync_dir(new)
            if current.exists():
                current.rename(old)
            new.rename(current)
            sync_dir(self.path)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise

    def file_metadata(self, step: int) -> dict[str, str]:
        """The safetensors metadata of a weights file this run writes: whose it is and which step."""
        return {"step": str(step), "run_id": str(self.run_id)}

    def check_own_file(self, path: Path, step: int | None = None) -> int | None:
        """A safetensors file in this run directory must be this run's (its run id): another run's copied in
        is refused in one line. Returns the step its metadata names."""
        metadata = safetensors_metadata(path)
        if metadata.get("run_id") != self.run_id:
            raise ZobenchError(f"{path} belongs to another run (run id {str(metadata.get('run_id'))[:40]!r}, this run "
                               f"{self.run_id}, see {self.path / MARKER}): zobench does not resume from files "
                               f"of another run; remove it or start a new run")
        try:
            saved_step = int(metadata["step"])
        except (KeyError, ValueError):
            raise ZobenchError(f"{path} names no step in its metadata: not a file zobench wrote") from None
        if step is not None and saved_step != step:
            raise ZobenchError(f"{path} belongs to step {saved_step}, the checkpoint to step {step}: "
                               f"cannot resume from a mixed checkpoint")
        return saved_step


def _marker_run_id(fd: int, marker: Path) -> str:
    """The run id in the marker; a new marker (or an older zobench's, without one) gets a random one."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ZobenchError(f"{marker} is not a regular file: not a zobench run directory")
    note: Any = None
    if 0 < info.st_size <= safe_files.MiB:
        try:
            note = safe_files.loads_json(os.pread(fd, info.st_size, 0).decode("utf-8"), marker)
        except (ZobenchError, UnicodeDecodeError):
            note = None
    run_id = note.get("run_id") if isinstance(note, dict) else None
    if isinstance(run_id, str) and len(run_id) == 32 and set(run_id) <= HEX_DIGITS:
        return run_id
    run_id = secrets.token_hex(16)
    created = note.get("created_at") if isinstance(note, dict) and isinstance(note.get("created_at"), str) else now()
    note = {"zobench_run_directory": True, "zobench_version": __version__, "created_at": created[:40],
            "run_id": run_id,
            "note": "zobench writes only into folders holding this file; a running job locks it"}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
    os.fsync(fd)
    return run_id


def claim_for_hydra(path: str | Path) -> RunDir:
    """Claim a run's folder before Hydra writes its .hydra/ and zobench.log there (the CLI's claim; the
    job's own reuses it). Refused before anything is written or created: a link or odd file where Hydra
    writes, a foreign or live folder, a completed run."""
    _refuse_odd_hydra_outputs(Path(path))
    directory = RunDir(path).claim()
    try:
        if directory.holds_completed_run():
            raise ZobenchError(f"{path} already holds a completed run; zobench never overwrites results "
                               f"(its .hydra/ included): choose a new hydra.run.dir")
    except BaseException:
        directory.release()
        raise
    return directory


def refuse_odd_sweep_outputs(sweep_dir: Path) -> None:
    """Hydra writes multirun.yaml, a job's .hydra/ and zobench.log before the job claims its folder: in a
    sweep run again into its folder, none of them may be a link."""
    if sweep_dir.is_dir() and not sweep_dir.is_symlink():
        refuse_link(sweep_dir / "multirun.yaml")
        for job_dir in sorted(sweep_dir.iterdir()):
            refuse_link(job_dir)
            if job_dir.is_dir():
                _refuse_odd_hydra_outputs(job_dir)


def _refuse_odd_hydra_outputs(path: Path) -> None:
    """Hydra appends to zobench.log and rewrites .hydra/*.yaml following links: each must be what Hydra made."""
    hydra_dir = path / ".hydra"
    inside = sorted(hydra_dir.iterdir()) if hydra_dir.is_dir() and not hydra_dir.is_symlink() else []
    for item in [path / "zobench.log", hydra_dir, *inside]:
        refuse_link(item)
        if item.exists() and not (item.is_dir() if item == hydra_dir else item.is_file()):
            raise ZobenchError(f"{item} is not a {'folder' if item == hydra_dir else 'regular file'} as Hydra "
                               f"writes it: zobench does not write into it; remove it or choose another hydra.run.dir")


class RecordFile:
    """An append-only file of lines, flushed at once, whose length and SHA-256 are kept as it grows.

    Opened once, for reading and appending, by safe_files.open_for_write: never through a link, never a
    FIFO or device; what a resumed run's file already holds is hashed through that same descriptor."""

    def __init__(self, path: Path):
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


# -- atomic whole-file writes: the one writer ------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temp file in the target's folder, which is synced and renamed over the target: a
    kill leaves the old file or the new one, never half of one. A target that is a link is refused (the rename
    would replace the link, but a link there is not zobench's)."""
    path = Path(path)
    refuse_link(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from colleagues on a shared server
        _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            handle.write(text)

    atomic_write(path, write)


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    """A folder's entries (a rename in it) on disk."""
    _fsync(path)


def safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ZobenchError(f"{path} is not a regular file: zobench reads only regular files from a run folder")
    try:
        with safe_open(str(path), framework="pt") as saved:
            return dict(saved.metadata() or {})
    except Exception as error:  # safetensors' own errors: a corrupt header
        raise ZobenchError(f"{path} is not a readable safetensors file ({error}); cannot resume") from None


def safetensors_step(path: Path) -> int | None:
    step = safetensors_metadata(path).get("step")
    try:
        return int(step) if step is not None else None
    except ValueError:
        raise ZobenchError(f"{path} names step {step!r} in its metadata: not a file zobench wrote") from None


def file_sha256(path: Path, length: int | None = None) -> str:
    """SHA-256 of a regular file (of its first `length` bytes), read in chunks: never the whole file in memory."""
    digest, left = hashlib.sha256(), math.inf if length is None else length
    fd = safe_files.open_regular(path)  # never waits on a FIFO, refuses a device
    try:
        while left > 0 and (chunk := os.read(fd, int(min(HASH_CHUNK, left)))):
            digest.update(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Files a run directory's writer creates; none of them may be a link into somewhere else.
_OWN_NAMES = frozenset({MARKER, "config.yaml", "overrides.yaml", "metrics.json", "log.jsonl", "trajectory.jsonl",
                        CHECKPOINT, NEXT, OLD, "model", "model.partial", "best_weights.safetensors", ATTEMPTS}) | HYDRA_OUTPUTS
