"""The four suites of `corella bench`: crm, llm, hybrid, http. Every figure is measured in the run."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import TestSample, random_requests, test_samples
from benchmarks.stats import latency_summary, time_calls
from runtime.artifacts.bundle import Bundle
from runtime.artifacts.state import state_dir
from runtime.crm import PROVIDERS, CRMSession
from runtime.engine import Engine, Request
from runtime.errors import OverloadedError
from runtime.llm import LlamaScorer, LlamaSettings, LLMError
from runtime.quality import auc, summarize
from runtime.router import binary_entropy, route_by_budget
from runtime.scheduling import ItemState

__all__ = ["BenchConfig", "machine_info", "crm_suite", "llm_suite", "hybrid_suite", "SUITES"]

log = logging.getLogger(__name__)
SUITES = ("crm", "llm", "hybrid", "http")


@dataclass
class BenchConfig:
    suites: tuple[str, ...] = SUITES
    crm_batches: tuple[int, ...] = (1, 32, 256, 1024)
    crm_iterations: int = 200
    llm_requests: int = 4
    llm_candidates: int = 16
    ggufs: list[Path] = field(default_factory=list)
    quality_samples: int = 500
    fractions: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 1.0)
    # the routed candidates' suffixes vary in length from request to request: 8 requests put f = 0.1 at
    # 12.2% of LLM-only and 24 at 11.4% on the same bundle (5 min 40 s for the suite, 4 min 23 s)
    hybrid_requests: int = 24
    hybrid_candidates: int = 100
    http_concurrency: tuple[int, ...] = (1, 8, 32, 64)
    http_seconds: float = 30.0  # per concurrency level
    http_candidates: int = 100
    http_fraction: float = 0.1
    http_deadline_ms: float = 2000.0
    http_repeat_share: float = 0.7  # of requests from users seen in the last minute
    cold_users: int = 8  # repeat vs cold user (each: a new request, the same again, another)
    returning_users: int = 40  # each asks twice, the round between: more prefixes than the KV cache holds (0: skip)
    peer_users: int = 16  # cold users for the peer comparison (0: skip it), the same on every server
    peer_candidates: int = 10  # a user's candidates there
    peer_concurrency: int = 8
    peer_rounds: int = 3  # the servers take turns this many times; each row is a server's median round
    peers: tuple[str, ...] = ("llama-server", "llama-cpp-python")  # measured beside corella
    overload_concurrency: int = 256
    overload_seconds: float = 20.0  # 0: skip the overload run
    overload_queue: int = 32  # the overloaded server's LLM queue, in candidates
    # the soak: random users, 20 candidates at the bundle's threshold; 1 client for half the
    # time, then each loaded level for the whole of it (0: skip it)
    soak_seconds: float = 60.0
    soak_candidates: int = 20
    soak_concurrency: tuple[int, ...] = (1, 32, 64)
    out: Path | None = None
    threads: int | None = None
    seed: int = 0
    store_path: Path | None = None


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return float("nan")


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("onnxruntime", "onnxruntime-gpu", "llama_cpp_python", "numpy", "fastapi", "uvicorn", "torch"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    gpu = None
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=5)  # fmt: skip
        gpu = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        gpu = None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions}  # fmt: skip


# ---------------------------------------------------------------------------- inputs
def _encode_samples(engine: Engine, samples: list[TestSample]) -> dict[str, np.ndarray]:
    parts = [engine.prepare(s.request()).inputs for s in samples]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _tile(inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    reps = -(-rows // len(inputs["categorical"]))
    return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:rows]) for k, v in inputs.items()}


# ---------------------------------------------------------------------------- crm
def crm_suite(bundle: Bundle, engine: Engine, samples: list[TestSample], config: BenchConfig,
              progress: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    import onnxruntime as ort

    base = _encode_samples(engine, samples[:256])
    threads = config.threads or min(4, os.cpu_count() or 1)
    results: dict[str, Any] = {"threads": threads, "backends": {}}
    available = set(ort.get_available_providers())
    runners: dict[str, Callable[[dict[str, np.ndarray]], object]] = {}
    for name, (provider, _) in PROVIDERS.items():
        if provider in available:
            session = CRMSession(bundle.crm_file, [name], threads, engine_cache=state_dir(bundle) / "trt_cache")
            runners[f"onnxruntime-{name}"] = lambda x, s=session: s.predict(x, batch_size=1 << 20)
    eager = _torch_eager(bundle, threads)
    if isinstance(eager, str):
        results["pytorch_eager"] = {"skipped": eager}
    else:
        runners["pytorch-eager"] = eager
    for name, run in runners.items():
        rows = {}
        for batch in config.crm_batches:
            x = _tile(base, batch)
            iterations = max(10, config.crm_iterations // max(1, batch // 32))
            times = time_calls(lambda run=run, x=x: run(x), iterations, warmup=3, budget_s=20)
            rows[str(batch)] = latency_summary(times, items_per_call=batch)
        results["backends"][name] = rows
        progress(f"crm {name}: batch 1 p50 {rows['1']['p50_ms']:.3f} ms")
    if "pytorch-eager" in results["backends"] and "onnxruntime-cpu" in results["backends"]:
        results["eager_over_ort_cpu_p50_batch1"] = (
            results["backends"]["pytorch-eager"]["1"]["p50_ms"] / results["backends"]["onnxruntime-cpu"]["1"]["p50_ms"]
        )
    return results


def _torch_eager(bundle: Bundle, threads: int) -> Callable[[dict[str, np.ndarray]], object] | str:
    """The PyTorch-eager baseline, from the run the bundle was exported from (needs corella[train])."""
    try:
        import torch

        from training.crm_trainer import load_crm
    except ImportError:
        return "PyTorch is not installed (the train extra)"
    run = Path(bundle.manifest.get("source_run", ""))
    folder = run / "final" / "crm" if (run / "final" / "crm").exists() else run / "crm"
    if not (folder / "model.safetensors").exists():
        return f"the source run {run} is not on this machine"
    torch.set_num_threads(threads)
    model, _ = load_crm(folder)

    def call(x: dict[str, np.ndarray]) -> object:
        with torch.inference_mode():
            return torch.sigmoid(model(**{k: torch.from_numpy(v) for k, v in x.items()})).numpy()

    return call


# ---------------------------------------------------------------------------- llm
def _prompts(engine: Engine, request: Any) -> tuple[list[int], list[list[int]]]:
    prepared = engine.prepare(request)
    return engine.prompt_ids(prepared.history, prepared.items)


def _quant_name(path: Path) -> str:
    stem = path.stem
    return stem.split("llm-", 1)[1] if stem.startswith("llm-") else stem


def llm_suite(bundle: Bundle, engine: Engine, samples: list[TestSample], config: BenchConfig,
              progress: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    if engine.llm is None:
        return {"skipped": "the bundle has no LLM, or it did not load"}
    requests = random_requests(engine.store, config.llm_requests, config.llm_candidates, seed=config.seed)
    prompts = [_prompts(engine, request) for request in requests]
    # routed test samples: the most uncertain 10% of the quality samples by CRM entropy
    entropy = binary_entropy(engine.crm.predict(_encode_samples(engine, samples)))
    routed = [samples[i] for i in np.flatnonzero(route_by_budget(entropy, 0.1))]
    routed_prompts = [_prompts(engine, s.request()) for s in routed]
    labels = np.array([s.label for s in routed])
    paths = {_quant_name(bundle.llm_file): bundle.llm_file}
    for extra in map(Path, config.ggufs):
        paths.setdefault(_quant_name(extra), extra)  # the shipped model is measured once, from the bundle
    if engine.served.widens:  # as serving decodes them here
        paths |= _widened_copies(paths, bundle)
    settings = LlamaSettings(n_ctx=engine.settings.llm_context, n_threads=config.threads)
    results: dict[str, Any] = {"requests": len(requests), "candidates": sum(len(s) for _, s in prompts),
                               "routed_test_samples": len(routed), "models": {}}  # fmt: skip
    for name, path in paths.items():
        before = _rss_mb()
        with LlamaScorer(path, bundle.llm["yes_token_id"], bundle.llm["no_token_id"], settings) as scorer:
            row = results["models"][name] = _measure_llm(scorer, path, prompts, routed_prompts, labels)
            row["rss_increase_mb"] = row.pop("rss_mb") - before
        progress(f"llm {name}: full {row['full_prompt_ms_per_candidate']:.1f} ms/candidate, cached+batched "
                 f"{row['cached_batched_ms_per_candidate']:.1f} ms ({row['cache_speedup']:.1f}x)")  # fmt: skip
    results["reference"] = _against_reference(results["models"])
    return results


Prompts = list[tuple[list[int], list[list[int]]]]  # (prefix, suffixes) per request


def _widened_copies(paths: dict[str, Path], bundle: Bundle) -> dict[str, Path]:
    """ "NAME widened": each file with Q5_0 weights as the CPU server decodes it (runtime/layout.py),
    the whole vocabulary kept; written once to the model cache."""
    from runtime.artifacts.bundle import file_digest
    from runtime.paths import model_cache
    from runtime.vocab import serving_copy, widenable

    copies = {}
    for name, path in paths.items():
        if widenable(path):
            digest = bundle.manifest["files"][path.name]["sha256"] if path == bundle.llm_file else file_digest(path)
            copies[f"{name} widened"] = serving_copy(path, digest, model_cache() / "cuts", None, widen=True)
    return copies


def _measure_llm(scorer: LlamaScorer, path: Path, prompts: Prompts, routed_prompts: Prompts,
                 labels: np.ndarray) -> dict[str, Any]:  # fmt: skip
    """One GGUF: each candidate's whole prompt, then prefix cached one by one, then cached and
    batched; its answers to the routed test samples."""
    candidates = sum(len(s) for _, s in prompts)
    row: dict[str, Any] = {"file": str(path), "size_mb": path.stat().st_size / 1e6,
                           "rss_mb": _rss_mb(), "gpu_layers": scorer.gpu_layers}  # fmt: skip
    started = time.perf_counter()
    full = [scorer.score_full(p + s) for p, suffixes in prompts for s in suffixes]
    full_s = time.perf_counter() - started
    tokens = sum(len(p) + len(s) for p, suffixes in prompts for s in suffixes)
    started = time.perf_counter()
    for p, suffixes in prompts:
        scorer.score_shared(p, suffixes, max_chunk=1)
    cached_s = time.perf_counter() - started
    started = time.perf_counter()
    batched = np.concatenate([scorer.score_shared(p, suffixes) for p, suffixes in prompts])
    batched_s = time.perf_counter() - started
    routed_p = np.array([scorer.score_shared(p, s)[0] for p, s in routed_prompts])
    return row | {
        "full_prompt_ms_per_candidate": 1000 * full_s / candidates,
        "cached_prefix_ms_per_candidate": 1000 * cached_s / candidates,
        "cached_batched_ms_per_candidate": 1000 * batched_s / candidates,
        "prompt_tokens_per_second": tokens / full_s,
        "cache_speedup": full_s / batched_s,
        "max_abs_dp_full_vs_batched": float(np.abs(np.array(full) - batched).max()),
        "routed_auc": auc(labels, routed_p),
        "_p": batched,
        "_routed_p": routed_p,
    }


def _against_reference(models: dict[str, dict[str, Any]]) -> str | None:
    """Each quantization against F16 (or F32) where one was measured: answers, routed AUC, speed."""
    reference = next((n for n in ("f16", "f32") if n in models), None)
    for name, row in models.items():
        if reference and name != reference:
            ref = models[reference]
            row[f"mean_abs_dp_vs_{reference}"] = float(np.abs(row["_p"] - ref["_p"]).mean())
            row[f"routed_auc_minus_{reference}"] = row["routed_auc"] - ref["routed_auc"]
            speed = ref["cached_batched_ms_per_candidate"] / row["cached_batched_ms_per_candidate"]
            row[f"speedup_vs_{reference}"] = speed
    for row in models.values():
        row.pop("_p")
        row.pop("_routed_p")
    return reference


# ---------------------------------------------------------------------------- hybrid
def hybrid_suite(bundle: Bundle, engine: Engine, samples: list[TestSample], config: BenchConfig,
                 progress: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    labels = np.array([s.label for s in samples])
    crm_p = engine.crm.predict(_encode_samples(engine, samples))
    entropy = binary_entropy(crm_p)
    llm_p = np.full(len(samples), np.nan)
    needed = route_by_budget(entropy, max(config.fractions)) if engine.llm is not None else np.zeros(len(samples), bool)
    indices = np.flatnonzero(needed)
    if len(indices):
        answers = score_many(engine, [_prompts(engine, samples[i].request()) for i in indices])
        llm_p[indices] = [p[0] for p in answers]
    quality, latency = [], []
    requests = random_requests(engine.store, config.hybrid_requests, config.hybrid_candidates, seed=config.seed + 1)
    if engine.scheduler is not None:  # every user's prefix cached before the first timed pass, as for the others
        _time_requests(engine, requests, min((f for f in config.fractions if f > 0), default=0.0))
    for fraction in config.fractions:
        if engine.llm is None and fraction > 0:
            continue
        routed = route_by_budget(entropy, fraction)
        mixed = np.where(routed, engine.calibration.apply(llm_p), crm_p)
        quality.append({"fraction": fraction, "routed": int(routed.sum()), **summarize(labels, mixed)})
        seconds, decoded = _time_requests(engine, requests, fraction)
        latency.append({"fraction": fraction, "llm_decoded": decoded, **latency_summary(seconds)})
        if fraction in (0.1, 1.0) and engine.scheduler is not None:  # and with no prefix cached
            seconds, decoded = _time_requests(engine, requests, fraction, cold=True)
            latency[-1] |= {"cold_mean_ms": latency_summary(seconds)["mean_ms"], "cold_llm_decoded": decoded}
        progress(f"hybrid f={fraction:g}: AUC {quality[-1]['auc']:.4f}, {config.hybrid_candidates}-candidate "
                 f"request mean {latency[-1]['mean_ms']:.0f} ms")  # fmt: skip
    result: dict[str, Any] = {"samples": len(samples), "quality": quality, "latency": latency,
                              "candidates_per_request": config.hybrid_candidates}  # fmt: skip
    by_fraction = {row["fraction"]: row for row in latency}
    if 0.1 in by_fraction and 1.0 in by_fraction:
        hybrid, llm_only = by_fraction[0.1], by_fraction[1.0]
        result["hybrid_0.1_over_llm_only_mean_latency"] = hybrid["mean_ms"] / llm_only["mean_ms"]
        if "cold_mean_ms" in hybrid:
            result["hybrid_0.1_over_llm_only_mean_latency_cold"] = hybrid["cold_mean_ms"] / llm_only["cold_mean_ms"]
    return result


def _time_requests(engine: Engine, requests: list[Request], fraction: float,
                   cold: bool = False) -> tuple[list[float], int]:  # fmt: skip
    """Seconds per request, one at a time, no deadline, and the routed candidates the LLM decoded.
    No answer is remembered from an earlier pass (the memo would answer a fraction's candidates
    that a smaller fraction's pass decoded, and every candidate of a cold pass); `cold`: the
    user's cached prefix is dropped too."""
    times, decoded = [], 0
    for request in requests:
        request.llm_fraction, request.deadline_ms = fraction, None
        engine.forget_answers()
        if cold:
            engine.scheduler.invalidate_user(request.user_id)
        started = time.perf_counter()
        answer = engine.predict(request)
        times.append(time.perf_counter() - started)
        decoded += sum(p["route"] == "llm" for p in answer["predictions"]) - answer["llm_recalled"]
    return times, decoded


def quality_samples(engine: Engine, config: BenchConfig) -> list[TestSample]:
    return test_samples(engine.store, engine.spec.history_length, engine.spec.like_threshold,
                        config.quality_samples, seed=config.seed)  # fmt: skip


def score_many(engine: Engine, prompts: list[tuple[list[int], list[list[int]]]], wave: int = 64) -> list[np.ndarray]:
    """P(yes) of each prefix + each of its suffixes through the engine's scheduler, with no deadline:
    queued in waves and decoded together (the LLM's own work, for timing and quality figures)."""
    served = engine.served
    if served.scheduler is None:
        raise LLMError(served.failure or "no LLM is loaded")
    scheduler = served.scheduler
    out: list[np.ndarray] = []
    for start in range(0, len(prompts), wave):
        jobs = []
        for prefix, suffixes in prompts[start : start + wave]:
            job = scheduler.submit(*served.shift_head(prefix, suffixes), None).job
            if job is None or job.size < len(suffixes):
                raise OverloadedError("the LLM queue is full", scheduler.retry_after())
            jobs.append(job)
        for job in jobs:
            job.wait()  # bounded: a scheduler that stops fails its jobs at once
            p, state = scheduler.collect(job)
            if (state != ItemState.DONE).any():
                raise LLMError(job.error or "the LLM did not answer every prompt")
            out.append(p)
    return out
