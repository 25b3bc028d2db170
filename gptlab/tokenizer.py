"""Byte-level BPE tokenizer, trained and run by Hugging Face `tokenizers`, and chat rendering.

Byte-level BPE (GPT-2) starts from the 256 byte values, so every string has an encoding and
decoding gives it back exactly. gptlab's own tokenizers add six special tokens:

    <|bos|> <|eos|> <|pad|> <|system|> <|user|> <|assistant|>

Chat format. A conversation is rendered by a Jinja chat template, HF-style. gptlab's built-in
template (`GPTLAB_CHAT_TEMPLATE`) writes `<|bos|>`, then each turn as `<|role|>` "\\n" content
`<|eos|>`; the generation prompt is `<|assistant|>\\n`. Imported tokenizers bring their own
template (e.g. ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n`).

How `render_chat` stays exact: it renders the conversation once with each message's content
replaced by a unique marker, which splits the output into template text and message contents,
then tokenizes the whole text at once, as transformers does (so a template's "[INST] " and the
content's "What" become one " What"), and tells from each token's character offsets which
message, if any, it belongs to. The assistant mask is 1 on the tokens of each assistant
message's content (a token that straddles its edge included), on the template tokens after
it up to and including the first end-of-turn token (`<|eos|>`, `<|im_end|>`, ...: a markup
token, that is a special token or an added token written `<...>` that is not marked special,
or EOS or another of the `end_ids`), and on template text between the answer's generation
prompt and its content, which the model writes (Llama 2's " " after "[/INST]": it has no
generation prompt), 0 everywhere else: the tokens SFT trains on. A user who types "<|eos|>"
must get ordinary tokens, not the special one: when special-token text appears inside a message,
template text and contents are tokenized apart instead, contents with special-token parsing
off (under a SentencePiece tokenizer that puts "▁" before a text, each run of text between the
template's special tokens is tokenized whole, as transformers splits the text there). The
template must write message content verbatim (or stripped, as Llama 3's `| trim` does); one
that rewrites it is a UserError.

A response after its prompt. An imported SentencePiece tokenizer (Llama 2's, Mistral's, a llama
GGUF's) puts "▁", a space, before a text (`prefixes_space`), so a response encoded alone starts
with a "▁" the model does not write after its prompt. A text completion is encoded as TRL does,
the tokens of prompt + completion after the prompt's (`encode_completion`); a response whose
first characters merge with the prompt's last ones across the seam gets no "▁" of its own
(`encode_continuation`); a sampled response is decoded as its prompt's continuation
(`decode_response`), the text that encodes back to its tokens. Byte-level BPE writes a text as
it is: for it these are `encode` and `decode`.

Training and saving. `train_tokenizer` learns a word longer than `LONGEST_TRAINED_WORD` (1,024
bytes) in pieces of that length: the trainer's time is quadratic in a word's length, and encoding
still splits no word. `Tokenizer.save` writes tokenizer_config.json and tokenizer.json as
`hf_as_saved` gives it: with a post-processor that prepends BOS where the model starts sequences
with it, since transformers 5 goes by that post-processor, not by add_bos_token; loading, a
post-processor that prepends BOS beside add_bos_token false starts sequences with BOS, with a note.

transformers 5 builds some tokenizer classes anew from tokenizer.json's vocabulary and merges, with
a normalizer and pre-tokenizer of its own: LlamaTokenizer (a Metaspace), GPT2Tokenizer (GPT-2's
split) and Qwen2Tokenizer (NFC and Qwen2's split, taken for every model_type qwen2). gptlab encodes
as tokenizer.json is written, as transformers 4 does; `load_tokenizer` notes, once per process,
where transformers 5's ids would differ.
"""
from __future__ import annotations

import itertools
import json
import re
import secrets
import sys
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from gptlab.errors import NotFound, UserError, WrongKind, check_bool, reports_path_errors
from gptlab.io import (atomic_path, ensure_dir, missing_dirs, old_files_aside, read_json,
                       write_json_atomic)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# What `Tokenizer.save` writes, tokenizer.json first: moved aside first, no old tokenizer.json
# stands beside the new settings. Then what it replaces without writing: a tokenizer directory
# is read from these too (by gptlab and transformers), and a stale chat_template.jinja or
# special_tokens_map.json in the directory saved to would override the saved template and EOS.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja", "special_tokens_map.json")
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
DEFAULT_SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT)
ROLES = ("system", "user", "assistant")
N_BYTES = 256
# The largest vocabulary `train_tokenizer` takes. `tokenizers` reserves room for the whole
# vocabulary before it reads the corpus: a mistyped size (2**31) aborted the process with an
# allocation failure, and one past 2**64 raised an OverflowError. Real vocabularies stay far
# below (GPT-2's 50,257; Gemma's 262,144).
MAX_VOCAB_SIZE = 2**24
# The longest word (pre-token, in bytes) `train_tokenizer` learns from whole; see there.
LONGEST_TRAINED_WORD = 1024

GPTLAB_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_SPACE = "\u2581"  # SentencePiece writes a space as "▁"

