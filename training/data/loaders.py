"""Readers for each supported raw format, all producing a `RawDataset`.

A malformed line raises `DataError` naming the file and the line; with `skip_malformed=True` it
is skipped and counted in `RawDataset.errors` instead.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from runtime.errors import DataError
from runtime.features import normalize_user_attributes
from training.data.schema import LineErrors, RawDataset

__all__ = [
    "load_movielens_100k",
    "load_movielens_1m",
    "load_movielens_csv",
    "load_amazon_books",
    "kcore_filter",
]

_YEAR_IN_TITLE = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:[-–]\d{0,4})?\)\s*$")

# GroupLens u.genre order for the 19 genre flags of u.item.
_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip

# MovieLens-1M occupation codes (README of ml-1m).
_ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "k-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip


def _open_text(path: Path, encoding: str) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, errors="strict")
    return open(path, encoding=encoding, errors="strict", newline="")  # noqa: SIM115


def _records(
    path: Path,
    parse: Callable[[str], Any],
    errors: LineErrors,
    skip_malformed: bool,
    encoding: str = "utf-8",
    header: bool = False,
) -> Iterator[Any]:
    """Yield parse(line) for every non-empty line; name file and line on failure."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with _open_text(path, encoding) as handle:
        lineno = 0
        try:
            for lineno, line in enumerate(handle, start=1):
                if (header and lineno == 1) or not line.strip():
                    continue
                try:
                    yield parse(line.rstrip("\r\n"))
                except (ValueError, IndexError, KeyError, TypeError) as exc:
                    if not skip_malformed:
                        raise DataError(
                            f"{path}:{lineno}: malformed line ({exc}): {line.strip()[:120]!r}; "
                            "pass --skip-malformed to skip and count such lines"
                        ) from exc
                    errors.add(str(path))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno + 1}: not valid {encoding} text ({exc})") from exc


def _split_fields(sep: str, count: int) -> Callable[[str], list[str]]:
    def split(line: str) -> list[str]:
        fields = line.split(sep)
        if len(fields) < count:
            raise ValueError(f"expected {count} fields separated by {sep!r}, found {len(fields)}")
        return fields

    return split


def _interaction(user: str, item: str, rating: str, timestamp: str) -> tuple[str, str, float, int]:
    user, item = user.strip(), item.strip()
    if not user or not item:
        raise ValueError("empty user or item id")
    return user, item, float(rating), int(float(timestamp))


def _interactions_frame(rows: list[tuple[str, str, float, int]], path: Path) -> pd.DataFrame:
    if not rows:
        raise DataError(f"{path}: no interactions found")
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    return frame.astype({"rating": "float64", "timestamp": "int64"})


def _users_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    records = [{"user": r["user"], **normalize_user_attributes(r)} for r in rows]
    return pd.DataFrame(records).set_index("user") if records else pd.DataFrame(index=pd.Index([], name="user"))


