"""The LLM scheduler on a tiny LLaMA GGUF: real llama.cpp decodes, real threads, bounded loops."""

from __future__ import annotations

import ctypes
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from runtime.llm import LlamaModel, LlamaScorer, LlamaSettings, LLMError
from runtime.scheduling import ItemState, LLMScheduler, SchedulerObserver, SchedulerSettings
from runtime.scheduling.admission import MARGIN as _MARGIN
from runtime.scheduling.prefix_cache import PrefixCache as _PrefixCache
from runtime.scheduling.threads import _QUIET_S

from .tiny_llm import write_tiny_llama_gguf

PARITY = 2e-3  # batch composition changes float summation order, not answers (llama.cpp says the same)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("scheduler") / "tiny.gguf")


@pytest.fixture(scope="module")
def model(gguf: Path):
    yes, no = _answer_ids(gguf)
    llm = LlamaModel(gguf, yes, no)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def reference(gguf: Path):
    """Each prompt scored whole and alone, nothing cached or batched."""
    yes, no = _answer_ids(gguf)
    with LlamaScorer(gguf, yes, no, LlamaSettings(n_threads=1)) as scorer:
        yield lambda prefix, suffixes: np.array([scorer.score_full(list(prefix) + s) for s in suffixes])


def _answer_ids(gguf: Path) -> tuple[int, int]:
    llm = LlamaModel(gguf, 0, 0)
    try:
        return llm.tokenize(" Yes")[0], llm.tokenize(" No")[0]
    finally:
        llm.close()


def _prompt(model: LlamaModel, user: int, candidates: int, first_item: int = 0, history: int = 3):
    lines = "".join(f"- Movie Number {(user * 7 + k) % 40} (1990; Drama): {1 + (user + k) % 5} stars\n"
                    for k in range(history))  # fmt: skip
    prefix = [1] + model.tokenize(f"A user rated movies from 1 to 5 stars (user {user}).\n{lines}")
    suffixes = [model.tokenize(f"Target movie: Movie Number {first_item + i} (19{80 + i % 20}; Horror)\n"
                               "Will the user like it?\nAnswer:") for i in range(candidates)]  # fmt: skip
    return prefix, suffixes


class Recorder(SchedulerObserver):
    def __init__(self) -> None:
        self.lookups: Counter = Counter()
        self.dropped_counts: Counter = Counter()
        self.batches: list[tuple[int, int]] = []

    def prefix_lookup(self, hit: bool) -> None:
        self.lookups["hit" if hit else "miss"] += 1

    def dropped(self, reason: str, count: int) -> None:
        self.dropped_counts[reason] += count

    def batch(self, tokens: int, sequences: int, seconds: float) -> None:
        self.batches.append((tokens, sequences))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _answers(scheduler: LLMScheduler, job) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    assert job.wait(60), "the job did not finish"
    return scheduler.collect(job)


def test_concurrent_requests_get_their_own_answers(model, reference):
    recorder = Recorder()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1, batch_tokens=256, max_sequences=16),
                             observer=recorder)  # fmt: skip
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def client(user: int) -> None:
        try:
            for round_ in range(3):
                prefix, suffixes = _prompt(model, user, 2 + (user + round_) % 5, first_item=round_ * 10)
                job = scheduler.submit(prefix, suffixes, None, user=str(user)).job
                p, state = _answers(scheduler, job)
                assert (state == ItemState.DONE).all()
                results[(user, round_)] = p
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    try:
        threads = [threading.Thread(target=client, args=(u,)) for u in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        scheduler.close()
    assert not errors, errors[:2]
    assert len(results) == 36
    for (user, round_), p in results.items():
        prefix, suffixes = _prompt(model, user, 2 + (user + round_) % 5, first_item=round_ * 10)
        assert np.abs(p - reference(prefix, suffixes)).max() <= PARITY, (user, round_)
    # requests shared batches: fewer decodes than jobs, and some decode carried several sequences
    assert len(recorder.batches) < 36 and max(s for _, s in recorder.batches) > 2


def test_a_paused_queue_is_decoded_together(model, reference):
    recorder = Recorder()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1, batch_tokens=2048, max_sequences=64),
                             observer=recorder)  # fmt: skip
    try:
        with scheduler.paused():
            jobs = [scheduler.submit(*_prompt(model, u, 4), None, user=str(u)).job for u in range(6)]
        answers = [_answers(scheduler, job)[0] for job in jobs]
    finally:
        scheduler.close()
    # one decode: six new users' prefixes, each shared with its candidates' sequences, and 24 candidates
    assert [s for _, s in recorder.batches] == [6 + 24]
    for u, p in enumerate(answers):
        assert np.abs(p - reference(*_prompt(model, u, 4))).max() <= PARITY