# Names of end-of-sequence tokens in tokenizers imported without a tokenizer_config.json.
_KNOWN_EOS = (EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special tokens and chat template.

    Treat `hf` as read-only after construction: `encode` runs on a copy of it.

    `pad_token` may be None or equal to EOS (imported tokenizers): `pad_id` then falls back to
    `eos_id`. Nothing downstream finds padding by id; it uses the attention mask.

    `add_bos` (HF's `add_bos_token`): whether the model was trained with BOS first. Without it
    `bos_id` is None, so nothing prepends BOS, but the chat template still gets `bos_token`,
    as in HF, and writes it where the template says.

    `extra_special_tokens` (HF's `additional_special_tokens`: chat-turn markers such as
    `<|im_start|>`, `<|eot_id|>`) are special whatever tokenizer.json says: typed in text they
    are text, and `decode` leaves them out. `end_ids` (generation_config.json's
    `eos_token_id`, Llama 3's `<|eom_id|>`, Qwen2's `<|endoftext|>`) end a generation as EOS
    does.
    """

    def __init__(self, hf: tokenizers.Tokenizer, bos_token: str | None, eos_token: str,
                 pad_token: str | None, chat_template: str | None = None, add_bos: bool = True,
                 extra_special_tokens: Sequence[str] = (), end_ids: Iterable[int] = ()):
        if eos_token is None:
            raise UserError("a tokenizer needs an end-of-sequence token", field="eos_token")
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.add_bos = add_bos
        for field, token in (("bos_token", bos_token), ("eos_token", eos_token),
                             ("pad_token", pad_token),
                             *(("additional_special_tokens", t) for t in extra_special_tokens)):
            if token is not None and hf.token_to_id(token) is None:
                raise UserError(f"token {token!r} is not in the vocabulary", field=field)
        self.hf = _marked_special(hf, extra_special_tokens)
        self.extra_special_tokens = tuple(dict.fromkeys(extra_special_tokens))
        end_ids = list(end_ids)
        for i in end_ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise UserError(f"{i!r} is not a token id of this vocabulary (0 to "
                                f"{self.vocab_size - 1})", field="eos_token_id")
        self.end_ids = tuple(i for i in dict.fromkeys(end_ids) if i != self.eos_id)
        if chat_template is None and all(hf.token_to_id(t) is not None
                                         for t in (SYSTEM, USER, ASSISTANT)):
            chat_template = GPTLAB_CHAT_TEMPLATE
        self.chat_template = chat_template
        self.template_file: Path | None = None  # where `load_tokenizer` read the template
        self.template_field = "chat_template"  # its key there (a GGUF's: tokenizer.chat_template)
        self._plain = _without_markup_parsing(self.hf)

    # --- ids ---------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int | None:
        """The BOS that starts a sequence: None when there is none or `add_bos` is off."""
        if self.bos_token is None or not self.add_bos:
            return None
        return self.hf.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.hf.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.eos_id if self.pad_token is None else self.hf.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """The ids' span, the largest id + 1: the embedding rows a model needs (the tokens'
        count where an id is skipped, which `tokenizers` gives, left the last ones without)."""
        return max(self.hf.get_vocab_size(with_added_tokens=True),
                   max(self.hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1)

    @cached_property
    def stop_ids(self) -> set[int]:
        """EOS, the `end_ids`, and the chat template's end-of-turn token."""
        ids = {self.eos_id, *self.end_ids}
        if self.chat_template is None:
            return ids
        try:
            pieces, _ = self._template_pieces([{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "hello"}], False)
        except UserError:
            return ids
        k = pieces.index(1) if 1 in pieces else len(pieces)
        if k + 1 < len(pieces) and isinstance(pieces[k + 1], str):
            toks = self._encode_markup(pieces[k + 1])
            n = self._through_first_markup(toks)
            if n:
                ids.add(toks[n - 1])
        return ids

    @cached_property
    def reply_stops(self) -> tuple[frozenset[int], tuple[str, ...]]:
        """(stop ids, stop strings) that end a chat reply, as the template writes the end of
        an assistant turn and the next user turn's start. The ids: `stop_ids`, and the first
        markup token that text holds (the next turn's `<|user|>` where the reply ends in plain
        "\n"). The strings, for a template whose reply is followed by plain text before any
        markup token ("User: {q}\nAssistant: {a}\n"): that text up to the next turn's
        content, without white space at its end, and at its start a newline where it has one
        ("\nUser:": a model that writes two newlines, or one, stops alike); where the turn
        itself ends in plain text ("<end>\n"), that text too. None for gptlab's, ChatML's or
        Llama's templates, whose turns end in a token."""
        ids = set(self.stop_ids)
        conversation = [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "bye"}]
        try:
            ended, _ = self._template_pieces(conversation[:2], False)
            pieces, _ = self._template_pieces(conversation, False)
        except UserError:
            return frozenset(ids), ()
        if 1 not in pieces or 2 not in pieces or 1 not in ended:
            return frozenset(ids), ()
        texts = ["".join(p for p in ended[ended.index(1) + 1:] if isinstance(p, str)),
                 "".join(pieces[pieces.index(1) + 1:pieces.index(2)])]
        stops = []
        for header, text in enumerate(texts):
            enc = self.hf.encode(text, add_special_tokens=False)
            first = next((k for k, t in enumerate(enc.ids) if t in self._turn_ends), None)
            if first is not None:
                ids.add(enc.ids[first])
                text = text[:enc.offsets[first][0]]
            stop = text.rstrip() if header else text.strip()
            if "\n" in stop[:len(stop) - len(stop.lstrip())]:
                stop = "\n" + stop.lstrip()
            if stop.strip():
                stops.append(stop)
        # One that holds another stops no sooner: the end of turn alone is enough.
        stops = [s for s in dict.fromkeys(stops) if not any(o != s and o in s for o in stops)]
        return frozenset(ids), tuple(stops)

    # --- text <-> ids ------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens typed in the text are ordinary text."""
        ids = self._plain.encode(check_text(text), add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False,
                     eos: bool = False) -> list[list[int]]:
        """`encode` of each text, in one call."""
        encs = self._plain.encode_batch([check_text(t) for t in texts], add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encs]

    @property
    def prefixes_space(self) -> bool:
        """Whether `encode` starts a text with SentencePiece's "▁", the space before its first
        word ("Paris" is "▁Paris"), as Llama 2's, Mistral's and a llama GGUF's tokenizers do:
        by a `Prepend("▁")` normalizer or a Metaspace pre-tokenizer that prepends, the two
        ways known (one that puts "▁" first some other way, a `Replace` of "^", reads False,
        and its completions are encoded alone). Byte-level BPE (gptlab's, GPT-2's, SmolLM2's)
        encodes a text as it is written."""
        return self._unprefixed is not None

    def encode_completion(self, prompt: str, completion: str) -> list[int]:
        """Tokens of `completion` written after the text `prompt`, as the model writes them
        after the prompt's tokens; `decode_response` reads them back. Where `encode` prefixes a
        space, TRL's rule: what `encode(prompt + completion)` holds after the prompt's tokens,
        so " Paris" after "The capital is" is "▁Paris" (encoded alone it was "▁", "▁Paris", a
        lone "▁" no text of the model holds, and "Paris" was "▁Paris" too). Where the prompt's
        tokens do not begin that (its last characters merge with the completion's first into
        one token; TRL warns, then trains on the merged tokens with the prompt's length
        masked), the model, given the prompt's own tokens, can only go on after them: the
        completion is its tokens with no "▁" put before it, which read back as prompt +
        completion all the same. Byte-level BPE: `encode(completion)`, as in every earlier
        version (a record's tokens are unchanged)."""
        if self._unprefixed is None:
            return self.encode(completion)
        start, whole = self.encode_batch([prompt, prompt + completion])
        if whole[:len(start)] == start:
            return whole[len(start):]
        return self.encode_continuation(completion)

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of `text` written right after other tokens, not as a text of its own:
        `encode` with no "▁" put before it where the tokenizer `prefixes_space` ("paris" is
        "par", "is", which read back glued on to what came before, as written). Byte-level BPE
        puts none: `encode(text)`."""
        if self._unprefixed is None:
            return self.encode(text)
        return self._unprefixed.encode(check_text(text), add_special_tokens=False).ids

    @cached_property
    def _unprefixed(self) -> tokenizers.Tokenizer | None:
        """A copy of `_plain` that puts no "▁" before a text; None where `_plain` puts none (or
        puts one in a way other than a `Prepend("▁")` normalizer or a `Metaspace`)."""
        if not _prefixes_space(self._plain):
            return None
        config = json.loads(self._plain.to_str())
        for key in ("normalizer", "pre_tokenizer"):
            config[key] = _without_space_prefix(config.get(key))
        unprefixed = tokenizers.Tokenizer.from_str(json.dumps(config))
        unprefixed.encode_special_tokens = True  # as `_plain`: not saved in its JSON
        return None if _prefixes_space(unprefixed) else unprefixed

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """The text of `ids`; `skip_special` leaves out special tokens, and, as transformers
        does, the BOS, EOS and padding the config names and the end of turn, even when added
        with special=false: a finished response's stop token is never part of its text."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._skipped_ids]
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def decode_cut(self, ids: Iterable[int]) -> str:
        """`decode` of a response cut at max_new_tokens: a last character whose bytes the cut
        split (byte-level tokens spell one byte by byte) is left out, not written as U+FFFD.
        A U+FFFD for invalid bytes the model wrote before the end stays."""
        ids = [int(i) for i in ids]
        text = self.decode(ids)
        if not text.endswith("\ufffd"):
            return text
        # The end is a split character if continuation bytes complete it (0x80 or, after E0
        # and F0, which need A0.. and 90.., 0xA0 first; then 0x80): the completed character
        # is then the last one, and what precedes it is the text before the cut. Byte-level
        # BPE wrote one U+FFFD for the split character; byte fallback one for every byte of
        # the run of byte tokens it ends, whole characters included.
        for first in (0x80, 0xA0):
            tail: list[int] = []
            for byte in (first, 0x80, 0x80):
                token = self._byte_token(byte)
                if token is None:  # a tokenizer that cannot spell a lone byte
                    return text
                tail.append(token)
                more = self.decode(ids + tail)
                added = bytes([first, 0x80, 0x80][:len(tail)])
                last = more[-1:].encode("utf-8")
                if last != "\ufffd".encode("utf-8") and len(last) > len(added) \
                        and last.endswith(added):
                    return more[:-1]
        return text

    def decode_continuation(self, prompt: Iterable[int], ids: Iterable[int],
                            cut: bool = False) -> str:
        """The text `ids` add after `prompt`: the two decoded together, less the prompt's text
        (`cut`: as `decode_cut`). Decoded alone, a continuation can lose what its first token
        means after the prompt: SentencePiece's decoder drops the space that a word's "▁"
        stands for at the start of a text, so "Paris" would follow "The capital is" glued on.
        Where the prompt's text is no prefix of the whole (a character split at the seam),
        `ids` are decoded alone."""
        prompt, ids = [int(i) for i in prompt], [int(i) for i in ids]
        decode = self.decode_cut if cut else self.decode
        whole, before = decode(prompt + ids), self.decode(prompt)
        return whole[len(before):] if whole.startswith(before) else decode(ids)

    def decodes_apart(self, before: Sequence[int], after: int) -> bool:
        """Whether the text of `before` is final once the token `after` follows it, whatever
        comes next, as far as its last tokens tell: its text ends in no U+FFFD (byte-level BPE
        writes one for a character whose bytes go on in later tokens), and its last token and
        `after` are not byte fallback's `<0xNN>` tokens of one run (decoded together: a run
        that holds an invalid byte is U+FFFD byte for byte, so a later byte can change what
        earlier ones read as)."""
        if not before:
            return True
        if self.decode(before).endswith("\ufffd"):
            return False
        return not all(_BYTE_FALLBACK.fullmatch(self.hf.id_to_token(int(t)) or "")
                       for t in (before[-1], after))

    def fallback_byte(self, token: int) -> int | None:
        """The byte that `token` is where it is byte fallback's `<0xNN>` (Llama's tokenizers
        spell a character missing from their vocabulary so, a byte a token); else None."""
        name = self.hf.id_to_token(int(token)) or ""
        return int(name[3:5], 16) if _BYTE_FALLBACK.fullmatch(name) else None

    def decode_response(self, prompt: str | Sequence[dict], prompt_ids: Iterable[int],
                        ids: Iterable[int], cut: bool = False, lead: str | None = None) -> str:
        """The text of `ids`, a response sampled after `prompt_ids`, the tokens of `prompt` (a
        text, or messages rendered with the generation prompt): the text that, written as the
        response to `prompt` in a samples or rankings file, encodes back to `ids` (`cut`: as
        `decode_cut`). After a text prompt, where the tokenizer `prefixes_space`, what `ids` add
        to the prompt's text (`decode_continuation`), as `encode_completion` encodes a
        completion: "▁Paris" after "The capital is" is " Paris"; byte-level BPE: `ids` decoded
        alone, as always. After a chat template's generation prompt, what `ids` add to the
        prompt's text (`decode_continuation`), less the text the template writes between its
        assistant header and an answer (`answer_lead`: Llama 2's " " after "[/INST]"):
        "▁Paris" after ChatML's "assistant\\n" is " Paris", as the template renders it back,
        where decoded alone it lost its space. gptlab's and ChatML's templates write nothing
        there: a byte-level BPE tokenizer's response is then its `decode` (or `decode_cut`)
        either way. `lead`: `answer_lead(prompt)` where the caller has it (a reply decoded
        again at each new token renders the template once, not at every token)."""
        if isinstance(prompt, str) and self._unprefixed is None:
            return self.decode_cut(ids) if cut else self.decode(ids)
        text = self.decode_continuation(prompt_ids, ids, cut=cut)
        if isinstance(prompt, str):
            return text
        lead = self.answer_lead(prompt) if lead is None else lead
        return text[len(lead):] if lead and text.startswith(lead) else text

    def answer_lead(self, messages: Sequence[dict]) -> str:
        """The template's text between `messages` rendered with the generation prompt and the
        content of an assistant answer to them, rendered whole ("" for gptlab's and ChatML's
        templates; Llama 2's, which has no generation prompt, writes " " before the answer);
        "" where the conversation with an answer does not begin with the generation prompt."""
        answered = [*messages, {"role": "assistant", "content": "x"}]
        try:
            prompt = self._render(messages, True)
            pieces, strip = self._template_pieces(answered, False)
        except UserError:  # a template that renders no answer after these messages
            return ""
        if len(messages) not in pieces:
            return ""
        before = "".join(p if isinstance(p, str) else _content_of(answered, p, strip)
                         for p in pieces[:pieces.index(len(messages))])
        return before[len(prompt):] if before.startswith(prompt) else ""

    def _byte_token(self, byte: int) -> int | None:
        """The id of the token that is this one byte: byte-level BPE's (GPT-2's byte-to-
        character map), or byte fallback's `<0xNN>` (Llama's); None when there is none."""
        for name in (_BYTE_CHARS[byte], f"<0x{byte:02X}>"):
            token = self.hf.token_to_id(name)
            if token is not None:
                return token
        return None

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        # A tokenizer without BOS, or whose model was trained without it first (many imported
        # ones), prepends nothing.
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def _encode_markup(self, text: str) -> list[int]:
        """Template text: special tokens in it are parsed."""
        return self.hf.encode(text, add_special_tokens=False).ids

    # --- chat --------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict],
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(token ids, assistant mask) of a conversation; see the module docstring."""
        if self.chat_template is None:
            raise UserError("this tokenizer has no chat template and no gptlab role tokens",
                            path=self.template_file, field=self.template_field)
        check_messages(messages)
        pieces, strip = self._template_pieces(messages, add_generation_prompt)
        contents = {i: check_text(_content_of(messages, i, strip)) for i in range(len(messages))}
        if any(m in c for c in contents.values() for m in self._markup_strings):
            # A message holds special-token text, which must stay text: contents are
            # tokenized with special-token parsing off.
            if self._unprefixed is not None:
                return self._render_chat_in_runs(messages, pieces, contents)
            return self._render_chat_piecewise(messages, pieces, strip)
        # Whole, as transformers tokenizes the rendered text: BPE may merge across a content
        # boundary ("[INST] " + "What" is " What"). Offsets say which tokens are whose.
        text, spans = _joined(messages, pieces, contents)
        enc = self.hf.encode(text, add_special_tokens=False)
        markup = [t in self._markup_len for t in enc.ids]
        leads = self._answer_leads(messages, pieces, text, spans)
        return list(enc.ids), self._assistant_mask(enc.ids, enc.offsets, markup, spans, leads)

    def _answer_leads(self, messages: Sequence[dict], pieces: list[str | int], text: str,
                      spans: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
        """The (start, end) in `text`, the conversation rendered from `pieces` (its contents at
        `spans`), of the template text between each assistant answer's generation prompt (the
        messages before it rendered with one) and the answer's content, where there is any
        (`answer_lead`: Llama 2's " " after "[/INST]"). The model writes it after the prompt:
        it is the answer's, as transformers' `{% generation %}` spans all the model writes."""
        leads = []
        slots = [p for p in pieces if isinstance(p, int)]  # spans' messages, in order
        for i, (start, _, role) in zip(slots, spans):
            if role != "assistant":
                continue
            try:
                prompt = self._render(messages[:i], True)
            except UserError:  # a template that renders no prompt before this answer
                continue
            if len(prompt) < start and text.startswith(prompt):
                leads.append((len(prompt), start))
        return leads

    def _assistant_mask(self, ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                        markup: Sequence[bool], spans: list[tuple[int, int, str]],
                        leads: list[tuple[int, int]]) -> list[int]:
        """The assistant mask of `ids`, the tokens of a rendered conversation, from their
        character `offsets` in it, the (start, end, role) `spans` of the messages' contents and
        the (start, end) `leads` of template text before an answer that are the answer's
        (`_answer_leads`); `markup`: which tokens are the template's markup tokens, never a
        message's."""
        mask: list[int] = []
        k = 0  # offsets only move forward: one pass over the spans
        closing: list[int] | None = None  # template tokens after an assistant message so far
        for t, (a, b), is_markup in zip(ids, offsets, markup):
            if is_markup:  # a special token starts where its own text does, even when its
                a = max(a, b - self._markup_len[t])  # lstrip took content's spaces
            while k < len(spans) and spans[k][1] <= a:  # past a message (an empty one too)
                for i in closing or ():  # no end-of-turn token came: nothing was closing
                    mask[i] = 0
                closing = [] if spans[k][2] == "assistant" else None  # its end-of-turn may follow
                k += 1
            # A special token is template text, never a message's.
            role = spans[k][2] if k < len(spans) and spans[k][0] < b and not is_markup else None
            if role is not None:
                for i in closing or ():  # no end-of-turn token before this message
                    mask[i] = 0
                closing = None
                mask.append(int(role == "assistant"))
            elif closing is not None:  # through the first end of turn after the answer
                closing.append(len(mask))
                mask.append(1)
                if t in self._turn_ends:
                    closing = None
            else:
                mask.append(0)
        for i in closing or ():  # the text ended with no end-of-turn token
            mask[i] = 0
        if leads:
            for k, (t, (a, b), is_markup) in enumerate(zip(ids, offsets, markup)):
                if is_markup:
                    a = max(a, b - self._markup_len[t])
                if any(s < b and a < e for s, e in leads):  # in a lead, or across its edge
                    mask[k] = 1
        return mask

    def content_as_written(self, messages: Sequence[dict], i: int) -> str:
        """Message `i`'s content as the chat template writes it: verbatim, or stripped by a
        template that trims it (Llama 3's `| trim`)."""
        _, strip = self._template_pieces(messages, False)
        return _content_of(messages, i, strip)

    def _render_chat_in_runs(self, messages: Sequence[dict], pieces: list[str | int],
                             contents: dict[int, str]) -> tuple[list[int], list[int]]:
        """Where the tokenizer `prefixes_space` (SentencePiece) and a message holds special-token
        text: the rendered text split at the template's markup tokens only, as transformers
        splits it at special tokens, and each run of text between them encoded whole with
        special-token parsing off, so BPE merges across content edges as in the whole text
        ("[INST] " + "is" is "▁is"). A run gets the "▁" that the tokenizer puts before text
        that follows a special token (Llama 2's normalizer: each; a Metaspace that prepends
        first, Mistral's: none but a run that starts the text). Typed special-token text is
        text within its run: no "▁" after it, where transformers, which splits there, starts
        a new run. Tokenized apart, each content had a "▁" of its own ("▁", "▁is")."""
        text, spans = _joined(messages, pieces, contents)
        leads = self._answer_leads(messages, pieces, text, spans)
        enc = self.hf.encode(text, add_special_tokens=False)
        cuts = []  # (token, start, end) of each markup token the template wrote
        for t, (a, b) in zip(enc.ids, enc.offsets):
            if t in self._markup_len:
                own = max(a, b - self._markup_len[t])  # its text, without what it stripped
                if not any(s < b and own < e for s, e, _ in spans):  # not typed in a content
                    cuts.append((t, a, b))
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        markup: list[bool] = []
        at = 0
        for t, a, b in [*cuts, (None, len(text), len(text))]:
            if at < a:
                plain = self._plain if at == 0 or self._prefixes_after_markup \
                    else self._unprefixed
                run = plain.encode(text[at:a], add_special_tokens=False)
                ids += run.ids
                offsets += [(at + x, at + y) for x, y in run.offsets]
                markup += [False] * len(run.ids)
            if t is not None:
                ids.append(t)
                offsets.append((a, b))
                markup.append(True)
            at = b
        return ids, self._assistant_mask(ids, offsets, markup, spans, leads)

    @cached_property
    def _prefixes_after_markup(self) -> bool:
        """Whether `hf` puts a "▁" before text that follows a special token ("</s>a" is "</s>",
        "▁a"), as it does before a text (Llama 2's normalizer); a Metaspace that prepends
        first (Mistral's) puts none there."""
        first = self._plain.encode("a", add_special_tokens=False).ids
        for i in sorted(self._markup_ids):
            ids = self.hf.encode(self.hf.id_to_token(i) + "a", add_special_tokens=False).ids
            if ids[:1] == [i]:
                return ids[1:] == first
        return True

    def _render_chat_piecewise(self, messages: Sequence[dict], pieces: list[str | int],
                               strip: bool) -> tuple[list[int], list[int]]:
        """Template text and message contents tokenized apart (no merge across them)."""
        contents = {i: _content_of(messages, i, strip) for i in range(len(messages))}
        leads = self._answer_leads(messages, pieces, *_joined(messages, pieces, contents))
        ids: list[int] = []
        mask: list[int] = []
        at = 0  # where the piece starts in the rendered text
        closing = False  # the template text right after an assistant message
        for piece in pieces:
            if isinstance(piece, int):
                toks = self.encode(contents[piece])
                is_assistant = messages[piece]["role"] == "assistant"
                ids += toks
                mask += [int(is_assistant)] * len(toks)
                closing = is_assistant
                at += len(contents[piece])
            else:
                enc = self.hf.encode(piece, add_special_tokens=False)  # as `_encode_markup`
                n_closing = self._through_first_markup(enc.ids) if closing else 0
                ids += enc.ids
                mask += [1] * n_closing + [int(any(s < at + b and at + a < e for s, e in leads))
                                           for a, b in enc.offsets[n_closing:]]
                closing = False
                at += len(piece)
        return ids, mask

    def _through_first_markup(self, toks: list[int]) -> int:
        """How many of `toks` run up to and including the first end of turn (0 if none): a
        markup token, not only one marked special (an `<|im_end|>` added with special=false by
        `add_tokens`, a GGUF's user-defined tokens), or EOS or another end of generation."""
        return next((k + 1 for k, t in enumerate(toks) if t in self._turn_ends), 0)

    @cached_property
    def _turn_ends(self) -> set[int]:
        """Tokens that close an assistant turn: markup, and the ends of generation, which need
        not be markup (a GGUF's normal-type end of turn; a generation_config.json end)."""
        return self._markup_ids | {self.eos_id, *self.end_ids}

    @cached_property
    def _skipped_ids(self) -> set[int]:
        named = {self.hf.token_to_id(t) for t in (self.bos_token, self.eos_token, self.pad_token)
                 if t is not None}
        return named | self.stop_ids

    @cached_property
    def _markup_strings(self) -> list[str]:
        return [self.hf.id_to_token(i) for i in self._markup_ids]

    @cached_property
    def _markup_len(self) -> dict[int, int]:
        return {i: len(self.hf.id_to_token(i)) for i in self._markup_ids}

    @cached_property
    def _markup_ids(self) -> set[int]:
        """Added tokens that `encode` reads as plain text (see `_without_markup_parsing`)."""
        return {i for i, t in self.hf.get_added_tokens_decoder().items()
                if t.special or re.fullmatch(r"<\S+>", t.content)}

    @cached_property
    def _compiled_template(self) -> Any:
        import jinja2

        try:
            return _jinja_env().from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            # The template's own error, not a conversation's: name the file that holds it.
            where = self.template_file
            raise UserError(f"the chat template cannot be compiled: {e.message}", path=where,
                            line=e.lineno if where and where.suffix == ".jinja" else None,
                            field=self.template_field) from None

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        import jinja2

        template = self._compiled_template  # its own UserError, naming the file
        try:
            return template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token,
                pad_token=self.pad_token or "", tools=None, documents=None)
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template failed: {e}",
                            field=self.template_field) from None
        except Exception as e:  # the template's own expressions: `content + 1` is a TypeError
            raise UserError(f"the chat template failed: {type(e).__name__}: {e}",
                            field=self.template_field) from None

    def _template_pieces(self, messages: Sequence[dict],
                         add_generation_prompt: bool) -> tuple[list[str | int], bool]:
        """The rendered conversation as template strings and message indices (content slots),
        and whether the template strips message content."""
        nonce = secrets.token_hex(8)
        real = self._render(messages, add_generation_prompt)
        # Every content marked; failing that, the empty ones left empty: Llama 2's template
        # strips the system message and the first user message joined, so after an empty user
        # message (`chat`'s probe of the room a question has) the "\n\n" it writes between
        # them goes too, which a marker in its place would keep.
        for mark_empty in (True, False):
            marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"}
                      if mark_empty or m["content"] else m for i, m in enumerate(messages)]
            parts = re.split(f"\ue000{nonce}:(\\d+)\ue001",
                             self._render(marked, add_generation_prompt))
            pieces: list[str | int] = [int(p) if k % 2 else p for k, p in enumerate(parts)
                                       if k % 2 or p]
            for strip in (False, True):
                if real == "".join(p if isinstance(p, str) else _content_of(messages, p, strip)
                                   for p in pieces):
                    return pieces, strip
        raise UserError("the chat template rewrites message content, so the assistant mask "
                        "cannot be derived exactly", field=self.template_field)

    # --- files -------------------------------------------------------------------------------
    @reports_path_errors
    def save(self, directory: str | Path) -> None:
        """Write an HF-compatible `tokenizer_config.json` (and `generation_config.json`, where
        there are stop ids besides EOS: the `end_ids`, the template's end of turn) and
        `tokenizer.json`, atomically, the latter last: a directory with a tokenizer.json holds
        the whole tokenizer (a save stopped between them leaves none that could load with
        another BOS/EOS or be refused). Without such ids, a generation_config.json already
        there (an earlier model's) is removed, as the other two files are replaced:
        `load_tokenizer` would read its ids as this tokenizer's ends. Old files of these names
        are moved aside first and put back, byte for byte, if the save fails
        (`old_files_aside`)."""
        made = missing_dirs(directory)
        d = ensure_dir(directory)
        with old_files_aside(d, TOKENIZER_FILES, made):
            self._save(d)

    def _save(self, d: Path) -> None:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            # gptlab's HF reader goes by it; transformers 5 by tokenizer.json's post-processor,
            # which `hf_as_saved` gives it to match.
            "add_bos_token": self.bos_id is not None,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
        }
        unk = getattr(self.hf.model, "unk_token", None)
        if unk is not None and self.hf.token_to_id(unk) is not None:
            # SentencePiece's <unk> (Llama's, Mistral's): without it transformers' unk_token is
            # None, and a script that pads with it (Llama 2's usual pad) pads with nothing.
            config["unk_token"] = unk
        if self.extra_special_tokens:  # tokenizer.json marks them special too
            config["additional_special_tokens"] = list(self.extra_special_tokens)
        write_json_atomic(d / "tokenizer_config.json", config)
        # Every stop id, where transformers' generate reads them: a ChatML end of turn that is
        # not EOS (<|im_end|> after Qwen2's <|endoftext|>) would not stop it otherwise.
        ends = [i for i in dict.fromkeys([*self.end_ids, *sorted(self.stop_ids)])
                if i != self.eos_id]
        if ends:  # with the ids config.json names
            write_json_atomic(d / "generation_config.json", {
                "bos_token_id": self.hf.token_to_id(self.bos_token) if self.bos_token else None,
                "eos_token_id": [self.eos_id, *ends], "pad_token_id": self.pad_id})
        with atomic_path(d / "tokenizer.json") as tmp:
            self.hf_as_saved().save(str(tmp))

    def hf_as_saved(self) -> tokenizers.Tokenizer:
        """The tokenizer.json `save` writes: `hf`, or a copy whose post-processor prepends BOS
        where the model starts sequences with it (`bos_id`) and `hf`'s own does not.
        transformers 5 goes by the post-processor, not by add_bos_token: so `tokenizer(text)`
        gives `encode(text, bos=True)` and `tokenizer(text, add_special_tokens=False)` gives
        `encode(text)`. gptlab never encodes with the post-processor (special tokens are its
        own to add), so the copy encodes here as `hf` does."""
        bos_id = self.bos_id
        if bos_id is None or starts_with(self.hf, self.bos_token):
            return self.hf
        bos = self.bos_token

        def piece(kind: str, name: str, type_id: int) -> dict:
            return {kind: {"id": name, "type_id": type_id}}
        prepend = {"type": "TemplateProcessing",  # as Llama 2's tokenizer.json prepends <s>
                   "single": [piece("SpecialToken", bos, 0), piece("Sequence", "A", 0)],
                   "pair": [piece("SpecialToken", bos, 0), piece("Sequence", "A", 0),
                            piece("SpecialToken", bos, 1), piece("Sequence", "B", 1)],
                   "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
        config = json.loads(self.hf.to_str())
        own = config.get("post_processor")
        config["post_processor"] = prepend if own is None else {  # after it, as Llama 3's
            "type": "Sequence", "processors": [own, prepend]}
        return tokenizers.Tokenizer.from_str(json.dumps(config))


# --- helpers -----------------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """Byte-level BPE's character for each byte (GPT-2's `bytes_to_unicode`): printable bytes
    are themselves, the others are shifted past 255 in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, shift = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shift))
            shift += 1
    return chars


