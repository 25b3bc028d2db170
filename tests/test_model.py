"""The models: attention against a float64 reference, KV-cache decoding against a full forward,
left padding against unpadded rows, presets against the papers' parameter counts."""
import dataclasses
import math

import pytest
import torch

from gptlab.model import (GPT, GPTConfig, Transformer, TransformerConfig, attention_math,
                          build_model, get_preset)
from gptlab.model.attention import Attention, KVCache
from gptlab.model.presets import PAPER_PARAMS, PRESETS


def small_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=97, context=64, n_layers=2, n_heads=4, d_model=32, dropout=0.0)
    return GPT(GPTConfig(**{**base, **kw})).eval()


VARIANTS = {
    "learned": dict(positions="learned"),
    "sinusoidal": dict(positions="sinusoidal"),
    "rotary": dict(positions="rotary", norm="rmsnorm", activation="swiglu", bias=False),
    "rotary-gqa": dict(positions="rotary", n_kv_heads=2, norm="rmsnorm", activation="swiglu"),
    "gqa-1kv": dict(positions="learned", n_kv_heads=1),
    "postnorm": dict(positions="learned", prenorm=False, activation="gelu"),
    "qwen-bias": dict(positions="rotary", bias=False, qkv_bias=True, tie_embeddings=False),
}


def reference_attention(q, k, v, allowed):
    """softmax(QKᵀ/√d)V in float64; `allowed` (B,1,T,S) bool."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def test_attention_matches_float64_reference_with_causal_and_padding_masks():
    torch.manual_seed(0)
    B, H, T, D = 3, 4, 7, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :3] = False  # left padding
    pad[2, 5:] = False  # right padding
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal[None, None] & pad[:, None, None, :]
    allowed |= torch.eye(T, dtype=torch.bool)  # every query sees itself
    ref = reference_attention(q, k, v, allowed)
    out_math, weights = attention_math(q, k, v, allowed)
    out_sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert (out_math.double() - ref).abs().max() < 1e-5
    assert (out_sdpa.double() - ref).abs().max() < 1e-5
    assert torch.allclose(weights.sum(-1), torch.ones(B, H, T), atol=1e-6)
    assert weights[1, :, 5, :3].abs().max() == 0  # padded keys get no weight


@pytest.mark.parametrize("n_kv", [4, 2])
def test_attention_module_fast_and_explicit_paths_agree(n_kv):
    torch.manual_seed(1)
    attn = Attention(32, 4, n_kv).eval()
    x = torch.randn(2, 9, 32)
    fast, none = attn(x, is_causal=True)
    slow, w = attn(x, is_causal=True, need_weights=True)
    assert none is None and w.shape == (2, 4, 9, 9)
    assert (fast - slow).abs().max() < 1e-5
    assert w[0, 0].triu(1).abs().max() == 0  # causal: nothing above the diagonal


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_attention_scale_multiplies_qk_on_both_paths_as_a_float64_reference(scale):
    torch.manual_seed(2)
    attn = Attention(32, 4, 2, scale=scale).eval()
    x = torch.randn(2, 9, 32)
    fast, _ = attn(x, is_causal=True)
    slow, w = attn(x, is_causal=True, need_weights=True)
    q = attn._heads(attn.q_proj(x), 4).double()
    k = attn._heads(attn.k_proj(x), 2).repeat_interleave(2, 1).double()
    v = attn._heads(attn.v_proj(x), 2).repeat_interleave(2, 1).double()
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(
        ~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    ref = scores.softmax(-1)
    out = attn.o_proj((ref @ v).transpose(1, 2).reshape(2, 9, 32).float())
    with torch.no_grad():
        assert (w.double() - ref).abs().max() < 1e-6
        assert (fast - out).abs().max() < 1e-5 and (slow - out).abs().max() < 1e-5
        # The default is 1/√d_head (8 here): another function than this scale's.
        attn.scale = None
        default, _ = attn(x, is_causal=True)
        attn.scale = 1 / math.sqrt(8)
        assert (attn(x, is_causal=True)[0] - default).abs().max() < 1e-6
        assert (default - fast).abs().max() > 1e-3


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("n_kv", [4, 2])
def test_attention_module_is_causal_after_a_cache_sees_the_cached_keys(n_kv, need_weights):
    """A block of queries after cached keys is the last T of S: SDPA's own is_causal aligned it
    with the first keys, so the fast path disagreed with the explicit one and the full pass."""
    torch.manual_seed(1)
    attn = Attention(32, 4, n_kv).eval()
    x = torch.randn(2, 9, 32)
    full, _ = attn(x, is_causal=True)
    cache = KVCache(1, 2, n_kv, 9, 8)
    first, _ = attn(x[:, :4], is_causal=True, cache=cache)
    cache.length = 4
    rest, _ = attn(x[:, 4:], is_causal=True, cache=cache, need_weights=need_weights)
    assert (torch.cat([first, rest], 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decoding_equals_full_forward(variant):
    model = small_gpt(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 20)
        steps = [model(ids[:, :8], cache=cache)]  # a prefill of 8, then one token at a time
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(8, 20)]
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["learned", "rotary-gqa", "sinusoidal"])
def test_left_padded_batch_equals_each_prompt_alone(variant):
    model = small_gpt(**VARIANTS[variant])
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 97, (n,), generator=g) for n in (11, 5, 8)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(r[None])
            assert (batched[i, T - len(r):] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("hint", [None, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("variant", ["learned", "sinusoidal", "rotary-gqa", "gqa-1kv", "postnorm"])
def test_right_padded_batch_equals_each_row_alone(variant, need_weights, hint):
    """Right padding (scoring, SFT batches) takes the plain causal path, read from the mask or
    told by the caller (`right_padded`): the real tokens' states are each row's alone."""
    model = small_gpt(**VARIANTS[variant])
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 97, (n,), generator=g) for n in (11, 5, 8)]
    ids = torch.randint(1, 97, (3, 11), generator=g)  # padding that is not token 0
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    with torch.no_grad():
        h, w = model.hidden_states(ids, attention_mask=mask, need_weights=need_weights,
                                   right_padded=hint)
        for i, r in enumerate(rows):
            alone, _ = model.hidden_states(r[None])
            assert (h[i, :len(r)] - alone[0]).abs().max().item() <= 1e-5
    if need_weights:  # real queries give the padding after them no weight
        assert all(x[1, :, :5, 5:].abs().max() == 0 for x in w)


@pytest.mark.parametrize("variant", ["learned", "rotary-gqa"])
def test_padding_inside_a_row_is_masked_whatever_the_rest_of_the_batch(variant):
    """A row with a gap of padding ([1, 1, 0, 0, 1, 1, 1]) alone in its batch: its real tokens
    give the logits of those tokens without the gap (right padding alone takes a fast path)."""
    model = small_gpt(**VARIANTS[variant])
    ids = torch.randint(1, 97, (1, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1]])
    real = mask[0].bool()
    with torch.no_grad():
        gapped = model(ids, attention_mask=mask)[0, real]
        alone = model(ids[:, real])[0]
    assert (gapped - alone).abs().max().item() <= 1e-5


def test_left_padded_cached_decoding_equals_alone():
    model = small_gpt(**VARIANTS["rotary-gqa"])
    rows = [[5, 6, 7, 8, 9, 10], [3, 4]]
    nxt = torch.tensor([[11], [12]])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 3, 4]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 0, 1, 1]])
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        model(ids, attention_mask=mask, cache=cache)
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                     cache=cache)
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r + [int(nxt[i])]]))[0, -1]
            assert (step[i, -1] - alone).abs().max().item() <= 1e-5


def test_gpt_need_weights_path_equals_fast_path():
    model = small_gpt(**VARIANTS["rotary-gqa"])
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h_fast, _ = model.hidden_states(ids)
        h_slow, weights = model.hidden_states(ids, need_weights=True)
    assert len(weights) == 2 and weights[0].shape == (2, 4, 10, 10)
    assert (h_fast - h_slow).abs().max().item() <= 1e-5


# --- local (banded) attention: GPT-3's alternating layers -----------------------------------

# Layers 0 and 2 dense, 1 local, or every layer local; a window of 5 in sequences of up to 20.
LOCAL = {
    "learned-odd": dict(positions="learned", n_layers=3, attention_window=5,
                        local_attention_layers="odd"),
    "rotary-gqa-all": dict(VARIANTS["rotary-gqa"], attention_window=5),
    "postnorm-list": dict(VARIANTS["postnorm"], n_layers=3, attention_window=5,
                          local_attention_layers=[0, 2]),
    # GPT-Neo's: QKᵀ unscaled, no Q/K/V biases.
    "neo": dict(positions="learned", n_layers=3, attention_window=5, local_attention_layers="odd",
                qkv_bias=False, attention_scale=1.0),
}


def band_by_hand(real: list[int], past: int, window: int) -> torch.Tensor:
    """(T, S) allowed keys of the last T = len(real) - past queries of one row, counted out: a
    query sees itself and the real keys at most window - 1 real tokens before it (a padding
    query's output is unused; it reads what `padded_causal_mask` lets it)."""
    S = len(real)
    allowed = torch.zeros(S - past, S, dtype=torch.bool)
    for q in range(past, S):
        for k in range(q + 1):
            between = sum(real[k + 1:q + 1])  # real tokens after key k, up to query q
            allowed[q - past, k] = k == q or real[k] and between < window
    return allowed


@pytest.mark.parametrize("past", [0, 6])
def test_attention_matches_float64_reference_with_a_band_mask(past):
    from gptlab.model.attention import local_attention_mask
    torch.manual_seed(0)
    B, H, S, D, window = 3, 4, 11, 16, 3
    rows = [[1] * 11, [0, 0, 0] + [1] * 8, [1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1]]  # a gap in row 2
    real = torch.tensor(rows)
    q = torch.randn(B, H, S - past, D)
    k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    allowed = torch.stack([band_by_hand(r, past, window) for r in rows])[:, None]
    assert torch.equal(local_attention_mask(real, B, past, S - past, window, q.device), allowed)
    unpadded = local_attention_mask(None, B, past, S - past, window, q.device)  # (B or 1, ...)
    assert torch.equal(unpadded, band_by_hand([1] * S, past, window).expand_as(unpadded))
    ref = reference_attention(q, k, v, allowed)
    out_math, weights = attention_math(q, k, v, allowed)
    out_sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert (out_math.double() - ref).abs().max() < 1e-5
    assert (out_sdpa.double() - ref).abs().max() < 1e-5
    assert weights[0, :, -1, :S - window].abs().max() == 0  # older than the window
    assert (weights[0, :, -1, S - window:] > 0).all()


@pytest.mark.parametrize("variant", list(LOCAL))
def test_kv_cache_decoding_equals_full_forward_with_local_layers(variant):
    """A cached step masks the keys older than the window, as the full forward does: a prefill
    of 8, a block of 3 after it, then one token at a time, to 20 tokens."""
    model = small_gpt(**LOCAL[variant])
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 20)
        steps = [model(ids[:, :8], cache=cache), model(ids[:, 8:11], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(11, 20)]
        dense = small_gpt(**{**LOCAL[variant], "attention_window": None})(ids)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5
    assert (full[:, 5:] - dense[:, 5:]).abs().max() > 1e-3  # the band changes them
    assert (full[:, :5] - dense[:, :5]).abs().max() <= 1e-5  # within the window it is dense


@pytest.mark.parametrize("variant", list(LOCAL))
def test_local_layers_need_weights_path_equals_fast_path(variant):
    model = small_gpt(**LOCAL[variant])
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h_fast, _ = model.hidden_states(ids)
        h_slow, weights = model.hidden_states(ids, need_weights=True)
    assert (h_fast - h_slow).abs().max().item() <= 1e-5
    for i, w in enumerate(weights):
        older = w[:, :, 11, :7].abs().max().item()  # keys 5 or more tokens before the last
        assert (older == 0) == model.config.is_local(i), i


@pytest.mark.parametrize("variant", list(LOCAL))
def test_padded_batches_with_local_layers_equal_each_row_alone(variant):
    """Left padding, right padding and a gap of padding inside a row: the window counts real
    tokens, so each row reads as it does alone; cached decoding after left padding too."""
    model = small_gpt(**LOCAL[variant])
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, 97, (n,), generator=g) for n in (11, 5, 8)]
    T = 11
    left, right = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    lmask, rmask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        left[i, T - len(r):], lmask[i, T - len(r):] = r, 1
        right[i, :len(r)], rmask[i, :len(r)] = r, 1
    gap = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1]])
    nxt = torch.tensor([[11], [12], [13]])
    with torch.no_grad():
        by_left, by_right = model(left, attention_mask=lmask), model(right, attention_mask=rmask)
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            assert (by_left[i, T - len(r):] - alone).abs().max().item() <= 1e-5
            assert (by_right[i, :len(r)] - alone).abs().max().item() <= 1e-5
        gapped = model(rows[0][None], attention_mask=gap)[0, gap[0].bool()]
        assert (gapped - model(rows[0][gap[0].bool()][None])[0]).abs().max().item() <= 1e-5
        cache = model.new_cache(3, T + 1)
        model(left, attention_mask=lmask, cache=cache)
        step = model(nxt, attention_mask=torch.cat([lmask, torch.ones(3, 1, dtype=torch.long)],
                                                   1), cache=cache)
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, nxt[i]])[None])[0, -1]
            assert (step[i, -1] - alone).abs().max().item() <= 1e-5


