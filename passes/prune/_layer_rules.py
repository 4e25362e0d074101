"""Private helper of the pruning passes: per-layer overrides written ``PATTERN=LEVEL`` (one parser for both)."""

from __future__ import annotations

import math

__all__ = ["parse_levels"]


def parse_levels(entries: list[str], option: str, what: str) -> list[tuple[str, float]]:
    """``["conv1=0.3", "op:Gemm=0"]`` -> [(pattern, level)], each level in [0, 1); ValueError naming ``option``."""
    out = []
    for text in entries:
        pattern, sep, value = text.rpartition("=")
        try:
            level = float(value)
        except ValueError:
            level = math.nan
        if not sep or not pattern or not 0 <= level < 1:
            raise ValueError(f"{option} entries are PATTERN={what} with {what} in [0, 1); got {text!r}")
        out.append((pattern, level))
    return out
