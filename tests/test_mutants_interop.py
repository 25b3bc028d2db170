"""Hugging Face and GGUF interop against hand-written configs, metadata and tensors, where a
plausible slip passed every parity test (those write every field and tensor the way transformers
or llama.cpp do, so a default, a refusal or a rarely written layout went unseen): the defaults
a config.json or a GGUF leaves out, refusals of what does not map, llama.cpp's Q/K row order on
biases, the pre-tokenizers' digit splits, and what an export writes for transformers 4."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gptlab.errors import UserError
from gptlab.interop import export_hf, load_pretrained
from gptlab.interop.hf import hf_config_to_gpt
from gptlab.model.gpt import GPT, GPTConfig

gguf = pytest.importorskip("gguf")

CONFIG = Path("config.json")


class Field:
    """A GGUF metadata field as gguf's reader gives it."""

    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


def gguf_meta(**keys):
    from gptlab.interop.gguf import _Meta

    return _Meta(SimpleNamespace(fields={k: Field(v) for k, v in keys.items()}), Path("t.gguf"))


LLAMA_META = {"llama.embedding_length": 16, "llama.attention.head_count": 4,
              "llama.context_length": 32, "llama.block_count": 1,
              "llama.feed_forward_length": 24, "llama.attention.layer_norm_rms_epsilon": 0.25}


def gguf_config(tensors=("output.weight",), **keys):
    from gptlab.interop.gguf import _gguf_config

    return _gguf_config(gguf_meta(**{**LLAMA_META, **keys}), "llama", set(tensors), 40)


# --- GGUF metadata -------------------------------------------------------------------------------

def test_gguf_metadata_left_out_takes_llama_cpp_s_defaults_and_the_rest_is_read():
    """Every test GGUF writes rope.freq_base and head_count_kv: llama.cpp's defaults where they
    are absent (10000, as many key/value heads as query heads) went unseen, as did the norm
    epsilon read from the file, key_length as the head size, and the tensors that say tied
    embeddings and Q/K/V biases."""
    cfg = gguf_config()
    assert (cfg.rope_theta, cfg.kv_heads, cfg.norm_eps, cfg.vocab_size) == (10000.0, 4, 0.25, 40)
    assert (cfg.dim_head, cfg.tie_embeddings, cfg.qkv_bias) == (4, False, None)
    cfg = gguf_config(tensors=("blk.0.attn_q.bias",), **{"llama.attention.key_length": 8,
                                                        "llama.attention.head_count_kv": 2})
    assert (cfg.dim_head, cfg.kv_heads, cfg.tie_embeddings, cfg.qkv_bias) == (8, 2, True, True)


GPT2_META = {"gpt2.embedding_length": 16, "gpt2.attention.head_count": 4,
             "gpt2.context_length": 32, "gpt2.block_count": 1, "gpt2.feed_forward_length": 24,
             "gpt2.attention.layer_norm_epsilon": 0.25}


def test_gguf_gpt2_metadata_left_out_takes_llama_cpp_s_defaults():
    """A gpt2 GGUF without gpt2.vocab_size (llama.cpp counts the tokens) or head sizes: every
    test file wrote them, so a gpt2 that required vocab_size went unseen."""
    from gptlab.interop.gguf import _gguf_config

    cfg = _gguf_config(gguf_meta(**GPT2_META), "gpt2", {"output.weight"}, 40)
    assert (cfg.vocab_size, cfg.kv_heads, cfg.dim_head, cfg.norm_eps, cfg.tie_embeddings) == \
        (40, 4, 4, 0.25, False)
    assert (cfg.positions, cfg.norm, cfg.activation, cfg.bias, cfg.attention_scale) == \
        ("learned", "layernorm", "gelu_tanh", True, None)
    assert _gguf_config(gguf_meta(**GPT2_META), "gpt2", set(), 40).tie_embeddings


@pytest.mark.parametrize("keys, field, message", [
    ({"llama.rope.dimension_count": 2}, "llama.rope.dimension_count",
     "partial rotary embeddings are not supported"),
    ({"llama.rope.scaling.factor": 2.0}, "llama.rope.scaling.type",
     "rope scaling ('rope_freqs') is not supported"),
    ({"llama.rope.scaling.type": "linear"}, "llama.rope.scaling.type",
     "rope scaling ('linear') is not supported"),
    ({"llama.expert_count": 8}, "llama.expert_count",
     "mixture-of-experts models are not supported"),
])
def test_gguf_metadata_that_changes_the_function_is_refused_naming_the_key(keys, field, message):
    """A rotation over part of each head, a scaled rotation (by its factor alone, or a type
    other than yarn) and experts were loaded as a plain Llama without a word."""
    with pytest.raises(UserError) as e:
        gguf_config(**keys)
    assert str(e.value) == f"t.gguf, field '{field}': {message}"


