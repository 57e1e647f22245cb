"""HTTP API (FastAPI + uvicorn): POST /v1/predict, POST /v1/events, GET /v1/model, /healthz, /readyz, /metrics.

`create_app(settings)` builds an app; the bundle and models load in the lifespan and live on
`app.state`. Nothing happens at import time. A user's mistake is a 4xx with a JSON error envelope,
never a 5xx.

Predictions never hold a thread while the LLM works: the handler runs the CRM half of a request
on a few CPU workers, then awaits the LLM scheduler's answer on the event loop. Health, readiness
and metrics are plain coroutines, so they answer however many predictions are waiting. The CPU
workers run at a lower CPU priority than llama.cpp's threads (`http_nice`), so that a flood of
cheap requests cannot take the cores the LLM decodes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import itertools
import logging
import math
import os
import queue
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import annotated_types
import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime import __version__
from runtime.bundle import Bundle, load_bundle
from runtime.engine import CandidateItem, Engine, HistoryItem
from runtime.engine import Request as EngineRequest
from runtime.errors import ConfigError, CorellaError, OverloadedError, RequestTooLarge, StoreFull
from runtime.llm import LLMError
from runtime.metrics import ServingMetrics
from runtime.settings import ServerSettings
from runtime.store import Interaction

__all__ = ["ServerSettings", "create_app", "uvicorn_config", "PredictBody", "EventsBody", "to_engine_request"]

log = logging.getLogger(__name__)


def uvicorn_config(app: FastAPI, settings: ServerSettings, log_level: str = "info") -> Any:
    """uvicorn's own limits: a bounded number of connections, a deep accept backlog; its access log
    only when asked for."""
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                          limit_concurrency=settings.limit_concurrency, backlog=2048,
                          timeout_keep_alive=30, access_log=settings.access_log)  # fmt: skip


# ---------------------------------------------------------------------------- request bodies
class _Strict(BaseModel):
    # strict: a JSON false is not a number, 1.5 is not an integer, "5" is not a number
    model_config = ConfigDict(extra="forbid", strict=True)


def _integral(value: Any) -> Any:
    """JSON has one number type: 1700000000.0 is an integer to a JSON Schema, 1.5 is not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: unix seconds up to the year 9999: past it a timestamp is a mistake (and past 2^63, SQLite's limit)
Timestamp = Annotated[int, annotated_types.Ge(0), annotated_types.Le(253_402_300_799), BeforeValidator(_integral)]


class HistoryBody(_Strict):
    item_id: str = Field(min_length=1, max_length=256)
    rating: float = Field(ge=0, le=100)
    timestamp: Timestamp | None = Field(None, description="unix seconds")
    title: str | None = Field(None, max_length=512)


class CandidateBody(_Strict):
    item_id: str = Field(min_length=1, max_length=256)
    title: str | None = Field(None, max_length=512, description="overrides the catalog; new items need one for the LLM")
    year: str | None = Field(None, max_length=16)
    tags: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=64)


class PredictBody(_Strict):
    user_id: str | None = Field(None, max_length=256, description="known users get profile and history from the store")
    user_attributes: (
        dict[Annotated[str, Field(max_length=32)], Annotated[str, Field(max_length=64)] | int | float] | None
    ) = Field(None, max_length=16, description="age, gender, occupation, zip")
    history: list[HistoryBody] | None = Field(None, max_length=1000, description="oldest first; overrides the store")
    candidates: list[CandidateBody] = Field(
        min_length=1, max_length=100_000, description="items to score (past --max-candidates: 413)"
    )
    mode: Literal["hybrid", "crm", "llm"] = "hybrid"
    llm_fraction: float | None = Field(None, ge=0, le=1, description="route this share of the candidates to the LLM")
    deadline_ms: float | None = Field(None, gt=0, le=600_000, description="answer this long after arrival at the "
                                      "latest; LLM work not done by then is answered by the CRM")  # fmt: skip


class EventBody(_Strict):
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    rating: float = Field(ge=0, le=100)
    timestamp: Timestamp | None = Field(None, description="unix seconds; default now")
    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="the client's id for the event: an id the store holds already is not appended again",
    )


class EventsBody(_Strict):
    events: list[EventBody] = Field(min_length=1, max_length=10_000)


def to_engine_request(body: PredictBody) -> EngineRequest:
    return EngineRequest(
        candidates=[
            CandidateItem(c.item_id, c.title, c.year, tuple(c.tags) if c.tags is not None else None)
            for c in body.candidates
        ],  # fmt: skip
        user_id=body.user_id,
        user_attributes=body.user_attributes,
        history=[HistoryItem(h.item_id, h.rating, h.timestamp, h.title) for h in body.history]
        if body.history is not None
        else None,
        mode=body.mode,
        llm_fraction=body.llm_fraction,
        deadline_ms=body.deadline_ms,
    )


