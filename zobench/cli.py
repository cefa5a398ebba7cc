"""`zobench`: the Hydra entry point. cfg -> run(cfg); known errors become one line on stderr.

`zobench resume=RUN_DIR` re-runs the command that made RUN_DIR in RUN_DIR, which resumes an
interrupted or failed run from its checkpoint (re-running a command with hydra.run.dir=RUN_DIR does
the same). A run directory's rules (its lock, what is refused) are zobench/run_dir.py's.

Exit status (README "Exit codes"): 0 completed (or diverged: a result, reported as such); 1 the run
failed (bad data found at start-up included: metrics.json says why), or a folder could not be written
(read-only, disk full); 2 bad input refused before any run started (an unknown name, a config value, an
override Hydra cannot apply); 130 interrupted. In a multirun a failed job is recorded and reported, the
sweep goes on with the next job, and the sweep exits 1 once all jobs are done if any of them failed.
Every error is one line on stderr (HYDRA_FULL_ERROR=1 shows Hydra's own traceback instead): the mapping from
an exception to its line and exit status is zobench/failures.py's, shared with the other console commands.
The command line is this module's (resume=, the run folder's name); the folder's rules are run_dir.py's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import RefusedInput, ZobenchError
from .failures import INTERRUPTED, Failure, classify, command, say
from .launchers import task_ranks as _task_ranks  # a submitit task imports this module: its tasks become ranks
from .parallel.world import from_env


def _say(message: str) -> None:
    say("zobench", message)


def _job(cfg) -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .models import refuse_spill
    from .parallel.launch import rank_run_dir
    from .parallel.zo import from_spec as zo_parallel
    from .run import run
    from .spec import RunSpec

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    tag = f"[job {hydra_cfg.job.num}] " if in_sweep else ""  # parallel jobs' lines interleave: each says whose
    if in_sweep:
        _tag_console(tag)
    world = from_env()  # a torchrun rank, or a task of a submitit job with several (launchers.task_ranks)
    speaks = world.main  # rank 0 speaks for the job; the others say only what goes wrong
    if not speaks:
        _quiet_console()
    try:
        spec = RunSpec.from_cfg(cfg)  # before anything is written or loaded: a bad value names its key
        zo_parallel(spec, world)  # what runs over the ranks
        refuse_spill(spec.model, spec.dtype)  # model.device_map=auto over GPUs too small, known from the config
    except ZobenchError as error:
        where = f" [job {hydra_cfg.job.num}: {' '.join(hydra_cfg.overrides.task)}]" if in_sweep else ""
        return _job_ended(classify(error, refused=(ZobenchError,)), where, in_sweep)
    if in_sweep and _holds_completed_run(run_dir):
        # a re-run sweep (same hydra.sweep.dir) finishes what a kill left: a job done before is counted, not failed
        print(f"{tag}completed before: results in {run_dir} (not run again)", flush=True)
        return "completed"
    try:
        # a rank other than 0 runs in its scratch folder (a submitit task's job folder is rank 0's)
        metrics = run(spec, rank_run_dir(world, run_dir), overrides=list(hydra_cfg.overrides.task))
    except (KeyboardInterrupt, Exception) as error:
        failure = classify(error, refused=(RefusedInput,))  # e.g. a resume on a device that draws another z
        if failure.status == "interrupted":
            if speaks:
                _say(f"{tag}interrupted; what was done is recorded in {run_dir}; to go on from its last checkpoint: "
                     f"{_resume_command(run_dir, in_sweep)}")
            _hold_stop_signals()
            sys.exit(INTERRUPTED)
        where = f"traceback in {run_dir}/zobench.log" if failure.unexpected else f"run directory: {run_dir}"
        return _job_ended(failure, f" [{where}]", in_sweep, tag)
    if not speaks:
        return metrics["status"]
    value = metrics["test_metric"]
    shown = "n/a" if value is None else f"{value:.4f}"
    if metrics["status"] == "diverged":
        # metrics.json says "diverged at step 2: ..." (its error field stands alone): not "diverged: diverged at"
        reason = str(metrics.get("error") or "").removeprefix("diverged").strip()
        print(f"{tag}diverged{' ' + reason if reason else ''}; results in {run_dir}", flush=True)
    else:
        print(f"{tag}{metrics['status']}: test {metrics['metric']} = {shown}; results in {run_dir}", flush=True)
    return metrics["status"]


def _hold_stop_signals() -> None:
    """The run is recorded as interrupted and the process is leaving: another SIGTERM, SIGUSR2 or Ctrl-C now
    (SLURM sends several) is ignored. Python's shutdown puts the default action back for every signal that has a
    Python handler, and any thread may receive the signal, so a handler or a mask of this thread is not enough;
    an ignored signal stays ignored."""
    import signal

    from .stop_signals import STOP_SIGNALS

    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _job_ended(failure: Failure, where: str, in_sweep: bool, tag: str = "") -> str:
    """One line; a sweep records the job as failed and goes on, a single run exits."""
    _say(f"{tag}{failure.line}{where}")
    if in_sweep:
        return "failed"
    sys.exit(failure.exit_code)


def claim_named_run_dir(argv: list[str]) -> list[str]:
    """The claim of a run's folder, before Hydra writes its .hydra/ and zobench.log there: the folder is
    hydra.run.dir resolved as Hydra resolves it (any form: `++`, quoted, `${…}`, a resume's, the default), and
    argv comes back with it pinned, so Hydra writes where the lock is. A name Hydra would misread is refused
    here, the folder's own refusals are RunDir's (claim_for_hydra). The job's own claim reuses this one."""
    from .configs import pin_run_dir, resolved_run_dir, resolved_sweep_dir, run_dir_override
    from .run_dir import claim_for_hydra, refuse_odd_sweep_outputs

    if any(arg.split("=")[0] in ("-c", "--cfg", "-h", "--help", "--hydra-help", "--info", "-i") for arg in argv):
        return argv  # Hydra prints something and runs no job
    overrides = [arg for arg in argv if _is_override(arg)]
    if any(arg in ("-m", "--multirun") for arg in argv):
        sweep_dir = resolved_sweep_dir(overrides)  # each job claims its own folder
        if sweep_dir is not None:
            refuse_odd_sweep_outputs(sweep_dir)
        return argv
    path = resolved_run_dir(overrides)
    if path is None:
        return argv
    run_dir_override(path)  # a newline in the name: refused before the folder exists
    claim_for_hydra(path)  # held until the process ends: the job's claim is reentrant
    return pin_run_dir(argv, path)


def _quiet_console() -> None:
    """A rank other than 0 of a torchrun job: its console shows warnings and errors only (rank 0 reports)."""
    import logging

    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)


