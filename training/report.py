"""The training report: a Markdown table and PNG plots beside metrics.json; ablations side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.errors import ConfigError
from training.checkpoint import read_json

__all__ = ["write_report", "compare_runs", "write_curve", "curve_row"]


NAN = float("nan")


def _calibration(metrics: dict[str, Any]) -> str:
    c = metrics.get("llm_calibration") or {"slope": 1.0, "intercept": 0.0, "samples": 0}
    if not c.get("samples"):
        return "none fitted, identity"
    text = f"sigmoid({c['slope']:.3f} logit(p) + {c['intercept']:.3f}) from {c['samples']} samples"
    if c["slope"] <= 0:
        text += (" — **slope 0: the LLM's answers carried no signal on routed validation samples, so the "
                 "calibrated hybrid answers routed candidates with a constant; its figures measure that "
                 "constant, not the LLM**")  # fmt: skip
    return text


def _f(value: float) -> str:
    return "n/a" if value != value else f"{value:.4f}"  # NaN check


def _hybrid_table(crm: dict[str, Any], hybrid: list[dict[str, Any]], raw: list[dict[str, Any]] | None) -> list[str]:
    """CRM-only and the hybrid at each fraction, calibrated and raw swap (runs from before calibration: n/a)."""
    lines = [
        "| model | LLM share | routed | AUC | LogLoss | ACC | raw-swap AUC | raw-swap LogLoss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| CRM only | 0 | 0 | {_f(crm['auc'])} | {_f(crm['logloss'])} | {_f(crm['acc'])} | | |",
    ]
    for row, swap in zip(hybrid, raw or [{}] * len(hybrid), strict=True):
        lines.append(
            f"| hybrid | {row['fraction']:g} | {row['routed']} | {_f(row['auc'])} | {_f(row['logloss'])} "
            f"| {_f(row['acc'])} | {_f(swap.get('auc', NAN))} | {_f(swap.get('logloss', NAN))} |"
        )
    return lines


def _baseline_line(metrics: dict[str, Any]) -> list[str]:
    if "baseline" not in metrics:
        return []
    b, crm = metrics["baseline"]["test"], metrics["crm_full_test"]
    return [
        f"Two-number baseline (logistic regression on the item's training-split mean rating and the user's "
        f"running mean, fitted on validation) on the whole test split: AUC {_f(b['auc'])}, LogLoss "
        f"{_f(b['logloss'])}; the CRM is {crm['auc'] - b['auc']:+.4f} AUC from it."
    ]


def _gain_lines(full: dict[str, Any]) -> list[str]:
    gain = full.get("gain_over_crm")
    if not gain or gain.get("fraction") is None:
        return []
    return [
        "",
        f"Hybrid AUC gain over the CRM at f = {gain['fraction']:g}: "
        + "; ".join(
            f"{name} {g['gain']:+.4f} (95% interval {g['low']:+.4f} to {g['high']:+.4f}, {g['resamples']} paired "
            "bootstrap resamples)"
            for name, g in gain.items()
            if isinstance(g, dict)
        )
        + ".",
    ]


def markdown(metrics: dict[str, Any]) -> str:
    subset = metrics["eval_subset"]
    lines = [
        f"# CoReLLa run: {metrics['dataset']}, LLM {metrics['llm']} ({metrics['ablation']})",
        "",
        f"Evaluation subset: {subset['description']} (sha256 {subset['sha256'][:12]}).",
        f"CRM on the whole test split: AUC {_f(metrics['crm_full_test']['auc'])}, "
        f"LogLoss {_f(metrics['crm_full_test']['logloss'])} (stage-1 CRM: AUC "
        f"{_f(metrics['crm_stage1_full_test']['auc'])}); the hybrid uses the "
        f"{metrics['crm_choice']['used']} CRM (chosen on validation AUC).",
        *_baseline_line(metrics),
        "",
        "The hybrid swaps in the LLM's calibrated probability (Platt map fitted on routed validation "
        f"samples: {_calibration(metrics)}); the raw-swap columns are the paper's uncalibrated swap.",
        "",
        *_hybrid_table(metrics["crm_only"], metrics["hybrid"], metrics.get("hybrid_raw")),
    ]
    llm = metrics.get("llm_only_calibrated", metrics["llm_only"])
    if "baseline" in metrics:
        b = metrics["baseline"]["subset"]
        lines.append(f"| two-number baseline | 0 | 0 | {_f(b['auc'])} | {_f(b['logloss'])} | {_f(b['acc'])} | | |")
    lines.append(
        f"| LLM only | 1 | {subset['count']} | {_f(llm['auc'])} | {_f(llm['logloss'])} | {_f(llm['acc'])} "
        f"| {_f(metrics['llm_only']['auc'])} | {_f(metrics['llm_only']['logloss'])} |"
    )
    full = metrics.get("full_test")
    if full:
        routed = full["routed"]
        lines += [
            "",
            f"## The whole test split ({full['description']})",
            "",
            f"On those {routed['count']} routed samples (positive rate {routed['positive_rate']:.3f}): CRM AUC "
            f"{_f(routed['crm_auc'])}, LLM AUC {_f(routed['llm_auc'])}.",
            "",
            *_hybrid_table(full["crm_only"], full["hybrid"], full["hybrid_raw"]),
            *_gain_lines(full),
            "",
            f"## Per CRM-entropy decile (evaluation subset, {subset['count']} samples)",
        ]
    top = metrics["uncertain_10pct"]
    lines += [
        "",
        f"On the CRM's most uncertain 10% ({top['count']} samples): CRM AUC {_f(top['crm_auc'])}, "
        f"LLM AUC {_f(top['llm_auc'])}.",
        "",
        "| CRM-entropy decile | count | positive rate | CRM AUC | LLM AUC | CRM ACC | LLM ACC |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in metrics["entropy_deciles"]:
        lines.append(
            f"| {row['decile']} | {row['count']} | {row['positive_rate']:.3f} | {_f(row['crm_auc'])} | "
            f"{_f(row['llm_auc'])} | {_f(row['crm_acc'])} | {_f(row['llm_acc'])} |"
        )
    lines += [
        "",
        "Stage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["timings_seconds"].items()),
    ]
    for stage, info in metrics.get("stages", {}).items():
        losses = ", ".join(f"{k} {v['first']:.3f} -> {v['last']:.3f}" for k, v in info["loss"].items())
        rate = f", {info['samples_per_second']:.2f} samples/s" if info.get("samples_per_second") else ""
        lines.append(f"- {stage}: {info['samples']} samples, {info['steps']} steps{rate}; loss {losses}")
    if training := metrics.get("llm_training"):
        shared = "each prefix run once" if training["shared_prefix"] else "every prompt run whole"
        token = ""
        if training.get("crm_token"):
            token = ("; the LLM also reads a CRM token (the CRM's representation of each candidate, projected into "
                     "its input space at the answer position; an experiment, not exported)")  # fmt: skip
        lines += ["", f"The LLM's samples ({training['llm_samples']}, {shared}): {training['training_rule']}{token}. "
                  f"Evaluation: {training['evaluation_rule']}. "
                  f"Calibration: {training['calibration_rule']}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(out: Path, metrics: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    fractions = [r["fraction"] for r in metrics["hybrid"]]
    ax.plot(fractions, [r["auc"] for r in metrics["hybrid"]], marker="o", label="hybrid (calibrated)")
    if metrics.get("hybrid_raw"):
        ax.plot(fractions, [r["auc"] for r in metrics["hybrid_raw"]], marker="x", linestyle="--",
                label="hybrid (raw swap)")  # fmt: skip
    ax.axhline(metrics["crm_only"]["auc"], color="gray", linestyle="--", label="CRM only")
    ax.axhline(metrics["llm_only"]["auc"], color="tab:red", linestyle=":", label="LLM only")
    if "baseline" in metrics:
        ax.axhline(metrics["baseline"]["subset"]["auc"], color="tab:green", linestyle="-.", label="two-number baseline")
    ax.set_xscale("log")
    ax.set_xlabel("share of samples routed to the LLM")
    ax.set_ylabel("test AUC")
    ax.set_title("AUC vs LLM share")
    ax.legend()
    fig.tight_layout()
    written.append(out / "auc_vs_fraction.png")
    fig.savefig(written[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    deciles = metrics["entropy_deciles"]
    x = [r["decile"] for r in deciles]
    ax.bar([i - 0.2 for i in x], [r["crm_auc"] for r in deciles], width=0.4, label="CRM")
    ax.bar([i + 0.2 for i in x], [r["llm_auc"] for r in deciles], width=0.4, label="LLM")
    ax.set_xlabel("CRM-entropy decile (1 = most certain)")
    ax.set_ylabel("AUC")
    ax.set_ylim(0.4, 1.0)
    ax.set_xticks(x)
    ax.set_title("Who wins where")
    ax.legend()
    fig.tight_layout()
    written.append(out / "auc_by_entropy_decile.png")
    fig.savefig(written[-1])
    plt.close(fig)
    return written


def write_report(out: Path, metrics: dict[str, Any]) -> Path:
    path = Path(out) / "report.md"
    images = plot(Path(out), metrics)
    text = markdown(metrics) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def _full_test_columns(m: dict[str, Any]) -> list[float | str]:
    baseline = m.get("baseline", {}).get("test", {}).get("auc", NAN)
    full = m.get("full_test")
    if not full or not full["hybrid"]:
        return [baseline] + [NAN] * 7
    at = min(full["hybrid"], key=lambda r: abs(r["fraction"] - 0.1))
    gain = full.get("gain_over_crm", {}).get("calibrated")
    interval = f"{gain['gain']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]" if gain else "n/a"
    return [baseline, full["crm_only"]["auc"], at["auc"], interval, full["crm_only"]["logloss"], at["logloss"],
            full["routed"]["crm_auc"], full["routed"]["llm_auc"]]  # fmt: skip


def compare_runs(runs: list[Path]) -> tuple[list[str], list[list[Any]]]:
    """Side-by-side rows of several runs; refuses runs whose LLM evaluation subsets differ."""
    loaded = [(Path(r), read_json(Path(r) / "metrics.json")) for r in runs]
    hashes = {m["eval_subset"]["sha256"] for _, m in loaded}
    if len(hashes) > 1:
        raise ConfigError(
            "these runs scored their LLMs on different test subsets; compare only runs with the same "
            "data, seed and --eval-samples"
        )
    columns = ["run", "variant", "CRM AUC", "LLM AUC", "LLM AUC top-10% H", "CRM AUC top-10% H",
               "hybrid@0.1 AUC", "hybrid@0.1 LogLoss", "raw swap@0.1 AUC", "raw swap@0.1 LogLoss",
               "CRM LogLoss", "full test: baseline AUC", "full test: CRM AUC", "full test: hybrid@0.1 AUC",
               "full test: gain [95% CI]", "full test: CRM LogLoss",
               "full test: hybrid@0.1 LogLoss", "full test routed: CRM AUC", "full test routed: LLM AUC"]  # fmt: skip
    rows = []
    for path, m in loaded:
        index = min(range(len(m["hybrid"])), key=lambda i: abs(m["hybrid"][i]["fraction"] - 0.1))
        at, raw = m["hybrid"][index], (m.get("hybrid_raw") or m["hybrid"])[index]
        rows.append([
            path.name, m["ablation"], m["crm_only"]["auc"], m["llm_only"]["auc"],
            m["uncertain_10pct"]["llm_auc"], m["uncertain_10pct"]["crm_auc"], at["auc"], at["logloss"],
            raw["auc"], raw["logloss"], m["crm_only"]["logloss"], *_full_test_columns(m),
        ])  # fmt: skip
    return columns, rows


#: The learning curve's columns: (heading, how to read it off a run's metrics)
CURVE_COLUMNS = ("LLM samples (stages 2+3)", "LLM alone AUC", "routed: LLM AUC", "routed: CRM AUC",
                 "hybrid@0.05 AUC", "hybrid@0.1 AUC", "hybrid@0.2 AUC (subset)", "hybrid@0.1 LogLoss",
                 "CRM AUC (whole test split)", "gain@0.1 [95% CI]", "calibration slope", "LLM training s")  # fmt: skip


def curve_row(metrics: dict[str, Any]) -> list[Any]:
    """One run as one point of the learning curve: the LLM alone on the evaluation subset, the LLM and
    the CRM on the routed test samples, the hybrid on the whole test split (f = 0.2 on the subset,
    where the router's fraction is below it)."""
    stages = metrics.get("stages", {})
    samples = sum(info["samples"] for info in stages.values())
    seconds = sum(info["seconds"] for info in stages.values())
    full = metrics.get("full_test") or {}
    by_fraction = {round(r["fraction"], 4): r for r in full.get("hybrid", [])}
    subset = {round(r["fraction"], 4): r for r in metrics["hybrid"]}
    gain = full.get("gain_over_crm", {}).get("calibrated")
    routed = full.get("routed", {})
    return [samples, metrics["llm_only"]["auc"], routed.get("llm_auc", NAN), routed.get("crm_auc", NAN),
            by_fraction.get(0.05, {}).get("auc", NAN), by_fraction.get(0.1, {}).get("auc", NAN),
            subset.get(0.2, {}).get("auc", NAN), by_fraction.get(0.1, {}).get("logloss", NAN),
            metrics["crm_full_test"]["auc"],
            f"{gain['gain']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]" if gain else "n/a",
            (metrics.get("llm_calibration") or {}).get("slope", NAN), seconds]  # fmt: skip


def write_curve(runs: list[Path], out: Path) -> tuple[list[str], list[list[Any]]]:
    """The learning curve of several runs that differ in how many samples the LLM saw: curve.md (a
    table) and curve.png (AUC against LLM samples) in `out`."""
    rows = sorted((curve_row(read_json(Path(r) / "metrics.json")) + [Path(r).name] for r in runs),
                  key=lambda row: row[0])  # fmt: skip
    columns = [*CURVE_COLUMNS, "run"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cell = lambda v: _f(v) if isinstance(v, float) and abs(v) < 10 else (f"{v:.0f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    (out / "curve.md").write_text("# Learning curve\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    x = [row[0] for row in rows]
    for index, label, style in ((1, "LLM alone", "o-"), (2, "LLM on routed samples", "s-"),
                                (3, "CRM on routed samples", "s--"), (5, "hybrid at f = 0.1", "^-"),
                                (8, "CRM, whole test split", "--")):  # fmt: skip
        ax.plot(x, [row[index] for row in rows], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("LLM training samples (stages 2 + 3)")
    ax.set_ylabel("test AUC")
    ax.set_title("Learning curve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curve.png")
    plt.close(fig)
    return columns, rows
