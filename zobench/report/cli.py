"""`zobench-report PATH...`: the tables of every run under the given folders, and the papers' beside them.

Reads files only (metrics.json, config.yaml, log.jsonl): no torch, no runner, so a laptop can
report a cluster's results. Writes Markdown, LaTeX and CSV tables and PNG plots to an output
folder (default: report/ beside the runs) and prints the main table.

Exit status: 0 report written; 1 no runs found, or the output folder cannot be written (one line: read-only,
disk full, a link: the report never writes through one); 2 a given folder does not exist. A metrics.json or
config.yaml that cannot be read (safe_files' rules: regular files only, size and depth limits) gets a
one-line warning and its run is listed as unreadable; a log.jsonl that cannot be read gets one and leaves
that run out of the plots and the speed table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..failures import command
from .build import build_report
from .references import default_reference_dir
from .speed import BASELINE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # an output folder that is a link, read-only or full: 1; a malformed reference CSV (a ValueError): 2
    return command("zobench-report", lambda: _report(args), refused=(ValueError,))


def _report(args: argparse.Namespace) -> int:
    missing = [path for path in args.paths if not Path(path).exists()]
    if missing:
        print(f"zobench-report: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    out_dir = Path(args.output) if args.output else default_output(args.paths)
    reference_dir = Path(args.reference) if args.reference else default_reference_dir()
    if args.no_reference:
        reference_dir = None
    report = build_report(args.paths, out_dir, reference_dir, plots=not args.no_plots,
                          speed_baseline=args.speed_baseline, speed_target=args.speed_target)
    if report.runs == 0:
        print(f"zobench-report: no runs (metrics.json) under {', '.join(args.paths)}", file=sys.stderr)
        return 1
    print("Test accuracy / F1 (%), mean ± std over seeds; setting per (model, task, optimizer) chosen on dev "
          "(selection.md)\n")
    print(report.main_table)
    print(f"\nForward passes and seconds to the target dev metric, as ratios to {args.speed_baseline} (speed.md)\n")
    print(report.speed_table)
    print(f"\n{report.runs} runs: {report.completed} completed, {report.left_out} left out of the averages")
    if report.left_out:
        print(report.failures)
    if reference_dir is None and not args.no_reference:
        print("no results/reference folder here: the comparison has no paper numbers (--reference DIR)")
    print(f"\ntables (.md .tex .csv){' and plots' if report.plots else ''} in {out_dir}; "
          f"all on one page: {out_dir / 'index.html'}")
    return 0


def default_output(paths: list[str]) -> Path:
    """report/ in the folder that holds all the given runs."""
    folders = [Path(path).resolve() for path in paths]
    return Path(os.path.commonpath(folders)) / "report"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zobench-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["results"],
                        help="run or sweep folders, searched for metrics.json (default: results)")
    parser.add_argument("-o", "--output", help="output folder (default: report/ beside the runs)")
    parser.add_argument("--reference", help="the papers' CSVs (default: the checkout's results/reference)")
    parser.add_argument("--no-reference", action="store_true", help="leave the papers' numbers out")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--speed-baseline", default=BASELINE, metavar="OPTIMIZER",
                        help="the method the speed table compares with (default: %(default)s)")
    parser.add_argument("--speed-target", type=float, metavar="PERCENT",
                        help="dev accuracy/F1 (%%) to reach (default: the baseline's best, per model and task)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
