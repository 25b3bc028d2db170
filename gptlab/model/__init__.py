"""The models: decoder-only GPT and the encoder–decoder Transformer."""
from gptlab.model.attention import Attention, KVCache, attention_math
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.model.presets import PRESETS, build_model, get_preset
from gptlab.model.transformer import Transformer, TransformerConfig

__all__ = ["Attention", "KVCache", "attention_math", "GPT", "GPTConfig", "Transformer",
           "TransformerConfig", "PRESETS", "get_preset", "build_model"]
