"""A new bundle without downtime: POST /v1/admin/reload and SIGHUP on a real server under 32
clients, and a bundle that fails to load leaving the old one serving."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from runtime.artifacts.bundle import MANIFEST, bundle_id
from runtime.artifacts.store import FeatureStore
from runtime.serving import ServerSettings, create_app

from .test_server import _free_port, _start_server


def _successor(bundle: Path, folder: Path) -> Path:
    """A copy of `bundle` exported again (another id), naming the bundle it replaces."""
    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest |= {"created_at": "2030-01-01T00:00:00+00:00", "replaces": bundle_id(bundle)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    assert bundle_id(folder) != bundle_id(bundle)
    return folder


def _serve(bundle: Path, port: int, home: Path, log: Path, *args: str) -> subprocess.Popen:
    return _start_server(bundle, port, "--llm-threads", "1", "--llm-decode-without-signal", *args,
                         env={"CORELLA_HOME": str(home)}, log=log, ready_s=60)  # fmt: skip


def _model_id(base: str) -> str:
    return httpx.get(f"{base}/v1/model", timeout=10).json()["bundle_id"]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_reload_under_32_clients_switches_bundles_with_no_5xx_and_loses_no_event(bundle, tmp_path, store, request):
    # on PostgreSQL each bundle's store is a schema of the one database (runtime.artifacts.pgstore)
    url = request.getfixturevalue("postgres").database("reload") if store == "postgresql" else None
    old_id = bundle_id(bundle)
    new = _successor(bundle, tmp_path / "next")
    new_id = bundle_id(new)
    served = tmp_path / "served"  # the folder the server was started on: a link, as deploys switch it
    served.symlink_to(bundle, target_is_directory=True)
    (tmp_path / "admin.key").write_text("secret\n")
    home = tmp_path / "home"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = _serve(served, port, home, tmp_path / "serve.log", "--admin-api-key-file", str(tmp_path / "admin.key"),
                    *(["--store-url", url] if url else []))  # fmt: skip
    stop = threading.Event()
    seen: list[list[tuple[int, str | None]]] = [[] for _ in range(32)]
    acknowledged: list[str] = []
    errors: list[str] = []

    def client(worker: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            i = 0
            while not stop.is_set() or i < 2:
                body = {"user_id": str(1 + (worker * 7 + i) % 120),
                        "candidates": [{"item_id": str(j)} for j in range(1, 11)], "llm_fraction": 0.1}  # fmt: skip
                try:
                    response = http.post("/v1/predict", json=body)
                    answer = response.json() if response.status_code == 200 else {}
                    if response.status_code == 200 and len(answer["predictions"]) != 10:
                        errors.append(response.text)
                    seen[worker].append((response.status_code, answer.get("bundle_id")))
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                i += 1

    def writer() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            i = 0
            while not stop.is_set():
                event = {"user_id": str(1 + i % 50), "item_id": str(1 + i % 40), "rating": 4, "event_id": f"e{i}"}
                response = http.post("/v1/events", json={"events": [event]})
                if response.status_code == 200:
                    acknowledged.append(event["event_id"])
                else:
                    errors.append(response.text)
                i += 1
                time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(32)] + [threading.Thread(target=writer)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        admin = {"Authorization": "Bearer secret"}
        refused = httpx.post(f"{base}/v1/admin/reload", json={"bundle": str(new)}, timeout=120)
        assert refused.status_code == 401  # the admin key, not just any caller
        answer = httpx.post(f"{base}/v1/admin/reload", json={"bundle": str(new)}, headers=admin, timeout=120)
        assert answer.status_code == 200, answer.text
        outcome = answer.json()
        assert outcome["reloaded"] and outcome["bundle_id"] == new_id and outcome["previous_bundle_id"] == old_id
        time.sleep(1.0)
        assert _model_id(base) == new_id
        # SIGHUP reloads the folder served last; the link moved back to the first bundle, a deploy's way
        served.unlink()
        served.symlink_to(bundle, target_is_directory=True)
        again = httpx.post(f"{base}/v1/admin/reload", json={"bundle": str(served)}, headers=admin, timeout=120)
        assert again.status_code == 200 and again.json()["bundle_id"] == old_id, again.text
        served.unlink()
        served.symlink_to(new, target_is_directory=True)
        server.send_signal(signal.SIGHUP)
        for _ in range(600):
            if _model_id(base) == new_id:
                break
            time.sleep(0.1)
        assert _model_id(base) == new_id
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text if server.poll() is None else ""
        server.terminate()
        server.wait(timeout=60)
    assert not errors, errors[:3]
    statuses = [s for worker in seen for s, _ in worker]
    assert len(statuses) > 64 and set(statuses) == {200}  # every request answered, no 5xx, no refusal
    for worker in seen:  # each client sees the old bundle, then the new, and never an answer without an id
        ids = [i for _, i in worker]
        assert set(ids) <= {old_id, new_id}
    assert any(i == old_id for w in seen for _, i in w) and seen[0][-1][1] == new_id
    assert 'corella_reloads_total{outcome="switched"} 3.0' in metrics
    # every acknowledged event is in the live store that serves now (carried over twice, back and forth)
    if url:
        from runtime.artifacts.pgstore import PostgresStore, bundle_schema

        store = PostgresStore(url, bundle_schema(new_id))
    else:
        store = FeatureStore(home / "state" / new_id / "store.sqlite", readonly=True)
    try:
        stored = {e.event_id for e in store.interactions(offset=0)}
    finally:
        store.close()
    assert acknowledged and set(acknowledged) <= stored


def test_a_bundle_that_fails_to_load_leaves_the_old_one_serving(bundle, tmp_path, corella_home):
    broken = _successor(bundle, tmp_path / "broken")
    crm = next(p for p in broken.iterdir() if p.suffix == ".onnx")
    crm.write_bytes(crm.read_bytes()[:-16])  # a damaged copy: its hash no longer matches the manifest
    settings = {"llm_decode_without_signal": True, "admin_api_key": "a"}
    with TestClient(create_app(ServerSettings(bundle=bundle, **settings))) as client:
        admin = {"Authorization": "Bearer a"}
        failed = client.post("/v1/admin/reload", json={"bundle": str(broken)}, headers=admin)
        assert failed.status_code == 409 and failed.json()["error"]["type"] == "reload_failed"
        assert crm.name in failed.json()["error"]["message"] and bundle_id(bundle) in failed.json()["error"]["message"]
        assert not (corella_home / "state" / bundle_id(broken)).exists()
        predicted = client.post("/v1/predict", json={"user_id": "7", "candidates": [{"item_id": "1"}]})
        assert predicted.status_code == 200 and predicted.json()["bundle_id"] == bundle_id(bundle)
        same = client.post("/v1/admin/reload", headers=admin)  # the folder served, read again: nothing new
        assert same.status_code == 200 and same.json()["reloaded"] is False
        assert client.post("/v1/admin/reload", json={"bundle": 7}, headers=admin).status_code == 422
        metrics = client.get("/metrics").text
        assert 'corella_reloads_total{outcome="failed"} 1.0' in metrics
        assert 'corella_reloads_total{outcome="unchanged"} 1.0' in metrics
    with TestClient(create_app(ServerSettings(bundle=bundle, llm_decode_without_signal=True))) as client:
        forbidden = client.post("/v1/admin/reload", json={"bundle": str(broken)})
        assert forbidden.status_code == 403 and "admin key" in forbidden.json()["error"]["message"]
