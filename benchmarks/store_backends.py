"""The live store's backends side by side: CRM-only requests at 32 clients against `corella serve`
on its embedded SQLite store and on a PostgreSQL one (a throwaway local server), same bundle.

    python -m benchmarks.store_backends BUNDLE [--clients 32] [--seconds 20] [--candidates 20] [--out DIR]

Each backend serves with --no-llm (what is measured is the store under the request path) in turn,
never both at once; users are drawn from the bundle's catalog of users, every request names one.
Prints p50 / p99 latency and requests per second for each, and PostgreSQL's over SQLite's; writes
store_backends.json. Do not run it beside training or tests: the box has 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import closed_loop, corella_serve_command, free_port, server_process
from benchmarks.postgres import LocalPostgres


def _measure(bundle: Path, out: Path, name: str, clients: int, seconds: float, candidates: int,
             env: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    from runtime.artifacts.bundle import load_bundle
    from runtime.artifacts.store import FeatureStore

    snapshot = FeatureStore(load_bundle(bundle).store_file, readonly=True)
    try:
        users, items = snapshot.user_ids(), snapshot.item_ids()
    finally:
        snapshot.close()
    rng = np.random.default_rng(0)

    def body() -> tuple[str, dict[str, Any]]:
        chosen = rng.choice(len(items), size=min(candidates, len(items)), replace=False)
        return "crm", {"user_id": users[int(rng.integers(len(users)))], "mode": "crm",
                       "candidates": [{"item_id": items[int(i)]} for i in chosen]}  # fmt: skip

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = corella_serve_command(bundle, port, out / f"state-{name}") + ["--no-llm"]
    with server_process(command, f"{base}/readyz", out / f"serve-{name}.log", env=env):
        closed_loop(base, clients, 3.0, body)  # warm: the catalog's caches and the pool
        run = closed_loop(base, clients, seconds, body)
    summary = run.summary(None)
    return {k: summary[k] for k in ("requests", "statuses", "server_errors", "requests_per_second", "p50_ms",
                                    "p99_ms")} | {"backend": name}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/store-backends"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [_measure(args.bundle, args.out, "sqlite", args.clients, args.seconds, args.candidates, {})]
    with tempfile.TemporaryDirectory(prefix="corella-pg-") as folder:
        postgres = LocalPostgres(Path(folder) / "pg").start()
        try:
            url = postgres.database("bench")
            rows.append(_measure(args.bundle, args.out, "postgresql", args.clients, args.seconds, args.candidates,
                                 {"CORELLA_STORE_URL": url}))  # fmt: skip
        finally:
            postgres.stop()
    sqlite, pg = rows
    ratios = {"p50": pg["p50_ms"] / sqlite["p50_ms"], "requests_per_second":
              pg["requests_per_second"] / sqlite["requests_per_second"]}  # fmt: skip
    print(f"{'backend':<12}{'requests':>10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'5xx':>6}")
    for row in rows:
        print(
            f"{row['backend']:<12}{row['requests']:>10}{row['requests_per_second']:>10.1f}{row['p50_ms']:>10.1f}"
            f"{row['p99_ms']:>10.1f}{row['server_errors']:>6}"
        )
    print(
        f"PostgreSQL / SQLite: p50 x{ratios['p50']:.2f}, requests/s x{ratios['requests_per_second']:.2f} "
        f"({args.clients} clients, {args.candidates} candidates a request, CRM only, {os.cpu_count()} cores)"
    )
    (args.out / "store_backends.json").write_text(
        json.dumps({"rows": rows, "ratios": ratios, "clients": args.clients, "seconds": args.seconds}, indent=1)
    )


if __name__ == "__main__":
    main()