# Chunks before one token at a time: within the window then past it, one longer than the window
# after the ring went round, one that ends on a slot boundary (window 5).
CHUNKS = {"8+3": [8, 3], "2+9": [2, 9], "4+7+5": [4, 7, 5], "1": [1]}


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("variant", list(LOCAL))
def test_a_left_padded_cache_keeps_the_window_alone_and_decodes_as_a_full_forward(variant,
                                                                                chunks):
    """generate's cache (`new_cache(left_padded=True)`): a local layer keeps its window's
    latest positions in a ring, written in chunks or one token at a time, and every step's
    logits are a full forward's, rows left-padded to different lengths, to 8 windows."""
    model = small_gpt(**LOCAL[variant])
    cfg, S, pads = model.config, 40, [0, 3, 9]
    ids = torch.randint(1, 97, (3, S), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(3, S, dtype=torch.long)
    for i, pad in enumerate(pads):
        ids[i, :pad], mask[i, :pad] = 0, 0
    sizes = CHUNKS[chunks] + [1] * (S - sum(CHUNKS[chunks]))
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache, steps, at = model.new_cache(3, S, left_padded=True), [], 0
        for n in sizes:
            steps.append(model(ids[:, at:at + n], attention_mask=mask[:, :at + n], cache=cache))
            at += n
    real = mask.bool()
    assert (torch.cat(steps, 1)[real] - full[real]).abs().max().item() <= 1e-5
    local = [i for i in range(cfg.n_layers) if cfg.is_local(i)]
    assert cache.wk.shape == cache.wv.shape == (len(local), 3, cfg.kv_heads, 5, cfg.dim_head)
    assert cache.k.shape == (cfg.n_layers - len(local), 3, cfg.kv_heads, S, cfg.dim_head)


def test_a_cache_keeps_every_position_unless_the_caller_says_rows_are_left_padded():
    """A gap of padding inside a row puts keys more than the window back in its band: a cache
    not told its rows are left-padded keeps them all (masked), as every dense model's does;
    one as long as the window has nothing to drop."""
    local, dense = small_gpt(**LOCAL["learned-odd"]), small_gpt(positions="learned")
    for model, left_padded, max_len in ((local, False, 20), (dense, True, 20), (local, True, 5)):
        cache = model.new_cache(2, max_len, left_padded=left_padded)
        assert cache.window is None and cache.wk is None and cache.window_span(1) is None
        assert cache.k.shape == (model.config.n_layers, 2, 4, max_len, 8)
    gap = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 1, 1, 1]])  # 5 real tokens: all in the band
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache = local.new_cache(1, 10)
        local(ids[:, :7], attention_mask=gap[:, :7], cache=cache)
        steps = [local(ids[:, t:t + 1], attention_mask=gap[:, :t + 1], cache=cache)[0, -1]
                 for t in range(7, 10)]
        alone = local(ids[:, gap[0].bool()])[0, -3:]
    assert (torch.stack(steps) - alone).abs().max().item() <= 1e-5


