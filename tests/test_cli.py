"""The command line as a user meets it: quickstart, sweeps, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import QUICK, only_run_dir, run_cli


def test_quickstart_runs_end_to_end_and_says_where_results_went(tmp_path):
    result = run_cli("experiment=quickstart", f"results_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    assert f"results in {run_dir}" in result.stdout
    assert "test accuracy = " in result.stdout

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["error"] is None
    assert (metrics["task"], metrics["model"], metrics["optimizer"]) == ("sst2", "opt-tiny", "mezo")
    assert metrics["metric"] == "accuracy" and 0.0 <= metrics["test_metric"] <= 1.0
    assert metrics["dev_metric"] is not None and metrics["best_step"] in (100, 200, 300)
    # A MeZO step is two forward passes (one direction) and no backward pass.
    assert metrics["steps"] == 300
    assert metrics["forward_passes"] == 2 * 300 and metrics["backward_passes"] == 0
    assert metrics["tokens"] > 0 and metrics["eval_forward_passes"] > 0
    assert metrics["peak_memory_method"] == "process_vmhwm" and metrics["peak_memory_bytes"] > 0
    assert metrics["wall_clock_s"] >= metrics["train_wall_clock_s"] > 0
    for key in ("device", "dtype", "zobench_version", "git_revision", "n_train", "n_dev", "n_test"):
        assert key in metrics

    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(10, 301, 10))
    assert all({"loss", "lr", "elapsed_s", "forward_passes"} <= r.keys() for r in train)
    assert [r["split"] for r in lines if r["event"] == "eval"] == ["dev", "dev", "dev", "test"]
    assert "optimizer:" in (run_dir / "config.yaml").read_text()
    assert not (run_dir / "best_weights.safetensors").exists()  # the temporary copy is cleaned up


def test_multirun_gives_each_job_its_own_directory(tmp_path):
    result = run_cli("-m", *QUICK, "train.steps=2", "train.eval_interval=0", "optimizer=mezo,sgd",
                     "seed=0,1", f"results_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    runs = [json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    assert sorted((r["optimizer"], r["seed"]) for r in runs) == [("mezo", 0), ("mezo", 1), ("sgd", 0), ("sgd", 1)]
    assert len({r["run_dir"] for r in runs}) == 4
    assert all(r["status"] == "completed" for r in runs)


def _one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_unknown_names_list_the_valid_ones(tmp_path):
    for group, valid in (("task", "sst2"), ("model", "opt-tiny"), ("optimizer", "mezo")):
        result = run_cli(f"{group}=nope", f"results_dir={tmp_path}")
        assert result.returncode == 2
        line = _one_line_error(result)
        assert f"unknown {group} 'nope'" in line and valid in line
    sweep = run_cli("-m", "task=sst2,nope", f"results_dir={tmp_path}")
    assert sweep.returncode == 2 and "unknown task 'nope'" in _one_line_error(sweep)
    assert not list(tmp_path.rglob("metrics.json"))


def test_missing_local_data_says_where_it_looked(tmp_path):
    result = run_cli(*QUICK, "task.samples=false", f"task.data_dir={tmp_path / 'nowhere'}",
                     f"results_dir={tmp_path}")
    assert result.returncode == 1
    assert "nowhere is not a folder" in _one_line_error(result)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(*QUICK, "task.samples=false", f"task.data_dir={empty}", f"results_dir={tmp_path}")
    line = _one_line_error(result)
    assert "no 'train' split" in line and "train.jsonl" in line and str(empty) in line
    assert json.loads(next(tmp_path.rglob("metrics.json")).read_text())["status"] == "failed"


def test_missing_column_names_the_file_and_the_column(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text('{"text": "no sentence column here", "label": 1}\n' * 4)
    result = run_cli(*QUICK, "task.samples=false", f"task.data_dir={data}", f"results_dir={tmp_path}")
    line = _one_line_error(result)
    assert str(data / "train.jsonl") in line and "column 'sentence'" in line


def test_unreachable_hub_says_how_to_run_offline(tmp_path):
    result = run_cli(*QUICK, "task.samples=false", f"results_dir={tmp_path}")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "glue/sst2" in line and "task.data_dir" in line and "task.samples=true" in line
    model = run_cli(*QUICK, "model=opt-125m", f"results_dir={tmp_path}")
    line = model.stderr.strip().splitlines()[-1]
    assert model.returncode == 1 and "facebook/opt-125m" in line and "model.path" in line
