"""optimizer=zero_shot: the model as loaded, no training (MeZO's zero-shot row; with icl.k > 0 its ICL row).

The runner skips the training loop for an optimizer whose `trains` is False and evaluates on dev and
test; evaluation's forward passes are counted as in any run, training's are 0.
"""

from __future__ import annotations


class ZeroShot:
    trains = False  # the runner's cue: evaluate only
    zeroth_order = False
    replayable = False

    def __init__(self, model, loss_fn, cfg, *, seed: int, total_steps: int, precision=None):
        self.model, self.loss_fn, self.cfg = model, loss_fn, cfg

    def step(self, batch) -> float:
        raise RuntimeError("optimizer=zero_shot takes no training step")

    def state_dict(self) -> dict:
        return {}
