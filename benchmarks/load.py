"""Load on real servers over loopback: closed-loop asyncio clients, a health prober, server processes.

The server under test runs in a process of its own (`corella serve`, or the peer's server), so
that the load generator's Python does not share its interpreter; the clients are coroutines on one
event loop, so that 256 of them cost little more than 8; bodies and answers go through orjson (the
standard library's json took 0.16 ms of the ~0.55 ms of CPU the generator spent on a 100-candidate
request, orjson 0.03). Every loop is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.stats import percentile

__all__ = ["Sample", "LoadRun", "UserMix", "closed_loop", "send_all", "server_process", "free_port", "scrape"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(command: list[str], ready_url: str, log_path: Path, env: dict[str, str] | None = None,
                   timeout_s: float = 180) -> Iterator[subprocess.Popen]:  # fmt: skip
    """Start a server, wait until `ready_url` answers 200, stop it at the end (its output goes to a log)."""
    import httpx

    log = open(log_path, "w")  # noqa: SIM115 - closed below, after the process
    # the bench measures what decoding costs, whatever the bundle's LLM is worth (see llm_decode_without_signal),
    # unless the caller's environment says otherwise (=0: serve as a user would)
    defaults = {"CORELLA_LLM_DECODE_WITHOUT_SIGNAL": "1"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=defaults | os.environ | (env or {}))
    try:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited with {process.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{command[:4]} was not ready within {timeout_s:.0f} s; see {log_path}")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc; NaN where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def llm_process(server_pid: int) -> int | None:
    """The LLM process `corella serve` started (a spawned child), or None."""
    for task in Path(f"/proc/{server_pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
            except OSError:
                continue
    return None


def corella_serve_command(bundle: Path, port: int, state: Path, **options: Any) -> list[str]:
    """`corella serve` on a fresh state folder of the bench's own (never the bundle's live store)."""
    shutil.rmtree(state, ignore_errors=True)
    command = [sys.executable, "-m", "corella_cli", "serve", str(bundle), "--port", str(port), "--state", str(state)]
    for name, value in options.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            command.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            command += [f"--{flag}", str(value)]
    return command


def scrape(base: str) -> dict[str, float]:
    """The server's Prometheus samples by name and labels, e.g. 'corella_candidates_total{route="llm"}'."""
    import httpx

    samples: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@dataclass
class Sample:
    """One request as the client saw it."""

    kind: str
    status: int
    seconds: float
    routed: int = 0
    llm: int = 0
    recalled: int = 0  # of the llm answers, those the server's answer memo gave
    fallbacks: dict[str, int] = field(default_factory=dict)
    llm_ms: float | None = None
    server_s: float | None = None  # from the answer's Server-Timing header
    sent: float = 0.0  # perf_counter when the request was sent
    retry_after: float = 0.0  # a 429's Retry-After, in seconds


@dataclass
class LoadRun:
    concurrency: int
    wall_s: float
    samples: list[Sample]
    health_s: list[float]

    def summary(self, deadline_ms: float | None) -> dict[str, Any]:
        ok = [s for s in self.samples if s.status == 200]
        seconds = [s.seconds for s in self.samples]
        statuses = Counter(str(s.status) for s in self.samples)
        fallbacks: Counter = Counter()
        for s in ok:
            fallbacks.update(s.fallbacks)
        # answered at once because the LLM could take none of their routed work
        crm_only = [s.seconds for s in ok if s.routed and not s.llm and s.fallbacks.get("overloaded")]
        refused = [s.seconds for s in self.samples if s.status == 429]
        refused_llm = [s for s in self.samples if s.status == 429 and s.kind == "llm"]
        outside = [s.seconds - s.server_s for s in self.samples if s.server_s is not None]
        out = {
            "concurrency": self.concurrency, "seconds": self.wall_s, "requests": len(self.samples),
            "statuses": dict(statuses), "server_errors": sum(s.status >= 500 for s in self.samples),
            "client_errors": sum(s.status == 0 for s in self.samples),
            "requests_per_second": len(self.samples) / self.wall_s,
            "p50_ms": 1000 * percentile(seconds, 50), "p99_ms": 1000 * percentile(seconds, 99),
            "max_ms": 1000 * max(seconds, default=float("nan")),
            "routed_candidates": sum(s.routed for s in ok), "llm_answers": sum(s.llm for s in ok),
            "llm_answers_per_second": sum(s.llm for s in ok) / self.wall_s, "fallbacks": dict(fallbacks),
            "llm_recalled": sum(s.recalled for s in ok),
            "llm_decoded_per_second": sum(s.llm - s.recalled for s in ok) / self.wall_s,
            "crm_only_requests": len(crm_only), "crm_only_p50_ms": 1000 * percentile(crm_only, 50),
            "refused_429": len(refused), "refused_p99_ms": 1000 * percentile(refused, 99),
            "refused_server_p99_ms": 1000 * percentile([s.server_s for s in self.samples
                                                         if s.status == 429 and s.server_s is not None], 99),
            "refused_llm": len(refused_llm),
            "refused_llm_p50_ms": 1000 * percentile([s.seconds for s in refused_llm], 50),
            "refused_llm_p99_ms": 1000 * percentile([s.seconds for s in refused_llm], 99),
            "refused_llm_server_p99_ms": 1000 * percentile([s.server_s for s in refused_llm if s.server_s], 99),
            "outside_server_p50_ms": 1000 * percentile(outside, 50),
            "outside_server_p99_ms": 1000 * percentile(outside, 99),
            "healthz_probes": len(self.health_s), "healthz_p99_ms": 1000 * percentile(self.health_s, 99),
            "healthz_max_ms": 1000 * max(self.health_s, default=float("nan")),
            "latencies_ms": [round(1000 * x, 2) for x in seconds],
        }  # fmt: skip
        if deadline_ms is not None:
            out["p99_over_deadline_ms"] = out["p99_ms"] - deadline_ms
        return out