def test_two_requests_of_a_new_user_share_one_prefix_decode(model, reference):
    recorder = Recorder()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1, batch_tokens=2048), observer=recorder)
    try:
        prefix, first = _prompt(model, 8, 3)
        _, second = _prompt(model, 8, 5, first_item=20)
        with scheduler.paused():
            jobs = [scheduler.submit(prefix, suffixes, None, user="8").job for suffixes in (first, second)]
        answers = [_answers(scheduler, job)[0] for job in jobs]
    finally:
        scheduler.close()
    assert recorder.lookups == {"miss": 1, "hit": 1} and [s for _, s in recorder.batches] == [1 + 3 + 5]
    assert scheduler.decoded_tokens == len(prefix) + sum(len(s) for s in first + second)
    for suffixes, p in zip((first, second), answers, strict=True):
        assert np.abs(p - reference(prefix, suffixes)).max() <= PARITY


def test_prefix_is_reused_across_requests_and_dropped_by_an_event(model):
    recorder = Recorder()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1), observer=recorder)
    try:
        prefix, suffixes = _prompt(model, 3, 4)
        first = _answers(scheduler, scheduler.submit(prefix, suffixes, None, user="3").job)[0]
        tokens_after_first = scheduler.decoded_tokens
        second = _answers(scheduler, scheduler.submit(prefix, suffixes, None, user="3").job)[0]
        assert recorder.lookups == {"miss": 1, "hit": 1}
        # the repeat decoded only its suffixes
        assert scheduler.decoded_tokens - tokens_after_first == sum(len(s) for s in suffixes)
        assert np.abs(first - second).max() <= PARITY
        assert scheduler.cached_prefixes() == 1
        assert scheduler.invalidate_user("3") == 1 and scheduler.cached_prefixes() == 0
        _answers(scheduler, scheduler.submit(prefix, suffixes, None, user="3").job)
        assert recorder.lookups == {"miss": 2, "hit": 1}
    finally:
        scheduler.close()


def test_idle_prefixes_leave_the_kv_cache_and_come_back_by_a_restore(model, reference):
    recorder = Recorder()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1, prefix_host_mib=4), observer=recorder)
    cache = scheduler.workers[0].cache
    context = scheduler.workers[0].context
    try:
        (prefix, suffixes), (other, others) = _prompt(model, 5, 4), _prompt(model, 6, 3)
        first = _answers(scheduler, scheduler.submit(prefix, suffixes, None, user="5").job)[0]
        entry = cache.entries[tuple(prefix)]
        seq = entry.seq
        assert entry.saved is None and context.sequence_bytes(seq) > 0  # idle, not yet moved
        # the next decode first moves the idle prefix out: a copy in host memory, its cells cleared
        _answers(scheduler, scheduler.submit(other, others, None, user="6").job)
        assert entry.seq is None and entry.saved is not None
        assert scheduler.stats()["parked_prefix_bytes"] == ctypes.sizeof(entry.saved) > 0
        assert int(model._lib.llama_memory_seq_pos_max(context._memory, seq)) == -1
        # a repeat restores it: a hit, only the suffixes decoded, the same answers
        before = scheduler.decoded_tokens
        again = _answers(scheduler, scheduler.submit(prefix, suffixes, None, user="5").job)[0]
        assert scheduler.decoded_tokens - before == sum(len(s) for s in suffixes)
        assert recorder.lookups == {"miss": 2, "hit": 1} and scheduler.stats()["restored_prefixes"] == 1
        assert np.abs(again - first).max() <= PARITY
        assert np.abs(again - reference(prefix, suffixes)).max() <= PARITY
        # an event drops the user's prefix from host memory too
        assert scheduler.invalidate_user("6") == 1 and tuple(other) not in cache.entries
        assert scheduler.stats()["parked_prefix_bytes"] == ctypes.sizeof(entry.saved)  # user 5's copy alone
    finally:
        scheduler.close()


