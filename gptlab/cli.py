"""The `gptlab` command: one verb per stage of the recipe. Each verb parses its flags, builds a
typed config and calls the Python API; nothing else happens here."""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import Callable, Iterator, Sequence

from gptlab.errors import (NotFound, PathError, UserError, WrongKind, counted, field_of_path,
                           path_error)

DEVICE_HELP = "auto (CUDA where there is a GPU, else the CPU), cpu, cuda, cuda:N or mps"
GREEDY_HELP = "always take the most likely token (no sampling)"
TEMPERATURE_HELP = "sampling temperature: below 1 surer, above 1 more varied"
TOP_P_HELP = "sample from the smallest set of likeliest tokens holding this probability " \
             "(default: all)"
SEED_HELP = "seed of the sampling"

EXIT_BAD_INPUT = 2
EXIT_READER_GONE = 141  # 128 + SIGPIPE, what a shell reports for `yes | head -1`


class _Parser(argparse.ArgumentParser):
    """argparse that takes flags only as written in full, names the flag meant for one it does
    not know, takes a negative number for a value, says what stood where a flag's value belonged
    (a flag, the line's end, a word beginning with '-' and how to write it) and that a switch
    given a value takes none, and exits with code 2."""

    def __init__(self, *args, **kwargs) -> None:
        # No abbreviations: `--temp` would mean --temperature until the day a flag `--temp-x`
        # came, and then be refused or mean another flag.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # A negative number is a value, in every form Python reads: argparse's own pattern
        # takes only `-1` and `-0.5`, and read `--lr -1e-3` or `--temperature -.5e-1` as a flag
        # left without its value ("argument --lr: expected one argument"). No flag of gptlab
        # looks like a number, which would make argparse read numbers as flags instead.
        self._negative_number_matcher = _NegativeNumber()

    def parse_known_args(  # type: ignore[override]
            self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # The words, kept for `error` to name the one that stood where a flag's value belonged.
        self._words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        message = self._value_missing(message) or self._dash_positional(message) or \
            self._switch_given_value(message) or message
        if message.startswith("argument "):
            # One flag's value (`argument --max-steps: expected an integer ...`): the line names
            # the flag, and a config verb's usage, every flag of it, would bury it.
            chosen = re.search(r"invalid choice: '(.*)' \(choose from (.*)\)$", message)
            close = chosen and difflib.get_close_matches(
                chosen.group(1), re.findall(r"'([^']*)'", chosen.group(2)), n=1)
            if close:  # `gptlab sfx`: the verb meant
                message += f"; did you mean '{close[0]}'?"
            self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")
        if message.startswith("unrecognized arguments: "):
            self.unrecognized(message.removeprefix("unrecognized arguments: ").split(" "))
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")

    def _reads_as_flag(self, word: str) -> bool:
        """Whether argparse reads `word` as a flag, not a value: it begins with '-' and is
        neither '-' (standard input), a negative number nor a word with a space in it, unless
        it is a flag of this parser (`--seed`, `--seed=1`). '--' counts: it ends the flags."""
        if not word.startswith("-") or word == "-":
            return False
        if word.split("=", 1)[0] in self._option_string_actions:
            return True
        return not self._negative_number_matcher.match(word) and " " not in word

    def _value_missing(self, message: str) -> str | None:
        """argparse's `argument --out: expected one argument` said of what stood where the value
        belonged: nothing (the flag ended the line), another flag, or a value that begins with
        '-', which argparse reads as a flag: `--out=-x` gives it (a path: `./-x`). None if
        `message` is not that error."""
        said = re.fullmatch(r"argument (\S+): (expected (?:one argument|at least one argument|"
                            r"(\d+) arguments))", message)
        action = said and next((a for a in self._actions
                                if "/".join(a.option_strings) == said.group(1)), None)
        if not action or not action.option_strings:
            return None
        words, n = getattr(self, "_words", []), int(said.group(3) or 1)
        for i, word in enumerate(words):
            flag, eq, _ = word.partition("=")
            if flag not in action.option_strings:
                continue
            if eq and n > 1:  # `--from=hf PATH`: '=' gives one value
                names = action.metavar if isinstance(action.metavar, tuple) else ["VALUE"] * n
                return (f"{message}: '=' gives a flag one value; write the {n} after a space "
                        f"({flag} {' '.join(names)})")
            if eq:
                continue
            taken = words[i + 1:i + 1 + n]
            stop = next((w for w in taken if self._reads_as_flag(w)), None)
            if stop is None and len(taken) == n:
                continue  # this one had its values: the error is another's
            got = "none" if not taken or taken[0] == stop else \
                f"only {taken.index(stop) if stop else len(taken)}"
            if stop is None:
                return f"{message}, got {got} before the end of the command line"
            if stop == "--" or stop.split("=", 1)[0] in self._option_string_actions:
                return f"{message}, got {got} before {stop}"
            literal = f"write {flag}={stop} for it to be the value" if n == 1 else \
                f"write a path that begins with '-' as ./{stop}"
            if action.nargs in ("+", "*"):  # `--data=-x` is a list of that one value
                literal = f"write {flag}={stop} for it to be the value (one value; a path may " \
                          f"be written ./{stop})"
            return (f"{message}, got {got} before '{stop}', which begins with '-' and is read "
                    f"as a flag; {literal}")
        return None

    def _switch_given_value(self, message: str) -> str | None:
        """argparse's `argument --greedy: ignored explicit argument 'yes'`, said of a switch (a
        flag that takes no value) written with one (`--greedy=yes`): that it takes none, and how
        it is turned on and off. None if `message` is not that error."""
        said = re.fullmatch(r"argument (\S+): ignored explicit argument (.*)", message)
        action = said and next((a for a in self._actions
                                if "/".join(a.option_strings) == said.group(1)), None)
        if not action:
            return None
        word = next((w for w in getattr(self, "_words", [])
                     if "=" in w and w.split("=", 1)[0] in action.option_strings), None)
        got = repr(word) if word else f"the value {said.group(2)}"
        flags = [f for f in action.option_strings if f.startswith("--")] or action.option_strings
        if isinstance(action, argparse.BooleanOptionalAction):
            on = [f for f in flags if not f.startswith("--no-")]
            off = [f for f in flags if f.startswith("--no-")]
            how = f"write {on[0]} to turn it on, {off[0]} to turn it off"
        elif isinstance(action, argparse._StoreTrueAction):
            how = f"write {flags[0]} to turn it on, and leave it out to leave it off"
        elif isinstance(action, argparse._StoreFalseAction):
            how = f"write {flags[0]} to turn it off, and leave it out to leave it on"
        else:
            how = f"write {flags[0]} alone"
        return f"argument {said.group(1)}: takes no value, got {got}; {how}"

    def _dash_positional(self, message: str) -> str | None:
        """argparse's `the following arguments are required: text` where a word that begins
        with '-' (`-x`) was read as a flag: after `--` it is the argument. None otherwise."""
        said = re.fullmatch(r"the following arguments are required: (.*)", message)
        missing = said.group(1).split(", ") if said else []
        positional = [a for a in self._actions if not a.option_strings
                      and (a.metavar or a.dest) in missing]
        words = getattr(self, "_words", [])
        dashed = words[:words.index("--")] if "--" in words else words
        stray = next((w for w in dashed if self._reads_as_flag(w)
                      and w.split("=", 1)[0] not in self._option_string_actions), None)
        if not positional or stray is None:
            return None
        return (f"{message} ('{stray}' begins with '-' and is read as a flag; write -- {stray} "
                f"for it to be the {positional[0].metavar or positional[0].dest})")

    def unrecognized(self, words: Sequence[str]) -> None:
        """Exit 2 with one line on the words no argument took: each unknown flag with the one it
        may have meant (`--temp`: --temperature), else the values no argument takes."""
        flags = [w.split("=", 1)[0] for w in words
                 if w.startswith("-") and len(w) > 1 and not _is_number(w)]
        if flags:
            meant = {flag: self._meant(flag) for flag in dict.fromkeys(flags)}
            if len(meant) == 1 and meant[flags[0]]:
                said = f"unknown flag {flags[0]}; did you mean {meant[flags[0]]}?"
            else:
                said = ("unknown flag" + ("s " if len(meant) > 1 else " ") + ", ".join(
                    flag + (f" (did you mean {m}?)" if m else "") for flag, m in meant.items())
                    + f"; `{self.prog} --help` lists the flags")
        else:
            said = (f"unexpected argument{'s' if len(words) > 1 else ''} "
                    f"{', '.join(map(repr, words))} ({self._after_a_value(words[0])}; "
                    f"`{self.prog} --help` lists the arguments)")
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {said}\n")

    def _after_a_value(self, word: str) -> str:
        """What to do about `word`, a value no argument took: where it follows a flag's one
        value (`--prompt "a b" "c d"`), that the flag takes one, and, for a flag that may be
        repeated, to repeat it; else to quote a value that holds spaces."""
        seen = getattr(self, "_words", [])
        at = len(seen) - 1 - seen[::-1].index(word) if word in seen else -1  # `--prompt x x`
        flag = None
        if at >= 1 and "=" in seen[at - 1] and seen[at - 1].startswith("--"):
            flag = seen[at - 1].split("=", 1)[0]  # --prompt=a b
        elif at >= 2:
            flag = seen[at - 2]  # --prompt a b
        action = self._option_string_actions.get(flag or "")
        if action is None or action.nargs is not None or not action.option_strings:
            return "quote a value that holds spaces"
        if isinstance(action, argparse._AppendAction):
            return (f"{flag} takes one value each time: write {flag} again before it for "
                    f"another, or quote a value that holds spaces")
        return f"{flag} takes one value: quote a value that holds spaces"

    def _meant(self, flag: str) -> str:
        """The flags `flag` begins (it was cut short), else the one closest to it; '' if none."""
        known = [s for a in self._actions if not isinstance(a, argparse._HelpAction)
                 for s in a.option_strings]
        begun = [s for s in known if s.startswith(flag) and s.startswith("--")]
        if 0 < len(begun) <= 4:
            return " or ".join(filter(None, [", ".join(begun[:-1]), begun[-1]]))
        # Of the closest few, the one that begins as `flag` does the longest way: `--tempx` is
        # nearer `--stop` than `--temperature` by difflib's ratio, yet meant the latter.
        close = difflib.get_close_matches(flag, begun or known, n=3)
        return max(close, key=lambda s: len(os.path.commonprefix([s, flag])), default="")


class _NegativeNumber:
    """argparse's test of whether a word is a negative number (its `.match`), as Python reads
    one: `-1e-3`, `-1.`, `-1_000` too."""

    def match(self, word: str) -> bool:
        return word.startswith("-") and _is_number(word)


def _is_number(word: str) -> bool:
    """Whether `word` is a number (`-1`, `-1e-3`): a value, not a flag."""
    try:
        float(word)
    except ValueError:
        return False
    return True


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with config values")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


# --- verbs -------------------------------------------------------------------------------------
# Each `_verb_*` returns (help, add_arguments, run). Imports stay inside `run` so that
# `gptlab --help` is fast and a verb's optional dependencies are only needed when it is used.

def _verb_tokenizer():
    def add(p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="action", required=True, parser_class=_Parser,
                               help="train a tokenizer, or encode a text with one")
        t = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
        t.add_argument("--data", nargs="+", required=True,
                       help="corpus files (.txt/.jsonl/.json/.parquet) or directories, of one "
                            "split (not train.txt with test.txt), or a Hub dataset user/name")
        t.add_argument("--vocab-size", type=int, default=4096,
                       help="tokens in the vocabulary (the 256 bytes, merges, special tokens)")
        t.add_argument("--out", required=True,
                       help="output directory, not in a --data directory (writes "
                            "tokenizer.json and tokenizer_config.json; an earlier model's "
                            "generation_config.json there is removed)")
        e = sub.add_parser("encode", help="print the token ids of a text")
        e.add_argument("--tokenizer", required=True,
                       help="tokenizer or model directory (its tokenizer.json)")
        e.add_argument("text", help="the text to encode")

    def run(args: argparse.Namespace) -> None:
        from gptlab import tokenizer as tk
        if args.action == "train":
            from pathlib import Path

            from gptlab.data.corpus import check_out_of_corpus
            from gptlab.io import check_dir_out, check_holds_none
            out = check_dir_out(args.out, field="out")  # before training, not after
            # A model's tokenizer replaced would make it read other tokens.
            check_holds_none(out, ("config.json", "tokenizer.json"))
            # Refuses an empty path too (Path("") is the current directory), and an --out in a
            # corpus directory, as every verb refuses its output among what it reads.
            check_out_of_corpus(out, args.data, writes="the tokenizer's directory")
            # Paths, not strings: a missing file must be an error, never a one-line "document".
            tok = tk.train_tokenizer([Path(p) for p in args.data], vocab_size=args.vocab_size)
            tok.save(args.out)
            print(f"wrote {Path(args.out) / 'tokenizer.json'} (vocabulary {tok.vocab_size})")
        else:
            tk.check_text(args.text, field="text")  # named, as generate names its --prompt
            tok = tk.load_tokenizer(args.tokenizer)
            print(" ".join(map(str, tok.encode(args.text))))

    return "train or use a byte-level BPE tokenizer", add, run


def _verb_generate():
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model directory, HF directory or .gguf")
        p.add_argument("--prompt", required=True, action="append",
                       help="text to continue (repeat for a batch)")
        p.add_argument("--max-new-tokens", type=int, default=64,
                       help="longest continuation, in tokens")
        how = p.add_mutually_exclusive_group()  # greedy decoding has no temperature
        how.add_argument("--greedy", action="store_true", help=GREEDY_HELP)
        how.add_argument("--temperature", type=float, default=1.0, help=TEMPERATURE_HELP)
        p.add_argument("--top-k", type=int, default=None,
                       help="sample from the k most likely tokens only (default: all)")
        p.add_argument("--top-p", type=float, default=None, help=TOP_P_HELP)
        p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
        p.add_argument("--truncate", action="store_true",
                       help="drop the oldest prompt tokens when a prompt does not fit the context")
        p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                       help="end a continuation as soon as its text holds TEXT, which is left "
                            "out of what is printed (repeat for several)")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)

    def run(args: argparse.Namespace) -> None:
        from gptlab.api import generate_text
        from gptlab.engine import SamplingParams
        from gptlab.stop_strings import check_stop_strings
        from gptlab.tokenizer import check_text
        # The flags and prompts are checked before the model loads.
        SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        for text in args.prompt:
            check_text(text, field="prompt")
        check_stop_strings(args.stop)
        try:
            outs = generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens,
                                 greedy=args.greedy, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                 truncate=args.truncate, device=args.device, stop=args.stop)
        except UserError as e:
            # generate_text names a prompt by its parameter, `prompts[1]`: here it is the
            # second --prompt typed.
            found = re.fullmatch(r"prompts\[(\d+)\]", e.field or "")
            if found is None:
                raise
            i = int(found[1]) + 1
            suffix = "th" if 10 <= i % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(i % 10, "th")
            nth = f"{i}{suffix}"
            raise UserError(e.message, path=e.path, field="--prompt" if len(args.prompt) == 1
                            else f"--prompt (the {nth})") from None
        for text in outs:
            print(text)

    return "continue raw text with a model", add, run