class UserMix:
    """Requests of known users: a `repeat_share` of them from users seen in the last `window_s`
    seconds (their prefixes may still be cached), the rest from any user; random candidates."""

    def __init__(self, users: list[str], items: list[str], candidates: int, repeat_share: float = 0.7,
                 window_s: float = 60.0, seed: int = 0, **options: Any) -> None:  # fmt: skip
        self.users, self.items, self.candidates = users, items, candidates
        self.repeat_share, self.window_s, self.options = repeat_share, window_s, options
        self.rng = np.random.default_rng(seed)
        self.seen: dict[str, float] = {}

    def user(self, now: float) -> str:
        recent = [u for u, t in self.seen.items() if now - t <= self.window_s]
        if recent and self.rng.random() < self.repeat_share:
            user = recent[int(self.rng.integers(len(recent)))]
        else:
            user = self.users[int(self.rng.integers(len(self.users)))]
        self.seen[user] = now
        if len(self.seen) > 4 * len(recent) + 1000:
            self.seen = {u: t for u, t in self.seen.items() if now - t <= self.window_s}
        return user

    def body(self, now: float | None = None) -> dict[str, Any]:
        user = self.user(time.monotonic() if now is None else now)
        picked = self.rng.choice(len(self.items), size=min(self.candidates, len(self.items)), replace=False)
        return {"user_id": user, "candidates": [{"item_id": self.items[i]} for i in picked], **self.options}


def _server_seconds(headers: Any) -> float | None:
    timing = headers.get("server-timing", "")
    if "dur=" not in timing:
        return None
    return float(timing.split("dur=", 1)[1].split(",")[0].split(";")[0]) / 1000


