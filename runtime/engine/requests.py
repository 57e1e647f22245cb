"""A prediction request as the engine reads it (the HTTP API's bodies and `corella predict`'s lines)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CandidateItem", "HistoryItem", "Mode", "Request"]

Mode = Literal["hybrid", "crm", "llm"]


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
