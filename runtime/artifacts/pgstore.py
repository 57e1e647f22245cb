"""The live feature store in PostgreSQL, one store for several replicas (psycopg 3 and its pool).

`corella serve --store-url postgresql://...` (or CORELLA_STORE_URL) serves from it; SQLite stays
the embedded default. The schema is SQLite's (runtime.artifacts.store), and every read the two
share is the same SQL; what PostgreSQL says otherwise (the schema's types, appends, upserts, the
snapshot's copy, notifications) lives in this module only.

- The first replica to start seeds the store from the bundle's snapshot (COPY), under an advisory
  lock; a store seeded from another bundle is refused, as a SQLite live store is.
- An append is one transaction under an advisory lock: the items' totals before the batch, the
  rows (idempotent by `event_id`), the totals after and the interaction count move together,
  whichever replica writes. On commit, PostgreSQL tells every replica (LISTEN/NOTIFY) which users
  and items moved; each forgets what it cached of them (totals, the users' pasts, prompt prefixes
  and remembered answers), so an event posted to one replica changes the next prediction of all.
- Reads go through a connection pool; a store that does not answer is a StoreError, which the
  HTTP layer answers with 503 and Retry-After.
- Each bundle's store is a schema of its own in the one database (`corella_<bundle id>`), so that
  replicas can move from one bundle to the next one at a time (a reload, or a restart with the new
  bundle). The new schema is seeded from the new bundle's snapshot and then carries the old one's
  live events and posted items (`PostgresStore.carry_from`: the rule of `corella store migrate`,
  exactly once whichever replicas carry, by a watermark kept in the same transaction). Replicas
  still on the old bundle write to its schema; every replica on the new one listens to the old
  schema's notices too and carries what they announce, so no acknowledged event is left behind
  while a deploy rolls.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from runtime.artifacts.store import _ITEM_COLUMNS, SCHEMA_VERSION, FeatureStore, Interaction
from runtime.errors import StoreError, StoreFull, StoreUnavailable
from runtime.prompt import ItemText

__all__ = ["PostgresStore", "postgres_live_store", "bundle_schema", "is_postgres_url", "redacted"]

log = logging.getLogger(__name__)

_CHANNEL = "corella_store"
_APPEND_LOCK, _SEED_LOCK = 0x636F72656C6C61, 0x636F72656C6C62  # advisory lock keys ("corella", "corellb")
_NOTICE_BYTES = 7000  # a NOTIFY payload holds at most 8000 bytes
READ_WAIT_S = 1.0
LISTENER = "corella-store-listen"  # the listener connection's application_name

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY, title TEXT NOT NULL, year TEXT, tags TEXT NOT NULL DEFAULT '[]',
    rating_mean DOUBLE PRECISION, rating_count BIGINT, liked_share DOUBLE PRECISION, text TEXT, posted BIGINT);
CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, attributes TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS interactions (
    seq BIGSERIAL PRIMARY KEY, user_id TEXT NOT NULL, item_id TEXT NOT NULL,
    rating DOUBLE PRECISION NOT NULL, timestamp BIGINT NOT NULL,
    item_count_before BIGINT NOT NULL DEFAULT 0, item_sum_before DOUBLE PRECISION NOT NULL DEFAULT 0,
    event_id TEXT UNIQUE);
CREATE INDEX IF NOT EXISTS interactions_by_user ON interactions (user_id, timestamp, seq);
CREATE INDEX IF NOT EXISTS interactions_by_item ON interactions (item_id, timestamp);
CREATE TABLE IF NOT EXISTS item_totals (
    item_id TEXT PRIMARY KEY, count BIGINT NOT NULL, rating_sum DOUBLE PRECISION NOT NULL, likes BIGINT NOT NULL);
"""

