import numpy as np
import pytest

from runtime.errors import FeatureSpecError
from runtime.features import (
    OOV,
    PAD,
    STAT_NAMES,
    FeatureSpec,
    Statistics,
    Vocabulary,
    age_bucket,
    history_windows,
    normalize_user_attributes,
    running_totals,
)


def _spec(k: int = 3) -> FeatureSpec:
    return FeatureSpec(
        categorical_fields=("user_id", "item_id", "age", "year"),
        vocabularies={
            "user_id": Vocabulary(("u1", "u2")),
            "item_id": Vocabulary(("a", "b", "c")),
            "age": Vocabulary(("18", "25")),
            "year": Vocabulary(("1995",)),
            "tag": Vocabulary(("Drama", "Comedy")),
        },
        history_length=k,
        max_tags=2,
        rating_max=5.0,
        like_threshold=4.0,
        global_mean=3.5,
        global_like=0.55,
        prior=2.0,
    )


def _statistics(batch: int, users: int | None = None) -> Statistics:
    rng = np.random.default_rng(batch)
    counts = rng.integers(0, 9, size=(batch, 1)).astype(float)
    item = np.c_[counts, counts * 3.6, np.floor(counts * 0.6)]
    user = np.array([[7.0, 25.0, 4.0, 1.5]]).repeat(users or 1, axis=0)
    return Statistics(user=user, item=item, genre=item[::-1].copy())


def test_vocabulary_reserves_pad_and_oov():
    vocab = Vocabulary.build(["x", "y", "x", "z"])
    assert vocab.values[0] == "x"  # most frequent first
    assert vocab.index("x") == 2 and vocab.index("never seen") == OOV and vocab.index(None) == PAD
    assert vocab.size == 5
    assert Vocabulary.build(["x", "y", "x"], min_count=2).values == ("x",)


def test_encode_left_pads_history_and_maps_unknowns_to_oov():
    spec = _spec(k=3)
    out = spec.encode(
        user_ids=["u2", "stranger"],
        item_ids=["c", "new-item"],
        user_attributes=[{"age": "25"}, {}],
        item_years=["1995", None],
        item_tags=[("Comedy", "Drama", "Horror"), ()],
        history_items=[["a"], ["a", "b", "c", "zzz"]],
        history_ratings=[[5.0], [1.0, 2.0, 3.0, 4.0]],
        statistics=_statistics(2, users=2),
    )
    assert out["stats"].shape == (2, len(STAT_NAMES)) and out["stats"].dtype == np.float32
    assert out["categorical"].tolist() == [[3, 4, 3, 2], [OOV, OOV, PAD, PAD]]
    assert out["tags"].tolist() == [[3, 2], [0, 0]]  # cut to max_tags
    assert out["history_items"].tolist() == [[0, 0, 2], [3, 4, OOV]]  # the last 3, oldest first
    assert out["history_ratings"].tolist() == [[0, 0, 5.0], [2.0, 3.0, 4.0]]
    assert out["history_ratings"].dtype == np.float32


@pytest.mark.parametrize("user", ["u1", "stranger", None])
def test_encode_request_equals_encode_row_by_row(user):
    spec = _spec(k=3)
    attributes = {"age": "25"} if user else {}
    history, ratings = ["a", "c", "zzz", "b"], [1.0, 5.0, 3.0, 4.0]
    items, years, tags = ["c", "new-item", "a"], ["1995", None, "2001"], [("Comedy",), (), ("Drama", "Comedy", "X")]
    request = spec.encode_request(user_id=user, user_attributes=attributes, history_items=history,
                                  history_ratings=ratings, item_ids=items, item_years=years,
                                  item_tags=tags, statistics=_statistics(3))  # fmt: skip
    rows = spec.encode(user_ids=[user] * 3, item_ids=items, user_attributes=[attributes] * 3, item_years=years,
                       item_tags=tags, history_items=[history] * 3, history_ratings=[ratings] * 3,
                       statistics=_statistics(3, users=3))  # fmt: skip
    for name in rows:
        assert request[name].dtype == rows[name].dtype and request[name].tolist() == rows[name].tolist(), name


