"""Where an optimizer's step goes: torch.profiler over a few steps, split into forward passes, passes of
the perturbation engine over θ, and the rest (Python, loss, backward for first-order methods).

    python benchmarks/profile_step.py                               # MeZO, random-init OPT-125m size, CPU
    python benchmarks/profile_step.py --optimizer sparse_mezo --model opt-tiny
    python benchmarks/profile_step.py --trace /tmp/mezo.json        # open in Perfetto / chrome://tracing

The phases are labelled with record_function on the calling thread, so their wall times are exact. The
profiler does not see ops run on the engine's CPU worker threads, so the split of a pass into z generation
(aten::normal_) and arithmetic comes from one more profiled step with the engine on a single thread.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = {"zobench.forward": "forward passes", "zobench.z_pass": "engine passes over θ",
          "zobench.z_in_forward": "  of which z built in the forward"}


def labelled(fn, label):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def build(args):
    from common import benchmark_setup

    from zobench.encoding import collate
    from zobench.objective import Objective
    from zobench.optim import build_optimizer

    cfg, model, tokenizer, examples, dev = benchmark_setup(args.model, args.batch_size, args.device,
                                                           [f"optimizer={args.optimizer}"])
    batch = collate(examples, tokenizer.pad_token_id, classification=True).to(dev)
    objective = Objective(model)
    optimizer = build_optimizer(cfg.optimizer, model, labelled(objective, "zobench.forward"), seed=0,
                                total_steps=10**6)
    engine = getattr(optimizer, "engine", None) or getattr(getattr(optimizer, "zo", None), "engine", None)
    if engine is not None:  # instance attributes shadow the methods: only this benchmark's engine is labelled
        engine._each_block = labelled(engine._each_block, "zobench.z_pass")
        engine._perturbed_copy = labelled(engine._perturbed_copy, "zobench.z_in_forward")
    return optimizer, engine, batch, dev


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def profiled(optimizer, batch, dev, steps):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sync(dev)
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step(batch)
        sync(dev)
        wall = (time.perf_counter() - start) / steps
    return prof, wall


def phase_times(prof, steps) -> dict[str, float]:
    """Seconds per step in each labelled phase (wall time on the calling thread)."""
    totals = defaultdict(float)
    for event in prof.events():
        if event.name in PHASES:
            totals[event.name] += event.cpu_time_total / 1e6 / steps
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--optimizer", default="mezo")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=12, help="ops listed by self time")
    parser.add_argument("--trace", help="also write a Chrome trace of the profiled steps here")
    args = parser.parse_args()

    optimizer, engine, batch, dev = build(args)
    optimizer.step(batch)  # warm-up: thread pool, generators, scratch buffers, allocator
    prof, wall = profiled(optimizer, batch, dev, args.steps)
    phases = phase_times(prof, args.steps)
    if args.trace:
        prof.export_chrome_trace(args.trace)

    tokens = int(batch.attention_mask.sum())
    print(f"{args.optimizer} on {args.model} (random init) on {dev}, {torch.get_num_threads()} threads; "
          f"batch {args.batch_size} examples = {batch.input_ids.shape[0]} x {batch.input_ids.shape[1]} tokens "
          f"({tokens} real); {args.steps} profiled steps after 1 warm-up")
    print(f"{'per step (wall)':44s} {'ms':>9s} {'share':>7s}")
    print(f"  {'step':42s} {wall * 1e3:9.1f} {1:7.1%}")
    accounted = 0.0
    for label, name in PHASES.items():
        if label in phases:
            print(f"  {name:42s} {phases[label] * 1e3:9.1f} {phases[label] / wall:7.1%}")
            accounted += phases[label] if label != "zobench.z_in_forward" else 0.0
    rest = wall - accounted
    print(f"  {'rest (Python, loss, backward, bookkeeping)':42s} {rest * 1e3:9.1f} {rest / wall:7.1%}")

    if engine is not None and "zobench.z_pass" in phases:
        threads = engine.threads
        engine.threads = 1  # the profiler sees only this thread's ops
        serial, serial_wall = profiled(optimizer, batch, dev, 1)
        engine.threads = threads
        split = defaultdict(float)
        for event in serial.events():
            if event.name.startswith("aten::") and event.cpu_parent is not None \
                    and _inside(event, "zobench.z_pass"):
                split["z generation (aten::normal_)" if event.name == "aten::normal_"
                      else "arithmetic (add_, mul_, ...)"] += event.self_cpu_time_total / 1e3
        passes = phase_times(serial, 1)["zobench.z_pass"] * 1e3
        print(f"engine passes on one thread (one more step, {serial_wall * 1e3:.1f} ms): {passes:.1f} ms")
        for name, ms in sorted(split.items(), key=lambda kv: -kv[1]):
            print(f"  {name:42s} {ms:9.1f} {ms / passes:7.1%}")
        other = passes - sum(split.values())
        print(f"  {'Python and block bookkeeping':42s} {other:9.1f} {other / passes:7.1%}")

    print(f"top {args.top} ops by self time (calling thread; CPU ms over {args.steps} steps):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                    max_name_column_width=40))


def _inside(event, label: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == label:
            return True
        parent = parent.cpu_parent
    return False


if __name__ == "__main__":
    main()
