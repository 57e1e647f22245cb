"""The data sets corella knows: the built-in ones (specs shipped in training/data/specs/, raw files
fetched into the cache) and the ones imported with `corella data import`; one path loads them all."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from runtime.errors import ConfigError, DataError, DataSourceError
from runtime.paths import corella_home, data_cache
from training.data import fetch
from training.data.schema import RawDataset
from training.data.spec import DatasetSpec
from training.data.tables import is_imported, load_imported, load_spec

__all__ = [
    "DatasetInfo",
    "DATASETS",
    "dataset_info",
    "builtin_spec",
    "imported_folder",
    "fetch_dataset",
    "load_dataset",
    "resolve_spec",
]

log = logging.getLogger(__name__)

GROUPLENS = "https://files.grouplens.org/datasets/movielens/"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    specs: tuple[str, ...]  # spec files shipped in training/data/specs, one per layout of the raw files
    url: str | None = None
    from_pypi: bool = False


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("movielens-100k", "MovieLens 100K (943 users, 1,682 movies, 100k ratings)",
                    ("movielens-100k.toml", "movielens-100k-atomic.toml"), GROUPLENS + "ml-100k.zip", from_pypi=True),
        DatasetInfo("movielens-1m", "MovieLens 1M (6,040 users, 3,706 movies, 1M ratings)",
                    ("movielens-1m.toml",), GROUPLENS + "ml-1m.zip"),
        DatasetInfo("movielens-latest", "MovieLens latest-small (ratings.csv/movies.csv)",
                    ("movielens-latest.toml",), GROUPLENS + "ml-latest-small.zip"),
        DatasetInfo("movielens-25m", "MovieLens 25M (ratings.csv/movies.csv)",
                    ("movielens-latest.toml",), GROUPLENS + "ml-25m.zip"),
        DatasetInfo("amazon-books", "Amazon Review Data 2018, Books (local files only: --from)",
                    ("amazon-books.toml",)),
    )
}  # fmt: skip


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}, or import your own "
                          "(`corella data init`, then `corella data import SPEC --name NAME`)") from None  # fmt: skip


def imported_folder(name: str) -> Path:
    """Where `corella data import` puts the normalized copy of data set `name`."""
    return corella_home() / "data" / "imported" / name


def builtin_spec(name: str, folder: Path) -> DatasetSpec:
    """The shipped spec of built-in data set `name` whose files `folder` holds."""
    info = dataset_info(name)
    specs = resources.files("training.data") / "specs"
    tried = []
    for file in info.specs:
        with resources.as_file(specs / file) as path:
            spec = DatasetSpec.load(path, folder=folder, name=name)
        if spec.interactions.source.path.exists():
            return spec
        tried.append(spec.interactions.source.path.name)
    raise DataError(f"{folder}: no {name} files (looked for {' or '.join(tried)})")


def resolve_spec(spec: str | Path, name: str | None = None) -> DatasetSpec:
    """A spec file, or the name of a built-in data set whose raw files are in the cache."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        return DatasetSpec.load(path, name=name)
    if str(spec) in DATASETS:
        builtin = builtin_spec(str(spec), _cached(str(spec)))
        return builtin if name is None else dataclasses.replace(builtin, name=name)
    raise DataError(f"{spec}: no such spec file (and not a built-in data set: {', '.join(DATASETS)})")


def _cached(name: str) -> Path:
    folder = data_cache(name)
    if not folder.exists():
        raise DataSourceError(
            f"{name} is not in the cache ({folder}); run `corella data fetch {name}` or pass --from PATH"
        )
    return folder


def fetch_dataset(name: str, source: Path | None = None, timeout: float = 10.0) -> tuple[Path, str]:
    """Put the raw files of `name` into the cache; return the folder and where they came from."""
    info = dataset_info(name)
    target = data_cache(name)
    if source is not None:
        path = fetch.fetch_from_path(source, target)
        builtin_spec(name, path)  # refuse a folder that does not hold this data set
        return path, str(source)
    tried: list[str] = []
    if info.url:
        try:
            return fetch.fetch_from_url(info.url, target, timeout=timeout), info.url
        except DataSourceError as exc:
            log.info("GroupLens unavailable: %s", exc)
            tried.append(str(exc))
    if info.from_pypi:
        try:
            return fetch.fetch_from_recbole_wheel(target), f"PyPI {fetch.RECBOLE_SPEC}"
        except DataSourceError as exc:
            tried.append(str(exc))
    hint = f"download it yourself and run `corella data fetch {name} --from PATH`"
    raise DataSourceError(f"no source could supply {name}: {'; '.join(tried) or 'none tried'}; {hint}")


def load_dataset(name: str, source: Path | None = None, skip_malformed: bool = False) -> RawDataset:
    """Data set `name`: from `source` (a spec file, an imported folder, or a built-in's raw files),
    else its import in the cache, else a built-in's raw files in the cache."""
    if source is not None:
        source = Path(source)
        if source.suffix == ".toml":
            return load_spec(DatasetSpec.load(source, name=name), skip_malformed)
        if is_imported(source):
            return load_imported(source, name)
        if not source.exists():
            raise DataSourceError(f"{source}: no such file or folder")
        return load_spec(builtin_spec(name, source), skip_malformed)
    if is_imported(imported_folder(name)):
        return load_imported(imported_folder(name), name)
    dataset_info(name)
    return load_spec(builtin_spec(name, _cached(name)), skip_malformed)
