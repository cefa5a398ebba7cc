"""`zobench`: the Hydra entry point. cfg -> run(cfg); known errors become one line on stderr.

`zobench resume=RUN_DIR` re-runs the command that made RUN_DIR in RUN_DIR, which resumes an
interrupted or failed run from its checkpoint (re-running a command with hydra.run.dir=RUN_DIR does
the same). A run directory's rules (its lock, what is refused) are zobench/run_dir.py's.

Exit status of a single run: 0 completed (or diverged: a result, reported as such), 1 failed,
2 bad input before the run started, 130 interrupted. In a multirun a failed job is recorded and
reported, and the sweep goes on with the next job.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import Interrupted, ZobenchError

# The command line that started a run, kept in its directory for `resume=` (Hydra's own copy in
# .hydra/ is rewritten by every later command pointed at the directory).
OVERRIDES_FILE = "overrides.yaml"


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
        metrics = run(cfg, run_dir, overrides=list(hydra_cfg.overrides.task))
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


def _expand_resume(argv: list[str]) -> list[str]:
    """`resume=RUN_DIR` means: the command that made RUN_DIR, again, in RUN_DIR (which resumes it)."""
    asked = [arg for arg in argv if arg.startswith("resume=")]
    if not asked:
        return argv
    import yaml

    run_dir = Path(asked[-1].split("=", 1)[1]).expanduser()
    overrides_file = run_dir / OVERRIDES_FILE
    if not overrides_file.exists():
        raise ZobenchError(f"resume={run_dir}: no zobench run there (looked for {overrides_file})")
    try:
        original = yaml.safe_load(overrides_file.read_text(encoding="utf-8")) or []
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())  # YAML errors span lines
        raise ZobenchError(f"resume={run_dir}: {overrides_file} is not a readable list of overrides ({reason})")
    if not isinstance(original, list) or not all(isinstance(o, str) for o in original):
        raise ZobenchError(f"resume={run_dir}: {overrides_file} is not a list of overrides")
    rest = [arg for arg in argv if not arg.startswith("resume=")]
    return original + rest + [f"hydra.run.dir={run_dir}"]


def main() -> None:
    import hydra

    from .configs import check_overrides, register_resolvers, register_tasks
    from .paths import conf_dir
    from .run_dir import claim_named_run_dir

    try:
        sys.argv[1:] = _expand_resume(sys.argv[1:])
    except ZobenchError as error:
        _say(f"error: {error}")
        sys.exit(2)
    overrides = [arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")]
    try:
        check_overrides(overrides)
        register_resolvers()
        register_tasks()
        claim_named_run_dir(sys.argv[1:])  # the lock before Hydra writes .hydra/ and zobench.log there
    except ZobenchError as error:
        _say(f"error: {error}")
        sys.exit(2)
    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_job)()


if __name__ == "__main__":
    main()
