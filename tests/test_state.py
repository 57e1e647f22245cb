"""Serving state outside the bundle: a re-export loses no live event, a store of another bundle is
refused, and `corella store migrate|reset` say what happened to every event."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from corella_cli.main import app
from export.bundle import ExportConfig, export_bundle
from runtime.artifacts.bundle import load_bundle
from runtime.artifacts.state import live_events, live_store, reset_store
from runtime.artifacts.store import FeatureStore, Interaction
from runtime.errors import StoreError

CHEAP = ExportConfig(quant="q8_0", compare_quants=[], parity_prompts=4, routed_samples=8, eval_samples=5)


def _post(bundle: Path, events: list[Interaction]) -> None:
    """What /v1/events does: append to the bundle's live store."""
    store = FeatureStore(live_store(load_bundle(bundle)))
    store.append(events)
    store.close()


def test_reexport_keeps_live_events_until_they_are_migrated(trained_run, tmp_path, corella_home):
    out = tmp_path / "bundle"
    export_bundle(trained_run, out, CHEAP)
    first = load_bundle(out)
    events = [Interaction("fresh", "1", 5.0, 2_000_000_000), Interaction("fresh", "2", 4.0, 2_000_000_001),
              Interaction("fresh", "no-such-item", 1.0, 2_000_000_002)]  # fmt: skip
    _post(out, events)
    manifest = export_bundle(trained_run, out, CHEAP)  # the model is exported again over the same folder
    second = load_bundle(out)
    assert manifest["replaces"] == first.id != second.id
    assert len(live_events(corella_home / "state" / first.id / "store.sqlite")) == 3  # nothing lost
    with pytest.raises(StoreError, match=r"holds 3 events .* `corella store migrate "):
        live_store(second)
    result = CliRunner().invoke(app, ["serve", str(out)])
    said = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2 and "corella store migrate" in said and "Traceback" not in said
    result = CliRunner().invoke(app, ["store", "migrate", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "migrated 2 of 3 events" in said and "1 of items not in the catalog dropped" in said
    store = FeatureStore(live_store(second))  # serving starts now, with the user's events in place
    assert [h.item_id for h in store.history("fresh")] == ["1", "2"]
    store.close()
    info = CliRunner().invoke(app, ["store", "info", str(out)])
    assert info.exit_code == 0 and "events since export" in info.output


def test_a_live_store_of_another_bundle_is_refused_and_reset_sets_it_aside(bundle, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    manifest = (other / "manifest.json").read_text()
    (other / "manifest.json").write_text(manifest.replace('"created_at": "', '"created_at": "x'))  # another id
    mine = live_store(load_bundle(bundle))
    with pytest.raises(StoreError, match=r"seeded from bundle .* not from .*corella store migrate"):
        live_store(load_bundle(other), store=mine)
    _post(bundle, [Interaction("u", "1", 5.0, 2_000_000_000)])
    result = reset_store(load_bundle(bundle))
    assert Path(result["set_aside"]).exists() and not mine.exists()  # renamed, not deleted
    assert live_events(live_store(load_bundle(bundle))) == []  # a fresh copy of the snapshot


def test_an_old_bundle_with_state_inside_keeps_it_through_a_reexport(trained_run, tmp_path, corella_home):
    out = tmp_path / "bundle"
    export_bundle(trained_run, out, CHEAP)
    old_id = load_bundle(out).id
    legacy = out / "state"  # where corella before this release kept the live store
    legacy.mkdir()
    shutil.copy2(out / "store.sqlite", legacy / "store.sqlite")
    store = FeatureStore(legacy / "store.sqlite")
    store.set_meta("seed_interactions", str(store.counts()["interactions"]))
    store.append([Interaction("fresh", "1", 5.0, 2_000_000_000)])
    store.close()
    export_bundle(trained_run, out, CHEAP)
    moved = corella_home / "state" / old_id / "store.sqlite"
    assert not (out / "state").exists() and len(live_events(moved)) == 1
    with pytest.raises(StoreError, match="holds 1 events"):
        live_store(load_bundle(out))


def test_appends_keep_a_count_and_never_hold_up_reads(tmp_path):
    import threading

    from runtime.errors import StoreFull
    from runtime.prompt import ItemText

    store = FeatureStore.create(tmp_path / "store.sqlite", [("1", ItemText("One")), ("2", ItemText("Two"))],
                                [("u", {"age": "20"})],
                                [Interaction("u", "1", 4.0, 100), Interaction("u", "2", 2.0, 200)], 4.0)  # fmt: skip
    try:
        assert store.counts()["interactions"] == 2
        events = [Interaction("u", "1", 5.0, 300, event_id="a"), Interaction("v", "2", 3.0, 301, event_id="b")]
        assert store.append(events, max_interactions=4) == 2
        assert store.append(events) == 0  # the same ids: nothing new, nothing counted
        assert store.counts()["interactions"] == 4
        with pytest.raises(StoreFull):
            store.append([Interaction("v", "1", 1.0, 302)], max_interactions=4)
        store._interaction_count = None  # counted again from the table: the kept count was right
        assert store.counts()["interactions"] == 4
        # a write in progress (its lock held, as during a commit's fsync) does not block a read
        held, done = threading.Event(), threading.Event()

        def write() -> None:
            with store._write_lock:
                held.set()
                done.wait(10)

        writer = threading.Thread(target=write)
        writer.start()
        assert held.wait(10)
        try:
            reader = threading.Thread(target=lambda: store.user_past("u"))
            reader.start()
            reader.join(timeout=5)
            assert not reader.is_alive(), "a read waited for the writer"
            assert store.item_totals(["1"])[0][0] == 2
        finally:
            done.set()
            writer.join(timeout=10)
    finally:
        store.close()
