"""zobench-report's speed table: forward passes and seconds to a target dev metric, from crafted log.jsonl files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from zobench.report.cli import main
from zobench.report.speed import run_curve, seed_mean_curve


def write_run(root: Path, optimizer: str, evals: list[tuple[int, float, int, float]], seed: int = 0,
              model: str = "opt-13b", task: str = "rte") -> Path:
    """A completed run whose log holds dev evaluations (step, metric, forward passes, elapsed seconds)."""
    run_dir = root / f"{optimizer}_{task}_{model}_s{seed}"
    run_dir.mkdir(parents=True)
    best = max(metric for _, metric, _, _ in evals)
    (run_dir / "metrics.json").write_text(json.dumps({
        "task": task, "model": model, "optimizer": optimizer, "seed": seed, "status": "completed",
        "metric": "accuracy", "dev_metric": best, "test_metric": best, "steps": evals[-1][0]}))
    (run_dir / "config.yaml").write_text(f"seed: {seed}\noptimizer:\n  name: {optimizer}\n")
    lines = [{"event": "train", "step": 1, "loss": 0.7, "lr": 1e-6, "elapsed_s": 0.5, "forward_passes": 2}]
    for step, metric, passes, seconds in evals:
        lines.append({"event": "eval", "split": "dev", "step": step, "metric": metric, "loss": 0.6,
                      "accuracy": metric, "elapsed_s": seconds, "forward_passes": passes})
    lines.append({"event": "eval", "split": "test", "step": evals[-1][0], "metric": 0.99, "loss": 0.1,
                  "elapsed_s": 999.0, "forward_passes": 10 ** 9})  # test evaluations never count
    (run_dir / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


@pytest.fixture
def table(tmp_path):
    """MeZO peaks at 70% (step 2000); Addax passes it early; Sparse MeZO never gets there; AdaMeZO ties it."""
    runs = tmp_path / "runs"
    write_run(runs, "mezo", [(1000, 0.60, 2000, 100.0), (2000, 0.70, 4000, 200.0), (3000, 0.65, 6000, 300.0)])
    write_run(runs, "addax", [(100, 0.50, 150, 10.0), (200, 0.75, 300, 20.0), (300, 0.80, 450, 30.0)])
    write_run(runs, "sparse_mezo", [(1000, 0.55, 2000, 100.0), (2000, 0.69, 4000, 200.0)])
    # two seeds: 60/80 then 80/60, a mean of exactly 70 at both steps: the first tie counts
    write_run(runs, "adamezo", [(500, 0.6, 1000, 40.0), (1000, 0.8, 2000, 80.0)], seed=0)
    write_run(runs, "adamezo", [(500, 0.8, 1000, 60.0), (1000, 0.6, 2000, 100.0)], seed=1)
    return runs


def speed(tmp_path, runs: Path, *options: str) -> tuple[pd.DataFrame, str, str]:
    out = tmp_path / "report"
    assert main([str(runs), "-o", str(out), "--no-plots", *options]) == 0
    return pd.read_csv(out / "speed.csv").set_index("optimizer"), (out / "speed.md").read_text(), \
        (out / "speed.tex").read_text()


def test_passes_and_seconds_to_the_baselines_best_dev_metric(table, tmp_path, capsys):
    rows, markdown, latex = speed(tmp_path, table)
    assert rows["target"].tolist() == pytest.approx([70.0] * 4)  # MeZO's best dev point, not its last
    mezo, addax = rows.loc["mezo"], rows.loc["addax"]
    assert (mezo["step"], mezo["forward_passes"], mezo["seconds"]) == (2000, 4000, 200.0)
    assert (addax["step"], addax["forward_passes"], addax["seconds"]) == (200, 300, 20.0)
    assert addax["passes_speedup"] == pytest.approx(4000 / 300) and addax["seconds_speedup"] == pytest.approx(10.0)
    assert addax["fewer_passes_pct"] == pytest.approx(100 * (1 - 300 / 4000))
    assert mezo["passes_speedup"] == pytest.approx(1.0)
    assert "13.33x" in markdown and "10.00x" in markdown and "13.33x" in latex
    assert "Forward passes and seconds to the target" in capsys.readouterr().out


def test_a_method_that_never_reaches_the_target_says_so(table, tmp_path):
    rows, markdown, _ = speed(tmp_path, table)
    sparse = rows.loc["sparse_mezo"]
    assert not sparse["reached"] and pd.isna(sparse["forward_passes"]) and pd.isna(sparse["passes_speedup"])
    line = next(line for line in markdown.splitlines() if "sparse_mezo" in line)
    assert "never (best 69.0)" in line


def test_the_seeds_mean_decides_and_a_tie_with_the_target_counts_as_reached(table, tmp_path):
    rows, _, _ = speed(tmp_path, table)
    adamezo = rows.loc["adamezo"]
    assert adamezo["seeds"] == 2 and adamezo["reached"]
    assert (adamezo["step"], adamezo["forward_passes"], adamezo["seconds"]) == (500, 1000, 50.0)
    assert adamezo["passes_speedup"] == pytest.approx(4.0) and adamezo["fewer_passes_pct"] == pytest.approx(75.0)


def test_the_papers_claims_sit_beside_the_measured_ratios(table, tmp_path):
    rows, markdown, _ = speed(tmp_path, table)
    assert rows.loc["addax", "claim"] == "15x faster (average over tasks)"
    assert rows.loc["addax", "claim_source"] == "Addax, abstract"
    assert rows.loc["adamezo", "claim"] == "up to 70% fewer forward passes"
    assert pd.isna(rows.loc["mezo", "claim"])
    assert "15x faster" in markdown


def test_target_and_baseline_are_options(table, tmp_path):
    rows, _, _ = speed(tmp_path, table, "--speed-target", "75", "--speed-baseline", "addax")
    assert (rows["target"] == 75.0).all()
    assert rows.loc["addax", "step"] == 200 and not rows.loc["mezo", "reached"]
    assert not rows.loc["adamezo", "reached"]  # its seeds reach 80, but their mean never passes 70
    assert rows.loc["addax", "passes_speedup"] == pytest.approx(1.0)
    assert rows["claim"].isna().all()  # the papers' claims are over MeZO, not over another baseline


def test_a_table_without_the_baseline_has_no_target(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "addax", [(100, 0.5, 150, 10.0)])
    rows, markdown, _ = speed(tmp_path, runs)
    assert not rows.loc["addax", "reached"] and "no mezo run to set a target" in markdown


def test_a_seed_that_stopped_early_keeps_its_last_evaluation(tmp_path):
    stopped = write_run(tmp_path, "adamezo", [(100, 0.5, 200, 1.0), (200, 0.9, 400, 2.0)], seed=0)
    longer = write_run(tmp_path, "adamezo", [(100, 0.5, 200, 1.0), (200, 0.5, 400, 2.0), (300, 0.7, 600, 3.0)],
                       seed=1)
    curve = seed_mean_curve([run_curve(stopped), run_curve(longer)]).set_index("step")
    assert list(curve.index) == [100, 200, 300]
    assert curve.loc[300, "metric"] == pytest.approx(0.8) and curve.loc[300, "forward_passes"] == 500


def test_a_step_logged_twice_by_a_resumed_job_counts_once_and_torn_lines_are_skipped(tmp_path):
    run_dir = write_run(tmp_path, "mezo", [(100, 0.5, 200, 1.0), (100, 0.6, 200, 5.0), (200, 0.7, 400, 9.0)])
    with open(run_dir / "log.jsonl", "a") as log:
        log.write('{"event": "eval", "split": "dev", "st')
    curve = run_curve(run_dir)
    assert list(curve["step"]) == [100, 200] and curve["metric"].tolist() == [0.6, 0.7]


def test_a_log_without_seconds_still_gives_the_passes(tmp_path):
    run_dir = write_run(tmp_path, "mezo", [(100, 0.5, 200, 1.0)])
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("elapsed_s")
    (run_dir / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curve = run_curve(run_dir)
    assert curve["forward_passes"].tolist() == [200] and curve["elapsed_s"].isna().all()


def test_seconds_to_target_are_training_seconds_where_the_log_has_them(tmp_path):
    """train_s (loading and evaluations excluded) wins over elapsed_s, the wall clock since the job started."""
    run_dir = write_run(tmp_path, "mezo", [(100, 0.5, 200, 30.0), (200, 0.6, 400, 50.0)])
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    for line in lines:
        if line["event"] == "eval" and line["split"] == "dev":
            line["train_s"] = line["step"] / 100  # 1 s of training per 100 steps
    (run_dir / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curve = run_curve(run_dir)
    assert curve["seconds"].tolist() == [1.0, 2.0] and curve["elapsed_s"].tolist() == [30.0, 50.0]


def test_a_run_logs_its_training_seconds_with_each_dev_evaluation(quick_cfg, tmp_path):
    from zobench.run import run

    run(quick_cfg("train.steps=4", "train.eval_interval=2"), tmp_path / "run")
    curve = run_curve(tmp_path / "run")
    assert curve["step"].tolist() == [2, 4]
    assert curve["train_s"].notna().all() and (curve["train_s"] <= curve["elapsed_s"]).all()
    assert curve["seconds"].tolist() == curve["train_s"].tolist()
