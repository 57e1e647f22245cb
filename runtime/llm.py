"""The slow path's llama.cpp layer: P(" Yes") of prompts given as token ids.

`LlamaModel` holds a GGUF's weights and vocabulary; any thread may tokenize with it. A
`LlamaContext` is one KV cache and one batch on that model: it decodes tokens of many sequences
in one `llama_decode` and reads only the two answer logits of the rows that asked for them. A
context is not thread-safe: one owner thread (a scheduler loop, see runtime/scheduling).

`LlamaScorer` is a model with one context that scores prompts directly, one caller at a time:
export's parity checks and the bench's per-mode timings use it; serving goes through the scheduler.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from runtime.errors import CorellaError

__all__ = ["LLMError", "LlamaSettings", "LlamaModel", "LlamaContext", "LlamaScorer", "gpu_offload_supported"]

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
_quick_calls: Any = None


def _quick(llama_cpp: Any) -> Any:
    """The llama.cpp calls a decode loop makes per candidate (share a prefix, drop a sequence, find
    a logits row), bound through PyDLL so that they keep the GIL. Through llama_cpp's CDLL every
    call releases the GIL and must win it back, which behind a busy HTTP thread costs up to the
    switch interval (5 ms) a call: hundreds a batch, enough to idle the cores between decodes.
    They take microseconds; only llama_decode, which takes long, lets go of the GIL."""
    global _quick_calls
    if _quick_calls is None:
        lib = ctypes.PyDLL(llama_cpp.llama_cpp._lib._name)
        calls = {}
        for name, argtypes, restype in (
            ("llama_memory_seq_cp", [ctypes.c_void_p] + [ctypes.c_int32] * 4, None),
            ("llama_memory_seq_rm", [ctypes.c_void_p] + [ctypes.c_int32] * 3, ctypes.c_bool),
            ("llama_get_logits_ith", [ctypes.c_void_p, ctypes.c_int32], ctypes.POINTER(ctypes.c_float)),
        ):
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
            calls[name] = function
        _quick_calls = SimpleNamespace(**calls)
    return _quick_calls


def gpu_offload_supported() -> bool:
    try:
        return bool(_llama().llama_supports_gpu_offload())
    except ImportError:
        return False


def quantize(source: str | Path, target: str | Path, ftype: int, threads: int = 0, requantize: bool = False) -> int:
    """llama.cpp's own quantizer (llama_model_quantize) on a GGUF file: 0 on success. `requantize`:
    a source already quantized is quantized again (off: llama.cpp refuses it).

    Export runs this in a child process of its own (`python -m runtime.llm SOURCE TARGET FTYPE
    THREADS [requantize]`): whatever global state the quantizer leaves behind (its thread pool,
    backend registrations) never meets the model the parent then loads, nor the parent's torch."""
    lib = _llama()
    params = lib.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(threads)
    params.allow_requantize = requantize
    return int(lib.llama_model_quantize(str(source).encode(), str(target).encode(), params))


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class LlamaModel:
    """A GGUF's weights and vocabulary, shared by every context made on it."""

    def __init__(self, path: str | Path, yes_id: int, no_id: int, gpu_layers: int | None = None,
                 vocab_only: bool = False) -> None:  # fmt: skip
        """`vocab_only`: the vocabulary alone, no weights (a process that tokenizes and never decodes)."""
        self.path = Path(path)
        self.yes_id, self.no_id = int(yes_id), int(no_id)
        lib = self._lib = _llama()
        if not self.path.is_file():
            raise LLMError(f"{self.path}: GGUF file not found")
        params = lib.llama_model_default_params()
        offload = lib.llama_supports_gpu_offload() and not vocab_only
        params.vocab_only = vocab_only
        params.n_gpu_layers = gpu_layers if gpu_layers is not None else (999 if offload else 0)
        self.gpu_layers = int(params.n_gpu_layers)
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise LLMError(f"{self.path}: llama.cpp could not load this GGUF file{_native_error()}")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        for name, token in (("yes", self.yes_id), ("no", self.no_id)):
            if not 0 <= token < self.n_vocab:
                self.close()
                raise LLMError(f"{self.path}: {name} token id {token} outside the vocabulary ({self.n_vocab})")
        self.bos_id = int(lib.llama_vocab_bos(self._vocab))
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))

    def close(self) -> None:
        if getattr(self, "_model", None):
            self._lib.llama_model_free(self._model)
            self._model = None

    def piece(self, token: int) -> str:
        """A token's text in the vocabulary ("▁" for a space in SentencePiece, "<0x41>" for a byte token)."""
        return (self._lib.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", "replace")

    def attributes(self, token: int) -> int:
        """A token's llama_token_attr flags (normal, control, byte, ...)."""
        return int(self._lib.llama_vocab_get_attr(self._vocab, token))

    def score(self, token: int) -> float:
        """A token's score in the vocabulary (the higher, the more common the piece)."""
        return float(self._lib.llama_vocab_get_score(self._vocab, token))

    def special_ids(self) -> set[int]:
        """The tokens the vocabulary names for begin and end of text, end of turn, padding and newline."""
        lib, vocab = self._lib, self._vocab
        found = (lib.llama_vocab_bos(vocab), lib.llama_vocab_eos(vocab), lib.llama_vocab_eot(vocab),
                 lib.llama_vocab_pad(vocab), lib.llama_vocab_nl(vocab))  # fmt: skip
        return {int(t) for t in found if 0 <= t < self.n_vocab}

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with no BOS and no special-token parsing (safe from any thread)."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (self._lib.llama_token * capacity)()
        count = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, capacity, False, False)
        if count < 0:
            capacity = -count
            buffer = (self._lib.llama_token * capacity)()
            count = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, capacity, False, False)
        return list(buffer[:count])


