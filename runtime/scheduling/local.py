"""The LLM scheduler in this process: continuous batching of every in-flight request's routed work.

A request's routed work is one job: the user's prefix (instruction + history, as token ids) and one
suffix per routed candidate, most uncertain first. Each llama.cpp context has a loop that, round
after round, plans work from the front of its queue (`planning`), decodes it in one `llama_decode`
(`execution`), each suffix in a sequence of its own that shares its prefix's KV cells, and records
the answers. A job is answered as soon as its own items are, never after other requests' whole
requests. Prefixes stay cached across requests (`prefix_cache`); an event for a user drops that
user's cached prefixes. What is admitted is judged in `admission`.

A loop that fails in any way other than a llama.cpp error on one batch stops the scheduler: every
job in flight fails at once (answered by the CRM), `alive` turns False, and `on_failure` is told
(the child process then exits, to be started again). Nothing waits for a loop that is gone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from runtime.llm import LlamaContext, LlamaModel, LLMError
from runtime.scheduling.admission import MARGIN, WorkEstimate, admissible, check_prompt, queue_full, saturation
from runtime.scheduling.config import SchedulerSettings
from runtime.scheduling.execution import execute, warm_up
from runtime.scheduling.jobs import Admission, ItemState, JobHandle
from runtime.scheduling.planning import plan_batch
from runtime.scheduling.protocol import SchedulerObserver
from runtime.scheduling.threads import ThreadChoice
from runtime.scheduling.work import Ledger, Plan, Worker, WorkItem

__all__ = ["LLMScheduler", "Pausable"]

log = logging.getLogger(__name__)

_JOIN_S = 60.0


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

    `start=False` runs no threads: `step()` then plans and decodes one round on the caller's thread
    (tests drive it with their own `clock`). `on_update(handle)`: called (under the lock) whenever a
    job's answers change; `on_failure(reason)`: called once when the scheduler stops on a failure;
    `changed`: set whenever the queue changes (for whoever publishes its state); `host_load`: how busy
    the request side is, when another process reports it (see `ThreadChoice`)."""

    def __init__(self, model: LlamaModel, settings: SchedulerSettings | None = None,
                 observer: SchedulerObserver | None = None, clock: Callable[[], float] = time.perf_counter,
                 start: bool = True, on_update: Callable[[JobHandle], None] | None = None,
                 on_failure: Callable[[str], None] | None = None,
                 host_load: Callable[[], float] | None = None) -> None:  # fmt: skip
        self.model = model
        self.settings = settings = settings or SchedulerSettings()
        self.observer = observer or SchedulerObserver()
        self.clock = clock
        self.gpu_layers = model.gpu_layers
        self.failure: str | None = None
        self.on_failure = on_failure
        self.changed = threading.Event()
        self.threads = ThreadChoice(settings, clock, host_load)
        self._lock = threading.Lock()
        self._paused = self._closing = False
        self.ledger = Ledger(self.observer, clock, on_update)
        self.estimate = WorkEstimate(settings.prefix_cache_tokens * settings.contexts)
        self.decoded_tokens = self.decoded_candidates = self.decodes = 0
        n_seq_max = settings.prefix_slots + settings.max_sequences
        self.workers: list[Worker] = []
        try:
            for index in range(settings.contexts):
                context = LlamaContext(model, settings.context_tokens, settings.batch_tokens, n_seq_max,
                                       settings.threads)  # fmt: skip
                self.workers.append(Worker(index, context, settings, self._lock))
        except LLMError:
            self._close_contexts()
            raise
        for worker in self.workers:
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
    @property
    def alive(self) -> bool:
        return self.failure is None and not self._closing

    def _warm_up(self, worker: Worker) -> None:
        """One decode before serving: the first request does not pay for it, and admission starts
        from a measured speed instead of a guess."""
        tokens = min(64, self.settings.batch_tokens)
        measured = warm_up(worker.context, self.model.n_vocab, tokens)
        # how many prefix tokens the cache and its host memory hold, for guessing who is cached
        held = self.settings.prefix_cache_tokens
        if self.settings.prefix_host_mib:
            held += (self.settings.prefix_host_mib << 20) * tokens // max(1, worker.context.sequence_bytes(0))
        self.estimate.cache_tokens = held * self.settings.contexts
        # with fewer threads, proportionally slower until a batch says otherwise
        worker.speed = {n: measured * worker.threads / n for n in {worker.threads, self.threads.busy}}
        worker.context.clear()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            for worker in self.workers:
                worker.condition.notify_all()
            self._fail_all("the LLM scheduler is shutting down")
        for worker in self.workers:
            if worker.thread is not None and worker.thread is not threading.current_thread():
                worker.thread.join(timeout=_JOIN_S)
        self._close_contexts()

    def _close_contexts(self) -> None:
        for worker in self.workers:
            if worker.context is not None and (worker.thread is None or not worker.thread.is_alive()):
                worker.context.close()
                worker.context = None

    def _fail_all(self, reason: str) -> None:
        """Every queued and in-flight job fails now (under the lock)."""
        for worker in self.workers:
            for work in list(worker.queue):
                self.ledger.fail(work, reason)
        self.changed.set()

    def _stop(self, worker: Worker, exc: BaseException) -> None:
        """A decode loop failed outside llama.cpp: the scheduler stops, and nothing waits on it."""
        reason = f"the LLM decode loop {worker.index} stopped: {type(exc).__name__}: {exc}"
        log.error("%s", reason, exc_info=exc)
        with self._lock:
            self.failure = self.failure or reason
            worker.failure = reason
            for other in self.workers:
                other.condition.notify_all()
            self._fail_all(reason)
        if self.on_failure is not None:
            self.on_failure(reason)

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
               user: str | None = None, arrived: float | None = None, tag: object = None) -> Admission:  # fmt: skip
        """Queue the suffixes that can be answered by `deadline` (a `clock()` value), most
        uncertain first, within the queue bound. `arrived`: when the request arrived (default now),
        for telling a deadline too short for the work from one spent waiting. Raises LLMError for
        a prompt that cannot fit, or when the scheduler has stopped."""
        check_prompt(self.settings, prefix, suffixes)
        key = tuple(prefix)
        lengths = [len(s) for s in suffixes]
        with self._lock:
            if not self.alive:
                raise LLMError(self.failure or "the LLM scheduler is shutting down")
            now = self.clock()
            worker = self._worker_for(key, now)
            cold = key not in worker.cache.entries
            ahead = worker.backlog_seconds(now, MARGIN)
            room = max(0, self.settings.queue_candidates - self.ledger.queued)
            admitted, feasible = admissible(lengths, len(key), cold, room, ahead, worker.seconds_per_token,
                                            deadline, now, arrived)  # fmt: skip
            self.estimate.seen(user, len(prefix), lengths, admitted > 0)
            if admitted == 0:
                return Admission(0, feasible)
            handle = JobHandle(admitted, deadline, user, now, self._lock, tag)
            entry, handle.prefix_hit = worker.cache.acquire(key, user)
            work = WorkItem(handle, key, suffixes[:admitted], entry, worker)
            handle.ticket = work  # only this scheduler reads it (collect)
            self.observer.prefix_lookup(handle.prefix_hit)
            worker.queue.append(work)
            self.ledger.queued += admitted
            worker.condition.notify()
            self.changed.set()
            return Admission(admitted, feasible, handle)

    def _worker_for(self, key: tuple[int, ...], now: float) -> Worker:
        for worker in self.workers:
            if key in worker.cache.entries:
                return worker
        return min(self.workers, key=lambda w: w.backlog_seconds(now))

    def retry_after(self) -> float:
        """Seconds until the least busy context has worked off its queue (for Retry-After)."""
        with self._lock:
            now = self.clock()
            return min(w.backlog_seconds(now) for w in self.workers)

    def saturated(self, deadline: float | None, delay: float = 0.0, candidates: int = 1, ahead: int = 0,
                  user: str | None = None) -> float | None:  # fmt: skip
        """Seconds until the LLM could take new work, when it cannot take `candidates` of `user`
        that reach it `delay` seconds from now, after `ahead` candidates of other requests; None
        when it can (see `admission.saturation`)."""
        own = self.estimate.tokens(user)
        with self._lock:
            now = self.clock()
            wait = min(w.backlog_seconds(now) for w in self.workers)
            spt = min(w.seconds_per_token for w in self.workers)
            full = queue_full(self.ledger.queued, candidates, ahead, self.settings.queue_candidates)
            return saturation(now, wait, full, deadline, delay, own * spt)

    def queued_candidates(self) -> int:
        return self.ledger.queued

    def report_host_load(self, load: float) -> None:
        """How busy the request side is: see `ThreadChoice.report`."""
        self.threads.report(load)

    # ------------------------------------------------------------------ the request's side
    def collect(self, job: JobHandle) -> tuple[np.ndarray, np.ndarray]:
        """The job's answers so far (P(yes), ItemState); work not yet decoded is cancelled."""
        with self._lock:
            work: WorkItem = job.ticket
            if not job.done:
                work.abandoned = True
                self.ledger.resolve_unplanned(work, ItemState.CANCELLED)
                self.changed.set()
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

    # ------------------------------------------------------------------ the loop: plan -> execute -> record
    def _loop(self, worker: Worker, warmed: threading.Event) -> None:
        try:
            self._warm_up(worker)
        except Exception as exc:  # noqa: BLE001 - any failure here is the context's, reported by __init__
            worker.failure = f"{type(exc).__name__}: {exc}"
            return
        finally:
            warmed.set()
        try:
            while self._round(worker, wait=True):
                pass
        except BaseException as exc:  # noqa: BLE001 - a loop that dies must fail its jobs, not leave them waiting
            self._stop(worker, exc)

    def _round(self, worker: Worker, wait: bool) -> bool:
        """Plan, decode and record one batch; False when the loop is to end (or, not waiting,
        when there was nothing to do)."""
        with self._lock:
            while wait and self.alive and (self._paused or not worker.queue):
                worker.condition.wait()
            if not self.alive:
                return False
            worker.threads = self.threads.choose()  # the batch is planned with that count's speed
            plan = plan_batch(worker, self.settings, self.ledger, self.clock())
        if plan is None:
            if wait:
                time.sleep(0.001)  # work is queued but blocked (no KV room yet): let others move
            return wait
        context = worker.context
        if worker.threads != worker.applied_threads:
            context.set_threads(worker.threads)
            worker.applied_threads = worker.threads
        answers, error, elapsed = execute(context, plan)
        with self._lock:
            self._record(worker, plan, answers, error, elapsed)
        return True

    def step(self, worker_index: int = 0) -> bool:
        """One round on the calling thread: plan and decode. False when there was nothing to do."""
        return self._round(self.workers[worker_index], wait=False)

    def _record(self, worker: Worker, plan: Plan, answers: list[float], error: str | None, elapsed: float) -> None:
        """Hand the batch's answers to their jobs and finish the jobs that are complete (under the lock)."""
        now = self.clock()
        worker.batch_started = None
        self.decodes += 1
        if error is None:
            self.decoded_tokens += plan.tokens
            self.decoded_candidates += len(plan.suffixes)
            if plan.tokens >= 16:  # a smoothed measured speed for admission
                worker.seconds_per_token = 0.7 * worker.seconds_per_token + 0.3 * elapsed / plan.tokens
        self.observer.batch(plan.tokens, len(plan.suffixes) + len(plan.prefixes), elapsed)
        worker.cache.record(plan.parkings, plan.saved, plan.restores, plan.prefixes, error)
        wasted = 0
        for k, (work, item, seq) in enumerate(plan.suffixes):
            worker.suffix_seqs.append(seq)
            work.inflight -= 1
            handle = work.handle
            if work.abandoned or handle.done:
                wasted += work.abandoned
            elif error is None:
                handle.p[item] = answers[k]
                handle.state[item] = ItemState.DONE
            else:
                handle.state[item] = ItemState.FAILED
                handle.error = error
            self.ledger.finish_if_complete(work, now)
        for work in {id(w): w for w, _, _ in plan.suffixes}.values():
            if not work.handle.done:
                self.ledger.on_update(work.handle)
        if wasted:
            self.observer.dropped("decoded_after_deadline", wasted)
        self.changed.set()

    def stats(self) -> dict[str, float]:
        with self._lock:
            now = self.clock()
            return Worker.totals(self.workers, now) | {
                "queued_candidates": self.ledger.queued,
                "decodes": self.decodes,
                "decoded_tokens": self.decoded_tokens,
                "decoded_candidates": self.decoded_candidates,
            }
