"""The LLM scheduler: continuous batching of every in-flight request's routed work.

A request's routed work is one `LLMJob`: the user's prefix (instruction + history, as token ids)
and one suffix per routed candidate, most uncertain first. Each llama.cpp context has a loop that,
round after round, takes work from the front of its queue - new prefixes and the suffixes of jobs
whose prefix is ready, from as many requests as the batch holds - and decodes it in one
`llama_decode`, each suffix in a sequence of its own that shares its prefix's KV cells. A job is
answered as soon as its own items are, never after other requests' whole requests.

Prefixes stay cached across requests (LRU over KV cells, keyed by their token ids): a user's next
request decodes only its suffixes. An event for a user drops that user's cached prefixes.

Deadlines count from a request's arrival. Admission estimates when the queue ahead will be done
(the measured seconds per token times the tokens waiting) and admits only the candidates that can
be answered in time, up to a bound on queued candidates; the rest are refused at once, so that
the request is answered by the CRM at CRM speed. Work whose deadline has passed, or that could
not finish before it, is dropped before decoding, never decoded for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from runtime.errors import ConfigError
from runtime.llm import LlamaContext, LlamaModel, LLMError, default_threads

__all__ = [
    "Admission",
    "ItemState",
    "LLMJob",
    "SchedulerSettings",
    "SchedulerObserver",
    "LLMScheduler",
    "WorkEstimate",
    "Pausable",
    "queue_full",
    "saturation",
]

log = logging.getLogger(__name__)

#: decode times are estimated this much above the measured average: a batch that ends a little
#: early costs little, one that ends after its deadline decodes for nobody
_MARGIN = 1.15
#: a request side busier than this (cores, or share of time holding a worker) makes the contexts
#: decode with fewer threads, until it has stayed below for _QUIET_S: a starved request side reads
#: as quiet for a moment, and an LLM that then took every core starved it for a whole batch (4-10
#: times in a 20 s overload)
_BUSY_LOAD = 0.2
_QUIET_S = 2.0
_LOAD_FRESH_S = 1.0


class ItemState(IntEnum):
    """What became of one routed candidate."""

    PENDING = 0  # queued or being decoded
    DONE = 1  # answered by the LLM
    EXPIRED = 2  # dropped before decoding: its deadline passed or could not be met
    FAILED = 3  # llama.cpp failed on it
    CANCELLED = 4  # the request stopped waiting


@dataclass(frozen=True)
class SchedulerSettings:
    contexts: int = 1  # llama.cpp contexts, each with its own loop and KV cache
    threads: int | None = None  # threads per context
    threads_when_busy: int | None = None  # threads per context while the host is busy serving HTTP
    batch_tokens: int = 512  # tokens per llama_decode
    max_sequences: int = 64  # candidate suffixes decoded together
    prefix_cache_tokens: int = 8192  # KV cells kept for prefixes, per context
    prefix_host_mib: int = 512  # host memory for idle prefixes' KV cells, per context (0: keep them in the cache)
    queue_candidates: int = 512  # routed candidates waiting for the LLM, over all contexts
    max_prompt_tokens: int = 4096  # longest prompt (prefix + one suffix) accepted

    def __post_init__(self) -> None:
        # llama.cpp keeps at most 256 sequences, and no more than one batch's worth of outputs
        if not 1 <= self.max_sequences <= min(254, self.batch_tokens - 2):
            raise ConfigError(f"llm max sequences {self.max_sequences} must lie in [1, min(254, batch tokens - 2)]")
        if self.contexts < 1 or self.queue_candidates < 1:
            raise ConfigError("llm contexts and queue candidates must be at least 1")
        if self.prefix_host_mib < 0:
            raise ConfigError(f"llm prefix host memory {self.prefix_host_mib} MiB must not be negative")

    @property
    def prefix_slots(self) -> int:
        """Sequences for cached prefixes: one per 128 cache tokens (the prompts here are 200-300
        tokens), within llama.cpp's limits. llama.cpp reserves a full-vocabulary logits row per
        sequence, so they are not made plentiful for nothing."""
        room = min(256, self.batch_tokens) - self.max_sequences
        return max(2, min(room, self.prefix_cache_tokens // 128))

    @property
    def context_tokens(self) -> int:
        return self.prefix_cache_tokens + self.batch_tokens


@dataclass
class Admission:
    """What `submit` took: the first `admitted` suffixes (as `job`); of the rest, those before
    `feasible` were refused for lack of room or time (overloaded), the others could not have been
    answered by the deadline even by an idle LLM (late)."""

    admitted: int
    feasible: int
    job: LLMJob | None = None


class SchedulerObserver:
    """Where the scheduler reports what it does (the server's Prometheus metrics); no-ops here."""

    def batch(self, tokens: int, sequences: int, seconds: float) -> None: ...

    def job_finished(self, queued_s: float, decoding_s: float) -> None: ...

    def prefix_lookup(self, hit: bool) -> None: ...

    def dropped(self, reason: str, count: int) -> None: ...

    def job_updated(self, job: LLMJob) -> None:
        """Some of the job's items were answered, or the job finished (called under the scheduler's lock)."""


class LLMJob:
    """One request's routed work: a prefix and its candidates' suffixes (most uncertain first)."""

    def __init__(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], deadline: float | None,
                 user: str | None, enqueued: float, tag: Any = None) -> None:  # fmt: skip
        self.tag = tag  # the submitter's name for the job (the LLM process: the server's job id)
        self.prefix = tuple(prefix)
        self.suffixes = [list(s) for s in suffixes]
        self.deadline, self.user, self.enqueued = deadline, user, enqueued
        self.p = np.full(len(self.suffixes), np.nan)
        self.state = np.zeros(len(self.suffixes), dtype=np.int8)
        self.next = 0  # first item not yet planned into a batch
        self.inflight = 0
        self.error: str | None = None
        self.first_planned: float | None = None
        self.finished: float | None = None
        self.prefix_hit = False
        self.abandoned = False  # the request stopped waiting before every item was resolved
        self._event = threading.Event()
        self._lock: threading.Lock | None = None  # the scheduler's
        self._callbacks: list[Callable[[], None]] = []
        self._entry: _PrefixEntry | None = None
        self._worker: _Worker | None = None

    @property
    def size(self) -> int:
        return len(self.suffixes)

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

        self._add_callback(wake)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return self.done
        return True

    def _add_callback(self, callback: Callable[[], None]) -> None:
        with self._lock:  # the scheduler finishes jobs under this lock: no wake-up is lost
            if self._event.is_set():
                callback()
            else:
                self._callbacks.append(callback)

    def _unplanned_tokens(self) -> int:
        return sum(len(s) for s in self.suffixes[self.next :])


