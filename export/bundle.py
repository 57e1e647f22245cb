"""`corella export RUN --out BUNDLE`: one verified bundle from a training run.

Everything is written into a temporary folder beside --out and renamed into place at the end, so an
interrupted export never leaves a half bundle and re-running is safe.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from export.crm import (
    ExportError,
    build_tensorrt_engine,
    export_onnx,
    onnx_parity,
    optimized_load_time,
    tensorrt_parity,
    tensorrt_unavailable_reason,
)
from export.llm import QUANT_TYPES, convert_hf_directory, quantize_gguf, write_merged_gguf
from runtime.artifacts.bundle import MANIFEST, bundle_id, load_bundle, write_manifest
from runtime.artifacts.store import FeatureStore, Interaction
from runtime.engine import Engine, EngineSettings
from runtime.errors import ConfigError
from runtime.features import FeatureSpec
from runtime.llm import LlamaScorer, LlamaSettings
from runtime.paths import corella_home
from runtime.prompt import HistoryEntry, ItemText, PromptTemplate
from runtime.quality import auc, describe_gain, expected_gain, log_loss, summarize
from runtime.router import LLMCalibration, binary_entropy
from training.checkpoint import read_json
from training.crm_trainer import load_crm
from training.data import SampleTable
from training.dcnv2 import DCNv2
from training.device import resolve_compute
from training.groups import GroupPrompts, group_rows, snapshot_groups
from training.llm import LLMScorer, LoRAConfig, resolve_base_llm
from training.pipeline import evaluation_rows
from training.runs import DataConfig, PreparedData, prepare_data

__all__ = ["ExportConfig", "export_bundle", "sample_request"]

log = logging.getLogger(__name__)


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quant: str = Field(
        "auto",
        description="quantization of the shipped GGUF: auto (the smallest of q4_k_m, q8_0, f16 whose routed "
        "validation AUC is within quant_bar of f16's), q4_k_m, q8_0, f16 or f32",
    )
    quant_bar: float = Field(0.005, description="auto: the routed AUC a quantization may lose against f16")
    tensorrt: bool | None = Field(None, description="True: must build; None: build where possible; False: never")
    keep_intermediate: bool = Field(False, description="also ship the un-quantized merged GGUF")
    intermediate: str = Field("f16", description="type of the merged GGUF before quantization: f16 or f32")
    converter: Path | None = Field(None, description="llama.cpp convert_hf_to_gguf.py, for Hugging Face bases")
    fetch_converter: bool = Field(
        False, description="no --converter: take the converter out of the installed llama-cpp-python's sdist"
    )
    parity_prompts: int = Field(64, ge=1, description="validation prompts for the GGUF-vs-PyTorch check")
    routed_samples: int = Field(
        1000, ge=1, description="routed validation samples for the quantization AUC, the LLM's calibration and its "
        "expected gain (scored with shared prefixes)",
    )  # fmt: skip
    compare_quants: list[str] = Field(
        ["q8_0", "q4_k_m"],
        description="quantizations measured against F16 (with a fixed --quant; auto measures "
        "from the smallest up and stops at the first within the bar)",
    )
    eval_samples: int | None = Field(None, description="test samples for the export-time hybrid figure")
    quants_dir: Path | None = Field(None, description="also keep the F16 GGUF and every compared quantization here")
    context_size: int = Field(4096, ge=256, description="llama.cpp context of the bundle")
    threads: int | None = Field(None, ge=1)
    device: str = Field(
        "auto",
        description="where the merged LLM's PyTorch reference runs (float32): auto (CUDA where torch "
        "sees a card), cpu, cuda or cuda:N",
    )


AUTO = "auto"
#: what --quant auto tries, smallest file first; the intermediate (f16) is kept where none is close enough
AUTO_ORDER = ("q4_k_m", "q8_0")


def _progress(message: str, callback: Callable[[str], None] | None) -> None:
    """A step's message: to the caller's callback (the CLI prints it), else to the log; never both."""
    if callback:
        callback(message)
    else:
        log.info(message)


def _prompt_parts(samples: SampleTable, rows: np.ndarray) -> list[tuple[list[HistoryEntry], ItemText]]:
    return [samples.prompt_parts(int(row)) for row in rows]


def sample_request(samples: SampleTable, row: int, mode: str = "hybrid") -> dict[str, Any]:
    """The runtime request that scores test sample `row` exactly as training saw it."""
    history = [int(h) for h in samples.history[row] if h >= 0]
    profile = (
        samples.raw.users.reindex([samples.user[row]]).to_dict("records")[0] if len(samples.raw.users.columns) else {}
    )
    return {
        "user_id": str(samples.user[row]),
        "user_attributes": {k: v for k, v in profile.items() if isinstance(v, str)},
        "history": [
            {
                "item_id": str(samples.item[h]),
                "rating": float(samples.rating[h]),
                "timestamp": int(samples.timestamp[h]),
            }
            for h in history
        ],  # fmt: skip
        "candidates": [{"item_id": str(samples.item[row])}],
        "mode": mode,
    }


def _write_store(path: Path, prepared: PreparedData) -> dict[str, int]:
    samples, raw = prepared.samples, prepared.samples.raw
    items = ((str(i), samples.item_text(str(i))) for i in raw.items.index)
    users = ((str(u), {k: v for k, v in rec.items() if isinstance(v, str)})
             for u, rec in zip(raw.users.index, raw.users.to_dict("records"), strict=True))  # fmt: skip
    before = samples.item_totals  # each interaction's item totals before it, as training saw them
    interactions = (
        Interaction(str(u), str(i), float(r), int(t), int(c), float(total))
        for u, i, r, t, c, total in zip(
            samples.user, samples.item, samples.rating, samples.timestamp, before[:, 0], before[:, 1], strict=True
        )  # fmt: skip
    )
    store = FeatureStore.create(path, items, users, interactions, like_threshold=raw.like_threshold)
    counts = store.counts()
    store.close()
    return counts


def export_bundle(run: Path, out: Path, config: ExportConfig | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    config = config or ExportConfig()
    run, out = Path(run), Path(out)
    if config.quant not in (*QUANT_TYPES, AUTO):
        raise ConfigError(f"unknown quantization {config.quant!r}; choose one of auto, {', '.join(QUANT_TYPES)}")
    if not (run / "run.json").exists():
        raise ConfigError(f"{run}: not a training run (no run.json)")
    resolve_compute(config.device, "float32")  # an unusable --device is refused before any work
    final = run / "final"
    crm_dir = final / "crm" if (final / "crm").exists() else run / "crm"
    if (final / "llm" / "llm.json").exists() and read_json(final / "llm" / "llm.json").get("crm_token"):
        raise ExportError(
            f"{final / 'llm' / 'llm.json'}: this run's LLM reads a CRM token (`corella train --crm-token`, an "
            "experiment); the runtime does not serve one yet: export a run trained without it"
        )
    if not (crm_dir / "model.safetensors").exists():
        raise ConfigError(f"{run}: no trained CRM (run `corella train crm` or `corella train` first)")
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    data = DataConfig(**read_json(run / "run.json")["data"])
    crm, spec = load_crm(crm_dir)
    prepared = prepare_data(data, spec)
    samples = prepared.samples
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work.", dir=out.parent))
    manifest: dict[str, Any] = {"source_run": str(run.resolve())}
    try:
        # ---------------------------------------------------------------- CRM
        t = time.perf_counter()
        valid_rows = prepared.rows("valid")
        manifest["crm"] = _export_crm(crm, spec, prepared, staging, config, progress)
        timings["crm"] = time.perf_counter() - t

        # ---------------------------------------------------------------- router, features, prompt
        router = read_json(final / "router.json") if (final / "router.json").exists() else None
        if router is None:
            from runtime.crm import CRMSession
            from runtime.router import calibrate_threshold

            valid_p = CRMSession(staging / "crm.onnx", ["cpu"]).predict(prepared.take(valid_rows))
            router = {"fraction": 0.1, "threshold": calibrate_threshold(binary_entropy(valid_p), 0.1),
                      "calibrated_on": "validation split, full"}  # fmt: skip
        manifest["router"] = router
        spec.save(staging / "features.json")
        template = (PromptTemplate.load(final / "prompt.json") if (final / "prompt.json").exists()
                    else samples.prompt_template())  # fmt: skip
        template.save(staging / "prompt.json")
        manifest.update({"features": "features.json", "prompt": "prompt.json", "store": "store.sqlite"})
        t = time.perf_counter()
        manifest["store_counts"] = _write_store(staging / "store.sqlite", prepared)
        timings["store"] = time.perf_counter() - t

        # ---------------------------------------------------------------- LLM
        llm_info = read_json(final / "llm" / "llm.json") if (final / "llm" / "llm.json").exists() else None
        if llm_info is not None:
            t = time.perf_counter()
            manifest["llm"] = _export_llm(run, llm_info, template, prepared, staging, work, router, config, progress)
            timings["llm"] = time.perf_counter() - t
        else:
            manifest["llm"] = None
            _progress("no LLM in this run: a CRM-only bundle", progress)

        # ---------------------------------------------------------------- export-time metrics
        if (out / MANIFEST).exists():  # the serving state of the bundle replaced stays, under its id
            manifest["replaces"] = bundle_id(out)
        t = time.perf_counter()
        write_manifest(staging, manifest)  # the engine that measures below loads a verified bundle
        manifest["metrics"] = _measure(staging, work, prepared, config, run, progress)
        manifest["timings_seconds"] = timings | {
            "metrics": time.perf_counter() - t,
            "total": time.perf_counter() - started,
        }
        full = write_manifest(staging, manifest)
        load_bundle(staging)  # verify what was written before it takes the place of --out
        _take_place(staging, out, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return full


def _export_crm(crm: DCNv2, spec: FeatureSpec, prepared: PreparedData, staging: Path, config: ExportConfig,
                progress: Callable[[str], None] | None) -> dict[str, Any]:  # fmt: skip
    """crm.onnx checked against PyTorch on the validation split, and crm.plan where TensorRT can."""
    valid_rows = prepared.rows("valid")
    onnx_info = export_onnx(crm, prepared.inputs, staging / "crm.onnx")
    parity = onnx_parity(crm, staging / "crm.onnx", prepared.take(valid_rows))
    _progress(f"crm.onnx: ONNX Runtime vs PyTorch on {parity['samples']} validation samples, "
              f"max |dp| {parity['max_abs_dp']:.2e}", progress)  # fmt: skip
    if parity["max_abs_dp"] > 1e-5:
        raise ExportError(f"ONNX parity failed: max |dp| {parity['max_abs_dp']:.2e} > 1e-5")
    info = {**onnx_info, "inputs": {k: list(v) for k, v in spec.input_shapes().items()},
            "parity": parity, "load_time": optimized_load_time(staging / "crm.onnx")}  # fmt: skip
    reason = tensorrt_unavailable_reason()
    if config.tensorrt is False:
        info["tensorrt"] = {"status": "skipped", "reason": "disabled with --no-tensorrt"}
    elif reason is not None:
        if config.tensorrt:
            raise ExportError(f"--tensorrt was asked for, but {reason}")
        info["tensorrt"] = {"status": "skipped", "reason": reason}
    else:
        plan = build_tensorrt_engine(staging / "crm.onnx", staging / "crm.plan", prepared.inputs)
        from runtime.crm import CRMSession

        reference = CRMSession(staging / "crm.onnx", ["cpu"]).predict(prepared.take(valid_rows))
        plan["parity"] = tensorrt_parity(staging / "crm.plan", prepared.take(valid_rows), reference)
        if plan["parity"]["max_abs_dp"] > 1e-3:
            raise ExportError(f"TensorRT parity failed: max |dp| {plan['parity']['max_abs_dp']:.2e} > 1e-3")
        info["tensorrt"] = {"status": "built", **plan}
    _progress(f"TensorRT: {info['tensorrt']['status']} ({info['tensorrt'].get('reason', '')})", progress)
    return info


def _take_place(staging: Path, out: Path, progress: Callable[[str], None] | None) -> None:
    """The verified bundle in `staging` becomes `out`; a bundle already there is swapped out whole."""
    if not out.exists():
        os.replace(staging, out)
        return
    _keep_legacy_state(out, progress)
    backup = out.with_name(f".{out.name}.old")
    if backup.exists():
        shutil.rmtree(backup)
    os.replace(out, backup)
    os.replace(staging, out)
    shutil.rmtree(backup)


def _export_llm(run: Path, llm_info: dict[str, Any], template: PromptTemplate, prepared: PreparedData, staging: Path,
                work: Path, router: dict[str, Any], config: ExportConfig,
                progress: Callable[[str], None] | None) -> dict[str, Any]:  # fmt: skip
    samples = prepared.samples
    scorer, merged_path, merge = _merge_llm(run, llm_info, template, work, config, progress)
    base = scorer.base

    # parity: llama.cpp on the merged F16/F32 GGUF vs the merged PyTorch model
    rng = np.random.default_rng(0)
    valid_rows = prepared.rows("valid")
    parity_rows = np.sort(rng.choice(valid_rows, size=min(config.parity_prompts, len(valid_rows)), replace=False))
    scorer.model.merge_adapter()
    torch_cache = GroupPrompts(samples, scorer)
    from training.pipeline import score_llm

    torch_p = score_llm(scorer, torch_cache, parity_rows, description="PyTorch reference")
    settings = LlamaSettings(n_ctx=config.context_size, n_threads=config.threads)
    bos = llm_info.get("bos_token_id")
    yes, no = llm_info["yes_token_id"], llm_info["no_token_id"]
    texts = _prompt_parts(samples, parity_rows)

    def llama_ids(llama: LlamaScorer, history: list[HistoryEntry], target: ItemText) -> list[int]:
        prefix, suffixes = template.ids(llama.tokenize, bos, history, [target])
        return prefix + suffixes[0]

    def llama_scores(path: Path, parts: list[tuple[list[HistoryEntry], ItemText]]) -> np.ndarray:
        with LlamaScorer(path, yes, no, settings) as llama:
            return np.array([llama.score_full(llama_ids(llama, *part)) for part in parts])

    with LlamaScorer(merged_path, yes, no, settings) as llama:
        same_tokens = float(np.mean([llama_ids(llama, *part) == torch_cache.prompt(int(r))
                                     for part, r in zip(texts, parity_rows, strict=True)]))  # fmt: skip
    base_p = llama_scores(merged_path, texts)
    diff = np.abs(base_p - torch_p)
    parity = {"prompts": int(len(diff)), "reference": f"merged PyTorch model ({base.name})",
              "gguf": config.intermediate, "mean_abs_dp": float(diff.mean()), "max_abs_dp": float(diff.max()),
              "same_token_ids": same_tokens}  # fmt: skip
    _progress(f"llama.cpp {config.intermediate} vs PyTorch on {len(diff)} prompts: mean |dp| {diff.mean():.4f}, "
              f"max {diff.max():.4f}; identical token ids on {same_tokens:.0%}", progress)  # fmt: skip
    if diff.mean() > 0.01:
        raise ExportError(f"GGUF parity failed: mean |dp| {diff.mean():.4f} > 0.01")

    # quantizations against F16: |dp| on the parity prompts, AUC on validation samples the router sends
    from runtime.crm import CRMSession

    valid_p = CRMSession(staging / "crm.onnx", ["cpu"]).predict(prepared.take(valid_rows))
    group_size = read_json(run / "run.json")["config"].get("joint", {}).get("group_size", 16)
    routed = _RoutedValidation(samples, valid_rows, valid_p, router["threshold"], config.routed_samples, group_size,
                               rng, lambda path: LlamaScorer(path, yes, no, settings), template, bos)  # fmt: skip
    labels = routed.labels
    base_routed = routed.score(merged_path, config.intermediate)
    quants: dict[str, Any] = {config.intermediate: {"routed_auc": auc(labels, base_routed),
                                                    "size": merged_path.stat().st_size}}  # fmt: skip
    routed_scores = {config.intermediate: base_routed}

    def measure(quant: str) -> float:
        """Quantize, score the parity and routed prompts; the routed AUC it loses against the intermediate."""
        path = work / f"llm-{quant}.gguf"
        q = quantize_gguf(merged_path, path, quant, config.threads)
        dp = np.abs(llama_scores(path, texts) - base_p)
        routed_scores[quant] = routed.score(path, quant)
        cost = quants[config.intermediate]["routed_auc"] - auc(labels, routed_scores[quant])
        quants[quant] = {
            f"mean_abs_dp_vs_{config.intermediate}": float(dp.mean()),
            f"max_abs_dp_vs_{config.intermediate}": float(dp.max()),
            "routed_auc": auc(labels, routed_scores[quant]), "routed_auc_cost": cost,
            "size": q["size"], "quantize_seconds": q["seconds"],
        }  # fmt: skip
        _progress(f"{quant}: mean |dp| {dp.mean():.4f} (max {dp.max():.4f}) vs {config.intermediate}; AUC on "
                  f"{len(labels)} routed validation samples {quants[quant]['routed_auc']:.4f} vs "
                  f"{quants[config.intermediate]['routed_auc']:.4f}", progress)  # fmt: skip
        return cost

    choice = _choose_quant(config, measure, len(labels))
    quant = choice["kept"]
    _progress(f"quantization: {quant} ({choice['reason']})", progress)
    shipped = f"llm-{quant}.gguf"
    measured = quant if quant not in ("f16", "f32") else config.intermediate
    shipped_routed = routed_scores[measured]
    calibration_info = _refit_calibration(router, shipped_routed, labels, shipped, progress)
    router["expected_gain"] = routed.gain(shipped_routed, measured) | {"fraction": router["fraction"],
                                                                       "measured_with": shipped}  # fmt: skip
    _say_gain(router["expected_gain"], progress)
    _place_ggufs(config, quant, merged_path, work, staging)
    return {
        "file": shipped, "quant": quant, "quant_choice": choice, "base": llm_info["base"], "yes_token_id": yes,
        "no_token_id": no, "bos_token_id": bos, "context_size": config.context_size, "merge": merge, "parity": parity,
        "quantizations": quants, "routed_validation_samples": int(len(labels)), "routed_prefixes": len(routed.groups),
        "calibration": calibration_info,
    }  # fmt: skip


class _RoutedValidation:
    """The validation samples the router sends (a seeded sample of `count`), scored by llama.cpp under the
    snapshot rule: a user's routed rows within `group_size` interactions share one prefix, decoded once, as
    one request's candidates do. The quantizations are compared on them, the calibration refitted on them
    and the LLM's expected gain measured on them."""

    def __init__(self, samples: SampleTable, valid_rows: np.ndarray, valid_p: np.ndarray, threshold: float,
                 count: int, group_size: int, rng: np.random.Generator, open_llama: Callable[[Path], LlamaScorer],
                 template: PromptTemplate, bos: int | None) -> None:  # fmt: skip
        self.samples, self.valid_rows, self.valid_p = samples, valid_rows, valid_p
        self.mask = binary_entropy(valid_p) > threshold
        chosen = rng.choice(valid_rows[self.mask], size=min(count, int(self.mask.sum())), replace=False)
        self.groups = snapshot_groups(samples, np.sort(chosen), group_size)
        self.rows = group_rows(self.groups)
        self.labels = samples.label[self.rows]
        self.open_llama, self.template, self.bos = open_llama, template, bos
        self.seconds: dict[str, float] = {}

    def score(self, path: Path, name: str) -> np.ndarray:
        """P(yes) of every routed sample by the GGUF at `path`, in `rows` order (timed under `name`)."""
        samples, out = self.samples, []
        with self.open_llama(path) as llama:
            started = time.perf_counter()
            for group in self.groups:
                history, _ = samples.prompt_parts(group.anchor)
                targets = [samples.item_text(samples.item[r]) for r in group.rows]
                out.append(llama.score_shared(*self.template.ids(llama.tokenize, self.bos, history, targets)))
            self.seconds[name] = time.perf_counter() - started
        return np.concatenate(out) if out else np.empty(0)

    def gain(self, scores: np.ndarray, name: str) -> dict[str, Any]:
        """`expected_gain` of these answers (scored as `name`), with what a routed candidate cost."""
        position = np.searchsorted(self.valid_rows, self.rows)
        return expected_gain(self.samples.label[self.valid_rows], self.valid_p, self.mask, position, scores) | {
            "llm_ms_per_routed_candidate": 1000 * self.seconds[name] / max(1, len(self.rows)),
            "candidates_per_prefix": len(self.rows) / max(1, len(self.groups)),
        }


