"""How much of each optimizer's intended update lands in 16-bit weights, reference numerics vs zobench's.

    python benchmarks/numerics.py                          # opt-tiny, ZO optimizers, fp16 and bf16, CPU
    python benchmarks/numerics.py --only mezo,sgd,adam --model opt-125m --device cuda

1. MeZO's update on 4M weights drawn N(0, 0.02²), through the engine itself: the landed
   fraction ⟨Δθ, −lr·g·z⟩ / ‖lr·g·z‖² after +eps, −2eps, restore + update, per lr·g, dtype and mode.
2. Every optimizer (any registered name) through one generic path: `--steps` steps on the 16-bit model,
   and the same steps on a float64 copy of its starting weights (the intended update). Zeroth-order
   optimizers replay the 16-bit run's losses and see the same z (drawn in fp32, rounded to the 16-bit dtype,
   in both runs), so the two differ only in the update's arithmetic; first-order ones compute their own
   gradients in fp64. landed = ⟨Δθ16, Δθ64⟩ / ‖Δθ64‖²; non-finite counts the weights and state entries
   that are inf or NaN after the steps. Policies: `reference` = the paper presets' (zo_update reference,
   loss from logits in the weights' dtype, state in the weights' dtype); `zobench` = conf/config.yaml's.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
ZO_DEFAULT = "mezo,sparse_mezo,adamezo,zo_adam,zo_sgd_momentum,zo_sgd_sign"
OVERRIDES = {"adamezo": ["optimizer.horizon=2"],  # leaves its MeZO warm-up after 3 steps
             "sparse_mezo": ["optimizer.sparsity=0.8"]}


def policies(dtype):
    from zobench.precision import Precision

    return {"reference": Precision(weights=dtype, zo_update="reference", loss_dtype="weights",
                                   state_dtype="weights", name="reference"),
            "zobench": Precision(weights=dtype)}


def landed(moved: torch.Tensor, intended: torch.Tensor) -> float:
    norm = float((intended * intended).sum())
    return float((moved * intended).sum()) / norm if norm else float("nan")


# -- 1. the engine on Gaussian weights ---------------------------------------------------------------
def engine_table(n: int, device: str) -> None:
    from zobench.optim.engine import PerturbationEngine
    from zobench.precision import Precision

    theta0 = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.02).to(device)
    print(f"1. MeZO step on {device}, {n / 2**20:g}M weights ~ N(0, 0.02²), eps 1e-3: landed fraction of −lr·g·z")
    print(f"   {'lr·g':>8} {'dtype':>9} {'reference':>10} {'zobench':>10}")
    for lr_times_g in (1e-7, 1e-6, 1e-5):
        for name, dtype in DTYPES.items():
            row = []
            for mode in ("reference", "fused"):
                param = torch.nn.Parameter(theta0.to(dtype))
                start = param.detach().double()
                engine = PerturbationEngine([("w", param)], seed=0, precision=Precision(weights=dtype, zo_update=mode))
                with torch.no_grad():
                    engine.perturb(1, 1e-3)
                    engine.perturb(1, -2e-3)
                    engine.apply([(1, 1e-3, 1.0)], lr=lr_times_g)
                intended = -lr_times_g * engine.direction(1, 0, param).double()
                row.append(landed(param.detach().double() - start, intended))
            print(f"   {lr_times_g:8.0e} {name:>9} {row[0]:10.3f} {row[1]:10.3f}")


# -- 2. every optimizer through one path -------------------------------------------------------------
def same_z_in_every_dtype(dtype):
    """z drawn in fp32 and rounded to `dtype` in every run, so the fp64 run sees the 16-bit run's z."""
    from zobench.optim import engine as engine_module

    def fill(self, out, seed, index, block):
        generators = self._local.__dict__.setdefault("generators", {})
        generator = generators.setdefault(out.device, torch.Generator(device=out.device))
        generator.manual_seed(engine_module._block_seed(seed, index, block))
        draw = torch.empty(out.shape, dtype=torch.float32, device=out.device).normal_(generator=generator)
        return out.copy_(draw.to(dtype))

    engine_module.PerturbationEngine._fill = fill


