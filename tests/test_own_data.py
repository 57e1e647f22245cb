"""Your own data: a spec'd data set through the one loader path, bad input in one line, a generated
implicit-feedback book catalog trained end to end into a bundle that serves, and items posted
while serving (predicted at once, kept through a restart, a kill -9 and `corella store migrate`)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from runtime.errors import DataError
from training.data.registry import imported_folder, load_dataset
from training.data.samples import build_samples
from training.data.spec import DatasetSpec
from training.data.tables import import_dataset, load_spec

from .test_server import _free_port, _start_server

# ---------------------------------------------------------------------------- ML-100K as a user's CSV files


def _write_ml100k_as_csv(raw, folder: Path) -> Path:
    """The data set as a user would hand it over: three CSV files with headers, and a spec."""
    folder.mkdir(parents=True)
    inter = raw.interactions
    inter.rename(columns={"user": "user_id", "item": "movie_id", "rating": "stars", "timestamp": "ts"}).to_csv(
        folder / "ratings.csv", index=False
    )
    items = raw.items.assign(genres=["|".join(t) for t in raw.items["tags"]])
    items[["title", "year", "genres"]].rename_axis("movie_id").to_csv(folder / "movies.csv")
    raw.users.rename_axis("user_id").to_csv(folder / "users.csv")
    (folder / "ml.toml").write_text(
        """
