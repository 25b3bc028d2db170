"""PPO's rollout layout: a prompt prefix shared by the batch, encoded once, gives the same
log-probabilities, values, scores and gradients as the plain left-padded layout."""
import random

import pytest
import torch

from gptlab.model.attention import MIN_SHARED_PREFIX, common_prefix_length
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.model.heads import ScalarHeadModel
from gptlab.train.ppo import (Rollout, layout, prefix_cache, response_logprobs,
                              response_values)


def batch(seed=0):
    rng = random.Random(seed)
    shared = [rng.randrange(1, 60) for _ in range(24)]
    prompts = [shared + [rng.randrange(1, 60) for _ in range(rng.randrange(1, 7))]
               for _ in range(5)]
    responses = [[rng.randrange(1, 60) for _ in range(rng.randrange(1, 9))] for _ in range(5)]
    return prompts, responses


def rollout(prompts, responses, shared):
    ids, mask, rmask, P, prefix = layout(prompts, responses, 0, "cpu", shared=shared)
    return Rollout(ids, mask, rmask, P, [], responses, torch.ones(len(prompts), dtype=torch.bool),
                   prefix)


def test_common_prefix_length():
    assert common_prefix_length([[1] * 20 + [2], [1] * 20 + [3, 4]]) == 20
    assert common_prefix_length([[1] * 20, [1] * 30]) == 19  # each keeps a token of its own
    assert common_prefix_length([[1] * 10 + [2], [1] * 10 + [3]]) == 0 < MIN_SHARED_PREFIX


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_shared_prefix_layout_equals_the_plain_one(positions):
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=64, context=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_model=32, positions=positions))
    value = ScalarHeadModel.from_gpt(policy)
    prompts, responses = batch()
    n = common_prefix_length(prompts)
    assert n >= 24
    got = []
    for shared in (n, 0):
        ro = rollout(prompts, responses, shared)
        assert (ro.prefix is None) == (shared == 0)
        policy.zero_grad()
        lp, ent = response_logprobs(policy, ro, temperature=1.5, with_entropy=True)
        m = ro.response_mask.bool()
        lp[m].sum().backward()
        cache = prefix_cache(value.backbone, ro.prefix, len(ro.ids))
        scores = value(ro.ids, ro.attention_mask, cache)
        got.append((lp[m], ent[m], response_values(value, ro)[m], scores,
                    [p.grad.clone() for p in policy.parameters()]))
    (a, b) = got
    for x, y in zip(a[:4], b[:4]):
        assert torch.allclose(x, y, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a[4], b[4]))
    # A minibatch keeps the prefix.
    ro = rollout(prompts, responses, n)
    mb = ro.rows(torch.tensor([3, 1]))
    assert mb.prefix is ro.prefix and torch.equal(mb.ids, ro.ids[[3, 1]])

