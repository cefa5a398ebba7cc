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

    from .configs import check_overrides, hydra_config, register_resolvers, register_tasks, single_valued

    check_overrides(overrides)
    register_resolvers()
    register_tasks()
    # As Hydra's basic sweeper: the preset's sweep (hydra.sweeper.params), then what was typed; a key keeps the
    # place of its first mention and takes its last value.
    params_node = hydra_config(single_valued(overrides)).hydra.sweeper.get("params")
    params = OmegaConf.to_container(params_node, resolve=False) if params_node is not None else {}
    preset = [f"{key}={value}" for key, value in params.items()]
    parser = OverridesParser.create()
    batches = BasicSweeper.split_arguments(parser.parse_overrides(preset + list(overrides)), max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def main(argv: list[str] | None = None) -> int:
    from .failures import command

    parser = argparse.ArgumentParser(prog="zobench-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="what you would give `zobench -m` (experiment=…, key=a,b)")
    parser.add_argument("--cfg", type=int, metavar="N", help="print job N's composed config instead of the list")
    args = parser.parse_args(argv)
    # the one failure policy (failures.py): a bad name or value, Hydra's or OmegaConf's refusals exit 2
    return command("zobench-plan", lambda: _plan(args), refused=(ZobenchError,))


def _plan(args) -> None:
    jobs = sweep_jobs(args.overrides)
    if args.cfg is not None:
        if not 0 <= args.cfg < len(jobs):
            raise ZobenchError(f"--cfg {args.cfg}: this sweep has jobs 0 to {len(jobs) - 1}")
        from .configs import compose, resolved_yaml

        print(resolved_yaml(compose(jobs[args.cfg])), end="")
        return
    width = len(str(len(jobs) - 1))
    for number, job in enumerate(jobs):
        print(f"{number:>{width}}  {' '.join(job)}")
    print(f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}: run them with zobench -m {' '.join(args.overrides)}")


if __name__ == "__main__":
    sys.exit(main())
