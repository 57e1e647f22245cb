"""The HTTP app (FastAPI + uvicorn): POST /v1/predict, POST /v1/events, POST /v1/items, GET /v1/model,
POST /v1/admin/reload, /healthz, /readyz, /metrics.

`create_app(settings)` builds an app; the bundle and models load in the lifespan and live on
`app.state`. Nothing happens at import time. A user's mistake is a 4xx with a JSON error envelope,
never a 5xx.

Predictions never hold a thread while the LLM works: the handler runs the CRM half of a request
on a few CPU workers, then awaits the LLM scheduler's answer on the event loop. Health, readiness
and metrics are plain coroutines, so they answer however many predictions are waiting. The CPU
workers run at a lower CPU priority than llama.cpp's threads (`http_nice`), so that a flood of
cheap requests cannot take the cores the LLM decodes on. A new bundle is taken without downtime
(SIGHUP or /v1/admin/reload: runtime.serving.reload); each answer names the bundle that made it.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import math
import signal
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime import __version__
from runtime.artifacts.bundle import Bundle, load_bundle
from runtime.artifacts.store import Interaction
from runtime.engine import Engine
from runtime.errors import (
    ConfigError,
    CorellaError,
    OverloadedError,
    RequestTooLarge,
    StoreFull,
    StoreUnavailable,
)
from runtime.llm import LLMError
from runtime.metrics import ServingMetrics
from runtime.serving.reload import EngineSlot, ReloadBusy, Reloader, ReloadFailed
from runtime.serving.schemas import (
    USER_HEADER,
    EventsBody,
    ItemsBody,
    PredictBody,
    ReloadBody,
    to_catalog_entries,
    to_engine_request,
)
from runtime.serving.workers import CpuWorkers, LoadReporter
from runtime.settings import ServerSettings

__all__ = ["create_app", "uvicorn_config"]

log = logging.getLogger(__name__)


def uvicorn_config(app: FastAPI, settings: ServerSettings, log_level: str = "info") -> Any:
    """uvicorn's own limits: a bounded number of connections, a deep accept backlog; its access log
    only when asked for."""
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                          limit_concurrency=settings.limit_concurrency, backlog=2048,
                          timeout_keep_alive=30, access_log=settings.access_log)  # fmt: skip


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
                 503: "models still loading", 507: "the live store is at its bound",
                 403: "no admin key is set", 409: "the bundle did not load: the old one serves on",
                 }  # fmt: skip
    return {status: {"model": ErrorBody, "description": described[status]} for status in statuses}


_HTTP_KINDS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 503: "not_ready"}  # fmt: skip
#: corella's error types and the answer each gets; the first match in this order wins
_ERROR_ANSWERS: tuple[tuple[type[CorellaError], int, str], ...] = (
    (RequestTooLarge, 413, "payload_too_large"),
    (ReloadBusy, 429, "reload_in_progress"),
    (ReloadFailed, 409, "reload_failed"),
    (StoreFull, 507, "store_full"),
    (StoreUnavailable, 503, "store_unavailable"),
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
        if isinstance(exc, (OverloadedError, StoreUnavailable, ReloadBusy)):
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
        """Score one user's candidates; each answer carries its score, route and CRM entropy. The user
        may be named by the `X-Corella-User` header instead of the body (the header a load balancer
        hashes on; where both name one, they must agree: 400 otherwise). Routed
        candidates the LLM cannot answer in time are answered by the CRM (`crm_fallback` with a
        `fallback_reason`); a mode "llm" request the LLM cannot take at all is a 429 with Retry-After."""
        _engine(request)
        with request.app.state.slot.using() as engine:  # a reload closes this engine only after the answer
            arrived = request.scope["state"]["arrived"]
            engine_request = to_engine_request(body, request.headers.get(USER_HEADER))
            cpu: CpuWorkers = request.app.state.cpu
            deadline = engine.deadline(engine_request, arrived)
            # a 429 at once, before any CPU work, when the CRM or the LLM cannot answer in time; a mode
            # llm request goes first, so that the LLM's state it was admitted on is still the state
            urgent = engine_request.mode == "llm"
            cpu.refuse_if_late(deadline, urgent)
            # the mode llm requests ahead in the queue will take the LLM's room first
            engine.refuse_if_saturated(engine_request, arrived, cpu.expected_wait(urgent),
                                       ahead=cpu.urgent_candidates)  # fmt: skip
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
        _engine(request)
        now = int(time.time())
        events = [Interaction(e.user_id, e.item_id, e.rating, e.timestamp if e.timestamp is not None else now,
                              event_id=e.event_id) for e in body.events]  # fmt: skip
        async with request.app.state.slot.writing() as engine:
            appended = await request.app.state.cpu.run(engine.append_events, events)
        return {"appended": appended, "duplicates": len(events) - appended}

    @router.post("/items", dependencies=write, responses=_documented(400, 401, 413, 422, 503))
    async def items(body: ItemsBody, request: Request) -> dict[str, Any]:
        """Add items to the catalog, or update them: predictable at once (the CRM reads their
        attributes, the LLM their title and text). Kept in the live store, like events."""
        _engine(request)
        async with request.app.state.slot.writing() as engine:
            return await request.app.state.cpu.run(engine.add_items, to_catalog_entries(body))

    @router.get("/model", dependencies=read, responses=_documented(401, 503))
    def model(request: Request) -> dict[str, Any]:
        """What is being served: versions, files, router, parity and export-time metrics."""
        return _model_summary(_engine(request), settings)

    admin = _key_check(settings.admin_api_key) if settings.admin_api_key is not None else [Depends(_no_admin_key)]

    @router.post("/admin/reload", dependencies=admin, responses=_documented(400, 401, 403, 409, 422, 429, 503))
    async def reload(request: Request, body: ReloadBody | None = None) -> dict[str, Any]:
        """Serve another bundle (`bundle`: its folder; default: the folder served now, read again)
        without downtime: it loads and warms beside the one serving, the switch is atomic, and the
        old one is freed once its requests are answered. A bundle that fails to load leaves the old
        one serving (409 reload_failed); a reload while another runs is a 429. Needs the admin key."""
        _engine(request)
        return await request.app.state.reloader.reload(Path(body.bundle) if body and body.bundle else None)

    return router


async def _no_admin_key() -> None:
    raise HTTPException(403, "reloading over HTTP needs an admin key (--admin-api-key-file or "
                             "CORELLA_ADMIN_API_KEY); SIGHUP reloads the served folder without one")  # fmt: skip


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
        "bundle_id": engine.bundle.id,
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
def _on_hangup(reloader: Reloader) -> bool:
    """SIGHUP reloads the bundle folder served last (where this loop owns the signals: the main thread)."""
    loop = asyncio.get_running_loop()

    async def reload() -> None:
        try:
            outcome = await reloader.reload()
            log.info("SIGHUP: %s", outcome)
        except CorellaError as exc:  # counted and logged by the reloader
            log.error("SIGHUP: %s", exc)

    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):  # not the main thread, or no SIGHUP
        return False
    return True


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
        app.state.slot = slot = EngineSlot(app.state)
        app.state.reloader = reloader = Reloader(slot, settings, metrics)
        app.state.cpu = CpuWorkers(settings.cpu_workers, settings.http_nice)
        app.state.load = LoadReporter(app.state.cpu, lambda load: slot.engine.report_host_load(load))
        # what loading made lives as long as the server: out of the collector's full passes, which
        # otherwise walk its ~200k objects under load about once a second for ~100 ms each, the
        # whole process (event loop and workers) waiting (measured at 256 clients on 2 cores)
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        app.state.loaded = True
        log.info("serving %s (bundle %s; CRM on %s; LLM %s)", settings.bundle, loaded.id, engine.crm.providers[0],
                 engine.llm_status)  # fmt: skip
        hangup = _on_hangup(reloader)
        try:
            yield
        finally:
            app.state.loaded = False
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            app.state.load.close()
            app.state.cpu.close()
            await reloader.close()
            await run_in_threadpool(slot.engine.close)

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
