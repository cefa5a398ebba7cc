"""The report's tables as DataFrames, and writing each as Markdown, LaTeX and CSV with pandas' own writers.

Each table comes as a display frame (formatted text: `91.4 ± 0.3`, for .md and .tex) and a
numbers frame (plain numbers, for .csv and scripts). Accuracy and F1 are shown in percent, as
the papers print them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from .selection import GROUP, label_runs, not_completed

# Display order only (MeZO Table 1's columns, then the methods roughly as the papers list them);
# names not listed here still appear, after these, alphabetically.
TASK_ORDER = ["sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop"]
OPTIMIZER_ORDER = ["zero_shot", "icl", "lp", "head_tuning", "mezo", "mezo_lora", "mezo_prefix", "sparse_mezo",
                   "adamezo", "zo_sgd_momentum", "zo_sgd_sign", "zo_sgd_sign_plain", "zo_adam", "addax", "ip_sgd",
                   "sgd", "adam", "adam_lora", "adam_prefix"]
DASH = "-"


def ordered(names, preferred: list[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    return [n for n in preferred if n in names] + sorted(n for n in names if n not in preferred)


def percent(mean: float, std: float = math.nan) -> str:
    if mean is None or math.isnan(mean):
        return DASH
    return f"{100 * mean:.1f}" if std is None or math.isnan(std) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def number(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:,.{digits}f}"


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by model, then optimizer and task in display order."""
    if frame.empty:
        return frame
    rank = {name: i for i, name in enumerate(ordered(frame["optimizer"], OPTIMIZER_ORDER))}
    task_rank = {name: i for i, name in enumerate(ordered(frame["task"], TASK_ORDER))}
    keys = frame.assign(_o=frame["optimizer"].map(rank), _t=frame["task"].map(task_rank))
    return keys.sort_values(["model", "_o", "_t"], kind="stable").drop(columns=["_o", "_t"])


