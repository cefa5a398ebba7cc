"""What a run leaves behind: the run record (RunRecord: its counters and clocks, log.jsonl appended through
zobench/run_dir.py's RecordFile, and metrics.json, written from its state in one place).

Peak memory: on CUDA torch.cuda.max_memory_allocated (reset at the start of the run); on CPU the
process's high-water mark VmHWM from /proc/self/status (ru_maxrss elsewhere) — one process per run.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import Diverged
from .objective import PassCounter
from .paths import PACKAGE_DIR
from .run_dir import RecordFile, RunDir, jsonable, now
from .safe_files import read_jsonl

STATUSES = ("running", "completed", "failed", "diverged", "interrupted")
PROGRESS_EVERY_S = 30.0  # the least wall-clock between two progress lines: a fast run does not flood a log
log = logging.getLogger(__name__)  # under `zobench`: Hydra's zobench.log and a SLURM job's output show it


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
                log.warning("logger %s failed (%s: %s); it is switched off",
                                                    type(sink).__name__, type(error).__name__, error)
                self.sinks.remove(sink)


class Progress:
    """Training's progress: a tqdm bar on a terminal, and the lines a log without one shows (SLURM output,
    zobench.log): step/steps, mean loss, steps/s and ETA at a train line at most every PROGRESS_EVERY_S
    seconds, and always at the last step."""

    def __init__(self, steps: int, start: int, desc: str):
        from tqdm import tqdm

        self.steps = steps
        self.since_step, self.since = start, time.monotonic()  # the rate is measured from the last line
        self.bar = tqdm(total=steps, initial=start, desc=desc, unit="step", dynamic_ncols=True, disable=None)

    def step(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    def train_line(self, step: int, loss: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}")
        now = time.monotonic()
        if step < self.steps and now - self.since < PROGRESS_EVERY_S:
            return
        rate = (step - self.since_step) / max(now - self.since, 1e-9)
        eta = (self.steps - step) / rate if rate > 0 else math.inf
        log.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %s", step, self.steps, loss, rate, _duration(eta))
        self.since_step, self.since = step, now


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class RunRecord:
    """The run's counters and clocks, and what it records of them: log.jsonl's lines and metrics.json.

    Training counts are the pass counter's totals minus what evaluation used; the training clock runs inside
    `training()` and stops for evaluations. A resumed run goes on from the checkpoint's `state_dict()`.
    """

    def __init__(self, spec, directory: RunDir, state: dict[str, Any] | None = None, step: int = 0):
        """A new record, or (`state`: a checkpoint's) a resumed run's from `step`; metrics.json written."""
        self.directory = directory
        self.device = torch.device("cpu")
        self.counter = PassCounter()  # every forward/backward/token, training and evaluation
        self.eval_tokens = 0
        self.recent_losses: list[float] = []  # the losses since the last train line
        self.earlier_s = 0.0  # spent before a resume
        self.train_s = 0.0  # the training clock's seconds so far (paused segments)
        self._segment: Stopwatch | None = None  # the training clock, while it runs
        self.progress: Progress | None = None  # the training loop's progress lines, set by start_progress
        self.clock = Stopwatch(self.device)
        self.log = JsonlLog(directory.records("log.jsonl"))
        self.metrics: dict[str, Any] = initial_metrics(spec, directory.path)
        if state is not None:
            self.load_state_dict(state, step)
        self.note(**directory.provenance())  # run id, config.yaml's SHA-256, earlier attempts
        self.save()

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._lap()
        return {"metrics": dict(self.metrics), "counter": vars(self.counter).copy(),
                "eval_tokens": self.eval_tokens, "recent_losses": list(self.recent_losses),
                "seconds": {"total": self.elapsed(), "train": self.metrics["train_wall_clock_s"]}}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.metrics.update(state["metrics"], status="running", error=None, resumed_at_step=step)
        self.counter = PassCounter(**state["counter"])
        self.eval_tokens, self.recent_losses = state["eval_tokens"], list(state["recent_losses"])
        self.earlier_s, self.train_s = state["seconds"]["total"], state["seconds"]["train"]

    # -- fields ---------------------------------------------------------------------------------
    def note(self, **fields: Any) -> None:
        """Fields of metrics.json (written at the next save)."""
        self.metrics.update(fields)

    def note_disk_bytes(self) -> None:
        """metrics.json's disk_bytes again, once a completed run's checkpoint tensors are gone; the run is
        recorded completed already, so a write that fails leaves only this figure stale."""
        self.note(disk_bytes=self.directory.disk_bytes())
        try:
            self.save()
        except OSError as error:
            log.warning("could not update disk_bytes in %s (%s)", self.directory.path / "metrics.json",
                        error.strerror or error)

    def save(self, final: bool = False) -> None:
        """metrics.json from the record's state: the one place it is written."""
        self.directory.write_metrics(self.metrics, final=final)

    def start_clocks(self, device: torch.device) -> None:
        self.device, self.clock = device, Stopwatch(device)
        reset_peak_memory(device)

    def elapsed(self) -> float:
        return self.earlier_s + self.clock.elapsed()

    # -- training -------------------------------------------------------------------------------
    @contextmanager
    def training(self):
        """The training clock runs inside, from the seconds of the run's earlier attempts."""
        self._segment = Stopwatch(self.device)
        self.metrics["train_wall_clock_s"] = self.train_s
        try:
            yield
        finally:
            self._lap()
            self._segment = None

    def _lap(self) -> None:
        """Bring train_wall_clock_s up to now."""
        if self._segment is not None:
            self.train_s += self._segment.elapsed()
            self._segment = Stopwatch(self.device)
            self.metrics["train_wall_clock_s"] = self.train_s

    def count_training(self) -> None:
        self.metrics["forward_passes"] = self.counter.forward_passes - self.metrics["eval_forward_passes"]
        self.metrics["backward_passes"] = self.counter.backward_passes
        self.metrics["tokens"] = self.counter.tokens - self.eval_tokens

    def log_train(self, step: int, loss: float, lr: float, line: bool) -> float | None:
        """Step `step` done with `loss`; `line`: write the train line (the mean loss since the last one),
        which is returned. A loss that is not finite ends the run as diverged."""
        self.count_training()
        self.metrics["steps"] = step
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss}")
        if self.progress is not None:
            self.progress.step()
        self.recent_losses.append(float(loss))
        if not line:
            return None
        mean = sum(self.recent_losses) / len(self.recent_losses)
        self.log.write({"event": "train", "step": step, "loss": mean, "lr": lr, "elapsed_s": self.elapsed(),
                        "forward_passes": self.metrics["forward_passes"]})
        self.recent_losses.clear()
        if self.progress is not None:
            self.progress.train_line(step, mean)
        return mean

    def start_progress(self, steps: int, start: int, desc: str) -> None:
        """Training's bar (terminals) and progress lines (logs), from step `start` of `steps`."""
        self.progress = Progress(steps, start, desc)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def echo_dev(self, step: int, result: dict[str, Any], best: bool) -> None:
        """A dev result in the log, and whether its weights are the new best."""
        log.info("dev at step %d: metric %.4f  loss %.4f%s", step, result["metric"], result["loss"],
                 "  (new best)" if best else "")

    def log_test(self, evaluate, examples) -> None:
        """The test evaluation of the tested weights: its line, metrics.json's test fields, the log's summary."""
        test = self.log_eval("test", self.metrics["steps"], evaluate, examples)
        self.note(test_metric=test["metric"], test_scores=scores(test))
        m = self.metrics
        log.info("test %s = %s (dev %s = %s, best step %s)", m["metric"], _fmt(m["test_metric"]), m["metric"],
                 _fmt(m["dev_metric"]), m["best_step"])

    # -- evaluation -----------------------------------------------------------------------------
    def log_eval(self, split: str, step: int, evaluate, examples) -> dict[str, Any]:
        """`evaluate(examples)` with the training clock stopped, its passes counted as evaluation's; the
        eval line records the result, which is returned."""
        running = self._segment is not None
        self._lap()
        self._segment = None
        passes, tokens = self.counter.forward_passes, self.counter.tokens
        result = evaluate(examples)
        self.metrics["eval_forward_passes"] += self.counter.forward_passes - passes
        self.eval_tokens += self.counter.tokens - tokens
        self.log.write({"event": "eval", "split": split, "step": step, "metric": result["metric"],
                        "loss": result["loss"], **scores(result), "elapsed_s": self.elapsed(),
                        # training seconds so far (loading and evaluations excluded): zobench-report's time to target
                        "train_s": self.metrics["train_wall_clock_s"] or 0.0,
                        "forward_passes": self.metrics["forward_passes"]})
        if running:
            self._segment = Stopwatch(self.device)
        return result

    def log_early_stop(self, step: int, fields: dict[str, Any]) -> None:
        """The stop's fields (EarlyStopping.record()) into metrics.json, and its line."""
        self.metrics.update(fields)
        self.log.write({"event": "early_stop", "step": step, "reason": self.metrics["stop_reason"],
                        "elapsed_s": self.elapsed(), "forward_passes": self.metrics["forward_passes"]})

    # -- the end --------------------------------------------------------------------------------
    def fail(self, status: str, message: str) -> None:
        self.metrics.update(status=status, error=message)
        logging.getLogger(__name__).debug("%s: %s", status, message)  # the CLI prints it as one line

    def out_of_memory(self, error: BaseException) -> str:
        """Records the failure; returns its one line, with the peak and what to change."""
        memory, method = peak_memory(self.device)
        message = (f"out of memory at step {self.metrics['steps']} (peak {memory / 2**30:.2f} GiB, {method}): "
                   f"lower train.batch_size or eval.batch_size (first-order: or raise train.grad_accumulation), "
                   f"shorten max_length, use dtype=float16/bfloat16 "
                   f"on GPU, shard with model.device_map=auto, or pick a zeroth-order optimizer")
        logging.getLogger(__name__).debug("out of memory: %r", error)
        self.fail("failed", message)
        return message

    def finish(self) -> None:
        """metrics.json gets the run's end whatever else fails here (RunDir.write_metrics says in one line
        if even that cannot be written)."""
        try:
            self.metrics.update(final_figures(self.metrics, self.elapsed(), self.device), finished_at=now(),
                                disk_bytes=self.directory.disk_bytes())
            self.log.finish(self.metrics)
        finally:
            try:
                self.save(final=True)
            finally:
                self.log.close()


