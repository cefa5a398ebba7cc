"""What a newcomer meets (issue 23): a sweep's job list before launching, console lines that say whose job they
are and how a sweep ended, runs.md in job order, plots whose legend names every method, plain messages."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import QUICK, run_cli


def _write_run(folder: Path, optimizer: str, log: list[dict], seeds: int = 1, **metrics) -> None:
    folder.mkdir(parents=True)
    record = {"task": "sst2", "model": "opt-tiny", "optimizer": optimizer, "status": "completed", "seed": 0,
              "metric": "accuracy", "dev_metric": 0.5, "test_metric": 0.5, **metrics}
    (folder / "metrics.json").write_text(json.dumps(record))
    (folder / "config.yaml").write_text("peft:\n  name: none\n")
    (folder / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))


def test_plan_lists_a_presets_sweep_in_the_order_the_sweep_runs_it(capsys):
    """`zobench -m experiment=cpu_smoke_table --cfg job` stops on a ValueError; zobench-plan lists the jobs, job N
    being the sweep's N_… folder: the preset's order (optimizer, task, lr, seed), typed values replacing its own."""
    from zobench.plan import main

    assert main(["experiment=cpu_smoke_table", "optimizer=mezo,adam", "seed=0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("12 jobs: run them with zobench -m experiment=cpu_smoke_table")
    assert lines[0].split()[:5] == ["0", "optimizer=mezo", "task=sst2", "optimizer.lr=0.001", "seed=0"]
    assert lines[11].split()[:4] == ["11", "optimizer=adam", "task=copa", "optimizer.lr=0.0001"]
    assert main(["experiment=mezo_opt13b"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("18 jobs")  # 9 tasks x 2 learning rates


def test_plan_prints_one_jobs_config_and_refuses_bad_input_in_one_line(capsys):
    from zobench.plan import main

    assert main(["experiment=cpu_smoke_table", "--cfg", "11"]) == 0
    config = capsys.readouterr().out
    assert "name: mezo" in config and "lr: 0.0001" in config and "seed: 1" in config  # job 11: mezo copa 1e-4 seed 1
    assert main(["model=nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'nope'" in err
    assert main(["experiment=quickstart", "--cfg", "5"]) == 2
    assert "this sweep has jobs 0 to 0" in capsys.readouterr().err


def test_a_sweep_tags_its_lines_with_job_ids_and_ends_with_a_summary(tmp_path):
    result = run_cli("-m", *QUICK, "train.steps=2", "train.eval_interval=2", "seed=0,1",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("[job 0] completed: test accuracy") for line in lines), lines
    assert any(line.startswith("[job 1] completed: test accuracy") for line in lines), lines
    assert any(line.startswith("[job 1] data: ") for line in lines)  # the run's own log lines too
    assert lines[-1] == f"sweep done: 2 jobs, 2 completed, 0 diverged; next: zobench-report {tmp_path / 'sweep'}"


def test_a_diverged_run_says_diverged_once(tmp_path):
    result = run_cli(*QUICK, "optimizer=sgd", "optimizer.lr=1e12", "train.steps=30", f"hydra.run.dir={tmp_path / 'r'}")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("diverged"))
    assert line.startswith("diverged at step ") and "diverged: diverged" not in line


def test_runs_md_lists_a_sweeps_jobs_in_job_order(tmp_path):
    from zobench.report.cli import main

    for job in (0, 2, 10, 100, 101, 11):
        _write_run(tmp_path / "sweep" / f"{job}_mezo_sst2_opt-tiny", "mezo", [], seed=job)
    assert main([str(tmp_path / "sweep"), "-o", str(tmp_path / "out"), "--no-plots"]) == 0
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")["run_dir"]
    assert [Path(run).name.split("_")[0] for run in runs] == ["0", "2", "10", "11", "100", "101"]


def test_the_plots_legend_names_methods_that_have_no_training_curve(tmp_path, monkeypatch):
    """Zero-shot and linear probing have one dev result and no loss curve; before, they were left out of the
    legend and their dots could not be told apart. Each line also gets its own marker."""
    from matplotlib.figure import Figure

    from zobench.report import plots

    train = [{"event": "train", "step": s, "loss": 1.0 / s, "elapsed_s": 30 + s, "forward_passes": 2 * s}
             for s in (1, 2, 3, 4)]
    dev = [{"event": "eval", "split": "dev", "step": 4, "metric": 0.6, "elapsed_s": 40, "train_s": 8.0,
            "forward_passes": 8}]
    _write_run(tmp_path / "runs" / "a", "mezo", train + dev)
    _write_run(tmp_path / "runs" / "b", "zero_shot", [{"event": "eval", "split": "dev", "step": 0, "metric": 0.5,
                                                        "forward_passes": 0}])
    _write_run(tmp_path / "runs" / "c", "lp", [{"event": "eval", "split": "dev", "step": 0, "metric": 0.55,
                                                 "forward_passes": 0}])
    drawn = {}
    original = Figure.savefig

    def keep(figure, *args, **kwargs):
        drawn["figure"] = figure
        return original(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    from zobench.report.cli import main

    assert main([str(tmp_path / "runs"), "-o", str(tmp_path / "out")]) == 0
    figure = drawn["figure"]
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == ["zero_shot", "lp", "mezo"]
    assert "sst2" in figure._suptitle.get_text() and "opt-tiny" in figure._suptitle.get_text()
    assert "chosen on dev" in figure._suptitle.get_text() and "mean of 1 seed" in figure._suptitle.get_text()
    loss_seconds = figure.axes[1]
    assert "training seconds" in loss_seconds.get_xlabel()
    # training seconds: train_s 8 at step 4 (not the 30 s of loading in elapsed_s), interpolated by step
    assert list(loss_seconds.lines[0].get_xdata()) == [2.0, 4.0, 6.0, 8.0]
    markers = {line.get_marker() for axes in figure.axes for line in axes.lines}
    assert len(markers) == 3


def test_line_styles_stay_apart_past_ten_lines():
    from zobench.report.plots import line_style

    styles = {(line_style(i)["color"], line_style(i)["marker"]) for i in range(40)}
    assert len(styles) == 40


def test_random_init_without_a_tokenizer_says_how_to_run_offline(tmp_path):
    result = run_cli(*QUICK, "model=opt-125m", "model.init=random", "train.steps=1",
                     f"hydra.run.dir={tmp_path / 'r'}", timeout=120)
    assert result.returncode == 1
    assert "model.tokenizer=byte" in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_index_html_holds_every_table_and_plot_escaped(tmp_path):
    """One page to read in a browser; a task name from a received metrics.json stays text, not markup."""
    from zobench.report.cli import main

    log = [{"event": "train", "step": 1, "loss": 1.0, "elapsed_s": 1, "forward_passes": 2},
           {"event": "eval", "split": "dev", "step": 1, "metric": 0.5, "elapsed_s": 2, "train_s": 1,
            "forward_passes": 2}]
    _write_run(tmp_path / "runs" / "a", "mezo", log)
    _write_run(tmp_path / "runs" / "b", "mezo", log, task="<script>x</script>")
    assert main([str(tmp_path / "runs"), "-o", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "index.html").read_text()
    for name in ("accuracy", "selection", "comparison", "speed", "cost", "memory", "failures", "runs"):
        assert f'id="{name}"' in page
    assert '<img src="plots/sst2.png"' in page
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_an_interrupted_run_prints_the_command_that_goes_on(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "zobench.cli", *QUICK, "train.steps=100000",
                                "train.eval_interval=100000", f"hydra.run.dir={run_dir}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (run_dir / "log.jsonl").exists() or not (run_dir / "log.jsonl").read_text().strip():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    assert f"to go on from its last checkpoint: zobench resume={run_dir}" in process.stderr.read()


def test_a_launcher_without_its_plugin_is_one_line_naming_the_extra(monkeypatch, capsys):
    """Before: a raw ModuleNotFoundError from the job, or Hydra's "Could not load 'hydra/launcher/submitit_slurm'"
    said as a file that cannot be read (exit 1)."""
    import sys

    from zobench.cli import main

    monkeypatch.setitem(sys.modules, "submitit", None)  # as if the cluster extra were not installed
    monkeypatch.setattr(sys, "argv", ["zobench", "-m", "hydra/launcher=slurm_gpu", *QUICK, "train.steps=1"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hydra/launcher=slurm_gpu needs submitit" in err and "[cluster]" in err


def test_hub_warnings_reach_the_console_once():
    """huggingface_hub's logger has a console handler of its own and propagates to the root logger, which holds
    Hydra's console handler in a job: each retry warning was printed twice. announce() (before every hub call)
    leaves the job's console alone to print it."""
    import io
    import logging

    from zobench.hub import announce

    root, hub_logger = logging.getLogger(), logging.getLogger("huggingface_hub")
    job_console, hub_console = io.StringIO(), io.StringIO()
    job_handler, own_handler = logging.StreamHandler(job_console), logging.StreamHandler(hub_console)
    saved = list(hub_logger.handlers)
    root.addHandler(job_handler)
    hub_logger.addHandler(own_handler)  # as huggingface_hub does at import
    try:
        announce("the tokenizer x", "model.path=DIR")
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        assert (job_console.getvalue() + hub_console.getvalue()).count("Retrying in 1s") == 1
    finally:
        root.removeHandler(job_handler)
        hub_logger.handlers[:] = saved


def test_cfg_of_a_sweep_points_to_zobench_plan():
    result = run_cli("-m", "experiment=mezo_opt13b", "--cfg", "job", timeout=120)
    assert result.returncode == 2 and "zobench-plan" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
