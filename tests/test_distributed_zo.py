"""Zeroth-order runs over 2 ranks (torchrun, gloo on CPU) equal the one-process run; rank 0 alone writes the
run folder; a killed rank ends the job on every rank and the run resumes to where an uninterrupted one ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, run_cli

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

FEW = QUICK + ["train.steps=3", "train.eval_interval=0", "save_model=true"]


def torchrun(*args: str, timeout: float = 240, wait: bool = True):
    """`OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m zobench ARGS`, as a user types it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "zobench", *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def one_process(tmp_path: Path, name: str, *overrides: str) -> Path:
    """The same run in this process (zobench.run.run, as the CLI's job calls it)."""
    return run_here(tmp_path / name, *FEW, *overrides)


def run_here(folder: Path, *words: str) -> Path:
    """The run of `words` (all its overrides) in this process, into `folder`, completed."""
    from zobench.configs import compose
    from zobench.run import run

    folder.mkdir()
    assert run(compose(list(words)), folder)["status"] == "completed"
    return folder


def both_ways(tmp_path: Path, *words: str) -> tuple[Path, Path]:
    """(one process, 2 ranks): the run folders of the run of `words` (all its overrides) in this process and
    under `torchrun --nproc_per_node=2`."""
    two = tmp_path / "two"
    result = torchrun(*words, f"hydra.run.dir={two}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_here(tmp_path / "one", *words), two


def losses(folder: Path) -> list[list[float]]:
    lines = (folder / "trajectory.jsonl").read_text().splitlines()
    return [json.loads(line)["losses"] for line in lines]


def assert_same_run(one: Path, two: Path, tolerance: float = 1e-6) -> None:
    """Per-step losses (relative to their size, at least 1: an LM loss of ~10 has fp32 steps of 1e-6) and the
    saved final weights agree to `tolerance` (fp32)."""
    ones, twos = losses(one), losses(two)
    assert len(ones) == len(twos) and ones
    assert max(abs(a - b) / max(1.0, abs(a)) for x, y in zip(ones, twos) for a, b in zip(x, y)) <= tolerance
    first, second = (load_file(str(f / "model" / "model.safetensors")) for f in (one, two))
    assert first.keys() == second.keys()
    assert max(float((first[k] - second[k]).abs().max()) for k in first) <= tolerance


def run_files(folder: Path) -> set[str]:
    """The run folder's files (paths below it), Hydra's own aside; what each holds is compared elsewhere."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_data_mode_equals_one_process_and_rank_0_alone_writes_the_run_folder(tmp_path):
    """MeZO, parallel.zo=data: each rank half of each batch, the loss parts all-reduced; the 2-rank run's
    losses and weights are the one-process run's, its folder holds the same files (nothing of rank 1), and
    metrics.json says how the ranks ran."""
    two = tmp_path / "two"
    result = torchrun(*FEW, "optimizer=mezo", f"hydra.run.dir={two}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = tmp_path / "one"
    single = run_cli(*FEW, "optimizer=mezo", f"hydra.run.dir={one}")
    assert single.returncode == 0, single.stderr[-3000:]
    assert_same_run(one, two)
    assert run_files(two) == run_files(one)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["world_size"] == 2 and metrics["parallel"] == "zo=data"
    assert metrics["replicas_identical"] is True  # the ranks' final weights are bit-identical (no drift)
    peaks = metrics["peak_memory_bytes_per_rank"]
    assert len(peaks) == 2 and metrics["peak_memory_bytes_max"] == max(peaks) > 0
    assert metrics["peak_memory_bytes_sum"] == sum(peaks)
    # two evaluations a step, each all-reducing (numerator, denominator) in float64: 32 bytes a step
    assert metrics["bytes_sent_per_step_per_rank"] == [32.0, 32.0]
    # each rank reads its half of the batches: together the one-process run's training tokens
    assert sum(metrics["tokens_per_rank"]) == json.loads((one / "metrics.json").read_text())["tokens"]
    assert metrics["tokens"] == metrics["tokens_per_rank"][0]
    log_lines = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log_lines if "loss" in line and "split" not in line] == [1, 2, 3]


def test_directions_mode_equals_one_process_and_replays_on_one_process(tmp_path):
    """ZO-Adam, parallel.zo=directions, q=2: a direction per rank, the (loss+, loss−) pairs gathered; equal to
    the one-process q=2 run, and zobench-replay on one process rebuilds its weights from the trajectory."""
    from zobench.replay import replay_run

    two = tmp_path / "two"
    result = torchrun(*FEW, "optimizer=zo_adam", "optimizer.q=2", "parallel.zo=directions", f"hydra.run.dir={two}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = one_process(tmp_path, "one", "optimizer=zo_adam", "optimizer.q=2")
    assert_same_run(one, two)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["parallel"] == "zo=directions" and metrics["replicas_identical"] is True
    assert metrics["bytes_sent_per_step_per_rank"] == [16.0, 16.0]  # its direction's two losses, float64
    replayed = load_file(str(replay_run(two, out=tmp_path / "replayed") / "model.safetensors"))
    trained = load_file(str(two / "model" / "model.safetensors"))
    assert all(torch.equal(replayed[k], trained[k]) for k in trained)  # bit for bit: the same arithmetic


@pytest.mark.slow
@pytest.mark.parametrize("mode, optimizer, more", [
    ("data", "zo_adam", []), ("data", "zo_sgd_momentum", []),
    ("data", "adamezo", ["optimizer.horizon=2", "train.steps=5"]),  # steps 4 and 5 past its MeZO warm-up
    ("data", "mezo", ["task.train_as_classification=false"]),  # the LM loss: token NLL sum / token count
    ("data", "sparse_mezo", []), ("directions", "mezo", ["optimizer.q=2"]),
    ("directions", "zo_sgd_momentum", ["optimizer.q=2"]), ("directions", "sparse_mezo", ["optimizer.q=4"])])
def test_more_optimizers_equal_one_process(tmp_path, mode, optimizer, more):
    two = tmp_path / "two"
    result = torchrun(*FEW, f"optimizer={optimizer}", *more, f"parallel.zo={mode}", f"hydra.run.dir={two}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_run(one_process(tmp_path, "one", f"optimizer={optimizer}", *more), two)
    assert json.loads((two / "metrics.json").read_text())["replicas_identical"] is True


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker `rank` (a child of its agent process, RANK in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def signal_rank_when(job, ready, sig: int = signal.SIGKILL, rank: int = 1, within: float = 180,
                     wait: float = 60) -> float:
    """Once `ready()` holds, sends `sig` to torchrun `job`'s worker `rank` and waits for the job to end (killing
    it if it outlives `wait`); returns the seconds from the signal to the job's end."""
    try:
        deadline = time.monotonic() + within
        while not ready():
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.poll() else ""
            time.sleep(0.05)
        os.kill(_rank_pid(job.pid, rank), sig)
        sent = time.monotonic()
        job.wait(timeout=wait)
        return time.monotonic() - sent
    finally:
        if job.poll() is None:
            job.kill()