_BYTE_CHARS = _byte_chars()
# A token byte fallback decodes as one byte (tokenizers' ByteFallback decoder reads these).
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def starts_with(hf: tokenizers.Tokenizer, token: str) -> bool:
    """Whether `hf`'s post-processor starts each sequence with `token` (Llama 2's and Llama 3's
    tokenizer.json prepend their BOS so). Read on a text that encodes to some ids: on "" a
    post-processor that appends the token (GPT-2's BOS is its EOS) starts with it too."""
    token_id = hf.token_to_id(token)
    if token_id is None:
        return False
    for text in ("a", "0", " ", "."):
        plain = hf.encode(text, add_special_tokens=False).ids
        if plain:
            ids = hf.encode(text).ids
            return ids[:1] == [token_id] and ids[1:1 + len(plain)] == plain
    return hf.encode("").ids[:1] == [token_id]  # a vocabulary that spells none of them


def _marked_special(hf: tokenizers.Tokenizer, names: Iterable[str]) -> tokenizers.Tokenizer:
    """`hf`, or a copy of it in which each of `names` (all in its vocabulary) is an added token
    marked special, with the same id, as transformers adds a config's special tokens."""
    added = {t.content: t for t in hf.get_added_tokens_decoder().values()}
    todo = []
    for name in dict.fromkeys(names):
        t = added.get(name)
        if t is None:  # a token of the model's vocabulary, not yet an added token
            todo.append(AddedToken(name, special=True, normalized=False))
        elif not t.special:
            todo.append(AddedToken(name, single_word=t.single_word, lstrip=t.lstrip,
                                   rstrip=t.rstrip, normalized=t.normalized, special=True))
    if not todo:
        return hf
    marked = tokenizers.Tokenizer.from_str(hf.to_str())
    marked.add_special_tokens(todo)
    return marked


