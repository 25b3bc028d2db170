"""SFT's loss with a shared prompt prefix encoded once equals the plain forward, gradients too."""
import math
import random

import pytest
import torch

from gptlab.data.instruct import Example
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.train.batching import pad_examples
from gptlab.train.sft import MIN_SHARED_PREFIX, shared_prefix, sft_loss


def examples(prefix_len: int, seed: int = 0) -> list[Example]:
    """Rows = a common prefix, a prompt tail of their own, then a completion with loss."""
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 60) for _ in range(prefix_len)]
    out = []
    for _ in range(5):
        tail = [rng.randrange(1, 60) for _ in range(rng.randrange(1, 6))]
        completion = [rng.randrange(1, 60) for _ in range(rng.randrange(2, 9))]
        ids = prefix + tail + completion
        out.append(Example(ids, [0] * (len(prefix) + len(tail)) + [1] * len(completion)))
    return out


def plain_loss(model, batch):
    return model(batch["input_ids"], labels=batch["labels"])


@pytest.mark.parametrize("positions,kv", [("learned", None), ("rotary", 2)])
def test_shared_prefix_loss_and_gradients_equal_the_plain_forward(positions, kv):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context=64, n_layers=2, n_heads=4, n_kv_heads=kv,
                          d_model=32, positions=positions))
    batch = pad_examples(examples(20), pad_id=0)
    assert shared_prefix(batch) >= 20
    grads = []
    for fn in (sft_loss, plain_loss):
        model.zero_grad()
        loss = fn(model, batch)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = grads
    assert a == pytest.approx(b, abs=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))


def test_shared_prefix_stops_at_the_first_target_and_the_shortest_row():
    batch = pad_examples(examples(30), pad_id=0)
    n = shared_prefix(batch)
    assert (batch["labels"][:, :n] == -100).all()
    # A target inside the common tokens ends the prefix there.
    batch["labels"][2, 9] = 5
    assert shared_prefix(batch) == 9
    # No common tokens: nothing shared, and sft_loss takes the plain path.
    rows = [Example([1, 2, 3], [0, 1, 1]), Example([4, 2, 3], [0, 1, 1])]
    assert shared_prefix(pad_examples(rows, pad_id=0)) == 0 < MIN_SHARED_PREFIX


@pytest.mark.parametrize("rows", [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0], [1, 0, 2, 0]])
def test_take_rows_equals_indexing_values_and_gradients(rows):
    from gptlab.model.attention import row_runs, take_rows
    rows = torch.tensor(rows)
    t = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(len(rows), 2, 4, 5, generator=torch.Generator().manual_seed(1))
    got = take_rows(t, rows, row_runs(rows, 3))
    (g1,) = torch.autograd.grad((got * w).sum(), t)
    want = t[rows]
    (g2,) = torch.autograd.grad((want * w).sum(), t)
    assert torch.equal(got, want) and torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize("rows, runs", [([0, 0, 0, 1, 1, 2], [3, 2, 1]), ([0, 0, 0, 0], [4, 0, 0]),
                                        ([1, 1, 2], [0, 2, 1]), ([1, 0, 2, 0], None),
                                        ([0, 3], None), ([-1, 0], None)])
def test_row_runs_counts_sorted_runs_and_refuses_the_rest(rows, runs):
    from gptlab.model.attention import row_runs
    assert row_runs(torch.tensor(rows), 3) == runs


def test_expanding_a_prefix_reads_the_rows_once_for_all_layers(monkeypatch):
    # Each read of `rows` waits for a GPU: once a layer made a 30-layer SFT step wait 60 times.
    from gptlab.model import attention
    seen = []
    real = attention.row_runs
    monkeypatch.setattr(attention, "row_runs", lambda rows, n: seen.append(n) or real(rows, n))
    layers = 4
    prefix = attention.PrefixKV([torch.randn(1, 2, 5, 3) for _ in range(layers)],
                                [torch.randn(1, 2, 5, 3) for _ in range(layers)], 5)
    out = prefix.expand(torch.zeros(6, dtype=torch.long))
    assert seen == [1]
    assert len(out.k) == len(out.v) == layers and all(k.shape == (6, 2, 5, 3) for k in out.k)
    assert all(torch.equal(k, pk.expand(6, -1, -1, -1)) for k, pk in zip(out.k, prefix.k))


