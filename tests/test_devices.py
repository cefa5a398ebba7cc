"""CUDA and multi-device paths (issue #21), simulated on CPU: a model split over devices, peak memory on
every GPU, device maps with headroom, a random init that does not depend on the map, and z's generator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zobench.encoding import SequenceBatch
from zobench.objective import Objective


# -- a model split over devices: the head on another device than the body's output ------------------------
class _Out:
    def __init__(self, hidden):
        self.last_hidden_state = hidden


class _Body(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(16, hidden)

    def forward(self, input_ids, attention_mask):
        return _Out(self.embed(input_ids))


class _HeadOnAnotherDevice(nn.Module):
    """An LM head whose weight lives on another device ("meta" stands for the last GPU): it refuses states
    that were not moved to it, and hands back logits as a real head on that device would."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden, device="meta"))
        self.seen = []

    def forward(self, states):
        assert states.device == self.weight.device, f"states on {states.device}, head on {self.weight.device}"
        self.seen.append(states.shape)
        return torch.zeros(states.shape[0], self.weight.shape[0])


class _SplitModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _Body(8)
        self.lm_head = _HeadOnAnotherDevice(8, 16)

    @property
    def base_model(self):
        return self.model

    def get_output_embeddings(self):
        return self.lm_head


def _batch() -> SequenceBatch:
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]])
    options = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    return SequenceBatch(ids, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), options, torch.tensor([0, 0]),
                         torch.tensor([0, 1]), torch.tensor([0]), classification=True)


def test_option_rows_go_to_the_heads_device_of_a_split_model():
    model = _SplitModel()
    objective = Objective(model)
    loss = objective(_batch())
    assert model.lm_head.seen == [torch.Size([3, 8])]  # the 3 option rows alone, moved to the head's device
    assert loss.device.type == "cpu" and torch.isclose(loss, torch.log(torch.tensor(2.0)))  # uniform logits


# -- peak memory on every GPU ---------------------------------------------------------------------------
GiB = 1 << 30


def test_peak_memory_is_reset_and_read_on_every_gpu(monkeypatch):
    from zobench import run_record

    allocated, reserved, resets = {0: 3 * GiB, 1: 5 * GiB}, {0: 4 * GiB, 1: 7 * GiB}, []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda gpu: resets.append(gpu.index))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda gpu: allocated[gpu.index])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda gpu: reserved[gpu.index])
    first = torch.device("cuda", 0)  # the run's device: where its batches go (the first shard)

    run_record.reset_peak_memory(first)
    figures = run_record.final_figures({"train_wall_clock_s": 1.0, "forward_passes": 2, "tokens": 10}, 2.0, first)

    assert resets == [0, 1]
    assert figures["peak_memory_bytes"] == 8 * GiB and figures["peak_memory_method"] == "cuda_max_allocated"
    assert figures["peak_memory_allocated_max_bytes"] == 5 * GiB
    assert figures["peak_memory_allocated_sum_bytes"] == 8 * GiB
    assert figures["peak_memory_reserved_max_bytes"] == 7 * GiB
    assert figures["peak_memory_reserved_sum_bytes"] == 11 * GiB
    assert figures["peak_memory_devices"] == {"cuda:0": {"allocated": 3 * GiB, "reserved": 4 * GiB},
                                              "cuda:1": {"allocated": 5 * GiB, "reserved": 7 * GiB}}


def test_cpu_runs_have_no_gpu_figures():
    from zobench import run_record

    figures = run_record.final_figures({"train_wall_clock_s": 1.0, "forward_passes": 2, "tokens": 10}, 2.0,
                                       torch.device("cpu"))
    assert figures["peak_memory_method"] == "process_vmhwm" and figures["peak_memory_bytes"] > 0
    assert all(figures[key] is None for key in run_record.GPU_PEAK_KEYS)


# -- device maps: headroom on every GPU, no spill to the host ----------------------------------------------
def _meta_opt_125m():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("opt", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  ffn_dim=3072, word_embed_proj_dim=768, vocab_size=50272)
    with torch.device("meta"):  # sizes without weights: 0.23 GiB in fp16
        return AutoModelForCausalLM.from_config(config, dtype=torch.float16)


