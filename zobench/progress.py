"""Progress of a long loop that is not training (evaluation batches, replayed steps): a tqdm bar on a terminal,
and a log line at most every run_record.PROGRESS_EVERY_S seconds for a log without one (SLURM output,
zobench.log), as the training loop's lines (run_record.Progress). A loop shorter than that writes no line."""

from __future__ import annotations

import logging
import math
import time

from tqdm import tqdm

from . import run_record

log = logging.getLogger(__name__)  # under `zobench`: Hydra's zobench.log and a SLURM job's output show it


class Counted:
    """`with Counted("evaluating", 600, "example") as progress: ... progress.update(8)`."""

    def __init__(self, what: str, total: int, unit: str):
        self.what, self.total, self.unit = what, total, unit
        self.done = 0
        self.start = self.since = time.monotonic()
        self.bar = tqdm(total=total, desc=what, unit=unit, dynamic_ncols=True, leave=False, disable=None)

    def update(self, count: int = 1) -> None:
        self.done += count
        self.bar.update(count)
        now = time.monotonic()
        if now - self.since < run_record.PROGRESS_EVERY_S:
            return
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        log.info("%s: %d/%d %ss  %.2f %ss/s  ETA %s", self.what, self.done, self.total, self.unit, rate, self.unit,
                 run_record._duration(eta))
        self.since = now

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Counted":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
