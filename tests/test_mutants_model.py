"""The model's pieces against hand-computed or float64 numbers, where a plausible slip passed
every self-consistency test (cache vs full forward, padded vs alone): rotary angles and pair
layout, the norms' epsilon, the causal alignment of `attention_math` after cached keys, a
pre-norm encoder-decoder's norms, and the KV cache's encoder rows under `select`."""
import math

import pytest
import torch

from gptlab.model import Transformer, TransformerConfig, attention_math
from gptlab.model.attention import KVCache, apply_rotary, rotary_cos_sin
from gptlab.model.layers import make_norm
from test_model import record  # forward hooks keeping each named module's input and output


def rotated_by_hand(x: list[float], pos: int, theta: float) -> list[float]:
    """RoFormer's rotation in Llama's layout: pair (i, i + D/2) turned by pos * theta^(-2i/D)."""
    D = len(x)
    out = list(x)
    for i in range(D // 2):
        a = pos * theta ** (-2 * i / D)
        c, s = math.cos(a), math.sin(a)
        out[i] = x[i] * c - x[i + D // 2] * s
        out[i + D // 2] = x[i] * s + x[i + D // 2] * c
    return out


def test_rotary_turns_each_pair_i_and_i_plus_half_by_its_own_angle():
    """Rotating by -angle, pairing (2i, 2i + 1), a cos/sin swap, a wrong frequency exponent or a
    theta other than the config's all keep cached decoding equal to the full forward (scores
    depend on relative positions only); they break loading a Llama. Absolute numbers catch them."""
    D, theta = 8, 500.0
    x = torch.randn(1, 1, 4, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    positions = torch.tensor([[0, 1, 5, 37]])
    cos, sin = rotary_cos_sin(positions, D, theta, torch.float64)
    assert cos.shape == sin.shape == (1, 1, 4, D)
    got = apply_rotary(x, cos, sin)[0, 0]
    for t, pos in enumerate(positions[0].tolist()):
        want = rotated_by_hand(x[0, 0, t].tolist(), pos, theta)
        assert got[t].tolist() == pytest.approx(want, abs=1e-5), pos
    assert torch.equal(got[0], x[0, 0, 0])  # position 0 is not turned
    # By hand, D = 4, position 2: angles 2 and 2 / sqrt(500) turn (1, 0) and (0, 1).
    cos, sin = rotary_cos_sin(torch.tensor([[2]]), 4, theta, torch.float64)
    e = apply_rotary(torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]], dtype=torch.float64), cos, sin)
    b = 2 / math.sqrt(500)
    assert e[0, 0, 0].tolist() == pytest.approx([math.cos(2), -math.sin(b), math.sin(2),
                                                 math.cos(b)], abs=1e-6)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norms_use_the_configured_epsilon(kind):
    """An epsilon of 1e-5 against torch's default moves a Llama's logits by ~1e-6: no parity
    test sees it. With eps = 0.5 on small inputs, y = x / sqrt(mean(x^2) + eps) (RMSNorm) or
    (x - mean) / sqrt(var + eps) (LayerNorm), gain 1 and bias 0 at init."""
    x = torch.tensor([[0.1, -0.2, 0.3, 0.05]], dtype=torch.float64)
    norm = make_norm(kind, 4, 0.5).double()
    xs = x[0].tolist()
    if kind == "rmsnorm":
        want = [v / math.sqrt(sum(u * u for u in xs) / 4 + 0.5) for v in xs]
    else:
        m = sum(xs) / 4
        var = sum((u - m) ** 2 for u in xs) / 4
        want = [(v - m) / math.sqrt(var + 0.5) for v in xs]
    with torch.no_grad():
        assert norm(x)[0].tolist() == pytest.approx(want, rel=1e-9)


def test_attention_math_is_causal_with_the_queries_last_of_the_keys():
    """attention_math(is_causal=True) with T queries after S - T cached keys: query t sees keys
    0 .. S - T + t, as the module's mask says (a plain tril() hid the cached ones)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, w = attention_math(q, k, v, is_causal=True)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    allowed = torch.tensor([[s <= 2 + t for s in range(5)] for t in range(3)])
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    # The softmax runs in float32 (scores.float()), whatever the dtype.
    assert (w - want).abs().max() < 1e-6 and (out - want @ v).abs().max() < 1e-6
    assert w[0, 0, 0, :3].sum() == pytest.approx(1.0) and w[0, 0, 0, 3:].abs().max() == 0


def test_a_pre_norm_encoder_decoder_normalises_each_sublayers_input_and_the_stacks_output():
    """prenorm=True: x = x + sublayer(norm(x)) in both stacks, then a final norm on each (the
    encoder's output, the decoder's before the head). Only post-norm was checked: a sub-layer
    fed the raw stream, or a final norm left out, went unseen."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=40, context=16, n_encoder_layers=1, n_decoder_layers=1,
                            n_heads=2, d_model=16, d_ff=32, dropout=0.0, prenorm=True)
    model = Transformer(cfg).eval()
    e, d = model.encoder[0], model.decoder[0]
    with torch.no_grad():  # gains and biases away from 1 and 0, so a norm shows
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    seen = record({"enc": e, "e_attn": e.attn, "e_attn_norm": e.attn_norm, "e_mlp": e.mlp,
                   "e_mlp_norm": e.mlp_norm, "enc_norm": model.enc_norm, "dec": d,
                   "self": d.self_attn, "self_norm": d.self_norm, "cross": d.cross_attn,
                   "cross_norm": d.cross_norm, "d_mlp": d.mlp, "d_mlp_norm": d.mlp_norm,
                   "dec_norm": model.dec_norm, "head": model.lm_head})
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(0, 40, (2, 7), generator=g), torch.randint(0, 40, (2, 5), generator=g)
    with torch.no_grad():
        model(src, tgt)
    x, out = seen["enc"]
    assert torch.equal(seen["e_attn_norm"][0], x)
    assert torch.equal(seen["e_attn"][0], seen["e_attn_norm"][1])
    h = x + seen["e_attn"][1]
    assert torch.allclose(seen["e_mlp_norm"][0], h)
    assert torch.equal(seen["e_mlp"][0], seen["e_mlp_norm"][1])
    assert torch.allclose(out, h + seen["e_mlp"][1])
    assert torch.equal(seen["enc_norm"][0], out)
    memory = seen["enc_norm"][1]
    assert (memory - out).abs().max() > 0.1  # the final norm did something
    y, out = seen["dec"]
    assert torch.equal(seen["self_norm"][0], y)
    assert torch.equal(seen["self"][0], seen["self_norm"][1])
    h = y + seen["self"][1]
    assert torch.allclose(seen["cross_norm"][0], h)
    assert torch.equal(seen["cross"][0], seen["cross_norm"][1])
    h = h + seen["cross"][1]
    assert torch.allclose(seen["d_mlp_norm"][0], h)
    assert torch.equal(seen["d_mlp"][0], seen["d_mlp_norm"][1])
    assert torch.allclose(out, h + seen["d_mlp"][1])
    assert torch.equal(seen["dec_norm"][0], out)
    assert (seen["dec_norm"][1] - out).abs().max() > 0.1
    assert torch.equal(seen["head"][0], seen["dec_norm"][1])


