"""The engine: the CRM on every candidate, the entropy router, llama.cpp on the uncertain few.

A request names one user and up to `max_candidates` items. The CRM scores all of them; the most
uncertain (by the bundle's calibrated threshold, or the request's own `llm_fraction` budget) go to
the LLM scheduler, whose probability replaces the CRM's (a hard swap, as in the paper, after the
bundle's calibration). What the LLM cannot answer is answered by the CRM, marked `crm_fallback`
with a typed reason: the deadline passed, the LLM queue was full, the LLM failed, or there is no LLM.

A request is served in two halves so that a server need not hold a thread while the LLM works:
`begin` (encode, CRM, route, queue the LLM work; fast) and `finish` (collect the LLM's answers,
whatever is done by the deadline). `predict` is both, waiting in between.

The engine holds the request's flow; its parts live by role: the LLM it serves (`served_llm`), users'
pasts (`pasts`), the answer and its fallback reasons (`answers`), routing (`router`), admission
(`scheduling.admission`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from runtime.artifacts.bundle import Bundle
from runtime.artifacts.pgstore import PostgresStore, postgres_live_store
from runtime.artifacts.state import live_store, state_dir
from runtime.artifacts.store import FeatureStore, Interaction
from runtime.crm import CRMSession
from runtime.engine.answers import Answers, FallbackReason, Pending, Prepared
from runtime.engine.pasts import RecentUsers, UserPasts
from runtime.engine.requests import CandidateItem, HistoryItem, Mode, Request
from runtime.engine.served_llm import ServedLLM
from runtime.errors import ConfigError, OverloadedError, RequestTooLarge, StoreFull
from runtime.llm import LlamaModel, LLMError
from runtime.memo import AnswerMemo
from runtime.metrics import ServingMetrics
from runtime.prompt import ItemText
from runtime.quality import describe_gain
from runtime.router import LLMCalibration, binary_entropy, route_request
from runtime.scheduling import ItemState, Scheduler
from runtime.settings import EngineSettings
from runtime.vocab import VocabularyCut

__all__ = [
    "EngineSettings",
    "HistoryItem",
    "CandidateItem",
    "Request",
    "Engine",
    "Mode",
    "FallbackReason",
    "Pending",
]

log = logging.getLogger(__name__)


class Engine:
    """Loads a verified bundle; `predict` (or `begin` + `finish`) is safe to call from many threads."""

    def __init__(self, bundle: Bundle, settings: EngineSettings | None = None,
                 metrics: ServingMetrics | None = None) -> None:  # fmt: skip
        self.bundle = bundle
        self.settings = settings = settings or EngineSettings()
        self.metrics = metrics or ServingMetrics()
        self.spec = bundle.spec
        self.template = bundle.template
        self.threshold = float(bundle.router["threshold"])
        # Platt map fitted at export on the shipped GGUF's answers to routed validation samples
        self.calibration = LLMCalibration.from_dict(bundle.router.get("llm_calibration"))
        # slope 0: the calibrated answer is one constant whatever the LLM says; decoding it would cost
        # 10-20x the CRM to serve a number worse than the CRM's own, so routed candidates take the CRM's
        self.llm_silent = bool(bundle.llm) and self.calibration.slope <= 0 and not settings.llm_decode_without_signal
        if self.llm_silent:
            log.warning("the bundle's LLM calibration has slope 0 (its answers carried no signal on %d routed "
                        "validation samples): routed candidates are answered by the CRM, reason llm_no_signal",
                        self.calibration.samples)  # fmt: skip
        if bundle.llm and (gain := bundle.router.get("expected_gain")):
            log.info("the LLM's expected gain (export, routed validation samples): %s", describe_gain(gain))
        # one thread: a request's few hundred rows take ~0.5 ms; a second thread costs more CPU than it saves
        self.state = state_dir(bundle, settings.state)
        if settings.store_url:  # one PostgreSQL store for several replicas
            self.store: FeatureStore = postgres_live_store(settings.store_url, bundle)
        else:
            self.store = FeatureStore(live_store(bundle, settings.state, settings.store))
        self.pasts = UserPasts(self.store, self.spec)
        # users with remembered answers (looked up even when the LLM is saturated)
        self._recallable = RecentUsers()
        largest = min(settings.max_candidates, 4096)  # a request's rows, at most one predict chunk
        self.crm = CRMSession(
            bundle.crm_file, settings.providers, settings.crm_threads or 1,
            engine_cache=self.state / "trt_cache", batches=(1, min(100, largest), largest),
        )  # fmt: skip
        # before the server says ready: TensorRT builds or loads its engine now, not on a first request
        log.info("CRM on %s, warmed up: %s", self.crm.providers[0], self.crm.warm_up()["seconds_by_batch"])
        # the LLM: its tokenizer, the decoding copy, the scheduler, the answer memo (down when it fails to load)
        self.served = ServedLLM(bundle, settings, self.metrics, self.store, self.state)
        if isinstance(self.store, PostgresStore):  # another replica's events change this one's answers
            self.store.on_change = self.users_changed

    def close(self) -> None:
        self.served.close()
        self.store.close()

    # the served LLM's parts, as the engine's callers have always read them
    @property
    def scheduler(self) -> Scheduler | None:
        return self.served.scheduler

    @property
    def llm(self) -> LlamaModel | None:
        return self.served.llm

    @property
    def memo(self) -> AnswerMemo | None:
        return self.served.memo

    @property
    def vocab_cut(self) -> VocabularyCut | None:
        return self.served.vocab_cut

    @property
    def llm_status(self) -> str:
        return self.served.status

    @property
    def llm_failure(self) -> str | None:
        return self.served.failure

    def vocabulary(self) -> dict[str, Any] | None:
        return self.served.vocabulary()

    def prompt_ids(self, history: list[HistoryItem], items: list[ItemText]) -> tuple[list[int], list[list[int]]]:
        return self.served.prompt_ids(history, items)

    def prompt_texts(self, history: list[HistoryItem], items: list[ItemText]) -> tuple[str, list[str]]:
        return self.served.prompt_texts(history, items)

    @property
    def ready(self) -> bool:
        """The CRM answers; a failed LLM degrades the answers (routed candidates fall back), not readiness."""
        return self.crm is not None

    # ------------------------------------------------------------------ request pieces
    def prepare(self, request: Request) -> Prepared:
        """Resolve the user and the candidates (request first, then the store) and encode them."""
        attributes, history, summary, known_user = self.pasts.user(request)
        candidates = request.candidates
        item_ids = [c.item_id for c in candidates]
        catalog = self.store.items(item_ids)
        items: list[ItemText | None] = []
        for c in candidates:
            stored = catalog.get(c.item_id)
            if c.title:
                year = c.year or (stored.year if stored else None)
                tags = tuple(c.tags) if c.tags is not None else (stored.tags if stored else ())
                stats = (stored.rating_mean, stored.rating_count, stored.liked_share) if stored else (None, None, None)
                items.append(ItemText(c.title, year, tags, *stats))
            else:
                items.append(stored)
        item_tags = [it.tags if it else () for it in items]
        statistics = self.spec.request_statistics(
            summary, self.store.item_totals(item_ids, before=request.at), item_tags
        )
        inputs = self.spec.encode_request(
            user_id=request.user_id,
            user_attributes=attributes,
            history_items=[h.item_id for h in history],
            history_ratings=[h.rating for h in history],
            item_ids=item_ids,
            item_years=[it.year if it else None for it in items],
            item_tags=item_tags,
            statistics=statistics,
        )
        return Prepared(history, items, inputs, known_user)

    # ------------------------------------------------------------------ predict
    def begin(self, request: Request, arrived: float | None = None) -> Pending:
        """Encode, score with the CRM, route, and queue the routed work (the deadline counts from
        `arrived`, a perf_counter value, default now). Raises OverloadedError for a mode "llm"
        request that the LLM cannot take at all."""
        begun = time.perf_counter()
        started = arrived if arrived is not None else begun
        candidates = request.candidates
        if not candidates:
            raise ConfigError("a request needs at least one candidate")
        if len(candidates) > self.settings.max_candidates:
            raise RequestTooLarge(f"{len(candidates)} candidates exceed the limit of {self.settings.max_candidates}")
        deadline = self.deadline(request, started)
        prepared = self.prepare(request)
        encoded = time.perf_counter()
        crm_p = self.crm.predict(prepared.inputs)
        entropy = binary_entropy(crm_p)
        routed = route_request(entropy, request.mode, request.llm_fraction, self.threshold)
        titled = np.array([it is not None for it in prepared.items])
        order = np.flatnonzero(routed & titled)
        pending = Pending(
            request, prepared, crm_p, entropy, order[np.argsort(-entropy[order], kind="stable")],
            np.flatnonzero(routed & ~titled), {}, deadline,
            {"arrived": started, "begun": begun, "encoded": encoded, "crm": time.perf_counter()},
        )  # fmt: skip
        if len(pending.routed):
            self._submit(pending)
        return pending

    def deadline(self, request: Request, arrived: float) -> float | None:
        """The request's deadline as a perf_counter value: its own deadline_ms, or the default, from arrival."""
        deadline_ms = request.deadline_ms if request.deadline_ms is not None else self.settings.default_deadline_ms
        return None if deadline_ms is None else arrived + deadline_ms / 1000.0

    def refuse_if_saturated(self, request: Request, arrived: float, delay: float = 0.0, ahead: int = 0) -> None:
        """Raise OverloadedError for a mode "llm" request that the LLM cannot take (no queue room
        for its candidates after the `ahead` candidates that will reach it first, or a backlog that,
        with the request's own least work, outlasts its deadline once `delay` seconds of waiting for
        a CPU worker have passed): cheap, before any encoding."""
        if request.mode != "llm" or self.scheduler is None or self.llm_silent or request.user_id in self._recallable:
            return  # a user with remembered answers may need no LLM time: admission decides, after the memo
        wait = self.scheduler.saturated(
            self.deadline(request, arrived), delay, len(request.candidates), ahead, request.user_id
        )
        if wait is not None:
            raise OverloadedError(f"the LLM queue is full ({self.scheduler.queued_candidates()} candidates "
                                  f"waiting); retry in {wait:.1f} s", wait)  # fmt: skip

    def _submit(self, pending: Pending) -> None:
        routed = pending.routed
        if self.llm_silent:
            pending.fall_back(routed, FallbackReason.LLM_NO_SIGNAL)
            return
        if self.scheduler is None or not self.scheduler.alive:
            # a scheduler that is not alive is an LLM that was asked for and is down (its process
            # dying or starting again, its failure perhaps not yet recorded): unavailable, not disabled
            down = self.scheduler is not None or self.llm_failure
            reason = FallbackReason.LLM_UNAVAILABLE if down else FallbackReason.LLM_DISABLED
            if self.scheduler is not None and pending.request.user_id in self._recallable:
                routed = self._recall_only(pending)  # the LLM's earlier answers outlive its process
            pending.fall_back(routed, reason)
            pending.llm_error = self.llm_failure
            return
        request = pending.request
        saturated = None if request.mode == "llm" else self.scheduler.saturated(pending.deadline, user=request.user_id)
        if saturated is not None and request.user_id not in self._recallable:
            # the LLM could not take even one candidate in time: answered by the CRM at once, neither
            # tokenized nor sent (under load most requests; their work took CPU from those it can take)
            pending.fall_back(routed, FallbackReason.OVERLOADED)
            return
        try:
            prefix, suffixes = self._prompt(pending)
            routed, suffixes = self._recall(pending, prefix, suffixes)
            if saturated is not None or not len(routed):
                pending.fall_back(routed, FallbackReason.OVERLOADED)
                return
            admission = self.scheduler.submit(prefix, suffixes, pending.deadline, user=request.user_id,
                                              arrived=pending.times["arrived"])  # fmt: skip
        except LLMError as exc:
            log.warning("LLM refused a request, answering with the CRM: %s", exc)
            pending.fall_back(routed, FallbackReason.LLM_ERROR)
            pending.llm_error = str(exc)
            return
        pending.sent = routed
        admitted, feasible = admission.admitted, admission.feasible
        if admitted == 0 and feasible > 0 and request.mode == "llm":
            retry = self.scheduler.retry_after()
            raise OverloadedError(f"the LLM queue is full ({self.scheduler.queued_candidates()} candidates "
                                  f"waiting); retry in {retry:.1f} s", retry)  # fmt: skip
        pending.fall_back(routed[admitted:feasible], FallbackReason.OVERLOADED)
        pending.fall_back(routed[max(admitted, feasible) :], FallbackReason.DEADLINE)
        pending.job = admission.job

    def _recall_only(self, pending: Pending) -> np.ndarray:
        """`_recall` for a request that can go no further (the LLM is down): the routed candidates
        left without an answer."""
        try:
            prompt = self._prompt(pending)
        except LLMError:
            return pending.routed
        return self._recall(pending, *prompt)[0]

    def _prompt(self, pending: Pending) -> tuple[list[int], list[list[int]]]:
        """Token ids of the request's prefix and of each routed candidate's suffix, as decoded."""
        prepared = pending.prepared
        return self.served.shift_head(*self.prompt_ids(prepared.history, [prepared.items[i] for i in pending.routed]))

    def _recall(
        self, pending: Pending, prefix: list[int], suffixes: list[list[int]]
    ) -> tuple[np.ndarray, list[list[int]]]:
        """The routed candidates the memo cannot answer and their suffixes (what goes to the LLM);
        the memo's answers go to `pending.recalled`."""
        if self.memo is None:
            return pending.routed, suffixes
        key = self.memo.prefix_key(prefix)
        known = self.memo.recall(key, suffixes)
        pending.recalled = {i: p for i, p in zip(pending.routed.tolist(), known, strict=True) if p is not None}
        rest = [k for k, p in enumerate(known) if p is None]
        pending.prompts = (key, [suffixes[k] for k in rest])
        return pending.routed[rest], pending.prompts[1]

    def finish(self, pending: Pending) -> dict[str, Any]:
        """The answer: the LLM's answers that are in, the CRM's for the rest (cancels what is left)."""
        answers = Answers.of(pending)
        llm_done = time.perf_counter()
        if pending.recalled:
            recalled = np.fromiter(pending.recalled, dtype=np.int64, count=len(pending.recalled))
            answers.take_llm(recalled, np.fromiter(pending.recalled.values(), dtype=np.float64), self.calibration)
        if pending.job is not None:
            self._take_llm(pending, answers)
            llm_done = time.perf_counter()
        answer = answers.compose(pending, llm_done)
        answer["bundle_id"] = self.bundle.id  # which bundle made it (a reload switches bundles while serving)
        self.metrics.observe(answer)
        return answer

    def _take_llm(self, pending: Pending, answers: Answers) -> None:
        job = pending.job
        p, state = self.scheduler.collect(job)
        indices = pending.sent[: job.size]
        done = state == ItemState.DONE
        answers.take_llm(indices[done], p[done], self.calibration)
        if self.memo is not None and pending.prompts is not None and done.any():
            key, suffixes = pending.prompts
            self.memo.remember(key, [suffixes[k] for k in np.flatnonzero(done).tolist()], p[done].tolist())
            if (user := pending.request.user_id) is not None:
                self._recallable.add(user)
        for i, item_state in zip(indices[~done].tolist(), state[~done].tolist(), strict=True):
            answers.reasons[i] = FallbackReason.for_item(item_state)
        if job.error and (state == ItemState.FAILED).any():
            pending.llm_error = job.error

    def predict(self, request: Request, arrived: float | None = None) -> dict[str, Any]:
        pending = self.begin(request, arrived)
        pending.wait()
        return self.finish(pending)

    def report_host_load(self, load: float) -> None:
        """How busy the request side is (see serving.workers.LoadReporter), for the LLM's thread count."""
        if self.scheduler is not None:
            self.scheduler.report_host_load(load)

    def forget_answers(self) -> None:
        """Drop every remembered LLM answer (timings of the LLM's own work: the bench)."""
        if self.memo is not None:
            self.memo.clear()
        self._recallable.clear()

    def add_items(self, entries: list[tuple[str, ItemText]]) -> dict[str, int]:
        """Add items to the live catalog, or update them (durably): predictable at once, by the CRM
        through their attributes (an unknown id is the OOV bucket, their totals start from zero)
        and by the LLM through their text."""
        added, updated = self.store.upsert_items(entries)
        self.metrics.items_posted.labels("added").inc(added)
        self.metrics.items_posted.labels("updated").inc(updated)
        return {"added": added, "updated": updated}

    def append_events(self, events: list[Interaction]) -> int:
        """Append (durably) and forget the users' cached prefixes; returns how many were new."""
        try:
            count = self.store.append(events, self.settings.max_store_interactions)
        except StoreFull:
            self.metrics.events_refused.inc(len(events))
            raise
        self.users_changed({e.user_id for e in events})
        self.metrics.events.inc(count)
        return count

    def users_changed(self, users: set[str] | None) -> None:
        """Forget what is cached of `users` (None: of every user): their pasts, prompt prefixes and
        remembered answers. Called after an append here, and by a shared store when another replica
        wrote (None when it may have missed which users: prefixes and answers are keyed by their
        prompts, so the users' pasts are what could be stale)."""
        if users is None:
            self.pasts.clear()
            self._recallable.clear()
            return
        self.pasts.appended(users)
        for user in users:
            self._recallable.discard(user)  # their prefix changes: the memo has no answers for it
            if self.scheduler is not None:
                self.scheduler.invalidate_user(user)
