"""A new bundle without downtime: SIGHUP, or POST /v1/admin/reload with the admin key.

The new bundle is verified, its live store prepared and its engine (CRM warmed, LLM loaded) built
beside the one serving, which answers all the while. The switch is one assignment; requests begun
on the old engine finish on it, and it is closed once the last of them is answered (or after
`RETIRE_WAIT_S`). A bundle that fails at any step leaves the old one serving, untouched; the failure
is logged, counted (`corella_reloads_total{outcome="failed"}`) and, over HTTP, answered.

The live store follows `corella store migrate`: the serving store's live events and posted items
are carried into the new bundle's store (events of items the new catalog lacks are dropped and
counted). Writes that arrive while the new engine loads go to the old store; for the switch itself
new writes wait (milliseconds) while those are carried over too, so an acknowledged event is never
lost. Explicit --store or --state folders are one bundle's: a reload needs the default state
folders (one per bundle id under $CORELLA_HOME/state), or a PostgreSQL store: there the new bundle
gets a schema of its own, seeded and carrying the old schema's live events by one watermark, and
every replica on the new bundle goes on carrying what the replicas still on the old one write
(runtime.artifacts.pgstore), so a deploy can roll over replicas one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from fastapi.concurrency import run_in_threadpool

from runtime.artifacts.bundle import load_bundle
from runtime.artifacts.pgstore import PostgresStore, postgres_live_store
from runtime.artifacts.state import STORE, carry_events, live_events, migrate_store, state_dir
from runtime.artifacts.store import FeatureStore
from runtime.engine import Engine
from runtime.errors import ConfigError, CorellaError
from runtime.metrics import ServingMetrics
from runtime.settings import ServerSettings

__all__ = ["EngineSlot", "Reloader", "ReloadBusy", "ReloadFailed", "RETIRE_WAIT_S"]

log = logging.getLogger(__name__)

#: how long a replaced engine waits for the requests it holds before it is closed regardless
RETIRE_WAIT_S = 60.0


class ReloadBusy(CorellaError):
    """A reload is already under way (429 with Retry-After)."""

    retry_after_s = 1.0


class ReloadFailed(CorellaError):
    """The new bundle did not load: the old one serves on."""


class EngineSlot:
    """The engine serving now (`state.engine`), the requests each engine holds, and the writes in
    flight. Only the event loop touches it: no lock is needed for the counts."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self._holding: dict[int, int] = {}
        self._writers = 0
        self._switching = False
        self._changed = asyncio.Condition()

    @property
    def engine(self) -> Engine:
        return self.state.engine

    def holding(self, engine: Engine) -> int:
        """Requests begun on `engine` and not yet answered."""
        return self._holding.get(id(engine), 0)

    @contextmanager
    def using(self) -> Iterator[Engine]:
        """The engine serving now, counted as held until the block ends."""
        engine = self.engine
        key = id(engine)
        self._holding[key] = self._holding.get(key, 0) + 1
        try:
            yield engine
        finally:
            self._holding[key] -= 1
            if not self._holding[key]:
                del self._holding[key]

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[Engine]:
        """The engine serving now, for a write to its live store; waits while a switch carries writes over."""
        if self._switching:
            async with self._changed:
                await self._changed.wait_for(lambda: not self._switching)
        self._writers += 1
        try:
            with self.using() as engine:
                yield engine
        finally:
            self._writers -= 1
            if self._switching:
                async with self._changed:
                    self._changed.notify_all()

    async def switch(self, new: Engine, carry: Callable[[], Any]) -> Any:
        """Hold new writes, wait for those in flight, run `carry` (in a thread), then serve `new`."""
        async with self._changed:
            self._switching = True
            try:
                await self._changed.wait_for(lambda: self._writers == 0)
                carried = await run_in_threadpool(carry)
                self.state.engine = new
                return carried
            finally:
                self._switching = False
                self._changed.notify_all()


