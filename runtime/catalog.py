"""An item's categorical attributes and numbers as tags: one definition for training and serving.

The CRM reads an item's tags (pooled embeddings) and the LLM reads them in the prompt, so an
attribute ("format": "paperback") becomes the tag "format: paperback", and a number becomes the
power-of-two range it falls in ("price ~8-16"): a bucket that needs no fitted edges, so an item
posted while serving gets the tag its twin in the training data got.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["attribute_tags", "number_tag"]


def number_tag(name: str, value: float) -> str:
    """`name ~low-high`, the power-of-two range holding |value| (sign kept; 0 and below 1 apart)."""
    if not math.isfinite(value):
        return f"{name} ~?"
    sign = "-" if value < 0 else ""
    size = abs(value)
    if size < 1:
        return f"{name} ~{sign}0-1" if size > 0 else f"{name} ~0"
    exponent = math.frexp(size)[1] - 1  # exact, where log2 rounds near the largest floats
    if exponent >= 40:  # past a trillion, the exponents themselves
        return f"{name} ~{sign}2^{exponent}-2^{exponent + 1}"
    low = 2**exponent
    return f"{name} ~{sign}{low:g}-{2 * low:g}"


def attribute_tags(attributes: Mapping[str, str | None], numbers: Mapping[str, float | None]) -> list[str]:
    """Tags of an item's attributes and numbers, in the order given; missing values give none."""
    tags = [f"{name}: {value}" for name, value in attributes.items() if value is not None and str(value).strip()]
    tags += [number_tag(name, float(value)) for name, value in numbers.items() if value is not None]
    return tags