def cache_with_cross() -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """A cache of 3 rows with 2 positions written and layer 0's encoder keys and values."""
    g = torch.Generator().manual_seed(2)
    cache = KVCache(1, 3, 2, 6, 4)
    k, v = torch.randn(3, 2, 2, 4, generator=g), torch.randn(3, 2, 2, 4, generator=g)
    cache.update(0, k, v)
    cache.length = 2
    ck, cv = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    cache.cross[0] = (ck, cv)
    return cache, ck, cv


@pytest.mark.parametrize("rows", [[0, 2], [0, 0, 1], [2, 0, 1]])
def test_selecting_rows_of_a_cache_with_encoder_keys_moves_those_rows_too(rows):
    """An encoder-decoder's cache holds the encoder's keys and values per row: a selection
    that moved the self-attention rows alone left each row reading another's source."""
    cache, ck, cv = cache_with_cross()
    k = cache.k[0, :, :, :2].clone()
    cache.select(rows)
    assert torch.equal(cache.k[0, :, :, :2], k[rows])
    assert torch.equal(cache.cross[0][0], ck[rows]) and torch.equal(cache.cross[0][1], cv[rows])


def test_selecting_a_row_past_the_batch_is_refused_even_where_the_buffer_has_room():
    """Rows 3 of 4 allocated: row 3 holds nothing of this batch (a stale row of an earlier
    one), so selecting it is an IndexError, as any other row past the batch, not a copy."""
    cache = KVCache(1, 4, 2, 6, 4, rows=3)
    cache.update(0, torch.ones(3, 2, 2, 4), torch.ones(3, 2, 2, 4))
    cache.length = 2
    with pytest.raises(IndexError):
        cache.select([0, 3])
    with pytest.raises(IndexError):
        cache.select([0, 1, 2, 3])


def test_the_feed_forward_drops_its_output_not_its_hidden_units():
    """Dropout sits on the sub-layer's output (GPT-2's resid_pdrop, Vaswani §5.4): in training
    each output is 0 or twice its eval value (p = 0.5). Dropping the hidden units instead gave
    outputs of neither kind, and only eval-mode numbers were checked."""
    from gptlab.model.layers import MLP
    torch.manual_seed(0)
    mlp = MLP(8, 32, "gelu", dropout=0.5)
    with torch.no_grad():
        mlp.down.bias.uniform_(-1.0, 1.0)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = mlp.eval()(x)
        dropped = mlp.train()(x)
    zero = dropped == 0
    assert 0 < int(zero.sum()) < zero.numel()
    assert torch.allclose(dropped[~zero], 2 * plain[~zero], atol=1e-6)


def test_decoding_with_a_cache_projects_the_encoder_output_once_per_layer():
    """KVCache.cross: each decoder layer's keys and values of the encoder output are computed
    at the first step and read after; recomputed every step, the tokens were the same and the
    cost grew with the source times the steps."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=40, context=16, n_encoder_layers=1, n_decoder_layers=2,
                            n_heads=2, d_model=16, d_ff=32, dropout=0.0)
    model = Transformer(cfg).eval()
    calls = []
    for i, layer in enumerate(model.decoder):
        layer.cross_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    out = model.greedy_decode(torch.randint(1, 40, (2, 6)), bos_id=1, eos_id=-1,
                              max_new_tokens=5)
    assert out.shape == (2, 5) and calls == [0, 1]


def test_gpt_refuses_an_attention_mask_that_does_not_cover_the_cached_positions():
    """A mask of the new tokens only, after a cache, broadcast silently: each new token was
    read at position 0 and blind to nothing."""
    from gptlab.model import GPT, GPTConfig
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=2, d_model=16)).eval()
    cache = net.new_cache(2, 8)
    with torch.no_grad():
        net(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3), cache=cache)
        with pytest.raises(ValueError, match=r"attention_mask covers 1 positions, expected "
                                             r"cache length \+ T = 4"):
            net(torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 1), cache=cache)
