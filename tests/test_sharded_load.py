"""A pretrained model sharded at load (parallel.zo=shard, parallel.fo=fsdp under torchrun): each rank reads only its
own rows from the safetensors files (zobench/parallel/sharded_load.py) and ends with exactly the shards that
loading the whole model and then sharding it gives: parameters and buffers, bit for bit, on every rank.

The torchrun test runs this file as its worker (`__main__` below) over tiny OPT and LLaMA models built from a config
and saved with save_pretrained (one file, or several with an index; stored fp32 or fp16); each rank writes what it
found to a JSON file the test reads.
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

WORKER_TIMEOUT = 240
OPT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, word_embed_proj_dim=64,
           vocab_size=301, dropout=0.0)  # 301 rows: uneven shards (151 + 150); no dropout: FO runs compare
LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=301, rope_theta=500000.0)
# (folder, dtype of the run, the run's other overrides): ZO shard mode in fp32 and fp16, FO's fp32 master weights
CASES = {
    "opt/zo-fp32": ("opt", ["optimizer=mezo", "parallel.zo=shard", "dtype=float32"]),
    "opt-files/zo-fp16": ("opt-files", ["optimizer=mezo", "parallel.zo=shard", "dtype=float16"]),
    "llama-files/zo-fp32": ("llama-files", ["optimizer=mezo", "parallel.zo=shard", "dtype=float32"]),
    "llama/zo-fp16": ("llama", ["optimizer=mezo", "parallel.zo=shard", "dtype=float16"]),
    "opt-files/fo-master": ("opt-files", ["optimizer=adam", "dtype=float16", "precision.master_weights=true"]),
    "llama-files/fo-master": ("llama-files", ["optimizer=adam", "dtype=float16", "precision.master_weights=true"]),
    "opt-files/fo-master-gather16": ("opt-files", ["optimizer=adam", "dtype=float16", "precision.master_weights=true",
                                                   "parallel.fsdp_param_dtype=weights"]),
    "opt/zo-lora": ("opt", ["optimizer=mezo", "parallel.zo=shard", "dtype=float32", "peft=lora"]),
    "llama-files/fo-lora-fp16": ("llama-files", ["optimizer=adam", "dtype=float16", "peft=lora"]),
}


def save_model(folder: Path, model_type: str, arch: dict, stored: torch.dtype, shard_size: str | None = None) -> Path:
    """A random model of `model_type` saved as a save_pretrained folder (safetensors; several files with
    `shard_size`), with zobench's byte tokenizer named by the run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **arch), dtype=stored)
    model.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_model(root / "opt", "opt", OPT, torch.float32)
    save_model(root / "opt-files", "opt", OPT, torch.float16, "40KB")
    save_model(root / "llama", "llama", LLAMA, torch.float32)
    save_model(root / "llama-files", "llama", LLAMA, torch.float32, "60KB")
    assert len(list((root / "opt-files").glob("*.safetensors"))) > 2
    assert len(list((root / "llama-files").glob("*.safetensors"))) > 2
    return root


def pretrained(folder: Path) -> list[str]:
    """A run of `folder`'s model (keep_best=host: what sharded runs keep)."""
    return ["model.init=pretrained", f"model.path={folder}", "model.tokenizer=byte", "train.keep_best=host"]


