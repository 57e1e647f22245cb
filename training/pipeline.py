"""`corella train`: the paper's whole procedure on one run folder, then the evaluation report.

run folder layout
  run.json            corella version, the full config, seeds, stage timings
  crm/                stage 1 (see training.runs)
  stage2/ stage3/     checkpoints (state.pt) and losses.json of the LLM stages
  final/crm/          the CRM the hybrid uses (config.json, features.json, model.safetensors)
  final/llm/          adapter.safetensors (LoRA), llm.json (base model, LoRA config, answer ids)
  final/prompt.json   the prompt template
  final/router.json   entropy threshold and the fraction it was calibrated for
  metrics.json, report.md, *.png, eval_predictions.npz
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.progress import Progress
from safetensors.torch import save_file

from runtime import __version__
from runtime.errors import ConfigError
from runtime.prompt import PROMPT_VERSION, PROMPT_VERSIONS
from runtime.quality import auc, bootstrap_auc_gain, entropy_deciles, summarize
from runtime.router import LLMCalibration, binary_entropy, calibrate_threshold, route_by_threshold
from training.baselines import two_number_baseline
from training.checkpoint import read_json, save_weights, write_json
from training.crm_trainer import CRMTrainConfig, load_crm, predict, to_tensors
from training.data import SampleTable
from training.dcnv2 import DCNv2, DCNv2Config
from training.device import Compute, resolve_compute
from training.groups import (
    GroupPrompts,
    PrefixGroup,
    group_rows,
    pack_steps,
    snapshot_groups,
    take_samples,
    uncertain_rows,
    user_groups,
)
from training.joint import (
    AlignmentHeads,
    JointConfig,
    default_alignment_pairs,
    llm_forward,
    run_stage,
    summarize_losses,
)
from training.llm import LLMScorer, LoRAConfig, resolve_base_llm
from training.runs import DataConfig, PreparedData, prepare_data, run_crm_stage

__all__ = ["CoReLLaConfig", "PRESETS", "train_corella", "score_llm", "score_groups"]

log = logging.getLogger(__name__)

FRACTIONS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


class CoReLLaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = "movielens-100k"
    source: str | None = Field(None, description="raw data folder instead of the cache")
    history_length: int = Field(10, ge=1, le=200)
    llm: str = Field("gemma3-270m", description="base LLM: a name, a .gguf path or an HF directory")
    max_prompt_tokens: int = Field(320, ge=64, le=8192, description="prompt budget; history is cut oldest first")
    prompt_version: int = Field(PROMPT_VERSION, description="the prompt's rendering (runtime/prompt.py): "
                                f"{' or '.join(map(str, PROMPT_VERSIONS))}")  # fmt: skip
    crm: DCNv2Config = DCNv2Config()
    crm_train: CRMTrainConfig = CRMTrainConfig()
    lora: LoRAConfig = LoRAConfig()
    joint: JointConfig = JointConfig()
    eval_samples: int = Field(1000, ge=10, description="test samples the LLM is scored on (seeded)")
    router_fraction: float = Field(0.1, gt=0, le=1, description="share of requests the router sends to the LLM")
    full_test_hybrid: bool = Field(
        True,
        description="also score the LLM on every test sample the router sends at the router fraction, so the "
        "hybrid at f <= that fraction is measured on the whole test split",
    )
    calibration_samples: int = Field(
        1000, ge=0, description="routed validation samples the LLM's Platt calibration is fitted on (0 = raw swap)"
    )
    fractions: list[float] = Field(FRACTIONS, description="hybrid fractions in the report")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    device: str = Field("auto", description="auto (CUDA where torch sees a card, else the CPU), cpu, cuda or cuda:N")
    dtype: str = Field("auto", description="the LLM's weights: auto (bfloat16 on CUDA, float32 on the CPU), "
                       "float32, bfloat16 or float16")  # fmt: skip
    score_batch_size: int = Field(8, ge=1, le=4096, description="prompts per forward pass when scoring the LLM")

    @field_validator("prompt_version")
    @classmethod
    def _known_prompt(cls, version: int) -> int:
        if version not in PROMPT_VERSIONS:
            raise ValueError(f"prompt version {version} is not one of {', '.join(map(str, PROMPT_VERSIONS))}")
        return version


PRESETS: dict[str, dict[str, Any]] = {
    # ~25 min on 2 cores with Gemma 3 270M
    "default": {},
    # ~10 min on 2 cores
    "quick": {
        "joint": {"stage2_samples": 256, "stage3_samples": 256},
        "eval_samples": 400,
        "calibration_samples": 500,
        "full_test_hybrid": False,
    },
}


#: What changes on a CUDA device, under the preset and above the user's own options: larger batches
#: (four groups of 16 a step: a GPU is mostly idle at one) and the LoRA rate scaled by the square root
#: of the batch ratio (not yet measured on a GPU: check stage-2 losses before trusting it).
DEVICE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "cuda": {"joint": {"batch_size": 64, "llm_learning_rate": 6e-4}, "score_batch_size": 64},
}


@torch.no_grad()
def score_groups(
    scorer: LLMScorer,
    prompts: GroupPrompts,
    groups: Sequence[PrefixGroup],
    batch_size: int = 8,
    description: str = "scoring LLM",
    shared_prefix: bool = True,
) -> np.ndarray:
    """P(yes) of every candidate of `groups`, in `group_rows(groups)` order. Groups of one are run whole,
    `batch_size` prompts of similar length a pass; a larger group runs its prefix once and its
    candidates' suffixes as one batch against it (with `shared_prefix`)."""
    scorer.eval()
    starts = np.cumsum([0] + [len(g) for g in groups])
    out = np.empty(int(starts[-1]), dtype=np.float64)
    whole = sorted((i for i, g in enumerate(groups) if len(g) == 1 or not shared_prefix),
                   key=lambda i: len(prompts(groups[i])[0]))  # fmt: skip
    passes: list[tuple[bool, list[int]]] = []
    current, count = [], 0
    for i in whole:  # prompts of similar length share a padded batch
        current.append(i)
        count += len(groups[i])
        if count >= batch_size:
            passes.append((False, current))
            current, count = [], 0
    if current:
        passes.append((False, current))
    passes += [(True, [i]) for i, g in enumerate(groups) if len(g) > 1 and shared_prefix]
    with Progress() as progress:
        task = progress.add_task(description, total=len(out))
        for shared, chosen in passes:
            logit, _ = llm_forward(scorer, [prompts(groups[i]) for i in chosen], shared,
                                   rows=group_rows([groups[i] for i in chosen]))  # fmt: skip
            p = torch.sigmoid(logit.double()).cpu().numpy()
            at = 0
            for i in chosen:
                out[starts[i] : starts[i + 1]] = p[at : at + len(groups[i])]
                at += len(groups[i])
            progress.update(task, advance=at)
    return out


