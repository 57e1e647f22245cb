"""Users' pasts as a request needs them: attributes, last interactions and the summary of all
earlier ones, from the request or the live store, remembered per user until the user's next event."""

from __future__ import annotations

import threading
from collections import OrderedDict

from runtime.artifacts.store import FeatureStore
from runtime.engine.requests import HistoryItem, Request
from runtime.features import FeatureSpec, UserInteractions, UserSummary, normalize_user_attributes

__all__ = ["USER_CACHE", "RecentUsers", "UserPasts"]

USER_CACHE = 100_000  # users whose past summary is remembered (a few KB each)


class RecentUsers:
    """A bounded set of users, least recently added first out (thread-safe)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity or USER_CACHE
        self._users: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, user: str) -> None:
        with self._lock:
            self._users[user] = None
            self._users.move_to_end(user)
            if len(self._users) > self.capacity:
                self._users.popitem(last=False)

    def discard(self, user: str) -> None:
        with self._lock:
            self._users.pop(user, None)

    def clear(self) -> None:
        with self._lock:
            self._users.clear()

    def __contains__(self, user: object) -> bool:
        return user in self._users

    def __len__(self) -> int:
        return len(self._users)


class UserPasts:
    """Reads users' pasts, remembering at most `capacity` users' (least recently used out). A read
    that overlapped an append is not remembered, so nothing stale outlives the event that made it so."""

    def __init__(self, store: FeatureStore, spec: FeatureSpec, capacity: int | None = None) -> None:
        self.store, self.spec, self.capacity = store, spec, capacity or USER_CACHE
        # user -> (last interactions, summary), least recently used first
        self._users: OrderedDict[str, tuple[list[HistoryItem], UserSummary]] = OrderedDict()
        self._appends = 0  # appends done
        self._users_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._users)

    def clear(self) -> None:
        with self._users_lock:
            self._appends += 1  # a read in flight now is not remembered either
            self._users.clear()

    def appended(self, users: set[str]) -> None:
        """Events of `users` are in the store (called after the write: what is read from now on is fresh)."""
        with self._users_lock:
            self._appends += 1
            for user in users:
                self._users.pop(user, None)

    def user(self, request: Request) -> tuple[dict[str, str], list[HistoryItem], UserSummary, bool]:
        """The user's attributes, last interactions, the summary of every earlier interaction (the
        request's own history where it brings one, else the store's) and whether the user is known."""
        profile = self.store.user_attributes(request.user_id) if request.user_id is not None else None
        known = profile is not None
        if request.user_attributes is not None:
            attributes = normalize_user_attributes(request.user_attributes)
        else:
            attributes = profile or {}
        if request.history is not None:
            history = list(request.history)
            summary = self.spec.user_summary(self.store.past([h.item_id for h in history], [h.rating for h in history]))
        elif request.user_id is not None:
            history, summary = self._stored(request.user_id, request.at)
        else:
            history, summary = [], self.spec.user_summary(UserInteractions([], [], [], []))
        return attributes, history[-self.spec.history_length :], summary, known or bool(history)

    def _stored(self, user_id: str, at: int | None) -> tuple[list[HistoryItem], UserSummary]:
        """A user's past from the store: remembered (for requests of now) until the user's next
        event, so a returning user costs no scan of their whole past."""
        if at is None:
            with self._users_lock:
                cached = self._users.get(user_id)
                if cached is not None:
                    self._users.move_to_end(user_id)
                    return cached
                appends = self._appends  # read before the store: an append meanwhile may make this stale
        stored, past = self.store.user_past(user_id, before=at)
        history = [HistoryItem(h.item_id, h.rating, h.timestamp) for h in stored[-self.spec.history_length :]]
        summary = self.spec.user_summary(past)
        if at is None:
            with self._users_lock:
                if self._appends == appends:  # no event landed while the store was read
                    self._users[user_id] = (history, summary)
                    if len(self._users) > self.capacity:
                        self._users.popitem(last=False)
        return history, summary
