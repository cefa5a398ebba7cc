"""Linear probing, `optimizer=lp` (MeZO Table 1, "LP").

MeZO (large_models/trainer.py ~228-298; paper App. E.4): the features are the hidden states the LM head reads
at the positions that predict the answer's tokens, the probe is scikit-learn's LogisticRegressionCV
(`multi_class="multinomial"`, 5000 iterations, tol 1e-4, no intercept for OPT, random_state 0, the default
grid of 10 C values chosen by 5-fold accuracy). Here the feature is the prompt's last-token state and the
class is the candidate index: for candidates of one token each (the label words Yes/No/Maybe, great/terrible
are single GPT-2 BPE tokens, OPT's tokenizer; not checked here, its files are not offline) these are MeZO's
rows and classes, relabelled (the fit does not depend on labels). Longer label words get a warning.

Regularisation as MeZO's: a "multinomial" fit of two classes is a softmax over two weight rows w0, w1, both
penalised, so at the optimum w1 = -w0 = d/2 and the objective is binary logistic regression on d = w1 - w0
with C doubled (sum CE + |d|^2 / (4C)). scikit-learn >= 1.8 has no multi_class and fits two classes as
binary, so the probe searches the doubled grid; `C` reports MeZO's value. With three classes or more
scikit-learn's lbfgs fit is multinomial already.

Scoring after probing: MeZO writes the probe into the LM head rows of the label words and scores the
candidates with the LM (mean log-prob over the whole vocabulary). For one-token candidates the shared
softmax normaliser cancels in the argmax, so its prediction is the probe's argmax: zobench scores with the
probe itself (accuracy, and the probe's cross-entropy as the dev loss). The rows MeZO writes, [-coef/2,
coef/2] for two classes, would change only the loss's scale. OPT ties the LM head to the input embeddings,
so MeZO's write also rewrites the label words' *input* embeddings: a test prompt that contains a label
word (" great" in an SST-2 review, " Yes" in a passage) reaches the probe through other features than it
was fitted on. That side effect is MeZO's, not linear probing's; zobench leaves the model untouched and
scores the probe as fitted (a difference on those prompts only).

Multiple-choice and generation tasks: MeZO tuned the LM head instead (`optimizer=head_tuning`,
zobench/optim/head_tuning.py).

The model never changes. The feature passes over the training sample are the run's training cost
(forward passes, tokens, train seconds); those over dev and test are counted as evaluation.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..encoding import EncodedExample
from ..errors import ZobenchError
from ..metrics import accuracy
from .base import Optimizer
from .zero_shot import ZeroShot

log = logging.getLogger(__name__)


# LogisticRegressionCV's default grid (Cs=10), the one MeZO searched
MEZO_CS = np.logspace(-4, 4, 10)


class LinearProbe(ZeroShot):
    """Takes no step (the runner's evaluate-only path); fits a logistic regression on frozen features."""

    @dataclass(frozen=True)
    class Settings:
        cv: int  # folds of the cross-validation that chooses C
        max_iter: int
        tol: float
        fit_intercept: bool

    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, settings, seed=seed, total_steps=total_steps, precision=precision)
        self.seed = int(seed)
        self.folds, self.max_iter, self.tol = settings.cv, settings.max_iter, settings.tol
        self.fit_intercept = settings.fit_intercept
        self.classifier = None
        self.C = None  # the chosen inverse regularisation, in MeZO's (multinomial) units

    @classmethod
    def check_run(cls, name: str, task: dict[str, Any], icl_k: int, peft: str) -> None:
        Optimizer.check_run(name, task, icl_k, peft)  # no demonstrations, as after training
        super().check_run(name, task, icl_k, peft)  # no adapter
        if task["kind"] != "classification":
            raise ZobenchError(f"optimizer=lp probes classification tasks only; task '{task['name']}' is of kind "
                               f"{task['kind']} (MeZO tuned the LM head for those: optimizer=head_tuning)")

    def fit_evaluator(self, objective, train, pad_id: int, batch_size: int, device) -> "ProbeEvaluator":
        """The probe fitted on the training examples' features: those passes and seconds are the run's
        training cost."""
        return ProbeEvaluator(self, objective, pad_id, batch_size, device).fit(train)

    def training_order(self, n: int) -> list[int]:
        """The order the training rows are fitted in. MeZO (trainer.py ~246) extracts them by iterating HF
        Trainer's train dataloader (a RandomSampler: shuffled), and LogisticRegressionCV's stratified folds
        follow row order, so its folds are a shuffled split. Here: the first epoch of the run's seed as the
        trained methods draw it (Optimizer.batches); MeZO's own permutation (a torch generator seeded from
        the global RNG) is not reproduced."""
        return np.random.RandomState(self.seed).permutation(n).tolist()

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "LinearProbe":
        from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

        classes, counts = np.unique(labels, return_counts=True)
        if len(classes) < 2:
            raise ZobenchError("linear probing needs training examples of at least two classes; raise data.n_train")
        folds = min(self.folds, int(counts.min()))  # each fold must see every class
        # Two classes: MeZO's multinomial objective is binary logistic regression with C doubled (module doc).
        scale = 2.0 if len(classes) == 2 else 1.0
        settings = dict(max_iter=self.max_iter, tol=self.tol, fit_intercept=self.fit_intercept, random_state=0)
        # C is chosen by cross-validated accuracy, as in MeZO (scikit-learn's default then, named here
        # because that default is changing).
        classifier = LogisticRegressionCV(Cs=list(MEZO_CS * scale), cv=folds, scoring="accuracy", **settings) \
            if folds >= 2 else LogisticRegression(C=scale, **settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # notices about fitted attributes the probe never reads
            self.classifier = classifier.fit(features, labels)
        chosen = self.classifier.C_[0] if folds >= 2 else self.classifier.C
        self.C = float(chosen) / scale
        log.info("linear probe: %d classes, C = %.4g in MeZO's units (%s)", len(classes), self.C,
                 f"chosen by {folds}-fold accuracy" if folds >= 2 else "too few examples to cross-validate")
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
        if any(n > 1 for example in train for n in example.option_lens):
            log.warning("a label word is several tokens long: MeZO's probe would fit one row per answer token "
                        "(token ids as classes) and score with the LM; zobench's probe over candidates differs")
        shuffled = [train[i] for i in self.probe.training_order(len(train))]  # MeZO's folds: shuffled order
        self.probe.fit(self.features(shuffled), np.array([e.train_index for e in shuffled]))
        return self

    def __call__(self, examples: Sequence[EncodedExample]) -> dict[str, Any]:
        if not examples:
            return {"metric": None, "loss": None}
        return self.probe.score(self.features(examples), [e.gold for e in examples])
