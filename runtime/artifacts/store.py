"""The feature store: item catalog, user profiles and interactions in SQLite (WAL).

Export fills it; the server reads histories from it and appends new interactions through
POST /v1/events, so histories stay current without re-exporting. Running totals of every user
and item (count, rating sum, likes: the CRM's statistics) are kept beside the interactions and
updated in the same transaction as each append. The schema lives here only.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import StoreError, StoreFull
from runtime.features import UserInteractions, normalize_user_attributes
from runtime.prompt import HistoryEntry, ItemText

__all__ = ["SCHEMA_VERSION", "Interaction", "FeatureStore"]

SCHEMA_VERSION = 4
#: catalog entries, item totals and user profiles remembered in memory, each up to this many
_CACHE = 200_000
_COLUMNS = "user_id, item_id, rating, timestamp, item_count_before, item_sum_before"
_READ = _COLUMNS + ", event_id"  # the columns of `Interaction`, in its order

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY, title TEXT NOT NULL, year TEXT, tags TEXT NOT NULL DEFAULT '[]',
    rating_mean REAL, rating_count INTEGER, liked_share REAL, text TEXT, posted INTEGER);
CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, attributes TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS interactions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, item_id TEXT NOT NULL,
    rating REAL NOT NULL, timestamp INTEGER NOT NULL,
    item_count_before INTEGER NOT NULL DEFAULT 0, item_sum_before REAL NOT NULL DEFAULT 0,
    event_id TEXT UNIQUE);
CREATE INDEX IF NOT EXISTS interactions_by_user ON interactions (user_id, timestamp, seq);
CREATE INDEX IF NOT EXISTS interactions_by_item ON interactions (item_id, timestamp);
CREATE TABLE IF NOT EXISTS item_totals (
    item_id TEXT PRIMARY KEY, count INTEGER NOT NULL, rating_sum REAL NOT NULL, likes INTEGER NOT NULL);
"""

# every item's totals over the whole store; run after each insert of interactions (same transaction)
_ADD_TOTALS = """
INSERT INTO item_totals (item_id, count, rating_sum, likes)
    SELECT item_id, COUNT(*), SUM(rating), SUM(rating >= :like) FROM interactions
    WHERE seq > :after GROUP BY item_id
ON CONFLICT (item_id) DO UPDATE SET count = count + excluded.count,
    rating_sum = rating_sum + excluded.rating_sum, likes = likes + excluded.likes
"""


#: what each schema lacks of the next one, added in place when a live store of it is opened
_UPGRADES = {3: ("ALTER TABLE items ADD COLUMN text TEXT", "ALTER TABLE items ADD COLUMN posted INTEGER")}
_ITEM_COLUMNS = "item_id, title, year, tags, rating_mean, rating_count, liked_share, text"


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    rating: float
    timestamp: int
    #: the item's totals (interactions, rating sum) strictly before this one; `append` fills them in
    item_count_before: int = 0
    item_sum_before: float = 0.0
    #: a client's id for the event: appending an id the store holds already does nothing
    event_id: str | None = None


