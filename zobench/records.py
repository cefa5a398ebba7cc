"""What a run leaves behind: log.jsonl (appended through zobench/run_dir.py's RecordFile), the clocks and
peak memory recorded in metrics.json.

Peak memory: on CUDA torch.cuda.max_memory_allocated (reset at the start of the run); on CPU the
process's high-water mark VmHWM from /proc/self/status (ru_maxrss elsewhere) — one process per run.
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .paths import PACKAGE_DIR
from .run_dir import RecordFile, jsonable, now
from .safe_files import read_jsonl

STATUSES = ("running", "completed", "failed", "diverged", "interrupted")


class JsonlLog:
    """Append-only; each record is one line, flushed at once, so a killed run keeps every full line.

    Trackers (zobench/loggers.py, `logger=...`) attached to it get the same records, then the final metrics.
    A tracker that fails is switched off with a warning: it never costs the run its own records.
    """

    def __init__(self, path: Path | RecordFile):
        self._file = path if isinstance(path, RecordFile) else RecordFile(Path(path))
        self.path = self._file.path
        self.sinks: list = []

    def attach(self, sinks) -> None:
        """Add trackers; the lines already written (a resumed run's) reach them first."""
        self.sinks += list(sinks)
        for record in read_jsonl(self.path):  # a received file: safe_files' rules
            if record is None:  # a killed run's half line
                break
            self._forward("record", record)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=jsonable)
        self._file.write_line(line)
        if self.sinks:  # trackers get the line as written (plain JSON values)
            self._forward("record", json.loads(line))

    def finish(self, metrics: dict[str, Any]) -> None:
        self._forward("finish", metrics)
        self.sinks = []

    def close(self) -> None:
        self._file.close()

    def _forward(self, method: str, payload: dict[str, Any]) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(payload)
            except Exception as error:  # a tracker's failure is not the run's
                logging.getLogger(__name__).warning("logger %s failed (%s: %s); it is switched off",
                                                    type(sink).__name__, type(error).__name__, error)
                self.sinks.remove(sink)


def initial_metrics(cfg, run_dir: Path) -> dict[str, Any]:
    """metrics.json as a job starts: every key of the run contract (DESIGN.md), filled in as the run goes."""
    from omegaconf import OmegaConf

    from . import __version__

    return {
        "task": cfg.task.name, "model": cfg.model.name, "optimizer": cfg.optimizer.name,
        "seed": int(cfg.seed), "data_seed": int(cfg.data.seed), "status": "running", "error": None,
        "peft": OmegaConf.select(cfg, "peft.name", default="none"),
        "icl_k": int(OmegaConf.select(cfg, "icl.k", default=0)),
        "metric": cfg.task.metric, "test_metric": None, "dev_metric": None, "dev_loss": None,
        "test_scores": None, "best_step": None, "steps": 0, "steps_planned": int(cfg.train.steps),
        "forward_passes": 0, "backward_passes": 0, "tokens": 0, "eval_forward_passes": 0,
        "wall_clock_s": None, "train_wall_clock_s": None, "peak_memory_bytes": None,
        "peak_memory_method": None, "device": None, "dtype": None, "precision": None, "n_params": None,
        "n_trainable_params": None,
        "data_source": None, "n_train": None, "n_dev": None, "n_test": None, "truncated": None,
        "zobench_version": __version__, "git_revision": git_revision(), "run_dir": str(run_dir),
        "started_at": now(), "finished_at": None, "resumed_at_step": None,
        "stopped_early_at": None, "stop_reason": None,
    }


def final_figures(metrics: dict[str, Any], total_s: float, device: torch.device) -> dict[str, Any]:
    """The clock, peak memory and throughput metrics.json ends with."""
    memory, method = peak_memory(device)
    train_s = metrics["train_wall_clock_s"] or 0.0
    return {"wall_clock_s": total_s, "peak_memory_bytes": memory, "peak_memory_method": method,
            "forward_passes_per_s": (metrics["forward_passes"] / train_s) if train_s else None,
            "tokens_per_s": (metrics["tokens"] / train_s) if train_s else None}


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
