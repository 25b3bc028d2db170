"""Stop strings: a generation ends where its decoded text holds one of them.

The engine knows no text; it takes a `stop_when(rows, tokens)` check that the host runs after
each step. `StopStrings` is that check for text: it decodes each row's continuation as it
grows and says which rows' text now holds a stop string, one that spans several tokens or
starts inside one included. `cut_at_stop` then cuts the decoded text before it, and
`cut_reply` a chat response, in the text with the template's lead that `StopStrings` watched.

Decoding is incremental, as vLLM's detokenizer does it: each row decodes only the tokens since
the last piece of text that no later token can change (a character whose bytes span tokens
waits for its last one), after that piece's own tokens, so that a word's SentencePiece "▁"
keeps the space it stands for. A stop string is looked for in that new text and the last
characters before it, one fewer than the longest stop string: a match that holds new text
can start no earlier. A step costs the same at the end of a long continuation as at its start.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from gptlab.errors import UserError
from gptlab.tokenizer import check_text

# The prompt's last tokens a continuation is decoded after (its first word's "▁" keeps its
# space after them, as `decode_continuation` gives it).
_SEAM = 4
# The most tokens a row waits for text to settle: a UTF-8 character is at most four bytes, so
# text that still ends in U+FFFD after this many holds invalid bytes, which no token changes.
_MOST_PENDING = 8


def check_stop_strings(stop: Any, field: str = "stop") -> tuple[str, ...]:
    """`stop` as a tuple of non-empty texts; a UserError naming `field` otherwise. A single str
    is refused: it would be read as a list of its letters."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        raise UserError(f"must be a list of texts, got a single str; pass [{stop!r}] to stop at "
                        f"it", field=field)
    if not isinstance(stop, (list, tuple)):
        raise UserError(f"must be a list of texts, got the {type(stop).__name__}", field=field)
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise UserError(f"item {i} must be a str, got the {type(s).__name__}", field=field)
        check_text(s, field=field)
        if not s:
            raise UserError(f"item {i} is empty: an empty text is in every text, so the "
                            f"generation would stop before it began", field=field)
    return tuple(dict.fromkeys(stop))


def earliest_stop(text: str, stop: Sequence[str]) -> tuple[int, str] | None:
    """(where the earliest stop string in `text` begins, that stop string), None where `text`
    holds none. Of stop strings that begin at the same place, the first in `stop`."""
    found = [(i, k) for k, i in enumerate(text.find(s) for s in stop) if i >= 0]
    if not found:
        return None
    at, k = min(found)
    return at, stop[k]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """(`text` before the earliest stop string in it, whether there was one)."""
    found = earliest_stop(text, stop)
    return (text[:found[0]], True) if found else (text, False)


def cut_reply(text: str, lead: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """(`text` before the earliest stop string in it, less `lead`; that stop string, None where
    it holds none). `text` is a response decoded with `lead` kept, the text a chat template
    writes between its assistant header and an answer (`Tokenizer.answer_lead`; Llama 2's " "
    after "[/INST]"), which a response written to a file or kept as a reply leaves out: the
    text `StopStrings` watched. A stop string that begins inside the lead is found there, as it
    ended the generation, and leaves the response empty; looked for after the lead, it was not
    found, and the response kept the rest of it."""
    found = earliest_stop(text, stop) if stop else None
    kept = text if found is None else text[:found[0]]
    if lead and text.startswith(lead):
        kept = kept[len(lead):]
    return kept, None if found is None else found[1]


def reply_stops(tokenizer: Any) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(ids, texts) that end a chat answer (`Tokenizer.reply_stops`): where `sample` and PPO's
    rollouts end a `messages` prompt's response, as `chat` ends a reply; none from a stand-in
    tokenizer without them."""
    found = getattr(tokenizer, "reply_stops", None)
    if not found:
        return (), ()
    ids, texts = found
    return tuple(sorted(ids)), tuple(texts)


class _Row:
    """One row's continuation, decoded piece by piece (see the module docstring)."""

    def __init__(self, tok: Any, seam: list[int]):
        self.ids = list(seam)
        self.read = len(self.ids)  # ids[:read] are decoded into text already
        self.settled = tok.decode(self.ids)  # the text of ids[:read] (the prompt's: no match)
        self.tail = ""  # the continuation's last characters, fewer than the longest stop

    def add(self, tok: Any, token: int, stop: Sequence[str], longest: int) -> bool:
        """Append `token`; whether the text now holds a stop string."""
        self.ids.append(token)
        whole = tok.decode(self.ids)
        pending = len(self.ids) - self.read
        if not whole.startswith(self.settled) or whole.endswith("\ufffd") \
                or len(whole) == len(self.settled):
            if pending < _MOST_PENDING:
                return False  # a character not whole yet, or no text: wait for more
        # Where a later token changed settled text (bytes a cut had left as U+FFFD), the
        # text from the first character that changed is new.
        new = whole[len(os.path.commonprefix([whole, self.settled])):]
        window = self.tail + new
        self.tail = window[len(window) - (longest - 1):] if longest > 1 else ""
        # The next piece is decoded after this one's tokens alone.
        self.ids = self.ids[self.read:]
        self.read = len(self.ids)
        self.settled = tok.decode(self.ids)
        return any(s in window for s in stop)


class StopStrings:
    """The engine's `stop_when` for stop strings: called with the rows still going and the
    token each drew, it returns those whose continuation's text now holds one of `stop`.
    `prompts` are the prompts' token ids, in the engine's order (each continuation is decoded
    after its prompt's last tokens). `tok` is the tokenizer (its `decode`). `row_stops`, one
    tuple per prompt, are stop strings of that row alone besides `stop` (a chat prompt's
    template's next turn, `Tokenizer.reply_stops`, beside a text prompt that has none)."""

    def __init__(self, tok: Any, stop: Sequence[str], prompts: Sequence[Sequence[int]],
                 row_stops: Sequence[Sequence[str]] | None = None):
        self.tok = tok
        self.stop = check_stop_strings(stop)
        extra = row_stops if row_stops is not None else [()] * len(prompts)
        self.row_stop = [tuple(dict.fromkeys(self.stop + tuple(e))) for e in extra]
        every = {s for stops in self.row_stop for s in stops}
        if not every:
            raise ValueError("no stop strings to watch for")
        self.longest = max(map(len, every))
        self.rows = [_Row(tok, [int(t) for t in p[-_SEAM:]]) for p in prompts]

    def __call__(self, rows: list[int], tokens: list[int]) -> list[int]:
        return [r for r, t in zip(rows, tokens)
                if self.row_stop[r] and self.rows[r].add(self.tok, t, self.row_stop[r],
                                                         self.longest)]
