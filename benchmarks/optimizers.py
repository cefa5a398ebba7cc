"""Every optimizer's step time and peak memory on one model and batch, as ratios to MeZO and to inference.

    python benchmarks/optimizers.py                      # random-init OPT-125m size, byte tokenizer (CPU)
    python benchmarks/optimizers.py --model opt-tiny     # a quick check
    python benchmarks/optimizers.py --only mezo,adamezo  # a subset (inference and MeZO always run)

Each optimizer runs in two subprocesses of its own: one times it (1 warm-up step, then --steps steps;
the fastest is reported: on a shared machine other processes only ever add time), one measures its peak memory (1 warm-up step and 1 step): VmHWM on CPU (which
includes the loaded weights), torch.cuda.max_memory_allocated on CUDA. On CPU the memory process runs
with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB, so every freed buffer goes back to the system and
VmHWM is the high-water mark of live memory rather than of heap fragmentation (which otherwise moves
it by +-100 MiB from run to run); the timing process keeps the default allocator. "inference" is a
process that only runs forward passes on the batch (its time column is one forward).
The batch: --batch-size SST-2 sample examples (each with its 2 candidates). Addax gets the same
examples, split by length: the 40% shortest first-order (k1), the rest zeroth-order (k0). AdaMeZO is
measured in its adaptive phase (its history is pre-filled).
Goals (issue 5): Sparse MeZO and AdaMeZO peak <= 1.05 x MeZO; IP-SGD peak well under SGD's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

OPTIMIZERS = ["mezo", "sparse_mezo", "adamezo", "zo_sgd_sign", "zo_sgd_momentum", "zo_adam", "addax", "ip_sgd",
              "sgd", "adam"]


def build(args, name: str):
    from omegaconf import OmegaConf

    from zobench.configs import compose
    from zobench.data import load_split_pools
    from zobench.encoding import Encoder, collate
    from zobench.models import load_model, resolve_device, resolve_dtype
    from zobench.objective import Objective
    from zobench.optim import build_optimizer
    from zobench.tasks import PromptTemplate

    k1 = round(0.4 * args.batch_size)
    extra = [f"optimizer.k0={args.batch_size - k1}", f"optimizer.k1={k1}"] if name == "addax" else []
    cfg = compose([f"model={args.model}", "model.init=random", "model.tokenizer=byte", "task.samples=true",
                   f"optimizer={'mezo' if name == 'inference' else name}", f"device={args.device}", *extra])
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True), device,
                                  resolve_dtype(cfg.dtype, device))
    task = OmegaConf.to_container(cfg.task, resolve=True)
    pools, _ = load_split_pools(task)
    template, encoder = PromptTemplate(task), Encoder(tokenizer, 512)
    rows = [pools["train"][i % len(pools["train"])] for i in range(args.batch_size)]
    examples = sorted((encoder.encode(template.render(r)) for r in rows), key=lambda e: max(map(len, e.sequences)))

    def batch_of(part):
        return collate(part, tokenizer.pad_token_id, classification=True).to(device)

    batch = (batch_of(examples[k1:]), batch_of(examples[:k1])) if name == "addax" else batch_of(examples)
    objective = Objective(model)
    start = time.perf_counter()
    optimizer = None if name == "inference" else build_optimizer(cfg.optimizer, model, objective, seed=0,
                                                                 total_steps=10**6)
    return model, objective, optimizer, batch, device, time.perf_counter() - start


def probe(args) -> None:
    """Child process: build, warm up, time, print one JSON line."""
    from zobench.models import parameter_count
    from zobench.records import peak_memory, reset_peak_memory, synchronize

    model, objective, optimizer, batch, device, setup_s = build(args, args.probe)
    reset_peak_memory(device)  # CUDA: the step's peak over the loaded weights; CPU: VmHWM is the process's

    def forward():
        model.eval()
        with torch.inference_mode():
            float(objective(batch))

    work = forward if optimizer is None else (lambda: optimizer.step(batch))
    work()
    if args.probe == "adamezo":  # time the adaptive steps: h past directions to regenerate
        optimizer.history.extend((optimizer.engine.draw_seed(), 1.0) for _ in range(optimizer.horizon))
        optimizer.updates = optimizer.horizon + 1
    times = []
    for _ in range(args.steps if args.mode == "time" else 1):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak, method = peak_memory(device)
    tokens = sum(int(b.attention_mask.sum()) for b in (batch if isinstance(batch, tuple) else (batch,)))
    print(json.dumps({"step_s": min(times), "peak": peak, "method": method, "setup_s": setup_s,
                      "params": parameter_count(model), "tokens": tokens, "device": str(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=",".join(OPTIMIZERS), help="comma-separated optimizers")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args)
        return
    names = ["inference", "mezo"] + [n for n in args.only.split(",") if n not in ("inference", "mezo")]
    results = {}
    for name in names:
        measured = {mode: _run_probe(args, name, mode) for mode in ("time", "memory")}
        if None in measured.values():
            continue
        results[name] = {**measured["time"], "peak": measured["memory"]["peak"]}
        print(f"  measured {name}", file=sys.stderr, flush=True)
    report(args, results)


def _run_probe(args, name: str, mode: str) -> dict | None:
    env = dict(os.environ)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, __file__, "--probe", name, "--mode", mode, "--model", args.model,
                          "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--device", args.device],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"{name} ({mode}): failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, results) -> None:
    base, forward = results["mezo"], results["inference"]
    print(f"model {args.model} (random init, {base['params'] / 1e6:.1f}M params) on {base['device']}, "
          f"{torch.get_num_threads()} threads; batch {args.batch_size} SST-2 examples x 2 candidates "
          f"({forward['tokens']} real tokens); fastest of {args.steps} steps after 1 warm-up; "
          f"peak memory: {base['method']}"
          f"{' with 128 KiB mmap threshold' if base['method'] != 'cuda_max_allocated' else ''}, one process each")
    header = (f"{'optimizer':<16}{'step ms':>10}{'x MeZO':>9}{'x fwd':>8}{'peak MiB':>11}{'x MeZO':>9}"
              f"{'x infer':>9}{'setup s':>9}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<16}{r['step_s'] * 1e3:>10.0f}{r['step_s'] / base['step_s']:>9.2f}"
              f"{r['step_s'] / forward['step_s']:>8.2f}{r['peak'] / 2**20:>11.0f}{r['peak'] / base['peak']:>9.3f}"
              f"{r['peak'] / forward['peak']:>9.3f}{r['setup_s']:>9.1f}")


if __name__ == "__main__":
    main()
