"""Addax over 2 ranks (torchrun, gloo, CPU) in every parallel.zo mode equals the one-process run: its ZO half as the
ZO methods run there, its first-order half on each rank's slice of B1 (gradients summed in the hook in data and
directions mode, FSDP2's sharded gradients stepped after backward in shard mode: zobench/parallel/in_place.py).

One torchrun runs this file as its worker (`__main__` below) for a list of cases: each rank builds opt-tiny with
zobench's build functions, steps an unsharded copy as one process does, and steps the model through the run's
`Ranks` (placed, the loss, the method attached, each step's examples this rank's) on the same batches; rank 0
writes what it found to a JSON file the tests read. The command-line tests run `torchrun -m zobench` as a user does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICK  # also as the torchrun worker: this file's folder is then the first on sys.path

WORKER_TIMEOUT = 300
ADDAX = ["optimizer=addax", "optimizer.k0=2", "optimizer.k1=2", "optimizer.alpha=0.5", "optimizer.lr=1e-3",
         "train.keep_best=none"]
# case name -> (parallel.zo, steps, overrides); the fp32 ones must equal one process within 1e-6
CASES = {
    "data/mezo": ("data", 3, []),
    "data/adamezo": ("data", 5, ["optimizer.zo=adamezo", "+optimizer.zo_options.horizon=2"]),  # 4, 5: adaptive
    "data/clip": ("data", 3, ["precision.grad_clip=0.05"]),  # LOMO's norm pass, the norm clipping every step
    "data/alpha0": ("data", 3, ["optimizer.alpha=0", "optimizer.weight_decay=0.1"]),  # IP-SGD on B1 alone
    "directions/mezo": ("directions", 3, ["+optimizer.zo_options.q=2"]),
    "directions/sparse_mezo": ("directions", 3, ["optimizer.zo=sparse_mezo", "+optimizer.zo_options.q=2"]),
    "shard/mezo": ("shard", 3, []),
    "shard/adamezo": ("shard", 5, ["optimizer.zo=adamezo", "+optimizer.zo_options.horizon=2"]),
    "shard/clip": ("shard", 3, ["precision.grad_clip=0.05", "optimizer.weight_decay=0.1"]),
    # fp16 weights, dynamic loss scaling (the FO half's): zobench's fused ZO update and MeZO's reference one
    "data/fp16-fused": ("data", 3, ["dtype=float16", "precision.zo_update=fused"]),
    "shard/fp16-reference": ("shard", 3, ["dtype=float16", "precision.zo_update=reference"]),
    "directions/fp16-fused": ("directions", 3, ["dtype=float16", "+optimizer.zo_options.q=2"]),
    "data/fp16-alpha0": ("data", 3, ["dtype=float16", "optimizer.alpha=0"]),
    "shard/fp16-alpha0": ("shard", 3, ["dtype=float16", "optimizer.alpha=0"]),
    # a loss scale (2^19) so large that the first steps' fp16 gradients overflow: every rank skips them, as one
    # process does, until the halved scale fits
    "data/fp16-overflow": ("data", 5, ["dtype=float16", "+loss_scale=524288"]),
}
SCALER = ("scale", "clean_steps", "skipped_steps")  # the loss scaler's state, compared between ranks
FAST = ["data/mezo", "directions/mezo", "shard/clip", "data/fp16-alpha0", "data/fp16-overflow"]


def _launch(out: Path, names: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(out), *names], capture_output=True, text=True, timeout=WORKER_TIMEOUT,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory.mktemp("addax") / "fast.json", FAST)


@pytest.fixture(scope="module")
def rest(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory.mktemp("addax") / "rest.json", [name for name in CASES if name not in FAST])


def _found(request, name: str) -> dict:
    return request.getfixturevalue("fast" if name in FAST else "rest")[name]


def _assert_equal_to_one_process(run: dict, tolerance: float) -> None:
    assert run["moved"] > 100 * tolerance  # the weights did move, by far more than the tolerance
    assert len(run["values"]) == len(run["reference_values"])
    for step, (mine, theirs) in enumerate(zip(run["values"], run["reference_values"])):
        assert len(mine) == len(theirs) and max(abs(a - b) for a, b in zip(mine, theirs)) <= tolerance, step
    assert max(abs(a - b) for a, b in zip(run["losses"], run["reference_losses"])) <= tolerance
    assert run["weights_max_diff"] <= tolerance
    assert run["ranks_agree"]  # every rank logged and recorded the same (global) values


FP32 = [name for name in CASES if "fp16" not in name]


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in FP32])
def test_addax_over_two_ranks_equals_one_process(request, name):
    """fp32: the recorded losses of each step ([ZO+, ZO−, …, FO] as one process records them), the logged step
    losses and the final weights within 1e-6 of one process's; data and directions replicas bit-identical."""
    run = _found(request, name)
    _assert_equal_to_one_process(run, 1e-6)
    mode = CASES[name][0]
    assert run["replicas_identical"] is (None if mode == "shard" else True)


