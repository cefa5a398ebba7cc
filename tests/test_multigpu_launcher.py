"""hydra/launcher=slurm_multigpu: a sweep whose every job spans several GPUs, one SLURM task per GPU, the tasks the
ranks of one run. SLURM cannot run here; submitit's local executor runs several tasks per job the same way (one
process per task, submitit's job environment), so a 2-task job on CPU (gloo) is the real test; the preset's
sbatch lines and a multi-node SLURM task's environment are checked as far as they can be without SLURM."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK
from test_distributed_zo import assert_same_run, losses, one_process, run_files, torchrun

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

FEW = QUICK + ["train.steps=3", "train.eval_interval=0", "save_model=true"]
TWO_TASKS = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"]


def sweep(*args: str, wait: bool = True):
    """`zobench -m hydra/launcher=submitit_local hydra.launcher.tasks_per_node=2 ARGS`: one job, two tasks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "zobench", *TWO_TASKS, *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def job_folder(sweep_dir: Path) -> Path:
    (folder,) = [path for path in sweep_dir.iterdir() if path.name.startswith("0_")]
    return folder


def same_weights(one: Path, two: Path) -> bool:
    first, second = (load_file(str(f / "model" / "model.safetensors")) for f in (one, two))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_preset_asks_slurm_for_one_task_per_gpu_on_every_node(tmp_path, monkeypatch):
    """The sbatch file submitit writes for the preset: tasks per node follow the GPUs per node, the nodes as
    asked, and the time-limit signal that stops and requeues the job."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    from hydra import compose, initialize_config_dir

    from zobench.configs import register_resolvers, register_tasks
    from zobench.paths import conf_dir

    register_resolvers()
    register_tasks()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm_multigpu", "hydra.launcher.gpus_per_node=8",
                                 "hydra.launcher.nodes=2"])
        launcher = instantiate(cfg.hydra.launcher)
    params = launcher.params
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (2, 8, 8)
    # as the plugin's launch() hands them to submitit (which looks for srun first: there is none here)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path, slurm_max_num_timeout=params["max_num_timeout"])
    base = set(BaseQueueConf.__dataclass_fields__)
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@120"):
        assert line in sbatch, sbatch
    assert "srun" in sbatch  # one task per (node, GPU): each a rank


@pytest.fixture
def environ():
    """os.environ, put back as it was after the test (submitit's export writes it directly)."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def test_a_slurm_task_of_a_two_node_job_is_its_rank(environ):
    """What SLURM sets in task 5 of 2 nodes x 4 tasks (no torchrun variables) becomes torch.distributed's env://
    rendezvous: rank 5 of 8, local rank 1, the job's first node; every GPU of the node stays visible."""
    from zobench.parallel.world import from_env, join_submitit_tasks

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        environ.pop(name, None)
    environ.update({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77",
                    "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3", "SLURM_NTASKS": "8",
                    "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                    "SLURM_JOB_NODELIST": "gpu[12-13]"})
    assert from_env().size == 1  # before: a world of one, as for any process without torchrun's variables
    world = join_submitit_tasks()
    assert (world.rank, world.size, world.local_rank) == (5, 8, 1) and world == from_env()
    assert environ["MASTER_ADDR"] == "gpu12" and environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    port = environ["MASTER_PORT"]
    del environ["RANK"]
    environ.update({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    assert join_submitit_tasks().rank == 0 and environ["MASTER_PORT"] == port  # every task meets there


def test_a_two_task_submitit_job_runs_as_two_ranks_and_rank_0_alone_writes_its_folder(tmp_path):
    """A job of two submitit tasks (local executor, gloo) is one run over 2 ranks: its losses and weights are the
    one-process run's (as torchrun's 2 ranks are), its folder holds the same files (rank 1's Hydra files and log
    go to its scratch folder), and metrics.json says 2 ranks."""
    result = sweep(*FEW, "optimizer=mezo", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job = job_folder(tmp_path / "sweep")
    one = one_process(tmp_path, "one", "optimizer=mezo")
    assert_same_run(one, job)
    # the in-process run has none of the command line's files: Hydra's, its log and the overrides kept for resume=
    command_line = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "zobench.log",
                    "overrides.yaml"}
    assert run_files(job) == run_files(one) | command_line
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["world_size"] == 2 and metrics["parallel"] == "zo=data"
    assert metrics["replicas_identical"] is True and metrics["bytes_sent_per_step_per_rank"] == [32.0, 32.0]
    assert (job / "zobench.log").read_text().count("loading model") == 1  # rank 0's log alone
    # the sweep run again into its folder: every task finds the job completed, none waits for the others
    again = sweep(*FEW, "optimizer=mezo", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    for task in (0, 1):
        said = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob(f"*_{task}_log.out"))
        assert said.count("completed before") == 1, said[-2000:]


@pytest.mark.slow
def test_a_two_task_submitit_job_is_the_two_rank_torchrun_run_bit_for_bit(tmp_path):
    result = sweep(*FEW, "optimizer=zo_adam", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = tmp_path / "torchrun"
    launched = torchrun(*FEW, "optimizer=zo_adam", f"hydra.run.dir={two}")
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    job = job_folder(tmp_path / "sweep")
    assert losses(job) == losses(two) and same_weights(job, two)
    assert run_files(job) == run_files(two)


@pytest.mark.slow
@pytest.mark.parametrize("method", [["optimizer=mezo"],  # ZO data mode; FSDP2 Adam: sharded checkpoints
                                    ["optimizer=adam", "optimizer.lr=1e-4", "train.keep_best=host"]])
def test_a_two_task_job_signalled_before_its_time_limit_is_requeued_as_one_job_and_ends_as_uninterrupted(tmp_path,
                                                                                                         method):
    """submitit's time-limit signal (SIGUSR2, which SLURM and the local controller send to every task): both ranks
    stop after the same step, rank 0 records `interrupted` with its checkpoint and requeues the job (all its tasks:
    exit 144, which the local controller restarts as `scontrol requeue` does); the restarted tasks resume as 2 ranks
    and end where an uninterrupted 2-rank run ends, bit for bit."""
    from test_requeue import submitit_tasks

    run = QUICK + [*method, "train.steps=150", "train.eval_interval=0", "checkpoint.every=1000", "save_model=true"]
    sweep_dir = tmp_path / "sweep"
    launcher = sweep(*run, "hydra.launcher.timeout_min=30", f"hydra.sweep.dir={sweep_dir}", wait=False)
    try:
        deadline = time.monotonic() + 300
        while not ((sweep_dir.exists() and (folder := next(sweep_dir.glob("0_*"), None)) is not None
                    and (folder / "trajectory.jsonl").exists()
                    and len((folder / "trajectory.jsonl").read_text().splitlines()) >= 20)):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()[-3000:]
            time.sleep(0.05)
        tasks = submitit_tasks(str(sweep_dir))
        assert len(tasks) == 2
        for pid in tasks:  # as the controller does signal_delay_s before the limit
            os.kill(pid, signal.SIGUSR2)
        assert launcher.wait(timeout=600) == 0, launcher.stderr.read()[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    whole = tmp_path / "whole"
    assert torchrun(*run, f"hydra.run.dir={whole}", timeout=600).returncode == 0
    job = job_folder(sweep_dir)
    resumed = json.loads((job / "metrics.json").read_text())
    assert resumed["status"] == "completed" and resumed["world_size"] == 2
    assert 20 <= resumed["resumed_at_step"] < 150
    assert losses(job) == losses(whole) and same_weights(job, whole)
    logs = {kind: "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob(f"*_0_log.{kind}"))
            for kind in ("out", "err")}
    assert "Caught signal SIGUSR2" in logs["err"], logs["err"][-3000:]
    assert "Requeued job" in logs["out"], logs["out"][-3000:]
    assert f"resumed at step {resumed['resumed_at_step']}" in logs["out"], logs["out"][-3000:]
    assert logs["out"].count("loading model") == 2  # two attempts of the one job (rank 0's lines)


@pytest.mark.slow
def test_the_gpu_checks_torchrun_rows_run_on_cpu_with_gloo(tmp_path):
    """benchmarks/gpu_check.sh's torchrun rows (GPU_CHECK_RANKS=only; with two GPUs or more they run on NCCL):
    ZO data, directions, shard and FSDP2 Adam on 2 ranks within the CPU tests' bounds of one process, and
    benchmarks/distributed.py's table for 1 and 2 ranks."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=2400,
                          env={**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_RANKS": "only",
                               "GPU_CHECK_OUT": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    out = done.stdout
    for row, mode in (("zo-data", "zo=data"), ("zo-directions", "zo=directions"), ("zo-shard", "zo=shard"),
                      ("fsdp-adam", "fo=fsdp")):
        assert re.search(rf"^{row}\s+{mode}\s+\S+\s+\S+\s+\S+\s+ok ", out, re.M), out
    assert "ZO data / DDP bytes sent per rank per step:" in out and "all parts passed" in out
    assert "zobench end to end" not in out  # only the torchrun rows


def test_metrics_name_every_device_the_model_spans(quick_cfg, tmp_path, monkeypatch):
    """Issue 21: metrics.json's `device` (a string, as old readers and zobench-report read it) names every GPU of a
    device-mapped model, and `devices` lists them; a one-device run says what it always said."""
    from zobench.run import run
    from zobench.run_record import device_names, devices_used

    metrics = run(quick_cfg("train.steps=1", "train.eval_interval=0"), tmp_path)
    assert metrics["devices"] == ["cpu"] and metrics["device"].startswith("cpu (")
    split = torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"), torch.nn.Linear(2, 2))
    assert devices_used(split) == [torch.device("cpu"), torch.device("meta")]
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H100 80GB HBM3", 2: "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: names[torch.device(device).index])
    gpus = [torch.device("cuda", i) for i in range(3)]
    assert device_names(gpus[:1]) == "NVIDIA H100 80GB HBM3"
    assert device_names(gpus[:2]) == "2 x NVIDIA H100 80GB HBM3"
    assert device_names(gpus) == "2 x NVIDIA H100 80GB HBM3 + 1 x NVIDIA A100-SXM4-80GB"


def test_a_device_map_spill_known_from_the_config_is_refused_before_any_data_is_read(tmp_path, monkeypatch):
    """Issue 21: model.device_map=auto for weights that cannot fit the visible GPUs (their memory less
    model.headroom_gib) is refused from the config alone (the model built on the meta device), with the load's
    one line, before data or weights are read: exit 2, no metrics.json. Here two 1 GiB GPUs, OPT-125m in fp16."""
    import zobench.models
    from zobench.configs import compose
    from zobench.errors import ZobenchError
    from zobench.spec import RunSpec

    from conftest import run_cli

    monkeypatch.setattr(zobench.models, "gpu_memory", lambda: {0: 2**30, 1: 2**30})
    words = ["model=opt-125m", "model.init=random", "model.tokenizer=byte", "model.device_map=auto"]
    spec = RunSpec.from_cfg(compose([*words, "model.headroom_gib=0.9"]))
    with pytest.raises(ZobenchError, match=r"do not fit on 2 GPU\(s\) with model.headroom_gib=0.9") as refused:
        zobench.models.refuse_spill(spec.model, torch.float16)
    assert "\n" not in str(refused.value)
    zobench.models.refuse_spill(RunSpec.from_cfg(compose([*words, "model.headroom_gib=0.5"])).model, torch.float16)
    # no GPU at all here: the same refusal's "none is visible", from the command line
    done = run_cli(*QUICK, "train.steps=1", "model.device_map=auto", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2 and "none is visible" in done.stderr, done.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGUSR2 to rank 1 alone (signals reach the ranks at different moments): both ranks of an FSDP2 Adam run
    stop after the same step, so rank 0 checkpoints its shards (a collective) and records `interrupted` instead of
    waiting in the next step's collectives; `resume=` ends where an uninterrupted run ends."""
    from test_distributed_zo import signal_rank_when, trajectory_lines

    run = QUICK + ["optimizer=adam", "optimizer.lr=1e-4", "train.keep_best=host", "train.steps=150",
                   "train.eval_interval=0", "checkpoint.every=1000", "save_model=true"]
    stopped = tmp_path / "stopped"
    job = torchrun(*run, f"hydra.run.dir={stopped}", wait=False)
    signal_rank_when(job, lambda: trajectory_lines(stopped) >= 20, signal.SIGUSR2, within=300, wait=120)
    metrics = json.loads((stopped / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and 20 <= metrics["steps"] < 150, metrics["error"]
    assert json.loads((stopped / "checkpoint" / "state.json").read_text())["step"] == metrics["steps"]
    assert torchrun(f"resume={stopped}", timeout=600).returncode == 0
    whole = tmp_path / "whole"
    assert torchrun(*run, f"hydra.run.dir={whole}", timeout=600).returncode == 0
    assert losses(stopped) == losses(whole) and same_weights(stopped, whole)
