"""Users' prefixes in the KV cache, by their token ids, and idle ones parked in host memory."""

from __future__ import annotations

import ctypes
from collections import OrderedDict

__all__ = ["PrefixCache", "PrefixEntry", "HEAD_SAMPLES", "HEAD_MIN_TOKENS"]

#: new prefixes whose common start becomes the shared head, and the fewest tokens worth sharing
HEAD_SAMPLES = 3
HEAD_MIN_TOKENS = 16


class PrefixEntry:
    def __init__(self, key: tuple[int, ...]) -> None:
        self.key = key
        self.seq: int | None = None  # the KV sequence holding it, once allocated
        self.planned = 0  # tokens put into batches
        self.filled = 0  # tokens decoded
        self.refs = 0  # queued jobs using it
        self.busy = False  # part of the batch being decoded
        self.users: set[str] = set()
        self.stale = False  # dropped from the index; freed once unused
        self.error: str | None = None
        self.saved: ctypes.Array | None = None  # a copy of its decoded cells in host memory

    @property
    def decoded(self) -> bool:
        return self.filled == len(self.key)

    @property
    def ready(self) -> bool:
        """Decoded and in the KV cache (or restored there before the batch it is planned in)."""
        return self.decoded and self.seq is not None

    @property
    def parked(self) -> bool:
        """Decoded, and kept in host memory only: a restore, not a decode, brings it back."""
        return self.decoded and self.seq is None and self.saved is not None


