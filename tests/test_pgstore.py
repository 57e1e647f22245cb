"""One PostgreSQL live store for several replicas, against a real PostgreSQL server that the
fixture starts (Debian's postgresql package: initdb and pg_ctl) and stops."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from runtime.artifacts.bundle import bundle_id, load_bundle
from runtime.artifacts.pgstore import bundle_schema
from runtime.artifacts.store import Interaction
from runtime.engine import CandidateItem, Engine, EngineSettings, Request
from runtime.errors import StoreUnavailable


def _settings(**extra) -> EngineSettings:
    return EngineSettings(providers=("cpu",), load_llm=False, **extra)


def _scores(engine: Engine, user: str) -> np.ndarray:
    answer = engine.predict(Request([CandidateItem(str(i)) for i in range(1, 21)], user_id=user, mode="crm"))
    return np.array([p["crm_score"] for p in answer["predictions"]])


def _changed(read, before, seconds: float = 5.0):
    """`read()` once it differs from `before` (polled: a notice takes milliseconds), or its last value."""
    for _ in range(int(seconds / 0.05)):
        value = read()
        if not np.allclose(value, before):
            return value
        time.sleep(0.05)
    return read()


def _events(tag: str) -> list[Interaction]:
    rng = np.random.default_rng(3)
    return [Interaction(str(1 + i % 5), str(1 + int(rng.integers(0, 30))), float(1 + rng.integers(0, 5)),
                        10**9 + i, event_id=f"{tag}{i}") for i in range(40)]  # fmt: skip


def test_postgres_reads_and_appends_as_sqlite_does(bundle, postgres, tmp_path):
    url = postgres.database("same")
    loaded = load_bundle(bundle)
    sqlite = Engine(loaded, _settings(store=tmp_path / "store.sqlite"))
    shared = Engine(loaded, _settings(store_url=url))
    try:
        assert shared.store.counts() == sqlite.store.counts()
        seeded = shared.store.counts()
        for engine in (sqlite, shared):
            assert engine.append_events(_events("a")) == 40
            assert engine.append_events(_events("a")[:10]) == 0  # a retried batch counts once
        assert shared.store.counts() == sqlite.store.counts()
        for user in ("1", "3", "5", "77"):
            assert shared.store.history(user) == sqlite.store.history(user)  # incl. each item's totals before
            np.testing.assert_allclose(_scores(shared, user), _scores(sqlite, user), rtol=1e-6)
        items = [str(i) for i in range(1, 40)]
        np.testing.assert_array_equal(shared.store.item_totals(items), sqlite.store.item_totals(items))
        np.testing.assert_array_equal(shared.store.item_totals(items, before=10**9 + 20),
                                      sqlite.store.item_totals(items, before=10**9 + 20))  # fmt: skip
        assert shared.store.interactions(offset=100_000) == sqlite.store.interactions(offset=100_000)
    finally:
        sqlite.close()
        shared.close()
    # another bundle (one that replaced none) gets a schema of its own, seeded from its own snapshot
    other = load_bundle(bundle)
    object.__setattr__(other, "id", "0123456789ABCDEF")
    fresh = Engine(other, _settings(store_url=url))
    try:
        assert fresh.store.schema == "corella_0123456789abcdef" and fresh.store.counts() == seeded
    finally:
        fresh.close()


def test_an_event_posted_to_one_replica_changes_the_others_next_answer(bundle, postgres):
    url = postgres.database("replicas")
    loaded = load_bundle(bundle)
    a, b = Engine(loaded, _settings(store_url=url)), Engine(loaded, _settings(store_url=url))
    try:
        before = _scores(b, "2")  # b has the user's past cached now
        same = _scores(b, "2")
        np.testing.assert_array_equal(before, same)
        a.append_events([Interaction("2", str(i), 5.0, 2 * 10**9 + i, event_id=f"b{i}") for i in range(1, 9)])
        assert not np.allclose(_changed(lambda: _scores(b, "2"), before), before)
        assert [h.event_id for h in b.store.history("2")[-8:]] == [f"b{i}" for i in range(1, 9)]
        # both replicas writing at once: the totals stay those of the rows, every event counted once
        rng = np.random.default_rng(5)
        batches = [[Interaction(str(1 + int(rng.integers(0, 50))), str(1 + int(rng.integers(0, 20))),
                                float(rng.integers(1, 6)), 3 * 10**9 + k, event_id=f"w{k}")
                    for k in range(start, start + 25)] for start in range(0, 400, 25)]  # fmt: skip
        with ThreadPoolExecutor(4) as pool:
            added = sum(pool.map(lambda j: (a, b)[j % 2].append_events(batches[j] + batches[j - 1][:5]),
                                 range(len(batches))))  # fmt: skip
        assert added == 400
        rows = a.store.interactions(offset=0)
        items = sorted({r.item_id for r in rows})
        expected = np.array([[sum(1 for r in rows if r.item_id == i), sum(r.rating for r in rows if r.item_id == i),
                              sum(1 for r in rows if r.item_id == i and r.rating >= a.store.like_threshold)]
                             for i in items])  # fmt: skip
        for _ in range(100):  # b's cached totals follow the notices (bounded wait)
            if np.allclose(b.store.item_totals(items), expected):
                break
            time.sleep(0.05)
        np.testing.assert_allclose(b.store.item_totals(items), expected)
    finally:
        a.close()
        b.close()


def test_notices_missed_while_the_listener_was_away_forget_every_cached_past(bundle, postgres):
    import psycopg

    from runtime.artifacts.pgstore import LISTENER, PostgresStore

    url = postgres.database("missed")
    engine = Engine(load_bundle(bundle), _settings(store_url=url))
    other = PostgresStore(url, bundle_schema(engine.bundle.id))  # another replica's store
    try:
        before = _scores(engine, "6")
        assert len(engine.pasts) > 0  # the user's past is cached now
        with psycopg.connect(url, autocommit=True) as admin:  # the listener's connection drops
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'missed' "
                                   "AND application_name = %s", (LISTENER,)).fetchall()  # fmt: skip
        assert killed and all(ok for (ok,) in killed)
        # written at once, before the listener is back (it waits 1 s): its notice reaches nobody here
        other.append([Interaction("6", str(i), 5.0, 4 * 10**9 + i, event_id=f"x{i}") for i in range(1, 9)])
        # the listener reconnects and forgets every cached past
        assert not np.allclose(_changed(lambda: _scores(engine, "6"), before), before)
    finally:
        other.close()
        engine.close()


def test_a_store_that_does_not_answer_is_unavailable_not_a_crash(bundle, postgres):
    url = postgres.database("restart")
    engine = Engine(load_bundle(bundle), _settings(store_url=url))
    try:
        postgres.ctl("stop", "-m", "fast")
        try:
            with pytest.raises(StoreUnavailable):
                engine.append_events(_events("c"))
        finally:
            postgres.ctl("start")
        for _ in range(100):  # the pool reconnects by itself
            try:
                assert engine.append_events(_events("c")) == 40
                break
            except StoreUnavailable:
                time.sleep(0.1)
        else:
            pytest.fail("the store did not come back")
    finally:
        engine.close()
    with pytest.raises(StoreUnavailable, match="does not answer"):  # nobody there at all: one clear line
        Engine(load_bundle(bundle), _settings(store_url="postgresql://corella@127.0.0.1:1/none"))


def _serve(bundle: Path, port: int, home: Path, url: str) -> subprocess.Popen:
    from .test_server import _start_server

    return _start_server(bundle, port, "--no-llm", env={"CORELLA_HOME": str(home), "CORELLA_STORE_URL": url},
                         log=home.with_suffix(".log"), ready_s=60)  # fmt: skip


def test_two_replicas_over_http_share_events_survive_kill_9_and_a_postgres_restart(bundle, postgres, tmp_path):
    import httpx
    from typer.testing import CliRunner

    from corella_cli.main import app
    from runtime.artifacts.pgstore import PostgresStore

    url = postgres.database("http")
    made = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["store", "init", str(bundle), "--store-url", url])
    assert made.exit_code == 0 and "interactions" in made.output, made.output
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    a, b = (_serve(bundle, port, tmp_path / f"home{i}", url) for i, port in enumerate(ports))
    replica_a, replica_b = (f"http://127.0.0.1:{p}" for p in ports)
    body = {"user_id": "4", "candidates": [{"item_id": str(i)} for i in range(1, 11)], "mode": "crm"}
    acknowledged: list[str] = []
    try:
        before = httpx.post(f"{replica_b}/v1/predict", json=body, timeout=30).json()["predictions"]
        events = [{"user_id": "4", "item_id": str(i), "rating": 5, "event_id": f"h{i}"} for i in range(1, 9)]
        assert httpx.post(f"{replica_a}/v1/events", json={"events": events}, timeout=30).status_code == 200
        acknowledged += [e["event_id"] for e in events]

        def b_scores() -> list[float]:
            return [
                p["score"] for p in httpx.post(f"{replica_b}/v1/predict", json=body, timeout=30).json()["predictions"]
            ]

        scores = [p["score"] for p in before]
        assert not np.allclose(_changed(b_scores, scores), scores)  # A's event moved B's answer
        # under load (4 clients predicting on B, 4 posting events to A): PostgreSQL restarts, then A is killed
        stop, answers, lock = threading.Event(), [], threading.Lock()

        def client(kind: str, worker: int) -> None:
            with httpx.Client(timeout=30) as http:
                k = 0
                while not stop.is_set():
                    if kind == "events":
                        event_id = f"w{worker}-{k}"
                        event = {"user_id": str(5 + worker), "item_id": str(1 + k % 30), "rating": 4,
                                 "event_id": event_id}  # fmt: skip
                        try:
                            answer = http.post(f"{replica_a}/v1/events", json={"events": [event]})
                        except httpx.HTTPError:  # A killed mid-request: not acknowledged
                            answer = None
                    else:
                        event_id, answer = None, http.post(f"{replica_b}/v1/predict", json=body)
                    with lock:
                        if answer is not None:
                            answers.append((kind, answer.status_code, answer.headers.get("Retry-After"), event_id,
                                            time.monotonic()))  # fmt: skip
                    k += 1
                    time.sleep(0.01)

        threads = [threading.Thread(target=client, args=(kind, w)) for kind in ("events", "predict") for w in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            postgres.ctl("stop", "-m", "fast")
            time.sleep(1.0)
            restarted = time.monotonic()
            postgres.ctl("start")
            for _ in range(200):  # both recover by themselves (bounded)
                with lock:
                    recovered = [x for x in answers if x[0] == "events" and x[1] == 200 and x[4] > restarted + 0.5]
                if len(recovered) >= 8:
                    break
                time.sleep(0.05)
            a.kill()  # kill -9 while events are being posted to it
            a.wait(timeout=30)
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        statuses = {(kind, status) for kind, status, *_ in answers}
        print("answers during the restart and the kill:", sorted(Counter((k, s) for k, s, *_ in answers).items()))
        # a prediction that cannot read is a 503, or a 429 where the ones waiting behind it would pass
        # their deadlines: each with Retry-After
        allowed = {("events", 200), ("events", 503), ("predict", 200), ("predict", 503), ("predict", 429)}
        assert statuses <= allowed, statuses
        assert ("events", 503) in statuses  # PostgreSQL was away for a second: said so, not hidden
        assert all(retry is not None for _, status, retry, *_ in answers if status in (429, 503))
        assert len(recovered) >= 8  # events taken again after the restart, without restarting a replica
        acknowledged += [event_id for kind, status, _, event_id, _ in answers if kind == "events" and status == 200]
        assert httpx.post(f"{replica_b}/v1/predict", json=body, timeout=30).status_code == 200
    finally:
        for process in (a, b):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
    store = PostgresStore(url, bundle_schema(bundle_id(bundle)))
    try:
        stored = {e.event_id for e in store.interactions(offset=0)}
    finally:
        store.close()
    assert set(acknowledged) <= stored  # every acknowledged event, through a restart and a kill -9


def test_store_migrate_carries_a_sqlite_stores_events_into_postgres(bundle, postgres, tmp_path):
    from typer.testing import CliRunner

    from corella_cli.main import app
    from runtime.artifacts.pgstore import PostgresStore

    state = tmp_path / "state"
    engine = Engine(load_bundle(bundle), _settings(state=state))
    try:
        events = _events("m") + [Interaction("3", "no-such-item", 4.0, 10**9, event_id="gone")]
        assert engine.append_events(events) == 41
    finally:
        engine.close()
    url = postgres.database("migrated")
    moved = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["store", "migrate", str(bundle), "--from", str(state),
                                                           "--store-url", url])  # fmt: skip
    assert moved.exit_code == 0, moved.output
    assert "migrated 40 of 41 events" in moved.output and "1 of items not in the catalog dropped" in moved.output
    assert "@" in moved.output and ":***@" not in moved.output  # the URL named (no password here to hide)
    store = PostgresStore(url, bundle_schema(bundle_id(bundle)))
    try:
        ids = {e.event_id for e in store.interactions(offset=0)}
    finally:
        store.close()
    assert {f"m{i}" for i in range(40)} <= ids and "gone" not in ids


def test_a_deploy_rolls_over_two_replicas_on_one_postgresql_store_and_every_event_arrives_once(
    bundle, postgres, tmp_path
):
    """Replica A reloads onto the new bundle while replica B still serves the old one: B's writes
    reach A's next answers (carried from the old schema as they are announced), and once B reloads
    too, every event is in the new bundle's store exactly once, with or without an event id."""
    from fastapi.testclient import TestClient

    from runtime.artifacts.pgstore import PostgresStore
    from runtime.serving import ServerSettings, create_app

    from .test_reload import _successor

    url = postgres.database("rolling")
    new = _successor(bundle, tmp_path / "next")
    old_id, new_id = bundle_id(bundle), bundle_id(new)
    settings = {"store_url": url, "admin_api_key": "a", "llm_decode_without_signal": True}
    admin = {"Authorization": "Bearer a"}

    def post(client, user: str, tag: str, count: int, ids: bool = True) -> None:
        events = [{"user_id": user, "item_id": str(1 + i % 30), "rating": 5, "timestamp": 2 * 10**9 + i}
                  | ({"event_id": f"{tag}{i}"} if ids else {}) for i in range(count)]  # fmt: skip
        answer = client.post("/v1/events", json={"events": events})
        assert answer.status_code == 200, answer.text

    def scores(client, user: str) -> np.ndarray:
        body = {"user_id": user, "candidates": [{"item_id": str(i)} for i in range(1, 21)], "mode": "crm"}
        answer = client.post("/v1/predict", json=body).json()
        return np.array([p["crm_score"] for p in answer["predictions"]] + [answer["bundle_id"] == new_id])

    with TestClient(create_app(ServerSettings(bundle=bundle, **settings))) as a, \
            TestClient(create_app(ServerSettings(bundle=bundle, **settings))) as b:  # fmt: skip
        post(a, "6", "before", 10)
        moved = a.post("/v1/admin/reload", json={"bundle": str(new)}, headers=admin)
        assert moved.status_code == 200, moved.text
        assert moved.json()["bundle_id"] == new_id and moved.json()["store"]["kept"] == 10
        before = scores(a, "7")
        assert before[-1] == 1.0 and scores(b, "7")[-1] == 0.0  # A on the new bundle, B on the old
        post(b, "7", "during", 12)  # to the old bundle's schema
        post(b, "8", "", 6, ids=False)  # events without ids: carried once all the same
        assert not np.allclose(_changed(lambda: scores(a, "7"), before), before)
        moved = b.post("/v1/admin/reload", json={"bundle": str(new)}, headers=admin)
        assert moved.status_code == 200 and moved.json()["bundle_id"] == new_id, moved.text
        post(b, "7", "after", 5)
        np.testing.assert_allclose(scores(a, "7"), scores(b, "7"), rtol=1e-6)  # one store, the same answers
    store = PostgresStore(url, bundle_schema(new_id))
    try:
        live = store.interactions(offset=int(store.meta("seed_interactions")))
        assert int(store.meta("interactions")) == int(store.meta("seed_interactions")) + len(live)
    finally:
        store.close()
    ids = Counter(e.event_id for e in live if e.event_id is not None)
    assert set(ids) == {f"before{i}" for i in range(10)} | {f"during{i}" for i in range(12)} | {
        f"after{i}" for i in range(5)} and max(ids.values()) == 1  # fmt: skip
    assert len([e for e in live if e.event_id is None and e.user_id == "8"]) == 6
    assert old_id != new_id


