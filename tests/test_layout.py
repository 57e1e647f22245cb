"""Q5_0 weights widened to Q8_0 blocks of the same numbers (runtime/layout.py): the same weights
byte for byte once dequantized, the same answers through real llama.cpp, and the copy the engine
decodes on the CPU. The tiny LLaMA GGUF quantized to Q5_0 by llama.cpp's own quantizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.artifacts.bundle import file_digest, load_bundle
from runtime.engine import CandidateItem, Engine, EngineSettings, Request
from runtime.layout import Q5_0, Q8_0, q5_0_as_q8_0
from runtime.llm import LlamaScorer, LlamaSettings
from runtime.vocab import copy_gguf, widenable

from .tiny_llm import quantize_q5_0, write_tiny_llama_gguf

gguf = pytest.importorskip("gguf", reason="gguf-py is a dependency of the project")


@pytest.fixture(scope="module")
def q5_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("layout")
    return quantize_q5_0(write_tiny_llama_gguf(folder / "tiny-f32.gguf"), folder / "tiny-q5_0.gguf")


def _types(path: Path) -> dict[str, int]:
    return {t.name: int(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


def test_widened_blocks_hold_the_same_weights(q5_model, tmp_path):
    reader = gguf.GGUFReader(q5_model)
    fives = [t for t in reader.tensors if int(t.tensor_type) == Q5_0]
    assert fives, "the quantizer left no Q5_0 tensor"
    for tensor in fives:
        wide = q5_0_as_q8_0(tensor.data)
        assert wide.shape[-1] == tensor.data.shape[-1] // 22 * 34
        expected = gguf.dequantize(tensor.data, gguf.GGMLQuantizationType.Q5_0)
        assert np.array_equal(gguf.dequantize(wide, gguf.GGMLQuantizationType.Q8_0), expected), tensor.name
    # every 5-bit value and both signs: a block with q = 0..31 (weights -16..15 times the scale)
    block = np.zeros(22, dtype=np.uint8)
    block[:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    q = np.arange(32)
    high = sum(int(q[j] >> 4) << j for j in range(32))
    block[2:6] = np.frombuffer(np.uint32(high).tobytes(), np.uint8)
    block[6:] = (q[:16] & 0xF) | ((q[16:] & 0xF) << 4)
    wide = q5_0_as_q8_0(block[None, :])
    assert np.array_equal(wide[0, 2:].view(np.int8), (q - 16).astype(np.int8))
    assert np.array_equal(gguf.dequantize(wide, gguf.GGMLQuantizationType.Q8_0)[0], (q - 16) * 0.5)


def test_a_widened_copy_answers_as_the_q5_0_file(q5_model, tmp_path):
    copy = tmp_path / "wide.gguf"
    widened = copy_gguf(q5_model, copy, None, widen=True)
    before, after = _types(q5_model), _types(copy)
    assert widened == sum(t == Q5_0 for t in before.values()) > 0
    assert Q5_0 not in after.values() and {n for n, t in before.items() if t == Q5_0} <= {
        n for n, t in after.items() if t == Q8_0
    }
    assert widenable(q5_model) and not widenable(copy)
    settings = LlamaSettings(n_threads=1, n_ctx=512, n_batch=256, max_sequences=8)
    prefix, suffixes = list(range(10, 60)), [list(range(70 + k, 75 + 2 * k)) for k in range(5)]
    answers = []
    for path in (q5_model, copy):
        with LlamaScorer(path, 5, 6, settings) as scorer:
            answers.append(np.append(scorer.score_shared(prefix, suffixes), scorer.score_full(prefix + suffixes[0])))
    assert np.all((answers[0] > 0) & (answers[0] < 1))
    assert np.abs(answers[0] - answers[1]).max() <= 1e-6  # the same integer sums, the same scales


def _q5_bundle(bundle: Path, tmp_path: Path) -> Path:
    """A copy of the tiny bundle whose GGUF is quantized to Q5_0 (its manifest says so)."""
    folder = shutil.copytree(bundle, tmp_path / "bundle-q5")
    manifest = json.loads((folder / "manifest.json").read_text())
    name = manifest["llm"]["file"]
    source = tmp_path / "source.gguf"
    (folder / name).rename(source)
    quantize_q5_0(source, folder / name)
    manifest["files"][name] = {"sha256": file_digest(folder / name), "size": (folder / name).stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


@pytest.mark.parametrize("vocab", [0, 1])
def test_the_engine_decodes_the_widened_copy_on_the_cpu_with_the_same_answers(bundle, tmp_path, vocab):
    folder = _q5_bundle(bundle, tmp_path)
    requests = [Request(candidates=[CandidateItem(str(1 + (u * 5 + k) % 40)) for k in range(4)], user_id=str(u),
                        mode="llm") for u in range(3)]  # fmt: skip
    scores, files = [], []
    for widen in (False, True):
        settings = EngineSettings(providers=("cpu",), llm_threads=1, store=tmp_path / f"store-{widen}.sqlite",
                                  state=tmp_path / f"state-{widen}", llm_answer_memo=0, llm_vocab=vocab,
                                  llm_widen=widen, llm_gpu_layers=0, default_deadline_ms=None,
                                  llm_decode_without_signal=True)  # fmt: skip
        engine = Engine(load_bundle(folder), settings)
        try:
            answers = [engine.predict(r) for r in requests]
            assert all(p["route"] == "llm" for a in answers for p in a["predictions"])
            scores.append(np.array([p["llm_score"] for a in answers for p in a["predictions"]]))
            files.append(Path(engine.vocabulary()["decoded_file"]))
        finally:
            engine.close()
    plain, wide = files
    assert (plain == folder / load_bundle(folder).llm["file"]) == (vocab == 0)
    assert wide != plain and wide.is_file() and Q5_0 not in _types(wide).values()
    assert np.abs(scores[0] - scores[1]).max() <= 1e-5
