"""GGUF files (llama.cpp) in: hyperparameters and tokenizer from the metadata, tensors
dequantized to float, llama.cpp's Q/K row permutation undone.

Supported: architectures `llama` (Llama, Mistral, SmolLM, TinyLlama) and `qwen2`, with a
byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2": GPT-2, Llama 3, Qwen2, SmolLM) or a
SentencePiece BPE one with byte fallback ("llama": Llama 1 and 2, Mistral 7B v0.1, TinyLlama).
Both become a Hugging Face `tokenizers.Tokenizer` that encodes as llama.cpp does. Everything else
is refused with a UserError that says what and why.
"""
from __future__ import annotations

import math
import re
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.errors import NotFound, UserError, check_bool
from gptlab.interop.hf import Named, check_heads, assemble
from gptlab.model.gpt import GPT, GPTConfig

SUPPORTED_GGUF = ("llama", "qwen2")

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


def _gguf_config(meta: _Meta, arch: str, tensor_names: set[str], n_vocab: int) -> GPTConfig:
    a = arch + "."
    scaling = meta.get(a + "rope.scaling.type")
    if (scaling not in (None, "none") or meta.get(a + "rope.scaling.factor", 1.0) != 1.0
            or "rope_freqs.weight" in tensor_names):
        raise UserError(f"rope scaling ('{scaling or 'rope_freqs'}') is not supported",
                        path=meta.path, field=a + "rope.scaling.type")
    if meta.get(a + "attention.sliding_window") is not None:
        # llama.cpp's llama and qwen2 read no window (they attend over the whole context) and
        # its converter writes none for them (a Mistral or Qwen2 window is lost on the way):
        # which function such a file holds, the window's or llama.cpp's, is not known.
        raise UserError(f"sliding-window attention is not supported in a GGUF {arch}: "
                        f"llama.cpp reads no window for it and attends over the whole context, "
                        f"so the file does not say which of the two the model computes; "
                        f"convert the Hugging Face directory instead", path=meta.path,
                        field=a + "attention.sliding_window")
    if meta.get(a + "expert_count", 0):
        raise UserError("mixture-of-experts models are not supported", path=meta.path,
                        field=a + "expert_count")
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
                     rope_theta=meta.positive(a + "rope.freq_base", 10000.0), norm="rmsnorm",
                     norm_eps=meta.positive(a + "attention.layer_norm_rms_epsilon"),
                     prenorm=True, activation="swiglu", bias=False,
                     qkv_bias=True if has_bias else None,
                     tie_embeddings="output.weight" not in tensor_names)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's rotary halves (rows i, i + D/2 -> 2i, 2i + 1) to suit
    its rope kernel; gptlab rotates halves, as Hugging Face does. Invert that row order."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_NAMES = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "final_norm.weight",
          "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_q": "attn.q_proj",
          "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
          "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down"}


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
        ours = _our_name(t.name)
        if ours is None:
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
        if not w.flags.writeable:  # unquantized tensors come back as views of the mmap
            w = w.copy()
        named[ours] = (t.name, torch.from_numpy(np.ascontiguousarray(w)).to(dtype))
    return named, unused


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


def _listed_merges(meta: _Meta, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges, each checked by `_merge`, in rank order. A merge listed again keeps
    its first rank, as llama.cpp ranks it; `tokenizers` would move it to its last (transformers'
    GGUF loader does), and join other pairs first. The repeats are noted."""
    from gptlab.tokenizer import note_once

    first: dict[tuple[str, str], int] = {}
    repeats: list[tuple[int, int, str]] = []
    for k, entry in enumerate(meta.get("tokenizer.ggml.merges") or []):
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
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_SPLITS:
        raise UserError(f"pre-tokenizer '{pre}' is not supported (supported: "
                        f"{', '.join(_PRE_SPLITS)})", path=meta.path, field="tokenizer.ggml.pre")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _listed_merges(meta, vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                ignore_merges=pre in _LLAMA3_PRES))
    split = _PRE_SPLITS[pre]
    # GPT-2's split is ByteLevel's own regex; a Llama-3 or Qwen2 split replaces it.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                          use_regex=split in (None, "digits"))
    if split == "digits":  # SmolLM: every digit on its own, then GPT-2's split
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split is not None:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    else:
        hf.pre_tokenizer = byte_level
    hf.decoder = decoders.ByteLevel()
    return hf


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
    return assemble(cfg, named, unused, p, dtype), tokenizer
