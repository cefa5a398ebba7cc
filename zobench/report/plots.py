"""One PNG per task: training loss vs forward passes and vs seconds, dev metric vs forward passes.

One line per optimizer (per model and optimizer when there are several models), for the chosen
setting, its seeds averaged step by step. Forward passes are the fair budget axis for ZO methods:
a MeZO step costs two, an SGD step one forward and one backward.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

from ..safe_files import open_for_write
from .names import output_file, output_folder
from .runs import load_log
from .tables import OPTIMIZER_ORDER, TASK_ORDER, ordered, visible


def curves(run_dirs: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, dev) curves averaged over the runs, step by step."""
    logs = [load_log(run_dir) for run_dir in run_dirs]
    logs = [log for log in logs if not log.empty and "event" in log]
    if not logs:
        return pd.DataFrame(), pd.DataFrame()
    events = pd.concat(logs, ignore_index=True)
    train = events[events["event"] == "train"]
    split = events["split"] if "split" in events else pd.Series(None, index=events.index, dtype=object)
    dev = events[(events["event"] == "eval") & (split == "dev")]
    return _mean_by_step(train, ["loss", "forward_passes", "elapsed_s"]), _mean_by_step(dev, ["metric", "forward_passes"])


def _mean_by_step(events: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The columns averaged step by step; a log that lacks one of them (a run killed early, an older or
    hand-edited log) gives no curve rather than a KeyError."""
    if events.empty or "step" not in events or any(c not in events for c in columns):
        return pd.DataFrame()
    numbers = events[["step", *columns]].apply(pd.to_numeric, errors="coerce")
    return numbers.groupby("step")[columns].mean().reset_index()


def plot_task(task: str, lines: dict[str, tuple[pd.DataFrame, pd.DataFrame]], path: Path) -> None:
    figure = Figure(figsize=(16, 4.2), layout="constrained")
    loss_fp, loss_s, dev_fp = figure.subplots(1, 3)
    colors = matplotlib.colormaps["tab10"].colors
    for index, (label, (train, dev)) in enumerate(lines.items()):
        # ten colours, then the same ten dashed: more than ten lines stay apart
        style = {"color": colors[index % 10], "linestyle": ("-", "--", ":")[index // 10 % 3], "label": plain(label)}
        if not train.empty:
            loss_fp.plot(train["forward_passes"], train["loss"], **style)
            loss_s.plot(train["elapsed_s"], train["loss"], **style)
        if not dev.empty:
            dev_fp.plot(dev["forward_passes"], 100 * dev["metric"], marker="o", **style)
    task = plain(task)
    loss_fp.set(title=f"{task}: training loss", xlabel="forward passes (training)", ylabel="loss")
    loss_s.set(title=f"{task}: training loss", xlabel="seconds since the run started", ylabel="loss")
    dev_fp.set(title=f"{task}: dev metric", xlabel="forward passes (training)", ylabel="dev metric (%)")
    for axes in (loss_fp, loss_s, dev_fp):
        axes.grid(alpha=0.3)
    handles, labels = (loss_fp if loss_fp.lines else dev_fp).get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize="small")
    with open_for_write(path, "wb") as handle:  # never through a link
        figure.savefig(handle, format="png", dpi=100)


def plain(text: object) -> str:
    """A name from a metrics.json as plain text: `$` would start matplotlib's mathtext (one unpaired `$` makes
    savefig raise), control characters are shown as escapes."""
    return visible(str(text)).replace("$", r"\$")


def plot_all(selected: pd.DataFrame, out_dir: Path) -> list[Path]:
    """plots/<task>.png for every task of the selected settings (an odd task name is made a plain file name:
    zobench/report/names.py); returns the files written."""
    out_dir = output_folder(out_dir)
    several_models = selected["model"].nunique() > 1
    written = []
    for task in ordered(selected["task"], TASK_ORDER):
        rows = selected[selected["task"] == task]
        lines = {}
        for optimizer in ordered(rows["optimizer"], OPTIMIZER_ORDER):
            for _, row in rows[rows["optimizer"] == optimizer].iterrows():
                label = f"{row['model']} {optimizer}" if several_models else optimizer
                lines[label] = curves(row["run_dirs"])
        path = output_file(out_dir, task, ".png")
        plot_task(task, lines, path)
        written.append(path)
    return written
