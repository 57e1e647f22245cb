"""The one loader path: a data set spec's files -> checked, normalized tables -> a `RawDataset`.

Files are read with pyarrow in streamed batches (CSV, TSV and Parquet natively; JSON Lines line by
line, since a field's JSON type may change from row to row). Every value is checked, and a bad one
raises `DataError` in one line that names the file, the row (data rows, counted from 1), the column
and the value; with `skip_malformed` such rows are dropped and counted in `RawDataset.errors`.

`import_dataset` writes the normalized tables as Parquet into the data cache (a temporary folder,
renamed into place when complete); `load_imported` reads them back. Interactions stream from the
source file to the Parquet file batch by batch, so an import's memory does not grow with its rows.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from runtime.catalog import attribute_tags
from runtime.errors import DataError
from runtime.features import normalize_user_attributes
from training.data.schema import LineErrors, RawDataset, clean_text
from training.data.spec import DatasetSpec, InteractionsSpec, ItemsSpec, Source, UsersSpec, Words

__all__ = ["read_batches", "load_spec", "import_dataset", "load_imported", "is_imported", "kcore_filter",
           "IMPORT_FORMAT"]  # fmt: skip

#: the normalized copy's format: bumped when its tables change
IMPORT_FORMAT = 1
_BATCH_BYTES = 16 << 20  # CSV block size
_BATCH_ROWS = 1 << 17  # JSON Lines and Parquet rows a batch
_YEAR_IN_TITLE = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:[-–]\d{0,4})?\)\s*$")
_DELIMITERS = (",", "\t", ";", "|")


# ---------------------------------------------------------------------------- reading
class _Replaced(io.RawIOBase):
    """A byte stream with every `old` replaced by one byte (a multi-character delimiter such as
    MovieLens-1M's "::" for pyarrow, whose reader takes a single character)."""

    def __init__(self, raw: BinaryIO, old: bytes, new: bytes) -> None:
        self.raw, self.old, self.new, self.held = raw, old, new, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self.raw.read(max(len(buffer), 1 << 16))
        data = self.held + (chunk or b"")
        if chunk:  # keep what could be the start of a delimiter for the next read
            keep = next((k for k in range(len(self.old) - 1, 0, -1) if data.endswith(self.old[:k])), 0)
            data, self.held = (data[:-keep], data[-keep:]) if keep else (data, b"")
        else:
            self.held = b""
        data = data.replace(self.old, self.new)
        if len(data) > len(buffer):  # rare: hand back what does not fit
            self.held = data[len(buffer) :] + self.held
            data = data[: len(buffer)]
        buffer[: len(data)] = data
        return len(data)


def _open_bytes(path: Path) -> BinaryIO:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _first_line(source: Source) -> str:
    with _open_bytes(source.path) as handle:
        raw = handle.readline(1 << 20)
    try:
        return codecs.decode(raw, source.encoding).rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{source.path}: row 1: not valid {source.encoding} text ({exc.reason}); "
                        "set `encoding` in the spec (e.g. latin-1)") from None  # fmt: skip
    except LookupError:
        raise DataError(f"{source.path}: unknown encoding {source.encoding!r}") from None


def _split(line: str, delimiter: str, quote: bool) -> list[str]:
    if quote and len(delimiter) == 1:
        return next(csv.reader([line], delimiter=delimiter), [])
    return line.split(delimiter)


def _delimiter_hint(fields: list[str], source: Source) -> str:
    if len(fields) > 1:
        return ""
    found = [d for d in _DELIMITERS if d != source.delimiter and d in fields[0]]
    return (
        f"; its first line has one field: is the delimiter {found[0]!r} rather than {source.delimiter!r}?"
        if found
        else ""
    )


def _check_columns(source: Source, have: Sequence[str], need: Sequence[str], hint: str = "") -> None:
    missing = [c for c in need if c not in have]
    if missing:
        shown = ", ".join(repr(h) for h in list(have)[:12]) + (" ..." if len(have) > 12 else "")
        raise DataError(f"{source.path}: no column {missing[0]!r} (the file has {shown}){hint}")


