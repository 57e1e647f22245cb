"""What the server's process and the LLM process say to each other: one dataclass per message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Cancel", "Close", "Crashed", "JobUpdate", "LoadFailed", "Observed", "Query", "Ready", "Reply", "Submit"]


# ---------------------------------------------------------------------------- to the LLM process
@dataclass(frozen=True)
class Submit:
    call: int
    prefix: list[int]
    suffixes: list[list[int]]
    deadline: float | None
    user: str | None
    arrived: float | None


@dataclass(frozen=True)
class Cancel:
    call: int  # the Submit's


@dataclass(frozen=True)
class Query:
    """A call answered by a Reply: invalidate, cached, stats, pause, resume."""

    call: int
    name: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Close:
    pass


# ---------------------------------------------------------------------------- from the LLM process
@dataclass(frozen=True)
class Ready:
    gpu_layers: int
    cache_tokens: int


@dataclass(frozen=True)
class LoadFailed:
    reason: str


@dataclass(frozen=True)
class Reply:
    call: int
    value: Any = None
    error: str | None = None  # an LLMError's message


@dataclass(frozen=True)
class JobUpdate:
    """A job's answers so far (copies); `done`: the job is finished in the LLM process."""

    call: int
    p: np.ndarray
    state: np.ndarray
    error: str | None
    first_planned: float | None
    finished: float | None
    done: bool


@dataclass(frozen=True)
class Observed:
    """A `SchedulerObserver` report."""

    method: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Crashed:
    """The scheduler stopped on a failure; the process exits after this message."""

    reason: str
