"""What loading each rank's shard only saves (issue 20): peak memory per rank of a 2-rank sharded load, load whole
then shard (what zobench did) against streamed (zobench/parallel/sharded_load.py), as ratios.

    python benchmarks/sharded_load.py                         # opt-125m-shaped, random weights, fp32, CPU (gloo)
    python benchmarks/sharded_load.py --model opt-tiny        # seconds (the test)
    python benchmarks/sharded_load.py --dtype float16         # stored fp32, loaded fp16: a load that casts
    python benchmarks/sharded_load.py --device cuda           # on a machine with 2 GPUs (NCCL): GPU peaks too

The model preset's `arch` is built with random weights (zobench's own init) and saved with save_pretrained to a
temporary folder (safetensors, files of --shard-size). Then, for each way of loading, `torchrun --standalone
--nproc_per_node=2` runs this file's worker: each rank builds and places the model with the runner's own steps
(build.build_model, parallel.ranks.Ranks.place: ZO shard mode, FSDP2) and reports its host memory (VmHWM: the
high-water mark, reset once torch, transformers' model classes and zobench are imported, so the growth is the
load's own;
file pages read through safetensors' mmap count), the RSS after imports, and on CUDA max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("whole", "streamed")


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def words(folder: Path, device: str, dtype: str) -> list[str]:
    """The run whose model is placed: the saved folder, ZO shard mode (the sharded load is the same for FSDP2)."""
    return ["model=opt-tiny", "model.init=pretrained", f"model.path={folder}", "model.tokenizer=byte",
            "task.samples=true", "optimizer=mezo", "parallel.zo=shard", "train.keep_best=host", f"device={device}",
            f"dtype={dtype}", "max_length=256"]


class AnonPeak:
    """The largest RssAnon (the process's own memory, file pages aside) seen while inside, sampled every ms:
    the kernel keeps a high-water mark of the RSS only, which counts the safetensors files' mapped pages."""

    def __enter__(self):
        import threading

        self.peak, self.done = _status("RssAnon"), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, _status("RssAnon"))

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def worker(out: Path, way: str, run_words: list[str]) -> None:
    """One rank: build and place the model `way` (whole, then sharded; or streamed), write what it measured."""
    import torch

    from zobench.build import build_model
    from zobench.configs import compose
    from zobench.parallel import world as worlds
    from zobench.parallel.ranks import Ranks
    from zobench.spec import RunSpec

    spec = RunSpec.from_cfg(compose(run_words))
    world = worlds.from_env()
    worlds.init_process_group(world, spec.device.type)  # NCCL on CUDA: a GPU per rank
    ranks = Ranks(spec, world)
    assert ranks.streams, "the run does not shard θ at load"
    ranks.streams = way == "streamed"
    _import_what_loading_imports(spec)
    torch.distributed.barrier()
    with open("/proc/self/clear_refs", "w") as refs:  # VmHWM back to the RSS: the peak from here on
        refs.write("5")
    rss_before, anon_before = _status("VmRSS"), _status("RssAnon")
    if spec.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with AnonPeak() as anon:
        model, _, _ = build_model(spec, max_length=spec.max_length, empty=ranks.streams)
        ranks.place(model, ranks.input_device(model))
        if spec.device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    found = {"rss_before": rss_before, "hwm": _status("VmHWM"), "seconds": seconds, "local_bytes": local,
             "anon_before": anon_before, "anon_peak": anon.peak,
             "gpu_peak": torch.cuda.max_memory_allocated() if spec.device.type == "cuda" else None,
             "n_params": sum(p.numel() for p in model.parameters())}
    (out / f"{way}-rank{world.rank}.json").write_text(json.dumps(found))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _import_what_loading_imports(spec) -> None:
    """The modules a load imports (transformers' model classes, FSDP2), imported before the peak is reset: an
    empty model built and dropped."""
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from transformers import AutoConfig

    from zobench.models import model_source
    from zobench.parallel.sharded_load import skeleton

    skeleton(AutoConfig.from_pretrained(model_source(dict(spec.model))), spec.dtype)


