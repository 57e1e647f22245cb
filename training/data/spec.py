"""A data set spec: which files hold the interactions, the items and the users, and which columns.

A spec is a TOML file (`corella data init` writes a commented template). Relative paths are read
from the spec's folder. Every data set corella loads, the built-in ones included (their specs ship
in `training/data/specs/`), is described this way and read by one path (`training/data/tables.py`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import DataError

__all__ = ["FORMATS", "Source", "InteractionsSpec", "ItemsSpec", "UsersSpec", "Words", "DatasetSpec", "TEMPLATE"]

#: file formats by their extensions (a text format may also end in .gz)
FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}  # fmt: skip

_SOURCE_KEYS = {"path", "format", "delimiter", "header", "names", "encoding", "quote"}


@dataclass(frozen=True)
class Source:
    """One file and how to read it."""

    path: Path
    format: str  # csv, tsv, parquet or jsonl
    delimiter: str = ","
    header: bool = True
    names: tuple[str, ...] | None = None  # the columns, where the file has no header
    encoding: str = "utf-8"
    quote: bool = True


@dataclass(frozen=True)
class InteractionsSpec:
    source: Source
    user: str
    item: str
    timestamp: str
    rating: str | None = None  # explicit feedback: a rating, a like at or above `like_threshold`
    label: str | None = None  # implicit feedback: 0/1 (a click, a purchase)
    like_threshold: float | None = None
    rating_range: tuple[float, float] = (1.0, 5.0)
    kcore: int = 0  # drop users and items with fewer interactions, repeatedly

    @property
    def implicit(self) -> bool:
        return self.label is not None


@dataclass(frozen=True)
class ItemsSpec:
    source: Source
    id: str
    title: str | None = None
    year: str | None = None
    year_from_title: bool = False  # "Heat (1995)" -> title "Heat", year "1995"
    text: tuple[str, ...] = ()  # free text the LLM reads (a description)
    tags: str | None = None  # a list column, or text split at `tag_separator`
    tag_separator: str = "|"
    tag_flags: tuple[str, ...] = ()  # 0/1 columns, each a tag named after its column
    skip_tags: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()  # categorical: a tag "name: value" each
    numbers: tuple[str, ...] = ()  # numeric: a tag "name ~range" each (powers of two)
    duplicates: str = "error"  # or "first" / "last": which row of a repeated id to keep


@dataclass(frozen=True)
class UsersSpec:
    source: Source
    id: str
    attributes: Mapping[str, str] = field(default_factory=dict)  # attribute -> column


@dataclass(frozen=True)
class Words:
    """What the prompt calls things: "A user clicked books ...", "the target book"."""

    noun: str = "item"
    plural: str | None = None
    verb: str = "liked"  # past tense: "liked", "clicked", "bought"

    @property
    def nouns(self) -> str:
        return self.plural or self.noun + "s"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: Path | None  # the spec file (None: built in code)
    interactions: InteractionsSpec
    items: ItemsSpec | None = None
    users: UsersSpec | None = None
    words: Words = field(default_factory=Words)
    description: str = ""

    @classmethod
    def load(cls, path: str | Path, folder: str | Path | None = None, name: str | None = None) -> DatasetSpec:
        """Read a spec file; relative file paths are taken from `folder` (default: the spec's)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: no such spec file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a valid TOML spec ({exc})") from exc
        return cls.parse(data, str(path), Path(folder) if folder is not None else path.parent, name)

    @classmethod
    def parse(cls, data: Mapping[str, Any], where: str, folder: Path, name: str | None = None) -> DatasetSpec:
        reader = _Reader(data, where, folder)
        reader.known({"name", "description", "words", "interactions", "items", "users"}, "")
        spec = cls(
            name=name or reader.text(data, "name", "", default=None) or Path(where).stem,
            path=Path(where),
            interactions=reader.interactions(),
            items=reader.items(),
            users=reader.users(),
            words=reader.words(),
            description=reader.text(data, "description", "", default="") or "",
        )
        return spec

    @property
    def rating_max(self) -> float:
        return 1.0 if self.interactions.implicit else self.interactions.rating_range[1]

    @property
    def like_threshold(self) -> float:
        inter = self.interactions
        return 1.0 if inter.implicit else float(inter.like_threshold)  # type: ignore[arg-type]

    def sources(self) -> list[Source]:
        return [t.source for t in (self.interactions, self.items, self.users) if t is not None]


class _Reader:
    """Turns the TOML tables into the spec's dataclasses; every mistake names the key."""

    def __init__(self, data: Mapping[str, Any], where: str, folder: Path) -> None:
        self.data, self.where, self.folder = data, where, folder

    def fail(self, table: str, message: str) -> DataError:
        return DataError(f"{self.where}: {'[' + table + '] ' if table else ''}{message}")

    def table(self, name: str, required: bool = False) -> Mapping[str, Any] | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise self.fail("", f"needs an [{name}] table")
            return None
        if not isinstance(value, Mapping):
            raise self.fail("", f"`{name}` must be a table ([{name}])")
        return value

    def known(self, keys: set[str], table: str, values: Mapping[str, Any] | None = None) -> None:
        unknown = sorted(set(values if values is not None else self.data) - keys)
        if unknown:
            raise self.fail(table, f"unknown key {', '.join(map(repr, unknown))}; known: {', '.join(sorted(keys))}")

    def text(self, values: Mapping[str, Any], key: str, table: str, default: Any = ...) -> Any:
        if key not in values:
            if default is ...:
                raise self.fail(table, f"needs `{key}`")
            return default
        value = values[key]
        if not isinstance(value, str) or not value:
            raise self.fail(table, f"`{key}` must be a non-empty string, not {value!r}")
        return value

    def texts(self, values: Mapping[str, Any], key: str, table: str) -> tuple[str, ...]:
        value = values.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(table, f"`{key}` must be a list of column names, not {value!r}")
        return tuple(value)

    def number(self, values: Mapping[str, Any], key: str, table: str, default: Any = ...) -> Any:
        if key not in values:
            if default is ...:
                raise self.fail(table, f"needs `{key}`")
            return default
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(table, f"`{key}` must be a number, not {value!r}")
        return value

    def flag(self, values: Mapping[str, Any], key: str, table: str, default: bool) -> bool:
        value = values.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(table, f"`{key}` must be true or false, not {value!r}")
        return value

    def source(self, values: Mapping[str, Any], table: str) -> Source:
        path = Path(self.text(values, "path", table)).expanduser()
        path = path if path.is_absolute() else self.folder / path
        if any(c in path.name for c in "*?["):  # a pattern: the first file it matches
            path = next(iter(sorted(path.parent.glob(path.name))), path)
        fmt = values.get("format")
        if fmt is None:
            suffixes = [s.lower() for s in path.suffixes]
            if suffixes and suffixes[-1] == ".gz":
                suffixes.pop()
            fmt = FORMATS.get(suffixes[-1] if suffixes else "")
            if fmt is None:
                shown = "".join(path.suffixes) or "(no extension)"
                raise DataError(f"{path}: unknown format {shown!r}; name the file .csv, .tsv, .parquet or "
                                f".jsonl, or set `format` in [{table}]")  # fmt: skip
        elif fmt not in {"csv", "tsv", "parquet", "jsonl"}:
            raise self.fail(table, f"unknown format {fmt!r}; use csv, tsv, parquet or jsonl")
        names = values.get("names")
        if names is not None:
            names = self.texts(values, "names", table)
        header = self.flag(values, "header", table, names is None)
        if not header and names is None:
            raise self.fail(table, "a file without a header needs `names` (its columns, in order)")
        delimiter = self.text(values, "delimiter", table, default="\t" if fmt == "tsv" else ",")
        return Source(path, fmt, delimiter, header, names, self.text(values, "encoding", table, default="utf-8"),
                      self.flag(values, "quote", table, True))  # fmt: skip

    def interactions(self) -> InteractionsSpec:
        t = self.table("interactions", required=True)
        assert t is not None
        self.known(_SOURCE_KEYS | {"user", "item", "timestamp", "rating", "label", "like_threshold",
                                   "rating_range", "kcore"}, "interactions", t)  # fmt: skip
        rating, label = self.text(t, "rating", "interactions", None), self.text(t, "label", "interactions", None)
        if (rating is None) == (label is None):
            raise self.fail("interactions", "needs either `rating` (explicit feedback, with `like_threshold`) "
                                            "or `label` (implicit feedback: 0/1), not both")  # fmt: skip
        threshold = self.number(t, "like_threshold", "interactions", None)
        if rating is not None and threshold is None:
            raise self.fail("interactions", "a `rating` needs `like_threshold` (a rating at or above it is a like)")
        bounds = t.get("rating_range", [1, 5])
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
            or bounds[0] >= bounds[1]
        ):
            raise self.fail("interactions", f"`rating_range` must be [low, high], not {bounds!r}")  # fmt: skip
        if threshold is not None and not bounds[0] < threshold <= bounds[1]:
            raise self.fail("interactions", f"`like_threshold` {threshold} lies outside `rating_range` {bounds}")
        kcore = self.number(t, "kcore", "interactions", 0)
        return InteractionsSpec(self.source(t, "interactions"), self.text(t, "user", "interactions"),
                                self.text(t, "item", "interactions"), self.text(t, "timestamp", "interactions"),
                                rating, label, threshold, (float(bounds[0]), float(bounds[1])), int(kcore))  # fmt: skip

    def items(self) -> ItemsSpec | None:
        t = self.table("items")
        if t is None:
            return None
        keys = {"id", "title", "year", "year_from_title", "text", "tags", "tag_separator", "tag_flags", "skip_tags",
                "attributes", "numbers", "duplicates"}  # fmt: skip
        self.known(_SOURCE_KEYS | keys, "items", t)
        duplicates = self.text(t, "duplicates", "items", default="error")
        if duplicates not in {"error", "first", "last"}:
            raise self.fail("items", f"`duplicates` must be error, first or last, not {duplicates!r}")
        return ItemsSpec(
            self.source(t, "items"), self.text(t, "id", "items"), self.text(t, "title", "items", None),
            self.text(t, "year", "items", None), self.flag(t, "year_from_title", "items", False),
            self.texts(t, "text", "items"), self.text(t, "tags", "items", None),
            self.text(t, "tag_separator", "items", "|"), self.texts(t, "tag_flags", "items"),
            self.texts(t, "skip_tags", "items"), self.texts(t, "attributes", "items"),
            self.texts(t, "numbers", "items"), duplicates,
        )  # fmt: skip

    def users(self) -> UsersSpec | None:
        t = self.table("users")
        if t is None:
            return None
        self.known(_SOURCE_KEYS | {"id", "attributes"}, "users", t)
        attributes = t.get("attributes", {})
        if isinstance(attributes, list):
            attributes = {a: a for a in self.texts(t, "attributes", "users")}
        if not isinstance(attributes, Mapping) or not all(isinstance(v, str) and v for v in attributes.values()):
            raise self.fail("users", "`attributes` must be a list of columns or a table {attribute = column}")
        reserved = {"user_id", "item_id", "year"} & set(attributes)
        if reserved:
            raise self.fail("users", f"attribute names {sorted(reserved)} are taken by the item's fields")
        return UsersSpec(self.source(t, "users"), self.text(t, "id", "users"), dict(attributes))

    def words(self) -> Words:
        t = self.table("words") or {}
        self.known({"noun", "plural", "verb"}, "words", t)
        return Words(self.text(t, "noun", "words", "item"), self.text(t, "plural", "words", None),
                     self.text(t, "verb", "words", "liked"))  # fmt: skip


