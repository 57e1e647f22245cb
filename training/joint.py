"""Stages 2 and 3 of CoReLLa: joint training with layer-wise alignment, then the LLM alone.

Stage 2 minimises  a * L_llm + b * L_crm + g * L_align  on a random subset of the training split.
L_align pairs each CRM cross layer T_j with an LLM block S_j; both hidden states (the LLM's at the
last prompt token) are projected by small heads into one space and their L2 distance is summed
over the pairs, which keeps the two models' decision boundaries from drifting apart.
Stage 3 continues the LLM alone on another subset (the paper's answer to the seesaw where the CRM
degrades while the LLM improves).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from training.checkpoint import load_state, save_state, write_json
from training.dcnv2 import DCNv2
from training.groups import GroupPrompts, PrefixGroup, group_rows
from training.llm import LLMScorer

__all__ = ["JointConfig", "AlignmentHeads", "default_alignment_pairs", "StageResult", "run_stage", "llm_forward"]

log = logging.getLogger(__name__)


class JointConfig(BaseModel):
    """Stages 2 and 3; defaults sized for a 2-core CPU and Gemma 3 270M."""

    model_config = ConfigDict(extra="forbid")

    stage2_samples: int = Field(1536, ge=0, description="training samples for joint training")
    stage3_samples: int = Field(1536, ge=0, description="training samples for LLM-only training")
    stage2_epochs: int = Field(1, ge=1, le=100, description="passes over the stage-2 subset")
    stage3_epochs: int = Field(1, ge=1, le=100, description="passes over the stage-3 subset")
    batch_size: int = Field(16, ge=1, le=256, description="candidates per optimizer step (whole groups)")
    group_size: int = Field(
        16, ge=1, le=256,
        description="candidates per user prefix: a user's next K training interactions after a cut share the history "
        "before it (1: every sample with its own exact history)",
    )  # fmt: skip
    shared_prefix: bool = Field(
        True, description="run each group's prefix once and its suffixes against the cached prefix (False: every "
        "prompt whole; the same answers and gradients, ~10x the tokens)",
    )  # fmt: skip
    llm_learning_rate: float = Field(3e-4, gt=0, description="AdamW rate of the LoRA adapters")
    crm_learning_rate: float = Field(1e-4, ge=0, description="Adam rate of the CRM in stage 2")
    align_learning_rate: float = Field(1e-3, gt=0, description="Adam rate of the alignment heads")
    llm_weight: float = Field(1.0, ge=0, description="a: weight of the LLM loss")
    crm_weight: float = Field(1.0, ge=0, description="b: weight of the CRM loss")
    alignment_weight: float = Field(0.1, ge=0, description="g: weight of the alignment loss (0 = off)")
    alignment_dim: int = Field(64, ge=2, le=4096, description="shared space of the alignment heads")
    alignment_blocks: list[int] | None = Field(
        None, description="LLM block paired with each cross layer (default: evenly spaced)"
    )
    llm_samples: Literal["random", "uncertain"] = Field(
        "random", description="which training samples the LLM sees: random, or the stage-1 CRM's most uncertain "
        "training rows (the router's fraction of them, or twice the stages' samples where that is more: the kind "
        "of sample the router will send it)",
    )  # fmt: skip
    crm_token: bool = Field(
        False, description="experiment (lever e): the LLM also reads the CRM's representation of each candidate, "
        "projected into its input space and added at the answer position; export does not serve it yet",
    )  # fmt: skip
    skip_stage3: bool = Field(False, description="ablation: no LLM-only stage")
    llm_alone: bool = Field(False, description="ablation (TALLRec): train the LLM alone on the same samples, no CRM")
    grad_accumulation: int = Field(
        1, ge=1, le=256,
        description="micro-batches each step's batch is split into, gradients summed: the same step in less memory",
    )  # fmt: skip
    gradient_checkpointing: bool = Field(
        False, description="recompute the LLM's activations in the backward pass (less memory, more compute)"
    )
    checkpoint_every: int = Field(25, ge=1, description="optimizer steps between checkpoints")
    seed: int = Field(42, description="seed of subsets, dropout and initialisation")


def default_alignment_pairs(num_cross_layers: int, num_llm_blocks: int) -> list[int]:
    """Cross layer j is paired with block round((j + 1) * N / (C + 1)), evenly spaced in depth."""
    return [
        max(1, min(num_llm_blocks, round((j + 1) * num_llm_blocks / (num_cross_layers + 1))))
        for j in range(num_cross_layers)
    ]


class AlignmentHeads(nn.Module):
    """g_crm, g_llm per pair: LayerNorm (no affine) then Linear into the shared space.

    The normalisation puts a CRM cross layer (values near 1) and an LLM residual stream (values in
    the hundreds for Gemma) on one scale before projection."""

    def __init__(self, crm_dim: int, llm_dim: int, pairs: int, dim: int) -> None:
        super().__init__()
        self.crm = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(crm_dim, elementwise_affine=False), nn.Linear(crm_dim, dim))
            for _ in range(pairs)
        )
        self.llm = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(llm_dim, elementwise_affine=False), nn.Linear(llm_dim, dim))
            for _ in range(pairs)
        )

    def forward(self, crm_layers: Sequence[torch.Tensor], llm_layers: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum over pairs of the batch-mean L2 distance between the projected states."""
        total = crm_layers[0].new_zeros(())
        for g_crm, g_llm, t, s in zip(self.crm, self.llm, crm_layers, llm_layers, strict=True):
            total = total + torch.linalg.vector_norm(g_crm(t) - g_llm(s.float()), dim=-1).mean()
        return total