def test_labels_are_the_next_token_where_its_loss_mask_is_on():
    # Prompt 10 11 12, completion 20 21 (loss on 20, 21): labels[t] is ids[t + 1] where the
    # loss is taken on ids[t + 1], so the first target is the completion's first token.
    b = pad_examples([Example([10, 11, 12, 20, 21], [0, 0, 0, 1, 1]),
                      Example([10, 30, 31], [0, 1, 1])], pad_id=0)
    assert b["labels"].tolist() == [[-100, -100, 20, 21, -100], [30, 31, -100, -100, -100]]
    assert b["input_ids"].tolist() == [[10, 11, 12, 20, 21], [10, 30, 31, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_a_shared_prefix_is_leading_only_and_leaves_each_row_a_token_of_its_own():
    torch.manual_seed(0)
    common = list(range(1, 21))  # rows agree on these 20, but only after they differ at 1
    rows = [Example([7, 8] + common + [40, 41], [0] * 22 + [1, 1]),
            Example([7, 9] + common + [50, 51, 52], [0] * 22 + [1, 1, 1])]
    batch = pad_examples(rows, pad_id=0)
    assert shared_prefix(batch) == 1
    model = GPT(GPTConfig(vocab_size=64, context=64, n_layers=2, n_heads=4, d_model=32))
    assert sft_loss(model, batch).item() == pytest.approx(plain_loss(model, batch).item(),
                                                          abs=1e-5)
    # A row with no target of its own (labels all -100) still keeps its last token unshared.
    rows = [Example(common + [40, 41, 42], [0] * 21 + [1, 1]), Example(common, [0] * 20)]
    assert shared_prefix(pad_examples(rows, pad_id=0)) == 19


def test_a_long_shared_prefix_is_encoded_once():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context=64, n_layers=2, n_heads=4, d_model=32))
    batch = pad_examples(examples(20), pad_id=0)
    n = shared_prefix(batch)
    seen = []
    real = model.hidden_states

    def spy(ids, *args, **kwargs):
        seen.append(tuple(ids.shape))
        return real(ids, *args, **kwargs)

    model.hidden_states = spy
    sft_loss(model, batch)
    assert seen[0] == (1, n)  # the prefix, one row


def test_a_validation_set_holds_every_item_once_in_order():
    from gptlab.train.batching import fixed_list_batches
    assert fixed_list_batches(list(range(5)), 2, list) == [[0, 1], [2, 3], [4]]
    assert fixed_list_batches(list(range(4)), 2, list) == [[0, 1], [2, 3]]
    assert fixed_list_batches([7], 3, list) == [[7]]


def _grads(model, micro, **kw):
    from gptlab.train.loop import accumulate_gradients
    model.zero_grad()
    loss = accumulate_gradients(model, micro, sft_loss, **kw)
    return loss, [p.grad.clone() for p in model.parameters()]