class LlamaContext:
    """One KV cache (unified across sequences) and one batch on a model. One owner thread."""

    def __init__(self, model: LlamaModel, n_ctx: int, n_batch: int, n_seq_max: int, threads: int | None = None) -> None:
        lib = self._lib = model._lib
        self.model = model
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = n_seq_max
        params.n_threads = params.n_threads_batch = threads or default_threads()
        # one KV buffer for all sequences: a prefix's cells are shared with its candidates' sequences
        # (llama_memory_seq_cp adds a sequence to cells, it copies no data)
        params.kv_unified = True
        # a sliding-window model keeps every cached prefix whole (ours are shorter than the window)
        params.swa_full = True
        params.no_perf = True
        self._ctx = lib.llama_init_from_model(model._model, params)
        if not self._ctx:
            raise LLMError(f"{model.path}: llama.cpp could not create a context of {n_ctx} tokens{_native_error()}")
        self.n_ctx = int(lib.llama_n_ctx(self._ctx))
        self.n_batch = int(lib.llama_n_batch(self._ctx))  # llama.cpp caps it at n_ctx
        self.n_seq_max = int(lib.llama_n_seq_max(self._ctx))
        self._memory = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(self.n_batch, 0, self.n_seq_max)
        self._quick = _quick(lib)

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            self._lib.llama_free(self._ctx)
            self._ctx = None

    def decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        seqs: Sequence[int | tuple[int, ...]],
        logits: Sequence[bool],
    ) -> None:
        """One llama_decode of up to n_batch tokens, each at its position in its sequence, or in
        several sequences at once (a tuple): a prefix decoded into its own sequence and those of
        the candidates that share it, in the same batch as the candidates' suffixes."""
        n = len(tokens)
        if n > self.n_batch:
            raise LLMError(f"a batch of {n} tokens exceeds n_batch {self.n_batch}")
        batch = self._batch
        seq_id = batch.seq_id
        counts = np.ones(n, dtype=np.int32)
        for i, seq in enumerate(seqs):
            if isinstance(seq, tuple):
                counts[i] = len(seq)
                row = seq_id[i]
                for k, member in enumerate(seq):
                    row[k] = member
            else:
                seq_id[i][0] = seq
        for field, values, dtype in (("token", tokens, np.int32), ("pos", positions, np.int32),
                                     ("logits", logits, np.int8), ("n_seq_id", counts, np.int32)):  # fmt: skip
            array = np.ascontiguousarray(values, dtype=dtype)  # kept alive by the name until copied
            ctypes.memmove(getattr(batch, field), array.ctypes.data, array.nbytes)
        batch.n_tokens = n
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise LLMError(f"llama_decode failed with status {status} ({n} tokens){_native_error()}")

    def prefill(self, tokens: Sequence[int], seq: int, start: int = 0, want_last: bool = False) -> int | None:
        """Decode tokens into `seq` from position `start`, in n_batch chunks; the batch index of the
        last token's logits where `want_last`."""
        last = None
        for at in range(0, len(tokens), self.n_batch):
            chunk = tokens[at : at + self.n_batch]
            flags = [False] * len(chunk)
            if want_last and at + self.n_batch >= len(tokens):
                flags[-1] = True
                last = len(chunk) - 1
            self.decode(chunk, range(start + at, start + at + len(chunk)), [seq] * len(chunk), flags)
        return last

    def answer(self, index: int) -> float:
        """P(yes) from the logits of batch row `index` (a row decoded with its logits flag set)."""
        row = self._quick.llama_get_logits_ith(self._ctx, index)
        if not row:
            raise LLMError("llama.cpp returned no logits")
        diff = float(row[self.model.yes_id]) - float(row[self.model.no_id])
        return 1.0 / (1.0 + math.exp(-diff)) if diff >= 0 else math.exp(diff) / (1.0 + math.exp(diff))

    def set_threads(self, threads: int) -> None:
        """Threads for the next decodes (between two decodes only)."""
        self._lib.llama_set_n_threads(self._ctx, threads, threads)

    def copy_sequence(self, source: int, target: int) -> None:
        self._quick.llama_memory_seq_cp(self._memory, source, target, -1, -1)

    def remove_sequence(self, seq: int, start: int = -1) -> None:
        """Drop the sequence from its cells, all of them or those from position `start` on."""
        self._quick.llama_memory_seq_rm(self._memory, seq, start, -1)

    def clear(self) -> None:
        self._lib.llama_memory_clear(self._memory, True)

    def sequence_bytes(self, seq: int) -> int:
        """The size of `save_sequence`'s copy of this sequence."""
        return int(self._lib.llama_state_seq_get_size(self._ctx, seq))

    def save_sequence(self, seq: int) -> ctypes.Array:
        """A copy of one sequence's KV cells (its tokens' keys and values, positions and all) in host
        memory, for `restore_sequence` to put back in place of decoding those tokens again."""
        size = self.sequence_bytes(seq)
        data = (ctypes.c_uint8 * size)()
        if size == 0 or int(self._lib.llama_state_seq_get_data(self._ctx, data, size, seq)) != size:
            raise LLMError(f"llama.cpp could not copy sequence {seq} out of the KV cache{_native_error()}")
        return data

    def restore_sequence(self, data: ctypes.Array, seq: int) -> None:
        """Put saved cells back as sequence `seq` (which must be empty), on any free cells."""
        if int(self._lib.llama_state_seq_set_data(self._ctx, data, ctypes.sizeof(data), seq)) == 0:
            raise LLMError(f"llama.cpp could not restore a saved prefix into the KV cache{_native_error()}")


