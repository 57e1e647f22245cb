"""Catalogs with holes never crash a run: generated MovieLens CSV releases with titles without a
year, no genres, empty or odd titles, and ratings of items the catalog does not list go through
the loader, the samples, the feature encoding and the prompt."""

import csv
import io
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.prompt import PromptTemplate, verdict
from training.data.registry import load_dataset
from training.data.samples import build_samples

titles = st.one_of(
    st.just(""),
    st.just("Babylon 5"),  # no year, as in real MovieLens CSV releases
    st.text(min_size=1, max_size=30).filter(lambda t: "\n" not in t and "\r" not in t),
    st.builds(
        lambda t, y: f"{t} ({y})", st.text(min_size=1, max_size=20).filter(str.isprintable), st.integers(1890, 2030)
    ),  # fmt: skip
)
genres = st.one_of(
    st.just("(no genres listed)"), st.just(""), st.lists(st.sampled_from(["Drama", "Comedy", "Sci-Fi"]), max_size=3)
)


def _write_release(folder: Path, movies: list[tuple[str, str]], ratings: list[tuple[int, int, float, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["movieId", "title", "genres"])
    for movie_id, (title, genre) in enumerate(movies, start=1):
        writer.writerow([movie_id, title, genre if isinstance(genre, str) else "|".join(genre)])
    (folder / "movies.csv").write_text(out.getvalue(), encoding="utf-8")
    lines = ["userId,movieId,rating,timestamp"] + [f"{u},{i},{r},{t}" for u, i, r, t in ratings]
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    movies=st.lists(st.tuples(titles, genres), min_size=1, max_size=8),
    ratings=st.lists(
        st.tuples(
            st.integers(1, 5), st.integers(1, 12), st.sampled_from([0.5, 2.0, 3.5, 4.0, 5.0]), st.integers(0, 50)
        ),
        min_size=3,
        max_size=60,
    ),  # fmt: skip  (item ids up to 12: some are not in the catalog)
)
def test_catalogs_with_holes_load_encode_and_render(tmp_path_factory, movies, ratings):
    folder = tmp_path_factory.mktemp("release")
    _write_release(folder, movies, ratings)
    raw = load_dataset("movielens-latest", folder)
    assert raw.unlisted_items() == sum(i > len(movies) for _, i, _, _ in ratings)
    items = raw.items
    assert all(isinstance(t, str) and t for t in items["title"])
    assert all(y is None or (isinstance(y, str) and y) for y in items["year"])
    assert all(isinstance(t, tuple) for t in items["tags"])
    samples = build_samples(raw, history_length=3)
    spec = samples.feature_spec()
    inputs = samples.encode(spec)
    assert np.isfinite(inputs["stats"]).all() and len(inputs["categorical"]) == len(ratings)
    template = PromptTemplate(item_stats=True)
    for row in range(len(samples)):
        history, target = samples.prompt_parts(row)
        prompt = template.render(history, target)
        assert prompt.count("Target movie: ") == 1 and prompt.endswith(f" {target.brief(stats=True, words=verdict)}\n")
