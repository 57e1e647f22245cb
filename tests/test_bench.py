"""The bench's statistics on known inputs, and every suite for a few iterations on tiny models."""

import json

import numpy as np
import pytest

from benchmarks.report import run_bench
from benchmarks.stats import latency_summary, percentile
from benchmarks.suites import BenchConfig
from runtime.errors import ConfigError


def test_percentiles_on_known_inputs():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 95) == 3.0
    assert np.isnan(percentile([], 50))
    summary = latency_summary([0.001, 0.002, 0.003, 0.004], items_per_call=10)
    assert summary["p50_ms"] == pytest.approx(2.5) and summary["mean_ms"] == pytest.approx(2.5)
    assert summary["per_second"] == pytest.approx(40 / 0.01)


def test_all_suites_on_tiny_models(bundle, tmp_path):
    out = tmp_path / "bench"
    config = BenchConfig(
        crm_batches=(1, 32), crm_iterations=10, llm_requests=2, llm_candidates=4, quality_samples=60,
        hybrid_requests=2, hybrid_candidates=10, http_concurrency=(1, 4), http_requests=8, http_candidates=5,
        ggufs=[],
    )  # fmt: skip
    results = run_bench(bundle, out, config)
    suites = results["suites"]
    assert set(suites) == {"crm", "llm", "hybrid", "http"}
    assert {"onnxruntime-cpu", "pytorch-eager"} <= set(suites["crm"]["backends"])
    assert suites["crm"]["backends"]["onnxruntime-cpu"]["32"]["calls"] >= 3
    model = suites["llm"]["models"]["q8_0"]
    assert model["max_abs_dp_full_vs_batched"] < 1e-3  # the cache changes speed, not answers
    assert model["cache_speedup"] > 0
    fractions = [q["fraction"] for q in suites["hybrid"]["quality"]]
    assert fractions == [0.0, 0.05, 0.1, 0.2, 1.0]
    assert suites["hybrid"]["quality"][0]["routed"] == 0 and suites["hybrid"]["quality"][-1]["routed"] == 60
    assert all(level["errors"] == 0 and level["requests"] == 8 for level in suites["http"]["levels"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["machine"]["cores"] >= 1 and "cached_batched_vs_full_prompt" in saved["headline"]
    for name in ("results.md", "auc_vs_fraction.png", "latency_vs_fraction.png", "latency_cdf.png"):
        assert (out / name).exists(), name
    assert (out / "store.sqlite").exists()  # the bench's own copy of the store, not the bundle's
    with pytest.raises(ConfigError, match="unknown suites"):
        run_bench(bundle, out, BenchConfig(suites=("gpu-magic",)))
