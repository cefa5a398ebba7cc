"""One PNG per task: training loss vs forward passes and vs training seconds, dev metric vs forward passes.

One line per method (per model and method when there are several models), for the setting chosen on dev,
its seeds averaged step by step; the title names the task, the model(s) and how many seeds. Methods that
do not train (zero-shot, ICL, linear probing) have no loss curve: their dev result is one marker at 0
passes, and the legend lists every method with its own colour and marker (13 markers x 10 colours, so no
two of up to 130 lines look alike). Forward passes are the fair budget axis for ZO methods: a MeZO step
costs two, an SGD step one forward and one backward. Seconds are training seconds, as in the cost and
speed tables (loading and evaluations excluded): the log's `train_s` at each dev evaluation, interpolated
by step for the loss points between them; a log from before `train_s` falls back on `elapsed_s`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

from ..safe_files import open_for_write
from .names import output_file, output_folder
from .runs import load_log
from .tables import OPTIMIZER_ORDER, TASK_ORDER, ordered, visible


def curves(run_dirs: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, dev) curves averaged over the runs, step by step; train has `seconds` (training seconds)."""
    logs = [load_log(run_dir) for run_dir in run_dirs]
    logs = [_with_training_seconds(log) for log in logs if not log.empty and "event" in log]
    if not logs:
        return pd.DataFrame(), pd.DataFrame()
    events = pd.concat(logs, ignore_index=True)
    train = events[events["event"] == "train"]
    split = events["split"] if "split" in events else pd.Series(None, index=events.index, dtype=object)
    dev = events[(events["event"] == "eval") & (split == "dev")]
    return _mean_by_step(train, ["loss", "forward_passes", "seconds"]), _mean_by_step(dev, ["metric", "forward_passes"])


def _with_training_seconds(log: pd.DataFrame) -> pd.DataFrame:
    """A `seconds` column: training seconds at each logged step. The runner writes `train_s` at dev evaluations
    only; training time grows with steps between them, so a loss point's is interpolated by step from (0, 0)
    and those evaluations (past the last one, at its rate). Without `train_s` (an older log): `elapsed_s`."""
    log = log.copy()
    numeric = {c: pd.to_numeric(log[c], errors="coerce") if c in log else pd.Series(float("nan"), index=log.index)
               for c in ("step", "train_s", "elapsed_s")}
    known = pd.DataFrame({"step": numeric["step"], "train_s": numeric["train_s"]}).dropna()
    known = known[known["step"] > 0].drop_duplicates("step", keep="last").sort_values("step")
    if known.empty:
        log["seconds"] = numeric["elapsed_s"]
        return log
    steps, seconds = [0.0, *known["step"]], [0.0, *known["train_s"]]
    rate = seconds[-1] / steps[-1]
    interpolated = np.interp(numeric["step"], steps, seconds)
    beyond = numeric["step"] > steps[-1]
    interpolated[beyond] = seconds[-1] + rate * (numeric["step"][beyond] - steps[-1])
    log["seconds"] = numeric["train_s"].fillna(pd.Series(interpolated, index=log.index))
    return log


def _mean_by_step(events: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The columns averaged step by step; a log that lacks one of them (a run killed early, an older or
    hand-edited log) gives no curve rather than a KeyError."""
    if events.empty or "step" not in events or any(c not in events for c in columns):
        return pd.DataFrame()
    numbers = events[["step", *columns]].apply(pd.to_numeric, errors="coerce")
    return numbers.groupby("step")[columns].mean().reset_index()


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d")  # 13: coprime with 10 colours


def line_style(index: int) -> dict:
    """Line `index`'s colour, marker and dash: ten colours, thirteen markers, solid then dashed past ten lines,
    so every (colour, marker) pair differs up to 130 lines."""
    colors = matplotlib.colormaps["tab10"].colors
    return {"color": colors[index % 10], "marker": MARKERS[index % len(MARKERS)],
            "linestyle": ("-", "--", ":")[index // 10 % 3]}


def plot_task(task: str, lines: dict[str, tuple[pd.DataFrame, pd.DataFrame]], path: Path,
              subtitle: str = "", metric: str = "metric") -> None:
    figure = Figure(figsize=(16, 4.6), layout="constrained")
    loss_fp, loss_s, dev_fp = figure.subplots(1, 3)
    for index, (label, (train, dev)) in enumerate(lines.items()):
        style = {**line_style(index), "label": plain(label), "markersize": 5}
        # markers every few points on a loss curve (hundreds of points), at every point of a dev curve
        every = {"markevery": max(1, len(train) // 8)}
        if not train.empty:
            loss_fp.plot(train["forward_passes"], train["loss"], **style, **every)
            loss_s.plot(train["seconds"], train["loss"], **style, **every)
        if not dev.empty:
            dev_fp.plot(dev["forward_passes"], 100 * dev["metric"], **style)
    loss_fp.set(title="training loss", xlabel="forward passes (training)", ylabel="loss")
    loss_s.set(title="training loss", xlabel="training seconds (loading and evaluation excluded)", ylabel="loss")
    metric = plain(metric)
    dev_fp.set(title=f"dev {metric}", xlabel="forward passes (training)", ylabel=f"dev {metric} (%)")
    for axes in (loss_fp, loss_s, dev_fp):
        axes.grid(alpha=0.3)
    figure.suptitle(plain(task) + (f" — {plain(subtitle)}" if subtitle else ""))
    figure.legend(*_every_method([plain(label) for label in lines], loss_fp, loss_s, dev_fp),
                  loc="outside right upper", fontsize="small")
    with open_for_write(path, "wb") as handle:  # never through a link
        figure.savefig(handle, format="png", dpi=100)


def _every_method(order: list[str], *axes_list) -> tuple[list, list]:
    """Legend entries from all panels, once per method, in the tables' order: a method with a dev result alone
    (zero-shot, ICL, LP) is in the legend too."""
    entries: dict[str, object] = {}
    for axes in axes_list:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels = [label for label in order if label in entries]
    return [entries[label] for label in labels], labels


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
        metrics = rows["metric"].dropna()
        plot_task(task, lines, path, subtitle=describe(rows), metric=metrics.iloc[0] if len(metrics) else "metric")
        written.append(path)
    return written


def describe(rows: pd.DataFrame) -> str:
    """'opt-13b; each method at its setting chosen on dev (selection.md), mean of 5 seeds'."""
    models = ", ".join(str(model) for model in dict.fromkeys(rows["model"]))
    seeds = sorted({int(n) for n in pd.to_numeric(rows["seeds"], errors="coerce").dropna()})
    if not seeds:
        count = "seeds averaged"
    elif len(seeds) == 1:
        count = f"mean of {seeds[0]} seed{'s' if seeds[0] != 1 else ''}"
    else:
        count = f"mean of {seeds[0]}–{seeds[-1]} seeds"
    return f"{models}; each method at its setting chosen on dev (selection.md), {count}"
