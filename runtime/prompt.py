"""The LLM's prompt (the paper's Template A) and its Yes/No readout, shared by training and serving.

The prompt is split into a prefix that is the same for every candidate of one user (instruction,
then the user's history, oldest first) and a short suffix that names the target item. Token ids are
always `tokenize(prefix) + tokenize(suffix)`: the serving runtime caches the prefix's KV state and
decodes many suffixes against it, and training tokenizes the same way, so both see identical token
sequences.

Version 5 (what training renders now) asks the question in the prefix and names the target in few
words (title, tags, the catalog's verdict in one word), then a newline, where the answer is read:
~12 Gemma tokens a candidate. Version 4 said the verdict in four words and ended with "Answer:"
(~17 tokens), version 3 put the question, the year and the rating numbers after the target (~36).
A returning user's request decodes only its candidates' suffixes, so their length is what it costs.
Versions 3 and 4 are still rendered for the bundles trained on them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.errors import PromptError

__all__ = [
    "PROMPT_VERSION",
    "PROMPT_VERSIONS",
    "YES_TEXT",
    "NO_TEXT",
    "ItemText",
    "HistoryEntry",
    "PromptTemplate",
    "resolve_answer_tokens",
    "yes_probability",
]

#: What training renders now; bumped whenever rendering changes. A bundle is served with the version
#: it was trained on (its prompt.json).
PROMPT_VERSION = 5
#: The versions this corella renders (a template keeps the version it was trained with).
PROMPT_VERSIONS = (3, 4, 5)
YES_TEXT = " Yes"
NO_TEXT = " No"


#: The catalog's verdict on an item by the share of likes among its ratings, at or above each bound:
#: in words (prompt versions 3 and 4) and in one word (version 5).
_VERDICTS = (
    (0.7, "most people liked it", "acclaimed"),
    (0.5, "many people liked it", "liked"),
    (0.3, "few people liked it", "mixed"),
    (-math.inf, "most people disliked it", "disliked"),  # and any share that is not a number
)


def reception(liked_share: float) -> str:
    """The catalog's verdict on an item in words: a small LLM reads "most people liked it" far more
    readily than a number (measured: zero-shot AUC 0.58 vs 0.48 on routed validation samples)."""
    return next((words for bound, words, _ in _VERDICTS if liked_share >= bound), _VERDICTS[-1][1])


def verdict(liked_share: float) -> str:
    """`reception` in one word (prompt version 5): a word a candidate, not four."""
    return next((word for bound, _, word in _VERDICTS if liked_share >= bound), _VERDICTS[-1][2])


@dataclass(frozen=True)
class ItemText:
    """What the prompt says about an item."""

    title: str
    year: str | None = None
    tags: tuple[str, ...] = ()
    rating_mean: float | None = None  # over the training split (catalog statistics)
    rating_count: int | None = None
    liked_share: float | None = None  # share of those ratings at or above the like threshold
    text: str | None = None  # free text about the item (a description): the target's first words are read

    def describe(self, stats: bool = False) -> str:
        """Title (year; tags), and with `stats` the catalog's verdict with its numbers."""
        text = self._named(self.year if isinstance(self.year, str) else None)
        if self._rated() and stats:
            text += f"; {reception(self.liked_share)} ({self.liked_share:.0%} of {self.rating_count})"
        return text

    def brief(self, stats: bool = False, words: Callable[[float], str] = reception, text_words: int = 0) -> str:
        """Fewer tokens, for the target in prompt versions 4 and 5: title (tags), and with `stats` the
        verdict in `words` alone (the CRM has the numbers); then the first `text_words` words of the
        item's text, where it has one."""
        text = self._named(None)
        if self._rated() and stats:
            text += f"; {words(self.liked_share)}"
        if text_words and isinstance(self.text, str) and self.text.strip():
            head = self.text.split()
            text += ": " + " ".join(head[:text_words]) + (" ..." if len(head) > text_words else "")
        return text

    # the catalog may have holes (no year, no tags, odd values): say what there is
    def _named(self, year: str | None) -> str:
        tags = ", ".join(t for t in self.tags if isinstance(t, str) and t) if self.tags else ""
        details = [d for d in (year, tags) if d]
        title = self.title if isinstance(self.title, str) and self.title.strip() else "an untitled item"
        return f"{title} ({'; '.join(details)})" if details else title

    def _rated(self) -> bool:
        return bool(self.rating_count) and self.liked_share is not None