def test_selecting_rows_of_a_windowed_cache_moves_its_rings_too():
    """K copies of a prompt and rows dropped (both moved within the buffers) and any other
    order (new buffers): the ring rows go with the dense rows."""
    torch.manual_seed(0)
    for rows in ([0, 0, 1, 1, 1, 2], [0, 2], [2, 0, 1]):
        cache = KVCache(2, 6, 2, 12, 4, rows=3, window=3, local_layers=[1])
        k = torch.randn(2, 3, 2, 7, 4)
        for layer in range(2):
            cache.update(layer, k[layer, :, :, :5], k[layer, :, :, :5])
        cache.length = 5
        for t in (5, 6):  # one at a time, round the ring: positions 6, 4, 5 in slots 0, 1, 2
            for layer in range(2):
                cache.update(layer, k[layer, :, :, t:t + 1], k[layer, :, :, t:t + 1])
            cache.length += 1
        cache.select(torch.tensor(rows))
        assert torch.equal(cache.k[0, :, :, :7], k[0, rows])
        assert torch.equal(cache.wk[0], k[1, rows][:, :, [6, 4, 5]])
        assert torch.equal(cache.wv[0], k[1, rows][:, :, [6, 4, 5]])
        assert cache.window_span(1) == (5, 2)  # the next token's keys: 5, 6, 7 rolled by 2


def test_shared_prompt_scores_with_local_layers_equal_each_sequence_alone():
    """The reward model's and SFT's shared prefix (PrefixKV): continuations after a left-padded
    prompt encoded once see through the band what the whole sequence alone sees."""
    from gptlab.engine import left_pad
    from gptlab.model.heads import ScalarHeadModel
    torch.manual_seed(0)
    rm = ScalarHeadModel(GPTConfig(vocab_size=97, context=64, n_layers=2, n_heads=4, d_model=32,
                                   attention_window=3, local_attention_layers="all")).eval()
    prompts, conts = [[5, 6, 7, 8, 9], [9, 10]], [[12, 13, 14, 15], [8, 11], [20, 21, 22]]
    rows = torch.tensor([0, 0, 1])
    p_ids, p_mask = left_pad(prompts)
    c_ids = torch.tensor([c + [0] * (4 - len(c)) for c in conts])
    c_mask = torch.tensor([[1] * len(c) + [0] * (4 - len(c)) for c in conts])
    with torch.no_grad():
        got = rm.score_continuations(p_ids, p_mask, rows, c_ids, c_mask)
        alone = torch.stack([rm(torch.tensor([prompts[r] + c]))[0]
                             for r, c in zip(rows.tolist(), conts)])
    assert (got - alone).abs().max().item() <= 1e-5


def test_a_window_as_long_as_the_sequence_is_dense_attention_bit_for_bit():
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dense = small_gpt(n_layers=3)(ids)
        assert torch.equal(small_gpt(n_layers=3, attention_window=12)(ids), dense)
        assert torch.equal(small_gpt(n_layers=3, attention_window=4,
                                     local_attention_layers=[])(ids), dense)


def test_bad_local_attention_settings_are_rejected():
    with pytest.raises(ValueError, match="attention_window must be at least 1"):
        GPTConfig(attention_window=0)
    for layers in ("first", [0, 0], [12], [-1], (1, 3), [True]):
        with pytest.raises(ValueError, match="local_attention_layers must be all, odd, even"):
            GPTConfig(attention_window=4, local_attention_layers=layers)
    cfg = GPTConfig(n_layers=4, attention_window=4, local_attention_layers="even")
    assert [cfg.is_local(i) for i in range(4)] == [True, False, True, False]
    assert not GPTConfig(n_layers=4, local_attention_layers="odd").is_local(1)  # no window


def test_padded_causal_mask_lets_a_padding_query_see_itself():
    from gptlab.model.attention import padded_causal_mask
    mask = padded_causal_mask(torch.tensor([[0, 0, 1, 1]]), 4)[0, 0].int()
    assert mask.tolist() == [[1, 0, 0, 0],   # padding: only itself, so its softmax has a term
                             [0, 1, 0, 0],
                             [0, 0, 1, 0],   # real tokens: the real ones up to themselves
                             [0, 0, 1, 1]]
    last = padded_causal_mask(torch.tensor([[0, 1, 1]]), 1)[0, 0].int()  # one cached step
    assert last.tolist() == [[0, 1, 1]]


def test_left_padded_batch_on_the_explicit_attention_path_equals_each_prompt_alone():
    """need_weights takes attention_math, where a query that may see nothing got NaN weights
    (SDPA gives zeros), whose NaN reached the real tokens through the next layer's keys and
    values; a padding query sees itself, and one that sees nothing reads zeros, as in SDPA."""
    model = small_gpt(**VARIANTS["rotary-gqa"])
    rows = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 9 - len(r):], mask[i, 9 - len(r):] = r, 1
    with torch.no_grad():
        h, weights = model.hidden_states(ids, attention_mask=mask, need_weights=True)
        assert torch.isfinite(h).all() and all(torch.isfinite(w).all() for w in weights)
        for i, r in enumerate(rows):
            alone, _ = model.hidden_states(r[None])
            assert (h[i, 9 - len(r):] - alone[0]).abs().max().item() <= 1e-5
    assert weights[0][1, :, 5:, :5].abs().max() == 0  # real tokens give padding no weight


def small_transformer() -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=50, context=32, n_encoder_layers=2, n_decoder_layers=2,
                            n_heads=4, d_model=32, d_ff=64, dropout=0.0)
    return Transformer(cfg).eval()