class _PrefixEntry:
    def __init__(self, key: tuple[int, ...]) -> None:
        self.key = key
        self.seq: int | None = None  # the KV sequence holding it, once allocated
        self.planned = 0  # tokens put into batches
        self.filled = 0  # tokens decoded
        self.refs = 0  # queued jobs using it
        self.busy = False  # part of the batch being decoded
        self.users: set[str] = set()
        self.stale = False  # dropped from the index; freed once unused
        self.error: str | None = None
        self.saved: ctypes.Array | None = None  # a copy of its decoded cells in host memory

    @property
    def decoded(self) -> bool:
        return self.filled == len(self.key)

    @property
    def ready(self) -> bool:
        """Decoded and in the KV cache (or restored there before the batch it is planned in)."""
        return self.decoded and self.seq is not None

    @property
    def parked(self) -> bool:
        """Decoded, and kept in host memory only: a restore, not a decode, brings it back."""
        return self.decoded and self.seq is None and self.saved is not None


class _PrefixCache:
    """Prefixes by token ids, least recently used first, within a KV-cell and a sequence budget.

    With host memory (`host_bytes`), a prefix no queued job uses leaves the KV cache for a copy in
    host memory (parked), and comes back by a restore, a copy of ~0.6 ms instead of a decode of
    ~0.5-1 s. The KV cache then holds only the prefixes in use: every token decoded attends over
    the cache's occupied cells, and a cache full of idle prefixes made each token ~15-20% slower
    on a CPU (30 cached prefixes against one, Gemma 3 270M, one or two threads)."""

    def __init__(self, capacity_tokens: int, sequences: range, host_bytes: int = 0) -> None:
        self.capacity = capacity_tokens
        self.entries: OrderedDict[tuple[int, ...], _PrefixEntry] = OrderedDict()
        self.free = list(reversed(sequences))
        self.used = 0  # tokens of entries holding a sequence
        self.removals: list[int] = []  # sequences to clear in the KV cache before the next decode
        self.host_capacity = host_bytes
        self.host_used = 0  # bytes of saved copies
        self.parking: list[_PrefixEntry] = []  # idle prefixes to move out of the KV cache before the next decode
        self.restores = 0

    def acquire(self, key: tuple[int, ...], user: str | None) -> tuple[_PrefixEntry, bool]:
        entry = self.entries.get(key)
        hit = entry is not None
        if entry is None:
            entry = self.entries[key] = _PrefixEntry(key)
        self.entries.move_to_end(key)
        entry.refs += 1
        if user is not None:
            entry.users.add(user)
        return entry, hit

    def release(self, entry: _PrefixEntry) -> None:
        entry.refs -= 1
        if entry.refs == 0 and not entry.busy:
            if entry.stale or entry.error or not entry.decoded:
                self._drop(entry)
            elif self.host_capacity and entry.seq is not None:
                self.parking.append(entry)

    def take_parking(self) -> list[_PrefixEntry]:
        """The idle prefixes to park now (marked busy until `parked`)."""
        taken = []
        for entry in self.parking:
            if entry.refs == 0 and not entry.busy and entry.ready and not entry.stale and not entry.error:
                entry.busy = True
                taken.append(entry)
        self.parking = []
        return taken

    def parked(self, entry: _PrefixEntry, saved: ctypes.Array | None) -> None:
        """`entry` left the KV cache; `saved`: its copy (None when the copy failed: it is forgotten)."""
        entry.busy = False
        self.free.append(entry.seq)
        self.used -= len(entry.key)
        entry.seq = None
        if entry.saved is None and saved is not None:
            entry.saved = saved
            self.host_used += ctypes.sizeof(saved)
        if entry.saved is None or entry.stale or entry.error:
            self._drop(entry)
            return
        for victim in list(self.entries.values()):  # least recently used first, this one last
            if self.host_used <= self.host_capacity:
                break
            if victim.parked and victim.refs == 0 and not victim.busy:
                self._drop(victim)

    def allocate(self, entry: _PrefixEntry) -> bool:
        """Give `entry` a sequence and room for its tokens, evicting unused prefixes LRU-first."""
        need = len(entry.key)
        for victim in list(self.entries.values()):
            if self.free and self.used + need <= self.capacity:
                break
            if victim.refs == 0 and not victim.busy and victim.seq is not None:
                self._drop(victim)
        if not self.free or self.used + need > self.capacity:
            return False
        entry.seq = self.free.pop()
        self.used += need
        return True

    def invalidate(self, user: str) -> int:
        dropped = 0
        for entry in [e for e in self.entries.values() if user in e.users]:
            entry.stale = True
            del self.entries[entry.key]
            dropped += 1
            if entry.refs == 0 and not entry.busy:
                self._drop(entry)
        return dropped

    def after_batch(self, entry: _PrefixEntry) -> None:
        entry.busy = False
        if entry.refs == 0 and (entry.stale or entry.error):
            self._drop(entry)
        elif entry.refs == 0 and self.host_capacity and entry.ready:
            self.parking.append(entry)

    def _drop(self, entry: _PrefixEntry) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        if entry.seq is not None:
            self.removals.append(entry.seq)
            self.free.append(entry.seq)
            self.used -= len(entry.key)
            entry.seq = None
        if entry.saved is not None:
            self.host_used -= ctypes.sizeof(entry.saved)
            entry.saved = None


