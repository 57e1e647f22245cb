"""The bundle's LLM as the engine serves it: the tokenizer, the copy llama.cpp decodes (its
vocabulary cut to the catalog's prompts), the scheduler that decodes it (in this process or its own),
the prompts' token ids, and the answer memo with its file. An LLM that fails to load leaves it down
(`status` "unavailable", `failure` says why): the engine then answers with the CRM alone."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from runtime.artifacts.bundle import Bundle
from runtime.artifacts.store import FeatureStore
from runtime.engine.requests import HistoryItem
from runtime.llm import LlamaModel, LLMError, gpu_offload_supported
from runtime.memo import AnswerMemo, MemoFileError
from runtime.metrics import ServingMetrics
from runtime.paths import model_cache
from runtime.prompt import HistoryEntry, ItemText
from runtime.scheduling import LLMScheduler, RemoteScheduler, Scheduler, SchedulerSettings
from runtime.settings import EngineSettings
from runtime.vocab import VocabularyCut, serving_copy, widenable

__all__ = ["ServedLLM", "TOKEN_CACHE_TEXTS"]

log = logging.getLogger(__name__)

TOKEN_CACHE_TEXTS = 4096  # prompt texts whose token ids are remembered (at most ~10 KB each)


class ServedLLM:
    """Loaded at once (when the bundle has an LLM and the settings ask for it); `close` saves the memo."""

    def __init__(self, bundle: Bundle, settings: EngineSettings, metrics: ServingMetrics, store: FeatureStore,
                 state: Path) -> None:  # fmt: skip
        self.bundle, self.settings, self.metrics, self.store, self.state = bundle, settings, metrics, store, state
        self.template = bundle.template
        self.memo = AnswerMemo(settings.llm_answer_memo) if settings.llm_answer_memo > 0 else None
        # token ids by text: a repeat user's prefix and every catalog item's suffix are tokenized
        # once (~1.5 ms of a 10-candidate request's 1.7 ms here); bounded, thread-safe, immutable values
        # (the ids the decoding model reads: the cut vocabulary's where it is cut)
        tokens = functools.lru_cache(maxsize=TOKEN_CACHE_TEXTS)
        self.tokens = tokens(lambda text: self._decoded(self.llm.tokenize(text)))
        self.vocab_cut: VocabularyCut | None = None
        self.copy_file: Path | None = None  # the copy decoded (cut and/or widened), where there is one
        self.widens = False  # whether Q5_0 weights are decoded as Q8_0 (on the CPU; runtime/layout.py)
        self.llm: LlamaModel | None = None  # the tokenizer
        self._decoder: LlamaModel | None = None  # the model decoded in this process (llm_process False)
        self.scheduler: Scheduler | None = None
        self._head: tuple[int, ...] = ()  # see shift_head
        self._bos: int | None = None  # the beginning of a prompt, as decoded
        self.llm_load_error: str | None = None
        if bundle.llm and settings.load_llm:
            self._load_llm()
            self._read_memo()
        self.metrics.watch("corella_llm_loaded", "1 while the LLM serves, else 0",
                           lambda: float(self.status == "serving"))  # fmt: skip
        self.metrics.watch("corella_llm_queue_candidates", "Routed candidates waiting for the LLM",
                           lambda: self.scheduler.queued_candidates() if self.scheduler else 0)  # fmt: skip
        self.metrics.watch("corella_llm_answer_memo_size", "LLM answers remembered by their prompts",
                           lambda: len(self.memo) if self.memo is not None else 0)  # fmt: skip
        # counted when a text is tokenized: a text seen again comes from the tokenization cache
        self.metrics.watch("corella_llm_spelled_tokens", "Prompt tokens outside the cut vocabulary, spelled",
                           lambda: self.vocab_cut.spelled_tokens if self.vocab_cut else 0)  # fmt: skip
        self.metrics.watch("corella_llm_prefix_host_bytes", "Host memory holding copies of cached prefixes",
                           lambda: self.scheduler.prefix_host_bytes() if self.scheduler else 0)  # fmt: skip

    def _load_llm(self) -> None:
        info, settings = self.bundle.llm, self.settings
        path, yes, no = self.bundle.llm_file, info["yes_token_id"], info["no_token_id"]
        try:
            gpu = gpu_offload_supported() and settings.llm_gpu_layers != 0
            scheduler_settings = SchedulerSettings.resolve(settings, gpu)
            # this process tokenizes with the whole vocabulary (no weights); a model decodes
            self.llm = LlamaModel(path, yes, no, vocab_only=True)
            self.widens = settings.llm_widen and not gpu
            decode = self._decoded_copy(path, yes, no)
            try:
                self._start_scheduler(decode, scheduler_settings)
            except LLMError as exc:
                if decode[0] == path:
                    raise
                # a copy that does not load (damaged in the cache, say) is made again next start
                log.warning("the LLM decodes the bundle's own GGUF: the copy %s failed (%s) and is removed",
                            decode[0], exc)  # fmt: skip
                decode[0].unlink(missing_ok=True)
                self.vocab_cut = self.copy_file = None
                if self._decoder is not None:
                    self._decoder.close()
                    self._decoder = None
                self._start_scheduler((path, yes, no), scheduler_settings)
            bos = info.get("bos_token_id")
            self._bos = self._decoded([bos])[0] if bos is not None else None
            self._head = self._suffix_head()
            held = self.scheduler.settings
            log.info("LLM on %s, %d context(s) of %d threads: prefixes in use in %d KV cells, idle ones in up to "
                     "%d MiB of host memory (~%d prefix tokens in all)", "the GPU" if gpu else "the CPU",
                     held.contexts, held.threads, held.prefix_cache_tokens, held.prefix_host_mib,
                     self.scheduler.estimate.cache_tokens)  # fmt: skip
        except LLMError as exc:
            # the server still answers with the CRM; routed candidates fall back, reason llm_unavailable
            self.llm_load_error = str(exc)
            log.error("LLM unavailable, serving CRM only: %s", exc)
            self._close_llm()

    def _start_scheduler(self, decode: tuple[Path, int, int], settings: SchedulerSettings) -> None:
        """The scheduler decoding the GGUF `decode` (path, yes id, no id), here or in a process of its own."""
        if self.settings.llm_process:
            self.scheduler = RemoteScheduler(
                *decode,
                settings,
                self.settings.llm_gpu_layers,
                observer=self.metrics,
                restarts=self.settings.llm_restarts,
                restart_window_s=self.settings.llm_restart_window_s,
            )
        else:
            self._decoder = LlamaModel(*decode, self.settings.llm_gpu_layers)
            self.scheduler = LLMScheduler(self._decoder, settings, observer=self.metrics)

    def _decoded_copy(self, path: Path, yes: int, no: int) -> tuple[Path, int, int]:
        """The GGUF llama.cpp decodes and its answer tokens: a copy in the model cache with the
        vocabulary cut to the catalog's prompts and, where `self.widens`, its Q5_0 weights as Q8_0
        (runtime.vocab); or the bundle's own where there is nothing to do or the copy fails."""
        folder = model_cache() / "cuts"
        try:
            widen = self.widens and widenable(path)
            if self.settings.llm_vocab > 0:
                bos = self.bundle.llm.get("bos_token_id")
                self.vocab_cut = VocabularyCut.prepare(self.llm, path, self._model_digest(), folder,
                                                       self._catalog_texts(), self.settings.llm_vocab,
                                                       [t for t in (yes, no, bos) if t is not None], widen)  # fmt: skip
            if self.vocab_cut is None and widen:
                self.copy_file = serving_copy(path, self._model_digest(), folder, None, widen)
        except Exception as exc:  # noqa: BLE001 - a saving, not a need: any failure serves the bundle's file
            log.warning("the LLM decodes the bundle's own GGUF (its copy failed: %s: %s)", type(exc).__name__, exc)
            self.vocab_cut = self.copy_file = None
            return path, yes, no
        if self.vocab_cut is not None:
            self.copy_file = self.vocab_cut.path
            return self.vocab_cut.path, self.vocab_cut.id(yes), self.vocab_cut.id(no)
        return self.copy_file or path, yes, no

    def _catalog_texts(self) -> Iterator[str]:
        """What prompts say: the template, around no history and around one of every rating (by half
        stars), and of every catalog item its suffix and its line in a history."""
        top = self.template.rating_max
        yield self.template.prefix([])
        yield self.template.prefix([HistoryEntry(ItemText("Item"), k / 2) for k in range(1, int(2 * top) + 1)])
        ids = self.store.item_ids()
        for start in range(0, len(ids), 1000):
            for item in self.store.items(ids[start : start + 1000]).values():
                yield self.template.suffix(item)
                yield self.template.prefix([HistoryEntry(item, top)])

    def vocabulary(self) -> dict[str, Any] | None:
        """The vocabulary decoded: its tokens, the tokenizer's, and the cut copy with the tokens it spelled."""
        if self.llm is None:
            return None
        cut = self.vocab_cut
        return {"tokens": cut.size if cut else self.llm.n_vocab, "of": self.llm.n_vocab,
                "cut_file": str(cut.path) if cut else None,
                "decoded_file": str(self.copy_file or self.bundle.llm_file),
                "spelled_tokens": cut.spelled_tokens if cut else 0}  # fmt: skip

    def _decoded(self, tokens: Sequence[int]) -> tuple[int, ...]:
        return self.vocab_cut.ids(tokens) if self.vocab_cut is not None else tuple(tokens)

    def _close_llm(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None
        for model in (self._decoder, self.llm):
            if model is not None:
                model.close()
        self.llm = self._decoder = None

    def _model_digest(self) -> str:
        return self.bundle.manifest["files"][self.bundle.llm["file"]]["sha256"]

    def _memo_file(self) -> tuple[Path, str]:
        """Where the answer memo is kept between runs, and what it belongs to: the model, and the cut
        of its vocabulary (the memo's keys are the token ids decoded)."""
        cut = f"+{self.vocab_cut.path.stem}" if self.vocab_cut is not None else ""
        return self.state / "llm_answers.memo", self._model_digest() + cut

    def _read_memo(self) -> None:
        """The answers the last run saved, when they are the same model's; a file that cannot be read
        is set aside (named in the log), not a reason to stop: the memo is a cache."""
        path, model = self._memo_file()
        if self.memo is None or not path.exists():
            return
        try:
            log.info("answer memo: %d answers read back from %s", self.memo.load(path, model), path)
        except (MemoFileError, OSError) as exc:
            log.warning("answer memo not read back, starting empty: %s", exc)
            with contextlib.suppress(OSError):
                path.replace(path.with_name(path.name + ".unreadable"))

    def close(self) -> None:
        if self.memo is not None and len(self.memo):  # answers are only remembered while an LLM serves
            try:
                path, model = self._memo_file()
                log.info("answer memo: %d answers saved to %s", self.memo.save(path, model), path)
            except OSError as exc:
                log.warning("answer memo not saved: %s", exc)
        self._close_llm()

    @property
    def status(self) -> str:
        """One of "serving", "disabled" (no LLM asked for, or none in the bundle), "unavailable" (failed to load)."""
        if self.scheduler is not None:
            return "serving" if self.scheduler.alive else "unavailable"
        return "unavailable" if self.llm_load_error else "disabled"

    @property
    def failure(self) -> str | None:
        """Why the LLM does not serve: it failed to load, or its process died."""
        return self.llm_load_error or (self.scheduler.failure if self.scheduler is not None else None)

    def _entries(self, history: list[HistoryItem]) -> list[HistoryEntry]:
        if self.llm is None:
            raise LLMError("no LLM is loaded")
        catalog = self.store.items([h.item_id for h in history])
        return [
            HistoryEntry(catalog.get(h.item_id) or ItemText(title=h.title or f"item {h.item_id}"), h.rating)
            for h in history
        ]

    def prompt_texts(self, history: list[HistoryItem], items: list[ItemText]) -> tuple[str, list[str]]:
        """The shared prefix (the history fitted to the prompt budget) and each item's suffix."""
        entries = self._entries(history)  # raises when no LLM is loaded
        return self.template.texts(entries, items, lambda text: len(self.tokens(text)))

    def prompt_ids(self, history: list[HistoryItem], items: list[ItemText]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the shared prefix (after BOS where the model has one) and of each item's suffix,
        as the decoding model reads them (in the cut vocabulary's ids where it is cut)."""
        return self.template.ids(self.tokens, self._bos, self._entries(history), items)

    def _suffix_head(self) -> tuple[int, ...]:
        """The token ids every candidate's suffix starts with (the template's words before the item,
        "Target movie:"), read off two unlike items."""
        first, second = (self.llm.tokenize(self.template.suffix(ItemText(title))) for title in ("Alpha", "Zulu 9"))
        n = 0
        while n < min(len(first), len(second)) - 1 and first[n] == second[n]:
            n += 1
        return self._decoded(first[:n])

    def shift_head(self, prefix: list[int], suffixes: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        """The suffixes' common head moved to the end of the prefix: decoded (and cached) once per
        user instead of once per candidate. The same tokens at the same positions, so the same
        answers; a request whose suffixes do not all start with it is left as it is."""
        head = self._head
        n = len(head)
        if not n or any(len(s) <= n or tuple(s[:n]) != head for s in suffixes):
            return prefix, suffixes
        return [*prefix, *head], [s[n:] for s in suffixes]
