"""The torchrun part of benchmarks/gpu_check.sh: each parallel mode on 2 ranks against the one-process run, as
tests/test_distributed_zo.py and tests/test_distributed_fo.py compare them on CPU, here on the device asked for
(NCCL between 2 GPUs; gloo on CPU for the dry run).

- ZO `data` (MeZO), `directions` (ZO-Adam, q=2) and `shard` (MeZO): per-step losses (relative to their size, at
  least 1) and the saved weights within 1e-6;
- FSDP2 Adam (lr 1e-4): the logged whole-batch losses and the saved weights within 1e-5.
Every run in fp32 (the tests' bounds are fp32's), random weights of the preset, `save_model=true`.

    python benchmarks/gpu_check_ranks.py --device cuda --model opt-125m --out DIR        # 2 GPUs or more
    python benchmarks/gpu_check_ranks.py --device cpu --model opt-tiny --out DIR        # the dry run (gloo)

Exit status 1 when a run fails or a difference is over its bound.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from distributed import common_words, environment

# row -> (overrides, what is compared, bound): the CPU tests' cases and bounds
ROWS = {
    "zo-data": (["optimizer=mezo", "parallel.zo=data"], "trajectory", 1e-6),
    "zo-directions": (["optimizer=zo_adam", "optimizer.q=2", "parallel.zo=directions"], "trajectory", 1e-6),
    "zo-shard": (["optimizer=mezo", "parallel.zo=shard", "train.keep_best=host"], "trajectory", 1e-6),
    "fsdp-adam": (["optimizer=adam", "optimizer.lr=1e-4", "parallel.fo=fsdp", "train.keep_best=host"], "log", 1e-5),
}


def run(command: list[str]) -> str | None:
    """None when it completed, else the end of what it said."""
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    return None if done.returncode == 0 else f"exit {done.returncode}: {shlex.join(command)}\n{done.stderr[-2000:]}"


def losses(folder: Path, source: str) -> list[float]:
    lines = [json.loads(line) for line in (folder / f"{source}.jsonl").read_text().splitlines()]
    if source == "trajectory":
        return [value for line in lines for value in line["losses"]]
    return [line["loss"] for line in lines if line["event"] == "train"]


def differences(one: Path, two: Path, source: str) -> tuple[float, float]:
    """(largest loss difference, relative to the loss where it is above 1; largest weight difference)."""
    import torch
    from safetensors.torch import load_file

    first, second = losses(one, source), losses(two, source)
    if len(first) != len(second) or not first:
        return float("inf"), float("inf")
    loss = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(first, second))
    weights = [load_file(str(folder / "model" / "model.safetensors")) for folder in (one, two)]
    if weights[0].keys() != weights[1].keys():
        return loss, float("inf")
    return loss, max(float((weights[0][k].float() - weights[1][k].float()).abs().max()) for k in weights[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step, over all ranks")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    args = parser.parse_args()
    words = [*common_words(args), "dtype=float32", "save_model=true"]
    print(f"{'row':<14} {'parallel':<14} {'max loss diff':>13} {'max weight diff':>15} {'bound':>6}  result")
    failed = False
    for row in args.rows.split(","):
        overrides, source, bound = ROWS[row]
        one, two = args.out / row / "one", args.out / row / "two"
        error = run([sys.executable, "-m", "zobench", *words, *overrides, f"hydra.run.dir={one}"]) or run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "zobench",
             *words, *overrides, f"hydra.run.dir={two}"])
        if error:
            print(f"{row:<14} failed: {error}")
            failed = True
            continue
        metrics = json.loads((two / "metrics.json").read_text())
        loss, weight = differences(one, two, source)
        ok = metrics["world_size"] == 2 and loss <= bound and weight <= bound
        failed |= not ok
        print(f"{row:<14} {metrics['parallel']:<14} {loss:13.2e} {weight:15.2e} {bound:6.0e}  "
              f"{'ok' if ok else 'OVER THE BOUND'} (2 ranks on {metrics['device']})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
