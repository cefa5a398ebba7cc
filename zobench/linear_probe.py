"""Linear probing, `optimizer=lp` (MeZO Table 1, "LP").

MeZO (paper App. E.4: "we take the output feature and use scipy package to train a linear classifier";
medium_models/src/linearhead_trainer.py): the feature of an example is the hidden state the LM head reads
at the position that predicts the answer, i.e. the last token of the prompt; the probe is scikit-learn's
LogisticRegressionCV (5000 iterations, tol 1e-4, no intercept for OPT, random_state 0). The probe's
class is the candidate index, so dev and test are scored with the task's own accuracy. Classification
tasks only: for multiple-choice and generation tasks MeZO tuned the LM head instead ("head-tuning").

The model never changes. The feature passes over the training sample are the run's training cost
(forward passes, tokens, train seconds); those over dev and test are counted as evaluation.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from .encoding import EncodedExample
from .errors import ZobenchError
from .metrics import accuracy
from .optim.zero_shot import ZeroShot


def check_task(task: dict[str, Any]) -> None:
    if task["kind"] != "classification":
        raise ZobenchError(f"optimizer=lp probes classification tasks only; task '{task['name']}' is of kind "
                           f"{task['kind']} (MeZO tuned the LM head for those instead)")


class LinearProbe(ZeroShot):
    """Takes no step (the runner's evaluate-only path); fits a logistic regression on frozen features."""

    def __init__(self, model, loss_fn, cfg, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, cfg, seed=seed, total_steps=total_steps, precision=precision)
        self.folds = int(cfg.get("cv", 5))
        self.max_iter = int(cfg.get("max_iter", 5000))
        self.tol = float(cfg.get("tol", 1e-4))
        self.fit_intercept = bool(cfg.get("fit_intercept", False))
        self.classifier = None

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "LinearProbe":
        from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

        classes, counts = np.unique(labels, return_counts=True)
        if len(classes) < 2:
            raise ZobenchError("linear probing needs training examples of at least two classes; raise data.n_train")
        folds = min(self.folds, int(counts.min()))  # each fold must see every class
        settings = dict(max_iter=self.max_iter, tol=self.tol, fit_intercept=self.fit_intercept, random_state=0)
        # C is chosen by cross-validated accuracy, as in MeZO (scikit-learn's default then, named here
        # because that default is changing).
        classifier = LogisticRegressionCV(cv=folds, scoring="accuracy", **settings) if folds >= 2 \
            else LogisticRegression(**settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # notices about fitted attributes the probe never reads
            self.classifier = classifier.fit(features, labels)
        return self

    def score(self, features: np.ndarray, golds: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Accuracy of the probe's predictions, and its cross-entropy on the (first) gold class."""
        predictions = [int(p) for p in self.classifier.predict(features)]
        probabilities = self.classifier.predict_proba(features)
        column = {int(c): i for i, c in enumerate(self.classifier.classes_)}
        gold_probabilities = [probabilities[row, column[g[0]]] if g and g[0] in column else 0.0
                              for row, g in enumerate(golds)]
        loss = -sum(math.log(max(p, 1e-15)) for p in gold_probabilities) / max(len(golds), 1)
        value = accuracy(predictions, golds)
        return {"metric": value, "accuracy": value, "loss": loss, "predictions": predictions}


@torch.inference_mode()
def prompt_features(objective, examples: Sequence[EncodedExample], pad_id: int, batch_size: int,
                    device=None) -> np.ndarray:
    """[N, hidden] float32: each prompt's last-token final hidden state (one forward pass per batch)."""
    model = objective.model
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in range(0, len(examples), batch_size):
            prompts = [e.prompt_ids for e in examples[start: start + batch_size]]
            width = max(len(ids) for ids in prompts)
            input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, ids in enumerate(prompts):  # right padding: the last real token is at len - 1
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
            hidden = objective.final_hidden(input_ids.to(device), attention.to(device))
            last = torch.tensor([len(ids) - 1 for ids in prompts], device=hidden.device)
            rows.append(hidden[torch.arange(len(prompts), device=hidden.device), last].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows).numpy()


class ProbeEvaluator:
    """Scores examples with the fitted probe; called as the runner's evaluator is."""

    def __init__(self, probe: LinearProbe, objective, pad_id: int, batch_size: int, device=None):
        self.probe, self.objective = probe, objective
        self.pad_id, self.batch_size, self.device = pad_id, batch_size, device

    def features(self, examples: Sequence[EncodedExample]) -> np.ndarray:
        return prompt_features(self.objective, examples, self.pad_id, self.batch_size, self.device)

    def fit(self, train: Sequence[EncodedExample]) -> "ProbeEvaluator":
        self.probe.fit(self.features(train), np.array([e.train_index for e in train]))
        return self

    def __call__(self, examples: Sequence[EncodedExample]) -> dict[str, Any]:
        if not examples:
            return {"metric": None, "loss": None}
        return self.probe.score(self.features(examples), [e.gold for e in examples])