def record_refusal(directory: RunDir, config_yaml: str, overrides: list[str] | None, message: str) -> None:
    """A config refused before the run started (zobench.run called directly; the CLI refuses before it makes
    a folder): the folder says so as a run's does, its config and a failed metrics.json."""
    directory.claim()
    try:
        directory.start(config_yaml, overrides)
        directory.write_metrics({"status": "failed", "error": message, "steps": 0}, final=True)
    finally:
        directory.release()


def scores(result: dict[str, Any]) -> dict[str, float]:
    """An evaluation's task scores (accuracy, F1, exact match), as log.jsonl and metrics.json keep them."""
    return {k: v for k, v in result.items() if k in ("accuracy", "f1", "em")}


def initial_metrics(spec, run_dir: Path) -> dict[str, Any]:
    """metrics.json as a job starts (`spec`: zobench/spec.RunSpec): every key of the run contract (DESIGN.md),
    filled in as the run goes."""
    from . import __version__

    return {
        "task": spec.task["name"], "model": spec.model["name"], "optimizer": spec.method.name,
        "seed": spec.seed, "data_seed": spec.data.seed, "status": "running", "error": None,
        "peft": spec.peft_name, "icl_k": spec.icl_k,
        "metric": spec.task["metric"], "test_metric": None, "dev_metric": None, "dev_loss": None,
        "test_scores": None, "best_step": None, "steps": 0, "steps_planned": spec.train.steps,
        "forward_passes": 0, "backward_passes": 0, "tokens": 0, "eval_forward_passes": 0,
        "wall_clock_s": None, "train_wall_clock_s": None, "peak_memory_bytes": None,
        "peak_memory_method": None, **dict.fromkeys(GPU_PEAK_KEYS),  # every GPU's peaks (gpu_peaks)
        "device": None, "devices": None, "dtype": None, "precision": None, "n_params": None,
        "n_trainable_params": None, "disk_bytes": None,  # the run folder's bytes at its end (RunDir.disk_bytes)
        "data_source": None, "n_train": None, "n_dev": None, "n_test": None, "truncated": None,
        "zobench_version": __version__, "git_revision": git_revision(), "run_dir": str(run_dir),
        "started_at": now(), "finished_at": None, "resumed_at_step": None,
        "stopped_early_at": None, "stop_reason": None,
    }


