"""How a signal stops a run: after the current training step when it can, at once otherwise."""

from __future__ import annotations

import functools
import logging
import signal
import threading
from contextlib import contextmanager

from .errors import Interrupted

log = logging.getLogger(__name__)

# SIGUSR2 is submitit's timeout warning (signal_delay_s before SLURM's limit), SIGTERM SLURM's pre-emption
# and `kill`: both stop the run after the current step, as Ctrl-C does.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


@contextmanager
def signals_stop(job):
    """SIGTERM (SLURM pre-emption, `kill`), SIGUSR2 (submitit's timeout warning) and Ctrl-C end the run as `interrupted`, files written.

    During training the run stops after the current step, with a checkpoint to resume from; a
    second Ctrl-C, or a signal outside the training loop, stops it at once. Once a signal has stopped
    the run, later ones are logged and ignored for the rest of the process: it is on its way out, and
    the default action would kill it (exit 143) before its records are written and it exits 130.
    A handler that was there before for SIGUSR2 (submitit's: it requeues the job) is kept in
    `job.hand_on`, for run() to call once the run's records are written and its folder unlocked.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def handler(signum, frame):
        nonlocal stopping
        if stopping:
            _already_stopping(signum, frame)
            return
        if signum == signal.SIGUSR2 and callable(previous.get(signum)) and job.hand_on is None:
            job.hand_on = functools.partial(previous[signum], signum, None)
        if job.in_training_loop and not job.stop_requested:
            job.stop_requested = True
            log.warning("signal %d: stopping after this step (again to stop at once)", signum)
            return
        stopping = True
        raise Interrupted(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    except (KeyboardInterrupt, Interrupted):  # also a stop requested in training, raised after its step
        stopping = True
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, _already_stopping if stopping else old)


def _already_stopping(signum, frame) -> None:
    log.warning("signal %d: already stopping", signum)
