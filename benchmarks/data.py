"""Benchmark inputs from a bundle's own feature store: no training code, no data set files.

The exported store holds every interaction in global time order, so its last 10% are the test
split; each test sample's history is read back with the runtime's own store query (the user's last
K interactions strictly before it), exactly as serving reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.artifacts.store import FeatureStore, Interaction
from runtime.engine import CandidateItem, HistoryItem, Request

__all__ = ["TestSample", "test_samples", "random_requests"]


@dataclass(frozen=True)
class TestSample:
    target: Interaction
    label: float
    history: list[Interaction]
    attributes: dict[str, str]

    def request(self, mode: str = "hybrid") -> Request:
        return Request(
            candidates=[CandidateItem(self.target.item_id)],
            user_id=self.target.user_id,
            user_attributes=self.attributes,
            history=[HistoryItem(h.item_id, h.rating, h.timestamp) for h in self.history],
            mode=mode,  # type: ignore[arg-type]
        )


def test_samples(store: FeatureStore, history_length: int, like_threshold: float, count: int,
                 seed: int = 0, test_fraction: float = 0.1) -> list[TestSample]:  # fmt: skip
    total = store.counts()["interactions"]
    first = total - int(round(test_fraction * total))
    rows = store.interactions(offset=first)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(rows), size=min(count, len(rows)), replace=False))
    samples = []
    for index in chosen:
        target = rows[index]
        history = store.history(target.user_id, history_length, before=target.timestamp)
        samples.append(TestSample(target, float(target.rating >= like_threshold), history,
                                  store.user_attributes(target.user_id) or {}))  # fmt: skip
    return samples


def random_requests(
    store: FeatureStore, count: int, candidates: int, seed: int = 0, **options: object
) -> list[Request]:
    """Requests for random known users, each with `candidates` random catalog items."""
    rng = np.random.default_rng(seed)
    users, items = store.user_ids(), store.item_ids()
    requests = []
    for _ in range(count):
        picked = rng.choice(len(items), size=min(candidates, len(items)), replace=False)
        requests.append(Request(candidates=[CandidateItem(items[i]) for i in picked],
                                user_id=users[int(rng.integers(len(users)))], **options))  # fmt: skip
    return requests