def _merge_llm(run: Path, llm_info: dict[str, Any], template: PromptTemplate, work: Path, config: ExportConfig,
               progress: Callable[[str], None] | None) -> tuple[LLMScorer, Path, dict[str, Any]]:  # fmt: skip
    """The base with the run's LoRA adapters, and its merged GGUF (written by us for a GGUF base, by
    llama.cpp's converter for a Hugging Face directory)."""
    from safetensors.torch import load_file

    base = resolve_base_llm(llm_info["base"])
    device = resolve_compute(config.device, "float32").device  # float32: the reference parity is judged against
    scorer = LLMScorer.load(base, template, LoRAConfig(**llm_info["lora"]), device=device)
    scorer.load_trainable_state(load_file(str(run / "final" / "llm" / "adapter.safetensors")))
    merged_path = work / f"llm-{config.intermediate}.gguf"
    if base.is_gguf:
        merge = write_merged_gguf(base.path, scorer, merged_path, config.intermediate)
    else:
        converter = config.converter
        if converter is None and config.fetch_converter:
            from export.converter import fetch_converter

            converter = fetch_converter()
            _progress(f"converter: {converter}", progress)
        merge = convert_hf_directory(scorer, work, merged_path, converter, config.intermediate)
    _progress(f"merged LoRA into {merge.get('merged_tensors', 'all')} tensors -> {merged_path.name}", progress)
    return scorer, merged_path, merge


