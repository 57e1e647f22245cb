"""The LLM scheduler in a process of its own, driven from the server's process.

Why a process: the decode loop's Python (planning a batch, filling it, reading the answers) and
the HTTP server's Python (parsing, encoding, the CRM) would otherwise share one GIL. Under load the
server's threads hold it most of the time, and the decode loop, which needs it between every two
decodes, waits: measured on 2 CPU cores at 32 clients, llama.cpp decoded 300-350 tokens a second in
the server's process and ~500 in a process of its own (597 alone). vLLM runs its engine core apart
from its API server for the same reason.

`RemoteScheduler` offers the server what `LLMScheduler` does. Admission is a round trip (a
request's CPU worker waits ~0.1 ms for it); answers stream back as each batch finishes; what the
event loop asks without waiting (is the LLM saturated, how much is queued) it reads from a small
shared array that the LLM process refreshes every few milliseconds. If the LLM process dies, its
jobs fail (answered by the CRM, counted) and it is started again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from runtime.llm import LlamaModel, LLMError
from runtime.scheduler import (
    Admission,
    ItemState,
    LLMJob,
    LLMScheduler,
    Pausable,
    SchedulerObserver,
    SchedulerSettings,
    WorkEstimate,
    queue_full,
    saturation,
)

__all__ = ["RemoteScheduler"]

log = logging.getLogger(__name__)

# the shared array: what the event loop reads without a round trip (written by the LLM process),
# and how busy the HTTP side is (written by the server's process)
_QUEUED, _WAIT, _STAMP, _HOST_LOAD, _HOST_STAMP, _SPT, _HOST_BYTES = range(7)
_LOAD_FRESH_S = 1.0
_REFRESH_S = 0.002
_START_TIMEOUT_S = 600
_RESTARTS = 3  # in a row, before the LLM is left unavailable


# ---------------------------------------------------------------------------- the LLM process
class _Forwarder(SchedulerObserver):
    """In the LLM process: the scheduler's reports, sent to the server's process."""

    def __init__(self, send: Any) -> None:
        self.send = send

    def batch(self, tokens: int, sequences: int, seconds: float) -> None:
        self.send(("observe", "batch", (tokens, sequences, seconds)))

    def job_finished(self, queued_s: float, decoding_s: float) -> None:
        self.send(("observe", "job_finished", (queued_s, decoding_s)))

    def prefix_lookup(self, hit: bool) -> None:
        self.send(("observe", "prefix_lookup", (hit,)))

    def dropped(self, reason: str, count: int) -> None:
        self.send(("observe", "dropped", (reason, count)))

    def job_updated(self, job: LLMJob) -> None:
        self.send(("job", job.tag, job.p, job.state, job.error, job.first_planned, job.finished, job.done))


def _serve(conn: Connection, path: str, yes_id: int, no_id: int, gpu_layers: int | None,
           settings: SchedulerSettings, shared: Any) -> None:  # fmt: skip
    """The LLM process: load, warm up, then take commands until told to close."""
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:
            conn.send(message)

    try:
        model = LlamaModel(path, yes_id, no_id, gpu_layers)
        scheduler = LLMScheduler(model, settings, observer=_Forwarder(send))
    except LLMError as exc:
        send(("failed", str(exc)))
        return
    scheduler.host_load = lambda: _host_load(shared)  # type: ignore[method-assign]
    send(("ready", {"gpu_layers": model.gpu_layers, "cache_tokens": scheduler.estimate.cache_tokens}))
    jobs: dict[int, LLMJob] = {}
    stop = threading.Event()
    threading.Thread(target=_refresh, args=(scheduler, shared, stop), daemon=True).start()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the server's process is gone
            if message[0] == "close":
                return
            reply = _command(scheduler, jobs, message)
            if reply is not None:
                send(reply)
    finally:
        stop.set()
        scheduler.close()
        model.close()


def _command(scheduler: LLMScheduler, jobs: dict[int, LLMJob], message: tuple) -> tuple | None:
    kind, call, *args = message
    if kind == "submit":
        prefix, suffixes, deadline, user, arrived = args
        try:
            admission = scheduler.submit(prefix, suffixes, deadline, user, tag=call, arrived=arrived)
        except LLMError as exc:
            return ("reply", call, exc)
        if admission.job is not None:
            jobs[call] = admission.job
            _forget_finished(jobs)
        return ("reply", call, (admission.admitted, admission.feasible))
    if kind == "cancel":
        job = jobs.pop(call, None)
        if job is not None:
            scheduler.collect(job)
        return None
    answers = {
        "invalidate": lambda: scheduler.invalidate_user(*args),
        "cached": scheduler.cached_prefixes,
        "stats": scheduler.stats,
        "pause": scheduler.pause,
        "resume": scheduler.resume,
    }
    return ("reply", call, answers[kind]())


def _host_load(shared: Any) -> float:
    fresh = time.perf_counter() - shared[_HOST_STAMP] < _LOAD_FRESH_S
    return shared[_HOST_LOAD] if fresh else 0.0


def _forget_finished(jobs: dict[int, LLMJob]) -> None:
    if len(jobs) > 1024:
        for key in [k for k, job in jobs.items() if job.done]:
            del jobs[key]


def _refresh(scheduler: LLMScheduler, shared: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        stats = scheduler.stats()
        shared[_QUEUED] = stats["queued_candidates"]
        shared[_WAIT] = stats["backlog_seconds_min"]
        shared[_SPT] = stats["seconds_per_token"]
        shared[_HOST_BYTES] = stats["parked_prefix_bytes"]
        shared[_STAMP] = time.perf_counter()
        stop.wait(_REFRESH_S)


# ---------------------------------------------------------------------------- the server's side
class RemoteScheduler(Pausable):
    """`LLMScheduler`'s interface, served by a child process that owns the model and its contexts."""

    def __init__(self, path: str | Path, yes_id: int, no_id: int, settings: SchedulerSettings,
                 gpu_layers: int | None = None, observer: SchedulerObserver | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.observer = observer or SchedulerObserver()
        self.clock = time.perf_counter  # CLOCK_MONOTONIC: the same clock in both processes
        self._model = (str(path), int(yes_id), int(no_id), gpu_layers)
        self._context = multiprocessing.get_context("spawn")  # never fork a process that has threads
        self._shared = self._context.RawArray("d", 8)
        self._lock = threading.Lock()  # guards the local jobs and the pending calls
        self._send_lock = threading.Lock()
        self._calls = itertools.count(1)
        self._pending: dict[int, list] = {}  # call id -> [event, answer]
        self._jobs: dict[int, LLMJob] = {}
        self._closing = False
        self._restarts = 0
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
            kind, detail = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise LLMError(f"the LLM process exited while loading (code {self._process.exitcode})") from exc
        if kind == "failed":
            self._process.join(timeout=30)
            raise LLMError(detail)
        self.gpu_layers = detail["gpu_layers"]
        self.estimate.cache_tokens = detail["cache_tokens"]
        self.failure = None
        self._reader = threading.Thread(target=self._read, name="corella-llm-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        conn = self._conn
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "job":
                self._job_update(*message[1:])
            elif kind == "observe":
                getattr(self.observer, message[1])(*message[2])
            elif kind == "reply":
                with self._lock:
                    slot = self._pending.get(message[1])
                if slot is not None:
                    slot[1] = message[2]
                    slot[0].set()
        self._lost()

    def _lost(self) -> None:
        """The child is gone: fail what it held, and start another unless closing."""
        code = self._process.exitcode
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            pending, self._pending = list(self._pending.values()), {}
        reason = f"the LLM process exited (code {code})"
        for slot in pending:
            slot[1] = LLMError(reason)
            slot[0].set()
        for job in jobs:
            self._finish_local(job, reason)
        if self._closing:
            return
        log.error("%s; %d jobs answered by the CRM", reason, len(jobs))
        self.failure = reason
        while self._restarts < _RESTARTS and not self._closing:
            self._restarts += 1
            try:
                self._start()
                log.warning("LLM process started again (restart %d)", self._restarts)
                return
            except LLMError as exc:
                self.failure = f"{reason}; restarting failed: {exc}"
                log.error("%s", self.failure)

    @property
    def alive(self) -> bool:
        return self.failure is None and self._process.is_alive()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError, ValueError):
            self._send(("close", 0))
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)
        self._reader.join(timeout=10)
        self._conn.close()

    # ------------------------------------------------------------------ calls
    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _call(self, kind: str, *args: Any, call: int | None = None) -> Any:
        call = next(self._calls) if call is None else call
        slot = [threading.Event(), None]
        with self._lock:
            self._pending[call] = slot
        try:
            if not self.alive:
                raise LLMError(self.failure or "the LLM process is not running")
            try:
                self._send((kind, call, *args))
            except (OSError, ValueError) as exc:
                raise LLMError(f"the LLM process is unreachable ({exc})") from exc
            if not slot[0].wait(60):
                raise LLMError(f"the LLM process did not answer {kind!r} within 60 s")
        finally:
            with self._lock:
                self._pending.pop(call, None)
        if isinstance(slot[1], Exception):
            raise slot[1]
        return slot[1]

    def submit(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], deadline: float | None = None,
               user: str | None = None, arrived: float | None = None) -> Admission:  # fmt: skip
        call = next(self._calls)
        job = LLMJob(prefix, suffixes, deadline, user, self.clock(), tag=call)
        job._lock = self._lock
        with self._lock:  # registered first: the child may answer before the admission reply is read
            self._jobs[call] = job
        try:
            admitted, feasible = self._call("submit", list(prefix), [list(s) for s in suffixes], deadline, user,
                                            arrived, call=call)  # fmt: skip
        except BaseException:
            with self._lock:
                self._jobs.pop(call, None)
            raise
        self.estimate.seen(user, len(prefix), [len(s) for s in suffixes], admitted > 0)
        with self._lock:
            if not admitted:
                self._jobs.pop(call, None)
                return Admission(0, feasible)
            if len(job.p) > admitted:  # no answer has arrived yet
                job.suffixes, job.p, job.state = job.suffixes[:admitted], job.p[:admitted], job.state[:admitted]
        return Admission(admitted, feasible, job)

    def _job_update(self, call: int, p: np.ndarray, state: np.ndarray, error: str | None,
                    first_planned: float | None, finished: float | None, done: bool) -> None:  # fmt: skip
        with self._lock:
            job = self._jobs.get(call)
            if job is None or job.done:
                return
            n = len(p)
            job.suffixes, job.p, job.state = job.suffixes[:n], p.copy(), state.copy()
            job.error, job.first_planned = error, first_planned
            if done:
                del self._jobs[call]
                self._finish_locked(job, finished)

    def _finish_local(self, job: LLMJob, error: str) -> None:
        with self._lock:
            if job.done:
                return
            job.state[job.state == ItemState.PENDING] = ItemState.FAILED
            job.error = job.error or error
            self._finish_locked(job, self.clock())

    @staticmethod
    def _finish_locked(job: LLMJob, finished: float | None) -> None:
        job.finished = finished
        job._event.set()
        callbacks, job._callbacks = job._callbacks, []
        for callback in callbacks:
            callback()

    def collect(self, job: LLMJob) -> tuple[np.ndarray, np.ndarray]:
        """The answers received so far; what is left is cancelled in the LLM process."""
        with self._lock:
            if not job.done:
                job.abandoned = True
                self._jobs.pop(job.tag, None)
                self._finish_locked(job, self.clock())  # done, as far as this process is concerned
            p, state = job.p.copy(), job.state.copy()
        if job.abandoned and self.alive:
            with contextlib.suppress(OSError, ValueError):
                self._send(("cancel", job.tag))
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
        return self._call("invalidate", user)

    def cached_prefixes(self) -> int:
        return self._call("cached") if self.alive else 0

    def prefix_host_bytes(self) -> int:
        return int(self._shared[_HOST_BYTES]) if self.alive else 0

    def stats(self) -> dict[str, float]:
        return self._call("stats")

    def pause(self) -> None:
        self._call("pause")

    def resume(self) -> None:
        self._call("resume")