# the rows (a retried event_id skipped), then the totals of what was added, in one statement
_APPEND = """
WITH added AS (
    INSERT INTO interactions (user_id, item_id, rating, timestamp, item_count_before, item_sum_before, event_id)
    SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[], %s::int8[], %s::int8[], %s::float8[], %s::text[])
    ON CONFLICT (event_id) DO NOTHING
    RETURNING user_id, item_id, rating
), totals AS (
    INSERT INTO item_totals AS t (item_id, count, rating_sum, likes)
    SELECT item_id, COUNT(*), SUM(rating), SUM(CASE WHEN rating >= %s THEN 1 ELSE 0 END) FROM added GROUP BY item_id
    ON CONFLICT (item_id) DO UPDATE SET count = t.count + excluded.count,
        rating_sum = t.rating_sum + excluded.rating_sum, likes = t.likes + excluded.likes
)
SELECT user_id, item_id FROM added
"""

_UPSERT_ITEM = """
INSERT INTO items (item_id, title, year, tags, text, posted) VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (item_id) DO UPDATE SET title = excluded.title, year = excluded.year, tags = excluded.tags,
    text = excluded.text, posted = excluded.posted
"""


def _channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel of a schema's store (`public`'s is the one corella used before schemas)."""
    return _CHANNEL if schema == "public" else schema


def bundle_schema(bundle_id: str) -> str:
    """The schema of a bundle's live store (bundle ids are 16 hex digits: a plain identifier)."""
    if not (isinstance(bundle_id, str) and bundle_id.isalnum()):
        raise StoreError(f"bundle id {bundle_id!r} cannot name a PostgreSQL schema")
    return f"corella_{bundle_id.lower()}"


def is_postgres_url(value: Any) -> bool:
    return isinstance(value, str) and value.split("://", 1)[0] in ("postgresql", "postgres")


