"""Checkpoints: safetensors for weights, JSON for configs, torch.save only for optimizer state.

State files are read with `weights_only=True`: tensors, numbers, strings and plain containers,
never arbitrary pickled objects, so a run folder from elsewhere cannot run code when resumed.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from runtime.errors import ConfigError

__all__ = [
    "write_json",
    "read_json",
    "save_weights",
    "load_weights",
    "save_state",
    "load_state",
    "numpy_rng_state",
    "set_numpy_rng_state",
]


def _atomic(path: Path, write) -> None:  # noqa: ANN001 - a writer taking a path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    _atomic(
        Path(path),
        lambda p: p.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8"),
    )


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_weights(path: Path, module: torch.nn.Module, only_trainable: bool = False) -> None:
    tensors = {
        name: p.detach().contiguous().cpu()
        for name, p in module.state_dict().items()
        if not only_trainable or name in {n for n, q in module.named_parameters() if q.requires_grad}
    }
    _atomic(Path(path), lambda p: save_file(tensors, str(p)))


def load_weights(path: Path, module: torch.nn.Module, strict: bool = True) -> None:
    module.load_state_dict(load_file(str(path)), strict=strict)


def save_state(path: Path, state: dict[str, Any]) -> None:
    _atomic(Path(path), lambda p: torch.save(state, p))


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{path}: holds more than tensors and plain values (written by an older corella?); it is not "
            "loaded: delete it to run that stage again from its start"
        ) from exc


def numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state as tensors and numbers (loadable with weights_only=True)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["position"], state["has_gauss"], state["cached_gaussian"]))
