"""The one normalized schema every loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from runtime.prompt import ItemText

__all__ = ["RawDataset", "LineErrors"]


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
    items: index item (str); columns title (str), year (str or None), tags (tuple of str)
    """

    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    rating_max: float
    like_threshold: float
    item_noun: str = "movie"
    errors: LineErrors = field(default_factory=LineErrors)

    def labels(self) -> np.ndarray:
        return (self.interactions["rating"].to_numpy() >= self.like_threshold).astype(np.float32)

    def user_attribute_names(self) -> list[str]:
        return [c for c in ("age", "gender", "occupation", "zip") if c in self.users.columns]

    def item_text(self, item: str) -> ItemText:
        if item not in self.items.index:
            return ItemText(title=f"item {item}")
        row = self.items.loc[item]
        return ItemText(title=str(row["title"]), year=row["year"] or None, tags=tuple(row["tags"]))
