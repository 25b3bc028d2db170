"""Named model shapes from the papers' tables, and two small ones for CPUs."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from gptlab.errors import UserError
from gptlab.model.gpt import GPTConfig
from gptlab.model.transformer import TransformerConfig

if TYPE_CHECKING:
    from gptlab.model.gpt import GPT
    from gptlab.model.transformer import Transformer

# Dropout 0.1 on embeddings, attention weights and residual branches: GPT-2's paper (§2.3)
# "largely follows the details of the OpenAI GPT model", whose paper (§4.1) gives "residual,
# embedding, and attention dropouts with a rate of 0.1", and lists its changes without dropout
# among them; the released models' configuration (transformers' GPT2Config and the
# openai-community/gpt2 config.json) has resid_pdrop = embd_pdrop = attn_pdrop = 0.1.
_GPT2 = dict(vocab_size=50257, context=1024, positions="learned", norm="layernorm",
             prenorm=True, activation="gelu_tanh", bias=True, tie_embeddings=True, dropout=0.1)
# Brown et al. 2020, §2.1: "the same model and architecture as GPT-2 [...] with the exception
# that we use alternating dense and locally banded sparse attention patterns in the layers".
# The paper gives no band width: 256 tokens, GPT-Neo's (EleutherAI's GPT-3 replication), local
# on every second layer as there, layer 0 dense. Dropout is not restated: GPT-2's.
_GPT3 = dict(_GPT2, context=2048, attention_window=256, local_attention_layers="odd")


def _gpt3(n_layers: int, d_model: int, n_heads: int) -> GPTConfig:
    # d_ff = 4 * d_model throughout the GPT-3 table.
    return GPTConfig(**_GPT3, n_layers=n_layers, d_model=d_model, n_heads=n_heads)


PRESETS: dict[str, GPTConfig | TransformerConfig] = {
    # Vaswani et al. 2017, Table 3.
    "transformer-base": TransformerConfig(),
    "transformer-big": TransformerConfig(d_model=1024, n_heads=16, d_ff=4096, dropout=0.3),
    # Radford et al. 2018: 12 layers, 768 wide, 12 heads, 3072 FFN, post-norm, GELU (the tanh
    # form of OpenAI's code), learned positions, 512 tokens, a BPE vocabulary of 40,000 merges
    # (40,478 tokens with the base symbols), dropout 0.1.
    "gpt1": GPTConfig(vocab_size=40478, context=512, n_layers=12, n_heads=12, d_model=768,
                      positions="learned", prenorm=False, activation="gelu_tanh", dropout=0.1),
    "gpt2": GPTConfig(**_GPT2, n_layers=12, d_model=768, n_heads=12),
    "gpt2-medium": GPTConfig(**_GPT2, n_layers=24, d_model=1024, n_heads=16),
    "gpt2-large": GPTConfig(**_GPT2, n_layers=36, d_model=1280, n_heads=20),
    "gpt2-xl": GPTConfig(**_GPT2, n_layers=48, d_model=1600, n_heads=25),
    # Brown et al. 2020, Table 2.1. Two rows are inconsistent as printed; we use
    # n_heads * d_head = d_model: XL has 16 heads of 128, 13B is 5120 wide.
    "gpt3-small": _gpt3(12, 768, 12),
    "gpt3-medium": _gpt3(24, 1024, 16),
    "gpt3-large": _gpt3(24, 1536, 16),
    "gpt3-xl": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
    # CPU sizes: `tiny` trains in seconds (tests); `demo` is the built-in world's model.
    "tiny": GPTConfig(vocab_size=512, context=128, n_layers=2, n_heads=4, d_model=64,
                      positions="rotary", norm="rmsnorm", activation="swiglu", d_ff=192,
                      bias=False, tie_embeddings=True),
    "demo": GPTConfig(vocab_size=2048, context=384, n_layers=4, n_heads=8, n_kv_heads=4,
                      d_model=256, d_ff=704, positions="rotary", norm="rmsnorm",
                      activation="swiglu", bias=False, tie_embeddings=True),
    # The Transformer at CPU sizes: `transformer-tiny` for tests, `transformer-small` for the
    # built-in world's question -> SQL pairs (`gptlab seq2seq`). Post-norm, sinusoidal positions,
    # ReLU, shared embeddings, dropout and label smoothing 0.1, as the paper's base model.
    "transformer-tiny": TransformerConfig(vocab_size=512, context=128, n_encoder_layers=1,
                                          n_decoder_layers=1, n_heads=4, d_model=64, d_ff=128),
    "transformer-small": TransformerConfig(vocab_size=2048, context=256, n_encoder_layers=3,
                                           n_decoder_layers=3, n_heads=4, d_model=256,
                                           d_ff=1024),
}

# The parameter counts the papers state, for the tests: Vaswani et al. Table 3; GPT-2's Table 2,
# whose smallest model "is equivalent to the original GPT" (GPT-1's paper gives no count) and
# whose four it counted with GPT-1's vocabulary; GPT-3's Table 2.1.
PAPER_PARAMS = {
    "transformer-base": 65e6, "transformer-big": 213e6, "gpt1": 117e6,
    "gpt2": 117e6, "gpt2-medium": 345e6, "gpt2-large": 762e6, "gpt2-xl": 1542e6,
    "gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9,
}


def get_preset(name: str, **overrides: Any) -> GPTConfig | TransformerConfig:
    """A fresh copy of a preset's config, with fields replaced by `overrides`."""
    if name not in PRESETS:
        import difflib
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown preset '{name}'{hint} (presets: {', '.join(PRESETS)})",
                        field="model")
    return dataclasses.replace(PRESETS[name], **overrides)


def build_model(config: GPTConfig | TransformerConfig) -> GPT | Transformer:
    """A freshly initialised GPT or Transformer of `config`'s shape."""
    from gptlab.model.gpt import GPT
    from gptlab.model.transformer import Transformer
    return GPT(config) if isinstance(config, GPTConfig) else Transformer(config)
