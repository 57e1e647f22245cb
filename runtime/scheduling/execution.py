"""Decoding one planned batch on a context (outside the lock; the worker's thread owns the context)."""

from __future__ import annotations

import logging
import time
from typing import Any

from runtime.llm import LlamaContext, LLMError
from runtime.scheduling.prefix_cache import PrefixEntry
from runtime.scheduling.work import Plan

__all__ = ["execute", "warm_up"]

log = logging.getLogger(__name__)


def execute(context: LlamaContext, plan: Plan) -> tuple[list[float], str | None, float]:
    """Decode `plan`: the answers of its suffixes in order, the error that failed it (None), and
    the seconds it took. A candidate's sequence first shares its prefix's decoded cells
    (llama_memory_seq_cp); the prefix tokens decoded in this very batch carry the candidates'
    sequences too, so that a new user's prefix and candidates take one batch, not two.

    llama.cpp's failures (LLMError) fail the batch's work; anything else is a bug in the loop and
    propagates, to stop the scheduler."""
    plan.saved = [_park(context, entry) for entry in plan.parkings]
    for seq in plan.removals:
        context.remove_sequence(seq)
    sharing: dict[int, list[int]] = {}
    for work, _, seq in plan.suffixes:
        if id(work.entry) in plan.completing:
            sharing.setdefault(id(work.entry), []).append(seq)
    tokens: list[int] = []
    positions: list[int] = []
    seqs: list[int | tuple[int, ...]] = []
    flags: list[bool] = []
    outputs: list[int] = []
    for entry, chunk, start in plan.prefixes:
        members = (entry.seq, *sharing[id(entry)]) if id(entry) in sharing else entry.seq
        tokens += chunk
        positions += range(start, start + len(chunk))
        seqs += [members] * len(chunk)
        flags += [False] * len(chunk)
    for work, item, seq in plan.suffixes:
        suffix, start = work.suffixes[item], len(work.entry.key)
        tokens += suffix
        positions += range(start, start + len(suffix))
        seqs += [seq] * len(suffix)
        flags += [False] * (len(suffix) - 1) + [True]
        outputs.append(len(tokens) - 1)
    started = time.perf_counter()
    answers: list[float] = []
    error = None
    try:
        for entry in plan.restores:
            context.restore_sequence(entry.saved, entry.seq)
        for head, target in plan.copies:
            context.copy_sequence(head, target)
        for work, _, seq in plan.suffixes:
            context.copy_sequence(work.entry.seq, seq)
        if tokens:  # none when a restored prefix's candidates could not fit in time after all
            context.decode(tokens, positions, seqs, flags)
        answers = [context.answer(row) for row in outputs]
    except LLMError as exc:
        error = str(exc)
        log.warning("LLM batch of %d tokens failed: %s", len(tokens), exc)
    finally:
        for _, _, seq in plan.suffixes:
            context.remove_sequence(seq)
    return answers, error, time.perf_counter() - started


def _park(context: LlamaContext, entry: PrefixEntry) -> Any:
    """Move an idle prefix out of the KV cache: a copy in host memory (once; the cells of a
    prefix never change), then its sequence cleared. None when no copy could be made."""
    saved = entry.saved
    if saved is None:
        try:
            saved = context.save_sequence(entry.seq)
        except LLMError as exc:
            log.warning("a cached prefix could not be saved to host memory: %s", exc)
    context.remove_sequence(entry.seq)
    return saved


def warm_up(context: LlamaContext, n_vocab: int, tokens: int) -> float:
    """One decode of `tokens` ordinary ids spread over the vocabulary (the model may have no
    tokenizer: a cut copy): its seconds per token. The caller clears the context."""
    ids = [(n_vocab // 3 + 7919 * k) % n_vocab for k in range(tokens)]
    started = time.perf_counter()
    context.decode(ids, range(len(ids)), [0] * len(ids), [False] * (len(ids) - 1) + [True])
    return max(1e-6, (time.perf_counter() - started) / len(ids))
