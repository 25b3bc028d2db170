"""gptlab.eval.stats against references written independently with numpy (no scipy): the
paired interval, the exact sign test and the clustered rate on random cases, Student's t
quantile against its printed table, and the edge cases a small or degenerate evaluation gives
(one question, every pair tied, no spread)."""
import math
import random
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gptlab.eval.report import describe_delta
from gptlab.eval.stats import (RESAMPLE_SEED, RESAMPLES, clustered_rate, excludes_zero,
                               expanded_level, paired_delta, sign_test, t_975, t_within)


# The 0.975 quantile of Student's t by degrees of freedom, as printed in t tables (Fisher and
# Yates; NIST/SEMATECH e-Handbook 1.3.6.7.2), to the digits printed there.
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 29: 2.045, 30: 2.042,
           100: 1.984, 599: 1.964}


def reference_paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    d = a - b
    half = t_975(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def reference_sign_test(wins: int, losses: int) -> float:
    """2 · P(X <= min) for X ~ Binomial(n, ½), the pmf built by its recurrence in floats,
    P(i + 1) = P(i) · (n − i) / (i + 1), from P(0) = 2^−n."""
    n, k = wins + losses, min(wins, losses)
    pmf = np.empty(n + 1)
    pmf[0] = 0.5 ** n
    for i in range(n):
        pmf[i + 1] = pmf[i] * (n - i) / (i + 1)
    return min(1.0, 2 * pmf[:k + 1].sum())


@pytest.mark.parametrize("seed", range(5))
def test_paired_delta_equals_a_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    a = rng.integers(0, 2, n).astype(float)
    b = np.where(rng.random(n) < 0.8, a, 1 - a)  # paired: mostly the same verdict
    d = paired_delta(a.tolist(), b.tolist())
    mean, lo, hi = reference_paired(a, b)
    assert d["n"] == n
    assert d["mean"] == pytest.approx(mean, abs=1e-12)
    assert d["ci95"] == pytest.approx([lo, hi], abs=1e-12)
    assert (d["better"], d["worse"]) == (int((a > b).sum()), int((a < b).sum()))
    assert d["p_sign"] == pytest.approx(reference_sign_test(d["better"], d["worse"]), rel=1e-9)


def test_paired_delta_on_scores_not_only_right_or_wrong():
    # d = (0.5, -0.25, 1, 0): mean 0.3125, sd by hand sqrt(Σ(d − 0.3125)² / 3).
    d = paired_delta([1.0, 0.25, 1.0, 0.5], [0.5, 0.5, 0.0, 0.5])
    sd = math.sqrt(((0.1875) ** 2 + (0.5625) ** 2 + (0.6875) ** 2 + (0.3125) ** 2) / 3)
    assert d["mean"] == pytest.approx(0.3125)
    t = T_TABLE[3]  # 3.182: four questions, three degrees of freedom
    assert d["ci95"] == pytest.approx([0.3125 - t * sd / 2, 0.3125 + t * sd / 2], abs=1e-3)
    assert (d["better"], d["worse"], d["p_sign"]) == (2, 1, 1.0)  # a tie counts for neither


@pytest.mark.parametrize("wins, losses", [(0, 0), (1, 0), (4, 0), (6, 24), (30, 3), (17, 17),
                                          (50, 60), (0, 300), (280, 320)])
def test_sign_test_equals_the_binomial_tail(wins, losses):
    assert sign_test(wins, losses) == pytest.approx(reference_sign_test(wins, losses), rel=1e-9)
    assert sign_test(wins, losses) == sign_test(losses, wins)  # two-sided: symmetric


def test_sign_test_by_hand():
    assert sign_test(4, 0) == 2 / 16
    assert sign_test(5, 1) == 2 * (1 + 6) / 64
    assert sign_test(2, 1) == 1.0  # 2 · (1 + 3) / 8 = 1, not above it


def test_one_question_has_no_interval_and_excludes_nothing():
    # One pair has no spread: [d, d] excluded 0 whenever the two models differed on it, and the
    # report called the difference significant on a single question.
    for a, b in (([1], [0]), ([0], [1]), ([1], [1])):
        d = paired_delta(a, b)
        assert d["ci95"] is None and d["n"] == 1
        assert not excludes_zero(d)
        # The report's typographic minus (−), not a hyphen.
        shown = f"{a[0] - b[0]:+.3f}".replace("-", "\u2212")
        assert describe_delta(d).startswith(f"{shown} (no confidence interval;")
    assert paired_delta([1], [0])["p_sign"] == 1.0


def test_all_ties_give_a_zero_interval_and_p_one():
    d = paired_delta([1, 0, 0, 1, 1], [1, 0, 0, 1, 1])
    assert d == {"mean": 0.0, "ci95": [0.0, 0.0], "n": 5, "better": 0, "worse": 0,
                 "p_sign": 1.0}
    assert not excludes_zero(d)


def test_every_question_differing_alike_gives_no_interval_and_the_sign_test_decides():
    # Right against wrong on each of 3 questions: sd 0 made the interval [1, 1], which "excluded
    # 0" on 3 questions as on 3,000; the sign test gives 3 of 3 p = 0.25.
    for a, b, mean in (([1, 1, 1], [0, 0, 0], 1.0), ([0, 0], [1, 1], -1.0),
                       ([0.75] * 4, [0.5] * 4, 0.25)):
        d = paired_delta(a, b)
        assert d["mean"] == mean and d["ci95"] is None and not excludes_zero(d)
    d = paired_delta([1, 1, 1], [0, 0, 0])
    assert (d["better"], d["worse"], d["p_sign"]) == (3, 0, 0.25)
    assert describe_delta(d) == ("+1.000 (no confidence interval; better on 3 questions, worse "
                                 "on 0; sign test p = 0.25)")
    # On 600 questions the sign test says what the interval cannot: no chance split.
    d = paired_delta([1] * 600, [0] * 600)
    assert d["ci95"] is None and d["p_sign"] == 2 / 2 ** 600
    assert "sign test p = 4.8e-181" in describe_delta(d)
    # Decided on the differences, not on their variance, which rounding left at 2e-33 for 0.1
    # on each of 3 questions: an interval 1e-16 wide, "excluding 0".
    for a, b in (([0.1] * 3, [0.0] * 3), ([0.7] * 10, [0.0] * 10)):
        d = paired_delta(a, b)
        assert d["ci95"] is None and not excludes_zero(d) and d["better"] == len(a)
    # One question differing among equal ones has spread again: an interval, and it includes 0.
    d = paired_delta([1, 1, 1], [0, 0, 1])
    assert d["ci95"] is not None and not excludes_zero(d)


def test_unequal_or_empty_inputs_are_refused():
    for a, b in (([], []), ([1], [1, 0])):
        with pytest.raises(ValueError, match="equally long, non-empty"):
            paired_delta(a, b)


def reference_clustered(counts: list[tuple[float, int]]) -> list[float]:
    """The cluster bootstrap with numpy: the same resamples (k clusters, each picked as
    ⌊u · k⌋ from `random.Random(0)`'s uniforms), their rates as Σ right / Σ total by
    multiplicity, the expanded percentile level from `statistics.NormalDist`, the floor
    rate · k/(k + t²) and its mirror."""
    k = len(counts)
    draw = random.Random(RESAMPLE_SEED).random
    picks = np.array([[int(draw() * k) for _ in range(k)] for _ in range(RESAMPLES)])
    times = np.stack([np.bincount(p, minlength=k) for p in picks])  # (RESAMPLES, k)
    right, total = np.array(counts, dtype=float).T
    rates = np.sort(times @ right / (times @ total))
    tail = NormalDist().cdf(-math.sqrt(k / (k - 1)) * t_975(k - 1))
    m = math.floor(tail * RESAMPLES)
    rate, w = right.sum() / total.sum(), k / (k + t_975(k - 1) ** 2)
    return [min(rates[m], rate * w), max(rates[RESAMPLES - 1 - m], 1 - (1 - rate) * w)]


@pytest.mark.parametrize("seed", range(5))
def test_clustered_rate_equals_a_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 60))
    total = rng.integers(1, 12, k)
    right = np.array([rng.integers(0, 2 * t + 1) / 2 for t in total])  # ties count half
    counts = list(zip(right.tolist(), total.tolist()))
    r = clustered_rate(counts)
    assert r["mean"] == pytest.approx(right.sum() / total.sum(), abs=1e-12)
    assert r["ci95"] == pytest.approx(reference_clustered(counts), abs=1e-12)
    assert (r["clusters"], r["n"]) == (k, int(total.sum()))