def trajectory_lines(folder: Path) -> int:
    """The steps a run's trajectory holds so far (0 before it exists)."""
    path = folder / "trajectory.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0

def assert_resumes_where_a_whole_run_ends(stopped: Path, run: list[str], whole: Path) -> None:
    """`resume=` of the stopped 2-rank run completes, and its losses and saved weights are those of the same run
    uninterrupted (into `whole`), bit for bit."""
    resumed = torchrun(f"resume={stopped}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert torchrun(*run, f"hydra.run.dir={whole}").returncode == 0
    assert json.loads((stopped / "metrics.json").read_text())["status"] == "completed"
    assert losses(stopped) == losses(whole)
    first, second = (load_file(str(f / "model" / "model.safetensors")) for f in (stopped, whole))
    assert all(torch.equal(first[k], second[k]) for k in first)



@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_run_resumes_where_an_uninterrupted_one_ends(tmp_path):
    run = QUICK + ["optimizer=mezo", "train.steps=40", "train.eval_interval=0", "checkpoint.every=1",
                   "save_model=true"]
    killed = tmp_path / "killed"
    job = torchrun(*run, f"hydra.run.dir={killed}", wait=False)
    assert signal_rank_when(job, lambda: trajectory_lines(killed) >= 3) < 60  # every rank ends within a minute
    assert job.returncode != 0
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["status"] in ("failed", "interrupted") and metrics["steps"] < 40
    assert_resumes_where_a_whole_run_ends(killed, run, tmp_path / "whole")


def test_what_cannot_run_over_ranks_is_refused_in_one_line(tmp_path):
    """Before any model loads: a method that steps inside backward (IP-SGD), directions that do not divide over
    the ranks; and a sweep under torchrun, on the command line (exit 2)."""
    from zobench.configs import compose
    from zobench.errors import ZobenchError
    from zobench.parallel.world import World
    from zobench.parallel.zo import from_spec
    from zobench.spec import RunSpec

    two = World(rank=0, size=2, local_rank=0)
    for overrides, words in ((["optimizer=ip_sgd"], "optimizer=sgd"),
                             (["optimizer=mezo", "optimizer.q=3", "parallel.zo=directions"], "optimizer.q=3"),
                             (["optimizer=adamezo", "parallel.zo=directions"], "optimizer.q=1")):
        spec = RunSpec.from_cfg(compose(QUICK + overrides))
        with pytest.raises(ZobenchError, match=words) as refused:
            from_spec(spec, two)
        assert "\n" not in str(refused.value)
    spec = RunSpec.from_cfg(compose(QUICK + ["optimizer=mezo", "optimizer.q=3", "parallel.zo=directions"]))
    assert from_spec(spec, World()).mode == "directions"  # one process: nothing to spread
    rank_0_of_2 = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}  # as torchrun sets them
    result = run_cli("-m", "optimizer=mezo,zo_adam", env=rank_0_of_2)
    assert result.returncode == 2 and "torchrun runs one job" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli(*QUICK, "optimizer=ip_sgd", f"hydra.run.dir={tmp_path / 'ip_sgd'}", env=rank_0_of_2)
    assert result.returncode == 2 and "optimizer=sgd" in result.stderr  # before any process group or model
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "ip_sgd" / "metrics.json").exists()


