"""The http suite: `corella serve` in its own process under load, beside llama-cpp-python's server.

What it measures, each on the bundle's own GGUF and thread count:
- levels: closed-loop clients at each concurrency for a fixed time, a realistic mix (70% of the
  requests from users seen in the last minute), 100 candidates, hybrid at f = 0.1, the default
  deadline; throughput, latency, LLM goodput (routed candidates answered by the LLM per second)
  and /healthz latency meanwhile;
- repeat vs cold: the LLM part of one user's request when the user's prefix is cached vs not;
- the peers (benchmarks/peers.py): llama.cpp's llama-server and llama-cpp-python's server, one
  completion a candidate, against `corella serve` with mode "llm" (cut vocabulary and whole), the
  same cold users and GGUF everywhere;
- overload: 256 clients against a server with a small LLM queue, half of them asking for mode
  "llm": answers keep coming, 429s come at once, /healthz stays quick;
- soak: the issue's own goodput scenario on a fresh server (random users, 20 candidates a request
  at the bundle's threshold): LLM answers a second at 32 and 64 clients against 1 client.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import (
    UserMix,
    closed_loop,
    corella_serve_command,
    cpu_seconds,
    free_port,
    llm_process,
    scrape,
    send_all,
    server_process,
)
from benchmarks.peers import peer_comparison
from runtime.artifacts.bundle import Bundle
from runtime.engine import Engine

__all__ = ["http_suite"]

log = logging.getLogger(__name__)


def _llm_answers(base: str) -> float:
    return scrape(base).get('corella_candidates_total{route="llm"}', 0.0)


def _level(base: str, pids: tuple[int, int | None], concurrency: int, seconds: float,
           make_body: Callable[[], tuple[str, dict[str, Any]]], candidates: int,
           deadline_ms: float) -> dict[str, Any]:  # fmt: skip
    """One level of closed-loop load: the clients' figures, and what the server did meanwhile:
    candidates answered a second, the tokens its LLM process decoded a second, and the CPU shares
    of the front end and of the LLM process (`pids`: the server's and its LLM process's)."""
    server_pid, llm_pid = pids
    cores = os.cpu_count() or 1
    before, tokens = _llm_answers(base), scrape(base).get("corella_llm_batch_tokens_sum", 0.0)
    cpu = (cpu_seconds(server_pid), cpu_seconds(llm_pid) if llm_pid else float("nan"))
    level = closed_loop(base, concurrency, seconds, make_body).summary(deadline_ms)
    wall = level["seconds"]
    level["server_llm_answers"] = _llm_answers(base) - before
    level["candidates_per_second"] = level["statuses"].get("200", 0) * candidates / wall
    level["llm_tokens_per_second"] = (scrape(base).get("corella_llm_batch_tokens_sum", 0.0) - tokens) / wall
    level["front_cpu_share"] = (cpu_seconds(server_pid) - cpu[0]) / wall / cores
    level["llm_cpu_share"] = (cpu_seconds(llm_pid) - cpu[1]) / wall / cores if llm_pid else float("nan")
    return level


def _levels(base: str, engine: Engine, config: Any, server_pid: int,
            progress: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    """Each level: requests, candidates and LLM answers a second, fallbacks by reason, and what the
    LLM process did meanwhile (tokens decoded a second, its share of the box's CPU time)."""
    mix = UserMix(engine.store.user_ids(), engine.store.item_ids(), config.http_candidates,
                  repeat_share=config.http_repeat_share, seed=config.seed + 2,
                  llm_fraction=config.http_fraction)  # fmt: skip
    pids = (server_pid, llm_process(server_pid))
    levels = []
    for concurrency in config.http_concurrency:
        level = _level(base, pids, concurrency, config.http_seconds, lambda: ("hybrid", mix.body()),
                       config.http_candidates, config.http_deadline_ms)  # fmt: skip
        levels.append(level)
        progress(f"http c={concurrency}: {level['requests_per_second']:.1f} req/s, "
                 f"{level['candidates_per_second']:.0f} candidates/s, p50 {level['p50_ms']:.0f} ms, "
                 f"p99 {level['p99_ms']:.0f} ms, LLM answers {level['llm_answers_per_second']:.1f}/s "
                 f"({level['llm_decoded_per_second']:.1f} decoded, {level['llm_tokens_per_second']:.0f} tokens/s, "
                 f"LLM process {level['llm_cpu_share']:.0%} of the CPU, front end {level['front_cpu_share']:.0%}), "
                 f"fallbacks {level['fallbacks']}, 5xx {level['server_errors']}")  # fmt: skip
    return levels


def _repeat_vs_cold(base: str, engine: Engine, users: list[str], config: Any,
                    progress: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """A user's first request (nothing cached: the server has not seen the user), the same request
    again (its answers remembered), then another request of the same user (other candidates: only
    the prefix cached): the LLM part of each, sequentially on an idle server."""
    items = engine.store.item_ids()
    rng = np.random.default_rng(config.seed + 3)
    rows, recalled = [], []
    for user in users:
        bodies = [_unhurried_body(user, items, rng, config) for _ in range(2)]
        answers, _ = send_all(base, "/v1/predict", [bodies[0], bodies[0], bodies[1]], 1)
        if any(status != 200 for status, _, _ in answers):
            continue
        rows.append([answer["timings_ms"]["llm"] for _, _, answer in answers])
        recalled.append([(answer.get("llm_recalled", 0), answer["routed"]) for _, _, answer in answers])
    table, counts = np.array(rows), np.array(recalled).sum(axis=0)
    result = {"users": len(rows), "cold_llm_ms": float(table[:, 0].mean()),
              "same_request_cached_llm_ms": float(table[:, 1].mean()),
              "other_candidates_cached_llm_ms": float(table[:, 2].mean()),
              "recalled_of_routed": {"cold": counts[0].tolist(), "same_request": counts[1].tolist(),
                                     "other_candidates": counts[2].tolist()}}  # fmt: skip
    result["same_request_over_cold"] = result["same_request_cached_llm_ms"] / result["cold_llm_ms"]
    result["other_candidates_over_cold"] = result["other_candidates_cached_llm_ms"] / result["cold_llm_ms"]
    cold, cached = result["cold_llm_ms"], result["same_request_cached_llm_ms"]
    progress(f"repeat vs cold user: LLM part {cold:.0f} ms cold, {cached:.0f} ms cached ({cached / cold:.0%})")
    return result


def _unhurried_body(user: str, items: list[str], rng: np.random.Generator, config: Any) -> dict[str, Any]:
    """One request of the user for random candidates, hybrid at the suite's fraction, with a deadline
    long enough that the LLM answers every routed candidate (its time is what is measured)."""
    pick = rng.choice(len(items), size=config.http_candidates, replace=False)
    return {"user_id": user, "candidates": [{"item_id": items[i]} for i in pick],
            "llm_fraction": config.http_fraction, "deadline_ms": 600_000}  # fmt: skip


def _returning_users(base: str, engine: Engine, users: list[str], config: Any,
                     progress: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Many users come back: each user's request once, in turn, then each again, for other
    candidates, after all the others (more prefixes between a user's two visits than the KV cache
    holds; the host memory tier holds them; other candidates, so that the answer memo has none). The
    LLM part of each round, and the prefix cache's hits in the second."""
    items = engine.store.item_ids()
    rng = np.random.default_rng(config.seed + 5)
    hits = 'corella_llm_prefix_cache_total{result="hit"}'
    rounds = []
    for _ in range(2):
        bodies = [_unhurried_body(user, items, rng, config) for user in users]
        before = scrape(base).get(hits, 0.0)
        answers, _ = send_all(base, "/v1/predict", bodies, 1)
        ms = [answer["timings_ms"]["llm"] for status, _, answer in answers if status == 200]
        rounds.append({"requests": len(ms), "llm_ms": float(np.mean(ms)) if ms else float("nan"),
                       "prefix_hits": scrape(base).get(hits, 0.0) - before})  # fmt: skip
    result = {"users": len(users), "first": rounds[0], "second": rounds[1],
              "second_over_first": rounds[1]["llm_ms"] / rounds[0]["llm_ms"]}  # fmt: skip
    progress(
        f"{len(users)} returning users: LLM part {rounds[0]['llm_ms']:.0f} ms, then {rounds[1]['llm_ms']:.0f} ms "
        f"({result['second_over_first']:.0%}), {rounds[1]['prefix_hits']:.0f} prefix hits"
    )
    return result


def _overload(bundle: Bundle, engine: Engine, out: Path, config: Any,
              progress: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """256 clients against a small LLM queue; half ask for mode "llm" (10 candidates)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = corella_serve_command(bundle.path, port, out / "overload-state", llm_threads=config.threads,
                                    llm_queue_candidates=config.overload_queue,
                                    deadline_ms=config.http_deadline_ms)  # fmt: skip
    hybrid = UserMix(engine.store.user_ids(), engine.store.item_ids(), config.http_candidates, seed=config.seed + 5,
                     llm_fraction=config.http_fraction)  # fmt: skip
    llm_only = UserMix(engine.store.user_ids(), engine.store.item_ids(), 10, seed=config.seed + 6, mode="llm")
    rng = np.random.default_rng(config.seed + 7)

    def body() -> tuple[str, dict[str, Any]]:
        return ("llm", llm_only.body()) if rng.random() < 0.5 else ("hybrid", hybrid.body())

    with server_process(command, f"{base}/readyz", out / "overload-server.log"):
        run = closed_loop(base, config.overload_concurrency, config.overload_seconds, body)
    summary = run.summary(config.http_deadline_ms)
    summary["queue_candidates"] = config.overload_queue
    progress(f"overload c={config.overload_concurrency}: {summary['requests_per_second']:.1f} req/s, "
             f"statuses {summary['statuses']}, mode llm 429 p99 {summary['refused_llm_p99_ms']:.0f} ms, "
             f"/healthz p99 {summary['healthz_p99_ms']:.0f} ms")  # fmt: skip
    return summary


def _soak(bundle: Bundle, engine: Engine, out: Path, config: Any, progress: Callable[[str], None]) -> dict[str, Any]:
    """The issue's soak on a fresh server: random users (few prefixes to reuse), 20 candidates a
    request routed at the bundle's threshold; one client (the unloaded rate), then each load."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = corella_serve_command(bundle.path, port, out / "soak-state", llm_threads=config.threads,
                                    deadline_ms=config.http_deadline_ms)  # fmt: skip
    mix = UserMix(engine.store.user_ids(), engine.store.item_ids(), config.soak_candidates, repeat_share=0.0,
                  seed=config.seed + 9)  # fmt: skip
    levels = []
    with server_process(command, f"{base}/readyz", out / "soak-server.log") as server:
        pids = (server.pid, llm_process(server.pid))
        for concurrency in config.soak_concurrency:
            seconds = config.soak_seconds / 2 if concurrency == 1 else config.soak_seconds
            levels.append(_level(base, pids, concurrency, seconds, lambda: ("hybrid", mix.body()),
                                 config.soak_candidates, config.http_deadline_ms))  # fmt: skip
    _goodput(levels)
    for level in levels:
        progress(f"soak c={level['concurrency']}: {level['requests_per_second']:.1f} req/s, LLM answers "
                 f"{level['llm_answers_per_second']:.2f}/s, decoded {level['llm_decoded_per_second']:.2f}/s "
                 f"({level['llm_decoded_vs_unloaded']:.2f} of unloaded), "
                 f"CRM-only p50 {level['crm_only_p50_ms']:.0f} ms")  # fmt: skip
    return {"candidates_per_request": config.soak_candidates, "deadline_ms": config.http_deadline_ms,
            "seconds": config.soak_seconds, "levels": levels}  # fmt: skip


def _goodput(levels: list[dict[str, Any]]) -> None:
    """Each level's LLM answers a second against the first (unloaded) level's: all of them, and the
    decoded ones only (the answer memo's are not LLM time; the issue's goal is judged on these)."""
    for key, ratio in (("llm_answers_per_second", "llm_goodput_vs_unloaded"),
                       ("llm_decoded_per_second", "llm_decoded_vs_unloaded")):  # fmt: skip
        unloaded = levels[0][key]
        for level in levels:
            level[ratio] = level[key] / unloaded if unloaded else float("nan")


def http_suite(bundle: Bundle, engine: Engine, samples: list[Any], config: Any,
               progress: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    out = Path(config.out) if config.out else Path(".")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = corella_serve_command(bundle.path, port, out / "http-state", llm_threads=config.threads,
                                    deadline_ms=config.http_deadline_ms)  # fmt: skip
    result: dict[str, Any] = {"candidates_per_request": config.http_candidates, "llm_fraction": config.http_fraction,
                              "deadline_ms": config.http_deadline_ms, "seconds_per_level": config.http_seconds,
                              "repeat_share": config.http_repeat_share}  # fmt: skip
    started = time.perf_counter()
    # users for the cold measurements, disjoint, drawn before the levels can cache anyone
    users = list(np.random.default_rng(config.seed + 8).permutation(engine.store.user_ids()))
    cold, peer = users[: config.cold_users], users[config.cold_users : config.cold_users + config.peer_users]
    returning = users[len(cold) + len(peer) :][: config.returning_users]
    with server_process(command, f"{base}/readyz", out / "http-server.log") as server:
        if engine.llm is not None:
            result["repeat_vs_cold"] = _repeat_vs_cold(base, engine, cold, config, progress)
            if returning:
                result["returning_users"] = _returning_users(base, engine, returning, config, progress)
        result["levels"] = _levels(base, engine, config, server.pid, progress)
        _goodput(result["levels"])
        result["server_counters"] = {k: v for k, v in scrape(base).items() if k.startswith("corella_llm")}
    if config.peer_users and engine.llm is not None:  # each server alone on the box
        result["peer"] = peer_comparison(bundle, engine, peer, cold[0], out, config, progress)
    if config.overload_seconds and engine.llm is not None:
        result["overload"] = _overload(bundle, engine, out, config, progress)
    if config.soak_seconds and engine.llm is not None:
        result["soak"] = _soak(bundle, engine, out, config, progress)
    result["wall_seconds"] = time.perf_counter() - started
    return result