def read_batches(source: Source, columns: Sequence[str], skip: LineErrors | None = None
                 ) -> Iterator[tuple[int, dict[str, pa.Array]]]:  # fmt: skip
    """Yield (first row number, {column: values}) batches of `columns` of `source`. Text formats
    give string arrays; Parquet its own types; lists stay lists. With `skip`, rows of the wrong
    shape are counted there and dropped; without, the first one raises `DataError`."""
    columns = list(dict.fromkeys(columns))
    if source.format == "parquet":
        yield from _parquet_batches(source, columns)
    elif source.format == "jsonl":
        yield from _jsonl_batches(source, columns, skip)
    else:
        yield from _csv_batches(source, columns, skip)


def _csv_batches(
    source: Source, columns: list[str], skip: LineErrors | None
) -> Iterator[tuple[int, dict[str, pa.Array]]]:
    first = _split(_first_line(source), source.delimiter, source.quote)
    names = list(source.names) if source.names is not None else [f.strip() for f in first]
    hint = _delimiter_hint(first, source)
    _check_columns(source, names, columns, hint)
    if source.names is not None and len(first) < len(names) and hint:
        raise DataError(f"{source.path}: row 1 has {len(first)} field, {len(names)} named{hint}")
    delimiter = source.delimiter
    stream: BinaryIO = _open_bytes(source.path)
    if len(delimiter) > 1:
        stream = io.BufferedReader(_Replaced(stream, delimiter.encode(source.encoding), b"\x1f"), 1 << 20)
        delimiter = "\x1f"
    bad: list[tuple[int | None, str]] = []

    def invalid(row: Any) -> str:
        if skip is not None:
            skip.add(str(source.path))
            return "skip"
        bad.append((row.number, f"expected {row.expected_columns} fields, found {row.actual_columns}"))
        return "error"

    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1 if source.header else 0,
                                           encoding=source.encoding, block_size=_BATCH_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if source.quote else False,
                                             invalid_row_handler=invalid),
            convert_options=pacsv.ConvertOptions(include_columns=columns,
                                                 column_types={c: pa.string() for c in columns},
                                                 strings_can_be_null=True, quoted_strings_can_be_null=False),
        )  # fmt: skip
        start, rows = 1, 0
        for batch in reader:
            yield start, {c: batch.column(c) for c in columns}
            start += batch.num_rows
            rows += batch.num_rows
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        if bad:
            line, what = bad[0]
            line = line if line is not None else _bad_line(source, len(names))
            where = f"line {line}" if line is not None else "a row"
            raise DataError(f"{source.path}: {where}: {what}{hint}; pass --skip-malformed to skip and count such rows"
                            ) from None  # fmt: skip
        raise DataError(f"{source.path}: cannot be read as {source.format} ({str(exc).splitlines()[0]})") from None
    finally:
        stream.close()
    if rows == 0:
        raise DataError(f"{source.path}: empty file (no rows{' after the header' if source.header else ''})")


