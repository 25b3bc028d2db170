"""The generation engine: equal to naive decoding, padding-invariant, seeded, stops correctly."""
import pytest
import torch

from gptlab.engine import SamplingParams, filter_logits, generate, sample_from
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


def test_repeated_prompts_share_one_prefill_and_sample_independently():
    """K copies of a prompt are encoded once; each copy still samples its own continuation,
    and every logprob is that of a full forward pass over the finished sequence."""
    net = model()
    prompts = [[3, 4, 5], [6, 7], [3, 4, 5], [3, 4, 5]]
    greedy = generate(net, prompts, SamplingParams(max_new_tokens=8, greedy=True))
    assert greedy.tokens[0] == greedy.tokens[2] == greedy.tokens[3] == naive_greedy(net, [3, 4, 5], 8)
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
    counts = torch.bincount(sample_from(probs, gen), minlength=5).float() / 20000
    assert counts[1] == 0 and counts[4] == 0
    assert (counts - probs[0]).abs().max() < 0.015  # 3 standard errors at n = 20000


def test_seeded_sampling_is_deterministic_and_seed_dependent():
    net = model()
    params = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=20)
    a = generate(net, [[3, 4], [5]], params, seed=7).tokens
    b = generate(net, [[3, 4], [5]], params, seed=7).tokens
    c = generate(net, [[3, 4], [5]], params, seed=8).tokens
    assert a == b and a != c


def test_stop_tokens_end_each_row_separately():
    net = model()
    free = generate(net, [[3, 4, 5], [20, 21]], SamplingParams(max_new_tokens=10, greedy=True))
    stop = free.tokens[0][2]  # make row 0's third token a stop token
    out = generate(net, [[3, 4, 5], [20, 21]],
                   SamplingParams(max_new_tokens=10, greedy=True, stop_ids=(stop,)))
    assert out.tokens[0] == free.tokens[0][:free.tokens[0].index(stop) + 1]
    assert out.finished[0]
    assert len(out.logprobs[0]) == len(out.tokens[0])


def test_generation_stops_at_the_context():
    net = model()
    out = generate(net, [[1] * 40], SamplingParams(max_new_tokens=100, greedy=True))
    assert len(out.tokens[0]) == 8 and not out.finished[0]


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    k2 = filter_logits(logits, 2, None)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = logits.softmax(-1)[0]  # ≈ [0.61, 0.22, 0.14, 0.03]
    nucleus = filter_logits(logits, None, float(p[0] + p[1]) - 1e-3)
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, None, 0.01)[0, 0])  # the top token always stays


@pytest.mark.parametrize("fields, field, message", [
    (dict(max_new_tokens=-1), "max_new_tokens", "must be an integer of at least 1, got -1"),
    (dict(max_new_tokens=0), "max_new_tokens", "must be an integer of at least 1, got 0"),
    (dict(temperature=float("nan")), "temperature", "must be a finite number, got nan"),
    (dict(temperature=float("inf"), greedy=True), "temperature",
     "must be a finite number, got inf"),
    (dict(temperature=0.0), "temperature",
     "must be > 0, got 0.0 (for greedy decoding use --greedy)"),
    (dict(temperature=-1.0), "temperature",
     "must be > 0, got -1.0 (for greedy decoding use --greedy)"),
    (dict(top_k=-3), "top_k", "must be an integer of at least 1, got -3"),
    (dict(top_k=0), "top_k", "must be an integer of at least 1, got 0"),
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
