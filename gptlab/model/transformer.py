"""The 2017 encoder–decoder Transformer ("Attention Is All You Need").

Encoder layer: self-attention, then FFN. Decoder layer: causal self-attention, then
encoder–decoder attention (Q from the decoder, K and V from the encoder output), then FFN.
Each sub-layer sits in a residual connection followed by layer norm (post-norm).
Dropout goes where the paper's §5.4 puts it: on the sums of embeddings and positions, and on
each sub-layer's output before the residual add; not on the attention weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.model.attention import Attention, KVCache, self_attention_mask
from gptlab.model.layers import MLP, positions_from_mask, sinusoidal_table


@dataclass
class TransformerConfig:
    """The shape of an encoder-decoder Transformer (Vaswani et al. 2017 by default)."""

    vocab_size: int = 37000         # one vocabulary shared by source and target
    context: int = 512
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    n_heads: int = 8
    d_model: int = 512
    d_ff: int = 2048
    activation: str = "relu"
    norm_eps: float = 1e-5
    prenorm: bool = False
    dropout: float = 0.1
    label_smoothing: float = 0.1
    tie_embeddings: bool = True     # encoder, decoder and output share one matrix

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")


def _check_mask(name: str, mask: Tensor | None, positions: int, what: str = "") -> None:
    """A padding mask must cover every position its keys do: a shorter one broadcast silently
    (a target's mask without the cached positions read each new token at position 0)."""
    if mask is not None and mask.shape[-1] != positions:
        raise ValueError(f"{name} covers {mask.shape[-1]} positions, expected {what}{positions}")


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.attn = Attention(cfg.d_model, cfg.n_heads)  # no dropout on attention weights
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation, True, cfg.dropout)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, need_weights: bool = False):
        if self.prenorm:
            a, w = self.attn(self.attn_norm(x), mask=mask, need_weights=need_weights)
            x = x + self.drop(a)
            return x + self.mlp(self.mlp_norm(x)), w
        a, w = self.attn(x, mask=mask, need_weights=need_weights)
        x = self.attn_norm(x + self.drop(a))
        return self.mlp_norm(x + self.mlp(x)), w


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.self_attn = Attention(cfg.d_model, cfg.n_heads)
        self.self_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads)
        self.cross_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation, True, cfg.dropout)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def _sublayer(self, x: Tensor, norm: nn.Module, fn) -> tuple[Tensor, Tensor | None]:
        if self.prenorm:
            out, w = fn(norm(x))
            return x + self.drop(out), w
        out, w = fn(x)
        return norm(x + self.drop(out)), w

    def forward(self, x: Tensor, memory: Tensor, self_mask: Tensor | None, is_causal: bool,
                memory_mask: Tensor | None, cache: KVCache | None, layer: int,
                need_weights: bool = False):
        x, w_self = self._sublayer(x, self.self_norm, lambda h: self.self_attn(
            h, mask=self_mask, is_causal=is_causal, cache=cache, layer=layer,
            need_weights=need_weights))
        x, w_cross = self._sublayer(x, self.cross_norm, lambda h: self.cross_attn(
            h, mask=memory_mask, memory=memory, cache=cache, layer=layer,
            need_weights=need_weights))
        if self.prenorm:
            x = x + self.mlp(self.mlp_norm(x))
        else:
            x = self.mlp_norm(x + self.mlp(x))
        return x, (w_self, w_cross)