@pytest.mark.parametrize("key", ["llama.attention.head_count_kv", "llama.context_length"])
def test_a_gguf_count_of_zero_is_refused_naming_the_key(key):
    """0 is no count: key/value heads of 0 divided by zero, a context of 0 was refused by
    gptlab's name for it (only negative counts were tested)."""
    with pytest.raises(UserError) as e:
        gguf_config(**{key: 0})
    assert str(e.value) == f"t.gguf, field '{key}': must be a positive integer, got 0"


@pytest.mark.parametrize("key", ["llama.attention.layer_norm_rms_epsilon",
                                 "llama.rope.freq_base"])
def test_a_gguf_epsilon_or_rope_base_of_zero_is_refused_naming_the_key(key):
    """0 is no epsilon (a norm that divides by zero on a zero row) and no rope base (0 to a
    positive power is 0, and rotary divides by it): refused naming the key, as negative ones
    were."""
    with pytest.raises(UserError) as e:
        gguf_config(**{key: 0.0})
    assert str(e.value) == f"t.gguf, field '{key}': must be a finite positive number, got 0.0"


def test_gguf_tensor_names_map_one_to_one():
    """A name with a part after weight/bias is no tensor gptlab has (it was taken as the block's
    weight), and gate and up are not swapped (SwiGLU computes silu(gate) * up)."""
    from gptlab.interop.gguf import _our_name

    assert _our_name("blk.3.ffn_gate.weight") == "blocks.3.mlp.gate.weight"
    assert _our_name("blk.3.ffn_up.bias") == "blocks.3.mlp.up.bias"
    assert _our_name("blk.0.attn_q.weight.lora_a") is None
    assert _our_name("blk.0.attn_q") is None


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's row order for Q and K (weights and biases): each head's rotary halves
    interleaved, rows (i, i + D/2) -> (2i, 2i + 1)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_q_k_rows_and_biases_are_put_back_for_llama_only(arch):
    """llama.cpp's converter permutes Q and K rows of a `llama` model, biases included (a Llama
    with attention biases), by query heads for Q and key/value heads for K; a `qwen2` model's
    rows are written as they are. Every parity test had no Llama-arch bias."""
    from gptlab.interop.gguf import _tensors

    heads, kv, D, d = 4, 2, 4, 16
    rng = np.random.default_rng(0)
    want = {"attn_q.weight": rng.standard_normal((heads * D, d)),
            "attn_q.bias": rng.standard_normal(heads * D),
            "attn_k.weight": rng.standard_normal((kv * D, d)),
            "attn_k.bias": rng.standard_normal(kv * D),
            "attn_v.bias": rng.standard_normal(kv * D)}
    F32 = gguf.GGMLQuantizationType.F32
    tensors = []
    for name, w in want.items():
        w = w.astype(np.float32)
        if arch == "llama" and name.startswith(("attn_q", "attn_k")):
            w = llama_cpp_permute(w, heads if name.startswith("attn_q") else kv)
        tensors.append(SimpleNamespace(name=f"blk.0.{name}", data=w, tensor_type=F32,
                                       shape=list(reversed(w.shape))))
    cfg = GPTConfig(vocab_size=8, context=8, n_layers=1, n_heads=heads, n_kv_heads=kv,
                    d_model=d, positions="rotary", norm="rmsnorm", activation="swiglu",
                    bias=False, qkv_bias=True)
    named, unused = _tensors(SimpleNamespace(tensors=tensors), gguf, cfg, arch, Path("t.gguf"),
                             torch.float64)
    assert unused == []
    for name, w in want.items():
        ours = "blocks.0.attn." + name.replace("attn_", "").replace(".", "_proj.")
        assert named[ours][0] == f"blk.0.{name}"
        assert torch.equal(named[ours][1], torch.from_numpy(w.astype(np.float32)).double()), name