def score_llm(
    scorer: LLMScorer,
    prompts: GroupPrompts,
    rows: np.ndarray,
    batch_size: int = 8,
    description: str = "scoring LLM",
) -> np.ndarray:
    """P(yes) for each row with its own exact history. Rows whose histories are the same (the same
    prefix, token for token: a user's interactions within one second, or users with no past) share
    their prefix's pass."""
    groups = same_history_groups(prompts.samples, rows)
    p = score_groups(scorer, prompts, groups, batch_size, description)
    by_row = dict(zip(group_rows(groups).tolist(), p.tolist(), strict=True))
    return np.array([by_row[int(r)] for r in rows], dtype=np.float64)


def same_history_groups(samples: SampleTable, rows: np.ndarray) -> list[PrefixGroup]:
    """`rows` grouped by identical histories (their prompts share the prefix exactly)."""
    by_history: dict[tuple[int, ...], list[int]] = {}
    for row in np.asarray(rows).tolist():
        by_history.setdefault(tuple(samples.history[row].tolist()), []).append(int(row))
    return [PrefixGroup(members[0], tuple(members)) for members in by_history.values()]


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def preset_config(preset: str, overrides: dict[str, Any] | None = None) -> CoReLLaConfig:
    """The preset, then what the device changes (DEVICE_PRESETS), then the user's own options."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = overrides or {}
    device = resolve_compute(overrides.get("device", "auto"), overrides.get("dtype", "auto")).device.type
    return CoReLLaConfig(**_merge(_merge(PRESETS[preset], DEVICE_PRESETS[device]), overrides))


@dataclass
class _Models:
    """What the LLM stages train: the stage-1 CRM (kept), its copy for joint training, the LLM
    scorer, the alignment heads (None without alignment) and the LLM block of each cross layer."""

    crm_stage1: DCNv2
    crm: DCNv2
    scorer: LLMScorer
    heads: AlignmentHeads | None
    blocks: list[int]


class _Clock:
    """Stage timings: `with clock("stage2"): ...` records the seconds the block took."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started


