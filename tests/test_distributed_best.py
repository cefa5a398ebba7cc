"""The best-on-dev weights and save_model over FSDP2 shards (torchrun, 2 ranks, gloo on CPU): keep_best=disk
keeps a file per rank, and the test evaluation and the saved model are the one-process run's; save_model with
a LoRA adapter writes the one-process adapter; a changed shard file is refused in one line on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed_zo import both_ways, run_files, torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

# 4 steps with a dev evaluation after each; the dev loss is lowest at step 1 (FSDP2 Adam at lr 1e-3) or 2
# (MeZO at lr 3e-2, below), so the test must run on weights restored from the kept shards
RUN = ["model=opt-tiny", "task.samples=true", "data.n_train=16", "data.n_dev=8", "data.n_test=12", "max_length=256",
       "train.batch_size=4", "train.log_interval=1", "eval.batch_size=8", "train.steps=4", "train.eval_interval=1",
       "save_model=true"]
ADAM = ["optimizer=adam", "optimizer.lr=1e-3"]
MEZO = ["optimizer=mezo", "optimizer.lr=3e-2", "parallel.zo=shard"]
WORKER = Path(__file__).with_name("distributed_best_worker.py")


def both(tmp_path: Path, *words: str) -> tuple[Path, Path]:
    """The run in one process (zobench.run.run, as the CLI's job) and over 2 ranks (`torchrun -m zobench`)."""
    return both_ways(tmp_path, *RUN, *words)


def figures_of_test(folder: Path) -> tuple[dict, dict]:
    """(metrics.json, the test evaluation's log line)."""
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return json.loads((folder / "metrics.json").read_text()), next(line for line in lines if line.get("split") == "test")


def assert_tested_alike(one: Path, two: Path, tolerance: float, saved: str = "model.safetensors") -> None:
    """The same best step (not the last), test figures and saved weights within `tolerance`."""
    (metrics_one, test_one), (metrics_two, test_two) = figures_of_test(one), figures_of_test(two)
    assert metrics_two["status"] == "completed" and metrics_two["world_size"] == 2
    assert metrics_one["best_step"] == metrics_two["best_step"] < metrics_two["steps"] == 4
    assert test_one["metric"] == test_two["metric"] and abs(test_one["loss"] - test_two["loss"]) <= tolerance
    assert abs(metrics_one["dev_loss"] - metrics_two["dev_loss"]) <= tolerance
    first, second = (load_file(str(f / "model" / saved)) for f in (one, two))
    assert first.keys() == second.keys()
    assert max(float((first[k] - second[k]).abs().max()) for k in first) <= tolerance


def test_fsdp_adam_tests_the_best_on_dev_shards_as_one_process(tmp_path):
    """FSDP2 Adam with keep_best=disk (the default): each rank's shard of the best is a file of its own, the
    checkpoint records both, and the test evaluation and save_model's folder equal one process's within 1e-5
    (measured 8.3e-7 on the weights); the kept files are gone once the run completes."""
    one, two = both(tmp_path, *ADAM, "train.keep_best=disk")
    assert_tested_alike(one, two, 1e-5)
    state = json.loads((two / "checkpoint" / "state.json").read_text())["state"]
    assert sorted(state["job"]["best_weights"]["files"]) == ["best_weights.rank0.safetensors",
                                                            "best_weights.rank1.safetensors"]
    assert not [name for name in run_files(two) if "best_weights" in name]
    # rank 0 streamed the gathered weights into the folder one process writes, which transformers loads
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    assert sorted(os.listdir(two / "model")) == sorted(os.listdir(one / "model"))
    with safe_open(str(two / "model" / "model.safetensors"), "pt") as saved:
        assert saved.metadata() == {"format": "pt"}
    loaded = AutoModelForCausalLM.from_pretrained(two / "model").state_dict()
    tested_weights = load_file(str(two / "model" / "model.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tested_weights.items())


@pytest.mark.slow
@pytest.mark.parametrize("words, tolerance", [
    (MEZO + ["train.keep_best=disk"], 0.0),  # ZO shard: z and the steps are one process's bit for bit
    (MEZO + ["train.keep_best=host"], 0.0),  # each rank keeps its own shards in host memory
    (ADAM + ["train.keep_best=host"], 1e-5),
])
def test_sharded_runs_test_the_best_on_dev_weights_as_one_process(tmp_path, words, tolerance):
    assert_tested_alike(*both(tmp_path, *words), tolerance)


def _adapter_config(run: Path) -> dict:
    """The run's saved adapter_config.json; its target_modules as a set, as peft holds them (a set written as a
    list, in the order of the writing process's string hashes, which differ between processes)."""
    config = json.loads((run / "model" / "adapter_config.json").read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = set(config["target_modules"])
    return config


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["lora", "prefix"])
def test_save_model_with_an_adapter_under_fsdp2_writes_the_one_process_adapter(tmp_path, peft):
    """FSDP2 Adam with an adapter, the best on dev kept on disk: rank 0 writes the adapter folder a one-process
    run writes (adapter_config.json, adapter_model.safetensors with the same tensors: LoRA's measured equal bit
    for bit, the prefix's within 1.5e-8), loadable by peft in one process as that one is."""
    one, two = both(tmp_path, *ADAM, f"peft={peft}", "train.keep_best=disk")
    assert_tested_alike(one, two, 1e-5, saved="adapter_model.safetensors")
    assert sorted(os.listdir(two / "model")) == sorted(os.listdir(one / "model"))
    assert _adapter_config(two) == _adapter_config(one)
    adapter = load_file(str(two / "model" / "adapter_model.safetensors"))
    if peft == "prefix":
        assert list(adapter) == ["prompt_embeddings"]
        return
    assert adapter and all("lora_" in k for k in adapter)  # the adapter alone, not the base model
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # trained (B starts at 0)


@pytest.mark.slow
def test_best_shards_come_back_bit_for_bit_after_a_resume_and_an_edited_one_is_refused(tmp_path):
    """tests/distributed_best_worker.py on 2 ranks: the kept shards come back bit for bit, also through a resumed
    run's copy of rank 0's folder; after a byte of rank 1's file changes, the resume and the test's restore are
    each refused on every rank in one line naming the file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent), str(WORKER.parent)])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER), str(tmp_path)], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / f"result.rank{r}.json").read_text()) for r in (0, 1)]
    files = results[0]["files"]  # rank 0 wrote both ranks' files, each this run's, of the step saved
    assert sorted(files) == ["best_weights.rank0.safetensors", "best_weights.rank1.safetensors"]
    assert all(meta["step"] == "1" and meta["run_id"] for meta in files.values())
    edited = str(tmp_path / "run" / "best_weights.rank1.safetensors")
    for result in results:
        assert result["live"] and result["left"] == [] and result["adopted"] and result["resumed"]
        for refused in (result["resume_refused"], result["restore_refused"]):
            assert refused and edited in refused and "SHA-256" in refused and "\n" not in refused


@pytest.mark.slow
@pytest.mark.parametrize("method, best", [
    (ADAM, 1),  # weights checkpoints: the resume adopts the recorded files
    (["optimizer=mezo", "optimizer.lr=5e-2", "parallel.zo=shard"], 3),  # trajectory: the replay saves them anew
])
def test_a_resumed_sharded_run_tests_the_best_shards_saved_before_the_stop(tmp_path, method, best):
    """keep_best=disk, FSDP2 Adam and ZO shard: rank 1 is SIGKILLed after the best (the dev loss never comes
    back under it: measured over 30 steps in one process) and a checkpoint that records it were saved;
    `resume=` under torchrun tests that best: the test figures and the saved model are the uninterrupted run's,
    bit for bit."""
    from test_distributed_zo import signal_rank_when

    words = [*RUN, *method, "train.steps=30", "checkpoint.every=1", "train.keep_best=disk"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    job = torchrun(*words, f"hydra.run.dir={killed}", wait=False)
    signal_rank_when(job, lambda: recorded_step(killed) >= best + 2)
    stopped = json.loads((killed / "metrics.json").read_text())
    assert stopped["status"] in ("failed", "interrupted") and stopped["steps"] < 30
    assert sorted(p.name for p in killed.glob("best_weights*")) == ["best_weights.rank0.safetensors",
                                                                    "best_weights.rank1.safetensors"]
    resumed = torchrun(f"resume={killed}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "did not survive" not in resumed.stdout + resumed.stderr
    assert torchrun(*words, f"hydra.run.dir={whole}").returncode == 0
    (metrics_killed, test_killed), (metrics_whole, test_whole) = figures_of_test(killed), figures_of_test(whole)
    assert metrics_killed["status"] == "completed" and metrics_killed["best_step"] == metrics_whole["best_step"] == best
    assert test_killed["loss"] == test_whole["loss"]
    first, second = (load_file(str(f / "model" / "model.safetensors")) for f in (killed, whole))
    assert all(torch.equal(first[k], second[k]) for k in first)


def recorded_step(folder: Path) -> int:
    """The step of the run's checkpoint, once it records the best-on-dev files (0 before, or mid-swap)."""
    try:
        state = json.loads((folder / "checkpoint" / "state.json").read_text())["state"]
        return state["step"] if (state["job"].get("best_weights") or {}).get("files") else 0
    except (OSError, ValueError, KeyError):
        return 0
