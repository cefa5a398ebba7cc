"""What the portable z costs (precision.zo_generator=portable: every block drawn on the host and copied to
the parameter's device) against the device's own generator, over one perturbation pass of a model's weights
(θ += eps·z, what a MeZO step does three times). On CPU the two are the same draw (the ratio says so); on CUDA
it is the host's generator against the GPU's (benchmarks/gpu_check.sh prints that row). The host's draw rate,
measured here on torch's threads, bounds a portable pass on a GPU from below: printed for this model and OPT-13B.

    python benchmarks/zo_generator.py [--model opt-125m] [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time


def pass_seconds(engines: dict, device, repeats: int) -> dict:
    """Each engine's least wall time of `repeats` perturbation passes, the engines taking turns (the machine
    may be shared: turns spread its load over both, the minimum is the least disturbed); device synchronized."""
    import torch

    from zobench.run_record import synchronize

    times = {name: [] for name in engines}
    with torch.no_grad():
        for seed in range(repeats + 1):  # the first round warms the generators and buffers up
            for name, engine in engines.items():
                synchronize(device)
                start = time.perf_counter()
                engine.perturb(seed, 1e-3)
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return {name: min(seen[1:]) for name, seen in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import benchmark_setup

    from zobench.optim.engine import PerturbationEngine
    from zobench.precision import Precision

    _, model, _, _, device = benchmark_setup(args.model, 1, args.device)
    weights = next(model.parameters()).dtype
    elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engines = {generator: PerturbationEngine(model.named_parameters(), 0,
                                             precision=Precision(weights=weights, zo_generator=generator))
               for generator in ("device", "portable")}
    seconds = pass_seconds(engines, device, args.repeats)
    for generator, engine in engines.items():
        print(f"{generator:<9} {engine.z_source():<48} {seconds[generator]:8.3f} s a pass "
              f"({elements / seconds[generator] / 1e6:.0f} M elements/s)")
    print(f"portable / device pass ({args.model}, {device}, {str(weights).removeprefix('torch.')})  "
          f"{seconds['portable'] / seconds['device']:.2f}")
    rate = host_draw_rate(engines["portable"], args.repeats)
    import torch

    print(f"host draw, {torch.get_num_threads()} thread(s): {rate / 1e6:.0f} M elements/s; a portable pass on a GPU "
          f"takes at least {elements / rate:.2f} s for {args.model}, {OPT_13B / rate:.0f} s for OPT-13B")


OPT_13B = 12.85e9  # parameters


def host_draw_rate(engine, repeats: int) -> float:
    """Elements per second of the portable draw into a buffer as a GPU's block would get it (the host's
    blocks drawn on the engine's threads and copied): what a CUDA run's portable pass waits on."""
    import torch

    out = torch.empty(4 * (1 << 20))
    times = []
    for seed in range(repeats + 1):
        start = time.perf_counter()
        engine._fill_on_host(out, seed, 0, 0)
        times.append(time.perf_counter() - start)
    return out.numel() / min(times[1:])


if __name__ == "__main__":
    main()
