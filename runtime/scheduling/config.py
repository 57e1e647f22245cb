"""The scheduler's settings, resolved for one box from the engine's (`runtime.settings`)."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import ConfigError
from runtime.llm import default_threads
from runtime.settings import EngineSettings, engine_default

__all__ = ["SchedulerSettings"]


@dataclass(frozen=True)
class SchedulerSettings:
    """The scheduler's settings, resolved for one box (defaults: `runtime.settings.EngineSettings`'s)."""

    contexts: int = 1  # llama.cpp contexts, each with its own loop and KV cache
    threads: int | None = None  # threads per context
    threads_when_busy: int | None = None  # threads per context while the host is busy serving HTTP
    batch_tokens: int = 512  # tokens per llama_decode (the engine's default on a CPU)
    max_sequences: int = engine_default("llm_max_sequences")
    prefix_cache_tokens: int = engine_default("llm_prefix_cache_tokens")
    prefix_host_mib: int = engine_default("llm_prefix_host_mib")
    queue_candidates: int = engine_default("llm_queue_candidates")
    max_prompt_tokens: int = engine_default("llm_context")

    @classmethod
    def resolve(cls, settings: EngineSettings, gpu: bool) -> SchedulerSettings:
        """From the engine's settings: what is left unset, chosen for this box."""
        contexts = settings.llm_contexts or 1
        threads = settings.llm_threads or max(1, default_threads() // contexts)
        # on a CPU, a busy request side gets a core of its own: with every core decoding, the
        # requests' threads and llama.cpp's preempt one another and both slow down
        busy = settings.llm_threads_when_busy or (threads if gpu or threads < 2 else threads - 1)
        return cls(
            contexts=contexts, threads=threads, threads_when_busy=min(busy, threads),
            batch_tokens=settings.llm_batch_tokens or (2048 if gpu else 512),
            max_sequences=settings.llm_max_sequences, prefix_cache_tokens=settings.llm_prefix_cache_tokens,
            prefix_host_mib=settings.llm_prefix_host_mib, queue_candidates=settings.llm_queue_candidates,
            max_prompt_tokens=settings.llm_context,
        )  # fmt: skip

    def __post_init__(self) -> None:
        # llama.cpp keeps at most 256 sequences, and no more than one batch's worth of outputs
        if not 1 <= self.max_sequences <= min(254, self.batch_tokens - 2):
            raise ConfigError(f"llm max sequences {self.max_sequences} must lie in [1, min(254, batch tokens - 2)]")
        if self.contexts < 1 or self.queue_candidates < 1:
            raise ConfigError("llm contexts and queue candidates must be at least 1")
        if self.prefix_host_mib < 0:
            raise ConfigError(f"llm prefix host memory {self.prefix_host_mib} MiB must not be negative")

    @property
    def prefix_slots(self) -> int:
        """Sequences for cached prefixes: one per 128 cache tokens (the prompts here are 200-300
        tokens), within llama.cpp's limits. llama.cpp reserves a full-vocabulary logits row per
        sequence, so they are not made plentiful for nothing."""
        room = min(256, self.batch_tokens) - self.max_sequences
        return max(2, min(room, self.prefix_cache_tokens // 128))

    @property
    def context_tokens(self) -> int:
        return self.prefix_cache_tokens + self.batch_tokens
