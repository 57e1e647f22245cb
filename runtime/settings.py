"""Every serving setting, declared once.

`EngineSettings` holds what the engine and its LLM scheduler read; `ServerSettings` adds the HTTP
server's own and reads `CORELLA_<NAME>` environment variables. The `corella serve` options, the
variables, their defaults, limits and help all come from these fields (`serve_options` turns them
into typer options), so a setting is written here and nowhere else. The scheduler's resolved
settings (`runtime.scheduling.SchedulerSettings`) take their defaults from these fields too.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["EngineSettings", "ServerSettings", "ENV_PREFIX", "engine_default", "serve_options"]

ENV_PREFIX = "CORELLA_"


def _comma_list(value: Any) -> Any:
    return tuple(p.strip() for p in value.split(",") if p.strip()) if isinstance(value, str) else value


class EngineSettings(BaseModel):
    """What the engine (CRM, router, LLM scheduler, live store) is told."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    providers: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)] = Field(
        ("auto",), description="ONNX Runtime providers: auto or a comma list of tensorrt,cuda,cpu"
    )
    crm_threads: int | None = Field(None, ge=1, le=256, description="ONNX Runtime intra-op threads (default 1)")
    llm_threads: int | None = Field(None, ge=1, le=256, description="llama.cpp threads per context "
                                    "(default: the cores split between the contexts)")  # fmt: skip
    llm_threads_when_busy: int | None = Field(None, ge=1, le=256, description="llama.cpp threads per context "
                                              "while the server is busy (default on a CPU: one "
                                              "fewer than llm_threads, leaving a core to the requests)")  # fmt: skip
    llm_contexts: int | None = Field(None, ge=1, le=64, description="llama.cpp contexts, each with its own "
                                     "decode loop and KV cache (default 1)")  # fmt: skip
    llm_context: int = Field(4096, ge=64, le=131072, description="longest prompt (prefix + one candidate) in tokens")
    llm_gpu_layers: int | None = Field(None, ge=0, description="layers on the GPU (default: all where possible)")
    llm_batch_tokens: int | None = Field(None, ge=32, le=65536, description="tokens per llama_decode "
                                         "(default 512 on a CPU, 2048 on a GPU)")  # fmt: skip
    llm_max_sequences: int = Field(64, ge=1, le=254, description="candidates decoded together")
    llm_prefix_cache_tokens: int = Field(8192, ge=256, le=1_048_576, description="KV cells kept for users' "
                                         "prefixes (instruction + history), per context")  # fmt: skip
    llm_prefix_host_mib: int = Field(512, ge=0, le=1_048_576, description="host memory (MiB) for the KV cells of "
                                     "prefixes no request is using, per context: they leave the KV cache, "
                                     "which then decodes faster, and come back by a copy (0: they stay)")  # fmt: skip
    llm_queue_candidates: int = Field(512, ge=1, le=1_000_000, description="routed candidates that may wait "
                                      "for the LLM; beyond, they are answered by the CRM at once "
                                      "(mode llm: 429)")  # fmt: skip
    llm_answer_memo: int = Field(100_000, ge=0, le=100_000_000, description="LLM answers remembered by their "
                                 "prompts' tokens (~350 bytes each): a candidate asked for again before its "
                                 "user's history changes is answered without the LLM (0: none)")  # fmt: skip
    llm_vocab: int = Field(16_384, ge=0, le=10_000_000, description="decode with the vocabulary cut to the "
                           "catalog's prompt tokens and this many of the most common others: an answer's "
                           "projection onto all of Gemma 3's 262,144 tokens is a seventh of what a candidate "
                           "costs a CPU; the cut copy of the GGUF is written once, to corella's model cache "
                           "(0: the whole vocabulary)")  # fmt: skip
    llm_widen: bool = Field(True, description="on the CPU, decode a copy of the GGUF whose Q5_0 weights are "
                            "Q8_0 blocks of the same numbers (most of a q4_k_m Gemma 3 270M: ~10% more tokens a "
                            "second on x86, the same answers); written once, to corella's model cache with the "
                            "cut's")  # fmt: skip
    llm_process: bool = Field(True, description="decode in a process of its own, which shares no GIL with the "
                              "HTTP server and is started again when it dies")  # fmt: skip
    llm_restarts: int = Field(3, ge=0, le=1000, description="times the LLM process is started again within "
                              "llm_restart_window_s; past it the LLM stays down until the window moves on")  # fmt: skip
    llm_restart_window_s: float = Field(300.0, gt=0, description="the window (seconds) llm_restarts is counted over")
    llm_decode_without_signal: bool = Field(False, description="decode routed candidates even where the bundle's "
                                            "LLM calibration has slope 0 (its answer then one constant: "
                                            "for measuring the LLM's cost; otherwise the CRM answers them, "
                                            "reason llm_no_signal)")  # fmt: skip
    load_llm: bool = Field(True, description="load the LLM (--no-llm: CRM-only serving)")
    default_deadline_ms: float | None = Field(2000.0, gt=0, description="deadline of a request that sets none, "
                                              "counted from its arrival")  # fmt: skip
    max_candidates: int = Field(500, ge=1, le=100_000, description="candidates per request; more is a 413")
    max_store_interactions: int | None = Field(50_000_000, ge=1, description="bound of the live store: a "
                                               "/v1/events batch that would pass it is refused whole with 507, "
                                               "nothing is dropped")  # fmt: skip
    state: Path | None = Field(None, description="state folder: the live feature store and engine caches "
                               "(default: $CORELLA_HOME/state/<bundle id>; never inside the bundle)")  # fmt: skip
    store: Path | None = Field(None, description="live feature store (default: <state>/store.sqlite); a "
                               "postgresql:// URL is taken as --store-url")  # fmt: skip
    store_url: str | None = Field(None, description="a PostgreSQL live store shared by replicas, "
                                  "postgresql://USER@HOST:PORT/DB (a password is better in PGPASSWORD or ~/.pgpass "
                                  "than on a command line); seeded from the bundle by the first replica")  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _postgres_store(cls, data: Any) -> Any:
        """`--store postgresql://...` (or CORELLA_STORE) names the shared store, as --store-url does
        (a path option has folded the URL's '//' into '/' by then: it is put back)."""
        if isinstance(data, dict) and data.get("store") is not None:
            text = str(data["store"])
            match = re.match(r"^(postgres(?:ql)?):/+(.*)$", text)
            if match:
                data = {k: v for k, v in data.items() if k != "store"}
                data["store_url"] = f"{match.group(1)}://{match.group(2)}"
        return data


