"""gptlab's encoder-decoder Transformer as transformers' `MarianMTModel`, the same 2017
architecture: post-norm layers, sinusoidal positions, embeddings ×√d_model and shared by the
encoder, the decoder and the output layer. The one difference, the order of the sinusoid's
features (interleaved sin/cos here, sines then cosines there), is a fixed table, copied over.

    hf_model = to_marian(model, pad_id=tok.pad_id, start_id=..., eos_id=tok.eos_id)

The result gives the same logits and the same greedy decoding (tests/test_transformer_vs_marian.py)
and is the peer `bench/seq2seq_step.py` times. Needs transformers (`pip install gptlab[hf]`).
"""
from __future__ import annotations

from typing import Any

import torch

from gptlab.errors import UserError
from gptlab.model.transformer import Transformer

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}


def _refuse(model: Transformer) -> None:
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


def marian_config(model: Transformer, pad_id: int, start_id: int, eos_id: int) -> Any:
    """The `MarianConfig` of `model`'s shape."""
    from transformers import MarianConfig
    cfg = model.config
    return MarianConfig(
        vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
        max_position_embeddings=cfg.context, activation_function=_ACTIVATIONS[cfg.activation],
        dropout=cfg.dropout, attention_dropout=0.0, activation_dropout=0.0,
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        pad_token_id=pad_id, decoder_start_token_id=start_id, eos_token_id=eos_id,
        forced_eos_token_id=None)


def marian_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """`model`'s weights under MarianMTModel's names (the positions' tables included)."""
    out: dict[str, torch.Tensor] = {"model.shared.weight": model.embed.weight.detach(),
                                    "lm_head.weight": model.embed.weight.detach()}
    for side in ("encoder", "decoder"):
        out[f"model.{side}.embed_tokens.weight"] = model.embed.weight.detach()
        out[f"model.{side}.embed_positions.weight"] = model.pos_table.detach()
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
                out[f"model.{side}.layers.{i}.{theirs}.{kind}"] = tensor.detach()
    return out


def to_marian(model: Transformer, pad_id: int, start_id: int, eos_id: int) -> Any:
    """A `MarianMTModel` computing what `model` computes (in eval mode, as `model` is left).
    `pad_id`, `start_id` and `eos_id` are the tokenizer's padding, the decoder's first token
    and EOS, which Marian's `generate` reads from its config."""
    from transformers import MarianMTModel
    _refuse(model)
    hf = MarianMTModel(marian_config(model, pad_id, start_id, eos_id))
    missing, unexpected = hf.load_state_dict(marian_state_dict(model), strict=False)
    # final_logits_bias is a buffer of zeros, as gptlab's output layer has no bias.
    left = [k for k in missing if k != "final_logits_bias"]
    if left or unexpected:
        raise RuntimeError(f"MarianMTModel's weights do not match: missing {left}, "
                           f"unexpected {unexpected}")
    return hf.to(model.embed.weight.device).eval()
