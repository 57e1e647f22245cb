"""Samples per second of the LLM's training stages and scoring: shared prefixes against whole prompts.

    python -m benchmarks.shared_prefix --out bench/shared-prefix [--llm gemma3-270m] [--groups 3]

The same (user, cut, next K) groups of the ML-100K training split are run both ways on one
machine, one after the other: stage 3 (the LLM's loss, forward and backward), stage 2 (the LLM, the
CRM and the alignment loss, forward and backward) and scoring (forward only). Whole prompts run 4 to
a pass, as training did before shared prefixes (its default batch). One group warms up first.
Writes shared_prefix.json and shared_prefix.md into --out; never run it beside a training run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.registry import load_dataset
from training.dcnv2 import DCNv2, DCNv2Config
from training.groups import GroupPrompts, PrefixGroup, user_groups
from training.joint import AlignmentHeads, JointConfig, _LossWeights, default_alignment_pairs
from training.llm import LLMScorer, LoRAConfig, resolve_base_llm
from training.pipeline import score_groups
from training.runs import PreparedData

WHOLE_PROMPTS_A_PASS = 4


def _timed(run: Any) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def measure(prepared: PreparedData, scorer: LLMScorer, groups: list[PrefixGroup], kinds: list[str]) -> dict[str, Any]:
    samples = prepared.samples
    prompts = GroupPrompts(samples, scorer)
    crm = DCNv2(prepared.spec, DCNv2Config())
    blocks = default_alignment_pairs(len(crm.cross), scorer.num_layers)
    heads = AlignmentHeads(crm.input_dim, scorer.hidden_size, len(blocks), 64)

    def crm_inputs(rows: np.ndarray) -> dict[str, torch.Tensor]:
        from training.crm_trainer import to_tensors

        return to_tensors(prepared.inputs, rows, scorer.device)

    def step(kind: str, shared: bool, group: PrefixGroup) -> None:
        if kind == "scoring":
            score_groups(scorer, prompts, [group], WHOLE_PROMPTS_A_PASS, "", shared_prefix=shared)
            return
        config = JointConfig(shared_prefix=shared)
        joint = kind == "stage2"
        weights = _LossWeights(config, joint, use_alignment=joint)
        parts = [group] if shared else [PrefixGroup(group.anchor, group.rows[i : i + WHOLE_PROMPTS_A_PASS])
                                        for i in range(0, len(group), WHOLE_PROMPTS_A_PASS)]  # fmt: skip
        for part in parts:  # whole prompts: the old default of 4 a pass, gradients summed
            loss, _ = weights.loss([part], samples.label, crm_inputs, _Anchored(prompts, group), scorer,
                                   crm if joint else None, heads if joint else None, blocks)  # fmt: skip
            (loss * len(part) / len(group)).backward()
        scorer.zero_grad(set_to_none=True)

    scorer.train()
    results: dict[str, Any] = {}
    for kind in kinds:
        row: dict[str, Any] = {}
        for shared in (True, False):
            step(kind, shared, groups[0])  # warm-up
            seconds = sum(_timed(lambda g=g, k=kind, s=shared: step(k, s, g)) for g in groups[1:])
            count = sum(len(g) for g in groups[1:])
            row["shared" if shared else "whole"] = {"samples": count, "seconds": seconds,
                                                    "samples_per_s": count / seconds}  # fmt: skip
        row["speedup"] = row["shared"]["samples_per_s"] / row["whole"]["samples_per_s"]
        results[kind] = row
        print(f"{kind}: shared {row['shared']['samples_per_s']:.2f} samples/s, whole prompts "
              f"{row['whole']['samples_per_s']:.2f} samples/s: {row['speedup']:.1f}x", flush=True)  # fmt: skip
    return results


class _Anchored:
    """A part of a group keeps the whole group's prefix (its anchor's history)."""

    def __init__(self, prompts: GroupPrompts, group: PrefixGroup) -> None:
        self.prompts, self.group = prompts, group

    def __call__(self, part: PrefixGroup) -> tuple[list[int], list[list[int]]]:
        return self.prompts(PrefixGroup(self.group.anchor, part.rows))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for shared_prefix.json and .md")
    parser.add_argument("--llm", default="gemma3-270m", help="base LLM: a name, a .gguf path or an HF directory")
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--source", default=None, help="raw data folder instead of the cache")
    parser.add_argument("--groups", type=int, default=3, help="groups timed (after one warm-up group)")
    parser.add_argument("--group-size", type=int, default=16, help="candidates per prefix")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--kinds", default="stage3,stage2,scoring", help="what to time, comma-separated")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from training.data import build_samples

    samples = build_samples(load_dataset(args.dataset, Path(args.source) if args.source else None))
    spec = samples.feature_spec()
    prepared = PreparedData(samples, spec, samples.encode(spec))
    torch.manual_seed(0)
    scorer = LLMScorer.load(resolve_base_llm(args.llm), samples.prompt_template(), LoRAConfig())
    full = [g for g in user_groups(samples, samples.indices("train"), args.group_size, np.random.default_rng(0))
            if len(g) == args.group_size][: args.groups + 1]  # fmt: skip
    prompts = GroupPrompts(samples, scorer)
    lengths = [(len(prompts(g)[0]), float(np.mean([len(s) for s in prompts(g)[1]]))) for g in full]
    results = {
        "llm": args.llm, "threads": torch.get_num_threads(), "group_size": args.group_size,
        "groups_timed": len(full) - 1, "prefix_tokens": [p for p, _ in lengths],
        "suffix_tokens_mean": float(np.mean([s for _, s in lengths])),
        "whole_prompts_a_pass": WHOLE_PROMPTS_A_PASS,
        "kinds": measure(prepared, scorer, full, [k.strip() for k in args.kinds.split(",") if k.strip()]),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_prefix.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Shared prefixes against whole prompts ({args.llm}, {results['threads']} threads)", "",
             f"{results['groups_timed']} groups of {args.group_size} candidates; prefixes of "
             f"{', '.join(map(str, results['prefix_tokens'][1:]))} tokens, suffixes of "
             f"{results['suffix_tokens_mean']:.1f} on average; whole prompts {WHOLE_PROMPTS_A_PASS} a pass.", "",
             "| work | shared samples/s | whole samples/s | speed-up |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for kind, row in results["kinds"].items():
        lines.append(f"| {kind} | {row['shared']['samples_per_s']:.2f} | {row['whole']['samples_per_s']:.2f} | "
                     f"{row['speedup']:.1f}x |")  # fmt: skip
    (args.out / "shared_prefix.md").write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
