"""Hydra's joblib launcher (hydra/launcher=local_parallel or joblib), made to survive a dead worker.

Hydra's launcher runs a sweep as one joblib call on loky: when one worker dies (SIGKILL, the OOM killer), loky
breaks the whole pool and every other job of the sweep is abandoned. Here the sweep is launched again instead;
the jobs that completed are counted, not run again (cli._job), a job cut short resumes from its checkpoint or
starts again (run_dir's attempts/). If a worker dies a second time, the remaining jobs run one at a time, so a
job whose worker dies once more is the one that kills it: it counts as failed and the others go on.

Hydra loads launchers only from its `hydra_plugins` package, so this wraps the plugin's `launch` (as
cli._SweepWatch wraps Hydra.multirun) rather than registering a launcher of its own.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def survive_dead_workers() -> None:
    try:
        from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
    except ImportError:  # the `cluster` extra is not installed: no joblib sweeps
        return
    if getattr(JoblibLauncher.launch, "survives_dead_workers", False):
        return
    one_call = JoblibLauncher.launch

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

    launch.survives_dead_workers = True
    JoblibLauncher.launch = launch


def _worker_died(error: BaseException) -> bool:
    return type(error).__name__ == "TerminatedWorkerError"  # loky's; its module path varies across joblib releases
