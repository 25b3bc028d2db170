"""The generation engine: equal to naive decoding, padding-invariant, seeded, stops correctly."""
import dataclasses

import pytest
import torch

from gptlab.engine import (SamplingParams, filter_logits, fine_generator, generate,
                           sample_from, scale_logits)
from gptlab.errors import UserError
from gptlab.model import GPT, GPTConfig


def model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=61, context=48, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                    positions="rotary", norm="rmsnorm", activation="swiglu", bias=False, **kw)
    net = GPT(cfg).eval()
    with torch.no_grad():  # sharper logits so greedy paths are not ties
        net.lm_head.weight.mul_(8)
    return net


def naive_greedy(net, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(net(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_batched_greedy_equals_naive_decoding_per_prompt():
    net = model()
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    out = generate(net, prompts, SamplingParams(max_new_tokens=12, greedy=True))
    for p, toks in zip(prompts, out.tokens):
        assert toks == naive_greedy(net, p, 12)


def test_logprobs_are_those_of_the_chosen_tokens():
    net = model()
    prompt = [3, 4, 5]
    out = generate(net, [prompt], SamplingParams(max_new_tokens=6, temperature=0.7), seed=1)
    ids = prompt + out.tokens[0]
    with torch.no_grad():
        logp = (net(torch.tensor([ids]))[0] / 0.7).log_softmax(-1)
    expected = [logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(out.tokens[0])]
    assert max(abs(a - b) for a, b in zip(expected, out.logprobs[0])) < 1e-4


@pytest.mark.parametrize("top_k, top_p", [(3, None), (None, 0.5), (4, 0.7)])
def test_logprobs_are_taken_before_top_k_and_top_p_truncation(top_k, top_p):
    """Generation.logprobs: log softmax(logits / temperature) of the chosen token over the whole
    vocabulary, not renormalised over the tokens the filters keep (a PPO update recomputes
    them from logits / temperature alone)."""
    net = model()
    prompts = [[3, 4, 5], [6, 7]]
    params = SamplingParams(max_new_tokens=6, temperature=2.0, top_k=top_k, top_p=top_p)
    out = generate(net, prompts, params, seed=2)
    for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
        with torch.no_grad():
            logits = net(torch.tensor([p + toks]))[0, len(p) - 1:-1] / 2.0
        kept = torch.isfinite(filter_logits(logits, top_k, top_p))
        assert all(kept[t, tok] for t, tok in enumerate(toks))  # drawn from the kept tokens
        full = logits.log_softmax(-1)
        expected = [full[t, tok].item() for t, tok in enumerate(toks)]
        assert max(abs(a - b) for a, b in zip(expected, lps)) < 1e-4
        # the mass the filters dropped is visible: below the renormalised log-probabilities
        truncated = logits.masked_fill(~kept, float("-inf")).log_softmax(-1)
        assert max(truncated[t, tok].item() - lp
                   for t, (tok, lp) in enumerate(zip(toks, lps))) > 1e-2


def test_repeated_prompts_share_one_prefill_and_sample_independently():
    """K copies of a prompt are encoded once; each copy still samples its own continuation,
    and every logprob is that of a full forward pass over the finished sequence."""
    net = model()
    prompts = [[3, 4, 5], [6, 7], [3, 4, 5], [3, 4, 5]]
    greedy = generate(net, prompts, SamplingParams(max_new_tokens=8, greedy=True))
    assert (greedy.tokens[0] == greedy.tokens[2] == greedy.tokens[3]
            == naive_greedy(net, [3, 4, 5], 8))
    assert greedy.tokens[1] == naive_greedy(net, [6, 7], 8)
    out = generate(net, prompts, SamplingParams(max_new_tokens=8, temperature=2.0), seed=3)
    assert len({tuple(out.tokens[i]) for i in (0, 2, 3)}) > 1
    for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
        with torch.no_grad():
            logp = (net(torch.tensor([p + toks]))[0] / 2.0).log_softmax(-1)
        expected = [logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(toks)]
        assert max(abs(a - b) for a, b in zip(expected, lps)) < 1e-4


def test_sample_from_draws_the_distribution_and_never_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_from(probs, gen, fine_generator(gen)), minlength=5).float()
    counts /= 20000
    assert counts[1] == 0 and counts[4] == 0
    assert (counts - probs[0]).abs().max() < 0.015  # 3 standard errors at n = 20000


def seeded_uniform(seed: int) -> float:
    """The uniform `sample_from` inverts first with a generator seeded `seed`: the float32 draw
    (a multiple of 2^-24) refined by the fine generator's float64 draw below 2^-24."""
    coarse = torch.rand(1, generator=torch.Generator().manual_seed(seed))
    fine = torch.rand(1, generator=fine_generator(torch.Generator().manual_seed(seed)),
                      dtype=torch.float64)
    return float(coarse) + float(fine) * 2**-24


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_token_of_probability_1e_9_among_50000_is_drawn_where_its_mass_lies(seed):
    """The CDF is summed in float64: in float32, a token of mass 1e-9 after a running total of
    ~0.5 adds less than half a step (3e-8) and gets no interval, so it could never be drawn."""
    V, j, tiny, after = 50_000, 25_000, 1e-9, 1e-5
    u = seeded_uniform(seed)
    probs = torch.zeros(1, V)
    probs[0, j] = tiny
    probs[0, j + 1:] = after
    tiny64, after64 = float(probs[0, j]), float(probs[0, j + 1:].double().sum())
    # The mass before token j that puts the middle of its interval at u times the total.
    before = (u * (tiny64 + after64) - tiny64 / 2) / (1 - u)
    probs[0, :j - 1] = (before - 1e-4) / (j - 1)
    probs[0, j - 1] = before - float(probs[0, :j - 1].double().sum())  # the last 1e-4, exactly
    gen = torch.Generator().manual_seed(seed)
    assert sample_from(probs, gen, fine_generator(gen)).tolist() == [j]


def test_sample_from_draws_what_the_float32_sampler_drew_on_ordinary_distributions():
    """Seeded samples stay those recorded before the CDF went float64: the coarse uniform is
    the same float32 draw, and only a draw within ~1e-7 of a token's boundary could move."""
    torch.manual_seed(0)
    probs = (torch.randn(20000, 300) * 3).softmax(-1)
    gen, before = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    cdf = probs.cumsum(-1)
    u = torch.rand((20000, 1), generator=before)
    float32_draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    assert torch.equal(sample_from(probs, gen, fine_generator(gen)), float32_draws)


def test_a_tiny_temperature_samples_as_greedy_with_finite_logprobs():
    """logits / 1e-39 overflows to ±inf and softmax to NaN; the overflowing row is scaled after
    subtracting its top logit, so it samples its argmax (with log-probability 0)."""
    net = model()
    prompts = [[3, 4, 5], [6, 7]]
    greedy = generate(net, prompts, SamplingParams(max_new_tokens=8, greedy=True))
    for extra in (dict(), dict(top_k=5), dict(top_p=0.9)):
        for t in (5e-324, 1e-300, 1e-39, 1e-30, 1e-6):  # 1e-300 is 0 in float32
            out = generate(net, prompts, SamplingParams(max_new_tokens=8, temperature=t, **extra),
                           seed=3)
            assert out.tokens == greedy.tokens
            assert all(lp == 0.0 for row in out.logprobs for lp in row)


def test_scale_logits_is_plain_division_unless_it_overflows():
    logits = torch.tensor([[2.0, 1.0, -3.5, 0.25], [1e-3, 5.0, 5.0, -2.0]])
    for t in (1.0, 1.5, 0.7, 1e-3):
        assert torch.equal(scale_logits(logits, t), logits / t)  # bit for bit
    for t in (1e-39, 1e-300):  # both rows overflow
        scaled = scale_logits(logits, t)
        assert scaled[0].tolist() == [0.0] + [float("-inf")] * 3
        assert scaled[1].tolist() == [float("-inf"), 0.0, 0.0, float("-inf")]  # a tie stays one
        assert scaled.softmax(-1).tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]]
    mixed = scale_logits(torch.tensor([[1e-30, 0.0], [1e30, 0.0]]), 1e-10)  # only row 1 overflows
    assert mixed[0].tolist() == [float(torch.tensor(1e-30) / 1e-10), 0.0]
    assert mixed[1].tolist() == [0.0, float("-inf")]


