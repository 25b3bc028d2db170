"""`gptlab chat`: talk to a model in the terminal, one line per user turn.

The conversation is kept as messages and rendered with the tokenizer's chat template before
every reply, so the model sees the whole (fitted) history each turn. The session checks at start
that the template renders and that the system message (or the template alone) leaves room, in
the context less max_new_tokens, for a question of one character: otherwise every question would
be skipped as too long, so the chat is refused at once, naming what to change (`--system`,
`--max-new-tokens`, `--max-context-tokens`).

A line ends at \\n, \\r\\n or a lone \\r, piped or typed. Lines starting with "/" are commands:
"/reset" forgets the history (the system prompt stays), "/exit" quits, as does end of input; a
slash and a word that is no command ("/quit") is refused with a note rather than sent to the
model as a question. A line that is not UTF-8 text is an error (exit code 2) naming the line,
rather than text the model would see as replacement characters. An empty or whitespace-only line
is no message: it is not answered.

Replies go to stdout; notes (dropped turns, a turn that cannot fit) go to stderr, so
`printf 'question\\n' | gptlab chat --model M --greedy` prints just the answer. From a pipe
(stdin no terminal) each reply is printed whole, ending with two empty lines, and has never two
in a row inside (`reply_block`): a script tells replies apart.

At a terminal a reply streams: it is printed as the model writes it (`StreamedReply`), each
piece once no later token can change it, so a character split over tokens prints once, whole,
and neither the stop token nor white space the kept reply lacks is printed. Ctrl-C during a reply
stops it and the prompt comes back (what was printed stays; neither the message nor its reply is
kept); Ctrl-C at the prompt, or from a pipe, ends the chat.
"""
from __future__ import annotations

import codecs
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from gptlab.chat.context import TurnTooLong, fit_messages
from gptlab.checkpoint import load_language_model
from gptlab.engine import SamplingParams, generate
from gptlab.errors import UserError
from gptlab.stop_strings import StopStrings, check_stop_strings, cut_reply
from gptlab.tokenizer import check_text
from gptlab.train.loop import select_device

COMMANDS = {"/exit": "quit (end of input does too)", "/reset": "forget the conversation",
            "/help": "list these commands"}
# What reads as a command: a typo of one ("/quit", "/Exit") must not become a question to the
# model (and a turn of the history); a path such as "/etc/hosts ..." is still a message.
_COMMAND_LIKE = re.compile(r"/[A-Za-z]+")
# Where a line of input ends: as in the text files gptlab reads (`utf8_lines`), Python's
# universal newlines, at \n, \r\n or a lone \r (a classic Mac OS text piped in).
_LINE_END = re.compile(r"\r\n|\r|\n")
# The prompt's last tokens a streamed reply is decoded after: what a reply adds to its
# prompt's text depends on the seam (a SentencePiece "▁" after it), and decoding the whole
# prompt at every token would cost as much per token as the conversation is long.
_SEAM = 16


@dataclass
class ChatConfig:
    """Settings of `gptlab chat`: the model, the system message and the sampling."""

    model: str = ""
    # The system message, kept through every context trim. None: the template's default (if
    # any); "": an empty system message, which replaces that default.
    system: str | None = None
    max_new_tokens: int = 256
    greedy: bool = False
    temperature: float = 0.7
    top_p: float | None = None
    max_context_tokens: int | None = None  # below the model's context, to bound memory or time
    seed: int = 0
    # Texts that end a reply as soon as it holds one (`--stop`), beside the template's own
    # (`Tokenizer.reply_stops`); the reply is kept without it.
    stop: tuple[str, ...] = ()
    device: str = "auto"  # auto (CUDA where there is a GPU, else the CPU) | cpu | cuda[:N] | mps


