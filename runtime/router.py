"""The entropy router: the CRM's least certain predictions go to the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import ConfigError

__all__ = [
    "binary_entropy",
    "calibrate_threshold",
    "route_by_threshold",
    "route_request",
    "route_by_budget",
    "LLMCalibration",
]

_EPS = 1e-7


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) = -p log p - (1-p) log(1-p), in nats; 0 for a sure prediction, log 2 at p = 0.5."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return -(p * np.log(p) + (1.0 - p) * np.log1p(-p))


def calibrate_threshold(entropy: np.ndarray, fraction: float) -> float:
    """Entropy above which a `fraction` of these (validation) samples lies.

    fraction 0 gives +inf (nothing routed), 1 gives -inf (everything routed).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"llm fraction must lie in [0, 1], got {fraction}")
    if fraction == 0.0:
        return float("inf")
    if fraction == 1.0:
        return float("-inf")
    return float(np.quantile(np.asarray(entropy, dtype=np.float64), 1.0 - fraction))


def route_by_threshold(entropy: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of the samples whose entropy exceeds the calibrated threshold."""
    return np.asarray(entropy) > threshold


def route_request(entropy: np.ndarray, mode: str, fraction: float | None, threshold: float) -> np.ndarray:
    """Boolean mask of a request's candidates that go to the LLM: none (mode crm), all (mode llm),
    the request's own budget of the most uncertain, else those above the calibrated threshold."""
    if mode == "crm":
        return np.zeros(len(entropy), dtype=bool)
    if mode == "llm":
        return np.ones(len(entropy), dtype=bool)
    if fraction is not None:
        return route_by_budget(entropy, fraction)
    return route_by_threshold(entropy, threshold)


def route_by_budget(entropy: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the round(fraction * n) highest-entropy samples of this batch."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"llm fraction must lie in [0, 1], got {fraction}")
    entropy = np.asarray(entropy)
    count = int(round(fraction * len(entropy)))
    mask = np.zeros(len(entropy), dtype=bool)
    if count:
        mask[np.argsort(-entropy, kind="stable")[:count]] = True
    return mask


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class LLMCalibration:
    """Platt scaling of the LLM's P(yes): sigmoid(slope * logit(p) + intercept).

    Fitted on validation samples the router sends to the LLM, so that the probability swapped in
    for the CRM's is on the CRM's scale: a small LLM answers "yes" at nearly the base rate with a
    narrow spread, and swapping that in raw costs LogLoss even where it ranks well. The map is
    monotone, so it changes no ranking within the routed samples; routed samples still take the
    LLM's (calibrated) probability alone. The identity (slope 1, intercept 0) is the paper's raw swap.
    """

    slope: float = 1.0
    intercept: float = 0.0
    samples: int = 0

    @property
    def is_identity(self) -> bool:
        return self.slope == 1.0 and self.intercept == 0.0

    def apply(self, p: np.ndarray) -> np.ndarray:
        if self.is_identity:
            return np.asarray(p, dtype=np.float64)
        z = self.slope * _logit(p) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    @classmethod
    def fit(cls, p: np.ndarray, labels: np.ndarray, l2: float = 1e-3, iterations: int = 100) -> LLMCalibration:
        """Logistic regression of the labels on logit(p), by Newton's method on the standardised
        logit (a small L2 penalty keeps it finite when the samples are separable or all of one
        class). The slope is kept >= 0 so that calibration never reverses the LLM's ranking."""
        y = np.asarray(labels, dtype=np.float64)
        if len(y) < 2 or len(y) != len(p):
            raise ConfigError(f"LLM calibration needs at least 2 (probability, label) pairs, got {len(y)}")
        raw = _logit(p)
        center, scale = float(raw.mean()), float(raw.std())
        rate = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
        base_rate = cls(0.0, float(np.log(rate) - np.log1p(-rate)), len(y))
        if scale < 1e-9:  # the LLM said the same thing every time
            return base_rate
        x = np.stack([(raw - center) / scale, np.ones(len(y))], axis=1)
        w = np.array([0.0, base_rate.intercept])
        penalty = np.diag([l2, 0.0]) * len(y)
        for _ in range(iterations):
            q = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -50, 50)))
            gradient = x.T @ (q - y) + penalty @ w
            hessian = (x * (q * (1 - q))[:, None]).T @ x + penalty + 1e-9 * np.eye(2)
            step = np.linalg.solve(hessian, gradient)
            w = w - step
            if np.abs(step).max() < 1e-10:
                break
        if w[0] <= 0.0:  # no ranking signal on these samples: the best monotone map is the base rate
            return base_rate
        slope = float(w[0] / scale)
        return cls(slope, float(w[1] - slope * center), len(y))

    def to_dict(self) -> dict[str, Any]:
        return {"slope": self.slope, "intercept": self.intercept, "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LLMCalibration:
        if not data:
            return cls()
        try:
            return cls(float(data["slope"]), float(data["intercept"]), int(data.get("samples", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed LLM calibration {data!r}: {exc}") from exc
