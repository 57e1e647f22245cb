"""The serving engine, by role: the request's flow (`core`: begin, finish, events), the LLM it
serves (`served_llm`), users' pasts (`pasts`), the answer and its fallback reasons (`answers`), and
the request as the engine reads it (`requests`)."""

from runtime.engine.answers import FallbackReason, Pending
from runtime.engine.core import Engine
from runtime.engine.requests import CandidateItem, HistoryItem, Mode, Request
from runtime.settings import EngineSettings

__all__ = ["CandidateItem", "Engine", "EngineSettings", "FallbackReason", "HistoryItem", "Mode", "Pending", "Request"]
