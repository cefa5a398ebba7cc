"""Host memory of a checkpoint save and of a best-on-dev save, the old way (every tensor on the host at once)
against the streamed way (zobench/tensor_files.py: one host slice of one tensor at a time).

Each figure is measured in its own process: the host's peak resident memory (VmHWM, reset with clear_refs
just before the save) above what the process held before it. The model: a preset with random weights
(default opt-125m cut to 2 layers: ~210 MB in fp32), trained parameters + Adam's two moments for the
checkpoint (3x the weights), as an FT run saves them.

    python benchmarks/checkpoint_memory.py [--model opt-125m] [--layers 2] [--device cpu|cuda]

On CPU the old path copied little (the tensors are already on the host; safetensors >= 0.6 writes from
their memory) except keep_best=host, which built the new copy beside the old one; on CUDA every tensor
went to the host at once. `--device cuda` measures that; on CPU the line "old on a GPU" is that copy's
size, computed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

CASES = ("checkpoint-old", "checkpoint-new", "host-old", "host-new", "disk-old", "disk-new")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _build(model_name: str, layers: int, device: str):
    """The model (on `device`) and an Adam whose state is filled (one step of zero gradients)."""
    import torch

    from zobench.build import build_model
    from zobench.configs import compose
    from zobench.spec import RunSpec

    spec = RunSpec.from_cfg(compose([f"model={model_name}", "model.init=random", "model.tokenizer=byte",
                                     "task.samples=true", f"device={device}", "dtype=float32",
                                     f"model.arch.num_hidden_layers={layers}"]))
    model, _, _ = build_model(spec)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    adam.step()
    adam.zero_grad(set_to_none=True)
    return model, adam


def measure(case: str, model_name: str, layers: int, device: str) -> dict:
    """One case in this process: {"peak_bytes": above the level before the save, "largest", "total", ...}."""
    import torch
    from safetensors.torch import save_file

    from zobench.best_weights import BestWeights
    from zobench.checkpoint import Checkpointer
    from zobench.models import trained_parameters
    from zobench.run_dir import RunDir

    model, adam = _build(model_name, layers, device)
    params = trained_parameters(model)
    state = [t for s in adam.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    folder = Path(tempfile.mkdtemp(prefix="ckpt-mem-"))
    directory = RunDir(folder / "run").claim()
    best = BestWeights(model, case.split("-")[0], directory) if case.split("-")[0] in ("host", "disk") else None
    if case == "host-new":
        best.save(1)  # the first save makes the copy; the second (measured) refreshes it
    elif case == "host-old":
        kept = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}

    def save():
        if case == "checkpoint-new":
            Checkpointer(directory, model, adam, save_weights=True).save(1, {})
        elif case == "checkpoint-old":  # zobench before streaming: .cpu() of every tensor, then save_file
            save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(folder / "w.safetensors"))
            save_file({f"t{i}": t.detach().cpu().contiguous() for i, t in enumerate(state)},
                      str(folder / "s.safetensors"))
        elif case == "host-old":
            nonlocal kept
            kept = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
        elif case == "disk-old":
            save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(folder / "b.safetensors"))
        else:
            best.save(2)

    if torch.cuda.is_available() and device.startswith("cuda"):
        torch.cuda.synchronize()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _rss_kib("VmRSS")
    save()
    peak = _rss_kib("VmHWM")
    sizes = [p.numel() * p.element_size() for p in params.values()]
    return {"case": case, "peak_bytes": (peak - before) * 1024, "largest": max(sizes), "weights": sum(sizes),
            "state": sum(t.numel() * t.element_size() for t in state)}


def run_case(case: str, model_name: str, layers: int, device: str) -> dict:
    """`measure` in a fresh process (each peak its own)."""
    from common import run_self

    return run_self(__file__, "--case", case, "--model", model_name, "--layers", str(layers), "--device", device,
                    timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # the child process's one case
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.model, args.layers, args.device)))
        return
    results = {case: run_case(case, args.model, args.layers, args.device) for case in CASES}
    first = results["checkpoint-new"]
    mib = 1 << 20
    print(f"{args.model} ({args.layers} layers) on {args.device}: weights {first['weights'] / mib:.1f} MiB, "
          f"Adam state {first['state'] / mib:.1f} MiB, largest tensor {first['largest'] / mib:.1f} MiB")
    print(f"{'host peak of a save (MiB above before)':<42}{'old':>10}{'streamed':>10}{'old/streamed':>14}")
    for what in ("checkpoint", "host", "disk"):
        old, new = results[f"{what}-old"]["peak_bytes"], results[f"{what}-new"]["peak_bytes"]
        label = {"checkpoint": "checkpoint (weights + Adam)", "host": "keep_best=host (a later save)",
                 "disk": "keep_best=disk"}[what]
        print(f"{label:<42}{old / mib:>10.1f}{new / mib:>10.1f}{max(old, mib) / max(new, mib):>14.2f}")
    print("(old/streamed: each figure at least 1 MiB, so a save that holds nothing reads as 1 MiB)")
    if args.device == "cpu":
        print(f"{'old on a GPU (computed: all at once)':<42}{(first['weights'] + first['state']) / mib:>10.1f}")
    ratio = results["checkpoint-new"]["peak_bytes"] / first["largest"]
    print(f"streamed checkpoint peak / largest tensor: {ratio:.2f}")


if __name__ == "__main__":
    main()
