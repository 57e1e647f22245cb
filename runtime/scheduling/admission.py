"""Admission, judged in one place: whether the LLM can take a request's routed work in time.

Deadlines count from a request's arrival. Admission estimates when the queue ahead will be done
(the measured seconds per token times the tokens waiting) and admits only the candidates that can
be answered in time, up to a bound on queued candidates; the rest are refused at once, so that
the request is answered by the CRM at CRM speed. `saturation` tells, before any work on a request,
whether the LLM could take even its least work; `admissible` how many of its candidates it takes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from runtime.llm import LLMError
from runtime.scheduling.config import SchedulerSettings

__all__ = ["MARGIN", "WorkEstimate", "admissible", "check_prompt", "queue_full", "saturation"]

#: decode times are estimated this much above the measured average: a batch that ends a little
#: early costs little, one that ends after its deadline decodes for nobody
MARGIN = 1.15


class WorkEstimate:
    """The least a request will cost the LLM, guessed before it is tokenized, so that a mode "llm"
    request the LLM cannot take is refused at arrival, not after its CPU work: its user's prefix,
    unless that user was admitted lately (the prefix is then likely cached), and one suffix, at the
    lengths recently seen."""

    def __init__(self, cache_tokens: int) -> None:
        self.cache_tokens = cache_tokens
        self.prefix_tokens = self.suffix_tokens = 0.0  # smoothed; nothing is guessed before a first request
        self._recent: OrderedDict[str, None] = OrderedDict()  # users admitted lately, oldest first
        self._lock = threading.Lock()

    def seen(self, user: str | None, prefix: int, suffixes: Sequence[int], admitted: bool) -> None:
        with self._lock:
            first = not self.prefix_tokens
            self.prefix_tokens = prefix if first else 0.9 * self.prefix_tokens + 0.1 * prefix
            suffix = sum(suffixes) / max(1, len(suffixes))
            self.suffix_tokens = suffix if first else 0.9 * self.suffix_tokens + 0.1 * suffix
            if admitted and user is not None:
                self._recent[user] = None
                self._recent.move_to_end(user)
                # as many users as the cache holds prefixes of the usual length
                while len(self._recent) > max(2, int(self.cache_tokens / max(1.0, self.prefix_tokens))):
                    self._recent.popitem(last=False)

    def forget(self, user: str) -> None:
        with self._lock:
            self._recent.pop(user, None)

    def tokens(self, user: str | None) -> float:
        with self._lock:
            warm = user is not None and user in self._recent
            return (0.0 if warm else self.prefix_tokens) + self.suffix_tokens


def queue_full(queued: int, candidates: int, ahead: int, bound: int) -> bool:
    """No room in a queue of `bound` candidates, `queued` of them taken, for a request's
    `candidates` (at most a whole queue's worth: a larger request is admitted in part) once the
    `ahead` candidates of requests that reach the queue first are in."""
    return queued + ahead + min(candidates, bound) > bound


def saturation(now: float, wait: float, full: bool, deadline: float | None, delay: float,
               own: float = 0.0) -> float | None:  # fmt: skip
    """`LLMScheduler.saturated` from its parts: the seconds to wait, or None when new work fits.
    `own`: the seconds of the request's own least work."""
    # a deadline too short for an idle LLM is the request's to bear (a deadline fallback), not overload
    busy = wait > 0 or delay > 0
    late = deadline is not None and busy and now + own * MARGIN < deadline <= now + delay + (wait + own) * MARGIN
    return wait + delay if full or late else None


def admissible(suffixes: Sequence[int], prefix: int, cold: bool, room: int, ahead: float, seconds_per_token: float,
               deadline: float | None, now: float, arrived: float | None) -> tuple[int, int]:  # fmt: skip
    """How many of a job's suffixes (their token counts, most uncertain first) a context takes, and
    how many an idle LLM could have answered by the deadline had it started at the request's
    arrival (`feasible`: of the rest, those before it were refused for lack of room or time,
    overloaded; the others are late).

    `prefix`: the prefix's tokens, decoded first when it is `cold` (not cached); `room`: the queue's
    free candidates; `ahead`: seconds until the work queued before it is done. The estimate decodes
    the queued tokens back to back, FIFO: the planner cuts each batch where the earliest deadline in
    it would pass, so a candidate that fits by that count is decoded in time, and one that does not
    is refused now instead of waiting for its deadline."""
    if deadline is None:
        return min(room, len(suffixes)), len(suffixes)
    spt = seconds_per_token * MARGIN
    own = prefix if cold else 0
    start = min(now, arrived) if arrived is not None else now
    admitted = feasible = 0
    for length in suffixes:
        own += length
        if start + own * spt > deadline:
            break
        feasible += 1
        if admitted == feasible - 1 and admitted < room and now + ahead + own * spt <= deadline:
            admitted += 1
    if cold and admitted < max(1, feasible // 2):
        # a new prefix costs as much as several candidates: under contention it is decoded only
        # for at least half of what it could serve, and the time goes to users already cached
        admitted = 0
    return admitted, feasible


def check_prompt(settings: SchedulerSettings, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> None:
    """LLMError for a prompt that cannot be decoded: an empty suffix, or one past the context or the batch."""
    longest = max((len(s) for s in suffixes), default=0)
    if not suffixes or longest == 0:
        raise LLMError("a routed candidate has an empty prompt suffix")
    if len(prefix) + longest > settings.max_prompt_tokens or len(prefix) > settings.prefix_cache_tokens:
        raise LLMError(f"prompt of {len(prefix) + longest} tokens exceeds the context of "
                       f"{min(settings.max_prompt_tokens, settings.prefix_cache_tokens)}")  # fmt: skip
    if longest > settings.batch_tokens:
        raise LLMError(f"a candidate suffix of {longest} tokens exceeds the batch of {settings.batch_tokens}")