def test_auto_device_map_keeps_the_headroom_free_on_each_gpu():
    from zobench.models import auto_device_map

    model, two_gpus = _meta_opt_125m(), {0: GiB, 1: GiB}
    assert set(auto_device_map(model, torch.float16, two_gpus, 0).values()) == {0}  # fits on GPU 0 alone
    spread = auto_device_map(model, torch.float16, two_gpus, 0.8)  # 0.2 GiB a card left for the weights
    assert set(spread.values()) == {0, 1}


def test_auto_device_map_refuses_a_spill_to_the_host_in_one_line():
    from zobench.errors import ZobenchError
    from zobench.models import auto_device_map

    with pytest.raises(ZobenchError, match=r"do not fit on 2 GPU\(s\) with model.headroom_gib=0.9") as refused:
        auto_device_map(_meta_opt_125m(), torch.float16, {0: GiB, 1: GiB}, 0.9)
    assert "\n" not in str(refused.value) and "offloaded to the host" in str(refused.value)
    with pytest.raises(ZobenchError, match="none is visible"):
        auto_device_map(_meta_opt_125m(), torch.float16, {}, 5)
    with pytest.raises(ZobenchError, match="leaves nothing"):
        auto_device_map(_meta_opt_125m(), torch.float16, {0: GiB}, 5)


@pytest.mark.parametrize("places", [{"model": 0, "lm_head": "disk"}, {"model": 0, "lm_head": "cpu"}])
def test_an_explicit_map_that_offloads_is_refused(places):
    from zobench.errors import ZobenchError
    from zobench.models import check_device_map

    with pytest.raises(ZobenchError, match="offloading to the host or disk is not supported"):
        check_device_map(places)
    assert check_device_map({"model": "cpu", "lm_head": "cpu"}) == {"model": "cpu", "lm_head": "cpu"}


