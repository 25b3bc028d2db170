"""GPT: a decoder-only Transformer, with the options that span GPT-1/2/3 and today's open
models (Llama, Mistral, Qwen2, SmolLM)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.model.attention import (Attention, KVCache, is_right_padded, local_attention_mask,
                                    rotary_cos_sin, self_attention_mask)
from gptlab.model.layers import MLP, make_norm, positions_from_mask, sinusoidal_table


@dataclass
class GPTConfig:
    """The shape of a GPT (GPT-1/2/3 and Llama-style models): sizes, positions, norm,
    activation, biases, tying and dropout; `gptlab.model.get_preset` gives the papers' ones."""

    vocab_size: int = 50257
    context: int = 1024             # the longest sequence the model takes (positions)
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None   # None: = n_heads (plain multi-head attention)
    d_model: int = 768
    d_ff: int | None = None         # None: 4 * d_model
    head_dim: int | None = None     # None: d_model // n_heads
    positions: str = "learned"      # learned | sinusoidal | rotary
    rope_theta: float = 10000.0
    norm: str = "layernorm"         # layernorm | rmsnorm
    norm_eps: float = 1e-5
    prenorm: bool = True            # False: post-norm, as the 2017 Transformer and GPT-1
    activation: str = "gelu_tanh"   # gelu | gelu_tanh | relu | silu | swiglu
    bias: bool = True               # biases on linear layers and norms
    qkv_bias: bool | None = None    # None: = bias (Qwen2: biases on Q, K, V only)
    tie_embeddings: bool = True
    dropout: float = 0.0
    # Local (banded) attention, as GPT-3's alternating layers and GPT-Neo's: a local layer's
    # query sees the `attention_window` latest tokens, itself included. None: dense everywhere.
    attention_window: int | None = None
    local_attention_layers: str | list[int] = "all"  # all | odd | even | layer indices from 0
    # What multiplies QKᵀ before the softmax. None: 1/√dim_head, as the Transformer paper's
    # scaled dot product; GPT-Neo's is 1 (it does not scale).
    attention_scale: float | None = None

    def __post_init__(self) -> None:
        if self.positions not in ("learned", "sinusoidal", "rotary"):
            raise ValueError(f"positions must be learned, sinusoidal or rotary, "
                             f"not '{self.positions}'")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads}), or set head_dim")
        if self.positions == "rotary" and self.dim_head % 2:
            raise ValueError(f"rotary positions turn pairs of dimensions: the head dimension "
                             f"({self.dim_head}) must be even")
        if self.attention_window is not None and self.attention_window < 1:
            raise ValueError(f"attention_window must be at least 1 (or None: dense attention), "
                             f"not {self.attention_window}")
        scale = self.attention_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not 0 < scale < math.inf):
            raise ValueError(f"attention_scale must be a finite number above 0 (or None: "
                             f"1/sqrt(head dimension)), not {scale!r}")
        layers = self.local_attention_layers
        named = isinstance(layers, str) and layers in ("all", "odd", "even")
        listed = isinstance(layers, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers
            for i in layers) and len(set(layers)) == len(layers)
        if not (named or listed):
            raise ValueError(f"local_attention_layers must be all, odd, even or a list of "
                             f"distinct layer indices from 0 to {self.n_layers - 1}, "
                             f"not {layers!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    def is_local(self, layer: int) -> bool:
        """Whether `layer` (from 0) attends through the window."""
        if self.attention_window is None:
            return False
        layers = self.local_attention_layers
        if isinstance(layers, list):
            return layer in layers
        return layers == "all" or layer % 2 == (layers == "odd")


class Block(nn.Module):
    """Attention and FFN sub-layers, each in a residual connection with a norm (pre or post)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.bias,
                              cfg.qkv_bias, cfg.dropout, cfg.attention_scale)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg.d_model, cfg.ff_dim, cfg.activation, cfg.bias, cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, layer: int, **attn_kwargs) -> tuple[Tensor, Tensor | None]:
        if self.prenorm:
            a, w = self.attn(self.attn_norm(x), layer=layer, **attn_kwargs)
            x = x + self.resid_dropout(a)
            return x + self.mlp(self.mlp_norm(x)), w
        a, w = self.attn(x, layer=layer, **attn_kwargs)
        x = self.attn_norm(x + self.resid_dropout(a))
        return self.mlp_norm(x + self.mlp(x)), w


class GPT(nn.Module):
    """Decoder-only Transformer: (B, T) token ids -> (B, T, vocab) logits; see `forward`."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.context, cfg.d_model),
                                 persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        # Post-norm stacks end on a norm already; pre-norm needs one before the head.
        self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) \
            if cfg.prenorm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init)
        # GPT-2: a pre-norm stream sums the residual projections unnormalised, so they start
        # scaled by 1/sqrt(2 * n_layers) and its variance does not grow with depth. Post-norm
        # (GPT-1) normalises after every add: N(0, 0.02) throughout, as its paper says.
        if cfg.prenorm:
            for name, p in self.named_parameters():
                if name.endswith(("o_proj.weight", "down.weight")):
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))

    def reset_buffers(self) -> None:
        """Recompute the buffers no checkpoint holds (the sinusoidal table), for a model whose
        weights were loaded onto the meta device's shapes."""
        if "pos_table" in self._buffers:
            self.pos_table = sinusoidal_table(self.config.context, self.config.d_model)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def num_params(self) -> int:
        """Parameters in the model, a tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, max_len: int | None = None,
                  left_padded: bool = False) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (default: the context),
        on the weights' device and dtype.

        `left_padded`: the caller promises each row is left padding, then real tokens only
        (`generate`'s layout); the local layers then keep only their window's latest positions
        (see `KVCache`), else every position, masked past the window."""
        cfg = self.config
        p = self.tok_emb.weight
        local = [i for i in range(cfg.n_layers) if cfg.is_local(i)] if left_padded else []
        return KVCache(cfg.n_layers, batch, cfg.kv_heads, max_len or cfg.context, cfg.dim_head,
                       p.device, p.dtype, window=cfg.attention_window if local else None,
                       local_layers=local)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None, cache: KVCache | None = None,
                      need_weights: bool = False, right_padded: bool | None = None,
                      longest_row: int | None = None) -> tuple[Tensor, list[Tensor]]:
        """Final hidden states (B, T, d) and, if asked, each layer's attention weights.

        attention_mask (B, S) marks real tokens (1) over every position the keys cover, cached
        ones included (S = cache.length + T). Without it and without a cache, attention is
        plain causal.

        `right_padded`: whether the caller knows the mask to be right padding only (see
        `is_right_padded`), as where the batch was laid out from lengths on the host; None:
        the mask is read, which on a GPU waits for the device. Used without a cache only.

        `longest_row`: the most real tokens of any row, cached ones included, where the caller
        knows it (the engine counts them on the host); the context check of a padded batch
        longer than the context then reads no mask (on a GPU, a wait every token).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        longest = past + T
        if longest > self.config.context and attention_mask is not None \
                and position_ids is None:
            # Positions count real tokens: a padded batch (generate's rows, each continued to
            # its own limit) may be longer than the context while every row fits it.
            longest = int(attention_mask.sum(-1).max()) if longest_row is None else longest_row
        if longest > self.config.context:
            raise ValueError(f"sequence of {longest} tokens exceeds the context of "
                             f"{self.config.context}")
        if attention_mask is not None and attention_mask.shape[1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, "
                             f"expected cache length + T = {past + T}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, T)
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if attention_mask is not None and cache is None and (
                is_right_padded(attention_mask) if right_padded is None else right_padded):
            # Under causal attention real tokens never see the padding after them, so the fast
            # causal path gives the same outputs for them. A gap of padding inside a row needs
            # the mask.
            attention_mask = None
        mask = self_attention_mask(attention_mask, B, past, T, input_ids.device)
        window = self.config.attention_window
        # Within the window a local layer is a dense one: its band is needed past it only.
        local_mask = mask
        if window is not None and past + T > window:
            span = cache.window_span(T) if isinstance(cache, KVCache) else None
            if span is None:
                local_mask = local_attention_mask(attention_mask, B, past, T, window,
                                                  input_ids.device)
            else:  # a cache that keeps the window's positions alone: the band over those
                first, roll = span
                kept = None if attention_mask is None else attention_mask[:, first:]
                local_mask = local_attention_mask(kept, B, past - first, T, window,
                                                  input_ids.device).roll(roll, -1)
        x = self.tok_emb(input_ids)
        rotary = None
        if self.config.positions == "learned":
            x = x + self.pos_emb(position_ids)
        elif self.config.positions == "sinusoidal":
            x = x + self.pos_table[position_ids]
        else:
            rotary = rotary_cos_sin(position_ids, self.config.dim_head, self.config.rope_theta,
                                    x.dtype)
        x = self.drop(x)
        weights = []
        for i, block in enumerate(self.blocks):
            m = local_mask if self.config.is_local(i) else mask
            x, w = block(x, i, mask=m, is_causal=m is None and T > 1, rotary=rotary,
                         cache=cache, need_weights=need_weights)
            if w is not None:
                weights.append(w)
        if cache is not None:
            cache.length += T
        return self.final_norm(x), weights

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: KVCache | None = None,
                labels: Tensor | None = None, last_only: bool = False,
                all_targets: bool = False, right_padded: bool | None = None,
                longest_row: int | None = None) -> Tensor:
        """Logits (B, T, V), or the mean cross-entropy against `labels` (-100 = ignore;
        `all_targets`: the caller knows there is none, see `lm_loss`).

        `last_only` computes the head on the last position only (generation needs no more);
        `right_padded` and `longest_row` as in `hidden_states`.
        """
        h, _ = self.hidden_states(input_ids, attention_mask, position_ids, cache,
                                  right_padded=right_padded, longest_row=longest_row)
        if labels is not None:
            return self.lm_loss(h, labels, all_targets=all_targets)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def lm_loss(self, h: Tensor, labels: Tensor, targets: Tensor | None = None,
                all_targets: bool = False) -> Tensor:
        """The mean cross-entropy of the head on final hidden states `h` (..., d) against
        `labels` (...; -100 = ignore). The head runs only where there is a label: a prompt's
        positions cost no vocabulary-wide logits (on a 49k-token vocabulary, most of a step's
        activation memory).

        Finding those positions reads `labels` on the host, and on a GPU each read waits for
        the device (three, with the backward's). A caller that knows them says so: `targets`,
        their flat indices in `labels` (found on the CPU, where the batch was built), or
        `all_targets`, every position has one (pretraining's blocks). The loss and gradients
        are the same bit for bit."""
        if targets is not None:
            h, labels = h.flatten(0, -2).index_select(0, targets), labels.flatten()[targets]
        elif not all_targets:
            keep = labels != -100
            if not bool(keep.all()):
                h, labels = h[keep], labels[keep]
        logits = self.lm_head(h)
        return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