def _verb_chat():
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model directory, HF directory or .gguf")
        p.add_argument("--system", default=None, help="system message (kept in every turn)")
        p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply")
        how = p.add_mutually_exclusive_group()
        how.add_argument("--temperature", type=float, default=0.7, help=TEMPERATURE_HELP)
        how.add_argument("--greedy", action="store_true", help=GREEDY_HELP)
        p.add_argument("--top-p", type=float, default=None, help=TOP_P_HELP)
        p.add_argument("--max-context-tokens", type=int, default=None,
                       help="fit the conversation in fewer tokens than the model's context")
        p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                       help="end a reply as soon as its text holds TEXT, which is left out of "
                            "the reply and the history (repeat for several)")
        p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        p.epilog = ("One message per line; /help lists the commands. At a terminal a reply "
                    "is printed as it is written, and Ctrl-C during a reply stops it (what was "
                    "printed stays on screen; neither it nor its message is kept); Ctrl-C at "
                    "the prompt, /exit or end of input ends the chat. From a pipe each reply "
                    "is printed whole, ended by two empty lines. Under a template whose turns "
                    "end in plain text (User: ...), a reply stops at the next turn's header; "
                    "under any, at a --stop TEXT.")

    def run(args: argparse.Namespace) -> None:
        from gptlab.chat import ChatConfig, chat
        chat(ChatConfig(model=args.model, system=args.system, max_new_tokens=args.max_new_tokens,
                        greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                        max_context_tokens=args.max_context_tokens, seed=args.seed,
                        device=args.device, stop=tuple(args.stop or ())))

    return "chat with a model in the terminal (multi-turn, chat template)", add, run


