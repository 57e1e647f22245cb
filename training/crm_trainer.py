"""Stage 1: train the DCNv2 CRM on the training split, early-stopped on validation AUC."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from runtime.features import INPUT_NAMES, OOV, FeatureSpec
from runtime.quality import auc, entropy_deciles, summarize
from training.checkpoint import (
    load_state,
    load_weights,
    numpy_rng_state,
    read_json,
    save_state,
    save_weights,
    set_numpy_rng_state,
    write_json,
)
from training.dcnv2 import DCNv2, DCNv2Config, Standardize

__all__ = ["CRMTrainConfig", "set_seed", "to_tensors", "predict", "train_crm", "load_crm"]

log = logging.getLogger(__name__)


class CRMTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(20, ge=1, le=1000, description="upper bound on epochs")
    batch_size: int = Field(1024, ge=1, le=1 << 16, description="mini-batch size")
    learning_rate: float = Field(5e-4, gt=0, le=1.0, description="Adam learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay (L2)")
    lr_decay: float = Field(
        0.8, gt=0.0, le=1.0, description="learning rate multiplier after every epoch (1 = constant)"
    )
    patience: int = Field(2, ge=0, le=100, description="epochs without validation AUC gain before stopping")
    id_dropout: float = Field(
        0.3,
        ge=0.0,
        lt=1.0,
        description="share of training rows whose user id is replaced by the out-of-vocabulary id, so that "
        "the OOV embedding learns what an unseen user (most of a temporal split's test) looks like",
    )
    seed: int = Field(42, description="seed of every random number generator")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_tensors(inputs: Mapping[str, np.ndarray], rows: np.ndarray | slice | None = None,
               device: torch.device | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The model's input tensors of `rows` (all rows by default), on `device` (default: the CPU)."""
    sel = slice(None) if rows is None else rows
    tensors = {name: torch.from_numpy(np.ascontiguousarray(inputs[name][sel])) for name in INPUT_NAMES}
    if device is None or device.type == "cpu":
        return tensors
    return {name: tensor.to(device, non_blocking=True) for name, tensor in tensors.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model: DCNv2, inputs: Mapping[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
    """P(click) for every row of `inputs`, computed on the model's device."""
    model.eval()
    device = model_device(model)
    n = len(inputs["categorical"])
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, batch_size):
        batch = to_tensors(inputs, slice(start, start + batch_size), device)
        out[start : start + batch_size] = torch.sigmoid(model(**batch)).double().cpu().numpy()
    return out


def hide_ids(categorical: torch.Tensor, rate: float) -> torch.Tensor:
    """A copy of the categorical input with each row's user id (column 0) set to OOV at `rate`."""
    hidden = categorical.clone()
    mask = torch.rand(len(hidden)) < rate
    hidden[mask, 0] = OOV
    return hidden


def _progress(disable: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=disable,
    )


def train_crm(
    out_dir: Path,
    spec: FeatureSpec,
    train_inputs: Mapping[str, np.ndarray],
    train_labels: np.ndarray,
    valid_inputs: Mapping[str, np.ndarray],
    valid_labels: np.ndarray,
    model_config: DCNv2Config | None = None,
    train_config: CRMTrainConfig | None = None,
    resume: bool = False,
    show_progress: bool = True,
    device: torch.device | None = None,
) -> tuple[DCNv2, dict[str, Any]]:
    """Train on `device` (default: the CPU), checkpoint after every epoch, keep the best weights by
    validation AUC.

    `out_dir` receives config.json, features.json, model.safetensors (the best epoch),
    last.safetensors + state.pt (to resume) and history.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "state.pt"
    if resume and (out_dir / "config.json").exists():
        # the saved architecture must match the saved weights; the caller may extend training
        saved = read_json(out_dir / "config.json")
        model_config = DCNv2Config(**saved["model"])
        train_config = train_config or CRMTrainConfig(**saved["train"])
    model_config = model_config or DCNv2Config()
    train_config = train_config or CRMTrainConfig()
    set_seed(train_config.seed)
    model = DCNv2(spec, model_config)
    if isinstance(model.stats_norm, Standardize):
        model.stats_norm.fit(torch.from_numpy(np.asarray(train_inputs["stats"], dtype=np.float32)))
    model.to(device or torch.device("cpu"))
    optimizer = torch.optim.Adam(
        model.parameters(), lr=train_config.learning_rate, weight_decay=train_config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=train_config.lr_decay)
    history: list[dict[str, float]] = []
    start_epoch, best_auc, stale = 0, -1.0, 0
    if resume and state_path.exists():
        start_epoch, best_auc, stale, history = _resume(out_dir, model, optimizer, scheduler)
    write_json(
        out_dir / "config.json",
        {"model": model_config.model_dump(), "train": train_config.model_dump()},
    )
    spec.save(out_dir / "features.json")

    labels = torch.from_numpy(train_labels.astype(np.float32)).to(model_device(model))
    steps = (len(train_labels) + train_config.batch_size - 1) // train_config.batch_size
    done = stale > train_config.patience or start_epoch >= train_config.epochs
    with _progress(not show_progress) as progress:
        for epoch in range(start_epoch, train_config.epochs if not done else start_epoch):
            task = progress.add_task(f"CRM epoch {epoch + 1}", total=steps, status="")
            started = time.perf_counter()
            report = partial(_advance, progress, task)
            running = _train_epoch(model, optimizer, train_inputs, labels, train_config, report)
            scheduler.step()
            valid_auc = auc(valid_labels, predict(model, valid_inputs))
            record = {"epoch": epoch + 1, "train_loss": running, "valid_auc": valid_auc,
                      "seconds": time.perf_counter() - started}  # fmt: skip
            history.append(record)
            improved = valid_auc > best_auc
            if improved:
                best_auc, stale = valid_auc, 0
                save_weights(out_dir / "model.safetensors", model)
            else:
                stale += 1
            progress.update(
                task,
                status=f"loss {running:.4f} valid AUC {valid_auc:.4f}" + (" *" if improved else ""),
            )
            save_weights(out_dir / "last.safetensors", model)
            save_state(state_path, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                "best_auc": best_auc, "stale": stale, "history": history, "torch_rng": torch.get_rng_state(),
                "numpy_rng": numpy_rng_state(),
            })  # fmt: skip
            write_json(out_dir / "history.json", history)
            if stale > train_config.patience:
                break
    load_weights(out_dir / "model.safetensors", model)
    model.eval()
    return model, {"best_valid_auc": best_auc, "epochs_run": len(history), "history": history}


def _advance(progress: Progress, task: Any, loss: float) -> None:
    progress.update(task, advance=1, status=f"loss {loss:.4f}")


def _train_epoch(model: DCNv2, optimizer: torch.optim.Optimizer, inputs: Mapping[str, np.ndarray],
                 labels: torch.Tensor, config: CRMTrainConfig, report: Any) -> float:  # fmt: skip
    """One pass over the training rows in a fresh random order; the smoothed loss at its end."""
    model.train()
    device = model_device(model)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    permutation = torch.from_numpy(np.random.permutation(len(labels)))
    running = 0.0
    for step, start in enumerate(range(0, len(labels), config.batch_size)):
        rows = permutation[start : start + config.batch_size]
        batch = to_tensors(inputs, rows.numpy())
        if config.id_dropout:  # drawn on the CPU whatever the device: the same draws as a CPU run
            batch["categorical"] = hide_ids(batch["categorical"], config.id_dropout)
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        loss = loss_fn(model(**batch), labels[rows.to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        report(running)
    return running


def _resume(out_dir: Path, model: DCNv2, optimizer: torch.optim.Optimizer, scheduler: Any
            ) -> tuple[int, float, int, list[dict[str, float]]]:  # fmt: skip
    """Weights, optimizer, schedule and RNG states of the last finished epoch."""
    state = load_state(out_dir / "state.pt")
    load_weights(out_dir / "last.safetensors", model)
    optimizer.load_state_dict(state["optimizer"])
    if "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    set_numpy_rng_state(state["numpy_rng"])
    log.info("resuming CRM training at epoch %d (best validation AUC %.4f)", state["epoch"] + 1,
             state["best_auc"])  # fmt: skip
    return state["epoch"], state["best_auc"], state["stale"], state["history"]


def load_crm(folder: Path, device: torch.device | None = None) -> tuple[DCNv2, FeatureSpec]:
    """The best CRM of a training folder (config.json, features.json, model.safetensors), on `device`."""
    folder = Path(folder)
    spec = FeatureSpec.load(folder / "features.json")
    config = DCNv2Config(**read_json(folder / "config.json")["model"])
    model = DCNv2(spec, config)
    load_weights(folder / "model.safetensors", model)
    model.to(device or torch.device("cpu"))
    model.eval()
    return model, spec


def evaluate_crm(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Test-split metrics and the per-entropy-decile breakdown the router rests on."""
    return {
        "overall": summarize(labels, probabilities),
        "entropy_deciles": entropy_deciles(labels, probabilities),
    }