def recorded_config(out: Path) -> CoReLLaConfig | None:
    """The configuration a run folder was started with (for --resume), or None where it has none. A
    run from before prompt versions were recorded was trained on version 3."""
    if not (out / "run.json").exists() or "config" not in (recorded := read_json(out / "run.json")):
        return None
    return CoReLLaConfig(**{"prompt_version": 3} | recorded["config"])


#: options that may change when a run is resumed: where and how fast it runs, not what it trains
_RESUMABLE_CHANGES = frozenset({"threads"})


def resumed_config(out: Path, config: CoReLLaConfig, given: dict[str, Any] | None = None) -> CoReLLaConfig:
    """The configuration a resumed run goes on with: the one it was started with. Options `given`
    on the command line that differ from it are refused (ConfigError, naming them), except those in
    `_RESUMABLE_CHANGES`, which apply; a resume never silently drops an option."""
    recorded = recorded_config(out)
    if recorded is None:
        return config
    before = recorded.model_dump()
    conflicts, changes = [], {}
    for path, value in _flatten(given or {}):
        if value is None:
            continue
        was = before
        for part in path:
            was = was.get(part) if isinstance(was, dict) else None
        if was == value or (isinstance(was, float | int) and isinstance(value, float | int) and float(was) == value):
            continue
        if path[-1] in _RESUMABLE_CHANGES and len(path) == 1:
            changes[path[0]] = value
        else:
            conflicts.append(f"{'.'.join(path)} {was!r} there, {value!r} given")
    if conflicts:
        raise ConfigError(f"--resume continues the run in {out} as it was started, and these options differ from "
                          f"it: {'; '.join(conflicts)}. Drop them, or start a new run with another --out")  # fmt: skip
    return recorded.model_copy(update=changes)