def test_expanded_level_by_hand():
    # Φ(−√(k/(k − 1)) · t): 7 clusters, t(6) = 2.447, √(7/6) · 2.447 = 2.643, Φ(−2.643) =
    # 0.0041; towards 0.025 as k grows.
    assert expanded_level(7) == pytest.approx(NormalDist().cdf(-math.sqrt(7 / 6) * 2.4469),
                                              abs=1e-5)
    assert round(expanded_level(7), 4) == 0.0041 and round(expanded_level(32), 4) == 0.0191
    assert expanded_level(10 ** 5) == pytest.approx(0.025, abs=1e-5)


def test_clustered_rate_right_on_every_cluster_stays_wide_on_few():
    # Right on each of 7 prompts: no spread between them, and [1, 1] claimed certainty from 7
    # draws. Wilson's interval on 7 draws with t for six degrees of freedom (2.447) gives
    # [7 / (7 + 2.447²), 1] = [0.539, 1]; the exact binomial bound 0.025^(1/7) is 0.590.
    r = clustered_rate([(1, 1)] * 7)
    assert (r["mean"], r["clusters"], r["n"]) == (1.0, 7, 7)
    assert r["ci95"][0] == pytest.approx(7 / (7 + 2.447 ** 2), abs=1e-4)
    assert round(r["ci95"][0], 3) == 0.539 and r["ci95"][1] == 1.0
    assert r["ci95"][0] < 0.025 ** (1 / 7)
    # Prompts of many pairs each are still 7 draws: the same interval.
    assert clustered_rate([(3, 3), (5, 5), (1, 1), (2, 2), (4, 4), (1, 1), (6, 6)]) == {
        **r, "n": 22}