def final_figures(metrics: dict[str, Any], total_s: float, device: torch.device) -> dict[str, Any]:
    """The clock, peak memory and throughput metrics.json ends with."""
    memory, method = peak_memory(device)
    train_s = metrics["train_wall_clock_s"] or 0.0
    return {"wall_clock_s": total_s, "peak_memory_bytes": memory, "peak_memory_method": method, **gpu_peaks(device),
            "forward_passes_per_s": (metrics["forward_passes"] / train_s) if train_s else None,
            "tokens_per_s": (metrics["tokens"] / train_s) if train_s else None}


def cuda_devices(device: torch.device) -> list[torch.device]:
    """Every visible GPU of a run on CUDA (a model split by model.device_map spans several, each with its own
    allocator and peak); none on CPU."""
    if device.type != "cuda":
        return []
    return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: every GPU's allocator peaks. CPU on Linux: VmHWM back to the current RSS (clear_refs "5"), so a
    job in a reused worker process (joblib's loky) does not report an earlier job's peak."""
    if device.type == "cuda":
        for gpu in cuda_devices(device):
            torch.cuda.reset_peak_memory_stats(gpu)
        return
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:  # not Linux, or not allowed: the process's lifetime peak is what we can give
        pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, how measured). CUDA: the sum over the GPUs of each one's max_memory_allocated (one GPU: its own)."""
    if device.type == "cuda":
        return gpu_peaks(device)["peak_memory_allocated_sum_bytes"], "cuda_max_allocated"
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "process_vmhwm"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_maxrss"


GPU_PEAK_KEYS = ("peak_memory_devices", "peak_memory_allocated_max_bytes", "peak_memory_allocated_sum_bytes",
                 "peak_memory_reserved_max_bytes", "peak_memory_reserved_sum_bytes")


def gpu_peaks(device: torch.device) -> dict[str, Any]:
    """metrics.json's per-GPU figures (None on CPU): each GPU's peak allocated (tensors) and reserved (the
    caching allocator's segments: what nvidia-smi shows, less the CUDA context, and what the papers read),
    with their max (the card that must fit) and sum (the whole run) over the GPUs."""
    gpus = cuda_devices(device)
    if not gpus:
        return dict.fromkeys(GPU_PEAK_KEYS)
    per_gpu = {str(gpu): {"allocated": int(torch.cuda.max_memory_allocated(gpu)),
                          "reserved": int(torch.cuda.max_memory_reserved(gpu))} for gpu in gpus}
    figures: dict[str, Any] = {"peak_memory_devices": per_gpu}
    for kind in ("allocated", "reserved"):
        values = [peaks[kind] for peaks in per_gpu.values()]
        figures[f"peak_memory_{kind}_max_bytes"], figures[f"peak_memory_{kind}_sum_bytes"] = max(values), sum(values)
    return figures


def devices_used(model) -> list[torch.device]:
    """The devices that hold the model's weights, in index order: one, or the GPUs of a model.device_map."""
    return sorted({p.device for p in model.parameters()}, key=lambda d: (d.type, -1 if d.index is None else d.index))


def device_names(devices: list[torch.device]) -> str:
    """metrics.json's `device`, a string as ever: the one device's name, or every GPU a device-mapped model spans
    ("2 x NVIDIA H100 80GB HBM3"; `devices` lists them)."""
    from collections import Counter

    counts = Counter(device_name(device) for device in devices)
    if len(devices) == 1:
        return next(iter(counts))
    return " + ".join(f"{n} x {name}" for name, n in counts.items())


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


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
