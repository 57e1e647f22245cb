"""The one normalized schema every loader produces."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from runtime.features import USER_ATTRIBUTES
from runtime.prompt import ItemText
from training.data.spec import Words

__all__ = ["RawDataset", "LineErrors", "clean_text"]


@dataclass
class LineErrors:
    """Malformed lines skipped while loading (only with an explicit skip option)."""

    skipped: dict[str, int] = field(default_factory=dict)

    def add(self, path: str) -> None:
        self.skipped[path] = self.skipped.get(path, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.skipped.values())


@dataclass
class RawDataset:
    """Interactions, users and items of one data set.

    interactions: columns user (str), item (str), rating (float64), timestamp (int64)
    users: index user (str); columns among age, gender, occupation, zip (normalized tokens)
    items: index item (str); columns title (str), year (str or None), tags (tuple of str), text (str
    or None: free text the LLM reads)
    implicit: the ratings are 0/1 labels (clicks), not ratings on a scale
    """

    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    rating_max: float
    like_threshold: float
    words: Words = field(default_factory=lambda: Words(noun="movie"))  # what the prompt calls things
    implicit: bool = False
    errors: LineErrors = field(default_factory=LineErrors)

    def __post_init__(self) -> None:
        self.items = normalize_catalog(self.items)

    @property
    def item_noun(self) -> str:
        return self.words.noun

    def unlisted_items(self) -> int:
        """Interactions whose item the catalog does not list (kept: they are served as "item <id>")."""
        return int((~self.interactions["item"].isin(self.items.index)).sum())

    def labels(self) -> np.ndarray:
        return (self.interactions["rating"].to_numpy() >= self.like_threshold).astype(np.float32)

    def user_attribute_names(self) -> list[str]:
        """The users' attributes: the MovieLens ones first, in their order, then any other."""
        known = [c for c in USER_ATTRIBUTES if c in self.users.columns]
        return known + sorted(c for c in self.users.columns if c not in known)

    def item_text(self, item: str) -> ItemText:
        if item not in self.items.index:
            return ItemText(title=f"item {item}")
        row = self.items.loc[item]
        return ItemText(title=row["title"], year=row["year"], tags=row["tags"], text=row["text"])


def clean_text(value: Any) -> str | None:
    """A catalog value as stripped text; None for a missing one (None, NaN, empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a year read as 1995.0
    text = str(value).strip()
    return text or None


def normalize_catalog(items: pd.DataFrame) -> pd.DataFrame:
    """Every catalog in one shape, holes included: title a non-empty str ("item <id>" where the
    source has none), year a str or None, tags a tuple of non-empty str (() where missing)."""
    items = items.copy()
    items.index = items.index.map(str)
    items = items[~items.index.duplicated(keep="first")]
    for column, default in (("title", None), ("year", None), ("tags", ()), ("text", None)):
        if column not in items.columns:
            items[column] = [default] * len(items)
    columns = {
        "title": [clean_text(t) or f"item {i}" for i, t in zip(items.index, items["title"], strict=True)],
        "year": [clean_text(y) for y in items["year"]],
        "text": [clean_text(t) for t in items["text"]],
        "tags": [tuple(t for t in (clean_text(x) for x in tags) if t) if isinstance(tags, list | tuple) else ()
                 for tags in items["tags"]],
    }  # fmt: skip
    for name, values in columns.items():  # object columns: a missing year stays None, never NaN
        items[name] = pd.Series(values, index=items.index, dtype=object)
    return items
