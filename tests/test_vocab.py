"""The LLM decoded with a cut vocabulary (runtime/vocab.py): the same answers as the whole model, a
token the cut lacks spelled and counted, the cut copy written once and kept apart from the memo
of the whole model. The tiny bundle's GGUF (real llama.cpp, q8_0) with `llm_vocab=0`: only the
tokens of its catalog's prompts, its special and one-character tokens are kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.artifacts.bundle import load_bundle
from runtime.engine import CandidateItem, Engine, EngineSettings, Request

from .tiny_llm import CORPUS


def _engine(bundle: Path, tmp_path: Path, vocab: int, **settings) -> Engine:
    options = {"providers": ("cpu",), "llm_threads": 1, "store": tmp_path / "store.sqlite",
               "state": tmp_path / "state", "llm_answer_memo": 0, "llm_vocab": vocab,
               "default_deadline_ms": None, "llm_decode_without_signal": True} | settings  # fmt: skip
    return Engine(load_bundle(bundle), EngineSettings(**options))


def _requests() -> list[Request]:
    return [Request(candidates=[CandidateItem(str(1 + (u * 7 + k) % 40)) for k in range(6)], user_id=str(u), mode="llm")
            for u in range(5)]  # fmt: skip


def _llm_scores(engine: Engine, requests: list[Request]) -> np.ndarray:
    answers = [engine.predict(r) for r in requests]
    assert all(p["route"] == "llm" for a in answers for p in a["predictions"])
    return np.array([p["llm_score"] for a in answers for p in a["predictions"]])


def _missing_word(engine: Engine) -> str:
    """A word that is one token of the whole vocabulary and not kept by the cut."""
    for word in dict.fromkeys(CORPUS.replace("\n", " ").split()):
        tokens = engine.llm.tokenize(" " + word)
        if len(tokens) == 1 and engine.vocab_cut.lookup[tokens[0]] < 0:
            return word
    pytest.fail("every word of the tokenizer's corpus is kept by the cut")


def test_a_cut_vocabulary_answers_as_the_whole_one(bundle, tmp_path):
    requests = _requests()
    whole = _engine(bundle, tmp_path, 0)
    try:
        assert whole.vocab_cut is None and whole.vocabulary()["tokens"] == whole.llm.n_vocab
        expected = _llm_scores(whole, requests)
    finally:
        whole.close()
    cut = _engine(bundle, tmp_path, 1)  # one common token: the catalog's prompts decide the rest
    try:
        vocabulary = cut.vocabulary()
        assert cut.vocab_cut is not None and vocabulary["tokens"] < vocabulary["of"] == cut.llm.n_vocab
        assert Path(vocabulary["cut_file"]).is_file() and vocabulary["spelled_tokens"] == 0
        # the same tokens through the same weights: the same answers, though every id differs
        assert np.abs(_llm_scores(cut, requests) - expected).max() <= 1e-5
        assert cut.vocabulary()["spelled_tokens"] == 0
    finally:
        cut.close()


def test_a_token_outside_the_cut_is_spelled_counted_and_answered(bundle, tmp_path):
    engine = _engine(bundle, tmp_path, 1)
    try:
        cut = engine.vocab_cut
        word = _missing_word(engine)
        token = engine.llm.tokenize(" " + word)[0]
        spelled = cut.ids([token])
        assert len(spelled) > 1 and all(0 <= t < cut.size for t in spelled)
        # spelled with kept pieces whose texts make up the missing token's text
        assert "".join(engine.llm.piece(int(cut.kept[t])) for t in spelled) == engine.llm.piece(token)
        assert cut.spelled_tokens == 1
        answer = engine.predict(Request(candidates=[CandidateItem("new", title=f"{word} {word}")], mode="llm"))
        assert answer["predictions"][0]["route"] == "llm" and 0 < answer["predictions"][0]["llm_score"] < 1
        assert engine.vocabulary()["spelled_tokens"] >= 3
    finally:
        engine.close()


def test_the_cut_copy_is_written_once_and_the_memo_follows_the_cut(bundle, tmp_path):
    requests = _requests()[:2]
    first = _engine(bundle, tmp_path, 1, llm_answer_memo=1000)
    try:
        path = first.vocab_cut.path
        written = path.stat().st_mtime_ns
        _llm_scores(first, requests)
    finally:
        first.close()  # saves the memo
    again = _engine(bundle, tmp_path, 1, llm_answer_memo=1000)
    try:
        assert again.vocab_cut.path == path and path.stat().st_mtime_ns == written  # reused, not rewritten
        assert all(a["llm_recalled"] == 6 for a in map(again.predict, requests))  # the memo read back
    finally:
        again.close()
    # the whole vocabulary's ids are other ids: the cut's memo is not read back for it
    whole = _engine(bundle, tmp_path, 0, llm_answer_memo=1000)
    try:
        assert all(a["llm_recalled"] == 0 for a in map(whole.predict, requests))
    finally:
        whole.close()
    # a copy of another cut (another catalog, another setting) goes when this one is written again
    stale = path.with_name(path.name.split(".cut-")[0] + ".cut-0123456789abcdef.gguf")
    path.rename(stale)
    rewritten = _engine(bundle, tmp_path, 1)
    try:
        assert rewritten.vocab_cut.path == path and path.is_file() and not stale.exists()
    finally:
        rewritten.close()


@pytest.mark.parametrize("llm_process", [True, False])
def test_a_damaged_copy_is_removed_and_the_whole_vocabulary_serves(bundle, tmp_path, llm_process):
    engine = _engine(bundle, tmp_path, 1, llm_process=llm_process)
    path = engine.vocab_cut.path
    engine.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut short (a full disk, a copy interrupted)
    engine = _engine(bundle, tmp_path, 1, llm_process=llm_process)
    try:
        assert engine.vocab_cut is None and engine.llm_status == "serving" and not path.exists()
        assert engine.vocabulary()["tokens"] == engine.llm.n_vocab
        assert {p["route"] for p in engine.predict(_requests()[0])["predictions"]} == {"llm"}
    finally:
        engine.close()
    again = _engine(bundle, tmp_path, 1, llm_process=llm_process)  # and written again at the next start
    try:
        assert again.vocab_cut is not None and again.vocab_cut.path == path and path.is_file()
    finally:
        again.close()


def test_a_model_cache_that_cannot_be_written_serves_the_whole_vocabulary(bundle, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").write_text("not a folder")  # the cache's folder cannot be made
    monkeypatch.setenv("CORELLA_HOME", str(home))
    engine = _engine(bundle, tmp_path, 1)
    try:
        assert engine.vocab_cut is None and engine.llm_status == "serving"
        assert {p["route"] for p in engine.predict(_requests()[0])["predictions"]} == {"llm"}
    finally:
        engine.close()