def test_seeded_sampling_is_deterministic_and_seed_dependent():
    net = model()
    params = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=20)
    a = generate(net, [[3, 4], [5]], params, seed=7).tokens
    b = generate(net, [[3, 4], [5]], params, seed=7).tokens
    c = generate(net, [[3, 4], [5]], params, seed=8).tokens
    assert a == b and a != c


def test_default_sampling_draws_what_it_drew_before_sampling_probs_was_factored_out():
    """Tokens drawn with seed 3 before the filtering moved into `sampling_probs`: temperature
    only (the pipeline's sampling), and with top-k and top-p."""
    net = model()
    prompts = [[5, 17, 42, 3], [7], [11, 12, 13, 14, 15, 16]]
    plain = generate(net, prompts, SamplingParams(max_new_tokens=12), seed=3).tokens
    assert plain == [[0, 0, 41, 45, 20, 20, 37, 28, 15, 15, 15, 12],
                     [7, 7, 7, 7, 7, 7, 28, 54, 54, 38, 38, 6],
                     [16, 9, 9, 31, 11, 48, 48, 3, 3, 3, 3, 3]]
    filtered = generate(net, prompts, SamplingParams(max_new_tokens=12, temperature=1.3,
                                                     top_k=5, top_p=0.9), seed=3).tokens
    assert filtered == [[3, 3, 3, 11, 11, 11, 11, 11, 11, 11, 11, 3],
                        [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
                        [16, 16, 16, 31, 11, 31, 31, 3, 3, 3, 3, 3]]


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=6, greedy=True),
                                    SamplingParams(max_new_tokens=6, top_k=5, top_p=0.9)])
def test_nan_logits_are_refused_naming_the_prompt_and_the_new_token(params):
    """A NaN logit was drawn from silently: greedy took the NaN token, sampling the last one,
    and the log-probabilities were NaN."""
    net = model(tie_embeddings=False)
    with torch.no_grad():
        net.tok_emb.weight[45] = float("nan")  # any position at or after a 45 gives NaN
    with pytest.raises(UserError) as e:
        generate(net, [[3, 4], [5, 45, 6]], params)
    assert e.value.field == "model"
    assert e.value.message.startswith("gave NaN logits for prompt 1 at new token 1: ")


def test_nan_logits_after_a_row_stopped_are_not_its_own():
    """Row 0 draws 45 first, then NaN logits; with 45 a stop token, its generation ends before
    them (the row stays in the batch of five, decoded on, and its NaN is no one's)."""
    net = model(tie_embeddings=False)
    prompts = [[3, 4, 5], [20, 21], [30], [40, 41, 42], [50, 51]]
    free = generate(net, prompts, SamplingParams(max_new_tokens=6, greedy=True)).tokens
    assert free[0][0] == 45 and all(45 not in row for row in free[1:])
    with torch.no_grad():
        net.tok_emb.weight[45] = float("nan")
    with pytest.raises(UserError, match="for prompt 0 at new token 2: "):
        generate(net, prompts, SamplingParams(max_new_tokens=6, greedy=True))
    out = generate(net, prompts, SamplingParams(max_new_tokens=6, greedy=True, stop_ids=(45,)))
    assert out.tokens == [[45]] + free[1:]