def _refit_calibration(router: dict[str, Any], scores: np.ndarray, labels: np.ndarray, shipped: str,
                       progress: Callable[[str], None] | None) -> dict[str, float]:  # fmt: skip
    """Refit the LLM's Platt map on the shipped GGUF's own answers to the routed validation samples
    (quantization moves P(yes) by several hundredths, as much as a small LLM's whole spread); only
    where training calibrated: a run trained with --calibration-samples 0 keeps the raw swap."""
    calibration = LLMCalibration()
    if "llm_calibration" in router:
        calibration = LLMCalibration.fit(scores, labels)
        router["llm_calibration"] = calibration.to_dict() | {
            "fitted_on": f"{len(labels)} routed validation samples scored by llama.cpp with {shipped}"
        }
        if calibration.slope <= 0:
            _progress("warning: the LLM's answers carry no signal on the routed validation samples (calibration "
                      "slope 0): the bundle never decodes it, routed candidates take the CRM's answer (reason "
                      "llm_no_signal); train the LLM longer or take a larger one", progress)  # fmt: skip
    info = {"routed_logloss_raw": log_loss(labels, scores),
            "routed_logloss_calibrated": log_loss(labels, calibration.apply(scores))}  # fmt: skip
    _progress(f"LLM calibration: P = sigmoid({calibration.slope:.3f} logit(p) + {calibration.intercept:.3f}); "
              f"routed validation LogLoss {info['routed_logloss_raw']:.4f} raw -> "
              f"{info['routed_logloss_calibrated']:.4f}", progress)  # fmt: skip
    return info


