"""Checkpoints and best-on-dev weights reach the disk tensor by tensor (zobench/tensor_files.py): the files stay
ordinary safetensors files, and a save holds at most about one tensor in host memory beyond the model."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from zobench.best_weights import BestWeights
from zobench.checkpoint import STATE_TENSORS, WEIGHTS, Checkpointer
from zobench.errors import ZobenchError
from zobench.run_dir import RunDir
from zobench.tensor_files import write_safetensors

MiB = 1 << 20


def test_a_streamed_file_is_an_ordinary_safetensors_file_with_its_size_and_hash(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i64": torch.arange(5), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "transposed": torch.randn(4, 6).t(),
               "u8": torch.arange(9, dtype=torch.uint8)}
    path = tmp_path / "t.safetensors"
    size, digest = write_safetensors(path, tensors, {"step": "3", "run_id": "abc"})
    assert size == path.stat().st_size and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as saved:
        assert saved.metadata() == {"step": "3", "run_id": "abc"}
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # data 8-byte aligned, as safetensors'


def test_a_device_tensor_reaches_the_host_in_slices_that_add_up_to_its_bytes():
    """The path a CUDA tensor takes (no GPU here: the slicing itself, on a host tensor)."""
    from zobench.tensor_files import slices_to_host

    flat = torch.randn(1001).bfloat16()
    pieces = list(slices_to_host(flat, 7))  # 3 elements (6 bytes) a slice
    assert max(p.numel() for p in pieces) == 6 and len(pieces) == 334
    assert torch.equal(torch.cat(pieces).view(torch.bfloat16), flat)


def test_state_saved_from_a_gpu_comes_back_on_the_host_where_there_is_none():
    from zobench.checkpoint import from_plain

    tensors = {"t0": torch.ones(3)}
    loaded = from_plain({"m": {"$tensor": "t0", "device": "cuda:0"}, "r": {"$tensor": "t0"}}, tensors)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loaded["m"].device.type == expected and loaded["r"].device.type == "cpu"


def test_a_streamed_file_is_never_written_through_a_link(tmp_path):
    target = tmp_path / "users_file"
    target.write_text("keep me")
    (tmp_path / "link.safetensors").symlink_to(target)
    with pytest.raises(ZobenchError, match="symbolic link"):
        write_safetensors(tmp_path / "link.safetensors", {"x": torch.ones(2)})
    assert target.read_text() == "keep me"


def _model_and_adam(layers: int = 6, width: int = 2048):
    """~16 MiB per weight tensor, Adam's two moments beside each: a checkpoint 18x the largest tensor."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    for param in model.parameters():
        param.grad = torch.full_like(param, 1e-3)
    adam.step()
    adam.zero_grad(set_to_none=True)
    return model, adam


def test_a_checkpoint_loads_with_safetensors_and_matches_its_manifest(tmp_path):
    model, adam = _model_and_adam(layers=2, width=64)
    directory = RunDir(tmp_path / "run").claim()
    Checkpointer(directory, model, adam, save_weights=True).save(1, {"note": "job"})
    folder = tmp_path / "run" / "checkpoint"
    manifest = json.loads((folder / "state.json").read_text())
    for name in (WEIGHTS, STATE_TENSORS):
        data = (folder / name).read_bytes()
        assert manifest["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    weights = load_file(str(folder / WEIGHTS))
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
    state = load_file(str(folder / STATE_TENSORS))
    moments = [t for s in adam.state.values() for k, t in s.items() if k != "step"]
    assert sum(any(torch.equal(m, t) for t in state.values()) for m in moments) == len(moments)


def _host_peak(save) -> int:
    """Bytes of host memory the process gained at its peak during `save()` (Linux: VmHWM reset first)."""
    def kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = kib("VmRSS")
    save()
    return (kib("VmHWM") - before) * 1024


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="Linux's VmHWM reset")
def test_a_save_holds_about_one_tensor_in_host_memory_not_the_model(tmp_path):
    """Checkpoint (weights + Adam: 288 MiB), keep_best=disk and a later keep_best=host save each stay under
    1.5x the largest tensor (16 MiB) + 8 MiB; the old keep_best=host built a second whole copy (96 MiB)."""
    model, adam = _model_and_adam()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    bound = 1.5 * largest + 8 * MiB
    directory = RunDir(tmp_path / "run").claim()
    checkpoint = _host_peak(lambda: Checkpointer(directory, model, adam, save_weights=True).save(1, {}))
    disk = BestWeights(model, "disk", directory)
    on_disk = _host_peak(lambda: disk.save(1))
    host = BestWeights(model, "host", directory)
    host.save(1)  # the copy itself: the one copy keep_best=host is for
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    again = _host_peak(lambda: host.save(2))
    assert {"checkpoint": checkpoint, "disk": on_disk, "host, later save": again} == {
        "checkpoint": min(checkpoint, bound), "disk": min(on_disk, bound), "host, later save": min(again, bound)}
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    host.restore()  # the refreshed copy (step 2's weights) is the one restored
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), saved))
