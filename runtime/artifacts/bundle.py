"""The bundle: a directory a lean runtime serves with no training code.

manifest.json lists every other file with its sha256 and size. Loading verifies all of them and
refuses a bundle with a missing, truncated or altered file, a file the runtime opens that the
manifest does not hash, a name that is not a plain file name inside the bundle, or a newer
format, naming the file. A bundle is only read: what serving writes (the live store, engine
caches) lives in a state folder of its own (`runtime.artifacts.state`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime import __version__
from runtime.errors import ConfigError, CorellaError
from runtime.features import FeatureSpec
from runtime.prompt import PromptTemplate
from runtime.router import LLMCalibration

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "BundleError",
    "Bundle",
    "bundle_id",
    "file_digest",
    "write_manifest",
    "load_bundle",
]

BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(CorellaError):
    """A bundle cannot be served; the message names the file and what is wrong with it."""


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_id(folder: Path) -> str:
    """A bundle's identity: the first 16 hex digits of its manifest's sha256 (the manifest hashes
    every file, so a change to any file makes another id)."""
    return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()[:16]


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add format version, creation time and the hash and size of every file; write manifest.json."""
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): {"sha256": file_digest(path), "size": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    full = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "corella_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **manifest,
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(full, indent=1), encoding="utf-8")
    return full


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    spec: FeatureSpec
    template: PromptTemplate
    id: str = ""  # `bundle_id`

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def crm_file(self) -> Path:
        return self.file(self.manifest["crm"]["file"])

    @property
    def llm(self) -> dict[str, Any] | None:
        return self.manifest.get("llm")

    @property
    def llm_file(self) -> Path | None:
        return self.file(self.llm["file"]) if self.llm else None

    @property
    def router(self) -> dict[str, Any]:
        return self.manifest["router"]

    @property
    def store_file(self) -> Path:
        return self.file(self.manifest["store"])


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and verify a bundle; any problem is a BundleError naming the file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        if not path.is_dir():
            raise BundleError(f"{str(path)[:200]}: not a bundle directory")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{manifest_path}: missing; is this a corella bundle?") from exc
    except OSError as exc:  # a name too long, no permission, ...
        raise BundleError(f"{str(path)[:200]}: cannot be read ({exc.strerror})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{manifest_path}: malformed manifest (no file list)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: bundle format {version!r} is newer than this corella reads "
            f"({BUNDLE_FORMAT_VERSION}); upgrade corella"
        )
    for key in ("crm", "router", "features", "prompt", "store"):
        if key not in manifest:
            raise BundleError(f"{manifest_path}: malformed manifest (no {key!r} entry)")
    if verify:
        for name, expected in manifest["files"].items():
            file = path / _plain_name(name, manifest_path)
            if not isinstance(expected, dict):
                raise BundleError(f"{manifest_path}: malformed entry for {name}")
            if not file.is_file():
                raise BundleError(f"{file}: missing from the bundle")
            size = file.stat().st_size
            if size != expected.get("size"):
                raise BundleError(f"{file}: size {size} bytes, the manifest says {expected.get('size')} (truncated?)")
            if file_digest(file) != expected.get("sha256"):
                raise BundleError(f"{file}: sha256 does not match the manifest (altered or corrupt)")
    router = manifest["router"]
    if not isinstance(router, dict) or not isinstance(router.get("threshold"), int | float):
        raise BundleError(f"{manifest_path}: malformed router entry (needs a numeric threshold)")
    try:
        LLMCalibration.from_dict(router.get("llm_calibration"))
    except ConfigError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from exc
    for name in _opened_files(manifest, manifest_path):
        if name not in manifest["files"]:
            raise BundleError(f"{path / name}: the runtime opens it, but the manifest does not hash it")
    spec = FeatureSpec.load(path / manifest["features"])
    template = PromptTemplate.load(path / manifest["prompt"])
    return Bundle(path=path, manifest=manifest, spec=spec, template=template, id=bundle_id(path))


def _plain_name(name: Any, manifest_path: Path) -> str:
    """A file name inside the bundle: no folders, no '..', nothing absolute."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or ":" in name:
        raise BundleError(f"{manifest_path}: {name!r} is not a plain file name inside the bundle")
    return name


def _opened_files(manifest: dict[str, Any], manifest_path: Path) -> list[str]:
    """Every file the runtime opens, as the manifest names them."""
    crm, llm = manifest["crm"], manifest.get("llm")
    if not isinstance(crm, dict) or "file" not in crm:
        raise BundleError(f"{manifest_path}: malformed crm entry (needs a file)")
    if llm is not None and (not isinstance(llm, dict) or "file" not in llm):
        raise BundleError(f"{manifest_path}: malformed llm entry (needs a file)")
    names = [crm["file"], manifest["features"], manifest["prompt"], manifest["store"]]
    return [_plain_name(n, manifest_path) for n in names + ([llm["file"]] if llm else [])]
