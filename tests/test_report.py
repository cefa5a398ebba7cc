"""zobench-report on a small sweep written by the real runner, plus the selection rule and the papers' CSVs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from zobench.errors import ZobenchError
from zobench.report.cli import main
from zobench.report.references import default_reference_dir, load_references
from zobench.report.selection import select_best
from zobench.report.tables import comparison_table

LEARNING_RATES = ("1e-3", "1e-2")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A multirun-like folder: MeZO on the SST-2 samples, 2 lr x 2 seeds, one failed and one diverged job."""
    from conftest import QUICK
    from zobench.configs import compose
    from zobench.run import run

    root = tmp_path_factory.mktemp("sweep")
    job = 0
    for lr in LEARNING_RATES:
        for seed in SEEDS:
            run(compose([*QUICK, "train.steps=2", "train.eval_interval=1", f"optimizer.lr={lr}", f"seed={seed}"]),
                root / f"{job}_mezo_sst2_opt-tiny")
            job += 1
    with pytest.raises(ZobenchError):
        run(compose([*QUICK, "train.steps=2", "task.samples=false", f"task.data_dir={root / 'missing'}"]),
            root / f"{job}_mezo_sst2_opt-tiny")
    diverged = run(compose([*QUICK, "optimizer=sgd", "optimizer.lr=1e12", "train.steps=30"]),
                   root / f"{job + 1}_sgd_sst2_opt-tiny")
    assert diverged["status"] == "diverged"
    return root


def metrics_of(root: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(root.rglob("metrics.json"))]


def report(tmp_path, *args) -> tuple[int, Path]:
    out = tmp_path / "out"
    return main([*map(str, args), "-o", str(out)]), out


def test_every_completed_run_is_in_the_tables_and_the_others_are_listed(sweep, tmp_path, capsys):
    code, out = report(tmp_path, sweep)
    printed = capsys.readouterr().out
    assert code == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 6
    completed = runs[runs["status"] == "completed"]
    assert sorted(Path(d).name for d in completed["run_dir"]) == [f"{i}_mezo_sst2_opt-tiny" for i in range(4)]
    failures = (out / "failures.md").read_text()
    assert "failed" in failures and "is not a folder" in failures and "diverged" in failures
    assert "| opt-tiny | mezo" in printed and "6 runs: 4 completed, 2 left out" in printed
    assert "is not a folder" in printed  # the failed job's message is printed, not only filed
    selection = pd.read_csv(out / "accuracy.csv")
    assert list(selection["optimizer"]) == ["mezo"]  # the diverged sgd run is in no average
    assert selection["seeds"].item() == 2 and selection["candidates"].item() >= 2


def test_mean_and_std_are_over_the_seeds_of_the_chosen_setting(sweep, tmp_path):
    _, out = report(tmp_path, sweep)
    row = pd.read_csv(out / "accuracy.csv").iloc[0]
    lr = float(row["setting"].split("optimizer.lr=")[1])
    tests = [100 * m["test_metric"] for m in metrics_of(sweep)
             if m["status"] == "completed" and math.isclose(_lr_of(m), lr)]
    assert len(tests) == 2
    assert row["test_mean"] == pytest.approx(sum(tests) / 2)
    assert row["test_std"] == pytest.approx(pd.Series(tests).std(ddof=1))


def _lr_of(metrics: dict) -> float:
    import yaml

    return float(yaml.safe_load((Path(metrics["run_dir"]) / "config.yaml").read_text())["optimizer"]["lr"])


def test_the_setting_is_chosen_on_dev_and_reported_on_test(sweep, tmp_path, capsys):
    """Make lr=1e-2 best on dev but worst on test: the table must show lr=1e-2's test metric."""
    patched = tmp_path / "patched"
    shutil.copytree(sweep, patched)
    for path in patched.rglob("metrics.json"):
        metrics = json.loads(path.read_text())
        if metrics["status"] != "completed":
            continue
        metrics["run_dir"] = str(path.parent)
        high_dev = math.isclose(_lr_of(metrics), 1e-2)
        metrics["dev_metric"], metrics["test_metric"] = (0.9, 0.1) if high_dev else (0.5, 0.95)
        path.write_text(json.dumps(metrics))
    code, out = report(tmp_path, patched)
    assert code == 0
    row = pd.read_csv(out / "accuracy.csv").iloc[0]
    assert row["setting"] == "optimizer.lr=0.01"
    assert row["dev_mean"] == pytest.approx(90.0) and row["test_mean"] == pytest.approx(10.0)
    assert "10.0 ± 0.0" in (out / "accuracy.md").read_text()
    assert "optimizer.lr=0.01" in (out / "selection.md").read_text()
    assert "10.0 ± 0.0" in capsys.readouterr().out


def test_select_best_prefers_dev_and_ignores_runs_that_did_not_complete():
    def run(lr, seed, dev, test, status="completed"):
        return {"model": "m", "task": "rte", "optimizer": "mezo", "status": status, "metric": "accuracy",
                "seed": seed, "dev_metric": dev, "test_metric": test, "run_dir": f"lr{lr}-s{seed}",
                "cfg.optimizer.lr": lr, "cfg.seed": seed}

    runs = pd.DataFrame([
        run(1e-6, 0, 0.70, 0.60), run(1e-6, 1, 0.72, 0.62),   # best on dev
        run(1e-7, 0, 0.60, 0.90), run(1e-7, 1, 0.62, 0.92),   # best on test: must not win
        run(1e-5, 0, 0.99, None, status="diverged"),           # its dev was logged before it diverged
    ])
    best = select_best(runs)
    assert len(best) == 1
    row = best.iloc[0]
    assert row["setting"] == "optimizer.lr=1e-06"
    assert row["test_mean"] == pytest.approx(0.61) and row["dev_mean"] == pytest.approx(0.71)
    assert row["seeds"] == 2 and row["excluded"] == 0 and row["candidates"] == 3