def _verb_serve():
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model directory, HF directory or .gguf")
        p.add_argument("--name", default=None,
                       help="the model's id in the API (default: its directory's name)")
        p.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0: every interface)")
        p.add_argument("--port", type=int, default=8000, help="port to listen on")
        p.add_argument("--max-new-tokens", type=int, default=256,
                       help="a reply's length when a request gives no max_tokens, and its most")
        p.add_argument("--max-context-tokens", type=int, default=None,
                       help="fit conversations in fewer tokens than the model's context")
        p.add_argument("--seed", type=int, default=0,
                       help="seed of a request without one (plus the requests before it)")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                       help="a website whose pages may call the API from a browser (CORS), as "
                            "http://localhost:3000; repeat for more, * for any")
        p.epilog = ("OpenAI's chat completions API under /v1 (GET /v1/models, POST "
                    "/v1/chat/completions, streamed with \"stream\": true) and a chat page at /. "
                    "Ctrl-C stops the server.")

    def run(args: argparse.Namespace) -> None:
        from gptlab.chat.server import ServeConfig, serve
        serve(ServeConfig(model=args.model, name=args.name, host=args.host, port=args.port,
                          max_new_tokens=args.max_new_tokens,
                          max_context_tokens=args.max_context_tokens, seed=args.seed,
                          device=args.device, allow_origins=tuple(args.allow_origin or ())))

    return "serve a chat model: an OpenAI-compatible API and a web page", add, run


