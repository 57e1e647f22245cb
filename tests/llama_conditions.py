"""Load and score a GGUF under the conditions of issue 12's segmentation fault, as a script file.

A script that wrote a Gemma-270M-shaped LLaMA GGUF with gguf-py, quantized it with
llama_model_quantize (16 threads) and built runtime.llm.LlamaScorer on it crashed inside
llama_model_load_from_file on an H200, 5 runs of 5; the same file loaded in short separate
processes. Each condition is a flag, so that a run per flag tells which one matters:

  --offload-check   gpu_offload_supported() before anything else (the crashing script did)
  --quantize        quantize in this process (4 of the 5 crashes did)
  --torch           import torch and touch CUDA first (its CUDA libraries, loaded RTLD_GLOBAL,
                    beside llama.cpp's own: what `corella export` does on a GPU box)
  --subprocess-quantize  quantize as export does now: in a child process

The GGUF is always written in this process with gguf-py. Prints one JSON line: the answers and
how many layers were offloaded. Exit status -11 (SIGSEGV) is the bug.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, run as a script file

faulthandler.enable()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--offload-check", action="store_true")
    parser.add_argument("--quantize", action="store_true")
    parser.add_argument("--subprocess-quantize", action="store_true")
    parser.add_argument("--torch", action="store_true")
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    if args.torch:
        import torch

        if torch.cuda.is_available():
            torch.zeros(1, device="cuda").sum().item()
    from runtime.llm import LlamaScorer, LlamaSettings, gpu_offload_supported

    if args.offload_check:
        gpu_offload_supported()
    from tests.tiny_llm import write_tiny_llama_gguf

    args.folder.mkdir(parents=True, exist_ok=True)
    path = write_tiny_llama_gguf(args.folder / "model-f32.gguf", hidden=args.hidden, layers=args.layers,
                                 heads=args.heads, kv_heads=args.heads, ffn=args.ffn)  # fmt: skip
    if args.quantize or args.subprocess_quantize:
        from export.llm import quantize_gguf

        target = args.folder / "model-q4_k_m.gguf"
        quantize_gguf(path, target, "q4_k_m", threads=args.threads, in_process=args.quantize)
        path = target
    # " Yes" and " No" of the tiny tokenizer; any two ids in the vocabulary do for this purpose
    with LlamaScorer(path, 10, 11, LlamaSettings(n_ctx=512)) as llama:
        prompt = [llama.model.bos_id, *llama.tokenize("Will the user like Movie Number 7? Answer:")]
        answers = [llama.score_full(prompt[: n + 4]) for n in range(0, len(prompt) - 4, 3)]
        print(json.dumps({"file": path.name, "size": path.stat().st_size, "gpu_layers": llama.gpu_layers,
                          "answers": answers}))  # fmt: skip


if __name__ == "__main__":
    main()
