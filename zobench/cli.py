"""`zobench`: the Hydra entry point. cfg -> run(cfg); known errors become one line on stderr.

Exit status of a single run: 0 completed (or diverged: a result, reported as such), 1 failed,
2 bad input before the run started, 130 interrupted. In a multirun a failed job is recorded and
reported, and the sweep goes on with the next job.
"""

from __future__ import annotations

import sys

from .errors import Interrupted, ZobenchError


def _say(message: str) -> None:
    print(f"zobench: {message}", file=sys.stderr, flush=True)


def _job(cfg) -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .run import run

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        metrics = run(cfg, run_dir)
    except (KeyboardInterrupt, Interrupted):
        _say(f"interrupted; what was done is recorded in {run_dir}")
        sys.exit(130)
    except ZobenchError as error:
        _say(f"error: {error} [run directory: {run_dir}]")
        if in_sweep:
            return "failed"
        sys.exit(1)
    except Exception as error:  # a bug or an environment problem: the traceback is in zobench.log
        _say(f"failed: {type(error).__name__}: {error} [traceback in {run_dir}/zobench.log]")
        if in_sweep:
            return "failed"
        sys.exit(1)
    value = metrics["test_metric"]
    shown = "n/a" if value is None else f"{value:.4f}"
    if metrics["status"] == "diverged":
        print(f"diverged: {metrics['error']}; results in {run_dir}", flush=True)
    else:
        print(f"{metrics['status']}: test {metrics['metric']} = {shown}; results in {run_dir}", flush=True)
    return metrics["status"]


def main() -> None:
    import hydra

    from .configs import check_overrides, register_resolvers, register_tasks
    from .paths import conf_dir

    overrides = [arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")]
    try:
        check_overrides(overrides)
        register_resolvers()
        register_tasks()
    except ZobenchError as error:
        _say(f"error: {error}")
        sys.exit(2)
    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_job)()


if __name__ == "__main__":
    main()
