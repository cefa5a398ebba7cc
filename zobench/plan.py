"""`zobench-plan OVERRIDES...`: the jobs a sweep (`zobench -m OVERRIDES...`) would run, listed, nothing run.

Hydra's `--cfg job` prints one composed config and cannot expand a sweep (with `-m` it stops on a
ValueError). This composes the same config `zobench -m` would, takes the preset's `hydra.sweeper.params`
and the comma lists typed on the command line, and expands them as Hydra's basic sweeper does (the same
order, so job N here is job N of the sweep, `N_…` folder included). `--cfg N` prints job N's composed
config (what `zobench --cfg job` prints for one run). Exit status: 0 listed; 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import sys

from .errors import ZobenchError


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Each job's overrides, in the order the basic sweeper launches them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from .configs import check_overrides, register_resolvers, register_tasks
    from .paths import conf_dir
    from hydra import compose, initialize_config_dir

    check_overrides(overrides)
    register_resolvers()
    register_tasks()
    parser = OverridesParser.create()
    typed = parser.parse_overrides(overrides)
    # As Hydra's basic sweeper: the preset's sweep (hydra.sweeper.params), then what was typed; a key keeps the
    # place of its first mention and takes its last value.
    fixed = [o.input_line for o in typed if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        hydra_cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True).hydra
    params_node = hydra_cfg.sweeper.get("params")
    params = OmegaConf.to_container(params_node, resolve=False) if params_node is not None else {}
    preset = [f"{key}={value}" for key, value in params.items()]
    merged = preset + [o.input_line for o in typed]
    batches = BasicSweeper.split_arguments(parser.parse_overrides(merged), max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zobench-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="what you would give `zobench -m` (experiment=…, key=a,b)")
    parser.add_argument("--cfg", type=int, metavar="N", help="print job N's composed config instead of the list")
    args = parser.parse_args(argv)
    try:
        jobs = sweep_jobs(args.overrides)
        if args.cfg is not None:
            if not 0 <= args.cfg < len(jobs):
                raise ZobenchError(f"--cfg {args.cfg}: this sweep has jobs 0 to {len(jobs) - 1}")
            from .configs import compose, resolved_yaml

            print(resolved_yaml(compose(jobs[args.cfg])), end="")
            return 0
    except ZobenchError as error:
        print(f"zobench-plan: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except Exception as error:  # Hydra's or OmegaConf's: an override it cannot apply
        print(f"zobench-plan: error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 2
    width = len(str(len(jobs) - 1))
    for number, job in enumerate(jobs):
        print(f"{number:>{width}}  {' '.join(job)}")
    print(f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}: run them with zobench -m {' '.join(args.overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