def _verb_convert():
    def add(p: argparse.ArgumentParser) -> None:
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--from", dest="source", nargs=2, metavar=("hf|gguf", "PATH"),
                         help="import a Hugging Face directory or a .gguf file")
        src.add_argument("--to", dest="target", nargs=2, metavar=("hf|gguf", "DIR"),
                         help="export a gptlab model directory to Hugging Face, or to a GGUF "
                              "file (Llama- or GPT-2-shaped models)")
        p.add_argument("--out", required=True,
                       help="output directory; for --to gguf a new FILE.gguf")
        p.add_argument("--dtype", default=None, choices=("f32", "f16", "q8_0"),
                       help="--to gguf: the matrices' tensor type (default f32; norms and "
                            "biases stay f32)")

    def run(args: argparse.Namespace) -> None:
        from gptlab import interop
        if args.dtype is not None and (args.source or args.target[0] != "gguf"):
            raise UserError("is for --to gguf alone (a Hugging Face export keeps the model's "
                            "dtype, an import reads the file's)", field="--dtype")
        if args.source:
            kind, path = args.source
            if kind not in ("hf", "gguf"):
                raise UserError(f"expects 'hf' or 'gguf', not '{kind}'", field="--from")
            out = interop.convert_to_gptlab(path, args.out, source=kind)
            print(f"wrote gptlab model directory {out}")
        else:
            kind, path = args.target
            if kind not in ("hf", "gguf"):
                raise UserError(f"expects 'hf' or 'gguf', not '{kind}'", field="--to")
            if kind == "gguf":
                out = interop.convert_to_gguf(path, args.out, dtype=args.dtype or "f32")
                print(f"wrote GGUF file {out}")
                return
            out = interop.convert_to_hf(path, args.out)
            print(f"wrote Hugging Face model directory {out}")

    return "import Hugging Face / GGUF models, or export to Hugging Face / GGUF", add, run


def _verb_world():
    def add(p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="action", required=True, parser_class=_Parser,
                               help="export the built-in world, check a query, score samples")
        e = sub.add_parser("export", help="write the database, questions, dialogs and corpus")
        e.add_argument("--out", required=True, help="output directory (e.g. data/world)")
        e.add_argument("--seed", type=int, default=0,
                       help="seed of the database, the questions, the dialogs and the corpus")
        e.add_argument("--vary-schema", action="store_true",
                       help="rename tables and columns from synonym lists (seeded)")
        e.add_argument("--schema-seed", type=int, default=None,
                       help="which renaming to use with --vary-schema (default: --seed)")
        # Each named by the world option it sets (`n_train`), which `_named_by_flag` then names
        # by the flag typed (`--train`) in an error about it.
        e.add_argument("--train", dest="n_train", metavar="N", type=int, default=3500,
                       help="training questions")
        e.add_argument("--validation", dest="n_validation", metavar="N", type=int, default=300,
                       help="validation questions")
        e.add_argument("--test", dest="n_test", metavar="N", type=int, default=600,
                       help="held-out test questions")
        e.add_argument("--dialogs", dest="n_dialogs", metavar="N", type=int, default=600,
                       help="multi-turn dialogs")
        e.add_argument("--corpus-chars", type=int, default=1_000_000,
                       help="size of the pretraining corpus in characters")
        c = sub.add_parser("check",
                           help="execute a query and compare it with a question's gold SQL")
        c.add_argument("--world", required=True, help="directory written by 'world export'")
        c.add_argument("--id", required=True, help="question id, e.g. s0-test-00001")
        c.add_argument("sql", help="the predicted SQL")
        s = sub.add_parser("score", help="execution accuracy of a samples file "
                                         "(from 'gptlab sample' on the world's questions)")
        s.add_argument("--world", required=True, help="directory written by 'world export'")
        s.add_argument("--in", dest="samples", required=True,
                       help="samples (.jsonl, .parquet or a directory of them)")
        s.add_argument("--out", default=None, help="per-question verdicts JSONL (optional)")

    def run(args: argparse.Namespace) -> None:
        from gptlab.world import build_world, load_world
        if args.action == "check":
            world = load_world(args.world)
            try:
                world.gold(args.id)
            except UserError as e:  # which world has no such question, and what ids look like
                some = next((q.id for q in world.test), None)
                like = (f" (its questions' ids are in its .jsonl files, such as '{some}')"
                        if some else "")
                raise UserError(f"{e.message}{like}", path=args.world, field="--id") from None
            verdict = world.check(args.id, args.sql)
            print(f"{verdict.kind}: {verdict.detail}")
            return
        if args.action == "score":
            _world_score(args)
            return
        if args.schema_seed is not None and not args.vary_schema:
            # Without renaming there is one schema: the seed would be recorded, and unused.
            raise UserError("chooses a renaming of the schema, which only --vary-schema makes; "
                            "add --vary-schema or drop --schema-seed", field="--schema-seed")
        world = build_world(args.seed, args.vary_schema, schema_seed=args.schema_seed,
                            n_train=args.n_train, n_validation=args.n_validation,
                            n_test=args.n_test, n_dialogs=args.n_dialogs,
                            corpus_chars=args.corpus_chars)
        paths = world.export(args.out)
        counts = world.manifest()["counts"]
        for key, flag in (("train", "--train"), ("validation", "--validation"),
                          ("test", "--test"), ("dialogs", "--dialogs")):
            asked = getattr(args, "n_" + key)
            if counts[key] < asked:  # the held-out questions, or the dialogs found, ran out
                print(f"note: {flag} {asked}: the world has only {counts[key]}; wrote those",
                      file=sys.stderr)
        print(f"wrote {len(paths)} files to {args.out}: " +
              ", ".join(f"{k} {v}" for k, v in counts.items()))

    return ("the built-in company database world: export its data, check a query, score "
            "samples"), add, run


