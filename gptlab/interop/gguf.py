"""GGUF files (llama.cpp) in and out. In: hyperparameters and tokenizer from the metadata,
tensors dequantized to float, llama.cpp's Q/K row permutation undone, GPT-2's fused Q/K/V
split. Out (`export_gguf`): a Llama-shaped GPT as arch `llama` (or `qwen2`, biases on Q, K, V
alone), a GPT-2-shaped one as `gpt2`, with a byte-level BPE tokenizer, the same mapping the
other way.

Supported: architectures `llama` (Llama, Mistral, SmolLM, TinyLlama), `qwen2` and `gpt2`, with a
byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2": GPT-2, Llama 3, Qwen2, SmolLM) or a
SentencePiece BPE one with byte fallback ("llama": Llama 1 and 2, Mistral 7B v0.1, TinyLlama).
Both become a Hugging Face `tokenizers.Tokenizer` that encodes as llama.cpp does. Everything else
is refused with a UserError that says what and why.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from gptlab.errors import NotFound, UserError, check_bool, reports_path_errors
from gptlab.interop.hf import Named, check_heads, assemble
from gptlab.model.gpt import GPT, GPTConfig

SUPPORTED_GGUF = ("llama", "qwen2", "gpt2")

# How each `tokenizer.ggml.pre` splits text before BPE (llama.cpp's pre-tokenizer regexes).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"gpt-2": None, "default": None, "smollm": "digits",
               "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# llama.cpp's Llama-3 vocabularies take a word that is a whole token as that token, merges or
# not (Hugging Face's `ignore_merges`), and add BOS unless the metadata says otherwise.
_LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe")

# llama.cpp's token types (tokenizer.ggml.token_type); 0 is "undefined", read as normal.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4  # 5: unused, 6: byte (<0x0A>)
_TOKEN_TYPES = range(7)
_SPACE = "\u2581"  # SentencePiece writes a space as "▁"


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError("reading .gguf files needs the gguf package: install gptlab[hf]") from None
    return gguf


class _Meta:
    """Typed access to a GGUF file's key-value metadata."""

    def __init__(self, reader: Any, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except UnicodeDecodeError as e:  # gguf decodes a string value only when it is read
            raise UserError(f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at byte offset "
                            f"{e.start} of the value cannot be decoded (is the file corrupt?)",
                            path=self.path, field=key) from None

    def need(self, key: str) -> Any:
        v = self.get(key)
        if v is None:
            raise UserError("required metadata key is missing", path=self.path, field=key)
        return v

    def count(self, key: str, default: int | None = None) -> int:
        """A positive integer; without a default the key is required."""
        v = self.need(key) if default is None else self.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"must be a positive integer, got {v!r}", path=self.path, field=key)
        return v

    def positive(self, key: str, default: float | None = None) -> float:
        """A finite positive number (epsilon, rope base); without a default, required."""
        v = self.need(key) if default is None else self.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                or v <= 0:
            raise UserError(f"must be a finite positive number, got {v!r}", path=self.path,
                            field=key)
        return float(v)

    def float32(self, key: str, default: float | None = None) -> float:
        """`positive`, read as llama.cpp reads it (a float32), given as the shortest decimal
        that is that float32: 1e-05, not 9.99999974738e-06. gptlab computes with it in float32
        (norms' eps, rotary's base), so either number computes the same."""
        with np.errstate(over="ignore"):  # too large for a float32: inf, refused below
            v = np.float32(self.positive(key, default))
        if not 0 < v < np.inf:
            raise UserError(f"must be a finite positive float32, got {float(v)!r}",
                            path=self.path, field=key)
        return float(str(v))