def _sample(kind: str, status: int, seconds: float, answer: dict[str, Any] | None, server_s: float | None) -> Sample:
    if not answer or status != 200 or "predictions" not in answer:
        return Sample(kind, status, seconds, server_s=server_s)
    llm = sum(p["route"] == "llm" for p in answer["predictions"])
    return Sample(kind, status, seconds, answer.get("routed", 0), llm, answer.get("llm_recalled", 0),
                  answer.get("fallbacks", {}), answer.get("timings_ms", {}).get("llm"), server_s)  # fmt: skip


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a load generator's client, a few
    microseconds a request (httpx's pool costs milliseconds a request at hundreds of connections,
    and a starved client would put its own delays into every figure)."""

    def __init__(self, base: str, timeout_s: float = 120) -> None:
        host_port = base.split("://", 1)[-1].rstrip("/")
        self.host, _, port = host_port.partition(":")
        self.port, self.timeout_s = int(port or 80), timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); status 0 when the connection failed (it is reopened next time)."""
        try:
            return await asyncio.wait_for(self._exchange(method, path, body), self.timeout_s)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            self.close()
            return 0, {}, b""

    async def _exchange(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        self.writer.write(head + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _post(connection: Connection, path: str, body: dict[str, Any], kind: str) -> Sample:
    started = time.perf_counter()
    status, headers, payload = await connection.request("POST", path, orjson.dumps(body))
    elapsed = time.perf_counter() - started
    answer = None
    if status and headers.get("content-type", "").startswith("application/json"):
        with contextlib.suppress(ValueError):
            answer = orjson.loads(payload)
    sample = _sample(kind, status, elapsed, answer, _server_seconds(headers))
    sample.sent = started
    with contextlib.suppress(ValueError):
        sample.retry_after = float(headers.get("retry-after", 0))
    return sample


def closed_loop(base: str, concurrency: int, duration_s: float, make_body: Callable[[], tuple[str, dict[str, Any]]],
                probe_interval_s: float = 0.05, timeout_s: float = 120,
                ramp_s: float | None = None) -> LoadRun:  # fmt: skip
    """`concurrency` clients, each sending its next request as soon as the last is answered (after
    a 429, once its Retry-After has passed), for `duration_s`; meanwhile a prober in a process of
    its own times GET /healthz (the clients' event loop, busy with hundreds of answers, would add
    its own delays to the probe's).

    The clients start one after another over `ramp_s` (default: a tenth of the run, at most 1 s),
    as load tools ramp up their users: 256 first requests sent in the same millisecond measure
    the herd, not the server (on 2 cores their parsing alone queued the last ones ~300 ms). Every
    request counts, the ramp's included."""
    ramp = min(1.0, duration_s / 10) if ramp_s is None else ramp_s
    return asyncio.run(_closed_loop(base, concurrency, duration_s, make_body, probe_interval_s, timeout_s, ramp))


async def _closed_loop(base: str, concurrency: int, duration_s: float, make_body: Callable, probe_interval_s: float,
                       timeout_s: float, ramp_s: float) -> LoadRun:  # fmt: skip
    samples: list[Sample] = []
    # every client connects before the clock starts: a burst of hundreds of connects is a test of
    # the kernel's accept queue, not of the server
    connections = [Connection(base, timeout_s) for _ in range(concurrency)]
    for start in range(0, concurrency, 32):
        await asyncio.gather(*(c.request("GET", "/healthz") for c in connections[start : start + 32]))
    probe = subprocess.Popen([sys.executable, "-m", "benchmarks.load", "probe", base, str(duration_s),
                              str(probe_interval_s)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    started = time.perf_counter()
    stop = started + duration_s

    async def worker(connection: Connection, delay: float) -> None:
        await asyncio.sleep(delay)
        while time.perf_counter() < stop:
            kind, body = make_body()
            samples.append(sample := await _post(connection, "/v1/predict", body, kind))
            if sample.status == 429:  # a well-behaved client waits as told before it asks again
                await asyncio.sleep(min(sample.retry_after, max(0.0, stop - time.perf_counter())))
        connection.close()

    try:
        await asyncio.gather(*(worker(c, ramp_s * k / concurrency) for k, c in enumerate(connections)))
        wall = time.perf_counter() - started
        output, _ = await asyncio.to_thread(probe.communicate, timeout=duration_s + 60)
    finally:
        if probe.poll() is None:
            probe.kill()
    return LoadRun(concurrency, wall, samples, json.loads(output or "[]"))


def _probe(base: str, duration_s: float, interval_s: float) -> list[float]:
    import httpx

    latencies: list[float] = []
    stop = time.perf_counter() + duration_s
    with httpx.Client(base_url=base, timeout=30) as client:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                client.get("/healthz")
                latencies.append(time.perf_counter() - started)
            time.sleep(interval_s)
    return latencies


def send_all(base: str, path: str, bodies: list[dict[str, Any]], concurrency: int, timeout_s: float = 600,
             sequences: list[list[int]] | None = None, client_field: str | None = None
             ) -> tuple[list[tuple[int, float, Any]], float]:  # fmt: skip
    """Send every body once from `concurrency` clients; (status, seconds, answer) per body, and the
    wall time. `sequences`: groups of body indices a client sends in order, one group at a time
    (one user's requests, say); by default every body is a group of its own. `client_field`: set
    to the sending client's number in each body (llama-server's `id_slot`: a client, a slot)."""
    groups = sequences if sequences is not None else [[i] for i in range(len(bodies))]
    return asyncio.run(_send_all(base, path, bodies, groups, concurrency, timeout_s, client_field))


async def _send_all(base: str, path: str, bodies: list[dict[str, Any]], groups: list[list[int]], concurrency: int,
                    timeout_s: float, client_field: str | None
                    ) -> tuple[list[tuple[int, float, Any]], float]:  # fmt: skip
    results: list[tuple[int, float, Any]] = [(0, 0.0, None)] * len(bodies)
    queue = list(groups)
    started = time.perf_counter()

    async def worker(client: int) -> None:
        connection = Connection(base, timeout_s)
        while queue:
            for index in queue.pop(0):
                body = bodies[index] | ({client_field: client} if client_field else {})
                t = time.perf_counter()
                status, _, payload = await connection.request("POST", path, orjson.dumps(body))
                try:
                    results[index] = (status, time.perf_counter() - t, orjson.loads(payload) if status else None)
                except ValueError:
                    results[index] = (0, time.perf_counter() - t, None)
        connection.close()

    await asyncio.gather(*(worker(client) for client in range(concurrency)))
    return results, time.perf_counter() - started


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    print(json.dumps(_probe(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))))