class PrefixCache:
    """Prefixes by token ids, least recently used first, within a KV-cell and a sequence budget.

    With host memory (`host_bytes`), a prefix no queued job uses leaves the KV cache for a copy in
    host memory (parked), and comes back by a restore, a copy of ~0.6 ms instead of a decode of
    ~0.5-1 s. The KV cache then holds only the prefixes in use: every token decoded attends over
    the cache's occupied cells, and a cache full of idle prefixes made each token ~15-20% slower
    on a CPU (30 cached prefixes against one, Gemma 3 270M, one or two threads)."""

    def __init__(self, capacity_tokens: int, sequences: range, host_bytes: int = 0) -> None:
        self.capacity = capacity_tokens
        self.entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self.free = list(reversed(sequences))
        self.used = 0  # tokens of entries holding a sequence
        self.removals: list[int] = []  # sequences to clear in the KV cache before the next decode
        self.host_capacity = host_bytes
        self.host_used = 0  # bytes of saved copies
        self.parking: list[PrefixEntry] = []  # idle prefixes to move out of the KV cache before the next decode
        self.restores = 0
        #: the tokens every user's prefix starts with (the prompt's instruction), learned from the first
        #: new prefixes, decoded once into a sequence of its own and copied (shared cells) into each new
        #: prefix that starts with them: a new user decodes only the history. Never evicted.
        self.head: PrefixEntry | None = None
        self._seen: list[tuple[int, ...]] = []
        self.head_reuses = 0

    def acquire(self, key: tuple[int, ...], user: str | None) -> tuple[PrefixEntry, bool]:
        entry = self.entries.get(key)
        hit = entry is not None
        if entry is None:
            entry = self.entries[key] = PrefixEntry(key)
        self.entries.move_to_end(key)
        entry.refs += 1
        if user is not None:
            entry.users.add(user)
        return entry, hit

    def release(self, entry: PrefixEntry) -> None:
        entry.refs -= 1
        if entry.refs == 0 and not entry.busy:
            if entry.stale or entry.error or not entry.decoded:
                self._drop(entry)
            elif self.host_capacity and entry.seq is not None:
                self.parking.append(entry)

    def take_parking(self) -> list[PrefixEntry]:
        """The idle prefixes to park now (marked busy until `parked`)."""
        taken = []
        for entry in self.parking:
            if entry.refs == 0 and not entry.busy and entry.ready and not entry.stale and not entry.error:
                entry.busy = True
                taken.append(entry)
        self.parking = []
        return taken

    def parked(self, entry: PrefixEntry, saved: ctypes.Array | None) -> None:
        """`entry` left the KV cache; `saved`: its copy (None when the copy failed: it is forgotten)."""
        entry.busy = False
        self.free.append(entry.seq)
        self.used -= len(entry.key)
        entry.seq = None
        if entry.saved is None and saved is not None:
            entry.saved = saved
            self.host_used += ctypes.sizeof(saved)
        if entry.saved is None or entry.stale or entry.error:
            self._drop(entry)
            return
        for victim in list(self.entries.values()):  # least recently used first, this one last
            if self.host_used <= self.host_capacity:
                break
            if victim.parked and victim.refs == 0 and not victim.busy:
                self._drop(victim)

    def allocate(self, entry: PrefixEntry) -> bool:
        """Give `entry` a sequence and room for its tokens, evicting unused prefixes LRU-first."""
        need = len(entry.key)
        for victim in list(self.entries.values()):
            if self.free and self.used + need <= self.capacity:
                break
            if victim.refs == 0 and not victim.busy and victim.seq is not None:
                self._drop(victim)
        if not self.free or self.used + need > self.capacity:
            return False
        entry.seq = self.free.pop()
        self.used += need
        return True

    def invalidate(self, user: str) -> int:
        dropped = 0
        for entry in [e for e in self.entries.values() if user in e.users]:
            entry.stale = True
            del self.entries[entry.key]
            dropped += 1
            if entry.refs == 0 and not entry.busy:
                self._drop(entry)
        return dropped

    def after_batch(self, entry: PrefixEntry) -> None:
        entry.busy = False
        if entry.refs == 0 and (entry.stale or entry.error):
            self._drop(entry)
        elif entry.refs == 0 and self.host_capacity and entry.ready:
            self.parking.append(entry)

    def record(self, parkings: list[PrefixEntry], saved: list[ctypes.Array | None], restores: list[PrefixEntry],
               prefixes: list[tuple[PrefixEntry, tuple[int, ...], int]], error: str | None) -> None:  # fmt: skip
        """What a batch did to the cache: prefixes parked (`saved`: their copies), restored, and
        decoded (entry, tokens, start); `error`: the batch failed, and its prefixes with it."""
        for entry, copy in zip(parkings, saved, strict=True):
            self.parked(entry, copy)
        for entry in restores:
            self.restores += error is None
            entry.error = entry.error or error
            self.after_batch(entry)
        for entry, chunk, _ in prefixes:
            if error is None:
                entry.filled += len(chunk)
            else:
                entry.error = error
            self.after_batch(entry)

    def learn_head(self, key: tuple[int, ...]) -> None:
        """Note a new prefix; the first `HEAD_SAMPLES` give the head (their common start)."""
        if self.head is not None or len(self._seen) >= HEAD_SAMPLES or key in self._seen:
            return
        self._seen.append(key)
        if len(self._seen) < HEAD_SAMPLES:
            return
        common = min(len(k) for k in self._seen)
        for k in self._seen[1:]:
            common = min(common, next((i for i, (a, b) in enumerate(zip(self._seen[0], k, strict=False)) if a != b),
                                      common))  # fmt: skip
        if common >= HEAD_MIN_TOKENS:
            self.head = PrefixEntry(self._seen[0][:common])
            self.head.refs = 1  # pinned: never evicted, never parked

    def head_for(self, entry: PrefixEntry) -> PrefixEntry | None:
        """The decoded head to start `entry` from (a copy instead of a decode), or None."""
        head = self.head
        if head is None or not head.ready or head.busy or entry.planned or len(entry.key) <= len(head.key):
            return None
        return head if entry.key[: len(head.key)] == head.key else None

    def _drop(self, entry: PrefixEntry) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        if entry.seq is not None:
            self.removals.append(entry.seq)
            self.free.append(entry.seq)
            self.used -= len(entry.key)
            entry.seq = None
        if entry.saved is not None:
            self.host_used -= ctypes.sizeof(entry.saved)
            entry.saved = None
