"""Errors by type: one base class, domain subclasses whose messages say what to do."""

from __future__ import annotations

__all__ = [
    "CorellaError",
    "DataError",
    "DataSourceError",
    "FeatureSpecError",
    "PromptError",
    "ConfigError",
    "StoreError",
    "StoreFull",
    "RequestTooLarge",
    "OverloadedError",
]


class CorellaError(Exception):
    """Base of every error corella raises on purpose (a user mistake or an environment problem)."""


class DataError(CorellaError):
    """A data file is malformed; the message names the file and the line."""


class DataSourceError(CorellaError):
    """No source could supply a data set; the message lists what was tried."""


class FeatureSpecError(CorellaError):
    """A feature spec (features.json) is missing, malformed or of an unknown version."""


class PromptError(CorellaError):
    """The prompt cannot be rendered or read out (e.g. ' Yes' is not a single token)."""


class ConfigError(CorellaError):
    """An option or configuration value is invalid; the message lists the valid options."""


class StoreError(CorellaError):
    """The feature store cannot be opened or is of another schema."""


class StoreFull(StoreError):
    """The live store is at its bound: the batch is refused whole (507), nothing is dropped."""


class StoreUnavailable(StoreError):
    """A shared store (PostgreSQL) does not answer: 503 with Retry-After; nothing was written."""

    retry_after_s = 1.0


class RequestTooLarge(CorellaError):
    """A request exceeds a configured limit (candidates per request, body size)."""


class OverloadedError(CorellaError):
    """The LLM cannot take a request that asked for it alone (mode "llm"); try again later."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
