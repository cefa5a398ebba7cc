"""First-order methods over 2 ranks (torchrun, gloo, CPU): FSDP2 and DDP take the one-process step on the whole
batch; sharded checkpoints resume exactly and refuse an edited file; FSDP2 never serves stale weights.

Each case runs tests/distributed_fo_worker.py (zobench's own build functions) under torchrun and in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zobench.errors import ZobenchError

WORKER = Path(__file__).with_name("distributed_fo_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": str(Path(__file__).parent.parent)}


def launch(out: Path, steps: int, *words: str, ranks: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """The worker on `ranks` processes (torchrun) or one (plain python)."""
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    done = subprocess.run([*head, str(WORKER), str(out), str(steps), *words], capture_output=True, text=True,
                          env=ENV, timeout=240)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def result(out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return json.loads((out / "losses.json").read_text()), load_file(str(out / "weights.safetensors"))


def assert_same_run(a: Path, b: Path, tolerance: float) -> None:
    (losses_a, weights_a), (losses_b, weights_b) = result(a), result(b)
    losses_a = losses_a[len(losses_a) - len(losses_b):]  # a resumed run logs the steps after its checkpoint
    assert losses_b and max(abs(x - y) for x, y in zip(losses_a, losses_b)) <= tolerance, (losses_a, losses_b)
    assert set(weights_a) == set(weights_b)
    worst = max(float((weights_a[n].float() - weights_b[n].float()).abs().max()) for n in weights_a)
    assert worst <= tolerance, worst
    from safetensors.torch import load_file

    initial = load_file(str(a / "initial.safetensors"))
    assert max(float((weights_a[n].float() - w.float()).abs().max()) for n, w in initial.items()) > 10 * tolerance


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process reference runs, made once: {key: folder}."""
    root, made = tmp_path_factory.mktemp("one"), {}

    def get(key: str, *words: str) -> Path:
        if key not in made:
            launch(root / key, 5, *words, ranks=1)
            made[key] = root / key
        return made[key]

    return get


def test_fsdp_adam_equals_one_process_on_the_global_batch(tmp_path, one_process):
    """2 ranks of FSDP2, each on half of every batch of 4 (sst2, opt-tiny, fp32): 5 Adam steps land where one
    process lands on the whole batches, losses and weights within 1e-5."""
    launch(tmp_path / "fsdp", 5)
    assert_same_run(one_process("fp32"), tmp_path / "fsdp", 1e-5)


@pytest.mark.slow
def test_fsdp_adam_fp16_regime_equals_one_process(tmp_path, one_process):
    """The HF --fp16 regime on FSDP2 (fp32 sharded master weights, fp16 compute, dynamic loss scaling, clipping
    at 1.0 over all shards) against the same regime in one process, at MeZO's FT learning rate (1e-5). Each rank
    rounds its half batch's weight gradients to fp16 before they are summed (one process rounds the whole
    batch's once), and Adam's first steps are lr x sign(g): the losses agree within 1e-5, and the weights but
    where a near-zero gradient's sign flipped (measured: 484 of 247,872 weights by more than 1e-6, at most
    2.35e-5). One process with train.grad_accumulation=2 takes the ranks' roundings: tests/test_distributed_fo_fp16.py."""
    words = ["dtype=float16", "precision.master_weights=true", "precision.grad_clip=1.0", "optimizer.lr=1e-5"]
    launch(tmp_path / "fsdp16", 5, *words)
    (losses_a, weights_a), (losses_b, weights_b) = result(one_process("fp16", *words)), result(tmp_path / "fsdp16")
    assert max(abs(x - y) for x, y in zip(losses_a, losses_b)) <= 1e-5, (losses_a, losses_b)
    gaps = torch.cat([(weights_a[n] - weights_b[n]).abs().flatten() for n in weights_a])
    assert float(gaps.max()) <= 2 * 1e-5 * 5  # a sign flip on every step at most
    assert float((gaps > 1e-6).float().mean()) < 0.01
    # parallel.fsdp_param_dtype=weights: fp16 gathers (HF Trainer's FSDP --fp16) run, near but not at the above
    launch(tmp_path / "gather16", 5, *words, "parallel.fsdp_param_dtype=weights")
    losses_c = result(tmp_path / "gather16")[0]
    assert max(abs(x - y) for x, y in zip(losses_a, losses_c)) <= 1e-3, (losses_a, losses_c)


@pytest.mark.slow
def test_ddp_adam_and_fsdp_sgd_equal_one_process(tmp_path, one_process):
    """DDP Adam as FSDP2's; FSDP2 SGD on COPA (an LM loss: a mean over option tokens) with batches of 7 and 2
    (16 examples), split 3 + 4 and 1 + 1 over the ranks: each rank's share weighs its mean loss."""
    launch(tmp_path / "ddp", 5, "parallel.fo=ddp")
    assert_same_run(one_process("fp32"), tmp_path / "ddp", 1e-5)
    words = ["optimizer=sgd", "optimizer.lr=1e-1", "task=copa", "train.batch_size=7"]
    launch(tmp_path / "sgd", 5, *words)
    assert_same_run(one_process("sgd", *words), tmp_path / "sgd", 1e-5)


