"""llama.cpp's HF -> GGUF converter, matched to the installed llama-cpp-python, without a hunt for it.

The installed wheel does not carry `convert_hf_to_gguf.py`; its sdist does (vendor/llama.cpp/),
beside the `conversion/` package it imports and the `gguf-py` it puts first on its own path. pip
downloads that sdist (from whatever index pip is configured with) and three paths of it are kept
in $CORELLA_HOME/tools/llama.cpp-<version>/. The PyPI package `convert-hf-to-gguf` is not used: it
installs a top-level `gguf` module over gguf-py's.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from export.crm import ExportError
from runtime.paths import corella_home

__all__ = ["CONVERTER", "fetch_converter", "extract_converter"]

CONVERTER = "convert_hf_to_gguf.py"
_KEPT = (CONVERTER, "conversion/", "gguf-py/")


def _installed_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ExportError("llama-cpp-python is not installed: pip install -e '.[serve]'") from exc


def fetch_converter(version: str | None = None, home: Path | None = None) -> Path:
    """The converter of llama-cpp-python `version` (default: the installed one), downloaded once."""
    version = version or _installed_version()
    target = (home or corella_home()) / "tools" / f"llama.cpp-{version}"
    if (target / CONVERTER).is_file():
        return target / CONVERTER
    command = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
               "--no-binary", ":all:", "--quiet"]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run([*command, "-d", folder], capture_output=True, text=True)
        sdists = sorted(Path(folder).glob("*.tar.gz"))
        if result.returncode != 0 or not sdists:
            said = (result.stderr.strip().splitlines() or ["no sdist was saved"])[-1]
            raise ExportError(
                f"could not download llama-cpp-python {version}'s sdist ({said}); run `{' '.join(command)} -d DIR` "
                f"yourself, unpack it and pass --converter DIR/.../vendor/llama.cpp/{CONVERTER}"
            )
        return extract_converter(sdists[0], target)


def extract_converter(sdist: Path, target: Path) -> Path:
    """The converter, `conversion/` and `gguf-py/` of an sdist into `target` (whole, or not at all)."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        for member in tar:
            inner = member.name.split("/", 1)[-1].removeprefix("vendor/llama.cpp/")
            if inner == member.name.split("/", 1)[-1] or not (member.isfile() or member.isdir()):
                continue  # outside vendor/llama.cpp/, or a link
            if inner == CONVERTER or inner.startswith(_KEPT[1:]):
                member.name = inner
                tar.extract(member, staging, filter="data")
    if not (staging / CONVERTER).is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"{sdist.name} holds no vendor/llama.cpp/{CONVERTER}")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target / CONVERTER
