"""gptlab's encoder-decoder Transformer as transformers' `MarianMTModel`, the same 2017
architecture: post-norm layers, sinusoidal positions, embeddings ×√d_model and shared by the
encoder, the decoder and the output layer. The one difference is the order of the sinusoid's
features: interleaved here (sin, cos, sin, cos, ...), sines then cosines there, at the same
frequencies. Marian's table is gptlab's with its features permuted, so every weight is
written with the model's d_model features in that order (embedding columns, the inputs of
every projection that reads the residual stream, the outputs and biases of those that write
it, every norm): a model of the same function that keeps Marian's own positions, which
transformers builds anew at each load.

    hf_model = to_marian(model, pad_id=tok.pad_id, start_id=..., eos_id=tok.eos_id)
    export_marian(model, tok, "out/marian")      # what `gptlab convert --to hf` writes

Both give the same logits and the same greedy decoding (tests/test_transformer_vs_marian.py);
`to_marian` is the peer `bench/seq2seq_step.py` times and needs transformers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptlab.errors import UserError
from gptlab.model.transformer import Transformer

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}


def check_marian(model: Transformer) -> None:
    """Refuse, naming each reason, a Transformer that MarianMTModel cannot hold."""
    cfg = model.config
    why = []
    if cfg.prenorm:
        why.append("it is pre-norm (Marian's layers are post-norm)")
    if not cfg.tie_embeddings:
        why.append("its embeddings are not shared with the output layer (Marian's are)")
    if cfg.activation not in _ACTIVATIONS:
        why.append(f"its activation {cfg.activation!r} is none of Marian's")
    if cfg.norm_eps != 1e-5:
        why.append(f"its norm_eps is {cfg.norm_eps} (Marian's LayerNorm takes 1e-5)")
    if why:
        raise UserError("has no MarianMTModel of the same function: " + "; ".join(why),
                        field="model")


def marian_config(model: Transformer, pad_id: int, start_id: int, eos_id: int) -> dict:
    """The config.json of `model`'s MarianMTModel."""
    cfg = model.config
    return {
        "architectures": ["MarianMTModel"], "model_type": "marian", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "decoder_vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "encoder_layers": cfg.n_encoder_layers,
        "decoder_layers": cfg.n_decoder_layers, "encoder_attention_heads": cfg.n_heads,
        "decoder_attention_heads": cfg.n_heads, "encoder_ffn_dim": cfg.d_ff,
        "decoder_ffn_dim": cfg.d_ff, "max_position_embeddings": cfg.context,
        "activation_function": _ACTIVATIONS[cfg.activation], "dropout": cfg.dropout,
        "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0, "init_std": 0.02, "scale_embedding": True,
        "share_encoder_decoder_embeddings": True, "tie_word_embeddings": True,
        "use_cache": True, "pad_token_id": pad_id, "decoder_start_token_id": start_id,
        "bos_token_id": start_id, "eos_token_id": eos_id, "forced_eos_token_id": None,
    }


