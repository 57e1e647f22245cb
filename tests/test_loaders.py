"""Every built-in data set's shipped spec on small files written here in the real format, malformed
lines included: one loader path (training/data/tables.py) reads them all."""

import gzip
import json
import zipfile
from pathlib import Path

import pytest

from runtime.errors import ConfigError, DataError, DataSourceError
from training.data.registry import fetch_dataset, load_dataset
from training.data.tables import kcore_filter


def load_movielens_100k(folder, skip_malformed=False):
    return load_dataset("movielens-100k", folder, skip_malformed=skip_malformed)


def load_movielens_1m(folder):
    return load_dataset("movielens-1m", folder)


def load_movielens_csv(folder):
    return load_dataset("movielens-latest", folder)


def _write(path: Path, text: str, encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))


def _grouplens_100k(folder: Path, extra_data: str = "") -> Path:
    _write(
        folder / "u.data",
        "1\t10\t5\t881250949\n2\t10\t2\t881250950\n1\t11\t3\t881250951\n" + extra_data,
    )
    _write(folder / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = ["0"] * 19
    comedy = flags.copy()
    comedy[5] = "1"
    _write(
        folder / "u.item",
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(comedy)}\n"
        f"11|Café Society (1995)|01-Jan-1995||http://x|{'|'.join(flags)}\n",
        encoding="latin-1",
    )
    return folder


def test_movielens_100k_grouplens_format(tmp_path):
    raw = load_movielens_100k(_grouplens_100k(tmp_path / "ml"))
    assert len(raw.interactions) == 3
    assert raw.interactions["timestamp"].dtype == "int64"
    assert raw.users.loc["1"].to_dict() == {
        "age": "18",
        "gender": "M",
        "occupation": "technician",
        "zip": "85",
    }
    assert raw.items.loc["10"].title == "Toy Story" and raw.items.loc["10"].year == "1995"
    assert raw.items.loc["10"].tags == ("Comedy",)
    assert raw.items.loc["11"].title == "Café Society"  # latin-1 decoded
    assert raw.labels().tolist() == [1.0, 0.0, 0.0]


def test_malformed_line_names_file_and_line_or_is_skipped(tmp_path):
    folder = _grouplens_100k(tmp_path / "ml", extra_data="3\t12\tfive\t881250952\n")
    with pytest.raises(DataError, match=r"u\.data: row 4, column 'rating': a rating must be a number \('five'\)"):
        load_movielens_100k(folder)
    raw = load_movielens_100k(folder, skip_malformed=True)
    assert len(raw.interactions) == 3 and raw.errors.total == 1


def test_movielens_100k_recbole_atomic_matches_real_files(ml100k_dir):
    raw = load_movielens_100k(ml100k_dir)
    assert len(raw.interactions) == 100_000
    assert raw.interactions["user"].nunique() == 943 and raw.interactions["item"].nunique() == 1682
    assert raw.items.loc["1"].tags == ("Animation", "Children's", "Comedy")


def test_movielens_1m_format(tmp_path):
    folder = tmp_path / "ml-1m"
    _write(folder / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n", "latin-1")
    _write(folder / "users.dat", "1::F::1::10::48067\n", "latin-1")
    _write(
        folder / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n",
        "latin-1",
    )
    raw = load_movielens_1m(folder)
    assert raw.users.loc["1"].to_dict() == {"age": "1", "gender": "F", "occupation": "10", "zip": "48"}
    assert raw.items.loc["661"].tags == ("Animation", "Children's", "Musical")
    assert raw.items.loc["1193"].year == "1975"
    _write(folder / "ratings.dat", "1::1193::5::978300760\n1::661\n", "latin-1")
    with pytest.raises(DataError, match=r"ratings\.dat: line 2: expected 4 fields, found 2"):
        load_movielens_1m(folder)


def test_movielens_csv_format_half_stars_and_quoted_titles(tmp_path):
    folder = tmp_path / "ml-latest"
    _write(
        folder / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,1,4.5,964982703\n1,2,3.5,964981247\n",
    )
    _write(
        folder / "movies.csv",
        'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama|Romance\n'
        "2,Jumanji (1995),(no genres listed)\n",
    )
    raw = load_movielens_csv(folder)
    assert raw.interactions["rating"].tolist() == [4.5, 3.5]
    assert raw.items.loc["1"].title == "American President, The" and raw.items.loc["2"].tags == ()
    assert raw.users.empty and raw.user_attribute_names() == []
    _write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.5\n")
    with pytest.raises(DataError, match=r"ratings\.csv: line 2: expected 4 fields, found 3"):
        load_movielens_csv(folder)


def test_amazon_books_json_lines_gzip_and_kcore(tmp_path):
    folder = tmp_path / "amazon"
    reviews = [
        {
            "reviewerID": f"r{u}",
            "asin": f"b{i}",
            "overall": 5.0 if (u + i) % 2 else 3.0,
            "unixReviewTime": 1000 + u * 10 + i,
        }
        for u in range(4)
        for i in range(3)
    ] + [{"reviewerID": "lonely", "asin": "b0", "overall": 5.0, "unixReviewTime": 5}]
    folder.mkdir()
    with gzip.open(folder / "Books.json.gz", "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in reviews) + "\n")
    _write(
        folder / "meta_Books.json",
        "\n".join(
            json.dumps({"asin": f"b{i}", "title": f"Book {i}", "category": ["Books", "Fiction"]}) for i in range(3)
        )
        + "\n",
    )
    raw = load_dataset("amazon-books", folder)
    assert "lonely" in set(raw.interactions["user"])
    assert raw.like_threshold == 5.0 and raw.item_noun == "book"
    assert raw.items.loc["b1"].tags == ("Fiction",)
    assert set(kcore_filter(raw.interactions, 2)["user"]) == {"r0", "r1", "r2", "r3"}
    _write(folder / "meta_Books.json", '{"asin": "b0", "title": "x"}\n{broken\n')
    with pytest.raises(DataError, match=r"meta_Books\.json: line 2: not a JSON object"):
        load_dataset("amazon-books", folder)


def test_kcore_filter_is_iterative():
    import pandas as pd

    frame = pd.DataFrame(
        {
            "user": ["a", "a", "b", "b", "c"],
            "item": ["x", "y", "x", "y", "z"],
            "rating": 5.0,
            "timestamp": range(5),
        }
    )
    assert set(kcore_filter(frame, 2)["user"]) == {"a", "b"}


def test_fetch_from_folder_and_zip(ml100k_dir, tmp_path, corella_home):
    folder, origin = fetch_dataset("movielens-100k", ml100k_dir)
    assert folder == corella_home / "data" / "movielens-100k" and origin == str(ml100k_dir)
    assert len(load_dataset("movielens-100k").interactions) == 100_000
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in ml100k_dir.iterdir():
            zf.write(path, f"ml-100k/{path.name}")
    fetch_dataset("movielens-100k", archive)
    assert len(load_dataset("movielens-100k").interactions) == 100_000


def test_fetch_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown data set 'nope'.*movielens-100k"):
        fetch_dataset("nope")
    with pytest.raises(DataSourceError, match="no such file"):
        fetch_dataset("movielens-100k", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no movielens-100k files .looked for u.data or ml-100k.inter"):
        fetch_dataset("movielens-100k", tmp_path / "empty")
    with pytest.raises(DataSourceError, match="corella data fetch movielens-1m"):
        load_dataset("movielens-1m")