def _tag_console(tag: str) -> None:
    """Prefix this job's console log lines with its job number (the file log, zobench.log, is the job's own)."""
    import logging

    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and handler.formatter is not None:
            handler.setFormatter(logging.Formatter(tag.replace("%", "%%") + handler.formatter._fmt))


def _resume_command(run_dir: str, in_sweep: bool) -> str:
    """What to type to go on: one run resumes from its folder, a sweep by running its command again."""
    import shlex

    if in_sweep:
        return f"run the same command again with hydra.sweep.dir={shlex.quote(str(Path(run_dir).parent))}"
    return f"zobench resume={shlex.quote(run_dir)}"


def _override_value(arg: str) -> str:
    """The value as Hydra's parser reads it (`resume='/a b'` is /a b)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return str(OverridesParser.create().parse_override(arg).value())
    except Exception:
        return arg.split("=", 1)[1]


def _keep_completed_runs_hydra_files() -> None:
    """A sweep run again into its folder (to finish what a kill left) makes Hydra save each job's .hydra/*.yaml
    before the job starts, a completed job's too: its files stay as that run wrote them. Installed when this
    module is imported, so the launchers' worker processes (joblib, submitit), which import it to run `_job`,
    have it too. Hydra has no public hook before it saves them."""
    try:
        from hydra.core import utils
    except ImportError:
        return
    original = getattr(utils, "_save_config", None)
    if original is None or getattr(original, "keeps_completed_runs", False):
        return

    def save_config(cfg, filename, output_dir):
        if not _holds_completed_run(str(Path(output_dir).parent)):
            original(cfg, filename, output_dir)

    save_config.keeps_completed_runs = True
    utils._save_config = save_config


def _is_override(arg: str) -> bool:
    """`key=value` on the command line, as against an option (`-m`, `--cfg=job`)."""
    return "=" in arg and not arg.startswith("-")


def _holds_completed_run(run_dir: str) -> bool:
    from .run_dir import RunDir

    try:
        return RunDir(run_dir).holds_completed_run()
    except (OSError, ZobenchError):  # unreadable: the run itself says why
        return False


def _expand_resume(argv: list[str]) -> list[str]:
    """`resume=RUN_DIR` means: the command that made RUN_DIR, again, in RUN_DIR (which resumes it). The
    folder may have come from someone else: its overrides.yaml is read as data (zobench.safe_files) and only
    keys of zobench's own config are replayed (configs.received_overrides); what the user types beside
    resume= is theirs and comes after, so it wins."""
    asked = [arg for arg in argv if arg.startswith("resume=")]
    if not asked:
        return argv
    from .configs import received_overrides, run_dir_override
    from .run_dir import OVERRIDES  # the command line that started the run, kept by the run directory
    from .safe_files import read_yaml

    if any(arg in ("-m", "--multirun") for arg in argv):
        raise ZobenchError("resume=DIR resumes one run, not a sweep (-m): to finish a sweep, run its command again "
                           "with the same hydra.sweep.dir; to resume one of its jobs, resume=THAT_JOB'S_FOLDER")
    run_dir = Path(_override_value(asked[-1])).expanduser().absolute()
    overrides_file = run_dir / OVERRIDES
    try:
        original = received_overrides(read_yaml(overrides_file) or [], overrides_file)
    except FileNotFoundError:
        raise ZobenchError(f"resume={run_dir}: no zobench run there (looked for {overrides_file})") from None
    # Hydra's parser takes options first, then all overrides: the received ones go before the typed ones.
    first = next((i for i, arg in enumerate(argv) if _is_override(arg)), len(argv))
    rest = [arg for arg in argv[first:] if not arg.startswith("resume=")]
    return argv[:first] + original + rest + [run_dir_override(str(run_dir))]


class _SweepWatch:
    """The jobs' results of a multirun, as Hydra's launcher returns them to the sweeper (in this process,
    whichever launcher ran them: basic, joblib or submitit), so the sweep's exit status can say that some
    failed. Hydra's public API drops them; this wraps the one method that has them."""

    def __init__(self):
        self.statuses: list[str] = []
        self.folders: list[str | None] = []  # each job's sweep folder (the summary names it)

    def __enter__(self):
        try:
            from hydra._internal.hydra import Hydra
        except ImportError:  # another Hydra: the sweep still runs, its exit status is 0
            self._restore = lambda: None
            return self
        original, statuses, folders = Hydra.multirun, self.statuses, self.folders

        def multirun(hydra_self, *args, **kwargs):
            returns = original(hydra_self, *args, **kwargs)
            for job in _flatten(returns):
                statuses.append(_job_status(job))
                folders.append(_sweep_dir_of(job))
            return returns

        Hydra.multirun = multirun
        self._restore = lambda: setattr(Hydra, "multirun", original)
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    @property
    def folder(self) -> str:
        import shlex

        folders = [folder for folder in self.folders if folder]
        return shlex.quote(folders[0]) if folders else "<the sweep's folder>"

    @property
    def failed(self) -> int:
        return sum(status not in ("completed", "diverged") for status in self.statuses)


