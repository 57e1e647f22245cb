"""Importing 25M interactions, and their running statistics: wall time and peak memory.

    python -m benchmarks.data_scale --out bench/data-scale [--rows 25000000] [--work /tmp/corella-25m]

Writes a data set in MovieLens-25M's shape (ratings.csv: userId,movieId,rating,timestamp with half
stars; movies.csv with genres; 162,541 users, 62,423 movies, popularity and activity long-tailed)
into --work (kept: a second run reuses it), then runs, each in its own process so that its peak RSS
is its own:

1. `corella data import` of its spec (checks every value, writes the normalized Parquet copy);
2. the statistics: the import read back, the temporal split and histories (`build_samples`), and
   the running user, item and user-by-genre statistics of every interaction (what the CRM reads).

Writes data_scale.json and data_scale.md into --out. Never run it beside a training run or tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

USERS, MOVIES = 162_541, 62_423
GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western")  # fmt: skip
SPEC = """
name = "ml25m-shape"
description = "generated in MovieLens-25M's shape by benchmarks/data_scale.py"
[words]
noun = "movie"
[interactions]
path = "ratings.csv"
user = "userId"
item = "movieId"
timestamp = "timestamp"
rating = "rating"
like_threshold = 4
rating_range = [0.5, 5]
[items]
path = "movies.csv"
id = "movieId"
title = "title"
year_from_title = true
tags = "genres"
tag_separator = "|"
"""


def generate(folder: Path, rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "done").exists() and (folder / "done").read_text() == str(rows):
        return
    rng = np.random.default_rng(seed)
    genre_count = rng.integers(1, 4, size=MOVIES)
    titles = [f"Movie {m} ({1900 + m % 120})" for m in range(1, MOVIES + 1)]
    genres = ["|".join(rng.choice(GENRES, size=c, replace=False)) for c in genre_count]
    pacsv.write_csv(pa.table({"movieId": np.arange(1, MOVIES + 1), "title": titles, "genres": genres}),
                    folder / "movies.csv")  # fmt: skip
    popularity = 1.0 / np.arange(1, MOVIES + 1) ** 0.9
    popularity /= popularity.sum()
    activity = 1.0 / np.arange(1, USERS + 1) ** 0.7
    activity /= activity.sum()
    stars = np.arange(1, 11) / 2
    star_p = np.array([1.6, 3.3, 1.6, 6.6, 4.9, 19.6, 13.3, 26.6, 8.6, 14.4])
    with pacsv.CSVWriter(folder / "ratings.csv.partial", pa.schema([("userId", pa.int64()), ("movieId", pa.int64()),
                                                                    ("rating", pa.float64()),
                                                                    ("timestamp", pa.int64())])) as writer:  # fmt: skip
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            writer.write_table(pa.table({
                "userId": rng.choice(USERS, size=n, p=activity) + 1,
                "movieId": rng.choice(MOVIES, size=n, p=popularity) + 1,
                "rating": rng.choice(stars, size=n, p=star_p / star_p.sum()),
                "timestamp": rng.integers(789_652_009, 1_574_327_703, size=n),
            }))  # fmt: skip
    os.replace(folder / "ratings.csv.partial", folder / "ratings.csv")
    (folder / "spec.toml").write_text(SPEC, encoding="utf-8")
    (folder / "done").write_text(str(rows))


def _child(code: str, env: dict[str, str]) -> dict[str, Any]:
    """Run `code` in a fresh Python: what it printed (JSON), its wall time and its own peak RSS (GiB)."""
    started = time.perf_counter()
    code += (
        "\nimport resource\npeak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps(out | {'peak_rss_gib': round(peak / 2**20, 2)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"seconds": round(seconds, 1)}


IMPORT = """
import json
from pathlib import Path
from training.data.registry import imported_folder
from training.data.spec import DatasetSpec
from training.data.tables import import_dataset
spec = DatasetSpec.load(Path({spec!r}))
meta = import_dataset(spec, imported_folder(spec.name))
out = {{"counts": meta["counts"]}}
"""

STATISTICS = """
import json, time
t = time.perf_counter()
from training.data.registry import load_dataset
from training.data.samples import build_samples
raw = load_dataset("ml25m-shape")
loaded = time.perf_counter()
samples = build_samples(raw, history_length=10)
split = time.perf_counter()
spec = samples.feature_spec()
built = time.perf_counter()
stats = samples.statistics(spec, samples.indices("test")[:10])
done = time.perf_counter()
out = {{"rows": len(samples), "load_s": round(loaded - t, 1), "split_and_histories_s": round(split - loaded, 1),
       "vocabularies_s": round(built - split, 1), "running_statistics_s": round(done - built, 1)}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/data-scale"))
    parser.add_argument("--rows", type=int, default=25_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/corella-25m"))
    args = parser.parse_args()
    started = time.perf_counter()
    generate(args.work, args.rows)
    generated = time.perf_counter() - started
    env = dict(os.environ, CORELLA_HOME=str(args.work / "home"))
    imported = _child(IMPORT.format(spec=str(args.work / "spec.toml")), env)
    statistics = _child(STATISTICS.format(), env)
    results = {
        "rows": args.rows, "generate_s": round(generated, 1), "import": imported, "statistics": statistics,
        "machine": f"{os.cpu_count()} cores", "command": f"python -m benchmarks.data_scale --rows {args.rows}",
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_scale.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"# Importing {args.rows:,} interactions (MovieLens-25M's shape), {results['machine']}",
        "",
        "| step | wall s | peak RSS GiB |",
        "| --- | ---: | ---: |",
        f"| `corella data import` (check + Parquet) | {imported['seconds']} | {imported['peak_rss_gib']} |",
        f"| load + split + histories + vocabularies + running statistics | {statistics['seconds']} | "
        f"{statistics['peak_rss_gib']} |",
        "",
        f"statistics in detail: load {statistics['load_s']} s, split and histories "
        f"{statistics['split_and_histories_s']} s, vocabularies {statistics['vocabularies_s']} s, running statistics "
        f"{statistics['running_statistics_s']} s",
    ]  # fmt: skip
    (args.out / "data_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
