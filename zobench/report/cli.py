"""`zobench-report PATH...`: lists the runs under the given folders (the tables come with issue #6)."""

from __future__ import annotations

import argparse
import sys

from .runs import find_runs

COLUMNS = ["task", "model", "optimizer", "seed", "status", "metric", "dev_metric", "test_metric", "steps",
           "forward_passes", "wall_clock_s", "peak_memory_bytes", "run_dir"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zobench-report", description=__doc__)
    parser.add_argument("paths", nargs="*", default=["results"], help="run or sweep folders (default: results)")
    args = parser.parse_args(argv)
    runs = find_runs(args.paths)
    if not runs:
        print(f"zobench-report: no runs (metrics.json) under {', '.join(args.paths)}", file=sys.stderr)
        return 1
    from tabulate import tabulate

    rows = [[run.get(column) for column in COLUMNS] for run in runs]
    print(tabulate(rows, headers=COLUMNS, floatfmt=".4g"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