def test_device_map_auto_without_a_gpu_is_one_line(tmp_path):
    from conftest import QUICK, run_cli

    done = run_cli(*QUICK, "train.steps=1", "model.device_map=auto", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "model.device_map=auto" in done.stderr, done.stderr


def test_headroom_is_checked_with_the_config():
    from zobench.configs import compose
    from zobench.errors import ZobenchError
    from zobench.spec import RunSpec

    with pytest.raises(ZobenchError, match="model.headroom_gib must be a number of GiB >= 0"):
        RunSpec.from_cfg(compose(["model.headroom_gib=-1"]))


# -- a random init does not depend on the device or the device map -----------------------------------------
def _opt_tiny_spec():
    from omegaconf import OmegaConf

    from zobench.configs import compose

    return OmegaConf.to_container(compose(["model=opt-tiny"]).model, resolve=True)


def test_random_init_is_the_same_with_and_without_a_device_map():
    from zobench.models import load_model

    spec = _opt_tiny_spec()
    whole, _ = load_model(spec, torch.device("cpu"), torch.float32)
    for device_map in ({"": "cpu"}, {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",
                                     "model.decoder.layers": "cpu", "model.decoder.final_layer_norm": "cpu",
                                     "lm_head": "cpu"}):
        mapped, _ = load_model({**spec, "device_map": device_map}, torch.device("cpu"), torch.float32)
        for (name, a), (_, b) in zip(whole.state_dict().items(), mapped.state_dict().items()):
            assert torch.equal(a, b), name


def test_random_init_is_drawn_on_the_host_whatever_the_run_device(monkeypatch):
    """A GPU run without a device map built its weights with the GPU's generator, a device-mapped one with
    the host's: other weights for the same preset. "meta" stands for the GPU here."""
    from transformers import AutoModelForCausalLM

    from zobench.models import load_model

    built_on, original = [], AutoModelForCausalLM.from_config

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        built_on.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", spy)
    load_model(_opt_tiny_spec(), torch.device("meta"), torch.float32)
    assert built_on == ["cpu"]


# -- z's generator: recorded in the trajectory, checked on resume and replay, portable on request --------------
H100 = "cuda (NVIDIA H100 80GB HBM3, 132 SMs)"
SHORT_RUN = ["train.steps=3", "train.eval_interval=0", "train.keep_best=none", "checkpoint.every=1"]


def _engines(layer):
    from zobench.optim.engine import PerturbationEngine
    from zobench.precision import Precision

    return (PerturbationEngine(layer.named_parameters(), 0),
            PerturbationEngine(layer.named_parameters(), 0, precision=Precision(zo_generator="portable")))


def test_portable_z_is_the_hosts_z_whatever_the_devices_blocks(monkeypatch):
    """CUDA draws z in 16x larger blocks with its own generator; the portable z is drawn in the host's blocks
    on the host, so a device with other blocks gets the same numbers. Simulated: larger blocks on CPU."""
    import zobench.optim.engine as engine_module

    monkeypatch.setattr(engine_module, "BLOCK", 1000)
    layer = nn.Linear(50, 90)  # a 4500-element weight: 5 host blocks, the last one short
    device, portable = _engines(layer)
    portable.threads = 3  # a device block's host blocks drawn on several threads
    weight = layer.weight
    host = device.direction(3, 0, weight)
    assert torch.equal(portable.direction(3, 0, weight), host)  # on the host: the device's z, through the copy

    monkeypatch.setattr(engine_module, "block_size", lambda _device: 4000)  # a device with 4x larger blocks
    assert torch.equal(portable.direction(3, 0, weight), host)
    assert not torch.equal(device.direction(3, 0, weight), host)  # the device's generator: other z
    before = weight.detach().clone()
    portable.perturb(3, 0.5)  # the in-place path draws the same z
    assert torch.allclose(weight.detach(), before + 0.5 * host)


def test_the_trajectory_records_where_z_was_drawn_and_replay_elsewhere_is_refused(quick_cfg, tmp_path, monkeypatch,
                                                                                  capsys):
    import json

    import zobench.optim.engine as engine_module
    from zobench.replay import main as replay_main
    from zobench.run import run

    here = run(quick_cfg(*SHORT_RUN), tmp_path / "cpu")
    assert json.loads((tmp_path / "cpu" / "trajectory.jsonl").read_text().splitlines()[0])["z"] == "cpu, float32"
    with monkeypatch.context() as gpu:  # a run on an H100, as its trajectory tells
        gpu.setattr(engine_module, "device_generator", lambda device: H100)
        on_gpu = run(quick_cfg(*SHORT_RUN), tmp_path / "gpu")
    assert here["status"] == on_gpu["status"] == "completed"
    assert json.loads((tmp_path / "gpu" / "trajectory.jsonl").read_text().splitlines()[0])["z"] == f"{H100}, float32"

    assert replay_main([str(tmp_path / "gpu"), "--out", str(tmp_path / "rebuilt")]) == 2
    # the command's own error line, progress lines aside (and, in a long test session, other tests' log handlers)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zobench-replay:")]
    assert len(errors) == 1 and errors[0].startswith("zobench-replay: error")
    line = errors[0]
    assert f"drew z with {H100}, float32, this machine draws it with cpu, float32" in line
    assert "precision.zo_generator=portable" in line and not (tmp_path / "rebuilt").exists()
    assert replay_main([str(tmp_path / "cpu"), "--out", str(tmp_path / "rebuilt")]) == 0  # where it ran: fine


def test_a_resume_on_another_device_is_refused_with_exit_2(quick_cfg, tmp_path, monkeypatch):
    from conftest import QUICK, fail_once_at, run_cli

    import zobench.optim.engine as engine_module
    from zobench.run import run

    run_dir = tmp_path / "run"
    with monkeypatch.context() as gpu:
        gpu.setattr(engine_module, "device_generator", lambda device: H100)
        fail_once_at(gpu, 2)  # the run dies after its checkpoint of step 2
        with pytest.raises(Exception):
            run(quick_cfg(*SHORT_RUN), run_dir, overrides=[*QUICK, *SHORT_RUN])  # as the CLI records them
    done = run_cli(f"resume={run_dir}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and f"drew z with {H100}" in done.stderr


def test_portable_runs_replay_anywhere_and_record_it(quick_cfg, tmp_path):
    import json

    from zobench.replay import replay_run
    from zobench.run import run

    metrics = run(quick_cfg(*SHORT_RUN, "precision.zo_generator=portable"), tmp_path / "run")
    assert metrics["precision"]["zo_generator"] == "portable"
    first = json.loads((tmp_path / "run" / "trajectory.jsonl").read_text().splitlines()[0])
    assert first["z"] == "portable, float32"
    assert replay_run(tmp_path / "run", out=tmp_path / "rebuilt").exists()


def test_a_bad_generator_is_refused_with_the_config():
    from zobench.configs import compose
    from zobench.errors import ZobenchError
    from zobench.spec import RunSpec

    with pytest.raises(ZobenchError, match="precision.zo_generator must be one of device, portable"):
        RunSpec.from_cfg(compose(["precision.zo_generator=philox"]))


def test_the_generator_benchmark_prints_its_ratio():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "zo_generator.py"
    done = subprocess.run([sys.executable, str(script), "--model", "opt-tiny", "--repeats", "1"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(re.search(r"portable / device pass \(opt-tiny, cpu, float32\)\s+([0-9.]+)", done.stdout)[1]) > 0


# -- on a real GPU (pytest -m gpu; benchmarks/gpu_check.sh runs them) ---------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_portable_z_on_cuda_is_the_hosts_bit_for_bit(dtype):
    from zobench.optim.engine import PerturbationEngine
    from zobench.precision import Precision

    layer = nn.Linear(3000, 1500).to(dtype)  # a 4.5M-element weight: 5 host blocks (the last short), 1 CUDA block
    host = PerturbationEngine(layer.named_parameters(), 0).direction(3, 0, layer.weight)
    layer.cuda()
    portable = PerturbationEngine(layer.named_parameters(), 0, precision=Precision(zo_generator="portable"))
    device = PerturbationEngine(layer.named_parameters(), 0)
    assert torch.equal(portable.direction(3, 0, layer.weight).cpu(), host)
    assert not torch.equal(device.direction(3, 0, layer.weight).cpu(), host)
    assert device.z_source().startswith("cuda (") and " SMs), " in device.z_source()


@pytest.mark.gpu
@needs_cuda
def test_peak_memory_of_a_real_gpu_is_read_allocated_and_reserved():
    from zobench.run_record import gpu_peaks, reset_peak_memory

    gpu = torch.device("cuda", 0)
    reset_peak_memory(gpu)
    block = torch.empty(256 << 20, dtype=torch.uint8, device=gpu)
    peaks = gpu_peaks(gpu)["peak_memory_devices"]["cuda:0"]
    assert peaks["reserved"] >= peaks["allocated"] >= block.numel()


def test_a_portable_16_bit_run_replays_on_the_host_in_the_runs_dtype(quick_cfg, tmp_path, monkeypatch):
    """dtype=auto is float16 on CUDA and float32 on CPU: a replay builds the weights in the dtype the run
    resolved (metrics.json's), so a portable GPU run replays on a laptop. The GPU's auto: patched here."""
    import json

    import zobench.models as models
    from zobench.replay import replay_run
    from zobench.run import run

    resolve = models.resolve_dtype

    def as_on_cuda(name, device):
        return torch.float16 if name == "auto" else resolve(name, device)

    with monkeypatch.context() as gpu:
        gpu.setattr(models, "resolve_dtype", as_on_cuda)  # where the run spec resolves dtype=auto
        metrics = run(quick_cfg(*SHORT_RUN, "precision.zo_generator=portable"), tmp_path / "run")
    assert metrics["dtype"] == "float16"
    first = json.loads((tmp_path / "run" / "trajectory.jsonl").read_text().splitlines()[0])
    assert first["z"] == "portable, float16"
    assert replay_run(tmp_path / "run", out=tmp_path / "rebuilt").exists()
