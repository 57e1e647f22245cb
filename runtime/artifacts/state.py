"""Where serving writes: a state folder per bundle, never inside the bundle.

    $CORELLA_HOME/state/<bundle id>/    (or --state DIR)
      store.sqlite    the live feature store: the bundle's snapshot, then every event of /v1/events
      trt_cache/      TensorRT engines built for this bundle's CRM

A bundle is only read, so it can sit on a read-only mount, and `corella export` onto an existing
bundle touches no state. The live store remembers the bundle it was seeded from (`bundle_id`) and
how many interactions the snapshot held (`seed_interactions`): the rest are live events. Serving a
bundle against another bundle's live store is refused, and so is the first start of a bundle that
replaced one whose live store holds events, until they are carried over (`corella store migrate`)
or set aside (`corella store reset`): nothing is lost silently.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from runtime.artifacts.bundle import Bundle
from runtime.artifacts.store import FeatureStore, Interaction
from runtime.errors import StoreError
from runtime.paths import corella_home
from runtime.prompt import ItemText

__all__ = ["state_dir", "live_store", "live_events", "migrate_store", "carry_events", "reset_store", "replaced_state"]

log = logging.getLogger(__name__)

STORE = "store.sqlite"


def state_dir(bundle: Bundle, state: Path | None = None) -> Path:
    return Path(state) if state is not None else corella_home() / "state" / bundle.id


def _how_to(bundle: Bundle) -> str:
    return (f"carry its events over with `corella store migrate {bundle.path}` (events of items the new catalog "
            f"lacks are dropped and counted), or set them aside with `corella store reset {bundle.path}`")  # fmt: skip


def replaced_state(bundle: Bundle) -> Path | None:
    """The default state folder of the bundle this one replaced at export, where it exists."""
    old = bundle.manifest.get("replaces")
    folder = corella_home() / "state" / old if isinstance(old, str) and old.isalnum() else None
    return folder if folder is not None and (folder / STORE).exists() else None


def live_store(bundle: Bundle, state: Path | None = None, store: Path | None = None) -> Path:
    """The live store of `bundle` (seeded from its snapshot on first use), checked to belong to it."""
    path = Path(store) if store is not None else state_dir(bundle, state) / STORE
    if path.exists():
        _check_owner(path, bundle)
        return path
    # (with a state folder or store of the caller's choosing, what to start from is theirs to say)
    old = replaced_state(bundle) if state is None and store is None else None
    if old is not None:
        pending = _pending_events(old / STORE)
        if pending:
            raise StoreError(
                f"{bundle.path} replaced bundle {bundle.manifest['replaces']}, whose live store {old / STORE} "
                f"holds {pending} events and items posted since its export; {_how_to(bundle)}"
            )
    _seed(path, bundle)
    return path


def _seed(path: Path, bundle: Bundle) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    shutil.copy2(bundle.store_file, partial)
    store = FeatureStore(partial)
    try:
        store.set_meta("bundle_id", bundle.id)
        store.set_meta("seed_interactions", str(store.counts()["interactions"]))
    finally:
        store.close()
    os.replace(partial, path)
    log.info("live feature store for bundle %s created at %s", bundle.id, path)


def _check_owner(path: Path, bundle: Bundle) -> None:
    store = FeatureStore(path)
    try:
        owner = store.meta("bundle_id")
        if owner is None:  # a store made by hand from a snapshot: it becomes this bundle's
            store.set_meta("bundle_id", bundle.id)
            store.set_meta("seed_interactions", str(store.counts()["interactions"]))
    finally:
        store.close()
    if owner is not None and owner != bundle.id:
        raise StoreError(f"{path}: this live store was seeded from bundle {owner}, not from {bundle.path} "
                         f"(bundle {bundle.id}); {_how_to(bundle)} --from {path.parent}")  # fmt: skip


def _pending_events(path: Path) -> int:
    """Live events and posted items of a store not yet migrated or set aside."""
    store = FeatureStore(path)
    try:
        if store.meta("moved_to") is not None:
            return 0
        return store.counts()["interactions"] - int(store.meta("seed_interactions") or 0) + len(store.posted_items())
    finally:
        store.close()


def live_events(path: Path) -> list[Interaction]:
    """The events a live store received after it was seeded, in arrival order."""
    store = FeatureStore(path)
    try:
        return store.interactions(offset=int(store.meta("seed_interactions") or 0))
    finally:
        store.close()


def migrate_store(bundle: Bundle, source: Path | None = None, state: Path | None = None,
                  store_url: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Carry the live events of another state folder (default: the replaced bundle's) into this
    bundle's live store (SQLite, or the PostgreSQL one at `store_url`); events of items this
    bundle's catalog lacks are dropped and counted."""
    if store_url and source is None:
        return _migrate_postgres(bundle, store_url)
    source = Path(source) if source is not None else replaced_state(bundle)
    if source is None or not (source / STORE).exists():
        raise StoreError(f"{bundle.path}: no live store to migrate from (name one with --from STATE_DIR)")
    if store_url:
        from runtime.artifacts.pgstore import postgres_live_store, redacted

        target, store = redacted(store_url), postgres_live_store(store_url, bundle)
    else:
        path = state_dir(bundle, state) / STORE
        if path.exists() and path.resolve() == (source / STORE).resolve():
            raise StoreError(f"{path}: already the live store of {bundle.path}")
        if not path.exists():
            _seed(path, bundle)
        _check_owner(path, bundle)
        target, store = str(path), FeatureStore(path)
    events = live_events(source / STORE)
    old = FeatureStore(source / STORE)
    try:
        posted = old.posted_items()
    finally:
        old.close()
    try:
        kept = carry_events(store, events, posted)
    finally:
        store.close()
    _mark_moved(source / STORE, bundle.id)
    return {"from": str(source / STORE), "to": target, "items": len(posted), "events": len(events),
            "kept": len(kept), "dropped_unknown_items": len(events) - len(kept)}  # fmt: skip