def run_optimizer(name, dtype, policy, args, base_model, tokenizer, examples, dev):
    from zobench.encoding import collate
    from zobench.objective import Objective
    from zobench.optim import build_optimizer
    from zobench.optim.base import ZEROTH_ORDER
    from zobench.precision import Precision
    from common import benchmark_config

    cfg = benchmark_config(args.model, args.device, [f"optimizer={name}", *OVERRIDES.get(name, [])])
    batch = collate(examples, tokenizer.pad_token_id, classification=True).to(dev)
    same_z_in_every_dtype(dtype)

    def build(model_dtype, precision, loss_fn=None):
        model = copy.deepcopy(base_model).to(model_dtype)
        objective = Objective(model, loss_dtype=precision.dtype_of(precision.loss_dtype))
        optimizer = build_optimizer(cfg.optimizer, model, loss_fn or objective, seed=0, total_steps=args.steps,
                                    precision=precision)
        return model, optimizer, objective

    model16, opt16, objective16 = build(dtype, policy)
    start = {n: p.detach().double().clone() for n, p in model16.named_parameters()}
    seen = []
    if opt16.kind == ZEROTH_ORDER:
        opt16.loss_fn = lambda b: seen.append(float(objective16(b))) or torch.tensor(seen[-1])
    # the step's batch as the optimizer asks for it (Addax: a (short, long) pair), the same in both runs
    first = next(opt16.batches([max(map(len, e.sequences)) for e in examples], len(examples), 0))
    step_batch = tuple(collated(examples, part, tokenizer, dev) for part in first) if isinstance(first, tuple) else batch
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt16.step(step_batch)
    seconds = time.perf_counter() - t0

    exact = Precision(weights=torch.float64, loss_dtype="weights", state_dtype="weights")
    replayed = list(seen)
    zo = opt16.kind == ZEROTH_ORDER
    model64, opt64, _ = build(torch.float64, exact,
                              (lambda b: torch.tensor(replayed.pop(0), dtype=torch.float64)) if zo else None)
    with torch.no_grad():
        for (_, p64), (n, _) in zip(model64.named_parameters(), model16.named_parameters()):
            p64.copy_(start[n])
    for _ in range(args.steps):
        opt64.step(step_batch)

    moved = torch.cat([(p.detach().double() - start[n]).view(-1) for n, p in model16.named_parameters()])
    intended = torch.cat([(p.detach() - start[n]).view(-1) for n, p in model64.named_parameters()])
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model16.parameters())
    state = opt16.state_dict()
    bad += sum(int((~torch.isfinite(t)).sum()) for t in _tensors(state) if t.is_floating_point())
    return landed(moved, intended), bad, seconds


def collated(examples, indices, tokenizer, dev):
    from zobench.encoding import collate

    return collate([examples[i] for i in indices], tokenizer.pad_token_id, classification=True).to(dev)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def optimizer_table(args) -> None:
    from common import benchmark_setup

    cfg, base_model, tokenizer, examples, dev = benchmark_setup(args.model, args.batch_size, args.device)
    base_model = base_model.float()
    print(f"2. {args.steps} steps of each optimizer on {args.model} (random init, {args.device}), batch "
          f"{args.batch_size}: landed = ⟨Δθ16, Δθ64⟩/‖Δθ64‖², non-finite = inf/NaN weights + state entries")
    print(f"   {'optimizer':<16} {'dtype':>9} {'ref landed':>11} {'ref nonfin':>11} {'zob landed':>11} {'zob nonfin':>11}")
    for name in args.only.split(","):
        for dtype_name, dtype in DTYPES.items():
            cells = []
            for policy in policies(dtype).values():
                try:
                    fraction, bad, _ = run_optimizer(name, dtype, policy, args, base_model, tokenizer, examples, dev)
                    cells += [f"{fraction:11.3f}", f"{bad:11d}"]
                except Exception as error:  # a failing optimizer is a figure too: say which and why
                    print(f"   {name} {dtype_name}: {type(error).__name__}: {error}"[:300])
                    cells += [f"{'error':>11}", f"{type(error).__name__:>11}"]
            print(f"   {name:<16} {dtype_name:>9} {' '.join(cells)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-tiny")
    parser.add_argument("--only", default=ZO_DEFAULT, help="comma-separated optimizer names (FO ones too)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--weights", type=int, default=1 << 22, help="Gaussian weights for table 1")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    engine_table(args.weights, args.device)
    optimizer_table(args)


if __name__ == "__main__":
    main()
