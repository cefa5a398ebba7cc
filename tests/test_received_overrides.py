"""A received run folder's overrides are data: replaying them never runs code or writes outside the folder;
the run folder is resolved as Hydra resolves it and claimed (or refused) before Hydra writes anything."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from zobench.errors import ZobenchError
from zobench.optim import build_optimizer
from zobench.run_dir import MARKER, RunDir

from conftest import QUICK, run_cli


def _received(tmp_path, *overrides: str):
    """A zobench run folder as someone else may send it: the marker and an overrides.yaml."""
    run_dir = tmp_path / "received"
    run_dir.mkdir()
    (run_dir / MARKER).write_text("")
    (run_dir / "overrides.yaml").write_text(json.dumps([*QUICK, "optimizer=zero_shot", "data.n_dev=0",
                                                        "data.n_test=2", *overrides]))
    return run_dir


def _refused(result, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("zobench: error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _payloads(target):
    return {
        "hydra callback": ["+hydra.callbacks.x={_target_: pathlib.Path.write_text, _args_: "
                           f"[{{_target_: pathlib.Path, _args_: ['{target}']}}, 'import os']}}"],
        "file log handler": [f"hydra.job_logging.handlers.file.filename={target}",
                             "hydra.job_logging.formatters.detailed.format='PWNED %(message)s'"],
        "optimizer open": ["optimizer._target_=builtins.open"],
        "optimizer write_text": ["optimizer._target_=pathlib.Path.write_text"],
        "_args_ in a value": [f"+data.extra=[{{_target_: pathlib.Path.touch, _args_: ['{target}']}}]"],
        "launcher choice": ["hydra/launcher=basic"],
        "@package": ["optimizer@hydra.callbacks.y=mezo"],
    }


@pytest.mark.parametrize("payload", sorted(_payloads("T")))
def test_a_received_folders_overrides_never_run_code_nor_write_outside_it(tmp_path, payload):
    target = tmp_path / "outside" / "bashrc"
    target.parent.mkdir()
    target.write_text("mine\n")
    run_dir = _received(tmp_path, *_payloads(target)[payload])
    result = run_cli(f"resume={run_dir}")
    _refused(result, str(run_dir / "overrides.yaml"))
    assert target.read_text() == "mine\n"
    assert sorted(p.name for p in run_dir.iterdir()) == [MARKER, "overrides.yaml"]  # not even .hydra/


def test_a_typed_target_outside_zobenchs_classes_is_refused_before_anything_is_made(tmp_path):
    result = run_cli(*QUICK, "optimizer._target_=os.system", f"hydra.run.dir={tmp_path / 'run'}")
    _refused(result, "optimizer._target_=os.system", "optimizer=NAME")
    assert not (tmp_path / "run").exists()


def test_a_config_yaml_naming_another_class_is_refused_by_the_registry():
    """zobench-replay builds the optimizer from a received config.yaml: only registered classes are built."""
    for target in ("builtins.open", "os.system", "pathlib.Path.write_text"):
        with pytest.raises(ZobenchError, match="not one of zobench's optimizer classes"):
            build_optimizer(OmegaConf.create({"_target_": target}), None, None, seed=0, total_steps=1)


@pytest.mark.parametrize("link", ["zobench.log", ".hydra"])
def test_hydra_outputs_that_are_links_are_refused_and_their_targets_untouched(tmp_path, link):
    run_dir = _received(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.yaml").write_text("mine\n")
    (run_dir / link).symlink_to(outside / "config.yaml" if link == "zobench.log" else outside)
    result = run_cli(f"resume={run_dir}")
    _refused(result, str(run_dir / link), "symbolic link")
    assert sorted(p.name for p in outside.iterdir()) == ["config.yaml"]
    assert (outside / "config.yaml").read_text() == "mine\n"


@pytest.mark.parametrize("form", ["++hydra.run.dir={dir}", "hydra.run.dir='{dir}'",
                                  "hydra.run.dir=${{results_dir}}/live"])
def test_every_form_of_a_live_runs_folder_is_refused_before_hydra_writes(tmp_path, form):
    live = tmp_path / "live"
    directory = RunDir(live).claim()  # a run in progress holds the lock
    try:
        result = run_cli(*QUICK, f"results_dir={tmp_path}", form.format(dir=live))
        _refused(result, "in use by another zobench process")
    finally:
        directory.release()
    assert sorted(p.name for p in live.iterdir()) == [MARKER]  # no .hydra/, no zobench.log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live"]  # no stray "'…'" folder either


def test_a_refused_rerun_leaves_a_completed_runs_hydra_files_byte_identical(tmp_path):
    command = [*QUICK, "optimizer=zero_shot", "data.n_dev=0", "data.n_test=2", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_cli(*command).returncode == 0
    saved = {p.name: p.read_bytes() for p in (tmp_path / "run" / ".hydra").iterdir()}
    log = (tmp_path / "run" / "zobench.log").read_bytes()
    _refused(run_cli(*command), "already holds a completed run")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / ".hydra").iterdir()} == saved
    assert (tmp_path / "run" / "zobench.log").read_bytes() == log


def test_a_run_folder_name_with_a_newline_is_refused_before_it_is_created(tmp_path):
    _refused(run_cli(*QUICK, "train.steps=1", f"hydra.run.dir='{tmp_path}/a\nb'"), "may not hold")
    assert list(tmp_path.iterdir()) == []


def test_resume_in_a_multirun_is_one_line(tmp_path):
    run_dir = _received(tmp_path)
    _refused(run_cli("-m", f"resume={run_dir}", "seed=0,1"), "resume=DIR resumes one run")


def test_rerunning_a_sweep_counts_the_jobs_done_before_as_completed(tmp_path):
    """A killed sweep is finished by its command again: the job that had completed is not a failure."""
    sweep = [*QUICK, "optimizer=zero_shot", "data.n_dev=0", "data.n_test=2", f"hydra.sweep.dir={tmp_path}"]
    assert run_cli("-m", *sweep, "seed=0").returncode == 0  # job 0 completed, then the sweep was killed
    hydra_files = sorted(next(tmp_path.glob("0_*")).joinpath(".hydra").iterdir())
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in hydra_files]
    result = run_cli("-m", *sweep, "seed=0,1,2")
    assert result.returncode == 0, result.stderr
    assert "completed before" in result.stdout and "failed" not in result.stderr
    statuses = [json.loads(p.read_text())["status"] for p in tmp_path.rglob("metrics.json")]
    assert statuses == ["completed"] * 3
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in hydra_files] == before  # the completed job's, untouched


@pytest.mark.parametrize("place", ["logger.dir={outside}", "logger.dir=../../outside", "logger.dir=${{oc.env:HOME}}",
                                   "logger.mode=online", "logger.tracking_uri=sqlite:///{outside}/mlflow.db"])
def test_a_received_folder_does_not_choose_where_a_tracker_writes(tmp_path, place):
    from zobench.configs import received_overrides

    outside = tmp_path / "outside"
    with pytest.raises(ZobenchError, match="where a tracker writes or sends"):
        received_overrides(["logger=tensorboard", place.format(outside=outside)], tmp_path / "overrides.yaml")
    assert received_overrides(["logger=tensorboard", "logger.dir=tb"], tmp_path / "overrides.yaml")


def test_a_received_tracker_folder_outside_the_run_folder_is_refused_by_resume(tmp_path):
    outside = tmp_path / "outside"
    run_dir = _received(tmp_path, "logger=tensorboard", f"logger.dir={outside}")
    _refused(run_cli(f"resume={run_dir}"), "logger.dir")
    assert not outside.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == [MARKER, "overrides.yaml"]


def _lock_holder(marker) -> int | None:
    """The pid holding the flock on a run folder's marker, from /proc/locks."""
    inode = marker.stat().st_ino
    for line in open("/proc/locks"):
        fields = line.split()
        if fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
            return int(fields[4])
    return None