def _without_markup_parsing(hf: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A copy of `hf` that reads special tokens in its input as plain text.

    `encode_special_tokens` only covers tokens marked special, so added tokens that look like
    markup (`<...>`, no spaces) are marked special in the copy first; added tokens that are
    vocabulary (runs of spaces, say) keep matching, as they do in HF.
    """
    plain = tokenizers.Tokenizer.from_str(hf.to_str())
    markup = [t for t in plain.get_added_tokens_decoder().values()
              if not t.special and re.fullmatch(r"<\S+>", t.content)]
    if markup:
        plain.add_special_tokens([AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip,
                                             rstrip=t.rstrip, normalized=t.normalized, special=True)
                                  for t in markup])
    plain.encode_special_tokens = True
    return plain


def _prefixes_space(hf: tokenizers.Tokenizer) -> bool:
    """Whether `hf`'s normalizer and pre-tokenizer put "▁" before a text ("a" is "▁a")."""
    text = "a"
    if hf.normalizer is not None:
        text = hf.normalizer.normalize_str(text)
    if hf.pre_tokenizer is not None:
        text = "".join(piece for piece, _ in hf.pre_tokenizer.pre_tokenize_str(text))
    return text.startswith(_SPACE)


def _without_space_prefix(node: Any) -> Any:
    """A normalizer's or pre-tokenizer's JSON that puts no "▁" before a text: without
    `Prepend("▁")` (Llama 2's tokenizer.json, a llama GGUF), with a `Metaspace` that prepends
    never (Mistral's, Llama's with legacy off); None where nothing is left."""
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind == "Sequence":
        key = "normalizers" if "normalizers" in node else "pretokenizers"
        parts = [_without_space_prefix(n) for n in node.get(key) or []]
        return {**node, key: [n for n in parts if n is not None]}
    if kind == "Prepend" and node.get("prepend") == _SPACE:
        return None
    if kind == "Metaspace":
        node = {k: v for k, v in node.items() if k != "add_prefix_space"}  # the older spelling
        return {**node, "prepend_scheme": "never"}
    return node


def check_text(text: str, field: str | None = None, from_json: bool = False) -> str:
    """`text` if it is a string of valid Unicode, else a UserError. Bytes that are not UTF-8
    reach Python as lone surrogates (in command-line arguments, and in stdin under a C locale);
    no tokenizer can encode them. In text read from JSON (`from_json`), whose bytes were
    UTF-8, a lone surrogate is a `\\u` escape of half a UTF-16 pair, never a byte."""
    if not isinstance(text, str):
        raise UserError(f"expected text, got {type(text).__name__}", field=field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        if from_json:
            raise UserError(f"not valid Unicode: \\u{ch:04x} at character {e.start + 1} is half "
                            f"of a UTF-16 surrogate pair without its other half; write the "
                            f"character itself or both halves", field=field) from None
        what = f"byte 0x{ch - 0xdc00:02x}" if 0xdc80 <= ch <= 0xdcff else f"U+{ch:04X}"
        raise UserError(f"not UTF-8 text: {what} at character {e.start + 1} cannot be decoded",
                        field=field) from None
    return text


def check_messages(messages: Sequence[dict], roles_read: Sequence[str] = ROLES) -> None:
    """Check each message's shape and role; `roles_read` is what an error says is read (the
    server reads OpenAI's `developer` too, as `system`)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"message {i} must be a mapping with 'role' and 'content'",
                            field=f"messages[{i}]")
        # A null is a field left out (a Parquet struct column's missing key reads as one).
        if m.get("role") not in ROLES:
            has = f"has role {m['role']!r}" if "role" in m else "has no 'role'"
            expected = f"expected one of {', '.join(roles_read)}"
            if "role" not in m and "from" in m:  # ShareGPT's message: {"from", "value"}
                has += " but 'from' (ShareGPT's key)"
                expected = (f"rename 'from' to 'role', one of {', '.join(roles_read)} "
                            f"(not human, gpt)")
            raise UserError(f"message {i} {has}; {expected}", field=f"messages[{i}].role")
        call = next((k for k in ("tool_calls", "function_call") if m.get(k)), None)
        if call is not None:
            # OpenAI's and TRL's tool calling: a template renders content only, so the call was
            # dropped without a word, and the model taught the turn's text without its action.
            raise UserError(f"message {i} has {call!r} (a tool call); gptlab reads text turns "
                            f"only, with no tools: leave tool-calling conversations out",
                            field=f"messages[{i}].{call}")
        if isinstance(m.get("content"), list):
            # OpenAI's content parts: joining their texts would guess the separator and drop
            # what is not text (an image) without a word.
            raise UserError(f"message {i} content is a list of parts (OpenAI's format); gptlab "
                            f"reads text only: write the content as one string",
                            field=f"messages[{i}].content")
        if not isinstance(m.get("content"), str):
            has = "content must be a string" if "content" in m else "has no 'content'"
            near = next((k for k in ("text", "value") if k in m), None)
            if "content" not in m and near:  # another tool's key (ShareGPT's 'value')
                has += (f" but {near!r}: gptlab reads a message's text from 'content'; rename "
                        f"{near!r} to 'content'")
            raise UserError(f"message {i} {has}", field=f"messages[{i}].content")


def _content_of(messages: Sequence[dict], i: int, strip: bool) -> str:
    content = messages[i]["content"]
    return content.strip() if strip else content


def _joined(messages: Sequence[dict], pieces: list[str | int],
            contents: dict[int, str]) -> tuple[str, list[tuple[int, int, str]]]:
    """The rendered text of `pieces` and the (start, end, role) of each message's content in
    it."""
    text, spans = "", []
    for piece in pieces:
        part = piece if isinstance(piece, str) else contents[piece]
        if not isinstance(piece, str):
            spans.append((len(text), len(text) + len(part), messages[piece]["role"]))
        text += part
    return text, spans


def _jinja_env() -> Any:
    """A sandboxed Jinja environment with the helpers HF chat templates expect."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        from jinja2 import TemplateError
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, \
        sort_keys=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii,
                                    separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


# --- training ----------------------------------------------------------------------------------
def _is_path_like(item: Any) -> bool:
    from gptlab.data.corpus import CORPUS_SUFFIXES, is_hub_name

    if isinstance(item, Path):
        return True
    if not (isinstance(item, str) and item.strip() != "" and "\n" not in item and len(item) < 4096):
        return False
    if Path(item).suffix.lower() in (*CORPUS_SUFFIXES, ".json", ".csv", ".tsv"):
        return True
    try:
        return Path(item).exists() or is_hub_name(item)
    except OSError:  # a long text is not a file name (ENAMETOOLONG)
        return False


def train_tokenizer(paths_or_texts: str | Path | Iterable[str | Path], vocab_size: int,
                    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> Tokenizer:
    """Train a byte-level BPE tokenizer.

    `paths_or_texts` is a corpus path, a list of corpus paths (see `gptlab.data.corpus`), or an
    iterable of document strings. A Path, or a string that names an existing file, ends in
    .txt/.jsonl/.ndjson/.json/.parquet or is a Hub dataset's `user/name`, as the first item
    makes the whole list paths.
    The first special token is BOS and the second EOS; PAD is `<|pad|>` when present.
    Deterministic: the same input gives the same tokenizer.
    """
    from gptlab.data.corpus import iter_documents

    special_tokens = list(dict.fromkeys(special_tokens))
    minimum = N_BYTES + len(special_tokens)
    if vocab_size < minimum:
        raise UserError(f"{vocab_size} is too small: 256 byte tokens + {len(special_tokens)} "
                        f"special tokens need at least {minimum}", field="vocab_size")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"{vocab_size} is too large: at most {MAX_VOCAB_SIZE:,} tokens",
                        field="vocab_size")
    if len(special_tokens) < 2:
        raise UserError("need at least BOS and EOS", field="special_tokens")

    if isinstance(paths_or_texts, (str, Path)):
        docs: Iterable[str] = iter_documents([paths_or_texts])
    else:
        items = iter(paths_or_texts)
        first = next(items, None)
        if first is None:
            raise UserError("the corpus is empty: no paths or texts given")
        if _is_path_like(first):
            docs = iter_documents([first, *items])
        else:
            docs = _nonempty_texts(itertools.chain([first], items))

    hf = tokenizers.Tokenizer(models.BPE())
    # No prefix space and no regex surprises: decode(encode(s)) == s for every string.
    # Digits are split one by one (as Llama and SmolLM do): a number the model has never seen
    # is still made of known tokens, and copying it from a question into SQL is digit by digit.
    split = [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)]
    # Trained on, a word is cut in pieces of LONGEST_TRAINED_WORD bytes: the trainer's time is
    # quadratic in a word's length (each merge in it shifts the rest of it), so a 2 MB line
    # of one letter ran past 10 minutes. Shorter words, every real one, are learned as they are.
    hf.pre_tokenizer = pre_tokenizers.Sequence([*split, pre_tokenizers.Split(
        Regex(rf"[\s\S]{{1,{LONGEST_TRAINED_WORD}}}"), behavior="isolated")])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(docs, trainer=trainer)
    hf.pre_tokenizer = pre_tokenizers.Sequence(split)  # encoding splits no word
    pad = PAD if PAD in special_tokens else None
    return Tokenizer(hf, bos_token=special_tokens[0], eos_token=special_tokens[1], pad_token=pad)


def _nonempty_texts(texts: Iterable[Any]) -> Iterator[str]:
    n = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"item {i} is of type {type(text).__name__}, expected a string",
                            field="paths_or_texts")
        check_text(text, field=f"paths_or_texts[{i}]")
        if text.strip():
            n += 1
            yield text
    if n == 0:
        raise UserError("the corpus is empty: every text is empty")