def test_encoder_decoder_kv_cache_equals_full_forward_with_padding():
    model = small_transformer()
    g = torch.Generator().manual_seed(6)
    src = torch.randint(1, 50, (2, 9), generator=g)
    src_mask = torch.ones(2, 9, dtype=torch.long)
    src_mask[1, 6:] = 0  # right-padded source
    tgt = torch.randint(1, 50, (2, 12), generator=g)
    with torch.no_grad():
        full = model(src, tgt, src_mask=src_mask)
        memory, _ = model.encode(src, src_mask)
        cache = model.new_cache(2, 12)
        steps = [model.decode(tgt[:, :4], memory, src_mask, cache=cache)[0]]
        steps += [model.decode(tgt[:, t:t + 1], memory, src_mask, cache=cache)[0]
                  for t in range(4, 12)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5
    # Padding in the source must not change row 1's output: compare with the unpadded row.
    with torch.no_grad():
        alone = model(src[1:2, :6], tgt[1:2])
    assert (full[1] - alone[0]).abs().max().item() <= 1e-5


def test_encoder_decoder_reads_a_left_padded_source_or_target_as_unpadded():
    # Positions count real tokens: left padding used to shift them (logits off by 0.25).
    model = small_transformer()
    g = torch.Generator().manual_seed(7)
    src, tgt = torch.randint(1, 50, (1, 5), generator=g), torch.randint(1, 50, (1, 6), generator=g)
    pad = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        alone = model(src, tgt)
        left_src = model(torch.cat([pad, src], 1), tgt,
                         src_mask=torch.tensor([[0] * 3 + [1] * 5]))
        left_tgt = model(src, torch.cat([pad, tgt], 1),
                         tgt_mask=torch.tensor([[0] * 3 + [1] * 6]))[:, 3:]
    assert alone.abs().max().item() > 1.0
    assert (left_src - alone).abs().max().item() <= 1e-5
    assert (left_tgt - alone).abs().max().item() <= 1e-5
    # Decoded with a cache, the mask growing with each token: the same logits.
    tgt_pad, mask = torch.cat([pad, tgt], 1), torch.tensor([[0] * 3 + [1] * 6])
    with torch.no_grad():
        memory, _ = model.encode(src)
        cache = model.new_cache(1, 9)
        steps = [model.decode(tgt_pad[:, :5], memory, tgt_mask=mask[:, :5], cache=cache)[0]]
        steps += [model.decode(tgt_pad[:, t:t + 1], memory, tgt_mask=mask[:, :t + 1],
                               cache=cache)[0] for t in range(5, 9)]
    assert (torch.cat(steps, 1)[:, 3:] - alone).abs().max().item() <= 1e-5


def test_encoder_decoder_refuses_a_mask_that_does_not_cover_its_positions():
    """A target mask without the cached positions broadcast silently (each new token read at
    position 0); GPT's attention_mask was already checked so."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=50, context=32, n_encoder_layers=1, n_decoder_layers=1,
                            n_heads=2, d_model=16, d_ff=32, dropout=0.0)
    model = Transformer(cfg).eval()
    src = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        memory, _ = model.encode(src)
        cache = model.new_cache(2, 10)
        model.decode(torch.randint(0, 50, (2, 3)), memory, cache=cache)
        with pytest.raises(ValueError, match=r"tgt_mask covers 1 positions, expected cache "
                                             r"length \+ T = 4"):
            model.decode(torch.randint(0, 50, (2, 1)), memory, tgt_mask=torch.ones(2, 1),
                         cache=cache)
        with pytest.raises(ValueError, match="src_mask covers 1 positions, expected 5"):
            model.encode(src, torch.ones(2, 1))
        with pytest.raises(ValueError, match="src_mask covers 4 positions, expected 5"):
            model.decode(src[:, :2], memory, src_mask=torch.ones(2, 4))


def test_a_source_of_padding_only_reads_the_same_on_both_attention_paths():
    """A row whose source is all padding gives its queries no key to see: SDPA reads nothing
    (zeros), the explicit path's softmax over nothing but -inf was NaN, in that row's encoder
    output and decoder logits. Both read nothing now, the other row untouched."""
    model = small_transformer()
    g = torch.Generator().manual_seed(11)
    src, tgt = torch.randint(1, 50, (2, 5), generator=g), torch.randint(1, 50, (2, 4), generator=g)
    src_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        fast_mem, _ = model.encode(src, src_mask)
        fast, _ = model.decode(tgt, fast_mem, src_mask)
        mem, enc_w = model.encode(src, src_mask, need_weights=True)
        slow, dec_w = model.decode(tgt, mem, src_mask, need_weights=True)
        alone = model(src[:1], tgt[:1])
    assert torch.isfinite(slow).all() and torch.isfinite(mem).all()
    assert (slow - fast).abs().max().item() <= 1e-5 and (mem - fast_mem).abs().max() <= 1e-5
    assert enc_w[0][1].abs().max() == 0 and dec_w[0][1][1].abs().max() == 0  # cross, row 1
    assert (slow[0] - alone[0]).abs().max().item() <= 1e-5
    q, kv = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 4, 8, generator=g)
    none = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    out, w = attention_math(q, kv, kv, none)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=none)
    assert torch.equal(out, torch.zeros(1, 2, 3, 8)) and torch.equal(sdpa, out)


def test_encoder_decoder_attention_weights():
    model = small_transformer()
    src = torch.randint(1, 50, (1, 5))
    tgt = torch.randint(1, 50, (1, 4))
    with torch.no_grad():
        memory, enc_w = model.encode(src, need_weights=True)
        _, dec_w = model.decode(tgt, memory, need_weights=True)
    self_w, cross_w = dec_w[0]
    assert enc_w[0].shape == (1, 4, 5, 5) and cross_w.shape == (1, 4, 4, 5)
    assert self_w[0, 0].triu(1).abs().max() == 0  # decoder self-attention is causal
    assert torch.allclose(cross_w.sum(-1), torch.ones(1, 4, 4), atol=1e-6)


def test_tiny_encoder_decoder_learns_to_reverse_sequences():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=14, context=16, n_encoder_layers=2, n_decoder_layers=2,
                            n_heads=4, d_model=64, d_ff=128, dropout=0.0, label_smoothing=0.0)
    model = Transformer(cfg)
    BOS, EOS = 1, 2  # tokens 3..13 are the symbols
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        src = torch.randint(3, 14, (n, 6), generator=g)
        tgt = src.flip(1)
        dec_in = torch.cat([torch.full((n, 1), BOS), tgt], 1)
        labels = torch.cat([tgt, torch.full((n, 1), EOS)], 1)
        return src, dec_in, labels

    # Seeds 0-4 all reverse every sequence by step 200 (one is at 0.08 at step 100): 200 is
    # past the jump with room to spare.
    for step in range(200):
        src, dec_in, labels = batch(64)
        loss = model(src, dec_in, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src, _, labels = batch(200)
    out = model.greedy_decode(src, BOS, EOS, max_new_tokens=7)
    exact = (out[:, :6] == src.flip(1)).all(1).float().mean().item()
    assert exact >= 0.9, f"only {exact:.2f} of sequences reversed exactly"


# Every preset as the papers' tables give it (GPT-2's: the released models): the sizes (layers,
# d_model, heads, key/value heads, d_head, d_ff, context, vocabulary), then the style (tied
# embeddings, pre-norm, norm, activation, positions, biases, dropout), read off the model built.
# Vaswani et al. 2017 Table 3: 6 encoder + 6 decoder layers, ReLU FFN, post-norm, sinusoids,
# one matrix for both embeddings and the output layer, P_drop 0.1 / 0.3. Radford et al. 2018:
# post-norm, GELU (the tanh form OpenAI's released code computes, which GPT-2 kept), learned
# positions, dropout 0.1. GPT-2: pre-norm. Brown et al. 2020 Table 2.1: XL as 16 x 128 and 13B
# as 5120 wide (n_heads x d_head = d_model; as printed those two rows contradict themselves),
# GPT-2's BPE, d_ff = 4 d. Dropout 0.1 on GPT-2 and GPT-3 too: GPT-2 "largely follows the
# details of the OpenAI GPT model" (GPT-1's 0.1) and lists its changes, dropout not among them;
# the released models' configuration (GPT2Config, openai-community/gpt2) has 0.1 for embeddings,
# attention and residuals; GPT-3 uses "the same model and architecture as GPT-2".
VASWANI = (True, False, "layernorm", "relu", "sinusoidal", True)
GPT1_STYLE = (True, False, "layernorm", "gelu_tanh", "learned", True, 0.1)
GPT2_STYLE = (True, True, "layernorm", "gelu_tanh", "learned", True, 0.1)
LLAMA_STYLE = (True, True, "rmsnorm", "swiglu", "rotary", False, 0.0)
PAPER_SHAPES = {
    "transformer-base": (6, 512, 8, 8, 64, 2048, 512, 37000) + VASWANI + (0.1,),
    "transformer-big": (6, 1024, 16, 16, 64, 4096, 512, 37000) + VASWANI + (0.3,),
    "gpt1": (12, 768, 12, 12, 64, 3072, 512, 40478) + GPT1_STYLE,
    "gpt2": (12, 768, 12, 12, 64, 3072, 1024, 50257) + GPT2_STYLE,
    "gpt2-medium": (24, 1024, 16, 16, 64, 4096, 1024, 50257) + GPT2_STYLE,
    "gpt2-large": (36, 1280, 20, 20, 64, 5120, 1024, 50257) + GPT2_STYLE,
    "gpt2-xl": (48, 1600, 25, 25, 64, 6400, 1024, 50257) + GPT2_STYLE,
    "gpt3-small": (12, 768, 12, 12, 64, 3072, 2048, 50257) + GPT2_STYLE,
    "gpt3-medium": (24, 1024, 16, 16, 64, 4096, 2048, 50257) + GPT2_STYLE,
    "gpt3-large": (24, 1536, 16, 16, 96, 6144, 2048, 50257) + GPT2_STYLE,
    "gpt3-xl": (24, 2048, 16, 16, 128, 8192, 2048, 50257) + GPT2_STYLE,
    "gpt3-2.7b": (32, 2560, 32, 32, 80, 10240, 2048, 50257) + GPT2_STYLE,
    "gpt3-6.7b": (32, 4096, 32, 32, 128, 16384, 2048, 50257) + GPT2_STYLE,
    "gpt3-13b": (40, 5120, 40, 40, 128, 20480, 2048, 50257) + GPT2_STYLE,
    "gpt3-175b": (96, 12288, 96, 96, 128, 49152, 2048, 50257) + GPT2_STYLE,
    # README: CPU sizes, Llama-style; the demo's 8 heads share 4 key/value heads.
    "tiny": (2, 64, 4, 4, 16, 192, 128, 512) + LLAMA_STYLE,
    "demo": (4, 256, 8, 4, 32, 704, 384, 2048) + LLAMA_STYLE,
    # README: CPU sizes of the 2017 Transformer, in its style.
    "transformer-tiny": (1, 64, 4, 4, 16, 128, 128, 512) + VASWANI + (0.1,),
    "transformer-small": (3, 256, 4, 4, 64, 1024, 256, 2048) + VASWANI + (0.1,),
}


def built_shape(cfg: GPTConfig | TransformerConfig) -> tuple:
    """PAPER_SHAPES's columns of `cfg`: the sizes from the config, the style from the model it
    builds on the meta device (its norm modules, position table, biases, shared matrix)."""
    from torch import nn

    from gptlab.model.layers import MLP
    with torch.device("meta"):
        model = build_model(cfg)
    norms = {type(m).__name__ for m in model.modules() if isinstance(m, (nn.LayerNorm,
                                                                         nn.RMSNorm))}
    acts = {m.activation for m in model.modules() if isinstance(m, MLP)}
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and name != "lm_head"]
    biases = {m.bias is not None for m in linears} | {
        m.bias is not None for m in model.modules() if isinstance(m, nn.LayerNorm)}
    assert len(norms) == len(acts) == len(biases) == 1
    positions = ("sinusoidal" if "pos_table" in dict(model.named_buffers())
                 else "learned" if hasattr(model, "pos_emb") else "rotary")
    embed = model.embed if isinstance(model, Transformer) else model.tok_emb
    if isinstance(cfg, TransformerConfig):
        assert cfg.n_encoder_layers == cfg.n_decoder_layers
        sizes = (cfg.n_encoder_layers, cfg.d_model, cfg.n_heads, cfg.n_heads,
                 cfg.d_model // cfg.n_heads, cfg.d_ff)
    else:
        sizes = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_head, cfg.ff_dim)
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    assert {(a.n_heads, a.n_kv_heads, a.head_dim) for a in attn} == {sizes[2:5]}
    return sizes + (cfg.context, cfg.vocab_size, model.lm_head.weight is embed.weight,
                    cfg.prenorm, {"LayerNorm": "layernorm", "RMSNorm": "rmsnorm"}[norms.pop()],
                    acts.pop(), positions, biases.pop(), cfg.dropout)


def test_the_shape_table_lists_every_preset():
    assert list(PAPER_SHAPES) == list(PRESETS)


@pytest.mark.parametrize("name", list(PAPER_SHAPES))
def test_preset_shapes_match_the_papers_tables(name):
    assert built_shape(get_preset(name)) == PAPER_SHAPES[name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_gpt3_presets_alternate_dense_and_local_layers_and_the_others_are_dense(name):
    # Brown et al. 2020 §2.1: "alternating dense and locally banded sparse attention patterns";
    # the band's width is not given: 256, GPT-Neo's, local on odd layers as GPT-Neo's are.
    cfg = get_preset(name)
    local = [i for i in range(cfg.n_layers) if cfg.is_local(i)] \
        if isinstance(cfg, GPTConfig) else []
    if name.startswith("gpt3-"):
        assert cfg.attention_window == 256 and local == list(range(1, cfg.n_layers, 2))
        assert count(name, attention_window=None) == PARAMS[name]  # a window has no parameters
    else:
        assert local == [] and getattr(cfg, "attention_window", None) is None


def test_a_gpt3_local_layer_reads_the_256_latest_tokens_and_a_dense_one_all():
    torch.manual_seed(0)
    gpt = GPT(get_preset("gpt3-small", vocab_size=50, n_layers=2, d_model=16, n_heads=2,
                         dropout=0.0)).eval()
    ids = torch.randint(0, 50, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, (dense, local) = gpt.hidden_states(ids, need_weights=True)
    last = 299  # sees keys 44..299 in the band, 0..299 densely
    assert (local[0, :, last, :44] == 0).all() and (local[0, :, last, 44:] > 0).all()
    assert (dense[0, :, last] > 0).all()


def test_the_transformer_presets_smooth_labels_by_a_tenth():
    assert [get_preset(n).label_smoothing for n in ("transformer-base", "transformer-big")] == \
        [0.1, 0.1]


def count(name: str, **overrides) -> int:
    with torch.device("meta"):
        return build_model(get_preset(name, **overrides)).num_params()


# Every preset's parameters, a tied matrix counted once: the figures README gives (63.1M /
# 214.2M, 116.5M, GPT-2's released sizes, GPT-3's 125.2M ... 174.6B, the demo's 3.25M with the
# built-in world's 1,177-token tokenizer).
PARAMS = {
    "transformer-base": 63_082_496, "transformer-big": 214_245_376, "gpt1": 116_534_784,
    "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200, "gpt3-small": 125_226_240, "gpt3-medium": 355_871_744,
    "gpt3-large": 760_300_032, "gpt3-xl": 1_315_723_264, "gpt3-2.7b": 2_651_553_280,
    "gpt3-6.7b": 6_658_404_352, "gpt3-13b": 12_853_386_240, "gpt3-175b": 174_604_259_328,
    "tiny": 139_584, "demo": 3_475_712,
    "transformer-tiny": 116_480, "transformer-small": 6_053_888,
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_every_presets_parameter_count(name):
    assert count(name) == PARAMS[name]


def test_the_count_table_lists_every_preset_and_the_papers_figures_only_the_papers_ones():
    assert list(PARAMS) == list(PRESETS)
    assert set(PAPER_PARAMS) == set(PRESETS) - {"tiny", "demo", "transformer-tiny",
                                                "transformer-small"}


def test_transformer_small_has_5_8m_parameters_with_the_built_in_worlds_pairs_tokenizer():
    # README: 5.8M with the tokenizer `gptlab seq2seq` trains on the world's pairs (1,127
    # tokens of the 2,048 asked for).
    assert count("transformer-small", vocab_size=1127) == 5_818_112


def test_the_demo_has_3_25m_parameters_with_the_built_in_worlds_tokenizer():
    assert count("demo", vocab_size=1177) == 3_252_736


# GPT-3 Table 2.1 as printed. Counting the tied token embedding once, the 2048 learned positions,
# biases and norms, every row rounds to its figure at the precision printed, except Medium.
GPT3_PRINTED = {"gpt3-small": "125M", "gpt3-large": "760M", "gpt3-xl": "1.3B",
                "gpt3-2.7b": "2.7B", "gpt3-6.7b": "6.7B", "gpt3-13b": "13B", "gpt3-175b": "175B"}


@pytest.mark.parametrize("name", list(GPT3_PRINTED))
def test_gpt3_table_parameter_counts_round_to_the_printed_figures(name):
    printed = GPT3_PRINTED[name]
    unit = {"M": 1e6, "B": 1e9}[printed[-1]]
    decimals = len(printed[:-1].partition(".")[2])
    assert float(printed[:-1]) * unit == PAPER_PARAMS[name]
    assert round(count(name) / unit, decimals) == float(printed[:-1])
    assert abs(count(name) / PAPER_PARAMS[name] - 1) < 0.02


def test_gpt3_medium_is_the_one_row_that_does_not_round_to_its_figure():
    # 355.9M, printed as 350M (+1.7%). No embedding convention gives 350M at the precision of
    # the other rows: 353.8M without the positions, 302.3M without any embedding, 407.3M with
    # an untied output layer; the GPT-2 Medium of the same shape is 354.8M.
    assert PAPER_PARAMS["gpt3-medium"] == 350e6
    assert round(count("gpt3-medium") / PAPER_PARAMS["gpt3-medium"] - 1, 3) == 0.017
    assert count("gpt3-medium", context=1024) == count("gpt2-medium") == 354_823_168


def test_gpt2_papers_counts_are_its_shapes_with_gpt1s_vocabulary():
    # GPT-2's paper (Table 2) printed 117M, 345M, 762M, 1542M: the same shapes counted with
    # GPT-1's 40,478-token vocabulary, to the million. Its smallest "is equivalent to the
    # original GPT": GPT-1's 116.5M rounds to it too.
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert round(count(name, vocab_size=40478) / 1e6) * 1e6 == PAPER_PARAMS[name], name
        assert count(name) > PAPER_PARAMS[name]  # the released 50,257-token vocabulary
    assert round(count("gpt1") / 1e6) * 1e6 == PAPER_PARAMS["gpt1"] == 117e6


def test_transformer_parameter_counts_against_table_3():
    # Shared 37,000-token vocabulary (one matrix for both embeddings and the output layer).
    # Table 3 says 65M and 213M; no one vocabulary size gives both: 3.0% under, 0.6% over.
    assert [round(100 * (count(n) / PAPER_PARAMS[n] - 1), 1)
            for n in ("transformer-base", "transformer-big")] == [-3.0, 0.6]


@pytest.mark.parametrize("bias,qkv_bias,norm", [(True, None, "layernorm"),
                                                (False, None, "layernorm"),
                                                (False, True, "rmsnorm")])
def test_biases_on_off_or_on_qkv_only(bias, qkv_bias, norm):
    """README: biases on or off (linear layers and LayerNorms), or on Q, K, V only (Qwen2)."""
    model = small_gpt(bias=bias, qkv_bias=qkv_bias, norm=norm, n_layers=1)
    names = sorted(n.removeprefix("blocks.0.") for n, _ in model.named_parameters()
                   if n.endswith(".bias"))
    on = {True: ["attn.k_proj.bias", "attn.o_proj.bias", "attn.q_proj.bias", "attn.v_proj.bias",
                 "attn_norm.bias", "final_norm.bias", "mlp.down.bias", "mlp.up.bias",
                 "mlp_norm.bias"],
          False: [], "qkv": ["attn.k_proj.bias", "attn.q_proj.bias", "attn.v_proj.bias"]}
    assert names == on["qkv" if qkv_bias else bias]


def test_feed_forward_activations_are_the_named_functions():
    """FFN(x) = down(act(up(x))): GELU exact (erf) or its tanh form, ReLU, SiLU; SwiGLU
    down(silu(gate(x)) * up(x))."""
    import torch.nn.functional as F

    from gptlab.model.layers import MLP
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 3
    funcs = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
             "relu": F.relu, "silu": F.silu}
    outs = {}
    for act in [*funcs, "swiglu"]:
        torch.manual_seed(0)
        mlp = MLP(8, 16, act)
        with torch.no_grad():
            want = (mlp.down(F.silu(mlp.gate(x)) * mlp.up(x)) if act == "swiglu"
                    else mlp.down(funcs[act](mlp.up(x))))
            outs[act] = mlp(x)
        assert torch.equal(outs[act], want), act
    assert 1e-4 < (outs["gelu"] - outs["gelu_tanh"]).abs().max() < 1e-2  # close, not the same


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="divisible"):  # it built 28-wide attention before
        TransformerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="positions"):
        GPTConfig(positions="alibi")
    with pytest.raises(ValueError, match="multiple"):
        GPT(dataclasses.replace(get_preset("tiny"), n_kv_heads=3))
    # An odd head dimension built, then failed its first forward with a broadcasting error.
    with pytest.raises(ValueError, match=r"the head dimension \(15\) must be even"):
        GPTConfig(d_model=30, n_heads=2, positions="rotary")
    with pytest.raises(ValueError, match=r"the head dimension \(7\) must be even"):
        GPTConfig(d_model=32, n_heads=4, head_dim=7, positions="rotary")
    GPTConfig(d_model=30, n_heads=2, positions="learned")  # only rotation needs pairs
    for scale in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="attention_scale must be a finite number above 0"):
            GPTConfig(attention_scale=scale)


def test_transformer_dropout_is_where_the_paper_puts_it_not_on_attention_weights():
    """Vaswani et al. §5.4 (and tensor2tensor's transformer_base_v1 it ran): dropout on the sums
    of embeddings and positions and on each sub-layer's output, none on the attention weights.
    The encoder-decoder dropped attention weights too: in training their rows did not sum to 1."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=50, context=32, n_encoder_layers=1, n_decoder_layers=1,
                            n_heads=4, d_model=32, d_ff=64, dropout=0.3)
    model = Transformer(cfg).train()
    src, tgt = torch.randint(1, 50, (2, 9)), torch.randint(1, 50, (2, 6))
    memory, enc_w = model.encode(src, need_weights=True)
    _, dec_w = model.decode(tgt, memory, need_weights=True)
    for w in [enc_w[0], *dec_w[0]]:
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5)
    assert not torch.equal(model(src, tgt), model(src, tgt))  # residual dropout is still on
    model.eval()
    assert torch.equal(model(src, tgt), model(src, tgt))


