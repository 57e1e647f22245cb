"""Sticky load balancing with an existing balancer: nginx from Debian's package, running the shipped
deploy/nginx/corella.conf on loopback in front of two corella replicas."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from .conftest import REPO

CONFIG = REPO / "deploy" / "nginx" / "corella.conf"


def _nginx() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found is None:
        pytest.skip("nginx is not installed (make test installs Debian's package where it runs as root)")
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            pytest.fail(log.read_text())
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer in {seconds:.0f} s")


def _replica(bundle: Path, port: int, home: Path) -> subprocess.Popen:
    log = home.with_suffix(".log")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "corella_cli", "serve", str(bundle), "--port", str(port), "--no-llm"],
            cwd=REPO, env=os.environ | {"CORELLA_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    _wait(f"http://127.0.0.1:{port}/readyz", process, log)
    return process


def test_nginx_keeps_each_user_on_one_replica_and_passes_over_a_dead_one(bundle, tmp_path):
    nginx = _nginx()
    ports = [_free_port(), _free_port()]
    replicas = [_replica(bundle, port, tmp_path / f"home{i}") for i, port in enumerate(ports)]
    front = _free_port()
    config = CONFIG.read_text()
    for old, new in (("127.0.0.1:8001", f"127.0.0.1:{ports[0]}"), ("127.0.0.1:8002", f"127.0.0.1:{ports[1]}"),
                     ("listen 127.0.0.1:8000", f"listen 127.0.0.1:{front}")):  # fmt: skip
        assert old in config
        config = config.replace(old, new)
    prefix = tmp_path / "lb"
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(config)
    directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    balancer = subprocess.Popen([nginx, "-p", f"{prefix}/", "-c", "nginx.conf", "-e", "error.log", "-g", directives],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{front}"
    try:
        _wait(f"{base}/healthz", balancer, prefix / "error.log")
        landed: dict[str, set[str]] = defaultdict(set)
        with httpx.Client(base_url=base, timeout=30) as http:
            body = {"candidates": [{"item_id": "1"}, {"item_id": "2"}]}
            for _ in range(3):
                for u in range(24):
                    user = str(1 + u)
                    answer = http.post("/v1/predict", json=body, headers={"X-Corella-User": user})
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["user_id"] == user  # the header named the user
                    landed[user].add(answer.headers["X-Corella-Upstream"])
            assert all(len(upstreams) == 1 for upstreams in landed.values()), landed  # sticky
            used = {next(iter(u)) for u in landed.values()}
            assert used == {f"127.0.0.1:{p}" for p in ports}  # and both replicas take users
            both = http.post("/v1/predict", json=body | {"user_id": "1"}, headers={"X-Corella-User": "2"})
            assert both.status_code == 400 and "X-Corella-User" in both.json()["error"]["message"]
            # a replica goes: its users are answered by the other one
            replicas[1].send_signal(signal.SIGTERM)
            replicas[1].wait(timeout=60)
            for user in landed:
                answer = http.post("/v1/predict", json=body, headers={"X-Corella-User": user})
                assert answer.status_code == 200, answer.text
                assert answer.headers["X-Corella-Upstream"].endswith(f"127.0.0.1:{ports[0]}")
    finally:
        balancer.send_signal(signal.SIGQUIT)
        try:
            balancer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            balancer.kill()
        for replica in replicas:
            if replica.poll() is None:
                replica.terminate()
                replica.wait(timeout=60)