def test_data_mode_counts_the_gradients_it_sends(fast):
    """data mode sends the loss scalars (16 bytes a loss) and, from the hook, each gradient summed in fp32: θ's
    247,872 elements × 4 bytes once a step (no norm pass in fp32 without clipping)."""
    run = fast["data/mezo"]
    assert run["bytes_sent"] == 3 * (2 * 16 + 16 + 247_872 * 4)


FP16 = [name for name in CASES if "fp16" in name]


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in FP16])
def test_addax_fp16_over_two_ranks_is_one_process_within_the_roundings_of_the_split(request, name):
    """fp16 weights. Each rank rounds its half of B1's gradient to fp16 before the ranks' sum, where one process
    rounds the whole B1's gradient once: a gradient element may differ by such a rounding, so a weight updated
    by the FO half (its fp32 update rounded once into fp16) may land one ulp away. The ZO half then reads the
    losses at weights an ulp apart, and its projected gradient divides their difference by 2·eps: the recorded
    losses are within 1e-4 of one process's (measured 5.1e-5), so g0 within 0.05 and a ZO step within
    lr·α·0.05·|z| ≈ 1e-4 of one process's.
    Checked: after the first step of the FO half alone (α = 0) every weight within one fp16 ulp of one process's;
    over all steps every weight within one ulp or 2e-4 (measured 1.2e-4), the losses within 1e-4, and every rank
    took the same loss-scaling decisions as one process (with a loss scale that overflows: the same skips)."""
    run = _found(request, name)
    assert run["moved"] > 1e-4
    if "alpha0" in name:
        assert run["apart_after_first_step"][0] <= 1.0
    ulps, beyond = run["apart"]
    assert beyond <= 2e-4, (ulps, beyond)
    assert max(abs(a - b) for x, y in zip(run["values"], run["reference_values"]) for a, b in zip(x, y)) <= 1e-4
    assert run["scalers"][0] == run["scalers"][1] == run["reference_scaler"]
    if name == "data/fp16-overflow":
        assert 1 <= run["reference_scaler"]["skipped_steps"] < CASES[name][1]
    if CASES[name][0] != "shard":
        assert run["replicas_identical"] is True


# -- through the command line ------------------------------------------------------------------------------------
QUICK_RUN = [*QUICK, "train.steps=3", "train.eval_interval=0", "save_model=true", *ADDAX]


@pytest.mark.slow
def test_a_two_rank_addax_run_equals_one_process_and_replay_refuses_it_in_one_line(tmp_path):
    """`torchrun -m zobench optimizer=addax`: the same losses and saved weights as one process, metrics.json says
    how the ranks ran; zobench-replay refuses the run in one line (the FO half is not rebuilt from loss values)."""
    from safetensors.torch import load_file

    from conftest import run_cli
    from zobench.errors import ZobenchError
    from zobench.replay import replay_run

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "zobench", *QUICK_RUN, f"hydra.run.dir={two}"], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert run_cli(*QUICK_RUN, f"hydra.run.dir={one}").returncode == 0
    lines = [[json.loads(line)["losses"] for line in (f / "trajectory.jsonl").read_text().splitlines()]
             for f in (one, two)]
    assert max(abs(a - b) for x, y in zip(*lines) for a, b in zip(x, y)) <= 1e-6 and len(lines[1]) == 3
    first, second = (load_file(str(f / "model" / "model.safetensors")) for f in (one, two))
    assert max(float((first[k] - second[k]).abs().max()) for k in first) <= 1e-6
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["parallel"] == "zo=data"
    assert metrics["replicas_identical"] is True and metrics["backward_passes"] == 3
    with pytest.raises(ZobenchError, match="optimizer=addax runs cannot be replayed") as refused:
        replay_run(two, out=tmp_path / "replayed")
    assert "\n" not in str(refused.value)


@pytest.mark.slow
@pytest.mark.parametrize("mode, half", [
    ("shard", ["optimizer.zo=adamezo", "+optimizer.zo_options.horizon=2"]),
    ("data", ["optimizer.zo=adamezo", "+optimizer.zo_options.horizon=2"]),
    ("directions", ["optimizer.zo=mezo", "+optimizer.zo_options.q=2"])])