def _items_frame(rows: list[tuple[str, str, str | None, tuple[str, ...]]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["item", "title", "year", "tags"])
    return frame.drop_duplicates("item", keep="last").set_index("item")


def _title_and_year(text: str) -> tuple[str, str | None]:
    match = _YEAR_IN_TITLE.match(text.strip())
    if match:
        return match.group("title"), match.group("year")
    return text.strip(), None


# ---------------------------------------------------------------------------- MovieLens 100K
def load_movielens_100k(folder: Path, skip_malformed: bool = False) -> RawDataset:
    """GroupLens `u.data/u.user/u.item`, or RecBole atomic `ml-100k.inter/.user/.item`."""
    folder = Path(folder)
    if (folder / "u.data").exists():
        return _load_ml100k_grouplens(folder, skip_malformed)
    atomic = sorted(folder.glob("*.inter"))
    if atomic:
        return _load_recbole_atomic(atomic[0].with_suffix(""), skip_malformed)
    raise DataError(
        f"{folder}: no MovieLens-100K files (expected u.data/u.user/u.item or RecBole ml-100k.inter/.user/.item)"
    )


def _load_ml100k_grouplens(folder: Path, skip: bool) -> RawDataset:
    errors = LineErrors()
    split_tab = _split_fields("\t", 4)
    inter = list(_records(folder / "u.data", lambda line: _interaction(*split_tab(line)[:4]), errors, skip))

    def user(line: str) -> dict[str, Any]:
        f = _split_fields("|", 5)(line)
        int(f[1])
        return {"user": f[0], "age": f[1], "gender": f[2], "occupation": f[3], "zip": f[4]}

    def item(line: str) -> tuple[str, str, str | None, tuple[str, ...]]:
        f = _split_fields("|", 24)(line)
        title, year = _title_and_year(f[1])
        flags = [int(x) for x in f[5:24]]
        return f[0], title, year, tuple(g for g, on in zip(_ML100K_GENRES, flags, strict=True) if on)

    users = list(_records(folder / "u.user", user, errors, skip, encoding="latin-1"))
    items = list(_records(folder / "u.item", item, errors, skip, encoding="latin-1"))
    return RawDataset(
        name="movielens-100k",
        interactions=_interactions_frame(inter, folder / "u.data"),
        users=_users_frame(users),
        items=_items_frame(items),
        rating_max=5.0,
        like_threshold=4.0,
        errors=errors,
    )


def _load_recbole_atomic(stem: Path, skip: bool) -> RawDataset:
    errors = LineErrors()

    def header_index(path: Path) -> dict[str, int]:
        with _open_text(path, "utf-8") as handle:
            first = handle.readline().rstrip("\r\n")
        return {name.split(":")[0]: i for i, name in enumerate(first.split("\t"))}

    inter_path, user_path, item_path = (stem.with_suffix(s) for s in (".inter", ".user", ".item"))
    cols = header_index(inter_path)
    need = [cols[c] for c in ("user_id", "item_id", "rating", "timestamp")]
    inter = list(
        _records(
            inter_path,
            lambda line: _interaction(*(_split_fields("\t", len(cols))(line)[i] for i in need)),
            errors,
            skip,
            header=True,
        )
    )
    users: list[dict[str, Any]] = []
    if user_path.exists():
        ucols = header_index(user_path)

        def user(line: str) -> dict[str, Any]:
            f = _split_fields("\t", len(ucols))(line)
            row = {"user": f[ucols["user_id"]]}
            for src, dst in (("age", "age"), ("gender", "gender"), ("occupation", "occupation")):
                if src in ucols:
                    row[dst] = f[ucols[src]]
            if "zip_code" in ucols:
                row["zip"] = f[ucols["zip_code"]]
            if "age" in row:
                int(row["age"])
            return row

        users = list(_records(user_path, user, errors, skip, header=True))
    items: list[tuple[str, str, str | None, tuple[str, ...]]] = []
    if item_path.exists():
        icols = header_index(item_path)

        def item(line: str) -> tuple[str, str, str | None, tuple[str, ...]]:
            f = _split_fields("\t", len(icols))(line)
            year = f[icols["release_year"]].strip() if "release_year" in icols else None
            tags = tuple(f[icols["class"]].split()) if "class" in icols else ()
            return f[icols["item_id"]], f[icols["movie_title"]].strip(), year or None, tags

        items = list(_records(item_path, item, errors, skip, header=True))
    return RawDataset(
        name="movielens-100k",
        interactions=_interactions_frame(inter, inter_path),
        users=_users_frame(users),
        items=_items_frame(items),
        rating_max=5.0,
        like_threshold=4.0,
        errors=errors,
    )


# ---------------------------------------------------------------------------- MovieLens 1M
def load_movielens_1m(folder: Path, skip_malformed: bool = False) -> RawDataset:
    """`ratings.dat/users.dat/movies.dat`, fields separated by '::', latin-1."""
    folder, errors, skip = Path(folder), LineErrors(), skip_malformed
    split = _split_fields("::", 3)
    inter = list(
        _records(
            folder / "ratings.dat",
            lambda line: _interaction(*_split_fields("::", 4)(line)[:4]),
            errors,
            skip,
            "latin-1",
        )
    )

    def user(line: str) -> dict[str, Any]:
        f = _split_fields("::", 5)(line)
        occupation = _ML1M_OCCUPATIONS[int(f[3])]
        return {"user": f[0], "gender": f[1], "age": f[2], "occupation": occupation, "zip": f[4]}

    def movie(line: str) -> tuple[str, str, str | None, tuple[str, ...]]:
        f = split(line)
        title, year = _title_and_year(f[1])
        return f[0], title, year, tuple(g for g in f[2].split("|") if g)

    users = list(_records(folder / "users.dat", user, errors, skip, "latin-1"))
    items = list(_records(folder / "movies.dat", movie, errors, skip, "latin-1"))
    return RawDataset(
        name="movielens-1m",
        interactions=_interactions_frame(inter, folder / "ratings.dat"),
        users=_users_frame(users),
        items=_items_frame(items),
        rating_max=5.0,
        like_threshold=4.0,
        errors=errors,
    )


# ---------------------------------------------------------------------------- MovieLens latest / 25M
def load_movielens_csv(folder: Path, skip_malformed: bool = False) -> RawDataset:
    """`ratings.csv` (userId,movieId,rating,timestamp; half stars) and `movies.csv`."""
    folder, errors, skip = Path(folder), LineErrors(), skip_malformed

    def csv_fields(count: int) -> Callable[[str], list[str]]:
        def parse(line: str) -> list[str]:
            fields = next(csv.reader([line]))
            if len(fields) != count:
                raise ValueError(f"expected {count} comma-separated fields, found {len(fields)}")
            return fields

        return parse

    ratings = csv_fields(4)
    inter = list(_records(folder / "ratings.csv", lambda line: _interaction(*ratings(line)), errors, skip, header=True))

    def movie(line: str) -> tuple[str, str, str | None, tuple[str, ...]]:
        f = csv_fields(3)(line)
        title, year = _title_and_year(f[1])
        genres = tuple(g for g in f[2].split("|") if g and g != "(no genres listed)")
        return f[0], title, year, genres

    items = list(_records(folder / "movies.csv", movie, errors, skip, header=True))
    return RawDataset(
        name="movielens-latest",
        interactions=_interactions_frame(inter, folder / "ratings.csv"),
        users=_users_frame([]),
        items=_items_frame(items),
        rating_max=5.0,
        like_threshold=4.0,
        errors=errors,
    )


# ---------------------------------------------------------------------------- Amazon-Books
def _find(folder: Path, patterns: tuple[str, ...], what: str) -> Path:
    for pattern in patterns:
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    raise DataError(f"{folder}: no {what} file (looked for {', '.join(patterns)})")


def load_amazon_books(folder: Path, skip_malformed: bool = False, kcore: int = 0) -> RawDataset:
    """Amazon Review Data 2018 Books: review JSON lines (reviewerID, asin, overall,
    unixReviewTime) and metadata JSON lines (asin, title, category). Label: rating == 5."""
    folder, errors, skip = Path(folder), LineErrors(), skip_malformed
    reviews_path = _find(folder, ("Books.json*", "*reviews*.json*", "reviews*.jsonl*"), "review")
    meta_path = _find(folder, ("meta_Books.json*", "meta*.json*"), "metadata")

    def review(line: str) -> tuple[str, str, float, int]:
        r = json.loads(line)
        return _interaction(r["reviewerID"], r["asin"], r["overall"], r["unixReviewTime"])

    def meta(line: str) -> tuple[str, str, str | None, tuple[str, ...]]:
        m = json.loads(line)
        categories = tuple(c for c in m.get("category", []) if c and c != "Books")
        return str(m["asin"]), str(m.get("title") or m["asin"]).strip(), None, categories

    def safe(parse: Callable[[str], Any]) -> Callable[[str], Any]:
        def wrapped(line: str) -> Any:
            try:
                return parse(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON: {exc.msg}") from exc

        return wrapped

    inter = list(_records(reviews_path, safe(review), errors, skip))
    items = list(_records(meta_path, safe(meta), errors, skip))
    interactions = _interactions_frame(inter, reviews_path)
    if kcore > 1:
        interactions = kcore_filter(interactions, kcore)
    return RawDataset(
        name="amazon-books",
        interactions=interactions,
        users=_users_frame([]),
        items=_items_frame(items),
        rating_max=5.0,
        like_threshold=5.0,
        item_noun="book",
        errors=errors,
    )


def kcore_filter(interactions: pd.DataFrame, k: int) -> pd.DataFrame:
    """Repeatedly drop users and items with fewer than k interactions."""
    frame = interactions.drop_duplicates(["user", "item"], keep="last")
    while True:
        user_counts = frame["user"].map(frame["user"].value_counts())
        item_counts = frame["item"].map(frame["item"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            return frame.reset_index(drop=True)
        frame = frame[keep]
