"""`zobench-replay RUN_DIR`: rebuild a zeroth-order run's fine-tuned weights from its base model and
its trajectory (trajectory.jsonl), and write them as a save_pretrained folder.

    zobench-replay results/runs/…/RUN                 # the weights the run tested (its best-on-dev step)
    zobench-replay results/runs/…/RUN --step 5000 --out /data/opt-13b-sst2-5k

The base model is loaded exactly as the run loaded it (its config.yaml): hub id, model.path or random
init. Replaying costs three regenerations of z per step and no forward pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def replay_run(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    import torch
    from omegaconf import OmegaConf

    from .checkpoint import ReplayLoss, read_trajectory, replay
    from .errors import ZobenchError
    from .models import load_model, resolve_device, resolve_dtype
    from .optim import build_optimizer
    from .precision import from_config as precision_from_config
    from .peft_adapters import apply_peft

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ZobenchError(f"{run_dir}: not a zobench run directory (no config.yaml)")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    records = read_trajectory(run_dir)
    if step is None:  # what the run tested: its best-on-dev step, else its last
        step = metrics.get("best_step") if cfg.train.keep_best != "none" and metrics.get("best_step") else len(records)
    if not 0 <= step <= len(records):
        raise ZobenchError(f"{run_dir}: the trajectory holds steps 1..{len(records)}, not {step}")
    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(cfg.dtype), device)
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True), device, dtype)
    # The run's adapter, initialised from the run's seed as the run did (peft=none: the model itself).
    peft_spec = OmegaConf.to_container(cfg.peft, resolve=True) if "peft" in cfg else None
    model, saveable = apply_peft(model, peft_spec, seed=int(cfg.seed))
    optimizer = build_optimizer(cfg.optimizer, model, ReplayLoss(), seed=int(cfg.seed),
                                total_steps=int(cfg.train.steps),
                                precision=precision_from_config(cfg.get("precision"), dtype))
    if not getattr(optimizer, "trains", True):  # zero-shot, ICL, linear probing
        raise ZobenchError(f"a {cfg.optimizer.name} run trains nothing: its model is {cfg.model.name} as loaded")
    if not optimizer.replayable:
        raise ZobenchError(f"a {cfg.optimizer.name} run cannot be replayed from its trajectory: it takes real "
                           f"gradients; use its saved model (save_model=true) instead")
    with torch.no_grad():
        replay(optimizer, records[:step])
    out = Path(out) if out else run_dir / f"model-step-{step}"
    saveable.save_pretrained(out)  # with PEFT: the adapter alone, as the run's save_model writes it
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from .errors import ZobenchError

    parser = argparse.ArgumentParser(prog="zobench-replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, default=None, help="replay steps 1..STEP (default: the tested step)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/model-step-STEP)")
    args = parser.parse_args(argv)
    try:
        out = replay_run(args.run_dir, args.step, args.out)
    except ZobenchError as error:
        print(f"zobench-replay: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a read-only or full output folder
        from .cli import os_error_line

        print(f"zobench-replay: error: {os_error_line(error)}", file=sys.stderr)
        return 1
    print(f"fine-tuned weights written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
