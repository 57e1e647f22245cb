"""llama.cpp's HF -> GGUF converter, matched to the installed llama-cpp-python, without a hunt for it.

The installed wheel does not carry `convert_hf_to_gguf.py`; its sdist does (vendor/llama.cpp/),
beside the `conversion/` package it imports and the `gguf-py` it puts first on its own path. pip
downloads that sdist (from whatever index pip is configured with) and three paths of it are kept
in $CORELLA_HOME/tools/llama.cpp-<version>/. The PyPI package `convert-hf-to-gguf` is not used: it
installs a top-level `gguf` module over gguf-py's.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

from export.crm import ExportError
from runtime.paths import corella_home
from runtime.sdist import SdistError, installed_llama_cpp_version, llama_cpp_sdist, pip_download_command

__all__ = ["CONVERTER", "fetch_converter", "extract_converter"]

CONVERTER = "convert_hf_to_gguf.py"
_KEPT = (CONVERTER, "conversion/", "gguf-py/")


def fetch_converter(version: str | None = None, home: Path | None = None) -> Path:
    """The converter of llama-cpp-python `version` (default: the installed one), downloaded once."""
    try:
        version = version or installed_llama_cpp_version()
    except SdistError as exc:
        raise ExportError(str(exc)) from exc
    target = (home or corella_home()) / "tools" / f"llama.cpp-{version}"
    if (target / CONVERTER).is_file():
        return target / CONVERTER
    try:
        sdist = llama_cpp_sdist(version, home)
    except SdistError as exc:
        raise ExportError(
            f"{exc}; run `{' '.join(pip_download_command(version))} -d DIR` yourself, unpack it and pass "
            f"--converter DIR/.../vendor/llama.cpp/{CONVERTER}"
        ) from exc
    return extract_converter(sdist, target)


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