def _world_score(args: argparse.Namespace) -> None:
    """`world score`: the samples' execution accuracy, printed; each verdict to --out."""
    from pathlib import Path

    from gptlab.eval.execution import score_samples
    from gptlab.io import (check_file_out, check_not_input, check_out_of_read_dirs,
                           write_jsonl_atomic)
    from gptlab.world.build import FILES, load_world
    from gptlab.world.variants import VARIANTS
    if args.out is not None:  # '' is refused, not read as no --out
        check_file_out(args.out)
        # The samples, or a file of the world, would be replaced by the verdicts.
        check_not_input(args.out, {"--in": args.samples, **{
            f"{name} of --world": Path(args.world) / name for name in FILES}})
        check_out_of_read_dirs(args.out, {"--in": args.samples}, "samples",
                               writes="the verdicts")
    summary, verdicts = score_samples(load_world(args.world), args.samples)
    if args.out is not None:
        write_jsonl_atomic(args.out, verdicts)
    print(f"execution accuracy {summary['exec_acc']:.4f} on "
          f"{counted(summary['prompts'], 'question')} (first response of each)")
    print(f"on the test suite {summary['exec_acc_test_suite']:.4f} (right on the "
          f"company and on its {VARIANTS} variant databases)")
    print(f"does not run {summary['exec_error_rate']:.4f} "
          f"({summary['exec_errors']} of {summary['prompts']})")
    if summary["unseen_phrasing"] is not None:
        print(f"unseen phrasing {summary['unseen_phrasing']:.4f} on "
              f"{counted(summary['n_unseen_phrasing'], 'question')}")
    if summary["responses"] > summary["prompts"]:
        print(f"all {summary['responses']} responses: {summary['all_responses']:.4f}")


def _config_verb(config_path: str, fn_path: str, help_text: str, list_fields: tuple = ()):
    """A verb whose flags are the fields of a dataclass config (plus --config and key=value)."""
    import importlib

    def load(path: str):
        mod, name = path.rsplit(".", 1)
        return getattr(importlib.import_module(mod), name)

    def make():
        cls = load(config_path)

        def add(p: argparse.ArgumentParser) -> None:
            from gptlab.config import add_config_flags
            add_config_flags(p, cls)
            _add_common(p)

        def run(args: argparse.Namespace) -> None:
            import dataclasses

            from gptlab.config import config_from_args
            # `--data a.txt lr=1e-3`: argparse gives the override to a list flag; hand it back.
            names = {f.name for f in dataclasses.fields(cls)}
            for flag in list_fields:
                values = getattr(args, flag, None)
                if values:
                    moved = [d for d in values if _is_override(d, names)]
                    setattr(args, flag, [d for d in values if d not in moved] or None)
                    args.overrides = moved + list(args.overrides or [])
            out = load(fn_path)(config_from_args(cls, args))
            if out is not None:
                print(out)

        return help_text, add, run
    return make


def _is_override(item: str, names: set[str]) -> bool:
    """Whether a list flag's value is a `key=value` override argparse gave it: its key is a
    field's (`model.n_layers=2` is `model`'s, `sample_prompt=a=b` sets 'a=b'), or, with no such
    file, is close to one (`--data a.txt max_step=5` is an unknown key, the field meant named,
    not a corpus file 'max_step=5' not found). A key no field has the form of is a path's
    (`runs/seed=1`)."""
    from gptlab.config import override_field
    field = override_field(item)
    if field is None:
        return False
    written = field.replace("-", "_").lower()  # as the unknown-key hint compares them
    return field in names or (bool(difflib.get_close_matches(written, names, n=1))
                              and not os.path.lexists(item))


def _verb_sample():
    def add(p: argparse.ArgumentParser) -> None:
        from gptlab.feedback import SAMPLE_K, SAMPLE_MAX_NEW_TOKENS
        p.add_argument("--model", required=True,
                       help="the model to sample (gptlab dir, HF dir or .gguf)")
        p.add_argument("--prompts", required=True,
                       help="prompts (.jsonl, .parquet or a directory of them) with prompt or "
                            "messages")
        p.add_argument("--k", type=int, default=SAMPLE_K, help="responses per prompt")
        p.add_argument("--out", required=True, help="samples JSONL")
        how = p.add_mutually_exclusive_group()  # greedy decoding has no temperature
        how.add_argument("--greedy", action="store_true", help=GREEDY_HELP)
        how.add_argument("--temperature", type=float, default=1.0, help=TEMPERATURE_HELP)
        p.add_argument("--top-p", type=float, default=None, help=TOP_P_HELP)
        p.add_argument("--max-new-tokens", type=int, default=SAMPLE_MAX_NEW_TOKENS,
                       help="longest response, in tokens")
        p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                       help="end a response as soon as its text holds TEXT, which is left out "
                            "of the response; each line's stopped_by names it (repeat for "
                            "several)")
        p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
        p.add_argument("--device", default="auto", help=DEVICE_HELP)

    def run(args: argparse.Namespace) -> None:
        from gptlab.feedback import sample_file
        n = sample_file(args.model, args.prompts, args.out, args.k, args.greedy,
                        args.temperature, args.top_p, args.max_new_tokens, args.seed,
                        args.device, stop=args.stop)
        print(f"wrote {counted(n, 'prompt')} x {counted(args.k, 'response')} to {args.out}")

    return "sample K responses per prompt (what labelers rank)", add, run