def test_nan_logits_streamed_are_refused_at_their_step_before_their_tokens_are_handed_on():
    """With `on_tokens` the tokens drawn from NaN logits were handed on (a chat printed them),
    the error raised only once the generation ended. The step's one read refuses them: the
    steps before are handed on, not that one, and the error is the one without `on_tokens`."""
    net = model(tie_embeddings=False)
    prompts = [[3, 4, 5], [20, 21], [30], [40, 41, 42], [50, 51]]
    free = generate(net, prompts, SamplingParams(max_new_tokens=6, greedy=True)).tokens
    with torch.no_grad():
        net.tok_emb.weight[45] = float("nan")  # row 0 draws 45 first: NaN at its new token 2
    handed: list[tuple[list[int], list[int]]] = []
    with pytest.raises(UserError) as streamed:
        generate(net, prompts, SamplingParams(max_new_tokens=6, greedy=True),
                 on_tokens=lambda rows, tokens: handed.append((rows, tokens)))
    assert handed == [([0, 1, 2, 3, 4], [row[0] for row in free])]
    with pytest.raises(UserError) as plain:
        generate(net, prompts, SamplingParams(max_new_tokens=6, greedy=True))
    assert str(streamed.value) == str(plain.value) and \
        "for prompt 0 at new token 2: " in str(plain.value)
    # A row that stopped draws on from NaN logits as no one's: still handed on, and returned.
    handed.clear()
    params = SamplingParams(max_new_tokens=6, greedy=True, stop_ids=(45,))
    out = generate(net, prompts, params, on_tokens=lambda rows, tokens: handed.append(
        (rows, tokens)))
    assert out.tokens == [[45]] + free[1:] and handed[1][0] == [1, 2, 3, 4]


def test_stop_tokens_end_each_row_separately():
    net = model()
    free = generate(net, [[3, 4, 5], [20, 21]], SamplingParams(max_new_tokens=10, greedy=True))
    stop = free.tokens[0][2]  # make row 0's third token a stop token
    out = generate(net, [[3, 4, 5], [20, 21]],
                   SamplingParams(max_new_tokens=10, greedy=True, stop_ids=(stop,)))
    assert out.tokens[0] == free.tokens[0][:free.tokens[0].index(stop) + 1]
    assert out.finished[0]
    assert len(out.logprobs[0]) == len(out.tokens[0])


def test_a_finished_row_still_in_the_batch_stays_finished():
    """One row of five stops: four live rows of five do not compact the batch, so the finished
    row is still decoded and draws its stop token again; its generation ends at the first."""
    net = model()
    prompts = [[3, 4, 5], [20, 21], [30], [40, 41, 42], [50, 51]]
    free = generate(net, prompts, SamplingParams(max_new_tokens=10, greedy=True))
    stop = free.tokens[0][0]
    assert free.tokens[0].count(stop) > 1 and all(stop not in toks for toks in free.tokens[1:])
    out = generate(net, prompts, SamplingParams(max_new_tokens=10, greedy=True, stop_ids=(stop,)))
    assert out.tokens[0] == [stop] and len(out.logprobs[0]) == 1
    assert out.finished == [True, False, False, False, False]
    assert out.tokens[1:] == free.tokens[1:]


@pytest.mark.parametrize("layers", ["odd", "all"])
def test_local_layers_decode_left_padded_rows_as_a_full_forward_of_each_alone(layers):
    """GPT-3's banded layers (window 4 here): each cached step masks the keys older than the
    window in every row, padded or not, whose log-probabilities are those of a full forward."""
    net = model(attention_window=4, local_attention_layers=layers)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    out = generate(net, prompts, SamplingParams(max_new_tokens=12, greedy=True))
    dense = model()
    for p, toks, logprobs in zip(prompts, out.tokens, out.logprobs):
        assert toks == naive_greedy(net, p, 12)
        with torch.no_grad():
            logp = net(torch.tensor([p + toks]))[0].log_softmax(-1)
            other = dense(torch.tensor([p + toks]))[0].log_softmax(-1)
        steps = range(len(p) - 1, len(p) - 1 + len(toks))
        assert max(abs(logp[t, tok].item() - lp) for t, tok, lp in zip(steps, toks, logprobs)) \
            <= 1e-5
        assert (logp[4:] - other[4:]).abs().max() > 1e-2  # the band changed the logits


def caches_made(net: GPT, monkeypatch) -> list:
    """The KV caches `generate` makes for `net`, as it makes them."""
    made, new_cache = [], net.new_cache
    monkeypatch.setattr(net, "new_cache", lambda *a, **kw: made.append(new_cache(*a, **kw))
                        or made[-1])
    return made


