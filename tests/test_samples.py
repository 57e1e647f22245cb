"""The global temporal split and histories on the real MovieLens-100K."""

import numpy as np
import pytest

from runtime.prompt import reception, verdict
from training.data import build_samples, load_dataset


@pytest.fixture(scope="module")
def samples(ml100k_dir):
    return build_samples(load_dataset("movielens-100k", ml100k_dir), history_length=10)


def test_split_is_global_temporal_80_10_10(samples):
    train, valid, test = (samples.indices(s) for s in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (80_000, 10_000, 10_000)
    assert samples.timestamp[train].max() <= samples.timestamp[valid].min()
    assert samples.timestamp[valid].max() <= samples.timestamp[test].min()
    assert np.all(np.diff(samples.timestamp) >= 0)


def test_history_is_strictly_earlier_and_same_user(samples):
    h = samples.history
    rows, cols = np.nonzero(h >= 0)
    past = h[rows, cols]
    assert np.all(samples.timestamp[past] < samples.timestamp[rows])
    assert np.all(samples.user[past] == samples.user[rows])
    # oldest first: timestamps along each row never decrease
    ts = np.where(h >= 0, samples.timestamp[np.maximum(h, 0)], -1)
    assert np.all(np.diff(ts, axis=1) >= 0)
    # the window really is the *last* K: no later earlier-than-target interaction was left out
    row = int(samples.indices("test")[123])
    user_rows = np.flatnonzero((samples.user == samples.user[row]) & (samples.timestamp < samples.timestamp[row]))
    expected = user_rows[np.argsort(samples.timestamp[user_rows], kind="stable")][-10:]
    assert sorted(h[row][h[row] >= 0].tolist()) == sorted(expected.tolist())


def test_vocabularies_come_from_training_split_only(samples):
    spec = samples.feature_spec()
    train_items = set(samples.item[samples.indices("train")])
    assert set(spec.vocabularies["item_id"].values) == train_items
    unseen_test_users = ~np.isin(samples.user[samples.indices("test")], samples.user[samples.indices("train")])
    assert unseen_test_users.mean() == pytest.approx(0.86, abs=0.01)
    inputs = samples.encode(spec, samples.indices("test"))
    assert (inputs["categorical"][unseen_test_users, 0] == 1).all()  # OOV user index


def test_prompt_parts_follow_history(samples):
    row = int(samples.indices("test")[0])
    history, target = samples.prompt_parts(row)
    assert len(history) == int((samples.history[row] >= 0).sum())
    prompt = samples.prompt_template().render(history, target)
    assert prompt.endswith("\n") and target.title in prompt.splitlines()[-1]


def test_item_statistics_come_from_the_training_split(samples):
    train = samples.indices("train")
    item = samples.item[train][0]
    ratings = samples.rating[train][samples.item[train] == item]
    mean, count, liked = samples.item_stats[item]
    assert count == len(ratings) and mean == pytest.approx(ratings.mean())
    assert liked == pytest.approx((ratings >= samples.raw.like_threshold).mean())
    only_later = set(samples.item[samples.indices("test")]) - set(samples.item[train])
    assert only_later and not (only_later & set(samples.item_stats))  # nothing learnt from the future
    row = int(samples.indices("test")[0])
    history, target = samples.prompt_parts(row)
    _, count, liked = samples.item_stats[samples.item[row]]
    assert samples.prompt_template().suffix(target).endswith(f"; {verdict(liked)}\n")
    assert samples.prompt_template(version=4).suffix(target).endswith(f"; {reception(liked)}\nAnswer:")
    assert f"({liked:.0%} of {count})" in samples.prompt_template(version=3).suffix(target)
    prefix = samples.prompt_template().prefix(history)
    assert "people" not in prefix  # the shared prefix stays short: no catalog statistics in the history
    liked_in_history = sum(h.rating >= samples.raw.like_threshold for h in history)
    assert prefix.endswith(f"The user liked {liked_in_history} of these {len(history)} movies.\n"
                           "Will the user like the target movie?\nTarget movie:")  # fmt: skip


def test_histories_windowed_a_run_of_users_at_a_time_equal_the_whole_tables(ml100k_dir, monkeypatch):
    """Windowing bounded runs of whole users (what keeps 25M rows' temporaries small) changes nothing."""
    import training.data.samples as samples_module

    raw = load_dataset("movielens-100k", ml100k_dir)
    whole = build_samples(raw, history_length=10).history
    monkeypatch.setattr(samples_module, "HISTORY_CHUNK", 997)
    chunked = build_samples(raw, history_length=10).history
    assert whole.dtype == np.int32 and (whole >= 0).sum() > 900_000
    np.testing.assert_array_equal(whole, chunked)
