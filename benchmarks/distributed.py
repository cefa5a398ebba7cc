"""One job over 1 and 2 ranks (torchrun, gloo on CPU, NCCL on CUDA): step time, bytes sent per rank per step and
peak memory per rank, for ZO data / directions / shard (MeZO) and first-order Adam on FSDP2 and DDP (issue 20).

    python benchmarks/distributed.py                                   # opt-tiny, random init, CPU
    python benchmarks/distributed.py --rows zo-data,ddp-adam --steps 5
    python benchmarks/distributed.py --model opt-125m --device cuda    # on a 2-GPU machine

Each row runs `zobench` twice as a user types it: in one process, then under
`torchrun --standalone --nproc_per_node=2`, each rank with OMP_NUM_THREADS=1. The 2-rank run goes through
benchmarks/_count_collectives.py, which counts the bytes of the tensors each rank passes to torch.distributed's
collectives during the training steps (FSDP2's all-gathers and reduce-scatters, DDP's gradient all-reduce,
zobench's own scalar exchange alike); for ZO data/directions zobench's own count (metrics.json's
bytes_sent_per_step_per_rank) is printed beside it. Step time is metrics.json's train_wall_clock_s / steps;
peak memory is metrics.json's (VmHWM on CPU, the GPU's allocator peak on CUDA), the 2-rank figure the largest
rank's. On CUDA (`--device cuda`, two GPUs or more) the 1-rank run takes GPU 0 and the 2-rank run GPUs 0 and 1
(zobench sets each rank's device to cuda:LOCAL_RANK, NCCL between them).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COUNTER = Path(__file__).with_name("_count_collectives.py")

# row -> the zobench overrides that pick its method and mode (sharded modes keep the best weights in host memory)
ROWS = {
    "zo-data": ["optimizer=mezo", "parallel.zo=data"],
    "zo-directions": ["optimizer=mezo", "optimizer.q=2", "parallel.zo=directions"],
    "zo-shard": ["optimizer=mezo", "parallel.zo=shard", "train.keep_best=host"],
    "fsdp-adam": ["optimizer=adam", "parallel.fo=fsdp", "train.keep_best=host"],
    "ddp-adam": ["optimizer=adam", "parallel.fo=ddp"],
}


def common_words(args) -> list[str]:
    """The run every row shares: the preset with random weights and the byte tokenizer, bundled samples, a few
    steps, one dev evaluation at the end (outside the training clock)."""
    return [f"model={args.model}", "model.init=random", "model.tokenizer=byte", "task.samples=true",
            f"device={args.device}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
            "train.eval_interval=0", f"data.n_train={max(16, args.batch_size)}", "data.n_dev=8", "data.n_test=8",
            "max_length=256"]


def environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": path}


def launch(command: list[str]) -> None:
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(command)}\n{done.stderr[-3000:]}")


def one_rank(words: list[str]) -> list[str]:
    return [sys.executable, "-m", "zobench", *words]


def two_ranks(counts: Path, words: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(COUNTER),
            str(counts), *words]


def measure(row: str, args, scratch: Path) -> dict:
    words = common_words(args) + ROWS[row]
    one_dir, two_dir, counts = scratch / row / "one", scratch / row / "two", scratch / row / "counts"
    counts.mkdir(parents=True)
    launch(one_rank([*words, f"hydra.run.dir={one_dir}"]))
    launch(two_ranks(counts, [*words, f"hydra.run.dir={two_dir}"]))
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (one_dir, two_dir))
    assert two["world_size"] == 2, two["parallel"]
    ranks = [json.loads((counts / f"rank{r}.json").read_text()) for r in range(2)]
    return {
        "parallel": two["parallel"],
        "step_s": [m["train_wall_clock_s"] / m["steps"] for m in (one, two)],
        "sent": max(r["bytes_in_steps"] / r["steps"] for r in ranks),
        "calls": ranks[0]["calls"],
        "zobench_sent": max(two["bytes_sent_per_step_per_rank"] or [None]),  # None: FSDP2's/DDP's, uncounted
        "peak": [one["peak_memory_bytes"], two["peak_memory_bytes_max"]],
        "param_bytes": one["n_params"] * torch.empty((), dtype=getattr(torch, one["dtype"])).element_size(),
        "n_params": one["n_params"], "dtype": one["dtype"],
        "commands": [shlex.join(["OMP_NUM_THREADS=1", "zobench", *words]),
                     shlex.join(["OMP_NUM_THREADS=1", "torchrun", "--standalone", "--nproc_per_node=2",
                                 "benchmarks/_count_collectives.py", "counts", *words])],
    }


def report(results: dict[str, dict], args) -> None:
    first = next(iter(results.values()))
    params = first["param_bytes"]
    where = args.device if args.device == "cpu" else f"{torch.cuda.get_device_name(0)} (1 rank: GPU 0; 2: GPUs 0, 1)"
    print(f"model {args.model} (random init, {first['n_params'] / 1e6:.2f}M params = {params:,} bytes in "
          f"{first['dtype']}) on {where}; {args.batch_size} examples per step (global), {args.steps} steps; "
          f"OMP_NUM_THREADS=1 per rank")
    print(f"{'row':<14} {'parallel':<14} {'step s 1 rank':>13} {'2 ranks':>9} {'2/1':>6} "
          f"{'sent/rank/step B':>17} {'/ param bytes':>13} {'zobench count':>13} {'peak MiB 1':>10} {'2 (max)':>8}")
    for row, r in results.items():
        counted = "-" if r["zobench_sent"] is None else f"{r['zobench_sent']:.0f}"
        print(f"{row:<14} {r['parallel']:<14} {r['step_s'][0]:13.4f} {r['step_s'][1]:9.4f} "
              f"{r['step_s'][1] / r['step_s'][0]:6.2f} {r['sent']:17,.0f} {r['sent'] / params:13.6f} "
              f"{counted:>13} {r['peak'][0] / 2**20:10.1f} {r['peak'][1] / 2**20:8.1f}")
    print("collectives per rank in the steps (calls over the run):")
    for row, r in results.items():
        print(f"  {row:<14} " + ", ".join(f"{name} x{n}" for name, n in sorted(r["calls"].items())))
    if "zo-data" in results and "ddp-adam" in results:
        data, ddp = results["zo-data"]["sent"], results["ddp-adam"]["sent"]
        print(f"ZO data / DDP bytes sent per rank per step: {data / ddp:.8f}   ({data:.0f} B against {ddp:,.0f} B; "
              f"the parameters are {params:,} B)")
    print("commands (1 rank, then 2 ranks writing counts/rank<R>.json; this script runs both per row, from the "
          "repository root with PYTHONPATH=.):")
    for row, r in results.items():
        print(f"  {row}:\n    {r['commands'][0]}\n    {r['commands'][1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step, over all ranks")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    if args.device.startswith("cuda") and torch.cuda.device_count() < 2:
        parser.error(f"--device {args.device}: the 2-rank runs take a GPU each (NCCL), and "
                     f"{torch.cuda.device_count()} GPU is visible")
    if args.device.startswith("cuda"):  # each rank takes cuda:LOCAL_RANK; the 1-rank run cuda:0
        args.device = "cuda"
    with tempfile.TemporaryDirectory(prefix="zobench-distributed-") as scratch:
        results = {row: measure(row, args, Path(scratch)) for row in rows}
    report(results, args)


if __name__ == "__main__":
    main()