@pytest.mark.parametrize("classification", [True, False])
def test_loss_parts_of_a_batchs_slices_add_up_to_its_loss(quick_cfg, classification):
    """Objective.loss_parts, what data mode all-reduces: the parts of two slices of a batch, added, give the
    one-process loss of the whole batch (classification: CE per example; LM: NLL per option token)."""
    from omegaconf import OmegaConf

    from zobench.encoding import Encoder, collate
    from zobench.models import load_model
    from zobench.objective import Objective
    from zobench.tasks import PromptTemplate, load_task_definition

    model, tokenizer = load_model(OmegaConf.to_container(quick_cfg().model, resolve=True), torch.device("cpu"),
                                  torch.float32)
    template, encoder = PromptTemplate(load_task_definition("sst2")), Encoder(tokenizer, 256)
    rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(["a bright story", "a dull and tired mess",
                                                                   "warm, funny", "clumsy, loud and boring", "fine"])]
    examples = [encoder.encode(template.render(row)) for row in rows]
    objective = Objective(model)
    with torch.no_grad():
        whole = objective.loss(collate(examples, tokenizer.pad_token_id, classification))
        parts = [objective.loss_parts(collate(part, tokenizer.pad_token_id, classification))
                 for part in (examples[:2], examples[2:])]
    numerator, denominator = (sum(p[i] for p in parts) for i in (0, 1))
    assert float(denominator) == (5 if classification else float(sum(
        collate(examples, tokenizer.pad_token_id, False).option_mask[:, 1:].sum(dim=1))))
    assert abs(float(numerator / denominator) - float(whole)) <= 1e-6 * max(1.0, float(whole))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["data", "directions", "shard"])
@pytest.mark.parametrize("optimizer", ["zo_sgd_sign", "zo_sgd_sign_plain"])
def test_zo_sign_methods_in_every_mode_equal_one_process(tmp_path, mode, optimizer):
    """ZO-Bench's sign methods (ZO-SignAdamW, ZO-SGD-Sign) in each parallel.zo mode end where one process ends
    (directions: q=2, one direction per rank); the replicas of data and directions stay bit-identical."""
    words = [*FEW, f"optimizer={optimizer}", "optimizer.lr=1e-4", "optimizer.q=2", "train.keep_best=host"]
    two = tmp_path / "two"
    result = torchrun(*words, f"parallel.zo={mode}", f"hydra.run.dir={two}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_run(one_process(tmp_path, "one", *words), two)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["parallel"] == f"zo={mode}"
    assert metrics["replicas_identical"] is (None if mode == "shard" else True)


@pytest.mark.slow
@pytest.mark.parametrize("mode, overrides", [
    ("zo=shard", ["optimizer=mezo", "parallel.zo=shard"]),  # FSDP2-sharded θ, each rank perturbs its rows
    ("fo=fsdp", ["optimizer=adam", "optimizer.lr=1e-4"]),  # FSDP2 Adam, each rank half of each batch
])
def test_sharded_modes_through_the_command_line_equal_one_process(tmp_path, mode, overrides):
    """`torchrun -m zobench` with the weights sharded (keep_best=host: FSDP2 shards are kept in host memory)
    ends where one process ends: losses per step and the saved (gathered) weights."""
    words = [*FEW, *overrides, "train.keep_best=host"]
    two = tmp_path / "two"
    result = torchrun(*words, f"hydra.run.dir={two}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = tmp_path / "one"
    assert run_cli(*words, f"hydra.run.dir={one}").returncode == 0
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["parallel"] == mode and metrics["world_size"] == 2
    if mode == "zo=shard":
        assert_same_run(one, two)
        return
    # first-order: the logged (whole-batch) losses and the weights within 1e-5, tests/test_distributed_fo.py's
    # bound for FSDP2 Adam (its reductions round otherwise); the trajectory's: tests/test_distributed_fo_fp16.py
    logged = [[line["loss"] for line in map(json.loads, (f / "log.jsonl").read_text().splitlines())
               if line["event"] == "train"] for f in (one, two)]
    assert len(logged[0]) == len(logged[1]) == 3 and max(abs(a - b) for a, b in zip(*logged)) <= 1e-5
    first, second = (load_file(str(f / "model" / "model.safetensors")) for f in (one, two))
    assert max(float((first[k] - second[k]).abs().max()) for k in first) <= 1e-5