name = "ml-from-csv"
[words]
noun = "movie"
[interactions]
path = "ratings.csv"
user = "user_id"
item = "movie_id"
timestamp = "ts"
rating = "stars"
like_threshold = 4
rating_range = [1, 5]
[items]
path = "movies.csv"
id = "movie_id"
title = "title"
year = "year"
tags = "genres"
[users]
path = "users.csv"
id = "user_id"
attributes = ["age", "gender", "occupation", "zip"]
""",
        encoding="utf-8",
    )
    return folder / "ml.toml"


def test_ml100k_as_spec_csv_files_gives_the_built_in_feature_rows_and_crm(ml100k_dir, tmp_path):
    from training.crm_trainer import CRMTrainConfig
    from training.runs import DataConfig, run_crm_stage

    builtin = load_dataset("movielens-100k", ml100k_dir)
    spec = DatasetSpec.load(_write_ml100k_as_csv(builtin, tmp_path / "csv"))
    meta = import_dataset(spec, imported_folder(spec.name))
    assert meta["counts"]["interactions"] == 100_000 and meta["counts"]["items"] == 1682
    imported = load_dataset("ml-from-csv")  # the import in the cache, as `corella train --dataset` reads it
    samples = [build_samples(raw, history_length=10) for raw in (builtin, imported)]
    specs = [s.feature_spec() for s in samples]
    assert specs[0].to_dict() == specs[1].to_dict()
    rows = [s.encode(specs[0]) for s in samples]
    for name in rows[0]:
        np.testing.assert_array_equal(rows[0][name], rows[1][name], err_msg=name)
    assert samples[0].prompt_template().to_dict() == samples[1].prompt_template().to_dict()
    assert samples[0].item_text("50") == samples[1].item_text("50")
    train = CRMTrainConfig(epochs=1, batch_size=2048, seed=3)
    metrics = [
        run_crm_stage(tmp_path / f"run-{k}", DataConfig(name, source), train_config=train, show_progress=False)[2]
        for k, (name, source) in enumerate((("movielens-100k", str(ml100k_dir)), ("ml-from-csv", None)))
    ]
    assert metrics[0]["test"] == metrics[1]["test"] and metrics[0]["test"]["overall"]["auc"] > 0.6


# ---------------------------------------------------------------------------- bad input, one line each

_SPEC = """
[interactions]
path = "{path}"
user = "user_id"
item = "item_id"
timestamp = "ts"
{feedback}
{delimiter}
[items]
path = "{items}"
id = "item_id"
title = "title"
"""
_GOOD = "user_id,item_id,clicked,ts\nu1,b1,1,2024-05-01T10:00:00Z\nu1,b2,0,1714557600\n"
_ITEMS = '{"item_id": "b1", "title": "Dune"}\n{"item_id": "b2", "title": "Emma"}\n'


@pytest.mark.parametrize(
    ("case", "interactions", "items", "extra", "message"),
    [
        ("missing column", "user_id,item_id,clicked\nu1,b1,1\n", _ITEMS, {},
         r"interactions.csv: no column 'ts' \(the file has 'user_id', 'item_id', 'clicked'\)"),
        ("timestamp", _GOOD + "u2,b1,1,yesterday\n", _ITEMS, {},
         r"interactions.csv: row 3, column 'ts': timestamp does not parse .* \('yesterday'\)"),
        ("label", _GOOD + "u2,b1,2,1714557600\n", _ITEMS, {},
         r"interactions.csv: row 3, column 'clicked': a label must be 0 or 1 \('2'\)"),
        ("rating range", "user_id,item_id,stars,ts\nu1,b1,4,1\nu1,b2,7,2\n", _ITEMS,
         {"feedback": 'rating = "stars"\nlike_threshold = 4\nrating_range = [1, 5]'},
         r"interactions.csv: row 2, column 'stars': rating outside the declared range \[1, 5\] \('7'\)"),
        ("duplicate items", _GOOD, _ITEMS + '{"item_id": "b1", "title": "Dune again"}\n', {},
         r"items.jsonl: rows 1, 3, column 'item_id': duplicate item id 'b1'"),
        ("empty file", "", _ITEMS, {}, r"interactions.csv: empty file"),
        ("header only", "user_id,item_id,clicked,ts\n", _ITEMS, {}, r"interactions.csv: empty file \(no rows after"),
        ("wrong delimiter", _GOOD.replace(",", ";"), _ITEMS, {},
         r"interactions.csv: no column 'user_id' .*is the delimiter ';' rather than ','\?"),
        ("unknown format", _GOOD, _ITEMS, {"items": "items.xlsx"},
         r"items.xlsx: unknown format '.xlsx'; name the file .csv, .tsv, .parquet or .jsonl"),
        ("short row", _GOOD + "u3,b2\n", _ITEMS, {}, r"interactions.csv: line 4: expected 4 fields, found 2"),
        ("not json", _GOOD, _ITEMS + "{oops\n", {}, r"items.jsonl: line 3: not a JSON object"),
    ],
)  # fmt: skip
def test_bad_input_gets_one_line_naming_file_row_and_column(tmp_path, case, interactions, items, extra, message):
    values = {"path": "interactions.csv", "items": "items.jsonl", "feedback": 'label = "clicked"', "delimiter": ""}
    values |= extra
    (tmp_path / "interactions.csv").write_text(interactions, encoding="utf-8")
    (tmp_path / values["items"]).write_text(items, encoding="utf-8")
    (tmp_path / "spec.toml").write_text(_SPEC.format(**values), encoding="utf-8")
    with pytest.raises(DataError, match=message) as caught:
        spec = DatasetSpec.load(tmp_path / "spec.toml")
        import_dataset(spec, tmp_path / "cache" / "mine")
    assert "\n" not in str(caught.value)
    # nothing half-written: no import, no staging folder
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_skip_malformed_drops_and_counts_bad_rows_and_unlisted_items_are_kept(tmp_path):
    (tmp_path / "interactions.csv").write_text(_GOOD + "u2,b1,2,1\nu2,b9,1,yesterday\nu3,b7,1,5\n")
    (tmp_path / "items.jsonl").write_text(_ITEMS)
    values = {"path": "interactions.csv", "items": "items.jsonl", "feedback": 'label = "clicked"', "delimiter": ""}
    (tmp_path / "spec.toml").write_text(_SPEC.format(**values))
    raw = load_spec(DatasetSpec.load(tmp_path / "spec.toml"), skip_malformed=True)
    assert len(raw.interactions) == 3 and raw.errors.total == 2
    assert raw.unlisted_items() == 1 and raw.implicit and raw.rating_max == 1.0
    # a date/time and unix seconds mean the same clock
    assert raw.interactions["timestamp"].tolist()[:2] == [1714557600, 1714557600]


def test_the_cli_imports_and_reports_a_bad_spec_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from corella_cli.main import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["data", "init"]).exit_code == 0
    assert "[interactions]" in (tmp_path / "dataset.toml").read_text()
    result = runner.invoke(app, ["data", "import", "dataset.toml"])
    assert result.exit_code == 2 and "items.jsonl: file not found" in result.output
    assert "Traceback" not in result.output
    (tmp_path / "typo.toml").write_text('[interactions]\npath = "x.csv"\nusr = "u"\n')
    result = runner.invoke(app, ["data", "import", "typo.toml"])
    assert result.exit_code == 2 and "[interactions] unknown key 'usr'" in result.output


# ---------------------------------------------------------------------------- a book catalog, clicks only

_GENRES = ("fantasy", "history", "romance", "science", "crime")


def write_books(folder: Path, users: int = 80, books: int = 40, per_user: int = 12, seed: int = 0) -> Path:
    """Clicks (0/1) on books with descriptions, formats and prices; each user clicks one genre's books
    (10% noise); ISO timestamps; a `country` per user."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genre = rng.integers(0, len(_GENRES), size=books)
    with open(folder / "books.jsonl", "w", encoding="utf-8") as out:
        for b in range(books):
            out.write(json.dumps({
                "isbn": f"b{b}", "name": f"The {_GENRES[genre[b]].title()} Book {b}",
                "blurb": f"A {_GENRES[genre[b]]} story about people, places and the number {b}, told slowly.",
                "subjects": [_GENRES[genre[b]]], "format": ("paperback", "hardcover")[b % 2], "price": 4.0 + b,
            }) + "\n")  # fmt: skip
    lines = ["reader,isbn,clicked,when"]
    t0 = 1_700_000_000
    for u in range(users):
        favourite = rng.integers(0, len(_GENRES))
        for k, b in enumerate(rng.choice(books, size=per_user, replace=False)):
            clicked = int(genre[b] == favourite)
            if rng.random() < 0.1:
                clicked = 1 - clicked
            moment = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + 86_400 * k + int(rng.integers(0, 86_400))))
            lines.append(f"r{u},b{b},{clicked},{moment}")
    (folder / "clicks.csv").write_text("\n".join(lines) + "\n")
    (folder / "readers.tsv").write_text("id\tcountry\n" + "".join(f"r{u}\t{('FR', 'JP', 'BR')[u % 3]}\n"
                                                                   for u in range(users)))  # fmt: skip
    (folder / "books.toml").write_text("""
name = "books"
[words]
noun = "book"
verb = "clicked"
[interactions]
path = "clicks.csv"
user = "reader"
item = "isbn"
timestamp = "when"
label = "clicked"
[items]
path = "books.jsonl"
id = "isbn"
title = "name"
text = ["blurb"]
tags = "subjects"
attributes = ["format"]
numbers = ["price"]
[users]
path = "readers.tsv"
id = "id"
attributes = ["country"]
""")
    return folder / "books.toml"