@dataclass(frozen=True)
class HistoryEntry:
    item: ItemText
    rating: float


def _stars(rating: float) -> str:
    return f"{rating:g} star" + ("" if rating == 1 else "s")


@dataclass(frozen=True)
class PromptTemplate:
    """Template A, ordered for caching: the instruction (with "You should ONLY answer no or yes.") and
    the user's history (with how many of those items the user liked) form the shared prefix; the
    target (with the catalog's reception of it) forms the suffix. Versions 4 and 5 end the prefix
    with "Target movie:"; version 5 ends the suffix with a newline and says the verdict in one word,
    version 4 ended it with "Answer:"; version 3 put both words and a question in the suffix, with
    the year and the rating numbers of the target."""

    item_noun: str = "movie"
    rating_max: float = 5.0
    max_prompt_tokens: int = 320
    item_stats: bool = False  # say how the catalog received the target (share of likes, in words)
    like_threshold: float | None = None  # a rating at or above it is a like: the history gets a like count
    version: int = PROMPT_VERSION
    item_plural: str | None = None  # default: the noun + "s"
    verb: str = "liked"  # past tense: what a like is ("clicked", "bought")
    implicit: bool = False  # the history holds 0/1 labels, not ratings on a scale
    #: words of an item's text said in the target's suffix (version 5; 0 = none: set where the training
    #: catalog has texts, since a model not trained on them gains nothing from reading them)
    text_words: int = 0

    def __post_init__(self) -> None:
        if self.version not in PROMPT_VERSIONS:
            raise PromptError(
                f"prompt version {self.version}, but this corella renders versions "
                f"{', '.join(map(str, PROMPT_VERSIONS))}; serve it with the corella that trained it, or retrain "
                "and re-export"
            )

    @property
    def nouns(self) -> str:
        return self.item_plural or self.item_noun + "s"

    def _opening(self) -> list[str]:
        noun, nouns, verb = self.item_noun, self.nouns, self.verb
        if self.implicit:
            return [f"A user was shown {nouns} and {verb} some of them. Please predict whether the user will have "
                    f"{verb} the target {noun} based on the history. You should ONLY answer no or yes.",
                    "The user's history, oldest first:"]  # fmt: skip
        return [f"A user rated {nouns} from 1 to {self.rating_max:g} stars. Please predict whether the user will "
                f"like the target {noun} based on the rating history. You should ONLY answer no or yes.",
                "The user's rating history, oldest first:"]  # fmt: skip

    def _outcome(self, rating: float) -> str:
        if self.implicit:
            return self.verb if rating >= (self.like_threshold or 1.0) else f"not {self.verb}"
        return _stars(rating)

    def prefix(self, history: Sequence[HistoryEntry]) -> str:
        noun = self.item_noun
        lines = self._opening()
        lines += [f"- {h.item.describe()}: {self._outcome(h.rating)}" for h in history]
        if not history:
            lines.append("- (no history)")
        elif self.like_threshold is not None:
            liked = sum(h.rating >= self.like_threshold for h in history)
            lines.append(f"The user {self.verb} {liked} of these {len(history)} {self.nouns}.")
        if self.version >= 4:
            question = f"Will the user have {self.verb} the target {noun}?" if self.implicit else \
                f"Will the user like the target {noun}?"  # fmt: skip
            lines.append(f"{question}\nTarget {noun}:")
            return "\n".join(lines)
        return "\n".join(lines) + "\n"

    def suffix(self, target: ItemText) -> str:
        # short on purpose: it is decoded once per candidate, the prefix once per user
        if self.version >= 5:
            return f" {target.brief(self.item_stats, verdict, self.text_words)}\n"
        if self.version == 4:
            return f" {target.brief(self.item_stats)}\nAnswer:"
        return f"Target {self.item_noun}: {target.describe(self.item_stats)}\nWill the user like it?\nAnswer:"

    def fit_history(
        self,
        history: Sequence[HistoryEntry],
        count_tokens: Callable[[str], int] | None,
        suffix_budget: int | None = None,
    ) -> list[HistoryEntry]:
        """Drop the oldest history entries until the prefix fits the token budget, which keeps room
        for a long target's suffix (48 tokens in version 3, 32 in versions 4 and 5)."""
        kept = list(history)
        if count_tokens is None:
            return kept
        if suffix_budget is None:
            suffix_budget = 48 if self.version == 3 else 32 + 2 * self.text_words
        budget = self.max_prompt_tokens - suffix_budget
        while kept and count_tokens(self.prefix(kept)) > budget:
            kept.pop(0)
        return kept

    def render(self, history: Sequence[HistoryEntry], target: ItemText) -> str:
        return self.prefix(history) + self.suffix(target)

    def texts(self, history: Sequence[HistoryEntry], targets: Sequence[ItemText],
              count_tokens: Callable[[str], int] | None) -> tuple[str, list[str]]:  # fmt: skip
        """The shared prefix (history fitted to the token budget) and each target's suffix."""
        return self.prefix(self.fit_history(history, count_tokens)), [self.suffix(t) for t in targets]

    def ids(self, tokenize: Callable[[str], Sequence[int]], bos: int | None, history: Sequence[HistoryEntry],
            targets: Sequence[ItemText]) -> tuple[list[int], list[list[int]]]:  # fmt: skip
        """What the LLM reads, everywhere (training, export, serving): BOS (where the model has one)
        + the prefix's tokens, and each suffix's tokens. Prefix and suffix are tokenized apart, so a
        cached prefix's tokens are the same whatever follows it."""
        prefix, suffixes = self.texts(history, targets, lambda text: len(tokenize(text)))
        return ([bos] if bos is not None else []) + list(tokenize(prefix)), [list(tokenize(s)) for s in suffixes]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "prompt.json") -> PromptTemplate:
        try:
            template = cls(**data)
        except TypeError as exc:
            raise PromptError(f"{source}: malformed prompt template ({exc})") from exc
        except PromptError as exc:
            raise PromptError(f"{source}: {exc}") from exc
        return template

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> PromptTemplate:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), str(path))
        except (OSError, json.JSONDecodeError) as exc:
            raise PromptError(f"{path}: cannot read prompt template ({exc})") from exc


def resolve_answer_tokens(tokenize: Callable[[str], Sequence[int]]) -> tuple[int, int]:
    """Token ids of " Yes" and " No"; `tokenize` must not add BOS/special tokens."""
    ids = []
    for text in (YES_TEXT, NO_TEXT):
        tokens = list(tokenize(text))
        if len(tokens) != 1:
            raise PromptError(
                f"{text!r} is {len(tokens)} tokens ({tokens}) in this tokenizer; "
                "the Yes/No readout needs each answer to be a single token"
            )
        ids.append(int(tokens[0]))
    return ids[0], ids[1]


def yes_probability(yes_logit: float, no_logit: float) -> float:
    """P(click) = softmax over the two answer logits, taken for " Yes"."""
    diff = float(yes_logit) - float(no_logit)
    if diff >= 0:
        return 1.0 / (1.0 + math.exp(-diff))
    e = math.exp(diff)
    return e / (1.0 + e)
