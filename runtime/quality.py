"""Quality metrics in numpy (AUC, LogLoss, accuracy, per-entropy-decile breakdown).

Shared by training's evaluation and the benchmarks, so both report the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.router import LLMCalibration, binary_entropy

__all__ = [
    "auc",
    "log_loss",
    "accuracy",
    "summarize",
    "entropy_deciles",
    "bootstrap_auc_gain",
    "expected_gain",
    "describe_gain",
]

_EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank statistic, ties given their average rank; NaN for one class only."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    # average rank (1-based) over runs of tied scores
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1.0 - _EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float(np.mean((np.asarray(probabilities) >= 0.5) == np.asarray(labels).astype(bool)))


def summarize(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    return {
        "count": int(len(labels)),
        "auc": auc(labels, probabilities),
        "logloss": log_loss(labels, probabilities),
        "acc": accuracy(labels, probabilities),
    }


def entropy_deciles(
    labels: np.ndarray, crm_probabilities: np.ndarray, others: dict[str, np.ndarray] | None = None
) -> list[dict[str, Any]]:
    """Split samples into ten groups by the CRM's entropy, most certain first, and score each.

    `others` maps a model name to its probabilities on the same samples; each group then also
    reports that model's AUC and ACC (the paper's "who wins where" view).
    """
    labels = np.asarray(labels)
    entropy = binary_entropy(crm_probabilities)
    order = np.argsort(entropy, kind="stable")
    rows = []
    for decile, part in enumerate(np.array_split(order, 10)):
        row: dict[str, Any] = {
            "decile": decile + 1,
            "count": int(len(part)),
            "entropy_min": float(entropy[part].min()) if len(part) else float("nan"),
            "entropy_max": float(entropy[part].max()) if len(part) else float("nan"),
            "positive_rate": float(labels[part].mean()) if len(part) else float("nan"),
            "crm_auc": auc(labels[part], crm_probabilities[part]),
            "crm_acc": accuracy(labels[part], crm_probabilities[part]),
        }
        for name, probabilities in (others or {}).items():
            row[f"{name}_auc"] = auc(labels[part], probabilities[part])
            row[f"{name}_acc"] = accuracy(labels[part], probabilities[part])
        rows.append(row)
    return rows


def bootstrap_auc_gain(
    labels: np.ndarray, base: np.ndarray, other: np.ndarray, resamples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """AUC(other) - AUC(base) on the same rows, and its 95% percentile interval from `resamples`
    paired bootstrap resamples of the rows (both models always scored on the same resample)."""
    labels = np.asarray(labels)
    base, other = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(resamples):
        rows = rng.integers(0, len(labels), size=len(labels))
        gain = auc(labels[rows], other[rows]) - auc(labels[rows], base[rows])
        if gain == gain:  # a resample with one class only has no AUC
            gains.append(gain)
    low, high = np.percentile(gains, [2.5, 97.5]) if gains else (float("nan"), float("nan"))
    return {"gain": auc(labels, other) - auc(labels, base), "low": float(low), "high": float(high),
            "resamples": len(gains)}  # fmt: skip


def expected_gain(
    labels: np.ndarray,
    crm: np.ndarray,
    routed: np.ndarray,
    scored: np.ndarray,
    llm: np.ndarray,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """What swapping in the calibrated LLM on the routed rows gains over the CRM alone.

    `routed`: the router's mask over all rows; `scored`: indices of the routed rows the LLM scored
    (all or a sample), `llm` its raw P(yes) on them. The Platt map is cross-fitted (each fold
    calibrated on the others), so no answer is judged by a map fitted on it. Measured on the rows the
    router keeps plus the routed rows scored: the hybrid's AUC minus the CRM's with its paired
    bootstrap interval, and both LogLosses."""
    labels, crm = np.asarray(labels), np.asarray(crm, dtype=np.float64)
    scored, llm = np.asarray(scored, dtype=np.int64), np.asarray(llm, dtype=np.float64)
    calibrated = np.empty(len(scored))
    parts = np.array_split(np.random.default_rng(seed).permutation(len(scored)), max(2, min(folds, len(scored))))
    for part in parts:
        rest = np.setdiff1d(np.arange(len(scored)), part)
        calibrated[part] = LLMCalibration.fit(llm[rest], labels[scored][rest]).apply(llm[part])
    rows = np.concatenate([np.flatnonzero(~np.asarray(routed, dtype=bool)), scored])
    hybrid = crm.copy()
    hybrid[scored] = calibrated
    gain = bootstrap_auc_gain(labels[rows], crm[rows], hybrid[rows], seed=seed)
    return {
        "auc_gain": gain["gain"], "low": gain["low"], "high": gain["high"], "interval": "95%, paired bootstrap",
        "rows": int(len(rows)), "routed_scored": int(len(scored)),
        "logloss_crm": log_loss(labels[rows], crm[rows]), "logloss_hybrid": log_loss(labels[rows], hybrid[rows]),
        "routed_crm_auc": auc(labels[scored], crm[scored]), "routed_llm_auc": auc(labels[scored], llm),
        "calibration": f"{len(parts)}-fold cross-fitted Platt map",
    }  # fmt: skip


def describe_gain(gain: dict[str, Any]) -> str:
    """One line: the AUC gain with its interval, and whether it is measurable."""
    text = (f"AUC {gain['auc_gain']:+.4f} (95% {gain['low']:+.4f} to {gain['high']:+.4f}) over "
            f"{gain['rows']} validation samples, {gain['routed_scored']} of them routed")  # fmt: skip
    if not gain["low"] > 0:
        text += "; the interval includes 0: nothing measurable"
    return text
