"""Where training runs: the device every model and batch goes to, and the LLM's weight dtype.

`auto` takes CUDA where torch sees a card, else the CPU; the LLM then trains in bfloat16 on CUDA
(where the card supports it) and in float32 on the CPU. The CRM and the alignment heads stay in
float32 everywhere: they are small, and the answer logits are read out in float32 too.
On the CPU nothing differs from a build without this module: same tensors, same order of
random draws, same figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from runtime.errors import ConfigError

__all__ = ["DEVICES", "DTYPES", "Compute", "resolve_compute", "cuda_reason"]

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cuda_reason() -> str | None:
    """None where torch can use a CUDA card; else why not, in words a user can act on."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build: install a CUDA build of torch"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device "
                "(is the driver loaded? CUDA_VISIBLE_DEVICES set?)")  # fmt: skip
    return None


@dataclass(frozen=True)
class Compute:
    """The device of every model and batch, and the dtype of the LLM's weights."""

    device: torch.device
    llm_dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        dtype = str(self.llm_dtype).removeprefix("torch.")
        if self.is_cuda:
            return f"{torch.cuda.get_device_name(self.device)} ({self.device}), LLM in {dtype}"
        return f"CPU, {torch.get_num_threads()} threads, LLM in {dtype}"

    def to_dict(self) -> dict[str, Any]:
        return {"device": str(self.device), "llm_dtype": str(self.llm_dtype).removeprefix("torch.")}


def resolve_compute(device: str = "auto", dtype: str = "auto") -> Compute:
    """`--device auto|cpu|cuda[:N]` and `--dtype auto|float32|bfloat16|float16` made concrete."""
    kind = device.split(":", 1)[0]
    if kind not in DEVICES or (kind != "cuda" and ":" in device):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if kind == "auto":
        kind = "cuda" if cuda_reason() is None else "cpu"
        device = kind
    if kind == "cuda":
        reason = cuda_reason()
        if reason is not None:
            raise ConfigError(f"--device {device} asked for, but {reason}; or train with --device cpu")
        target = torch.device(device)
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    else:
        target = torch.device("cpu")
    if dtype == "auto":
        bf16 = target.type == "cuda" and torch.cuda.is_bf16_supported()
        llm_dtype = torch.bfloat16 if bf16 else torch.float32
    elif dtype in DTYPES:
        llm_dtype = DTYPES[dtype]
    else:
        raise ConfigError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return Compute(target, llm_dtype)
