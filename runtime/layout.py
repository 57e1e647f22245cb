"""Weights rewritten in a block layout llama.cpp multiplies faster on a CPU, holding the same numbers.

A q4_k_m GGUF of a small model keeps most of its matrices in Q5_0: their rows (640 wide in Gemma 3
270M) are not a multiple of the 256 that k-quants need, and llama.cpp's quantizer falls back to
Q5_0 for them. A Q5_0 block is 32 weights `d * (q - 16)`, q of 5 bits split over two arrays; a
Q8_0 block is 32 weights `d * q`, q a plain int8. So every Q5_0 block is a Q8_0 block with the same
scale d and q - 16 (-16..15) as its bytes: the same weights, exactly. Both are multiplied against
activations quantized to Q8_0 and summed as integers before the scales, so the products are the
same too; only the unpacking of the 5-bit values goes. On this box's x86 cores (AVX-512) that is
~10-15% more prompt tokens a second for Gemma 3 270M, at 24% more bytes of weights.

Nothing else is rewritten: the other types of such a file (Q4_K, Q6_K) have sub-block scales or
offsets that no faster type holds exactly, and converting them would change the answers.

    widened(tensor_type, data)  # (type, data) to write in place of a tensor's, or None
"""

from __future__ import annotations

import numpy as np

__all__ = ["Q5_0", "Q8_0", "WIDER", "widened", "q5_0_as_q8_0"]

# ggml_type ids (ggml.h; gguf-py's GGMLQuantizationType)
Q5_0, Q8_0 = 6, 8
_Q5_0_BLOCK, _Q8_0_BLOCK = 22, 34  # bytes a block of 32 weights: fp16 d, 4 bytes of high bits, 16 of nibbles


def q5_0_as_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q5_0 blocks (uint8 rows of 22-byte blocks) as Q8_0 blocks (rows of 34-byte blocks), exactly."""
    rows = raw.shape[0] if raw.ndim > 1 else 1
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1, _Q5_0_BLOCK)
    scale = blocks[..., :2]
    high = blocks[..., 2:6].copy().view("<u4")  # bit j: the fifth bit of weight j
    low = blocks[..., 6:]  # byte j: weight j in its low nibble, weight j + 16 in its high one
    bit = np.arange(16, dtype=np.uint32)
    first = (low & 0x0F) | (((high >> bit) & 1) << 4).astype(np.uint8)
    second = (low >> 4) | (((high >> (bit + 16)) & 1) << 4).astype(np.uint8)
    values = (np.concatenate([first, second], axis=-1).astype(np.int16) - 16).astype(np.int8)
    out = np.concatenate([scale, values.view(np.uint8)], axis=-1)
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // _Q5_0_BLOCK * _Q8_0_BLOCK)


#: a type -> the faster type that holds its weights exactly, and the conversion of its bytes
WIDER = {Q5_0: (Q8_0, q5_0_as_q8_0)}


def widened(tensor_type: int, data: np.ndarray) -> tuple[int, np.ndarray] | None:
    """The faster type and bytes holding a tensor's very weights, or None where there is none."""
    if (wider := WIDER.get(int(tensor_type))) is None:
        return None
    return wider[0], wider[1](data)