def test_a_restored_prefix_whose_candidates_come_too_late_decodes_nothing_and_stays(model):
    clock, recorder = FakeClock(), Recorder()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1), observer=recorder, clock=clock, start=False)
    worker = scheduler.workers[0]
    try:
        worker.seconds_per_token = 1e-4
        prefix, suffixes = _prompt(model, 5, 3)
        for user in (5, 6):  # the second decode parks the first user's prefix
            scheduler.submit(*_prompt(model, user, 3), None, user=str(user))
            assert scheduler.step()
        entry = worker.cache.entries[tuple(prefix)]
        assert entry.parked
        job = scheduler.submit(prefix, suffixes, deadline=clock.now + 1.0, user="5").job
        worker.seconds_per_token = 1.0  # now no candidate fits before the deadline: the restore alone is planned
        decodes = scheduler.decodes
        assert scheduler.step()
        assert job.done and (job.state == ItemState.EXPIRED).all() and recorder.dropped_counts == {"too_late": 3}
        assert scheduler.stats()["restored_prefixes"] == 1 and entry.error is None
        assert worker.cache.entries[tuple(prefix)] is entry and entry.ready  # kept, back in the KV cache
        assert scheduler.decodes == decodes + 1 and scheduler.decoded_tokens == sum(
            len(p) + sum(len(x) for x in s) for p, s in (_prompt(model, u, 3) for u in (5, 6))
        )
    finally:
        scheduler.close()


def test_host_memory_for_parked_prefixes_is_bounded_least_recently_used_first():
    cache = _PrefixCache(10_000, range(8), host_bytes=1000)
    entries = []
    for k in range(4):
        entry, _ = cache.acquire((k,) * 100, user=str(k))
        assert cache.allocate(entry)
        entry.filled = entry.planned = 100
        cache.release(entry)
        entries.append(entry)
    taken = cache.take_parking()
    assert taken == entries and all(e.busy for e in taken)
    for entry in taken:
        cache.parked(entry, (ctypes.c_uint8 * 400)())
    # 1,000 bytes hold two copies of 400: the two least recently used are forgotten
    assert [e.key[0] for e in cache.entries.values()] == [2, 3]
    assert cache.host_used == 800 and cache.used == 0 and len(cache.free) == 8
    assert all(e.parked for e in cache.entries.values())
    # an event forgets a parked prefix and frees its copy
    assert cache.invalidate("3") == 1 and cache.host_used == 400
    # a prefix whose copy failed is forgotten, not kept half there
    entry, _ = cache.acquire((9,) * 100, user="9")
    assert cache.allocate(entry)
    entry.filled = entry.planned = 100
    cache.release(entry)
    [taken] = cache.take_parking()
    cache.parked(taken, None)
    assert (9,) * 100 not in cache.entries and cache.used == 0 and len(cache.free) == 8


def test_expired_work_is_never_decoded(model):
    clock, recorder = FakeClock(), Recorder()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1), observer=recorder, clock=clock, start=False)
    try:
        scheduler.workers[0].seconds_per_token = 1e-4
        job = scheduler.submit(*_prompt(model, 1, 5), deadline=clock.now + 1.0).job
        assert job is not None and job.size == 5
        clock.now += 2.0  # the deadline passes while the job waits
        assert scheduler.step() is False  # nothing decoded
        assert job.done and (job.state == ItemState.EXPIRED).all()
        assert scheduler.decoded_tokens == 0 and scheduler.decodes == 0
        assert recorder.dropped_counts == {"deadline": 5}
        assert scheduler.queued_candidates() == 0
    finally:
        scheduler.close()


