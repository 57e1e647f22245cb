"""How many threads each llama.cpp context decodes with: all of its share of the cores while the
request side (the HTTP server's CPU work) is quiet, `threads_when_busy` while it is busy."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from runtime.llm import default_threads
from runtime.scheduling.config import SchedulerSettings

__all__ = ["ThreadChoice"]

#: a request side busier than this (cores, or share of time holding a worker) makes the contexts
#: decode with fewer threads, until it has stayed below for _QUIET_S: a starved request side reads
#: as quiet for a moment, and an LLM that then took every core starved it for a whole batch (4-10
#: times in a 20 s overload)
_BUSY_LOAD = 0.2
_QUIET_S = 2.0
_LOAD_FRESH_S = 1.0


class ThreadChoice:
    """`load`: how busy the request side is (default: what `report` was last told, for a second)."""

    def __init__(self, settings: SchedulerSettings, clock: Callable[[], float],
                 load: Callable[[], float] | None = None) -> None:  # fmt: skip
        self.idle = settings.threads or default_threads()
        self.busy = settings.threads_when_busy or self.idle
        self.adapts = bool(settings.threads_when_busy)
        self.clock = clock
        self.load = load or self._reported
        self._report = (0.0, -math.inf)  # (load, when reported)
        self._quiet_since: float | None = -math.inf  # since when the request side is quiet; None: busy

    def report(self, load: float) -> None:
        """How busy the request side is (the larger of its CPU use in cores and the share of time
        its requests held a CPU worker): above `_BUSY_LOAD`, each context decodes with the busy
        count, leaving the rest of the cores to the requests. Reported every 0.1 s by the server;
        none for a second (no server) reads as idle."""
        self._report = (load, time.perf_counter())

    def _reported(self) -> float:
        load, stamp = self._report
        return load if time.perf_counter() - stamp < _LOAD_FRESH_S else 0.0

    def choose(self) -> int:
        """The thread count of the next batch."""
        now = self.clock()
        if self.adapts and self.load() > _BUSY_LOAD:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        busy = self._quiet_since is None or now - self._quiet_since < _QUIET_S
        return self.busy if busy else self.idle