def _float64_model_and_rows(targets):
    """A tiny float64 model, and a row for each count in `targets`: 3 prompt tokens, then that
    many answer tokens with a loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context=64, n_layers=2, n_heads=4, d_model=32)).double()
    rng = random.Random(1)
    return model, [Example([rng.randrange(1, 60) for _ in range(3 + c)], [0] * 3 + [1] * c)
                   for c in targets]


def test_accumulated_micro_batches_of_unequal_targets_weigh_as_one_batch():
    # Two rows with 2 target tokens, then two with 12: a mean of the two micro-batches' means
    # gave each token of the first 3x the weight it has in the batch of four.
    from gptlab.train.sft import target_tokens
    model, rows = _float64_model_and_rows((2, 2, 12, 12))
    whole, halves = pad_examples(rows, 0), [pad_examples(rows[:2], 0), pad_examples(rows[2:], 0)]
    assert [target_tokens(b) for b in halves] == [4, 24]
    loss, grads = _grads(model, [whole], weight_of=target_tokens)
    acc_loss, acc_grads = _grads(model, halves, weight_of=target_tokens)
    assert acc_loss == pytest.approx(loss, abs=1e-12)
    for a, b in zip(grads, acc_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Unweighted, the micro-batches' means are averaged: the gradients are another batch's.
    _, mean_of_means = _grads(model, halves)
    assert max(float((a - b).abs().max()) for a, b in zip(grads, mean_of_means)) > 1e-3


def test_the_validation_loss_is_the_mean_over_all_targets_not_a_mean_of_batch_means():
    # The same rows as above in two validation batches: unweighted, a token of the short batch
    # counted 3x; weighted, the loss is the one batch's, and a batch with no targets (its loss a
    # mean over nothing, nan) is passed over.
    from gptlab.train.loop import evaluate
    from gptlab.train.sft import target_tokens
    model, rows = _float64_model_and_rows((2, 2, 12, 12))
    whole, halves = pad_examples(rows, 0), [pad_examples(rows[:2], 0), pad_examples(rows[2:], 0)]
    none = pad_examples([Example(r.ids, [0] * len(r.ids)) for r in rows[:2]], 0)
    cpu = torch.device("cpu")
    want = evaluate(model, [whole], sft_loss, cpu)
    got = evaluate(model, [halves[0], none, halves[1]], sft_loss, cpu, weight_of=target_tokens)
    assert got == pytest.approx(want, abs=1e-6)  # sft_loss is float32
    assert abs(evaluate(model, halves, sft_loss, cpu) - want) > 1e-3
    assert math.isnan(evaluate(model, [none], sft_loss, cpu, weight_of=target_tokens))


def test_a_single_micro_batch_is_the_same_update_bit_for_bit_with_or_without_weights():
    # grad_accum = 1 (every stage of the demo pipeline): weighing changes nothing at all.
    from gptlab.train.sft import target_tokens
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context=64, n_layers=2, n_heads=4, d_model=32))
    batch = pad_examples(examples(4), pad_id=0)
    loss, grads = _grads(model, [batch])
    w_loss, w_grads = _grads(model, [batch], weight_of=target_tokens)
    assert w_loss == loss and all(torch.equal(a, b) for a, b in zip(grads, w_grads))


# --- property: the padded batch says, per row, what each position predicts ------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _examples(draw):
    out = []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 9))
        out.append(Example(draw(st.lists(st.integers(1, 50), min_size=n, max_size=n)),
                           draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))))
    return out


@settings(deadline=None, derandomize=True, max_examples=200)
@given(_examples())
def test_a_padded_batch_targets_the_next_token_exactly_where_its_loss_is_taken(rows):
    from gptlab.model.heads import last_real_index
    batch = pad_examples(rows, pad_id=0)
    T = max(len(e.ids) for e in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(rows), T)
    for i, e in enumerate(rows):
        n = len(e.ids)
        assert batch["input_ids"][i].tolist() == e.ids + [0] * (T - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        want = [e.ids[t + 1] if t + 1 < n and e.loss_mask[t + 1] else -100 for t in range(T)]
        assert batch["labels"][i].tolist() == want
    assert last_real_index(batch["attention_mask"]).tolist() == [len(e.ids) - 1 for e in rows]


def test_a_micro_batch_without_targets_adds_nothing_to_the_update_or_its_loss():
    # Weighted by its 0 target tokens it has no share; its loss, a mean over no tokens, is nan,
    # and nan * 0 made the logged loss nan (and a loss written as sum / count, its gradients).
    from gptlab.train.loop import accumulate_gradients
    from gptlab.train.sft import target_tokens
    model, rows = _float64_model_and_rows((2, 2, 5, 5))
    none = pad_examples([Example(r.ids, [0] * len(r.ids)) for r in rows[:2]], 0)
    some = pad_examples(rows[2:], 0)
    assert target_tokens(none) == 0
    loss, grads = _grads(model, [some], weight_of=target_tokens)
    acc_loss, acc_grads = _grads(model, [none, some], weight_of=target_tokens)
    assert acc_loss == pytest.approx(loss, abs=1e-12)
    for a, b in zip(grads, acc_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    def sum_over_count(model, batch):  # the same mean, written by hand: 0 / 0 where none
        keep = batch["labels"] != -100
        logits = model(batch["input_ids"])
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                ignore_index=-100, reduction="none")
        return nll.sum() / keep.sum()
    model.zero_grad()
    loss = accumulate_gradients(model, [none, some], sum_over_count, weight_of=target_tokens)
    assert math.isfinite(loss)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
