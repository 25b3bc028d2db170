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


def clustered_rate(counts: Sequence[tuple[float, int]]) -> dict:
    """A rate summed over clusters, Σ right / Σ total (a reward model's pairwise accuracy, the
    pairs of one prompt a cluster), with a normal-approximation 95% interval that treats the
    clusters, not the pairs, as the independent draws (the pairs of one prompt share its
    responses), clipped to [0, 1]: var = k/(k−1) · Σ (right_i − rate·total_i)² / (Σ total)².
    Fewer than two clusters give no interval."""
    counts = [(r, n) for r, n in counts if n > 0]
    total = sum(n for _, n in counts)
    if not total:
        return {"mean": None, "ci95": None, "clusters": 0, "n": 0}
    rate = sum(r for r, _ in counts) / total
    k = len(counts)
    if k < 2:
        return {"mean": rate, "ci95": None, "clusters": k, "n": total}
    var = k / (k - 1) * sum((r - rate * n) ** 2 for r, n in counts) / total ** 2
    half = 1.96 * math.sqrt(var)
    return {"mean": rate, "ci95": [max(0.0, rate - half), min(1.0, rate + half)], "clusters": k,
            "n": total}
