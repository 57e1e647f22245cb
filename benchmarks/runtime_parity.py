"""Hybrid AUC through a running `corella serve` vs the export-time figure in the bundle's manifest.

    corella serve bundles/ml100k --port 8000 &
    python -m benchmarks.runtime_parity bundles/ml100k runs/ml100k --url http://127.0.0.1:8000

Sends the training report's evaluation subset (the same test samples, each with its own history and
attributes, as a one-candidate request) over HTTP and compares the AUC with manifest.metrics.hybrid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import numpy as np

from export.bundle import sample_request
from runtime.artifacts.bundle import load_bundle
from runtime.quality import summarize
from training.checkpoint import read_json
from training.crm_trainer import load_crm
from training.pipeline import evaluation_rows
from training.runs import DataConfig, prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    config = read_json(args.run / "run.json")
    _, spec = load_crm(args.run / "final" / "crm")
    prepared = prepare_data(DataConfig(**config["data"]), spec)
    rows = evaluation_rows(prepared, config["config"]["eval_samples"], config["config"]["joint"]["seed"])
    scores, routes = [], []
    with httpx.Client(base_url=args.url, timeout=120) as client:
        for row in rows:
            body = sample_request(prepared.samples, int(row)) | {"deadline_ms": 600_000}
            answer = client.post("/v1/predict", json=body).raise_for_status().json()
            scores.append(answer["predictions"][0]["score"])
            routes.append(answer["predictions"][0]["route"])
    http = summarize(prepared.samples.label[rows], np.array(scores))
    exported = bundle.manifest["metrics"]["hybrid"]
    print(json.dumps({"samples": len(rows), "routed_http": sum(r != "crm" for r in routes),
                      "routed_export": exported["routed"], "auc_http": http["auc"], "auc_export": exported["auc"],
                      "abs_difference": abs(http["auc"] - exported["auc"])}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