class FeatureStore:
    """A thread-safe handle on store.sqlite: reads on one connection and appends on another, each
    serialized by its own lock, so that an append's fsync (WAL: readers never wait for the writer)
    does not hold up the predictions' reads.

    What a request reads of the store besides the user's past (catalog entries, item totals, user
    profiles) is remembered in memory: the catalog and the profiles never change while serving, and
    `append` forgets the totals of the items it moves. The handle that appends is the store's only
    writer while it serves (as the engine's cache of users' pasts assumes too)."""

    #: the dialect's bits: LIMIT with no limit, the rating sum and like count of a group
    _NO_LIMIT: int | None = -1
    _SUMS = "TOTAL(rating), TOTAL(rating >= ?)"

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        self._start_caches()
        try:
            if not readonly:
                self._conn.execute("PRAGMA journal_mode=WAL")
                # FULL: an event acknowledged with 200 is on disk, power cut or not (WAL + NORMAL
                # could lose the last commits); it costs one fsync per /v1/events batch
                self._conn.execute("PRAGMA synchronous=FULL")
                self._conn.executescript(_SCHEMA)
            rows = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
            like = self._conn.execute("SELECT value FROM meta WHERE key = 'like_threshold'").fetchall()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"{self.path}: not a corella feature store ({exc})") from exc
        if rows and not readonly and int(rows[0][0]) in _UPGRADES:
            self._upgrade(int(rows[0][0]))
            rows = [(str(SCHEMA_VERSION),)]
        readable = readonly and rows and int(rows[0][0]) in _UPGRADES  # an older bundle's snapshot, only read
        if rows and rows[0][0] != str(SCHEMA_VERSION) and not readable:
            self._conn.close()
            raise StoreError(
                f"{self.path}: feature store schema {rows[0][0]}, this corella reads {SCHEMA_VERSION}; "
                "re-export the bundle; a live store of an older corella can be set aside with `corella store reset`"
            )
        #: the items' columns as `Interaction`-like reads want them (an older snapshot read as it is: no texts)
        self._item_columns = _ITEM_COLUMNS if not readable else _ITEM_COLUMNS.replace(", text", ", NULL")
        #: ratings at or above it are likes in the running totals (set by `create`)
        self.like_threshold = float(like[0][0]) if like else math.inf
        if not readonly:
            self._writer = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            self._writer.execute("PRAGMA synchronous=FULL")  # per connection: every append is on disk

    def _start_caches(self) -> None:
        """The locks, the writer slot and the empty caches (every backend starts with these)."""
        self._lock = threading.Lock()  # the reading connection and the caches
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._interaction_count: int | None = None  # counted once, then kept by the appends
        self._item_cache: dict[str, ItemText | None] = {}
        self._totals_cache: dict[str, tuple[float, float, float] | None] = {}
        self._user_cache: dict[str, dict[str, str] | None] = {}

    def _upgrade(self, version: int) -> None:
        """Bring a live store of an older schema to this one, in one transaction."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                while version in _UPGRADES:
                    for statement in _UPGRADES[version]:
                        self._conn.execute(statement)
                    version += 1
                self._conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    @classmethod
    def create(
        cls,
        path: str | Path,
        items: Iterable[tuple[str, ItemText]],
        users: Iterable[tuple[str, Mapping[str, Any]]],
        interactions: Iterable[Interaction],
        like_threshold: float,
    ) -> FeatureStore:
        path = Path(path)
        if path.exists():
            path.unlink()
        store = cls(path)
        with store._lock, store._conn:
            conn = store._conn
            conn.execute("BEGIN")
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("INSERT INTO meta VALUES ('like_threshold', ?)", (repr(float(like_threshold)),))
            store.like_threshold = float(like_threshold)
            conn.executemany(
                f"INSERT OR REPLACE INTO items ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (i, t.title, t.year, json.dumps(list(t.tags)), t.rating_mean, t.rating_count, t.liked_share, t.text)
                    for i, t in items
                ),
            )
            conn.executemany(
                "INSERT OR REPLACE INTO users VALUES (?, ?)",
                ((u, json.dumps(normalize_user_attributes(a))) for u, a in users),
            )
            conn.executemany(
                f"INSERT INTO interactions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                ((x.user_id, x.item_id, float(x.rating), int(x.timestamp), int(x.item_count_before),
                  float(x.item_sum_before)) for x in interactions),
            )  # fmt: skip
            store._add_totals(after=0)
            conn.execute("COMMIT")
        # a single self-contained file in the bundle: fold the WAL back in
        store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return store

    def meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def delete_meta(self, key: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM meta WHERE key = ?", (key,))

    def close(self) -> None:
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
        with self._lock:
            self._conn.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._read(sql, args)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read on the reading connection (the caller holds the lock)."""
        return self._conn.execute(sql, args).fetchall()

    def _remembered(self, cache: dict[str, Any], keys: Sequence[str],
                    fetch: Callable[[list[str]], dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
        """The entries of `keys` that exist, from `cache`, with the ones it lacks fetched by `fetch`
        (called with the lock held; a key it does not return is remembered as absent). Filled under
        the lock, so a fill never puts back what an `append` has just made stale."""
        with self._lock:
            found, missing = {}, []
            for key in dict.fromkeys(keys):
                if key not in cache:
                    missing.append(key)
                elif (value := cache[key]) is not None:
                    found[key] = value
            if missing:
                fetched: dict[str, Any] = {}
                for start in range(0, len(missing), 500):
                    fetched |= fetch(missing[start : start + 500])
                if len(cache) + len(missing) > _CACHE:
                    cache.clear()  # full: start again (what this call found is already in hand)
                cache.update({key: fetched.get(key) for key in missing})
                found |= fetched
            return found

    def counts(self) -> dict[str, int]:
        interactions = self._interaction_count  # kept by the appends; counted (once) only when unknown
        if interactions is None:
            with self._write_lock:
                interactions = self._count_interactions(self._writer or self._conn)
        return {t: self._query(f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("items", "users")} | {
            "interactions": interactions
        }

    def _count_interactions(self, conn: sqlite3.Connection) -> int:
        """The interactions held: counted once (a full scan), then kept by `append` (caller holds the write lock)."""
        if self._interaction_count is None:
            self._interaction_count = conn.execute("SELECT COUNT(*) FROM interactions").fetchone()[0]
        return self._interaction_count

    def interactions(self, offset: int = 0, limit: int = -1) -> list[Interaction]:
        """Interactions in insertion order (the export writes them in global time order)."""
        rows = self._query(
            f"SELECT {_READ} FROM interactions ORDER BY seq LIMIT ? OFFSET ?",
            (limit if limit >= 0 else self._NO_LIMIT, offset),
        )
        return [Interaction(*row) for row in rows]

    def user_ids(self) -> list[str]:
        rows = self._query("SELECT user_id FROM users ORDER BY user_id")
        if not rows:
            rows = self._query("SELECT DISTINCT user_id FROM interactions ORDER BY user_id")
        return [u for (u,) in rows]

    def item_ids(self) -> list[str]:
        return [i for (i,) in self._query("SELECT item_id FROM items ORDER BY item_id")]

    def items(self, item_ids: Sequence[str]) -> dict[str, ItemText]:
        """Catalog entries of the known items among `item_ids`."""
        return self._remembered(self._item_cache, item_ids, self._fetch_items)

    def _fetch_items(self, chunk: list[str]) -> dict[str, ItemText]:
        marks = ",".join("?" * len(chunk))
        rows = self._read(f"SELECT {self._item_columns} FROM items WHERE item_id IN ({marks})", chunk)
        return {item_id: ItemText(title, year, tuple(json.loads(tags)), mean, count, liked, text)
                for item_id, title, year, tags, mean, count, liked, text in rows}  # fmt: skip

    def upsert_items(self, entries: Sequence[tuple[str, ItemText]]) -> tuple[int, int]:
        """Add items to the catalog, or replace what it says of them (the training split's statistics
        of an item are kept), in one transaction, on disk when it returns. Returns (added, updated)."""
        if self._writer is None:
            raise StoreError(f"{self.path}: opened read-only")
        latest = dict(entries)  # a batch naming an item twice: its last entry
        conn, posted = self._writer, time.time_ns() // 1_000_000
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")  # as `append`: the write lock first, waited for
            try:
                known: set[str] = set()
                ids = list(latest)
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    known |= {
                        i for (i,) in conn.execute(f"SELECT item_id FROM items WHERE item_id IN ({marks})", chunk)
                    }
                conn.executemany(
                    "INSERT INTO items (item_id, title, year, tags, text, posted) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (item_id) DO UPDATE SET title = excluded.title, year = excluded.year, "
                    "tags = excluded.tags, text = excluded.text, posted = excluded.posted",
                    ((i, t.title, t.year, json.dumps(list(t.tags)), t.text, posted) for i, t in latest.items()),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        with self._lock:  # after the commit: a read from now on sees the new entries
            for item in latest:
                self._item_cache.pop(item, None)
        return len(latest) - len(known), len(known)

    def posted_items(self) -> list[tuple[str, ItemText]]:
        """The items added or changed while serving (not by the export), oldest first."""
        if self._item_columns != _ITEM_COLUMNS:
            return []  # an older snapshot: nothing was posted to it
        rows = self._query(f"SELECT {_ITEM_COLUMNS} FROM items WHERE posted IS NOT NULL ORDER BY posted, item_id")
        return [(item_id, ItemText(title, year, tuple(json.loads(tags)), mean, count, liked, text))
                for item_id, title, year, tags, mean, count, liked, text in rows]  # fmt: skip

    def user_attributes(self, user_id: str) -> dict[str, str] | None:
        found = self._remembered(self._user_cache, [user_id], self._fetch_users)
        return dict(found[user_id]) if user_id in found else None

    def _fetch_users(self, chunk: list[str]) -> dict[str, dict[str, str]]:
        marks = ",".join("?" * len(chunk))
        rows = self._read(f"SELECT user_id, attributes FROM users WHERE user_id IN ({marks})", chunk)
        return {user_id: json.loads(attributes) for user_id, attributes in rows}

    def history(self, user_id: str, limit: int | None = None, before: int | None = None) -> list[Interaction]:
        """The user's last `limit` interactions (all by default; strictly before `before`), oldest first."""
        sql = f"SELECT {_READ} FROM interactions WHERE user_id = ?"
        args: list[Any] = [user_id]
        if before is not None:
            sql += " AND timestamp < ?"
            args.append(int(before))
        sql += " ORDER BY timestamp DESC, seq DESC LIMIT ?"
        args.append(self._NO_LIMIT if limit is None else int(limit))
        return [Interaction(*row) for row in reversed(self._query(sql, args))]

    def user_past(self, user_id: str, before: int | None = None) -> tuple[list[Interaction], UserInteractions]:
        """Every interaction of the user (strictly before `before`), oldest first, and the same as
        the statistics read them."""
        history = self.history(user_id, before=before)
        return history, self.past(
            [h.item_id for h in history],
            [h.rating for h in history],
            [h.item_count_before for h in history],
            [h.item_sum_before for h in history],
        )

    def past(self, item_ids: Sequence[str], ratings: Sequence[float], counts_before: Sequence[float] | None = None,
             sums_before: Sequence[float] | None = None) -> UserInteractions:  # fmt: skip
        """A user's past interactions as the statistics read them, with each item's tags from the
        catalog; without the items' totals before each rating, their current totals stand in."""
        if counts_before is None or sums_before is None:
            totals = self.item_totals(item_ids)
            counts_before, sums_before = totals[:, 0], totals[:, 1]
        catalog = self.items(item_ids)
        return UserInteractions(
            ratings=ratings,
            item_counts_before=counts_before,
            item_sums_before=sums_before,
            item_tags=[entry.tags if (entry := catalog.get(item)) else () for item in item_ids],
        )

    def append(self, events: Sequence[Interaction], max_interactions: int | None = None) -> int:
        """Append in one transaction (on disk when it returns); events whose `event_id` the store
        holds already are skipped (a retried POST counts once). Returns how many were new. With
        `max_interactions`, a batch that would take the store past it is refused whole (StoreFull)."""
        if self._writer is None:
            raise StoreError(f"{self.path}: opened read-only")
        conn = self._writer
        with self._write_lock:
            total = self._count_interactions(conn)
            if max_interactions is not None and total + len(events) > max_interactions:
                raise StoreFull(f"the live store holds {total:,} interactions; {len(events):,} more would pass "
                                f"its bound of {max_interactions:,} (--max-store-interactions)")  # fmt: skip
            # IMMEDIATE: the write lock from the start, waited for (busy timeout) where another
            # connection writes (a reload's migration marks this store); a deferred transaction
            # that read first would fail at once when it tried to write
            conn.execute("BEGIN IMMEDIATE")
            try:
                (last,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM interactions").fetchone()
                # each event sees its item's totals before this batch (a batch is one moment)
                before = {item: (0, 0.0) for item in {e.item_id for e in events}}
                marks = ",".join("?" * len(before))
                before |= {
                    item: (n, total)
                    for item, n, total in conn.execute(
                        f"SELECT item_id, count, rating_sum FROM item_totals WHERE item_id IN ({marks})", list(before)
                    )
                }
                added = conn.executemany(
                    f"INSERT OR IGNORE INTO interactions ({_COLUMNS}, event_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    ((e.user_id, e.item_id, float(e.rating), int(e.timestamp), *before[e.item_id], e.event_id)
                     for e in events),
                ).rowcount  # fmt: skip
                conn.execute(_ADD_TOTALS, {"after": last, "like": self.like_threshold})
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._interaction_count = total + added
        with self._lock:  # after the commit: a read from now on sees the new totals
            for item in before:
                self._totals_cache.pop(item, None)
        return int(added)

    def _add_totals(self, after: int) -> None:
        """Fold the interactions inserted after `seq` into the items' totals (caller holds the
        lock and the transaction)."""
        self._conn.execute(_ADD_TOTALS, {"after": after, "like": self.like_threshold})

    def item_totals(self, item_ids: Sequence[str], before: int | None = None) -> np.ndarray:
        """Totals of each item (float64 [len(item_ids), 3]), zeros for an item never rated."""
        if before is None:
            found = self._remembered(self._totals_cache, item_ids, self._fetch_totals)
        else:
            found = {}
            unique = list(dict.fromkeys(item_ids))
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                sql = (f"SELECT item_id, COUNT(*), {self._SUMS} FROM interactions "
                       f"WHERE item_id IN ({marks}) AND timestamp < ? GROUP BY item_id")  # fmt: skip
                rows = self._query(sql, [self.like_threshold, *chunk, int(before)])
                found |= {item: (float(n), float(total), float(likes)) for item, n, total, likes in rows}
        out = np.zeros((len(item_ids), 3))
        for row, item in enumerate(item_ids):
            if item in found:
                out[row] = found[item]
        return out

    def _fetch_totals(self, chunk: list[str]) -> dict[str, tuple[float, float, float]]:
        marks = ",".join("?" * len(chunk))
        rows = self._read(
            f"SELECT item_id, count, rating_sum, likes FROM item_totals WHERE item_id IN ({marks})", chunk
        )
        return {item: (float(n), float(total), float(likes)) for item, n, total, likes in rows}

    def history_entries(self, history: Sequence[Interaction]) -> list[HistoryEntry]:
        catalog = self.items([h.item_id for h in history])
        return [HistoryEntry(catalog.get(h.item_id, ItemText(title=f"item {h.item_id}")), h.rating) for h in history]
