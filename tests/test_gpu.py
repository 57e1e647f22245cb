"""The GPU box (`pytest -m gpu`, `make test-gpu`): llama.cpp offload, torch CUDA training, the CRM
through the CUDA and TensorRT providers, the server end to end. Each test is skipped, with the
reason, where its part is missing; the CPU replay of issue 12's crash conditions runs everywhere.

Tolerances that differ from the CPU tests say why beside them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from runtime.llm import LlamaScorer, LlamaSettings, gpu_offload_supported

from .conftest import REPO
from .tiny_llm import write_tiny_llama_gguf

CONDITIONS = REPO / "tests" / "llama_conditions.py"


def _llama_gpu_reason() -> str | None:
    return None if gpu_offload_supported() else "llama-cpp-python is a CPU build here (make install-gpu on a GPU box)"


def _torch_cuda_reason() -> str | None:
    from training.device import cuda_reason

    return cuda_reason()


def _provider_reason(provider: str) -> str | None:
    import onnxruntime as ort

    return None if provider in ort.get_available_providers() else f"{provider} is not in this onnxruntime build"


def _skip_unless(reason: str | None) -> None:
    if reason is not None:
        pytest.skip(reason)


def _replay(folder, *flags: str, size: tuple[int, int, int] = (640, 18, 2048), threads: int = 16) -> dict:
    """tests/llama_conditions.py as a script file in a process of its own; its JSON line."""
    hidden, layers, ffn = size
    result = subprocess.run(
        [sys.executable, str(CONDITIONS), str(folder), "--hidden", str(hidden), "--layers", str(layers),
         "--ffn", str(ffn), "--threads", str(threads), *flags],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    # -11 is SIGSEGV: the crash of issue 12
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_crash_conditions_replayed_on_the_cpu(tmp_path):
    """Issue 12's crash conditions on the CPU (the CUDA version is below): a GGUF written and
    quantized in the process that then loads it, offload checked first, as a script file; and
    torch imported first with the quantizer in a child process, as `corella export` now does."""
    in_process = _replay(tmp_path / "a", "--offload-check", "--quantize", size=(256, 6, 1024), threads=2)
    exported = _replay(tmp_path / "b", "--torch", "--subprocess-quantize", size=(256, 6, 1024), threads=2)
    assert in_process["file"] == exported["file"] == "model-q4_k_m.gguf"
    assert np.allclose(in_process["answers"], exported["answers"], atol=1e-6)  # the same file either way
    assert all(0 < p < 1 for p in in_process["answers"])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "flags",
    [(), ("--offload-check", "--quantize"), ("--torch",), ("--torch", "--quantize"),
     ("--offload-check", "--subprocess-quantize"), ("--torch", "--subprocess-quantize")],
    ids=["plain", "offload-check+quantize", "torch", "torch+quantize", "subprocess-quantize", "as-export"],
)  # fmt: skip
def test_realistic_model_written_quantized_and_scored_in_one_process(tmp_path, flags):
    """A Gemma-270M-shaped LLaMA (640 wide, 18 blocks, ~357 MB f32) under each condition of the
    crash, one process each: the failing ids say which condition crashes llama.cpp on this card."""
    _skip_unless(_llama_gpu_reason())
    answer = _replay(tmp_path, *flags)
    assert answer["gpu_layers"] > 0 and len(answer["answers"]) >= 3
    assert answer["size"] > (200 << 20 if "quantize" not in " ".join(flags) else 40 << 20)


@pytest.mark.gpu
def test_llama_offload_answers_like_the_cpu(tmp_path):
    _skip_unless(_llama_gpu_reason())
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    answers = {}
    for name, layers in (("cpu", 0), ("gpu", None)):
        with LlamaScorer(path, 10, 11, LlamaSettings(gpu_layers=layers)) as llama:
            assert (llama.gpu_layers > 0) == (name == "gpu")
            prompt = [llama.model.bos_id, *llama.tokenize("Will the user like Movie Number 7? Answer:")]
            prefix, suffixes = prompt[:6], [prompt[6:], prompt[8:], prompt[10:]]
            answers[name] = [llama.score_full(prompt), *llama.score_shared(prefix, suffixes)]
    # CUDA's matrix kernels sum in another order and keep some intermediates in f16: P(yes) moves in
    # the third decimal (1.2e-3 measured on an H200 for batched vs single sequences), not beyond
    assert np.max(np.abs(np.subtract(answers["cpu"], answers["gpu"]))) < 5e-3


@pytest.mark.gpu
def test_training_on_cuda_takes_the_cpus_step(tmp_path):
    _skip_unless(_torch_cuda_reason())
    import torch

    from runtime.prompt import ItemText, PromptTemplate
    from training.groups import pack_steps, single_groups
    from training.joint import JointConfig, run_stage
    from training.llm import LLMScorer, LoRAConfig, resolve_base_llm

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    states, losses = {}, {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)):
        torch.manual_seed(0)
        scorer = LLMScorer.load(resolve_base_llm(str(path)), PromptTemplate(), LoRAConfig(dropout=0.0), dtype=dtype,
                                device=torch.device(device))  # fmt: skip
        parts = {i: scorer.template.ids(scorer.tokenize, scorer.bos_id, [], [ItemText(f"Movie Number {i}")])
                 for i in range(8)}  # fmt: skip
        labels = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=np.int8)
        name = f"{device}-{str(dtype).removeprefix('torch.')}"
        config = JointConfig(batch_size=4, llm_learning_rate=1e-2)
        result = run_stage("llm", tmp_path / name, pack_steps(single_groups(range(8)), 4), labels, None,
                           lambda g, parts=parts: parts[g.anchor], scorer, None, None, (), config,
                           show_progress=False)  # fmt: skip
        states[name], losses[name] = scorer.trainable_state(), [r["llm"] for r in result.losses]
    # float32 on the card: TF32 matmuls are off by default in torch, sums in another order (~1e-6)
    for key, value in states["cpu-float32"].items():
        assert torch.allclose(value, states["cuda-float32"][key], atol=1e-4), key
    # bfloat16 keeps ~3 significant digits: the losses agree to ~1e-2, and training still moves them
    assert np.allclose(losses["cpu-float32"], losses["cuda-bfloat16"], atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("provider,name,tolerance", [
    # CUDA runs the CRM in float32 like the CPU; TensorRT in FP16 (export's parity bar is 1e-3)
    ("CUDAExecutionProvider", "cuda", 1e-5),
    ("TensorrtExecutionProvider", "tensorrt", 1e-3),
])  # fmt: skip
def test_crm_through_the_gpu_providers(bundle, tmp_path, provider, name, tolerance):
    _skip_unless(_provider_reason(provider))
    from runtime.artifacts.bundle import load_bundle
    from runtime.crm import CRMSession

    crm = load_bundle(bundle).crm_file
    rng = np.random.default_rng(0)
    session = CRMSession(crm, [name], engine_cache=tmp_path / "trt", batches=(1, 64, 512))
    assert session.providers[0] == provider
    session.warm_up()
    reference = CRMSession(crm, ["cpu"])
    feed = {}
    for spec in reference.session.get_inputs():
        shape = [300, *(int(d) for d in spec.shape[1:])]
        feed[spec.name] = rng.random(shape, dtype=np.float32) if "float" in spec.type else np.ones(shape, np.int64)
    assert np.max(np.abs(session.predict(feed) - reference.predict(feed))) <= tolerance


@pytest.mark.gpu
def test_server_end_to_end_with_the_llm_on_the_card(bundle):
    _skip_unless(_llama_gpu_reason())
    from fastapi.testclient import TestClient

    from runtime.serving import ServerSettings, create_app

    with TestClient(create_app(ServerSettings(bundle=bundle))) as client:
        assert client.get("/readyz").json()["ready"]
        assert client.get("/v1/model").json()["llm"]["gpu_layers"] > 0
        body = {"user_id": "7", "candidates": [{"item_id": str(i)} for i in range(1, 41)], "llm_fraction": 0.25,
                "deadline_ms": 60_000}  # fmt: skip
        answer = client.post("/v1/predict", json=body).json()
        assert [p["route"] for p in answer["predictions"]].count("llm") == 10


@pytest.mark.gpu
def test_a_cut_vocabulary_on_the_card_answers_as_the_whole_one(bundle, tmp_path):
    _skip_unless(_llama_gpu_reason())
    from .test_vocab import _engine, _llm_scores, _requests

    answers = {}
    for vocab in (0, 1):
        engine = _engine(bundle, tmp_path, vocab, llm_threads=None)
        try:
            assert (engine.vocab_cut is not None) == (vocab == 1) and engine.scheduler.gpu_layers > 0
            answers[vocab] = _llm_scores(engine, _requests())
        finally:
            engine.close()
    # the body's kernels are the same; the card may tile the narrower output projection otherwise
    assert np.abs(answers[1] - answers[0]).max() <= 1e-4