def test_a_deadline_mid_request_keeps_the_done_part(model, reference):
    clock = FakeClock()
    # a small batch: the prefix and a candidate or two, then a few candidates a round
    settings = SchedulerSettings(threads=1, batch_tokens=110, max_sequences=4)
    scheduler = LLMScheduler(model, settings, clock=clock, start=False)
    try:
        scheduler.workers[0].seconds_per_token = 1e-4
        prefix, suffixes = _prompt(model, 2, 10)
        job = scheduler.submit(prefix, suffixes, deadline=clock.now + 10).job
        assert scheduler.step() and scheduler.step()
        answered = int((job.state == ItemState.DONE).sum())
        assert 0 < answered < 10
        clock.now += 20
        assert scheduler.step() is False
        p, state = scheduler.collect(job)
        done = state == ItemState.DONE
        assert done.sum() == answered and (state[~done] == ItemState.EXPIRED).all()
        assert np.abs(p[done] - reference(prefix, suffixes)[done]).max() <= PARITY
    finally:
        scheduler.close()


def test_admission_holds_the_queue_bound_and_the_deadline(model):
    clock = FakeClock()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1, queue_candidates=8), clock=clock, start=False)
    try:
        worker = scheduler.workers[0]
        worker.seconds_per_token = 1e-6
        first = scheduler.submit(*_prompt(model, 1, 5), deadline=clock.now + 10)
        second = scheduler.submit(*_prompt(model, 2, 5), deadline=clock.now + 10)
        third = scheduler.submit(*_prompt(model, 3, 2), deadline=clock.now + 10)
        assert (first.admitted, second.admitted, third.admitted) == (5, 3, 0)
        assert (second.feasible, third.feasible) == (5, 2)  # refused for room, not for time
        assert scheduler.queued_candidates() == 8
        while scheduler.step():
            pass
        assert scheduler.queued_candidates() == 0 and first.job.done and second.job.done
        # time: at 10 ms a token, a 1 s deadline holds the prefix and some candidates, not all
        worker.seconds_per_token = 0.01
        prefix, suffixes = _prompt(model, 4, 8)
        fits = (1.0 / 0.01 - len(prefix)) // len(suffixes[0])
        timed = scheduler.submit(prefix, suffixes, deadline=clock.now + 1.0)
        assert 0 < timed.admitted < 8 and timed.admitted == timed.feasible and abs(timed.admitted - fits) <= 1
        hopeless = scheduler.submit(*_prompt(model, 5, 3), deadline=clock.now + 0.2)
        assert hopeless.admitted == 0 and hopeless.feasible == 0  # late even for an idle LLM
    finally:
        scheduler.close()


def test_saturation_counts_the_candidates_ahead(model):
    """A mode "llm" request is refused at arrival when the requests ahead of it (still waiting for a
    CPU worker) will take the queue's room first, even while the queue itself is empty; a request
    larger than the queue fits an empty one (it is admitted in part)."""
    clock = FakeClock()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1, queue_candidates=32), clock=clock, start=False)
    try:
        deadline = clock.now + 10
        assert scheduler.saturated(deadline, candidates=10) is None
        assert scheduler.saturated(deadline, candidates=100) is None
        assert scheduler.saturated(deadline, candidates=10, ahead=22) is None
        assert scheduler.saturated(deadline, candidates=10, ahead=23) is not None
        assert scheduler.saturated(deadline, candidates=100, ahead=1) is not None
        scheduler.submit(*_prompt(model, 1, 20), deadline=deadline)
        assert scheduler.saturated(deadline, candidates=10, ahead=2) is None
        assert scheduler.saturated(deadline, candidates=10, ahead=3) is not None
    finally:
        scheduler.close()


def test_saturation_counts_a_cold_users_prefix_before_tokenizing(model):
    """At arrival, before its prompt is tokenized, a request of a user not admitted lately is
    reckoned to need a prefix decoded too: refused at once where a user with a likely cached
    prefix still fits; an event for the user makes them cold again."""
    clock = FakeClock()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1), clock=clock, start=False)
    try:
        scheduler.workers[0].seconds_per_token = spt = 0.01
        prefix, suffixes = _prompt(model, 1, 5)
        assert scheduler.submit(prefix, suffixes, deadline=clock.now + 60, user="1").admitted == 5
        assert scheduler.estimate.prefix_tokens == len(prefix)
        wait = scheduler.retry_after()
        warm, cold = (scheduler.estimate.tokens(u) * spt for u in ("1", "2"))
        assert cold - warm == pytest.approx(len(prefix) * spt)
        deadline = clock.now + (wait + (warm + cold) / 2) * _MARGIN
        assert scheduler.saturated(deadline, user="1") is None
        assert scheduler.saturated(deadline, user="2") is not None
        scheduler.invalidate_user("1")
        assert scheduler.saturated(deadline, user="1") is not None
        # a deadline that the request's own work alone outlasts is a deadline fallback, not overload
        assert scheduler.saturated(clock.now + cold / 2, user="2") is None
    finally:
        scheduler.close()


