"""The LLM decoded with its vocabulary cut to the tokens prompts use.

Each routed candidate's answer is read from one logits row: a projection of its last hidden state
onto the whole vocabulary, of which the readout uses two entries (" Yes" and " No"). For Gemma 3
that is 262,144 rows, ~14% of what a candidate costs to decode on a CPU, and llama.cpp computes
the whole row or none. So the LLM process is given a copy of the model whose token embedding (and
output projection, where it is not tied to it) keeps only the rows of the tokens the prompts use:
every token of the catalog's prompt texts, the tokenizer's most common tokens, its byte tokens
and its special tokens. The copy has no tokenizer: the serving process tokenizes with the whole
vocabulary, as training did, and maps the ids into the copy's. The same weights read the same
tokens, so the answers are the same (to float rounding; a test holds them to 1e-5).

A token the copy lacks (from a title a request brings, say) is spelled with the pieces the copy
has, longest first, down to byte tokens, as a tokenizer spells a word its vocabulary lacks, and
counted (`spelled_tokens`).

Where the LLM runs on the CPU, the copy also holds its Q5_0 weights as Q8_0 blocks of the same
numbers (runtime/layout.py: ~10% faster on x86, the same answers); with the whole vocabulary that
is a copy of its own.

The copy is written once (~10 s for Gemma 3 270M, most of it reading the tokenizer's arrays) into
corella's model cache, named by digests of the model, of the kept tokens and of the layout, and
reused by every server of that model and catalog.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from runtime.layout import WIDER, widened
from runtime.llm import LlamaModel, LLMError

__all__ = ["VocabularyCut", "copy_gguf", "serving_copy", "widenable"]

log = logging.getLogger("corella.vocab")

#: bumped whenever what a cut file holds changes (its name carries it)
CUT_FORMAT = 2
# llama_token_attr flags
_NORMAL, _BYTE = 1 << 2, 1 << 5


class VocabularyCut:
    """Token ids of the whole vocabulary mapped to those of a copy of the model that keeps `kept`."""

    def __init__(self, tokenizer: LlamaModel, kept: np.ndarray, path: Path) -> None:
        self.tokenizer, self.path = tokenizer, path
        self.kept = kept  # ascending ids of the whole vocabulary; a kept token's new id is its position
        self.lookup = np.full(tokenizer.n_vocab, -1, dtype=np.int64)
        self.lookup[kept] = np.arange(len(kept))
        self._pieces: dict[str, int] = {}  # the texts of the kept ordinary tokens, for spelling
        self._bytes: dict[int, int] = {}  # a byte's value -> the new id of its byte token
        for new, token in enumerate(kept.tolist()):
            text, flags = tokenizer.piece(token), tokenizer.attributes(token)
            if flags & _BYTE and text.startswith("<0x") and text.endswith(">"):
                self._bytes[int(text[3:-1], 16)] = new
            elif flags & _NORMAL and text:
                self._pieces[text] = new
        self._longest = max(map(len, self._pieces), default=1)
        self._spelled: dict[int, tuple[int, ...]] = {}
        self._lock = threading.Lock()
        self.spelled_tokens = 0  # tokens of prompts the copy lacked, spelled with its pieces

    @property
    def size(self) -> int:
        return len(self.kept)

    def id(self, token: int) -> int:
        """The copy's id of a token it keeps (the answer tokens, BOS)."""
        new = int(self.lookup[token])
        if new < 0:
            raise LLMError(f"token {token} is not in the cut vocabulary")
        return new

    def ids(self, tokens: Sequence[int]) -> tuple[int, ...]:
        """The copy's ids for a sequence of the whole vocabulary's ids."""
        mapped = self.lookup[np.asarray(tokens, dtype=np.int64)]
        if mapped.size == 0 or mapped.min() >= 0:
            return tuple(mapped.tolist())
        out: list[int] = []
        for token, new in zip(tokens, mapped.tolist(), strict=True):
            if new >= 0:
                out.append(new)
            else:
                out += self._spell(int(token))
        return tuple(out)

    def _spell(self, token: int) -> tuple[int, ...]:
        with self._lock:
            self.spelled_tokens += 1
            if token not in self._spelled:
                self._spelled[token] = self._pieces_of(self.tokenizer.piece(token))
            return self._spelled[token]

    def _pieces_of(self, text: str) -> tuple[int, ...]:
        """`text` in kept pieces: the longest that starts each position, else the bytes of its character."""
        out, i = [], 0
        while i < len(text):
            for n in range(min(self._longest, len(text) - i), 0, -1):
                if (new := self._pieces.get(text[i : i + n])) is not None:
                    out.append(new)
                    i += n
                    break
            else:
                out += [self._bytes[b] for b in text[i].encode("utf-8") if b in self._bytes]
                i += 1
        return tuple(out)

    @classmethod
    def prepare(cls, tokenizer: LlamaModel, source: Path, source_digest: str, folder: Path, texts: Iterable[str],
                common: int, tokens: Iterable[int] = (), widen: bool = False) -> VocabularyCut | None:  # fmt: skip
        """The cut that keeps `tokens` (the answers'), those of `texts` and the `common` most common
        others, its copy of `source` written into `folder` unless there already (its Q5_0 weights
        widened to Q8_0 where `widen`, runtime/layout.py); None when it keeps 90% of the tokens or
        more (too little to gain for a copy of the model)."""
        kept = kept_tokens(tokenizer, texts, common, tokens)
        if len(kept) >= 0.9 * tokenizer.n_vocab:
            return None
        return cls(tokenizer, kept, serving_copy(source, source_digest, folder, kept, widen))


