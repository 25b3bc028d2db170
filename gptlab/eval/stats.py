"""Paired comparisons of two models on the same questions."""
from __future__ import annotations

import math
from typing import Hashable, Sequence


def paired_delta(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a_i − b_i with a normal-approximation 95% interval from the paired differences;
    with it how many pairs `a` wins and loses, and the exact two-sided sign test on those (on
    right/wrong answers, McNemar's exact test), which stays honest where few pairs differ and
    the normal interval does not (4 wins, 0 losses of 600: the interval excludes 0, p = 0.125).
    One pair has no spread to estimate: its interval is None, not [d, d], which would exclude 0
    whenever the two differ."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_delta needs two equally long, non-empty sequences")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    ci95 = None
    if n > 1:
        var = sum((x - mean) ** 2 for x in d) / (n - 1)
        half = 1.96 * math.sqrt(var / n)
        ci95 = [mean - half, mean + half]
    better, worse = sum(x > 0 for x in d), sum(x < 0 for x in d)
    return {"mean": mean, "ci95": ci95, "n": n, "better": better, "worse": worse,
            "p_sign": sign_test(better, worse)}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven if wins and
    losses were equally likely, 2 · P(Binomial(wins + losses, ½) <= min), at most 1."""
    n = wins + losses
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def excludes_zero(delta: dict) -> bool:
    """Whether the 95% interval lies on one side of 0; no interval excludes nothing."""
    if delta["ci95"] is None:
        return False
    lo, hi = delta["ci95"]
    return lo > 0 or hi < 0


def clustered_rate(counts: Sequence[tuple[float, int]],
                   clusters: Sequence[Hashable] | None = None) -> dict:
    """A rate summed over clusters, Σ right / Σ total (a reward model's pairwise accuracy, the
    pairs of one prompt a cluster), with a normal-approximation 95% interval that treats the
    clusters, not the pairs, as the independent draws (the pairs of one prompt share its
    responses), clipped to [0, 1]: var = k/(k−1) · Σ (right_i − rate·total_i)² / (Σ total)².
    `clusters`: each count's cluster where several counts may share one (one prompt ranked in
    two rounds: two rankings, one draw), summed into one before the interval; None: each count
    its own. Fewer than two clusters give no interval."""
    if clusters is not None:
        if len(clusters) != len(counts):
            raise ValueError("clustered_rate needs one cluster per count")
        merged: dict[Hashable, tuple[float, int]] = {}
        for key, (r, n) in zip(clusters, counts):
            r0, n0 = merged.get(key, (0, 0))
            merged[key] = (r0 + r, n0 + n)
        counts = list(merged.values())
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
