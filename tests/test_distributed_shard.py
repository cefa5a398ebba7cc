"""Zeroth-order `shard` mode (parallel.zo=shard): θ sharded with FSDP2 over 2 ranks (gloo, CPU), each rank perturbing
its own rows, against one process: z bit for bit (uneven and empty shards too); MeZO, ZO-Adam, AdaMeZO and Sparse
MeZO steps in fp32, MeZO and ZO-SGD momentum in fp16 (both precision.zo_update modes); the stale-parameter trap.
(Addax in shard mode: tests/test_distributed_addax.py.)

One torchrun runs this file as its worker (`__main__` below): each rank builds opt-tiny with zobench's build
functions, keeps an unsharded copy as the one-process run, shards the other, steps both on the same fixed batches
and rank 0 writes what it found to a JSON file the tests read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


STEPS = 3
FP16 = {"mezo/fp16-reference": ["dtype=float16", "precision.zo_update=reference"],
        "zo_sgd_momentum/fp16-fused": ["dtype=float16", "precision.zo_update=fused", "precision.state_dtype=weights"]}
WORKER_TIMEOUT = 180


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("shard") / "found.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(out)], capture_output=True, text=True, timeout=WORKER_TIMEOUT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_z_on_each_shard_is_one_process_z_bit_for_bit(found):
    """Gathered shards' z == one process's z, exactly: parameters of 5 rows (3 + 2), 1 row (rank 1 holds none),
    9 elements, with 4-element blocks that straddle the shards' boundaries; then opt-tiny's every parameter
    sharded by FSDP2 (its 259-row embedding: 130 + 129 rows) with 1000-element blocks."""
    assert found["z_synthetic"] == {"p0": True, "p1": True, "p2": True, "p3": True}
    assert found["shard_rows"]["model.decoder.embed_tokens.weight"] == [[259, 64], [130, 64], [129, 64]]
    assert found["shard_rows"]["p1"] == [[1, 7], [1, 7], [0, 7]]
    assert found["z_model"] and all(found["z_model"].values())
    assert found["perturb_synthetic"]  # the in-place pass (perturb) moves each shard as one process moves it


@pytest.mark.parametrize("name", ["mezo", "zo_adam", "adamezo", "sparse_mezo"])
def test_sharded_steps_equal_one_process(found, name):
    """Losses, projected gradients and final weights (gathered) of a few fp32 steps on fixed batches equal one
    process's to 1e-6; and the weights did move (by far more than the tolerance)."""
    run = found["steps"][name]
    assert run["moved"] > 1e-4
    assert run["weights_max_diff"] <= 1e-6
    assert max(abs(a - b) for a, b in zip(run["losses"], run["reference_losses"])) <= 1e-6
    assert max(abs(a - b) for a, b in zip(run["g"], run["reference_g"])) <= 1e-6
    assert run["ranks_agree"]  # the loss (and g) is the same on both ranks


def test_sharded_model_evaluates_as_one_process(found):
    """Dev evaluation (candidate scoring through the whole forward) of each sharded model after its steps gives
    one process's predictions, metric and loss."""
    for run in found["steps"].values():
        one, sharded = run["dev"]
        assert sharded["predictions"] == one["predictions"] and sharded["metric"] == one["metric"]
        assert sharded["loss"] == pytest.approx(one["loss"], abs=1e-6)


@pytest.mark.parametrize("name", FP16)
def test_sharded_16_bit_steps_equal_one_process_bit_for_bit(found, name):
    """fp16 weights, MeZO in MeZO's rounding (reference) and ZO-SGD momentum in zobench's (fused, fp16 state):
    the shards round as one process's whole tensors do, element by element."""
    run = found["steps"][name]
    assert run["moved"] > 1e-4
    assert run["weights_max_diff"] == 0.0
    assert run["losses"] == run["reference_losses"] and run["g"] == run["reference_g"]


def test_stale_parameter_trap(found):
    """FSDP2 with its defaults keeps the root unit's (embeddings, head) gathered weights after a forward; a ZO
    step has no backward to reshard them, so the −eps forward reuses θ + eps·z there and g is wrong (the trap
    is real). fresh_forwards (what shard_for_zo adds) reshards every unit after each forward: g is one
    process's again. Dropping that reshard fails this test."""
    trap = found["trap"]
    assert abs(trap["g"] - trap["reference_g"]) > 1e-2
    assert trap["fixed_g"] == pytest.approx(trap["reference_g"], abs=1e-6)


# -- the worker, under torchrun ----------------------------------------------------------------------------------
def _gather_rows(tensor):
    import torch
    import torch.distributed as dist

    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, tensor.detach().clone())
    return torch.cat(pieces, dim=0)


def _z_synthetic(found):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from zobench.optim.engine import PerturbationEngine

    mesh = init_device_mesh("cpu", (2,))
    generator = torch.Generator().manual_seed(0)
    fulls = [torch.randn(shape, generator=generator) for shape in [(5, 3), (1, 7), (9,), (2, 2)]]
    plain = [(f"p{i}", torch.nn.Parameter(full.clone())) for i, full in enumerate(fulls)]
    sharded = [(f"p{i}", torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)])))
               for i, full in enumerate(fulls)]
    one, each = PerturbationEngine(plain, seed=0), PerturbationEngine(sharded, seed=0)
    found["z_synthetic"] = {name: bool(torch.equal(_gather_rows(each.direction(11, i, p)),
                                                   one.direction(11, i, plain[i][1])))
                            for i, (name, p) in enumerate(sharded)}
    found["shard_rows"] = {"p1": [list(fulls[1].shape)] + _rows_per_rank(sharded[1][1])}
    one.perturb(11, 0.5)
    each.perturb(11, 0.5)
    found["perturb_synthetic"] = all(torch.equal(p.full_tensor(), q) for (_, p), (_, q) in zip(sharded, plain))