def test_spec_round_trips_and_refuses_other_versions(tmp_path):
    spec = _spec()
    spec.save(tmp_path / "features.json")
    loaded = FeatureSpec.load(tmp_path / "features.json")
    assert loaded.to_dict() == spec.to_dict() and loaded == spec
    data = spec.to_dict() | {"version": 99}
    with pytest.raises(FeatureSpecError, match="newer"):
        FeatureSpec.from_dict(data)
    old = {k: v for k, v in spec.to_dict().items() if k != "statistics"} | {"version": 1}
    with pytest.raises(FeatureSpecError, match="version 1 predates .* export a new bundle"):
        FeatureSpec.from_dict(old)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FeatureSpecError, match="bad.json"):
        FeatureSpec.load(tmp_path / "bad.json")


def test_history_windows_never_look_ahead():
    # user 0 has interactions at t = 1, 2, 2, 3; user 1 at t = 5
    user = np.array([0, 0, 0, 0, 1])
    ts = np.array([1, 2, 2, 3, 5])
    windows = history_windows(user, ts, length=2)
    assert windows.tolist() == [[-1, -1], [-1, 0], [-1, 0], [1, 2], [-1, -1]]


def test_user_attribute_normalization_is_idempotent():
    raw = {"age": 24, "gender": "m", "occupation": "Writer ", "zip": "85711"}
    once = normalize_user_attributes(raw)
    assert once == {"age": "18", "gender": "M", "occupation": "writer", "zip": "85"}
    assert normalize_user_attributes(once) == once
    assert age_bucket(17) == "1" and age_bucket(56) == "56" and age_bucket(1) == "1"


def test_store_round_trips_items_users_and_histories(tmp_path):
    from runtime.artifacts.store import FeatureStore, Interaction
    from runtime.prompt import ItemText

    items = [("1", ItemText("Toy Story", "1995", ("Comedy",), 3.9, 120)), ("2", ItemText("Heat", None, ()))]
    events = [Interaction("u", "1", 5, 10), Interaction("u", "2", 2, 20), Interaction("u", "1", 4, 30)]
    store = FeatureStore.create(tmp_path / "s.sqlite", items, [("u", {"age": 30, "zip": "12345"})], events,
                                like_threshold=4.0)  # fmt: skip
    assert store.items(["1", "2", "3"]) == {"1": items[0][1], "2": items[1][1]}
    assert store.user_attributes("u") == {"age": "25", "zip": "12"}
    assert [h.item_id for h in store.history("u", 2)] == ["2", "1"]  # the last two, oldest first
    assert [h.timestamp for h in store.history("u", 5, before=30)] == [10, 20]  # strictly before
    store.append([Interaction("u", "2", 5, 40)])
    assert store.history("u", 1)[0].timestamp == 40
    store.close()


def test_remembered_item_totals_follow_every_append(tmp_path, monkeypatch):
    """Totals, catalog entries and profiles are read from memory after the first time; an append
    must move the totals it changes, also while other threads are reading them."""
    import threading

    from runtime.artifacts.store import FeatureStore, Interaction
    from runtime.prompt import ItemText

    items = [(str(i), ItemText(f"movie {i}")) for i in range(20)]
    store = FeatureStore.create(tmp_path / "s.sqlite", items, [("u", {"age": 30})],
                                [Interaction("u", "1", 5, 1)], like_threshold=4.0)  # fmt: skip
    ids = [str(i) for i in range(20)]
    assert store.item_totals(["1", "2"]).tolist() == [[1, 5, 1], [0, 0, 0]]
    store.append([Interaction("v", "2", 4, 2), Interaction("v", "1", 1, 2)])
    assert store.item_totals(["1", "2"]).tolist() == [[2, 6, 1], [1, 4, 1]]
    store.user_attributes("u")["age"] = "changed by a caller"
    assert store.user_attributes("u") == {"age": "25"} and store.user_attributes("nobody") is None

    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            store.item_totals(ids)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    for t in range(200):
        store.append([Interaction(f"w{t}", str(t % 20), 1 + t % 5, 10 + t)])
    stop.set()
    for thread in readers:
        thread.join()
    # what memory says equals what the interactions add up to (the uncached path)
    assert store.item_totals(ids).tolist() == store.item_totals(ids, before=10**9).tolist()
    assert store.item_totals(ids)[:, 0].sum() == 203
    # a full cache starts again, and the call that fills it still answers every key it was asked
    truth = store.item_totals(ids).tolist()
    monkeypatch.setattr("runtime.artifacts.store._CACHE", 12)
    store._totals_cache.clear()
    assert store.item_totals(ids[:10]).tolist() == truth[:10]
    assert store.item_totals(ids).tolist() == truth and len(store._totals_cache) == 10
    assert set(store.items(ids)) == set(ids)
    store.close()


