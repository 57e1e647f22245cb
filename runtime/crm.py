"""The fast path: the CRM in ONNX Runtime with the best execution provider available.

Providers are registered by name; `auto` takes TensorRT (FP16, engine cache beside the bundle),
then CUDA, then CPU, keeping only those this onnxruntime build offers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ConfigError
from runtime.features import INPUT_NAMES

__all__ = ["PROVIDERS", "CRMSession", "resolve_providers"]

log = logging.getLogger(__name__)


def _tensorrt(cache: Path | None) -> tuple[str, dict[str, Any]]:
    options: dict[str, Any] = {"trt_fp16_enable": True}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
    return "TensorrtExecutionProvider", options


#: name -> (onnxruntime provider, options), given the engine cache folder.
PROVIDERS = {
    "tensorrt": _tensorrt,
    "cuda": lambda cache: ("CUDAExecutionProvider", {}),
    "cpu": lambda cache: ("CPUExecutionProvider", {}),
}


def resolve_providers(names: Sequence[str], cache: Path | None = None) -> list[tuple[str, dict[str, Any]]]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = []
    if list(names) == ["auto"]:
        names = list(PROVIDERS)
    for name in names:
        if name not in PROVIDERS:
            raise ConfigError(f"unknown execution provider {name!r}; choose from auto, {', '.join(PROVIDERS)}")
        provider, options = PROVIDERS[name](cache)
        if provider in available:
            chosen.append((provider, options))
        elif len(names) == 1 or name != "cpu":
            log.debug("%s is not available in this onnxruntime build", provider)
    if not chosen:
        raise ConfigError(f"none of the providers {list(names)} is available (have: {sorted(available)})")
    if chosen[-1][0] != "CPUExecutionProvider" and "CPUExecutionProvider" in available:
        chosen.append(("CPUExecutionProvider", {}))
    return chosen


class CRMSession:
    """An ONNX Runtime session on crm.onnx taking the shared feature encoding's arrays."""

    def __init__(self, path: str | Path, providers: Sequence[str] = ("auto",), threads: int | None = None,
                 engine_cache: Path | None = None) -> None:  # fmt: skip
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        # idle intra-op threads sleep instead of spinning: on a box where llama.cpp decodes, spinning
        # threads take its cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(self.path), options, providers=resolve_providers(list(providers), engine_cache)
        )
        self.providers = self.session.get_providers()
        self.output = self.session.get_outputs()[0].name

    def predict(self, inputs: Mapping[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
        """P(click) for every row; large inputs are run in chunks of `batch_size`."""
        n = len(inputs["categorical"])
        if n == 0:
            return np.empty(0)
        if n <= batch_size:  # the request path: one run, no copies of already contiguous arrays
            feed = {k: np.ascontiguousarray(inputs[k]) for k in INPUT_NAMES}
            return self.session.run([self.output], feed)[0].astype(np.float64)
        out = np.empty(n, dtype=np.float64)
        for start in range(0, n, batch_size):
            feed = {k: np.ascontiguousarray(inputs[k][start : start + batch_size]) for k in INPUT_NAMES}
            out[start : start + batch_size] = self.session.run([self.output], feed)[0]
        return out