def test_a_killed_addax_run_resumes_where_an_uninterrupted_one_ends(tmp_path, mode, half):
    """Each mode (AdaMeZO as the ZO half where it can: its history is state): rank 1 SIGKILLed mid-way ends the
    job; `resume=` under torchrun restores the weights (each rank's shards in shard mode), the ZO half's state and
    the loss scaler, and ends bit for bit where the uninterrupted 2-rank run ends."""
    from test_distributed_zo import assert_resumes_where_a_whole_run_ends, signal_rank_when, torchrun, trajectory_lines

    run = [*QUICK_RUN, "train.steps=12", "checkpoint.every=1", f"parallel.zo={mode}", *half]
    killed = tmp_path / "killed"
    job = torchrun(*run, f"hydra.run.dir={killed}", wait=False)
    signal_rank_when(job, lambda: trajectory_lines(killed) >= 4)
    assert job.returncode != 0
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["status"] in ("failed", "interrupted") and 4 <= metrics["steps"] < 12
    assert_resumes_where_a_whole_run_ends(killed, run, tmp_path / "whole")


def test_what_addax_cannot_split_over_the_ranks_is_refused_in_one_line():
    """Before anything loads: B1 split in every mode needs k1 ≥ ranks, B0 in data mode k0 ≥ ranks, directions
    the ZO half's q a multiple of the ranks; every mode is accepted otherwise (shard included)."""
    from zobench.configs import compose
    from zobench.errors import ZobenchError
    from zobench.parallel.world import World
    from zobench.parallel.zo import from_spec
    from zobench.spec import RunSpec

    two = World(rank=0, size=2, local_rank=0)
    for overrides, words in ((["optimizer.k1=1"], "optimizer.k1=1"),
                             (["optimizer.k0=1", "parallel.zo=data"], "optimizer.k0=1"),
                             (["parallel.zo=directions"], "optimizer.zo_options.q=1")):
        spec = RunSpec.from_cfg(compose(QUICK + ["optimizer=addax", *overrides]))
        with pytest.raises(ZobenchError, match=words) as refused:
            from_spec(spec, two)
        assert "\n" not in str(refused.value)
    for mode, more in (("data", []), ("directions", ["optimizer.k0=1", "+optimizer.zo_options.q=2"]),
                       ("shard", ["optimizer.k0=1", "train.keep_best=none"])):
        spec = RunSpec.from_cfg(compose(QUICK + ["optimizer=addax", f"parallel.zo={mode}", *more]))
        assert from_spec(spec, two).mode == mode


