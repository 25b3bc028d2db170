"""Hugging Face model directories in and out: GPT-2, GPT-Neo and the Llama family (Llama,
Mistral, Qwen2, SmolLM).

Import needs only safetensors and tokenizers (core dependencies): a directory is config.json,
one or more *.safetensors files (sharded ones listed in model.safetensors.index.json),
tokenizer.json and tokenizer_config.json (and special_tokens_map.json, generation_config.json:
`gptlab.tokenizer.load_tokenizer` says what it reads). Export writes the same layout (GPT2,
GPT-Neo, Llama, Mistral or Qwen2), which `transformers.AutoModelForCausalLM.from_pretrained`
loads. A one-label `*ForSequenceClassification` directory imports as a reward model
(ScalarHeadModel).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from gptlab.checkpoint import check_config, check_pad_token_id, refuse_non_finite
from gptlab.errors import UserError, WrongKind, check_bool, reports_path_errors
from gptlab.io import (atomic_path, ensure_dir, missing_dirs, old_files_aside, read_json,
                       strict_json, write_json_atomic, write_text_atomic)
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.model.heads import ScalarHeadModel

SUPPORTED_HF = ("gpt2", "gpt_neo", "llama", "mistral", "qwen2")
# Source name -> tensor, with the source name kept for error messages.
Named = dict[str, tuple[str, Tensor]]


# --- config ----------------------------------------------------------------------------------

_MISSING = object()


def _value(cfg: dict, key: str, path: Path, default: Any) -> Any:
    if key in cfg:
        return cfg[key]
    if default is _MISSING:
        raise UserError("required field is missing", path=path, field=key)
    return default


def _count(cfg: dict, key: str, path: Path, default: Any = _MISSING) -> Any:
    """A positive integer field (None allowed only where `default` is None)."""
    v = _value(cfg, key, path, default)
    if v is None and default is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UserError(f"must be a positive integer, got {v!r}", path=path, field=key)
    return v


def _positive(cfg: dict, key: str, path: Path, default: Any = _MISSING) -> float:
    """A finite positive number field (epsilons, rope theta)."""
    v = _value(cfg, key, path, default)
    huge = isinstance(v, int) and abs(v) > sys.float_info.max  # math.isfinite(10**400) raised
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0 or huge \
            or not math.isfinite(v):
        shown = f"an integer of {len(str(v))} digits" if huge else repr(v)
        raise UserError(f"must be a finite positive number, got {shown}", path=path, field=key)
    return float(v)


def _flag(cfg: dict, key: str, path: Path, default: bool) -> bool:
    return check_bool(_value(cfg, key, path, default), key, path)


def check_heads(d: int, h: int, kv: int, head_dim_set: bool, path: Path,
                keys: tuple[str, str, str]) -> None:
    """Refuse a width that the heads do not split (without an explicit head_dim) and
    key/value heads that do not divide the query heads; `keys` name width, heads, kv heads."""
    width, heads, kv_heads = keys
    if not head_dim_set and d % h:
        raise UserError(f"{width} {d} is not divisible by {heads} {h}", path=path, field=heads)
    if h % kv:
        raise UserError(f"{heads} {h} is not a multiple of {kv_heads} {kv}", path=path,
                        field=kv_heads)


def _rope_theta(cfg: dict, path: Path) -> float:
    """rope theta as transformers 5 reads it: `rope_scaling` (transformers 4's name), where set,
    stands for `rope_parameters`; that object's rope_theta comes first, then the top-level one,
    then 10000. Any scaling changes the rotation, and so may parameters per layer type: both
    are refused."""
    for key in ("rope_parameters", "rope_scaling"):
        d = cfg.get(key) or {}
        if not isinstance(d, dict):
            raise UserError(f"expected an object, got {d!r}", path=path, field=key)
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in (None, "default"):
            raise UserError(f"rope scaling '{kind}' is not supported (only plain rotary "
                            f"positions map to gptlab)", path=path, field=key)
        nested = [k for k, v in d.items() if isinstance(v, dict)]
        if nested:
            raise UserError(f"rope parameters per layer type ({', '.join(nested)}) are not "
                            f"supported (one rotation for every layer maps to gptlab)",
                            path=path, field=f"{key}.{nested[0]}")
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    params = cfg.get(key) or {}
    if "rope_theta" in params:
        used = f"{key}.rope_theta"
        try:
            theta = _positive(params, "rope_theta", path)
        except UserError as e:
            raise UserError(e.message, path=path, field=used) from None
    else:
        used, theta = "rope_theta", _positive(cfg, "rope_theta", path, 10000.0)
    _note_other_thetas(cfg, path, used, theta)
    return theta


def _note_other_thetas(cfg: dict, path: Path, used: str, theta: float) -> None:
    """A config may give rope theta in two or three places; transformers 4 reads the top-level
    one alone, 5 the one `_rope_theta` takes. Where they disagree the two compute different
    rotations from the same file: say which value gptlab took."""
    from gptlab.tokenizer import note_once

    given = {"rope_theta": cfg.get("rope_theta")}
    for key in ("rope_parameters", "rope_scaling"):
        given[f"{key}.rope_theta"] = (cfg.get(key) or {}).get("rope_theta")
    others = [f"{field} is {v!r}" for field, v in given.items()
              if field != used and v is not None and v != theta]
    if others:
        note_once(path, f"field '{used}': {theta!r}, but {' and '.join(others)}; gptlab rotates "
                        f"with {theta!r}, as transformers 5 does (transformers 4 reads the "
                        f"top-level rope_theta alone)")


def _rate(cfg: dict, key: str, path: Path, default: float) -> float:
    """A dropout probability field, in [0, 1) as gptlab's dropout is."""
    v = _value(cfg, key, path, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
        raise UserError(f"must be a dropout probability in [0, 1), got {v!r:.40}", path=path,
                        field=key)
    return float(v)


def _one_dropout(cfg: dict, path: Path, keys: tuple[str, str, str], default: float) -> float:
    """GPT-2's and GPT-Neo's dropout as transformers fine-tunes them: on the embeddings, the
    attention weights and the residual branches, the places of gptlab's one rate; `keys` name
    the residual, embedding and attention rates (GPT-2's 0.1 each by default, GPT-Neo's 0).
    Where the three differ, gptlab takes the residual one."""
    from gptlab.tokenizer import note_once

    resid = keys[0]
    rates = {k: _rate(cfg, k, path, default) for k in keys}
    others = [f"{k} is {v!r}" for k, v in rates.items() if v != rates[resid]]
    if others:
        note_once(path, f"field '{resid}': {rates[resid]!r}, but "
                        f"{' and '.join(others)}; gptlab drops out at one rate on embeddings, "
                        f"attention weights and residual branches, and takes {resid}'s")
    return rates[resid]


def _note_attention_dropout(cfg: dict, path: Path) -> None:
    """transformers drops out a Llama, Mistral or Qwen2 model's attention weights alone, at
    attention_dropout, in training; gptlab's one rate would drop out its embeddings and residual
    branches too, which these models never do: the model imports with none."""
    from gptlab.tokenizer import note_once

    rate = _rate(cfg, "attention_dropout", path, 0.0)
    if rate:
        note_once(path, f"field 'attention_dropout': {rate!r}: gptlab fine-tunes this model "
                        f"without dropout (its one rate would drop out the embeddings and "
                        f"residual branches too, where transformers drops out the attention "
                        f"weights alone)")


# GPT-2's and GPT-Neo's activation_function (transformers' ACT2FN names) -> gptlab's activation:
# the tanh approximation under its three names, exact GELU, ReLU, and SiLU under two.
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu",
                   "swish": "silu"}


def _activation(cfg: dict, path: Path) -> str:
    """gptlab's activation for GPT-2's or GPT-Neo's activation_function (default gelu_new)."""
    act = cfg.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in _HF_ACTIVATIONS:
        raise UserError(f"activation {act!r:.40} is not supported (supported: "
                        f"{sorted(_HF_ACTIVATIONS)})", path=path, field="activation_function")
    return _HF_ACTIVATIONS[act]


def _gpt2_config(cfg: dict, path: Path) -> GPTConfig:
    """GPT-2: scale_attn_weights false (QKᵀ not divided by √d_head) is attention_scale 1;
    reorder_and_upcast_attn, which computes QKᵀ in float32 in another order, is the same
    function and is not read."""
    activation = _activation(cfg, path)
    if _flag(cfg, "add_cross_attention", path, False):
        raise UserError("add_cross_attention=True changes the attention and does not map to "
                        "gptlab", path=path, field="add_cross_attention")
    if _flag(cfg, "scale_attn_by_inverse_layer_idx", path, False):
        raise UserError("scale_attn_by_inverse_layer_idx=True divides layer i's QKᵀ by i + 1 "
                        "too, and gptlab has one attention_scale for every layer: it does not "
                        "map", path=path, field="scale_attn_by_inverse_layer_idx")
    scale = None if _flag(cfg, "scale_attn_weights", path, True) else 1.0
    d, h = _count(cfg, "n_embd", path), _count(cfg, "n_head", path)
    check_heads(d, h, h, False, path, ("n_embd", "n_head", "n_head"))
    return GPTConfig(vocab_size=_count(cfg, "vocab_size", path),
                     context=_count(cfg, "n_positions", path, 1024),
                     n_layers=_count(cfg, "n_layer", path), n_heads=h, d_model=d,
                     d_ff=_count(cfg, "n_inner", path, None), positions="learned",
                     norm="layernorm", norm_eps=_positive(cfg, "layer_norm_epsilon", path, 1e-5),
                     prenorm=True, activation=activation, bias=True,
                     tie_embeddings=_flag(cfg, "tie_word_embeddings", path, True),
                     dropout=_one_dropout(cfg, path, ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
                                          0.1), attention_scale=scale)


_NEO_TYPES = ("global", "local")
_NEO_TYPES_DEFAULT = [[["global", "local"], 12]]  # GPTNeoConfig's


def _neo_layer_kinds(cfg: dict, n_layers: int, path: Path) -> list[str] | str:
    """Each GPT-Neo layer's attention, "global" or "local", as transformers reads them:
    config.json's attention_layers where given (transformers writes them beside attention_types,
    and its model reads them, whatever attention_types expands to: left out, the default's 24
    types, or another count), else attention_types expanded ([[["global", "local"], 12]]: the
    pair 12 times). One kind on every layer comes back as that kind, not as a list."""
    from gptlab.tokenizer import note_once

    types = given = cfg.get("attention_types")
    if types is None:  # null too, as GPTNeoConfig reads it
        types = _NEO_TYPES_DEFAULT
    if not isinstance(types, list) or not all(
            isinstance(item, list) and len(item) == 2 and isinstance(item[0], list)
            and all(isinstance(t, str) for t in item[0]) and isinstance(item[1], int)
            and not isinstance(item[1], bool) and item[1] >= 0 for item in types):
        raise UserError(f"must be a list of [[attention types], repeats] pairs, got "
                        f"{types!r:.80}", path=path, field="attention_types")
    odd = [t for kinds, _ in types for t in kinds if t not in _NEO_TYPES]
    if odd:
        raise UserError(f"attention type {odd[0]!r:.40} is not supported (GPT-Neo's are global "
                        f"and local)", path=path, field="attention_types")
    listed = cfg.get("attention_layers")
    count = sum(len(kinds) * n for kinds, n in types)
    if count != n_layers and listed is None:
        raise UserError(f"expands to {count} layer types, but num_layers is {n_layers}",
                        path=path, field="attention_types")
    if listed is not None:
        _check_layer_list(listed, n_layers, _NEO_TYPES, "attention", "GPT-Neo's", path,
                          "attention_layers")
        if given is not None and (count != n_layers or listed != [
                t for kinds, n in types for _ in range(n) for t in kinds]):
            note_once(path, "field 'attention_layers' does not list what attention_types "
                            "expands to; gptlab reads attention_layers, as transformers does")
    else:
        kinds = {t for ts, n in types if n for t in ts}
        if len(kinds) == 1:  # 10**30 layers of one kind are never listed
            return kinds.pop()
        if n_layers > _MOST_LISTED:
            raise UserError(f"is {n_layers}: global and local layers among them are more "
                            f"layers than gptlab lists ({_MOST_LISTED})", path=path,
                            field="num_layers")
        listed = [t for ts, n in types for _ in range(n) for t in ts]
    return listed[0] if len(set(listed)) == 1 else listed


def _check_layer_list(listed: Any, n_layers: int, kinds: Sequence[str], what: str,
                      whose: str, path: Path, field: str) -> None:
    """Refuse a config.json list of layer kinds (GPT-Neo's attention_layers, Qwen2's
    layer_types) that is no list of one kind a layer, each one of `kinds`."""
    if not isinstance(listed, list) or len(listed) != n_layers:
        raise UserError(f"must be a list of {n_layers} {what} types (one a layer), got "
                        f"{listed!r:.80}", path=path, field=field)
    odd = [t for t in listed if t not in kinds]
    if odd:
        raise UserError(f"{what} type {odd[0]!r:.40} is not supported ({whose} are "
                        f"{' and '.join(kinds)})", path=path, field=field)


def _neo_local_layers(kinds: list[str] | str, n_layers: int) -> str | list[int]:
    """GPTConfig's local_attention_layers for GPT-Neo's layer kinds (none local: [])."""
    if isinstance(kinds, str):
        return "all" if kinds == "local" else []
    local = [i for i, t in enumerate(kinds) if t == "local"]
    for name, start in (("odd", 1), ("even", 0)):
        if local == list(range(start, n_layers, 2)):
            return name
    return local


def _gpt_neo_config(cfg: dict, path: Path) -> GPTConfig:
    """GPT-Neo: GPT-2's block with no Q/K/V biases and QKᵀ not divided by √d_head (scale 1),
    its layers global or local (a band of window_size tokens, the query's own included)."""
    activation = _activation(cfg, path)  # transformers' GPT-Neo MLP reads it as GPT-2's does
    d, h = _count(cfg, "hidden_size", path), _count(cfg, "num_heads", path)
    check_heads(d, h, h, False, path, ("hidden_size", "num_heads", "num_heads"))
    n_layers = _count(cfg, "num_layers", path)
    context = _count(cfg, "max_position_embeddings", path, 2048)
    window = _count(cfg, "window_size", path, 256)
    local = _neo_local_layers(_neo_layer_kinds(cfg, n_layers, path), n_layers)
    if local == [] or window >= context:  # a band as long as the context masks nothing
        window, local = None, "all"
    return GPTConfig(vocab_size=_count(cfg, "vocab_size", path), context=context,
                     n_layers=n_layers, n_heads=h, d_model=d,
                     d_ff=_count(cfg, "intermediate_size", path, None), positions="learned",
                     norm="layernorm", norm_eps=_positive(cfg, "layer_norm_epsilon", path, 1e-5),
                     prenorm=True, activation=activation, bias=True, qkv_bias=False,
                     tie_embeddings=_flag(cfg, "tie_word_embeddings", path, True),
                     dropout=_one_dropout(cfg, path, ("resid_dropout", "embed_dropout",
                                                      "attention_dropout"), 0.0),
                     attention_window=window, local_attention_layers=local, attention_scale=1.0)


# transformers' max_position_embeddings where config.json leaves it out.
_CONTEXT_DEFAULT = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}
_WINDOW_DEFAULT = 4096  # MistralConfig's and Qwen2Config's sliding_window
_LAYER_TYPES = ("full_attention", "sliding_attention")
_MOST_LISTED = 2**16