# --- loading -----------------------------------------------------------------------------------
def _token_str(value: Any, path: Path, field: str) -> str | None:
    """HF configs write a token as a string or as an AddedToken dict with "content"; null is
    no such token."""
    content = value.get("content") if isinstance(value, dict) else value
    # An object without a content string is no token: read as none, it dropped a BOS unseen.
    if (content is not None or isinstance(value, dict)) and not isinstance(content, str):
        raise UserError(f"must be a token string or an object with a 'content' string, got "
                        f"{value!r}", path=path, field=field)
    return content


def _chat_template(config: dict, config_file: Path) -> tuple[str | None, Path]:
    """The chat template of a tokenizer directory, and the file it was read from:
    `chat_template.jinja` where there is one (newer HF releases keep it apart, and
    transformers reads it before the config's), else the config's `chat_template` (a string,
    or HF's named templates, the one named "default"). One that is empty, or white space
    alone, is refused: it renders no prompt at all."""
    template, source = _template_source(config, config_file)
    if template is not None and not template.strip():
        raise UserError("is empty: a chat template renders each conversation as the model's "
                        "prompt, and this one renders nothing; remove it for gptlab's own, or "
                        "write one", path=source,
                        field="chat_template" if source == config_file else None)
    return template, source


def _template_source(config: dict, config_file: Path) -> tuple[str | None, Path]:
    template = config.get("chat_template")
    jinja_file = config_file.parent / "chat_template.jinja"
    if jinja_file.exists():
        template = None  # the file is the template: transformers reads it before the config
    elif isinstance(template, list):
        named = _named_templates(template, config_file)
        if "default" in named:
            template = template[named["default"]]["template"]
        else:
            # transformers refuses to chat ("multiple chat templates with no default"); gptlab
            # chatted with its own template instead, unsaid.
            raise UserError(f"names no template \"default\" (names: "
                            f"{', '.join(map(repr, named)) or 'none'}); the one named "
                            f"\"default\" is the chat template, as in transformers",
                            path=config_file, field="chat_template")
    elif template is not None and not isinstance(template, str):
        raise UserError(f"must be a Jinja template string or a list of named templates "
                        f"[{{\"name\": ..., \"template\": ...}}], got {template!r}",
                        path=config_file, field="chat_template")
    if template is not None or not jinja_file.exists():
        return template, config_file
    if jinja_file.is_dir():
        raise WrongKind("is a directory, not a file", path=jinja_file)
    raw = jinja_file.read_bytes()
    try:
        return raw.decode("utf-8"), jinja_file
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                        f"cannot be decoded; save the file as UTF-8", path=jinja_file,
                        line=raw.count(b"\n", 0, e.start) + 1) from None


