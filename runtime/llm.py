"""The slow path: P(" Yes") from a GGUF model in llama.cpp, with the user's shared prefix cached.

A request's candidates share one prefix (instruction + the user's history). The prefix is decoded
once into sequence 0 of a unified KV cache; for each chunk of candidates the prefix's cells are
shared (llama_memory_seq_cp) into sequences 1..m, and all the candidates' suffixes are decoded in
one batch, each as its own sequence, with logits requested only at each suffix's last token.
Only the two answer logits are read from each output row.

A llama.cpp context is not thread-safe: one `LlamaScorer` belongs to one worker thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import CorellaError

__all__ = ["LLMError", "LlamaSettings", "LlamaScorer", "gpu_offload_supported"]

log = logging.getLogger(__name__)
_backend_lock = threading.Lock()
_backend_ready = False


class LLMError(CorellaError):
    """The LLM could not score a prompt (failed load, prompt longer than the context, decode error)."""


_native_log = logging.getLogger("llama_cpp.native")


_last_native_error: list[str] = [""]


def _route_native_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp prints model and context details at every load: DEBUG; its errors are kept so that
    # an LLMError can say what llama.cpp objected to
    message = text.decode("utf-8", "replace").rstrip()
    if not message:
        return
    if "error" in message.lower() or "failed" in message.lower():
        _last_native_error[0] = message.split(": ", 1)[-1]
    _native_log.debug(message)


def _native_error() -> str:
    message, _last_native_error[0] = _last_native_error[0], ""
    return f" ({message})" if message else ""


def _llama():  # noqa: ANN202 - the module, imported lazily so that `runtime` imports without it
    import llama_cpp

    global _backend_ready, _log_callback
    with _backend_lock:
        if not _backend_ready:
            _log_callback = llama_cpp.llama_log_callback(_route_native_log)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


_log_callback = None


def gpu_offload_supported() -> bool:
    try:
        return bool(_llama().llama_supports_gpu_offload())
    except ImportError:
        return False


@dataclass(frozen=True)
class LlamaSettings:
    n_ctx: int = 4096
    n_batch: int = 1024
    max_sequences: int = 33  # prefix + up to 32 candidates decoded together
    n_threads: int | None = None
    gpu_layers: int | None = None  # None: all layers where the build can offload, else 0

    def threads(self) -> int:
        return self.n_threads or max(1, os.cpu_count() or 1)


class LlamaScorer:
    """One llama.cpp model + context, scoring prompts given as token ids."""

    def __init__(self, path: str | Path, yes_id: int, no_id: int, settings: LlamaSettings | None = None) -> None:
        self.path = Path(path)
        self.settings = settings = settings or LlamaSettings()
        self.yes_id, self.no_id = int(yes_id), int(no_id)
        lib = self._lib = _llama()
        if not self.path.is_file():
            raise LLMError(f"{self.path}: GGUF file not found")
        model_params = lib.llama_model_default_params()
        offload = lib.llama_supports_gpu_offload()
        model_params.n_gpu_layers = settings.gpu_layers if settings.gpu_layers is not None else (999 if offload else 0)
        self.gpu_layers = int(model_params.n_gpu_layers)
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise LLMError(f"{self.path}: llama.cpp could not load this GGUF file{_native_error()}")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        for name, token in (("yes", self.yes_id), ("no", self.no_id)):
            if not 0 <= token < self.n_vocab:
                self.close()
                raise LLMError(f"{self.path}: {name} token id {token} outside the vocabulary ({self.n_vocab})")
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = settings.n_ctx
        ctx_params.n_batch = settings.n_batch
        ctx_params.n_ubatch = min(settings.n_batch, 512)
        ctx_params.n_seq_max = settings.max_sequences
        ctx_params.n_threads = ctx_params.n_threads_batch = settings.threads()
        ctx_params.kv_unified = True
        ctx_params.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            self.close()
            raise LLMError(
                f"{self.path}: llama.cpp could not create a context of {settings.n_ctx} tokens{_native_error()}"
            )
        self.n_ctx = int(lib.llama_n_ctx(self._ctx))
        self.n_batch = int(lib.llama_n_batch(self._ctx))  # llama.cpp caps it at n_ctx
        self._memory = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(settings.n_batch, 0, settings.max_sequences)
        self._lock = threading.Lock()
        self.bos_id = int(lib.llama_vocab_bos(self._vocab))
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        lib = self._lib
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with no BOS and no special-token parsing."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (self._lib.llama_token * capacity)()
        count = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, capacity, False, False)
        if count < 0:
            capacity = -count
            buffer = (self._lib.llama_token * capacity)()
            count = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, capacity, False, False)
        return list(buffer[:count])

    # ------------------------------------------------------------------ decoding
    def _decode(
        self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], logits: Sequence[bool]
    ) -> None:
        batch = self._batch
        for i, (token, pos, seq, want) in enumerate(zip(tokens, positions, seqs, logits, strict=True)):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want
        batch.n_tokens = len(tokens)
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise LLMError(f"llama_decode failed with status {status} ({len(tokens)} tokens)")

    def _answer(self, index: int) -> float:
        row = self._lib.llama_get_logits_ith(self._ctx, index)
        if not row:
            raise LLMError("llama.cpp returned no logits")
        diff = float(row[self.yes_id]) - float(row[self.no_id])
        return 1.0 / (1.0 + np.exp(-diff))

    def _prefill(self, tokens: Sequence[int], seq: int, want_last: bool) -> int | None:
        """Decode tokens into `seq` in n_batch chunks; the batch index of the last token's logits."""
        step = self.n_batch
        last = None
        for start in range(0, len(tokens), step):
            chunk = tokens[start : start + step]
            final = start + step >= len(tokens)
            flags = [False] * len(chunk)
            if final and want_last:
                flags[-1] = True
                last = len(chunk) - 1
            self._decode(chunk, range(start, start + len(chunk)), [seq] * len(chunk), flags)
        return last

    def score_shared(
        self,
        prefix: Sequence[int],
        suffixes: Sequence[Sequence[int]],
        deadline: float | None = None,
        max_chunk: int | None = None,
    ) -> np.ndarray:
        """P(yes) of prefix + suffix for every suffix; the prefix is decoded once.

        With a `deadline` (time.perf_counter() value), chunks not started by then are left NaN.
        `max_chunk` caps the candidates decoded together (1: the prefix is shared but every
        candidate is its own decode, the middle point the benchmark measures).
        """
        per_chunk = min(self.settings.max_sequences - 1, max_chunk or self.settings.max_sequences)
        if not suffixes:
            return np.empty(0)
        longest = max(len(s) for s in suffixes)
        if len(prefix) + longest > self.n_ctx:
            raise LLMError(f"prompt of {len(prefix) + longest} tokens exceeds the context of {self.n_ctx}")
        if longest == 0:
            raise LLMError("a prompt suffix is empty")
        out = np.full(len(suffixes), np.nan)
        with self._lock:
            lib, memory = self._lib, self._memory
            lib.llama_memory_clear(memory, True)
            self._prefill(prefix, 0, want_last=False)
            start = len(prefix)
            capacity = self.n_ctx - start
            i = 0
            while i < len(suffixes):
                if deadline is not None and time.perf_counter() >= deadline:
                    break
                # a chunk: as many candidates as the batch, the sequences and the context allow
                chunk, tokens = [], 0
                while (i + len(chunk) < len(suffixes) and len(chunk) < per_chunk
                       and tokens + len(suffixes[i + len(chunk)]) <= min(self.n_batch, capacity)):  # fmt: skip
                    tokens += len(suffixes[i + len(chunk)])
                    chunk.append(i + len(chunk))
                if not chunk:
                    raise LLMError(f"a suffix of {len(suffixes[i])} tokens does not fit the batch or context")
                ids, pos, seqs, flags, last = [], [], [], [], []
                for seq, index in enumerate(chunk, start=1):
                    lib.llama_memory_seq_cp(memory, 0, seq, -1, -1)
                    suffix = suffixes[index]
                    ids += suffix
                    pos += range(start, start + len(suffix))
                    seqs += [seq] * len(suffix)
                    flags += [False] * (len(suffix) - 1) + [True]
                    last.append(len(ids) - 1)
                self._decode(ids, pos, seqs, flags)
                for index, row in zip(chunk, last, strict=True):
                    out[index] = self._answer(row)
                for seq in range(1, len(chunk) + 1):
                    lib.llama_memory_seq_rm(memory, seq, -1, -1)
                i += len(chunk)
        return out

    def score_full(self, prompt: Sequence[int]) -> float:
        """P(yes) of one whole prompt with nothing cached (the baseline the cache is measured against)."""
        if len(prompt) > self.n_ctx:
            raise LLMError(f"prompt of {len(prompt)} tokens exceeds the context of {self.n_ctx}")
        with self._lock:
            self._lib.llama_memory_clear(self._memory, True)
            last = self._prefill(prompt, 0, want_last=True)
            return self._answer(last)

    def timed_score_shared(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        return self.score_shared(prefix, suffixes), time.perf_counter() - started
