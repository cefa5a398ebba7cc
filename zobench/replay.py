"""`zobench-replay RUN_DIR`: rebuild a zeroth-order run's fine-tuned weights from its base model and
its trajectory (trajectory.jsonl), and write them as a save_pretrained folder.

    zobench-replay results/runs/…/RUN                 # the weights the run tested (its best-on-dev step)
    zobench-replay results/runs/…/RUN --step 5000 --out /data/opt-13b-sst2-5k

The base model is loaded exactly as the run loaded it (its config.yaml): hub id, model.path or random
init. Replaying costs three regenerations of z per step and no forward pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def replay_run(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    import torch
    from omegaconf import OmegaConf

    from .checkpoint import TRAJECTORY, ReplayLoss, check_z_source, read_trajectory, replay
    from .errors import ZobenchError
    from .build import build_method, build_model
    from .optim.base import EVALUATION_ONLY
    from .run_dir import RunDir
    from .safe_files import read_yaml
    from .spec import RunSpec

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ZobenchError(f"{run_dir}: not a zobench run directory (no config.yaml)")
    metrics = RunDir(run_dir).read_json("metrics.json") or {}
    try:
        cfg = OmegaConf.create(read_yaml(run_dir / "config.yaml"))  # a received file: regular, small, no aliases
        # read and checked as a run's (a received config is data like any other); dtype=auto as the run resolved
        # it (float16 on CUDA), not as this machine would: z and the weights are the run's
        spec = RunSpec.from_received(cfg, ran_in=metrics.get("dtype"))
    except ZobenchError as error:  # refused by safe_files (a FIFO, too large, aliases) or not YAML
        reason = str(error).replace(str(run_dir / "config.yaml"), "it")
        raise ZobenchError(f"{run_dir / 'config.yaml'} is not a zobench run's config ({reason})") from None
    except Exception as error:  # YAML, encoding or missing keys: the file is not what a run wrote
        raise ZobenchError(f"{run_dir / 'config.yaml'} is not a zobench run's config "
                           f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    _check_config(run_dir, metrics)
    records = read_trajectory(run_dir)
    done = metrics.get("steps") if isinstance(metrics.get("steps"), int) else 0
    if step is None:  # what the run tested: its best-on-dev step, else its last
        best = metrics.get("best_step")
        step = best if spec.train.keep_best != "none" and isinstance(best, int) and best else max(done, len(records))
    if step < 0 or step > len(records):
        path = run_dir / TRAJECTORY
        raise ZobenchError(f"{path} is missing: zobench-replay rebuilds the weights of step {step} from it"
                           if not path.exists() else
                           f"{path} holds steps 1..{len(records)}, not {step}"
                           + (f": it is short (the run recorded {done} steps)" if len(records) < done else ""))
    out = Path(out) if out else run_dir / f"model-step-{step}"
    _check_out(out)  # before the base model is loaded
    model, tokenizer, saveable = build_model(spec)  # with the run's adapter, as the run built it
    optimizer = build_method(spec, model, ReplayLoss())
    name = spec.method.name
    if optimizer.kind == EVALUATION_ONLY:  # zero-shot, ICL, linear probing
        raise ZobenchError(f"optimizer={name} trains nothing: its model is {spec.model['name']} as loaded")
    if not optimizer.replayable:
        raise ZobenchError(f"optimizer={name} runs cannot be replayed from a trajectory: it takes real "
                           f"gradients; use its saved model (save_model=true) instead")
    check_z_source(optimizer, records[:step], run_dir / TRAJECTORY, "replay the run")
    with torch.no_grad():
        replay(optimizer, records[:step])
    # with PEFT: the adapter alone, as the run's save_model writes it; written in full, then renamed
    write_new_folder(out, lambda folder: (saveable.save_pretrained(folder), tokenizer.save_pretrained(folder)))
    return out


def _check_config(run_dir: Path, metrics: dict) -> None:
    """config.yaml must be the text the run started with (metrics.json keeps its SHA-256): an edited one
    would rebuild other weights without a word."""
    from .errors import ZobenchError
    from .run_dir import text_sha256
    from .safe_files import YAML_LIMIT, read_text

    recorded = metrics.get("config_sha256")
    if not isinstance(recorded, str):
        raise ZobenchError(f"{run_dir / 'metrics.json'} records no config_sha256 (a run of an older zobench, or "
                           f"the file is missing): zobench-replay cannot check that config.yaml is the run's")
    if text_sha256(read_text(run_dir / "config.yaml", YAML_LIMIT)) != recorded:
        raise ZobenchError(f"{run_dir / 'config.yaml'} was edited after the run started (its SHA-256 differs from "
                           f"the config_sha256 in metrics.json): replaying it would build other weights")


def _check_out(out: Path) -> None:
    from .errors import ZobenchError

    if out.exists() or out.is_symlink():
        raise ZobenchError(f"{out} already exists; zobench-replay never writes into an existing folder "
                           f"(a run's model/ holds its tested weights): choose a new --out")


def write_new_folder(out: Path, write) -> None:
    """`write(folder)` into a hidden sibling, renamed to `out` only once complete."""
    import os
    import shutil

    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        write(partial)
        _check_out(out)
        os.rename(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import logging

    from .failures import command

    parser = argparse.ArgumentParser(prog="zobench-replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, default=None, help="replay steps 1..STEP (default: the tested step)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/model-step-STEP)")
    args = parser.parse_args(argv)

    def body() -> None:
        out = replay_run(args.run_dir, args.step, args.out)
        print(f"fine-tuned weights written to {out}")

    from .errors import RefusedInput

    # progress lines (model load, replayed steps) on stderr, for this command's lifetime only
    handler, logger = logging.StreamHandler(sys.stderr), logging.getLogger("zobench")
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return command("zobench-replay", body, refused=(RefusedInput,))  # one line: exit 2 for another z, else 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
