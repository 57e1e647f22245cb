"""The figures issue 12 asks of a GPU box, each on the card and on the CPU of the same box.

  python -m benchmarks.gpu_figures OUT [--crm crm.onnx] [--hidden 640 --layers 18]

1. llama.cpp, a Gemma-270M-shaped LLaMA GGUF written here (random weights, q4_k_m): ms per routed
   candidate scored alone (a 230-token prompt) vs with the prefix cached and the suffixes batched,
   for 10 and 100 candidates; offloaded (all layers) and on the CPU (0 layers).
2. The CRM (a bundle's crm.onnx) at batch 1 and 1,024 through every execution provider offered.
3. The LLM part of a stage-2 step (LoRA forward + backward, 4 prompts of ~230 tokens) on the CPU
   (float32) and on CUDA (bfloat16), where torch sees a card.

Writes OUT/gpu_figures.json and prints it. Every part says why it was skipped where it was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _ms(function: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of `repeats` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def write_model(folder: Path, hidden: int, layers: int, ffn: int) -> Path:
    sys.path.insert(0, str(REPO))
    from export.llm import quantize_gguf
    from tests.tiny_llm import write_tiny_llama_gguf

    folder.mkdir(parents=True, exist_ok=True)
    f32 = write_tiny_llama_gguf(folder / "shaped-f32.gguf", hidden=hidden, layers=layers, heads=4, kv_heads=4,
                                ffn=ffn, context=2048)  # fmt: skip
    quantize_gguf(f32, folder / "shaped-q4_k_m.gguf", "q4_k_m", threads=os.cpu_count())
    return folder / "shaped-q4_k_m.gguf"


def llama_figures(path: Path, repeats: int) -> dict[str, Any]:
    from runtime.llm import LlamaScorer, LlamaSettings, gpu_offload_supported

    rng = np.random.default_rng(0)
    prefix = rng.integers(10, 400, size=190).tolist()
    suffixes = [rng.integers(10, 400, size=40).tolist() for _ in range(100)]
    out: dict[str, Any] = {"model": path.name, "prompt_tokens": 230}
    devices = [("cpu", 0)] + ([("gpu", None)] if gpu_offload_supported() else [])
    if len(devices) == 1:
        out["gpu"] = "skipped: llama-cpp-python is a CPU build"
    for name, layers in devices:
        settings = LlamaSettings(n_ctx=8192, n_batch=2048, max_sequences=101, gpu_layers=layers)
        with LlamaScorer(path, 10, 11, settings) as llama:
            full = _ms(lambda llama=llama: llama.score_full(prefix + suffixes[0]), repeats)
            ten = _ms(lambda llama=llama: llama.score_shared(prefix, suffixes[:10]), repeats)
            hundred = _ms(lambda llama=llama: llama.score_shared(prefix, suffixes), max(1, repeats // 3))
            out[name] = {"gpu_layers": llama.gpu_layers, "full_prompt_ms": full,
                         "cached_batched_10_ms": ten, "per_candidate_10_ms": ten / 10,
                         "cached_batched_100_ms": hundred, "per_candidate_100_ms": hundred / 100}  # fmt: skip
    return out


def crm_figures(crm: Path, repeats: int) -> dict[str, Any]:
    import onnxruntime as ort

    from runtime.crm import PROVIDERS, CRMSession

    offered = set(ort.get_available_providers())
    out: dict[str, Any] = {"model": str(crm)}
    for name, (provider, _) in PROVIDERS.items():
        if provider not in offered:
            out[name] = f"skipped: {provider} is not in this onnxruntime build"
            continue
        session = CRMSession(crm, [name], engine_cache=Path("/tmp/corella-trt"), batches=(1, 100, 1024))
        out[name] = {"provider": session.providers[0], "warmup": session.warm_up()}
        for batch in (1, 1024):
            feed = session.zeros(batch)
            out[name][f"batch_{batch}_ms"] = _ms(lambda s=session, f=feed: s.session.run(None, f), repeats * 10)
    return out


def training_figures(f32_gguf: Path, repeats: int) -> dict[str, Any]:
    try:
        import torch

        from runtime.prompt import PromptTemplate
        from training.device import cuda_reason
        from training.llm import LLMScorer, LoRAConfig, resolve_base_llm
    except ImportError as exc:
        return {"skipped": f"training is not installed ({exc})"}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 400, size=230).tolist() for _ in range(4)]
    out: dict[str, Any] = {"batch": 4, "prompt_tokens": 230}
    devices = [("cpu", torch.float32)]
    if cuda_reason() is None:
        devices.append(("cuda", torch.bfloat16))
    else:
        out["cuda"] = f"skipped: {cuda_reason()}"
    for device, dtype in devices:
        scorer = LLMScorer.load(resolve_base_llm(str(f32_gguf)), PromptTemplate(), LoRAConfig(), dtype=dtype,
                                device=torch.device(device))  # fmt: skip
        scorer.train()
        batch = scorer.collate(prompts)
        target = torch.ones(4, device=scorer.device)

        def step(scorer=scorer, batch=batch, target=target) -> None:
            logit, _ = scorer(**batch)
            torch.nn.functional.binary_cross_entropy_with_logits(logit, target).backward()
            if scorer.device.type == "cuda":
                torch.cuda.synchronize()

        out[device] = {"dtype": str(dtype).removeprefix("torch."), "llm_step_ms": _ms(step, repeats)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--crm", type=Path, help="a bundle's crm.onnx")
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    figures: dict[str, Any] = {"hidden": args.hidden, "layers": args.layers}
    started = time.perf_counter()
    model = write_model(args.out / "model", args.hidden, args.layers, args.ffn)
    figures["model_seconds"] = time.perf_counter() - started
    figures["llama"] = llama_figures(model, args.repeats)
    figures["crm"] = crm_figures(args.crm, args.repeats) if args.crm else "skipped: no --crm"
    figures["training"] = training_figures(args.out / "model" / "shaped-f32.gguf", max(3, args.repeats // 3))
    for name in ("shaped-f32.gguf", "shaped-q4_k_m.gguf"):
        (args.out / "model" / name).unlink(missing_ok=True)  # hundreds of MB: never sent back
    (args.out / "gpu_figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
