"""The fast path: the CRM in ONNX Runtime with the best execution provider available.

Providers are registered by name; `auto` takes TensorRT (FP16, an explicit min/opt/max batch
profile, engines cached in the bundle's state folder under the model's hash), then CUDA, then CPU,
keeping only those this onnxruntime build offers. `warm_up` runs each profile batch once, so that
the server says ready only after TensorRT has built or loaded its engine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ConfigError
from runtime.features import INPUT_NAMES

__all__ = ["PROVIDERS", "DEFAULT_BATCHES", "CRMSession", "resolve_providers", "tensorrt_options", "model_digest"]

log = logging.getLogger(__name__)


#: Batch sizes TensorRT's optimization profile is built for: min (one candidate), opt (a typical
#: request) and max (the largest chunk `predict` runs). Outside them TensorRT would rebuild its engine
#: mid-request; inside them one engine serves every request.
DEFAULT_BATCHES = (1, 100, 4096)


def model_digest(path: Path) -> str:
    """The first 16 hex digits of the model file's sha256: what a TensorRT engine is built from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _input_dims(path: Path) -> list[tuple[str, list[int]]]:
    """Each input's name and its dimensions after the batch one (read with a CPU session)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [(i.name, [int(d) for d in i.shape[1:]]) for i in session.get_inputs()]


def tensorrt_options(path: Path, cache: Path | None, batches: Sequence[int] = DEFAULT_BATCHES) -> dict[str, Any]:
    """TensorRT provider options: FP16, explicit min/opt/max shapes for every input, and an engine
    and timing cache in a folder keyed by the model's hash (another crm.onnx never reuses an engine)."""
    options: dict[str, Any] = {"trt_fp16_enable": True}
    dims = _input_dims(path)
    for key, batch in zip(("min", "opt", "max"), batches, strict=True):
        options[f"trt_profile_{key}_shapes"] = ",".join(
            f"{name}:{'x'.join(str(d) for d in [batch, *rest])}" for name, rest in dims
        )
    if cache is not None:
        folder = cache / model_digest(path)
        folder.mkdir(parents=True, exist_ok=True)
        options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder),
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": str(folder)}  # fmt: skip
    return options


#: name -> (onnxruntime provider, options given the model file, the engine cache folder and the batches).
PROVIDERS: dict[str, tuple[str, Callable[[Path, Path | None, Sequence[int]], dict[str, Any]]]] = {
    "tensorrt": ("TensorrtExecutionProvider", tensorrt_options),
    "cuda": ("CUDAExecutionProvider", lambda path, cache, batches: {}),
    "cpu": ("CPUExecutionProvider", lambda path, cache, batches: {}),
}


def resolve_providers(names: Sequence[str], path: Path | None = None, cache: Path | None = None,
                      batches: Sequence[int] = DEFAULT_BATCHES) -> list[tuple[str, dict[str, Any]]]:  # fmt: skip
    """The providers of `names` this onnxruntime build offers, each with its options for the model at
    `path` (TensorRT's need it), CPU last as the fallback."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = []
    if list(names) == ["auto"]:
        names = list(PROVIDERS)
    for name in names:
        if name not in PROVIDERS:
            raise ConfigError(f"unknown execution provider {name!r}; choose from auto, {', '.join(PROVIDERS)}")
        provider, options = PROVIDERS[name]
        if provider in available:
            chosen.append((provider, options(Path(path), cache, batches) if path is not None else {}))
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
                 engine_cache: Path | None = None, batches: Sequence[int] = DEFAULT_BATCHES) -> None:  # fmt: skip
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
            str(self.path), options, providers=resolve_providers(list(providers), self.path, engine_cache, batches)
        )
        self.providers = self.session.get_providers()
        self.output = self.session.get_outputs()[0].name
        self.batches = tuple(batches)
        self.warmup: dict[str, Any] | None = None

    def zeros(self, batch: int) -> dict[str, np.ndarray]:
        """An all-zero input of `batch` rows (warm-ups and timings: its values do not matter)."""
        return {spec.name: np.zeros([batch, *(int(d) for d in spec.shape[1:])],
                                    dtype=np.float32 if "float" in spec.type else np.int64)
                for spec in self.session.get_inputs()}  # fmt: skip

    def warm_up(self) -> dict[str, Any]:
        """One run at each batch size of the profile: TensorRT builds (or loads from its cache) its
        engine here, and CUDA allocates, so that no request pays for it. Seconds per run."""
        seconds = {}
        for batch in self.batches:
            feed = self.zeros(batch)
            started = time.perf_counter()
            self.session.run([self.output], feed)
            seconds[str(batch)] = round(time.perf_counter() - started, 4)
        self.warmup = {"provider": self.providers[0], "seconds_by_batch": seconds}
        return self.warmup

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