@dataclass
class _Plan:
    removals: list[int]
    prefixes: list[tuple[_PrefixEntry, tuple[int, ...], int]] = field(default_factory=list)  # entry, tokens, start
    suffixes: list[tuple[LLMJob, int, int]] = field(default_factory=list)  # job, item, sequence
    tokens: int = 0
    completing: set[int] = field(default_factory=set)  # ids of prefixes whose last tokens are in this batch
    deadline: float = math.inf  # the earliest deadline of a job with work in this batch
    parkings: list[_PrefixEntry] = field(default_factory=list)  # idle prefixes to move to host memory first
    saved: list[Any] = field(default_factory=list)  # their copies, once made (None: failed)
    restores: list[_PrefixEntry] = field(default_factory=list)  # parked prefixes to put back first


class _Worker:
    """One llama.cpp context, its prefix cache, its queue and its loop."""

    def __init__(self, index: int, context: LlamaContext | None, settings: SchedulerSettings) -> None:
        self.index, self.context = index, context
        slots = settings.prefix_slots
        self.cache = _PrefixCache(settings.prefix_cache_tokens, range(slots), settings.prefix_host_mib << 20)
        self.suffix_seqs = list(range(slots, slots + settings.max_sequences))
        self.queue: deque[LLMJob] = deque()
        self.speed: dict[int, float] = {}  # seconds per token, measured, by thread count
        self.batch_started: float | None = None
        self.batch_tokens = 0
        self.thread: threading.Thread | None = None
        self.condition: threading.Condition | None = None
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
        for job in self.queue:
            tokens += job._unplanned_tokens()
            entry = job._entry
            if entry is not None and id(entry) not in seen and not entry.ready:
                seen.add(id(entry))
                tokens += len(entry.key) - entry.planned
        return tokens

    def batch_end(self, now: float) -> float:
        """When the batch being decoded is expected to finish (now when idle)."""
        if self.batch_started is None:
            return now
        return max(now, self.batch_started + self.batch_tokens * self.seconds_per_token)

    def backlog_seconds(self, now: float) -> float:
        return self.batch_end(now) - now + self.queued_tokens() * self.seconds_per_token


