"""Every optimizer's step time and peak memory on one model and batch, as ratios to MeZO and to inference.

    python benchmarks/optimizers.py                      # random-init OPT-125m size, byte tokenizer (CPU)
    python benchmarks/optimizers.py --model opt-tiny     # a quick check
    python benchmarks/optimizers.py --only mezo,adamezo  # a subset (inference and MeZO always run)
    python benchmarks/optimizers.py --dtype float16      # 16-bit weights under the run's precision policy
                                                         # (sgd/adam: fp32 master weights, as HF --fp16)

Time: one subprocess builds the model once, every optimizer on it, warms each up with one step, then
takes --steps rounds, each optimizer one step per round (interleaved, so a machine's changing load hits
all alike); the fastest of each optimizer's steps is reported (other processes only ever add time).
"inference" is one forward pass on the batch in inference mode.
Memory: one subprocess per optimizer (1 warm-up step, 1 step), so each peak is its own process's:
VmHWM on CPU (it includes the loaded weights), torch.cuda.max_memory_allocated on CUDA. On CPU these
run with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB, so every freed buffer goes back to the system
and VmHWM is the high-water mark of live memory rather than of heap fragmentation (which otherwise moves
it by about +-100 MiB from run to run).
The batch: --batch-size SST-2 sample examples (each with its 2 candidates). Addax gets the same
examples, split by length: the 40% shortest first-order (k1), the rest zeroth-order (k0). AdaMeZO is
measured in its adaptive phase (its history is pre-filled).
Goals (at OPT-125m size and up; on opt-tiny fixed costs dominate): Sparse MeZO and AdaMeZO peak <= 1.05 x MeZO; IP-SGD peak well under SGD's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

OPTIMIZERS = ["mezo", "sparse_mezo", "adamezo", "zo_sgd_sign", "zo_sgd_momentum", "zo_adam", "addax", "ip_sgd",
              "sgd", "adam"]


def config(args, name: str):
    from common import benchmark_config

    k1 = round(0.4 * args.batch_size)
    extra = [f"optimizer.k0={args.batch_size - k1}", f"optimizer.k1={k1}"] if name == "addax" else []
    return benchmark_config(args.model, args.device, [f"optimizer={'mezo' if name == 'inference' else name}",
                                                      *_precision(args), *extra])


def _precision(args) -> list[str]:
    """The weights' dtype, and the torch baselines as MeZO's FT row ran them (a no-op in fp32)."""
    return [f"dtype={args.dtype}", "precision.master_weights=true"]


def load(args):
    """(model, objective, batch, Addax's (long, short) pair, device)."""
    from common import benchmark_setup

    from zobench.encoding import collate
    from zobench.objective import Objective

    _, model, tokenizer, examples, device = benchmark_setup(args.model, args.batch_size, args.device,
                                                                 _precision(args))
    examples.sort(key=lambda e: max(map(len, e.sequences)))

    def batch_of(part):
        return collate(part, tokenizer.pad_token_id, classification=True).to(device)

    k1 = round(0.4 * args.batch_size)
    pair = (batch_of(examples[k1:]), batch_of(examples[:k1])) if 0 < k1 < len(examples) else None
    return model, Objective(model), batch_of(examples), pair, device


def work(args, name: str, model, objective, batch, pair, shared: bool = False):
    """A callable doing one step of `name` (or one inference forward), and the optimizer's setup seconds.
    `shared`: other optimizers step the same model (the time probe)."""
    from zobench.objective import Objective
    from zobench.optim import build_optimizer
    from zobench.precision import from_config

    if name == "inference":
        def forward():
            model.eval()
            with torch.inference_mode():
                float(objective(batch))
        return forward, 0.0
    start = time.perf_counter()
    cfg = config(args, name)
    precision = from_config(cfg.precision, next(model.parameters()).dtype)
    if shared and precision.half and name in ("sgd", "adam"):  # master weights make the model fp32: a copy
        model = copy.deepcopy(model)
        objective = Objective(model)
    optimizer = build_optimizer(cfg.optimizer, model, objective, seed=0, total_steps=10**6, precision=precision)
    setup_s = time.perf_counter() - start
    if name == "addax" and pair is None:
        raise SystemExit("addax needs --batch-size 2 or more: it splits the batch into long and short examples")
    step_batch = pair if name == "addax" else batch
    optimizer.step(step_batch)  # warm-up
    if name == "adamezo":  # measure the adaptive steps: h past directions to regenerate
        optimizer.history.extend((optimizer.engine.draw_seed(), 1.0) for _ in range(optimizer.horizon))
        optimizer.updates = optimizer.horizon + 1
    return (lambda: optimizer.step(step_batch)), setup_s


def probe_time(args, names) -> None:
    from zobench.models import parameter_count
    from zobench.run_record import synchronize

    model, objective, batch, pair, device = load(args)
    weights_dtype = next(model.parameters()).dtype  # as loaded (master weights convert a copy)
    steps = {name: work(args, name, model, objective, batch, pair, shared=True) for name in names}
    times = {name: [] for name in names}
    for _ in range(args.steps):
        for name, (step, _) in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    print(json.dumps({"params": parameter_count(model), "device": str(device), "dtype": str(weights_dtype),
                      "tokens": int(batch.attention_mask.sum()),
                      "optimizers": {n: {"step_s": min(times[n]), "setup_s": steps[n][1]} for n in names}}))


def probe_memory(args, name: str) -> None:
    from zobench.run_record import peak_memory, reset_peak_memory

    model, objective, batch, pair, device = load(args)
    reset_peak_memory(device)  # CUDA: the steps' peak over the loaded weights; CPU: VmHWM is the process's
    step, _ = work(args, name, model, objective, batch, pair)
    step()
    peak, method = peak_memory(device)
    print(json.dumps({"peak": peak, "method": method}))


def _child(args, *probe: str, env=None) -> dict:
    from common import run_self

    return run_self(__file__, *probe, "--model", args.model, "--batch-size", str(args.batch_size), "--steps",
                    str(args.steps), "--device", args.device, "--dtype", args.dtype, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (rounds) per optimizer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="the weights' dtype: auto | float32 | float16 | bfloat16")
    parser.add_argument("--only", default=",".join(OPTIMIZERS), help="comma-separated optimizers")
    parser.add_argument("--time-probe", help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_probe:
        probe_time(args, args.time_probe.split(","))
        return
    if args.memory_probe:
        probe_memory(args, args.memory_probe)
        return
    names = ["inference", "mezo"] + [n for n in args.only.split(",") if n not in ("inference", "mezo")]
    timing = _child(args, "--time-probe", ",".join(names))
    print("  timed", file=sys.stderr, flush=True)
    memory_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    peaks = {}
    for name in names:
        peaks[name] = _child(args, "--memory-probe", name, env=memory_env)
        print(f"  measured the peak of {name}", file=sys.stderr, flush=True)
    report(args, timing, peaks)


def report(args, timing, peaks) -> None:
    rows = {n: {**timing["optimizers"][n], "peak": peaks[n]["peak"]} for n in peaks}
    base, forward, method = rows["mezo"], rows["inference"], peaks["mezo"]["method"]
    dtype = timing["dtype"].removeprefix("torch.")
    if timing['params'] < 50e6:  # a quick look: fixed per-step costs dominate a model this small
        print("note: the goals below are for OPT-125m size and up; this model is too small to meet them")
    print(f"model {args.model} ({dtype} weights, random init, {timing['params'] / 1e6:.1f}M params) on {timing['device']}, "
          f"{torch.get_num_threads()} threads; batch {args.batch_size} SST-2 examples x 2 candidates "
          f"({timing['tokens']} real tokens); time: fastest of {args.steps} interleaved steps after 1 warm-up; "
          f"peak: {method}{' with a 128 KiB mmap threshold' if method != 'cuda_max_allocated' else ''}, "
          f"one process each")
    header = (f"{'optimizer':<16}{'step ms':>10}{'x MeZO':>9}{'x fwd':>8}{'peak MiB':>11}{'x MeZO':>9}"
              f"{'x infer':>9}{'setup s':>9}")
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        print(f"{name:<16}{r['step_s'] * 1e3:>10.0f}{r['step_s'] / base['step_s']:>9.2f}"
              f"{r['step_s'] / forward['step_s']:>8.2f}{r['peak'] / 2**20:>11.0f}{r['peak'] / base['peak']:>9.3f}"
              f"{r['peak'] / forward['peak']:>9.3f}{r['setup_s']:>9.1f}")
    if "ip_sgd" in rows and "sgd" in rows:
        print(f"IP-SGD peak / SGD peak: {rows['ip_sgd']['peak'] / rows['sgd']['peak']:.3f}   goal <= 0.6 where "
              f"weights dominate (OPT-125m and up)")


if __name__ == "__main__":
    main()
