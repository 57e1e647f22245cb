"""The engine: the CRM on every candidate, the entropy router, llama.cpp on the uncertain few.

A request names one user and up to `max_candidates` items. The CRM scores all of them; the most
uncertain (by the bundle's calibrated threshold, or the request's own `llm_fraction` budget) go to
the LLM scheduler, whose probability replaces the CRM's (a hard swap, as in the paper, after the
bundle's calibration). What the LLM cannot answer is answered by the CRM, marked `crm_fallback`
with a typed reason: the deadline passed, the LLM queue was full, the LLM failed, or there is no LLM.

A request is served in two halves so that a server need not hold a thread while the LLM works:
`begin` (encode, CRM, route, queue the LLM work; fast) and `finish` (collect the LLM's answers,
whatever is done by the deadline). `predict` is both, waiting in between.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle import Bundle
from runtime.crm import CRMSession
from runtime.errors import ConfigError, OverloadedError, RequestTooLarge, StoreFull
from runtime.llm import LlamaModel, LLMError, gpu_offload_supported
from runtime.memo import AnswerMemo, MemoFileError
from runtime.metrics import ServingMetrics
from runtime.pasts import RecentUsers, UserPasts
from runtime.paths import model_cache
from runtime.prompt import HistoryEntry, ItemText
from runtime.quality import describe_gain
from runtime.requests import CandidateItem, HistoryItem, Mode, Request
from runtime.router import LLMCalibration, binary_entropy, route_by_budget, route_by_threshold
from runtime.scheduling import ItemState, JobHandle, LLMScheduler, RemoteScheduler, Scheduler, SchedulerSettings
from runtime.settings import EngineSettings
from runtime.state import live_store, state_dir
from runtime.store import FeatureStore, Interaction
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

TOKEN_CACHE_TEXTS = 4096  # prompt texts whose token ids are remembered (at most ~10 KB each)


class FallbackReason(StrEnum):
    """Why a routed candidate was answered by the CRM."""

    DEADLINE = "deadline"  # the LLM had not answered it by the request's deadline
    OVERLOADED = "overloaded"  # the LLM queue could not take it in time
    LLM_ERROR = "llm_error"  # llama.cpp failed on it
    LLM_UNAVAILABLE = "llm_unavailable"  # the bundle's LLM failed to load
    LLM_DISABLED = "llm_disabled"  # served without an LLM (--no-llm, or a CRM-only bundle)
    # the bundle's calibrated LLM answer cannot depend on what the LLM says (slope 0): never decoded
    LLM_NO_SIGNAL = "llm_no_signal"


@dataclass
class Prepared:
    history: list[HistoryItem]
    items: list[ItemText | None]
    inputs: dict[str, np.ndarray]
    known_user: bool


@dataclass
class Pending:
    """A request between `begin` and `finish`: CRM answers in hand, LLM work queued."""

    request: Request
    prepared: Prepared
    crm_p: np.ndarray
    entropy: np.ndarray
    routed: np.ndarray  # indices of the routed candidates, most uncertain first
    unknown: np.ndarray  # routed but untitled: no prompt possible, answered by the CRM
    reasons: dict[int, FallbackReason]  # candidates already known to fall back
    deadline: float | None
    times: dict[str, float]  # perf_counter marks: arrived, begun, encoded, crm
    job: JobHandle | None = None
    llm_error: str | None = None
    sent: np.ndarray | None = None  # the routed candidates sent to the LLM, in `routed`'s order
    recalled: dict[int, float] = field(default_factory=dict)  # routed candidates the memo answered (raw P(yes))
    prompts: tuple[bytes, list[list[int]]] | None = None  # the sent ones' prefix key and suffixes, to remember

    def timeout(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.perf_counter())

    def wait(self) -> None:
        if self.job is not None:
            self.job.wait(self.timeout())

    async def wait_async(self) -> None:
        if self.job is not None:
            await self.job.wait_async(self.timeout())


@dataclass
class _Answers:
    scores: np.ndarray
    llm_raw: np.ndarray
    reasons: dict[int, FallbackReason] = field(default_factory=dict)


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
        self.store = FeatureStore(live_store(bundle, settings.state, settings.store))
        self.pasts = UserPasts(self.store, self.spec)
        self.memo = AnswerMemo(settings.llm_answer_memo) if settings.llm_answer_memo > 0 else None
        # users with remembered answers (looked up even when the LLM is saturated)
        self._recallable = RecentUsers()
        # token ids by text: a repeat user's prefix and every catalog item's suffix are tokenized
        # once (~1.5 ms of a 10-candidate request's 1.7 ms here); bounded, thread-safe, immutable values
        # (the ids the decoding model reads: the cut vocabulary's where it is cut)
        tokens = functools.lru_cache(maxsize=TOKEN_CACHE_TEXTS)
        self._tokens = tokens(lambda text: self._decoded(self.llm.tokenize(text)))
        self.vocab_cut: VocabularyCut | None = None
        largest = min(settings.max_candidates, 4096)  # a request's rows, at most one predict chunk
        self.crm = CRMSession(
            bundle.crm_file, settings.providers, settings.crm_threads or 1,
            engine_cache=self.state / "trt_cache", batches=(1, min(100, largest), largest),
        )  # fmt: skip
        # before the server says ready: TensorRT builds or loads its engine now, not on a first request
        log.info("CRM on %s, warmed up: %s", self.crm.providers[0], self.crm.warm_up()["seconds_by_batch"])
        self.llm: LlamaModel | None = None  # the tokenizer
        self._decoder: LlamaModel | None = None  # the model decoded in this process (llm_process False)
        self.scheduler: Scheduler | None = None
        self._head: tuple[int, ...] = ()  # see _shift_head
        self._bos: int | None = None  # the beginning of a prompt, as decoded
        self.llm_load_error: str | None = None
        if bundle.llm and settings.load_llm:
            self._load_llm()
            self._read_memo()
        self.metrics.watch("corella_llm_loaded", "1 while the LLM serves, else 0",
                           lambda: float(self.llm_status == "serving"))  # fmt: skip
        self.metrics.watch("corella_llm_queue_candidates", "Routed candidates waiting for the LLM",
                           lambda: self.scheduler.queued_candidates() if self.scheduler else 0)  # fmt: skip
        self.metrics.watch("corella_llm_answer_memo_size", "LLM answers remembered by their prompts",
                           lambda: len(self.memo) if self.memo is not None else 0)  # fmt: skip
        # counted when a text is tokenized: a text seen again comes from the tokenization cache
        self.metrics.watch("corella_llm_spelled_tokens", "Prompt tokens outside the cut vocabulary, spelled",
                           lambda: self.vocab_cut.spelled_tokens if self.vocab_cut else 0)  # fmt: skip
        self.metrics.watch("corella_llm_prefix_host_bytes", "Host memory holding copies of cached prefixes",
                           lambda: self.scheduler.prefix_host_bytes() if self.scheduler else 0)  # fmt: skip

    def _load_llm(self) -> None:
        info, settings = self.bundle.llm, self.settings
        path, yes, no = self.bundle.llm_file, info["yes_token_id"], info["no_token_id"]
        try:
            gpu = gpu_offload_supported() and settings.llm_gpu_layers != 0
            scheduler_settings = SchedulerSettings.resolve(settings, gpu)
            # this process tokenizes with the whole vocabulary (no weights); a model decodes
            self.llm = LlamaModel(path, yes, no, vocab_only=True)
            decode = self._cut_vocabulary(path, yes, no)
            try:
                self._start_scheduler(decode, scheduler_settings)
            except LLMError as exc:
                if self.vocab_cut is None:
                    raise
                # a copy that does not load (damaged in the cache, say) is made again next start
                log.warning("the LLM decodes with its whole vocabulary: the cut copy %s failed (%s) and is removed",
                            self.vocab_cut.path, exc)  # fmt: skip
                self.vocab_cut.path.unlink(missing_ok=True)
                self.vocab_cut = None
                if self._decoder is not None:
                    self._decoder.close()
                    self._decoder = None
                self._start_scheduler((path, yes, no), scheduler_settings)
            bos = info.get("bos_token_id")
            self._bos = self._decoded([bos])[0] if bos is not None else None
            self._head = self._suffix_head()
            held = self.scheduler.settings
            log.info("LLM on %s, %d context(s) of %d threads: prefixes in use in %d KV cells, idle ones in up to "
                     "%d MiB of host memory (~%d prefix tokens in all)", "the GPU" if gpu else "the CPU",
                     held.contexts, held.threads, held.prefix_cache_tokens, held.prefix_host_mib,
                     self.scheduler.estimate.cache_tokens)  # fmt: skip
        except LLMError as exc:
            # the server still answers with the CRM; routed candidates fall back, reason llm_unavailable
            self.llm_load_error = str(exc)
            log.error("LLM unavailable, serving CRM only: %s", exc)
            self._close_llm()

    def _start_scheduler(self, decode: tuple[Path, int, int], settings: SchedulerSettings) -> None:
        """The scheduler decoding the GGUF `decode` (path, yes id, no id), here or in a process of its own."""
        if self.settings.llm_process:
            self.scheduler = RemoteScheduler(
                *decode,
                settings,
                self.settings.llm_gpu_layers,
                observer=self.metrics,
                restarts=self.settings.llm_restarts,
                restart_window_s=self.settings.llm_restart_window_s,
            )
        else:
            self._decoder = LlamaModel(*decode, self.settings.llm_gpu_layers)
            self.scheduler = LLMScheduler(self._decoder, settings, observer=self.metrics)

    def _cut_vocabulary(self, path: Path, yes: int, no: int) -> tuple[Path, int, int]:
        """The GGUF llama.cpp decodes and its answer tokens: a copy with the vocabulary cut to the
        catalog's prompts (runtime.vocab, in the model cache), or the bundle's own where nothing is
        cut or cutting fails."""
        if self.settings.llm_vocab <= 0:
            return path, yes, no
        try:
            bos = self.bundle.llm.get("bos_token_id")
            self.vocab_cut = VocabularyCut.prepare(self.llm, path, self._model_digest(), model_cache() / "cuts",
                                                   self._catalog_texts(), self.settings.llm_vocab,
                                                   [t for t in (yes, no, bos) if t is not None])  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a saving, not a need: any failure serves the whole model
            log.warning("the LLM decodes with its whole vocabulary (cutting it failed: %s: %s)",
                        type(exc).__name__, exc)  # fmt: skip
            return path, yes, no
        if self.vocab_cut is None:
            return path, yes, no
        return self.vocab_cut.path, self.vocab_cut.id(yes), self.vocab_cut.id(no)

    def _catalog_texts(self) -> Iterator[str]:
        """What prompts say: the template, around no history and around one of every rating (by half
        stars), and of every catalog item its suffix and its line in a history."""
        top = self.template.rating_max
        yield self.template.prefix([])
        yield self.template.prefix([HistoryEntry(ItemText("Item"), k / 2) for k in range(1, int(2 * top) + 1)])
        ids = self.store.item_ids()
        for start in range(0, len(ids), 1000):
            for item in self.store.items(ids[start : start + 1000]).values():
                yield self.template.suffix(item)
                yield self.template.prefix([HistoryEntry(item, top)])

    def vocabulary(self) -> dict[str, Any] | None:
        """The vocabulary decoded: its tokens, the tokenizer's, and the cut copy with the tokens it spelled."""
        if self.llm is None:
            return None
        cut = self.vocab_cut
        return {"tokens": cut.size if cut else self.llm.n_vocab, "of": self.llm.n_vocab,
                "cut_file": str(cut.path) if cut else None,
                "spelled_tokens": cut.spelled_tokens if cut else 0}  # fmt: skip

    def _decoded(self, tokens: Sequence[int]) -> tuple[int, ...]:
        return self.vocab_cut.ids(tokens) if self.vocab_cut is not None else tuple(tokens)

    def _close_llm(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None
        for model in (self._decoder, self.llm):
            if model is not None:
                model.close()
        self.llm = self._decoder = None

    def _model_digest(self) -> str:
        return self.bundle.manifest["files"][self.bundle.llm["file"]]["sha256"]

    def _memo_file(self) -> tuple[Path, str]:
        """Where the answer memo is kept between runs, and what it belongs to: the model, and the cut
        of its vocabulary (the memo's keys are the token ids decoded)."""
        cut = f"+{self.vocab_cut.path.stem}" if self.vocab_cut is not None else ""
        return self.state / "llm_answers.memo", self._model_digest() + cut

    def _read_memo(self) -> None:
        """The answers the last run saved, when they are the same model's; a file that cannot be read
        is set aside (named in the log), not a reason to stop: the memo is a cache."""
        path, model = self._memo_file()
        if self.memo is None or not path.exists():
            return
        try:
            log.info("answer memo: %d answers read back from %s", self.memo.load(path, model), path)
        except (MemoFileError, OSError) as exc:
            log.warning("answer memo not read back, starting empty: %s", exc)
            with contextlib.suppress(OSError):
                path.replace(path.with_name(path.name + ".unreadable"))

    def close(self) -> None:
        if self.memo is not None and len(self.memo):  # answers are only remembered while an LLM serves
            try:
                path, model = self._memo_file()
                log.info("answer memo: %d answers saved to %s", self.memo.save(path, model), path)
            except OSError as exc:
                log.warning("answer memo not saved: %s", exc)
        self._close_llm()
        self.store.close()

    @property
    def llm_status(self) -> str:
        """One of "serving", "disabled" (no LLM asked for, or none in the bundle), "unavailable" (failed to load)."""
        if self.scheduler is not None:
            return "serving" if self.scheduler.alive else "unavailable"
        return "unavailable" if self.llm_load_error else "disabled"

    @property
    def llm_failure(self) -> str | None:
        """Why the LLM does not serve: it failed to load, or its process died."""
        return self.llm_load_error or (self.scheduler.failure if self.scheduler is not None else None)

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

    def _entries(self, history: list[HistoryItem]) -> list[HistoryEntry]:
        if self.llm is None:
            raise LLMError("no LLM is loaded")
        catalog = self.store.items([h.item_id for h in history])
        return [
            HistoryEntry(catalog.get(h.item_id) or ItemText(title=h.title or f"item {h.item_id}"), h.rating)
            for h in history
        ]

    def prompt_texts(self, history: list[HistoryItem], items: list[ItemText]) -> tuple[str, list[str]]:
        """The shared prefix (the history fitted to the prompt budget) and each item's suffix."""
        entries = self._entries(history)  # raises when no LLM is loaded
        return self.template.texts(entries, items, lambda text: len(self._tokens(text)))

    def prompt_ids(self, history: list[HistoryItem], items: list[ItemText]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the shared prefix (after BOS where the model has one) and of each item's suffix,
        as the decoding model reads them (in the cut vocabulary's ids where it is cut)."""
        return self.template.ids(self._tokens, self._bos, self._entries(history), items)

    def _suffix_head(self) -> tuple[int, ...]:
        """The token ids every candidate's suffix starts with (the template's words before the item,
        "Target movie:"), read off two unlike items."""
        first, second = (self.llm.tokenize(self.template.suffix(ItemText(title))) for title in ("Alpha", "Zulu 9"))
        n = 0
        while n < min(len(first), len(second)) - 1 and first[n] == second[n]:
            n += 1
        return self._decoded(first[:n])

    def _shift_head(self, prefix: list[int], suffixes: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        """The suffixes' common head moved to the end of the prefix: decoded (and cached) once per
        user instead of once per candidate. The same tokens at the same positions, so the same
        answers; a request whose suffixes do not all start with it is left as it is."""
        head = self._head
        n = len(head)
        if not n or any(len(s) <= n or tuple(s[:n]) != head for s in suffixes):
            return prefix, suffixes
        return [*prefix, *head], [s[n:] for s in suffixes]

    def _route(self, request: Request, entropy: np.ndarray) -> np.ndarray:
        n = len(entropy)
        if request.mode == "crm":
            return np.zeros(n, dtype=bool)
        if request.mode == "llm":
            return np.ones(n, dtype=bool)
        if request.llm_fraction is not None:
            return route_by_budget(entropy, request.llm_fraction)
        return route_by_threshold(entropy, self.threshold)

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
        routed = self._route(request, entropy)
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
            pending.reasons.update(dict.fromkeys(routed.tolist(), FallbackReason.LLM_NO_SIGNAL))
            return
        if self.scheduler is None or not self.scheduler.alive:
            # a scheduler that is not alive is an LLM that was asked for and is down (its process
            # dying or starting again, its failure perhaps not yet recorded): unavailable, not disabled
            down = self.scheduler is not None or self.llm_failure
            reason = FallbackReason.LLM_UNAVAILABLE if down else FallbackReason.LLM_DISABLED
            if self.scheduler is not None and pending.request.user_id in self._recallable:
                routed = self._recall_only(pending)  # the LLM's earlier answers outlive its process
            pending.reasons.update(dict.fromkeys(routed.tolist(), reason))
            pending.llm_error = self.llm_failure
            return
        request = pending.request
        saturated = None if request.mode == "llm" else self.scheduler.saturated(pending.deadline, user=request.user_id)
        if saturated is not None and request.user_id not in self._recallable:
            # the LLM could not take even one candidate in time: answered by the CRM at once, neither
            # tokenized nor sent (under load most requests; their work took CPU from those it can take)
            pending.reasons.update(dict.fromkeys(routed.tolist(), FallbackReason.OVERLOADED))
            return
        try:
            prefix, suffixes = self._prompt(pending)
            routed, suffixes = self._recall(pending, prefix, suffixes)
            if saturated is not None or not len(routed):
                pending.reasons.update(dict.fromkeys(routed.tolist(), FallbackReason.OVERLOADED))
                return
            admission = self.scheduler.submit(prefix, suffixes, pending.deadline, user=request.user_id,
                                              arrived=pending.times["arrived"])  # fmt: skip
        except LLMError as exc:
            log.warning("LLM refused a request, answering with the CRM: %s", exc)
            pending.reasons.update(dict.fromkeys(routed.tolist(), FallbackReason.LLM_ERROR))
            pending.llm_error = str(exc)
            return
        pending.sent = routed
        admitted, feasible = admission.admitted, admission.feasible
        if admitted == 0 and feasible > 0 and request.mode == "llm":
            retry = self.scheduler.retry_after()
            raise OverloadedError(f"the LLM queue is full ({self.scheduler.queued_candidates()} candidates "
                                  f"waiting); retry in {retry:.1f} s", retry)  # fmt: skip
        pending.reasons.update(dict.fromkeys(routed[admitted:feasible].tolist(), FallbackReason.OVERLOADED))
        pending.reasons.update(dict.fromkeys(routed[max(admitted, feasible) :].tolist(), FallbackReason.DEADLINE))
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
        return self._shift_head(*self.prompt_ids(prepared.history, [prepared.items[i] for i in pending.routed]))

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
        crm_p, n = pending.crm_p, len(pending.crm_p)
        answers = _Answers(crm_p.copy(), np.full(n, np.nan), dict(pending.reasons))
        llm_done = time.perf_counter()
        if pending.recalled:
            recalled = np.fromiter(pending.recalled, dtype=np.int64, count=len(pending.recalled))
            answers.llm_raw[recalled] = raw = np.fromiter(pending.recalled.values(), dtype=np.float64)
            answers.scores[recalled] = self.calibration.apply(raw)
        if pending.job is not None:
            self._take_llm(pending, answers)
            llm_done = time.perf_counter()
        routes = ["llm" if answered else "crm" for answered in np.isfinite(answers.llm_raw).tolist()]
        for i in answers.reasons:
            routes[i] = "crm_fallback"
        fallbacks = Counter(str(r) for r in answers.reasons.values())
        note = "unknown item: no title for the LLM, answered by the CRM"
        unknown = set(pending.unknown.tolist())
        times, request = pending.times, pending.request
        # plain floats, all at once (a numpy scalar read per field costs more than the rest of the row)
        scores, crm, llm, entropy = (a.tolist() for a in (answers.scores, crm_p, answers.llm_raw, pending.entropy))
        answer = {
            "user_id": request.user_id,
            "known_user": pending.prepared.known_user,
            "history_length": len(pending.prepared.history),
            "predictions": [
                {
                    "item_id": c.item_id,
                    "score": scores[i],
                    "route": routes[i],
                    "crm_score": crm[i],
                    **({"llm_score": llm[i]} if routes[i] == "llm" else {}),
                    **({"fallback_reason": str(answers.reasons[i])} if i in answers.reasons else {}),
                    "entropy": entropy[i],
                    **({"note": note} if i in unknown else {}),
                }
                for i, c in enumerate(request.candidates)
            ],  # fmt: skip
            "routed": len(pending.routed),
            "llm_recalled": len(pending.recalled),  # of the routed, answered by the LLM's remembered answers
            "fallbacks": dict(fallbacks),
            "llm_error": pending.llm_error,
            "timings_ms": {
                "wait": 1000 * (times["begun"] - times["arrived"]),  # for a CPU worker, in a server
                "encode": 1000 * (times["encoded"] - times["begun"]),
                "crm": 1000 * (times["crm"] - times["encoded"]),
                "llm": 1000 * (llm_done - times["crm"]),
                **self._job_timings(pending.job),
                "total": 1000 * (time.perf_counter() - times["arrived"]),
            },
        }
        self.metrics.observe(answer)
        return answer

    def _take_llm(self, pending: Pending, answers: _Answers) -> None:
        job = pending.job
        p, state = self.scheduler.collect(job)
        indices = pending.sent[: job.size]
        done = state == ItemState.DONE
        answers.llm_raw[indices[done]] = p[done]
        answers.scores[indices[done]] = self.calibration.apply(p[done])
        if self.memo is not None and pending.prompts is not None and done.any():
            key, suffixes = pending.prompts
            self.memo.remember(key, [suffixes[k] for k in np.flatnonzero(done).tolist()], p[done].tolist())
            if (user := pending.request.user_id) is not None:
                self._recallable.add(user)
        for i, item_state in zip(indices[~done].tolist(), state[~done].tolist(), strict=True):
            failed = item_state == ItemState.FAILED
            answers.reasons[i] = FallbackReason.LLM_ERROR if failed else FallbackReason.DEADLINE
        if job.error and (state == ItemState.FAILED).any():
            pending.llm_error = job.error

    @staticmethod
    def _job_timings(job: JobHandle | None) -> dict[str, float]:
        if job is None or job.first_planned is None:
            return {}
        end = job.finished if job.finished is not None else time.perf_counter()
        queued, decoding = job.first_planned - job.enqueued, end - job.first_planned
        return {"llm_queued": 1000 * queued, "llm_decoding": 1000 * decoding}

    def predict(self, request: Request, arrived: float | None = None) -> dict[str, Any]:
        pending = self.begin(request, arrived)
        pending.wait()
        return self.finish(pending)

    def score_prompts(self, prefix: list[int], suffixes: list[list[int]]) -> np.ndarray:
        """P(yes) of prefix + each suffix through the scheduler, with no deadline (bench, tests)."""
        return self.score_many([(prefix, suffixes)])[0]

    def score_many(self, prompts: list[tuple[list[int], list[list[int]]]], wave: int = 64) -> list[np.ndarray]:
        """`score_prompts` for many prefixes at once: they are queued in waves and decoded together."""
        if self.scheduler is None:
            raise LLMError(self.llm_load_error or "no LLM is loaded")
        out: list[np.ndarray] = []
        for start in range(0, len(prompts), wave):
            jobs = []
            for prefix, suffixes in prompts[start : start + wave]:
                job = self.scheduler.submit(*self._shift_head(prefix, suffixes), None).job
                if job is None or job.size < len(suffixes):
                    raise OverloadedError("the LLM queue is full", self.scheduler.retry_after())
                jobs.append(job)
            for job in jobs:
                job.wait()
                p, state = self.scheduler.collect(job)
                if (state != ItemState.DONE).any():
                    raise LLMError(job.error or "the LLM did not answer every prompt")
                out.append(p)
        return out

    def report_host_load(self, load: float) -> None:
        """How busy the request side is (see server._LoadReporter), for the LLM's thread count."""
        if self.scheduler is not None:
            self.scheduler.report_host_load(load)

    def forget_answers(self) -> None:
        """Drop every remembered LLM answer (timings of the LLM's own work: the bench)."""
        if self.memo is not None:
            self.memo.clear()
        self._recallable.clear()

    def append_events(self, events: list[Interaction]) -> int:
        """Append (durably) and forget the users' cached prefixes; returns how many were new."""
        try:
            count = self.store.append(events, self.settings.max_store_interactions)
        except StoreFull:
            self.metrics.events_refused.inc(len(events))
            raise
        users = {e.user_id for e in events}
        self.pasts.appended(users)
        for user in users:
            self._recallable.discard(user)  # their prefix changes: the memo has no answers for it
            if self.scheduler is not None:
                self.scheduler.invalidate_user(user)
        self.metrics.events.inc(count)
        return count
