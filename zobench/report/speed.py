"""Speed to an accuracy: the forward passes and seconds each method needed to reach a target dev metric.

The papers' headline claims are of this kind (Addax 15x / 30x faster than MeZO, AdaMeZO up to 70% fewer
forward passes, Sparse MeZO 3.5x faster convergence; results/reference/*.csv hold them with their sources).
This module reads each chosen setting's log.jsonl dev evaluations (events "eval", split "dev", written by
the runner's `_timed_eval`) and, per (model, task), compares every method with a baseline (MeZO):

- a setting's *dev curve* is its seeds' mean: at each evaluated step, each seed's latest dev evaluation at or
  before that step (a seed that stopped early keeps its last one), with its forward passes and seconds;
- the *target* is the baseline's best point on its curve, or a value the user gives (in percent);
- a method reaches the target at the first step where its curve is >= the target (a tie counts as reached);
  its forward passes are the training forward passes done by then (evaluation's own passes excluded), its
  seconds the training seconds by then (`train_s`: loading and evaluations excluded; a log from before
  `train_s` was written falls back on `elapsed_s`, the wall clock since the job started);
- ratios are baseline / method (">1x": faster than the baseline) and the share of passes saved.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .runs import load_log
from .tables import DASH, _sorted, number

BASELINE = "mezo"
# Reference metrics that are speed claims over MeZO, and how to say them.
CLAIMS = {"speedup_over_mezo_x": "{:g}x faster",
          "forward_pass_reduction_vs_mezo_pct_up_to": "up to {:g}% fewer forward passes"}
TOLERANCE = 1e-9  # the seeds' mean of equal accuracies may differ from the target in the last bit
CURVE = ["step", "metric", "forward_passes", "elapsed_s", "train_s"]  # read from the log
COLUMNS = [*CURVE, "seconds"]  # a curve: the seconds to count are train_s, or elapsed_s in older logs


def run_curve(run_dir: str | Path) -> pd.DataFrame:
    """One run's dev evaluations by step (the last one of a step wins: a resumed job may log it twice)."""
    log = load_log(run_dir)
    if log.empty or not {"event", "split", "step", "metric"} <= set(log.columns):
        return pd.DataFrame(columns=COLUMNS)
    log = log.reindex(columns=[*log.columns, *(c for c in CURVE if c not in log)])  # an older log's gaps: NaN
    dev = log[(log["event"] == "eval") & (log["split"] == "dev")][CURVE].apply(pd.to_numeric, errors="coerce")
    dev = dev.dropna(subset=["step", "metric"]).astype({"step": "int64"})
    dev["seconds"] = dev["train_s"].fillna(dev["elapsed_s"])
    return dev.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def seed_mean_curve(curves: list[pd.DataFrame]) -> pd.DataFrame:
    """The seeds' mean at every evaluated step from the one where every seed has been evaluated."""
    curves = [curve for curve in curves if not curve.empty]
    if not curves:
        return pd.DataFrame(columns=COLUMNS)
    start = max(curve["step"].iloc[0] for curve in curves)
    steps = sorted({step for curve in curves for step in curve["step"] if step >= start})
    grid = pd.DataFrame({"step": pd.Series(steps, dtype="int64")})
    aligned = [pd.merge_asof(grid, curve, on="step") for curve in curves]  # latest evaluation at or before
    return pd.concat(aligned).groupby("step", as_index=False).mean()


def first_reaching(curve: pd.DataFrame, target: float) -> pd.Series | None:
    """The curve's first point at or above the target (None when it never gets there, or no target)."""
    reached = curve[curve["metric"] >= target - TOLERANCE]
    return reached.iloc[0] if len(reached) else None


