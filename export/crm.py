"""The CRM to ONNX, parity-checked against PyTorch; optionally a TensorRT FP16 engine."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime.crm import CRMSession
from runtime.errors import CorellaError
from runtime.features import INPUT_NAMES
from training.crm_trainer import predict
from training.dcnv2 import DCNv2

__all__ = ["ExportError", "ONNX_OPSET", "export_onnx", "onnx_parity", "build_tensorrt_engine"]

log = logging.getLogger(__name__)

ONNX_OPSET = 17
OUTPUT_NAME = "probability"


class ExportError(CorellaError):
    """Export cannot go on; the message says why."""


class _Probability(nn.Module):
    """The CRM with its sigmoid inside, so the ONNX output is P(click) [B]."""

    def __init__(self, model: DCNv2) -> None:
        super().__init__()
        self.model = model

    def forward(self, categorical, tags, history_items, history_ratings, stats):  # noqa: ANN001, ANN201
        return torch.sigmoid(self.model(categorical, tags, history_items, history_ratings, stats))


def export_onnx(model: DCNv2, example: Mapping[str, np.ndarray], path: Path) -> dict[str, Any]:
    """Write crm.onnx (named inputs, dynamic batch axis) and check it with onnx.checker."""
    import onnx

    model.eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[name][:2])) for name in INPUT_NAMES)
    started = time.perf_counter()
    torch.onnx.export(
        _Probability(model),
        args,
        str(path),
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_axes={name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)},
        opset_version=ONNX_OPSET,
        dynamo=False,
        do_constant_folding=True,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return {"file": path.name, "opset": ONNX_OPSET, "output": OUTPUT_NAME, "seconds": time.perf_counter() - started}


def onnx_parity(model: DCNv2, path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """ONNX Runtime (CPU) vs PyTorch on the given samples."""
    torch_p = predict(model, inputs)
    session = CRMSession(path, providers=["cpu"])
    ort_p = session.predict(inputs, batch_size=4096)
    diff = np.abs(ort_p - torch_p)
    return {"samples": int(len(diff)), "max_abs_dp": float(diff.max()), "mean_abs_dp": float(diff.mean())}


def optimized_load_time(path: Path) -> dict[str, Any]:
    """Whether saving ORT's optimized graph would shorten session start; measured, not assumed."""
    import onnxruntime as ort

    def load(file: Path, level: Any) -> float:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        started = time.perf_counter()
        ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        return time.perf_counter() - started

    optimized = path.with_suffix(".optimized.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    plain = min(load(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL) for _ in range(3))
    pre = min(load(optimized, ort.GraphOptimizationLevel.ORT_DISABLE_ALL) for _ in range(3))
    optimized.unlink()
    return {"load_seconds_optimizing_at_load": plain, "load_seconds_preoptimized": pre,
            "kept": False, "why": "the CRM graph is small: optimizing at load costs milliseconds, and a "
            "pre-optimized graph is tied to one execution provider"}  # fmt: skip


def tensorrt_unavailable_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def build_tensorrt_engine(
    onnx_path: Path, plan_path: Path, inputs: Mapping[str, np.ndarray], max_batch: int = 1024
) -> dict[str, Any]:
    """An FP16 engine with one optimization profile over batch 1..max_batch, parity-checked."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name in INPUT_NAMES:
        width = inputs[name].shape[1]
        profile.set_shape(name, (1, width), (min(256, max_batch), width), (max_batch, width))
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine")
    plan_path.write_bytes(bytes(serialized))
    return {"file": plan_path.name, "tensorrt_version": trt.__version__,
            "gpu": torch.cuda.get_device_name(0), "max_batch": max_batch, "precision": "fp16",
            "build_seconds": time.perf_counter() - started}  # fmt: skip


def tensorrt_parity(
    plan_path: Path, inputs: Mapping[str, np.ndarray], reference: np.ndarray, batch_size: int = 1024
) -> dict[str, Any]:
    """Run the engine on the samples (torch CUDA tensors as buffers) and compare with ONNX Runtime."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
    context = engine.create_execution_context()
    stream = torch.cuda.current_stream()
    outputs = []
    n = len(reference)
    for start in range(0, n, batch_size):
        feeds = {k: torch.from_numpy(np.ascontiguousarray(inputs[k][start : start + batch_size])).cuda()
                 for k in INPUT_NAMES}  # fmt: skip
        rows = next(iter(feeds.values())).shape[0]
        out = torch.empty(rows, dtype=torch.float32, device="cuda")
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        stream.synchronize()
        outputs.append(out.cpu().numpy())
    diff = np.abs(np.concatenate(outputs) - reference)
    return {"samples": int(n), "max_abs_dp": float(diff.max()), "mean_abs_dp": float(diff.mean())}