def test_prompt_of_another_version_is_refused(tmp_path):
    import json

    from runtime.errors import PromptError
    from runtime.prompt import PromptTemplate

    template = PromptTemplate(item_stats=True)
    template.save(tmp_path / "prompt.json")
    assert PromptTemplate.load(tmp_path / "prompt.json") == template
    (tmp_path / "old.json").write_text(json.dumps(template.to_dict() | {"version": 1}))
    with pytest.raises(PromptError, match="old.json: prompt version 1"):
        PromptTemplate.load(tmp_path / "old.json")


def test_reception_words_follow_the_share_of_likes():
    from runtime.prompt import ItemText, reception

    assert [reception(x) for x in (0.9, 0.6, 0.4, 0.1)] == [
        "most people liked it",
        "many people liked it",
        "few people liked it",
        "most people disliked it",
    ]
    item = ItemText("Heat", "1995", ("Action",), 3.9, 120, 0.72)
    assert item.describe(stats=True) == "Heat (1995; Action); most people liked it (72% of 120)"
    assert ItemText("New", liked_share=None).describe(stats=True) == "New"  # not in the catalog: no verdict


def test_each_prompt_version_renders_its_own_text():
    """Versions 3 and 4 must render exactly what their bundles were trained on; version 4 asks the
    question in the shared prefix and names the target in fewer words, version 5 in fewer still."""
    from runtime.errors import PromptError
    from runtime.prompt import PROMPT_VERSION, HistoryEntry, ItemText, PromptTemplate

    history = [HistoryEntry(ItemText("Heat", "1995", ("Action",), 3.9, 120, 0.72), 4.0),
               HistoryEntry(ItemText("Fargo", "1996", ("Crime",)), 2.0)]  # fmt: skip
    target = ItemText("Toy Story", "1995", ("Animation", "Comedy"), 3.9, 374, 0.71)
    v3 = PromptTemplate(item_stats=True, like_threshold=4.0, version=3)
    assert v3.render(history, target) == (
        "A user rated movies from 1 to 5 stars. Please predict whether the user will like the target movie based "
        "on the rating history. You should ONLY answer no or yes.\nThe user's rating history, oldest first:\n"
        "- Heat (1995; Action): 4 stars\n- Fargo (1996; Crime): 2 stars\nThe user liked 1 of these 2 movies.\n"
        "Target movie: Toy Story (1995; Animation, Comedy); most people liked it (71% of 374)\n"
        "Will the user like it?\nAnswer:"
    )
    v4 = PromptTemplate(item_stats=True, like_threshold=4.0, version=4)
    asked = "The user liked 1 of these 2 movies.\nWill the user like the target movie?\nTarget movie:"
    assert v4.prefix(history).endswith(asked)
    assert v4.suffix(target) == " Toy Story (Animation, Comedy); most people liked it\nAnswer:"
    assert v4.suffix(ItemText("New")) == " New\nAnswer:"  # not in the catalog: no verdict
    assert PromptTemplate(version=4).suffix(target) == " Toy Story (Animation, Comedy)\nAnswer:"
    # version 5: the same prefix; the verdict in one word, and the answer read after a newline
    v5 = PromptTemplate(item_stats=True, like_threshold=4.0)
    assert v5.version == PROMPT_VERSION == 5
    assert v5.prefix(history) == v4.prefix(history)
    assert v5.suffix(target) == " Toy Story (Animation, Comedy); acclaimed\n"
    assert [v5.suffix(ItemText("X", None, (), 3.0, 10, share)) for share in (0.5, 0.3, 0.29)] == [
        " X; liked\n", " X; mixed\n", " X; disliked\n"]  # fmt: skip
    assert v5.suffix(ItemText("New")) == " New\n"
    with pytest.raises(PromptError, match="prompt version 2, but this corella renders versions 3, 4, 5"):
        PromptTemplate(version=2)