def test_a_fused_attn_qkv_is_split_in_a_gguf_gpt2_alone():
    """llama.cpp's llama reads Q, K, V apart: an attn_qkv in a llama file is no tensor of its
    model (split as GPT-2's, its Q and K rows would not even be put back in rotary order)."""
    from gptlab.interop.gguf import _tensors

    w = np.arange(48 * 16, dtype=np.float32).reshape(48, 16)
    t = SimpleNamespace(name="blk.0.attn_qkv.weight", data=w,
                        tensor_type=gguf.GGMLQuantizationType.F32, shape=[16, 48])
    cfg = GPTConfig(vocab_size=8, context=8, n_layers=1, n_heads=4, d_model=16,
                    positions="rotary", norm="rmsnorm", activation="swiglu", bias=False)
    named, unused = _tensors(SimpleNamespace(tensors=[t]), gguf, cfg, "llama", Path("t.gguf"),
                             torch.float32)
    assert (named, unused) == ({}, ["blk.0.attn_qkv.weight"])
    cfg = GPTConfig(vocab_size=8, context=8, n_layers=1, n_heads=4, d_model=16)
    named, unused = _tensors(SimpleNamespace(tensors=[t]), gguf, cfg, "gpt2", Path("t.gguf"),
                             torch.float32)
    assert unused == []
    for i, p in enumerate("qkv"):
        assert torch.equal(named[f"blocks.0.attn.{p}_proj.weight"][1],
                           torch.from_numpy(w[16 * i:16 * (i + 1)])), p


# --- GGUF byte-level tokenizers ------------------------------------------------------------------

def byte_level_tokenizer(pre: str, merges: list[str]):
    from tokenizers import pre_tokenizers

    from gptlab.interop.gguf import _gguf_tokenizer

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += [a + b for a, b in (m.split(" ") for m in merges)] + ["<|endoftext|>"]
    meta = gguf_meta(**{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
                        "tokenizer.ggml.eos_token_id": len(tokens) - 1})
    tok = _gguf_tokenizer(meta)
    return lambda text: [tok.hf.id_to_token(i) for i in tok.encode(text)]


@pytest.mark.parametrize("template", [5, ["{{ messages }}"]])
def test_a_gguf_chat_template_that_is_no_string_is_refused_naming_the_key(template):
    """Not a string (a number, an array): refused naming the key, not kept as the template."""
    from tokenizers import pre_tokenizers

    from gptlab.interop.gguf import _gguf_tokenizer

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<|endoftext|>"]
    meta = gguf_meta(**{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
                        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
                        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
                        "tokenizer.chat_template": template})
    with pytest.raises(UserError) as e:
        _gguf_tokenizer(meta)
    assert str(e.value) == (f"t.gguf, field 'tokenizer.chat_template': must be a Jinja template "
                            f"string, got {template!r}")


DIGIT_MERGES = ["1 2", "12 3", "4 5", "i \u0120", "\u0120 t"]


@pytest.mark.parametrize("pre, pieces", [
    ("qwen2", ["1", "2", "3", "4", "5"]),     # Qwen2: every digit apart
    ("smollm", ["1", "2", "3", "4", "5"]),    # SmolLM: every digit apart, then GPT-2's split
    ("llama3", ["123", "45"]),                # Llama 3: runs of up to three digits
    ("gpt-2", ["123", "45"]),                 # GPT-2: a run of digits is one word
])
def test_gguf_pre_tokenizers_split_digits_as_llama_cpp_does(pre, pieces):
    """A digit split of \\p{N}{1,3} for Qwen2 (Llama 3's), SmolLM's digits not split off, or
    SmolLM's GPT-2 split dropped after them each encoded numbers into other ids than the model
    was trained on; no test GGUF had merges between digits or across a space."""
    encode = byte_level_tokenizer(pre, DIGIT_MERGES)
    assert encode("12345") == pieces
    # A word and the space before the next stay apart (no "iĠ" across the word's end).
    assert encode("hi there")[:3] == ["h", "i", "\u0120t"]


# --- Hugging Face config.json --------------------------------------------------------------------

GPT2 = {"model_type": "gpt2", "vocab_size": 32, "n_embd": 16, "n_head": 4, "n_layer": 1}
LLAMA = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "num_attention_heads": 4,
         "num_hidden_layers": 2, "intermediate_size": 24}


