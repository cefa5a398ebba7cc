"""zobench-plan --memory: the memory and disk a run needs, from the model's config on the meta device, against
MeZO's Table 22 (results/reference/mezo_table22_memory.csv) and against peaks measured on CPU."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICK
from zobench.configs import compose
from zobench.memory_plan import parse_size, plan, process_resident
from zobench.plan import job_shape, main
from zobench.run import run

TABLE22 = Path(__file__).parent.parent / "results" / "reference" / "mezo_table22_memory.csv"
# Table 22's setting: MultiRC (about 400 tokens an example), one example per GPU, A100 80GB cards
PAPER = ["task=multirc", "max_length=400", "train.batch_size=1"]


def table22(model: str, optimizer: str) -> tuple[float, int]:
    """(peak GB, A100s) of a row of Table 22."""
    with open(TABLE22) as table:
        rows = {(r["model"], r["optimizer"], r["metric"]): float(r["value"]) for r in csv.DictReader(table)}
    return rows[(model, optimizer, "peak_memory_gb")] * 1e9, int(rows[(model, optimizer, "gpus_a100_80gb")])


@pytest.mark.parametrize("preset, model, optimizer, low, high", [
    ("mezo_opt13b", "opt-13b", "mezo", -0.15, 0.15),  # +5.7%: fp16 weights + one layer's activations + z block
    ("mezo_opt13b_ft", "opt-1.3b", "adam", -0.15, 0.15),  # -3.9%: one GPU, 18 bytes a parameter + activations
    # -20.4%: Table 22's multi-GPU FT figures are whole cards (156 = 2 x 78, 316 = 4 x 79, 633 = 8 x 79 GB):
    # nvidia-smi shows what the caching allocator reserved, which grows to the card; the GPU count is exact
    ("mezo_opt13b_ft", "opt-13b", "adam", -0.25, 0.0),
])
def test_the_plan_of_table_22s_runs_is_the_papers_memory_on_as_many_gpus(preset, model, optimizer, low, high):
    paper_bytes, paper_gpus = table22(model, optimizer)
    result = plan(job_shape([f"experiment={preset}", f"model={model}", *PAPER], {}), parse_size("80GB"))
    assert result.gpus == paper_gpus
    planned = result.per_gpu["total"] * result.gpus
    assert low <= planned / paper_bytes - 1 <= high, f"{planned / 1e9:.1f} GB planned, {paper_bytes / 1e9:.0f} GB"


def test_the_plan_prints_each_job_shape_once_with_its_jobs_and_refuses_a_bad_size(capsys):
    assert main(["experiment=mezo_opt13b", "task=sst2", "optimizer.lr=1e-6,1e-7", "--gpu-memory", "24GB",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [job["number"] for job in printed["jobs"]] == [0, 1]
    (shape,) = printed["plans"]  # the two learning rates need the same memory
    assert shape["jobs"] == [0, 1] and shape["gpus"] is None  # 25.7 GB of fp16 weights on every GPU
    parts = shape["per_gpu_bytes"]
    assert parts["weights"] == 2 * shape["model"]["params"] and parts["gradients"] == parts["optimizer_state"] == 0
    assert shape["disk_bytes"]["checkpoint"] < 1e6 < shape["disk_bytes"]["best_copy"]  # a trajectory, not weights
    assert main(["experiment=mezo_opt13b", "task=sst2", "--gpu-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpu-memory lots" in err
    assert main(["model=opt-13b", "model.arch=null", "--memory"]) == 2  # a hub config, and no hub here
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "facebook/opt-13b" in err and "model.path=" in err


def test_the_plan_of_an_adam_run_counts_its_state_and_checkpoint(capsys):
    assert main(["experiment=mezo_opt13b_ft", "task=sst2", "optimizer.lr=1e-5", "--gpus", "8"]) == 0
    text = capsys.readouterr().out
    assert "GPUs of 80.0 GB: 8" in text and "optimizer state" in text and "master copy" in text
    assert "per checkpoint" in text and "once completed" in text


def test_the_plan_of_a_tiny_cpu_run_is_its_measured_peak(tmp_path):
    """In the same process, so the runtime the plan measures is the one the run starts from. Measured here:
    -2% to -5% (opt-tiny, Adam and MeZO): the ±15% leaves room for the allocator's slack."""
    overrides = [*QUICK, "device=cpu", "optimizer=adam", "max_length=32", "train.steps=2", "train.eval_interval=2",
                 "checkpoint.every=1", "data.n_dev=4", "data.n_test=4"]
    planned = plan(job_shape(overrides, {}), parse_size("80GB"))
    measured = run(compose(overrides), tmp_path)["peak_memory_bytes"]
    assert abs(planned.host["peak"] / measured - 1) < 0.15, (planned.host["peak"], measured)
    # the checkpoint's files (their sizes stay in state.json once the run has dropped them): weights + Adam's
    # two moments, fp32; the plan's bound on the safetensors headers is the difference
    files = json.loads((tmp_path / "checkpoint" / "state.json").read_text())["files"]
    written = sum(entry["bytes"] for entry in files.values())
    assert written <= planned.disk["checkpoint"] < written * 1.1


PROBE = """
import json, sys, tempfile
from zobench.configs import compose
from zobench.memory_plan import parse_size, plan
from zobench.plan import job_shape
from zobench.run import run
overrides = sys.argv[1:]
expected = plan(job_shape(overrides, {}), parse_size("80GB")).host["peak"]
with tempfile.TemporaryDirectory() as folder:
    print(json.dumps([expected, run(compose(overrides), folder)["peak_memory_bytes"]]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "mezo"])
def test_the_plan_of_a_small_model_is_a_fresh_processs_measured_peak(optimizer):
    """A fresh process, as a run is, with a 13M-parameter OPT whose parts (Adam: 4 x 53 MB + the checkpoint's
    copy) are as large as the runtime: measured +1.2% (Adam), -4.0% (MeZO); ±10%."""
    overrides = [*QUICK, "device=cpu", f"optimizer={optimizer}", "max_length=32", "train.steps=2",
                 "train.eval_interval=2", "checkpoint.every=1", "data.n_dev=4", "data.n_test=4",
                 "model.arch.hidden_size=512", "model.arch.num_hidden_layers=4", "model.arch.ffn_dim=2048",
                 "model.arch.word_embed_proj_dim=512"]
    result = subprocess.run([sys.executable, "-c", PROBE, *overrides], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    expected, measured = json.loads(result.stdout.splitlines()[-1])
    assert abs(expected / measured - 1) < 0.10, (expected, measured)