def redacted(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _driver() -> tuple[Any, Any]:
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:  # pragma: no cover - a dependency of corella
        raise StoreError(f"a PostgreSQL store needs psycopg 3 and psycopg-pool ({exc}): pip install 'corella'") from exc
    return psycopg, psycopg_pool


class PostgresStore(FeatureStore):
    """The feature store's reads and writes on PostgreSQL; `on_change(users)` is called when any
    replica (this one too) appended events of `users`, `on_change(None)` when notices may have been
    missed (the listener's connection dropped)."""

    _NO_LIMIT = None
    _SUMS = "COALESCE(SUM(rating), 0), COALESCE(SUM(CASE WHEN rating >= ? THEN 1 ELSE 0 END), 0)"

    def __init__(self, url: str, schema: str = "public", pool_size: int = 8, timeout_s: float = 5.0) -> None:
        psycopg, psycopg_pool = _driver()
        self._psycopg, self._psycopg_pool = psycopg, psycopg_pool
        self._errors = (psycopg.Error, psycopg_pool.PoolTimeout)
        if not schema.replace("_", "").isalnum():
            raise StoreError(f"{schema!r} is not a schema name corella makes")
        self.url, self.schema = url, schema
        self.path = f"{redacted(url)} (schema {schema})"  # type: ignore[assignment]
        self.channel = _channel(schema)  # what its appends are announced on
        self._connect = {"autocommit": True, "options": f"-c search_path={schema}"}
        self._start_caches()
        self._item_columns = _ITEM_COLUMNS
        self.on_change: Callable[[set[str] | None], None] | None = None
        self._pool = psycopg_pool.ConnectionPool(url, min_size=1, max_size=pool_size, timeout=timeout_s, open=False,
                                                 kwargs=self._connect, name="corella-store")  # fmt: skip
        try:
            self._pool.open(wait=True, timeout=timeout_s)
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SEED_LOCK,))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                conn.execute(_SCHEMA)
        except self._errors as exc:
            self._pool.close()
            raise StoreUnavailable(f"{self.path}: PostgreSQL does not answer ({str(exc).strip()})") from exc
        self._read_meta()
        self._closing = threading.Event()
        self._listening = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="corella-store-listen", daemon=True)
        self._listener.start()
        if not self._listening.wait(timeout_s):
            log.warning("%s: not listening for other replicas' writes yet", self.path)

    def _read_meta(self) -> None:
        version = self.meta("schema_version")
        if version is not None and version != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path}: feature store schema {version}, this corella reads {SCHEMA_VERSION}")
        like = self.meta("like_threshold")
        self.like_threshold = float(like) if like is not None else math.inf

    def _failed(self, exc: Exception) -> StoreError:
        """A driver's error as corella's: one that says the server is away is StoreUnavailable
        (503 with Retry-After over HTTP), any other a StoreError."""
        away = isinstance(exc, (self._psycopg.OperationalError, self._psycopg_pool.PoolTimeout))
        return (StoreUnavailable if away else StoreError)(f"{self.path}: {str(exc).strip()}")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            # a read waits at most READ_WAIT_S for a connection: with PostgreSQL away, a prediction
            # is answered (503) rather than holding a CPU worker through the pool's whole timeout
            with self._pool.connection(timeout=READ_WAIT_S) as conn:
                return conn.execute(sql.replace("?", "%s"), list(args)).fetchall()
        except self._errors as exc:
            raise self._failed(exc) from exc

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._read(sql, args)  # the pool serializes nothing: no lock

    def meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = %s", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value))  # fmt: skip

    def delete_meta(self, key: str) -> None:
        self._write("DELETE FROM meta WHERE key = %s", (key,))

    def _write(self, sql: str, args: Sequence[Any]) -> None:
        try:
            with self._pool.connection() as conn:
                conn.execute(sql, list(args))
        except self._errors as exc:
            raise self._failed(exc) from exc

    def public_owner(self) -> str | None:
        """The bundle whose store a corella before schemas seeded in `public`, where there is one."""
        if self._read("SELECT to_regclass('public.meta')")[0][0] is None:
            return None
        rows = self._read("SELECT value FROM public.meta WHERE key = 'bundle_id'")
        return rows[0][0] if rows else None

    def schema_exists(self, schema: str) -> bool:
        return bool(self._read("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (schema,)))

    def counts(self) -> dict[str, int]:
        rows = self._read("SELECT (SELECT COUNT(*) FROM items), (SELECT COUNT(*) FROM users), "
                          "(SELECT value FROM meta WHERE key = 'interactions')")  # fmt: skip
        items, users, interactions = rows[0]
        return {"items": int(items), "users": int(users), "interactions": int(interactions or 0)}

    def close(self) -> None:
        self._closing.set()
        self._listener.join(timeout=5)
        self._pool.close()

    # ---------------------------------------------------------------- writes
    def append(self, events: Sequence[Interaction], max_interactions: int | None = None) -> int:
        """As FeatureStore.append, serialized across replicas by an advisory lock."""
        if not events:
            return 0
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_APPEND_LOCK,))
                added = self._append(conn, events, max_interactions)
        except self._errors as exc:
            raise self._failed(exc) from exc
        self._forget({e.item_id for e in events})
        return len(added)

    def _append(self, conn: Any, events: Sequence[Interaction], max_interactions: int | None = None) -> list[Any]:
        """The events' rows, totals and count in `conn`'s transaction (the append lock held); announced."""
        total = int(conn.execute("SELECT value FROM meta WHERE key = 'interactions'").fetchone()[0])
        if max_interactions is not None and total + len(events) > max_interactions:
            raise StoreFull(f"the live store holds {total:,} interactions; {len(events):,} more would pass "
                            f"its bound of {max_interactions:,} (--max-store-interactions)")  # fmt: skip
        items = sorted({e.item_id for e in events})
        before = {item: (0, 0.0) for item in items} | {
            item: (int(n), float(s)) for item, n, s in conn.execute(
                "SELECT item_id, count, rating_sum FROM item_totals WHERE item_id = ANY(%s)", (items,))
        }  # fmt: skip
        columns = [
            [e.user_id for e in events], [e.item_id for e in events], [float(e.rating) for e in events],
            [int(e.timestamp) for e in events], [before[e.item_id][0] for e in events],
            [before[e.item_id][1] for e in events], [e.event_id for e in events],
        ]  # fmt: skip
        added = conn.execute(_APPEND, (*columns, self.like_threshold)).fetchall()
        conn.execute("UPDATE meta SET value = (value::bigint + %s)::text WHERE key = 'interactions'",
                     (len(added),))  # fmt: skip
        self._announce(conn, sorted({u for u, _ in added}), sorted({i for _, i in added}))
        return added

    def _announce(self, conn: Any, users: Sequence[str], items: Sequence[str]) -> None:
        for payload in _notices(users, items):
            conn.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))

    def upsert_items(self, entries: Sequence[tuple[str, ItemText]]) -> tuple[int, int]:
        posted = time.time_ns() // 1_000_000
        latest = {i: (t, posted) for i, t in entries}
        try:
            with self._pool.connection() as conn, conn.transaction():
                known = self._upsert(conn, latest)
        except self._errors as exc:
            raise self._failed(exc) from exc
        self._forget(latest)
        return len(latest) - known, known

    def _upsert(self, conn: Any, latest: dict[str, tuple[ItemText, int]]) -> int:
        """Items (each with its posting time) into the catalog in `conn`'s transaction; announced.
        Returns how many were known already."""
        ids = list(latest)
        known = len(conn.execute("SELECT item_id FROM items WHERE item_id = ANY(%s)", (ids,)).fetchall())
        with conn.cursor() as cursor:
            cursor.executemany(_UPSERT_ITEM, [(i, t.title, t.year, json.dumps(list(t.tags)), t.text, posted)
                                              for i, (t, posted) in latest.items()])  # fmt: skip
        self._announce(conn, [], ids)
        return known

    # ---------------------------------------------------------------- another bundle's store
    def carry_from(self, source: str) -> dict[str, int]:
        """What the live store in schema `source` (another bundle's, in this database) took since it
        was last carried from: its posted items, then its events of items this catalog holds (the rule
        of `corella store migrate`). Exactly once, whichever replicas carry at the same time: the
        append lock is held and the watermark (the source's last sequence number and posting time
        carried) moves in the same transaction. From then on this store's listeners follow `source`'s
        notices too (meta `carries_from`), carrying what the replicas still on it write."""
        from psycopg import sql

        key, src = f"carried_from:{source}", sql.Identifier(source)
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_APPEND_LOCK,))
                if conn.execute("SELECT to_regclass(%s)", (f"{source}.interactions",)).fetchone()[0] is None:
                    raise StoreError(f"{self.path}: no live store in schema {source} to carry from")
                mark = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
                last_seq, last_posted = (int(v) for v in mark[0].split(",")) if mark else (self._seed_end(conn, src), 0)
                items = conn.execute(sql.SQL("SELECT item_id, title, year, tags, text, posted FROM {}.items "
                                             "WHERE posted > %s ORDER BY posted").format(src),
                                     (last_posted,)).fetchall()  # fmt: skip
                rows = conn.execute(sql.SQL("SELECT seq, user_id, item_id, rating, timestamp, event_id FROM "
                                            "{}.interactions WHERE seq > %s ORDER BY seq").format(src),
                                    (last_seq,)).fetchall()  # fmt: skip
                if items:
                    self._upsert(conn, {i: (ItemText(title, year, tuple(json.loads(tags or "[]")), text=text), posted)
                                        for i, title, year, tags, text, posted in items})  # fmt: skip
                catalog = {i for (i,) in conn.execute("SELECT item_id FROM items WHERE item_id = ANY(%s)",
                                                      (sorted({r[2] for r in rows}),))}  # fmt: skip
                kept = [Interaction(u, i, float(r), int(t), event_id=e) for _, u, i, r, t, e in rows if i in catalog]
                added = self._append(conn, kept) if kept else []
                mark_to = f"{rows[-1][0] if rows else last_seq},{items[-1][5] if items else last_posted}"
                conn.execute("INSERT INTO meta VALUES (%s, %s), ('carries_from', %s) ON CONFLICT (key) DO UPDATE "
                             "SET value = excluded.value", (key, mark_to, source))  # fmt: skip
        except self._errors as exc:
            raise self._failed(exc) from exc
        self._forget({r[2] for r in rows} | {i[0] for i in items})
        if added:
            self._tell({u for u, _ in added})
        return {"items": len(items), "events": len(rows), "kept": len(kept), "added": len(added)}

    # ---------------------------------------------------------------- other replicas' writes
    def _forget(self, items: Iterable[str]) -> None:
        """Forget the cached totals and catalog entries of `items` (the users' profiles never change)."""
        with self._lock:
            for item in items:
                self._totals_cache.pop(item, None)
                self._item_cache.pop(item, None)

    def _listen(self) -> None:
        """LISTEN for the writes of every replica. A dropped connection loses the notices sent until
        it is back: on reconnecting, every cache is forgotten (and `on_change(None)` says so)."""
        psycopg = self._psycopg
        connected = False
        while not self._closing.is_set():
            try:
                with psycopg.connect(self.url, application_name=LISTENER, **self._connect) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    # another bundle's store this one carries from (a deploy rolling over replicas):
                    # listened to as well, and caught up with now (its notices before this were missed)
                    row = conn.execute("SELECT value FROM meta WHERE key = 'carries_from'").fetchone()
                    source = row[0] if row and row[0].replace("_", "").isalnum() else None
                    if source is not None:
                        conn.execute(f"LISTEN {_channel(source)}")
                        self._carry_quietly(source)
                    if connected:
                        self._missed()
                    connected = True
                    self._listening.set()
                    while not self._closing.is_set():
                        for notice in conn.notifies(timeout=0.5):
                            if notice.channel == self.channel:
                                self._notified(notice.payload)
                            elif source is not None and notice.channel == _channel(source):
                                self._carry_quietly(source)
            except psycopg.Error as exc:
                if self._closing.is_set():
                    return
                log.warning("%s: listening for other replicas' writes failed (%s); again in 1 s", self.path, exc)
                self._missed()
                self._closing.wait(1.0)

    @staticmethod
    def _seed_end(conn: Any, src: Any) -> int:
        """The sequence number of the last interaction of the source's snapshot (0: it had none)."""
        from psycopg import sql

        seeded = conn.execute(sql.SQL("SELECT value FROM {}.meta WHERE key = %s").format(src),
                              ("seed_interactions",)).fetchone()  # fmt: skip
        if not seeded or not int(seeded[0]):
            return 0
        last = conn.execute(sql.SQL("SELECT seq FROM {}.interactions ORDER BY seq OFFSET %s LIMIT 1").format(src),
                            (int(seeded[0]) - 1,)).fetchone()  # fmt: skip
        return int(last[0]) if last else 0

    def _carry_quietly(self, source: str) -> None:
        try:
            self.carry_from(source)
        except StoreError as exc:  # PostgreSQL away: the next notice, or reconnecting, carries it
            log.warning("%s: carrying the events of %s failed (%s)", self.path, source, exc)

    def _missed(self) -> None:
        with self._lock:
            self._totals_cache.clear()
            self._item_cache.clear()
        self._tell(None)

    def _tell(self, users: set[str] | None) -> None:
        if self.on_change is not None:
            try:
                self.on_change(users)
            except Exception:  # pragma: no cover - a callback's failure must not end the listener
                log.exception("forgetting changed users failed")

    def _notified(self, payload: str) -> None:
        try:
            notice = json.loads(payload)
        except ValueError:
            return
        users, items = set(notice.get("u", [])), notice.get("i", [])
        self._forget(items)
        if users:
            self._tell(users)


