"""The language-model head runs only where a loss or a log-probability needs it: SFT's loss on
the labelled positions, PPO's log-probabilities on the response. Same numbers and gradients as
the head over every position; a prompt costs no vocabulary-wide logits."""
import random

import pytest
import torch
import torch.nn.functional as F

from gptlab.data.instruct import Example
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.train.batching import pad_examples
from gptlab.train.ppo import Rollout, layout, response_logprobs
from gptlab.train.sft import shared_prefix, sft_loss
from gptlab.engine import scale_logits


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, context=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_model=32, positions="rotary"))


def head_rows(model):
    """Record how many positions each call of the head computes logits for."""
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.shape[:-1].numel()))
    return rows


def full_logits_loss(model, ids, labels):
    logits = model(ids)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def grads_of(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("masked", [0.0, 0.7])
def test_lm_loss_equals_the_head_over_every_position(masked):
    model = tiny()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 20), generator=g)
    labels = torch.randint(0, 64, (3, 20), generator=g)
    labels[torch.rand(3, 20, generator=g) < masked] = -100
    rows = head_rows(model)
    a, ga = grads_of(model, lambda: model(ids, labels=labels))
    assert rows == [int((labels != -100).sum())]
    b, gb = grads_of(model, lambda: full_logits_loss(model, ids, labels))
    assert a == pytest.approx(b, abs=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


def test_lm_loss_with_no_label_is_nan_as_cross_entropy_is():
    model = tiny()
    ids = torch.randint(0, 64, (2, 5))
    assert torch.isnan(model(ids, labels=torch.full((2, 5), -100)))


@pytest.mark.parametrize("prefix_len", [0, 20])
def test_sft_loss_runs_the_head_on_the_completion_only(prefix_len):
    model = tiny()
    rng = random.Random(prefix_len)
    prefix = [rng.randrange(1, 60) for _ in range(prefix_len)]
    rows = []
    for _ in range(4):
        prompt = prefix + [rng.randrange(1, 60) for _ in range(rng.randrange(2, 6))]
        completion = [rng.randrange(1, 60) for _ in range(rng.randrange(2, 8))]
        rows.append(Example(prompt + completion, [0] * len(prompt) + [1] * len(completion)))
    batch = pad_examples(rows, pad_id=0)
    assert (shared_prefix(batch) >= 20) == (prefix_len == 20)
    calls = head_rows(model)
    a, ga = grads_of(model, lambda: sft_loss(model, batch))
    assert calls == [int((batch["labels"] != -100).sum())]
    b, gb = grads_of(model, lambda: full_logits_loss(model, batch["input_ids"], batch["labels"]))
    assert a == pytest.approx(b, abs=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


def test_response_logprobs_run_the_head_on_the_response_only():
    model = tiny()
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 60) for _ in range(rng.randrange(3, 12))] for _ in range(4)]
    responses = [[rng.randrange(1, 60) for _ in range(rng.randrange(1, 9))] for _ in range(4)]
    ids, mask, rmask, P, prefix = layout(prompts, responses, 0, "cpu")
    ro = Rollout(ids, mask, rmask, P, [], responses, torch.ones(4, dtype=torch.bool), prefix)
    calls = head_rows(model)
    lp, ent = response_logprobs(model, ro, temperature=0.7, with_entropy=True)
    R = ids.shape[1] - P
    assert calls == [4 * R]
    logits = scale_logits(model(ids, attention_mask=mask)[:, P - 1:-1].float(), 0.7)
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None])[..., 0]
    m = rmask.bool()
    assert torch.allclose(lp[m], want[m], atol=1e-5)
    p = torch.softmax(logits, -1)
    assert torch.allclose(ent[m], -(p * torch.log_softmax(logits, -1)).sum(-1)[m], atol=1e-5)