def test_hf_config_fields_left_out_take_transformers_defaults():
    """transformers' save_pretrained writes every field, so no parity test saw a default:
    GPT-2's 1024 positions, epsilon 1e-5, tied embeddings and gelu_new (tanh); Llama's 2048
    positions, epsilon 1e-6, untied embeddings, as many key/value heads as query heads."""
    cfg = hf_config_to_gpt(GPT2, CONFIG)
    assert (cfg.context, cfg.norm_eps, cfg.tie_embeddings, cfg.activation) == \
        (1024, 1e-5, True, "gelu_tanh")
    cfg = hf_config_to_gpt(LLAMA, CONFIG)
    assert (cfg.context, cfg.norm_eps, cfg.tie_embeddings, cfg.kv_heads, cfg.rope_theta) == \
        (2048, 1e-6, False, 4, 10000.0)


@pytest.mark.parametrize("layers, window_layers, local", [
    (2, None, None),       # transformers' max_window_layers default 28: no layer of 2 slides
    (30, None, [28, 29]),  # layers 28 and 29 slide
    (2, 2, None), (2, 1, [1]), (2, 0, "all")])
def test_qwen2_layers_slide_from_max_window_layers_on(layers, window_layers, local):
    """Without layer_types a Qwen2 layer slides from max_window_layers on (default 28): those
    layers, and those alone, are local."""
    cfg = {**LLAMA, "model_type": "qwen2", "num_hidden_layers": layers, "use_sliding_window": True,
           "sliding_window": 8, "max_position_embeddings": 64}
    if window_layers is not None:
        cfg["max_window_layers"] = window_layers
    out = hf_config_to_gpt(cfg, CONFIG)
    if local is None:
        assert out.attention_window is None
    else:
        assert (out.attention_window, out.local_attention_layers) == (8, local)