class StageResult(BaseModel):
    stage: str
    steps: int
    samples: int
    seconds: float
    losses: list[dict[str, float]]


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )


class _LossWeights:
    """a * L_llm + b * L_crm + g * L_align of one (micro-)batch, with each part for the log."""

    def __init__(self, config: JointConfig, joint: bool, use_alignment: bool) -> None:
        self.config, self.joint, self.use_alignment = config, joint, use_alignment
        self.bce = nn.BCEWithLogitsLoss()

    def loss(self, groups: Sequence[PrefixGroup], labels: np.ndarray,
             crm_inputs: Callable[[np.ndarray], dict[str, torch.Tensor]], prompts: GroupPrompts,
             scorer: LLMScorer, crm: DCNv2 | None, heads: AlignmentHeads | None, blocks: Sequence[int],
             ) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
        config = self.config
        batch_rows = group_rows(groups)
        target = torch.from_numpy(labels[batch_rows].astype(np.float32)).to(scorer.device)
        llm_logit, llm_hidden = llm_forward(scorer, [prompts(g) for g in groups], config.shared_prefix,
                                            blocks if self.use_alignment else (), batch_rows)  # fmt: skip
        loss_llm = self.bce(llm_logit, target)
        parts = {"llm": loss_llm.item()}
        loss = config.llm_weight * loss_llm
        if self.joint:
            crm_logit, crm_layers = crm.forward_with_layers(**crm_inputs(batch_rows))
            loss_crm = self.bce(crm_logit, target)
            loss = loss + config.crm_weight * loss_crm
            parts["crm"] = loss_crm.item()
            if self.use_alignment:
                loss_align = heads(crm_layers, llm_hidden)
                loss = loss + config.alignment_weight * loss_align
                parts["align"] = loss_align.item()
        return loss, parts


