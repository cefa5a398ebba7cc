"""A first-order run's training steps built with zobench's own build functions, for tests/test_distributed_fo.py:
`torchrun --nproc_per_node=2 tests/distributed_fo_worker.py OUT STEPS [OVERRIDES...]` (or plain python: one
process). Writes OUT/losses.json, OUT/weights.safetensors (the whole trained weights, gathered) and
OUT/initial.safetensors (the weights before the first step it took), rank 0.

Extra actions, as overrides-like words before the Hydra overrides:
  +save=K       checkpoint after step K into OUT/run (a RunDir), then go on
  +resume       start from OUT/run's checkpoint instead of step 0
  +save_model   save the trained model as save_model=true does (OUT/model)
  +stale        the stale-parameter check: evaluate, change a root weight, evaluate again (OUT/stale.json)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from zobench.spec import RunSpec
from zobench.build import build_method, build_model, encode_splits, sample_splits
from zobench.configs import compose
from zobench.encoding import collate, collate_indices
from zobench.objective import Objective
from zobench.parallel import world as worlds
from zobench.parallel.first_order import parallelize
from zobench.parallel.sharded_checkpoint import full_weights

QUICK = ["model=opt-tiny", "task.samples=true", "data.n_train=16", "data.n_dev=8", "data.n_test=12",
         "max_length=64", "train.batch_size=4", "device=cpu", "optimizer=adam", "optimizer.lr=1e-3"]


def main(out: Path, steps: int, words: list[str]) -> None:
    actions = [w for w in words if w.startswith("+") and w.split("=")[0] in ("+save", "+resume", "+stale",
                                                                             "+save_model")]
    overrides = [w for w in words if w not in actions]
    spec = RunSpec.from_cfg(compose(QUICK + overrides))
    torch.manual_seed(spec.seed)
    world = worlds.from_env()
    worlds.init_process_group(world, "cpu")
    splits = sample_splits(spec)
    model, tokenizer, _ = build_model(spec, max_length=spec.max_length)
    encoded = encode_splits(spec, splits, tokenizer)
    precision = spec.precision
    parallel = parallelize(model, spec.method.cls, world, spec.parallel, precision)
    objective = Objective(model, loss_dtype=precision.dtype_of(precision.loss_dtype), forward=parallel.forward)
    if "+stale" in actions:
        return stale_check(out, world, model, objective, encoded)
    method = build_method(spec, model, objective)
    parallel.attach(method, spec.train.grad_accumulation)
    lengths = [max(map(len, e.sequences)) for e in encoded.train]
    batches = method.batches(lengths, spec.train.batch_size, spec.seed)
    checkpoints = Checkpoints(out / "run", world, model, method) if any(a.startswith(("+save", "+resume"))
                                                                        for a in actions) else None
    start = checkpoints.resume() if "+resume" in actions else 0
    initial = full_weights(model)
    for _ in range(start):
        next(batches)
    losses, classification = [], spec.task["train_as_classification"]
    save_at = int(next((a.split("=")[1] for a in actions if a.startswith("+save=")), -1))
    for step in range(start + 1, steps + 1):
        batch = collate_indices(next(batches), encoded.train, tokenizer.pad_token_id, classification, "cpu")
        losses.append(method.step(batch))
        if step == save_at:
            checkpoints.save(step)
    weights = full_weights(model)
    if "+save_model" in actions:  # save_model=true's folder, as the runner writes it (rank 0's)
        from zobench.parallel.sharded_checkpoint import save_pretrained

        save_pretrained(model, model, out / "model")
    if world.main:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out / "weights.safetensors"))
        save_file(initial, str(out / "initial.safetensors"))  # where this run's steps started
        (out / "losses.json").write_text(json.dumps(losses))


class Checkpoints:
    """The runner's Checkpointer over a RunDir that rank 0 owns (the other ranks only send and receive)."""

    def __init__(self, path: Path, world, model, method):
        from zobench.checkpoint import Checkpointer
        from zobench.run_dir import RunDir

        self.world, self.path = world, path
        if world.main:
            fresh = not path.exists()
            self.directory = RunDir(path).claim()
            if fresh:
                self.directory.start("{}\n", [])
        else:
            self.directory = None
        self.checkpointer = Checkpointer(self.directory, model, method, True, world=world)

    def follow(self) -> None:
        """Another rank resumes from its own copy of rank 0's folder, as zobench/parallel/launch.py makes one."""
        import shutil
        import tempfile

        from zobench.run_dir import RunDir

        if not self.world.main:
            copy = Path(tempfile.mkdtemp()) / "run"
            shutil.copytree(self.path, copy, ignore=shutil.ignore_patterns("*.lock", ".lock*"))
            self.directory = self.checkpointer.directory = RunDir(copy).claim()

    def save(self, step: int) -> None:
        job = {"metrics": {k: 0 for k in ("steps", "forward_passes", "backward_passes", "tokens",
                                          "eval_forward_passes")},
               "counter": {"forward_passes": 0, "backward_passes": 0, "tokens": 0}, "eval_tokens": 0,
               "best_score": 1.0, "seconds": {"total": 0.0, "train": 0.0}, "recent_losses": []}
        job["metrics"]["steps"] = step
        self.checkpointer.save(step, job)

    def resume(self) -> int:
        from zobench.checkpoint import Checkpointer

        self.follow()
        state = Checkpointer.load_state(self.directory, world=self.world)
        self.checkpointer.restore(state, None, None)
        return state["step"]


def stale_check(out: Path, world, model, objective, encoded) -> None:
    """Evaluate, add 0.5 to the final layer norm's weight as a restore of saved weights does (in place, through
    the parameter the model holds now), evaluate again, take a backward pass, evaluate once more: both later
    losses must see the change (OUT/stale.json)."""
    batch = collate(encoded.dev[:4], 1, True)
    model.eval()
    with torch.no_grad():
        before = float(objective(batch))
        weight = dict(model.named_parameters())["model.decoder.final_layer_norm.weight"]
        (weight.to_local() if hasattr(weight, "to_local") else weight).add_(0.5)
        after = float(objective(batch))
    objective(batch).backward()
    with torch.no_grad():
        after_backward = float(objective(batch))
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stale.json").write_text(json.dumps({"before": before, "after": after,
                                                    "after_backward": after_backward}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
