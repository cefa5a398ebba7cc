"""Metrics: accuracy over candidates, and SQuAD-style token F1 / exact match over gold answers.

Answer normalisation as MeZO's large_models/metrics.py (the SQuAD v1.1 rule): lower case, drop
punctuation, drop the articles a/an/the, collapse whitespace. An example scores the max over its golds,
except that F1 is exact match against the first gold alone when that gold is "no answer" / "CANNOTANSWER"
(MeZO metrics.py calculate_metric, "f1" branch; exact match itself has no such exception there).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
NO_ANSWER = ("CANNOTANSWER", "no answer")  # MeZO metrics.py: golds that only an exact match can score


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_over_golds(score, prediction: str, golds: Sequence[str]) -> float:
    return max((score(prediction, gold) for gold in golds), default=0.0)


def example_f1(prediction: str, golds: Sequence[str]) -> float:
    if golds and golds[0] in NO_ANSWER:
        return exact_match(prediction, golds[0])
    return best_over_golds(token_f1, prediction, golds)


def generation_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    n = max(len(predictions), 1)
    return {
        "f1": sum(example_f1(p, g) for p, g in zip(predictions, golds)) / n,
        "em": sum(best_over_golds(exact_match, p, g) for p, g in zip(predictions, golds)) / n,
    }


def accuracy(predictions: Sequence[int], golds: Sequence[Sequence[int]]) -> float:
    """A prediction is right when it is any of the example's correct candidates (ReCoRD has several)."""
    return sum(p in g for p, g in zip(predictions, golds)) / max(len(predictions), 1)
