"""The LoRA-tuned LLM to GGUF: merge, write (keeping every metadata key of the base), quantize.

For a GGUF base, only the tensors LoRA touched change. Each adapter's delta (B A * scaling) is
computed in the Hugging Face layout and mapped back to the GGUF tensor with gguf-py's name map and
the row order llama.cpp uses for that tensor (detected by matching the base weights, so Q/K
permutations are handled for every architecture); every other tensor and every metadata key,
tokenizer included, is carried over. llama.cpp's own quantizer then writes q8_0 or q4_k_m.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.crm import ExportError
from training.llm import LLMScorer

__all__ = ["QUANT_TYPES", "lora_deltas", "write_merged_gguf", "quantize_gguf", "convert_hf_directory"]

log = logging.getLogger(__name__)

#: name -> llama.cpp's llama_ftype
QUANT_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}


def lora_deltas(scorer: LLMScorer) -> dict[str, torch.Tensor]:
    """Hugging Face module name (no peft prefix) -> the merged weight change [out, in]."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in scorer.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
            clean = name.removeprefix("base_model.model.")
            deltas[clean] = module.get_delta_weight("default").detach().float().cpu()
    return deltas


def _base_weights(scorer: LLMScorer) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): module.get_base_layer().weight.detach().float().cpu()
        for name, module in scorer.model.named_modules()
        if isinstance(module, LoraLayer)
    }


def _llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The row order convert_hf_to_gguf.py gives Q/K of LLaMA-style models (HF -> GGUF)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _row_orders(reader: Any, arch: str) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    candidates: dict[str, Callable[[np.ndarray], np.ndarray]] = {"identity": lambda w: w}
    for key in (f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"):
        field = reader.fields.get(key)
        if field is not None:
            heads = int(field.contents())
            candidates[f"permute({heads})"] = lambda w, h=heads: _llama_permute(w, h)
    return candidates


def write_merged_gguf(base_path: Path, scorer: LLMScorer, out_path: Path, dtype: str = "f16") -> dict[str, Any]:
    """A new GGUF: the base's metadata, its tensors dequantized to F16/F32, LoRA deltas added."""
    import gguf

    if dtype not in ("f16", "f32"):
        raise ExportError(f"intermediate type must be f16 or f32, not {dtype!r}")
    started = time.perf_counter()
    reader = gguf.GGUFReader(str(base_path))
    arch = str(reader.fields["general.architecture"].contents())
    arch_enum = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    if arch_enum is None:
        raise ExportError(f"{base_path}: gguf-py does not know the architecture {arch!r}")
    blocks = int(reader.fields[f"{arch}.block_count"].contents())
    name_map = gguf.get_tensor_name_map(arch_enum, blocks)
    deltas = lora_deltas(scorer)
    bases = _base_weights(scorer)
    orders = _row_orders(reader, arch)
    targets: dict[str, str] = {}
    for hf_name in deltas:
        gguf_name = name_map.get_name(hf_name)
        if gguf_name is None:
            raise ExportError(f"gguf-py has no GGUF name for {hf_name} ({arch})")
        targets[gguf_name + ".weight"] = hf_name

    writer = gguf.GGUFWriter(str(out_path), arch)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_file_type(file_type)
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    if "general.file_type" not in reader.fields:
        writer.add_file_type(file_type)

    merged, orders_used = 0, {}
    for tensor in reader.tensors:
        data = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        hf_name = targets.get(tensor.name)
        if hf_name is not None:
            base = bases[hf_name].numpy()
            order = next((n for n, f in orders.items() if f(base).shape == data.shape
                          and np.allclose(f(base), data, atol=1e-5, rtol=1e-4)), None)  # fmt: skip
            if order is None:
                raise ExportError(f"{tensor.name}: cannot match the GGUF tensor to {hf_name}'s base weights")
            data = data + orders[order](deltas[hf_name].numpy())
            orders_used[order] = orders_used.get(order, 0) + 1
            merged += 1
        out = data.astype(np.float16) if dtype == "f16" and data.ndim >= 2 else data
        writer.add_tensor(tensor.name, out)
    if merged != len(targets):
        raise ExportError(f"merged {merged} of {len(targets)} adapted tensors; the GGUF lacks some")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": out_path.name, "type": dtype, "merged_tensors": merged, "row_orders": orders_used,
            "metadata_keys": len([k for k in reader.fields if not k.startswith("GGUF.")]),
            "seconds": time.perf_counter() - started}  # fmt: skip


def quantize_gguf(source: Path, target: Path, quant: str, threads: int | None = None,
                  in_process: bool = False) -> dict[str, Any]:  # fmt: skip
    """llama.cpp's own quantizer (llama_model_quantize), in a child process unless `in_process`.

    A child process, because a process that quantized and then loaded a model on an H200 crashed in
    llama_model_load_from_file (issue 12; tests/llama_conditions.py replays it): export quantizes,
    then loads what it wrote for its parity checks, beside torch. The child costs ~0.5 s."""
    if quant not in QUANT_TYPES:
        raise ExportError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    started = time.perf_counter()
    if in_process:
        from runtime.llm import quantize

        status, detail = quantize(source, target, QUANT_TYPES[quant], threads or 0), ""
    else:
        import runtime

        command = [sys.executable, "-m", "runtime.llm", str(source), str(target), str(QUANT_TYPES[quant]),
                   str(threads or 0)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, cwd=Path(runtime.__file__).parents[1])
        status, detail = result.returncode, (result.stderr.strip().splitlines() or [""])[-1]
    if status != 0 or not target.is_file():
        raise ExportError(f"llama.cpp failed to quantize {source.name} to {quant} (status {status}) {detail}".strip())
    return {"file": target.name, "quant": quant, "seconds": time.perf_counter() - started,
            "size": target.stat().st_size}  # fmt: skip


def convert_hf_directory(
    scorer: LLMScorer, work: Path, out_path: Path, converter: Path | None, dtype: str = "f16"
) -> dict[str, Any]:
    """A Hugging Face base: save the merged model, then llama.cpp's convert_hf_to_gguf.py."""
    if converter is None or not Path(converter).is_file():
        raise ExportError(
            "a Hugging Face directory base needs llama.cpp's convert_hf_to_gguf.py: pass --fetch-converter (corella "
            "takes it out of the installed llama-cpp-python's sdist, ~75 MB through pip) or --converter PATH"
        )
    merged_dir = work / "merged-hf"
    model = scorer.model.merge_and_unload()
    model.save_pretrained(str(merged_dir))
    scorer.tokenizer.save_pretrained(str(merged_dir))
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(converter), str(merged_dir), "--outfile", str(out_path), "--outtype", dtype],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise ExportError(f"{converter} failed: {result.stderr.strip()[-500:]}")
    return {"file": out_path.name, "type": dtype, "converter": str(converter), "seconds": time.perf_counter() - started}
