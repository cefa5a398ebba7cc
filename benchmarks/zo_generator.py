"""What the portable z costs (precision.zo_generator=portable: every block drawn on the host and copied to
the parameter's device) against the device's own generator, over one perturbation pass of a model's weights
(θ += eps·z, what a MeZO step does three times). On CPU the two draw the same numbers and the ratio is the
copy's cost; on CUDA it is the host's generator against the GPU's (benchmarks/gpu_check.sh prints that row).

    python benchmarks/zo_generator.py [--model opt-125m] [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time


def pass_seconds(engine, device, repeats: int) -> float:
    """The least wall time of `repeats` perturbation passes (the machine may be shared: the minimum is the
    least disturbed), the device synchronized."""
    import torch

    from zobench.run_record import synchronize

    times = []
    with torch.no_grad():
        for seed in range(repeats + 1):  # the first pass warms the generators and buffers up
            synchronize(device)
            start = time.perf_counter()
            engine.perturb(seed, 1e-3)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return min(times[1:])


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
    seconds = {}
    for generator in ("device", "portable"):
        engine = PerturbationEngine(model.named_parameters(), 0, precision=Precision(weights=weights,
                                                                                    zo_generator=generator))
        seconds[generator] = pass_seconds(engine, device, args.repeats)
        print(f"{generator:<9} {engine.z_source():<48} {seconds[generator]:8.3f} s a pass "
              f"({elements / seconds[generator] / 1e6:.0f} M elements/s)")
    print(f"portable / device pass ({args.model}, {device}, {str(weights).removeprefix('torch.')})  "
          f"{seconds['portable'] / seconds['device']:.2f}")


if __name__ == "__main__":
    main()