class ChatSession:
    """A conversation with one model: messages in, replies out, history fitted to the context."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: ChatConfig):
        # Checks the sampling settings and stop strings as `generate` and `sample` do, with the
        # same messages. A reply ends where the template ends an assistant turn, in a token or
        # in text (a plain-text template's next "User:"): `Tokenizer.reply_stops`; or at a stop
        # string given (`--stop`), whichever comes first.
        stop_ids, template_stops = tokenizer.reply_stops
        self.stop_strings = tuple(dict.fromkeys(template_stops + check_stop_strings(cfg.stop)))
        self.params = SamplingParams(max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy,
                                     temperature=cfg.temperature, top_p=cfg.top_p,
                                     stop_ids=tuple(sorted(stop_ids)))
        if cfg.max_context_tokens is not None and cfg.max_context_tokens < 1:
            raise UserError("must be at least 1", field="max_context_tokens")
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.context = min(model.config.context, cfg.max_context_tokens or model.config.context)
        if (cfg.max_context_tokens or 0) > model.config.context:
            print(f"note: max_context_tokens (--max-context-tokens) {cfg.max_context_tokens} is "
                  f"more than the model's context: the conversation fits in its "
                  f"{model.config.context} tokens", file=sys.stderr)
        self.budget = self.context - cfg.max_new_tokens
        if self.budget < 1:
            smaller = (" (max_context_tokens, --max-context-tokens)"
                       if self.context < model.config.context else "")
            raise UserError(f"{cfg.max_new_tokens} leaves no room for the conversation in a "
                            f"context of {self.context} tokens{smaller}; lower it "
                            f"(--max-new-tokens){self._or_larger_context(1)}",
                            field="max_new_tokens")
        self.turns = 0
        self.reset()
        # Fail at start, not at the first question, when the template cannot render a chat,
        # or when the system message (or the template alone) leaves no room for any question:
        # every message would be skipped as too long, each told to shorten itself. The probe
        # is the shortest question, one character: with an empty one, a conversation that
        # filled the budget to the last token passed, and then no line could be answered.
        question = {"role": "user", "content": "x"}
        n = self.count_tokens(self.messages + [question])
        fit = (f"only {self.budget} fit (the context of {self.context} minus max_new_tokens "
               f"{cfg.max_new_tokens})")
        more_room = self.more_room(n)
        or_more_room = f", or {more_room}" if more_room else ""
        if n > self.budget and self.messages and not cfg.system.strip():
            # Nothing to shorten: the template's system block (its markers) is what takes room.
            without = self.count_tokens([question])
            if without <= self.budget:
                raise UserError(f"holds no text, yet the chat template's system block takes "
                                f"room: with it a question of one character needs {n} tokens, "
                                f"but {fit}; leave it out (no --system), which needs "
                                f"{without}{or_more_room}", field="system")
        elif n > self.budget and self.messages:
            raise UserError(f"needs {n} tokens with the chat template and a question of one "
                            f"character, but {fit}; shorten it{or_more_room}", field="system")
        if n > self.budget:
            # Advice only where it makes room: no lower reply where it is 1 token already, or
            # where even a reply of 1 leaves too little.
            said = (f"{cfg.max_new_tokens} leaves {self.budget} tokens of the context of "
                    f"{self.context} for the conversation, but the chat template and a question "
                    f"of one character need {n}")
            if self._lower_reply(n):
                raise UserError(f"{said}; lower it (--max-new-tokens)"
                                f"{self._or_larger_context(n)}", field="max_new_tokens")
            larger = self._larger_context(n)
            raise UserError(f"{said}; {larger}" if larger else
                            f"{said}: no reply fits the model's context of "
                            f"{self.model.config.context} tokens", field="max_new_tokens")

    def _larger_context(self, needed: int) -> str:
        """The advice to raise a lowered max_context_tokens, where the model's own context
        would hold `needed` tokens of conversation and the reply; "" where it would not help."""
        if self.context == self.model.config.context or \
                needed + self.cfg.max_new_tokens > self.model.config.context:
            return ""
        return (f"raise max_context_tokens (--max-context-tokens; the model's context is "
                f"{self.model.config.context})")

    def _or_larger_context(self, needed: int) -> str:
        larger = self._larger_context(needed)
        return f", or {larger}" if larger else ""

    def _lower_reply(self, needed: int) -> bool:
        """Whether a lower max_new_tokens makes room for `needed` tokens of conversation: the
        reply is above 1 token, and the context holds `needed` and a reply of 1."""
        return self.cfg.max_new_tokens > 1 and needed < self.context

    def more_room(self, needed: int) -> str:
        """What would make room for a conversation of `needed` tokens besides shortening it:
        a larger context where one was set below the model's, or a shorter reply; "" where
        neither would."""
        options = [self._larger_context(needed),
                   "lower max_new_tokens (--max-new-tokens)" if self._lower_reply(needed) else ""]
        return ", or ".join(o for o in options if o)

    def reset(self) -> None:
        """Forget the conversation, keeping only the system message."""
        self.messages: list[dict] = []
        if self.cfg.system is not None:
            self.messages.append({"role": "system", "content": self.cfg.system})

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens `messages` take rendered with the chat template and the assistant's
        generation prompt."""
        return len(self.tok.render_chat(messages, add_generation_prompt=True)[0])

    def reply(self, text: str, stderr: TextIO | None = None,
              on_text: Callable[[str], None] | None = None) -> str:
        """Answer one user message; the history keeps the turn. A message that cannot fit even
        alone raises `TurnTooLong` and leaves the history as it was. `on_text` gets the reply
        while it is written, as a terminal shows it: its text in pieces, each as soon as no
        later token can change it (`StreamedReply`), then its line end; a note that the reply
        was cut follows that."""
        stderr = stderr or sys.stderr
        kept, dropped = fit_messages(self.messages + [{"role": "user", "content": text}],
                                     self.count_tokens, self.budget, self.more_room)
        if dropped:
            print(f"note: the conversation outgrew the context of {self.context} tokens: "
                  f"dropped the oldest {dropped} turn{'s' if dropped > 1 else ''}", file=stderr)
        ids, _ = self.tok.render_chat(kept, add_generation_prompt=True)
        stream = None if on_text is None else StreamedReply(
            self.tok, kept, ids, self.params.stop_ids, on_text, self.stop_strings)
        # A new seed per turn: a seeded session is reproducible, yet turns are not correlated.
        gen = generate(self.model, [ids], self.params, seed=self.cfg.seed + self.turns,
                       pad_id=self.tok.pad_id, on_tokens=None if stream is None else stream.add,
                       stop_when=(StopStrings(self.tok, self.stop_strings, [ids])
                                  if self.stop_strings else None))
        answer = reply_text(self.tok, kept, ids, gen, 0, self.stop_strings)
        if stream is not None:
            stream.end(answer)
        if not gen.finished[0]:
            print(f"note: the reply was cut at {self.cfg.max_new_tokens} new tokens "
                  f"(max_new_tokens, --max-new-tokens)", file=stderr)
        # The dropped turns are gone for good: they are reported once, not at every turn.
        self.messages = kept + [{"role": "assistant", "content": answer}]
        self.turns += 1
        return answer


