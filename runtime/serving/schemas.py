"""The HTTP API's request bodies: strict, bounded, and turned into the engine's requests."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from runtime.catalog import attribute_tags
from runtime.engine import CandidateItem, HistoryItem
from runtime.engine import Request as EngineRequest
from runtime.errors import ConfigError
from runtime.prompt import ItemText

__all__ = [
    "CandidateBody",
    "EventBody",
    "EventsBody",
    "HistoryBody",
    "ItemBody",
    "ItemsBody",
    "PredictBody",
    "to_catalog_entries",
    "to_engine_request",
    "USER_HEADER",
]


class _Strict(BaseModel):
    # strict: a JSON false is not a number, 1.5 is not an integer, "5" is not a number
    model_config = ConfigDict(extra="forbid", strict=True)


def _integral(value: Any) -> Any:
    """JSON has one number type: 1700000000.0 is an integer to a JSON Schema, 1.5 is not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: unix seconds up to the year 9999: past it a timestamp is a mistake (and past 2^63, SQLite's limit)
Timestamp = Annotated[int, annotated_types.Ge(0), annotated_types.Le(253_402_300_799), BeforeValidator(_integral)]


class HistoryBody(_Strict):
    item_id: str = Field(min_length=1, max_length=256)
    rating: float = Field(ge=0, le=100)
    timestamp: Timestamp | None = Field(None, description="unix seconds")
    title: str | None = Field(None, max_length=512)


class CandidateBody(_Strict):
    item_id: str = Field(min_length=1, max_length=256)
    title: str | None = Field(None, max_length=512, description="overrides the catalog; new items need one for the LLM")
    year: str | None = Field(None, max_length=16)
    tags: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=64)


class PredictBody(_Strict):
    user_id: str | None = Field(None, max_length=256, description="known users get profile and history from the store")
    user_attributes: (
        dict[Annotated[str, Field(max_length=32)], Annotated[str, Field(max_length=64)] | int | float] | None
    ) = Field(None, max_length=16, description="age, gender, occupation, zip")
    history: list[HistoryBody] | None = Field(None, max_length=1000, description="oldest first; overrides the store")
    candidates: list[CandidateBody] = Field(
        min_length=1, max_length=100_000, description="items to score (past --max-candidates: 413)"
    )
    mode: Literal["hybrid", "crm", "llm"] = "hybrid"
    llm_fraction: float | None = Field(None, ge=0, le=1, description="route this share of the candidates to the LLM")
    deadline_ms: float | None = Field(None, gt=0, le=600_000, description="answer this long after arrival at the "
                                      "latest; LLM work not done by then is answered by the CRM")  # fmt: skip


class EventBody(_Strict):
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    rating: float = Field(ge=0, le=100)
    timestamp: Timestamp | None = Field(None, description="unix seconds; default now")
    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="the client's id for the event: an id the store holds already is not appended again",
    )


class EventsBody(_Strict):
    events: list[EventBody] = Field(min_length=1, max_length=10_000)


class ItemBody(_Strict):
    item_id: str = Field(min_length=1, max_length=256)
    title: str = Field(min_length=1, max_length=512)
    year: str | None = Field(None, max_length=16)
    text: str | None = Field(None, max_length=8192, description="what the LLM reads about the item (a description)")
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field([], max_length=64)
    attributes: dict[Annotated[str, Field(min_length=1, max_length=32)], Annotated[str, Field(max_length=64)]] = Field(
        {}, max_length=16, description="categorical: each becomes the tag 'name: value', as in training"
    )
    numbers: dict[Annotated[str, Field(min_length=1, max_length=32)], Annotated[float, Field(allow_inf_nan=False)]] = (
        Field({}, max_length=16, description="each becomes the tag 'name ~low-high' (powers of two), as in training")
    )


class ItemsBody(_Strict):
    items: list[ItemBody] = Field(min_length=1, max_length=1_000)


class ReloadBody(_Strict):
    bundle: str | None = Field(
        None, min_length=1, max_length=4096,
        description="the bundle folder to serve (default: the folder served now, read again)",
    )  # fmt: skip


def to_catalog_entries(body: ItemsBody) -> list[tuple[str, ItemText]]:
    """Each item as the catalog keeps it: its attributes and numbers become tags, as in training."""
    entries = []
    for i in body.items:
        tags = tuple(dict.fromkeys([*i.tags, *attribute_tags(i.attributes, i.numbers)]))
        entries.append((i.item_id, ItemText(i.title.strip(), i.year, tags, text=i.text)))
    return entries


#: the header a load balancer hashes users on; it names the user where the body does not
USER_HEADER = "x-corella-user"


def to_engine_request(body: PredictBody, header_user: str | None = None) -> EngineRequest:
    """The engine's request; `header_user` (X-Corella-User) names the user where the body does not,
    and must agree with it where both do."""
    if header_user is not None:
        if not header_user or len(header_user) > 256:
            raise ConfigError("X-Corella-User: a user id of 1 to 256 characters")
        if body.user_id is not None and body.user_id != header_user:
            raise ConfigError(f"X-Corella-User names user {header_user!r}, the body user {body.user_id!r}: "
                              "send one, or the same in both")  # fmt: skip
    return EngineRequest(
        candidates=[
            CandidateItem(c.item_id, c.title, c.year, tuple(c.tags) if c.tags is not None else None)
            for c in body.candidates
        ],  # fmt: skip
        user_id=body.user_id if body.user_id is not None else header_user,
        user_attributes=body.user_attributes,
        history=[HistoryItem(h.item_id, h.rating, h.timestamp, h.title) for h in body.history]
        if body.history is not None
        else None,
        mode=body.mode,
        llm_fraction=body.llm_fraction,
        deadline_ms=body.deadline_ms,
    )
