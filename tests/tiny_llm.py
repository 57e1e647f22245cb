"""A tiny LLaMA-architecture GGUF written with gguf-py: random weights, a byte-level BPE tokenizer
learned on prompt-like text, " Yes" and " No" single tokens. Both transformers' GGUF loader and
llama.cpp read it, so tests exercise the real code paths in seconds."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
CORPUS = """A user rated movies from 1 to 5 stars. Predict whether the user will like the target movie.
The user's rating history, oldest first:
- Movie Number 12 (1990; Action, Comedy): 5 stars
- Movie Number 3 (1985; Drama): 1 star
Target movie: Movie Number 7 (1999; Horror, Romance, Sci-Fi)
Please predict whether the user will like the target movie. You should ONLY answer no or yes.
Will the user like it? average 3.9 stars from 120 ratings
Answer: Yes No Yes No (no history) 0 1 2 3 4 5 6 7 8 9 2 stars 3 stars 4 stars
"""


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _learn_bpe(text: str, merges: int) -> list[tuple[str, str]]:
    import regex

    spell = _bytes_to_unicode()
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    words = Counter(tuple(spell[b] for b in w.encode()) for w in pattern.findall(text))
    learned: list[tuple[str, str]] = [("Ġ", "Y"), ("e", "s"), ("ĠY", "es"), ("Ġ", "N"), ("ĠN", "o")]
    for a, b in learned:  # apply the forced merges first
        words = Counter({_merge(w, a, b): c for w, c in words.items()})
    while len(learned) < merges:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        learned.append((a, b))
        words = Counter({_merge(w, a, b): c for w, c in words.items()})
    return learned


def _merge(word: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_tiny_llama_gguf(
    path: Path,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    context: int = 1024,
    seed: int = 0,
    merges: int = 300,
) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    spell = _bytes_to_unicode()
    learned = _learn_bpe(CORPUS, merges)
    tokens = list(SPECIALS) + [spell[b] for b in range(256)]
    for a, b in learned:
        if a + b not in tokens:
            tokens.append(a + b)
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    head_dim = hidden // heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in learned])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(3)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)

    def tensor(name: str, *shape: int, scale: float = 0.08) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden, scale=0.5)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    tensor("output.weight", len(tokens), hidden, scale=0.05)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_hf_directory(folder: Path, gguf_path: Path) -> Path:
    """The tiny GGUF as a Hugging Face model directory (config.json, safetensors, tokenizer.json),
    the way a LLaMA-family checkpoint is shipped: the base of an HF-directory training run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    source = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **source)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **source)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # a plain checkpoint, not "quantized with gguf"
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def quantize_q5_0(source: Path, target: Path) -> Path:
    """`source` (already quantized or not) quantized to Q5_0, llama.cpp's ftype 8, in a process of
    its own as export quantizes: most of its matrices then hold what runtime/layout.py widens."""
    done = subprocess.run([sys.executable, "-m", "runtime.llm", str(source), str(target), "8", "1", "requantize"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return target