def identity_attention(d: int) -> Attention:
    attn = Attention(d, 1).eval()
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            proj.weight.copy_(torch.eye(d))
            proj.bias.zero_()
    return attn


def test_attention_module_equals_a_hand_computed_example():
    """Two tokens x1 = (1, 0, 1), x2 = (0, 2, 0), one head, identity projections: scores
    x1·x1 = 2, x1·x2 = 0, x2·x2 = 4, divided by √3. Row 1: softmax(1.1547, 0) = (0.76037,
    0.23963); row 2: softmax(0, 2.3094) = (0.09035, 0.90965); out = weights @ (x1; x2)."""
    attn = identity_attention(3)
    x = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]])
    full = torch.tensor([[0.76037, 0.47926, 0.76037], [0.09035, 1.81930, 0.09035]])
    causal = torch.tensor([[1.0, 0.0, 1.0], [0.09035, 1.81930, 0.09035]])  # x1 sees only itself
    for need_weights in (False, True):
        out, w = attn(x, need_weights=need_weights)
        assert (out[0] - full).abs().max() < 1e-4
        out, w = attn(x, is_causal=True, need_weights=need_weights)
        assert (out[0] - causal).abs().max() < 1e-4
    assert (w[0, 0] - torch.tensor([[1.0, 0.0], [0.09035, 0.90965]])).abs().max() < 1e-4
    # A padding mask hiding x2 from both queries: each row reads x1 only.
    out, _ = attn(x, mask=torch.tensor([True, False])[None, None, None])
    assert (out[0] - x[0, 0]).abs().max() < 1e-6