@pytest.mark.slow
def test_local_parallel_finishes_the_sweep_when_a_worker_is_killed(tmp_path):
    """zobench's joblib preset launches the sweep again after a dead worker: every job completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "zobench.cli", "-m", "hydra/launcher=local_parallel", *QUICK, "train.steps=300",
               "train.eval_interval=0", "checkpoint.every=20", "seed=0,1,2", f"hydra.sweep.dir={tmp_path}"]
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, pid = time.time() + 240, None
        while pid is None and time.time() < deadline and sweep.poll() is None:
            time.sleep(0.5)
            started = sorted(p.parent for p in tmp_path.glob("*/log.jsonl") if p.stat().st_size)
            pid = _lock_holder(started[0] / MARKER) if started else None
        assert pid is not None, "no job started"
        os.kill(pid, signal.SIGKILL)
        out, stderr = sweep.communicate(timeout=400)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, stderr
    metrics = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert [m["status"] for m in metrics] == ["completed"] * 3 and all(m["steps"] == 300 for m in metrics)
    assert any(m["resumed_at_step"] or m.get("earlier_attempts") for m in metrics)  # the killed one went on


def test_a_sweep_run_again_into_its_folder_never_writes_through_a_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("mine\n")
    job_dir = tmp_path / "sweep" / "0_zero_shot_sst2_opt-tiny"
    job_dir.mkdir(parents=True)
    (job_dir / "zobench.log").symlink_to(outside)
    result = run_cli("-m", *QUICK, "optimizer=zero_shot", "data.n_dev=0", "data.n_test=2", "seed=0,1",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}")
    _refused(result, str(job_dir / "zobench.log"), "symbolic link")
    assert outside.read_text() == "mine\n"
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [job_dir.name]  # no multirun.yaml either