def _bad_line(source: Source, fields: int) -> int | None:
    """The first line whose field count is not `fields` (where pyarrow could not say)."""
    with io.TextIOWrapper(_open_bytes(source.path), encoding=source.encoding, errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip() and len(_split(line.rstrip("\r\n"), source.delimiter, source.quote)) != fields:
                return number
    return None


def _parquet_batches(source: Source, columns: list[str]) -> Iterator[tuple[int, dict[str, pa.Array]]]:
    if not source.path.exists():
        raise DataError(f"{source.path}: file not found")
    try:
        reader = pq.ParquetFile(source.path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{source.path}: not a Parquet file ({exc})") from None
    _check_columns(source, reader.schema_arrow.names, columns)
    start = 1
    for batch in reader.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        yield start, {c: batch.column(c) for c in columns}
        start += batch.num_rows
    if start == 1:
        raise DataError(f"{source.path}: empty file (no rows)")


def _jsonl_batches(
    source: Source, columns: list[str], skip: LineErrors | None
) -> Iterator[tuple[int, dict[str, pa.Array]]]:
    def flush(start: int, rows: list[dict[str, Any]]) -> tuple[int, dict[str, pa.Array]]:
        out = {}
        for c in columns:
            values = [r.get(c) for r in rows]
            if any(isinstance(v, list) for v in values):
                out[c] = pa.array([[str(x) for x in v] if isinstance(v, list) else ([] if v is None else [str(v)])
                                   for v in values], pa.list_(pa.string()))  # fmt: skip
            else:
                out[c] = pa.array([None if v is None else _scalar_text(v) for v in values], pa.string())
        return start, out

    rows: list[dict[str, Any]] = []
    start, number, seen = 1, 0, set()
    with io.TextIOWrapper(_open_bytes(source.path), encoding=source.encoding) as handle:
        try:
            for number, line in enumerate(handle, start=1):  # noqa: B007 - read below, after the loop
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    if skip is not None:
                        skip.add(str(source.path))
                        continue
                    raise DataError(f"{source.path}: line {number}: not a JSON object ({exc}); "
                                    "pass --skip-malformed to skip and count such rows") from None  # fmt: skip
                seen.update(row)
                rows.append(row)
                if len(rows) == _BATCH_ROWS:
                    yield flush(start, rows)
                    start, rows = start + len(rows), []
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{source.path}: line {number + 1}: not valid {source.encoding} text ({exc.reason})"
            ) from None
    if start == 1 and not rows:
        raise DataError(f"{source.path}: empty file (no rows)")
    if start == 1:
        _check_columns(source, sorted(seen), columns)
    if rows:
        yield flush(start, rows)


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict) else str(value)


# ---------------------------------------------------------------------------- checking values
class _Checker:
    """Reports (or, with skip, drops and counts) a batch's bad rows, one line per problem."""

    def __init__(self, path: Path, errors: LineErrors, skip: bool) -> None:
        self.path, self.errors, self.skip = path, errors, skip

    def bad(self, start: int, column: str, mask: np.ndarray, what: str, values: Any) -> np.ndarray:
        """Rows of `mask` are bad: raise naming the first, or return the keep-mask when skipping."""
        rows = np.flatnonzero(mask)
        if not len(rows):
            return np.ones(len(mask), dtype=bool)
        if self.skip:
            for _ in rows:
                self.errors.add(str(self.path))
            return ~mask
        value = values[int(rows[0])]
        value = value.as_py() if hasattr(value, "as_py") else value
        more = f" (and {len(rows) - 1:,} more rows in this batch: {', '.join(str(start + r) for r in rows[1:4])}" \
               f"{' ...' if len(rows) > 4 else ''})" if len(rows) > 1 else ""  # fmt: skip
        raise DataError(f"{self.path}: row {start + int(rows[0])}, column {column!r}: {what} ({value!r}){more}; "
                        "pass --skip-malformed to skip and count such rows")  # fmt: skip