def _notices(users: Sequence[str], items: Sequence[str]) -> list[str]:
    """The changed users and items as NOTIFY payloads of at most `_NOTICE_BYTES` each."""
    out, current, size = [], {"u": [], "i": []}, 20
    for key, values in (("u", users), ("i", items)):
        for value in values:
            cost = len(json.dumps(value)) + 1
            if size + cost > _NOTICE_BYTES and (current["u"] or current["i"]):
                out.append(json.dumps(current))
                current, size = {"u": [], "i": []}, 20
            current[key].append(value)
            size += cost
    if current["u"] or current["i"]:
        out.append(json.dumps(current))
    return out


# ---------------------------------------------------------------------------- seeding
def postgres_live_store(url: str, bundle: Any, carry: bool = True) -> PostgresStore:
    """The PostgreSQL live store of `bundle` (its schema, `bundle_schema`): seeded from its snapshot by
    the first replica to start, checked to belong to it by every later one. A new store of a bundle
    that replaced another at export carries that bundle's live store, where the database holds one
    (`carry_from`): replicas can restart onto the new bundle one at a time."""
    store = PostgresStore(url, bundle_schema(bundle.id))
    try:
        seeded = _seed(store, bundle)
        old = bundle.manifest.get("replaces")
        source = bundle_schema(old) if isinstance(old, str) and old.isalnum() else None
        if source is None or not store.schema_exists(source):
            # corella before schemas kept one bundle's store in `public`: this bundle's is carried from there
            source = "public" if store.public_owner() == bundle.id else None
        if carry and seeded and source is not None:
            carried = store.carry_from(source)
            log.info("carried %d of %d events of the live store in schema %s into bundle %s's", carried["kept"],
                     carried["events"], source, bundle.id)  # fmt: skip
    except BaseException:
        store.close()
        raise
    return store


