"""MeZO step vs inference: time and peak memory, side by side on the same model and batch.

    python benchmarks/zo_step.py                      # random-init OPT-125m size (CPU, ~125M params)
    python benchmarks/zo_step.py --model opt-tiny     # a quick check

Prints the inference forward time, the MeZO step time and step / (2 forwards), and zobench's step
against a reference-style MeZO step written here as the paper's code does it (torch.manual_seed, then
torch.normal per parameter, four passes over the weights: +eps, -2eps, +eps, update); then the peak memory
(VmHWM on CPU, max_memory_allocated on CUDA) of an evaluation-only process and of a MeZO-training
process, each measured in its own subprocess so one's high-water mark does not hide the other's.
Goals (at OPT-125m size and up; on opt-tiny fixed per-step costs dominate and the ratios miss them): step <= 1.15 x two forwards; zobench / reference step <= 0.9;
MeZO peak <= 1.05 x inference peak. Both zo_update modes (precision.zo_update: fused, reference) are timed
and measured.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import torch


def build(model_name: str, batch_size: int, device: str, zo_update: str = "fused"):
    from common import benchmark_setup

    from zobench.encoding import collate
    from zobench.models import parameter_count
    from zobench.objective import Objective
    from zobench.optim import build_optimizer
    from zobench.precision import Precision

    cfg, model, tokenizer, examples, dev = benchmark_setup(model_name, batch_size, device,
                                                           ["optimizer=mezo", "optimizer.lr=1e-6"])
    batch = collate(examples, tokenizer.pad_token_id, classification=True).to(dev)
    objective = Objective(model)
    optimizer = build_optimizer(cfg.optimizer, model, objective, seed=0, total_steps=10**6,
                                precision=Precision(weights=next(model.parameters()).dtype, zo_update=zo_update))
    return model, objective, optimizer, batch, parameter_count(model), dev


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev) -> float:
    sync(dev)
    start = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - start


def reference_step(model, objective, batch, eps: float, lr: float, seed: int) -> float:
    """MeZO's trainer.py zo_step + zo_update as the paper's code runs them (large_models/trainer.py)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def perturb(scale):
        torch.manual_seed(seed)
        for _, p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * eps

    def loss():
        with torch.inference_mode():
            return float(objective(batch))

    perturb(1)
    plus = loss()
    perturb(-2)
    minus = loss()
    perturb(1)
    projected = (plus - minus) / (2 * eps)
    torch.manual_seed(seed)
    for _, p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data - lr * (projected * z)
    return plus


