"""The numbers of the reward model and PPO against hand computations."""
import math

import pytest
import torch

from gptlab.model.heads import last_real_index
from gptlab.train.rl_math import (AdaptiveKLController, clipped_policy_loss, clipped_value_loss,
                                  gae, kl_per_token, kwise_ranking_loss, whiten)


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
    # per token: -min(ρA, clip(ρ)A): 1.5·1 -> clip 1.2 -> -1.2 ; 0.5·1 -> min(0.5, 0.8) = 0.5 -> -0.5 ;
    # 1.1·(-2) = -2.2 vs 1.1·(-2) (inside the clip) -> 2.2
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