def _qwen2_sliding_layers(cfg: dict, n_layers: int, path: Path) -> Sequence[int]:
    """The Qwen2 layers that attend through the window, as transformers decides: none
    without use_sliding_window; else those layer_types marks "sliding_attention" (transformers
    5), or without layer_types those from max_window_layers on (transformers' default 28)."""
    if not _flag(cfg, "use_sliding_window", path, False):
        return []
    types = cfg.get("layer_types")
    if types is not None:
        _check_layer_list(types, n_layers, _LAYER_TYPES, "layer", "Qwen2's", path, "layer_types")
        return [i for i, t in enumerate(types) if t == "sliding_attention"]
    first = _value(cfg, "max_window_layers", path, 28)
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise UserError(f"must be a non-negative integer, got {first!r}", path=path,
                        field="max_window_layers")
    return range(first, n_layers)


def _sliding_window(cfg: dict, n_layers: int, context: int, path: Path
                    ) -> tuple[int | None, str | list[int]]:
    """GPTConfig's (attention_window, local_attention_layers): Mistral's window on every
    layer, Qwen2's on the layers `_qwen2_sliding_layers` names, Llama none (transformers'
    Llama reads no window: it attends over the whole context whatever sliding_window says).
    transformers' window is gptlab's: a query sees the `sliding_window` latest keys, itself
    included (its mask keeps key j for query i where j > i - sliding_window). A window as long
    as the context masks nothing: dense."""
    mtype = cfg["model_type"]
    if mtype == "llama":
        return None, "all"
    layers = range(n_layers) if mtype == "mistral" \
        else _qwen2_sliding_layers(cfg, n_layers, path)
    window = _value(cfg, "sliding_window", path, _WINDOW_DEFAULT)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                               or window < 1):
        raise UserError(f"must be a positive integer or null, got {window!r}", path=path,
                        field="sliding_window")
    # len() of a range past sys.maxsize raises: count its ends.
    count = max(layers.stop - layers.start, 0) if isinstance(layers, range) else len(layers)
    if window is None or window >= context or not count:
        return None, "all"
    if count == n_layers:
        return window, "all"
    if count > _MOST_LISTED:  # a list of 10**30 layer indices is never made
        raise UserError(f"is {n_layers}: a window on {count} of them is more layers than "
                        f"gptlab lists ({_MOST_LISTED})", path=path, field="num_hidden_layers")
    return window, list(layers)


