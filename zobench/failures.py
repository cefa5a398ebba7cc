"""One failure policy: what an exception that ends a command means to its user.

`classify` maps an exception to a `Failure`: the status a run records in metrics.json, the one line the
console prints, and the exit code of README's "Exit codes" table (0 completed, 1 failed or cannot write,
2 bad input refused before anything ran, 130 interrupted). `command` gives every console command
(zobench, zobench-report, zobench-replay, zobench-lengths) that one line; `run_failure` is what the runner
records for an error that ended a run, and what it raises for the CLI. Torch-free: the report uses it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import Interrupted, ZobenchError

COMPLETED, FAILED, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130


@dataclass(frozen=True)
class Failure:
    status: str  # what metrics.json records: "interrupted" or "failed"
    message: str  # the error alone, on one line (metrics.json's "error")
    exit_code: int
    unexpected: bool = False  # a bug or an environment problem: its traceback belongs in the log

    @property
    def line(self) -> str:
        """What the console prints after the command's name."""
        if self.status == "interrupted":
            return "interrupted"
        return f"{'failed' if self.unexpected else 'error'}: {self.message}"


def classify(error: BaseException, refused: tuple[type, ...] = (), wrapped: bool = False) -> Failure:
    """The failure an exception means. `refused`: the error types that, for this command at this point,
    are bad input refused before anything ran (exit 2); a ZobenchError otherwise is a failure (exit 1).
    Hydra's and OmegaConf's errors are always a config that cannot be composed (exit 2). `wrapped`: an
    OSError behind the error counts as the error (Hydra wraps a log file it cannot open in a ValueError)."""
    if isinstance(error, (KeyboardInterrupt, Interrupted)):
        return Failure("interrupted", "interrupted", INTERRUPTED)
    if isinstance(error, ZobenchError):  # its message already says what to fix
        return Failure("failed", one_line(error), BAD_INPUT if isinstance(error, refused) else FAILED)
    os_error = os_error_in(error) if wrapped else error if isinstance(error, OSError) else None
    if os_error is not None:
        return Failure("failed", os_error_line(os_error), FAILED)
    if type(error).__name__ == "TerminatedWorkerError":  # joblib's, where launchers.py could not go on
        return Failure("failed", "a sweep worker died (killed, or out of memory) and the sweep could not go on; "
                       "the jobs that ended have their metrics.json: run the same command with "
                       "hydra.sweep.dir=<this sweep's folder> to finish the others (completed ones are not run "
                       "again)", FAILED, unexpected=True)
    if isinstance(error, refused) or _config_error(error):
        return Failure("failed", one_line(error) or type(error).__name__, BAD_INPUT)  # Hydra's hints on one line
    return Failure("failed", f"{type(error).__name__}: {one_line(error)}", FAILED, unexpected=True)


def command(prog: str, body: Callable[[], int | None], refused: tuple[type, ...] = (), wrapped: bool = False,
            traceback: bool = False) -> int:
    """Run a console command's `body` and return its exit code; an error it raises is one line on stderr
    (`traceback`: errors other than an interrupt propagate, as HYDRA_FULL_ERROR=1 asks)."""
    try:
        return body() or COMPLETED
    except (KeyboardInterrupt, Exception) as error:
        if traceback and not isinstance(error, (KeyboardInterrupt, Interrupted)):
            raise
        failure = classify(error, refused, wrapped)
        say(prog, failure.line)
        return failure.exit_code


def run_failure(error: BaseException, step: int, run_dir: Path) -> "RunFailure":
    """What the runner records in metrics.json for an error that ended the run at `step`, and what it raises
    for the CLI afterwards (a full disk becomes a ZobenchError that names the run directory)."""
    failure = classify(error)
    if failure.status == "interrupted":
        return RunFailure("interrupted", f"interrupted at step {step}", error, traceback=False)
    if isinstance(error, OSError):  # a full disk, a folder made read-only: recorded if it still can be
        message = f"could not write to {run_dir}: {error}"
        raised = ZobenchError(message)
        raised.__cause__, raised.__suppress_context__ = error, True  # as `raise … from error` would set them
        return RunFailure(failure.status, message, raised, traceback=True)
    # metrics.json keeps the message as raised, lines and all
    message = str(error) if isinstance(error, ZobenchError) else f"{type(error).__name__}: {error}"
    return RunFailure(failure.status, message, error, traceback=failure.unexpected)


@dataclass(frozen=True)
class RunFailure:
    status: str  # metrics.json's status
    message: str  # metrics.json's error
    raised: BaseException  # what run() raises once it has recorded the failure
    traceback: bool  # worth a traceback in zobench.log


def say(prog: str, message: str) -> None:
    print(f"{prog}: {one_line(message)}", file=sys.stderr, flush=True)


def one_line(error: BaseException | str) -> str:
    """An exception's message may span lines: the console gets one."""
    return " ".join(str(error).split())


def os_error_line(error: OSError) -> str:
    """'cannot read or write PATH: No space left on device' rather than a traceback."""
    where = f" {error.filename}" if error.filename else ""
    reason = error.strerror or str(error) or type(error).__name__
    return f"cannot read or write{where}: {reason}"


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind an error, if any (itself, or its cause or context, however deep)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _config_error(error: BaseException) -> bool:
    """A Hydra or OmegaConf error; neither is imported here (the report stays without them)."""
    hydra_errors, omegaconf_errors = sys.modules.get("hydra.errors"), sys.modules.get("omegaconf.errors")
    return (hydra_errors is not None and isinstance(error, hydra_errors.HydraException)) or \
        (omegaconf_errors is not None and isinstance(error, omegaconf_errors.OmegaConfBaseException))