def feature_order(d_model: int) -> torch.Tensor:
    """Marian's feature i is gptlab's feature order[i]: the sines (even features), then the
    cosines (odd ones)."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def marian_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """`model`'s weights under MarianMTModel's names, the d_model features in Marian's order
    (its positions' tables are its own; the tied embedding is stored once, as
    `model.shared.weight`)."""
    order = feature_order(model.config.d_model)
    out: dict[str, torch.Tensor] = {
        "model.shared.weight": model.embed.weight.detach()[:, order].contiguous()}
    attn = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "out_proj"}
    parts = {"encoder": {"attn": "self_attn", "attn_norm": "self_attn_layer_norm",
                         "mlp.up": "fc1", "mlp.down": "fc2", "mlp_norm": "final_layer_norm"},
             "decoder": {"self_attn": "self_attn", "self_norm": "self_attn_layer_norm",
                         "cross_attn": "encoder_attn", "cross_norm": "encoder_attn_layer_norm",
                         "mlp.up": "fc1", "mlp.down": "fc2", "mlp_norm": "final_layer_norm"}}
    for side, layers in (("encoder", model.encoder), ("decoder", model.decoder)):
        for i, layer in enumerate(layers):
            for name, tensor in layer.state_dict().items():
                module, _, kind = name.rpartition(".")  # "attn.q_proj", "weight"
                head, _, proj = module.rpartition(".")
                if proj in attn and head in parts[side]:
                    theirs = f"{parts[side][head]}.{attn[proj]}"
                else:
                    theirs = parts[side][module]
                t = tensor.detach()
                if module.endswith("norm"):  # over the features: permuted with them
                    t = t[order]
                elif proj in ("o_proj", "down"):  # writes the residual stream
                    t = t[order]
                elif kind == "weight":  # q, k, v and up read it
                    t = t[:, order]
                out[f"model.{side}.layers.{i}.{theirs}.{kind}"] = t.contiguous()
    return out


def _source_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer as a seq2seq source is encoded: no BOS, EOS last (Marian's `</s>`), by a
    post-processor that transformers' `tokenizer(texts)` applies; a byte-level one that maps
    offsets is kept before it."""
    import json

    import tokenizers
    from tokenizers import processors
    hf = tokenizers.Tokenizer.from_str(tokenizer.hf.to_str())
    eos = tokenizer.eos_token
    append = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A $B {eos}",
                                           special_tokens=[(eos, tokenizer.eos_id)])
    own = json.loads(hf.to_str()).get("post_processor")
    if own is not None and own.get("type") == "ByteLevel":
        hf.post_processor = processors.Sequence([hf.post_processor, append])
    else:  # none, or one that adds special tokens of its own (a BOS first)
        hf.post_processor = append
    return hf


def export_marian(model: Transformer, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write `model` as a transformers MarianMTModel directory (config.json, model.safetensors,
    and the tokenizer as tokenizer.json read by `PreTrainedTokenizerFast`), the files of an
    export written atomically, config.json last, into `out_dir`, which `export_hf`'s caller
    has checked. Needs safetensors only."""
    from safetensors.torch import save_file

    from gptlab.io import atomic_path, ensure_dir, read_json, strict_json, write_json_atomic, \
        write_text_atomic
    from gptlab.train.seq2seq import start_id
    check_marian(model)
    config = strict_json(marian_config(model, tokenizer.pad_id, start_id(tokenizer),
                                       tokenizer.eos_id), indent=2)
    out = ensure_dir(out_dir)
    tokenizer.save(out)
    tcfg_path = out / "tokenizer_config.json"
    tcfg = read_json(tcfg_path)
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg["model_max_length"] = model.config.context
    tcfg["add_bos_token"] = False
    write_json_atomic(tcfg_path, tcfg)
    write_text_atomic(out / "tokenizer.json", _source_tokenizer(tokenizer).to_str())
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(marian_state_dict(model), str(tmp), metadata={"format": "pt"})
    write_text_atomic(out / "config.json", config + "\n")
    return out


def to_marian(model: Transformer, pad_id: int, start_id: int, eos_id: int) -> Any:
    """A `MarianMTModel` computing what `model` computes (in eval mode, as `model` is left).
    `pad_id`, `start_id` and `eos_id` are the tokenizer's padding, the decoder's first token
    and EOS, which Marian's `generate` reads from its config."""
    from transformers import MarianConfig, MarianMTModel
    check_marian(model)
    hf = MarianMTModel(MarianConfig(**marian_config(model, pad_id, start_id, eos_id)))
    missing, unexpected = hf.load_state_dict(marian_state_dict(model), strict=False)
    # Left as Marian makes them: its positions, the embeddings tied to `shared`, and
    # final_logits_bias, zeros, as gptlab's output layer has no bias.
    own = {"final_logits_bias", "lm_head.weight", "model.encoder.embed_tokens.weight",
           "model.decoder.embed_tokens.weight", "model.encoder.embed_positions.weight",
           "model.decoder.embed_positions.weight"}
    left = [k for k in missing if k not in own]
    if left or unexpected:
        raise RuntimeError(f"MarianMTModel's weights do not match: missing {left}, "
                           f"unexpected {unexpected}")
    return hf.to(model.embed.weight.device).eval()
