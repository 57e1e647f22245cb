"""Latency statistics."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["percentile", "latency_summary", "time_calls"]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def latency_summary(seconds: Sequence[float], items_per_call: int = 1) -> dict[str, float]:
    """p50/p95/p99/mean in milliseconds and items per second over the calls."""
    values = np.asarray(seconds, dtype=np.float64)
    total = float(values.sum())
    return {
        "calls": int(len(values)),
        "p50_ms": 1000 * percentile(values, 50),
        "p95_ms": 1000 * percentile(values, 95),
        "p99_ms": 1000 * percentile(values, 99),
        "mean_ms": 1000 * float(values.mean()) if len(values) else float("nan"),
        "per_second": items_per_call * len(values) / total if total > 0 else float("nan"),
    }


def time_calls(
    call: Callable[[], object], iterations: int, warmup: int = 2, budget_s: float | None = None
) -> list[float]:
    """Wall time of `iterations` calls after `warmup` untimed ones; stops early past `budget_s`."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(iterations):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
        if budget_s is not None and time.perf_counter() - started > budget_s and len(times) >= 3:
            break
    return times
