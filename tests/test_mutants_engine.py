"""The engine's work, not only its tokens: identical prompts are encoded once, a batch compacts
when a quarter of its rows have finished, rows leave at their limit; and a top_p of 1 filters
nothing. Each of these could be undone without changing a token (the other tests' subject)."""
import torch

from gptlab.engine import SamplingParams, filter_logits, generate
from gptlab.model import GPT, GPTConfig


def model() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=61, context=48, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                    positions="rotary", norm="rmsnorm", activation="swiglu", bias=False)
    net = GPT(cfg).eval()
    with torch.no_grad():  # sharper logits so greedy paths are not ties
        net.lm_head.weight.mul_(8)
    return net


def forward_shapes(net: GPT) -> list[tuple[int, int]]:
    """The (rows, tokens) of each forward the model is asked for, recorded as they come."""
    shapes = []
    net.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    return shapes


PROMPTS = [[3, 4, 5], [20, 21], [30], [40, 41, 42]]


def test_identical_prompts_are_prefilled_once():
    """Four prompts, two distinct: the prefill is 2 rows, the decoding steps 4."""
    net = model()
    shapes = forward_shapes(net)
    out = generate(net, [[3, 4, 5], [6, 7], [3, 4, 5], [3, 4, 5]],
                   SamplingParams(max_new_tokens=3, greedy=True))
    assert shapes == [(2, 3), (4, 1), (4, 1)]
    assert out.tokens[0] == out.tokens[2] == out.tokens[3]


def test_a_batch_compacts_once_a_quarter_of_its_rows_have_stopped():
    """One row of four stops at its first token: 3 live rows <= 0.75 * 4, so the next steps
    run 3 rows. One of five (4 > 0.75 * 5) keeps the batch of five."""
    net = model()
    greedy = SamplingParams(max_new_tokens=6, greedy=True)
    stop = generate(net, PROMPTS, greedy).tokens[0][0]
    params = SamplingParams(max_new_tokens=6, greedy=True, stop_ids=(stop,))
    shapes = forward_shapes(net)
    out = generate(net, PROMPTS, params)
    assert [len(t) for t in out.tokens] == [1, 6, 6, 6] and out.finished[0]
    assert shapes == [(4, 3)] + [(3, 1)] * 5
    shapes.clear()
    out = generate(net, PROMPTS + [[50, 51]], params)
    assert [len(t) for t in out.tokens] == [1, 6, 6, 6, 6]
    assert shapes == [(5, 3)] + [(5, 1)] * 5


def test_a_row_at_its_limit_leaves_the_batch():
    """Prompts of 45 and 3 tokens in a context of 48: the first gets 3 new tokens, the second
    6; after the long row's third the batch runs the short row alone."""
    net = model()
    shapes = forward_shapes(net)
    out = generate(net, [[7] * 45, [3, 4, 5]], SamplingParams(max_new_tokens=6, greedy=True))
    assert [len(t) for t in out.tokens] == [3, 6] and out.finished == [False, False]
    assert shapes == [(2, 45), (2, 1), (2, 1), (1, 1), (1, 1), (1, 1)]
    # With stop tokens (none drawn here) the rows that go on are counted another way: the
    # same steps.
    unused = next(i for i in range(61) if all(i not in t for t in out.tokens))
    shapes.clear()
    again = generate(net, [[7] * 45, [3, 4, 5]],
                     SamplingParams(max_new_tokens=6, greedy=True, stop_ids=(unused,)))
    assert again.tokens == out.tokens and again.finished == [False, False]
    assert shapes == [(2, 45), (2, 1), (2, 1), (1, 1), (1, 1), (1, 1)]


def test_a_seed_past_two_to_the_64_is_read_modulo_two_to_the_64():
    """torch refuses a seed of 2**64 or more; generate reads any integer modulo 2**64, as
    torch reads a negative one."""
    net = model()
    params = SamplingParams(max_new_tokens=5, temperature=1.5)
    want = generate(net, [[3, 4]], params, seed=5).tokens
    assert generate(net, [[3, 4]], params, seed=2**64 + 5).tokens == want
    assert generate(net, [[3, 4]], params, seed=-1).tokens == \
        generate(net, [[3, 4]], params, seed=2**64 - 1).tokens


def test_a_top_p_of_one_filters_nothing():
    """top_p = 1 is no nucleus filter (SamplingParams): run as one, the tokens after the mass
    has summed to 1.0 in float32 (here 1e-13 each) were cut."""
    logits = torch.tensor([[0.0, -30.0, -30.0]])
    assert torch.equal(filter_logits(logits, None, 1.0), logits)
    assert torch.isinf(filter_logits(logits, None, 0.999)[0, 1:]).all()


def test_logits_scaled_with_a_graph_are_those_scaled_without_one():
    """PPO scales logits that require grad: that path builds the overflowed rows apart (a where
    of shifted and plain rows), and only how often it reads the device was checked. Its values
    are the no-graph ones, bit for bit: a tied top at 0 (not 0 / 0 where the temperature
    is below float32's range), the rest -inf, plain rows divided."""
    from gptlab.engine import scale_logits
    logits = torch.tensor([[1e-30, -0.0, 3.0, 3.0], [1e30, 1e30, -2.0, 0.0],
                           [-0.0, 0.0, -1.0, 2.5], [-3e38, 1e-45, 7.0, -7.0]])
    for t in (1e-300, 1e-39, 1e-10, 0.7, 3.0):  # 1e-300 is 0 in float32
        plain = scale_logits(logits, t)
        graph = scale_logits(logits.clone().requires_grad_(), t)
        assert graph.requires_grad
        assert torch.equal(graph.detach().view(torch.int32), plain.view(torch.int32)), t
    tiny = scale_logits(logits.clone().requires_grad_(), 1e-39)
    assert tiny[0].tolist() == [float("-inf"), float("-inf"), 0.0, 0.0]
    assert tiny[2].tolist() == [float("-inf")] * 3 + [0.0]