TEMPLATE = """\
# A corella data set spec. `corella data import THIS_FILE --name NAME` checks the files and writes a
# normalized copy to the data cache; then `corella train --dataset NAME`, export, serve and bench.
# Paths are relative to this file. Formats: csv, tsv, parquet, jsonl (by extension, or `format`);
# text files may be gzipped (.csv.gz). Columns are named by the file's header (or by `names`).

name = "my-catalog"
description = "what this data set is"

[words]              # what the LLM's prompt calls things
noun = "book"        # "the target book"
plural = "books"
verb = "clicked"     # past tense: liked, clicked, bought

[interactions]       # one row per interaction
path = "interactions.csv"
user = "user_id"
item = "item_id"
timestamp = "timestamp"   # unix seconds, or a date/time such as 2024-05-01T12:00:00Z
label = "clicked"         # implicit feedback: 0/1 ...
# rating = "rating"       # ... or explicit feedback: a rating,
# like_threshold = 4      #     a like at or above this,
# rating_range = [1, 5]   #     every rating within this
# kcore = 5               # drop users and items with fewer interactions (repeatedly)
# delimiter = ","         # csv/tsv: the field separator (may be more than one character, e.g. "::")
# header = false          # csv/tsv without a header: then name the columns:
# names = ["user_id", "item_id", "clicked", "timestamp"]
# encoding = "latin-1"

[items]              # optional: the catalog (an item it does not list is kept, as "item <id>")
path = "items.jsonl"
id = "item_id"
title = "title"
# year = "year"
# year_from_title = true      # "Heat (1995)" -> "Heat", 1995
text = ["description"]        # free text the LLM reads about the item
tags = "genres"               # a list, or text split at tag_separator
# tag_separator = "|"
# tag_flags = ["Action", "Comedy"]   # 0/1 columns, each a tag named after its column
# attributes = ["format"]     # categorical: each becomes a tag "format: paperback"
# numbers = ["price"]         # numeric: each becomes a tag "price ~8-16"
# duplicates = "error"        # a repeated id: error, or keep the first / last row

# [users]            # optional: user attributes (categorical)
# path = "users.csv"
# id = "user_id"
# attributes = ["age", "gender", "country"]
"""
