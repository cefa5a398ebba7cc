"""Linear probing equals MeZO's fit: LogisticRegressionCV(multi_class="multinomial", no intercept, default
grid, 5-fold accuracy) as MeZO's large_models/trainer.py (~281-298) calls it with the scikit-learn of its day.

The scikit-learn installed here has no `multi_class`, so MeZO's objective is written out below and solved
with scipy: a softmax over one weight row per class, every row penalised by |W|^2 / (2C)."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy.optimize import minimize
from scipy.special import logsumexp
from sklearn.model_selection import StratifiedKFold

from zobench.optim.linear_probe import MEZO_CS, LinearProbe


def _multinomial_fit(x: np.ndarray, y: np.ndarray, n_classes: int, C: float) -> np.ndarray:
    """MeZO's objective: sum_i -log softmax(W x_i)[y_i] + |W|_F^2 / (2C), minimised by Newton's method
    (exact Hessian: few parameters here) to high precision."""
    d, onehot = x.shape[1], np.eye(n_classes)[y]

    def probabilities(flat):
        logits = x @ flat.reshape(n_classes, d).T
        return np.exp(logits - logsumexp(logits, axis=1, keepdims=True)), logits

    def objective(flat):
        p, logits = probabilities(flat)
        value = -(logits * onehot).sum() + logsumexp(logits, axis=1).sum() + (flat ** 2).sum() / (2 * C)
        return value, ((p - onehot).T @ x).ravel() + flat / C

    def hessian(flat):
        p, _ = probabilities(flat)
        # sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T, plus the penalty's I / C
        curvature = np.einsum("ik,kl->ikl", p, np.eye(n_classes)) - np.einsum("ik,il->ikl", p, p)
        h = np.einsum("ikl,ia,ib->kalb", curvature, x, x).reshape(n_classes * d, n_classes * d)
        return h + np.eye(n_classes * d) / C

    result = minimize(objective, np.zeros(n_classes * d), jac=True, hess=hessian, method="trust-exact",
                      options={"gtol": 1e-10, "maxiter": 1000})
    return result.x.reshape(n_classes, d)


def _predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    if len(w) == 2:  # scikit-learn's multinomial binary: class 1 where w1.x > 0 (coef_ = w1)
        return (x @ w[1] > 0).astype(int)
    return (x @ w.T).argmax(axis=1)


def _mezo_probe(x: np.ndarray, y: np.ndarray, folds: int = 5) -> tuple[float, np.ndarray]:
    """LogisticRegressionCV's procedure with MeZO's objective: per C of the default grid, the mean accuracy
    over StratifiedKFold folds; the first best C; the refit on all data."""
    n_classes = len(np.unique(y))
    splits = list(StratifiedKFold(folds).split(x, y))
    scores = [np.mean([(_predict(_multinomial_fit(x[tr], y[tr], n_classes, C), x[te]) == y[te]).mean()
                       for tr, te in splits]) for C in MEZO_CS]
    best = float(MEZO_CS[int(np.argmax(scores))])
    return best, _multinomial_fit(x, y, n_classes, best)


def _probe() -> LinearProbe:
    settings = LinearProbe.Settings(cv=5, max_iter=20000, tol=1e-7, fit_intercept=False)
    return LinearProbe(None, None, settings, seed=0, total_steps=0)


def _overlapping(n_classes: int, seed: int, n: int = 40, d: int = 4, spread: float = 1.5):
    """Classes that overlap, so the penalty shapes the fit (separable data would drive C to the top)."""
    rng = np.random.RandomState(seed)
    y = np.arange(n) % n_classes
    centres = rng.randn(n_classes, d)
    return centres[y] * spread + rng.randn(n, d), y


def test_binary_probe_is_mezos_multinomial_fit():
    x, y = _overlapping(2, seed=1)
    probe = _probe().fit(x, y)
    C, w = _mezo_probe(x, y)
    assert probe.C == pytest.approx(C) and MEZO_CS[0] < C < MEZO_CS[-1]  # the penalty is in play
    # The binary coefficient is d = w1 - w0 = 2 w1 (MeZO's coef_ is w1); predictions follow.
    np.testing.assert_allclose(probe.classifier.coef_[0], w[1] - w[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w[0], -w[1], rtol=1e-5, atol=1e-8)
    assert probe.classifier.predict(x).tolist() == _predict(w, x).tolist()


def test_binary_probe_differs_from_a_plain_binary_fit_at_the_same_c():
    """The doubling matters: a binary fit at MeZO's C is more regularised than MeZO's fit."""
    from sklearn.linear_model import LogisticRegression

    x, y = _overlapping(2, seed=1)
    probe = _probe().fit(x, y)
    plain = LogisticRegression(C=probe.C, fit_intercept=False, tol=1e-7, max_iter=20000).fit(x, y)
    assert np.abs(plain.coef_[0] - probe.classifier.coef_[0]).max() > 1e-3


def test_three_class_probe_is_mezos_multinomial_fit():
    x, y = _overlapping(3, seed=0, n=60)
    probe = _probe().fit(x, y)
    C, w = _mezo_probe(x, y)
    assert probe.C == pytest.approx(C) and MEZO_CS[0] < C < MEZO_CS[-1]
    np.testing.assert_allclose(probe.classifier.coef_, w, rtol=1e-4, atol=1e-5)