@pytest.mark.parametrize("need_weights", [False, True])
def test_grouped_query_attention_shares_each_kv_head_with_consecutive_query_heads(need_weights):
    """8 query heads on 2 key/value heads: query heads 0-3 read kv head 0, 4-7 kv head 1 (as
    Llama's repeat_kv), under a causal and padding mask, against a head-by-head loop."""
    from gptlab.model.attention import padded_causal_mask
    torch.manual_seed(2)
    H, Hkv, D, T = 8, 2, 4, 6
    attn = Attention(32, H, Hkv).eval()
    x = torch.randn(2, T, 32)
    pad = torch.ones(2, T, dtype=torch.bool)
    pad[1, :2] = False
    mask = padded_causal_mask(pad, T)
    with torch.no_grad():
        q = attn.q_proj(x).view(2, T, H, D)
        k = attn.k_proj(x).view(2, T, Hkv, D)
        v = attn.v_proj(x).view(2, T, Hkv, D)
        heads = []
        for h in range(H):
            g = h // (H // Hkv)
            s = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(D)
            s = s.masked_fill(~mask[:, 0], float("-inf"))
            heads.append(s.softmax(-1) @ v[:, :, g])
        naive = attn.o_proj(torch.cat(heads, -1))
        out, _ = attn(x, mask=mask, need_weights=need_weights)
        causal, _ = attn(x, is_causal=True, need_weights=need_weights)
    assert (out - naive).abs().max() < 1e-5
    assert (causal[0] - naive[0]).abs().max() < 1e-5  # row 0 has no padding: plain causal


def test_sinusoidal_table_is_the_papers_formula():
    from gptlab.model.layers import sinusoidal_table
    for d in (8, 7):
        table = sinusoidal_table(50, d)
        for pos in (0, 1, 17, 49):
            for j in range(d):
                angle = pos / 10000 ** ((j - j % 2) / d)  # PE(pos, 2i) = sin, PE(pos, 2i+1) = cos
                want = math.sin(angle) if j % 2 == 0 else math.cos(angle)
                assert abs(table[pos, j].item() - want) < 1e-5, (d, pos, j)


def test_dropout_is_off_in_eval_mode():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=97, context=32, n_layers=2, n_heads=4, d_model=32,
                        dropout=0.5))
    plain = GPT(dataclasses.replace(gpt.config, dropout=0.0))
    plain.load_state_dict(gpt.state_dict())
    ids = torch.randint(0, 97, (2, 10))
    assert not torch.equal(gpt.train()(ids), gpt(ids))
    assert torch.equal(gpt.eval()(ids), plain.eval()(ids))
    cfg = TransformerConfig(vocab_size=50, context=32, n_encoder_layers=1, n_decoder_layers=1,
                            n_heads=4, d_model=32, d_ff=64, dropout=0.5)
    t = Transformer(cfg)
    t_plain = Transformer(dataclasses.replace(cfg, dropout=0.0))
    t_plain.load_state_dict(t.state_dict())
    src, tgt = torch.randint(1, 50, (2, 7)), torch.randint(1, 50, (2, 5))
    assert torch.equal(t.eval()(src, tgt), t_plain.eval()(src, tgt))


def test_transformer_shares_one_matrix_scales_embeddings_and_smooths_labels():
    """§3.4: one matrix for both embeddings and the pre-softmax linear, embeddings times
    √d_model plus the sinusoids; §5.4: label smoothing ε = 0.1, target (1 - ε) one-hot + ε / V."""
    model = small_transformer()
    assert model.lm_head.weight is model.embed.weight
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = model.embed.weight[ids] * math.sqrt(32) + model.pos_table[:6]
        assert (model._embed(ids) - want).abs().max() < 1e-6
        smoothed = dataclasses.replace(model.config, label_smoothing=0.1)
        model.config = smoothed
        src, tgt = ids, ids.flip(1)
        labels = tgt.clone()
        labels[1, 4:] = -100
        logp = model(src, tgt).log_softmax(-1)[labels != -100]
        kept = labels[labels != -100]
        nll = -logp.gather(1, kept[:, None])[:, 0]
        want = (0.9 * nll - 0.1 * logp.mean(-1)).mean()
        assert abs(model(src, tgt, labels=labels).item() - want.item()) < 1e-5


