"""What one batch of candidates costs llama.cpp against a decoded prefix: the suffix tokens, and the
logits rows (each a projection onto the whole vocabulary) that give the answers.

    python -m benchmarks.suffix_cost bundles/ml100k-v4 --threads 2 [--gguf CUT.gguf --rounds 2]

Decodes a prefix of --prefix tokens once, then --candidates suffixes of --suffix tokens each in
their own sequence, with every candidate's last row asking for logits and with none, and prints the
median over --repeats. A prompt change that shortens the suffix, or a model with a smaller
vocabulary (--gguf: the cut copy the server decodes), shows up here before any training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from runtime.llm import LlamaContext, LlamaModel


def suffix_batch_ms(context: LlamaContext, prefix: int, candidates: int, suffix: int, logits: bool) -> float:
    """One llama_decode of the candidates' suffixes after the prefix (sequences 1..candidates), undone."""
    tokens, positions, seqs, flags = [], [], [], []
    for k in range(candidates):
        for j in range(suffix):
            tokens.append(2000 + 37 * k + j)
            positions.append(prefix + j)
            seqs.append(k + 1)
            flags.append(logits and j == suffix - 1)
    started = time.perf_counter()
    context.decode(tokens, positions, seqs, flags)
    elapsed = time.perf_counter() - started
    for k in range(candidates):
        context.remove_sequence(k + 1, prefix)
    return 1000 * elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefix", type=int, default=277, help="prefix tokens (a 10-item history: ~277)")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--suffix", type=int, default=12, help="tokens a candidate (prompt version 5: ~12; 4: ~17)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--gguf", type=Path, action="append", default=[],
                        help="another GGUF of the same model to time alike, in turn with the bundle's (the cut "
                        "copy `corella serve` decodes: /v1/model's llm.vocabulary.cut_file); repeatable")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="times over the files, in turn")
    args = parser.parse_args()
    llm = json.loads((args.bundle / "manifest.json").read_text())["llm"]
    for _ in range(args.rounds):
        for path in [args.bundle / llm["file"], *args.gguf]:
            _time_file(path, args)


def _time_file(path: Path, args: argparse.Namespace) -> None:
    model = LlamaModel(path, 0, 1)  # the answer tokens play no part in the timing
    context = LlamaContext(model, 4096, 512, args.candidates + 1, args.threads)
    try:
        every = tuple(range(args.candidates + 1))
        context.decode(list(range(1000, 1000 + args.prefix)), list(range(args.prefix)), [every] * args.prefix,
                       [False] * args.prefix)  # fmt: skip
        for logits in (True, False):
            times = [suffix_batch_ms(context, args.prefix, args.candidates, args.suffix, logits)
                     for _ in range(args.repeats)]  # fmt: skip
            rows = args.candidates if logits else 0
            print(f"{path.name} ({model.n_vocab:,} tokens): {args.candidates} x {args.suffix} suffix tokens "
                  f"after {args.prefix}, {rows} logits rows, {args.threads} threads: "
                  f"{statistics.median(times):.1f} ms")  # fmt: skip
    finally:
        context.close()
        model.close()


if __name__ == "__main__":
    main()