def test_clustered_rate_wrong_on_every_cluster_stays_wide_on_few():
    # Wrong on each of 5 prompts: [0, t²/(5 + t²)] with t = 2.776 (four degrees of freedom),
    # [0, 0.607], where it was [0, 0]; on two prompts t = 12.706: [0, 0.988].
    r = clustered_rate([(0, 1), (0, 2), (0, 1), (0, 4), (0, 1)])
    assert (r["mean"], r["clusters"], r["n"]) == (0.0, 5, 9)
    assert r["ci95"][0] == 0.0
    assert r["ci95"][1] == pytest.approx(2.776 ** 2 / (5 + 2.776 ** 2), abs=1e-4)
    assert round(r["ci95"][1], 3) == 0.607
    two = clustered_rate([(0, 3), (0, 5)])["ci95"]
    assert two[0] == 0.0 and two[1] == pytest.approx(12.706 ** 2 / (2 + 12.706 ** 2), abs=1e-5)


def test_clustered_rate_with_every_cluster_at_one_rate_keeps_the_floor():
    # 3 of 11 and 15 of 55: every resample's rate is 3/11, no spread to resample. The floor
    # keeps the share w = k/(k + t²) of the way to 0 and to 1 from the rate: two clusters,
    # t = 12.706, w = 2 / (2 + t²) = 0.0122: [3/11 · w, 1 − 8/11 · w] = [0.003, 0.991].
    r = clustered_rate([(3, 11), (15, 55)])
    w = 2 / (2 + t_975(1) ** 2)
    assert r["ci95"] == pytest.approx([3 / 11 * w, 1 - 8 / 11 * w], abs=1e-15)
    assert [round(x, 3) for x in r["ci95"]] == [0.003, 0.991]


