"""The HTTP API through the ASGI client and a real uvicorn server on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from runtime.artifacts.bundle import load_bundle
from runtime.serving import ServerSettings, create_app

from .conftest import REPO


def _client(bundle: Path, **settings) -> TestClient:
    # decoded whatever the tiny LLM's calibration: these tests are about the API around the decoding
    return TestClient(create_app(ServerSettings(bundle=bundle, **{"llm_decode_without_signal": True} | settings)))


def _body(n: int = 5, **extra) -> dict:
    return {"user_id": "7", "candidates": [{"item_id": str(i)} for i in range(1, n + 1)], **extra}


def test_predict_scores_and_routes(bundle):
    with _client(bundle) as client:
        assert client.get("/readyz").json() == {"ready": True, "llm": "serving", "degraded": False}
        # a generous deadline: this is about routing (deadlines have their own tests), and a busy
        # machine must not turn the routed candidates into deadline fallbacks
        answer = client.post("/v1/predict", json=_body(40, llm_fraction=0.25, deadline_ms=60_000)).json()
        routes = [p["route"] for p in answer["predictions"]]
        assert len(routes) == 40 and routes.count("llm") == 10
        assert all(0 <= p["score"] <= 1 and p["entropy"] >= 0 for p in answer["predictions"])
        routed = [p for p in answer["predictions"] if p["route"] == "llm"]
        kept = [p for p in answer["predictions"] if p["route"] == "crm"]
        assert min(p["entropy"] for p in routed) >= max(p["entropy"] for p in kept)
        assert answer["known_user"] and answer["history_length"] == 5
        assert set(answer["timings_ms"]) == {"wait", "encode", "crm", "llm", "llm_queued", "llm_decoding", "total"}
        crm_only = client.post("/v1/predict", json=_body(3, mode="crm")).json()
        assert {p["route"] for p in crm_only["predictions"]} == {"crm"}
        model = client.get("/v1/model").json()
        assert model["llm"]["loaded"] and model["router"]["fraction"] == 0.1
        # the first request's 10 routed answers are remembered (the crm-only one routed none)
        assert model["llm"]["answer_memo"] == {"capacity": 100_000, "answers": 10}
        # warmed up before ready: one candidate, a typical request, the largest request (max_candidates)
        assert list(model["crm"]["warmup"]["seconds_by_batch"]) == ["1", "100", "500"]
        metrics = client.get("/metrics").text
        assert 'corella_candidates_total{route="llm"} 10.0' in metrics


def test_unknown_items_and_cold_users_are_served_by_the_crm(bundle):
    with _client(bundle) as client:
        body = {"user_id": "nobody", "candidates": [{"item_id": "no-such-item"}, {"item_id": "3"}], "mode": "llm"}
        answer = client.post("/v1/predict", json=body).json()
        unknown, known = answer["predictions"]
        assert unknown["route"] == "crm" and "unknown item" in unknown["note"]
        assert known["route"] == "llm" and not answer["known_user"]
        titled = {"candidates": [{"item_id": "new", "title": "Brand New Movie", "year": "2001", "tags": ["Drama"]}],
                  "mode": "llm"}  # fmt: skip
        assert client.post("/v1/predict", json=titled).json()["predictions"][0]["route"] == "llm"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"candidates": "not a list"}, "candidates"),
        ({"candidates": [{"item_id": 3}]}, "candidates.0.item_id"),
        ({"candidates": []}, "candidates"),
        ({"candidates": [{"item_id": "1"}], "llm_fraction": 2}, "llm_fraction"),
        ({"candidates": [{"item_id": "1"}], "mode": "fast"}, "mode"),
        ({"candidates": [{"item_id": "1"}], "surprise": 1}, "surprise"),
    ],
)
def test_bad_requests_are_422_naming_the_field(bundle, body, field):
    with _client(bundle) as client:
        response = client.post("/v1/predict", json=body)
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["type"] == "validation_error" and field in error["message"]


def test_malformed_json_and_limits(bundle):
    with _client(bundle, max_candidates=10, max_body_bytes=4096) as client:
        response = client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert client.post("/v1/predict", json=_body(11)).status_code == 413
        big = _body(1, history=[{"item_id": "1", "rating": 5, "title": "x" * 500}] * 20)
        response = client.post("/v1/predict", json=big)
        assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"
        assert client.get("/v1/nothing").status_code == 404
        # a chunked body declares no length: the limit holds on the bytes read
        chunks = (b"x" * 1024 for _ in range(8))
        response = client.post("/v1/predict", content=chunks, headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"
        small = (part for part in (json.dumps(_body(2)).encode(),))
        assert (
            client.post("/v1/predict", content=small, headers={"content-type": "application/json"}).status_code == 200
        )
        # every error in the envelope, 404 and 405 too
        for response in (client.get("/v1/nothing"), client.get("/v1/predict")):
            assert response.status_code in (404, 405) and set(response.json()) == {"error"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"llm_fraction": False}, "llm_fraction"),  # a JSON boolean is not a number
        ({"history": [{"item_id": "1", "rating": 5, "timestamp": 1.5}]}, "history.0.timestamp"),
        ({"history": [{"item_id": "1", "rating": "5"}]}, "history.0.rating"),
        ({"history": [{"item_id": "1", "rating": 5, "timestamp": 2**63}]}, "history.0.timestamp"),
        ({"user_attributes": {"age": "x" * 100}}, "user_attributes.age"),
        ({"candidates": [{"item_id": "1", "tags": ["t" * 100]}]}, "candidates.0.tags.0"),
    ],
)
def test_the_schema_refuses_wrong_types_and_unbounded_values(bundle, body, field):
    with _client(bundle) as client:
        response = client.post("/v1/predict", json=_body(2) | body)
        assert response.status_code == 422, response.text
        assert any(d["field"].startswith(field) for d in response.json()["error"]["details"]), response.json()


def test_an_event_timestamp_past_the_year_9999_is_a_422_not_a_500(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with _client(copy) as client:
        event = {"user_id": "u", "item_id": "1", "rating": 5, "timestamp": 2**63}
        response = client.post("/v1/events", json={"events": [event]})
        assert response.status_code == 422 and response.json()["error"]["type"] == "validation_error"
        assert 'corella_requests_total{endpoint="/v1/events",status="422"} 1.0' in client.get("/metrics").text


def test_deadline_falls_back_to_the_crm(bundle):
    with _client(bundle) as client:
        answer = client.post("/v1/predict", json=_body(8, mode="llm", deadline_ms=0.001)).json()
        assert {p["route"] for p in answer["predictions"]} == {"crm_fallback"}
        assert {p["fallback_reason"] for p in answer["predictions"]} == {"deadline"}
        assert all(p["score"] == p["crm_score"] for p in answer["predictions"])
        assert answer["fallbacks"] == {"deadline": 8} and answer["llm_error"] is None
        assert 'corella_llm_fallbacks_total{reason="deadline"} 8.0' in client.get("/metrics").text


def test_llm_error_falls_back_and_is_counted(bundle):
    # llama.cpp's smallest context (256 tokens) cannot hold a prompt with a 495-character title
    with _client(bundle, llm_context=64) as client:
        body = {"user_id": "7", "mode": "llm",
                "candidates": [{"item_id": f"new-{i}", "title": "Long Title " * 45} for i in range(4)]}  # fmt: skip
        answer = client.post("/v1/predict", json=body).json()
        assert {p["route"] for p in answer["predictions"]} == {"crm_fallback"}
        assert answer["fallbacks"] == {"llm_error": 4}
        assert "exceeds the context" in answer["llm_error"]
        assert "corella_llm_errors_total 1.0" in client.get("/metrics").text
        assert client.get("/healthz").status_code == 200


def test_unloadable_gguf_keeps_serving_with_the_crm(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["llm"]["file"] = "features.json"  # hashed and present, but no GGUF
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with _client(copy) as client:
        # ready, degraded: the CRM answers and says so, instead of a 503 for good
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["degraded"] and ready.json()["llm"] == "unavailable"
        assert "could not load" in ready.json()["llm_error"]
        answer = client.post("/v1/predict", json=_body(3, mode="llm")).json()
        assert {p["route"] for p in answer["predictions"]} == {"crm_fallback"}
        assert answer["fallbacks"] == {"llm_unavailable": 3}
        metrics = client.get("/metrics").text
        assert "corella_llm_loaded 0.0" in metrics and "corella_llm_errors_total 0.0" in metrics


def test_events_persist_across_a_restart(bundle, tmp_path, corella_home):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    settings = {"bundle": copy}
    snapshot = {p.name: p.read_bytes() for p in copy.iterdir()}
    with _client(copy) as client:
        before = client.post("/v1/predict", json={"user_id": "fresh-user", "candidates": [{"item_id": "1"}]}).json()
        assert before["history_length"] == 0
        events = [{"user_id": "fresh-user", "item_id": str(i), "rating": 5, "timestamp": 2_000_000_000 + i}
                  for i in (2, 3, 4)]  # fmt: skip
        assert client.post("/v1/events", json={"events": events}).json() == {"appended": 3, "duplicates": 0}
        assert client.post("/v1/events", json={"events": [{"user_id": "u"}]}).status_code == 422
    with _client(**settings) as client:  # a new app on the same bundle: a restart
        after = client.post("/v1/predict", json={"user_id": "fresh-user", "candidates": [{"item_id": "1"}]}).json()
        assert after["history_length"] == 3 and after["known_user"]
    # nothing in the bundle is written or added (it may sit on a read-only mount); the live store is
    # in the bundle's state folder ($CORELLA_HOME/state/<bundle id>)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == snapshot
    assert (corella_home / "state" / load_bundle(copy).id / "store.sqlite").exists()


def test_api_key_guards_v1_only(bundle):
    with _client(bundle, api_key="s3cret") as client:
        assert client.post("/v1/predict", json=_body(1)).status_code == 401
        bad = client.post("/v1/predict", json=_body(1), headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "unauthorized"
        ok = client.post("/v1/predict", json=_body(1), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200


def test_keys_from_files_never_show_and_events_take_their_own_key(bundle, tmp_path):
    (tmp_path / "read.key").write_text("r3ad\n")
    (tmp_path / "write.key").write_text("wr1te")
    settings = ServerSettings(bundle=bundle, api_key_file=tmp_path / "read.key",
                              events_api_key_file=tmp_path / "write.key")  # fmt: skip
    assert "r3ad" not in repr(settings) and "wr1te" not in repr(settings) and "r3ad" not in str(settings.model_dump())
    read, write = {"Authorization": "Bearer r3ad"}, {"Authorization": "Bearer wr1te"}
    event = {"events": [{"user_id": "u", "item_id": "1", "rating": 5}]}
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with TestClient(create_app(settings.model_copy(update={"bundle": copy}))) as client:
        assert client.post("/v1/predict", json=_body(1), headers=read).status_code == 200
        assert client.post("/v1/predict", json=_body(1), headers=write).status_code == 401
        assert client.post("/v1/events", json=event, headers=read).status_code == 401  # the read key cannot write
        assert client.post("/v1/events", json=event, headers=write).status_code == 200
    with pytest.raises(ValueError, match="empty"):
        (tmp_path / "empty.key").write_text("  \n")
        ServerSettings(bundle=bundle, api_key_file=tmp_path / "empty.key")


def test_server_imports_without_torch():
    code = "import sys, runtime.serving; print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_under_32_concurrent_clients(bundle):
    port = _free_port()
    env = os.environ | {"CORELLA_API_KEY": "k"}
    server = subprocess.Popen(
        [sys.executable, "-m", "corella_cli", "serve", str(bundle), "--port", str(port), "--llm-threads", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                pytest.fail(server.stdout.read())
            time.sleep(0.1)
        else:
            pytest.fail("server did not become ready in 30 s")
        failures, statuses = [], []

        def client_loop(worker: int) -> None:
            with httpx.Client(base_url=base, headers={"Authorization": "Bearer k"}, timeout=30) as http:
                for i in range(4):
                    candidates = [{"item_id": str(j)} for j in range(1, 21)]
                    body = {"user_id": str(1 + (worker + i) % 120), "candidates": candidates, "llm_fraction": 0.1}
                    try:
                        response = http.post("/v1/predict", json=body)
                        statuses.append(response.status_code)
                        if response.status_code != 200 or len(response.json()["predictions"]) != 20:
                            failures.append(response.text)
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))

        threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not failures, failures[:3]
        assert statuses.count(200) == 32 * 4
    finally:
        server.terminate()
        server.wait(timeout=30)


def _start_server(bundle: Path, port: int, *args: str, env: dict[str, str] | None = None,
                  log: Path | None = None, ready_s: float = 30) -> subprocess.Popen:  # fmt: skip
    """`corella serve` in its own process (`env` added to this one's), ready on `port`; its log in a
    file (a pipe nobody reads would fill and stall the server after a few hundred access-log lines)."""
    log = log or bundle.parent / f"serve-{port}.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "corella_cli", "serve", str(bundle), "--port", str(port), *args],
            cwd=REPO, env=os.environ | (env or {}), stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    for _ in range(int(ready_s * 10)):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            pytest.fail(log.read_text())
        time.sleep(0.1)
    server.kill()
    pytest.fail(f"server did not become ready in {ready_s:.0f} s")


def test_acknowledged_events_survive_a_kill_9_and_retries_count_once(bundle, tmp_path):
    """Clients post events with ids while the server is killed with SIGKILL: after a restart on the
    same state, every event that got a 200 is in the store; posting them again appends nothing."""
    from runtime.artifacts.store import FeatureStore

    port, state = _free_port(), tmp_path / "state"
    server = _start_server(bundle, port, "--no-llm", "--state", str(state))
    acknowledged: list[str] = []
    lock = threading.Lock()

    def poster(worker: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            for i in range(10_000):
                event = {"user_id": f"crash-{worker}", "item_id": str(1 + i % 40), "rating": 4,
                         "timestamp": 2_000_000_000 + i}  # fmt: skip
                batch = [event | {"event_id": f"w{worker}-{i}-{j}"} for j in range(3)]
                try:
                    response = http.post("/v1/events", json={"events": batch})
                except httpx.HTTPError:
                    return  # the server is gone
                if response.status_code == 200:
                    with lock:
                        acknowledged.extend(e["event_id"] for e in batch)

    threads = [threading.Thread(target=poster, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    while len(acknowledged) < 150:
        time.sleep(0.01)
    server.kill()  # SIGKILL: no shutdown, no checkpoint of the WAL
    server.wait()
    for t in threads:
        t.join()
    store = FeatureStore(state / "store.sqlite")
    found = {row.event_id for row in store.interactions() if row.event_id}
    store.close()
    assert set(acknowledged) <= found and len(acknowledged) >= 150
    server = _start_server(bundle, port, "--no-llm", "--state", str(state))
    try:
        retry = [{"user_id": "crash-0", "item_id": "1", "rating": 4, "timestamp": 2_000_000_000, "event_id": "w0-0-0"},
                 {"user_id": "crash-0", "item_id": "2", "rating": 4, "event_id": "brand-new"}]  # fmt: skip
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/events", json={"events": retry}, timeout=5).json()
        assert answer == {"appended": 1, "duplicates": 1}
    finally:
        server.kill()
        server.wait()


def test_the_live_store_bound_refuses_a_batch_whole(bundle, tmp_path):
    from runtime.artifacts.bundle import load_bundle
    from runtime.artifacts.store import FeatureStore

    held = FeatureStore(bundle / "store.sqlite", readonly=True).counts()["interactions"]
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with _client(copy, max_store_interactions=held + 2) as client:
        events = [{"user_id": "u", "item_id": "1", "rating": 5, "timestamp": 2_000_000_000 + i} for i in range(3)]
        response = client.post("/v1/events", json={"events": events})
        assert response.status_code == 507 and response.json()["error"]["type"] == "store_full"
        assert client.post("/v1/events", json={"events": events[:2]}).json()["appended"] == 2
        assert "corella_events_refused_total 3.0" in client.get("/metrics").text
    assert load_bundle(copy).id  # the bundle itself untouched and valid


def test_a_bundle_verified_by_serve_is_not_hashed_again(bundle, monkeypatch):
    import runtime.artifacts.bundle

    loaded = load_bundle(bundle)
    hashed: list[Path] = []
    real = runtime.artifacts.bundle.file_digest
    monkeypatch.setattr(runtime.artifacts.bundle, "file_digest", lambda path: hashed.append(path) or real(path))
    settings = ServerSettings(bundle=bundle, load_llm=False)
    with TestClient(create_app(settings, bundle=loaded)) as client:
        assert client.get("/readyz").json()["ready"]
    assert hashed == []
    with TestClient(create_app(settings)) as client:  # without it, the server verifies the bundle itself
        assert client.get("/readyz").json()["ready"]
    assert {path.name for path in hashed} >= {"crm.onnx", "store.sqlite"}
