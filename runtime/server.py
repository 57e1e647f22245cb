"""HTTP API (FastAPI + uvicorn): POST /v1/predict, POST /v1/events, GET /v1/model, /healthz, /readyz, /metrics.

`create_app(settings)` builds an app; the bundle and models load in the lifespan and live on
`app.state`. Nothing happens at import time. A user's mistake is a 4xx with a JSON error envelope,
never a 5xx.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from runtime import __version__
from runtime.bundle import load_bundle
from runtime.engine import CandidateItem, Engine, EngineSettings, HistoryItem
from runtime.engine import Request as EngineRequest
from runtime.errors import ConfigError, CorellaError
from runtime.store import Interaction

__all__ = ["ServerSettings", "create_app", "PredictBody", "EventsBody", "to_engine_request"]

log = logging.getLogger(__name__)


class ServerSettings(BaseSettings):
    """Every field can be set from the environment with the CORELLA_ prefix (CORELLA_PORT=9000)."""

    model_config = SettingsConfigDict(env_prefix="CORELLA_", extra="forbid")

    bundle: Path = Field(description="bundle directory to serve")
    host: str = Field("127.0.0.1", description="address to bind; loopback unless told otherwise")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    api_key: str | None = Field(None, description="when set, /v1/* needs 'Authorization: Bearer KEY'")
    max_candidates: int = Field(500, ge=1, le=100_000, description="candidates per request; more is a 413")
    max_body_bytes: int = Field(2_000_000, ge=1024, description="request body limit; more is a 413")
    default_deadline_ms: float | None = Field(2000.0, gt=0, description="deadline of a request that sets none")
    providers: str = Field("auto", description="ONNX Runtime providers: auto or a comma list of tensorrt,cuda,cpu")
    crm_threads: int | None = Field(None, ge=1, le=256, description="ONNX Runtime intra-op threads")
    llm_threads: int | None = Field(None, ge=1, le=256, description="llama.cpp threads")
    llm_context: int = Field(4096, ge=64, le=131072, description="llama.cpp context size in tokens")
    llm_gpu_layers: int | None = Field(None, ge=0, description="layers on the GPU (default: all where possible)")
    load_llm: bool = Field(True, description="load the LLM (False: CRM-only serving)")
    store: Path | None = Field(None, description="live feature store (default: <bundle>/state/store.sqlite)")

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(
            providers=tuple(p.strip() for p in self.providers.split(",") if p.strip()),
            crm_threads=self.crm_threads,
            llm_threads=self.llm_threads,
            llm_context=self.llm_context,
            llm_gpu_layers=self.llm_gpu_layers,
            default_deadline_ms=self.default_deadline_ms,
            max_candidates=self.max_candidates,
            load_llm=self.load_llm,
            store_path=self.store,
        )


# ---------------------------------------------------------------------------- request bodies
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HistoryBody(_Strict):
    item_id: str = Field(min_length=1, max_length=256)
    rating: float = Field(ge=0, le=100)
    timestamp: int | None = None
    title: str | None = Field(None, max_length=512)


class CandidateBody(_Strict):
    item_id: str = Field(min_length=1, max_length=256)
    title: str | None = Field(None, max_length=512, description="overrides the catalog; new items need one for the LLM")
    year: str | None = Field(None, max_length=16)
    tags: list[str] | None = Field(None, max_length=64)


class PredictBody(_Strict):
    user_id: str | None = Field(None, max_length=256, description="known users get profile and history from the store")
    user_attributes: dict[str, str | int | float] | None = Field(None, description="age, gender, occupation, zip")
    history: list[HistoryBody] | None = Field(None, max_length=1000, description="oldest first; overrides the store")
    candidates: list[CandidateBody] = Field(min_length=1, description="items to score")
    mode: Literal["hybrid", "crm", "llm"] = "hybrid"
    llm_fraction: float | None = Field(None, ge=0, le=1, description="route this share of the candidates to the LLM")
    deadline_ms: float | None = Field(None, gt=0, le=600_000, description="answer by then; late LLM work falls back")


class EventBody(_Strict):
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    rating: float = Field(ge=0, le=100)
    timestamp: int | None = Field(None, description="unix seconds; default now")


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


# ---------------------------------------------------------------------------- metrics
class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "corella_requests_total", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.candidates = Counter("corella_candidates_total", "Candidates answered, by route", ["route"],
                                  registry=self.registry)  # fmt: skip
        self.fallbacks = Counter("corella_llm_fallbacks_total", "Routed candidates answered by the CRM",
                                 ["reason"], registry=self.registry)  # fmt: skip
        self.llm_errors = Counter("corella_llm_errors_total", "Requests whose LLM part failed", registry=self.registry)
        self.latency = Histogram(
            "corella_latency_seconds", "Time per request in each path", ["path"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.events = Counter("corella_events_total", "Interactions appended", registry=self.registry)

    def observe(self, answer: dict[str, Any]) -> None:
        for prediction in answer["predictions"]:
            self.candidates.labels(prediction["route"]).inc()
        fallbacks = sum(p["route"] == "crm_fallback" for p in answer["predictions"])
        if fallbacks:
            reason = "deadline" if answer["llm_error"] == "deadline exceeded" else "error"
            self.fallbacks.labels(reason).inc(fallbacks)
            if reason == "error":
                self.llm_errors.inc()
        for path in ("crm", "llm", "total"):
            self.latency.labels(path).observe(answer["timings_ms"][path] / 1000.0)


def _error(status: int, kind: str, message: str, details: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"type": kind, "message": message}}
    if details is not None:
        body["error"]["details"] = details
    return JSONResponse(status_code=status, content=body)


# ---------------------------------------------------------------------------- the app
def create_app(settings: ServerSettings) -> FastAPI:
    metrics = _Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        app.state.loaded = False
        bundle = await run_in_threadpool(load_bundle, settings.bundle)
        app.state.bundle = bundle
        app.state.engine = await run_in_threadpool(Engine, bundle, settings.engine_settings())
        app.state.loaded = True
        log.info("serving %s (CRM on %s; LLM %s)", settings.bundle, app.state.engine.crm.providers[0],
                 "loaded" if app.state.engine.llm else "not loaded")  # fmt: skip
        try:
            yield
        finally:
            app.state.loaded = False
            await run_in_threadpool(app.state.engine.close)

    app = FastAPI(
        title="corella",
        version=__version__,
        description="CTR predictions: a DCNv2 CRM for every candidate, an LLM for the uncertain few.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics

    @app.middleware("http")
    async def limits_and_counts(request: Request, call_next):  # noqa: ANN001, ANN202
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            response = _error(413, "payload_too_large", f"request body of {length} bytes exceeds "
                              f"{settings.max_body_bytes}")  # fmt: skip
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"]} for e in exc.errors()
        ]
        fields = ", ".join(d["field"] or "body" for d in details[:5])
        return _error(422, "validation_error", f"invalid request: {fields}", details)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kinds = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                 503: "not_ready"}  # fmt: skip
        response = _error(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(ConfigError)
    async def config_error(request: Request, exc: ConfigError) -> JSONResponse:
        return _error(400, "bad_request", str(exc))

    @app.exception_handler(CorellaError)
    async def corella_error(request: Request, exc: CorellaError) -> JSONResponse:
        log.exception("request failed")
        return _error(500, "internal_error", str(exc))

    def require_key(authorization: Annotated[str | None, Header()] = None) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    def get_engine(request: Request) -> Engine:
        # serving starts once loading has finished; an LLM that failed to load means CRM fallbacks
        if not getattr(request.app.state, "loaded", False):
            raise HTTPException(503, "models are still loading")
        return request.app.state.engine

    @app.post("/v1/predict", dependencies=[Depends(require_key)])
    def predict(body: PredictBody, engine: Engine = Depends(get_engine)) -> dict[str, Any]:
        """Score one user's candidates; each answer carries its score, route and CRM entropy."""
        if len(body.candidates) > settings.max_candidates:
            raise HTTPException(413, f"{len(body.candidates)} candidates exceed the limit of {settings.max_candidates}")
        answer = engine.predict(to_engine_request(body))
        metrics.observe(answer)
        return answer

    @app.post("/v1/events", dependencies=[Depends(require_key)])
    def events(body: EventsBody, engine: Engine = Depends(get_engine)) -> dict[str, Any]:
        """Append interactions; the next prediction for those users reads them."""
        now = int(time.time())
        count = engine.append_events(
            [
                Interaction(e.user_id, e.item_id, e.rating, e.timestamp if e.timestamp is not None else now)
                for e in body.events
            ]  # fmt: skip
        )
        metrics.events.inc(count)
        return {"appended": count}

    @app.get("/v1/model", dependencies=[Depends(require_key)])
    def model(engine: Engine = Depends(get_engine)) -> dict[str, Any]:
        """What is being served: versions, files, router, parity and export-time metrics."""
        manifest = engine.bundle.manifest
        llm = manifest.get("llm") or {}
        return {
            "corella_version": __version__,
            "bundle": str(engine.bundle.path),
            "format_version": manifest["format_version"],
            "created_at": manifest.get("created_at"),
            "crm": {"file": manifest["crm"]["file"], "providers": engine.crm.providers,
                    "parity": manifest["crm"].get("parity"), "tensorrt": manifest["crm"].get("tensorrt")},
            "llm": {"file": llm.get("file"), "quant": llm.get("quant"), "loaded": engine.llm is not None,
                    "gpu_layers": engine.llm.gpu_layers if engine.llm else None,
                    "load_error": engine.llm_load_error} if llm else None,
            "router": manifest["router"],
            "metrics": manifest.get("metrics"),
            "store": engine.store.counts(),
            "limits": {"max_candidates": settings.max_candidates, "max_body_bytes": settings.max_body_bytes,
                       "default_deadline_ms": settings.default_deadline_ms},
        }  # fmt: skip

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        """200 once the CRM and (where the bundle has one) the LLM are loaded."""
        engine = getattr(request.app.state, "engine", None)
        loaded = getattr(request.app.state, "loaded", False)
        ready = bool(loaded and engine is not None and engine.ready)
        content: dict[str, Any] = {"ready": ready}
        if engine is not None and engine.llm_load_error:
            content["llm_error"] = engine.llm_load_error
        return JSONResponse(status_code=200 if ready else 503, content=content)

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