@pytest.mark.parametrize("config, field, message", [
    ({**GPT2, "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx",
     "scale_attn_by_inverse_layer_idx=True divides layer i's QKᵀ by i + 1 too, and gptlab has "
     "one attention_scale for every layer: it does not map"),
    ({**GPT2, "add_cross_attention": True}, "add_cross_attention",
     "add_cross_attention=True changes the attention and does not map to gptlab"),
    ({**GPT2, "scale_attn_weights": "false"}, "scale_attn_weights",
     "must be true or false, got 'false'"),
    ({**LLAMA, "partial_rotary_factor": 0.5}, "partial_rotary_factor",
     "partial rotary embeddings are not supported"),
    ({**LLAMA, "mlp_bias": True}, "attention_bias",
     "attention_bias=False with mlp_bias=True does not map (gptlab puts biases on all linear "
     "layers or on none)"),
    ({**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling",
     "rope scaling 'linear' is not supported (only plain rotary positions map to gptlab)"),
])
def test_hf_configs_that_change_the_function_are_refused_naming_the_field(config, field, message):
    """A rotation over half of each head, biases on the MLP alone and a linearly scaled
    rotation each loaded as the plain model (the refusal tests used the other side of each:
    attention_bias alone, llama3 and yarn scaling). GPT-2's attention scaled per layer and its
    cross-attention are refused too, and a scale_attn_weights that is not true or false (it
    says attention_scale 1 where false) is not read as its truth."""
    with pytest.raises(UserError) as e:
        hf_config_to_gpt(config, CONFIG)
    assert str(e.value) == f"config.json, field '{field}': {message}"


def test_a_llama_config_reads_no_sliding_window_whatever_its_fields_say():
    """transformers' Llama attends over the whole context: Qwen2's use_sliding_window and
    max_window_layers in a Llama config.json give it no window (read as Qwen2's, every layer
    slid)."""
    cfg = hf_config_to_gpt({**LLAMA, "use_sliding_window": True, "sliding_window": 8,
                            "max_window_layers": 0, "max_position_embeddings": 64}, CONFIG)
    assert (cfg.attention_window, cfg.local_attention_layers) == (None, "all")


def test_a_head_dim_of_the_width_over_the_heads_is_left_unset():
    """head_dim is set only where it is not hidden_size / num_attention_heads, as gptlab's own
    configs leave it (the converted config.json said head_dim 4 for every model)."""
    assert hf_config_to_gpt(LLAMA, CONFIG).head_dim is None
    assert hf_config_to_gpt({**LLAMA, "head_dim": 4}, CONFIG).head_dim is None
    assert hf_config_to_gpt({**LLAMA, "head_dim": 8}, CONFIG).head_dim == 8


def test_a_width_the_query_heads_do_not_split_is_refused_though_the_kv_heads_do():
    """hidden_size 18 over 4 query heads (2 key/value heads, which do split it) without a
    head_dim: the test that refused it left out num_key_value_heads, so that a check of the
    width against the key/value heads went unseen."""
    with pytest.raises(UserError) as e:
        hf_config_to_gpt({**LLAMA, "hidden_size": 18, "num_key_value_heads": 2}, CONFIG)
    assert str(e.value) == ("config.json, field 'num_attention_heads': hidden_size 18 is not "
                            "divisible by num_attention_heads 4")


def test_a_config_is_checked_field_by_field_before_it_is_returned():
    """A size past any float (10**400) passes the config.json field's own check: gptlab's
    check of the whole config refuses it, before a model is built (load_pretrained refused it
    later, when building failed, so no test saw the check go)."""
    with pytest.raises(UserError) as e:
        hf_config_to_gpt({**LLAMA, "intermediate_size": 10**400}, CONFIG)
    # named as config.json names it (it named gptlab's field, d_ff, which the file lacks)
    assert str(e.value) == ("config.json, field 'intermediate_size': must be a finite number, "
                            "got an integer of 401 digits")
    gpt2 = {"model_type": "gpt2", "vocab_size": 32, "n_embd": 16, "n_head": 4, "n_layer": 2,
            "n_inner": 10**400}
    with pytest.raises(UserError, match="field 'n_inner': must be a finite number"):
        hf_config_to_gpt(gpt2, CONFIG)


# --- Hugging Face weights ------------------------------------------------------------------------

def exported_with(tmp_path: Path, cfg: GPTConfig, extra: dict) -> tuple[GPT, Path]:
    """A random gptlab model and its Hugging Face export, with `extra` tensors (name -> a
    function of the exported state) added to model.safetensors, as other writers leave them."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = GPT(cfg).eval()
    out = export_hf(model, None, tmp_path / "hf")
    sd = load_file(str(out / "model.safetensors"))
    sd.update({name: make(sd).clone() for name, make in extra.items()})
    save_file(sd, str(out / "model.safetensors"))
    return model, out


@pytest.mark.parametrize("cfg, extra", [
    # Older GPT-2 checkpoints (openai-community/gpt2's own) carry lm_head.weight beside the
    # tied wte: the embedding again.
    (GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=2, d_model=16),
     {"lm_head.weight": lambda sd: sd["transformer.wte.weight"]}),
    # GPT-2's causal-mask buffers (attn.bias, attn.masked_bias) some checkpoints carry.
    (GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=2, d_model=16),
     {"transformer.h.0.attn.bias": lambda sd: torch.ones(1, 1, 16, 16).tril(),
      "transformer.h.0.attn.masked_bias": lambda sd: torch.tensor(-1e4)}),
    # transformers before 4.31 saved each Llama layer's rotary inv_freq buffer: recomputed.
    (GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=2, d_model=16,
               positions="rotary", norm="rmsnorm", activation="swiglu", bias=False),
     {"model.layers.0.self_attn.rotary_emb.inv_freq": lambda sd: 1.0 / 10000 ** (
         torch.arange(0, 8, 2) / 8)})])
def test_tensors_that_are_no_weights_load_without_a_word(tmp_path, cfg, extra):
    """A tied GPT-2's lm_head.weight and a Llama's rotary inv_freq are read past, not refused as
    tensors that do not map (gptlab's and transformers' exports write neither)."""
    model, out = exported_with(tmp_path, cfg, extra)
    again, _ = load_pretrained(out)
    x = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    # Tied stays tied (one Parameter, as fine-tuning needs): load_state_dict(assign=True) had
    # put two in its place, equal until the first step.
    assert (again.lm_head.weight is again.tok_emb.weight) is cfg.tie_embeddings


LLAMA_GPT = GPTConfig(vocab_size=32, context=16, n_layers=2, n_heads=2, d_model=16,
                      positions="rotary", norm="rmsnorm", activation="swiglu", bias=False)


@pytest.mark.parametrize("cfg, name, shape, style", [
    (LLAMA_GPT, "model.layers.0.mlp.lora_A.weight", (2, 16), "Llama"),
    # A vector is no causal mask: a bias by that name is not read past as GPT-2's buffer.
    (GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=2, d_model=16),
     "transformer.h.0.attn.bias", (48,), "GPT-2")])
def test_a_tensor_that_maps_nowhere_is_refused_naming_it(tmp_path, cfg, name, shape, style):
    """A tensor of a name no Llama has (an adapter's, a head's) was dropped without a word, and
    the model loaded as if the checkpoint held nothing else."""
    _, out = exported_with(tmp_path, cfg, {name: lambda sd: torch.zeros(shape)})
    with pytest.raises(UserError) as e:
        load_pretrained(out)
    assert str(e.value) == f"{out}: 1 tensor(s) do not map to gptlab's {style}-style model: {name}"


def test_a_reward_model_reads_its_score_bias_where_the_checkpoint_has_one(tmp_path):
    """transformers' score layer has no bias, but a checkpoint that carries one (trained
    elsewhere) scores with it: the head's bias was left 0 (every test classifier had none)."""
    _, out = exported_with(tmp_path, LLAMA_GPT, {
        "score.weight": lambda sd: torch.full((1, 16), 0.25),
        "score.bias": lambda sd: torch.tensor([0.75])})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(
        {**config, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1}))
    rm, _ = load_pretrained(out)
    assert (rm.head.bias.tolist(), rm.head.weight.unique().tolist()) == ([0.75], [0.25])


