"""Paired comparisons of two models on the same questions."""
from __future__ import annotations

import math
from typing import Sequence


def paired_delta(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a_i − b_i with a normal-approximation 95% interval from the paired differences."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_delta needs two equally long, non-empty sequences")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def excludes_zero(delta: dict) -> bool:
    lo, hi = delta["ci95"]
    return lo > 0 or hi < 0