def test_long_requests_span_several_decodes_and_score_as_alone(model, reference):
    recorder = Recorder()
    # 70 candidates and a prefix longer than one batch: several prefix rounds, then 8 candidates a decode
    settings = SchedulerSettings(threads=1, batch_tokens=128, max_sequences=8)
    scheduler = LLMScheduler(model, settings, observer=recorder)
    try:
        prefix, suffixes = _prompt(model, 9, 70, history=12)
        assert len(prefix) > settings.batch_tokens
        p, state = _answers(scheduler, scheduler.submit(prefix, suffixes, None).job)
    finally:
        scheduler.close()
    assert (state == ItemState.DONE).all()
    assert len(recorder.batches) >= 70 // 8 + 2
    assert max(t for t, _ in recorder.batches) <= settings.batch_tokens
    assert np.abs(p - reference(prefix, suffixes)).max() <= PARITY


def test_prompts_that_cannot_fit_are_refused(model):
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1, max_prompt_tokens=64), start=False)
    try:
        with pytest.raises(LLMError, match="exceeds the context of 64"):
            scheduler.submit(*_prompt(model, 1, 2, history=5))
        with pytest.raises(LLMError, match="empty"):
            scheduler.submit([1, 2, 3], [[]])
    finally:
        scheduler.close()


def test_a_busy_request_side_gets_a_core_back(model):
    """Busy: a core goes back to the requests at once; quiet: the LLM takes it again only once the
    requests have stayed quiet for _QUIET_S (a starved request side looks quiet for a moment)."""
    clock = FakeClock()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=2, threads_when_busy=1), clock=clock, start=False)
    try:
        worker = scheduler.workers[0]
        assert set(worker.speed) == {1, 2} and worker.speed[1] > worker.speed[2]  # slower, until measured
        for load, wait, threads in ((0.0, 0.0, 2), (0.5, 0.0, 1), (0.0, 0.0, 1), (0.0, _QUIET_S / 2, 1),
                                    (0.0, _QUIET_S / 2, 2), (0.5, 0.0, 1)):  # fmt: skip
            clock.now += wait
            scheduler.report_host_load(load)
            scheduler.submit(*_prompt(model, 1, 2))
            assert scheduler.step() and worker.applied_threads == threads, (load, wait, threads)
    finally:
        scheduler.close()


def test_a_candidates_cells_leave_and_its_prefix_stays(model: LlamaModel, reference):
    """`remove_sequence(seq, start)` drops a candidate's own cells and keeps those it shares with its
    prefix: the same suffix decoded again answers as the whole prompt does (the bench's
    benchmarks/suffix_cost.py decodes a batch of suffixes again and again that way)."""
    from runtime.llm import LlamaContext

    prefix, suffixes = _prompt(model, 3, 2)
    context = LlamaContext(model, 512, 128, 3, threads=1)
    try:
        context.decode(prefix, list(range(len(prefix))), [(0, 1, 2)] * len(prefix), [False] * len(prefix))
        answers = []
        for _ in range(2):
            tokens = [*suffixes[0], *suffixes[1]]
            positions = [len(prefix) + j for s in suffixes for j in range(len(s))]
            seqs = [1 + k for k, s in enumerate(suffixes) for _ in s]
            last = [j == len(s) - 1 for s in suffixes for j in range(len(s))]
            context.decode(tokens, positions, seqs, last)
            answers.append([context.answer(len(suffixes[0]) - 1), context.answer(len(tokens) - 1)])
            for k in range(len(suffixes)):
                context.remove_sequence(k + 1, len(prefix))
        context.remove_sequence(1)
        context.remove_sequence(2)
        assert context.sequence_bytes(0) > 0
    finally:
        context.close()
    assert answers[0] == pytest.approx(answers[1], abs=1e-6)
    assert answers[1] == pytest.approx(reference(prefix, suffixes), abs=2e-3)


