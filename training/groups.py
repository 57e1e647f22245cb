"""Samples drawn the way serving sees them: a user, a cut, the history before the cut as the shared
prefix, and the user's next interactions after the cut as the candidates.

Serving decodes a user's prefix once and every candidate's short suffix against it; a group is that
shape of work in training and scoring. It stays leak-free: the prefix is the history of the group's
first candidate (interactions strictly before it), and every other candidate lies after it. The
CRM keeps each sample's own exact features; only the LLM reads the shared (at most K-1
interactions old) history. A group of one is a sample with its own exact history, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.data import SampleTable

__all__ = [
    "PrefixGroup",
    "GroupPrompts",
    "single_groups",
    "user_groups",
    "snapshot_groups",
    "take_samples",
    "pack_steps",
    "group_rows",
    "uncertain_rows",
]


@dataclass(frozen=True)
class PrefixGroup:
    """`anchor`'s history is the prefix; `rows` (anchor first, then later ones of the same user) are
    the candidates."""

    anchor: int
    rows: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.rows)


def single_groups(rows: Sequence[int]) -> list[PrefixGroup]:
    """One sample per group, each with its own exact history (the per-prompt shape)."""
    return [PrefixGroup(int(r), (int(r),)) for r in rows]


def _by_user(samples: SampleTable, rows: np.ndarray) -> list[np.ndarray]:
    """`rows` split per user, each in time order (the table is in global temporal order)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    users = samples.user[rows].astype(str)
    order = np.argsort(users, kind="stable")
    users, rows = users[order], rows[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(rows) else np.array([], dtype=np.int64)
    return np.split(rows, starts[1:])


def user_groups(samples: SampleTable, rows: np.ndarray, size: int, rng: np.random.Generator) -> list[PrefixGroup]:
    """Each user's `rows`, in time order, cut into runs of `size` consecutive interactions (the first
    cut at a random offset, so seeds vary where they fall), in a seeded random order. For training
    rows (the first part of every user's past) a run is the user's next `size` interactions."""
    groups = []
    for user_rows in _by_user(samples, rows):
        offset = int(rng.integers(0, size)) if size > 1 and len(user_rows) > size else 0
        cuts = [0, *range(offset or size, len(user_rows), size)]
        for start, end in zip(cuts, [*cuts[1:], len(user_rows)], strict=True):
            if end > start:
                chunk = user_rows[start:end]
                groups.append(PrefixGroup(int(chunk[0]), tuple(int(r) for r in chunk)))
    return [groups[i] for i in rng.permutation(len(groups))]


def snapshot_groups(samples: SampleTable, rows: np.ndarray, size: int) -> list[PrefixGroup]:
    """Scattered rows (the validation samples the router sends, say) under the snapshot rule: a user's
    rows that lie within `size` of that user's interactions of the group's first row share its history
    (as one request's candidates share the user's current history), at most `size` a group."""
    ordinal = _user_ordinals(samples)
    groups = []
    for user_rows in _by_user(samples, rows):
        start = 0
        for i in range(1, len(user_rows) + 1):
            if i == len(user_rows) or i - start >= size or ordinal[user_rows[i]] - ordinal[user_rows[start]] >= size:
                chunk = user_rows[start:i]
                groups.append(PrefixGroup(int(chunk[0]), tuple(int(r) for r in chunk)))
                start = i
    return groups


def _user_ordinals(samples: SampleTable) -> np.ndarray:
    """Each row's place among its user's interactions (0 = the user's first)."""
    n = len(samples)
    order = np.lexsort((np.arange(n), samples.timestamp, samples.user.astype(str)))
    users = samples.user[order].astype(str)
    starts = np.r_[True, users[1:] != users[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) - first
    return out


def take_samples(groups: Sequence[PrefixGroup], count: int) -> tuple[list[PrefixGroup], list[PrefixGroup]]:
    """The first groups holding `count` candidates (the last one cut to fit), and the rest."""
    taken, total = [], 0
    for i, group in enumerate(groups):
        if total >= count:
            return taken, list(groups[i:])
        need = count - total
        if len(group) > need:
            taken.append(PrefixGroup(group.anchor, group.rows[:need]))
            return taken, [PrefixGroup(group.rows[need], group.rows[need:]), *groups[i + 1 :]]
        taken.append(group)
        total += len(group)
    return taken, []


def pack_steps(groups: Sequence[PrefixGroup], batch_size: int) -> list[list[PrefixGroup]]:
    """Optimizer steps of about `batch_size` candidates: whole groups, in order, until a step holds
    `batch_size` or more."""
    steps, current, count = [], [], 0
    for group in groups:
        current.append(group)
        count += len(group)
        if count >= batch_size:
            steps.append(current)
            current, count = [], 0
    if current:
        steps.append(current)
    return steps


def group_rows(groups: Sequence[PrefixGroup]) -> np.ndarray:
    return np.array([r for g in groups for r in g.rows], dtype=np.int64)


class GroupPrompts:
    """Token ids of groups: the anchor's prefix (history fitted to the token budget) once per anchor,
    each row's suffix once per row. A group of one gives exactly `LLMScorer.prompt_ids(row)` split
    in two; the template's `ids` makes both, as at serving."""

    def __init__(self, samples: SampleTable, scorer) -> None:  # noqa: ANN001
        self.samples, self.scorer = samples, scorer
        self.prefixes: dict[int, list[int]] = {}
        self.suffixes: dict[int, list[int]] = {}

    def __call__(self, group: PrefixGroup) -> tuple[list[int], list[list[int]]]:
        if group.anchor not in self.prefixes:
            history, target = self.samples.prompt_parts(group.anchor)
            prefix, (suffix,) = self.scorer.template.ids(self.scorer.tokenize, self.scorer.bos_id, history, [target])
            self.prefixes[group.anchor] = prefix
            self.suffixes[group.anchor] = suffix
        for row in group.rows:
            if row not in self.suffixes:
                self.suffixes[row] = list(self.scorer.tokenize(self.scorer.template.suffix(self.samples.item_text(
                    self.samples.item[row]))))  # fmt: skip
        return self.prefixes[group.anchor], [self.suffixes[r] for r in group.rows]

    def prompt(self, row: int) -> list[int]:
        """The whole prompt of a row with its own exact history."""
        prefix, (suffix,) = self(PrefixGroup(row, (row,)))
        return prefix + suffix


def uncertain_rows(rows: np.ndarray, entropy: np.ndarray, needed: int, share: float) -> np.ndarray:
    """The `rows` the stage-1 CRM is least sure of: the most uncertain `share` of them (the router's
    fraction, say), widened to `needed` rows where that holds fewer. Grouped as usual afterwards, a
    run of a user's uncertain rows shares the history before its first one (leak-free still: every
    candidate lies after the cut), so the LLM trains on the kind of sample the router sends it."""
    rows = np.asarray(rows, dtype=np.int64)
    keep = min(len(rows), max(int(np.ceil(share * len(rows))), int(needed)))
    order = np.argsort(-entropy[rows], kind="stable")
    return np.sort(rows[order[:keep]])