def _llama_biases(cfg: dict, path: Path) -> tuple[bool, bool | None]:
    """GPTConfig's (bias, qkv_bias): Qwen2 has biases on Q, K, V only, Mistral none (transformers
    reads neither model's attention_bias or mlp_bias), Llama on every linear layer or on none."""
    if cfg["model_type"] == "qwen2":
        return False, True
    if cfg["model_type"] == "mistral":
        return False, None
    attn_bias = _flag(cfg, "attention_bias", path, False)
    mlp_bias = _flag(cfg, "mlp_bias", path, False)
    if attn_bias != mlp_bias:
        raise UserError(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} does not map "
                        f"(gptlab puts biases on all linear layers or on none)", path=path,
                        field="attention_bias")
    return attn_bias, None


def _llama_config(cfg: dict, path: Path) -> GPTConfig:
    """Llama, Mistral and Qwen2: rotary positions, RMSNorm, SwiGLU, grouped-query attention."""
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers: the same SiLU
        raise UserError(f"hidden_act '{cfg['hidden_act']}' is not supported (the Llama family "
                        f"maps to SwiGLU, which needs silu)", path=path, field="hidden_act")
    n_pos = _count(cfg, "max_position_embeddings", path, _CONTEXT_DEFAULT[cfg["model_type"]])
    n_layers = _count(cfg, "num_hidden_layers", path)
    window, local_layers = _sliding_window(cfg, n_layers, n_pos, path)
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError("partial rotary embeddings are not supported", path=path,
                        field="partial_rotary_factor")
    bias, qkv_bias = _llama_biases(cfg, path)
    _note_attention_dropout(cfg, path)
    d, h = _count(cfg, "hidden_size", path), _count(cfg, "num_attention_heads", path)
    kv = _count(cfg, "num_key_value_heads", path, None) or h
    explicit_head_dim = _count(cfg, "head_dim", path, None)
    check_heads(d, h, kv, explicit_head_dim is not None, path,
                ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    head_dim = explicit_head_dim or d // h
    return GPTConfig(vocab_size=_count(cfg, "vocab_size", path), context=n_pos,
                     n_layers=n_layers, n_heads=h,
                     n_kv_heads=kv, d_model=d, d_ff=_count(cfg, "intermediate_size", path),
                     head_dim=None if head_dim * h == d else head_dim,
                     positions="rotary", rope_theta=_rope_theta(cfg, path), norm="rmsnorm",
                     norm_eps=_positive(cfg, "rms_norm_eps", path, 1e-6), prenorm=True,
                     activation="swiglu", bias=bias, qkv_bias=qkv_bias,
                     tie_embeddings=_flag(cfg, "tie_word_embeddings", path, False),
                     attention_window=window, local_attention_layers=local_layers)


def hf_config_to_gpt(cfg: dict, path: Path) -> GPTConfig:
    """The GPTConfig of a Hugging Face config.json, or a UserError naming what does not map."""
    mtype = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UserError(f"expected a list of class names, got {archs!r}", path=path,
                        field="architectures")
    if mtype not in SUPPORTED_HF:
        raise UserError(f"architecture {mtype!r} ({', '.join(archs)}) is not supported "
                        f"(supported: {', '.join(SUPPORTED_HF)})", path=path, field="model_type")
    read = {"gpt2": _gpt2_config, "gpt_neo": _gpt_neo_config}.get(mtype, _llama_config)
    try:
        out = read(cfg, path)
    except (TypeError, ValueError) as e:  # GPTConfig's own checks (an odd rotary head_dim)
        raise UserError(str(e), path=path) from None
    try:
        check_config(out, path)  # what the fields above do not cover
    except UserError as e:  # named as config.json names it, not by gptlab's field
        names = {"gpt2": _GPT2_KEYS, "gpt_neo": _NEO_KEYS}.get(mtype, _LLAMA_KEYS)
        raise UserError(e.message, path=path, field=names.get(e.field, e.field)) from None
    return out


# gptlab's GPTConfig field -> the config.json key it is read from, for each family.
_GPT2_KEYS = {"vocab_size": "vocab_size", "context": "n_positions", "n_layers": "n_layer",
              "n_heads": "n_head", "d_model": "n_embd", "d_ff": "n_inner",
              "norm_eps": "layer_norm_epsilon", "dropout": "resid_pdrop"}
_NEO_KEYS = {"vocab_size": "vocab_size", "context": "max_position_embeddings",
             "n_layers": "num_layers", "n_heads": "num_heads", "d_model": "hidden_size",
             "d_ff": "intermediate_size", "norm_eps": "layer_norm_epsilon",
             "dropout": "resid_dropout", "attention_window": "window_size"}
_LLAMA_KEYS = {"vocab_size": "vocab_size", "context": "max_position_embeddings",
               "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
               "n_kv_heads": "num_key_value_heads", "d_model": "hidden_size",
               "d_ff": "intermediate_size", "head_dim": "head_dim", "rope_theta": "rope_theta",
               "norm_eps": "rms_norm_eps", "attention_window": "sliding_window"}


# --- weights -----------------------------------------------------------------------------------

def _shards_of_index(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json lists in its weight_map."""
    raw = read_json(index, what=None)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(f, str) and f for f in weight_map.values()):
        raise UserError(f"expected an object of tensor name -> shard file name, got "
                        f"{weight_map!r:.60}", path=index, field="weight_map")
    return sorted(set(weight_map.values()))


def read_safetensors_dir(d: Path) -> dict[str, Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint. A directory holding both
    model.safetensors and model.safetensors.index.json loads model.safetensors, as
    transformers' from_pretrained does (it looks for the single file first)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    if (d / "model.safetensors").exists():
        shards = ["model.safetensors"]
    elif index.exists():
        shards = _shards_of_index(index)
        missing = [s for s in shards if not (d / s).exists()]
        if missing:
            raise UserError(f"missing shard(s) {', '.join(missing)}: listed, but not in {d}",
                            path=index, field="weight_map")
    else:
        other = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
        hint = f" (found {', '.join(other)}: re-save with safe_serialization=True)" if other else ""
        raise UserError(f"no model.safetensors or model.safetensors.index.json{hint}", path=d)
    state: dict[str, Tensor] = {}
    for s in shards:
        try:
            state.update(load_file(str(d / s)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read weights (truncated or corrupt?): {e}",
                            path=d / s) from None
    return state


def _gpt2_weights(sd: dict[str, Tensor], cfg: GPTConfig, source: Path
                  ) -> tuple[Named, set[str]]:
    """GPT-2 uses Conv1D, whose weight is (in, out): transpose; split the fused c_attn."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in sd) else ""
    out: Named = {}
    used: set[str] = set()

    def take(ours: str, theirs: str, transpose: bool = False) -> None:
        name = prefix + theirs if not theirs.startswith("lm_head") else theirs
        if name in sd:
            used.add(name)
            t = sd[name]
            out[ours] = (name, t.t() if transpose and t.dim() == 2 else t)

    take("tok_emb.weight", "wte.weight")
    take("pos_emb.weight", "wpe.weight")
    take("final_norm.weight", "ln_f.weight")
    take("final_norm.bias", "ln_f.bias")
    if not cfg.tie_embeddings:
        take("lm_head.weight", "lm_head.weight")
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            take(f"{b}{ours}.weight", f"{h}{theirs}.weight")
            take(f"{b}{ours}.bias", f"{h}{theirs}.bias")
        for s in ("weight", "bias"):
            take(f"{b}attn.o_proj.{s}", f"{h}attn.c_proj.{s}", transpose=True)
            take(f"{b}mlp.up.{s}", f"{h}mlp.c_fc.{s}", transpose=True)
            take(f"{b}mlp.down.{s}", f"{h}mlp.c_proj.{s}", transpose=True)
            fused = f"{prefix}{h}attn.c_attn.{s}"
            if fused in sd:
                used.add(fused)
                w = sd[fused].t() if s == "weight" else sd[fused]  # (3d, d) / (3d,)
                if w.shape[0] % 3:
                    raise UserError(f"tensor {fused} has shape {tuple(sd[fused].shape)}: the "
                                    f"fused Q/K/V dimension is not a multiple of 3", path=source)
                for p, part in zip("qkv", w.chunk(3, dim=0)):
                    out[f"{b}attn.{p}_proj.{s}"] = (fused, part.clone())  # own storage
    # The causal-mask buffers some GPT-2 checkpoints carry are not weights.
    used |= {k for k in sd if k.endswith((".attn.bias", ".attn.masked_bias"))
             and sd[k].dim() != 1}
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        used.add("lm_head.weight")
    return out, used


def _gpt2_names(cfg: GPTConfig, prefix: str) -> dict[str, str]:
    """gptlab name -> the GPT-2 tensor it is read from (Q, K and V: the fused c_attn), for
    the message that names one missing."""
    m = {"tok_emb.weight": prefix + "wte.weight", "pos_emb.weight": prefix + "wpe.weight",
         "final_norm.weight": prefix + "ln_f.weight", "final_norm.bias": prefix + "ln_f.bias",
         "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"{prefix}h.{i}."
        for s in ("weight", "bias"):
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2"),
                                 ("attn.o_proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                                 ("mlp.down", "mlp.c_proj"), ("attn.q_proj", "attn.c_attn"),
                                 ("attn.k_proj", "attn.c_attn"), ("attn.v_proj", "attn.c_attn")):
                m[f"{b}{ours}.{s}"] = f"{h}{theirs}.{s}"
    return m


def _source_names(model_type: str, sd: dict[str, Tensor], cfg: GPTConfig) -> dict[str, str]:
    """gptlab name -> the tensor of a `model_type` checkpoint it is read from."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in sd) else ""
    if model_type == "gpt2":
        return _gpt2_names(cfg, prefix)
    if model_type == "gpt_neo":
        return _gpt_neo_names(cfg, prefix)
    return _llama_names(cfg)


def _llama_names(cfg: GPTConfig) -> dict[str, str]:
    """gptlab name -> Llama/Mistral/Qwen2 name."""
    m = {"tok_emb.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
         "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        m[b + "attn_norm.weight"] = h + "input_layernorm.weight"
        m[b + "mlp_norm.weight"] = h + "post_attention_layernorm.weight"
        for s in ("weight", "bias"):
            for p in "qkvo":
                m[f"{b}attn.{p}_proj.{s}"] = f"{h}self_attn.{p}_proj.{s}"
            for ours in ("gate", "up", "down"):
                m[f"{b}mlp.{ours}.{s}"] = f"{h}mlp.{ours}_proj.{s}"
    return m


def _gpt_neo_names(cfg: GPTConfig, prefix: str = "transformer.") -> dict[str, str]:
    """gptlab name -> GPT-Neo name (nn.Linear throughout: nothing to transpose)."""
    m = {"tok_emb.weight": prefix + "wte.weight", "pos_emb.weight": prefix + "wpe.weight",
         "final_norm.weight": prefix + "ln_f.weight", "final_norm.bias": prefix + "ln_f.bias",
         "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"{prefix}h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2"),
                             ("attn.o_proj", "attn.attention.out_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")):
            for s in ("weight", "bias"):
                m[f"{b}{ours}.{s}"] = f"{h}{theirs}.{s}"
        for p in "qkv":
            m[f"{b}attn.{p}_proj.weight"] = f"{h}attn.attention.{p}_proj.weight"
    return m


def _gpt_neo_weights(sd: dict[str, Tensor], cfg: GPTConfig) -> tuple[Named, set[str]]:
    prefix = "transformer." if any(k.startswith("transformer.") for k in sd) else ""
    out: Named = {}
    # The causal-mask buffers older checkpoints carry (a (1, 1, n, n) band, a scalar) are not
    # weights; a 1-D one would be a bias, which has no place.
    used = {k for k in sd if k.endswith((".attn.attention.bias", ".attn.attention.masked_bias"))
            and sd[k].dim() != 1}
    for ours, theirs in _gpt_neo_names(cfg, prefix).items():
        if theirs in sd:
            used.add(theirs)
            if not (ours == "lm_head.weight" and cfg.tie_embeddings):
                out[ours] = (theirs, sd[theirs])
    return out, used


def _llama_weights(sd: dict[str, Tensor], cfg: GPTConfig) -> tuple[Named, set[str]]:
    out: Named = {}
    used = {k for k in sd if k.endswith("rotary_emb.inv_freq")}  # recomputed, not a weight
    for ours, theirs in _llama_names(cfg).items():
        if theirs in sd:
            used.add(theirs)
            if not (ours == "lm_head.weight" and cfg.tie_embeddings):
                out[ours] = (theirs, sd[theirs])
    return out, used


def _named_weights(model_type: str, sd: dict[str, Tensor], cfg: GPTConfig, source: Path
                   ) -> tuple[Named, set[str]]:
    """(gptlab name -> (source name, tensor), the source names taken) for a config.json's
    model_type."""
    if model_type == "gpt2":
        return _gpt2_weights(sd, cfg, source)
    if model_type == "gpt_neo":
        return _gpt_neo_weights(sd, cfg)
    return _llama_weights(sd, cfg)


def assemble(cfg: GPTConfig, named: Named, unused: list[str], source: Path,
             dtype: torch.dtype = torch.float32,
             source_name: Callable[[str], str | None] | None = None) -> GPT:
    """A GPT with exactly these weights: every parameter present, of the shape the config
    implies, and no tensor left over. `source_name` (gptlab name -> the checkpoint's, None
    where it has none) names a missing tensor as the file would."""
    if unused:
        raise UserError(f"{len(unused)} tensor(s) do not map to gptlab's "
                        f"{'GPT-2' if cfg.positions == 'learned' else 'Llama'}-style model: "
                        f"{', '.join(sorted(unused)[:5])}", path=source)
    if cfg.n_layers > len(named):
        # Building 10^30 layers, even on the meta device, loops until the memory is gone.
        raise UserError(f"the config has {cfg.n_layers} layers, but the checkpoint holds "
                        f"{len(named)} tensors, fewer than one per layer: the config does not "
                        f"describe these weights", path=source)
    try:
        with torch.device("meta"):
            model = GPT(cfg)  # shapes only; the weights come from the checkpoint
    except (TypeError, ValueError, RuntimeError) as e:  # sizes past what torch can address
        raise UserError(f"the config describes a model that cannot be built "
                        f"({str(e).splitlines()[0]})", path=source) from None
    expected = model.state_dict()
    # A tensor the config has no parameter for (o_proj's bias where only Q, K, V have one, a
    # block past the last) would be dropped without a word, and the model computes another
    # function: refuse it as an unmapped one.
    extra = sorted({src for name, (src, _) in named.items() if name not in expected})
    if extra:
        raise UserError(f"{len(extra)} tensor(s) have no place in the model the config "
                        f"describes: {', '.join(extra[:5])}", path=source)
    state: dict[str, Tensor] = {}
    for name, ref in expected.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if name not in named:
            theirs = source_name(name) if source_name else None
            raise UserError(f"tensor {theirs} is missing from the checkpoint (gptlab's {name} "
                            f"is read from it)" if theirs else
                            f"tensor for '{name}' is missing from the checkpoint", path=source)
        src, t = named[name]
        if not t.is_floating_point():  # cast, it loaded as whole numbers without a word
            raise UserError(f"tensor {src} is of type {str(t.dtype).removeprefix('torch.')}, "
                            f"not a floating-point type as every weight is", path=source)
        if tuple(t.shape) != tuple(ref.shape):
            raise UserError(f"tensor {src} has shape {tuple(t.shape)}, but the config implies "
                            f"{tuple(ref.shape)} for {name}", path=source)
        refuse_non_finite([(src, t)], source)  # the file's values, before a cast
        state[name] = t.to(dtype).contiguous()  # GPT-2's transposes are views
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # assign=True replaced the shared Parameter
    stale = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if t.is_meta]
    if stale:
        raise UserError(f"no weights for {', '.join(stale[:5])}", path=source)
    return model.eval()


# --- tokenizer -------------------------------------------------------------------------------

def _adds_bos(d: Path, tok: Any) -> bool:
    """Whether the model was trained with BOS first: tokenizer_config's add_bos_token as
    `load_tokenizer` reads it (gptlab's own export writes it; false gives way to a
    post-processor that prepends BOS, as transformers reads it); without one, whether the
    post-processor prepends it (Llama 3 style), not `load_tokenizer`'s default for gptlab's
    early directories."""
    from gptlab.tokenizer import starts_with

    if tok.bos_token is None:
        return False
    tcfg_path = d / "tokenizer_config.json"
    if tcfg_path.exists() and "add_bos_token" in read_json(tcfg_path):
        return tok.add_bos
    return starts_with(tok.hf, tok.bos_token)


def load_hf_tokenizer(d: Path) -> Any:
    """gptlab's Tokenizer from tokenizer.json + tokenizer_config.json; None without them.

    A model that was not trained with BOS first (GPT-2, Qwen2, SmolLM) keeps its `bos_token`
    for the chat template, but `encode(bos=True)` prepends none.
    """
    from gptlab.tokenizer import load_tokenizer

    if not (d / "tokenizer.json").exists():
        return None
    tok = load_tokenizer(d)
    tok.add_bos = _adds_bos(d, tok)
    return tok


def is_sequence_classifier(raw: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in raw.get("architectures") or [])


def _reward_model(raw: dict, cfg: GPTConfig, sd: dict[str, Tensor], d: Path,
                  dtype: torch.dtype) -> ScalarHeadModel:
    """A `*ForSequenceClassification` checkpoint with one label as a reward model: the base
    model's weights, and its `score` layer as the scalar head (read at the last real token
    that is not the config's pad_token_id, as transformers pools)."""
    # As transformers reads it: id2label, else num_labels, else its default of 2 labels.
    labels = len(raw.get("id2label") or {}) or raw.get("num_labels", 2)
    if isinstance(labels, bool) or not isinstance(labels, int):
        raise UserError(f"must be a number of labels (1 for a reward model), got {labels!r}",
                        path=d / "config.json", field="num_labels")
    if labels != 1:
        raise UserError(f"a reward model has 1 label, this classifier has {labels}",
                        path=d / "config.json", field="num_labels")
    if "score.weight" not in sd:
        raise UserError("no 'score.weight': not a sequence-classification checkpoint", path=d)
    cfg = dataclasses.replace(cfg, tie_embeddings=True)  # no LM head here; the RM needs none
    named, used = _named_weights(raw["model_type"], sd, cfg, d)
    used |= {"score.weight", "score.bias"}
    gpt = assemble(cfg, named, [k for k in sd if k not in used], d, dtype,
                   _source_names(raw["model_type"], sd, cfg).get)
    refuse_non_finite([(k, sd[k]) for k in ("score.weight", "score.bias") if k in sd], d)
    rm = ScalarHeadModel.from_gpt(gpt)
    # transformers scores at the last token that is not the pad (a pad that is the end of turn,
    # SmolLM2's, is never read).
    rm.pad_token_id = check_pad_token_id(raw.get("pad_token_id"), cfg.vocab_size,
                                         d / "config.json", "pad_token_id")
    # Such a model scores whole conversations (TRL's RewardTrainer renders prompt + answer with
    # the chat template): read each response with the template's text after its end of turn.
    rm.reads_template_tail = True
    with torch.no_grad():
        rm.head.weight.copy_(sd["score.weight"].to(dtype).reshape(1, -1))
        rm.head.bias.copy_(sd["score.bias"].to(dtype).reshape(1) if "score.bias" in sd
                           else torch.zeros(1))
    # from_gpt builds in float32: give the reward model the dtype asked for, as a GPT gets.
    return rm.to(dtype).eval()


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32
            ) -> tuple[GPT | ScalarHeadModel, Any]:
    """(model, Tokenizer or None) from a Hugging Face model directory: a GPT from a causal LM,
    a ScalarHeadModel (a reward model) from a one-label sequence classifier."""
    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise WrongKind("not a Hugging Face model directory (config.json is missing)", path=d)
    raw = read_json(cfg_path)
    if str(raw.get("format", "")).startswith("gptlab/"):
        raise UserError(f"a gptlab model directory (format {raw['format']!r}), not a Hugging "
                        f"Face one", path=cfg_path, field="format")
    cfg = hf_config_to_gpt(raw, cfg_path)
    sd = read_safetensors_dir(d)
    if cfg.n_layers > len(sd):
        # Mapping (and building) 10^30 layers loops until the memory is gone.
        raise UserError(f"is {cfg.n_layers}, but the checkpoint holds {len(sd)} tensors, fewer "
                        f"than one per layer: the config does not describe these weights",
                        path=cfg_path, field={"gpt2": "n_layer", "gpt_neo": "num_layers"}.get(
                            raw["model_type"], "num_hidden_layers"))
    if is_sequence_classifier(raw):
        return _reward_model(raw, cfg, sd, d, dtype), load_hf_tokenizer(d)
    named, used = _named_weights(raw["model_type"], sd, cfg, d)
    model = assemble(cfg, named, [k for k in sd if k not in used], d, dtype,
                     _source_names(raw["model_type"], sd, cfg).get)
    return model, load_hf_tokenizer(d)


# --- export ------------------------------------------------------------------------------------

# gptlab activation -> GPT-2's (and GPT-Neo's) activation_function, for export.
_GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def _local_layers(cfg: GPTConfig) -> list[int]:
    """The layers that attend through a window shorter than the context (none: dense)."""
    if cfg.attention_window is None or cfg.attention_window >= cfg.context:
        return []
    return [i for i in range(cfg.n_layers) if cfg.is_local(i)]


def _float32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def _with_export_scale(cfg: GPTConfig) -> GPTConfig:
    """`cfg` with an attention_scale that is, in float32, 1 or the default 1/√d_head given as
    that: attention runs on the float32 scale (SDPA's, and QKᵀ·scale on float32 scores), so a
    number that rounds to the default's computes what the default does, and exports as it."""
    scale = cfg.attention_scale
    if scale is None:
        return cfg
    if _float32(scale) == 1.0:  # first: at d_head 1 the default is 1 too, and 1 is GPT-Neo's
        scale = 1.0
    elif _float32(scale) == _float32(1 / math.sqrt(cfg.dim_head)):
        scale = None
    return dataclasses.replace(cfg, attention_scale=scale)


def _gpt_neo_family(cfg: GPTConfig, qkv_bias: bool) -> list[str]:
    """What keeps a model with local layers, or QKᵀ unscaled without Q/K/V biases (learned
    positions, LayerNorm), from exporting as GPT-Neo: GPT2 has no window, and Q/K/V biases."""
    local = _local_layers(cfg)
    why = (f"attention_window={cfg.attention_window} on local_attention_layers="
           f"{cfg.local_attention_layers!r} exports as GPT-Neo alone (GPT2 attends over the "
           f"whole context)" if local else
           f"attention_scale={cfg.attention_scale!r} with qkv_bias=False exports as GPT-Neo "
           f"alone (GPT2 has Q/K/V biases)")
    bad = [f"{k}={v!r}" for k, v, want in (
        ("prenorm", cfg.prenorm, True), ("bias", cfg.bias, True), ("qkv_bias", qkv_bias, False),
        ("attention_scale", cfg.attention_scale, 1.0)) if v != want]
    if cfg.activation not in _GPT2_ACTIVATIONS:
        bad.append(f"activation={cfg.activation!r}")
    if cfg.kv_heads != cfg.n_heads or cfg.dim_head * cfg.n_heads != cfg.d_model:
        bad.append("grouped-query attention or a custom head_dim")
    if not bad:
        return []
    return [f"{why}, which needs prenorm=True, bias=True, qkv_bias=False, activation one of "
            f"{', '.join(_GPT2_ACTIVATIONS)}, attention_scale=1.0 (it does not divide QKᵀ by "
            f"√d_head) and plain multi-head attention; this model has {', '.join(bad)}"]


def _gpt2_family(cfg: GPTConfig, qkv_bias: bool) -> list[str]:
    """What keeps a dense model with learned positions and LayerNorm from exporting as GPT2."""
    bad = [f"{k}={v!r} (GPT2 needs {want!r})" for k, v, want in (
        ("prenorm", cfg.prenorm, True), ("bias", cfg.bias, True),
        ("qkv_bias", qkv_bias, True)) if v != want]
    if cfg.activation not in _GPT2_ACTIVATIONS:
        bad.append(f"activation={cfg.activation!r} (GPT2 needs one of "
                   f"{', '.join(_GPT2_ACTIVATIONS)})")
    if cfg.kv_heads != cfg.n_heads or cfg.dim_head * cfg.n_heads != cfg.d_model:
        bad.append("grouped-query attention or a custom head_dim (GPT2 has neither)")
    if cfg.attention_scale not in (None, 1.0):
        bad.append(f"attention_scale={cfg.attention_scale!r} (GPT2 divides QKᵀ by √d_head, "
                   f"or not at all with scale_attn_weights false: attention_scale 1.0)")
    return bad


def _export_family(cfg: GPTConfig) -> str:
    """'gpt2', 'gpt_neo', 'llama', 'mistral' or 'qwen2', or a UserError naming every setting
    that does not map. A GPT-2-shaped model exports as GPT-Neo where it has local layers, or
    QKᵀ unscaled (attention_scale 1) without Q/K/V biases, as GPT-Neo computes; else as GPT2,
    with scale_attn_weights false where QKᵀ is unscaled (it keeps the Q/K/V biases GPT-Neo
    lacks). A window on every layer of a Llama-shaped one exports as Mistral (no biases) or
    Qwen2 (biases on Q, K, V only), on some layers as Qwen2 alone (its layer_types)."""
    cfg = _with_export_scale(cfg)
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    scaled = [] if cfg.attention_scale is None else [
        f"attention_scale={cfg.attention_scale!r} (Llama, Mistral and Qwen2 divide QKᵀ by "
        f"√head_dim; GPT2 and GPT-Neo can leave it undivided, attention_scale 1.0, with "
        f"learned positions and layernorm)"]
    if cfg.positions == "learned" and cfg.norm == "layernorm" and (
            _local_layers(cfg) or (cfg.attention_scale is not None and not qkv_bias)):
        bad, family = _gpt_neo_family(cfg, qkv_bias), "gpt_neo"
    elif cfg.positions == "learned" and cfg.norm == "layernorm":
        bad, family = _gpt2_family(cfg, qkv_bias), "gpt2"
    elif cfg.positions == "rotary" and cfg.norm == "rmsnorm":
        bad = [f"{k}={v!r} (Llama needs {want!r})" for k, v, want in (
            ("activation", cfg.activation, "swiglu"), ("prenorm", cfg.prenorm, True)) if v != want]
        bad += scaled
        if cfg.bias and not qkv_bias:
            bad.append("bias=True with qkv_bias=False (neither Llama nor Qwen2)")
        family = "qwen2" if qkv_bias and not cfg.bias else "llama"
        local = _local_layers(cfg)
        if local and family == "llama":
            if cfg.bias:
                bad.append(f"attention_window={cfg.attention_window} with bias=True (a window "
                           f"exports as Mistral, which has no biases, or Qwen2, biases on Q, "
                           f"K, V only)")
            elif len(local) < cfg.n_layers:
                bad.append(f"attention_window={cfg.attention_window} on local_attention_layers="
                           f"{cfg.local_attention_layers!r} without biases (Mistral's window is "
                           f"on every layer; Qwen2, whose layer_types name the layers, has "
                           f"biases on Q, K, V)")
            else:
                family = "mistral"
    else:
        bad = [f"positions={cfg.positions!r} with norm={cfg.norm!r} (GPT2 and GPT-Neo need "
               f"learned + layernorm, Llama/Qwen2 rotary + rmsnorm)"] + scaled
        family = ""
    if bad:
        raise UserError("this model does not map to a Hugging Face architecture: " + "; ".join(bad))
    return family


def _hf_config(cfg: GPTConfig, family: str, tokenizer: Any, dtype: torch.dtype) -> dict:
    # Every id written, null where there is none (no tokenizer, or one without BOS): left
    # out, transformers takes its own defaults (Llama's 1 and 2, GPT-2's 50256, outside a small
    # vocabulary). The BOS token's id is written even where prompts do not start with it.
    cfg = _with_export_scale(cfg)
    ids: dict[str, int | None] = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    if tokenizer is not None:
        ids.update(bos_token_id=tokenizer.hf.token_to_id(tokenizer.bos_token)
                   if tokenizer.bos_token else None,
                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "torch_dtype": str(dtype).removeprefix("torch."), **ids}
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_positions": cfg.context, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads, "n_inner": cfg.ff_dim,
                "activation_function": _GPT2_ACTIVATIONS[cfg.activation],
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout,
                "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                # written where false alone: an export of the default scale is as it was
                **({} if cfg.attention_scale is None else {"scale_attn_weights": False})}
    if family == "gpt_neo":
        local = _local_layers(cfg)
        kinds = ["local" if i in local else "global" for i in range(cfg.n_layers)]
        return {"architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo", **common,
                "max_position_embeddings": cfg.context, "hidden_size": cfg.d_model,
                "num_layers": cfg.n_layers, "num_heads": cfg.n_heads,
                "intermediate_size": cfg.ff_dim,
                "activation_function": _GPT2_ACTIVATIONS[cfg.activation],
                "layer_norm_epsilon": cfg.norm_eps,
                # transformers writes both: the pattern, and the list its model reads.
                "attention_types": _neo_attention_types(kinds), "attention_layers": kinds,
                # read on local layers alone: where there are none, a band that masks nothing
                "window_size": cfg.attention_window if local else cfg.context,
                "resid_dropout": cfg.dropout, "embed_dropout": cfg.dropout,
                "attention_dropout": cfg.dropout}
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}[family]
    out = {"architectures": [arch],
           "model_type": family, **common, "hidden_size": cfg.d_model,
           "intermediate_size": cfg.ff_dim, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.dim_head, "hidden_act": "silu", "max_position_embeddings": cfg.context,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           # transformers >= 5 reads rope_parameters, 4.x rope_theta: write both.
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           # Its attention weights alone: gptlab's rate on embeddings and residual branches
           # has no place here.
           "attention_dropout": 0.0}
    local = _local_layers(cfg)
    if family == "qwen2":
        # transformers 5 reads layer_types; max_window_layers (from which layer on the window
        # applies, as transformers 4 reads it) says the same where the local layers are last.
        out.update(use_sliding_window=bool(local), sliding_window=cfg.attention_window
                   if local else None, max_window_layers=local[0] if local else cfg.n_layers,
                   layer_types=["sliding_attention" if i in local else "full_attention"
                                for i in range(cfg.n_layers)])
    elif family == "mistral":
        out.update(sliding_window=cfg.attention_window)
    else:
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    return out