@dataclass(frozen=True)
class LlamaSettings:
    n_ctx: int = 4096
    n_batch: int = 1024
    max_sequences: int = 33  # prefix + up to 32 candidates decoded together
    n_threads: int | None = None
    gpu_layers: int | None = None  # None: all layers where the build can offload, else 0

    def threads(self) -> int:
        return self.n_threads or default_threads()


class LlamaScorer:
    """One model and one context scoring prompts directly, one call at a time (export, bench)."""

    def __init__(self, path: str | Path, yes_id: int, no_id: int, settings: LlamaSettings | None = None) -> None:
        self.settings = settings = settings or LlamaSettings()
        self.model = LlamaModel(path, yes_id, no_id, settings.gpu_layers)
        try:
            self.context = LlamaContext(self.model, settings.n_ctx, settings.n_batch, settings.max_sequences,
                                        settings.threads())  # fmt: skip
        except LLMError:
            self.model.close()
            raise
        self.path, self.gpu_layers = self.model.path, self.model.gpu_layers
        self.n_ctx, self.n_batch = self.context.n_ctx, self.context.n_batch
        self.tokenize = self.model.tokenize
        self._lock = threading.Lock()

    def close(self) -> None:
        self.context.close()
        self.model.close()

    def __enter__(self) -> LlamaScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score_shared(
        self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], max_chunk: int | None = None
    ) -> np.ndarray:
        """P(yes) of prefix + suffix for every suffix; the prefix is decoded once into sequence 0,
        shared with sequences 1..m, and as many suffixes as fit are decoded together.

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
        context = self.context
        with self._lock:
            context.clear()
            self.context.prefill(prefix, 0)
            start, capacity = len(prefix), self.n_ctx - len(prefix)
            i = 0
            while i < len(suffixes):
                chunk, tokens = [], 0
                while (i + len(chunk) < len(suffixes) and len(chunk) < per_chunk
                       and tokens + len(suffixes[i + len(chunk)]) <= min(self.n_batch, capacity)):  # fmt: skip
                    tokens += len(suffixes[i + len(chunk)])
                    chunk.append(i + len(chunk))
                if not chunk:
                    raise LLMError(f"a suffix of {len(suffixes[i])} tokens does not fit the batch or context")
                ids, pos, seqs, flags, last = [], [], [], [], []
                for seq, index in enumerate(chunk, start=1):
                    context.copy_sequence(0, seq)
                    suffix = suffixes[index]
                    ids += suffix
                    pos += range(start, start + len(suffix))
                    seqs += [seq] * len(suffix)
                    flags += [False] * (len(suffix) - 1) + [True]
                    last.append(len(ids) - 1)
                context.decode(ids, pos, seqs, flags)
                for index, row in zip(chunk, last, strict=True):
                    out[index] = context.answer(row)
                for seq in range(1, len(chunk) + 1):
                    context.remove_sequence(seq)
                i += len(chunk)
        return out

    def score_full(self, prompt: Sequence[int]) -> float:
        """P(yes) of one whole prompt with nothing cached (the baseline the cache is measured against)."""
        if len(prompt) > self.n_ctx:
            raise LLMError(f"prompt of {len(prompt)} tokens exceeds the context of {self.n_ctx}")
        with self._lock:
            self.context.clear()
            last = self.context.prefill(prompt, 0, want_last=True)
            return self.context.answer(last)


if __name__ == "__main__":  # the quantizer in a process of its own; see `quantize`
    import sys

    sys.exit(quantize(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:6] == ["requantize"]))
