"""The scheduler's own side of a job: work items, the contexts' workers, batch plans, and the ledger
that resolves work items and finishes their handles (always under the scheduler's lock)."""

from __future__ import annotations

import contextlib
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.llm import LlamaContext, default_threads
from runtime.scheduling.config import SchedulerSettings
from runtime.scheduling.jobs import ItemState, JobHandle
from runtime.scheduling.prefix_cache import PrefixCache, PrefixEntry
from runtime.scheduling.protocol import SchedulerObserver

__all__ = ["Ledger", "Plan", "WorkItem", "Worker"]


class WorkItem:
    """A job as its scheduler plans it: the prompt, how far it is planned, the prefix it shares."""

    def __init__(self, handle: JobHandle, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                 entry: PrefixEntry, worker: Worker) -> None:  # fmt: skip
        self.handle = handle
        self.key = tuple(prefix)
        self.suffixes = [list(s) for s in suffixes]
        self.entry, self.worker = entry, worker
        self.next = 0  # first item not yet planned into a batch
        self.inflight = 0
        self.abandoned = False  # the request stopped waiting before every item was resolved
        self.settled = False  # every item resolved, its queue place and prefix given up

    @property
    def size(self) -> int:
        return len(self.suffixes)

    def unplanned_tokens(self) -> int:
        return sum(len(s) for s in self.suffixes[self.next :])


class Worker:
    """One llama.cpp context, its prefix cache, its queue and its loop."""

    def __init__(self, index: int, context: LlamaContext | None, settings: SchedulerSettings,
                 lock: threading.Lock) -> None:  # fmt: skip
        self.index, self.context = index, context
        slots = settings.prefix_slots
        self.cache = PrefixCache(settings.prefix_cache_tokens, range(slots), settings.prefix_host_mib << 20)
        self.suffix_seqs = list(range(slots, slots + settings.max_sequences))
        self.queue: deque[WorkItem] = deque()
        self.speed: dict[int, float] = {}  # seconds per token, measured, by thread count
        self.batch_started: float | None = None
        self.batch_tokens = 0
        self.thread: threading.Thread | None = None
        self.condition = threading.Condition(lock)
        self.failure: str | None = None
        self.threads = self.applied_threads = settings.threads or default_threads()

    @property
    def seconds_per_token(self) -> float:
        """The measured speed at the thread count the next batch decodes with."""
        return self.speed[self.threads]

    @seconds_per_token.setter
    def seconds_per_token(self, value: float) -> None:
        self.speed[self.threads] = value

    def queued_tokens(self) -> int:
        """Tokens of the queued jobs not yet in a batch: their suffixes and unstarted prefix parts."""
        tokens = 0
        seen: set[int] = set()
        for work in self.queue:
            tokens += work.unplanned_tokens()
            entry = work.entry
            if id(entry) not in seen and not entry.ready:
                seen.add(id(entry))
                tokens += len(entry.key) - entry.planned
        return tokens

    def batch_end(self, now: float) -> float:
        """When the batch being decoded is expected to finish (now when idle)."""
        if self.batch_started is None:
            return now
        return max(now, self.batch_started + self.batch_tokens * self.seconds_per_token)

    @staticmethod
    def totals(workers: list[Worker], now: float) -> dict[str, float]:
        """The contexts' queues and caches, summed (the scheduler's `stats`)."""
        backlogs = [w.backlog_seconds(now) for w in workers]
        return {
            "queued_jobs": sum(len(w.queue) for w in workers),
            "cached_prefixes": sum(len(w.cache.entries) for w in workers),
            "cached_prefix_tokens": sum(w.cache.used for w in workers),
            "parked_prefix_bytes": sum(w.cache.host_used for w in workers),
            "restored_prefixes": sum(w.cache.restores for w in workers),
            "backlog_seconds": max(backlogs),
            "backlog_seconds_min": min(backlogs),
            "seconds_per_token": sum(w.seconds_per_token for w in workers) / len(workers),
        }

    def backlog_seconds(self, now: float, margin: float = 1.0) -> float:
        """Seconds until the batch being decoded and the queued work are done (`margin`: the queued
        work's estimate made that much longer)."""
        return self.batch_end(now) - now + self.queued_tokens() * self.seconds_per_token * margin


@dataclass
class Plan:
    """One batch: what to clear, park, restore and decode, and for whom."""

    removals: list[int]
    prefixes: list[tuple[PrefixEntry, tuple[int, ...], int]] = field(default_factory=list)  # entry, tokens, start
    suffixes: list[tuple[WorkItem, int, int]] = field(default_factory=list)  # work, item, sequence
    tokens: int = 0
    completing: set[int] = field(default_factory=set)  # ids of prefixes whose last tokens are in this batch
    deadline: float = math.inf  # the earliest deadline of a job with work in this batch
    parkings: list[PrefixEntry] = field(default_factory=list)  # idle prefixes to move to host memory first
    saved: list[Any] = field(default_factory=list)  # their copies, once made (None: failed)
    restores: list[PrefixEntry] = field(default_factory=list)  # parked prefixes to put back first
    copies: list[tuple[int, int]] = field(default_factory=list)  # (the head's sequence, a new prefix's) first


class Ledger:
    """Work items' bookkeeping: the queued count, and resolving items and finishing handles.
    Every method runs under the scheduler's lock."""

    def __init__(self, observer: SchedulerObserver, clock: Callable[[], float],
                 on_update: Callable[[JobHandle], None] | None) -> None:  # fmt: skip
        self.observer, self.clock = observer, clock
        self.on_update = on_update or (lambda handle: None)
        self.queued = 0  # candidates waiting, all workers

    def drop_late(self, work: WorkItem, reason: str) -> None:
        dropped = work.size - work.next
        self.resolve_unplanned(work, ItemState.EXPIRED)
        if dropped:
            self.observer.dropped(reason, dropped)

    def resolve_unplanned(self, work: WorkItem, state: ItemState) -> None:
        if work.next < work.size:
            work.handle.state[work.next :] = state
            self.queued -= work.size - work.next
            work.next = work.size
        self.finish_if_complete(work, self.clock())

    def finish_if_complete(self, work: WorkItem, now: float) -> None:
        handle = work.handle
        if work.settled or work.next < work.size or work.inflight:
            return
        work.settled = True
        with contextlib.suppress(ValueError):
            work.worker.queue.remove(work)
        work.worker.cache.release(work.entry)
        if handle.done:  # failed earlier, while this batch was decoding
            return
        if handle.first_planned is not None:
            self.observer.job_finished(handle.first_planned - handle.enqueued, now - handle.first_planned)
        handle.finish(now)
        self.on_update(handle)

    def fail(self, work: WorkItem, error: str) -> None:
        """The scheduler stopped: the job ends now, what it had not answered failed. Its items in
        a batch being decoded are forgotten when that batch is recorded."""
        handle = work.handle
        if handle.done:
            return
        handle.error = handle.error or error  # before any waiter can wake
        self.resolve_unplanned(work, ItemState.FAILED)  # finishes it when nothing of it is being decoded
        if handle.done:
            return
        handle.fail_pending(error)
        with contextlib.suppress(ValueError):
            work.worker.queue.remove(work)
        handle.finish(self.clock())
        self.on_update(handle)