def test_a_resumed_run_keeps_the_prompt_version_it_started_with(tmp_path):
    """A run folder from before prompt versions were recorded was trained on version 3: resuming it
    must not switch its prompt halfway."""
    from training.checkpoint import write_json
    from training.pipeline import CoReLLaConfig, recorded_config

    assert recorded_config(tmp_path) is None
    config = CoReLLaConfig().model_dump()
    assert config["prompt_version"] == 5
    write_json(tmp_path / "run.json", {"config": config | {"prompt_version": 4}})
    assert recorded_config(tmp_path).prompt_version == 4  # a version 4 run stays on 4
    write_json(tmp_path / "run.json", {"config": config})
    assert recorded_config(tmp_path).prompt_version == 5
    del config["prompt_version"]
    write_json(tmp_path / "run.json", {"config": config})
    assert recorded_config(tmp_path).prompt_version == 3
    with pytest.raises(ValueError, match="prompt version 9"):
        CoReLLaConfig(prompt_version=9)


def test_a_store_of_another_schema_is_refused(tmp_path):
    import sqlite3

    from runtime.artifacts.store import FeatureStore
    from runtime.errors import StoreError

    path = tmp_path / "old.sqlite"
    FeatureStore.create(path, [], [], [], like_threshold=4.0).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="old.sqlite: feature store schema 1"):
        FeatureStore(path)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="junk.sqlite: not a corella feature store"):
        FeatureStore(tmp_path / "junk.sqlite")


def _interactions(seed: int = 0, n: int = 160):
    """Generated interactions with ties in time, repeated items and items with no tags."""
    rng = np.random.default_rng(seed)
    user = rng.choice(["u1", "u2", "u3", "u4"], size=n)
    item = rng.choice([f"i{k}" for k in range(9)], size=n)
    timestamp = rng.integers(0, 40, size=n)  # many ties
    rating = rng.integers(1, 6, size=n).astype(float)
    tags = {f"i{k}": (("Drama", "Comedy", "Horror")[k % 3],) * (k % 4 != 0) + (("Action",) if k % 2 else ())
            for k in range(9)}  # fmt: skip
    return user, item, timestamp, rating, tags


def _brute_force(spec, user, item, timestamp, rating, tags, i):
    """Statistics of row i from first principles: only rows strictly earlier in time."""
    like = spec.like_threshold

    def totals(rows):
        return np.array([len(rows), rating[rows].sum(), (rating[rows] >= like).sum()], dtype=float)

    def item_before(j):
        return totals([k for k in range(len(item)) if item[k] == item[j] and timestamp[k] < timestamp[j]])

    mine = [j for j in range(len(user)) if user[j] == user[i] and timestamp[j] < timestamp[i]]
    deviation = sum(rating[j] - spec.shrunk(item_before(j)[1], item_before(j)[0], spec.global_mean) for j in mine)
    genre = sum((totals([j for j in mine if g in tags[item[j]]]) for g in tags[item[i]]), np.zeros(3))
    return np.r_[totals(mine), deviation], item_before(i), genre


