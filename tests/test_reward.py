"""The reward model's batches, loss and accuracy with tied responses."""
import math

import pytest
import torch
from torch import nn

from gptlab.data.instruct import Ranking
from gptlab.train.reward import (EncodedRanking, collate_rankings, encode_ranking,
                                 pairwise_accuracy, reward_loss)


class FirstTokenScore(nn.Module):
    """Scores a sequence by its first token id: a reward model whose opinions we choose."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask):
        return self.scale * input_ids[:, 0].float()


class CharTokenizer:
    bos_id, eos_id = None, 0

    def encode(self, text, bos=False):
        return [ord(c) for c in text]


def test_groups_travel_from_the_ranking_into_a_padded_batch():
    r = Ranking("p", ["a", "b", "c"], groups=[0, 1, 1])
    e = encode_ranking(CharTokenizer(), r, context=16)
    assert e.seqs == [[112, 97, 0], [112, 98, 0], [112, 99, 0]] and e.groups == [0, 1, 1]
    assert Ranking("p", ["a", "b"]).groups == [0, 1]  # old call sites: one level each
    batch = collate_rankings([e, EncodedRanking([[1], [2]])], pad_id=0)
    assert batch["k"].tolist() == [3, 2]
    assert batch["groups"].tolist() == [[0, 1, 1], [0, 1, 0]]


def test_a_tied_pair_is_neither_trained_on_nor_counted_by_accuracy():
    # Best first: [5], then [1] and [9] tied. The model prefers 9 > 5 > 1.
    tied = collate_rankings([EncodedRanking([[5], [1], [9]], groups=[0, 1, 1])], pad_id=0)
    strict = collate_rankings([EncodedRanking([[5], [1], [9]])], pad_id=0)
    model = FirstTokenScore()
    # Pairs 5>1 (right) and 5>9 (wrong); the tied 1, 9 is no pair.
    assert pairwise_accuracy(model, [tied]) == pytest.approx(1 / 2)
    assert pairwise_accuracy(model, [strict]) == pytest.approx(1 / 3)  # 1 > 9 counts, wrong

    def logsig(x):
        return -math.log1p(math.exp(-x))
    assert reward_loss(model, tied).item() == pytest.approx(-(logsig(4) + logsig(-4)) / 2,
                                                           abs=1e-5)


def test_shared_prompt_scoring_equals_scoring_each_sequence_whole():
    """A prompt encoded once for its K responses gives the scores and gradients of K whole
    sequences (prompts of different lengths: left padding on the prompt side)."""
    from gptlab.model import GPT, GPTConfig
    from gptlab.model.heads import ScalarHeadModel
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=40, context=32, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                    positions="rotary", norm="rmsnorm", activation="swiglu", bias=False)
    model = ScalarHeadModel.from_gpt(GPT(cfg))
    items = [EncodedRanking([[3, 4, 5, 6, 7], [3, 4, 5, 9], [3, 4, 5, 11, 12, 13]], prompt_len=3),
             EncodedRanking([[8, 9, 10, 11, 12, 2, 2], [8, 9, 10, 11, 12, 1]], groups=[0, 0],
                            prompt_len=5)]
    shared = collate_rankings(items, pad_id=0)
    assert shared["rows"].tolist() == [0, 0, 0, 1, 1]
    assert shared["prompt_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    whole = {k: shared[k] for k in ("input_ids", "attention_mask", "k", "groups")}
    from gptlab.train.reward import ranked_scores
    a, b = ranked_scores(model, shared), ranked_scores(model, whole)
    assert (a - b).abs().max().item() < 1e-5
    reward_loss(model, shared).backward()
    ga = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reward_loss(model, whole).backward()
    for g, p in zip(ga, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)
