"""The generation engine: equal to naive decoding, padding-invariant, seeded, stops correctly."""
import torch

from gptlab.engine import SamplingParams, filter_logits, generate
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