def _say_gain(gain: dict[str, Any], progress: Callable[[str], None] | None) -> None:
    """The LLM's worth in one plain line; where its interval includes 0, what a routed candidate costs
    for nothing measurable, so that users decide knowingly."""
    _progress(f"the LLM's expected gain at f = {gain['fraction']:g}: {describe_gain(gain)}", progress)
    if not gain["low"] > 0:
        _progress(f"note: the LLM adds nothing measurable on these validation samples, and a routed candidate cost "
                  f"~{gain['llm_ms_per_routed_candidate']:.0f} ms of llama.cpp time here (its user's prefix decoded "
                  f"cold, ~{gain['candidates_per_prefix']:.1f} candidates a prefix; a returning user's costs only its "
                  "suffix): consider serving with --no-llm", progress)  # fmt: skip


def _place_ggufs(config: ExportConfig, quant: str, merged_path: Path, work: Path, staging: Path) -> None:
    """The shipped GGUF into the bundle; the intermediate and the compared ones where asked for."""
    shipped = f"llm-{quant}.gguf"
    if quant in ("f16", "f32"):
        shutil.copy2(merged_path, staging / shipped)
    else:
        shutil.move(str(work / shipped), staging / shipped)
    if config.keep_intermediate and quant != config.intermediate:
        shutil.copy2(merged_path, staging / merged_path.name)
    if config.quants_dir is not None:
        # beside the bundle, not in it: what `corella bench --gguf` compares the shipped model with
        Path(config.quants_dir).mkdir(parents=True, exist_ok=True)
        for path in [merged_path, *work.glob("llm-*.gguf"), staging / shipped]:
            if path.exists():
                shutil.copy2(path, Path(config.quants_dir) / path.name)