def test_one_error_more_never_gives_a_narrower_higher_interval():
    # 7 prompts all right: [7 / (7 + 2.447²), 1] = [0.539, 1]. The rate ± t · standard error
    # gave 6 right and one 9 of 10 [0.871, 1], narrower and higher for an error more. Now its
    # bootstrap's 2.5% end (0.89 here) is capped by the floor 15/16 · 0.539 = 0.505.
    all_right = clustered_rate([(1, 1)] * 6 + [(10, 10)])["ci95"]
    one_wrong = clustered_rate([(1, 1)] * 6 + [(9, 10)])["ci95"]
    assert all_right == pytest.approx([7 / (7 + t_975(6) ** 2), 1.0], abs=1e-15)
    assert one_wrong == pytest.approx([15 / 16 * 7 / (7 + t_975(6) ** 2), 1.0], abs=1e-15)
    assert round(all_right[0], 3) == 0.539 and round(one_wrong[0], 3) == 0.505
    # One singleton wrong: 6 of 7, the bootstrap's end (0.429, a resample with 4 of the 7
    # draws wrong) below the floor 6/7 · 0.539 = 0.462.
    assert clustered_rate([(1, 1)] * 6 + [(0, 1)])["ci95"] == pytest.approx([3 / 7, 1.0])


@settings(deadline=None, max_examples=60, derandomize=True)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 12)), min_size=2, max_size=9),
       st.integers(0, 8), st.booleans())
def test_one_more_error_never_raises_either_bound(clusters, which, half):
    # Each cluster (n, r) with r pairs of n right (r wrapped into 0..n, a tie counts half);
    # one right pair of cluster `which` turned wrong (or into a tie): neither bound goes up.
    counts = [(min(r, 2 * n) / 2, n) for n, r in clusters]
    j = which % len(counts)
    r, n = counts[j]
    assume(r >= 0.5)
    fewer = list(counts)
    fewer[j] = (r - (0.5 if half else min(1.0, r)), n)
    before, after = clustered_rate(counts)["ci95"], clustered_rate(fewer)["ci95"]
    assert after[0] <= before[0] and after[1] <= before[1]


def test_on_many_clusters_the_interval_is_the_t_intervals_within_0_002():
    # 400 prompts of 1 to 28 pairs, each prompt's own rate from Beta(6, 1.2) (rate ≈ 0.83):
    # the bootstrap's bounds are those of rate ± t(399) · standard error (the rule before) to
    # 0.002.
    for seed in range(3):
        rng = random.Random(seed)
        counts = []
        for _ in range(400):
            n, p = rng.choice([1, 1, 1, 2, 3, 6, 10, 15, 21, 28]), rng.betavariate(6, 1.2)
            counts.append((sum(rng.random() < p for _ in range(n)), n))
        k, total = len(counts), sum(n for _, n in counts)
        rate = sum(r for r, _ in counts) / total
        half = t_975(k - 1) * math.sqrt(k / (k - 1) * sum((r - rate * n) ** 2
                                                          for r, n in counts)) / total
        assert clustered_rate(counts)["ci95"] == pytest.approx([rate - half, rate + half],
                                                               abs=0.002)


def test_clustered_rate_sums_the_counts_of_one_cluster_into_one_draw():
    # Eight rankings of six prompts (P and Q ranked in two rounds), one pair each. By prompt:
    # P (2, 2), Q (0, 2), R (1, 1), S (0, 1), T (1, 1), U (0, 1); rate 4/8, residuals right_i −
    # rate·total_i = 1, −1, ½, −½, ½, −½: var = 6/5 · 3 / 8² = 0.05625.
    counts = [(1, 1), (1, 1), (0, 1), (0, 1), (1, 1), (0, 1), (1, 1), (0, 1)]
    r = clustered_rate(counts, list("PPQQRSTU"))
    # Six prompts: among 2,000 resamples some draw P and R, T only (rate 1) or Q, S, U only
    # (rate 0), and the expanded level (0.0024, the 5th from each end) reaches them.
    assert (r["mean"], r["clusters"], r["n"]) == (0.5, 6, 8)
    assert r["ci95"] == [0.0, 1.0]
    # Eight draws of their own had claimed a narrower interval: [0.125, 0.875].
    alone = clustered_rate(counts)
    assert alone["clusters"] == 8
    assert alone["ci95"] == [0.125, 0.875]
    assert clustered_rate(counts, list("PQRSTUVW")) == alone  # distinct clusters: unchanged
    with pytest.raises(ValueError, match="one cluster per count"):
        clustered_rate(counts, list("PQ"))