def _named_templates(templates: list, config_file: Path) -> dict[str, int]:
    """The index of each name in HF's named templates (`[{"name": ..., "template": ...}]`, as
    transformers saves a tokenizer with several). An item that is no such object is a
    UserError: skipped, it left chat on gptlab's own template without a word."""
    named: dict[str, int] = {}
    for i, item in enumerate(templates):
        where = f"chat_template[{i}]"
        if not isinstance(item, dict) or "name" not in item or "template" not in item:
            raise UserError(f"must be an object with a 'name' string and a 'template' string, "
                            f"got {item!r}", path=config_file, field=where)
        name = item["name"]
        if not isinstance(name, str):
            raise UserError(f"must be a template name string, got {name!r}", path=config_file,
                            field=f"{where}.name")
        if not isinstance(item["template"], str):
            raise UserError(f"must be a Jinja template string, got {item['template']!r}",
                            path=config_file, field=f"{where}.template")
        if name in named:  # transformers keeps the last: which one was meant cannot be told
            raise UserError(f"{name!r} names chat_template[{named[name]}] too; each template "
                            f"needs a name of its own", path=config_file, field=f"{where}.name")
        named[name] = i
    return named


def _special_names(value: Any, path: Path, field: str) -> list[tuple[str, str]]:
    """(token, field) of each token an `additional_special_tokens` list names, as strings or
    AddedToken objects; transformers 5's `extra_special_tokens` may be an object of name ->
    token instead."""
    if value is None:
        return []
    if isinstance(value, dict):
        entries = [(f"{field}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list):
        entries = [(f"{field}[{k}]", v) for k, v in enumerate(value)]
    else:
        raise UserError(f"must be a list of token strings (or objects with a 'content' string), "
                        f"got {value!r:.80}", path=path, field=field)
    names = []
    for where, v in entries:
        token = _token_str(v, path, where)
        if token is None:
            raise UserError("must be a token string or an object with a 'content' string, got "
                            "null", path=path, field=where)
        names.append((token, where))
    return names


def _decoder_entries(value: Any, path: Path) -> list[tuple[int, str, bool, str]]:
    """(id, token, special, field) of each entry of tokenizer_config.json's
    `added_tokens_decoder` (id -> AddedToken object)."""
    if not isinstance(value, dict):
        raise UserError(f"must be an object of token id -> added token, got {value!r:.80}",
                        path=path, field="added_tokens_decoder")
    entries = []
    for key, entry in value.items():
        where = f"added_tokens_decoder.{key}"
        try:
            i = int(key)  # as transformers reads the key; it refuses one that is not a number
        except ValueError:
            raise UserError(f"the key must be a token id (an integer), got {key!r}", path=path,
                            field=where) from None
        token = _token_str(entry, path, where) if isinstance(entry, dict) else None
        if token is None:
            raise UserError(f"must be an object with a 'content' string, got {entry!r:.80}",
                            path=path, field=where)
        special = check_bool(entry.get("special", False), f"{where}.special", path)
        entries.append((i, token, special, where))
    return entries


def _generation_end_ids(path: Path) -> list[tuple[int, str]]:
    """(id, field) of each end of generation generation_config.json's `eos_token_id` names: one
    id or a list of them (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>); null is none."""
    value = read_json(path).get("eos_token_id")
    if value is None:
        return []
    listed = isinstance(value, list)
    ids = []
    for k, i in enumerate(value if listed else [value]):
        where = f"eos_token_id[{k}]" if listed else "eos_token_id"
        if isinstance(i, bool) or not isinstance(i, int):
            raise UserError(f"must be a token id (an integer) or a list of them, got {i!r}",
                            path=path, field=where)
        ids.append((i, where))
    return ids


# The notes `load_tokenizer` and a GGUF's tokenizer printed: (file, text). A process loads one
# tokenizer several times (the pipeline's stages; PPO's policy, reference and value model),
# and a note that came once per load buried the rest of stderr.
_NOTED: set[tuple[Path, str]] = set()


def note_once(path: Path, text: str) -> None:
    """`note: PATH, TEXT` on stderr, the first time this process meets it in this file."""
    key = (path.resolve(), text)
    if key not in _NOTED:
        _NOTED.add(key)
        print(f"note: {path}, {text}", file=sys.stderr)


# The classes transformers 5 builds from tokenizer.json's vocabulary and merges alone, with a
# Metaspace pre-tokenizer of its own in place of the file's normalizer and pre-tokenizer, where
# config.json's model_type is llama or there is none (for mistral it reads tokenizer.json).
_REBUILT_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
_REBUILT_MODEL_TYPES = (None, "llama")
# Where a SentencePiece "▁" may differ between the two pipelines: what each probe shows.
_SPACE_PROBES = (
    ("{special}a", "after a special token (Llama 2's chat \"<s>[INST]\": \"<s>\", \"[\", not "
                   "\"<s>\", \"▁[\")"),
    (" a", "before a text that starts with a space (one \"▁\" less)"),
    ("a", "before the first word of a text"))


# Byte-level classes transformers 5 also builds from tokenizer.json's vocabulary and merges
# alone, with a normalizer and pre-tokenizer of their own: GPT2Tokenizer (GPT-2's split, no
# normalizer: SmolLM's directories name it, whose tokenizer.json splits every digit off first)
# and Qwen2Tokenizer (NFC, Qwen2's split), which it takes for every model_type qwen2, whatever
# class the directory names. transformers 4 reads tokenizer.json as written, as gptlab does.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_PROBES = ("\n\n1. first", " 2024", "12345", "caf\u00e9 cafe\u0301", " it's",
                      "hello world")


def listed_probes(texts: Iterable[str]) -> str:
    """Probe texts for a note, each as `ascii` writes it: by `repr`, the probe
    "caf\\u00e9 cafe\\u0301" (an é, then an e and a combining accent) printed as two words
    that look the same; `ascii` writes 'caf\\xe9 cafe\\u0301'."""
    return ", ".join(map(ascii, texts))


def _byte_level_rebuild(cls: str | None, model_type: str | None) -> str | None:
    """The byte-level class transformers 5's AutoTokenizer builds anew for this directory, if
    any (its `tokenization_auto`: a model_type qwen2 always gets Qwen2Tokenizer, a gpt2 one
    GPT2Tokenizer where it names no class; mistral and others read the file as written)."""
    if model_type == "qwen2":
        return "Qwen2Tokenizer"
    if model_type not in (None, "llama", "gpt2"):
        return None
    name = cls if isinstance(cls, str) else "GPT2Tokenizer" if model_type == "gpt2" else ""
    name = name.removesuffix("Fast")
    return name if name in ("GPT2Tokenizer", "Qwen2Tokenizer") else None


def byte_level_rebuild_differs(hf: tokenizers.Tokenizer, built: str,
                               config: dict) -> tuple[list[str], str]:
    """(the probes on which transformers 5's `built` (GPT2Tokenizer or Qwen2Tokenizer) encodes
    otherwise than `hf`, tokenizer.json as written, and its own pipeline in words): it keeps the
    file's vocabulary and merges (a BPE without ignore_merges) and puts its own normalizer and
    pre-tokenizer before them, with `config`'s (tokenizer_config.json's) add_prefix_space."""
    from tokenizers import Regex, normalizers

    data = json.loads(hf.to_str())
    if (data.get("model") or {}).get("type") != "BPE":
        return [], ""
    data["model"].update(dropout=None, unk_token=None, continuing_subword_prefix="",
                         end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                         ignore_merges=False)
    theirs = tokenizers.Tokenizer.from_str(json.dumps(data))
    prefix = bool(config.get("add_prefix_space"))
    if built == "GPT2Tokenizer":
        theirs.normalizer = None
        theirs.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
        own = "GPT-2's byte-level split and no normalizer"
    else:
        theirs.normalizer = normalizers.NFC()
        theirs.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])
        own = "an NFC normalizer and Qwen2's split"
    differ = [text for text in _BYTE_LEVEL_PROBES
              if hf.encode(text, add_special_tokens=False).ids
              != theirs.encode(text, add_special_tokens=False).ids]
    return differ, own


