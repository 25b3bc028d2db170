"""GPT-3's alternating dense and local attention against transformers' GPTNeoForCausalLM, the
GPT-3 replication whose layers alternate "global" and "local" (a band of window_size tokens).

GPT-Neo does not divide QKᵀ by √d_head: the same model in gptlab has `attention_scale` 1 (and
no biases on Q, K, V: qkv_bias=False); every weight is copied as it is. Multiplying the Q
projection by √d_head instead computes the same (exactly, at d_head 16, a power of two)."""
from __future__ import annotations

import math

import pytest
import torch

from gptlab.model.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

LAYERS, HEADS, D, WINDOW, CONTEXT, VOCAB = 4, 2, 32, 5, 64, 96


def neo(seed: int = 0) -> torch.nn.Module:
    """A tiny GPT-Neo, layers global, local, global, local; every weight random (biases and
    norm gains too), so no mapping mistake hides behind a zero or a one."""
    cfg = transformers.GPTNeoConfig(
        vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_size=D, num_layers=LAYERS,
        num_heads=HEADS, attention_types=[[["global", "local"], LAYERS // 2]],
        window_size=WINDOW, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.GPTNeoForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if ".ln_" in name and name.endswith("weight")
                    else 0.2 * noise)
    return model.eval()


def as_gptlab(model: torch.nn.Module, q_times: float = 1.0, **overrides) -> GPT:
    """The gptlab GPT of GPT-Neo `model`: its weights (Q's multiplied by `q_times`)."""
    cfg = GPTConfig(vocab_size=VOCAB, context=CONTEXT, n_layers=LAYERS, n_heads=HEADS,
                    d_model=D, positions="learned", norm="layernorm", norm_eps=1e-5,
                    prenorm=True, activation="gelu_tanh", bias=True, qkv_bias=False,
                    tie_embeddings=True, attention_window=WINDOW, local_attention_layers="odd",
                    attention_scale=1.0)
    cfg = GPTConfig(**{**cfg.__dict__, **overrides})
    ours = GPT(cfg).eval()
    theirs = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    names = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight",
             "ln_f.weight": "final_norm.weight", "ln_f.bias": "final_norm.bias"}
    for i in range(LAYERS):
        for src, dst in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm"), ("mlp.c_fc", "mlp.up"),
                         ("mlp.c_proj", "mlp.down"), ("attn.attention.out_proj", "attn.o_proj")):
            for p in ("weight", "bias"):
                names[f"h.{i}.{src}.{p}"] = f"blocks.{i}.{dst}.{p}"
        for x in "qkv":
            names[f"h.{i}.attn.attention.{x}_proj.weight"] = f"blocks.{i}.attn.{x}_proj.weight"
    state = {dst: theirs[src] for src, dst in names.items()}
    for i in range(LAYERS):
        state[f"blocks.{i}.attn.q_proj.weight"] = state[f"blocks.{i}.attn.q_proj.weight"] \
            * q_times
    state["lm_head.weight"] = state["tok_emb.weight"]
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    return ours


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_gpt_neo_layers_alternate_global_and_local_as_gptlabs_odd_layers():
    model = neo()
    types = [block.attn.attention_type for block in model.transformer.h]
    ours = as_gptlab(model).config
    assert types == ["global", "local", "global", "local"]
    assert [ours.is_local(i) for i in range(LAYERS)] == [t == "local" for t in types]


def test_logits_equal_gpt_neos_with_a_window_shorter_than_the_sequence():
    model = neo()
    ours = as_gptlab(model)
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model(ids).logits
        assert relative(ours(ids), theirs) <= 1e-5
        h, weights = ours.hidden_states(ids, need_weights=True)  # the explicit-math path
        assert relative(ours.lm_head(h), theirs) <= 1e-5
        # What the band and the scale each change: both are needed for the match.
        assert relative(as_gptlab(model, attention_window=None)(ids), theirs) > 1e-2
        assert relative(as_gptlab(model, attention_scale=None)(ids), theirs) > 1e-2
        # The default scale 1/√d_head on Q multiplied by √d_head (4: exact) is the same model.
        by_q = as_gptlab(model, math.sqrt(D // HEADS), attention_scale=None)
        assert relative(by_q(ids), theirs) <= 1e-5
        assert relative(by_q(ids), ours(ids)) <= 1e-6
    # A local layer's query sees its WINDOW latest tokens, itself included; a global one all.
    assert (weights[1][:, :, 20, :16] == 0).all() and (weights[1][:, :, 20, 16:21] > 0).all()
    assert (weights[0][:, :, 20, :21] > 0).all()


def test_left_padded_logits_equal_gpt_neos_given_the_same_positions():
    """GPT-Neo reads positions from `position_ids` (it counts padding otherwise); its band
    counts sequence places, which under left padding are the real tokens' distances."""
    model = neo(2)
    ours = as_gptlab(model)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, VOCAB, (n,), generator=g) for n in (17, 9, 12)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = model(ids, attention_mask=mask, position_ids=positions).logits
        mine = ours(ids, attention_mask=mask)
    for i, r in enumerate(rows):
        assert relative(mine[i, T - len(r):], theirs[i, T - len(r):]) <= 1e-5


def test_greedy_generation_past_the_window_equals_gpt_neos(monkeypatch):
    """gptlab's generate, whose local layers keep their 5 latest positions alone, against
    transformers' generate with its own cache: left-padded rows of 9, 3 and 7 tokens, 4 windows
    of new tokens; the same tokens, and each one's log-probability that of GPT-Neo's logits
    over the whole sequence."""
    from gptlab.engine import SamplingParams, generate
    model = neo(4)
    ours = as_gptlab(model)
    made, new_cache = [], ours.new_cache
    monkeypatch.setattr(ours, "new_cache", lambda *a, **kw: made.append(new_cache(*a, **kw))
                        or made[-1])
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (9, 3, 7)]
    out = generate(ours, prompts, SamplingParams(max_new_tokens=4 * WINDOW, greedy=True))
    assert made[0].wk.shape[0] == LAYERS // 2 and made[0].wk.shape[3] == WINDOW
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = (ids != 0).long()
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                              max_new_tokens=4 * WINDOW)
    assert out.tokens == want[:, P:].tolist()
    for p, toks, logprobs in zip(prompts, out.tokens, out.logprobs):
        with torch.no_grad():
            logp = model(torch.tensor([p + toks])).logits[0, len(p) - 1:-1].log_softmax(-1)
        assert max(abs(logp[t, tok].item() - lp) for t, (tok, lp)
                   in enumerate(zip(toks, logprobs))) <= 1e-5