def _gguf_config(meta: _Meta, arch: str, tensor_names: set[str], n_vocab: int) -> GPTConfig:
    a = arch + "."
    if meta.get(a + "attention.sliding_window") is not None:
        # llama.cpp's llama, qwen2 and gpt2 read no window (they attend over the whole
        # context) and its converter writes none for them (a Mistral or Qwen2 window is lost on
        # the way): which function such a file holds, the window's or llama.cpp's, is not known.
        raise UserError(f"sliding-window attention is not supported in a GGUF {arch}: "
                        f"llama.cpp reads no window for it and attends over the whole context, "
                        f"so the file does not say which of the two the model computes; "
                        f"convert the Hugging Face directory instead", path=meta.path,
                        field=a + "attention.sliding_window")
    if meta.get(a + "expert_count", 0):
        raise UserError("mixture-of-experts models are not supported", path=meta.path,
                        field=a + "expert_count")
    if arch == "gpt2":
        return _gpt2_config(meta, tensor_names, n_vocab)
    scaling = meta.get(a + "rope.scaling.type")
    if (scaling not in (None, "none") or meta.get(a + "rope.scaling.factor", 1.0) != 1.0
            or "rope_freqs.weight" in tensor_names):
        raise UserError(f"rope scaling ('{scaling or 'rope_freqs'}') is not supported",
                        path=meta.path, field=a + "rope.scaling.type")
    d, h = meta.count(a + "embedding_length"), meta.count(a + "attention.head_count")
    kv = meta.count(a + "attention.head_count_kv", h)
    explicit_head_dim = a + "attention.key_length" in meta.fields
    check_heads(d, h, kv, explicit_head_dim, meta.path, (a + "embedding_length",
                a + "attention.head_count", a + "attention.head_count_kv"))
    head_dim = meta.count(a + "attention.key_length", d // h)
    if meta.count(a + "rope.dimension_count", head_dim) != head_dim:
        raise UserError("partial rotary embeddings are not supported", path=meta.path,
                        field=a + "rope.dimension_count")
    has_bias = "blk.0.attn_q.bias" in tensor_names
    return GPTConfig(vocab_size=meta.count(a + "vocab_size", n_vocab or None),
                     context=meta.count(a + "context_length"),
                     n_layers=meta.count(a + "block_count"), n_heads=h,
                     n_kv_heads=kv, d_model=d, d_ff=meta.count(a + "feed_forward_length"),
                     head_dim=None if head_dim * h == d else head_dim, positions="rotary",
                     rope_theta=meta.float32(a + "rope.freq_base", 10000.0), norm="rmsnorm",
                     norm_eps=meta.float32(a + "attention.layer_norm_rms_epsilon"),
                     prenorm=True, activation="swiglu", bias=False,
                     qkv_bias=True if has_bias else None,
                     tie_embeddings="output.weight" not in tensor_names)


def _gpt2_config(meta: _Meta, tensor_names: set[str], n_vocab: int) -> GPTConfig:
    """llama.cpp's gpt2: learned positions (one per position of the context), pre-norm
    LayerNorm, GELU (tanh, ggml_gelu), biases everywhere, QKᵀ divided by √(d / heads)."""
    d, h = meta.count("gpt2.embedding_length"), meta.count("gpt2.attention.head_count")
    check_heads(d, h, h, False, meta.path, ("gpt2.embedding_length",
                "gpt2.attention.head_count", "gpt2.attention.head_count_kv"))
    # GPT-2's heads: as many keys as queries, each d / heads wide (llama.cpp's converter
    # writes neither key; one that says otherwise is no GPT-2).
    for key, want in (("gpt2.attention.head_count_kv", h), ("gpt2.attention.key_length", d // h),
                      ("gpt2.attention.value_length", d // h)):
        if meta.count(key, want) != want:
            raise UserError(f"must be {want} in a GGUF gpt2 (GPT-2 has {h} key/value heads of "
                            f"{d // h}, gpt2.embedding_length / gpt2.attention.head_count), got "
                            f"{meta.get(key)}", path=meta.path, field=key)
    return GPTConfig(vocab_size=meta.count("gpt2.vocab_size", n_vocab or None),
                     context=meta.count("gpt2.context_length"),
                     n_layers=meta.count("gpt2.block_count"), n_heads=h,
                     d_model=d, d_ff=meta.count("gpt2.feed_forward_length"),
                     positions="learned", norm="layernorm",
                     norm_eps=meta.float32("gpt2.attention.layer_norm_epsilon"), prenorm=True,
                     activation="gelu_tanh", bias=True,
                     tie_embeddings="output.weight" not in tensor_names)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's rotary halves (rows i, i + D/2 -> 2i, 2i + 1) to suit
    its rope kernel; gptlab rotates halves, as Hugging Face does. Invert that row order."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_NAMES = {"token_embd.weight": "tok_emb.weight", "position_embd.weight": "pos_emb.weight",
          "output_norm.weight": "final_norm.weight", "output_norm.bias": "final_norm.bias",
          "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_q": "attn.q_proj",
          "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
          "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down"}


def _gguf_name(ours: str, arch: str) -> str | None:
    """The GGUF tensor gptlab's parameter `ours` is read from (gpt2's Q, K and V: the fused
    attn_qkv), for the message that names one missing."""
    top = {o: g for g, o in _NAMES.items()}
    if ours in top:
        return top[ours]
    parts = ours.split(".")  # blocks.{i}.{kind}.{weight|bias}, kind maybe dotted
    if len(parts) < 4 or parts[0] != "blocks":
        return None
    kind = ".".join(parts[2:-1])
    if arch == "gpt2" and kind in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
        return f"blk.{parts[1]}.attn_qkv.{parts[-1]}"
    return next((f"blk.{parts[1]}.{g}.{parts[-1]}" for g, o in _BLOCK.items() if o == kind),
                None)


def _our_name(name: str) -> str | None:
    if name in _NAMES:
        return _NAMES[name]
    parts = name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"blocks.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    return None


def _tensors(reader: Any, gguf: Any, cfg: GPTConfig, arch: str, path: Path, dtype: torch.dtype
             ) -> tuple[Named, list[str]]:
    """(gptlab name -> (GGUF name, tensor in `dtype`), the GGUF tensors gptlab has no place
    for). Each tensor is cast as it is dequantized: the file stays memory-mapped, and only one
    float32 tensor lives at a time beside the model's own."""
    named: Named = {}
    unused: list[str] = []
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.{i}.{kind}.{weight|bias}
        piece = parts[2] if len(parts) == 4 and parts[0] == "blk" else None
        fused = arch == "gpt2" and piece == "attn_qkv"
        ours = _our_name(t.name)
        # llama.cpp's gpt2 reads Q, K and V fused alone: apart, they are not its model's.
        if arch == "gpt2" and piece in ("attn_q", "attn_k", "attn_v"):
            ours = None
        if ours is None and not fused:
            unused.append(t.name)
            continue
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, KeyError, ValueError) as e:
            kind = getattr(t.tensor_type, "name", t.tensor_type)
            raise UserError(f"tensor {t.name}: quantization type {kind} is not supported "
                            f"({e})", path=path) from None
        w = np.asarray(w, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute(w, cfg.n_heads)
        elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute(w, cfg.kv_heads)
        if fused:
            for proj, a in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(w, cfg, t.name, path)):
                named[f"blocks.{parts[1]}.attn.{proj}.{parts[3]}"] = (
                    t.name, torch.from_numpy(a).to(dtype))
            continue
        if not w.flags.writeable:  # unquantized tensors come back as views of the mmap
            w = w.copy()
        named[ours] = (t.name, torch.from_numpy(np.ascontiguousarray(w)).to(dtype))
    return named, unused


def _split_qkv(w: np.ndarray, cfg: GPTConfig, name: str, path: Path) -> list[np.ndarray]:
    """GPT-2's attn_qkv (rows: Q's, then K's, then V's) as Q, K, V, each its own copy."""
    q, kv = cfg.n_heads * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    if w.shape[0] != q + 2 * kv:
        raise UserError(f"tensor {name} has shape {tuple(w.shape)}, but the config implies "
                        f"{(q + 2 * kv, *w.shape[1:])}: Q's {q} rows, then K's and V's "
                        f"{kv} each", path=path)
    return [np.array(part) for part in np.split(w, [q, q + kv])]


def _merge(entry: Any, k: int, vocab: dict[str, int], meta: _Meta) -> tuple[str, str]:
    """Merge `k` of tokenizer.ggml.merges, "left right", as a pair of tokens of the vocabulary;
    `tokenizers` refused a bad one with a bare Exception."""
    left, _, right = entry.partition(" ") if isinstance(entry, str) else ("", "", "")
    if not left or not right:
        raise UserError(f"entry {k} ({entry!r}) must be two tokens separated by a space",
                        path=meta.path, field="tokenizer.ggml.merges")
    for token in (left, right, left + right):
        if token not in vocab:
            raise UserError(f"entry {k} ({entry!r}) needs the token {token!r}, which "
                            f"tokenizer.ggml.tokens does not have", path=meta.path,
                            field="tokenizer.ggml.merges")
    return left, right


def _listed_merges(meta: _Meta, vocab: dict[str, int], required: str | None = None
                   ) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges, each checked by `_merge`, in rank order (`required`: why a file
    without the key is refused). A merge listed again keeps its first rank, as llama.cpp ranks
    it; `tokenizers` would move it to its last (transformers' GGUF loader does), and join other
    pairs first. The repeats are noted."""
    from gptlab.tokenizer import note_once

    key = "tokenizer.ggml.merges"
    listed = meta.get(key)
    if listed is None and required:
        raise UserError(f"required metadata key is missing: {required}", path=meta.path,
                        field=key)
    listed = listed or []
    if not isinstance(listed, list):
        raise UserError(f"must be a list of merges (\"left right\"), got {type(listed).__name__}",
                        path=meta.path, field=key)
    first: dict[tuple[str, str], int] = {}
    repeats: list[tuple[int, int, str]] = []
    for k, entry in enumerate(listed):
        pair = _merge(entry, k, vocab, meta)
        if pair in first:
            repeats.append((k, first[pair], entry))
        else:
            first[pair] = k
    if repeats:
        k, j, entry = repeats[0]
        note_once(meta.path, f"field 'tokenizer.ggml.merges': {len(repeats)} "
                             f"{'entry repeats' if len(repeats) == 1 else 'entries repeat'} an "
                             f"earlier one (the first: entry {k}, {entry!r}, "
                             f"is entry {j}); each merge keeps its first rank, as llama.cpp ranks "
                             f"it (transformers' GGUF loader takes the last)")
    return list(first)


def _token_types(meta: _Meta, n: int) -> list[int]:
    """tokenizer.ggml.token_type, one llama.cpp type (0 to 6) per token; all normal if absent."""
    key = "tokenizer.ggml.token_type"
    types = meta.get(key) or [_NORMAL] * n
    if len(types) != n:  # zip() would leave the last tokens' types unread
        raise UserError(f"has {len(types)} entries, one per token, but tokenizer.ggml.tokens has "
                        f"{n}", path=meta.path, field=key)
    bad = next((k for k, ty in enumerate(types) if ty not in _TOKEN_TYPES), None)
    if bad is not None:
        raise UserError(f"entry {bad} is {types[bad]!r}, not a token type (0 to 6: undefined, "
                        f"normal, unknown, control, user-defined, unused, byte)", path=meta.path,
                        field=key)
    return types


def _byte_level_bpe(meta: _Meta, tokens: list[str]) -> Any:
    """GPT-2's byte-level BPE, its text split first as `tokenizer.ggml.pre` says."""
    from tokenizers import decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_SPLITS:
        raise UserError(f"pre-tokenizer '{pre}' is not supported (supported: "
                        f"{', '.join(_PRE_SPLITS)})", path=meta.path, field="tokenizer.ggml.pre")
    vocab = {t: i for i, t in enumerate(tokens)}
    # Without merges no token of several characters is ever reached: every text was encoded a
    # byte a token, in silence (llama.cpp refuses such a file). A vocabulary of single bytes
    # (besides its special tokens) needs none, and gguf writes no empty list.
    types = _token_types(meta, len(tokens))
    long = next((k for k, (t, ty) in enumerate(zip(tokens, types))
                 if ty == _NORMAL and len(t) > 1), None)
    why = None if long is None else (f"the vocabulary's tokens of several characters (the "
                                     f"first: token {long}, {tokens[long]!r}) are reached only "
                                     f"by merging")
    merges = _listed_merges(meta, vocab, required=why)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                ignore_merges=pre in _LLAMA3_PRES))
    hf.pre_tokenizer = _byte_level_split(pre)
    hf.decoder = decoders.ByteLevel()
    return hf


def _byte_level_split(pre: str) -> Any:
    """The pre-tokenizer of `tokenizer.ggml.pre` `pre` (a key of _PRE_SPLITS): import builds
    it, export finds a tokenizer's name by it."""
    from tokenizers import Regex, pre_tokenizers

    split = _PRE_SPLITS[pre]
    # GPT-2's split is ByteLevel's own regex; a Llama-3 or Qwen2 split replaces it.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                          use_regex=split in (None, "digits"))
    if split == "digits":  # SmolLM: every digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    if split is not None:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    return byte_level


def _flag(meta: _Meta, key: str) -> bool | None:
    v = meta.get(key)
    return None if v is None else check_bool(v, key, meta.path)


def _scores(meta: _Meta, n: int) -> list[float] | None:
    """tokenizer.ggml.scores, one finite number per token (SentencePiece's log-probabilities,
    by which its BPE ranks the pieces); None if absent."""
    key = "tokenizer.ggml.scores"
    scores = meta.get(key)
    if scores is None:
        return None
    if len(scores) != n:
        raise UserError(f"has {len(scores)} entries, one per token, but tokenizer.ggml.tokens "
                        f"has {n}", path=meta.path, field=key)
    bad = next((k for k, v in enumerate(scores) if not isinstance(v, (int, float))
                or isinstance(v, bool) or not math.isfinite(v)), None)
    if bad is not None:
        raise UserError(f"entry {bad} is {scores[bad]!r}, not a finite number", path=meta.path,
                        field=key)
    return [float(v) for v in scores]


def _merges_by_score(tokens: list[str], types: list[int], scores: list[float]
                     ) -> list[tuple[str, str]]:
    """SentencePiece BPE joins, of all adjacent pairs whose join is a piece, the one whose piece
    scores highest: that is BPE whose merges are every split of every piece into two pieces,
    ranked by the joined piece's score. Only normal and user-defined pieces take part, as in
    SentencePiece: a control, unknown, unused or byte token is never the result of a merge.
    Equal scores are ranked by token id: see `_tied_pieces`."""
    pieces = {t: i for i, t in enumerate(tokens) if types[i] in (0, _NORMAL, _USER_DEFINED)}
    ranked = [(-scores[i], i, k) for piece, i in pieces.items() for k in range(1, len(piece))
              if piece[:k] in pieces and piece[k:] in pieces]
    ranked.sort()
    return [(tokens[i][:k], tokens[i][k:]) for _, i, k in ranked]


def _tied_pieces(merges: list[tuple[str, str]], vocab: dict[str, int], scores: list[float]
                 ) -> list[list[int]]:
    """The pieces merges make that share a score, in groups of equal score. Of equal-score pairs
    SentencePiece and llama.cpp join the leftmost in the text; `tokenizers` ranks every merge
    apart, and no ranking says "leftmost": with "ab" and "ba" tied, "aba" needs ab first and
    "bab" ba first. Ranked by token id, such pairs where they overlap can join otherwise."""
    by_score: dict[float, list[int]] = {}
    for i in dict.fromkeys(vocab[left + right] for left, right in merges):
        by_score.setdefault(scores[i], []).append(i)
    return [ids for ids in by_score.values() if len(ids) > 1]


def _sentencepiece_bpe(meta: _Meta, tokens: list[str], types: list[int],
                       unk: str | None) -> Any:
    """SentencePiece BPE with byte fallback, run as SentencePiece and llama.cpp run it: a space
    is "▁"; one "▁" starts the text and every run of text after a special token
    (add_space_prefix, on unless the metadata says otherwise), so " hi" is "▁▁hi"; pieces merge
    by the file's merges or else by their scores; a character the vocabulary lacks is spelled
    by its UTF-8 bytes, <0xNN>. Decoding reverses all of it."""
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    from gptlab.tokenizer import note_once

    vocab = {t: i for i, t in enumerate(tokens)}
    scores = _scores(meta, len(tokens))
    listed = meta.get("tokenizer.ggml.merges")
    if listed:
        merges = _listed_merges(meta, vocab)
    elif scores is None:
        raise UserError("required metadata key is missing: a SentencePiece vocabulary without "
                        "tokenizer.ggml.merges is merged by its pieces' scores", path=meta.path,
                        field="tokenizer.ggml.scores")
    else:
        merges = _merges_by_score(tokens, types, scores)
        tied = _tied_pieces(merges, vocab, scores)
        if tied:
            a, b = tied[0][:2]
            note_once(meta.path, f"field 'tokenizer.ggml.scores': {sum(map(len, tied))} pieces "
                                 f"share their score with another ({tokens[a]!r} and "
                                 f"{tokens[b]!r}: {scores[a]:g}); llama.cpp joins the leftmost "
                                 f"of equal-score pairs, gptlab the one of lower token id, so "
                                 f"where two such pairs overlap the ids can differ from "
                                 f"llama.cpp's")
    prefix = _flag(meta, "tokenizer.ggml.add_space_prefix")
    prefix = True if prefix is None else prefix
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                byte_fallback=True))
    # A normalizer, not a Metaspace pre-tokenizer: it runs on each stretch of text between
    # added tokens, and Metaspace prepends no "▁" to text that starts with a space.
    hf.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPACE)] * prefix + [normalizers.Replace(" ", _SPACE)])
    hf.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + [decoders.Strip(" ", 1, 0)] * prefix)
    return hf


