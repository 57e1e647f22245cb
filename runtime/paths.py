"""Where corella keeps its cache: $CORELLA_HOME, default ~/.cache/corella."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["corella_home", "data_cache", "model_cache"]


def corella_home() -> Path:
    return Path(os.environ.get("CORELLA_HOME", Path.home() / ".cache" / "corella")).expanduser()


def data_cache(name: str) -> Path:
    return corella_home() / "data" / name


def model_cache() -> Path:
    return corella_home() / "models"
