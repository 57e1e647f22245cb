"""The LLM's answers remembered by their prompts' token ids.

An answer is P(yes) after one prompt, and a prompt is a prefix (the instruction and the user's
history) and a suffix (the candidate). The same tokens give the same answer, so a candidate asked
for again before the user's history changes (a page reloaded, the next page of a feed whose
candidates overlap) is answered from memory: neither queued nor decoded. The key is the tokens
themselves, so nothing has to be forgotten by hand: a new event changes the user's prefix, hence the
key, and the answers to the old prefix are no longer asked for and age out (least recently used
first). The server saves them in its state folder when it stops and reads them back when it starts,
for the same model only (the GGUF's digest): a restart does not throw away the LLM's work.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["AnswerMemo", "MemoFileError"]

Key = tuple[bytes, tuple[int, ...]]
_FORMAT = 1
_DIGEST = 16  # bytes of a prefix key


class MemoFileError(ValueError):
    """A saved memo that cannot be read back (truncated, of another format)."""


class AnswerMemo:
    """At most `capacity` answers (~350 bytes each: 100,000 take ~35 MB), least recently used out first; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._answers: OrderedDict[Key, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._answers)

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()

    @staticmethod
    def prefix_key(prefix: Sequence[int]) -> bytes:
        """A 128-bit digest of the prefix's token ids (a few hundred of them, hashed in ~2 us)."""
        return hashlib.blake2b(np.asarray(prefix, dtype=np.int64).tobytes(), digest_size=16).digest()

    def recall(self, prefix_key: bytes, suffixes: Sequence[Sequence[int]]) -> list[float | None]:
        """The remembered answer of each suffix after the prefix, None where there is none."""
        found: list[float | None] = []
        with self._lock:
            for suffix in suffixes:
                key = (prefix_key, tuple(suffix))
                answer = self._answers.get(key)
                if answer is not None:
                    self._answers.move_to_end(key)
                found.append(answer)
        return found

    def remember(self, prefix_key: bytes, suffixes: Sequence[Sequence[int]], answers: Sequence[float]) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            for suffix, answer in zip(suffixes, answers, strict=True):
                self._answers[(prefix_key, tuple(suffix))] = float(answer)
            while len(self._answers) > self.capacity:
                self._answers.popitem(last=False)

    def save(self, path: Path, model: str) -> int:
        """Write every answer, least recently used first, for the model whose digest is `model`
        (to a temporary file, then renamed: a crash leaves the last file whole). Returns how many."""
        with self._lock:
            entries = list(self._answers.items())
        lengths = np.array([len(suffix) for (_, suffix), _ in entries], dtype=np.uint32)
        header = {"format": _FORMAT, "model": model, "answers": len(entries), "tokens": int(lengths.sum())}
        temporary = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as out:
            out.write(json.dumps(header).encode() + b"\n")
            out.write(b"".join(prefix for (prefix, _), _ in entries))
            out.write(lengths.tobytes())
            out.write(np.array([answer for _, answer in entries], dtype=np.float64).tobytes())
            out.write(np.fromiter((t for (_, suffix), _ in entries for t in suffix), dtype=np.int32,
                                  count=int(lengths.sum())).tobytes())  # fmt: skip
        os.replace(temporary, path)
        return len(entries)

    def load(self, path: Path, model: str) -> int:
        """Read back what `save` wrote for the same model (the most recent `capacity` answers); a
        file of another model is left alone (0). Raises MemoFileError for a file it cannot read."""
        data = path.read_bytes()
        end = data.find(b"\n")
        if end < 0:
            raise MemoFileError(f"{path}: not a saved answer memo (no header line)")
        try:
            header = json.loads(data[:end])
            n, total = int(header["answers"]), int(header["tokens"])
            if header["format"] != _FORMAT:
                raise ValueError(f"format {header['format']}, this corella reads {_FORMAT}")
        except (ValueError, KeyError, TypeError) as exc:
            raise MemoFileError(f"{path}: not a saved answer memo ({exc})") from exc
        if header["model"] != model:
            return 0
        body = memoryview(data)[end + 1 :]
        if len(body) != n * (_DIGEST + 4 + 8) + 4 * total:
            raise MemoFileError(f"{path}: {len(body)} bytes after its header, {n} answers need "
                                f"{n * (_DIGEST + 12) + 4 * total}")  # fmt: skip
        prefixes = body[: n * _DIGEST]
        lengths = np.frombuffer(body, dtype=np.uint32, count=n, offset=n * _DIGEST)
        answers = np.frombuffer(body, dtype=np.float64, count=n, offset=n * (_DIGEST + 4))
        tokens = np.frombuffer(body, dtype=np.int32, count=total, offset=n * (_DIGEST + 12)).tolist()
        if int(lengths.sum()) != total:
            raise MemoFileError(f"{path}: its suffix lengths add up to {int(lengths.sum())}, not {total}")
        starts = [0, *np.cumsum(lengths, dtype=np.int64).tolist()]
        keep = range(max(0, n - self.capacity), n)  # the most recently used
        with self._lock:
            for i in keep:
                key = (bytes(prefixes[i * _DIGEST : (i + 1) * _DIGEST]), tuple(tokens[starts[i] : starts[i + 1]]))
                self._answers[key] = float(answers[i])
            while len(self._answers) > self.capacity:
                self._answers.popitem(last=False)
        return len(keep)
