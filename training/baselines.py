"""Honest baselines on the project's own split, reported beside every model.

The two-number baseline: logistic regression on (the item's mean training-split rating, shrunk
towards the global mean) and (the user's mean rating over every strictly earlier interaction,
shrunk likewise), fitted on the validation split, scored on the test split. Both numbers are
leak-free for validation and test samples: the training split ends before either begins, and the
user's mean reads only earlier interactions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.features import running_totals
from runtime.quality import summarize
from training.data.samples import SampleTable

__all__ = ["LogisticRegression", "two_number_features", "two_number_baseline"]


class LogisticRegression:
    """Unregularized (or L2) logistic regression by Newton's method; numpy only."""

    def __init__(self, l2: float = 1e-6, iterations: int = 50) -> None:
        self.l2, self.iterations = l2, iterations
        self.weights: np.ndarray | None = None

    @staticmethod
    def _design(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.c_[np.ones(len(x)), x.reshape(len(x), -1)]

    def fit(self, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
        design, y = self._design(x), np.asarray(y, dtype=np.float64)
        w = np.zeros(design.shape[1])
        ridge = self.l2 * np.eye(len(w))
        ridge[0, 0] = 0.0
        for _ in range(self.iterations):
            p = 1.0 / (1.0 + np.exp(-design @ w))
            gradient = design.T @ (p - y) + ridge @ w
            hessian = (design * (p * (1 - p))[:, None]).T @ design + ridge
            step = np.linalg.solve(hessian + 1e-9 * np.eye(len(w)), gradient)
            w -= step
            if np.max(np.abs(step)) < 1e-10:
                break
        self.weights = w
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.weights is None:
            raise RuntimeError("fit the model first")
        return 1.0 / (1.0 + np.exp(-self._design(x) @ self.weights))


def two_number_features(samples: SampleTable, rows: np.ndarray, prior: float = 10.0) -> np.ndarray:
    """prior > 0.
    [len(rows), 2]: the item's shrunk training-split mean rating, the user's shrunk running mean."""
    train = samples.indices("train")
    global_mean = float(samples.rating[train].mean())
    item_mean = np.array([
        (stats[0] * stats[1] + prior * global_mean) / (stats[1] + prior)
        if (stats := samples.item_stats.get(str(item))) else global_mean
        for item in samples.item[rows]
    ])  # fmt: skip
    user_totals = running_totals(samples.user_code, samples.timestamp, samples.rating, samples.raw.like_threshold)
    count, rating_sum = user_totals[rows, 0], user_totals[rows, 1]
    user_mean = (rating_sum + prior * global_mean) / (count + prior)
    return np.c_[item_mean, user_mean]


def two_number_baseline(samples: SampleTable, prior: float = 10.0) -> dict[str, Any]:
    """Fit on the validation split, score the test split: figures and the test probabilities."""
    valid, test = samples.indices("valid"), samples.indices("test")
    model = LogisticRegression().fit(two_number_features(samples, valid, prior), samples.label[valid])
    probabilities = model.predict(two_number_features(samples, test, prior))
    assert model.weights is not None
    return {
        "name": "two-number logistic baseline",
        "weights": [float(w) for w in model.weights],
        "prior": prior,
        "test": summarize(samples.label[test], probabilities),
        "probabilities": probabilities,
    }
