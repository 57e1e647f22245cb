"""llama-cpp-python's sdist: the vendored llama.cpp sources matched to the installed wheel.

The wheel carries the compiled library only. Two tools come from the sources of the same version:
llama.cpp's HF -> GGUF converter (export/converter.py) and the `llama-server` the bench measures
corella against (benchmarks/peers.py). pip downloads the sdist (from whatever index pip is
configured with) into $CORELLA_HOME/tools/sdist/, once. Standard library only.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tempfile
from pathlib import Path

from runtime.errors import CorellaError
from runtime.paths import corella_home

__all__ = ["SdistError", "installed_llama_cpp_version", "llama_cpp_sdist", "pip_download_command"]


class SdistError(CorellaError):
    """The sdist could not be had (no package index answered, or no llama-cpp-python installed)."""


def installed_llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError as exc:
        raise SdistError("llama-cpp-python is not installed: pip install -e '.[serve]'") from exc


def pip_download_command(version: str) -> list[str]:
    return [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
            "--no-binary", ":all:", "--quiet"]  # fmt: skip


def llama_cpp_sdist(version: str | None = None, home: Path | None = None) -> Path:
    """The sdist of llama-cpp-python `version` (default: the installed one), downloaded once."""
    version = version or installed_llama_cpp_version()
    folder = (home or corella_home()) / "tools" / "sdist"
    kept = sorted(folder.glob(f"llama_cpp_python-{version}.tar.gz"))
    if kept:
        return kept[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = pip_download_command(version)
    with tempfile.TemporaryDirectory(dir=folder) as staging:
        result = subprocess.run([*command, "-d", staging], capture_output=True, text=True)
        sdists = sorted(Path(staging).glob("*.tar.gz"))
        if result.returncode != 0 or not sdists:
            said = (result.stderr.strip().splitlines() or ["no sdist was saved"])[-1]
            raise SdistError(f"could not download llama-cpp-python {version}'s sdist ({said})")
        target = folder / f"llama_cpp_python-{version}.tar.gz"
        sdists[0].rename(target)
    return target