def _ids(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Ids as trimmed text, and where they are missing."""
    text = pc.utf8_trim_whitespace(values.cast(pa.string()))
    missing = pc.fill_null(pc.equal(pc.utf8_length(text), 0), True).to_numpy(zero_copy_only=False)
    return text, missing


def _numbers(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """float64 values, and which did not parse (NaN where they did not)."""
    if pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_boolean(values.type):
        out = np.array(values.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        return out, np.isnan(out)
    text = pc.utf8_trim_whitespace(values.cast(pa.string()))
    try:
        out = np.array(text.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except pa.ArrowInvalid:
        out = pd.to_numeric(pd.Series(text.to_pylist(), dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    return out, np.isnan(out)


def _timestamps(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Unix seconds (int64) from numbers, or from date/time text (ISO 8601; UTC unless it says),
    and which did not parse."""
    if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
        seconds = pc.cast(pc.cast(values, pa.timestamp("s")), pa.int64()).to_numpy(zero_copy_only=False)
        bad = pc.is_null(values).to_numpy(zero_copy_only=False)
        return np.where(bad, 0, seconds).astype(np.int64), bad
    number, bad = _numbers(values)
    if bad.any() and not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        text = pd.Series(values.cast(pa.string()).to_pylist(), dtype=object)
        moments = pd.to_datetime(text[bad], utc=True, errors="coerce", format="ISO8601")
        parsed = moments.notna().to_numpy()
        rows = np.flatnonzero(bad)[parsed]
        epoch = pd.Timestamp(0, tz="UTC")
        number = number.copy()
        number[rows] = ((moments[parsed] - epoch) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
        bad[rows] = False
    bad |= ~np.isfinite(np.where(bad, 0.0, number)) | (np.abs(np.where(bad, 0.0, number)) > 2**62)
    return np.where(bad, 0, np.floor(np.where(bad, 0.0, number))).astype(np.int64), bad


def _interaction_batches(spec: InteractionsSpec, errors: LineErrors, skip: bool) -> Iterator[pa.Table]:
    """The interactions, checked and normalized: user, item (str), rating (float64), timestamp (int64)."""
    feedback = spec.label or spec.rating
    assert feedback is not None
    check = _Checker(spec.source.path, errors, skip)
    columns = [spec.user, spec.item, feedback, spec.timestamp]
    for start, batch in read_batches(spec.source, columns, errors if skip else None):
        user, no_user = _ids(batch[spec.user])
        item, no_item = _ids(batch[spec.item])
        keep = check.bad(start, spec.user, no_user, "empty user id", batch[spec.user])
        keep &= check.bad(start, spec.item, no_item, "empty item id", batch[spec.item])
        value, not_number = _numbers(batch[feedback])
        if spec.implicit:
            keep &= check.bad(start, feedback, not_number | ~np.isin(value, (0.0, 1.0)), "a label must be 0 or 1",
                              batch[feedback])  # fmt: skip
        else:
            low, high = spec.rating_range
            keep &= check.bad(start, feedback, not_number, "a rating must be a number", batch[feedback])
            keep &= check.bad(start, feedback, ~not_number & ((value < low) | (value > high)),
                              f"rating outside the declared range [{low:g}, {high:g}]", batch[feedback])  # fmt: skip
        timestamp, no_time = _timestamps(batch[spec.timestamp])
        keep &= check.bad(start, spec.timestamp, no_time,
                          "timestamp does not parse (unix seconds, or a date/time such as 2024-05-01T12:00:00Z)",
                          batch[spec.timestamp])  # fmt: skip
        table = pa.table({"user": user, "item": item, "rating": pa.array(value, pa.float64()),
                          "timestamp": pa.array(timestamp, pa.int64())})  # fmt: skip
        yield table if keep.all() else table.filter(pa.array(keep))


# ---------------------------------------------------------------------------- catalog and users
def _whole(source: Source, columns: list[str], errors: LineErrors, skip: bool) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for _, batch in read_batches(source, columns, errors if skip else None):
        for c in columns:
            out[c].extend(batch[c].to_pylist())
    return out


def _load_items(spec: ItemsSpec, errors: LineErrors, skip: bool) -> pd.DataFrame:
    columns = [c for c in (spec.id, spec.title, spec.year, spec.tags) if c]
    columns += [*spec.text, *spec.tag_flags, *spec.attributes, *spec.numbers]
    data = _whole(spec.source, columns, errors, skip)
    ids = [clean_text(v) for v in data[spec.id]]
    check = _Checker(spec.source.path, errors, skip)
    keep = check.bad(1, spec.id, np.array([i is None for i in ids], dtype=bool), "empty item id", ids)
    counts = pd.Series(ids).value_counts()
    repeated = counts[counts > 1]
    if len(repeated) and spec.duplicates == "error":
        first = repeated.index[0]
        rows = [str(r + 1) for r, i in enumerate(ids) if i == first][:4]
        raise DataError(f"{spec.source.path}: rows {', '.join(rows)}, column {spec.id!r}: duplicate item id "
                        f"{first!r} ({len(repeated):,} ids repeat); fix the file, or set `duplicates = \"last\"` in "
                        "[items]")  # fmt: skip
    skip_tags = set(spec.skip_tags)
    records = []
    for row, item in enumerate(ids):
        if not keep[row]:
            continue
        title = clean_text(data[spec.title][row]) if spec.title else None
        year = clean_text(data[spec.year][row]) if spec.year else None
        if spec.year_from_title and title and (match := _YEAR_IN_TITLE.match(title)):
            title, year = match.group("title"), year or match.group("year")
        tags: list[str] = []
        if spec.tags:
            value = data[spec.tags][row]
            parts = value if isinstance(value, list) else (str(value).split(spec.tag_separator) if value else [])
            tags += [t for t in (clean_text(p) for p in parts) if t]
        tags += [flag for flag in spec.tag_flags if clean_text(data[flag][row]) not in (None, "0", "false", "False")]
        tags = [t for t in dict.fromkeys(tags) if t not in skip_tags]
        numbers = {}
        for name in spec.numbers:
            value = clean_text(data[name][row])
            try:
                numbers[name] = float(value) if value is not None else None
            except ValueError:
                raise DataError(
                    f"{spec.source.path}: row {row + 1}, column {name!r}: not a number ({value!r})"
                ) from None
        tags += attribute_tags({a: clean_text(data[a][row]) for a in spec.attributes}, numbers)
        text = " ".join(t for t in (clean_text(data[c][row]) for c in spec.text) if t) or None
        records.append((item, title, year, tuple(tags), text))
    frame = pd.DataFrame(records, columns=["item", "title", "year", "tags", "text"])
    frame = frame.drop_duplicates("item", keep="last" if spec.duplicates == "last" else "first")
    return frame.set_index("item")


def _load_users(spec: UsersSpec, errors: LineErrors, skip: bool) -> pd.DataFrame:
    data = _whole(spec.source, [spec.id, *spec.attributes.values()], errors, skip)
    records = []
    for row, user in enumerate(data[spec.id]):
        user = clean_text(user)
        if user is None:
            continue
        raw = {name: clean_text(data[column][row]) for name, column in spec.attributes.items()}
        records.append({"user": user, **normalize_user_attributes(raw)})
    if not records:
        return pd.DataFrame(index=pd.Index([], name="user"))
    return pd.DataFrame(records).drop_duplicates("user", keep="last").set_index("user")


# ---------------------------------------------------------------------------- data sets
def _dataset(spec: DatasetSpec, interactions: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame,
             errors: LineErrors) -> RawDataset:  # fmt: skip
    inter = spec.interactions
    return _raw(spec.name, interactions, users, items, errors, spec.rating_max, spec.like_threshold, spec.words,
                inter.implicit, inter.kcore)  # fmt: skip


def _raw(name: str, interactions: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame, errors: LineErrors,
         rating_max: float, like_threshold: float, words: Words, implicit: bool, kcore: int) -> RawDataset:  # fmt: skip
    if kcore > 1:
        interactions = kcore_filter(interactions, kcore)
    return RawDataset(name=name, interactions=interactions, users=users, items=items, rating_max=rating_max,
                      like_threshold=like_threshold, words=words, implicit=implicit, errors=errors)  # fmt: skip


def _empty_users() -> pd.DataFrame:
    return pd.DataFrame(index=pd.Index([], name="user"))


def _empty_items() -> pd.DataFrame:
    return pd.DataFrame(columns=["title", "year", "tags", "text"], index=pd.Index([], name="item"))


def load_spec(spec: DatasetSpec, skip_malformed: bool = False) -> RawDataset:
    """Read, check and normalize every file of `spec` in memory."""
    errors = LineErrors()
    tables = list(_interaction_batches(spec.interactions, errors, skip_malformed))
    interactions = pa.concat_tables(tables).to_pandas() if tables else None
    if interactions is None or not len(interactions):
        raise DataError(f"{spec.interactions.source.path}: no interactions left to load")
    items = _load_items(spec.items, errors, skip_malformed) if spec.items else _empty_items()
    users = _load_users(spec.users, errors, skip_malformed) if spec.users else _empty_users()
    return _dataset(spec, interactions, users, items, errors)


def is_imported(folder: Path) -> bool:
    return (folder / "dataset.json").exists()


def import_dataset(spec: DatasetSpec, target: Path, skip_malformed: bool = False,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Check every file of `spec` and write the normalized copy to `target` (Parquet tables and
    dataset.json): into a temporary folder first, renamed into place when complete."""
    errors = LineErrors()
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        items = _load_items(spec.items, errors, skip_malformed) if spec.items else _empty_items()
        users = _load_users(spec.users, errors, skip_malformed) if spec.users else _empty_users()
        rows = unlisted = 0
        known = pa.array(items.index.to_numpy(dtype=str), pa.string())
        schema = pa.schema([("user", pa.string()), ("item", pa.string()), ("rating", pa.float64()),
                            ("timestamp", pa.int64())])  # fmt: skip
        first = last = None
        with pq.ParquetWriter(staging / "interactions.parquet", schema, compression="zstd") as writer:
            for table in _interaction_batches(spec.interactions, errors, skip_malformed):
                writer.write_table(table)
                rows += table.num_rows
                unlisted += table.num_rows - pc.sum(pc.is_in(table["item"], value_set=known)).as_py() \
                    if len(items) else table.num_rows  # fmt: skip
                lo, hi = pc.min_max(table["timestamp"]).values()
                first = lo.as_py() if first is None else min(first, lo.as_py())
                last = hi.as_py() if last is None else max(last, hi.as_py())
                if progress:
                    progress(table.num_rows)
        if rows == 0:
            raise DataError(f"{spec.interactions.source.path}: no interactions left to import")
        items.assign(tags=[list(t) for t in items["tags"]]).to_parquet(staging / "items.parquet")
        users.to_parquet(staging / "users.parquet")
        meta = {
            "format": IMPORT_FORMAT,
            "name": spec.name,
            "description": spec.description,
            "spec": str(spec.path) if spec.path else None,
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - started, 1),
            "implicit": spec.interactions.implicit,
            "rating_max": spec.rating_max,
            "like_threshold": spec.like_threshold,
            "kcore": spec.interactions.kcore,
            "words": asdict(spec.words),
            "counts": {"interactions": rows, "items": len(items), "users": len(users),
                       "unlisted_item_interactions": int(unlisted)},
            "time_span": [first, last],
            "skipped_rows": errors.skipped,
        }  # fmt: skip
        (staging / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def load_imported(folder: Path, name: str | None = None) -> RawDataset:
    """A data set written by `import_dataset`."""
    try:
        meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
        if meta.get("format") != IMPORT_FORMAT:
            raise DataError(f"{folder}: an imported data set of format {meta.get('format')}, this corella reads "
                            f"{IMPORT_FORMAT}; import it again (`corella data import SPEC`)")  # fmt: skip
        interactions = pq.read_table(folder / "interactions.parquet", read_dictionary=["user", "item"]).to_pandas()
        items = pd.read_parquet(folder / "items.parquet")
        users = pd.read_parquet(folder / "users.parquet")
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise DataError(f"{folder}: a damaged import ({exc}); import it again (`corella data import SPEC`)") from None
    # user and item stay categorical (each id's text once: 25M rows of object ids would take GBs)
    items["tags"] = [tuple(t) if t is not None else () for t in items["tags"]]
    errors = LineErrors(dict(meta.get("skipped_rows", {})))
    return _raw(name or meta["name"], interactions, users, items, errors, meta["rating_max"], meta["like_threshold"],
                Words(**meta["words"]), meta["implicit"], meta["kcore"])  # fmt: skip


def kcore_filter(interactions: pd.DataFrame, k: int) -> pd.DataFrame:
    """Repeatedly drop users and items with fewer than k interactions."""
    frame = interactions.astype({"user": str, "item": str}).drop_duplicates(["user", "item"], keep="last")
    while True:
        user_counts = frame["user"].map(frame["user"].value_counts())
        item_counts = frame["item"].map(frame["item"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            return frame.reset_index(drop=True)
        frame = frame[keep]