def test_a_bundle_that_replaced_another_takes_its_postgresql_events_by_migrate_or_on_its_first_start(
    bundle, postgres, tmp_path
):
    import json

    from typer.testing import CliRunner

    from corella_cli.main import app
    from runtime.artifacts.bundle import MANIFEST

    from .test_reload import _successor

    url = postgres.database("restarted")
    old = Engine(load_bundle(bundle), _settings(store_url=url))
    try:
        assert old.append_events(_events("r") + [Interaction("3", "no-such-item", 4.0, 10**9, event_id="gone")]) == 41
    finally:
        old.close()
    by_hand = _successor(bundle, tmp_path / "by-hand")
    moved = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["store", "migrate", str(by_hand), "--store-url", url])
    assert moved.exit_code == 0, moved.output
    assert "migrated 40 of 41 events" in moved.output and f"schema {bundle_schema(bundle_id(bundle))}" in moved.output
    on_start = _successor(bundle, tmp_path / "on-start")  # another export replacing the same bundle
    manifest = json.loads((on_start / MANIFEST).read_text())
    (on_start / MANIFEST).write_text(json.dumps(manifest | {"created_at": "2031-01-01T00:00:00+00:00"}))
    for folder in (by_hand, on_start):  # the first start after migrate carries nothing twice; without, it carries
        engine = Engine(load_bundle(folder), _settings(store_url=url))
        try:
            live = engine.store.interactions(offset=int(engine.store.meta("seed_interactions")))
        finally:
            engine.close()
        assert sorted(e.event_id for e in live) == sorted(f"r{i}" for i in range(40)), folder


def test_a_store_kept_in_public_by_an_earlier_corella_is_carried_into_the_bundles_schema(bundle, postgres):
    from runtime.artifacts.pgstore import PostgresStore, _seed

    url = postgres.database("legacy")
    loaded = load_bundle(bundle)
    legacy = PostgresStore(url)  # the layout before schemas: one bundle's store in `public`
    try:
        assert _seed(legacy, loaded)
        assert legacy.append(_events("p")) == 40
    finally:
        legacy.close()
    engine = Engine(loaded, _settings(store_url=url))
    try:
        assert engine.store.schema == bundle_schema(loaded.id)
        live = engine.store.interactions(offset=int(engine.store.meta("seed_interactions")))
    finally:
        engine.close()
    assert sorted(e.event_id for e in live) == sorted(f"p{i}" for i in range(40))