def _rows_per_rank(param):
    import torch.distributed as dist

    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, list(param.to_local().shape))
    return shapes


def _setup(name, overrides=()):
    """(spec, model, batches, (task, tokenizer, dev examples)), opt-tiny on CPU (fp32 unless `overrides` say), built as a run builds it."""
    import torch

    from zobench.build import build_model, encode_splits, sample_splits
    from zobench.configs import compose
    from zobench.encoding import collate
    from zobench.spec import RunSpec

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import QUICK

    spec = RunSpec.from_cfg(compose(QUICK + [f"optimizer={name}", "optimizer.lr=1e-3", "optimizer.eps=1e-3",
                                             *overrides]))
    torch.manual_seed(spec.seed)
    task = spec.task
    model, tokenizer, _ = build_model(spec, max_length=spec.max_length)
    encoded = encode_splits(spec, sample_splits(spec), tokenizer)
    size = spec.train.batch_size
    batches = [collate(encoded.train[i * size:(i + 1) * size], tokenizer.pad_token_id,
                       classification=bool(task["train_as_classification"])) for i in range(len(encoded.train) // size)]
    return spec, model, batches, (task, tokenizer, encoded.dev)


def _steps(method, batches, steps):
    losses, gs = [], []
    for step in range(steps):
        losses.append(method.step(batches[step % len(batches)]))
        gs.extend(g for _, g in method.last_projected_grads)
    return losses, gs


def _run(name, steps, overrides=(), sharding="shard_for_zo"):
    """One process's steps (an unsharded copy, its Objective as a run builds it) and the sharded model's (the
    whole forward), on the same batches. `sharding`: shard_for_zo (the mode's), or FSDP2's defaults with or
    without fresh_forwards (the trap)."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from zobench.build import Evaluator, build_method
    from zobench.objective import Objective
    from zobench.parallel.shard import decoder_layers
    from zobench.parallel.zo_shard import fresh_forwards, reshard_all, shard_for_zo

    spec, model, batches, (task, tokenizer, dev) = _setup(name, overrides)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = copy.deepcopy(model)
    one = build_method(spec, reference, Objective(reference))  # as a one-process run builds it
    reference_losses, reference_g = _steps(one, batches, steps)
    if sharding == "shard_for_zo":
        shard_for_zo(model)
    else:  # FSDP2's defaults: the root keeps its gathered weights after a forward
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        if sharding == "defaults+fresh_forwards":
            fresh_forwards(model)
    method = build_method(spec, model, Objective(model, forward=model))
    losses, gs = _steps(method, batches, steps)
    evaluated = [Evaluator(objective, spec, tokenizer, torch.device("cpu"))(dev)
                 for objective in (one.loss_fn, method.loss_fn)]
    reshard_all(model)  # FSDP2's defaults leave the root gathered: its sharded parameters are the weights
    with torch.no_grad():
        final = {n: p.full_tensor() for n, p in model.named_parameters()}
        expected = dict(reference.named_parameters())
        weights_max_diff = max(float((final[n] - expected[n]).abs().max()) for n in final)
        moved = max(float((expected[n] - start[n]).abs().max()) for n in start)
    mine = torch.tensor(losses + gs, dtype=torch.float64)
    theirs = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(theirs, mine)
    return model, one, {
        "losses": losses, "reference_losses": reference_losses, "g": gs, "reference_g": reference_g,
        "weights_max_diff": weights_max_diff, "moved": moved, "dev": evaluated,
        "ranks_agree": all(torch.equal(t, mine) for t in theirs)}


def _worker(out: str) -> None:
    import torch
    import torch.distributed as dist

    from zobench.optim import engine as engine_module
    from zobench.optim.engine import PerturbationEngine

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    found = {}
    engine_module.BLOCK = 4  # blocks that straddle the shards' boundaries
    _z_synthetic(found)
    engine_module.BLOCK = 1000  # opt-tiny's parameters span many blocks, the shards start inside one
    found["steps"] = {}
    model, one, found["steps"]["mezo"] = _run("mezo", STEPS)
    sharded_engine = PerturbationEngine(model.named_parameters(), seed=0)
    found["z_model"] = {name: bool(torch.equal(_gather_rows(sharded_engine.direction(5, i, param)),
                                               one.engine.direction(5, i, one.engine.named[i][1])))
                        for i, (name, param) in enumerate(sharded_engine.named)}
    found["shard_rows"]["model.decoder.embed_tokens.weight"] = [[259, 64]] + _rows_per_rank(
        model.get_input_embeddings().weight)
    _, _, found["steps"]["zo_adam"] = _run("zo_adam", STEPS, ["optimizer.q=2"])  # two directions a step
    _, _, found["steps"]["adamezo"] = _run("adamezo", 5, ["optimizer.horizon=2"])  # steps 4 and 5 adaptive
    _, _, found["steps"]["sparse_mezo"] = _run("sparse_mezo", STEPS, ["optimizer.sparsity=0.8"])
    for name, overrides in FP16.items():  # 16-bit weights, both precision.zo_update modes
        _, _, found["steps"][name] = _run(name.split("/")[0], STEPS, overrides)
    _, _, trap = _run("mezo", 1, sharding="defaults")
    _, _, fixed = _run("mezo", 1, sharding="defaults+fresh_forwards")
    found["trap"] = {"g": trap["g"][0], "fixed_g": fixed["g"][0], "reference_g": trap["reference_g"][0]}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