@pytest.fixture(scope="module")
def books_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The book catalog imported, trained (3 stages, tiny LLM) and exported: its own CORELLA_HOME."""
    from export.bundle import ExportConfig, export_bundle
    from training.pipeline import CoReLLaConfig, train_corella

    from .tiny_llm import write_tiny_llama_gguf

    root = tmp_path_factory.mktemp("books")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CORELLA_HOME", str(root / "home"))
        spec = DatasetSpec.load(write_books(root / "data"))
        import_dataset(spec, imported_folder("books"))
        config = CoReLLaConfig(
            dataset="books", history_length=5, llm=str(write_tiny_llama_gguf(root / "tiny.gguf")),
            crm={"embedding_dim": 8}, crm_train={"epochs": 2, "batch_size": 64},
            joint={"stage2_samples": 16, "stage3_samples": 8, "batch_size": 4, "group_size": 4},
            eval_samples=32, max_prompt_tokens=480,
        )  # fmt: skip
        train_corella(root / "run", config, show_progress=False)
        export_bundle(root / "run", root / "bundle", ExportConfig(quant="q8_0", parity_prompts=8, routed_samples=16))
    return root / "bundle"


def _client(bundle: Path, state: Path, **settings) -> TestClient:
    from runtime.serving import ServerSettings, create_app

    return TestClient(create_app(ServerSettings(bundle=bundle, state=state, llm_decode_without_signal=True,
                                                **settings)))  # fmt: skip


def test_an_implicit_feedback_book_catalog_trains_into_a_bundle_that_serves(books_bundle, tmp_path):
    features = json.loads((books_bundle / "features.json").read_text())
    assert features["categorical_fields"] == ["user_id", "item_id", "country", "year"]
    assert features["like_threshold"] == 1.0 and features["rating_max"] == 1.0
    assert {"format: paperback", "price ~16-32", "fantasy"} <= set(features["vocabularies"]["tag"])
    prompt = json.loads((books_bundle / "prompt.json").read_text())
    assert prompt["implicit"] and prompt["verb"] == "clicked" and prompt["item_noun"] == "book"
    with _client(books_bundle, tmp_path / "state") as client:
        body = {"user_id": "r3", "candidates": [{"item_id": f"b{i}"} for i in range(8)], "mode": "llm",
                "deadline_ms": 60_000}  # fmt: skip
        answer = client.post("/v1/predict", json=body).json()
        assert [p["route"] for p in answer["predictions"]] == ["llm"] * 8
        engine = client.app.state.engine
        prefix, suffixes = engine.prompt_texts([], list(engine.store.items(["b1"]).values()))
        assert "was shown books and clicked some of them" in prefix
        assert suffixes[0].startswith(" The ") and "story about people, places and the number 1" in suffixes[0]


def test_an_item_posted_while_serving_is_predicted_at_once_and_routed_to_the_llm(books_bundle, tmp_path):
    new = {"item_id": "b-new", "title": "The Fantasy Book of Tomorrow", "text": "A fantasy story, just out.",
           "tags": ["fantasy"], "attributes": {"format": "hardcover"}, "numbers": {"price": 19.0}}  # fmt: skip
    body = {"user_id": "r3", "candidates": [{"item_id": "b-new"}], "mode": "llm", "deadline_ms": 60_000}
    with _client(books_bundle, tmp_path / "state") as client:
        before = client.post("/v1/predict", json=body).json()["predictions"][0]
        assert before["route"] != "llm"  # no title anywhere: nothing for the LLM to read
        assert client.post("/v1/items", json={"items": [new]}).json() == {"added": 1, "updated": 0}
        after = client.post("/v1/predict", json=body).json()["predictions"][0]
        assert after["route"] == "llm"
        crm = client.post("/v1/predict", json=body | {"mode": "crm"}).json()["predictions"][0]
        assert crm["score"] != before["score"] or crm["entropy"] != before["entropy"]  # its tags now count
        store_entry = client.app.state.engine.store.items(["b-new"])["b-new"]
        assert store_entry.tags == ("fantasy", "format: hardcover", "price ~16-32")
        assert client.post("/v1/items", json={"items": [new | {"title": "Renamed"}]}).json() == {
            "added": 0,
            "updated": 1,
        }
        # schema-strict and bounded, in the error envelope
        for bad in ({"items": []}, {"items": [new | {"colour": "red"}]}, {"items": [new | {"title": ""}]},
                    {"items": [new | {"numbers": {"price": "cheap"}}]}, {"items": [new] * 1001}):  # fmt: skip
            response = client.post("/v1/items", json=bad)
            assert response.status_code == 422 and "error" in response.json()
        assert 'corella_items_posted_total{change="added"} 1.0' in client.get("/metrics").text


def test_posted_items_survive_a_kill_9_a_restart_and_a_store_migration(books_bundle, tmp_path):
    from runtime.artifacts.bundle import load_bundle
    from runtime.artifacts.state import migrate_store
    from runtime.artifacts.store import FeatureStore

    port, state = _free_port(), tmp_path / "state"
    bundle = tmp_path / "bundle"
    shutil.copytree(books_bundle, bundle)
    server = _start_server(bundle, port, "--no-llm", "--state", str(state))
    acknowledged: list[str] = []

    def poster() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            for i in range(100_000):
                item = {"item_id": f"live-{i}", "title": f"Live Book {i}", "text": "posted while serving"}
                try:
                    if http.post("/v1/items", json={"items": [item]}).status_code == 200:
                        acknowledged.append(item["item_id"])
                except httpx.HTTPError:
                    return

    thread = threading.Thread(target=poster)
    thread.start()
    for _ in range(3000):
        if len(acknowledged) >= 30:
            break
        time.sleep(0.01)
    server.kill()  # SIGKILL
    server.wait()
    thread.join()
    assert len(acknowledged) >= 30
    store = FeatureStore(state / "store.sqlite")
    assert set(store.items(acknowledged)) == set(acknowledged)
    store.close()
    server = _start_server(bundle, port, "--no-llm", "--state", str(state))
    try:
        body = {"user_id": "r1", "candidates": [{"item_id": acknowledged[0]}], "mode": "crm"}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/predict", json=body, timeout=10).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
    moved = migrate_store(load_bundle(bundle), source=state, state=tmp_path / "state-2")
    assert moved["items"] >= len(acknowledged)  # and any committed just before the kill, unacknowledged
    store = FeatureStore(tmp_path / "state-2" / "store.sqlite")
    assert store.items([acknowledged[-1]])[acknowledged[-1]].text == "posted while serving"
    store.close()


def test_parquet_and_gzipped_text_read_as_the_csv_does(tmp_path):
    """One data set three ways: CSV, gzipped TSV, and Parquet with a real timestamp type and a list
    column of tags: the same normalized tables."""
    import gzip

    import pandas as pd

    spec_path = write_books(tmp_path / "csv", users=20, books=12, per_user=5)
    reference = load_spec(DatasetSpec.load(spec_path))
    clicks = pd.read_csv(tmp_path / "csv" / "clicks.csv")
    with gzip.open(tmp_path / "csv" / "clicks.tsv.gz", "wt") as out:
        clicks.to_csv(out, sep="\t", index=False)
    clicks.assign(when=pd.to_datetime(clicks["when"], utc=True)).to_parquet(tmp_path / "csv" / "clicks.parquet")
    books = pd.read_json(tmp_path / "csv" / "books.jsonl", lines=True)
    books.to_parquet(tmp_path / "csv" / "books.parquet")
    text = spec_path.read_text()
    for clicks_file, books_file in (("clicks.tsv.gz", "books.jsonl"), ("clicks.parquet", "books.parquet")):
        variant = tmp_path / "csv" / f"variant-{clicks_file}.toml"
        variant.write_text(text.replace('"clicks.csv"', f'"{clicks_file}"').replace('"books.jsonl"', f'"{books_file}"'))
        raw = load_spec(DatasetSpec.load(variant))
        pd.testing.assert_frame_equal(raw.interactions.astype({"user": str, "item": str}),
                                      reference.interactions.astype({"user": str, "item": str}))  # fmt: skip
        pd.testing.assert_frame_equal(raw.items, reference.items)
        pd.testing.assert_frame_equal(raw.users, reference.users)