def _flatten(returns):
    for item in returns or []:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item


def _sweep_dir_of(job) -> str | None:
    try:
        return str(job.hydra_cfg.hydra.sweep.dir)
    except Exception:  # another Hydra's JobReturn: the summary says "the sweep's folder"
        return None


def _job_status(job) -> str:
    try:
        value = job.return_value  # raises what the job raised
    except BaseException:
        return "failed"
    return value if isinstance(value, str) else "failed"


def main() -> None:
    """Two stages, each one line on an error: the command line (exit 2 for bad input, 1 for a run folder that
    cannot be made), then Hydra's run or sweep (HYDRA_FULL_ERROR=1 shows its traceback instead)."""
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    code = command("zobench", _prepare_command_line, refused=(ZobenchError,))
    if code == 0:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing a traceback: we say one line
        code = command("zobench", _hydra_main, refused=(ZobenchError,), wrapped=True, traceback=full_error)
    if code:
        sys.exit(code)


def _prepare_command_line() -> None:
    """sys.argv as Hydra should see it: a resume expanded, the overrides checked, the run folder claimed."""
    from .configs import check_overrides, register_resolvers, register_tasks
    from .parallel.launch import scratch_run_dir

    argv = sys.argv[1:]
    world = from_env()  # under torchrun: rank 0 owns the run folder, the others run in scratch folders
    if world.distributed and any(a in ("-m", "--multirun") for a in argv):
        raise ZobenchError("torchrun runs one job over its ranks, not a sweep (-m): launch each job with torchrun, "
                           "or sweep without torchrun")
    if any(a in ("-m", "--multirun") for a in argv) and any(a.split("=")[0] in ("-c", "--cfg") for a in argv):
        raise ZobenchError("--cfg prints one run's config, not a sweep's: list a sweep's jobs with "
                           "`zobench-plan OVERRIDES` (and `zobench-plan --cfg N OVERRIDES` for job N's config)")
    sys.argv[1:] = _expand_resume(argv)
    overrides = [arg for arg in sys.argv[1:] if _is_override(arg)]
    check_overrides(overrides)
    register_resolvers()
    register_tasks()
    # the lock before Hydra writes .hydra/ and zobench.log; a rank other than 0 writes into its own folder
    sys.argv[1:] = claim_named_run_dir(sys.argv[1:]) if world.main else scratch_run_dir(sys.argv[1:], world)


def _hydra_main() -> None:
    import hydra

    from .launchers import survive_dead_workers
    from .paths import conf_dir

    survive_dead_workers()  # a joblib sweep goes on when one of its workers is killed
    with _SweepWatch() as sweep:
        hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_job)()
    if sweep.failed:
        _say(f"{sweep.failed} of {len(sweep.statuses)} jobs failed "
             f"(their errors are above; a job that started has its metrics.json)")
        sys.exit(1)
    if sweep.statuses:  # a sweep that went well says so once, with what to do next
        diverged = sweep.statuses.count("diverged")
        print(f"sweep done: {len(sweep.statuses)} jobs, {len(sweep.statuses) - diverged} completed, "
              f"{diverged} diverged; "
              f"next: zobench-report {sweep.folder}", flush=True)


_keep_completed_runs_hydra_files()
_task_ranks()

if __name__ == "__main__":
    main()
