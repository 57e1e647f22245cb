"""The serving core under load: real-time deadlines over HTTP with a busy LLM process, the CPU
workers' late refusals and urgent lane, and two llama.cpp contexts keeping each user on one."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from runtime.errors import OverloadedError
from runtime.llm import LlamaModel
from runtime.scheduling import LLMScheduler, SchedulerSettings

from .test_scheduler import _answer_ids, _prompt
from .test_serving_engine import _serving
from .tiny_llm import write_tiny_llama_gguf


def _body(user: int, n: int, **extra) -> dict:
    first = 1 + (user * 3) % 20
    return {"user_id": str(user), "candidates": [{"item_id": str(first + i)} for i in range(n)], **extra}


def test_deadlines_hold_over_http_while_the_llm_is_busy(bundle, tmp_path):
    """Clients keep the LLM process busy with mode llm requests; requests with 200-500 ms deadlines
    are answered within their deadline + 100 ms, and what the LLM did not answer in time is a
    counted deadline fallback."""
    with _serving(bundle, tmp_path, llm_queue_candidates=4096) as (base, app):
        engine = app.state.engine
        stop = threading.Event()

        def keep_busy(user: int) -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    client.post(f"{base}/v1/predict", json=_body(user, 200, mode="llm", deadline_ms=20_000))
                    user += 7

        loaders = [threading.Thread(target=keep_busy, args=(100 + k,), daemon=True) for k in range(4)]
        for loader in loaders:
            loader.start()
        try:
            for _ in range(500):  # bounded: until the LLM has work queued
                if engine.scheduler.queued_candidates() > 0:
                    break
                time.sleep(0.01)
            late: list[tuple[int, float]] = []
            busy = 0  # the most candidates seen waiting for the LLM while a probe was answered
            with httpx.Client(timeout=10) as client:
                for k, deadline in enumerate((200, 300, 500) * 3):
                    started = time.perf_counter()
                    answer = client.post(f"{base}/v1/predict",
                                         json=_body(k + 1, 60, llm_fraction=1.0, deadline_ms=deadline))  # fmt: skip
                    took = 1000 * (time.perf_counter() - started)
                    assert answer.status_code == 200, answer.text
                    assert {p["route"] for p in answer.json()["predictions"]} <= {"crm", "llm", "crm_fallback"}
                    busy = max(busy, engine.scheduler.queued_candidates())
                    if took > deadline + 100:
                        late.append((deadline, took))
            assert not late, f"answered past deadline + 100 ms: {late}"
            assert busy > 0, "the LLM was never busy"
        finally:
            stop.set()
            for loader in loaders:
                loader.join(timeout=60)
        for _ in range(3000):  # bounded: until the queue has drained
            if engine.scheduler.queued_candidates() == 0:
                break
            time.sleep(0.01)
        # admitted into an idle queue, then held: the deadline passes with the work undone
        deadlines = engine.metrics.value("corella_llm_fallbacks_total", reason="deadline")
        with engine.scheduler.paused():
            started = time.perf_counter()
            answer = httpx.post(f"{base}/v1/predict", json=_body(40, 10, llm_fraction=0.5, deadline_ms=300),
                                timeout=10).json()  # fmt: skip
            took = 1000 * (time.perf_counter() - started)
        assert 300 <= took <= 400 and answer["fallbacks"] == {"deadline": 5}
        assert engine.metrics.value("corella_llm_fallbacks_total", reason="deadline") - deadlines == 5


def test_the_cpu_workers_refuse_late_work_and_run_urgent_work_first():
    from runtime.serving.workers import CpuWorkers as _CpuWorkers

    workers = _CpuWorkers(1, 0)
    order: list[str] = []

    async def scenario() -> None:
        blocker = asyncio.ensure_future(workers.run(time.sleep, 0.4))
        await asyncio.sleep(0.05)  # the only worker is busy from here
        soon = time.perf_counter() + 0.1
        late = asyncio.ensure_future(workers.run(order.append, "late", deadline=soon))
        plain = asyncio.ensure_future(workers.run(order.append, "plain"))
        urgent = asyncio.ensure_future(workers.run(order.append, "urgent", urgent=True, weight=7))
        await asyncio.sleep(0.01)
        assert workers.urgent_candidates == 7 and workers.waiting == [1, 3]
        await blocker
        await asyncio.gather(plain, urgent)
        with pytest.raises(OverloadedError, match="waited .* past its deadline"):
            await late
        # a request whose wait alone outlasts its deadline is refused before it queues
        workers.seconds, workers.interval = 1.0, 1.0
        blocked = asyncio.ensure_future(workers.run(time.sleep, 0.3))
        queued = [asyncio.ensure_future(workers.run(time.sleep, 0.0)) for _ in range(3)]
        await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError, match="saturated"):
            workers.refuse_if_late(time.perf_counter() + 0.2)
        await asyncio.gather(blocked, *queued)

    try:
        asyncio.run(scenario())
    finally:
        workers.close()
    assert order == ["urgent", "plain"]  # the late one never ran; the urgent one went first
    assert workers.urgent_candidates == 0


def test_two_contexts_keep_each_user_on_one(tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    yes, no = _answer_ids(gguf)
    model = LlamaModel(gguf, yes, no)
    scheduler = LLMScheduler(model, SchedulerSettings(threads=1, contexts=2))
    try:
        users = {u: _prompt(model, u, 4) for u in range(1, 7)}
        placed: dict[int, set[int]] = {}
        for round_ in range(3):  # every user three times, the others' requests in between
            jobs = {u: scheduler.submit(prefix, suffixes, None, user=str(u)).job for u, (prefix, suffixes) in
                    users.items()}  # fmt: skip
            for u, job in jobs.items():
                assert job.wait(60)
                assert job.prefix_hit == (round_ > 0), (u, round_)
                key = tuple(users[u][0])
                placed.setdefault(u, set()).update(w.index for w in scheduler.workers if key in w.cache.entries)
        assert all(len(where) == 1 for where in placed.values()), placed
        assert {next(iter(where)) for where in placed.values()} == {0, 1}  # both contexts serve
    finally:
        scheduler.close()
        model.close()
