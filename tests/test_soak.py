"""A bounded soak against a real `corella serve` on loopback: 32 clients, 80% predictions and 20%
events for CORELLA_SOAK_SECONDS (60): no 5xx, no lost event (counted back from the live store),
resident memory (server and its LLM process) grows less than 10% from second 10 to the end."""

import os
import random
import shutil
import threading
import time
from pathlib import Path

import httpx

from runtime.artifacts.store import FeatureStore

from .test_server import _free_port, _start_server

SECONDS = float(os.environ.get("CORELLA_SOAK_SECONDS", "60"))


def _rss_mib(pid: int) -> float:
    """Resident memory of a process and its children, MiB."""
    total, pids = 0.0, [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        pids += [int(p) for p in child.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def test_soak_32_clients_mixed_predict_and_events(bundle, tmp_path):
    copy, state = tmp_path / "bundle", tmp_path / "state"
    shutil.copytree(bundle, copy)
    port = _free_port()
    server = _start_server(copy, port, "--llm-threads", "1", "--state", str(state))
    statuses: dict[int, int] = {}
    acknowledged, lock, stop = [], threading.Lock(), threading.Event()

    def client(worker: int) -> None:
        rng = random.Random(worker)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            i = 0
            while not stop.is_set():
                i += 1
                if rng.random() < 0.8:
                    body = {"user_id": str(rng.randint(1, 120)), "llm_fraction": 0.1,
                            "candidates": [{"item_id": str(rng.randint(1, 40))} for _ in range(20)]}  # fmt: skip
                    response = http.post("/v1/predict", json=body)
                else:
                    event_id = f"soak-{worker}-{i}"
                    event = {"user_id": f"soak-{worker}", "item_id": str(rng.randint(1, 40)), "rating": 4,
                             "timestamp": 2_000_000_000 + i, "event_id": event_id}  # fmt: skip
                    response = http.post("/v1/events", json={"events": [event]})
                    if response.status_code == 200:
                        with lock:
                            acknowledged.append(event_id)
                with lock:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(32)]
    try:
        for t in threads:
            t.start()
        time.sleep(min(10.0, SECONDS / 6))
        rss_start = _rss_mib(server.pid)
        time.sleep(SECONDS - min(10.0, SECONDS / 6))
        rss_end = _rss_mib(server.pid)
        stop.set()
        for t in threads:
            t.join()
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=30)
    store = FeatureStore(state / "store.sqlite")
    found = {row.event_id for row in store.interactions() if row.event_id}
    store.close()
    print(f"soak {SECONDS:.0f} s: statuses {statuses}; events posted {len(acknowledged)}, found "
          f"{len(set(acknowledged) & found)}; RSS {rss_start:.0f} -> {rss_end:.0f} MiB")  # fmt: skip
    assert not any(status >= 500 for status in statuses) and statuses.get(200, 0) > 100
    assert set(acknowledged) <= found and acknowledged
    assert rss_end < 1.10 * rss_start
