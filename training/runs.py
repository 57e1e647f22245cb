"""A training run folder and its stage 1 (the CRM), as the CLI and the quickstart call it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime import __version__
from runtime.features import FeatureSpec
from training.baselines import two_number_baseline
from training.checkpoint import read_json, write_json
from training.crm_trainer import CRMTrainConfig, evaluate_crm, predict, train_crm
from training.data import SampleTable, build_samples, load_dataset
from training.dcnv2 import DCNv2, DCNv2Config

__all__ = ["DataConfig", "PreparedData", "prepare_data", "run_crm_stage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "movielens-100k"
    source: str | None = None
    history_length: int = 10
    skip_malformed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class PreparedData:
    samples: SampleTable
    spec: FeatureSpec
    inputs: dict[str, np.ndarray]

    def rows(self, split: str) -> np.ndarray:
        return self.samples.indices(split)

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {name: values[rows] for name, values in self.inputs.items()}


def prepare_data(config: DataConfig, spec: FeatureSpec | None = None) -> PreparedData:
    """Load, split, build (or reuse) the feature spec and encode every sample."""
    raw = load_dataset(
        config.dataset,
        Path(config.source) if config.source else None,
        skip_malformed=config.skip_malformed,
    )
    samples = build_samples(raw, history_length=config.history_length)
    spec = spec or samples.feature_spec()
    return PreparedData(samples, spec, samples.encode(spec))


def run_crm_stage(
    out: Path,
    data_config: DataConfig,
    model_config: DCNv2Config | None = None,
    train_config: CRMTrainConfig | None = None,
    resume: bool = False,
    show_progress: bool = True,
    threads: int | None = None,
    prepared: PreparedData | None = None,
    device: torch.device | None = None,
) -> tuple[DCNv2, PreparedData, dict[str, Any]]:
    """Stage 1 into `out/crm` on `device` (default: the CPU): train, evaluate on the test split,
    write `out/crm/metrics.json`."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    started = time.perf_counter()
    run_file = out / "run.json"
    if resume and run_file.exists():
        saved = read_json(run_file)["data"]
        data_config = DataConfig(**saved)
    prepared = prepared or prepare_data(data_config)
    samples, spec = prepared.samples, prepared.spec
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_file, {"corella_version": __version__, "data": data_config.to_dict()})
    train_rows, valid_rows, test_rows = (prepared.rows(s) for s in ("train", "valid", "test"))
    model, fit = train_crm(
        out / "crm",
        spec,
        prepared.take(train_rows),
        samples.label[train_rows],
        prepared.take(valid_rows),
        samples.label[valid_rows],
        model_config,
        train_config,
        resume=resume,
        show_progress=show_progress,
        device=device,
    )
    test_probabilities = predict(model, prepared.take(test_rows))
    test_users_seen = np.isin(samples.user[test_rows], samples.user[train_rows])
    metrics = {
        "dataset": data_config.dataset,
        "split_sizes": {"train": len(train_rows), "valid": len(valid_rows), "test": len(test_rows)},
        "test_share_unseen_users": float(1.0 - test_users_seen.mean()),
        "fit": {k: v for k, v in fit.items() if k != "history"},
        "test": evaluate_crm(samples.label[test_rows], test_probabilities),
        "baseline": {k: v for k, v in two_number_baseline(samples).items() if k != "probabilities"},
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "crm" / "metrics.json", metrics)
    return model, prepared, metrics
