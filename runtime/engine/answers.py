"""A request's answer: the typed fallback reasons, the request between `Engine.begin` and
`Engine.finish`, and the answer the API returns. A fallback reason is declared here, once."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from runtime.engine.requests import HistoryItem, Request
from runtime.prompt import ItemText
from runtime.router import LLMCalibration
from runtime.scheduling import ItemState, JobHandle

__all__ = ["Answers", "FallbackReason", "Pending", "Prepared"]


class FallbackReason(StrEnum):
    """Why a routed candidate was answered by the CRM."""

    DEADLINE = "deadline"  # the LLM had not answered it by the request's deadline
    OVERLOADED = "overloaded"  # the LLM queue could not take it in time
    LLM_ERROR = "llm_error"  # llama.cpp failed on it
    LLM_UNAVAILABLE = "llm_unavailable"  # the bundle's LLM failed to load
    LLM_DISABLED = "llm_disabled"  # served without an LLM (--no-llm, or a CRM-only bundle)
    # the bundle's calibrated LLM answer cannot depend on what the LLM says (slope 0): never decoded
    LLM_NO_SIGNAL = "llm_no_signal"

    @classmethod
    def for_item(cls, state: ItemState) -> FallbackReason:
        """The reason of a candidate sent to the LLM and not answered: failed, or not in time."""
        return cls.LLM_ERROR if state == ItemState.FAILED else cls.DEADLINE


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

    def fall_back(self, candidates: np.ndarray, reason: FallbackReason) -> None:
        """These candidates (indices) are answered by the CRM, for `reason`."""
        self.reasons.update(dict.fromkeys(candidates.tolist(), reason))

    def timeout(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.perf_counter())

    def wait(self) -> None:
        if self.job is not None:
            self.job.wait(self.timeout())

    async def wait_async(self) -> None:
        if self.job is not None:
            await self.job.wait_async(self.timeout())


@dataclass
class Answers:
    """A request's answers being gathered: the served score, the LLM's raw P(yes) (NaN where it did
    not answer) and the fallback reasons."""

    scores: np.ndarray
    llm_raw: np.ndarray
    reasons: dict[int, FallbackReason] = field(default_factory=dict)

    @classmethod
    def of(cls, pending: Pending) -> Answers:
        """The CRM's answers for every candidate, and the fallbacks already known."""
        return cls(pending.crm_p.copy(), np.full(len(pending.crm_p), np.nan), dict(pending.reasons))

    def take_llm(self, candidates: np.ndarray, raw: np.ndarray, calibration: LLMCalibration) -> None:
        """The LLM's answers (raw P(yes)) for these candidates, served after the bundle's calibration."""
        self.llm_raw[candidates] = raw
        self.scores[candidates] = calibration.apply(raw)

    def compose(self, pending: Pending, llm_done: float) -> dict[str, Any]:
        """The answer as the API returns it."""
        routes = ["llm" if answered else "crm" for answered in np.isfinite(self.llm_raw).tolist()]
        for i in self.reasons:
            routes[i] = "crm_fallback"
        fallbacks = Counter(str(r) for r in self.reasons.values())
        note = "unknown item: no title for the LLM, answered by the CRM"
        unknown = set(pending.unknown.tolist())
        times, request = pending.times, pending.request
        # plain floats, all at once (a numpy scalar read per field costs more than the rest of the row)
        scores, crm, llm, entropy = (a.tolist() for a in (self.scores, pending.crm_p, self.llm_raw, pending.entropy))
        return {
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
                    **({"fallback_reason": str(self.reasons[i])} if i in self.reasons else {}),
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
                **_job_timings(pending.job),
                "total": 1000 * (time.perf_counter() - times["arrived"]),
            },
        }


def _job_timings(job: JobHandle | None) -> dict[str, float]:
    if job is None or job.first_planned is None:
        return {}
    end = job.finished if job.finished is not None else time.perf_counter()
    queued, decoding = job.first_planned - job.enqueued, end - job.first_planned
    return {"llm_queued": 1000 * queued, "llm_decoding": 1000 * decoding}
