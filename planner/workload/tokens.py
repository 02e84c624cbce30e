"""Token counts as users write them: binary K/M/G suffixes (K = 1024) and the longest length we accept."""

from __future__ import annotations

import math

import numpy as np

from planner.workload.errors import SourceError

K_TOKENS = 1024
M_TOKENS = 1024 * K_TOKENS
G_TOKENS = 1024 * M_TOKENS
# A single document of 1G tokens is not training data: larger values are bytes, characters or a
# misread column, so they are rejected rather than planned.
MAX_LENGTH_TOKENS = G_TOKENS

_SUFFIX = {"": 1, "K": K_TOKENS, "M": M_TOKENS, "G": G_TOKENS}


def parse_tokens(text: str | int) -> int:
    """A positive token count with an optional binary suffix: "256K" -> 262144 (K = 1024, M = 1024²,
    G = 1024³); "1.5M" is allowed when it names a whole number of tokens."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value: float = int(text)
    else:
        s = str(text).strip().upper().replace("_", "")
        unit = s[-1:] if s[-1:] in ("K", "M", "G") else ""
        try:
            value = float(s[: len(s) - len(unit)]) * _SUFFIX[unit]
        except ValueError:
            value = math.nan
    if not (math.isfinite(value) and value == int(value) and value >= 1):
        raise SourceError(f"cannot read token count {text!r}: use a positive integer with an optional "
                          "K, M or G suffix (K = 1024), e.g. 256K")
    return int(value)


def format_tokens(n: int) -> str:
    """Inverse of parse_tokens for display: 262144 -> "256K"; other counts print as integers."""
    for unit, size in (("G", G_TOKENS), ("M", M_TOKENS), ("K", K_TOKENS)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
