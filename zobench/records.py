"""What a run leaves behind: config.yaml, metrics.json and log.jsonl, written so a kill never half-writes.

Peak memory: on CUDA torch.cuda.max_memory_allocated (reset at the start of the run); on CPU the
process's high-water mark VmHWM from /proc/self/status (ru_maxrss elsewhere) — one process per run.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .paths import PACKAGE_DIR

STATUSES = ("running", "completed", "failed", "diverged", "interrupted")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
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
    atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class JsonlLog:
    """Append-only; each record is one line, flushed at once, so a killed run keeps every full line.

    Trackers (zobench/loggers.py, `logger=...`) attached to it get the same records, then the final metrics.
    A tracker that fails is switched off with a warning: it never costs the run its own records.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = open(self.path, "a", buffering=1)
        self.sinks: list = []

    def attach(self, sinks) -> None:
        """Add trackers; the lines already written (a resumed run's) reach them first."""
        self.sinks += list(sinks)
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a killed run's half line
                break
            self._forward("record", record)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=_jsonable)
        self._handle.write(line + "\n")
        self._handle.flush()
        if self.sinks:  # trackers get the line as written (plain JSON values)
            self._forward("record", json.loads(line))

    def finish(self, metrics: dict[str, Any]) -> None:
        self._forward("finish", metrics)
        self.sinks = []

    def close(self) -> None:
        self._handle.close()

    def _forward(self, method: str, payload: dict[str, Any]) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(payload)
            except Exception as error:  # a tracker's failure is not the run's
                logging.getLogger(__name__).warning("logger %s failed (%s: %s); it is switched off",
                                                    type(sink).__name__, type(error).__name__, error)
                self.sinks.remove(sink)


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: the allocator's peak. CPU on Linux: VmHWM back to the current RSS (clear_refs "5"), so a
    job in a reused worker process (joblib's loky) does not report an earlier job's peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:  # not Linux, or not allowed: the process's lifetime peak is what we can give
        pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, how measured)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "process_vmhwm"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_maxrss"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """perf_counter seconds, the device synchronized first so queued GPU work is counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.now()

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def elapsed(self) -> float:
        return self.now() - self.start