def speed_table(selected: pd.DataFrame, references: pd.DataFrame, baseline: str = BASELINE,
                target_percent: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (model, task, method) of the chosen settings: passes and seconds to the target, and the ratios."""
    rows = []
    for (model, task), group in _sorted(selected).groupby(["model", "task"], sort=False):
        curves = {row["optimizer"]: (seed_mean_curve([run_curve(d) for d in row["run_dirs"]]), row["seeds"])
                  for _, row in group.iterrows()}
        base_curve = curves[baseline][0] if baseline in curves else pd.DataFrame(columns=COLUMNS)
        if target_percent is not None:
            target = target_percent / 100
        else:  # the baseline's best point; none without a baseline run
            target = base_curve["metric"].max() if not base_curve.empty else math.nan
        base_hit = first_reaching(base_curve, target)
        for optimizer, (curve, seeds) in curves.items():
            if curve.empty:
                continue
            claims = _claims(references, model, task, optimizer) if baseline == BASELINE else _NO_CLAIM
            rows.append({"model": model, "task": task, "optimizer": optimizer, "seeds": seeds,
                         **_to_target(curve, target, base_hit), **claims})
    numbers = pd.DataFrame(rows, columns=[*NUMBER_COLUMNS])
    return _display(numbers, baseline), numbers


def _to_target(curve: pd.DataFrame, target: float, base_hit: pd.Series | None) -> dict:
    hit = first_reaching(curve, target)
    passes_speedup = _ratio(base_hit, hit, "forward_passes")
    return {"target": 100 * target, "best_dev": 100 * curve["metric"].max(), "reached": hit is not None,
            "step": hit["step"] if hit is not None else math.nan,
            "forward_passes": hit["forward_passes"] if hit is not None else math.nan,
            "seconds": hit["seconds"] if hit is not None else math.nan,
            "passes_speedup": passes_speedup, "seconds_speedup": _ratio(base_hit, hit, "seconds"),
            "fewer_passes_pct": 100 * (1 - 1 / passes_speedup) if passes_speedup > 0 else math.nan}


NUMBER_COLUMNS = ["model", "task", "optimizer", "seeds", "target", "best_dev", "reached", "step", "forward_passes",
                  "seconds", "passes_speedup", "seconds_speedup", "fewer_passes_pct", "claim", "claim_source"]
_NO_CLAIM = {"claim": None, "claim_source": None}


def _ratio(base_hit, hit, column: str) -> float:
    """baseline / method; none (a dash) where either reached the target at no cost (at step 0)."""
    if base_hit is None or hit is None or not hit[column] > 0 or not base_hit[column] > 0:
        return math.nan
    return base_hit[column] / hit[column]


def _claims(references: pd.DataFrame, model: str, task: str, optimizer: str) -> dict:
    """The papers' speed claims for this method: this model (or all) and this task (or their average/all)."""
    if references.empty:
        return _NO_CLAIM
    claims = references[references["metric"].isin(CLAIMS) & (references["optimizer"] == optimizer)
                        & references["model"].isin([model, "all"]) & references["task"].isin([task, "avg", "all"])]
    if claims.empty:
        return _NO_CLAIM
    texts = [CLAIMS[c["metric"]].format(c["value"]) + (" (average over tasks)" if c["task"] == "avg" else "")
             for _, c in claims.iterrows()]
    sources = dict.fromkeys(claims["paper"] + ", " + claims["table"])
    return {"claim": "; ".join(texts), "claim_source": "; ".join(sources)}


def _display(numbers: pd.DataFrame, baseline: str) -> pd.DataFrame:
    def reached_at(row) -> str:
        if math.isnan(row["target"]):
            return f"no {baseline} run to set a target"
        return number(row["step"], 0) if row["reached"] else f"never (best {row['best_dev']:.1f})"

    def times(value) -> str:
        return DASH if value is None or math.isnan(value) else f"{value:.2f}x"

    return pd.DataFrame({
        "model": numbers["model"], "task": numbers["task"], "optimizer": numbers["optimizer"],
        "seeds": numbers["seeds"].map(lambda v: number(v, 0)),
        "target dev": numbers["target"].map(number),
        "reached at step": numbers.apply(reached_at, axis=1) if len(numbers) else [],
        "forward passes": numbers["forward_passes"].map(lambda v: number(v, 0)),
        "seconds": numbers["seconds"].map(number),
        f"passes vs {baseline}": numbers["passes_speedup"].map(times),
        f"seconds vs {baseline}": numbers["seconds_speedup"].map(times),
        "fewer passes": numbers["fewer_passes_pct"].map(lambda v: DASH if math.isnan(v) else f"{v:.0f}%"),
        "paper claims": numbers["claim"].fillna(DASH), "claim source": numbers["claim_source"].fillna(DASH),
    })
