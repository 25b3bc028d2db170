"""The engine's decoding against transformers': the distribution a token is sampled from equals
what its Temperature, TopK and TopP warpers give (but where the README says the two part), the
draws follow it, and greedy generate gives the same tokens on an exported model."""
from __future__ import annotations

import pytest
import torch

from gptlab.engine import SamplingParams, generate, sampling_probs
from gptlab.interop import export_hf
from gptlab.model.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)


def hf_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The warpers generate(do_sample=True) builds for these settings, in its order."""
    warpers = LogitsProcessorList()
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(params.temperature)))
    if params.top_k is not None:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    no_ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    return warpers(no_ids, logits.clone()).softmax(-1)


def random_logits(g: torch.Generator, case: int) -> torch.Tensor:
    """(4, V) logits: V from 1 to 39 (often fewer than top_k), some rounded to whole numbers
    (ties), some with -inf entries (a token the model rules out)."""
    V = int(torch.randint(1, 40, (1,), generator=g))
    logits = torch.randn(4, V, generator=g) * float(torch.rand(1, generator=g) * 5)
    if case % 3 == 0:
        logits = logits.round()
    if case % 5 == 0 and V > 1:
        logits[torch.rand(4, V, generator=g) < 0.3] = float("-inf")
        logits[:, 0] = logits[:, 0].clamp(min=0)  # one finite token per row
    return logits


TEMPERATURES = [1.0, 0.5, 2.0, 1e-3, 100.0, 0.05]
TOP_KS = [None, 1, 3, 50, 10]
TOP_PS = [None, 1.0, 0.9, 1e-6, 0.5, 0.3]


def test_the_sampled_distribution_is_transformers_but_for_ties_at_the_nucleus_edge():
    """On 2,400 random rows, the probabilities equal the warpers' wherever transformers' sort
    decides nothing. Where it does — tokens tied with the last one the nucleus keeps — the
    warpers keep those the sort put first, and gptlab keeps them all, each with its own
    softmax share of what is kept."""
    g = torch.Generator().manual_seed(0)
    same = tied = 0
    for case in range(600):
        logits = random_logits(g, case)
        params = SamplingParams(temperature=TEMPERATURES[case % 6], top_k=TOP_KS[case % 5],
                                top_p=TOP_PS[case % 6] if case % 7 else None)
        ours, theirs = sampling_probs(logits, params), hf_probs(logits, params)
        for row in range(logits.shape[0]):
            if torch.allclose(ours[row], theirs[row], rtol=1e-5, atol=1e-7):
                same += 1
                continue
            scaled = logits[row] / params.temperature
            kept_theirs = theirs[row] > 0
            edge = scaled[kept_theirs].min()
            kept = kept_theirs | (scaled == edge)
            assert params.top_p is not None and bool((kept == (ours[row] > 0)).all())
            expected = scaled.masked_fill(~kept, float("-inf")).softmax(-1)
            assert torch.allclose(ours[row], expected, rtol=1e-5, atol=1e-7)
            tied += 1
    assert same + tied == 2400 and same > 2000 and tied > 50  # both kinds were met


def test_ties_at_the_top_k_edge_are_kept_by_both():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    params = SamplingParams(top_k=2)
    ours = sampling_probs(logits, params)
    assert torch.allclose(ours, hf_probs(logits, params))
    assert (ours[0] > 0).tolist() == [True, False, True, True, True, False]


@pytest.mark.parametrize("top_k, top_p", [(1, None), (None, 1e-9), (1, 1e-9)])
def test_a_filter_that_keeps_one_token_keeps_the_top_one_as_transformers_does(top_k, top_p):
    # transformers' min_tokens_to_keep is 1 when sampling: the top token stays however small
    # top_p is; gptlab's filters keep it too.
    logits = torch.tensor([[0.5, 2.5, -1.0, 2.0]])
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    assert sampling_probs(logits, params).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert hf_probs(logits, params).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_a_top_k_past_the_vocabulary_and_a_top_p_of_1_filter_nothing():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.7, top_k=100, top_p=1.0)
    assert torch.allclose(sampling_probs(logits, params), (logits / 1.7).softmax(-1))
    assert torch.allclose(sampling_probs(logits, params), hf_probs(logits, params))


def test_a_temperature_that_overflows_the_division_is_greedy_where_the_warper_gives_nan():
    # 2 / 1e-39 is inf in float32: the warpers' scores (inf, -inf) softmax to NaN; gptlab's
    # scale_logits reads the row as greedy, tied top tokens sharing the draw.
    logits = torch.tensor([[2.0, -1.0, 2.0, 0.5]])
    probs = sampling_probs(logits, SamplingParams(temperature=1e-39, top_p=0.9))
    assert probs.tolist() == [[0.5, 0.0, 0.5, 0.0]]


def test_sampled_first_tokens_follow_the_distribution():
    """Chi-square of 40,000 first tokens drawn by `generate` (one prompt, 40,000 rows sharing
    its prefill) against sampling_probs of the model's logits: each draw is one row's."""
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=61, context=16, n_layers=1, n_heads=2, d_model=16)).eval()
    prompt, n = [3, 14, 15], 40_000
    for params in [SamplingParams(max_new_tokens=1, temperature=4.0),
                   SamplingParams(max_new_tokens=1, temperature=4.0, top_k=12, top_p=0.8)]:
        with torch.no_grad():
            probs = sampling_probs(net(torch.tensor([prompt]))[:, -1].float(), params)[0]
        drawn = generate(net, [prompt] * n, params, seed=5).tokens
        counts = torch.bincount(torch.tensor([t[0] for t in drawn]), minlength=61).double()
        expected = probs.double() * n
        assert counts[probs == 0].sum() == 0  # nothing outside what the filters keep
        big = expected >= 5  # the rest pooled into one bin
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        obs, exp = obs[exp > 0], exp[exp > 0]
        chi2 = float(((obs - exp) ** 2 / exp).sum())
        dof = len(obs) - 1
        assert 5 <= dof <= 60
        # The 1e-6 tail of chi-square with 60 degrees of freedom is about 130; with fewer,
        # lower. A sampler off by a few percent on one token gives thousands here.
        assert chi2 < dof + 10 * dof ** 0.5 + 30, (chi2, dof)


def _random_model(**fields) -> GPT:
    net = GPT(GPTConfig(vocab_size=61, context=32, n_layers=2, n_heads=4, d_model=32, **fields))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every weight random, large enough that greedy paths vary
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            gain = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if gain else 0.3 * noise)
    return net.eval()


@pytest.mark.parametrize("fields", [
    dict(),  # GPT-2
    dict(positions="rotary", norm="rmsnorm", activation="swiglu", bias=False, n_kv_heads=2),
    # GPT-Neo: a band of 4 tokens on odd layers, QKᵀ unscaled, left-padded rows past the band
    dict(qkv_bias=False, attention_scale=1.0, attention_window=4, local_attention_layers="odd"),
])
def test_batched_greedy_with_a_stop_id_equals_transformers_generate(fields, tmp_path):
    net = _random_model(**fields)
    export_hf(net, None, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = [[5, 17, 42, 3, 9, 1, 60], [7], list(range(10, 30)), [33, 2]]
    n, pad = 12, 0
    free = generate(net, prompts, SamplingParams(greedy=True, max_new_tokens=n)).tokens
    # A stop token some row reaches mid-generation and some other row never draws.
    stop = next(tok for row in free for tok in row[2:] if any(tok not in r for r in free))
    ours = generate(net, prompts, SamplingParams(greedy=True, max_new_tokens=n,
                                                 stop_ids=(stop,)), pad_id=pad)
    assert 0 < sum(ours.finished) < len(prompts)  # some rows stop early, some run to n

    P = max(map(len, prompts))
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = theirs.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          eos_token_id=stop, pad_token_id=pad)[:, P:].tolist()
    assert ours.tokens == [row[:len(t)] for row, t in zip(out, ours.tokens)]
    for row, t, done in zip(out, ours.tokens, ours.finished):
        # transformers pads a finished row to the batch's length; an unfinished row ran to n.
        assert row[len(t):] == [pad] * (len(row) - len(t)) and (done or len(t) == n)