class WorkEstimate:
    """The least a request will cost the LLM, guessed before it is tokenized, so that a mode "llm"
    request the LLM cannot take is refused at arrival, not after its CPU work: its user's prefix,
    unless that user was admitted lately (the prefix is then likely cached), and one suffix, at the
    lengths recently seen."""

    def __init__(self, cache_tokens: int) -> None:
        self.cache_tokens = cache_tokens
        self.prefix_tokens = self.suffix_tokens = 0.0  # smoothed; nothing is guessed before a first request
        self._recent: OrderedDict[str, None] = OrderedDict()  # users admitted lately, oldest first
        self._lock = threading.Lock()

    def seen(self, user: str | None, prefix: int, suffixes: Sequence[int], admitted: bool) -> None:
        with self._lock:
            first = not self.prefix_tokens
            self.prefix_tokens = prefix if first else 0.9 * self.prefix_tokens + 0.1 * prefix
            suffix = sum(suffixes) / max(1, len(suffixes))
            self.suffix_tokens = suffix if first else 0.9 * self.suffix_tokens + 0.1 * suffix
            if admitted and user is not None:
                self._recent[user] = None
                self._recent.move_to_end(user)
                # as many users as the cache holds prefixes of the usual length
                while len(self._recent) > max(2, int(self.cache_tokens / max(1.0, self.prefix_tokens))):
                    self._recent.popitem(last=False)

    def forget(self, user: str) -> None:
        with self._lock:
            self._recent.pop(user, None)

    def tokens(self, user: str | None) -> float:
        with self._lock:
            warm = user is not None and user in self._recent
            return (0.0 if warm else self.prefix_tokens) + self.suffix_tokens


