"""The feature contract shared by training and serving (numpy only).

A sample is one (user, candidate item) pair with the user's attributes, the item's attributes,
the user's last K interactions strictly before the moment of the request, and running statistics
of the user and of the item over every interaction strictly before that moment (count, rating sum,
likes: `Totals`). `FeatureSpec.encode` turns a batch of raw samples into the five named arrays the
CRM reads; training calls the same function, so serving encodes exactly as training did.

Index 0 is padding and index 1 is the out-of-vocabulary bucket in every vocabulary: an unknown id
at serve time maps to 1 and never crashes anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import FeatureSpecError

__all__ = [
    "FEATURE_SPEC_VERSION",
    "PAD",
    "OOV",
    "INPUT_NAMES",
    "USER_ATTRIBUTES",
    "Vocabulary",
    "FeatureSpec",
    "age_bucket",
    "normalize_user_attributes",
    "history_windows",
    "STAT_NAMES",
    "TOTALS",
    "Statistics",
    "TagsByItem",
    "group_codes",
    "UserInteractions",
    "UserSummary",
    "running_totals",
]

#: 2: the running user/item statistics ("stats" input) joined the contract.
FEATURE_SPEC_VERSION = 2
PAD = 0
OOV = 1
_FIRST = 2

#: Names (and order) of the CRM's inputs: the ONNX graph and the runtime both use these.
INPUT_NAMES = ("categorical", "tags", "history_items", "history_ratings", "stats")

#: Columns of a totals array: interactions counted, their rating sum, how many were likes.
TOTALS = ("count", "rating_sum", "likes")

#: Columns of the "stats" input. Means and shares are shrunk with `prior` pseudo-interactions:
#: the item's and the user's towards the training split's figures, the genre's towards the user's.
#: user_bias: the mean of (rating - the item's shrunk mean just before that rating) over the
#: user's interactions; genre_*: the user's interactions with the target's tags (genres), one
#: count per shared tag.
STAT_NAMES = (
    "item_mean", "item_like", "item_log_count",
    "user_mean", "user_like", "user_log_count", "user_bias",
    "genre_mean", "genre_like", "genre_log_count",
)  # fmt: skip

#: User attributes a data set may have, in the order they appear among the categorical fields.
USER_ATTRIBUTES = ("age", "gender", "occupation", "zip")

# MovieLens-1M's age groups; MovieLens-100K's exact ages are bucketed into them.
_AGE_BOUNDS = (18, 25, 35, 45, 50, 56)
_AGE_LABELS = ("1", "18", "25", "35", "45", "50", "56")


def age_bucket(age: str | int | float) -> str:
    """MovieLens-1M style age group of an age in years ("1" = under 18, ..., "56" = 56+)."""
    try:
        years = float(age)
    except (TypeError, ValueError):
        return str(age)
    return _AGE_LABELS[int(np.searchsorted(_AGE_BOUNDS, years, side="right"))]


def normalize_user_attributes(attributes: Mapping[str, Any]) -> dict[str, str]:
    """Raw user attributes -> the tokens the vocabularies hold (age group, 2-character zip prefix;
    any other attribute of a data set's own, stripped and lower-cased).

    Idempotent: normalizing an already normalized profile changes nothing.
    """
    out: dict[str, str] = {}
    for name, value in attributes.items():
        if (
            value is None
            or (isinstance(value, str) and not value.strip())
            or (isinstance(value, float) and value != value)
        ):
            continue
        if name == "age":
            out[name] = age_bucket(value)
        elif name == "zip":
            out[name] = str(value).strip()[:2].upper()
        elif name == "gender":
            out[name] = str(value).strip().upper()[:1]
        else:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            out[name] = str(value).strip().lower()
    return out


@dataclass(frozen=True)
class Vocabulary:
    """Known values of one field; value i of `values` has index i + 2 (0 = pad, 1 = OOV)."""

    values: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {v: i + _FIRST for i, v in enumerate(self.values)})

    @classmethod
    def build(cls, values: Sequence[Any], min_count: int = 1) -> Vocabulary:
        """Vocabulary of the values seen at least `min_count` times, most frequent first."""
        counts: dict[str, int] = {}
        for value in values:
            key = str(value)
            counts[key] = counts.get(key, 0) + 1
        return cls.from_counts(counts, min_count)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int = 1) -> Vocabulary:
        """`build` from counts already made (of many values: counted by the caller at numpy speed)."""
        kept = sorted((k for k, c in counts.items() if c >= min_count), key=lambda k: (-counts[k], k))
        return cls(tuple(kept))

    @property
    def size(self) -> int:
        """Rows an embedding table for this field needs (pad and OOV included)."""
        return len(self.values) + _FIRST

    def index(self, value: Any) -> int:
        if value is None:
            return PAD
        return self._index.get(str(value), OOV)

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        lookup = self._index.get
        return np.fromiter(
            (PAD if v is None else lookup(str(v), OOV) for v in values),
            dtype=np.int64,
            count=len(values),
        )


@dataclass(frozen=True)
class Statistics:
    """The running totals behind a batch's "stats" input (float64, columns `TOTALS`).

    user: [B, 4] or [1, 4] (one user for every row), `TOTALS` plus the sum of the user's rating
    deviations from the items' shrunk means; item: [B, 3]; genre: [B, 3], the user's per-tag
    totals summed over each target's tags.
    """

    user: np.ndarray
    item: np.ndarray
    genre: np.ndarray


@dataclass(frozen=True)
class TagsByItem:
    """Every interaction's item tags, given once per item: `item` [N] indexes `catalog`, whose
    entries are the items' tags (what `running_statistics` takes for many rows: no per-row lists)."""

    item: np.ndarray
    catalog: Sequence[Sequence[str]]

    def expand(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(row, tag code) of every (interaction, distinct tag of its item), rows ascending and each
        row's tags in catalog order; and how many tag codes there are."""
        codes: dict[str, int] = {}
        entries = [[codes.setdefault(t, len(codes)) for t in dict.fromkeys(tags)] for tags in self.catalog]
        counts = np.array([len(e) for e in entries], dtype=np.int64)
        flat = np.array([c for e in entries for c in e], dtype=np.int64)
        starts = np.r_[0, np.cumsum(counts)[:-1]] if len(counts) else counts
        item = np.asarray(self.item, dtype=np.int64)
        per_row = counts[item]
        rows = np.repeat(np.arange(len(item), dtype=np.int64), per_row)
        within = np.arange(len(rows), dtype=np.int64) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        return rows, flat[np.repeat(starts[item], per_row) + within], len(codes)


@dataclass(frozen=True)
class UserInteractions:
    """Every interaction of one user strictly before the request (the serving side's view):
    ratings, each item's totals (count, rating sum) just before that rating, each item's tags."""

    ratings: Sequence[float]
    item_counts_before: Sequence[float]
    item_sums_before: Sequence[float]
    item_tags: Sequence[Sequence[str]]


@dataclass(frozen=True)
class UserSummary:
    """A user's past reduced to what the statistics read: (count, rating sum, likes, deviation
    sum) and, per tag, (count, rating sum, likes)."""

    totals: tuple[float, float, float, float]
    per_tag: Mapping[str, tuple[float, float, float]]


@dataclass(frozen=True)
class FeatureSpec:
    """Versioned feature contract, saved as features.json beside every model."""

    categorical_fields: tuple[str, ...]
    vocabularies: Mapping[str, Vocabulary]
    history_length: int
    max_tags: int
    rating_max: float
    like_threshold: float
    global_mean: float = 0.0  # mean rating of the training split
    global_like: float = 0.0  # share of likes in the training split
    prior: float = 10.0  # pseudo-interactions at the global figures that shrink every mean and share
    version: int = FEATURE_SPEC_VERSION

    def __post_init__(self) -> None:
        missing = [f for f in (*self.categorical_fields, "tag") if f not in self.vocabularies]
        if missing:
            raise FeatureSpecError(f"feature spec has no vocabulary for {missing}")
        if self.categorical_fields[:2] != ("user_id", "item_id"):
            raise FeatureSpecError("the first two categorical fields must be user_id and item_id")

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        *,
        user_ids: Sequence[Any],
        item_ids: Sequence[Any],
        user_attributes: Sequence[Mapping[str, Any]],
        item_years: Sequence[Any],
        item_tags: Sequence[Sequence[str]],
        history_items: Sequence[Sequence[Any]],
        history_ratings: Sequence[Sequence[float]],
        statistics: Statistics,
    ) -> dict[str, np.ndarray]:
        """Raw samples -> the CRM's inputs, keyed by `INPUT_NAMES`.

        History sequences are oldest first; only the last `history_length` entries are kept and
        they are left-padded, so position K-1 is always the most recent interaction. The
        statistics count the user's and the item's interactions strictly before the sample.
        """
        batch = len(item_ids)
        columns = {"user_id": user_ids, "item_id": item_ids, "year": item_years}
        for name in self.categorical_fields:  # the rest are the user's attributes
            if name not in columns:
                columns[name] = [attrs.get(name) for attrs in user_attributes]
        categorical = np.empty((batch, len(self.categorical_fields)), dtype=np.int64)
        for j, name in enumerate(self.categorical_fields):
            values = columns[name]
            if len(values) != batch:
                raise FeatureSpecError(f"field {name!r} has {len(values)} values for {batch} samples")
            categorical[:, j] = self.vocabularies[name].encode(values)
        hist_items, hist_ratings = self._history(history_items, history_ratings)
        return {
            "categorical": categorical,
            "tags": self._tags(item_tags),
            "history_items": hist_items,
            "history_ratings": hist_ratings,
            "stats": self.stats(statistics),
        }

    def encode_request(
        self,
        *,
        user_id: Any,
        user_attributes: Mapping[str, Any],
        history_items: Sequence[Any],
        history_ratings: Sequence[float],
        item_ids: Sequence[Any],
        item_years: Sequence[Any],
        item_tags: Sequence[Sequence[str]],
        statistics: Statistics,
    ) -> dict[str, np.ndarray]:
        """`encode` of one user's candidates (the serving path): the user's fields and history are
        encoded once and repeated on every row, with the same result as `encode` row by row."""
        batch = len(item_ids)
        per_item = {"item_id": item_ids, "year": item_years}
        categorical = np.empty((batch, len(self.categorical_fields)), dtype=np.int64)
        for j, name in enumerate(self.categorical_fields):
            vocabulary = self.vocabularies[name]
            if name in per_item:
                categorical[:, j] = vocabulary.encode(per_item[name])
            else:
                categorical[:, j] = vocabulary.index(user_id if name == "user_id" else user_attributes.get(name))
        hist_items, hist_ratings = self._history([history_items], [history_ratings])
        return {
            "categorical": categorical,
            "tags": self._tags(item_tags),
            "history_items": np.repeat(hist_items, batch, axis=0),
            "history_ratings": np.repeat(hist_ratings, batch, axis=0),
            "stats": self.stats(statistics),
        }

    # ------------------------------------------------------------------ statistics
    def shrunk(self, total: np.ndarray, count: np.ndarray, towards: np.ndarray | float) -> np.ndarray:
        """(total + prior * towards) / (count + prior): a mean or share pulled towards `towards`."""
        return (total + self.prior * towards) / (np.maximum(count, 0.0) + self.prior)

    def stats(self, statistics: Statistics) -> np.ndarray:
        """Running totals -> the "stats" input, float32 [B, len(STAT_NAMES)]."""
        item, user, genre = (np.asarray(t, dtype=np.float64) for t in (statistics.item, statistics.user,
                                                                         statistics.genre))  # fmt: skip
        if item.shape[1:] != (3,) or user.shape[1:] != (4,) or genre.shape != item.shape:
            raise FeatureSpecError(f"statistics of shapes {item.shape}, {user.shape}, {genre.shape}")
        user_mean = self.shrunk(user[:, 1], user[:, 0], self.global_mean)
        user_like = self.shrunk(user[:, 2], user[:, 0], self.global_like)
        columns = [
            self.shrunk(item[:, 1], item[:, 0], self.global_mean) / self.rating_max,
            self.shrunk(item[:, 2], item[:, 0], self.global_like),
            _log_count(item[:, 0]),
            user_mean / self.rating_max,
            user_like,
            _log_count(user[:, 0]),
            self.shrunk(user[:, 3], user[:, 0], 0.0) / self.rating_max,
            self.shrunk(genre[:, 1], genre[:, 0], user_mean) / self.rating_max,
            self.shrunk(genre[:, 2], genre[:, 0], user_like),
            _log_count(genre[:, 0]),
        ]
        out = np.empty((len(item), len(columns)), dtype=np.float32)
        for j, column in enumerate(columns):  # a user's columns (one value) fill every row
            out[:, j] = column
        return out

    def user_summary(self, history: UserInteractions) -> UserSummary:
        """What the statistics need of a user's past: the totals and the per-tag totals (what a
        server may cache per user until the user's next event)."""
        ratings = np.asarray(history.ratings, dtype=np.float64)
        likes = ratings >= self.like_threshold
        means = self.shrunk(np.asarray(history.item_sums_before, dtype=np.float64),
                            np.asarray(history.item_counts_before, dtype=np.float64), self.global_mean)  # fmt: skip
        totals = (float(len(ratings)), float(ratings.sum()), float(likes.sum()), float((ratings - means).sum()))
        per_tag: dict[str, list[float]] = {}
        for tags, rating, liked in zip(history.item_tags, ratings.tolist(), likes.tolist(), strict=True):
            for tag in dict.fromkeys(tags):
                entry = per_tag.setdefault(tag, [0.0, 0.0, 0.0])
                entry[0] += 1.0
                entry[1] += rating
                entry[2] += liked
        return UserSummary(totals, {tag: tuple(v) for tag, v in per_tag.items()})

    def request_statistics(self, summary: UserSummary, item_totals: np.ndarray,
                           item_tags: Sequence[Sequence[str]]) -> Statistics:  # fmt: skip
        """One user's statistics for a request's candidates: `summary` of every interaction of the
        user before the request, `item_totals` [B, 3] the candidates' totals. Equal to what
        `running_statistics` gives a training sample with the same past."""
        per_tag, rows = summary.per_tag, []
        for tags in item_tags:  # plain floats, summed in the order a numpy row would be: the same values
            count = total = likes = 0.0
            for tag in dict.fromkeys(tags):
                if (entry := per_tag.get(tag)) is not None:
                    count, total, likes = count + entry[0], total + entry[1], likes + entry[2]
            rows.append((count, total, likes))
        genre = np.array(rows, dtype=np.float64).reshape(-1, 3)
        item = np.asarray(item_totals, dtype=np.float64).reshape(-1, 3)
        return Statistics(user=np.array([summary.totals]), item=item, genre=genre)

    def running_statistics(self, user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, rating: np.ndarray,
                           item_tags: Sequence[Sequence[str]] | TagsByItem) -> Statistics:  # fmt: skip
        """Every interaction's statistics over the interactions strictly before it (training's
        view of the whole table at once; no look-ahead). Users and items may be ids or integer
        codes of them; tags per row, or per item (`TagsByItem`, for many rows)."""
        rating = np.asarray(rating, dtype=np.float64)
        user = group_codes(user)
        item_totals = running_totals(item, timestamp, rating, self.like_threshold)
        deviation = rating - self.shrunk(item_totals[:, 1], item_totals[:, 0], self.global_mean)
        user_totals = running_totals(user, timestamp, rating, self.like_threshold)
        deviation_sum = running_totals(user, timestamp, deviation, np.inf)[:, 1]
        if not isinstance(item_tags, TagsByItem):
            item_tags = TagsByItem(np.arange(len(item_tags)), item_tags)
        rows, tags, tag_count = item_tags.expand()
        keys = user[rows] * max(tag_count, 1) + tags  # one key a (user, tag)
        genre = np.zeros((len(rating), 3))
        np.add.at(genre, rows, running_totals(keys, np.asarray(timestamp)[rows], rating[rows], self.like_threshold))
        return Statistics(user=np.c_[user_totals, deviation_sum], item=item_totals, genre=genre)

    def _tags(self, item_tags: Sequence[Sequence[str]]) -> np.ndarray:
        tag_vocab = self.vocabularies["tag"]
        tags = np.zeros((len(item_tags), self.max_tags), dtype=np.int64)
        for i, row in enumerate(item_tags):
            for j, tag in enumerate(row[: self.max_tags]):
                tags[i, j] = tag_vocab.index(tag)
        return tags

    def _history(self, history_items: Sequence[Sequence[Any]], history_ratings: Sequence[Sequence[float]]
                 ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        k = self.history_length
        item_vocab = self.vocabularies["item_id"]
        hist_items = np.zeros((len(history_items), k), dtype=np.int64)
        hist_ratings = np.zeros((len(history_items), k), dtype=np.float32)
        for i, (items, ratings) in enumerate(zip(history_items, history_ratings, strict=True)):
            items, ratings = list(items)[-k:], list(ratings)[-k:]
            if len(items) != len(ratings):
                raise FeatureSpecError("history items and ratings differ in length")
            offset = k - len(items)
            for j, (item, rating) in enumerate(zip(items, ratings, strict=True)):
                hist_items[i, offset + j] = item_vocab.index(item)
                hist_ratings[i, offset + j] = float(rating)
        return hist_items, hist_ratings

    def input_shapes(self) -> dict[str, tuple[str | int, ...]]:
        """Shapes of the CRM inputs with a symbolic batch axis, for the manifest and ONNX."""
        return {
            "categorical": ("batch", len(self.categorical_fields)),
            "tags": ("batch", self.max_tags),
            "history_items": ("batch", self.history_length),
            "history_ratings": ("batch", self.history_length),
            "stats": ("batch", len(STAT_NAMES)),
        }

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "categorical_fields": list(self.categorical_fields),
            "history_length": self.history_length,
            "max_tags": self.max_tags,
            "rating_max": self.rating_max,
            "like_threshold": self.like_threshold,
            "statistics": {
                "global_mean": self.global_mean,
                "global_like": self.global_like,
                "prior": self.prior,
                "names": list(STAT_NAMES),
            },
            "inputs": {k: list(v) for k, v in self.input_shapes().items()},
            "vocabularies": {name: list(v.values) for name, v in self.vocabularies.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "features.json") -> FeatureSpec:
        try:
            version = int(data["version"])
            if version > FEATURE_SPEC_VERSION:
                raise FeatureSpecError(
                    f"{source}: feature spec version {version} is newer than this corella "
                    f"understands ({FEATURE_SPEC_VERSION}); upgrade corella"
                )
            if version < FEATURE_SPEC_VERSION:
                raise FeatureSpecError(
                    f"{source}: feature spec version {version} predates this corella's "
                    f"({FEATURE_SPEC_VERSION}: the CRM now reads running user and item statistics); "
                    "retrain the CRM (`corella train`) and export a new bundle"
                )
            statistics = data["statistics"]
            return cls(
                categorical_fields=tuple(data["categorical_fields"]),
                vocabularies={k: Vocabulary(tuple(v)) for k, v in data["vocabularies"].items()},
                history_length=int(data["history_length"]),
                max_tags=int(data["max_tags"]),
                rating_max=float(data["rating_max"]),
                like_threshold=float(data["like_threshold"]),
                global_mean=float(statistics["global_mean"]),
                global_like=float(statistics["global_like"]),
                prior=float(statistics["prior"]),
                version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FeatureSpecError(f"{source}: malformed feature spec ({exc!r})") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise FeatureSpecError(f"{path}: not found") from exc
        except json.JSONDecodeError as exc:
            raise FeatureSpecError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))


def history_windows(user: np.ndarray, timestamp: np.ndarray, length: int) -> np.ndarray:
    """Row positions of each interaction's history: the same user's last `length` interactions
    with a strictly earlier timestamp.

    `user` and `timestamp` describe interactions already sorted by (user, timestamp, tie-break).
    Returns int64 [N, length], oldest first, -1 where there is no such interaction. Interactions
    that share a timestamp never see each other: nothing looks ahead.
    """
    n = len(user)
    if n == 0:
        return np.empty((0, length), dtype=np.int64)
    new_user = np.r_[True, user[1:] != user[:-1]]
    new_moment = new_user | np.r_[True, timestamp[1:] != timestamp[:-1]]
    positions = np.arange(n)
    user_start = np.maximum.accumulate(np.where(new_user, positions, 0))
    moment_start = np.maximum.accumulate(np.where(new_moment, positions, 0))
    window = moment_start[:, None] - length + np.arange(length)[None, :]
    return np.where(window >= user_start[:, None], window, -1).astype(np.int64)


def group_codes(group: np.ndarray | Sequence[Any]) -> np.ndarray:
    """Integer codes of ids (equal ids, equal codes); integers are codes already."""
    group = np.asarray(group)
    if group.dtype.kind in "iu":
        return group.astype(np.int64, copy=False)
    return np.unique(group.astype(str), return_inverse=True)[1].astype(np.int64)


def running_totals(group: np.ndarray, timestamp: np.ndarray, rating: np.ndarray, like_threshold: float
                   ) -> np.ndarray:  # fmt: skip
    """For every interaction, the totals (`TOTALS`) of its group's (a user's, an item's)
    interactions with a strictly earlier timestamp: interactions that share a timestamp never
    count each other, and nothing looks ahead. Inputs in any order; float64 [N, 3] in that order.
    """
    n = len(group)
    if n == 0:
        return np.zeros((0, len(TOTALS)))
    keys = group_codes(group)
    timestamp = np.asarray(timestamp, dtype=np.int64)
    order = np.lexsort((timestamp, keys))
    keys, timestamp = keys[order], timestamp[order]
    rating = np.asarray(rating, dtype=np.float64)[order]
    new_group = np.r_[True, keys[1:] != keys[:-1]]
    new_moment = new_group | np.r_[True, timestamp[1:] != timestamp[:-1]]
    positions = np.arange(n)
    group_start = np.maximum.accumulate(np.where(new_group, positions, 0))
    moment_start = np.maximum.accumulate(np.where(new_moment, positions, 0))
    out = np.empty((n, len(TOTALS)))
    for j, values in enumerate((np.ones(n), rating, (rating >= like_threshold).astype(np.float64))):
        before = np.r_[0.0, np.cumsum(values)]  # before[i] = sum of values[:i]
        out[order, j] = before[moment_start] - before[group_start]
    return out


def _log_count(count: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(count, 0.0)) / 8.0  # ~1 at 3,000 interactions
