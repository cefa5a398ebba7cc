"""Early stopping on dev evaluations, for any optimizer (`train.early_stop` in conf/config.yaml).

The rule is AdaMeZO's (shawnnn3di/AdaMeZO, MeZO/large_models/trainer.py ~503-516 and ~588-597): every
`interval` steps, and once before the first step, the dev loss is evaluated; an evaluation that is no
better than the best so far (strictly worse: `eval_loss > min(history)`) counts one, any other resets the
count; training stops once the count reaches `patience` (the authors: `tolerance > 5`, i.e. 6).
Differences from the authors' loop, both small: their check runs at the start of an epoch (1000 examples
/ batch 16 = every 63 steps), so their runs train up to one more epoch after the sixth bad evaluation;
zobench stops right after it. The authors' evaluations pick no kept weights (their trainer saves no
checkpoint: `control.should_save = False`), so their test sees the weights of the stop; zobench's own
selection (train.select_by / keep_best) runs on the regular train.eval_interval evaluations and on the
evaluation of the step where a run stops, as it does at train.steps.

With `interval: null` the stopper counts the regular evaluations instead (no extra ones). With `patience: null`
and an interval, the extra evaluations still run (a finer dev curve for the report's speed table) and never stop.
Its state is plain Python numbers, saved in the job state of each checkpoint.
"""

from __future__ import annotations

from typing import Any

from .errors import ZobenchError

METRICS = ("loss", "metric")


class EarlyStopping:
    def __init__(self, patience: int | None = None, interval: int | None = None, metric: str = "loss"):
        self.patience, self.interval, self.metric = patience, interval, metric
        self.best: float | None = None  # the best score so far (lower is better: loss, or −metric)
        self.best_step: int | None = None
        self.bad_evaluations = 0  # evaluations in a row without a new best
        self.stopped_at: int | None = None

    @classmethod
    def from_config(cls, spec, has_dev: bool) -> "EarlyStopping":
        spec = dict(spec or {})
        patience, interval, metric = spec.get("patience"), spec.get("interval"), spec.get("metric", "loss")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ZobenchError(f"train.early_stop.patience must be an integer >= 1 or null (never stop early), "
                               f"got {patience!r}")
        if interval is not None and (not isinstance(interval, int) or interval < 1):
            raise ZobenchError(f"train.early_stop.interval must be an integer >= 1 or null (count the "
                               f"train.eval_interval evaluations), got {interval!r}")
        if metric not in METRICS:
            raise ZobenchError(f"train.early_stop.metric must be loss or metric, got {metric!r}")
        if (patience is not None or interval is not None) and not has_dev:
            raise ZobenchError("train.early_stop needs dev examples to evaluate: set data.n_dev > 0 "
                               "or train.early_stop.patience=null train.early_stop.interval=null")
        return cls(patience, interval, metric)

    @classmethod
    def from_spec(cls, spec, has_dev: bool) -> "EarlyStopping":
        """From the run spec's train.early_stop (spec.EarlyStopSpec): no dev examples, no early stop."""
        return cls.from_config(vars(spec), has_dev)

    @property
    def enabled(self) -> bool:
        return self.patience is not None

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def due(self, step: int, regular: bool) -> bool:
        """Whether the dev evaluation at `step` (0: before the first step) feeds the stopper; `regular`
        says whether the run evaluates there anyway (train.eval_interval, the last step)."""
        if self.interval is None:
            return self.enabled and regular and step > 0
        return step % self.interval == 0  # with patience null: evaluations for the curve alone

    def observe(self, step: int, result: dict[str, Any]) -> bool:
        """Count one dev evaluation; True when the run must stop here."""
        value = result["loss"] if self.metric == "loss" else result["metric"]
        if value is None:
            raise ZobenchError(f"train.early_stop.metric={self.metric}: the dev evaluation gave no {self.metric}")
        score = float(value) if self.metric == "loss" else -float(value)
        if self.best is None or score <= self.best:  # ties reset the count, as `>` in trainer.py ~592
            self.best, self.best_step, self.bad_evaluations = score, step, 0
        else:
            self.bad_evaluations += 1
        if self.enabled and self.bad_evaluations >= self.patience:
            self.stopped_at = step
        return self.stopped

    def record(self) -> dict[str, Any]:
        """metrics.json's fields: where and why the run stopped (None, None when it did not)."""
        if not self.stopped:
            return {"stopped_early_at": None, "stop_reason": None}
        best = self.best if self.metric == "loss" else -self.best
        every = f"every {self.interval} steps" if self.interval else "at train.eval_interval"
        return {"stopped_early_at": self.stopped_at,
                "stop_reason": f"{self.bad_evaluations} dev evaluations in a row ({every}) without a better "
                               f"dev {self.metric} than {best:.6g} (step {self.best_step}): "
                               f"train.early_stop.patience={self.patience}"}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evaluations": self.bad_evaluations,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.best, self.best_step = state["best"], state["best_step"]
            self.bad_evaluations, self.stopped_at = state["bad_evaluations"], state["stopped_at"]