def test_running_statistics_equal_a_brute_force_recomputation_and_never_look_ahead():
    spec = _spec()
    user, item, timestamp, rating, tags = _interactions()
    item_tags = [tags[i] for i in item]
    stats = spec.running_statistics(user, item, timestamp, rating, item_tags)
    for i in range(len(user)):
        expected_user, expected_item, expected_genre = _brute_force(spec, user, item, timestamp, rating, tags, i)
        assert np.allclose(stats.user[i], expected_user), i
        assert np.allclose(stats.item[i], expected_item), i
        assert np.allclose(stats.genre[i], expected_genre), i
    # a sample's own rating and every later one can change without moving its features
    moment = np.sort(timestamp)[len(timestamp) // 2]
    changed = np.where(timestamp >= moment, 6.0 - rating, rating)
    again = spec.running_statistics(user, item, timestamp, changed, item_tags)
    at = timestamp == moment
    for name in ("user", "item", "genre"):
        # (equal up to float summation order: the running sums are prefix sums over every group)
        assert np.allclose(getattr(again, name)[at], getattr(stats, name)[at], rtol=0, atol=1e-9), name
    assert not np.array_equal(again.user, stats.user)  # ... while later samples do see the change


def test_training_and_serving_produce_identical_feature_rows(tmp_path):
    """The store-backed serving path (what a request reads) equals training's vectorized one, for
    the exported past and after live events."""
    from runtime.artifacts.store import FeatureStore, Interaction
    from runtime.prompt import ItemText

    spec = _spec()
    user, item, timestamp, rating, tags = _interactions(seed=1)
    order = np.argsort(timestamp, kind="stable")  # the export writes interactions in time order
    user, item, timestamp, rating = user[order], item[order], timestamp[order], rating[order]
    before = running_totals(item, timestamp, rating, spec.like_threshold)
    catalog = [(i, ItemText(f"title {i}", None, t)) for i, t in tags.items()]
    events = [
        Interaction(u, i, r, int(t), int(c), float(s))
        for u, i, r, t, c, s in zip(user, item, rating, timestamp, before[:, 0], before[:, 1], strict=True)
    ]
    # what follows t = 30 arrives later through /v1/events, one batch per moment
    split = int(np.searchsorted(timestamp, 30))
    store = FeatureStore.create(tmp_path / "s.sqlite", catalog, [], events[:split], like_threshold=4.0)
    for moment in np.unique(timestamp[split:]):
        store.append([e for e in events[split:] if e.timestamp == moment])
    candidates = sorted(tags)
    # a moment after everything: training's view appends the candidates as samples at t = 1000
    n = len(user)
    for who in ("u1", "u2", "u3", "u4", "stranger"):
        training = spec.running_statistics(
            np.r_[user, [who] * len(candidates)], np.r_[item, candidates], np.r_[timestamp, [1000] * len(candidates)],
            np.r_[rating, [3.0] * len(candidates)], [tags[i] for i in item] + [tags[i] for i in candidates],
        )  # fmt: skip
        expected = spec.stats(Statistics(training.user[n:], training.item[n:], training.genre[n:]))
        for at in (None, 1000):
            _, past = store.user_past(who, before=at)
            totals = store.item_totals(candidates, before=at)
            served = spec.stats(spec.request_statistics(spec.user_summary(past), totals, [tags[i] for i in candidates]))
            assert np.allclose(served, expected, atol=1e-6), (who, at)
    # and for a moment in the middle of the exported past
    row = split // 2
    sample = spec.running_statistics(user, item, timestamp, rating, [tags[i] for i in item])
    _, past = store.user_past(user[row], before=int(timestamp[row]))
    served = spec.request_statistics(
        spec.user_summary(past), store.item_totals([item[row]], before=int(timestamp[row])), [tags[item[row]]]
    )
    assert np.allclose(spec.stats(served), spec.stats(Statistics(sample.user[row : row + 1], sample.item[row : row + 1],
                                                                 sample.genre[row : row + 1])), atol=1e-6)  # fmt: skip
    store.close()


def test_a_schema_3_store_is_read_as_it_is_and_upgraded_when_opened_to_write(tmp_path):
    """A bundle exported before items had texts (schema 3): read-only it is read as it is (no texts);
    a live store copied from it is upgraded in place when opened to write."""
    import sqlite3

    from runtime.artifacts.store import SCHEMA_VERSION, FeatureStore
    from runtime.prompt import ItemText

    path = tmp_path / "v3.sqlite"
    FeatureStore.create(path, [("i1", ItemText("One", "1999", ("Drama",)))], [], [], like_threshold=4.0).close()
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE items DROP COLUMN text")
        conn.execute("ALTER TABLE items DROP COLUMN posted")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    old = FeatureStore(path, readonly=True)
    assert old.items(["i1"])["i1"] == ItemText("One", "1999", ("Drama",)) and old.posted_items() == []
    old.close()
    live = FeatureStore(path)
    assert live.meta("schema_version") == str(SCHEMA_VERSION)
    assert live.upsert_items([("i2", ItemText("Two", text="a new one"))]) == (1, 0)
    assert live.items(["i2"])["i2"].text == "a new one" and [i for i, _ in live.posted_items()] == ["i2"]
    live.close()