def _note_byte_level_rebuild(hf: tokenizers.Tokenizer, built: str, cls: str | None,
                             model_type: str | None, config: dict, config_file: Path,
                             file: Path) -> None:
    """Note where transformers 5's `built` encodes otherwise than `hf`, tokenizer.json as
    written (`byte_level_rebuild_differs`)."""
    differ, own = byte_level_rebuild_differs(hf, built, config)
    if not differ:
        return
    if model_type == "qwen2" and (cls or "").removesuffix("Fast") != built:
        named = f"tokenizer_class {cls!r} in {config_file.name}" if cls else "no tokenizer_class"
        where, what = file.parent / "config.json", f"field 'model_type': qwen2 ({named})"
    else:
        where, what = config_file, f"field 'tokenizer_class': {cls}"
    note_once(where, f"{what}: transformers 5 builds {built} from the vocabulary and merges of "
                     f"{file.name} with {own}, not the file's normalizer and pre-tokenizer, so "
                     f"its ids differ from gptlab's (on {listed_probes(differ)}). gptlab "
                     f"encodes as {file.name} is written, as transformers 4 does; for "
                     f"transformers 5's ids, copy the {file.name} that transformers 5's "
                     f"save_pretrained writes over this one")


def _note_transformers5_rebuild(hf: tokenizers.Tokenizer, config: dict, config_file: Path,
                                file: Path, eos: str | None) -> None:
    """Note where transformers 5 would give other ids than `hf`, tokenizer.json as written: for a
    `tokenizer_class` of LlamaTokenizer (a SentencePiece tokenizer.json, a Llama or no model
    config beside it) it keeps the file's vocabulary and merges but puts a "▁" before text by a
    Metaspace of its own, prepend_scheme "first" unless `legacy` is true ("always") or
    `add_prefix_space` false ("never"). Llama 2's tokenizer.json (a Prepend("▁") normalizer, on
    each stretch of text between special tokens) encodes as SentencePiece did for Meta's code,
    and as transformers 4 and llama.cpp do; gptlab keeps it."""
    cls = config.get("tokenizer_class")
    try:
        model_type = json.loads((file.parent / "config.json").read_text("utf-8")).get("model_type")
    except FileNotFoundError:
        model_type = None
    except (OSError, ValueError, AttributeError):  # the model's loader names what is wrong
        return
    written = hf.to_str()
    built = _byte_level_rebuild(cls, model_type)
    if built is not None:
        _note_byte_level_rebuild(hf, built, cls, model_type, config, config_file, file)
        return
    if cls not in _REBUILT_CLASSES:
        return
    if '"ByteLevel"' in written:  # transformers 5 reads it as written, whatever its class
        return
    if model_type not in _REBUILT_MODEL_TYPES:
        return
    prefix, legacy = config.get("add_prefix_space"), config.get("legacy")
    # transformers' own truth tests (its `_get_prepend_scheme`); a missing `legacy` is false
    if prefix is not None and not prefix:
        scheme, why = "never", "add_prefix_space false"
    elif legacy:
        scheme, why = "always", "legacy true"
    else:
        scheme, why = "first", "legacy false" if "legacy" in config else \
            "no legacy, which transformers 5 takes as false"
    theirs = tokenizers.Tokenizer.from_str(written)
    theirs.normalizer = None
    theirs.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme, split=False)
    where = [what for text, what in _SPACE_PROBES
             if (eos is not None or "{special}" not in text)  # no special token to probe after
             and hf.encode(text.format(special=eos), add_special_tokens=False).ids
             != theirs.encode(text.format(special=eos), add_special_tokens=False).ids]
    if where:
        note_once(config_file, f"field 'tokenizer_class': {cls} ({why}): transformers 5 builds "
                               f"this class from the vocabulary of {file.name} with a Metaspace "
                               f"of its own (prepend_scheme {scheme!r}), not the file's "
                               f"normalizer, so its ids differ from gptlab's "
                               f"{' and '.join(where)}. gptlab encodes as {file.name} is written, "
                               f"as transformers 4, llama.cpp and Meta's Llama 2 code "
                               f"(SentencePiece) do; for transformers 5's ids, copy the "
                               f"{file.name} that transformers 5's save_pretrained writes over "
                               f"this one")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a directory (tokenizer.json [+ tokenizer_config.json,
    special_tokens_map.json, generation_config.json]) or a tokenizer.json file (the others
    beside it).

    Special tokens, as transformers' AutoTokenizer reads them: tokenizer.json's, those
    tokenizer_config.json's `added_tokens_decoder` marks special, and those its
    `additional_special_tokens` (or `extra_special_tokens`) names. special_tokens_map.json is
    read only where the config has no `added_tokens_decoder` (transformers reads it only
    then): its BOS, EOS and pad replace the config's, its additional tokens join the config's.
    A named token the vocabulary lacks is noted on stderr and stays text (transformers would
    add it as a new token, which the model has no trained embedding for). generation_config
    .json's `eos_token_id` (one id or a list) adds ends of generation. tokenizer.json is read
    as written; where transformers 5 would not read it so (the classes it builds anew:
    LlamaTokenizer, GPT2Tokenizer, Qwen2Tokenizer), where its ids would differ is noted. Each
    note is printed once per process (`note_once`), however often the directory is loaded.
    """
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.exists():  # a directory without one is there, but no tokenizer
        raise (WrongKind if p.is_dir() else NotFound)(
            "tokenizer not found (expected a directory with tokenizer.json, or a tokenizer.json "
            "file)", path=p)
    try:
        # Read here, not by `from_file`: a UTF-8 byte-order mark (Notepad's) is dropped, as
        # every other JSON file gptlab reads drops it; the Rust side called it invalid JSON.
        hf = tokenizers.Tokenizer.from_str(file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text (byte offset {e.start})", path=file) from None
    except IsADirectoryError:
        raise WrongKind("is a directory, not a file", path=file) from None
    except OSError:  # no permission to read it, say: the CLI names the file and the flag
        raise
    except Exception as e:  # the Rust side raises plain Exceptions for any parse error
        raise UserError(f"not a valid tokenizer.json ({str(e).splitlines()[0]})",
                        path=file) from None
    # A file saved after `enable_truncation` or `enable_padding` carries them, and every text
    # was then cut or padded without a word (a prompt of 5 tokens, SFT on cut answers). gptlab
    # encodes each text whole and fits it to the context itself.
    hf.no_truncation()
    hf.no_padding()
    ids: dict[int, str] = {}
    for token, i in sorted(hf.get_vocab(with_added_tokens=True).items(), key=lambda t: t[1]):
        if i in ids:  # the Rust side failed on it later, in a bare Exception
            first, second = sorted((ids[i], token))  # the vocabulary's order is a hash's
            raise UserError(f"token id {i} is given to two tokens, {first!r} and {second!r}",
                            path=file, field="model.vocab")
        ids[i] = token

    config: dict = {}
    config_file = file.parent / "tokenizer_config.json"
    if config_file.exists():
        config = read_json(config_file)
    map_file = file.parent / "special_tokens_map.json"
    token_map: dict = {}
    if "added_tokens_decoder" not in config and map_file.exists():
        token_map = read_json(map_file)
    gen_file = file.parent / "generation_config.json"
    ends = _generation_end_ids(gen_file) if gen_file.exists() else []
    vocab = hf.get_vocab_size(with_added_tokens=True)
    for i, where in ends:
        if not 0 <= i < vocab:
            note_once(gen_file, f"field '{where}': {i} is not a token id of {file.name} "
                                 f"(0 to {vocab - 1}); generation does not stop at it")
    end_ids = [i for i, _ in ends if 0 <= i < vocab]

    def named(key: str) -> tuple[bool, str | None, Path]:
        """Whether a file names the token `key`, the token (None: none), and that file."""
        for source, source_file in ((token_map, map_file), (config, config_file)):
            if key in source:
                return True, _token_str(source[key], source_file, key), source_file
        return False, None, config_file

    template, template_file = _chat_template(config, config_file)
    _, eos, eos_file = named("eos_token")
    if eos is None:
        # generation_config.json's first end, else a well-known name
        known = [hf.id_to_token(end_ids[0])] if end_ids else []
        eos = next((t for t in (*known, *_KNOWN_EOS) if hf.token_to_id(t) is not None), None)
        if eos is None:
            raise UserError("cannot tell the end-of-sequence token: add a tokenizer_config.json "
                            "with eos_token", path=config_file, field="eos_token")
    has_bos, bos, bos_file = named("bos_token")
    if not has_bos:
        bos = BOS if hf.token_to_id(BOS) is not None else None
    # Directories gptlab saved before it wrote add_bos_token prepended BOS whenever they had one.
    add_bos = config.get("add_bos_token")
    add_bos = True if add_bos is None else check_bool(add_bos, "add_bos_token", config_file)
    if not add_bos and bos is not None and starts_with(hf, bos):
        # transformers 5 drops add_bos_token where there is a tokenizer.json and goes by its
        # post-processor, whatever the class: the model was trained with BOS first.
        add_bos = True
        note_once(config_file, f"field 'add_bos_token': false, but the post-processor of "
                               f"{file.name} starts each sequence with {bos!r}, and "
                               f"transformers 5 goes by it alone: sequences start with {bos!r}, "
                               f"as transformers' tokenizer(text) starts them")
    has_pad, pad, pad_file = named("pad_token")
    if not has_pad:
        pad = PAD if hf.token_to_id(PAD) is not None else None
    for field, token, where in (("bos_token", bos, bos_file), ("eos_token", eos, eos_file),
                                ("pad_token", pad, pad_file)):
        if token is not None and hf.token_to_id(token) is None:
            raise UserError(f"token {token!r} is not in the vocabulary of {file.name}",
                            path=where, field=field)

    listed = [(t, source_file, where) for source, source_file in ((config, config_file),
                                                                  (token_map, map_file))
              for key in ("additional_special_tokens", "extra_special_tokens") if key in source
              for t, where in _special_names(source[key], source_file, key)]
    decoder = _decoder_entries(config["added_tokens_decoder"], config_file) \
        if "added_tokens_decoder" in config else []
    for i, token, _, where in decoder:
        # transformers goes by the content and keeps tokenizer.json's id, without a word
        actual = hf.token_to_id(token)
        if actual is not None and actual != i:
            note_once(config_file, f"field '{where}': {token!r} is token {actual} of "
                                    f"{file.name}, not {i}; it is read by its content, as id "
                                    f"{actual}")
    marked = [(t, config_file, where) for _, t, special, where in decoder if special]
    missing: set[str] = set()
    for token, source_file, where in listed + marked:
        if hf.token_to_id(token) is None and token not in missing:
            missing.add(token)
            note_once(source_file, f"field '{where}': {token!r} is not in the vocabulary of "
                                    f"{file.name}; it is read as text, not as a special token")
    hf = _marked_special(hf, [t for t, _, _ in marked if t not in missing])
    _note_transformers5_rebuild(hf, config, config_file, file, eos)
    tok = Tokenizer(hf, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template,
                    add_bos=add_bos, end_ids=end_ids,
                    extra_special_tokens=[t for t, _, _ in listed if t not in missing])
    if template is not None:
        tok.template_file = template_file
    if template_file == config_file and isinstance(config.get("chat_template"), list):
        i = _named_templates(config["chat_template"], config_file)["default"]
        tok.template_field = f"chat_template[{i}].template"  # a compile error names the item
    return tok