class Transformer(nn.Module):
    """Encoder–decoder. `src_mask` / `tgt_mask` (B, S) / (B, T) mark real tokens with 1."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.register_buffer("pos_table", sinusoidal_table(cfg.context, cfg.d_model),
                             persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # Post-norm stacks end on a norm already; pre-norm ones need one at the top.
        self.enc_norm = (nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.prenorm
                         else nn.Identity())
        self.dec_norm = (nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.prenorm
                         else nn.Identity())
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, 0.0, cfg.d_model ** -0.5)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_buffers(self) -> None:
        """Recompute the buffers no checkpoint holds (the sinusoidal table), for a model whose
        weights were loaded onto the meta device's shapes."""
        self.pos_table = sinusoidal_table(self.config.context, self.config.d_model)

    def num_params(self) -> int:
        """Parameters in the model, shared embeddings counted once."""
        return sum(p.numel() for p in self.parameters())

    def _embed(self, ids: Tensor, start: int = 0, mask: Tensor | None = None) -> Tensor:
        """The paper multiplies embeddings by sqrt(d_model) before adding the positions. With
        a padding mask (over every position up to these tokens, a cache's included), positions
        count real tokens, so a left-padded sequence reads as the same sequence unpadded (as
        in GPT); otherwise they run from `start`. So a padded batch wider than the context
        fits it where every row's real tokens do, padded on either side, as GPT's does."""
        T = ids.shape[1]
        longest = start + T
        if longest > self.config.context and mask is not None:
            longest = int(mask.sum(-1).max())  # the row with the most real tokens
        if longest > self.config.context:
            raise ValueError(f"sequence of {longest} tokens exceeds the context of "
                             f"{self.config.context}")
        pos = self.pos_table[start:start + T] if mask is None \
            else self.pos_table[positions_from_mask(mask, T)]
        return self.drop(self.embed(ids) * math.sqrt(self.config.d_model) + pos)

    def encode(self, src: Tensor, src_mask: Tensor | None = None,
               need_weights: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Encoder output (B, S, d) and, if asked, each layer's attention weights."""
        _check_mask("src_mask", src_mask, src.shape[1])
        mask = None if src_mask is None else src_mask.bool()[:, None, None, :]  # (B,1,1,S)
        x, weights = self._embed(src, mask=src_mask), []
        for layer in self.encoder:
            x, w = layer(x, mask, need_weights)
            weights.append(w)
        return self.enc_norm(x), weights

    def decode(self, tgt: Tensor, memory: Tensor, src_mask: Tensor | None = None,
               tgt_mask: Tensor | None = None, cache: KVCache | None = None,
               need_weights: bool = False) -> tuple[Tensor, list]:
        """Logits (B, T, V) for target tokens, and each layer's (self, cross) attention
        weights (None unless `need_weights`); with a cache, `tgt` continues what it holds."""
        B, T = tgt.shape
        past = cache.length if cache is not None else 0
        _check_mask("src_mask", src_mask, memory.shape[1])
        _check_mask("tgt_mask", tgt_mask, past + T, "cache length + T = ")
        memory_mask = None if src_mask is None else src_mask.bool()[:, None, None, :]
        self_mask = self_attention_mask(tgt_mask, B, past, T, tgt.device)
        x, weights = self._embed(tgt, past, tgt_mask), []
        for i, layer in enumerate(self.decoder):
            x, w = layer(x, memory, self_mask, self_mask is None and T > 1, memory_mask, cache, i,
                         need_weights)
            weights.append(w)
        if cache is not None:
            cache.length += T
        return self.lm_head(self.dec_norm(x)), weights

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache of the decoder's self-attention for `batch` rows of up to
        `max_len` tokens (default: the context)."""
        cfg = self.config
        p = self.embed.weight
        return KVCache(cfg.n_decoder_layers, batch, cfg.n_heads, max_len or cfg.context,
                       cfg.d_model // cfg.n_heads, p.device, p.dtype)

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """Logits (B, T, V), or label-smoothed cross-entropy against `labels` (-100 = ignore)."""
        memory, _ = self.encode(src, src_mask)
        logits, _ = self.decode(tgt, memory, src_mask, tgt_mask)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               label_smoothing=self.config.label_smoothing)

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, bos_id: int, eos_id: int, max_new_tokens: int,
                      src_mask: Tensor | None = None) -> Tensor:
        """Autoregressive decoding: each produced token is fed back in. Returns (B, N) ids,
        N <= max_new_tokens: it stops when every row has produced EOS (rows done earlier are
        padded with EOS) or when the target fills the context."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            # 0 ended in torch.cat of no tokens, -1 in a cache of negative length.
            raise ValueError(f"max_new_tokens must be an integer of at least 1, "
                             f"got {max_new_tokens!r}")
        memory, _ = self.encode(src, src_mask)
        B = src.shape[0]
        max_new_tokens = min(max_new_tokens, self.config.context)
        cache = self.new_cache(B, max_new_tokens)  # BOS, then every token but the last
        tok = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        out = []
        for _ in range(max_new_tokens):
            logits, _ = self.decode(tok, memory, src_mask, cache=cache)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            tok = torch.where(done[:, None], torch.full_like(tok, eos_id), tok)
            out.append(tok)
            done |= tok[:, 0] == eos_id
            if done.all():
                break
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def beam_search(self, src: Tensor, bos_id: int, eos_id: int, max_new_tokens: int,
                    beam: int = 4, alpha: float = 0.6,
                    src_mask: Tensor | None = None) -> list[list[int]]:
        """The paper's decoding (§6.1): a beam of `beam` hypotheses per source, the finished
        ones ranked by log-probability / lp(Y), the length penalty of Wu et al. 2016,
        lp(Y) = ((5 + |Y|) / 6) ** alpha, |Y| counting EOS. Returns each row's best
        hypothesis, its EOS dropped (one that never ends is cut at `max_new_tokens` and ranked
        among the finished at that length). A row stops once no live hypothesis can beat its
        `beam` best finished: its log-probability only falls and lp at the longest length
        divides it least. `beam` 1 with `alpha` 0 is greedy decoding."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer of at least 1, "
                             f"got {max_new_tokens!r}")
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise ValueError(f"beam must be an integer of at least 1, got {beam!r}")
        B, K = src.shape[0], beam
        max_new_tokens = min(max_new_tokens, self.config.context)

        def lp(n: int) -> float:
            return ((5 + n) / 6) ** alpha

        memory, _ = self.encode(src, src_mask)
        memory = memory.repeat_interleave(K, 0)
        mask = None if src_mask is None else src_mask.repeat_interleave(K, 0)
        cache = self.new_cache(B * K, max_new_tokens)
        tok = torch.full((B * K, 1), bos_id, dtype=torch.long, device=src.device)
        # Each row starts with one live hypothesis: its K - 1 copies score -inf.
        scores = torch.full((B, K), float("-inf"), device=src.device)
        scores[:, 0] = 0.0
        seqs: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = [False] * B
        for t in range(1, max_new_tokens + 1):
            logits, _ = self.decode(tok, memory, mask, cache=cache)
            logp = torch.log_softmax(logits[:, -1].float(), -1)
            V = logp.shape[-1]
            total = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
            top, idx = total.topk(min(2 * K, K * V), dim=-1)  # K live ones remain past EOS
            top, idx = top.tolist(), idx.tolist()
            rows, next_tok, next_scores = [], [], []
            for b in range(B):
                live = []
                for s, i in zip(top[b], idx[b]):
                    if done[b] or len(live) == K or s == float("-inf"):
                        break
                    k, v = divmod(i, V)
                    if v == eos_id or t == max_new_tokens:
                        ended = seqs[b][k] + ([] if v == eos_id else [v])
                        finished[b].append((s / lp(t), ended))
                    else:
                        live.append((s, k, v))
                finished[b] = sorted(finished[b], key=lambda f: -f[0])[:K]
                if not done[b] and len(finished[b]) == K and (
                        not live or live[0][0] / lp(max_new_tokens) <= finished[b][-1][0]):
                    done[b] = True
                live += [(float("-inf"), 0, eos_id)] * (K - len(live))  # done rows idle
                for k, (s, origin, v) in enumerate(live):
                    rows.append(b * K + origin)
                    next_tok.append(v)
                    next_scores.append(s)
                seqs[b] = [seqs[b][origin] + [v] for _, origin, v in live]
            if all(done) or t == max_new_tokens:
                break
            cache.select(rows)
            memory, mask = memory[rows], None if mask is None else mask[rows]
            tok = torch.tensor(next_tok, device=src.device)[:, None]
            scores = torch.tensor(next_scores, device=src.device).view(B, K)
        return [max(f, key=lambda x: x[0])[1] for f in finished]
