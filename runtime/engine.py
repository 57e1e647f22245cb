"""The engine: the CRM on every candidate, the entropy router, llama.cpp on the uncertain few.

A request names one user and up to `max_candidates` items. The CRM scores all of them; the most
uncertain (by the bundle's calibrated threshold, or the request's own `llm_fraction` budget) go to
the LLM, whose probability replaces the CRM's (a hard swap, as in the paper). What the LLM cannot
finish before the deadline, or fails on, is answered by the CRM and marked `crm_fallback`.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from runtime.bundle import Bundle
from runtime.crm import CRMSession
from runtime.errors import ConfigError, CorellaError
from runtime.features import normalize_user_attributes
from runtime.llm import LlamaScorer, LlamaSettings, LLMError
from runtime.prompt import HistoryEntry, ItemText
from runtime.router import LLMCalibration, binary_entropy, route_by_budget, route_by_threshold
from runtime.store import FeatureStore, Interaction

__all__ = ["EngineSettings", "HistoryItem", "CandidateItem", "Request", "Engine", "Mode", "live_store"]

log = logging.getLogger(__name__)

Mode = Literal["hybrid", "crm", "llm"]


@dataclass(frozen=True)
class EngineSettings:
    providers: tuple[str, ...] = ("auto",)
    crm_threads: int | None = None
    llm_threads: int | None = None
    llm_context: int = 4096
    llm_gpu_layers: int | None = None
    default_deadline_ms: float | None = 5000.0
    max_candidates: int = 500
    load_llm: bool = True
    store_path: Path | None = None  # the live feature store; default <bundle>/state/store.sqlite


def live_store(bundle: Bundle, path: Path | None = None) -> Path:
    """The store the server reads and appends to.

    The bundle's store.sqlite is a verified snapshot and is never written; on first start it is
    copied to the live location, which then keeps every appended event across restarts.
    """
    path = Path(path) if path is not None else bundle.path / "state" / "store.sqlite"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        shutil.copy2(bundle.store_file, partial)
        os.replace(partial, path)
        log.info("live feature store created at %s", path)
    return path


@dataclass(frozen=True)
class HistoryItem:
    item_id: str
    rating: float
    timestamp: int | None = None
    title: str | None = None


@dataclass(frozen=True)
class CandidateItem:
    item_id: str
    title: str | None = None
    year: str | None = None
    tags: tuple[str, ...] | None = None


@dataclass
class Request:
    candidates: list[CandidateItem]
    user_id: str | None = None
    user_attributes: dict[str, Any] | None = None
    history: list[HistoryItem] | None = None
    mode: Mode = "hybrid"
    llm_fraction: float | None = None
    deadline_ms: float | None = None
    at: int | None = None  # history from the store strictly before this time (default: all)


@dataclass
class Prepared:
    history: list[HistoryItem]
    items: list[ItemText | None]
    inputs: dict[str, np.ndarray]
    known_user: bool


@dataclass
class Stats:
    """Counters the server exposes as Prometheus metrics."""

    routes: Counter = field(default_factory=Counter)
    llm_errors: int = 0
    deadline_fallbacks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Engine:
    """Loads a verified bundle; `predict` is safe to call from many threads."""

    def __init__(self, bundle: Bundle, settings: EngineSettings | None = None) -> None:
        self.bundle = bundle
        self.settings = settings = settings or EngineSettings()
        self.spec = bundle.spec
        self.template = bundle.template
        self.threshold = float(bundle.router["threshold"])
        # Platt map fitted at export on the shipped GGUF's answers to routed validation samples
        self.calibration = LLMCalibration.from_dict(bundle.router.get("llm_calibration"))
        self.crm = CRMSession(
            bundle.crm_file, settings.providers, settings.crm_threads, engine_cache=bundle.path / "trt_cache"
        )
        self.store = FeatureStore(live_store(bundle, settings.store_path))
        self.stats = Stats()
        self.llm: LlamaScorer | None = None
        self.llm_load_error: str | None = None
        self._llm_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        if bundle.llm and settings.load_llm:
            try:
                self.llm = self._llm_worker.submit(self._load_llm).result()
            except LLMError as exc:
                # the server still answers with the CRM; every routed candidate is a counted fallback
                self.llm_load_error = str(exc)
                log.error("LLM unavailable, serving CRM only: %s", exc)

    def _load_llm(self) -> LlamaScorer:
        info = self.bundle.llm
        settings = LlamaSettings(
            n_ctx=self.settings.llm_context,
            n_threads=self.settings.llm_threads,
            gpu_layers=self.settings.llm_gpu_layers,
        )
        return LlamaScorer(self.bundle.llm_file, info["yes_token_id"], info["no_token_id"], settings)

    def close(self) -> None:
        if self.llm is not None:
            self._llm_worker.submit(self.llm.close).result()
            self.llm = None
        self._llm_worker.shutdown(wait=True)
        self.store.close()

    @property
    def ready(self) -> bool:
        return self.crm is not None and (self.llm is not None or not self.bundle.llm or not self.settings.load_llm)

    # ------------------------------------------------------------------ request pieces
    def _user(self, request: Request) -> tuple[dict[str, str], list[HistoryItem], bool]:
        profile = self.store.user_attributes(request.user_id) if request.user_id is not None else None
        known = profile is not None
        if request.user_attributes is not None:
            attributes = normalize_user_attributes(request.user_attributes)
        else:
            attributes = profile or {}
        if request.history is not None:
            history = list(request.history)
        elif request.user_id is not None:
            history = [
                HistoryItem(h.item_id, h.rating, h.timestamp)
                for h in self.store.history(request.user_id, self.spec.history_length, before=request.at)
            ]
        else:
            history = []
        return attributes, history[-self.spec.history_length :], known or bool(history)

    def _prompt_prefix_ids(self, history: list[HistoryItem]) -> list[int]:
        catalog = self.store.items([h.item_id for h in history])
        entries = [
            HistoryEntry(catalog.get(h.item_id) or ItemText(title=h.title or f"item {h.item_id}"), h.rating)
            for h in history
        ]
        llm = self.llm
        fitted = self.template.fit_history(entries, lambda text: len(llm.tokenize(text)))
        bos = self.bundle.llm.get("bos_token_id")
        return ([bos] if bos is not None else []) + llm.tokenize(self.template.prefix(fitted))

    def prepare(self, request: Request) -> Prepared:
        """Resolve the user and the candidates (request first, then the store) and encode them."""
        attributes, history, known_user = self._user(request)
        candidates = request.candidates
        catalog = self.store.items([c.item_id for c in candidates])
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
        n = len(candidates)
        inputs = self.spec.encode(
            user_ids=[request.user_id] * n,
            item_ids=[c.item_id for c in candidates],
            user_attributes=[attributes] * n,
            item_years=[it.year if it else None for it in items],
            item_tags=[it.tags if it else () for it in items],
            history_items=[[h.item_id for h in history]] * n,
            history_ratings=[[h.rating for h in history]] * n,
        )
        return Prepared(history, items, inputs, known_user)

    def prompt_ids(self, history: list[HistoryItem], items: list[ItemText]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the shared prefix and of each item's suffix (call on the LLM worker)."""
        return self._prompt_prefix_ids(history), [self.llm.tokenize(self.template.suffix(it)) for it in items]

    def on_llm_worker(self, function: Any, *args: Any) -> Any:
        """Run `function` on the thread that owns the llama.cpp context and wait for it."""
        return self._llm_worker.submit(function, *args).result()

    # ------------------------------------------------------------------ predict
    def predict(self, request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        candidates = request.candidates
        if not candidates:
            raise ConfigError("a request needs at least one candidate")
        if len(candidates) > self.settings.max_candidates:
            raise ConfigError(f"{len(candidates)} candidates exceed the limit of {self.settings.max_candidates}")
        deadline_ms = request.deadline_ms if request.deadline_ms is not None else self.settings.default_deadline_ms
        deadline = started + deadline_ms / 1000.0 if deadline_ms is not None else None

        prepared = self.prepare(request)
        history, items, inputs = prepared.history, prepared.items, prepared.inputs
        n = len(candidates)
        encoded = time.perf_counter()
        crm_p = self.crm.predict(inputs)
        crm_done = time.perf_counter()
        entropy = binary_entropy(crm_p)

        if request.mode == "crm":
            routed = np.zeros(n, dtype=bool)
        elif request.mode == "llm":
            routed = np.ones(n, dtype=bool)
        elif request.llm_fraction is not None:
            routed = route_by_budget(entropy, request.llm_fraction)
        else:
            routed = route_by_threshold(entropy, self.threshold)
        titled = np.array([it is not None for it in items])
        unknown_routed = routed & ~titled
        routed &= titled

        scores = crm_p.copy()
        llm_raw = np.full(n, np.nan)  # the LLM's own P(yes), before calibration
        routes = np.array(["crm"] * n, dtype=object)
        llm_error = None
        if routed.any():
            scores, routes, llm_error = self._llm_part(history, items, routed, scores, routes, llm_raw, deadline)
        llm_done = time.perf_counter()

        with self.stats.lock:
            self.stats.routes.update(routes.tolist())
        notes = {
            int(i): "unknown item: no title for the LLM, answered by the CRM" for i in np.flatnonzero(unknown_routed)
        }
        return {
            "user_id": request.user_id,
            "known_user": prepared.known_user,
            "history_length": len(history),
            "predictions": [
                {
                    "item_id": c.item_id,
                    "score": float(scores[i]),
                    "route": routes[i],
                    "crm_score": float(crm_p[i]),
                    **({"llm_score": float(llm_raw[i])} if routes[i] == "llm" else {}),
                    "entropy": float(entropy[i]),
                    **({"note": notes[i]} if i in notes else {}),
                }
                for i, c in enumerate(candidates)
            ],  # fmt: skip
            "routed": int(routed.sum()),
            "llm_error": llm_error,
            "timings_ms": {
                "encode": 1000 * (encoded - started),
                "crm": 1000 * (crm_done - encoded),
                "llm": 1000 * (llm_done - crm_done),
                "total": 1000 * (time.perf_counter() - started),
            },
        }

    def _llm_part(self, history, items, routed, scores, routes, llm_raw, deadline):  # noqa: ANN001, ANN202
        indices = np.flatnonzero(routed)
        if self.llm is None:
            self._count_error()
            routes[indices] = "crm_fallback"
            return scores, routes, self.llm_load_error or "no LLM in this bundle"

        def job() -> np.ndarray:
            if deadline is not None and time.perf_counter() >= deadline:
                raise TimeoutError
            prefix, suffixes = self.prompt_ids(history, [items[i] for i in indices])
            return self.llm.score_shared(prefix, suffixes, deadline=deadline)

        future: Future = self._llm_worker.submit(job)
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        try:
            llm_p = future.result(timeout=timeout)
        except (FutureTimeout, TimeoutError):
            future.cancel()
            with self.stats.lock:
                self.stats.deadline_fallbacks += len(indices)
            routes[indices] = "crm_fallback"
            return scores, routes, "deadline exceeded"
        except CorellaError as exc:
            self._count_error()
            log.warning("LLM failed, answering with the CRM: %s", exc)
            routes[indices] = "crm_fallback"
            return scores, routes, str(exc)
        done = ~np.isnan(llm_p)
        llm_raw[indices[done]] = llm_p[done]
        scores[indices[done]] = self.calibration.apply(llm_p[done])
        routes[indices[done]] = "llm"
        routes[indices[~done]] = "crm_fallback"
        if (~done).any():
            with self.stats.lock:
                self.stats.deadline_fallbacks += int((~done).sum())
        return scores, routes, None if done.all() else "deadline exceeded"

    def _count_error(self) -> None:
        with self.stats.lock:
            self.stats.llm_errors += 1

    def append_events(self, events: list[Interaction]) -> int:
        return self.store.append(events)