def save_model(preset: str, folder: Path, shard_size: str, stored: str) -> int:
    """The preset's architecture with zobench's random init, saved in `stored`; returns the bytes saved."""
    import torch

    from zobench.configs import compose
    from zobench.models import load_model
    from zobench.spec import RunSpec

    spec = RunSpec.from_cfg(compose([f"model={preset}", "model.init=random", "model.tokenizer=byte",
                                     "task.samples=true", "device=cpu", "dtype=float32"]))
    model, _ = load_model(dict(spec.model), torch.device("cpu"), torch.float32)
    model.to(getattr(torch, stored)).save_pretrained(folder, max_shard_size=shard_size)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-125m", help="a preset with an arch (built with random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the run's dtype (what the weights are loaded as)")
    parser.add_argument("--stored", default="float32", help="the dtype the checkpoint is saved in")
    parser.add_argument("--shard-size", default="100MB", help="save_pretrained's max_shard_size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zobench-sharded-load-") as scratch:
        folder, out = Path(scratch) / "model", Path(scratch) / "out"
        out.mkdir()
        saved = save_model(args.model, folder, args.shard_size, args.stored)
        run_words = words(folder, args.device, args.dtype)
        for way in WAYS:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       __file__, "--worker", str(out), way, *run_words]
            done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=1200, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"failed ({done.returncode}): {shlex.join(command)}\n{done.stderr[-3000:]}")
        found = {way: [json.loads((out / f"{way}-rank{r}.json").read_text()) for r in range(2)] for way in WAYS}
        files = len(list(folder.glob("*.safetensors")))
    report(found, args, saved, files, run_words)


def report(found: dict, args, saved: int, files: int, run_words: list[str]) -> None:
    n = found["whole"][0]["n_params"]
    print(f"model {args.model} ({n / 1e6:.1f}M params, random init) saved in {args.stored}: {saved:,} bytes in {files} "
          f"safetensors files; loaded as {args.dtype} on {args.device}, 2 ranks, ZO shard mode (FSDP2)")
    MiB = 2**20
    print("MiB per rank; RSS counts the file pages mapped (page cache, shared); anon is the process's own memory")
    print(f"{'way':<9} {'rank':>4} {'RSS imports':>11} {'RSS peak':>8} {'growth':>7} {'anon growth':>11} "
          f"{'local shards':>12} {'GPU peak':>9} {'seconds':>8}")
    for way in WAYS:
        for rank, r in enumerate(found[way]):
            gpu = "-" if r["gpu_peak"] is None else f"{r['gpu_peak'] / MiB:.1f}"
            print(f"{way:<9} {rank:>4} {r['rss_before'] / MiB:11.1f} {r['hwm'] / MiB:8.1f} "
                  f"{(r['hwm'] - r['rss_before']) / MiB:7.1f} {(r['anon_peak'] - r['anon_before']) / MiB:11.1f} "
                  f"{r['local_bytes'] / MiB:12.1f} {gpu:>9} {r['seconds']:8.2f}")
    for rank in range(2):
        whole, streamed = found["whole"][rank], found["streamed"][rank]
        grown = [max(1, r["hwm"] - r["rss_before"]) for r in (streamed, whole)]
        anon = [max(1, r["anon_peak"] - r["anon_before"]) for r in (streamed, whole)]
        line = (f"rank {rank}: streamed / whole: RSS peak {streamed['hwm'] / whole['hwm']:.3f}   "
                f"RSS growth {grown[0] / grown[1]:.3f}   anon growth {anon[0] / anon[1]:.3f}")
        if whole["gpu_peak"]:
            line += f"   GPU peak: {streamed['gpu_peak'] / whole['gpu_peak']:.3f}"
        print(line)
    print("worker command (per way, from the repository root, PYTHONPATH=.): OMP_NUM_THREADS=1 torchrun --standalone "
          "--nproc_per_node=2 benchmarks/sharded_load.py --worker OUT {whole|streamed} " + shlex.join(run_words))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
    else:
        main()
