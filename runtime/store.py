"""The feature store: item catalog, user profiles and interactions in SQLite (WAL).

Export fills it; the server reads histories from it and appends new interactions through
POST /v1/events, so histories stay current without re-exporting. The schema lives here only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import StoreError
from runtime.features import normalize_user_attributes
from runtime.prompt import HistoryEntry, ItemText

__all__ = ["SCHEMA_VERSION", "Interaction", "FeatureStore"]

SCHEMA_VERSION = 2
_ITEM_CACHE = 200_000
_UNSEEN = object()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY, title TEXT NOT NULL, year TEXT, tags TEXT NOT NULL DEFAULT '[]',
    rating_mean REAL, rating_count INTEGER, liked_share REAL);
CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, attributes TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS interactions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, item_id TEXT NOT NULL,
    rating REAL NOT NULL, timestamp INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS interactions_by_user ON interactions (user_id, timestamp, seq);
"""


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    rating: float
    timestamp: int


class FeatureStore:
    """A thread-safe handle on store.sqlite (one connection, serialized by a lock)."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._item_cache: dict[str, ItemText | None] = {}
        try:
            if not readonly:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.executescript(_SCHEMA)
            rows = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"{self.path}: not a corella feature store ({exc})") from exc
        if rows and rows[0][0] != str(SCHEMA_VERSION):
            self._conn.close()
            raise StoreError(
                f"{self.path}: feature store schema {rows[0][0]}, this corella reads {SCHEMA_VERSION}; "
                "re-export the bundle (or delete a live copy under BUNDLE/state/ to start from the bundle's)"
            )

    @classmethod
    def create(
        cls,
        path: str | Path,
        items: Iterable[tuple[str, ItemText]],
        users: Iterable[tuple[str, Mapping[str, Any]]],
        interactions: Iterable[Interaction],
    ) -> FeatureStore:
        path = Path(path)
        if path.exists():
            path.unlink()
        store = cls(path)
        with store._lock, store._conn:
            conn = store._conn
            conn.execute("BEGIN")
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.executemany(
                "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (i, t.title, t.year, json.dumps(list(t.tags)), t.rating_mean, t.rating_count, t.liked_share)
                    for i, t in items
                ),
            )
            conn.executemany(
                "INSERT OR REPLACE INTO users VALUES (?, ?)",
                ((u, json.dumps(normalize_user_attributes(a))) for u, a in users),
            )
            conn.executemany(
                "INSERT INTO interactions (user_id, item_id, rating, timestamp) VALUES (?, ?, ?, ?)",
                ((x.user_id, x.item_id, float(x.rating), int(x.timestamp)) for x in interactions),
            )
            conn.execute("COMMIT")
        # a single self-contained file in the bundle: fold the WAL back in
        store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return store

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def counts(self) -> dict[str, int]:
        return {t: self._query(f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("items", "users", "interactions")}

    def interactions(self, offset: int = 0, limit: int = -1) -> list[Interaction]:
        """Interactions in insertion order (the export writes them in global time order)."""
        rows = self._query(
            "SELECT user_id, item_id, rating, timestamp FROM interactions ORDER BY seq LIMIT ? OFFSET ?",
            (limit, offset),
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
        """Catalog entries of the known items among `item_ids` (the catalog never changes while
        serving, so entries, and misses, are remembered in memory, up to `_ITEM_CACHE` of them)."""
        cache, found, missing = self._item_cache, {}, []
        for item_id in dict.fromkeys(item_ids):
            entry = cache.get(item_id, _UNSEEN)
            if entry is _UNSEEN:
                missing.append(item_id)
            elif entry is not None:
                found[item_id] = entry
        if missing:
            fetched = self._fetch_items(missing)
            if len(cache) + len(missing) > _ITEM_CACHE:
                cache.clear()
            cache.update({i: fetched.get(i) for i in missing})
            found |= fetched
        return found

    def _fetch_items(self, unique: Sequence[str]) -> dict[str, ItemText]:
        found: dict[str, ItemText] = {}
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for item_id, title, year, tags, mean, count, liked in self._query(
                "SELECT item_id, title, year, tags, rating_mean, rating_count, liked_share FROM items "
                f"WHERE item_id IN ({marks})",
                chunk,
            ):
                found[item_id] = ItemText(title, year, tuple(json.loads(tags)), mean, count, liked)
        return found

    def user_attributes(self, user_id: str) -> dict[str, str] | None:
        rows = self._query("SELECT attributes FROM users WHERE user_id = ?", (user_id,))
        return json.loads(rows[0][0]) if rows else None

    def history(self, user_id: str, limit: int, before: int | None = None) -> list[Interaction]:
        """The user's last `limit` interactions (strictly before `before`), oldest first."""
        sql = "SELECT user_id, item_id, rating, timestamp FROM interactions WHERE user_id = ?"
        args: list[Any] = [user_id]
        if before is not None:
            sql += " AND timestamp < ?"
            args.append(int(before))
        sql += " ORDER BY timestamp DESC, seq DESC LIMIT ?"
        args.append(int(limit))
        rows = self._query(sql, args)
        return [Interaction(u, i, r, t) for u, i, r, t in reversed(rows)]

    def append(self, events: Sequence[Interaction]) -> int:
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT INTO interactions (user_id, item_id, rating, timestamp) VALUES (?, ?, ?, ?)",
                    ((e.user_id, e.item_id, float(e.rating), int(e.timestamp)) for e in events),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return len(events)

    def history_entries(self, history: Sequence[Interaction]) -> list[HistoryEntry]:
        catalog = self.items([h.item_id for h in history])
        return [HistoryEntry(catalog.get(h.item_id, ItemText(title=f"item {h.item_id}")), h.rating) for h in history]