def speed(args) -> None:
    model, objective, optimizer, batch, n_params, dev = build(args.model, args.batch_size, args.device)
    model.eval()
    from zobench.precision import Precision

    # the same MeZO with precision.zo_update=reference (MeZO trainer.py's rounding), on the same model
    as_reference = type(optimizer)(model, objective, optimizer.settings, seed=0, total_steps=10**6,
                                   precision=Precision(weights=next(model.parameters()).dtype, zo_update="reference"))

    def forward():
        with torch.inference_mode():
            float(objective(batch))

    for _ in range(2):  # warm-up
        forward()
        optimizer.step(batch)
        as_reference.step(batch)
    forwards, steps, perturbs, references, modes = [], [], [], [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits all alike
        forwards.append(timed(forward, dev))
        steps.append(timed(lambda: optimizer.step(batch), dev))
        modes.append(timed(lambda: as_reference.step(batch), dev))
        perturbs.append(timed(lambda: optimizer.engine.perturb(0, 0.0), dev))
        references.append(timed(lambda: reference_step(model, objective, batch, 1e-3, 1e-6, 0), dev))
    f, s, p, r, m = (statistics.median(x) for x in (forwards, steps, perturbs, references, modes))
    tokens = int(batch.attention_mask.sum())
    if n_params < 50e6:  # a quick look: per-step overheads dominate a model this small
        print("note: the goals below are for OPT-125m size and up; this model is too small to meet them")
    print(f"model {args.model} (random init, {n_params / 1e6:.1f}M params) on {dev}, "
          f"{torch.get_num_threads()} threads; batch {args.batch_size} examples = "
          f"{batch.input_ids.shape[0]} sequences x {batch.input_ids.shape[1]} tokens ({tokens} real)")
    print(f"median of {args.repeats}:")
    print(f"  inference forward          {f * 1e3:9.1f} ms")
    print(f"  MeZO step                  {s * 1e3:9.1f} ms   (zo_update=fused)")
    print(f"  MeZO step, reference mode  {m * 1e3:9.1f} ms   (zo_update=reference)")
    print(f"  one pass regenerating z    {p * 1e3:9.1f} ms   (a step makes 3)")
    print(f"  reference-style MeZO step  {r * 1e3:9.1f} ms   (4 passes, torch.normal per parameter)")
    print(f"  step / (2 x forward)       {s / (2 * f):9.3f}    goal <= 1.15")
    print(f"  reference-mode step / (2 x forward) {m / (2 * f):9.3f}")
    print(f"  reference / (2 x forward)  {r / (2 * f):9.3f}")
    print(f"  zobench / reference step   {s / r:9.3f}    goal <= 0.9")


def memory_probe(args) -> None:
    """Child process: build, run `mode` a few times, print the peak as JSON."""
    from zobench.run_record import peak_memory, reset_peak_memory

    try:  # no transparent huge pages: a partly touched 2 MiB page would count whole, as the system's fragmentation allows
        ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
    except (OSError, AttributeError):
        pass
    zo_update = "reference" if args.probe == "mezo-reference" else "fused"
    model, objective, optimizer, batch, _, dev = build(args.model, args.batch_size, args.device, zo_update)
    optimizer.engine.threads = args.engine_threads
    if dev.type == "cpu":  # hand the model build's freed heap back first: else the RSS the peak is reset to
        try:               # varies by what glibc kept (inference's own peak moved 1316 -> 1384 MiB between runs)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
    reset_peak_memory(dev)
    for _ in range(3):
        if args.probe == "eval":
            with torch.inference_mode():
                float(objective(batch))
        else:
            optimizer.step(batch)
    print(json.dumps(dict(zip(("bytes", "method"), peak_memory(dev)))))


def memory(args) -> None:
    from common import run_self

    peaks = {}
    for mode in ("eval", "mezo", "mezo-reference"):
        runs = []
        for _ in range(args.probe_repeats):
            runs.append(run_self(__file__, "--probe", mode, "--model", args.model, "--batch-size",
                                 str(args.batch_size), "--device", args.device,
                                 *(["--engine-threads", str(args.engine_threads)] if args.engine_threads else [])))
        peaks[mode] = {"bytes": statistics.median(r["bytes"] for r in runs), "method": runs[0]["method"]}
    method = peaks["eval"]["method"]
    print(f"peak memory ({method}, each in its own process; median of {args.probe_repeats}):")
    print(f"  evaluation only            {peaks['eval']['bytes'] / 2**20:9.1f} MiB")
    print(f"  MeZO training              {peaks['mezo']['bytes'] / 2**20:9.1f} MiB")
    print(f"  MeZO reference mode        {peaks['mezo-reference']['bytes'] / 2**20:9.1f} MiB")
    print(f"  MeZO / evaluation          {peaks['mezo']['bytes'] / peaks['eval']['bytes']:9.3f}    goal <= 1.05")
    print(f"  reference-mode MeZO / evaluation {peaks['mezo-reference']['bytes'] / peaks['eval']['bytes']:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="threads sharing the engine's CPU blocks in the memory probes (default: torch's)")
    parser.add_argument("--probe-repeats", type=int, default=1, help="processes per memory probe (median)")
    parser.add_argument("--memory-only", action="store_true", help="skip the timings")
    parser.add_argument("--probe", choices=["eval", "mezo", "mezo-reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        memory_probe(args)
        return
    if not args.memory_only:
        speed(args)
    memory(args)


if __name__ == "__main__":
    main()
