"""Which hyperparameter setting represents each (model, task, optimizer): the best on DEV.

A *setting* is the set of config values that differ between the runs of one (model, task,
optimizer), seeds aside; its runs over different seeds are averaged. The setting with the best
mean dev metric is chosen and its test metric reported — never chosen on test (ZO-Bench selects
on test; we don't). Only completed runs enter the averages; the others are counted as excluded.
"""

from __future__ import annotations

import math

import pandas as pd

from .runs import CONFIG_PREFIX

GROUP = ["model", "task", "optimizer"]
SEED_COLUMNS = {CONFIG_PREFIX + "seed", CONFIG_PREFIX + "data.seed"}  # replicates, not settings
# Where the files came from, not how the model was trained.
NOT_A_SETTING = {CONFIG_PREFIX + key for key in ("results_dir", "model.path", "task.data_dir", "device")}
COST_COLUMNS = ["wall_clock_s", "train_wall_clock_s", "steps", "forward_passes", "backward_passes"]


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "completed"]


def not_completed(runs: pd.DataFrame) -> pd.DataFrame:
    """Failed, diverged, interrupted, still running (or killed hard) and unreadable runs."""
    return runs[runs["status"] != "completed"]


def setting_columns(group: pd.DataFrame) -> list[str]:
    """Config columns whose values differ between the completed runs of one (model, task, optimizer).

    Completed runs decide (all runs when none completed), so a failed job with, say, a wrong data
    path does not add its quirks to every label.
    """
    if (group["status"] == "completed").any():
        group = completed(group)
    candidates = [column for column in group.columns if column.startswith(CONFIG_PREFIX)
                  and column not in SEED_COLUMNS and column not in NOT_A_SETTING]
    # nunique skips missing values: a key that older runs lack is no difference by itself
    return [column for column in candidates if group[column].dropna().map(show_value).nunique() > 1]


def show_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_labels(group: pd.DataFrame) -> pd.Series:
    """'optimizer.lr=1e-06, train.batch_size=16' per run; 'default' when nothing varies."""
    columns = setting_columns(group)
    if not columns:
        return pd.Series("default", index=group.index)
    return group[columns].apply(
        lambda row: ", ".join(f"{c[len(CONFIG_PREFIX):]}={show_value(row[c])}" for c in columns), axis=1)


def label_runs(runs: pd.DataFrame) -> pd.Series:
    """Each run's setting label, worked out within its (model, task, optimizer)."""
    labels = pd.Series("-", index=runs.index, dtype=object)
    for _, group in runs.groupby(GROUP, sort=False):  # unreadable runs (no names) keep "-"
        labels[group.index] = setting_labels(group)
    return labels


def summarize_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, task, optimizer, setting): seed means and sample stds (n-1) of completed runs."""
    labelled = runs.assign(setting=label_runs(runs))
    rows = [_summary(dict(zip([*GROUP, "setting"], keys)), group)
            for keys, group in labelled.groupby([*GROUP, "setting"], sort=False)]
    summary = pd.DataFrame(rows, columns=[*GROUP, "setting", *_SUMMARY_COLUMNS])
    summary["candidates"] = summary.groupby(GROUP)["setting"].transform("size")
    return summary


_SUMMARY_COLUMNS = ["metric", "seeds", "excluded", "dev_mean", "dev_std", "test_mean", "test_std",
                    *COST_COLUMNS, "seconds_per_step", "peak_memory_gb", "peak_memory_method", "device",
                    "run_dirs"]


def _summary(keys: dict, runs: pd.DataFrame) -> dict:
    done = completed(runs)
    row = {**keys, "seeds": len(done), "excluded": len(runs) - len(done),
           "metric": _first(runs["metric"]), "run_dirs": list(done["run_dir"])}
    for name, column in (("dev", "dev_metric"), ("test", "test_metric")):
        values = _numeric(done, column)
        row[f"{name}_mean"], row[f"{name}_std"] = values.mean(), values.std(ddof=1)
    for column in COST_COLUMNS:
        row[column] = _numeric(done, column).mean()
    steps = row["steps"]
    row["seconds_per_step"] = row["train_wall_clock_s"] / steps if steps else math.nan  # NaN steps stay NaN
    row["peak_memory_gb"] = _numeric(done, "peak_memory_bytes").max() / 1e9  # the worst seed: it is a peak
    row["peak_memory_method"] = _first(done.get("peak_memory_method", pd.Series(dtype=object)))
    row["device"] = _first(done.get("device", pd.Series(dtype=object)))
    return row


def _numeric(runs: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(runs[column], errors="coerce") if column in runs else pd.Series(dtype=float)


def _first(values: pd.Series):
    values = values.dropna()
    return values.iloc[0] if len(values) else None


def select_best(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, task, optimizer) the setting with the best mean dev metric (ties: more seeds, then name).

    Settings without a completed run are never chosen; a setting without a dev metric only when
    no setting has one (its row then says so through a missing dev_mean).
    """
    summary = summarize_settings(runs)
    eligible = summary[summary["seeds"] > 0]
    ranked = eligible.sort_values(["dev_mean", "seeds", "setting"], ascending=[False, False, True],
                                  na_position="last", kind="stable")
    return ranked.groupby(GROUP, sort=False).head(1).reset_index(drop=True)