def _verb_label():
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--labeler", default="sqlworld",
                       help="sqlworld (the built-in world's simulated labeler: --world, "
                            "--disagreement, --seed and --ties are its settings) or "
                            "module:function, a ranking function of your own: (record, "
                            "responses) -> the responses best first (tied ones as lists) or one "
                            "score per response (README, 'Your own task')")
        p.add_argument("--in", dest="samples", required=True,
                       help="samples (.jsonl, .parquet or a directory of them)")
        p.add_argument("--out", required=True, help="rankings JSONL")
        p.add_argument("--world", default=None, help="world directory (default: built-in world)")
        p.add_argument("--disagreement", type=float, default=None,
                       help="expected share of pairs of levels a labeler flips (verdict tiers; "
                            "with --no-ties, single answers), in [0, 0.5] (0: noise-free, 0.5: "
                            "a random ranking) (default: 0.1 with sqlworld)")
        p.add_argument("--seed", type=int, default=None,
                       help="seed of the labelers' disagreement (default: 0 with sqlworld)")
        p.add_argument("--ties", action=argparse.BooleanOptionalAction, default=None,
                       help="tie the answers of one verdict tier (correct > wrong > error); "
                            "--no-ties: a strict order, shorter SQL first (default: --ties with "
                            "sqlworld)")

    def run(args: argparse.Namespace) -> None:
        from gptlab.feedback import label_file
        n = label_file(args.samples, args.out, args.labeler, args.world, args.disagreement,
                       args.seed, args.ties)
        print(f"wrote {counted(n, 'ranking')} to {args.out}")

    return "rank sampled responses with a simulated labeler or a function of your own", add, run


def _verb_incontext():
    def add(p: argparse.ArgumentParser) -> None:
        from gptlab.eval.incontext import DEFAULT_SHOTS
        p.add_argument("--model", required=True, help="model directory, HF directory or .gguf")
        p.add_argument("--task", default="sqlworld",
                       help="sqlworld: the built-in world's questions, the schema the "
                            "instruction, answers scored by execution (without --data)")
        p.add_argument("--data", default=None,
                       help="a task of your own (.jsonl, .parquet or a directory of them): "
                            "prompt with completion (free text, exact match), or prompt with "
                            "choices and answer (multiple choice)")
        p.add_argument("--examples", default=None,
                       help="solved examples to draw from (default: the other records of "
                            "--data; with sqlworld, its training questions)")
        p.add_argument("--shots", type=int, nargs="+", default=list(DEFAULT_SHOTS),
                       metavar="K", help="examples in the prompt, one evaluation each "
                                         "(default: 0 1 5)")
        p.add_argument("--instruction", default=None,
                       help="a task description put first in every prompt (--data tasks)")
        p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                       help="end an answer at TEXT (--data tasks; default: a blank line)")
        p.add_argument("--world", default=None, help="world directory (default: built-in)")
        p.add_argument("--split", default=None,
                       help="the world's questions to ask: train, validation or test "
                            "(default: test)")
        p.add_argument("--limit", type=int, default=None, help="ask the first N items only")
        p.add_argument("--max-new-tokens", type=int, default=64,
                       help="longest free-text answer, in tokens")
        p.add_argument("--batch-size", type=int, default=8,
                       help="prompts answered together")
        p.add_argument("--seed", type=int, default=0, help="seed of the examples drawn")
        p.add_argument("--out", default=None,
                       help="write the results, every answer with them, as JSON")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)

    def run(args: argparse.Namespace) -> None:
        from gptlab.eval.incontext import incontext
        incontext(args.model, args.task, args.data, args.examples, args.world, args.split,
                  args.shots, args.limit, args.seed, args.instruction, args.stop,
                  args.max_new_tokens, args.batch_size, args.device, args.out)
        if args.out:
            print(f"wrote {args.out}")

    return "GPT-3's in-context learning: ask a task zero-, one- and few-shot", add, run


def _verb_translate():
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="a model directory `gptlab seq2seq` wrote")
        p.add_argument("--data", required=True,
                       help="records to translate (.jsonl, .parquet or a directory of them), "
                            "each with a source; those that all hold a target are scored too")
        p.add_argument("--out", default=None,
                       help="write the records with a `translation` field as JSONL (default: "
                            "the translations on stdout, one per line)")
        p.add_argument("--source-field", default="source", help="the field holding the source")
        p.add_argument("--target-field", default="target",
                       help="the field holding the reference translation, if any")
        p.add_argument("--beam", type=int, default=4, help="beam width (1: greedy)")
        p.add_argument("--length-penalty", type=float, default=0.6,
                       help="α of the length penalty ((5 + length) / 6)^α")
        p.add_argument("--max-new-tokens", type=int, default=None,
                       help="longest translation, in tokens (default: the source's length + 50)")
        p.add_argument("--batch-size", type=int, default=32, help="sources decoded together")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)

    def run(args: argparse.Namespace) -> None:
        from gptlab.train.seq2seq import translate
        translate(args.model, args.data, args.out, args.source_field, args.target_field,
                  args.beam, args.length_penalty, args.batch_size, args.max_new_tokens,
                  args.device)
        if args.out:
            print(f"wrote {args.out}")

    return "decode sources with a seq2seq Transformer; BLEU where targets are given", add, run