class Pausable:
    """`paused()`: hold the decode loops for a while (maintenance, tests) through `pause`/`resume`."""

    def pause(self) -> None:
        raise NotImplementedError

    def resume(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()


class LLMScheduler(Pausable):
    """Owns the llama.cpp contexts of one model and decodes all requests' routed work in batches.

    `start=False` runs no threads: `step()` then plans and decodes one round on the caller's
    thread (tests drive it with their own `clock`).
    """

    def __init__(self, model: LlamaModel, settings: SchedulerSettings | None = None,
                 observer: SchedulerObserver | None = None, clock: Callable[[], float] = time.perf_counter,
                 start: bool = True) -> None:  # fmt: skip
        self.model = model
        self.settings = settings = settings or SchedulerSettings()
        self.observer = observer or SchedulerObserver()
        self.clock = clock
        self.gpu_layers = model.gpu_layers
        self.alive, self.failure = True, None  # as RemoteScheduler's, whose process may die
        self._host_load = (0.0, -math.inf)  # (how busy the request side is, when reported)
        self._quiet_since: float | None = -math.inf  # since when the request side is quiet; None: busy
        self._lock = threading.Lock()
        self._paused = False
        self._closing = False
        self._queued = 0  # candidates waiting, all workers
        self.estimate = WorkEstimate(settings.prefix_cache_tokens * settings.contexts)
        self.decoded_tokens = 0
        self.decoded_candidates = 0
        self.decodes = 0
        n_seq_max = settings.prefix_slots + settings.max_sequences
        self.workers: list[_Worker] = []
        try:
            for index in range(settings.contexts):
                context = LlamaContext(model, settings.context_tokens, settings.batch_tokens, n_seq_max,
                                       settings.threads)  # fmt: skip
                self.workers.append(_Worker(index, context, settings))
        except LLMError:
            self._close_contexts()
            raise
        for worker in self.workers:
            worker.condition = threading.Condition(self._lock)
            if not start:
                self._warm_up(worker)
                continue
            # each loop warms up its own context: llama.cpp's worker threads belong to the thread
            # that decodes, and the server is ready only once every context has decoded once
            warmed = threading.Event()
            worker.thread = threading.Thread(target=self._loop, args=(worker, warmed), daemon=True,
                                             name=f"llama-{worker.index}")  # fmt: skip
            worker.thread.start()
            warmed.wait()
            if worker.failure:
                self.close()
                raise LLMError(f"llama.cpp context {worker.index} failed its first decode: {worker.failure}")

    # ------------------------------------------------------------------ lifecycle
    def _warm_up(self, worker: _Worker) -> None:
        """One decode before serving: the first request does not pay for it, and admission starts
        from a measured speed instead of a guess."""
        # ordinary ids spread over the vocabulary (the model may have no tokenizer: a cut copy)
        n = self.model.n_vocab
        tokens = [(n // 3 + 7919 * k) % n for k in range(min(64, self.settings.batch_tokens))]
        started = time.perf_counter()
        worker.context.decode(tokens, range(len(tokens)), [0] * len(tokens), [False] * (len(tokens) - 1) + [True])
        measured = max(1e-6, (time.perf_counter() - started) / len(tokens))
        # how many prefix tokens the cache and its host memory hold, for guessing who is cached
        held = self.settings.prefix_cache_tokens
        if self.settings.prefix_host_mib:
            held += (self.settings.prefix_host_mib << 20) * len(tokens) // max(1, worker.context.sequence_bytes(0))
        self.estimate.cache_tokens = held * self.settings.contexts
        # with fewer threads, proportionally slower until a batch says otherwise
        worker.speed = {n: measured * worker.threads / n for n in {worker.threads, self._busy_threads()}}
        worker.context.clear()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            for worker in self.workers:
                worker.condition.notify_all()
                for job in list(worker.queue):
                    job.error = job.error or "the LLM scheduler is shutting down"
                    self._resolve_unplanned(job, ItemState.FAILED)
        for worker in self.workers:
            if worker.thread is not None:
                worker.thread.join(timeout=60)
        self._close_contexts()

    def _close_contexts(self) -> None:
        for worker in self.workers:
            if worker.context is not None:
                worker.context.close()
                worker.context = None

    def pause(self) -> None:
        """Hold every loop after its current batch (maintenance, tests); queued work waits."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            for worker in self.workers:
                worker.condition.notify_all()

    # ------------------------------------------------------------------ admission
    def submit(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], deadline: float | None = None,
               user: str | None = None, tag: Any = None, arrived: float | None = None) -> Admission:  # fmt: skip
        """Queue the suffixes that can be answered by `deadline` (a `clock()` value), most
        uncertain first, within the queue bound. `arrived`: when the request arrived (default now),
        for telling a deadline too short for the work from one spent waiting. Raises LLMError for
        a prompt that cannot fit."""
        settings = self.settings
        longest = max((len(s) for s in suffixes), default=0)
        if not suffixes or longest == 0:
            raise LLMError("a routed candidate has an empty prompt suffix")
        if len(prefix) + longest > settings.max_prompt_tokens or len(prefix) > settings.prefix_cache_tokens:
            raise LLMError(f"prompt of {len(prefix) + longest} tokens exceeds the context of "
                           f"{min(settings.max_prompt_tokens, settings.prefix_cache_tokens)}")  # fmt: skip
        if longest > settings.batch_tokens:
            raise LLMError(f"a candidate suffix of {longest} tokens exceeds the batch of {settings.batch_tokens}")
        key = tuple(prefix)
        with self._lock:
            if self._closing:
                raise LLMError("the LLM scheduler is shutting down")
            now = self.clock()
            worker = self._worker_for(key, now)
            admission = self._admissible(worker, key, suffixes, deadline, now, arrived)
            self.estimate.seen(user, len(prefix), [len(s) for s in suffixes], admission.admitted > 0)
            if admission.admitted == 0:
                return admission
            job = admission.job = LLMJob(prefix, suffixes[: admission.admitted], deadline, user, now, tag)
            job._entry, job.prefix_hit = worker.cache.acquire(key, user)
            job._worker, job._lock = worker, self._lock
            self.observer.prefix_lookup(job.prefix_hit)
            worker.queue.append(job)
            self._queued += job.size
            worker.condition.notify()
            return admission

    def _worker_for(self, key: tuple[int, ...], now: float) -> _Worker:
        for worker in self.workers:
            if key in worker.cache.entries:
                return worker
        return min(self.workers, key=lambda w: w.backlog_seconds(now))

    def _admissible(self, worker: _Worker, key: tuple[int, ...], suffixes: Sequence[Sequence[int]],
                    deadline: float | None, now: float, arrived: float | None) -> Admission:  # fmt: skip
        """How many suffixes fit: the queue bound, and the estimated finish before the deadline; and
        how many of the rest an idle LLM could not have answered by the deadline had it started at
        the request's arrival (those are late; the others, refused for lack of room or time, are
        overloaded).

        The estimate decodes the queued tokens back to back, FIFO, after the batch being decoded:
        the planner cuts each batch where the earliest deadline in it would pass, so a candidate
        that fits by that count is decoded in time, and one that does not is refused now instead
        of waiting for its deadline."""
        room = max(0, self.settings.queue_candidates - self._queued)
        if deadline is None:
            return Admission(min(room, len(suffixes)), len(suffixes))
        spt = worker.seconds_per_token * _MARGIN
        ahead = worker.batch_end(now) - now + worker.queued_tokens() * spt
        cold = key not in worker.cache.entries
        own = len(key) if cold else 0
        start = min(now, arrived) if arrived is not None else now
        admitted = feasible = 0
        for suffix in suffixes:
            own += len(suffix)
            if start + own * spt > deadline:
                break
            feasible += 1
            if admitted == feasible - 1 and admitted < room and now + ahead + own * spt <= deadline:
                admitted += 1
        if cold and admitted < max(1, feasible // 2):
            # a new prefix costs as much as several candidates: under contention it is decoded only
            # for at least half of what it could serve, and the time goes to users already cached
            admitted = 0
        return Admission(admitted, feasible)

    def retry_after(self) -> float:
        """Seconds until the least busy context has worked off its queue (for Retry-After)."""
        with self._lock:
            now = self.clock()
            return min(w.backlog_seconds(now) for w in self.workers)

    def saturated(self, deadline: float | None, delay: float = 0.0, candidates: int = 1, ahead: int = 0,
                  user: str | None = None) -> float | None:  # fmt: skip
        """Seconds until the LLM could take new work, when it cannot take `candidates` of `user`
        that reach it `delay` seconds from now, after `ahead` candidates of other requests: no room
        for them in the queue, or every context's backlog and the request's least work (see
        `WorkEstimate`) outlast `deadline`; None when it can."""
        own = self.estimate.tokens(user)
        with self._lock:
            now = self.clock()
            wait = min(w.backlog_seconds(now) for w in self.workers)
            spt = min(w.seconds_per_token for w in self.workers)
            full = queue_full(self._queued, candidates, ahead, self.settings.queue_candidates)
            return saturation(now, wait, full, deadline, delay, own * spt)

    def queued_candidates(self) -> int:
        return self._queued

    def report_host_load(self, load: float) -> None:
        """How busy the request side is (the larger of its CPU use in cores and the share of time
        its requests held a CPU worker): above `_BUSY_LOAD`, each context decodes with
        `threads_when_busy`, leaving the rest of the cores to the requests. Reported every 0.1 s
        by the server; none for a second (no server) reads as idle."""
        self._host_load = (load, time.perf_counter())

    def host_load(self) -> float:
        load, stamp = self._host_load
        return load if time.perf_counter() - stamp < _LOAD_FRESH_S else 0.0

    # ------------------------------------------------------------------ the request's side
    def collect(self, job: LLMJob) -> tuple[np.ndarray, np.ndarray]:
        """The job's answers so far (P(yes), ItemState); work not yet decoded is cancelled."""
        with self._lock:
            if not job.done:
                job.abandoned = True
                self._resolve_unplanned(job, ItemState.CANCELLED)
            return job.p.copy(), job.state.copy()

    def invalidate_user(self, user: str) -> int:
        """Drop the cached prefixes this user's requests used (their history changed)."""
        self.estimate.forget(user)
        with self._lock:
            return sum(worker.cache.invalidate(user) for worker in self.workers)

    def cached_prefixes(self) -> int:
        with self._lock:
            return sum(len(w.cache.entries) for w in self.workers)

    def prefix_host_bytes(self) -> int:
        """Host memory taken by copies of cached prefixes, all contexts."""
        with self._lock:
            return sum(w.cache.host_used for w in self.workers)

    # ------------------------------------------------------------------ the loop
    def _loop(self, worker: _Worker, warmed: threading.Event) -> None:
        try:
            self._warm_up(worker)
        except LLMError as exc:
            worker.failure = str(exc)
            return
        finally:
            warmed.set()
        while True:
            with self._lock:
                while not self._closing and (self._paused or not worker.queue):
                    worker.condition.wait()
                if self._closing:
                    return
                plan = self._plan(worker)
            if plan is not None:
                self._execute(worker, plan)
            else:
                time.sleep(0.001)  # work is queued but blocked (no KV room yet): let others move

    def step(self, worker_index: int = 0) -> bool:
        """One round on the calling thread: plan and decode. False when there was nothing to do."""
        worker = self.workers[worker_index]
        with self._lock:
            plan = self._plan(worker)
        if plan is None:
            return False
        self._execute(worker, plan)
        return True

    def _plan(self, worker: _Worker) -> _Plan | None:
        """Pick this round's work from the front of the queue (under the lock): prefixes not yet
        decoded and the candidates of every job whose prefix is ready or completes in this batch,
        as many as the batch holds and the earliest deadline among them allows."""
        now = self.clock()
        self._choose_threads(worker)
        plan = _Plan(removals=worker.cache.removals, parkings=worker.cache.take_parking())
        worker.cache.removals = []
        for job in list(worker.queue):
            if plan.tokens >= self.settings.batch_tokens or not worker.suffix_seqs:
                break
            if job.deadline is not None and now >= job.deadline:
                self._drop_late(job, "deadline")
                continue
            entry = job._entry
            if entry.error:
                job.error = entry.error
                self._resolve_unplanned(job, ItemState.FAILED)
                continue
            if entry.ready or id(entry) in plan.completing or self._plan_prefix(worker, job, plan, now):
                self._plan_suffixes(worker, job, plan, now)
        if not plan.prefixes and not plan.suffixes and not plan.restores:
            worker.cache.removals = plan.removals + worker.cache.removals
            for entry in plan.parkings:  # next time: nothing is decoded now
                entry.busy = False
            worker.cache.parking += plan.parkings
            return None
        worker.batch_started, worker.batch_tokens = now, plan.tokens
        return plan

    def _ends_in_time(self, worker: _Worker, plan: _Plan, job: LLMJob, tokens: int, now: float) -> bool:
        """Whether the batch, `tokens` larger, still ends before its jobs' deadlines and this job's."""
        end = now + (plan.tokens + tokens) * worker.seconds_per_token * _MARGIN
        return end <= plan.deadline and (job.deadline is None or end <= job.deadline)

    def _plan_prefix(self, worker: _Worker, job: LLMJob, plan: _Plan, now: float) -> bool:
        """Put (the next part of) the job's prefix into the batch; True when the batch completes it."""
        entry = job._entry
        if entry.busy:
            return False  # an earlier job put a part of it, not its last, into this batch
        if entry.seq is None and not worker.cache.allocate(entry):
            return False  # no KV room until a cached prefix is released
        plan.removals += worker.cache.removals  # prefixes evicted to make room: cleared before this batch
        worker.cache.removals = []
        if entry.saved is not None and entry.decoded:  # parked: restored before the batch, not decoded
            plan.restores.append(entry)
            entry.busy = True
            return True
        take = min(len(entry.key) - entry.planned, self.settings.batch_tokens - plan.tokens)
        if take <= 0 or not self._ends_in_time(worker, plan, job, take, now):
            return False
        start = entry.planned
        plan.prefixes.append((entry, entry.key[start : start + take], start))
        entry.planned += take
        entry.busy = True
        plan.tokens += take
        if job.deadline is not None:
            plan.deadline = min(plan.deadline, job.deadline)
        if entry.planned < len(entry.key):
            return False
        plan.completing.add(id(entry))
        return True

    def _plan_suffixes(self, worker: _Worker, job: LLMJob, plan: _Plan, now: float) -> None:
        spt = worker.seconds_per_token
        while job.next < job.size and worker.suffix_seqs:
            length = len(job.suffixes[job.next])
            if plan.tokens + length > self.settings.batch_tokens:
                return
            if not self._ends_in_time(worker, plan, job, length, now):
                if job.deadline is not None and now + length * spt * _MARGIN > job.deadline:
                    self._drop_late(job, "too_late")  # too late even alone: never decode it
                return
            plan.suffixes.append((job, job.next, worker.suffix_seqs.pop()))
            plan.tokens += length
            job.next += 1
            job.inflight += 1
            self._queued -= 1
            if job.first_planned is None:
                job.first_planned = now
            if job.deadline is not None:
                plan.deadline = min(plan.deadline, job.deadline)

    def _execute(self, worker: _Worker, plan: _Plan) -> None:
        """Decode one planned batch (outside the lock; this worker's thread owns its context).

        A candidate's sequence first shares its prefix's decoded cells (llama_memory_seq_cp); the
        prefix tokens decoded in this very batch carry the candidates' sequences too, so that a
        new user's prefix and candidates take one batch, not two."""
        context = worker.context
        if worker.threads != worker.applied_threads:
            context.set_threads(worker.threads)
            worker.applied_threads = worker.threads
        plan.saved = [self._park(context, entry) for entry in plan.parkings]
        for seq in plan.removals:
            context.remove_sequence(seq)
        sharing: dict[int, list[int]] = {}
        for job, _, seq in plan.suffixes:
            if id(job._entry) in plan.completing:
                sharing.setdefault(id(job._entry), []).append(seq)
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int | tuple[int, ...]] = []
        flags: list[bool] = []
        outputs: list[int] = []
        for entry, chunk, start in plan.prefixes:
            members = (entry.seq, *sharing[id(entry)]) if id(entry) in sharing else entry.seq
            tokens += chunk
            positions += range(start, start + len(chunk))
            seqs += [members] * len(chunk)
            flags += [False] * len(chunk)
        for job, item, seq in plan.suffixes:
            suffix, start = job.suffixes[item], len(job._entry.key)
            tokens += suffix
            positions += range(start, start + len(suffix))
            seqs += [seq] * len(suffix)
            flags += [False] * (len(suffix) - 1) + [True]
            outputs.append(len(tokens) - 1)
        started = time.perf_counter()
        answers: list[float] = []
        error = None
        try:
            for entry in plan.restores:
                context.restore_sequence(entry.saved, entry.seq)
            for job, _, seq in plan.suffixes:
                context.copy_sequence(job._entry.seq, seq)
            if tokens:  # none when a restored prefix's candidates could not fit in time after all
                context.decode(tokens, positions, seqs, flags)
            answers = [context.answer(row) for row in outputs]
        except LLMError as exc:
            error = str(exc)
            log.warning("LLM batch of %d tokens failed: %s", len(tokens), exc)
        finally:
            for _, _, seq in plan.suffixes:
                context.remove_sequence(seq)
        elapsed = time.perf_counter() - started
        with self._lock:
            self._record(worker, plan, answers, error, elapsed)

    @staticmethod
    def _park(context: LlamaContext, entry: _PrefixEntry) -> Any:
        """Move an idle prefix out of the KV cache: a copy in host memory (once; the cells of a
        prefix never change), then its sequence cleared. None when no copy could be made."""
        saved = entry.saved
        if saved is None:
            try:
                saved = context.save_sequence(entry.seq)
            except LLMError as exc:
                log.warning("a cached prefix could not be saved to host memory: %s", exc)
        context.remove_sequence(entry.seq)
        return saved

    def _busy_threads(self) -> int:
        return self.settings.threads_when_busy or self.settings.threads or default_threads()

    def _choose_threads(self, worker: _Worker) -> None:
        """The thread count of the next batch (planned with that count's speed)."""
        now = self.clock()
        if self.settings.threads_when_busy and self.host_load() > _BUSY_LOAD:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        busy = self._quiet_since is None or now - self._quiet_since < _QUIET_S
        worker.threads = self._busy_threads() if busy else self.settings.threads or default_threads()

    def _record(self, worker: _Worker, plan: _Plan, answers: list[float], error: str | None, elapsed: float) -> None:
        """Hand the batch's answers to their jobs and finish the jobs that are complete (under the lock)."""
        now = self.clock()
        worker.batch_started = None
        self.decodes += 1
        if error is None:
            self.decoded_tokens += plan.tokens
            self.decoded_candidates += len(plan.suffixes)
            if plan.tokens >= 16:  # a smoothed measured speed for admission
                sample = elapsed / plan.tokens
                worker.speed[worker.threads] = 0.7 * worker.seconds_per_token + 0.3 * sample
        self.observer.batch(plan.tokens, len(plan.suffixes) + len(plan.prefixes), elapsed)
        for entry, saved in zip(plan.parkings, plan.saved, strict=True):
            worker.cache.parked(entry, saved)
        for entry in plan.restores:
            worker.cache.restores += error is None
            entry.error = entry.error or error
            worker.cache.after_batch(entry)
        for entry, chunk, _ in plan.prefixes:
            if error is None:
                entry.filled += len(chunk)
            else:
                entry.error = error
            worker.cache.after_batch(entry)
        wasted = 0
        for k, (job, item, seq) in enumerate(plan.suffixes):
            worker.suffix_seqs.append(seq)
            job.inflight -= 1
            if job.abandoned:
                wasted += 1
            elif error is None:
                job.p[item] = answers[k]
                job.state[item] = ItemState.DONE
            else:
                job.state[item] = ItemState.FAILED
                job.error = error
            self._finish_if_complete(job, now)
        for job in {id(job): job for job, _, _ in plan.suffixes}.values():
            if not job.done:
                self.observer.job_updated(job)
        if wasted:
            self.observer.dropped("decoded_after_deadline", wasted)

    # ------------------------------------------------------------------ job bookkeeping (under the lock)
    def _drop_late(self, job: LLMJob, reason: str) -> None:
        dropped = job.size - job.next
        self._resolve_unplanned(job, ItemState.EXPIRED)
        if dropped:
            self.observer.dropped(reason, dropped)

    def _resolve_unplanned(self, job: LLMJob, state: ItemState) -> None:
        if job.next < job.size:
            job.state[job.next :] = state
            self._queued -= job.size - job.next
            job.next = job.size
        self._finish_if_complete(job, self.clock())

    def _finish_if_complete(self, job: LLMJob, now: float) -> None:
        if job.done or job.next < job.size or job.inflight:
            return
        job.finished = now
        worker = job._worker
        with contextlib.suppress(ValueError):
            worker.queue.remove(job)
        worker.cache.release(job._entry)
        if job.first_planned is not None:
            self.observer.job_finished(job.first_planned - job.enqueued, now - job.first_planned)
        job._event.set()
        self.observer.job_updated(job)
        callbacks, job._callbacks = job._callbacks, []
        for callback in callbacks:
            callback()

    def stats(self) -> dict[str, float]:
        with self._lock:
            now = self.clock()
            return {
                "queued_candidates": self._queued,
                "queued_jobs": sum(len(w.queue) for w in self.workers),
                "cached_prefixes": sum(len(w.cache.entries) for w in self.workers),
                "cached_prefix_tokens": sum(w.cache.used for w in self.workers),
                "parked_prefix_bytes": sum(w.cache.host_used for w in self.workers),
                "restored_prefixes": sum(w.cache.restores for w in self.workers),
                "backlog_seconds": max(w.backlog_seconds(now) for w in self.workers),
                "backlog_seconds_min": min(w.backlog_seconds(now) for w in self.workers),
                "seconds_per_token": float(np.mean([w.seconds_per_token for w in self.workers])),
                "decodes": self.decodes,
                "decoded_tokens": self.decoded_tokens,
            }


def queue_full(queued: int, candidates: int, ahead: int, bound: int) -> bool:
    """No room in a queue of `bound` candidates, `queued` of them taken, for a request's
    `candidates` (at most a whole queue's worth: a larger request is admitted in part) once the
    `ahead` candidates of requests that reach the queue first are in."""
    return queued + ahead + min(candidates, bound) > bound


def saturation(now: float, wait: float, full: bool, deadline: float | None, delay: float,
               own: float = 0.0) -> float | None:  # fmt: skip
    """`LLMScheduler.saturated` from its parts: the seconds to wait, or None when new work fits.
    `own`: the seconds of the request's own least work."""
    # a deadline too short for an idle LLM is the request's to bear (a deadline fallback), not overload
    busy = wait > 0 or delay > 0
    late = deadline is not None and busy and now + own * _MARGIN < deadline <= now + delay + (wait + own) * _MARGIN
    return wait + delay if full or late else None