def serving_copy(source: Path, source_digest: str, folder: Path, kept: np.ndarray | None, widen: bool) -> Path:
    """The copy of `source` that llama.cpp decodes, written into `folder` unless there already:
    its vocabulary cut to `kept` (None: whole) and, where `widen`, its Q5_0 weights as Q8_0."""
    # copies of one kind replace each other; a cut and a widened cut (two servers' settings) both stay
    kind = ("cut" if kept is not None else "whole") + ("8" if widen else "")
    chosen = kept.tobytes() if kept is not None else b""
    digest = hashlib.sha256(f"{CUT_FORMAT}:{source_digest}:{widen}:".encode() + chosen).hexdigest()[:16]
    model = source_digest[:16]
    path = folder / f"{model}.{kind}-{digest}.gguf"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # servers starting together
        try:
            widened = copy_gguf(source, partial, kept, widen)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        log.info("LLM copy for decoding written (%s vocabulary, %d Q5_0 tensors as Q8_0): %s",
                 f"{len(kept)} tokens of the" if kept is not None else "the whole", widened, path)  # fmt: skip
        # the same model's other copies of this kind (another catalog, another setting); a server
        # still decoding one keeps its mapping of the file
        for old in folder.glob(f"{model}.{kind}-*.gguf"):
            if old != path:
                old.unlink(missing_ok=True)
    return path


def kept_tokens(tokenizer: LlamaModel, texts: Iterable[str], common: int, tokens: Iterable[int] = ()) -> np.ndarray:
    """`tokens`, those of `texts`, the `common` best-scored ordinary tokens, the byte tokens (or, in
    a vocabulary without them, the one-character tokens: what spelling falls back on) and the
    special tokens; ascending."""
    n = tokenizer.n_vocab
    flags = np.fromiter((tokenizer.attributes(t) for t in range(n)), dtype=np.int64, count=n)
    normal = np.flatnonzero(flags & _NORMAL)
    keep = set(tokenizer.special_ids()) | {int(t) for t in tokens}
    byte_tokens = np.flatnonzero(flags & _BYTE)
    if len(byte_tokens):
        keep.update(byte_tokens.tolist())
    else:
        keep.update(t for t in normal.tolist() if len(tokenizer.piece(t)) == 1)
    if common > 0:
        scores = np.fromiter((tokenizer.score(t) for t in normal.tolist()), dtype=np.float64, count=len(normal))
        keep.update(normal[np.argsort(-scores, kind="stable")[:common]].tolist())
    for text in texts:
        keep.update(tokenizer.tokenize(text))
    return np.array(sorted(keep), dtype=np.int64)


def copy_gguf(source: Path, target: Path, kept: np.ndarray | None, widen: bool) -> int:
    """A copy of the GGUF `source`. Where `kept` is given, its vocabulary-sized tensors keep those
    rows and it has no tokenizer (`tokenizer.ggml.model` "no_vocab": llama.cpp then takes the
    vocabulary's size from `<arch>.vocab_size`), the kept ids in `corella.kept_token_ids`. Where
    `widen`, each tensor with a faster layout of the same weights is written in it
    (runtime/layout.py). Returns how many tensors were widened."""
    try:
        import gguf
    except ImportError as exc:
        raise LLMError("copying the LLM for decoding needs gguf-py (pip install gguf); or serve with "
                       "--llm-vocab 0 --no-llm-widen") from exc  # fmt: skip
    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    rows = {"token_embd.weight", "output.weight"} if kept is not None else set()
    if kept is not None:
        embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embedding is None:
            raise LLMError(f"{source}: no token_embd.weight tensor; its vocabulary is not cut")
        n_vocab = int(embedding.shape[-1])
        for tensor in reader.tensors:
            if tensor.name not in rows and n_vocab in tensor.shape.tolist():
                raise LLMError(f"{source}: tensor {tensor.name} is vocabulary-sized too; its vocabulary is not cut")
    writer = gguf.GGUFWriter(target, arch, endianess=reader.endianess)
    try:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            if kept is not None and (key.startswith("tokenizer.") or key == f"{arch}.vocab_size"):
                continue
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if array else None)
        if kept is not None:
            writer.add_string("tokenizer.ggml.model", "no_vocab")
            writer.add_uint32(f"{arch}.vocab_size", len(kept))
            writer.add_array("corella.kept_token_ids", kept.tolist())
        tensors, count = [], 0
        for tensor in reader.tensors:
            kind, data = tensor.tensor_type, tensor.data
            if tensor.name in rows:
                data = np.ascontiguousarray(data[kept])
            if widen and (faster := widened(kind, data)) is not None:
                kind, data = gguf.GGMLQuantizationType(faster[0]), faster[1]
                count += 1
            tensors.append((tensor.name, kind, data))
        for name, kind, data in tensors:
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, _, data in tensors:
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return count


def widenable(source: Path) -> bool:
    """Whether the GGUF `source` holds a tensor that runtime/layout.py widens (its header alone)."""
    try:
        import gguf
    except ImportError:
        return False
    return any(int(t.tensor_type) in WIDER for t in gguf.GGUFReader(source).tensors)