@pytest.mark.parametrize("df, printed", sorted(T_TABLE.items()))
def test_t_975_equals_the_printed_table(df, printed):
    assert round(t_975(df), 3) == printed
    assert t_within(t_975(df), df) == pytest.approx(0.95, abs=1e-12)


def test_t_975_in_closed_form_and_towards_the_normal():
    # df 1 is Cauchy: tan(0.475 π); df 2: P(|T| <= t) = t / √(2 + t²) = 0.95.
    assert t_975(1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert t_975(2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95 ** 2)), rel=1e-12)
    # The series beyond 1,000 degrees continues the exact sum: no step at the switch.
    assert t_975(1001) == pytest.approx(t_within_inverse(1001), abs=1e-12)
    values = [t_975(df) for df in (1, 2, 5, 30, 599, 1000, 1001, 10 ** 4, 10 ** 6)]
    assert values == sorted(values, reverse=True)
    assert values[-1] == pytest.approx(1.959964, abs=1e-5)  # the normal's quantile
    with pytest.raises(ValueError, match="degree of freedom"):
        t_975(0)


def t_within_inverse(df: int) -> float:
    """t_975 by bisection on t itself, with the exact sum however long."""
    lo, hi = 1.0, 20.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_within(mid, df) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def test_a_handful_of_questions_get_the_t_interval_not_the_normal_one():
    # Three questions, differences (1, 1, 0) (as with --eval-limit 3): mean 2/3, sd 1/√3; the
    # normal's 1.96 gave [0.013, 1.320], excluding 0 on three questions, t for two degrees of
    # freedom (4.303) gives [−0.768, 2.101].
    d = paired_delta([1, 1, 0], [0, 0, 0])
    sd = math.sqrt(1 / 3)
    assert d["ci95"] == pytest.approx([2 / 3 - 4.303 * sd / math.sqrt(3),
                                       2 / 3 + 4.303 * sd / math.sqrt(3)], abs=1e-3)
    assert not excludes_zero(d)
    # The reward model's interval by prompt, three prompts: the floor with t for two degrees
    # of freedom, 5/6 · 3 / (3 + 4.303²) = 0.116, below the bootstrap's lowest resample (0.5).
    r = clustered_rate([(2, 2), (2, 2), (1, 2)])
    assert r["ci95"] == pytest.approx([5 / 6 * 3 / (3 + 4.303 ** 2), 1.0], abs=1e-4)


def test_two_questions_that_differ_unequally_get_the_t_interval():
    # Differences (1, 0): mean ½, sd √½, se √½ / √2 = ½, t for one degree of freedom 12.706:
    # [½ − 6.353, ½ + 6.353]. An interval needs two questions, not three.
    d = paired_delta([1, 0], [0, 0])
    assert d["ci95"] == pytest.approx([0.5 - 12.706 * 0.5, 0.5 + 12.706 * 0.5], abs=1e-3)
    assert (d["better"], d["worse"], d["p_sign"]) == (1, 0, 1.0)


def test_wilson_bounds_at_a_rate_of_0_or_1_are_exactly_0_and_1():
    # The formula's (centre ∓ spread) / scale rounds to 6e-17 at 0 of 3 and to 1 − 1e-16 at 4 of
    # 4: the interval of a rate of 0 starts at 0 itself and that of 1 ends at 1 itself.
    zero = clustered_rate([(0, 1)] * 3)["ci95"]
    assert zero[0] == 0.0
    assert zero[1] == pytest.approx(4.303 ** 2 / (3 + 4.303 ** 2), abs=1e-4)
    one = clustered_rate([(1, 1)] * 4)["ci95"]
    assert one[1] == 1.0 and one[0] == pytest.approx(4 / (4 + 3.182 ** 2), abs=1e-4)


@pytest.mark.parametrize("df", [101, 200, 999])
def test_t_975_below_1000_degrees_is_the_exact_sum_not_the_expansion(df):
    # The Cornish–Fisher expansion is 7e-11 off at 101 degrees, 2e-12 at 200.
    assert t_975(df) == pytest.approx(t_within_inverse(df), abs=1e-12)