def _seed(store: PostgresStore, bundle: Any) -> bool:
    """Copy the bundle's snapshot into an empty store (True), or check that it is the bundle's."""
    seeded = False
    try:
        with store._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SEED_LOCK,))
            owner = conn.execute("SELECT value FROM meta WHERE key = 'bundle_id'").fetchone()
            if owner is None:
                _copy_snapshot(conn, Path(bundle.store_file), bundle.id)
                seeded = True
                log.info("live feature store for bundle %s seeded in %s", bundle.id, store.path)
            elif owner[0] != bundle.id:
                raise StoreError(f"{store.path}: this live store was seeded from bundle {owner[0]}, not from "
                                 f"{bundle.path} (bundle {bundle.id}); serve that bundle, or seed another "
                                 "database for this one")  # fmt: skip
    except store._errors as exc:
        raise store._failed(exc) from exc
    store._read_meta()
    return seeded


def _copy_snapshot(conn: Any, snapshot: Path, bundle_id: str) -> None:
    """The bundle's SQLite snapshot into the (empty) PostgreSQL store, with COPY."""
    source = sqlite3.connect(f"file:{snapshot}?mode=ro", uri=True)
    try:
        have = {row[1] for row in source.execute("PRAGMA table_info(items)")}
        item_columns = ", ".join(c if c in have else "NULL" for c in (*_ITEM_COLUMNS.split(", "), "posted"))
        tables = (
            ("items", f"{_ITEM_COLUMNS}, posted", f"SELECT {item_columns} FROM items"),
            ("users", "user_id, attributes", "SELECT user_id, attributes FROM users"),
            ("interactions", "seq, user_id, item_id, rating, timestamp, item_count_before, item_sum_before, event_id",
             "SELECT seq, user_id, item_id, rating, timestamp, item_count_before, item_sum_before, event_id "
             "FROM interactions ORDER BY seq"),
            ("item_totals", "item_id, count, rating_sum, likes",
             "SELECT item_id, count, rating_sum, likes FROM item_totals"),
        )  # fmt: skip
        with conn.cursor() as cursor:
            for table, columns, select in tables:
                with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in source.execute(select):
                        copy.write_row(row)
            cursor.execute("SELECT setval(pg_get_serial_sequence('interactions', 'seq'), "
                           "GREATEST((SELECT COALESCE(MAX(seq), 0) FROM interactions), 1))")  # fmt: skip
            count = cursor.execute("SELECT COUNT(*) FROM interactions").fetchone()[0]
            meta = dict(source.execute("SELECT key, value FROM meta").fetchall())
            meta |= {"schema_version": str(SCHEMA_VERSION), "bundle_id": bundle_id, "seed_interactions": str(count),
                     "interactions": str(count)}  # fmt: skip
            cursor.executemany("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = "
                               "excluded.value", list(meta.items()))  # fmt: skip
    finally:
        source.close()