def test_a_checkpoint_of_as_many_tensors_as_layers_names_the_first_missing_one(tmp_path):
    """Two layers and two tensors (the embedding and the final norm): one a layer is not fewer
    than one a layer, so the missing tensor is named (it was said to be fewer)."""
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    save_file({"model.embed_tokens.weight": torch.zeros(32, 16),
               "model.norm.weight": torch.ones(16)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as e:
        load_pretrained(tmp_path)
    assert str(e.value) == (f"{tmp_path}: tensor model.layers.0.input_layernorm.weight is "
                            f"missing from the checkpoint (gptlab's blocks.0.attn_norm.weight "
                            f"is read from it)")


def test_a_tied_models_lm_head_in_its_checkpoint_is_no_weight_of_its_own(tmp_path):
    """A tied Llama whose checkpoint holds lm_head.weight beside the embedding: the head is the
    embedding, so the tensor is read past and not counted among the weights (counted, three
    layers and the embedding, norm and head passed the one-a-layer check, and the error named a
    missing tensor where it should have said the config does not describe the checkpoint)."""
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(
        {**LLAMA, "num_hidden_layers": 3, "tie_word_embeddings": True}))
    save_file({"model.embed_tokens.weight": torch.zeros(32, 16),
               "model.norm.weight": torch.ones(16), "lm_head.weight": torch.zeros(32, 16)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as e:
        load_pretrained(tmp_path)
    assert str(e.value) == (f"{tmp_path}: the config has 3 layers, but the checkpoint holds 2 "
                            f"tensors, fewer than one per layer: the config does not describe "
                            f"these weights")


# --- export ---------------------------------------------------------------------------------------

def test_a_llama_export_writes_its_context_and_rope_theta_where_transformers_4_reads_them(
        tmp_path):
    """transformers 5 reads rope_parameters, 4 the top-level rope_theta: writing 10000 in
    either passed the parity tests (run with one version); and no test read
    max_position_embeddings back."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, context=48, n_layers=1, n_heads=2, d_model=16,
                          positions="rotary", norm="rmsnorm", activation="swiglu", bias=False,
                          rope_theta=1234.0))
    config = json.loads((export_hf(model, None, tmp_path) / "config.json").read_text())
    assert (config["rope_theta"], config["rope_parameters"]["rope_theta"]) == (1234.0, 1234.0)
    assert config["max_position_embeddings"] == 48


def test_a_gpt2_style_model_with_its_own_head_dim_is_refused_by_export(tmp_path):
    """GPT2's c_attn has n_embd columns per Q, K, V: 2 heads of 4 in a width of 16 do not
    export as GPT2 (the refusal was tested with grouped-query heads alone)."""
    model = GPT(GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=2, d_model=16,
                          head_dim=4))
    with pytest.raises(UserError) as e:
        export_hf(model, None, tmp_path / "hf")
    assert str(e.value) == ("this model does not map to a Hugging Face architecture: "
                            "grouped-query attention or a custom head_dim (GPT2 has neither)")
    assert not (tmp_path / "hf").exists()


def test_a_llama_style_model_with_biases_but_none_on_q_k_v_is_refused_by_export(tmp_path):
    """Llama's attention_bias puts biases on Q, K, V and O together, Qwen2 on Q, K, V alone:
    biases everywhere but Q, K, V is neither (it exported as a Llama whose Q, K, V biases
    transformers would have to make up)."""
    model = GPT(GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=2, d_model=16,
                          positions="rotary", norm="rmsnorm", activation="swiglu", bias=True,
                          qkv_bias=False))
    with pytest.raises(UserError) as e:
        export_hf(model, None, tmp_path / "hf")
    assert str(e.value) == ("this model does not map to a Hugging Face architecture: "
                            "bias=True with qkv_bias=False (neither Llama nor Qwen2)")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("positions, norm, activation", [("learned", "layernorm", "gelu_tanh"),
                                                         ("rotary", "rmsnorm", "swiglu")])
def test_an_untied_model_exports_untied_and_loads_back_the_same(tmp_path, positions, norm,
                                                               activation):
    """tie_word_embeddings false where the LM head is its own: written true, the export's
    lm_head.weight was read past and the embedding scored the tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=2, d_model=16,
                          positions=positions, norm=norm, activation=activation,
                          tie_embeddings=False)).eval()
    out = export_hf(model, None, tmp_path)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    again, _ = load_pretrained(out)
    x = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("heads, qkv_bias, model_type, written", [
    (2, False, "gpt_neo", {}), (2, None, "gpt2", {"scale_attn_weights": False}),
    (16, False, "gpt_neo", {})])  # d_head 1: the default is 1 too, and 1 is GPT-Neo's
def test_an_attention_scale_of_1_s_float32_exports_as_1(tmp_path, heads, qkv_bias, model_type,
                                                         written):
    """1 + 2⁻⁵² is 1 in float32, as attention computes with it: GPT-Neo (no Q/K/V biases) or
    GPT2 with scale_attn_weights false, read back as 1.0 (the parity test's scales were 1 or
    the default's float32 neighbours, so a double compare of 1 went unseen), at d_head 1 too
    (where 1 is the default's float32 as well)."""
    near = math.nextafter(1.0, 2.0)
    assert np.float32(near) == 1.0
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=heads, d_model=16,
                          qkv_bias=qkv_bias, attention_scale=near)).eval()
    out = export_hf(model, None, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type
    assert {k: config[k] for k in written} == written
    again, _ = load_pretrained(out)
    assert again.config.attention_scale == 1.0
    x = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_a_gpt2_shaped_model_without_q_k_v_biases_at_the_default_scale_is_refused(tmp_path):
    """Neither GPT2 (Q/K/V biases) nor GPT-Neo (QKᵀ undivided) computes it."""
    model = GPT(GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=2, d_model=16,
                          qkv_bias=False))
    with pytest.raises(UserError, match=r"qkv_bias=False \(GPT2 needs True\)"):
        export_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_attention_layers_beside_a_huge_attention_types_are_read_without_expanding_it(capsys):
    """attention_types that expand to another count than num_layers are not listed to be
    compared with attention_layers (2·10⁶ pairs: 32 MB; 10³⁰ would never end)."""
    import tracemalloc

    cfg = {"model_type": "gpt_neo", "vocab_size": 32, "hidden_size": 16, "num_heads": 4,
           "num_layers": 2, "attention_types": [[["global", "local"], 2 * 10**6]],
           "attention_layers": ["local", "global"], "window_size": 4,
           "max_position_embeddings": 16}
    tracemalloc.start()
    try:
        out = hf_config_to_gpt(cfg, CONFIG)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (out.attention_window, out.local_attention_layers) == (4, "even")  # layer 0
    assert peak < 4 * 2**20
    assert "does not list what attention_types expands to" in capsys.readouterr().err