# ---------------------------------------------------------------------------- errors
def _error(status: int, kind: str, message: str, details: Any = None, headers: dict[str, str] | None = None
           ) -> JSONResponse:  # fmt: skip
    body: dict[str, Any] = {"error": {"type": kind, "message": message}}
    if details is not None:
        body["error"]["details"] = details
    return JSONResponse(status_code=status, content=body, headers=headers)


class ErrorDetail(BaseModel):
    type: str = Field(description="what went wrong, e.g. validation_error, payload_too_large, overloaded")
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    """Every error answer: {"error": {"type", "message", "details"?}}."""

    error: ErrorDetail


def _documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route gives (all in the envelope)."""
    described = {400: "the body is not JSON (or not UTF-8)", 401: "missing or wrong API key", 413: "request too large",
                 422: "request does not match the schema", 429: "overloaded: retry after Retry-After seconds",
                 503: "models still loading", 507: "the live store is at its bound"}  # fmt: skip
    return {status: {"model": ErrorBody, "description": described[status]} for status in statuses}


_HTTP_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 503: "not_ready"}  # fmt: skip
#: corella's error types and the answer each gets; the first match in this order wins
_ERROR_ANSWERS: tuple[tuple[type[CorellaError], int, str], ...] = (
    (RequestTooLarge, 413, "payload_too_large"),
    (StoreFull, 507, "store_full"),
    (OverloadedError, 429, "overloaded"),
    (ConfigError, 400, "bad_request"),
    (CorellaError, 500, "internal_error"),
)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"]} for e in exc.errors()
        ]
        fields = ", ".join(d["field"] or "body" for d in details[:5])
        return _error(422, "validation_error", f"invalid request: {fields}", details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_KINDS.get(exc.status_code, "http_error")
        return _error(exc.status_code, kind, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(CorellaError)
    async def corella_error(request: Request, exc: CorellaError) -> JSONResponse:
        status, kind = next((s, k) for t, s, k in _ERROR_ANSWERS if isinstance(exc, t))
        headers = None
        if isinstance(exc, OverloadedError):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        if status >= 500:
            log.error("request failed: %s", exc)
        return _error(status, kind, str(exc), headers=headers)


# ---------------------------------------------------------------------------- the gate (pure ASGI)
class _Gate:
    """Stamps each request's arrival (deadlines count from it), refuses bodies over the limit,
    counts and times requests by endpoint and status, and says the time in a Server-Timing header.
    Pure ASGI: no extra task per request."""

    def __init__(self, app: Any, settings: ServerSettings, metrics: ServingMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = scope.setdefault("state", {})["arrived"] = time.perf_counter()
        status = [500]

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                # W3C Server-Timing: the time from arrival to answer, as the server saw it
                timing = f"app;dur={1000 * (time.perf_counter() - arrived):.1f}".encode()
                message["headers"] = [*message.get("headers", []), (b"server-timing", timing)]
            await send(message)

        headers = dict(scope.get("headers") or [])
        length, limit = headers.get(b"content-length", b""), self.settings.max_body_bytes
        try:
            if not length.isdigit() and b"transfer-encoding" in headers:
                # a chunked body says no length up front: read it here, counting the bytes as they come
                body, receive = await _read_body(receive, limit)
                length = str(len(body)).encode() if body is not None else str(limit + 1).encode()
            if length.isdigit() and int(length) > limit:
                await _error(413, "payload_too_large", f"request body of {int(length)} bytes or more exceeds {limit}")(
                    scope, receive, counted_send
                )
            else:
                await self.app(scope, receive, counted_send)
        finally:
            labels = (getattr(scope.get("route"), "path", "unmatched"), str(status[0]))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.request_seconds.labels(*labels).observe(time.perf_counter() - arrived)


async def _read_body(receive: Any, limit: int) -> tuple[bytes | None, Any]:
    """The whole body (None once it passes `limit` bytes) and a receive that replays it."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
        if size > limit:
            return None, receive
    body, sent = b"".join(chunks), [False]

    async def replay() -> dict[str, Any]:
        if sent[0]:
            return await receive()  # after the body: a disconnect, when it comes
        sent[0] = True
        return {"type": "http.request", "body": body, "more_body": False}

    return body, replay


