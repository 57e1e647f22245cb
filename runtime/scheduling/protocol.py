"""What a scheduler offers the engine, whichever process decodes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from runtime.scheduling.admission import WorkEstimate
from runtime.scheduling.config import SchedulerSettings
from runtime.scheduling.jobs import Admission, JobHandle

__all__ = ["Scheduler", "SchedulerObserver"]


class SchedulerObserver:
    """Where a scheduler reports what it does (the server's Prometheus metrics); no-ops here."""

    def batch(self, tokens: int, sequences: int, seconds: float) -> None: ...

    def job_finished(self, queued_s: float, decoding_s: float) -> None: ...

    def prefix_lookup(self, hit: bool) -> None: ...

    def dropped(self, reason: str, count: int) -> None: ...


@runtime_checkable
class Scheduler(Protocol):
    """The LLM scheduler as the engine uses it: `LLMScheduler` (decode loops in this process) and
    `RemoteScheduler` (in a child process) both are one.

    `alive` is False from the moment the decode loops cannot answer (a crash, a dead process); every
    job then in flight is failed at once, and `submit` raises LLMError until it is alive again."""

    settings: SchedulerSettings
    estimate: WorkEstimate
    gpu_layers: int

    @property
    def alive(self) -> bool: ...

    @property
    def failure(self) -> str | None: ...

    def submit(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], deadline: float | None = None,
               user: str | None = None, arrived: float | None = None) -> Admission: ...  # fmt: skip

    def collect(self, job: JobHandle) -> tuple[np.ndarray, np.ndarray]: ...

    def saturated(self, deadline: float | None, delay: float = 0.0, candidates: int = 1, ahead: int = 0,
                  user: str | None = None) -> float | None: ...  # fmt: skip

    def retry_after(self) -> float: ...

    def queued_candidates(self) -> int: ...

    def report_host_load(self, load: float) -> None: ...

    def invalidate_user(self, user: str) -> int: ...

    def cached_prefixes(self) -> int: ...

    def prefix_host_bytes(self) -> int: ...

    def stats(self) -> dict[str, float]: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def close(self) -> None: ...
