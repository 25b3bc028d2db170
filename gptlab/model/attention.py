"""Multi-head attention: softmax(Q Kᵀ / √d) V, heads concatenated and projected by W_O (or
another scale than 1/√d in place of the division: GPT-Neo's 1).

One module serves self-attention (causal or not), grouped-query attention and encoder–decoder
(cross) attention. The fast path is `scaled_dot_product_attention`; `need_weights=True` takes
the explicit-math path that also returns the attention weights (the two agree; a test checks).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.devices import queued_copy


class KVCache:
    """Preallocated keys and values for every layer, written in place as decoding advances.

    Rows are left-padded, so one write position (`length`) serves the whole batch. Positions
    past `length` are never read (a step writes its own before attending over them), so the
    buffers start uninitialised and `select` copies only the positions written so far.
    `rows` (at most `batch`) is how many rows the batch has now: `select` moves rows within
    the buffers allocated for `batch`, with no new allocation while they fit (on CPU a new
    cache, its memory touched for the first time, cost ten times the copy).

    `window` and `local_layers`: those layers attend through a band of `window` tokens, and
    keep only the latest `window` positions, in a ring (slot = position % window); the other
    layers keep every position. Sound where each row is left padding, then real tokens only
    (as `generate` lays them out): a key `window` positions back is then `window` real tokens
    back, out of every later query's band. A gap of padding inside a row would leave a dropped
    key in the band. A window no shorter than `max_len` never drops a key: those layers are
    kept whole. `window_span` says which positions a local layer's keys hold.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 rows: int | None = None, window: int | None = None,
                 local_layers: list[int] | tuple[int, ...] = ()):
        local = sorted(local_layers) if window is not None and window < max_len else []
        self.window = window if local else None
        # Layer -> its index in the dense buffers, and in the rings (the local layers).
        self._ring = {layer: i for i, layer in enumerate(local)}
        self._dense = {layer: i for i, layer in
                       enumerate(i for i in range(n_layers) if i not in self._ring)}
        shape = (n_layers - len(local), batch, n_kv_heads, max_len, head_dim)
        self._k = torch.empty(shape, device=device, dtype=dtype)
        self._v = torch.empty(shape, device=device, dtype=dtype)
        self.k, self.v = self._k, self._v
        self._wk = self._wv = self.wk = self.wv = None
        if local:
            ring = (len(local), batch, n_kv_heads, window, head_dim)
            self._wk = torch.empty(ring, device=device, dtype=dtype)
            self._wv = torch.empty(ring, device=device, dtype=dtype)
            self.wk, self.wv = self._wk, self._wv
        if rows is not None:
            self.use_rows(rows)
        self.max_len = max_len
        self.length = 0  # tokens written so far
        self.cross: dict[int, tuple[Tensor, Tensor]] = {}  # encoder K/V, computed once per layer

    def use_rows(self, n: int) -> None:
        """The batch has n rows now (at most those allocated), before anything is written."""
        if not 0 <= n <= self._k.shape[1]:
            raise ValueError(f"{n} rows do not fit a cache allocated for {self._k.shape[1]}")
        self.k, self.v = self._k[:, :n], self._v[:, :n]
        if self._wk is not None:
            self.wk, self.wv = self._wk[:, :n], self._wv[:, :n]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's k, v (B, Hkv, T, D) for `layer`; return all keys/values so far
        (a local layer's: those `window_span` says)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        if self._ring:
            if layer in self._ring:
                return self._update_ring(self._ring[layer], k, v)
            layer = self._dense[layer]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def window_span(self, T: int) -> tuple[int, int] | None:
        """Which positions a local layer's keys hold once the next T tokens are written:
        (first, roll), the positions first, first + 1, ... in order, rolled by `roll` along
        the keys (a mask over them in order is `.roll(roll, -1)`). None: the cache keeps
        every position (no window, or one no shorter than the cache)."""
        if self.window is None:
            return None
        W, end = self.window, self.length + T
        if T > 1:  # the ring in order, then the chunk: see _update_ring
            return max(0, self.length - W), 0
        first = max(0, end - W)
        return first, first % W

    def _update_ring(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        W, start, T = self.window, self.length, k.shape[2]
        ring_k, ring_v = self.wk[i], self.wv[i]  # (B, Hkv, W, D)
        if T == 1:  # over the oldest position: the ring's slots as they lie
            ring_k[:, :, start % W] = k[:, :, 0]
            ring_v[:, :, start % W] = v[:, :, 0]
            return ring_k[:, :, :start + 1], ring_v[:, :, :start + 1]
        # A chunk's queries reach up to W - 1 keys before it: the ring's positions in order,
        # then the chunk (W + T keys at most, for this step only); its last W positions stay.
        k_all = torch.cat(_oldest_first(ring_k, start, W) + [k], 2) if start else k
        v_all = torch.cat(_oldest_first(ring_v, start, W) + [v], 2) if start else v
        kept = min(T, W)
        slot = (start + T - kept) % W
        wrap = max(0, slot + kept - W)  # of them, those that go round to slot 0
        for ring, new in ((ring_k, k), (ring_v, v)):
            ring[:, :, slot:slot + kept - wrap] = new[:, :, T - kept:T - wrap]
            ring[:, :, :wrap] = new[:, :, T - wrap:]
        return k_all, v_all

    def select(self, rows: Tensor | list[int]) -> None:
        """Make row i of the batch the current row `rows[i]`: drop finished sequences (rows
        kept in order, none twice), or repeat each of a few prompts' rows (rows[i] <= i, as
        `generate` lays out K continuations of its distinct prompts). Those two move rows
        within the buffers; any other selection copies into new ones. Rows given as a list
        are not read from a device (a wait for a GPU)."""
        n, m = self.length, len(rows)
        order = list(rows) if isinstance(rows, list) else rows.tolist()
        if not self.cross and m <= self._k.shape[1] and all(0 <= r < self.k.shape[1]
                                                             for r in order):
            if all(a < b for a, b in zip(order, order[1:])):  # r >= i: move down, first first
                self._move(list(enumerate(order)), n)
                self.use_rows(m)
                return
            if all(r <= i for i, r in enumerate(order)):  # r <= i: move up, last first
                self.use_rows(m)
                self._move(list(enumerate(order))[::-1], n)
                return
        if isinstance(rows, list):  # only now indexed by them, copied queued
            rows = queued_copy(torch.tensor(order, dtype=torch.long), self._k.device)
        self._k, self._v = self.k[:, rows], self.v[:, rows]
        self.k, self.v = self._k, self._v
        if self._wk is not None:
            self._wk, self._wv = self.wk[:, rows], self.wv[:, rows]
            self.wk, self.wv = self._wk, self._wv
        self.cross = {i: (k[rows], v[rows]) for i, (k, v) in self.cross.items()}

    def _move(self, pairs: list[tuple[int, int]], n: int) -> None:
        """Copy row r to row i for each (i, r) in turn; each source is read before any write
        reaches it (the caller orders the pairs so)."""
        for i, r in pairs:
            if r != i:
                self._k[:, i, :, :n] = self._k[:, r, :, :n]
                self._v[:, i, :, :n] = self._v[:, r, :, :n]
                if self._wk is not None:
                    w = min(n, self.window)
                    self._wk[:, i, :, :w] = self._wk[:, r, :, :w]
                    self._wv[:, i, :, :w] = self._wv[:, r, :, :w]


def _oldest_first(ring: Tensor, start: int, W: int) -> list[Tensor]:
    """The positions before `start` a ring (B, H, W, D) holds, as pieces in position order."""
    if start <= W:
        return [ring[:, :, :start]]
    cut = start % W
    return [ring[:, :, cut:], ring[:, :, :cut]]


# Below this many shared tokens, encoding a prefix apart costs more than sharing it saves.
MIN_SHARED_PREFIX = 16


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Tokens all sequences start with, leaving each at least one of its own; 0 when fewer than
    MIN_SHARED_PREFIX (not worth sharing)."""
    n, first = 0, seqs[0]
    limit = min(len(s) for s in seqs) - 1
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


class PrefixKV:
    """The keys and values of prompts shared by several continuations, kept out of place so
    gradients flow through them (KVCache writes in place and serves inference only).

    Encode the prompts with an empty PrefixKV (it records each layer's K/V), then `expand(rows)`
    gives the cache the continuations read: one row per continuation, `rows[i]` its prompt.
    A reward model scores K responses of one prompt for the price of one prompt. An expanded
    cache serves one forward of the continuations: their own keys and values are not kept.
    """

    def __init__(self, k: list[Tensor] | None = None, v: list[Tensor] | None = None,
                 length: int = 0):
        self.k, self.v = k or [], v or []
        self.length = length
        self.cross: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.length == 0:  # encoding the prompts: record
            self.k.append(k)
            self.v.append(v)
            return k, v
        return torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)

    def expand(self, rows: Tensor | list[int]) -> "PrefixKV":
        # The rows' layout is read once for all layers: on a GPU each read waits for the
        # device, and one a layer made a 30-layer SFT step wait 60 times. Rows given as a list
        # are not read from a device at all.
        runs = row_runs(rows, self.k[0].shape[0]) if self.k else None
        if isinstance(rows, list) and runs is None and self.k:
            # Only then indexed by them, copied queued (a plain copy waits for the device).
            rows = queued_copy(torch.tensor(rows, dtype=torch.long), self.k[0].device)
        return PrefixKV([take_rows(k, rows, runs) for k in self.k],
                        [take_rows(v, rows, runs) for v in self.v], self.length)


def row_runs(rows: Tensor | list[int], n: int) -> list[int] | None:
    """How many times each of 0..n-1 comes in `rows` when rows run through them in order (each
    prompt's continuations together, as every caller lays them out), else None."""
    order = list(rows) if isinstance(rows, list) else rows.tolist()
    if any(r < 0 or r >= n for r in order) or any(a > b for a, b in zip(order, order[1:])):
        return None
    counts = [0] * n
    for r in order:
        counts[r] += 1
    return counts


def take_rows(t: Tensor, rows: Tensor | list[int], runs: list[int] | None) -> Tensor:
    """t[rows] along dim 0. When rows come in sorted runs (`runs`: row_runs(rows, len(t))) it
    is built from broadcast copies, whose backward is a plain sum: indexing's backward
    scatter-adds in an order that varies between runs on CPU threads, which made training runs
    differ in the last bits and then in their results."""
    if runs is None:
        return t[rows]
    return torch.cat([t[i:i + 1].expand(c, *t.shape[1:]) for i, c in enumerate(runs) if c])


def attention_math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                   is_causal: bool = False, dropout_p: float = 0.0,
                   scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Explicit softmax(QKᵀ/√d)V, or softmax(QKᵀ·scale)V. q (B,H,T,D), k/v (B,H,S,D), mask
    broadcastable to (B,H,T,S), True where attention is allowed. Returns (output (B,H,T,D),
    weights (B,H,T,S))."""
    if scale is None:
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    else:
        scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        T, S = scores.shape[-2:]
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if mask is not None:
        # A query that may see no key (a source of padding only) reads nothing, as SDPA has
        # it: softmax over nothing but -inf is NaN.
        weights = weights.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v, weights


def padded_causal_mask(attention_mask: Tensor, T: int) -> Tensor:
    """(B, 1, T, S) bool mask for the last T of S positions: causal and not padding.

    attention_mask (B, S): 1 for real tokens. Each query may also see itself, so a padding
    query attends to something and its (ignored) output stays finite.
    """
    B, S = attention_mask.shape
    q_pos = torch.arange(S - T, S, device=attention_mask.device)[:, None]
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]
    causal = k_pos <= q_pos  # (T, S)
    mask = causal[None] & attention_mask[:, None, :].bool()
    return (mask | (k_pos == q_pos)[None])[:, None]


def is_right_padded(attention_mask: Tensor) -> bool:
    """Whether each row of the mask (B, S) is right padding only: real tokens from its first
    position, then padding. Read on the host: on a GPU it waits for the device (twice)."""
    return bool(attention_mask[:, 0].all()) \
        and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def row_is_right_padded(real: list[tuple[int, int]]) -> bool:
    """`is_right_padded` of one row from its spans of real tokens (start, end), in order,
    known on the host where the row was laid out: no read of a device."""
    real = [(a, b) for a, b in real if b > a]
    return bool(real) and real[0][0] == 0 and all(b == c for (_, b), (c, _) in
                                                  zip(real, real[1:]))


def self_attention_mask(attention_mask: Tensor | None, B: int, past: int, T: int,
                        device: torch.device) -> Tensor | None:
    """The bool mask (B, 1, T, past + T) of T new queries after `past` cached positions:
    causal, and blind to the padding `attention_mask` (B, past + T) marks. None where none is
    needed: without padding, a block with nothing cached before it (`is_causal` says it) or
    a single query (it sees every key)."""
    if attention_mask is not None:
        return padded_causal_mask(attention_mask, T)
    if past > 0 and T > 1:
        return padded_causal_mask(torch.ones(B, past + T, device=device), T)
    return None


def local_attention_mask(attention_mask: Tensor | None, B: int, past: int, T: int, window: int,
                         device: torch.device) -> Tensor:
    """`self_attention_mask`'s (B or 1, 1, T, past + T) in a band: each query sees only the keys
    fewer than `window` real tokens back, itself 0 back (GPT-Neo's and Mistral's windows).
    Distances count the real tokens `attention_mask` marks, so that a padded row reads as the
    row unpadded; under left or right padding they are the sequence's own distances."""
    S = past + T
    if attention_mask is None:
        seen = torch.arange(1, S + 1, device=device)[None]  # (1, S)
    else:
        seen = attention_mask.long().cumsum(-1)  # (B, S) real tokens up to each position
    near = seen[:, -T:, None] - seen[:, None, :] < window  # (B or 1, T, S)
    mask = self_attention_mask(attention_mask, B, past, T, device)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
    return mask & near[:, None]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + D/2) of each head by position-dependent angles. x (B,H,T,D)."""
    return x * cos + rotate_half(x) * sin


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                              dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    """Multi-head attention with `n_kv_heads` ≤ `n_heads` key/value heads (grouped-query):
    query head h reads key/value head h // (n_heads / n_kv_heads), as Llama's layout has it.
    `scale` multiplies QKᵀ (None: 1/√head_dim)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = True, qkv_bias: bool | None = None,
                 dropout: float = 0.0, scale: float | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        self.head_dim = head_dim or d_model // n_heads
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.dropout = dropout
        self.scale = scale

    def _heads(self, x: Tensor, n: int) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, is_causal: bool = False,
                rotary: tuple[Tensor, Tensor] | None = None, memory: Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """x (B,T,d). `memory` (B,S,d) makes this cross-attention (K, V from the encoder).
        `mask` (B or 1, 1, T, S) bool, True = may attend; without one, `is_causal` lets each
        query see the keys up to its own position, the T queries being the last of the S keys.
        Returns (out (B,T,d), weights (B,H,T,S) when `need_weights`, else None)."""
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)
        if memory is not None and cache is not None and layer in cache.cross:
            k, v = cache.cross[layer]
        else:
            src = x if memory is None else memory
            k = self._heads(self.k_proj(src), self.n_kv_heads)
            v = self._heads(self.v_proj(src), self.n_kv_heads)
            if rotary is not None and memory is None:
                cos, sin = rotary
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if cache is not None:
                if memory is None:
                    k, v = cache.update(layer, k, v)
                else:
                    cache.cross[layer] = (k, v)
        S = k.shape[2]
        if is_causal and mask is None and S != T:
            # SDPA's is_causal aligns the first query with the first key; after cached keys the
            # T queries are the last of S, which a mask says.
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        causal = is_causal and mask is None
        if self.n_kv_heads != self.n_heads and need_weights:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = attention_math(q, k, v, mask, causal, p, self.scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=self.scale,
                enable_gqa=self.n_kv_heads != self.n_heads)
            weights = None
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out), weights
