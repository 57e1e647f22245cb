"""`corella doctor`: what this box offers corella, each part with a verdict and, where it fails, the fix.

Every check is a function returning `Check`s; none raises. "n/a" is what a CPU box says of the GPU
parts: not a failure, since corella serves and trains on the CPU too. With a bundle, the CRM is
loaded through every execution provider this onnxruntime offers and the LLM with offload where
llama.cpp can, so that "the card is there" becomes "the card serves this bundle".
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Check", "run_checks"]

OK, WARN, FAIL, NA = "ok", "warn", "fail", "n/a"
INSTALL_GPU = "run `make install-gpu` (README: 'A GPU box')"


@dataclass
class Check:
    name: str
    status: str  # ok, warn, fail, n/a
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(command: list[str]) -> str | None:
    """A command's stdout, or None where it is missing or fails (never raises, 10 s at most)."""
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def check_machine() -> list[Check]:
    memory = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    detail = f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPU cores{memory}"
    return [Check("machine", OK, detail)]


def check_nvidia() -> list[Check]:
    """The driver and the cards (nvidia-smi), and the CUDA compiler a llama.cpp build needs."""
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"])
    if smi is None:
        return [Check("NVIDIA driver", NA, "no nvidia-smi, or it sees no card: a CPU box")]
    checks = [Check("NVIDIA driver", OK, "; ".join(line.strip() for line in smi.splitlines()))]
    nvcc = _run(["nvcc", "--version"])
    if nvcc is None:
        checks.append(Check("CUDA compiler", WARN, "no nvcc on PATH: llama.cpp cannot be built with CUDA here",
                            "install the CUDA toolkit (nvcc) or put it on PATH, then " + INSTALL_GPU))  # fmt: skip
    else:
        checks.append(Check("CUDA compiler", OK, nvcc.splitlines()[-1].strip()))
    return checks


def check_torch(gpu_box: bool) -> list[Check]:
    """Training: torch, and whether it sees the card (`corella train --device auto` takes it if so)."""
    if importlib.util.find_spec("torch") is None:
        return [Check("torch (training)", NA, "not installed: this box can serve, not train",
                      "pip install -e '.[train]' to train here")]  # fmt: skip
    import torch

    if torch.cuda.is_available():
        cards = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        bf16 = "bfloat16" if torch.cuda.is_bf16_supported() else "float32 (no bfloat16 on this card)"
        return [Check("torch (training)", OK, f"{torch.__version__}, CUDA {torch.version.cuda}: {cards}; "
                      f"`corella train` uses it, the LLM in {bf16}")]  # fmt: skip
    if torch.version.cuda is None:
        detail = f"{torch.__version__}, a CPU build: `corella train` runs on the CPU"
        fix = "install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu1xx)"
    else:
        detail = f"{torch.__version__} (CUDA {torch.version.cuda}) sees no card: `corella train` runs on the CPU"
        fix = "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
    return [Check("torch (training)", WARN if gpu_box else OK, detail, fix if gpu_box else "")]


def check_llama(gpu_box: bool) -> list[Check]:
    """Serving's slow path: llama-cpp-python, and whether its build offloads to the card."""
    version = _version("llama-cpp-python")
    if version is None:
        return [Check("llama.cpp", FAIL, "llama-cpp-python is not installed: no LLM path",
                      "pip install -e '.[serve]'")]  # fmt: skip
    from runtime.llm import gpu_offload_supported

    if gpu_offload_supported():
        return [Check("llama.cpp", OK, f"llama-cpp-python {version}, GPU offload on")]
    if gpu_box:
        return [Check("llama.cpp", FAIL, f"llama-cpp-python {version} is a CPU build on a box with a card",
                      INSTALL_GPU + " to rebuild it with CUDA")]  # fmt: skip
    return [Check("llama.cpp", OK, f"llama-cpp-python {version}, CPU build (no card here)")]