def test_local_layers_generate_past_the_window_from_a_cache_of_the_window_alone(monkeypatch):
    """generate's cache keeps a local layer's latest 4 positions alone (a ring), the dense
    layer's all: prompts longer than the window beside a shorter one (left padding), two
    continuations of each (cache rows copied), rows ended by a stop token (the batch
    compacts), 4 windows of new tokens; each row decodes as its prompt alone, greedy or
    sampled, with a full forward's log-probabilities."""
    net = model(attention_window=4, local_attention_layers="odd")
    made = caches_made(net, monkeypatch)
    prompts = [p for p in ([3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [10, 11], [12, 13, 14, 15, 16, 17])
               for _ in range(2)]
    free = generate(net, prompts, SamplingParams(max_new_tokens=16, greedy=True))
    stop = free.tokens[2][3]
    greedy = SamplingParams(max_new_tokens=16, greedy=True, stop_ids=(stop,))
    sampled = SamplingParams(max_new_tokens=16, temperature=1.3, stop_ids=(stop,))
    for params, seed in ((greedy, None), (sampled, 5)):
        out = generate(net, prompts, params, seed=seed)
        for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
            if params.greedy:
                alone = naive_greedy(net, p, 16)
                assert toks == alone[:alone.index(stop) + 1 if stop in alone else 16]
            with torch.no_grad():
                logits = net(torch.tensor([p + toks]))[0, len(p) - 1:-1]
            logp = (logits / (1.0 if params.greedy else 1.3)).log_softmax(-1)
            assert max(abs(logp[t, tok].item() - lp) for t, (tok, lp)
                       in enumerate(zip(toks, lps))) <= 1e-5
        assert 16 in map(len, out.tokens) and min(map(len, out.tokens)) < 16, out.tokens
    assert out.tokens[0] != out.tokens[1] or out.tokens[4] != out.tokens[5]  # K draws differ
    for cache in made:  # (layers, rows, kv heads, positions, head dim): layer 1's, layer 0's
        assert (cache.wk.shape[0], *cache.wk.shape[2:]) == (1, 2, 4, 8)
        assert (cache.k.shape[0], *cache.k.shape[2:]) == (1, 2, 10 + 16, 8)


def test_rows_left_after_a_batch_compacts_decode_as_each_prompt_alone():
    """One row of four stops: three live rows of four compact the batch (the cache rows, the
    masks and the last tokens move together); every row still decodes as its prompt alone."""
    net = model()
    prompts = [[3, 4, 5], [20, 21], [30], [40, 41, 42]]
    free = generate(net, prompts, SamplingParams(max_new_tokens=10, greedy=True))
    stop = free.tokens[0][1]
    params = SamplingParams(max_new_tokens=10, greedy=True, stop_ids=(stop,))
    out = generate(net, prompts, params)
    alone = [generate(net, [p], params) for p in prompts]
    first = len(out.tokens[0])
    assert first <= 2 and sum(len(t) > first + 1 for t in out.tokens[1:]) >= 2, out.tokens
    assert out.tokens == [a.tokens[0] for a in alone]
    assert out.finished == [a.finished[0] for a in alone]
    for got, a in zip(out.logprobs, alone):
        assert got == pytest.approx(a.logprobs[0], abs=1e-4)



@pytest.mark.parametrize("params, seed", [
    (SamplingParams(max_new_tokens=12, greedy=True), None),
    (SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.9), 7),
])
def test_tokens_streamed_as_drawn_are_each_rows_and_change_nothing(params, seed):
    """`on_tokens` gets each step's tokens of the rows still going: put together per row they
    are the generation's tokens, a stop token last, none of a stopped row still in the batch
    and none past a row's limit at the context; the generation is bit for bit the one made
    without it, greedy and sampled (the same draws)."""
    net = model()
    prompts = [[3, 4, 5], [20, 21], [30], [40, 41, 42], [1 + i % 50 for i in range(40)]]
    free = generate(net, prompts, params, seed=seed)
    stop = free.tokens[0][1]
    params = SamplingParams(**{**params.__dict__, "stop_ids": (stop,)})
    plain = generate(net, prompts, params, seed=seed)
    streamed: list[list[int]] = [[] for _ in prompts]
    steps: list[list[int]] = []

    def on_tokens(rows: list[int], tokens: list[int]) -> None:
        steps.append(list(rows))
        for r, t in zip(rows, tokens):
            streamed[r].append(t)
    got = generate(net, prompts, params, seed=seed, on_tokens=on_tokens)
    assert got == plain
    assert streamed == plain.tokens
    assert plain.finished[0] and len(plain.tokens[0]) <= 2 and len(plain.tokens[4]) == 8
    # the stopped row, and the long row at its limit, go off the steps' rows
    assert steps[0] == [0, 1, 2, 3, 4] and 0 not in steps[2] and 4 not in steps[8]
    assert len(steps) == max(map(len, plain.tokens))

def test_generation_leaves_a_model_in_eval_mode_in_eval_mode_and_builds_no_graph():
    net = model(dropout=0.1).eval()
    grads = []
    net.register_forward_hook(lambda module, args, output: grads.append(output.requires_grad))
    with torch.enable_grad():
        generate(net, [[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=4), seed=0)
    assert not net.training  # not put in training mode (dropout on) for whoever scores next
    assert len(grads) == 4 and not any(grads)  # no autograd graph kept across the steps


def test_generation_stops_at_the_context():
    net = model()
    out = generate(net, [[1] * 40], SamplingParams(max_new_tokens=100, greedy=True))
    assert len(out.tokens[0]) == 8 and not out.finished[0]


def test_a_prompt_that_cannot_be_continued_is_named_by_its_index():
    net = model()  # context 48
    params = SamplingParams(max_new_tokens=4, greedy=True)
    with pytest.raises(ValueError, match="prompt 1 has 0 tokens: every prompt needs at least one"):
        generate(net, [[1, 2], [], [3]], params)
    with pytest.raises(ValueError, match="prompt 2 has 48 tokens: .* room after it in the "
                                         "context of 48"):
        generate(net, [[1], [2], [3] * 48], params)
    with pytest.raises(ValueError, match="no prompts"):
        generate(net, [], params)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    k2 = filter_logits(logits, 2, None)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = logits.softmax(-1)[0]  # ≈ [0.61, 0.22, 0.14, 0.03]
    nucleus = filter_logits(logits, None, float(p[0] + p[1]) - 1e-3)
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, None, 0.01)[0, 0])  # the top token always stays
    # top-k of 1 keeps the most likely token alone.
    k1 = filter_logits(logits, 1, None)
    assert torch.isfinite(k1[0, 0]) and torch.isinf(k1[0, 1:]).all()