def llm_forward(scorer: LLMScorer, groups: Sequence[tuple[list[int], list[list[int]]]], shared_prefix: bool,
                layers: Sequence[int] = (), rows: np.ndarray | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """The LLM on (prefix, suffixes) groups: each prefix once (shared) or each whole prompt on its own
    in one left-padded batch (per prompt). The two give the same answers and gradients. `rows`: the
    candidates' samples in order (read where the LLM reads a CRM token)."""
    soft = scorer.crm_token(rows)
    if shared_prefix:
        return scorer.forward_groups(groups, layers, soft)
    prompts = [prefix + suffix for prefix, suffixes in groups for suffix in suffixes]
    return scorer(**scorer.collate(prompts), layers=layers, soft=soft)


class _Trained:
    """What a stage trains (the LoRA adapters; the CRM in joint training; the alignment heads where
    they are used), its optimizer, and the checkpoint of both."""

    def __init__(self, scorer: LLMScorer, crm: DCNv2 | None, heads: AlignmentHeads | None,
                 config: JointConfig) -> None:  # fmt: skip
        self.scorer, self.crm, self.heads = scorer, crm, heads
        lora = [p for p in scorer.parameters() if p.requires_grad]
        groups = [{"params": lora, "lr": config.llm_learning_rate, "weight_decay": 0.0}]
        if crm is not None:
            groups.append({"params": list(crm.parameters()), "lr": config.crm_learning_rate, "weight_decay": 0.0})
        if heads is not None:
            groups.append({"params": list(heads.parameters()), "lr": config.align_learning_rate, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups)

    def save(self, path: Path, step: int, losses: list[dict[str, float]], seconds: float) -> None:
        device = self.scorer.device
        save_state(path, {
            "lora": self.scorer.trainable_state(), "crm": self.crm.state_dict() if self.crm else None,
            "heads": self.heads.state_dict() if self.heads else None,
            "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "step": step,
            "losses": losses, "seconds": seconds,
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        })  # fmt: skip

    def load(self, path: Path) -> tuple[int, list[dict[str, float]], float]:
        """Weights, optimizer and RNG state of the last checkpoint: (steps done, losses, seconds)."""
        state = load_state(path)
        self.scorer.load_trainable_state(state["lora"])
        if self.crm is not None:
            self.crm.load_state_dict(state["crm"])
        if self.heads is not None:
            self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.scorer.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.scorer.device)
        return state["step"], state["losses"], state["seconds"]


def run_stage(
    stage: str,
    folder: Path,
    steps: Sequence[Sequence[PrefixGroup]],
    labels: np.ndarray,
    crm_inputs: Callable[[np.ndarray], dict[str, torch.Tensor]],
    prompts: GroupPrompts,
    scorer: LLMScorer,
    crm: DCNv2 | None,
    heads: AlignmentHeads | None,
    blocks: Sequence[int],
    config: JointConfig,
    show_progress: bool = True,
) -> StageResult:
    """Train one stage, one optimizer step per entry of `steps` (groups of candidates sharing a
    prefix; see training.groups), checkpointing into `folder` and resuming from it.

    stage "joint": LoRA + CRM + heads (CRM and heads None for the LLM-alone ablation).
    stage "llm": LoRA only.
    """
    folder.mkdir(parents=True, exist_ok=True)
    joint = stage == "joint" and crm is not None
    use_alignment = joint and heads is not None and config.alignment_weight > 0
    trained = _Trained(scorer, crm if joint else None, heads if use_alignment else None, config)
    state_path = folder / "state.pt"
    start, losses, elapsed = trained.load(state_path) if state_path.exists() else (0, [], 0.0)
    if 0 < start < len(steps):
        log.info("resuming stage %s at step %d of %d", stage, start + 1, len(steps))

    def checkpoint(step: int) -> None:
        trained.save(state_path, step, losses, elapsed + time.perf_counter() - started)

    started = time.perf_counter()
    scorer.train()
    if joint:
        crm.train()
    title = {"joint": "stage 2 joint", "llm": "stage 3 LLM"}[stage]
    weights = _LossWeights(config, joint, use_alignment)
    with _progress() as progress:
        task = progress.add_task(title, total=len(steps), completed=start, status="", visible=show_progress)
        for step in range(start, len(steps)):
            groups = list(steps[step])
            total = sum(len(g) for g in groups)
            trained.optimizer.zero_grad(set_to_none=True)
            record: dict[str, float] = {"step": step + 1}
            for micro in _micro_batches(groups, config.grad_accumulation):
                # each micro-batch's mean loss weighted by its share: the gradient of the whole batch's mean
                share = sum(len(g) for g in micro) / total
                loss, parts = weights.loss(micro, labels, crm_inputs, prompts, scorer, crm, heads, blocks)
                (loss * share).backward()
                for key, value in parts.items():
                    record[key] = record.get(key, 0.0) + value * share
            trained.optimizer.step()
            losses.append(record)
            recent = losses[-20:]
            status = " ".join(
                f"{k} {np.mean([r[k] for r in recent]):.3f}" for k in ("llm", "crm", "align") if k in record
            )
            progress.update(task, advance=1, status=status)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == len(steps):
                checkpoint(step + 1)
    scorer.eval()
    if crm is not None:
        crm.eval()
    seconds = elapsed + time.perf_counter() - started
    samples = sum(len(g) for step in steps for g in step)
    result = StageResult(stage=stage, steps=len(steps), samples=samples, seconds=seconds, losses=losses)
    write_json(folder / "losses.json", result.model_dump())
    return result


def _micro_batches(groups: list[PrefixGroup], parts: int) -> list[list[PrefixGroup]]:
    """A step's groups in `parts` runs of whole groups (fewer where the step has fewer groups)."""
    return [[groups[i] for i in chunk] for chunk in np.array_split(np.arange(len(groups)), min(parts, len(groups)))]


def summarize_losses(losses: list[dict[str, Any]], window: int = 20) -> dict[str, dict[str, float]]:
    """Mean of each loss over the first and the last `window` steps (at most half the steps each, so that
    a short stage's two figures never share a step)."""
    out: dict[str, dict[str, float]] = {}
    for key in ("llm", "crm", "align"):
        values = [r[key] for r in losses if key in r]
        window = max(1, min(window, len(values) // 2))
        if values:
            out[key] = {
                "first": float(np.mean(values[:window])),
                "last": float(np.mean(values[-window:])),
            }
    return out