def _gguf_tokenizer(meta: _Meta) -> Any:
    """The tokenizer the metadata describes (see the module docstring), wrapped in gptlab's
    Tokenizer; None if the file has none."""
    from tokenizers import AddedToken

    from gptlab.tokenizer import Tokenizer, note_once

    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind not in ("gpt2", "llama"):
        raise UserError(f"tokenizer model '{kind}' is not supported (supported: 'gpt2', "
                        f"byte-level BPE, and 'llama', SentencePiece BPE with byte fallback)",
                        path=meta.path, field="tokenizer.ggml.model")
    tokens: list[str] = meta.need("tokenizer.ggml.tokens")
    # A string value is no vocabulary (it was read as one token a character), and a token that
    # is no string failed deep in `tokenizers` (a traceback) or blamed the merges.
    if not isinstance(tokens, list):
        raise UserError(f"must be a list of the vocabulary's tokens (strings), got "
                        f"{type(tokens).__name__}", path=meta.path, field="tokenizer.ggml.tokens")
    bad = next((k for k, t in enumerate(tokens) if not isinstance(t, str)), None)
    if bad is not None:
        raise UserError(f"entry {bad} is {tokens[bad]!r}, not a token (a string)",
                        path=meta.path, field="tokenizer.ggml.tokens")
    types = _token_types(meta, len(tokens))

    def token_id(key: str, lenient: str | None = None, default: int | None = None
                 ) -> int | None:
        # llama.cpp's converter writes no id it has no token for: one past the vocabulary is a
        # damaged file, and taken as "none" it silently dropped a BOS the model was trained with.
        # `lenient` (padding, which no prompt holds; an end of generation besides EOS, without
        # which EOS and the template's end of turn still stop): a note saying what happens
        # instead, and no token, as llama.cpp warns.
        # `default`: the id llama.cpp assumes where the file names none.
        # Notes are printed once per process per file (`note_once`), as a Hugging Face
        # directory's: the pipeline's stages and PPO's three models each load the file.
        i = meta.get(key)
        if i is None:
            if default is None or default >= len(tokens):
                return None
            note_once(meta.path, f"field '{key}' is missing; token {default} "
                                 f"({tokens[default]!r}) is taken for it, as llama.cpp takes it "
                                 f"for a SentencePiece ('llama') vocabulary")
            return default
        if not isinstance(i, int) or isinstance(i, bool):
            raise UserError(f"must be a token id, got {i!r}", path=meta.path, field=key)
        if not 0 <= i < len(tokens):
            message = f"must be the id of a token of the vocabulary (0 to {len(tokens) - 1}), " \
                      f"got {i}"
            if lenient is None:
                raise UserError(message, path=meta.path, field=key)
            note_once(meta.path, f"field '{key}': {message}; {lenient}")
            return None
        return i

    def token(key: str, lenient: str | None = None, default: int | None = None) -> str | None:
        i = token_id(key, lenient, default)
        return None if i is None else tokens[i]

    if kind == "gpt2":
        hf, unk = _byte_level_bpe(meta, tokens), None
    else:  # SentencePiece's <unk>: what a character with no byte tokens becomes
        # The file's id, else its token of type unknown, else token 0, as llama.cpp takes it
        # (Llama's layout); without one such a character was dropped from the text unseen.
        typed = next((t for t, ty in zip(tokens, types) if ty == _UNKNOWN), None)
        unk = token("tokenizer.ggml.unknown_token_id",
                    default=0 if typed is None else None) or typed
        hf = _sentencepiece_bpe(meta, tokens, types, unk)
    # Control tokens (<|im_start|>, <s>) must never be split, and decode away with skip_special,
    # as SentencePiece's <unk> does.
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _CONTROL or t == unk])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    # llama.cpp takes BOS 1 and EOS 2 for a SentencePiece vocabulary that names neither (as in
    # Llama's own <unk>, <s>, </s>); a byte-level one has no such convention.
    spm = kind == "llama"
    eos = token("tokenizer.ggml.eos_token_id", default=2 if spm else None)
    if eos is None:
        meta.need("tokenizer.ggml.eos_token_id")
    bos = token("tokenizer.ggml.bos_token_id", default=1 if spm else None)
    add_bos = _flag(meta, "tokenizer.ggml.add_bos_token")
    if add_bos and bos is None:
        raise UserError("is true, but there is no tokenizer.ggml.bos_token_id to add",
                        path=meta.path, field="tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp adds BOS to Llama-3 and SentencePiece vocabularies
        add_bos = kind == "llama" or meta.get("tokenizer.ggml.pre") in _LLAMA3_PRES
    if _flag(meta, "tokenizer.ggml.add_eos_token"):
        note_once(meta.path, "field 'tokenizer.ggml.add_eos_token': true, but gptlab ends a "
                             "sequence with EOS only where a stage needs one (a pretraining "
                             "document, a chat turn by its template), not after every prompt")
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise UserError(f"must be a Jinja template string, got {template!r}", path=meta.path,
                        field="tokenizer.chat_template")
    # BOS goes before a prompt only if the model was trained so; the chat template gets it anyway.
    pad = token("tokenizer.ggml.padding_token_id",
                lenient="padding with the end-of-text token instead")
    # Ends of generation besides EOS, as llama.cpp's: the end of turn (Llama 3's <|eot_id|>,
    # Gemma's <end_of_turn>) and of a tool-call message (<|eom_id|>).
    ends = [token_id(key, lenient="generation does not stop at it")
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    tok = Tokenizer(hf, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template,
                    add_bos=add_bos, end_ids=[i for i in ends if i is not None])
    # A template that will not compile, or none, is reported when a conversation is rendered:
    # by this file's key for it.
    tok.template_file, tok.template_field = meta.path, "tokenizer.chat_template"
    return tok


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[GPT, Any]:
    """(GPT, Tokenizer) from a .gguf file."""
    gguf = _require_gguf()
    p = Path(path)
    if not p.is_file():
        raise NotFound("GGUF file not found", path=p)
    try:
        reader = gguf.GGUFReader(str(p))
    except (ValueError, OSError, KeyError, IndexError) as e:  # IndexError: a truncated file
        unknown = re.fullmatch(r"(?:np\.uint32\()?(\d+)\)? is not a valid GGMLQuantizationType",
                               str(e))
        if unknown:  # a tensor type newer than the gguf package, not a damaged file
            raise UserError(f"a tensor has type id {unknown[1]}, which the installed gguf "
                            f"package ({_version('gguf')}) does not know: upgrade it (pip install "
                            f"-U gguf), or use a file quantized to a type it knows",
                            path=p) from None
        raise UserError(f"not a readable GGUF file ({type(e).__name__}: {e})", path=p) from None
    meta = _Meta(reader, p)
    arch = meta.need("general.architecture")
    if arch not in SUPPORTED_GGUF:
        raise UserError(f"architecture '{arch}' is not supported (supported: "
                        f"{', '.join(SUPPORTED_GGUF)})", path=p, field="general.architecture")
    tokenizer = _gguf_tokenizer(meta)
    n_vocab = len(meta.get("tokenizer.ggml.tokens") or [])
    try:
        cfg = _gguf_config(meta, arch, {t.name for t in reader.tensors}, n_vocab)
    except (TypeError, ValueError) as e:  # GPTConfig's own checks (an odd rotary head_dim)
        raise UserError(str(e), path=p) from None
    named, unused = _tensors(reader, gguf, cfg, arch, p, dtype)  # tied: no output.weight
    return assemble(cfg, named, unused, p, dtype, lambda ours: _gguf_name(ours, arch)), tokenizer


# --- export ------------------------------------------------------------------------------------

# --dtype -> (the GGUF type of each matrix, general.file_type). Vectors (norm gains, biases) stay
# F32, as llama.cpp's converter writes them.
GGUF_DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"),
               "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# Each pre-tokenizer export can name, under llama.cpp's name for it (the first of _PRE_SPLITS'
# names of that split).
_EXPORT_PRES = ("gpt-2", "smollm", "llama-bpe", "qwen2")
_OURS = {ours: theirs for theirs, ours in _NAMES.items()}
_OURS_BLOCK = {ours: theirs for theirs, ours in _BLOCK.items()}


def gguf_arch(cfg: GPTConfig) -> str:
    """'llama' or 'qwen2' (biases on Q, K, V alone) for rotary positions, 'gpt2' for learned
    ones, or a UserError naming every setting that architecture cannot say, the field of the
    first as its field."""
    from gptlab.interop.hf import _local_layers, _with_export_scale

    cfg = _with_export_scale(cfg)  # a scale that is the default's in float32 is the default
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    gpt2 = cfg.positions == "learned"
    wants = (("norm", "layernorm", ""),
             ("activation", "gelu_tanh", ", GPT-2's gelu_new: llama.cpp's gpt2 runs GELU's tanh "
                                         "approximation"),
             ("prenorm", True, ""), ("bias", True, "")) if gpt2 else (
        ("positions", "rotary", ", or 'learned' for gpt2"), ("norm", "rmsnorm", ""),
        ("activation", "swiglu", ""), ("prenorm", True, ""), ("bias", False, ""))
    bad = [(k, f"{k}={getattr(cfg, k)!r} (needs {want!r}{why})") for k, want, why in wants
           if getattr(cfg, k) != want]
    if gpt2 and cfg.bias and cfg.qkv_bias is False:
        bad.append(("qkv_bias", "qkv_bias=False (needs True: GPT-2's Q, K, V have biases)"))
    if gpt2 and (cfg.kv_heads != cfg.n_heads or cfg.dim_head * cfg.n_heads != cfg.d_model):
        field = "n_kv_heads" if cfg.kv_heads != cfg.n_heads else "head_dim"
        bad.append((field, f"n_kv_heads={cfg.n_kv_heads!r}, head_dim={cfg.head_dim!r} (GPT-2 "
                           f"has n_heads key/value heads of d_model / n_heads)"))
    if cfg.attention_scale is not None:
        bad.append(("attention_scale", f"attention_scale={cfg.attention_scale!r} (llama.cpp "
                                       f"divides QKᵀ by √head_dim)"))
    local = _local_layers(cfg)
    if local:
        bad.append(("attention_window", f"attention_window={cfg.attention_window} on "
                                        f"local_attention_layers={cfg.local_attention_layers!r} "
                                        f"(llama.cpp's llama, qwen2 and gpt2 read no window: "
                                        f"they attend over the whole context)"))
    if bad:
        raise UserError(f"this model does not map to GGUF's "
                        f"{'gpt2' if gpt2 else 'llama or qwen2'} architecture: "
                        + "; ".join(why for _, why in bad), field=bad[0][0])
    return "gpt2" if gpt2 else "qwen2" if qkv_bias else "llama"


def _pre_json(pre_tokenizer: Any) -> Any:
    """A pre-tokenizer's JSON, without what changes offsets alone (ByteLevel's trim_offsets)."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "trim_offsets"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    return strip(json.loads(pre_tokenizer.__getstate__()) if pre_tokenizer is not None else None)


@dataclass
class GGUFVocab:
    """What `tokenizer.ggml.*` says of a byte-level BPE tokenizer."""
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of a byte-level BPE `tokenizer` (gptlab's own, GPT-2's, Llama 3's,
    Qwen2's, SmolLM's), padded to the model's `vocab_size` with unused tokens [PAD<id>] as
    llama.cpp's converter pads; a UserError saying what GGUF cannot say of any other."""
    hf = tokenizer.hf
    state = json.loads(hf.to_str())
    model = state["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE with byte fallback" if model.get("byte_fallback") \
            else model.get("type")
        raise UserError(f"tokenizer.json's model is {kind}; GGUF export writes byte-level BPE "
                        f"alone (tokenizer.ggml.model 'gpt2')", field="model")
    pre = next((p for p in _EXPORT_PRES
                if _pre_json(_byte_level_split(p)) == _pre_json(hf.pre_tokenizer)), None)
    if pre is None:
        raise UserError(f"tokenizer.json's pre-tokenizer {_pre_json(hf.pre_tokenizer)!r:.120} "
                        f"is none that llama.cpp names (tokenizer.ggml.pre: GPT-2's byte-level "
                        f"split, SmolLM's digits first, Llama 3's or Qwen2's regex)",
                        field="pre_tokenizer")
    if bool(model.get("ignore_merges")) != (pre in _LLAMA3_PRES):
        raise UserError(f"ignore_merges={bool(model.get('ignore_merges'))} with the "
                        f"{pre} split; llama.cpp takes a word that is a token whole with Llama "
                        f"3's split alone", field="model.ignore_merges")
    if hf.normalizer is not None:
        raise UserError(f"tokenizer.json has a normalizer ({type(hf.normalizer).__name__}); "
                        f"llama.cpp's byte-level BPE normalizes nothing, so its ids would "
                        f"differ", field="normalizer")
    if type(hf.decoder).__name__ != "ByteLevel":
        raise UserError(f"tokenizer.json's decoder is {type(hf.decoder).__name__}, not "
                        f"ByteLevel", field="decoder")
    vocab = hf.get_vocab(with_added_tokens=True)
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise UserError("token ids are not 0 to the vocabulary's size less one: GGUF lists "
                        "tokens by id", field="model.vocab")
    if n > vocab_size:
        raise UserError(f"the tokenizer has {n} tokens, more than the model's vocab_size "
                        f"{vocab_size}", field="vocab_size")
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    types = [_NORMAL] * n
    for i, added in hf.get_added_tokens_decoder().items():
        if added.lstrip or added.rstrip or added.single_word:
            raise UserError(f"added token {added.content!r} strips spaces or matches single "
                            f"words, which GGUF has no place for", field="added_tokens")
        types[i] = _CONTROL if added.special else _USER_DEFINED
    taken = set(vocab)
    for i in range(n, vocab_size):  # rows the tokenizer never gives, as llama.cpp pads them
        name = f"[PAD{i}]"
        while name in taken:
            name = f"[{name}]"
        tokens.append(name)
        types.append(5)  # unused
    ends = tokenizer.end_ids
    if len(ends) > 2:
        raise UserError(f"{len(ends)} ends of generation besides EOS "
                        f"({', '.join(map(str, ends))}); GGUF names two (eot_token_id, "
                        f"eom_token_id)", field="eos_token_id")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    odd = next((m for m in merges if m.count(" ") != 1), None)
    if odd is not None:
        raise UserError(f"merge {odd!r} is not two tokens apart: GGUF writes a merge as its "
                        f"two tokens joined by a space", field="model.merges")
    return GGUFVocab(pre, tokens, types, merges)


def _add_tokenizer(w: Any, tokenizer: Any, vocab: GGUFVocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    if tokenizer.bos_token is not None:  # named even where prompts do not start with it
        w.add_bos_token_id(tokenizer.hf.token_to_id(tokenizer.bos_token))
    w.add_add_bos_token(tokenizer.bos_id is not None)  # said: llama.cpp's default varies
    w.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.pad_token is not None:
        w.add_pad_token_id(tokenizer.pad_id)
    # llama.cpp stops at both, as at EOS; the chat template's end of turn is found anew.
    for add, i in zip((w.add_eot_token_id, w.add_eom_token_id), tokenizer.end_ids):
        add(i)
    if tokenizer.chat_template is not None:
        w.add_chat_template(tokenizer.chat_template)


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order: each head's rotary halves interleaved (`_unpermute`'s
    inverse)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _gguf_tensors(model: GPT, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in PyTorch's (out, in) order) for each weight; a tied model
    has no output.weight, as llama.cpp reads it."""
    cfg = model.config
    state = model.state_dict()
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if arch == "gpt2" and (".attn.k_proj." in name or ".attn.v_proj." in name):
            continue  # in attn_qkv, with Q's
        if arch == "gpt2" and ".attn.q_proj." in name:  # GPT-2's one projection: Q, K, V rows
            i, part = name.split(".")[1], name.rsplit(".", 1)[1]
            a = torch.cat([state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj",
                                                                     "v_proj")])
            yield f"blk.{i}.attn_qkv.{part}", a.detach().float().cpu().numpy()
            continue
        if name in _OURS:
            theirs = _OURS[name]
        else:  # blocks.{i}.{kind}.{weight|bias}
            _, i, rest = name.split(".", 2)
            kind, part = rest.rsplit(".", 1)
            theirs = f"blk.{i}.{_OURS_BLOCK[kind]}.{part}"
        a = t.detach().float().cpu().numpy()
        if arch == "llama" and theirs.endswith(("attn_q.weight", "attn_q.bias")):
            a = _permute(a, cfg.n_heads)
        elif arch == "llama" and theirs.endswith(("attn_k.weight", "attn_k.bias")):
            a = _permute(a, cfg.kv_heads)
        yield theirs, np.ascontiguousarray(a)


@reports_path_errors
def export_gguf(model: GPT, tokenizer: Any, out: str | Path, dtype: str = "f32",
                name: str = "gptlab", *, overwrite: bool = False) -> Path:
    """Write `model` (and its byte-level BPE tokenizer, with chat template and BOS/EOS/pad ids)
    as a GGUF file that llama.cpp runs and `load_gguf` and transformers (`gguf_file=`) load:
    arch llama, or qwen2 for biases on Q, K, V alone, or gpt2 for GPT-2's shape. `dtype` is the
    matrices' type (f32, f16 or q8_0; a matrix whose rows do not split in Q8_0's blocks of 32
    goes F16, and gpt2's position embedding F32, as llama.cpp's converter writes them).
    Everything is checked before the file is begun, and it is written to a temporary beside
    `out` and renamed: `out` is whole or untouched. An `out` that exists is refused, as
    `convert --to gguf` refuses it, unless `overwrite`; a directory always."""
    from gptlab.io import atomic_path, check_file_out
    from gptlab.model.heads import ScalarHeadModel

    gguf = _require_gguf()
    if isinstance(model, ScalarHeadModel):
        raise UserError("a reward or value model does not export to GGUF: llama.cpp's llama, "
                        "qwen2 and gpt2 have no scalar head; use the directory itself")
    if not isinstance(model, GPT):
        raise UserError(f"only decoder-only GPT models export to GGUF, not "
                        f"{type(model).__name__}")
    if dtype not in GGUF_DTYPES:
        raise UserError(f"expects one of {', '.join(GGUF_DTYPES)}, not {dtype!r}", field="dtype")
    # A directory is refused as one first: overwrite=True would not replace it.
    out = check_file_out(out)
    if not overwrite and (out.exists() or out.is_symlink()):
        raise UserError("already exists; pass overwrite=True to replace it, or choose another "
                        "file", path=out, field="out")
    cfg = model.config  # no attention scale is written: gguf_arch reads it as export does
    arch = gguf_arch(cfg)
    vocab = None if tokenizer is None else gguf_vocab(tokenizer, cfg.vocab_size)
    kind, file_type = GGUF_DTYPES[dtype]
    qtype = gguf.GGMLQuantizationType[kind]
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            w.add_name(name)  # transformers 4.49's GGUF loader needs one
            w.add_file_type(gguf.LlamaFileType[file_type])
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            w.add_vocab_size(cfg.vocab_size)
            w.add_context_length(cfg.context)
            w.add_embedding_length(cfg.d_model)
            w.add_block_count(cfg.n_layers)
            w.add_feed_forward_length(cfg.ff_dim)
            w.add_head_count(cfg.n_heads)
            if arch == "gpt2":  # as llama.cpp's converter writes GPT-2: no rope, no head sizes
                w.add_layer_norm_eps(cfg.norm_eps)
            else:
                w.add_head_count_kv(cfg.kv_heads)
                w.add_key_length(cfg.dim_head)
                w.add_value_length(cfg.dim_head)
                w.add_rope_dimension_count(cfg.dim_head)  # transformers' llama reads head_dim
                w.add_rope_freq_base(cfg.rope_theta)
                w.add_layer_norm_rms_eps(cfg.norm_eps)
            if vocab is not None:
                _add_tokenizer(w, tokenizer, vocab)
            for tname, a in _gguf_tensors(model, arch):
                # gpt2's position table stays F32 at any dtype, as llama.cpp's converter writes
                # it and llama-quantize leaves it: a lookup, not a matrix product.
                matrix = a.ndim == 2 and tname != "position_embd.weight"
                if matrix and kind == "Q8_0" and a.shape[1] % 32 == 0:
                    w.add_tensor(tname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
                elif matrix and kind != "F32":
                    w.add_tensor(tname, a.astype(np.float16))
                else:
                    w.add_tensor(tname, a)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return out
