"""The interface every optimizer offers the runner; optimizers know nothing of tasks or data.

An optimizer gets the model, a loss closure (batch -> scalar loss tensor) and its typed settings (its
`Settings` dataclass, read from conf/optimizer/<name>.yaml by optim/settings.py, where they are checked);
`step(batch)` does one update and returns the loss it logs.
Which examples make up each step's batch is the optimizer's choice too (`batches`), made from the
examples' token lengths only: Addax, say, sends short and long examples different ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import ZobenchError
from ..precision import Precision

LossFn = Callable[[Any], torch.Tensor]
SCHEDULES = ("constant", "linear")
# What a method is, which decides how the runner drives it and how its run is checkpointed.
ZEROTH_ORDER = "zeroth-order"  # steps from loss values alone: a run replays from its trajectory
FIRST_ORDER = "first-order"  # takes real gradients (on some or all examples): checkpoints its weights
EVALUATION_ONLY = "evaluation-only"  # takes no step: the runner evaluates the model as the method leaves it
KINDS = (ZEROTH_ORDER, FIRST_ORDER, EVALUATION_ONLY)


class Optimizer:
    kind = FIRST_ORDER
    # can a step's batch be taken in micro-batches whose gradients add up (train.grad_accumulation > 1)?
    accumulates = False

    @dataclass(frozen=True)
    class Settings:
        lr: float
        schedule: str  # constant | linear (decay to 0 over train.steps)
        weight_decay: float

    @classmethod
    def check_settings(cls, settings, prefix: str) -> None:
        """Rules between settings, or on a choice (optim/settings.py checks types and ranges by name)."""
        if settings.schedule not in SCHEDULES:
            raise ZobenchError(f"{prefix}.schedule must be one of {', '.join(SCHEDULES)}, got {settings.schedule!r:.60}")

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, settings, *, seed: int, total_steps: int,
                 precision: Precision | None = None):
        self.model = model
        # the run's precision policy (zobench/precision.py); without one, zobench's defaults for the weights' dtype
        self.precision = precision or Precision(weights=_weights_dtype(model))
        self.loss_fn = loss_fn
        self.settings = settings
        self.seed = int(seed)
        self.total_steps = int(total_steps)
        self.steps_done = 0
        self.base_lr = settings.lr
        self.schedule = settings.schedule
        self.weight_decay = settings.weight_decay

    @classmethod
    def check_run(cls, name: str, task: dict[str, Any], icl_k: int, peft: str) -> None:
        """Refuses, before anything is loaded, what this method cannot do in a run (`name`: optimizer=NAME)."""
        if icl_k:
            raise ZobenchError(f"icl.k={icl_k} is for optimizer=zero_shot (MeZO's ICL row); optimizer={name} "
                               f"evaluates without demonstrations, as MeZO does after training")

    @property
    def lr(self) -> float:
        """The learning rate of the next step (MeZO: constant; FT baselines: linear decay to 0)."""
        if self.schedule == "linear":
            return self.base_lr * max(0.0, 1.0 - self.steps_done / max(self.total_steps, 1))
        return self.base_lr

    def batches(self, lengths: list[int], batch_size: int, seed: int) -> Iterator[Any]:
        """Endless index lists, one per step; the runner collates each into a batch for `step`.

        A yielded tuple of index lists becomes a tuple of batches. Default: shuffle every epoch
        (HF Trainer's random sampler, as MeZO trains), the last batch of an epoch may be smaller.
        """
        rng = np.random.RandomState(seed)
        while True:
            order = rng.permutation(len(lengths)).tolist()
            for start in range(0, len(order), batch_size):
                yield order[start: start + batch_size]

    def step(self, batch) -> float:
        loss = self._step(batch)
        self.steps_done += 1
        return loss

    def _step(self, batch) -> float:
        raise NotImplementedError

    # -- checkpoints (zobench/checkpoint.py) ------------------------------------------------------
    @property
    def replayable(self) -> bool:
        """Can the run be rebuilt from the loss values each step saw (checkpoint.ReplayLoss)? Yes for
        purely zeroth-order methods; one that takes real gradients checkpoints its weights instead."""
        return self.kind == ZEROTH_ORDER

    def state_dict(self) -> dict[str, Any]:
        """What a resume from saved weights needs besides them; optimizers with more state extend it."""
        state: dict[str, Any] = {"steps_done": self.steps_done}
        engine = getattr(self, "engine", None)
        if engine is not None:
            state["engine_seeds"] = engine.seed_state()
        inner = getattr(self, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            state["torch_optimizer"] = inner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = state["steps_done"]
        if "engine_seeds" in state:
            self.engine.set_seed_state(state["engine_seeds"])
        if "torch_optimizer" in state:
            self.optimizer.load_state_dict(state["torch_optimizer"])


def _weights_dtype(model: torch.nn.Module) -> torch.dtype:
    first = next(model.parameters(), None)
    return first.dtype if first is not None else torch.float32