VERBS: dict[str, Callable] = {
    "seq2seq": _config_verb("gptlab.train.seq2seq.Seq2SeqConfig",
                            "gptlab.train.seq2seq.seq2seq",
                            "train the encoder-decoder Transformer on source -> target pairs "
                            "(the 2017 paper), scored by BLEU"),
    "translate": _verb_translate,
    "tokenizer": _verb_tokenizer,
    "generate": _verb_generate,
    "chat": _verb_chat,
    "serve": _verb_serve,
    "pretrain": _config_verb("gptlab.train.pretrain.PretrainConfig",
                             "gptlab.train.pretrain.pretrain",
                             "pretrain a GPT on raw text (next-token prediction)",
                             list_fields=("data",)),
    "finetune": _config_verb("gptlab.train.finetune.FinetuneConfig",
                             "gptlab.train.finetune.finetune",
                             "GPT-1's fine-tuning: classify texts, the LM loss as an auxiliary "
                             "objective"),
    "incontext": _verb_incontext,
    "sft": _config_verb("gptlab.train.sft.SFTConfig", "gptlab.train.sft.sft",
                        "supervised fine-tuning on demonstrations (InstructGPT step 1)"),
    "sample": _verb_sample,
    "label": _verb_label,
    "reward": _config_verb("gptlab.train.reward.RewardConfig",
                           "gptlab.train.reward.train_reward_model",
                           "train a reward model on rankings (InstructGPT step 2)"),
    "ppo": _config_verb("gptlab.train.ppo.PPOConfig", "gptlab.train.ppo.ppo",
                        "PPO against a reward model with a KL penalty (InstructGPT step 3)",
                        list_fields=("ptx_data",)),
    "pipeline": _config_verb("gptlab.train.pipeline.PipelineConfig",
                             "gptlab.train.pipeline.pipeline",
                             "the whole recipe on the built-in world, with a report"),
    "convert": _verb_convert,
    "world": _verb_world,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gptlab",
                     description="The recipe behind ChatGPT, from the Transformer up.",
                     epilog="`gptlab VERB --help` lists a verb's flags, each taken only as "
                            "written in full (--temperature, not --temp). A value that begins "
                            "with '-' follows an '=' (--out=-x); a negative number may follow "
                            "a space (--seed -1). A switch takes no value: written, it is on "
                            "(--greedy); its --no- form, where it has one, turns it off "
                            "(--no-compile).")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser,
                                help="a stage of the recipe, or a tool around it:")
    for name, make in VERBS.items():
        help_text, add, run = make()
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
        for q in _with_actions(p):
            _show_defaults(q)
            # An unknown flag is reported by the parser that has the flags it could have meant.
            q.set_defaults(_parser=q)
    return parser