def test_the_memory_plan_of_sharded_addax_holds_its_sharded_gradients():
    """zobench-plan --memory plans Addax in its parallel.zo mode: in shard mode each GPU holds its shard of every
    gradient (θ/N in the weights' dtype) and one decoder layer's unsharded gradients with their fp32 reduce-scatter,
    where data mode holds one tensor's gradient at a time."""
    from zobench.memory_plan import parse_size, plan
    from zobench.plan import job_shape

    planned = {}
    for mode in ("data", "shard"):
        job = job_shape(["experiment=mezo_opt13b", "optimizer=addax", "task=sst2", f"parallel.zo={mode}"], {})
        assert job.parallel == mode
        planned[mode] = plan(job, parse_size("80GB"), gpus=2).per_gpu["gradients"]
    model, e = job.model, job.weights_bytes
    assert planned["data"] == model.largest_trained * (e + job.update_bytes)
    assert planned["shard"] == -(-model.trained * e // 2) + model.unit * (e + 4)


# -- the worker, under torchrun ----------------------------------------------------------------------------------
def _case(name: str) -> dict:
    import copy

    import torch
    import torch.distributed as dist

    from zobench.build import build_method, build_model, encode_splits, sample_splits
    from zobench.checkpoint import RecordingLoss
    from zobench.configs import compose
    from zobench.encoding import collate_indices
    from zobench.objective import Objective
    from zobench.parallel.ranks import Ranks
    from zobench.parallel.sharded_checkpoint import full_weights
    from zobench.parallel.world import from_env
    from zobench.parallel.zo import weights_digest
    from zobench.spec import RunSpec

    mode, steps, overrides = CASES[name]
    loss_scale = next((float(w.split("=")[1]) for w in overrides if w.startswith("+loss_scale=")), None)
    overrides = [w for w in overrides if not w.startswith("+loss_scale=")]
    spec = RunSpec.from_cfg(compose(QUICK + ADDAX + [f"parallel.zo={mode}", *overrides]))
    world = from_env()
    torch.manual_seed(spec.seed)
    model, tokenizer, _ = build_model(spec, max_length=spec.max_length)
    encoded = encode_splits(spec, sample_splits(spec), tokenizer)
    train, pad, classification = encoded.train, tokenizer.pad_token_id, spec.task["train_as_classification"]
    loss_dtype = spec.precision.dtype_of(spec.precision.loss_dtype)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def steps_of(method, recording, local, weights):
        """(recorded values per step, logged losses, the weights after the first step)"""
        if loss_scale is not None:
            method.fo.scaler.scale = loss_scale
        batches = method.batches([max(map(len, e.sequences)) for e in train], spec.train.batch_size, spec.seed)
        values, losses, first = [], [], None
        for _ in range(steps):
            indices = local(next(batches))
            losses.append(method.step(collate_indices(indices, train, pad, classification, torch.device("cpu"))))
            values.append(recording.take())
            first = weights() if first is None else first
        return values, losses, first

    reference = copy.deepcopy(model)  # one process: the model whole, its Objective as a one-process run builds it
    one_recording = RecordingLoss(Objective(reference, loss_dtype=loss_dtype))
    one = build_method(spec, reference, one_recording)
    reference_values, reference_losses, reference_first = steps_of(
        one, one_recording, lambda indices: indices,
        lambda: {n: p.detach().clone() for n, p in reference.named_parameters()})

    ranks = Ranks(spec, world)  # the run's wiring, as run.py's Job uses it
    objective = Objective(model, loss_dtype=loss_dtype, forward=ranks.place(model, torch.device("cpu")))
    recording = RecordingLoss(ranks.training_loss(objective))
    method = build_method(spec, model, recording)
    ranks.attach(method, recording)
    values, losses, first = steps_of(method, recording, ranks.local, lambda: full_weights(model))

    final = full_weights(model)
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    with torch.no_grad():
        weights_max_diff = max(float((final[n].float() - expected[n].float()).abs().max()) for n in final)
        moved = max(float((expected[n].float() - start[n].float()).abs().max()) for n in start)
    mine = torch.tensor([v for step in values for v in step] + losses, dtype=torch.float64)
    theirs = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(theirs, mine)
    sharded = mode == "shard"
    digest = torch.tensor(list(bytes.fromhex(weights_digest(model))) if not sharded else [0] * 32)
    digests = [torch.empty_like(digest) for _ in range(world.size)]
    dist.all_gather(digests, digest)
    scaler = method.fo.scaler.state_dict() if method.fo.scaler is not None else {}
    numbers = torch.tensor([scaler.get(k, 0) for k in SCALER], dtype=torch.float64)
    gathered = [torch.empty_like(numbers) for _ in range(world.size)]
    dist.all_gather(gathered, numbers)
    scalers = [dict(zip(SCALER, g.tolist())) if scaler else None for g in gathered]
    return {"values": values, "reference_values": reference_values, "losses": losses,
            "reference_losses": reference_losses, "weights_max_diff": weights_max_diff,
            "apart": _apart(final, expected), "apart_after_first_step": _apart(first, reference_first),
            "weights_differing": sum(int((final[n] != expected[n]).sum()) for n in final), "moved": moved,
            "ranks_agree": all(torch.equal(t, mine) for t in theirs),
            "replicas_identical": None if sharded else all(torch.equal(d, digests[0]) for d in digests),
            "bytes_sent": ranks.exchange.bytes_sent, "scalers": scalers,
            "reference_scaler": {k: float(v) for k, v in one.fo.scaler.state_dict().items()}
            if one.fo.scaler is not None else None}


def _apart(weights: dict, expected: dict) -> tuple[float, float]:
    """(the largest difference between two sets of weights in units of the last place: the spacing of their dtype
    at the larger of the two values, 0 for equal weights, 1 for neighbours; the largest absolute difference of
    the weights more than one ulp apart)"""
    import torch

    ulps, beyond = 0.0, 0.0
    for name, value in weights.items():
        larger = torch.maximum(value.abs(), expected[name].abs())
        spacing = (torch.nextafter(larger, torch.full_like(larger, float("inf"))) - larger).float()
        apart = (value.float() - expected[name].float()).abs()
        ulps = max(ulps, float((apart / spacing).max()))
        beyond = max(beyond, float(torch.where(apart > spacing, apart, 0.0).max()))
    return ulps, beyond


def _worker(out: str, names: list[str]) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    found = {name: _case(name) for name in names}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