def check_onnxruntime(gpu_box: bool) -> list[Check]:
    """Serving's fast path: onnxruntime and its execution providers."""
    cpu, gpu = _version("onnxruntime"), _version("onnxruntime-gpu")
    if cpu is None and gpu is None:
        return [Check("onnxruntime", FAIL, "not installed: no CRM", "pip install -e '.[serve]'")]
    checks = []
    if cpu and gpu:
        detail = f"both onnxruntime {cpu} and onnxruntime-gpu {gpu} are installed: they overwrite each other's files"
        checks.append(Check("onnxruntime", FAIL, detail, INSTALL_GPU + " (it removes onnxruntime)"))
    import onnxruntime as ort

    providers = ort.get_available_providers()
    detail = f"{'onnxruntime-gpu' if gpu else 'onnxruntime'} {ort.__version__}: {', '.join(providers)}"
    if gpu_box and "CUDAExecutionProvider" not in providers:
        checks.append(Check("onnxruntime", WARN, detail + " (the CRM runs on the CPU)", INSTALL_GPU))
    else:
        checks.append(Check("onnxruntime", OK, detail))
    if gpu_box and "TensorrtExecutionProvider" in providers and importlib.util.find_spec("tensorrt") is None:
        fix = "pip install tensorrt (matching your CUDA), or serve with --providers cuda,cpu"
        checks.append(Check("TensorRT", WARN, "the provider is offered, the tensorrt libraries are not installed", fix))
    return checks


def check_bundle_crm(bundle: Path) -> list[Check]:
    """The bundle's CRM through each provider offered: does it load, and what a batch of 1 and of
    1,024 rows take (after one warm-up run)."""
    import onnxruntime as ort

    from runtime.artifacts.bundle import load_bundle
    from runtime.crm import PROVIDERS, CRMSession

    crm_file = load_bundle(bundle).crm_file
    offered = set(ort.get_available_providers())
    checks = []
    for name, (provider, _) in PROVIDERS.items():
        if provider not in offered:
            checks.append(Check(f"CRM on {name}", NA, f"{provider} is not in this onnxruntime build"))
            continue
        try:
            session = CRMSession(crm_file, [name], engine_cache=Path(os.environ.get("TMPDIR", "/tmp")) / "corella-trt")
            if session.providers[0] != provider:
                raise RuntimeError(f"onnxruntime fell back to {session.providers[0]}")
            timings = []
            for batch in (1, 1024):
                feed = session.zeros(batch)
                session.session.run(None, feed)
                started = time.perf_counter()
                session.session.run(None, feed)
                timings.append(f"batch {batch}: {1000 * (time.perf_counter() - started):.2f} ms")
            checks.append(Check(f"CRM on {name}", OK, "loads; " + ", ".join(timings)))
        except Exception as exc:  # noqa: BLE001 - a provider that fails to load is the finding
            checks.append(
                Check(
                    f"CRM on {name}",
                    FAIL,
                    f"{type(exc).__name__}: {str(exc)[:200]}",
                    "see the provider's requirements (CUDA/cuDNN/TensorRT versions) in onnxruntime's docs",
                )
            )
    return checks


def check_bundle_llm(bundle: Path) -> list[Check]:
    """The bundle's GGUF loaded as the server would (offloaded where the build can), one prompt scored."""
    from runtime.artifacts.bundle import load_bundle
    from runtime.llm import LlamaScorer, LlamaSettings, LLMError

    loaded = load_bundle(bundle)
    info = loaded.llm
    if info is None:
        return [Check("LLM of the bundle", NA, "a CRM-only bundle")]
    try:
        started = time.perf_counter()
        with LlamaScorer(loaded.llm_file, info["yes_token_id"], info["no_token_id"], LlamaSettings()) as llama:
            load = time.perf_counter() - started
            prompt = [llama.model.bos_id, *llama.model.tokenize("Will the user like it? Answer:")]
            started = time.perf_counter()
            p = llama.score_full(prompt)
            detail = (f"{loaded.llm_file.name}: {llama.model.gpu_layers} layers offloaded, loaded in {load:.1f} s, "
                      f"one prompt in {1000 * (time.perf_counter() - started):.0f} ms (P(yes) {p:.3f})")  # fmt: skip
        return [Check("LLM of the bundle", OK, detail)]
    except LLMError as exc:
        return [Check("LLM of the bundle", FAIL, str(exc), "re-export the bundle, or check llama.cpp's log with -v")]


def run_checks(bundle: Path | None = None) -> list[Check]:
    nvidia = check_nvidia()  # run once: the GPU checks below read its verdict
    gpu_box = nvidia[0].status == OK
    steps: list[Callable[[], list[Check]]] = [
        check_machine,
        lambda: nvidia,
        lambda: check_torch(gpu_box),
        lambda: check_llama(gpu_box),
        lambda: check_onnxruntime(gpu_box),
    ]
    if bundle is not None:
        steps += [lambda: check_bundle_crm(bundle), lambda: check_bundle_llm(bundle)]
    checks: list[Check] = []
    for step in steps:
        try:
            checks += step()
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            name = getattr(step, "__name__", "check").removeprefix("check_")
            checks.append(Check(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}"))
    return checks
