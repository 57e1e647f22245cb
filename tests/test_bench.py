"""The bench's statistics on known inputs, and every suite for a few iterations on tiny models."""

import json

import numpy as np
import pytest

from benchmarks.report import run_bench
from benchmarks.stats import latency_summary, percentile
from benchmarks.suites import BenchConfig
from runtime.errors import ConfigError

from .tiny_llm import quantize_q5_0


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
    # a second GGUF for the llm suite, in Q5_0: measured as it is and as the CPU server decodes it
    q5_0 = quantize_q5_0(bundle / "llm-q8_0.gguf", tmp_path / "llm-q5_0.gguf")
    config = BenchConfig(
        crm_batches=(1, 32), crm_iterations=10, llm_requests=2, llm_candidates=4, quality_samples=60,
        hybrid_requests=2, hybrid_candidates=10, http_concurrency=(1, 4), http_seconds=2, http_candidates=5,
        http_fraction=0.4, cold_users=2, returning_users=3, peer_users=2, peers=("llama-cpp-python",), peer_rounds=2,
        overload_concurrency=16, overload_seconds=2, overload_queue=4, soak_seconds=2, soak_candidates=5,
        soak_concurrency=(1, 4), ggufs=[q5_0],
    )  # fmt: skip
    results = run_bench(bundle, out, config)
    suites = results["suites"]
    assert set(suites) == {"crm", "llm", "hybrid", "http"}
    assert {"onnxruntime-cpu", "pytorch-eager"} <= set(suites["crm"]["backends"])
    assert suites["crm"]["backends"]["onnxruntime-cpu"]["32"]["calls"] >= 3
    models = suites["llm"]["models"]
    model = models["q8_0"]
    assert model["max_abs_dp_full_vs_batched"] < 1e-3  # the cache changes speed, not answers
    # the q8_0 bundle has nothing to widen; the Q5_0 file is measured widened too, with its answers
    assert set(models) == {"q8_0", "q5_0", "q5_0 widened"} and ".whole8-" in models["q5_0 widened"]["file"]
    assert models["q5_0 widened"]["routed_auc"] == pytest.approx(models["q5_0"]["routed_auc"], abs=1e-9)
    assert model["cache_speedup"] > 0
    fractions = [q["fraction"] for q in suites["hybrid"]["quality"]]
    assert fractions == [0.0, 0.05, 0.1, 0.2, 1.0]
    assert suites["hybrid"]["quality"][0]["routed"] == 0 and suites["hybrid"]["quality"][-1]["routed"] == 60
    latency = {row["fraction"]: row for row in suites["hybrid"]["latency"]}
    # each timed pass decodes all its routed candidates (2 requests x 10 at f = 1): none is answered
    # from the memo of an earlier pass, warm or cold
    assert latency[1.0]["llm_decoded"] == latency[1.0]["cold_llm_decoded"] == 20 and latency[0.0]["llm_decoded"] == 0
    http = suites["http"]
    assert [level["concurrency"] for level in http["levels"]] == [1, 4]
    assert all(level["server_errors"] == 0 and level["requests"] > 0 for level in http["levels"])
    assert http["levels"][0]["llm_answers"] > 0  # 5 candidates at f = 0.4: two routed a request
    for level in http["levels"]:  # the same work counted on both sides of the process boundary
        assert level["candidates_per_second"] == pytest.approx(5 * level["statuses"]["200"] / level["seconds"])
        assert level["llm_tokens_per_second"] > 0 and 0 < level["llm_cpu_share"] <= 1 and level["front_cpu_share"] > 0
    repeat = http["repeat_vs_cold"]
    assert repeat["users"] == 2 and repeat["cold_llm_ms"] > 0
    # the same request again: both users' 2 routed candidates each come from the answer memo
    assert repeat["recalled_of_routed"]["cold"] == [0, 4] and repeat["recalled_of_routed"]["same_request"] == [4, 4]
    back = http["returning_users"]  # three new users, then the same three: every prefix found again
    assert back["first"]["prefix_hits"] == 0 and back["second"]["prefix_hits"] == 3 == back["second"]["requests"]
    saved = json.loads((out / "results.json").read_text())
    _check_peers(http["peer"], saved["headline"])
    assert http["overload"]["requests"] > 0 and http["overload"]["server_errors"] == 0
    assert set(http["overload"]["statuses"]) <= {"200", "429"}
    soak = http["soak"]["levels"]
    assert [level["concurrency"] for level in soak] == [1, 4] and soak[0]["llm_goodput_vs_unloaded"] == 1.0
    assert soak[0]["llm_decoded_vs_unloaded"] == 1.0 and soak[0]["llm_tokens_per_second"] > 0
    assert all(level["server_errors"] == 0 and level["requests"] > 0 for level in soak)
    assert saved["machine"]["cores"] >= 1 and "cached_batched_vs_full_prompt" in saved["headline"]
    assert "llm_goodput_c32_vs_unloaded" not in saved["headline"] and "overload_healthz_p99_ms" in saved["headline"]
    assert saved["headline"]["repeat_user_new_candidates_llm_part_vs_cold"]["how"] == "prefix cache"
    for name in ("results.md", "auc_vs_fraction.png", "latency_vs_fraction.png", "latency_cdf.png"):
        assert (out / name).exists(), name
    assert (out / "store.sqlite").exists()  # the bench's own copy of the store, not the bundle's
    with pytest.raises(ConfigError, match="unknown suites"):
        run_bench(bundle, out, BenchConfig(suites=("gpu-magic",)))


def _check_peers(peer: dict, headline: dict) -> None:
    """The same 2 users x 10 candidates on every server of the tiny run, and llama.cpp alone."""
    assert [(r["server"], r["clients"], r["candidates"]) for r in peer["rows"]] == [
        ("corella", 8, 20),
        ("corella --llm-vocab 0", 8, 20),
        ("llama.cpp alone", 1, 20),  # the tiny q8_0 GGUF: nothing to cut or widen, no copy of corella's
        ("llama-cpp-python", 1, 20),
        ("llama-cpp-python", 8, 20),
    ]
    assert peer["rows"][0]["tokens_per_candidate"] > 0 and peer["rows"][0]["corella_over_this"] == 1.0
    alone = peer["rows"][2]  # every candidate answered, each user's prefix decoded once
    assert alone["errors"] == 0 and alone["tokens_per_candidate"] > 0
    assert "llama_cpp_alone_over_llama_server" not in headline  # no llama-server in this run: no ratio to it
    assert headline["corella_share_of_llama_cpp_alone"]["value"] > 0
    assert all(len(r["rounds"]) == 2 and round(r["per_second"], 2) in r["rounds"] for r in peer["rows"])


def test_a_bench_folder_of_an_earlier_bundle_is_benched_afresh(bundle, tmp_path):
    """Its scratch stores are made anew from the bundle's snapshot (quickstart re-benches into the
    same folder after a retrain; the old stores belonged to the old bundle)."""
    out = tmp_path / "bench"
    for old in (out / "store.sqlite", out / "http-state" / "store.sqlite"):
        old.parent.mkdir(parents=True, exist_ok=True)
        old.write_bytes(b"an older corella's store, not this bundle's")
    results = run_bench(bundle, out, BenchConfig(suites=("crm",), crm_batches=(1,), crm_iterations=10,
                                                 quality_samples=20))  # fmt: skip
    assert "onnxruntime-cpu" in results["suites"]["crm"]["backends"]
    assert not (out / "http-state" / "store.sqlite").exists()  # no http suite: nothing made there
