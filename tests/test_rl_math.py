"""The numbers of the reward model and PPO against hand computations."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gptlab.model.heads import last_real_index
from gptlab.train.rl_math import (AdaptiveKLController, clipped_policy_loss, clipped_value_loss,
                                  gae, kl_per_token, kwise_ranking_loss, masked_mean, whiten)


def logsig(x):
    return math.log(1 / (1 + math.exp(-x)))


def test_kwise_loss_equals_mean_of_pairwise_terms_and_hand_computation():
    s = torch.tensor([[2.0, 0.5, -1.0, 0.0]])  # ranked best first, K = 4
    loss = kwise_ranking_loss(s, torch.tensor([4]))
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    hand = -sum(logsig(s[0, i].item() - s[0, j].item()) for i, j in pairs) / 6
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    # The same as the mean of K=2 losses over the C(4,2) pairs.
    pairwise = torch.stack([kwise_ranking_loss(s[:, [i, j]], torch.tensor([2])) for i, j in pairs])
    assert loss.item() == pytest.approx(pairwise.mean().item(), abs=1e-6)


def test_kwise_loss_ignores_padding_and_averages_per_prompt():
    s = torch.tensor([[1.0, 0.0, 99.0], [0.3, 0.1, -0.2]])
    loss = kwise_ranking_loss(s, torch.tensor([2, 3]))
    first = -logsig(1.0)
    second = -(logsig(0.2) + logsig(0.5) + logsig(0.3)) / 3
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-6)


def test_kwise_loss_counts_only_pairs_with_a_real_preference():
    s = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.3, 0.1, -0.2, 7.0]])
    k = torch.tensor([4, 3])
    # Row 0: [a, [b, c], d] -> pairs a>b, a>c, a>d, b>d, c>d (b, c tied: no pair).
    # Row 1: [[x, y], z] -> pairs x>z, y>z; the padded 4th place is ignored.
    groups = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 0]])
    loss = kwise_ranking_loss(s, k, groups)
    first = -(logsig(1.5) + logsig(3.0) + logsig(2.0) + logsig(0.5) + logsig(-1.0)) / 5
    second = -(logsig(0.5) + logsig(0.3)) / 2
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-6)
    # One level per response is exactly the untied loss.
    untied = kwise_ranking_loss(s, k, torch.arange(4).expand(2, 4))
    assert untied.item() == pytest.approx(kwise_ranking_loss(s, k).item(), abs=1e-7)
    assert untied.item() != pytest.approx(loss.item(), abs=1e-3)


def test_gae_on_a_hand_worked_example():
    # One response of 3 tokens, reward only at the end, γ = 1, λ = 0.5.
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.2, 0.4, 9.0]])  # position 3 is padding: its value is ignored
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    d2 = 1.0 + 0 - 0.4          # 0.6
    d1 = 0.0 + 0.4 - 0.2        # 0.2
    d0 = 0.0 + 0.2 - 0.5        # -0.3
    a2, a1 = d2, d1 + 0.5 * d2  # 0.6, 0.5
    a0 = d0 + 0.5 * a1          # -0.05
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0], abs=1e-6)


def test_gae_with_lambda_one_gives_reward_to_go_minus_value():
    torch.manual_seed(0)
    r, v = torch.randn(2, 5), torch.randn(2, 5)
    m = torch.ones(2, 5)
    adv, _ = gae(r, v, m, gamma=1.0, lam=1.0)
    to_go = r.flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv, to_go - v, atol=1e-6)


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    assert kl_per_token(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0])
    k3 = kl_per_token(logp, ref, "k3")
    expected = [math.exp(-x) - 1 + x for x in (0.5, -1.0, 0.0)]
    assert k3.tolist() == pytest.approx(expected, abs=1e-6)
    assert (k3 >= 0).all()
    # Both are unbiased estimates of KL(p || q) for samples from p.
    torch.manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True)
    for est in ("k1", "k3"):
        mc = kl_per_token(p.log()[x], q.log()[x], est).mean().item()
        assert mc == pytest.approx(exact, abs=0.01)
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2x")


def test_whiten_gives_zero_mean_unit_variance_over_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = whiten(x, m)
    real = w[m.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert w[0, 3] == 0 and w[1, 2] == 0


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    m = torch.ones(1, 3)
    loss, stats = clipped_policy_loss(logp, old, adv, m, clip=0.2)
    # per token: -min(ρA, clip(ρ)A): 1.5·1 -> clip 1.2 -> -1.2 ;
    # 0.5·1 -> min(0.5, 0.8) = 0.5 -> -0.5 ; 1.1·(-2) = -2.2 vs 1.1·(-2) (inside the clip) -> 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[1.0, 1.0]])
    loss, frac = clipped_value_loss(new, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-1)^2 = 0, clipped (0.2-1)^2 = 0.64 -> 0.64; token 1: 0.81 both
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, abs=1e-6)
    assert frac.item() == pytest.approx(0.5)


def test_last_real_index_under_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert last_real_index(right).tolist() == [2, 4, 0]
    assert last_real_index(left).tolist() == [4, 4]


def test_adaptive_kl_controller_moves_towards_target():
    c = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert c.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    c = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert c.update(3.0, 10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


def test_gae_discounts_values_and_advantages_with_gamma():
    # The hand-worked case above with γ = 0.9: γ scales V_{t+1} in δ_t and γλ carries A_{t+1}.
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.5)
    d2 = 1.0 + 0.9 * 0 - 0.4    # 0.6
    d1 = 0.0 + 0.9 * 0.4 - 0.2  # 0.16
    d0 = 0.0 + 0.9 * 0.2 - 0.5  # -0.32
    a2 = d2                     # 0.6
    a1 = d1 + 0.45 * a2         # 0.43
    a0 = d0 + 0.45 * a1         # -0.1265
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0], abs=1e-6)


def test_clipped_policy_loss_clips_a_low_ratio_of_a_negative_advantage():
    # A < 0 and ρ = 0.5 < 1 - ε: the clipped term (-A · 0.8 = 0.8) is the pessimistic one, so
    # lowering π further earns nothing. ρ = 1.5 with A < 0 stays unclipped (1.5 > 1.2).
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[0.5, 1.5]]))
    adv = torch.tensor([[-1.0, -1.0]])
    loss, stats = clipped_policy_loss(logp, old, adv, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx((0.8 + 1.5) / 2, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    # approx KL = mean ½ (log ρ)²
    expected_kl = 0.5 * (math.log(0.5) ** 2 + math.log(1.5) ** 2) / 2
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-6)


def test_clipped_value_loss_clips_a_value_that_fell_below_the_old_one():
    # V_old = 0, V = -1, R = -1: unclipped 0; clipped V is -0.2, (−0.2 + 1)² = 0.64 -> 0.64.
    old, new, ret = torch.zeros(1, 2), torch.tensor([[-1.0, -0.1]]), torch.tensor([[-1.0, -1.0]])
    loss, frac = clipped_value_loss(new, old, ret, torch.ones(1, 2), clip=0.2)
    # token 1: -0.1 is inside the clip: (−0.1 + 1)² = 0.81 both ways
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, abs=1e-6)
    assert frac.item() == pytest.approx(0.5)


def test_entropy_from_logits_by_hand():
    from gptlab.train.rl_math import entropy_from_logits
    # Uniform over 4 tokens: log 4; logits (0, log 3): probabilities 1/4, 3/4.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[0.0, math.log(3.0), -50.0, -50.0]]])
    h = entropy_from_logits(logits)
    expected = [math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert h.shape == (2, 1)
    assert h[:, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_adaptive_kl_controller_scales_with_the_relative_error_inside_the_clip():
    # KL 7 against a target of 6: error 7/6 - 1 = 1/6, inside ±0.2, so β moves by 1/6 · n/horizon.
    c = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert c.update(7.0, 10) == pytest.approx(0.1 * (1 + 0.1 / 6))
    # KL 5.4: error -0.1; a second update compounds on the first.
    assert c.update(5.4, 50) == pytest.approx(0.1 * (1 + 0.1 / 6) * (1 - 0.1 * 0.5))


# --- the same functions on random batches, against a direct reading of their definitions ------

def _matrix(draw, B, T, bound):
    """A (B, T) float tensor with entries in [-bound, bound]."""
    row = st.lists(st.floats(-bound, bound, width=32), min_size=T, max_size=T)
    return torch.tensor(draw(st.lists(row, min_size=B, max_size=B)))


def _right_padded(draw, B, T):
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])


@st.composite
def _gae_case(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 7))
    r, v = _matrix(draw, B, T, 3), _matrix(draw, B, T, 3)
    gamma, lam = draw(st.floats(0.5, 1.0)), draw(st.floats(0.0, 1.0))
    return r, v, _right_padded(draw, B, T), gamma, lam


@settings(deadline=None, derandomize=True, max_examples=200)
@given(_gae_case())
def test_gae_equals_the_discounted_sum_of_td_errors_on_any_padded_batch(case):
    # A_t = Σ_l (γλ)^l δ_{t+l} over the real tokens, δ_t = r_t + γ V_{t+1} − V_t, V_L = 0;
    # whatever sits on padding (rewards, values) must not leak in.
    r, v, m, gamma, lam = case
    adv, ret = gae(r, v, m, gamma, lam)
    for b in range(r.shape[0]):
        L = int(m[b].sum())
        V = v[b, :L].tolist() + [0.0]
        delta = [r[b, t].item() + gamma * V[t + 1] - V[t] for t in range(L)]
        want = [sum((gamma * lam) ** (u - t) * delta[u] for u in range(t, L)) for t in range(L)]
        assert adv[b, :L].tolist() == pytest.approx(want, abs=1e-4)
        assert ret[b, :L].tolist() == pytest.approx([a + V[t] for t, a in enumerate(want)],
                                                    abs=1e-4)
        assert (adv[b, L:] == 0).all() and (ret[b, L:] == 0).all()


@st.composite
def _ranking_batch(draw):
    B, K = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    k = draw(st.lists(st.integers(2, K), min_size=B, max_size=B))
    # Levels best first, non-decreasing along the ranking, ties allowed, at least two levels.
    groups = []
    for n in k:
        steps = draw(st.lists(st.integers(0, 1), min_size=n - 1, max_size=n - 1).filter(any))
        levels = [0]
        for s in steps:
            levels.append(levels[-1] + s)
        groups.append(levels + [0] * (K - n))
    return _matrix(draw, B, K, 4), torch.tensor(k), torch.tensor(groups)


@settings(deadline=None, derandomize=True, max_examples=200)
@given(_ranking_batch())
def test_kwise_loss_is_the_mean_over_prompts_of_the_mean_over_their_strict_pairs(batch):
    scores, k, groups = batch
    per_prompt = []
    for b in range(len(k)):
        n = int(k[b])
        pairs = [(i, j) for i in range(n) for j in range(n) if groups[b, i] < groups[b, j]]
        per_prompt.append(-sum(logsig(scores[b, i].item() - scores[b, j].item())
                               for i, j in pairs) / len(pairs))
    want = sum(per_prompt) / len(per_prompt)
    assert kwise_ranking_loss(scores, k, groups).item() == pytest.approx(want, abs=1e-4)


@settings(deadline=None, derandomize=True, max_examples=200)
@given(st.integers(1, 4), st.integers(2, 7), st.data())
def test_whiten_standardises_the_real_tokens_whatever_their_scale_and_shift(B, T, data):
    m = _right_padded(data.draw, B, T)
    x = _matrix(data.draw, B, T, 5)
    real = m.bool()
    # Real tokens spread enough to standardise (eps is 1e-8 of variance).
    assume(real.sum() >= 2 and x[real].var(unbiased=False) > 1e-3)
    a, c = data.draw(st.floats(0.1, 10)), data.draw(st.floats(-10, 10))
    w = whiten(x, m)
    assert w[real].mean().item() == pytest.approx(0.0, abs=1e-4)
    assert w[real].var(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert (w[~real] == 0).all()
    assert torch.allclose(whiten(a * x + c, m), w, atol=1e-3)


@settings(deadline=None, derandomize=True, max_examples=200)
@given(st.integers(1, 12), st.data())
def test_clipped_policy_loss_pushes_only_tokens_whose_ratio_is_not_past_the_clip(n, data):
    # d loss / d log π_t = −A_t ρ_t / N where the unclipped term is the pessimistic one, and 0
    # where the clip binds: ρ > 1+ε with A > 0, or ρ < 1−ε with A < 0.
    ratios = data.draw(st.lists(st.floats(0.3, 2.0), min_size=n, max_size=n))
    adv = torch.tensor(data.draw(st.lists(st.floats(-2, 2).filter(lambda a: abs(a) > 1e-3),
                                          min_size=n, max_size=n)))
    # Keep clear of the clip's edges, where the gradient jumps.
    assume(all(abs(r - 0.8) > 1e-3 and abs(r - 1.2) > 1e-3 for r in ratios))
    logp = torch.tensor(ratios).log().unsqueeze(0).requires_grad_()
    loss, stats = clipped_policy_loss(logp, torch.zeros(1, n), adv[None], torch.ones(1, n), 0.2)
    loss.backward()
    rho = torch.tensor(ratios)
    bound = ((rho > 1.2) & (adv > 0)) | ((rho < 0.8) & (adv < 0))
    want = torch.where(bound, torch.zeros(n), -adv * rho / n)
    assert torch.allclose(logp.grad[0], want, atol=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(bound.float().mean().item())


def test_masked_mean_averages_real_tokens_only_and_an_empty_mask_gives_zero():
    x = torch.tensor([[1.0, 3.0, 50.0], [4.0, 70.0, 80.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx((1 + 3 + 4) / 3)
    # Per row: (1 + 3) / 2 and 4 / 1; a row with no real token is 0, not 0 / 0.
    rows = masked_mean(x, torch.tensor([[1, 1, 0], [0, 0, 0]]), dim=1)
    assert rows.tolist() == pytest.approx([2.0, 0.0])
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([2.0, 4.0])
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0
    # So a batch that is all padding whitens to zeros, not NaN.
    assert whiten(x, torch.zeros(2, 3)).tolist() == [[0.0] * 3] * 2


@settings(deadline=None, derandomize=True, max_examples=200)
@given(st.integers(1, 4), st.integers(1, 7), st.booleans(), st.data())
def test_last_real_index_is_the_last_real_token_under_left_or_right_padding(B, T, left, data):
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    rows = [[0] * (T - n) + [1] * n if left else [1] * n + [0] * (T - n) for n in lengths]
    want = [T - 1 if left else n - 1 for n in lengths]
    assert last_real_index(torch.tensor(rows)).tolist() == want
    assert last_real_index(torch.tensor(rows, dtype=torch.bool)).tolist() == want


@settings(deadline=None, derandomize=True, max_examples=200)
@given(st.integers(1, 4), st.integers(2, 7), st.data())
def test_what_padding_holds_changes_no_masked_statistic(B, T, data):
    # Any 0/1 mask (gaps too) and any finite values on its padding: the real tokens decide.
    m = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 1), min_size=T, max_size=T),
                                        min_size=B, max_size=B)), dtype=torch.float32)
    x = _matrix(data.draw, B, T, 5)
    junk = torch.where(m.bool(), x, _matrix(data.draw, B, T, 1e6))
    assert torch.equal(masked_mean(junk, m), masked_mean(x, m))
    assert torch.equal(masked_mean(junk, m, dim=1), masked_mean(x, m, dim=1))
    assert torch.equal(whiten(junk, m), whiten(x, m))


def test_clipped_value_loss_gradient_flows_through_the_value_wherever_the_clip_does_not_hold():
    # ½ mean max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²), V_old = 0, ε = 0.2, N = 3:
    # token 0: V = 0.1 inside the clip, both terms (0.1 − 1)²: d/dV = (V − R) / N = −0.3;
    # token 1: V = 1.5 overshoots R = 1, the clipped term (0.2 − 1)² = 0.64 > 0.25 holds it: 0;
    # token 2: V = −1, R = 1: unclipped 4 > clipped (−0.2 − 1)² = 1.44: d/dV = (−1 − 1) / 3.
    values = torch.tensor([[0.1, 1.5, -1.0]], requires_grad=True)
    ret = torch.tensor([[1.0, 1.0, 1.0]])
    loss, frac = clipped_value_loss(values, torch.zeros(1, 3), ret, torch.ones(1, 3), clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 4.0) / 3, abs=1e-6)
    assert values.grad[0].tolist() == pytest.approx([-0.9 / 3, 0.0, -2.0 / 3], abs=1e-6)
    assert frac.item() == pytest.approx(1 / 3)


def test_clipped_losses_average_over_the_real_tokens_of_a_padded_batch():
    # The three tokens of test_clipped_policy_loss_by_hand as two right-padded rows, padding
    # holding a ratio of 3 and an advantage of 5 (in PPO, whitening leaves 0 there): the same
    # loss, −(1.2 + 0.5 − 2.2) / 3, not a sum over 3 tokens divided by the 4 of the batch.
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.1, 3.0]]))
    adv = torch.tensor([[1.0, 1.0], [-2.0, 5.0]])
    loss, stats = clipped_policy_loss(logp, torch.zeros(2, 2), adv, m, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    assert stats["approx_kl"].item() == pytest.approx(kl, abs=1e-6)
    # The value loss likewise: (V, R) = (1, 1) held by the clip at 0.2: 0.64; (0.1, 1): 0.81;
    # (−1, 1): unclipped 4 > 1.44; the padding's (9, −4) counts nowhere.
    values = torch.tensor([[1.0, 0.1], [-1.0, 9.0]])
    ret = torch.tensor([[1.0, 1.0], [1.0, -4.0]])
    loss, frac = clipped_value_loss(values, torch.zeros(2, 2), ret, m, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 4.0) / 3, abs=1e-6)
    assert frac.item() == pytest.approx(1 / 3)


def test_token_logprobs_by_hand():
    from gptlab.train.rl_math import token_logprobs
    # Position 0: probabilities 1/4, 3/4, ~0 over 3 tokens; position 1: uniform. Token ids
    # 1 and 2 (the vocabulary's last): log 3/4 and log 1/3.
    logits = torch.tensor([[[0.0, math.log(3.0), -50.0], [2.0, 2.0, 2.0]]])
    got = token_logprobs(logits, torch.tensor([[1, 2]]))
    assert got.shape == (1, 2)
    assert got[0].tolist() == pytest.approx([math.log(0.75), math.log(1 / 3)], abs=1e-6)


def test_log_probabilities_and_entropy_of_bfloat16_logits_are_computed_in_float32():
    # bfloat16's own log-softmax is off by ~1e-2. response_logprobs hands these functions
    # float32 logits today; they do not count on it.
    from gptlab.train.rl_math import entropy_from_logits, token_logprobs
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, 50) * 3).bfloat16()
    exact = logits.double().log_softmax(-1)
    tokens = torch.tensor([[0, 7, 49], [3, 3, 20]])
    got = token_logprobs(logits, tokens)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), exact.gather(-1, tokens[..., None])[..., 0], atol=1e-5)
    h = entropy_from_logits(logits)
    assert h.dtype == torch.float32
    assert torch.allclose(h.double(), -(exact.exp() * exact).sum(-1), atol=1e-5)