# ---------------------------------------------------------------------------- endpoints
def _engine(request: Request) -> Engine:
    """The engine, once loading has finished (503 before); an LLM that failed to load means CRM fallbacks.
    A plain call, not a dependency: FastAPI's dependency solving cost ~0.06 ms a request."""
    if not getattr(request.app.state, "loaded", False):
        raise HTTPException(503, "models are still loading")
    return request.app.state.engine


def _key_check(key: SecretStr | None) -> list[Any]:
    """The route dependencies that ask for `Authorization: Bearer KEY`: none when no key is set
    (a dependency that checks nothing still costs every request its solving)."""
    if key is None:
        return []

    # a coroutine: a sync dependency would take a thread-pool hop per request
    async def require_key(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    return [Depends(require_key)]


def _api_router(settings: ServerSettings) -> APIRouter:
    router = APIRouter(prefix="/v1")
    read = _key_check(settings.api_key)
    write = _key_check(settings.events_api_key or settings.api_key)

    @router.post("/predict", dependencies=read, responses=_documented(400, 401, 413, 422, 429, 503))
    async def predict(body: PredictBody, request: Request) -> dict[str, Any]:
        """Score one user's candidates; each answer carries its score, route and CRM entropy. Routed
        candidates the LLM cannot answer in time are answered by the CRM (`crm_fallback` with a
        `fallback_reason`); a mode "llm" request the LLM cannot take at all is a 429 with Retry-After."""
        engine = _engine(request)
        arrived = request.scope["state"]["arrived"]
        engine_request = to_engine_request(body)
        cpu: _CpuWorkers = request.app.state.cpu
        deadline = engine.deadline(engine_request, arrived)
        # a 429 at once, before any CPU work, when the CRM or the LLM cannot answer in time; a mode
        # llm request goes first, so that the LLM's state it was admitted on is still the state
        urgent = engine_request.mode == "llm"
        cpu.refuse_if_late(deadline, urgent)
        # the mode llm requests ahead in the queue will take the LLM's room first
        engine.refuse_if_saturated(engine_request, arrived, cpu.expected_wait(urgent), ahead=cpu.urgent_candidates)
        weight = len(engine_request.candidates) if urgent else 0
        pending = await cpu.run(engine.begin, engine_request, arrived, deadline=deadline, urgent=urgent,
                                weight=weight)  # fmt: skip
        await pending.wait_async()
        # serialized as it is, by orjson: FastAPI's generic encoder would walk every prediction once
        # more, and the standard library's takes ~10x longer on the event loop (0.3 ms a 100-row answer)
        return Response(orjson.dumps(engine.finish(pending)), media_type="application/json")

    @router.post("/events", dependencies=write, responses=_documented(400, 401, 413, 422, 503, 507))
    async def events(body: EventsBody, request: Request) -> dict[str, Any]:
        """Append interactions; the next prediction for those users reads them."""
        engine = _engine(request)
        now = int(time.time())
        events = [Interaction(e.user_id, e.item_id, e.rating, e.timestamp if e.timestamp is not None else now,
                              event_id=e.event_id) for e in body.events]  # fmt: skip
        appended = await request.app.state.cpu.run(engine.append_events, events)
        return {"appended": appended, "duplicates": len(events) - appended}

    @router.get("/model", dependencies=read, responses=_documented(401, 503))
    def model(request: Request) -> dict[str, Any]:
        """What is being served: versions, files, router, parity and export-time metrics."""
        return _model_summary(_engine(request), settings)

    return router


#: a request that waited at least this long for a CPU worker, and past its deadline, is refused:
#: overload, not a deadline too short for its own work (that one is answered by the CRM)
_LATE_QUEUE_S = 0.05
_LOAD_INTERVAL_S = 0.1


class _LoadReporter:
    """Tells the LLM how busy the request side is, every `_LOAD_INTERVAL_S` from a thread of its
    own: the larger of this process's CPU use (in cores: the event loop's work counts) and the
    share of the time some request ran on or waited for a CPU worker (a starved process uses little
    CPU but keeps requests waiting). The workers' busy share alone, reported at their jobs' ends,
    read as idle whenever the event loop did the work or the workers were starved; the LLM then
    took every core for a batch and the whole request side stalled (4 times in a 20 s overload
    run, 0.3-1.4 s each)."""

    def __init__(self, workers: _CpuWorkers, report: Any) -> None:
        self.workers, self.report = workers, report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="corella-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wall, cpu, occupied = time.perf_counter(), time.process_time(), self.workers.occupied_seconds()
        while not self._stop.wait(_LOAD_INTERVAL_S):
            now, used, busy = time.perf_counter(), time.process_time(), self.workers.occupied_seconds()
            elapsed = max(1e-6, now - wall)
            self.report(max((used - cpu) / elapsed, (busy - occupied) / elapsed))
            wall, cpu, occupied = now, used, busy

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _CpuWorkers:
    """The few threads that run request work (encoding, the CRM, store writes): the event loop stays
    free for health checks and answers, and a few threads, not dozens, contend for the GIL.
    Requests beyond wait idle in a queue, urgent ones first (a mode "llm" request, whose answer
    may be a 429 that is only useful at once); `expected_wait` says for how long, so that a request
    that could not be answered in time is refused before it queues."""

    def __init__(self, workers: int, nice: int) -> None:
        self.workers = workers
        self.waiting = [0, 0]  # urgent, other; only the event loop thread changes them
        self.urgent_candidates = 0  # candidates of the urgent jobs not yet started
        self.seconds = 0.002  # smoothed time a job takes
        # seconds between two jobs' ends while jobs queue: the workers, at a low CPU priority, may
        # drain the queue slower than their jobs' own times say
        self.interval = 0.0
        self._last_end: float | None = None  # the previous job's end, when jobs were queued then
        self._lock = threading.Lock()
        self._occupied, self._occupied_from = 0.0, 0.0  # see occupied_seconds
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [threading.Thread(target=self._work, args=(nice,), name=f"corella-cpu-{i}", daemon=True)
                         for i in range(workers)]  # fmt: skip
        for thread in self._threads:
            thread.start()

    def _work(self, nice: int) -> None:
        lower_thread_priority(nice)
        while True:
            _, _, job, loop, future = self._queue.get()
            if job is None:
                return
            try:
                result, error = job(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
                result, error = None, exc
            loop.call_soon_threadsafe(_settle, future, result, error)

    def _account(self, seconds: float) -> None:
        now = time.perf_counter()
        self.seconds = 0.9 * self.seconds + 0.1 * seconds
        with self._lock:
            if self._last_end is not None:
                self.interval = 0.8 * self.interval + 0.2 * (now - self._last_end)
            queued = sum(self.waiting) > self.workers
            self._last_end = now if queued else None
            if not queued:
                self.interval = 0.0

    async def run(self, function: Any, *args: Any, deadline: float | None = None, urgent: bool = False,
                  weight: int = 0) -> Any:  # fmt: skip
        """`function(*args)` on a worker; OverloadedError when the job waited past `deadline` (an
        answer after its deadline helps nobody; a 429 tells the client to come back). `weight`:
        the urgent job's candidates, counted in `urgent_candidates` until it starts."""
        lane = 0 if urgent else 1
        queued = time.perf_counter()
        if not sum(self.waiting):
            self._occupied_from = queued
        self.waiting[lane] += 1
        with self._lock:  # the workers take it back: two threads change it
            self.urgent_candidates += weight

        def job() -> Any:
            began = time.perf_counter()
            with self._lock:
                self.urgent_candidates -= weight
            if deadline is not None and began > deadline and began - queued > _LATE_QUEUE_S:
                raise OverloadedError(f"the server is saturated: the request waited {began - queued:.1f} s for a "
                                      "CPU worker, past its deadline", self.expected_wait())  # fmt: skip
            try:
                return function(*args)
            finally:
                self._account(time.perf_counter() - began)

        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((lane, next(self._order), job, loop, future))
        try:
            return await future
        finally:
            self.waiting[lane] -= 1
            if not sum(self.waiting):
                self._occupied += time.perf_counter() - self._occupied_from

    def occupied_seconds(self) -> float:
        """Seconds so far during which some request was running on or waiting for a worker: the
        request side's demand for CPU, which a starved process does not lose (its CPU use does)."""
        ongoing = time.perf_counter() - self._occupied_from if sum(self.waiting) else 0.0
        return self._occupied + ongoing

    def expected_wait(self, urgent: bool = False) -> float:
        ahead = self.waiting[0] if urgent else sum(self.waiting)
        return ahead * max(self.seconds / self.workers, self.interval)

    def refuse_if_late(self, deadline: float | None, urgent: bool = False) -> None:
        """OverloadedError when the queue ahead alone outlasts the deadline (the request would wait for nothing)."""
        wait = self.expected_wait(urgent)
        if deadline is not None and wait > _LATE_QUEUE_S and time.perf_counter() + wait > deadline:
            raise OverloadedError(f"the server is saturated ({sum(self.waiting)} requests waiting for a CPU "
                                  f"worker); retry in {wait:.1f} s", wait)  # fmt: skip

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put((2, next(self._order), None, None, None))
        for thread in self._threads:
            thread.join(timeout=30)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's niceness to `nice` (Linux: per thread; threads it starts inherit it)."""
    if not nice or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def _scheduler_summary(scheduler: Any) -> dict[str, Any] | None:
    """The scheduler's settings and state; a scheduler that cannot say (its process is down) says why."""
    if scheduler is None:
        return None
    try:
        state = scheduler.stats()
    except LLMError as exc:
        state = {"error": str(exc)}
    return scheduler.settings.__dict__ | state


def _model_summary(engine: Engine, settings: ServerSettings) -> dict[str, Any]:
    manifest = engine.bundle.manifest
    llm = manifest.get("llm") or {}
    scheduler = engine.scheduler
    return {
        "corella_version": __version__,
        "bundle": str(engine.bundle.path),
        "format_version": manifest["format_version"],
        "created_at": manifest.get("created_at"),
        "crm": {"file": manifest["crm"]["file"], "providers": engine.crm.providers, "warmup": engine.crm.warmup,
                "parity": manifest["crm"].get("parity"), "tensorrt": manifest["crm"].get("tensorrt")},
        "llm": {"file": llm.get("file"), "quant": llm.get("quant"), "status": engine.llm_status,
                "loaded": engine.llm_status == "serving", "decoded": not engine.llm_silent,
                "expected_gain": manifest["router"].get("expected_gain"),
                "gpu_layers": scheduler.gpu_layers if scheduler else None, "load_error": engine.llm_failure,
                "scheduler": _scheduler_summary(scheduler),
                "answer_memo": {"capacity": settings.llm_answer_memo,
                                "answers": len(engine.memo) if engine.memo is not None else 0},
                "vocabulary": engine.vocabulary()}
        if llm else None,
        "router": manifest["router"],
        "metrics": manifest.get("metrics"),
        "store": engine.store.counts(),
        "limits": {"max_candidates": settings.max_candidates, "max_body_bytes": settings.max_body_bytes,
                   "default_deadline_ms": settings.default_deadline_ms},
    }  # fmt: skip


def _ops_router() -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"description": "not ready yet: the models are loading"}})
    async def readyz(request: Request) -> JSONResponse:
        """200 once the models are loaded. An LLM that failed to load leaves the server ready with
        "degraded": true: the CRM answers, routed candidates fall back (reason llm_unavailable)."""
        engine = getattr(request.app.state, "engine", None)
        ready = bool(getattr(request.app.state, "loaded", False) and engine is not None and engine.ready)
        content: dict[str, Any] = {"ready": ready}
        if engine is not None:
            content |= {"llm": engine.llm_status, "degraded": engine.llm_status == "unavailable"}
            if engine.llm_failure:
                content["llm_error"] = engine.llm_failure
        return JSONResponse(status_code=200 if ready else 503, content=content)

    @router.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    async def prometheus(request: Request) -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