class Reloader:
    """Loads a bundle beside the serving one and switches to it (one reload at a time)."""

    def __init__(self, slot: EngineSlot, settings: ServerSettings, metrics: ServingMetrics) -> None:
        self.slot, self.settings, self.metrics = slot, settings, metrics
        self.path = Path(settings.bundle)  # what SIGHUP reloads: the last bundle path loaded
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    async def reload(self, path: Path | None = None) -> dict[str, Any]:
        if self._lock.locked():
            raise ReloadBusy("a reload is already under way")
        async with self._lock:
            started = time.perf_counter()
            old = self.slot.engine
            target = Path(path) if path is not None else self.path
            try:
                new, carried = await self._load(target, old)
            except Exception as exc:  # whatever failed, the old bundle serves on; said and counted
                self.metrics.reloads.labels("failed").inc()
                log.error("reload of %s failed, bundle %s serves on: %s", target, old.bundle.id, exc)
                raise ReloadFailed(f"{target}: {exc} (bundle {old.bundle.id} serves on)") from exc
            if new is None:
                self.metrics.reloads.labels("unchanged").inc()
                return {"reloaded": False, "bundle_id": old.bundle.id, "bundle": str(target),
                        "message": "the bundle at that path is the one serving"}  # fmt: skip
            try:
                late = await self.slot.switch(new, lambda: _carry(old, new, carried))
            except CorellaError as exc:  # the store refused the carried events (at its bound, say)
                await run_in_threadpool(new.close)
                self.metrics.reloads.labels("failed").inc()
                raise ReloadFailed(f"{target}: carrying the last writes over failed: {exc} (bundle "
                                   f"{old.bundle.id} serves on)") from exc  # fmt: skip
            self.path = target
            self.metrics.reloads.labels("switched").inc()
            seconds = time.perf_counter() - started
            log.info("serving bundle %s from %s (was %s; loaded and switched in %.1f s)", new.bundle.id, target,
                     old.bundle.id, seconds)  # fmt: skip
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return {"reloaded": True, "bundle_id": new.bundle.id, "previous_bundle_id": old.bundle.id,
                    "bundle": str(target), "seconds": round(seconds, 2),
                    "store": {**carried, "carried_at_switch": late}}  # fmt: skip

    async def _load(self, target: Path, old: Engine) -> tuple[Engine | None, dict[str, Any]]:
        bundle = await run_in_threadpool(load_bundle, target)
        if bundle.id == old.bundle.id:
            return None, {}
        if self.settings.store is not None or self.settings.state is not None:
            raise ConfigError("a reload needs the default state folders ($CORELLA_HOME/state/<bundle id>) or a "
                              "PostgreSQL store: this server was started with --store or --state, which hold one "
                              "bundle's live store; restart it with the new bundle instead")  # fmt: skip
        if isinstance(old.store, PostgresStore):
            # the new bundle's schema, seeded and carrying the old one's live store (a failure after this leaves
            # a schema no replica serves: a later reload onto that bundle resumes from its watermark)
            carried = await run_in_threadpool(_migrate_postgres, old.store, bundle)
            return await run_in_threadpool(Engine, bundle, self.settings.engine_settings(), self.metrics), carried
        source = state_dir(old.bundle)
        store = state_dir(bundle) / STORE
        existed = store.exists()
        carried = await run_in_threadpool(_migrate, bundle, source)
        try:
            new = await run_in_threadpool(Engine, bundle, self.settings.engine_settings(), self.metrics)
        except BaseException:
            await run_in_threadpool(_undo_migration, source / STORE, store, existed)
            raise
        return new, carried

    async def _retire(self, old: Engine) -> None:
        """Close `old` once the requests it holds are answered."""
        deadline = time.monotonic() + RETIRE_WAIT_S
        while self.slot.holding(old) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.slot.holding(old):
            log.warning("closing bundle %s's engine with %d requests still held", old.bundle.id,
                        self.slot.holding(old))  # fmt: skip
        await run_in_threadpool(old.close)

    async def close(self) -> None:
        """Wait for replaced engines to close (at shutdown)."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)


def _carry(old: Engine, new: Engine, carried: dict[str, Any]) -> int:
    """The events and items the old store took after the migration, into the new one (writes held)."""
    if isinstance(new.store, PostgresStore):  # (replicas still on the old bundle are carried from as they write)
        return new.store.carry_from(old.store.schema)["events"]
    events = live_events(old.store.path)[int(carried.get("events", 0)) :]
    kept = carry_events(new.store, events, old.store.posted_items())
    new.users_changed({e.user_id for e in kept})
    return len(events)


def _migrate_postgres(old: PostgresStore, bundle: Any) -> dict[str, Any]:
    store = postgres_live_store(old.url, bundle, carry=False)
    try:
        return {"from": old.path, "to": store.path, **store.carry_from(old.schema)}
    finally:
        store.close()


def _migrate(bundle: Any, source: Path) -> dict[str, Any]:
    """`corella store migrate` from the serving state folder; the new bundle's store, which may have
    been carried away from once before (a bundle served again), is in service again."""
    carried = migrate_store(bundle, source)
    store = FeatureStore(carried["to"])
    try:
        store.delete_meta("moved_to")
    finally:
        store.close()
    return carried


def _undo_migration(source: Path, target: Path, existed: bool) -> None:
    """A reload that failed after the migration: the new bundle's fresh store goes, the old one is
    no longer marked as moved."""
    if not existed:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        if target.parent.exists() and not any(target.parent.iterdir()):
            shutil.rmtree(target.parent, ignore_errors=True)
    store = FeatureStore(source)
    try:
        store.delete_meta("moved_to")
    finally:
        store.close()