@pytest.mark.parametrize("rows,in_place", [
    ([0, 2, 3], True),            # finished rows dropped: kept rows move down
    ([0, 0, 0, 1, 1, 2], True),   # K copies of each distinct prompt's row (rows[i] <= i)
    ([0, 1, 0, 0, 2, 1], True),   # copies of prompts that were not next to each other
    ([2, 0, 1], False),           # any other order: a new cache
])
def test_selecting_rows_of_a_kv_cache_moves_them_within_its_buffers(rows, in_place):
    # On CPU, gathering rows into a new cache cost ten times the copy (its fresh memory);
    # the selections generation makes move rows within the buffers allocated for the batch.
    torch.manual_seed(0)
    cache = KVCache(2, 6, 2, 10, 4, rows=4)
    k, v = torch.randn(2, 4, 2, 5, 4), torch.randn(2, 4, 2, 5, 4)
    for layer in range(2):
        cache.update(layer, k[layer], v[layer])
    cache.length = 5
    buffer = cache.k.data_ptr()
    cache.select(torch.tensor(rows))
    assert cache.k.shape[1] == cache.v.shape[1] == len(rows)
    assert torch.equal(cache.k[:, :, :, :5], k[:, rows]) and torch.equal(cache.v[:, :, :, :5],
                                                                        v[:, rows])
    assert (cache.k.data_ptr() == buffer) == in_place
    # Decoding goes on in the selected rows.
    step = torch.randn(len(rows), 2, 1, 4)
    got_k, _ = cache.update(1, step, step)
    assert torch.equal(got_k, torch.cat([k[1][rows], step], 2))


def record(modules: dict) -> dict:
    """Each named module's first input and output (the first of a tuple) at its next call."""
    seen = {}
    for key, m in modules.items():
        m.register_forward_hook(lambda m, args, out, key=key: seen.__setitem__(
            key, (args[0], out[0] if isinstance(out, tuple) else out)))
    return seen


@pytest.mark.parametrize("name", ["gpt1", "gpt2"])
def test_gpt_norms_sit_where_the_papers_put_them(name):
    """GPT-1, as the 2017 Transformer: x = norm(x + sublayer(x)), nothing after the last block.
    GPT-2: x = x + sublayer(norm(x)), and a norm after the last block."""
    torch.manual_seed(0)
    model = GPT(get_preset(name, n_layers=2, vocab_size=100, context=16, d_model=32,
                           n_heads=4, dropout=0.0)).eval()
    b = model.blocks[1]
    seen = record({"block": b, "attn_norm": b.attn_norm, "attn": b.attn,
                   "mlp_norm": b.mlp_norm, "mlp": b.mlp})
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1)))
    x, out = seen["block"]
    attn, mlp = seen["attn"][1], seen["mlp"][1]
    if name == "gpt1":
        assert torch.allclose(seen["attn_norm"][0], x + attn)
        assert torch.allclose(seen["mlp_norm"][0], seen["attn_norm"][1] + mlp)
        assert torch.equal(out, seen["mlp_norm"][1])
        assert isinstance(model.final_norm, torch.nn.Identity)
    else:
        assert torch.equal(seen["attn_norm"][0], x)
        assert torch.allclose(seen["mlp_norm"][0], x + attn)
        assert torch.allclose(out, x + attn + mlp)
        assert isinstance(model.final_norm, torch.nn.LayerNorm)


def test_transformer_norms_follow_each_residual_add():
    """Vaswani et al. §3.1: each sub-layer's output is LayerNorm(x + Sublayer(x)), in the
    encoder (self-attention, FFN) and the decoder (self-attention, cross attention, FFN)."""
    torch.manual_seed(0)
    model = Transformer(get_preset("transformer-base", n_encoder_layers=2, n_decoder_layers=2,
                                   vocab_size=60, context=16, d_model=32, n_heads=4, d_ff=64,
                                   dropout=0.0)).eval()
    e, d = model.encoder[1], model.decoder[1]
    seen = record({"enc": e, "e_attn": e.attn, "e_attn_norm": e.attn_norm, "e_mlp": e.mlp,
                   "e_mlp_norm": e.mlp_norm, "dec": d, "self": d.self_attn,
                   "self_norm": d.self_norm, "cross": d.cross_attn, "cross_norm": d.cross_norm,
                   "d_mlp": d.mlp, "d_mlp_norm": d.mlp_norm})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(torch.randint(0, 60, (2, 7), generator=g), torch.randint(0, 60, (2, 5), generator=g))
    x, out = seen["enc"]
    assert torch.allclose(seen["e_attn_norm"][0], x + seen["e_attn"][1])
    assert torch.allclose(seen["e_mlp_norm"][0], seen["e_attn_norm"][1] + seen["e_mlp"][1])
    assert torch.equal(out, seen["e_mlp_norm"][1])
    y, out = seen["dec"]
    assert torch.allclose(seen["self_norm"][0], y + seen["self"][1])
    assert torch.allclose(seen["cross_norm"][0], seen["self_norm"][1] + seen["cross"][1])
    assert torch.allclose(seen["d_mlp_norm"][0], seen["cross_norm"][1] + seen["d_mlp"][1])
    assert torch.equal(out, seen["d_mlp_norm"][1])
    assert torch.equal(seen["cross"][0], seen["self_norm"][1])  # Q from the decoder's stream
    assert isinstance(model.enc_norm, torch.nn.Identity)


def test_residual_projections_are_scaled_at_init_in_pre_norm_stacks_only():
    """GPT-2 §2.3: the residual layers' weights start at 0.02 / √N, N = 2 per block, since a
    pre-norm stream sums them unnormalised. GPT-1 §4.1 (post-norm, a norm after every add):
    N(0, 0.02) for every weight, the residual projections too."""
    def stds(name: str) -> list[float]:
        torch.manual_seed(0)
        model = GPT(get_preset(name, n_layers=8, vocab_size=100, context=16))
        return [round(model.blocks[0].attn.o_proj.weight.std().item(), 4),
                round(model.blocks[0].mlp.down.weight.std().item(), 4),
                round(model.blocks[0].attn.q_proj.weight.std().item(), 4)]
    assert stds("gpt2") == [0.005, 0.005, 0.02]  # 0.02 / √16
    assert stds("gpt1") == [0.02, 0.02, 0.02]


