"""The entropy router: the CRM's least certain predictions go to the LLM."""

from __future__ import annotations

import numpy as np

from runtime.errors import ConfigError

__all__ = ["binary_entropy", "calibrate_threshold", "route_by_threshold", "route_by_budget"]

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