def test_a_gpt2_export_names_its_activation_as_gpt2_s_own_config_does(tmp_path):
    """gelu_tanh is written as gelu_new, GPT-2's own config.json's name, which every GPT-2
    reader knows (gelu_pytorch_tanh, the same function to transformers, passed the parity
    tests unseen; readers that know only GPT-2's names refuse it)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=2, d_model=16))
    assert model.config.activation == "gelu_tanh"
    config = json.loads((export_hf(model, None, tmp_path) / "config.json").read_text())
    assert config["activation_function"] == "gelu_new"


def test_an_export_writes_the_dtype_of_its_weights(tmp_path):
    """torch_dtype says what the weights are (from_pretrained(torch_dtype="auto") loads them
    so): a bfloat16 model's export said float32, every parity test's was float32."""
    model = GPT(GPTConfig(vocab_size=32, context=16, n_layers=1, n_heads=2, d_model=16))
    config = json.loads((export_hf(model.to(torch.bfloat16), None, tmp_path) / "config.json")
                        .read_text())
    assert config["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("base, field", [(GPT2, "layer_norm_epsilon"), (LLAMA, "rms_norm_eps")])
def test_an_epsilon_of_zero_is_refused_naming_it(base, field):
    """An epsilon must be positive: 0 passed (only a negative one was tested)."""
    with pytest.raises(UserError) as e:
        hf_config_to_gpt({**base, field: 0}, CONFIG)
    assert str(e.value) == f"config.json, field '{field}': must be a finite positive number, got 0"



# --- tokenizer.json ------------------------------------------------------------------------------

@pytest.mark.parametrize("template, starts", [("$A <|endoftext|>", False),
                                              ("<|endoftext|> $A", True)])
def test_bos_first_means_a_post_processor_that_prepends_it_not_one_that_appends_it(
        tmp_path, template, starts):
    """GPT-2's BOS is its EOS: a tokenizer.json whose post-processor appends <|endoftext|> does
    not start sequences with it (a check for the token anywhere in encode("") said it did, and
    every prompt got a BOS the model never saw first)."""
    from tokenizers import AddedToken, Tokenizer, models, processors

    from gptlab.interop.hf import load_hf_tokenizer
    from gptlab.tokenizer import starts_with

    hf = Tokenizer(models.WordLevel({"hi": 0, "<|endoftext|>": 1}, unk_token="hi"))
    hf.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    hf.post_processor = processors.TemplateProcessing(single=template,
                                                      special_tokens=[("<|endoftext|>", 1)])
    assert starts_with(hf, "<|endoftext|>") is starts
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    tok = load_hf_tokenizer(tmp_path)
    assert tok.add_bos is starts and tok.encode("hi", bos=True) == [1, 0][1 - starts:]


def test_a_tokenizer_without_bos_adds_none_whatever_its_config_leaves_out(tmp_path):
    """A tokenizer_config.json that names no bos_token (Qwen2's) and leaves add_bos_token out:
    no BOS first, read without asking the post-processor for a token of no name (a TypeError)."""
    from tokenizers import AddedToken, Tokenizer, models

    from gptlab.interop.hf import load_hf_tokenizer

    hf = Tokenizer(models.WordLevel({"hi": 0, "<|endoftext|>": 1}, unk_token="hi"))
    hf.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = load_hf_tokenizer(tmp_path)
    assert (tok.add_bos, tok.bos_id, tok.encode("hi", bos=True)) == (False, None, [0])


@pytest.mark.parametrize("add_bos", [True, False])
def test_add_bos_token_says_whether_bos_comes_first_where_the_post_processor_adds_none(
        tmp_path, add_bos):
    """tokenizer_config's add_bos_token is read as written where tokenizer.json has no
    post-processor (gptlab's early exports): true was read as the post-processor's "no"."""
    from tokenizers import AddedToken, Tokenizer, models

    from gptlab.interop.hf import load_hf_tokenizer

    hf = Tokenizer(models.WordLevel({"hi": 0, "<s>": 1, "</s>": 2}, unk_token="hi"))
    hf.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>")])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": add_bos}))
    tok = load_hf_tokenizer(tmp_path)
    assert (tok.add_bos, tok.encode("hi", bos=True)) == (add_bos, [1, 0] if add_bos else [0])


def test_of_named_chat_templates_the_one_named_default_is_read_wherever_it_stands(tmp_path):
    """HF's list of named templates: "default" is the chat template, as transformers takes it,
    not the first listed (a tool-use template listed first was taken for it unseen)."""
    from gptlab.tokenizer import _chat_template

    config = {"chat_template": [{"name": "tool_use", "template": "{{ tools }}"},
                                {"name": "default", "template": "{{ messages }}"}]}
    template, source = _chat_template(config, tmp_path / "tokenizer_config.json")
    assert (template, source) == ("{{ messages }}", tmp_path / "tokenizer_config.json")
