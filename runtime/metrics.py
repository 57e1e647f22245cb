"""Prometheus metrics of a serving process: requests, routes, fallbacks by reason, the LLM scheduler.

One registry per engine (tests and the bench run several in one process). The scheduler reports
through the `SchedulerObserver` methods; queue depth and cache size are read at scrape time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from runtime.scheduling.protocol import SchedulerObserver

__all__ = ["ServingMetrics"]

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServingMetrics(SchedulerObserver):
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("corella_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry)
        self.request_seconds = Histogram("corella_http_request_seconds", "Time from a request's arrival to its "
                                         "answer", ["endpoint", "status"], registry=registry,
                                         buckets=_SECONDS)  # fmt: skip
        self.candidates = Counter("corella_candidates_total", "Candidates answered, by route", ["route"],
                                  registry=registry)  # fmt: skip
        self.fallbacks = Counter("corella_llm_fallbacks_total", "Routed candidates answered by the CRM, by reason",
                                 ["reason"], registry=registry)  # fmt: skip
        self.recalled = Counter("corella_llm_recalled_total", "Routed candidates answered by a remembered LLM "
                                "answer (counted under route llm too)", registry=registry)  # fmt: skip
        self.llm_errors = Counter("corella_llm_errors_total", "Requests whose LLM part failed", registry=registry)
        self.latency = Histogram("corella_latency_seconds", "Time per request in each path", ["path"],
                                 registry=registry, buckets=_SECONDS)  # fmt: skip
        self.reloads = Counter("corella_reloads_total", "Bundle reloads (SIGHUP, /v1/admin/reload), by outcome: "
                               "switched, unchanged, failed", ["outcome"], registry=registry)  # fmt: skip
        self.events = Counter("corella_events_total", "Interactions appended", registry=registry)
        self.items_posted = Counter("corella_items_posted_total", "Catalog items added or updated while serving",
                                    ["change"], registry=registry)  # fmt: skip
        self.events_refused = Counter("corella_events_refused_total", "Interactions refused at the live store's "
                                      "bound (507)", registry=registry)  # fmt: skip
        self.batch_tokens = Histogram("corella_llm_batch_tokens", "Tokens per llama_decode", registry=registry,
                                      buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192))  # fmt: skip
        self.batch_sequences = Histogram("corella_llm_batch_sequences", "Sequences (prefixes and candidates) "
                                         "per llama_decode", registry=registry,
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))  # fmt: skip
        self.decode_seconds = Histogram("corella_llm_decode_call_seconds", "Time per llama_decode",
                                        registry=registry, buckets=_SECONDS)  # fmt: skip
        self.job_queued = Histogram("corella_llm_queued_seconds", "Time a request's LLM work waited before its "
                                    "first batch", registry=registry, buckets=_SECONDS)  # fmt: skip
        self.job_decoding = Histogram("corella_llm_decoding_seconds", "Time from a request's first batch to its "
                                      "last answer", registry=registry, buckets=_SECONDS)  # fmt: skip
        self.prefix = Counter("corella_llm_prefix_cache_total", "Prefix cache lookups", ["result"],
                              registry=registry)  # fmt: skip
        self.dropped_work = Counter("corella_llm_dropped_candidates_total", "Routed candidates the scheduler "
                                    "dropped or answered too late", ["reason"], registry=registry)  # fmt: skip
        self._gauges: dict[str, Any] = {}
        self._children: dict[tuple[int, str], Any] = {}  # see _labeled
        self._lookups = {"hit": 0, "miss": 0}  # read by the hit-ratio gauge at scrape time
        self.watch("corella_llm_prefix_cache_hit_ratio", "Share of admitted requests whose prefix was cached",
                   self._hit_ratio)  # fmt: skip

    def _hit_ratio(self) -> float:
        hits, misses = self._lookups["hit"], self._lookups["miss"]
        return hits / (hits + misses) if hits + misses else 0.0

    def watch(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read at scrape time (queue depth, cached prefixes)."""
        from prometheus_client import Gauge

        if name not in self._gauges:
            self._gauges[name] = Gauge(name, documentation, registry=self.registry)
        self._gauges[name].set_function(read)

    # ---------------------------------------------------------------- SchedulerObserver
    def batch(self, tokens: int, sequences: int, seconds: float) -> None:
        self.batch_tokens.observe(tokens)
        self.batch_sequences.observe(sequences)
        self.decode_seconds.observe(seconds)

    def job_finished(self, queued_s: float, decoding_s: float) -> None:
        self.job_queued.observe(queued_s)
        self.job_decoding.observe(decoding_s)

    def prefix_lookup(self, hit: bool) -> None:
        result = "hit" if hit else "miss"
        self.prefix.labels(result).inc()
        self._lookups[result] += 1

    def dropped(self, reason: str, count: int) -> None:
        self.dropped_work.labels(reason).inc(count)

    # ---------------------------------------------------------------- answers
    def _labeled(self, metric: Any, label: str) -> Any:
        """`metric.labels(label)`, remembered: a request observes ~6 of them, and prometheus_client
        takes a lock and builds a key for each lookup (the same child comes back every time)."""
        key = (id(metric), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        return child

    def observe(self, answer: dict[str, Any]) -> None:
        for route, count in Counter(p["route"] for p in answer["predictions"]).items():
            self._labeled(self.candidates, route).inc(count)
        for reason, count in answer["fallbacks"].items():
            self._labeled(self.fallbacks, reason).inc(count)
        if answer.get("llm_recalled"):
            self.recalled.inc(answer["llm_recalled"])
        if answer["fallbacks"].get("llm_error"):
            self.llm_errors.inc()
        for path in ("crm", "llm", "total"):
            self._labeled(self.latency, path).observe(answer["timings_ms"][path] / 1000.0)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when never observed), for tests and the bench."""
        found = self.registry.get_sample_value(name, labels or None)
        return 0.0 if found is None else float(found)