class ServerSettings(EngineSettings, BaseSettings):
    """The engine's settings and the HTTP server's; every field can be set from the environment
    with the CORELLA_ prefix (CORELLA_PORT=9000)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=False)

    bundle: Path = Field(description="bundle directory to serve")
    host: str = Field("127.0.0.1", description="address to bind; loopback unless told otherwise")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    api_key: SecretStr | None = Field(
        None,
        description="when set, /v1/* needs 'Authorization: Bearer KEY' "
        "(prefer CORELLA_API_KEY or --api-key-file: a command line shows in ps)",
    )
    api_key_file: Path | None = Field(None, description="file holding the API key (read once, whitespace stripped)")
    events_api_key: SecretStr | None = Field(
        None, description="when set, POST /v1/events needs this key instead (a write key apart from the read key)"
    )
    events_api_key_file: Path | None = Field(None, description="file holding the events (write) key")
    admin_api_key: SecretStr | None = Field(
        None, description="when set, POST /v1/admin/reload takes a new bundle with 'Authorization: Bearer KEY' "
        "(without it, only SIGHUP reloads)",
    )  # fmt: skip
    admin_api_key_file: Path | None = Field(None, description="file holding the admin key")
    max_body_bytes: int = Field(2_000_000, ge=1024, description="request body limit; more is a 413")
    limit_concurrency: int = Field(2048, ge=1, description="open connections uvicorn serves before answering 503")
    cpu_workers: int = Field(2, ge=1, le=64, description="threads that encode and score requests with the CRM")
    # 5, not 10: on 2 cores under overload, 10 held CRM-only answers at a p50 of 47-54 ms at 64
    # clients and 5 at 40-42 ms, for 5-15% fewer LLM answers (still 2x and more the unloaded rate)
    http_nice: int = Field(5, ge=0, le=19, description="niceness of the CPU workers (0: as llama.cpp's threads): "
                           "a flood of requests then cannot take all the cores the LLM decodes on; higher "
                           "favours LLM answers under overload, lower the CRM-only answers' latency")  # fmt: skip
    access_log: bool = Field(False, description="log a line per request (uvicorn's access log; off by default: "
                             "a busy server spent ~6% of its CPU on it, and /metrics counts requests)")  # fmt: skip

    @model_validator(mode="after")
    def _read_key_files(self) -> ServerSettings:
        for name in ("api_key", "events_api_key", "admin_api_key"):
            path = getattr(self, f"{name}_file")
            if path is None:
                continue
            try:
                key = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"{name}_file {path}: {exc.strerror}") from exc
            if not key:
                raise ValueError(f"{name}_file {path} is empty")
            setattr(self, name, SecretStr(key))
        return self

    @classmethod
    def from_options(cls, bundle: Path, **options: Any) -> ServerSettings:
        """Settings from command-line options: an option left as None falls back to its CORELLA_
        variable, then to the default (passing every option explicitly would hide the variables)."""
        return cls(bundle=bundle, **{k: v for k, v in options.items() if v is not None})

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(**self.model_dump(include=set(EngineSettings.model_fields)))


def engine_default(name: str) -> Any:
    """The default of one engine setting (for the settings resolved from these, which keep it)."""
    return EngineSettings.model_fields[name].default


#: options spelled otherwise than their field
_OPTION_NAMES = {"default_deadline_ms": ("--deadline-ms",), "load_llm": ("--llm/--no-llm",)}


def _option_type(annotation: Any) -> Any:
    """The type typer parses an option as: the field's own, an unset option is None; secrets and
    comma lists are read as text."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) else [annotation]
    base = args[0] if args else str
    if base is SecretStr or get_origin(base) is tuple:
        base = str
    return base | None


def serve_options(settings: type[BaseModel] = ServerSettings,
                  skip: frozenset[str] = frozenset({"bundle"})) -> Callable[[Callable], Callable]:  # fmt: skip
    """Give a typer command one option per settings field (after its own parameters): the field's
    type, its description and its CORELLA_ variable as help, and None as the default, so that an
    option not given falls back to the variable, then the field's default."""
    import typer

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        params = list(own)
        for name, field in settings.model_fields.items():
            if name in skip:
                continue
            kind = _option_type(field.annotation)
            default = ",".join(field.default) if isinstance(field.default, tuple) else field.default
            shown = f"default: {default}; " if default is not None else ""
            text = f"{field.description} ({shown}env {ENV_PREFIX}{name.upper()})"
            flag = (f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}",) if kind == bool | None else ()
            option = typer.Option(*_OPTION_NAMES.get(name, flag), help=text, show_default=False)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[kind, option]))  # fmt: skip
        function.__signature__ = signature.replace(parameters=params)
        function.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        return function

    return decorate
