"""optimizer=zero_shot: the model as loaded, no training (MeZO's zero-shot row; with icl.k > 0 its ICL row).

An evaluation-only method: the runner skips the training loop and evaluates on dev and test; evaluation's
forward passes are counted as in any run, training's are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ZobenchError
from .base import EVALUATION_ONLY


class ZeroShot:
    kind = EVALUATION_ONLY
    replayable = False

    @dataclass(frozen=True)
    class Settings:
        pass  # the model as loaded: nothing to set

    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        self.model, self.loss_fn, self.settings = model, loss_fn, settings

    @classmethod
    def check_run(cls, name: str, task: dict, icl_k: int, peft: str) -> None:
        """Refuses, before anything is loaded, what this method cannot do in a run (Optimizer.check_run)."""
        if peft != "none":
            raise ZobenchError(f"optimizer={name} trains no adapter: use peft=none")

    def fit_evaluator(self, objective, train, pad_id: int, batch_size: int, device):
        """An evaluator fitted on the training examples, or None: the run's evaluator scores the model as
        loaded, and the run has no training cost."""
        return None

    def step(self, batch) -> float:
        raise RuntimeError("optimizer=zero_shot takes no training step")

    def state_dict(self) -> dict:
        return {}