def reply_text(tok: Any, messages: list[dict], ids: list[int], gen: Any, row: int,
               stop_strings: tuple[str, ...]) -> str:
    """The reply row `row` of generation `gen` holds, for the conversation `messages` rendered
    as `ids`: its text before the stop that ended it, stripped, as the history keeps it."""
    tokens = gen.tokens[row]
    if gen.stopped_by_string and gen.stopped_by_string[row]:
        # the next turn's start, in text: the reply is what comes before it, cut in the text
        # with the template's lead, where StopStrings found it
        return cut_reply(tok.decode_response(messages, ids, tokens, lead=""),
                         tok.answer_lead(messages), stop_strings)[0].strip()
    if gen.finished[row]:
        # the end-of-turn token; the template writes its own
        return tok.decode_response(messages, ids, tokens[:-1]).strip()
    # no half a character at the cut
    return tok.decode_response(messages, ids, tokens, cut=True).strip()


class StreamedReply:
    """A reply's text handed to `on_text` while its tokens come (`generate`'s `on_tokens` is
    `add`): only text no later token can change. A character whose bytes span tokens waits
    for its last one, rather than showing as U+FFFD first; the stop token is not text; white
    space at the reply's start, and so far at its end, waits too, as the reply kept has none.
    `end` hands the rest of the reply as kept, then its line end: the pieces together are the
    reply and "\\n".

    Each token decodes only the tokens since the last point whose text is final (the tokenizer
    `decodes_apart` there), after a seam of `_SEAM` tokens before it, as the reply is decoded
    after its prompt's: the text before that point is kept, so a token costs the same at the
    end of a long reply as at its start (0.1 ms on SmolLM2's tokenizer), where decoding the
    whole reply so far cost as much as the reply is long (1.0 ms a token at the 2,000th). The
    pieces are those the whole reply decoded at each token gives.

    With `stop_strings` (a plain-text template's next "User:"), text that may be the start of
    one waits until it is not, and a stop string and what follows are never handed on: the
    reply is kept cut before it.

    A run of byte fallback's `<0xNN>` tokens decodes as one: UTF-8 text if its bytes are, else
    U+FFFD byte for byte, so no point inside it is final for `decodes_apart`. A `_Run` follows
    its bytes instead: while they are UTF-8, each whole character ends a point whose text
    stands unless an invalid byte comes, and the bytes after it decode after the seam the run
    began with; an invalid byte makes the run's text U+FFFD from its start, decoded once, and
    final from there on. A token costs the same in a run of thousands of bytes as after it."""

    def __init__(self, tok: Any, messages: list[dict], prompt_ids: list[int],
                 stop_ids: tuple[int, ...], on_text: Callable[[str], None],
                 stop_strings: tuple[str, ...] = (), raw: bool = False):
        self.tok, self.messages, self.on_text = tok, messages, on_text
        self.stop_ids = set(stop_ids)
        self.stop_strings = stop_strings
        # `raw`: a text completion's continuation, kept as it is (`serve`'s `/v1/completions`):
        # no template lead, and its white space handed on, at its start too.
        self.raw = raw
        self.lead = "" if raw else tok.answer_lead(messages)  # the template's, rendered once
        # The prompt's seam, then the reply's tokens; the reply's text up to `final` is
        # `before`, which no later token changes (inside a run: while its bytes are UTF-8).
        self.tokens: list[int] = list(prompt_ids[-_SEAM:])
        self.start = self.final = len(self.tokens)
        self.before = ""
        self.given = ""
        # What the tokens after `final` are decoded after, where not the `_SEAM` before it.
        self.seam: list[int] | None = None
        self.run: _Run | None = None
        self.plain = False  # whether the reply has a token that is no byte fallback's

    def add(self, rows: list[int], tokens: list[int]) -> None:
        """The engine's `on_tokens` for a generation of one prompt."""
        for t in tokens:
            if t not in self.stop_ids:
                self.tokens.append(t)
                self._settle(len(self.tokens) - 1)
        # As the reply is decoded at the end, with a last character the tokens split left out.
        full = self.before + self._text(len(self.tokens), cut=True)
        # Stop strings are looked for where StopStrings looks, in the text with the template's
        # lead and white space, and the reply kept is cut there (`cut_reply`).
        text = self._before_stop(full) if self.stop_strings else full
        text = text[len(self.lead):] if self.lead and full.startswith(self.lead) else text
        text = text if self.raw else text.strip()
        if len(text) > len(self.given) and text.startswith(self.given):
            self._give(text[len(self.given):])

    def _before_stop(self, text: str) -> str:
        """`text` less a stop string and what follows, or, where it ends in the start of one,
        less that start (and white space before it). What was handed on holds neither, so
        only its last characters and what follows are searched (`text` holds the lead and
        white space `given` lacks: its place in `text` is no earlier than in `given`)."""
        longest = max(map(len, self.stop_strings))
        since = max(0, len(self.given) - longest)
        at = min((i for i in (text.find(s, since) for s in self.stop_strings) if i >= 0),
                 default=-1)
        if at >= 0:
            return text[:at].rstrip()
        for k in range(min(longest - 1, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop_strings):
                return text[:-k].rstrip()
        return text

    def _settle(self, last: int) -> None:
        """Move `final` to just before the newest token, `last`, where the text there is
        final. The reply's start is a `final` only where the prompt's text is final before it
        or, a run of bytes joining the two, once that run has ended (before, the reply is
        decoded whole at each token, as the seam asks)."""
        byte = self.tok.fallback_byte(self.tokens[last])
        if self.run is None:
            if last > self.final and (self.final > self.start or self.plain
                                      or self._apart(self.start)) and self._apart(last):
                self.before += self._text(last)
                self.final, self.seam = last, None
            if byte is not None and self.final == last:
                seam = self.tokens[max(0, last - _SEAM):last]
                joined = last == self.start and not self._apart(last)
                if joined:  # a run the prompt's last bytes begin: the reply's goes on with it
                    ahead = []
                    for t in reversed(seam):
                        if self.tok.fallback_byte(t) is None:
                            break
                        ahead.insert(0, self.tok.fallback_byte(t))
                if self.tok.decode(seam) and (not joined or ahead):  # text the run follows
                    self.run, self.seam = _Run(last, self.before, seam), seam
                    if joined:  # bytes no UTF-8 there: U+FFFD, final at each byte after
                        self.run.add(bytes(ahead), length=0)
        if self.run is not None:
            self._settle_in_run(last, byte)
        self.plain = self.plain or byte is None

    def _settle_in_run(self, last: int, byte: int | None) -> None:
        """`_settle` where `final` lies in a run: the newest token, a byte, goes on with it,
        or ends it."""
        run = self.run
        if run.invalid or run.whole():
            # Whole characters before `last`, or bytes of a run that is U+FFFD whatever follows
            self.before += self._text(last)
            self.final = last
        elif byte is None:  # it ends inside a character: U+FFFD byte for byte from its start
            self.before = run.before + self.tok.decode_continuation(
                run.seam, self.tokens[run.start:last])
            self.final = last
        if byte is None:
            self.run, self.seam = None, None
        elif not run.invalid and not run.add(bytes([byte])):  # U+FFFD from its start on
            self.before = run.before + self.tok.decode_continuation(
                run.seam, self.tokens[run.start:last + 1])
            # What follows decodes after bytes that are no UTF-8 whatever comes after them.
            self.seam = run.seam + self.tokens[run.character:last + 1]
            self.final = last + 1

    def _apart(self, at: int) -> bool:
        """Whether the text of the tokens before `at` is final, the token at `at` after them."""
        return self.tok.decodes_apart(self.tokens[max(0, at - _SEAM):at], self.tokens[at])

    def _text(self, stop: int, cut: bool = False) -> str:
        """The text tokens[final:stop] add after the seam before them."""
        seam = (self.seam if self.seam is not None
                else self.tokens[max(0, self.final - _SEAM):self.final])
        return self.tok.decode_continuation(seam, self.tokens[self.final:stop], cut=cut)

    def end(self, answer: str) -> None:
        """The rest of `answer`, the reply as kept, and its line end. Where a later token
        changed text already handed on (invalid bytes: byte fallback decodes each byte of a
        run that holds one as U+FFFD), the reply follows whole, on a line of its own."""
        rest = answer[len(self.given):] if answer.startswith(self.given) else "\n" + answer
        self._give(rest + "\n")

    def _give(self, text: str) -> None:
        self.given += text
        self.on_text(text)


class _Run:
    """A run of byte fallback's tokens in a streamed reply: where it starts in the tokens, the
    reply's text before it and the seam before it, and whether its bytes so far are UTF-8
    (an incremental decoder, which refuses a byte no continuation could make valid)."""

    def __init__(self, start: int, before: str, seam: list[int]):
        self.start, self.before, self.seam = start, before, seam
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.character = start  # where the character its last bytes are of starts
        self.length = 0
        self.invalid = False

    def whole(self) -> bool:
        """Whether its bytes so far are whole characters."""
        return not self.utf8.getstate()[0]

    def add(self, data: bytes, length: int = 1) -> bool:
        """The run's next byte (or, `length` 0, the bytes of the prompt's tail it goes on);
        whether its bytes are still UTF-8, or a start of it."""
        if self.whole():
            self.character = self.start + self.length
        self.length += length
        try:
            self.utf8.decode(data)
        except UnicodeDecodeError:
            self.invalid = True
        return not self.invalid


def run_chat(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None,
             stderr: TextIO | None = None) -> int:
    """Read user lines until end of input or /exit; returns the number of turns answered.
    A line ends at \\n, \\r\\n or a lone \\r, piped or typed. At a terminal each reply is
    printed as it is written, and a KeyboardInterrupt during a reply drops that turn (what was
    printed of it stays) and reads the next line; at the prompt, or from a pipe, it is raised.
    From a pipe each reply is printed whole, as a block (`reply_block`). The streams default
    to sys.stdin / stdout / stderr as they are at call time."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    stderr = stderr or sys.stderr
    interactive = stdin.isatty()
    if interactive:
        print("(" + "; ".join(f"{c}: {h}" for c, h in COMMANDS.items()) + ")", file=stderr)
    if isinstance(stdin, io.TextIOWrapper):
        # Bytes that are not UTF-8 then arrive as lone surrogates in their own line, which
        # check_text names, instead of failing a read that may span many lines.
        stdin.reconfigure(errors="surrogateescape")
    shown: list[str] = []  # what the reply being written has put on stdout

    def show(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()
        shown.append(piece)

    def end_line() -> bool:
        """End the line the reply being written left open, if it did; whether it did. With
        nothing of it shown, the terminal's echo of the question's Enter ended the line."""
        open_line = bool(shown) and not shown[-1].endswith("\n")
        if open_line:
            stdout.write("\n")
            stdout.flush()
        return open_line
    answered = 0
    lineno = 0
    # Lines read and not yet answered: stdin's readline ends a line at \n only, so what it
    # returns can hold more than one (a lone \r inside).
    pending: list[str] = []
    while True:
        if not pending:
            try:
                if interactive:
                    stdout.write("> ")
                    stdout.flush()
                read = stdin.readline()
            except UnicodeDecodeError as e:
                raise UserError(f"not UTF-8 text: byte 0x{e.object[e.start]:02x} cannot be "
                                f"decoded", path="<stdin>") from None
            except KeyboardInterrupt:
                if interactive:  # Ctrl-C at the prompt: "interrupted" not after "> "
                    stdout.write("\n")
                    stdout.flush()
                raise
            if not read:  # end of input
                if interactive:  # Ctrl-D: leave the terminal on a fresh line, not after "> "
                    stdout.write("\n")
                    stdout.flush()
                break
            pending = _LINE_END.split(read)
            if not pending[-1]:  # nothing after the last line end
                pending.pop()
        line = pending.pop(0)
        lineno += 1
        try:
            text = check_text(line)
        except UserError as e:
            raise e.at("<stdin>", lineno) from None
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            print("note: the conversation was reset", file=stderr)
            continue
        if command == "/help":
            print("\n".join(f"{c}  {h}" for c, h in COMMANDS.items()), file=stderr)
            continue
        if _COMMAND_LIKE.fullmatch(command):
            print(f"note: unknown command {command} (/help lists them); nothing was sent",
                  file=stderr)
            continue
        if not command:
            continue
        # As it was before this line: a Ctrl-C during the reply puts the session back here.
        messages, turns = session.messages, session.turns
        shown.clear()
        try:
            answer = session.reply(text, stderr, on_text=show if interactive else None)
        except KeyboardInterrupt:
            if not interactive:  # a script's Ctrl-C (or kill -INT) stops the chat, as before
                raise
            # As llama.cpp and ollama do: the reply stops and the prompt comes back. The
            # question goes too: kept alone, the next prompt would hold two user messages in a
            # row, which some templates refuse; and the session is as if the line was never
            # typed (same seed for the next turn), so it can be asked again or rephrased.
            session.messages, session.turns = messages, turns
            # What was printed of the reply stays; the note starts a line of its own (after
            # the terminal's "^C").
            open_line = end_line()
            print(("" if open_line else "\n") + "note: the reply was interrupted; this message "
                  "and its reply are not kept (Ctrl-C at the prompt ends the chat)", file=stderr,
                  flush=True)
            continue
        except TurnTooLong as e:
            print(f"error: {e}; this message was skipped", file=stderr)
            if not interactive:
                print(reply_block(""), end="", file=stdout, flush=True)
            continue
        except Exception:
            # An error after part of the reply was printed (the engine's NaN logits at a later
            # token): the error, on stderr, starts a line of its own, not the reply's.
            end_line()
            raise
        if not interactive:  # at a terminal, `show` has printed the reply
            print(reply_block(answer), end="", file=stdout, flush=True)
        answered += 1
    return answered


def reply_block(answer: str) -> str:
    """A reply as a pipe gets it: its lines, each run of blank (empty or whitespace-only) lines
    inside it as one empty line and none at its start or end, then two empty lines. A script
    reads lines up to two empty ones in a row as one block per message (a skipped message's
    block is empty); a reply's paragraphs stay apart. The history keeps the reply as it was."""
    lines: list[str] = []
    for line in answer.split("\n"):
        if line.strip():
            lines.append(line)
        elif lines and lines[-1]:
            lines.append("")
    if lines and not lines[-1]:
        lines.pop()
    return "".join(line + "\n" for line in lines) + "\n\n"


def chat(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """`gptlab chat`: load `cfg.model` and talk until end of input; returns turns answered."""
    if not cfg.model:
        raise UserError("chat needs a model to talk to (--model)", field="model")
    # The sampling flags, stop strings and system message are checked before the model loads.
    SamplingParams(max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy,
                   temperature=cfg.temperature, top_p=cfg.top_p)
    check_stop_strings(cfg.stop)
    if cfg.system is not None:
        check_text(cfg.system, field="system")
    model, tok, _ = load_language_model(Path(cfg.model), select_device(cfg.device))
    return run_chat(ChatSession(model, tok, cfg), stdin, stdout, stderr)