@pytest.mark.slow
def test_fsdp_head_tuning_equals_one_process(tmp_path, one_process):
    """Head-tuning on FSDP2: the body frozen once sharded, the tied head/embedding matrix trained through the
    head; and save_model=true's folder holds the whole trained weights."""
    words = ["optimizer=head_tuning", "optimizer.lr=1e-3"]
    launch(tmp_path / "ht", 5, *words, "+save_model")
    assert_same_run(one_process("ht", *words), tmp_path / "ht", 1e-5)
    # save_model=true: the shards gathered whole into rank 0's save_pretrained folder
    from transformers import AutoModelForCausalLM

    saved = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "ht" / "model").named_parameters())
    trained = result(tmp_path / "ht")[1]
    assert set(saved) == set(trained) and all(torch.equal(saved[n], trained[n]) for n in trained)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_exactly_and_refuses_an_edited_file(tmp_path, one_process):
    """Checkpoint at step 3 (each rank's shards in its own safetensors file, hashed in the manifest), resume
    on 2 ranks: step 5 equals the uninterrupted run (and DDP's from its one-process files). A shard file edited
    by one byte is refused on every rank, and so is a resume on another world size or a crafted manifest."""
    launch(tmp_path / "a", 3, "+save=3")
    folder = tmp_path / "a" / "run" / "checkpoint"
    manifest = json.loads((folder / "state.json").read_text())
    assert sorted(manifest["files"]) == ["state.rank0.safetensors", "state.rank1.safetensors",
                                         "weights.rank0.safetensors", "weights.rank1.safetensors"]
    assert manifest["state"]["shards"] == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest["files"], "state.json"])  # no pickle
    from zobench.checkpoint import check_manifest

    for shards, key in ((3, "files"), (10**12, "state.shards"), (True, "state.shards")):  # a crafted manifest
        crafted = json.loads(json.dumps(manifest))
        crafted["state"]["shards"] = shards
        with pytest.raises(ZobenchError, match=f"{key} must be"):
            check_manifest(crafted, folder / "state.json", manifest["run_id"])
    launch(tmp_path / "a", 5, "+resume")
    assert_same_run(one_process("fp32"), tmp_path / "a", 1e-5)
    launch(tmp_path / "ddp", 3, "+save=3", "parallel.fo=ddp")  # DDP: rank 0's replica, in one-process files
    assert sorted(json.loads((tmp_path / "ddp" / "run" / "checkpoint" / "state.json").read_text())["files"]) == \
        ["state.safetensors", "weights.safetensors"]
    launch(tmp_path / "ddp", 5, "+resume", "parallel.fo=ddp")
    assert_same_run(one_process("fp32"), tmp_path / "ddp", 1e-5)

    one = launch(tmp_path / "a", 5, "+resume", ranks=1, check=False)
    assert one.returncode != 0 and "holds the shards of 2 ranks, this run has 1" in one.stderr

    shard = folder / "weights.rank1.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    edited = launch(tmp_path / "a", 5, "+resume", check=False)
    assert edited.returncode != 0
    refusals = [line for line in edited.stderr.splitlines() if "does not match the SHA-256" in line]
    assert len(refusals) >= 2, edited.stderr[-3000:]  # the one line, raised on both ranks


def test_fsdp_never_serves_stale_weights(tmp_path):
    """Evaluate, change a root weight in place (the final layer norm's, as a restore of the best weights does
    between the last dev evaluation and the test), evaluate, take a backward pass, evaluate: the change shows
    in both. FSDP2 by default keeps the root gathered after a forward: the write would land in the gathered
    copy, which the next reshard throws away (issue 20's stale parameters), unless every forward reshards."""
    launch(tmp_path / "two", 0, "+stale")
    losses = json.loads((tmp_path / "two" / "stale.json").read_text())
    assert abs(losses["after"] - losses["before"]) > 1e-3, losses  # the change shows in the next forward
    assert losses["after_backward"] == losses["after"], losses  # and is still there after the reshard


def test_in_place_first_order_methods_and_bad_modes_are_refused(quick_cfg):
    """IP-SGD and Addax update inside backward, before the ranks reduce the gradient: one line says what to use."""
    from zobench.optim.addax import Addax
    from zobench.optim.ip_sgd import InPlaceSGD
    from zobench.parallel.first_order import parallelize
    from zobench.parallel.world import World
    from zobench.precision import Precision
    from zobench.spec import ParallelSpec, RunSpec

    fsdp, ddp = ParallelSpec("data", "fsdp", "float32"), ParallelSpec("data", "ddp", "float32")

    for method in (InPlaceSGD, Addax):
        with pytest.raises(ZobenchError, match="under torchrun use optimizer=sgd"):
            parallelize(torch.nn.Linear(2, 2), method, World(0, 2, 0), fsdp, Precision())
    from zobench.optim.head_tuning import HeadTuning

    with pytest.raises(ZobenchError, match="use parallel.fo=fsdp"):
        parallelize(torch.nn.Linear(2, 2), HeadTuning, World(0, 2, 0), ddp, Precision())
    for key, value in (("parallel.fo", "fdsp"), ("parallel.fsdp_param_dtype", "float16")):
        with pytest.raises(ZobenchError, match=f"{key} must be "):
            RunSpec.from_cfg(quick_cfg(f"{key}={value}"))