def _with_actions(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """`p` and its actions' parsers, as `world` and `world export`."""
    yield p
    for sub in p._subparsers._group_actions if p._subparsers else ():
        for child in sub.choices.values():
            yield from _with_actions(child)


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """Each flag's default in `--help` (config verbs' flags say theirs already)."""
    for action in p._actions:
        shown = action.default is not None and action.default is not False \
            and action.default is not argparse.SUPPRESS
        if action.option_strings and shown and action.help is not argparse.SUPPRESS \
                and "default" not in (action.help or ""):
            action.help = (f"{action.help} " if action.help else "") + "(default: %(default)s)"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports torch: a Ctrl-C here is common and as harmless
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # let the verb's own parser report them, with its flags as suggestions
        (getattr(args, "_parser", None) or parser).unrecognized(unknown)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    processes = os.environ.get("WORLD_SIZE", "1")
    if processes.isdecimal() and int(processes) > 1:  # not isdigit: int("²") fails
        # Every process would run the whole stage and write the same --out: refuse, don't race.
        print(f"{_command(args)}: error: started as {processes} processes (WORLD_SIZE="
              f"{processes}), but gptlab trains in one process: distributed training is not "
              "built yet. Run it with `torchrun --nproc-per-node 1` or without torchrun.",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        _check_paths_given(args)
        args._run(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        # The reader stopped reading (`| head -1`): end quietly, as a process SIGPIPE killed.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_READER_GONE
    except UserError as e:
        if isinstance(e, PathError):  # named by the stage's field: name the flag given
            named = path_error(e, _flags_given(args), writer="--out")
            # No flag gave the path (a --config file did): the stage's field stays.
            e = named if named is not None and named.field is not None else e
        else:
            e = _named_by_flag(e, args)
        print(f"{_command(args)}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # A full disk, a directory it may not write or a name too long: the user's to fix,
        # said in one line naming the flag (what was half-written has been removed by the code
        # writing it).
        error = path_error(e, _flags_given(args), writer="--out")
        if error is None:
            raise
        print(f"{_command(args)}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command that ran, as its errors name it: `gptlab sft`, and a verb's action in full,
    `gptlab world check`, as argparse names it in an error of that action's flags."""
    parser = getattr(args, "_parser", None)
    return parser.prog if parser else f"gptlab {args.verb}"


# Flags (by dest) that name a file or a directory to read: given empty, each would be read as the
# current directory ("." is a directory, not a file). Every --out is checked where it is written,
# and --data where the corpus is read.
_PATH_FLAGS = {"model", "prompts", "samples", "world", "tokenizer", "config", "source", "target"}


def _check_paths_given(args: argparse.Namespace) -> None:
    """Refuse a required path flag (or --config) given as '' (an unset shell variable) before
    anything runs, naming it as its field where the flag is the field's name, else as the flag.
    An optional one, and a config verb's fields (which YAML and Python set too), are refused
    where they are read, with what leaving them out would do."""
    from gptlab.io import not_empty
    parser = getattr(args, "_parser", None)
    for action in parser._actions if parser else ():
        if action.dest not in _PATH_FLAGS or not action.option_strings or not (
                action.required or action.dest in ("config", "source", "target")):
            continue
        values = getattr(args, action.dest, None)
        if action.dest in ("source", "target") and values:  # `--from hf PATH`: the PATH
            values = values[1:]
        flag = action.option_strings[0]
        field = action.dest if flag == "--" + action.dest.replace("_", "-") else flag
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str):
                not_empty(value, field)


def _named_by_flag(error: UserError, args: argparse.Namespace) -> UserError:
    """`error` naming the flag the user typed, not the config field or parameter behind it:
    an input file or directory not found where a flag gave it (which of `--data`, `--val-data`
    and `--samples` was mistyped; `pretrain --data` said its field, 'data'), and, for a verb
    without --config, a value refused that a flag typed gave, where the flag is not spelled as
    the field (`--vocab-size`, not `vocab_size`; `--in`, not `samples`; `--seed` is `seed`, as
    `_check_paths_given` names it, and `--no-ties` is `ties`); and an input there but of the
    wrong kind (`WrongKind`: a directory for a file, a reward model for a policy), at the path
    a flag gave or a file in the directory it gave. An error at a line of a file, or about
    what a path that is there holds, names the file alone; one at a path no input flag gave
    (--out's) keeps its name."""
    parser = getattr(args, "_parser", None)
    if parser is None or error.line is not None or (error.field or "").startswith("-"):
        return error
    # A config verb's field, checked by its stage once the config was built (`block_size` past
    # the model's context, a `resume_from` checkpoint not there, an `out` inside the model):
    # named where its value came from, as the config's own checks name it, keeping the path
    # the error is about. An error about what a file holds (a model's config.json, field
    # 'vocab_size') is the file's, not the setting's, unless the flag gave that very file.
    origin = getattr(args, "_origins", {}).get(error.field)
    about_setting = origin is not None and (error.path is None or (
        not os.path.isfile(error.path) or _is_value_of(error.path, args, error.field)))
    if about_setting and (error.path is None or origin.path is None):
        kind = type(error) if isinstance(error, (NotFound, WrongKind)) else UserError
        named = kind(error.message, path=error.path or origin.path, line=origin.line,
                     field=origin.field)
        named.__cause__ = error.__cause__
        return named
    if about_setting:
        # At a path of its own (a checkpoint written with another lr) and set by a YAML line or
        # an override: the path stays, and where the value came from is said after.
        where = "an override on the command line" if origin.path == "command line" else \
            f"{origin.path}:{origin.line}" if origin.line is not None else str(origin.path)
        named = type(error)(f"{error.message} (now set by {where})", path=error.path,
                            field=error.field)
        named.__cause__ = error.__cause__
        return named
    if error.path is not None:
        if os.path.lexists(error.path) and not isinstance(error, (NotFound, WrongKind)):
            return error  # what is there: the message says what it holds, at the path
        flag = _input_flag_of(error, args)
        return error if flag is None else _renamed(error, flag)
    if any(a.dest == "config" for a in parser._actions):  # a field YAML and key=value set too
        return error
    typed = {w.split("=", 1)[0] for w in getattr(parser, "_words", [])}
    # A switch spelled as its field is named so in both forms: `--no-ties` as `ties`.
    flag = next((f for a in parser._actions if a.dest == error.field
                 and "--" + a.dest not in a.option_strings
                 for f in a.option_strings if f in typed), None)
    return error if flag is None else _renamed(error, flag)


def _is_value_of(path: str | os.PathLike, args: argparse.Namespace, dest: str) -> bool:
    """Whether `path` is a value the flag of `dest` was given (one of several, for a list)."""
    values = getattr(args, dest, None)
    failed = os.path.abspath(path)
    return any(isinstance(v, str) and v.strip() and os.path.abspath(v) == failed
               for v in (values if isinstance(values, list) else [values]))


def _input_flag_of(error: UserError, args: argparse.Namespace) -> str | None:
    """The input flag (not --out) whose path `error.path` is, else, for a path that is there,
    the one whose directory it lies deepest in (`--tokenizer DIR` for DIR/tokenizer.json; a
    path not found is named only where it was typed, since a stage looks for many files in a
    directory given); of those that set the field `error` names, if it names one. None if no
    flag gave it, or if it lies deeper in --out's (a checkpoint of `--out runs/sft/ppo` is not
    `--policy runs/sft`'s). The current directory and those above it hold nothing given:
    `--world .` does not give every relative path."""
    parser = args._parser
    failed = os.path.abspath(error.path)
    try:
        here = os.getcwd()
    except OSError:  # the current directory was removed
        here = os.sep
    inside: list[tuple[int, str | None]] = []  # (how deep, the flag; None: --out)
    for action in parser._actions:
        values = getattr(args, action.dest, None)
        writes = action.dest == "out"
        if not action.option_strings or not writes and error.field not in (None, action.dest):
            continue
        for value in values if isinstance(values, list) else [values]:
            if not isinstance(value, str) or not value.strip():
                continue
            path = os.path.abspath(value)
            if path == failed and not writes:
                return action.option_strings[0]
            holds_here = path == here or here.startswith(path.rstrip(os.sep) + os.sep)
            if isinstance(error, WrongKind) and not holds_here and (
                    failed.startswith(path.rstrip(os.sep) + os.sep) or path == failed):
                inside.append((len(path), None if writes else action.option_strings[0]))
    return max(inside, key=lambda x: x[0])[1] if inside else None


def _renamed(error: UserError, flag: str) -> UserError:
    """`error` naming `flag` as its field (a NotFound or WrongKind stays one)."""
    kind = type(error) if isinstance(error, (NotFound, WrongKind)) else UserError
    named = kind(error.message, path=error.path, field=flag)
    named.__cause__ = error.__cause__
    return named


def _flags_given(args: argparse.Namespace) -> dict[str, object]:
    """Each flag of the verb (its first spelling) and the value it was given."""
    parser = getattr(args, "_parser", None)
    return {a.option_strings[0]: getattr(args, a.dest, None)
            for a in (parser._actions if parser else ()) if a.option_strings}


def _flag_given(args: argparse.Namespace, filename: object) -> str | None:
    """The flag whose path `filename` is, else the one whose path it lies deepest in, else one
    whose path it is a parent of (made on the way to it, --out's first); None if no flag's
    (`gptlab.errors.field_of_path`)."""
    return field_of_path(filename, _flags_given(args), writer="--out")
