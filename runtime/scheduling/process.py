"""The LLM scheduler in a process of its own, driven from the server's process.

Why a process: the decode loop's Python (planning a batch, filling it, reading the answers) and
the HTTP server's Python (parsing, encoding, the CRM) would otherwise share one GIL. Under load the
server's threads hold it most of the time, and the decode loop, which needs it between every two
decodes, waits: measured on 2 CPU cores at 32 clients, llama.cpp decoded 300-350 tokens a second in
the server's process and ~500 in a process of its own (597 alone). vLLM runs its engine core apart
from its API server for the same reason.

`RemoteScheduler` is a `Scheduler` whose loops run in the child. The two sides speak in typed
messages (`messages`). Admission is a round trip (a request's CPU worker waits ~0.1 ms for it);
answers stream back as each batch finishes, sent by a thread of their own so that the decode loops
never wait on the pipe; what the event loop asks without waiting (is the LLM saturated, how much is
queued) it reads from a small shared array that the child refreshes when its queue changes.

If the child dies (a crash, a kill, a decode loop that stopped), every job it held fails at once
(answered by the CRM, counted) and it is started again, at most `restarts` times within
`restart_window_s`; past that the LLM stays down until the window has moved on.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from runtime.llm import LlamaModel, LLMError
from runtime.scheduling.admission import WorkEstimate, queue_full, saturation
from runtime.scheduling.config import SchedulerSettings
from runtime.scheduling.jobs import Admission, ItemState, JobHandle
from runtime.scheduling.local import LLMScheduler, Pausable
from runtime.scheduling.messages import (
    Cancel,
    Close,
    Crashed,
    JobUpdate,
    LoadFailed,
    Observed,
    Query,
    Ready,
    Reply,
    Submit,
)
from runtime.scheduling.protocol import SchedulerObserver

__all__ = ["RemoteScheduler"]

log = logging.getLogger(__name__)

# the shared array: what the event loop reads without a round trip (written by the LLM process),
# and how busy the HTTP side is (written by the server's process)
_QUEUED, _WAIT, _STAMP, _HOST_LOAD, _HOST_STAMP, _SPT, _HOST_BYTES = range(7)
_LOAD_FRESH_S = 1.0
_REFRESH_S = 0.002  # the shared array is refreshed at most this often, and only when the queue changed
_IDLE_REFRESH_S = 0.25
_START_TIMEOUT_S = 600
_CALL_TIMEOUT_S = 60
_CRASH_EXIT = 70


# ---------------------------------------------------------------------------- the LLM process
class _Forwarder(SchedulerObserver):
    """In the LLM process: the scheduler's reports, queued for the server's process."""

    def __init__(self, post: Callable[[Any], None]) -> None:
        self.post = post

    def batch(self, tokens: int, sequences: int, seconds: float) -> None:
        self.post(Observed("batch", (tokens, sequences, seconds)))

    def job_finished(self, queued_s: float, decoding_s: float) -> None:
        self.post(Observed("job_finished", (queued_s, decoding_s)))

    def prefix_lookup(self, hit: bool) -> None:
        self.post(Observed("prefix_lookup", (hit,)))

    def dropped(self, reason: str, count: int) -> None:
        self.post(Observed("dropped", (reason, count)))


def _update(handle: JobHandle) -> JobUpdate:
    return JobUpdate(handle.tag, handle.p.copy(), handle.state.copy(), handle.error, handle.first_planned,
                     handle.finished, handle.done)  # fmt: skip


def _send_all(conn: Connection, outbox: queue.SimpleQueue) -> None:
    """The one thread that writes to the pipe: a slow reader holds up only this thread. After a
    Crashed message the process exits (the server's side starts another)."""
    while (message := outbox.get()) is not None:
        try:
            conn.send(message)
        except (OSError, ValueError):
            return  # the server's process is gone
        if isinstance(message, Crashed):
            os._exit(_CRASH_EXIT)


def _serve(conn: Connection, path: str, yes_id: int, no_id: int, gpu_layers: int | None,
           settings: SchedulerSettings, shared: Any) -> None:  # fmt: skip
    """The LLM process: load, warm up, then take commands until told to close."""
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    try:
        model = LlamaModel(path, yes_id, no_id, gpu_layers)
        scheduler = LLMScheduler(model, settings, observer=_Forwarder(outbox.put),
                                 on_update=lambda handle: outbox.put(_update(handle)),
                                 on_failure=lambda reason: outbox.put(Crashed(reason)),
                                 host_load=lambda: _host_load(shared))  # fmt: skip
    except LLMError as exc:
        conn.send(LoadFailed(str(exc)))
        return
    conn.send(Ready(model.gpu_layers, scheduler.estimate.cache_tokens))
    sender = threading.Thread(target=_send_all, args=(conn, outbox), name="corella-llm-sender", daemon=True)
    sender.start()
    jobs: dict[int, JobHandle] = {}
    stop = threading.Event()
    threading.Thread(target=_refresh, args=(scheduler, shared, stop), daemon=True).start()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the server's process is gone
            if isinstance(message, Close):
                return
            reply = _command(scheduler, jobs, message)
            if reply is not None:
                outbox.put(reply)
    finally:
        stop.set()
        scheduler.close()
        outbox.put(None)
        sender.join(timeout=10)
        model.close()


def _command(scheduler: LLMScheduler, jobs: dict[int, JobHandle], message: Any) -> Reply | None:
    if isinstance(message, Cancel):
        job = jobs.pop(message.call, None)
        if job is not None:
            scheduler.collect(job)
        return None
    try:
        if isinstance(message, Submit):
            admission = scheduler.submit(message.prefix, message.suffixes, message.deadline, message.user,
                                         arrived=message.arrived, tag=message.call)  # fmt: skip
            if admission.job is not None:
                jobs[message.call] = admission.job
                _forget_finished(jobs)
            return Reply(message.call, (admission.admitted, admission.feasible))
        queries = {"invalidate": scheduler.invalidate_user, "cached": scheduler.cached_prefixes,
                   "stats": scheduler.stats, "pause": scheduler.pause, "resume": scheduler.resume}  # fmt: skip
        return Reply(message.call, queries[message.name](*message.args))
    except LLMError as exc:
        return Reply(message.call, error=str(exc))


def _host_load(shared: Any) -> float:
    fresh = time.perf_counter() - shared[_HOST_STAMP] < _LOAD_FRESH_S
    return shared[_HOST_LOAD] if fresh else 0.0


def _forget_finished(jobs: dict[int, JobHandle]) -> None:
    if len(jobs) > 1024:
        for key in [k for k, job in jobs.items() if job.done]:
            del jobs[key]


def _refresh(scheduler: LLMScheduler, shared: Any, stop: threading.Event) -> None:
    """Publish the queue's state to the shared array when it changed (at most every _REFRESH_S);
    the reader ages the backlog by the time since, so an idle scheduler is not polled."""
    while not stop.is_set():
        scheduler.changed.wait(_IDLE_REFRESH_S)
        scheduler.changed.clear()
        stats = scheduler.stats()
        shared[_QUEUED] = stats["queued_candidates"]
        shared[_WAIT] = stats["backlog_seconds_min"]
        shared[_SPT] = stats["seconds_per_token"]
        shared[_HOST_BYTES] = stats["parked_prefix_bytes"]
        shared[_STAMP] = time.perf_counter()
        stop.wait(_REFRESH_S)


# ---------------------------------------------------------------------------- the server's side
class RemoteScheduler(Pausable):
    """A `Scheduler` served by a child process that owns the model and its contexts."""

    def __init__(self, path: str | Path, yes_id: int, no_id: int, settings: SchedulerSettings,
                 gpu_layers: int | None = None, observer: SchedulerObserver | None = None,
                 restarts: int = 3, restart_window_s: float = 300.0) -> None:  # fmt: skip
        self.settings = settings
        self.observer = observer or SchedulerObserver()
        self.clock = time.perf_counter  # CLOCK_MONOTONIC: the same clock in both processes
        self.restarts, self.restart_window_s = restarts, restart_window_s
        self._model = (str(path), int(yes_id), int(no_id), gpu_layers)
        self._context = multiprocessing.get_context("spawn")  # never fork a process that has threads
        self._shared = self._context.RawArray("d", 8)
        self._lock = threading.Lock()  # guards the handles and the pending calls
        self._send_lock = threading.Lock()
        self._calls = itertools.count(1)
        self._pending: dict[int, list] = {}  # call id -> [event, Reply]
        self._jobs: dict[int, JobHandle] = {}
        self._closing = threading.Event()
        self._restarted: collections.deque[float] = collections.deque()  # monotonic times of restarts
        self._crash: str | None = None  # what the child said before it exited
        self.restarted = 0  # times the child was started again, over the scheduler's life
        self.estimate = WorkEstimate(settings.prefix_cache_tokens * settings.contexts)
        self.gpu_layers = 0
        self.failure: str | None = None
        self._start()

    # ------------------------------------------------------------------ the child's life
    def _start(self) -> None:
        self._conn, child = self._context.Pipe(duplex=True)
        self._process = self._context.Process(target=_serve, name="corella-llm", daemon=True,
                                              args=(child, *self._model, self.settings, self._shared))  # fmt: skip
        self._process.start()
        child.close()
        if not self._conn.poll(_START_TIMEOUT_S):
            self._process.kill()
            raise LLMError(f"the LLM process did not start within {_START_TIMEOUT_S} s")
        try:
            message = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise LLMError(f"the LLM process exited while loading (code {self._process.exitcode})") from exc
        if isinstance(message, LoadFailed):
            self._process.join(timeout=30)
            raise LLMError(message.reason)
        self.gpu_layers = message.gpu_layers
        self.estimate.cache_tokens = message.cache_tokens
        self.failure = self._crash = None
        self._reader = threading.Thread(target=self._read, name="corella-llm-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        conn = self._conn
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, JobUpdate):
                self._job_update(message)
            elif isinstance(message, Observed):
                getattr(self.observer, message.method)(*message.args)
            elif isinstance(message, Reply):
                with self._lock:
                    slot = self._pending.get(message.call)
                if slot is not None:
                    slot[1] = message
                    slot[0].set()
            elif isinstance(message, Crashed):  # down from now: the process exits next
                self._crash = self.failure = f"the LLM process is stopping: {message.reason}"
        self._lost()

    def _lost(self) -> None:
        """The child is gone: fail what it held at once, and start another within the budget."""
        self._process.join(timeout=5)
        reason = f"the LLM process exited (code {self._process.exitcode})"
        if self._crash:
            reason += f"; {self._crash}"
        self.failure = reason  # before the jobs fail: a request that sees them failed sees the LLM down
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            pending, self._pending = list(self._pending.values()), {}
        for slot in pending:
            slot[1] = Reply(0, error=reason)
            slot[0].set()
        with self._lock:
            for job in jobs:
                job.fail_pending(reason)
                job.finish(self.clock())
        if self._closing.is_set():
            return
        log.error("%s; %d jobs answered by the CRM", reason, len(jobs))
        self._restart(reason)

    def _restart(self, reason: str) -> None:
        """Start the child again: at most `restarts` times within `restart_window_s`; past that,
        wait (bounded by close) until the oldest restart leaves the window."""
        while self.restarts > 0 and not self._closing.is_set():
            now = time.monotonic()
            while self._restarted and now - self._restarted[0] > self.restart_window_s:
                self._restarted.popleft()
            if len(self._restarted) >= self.restarts:
                wait = self.restart_window_s - (now - self._restarted[0])
                self.failure = (f"{reason}; {len(self._restarted)} restarts within {self.restart_window_s:.0f} s, "
                                f"the next in {wait:.0f} s")  # fmt: skip
                log.error("%s", self.failure)
                if self._closing.wait(wait):
                    return
                continue
            self._restarted.append(now)
            try:
                self._start()
                self.restarted += 1
                log.warning("LLM process started again (%d restarts within %.0f s)", len(self._restarted),
                            self.restart_window_s)  # fmt: skip
                return
            except LLMError as exc:
                self.failure = f"{reason}; restarting failed: {exc}"
                log.error("%s", self.failure)

    @property
    def alive(self) -> bool:
        return self.failure is None and self._process.is_alive()

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError, ValueError):
            self._send(Close())
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)
        self._reader.join(timeout=10)
        self._conn.close()

    # ------------------------------------------------------------------ calls
    def _send(self, message: Any) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _call(self, message: Submit | Query) -> Any:
        slot: list = [threading.Event(), None]
        with self._lock:
            self._pending[message.call] = slot
        try:
            if not self.alive:
                raise LLMError(self.failure or "the LLM process is not running")
            try:
                self._send(message)
            except (OSError, ValueError) as exc:
                raise LLMError(f"the LLM process is unreachable ({exc})") from exc
            if not slot[0].wait(_CALL_TIMEOUT_S):
                raise LLMError(f"the LLM process did not answer {type(message).__name__} within {_CALL_TIMEOUT_S} s")
        finally:
            with self._lock:
                self._pending.pop(message.call, None)
        reply: Reply = slot[1]
        if reply.error is not None:
            raise LLMError(reply.error)
        return reply.value

    def _query(self, name: str, *args: Any) -> Any:
        return self._call(Query(next(self._calls), name, args))

    def submit(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], deadline: float | None = None,
               user: str | None = None, arrived: float | None = None) -> Admission:  # fmt: skip
        call = next(self._calls)
        job = JobHandle(len(suffixes), deadline, user, self.clock(), self._lock, tag=call)
        with self._lock:  # registered first: the child may answer before the admission reply is read
            self._jobs[call] = job
        try:
            admitted, feasible = self._call(Submit(call, list(prefix), [list(s) for s in suffixes], deadline, user,
                                                   arrived))  # fmt: skip
        except BaseException:
            with self._lock:
                self._jobs.pop(call, None)
            raise
        self.estimate.seen(user, len(prefix), [len(s) for s in suffixes], admitted > 0)
        with self._lock:
            if not admitted:
                self._jobs.pop(call, None)
                return Admission(0, feasible)
            if len(job.p) > admitted and not job.done:  # no answer has arrived yet
                job.p, job.state = job.p[:admitted], job.state[:admitted]
        return Admission(admitted, feasible, job)

    def _job_update(self, update: JobUpdate) -> None:
        with self._lock:
            job = self._jobs.get(update.call)
            if job is None or job.done:
                return
            job.p, job.state = update.p, update.state  # copies made for this message
            job.error, job.first_planned = update.error, update.first_planned
            if update.done:
                del self._jobs[update.call]
                job.finish(update.finished)

    def collect(self, job: JobHandle) -> tuple[np.ndarray, np.ndarray]:
        """The answers received so far; what is left is cancelled in the LLM process."""
        with self._lock:
            cancelled = not job.done
            if cancelled:
                self._jobs.pop(job.tag, None)
                job.fail_pending("", ItemState.CANCELLED)
                job.finish(self.clock())  # done, as far as this process is concerned
            p, state = job.p.copy(), job.state.copy()
        if cancelled and self.alive:
            with contextlib.suppress(OSError, ValueError):
                self._send(Cancel(job.tag))
        return p, state

    # ------------------------------------------------------------------ state
    def _snapshot(self) -> tuple[float, float]:
        """(now, seconds of backlog) from the shared array, aged to now."""
        now = self.clock()
        shared = self._shared
        return now, max(0.0, shared[_WAIT] - (now - shared[_STAMP]))

    def saturated(self, deadline: float | None, delay: float = 0.0, candidates: int = 1, ahead: int = 0,
                  user: str | None = None) -> float | None:  # fmt: skip
        if not self.alive:
            return None  # answered by the CRM with the LLM's failure, not refused
        now, wait = self._snapshot()
        full = queue_full(int(self._shared[_QUEUED]), candidates, ahead, self.settings.queue_candidates)
        return saturation(now, wait, full, deadline, delay, self.estimate.tokens(user) * self._shared[_SPT])

    def retry_after(self) -> float:
        return self._snapshot()[1]

    def queued_candidates(self) -> int:
        return int(self._shared[_QUEUED])

    def report_host_load(self, load: float) -> None:
        self._shared[_HOST_LOAD] = load
        self._shared[_HOST_STAMP] = time.perf_counter()

    def invalidate_user(self, user: str) -> int:
        self.estimate.forget(user)
        return self._query("invalidate", user)

    def cached_prefixes(self) -> int:
        return self._query("cached") if self.alive else 0

    def prefix_host_bytes(self) -> int:
        return int(self._shared[_HOST_BYTES]) if self.alive else 0

    def stats(self) -> dict[str, float]:
        return self._query("stats")

    def pause(self) -> None:
        self._query("pause")

    def resume(self) -> None:
        self._query("resume")