def test_gpt_drops_attention_weights_as_openais_gpt_does():
    """Unlike the 2017 Transformer, GPT-1/2 drop attention probabilities too (attn_pdrop): in
    training a first query's one weight is dropped (0) or kept at 1 / (1 - p) = 2."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50, context=16, n_layers=1, n_heads=2, d_model=16,
                        dropout=0.5)).train()
    ids = torch.randint(0, 50, (2, 8))
    _, (w,) = gpt.hidden_states(ids, need_weights=True)
    assert set(w[:, :, 0].sum(-1).flatten().tolist()) == {0.0, 2.0}
    assert not torch.allclose(w.sum(-1), torch.ones(2, 2, 8))
    _, (w,) = gpt.eval().hidden_states(ids, need_weights=True)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 8), atol=1e-6)


def test_greedy_decoding_stops_at_the_context():
    """Asked for more tokens than the context holds, it decoded the context's worth and then
    raised on the next position, the work thrown away; it stops there, as `generate` does."""
    model = small_transformer()  # context 32
    src = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(9))
    out = model.greedy_decode(src, bos_id=1, eos_id=-1, max_new_tokens=40)  # -1: never drawn
    assert out.shape == (2, 32)
    assert torch.equal(out[:, :10], model.greedy_decode(src, 1, -1, max_new_tokens=10))
    with torch.no_grad():  # the last token is the argmax after BOS and the 31 before it
        dec_in = torch.cat([torch.ones(2, 1, dtype=torch.long), out[:, :31]], 1)
        assert torch.equal(model(src, dec_in)[:, -1].argmax(-1), out[:, 31])


def test_greedy_decoding_stops_once_every_row_has_produced_eos():
    """Rows that produced EOS go on as EOS; decoding ends when the last row produces it."""
    torch.manual_seed(3)
    cfg = TransformerConfig(vocab_size=12, context=32, n_encoder_layers=1, n_decoder_layers=1,
                            n_heads=4, d_model=32, d_ff=64, dropout=0.0, tie_embeddings=False)
    model = Transformer(cfg).eval()  # untied: at init a tied one repeats its input token
    src = torch.randint(1, 12, (3, 6), generator=torch.Generator().manual_seed(10))
    free = model.greedy_decode(src, bos_id=1, eos_id=-1, max_new_tokens=12)  # never stops
    eos = int(free[1, 1])
    first = [row.tolist().index(eos) for row in free]  # each row's first EOS
    out = model.greedy_decode(src, bos_id=1, eos_id=eos, max_new_tokens=12)
    assert first == [5, 1, 5] and out.shape == (3, 6)
    for i, f in enumerate(first):
        assert torch.equal(out[i, :f + 1], free[i, :f + 1])
        assert (out[i, f + 1:] == eos).all()
    assert (free[1, 2:6] != eos).any()  # row 1 would have gone on otherwise


@pytest.mark.parametrize("n", [0, -1])
def test_greedy_decoding_refuses_fewer_than_one_token(n):
    """0 ended in torch.cat() of an empty list; -1 in a KV cache of negative length."""
    model = small_transformer()
    with pytest.raises(ValueError, match=f"max_new_tokens must be an integer of at least 1, "
                                         f"got {n}"):
        model.greedy_decode(torch.ones(1, 3, dtype=torch.long), 1, 2, max_new_tokens=n)


def test_a_sequence_longer_than_the_context_is_refused_also_after_a_cache():
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=32, context=8, n_layers=1, n_heads=2, d_model=16,
                        positions="rotary")).eval()
    assert net(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 32)  # exactly the context
    with pytest.raises(ValueError, match="sequence of 9 tokens exceeds the context of 8"):
        net(torch.zeros(1, 9, dtype=torch.long))
    cache = net.new_cache(1, 16)
    net(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="sequence of 9 tokens exceeds the context of 8"):
        net(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_a_padded_batch_longer_than_the_context_passes_while_each_row_fits_it():
    """Positions count real tokens: left-padded rows of 8 and 3 real tokens in 10 positions
    fit a context of 8, and each gets the logits it gets alone. A row of 9 is refused."""
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=32, context=8, n_layers=1, n_heads=2, d_model=16,
                        positions="learned")).eval()
    ids = torch.randint(1, 32, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0, 2:], mask[1, 7:] = 1, 1
    with torch.no_grad():
        logits = net(ids, attention_mask=mask)
        assert torch.allclose(logits[0, 2:], net(ids[:1, 2:])[0], atol=1e-5)
        assert torch.allclose(logits[1, 7:], net(ids[1:, 7:])[0], atol=1e-5)
    mask[0, 1] = 1
    with pytest.raises(ValueError, match="sequence of 9 tokens exceeds the context of 8"):
        net(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="sequence of 10 tokens exceeds"):  # ids say positions
        net(ids, attention_mask=mask, position_ids=torch.arange(10).expand(2, 10))



def test_a_padded_encoder_decoder_batch_wider_than_the_context_gives_each_row_its_own():
    """As GPT's: positions count real tokens, so a source or target batch wider than the
    context fits it where each row does, padded on the side its mask says; it was refused.
    Rows of 8 and 3 real tokens in 10 positions, a context of 8: each row's logits are its
    own alone, in a full forward and decoded with a cache. A row of 9 is refused."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=50, context=8, n_encoder_layers=1, n_decoder_layers=1,
                            n_heads=2, d_model=16, d_ff=32, dropout=0.0)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(3)
    src, tgt = (torch.randint(1, 50, (2, 10), generator=g) for _ in range(2))
    src_mask, tgt_mask = (torch.zeros(2, 10, dtype=torch.long) for _ in range(2))
    src_mask[0, 2:], src_mask[1, :3] = 1, 1  # left-, then right-padded
    tgt_mask[0, :8], tgt_mask[1, 6:] = 1, 1  # right-, then left-padded
    rows = [(slice(2, 10), slice(0, 8)), (slice(0, 3), slice(6, 10))]  # each row's real tokens
    with torch.no_grad():
        logits = model(src, tgt, src_mask, tgt_mask)
        memory, _ = model.encode(src, src_mask)
        cache = model.new_cache(2, 10)
        cached = torch.cat([model.decode(tgt[:, t:t + 1], memory, src_mask, tgt_mask[:, :t + 1],
                                         cache)[0] for t in range(10)], 1)
        for b, (s, t) in enumerate(rows):
            alone = model(src[b:b + 1, s], tgt[b:b + 1, t])[0]
            assert alone.abs().max().item() > 1.0
            assert (logits[b, t] - alone).abs().max().item() <= 1e-5
            assert (cached[b, t] - alone).abs().max().item() <= 1e-5
        for where in ("src", "tgt"):
            m = (src_mask if where == "src" else tgt_mask).clone()
            m[0] = 1
            m[0, 0] = 0  # 9 real tokens
            masks = (m, tgt_mask) if where == "src" else (src_mask, m)
            with pytest.raises(ValueError, match="sequence of 9 tokens exceeds the context of 8"):
                model(src, tgt, *masks)
        with pytest.raises(ValueError, match="sequence of 10 tokens exceeds the context of 8"):
            model(src, tgt[:, :8])  # no mask: every position is a token


# --- property: cached, padded decoding of any shape equals each row's full forward -----------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _decoding_case(draw):
    n_heads = draw(st.sampled_from([1, 2, 4, 8]))
    n_kv = draw(st.sampled_from([h for h in (1, 2, 4, 8) if n_heads % h == 0]))
    positions = draw(st.sampled_from(["learned", "sinusoidal", "rotary"]))
    cfg = dict(vocab_size=41, context=32, n_layers=draw(st.integers(1, 2)), n_heads=n_heads,
               n_kv_heads=n_kv, d_model=8 * n_heads, positions=positions,
               norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
               prenorm=draw(st.booleans()), activation=draw(st.sampled_from(["gelu", "swiglu"])))
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    rows = [draw(st.lists(st.integers(0, 40), min_size=n, max_size=n)) for n in lengths]
    # After the left-padded prompts, chunks of 1 to 3 new tokens per step, the same for all rows.
    chunks = draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    new = [[draw(st.lists(st.integers(0, 40), min_size=c, max_size=c)) for c in chunks]
           for _ in rows]
    return cfg, rows, new, draw(st.booleans()), draw(st.integers(0, 3))


@settings(deadline=None, derandomize=True, max_examples=60)
@given(_decoding_case())
def test_cached_decoding_of_a_left_padded_batch_equals_each_row_alone(case):
    cfg, rows, new, need_weights, seed = case
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg)).eval()
    P = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    steps = len(new[0])
    total = P + sum(len(c) for c in new[0])
    with torch.no_grad():
        cache = model.new_cache(len(rows), total)
        h, _ = model.hidden_states(ids, attention_mask=mask, cache=cache,
                                   need_weights=need_weights)
        outs = [h]
        for s in range(steps):
            chunk = torch.tensor([n[s] for n in new])
            mask = torch.cat([mask, torch.ones_like(chunk)], 1)
            h, _ = model.hidden_states(chunk, attention_mask=mask, cache=cache,
                                       need_weights=need_weights)
            outs.append(h)
        batched = torch.cat(outs, 1)
        for i, r in enumerate(rows):
            seq = r + [t for c in new[i] for t in c]
            alone, _ = model.hidden_states(torch.tensor([seq]))
            got = batched[i, P - len(r):]
            assert (got - alone[0]).abs().max().item() <= 1e-4, (i, cfg)


def test_a_kv_cache_refuses_more_rows_or_positions_than_it_was_allocated():
    cache = KVCache(1, 2, 1, 4, 2)
    with pytest.raises(ValueError, match=r"^3 rows do not fit a cache allocated for 2$"):
        cache.use_rows(3)
    cache.use_rows(1)
    assert cache.k.shape == (1, 1, 1, 4, 2)
    step = torch.ones(1, 1, 3, 2)
    k, _ = cache.update(0, step, step)
    assert k.shape == (1, 1, 3, 2)
    cache.length = 3
    with pytest.raises(ValueError, match=r"^KV cache full: 5 positions > 4$"):
        cache.update(0, step[:, :, :2], step[:, :, :2])