# -- 1. accuracy / F1 -------------------------------------------------------------------------------
def accuracy_table(selected: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows (model, optimizer), columns tasks, plus `avg` (only for rows that have every task)."""
    numbers = _sorted(selected)[[*GROUP, "setting", "metric", "seeds", "excluded", "candidates",
                                  "dev_mean", "test_mean", "test_std"]].copy()
    for column in ("dev_mean", "test_mean", "test_std"):
        numbers[column] = 100 * numbers[column]
    if selected.empty:
        return pd.DataFrame(columns=["model", "optimizer"]), numbers
    tasks = ordered(selected["task"], TASK_ORDER)
    metric_of = selected.groupby("task")["metric"].first()
    headers = {task: task if metric_of[task] == "accuracy" else f"{task} ({metric_of[task]})" for task in tasks}
    rows = []
    for (model, optimizer), group in _sorted(selected).groupby(["model", "optimizer"], sort=False):
        by_task = group.set_index("task")
        row = {"model": model, "optimizer": optimizer}
        means, stds = by_task["test_mean"], by_task["test_std"]
        for task in tasks:
            row[headers[task]] = percent(means.get(task, math.nan), stds.get(task, math.nan))
        complete = all(task in by_task.index for task in tasks) and by_task["test_mean"].notna().all()
        row["avg"] = percent(by_task["test_mean"].mean()) if complete and len(tasks) > 1 else DASH
        rows.append(row)
    return pd.DataFrame(rows), numbers


def selection_table(selected: pd.DataFrame) -> pd.DataFrame:
    """Which setting was chosen (best mean dev metric), out of how many, over how many seeds."""
    frame = _sorted(selected)
    return pd.DataFrame({
        "model": frame["model"], "task": frame["task"], "optimizer": frame["optimizer"],
        "chosen setting (best dev)": frame["setting"], "settings tried": frame["candidates"],
        "seeds": frame["seeds"], "runs left out": frame["excluded"],
        "dev": [percent(m) for m in frame["dev_mean"]],
        "test": [percent(m, s) for m, s in zip(frame["test_mean"], frame["test_std"])],
    })


# -- 2. time and forward passes; 3. memory -----------------------------------------------------------
def cost_table(selected: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = _sorted(selected)
    numbers = frame[[*GROUP, "setting", "steps", "forward_passes", "backward_passes", "train_wall_clock_s",
                     "seconds_per_step", "wall_clock_s"]]
    display = pd.DataFrame({
        "model": frame["model"], "task": frame["task"], "optimizer": frame["optimizer"],
        "steps": [number(v, 0) for v in frame["steps"]],
        "forward passes": [number(v, 0) for v in frame["forward_passes"]],
        "backward passes": [number(v, 0) for v in frame["backward_passes"]],
        "train s": [number(v) for v in frame["train_wall_clock_s"]],
        "s / step": [number(v, 3) for v in frame["seconds_per_step"]],
        "total s": [number(v) for v in frame["wall_clock_s"]],
    })
    return display, numbers


def memory_table(selected: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = _sorted(selected)
    numbers = frame[[*GROUP, "setting", "peak_memory_gb", "peak_memory_method", "device"]]
    display = pd.DataFrame({
        "model": frame["model"], "task": frame["task"], "optimizer": frame["optimizer"],
        "peak GB": [number(v, 2) for v in frame["peak_memory_gb"]],
        "measured as": frame["peak_memory_method"], "device": frame["device"],
    })
    return display, numbers


# -- 4. side by side with the papers -----------------------------------------------------------------
def ours_long(selected: pd.DataFrame) -> pd.DataFrame:
    """Our numbers in the references' shape: (model, task, optimizer, metric, value)."""
    columns = [*GROUP, "metric", "value"]
    parts = [selected.assign(value=100 * selected["test_mean"])[columns]]  # percent, as the papers
    for metric in ("peak_memory_gb", "seconds_per_step"):
        parts.append(selected.assign(metric=metric, value=selected[metric])[columns])
    return pd.concat(parts, ignore_index=True)


def comparison_table(selected: pd.DataFrame, references: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ours, the paper's, and ours minus the paper's, for every result of ours a paper also reports.

    Accuracy/F1 rows are kept even without a paper number (so it shows what is missing); memory
    and time rows only where a paper gives one.
    """
    ours = ours_long(selected).rename(columns={"value": "ours"})
    papers = references.assign(paper_source=references["paper"] + ", " + references["table"])
    papers = papers.drop(columns=["paper"]).rename(columns={"value": "paper"})
    papers = papers[[*GROUP, "metric", "paper", "paper_source"]]
    merged = ours.merge(papers, on=[*GROUP, "metric"], how="left")
    accuracy_like = merged["metric"].isin(selected["metric"].dropna().unique())
    merged = _sorted(merged[accuracy_like | merged["paper"].notna()])
    merged = merged.assign(difference=merged["ours"] - merged["paper"])
    display = pd.DataFrame({
        "model": merged["model"], "task": merged["task"], "optimizer": merged["optimizer"],
        "metric": merged["metric"], "ours": [number(v) for v in merged["ours"]],
        "paper": [number(v) for v in merged["paper"]], "ours - paper": [_signed(v) for v in merged["difference"]],
        "source": merged["paper_source"].fillna(DASH),
    })
    return display, merged


def _whole(value) -> str:
    """Seeds come back as floats once a column has a gap; show them as the integers they are."""
    try:
        return str(int(value))
    except (TypeError, ValueError):
        return DASH


def _signed(value) -> str:
    return DASH if value is None or math.isnan(value) else f"{value:+.1f}"


# -- runs, and the ones left out ----------------------------------------------------------------------
def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    frame = runs.assign(setting=label_runs(runs))
    table = pd.DataFrame({
        "model": frame["model"], "task": frame["task"], "optimizer": frame["optimizer"],
        "seed": frame["seed"].map(_whole), "setting": frame["setting"], "status": frame["status"],
        "dev": [percent(v) for v in pd.to_numeric(frame["dev_metric"], errors="coerce")],
        "test": [percent(v) for v in pd.to_numeric(frame["test_metric"], errors="coerce")],
        "run": frame["run_dir"],
    })
    return table.astype(object).fillna(DASH)  # an unreadable metrics.json has no names


def failures_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run that did not complete, with its status and message: left out of all averages."""
    frame = not_completed(runs)
    silent = (frame["status"] == "running") & frame["error"].isna()
    message = frame["error"].where(~silent, "no end recorded: still running, or killed before it could write one")
    table = pd.DataFrame({
        "status": frame["status"], "model": frame["model"], "task": frame["task"],
        "optimizer": frame["optimizer"], "seed": frame["seed"].map(_whole), "message": message,
        "run": frame["run_dir"],
    })
    return table.astype(object).fillna(DASH)


# -- writing -----------------------------------------------------------------------------------------
def write_table(out_dir: Path, name: str, display: pd.DataFrame, numbers: pd.DataFrame | None = None) -> None:
    """name.md and name.tex from the display frame; name.csv from the numbers (or the display frame)."""
    from .names import output_folder, write_output

    out_dir = output_folder(out_dir)
    write_output(out_dir, name, ".md", lambda handle: handle.write(to_markdown(display) + "\n"))
    write_output(out_dir, name, ".tex", lambda handle: handle.write(to_latex(display)))
    csv = numbers if numbers is not None else display
    write_output(out_dir, name, ".csv", lambda handle: csv.to_csv(handle, index=False))  # csv quotes what needs it


def to_markdown(display: pd.DataFrame) -> str:
    """A GFM table; every cell and header escaped (markdown_cell), so a name from a metrics.json cannot add
    rows or columns. disable_numparse: cells are already formatted text ("75.0" must not become "75")."""
    if display.empty:
        return "(none)"
    escaped = display.map(markdown_cell).rename(columns=markdown_cell)
    return escaped.to_markdown(index=False, disable_numparse=True)


def to_latex(display: pd.DataFrame) -> str:
    """LaTeX escapes the specials; line breaks and other control characters are shown as escapes first (a
    blank line inside a tabular cell would end the table)."""
    shown = display.astype(str).map(visible).rename(columns=visible)
    text = shown.style.hide(axis="index").format(escape="latex") \
        .format_index(escape="latex", axis=1).to_latex(hrules=True)
    return text.replace("±", r"$\pm$")


# Characters that end a line in some reader (C0/C1 controls, DEL, Unicode line and paragraph separators).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": r"\n", "\r": r"\r", "\t": r"\t"}


def visible(value):
    """A text's control characters as escapes (\\n, \\x1b, \\u2028): one line, nothing for a terminal to act on."""
    return _CONTROL.sub(_escape, value) if isinstance(value, str) else value


def _escape(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def markdown_cell(value):
    """A GFM table cell: backslashes and pipes escaped (a `|` would add a column), control characters shown as
    escapes (a line break would add a row)."""
    if not isinstance(value, str):
        return value
    return visible(value.replace("\\", "\\\\").replace("|", "\\|"))
