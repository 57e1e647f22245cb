"""Several seeds of one run: each in its own folder, then the mean and spread of every headline figure.

out/seed-<s>/   one complete run per seed (resumable: a finished seed is read back, not re-run)
out/seeds.json  every figure per seed, mean and standard deviation
out/seeds.md    the same as a table
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.checkpoint import read_json, write_json

__all__ = ["run_seeds", "crm_headline", "run_headline", "summarize_seeds"]

NAN = float("nan")


def crm_headline(metrics: dict[str, Any]) -> dict[str, float]:
    """Figures of a stage-1 run (crm/metrics.json), whole test split."""
    crm, baseline = metrics["test"]["overall"], metrics.get("baseline", {}).get("test", {})
    return {
        "CRM AUC": crm["auc"],
        "CRM LogLoss": crm["logloss"],
        "baseline AUC": baseline.get("auc", NAN),
        "baseline LogLoss": baseline.get("logloss", NAN),
        "CRM - baseline AUC": crm["auc"] - baseline.get("auc", NAN),
        "CRM epochs": metrics["fit"]["epochs_run"],
    }


def run_headline(metrics: dict[str, Any]) -> dict[str, float]:
    """Figures of a full run (metrics.json): whole test split where the run scored it."""
    baseline = metrics.get("baseline", {}).get("test", {})
    out = {
        "CRM AUC": metrics["crm_full_test"]["auc"],
        "CRM LogLoss": metrics["crm_full_test"]["logloss"],
        "baseline AUC": baseline.get("auc", NAN),
        "baseline LogLoss": baseline.get("logloss", NAN),
        "LLM-only AUC (subset)": metrics["llm_only"]["auc"],
        "CRM AUC (subset)": metrics["crm_only"]["auc"],
    }
    full = metrics.get("full_test")
    if full and full["hybrid"]:
        at = full["hybrid"][-1]
        gain = full.get("gain_over_crm", {}).get("calibrated", {})
        out |= {
            f"hybrid@{at['fraction']:g} AUC": at["auc"],
            f"hybrid@{at['fraction']:g} LogLoss": at["logloss"],
            f"raw swap@{at['fraction']:g} AUC": full["hybrid_raw"][-1]["auc"],
            "hybrid / CRM AUC": at["auc"] / full["crm_only"]["auc"],
            "gain 95% low": gain.get("low", NAN),
            "gain 95% high": gain.get("high", NAN),
            "routed: CRM AUC": full["routed"]["crm_auc"],
            "routed: LLM AUC": full["routed"]["llm_auc"],
        }
    return out


def summarize_seeds(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Mean and sample standard deviation of each figure over the seeds that report it."""
    names = list(dict.fromkeys(name for figures in per_seed.values() for name in figures))
    summary = {}
    for name in names:
        values = [figures[name] for figures in per_seed.values() if name in figures and figures[name] == figures[name]]
        mean = sum(values) / len(values) if values else NAN
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else NAN
        summary[name] = {"mean": mean, "std": std, "values": values}
    return summary


def _markdown(summary: dict[str, dict[str, Any]], seeds: list[int], title: str) -> str:
    lines = [f"# {title}", "", f"Seeds {', '.join(map(str, seeds))}; mean ± sample standard deviation.", "",
             "| figure | mean | std | per seed |", "| --- | ---: | ---: | --- |"]  # fmt: skip
    for name, s in summary.items():
        values = ", ".join(f"{v:.4f}" for v in s["values"])
        lines.append(f"| {name} | {s['mean']:.4f} | {s['std']:.4f} | {values} |")
    return "\n".join(lines) + "\n"


def run_seeds(
    out: Path,
    seeds: list[int],
    run_one: Callable[[Path, int], dict[str, Any]],
    headline: Callable[[dict[str, Any]], dict[str, float]],
    finished: Callable[[Path], dict[str, Any] | None],
    title: str,
) -> dict[str, Any]:
    """Run (or read back) every seed into out/seed-<s>, then write seeds.json and seeds.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for seed in seeds:
        folder = out / f"seed-{seed}"
        metrics = finished(folder)
        if metrics is None:
            metrics = run_one(folder, seed)
        per_seed[seed] = headline(metrics)
    summary = summarize_seeds(per_seed)
    result = {"seeds": seeds, "per_seed": {str(k): v for k, v in per_seed.items()}, "summary": summary}
    write_json(out / "seeds.json", result)
    (out / "seeds.md").write_text(_markdown(summary, seeds, title), encoding="utf-8")
    return result


def finished_metrics(path: Path) -> Callable[[Path], dict[str, Any] | None]:
    """A `finished` callback: the metrics file at folder/`path` where it exists."""

    def read(folder: Path) -> dict[str, Any] | None:
        return read_json(folder / path) if (folder / path).exists() else None

    return read
