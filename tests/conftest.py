"""Shared fixtures: the real MovieLens-100K beside the checkout, and small generated data sets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
#: the user's own corella cache (tests otherwise run on a fresh one each): downloads kept across runs
USER_HOME = Path(os.environ.get("CORELLA_HOME", Path.home() / ".cache" / "corella")).expanduser()


@pytest.fixture(autouse=True)
def corella_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("corella_home")
    monkeypatch.setenv("CORELLA_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The real data set, read in place (never copied into the repository): $CORELLA_ML100K, else
    the shared copy beside the checkout, else corella's data cache, else fetched into that cache the
    way `make quickstart` does (GroupLens, or the RecBole wheel from PyPI)."""
    from runtime.paths import data_cache

    if os.environ.get("CORELLA_ML100K"):
        candidates = [Path(os.environ["CORELLA_ML100K"])]
    else:
        candidates = [REPO.parent / "shared" / "data" / "ml-100k", data_cache("movielens-100k")]
    for path in candidates:
        if (path / "ml-100k.inter").exists():
            return path
    if os.environ.get("CORELLA_ML100K"):
        raise RuntimeError(f"MovieLens-100K not found at {candidates[0]} (CORELLA_ML100K)")
    from training.data.registry import fetch_dataset

    folder, _ = fetch_dataset("movielens-100k")
    return folder


GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")


def write_synthetic_recbole(folder: Path, users: int = 60, items: int = 40, per_user: int = 12, seed: int = 0) -> Path:
    """A small RecBole-format data set with a learnable signal.

    Everyone likes Drama and each user loves one more genre: those get 5 stars, the rest 1-3
    (10% noise). Each user's interactions spread over the whole time range, so users recur
    across the temporal split and a CRM can beat chance by a wide margin.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    item_genre = rng.integers(0, len(GENRES), size=items)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    t0 = 880_000_000
    for u in range(1, users + 1):
        favourite = rng.integers(0, len(GENRES))
        for k, i in enumerate(rng.choice(items, size=per_user, replace=False)):
            start = t0 + int(rng.integers(0, 86_400))
            liked = item_genre[i] in (favourite, GENRES.index("Drama"))
            rating = 5 if liked else int(rng.integers(1, 4))
            if rng.random() < 0.1:
                rating = int(rng.integers(1, 6))
            lines.append(f"{u}\t{i + 1}\t{rating}\t{start + 86_400 * k}")
    (folder / "ml-100k.inter").write_text("\n".join(lines) + "\n")
    user_lines = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    for u in range(1, users + 1):
        user_lines.append(f"{u}\t{20 + u % 40}\t{'MF'[u % 2]}\t{('student', 'writer', 'other')[u % 3]}\t{10000 + u}")
    (folder / "ml-100k.user").write_text("\n".join(user_lines) + "\n")
    item_lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for i in range(items):
        item_lines.append(f"{i + 1}\tMovie Number {i + 1}\t{1980 + i % 20}\t{GENRES[item_genre[i]]}")
    (folder / "ml-100k.item").write_text("\n".join(item_lines) + "\n")
    return folder


@pytest.fixture
def synthetic_dir(tmp_path: Path) -> Path:
    return write_synthetic_recbole(tmp_path / "synthetic", users=120, items=40, per_user=15)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole CoReLLa run (3 stages) on generated data and a tiny LLaMA GGUF."""
    from training.pipeline import CoReLLaConfig, train_corella

    from .tiny_llm import write_tiny_llama_gguf

    root = tmp_path_factory.mktemp("trained")
    data = write_synthetic_recbole(root / "data", users=120, items=40, per_user=15)
    gguf_path = write_tiny_llama_gguf(root / "tiny-llama.gguf")
    config = CoReLLaConfig(
        source=str(data), history_length=5, llm=str(gguf_path), crm={"embedding_dim": 8},
        crm_train={"epochs": 2, "batch_size": 64},
        joint={"stage2_samples": 24, "stage3_samples": 8, "batch_size": 4, "group_size": 4, "llm_learning_rate": 3e-3},
        eval_samples=40, max_prompt_tokens=400,
    )  # fmt: skip
    train_corella(root / "run", config, show_progress=False)
    return root / "run"


@pytest.fixture(scope="session")
def bundle(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """That run exported at q8_0 (the q4_k_m comparison is measured too)."""
    from export.bundle import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(trained_run, out, ExportConfig(quant="q8_0", parity_prompts=16, routed_samples=20))
    return out


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory):
    """A real PostgreSQL server (Debian's binaries: initdb, pg_ctl) for the session, stopped at its end;
    where none can be started, the tests that need it skip, saying why."""
    from benchmarks.postgres import LocalPostgres, postgres_missing

    missing = postgres_missing()
    if missing:
        pytest.skip(missing)
    server = LocalPostgres(tmp_path_factory.mktemp("postgres")).start()
    try:
        yield server
    finally:
        server.stop()
