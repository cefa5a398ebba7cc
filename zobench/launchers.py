"""Hydra's launchers as zobench needs them: joblib's survives a dead worker; submitit's runs one job over its tasks.

Joblib (hydra/launcher=local_parallel or joblib):

Hydra's launcher runs a sweep as one joblib call on loky: when one worker dies (SIGKILL, the OOM killer), loky
breaks the whole pool and every other job of the sweep is abandoned. Here the sweep is launched again instead;
the jobs that completed are counted, not run again (cli._job), a job cut short resumes from its checkpoint or
starts again (run_dir's attempts/). If a worker dies a second time, the remaining jobs run one at a time, so a
job whose worker dies once more is the one that kills it: it counts as failed and the others go on.

Submitit (hydra/launcher=slurm_multigpu, or any submitit launcher with tasks_per_node or nodes above 1): every
task of a job runs the launcher's `__call__`, Hydra's whole job, in its own process. `task_ranks` makes the tasks
the ranks of one run, as torchrun's are (parallel/world.py's join_submitit_tasks), and keeps Hydra's own files
of a task other than rank 0 (.hydra/, zobench.log) out of the job's folder, which is rank 0's (launch.py).

Hydra loads launchers only from its `hydra_plugins` package, so this wraps the plugins' methods (as
cli._SweepWatch wraps Hydra.multirun) rather than registering launchers of its own. zobench.cli installs both
when it is imported, which a submitit task does when it unpickles the launcher (its task function is cli._job).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def survive_dead_workers() -> None:
    try:
        from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
    except ImportError:  # the `cluster` extra is not installed: no joblib sweeps
        return
    _wrap_once(JoblibLauncher, "launch", _surviving_dead_workers)


def _surviving_dead_workers(one_call):
    """JoblibLauncher.launch, which launches the sweep again when one of its workers died."""

    def launch(self, job_overrides, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        for attempt in (1, 2):
            try:
                return one_call(self, job_overrides, initial_job_idx)
            except Exception as error:
                if not _worker_died(error):
                    raise
                log.warning("a sweep worker died; launching the sweep again%s: completed jobs are counted, the "
                            "others go on", "" if attempt == 1 else ", one job at a time")
        returns = []
        for offset, overrides in enumerate(job_overrides):
            try:
                returns.extend(one_call(self, [overrides], initial_job_idx + offset))
            except Exception as error:
                if not _worker_died(error):
                    raise
                log.error("job %d: its worker died again; counted as failed", initial_job_idx + offset)
                returns.append(JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error))
        return returns

    return launch


def _worker_died(error: BaseException) -> bool:
    return type(error).__name__ == "TerminatedWorkerError"  # loky's; its module path varies across joblib releases


def task_ranks() -> None:
    """Each task of a submitit job runs as its rank of the job's one run (a job of one task: as before)."""
    try:
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
    except ImportError:  # the `cluster` extra is not installed: no submitit sweeps
        return
    _wrap_once(BaseSubmititLauncher, "__call__", _as_ranks)


def _as_ranks(one_task):
    """BaseSubmititLauncher.__call__ (one task's Hydra job), run as its rank of the job's one run."""

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        from .parallel.launch import scratch_folder
        from .parallel.world import join_submitit_tasks

        world = join_submitit_tasks()  # before anything reads the world: RANK etc. from submitit's tasks
        if not world.main:  # Hydra's files of this task go to its scratch folder; the job's folder is rank 0's
            log_file = f"{scratch_folder(world)}/zobench.log"
            sweep_overrides = [*sweep_overrides, "hydra.output_subdir=null",
                               f"hydra.job_logging.handlers.file.filename='{log_file}'"]
        return one_task(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state)

    return __call__


def _wrap_once(owner: type, name: str, wrap) -> None:
    """Replaces `owner.name` by `wrap(owner.name)`, once: a second call (the CLI and a task both import this
    module) finds it wrapped already."""
    original = getattr(owner, name)
    if getattr(original, "wrapped_by_zobench", False):
        return
    wrapped = wrap(original)
    wrapped.wrapped_by_zobench = True
    setattr(owner, name, wrapped)