def _flatten(options: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    items: list[tuple[tuple[str, ...], Any]] = []
    for key, value in options.items():
        if isinstance(value, dict):
            items += _flatten(value, (*prefix, key))
        else:
            items.append(((*prefix, key), value))
    return items


def train_corella(
    out: Path,
    config: CoReLLaConfig,
    resume: bool = False,
    crm_run: Path | None = None,
    show_progress: bool = True,
    given: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stages 1-3 and the report. With resume, completed stages are reloaded, not re-run; `given`:
    the options the user set, checked against the run's own (see `resumed_config`)."""
    out = Path(out)
    if config.threads:
        torch.set_num_threads(config.threads)
    if out.exists() and any(out.iterdir()) and not resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume:
        config = resumed_config(out, config, given)
    compute = resolve_compute(config.device, config.dtype)
    log.info("training on %s", compute.describe())
    torch.manual_seed(config.joint.seed)
    clock = _Clock()
    data_config = DataConfig(config.dataset, config.source, config.history_length)
    with clock("stage1"):
        crm_stage1, prepared = _stage1(out, config, data_config, resume, crm_run, show_progress, compute)
    write_json(out / "run.json", {"corella_version": __version__, "config": config.model_dump(),
                                  "data": data_config.to_dict(), "compute": compute.to_dict()})  # fmt: skip
    with clock("llm_load"):
        models = _load_models(config, prepared, crm_stage1, compute)
    prompts = GroupPrompts(prepared.samples, models.scorer)
    stages = _llm_stages(out, config, prepared, models, prompts, clock, show_progress)
    final_crm, valid_probabilities, crm_choice = _choose_crm(prepared, models, config.joint)
    _save_final(out, config, prepared, final_crm, models.scorer)
    with clock("calibration"):
        # the LLM's and the CRM's answers on the calibration and the routed test samples, saved beside the
        # evaluation subset's: any other calibration (a blend of both, say) can be judged on them offline
        recorded: dict[str, np.ndarray] = {}
        calibration = _save_router(out / "final", config, prepared, valid_probabilities, models.scorer, prompts,
                                   recorded)  # fmt: skip
    with clock("evaluation"):
        metrics, predictions = evaluate_run(
            prepared, final_crm, crm_stage1, models.scorer, prompts, valid_probabilities, config, calibration, recorded
        )
        np.savez(out / "eval_predictions.npz", **predictions, **recorded)
    metrics.update({"stages": stages, "crm_choice": crm_choice, "timings_seconds": clock.seconds,
                    "alignment_blocks": models.blocks, "ablation": ablation_name(config.joint),
                    "llm_training": llm_training_summary(config)})  # fmt: skip
    write_json(out / "metrics.json", metrics)
    from training.report import write_report

    write_report(out, metrics)
    return metrics


def _stage1(out: Path, config: CoReLLaConfig, data_config: DataConfig, resume: bool, crm_run: Path | None,
            show_progress: bool, compute: Compute) -> tuple[DCNv2, PreparedData]:  # fmt: skip
    """The stage-1 CRM: reused from another run, reloaded when done, else trained."""
    if crm_run is not None:
        crm_stage1, spec = load_crm(Path(crm_run) / "crm", compute.device)
        if not (out / "crm").exists():
            shutil.copytree(Path(crm_run) / "crm", out / "crm")
        return crm_stage1, prepare_data(data_config, spec)
    if (out / "crm" / "metrics.json").exists():
        crm_stage1, spec = load_crm(out / "crm", compute.device)
        return crm_stage1, prepare_data(data_config, spec)
    crm_stage1, prepared, _ = run_crm_stage(
        out, data_config, config.crm, config.crm_train, resume=resume, show_progress=show_progress,
        device=compute.device,
    )  # fmt: skip
    return crm_stage1, prepared


def _load_models(config: CoReLLaConfig, prepared: PreparedData, crm_stage1: DCNv2, compute: Compute) -> _Models:
    scorer = LLMScorer.load(resolve_base_llm(config.llm), prepared.samples.prompt_template(config.max_prompt_tokens,
                                                                                        version=config.prompt_version),
                            config.lora, dtype=compute.llm_dtype, device=compute.device,
                            gradient_checkpointing=config.joint.gradient_checkpointing)  # fmt: skip
    crm = DCNv2(prepared.spec, crm_stage1.config)
    crm.load_state_dict(crm_stage1.state_dict())
    crm.to(compute.device)
    joint = config.joint
    blocks = joint.alignment_blocks or default_alignment_pairs(len(crm.cross), scorer.num_layers)
    if len(blocks) != len(crm.cross) or not all(1 <= b <= scorer.num_layers for b in blocks):
        raise ConfigError(
            f"alignment blocks {blocks} must name one LLM block in 1..{scorer.num_layers} per cross layer "
            f"({len(crm.cross)})"
        )
    if joint.crm_token:

        def crm_vectors(rows: np.ndarray) -> torch.Tensor:  # gradients reach the CRM only while it trains
            with torch.set_grad_enabled(torch.is_grad_enabled() and crm.training):
                return crm.representation(**to_tensors(prepared.inputs, rows, compute.device))

        scorer.enable_crm_token(crm.representation_dim, crm_vectors)
    heads = None
    if not joint.llm_alone and joint.alignment_weight > 0:
        heads = AlignmentHeads(crm.input_dim, scorer.hidden_size, len(blocks), joint.alignment_dim).to(compute.device)
    return _Models(crm_stage1, crm, scorer, heads, blocks)


def _llm_stages(out: Path, config: CoReLLaConfig, prepared: PreparedData, models: _Models, prompts: GroupPrompts,
                clock: _Clock, show_progress: bool) -> dict[str, Any]:  # fmt: skip
    """Stage 2 (joint, with alignment) and stage 3 (the LLM alone) on seeded training subsets: groups
    of a user's next `group_size` training interactions after a cut (training.groups), drawn at
    from all training rows at random or, with llm_samples "uncertain", from the rows the stage-1 CRM is
    least sure of (training.groups.uncertain_rows)."""
    joint = config.joint
    rng = np.random.default_rng(joint.seed)
    rows = prepared.rows("train")
    if joint.llm_samples == "uncertain":
        entropy = np.zeros(len(prepared.samples))
        entropy[rows] = binary_entropy(predict(models.crm_stage1, prepared.take(rows)).astype(np.float64))
        rows = uncertain_rows(rows, entropy, 2 * (joint.stage2_samples + joint.stage3_samples), config.router_fraction)
    groups = user_groups(prepared.samples, rows, joint.group_size, rng)
    stage2_groups, rest = take_samples(groups, joint.stage2_samples)
    stage3_groups, _ = take_samples(rest, joint.stage3_samples)
    stage2_steps = pack_steps(epoch_order(stage2_groups, joint.stage2_epochs, rng), joint.batch_size)
    stage3_steps = pack_steps(epoch_order(stage3_groups, joint.stage3_epochs, rng), joint.batch_size)

    def crm_inputs(rows: np.ndarray) -> dict[str, torch.Tensor]:
        return to_tensors(prepared.inputs, rows, models.scorer.device)

    labels, stages = prepared.samples.label, {}
    plan = [("stage2", "joint", stage2_steps, None if joint.llm_alone else models.crm, models.heads)]
    if not joint.skip_stage3 and stage3_steps:
        plan.append(("stage3", "llm", stage3_steps, None, None))
    for name, kind, rows, crm, heads in plan:
        with clock(name):
            result = run_stage(kind, out / name, rows, labels, crm_inputs, prompts, models.scorer, crm, heads,
                               models.blocks, joint, show_progress)  # fmt: skip
        stages[name] = result.model_dump(exclude={"losses"}) | {"loss": summarize_losses(result.losses),
                                                                 "samples_per_second": result.samples / result.seconds
                                                                 if result.seconds else None}  # fmt: skip
    return stages


def _choose_crm(
    prepared: PreparedData, models: _Models, joint: JointConfig
) -> tuple[DCNv2, np.ndarray, dict[str, Any]]:
    """The CRM the hybrid uses: the jointly trained one where it is at least as good on validation."""
    valid_rows = prepared.rows("valid")
    labels = prepared.samples.label[valid_rows]
    valid_stage1 = predict(models.crm_stage1, prepared.take(valid_rows))
    valid_joint = predict(models.crm, prepared.take(valid_rows))
    choice: dict[str, Any] = {
        "stage1_valid_auc": auc(labels, valid_stage1),
        "stage2_valid_auc": auc(labels, valid_joint),
    }
    use_joint = not joint.llm_alone and choice["stage2_valid_auc"] >= choice["stage1_valid_auc"]
    choice["used"] = "stage2" if use_joint else "stage1"
    if use_joint:
        return models.crm, valid_joint, choice
    return models.crm_stage1, valid_stage1, choice


def _save_final(out: Path, config: CoReLLaConfig, prepared: PreparedData, crm: DCNv2, scorer: LLMScorer) -> None:
    """final/: the CRM, the LoRA adapter with what export needs about the base, the prompt."""
    final = out / "final"
    (final / "crm").mkdir(parents=True, exist_ok=True)
    (final / "llm").mkdir(parents=True, exist_ok=True)
    save_weights(final / "crm" / "model.safetensors", crm)
    shutil.copy2(out / "crm" / "config.json", final / "crm" / "config.json")
    prepared.spec.save(final / "crm" / "features.json")
    save_file(
        {k: v.contiguous() for k, v in scorer.trainable_state().items()}, str(final / "llm" / "adapter.safetensors")
    )
    base = scorer.base
    write_json(final / "llm" / "llm.json", {
        "base": config.llm, "base_path": str(base.path), "base_is_gguf": base.is_gguf,
        "lora": config.lora.model_dump(), "yes_token_id": scorer.yes_id, "no_token_id": scorer.no_id,
        "bos_token_id": scorer.bos_id, "num_layers": scorer.num_layers, "crm_token": config.joint.crm_token,
    })  # fmt: skip
    scorer.template.save(final / "prompt.json")


def _save_router(final: Path, config: CoReLLaConfig, prepared: PreparedData, valid_probabilities: np.ndarray,
                 scorer: LLMScorer, prompts: GroupPrompts, record: dict[str, np.ndarray] | None = None,
                 ) -> LLMCalibration:  # fmt: skip
    """router.json: the entropy threshold for the router fraction and the LLM's calibration."""
    threshold = calibrate_threshold(binary_entropy(valid_probabilities), config.router_fraction)
    router: dict[str, Any] = {"fraction": config.router_fraction, "threshold": threshold,
                              "calibrated_on": "validation split, full"}  # fmt: skip
    calibration = fit_calibration(prepared, prepared.rows("valid"), valid_probabilities, threshold, scorer, prompts,
                                  config, record)  # fmt: skip
    if calibration.samples:
        router["llm_calibration"] = calibration.to_dict() | {
            "fitted_on": f"{calibration.samples} routed validation samples (seeded), PyTorch model; "
            "corella export refits it on the shipped GGUF"
        }
    write_json(final / "router.json", router)
    return calibration


def epoch_order(groups: list[PrefixGroup], epochs: int, rng: np.random.Generator) -> list[PrefixGroup]:
    """`epochs` passes over `groups`, each in a fresh seeded order (deterministic, so resume sees the same list)."""
    if epochs <= 1 or not groups:
        return groups
    return groups + [groups[i] for _ in range(epochs - 1) for i in rng.permutation(len(groups))]


def fit_calibration(
    prepared: PreparedData,
    valid_rows: np.ndarray,
    valid_probabilities: np.ndarray,
    threshold: float,
    scorer: LLMScorer,
    prompts: GroupPrompts,
    config: CoReLLaConfig,
    record: dict[str, np.ndarray] | None = None,
) -> LLMCalibration:
    """Platt-scale the LLM on a seeded sample of the validation rows the router sends to it, scored
    under the snapshot rule (a user's routed rows within `group_size` interactions share the history
    of the first, as one request's candidates do): with shared prefixes, ~1,000 cost what ~200 did."""
    routed = valid_rows[route_by_threshold(binary_entropy(valid_probabilities), threshold)]
    count = min(config.calibration_samples, len(routed))
    if count < 2:
        return LLMCalibration()
    rows = np.sort(np.random.default_rng(config.joint.seed + 11).choice(routed, size=count, replace=False))
    groups = snapshot_groups(prepared.samples, rows, config.joint.group_size)
    description = f"calibrating the LLM on {count} routed validation samples ({len(groups)} prefixes)"
    p = score_groups(scorer, prompts, groups, config.score_batch_size, description)
    scored = group_rows(groups)
    if record is not None:
        crm = dict(zip(valid_rows.tolist(), np.asarray(valid_probabilities).tolist(), strict=True))
        record |= {"calibration_rows": scored, "calibration_llm": p,
                   "calibration_labels": prepared.samples.label[scored],
                   "calibration_crm": np.array([crm[r] for r in scored.tolist()])}  # fmt: skip
    return LLMCalibration.fit(p, prepared.samples.label[scored])


def evaluate_full_test(
    prepared: PreparedData,
    test_rows: np.ndarray,
    crm_test: np.ndarray,
    scored: dict[int, float],
    valid_entropy: np.ndarray,
    scorer: LLMScorer,
    prompts: GroupPrompts,
    config: CoReLLaConfig,
    calibration: LLMCalibration,
    record: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """CRM-only vs hybrid on the whole test split for every f <= the router fraction.

    The hybrid needs the LLM only where it routes, so the LLM is scored on every test sample above
    the router's threshold (reusing the evaluation subset's scores): no sampling at all."""
    labels = prepared.samples.label[test_rows]
    entropy = binary_entropy(crm_test)
    widest = route_by_threshold(entropy, calibrate_threshold(valid_entropy, config.router_fraction))
    routed_rows = test_rows[widest]
    missing = np.array([r for r in routed_rows.tolist() if r not in scored], dtype=np.int64)
    if len(missing):
        description = f"scoring LLM on {len(missing)} more routed test samples"
        fresh = score_llm(scorer, prompts, missing, config.score_batch_size, description=description)
        scored = scored | dict(zip(missing.tolist(), fresh.tolist(), strict=True))
    llm_raw = np.full(len(test_rows), np.nan)
    llm_raw[widest] = [scored[r] for r in routed_rows.tolist()]
    if record is not None:
        record |= {"routed_test_rows": routed_rows, "routed_test_llm": llm_raw[widest],
                   "routed_test_crm": crm_test[widest], "routed_test_labels": labels[widest],
                   "test_crm": crm_test, "test_labels": labels, "test_routed": widest}  # fmt: skip
    llm_calibrated = llm_raw.copy()
    llm_calibrated[widest] = calibration.apply(llm_raw[widest])
    hybrid, hybrid_raw, answers = [], [], {}
    for fraction in [f for f in config.fractions if f <= config.router_fraction]:
        routed = route_by_threshold(entropy, calibrate_threshold(valid_entropy, fraction))
        row = {"fraction": fraction, "routed": int(routed.sum())}
        answers = {"calibrated": np.where(routed, llm_calibrated, crm_test), "raw": np.where(routed, llm_raw, crm_test)}
        hybrid.append(row | summarize(labels, answers["calibrated"]))
        hybrid_raw.append(row | summarize(labels, answers["raw"]))
    # the gain at the widest fraction, with a paired bootstrap interval over the test rows
    gain = {name: bootstrap_auc_gain(labels, crm_test, p, seed=config.joint.seed) for name, p in answers.items()}
    return {
        "description": f"all {len(test_rows)} test samples; the LLM scored on the {int(widest.sum())} the router "
        f"sends at f = {config.router_fraction:g} (entropy above the validation threshold)",
        "count": int(len(test_rows)),
        "llm_scored": int(widest.sum()),
        "crm_only": summarize(labels, crm_test),
        "hybrid": hybrid,
        "hybrid_raw": hybrid_raw,
        "gain_over_crm": {
            "fraction": hybrid[-1]["fraction"] if hybrid else None,
            "interval": "95%, paired bootstrap",
            **gain,
        },  # fmt: skip
        "routed": {
            "count": int(widest.sum()),
            "positive_rate": float(labels[widest].mean()) if widest.any() else float("nan"),
            "crm_auc": auc(labels[widest], crm_test[widest]),
            "llm_auc": auc(labels[widest], llm_raw[widest]),
        },
    }


def llm_training_summary(config: CoReLLaConfig) -> dict[str, Any]:
    """How the LLM's samples were drawn and run, and how it was judged (for the report)."""
    joint = config.joint
    return {
        "group_size": joint.group_size, "shared_prefix": joint.shared_prefix, "llm_samples": joint.llm_samples,
        "crm_token": joint.crm_token,
        "batch_size": joint.batch_size,
        "training_rule": f"groups of a user's next {joint.group_size} "
        + ("training interactions" if joint.llm_samples == "random" else
           f"uncertain training interactions (the stage-1 CRM's most uncertain {config.router_fraction:.0%} of "
           "the training rows, or more where the stages need more)")
        + " after a cut share the history before the cut (leak-free: every candidate lies after it); the CRM keeps "
        "each sample's own features",
        "evaluation_rule": "every test sample with its own exact history, for the LLM as for the CRM (samples whose "
        "histories coincide share one prefix pass)",
        "calibration_rule": f"routed validation samples under the snapshot rule: a user's routed samples within "
        f"{joint.group_size} interactions share the first one's history, as one request's candidates do",
    }  # fmt: skip


def ablation_name(joint: JointConfig) -> str:
    if joint.llm_alone:
        return "llm-alone (TALLRec)"
    parts = []
    if joint.alignment_weight == 0:
        parts.append("no alignment")
    if joint.skip_stage3:
        parts.append("no stage 3")
    return ", ".join(parts) or "full CoReLLa"


def evaluation_rows(prepared: PreparedData, count: int, seed: int) -> np.ndarray:
    """The test samples the LLM is scored on: a seeded uniform sample, sorted (or all of them)."""
    test = prepared.rows("test")
    if count >= len(test):
        return test
    return np.sort(np.random.default_rng(seed + 7).choice(test, size=count, replace=False))


def evaluate_run(
    prepared: PreparedData,
    crm: DCNv2,
    crm_stage1: DCNv2,
    scorer: LLMScorer,
    prompts: GroupPrompts,
    valid_probabilities: np.ndarray,
    config: CoReLLaConfig,
    calibration: LLMCalibration | None = None,
    record: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every model on the same seeded test subset; the router calibrated on validation."""
    samples = prepared.samples
    test_rows = prepared.rows("test")
    rows = evaluation_rows(prepared, config.eval_samples, config.joint.seed)
    labels = samples.label[rows]
    crm_test = predict(crm, prepared.take(test_rows))
    crm_p = predict(crm, prepared.take(rows))
    description = f"scoring LLM on {len(rows)} test samples"
    llm_p = score_llm(scorer, prompts, rows, config.score_batch_size, description=description)
    entropy = binary_entropy(crm_p)
    valid_entropy = binary_entropy(valid_probabilities)
    calibration = calibration or LLMCalibration()
    llm_calibrated = calibration.apply(llm_p)
    hybrid, hybrid_raw = [], []
    for fraction in config.fractions:
        threshold = calibrate_threshold(valid_entropy, fraction)
        routed = route_by_threshold(entropy, threshold)
        row = {"fraction": fraction, "threshold": threshold, "routed": int(routed.sum())}
        hybrid.append(row | summarize(labels, np.where(routed, llm_calibrated, crm_p)))
        hybrid_raw.append(row | summarize(labels, np.where(routed, llm_p, crm_p)))
    top = np.argsort(-entropy, kind="stable")[: max(1, int(round(0.1 * len(rows))))]
    baseline = two_number_baseline(samples)
    baseline_test = dict(zip(test_rows.tolist(), baseline.pop("probabilities").tolist(), strict=True))
    metrics = {
        "dataset": config.dataset,
        "llm": config.llm,
        "eval_subset": {
            "description": f"{len(rows)} of {len(test_rows)} test samples, drawn uniformly with seed "
            f"{config.joint.seed + 7}; every model is scored on exactly these",
            "count": int(len(rows)),
            "sha256": hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest(),
        },
        "baseline": baseline | {"subset": summarize(labels, np.array([baseline_test[r] for r in rows.tolist()]))},
        "crm_full_test": summarize(samples.label[test_rows], crm_test),
        "crm_stage1_full_test": summarize(samples.label[test_rows], predict(crm_stage1, prepared.take(test_rows))),
        "crm_only": summarize(labels, crm_p),
        "llm_only": summarize(labels, llm_p),
        "llm_calibration": calibration.to_dict(),
        "llm_only_calibrated": summarize(labels, llm_calibrated),
        "hybrid": hybrid,
        "hybrid_raw": hybrid_raw,
        "uncertain_10pct": {
            "count": int(len(top)),
            "crm_auc": auc(labels[top], crm_p[top]),
            "llm_auc": auc(labels[top], llm_p[top]),
        },
        "entropy_deciles": entropy_deciles(labels, crm_p, {"llm": llm_p}),
    }
    if config.full_test_hybrid:
        metrics["full_test"] = evaluate_full_test(
            prepared, test_rows, crm_test, dict(zip(rows.tolist(), llm_p.tolist(), strict=True)),
            valid_entropy, scorer, prompts, config, calibration, record,
        )  # fmt: skip
    predictions = {"rows": rows, "labels": labels, "crm": crm_p, "llm": llm_p, "llm_calibrated": llm_calibrated,
                   "entropy": entropy}  # fmt: skip
    return metrics, predictions