def _keep_legacy_state(out: Path, progress: Callable[[str], None] | None) -> None:
    """An older corella kept the live store inside the bundle (BUNDLE/state/): move it to the
    replaced bundle's state folder, where `corella store migrate` finds it, before the folder goes."""
    legacy = out / "state"
    if not legacy.is_dir() or not (out / MANIFEST).exists():
        return
    target = corella_home() / "state" / bundle_id(out)
    if target.exists():
        target = target.with_name(f"{target.name}-legacy-{time.strftime('%Y%m%d-%H%M%S')}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(legacy), str(target))
    _progress(f"the replaced bundle's live state moved to {target} (carry it over: corella store migrate {out})",
              progress)  # fmt: skip


def _choose_quant(config: ExportConfig, measure: Callable[[str], float], routed: int) -> dict[str, Any]:
    """Which quantization to ship, and why. `measure(quant)` quantizes and returns its routed AUC
    cost against the intermediate. A fixed --quant measures the compared ones and keeps itself;
    auto measures from the smallest file up and keeps the first within the bar."""
    if config.quant != AUTO:
        costs = {
            q: measure(q) for q in dict.fromkeys([*config.compare_quants, config.quant]) if q not in ("f16", "f32")
        }
        return {"rule": "fixed (--quant)", "tried": costs, "kept": config.quant, "reason": "asked for with --quant"}
    costs: dict[str, float] = {}
    for quant in AUTO_ORDER:
        costs[quant] = measure(quant)
        if costs[quant] <= config.quant_bar:
            reason = (f"the smallest whose routed AUC cost vs {config.intermediate} ({costs[quant]:+.4f}) is within "
                      f"{config.quant_bar} on {routed} routed validation samples")  # fmt: skip
            return {"rule": "auto", "bar": config.quant_bar, "routed_samples": routed, "tried": costs,
                    "kept": quant, "reason": reason}  # fmt: skip
    reason = f"every quantization lost more than {config.quant_bar} routed AUC vs {config.intermediate}"
    return {"rule": "auto", "bar": config.quant_bar, "routed_samples": routed, "tried": costs,
            "kept": config.intermediate, "reason": reason}  # fmt: skip


def _measure(bundle_dir: Path, work: Path, prepared: PreparedData, config: ExportConfig, run: Path,
             progress: Callable[[str], None] | None) -> dict[str, Any]:  # fmt: skip
    """Export-time quality through the runtime engine itself: CRM on the whole test split, and
    CRM-only vs hybrid on the evaluation subset the training report used."""
    samples = prepared.samples
    bundle = load_bundle(bundle_dir)
    settings = EngineSettings(providers=("cpu",), default_deadline_ms=None, llm_threads=config.threads,
                              llm_context=config.context_size, state=work / "measure-state")  # fmt: skip
    engine = Engine(bundle, settings)
    try:
        test_rows = prepared.rows("test")
        crm_test = engine.crm.predict(prepared.take(test_rows))
        metrics: dict[str, Any] = {"crm_test": summarize(samples.label[test_rows], crm_test)}
        if bundle.llm is None:
            return metrics
        count = config.eval_samples or read_json(run / "run.json")["config"].get("eval_samples", 1000)
        seed = read_json(run / "run.json")["config"]["joint"]["seed"]
        rows = evaluation_rows(prepared, count, seed)
        from runtime.engine import CandidateItem, HistoryItem, Request

        scores, routes = [], []
        for row in rows:
            req = sample_request(samples, int(row))
            answer = engine.predict(Request(
                candidates=[CandidateItem(**c) for c in req["candidates"]], user_id=req["user_id"],
                user_attributes=req["user_attributes"], history=[HistoryItem(**h) for h in req["history"]],
            ))  # fmt: skip
            scores.append(answer["predictions"][0]["score"])
            routes.append(answer["predictions"][0]["route"])
        labels = samples.label[rows]
        scores = np.array(scores)
        crm_subset = engine.crm.predict(prepared.take(rows))
        metrics["eval_subset"] = {"count": int(len(rows)), "seed": seed + 7}
        metrics["crm_only"] = summarize(labels, crm_subset)
        metrics["hybrid"] = summarize(labels, scores) | {
            "fraction": bundle.router["fraction"], "routed": int(sum(r != "crm" for r in routes)),
            "llm_answers": int(sum(r == "llm" for r in routes)),
        }  # fmt: skip
        _progress(f"export-time hybrid on {len(rows)} test samples ({metrics['hybrid']['routed']} routed): AUC "
                  f"{metrics['hybrid']['auc']:.4f} vs CRM-only {metrics['crm_only']['auc']:.4f}", progress)  # fmt: skip
        return metrics
    finally:
        engine.close()