def _migrate_postgres(bundle: Bundle, store_url: str) -> dict[str, Any]:
    """The replaced bundle's PostgreSQL live store (its schema in the same database) into this one's."""
    from runtime.artifacts.pgstore import bundle_schema, postgres_live_store

    old = bundle.manifest.get("replaces")
    store = postgres_live_store(store_url, bundle, carry=False)
    try:
        source = bundle_schema(old) if isinstance(old, str) and old.isalnum() else None
        if source is None or not store.schema_exists(source):
            raise StoreError(f"{bundle.path}: {store.path} holds no live store of a bundle this one replaced (name a "
                             "SQLite state folder with --from)")  # fmt: skip
        carried = store.carry_from(source)
    finally:
        store.close()
    return {"from": f"{store.path.rsplit(' (schema', 1)[0]} (schema {source})", "to": store.path,
            "items": carried["items"], "events": carried["events"], "kept": carried["kept"],
            "dropped_unknown_items": carried["events"] - carried["kept"]}  # fmt: skip


def carry_events(store: FeatureStore, events: list[Interaction], posted: list[tuple[str, ItemText]]
                 ) -> list[Interaction]:  # fmt: skip
    """Another store's posted items, then its events of items `store`'s catalog holds (appended;
    event ids seen already count once); returns the events kept. The rule of `corella store migrate`."""
    if posted:
        store.upsert_items(posted)
    catalog = set(store.items([e.item_id for e in events]))
    kept = [Interaction(e.user_id, e.item_id, e.rating, e.timestamp, event_id=e.event_id)
            for e in events if e.item_id in catalog]  # fmt: skip
    if kept:
        store.append(kept)
    return kept


def reset_store(bundle: Bundle, state: Path | None = None) -> dict[str, Any]:
    """Start from the bundle's snapshot: the current live store (if any) is renamed aside, never
    deleted, and a replaced bundle's pending events are marked as set aside."""
    target = state_dir(bundle, state) / STORE
    out: dict[str, Any] = {"store": str(target)}
    if target.exists():
        aside = target.with_name(f"{STORE}.reset-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{target}{suffix}").exists():
                os.replace(f"{target}{suffix}", f"{aside}{suffix}")
        out["set_aside"] = str(aside)
    old = replaced_state(bundle)
    if old is not None:
        _mark_moved(old / STORE, f"reset:{bundle.id}")
        out["replaced_state_set_aside"] = str(old / STORE)
    return out


def _mark_moved(path: Path, where: str) -> None:
    store = FeatureStore(path)
    try:
        store.set_meta("moved_to", where)
    finally:
        store.close()
