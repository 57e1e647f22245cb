"""What each way of answering the routed samples is worth, judged offline on a finished run's saved answers.

    python -m benchmarks.calibration_variants runs/ml100k [runs/other ...] [--out FILE.md]

A training run saves the LLM's and the CRM's answers on its calibration samples (routed validation)
and on every routed test sample, and the CRM's on the whole test split (eval_predictions.npz). Each
variant is fitted on the calibration samples and applied to the routed test samples; the hybrid is
scored on the whole test split, beside the CRM alone, with the paired-bootstrap interval of its gain:
- platt: the LLM's Platt map, swapped in (what corella serves);
- blend: logistic regression on both models' logits (the LLM's weight kept >= 0);
- crm-recalibrated: the CRM's own Platt map on the routed samples (the control: what the swap gains
  with no LLM at all).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from runtime.quality import bootstrap_auc_gain, log_loss
from runtime.router import LLMCalibration

_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def fit_blend(llm: np.ndarray, crm: np.ndarray, labels: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Weights (llm, crm, bias) of a logistic regression on both logits, by Newton's method."""
    x = np.stack([_logit(llm), _logit(crm), np.ones(len(labels))], axis=1)
    y = np.asarray(labels, dtype=np.float64)
    w = np.zeros(3)
    penalty = np.diag([l2, l2, 0.0]) * len(y)
    for _ in range(100):
        q = 1 / (1 + np.exp(-np.clip(x @ w, -50, 50)))
        step = np.linalg.solve(
            (x * (q * (1 - q))[:, None]).T @ x + penalty + 1e-9 * np.eye(3), x.T @ (q - y) + penalty @ w
        )
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    if w[0] < 0:  # never reverse the LLM's ranking: refit on the CRM alone
        crm_only = fit_blend(np.full(len(y), 0.5), crm, labels, l2)
        w = np.array([0.0, crm_only[1], crm_only[2]])
    return w


def apply_blend(w: np.ndarray, llm: np.ndarray, crm: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(w[0] * _logit(llm) + w[1] * _logit(crm) + w[2])))


def variants(saved: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    cal_llm, cal_crm, cal_y = saved["calibration_llm"], saved["calibration_crm"], saved["calibration_labels"]
    crm, labels, routed = saved["test_crm"], saved["test_labels"], saved["test_routed"].astype(bool)
    llm, routed_crm = saved["routed_test_llm"], saved["routed_test_crm"]
    answers = {
        "platt": LLMCalibration.fit(cal_llm, cal_y).apply(llm),
        "blend": apply_blend(fit_blend(cal_llm, cal_crm, cal_y), llm, routed_crm),
        "crm-recalibrated": LLMCalibration.fit(cal_crm, cal_y).apply(routed_crm),
    }
    out = {"crm": {"auc_gain": 0.0, "low": 0.0, "high": 0.0, "logloss": log_loss(labels, crm)}}
    for name, routed_answer in answers.items():
        hybrid = crm.copy()
        hybrid[routed] = routed_answer
        gain = bootstrap_auc_gain(labels, crm, hybrid, resamples=500)
        out[name] = {"auc_gain": gain["gain"], "low": gain["low"], "high": gain["high"],
                     "logloss": log_loss(labels, hybrid)}  # fmt: skip
    weights = fit_blend(cal_llm, cal_crm, cal_y)
    out["blend"] |= {"llm_weight": float(weights[0]), "crm_weight": float(weights[1])}
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    lines = ["| run | variant | AUC gain over the CRM | 95% interval | LogLoss | weights (LLM, CRM) |",
             "| --- | --- | ---: | --- | ---: | --- |"]  # fmt: skip
    for run in args.runs:
        saved = dict(np.load(run / "eval_predictions.npz"))
        if "test_crm" not in saved:
            raise SystemExit(f"{run}: its eval_predictions.npz predates the saved routed answers; retrain it")
        for name, row in variants(saved).items():
            weights = f"{row['llm_weight']:.3f}, {row['crm_weight']:.3f}" if "llm_weight" in row else ""
            lines.append(f"| {run.name} | {name} | {row['auc_gain']:+.4f} | [{row['low']:+.4f}, {row['high']:+.4f}] | "
                         f"{row['logloss']:.4f} | {weights} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    main()