def test_a_key_older_runs_lack_is_no_setting_but_an_explicit_null_is():
    base = {"model": "m", "task": "rte", "status": "completed", "metric": "accuracy", "dev_metric": 0.5,
            "test_metric": 0.5, "cfg.optimizer.lr": 1e-3}
    runs = pd.DataFrame([
        {**base, "optimizer": "sgd", "seed": 0, "run_dir": "a"},                          # before peft existed
        {**base, "optimizer": "sgd", "seed": 1, "run_dir": "b", "cfg.peft.name": "none"},
        {**base, "optimizer": "addax", "seed": 0, "run_dir": "c", "cfg.optimizer.l_t": "null"},
        {**base, "optimizer": "addax", "seed": 0, "run_dir": "d", "cfg.optimizer.l_t": 61},
    ])
    best = select_best(runs).set_index("optimizer")
    assert best.loc["sgd", "setting"] == "default" and best.loc["sgd", "seeds"] == 2
    assert best.loc["addax", "candidates"] == 2


def test_adapters_and_demonstrations_name_their_own_rows(tmp_path):
    """MeZO (LoRA) and ICL are rows of their own in the papers' tables, not settings of MeZO and zero-shot."""
    from zobench.report.runs import load_runs

    cases = (("a", "mezo", "lora", 0), ("b", "mezo", "none", 0), ("c", "zero_shot", "none", 32),
             ("d", "zero_shot", "none", 0))
    for name, optimizer, peft, k in cases:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"task": "rte", "model": "m", "optimizer": optimizer, "peft": peft, "status": "completed"}))
        (tmp_path / name / "config.yaml").write_text(f"icl:\n  k: {k}\npeft:\n  name: {peft}\n")
    runs = load_runs([tmp_path]).set_index("run_dir")["optimizer"]
    assert [runs[str(tmp_path / n)] for n in "abcd"] == ["mezo_lora", "mezo", "icl", "zero_shot"]


def test_tables_are_markdown_latex_csv_and_plots_are_png(sweep, tmp_path):
    _, out = report(tmp_path, sweep)
    for name in ("accuracy", "selection", "cost", "memory", "comparison", "runs", "failures"):
        for suffix in ("md", "tex", "csv"):
            assert (out / f"{name}.{suffix}").stat().st_size > 0, f"{name}.{suffix}"
    assert r"\begin{tabular}" in (out / "accuracy.tex").read_text()
    assert (out / "plots" / "sst2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cost = pd.read_csv(out / "cost.csv").iloc[0]
    assert cost["forward_passes"] == 4 and cost["steps"] == 2  # MeZO: two forward passes a step


def test_default_output_is_a_report_folder_beside_the_runs(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    assert main([str(copy), "--no-plots"]) == 0
    assert (copy / "report" / "accuracy.md").exists()
    assert main([str(copy), "--no-plots"]) == 0  # a second report over the first: still the same runs
    assert len(pd.read_csv(copy / "report" / "runs.csv")) == 6


def test_no_runs_is_one_line_and_exit_1(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no runs" in capsys.readouterr().err
    assert main([str(tmp_path / "absent")]) == 2


def test_a_torn_metrics_file_is_listed_not_fatal(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text('{"status": "comp')
    code, out = report(tmp_path, tmp_path / "run")
    assert code == 0
    assert "unreadable" in (out / "failures.md").read_text() and "0 completed" in capsys.readouterr().out


def test_the_report_never_imports_torch_or_the_runner(sweep, tmp_path):
    probe = ("import sys; from zobench.report.cli import main; "
             f"code = main([{str(sweep)!r}, '-o', {str(tmp_path / 'out')!r}]); "
             "heavy = [m for m in ('torch', 'zobench.run', 'transformers') if m in sys.modules]; "
             "print('HEAVY', heavy); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stdout


def test_reference_csvs_load_and_every_row_names_its_source():
    references = load_references(default_reference_dir())
    assert len(references) > 100
    for column in ("paper", "table", "model", "task", "optimizer", "metric", "source"):
        assert references[column].notna().all() and (references[column].str.strip() != "").all(), column
    assert references["value"].map(math.isfinite).all()
    assert references["source"].str.contains("arXiv").all()  # each names the paper it comes from
    keys = ["paper", "table", "model", "task", "optimizer", "metric"]
    assert not references.duplicated(keys).any(), references[references.duplicated(keys, keep=False)]
    table1 = references[(references["paper"] == "MeZO") & (references["table"] == "Table 1")]
    value = table1.set_index(["task", "optimizer"])["value"]
    assert value[("sst2", "mezo")] == 91.4 and value[("sst2", "adam")] == 92.0 and value[("drop", "mezo")] == 30.9
    assert len(table1) == 7 * 11


def test_comparison_puts_ours_beside_the_papers():
    selected = pd.DataFrame([{"model": "opt-13b", "task": "sst2", "optimizer": "mezo", "metric": "accuracy",
                              "test_mean": 0.900, "peak_memory_gb": 25.0, "seconds_per_step": math.nan}])
    references = load_references(default_reference_dir())
    display, numbers = comparison_table(selected, references)
    row = numbers[numbers["metric"] == "accuracy"].iloc[0]
    assert row["paper"] == 91.4 and row["difference"] == pytest.approx(-1.4)
    assert "MeZO, Table 1" in display["source"].tolist()