def test_the_nucleus_stops_at_the_token_whose_mass_reaches_top_p():
    # Distinct logits; top_p set to exactly the mass before the third token (in float32, as the
    # filter computes it): the first two reach it, so the third is not needed; a top_p one
    # float32 step above it needs the third.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = logits.softmax(-1)
    before = (p.cumsum(-1) - p)[0, 2]
    above = torch.nextafter(before, torch.tensor(1.0))
    assert int(torch.isfinite(filter_logits(logits, None, before.item())).sum()) == 2
    assert int(torch.isfinite(filter_logits(logits, None, above.item())).sum()) == 3


def test_the_nucleus_keeps_every_token_tied_with_its_last_one_as_top_k_does():
    """Which of equal tokens the nucleus kept depended on the sort's order: of 20 equal logits
    top_p=0.5 kept 10 the sort put first, and tied top tokens under a tiny temperature stopped
    sharing the draw."""
    equal = torch.zeros(1, 20)
    assert torch.isfinite(filter_logits(equal, None, 0.5)).all()
    assert torch.isfinite(filter_logits(equal, 3, None)).all()
    tied_top = scale_logits(torch.tensor([[3.0, 3.0, 1.0]]), 1e-39)  # [0, 0, -inf]
    assert filter_logits(tied_top, None, 0.4).softmax(-1).tolist() == [[0.5, 0.5, 0.0]]
    boundary = torch.tensor([[2.0, 1.0, 1.0, -1.0]])  # p ≈ [0.55, 0.20, 0.20, 0.03]
    kept = torch.isfinite(filter_logits(boundary, None, 0.6))[0].tolist()
    assert kept == [True, True, True, False]


@pytest.mark.parametrize("fields, field, message", [
    (dict(max_new_tokens=-1), "max_new_tokens", "must be an integer of at least 1, got -1"),
    (dict(max_new_tokens=0), "max_new_tokens", "must be an integer of at least 1, got 0"),
    (dict(temperature=float("nan")), "temperature", "must be a finite number, got nan"),
    (dict(temperature=float("inf"), greedy=True), "temperature",
     "must be a finite number, got inf"),
    (dict(temperature=0.0), "temperature",
     "must be > 0, got 0.0 (greedy decoding is --greedy, greedy=True in Python)"),
    (dict(temperature=-1.0), "temperature",
     "must be > 0, got -1.0 (greedy decoding is --greedy, greedy=True in Python)"),
    (dict(top_k=-3), "top_k",
     "must be an integer of at least 1, got -3 (no top-k filter is no --top-k, top_k=None "
     "in Python)"),
    (dict(top_k=0), "top_k",
     "must be an integer of at least 1, got 0 (no top-k filter is no --top-k, top_k=None "
     "in Python)"),
    (dict(top_p=1.5), "top_p", "must be in (0, 1], got 1.5"),
    (dict(top_p=-0.2), "top_p", "must be in (0, 1], got -0.2"),
    (dict(top_p=0.0), "top_p", "must be in (0, 1], got 0.0"),
    (dict(top_p=float("nan")), "top_p", "must be in (0, 1], got nan"),
])
def test_sampling_params_refuse_values_that_cannot_sample(fields, field, message):
    with pytest.raises(UserError) as e:
        SamplingParams(**fields)
    assert (e.value.field, e.value.message) == (field, message)


def test_sampling_params_accept_the_edges():
    SamplingParams(max_new_tokens=1, temperature=1e-3, top_k=1, top_p=1.0)
    SamplingParams(greedy=True, temperature=0.0)  # the temperature is unused when greedy


def test_the_python_api_checks_sampling_settings_before_loading_the_model(tmp_path):
    from gptlab.api import generate_text
    with pytest.raises(UserError) as e:  # the model does not exist: it was never opened
        generate_text(tmp_path / "no-model", ["hi"], temperature=0.0)
    assert e.value.field == "temperature"


def test_max_new_tokens_beyond_the_context_is_named_as_the_fault():
    from gptlab.api import fit_prompt
    with pytest.raises(UserError) as e:
        fit_prompt([1, 2, 3], 32, 48, False)
    assert e.value.field == "max_new_tokens"
    assert e.value.message == ("max_new_tokens 48 leaves no room in the context of 32 for a "
                               "prompt of one token; lower it (--max-new-tokens) to at most 31")
    with pytest.raises(UserError) as e:  # the whole context: no room for any prompt either
        fit_prompt([1, 2, 3], 32, 32, False)
    assert e.value.field == "max_new_tokens" and "at most 31" in e.value.message
    # A prompt that begins with BOS keeps it: 31 left room for 1 token, which no prompt is,
    # and the advice to shorten the prompt could not be followed (nor could --truncate).
    for truncate in (False, True):
        with pytest.raises(UserError) as e:
            fit_prompt([0, 2, 3], 32, 31, truncate, bos_id=0)
        assert (e.value.field, e.value.message) == (
            "max_new_tokens", "max_new_tokens 31 leaves no room in the context of 32 for a "
                              "prompt of BOS and one token; lower it (--max-new-tokens) to at "
                              "most 30")
    assert fit_prompt([0, 2, 3], 32, 30, True, bos_id=0) == ([0, 3], 1)  # the bound is right
    assert fit_prompt([0, 2], 32, 30, False, bos_id=0) == ([0, 2], 0)
    with pytest.raises(UserError) as e:  # within the context, the prompt is what is too long
        fit_prompt([1] * 30, 32, 4, False)
    assert e.value.field == "prompt" and "leaves room for 28" in e.value.message


