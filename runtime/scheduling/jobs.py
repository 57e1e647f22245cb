"""A request's routed work as its caller sees it: the job handle, a future of per-candidate answers.

The handle is the caller's. A scheduler fills its answers and finishes it, always under the lock it
was made with, from one side only: the in-process scheduler from its decode loops, the child-process
scheduler's proxy from the thread that reads the child's messages. What a scheduler needs to plan
the work (the prompt, the next item to decode, the prefix it shares) stays in its own work item.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

__all__ = ["Admission", "ItemState", "JobHandle"]


class ItemState(IntEnum):
    """What became of one routed candidate."""

    PENDING = 0  # queued or being decoded
    DONE = 1  # answered by the LLM
    EXPIRED = 2  # dropped before decoding: its deadline passed or could not be met
    FAILED = 3  # llama.cpp failed on it, or the scheduler stopped
    CANCELLED = 4  # the request stopped waiting


class JobHandle:
    """One request's routed candidates: P(yes) and an `ItemState` for each, filled as batches finish."""

    def __init__(self, size: int, deadline: float | None, user: str | None, enqueued: float,
                 lock: threading.Lock, tag: Any = None) -> None:  # fmt: skip
        self.tag = tag  # the scheduler's name for the job (the child process: the call id)
        self.deadline, self.user, self.enqueued = deadline, user, enqueued
        self.p = np.full(size, np.nan)
        self.state = np.zeros(size, dtype=np.int8)
        self.error: str | None = None
        self.first_planned: float | None = None  # when its first candidate went into a batch
        self.finished: float | None = None
        self.prefix_hit = False
        self.ticket: Any = None  # the scheduler's own record of the job (only it reads this)
        self._event = threading.Event()
        self._lock = lock  # the scheduler's: handles are finished under it
        self._callbacks: list[Callable[[], None]] = []

    @property
    def size(self) -> int:
        return len(self.p)

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Wait without holding a thread: the scheduler wakes the event loop when the job is done."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(True))

        with self._lock:  # handles are finished under this lock: no wake-up is lost
            if self._event.is_set():
                return True
            self._callbacks.append(wake)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return self.done
        return True

    # ------------------------------------------------------------------ the scheduler's side (under its lock)
    def fail_pending(self, error: str, state: ItemState = ItemState.FAILED) -> None:
        """Every candidate not yet resolved takes `state`; `error` is kept unless one is already."""
        self.state[self.state == ItemState.PENDING] = state
        if state == ItemState.FAILED:
            self.error = self.error or error

    def finish(self, finished: float | None) -> None:
        """Done: wake its waiters (once)."""
        if self._event.is_set():
            return
        self.finished = finished
        self._event.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


@dataclass
class Admission:
    """What `submit` took: the first `admitted` suffixes (as `job`); of the rest, those before
    `feasible` were refused for lack of room or time (overloaded), the others could not have been
    answered by the deadline even by an idle LLM (late)."""

    admitted: int
    feasible: int
    job: JobHandle | None = None
