"""The data sets corella knows by name: how to load each and where to fetch it from."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ConfigError, DataSourceError
from runtime.paths import data_cache
from training.data import fetch
from training.data.loaders import (
    load_amazon_books,
    load_movielens_1m,
    load_movielens_100k,
    load_movielens_csv,
)
from training.data.schema import RawDataset

__all__ = ["DatasetInfo", "DATASETS", "dataset_info", "fetch_dataset", "load_dataset"]

log = logging.getLogger(__name__)

GROUPLENS = "https://files.grouplens.org/datasets/movielens/"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    loader: Callable[..., RawDataset]
    url: str | None = None
    from_pypi: bool = False


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("movielens-100k", "MovieLens 100K (943 users, 1,682 movies, 100k ratings)",
                    load_movielens_100k, GROUPLENS + "ml-100k.zip", from_pypi=True),
        DatasetInfo("movielens-1m", "MovieLens 1M (6,040 users, 3,706 movies, 1M ratings)",
                    load_movielens_1m, GROUPLENS + "ml-1m.zip"),
        DatasetInfo("movielens-latest", "MovieLens latest-small (ratings.csv/movies.csv)",
                    load_movielens_csv, GROUPLENS + "ml-latest-small.zip"),
        DatasetInfo("movielens-25m", "MovieLens 25M (ratings.csv/movies.csv)",
                    load_movielens_csv, GROUPLENS + "ml-25m.zip"),
        DatasetInfo("amazon-books", "Amazon Review Data 2018, Books (local files only: --from)",
                    load_amazon_books),
    )
}  # fmt: skip


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}") from None


def fetch_dataset(name: str, source: Path | None = None, timeout: float = 10.0) -> tuple[Path, str]:
    """Put the raw files of `name` into the cache; return the folder and where they came from."""
    info = dataset_info(name)
    target = data_cache(name)
    if source is not None:
        path = fetch.fetch_from_path(source, target)
        info.loader(path)  # refuse a folder that does not hold this data set
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


def load_dataset(name: str, source: Path | None = None, skip_malformed: bool = False, **options: object) -> RawDataset:
    """Load `name` from `source`, or from the cache where `corella data fetch` put it."""
    info = dataset_info(name)
    folder = Path(source) if source is not None else data_cache(name)
    if not folder.exists():
        raise DataSourceError(
            f"{name} is not in the cache ({folder}); run `corella data fetch {name}` or pass --from PATH"
        )
    raw = info.loader(folder, skip_malformed=skip_malformed, **options)
    raw.name = name
    return raw