def test_the_python_api_refuses_a_tokenizer_too_big_for_the_model():
    # A (model, tokenizer) pair is not loaded from one directory, so nothing had checked that
    # the tokenizer's ids have embedding rows: the first one beyond them was a bare IndexError.
    from gptlab.api import generate_text
    from gptlab.tokenizer import train_tokenizer
    tok = train_tokenizer([" ".join(a + b + c for a in "qzxj" for b in "aeiou" for c in "vwkp")
                           * 20], vocab_size=300)
    model = GPT(GPTConfig(vocab_size=270, context=16, n_layers=1, n_heads=2, d_model=8)).eval()
    prompt = "qav zov"
    assert max(tok.encode(prompt)) >= 270
    with pytest.raises(UserError) as e:
        generate_text((model, tok), [prompt], max_new_tokens=2)
    assert e.value.field == "vocab_size"
    assert e.value.message == (f"tokenizer has {tok.vocab_size} tokens but the model's "
                               f"embedding has 270 rows")


def test_the_python_api_refuses_a_single_str_for_its_list_of_prompts(tmp_path):
    # A str is a sequence of letters: "SELECT" gave six continuations, one per letter.
    from gptlab.api import generate_text
    with pytest.raises(UserError) as e:  # refused before the model is opened
        generate_text(tmp_path / "no-model", "SELECT")
    assert str(e.value) == ("field 'prompts': must be a list of texts, got a single str; pass "
                            "[text] to continue one text")
    with pytest.raises(UserError, match="item 1 must be a str, got the int"):
        generate_text(tmp_path / "no-model", ["SELECT", 3])


def test_the_python_api_continues_no_prompts_into_no_continuations():
    # One continuation per prompt: an empty list was a ValueError saying that "every prompt
    # needs at least one token".
    from gptlab.api import generate_text
    from gptlab.tokenizer import train_tokenizer
    tok = train_tokenizer(["hello world " * 20], vocab_size=270)
    net = GPT(GPTConfig(vocab_size=270, context=16, n_layers=1, n_heads=2, d_model=8)).eval()
    assert generate_text((net, tok), [], max_new_tokens=2) == []
    assert len(generate_text((net, tok), ["hello"], max_new_tokens=2)) == 1


def test_the_python_api_example_names_models_a_demo_run_has():
    # It loaded "runs/demo/ppo"; `make demo` writes PPO's model to runs/demo/round-2/ppo.
    import re

    from gptlab import api
    from gptlab.train.pipeline import PipelineConfig, stage_dependencies
    stages = {path for path, _ in stage_dependencies(PipelineConfig().rounds)}
    named = re.findall(r'"runs/demo/([^"]+)"', api.__doc__)
    assert named and all(path in stages for path in named), named