@pytest.fixture(scope="module")
def found(models) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(models)], capture_output=True, text=True, timeout=WORKER_TIMEOUT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((models / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_each_rank_reads_exactly_the_shards_of_a_whole_load(found):
    """OPT (tied head, 301-row embedding split 151 + 150) and LLaMA (rotary inv_freq, a non-persistent buffer),
    from one file or several with an index, stored fp32 or fp16, run in fp32, fp16 or the FO 16-bit regime's fp32
    master weights, with and without a LoRA adapter (its init drawn from the run's seed): every rank's local
    shards (values, dtype, placement) and buffers equal load-whole-then-shard's."""
    for rank, cases in enumerate(found):
        assert set(cases) == set(CASES)
        for name, case in cases.items():
            assert case["streamed"] and case["meta_before_fill"], (rank, name)
            assert case["params"] > 10 and case["mismatched"] == [], (rank, name, case["mismatched"])
            assert case["buffer_mismatched"] == [], (rank, name)
    assert found[0]["llama/zo-fp16"]["buffers"] == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    assert found[0]["opt/zo-fp32"]["rows"]["model.decoder.embed_tokens.weight"] == [151, 64]
    assert found[1]["opt/zo-fp32"]["rows"]["model.decoder.embed_tokens.weight"] == [150, 64]
    assert found[0]["opt-files/fo-master"]["dtypes"]["model.decoder.layers.0.fc1.weight"] == "torch.float32"
    assert found[0]["opt-files/zo-fp16"]["dtypes"]["model.decoder.layers.0.fc1.weight"] == "torch.float16"
    lora = "model.decoder.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert found[0]["opt/zo-lora"]["rows"][lora] == [4, 64] and found[1]["opt/zo-lora"]["rows"][lora] == [4, 64]
    assert found[0]["opt/zo-lora"]["adapter_moved_from_zero"]  # lora_A's init, drawn from the seed, not zeros


@pytest.mark.slow
@pytest.mark.parametrize("mode, overrides", [
    ("zo=shard", ["optimizer=mezo", "parallel.zo=shard"]),
    ("fo=fsdp", ["optimizer=adam", "optimizer.lr=1e-4"]),
])
def test_a_run_from_a_model_folder_sharded_at_load_ends_as_one_process(tmp_path, models, mode, overrides):
    """`torchrun -m zobench model.path=FOLDER` with the weights sharded at load (several safetensors files) ends
    where the one-process run of the folder ends (tests/test_distributed_zo.py's comparisons: ZO exactly, FSDP2
    Adam within 1e-5), and rank 0's log says it read only its shards."""
    from conftest import run_cli
    from test_distributed_zo import FEW, assert_same_run, torchrun

    words = [*FEW, *overrides, *pretrained(models / "opt-files"), "dtype=float32"]
    two, one = tmp_path / "two", tmp_path / "one"
    result = torchrun(*words, f"hydra.run.dir={two}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert run_cli(*words, f"hydra.run.dir={one}").returncode == 0
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["parallel"] == mode and metrics["world_size"] == 2
    assert "rank 0 read its shards of the weights" in (two / "zobench.log").read_text()
    if mode == "zo=shard":
        assert_same_run(one, two, tolerance=0.0)
        return
    logged = [[line["loss"] for line in map(json.loads, (f / "log.jsonl").read_text().splitlines())
               if line["event"] == "train"] for f in (one, two)]
    assert len(logged[0]) == len(logged[1]) == 3 and max(abs(a - b) for a, b in zip(*logged)) <= 1e-5
    from safetensors.torch import load_file

    first, second = (load_file(str(f / "model" / "model.safetensors")) for f in (one, two))
    assert first.keys() == second.keys()
    assert max(float((first[k] - second[k]).abs().max()) for k in first) <= 1e-5


@pytest.mark.slow
def test_the_benchmark_prints_each_ranks_peaks_for_both_loads():
    """benchmarks/sharded_load.py on opt-tiny: both loads on 2 ranks, each rank's row and its ratios."""
    import re

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "sharded_load.py"
    done = subprocess.run([sys.executable, str(bench), "--model", "opt-tiny"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("whole ", "streamed "))]
    assert [(r[0], r[1]) for r in rows] == [("whole", "0"), ("whole", "1"), ("streamed", "0"), ("streamed", "1")]
    assert len(re.findall(r"rank \d: streamed / whole: RSS peak [0-9.]+ +RSS growth [0-9.]+ +anon growth [0-9.]+",
                          done.stdout)) == 2, done.stdout


# -- one process: the reading, the names, the refusals ------------------------------------------------------------
def fill_unsharded(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The skeleton of `folder`'s model, filled in one process (no shards: every tensor whole)."""
    from transformers import AutoConfig

    from zobench.parallel.sharded_load import fill, skeleton

    model = skeleton(AutoConfig.from_pretrained(folder), dtype)
    fill(model, folder, dtype, torch.device("cpu"))
    return model


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pairs = list(zip(a.state_dict().items(), b.state_dict().items()))
    assert len(pairs) == len(a.state_dict()) == len(b.state_dict())
    for (name, x), (other, y) in pairs:
        assert name == other and x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("stored, dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_checkpoint_without_the_base_model_prefix_loads_as_from_pretrained(tmp_path, stored, dtype):
    """A checkpoint saved from the bare decoder (facebook/opt-*'s keys: `decoder.…`, no `model.`) and stored in
    another dtype than the run's: the names are mapped and the values cast as from_pretrained maps and casts them;
    OPT's head stays tied to the embeddings."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder = save_model(tmp_path / "opt", "opt", OPT, stored)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    model = fill_unsharded(folder, dtype)
    assert_same_tensors(model, AutoModelForCausalLM.from_pretrained(folder, dtype=dtype))
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight


HUB_PROBE = r"""
import os, sys
from pathlib import Path
root, tests = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, tests)
from fake_hub import FakeHub, llama_model
with FakeHub(root) as hub:
    os.environ.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(root / "hf_home"),
                      HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", HF_HUB_ETAG_TIMEOUT="5")
    os.environ.pop("HF_TOKEN", None)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from zobench.parallel.sharded_load import fill, folder_of, skeleton
    llama_model(root / "models" / "huggyllama" / "llama-7b")
    folder = folder_of("huggyllama/llama-7b")
    model = skeleton(AutoConfig.from_pretrained("huggyllama/llama-7b"), torch.float16)
    fill(model, folder, torch.float16, torch.device("cpu"))
    whole = AutoModelForCausalLM.from_pretrained("huggyllama/llama-7b", dtype=torch.float16)
    ours, theirs = model.state_dict(), whole.state_dict()
    same = [torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(ours.values(), theirs.values())]
    print("files", len(list(folder.glob("*.safetensors"))), "same", len(same), all(same), list(ours) == list(theirs))
"""


@pytest.mark.slow
def test_a_hub_id_reads_the_hubs_sharded_safetensors(tmp_path):
    """A hub id (tests/fake_hub.py's huggyllama/llama-7b: safetensors in several files with an index) is read
    from the hub's cached snapshot, as from_pretrained reads it (fp16 here)."""
    done = subprocess.run([sys.executable, "-c", HUB_PROBE, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    files, count, same, names = done.stdout.split()[1], *done.stdout.split()[3:6]
    assert int(files) > 1 and int(count) > 10 and same == "True" and names == "True", done.stdout


def test_missing_tensor_wrong_shape_and_pickle_only_folders_are_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_model(tmp_path / "llama", "llama", LLAMA, torch.float32)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ZobenchError, match=r"^parameter model\.layers\.1\.mlp\.up_proj\.weight is in no safetensors "
                                           r"file of .*: the checkpoint does not fit model\.path's config$"):
        fill_unsharded(folder)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, 63)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ZobenchError, match=r"^checkpoint tensor model\.layers\.1\.mlp\.up_proj\.weight has shape "
                                           r"\[128, 63\], the model's .* \[128, 64\]"):
        fill_unsharded(folder)
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")  # a FIFO would block a reader: refused as not a regular file
    with pytest.raises(ZobenchError, match=r"model\.safetensors is a FIFO, not a regular file"):
        fill_unsharded(folder)
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ZobenchError, match=r"holds no model\.safetensors nor model\.safetensors\.index\.json: .*"
                                           r"safetensors only \(a \.bin is a pickle\)"):
        fill_unsharded(folder)


def test_what_the_streamed_load_cannot_do_is_refused_before_anything_loads(tmp_path, quick_cfg):
    """Under torchrun (a world of 2, not joined: Ranks refuses before any process group or model): prefix tuning,
    a device map, a folder of .bin weights; random-init models and unsharded modes keep the whole load."""
    from zobench.parallel.ranks import Ranks
    from zobench.parallel.world import World
    from zobench.spec import RunSpec

    folder = save_model(tmp_path / "opt", "opt", OPT, torch.float32)
    two = World(0, 2, 0)
    shard = ["optimizer=mezo", "parallel.zo=shard", *pretrained(folder)]
    assert Ranks(RunSpec.from_cfg(quick_cfg(*shard)), two).streams
    assert Ranks(RunSpec.from_cfg(quick_cfg("optimizer=adam", *pretrained(folder))), two).streams  # fo=fsdp
    assert not Ranks(RunSpec.from_cfg(quick_cfg(*shard)), World()).streams  # one process
    assert not Ranks(RunSpec.from_cfg(quick_cfg("optimizer=mezo", "parallel.zo=shard", "train.keep_best=host")),
                 two).streams  # random init
    assert not Ranks(RunSpec.from_cfg(quick_cfg("optimizer=mezo", *pretrained(folder))), two).streams  # zo=data
    assert Ranks(RunSpec.from_cfg(quick_cfg(*shard, "peft=lora")), two).streams
    with pytest.raises(ZobenchError, match=r"^peft=prefix with the weights sharded at load .* use peft=lora or "):
        Ranks(RunSpec.from_cfg(quick_cfg(*shard, "peft=prefix")), two)
    with pytest.raises(ZobenchError, match=r"^model\.device_map places a whole model"):
        Ranks(RunSpec.from_cfg(quick_cfg(*shard, "model.device_map=auto")), two)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ZobenchError, match=r"holds no model\.safetensors"):
        Ranks(RunSpec.from_cfg(quick_cfg(*shard)), two)


def test_the_memory_plan_of_a_sharded_pretrained_run_loads_one_tensors_rows_at_a_time():
    """`zobench-plan --memory` for OPT-66B in ZO shard mode on 2 GPUs: the host holds one tensor's rows at a time
    as the weights load (OPT-66B's embedding: 50272 x 9216 / 2 ranks in fp16), not the whole model's 132 GB;
    random-init weights are still drawn whole on the host, and one GPU loads them whole."""
    from zobench.memory_plan import parse_size, plan
    from zobench.plan import job_shape

    words = ["experiment=mezo_opt30b", "model=opt-66b", "task=sst2", "parallel.zo=shard", "device=cuda",
             "dtype=float16"]
    models = {}  # each preset's meta-device model, built once
    sharded = plan(job_shape(words, models), parse_size("80GB"), gpus=2)
    assert sharded.host["loading"] == 50272 * 9216 // 2 * 2
    whole = sharded.job.model.params * 2
    assert whole > 130e9
    assert plan(job_shape(words, models), parse_size("80GB"), gpus=1).host["loading"] == whole
    assert plan(job_shape([*words, "model.init=random"], models), parse_size("80GB"), gpus=2).host["loading"] == whole


# -- the worker, under torchrun ----------------------------------------------------------------------------------
def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _placed(words: list[str], world, stream: bool):
    """A model of `words` built and placed by the runner's own steps, its weights streamed or loaded whole."""
    from zobench.build import build_model
    from zobench.configs import compose
    from zobench.parallel.ranks import Ranks
    from zobench.spec import RunSpec

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import QUICK

    spec = RunSpec.from_cfg(compose(QUICK + words))
    ranks = Ranks(spec, world)
    streamed = ranks.streams
    ranks.streams = stream  # False: today's path, load whole then shard, the reference
    model, _, _ = build_model(spec, max_length=spec.max_length, empty=stream)
    meta = all(p.is_meta for n, p in model.named_parameters() if "lora_" not in n)  # an adapter is drawn whole
    ranks.place(model, ranks.input_device(model))
    return model, streamed, meta


def _worker(root: str) -> None:
    from zobench.parallel import world as worlds

    world = worlds.from_env()
    worlds.init_process_group(world, "cpu")
    found = {}
    for case, (folder, overrides) in CASES.items():
        words = [*overrides, *pretrained(Path(root) / folder)]
        whole, _, _ = _placed(words, world, stream=False)
        streamed, streams, meta = _placed(words, world, stream=True)
        reference = dict(whole.named_parameters())
        params = dict(streamed.named_parameters())
        mismatched = [n for n, p in params.items() if n not in reference or not (
            p.dtype == reference[n].dtype and p.placements == reference[n].placements
            and torch.equal(_local(p), _local(reference[n])))]
        buffers, reference_buffers = dict(streamed.named_buffers()), dict(whole.named_buffers())
        found[case] = {
            "streamed": streams, "meta_before_fill": meta, "params": len(params),
            "mismatched": mismatched + sorted(set(reference) - set(params)),
            "buffers": sorted(buffers),
            "buffer_mismatched": [n for n, b in buffers.items() if n not in reference_buffers or not (
                b.dtype == reference_buffers[n].dtype and torch.equal(b, reference_buffers[n]))]
            + sorted(set(reference_buffers) - set(buffers)),
            "rows": {n: list(_local(p).shape) for n, p in params.items()},
            "dtypes": {n: str(p.dtype) for n, p in params.items()},
            "adapter_moved_from_zero": any(bool(_local(p).abs().sum() > 0) for n, p in params.items() if "lora_A" in n),
        }
    Path(root, f"rank{world.rank}.json").write_text(json.dumps(found))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
