"""The arithmetic of InstructGPT's reward model and PPO, as small tested functions.

Every tensor here is (B, T) over response tokens with a 0/1 `mask` that marks real tokens
(responses are right-padded); masked means average over real tokens only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the real tokens of the whole batch; padding stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def preference_pairs(k: Tensor, K: int, groups: Tensor | None = None) -> Tensor:
    """(B, K, K) bool: pair (i, j) is True when response i is strictly preferred to j (both
    within the prompt's `k`; by position best first, or by `groups` level where ties are no
    pair)."""
    i = torch.arange(K, device=k.device)
    if groups is None:
        better_first = (i[:, None] < i[None, :])[None]
    else:
        better_first = groups[:, :, None] < groups[:, None, :]
    valid = (i[None, :, None] < k[:, None, None]) & (i[None, None, :] < k[:, None, None])
    return better_first & valid


def kwise_ranking_loss(scores: Tensor, k: Tensor, groups: Tensor | None = None) -> Tensor:
    """InstructGPT's reward-model loss for a batch of rankings.

    scores (B, Kmax): each row holds r(x, y_1) ... r(x, y_K) for responses ranked best first,
    padded past `k[b]`. groups (B, Kmax): each response's level (0 = best, equal = tied); None
    means every response is its own level. A pair (i, j) counts when y_i is strictly preferred
    (groups[i] < groups[j]). Per prompt: -1/|P| Σ_{(i,j)∈P} log σ(r_i - r_j), then the batch
    mean; without ties |P| = C(K,2). All pairs of a prompt stay in one batch element (the
    paper: separating them over-fits).
    """
    pairs = preference_pairs(k, scores.shape[1], groups)
    diff = scores[:, :, None] - scores[:, None, :]
    per_pair = -F.logsigmoid(diff.float())
    per_prompt = (per_pair * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
    return per_prompt.mean()


KL_ESTIMATORS = ("k1", "k3")


def kl_per_token(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π || π_ref) from tokens sampled from π.

    k1 = log π/π_ref (unbiased, can be negative); k3 = (π_ref/π − 1) − log(π_ref/π)
    (unbiased, never negative, lower variance).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}' (expected k1 or k3)")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses.

    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γ λ A_{t+1};  V after the last real token is 0.
    Returns (advantages, returns = A + V), both zero on padding.
    """
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        # On padding keep carrying zeros, so the last real token sees V_{T} = 0.
        adv[:, t] = a * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_adv = adv[:, t]
    return adv, (adv + values) * mask


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                        clip: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO: −E[min(ρ A, clip(ρ, 1−ε, 1+ε) A)], ρ = π/π_old. Also clip fraction, approx KL."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
    }
    return loss, stats


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip: float = 0.2) -> tuple[Tensor, Tensor]:
    """½ E[max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)] and the clip fraction."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).float(), mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) at each position (B, T)."""
    return entropy_from_logprobs(logits.float().log_softmax(-1))


def entropy_from_logprobs(logp: Tensor) -> Tensor:
    """Entropy −Σ p log p at each position (B, T) of log-probabilities (B, T, V)."""
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] at each position: logits (B,T,V), tokens (B,T) -> (B,T)."""
    return logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


class AdaptiveKLController:
    """Ziegler et al.: nudge β so that the observed KL tracks a target over `horizon` samples.

    β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) · n/horizon)
    """

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_samples / self.horizon
        return self.value
