"""The LLM's answers remembered by their prompts' token ids.

An answer is P(yes) after one prompt, and a prompt is a prefix (the instruction and the user's
history) and a suffix (the candidate). The same tokens give the same answer, so a candidate asked
for again before the user's history changes (a page reloaded, the next page of a feed whose
candidates overlap) is answered from memory: neither queued nor decoded. The key is the tokens
themselves, so nothing has to be forgotten by hand: a new event changes the user's prefix, hence the
key, and the answers to the old prefix are no longer asked for and age out (least recently used
first).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

__all__ = ["AnswerMemo"]

Key = tuple[bytes, tuple[int, ...]]


class AnswerMemo:
    """At most `capacity` answers (~350 bytes each: 100,000 take ~35 MB), least recently used out first; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._answers: OrderedDict[Key, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._answers)

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