def test_generation_gives_the_model_its_mode_back_even_when_it_raises(monkeypatch):
    net = model(dropout=0.1).train()
    generate(net, [[1, 2, 3]], SamplingParams(max_new_tokens=4), seed=0)
    assert net.training
    calls = []

    def interrupted(*args, **kwargs):  # a Ctrl-C in the chat stops an answer midway
        calls.append(net.training)
        raise KeyboardInterrupt

    monkeypatch.setattr(net, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(net, [[1, 2, 3]], SamplingParams(max_new_tokens=4), seed=0)
    assert calls == [False] and net.training  # dropout off inside, the training mode after


def test_sampling_responses_leaves_the_callers_settings_as_they_were():
    from gptlab.feedback import sample_responses

    class Tok:  # what sampling asks of a tokenizer
        stop_ids, pad_id, bos_id = {5, 7}, 0, None

        def encode(self, text, bos=False):
            return [1 + len(text) % 9, 2, 3]

        def decode_response(self, prompt, prompt_ids, ids, cut=False):
            return " ".join(map(str, ids))

    params = SamplingParams(max_new_tokens=3)
    rows = sample_responses(model(), Tok(), [{"prompt": "hi"}], 2, params, seed=0)
    assert len(rows[0]["responses"]) == 2 and params.stop_ids == ()


def test_sampling_more_responses_than_a_batch_holds_splits_them_over_batches(monkeypatch):
    """`gptlab sample --k 1000000` put one prompt's K copies in one batch: its KV cache alone
    was 50 GB, an allocator traceback. K past the batch size now runs in batches of at most
    that size, each seeded apart, the first as before; K within it is unchanged."""
    from gptlab import feedback

    class Tok:
        stop_ids, pad_id, bos_id = set(), 0, None

        def encode(self, text, bos=False):
            return [1 + len(text) % 9, 2, 3]

        def decode_response(self, prompt, prompt_ids, ids, cut=False):
            return " ".join(map(str, ids))

    sizes = []

    def counted(net, prompts, params, seed=None, pad_id=0):
        sizes.append(len(prompts))
        return generate(net, prompts, params, seed=seed, pad_id=pad_id)

    monkeypatch.setattr(feedback, "generate", counted)
    net, params = model(), SamplingParams(max_new_tokens=6)
    records = [{"prompt": "hi"}, {"prompt": "hello"}]
    rows = feedback.sample_responses(net, Tok(), records, 10, params, seed=3, batch_size=4)
    assert sizes == [4, 4, 2, 4, 4, 2]
    assert [len(r["responses"]) for r in rows] == [10, 10]
    for r in rows:  # no batch repeats another's draws
        pieces = r["responses"][:4], r["responses"][4:8], r["responses"][8:]
        assert pieces[0] != pieces[1] and pieces[0][:2] != pieces[2] != pieces[1][:2]
    sizes.clear()
    first = feedback.sample_responses(net, Tok(), records, 4, params, seed=3, batch_size=4)
    assert sizes == [4, 4]
    assert [r["responses"] for r in first] == [r["responses"][:4] for r in rows]


def test_sampling_shows_its_progress_on_a_terminal_only(monkeypatch):
    """`gptlab sample` over many prompts, or a large --k, ran silent for as long as it took."""
    import io
    import sys

    from gptlab import feedback

    class Tok:
        stop_ids, pad_id, bos_id = set(), 0, None

        def encode(self, text, bos=False):
            return [1, 2, 3]

        def decode_response(self, prompt, prompt_ids, ids, cut=False):
            return " ".join(map(str, ids))

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    params = SamplingParams(max_new_tokens=2)
    for stream, progress, shown in ((Terminal(), True, True), (io.StringIO(), True, False),
                                    (Terminal(), False, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        feedback.sample_responses(model(), Tok(), [{"prompt": "a"}] * 3, 5, params,
                                  batch_size=4, progress=progress)
        assert ("/15 [" in stream.getvalue() and "response/s" in stream.getvalue()) == shown
        assert shown or stream.getvalue() == ""


def test_greedy_logprobs_are_at_temperature_one_whatever_the_temperature_given():
    net = model()
    prompt = [3, 4, 5]
    plain = generate(net, [prompt], SamplingParams(max_new_tokens=5, greedy=True))
    for t in (0.3, 2.0, 0.0):  # greedy leaves the temperature unused (0 is allowed there)
        out = generate(net, [prompt], SamplingParams(max_new_tokens=5, greedy=True,
                                                     temperature=t))
        assert out.tokens == plain.tokens and out.logprobs == plain.logprobs
    ids = torch.tensor([prompt + plain.tokens[0]])
    with torch.no_grad():
        want = net(ids)[0, len(prompt) - 1:-1].log_softmax(-1)
    want = want.gather(-1, ids[0, len(prompt):, None])[:, 0]
    assert plain.logprobs[0] == pytest.approx(want.tolist(), abs=1e-5)


def model_with(positions: str) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=61, context=48, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                    positions=positions, norm="rmsnorm", activation="swiglu", bias=False)
    net = GPT(cfg).eval()
    with torch.no_grad():
        net.lm_head.weight.mul_(8)
    return net


LONG, MIDDLE, SHORT = [1 + i * 7 % 60 for i in range(40)], [2 + i % 50 for i in range(30)], \
    [3, 4, 5, 6, 7]


@pytest.mark.parametrize("positions", ["learned", "rotary", "sinusoidal"])
def test_each_row_of_a_batch_near_the_context_gets_what_it_gets_alone(positions):
    """A short prompt beside a long one got context - (longest prompt) new tokens: with a
    context of 48 and 20 new tokens asked, prompts of 40 and 5 tokens both got 8. Each row now
    gets min(20, 48 - its own length): 8, 18 and 20, the tokens it gets alone, and a row that
    filled the context is not finished (no stop token ended it)."""
    net = model_with(positions)
    prompts = [LONG, SHORT, MIDDLE]
    params = SamplingParams(max_new_tokens=20, greedy=True)
    out = generate(net, prompts, params)
    assert [len(t) for t in out.tokens] == [8, 20, 18]
    assert out.finished == [False, False, False]
    for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
        alone = generate(net, [p], params)
        assert toks == alone.tokens[0] == naive_greedy(net, p, len(toks))
        assert lps == pytest.approx(alone.logprobs[0], abs=1e-4)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_row_that_stopped_leaves_the_batch_when_it_reaches_its_limit(positions):
    """The long row draws a stop token first and stays in the batch (four live rows of five do
    not compact it); at its own limit it must leave, finished, before its position passes the
    context (a learned position table has no row 48). A row cut at its limit is not finished."""
    net = model_with(positions)
    prompts = [LONG, SHORT, [20, 21], [30], MIDDLE]
    free = generate(net, prompts, SamplingParams(max_new_tokens=20, greedy=True))
    stop = free.tokens[0][0]
    assert all(stop not in toks for toks in free.tokens[1:])
    out = generate(net, prompts, SamplingParams(max_new_tokens=20, greedy=True, stop_ids=(stop,)))
    assert out.tokens[0] == [stop] and out.finished == [True, False, False, False, False]
    assert out.tokens[1:] == free.tokens[1:]
    assert [len(t) for t in out.tokens[1:]] == [20, 20, 20, 18]


def test_a_sampled_batch_near_the_context_has_each_rows_logprobs_and_is_seeded():
    net = model_with("learned")
    prompts = [LONG, SHORT, LONG, MIDDLE]
    params = SamplingParams(max_new_tokens=20, temperature=1.5)
    out = generate(net, prompts, params, seed=4)
    assert [len(t) for t in out.tokens] == [8, 20, 8, 18] and not any(out.finished)
    assert generate(net, prompts, params, seed=4).tokens == out.tokens
    for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
        with torch.no_grad():
            logp = (net(torch.tensor([p + toks]))[0] / 1.5).log_softmax(-1)
        expected = [logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(toks)]
        assert lps == pytest.approx(expected, abs=1e-4)


# --- properties, on random batches ---------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NETS = {}


def _net(positions: str) -> GPT:
    if positions not in _NETS:
        _NETS[positions] = model_with(positions)
    return _NETS[positions]


@st.composite
def _greedy_batch(draw):
    """Prompts of 1 to 47 tokens (context 48), some repeated, and settings that make rows stop
    on their own: a few stop ids, a max_new_tokens that some rows' context cuts."""
    lengths = draw(st.lists(st.sampled_from([1, 2, 5, 17, 30, 40, 44, 47]), min_size=1,
                            max_size=5))
    prompts = [draw(st.lists(st.integers(0, 60), min_size=n, max_size=n)) for n in lengths]
    if len(prompts) > 1 and draw(st.booleans()):
        prompts[-1] = list(prompts[0])  # a repeated prompt shares its prefill
    stops = tuple(draw(st.lists(st.integers(0, 60), max_size=3)))
    return (draw(st.sampled_from(["learned", "rotary", "sinusoidal"])), prompts,
            draw(st.integers(1, 12)), stops, draw(st.sampled_from([0, 5])))


@settings(deadline=None, derandomize=True, max_examples=100)
@given(_greedy_batch())
def test_any_greedy_batch_gives_each_row_what_it_gets_alone(case):
    positions, prompts, max_new, stops, pad_id = case
    net = _net(positions)
    params = SamplingParams(max_new_tokens=max_new, greedy=True, stop_ids=stops)
    out = generate(net, prompts, params, pad_id=pad_id)
    assert out.prompt_lengths == [len(p) for p in prompts]
    for p, toks, lps, fin in zip(prompts, out.tokens, out.logprobs, out.finished):
        alone = generate(net, [p], params)
        assert toks == alone.tokens[0] and fin == alone.finished[0]
        assert lps == pytest.approx(alone.logprobs[0], abs=1e-4)
        # Stops at its first stop token, else at min(max_new_tokens, context - its length).
        free = naive_greedy(net, p, min(max_new, 48 - len(p)))
        first_stop = next((t + 1 for t, tok in enumerate(free) if tok in stops), None)
        assert toks == free[:first_stop]
        assert fin == (first_stop is not None) and len(lps) == len(toks)


@settings(deadline=None, derandomize=True, max_examples=60)
@given(_greedy_batch(), st.integers(0, 2**32))
def test_any_sampled_batch_is_seeded_and_logs_each_rows_own_logprobs(case, seed):
    positions, prompts, max_new, stops, pad_id = case
    net = _net(positions)
    params = SamplingParams(max_new_tokens=max_new, temperature=1.3, top_k=7, stop_ids=stops)
    out = generate(net, prompts, params, seed=seed, pad_id=pad_id)
    assert generate(net, prompts, params, seed=seed, pad_id=pad_id).tokens == out.tokens
    for p, toks, lps, fin in zip(prompts, out.tokens, out.logprobs, out.finished):
        limit = min(max_new, 48 - len(p))
        hits = [t for t, tok in enumerate(toks) if tok in stops]
        assert hits == ([len(toks) - 1] if fin else [])  # ends at its first stop token only
        assert fin or len(toks) == limit
        with torch.no_grad():
            logits = net(torch.tensor([p + toks]))[0, len(p) - 1:-1] / 1.3
        # Every token drawn from the top 7 of its row's own logits, logprob before the filter.
        assert all(int(logits[t].topk(7).indices.eq(tok).sum()) for t, tok in enumerate(toks))
        want = logits.log_softmax(-1).gather(-1, torch.tensor(toks)[:, None])[:, 0]
        assert lps == pytest.approx(want.tolist(), abs=1e-4)


def test_left_pad_leaves_an_empty_prompt_all_padding():
    from gptlab.engine import left_pad
    ids, mask = left_pad([[5, 6, 7], [], [8]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 1], [1, 1, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 1]]


def test_sampling_params_refuse_a_change_after_their_check():
    params = SamplingParams(max_new_tokens=4, temperature=0.8, top_k=5)
    for name, value in [("temperature", 0), ("max_new_tokens", 0), ("greedy", True),
                        ("top_k", 0), ("top_p", 2.0), ("stop_ids", (1,))]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(params, name, value)
    assert params == SamplingParams(max_new_tokens=4, temperature=0.8, top_k=5)
    # A changed copy is checked as a new one is.
    with pytest.raises(UserError, match="field 'temperature': must be > 0, got 0"):
        dataclasses.replace(params, temperature=0)
    assert dataclasses.replace(params, temperature=0.5).temperature == 0.5
    # Stop ids given as a list are kept as a tuple: no list the caller could change later.
    stops = [3, 1]
    frozen = SamplingParams(stop_ids=stops)
    stops.append(9)
    assert frozen.stop_ids == (3, 1) and hash(frozen) == hash(SamplingParams(stop_ids=(3, 1)))


def test_sampling_params_forced_to_no_new_tokens_give_empty_rows():
    # SamplingParams refuses max_new_tokens 0, and a change after its check; forced past both
    # (object.__setattr__), the decoding loop runs no step: each row is empty and unfinished,
    # its prompt's length kept.
    params = SamplingParams(max_new_tokens=4, greedy=True)
    object.__setattr__(params, "max_new_tokens", 0)
    g = generate(model(), [[1, 2, 3], [4]], params)
    assert (g.tokens, g.logprobs, g.finished, g.prompt_lengths) == (
        [[], []], [[], []], [False, False], [3, 1])
