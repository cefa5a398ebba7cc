"""Putting a report together: runs -> selection -> tables, plots and the papers' numbers, in one folder.

What lands in the output folder (each table as .md, .tex and .csv):
  accuracy     test accuracy/F1 (%) per optimizer × task, mean ± std over seeds, plus the average
  selection    the setting chosen per (model, task, optimizer) on dev, and how many were tried
  cost         steps, forward/backward passes, training seconds and seconds per step
  memory       peak memory (GB) and how it was measured
  comparison   ours, the paper's, and the difference (results/reference/*.csv)
  speed        forward passes and seconds to a target dev metric, as ratios to MeZO beside the papers' claims
  runs         every run found; failures: the ones that did not complete, with their message
  plots/<task>.png
  index.html   all of the above on one page (zobench/report/html.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import tables
from .html import write_index
from .references import load_references
from .runs import load_runs
from .selection import not_completed, select_best
from .speed import BASELINE, speed_table


@dataclass
class Report:
    out_dir: Path
    runs: int
    completed: int
    left_out: int
    main_table: str
    failures: str
    plots: list[Path] = field(default_factory=list)
    references: int = 0
    speed_table: str = ""


def build_report(paths: list[str | Path], out_dir: Path, reference_dir: Path | None = None,
                 plots: bool = True, speed_baseline: str = BASELINE,
                 speed_target: float | None = None) -> Report:
    runs = load_runs(paths)
    if runs.empty:
        return Report(out_dir=Path(out_dir), runs=0, completed=0, left_out=0, main_table="", failures="")
    selected = select_best(runs)
    out_dir = Path(out_dir)
    accuracy, accuracy_numbers = tables.accuracy_table(selected)
    shown = {}  # each table's display frame, for index.html

    def write(name, display, numbers=None):
        shown[name] = display
        tables.write_table(out_dir, name, display, numbers)

    write("accuracy", accuracy, accuracy_numbers)
    write("selection", tables.selection_table(selected))
    write("cost", *tables.cost_table(selected))
    write("memory", *tables.memory_table(selected))
    references = load_references(reference_dir)
    write("comparison", *tables.comparison_table(selected, references))
    speed, speed_numbers = speed_table(selected, references, speed_baseline, speed_target)
    write("speed", speed, speed_numbers)
    write("runs", tables.runs_table(runs), runs)
    failures = tables.failures_table(runs)
    write("failures", failures)
    written = _plots(selected, out_dir) if plots else []
    write_index(out_dir, shown, written)
    left_out = len(not_completed(runs))
    return Report(out_dir=out_dir, runs=len(runs), completed=len(runs) - left_out, left_out=left_out,
                  main_table=tables.to_markdown(accuracy), failures=tables.to_markdown(failures),
                  plots=written, references=len(references), speed_table=tables.to_markdown(speed))


def _plots(selected, out_dir: Path) -> list[Path]:
    if selected.empty:
        return []
    from .plots import plot_all  # matplotlib only when plotting

    return plot_all(selected, out_dir / "plots")
