"""From raw interactions to samples: the global temporal split and per-sample histories."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from runtime.features import FeatureSpec, Statistics, TagsByItem, Vocabulary, history_windows, running_totals
from runtime.prompt import PROMPT_VERSION, HistoryEntry, ItemText, PromptTemplate
from training.data.schema import RawDataset

__all__ = ["SPLITS", "SampleTable", "build_samples"]

SPLITS = ("train", "valid", "test")
#: words of an item's text the target's suffix says, where the catalog has texts
TEXT_WORDS = 16
#: rows whose histories are windowed at once (whole users): bounds the temporaries at ~10 of [chunk, K]
HISTORY_CHUNK = 1 << 20


@dataclass
class SampleTable:
    """Every interaction as a sample, in global temporal order.

    history: int32 [N, K] (int64 past 2^31 rows), positions (into this table) of the user's last K interactions with a
    strictly earlier timestamp, oldest first, -1 for padding.
    item_totals: float64 [N, 3], the item's running totals (count, rating sum, likes) over every
    interaction with a strictly earlier timestamp, any split (the store keeps them per interaction).
    """

    raw: RawDataset
    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    label: np.ndarray
    split: np.ndarray
    history: np.ndarray
    item_stats: dict[str, tuple[float, int, float]]  # mean rating, count, share of likes (train split)
    item_totals: np.ndarray
    #: int64 [N] codes of each row's user and item, in the order of their ids' text (ties in time are
    #: broken by them), and the ids by code (object arrays of str): `user == user_keys[user_code]`
    user_code: np.ndarray
    item_code: np.ndarray
    user_keys: np.ndarray
    item_keys: np.ndarray
    _statistics: tuple[tuple[float, ...], Statistics] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.item)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))

    # ------------------------------------------------------------------ features
    def feature_spec(self, max_tags: int = 6, min_count: int = 1) -> FeatureSpec:
        """Vocabularies from the training split only; everything else maps to OOV."""
        train = self.indices("train")
        raw = self.raw
        attributes = raw.user_attribute_names()
        user_counts = np.bincount(self.user_code[train], minlength=len(self.user_keys))
        item_counts = np.bincount(self.item_code[train], minlength=len(self.item_keys))
        vocabularies = {
            "user_id": Vocabulary.from_counts(_counted(self.user_keys, user_counts), min_count),
            "item_id": Vocabulary.from_counts(_counted(self.item_keys, item_counts), min_count),
        }
        known_users = raw.users.reindex(self.user_keys[user_counts > 0])
        for name in attributes:
            vocabularies[name] = Vocabulary.build(known_users[name].dropna().tolist())
        known_items = raw.items.reindex(self.item_keys[item_counts > 0])
        vocabularies["year"] = Vocabulary.build(known_items["year"].dropna().tolist())
        vocabularies["tag"] = Vocabulary.build([t for tags in known_items["tags"].dropna() for t in tags])
        return FeatureSpec(
            categorical_fields=("user_id", "item_id", *attributes, "year"),
            vocabularies=vocabularies,
            history_length=self.history.shape[1],
            max_tags=max_tags,
            rating_max=raw.rating_max,
            like_threshold=raw.like_threshold,
            global_mean=float(self.rating[train].mean()) if len(train) else 0.0,
            global_like=float(self.label[train].mean()) if len(train) else 0.0,
        )

    def encode(self, spec: FeatureSpec, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The CRM inputs of `rows` (all samples by default), through the shared encoder."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        raw = self.raw
        users = self.user[rows]
        profiles = raw.users.reindex(users)
        attributes = [
            {k: v for k, v in rec.items() if isinstance(v, str)}
            for rec in profiles.to_dict("records")
        ] if len(profiles.columns) else [{} for _ in rows]  # fmt: skip
        items = raw.items.reindex(self.item[rows])
        history = self.history[rows]
        valid = history >= 0
        hist_items = [self.item[h[m]] for h, m in zip(history, valid, strict=True)]
        hist_ratings = [self.rating[h[m]] for h, m in zip(history, valid, strict=True)]
        return spec.encode(
            user_ids=users,
            item_ids=self.item[rows],
            user_attributes=attributes,
            item_years=[y if isinstance(y, str) else None for y in items["year"]],
            item_tags=self.item_tags(self.item[rows]),
            history_items=hist_items,
            history_ratings=hist_ratings,
            statistics=self.statistics(spec, rows),
        )

    def item_tags(self, items: np.ndarray) -> list[tuple[str, ...]]:
        """Catalog tags of each item (() where the catalog has none)."""
        tags = self.raw.items["tags"].reindex(items)
        return [t if isinstance(t, tuple) else () for t in tags]

    def statistics(self, spec: FeatureSpec, rows: np.ndarray) -> Statistics:
        """The running statistics of `rows` (computed over the whole table once per spec)."""
        key = (spec.prior, spec.global_mean, spec.global_like, spec.like_threshold)
        if self._statistics is None or self._statistics[0] != key:
            tags = TagsByItem(self.item_code, self.item_tags(self.item_keys))
            whole = spec.running_statistics(self.user_code, self.item_code, self.timestamp, self.rating, tags)
            self._statistics = (key, whole)
        whole = self._statistics[1]
        return Statistics(user=whole.user[rows], item=whole.item[rows], genre=whole.genre[rows])

    # ------------------------------------------------------------------ prompts
    def item_text(self, item: str) -> ItemText:
        """Catalog text of an item, with its rating statistics from the training split."""
        text = self.raw.item_text(item)
        mean, count, liked = self.item_stats.get(item, (None, None, None))
        return ItemText(text.title, text.year, text.tags, mean, count, liked, text.text)

    def prompt_parts(self, row: int) -> tuple[list[HistoryEntry], ItemText]:
        history = [int(h) for h in self.history[row] if h >= 0]
        entries = [HistoryEntry(self.item_text(self.item[h]), float(self.rating[h])) for h in history]
        return entries, self.item_text(self.item[row])

    def prompt_template(self, max_prompt_tokens: int = 320, item_stats: bool = True,
                        version: int = PROMPT_VERSION) -> PromptTemplate:  # fmt: skip
        words = self.raw.words
        has_text = version >= 5 and bool(self.raw.items["text"].notna().any())
        return PromptTemplate(
            item_noun=words.noun,
            rating_max=self.raw.rating_max,
            max_prompt_tokens=max_prompt_tokens,
            item_stats=item_stats,
            like_threshold=self.raw.like_threshold,
            version=version,
            item_plural=words.plural,
            verb=words.verb,
            implicit=self.raw.implicit,
            text_words=TEXT_WORDS if has_text else 0,
        )


def build_samples(
    raw: RawDataset, history_length: int = 10, fractions: tuple[float, float] = (0.8, 0.1)
) -> SampleTable:
    """Global temporal split (80/10/10 by default) and histories with no look-ahead.

    Ties in timestamp are broken by user id, then item id, so the split is deterministic.
    """
    inter = raw.interactions
    user_code, user_keys = _sorted_codes(inter["user"])
    item_code, item_keys = _sorted_codes(inter["item"])
    timestamp = inter["timestamp"].to_numpy(dtype=np.int64)
    order = np.lexsort((item_code, user_code, timestamp))
    user_code, item_code, timestamp = user_code[order], item_code[order], timestamp[order]
    user, item = user_keys[user_code], item_keys[item_code]
    rating = inter["rating"].to_numpy(dtype=np.float64)[order]
    n = len(order)
    train_end = int(round(fractions[0] * n))
    valid_end = int(round((fractions[0] + fractions[1]) * n))
    split = np.zeros(n, dtype=np.int8)
    split[train_end:valid_end] = 1
    split[valid_end:] = 2

    history = _histories(user_code, timestamp, history_length)
    train = split == 0
    item_stats = _item_stats(item_code[train], item_keys, rating[train], raw.like_threshold)
    return SampleTable(
        raw=raw,
        user=user,
        item=item,
        rating=rating,
        timestamp=timestamp,
        label=(rating >= raw.like_threshold).astype(np.float32),
        split=split,
        history=history,
        item_stats=item_stats,
        item_totals=running_totals(item_code, timestamp, rating, raw.like_threshold),
        user_code=user_code,
        item_code=item_code,
        user_keys=user_keys,
        item_keys=item_keys,
    )


def _item_stats(codes: np.ndarray, keys: np.ndarray, ratings: np.ndarray, like_threshold: float
                ) -> dict[str, tuple[float, int, float]]:  # fmt: skip
    """Mean rating, rating count and share of likes of every item in the training split."""
    counts = np.bincount(codes, minlength=len(keys))
    sums = np.bincount(codes, weights=ratings, minlength=len(keys))
    likes = np.bincount(codes, weights=(ratings >= like_threshold).astype(np.float64), minlength=len(keys))
    return {
        str(k): (float(total / n), int(n), float(liked / n))
        for k, total, n, liked in zip(keys, sums, counts, likes, strict=True)
        if n
    }


def _histories(user_code: np.ndarray, timestamp: np.ndarray, length: int) -> np.ndarray:
    """Every row's history (positions in the global order, -1 for none): rows grouped by user in
    time order, windowed a run of whole users at a time (~`HISTORY_CHUNK` rows), so that the
    temporaries stay small whatever the table's size; int32 positions where they fit."""
    n = len(user_code)
    by_user = np.lexsort((np.arange(n), timestamp, user_code))
    users, moments = user_code[by_user], timestamp[by_user]
    history = np.full((n, length), -1, dtype=np.int32 if n < 2**31 else np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if n else np.zeros(0, dtype=np.int64)
    first = np.searchsorted(starts, np.arange(0, n, HISTORY_CHUNK))  # the first user to start past each mark
    cuts = np.unique(starts[first[first < len(starts)]])
    for a, b in zip(cuts, [*cuts[1:], n], strict=True):
        windows = history_windows(users[a:b], moments[a:b], length)
        history[by_user[a:b]] = np.where(windows >= 0, by_user[a + np.maximum(windows, 0)], -1)
    return history


def _sorted_codes(ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of ids in the order of their text, and the ids by code (an object array of
    str). Hashing first and sorting only the distinct ids: millions of rows in seconds."""
    codes, uniques = pd.factorize(ids, sort=False)
    keys = np.asarray(uniques, dtype=object).astype(str)
    order = np.argsort(keys, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank[codes], keys[order].astype(object)


def _counted(keys: np.ndarray, counts: np.ndarray) -> dict[str, int]:
    return {str(k): int(c) for k, c in zip(keys, counts, strict=True) if c}