def test_a_decode_loop_that_dies_fails_its_jobs_at_once(model):
    """Anything but a llama.cpp error on one batch (here a token id that is no number) stops
    the scheduler: every job fails now, none waits for its deadline, and new work is refused."""
    failures: list[str] = []
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1), on_failure=failures.append)
    try:
        with scheduler.paused():
            doomed = scheduler.submit([1, 2, 3], [["not a token"]], None).job
            waiting = scheduler.submit([4, 5, 6], [[7, 8], [9, 10]], None).job
        assert doomed.wait(5) and waiting.wait(5), "jobs of a dead loop were left waiting"
        assert (doomed.state == ItemState.FAILED).all() and (waiting.state == ItemState.FAILED).all()
        assert "ValueError" in waiting.error and not scheduler.alive
        assert len(failures) == 1 and "decode loop 0 stopped" in failures[0]
        with pytest.raises(LLMError, match="decode loop 0 stopped"):
            scheduler.submit([1, 2], [[3]], None)
        assert scheduler.queued_candidates() == 0
    finally:
        scheduler.close()


def test_a_failed_warm_up_of_one_of_several_contexts_is_the_llm_error(model, monkeypatch):
    calls = []

    def warm_up(self, worker) -> None:  # noqa: ANN001
        calls.append(worker.index)
        if worker.index == 1:
            raise LLMError("llama_decode returned -3 (out of memory)")

    monkeypatch.setattr(LLMScheduler, "_warm_up", warm_up)
    with pytest.raises(LLMError, match=r"context 1 failed its first decode: .*out of memory"):
        LLMScheduler(model, SchedulerSettings(threads=1, contexts=3))
    assert calls == [0, 1]


def test_the_child_process_exits_when_its_loop_dies_and_comes_back(gguf):
    from runtime.scheduling import RemoteScheduler

    yes, no = _answer_ids(gguf)
    scheduler = RemoteScheduler(gguf, yes, no, SchedulerSettings(threads=1))
    try:
        job = scheduler.submit([1, 2, 3], [["not a token"]], None).job
        assert job.wait(10) and (job.state == ItemState.FAILED).all()
        for _ in range(600):  # bounded: until the new process answers
            if scheduler.alive and scheduler.restarted:
                break
            threading.Event().wait(0.05)
        assert scheduler.alive and scheduler.restarted == 1
        p, state = _answers(scheduler, scheduler.submit([1, 2, 3], [[4, 5]], None).job)
        assert (state == ItemState.DONE).all() and 0 < p[0] < 1
    finally:
        scheduler.close()


def test_new_users_start_from_the_shared_head_decoded_once(model, reference):
    """The instruction every prefix starts with is learned from the first three new prefixes,
    decoded once, and copied into each later new prefix: a new user decodes only the history, with
    the answers of prompts decoded whole and alone."""
    instruction = ("Please predict whether the user will like the target movie based on the rating history. "
                   "You should ONLY answer no or yes.\nThe user's rating history, oldest first:\n")  # fmt: skip

    def prompt(user: int) -> tuple[list[int], list[list[int]]]:
        prefix, suffixes = _prompt(model, user, 3)
        return [1] + model.tokenize(instruction) + prefix[1:], suffixes

    recorder = Recorder()
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1, batch_tokens=512, max_sequences=8, contexts=1),
                             observer=recorder)  # fmt: skip
    try:
        for user in range(6):
            prefix, suffixes = prompt(user)
            p, state = _answers(scheduler, scheduler.submit(prefix, suffixes, None, user=str(user)).job)
            assert (state == ItemState.DONE).all()
            assert np.abs(p - reference(prefix, suffixes)).max() <= PARITY, user
        cache = scheduler.workers[0].cache
        head = cache.head
        assert head is not None and len(head.key) >= len(model.tokenize(instruction)) and head.ready
        # learned from users 0-2, decoded in user 3's batch (beside user 3's whole prefix), used by 4 and 5
        assert cache.head_reuses == 2
        decoded = [tokens for tokens, _ in recorder.batches]
        # the last user's batch: its prefix after the head, and its three suffixes
        prefix, suffixes = prompt(5)
        assert decoded[-1] == len(prefix) - len(head.key) + sum(len(s) for s in suffixes)
    finally:
        scheduler.close()