# ---------------------------------------------------------------------------- the app
def create_app(settings: ServerSettings, bundle: Bundle | None = None) -> FastAPI:
    """The app serving `settings.bundle`; `bundle`: that bundle already loaded and verified (by
    `corella serve`, which checks it before uvicorn starts), so its files are not hashed again."""
    metrics = ServingMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        app.state.loaded = False
        loaded = bundle if bundle is not None else await run_in_threadpool(load_bundle, settings.bundle)
        app.state.engine = engine = await run_in_threadpool(Engine, loaded, settings.engine_settings(), metrics)
        # the CPU workers yield the cores to llama.cpp's threads; the event loop, whose work is short
        # (health, answers, reading requests), keeps the default priority so that it stays prompt
        app.state.cpu = _CpuWorkers(settings.cpu_workers, settings.http_nice)
        app.state.load = _LoadReporter(app.state.cpu, engine.report_host_load)
        # what loading made lives as long as the server: out of the collector's full passes, which
        # otherwise walk its ~200k objects under load about once a second for ~100 ms each, the
        # whole process (event loop and workers) waiting (measured at 256 clients on 2 cores)
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        app.state.loaded = True
        log.info("serving %s (CRM on %s; LLM %s)", settings.bundle, engine.crm.providers[0], engine.llm_status)
        try:
            yield
        finally:
            app.state.loaded = False
            app.state.load.close()
            app.state.cpu.close()
            await run_in_threadpool(engine.close)

    app = FastAPI(
        title="corella",
        version=__version__,
        description="CTR predictions: a DCNv2 CRM for every candidate, an LLM for the uncertain few.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics = settings, metrics
    app.add_middleware(_Gate, settings=settings, metrics=metrics)
    _add_error_handlers(app)
    app.include_router(_api_router(settings))
    app.include_router(_ops_router())
    return app
