"""Planning one batch (under the scheduler's lock): prefixes not yet decoded and the candidates of
every job whose prefix is ready or completes in this batch, as many as the batch holds and the
earliest deadline among them allows. Work whose deadline has passed, or that could not finish
before it, is dropped here, never decoded for nobody."""

from __future__ import annotations

from runtime.scheduling.admission import MARGIN
from runtime.scheduling.config import SchedulerSettings
from runtime.scheduling.jobs import ItemState
from runtime.scheduling.work import Ledger, Plan, Worker, WorkItem

__all__ = ["plan_batch"]


def plan_batch(worker: Worker, settings: SchedulerSettings, ledger: Ledger, now: float) -> Plan | None:
    """This round's work from the front of the worker's queue, or None when nothing can go now."""
    cache = worker.cache
    plan = Plan(removals=cache.removals, parkings=cache.take_parking())
    cache.removals = []
    _plan_head(worker, settings, plan)
    for work in list(worker.queue):
        if plan.tokens >= settings.batch_tokens or not worker.suffix_seqs:
            break
        deadline = work.handle.deadline
        if deadline is not None and now >= deadline:
            ledger.drop_late(work, "deadline")
            continue
        entry = work.entry
        if entry.error:
            work.handle.error = entry.error
            ledger.resolve_unplanned(work, ItemState.FAILED)
            continue
        if entry.ready or id(entry) in plan.completing or _plan_prefix(worker, settings, work, plan, now):
            _plan_suffixes(worker, settings, ledger, work, plan, now)
    if not plan.prefixes and not plan.suffixes and not plan.restores:
        cache.removals = plan.removals + cache.removals
        for entry in plan.parkings:  # next time: nothing is decoded now
            entry.busy = False
        cache.parking += plan.parkings
        return None
    worker.batch_started, worker.batch_tokens = now, plan.tokens
    return plan


def _ends_in_time(worker: Worker, plan: Plan, work: WorkItem, tokens: int, now: float) -> bool:
    """Whether the batch, `tokens` larger, still ends before its jobs' deadlines and this job's."""
    end = now + (plan.tokens + tokens) * worker.seconds_per_token * MARGIN
    deadline = work.handle.deadline
    return end <= plan.deadline and (deadline is None or end <= deadline)


def _plan_head(worker: Worker, settings: SchedulerSettings, plan: Plan) -> None:
    """Decode the shared head once it is learned (a few dozen tokens, once a context)."""
    head, cache = worker.cache.head, worker.cache
    if head is None or head.decoded or head.busy or not worker.queue:
        return
    if head.seq is None and not cache.allocate(head):
        return
    plan.removals += cache.removals
    cache.removals = []
    take = min(len(head.key) - head.planned, settings.batch_tokens - plan.tokens)
    if take > 0:
        plan.prefixes.append((head, head.key[head.planned : head.planned + take], head.planned))
        head.planned += take
        head.busy = True
        plan.tokens += take


def _plan_prefix(worker: Worker, settings: SchedulerSettings, work: WorkItem, plan: Plan, now: float) -> bool:
    """Put (the next part of) the job's prefix into the batch; True when the batch completes it."""
    entry = work.entry
    if entry.busy:
        return False  # an earlier job put a part of it, not its last, into this batch
    if entry.seq is None and not worker.cache.allocate(entry):
        return False  # no KV room until a cached prefix is released
    plan.removals += worker.cache.removals  # prefixes evicted to make room: cleared before this batch
    worker.cache.removals = []
    if entry.saved is not None and entry.decoded:  # parked: restored before the batch, not decoded
        plan.restores.append(entry)
        entry.busy = True
        return True
    if entry.planned == 0:  # a new prefix: its start may be the shared head, already decoded
        worker.cache.learn_head(entry.key)
        head = worker.cache.head_for(entry)
        if head is not None:
            plan.copies.append((head.seq, entry.seq))
            entry.planned = entry.filled = len(head.key)
            worker.cache.head_reuses += 1
    take = min(len(entry.key) - entry.planned, settings.batch_tokens - plan.tokens)
    if take <= 0 or not _ends_in_time(worker, plan, work, take, now):
        return False
    start = entry.planned
    plan.prefixes.append((entry, entry.key[start : start + take], start))
    entry.planned += take
    entry.busy = True
    plan.tokens += take
    if work.handle.deadline is not None:
        plan.deadline = min(plan.deadline, work.handle.deadline)
    if entry.planned < len(entry.key):
        return False
    plan.completing.add(id(entry))
    return True


def _plan_suffixes(worker: Worker, settings: SchedulerSettings, ledger: Ledger, work: WorkItem, plan: Plan,
                   now: float) -> None:  # fmt: skip
    spt = worker.seconds_per_token
    handle = work.handle
    while work.next < work.size and worker.suffix_seqs:
        length = len(work.suffixes[work.next])
        if plan.tokens + length > settings.batch_tokens:
            return
        if not _ends_in_time(worker, plan, work, length, now):
            if handle.deadline is not None and now + length * spt * MARGIN > handle.deadline:
                ledger.drop_late(work, "too_late")  # too late even alone: never decode it
            return
        plan.suffixes.append((work, work.next, worker.suffix_seqs.pop()))
        plan.tokens += length
        work.next += 1
        work.inflight += 1
        ledger.queued -= 1
        if handle.first_planned is None:
            handle.first_planned = now
        if handle.deadline is not None:
            plan.deadline = min(plan.deadline, handle.deadline)
