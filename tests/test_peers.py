"""The bench's strongest peer: llama-server, built once from the installed llama-cpp-python's sdist
(kept in the user's corella cache, as the converter is), scoring a candidate with a one-token
completion of token ids; its P(Yes) readout against llama.cpp's own answer logits on the tiny GGUF."""

from __future__ import annotations

import math

import httpx
import pytest

from benchmarks.load import free_port, server_process
from benchmarks.peers import (
    PeerUnavailable,
    build_tools_missing,
    completion_body,
    llama_server,
    server_command,
    yes_probability_from,
)
from runtime.llm import LlamaModel, LlamaScorer, LlamaSettings
from runtime.sdist import SdistError

from .conftest import USER_HOME
from .tiny_llm import write_tiny_llama_gguf


def test_yes_probability_is_read_from_the_top_probabilities():
    top = [{"token": " Yes", "logprob": -0.5}, {"token": " No", "logprob": -1.5}, {"token": " maybe", "logprob": -3.0}]
    assert yes_probability_from({"completion_probabilities": [{"top_logprobs": top}]}) == pytest.approx(
        1 / (1 + math.exp(-1.0))
    )
    older = [{"tok_str": " No", "prob": 0.6}, {"tok_str": " Yes", "prob": 0.2}]  # an older server's field names
    assert yes_probability_from({"completion_probabilities": [{"probs": older}]}) == pytest.approx(0.25)
    neither = [{"token": "x", "logprob": 0.0}]
    assert yes_probability_from({"completion_probabilities": [{"top_logprobs": neither}]}) is None
    body = completion_body([1, 2, 3], 4, 9, probabilities=7)
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 1 and body["id_slot"] == 4 and body["n_probs"] == 7
    assert body["cache_prompt"] is True and body["logit_bias"] == [[9, 100.0]] and body["top_k"] == 1


@pytest.fixture(scope="module")
def server_binary():
    missing = build_tools_missing()
    if missing:
        pytest.skip(f"llama-server cannot be built here: {missing}")
    try:
        binary, _ = llama_server(home=USER_HOME)  # ~15 minutes on 2 cores the first time, then kept
    except SdistError as exc:
        pytest.skip(f"no package index answered for llama-cpp-python's sdist: {exc}")
    except PeerUnavailable as exc:
        pytest.fail(str(exc))
    return binary


def test_llama_server_scores_token_ids_as_llama_cpp_does(server_binary, tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    tokenizer = LlamaModel(gguf, 0, 0, vocab_only=True)
    try:
        yes, no = tokenizer.tokenize(" Yes")[0], tokenizer.tokenize(" No")[0]
        prompts = [[1, *tokenizer.tokenize(f"A user rated movies.\nTarget movie: Movie Number {k}\n")] for k in (3, 7)]
    finally:
        tokenizer.close()
    with LlamaScorer(gguf, yes, no, LlamaSettings(n_threads=1)) as scorer:
        expected = [scorer.score_full(p) for p in prompts]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = server_command(server_binary, gguf, port, threads=1, slots=2, context_per_slot=512)
    with server_process(command, f"{base}/health", tmp_path / "llama-server.log"):
        for slot, (prompt, want) in enumerate(zip(prompts, expected, strict=True)):
            # every token's probability: both answers are among them whatever the random model prefers
            answer = httpx.post(f"{base}/completion", json=completion_body(prompt, slot, yes, probabilities=600),
                                timeout=60).json()  # fmt: skip
            assert answer["timings"]["prompt_n"] == len(prompt)  # the ids as given, nothing re-tokenized
            assert yes_probability_from(answer) == pytest.approx(want, abs=2e-3)
            assert answer["content"] == " Yes"  # the forced answer: never half a character, whose probabilities
            # llama-server would withhold (this random model's first choice is such a byte token)
        for _ in range(5):  # the same answer each time: nothing drawn at random
            answer = httpx.post(f"{base}/completion", json=completion_body(prompts[0], 0, yes, probabilities=600),
                                timeout=60).json()  # fmt: skip
            assert yes_probability_from(answer) == pytest.approx(expected[0], abs=2e-3)
        # the same prompt again on its slot: the prompt cache leaves one token to decode
        again = httpx.post(
            f"{base}/completion", json=completion_body(prompts[1], 1, yes, probabilities=600), timeout=60
        )
        assert again.json()["timings"]["prompt_n"] <= 1
