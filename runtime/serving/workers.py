"""The request side's CPU work: a few low-priority worker threads that encode requests and run the
CRM (so the event loop stays free and llama.cpp keeps its cores), and the reporter that tells the
LLM how busy they are."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import threading
import time
from typing import Any

from runtime.errors import OverloadedError

__all__ = ["CpuWorkers", "LoadReporter", "lower_thread_priority"]


#: a request that waited at least this long for a CPU worker, and past its deadline, is refused:
#: overload, not a deadline too short for its own work (that one is answered by the CRM)
_LATE_QUEUE_S = 0.05
_LOAD_INTERVAL_S = 0.1


class LoadReporter:
    """Tells the LLM how busy the request side is, every `_LOAD_INTERVAL_S` from a thread of its
    own: the larger of this process's CPU use (in cores: the event loop's work counts) and the
    share of the time some request ran on or waited for a CPU worker (a starved process uses little
    CPU but keeps requests waiting). The workers' busy share alone, reported at their jobs' ends,
    read as idle whenever the event loop did the work or the workers were starved; the LLM then
    took every core for a batch and the whole request side stalled (4 times in a 20 s overload
    run, 0.3-1.4 s each)."""

    def __init__(self, workers: CpuWorkers, report: Any) -> None:
        self.workers, self.report = workers, report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="corella-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wall, cpu, occupied = time.perf_counter(), time.process_time(), self.workers.occupied_seconds()
        while not self._stop.wait(_LOAD_INTERVAL_S):
            now, used, busy = time.perf_counter(), time.process_time(), self.workers.occupied_seconds()
            elapsed = max(1e-6, now - wall)
            self.report(max((used - cpu) / elapsed, (busy - occupied) / elapsed))
            wall, cpu, occupied = now, used, busy

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class CpuWorkers:
    """The few threads that run request work (encoding, the CRM, store writes): the event loop stays
    free for health checks and answers, and a few threads, not dozens, contend for the GIL.
    Requests beyond wait idle in a queue, urgent ones first (a mode "llm" request, whose answer
    may be a 429 that is only useful at once); `expected_wait` says for how long, so that a request
    that could not be answered in time is refused before it queues."""

    def __init__(self, workers: int, nice: int) -> None:
        self.workers = workers
        self.waiting = [0, 0]  # urgent, other; only the event loop thread changes them
        self.urgent_candidates = 0  # candidates of the urgent jobs not yet started
        self.seconds = 0.002  # smoothed time a job takes
        # seconds between two jobs' ends while jobs queue: the workers, at a low CPU priority, may
        # drain the queue slower than their jobs' own times say
        self.interval = 0.0
        self._last_end: float | None = None  # the previous job's end, when jobs were queued then
        self._lock = threading.Lock()
        self._occupied, self._occupied_from = 0.0, 0.0  # see occupied_seconds
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [threading.Thread(target=self._work, args=(nice,), name=f"corella-cpu-{i}", daemon=True)
                         for i in range(workers)]  # fmt: skip
        for thread in self._threads:
            thread.start()

    def _work(self, nice: int) -> None:
        lower_thread_priority(nice)
        while True:
            _, _, job, loop, future = self._queue.get()
            if job is None:
                return
            try:
                result, error = job(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
                result, error = None, exc
            loop.call_soon_threadsafe(_settle, future, result, error)

    def _account(self, seconds: float) -> None:
        now = time.perf_counter()
        self.seconds = 0.9 * self.seconds + 0.1 * seconds
        with self._lock:
            if self._last_end is not None:
                self.interval = 0.8 * self.interval + 0.2 * (now - self._last_end)
            queued = sum(self.waiting) > self.workers
            self._last_end = now if queued else None
            if not queued:
                self.interval = 0.0

    async def run(self, function: Any, *args: Any, deadline: float | None = None, urgent: bool = False,
                  weight: int = 0) -> Any:  # fmt: skip
        """`function(*args)` on a worker; OverloadedError when the job waited past `deadline` (an
        answer after its deadline helps nobody; a 429 tells the client to come back). `weight`:
        the urgent job's candidates, counted in `urgent_candidates` until it starts."""
        lane = 0 if urgent else 1
        queued = time.perf_counter()
        if not sum(self.waiting):
            self._occupied_from = queued
        self.waiting[lane] += 1
        with self._lock:  # the workers take it back: two threads change it
            self.urgent_candidates += weight

        def job() -> Any:
            began = time.perf_counter()
            with self._lock:
                self.urgent_candidates -= weight
            if deadline is not None and began > deadline and began - queued > _LATE_QUEUE_S:
                raise OverloadedError(f"the server is saturated: the request waited {began - queued:.1f} s for a "
                                      "CPU worker, past its deadline", self.expected_wait())  # fmt: skip
            try:
                return function(*args)
            finally:
                self._account(time.perf_counter() - began)

        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((lane, next(self._order), job, loop, future))
        try:
            return await future
        finally:
            self.waiting[lane] -= 1
            if not sum(self.waiting):
                self._occupied += time.perf_counter() - self._occupied_from

    def occupied_seconds(self) -> float:
        """Seconds so far during which some request was running on or waiting for a worker: the
        request side's demand for CPU, which a starved process does not lose (its CPU use does)."""
        ongoing = time.perf_counter() - self._occupied_from if sum(self.waiting) else 0.0
        return self._occupied + ongoing

    def expected_wait(self, urgent: bool = False) -> float:
        ahead = self.waiting[0] if urgent else sum(self.waiting)
        return ahead * max(self.seconds / self.workers, self.interval)

    def refuse_if_late(self, deadline: float | None, urgent: bool = False) -> None:
        """OverloadedError when the queue ahead alone outlasts the deadline (the request would wait for nothing)."""
        wait = self.expected_wait(urgent)
        if deadline is not None and wait > _LATE_QUEUE_S and time.perf_counter() + wait > deadline:
            raise OverloadedError(f"the server is saturated ({sum(self.waiting)} requests waiting for a CPU "
                                  f"worker); retry in {wait:.1f} s", wait)  # fmt: skip

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put((2, next(self._order), None, None, None))
        for thread in self._threads:
            thread.join(timeout=30)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's niceness to `nice` (Linux: per thread; threads it starts inherit it)."""
    if not nice or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
