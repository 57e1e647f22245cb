"""One settings tree: every serving setting is a `corella serve` option and a CORELLA_ variable."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
import typer.main
from typer.testing import CliRunner

from corella_cli.main import app
from runtime.scheduling import SchedulerSettings
from runtime.settings import EngineSettings, ServerSettings, _option_type


def _serve_options() -> dict[str, list[str]]:
    command = typer.main.get_command(app).commands["serve"]
    return {p.name: p.opts + p.secondary_opts for p in command.params}


def test_every_setting_is_a_serve_option_and_a_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    options = _serve_options()
    fields = set(ServerSettings.model_fields) - {"bundle"}
    assert fields <= set(options), f"settings without a serve option: {sorted(fields - set(options))}"
    assert set(options) - {"bundle"} <= fields, "a serve option that is no setting"
    # the engine's settings are the server's (declared once, inherited)
    assert set(EngineSettings.model_fields) < set(ServerSettings.model_fields)
    for name, field in ServerSettings.model_fields.items():
        if name in {"bundle", "api_key_file", "events_api_key_file", "admin_api_key_file", "providers"}:
            continue
        kind = get_args(_option_type(field.annotation))[0]  # the option's type, None aside
        sample = _sample(kind, field, tmp_path)
        monkeypatch.setenv(f"CORELLA_{name.upper()}", str(sample))
        value = getattr(ServerSettings(bundle=tmp_path), name)
        value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        assert value == sample and value != field.default, name
        monkeypatch.delenv(f"CORELLA_{name.upper()}")
    monkeypatch.setenv("CORELLA_PROVIDERS", "cuda, cpu")
    assert ServerSettings(bundle=tmp_path).providers == ("cuda", "cpu")


def _sample(kind: type, field: Any, tmp_path: Path) -> Any:
    """A valid value of the field unlike its default."""
    if kind is bool:
        return not field.default
    if kind is Path:
        return tmp_path
    if kind is str:
        return "sample"
    bounds = [getattr(m, b) for m in field.metadata for b in ("ge", "gt") if getattr(m, b, None) is not None]
    low = bounds[0] if bounds else 1
    value = kind(low) + 1
    return value if value != field.default else value + 1


def test_defaults_are_declared_once() -> None:
    engine, scheduler = EngineSettings(), SchedulerSettings()
    assert scheduler.max_sequences == engine.llm_max_sequences
    assert scheduler.prefix_cache_tokens == engine.llm_prefix_cache_tokens
    assert scheduler.queue_candidates == engine.llm_queue_candidates
    assert scheduler.max_prompt_tokens == engine.llm_context
    resolved = SchedulerSettings.resolve(EngineSettings(llm_queue_candidates=9, llm_threads=2), gpu=False)
    assert (resolved.queue_candidates, resolved.threads, resolved.threads_when_busy, resolved.batch_tokens) == (
        9,
        2,
        1,
        512,
    )


def test_serve_refuses_a_bad_option_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--llm-threads", "0"])
    assert result.exit_code != 0
    said = " ".join(result.output.split())  # rich wraps lines at the terminal's width
    assert "--llm-threads (env CORELLA_LLM_THREADS)" in said and "greater than or equal to 1" in said
    assert "Traceback" not in result.output


def test_a_postgresql_store_is_named_by_store_or_store_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # typer hands --store over as a Path, which folds the URL's '//' into '/': it is put back
    settings = ServerSettings.from_options(tmp_path, store=Path("postgresql://corella@db:5432/live"))
    assert settings.store is None and settings.store_url == "postgresql://corella@db:5432/live"
    monkeypatch.setenv("CORELLA_STORE", "postgres://corella@db/live")
    assert ServerSettings(bundle=tmp_path).store_url == "postgres://corella@db/live"
    monkeypatch.setenv("CORELLA_STORE", str(tmp_path / "store.sqlite"))
    plain = ServerSettings(bundle=tmp_path)
    assert plain.store == tmp_path / "store.sqlite" and plain.store_url is None