def _neo_attention_types(kinds: list[str]) -> list:
    """GPT-Neo's attention_types for each layer's kind: one kind or an alternating pair
    repeated ([[["global", "local"], 12]]), else each run of one kind."""
    n = len(kinds)
    if n % 2 == 0 and kinds == kinds[:2] * (n // 2):
        pattern = kinds[:1] if kinds[0] == kinds[1] else kinds[:2]
        return [[pattern, n // len(pattern)]]
    return [[[kind], len(list(run))] for kind, run in itertools.groupby(kinds)]


def _hf_state(model: GPT, family: str) -> dict[str, Tensor]:
    cfg = model.config
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")  # transformers re-ties it from the config
    if family != "gpt2":
        names = _gpt_neo_names(cfg) if family == "gpt_neo" else _llama_names(cfg)
        return {names[k]: v.contiguous() for k, v in sd.items()}
    out = {"transformer.wte.weight": sd["tok_emb.weight"],
           "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["final_norm.weight"],
           "transformer.ln_f.bias": sd["final_norm.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            for s in ("weight", "bias"):
                out[f"{h}{theirs}.{s}"] = sd[f"{b}{ours}.{s}"]
        # Conv1D stores (in, out): transpose back; fuse Q, K, V into c_attn.
        out[h + "attn.c_attn.weight"] = torch.cat(
            [sd[f"{b}attn.{p}_proj.weight"] for p in "qkv"], 0).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[f"{b}attn.{p}_proj.bias"] for p in "qkv"])
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")):
            out[f"{h}{theirs}.weight"] = sd[f"{b}{ours}.weight"].t()
            out[f"{h}{theirs}.bias"] = sd[f"{b}{ours}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


# The files an export writes (the tokenizer's with one), each replaced atomically, and those
# it replaces without writing, which transformers would read beside them (a stale template,
# EOS or added tokens).
HF_EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "generation_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "added_tokens.json")


def _export_dir(out_dir: str | Path, overwrite: bool) -> tuple[Path, list[Path]]:
    """(the export's directory, made if missing; the directories made for it): one that
    holds an export's files is refused unless `overwrite`."""
    held = [name for name in HF_EXPORT_FILES if (Path(out_dir) / name).exists()]
    if held and not overwrite:
        raise UserError(f"already holds {', '.join(held)}; pass overwrite=True to replace "
                        f"them, or choose another directory", path=out_dir, field="out_dir")
    made = missing_dirs(out_dir)
    return ensure_dir(out_dir), made


@reports_path_errors
def export_hf(model: GPT, tokenizer: Any, out_dir: str | Path, *,
              overwrite: bool = False) -> Path:
    """Write a Hugging Face directory (GPT2, GPT-Neo, Llama, Mistral or Qwen2; for the
    encoder-decoder Transformer, Marian: `gptlab.interop.marian`) that transformers loads,
    with tokenizer.json and a tokenizer_config.json carrying the chat template; a tokenizer
    that starts sequences with BOS keeps doing so there (add_bos_token, and a
    post-processor). A directory that holds an export's files (another model's) is
    refused, as `convert --to hf` refuses it, unless `overwrite`: then every file of the old
    export (`HF_EXPORT_FILES`, config.json first: a directory with one has its weights in
    place) is moved aside before the new ones are written (`old_files_aside`), so that an
    export without a tokenizer leaves none of the old one's behind. A failed export (a full
    disk at the weights) leaves `out_dir` as it was: the files it wrote removed, the old ones
    put back, `out_dir` removed if it made it; the old files are deleted only once the new
    export is whole."""
    from safetensors.torch import save_file

    if isinstance(model, ScalarHeadModel):
        # transformers' *ForSequenceClassification scores with a linear layer without bias:
        # the head's bias and the normalisation (score mean 0 on the SFT samples) have no place.
        raise UserError("a reward or value model does not export to Hugging Face: the score "
                        "layer of transformers' *ForSequenceClassification has no bias, so this "
                        "model's head bias and score normalisation would be lost and its scores "
                        "would differ; use the directory itself (gptlab ppo --reward DIR)")
    from gptlab.model.transformer import Transformer
    if isinstance(model, Transformer):  # the 2017 encoder-decoder: transformers' Marian
        from gptlab.interop.marian import check_marian, export_marian
        check_marian(model)
        if tokenizer is None:
            raise UserError("an encoder-decoder exports with its tokenizer, which gives its "
                            "decoder's first token, padding and EOS: this one has none")
        out, made = _export_dir(out_dir, overwrite)
        with old_files_aside(out, HF_EXPORT_FILES, made):
            export_marian(model, tokenizer, out)
        return out
    if not isinstance(model, GPT):
        raise UserError(f"only decoder-only GPT models and the encoder-decoder Transformer "
                        f"export to Hugging Face, not {type(model).__name__}")
    family = _export_family(model.config)
    dtype = model.tok_emb.weight.dtype
    # Made first: a number JSON cannot hold (an infinite rope_theta) is refused before any
    # file is written, not after the weights.
    config = strict_json(_hf_config(model.config, family, tokenizer, dtype),
                         path=Path(out_dir) / "config.json", indent=2)
    out, made = _export_dir(out_dir, overwrite)
    with old_files_aside(out, HF_EXPORT_FILES, made):
        if tokenizer is not None:
            # tokenizer.json (with a post-processor that prepends BOS where the model starts
            # with it) + tokenizer_config.json with the chat template
            tokenizer.save(out)
            tcfg_path = out / "tokenizer_config.json"
            tcfg = read_json(tcfg_path)
            tcfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
            tcfg["model_max_length"] = model.config.context
            write_json_atomic(tcfg_path, tcfg)
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(_hf_state(model, family), str(tmp), metadata={"format": "pt"})
        # config.json last: a directory with one has its weights in place.
        write_text_atomic(out / "config.json", config + "\n")
    if tokenizer is not None and family == "qwen2":
        _note_qwen2_tokenizer(out, tokenizer, tcfg)
    return out


def _note_qwen2_tokenizer(out: Path, tokenizer: Any, tcfg: dict) -> None:
    """Note where transformers 5 reads the exported tokenizer otherwise than gptlab: for every
    model_type qwen2 it builds Qwen2Tokenizer from tokenizer.json's vocabulary and merges with
    Qwen2's own normalizer and split, whatever class the directory names (the check
    `load_tokenizer` notes when it reads such a directory)."""
    from gptlab.tokenizer import byte_level_rebuild_differs, listed_probes, note_once

    differ, own = byte_level_rebuild_differs(tokenizer.hf, "Qwen2Tokenizer", tcfg)
    if differ:
        note_once(out / "config.json",
                  f"field 'model_type': qwen2: transformers 5 reads this model's tokenizer as "
                  f"Qwen2Tokenizer, built from the vocabulary and merges of tokenizer.json with "
                  f"{own}, not the file's normalizer and pre-tokenizer, so its ids differ from "
                  f"gptlab's (on {listed_probes(differ)}); transformers 4 reads "
                  f"tokenizer.json as written, as gptlab does")
