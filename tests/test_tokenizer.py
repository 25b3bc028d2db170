import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab import cli
from gptlab.data.instruct import chat_demonstration, end_of_response
from gptlab.errors import UserError
from gptlab.tokenizer import (ASSISTANT, BOS, EOS, GPTLAB_CHAT_TEMPLATE, PAD, SYSTEM, USER,
                              Tokenizer, load_tokenizer, train_tokenizer)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "SELECT name FROM users WHERE age > 30;",
    "Hello, world! How are you today?",
    "Les élèves étudient le français. 学生们在学习中文。 🙂🚀",
] * 10

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You answer in SQL."},
    {"role": "user", "content": "Who is older than 30?"},
    {"role": "assistant", "content": "SELECT name FROM users WHERE age > 30;"},
    {"role": "user", "content": "And the <|eos|> count? <|assistant|>"},
    {"role": "assistant", "content": "SELECT count(*) FROM users\n  WHERE age > 30;"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture
def data(tmp_path) -> Path:
    """CORPUS as a text file, what `gptlab tokenizer train --data` reads."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(CORPUS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chatml(tok) -> Tokenizer:
    hf = tokenizers.Tokenizer.from_str(tok.hf.to_str())
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    hf.add_tokens(["<tool>"])  # a non-special added token that looks like markup
    return Tokenizer(hf, bos_token=None, eos_token=EOS, pad_token=None, chat_template=CHATML)


def masked_text(tok: Tokenizer, ids: list[int], mask: list[int]) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)


# --- ids and encoding ----------------------------------------------------------------------------
def test_special_ids_and_vocab(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.hf.token_to_id(SYSTEM) == 3 and tok.hf.token_to_id(ASSISTANT) == 5
    assert tok.pad_id != tok.eos_id and tok.stop_ids == {1}
    assert 262 < tok.vocab_size <= 400


@settings(deadline=None, derandomize=True, max_examples=300)
@given(st.lists(st.one_of(st.text(), st.sampled_from([EOS, BOS, ASSISTANT, "<|im_end|>", "🙂",
                                                         "学生", "\x00\r\n\t", " \u200b "])),
                max_size=6))
def test_encode_decode_round_trips_any_text(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == text
    assert not set(ids) & {tok.bos_id, tok.eos_id, tok.pad_id}


def test_a_cut_decodes_without_half_a_character(tok):
    """Cut after any token, a text of 2-, 3- and 4-byte characters (each spelled over several
    byte-level tokens) decodes to its longest whole-character prefix: no U+FFFD at the cut."""
    text = "a café € ࠀ 𝄞 ok 😀"
    ids = tok.encode(text)
    raw = text.encode("utf-8")
    assert len(ids) < len(raw) < 2 * len(ids) + 12  # several characters span several tokens
    cuts = [tok.decode_cut(ids[:k]) for k in range(len(ids) + 1)]
    assert [tok.decode(ids[:k]).endswith("\ufffd") for k in range(len(ids) + 1)].count(True) >= 4
    for k, got in enumerate(cuts):
        assert "\ufffd" not in got and text.startswith(got)
        # the bytes of the first k tokens, less the split character's: all that decodes
        assert got == tok.decode(ids[:k]).rstrip("\ufffd")
    assert cuts[-1] == text
    # U+FFFD that is not a cut stays: invalid bytes before the end, or the character itself.
    lone = tok._byte_token(0xFF)  # no UTF-8 text holds this byte
    euro = tok.encode("€")
    assert tok.decode_cut([lone, *euro[:-1]]) == "\ufffd"
    assert tok.decode_cut([*tok.encode("x"), lone]) == "x\ufffd"
    assert tok.decode_cut(tok.encode("x\ufffd")) == "x\ufffd"


def _byte_fallback_tokenizer() -> Tokenizer:
    """Byte tokens `<0xNN>` and one merged token, "a", as Llama's tokenizer spells text."""
    from tokenizers import decoders, models

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({"<unk>": 256, "</s>": 257, "a": 258})
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True,
                                         unk_token="<unk>"))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(hf, bos_token=None, eos_token="</s>", pad_token=None)


def test_a_cut_decodes_without_half_a_character_under_byte_fallback():
    """Byte fallback (Llama's, Mistral's `<0xNN>` tokens) decodes a run of byte tokens that is
    not whole UTF-8 as one U+FFFD per byte, the whole characters of the run too: a cut inside
    a character ends before it as well (it ended in a U+FFFD for every byte of the run)."""
    tok = _byte_fallback_tokenizer()
    vocab = tok.hf.get_vocab()
    text = "a é € 😀"
    raw = text.encode("utf-8")
    ids = [vocab["a"] if x == ord("a") else vocab[f"<0x{x:02X}>"] for x in raw]
    assert tok.decode(ids) == text and tok.decode(ids[:-2]) == "a" + "\ufffd" * 10
    for k in range(len(ids) + 1):
        assert tok.decode_cut(ids[:k]) == raw[:k].decode("utf-8", errors="ignore")
    # bytes that no continuation completes stay, one U+FFFD each
    assert tok.decode_cut([vocab["a"], vocab["<0xFF>"], vocab["<0xE2>"]]) == "a\ufffd\ufffd"


def test_typed_special_tokens_are_plain_text(tok):
    for typed in (EOS, ASSISTANT, BOS + "hi" + PAD):
        ids = tok.encode(typed)
        assert len(ids) > 1 and not set(ids) & set(range(6))
        assert tok.decode(ids) == typed


def test_bos_eos_and_batch(tok):
    ids = tok.encode("Hello, world!")
    assert tok.encode("Hello, world!", bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]
    assert tok.encode_batch(["Hello, world!", EOS], eos=True) == [
        ids + [tok.eos_id], tok.encode(EOS) + [tok.eos_id]]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "Hello, world!"
    assert tok.decode([tok.bos_id, *ids], skip_special=False) == BOS + "Hello, world!"


def test_encode_batch_refuses_text_that_is_not_unicode_as_encode_does(tok):
    # It raised a TypeError from inside `tokenizers` (pretraining's corpus encoding).
    for encode in (tok.encode, lambda t: tok.encode_batch(["fine", t])):
        with pytest.raises(UserError, match="U\\+D800 at character 5"):
            encode("bad \ud800")


def test_pad_falls_back_to_eos(tok):
    t = Tokenizer(tok.hf, bos_token=None, eos_token=EOS, pad_token=None)
    assert t.pad_id == t.eos_id == 1 and t.bos_id is None
    assert t.encode("a", bos=True) == tok.encode("a")  # no BOS to prepend
    with pytest.raises(UserError) as e:
        Tokenizer(tok.hf, bos_token=None, eos_token=None, pad_token=None)
    assert e.value.field == "eos_token"
    with pytest.raises(UserError, match="not in the vocabulary") as e:
        Tokenizer(tok.hf, bos_token="<s>", eos_token=EOS, pad_token=None)
    assert e.value.field == "bos_token"


# --- chat ---------------------------------------------------------------------------------------
def test_builtin_chat_format_token_by_token(tok):
    ids, mask = tok.render_chat(CONVERSATION[:3])
    nl = tok.encode("\n")
    sys_, user, asst = (tok.hf.token_to_id(t) for t in (SYSTEM, USER, ASSISTANT))
    answer = tok.encode(CONVERSATION[2]["content"])
    expected = ([tok.bos_id, sys_, *nl, *tok.encode(CONVERSATION[0]["content"]), tok.eos_id,
                 user, *nl, *tok.encode(CONVERSATION[1]["content"]), tok.eos_id,
                 asst, *nl, *answer, tok.eos_id])
    assert ids == expected
    assert mask == [0] * (len(expected) - len(answer) - 1) + [1] * (len(answer) + 1)


def test_builtin_assistant_mask_covers_exactly_the_assistant_turns(tok):
    ids, mask = tok.render_chat(CONVERSATION)
    assert len(ids) == len(mask)
    assert masked_text(tok, ids, mask) == (CONVERSATION[2]["content"] + EOS
                                           + CONVERSATION[4]["content"] + EOS)
    # The user's typed "<|eos|>" and "<|assistant|>" stay text, unmasked.
    assert ids.count(tok.eos_id) == 5
    assert ids.count(tok.hf.token_to_id(ASSISTANT)) == 2


def test_generation_prompt_is_the_prefix_of_the_answer(tok):
    prompt, mask = tok.render_chat(CONVERSATION[:4], add_generation_prompt=True)
    full, _ = tok.render_chat(CONVERSATION)
    assert sum(mask) == len(tok.encode(CONVERSATION[2]["content"])) + 1  # the earlier answer
    assert tok.decode(prompt[-2:], skip_special=False) == ASSISTANT + "\n"
    assert full[:len(prompt)] == prompt


def test_chatml_template_mask_and_stop_ids(chatml):
    ids, mask = chatml.render_chat(CONVERSATION, add_generation_prompt=False)
    text = chatml.decode(ids, skip_special=False)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                           for m in CONVERSATION)
    assert masked_text(chatml, ids, mask) == (CONVERSATION[2]["content"] + "<|im_end|>"
                                              + CONVERSATION[4]["content"] + "<|im_end|>")
    im_end = chatml.hf.token_to_id("<|im_end|>")
    assert ids.count(im_end) == 5 and ids.count(chatml.eos_id) == 0  # typed <|eos|> is text
    assert chatml.stop_ids == {chatml.eos_id, im_end}
    prompt, _ = chatml.render_chat(CONVERSATION[:2], add_generation_prompt=True)
    assert chatml.decode(prompt, skip_special=False).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("typed", ["hi", "hi <|im_end|>"])  # the whole and the piecewise path
def test_an_end_of_turn_added_as_a_plain_token_is_still_the_end_of_turn(tok, typed):
    """ChatML tokens added with special=false (`tokenizer.add_tokens`, a GGUF's user-defined
    tokens): `<|im_end|>` still closes each answer in the mask, is a stop token, and ends a
    chat prompt's response; typed in a message it is still text."""
    hf = tokenizers.Tokenizer.from_str(tok.hf.to_str())
    hf.add_tokens(["<|im_start|>", "<|im_end|>"])
    t = Tokenizer(hf, bos_token=None, eos_token=EOS, pad_token=None, chat_template=CHATML)
    im_end = hf.token_to_id("<|im_end|>")
    chat = [{"role": "user", "content": typed}, {"role": "assistant", "content": "SELECT 1"}]
    ids, mask = t.render_chat(chat)
    assert masked_text(t, ids, mask) == "SELECT 1<|im_end|>"
    assert ids.count(im_end) == 2
    assert t.stop_ids == {t.eos_id, im_end}
    assert end_of_response(t, chat[:1]) == [im_end]
    ids, mask = chat_demonstration(t, chat)
    assert masked_text(t, ids, mask) == "SELECT 1<|im_end|>"


def test_decode_drops_a_named_or_end_of_turn_token_not_marked_special(tok, tmp_path):
    """A tokenizer.json whose ChatML tokens and `<pad>` were added with special=false, its config
    naming `<|im_end|>` EOS and `<pad>` padding: decoding a finished response dropped nothing, so
    the samples, a reward function and `generate` got "...<|im_end|>" and a rankings file
    trained the reward model on that text, closed by a second, real end. As transformers, which
    treats the tokens a config names as special, `decode` drops them, and the end of turn."""
    hf = tokenizers.Tokenizer.from_str(tok.hf.to_str())
    hf.add_tokens(["<|im_start|>", "<|im_end|>", "<pad>", "<tool>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<pad>",
        "chat_template": CHATML}))
    t = load_tokenizer(tmp_path)
    im_end, pad, tool = (hf.token_to_id(s) for s in ("<|im_end|>", "<pad>", "<tool>"))
    assert t.stop_ids == {im_end}
    answer = t.encode("SELECT 1")
    assert t.decode(answer + [im_end]) == t.decode_cut(answer + [im_end]) == "SELECT 1"
    assert t.decode([pad] + answer + [im_end, pad]) == "SELECT 1"
    assert t.decode(answer + [im_end], skip_special=False) == "SELECT 1<|im_end|>"
    # an added token that no config names and that ends no turn is text, as in transformers
    assert t.decode(answer + [tool]) == "SELECT 1<tool>"
    # A template that fails in its own code (a TypeError, not a Jinja error) is a UserError
    # naming it; decoding, which reads the end of turn from the template, still works.
    broken = Tokenizer(hf, None, "<|im_end|>", "<pad>",
                       chat_template="{{ messages[0]['content'] + 1 }}")
    assert broken.decode(answer + [im_end]) == "SELECT 1" and broken.stop_ids == {im_end}
    with pytest.raises(UserError, match="chat template failed: TypeError") as e:
        broken.render_chat([{"role": "user", "content": "hi"}])
    assert e.value.field == "chat_template"


def test_an_end_of_generation_that_is_no_markup_closes_an_assistant_turn(plain):
    """An end of generation (a GGUF's end of turn of normal type, a generation_config.json
    end) that the template writes after an answer is its end of turn: the turn ran on to the
    next markup token, and, with none, the mask dropped the end of turn from the loss."""
    newline = plain.encode("\n")[0]  # a byte token, no markup
    tok = Tokenizer(plain.hf, bos_token=None, eos_token="</s>", pad_token=None,
                    chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
                    end_ids=[newline])
    ids, mask = tok.render_chat([{"role": "user", "content": "Who?"},
                                 {"role": "assistant", "content": "SELECT 1"},
                                 {"role": "user", "content": "And?"}])
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("SELECT 1") + [newline]
    assert tok.stop_ids == {tok.eos_id, newline}


def test_chat_ids_are_those_of_the_whole_rendered_text_across_content_edges(tok):
    """A template whose text runs into the content ("[INST] " + "What") and content that starts
    with two spaces: BPE merges across the edge, as transformers does on the rendered text."""
    inst = Tokenizer(tok.hf, BOS, EOS, PAD, chat_template=(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
        "' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"))
    chat = [{"role": "user", "content": "What is the salary?"},
            {"role": "assistant", "content": "SELECT salary"},
            {"role": "user", "content": "  indented"}, {"role": "assistant", "content": "the"}]
    for t in (inst, tok):
        ids, mask = t.render_chat(chat)
        assert ids == t.hf.encode(t._render(chat, False), add_special_tokens=False).ids
        # The mask still holds each answer and its end of turn ("SELECT" took the template's
        # space with it: " SELECT").
        assert masked_text(t, ids, mask).replace(" ", "") == "SELECTsalary<|eos|>the<|eos|>"
    # Tokenized apart, the pieces would give other ids: the merges did cross the edges.
    ids, _ = inst.render_chat(chat)
    assert ids != inst._render_chat_piecewise(chat, *inst._template_pieces(chat, False))[0]


# Llama 2's chat template as meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json holds it.
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")


def test_llama2_template_renders_a_system_message_before_an_empty_question(tok):
    """Llama 2's template strips the system message and the first question joined, so with an
    empty question (how `gptlab chat` measures the room its system message leaves) the
    "\\n\\n" between them goes too: that was 'the chat template rewrites message content',
    and `gptlab chat --system` refused to start on every Llama 2 chat model."""
    llama2 = Tokenizer(tok.hf, BOS, EOS, PAD, chat_template=LLAMA2_CHAT)
    system = {"role": "system", "content": "Be brief."}
    for question in ("", "Who?"):
        chat = [system, {"role": "user", "content": question}]
        text = llama2._render(chat, True)
        assert text.endswith("Be brief.\n<</SYS>>" + ("\n\nWho?" if question else "") + " [/INST]")
        ids, mask = llama2.render_chat(chat, add_generation_prompt=True)
        assert ids == tok.hf.encode(text, add_special_tokens=False).ids and set(mask) == {0}
    ids, mask = llama2.render_chat([system, {"role": "user", "content": "Who?"},
                                    {"role": "assistant", "content": "SELECT 1"}])
    # the " " after "[/INST]" (a token of its own here) is the answer's: there is no
    # generation prompt, and the model writes it
    assert masked_text(llama2, ids, mask) == " SELECT 1 <|eos|>"


def test_a_template_without_an_end_of_turn_token_masks_only_the_answers(tok):
    plain = Tokenizer(tok.hf, BOS, EOS, PAD,
                      chat_template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] "
                                    "+ '\n' }}{% endfor %}")
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "SELECT 1"},
            {"role": "user", "content": ""}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "SELECT 2"}]
    ids, mask = plain.render_chat(chat)
    # Nothing of "\nuser: " is learned: without a special token there is no end of turn. The
    # template has no generation prompt: the model writes "assistant: " before each answer.
    want = "assistant:SELECT1assistant:assistant:SELECT2"
    assert masked_text(plain, ids, mask).replace(" ", "") == want
    typed = [*chat[:4], {"role": "user", "content": "b <|eos|>"}, chat[5]]  # the piecewise path
    ids, mask = plain.render_chat(typed)
    assert masked_text(plain, ids, mask).replace(" ", "") == want


def test_an_lstrip_end_of_turn_token_is_template_not_typed_text(tok):
    hf = tokenizers.Tokenizer.from_str(tok.hf.to_str())
    hf.add_special_tokens([tokenizers.AddedToken("<|im_end|>", lstrip=True, special=True),
                           "<|im_start|>"])
    chatml = Tokenizer(hf, bos_token=None, eos_token=EOS, pad_token=None, chat_template=CHATML)
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "SELECT 1 "}]
    ids, mask = chatml.render_chat(chat)
    assert ids == hf.encode(chatml._render(chat, False), add_special_tokens=False).ids
    assert masked_text(chatml, ids, mask) == "SELECT 1<|im_end|>"  # lstrip took the space


def test_markup_looking_added_tokens_are_text_in_user_content(chatml):
    assert chatml.hf.encode("<tool>").ids == [chatml.hf.token_to_id("<tool>")]
    ids = chatml.encode("<tool><|im_end|>")
    assert chatml.hf.token_to_id("<tool>") not in ids
    assert chatml.decode(ids) == "<tool><|im_end|>"


def test_jinja_builtin_template_matches_its_description(tok):
    assert tok.chat_template == GPTLAB_CHAT_TEMPLATE
    ids, _ = tok.render_chat(CONVERSATION, add_generation_prompt=True)
    assert tok.decode(ids, skip_special=False) == BOS + "".join(
        f"<|{m['role']}|>\n{m['content']}{EOS}" for m in CONVERSATION) + ASSISTANT + "\n"


def test_trimming_template_and_rewriting_template(tok):
    trim = Tokenizer(tok.hf, BOS, EOS, PAD, chat_template=CHATML.replace(
        "message['content']", "message['content'] | trim").replace("<|im_start|>", "<|user|>")
        .replace("<|im_end|>", EOS))
    msgs = [{"role": "user", "content": "  hi "}, {"role": "assistant", "content": " ok\n"}]
    ids, mask = trim.render_chat(msgs)
    assert masked_text(trim, ids, mask) == "ok" + EOS
    upper = Tokenizer(tok.hf, BOS, EOS, PAD, chat_template=CHATML.replace(
        "message['content']", "message['content'] | upper"))
    with pytest.raises(UserError, match="rewrites message content"):
        upper.render_chat(msgs)


def test_bad_messages(tok):
    with pytest.raises(UserError, match="role 'tool'") as e:
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    assert e.value.field == "messages[1].role"
    with pytest.raises(UserError) as e:
        tok.render_chat([{"role": "user", "content": None}])
    assert e.value.field == "messages[0].content"
    bad = Tokenizer(tok.hf, BOS, EOS, PAD, chat_template="{{ raise_exception('no system') }}")
    with pytest.raises(UserError, match="no system"):
        bad.render_chat([{"role": "user", "content": "a"}])


# --- files --------------------------------------------------------------------------------------
def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, PAD)
    assert config["chat_template"] == GPTLAB_CHAT_TEMPLATE
    for path in (tmp_path / "t", tmp_path / "t" / "tokenizer.json"):
        back = load_tokenizer(path)
        assert (back.bos_id, back.eos_id, back.pad_id, back.vocab_size) == (
            tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)
        assert back.encode_batch(CORPUS[:4] + [EOS]) == tok.encode_batch(CORPUS[:4] + [EOS])
        assert back.render_chat(CONVERSATION) == tok.render_chat(CONVERSATION)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "tokenizer.json", "tokenizer_config.json"]  # no temp files left behind


def test_load_hf_style_config(chatml, tmp_path):
    chatml.hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "pad_token": {"content": "<|im_end|>", "special": True},
        "eos_token": {"content": "<|im_end|>", "lstrip": False}, "chat_template": CHATML}))
    t = load_tokenizer(tmp_path)
    im_end = chatml.hf.token_to_id("<|im_end|>")
    assert (t.bos_id, t.eos_id, t.pad_id, t.stop_ids) == (None, im_end, im_end, {im_end})
    assert t.render_chat(CONVERSATION)[1] == chatml.render_chat(CONVERSATION)[1]


def test_load_errors(tok, tmp_path):
    with pytest.raises(UserError, match="tokenizer not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(UserError, match="not a valid tokenizer.json") as e:
        load_tokenizer(tmp_path)
    assert e.value.path == tmp_path / "tokenizer.json"
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|eos|>",\n "x": }')
    with pytest.raises(UserError, match="not valid JSON") as e:
        load_tokenizer(tmp_path)
    assert e.value.line == 2
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    with pytest.raises(UserError, match="not in the vocabulary") as e:
        load_tokenizer(tmp_path)
    assert e.value.field == "eos_token"



@pytest.mark.parametrize("key, value, message", [
    ("eos_token", 5, "must be a token string or an object with a 'content' string, got 5"),
    ("bos_token", ["<|bos|>"], "must be a token string or an object with a 'content' string, "
                               "got ['<|bos|>']"),
    ("pad_token", {"content": 5}, "must be a token string or an object with a 'content' "
                                  "string, got {'content': 5}"),
    ("add_bos_token", "false", "must be true or false, got 'false'"),
    ("chat_template", 5, "must be a Jinja template string or a list of named templates "
                         "[{\"name\": ..., \"template\": ...}], got 5"),
    ("chat_template", {"default": "x"}, "must be a Jinja template string or a list of named "
                                        "templates [{\"name\": ..., \"template\": ...}], got "
                                        "{'default': 'x'}"),
])
def test_a_tokenizer_config_field_of_the_wrong_type_names_its_file_and_field(tok, tmp_path, key,
                                                                              value, message):
    # Each was a TypeError from the tokenizer library or from Jinja (add_bos_token "false"
    # read as true).
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == f"{tmp_path / 'tokenizer_config.json'}, field '{key}': {message}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": None}))
    assert load_tokenizer(tmp_path).bos_id == tok.bos_id      # null: the default, as absent


@pytest.mark.parametrize("templates, field, message", [
    ([1, 2], "chat_template[0]",
     "must be an object with a 'name' string and a 'template' string, got 1"),
    ([{"nam": "default"}], "chat_template[0]",
     "must be an object with a 'name' string and a 'template' string, got {'nam': 'default'}"),
    ([{"name": "default", "template": "x"}, {"name": "tool_use"}], "chat_template[1]",
     "must be an object with a 'name' string and a 'template' string, got {'name': 'tool_use'}"),
    ([{"name": 5, "template": "x"}], "chat_template[0].name",
     "must be a template name string, got 5"),
    ([{"name": "default", "template": True}], "chat_template[0].template",
     "must be a Jinja template string, got True"),
    ([{"name": "default", "template": None}], "chat_template[0].template",
     "must be a Jinja template string, got None"),
    ([{"name": "default", "template": "a"}, {"name": "default", "template": "b"}],
     "chat_template[1].name", "'default' names chat_template[0] too; each template needs a "
                              "name of its own"),
    ([{"name": "tool_use", "template": "a"}, {"name": "rag", "template": "b"}], "chat_template",
     "names no template \"default\" (names: 'tool_use', 'rag'); the one named \"default\" is "
     "the chat template, as in transformers"),
    ([{"name": "tool_use", "template": "a"}], "chat_template",
     "names no template \"default\" (names: 'tool_use'); the one named \"default\" is the "
     "chat template, as in transformers"),
    ([], "chat_template", "names no template \"default\" (names: none); the one named "
                          "\"default\" is the chat template, as in transformers"),
], ids=["numbers", "no-name", "no-template", "name-number", "template-bool", "template-null",
        "two-defaults", "no-default", "one-not-default", "empty"])
def test_a_malformed_list_of_named_chat_templates_names_its_file_and_item(tok, tmp_path,
                                                                          templates, field,
                                                                          message):
    # Each was skipped or read as no template, and chat ran on gptlab's built-in one instead.
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config,
                                                                "chat_template": templates}))
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == f"{tmp_path / 'tokenizer_config.json'}, field '{field}': {message}"


def test_named_chat_templates_chat_with_the_default_as_transformers_does(plain, tmp_path):
    named = [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
             {"name": "default", "template": CHATML}, {"name": "rag", "template": "{% for %}"}]
    markers = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    d = hf_dir(plain, tmp_path / "named", {**markers, "chat_template": named},
               in_vocab=["<|im_start|>", "<|im_end|>"])
    ours = load_tokenizer(d)
    assert ours.chat_template == CHATML
    assert (ours.template_file, ours.template_field) == (
        d / "tokenizer_config.json", "chat_template[1].template")
    assert_reads_as_transformers(ours, auto_tokenizer(d), "a <|im_end|> b")
    # A default that does not compile is named by its item, not by the whole list.
    named[1]["template"] = "{% for m in messages %}"
    d = hf_dir(plain, tmp_path / "broken", {**markers, "chat_template": named},
               in_vocab=["<|im_start|>", "<|im_end|>"])
    with pytest.raises(UserError) as e:
        load_tokenizer(d).render_chat(HF_CHAT)
    assert str(e.value).startswith(f"{d / 'tokenizer_config.json'}, field "
                                   f"'chat_template[1].template': the chat template cannot be "
                                   f"compiled: ")
    # Without a default, chat_template.jinja beside the list is the template: transformers reads
    # that file before the config.
    d = hf_dir(plain, tmp_path / "jinja", {**markers, "chat_template": [named[0]]},
               in_vocab=["<|im_start|>", "<|im_end|>"])
    (d / "chat_template.jinja").write_text(CHATML)
    ours = load_tokenizer(d)
    assert (ours.chat_template, ours.template_file, ours.template_field) == (
        CHATML, d / "chat_template.jinja", "chat_template")
    assert_reads_as_transformers(ours, auto_tokenizer(d), "a <|im_end|> b")


def test_chat_template_jinja_is_read_before_the_configs_as_transformers_reads_it(plain,
                                                                                   tmp_path):
    # The config's string won: the model chatted in another format than transformers' did.
    markers = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    d = hf_dir(plain, tmp_path / "both", {**markers, "chat_template": "{{ 'not this one' }}"},
               in_vocab=["<|im_start|>", "<|im_end|>"])
    (d / "chat_template.jinja").write_text(CHATML)
    ours = load_tokenizer(d)
    assert (ours.chat_template, ours.template_file) == (CHATML, d / "chat_template.jinja")
    assert_reads_as_transformers(ours, auto_tokenizer(d), "a <|im_end|> b")


@pytest.mark.parametrize("where", ["config", "jinja"])
@pytest.mark.parametrize("empty", ["", "  \n"])
def test_an_empty_chat_template_is_refused_naming_its_file(tok, tmp_path, where, empty):
    # It rendered every prompt as no tokens: a traceback in chat, sample and ppo, and SFT on
    # no prompt "diverged" and blamed the learning rate.
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    if where == "config":
        config["chat_template"] = empty
        said = f"{tmp_path / 'tokenizer_config.json'}, field 'chat_template'"
    else:
        config.pop("chat_template", None)
        (tmp_path / "chat_template.jinja").write_text(empty)
        said = f"{tmp_path / 'chat_template.jinja'}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == (f"{said}: is empty: a chat template renders each conversation as "
                            f"the model's prompt, and this one renders nothing; remove it for "
                            f"gptlab's own, or write one")


def test_a_chat_template_file_that_cannot_be_read_or_compiled_is_named(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    jinja = tmp_path / "chat_template.jinja"
    jinja.write_bytes(b"{{ bos_token }}\n{% for m in messages %}\xff{% endfor %}")
    with pytest.raises(UserError) as e:  # was a UnicodeDecodeError
        load_tokenizer(tmp_path)
    assert str(e.value) == (f"{jinja}:2: not UTF-8 text: byte 0xff at byte offset 39 cannot be "
                            f"decoded; save the file as UTF-8")
    jinja.unlink()
    jinja.mkdir()
    with pytest.raises(UserError) as e:  # was an IsADirectoryError
        load_tokenizer(tmp_path)
    assert str(e.value) == f"{jinja}: is a directory, not a file"
    jinja.rmdir()
    jinja.write_text("{% for m in messages %}\n{{ m['content'] }}\n{% for %}")
    t = load_tokenizer(tmp_path)   # loads: generation and pretraining need no template
    assert t.encode("cat") == tok.encode("cat")
    with pytest.raises(UserError) as e:  # named no file: the data file's line was blamed
        t.render_chat(CONVERSATION)
    assert e.value.path == jinja and e.value.line == 3 and e.value.field == "chat_template"
    assert "the chat template cannot be compiled" in str(e.value)


# --- training -----------------------------------------------------------------------------------
def test_training_is_deterministic_and_reads_files(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(CORPUS[:4]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[:4]),
                                      encoding="utf-8")
    from_files = train_tokenizer([str(tmp_path / "a.txt"), tmp_path / "b.jsonl"], vocab_size=350)
    from_texts = train_tokenizer(CORPUS[:4] * 2, vocab_size=350)
    again = train_tokenizer(CORPUS[:4] * 2, vocab_size=350)
    assert from_files.hf.to_str() == from_texts.hf.to_str() == again.hf.to_str()


def test_vocab_size_too_small(tmp_path):
    with pytest.raises(UserError, match="at least 262") as e:
        train_tokenizer(CORPUS, vocab_size=261)
    assert e.value.field == "vocab_size"
    assert train_tokenizer(CORPUS, vocab_size=262).vocab_size == 262


def test_vocab_size_too_large_is_refused_before_training(tmp_path, data, capsys):
    """A size past 2**24 is refused: `tokenizers` reserved room for it up front, so 2**31
    aborted the process (allocation failure) and 2**64 raised an OverflowError."""
    with pytest.raises(UserError, match="at most 16,777,216 tokens") as e:
        train_tokenizer(CORPUS, vocab_size=2**24 + 1)
    assert e.value.field == "vocab_size"
    assert cli.main(["tokenizer", "train", "--data", str(data), "--vocab-size", str(2**64),
                     "--out", str(tmp_path / "tok")]) == 2
    assert "field '--vocab-size': 18446744073709551616 is too large" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_a_small_corpus_gives_fewer_tokens_than_asked(tmp_path, data, capsys):
    """Training stops when no pair is left to merge; the command says the size obtained."""
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", "--data", str(data), "--vocab-size", "5000",
                     "--out", str(out)]) == 0
    obtained = load_tokenizer(out).vocab_size
    assert 262 < obtained < 5000
    assert f"(vocabulary {obtained})" in capsys.readouterr().out


def test_a_word_longer_than_the_longest_trained_whole_is_learned_in_pieces(tmp_path):
    """`tokenizers`' trainer takes time quadratic in a word's length: a 2 MB line of one letter
    ran past 10 minutes. A word is learned in pieces of 1024 bytes (LONGEST_TRAINED_WORD), so no
    merge spans more; the tokenizer still splits no word when it encodes, and words shorter
    than that (CORPUS's) train as before."""
    data = tmp_path / "long.txt"
    data.write_text("a" * 2**14 + "\n\nthe end\n", encoding="utf-8")
    tok = train_tokenizer([data], vocab_size=300)
    vocab = tok.hf.get_vocab()
    # Whole, the run gave a, aa, ..., a * 16384 (14 merges); in pieces, a * 1024 at most.
    assert max(map(len, vocab)) == 1024 and "a" * 1024 in vocab
    text = "a" * 5000 + " the end"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a" * 2048) == [vocab["a" * 1024]] * 2
    # The pre-tokenizer saved is the one without pieces.
    assert "Split" not in tok.hf.to_str()
    ref = tokenizers.Tokenizer(tokenizers.models.BPE())
    ref.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref.decoder = tokenizers.decoders.ByteLevel()
    ref.train_from_iterator(CORPUS, trainer=tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, EOS, PAD, SYSTEM, USER, ASSISTANT],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    assert train_tokenizer(CORPUS, vocab_size=400).hf.to_str() == ref.to_str()


def test_training_input_errors(tmp_path):
    with pytest.raises(UserError, match="corpus file not found"):
        train_tokenizer([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(UserError, match="corpus is empty"):
        train_tokenizer(["", "  "], vocab_size=300)


# --- CLI ----------------------------------------------------------------------------------------
def test_tokenizer_train_refuses_an_out_in_its_corpus_directory(tmp_path, data, capsys):
    # Every other verb refuses an --out in a directory it reads whole (pretrain --data DIR
    # --out DIR/run); `tokenizer train` wrote its tokenizer there.
    d = data.parent
    for out in (d / "tok", d):
        assert cli.main(["tokenizer", "train", "--data", str(d), "--vocab-size", "300",
                         "--out", str(out)]) == 2
        why = (f"is inside the corpus directory {d} (data, --data)" if out != d
               else "is the corpus directory (data, --data)")
        assert capsys.readouterr().err == (
            f"gptlab tokenizer train: error: {out}, field 'out': {why}; the tokenizer's directory "
            f"would become part of the corpus; choose another out (--out)\n")
    assert sorted(p.name for p in d.iterdir()) == ["corpus.txt"]
    assert cli.main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300",
                     "--out", str(d / "tok")]) == 0  # a file named is no directory read whole


def test_a_save_stopped_between_its_two_files_leaves_no_tokenizer(tmp_path, data, monkeypatch):
    """tokenizer.json is written last: stopped before it, the directory holds no tokenizer to
    load with another BOS/EOS, and the same `tokenizer train` runs again."""
    import gptlab.tokenizer as tk
    args = ["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out",
            str(tmp_path / "tok")]
    real = tk.write_json_atomic

    def killed(path, obj):
        real(path, obj)
        raise KeyboardInterrupt  # as if killed right after the first file
    monkeypatch.setattr(tk, "write_json_atomic", killed)
    assert cli.main(args) == 130
    assert not (tmp_path / "tok" / "tokenizer.json").exists()
    monkeypatch.setattr(tk, "write_json_atomic", real)
    assert cli.main(args) == 0 and load_tokenizer(tmp_path / "tok").vocab_size == 300


def test_cli_train_in_process(tmp_path, data, capsys):
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300",
                     "--out", str(out)]) == 0
    assert load_tokenizer(out).vocab_size == 300
    # A tokenizer (or a model's, beside its weights) is never replaced.
    before = (out / "tokenizer.json").read_bytes()
    assert cli.main(["tokenizer", "train", "--data", str(data), "--vocab-size", "400",
                     "--out", str(out)]) == 2
    assert (f"{out}, field 'out': already holds tokenizer.json; choose another out (--out) or "
            f"remove it" in capsys.readouterr().err)
    assert (out / "tokenizer.json").read_bytes() == before
    assert cli.main(["tokenizer", "train", "--data", str(data), "--vocab-size", "100",
                     "--out", str(tmp_path / "tok100")]) == 2
    assert "field '--vocab-size'" in capsys.readouterr().err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café\n".encode("latin-1"))
    assert cli.main(["tokenizer", "train", "--data", str(bad), "--out",
                     str(tmp_path / "tok-bad")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: not UTF-8" in err and "byte offset 3" in err


def test_tokenizer_train_refuses_utf16_text_without_a_byte_order_mark(tmp_path, capsys):
    """Of ASCII text (valid UTF-8 then), it trained on each letter followed by a NUL, and wrote
    the tokenizer."""
    data = tmp_path / "corpus.txt"
    data.write_bytes("\n\n".join(CORPUS[:3]).encode("utf-16-le"))
    assert cli.main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300",
                     "--out", str(tmp_path / "tok")]) == 2
    assert capsys.readouterr().err == (
        f"gptlab tokenizer train: error: {data}: is UTF-16 text without a byte-order mark (a "
        f"zero byte beside each character of its start); save the file as UTF-8\n")
    assert not (tmp_path / "tok").exists()
    # NUL bytes in UTF-8 text are text, trained on and encoded back.
    data.write_bytes(b"a\x00b SELECT\x00\n\nSELECT name\n")
    tok = train_tokenizer([data], vocab_size=300)
    assert tok.decode(tok.encode("x\x00 SELECT\x00")) == "x\x00 SELECT\x00"


def test_a_stale_generation_config_does_not_change_a_new_tokenizer(tmp_path, data, plain):
    """`tokenizer train --out DIR` refuses a DIR with a model's config.json or tokenizer.json,
    but a generation_config.json left there by an earlier model stayed, and was read back as
    the new tokenizer's ends: token 7 stopped every generation and vanished from decoded text.
    A save without ends now removes it, as it replaces the other two files."""
    out = tmp_path / "tok"
    out.mkdir()
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    assert cli.main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300",
                     "--out", str(out)]) == 0
    tok = load_tokenizer(out)
    assert tok.end_ids == () and tok.stop_ids == {tok.eos_id}
    assert not (out / "generation_config.json").exists()
    assert tok.decode([7]) == tok.hf.id_to_token(7)  # a byte, no longer a stop token
    # Saved over a tokenizer with ends, a tokenizer without them loads without them.
    with_ends = Tokenizer(plain.hf, bos_token="<s>", eos_token="</s>", pad_token=None,
                          end_ids=[7])
    with_ends.save(tmp_path / "d")
    assert load_tokenizer(tmp_path / "d").stop_ids == {1, 7}
    plain.save(tmp_path / "d")
    assert load_tokenizer(tmp_path / "d").stop_ids == {1}


def test_a_save_that_fails_over_old_files_leaves_them_byte_for_byte(tmp_path, data, plain,
                                                                    monkeypatch, capsys):
    """`tokenizer train --out DIR` writes over a tokenizer_config.json or a
    generation_config.json DIR holds (an earlier model's); a save that failed at tokenizer.json
    (a full disk) left the new tokenizer_config.json and lost the old files. They are put back
    now, the same files byte for byte, and the same over a whole tokenizer from Python."""
    import errno
    import os

    import gptlab.tokenizer as tk

    def tree(d):
        return {p.name: (p.read_bytes(), os.stat(p).st_ino) for p in sorted(d.iterdir())}

    class Full:
        def save(self, path):
            raise OSError(errno.ENOSPC, "No space left on device")
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer_config.json").write_bytes(b'{"model_max_length": 7}\n')
    (out / "generation_config.json").write_bytes(b'{"eos_token_id": [1, 7]}\n')
    (out / "notes.txt").write_bytes(b"mine")
    before = tree(out)
    args = ["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(tk.Tokenizer, "hf_as_saved", lambda self: Full())
        capsys.readouterr()
        assert cli.main(args) == 2
        assert capsys.readouterr().err.endswith(
            f"{out / 'tokenizer.json'}, field '--out': No space left on device\n")
        assert tree(out) == before
        with_ends = Tokenizer(plain.hf, bos_token="<s>", eos_token="</s>", pad_token=None,
                              end_ids=[7])
        m.undo()
        with_ends.save(tmp_path / "d")
        saved = tree(tmp_path / "d")
        m.setattr(tk.Tokenizer, "hf_as_saved", lambda self: Full())
        with pytest.raises(OSError, match="No space left on device"):
            plain.save(tmp_path / "d")  # would remove generation_config.json
        assert tree(tmp_path / "d") == saved
        with pytest.raises(OSError, match="No space left on device"):
            plain.save(tmp_path / "new")
        assert not (tmp_path / "new").exists()
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "notes.txt", "tokenizer.json", "tokenizer_config.json"]


def test_cli_train_subprocess(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "gptlab", "tokenizer", "train", "--data", str(data),
                        "--vocab-size", "300", "--out", str(tmp_path / "tok")],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert "vocabulary 300" in r.stdout


def test_saved_tokenizer_renders_the_same_chat_in_transformers(tok, tmp_path):
    pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = auto_tokenizer(tmp_path)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
    # CONVERSATION[:3]: no typed special tokens, which HF would parse and gptlab does not.
    out = hf.apply_chat_template(CONVERSATION[:3], tokenize=True, add_generation_prompt=False)
    hf_ids = out["input_ids"] if hasattr(out, "keys") else out
    assert hf_ids == tok.render_chat(CONVERSATION[:3])[0]


def test_a_trained_tokenizer_s_add_bos_token_is_what_transformers_does_with_it(tmp_path, data):
    """`tokenizer train` wrote add_bos_token: true with no post-processor, and transformers 5
    goes by the post-processor: `tok(text)` started without the BOS the config promised and
    the model is trained on. Now transformers gives gptlab's ids: BOS first with special
    tokens (`encode(bos=True)`, what pretraining, SFT and `generate` feed), none without."""
    pytest.importorskip("transformers")
    assert cli.main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300",
                     "--out", str(tmp_path / "tok")]) == 0
    ours, theirs = load_tokenizer(tmp_path / "tok"), auto_tokenizer(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], ours.bos_id) == (True, 0)
    texts = ["The quick brown fox", "SELECT name FROM users;", "élèves 🙂", " two  spaces", ""]
    for text in texts:
        assert theirs(text)["input_ids"] == ours.encode(text, bos=True) == [0, *ours.encode(text)]
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert theirs(texts[:2])["input_ids"] == ours.encode_batch(texts[:2], bos=True)
    chat = theirs.apply_chat_template(CONVERSATION[:3], tokenize=True, return_dict=True)
    assert chat["input_ids"] == ours.render_chat(CONVERSATION[:3])[0]  # one BOS, not two
    # Saved again, the directory is the same; gptlab's encodings are those of the tokenizer
    # trained in memory, which has no post-processor.
    ours.save(tmp_path / "again")
    assert ((tmp_path / "again" / "tokenizer.json").read_bytes()
            == (tmp_path / "tok" / "tokenizer.json").read_bytes())
    trained = train_tokenizer([data], vocab_size=300)
    assert trained.hf.post_processor is None
    for text in texts:
        assert ours.encode(text, bos=True) == trained.encode(text, bos=True)


def test_a_tokenizer_without_bos_first_saves_no_bos_for_transformers(plain, tmp_path):
    """add_bos_token false: no post-processor that adds BOS, and transformers adds none. A
    post-processor of its own that adds no BOS (GPT-2's ByteLevel) is kept, and BOS put after
    it where the model starts with BOS, as Llama 3's tokenizer.json has it."""
    pytest.importorskip("transformers")
    no_bos = Tokenizer(plain.hf, "<s>", "</s>", None, add_bos=False)
    no_bos.save(tmp_path / "no")
    config = json.loads((tmp_path / "no" / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False
    assert json.loads((tmp_path / "no" / "tokenizer.json").read_text())["post_processor"] is None
    assert auto_tokenizer(tmp_path / "no")("The quick")["input_ids"] == no_bos.encode("The quick")
    hf = tokenizers.Tokenizer.from_str(plain.hf.to_str())
    hf.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    bos_first = Tokenizer(hf, "<s>", "</s>", None)
    bos_first.save(tmp_path / "bos")
    saved = json.loads((tmp_path / "bos" / "tokenizer.json").read_text())["post_processor"]
    assert [p["type"] for p in saved["processors"]] == ["ByteLevel", "TemplateProcessing"]
    theirs = auto_tokenizer(tmp_path / "bos")
    assert theirs("The quick")["input_ids"] == bos_first.encode("The quick", bos=True)
    assert theirs("The quick")["input_ids"][0] == plain.hf.token_to_id("<s>")



@pytest.mark.parametrize("add_bos_token", [True, False])
@pytest.mark.parametrize("post_bos", [True, False])
def test_bos_first_is_what_transformers_reads_and_saved_so(plain, tmp_path, capsys,
                                                           add_bos_token, post_bos):
    """transformers 5 drops add_bos_token where there is a tokenizer.json and goes by the
    post-processor: `add_bos_token: false` beside one that prepends <s> gave <s> in
    transformers' `tok(text)`, none in gptlab's encoding, and was saved as it was. Now gptlab
    starts sequences with <s> there too (noting the conflict) and saves add_bos_token true; a
    directory saved by gptlab gives transformers gptlab's ids in every case."""
    pytest.importorskip("transformers")
    from gptlab.interop.hf import load_hf_tokenizer
    bos = plain.hf.token_to_id("<s>")
    hf = tokenizers.Tokenizer.from_str(plain.hf.to_str())
    if post_bos:
        hf.post_processor = tokenizers.processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos)])
    (tmp_path / "imported").mkdir()
    hf.save(str(tmp_path / "imported" / "tokenizer.json"))
    config = tmp_path / "imported" / "tokenizer_config.json"
    config.write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                                  "eos_token": "</s>", "add_bos_token": add_bos_token}))
    capsys.readouterr()
    ours = load_tokenizer(tmp_path / "imported")
    noted = capsys.readouterr().err
    if add_bos_token or not post_bos:
        assert noted == ""
    else:
        assert noted == (f"note: {config}, field 'add_bos_token': false, but the post-processor "
                         f"of tokenizer.json starts each sequence with '<s>', and transformers 5 "
                         f"goes by it alone: sequences start with '<s>', as transformers' "
                         f"tokenizer(text) starts them\n")
    starts = add_bos_token or post_bos
    assert ours.bos_id == (bos if starts else None)
    assert load_hf_tokenizer(tmp_path / "imported").bos_id == ours.bos_id
    texts = ["The quick brown fox", "SELECT name FROM users;", ""]
    if post_bos or not add_bos_token:  # (true, none: gptlab's own directories of a time)
        original = auto_tokenizer(tmp_path / "imported")
        assert [original(t)["input_ids"] for t in texts] == \
            [ours.encode(t, bos=True) for t in texts]
    ours.save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert saved["add_bos_token"] is starts
    theirs = auto_tokenizer(tmp_path / "saved")
    for text in texts:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ours.encode(text, bos=True) == \
            ([bos] if starts else []) + ids
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids
    again = load_tokenizer(tmp_path / "saved")
    assert [again.encode(t, bos=True) for t in texts] == [ours.encode(t, bos=True) for t in texts]

# --- a Hugging Face directory's special tokens, as transformers reads them ----------------------
HF_CHAT = [{"role": "system", "content": "You answer in SQL."},
           {"role": "user", "content": "Who is older than 30?"},
           {"role": "assistant", "content": "SELECT name FROM users WHERE age > 30;"}]


@pytest.fixture(scope="module")
def plain() -> Tokenizer:
    """A byte-level BPE with only <s> and </s> special: no <|pad|>, no role tokens."""
    return train_tokenizer(CORPUS, vocab_size=300, special_tokens=["<s>", "</s>"])


def transformers_major() -> int:
    return int(pytest.importorskip("transformers").__version__.split(".")[0])


def auto_tokenizer(path: Path):
    """transformers' AutoTokenizer on `path`. Given a tokenizer_config.json that names no
    tokenizer_class and no config.json, transformers 5 builds a PreTrainedTokenizerFast;
    transformers 4 refuses the directory for the model_type it lacks, so it gets that class."""
    transformers = pytest.importorskip("transformers")
    config = path / "tokenizer_config.json"
    unnamed = not config.exists() or "tokenizer_class" not in json.loads(config.read_text())
    if transformers_major() < 5 and unnamed and not (path / "config.json").exists():
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path))


def hf_dir(base: Tokenizer, path: Path, config: dict | None = None, *, in_vocab=(), added=(),
           special_map: dict | None = None, generation: dict | None = None) -> Path:
    """A tokenizer directory as a Hugging Face model ships one: `base`'s tokenizer.json with
    `in_vocab` tokens as entries of the BPE vocabulary (not added tokens) and `added` ones as
    added tokens (content, special), a ChatML tokenizer_config.json updated with `config`, and
    special_tokens_map.json and generation_config.json where given."""
    raw = json.loads(base.hf.to_str())
    for k, token in enumerate(in_vocab):
        raw["model"]["vocab"][token] = base.vocab_size + k
    hf = tokenizers.Tokenizer.from_str(json.dumps(raw))
    for content, special in added:
        token = tokenizers.AddedToken(content, special=special, normalized=False)
        (hf.add_special_tokens if special else hf.add_tokens)([token])
    path.mkdir(parents=True, exist_ok=True)
    hf.save(str(path / "tokenizer.json"))
    files = {"tokenizer_config.json": {"eos_token": "</s>", "chat_template": CHATML,
                                       **(config or {})},
             "special_tokens_map.json": special_map, "generation_config.json": generation}
    for name, content in files.items():
        if content is not None:
            (path / name).write_text(json.dumps(content))
    return path


def assert_reads_as_transformers(ours: Tokenizer, theirs, typed: str) -> list[int]:
    """The same chat ids as transformers' rendered template, the same ids for typed text (with
    special tokens split, as gptlab reads text) and the same decoded text (special tokens
    skipped). Returns the chat ids."""
    ids, _ = ours.render_chat(HF_CHAT)
    text = theirs.apply_chat_template(HF_CHAT, tokenize=False)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.encode(typed) == theirs(typed, add_special_tokens=False,
                                        split_special_tokens=True)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    return ids


@pytest.mark.parametrize("config, special_map", [
    ({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, None),
    ({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]}, None),  # transformers 5 writes
    ({"extra_special_tokens": {"start_token": "<|im_start|>", "end_token": "<|im_end|>"}}, None),
    ({}, {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}),
], ids=["additional", "extra", "extra-named", "special_tokens_map"])
def test_additional_special_tokens_are_read_as_transformers_reads_them(plain, tmp_path, config,
                                                                       special_map):
    """ChatML markers that are entries of the BPE vocabulary, made special only by the config's
    list: they were never read, so the template's <|im_end|> was spelled in pieces, ended no
    turn, and decoded as text. Now: one id each, the end of turn, text when typed, and left
    out of decoded text, as transformers does on the same directory."""
    d = hf_dir(plain, tmp_path, config, in_vocab=["<|im_start|>", "<|im_end|>"],
               special_map=special_map)
    ours, theirs_dir = load_tokenizer(d), d
    if transformers_major() < 5 and isinstance(config.get("extra_special_tokens"), list):
        # transformers 5 writes the list; 4.57 reads only an object of names there (an
        # AttributeError on a list), and the list as additional_special_tokens.
        theirs_dir = hf_dir(plain, tmp_path / "as4", {
            "additional_special_tokens": config["extra_special_tokens"]},
            in_vocab=["<|im_start|>", "<|im_end|>"], special_map=special_map)
    theirs = auto_tokenizer(theirs_dir)
    start, end = plain.vocab_size, plain.vocab_size + 1
    assert theirs.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [start, end]
    assert {start, end} <= set(theirs.all_special_ids)
    assert ours.extra_special_tokens == ("<|im_start|>", "<|im_end|>")
    assert ours.vocab_size == len(theirs) == plain.vocab_size + 2
    ids = assert_reads_as_transformers(ours, theirs, "a <|im_end|> b <|im_start|>")
    assert ids.count(start) == ids.count(end) == len(HF_CHAT)
    assert ours.stop_ids == {ours.eos_id, end}
    assert ours.decode(ids) == "system\nYou answer in SQL.\nuser\nWho is older than 30?\n" \
                               "assistant\nSELECT name FROM users WHERE age > 30;\n"
    # typed in a message, a marker is text: the user cannot end a turn
    chat = [{"role": "user", "content": "x <|im_end|>"}, {"role": "assistant", "content": "y"}]
    ids, mask = ours.render_chat(chat)
    assert ids.count(end) == 2 and masked_text(ours, ids, mask) == "y<|im_end|>"


def test_additional_special_tokens_as_objects_are_read(plain, tmp_path):
    """The object form ({"content": ..., "special": true}) reads as the string form
    (transformers 5 refuses it in the list with a TypeError)."""
    pytest.importorskip("transformers")
    obj = [{"content": t, "special": True, "lstrip": False, "rstrip": False,
            "normalized": False, "single_word": False} for t in ("<|im_start|>", "<|im_end|>")]
    for name, config, special_map in (("config", {"additional_special_tokens": obj}, None),
                                      ("map", {}, {"additional_special_tokens": obj})):
        d = hf_dir(plain, tmp_path / name, config, in_vocab=["<|im_start|>", "<|im_end|>"],
                   special_map=special_map)
        ours = load_tokenizer(d)
        assert ours.extra_special_tokens == ("<|im_start|>", "<|im_end|>")
        strings = hf_dir(plain, tmp_path / f"{name}-strings", in_vocab=["<|im_start|>",
                                                                           "<|im_end|>"],
                         config={"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        assert_reads_as_transformers(ours, auto_tokenizer(strings), "a <|im_end|> b")


def test_added_tokens_decoder_marks_tokens_special_as_in_transformers(plain, tmp_path):
    """tokenizer.json added the ChatML markers and <tool> with special=false; the config's
    added_tokens_decoder says special=true for the markers (transformers goes by it), and names
    <|im_end|> in additional_special_tokens too. special_tokens_map.json, which transformers
    does not read beside an added_tokens_decoder, is not read: its <tool> stays text."""
    pytest.importorskip("transformers")
    n = plain.vocab_size
    entry = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    d = hf_dir(plain, tmp_path, {
        "added_tokens_decoder": {str(n): {**entry, "content": "<|im_start|>", "special": True},
                                 str(n + 1): {**entry, "content": "<|im_end|>", "special": True},
                                 str(n + 2): {**entry, "content": "<tool>", "special": False}},
        "additional_special_tokens": ["<|im_end|>"]},
        added=[("<|im_start|>", False), ("<|im_end|>", False), ("<tool>", False)],
        special_map={"additional_special_tokens": ["<tool>"], "eos_token": "<tool>"})
    ours, theirs = load_tokenizer(d), auto_tokenizer(d)
    assert (ours.eos_token, theirs.eos_token) == ("</s>", "</s>")
    assert ours.extra_special_tokens == ("<|im_end|>",)
    # (typed <tool> is text in gptlab, markup-like; transformers parses it: README says so)
    ids = assert_reads_as_transformers(ours, theirs, "a <|im_end|> b <|im_start|>")
    assert n not in ours.stop_ids and ours.decode([n] + ids) == ours.decode(ids)  # dropped
    assert ours.decode([n + 2]) == theirs.decode([n + 2], skip_special_tokens=True) == "<tool>"


def test_special_tokens_map_names_bos_eos_and_pad_where_transformers_reads_it(plain, tmp_path):
    """Without an added_tokens_decoder in the config (a directory from before transformers
    4.34), transformers takes BOS, EOS and pad from special_tokens_map.json over the config's;
    gptlab read only the config, so a model ended its replies at another token."""
    pytest.importorskip("transformers")
    d = hf_dir(plain, tmp_path, {"eos_token": "</s>"},
               added=[("<|im_start|>", True), ("<|im_end|>", True)],
               special_map={"eos_token": {"content": "<|im_end|>", "lstrip": False},
                            "pad_token": "<|im_start|>"})
    ours, theirs = load_tokenizer(d), auto_tokenizer(d)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        theirs.bos_token, theirs.eos_token, theirs.pad_token) == (None, "<|im_end|>",
                                                                   "<|im_start|>")
    assert (ours.eos_id, ours.pad_id) == (theirs.eos_token_id, theirs.pad_token_id)
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    with pytest.raises(UserError) as e:
        load_tokenizer(d)
    assert str(e.value) == (f"{d / 'special_tokens_map.json'}, field 'eos_token': token "
                            f"'<|eot_id|>' is not in the vocabulary of tokenizer.json")


def test_a_special_token_the_vocabulary_lacks_is_noted_and_stays_text(plain, tmp_path, capsys):
    """transformers adds it as a new token, past the embedding rows the model was trained with;
    gptlab notes it on stderr, naming the file and field, and reads it as text."""
    pytest.importorskip("transformers")
    d = hf_dir(plain, tmp_path, {"additional_special_tokens": ["<|im_end|>", "<|eot_id|>"]},
               added=[("<|im_start|>", True), ("<|im_end|>", True)])
    capsys.readouterr()
    ours = load_tokenizer(d)
    assert capsys.readouterr().err == (
        f"note: {d / 'tokenizer_config.json'}, field 'additional_special_tokens[1]': "
        f"'<|eot_id|>' is not in the vocabulary of tokenizer.json; it is read as text, not as "
        f"a special token\n")
    assert ours.extra_special_tokens == ("<|im_end|>",)
    assert ours.vocab_size == plain.vocab_size + 2
    assert ours.decode(ours.encode("a<|eot_id|>b")) == "a<|eot_id|>b"
    theirs = auto_tokenizer(d)
    assert len(theirs) == ours.vocab_size + 1  # the one it added


def test_generation_config_ends_generation_at_each_of_its_ids(plain, tmp_path, capsys):
    """generation_config.json's eos_token_id list (Qwen2's <|im_end|> and <|endoftext|>,
    Llama 3's three ends): generation stopped only at the tokenizer's EOS and the template's
    end of turn, and ran on past <|endoftext|>; decoding wrote it."""
    transformers = pytest.importorskip("transformers")
    n = plain.vocab_size
    d = hf_dir(plain, tmp_path / "src", {"eos_token": "<|im_end|>"},
               added=[("<|im_start|>", True), ("<|im_end|>", True), ("<|endoftext|>", False)],
               generation={"eos_token_id": [n + 1, n + 2]})
    ours, theirs = load_tokenizer(d), auto_tokenizer(d)
    assert set(transformers.GenerationConfig.from_pretrained(str(d)).eos_token_id) == {n + 1,
                                                                                      n + 2}
    assert ours.stop_ids == {n + 1, n + 2} and ours.end_ids == (n + 2,)
    answer = ours.encode("SELECT 1")
    assert ours.decode(answer + [n + 2]) == ours.decode_cut(answer + [n + 2]) == "SELECT 1"
    assert ours.pad_token is None and theirs.pad_token is None and ours.pad_id == n + 1
    # one id, and no tokenizer_config.json: its EOS is the generation config's
    (d / "tokenizer_config.json").unlink()
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": n + 2}))
    assert (load_tokenizer(d).eos_token, load_tokenizer(d).stop_ids) == ("<|endoftext|>",
                                                                       {n + 2})
    # an id past the vocabulary is noted; a value that is not an id is refused
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [n + 2, 10**6]}))
    capsys.readouterr()
    assert load_tokenizer(d).stop_ids == {n + 2}
    assert capsys.readouterr().err == (
        f"note: {d / 'generation_config.json'}, field 'eos_token_id[1]': 1000000 is not a token "
        f"id of tokenizer.json (0 to {n + 2}); generation does not stop at it\n")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [n + 2, "</s>"]}))
    with pytest.raises(UserError) as e:
        load_tokenizer(d)
    assert str(e.value) == (f"{d / 'generation_config.json'}, field 'eos_token_id[1]': must be "
                            f"a token id (an integer) or a list of them, got '</s>'")


def test_a_tokenizer_s_notes_are_printed_once_per_process_per_file(plain, tmp_path, capsys):
    """The pipeline loads a model's tokenizer at each stage, PPO for the policy, the reference
    and the value model: generation_config.json's end id outside the vocabulary (and the other
    notes of a load) came once per load, the same line over and over on stderr."""
    n = plain.vocab_size
    d = hf_dir(plain, tmp_path / "a", {"additional_special_tokens": ["<|eot_id|>"]},
               added=[("<|im_start|>", True), ("<|im_end|>", True)],
               generation={"eos_token_id": [n + 1, 10**6]})
    notes = [f"note: {d / 'generation_config.json'}, field 'eos_token_id[1]': 1000000 is not a "
             f"token id of tokenizer.json (0 to {n + 1}); generation does not stop at it",
             f"note: {d / 'tokenizer_config.json'}, field 'additional_special_tokens[0]': "
             f"'<|eot_id|>' is not in the vocabulary of tokenizer.json; it is read as text, not "
             f"as a special token"]
    capsys.readouterr()
    for _ in range(3):
        assert load_tokenizer(d).stop_ids == {1, n + 1}  # </s> and <|im_end|>
    assert capsys.readouterr().err.splitlines() == notes
    load_tokenizer(d / "tokenizer.json")  # the same files, named otherwise
    assert capsys.readouterr().err == ""
    # another directory's files are noted, and so is another id in the same file
    shutil.copytree(d, tmp_path / "b")
    load_tokenizer(tmp_path / "b")
    assert capsys.readouterr().err.splitlines() == [x.replace(str(d), str(tmp_path / "b"))
                                                    for x in notes]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [n + 1, -1]}))
    load_tokenizer(d)
    load_tokenizer(d)
    assert capsys.readouterr().err == notes[0].replace("1000000", "-1") + "\n"


@pytest.mark.parametrize("key, value, field, message", [
    ("additional_special_tokens", "<|im_end|>", "additional_special_tokens",
     "must be a list of token strings (or objects with a 'content' string), got '<|im_end|>'"),
    ("additional_special_tokens", ["<|im_end|>", None], "additional_special_tokens[1]",
     "must be a token string or an object with a 'content' string, got null"),
    ("extra_special_tokens", {"end_token": 5}, "extra_special_tokens.end_token",
     "must be a token string or an object with a 'content' string, got 5"),
    ("added_tokens_decoder", {"300": "<|im_end|>"}, "added_tokens_decoder.300",
     "must be an object with a 'content' string, got '<|im_end|>'"),
    ("added_tokens_decoder", {"300": {"content": "<|im_end|>", "special": "yes"}},
     "added_tokens_decoder.300.special", "must be true or false, got 'yes'"),
    # transformers refuses it too (int() of the key: a ValueError)
    ("added_tokens_decoder", {"im_end": {"content": "<|im_end|>", "special": True}},
     "added_tokens_decoder.im_end", "the key must be a token id (an integer), got 'im_end'"),
])
def test_a_malformed_special_token_list_names_its_file_and_field(plain, tmp_path, key, value,
                                                                 field, message):
    d = hf_dir(plain, tmp_path, {key: value}, added=[("<|im_end|>", False)])
    with pytest.raises(UserError) as e:
        load_tokenizer(d)
    assert str(e.value) == f"{d / 'tokenizer_config.json'}, field '{field}': {message}"


def test_an_added_tokens_decoder_id_that_is_not_the_token_s_is_noted(plain, tmp_path, capsys):
    """An entry keyed by another id than tokenizer.json gives its content: transformers goes by
    the content and keeps tokenizer.json's id without a word, and so does gptlab, but it says
    so (it went unreported: a directory edited by hand, or a config from another tokenizer)."""
    pytest.importorskip("transformers")
    n = plain.vocab_size  # <|im_start|> n, <|im_end|> n + 1
    entry = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
             "special": True}
    d = hf_dir(plain, tmp_path, {"added_tokens_decoder": {
        str(n): {**entry, "content": "<|im_end|>"},
        str(n + 1): {**entry, "content": "<|im_start|>"},
        "1": {**entry, "content": "</s>"}}},
        added=[("<|im_start|>", False), ("<|im_end|>", False)])
    capsys.readouterr()
    ours = load_tokenizer(d)
    config = d / "tokenizer_config.json"
    assert capsys.readouterr().err == (
        f"note: {config}, field 'added_tokens_decoder.{n}': '<|im_end|>' is token {n + 1} of "
        f"tokenizer.json, not {n}; it is read by its content, as id {n + 1}\n"
        f"note: {config}, field 'added_tokens_decoder.{n + 1}': '<|im_start|>' is token {n} of "
        f"tokenizer.json, not {n + 1}; it is read by its content, as id {n}\n")
    theirs = auto_tokenizer(d)
    assert theirs.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [n, n + 1]
    assert ours.hf.token_to_id("<|im_end|>") == n + 1 and ours.stop_ids == {1, n + 1}
    assert_reads_as_transformers(ours, theirs, "a <|im_end|> b")


def test_special_tokens_and_ends_survive_a_save_and_transformers_agrees(plain, tmp_path):
    """Saved (a converted model directory, SFT's output, an export all save so) and loaded
    again: the same special tokens and ends of generation. tokenizer.json now marks the listed
    tokens special, so transformers on the saved directory decodes as gptlab does."""
    transformers = pytest.importorskip("transformers")
    n = plain.vocab_size
    src = hf_dir(plain, tmp_path / "src", {"additional_special_tokens": ["<|im_start|>",
                                                                         "<|im_end|>"]},
                 added=[("<|im_start|>", False), ("<|im_end|>", False), ("<|eom|>", True)],
                 generation={"eos_token_id": [n + 2]})
    ours = load_tokenizer(src)
    ours.save(tmp_path / "saved")
    back = load_tokenizer(tmp_path / "saved")
    assert back.extra_special_tokens == ours.extra_special_tokens == ("<|im_start|>",
                                                                      "<|im_end|>")
    assert back.stop_ids == ours.stop_ids == {ours.eos_id, n + 1, n + 2}
    chat_ids, _ = ours.render_chat(HF_CHAT)
    assert back.render_chat(HF_CHAT) == ours.render_chat(HF_CHAT)
    assert back.decode(chat_ids) == ours.decode(chat_ids)
    assert "<|im_end|>" not in ours.decode(chat_ids)
    assert json.loads((tmp_path / "saved" / "generation_config.json").read_text()) == {
        "bos_token_id": None, "eos_token_id": [ours.eos_id, n + 2, n + 1],  # <|im_end|> too
        "pad_token_id": ours.eos_id}
    theirs = auto_tokenizer(tmp_path / "saved")
    assert {n, n + 1} <= set(theirs.all_special_ids)
    assert transformers.GenerationConfig.from_pretrained(
        str(tmp_path / "saved")).eos_token_id == [ours.eos_id, n + 2, n + 1]
    assert_reads_as_transformers(back, theirs, "a <|im_end|> b <|eom|>")


def test_text_that_is_not_utf8_is_refused(tok):
    with pytest.raises(UserError) as e:
        tok.encode("h\udcffi")  # how a byte that is not UTF-8 reaches Python from argv
    assert e.value.message == "not UTF-8 text: byte 0xff at character 2 cannot be decoded"
    with pytest.raises(UserError, match="not UTF-8 text"):
        tok.render_chat([{"role": "user", "content": "\udcc3"}], add_generation_prompt=True)


def test_save_refuses_a_file_in_the_place_of_the_directory(tok, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError) as e:
        tok.save(tmp_path / "afile")
    assert str(e.value) == f"{tmp_path / 'afile'}: is a file, not a directory"
    with pytest.raises(UserError) as e:
        tok.save(tmp_path / "afile" / "sub")
    assert str(e.value) == (f"{tmp_path / 'afile' / 'sub'}: parent is a file: "
                            f"{tmp_path / 'afile'} is not a directory")
    assert (tmp_path / "afile").read_text() == "x"


# --- properties on random text and conversations ------------------------------------------------
# Emoji (4 bytes), CJK (3), accents and combining marks (2), ZWJ sequences, NUL, CRLF, tabs.
_PIECES = st.sampled_from(["a", "SELECT", " x", "é", "e\u0301", "学生", "🙂", "👩\u200d💻", "\x00",
                           "\r\n", "\t", "  ", "€", "𝄞", "\U0010ffff", "ࠀ"])
_TEXT = st.lists(st.one_of(_PIECES, st.text(max_size=4)), min_size=1, max_size=8).map("".join)


@settings(deadline=None, derandomize=True, max_examples=200)
@given(_TEXT)
def test_any_cut_decodes_to_a_whole_character_prefix_of_the_text(tok, text):
    ids = tok.encode(text)
    cuts = [tok.decode_cut(ids[:k]) for k in range(len(ids) + 1)]
    assert cuts[-1] == tok.decode(ids) == text
    clean = "\ufffd" not in text
    for k, got in enumerate(cuts):
        assert text.startswith(got), (k, got)
        assert not clean or "\ufffd" not in got
        assert k == 0 or got.startswith(cuts[k - 1])  # a longer cut never takes text back
        # every whole character of the first k tokens' bytes: only a split one is left out
        assert got == raw(tok, ids[:k]).decode("utf-8", errors="ignore") or not clean


def raw(tok: Tokenizer, ids: list[int]) -> bytes:
    """The bytes byte-level BPE tokens spell (GPT-2's byte-to-character map, inverted)."""
    from gptlab.tokenizer import _BYTE_CHARS
    byte_of = {c: b for b, c in enumerate(_BYTE_CHARS)}
    return bytes(byte_of[c] for i in ids for c in tok.hf.id_to_token(i))


@settings(deadline=None, derandomize=True, max_examples=200)
@given(_TEXT)
def test_any_cut_under_byte_fallback_decodes_the_whole_characters_of_its_bytes(text):
    tok = _byte_fallback_tokenizer()
    data = text.encode("utf-8")
    ids = [tok.hf.token_to_id(f"<0x{b:02X}>") if b != ord("a") else tok.hf.token_to_id("a")
           for b in data]
    assert tok.decode(ids) == text
    for k in range(len(ids) + 1):
        assert tok.decode_cut(ids[:k]) == data[:k].decode("utf-8", errors="ignore")


_CONTENT = st.lists(st.one_of(_PIECES, st.sampled_from([EOS, ASSISTANT, "<|im_end|>", "\n",
                                                         "SELECT name;", "?"])),
                    max_size=5).map("".join)


@st.composite
def _conversation(draw):
    turns = draw(st.integers(1, 3))
    chat = [{"role": "system", "content": draw(_CONTENT)}] if draw(st.booleans()) else []
    for _ in range(turns):
        chat.append({"role": "user", "content": draw(_CONTENT)})
        chat.append({"role": "assistant", "content": draw(_CONTENT)})
    return chat


@settings(deadline=None, derandomize=True, max_examples=150)
@given(_conversation())
def test_the_assistant_mask_covers_each_answer_and_its_end_of_turn_only(tok, chatml, chat):
    for t, end in ((tok, EOS), (chatml, "<|im_end|>")):
        ids, mask = t.render_chat(chat)
        assert len(mask) == len(ids) and set(mask) <= {0, 1}
        assert t.decode(ids, skip_special=False) == t._render(chat, False)
        want = "".join(m["content"] + end for m in chat if m["role"] == "assistant")
        got = masked_text(t, ids, mask)
        # BPE may merge the template's whitespace with a content's edge (one token spans
        # both), so only whitespace may differ.
        assert "".join(got.split()) == "".join(want.split()), (chat, got, want)
        # One end-of-turn token learned per answer: typed ones are text, others template's.
        end_id = t.hf.token_to_id(end)
        assert sum(m for i, m in zip(ids, mask) if i == end_id) == \
            sum(m["role"] == "assistant" for m in chat)


def test_a_continuation_whose_seam_splits_a_character_is_decoded_alone(tok):
    """Where the prompt ends inside a character (its first byte), the prompt's text is no
    prefix of the whole: the continuation is decoded alone, its own half of the character a
    U+FFFD, not the whole's text less as many characters as the prompt's (which lost it)."""
    prompt = tok.encode("hi") + [tok._byte_token(0xC3)]
    ids = [tok._byte_token(0xA9)] + tok.encode(" there")
    assert tok.decode(prompt + ids) == "hi\u00e9 there"
    assert tok.decode_continuation(prompt, ids) == tok.decode(ids) == "\ufffd there"
    assert tok.decode_continuation(tok.encode("hi"), tok.encode(" there")) == " there"


@settings(deadline=None, derandomize=True, max_examples=200)
@given(st.one_of(_TEXT, _conversation().map(lambda chat: chat[:-1])),
       st.lists(st.integers(0, 10**6), max_size=12), st.booleans())
def test_a_byte_level_response_is_its_plain_decode_after_any_prompt(tok, chatml, prompt, draws,
                                                                     cut):
    """gptlab's byte-level BPE (what the demo samples with) and ChatML write nothing between
    the generation prompt and an answer, and a byte-level decode does not depend on the text
    before it: a response decoded after its prompt is the bytes `decode` (or `decode_cut`)
    wrote before, random ids and special tokens included."""
    from gptlab.data.instruct import encode_prompt

    for t in (tok, chatml):
        ids = [d % t.vocab_size for d in draws]
        plain = t.decode_cut(ids) if cut else t.decode(ids)
        assert t.decode_response(prompt, encode_prompt(t, prompt), ids, cut=cut) == plain


_SPM_LINES = ["the capital is paris", "yes it is", "is the cat happy?", "no it is not"]
# Zephyr's (TinyLlama's) layout: the answer right after "<|assistant|>\n", no space between.
ZEPHYR_CHAT = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token "
               "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
               "{% endif %}")


def llama2_style_bpe(lines, vocab_size: int) -> tuple[tokenizers.Tokenizer, list[tuple]]:
    """Llama 2's tokenizer.json in small, and its merges: byte-fallback BPE over <unk> <s> </s>
    and the 256 byte tokens, "▁" prepended and standing for spaces (the normalizer), a decoder
    that drops the text's first space; pieces learned from `lines`."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers

    learner = tokenizers.Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    learner.train_from_iterator(list(lines) * 4, trainers.BpeTrainer(vocab_size=vocab_size,
                                                                     show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    merges = [tuple(m) for m in learned["merges"]]
    pieces = sorted(t for t in learned["vocab"] if len(t) == 1) + list(
        dict.fromkeys("".join(m) for m in merges))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    hf = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                         merges=merges, unk_token="<unk>", fuse_unk=True,
                                         byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                          normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in ("<unk>", "<s>", "</s>")])
    return hf, merges


def sentencepiece_tokenizer(chat_template: str | None = None) -> Tokenizer:
    """A tiny Llama 2 tokenizer (`llama2_style_bpe`) whose pieces come from a few lines
    ("▁yes", "▁paris" are one each)."""
    hf, _ = llama2_style_bpe(_SPM_LINES, 120)
    return Tokenizer(hf, "<s>", "</s>", None, chat_template=chat_template)


def test_a_sentencepiece_response_decodes_to_the_text_that_encodes_back_to_it():
    """Decoded alone, SentencePiece drops the space its first "▁" stands for (as
    transformers' LlamaTokenizer decodes it). After a text prompt the space is the model's: a
    completion is the continuation of the prompt's text. After Llama 2's "[/INST]" it is the
    template's " " before the answer. After Zephyr's "<|assistant|>\n", where the template
    writes nothing, the space is the model's: decoded alone, "yes" would render back as "yes"."""
    from gptlab.data.instruct import encode_prompt, encode_response

    chat = [{"role": "user", "content": "is the cat happy?"}]
    for template, prompt, answer, want in (
            (None, "the capital is", " paris", " paris"),
            (LLAMA2_CHAT, chat, "yes it is", "yes it is "),  # its " " before </s> stays
            (ZEPHYR_CHAT, chat, " yes it is", " yes it is")):
        t = sentencepiece_tokenizer(template)
        start = encode_prompt(t, prompt)
        ids = encode_response(t, answer, prompt)
        assert t.hf.id_to_token(ids[0]) in ("\u2581paris", "\u2581yes")
        text = t.decode_response(prompt, start, ids)
        assert text == want and encode_response(t, text, prompt) == ids
        # cut at max_new_tokens inside a character: no U+FFFD for its first byte
        assert t.decode_response(prompt, start, ids[:-1] + [t._byte_token(0xE2)],
                                 cut=True) == want
    assert sentencepiece_tokenizer(ZEPHYR_CHAT).decode(ids) == "yes it is"
    assert sentencepiece_tokenizer(LLAMA2_CHAT).answer_lead(chat) == " "


def _metaspace_tokenizer() -> Tokenizer:
    """`sentencepiece_tokenizer`'s vocabulary as Mistral's (or Llama's with legacy off)
    tokenizer.json writes it: a Metaspace pre-tokenizer puts the "▁" first, no normalizer."""
    from tokenizers import decoders, pre_tokenizers
    hf = tokenizers.Tokenizer.from_str(sentencepiece_tokenizer().hf.to_str())
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first", split=False),
                                    decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(hf, "<s>", "</s>", None)


@pytest.mark.parametrize("make", [sentencepiece_tokenizer, _metaspace_tokenizer])
def test_a_completion_is_encoded_as_the_continuation_of_its_text_prompt(make):
    """A completion was encoded alone: SentencePiece put a "▁" before it, so TRL's " paris"
    after "the capital is" trained "▁", "▁paris" (a lone "▁" the model never writes before a
    word) and "paris" trained "▁paris" as well. Now, as TRL tokenizes it, it is what the prompt
    and completion encoded as one text hold after the prompt's tokens, and `decode_response`
    reads it back; where the prompt's last characters merge with the completion's first, the
    prompt's own tokens stay and the completion follows with no "▁" before it."""
    from gptlab.data.instruct import encode_prompt, encode_response
    t = make()
    assert t.prefixes_space

    def pieces(ids):
        return [t.hf.id_to_token(i) for i in ids]

    for prompt, completion, want in (
            ("the capital is", " paris", ["\u2581paris"]),
            ("the capital is", "paris", ["par", "is"]),  # glued on: "isparis", as written
            ("the capital is", " yes it is", ["\u2581yes", "\u2581it", "\u2581is"]),
            ("the capital is ", " paris", ["\u2581paris"]),  # the prompt's "▁" is its own
            ("the capital i", "s paris", ["s", "\u2581paris"]),  # "▁is" merged across the seam
            ("the capital is ", "paris", ["par", "is"]),  # its "▁", then "paris" glued on
            ("the capital i", "s </s>",  # typed, "</s>" is text there too
             ["s", "\u2581", "<0x3C>", "<0x2F>", "s", "<0x3E>"]),
            ("is the cat happy?", "\n yes", ["<0x0A>", "\u2581yes"])):
        start = encode_prompt(t, prompt)
        ids = encode_response(t, completion, prompt)
        assert pieces(ids) == want + ["</s>"], (prompt, completion)
        assert t.decode_response(prompt, start, ids) == completion
        assert t.decode_response(prompt, start, ids) == t.decode_continuation(start, ids)
        whole = t.encode(prompt + completion, bos=True)
        if whole[:len(start)] == start:  # TRL's tokens where the prompt's begin the whole
            assert start + ids == whole + [t.eos_id]
        else:  # the model given the prompt's tokens writes the text all the same
            assert t.decode(start + ids) == prompt + completion


def test_which_tokenizers_put_a_space_before_a_text(tmp_path):
    """SentencePiece's "▁" before a text, by a normalizer (Llama 2, a llama GGUF) or a Metaspace
    pre-tokenizer (Mistral); byte-level BPE, byte fallback without it and a llama GGUF with
    add_space_prefix false (Gemma's way) put none, and keep encoding a completion alone."""
    from tokenizers import normalizers
    spm = sentencepiece_tokenizer()
    bare = tokenizers.Tokenizer.from_str(spm.hf.to_str())
    bare.normalizer = normalizers.Replace(" ", "\u2581")
    byte_level = train_tokenizer(["the capital is paris"] * 20, vocab_size=280)
    expected = [(spm, True), (_metaspace_tokenizer(), True), (byte_level, False),
                (_byte_fallback_tokenizer(), False), (Tokenizer(bare, "<s>", "</s>", None), False)]
    for t, prefixes in expected:
        assert t.prefixes_space is prefixes
        ids = t.encode_completion("the capital i", "s paris")
        assert (ids == t.encode("s paris")) is not prefixes
        if prefixes:  # the copy that puts no "▁" first, as `bare` encodes
            assert t._unprefixed.encode("s paris").ids == bare.encode("s paris").ids == ids


# A message holding special-token text: "<tool>" is a special token of `ours`, no token of the
# directory transformers reads, where it is text as it is in gptlab.
_TYPED_CHATS = [
    [{"role": "user", "content": "is the <tool> cat happy?"},
     {"role": "assistant", "content": "yes <tool>it is"}],
    [{"role": "system", "content": "the cat"}, {"role": "user", "content": "<tool>is it happy?"},
     {"role": "assistant", "content": "<tool> yes"}, {"role": "user", "content": "no it is<tool>"}],
    [{"role": "user", "content": "is the cat happy?"},
     {"role": "assistant", "content": "yes it is"}, {"role": "user", "content": "<tool>"}],
]


@pytest.mark.parametrize("make", [sentencepiece_tokenizer, _metaspace_tokenizer])
@pytest.mark.parametrize("template", [LLAMA2_CHAT, ZEPHYR_CHAT], ids=["llama2", "zephyr"])
def test_a_sentencepiece_chat_holding_special_token_text_has_transformers_tokens(make, template,
                                                                                 tmp_path):
    """transformers renders the template and encodes the text once, split at special tokens:
    each run between them gets the "▁" the tokenizer puts after a special token (Llama 2's
    normalizer: one each; a Metaspace that prepends first: only at the text's start), and BPE
    merges across content edges ("[INST] " + "is" is "▁is"). gptlab tokenized such a
    conversation's contents apart, each with a "▁" of its own ("▁", "▁is"; "▁", "▁", "[/INST]"
    after it). Now its tokens and mask are transformers' where the typed text is no special
    token; where transformers parses it, gptlab keeps it text, with no "▁" after it."""
    pytest.importorskip("transformers")
    base = Tokenizer(make().hf, "<s>", "</s>", None, chat_template=template)
    base.save(tmp_path / "text")
    theirs = auto_tokenizer(tmp_path / "text")
    hf = tokenizers.Tokenizer.from_str(base.hf.to_str())
    hf.add_special_tokens([tokenizers.AddedToken("<tool>", special=True, normalized=False)])
    ours = Tokenizer(hf, "<s>", "</s>", None, chat_template=template)
    ours.save(tmp_path / "special")
    parsing = auto_tokenizer(tmp_path / "special")
    tool = hf.token_to_id("<tool>")
    for chat in _TYPED_CHATS:
        for gen in (False, True):
            want = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen,
                                              return_dict=False)
            ids, mask = ours.render_chat(chat, add_generation_prompt=gen)
            assert ids == list(want), (chat, gen)
            assert (ids, mask) == base.render_chat(chat, add_generation_prompt=gen)
            assert tool in parsing.apply_chat_template(chat, tokenize=True, return_dict=False)
    # The template's own end of turn typed: text, and the words after it go on with no "▁"
    # ("it", where transformers starts a new run after its "</s>": "▁it" or, Mistral's, "it").
    chat = [{"role": "user", "content": "is the cat happy?"},
            {"role": "assistant", "content": "yes </s>it is"}]
    ids, mask = ours.render_chat(chat)
    answer = [hf.id_to_token(i) for i, m in zip(ids, mask) if m]
    typed = ["<0x3C>", "<0x2F>", "s", "<0x3E>"]
    assert answer == ["\u2581yes" if template == LLAMA2_CHAT else "yes", "\u2581", *typed, "it",
                      "\u2581is", *(["\u2581"] if template == LLAMA2_CHAT else []), "</s>"]


# A tokenizer_config.json naming LlamaTokenizer: where transformers 5's ids differ from
# tokenizer.json's as written (which gptlab reads), by its legacy and add_prefix_space.
_T5_CASES = [  # (tokenizer.json, config fields, model type, where the ids differ)
    (sentencepiece_tokenizer, {"legacy": False}, None, {"special", "space"}),  # Llama 2's own
    (sentencepiece_tokenizer, {}, None, {"special", "space"}),  # no legacy: taken as false
    (sentencepiece_tokenizer, {"legacy": False}, "llama", {"special", "space"}),
    (sentencepiece_tokenizer, {"legacy": True}, None, {"space"}),
    (sentencepiece_tokenizer, {"add_prefix_space": False}, None, {"special", "space", "first"}),
    (sentencepiece_tokenizer, {"legacy": False}, "mistral", set()),  # read as written there
    (_metaspace_tokenizer, {"legacy": False}, None, set()),  # Mistral's, a transformers 5 save
    (_metaspace_tokenizer, {"legacy": True}, None, {"special"}),
]
_T5_PROBES = {"special": "</s>yes", "space": " yes", "first": "yes"}


@pytest.mark.parametrize("make,fields,model_type,differ", _T5_CASES)
def test_a_llama_tokenizer_class_notes_where_transformers_5_encodes_it_otherwise(
        make, fields, model_type, differ, tmp_path, capsys):
    """transformers 5 builds a LlamaTokenizer from tokenizer.json's vocabulary with a Metaspace of
    its own (legacy false or absent: no "▁" after a special token, Llama 2's "<s>[INST]" is "<s>",
    "["; and none added before a leading space), not the file's normalizer, which gptlab and
    transformers 4 read. gptlab keeps the file's tokens and said nothing; now it notes, once,
    where transformers 5's ids differ from its own, exactly where they do."""
    pytest.importorskip("transformers")
    d = tmp_path / "tok"
    Tokenizer(make().hf, "<s>", "</s>", None, chat_template=LLAMA2_CHAT).save(d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {**config, "tokenizer_class": "LlamaTokenizer", **fields}))
    if model_type:
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    capsys.readouterr()
    ours = load_tokenizer(d)
    err = capsys.readouterr().err
    assert ("note:" in err) is bool(differ)
    for k, phrase in (("special", "after a special token"), ("space", "starts with a space"),
                      ("first", "first word")):
        assert (phrase in err) is (k in differ), (k, err)
    if differ:
        assert f"{d / 'tokenizer_config.json'}, field 'tokenizer_class'" in err
    if transformers_major() < 5:
        # transformers 4 reads tokenizer.json as written, as gptlab does (the note is about 5),
        # but builds a LlamaTokenizer given add_prefix_space from a tokenizer.model, which
        # this directory has not (4.57: a ValueError, "Cannot instantiate ... from a slow").
        if "add_prefix_space" in fields:
            with pytest.raises((ValueError, ImportError)):  # ImportError without protobuf
                auto_tokenizer(d)
            load_tokenizer(d)
            assert capsys.readouterr().err == ""
            return
        differ = set()
    theirs = auto_tokenizer(d)
    measured = {k for k, text in _T5_PROBES.items()
                if ours._encode_markup(text) != theirs(text, add_special_tokens=False)["input_ids"]}
    assert measured == differ
    chats = [[{"role": "user", "content": "is the cat happy?"}],
             [{"role": "system", "content": "the cat"}, {"role": "user", "content": "is it?"},
              {"role": "assistant", "content": "yes it is"}, {"role": "user", "content": "no"}]]
    rendered = [(ours.render_chat(c, add_generation_prompt=True)[0],
                 list(theirs.apply_chat_template(c, tokenize=True, add_generation_prompt=True,
                                                 return_dict=False))) for c in chats]
    # Llama 2's template puts text after <s> only: its ids differ where text after a special
    # token does.
    assert all(a == b for a, b in rendered) is ("special" not in differ and "first" not in differ)
    load_tokenizer(d)
    assert capsys.readouterr().err == ""  # once per process


def test_a_llama_tokenizer_saved_by_transformers_5_encodes_as_transformers_5(tmp_path, capsys):
    """How README says to get transformers 5's ids for Llama 2's tokenizer.json with legacy false:
    save it with transformers 5 and copy the tokenizer.json it writes, which holds its Metaspace,
    over the directory's; gptlab reads that as written, with no note, and its ids and chats are
    transformers 5's (<s>, "[" in a chat)."""
    if transformers_major() < 5:
        pytest.skip("transformers 4 saves tokenizer.json as it read it, with no Metaspace of 5's")
    d = tmp_path / "llama2"
    Tokenizer(sentencepiece_tokenizer().hf, "<s>", "</s>", None,
              chat_template=LLAMA2_CHAT).save(d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {**config, "tokenizer_class": "LlamaTokenizer", "legacy": False}))
    theirs = auto_tokenizer(d)
    theirs.save_pretrained(str(tmp_path / "saved"))
    shutil.copy(tmp_path / "saved" / "tokenizer.json", d / "tokenizer.json")
    capsys.readouterr()
    ours = load_tokenizer(d)
    assert capsys.readouterr().err == ""
    again = auto_tokenizer(d)  # the same ids from it
    for text in ["yes it is", " yes", "  two  spaces", "a\nb", ""]:
        want = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == want == again(text, add_special_tokens=False)["input_ids"]
    chat = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "is it?"},
            {"role": "assistant", "content": "yes it is"}, {"role": "user", "content": "no"}]
    ids, _ = ours.render_chat(chat, add_generation_prompt=True)
    assert ids == list(theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=True,
                                                  return_dict=False))
    assert ours.hf.id_to_token(ids[1]) == "<0x5B>"  # "[" right after <s>, no "▁" before it


def _random_chats(rng, markup: list[str], n: int) -> list[list[dict]]:
    """`n` conversations whose contents mix text, whitespace and special-token text."""
    text = ["a", "SELECT", " x", "name;", "?", "\n", "\n\n", " ", "  ", "\t", "é", "学生", "🙂"]

    def content() -> str:
        return "".join(rng.choice(markup if rng.random() < 0.08 else text)
                       for _ in range(rng.randint(0, 5)))
    chats = []
    for _ in range(n):
        roles = ["system"] * (rng.random() < 0.3) + ["user", "assistant"] * rng.randint(1, 3)
        chats.append([{"role": r, "content": content()}
                      for r in roles[:len(roles) - (rng.random() < 0.3)]])
    return chats


def test_a_save_names_the_unknown_token_only_where_the_vocabulary_has_it(tmp_path):
    from tokenizers import models

    spm = _byte_fallback_tokenizer()  # BPE's unk_token "<unk>", token 256
    spm.save(tmp_path / "spm")
    config = json.loads((tmp_path / "spm" / "tokenizer_config.json").read_text())
    assert config["unk_token"] == "<unk>" and load_tokenizer(tmp_path / "spm").vocab_size == 259
    # a BPE that names an <unk> it lacks: transformers would add it as a new token
    hf = tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "</s>": 1}, merges=[],
                                         unk_token="<unk>"))
    Tokenizer(hf, bos_token=None, eos_token="</s>", pad_token=None).save(tmp_path / "bpe")
    assert "unk_token" not in json.loads((tmp_path / "bpe" / "tokenizer_config.json").read_text())


def test_a_saved_generation_config_names_the_ids_config_json_names(tok, tmp_path):
    """bos_token_id is the BOS token's id though the model is trained without BOS first (as
    export_hf's config.json writes it), pad_token_id the pad token's, not EOS."""
    end = tok.hf.token_to_id(USER)
    ours = Tokenizer(tok.hf, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                     chat_template=GPTLAB_CHAT_TEMPLATE, add_bos=False, end_ids=[end])
    ours.save(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "generation_config.json").read_text()) == {
        "bos_token_id": tok.hf.token_to_id(BOS), "eos_token_id": [tok.eos_id, end],
        "pad_token_id": tok.hf.token_to_id(PAD)}
    assert len({tok.hf.token_to_id(t) for t in (BOS, EOS, PAD, USER)}) == 4
    with pytest.raises(UserError) as e:  # one past the vocabulary: no id of it
        Tokenizer(tok.hf, bos_token=BOS, eos_token=EOS, pad_token=PAD, end_ids=[tok.vocab_size])
    assert str(e.value) == (f"field 'eos_token_id': {tok.vocab_size} is not a token id of this "
                            f"vocabulary (0 to {tok.vocab_size - 1})")


def test_generation_config_ends_at_the_edges(plain, tmp_path, capsys):
    """Its one end is the EOS where no config names one, even a name gptlab does not know as an
    end; the id one past the vocabulary is noted, not a load that fails; true is no id."""
    n = plain.vocab_size  # <|im_start|> n, <|stop|> n + 1
    d = hf_dir(plain, tmp_path, added=[("<|im_start|>", True), ("<|stop|>", False)],
               generation={"eos_token_id": n + 1})
    (d / "tokenizer_config.json").unlink()
    assert (load_tokenizer(d).eos_token, load_tokenizer(d).stop_ids) == ("<|stop|>", {n + 1})
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [n + 1, n + 2]}))
    capsys.readouterr()
    assert load_tokenizer(d).stop_ids == {n + 1}
    assert capsys.readouterr().err == (
        f"note: {d / 'generation_config.json'}, field 'eos_token_id[1]': {n + 2} is not a token "
        f"id of tokenizer.json (0 to {n + 1}); generation does not stop at it\n")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": True}))
    with pytest.raises(UserError) as e:
        load_tokenizer(d)
    assert str(e.value) == (f"{d / 'generation_config.json'}, field 'eos_token_id': must be a "
                            f"token id (an integer) or a list of them, got True")


def test_added_tokens_decoder_entries_that_name_no_special_token(plain, tmp_path, capsys):
    """An entry without "special" is not special (transformers' AddedToken default): <tool>
    decodes as written. A special entry the vocabulary lacks is noted once (here it is in
    additional_special_tokens too) and added to nothing: the vocabulary keeps its size."""
    n = plain.vocab_size  # <tool> n
    d = hf_dir(plain, tmp_path, {
        "added_tokens_decoder": {str(n): {"content": "<tool>"},
                                 str(n + 1): {"content": "<|eot_id|>", "special": True}},
        "additional_special_tokens": ["<|eot_id|>"]}, added=[("<tool>", False)])
    capsys.readouterr()
    ours = load_tokenizer(d)
    assert capsys.readouterr().err == (
        f"note: {d / 'tokenizer_config.json'}, field 'additional_special_tokens[0]': "
        f"'<|eot_id|>' is not in the vocabulary of tokenizer.json; it is read as text, not as "
        f"a special token\n")
    assert ours.vocab_size == n + 1 and ours.decode([n]) == "<tool>"
    assert ours.decode(ours.encode("a<|eot_id|>b")) == "a<|eot_id|>b"


def test_a_llama_tokenizer_without_eos_is_not_said_to_differ_after_a_special_token(tmp_path,
                                                                                  capsys):
    """With no EOS named, the probe "after a special token" was the text "Nonea": under
    add_prefix_space false it differed as any first word does, and the note claimed a
    difference after a special token it had not looked at. Only the probes it can make count."""
    from gptlab.tokenizer import _note_transformers5_rebuild
    config_file = tmp_path / "tokenizer_config.json"
    capsys.readouterr()
    _note_transformers5_rebuild(sentencepiece_tokenizer().hf,
                                {"tokenizer_class": "LlamaTokenizer", "add_prefix_space": False},
                                config_file, tmp_path / "tokenizer.json", None)
    err = capsys.readouterr().err
    assert f"{config_file}, field 'tokenizer_class'" in err and "first word" in err
    assert "after a special token" not in err


def test_a_continuation_gets_no_bos_from_a_post_processor_that_adds_one():
    # Llama 2's tokenizer.json adds "<s>" in its post-processor; a continuation, like `encode`,
    # holds only the text's tokens.
    from tokenizers import processors
    hf = sentencepiece_tokenizer().hf
    hf.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                      special_tokens=[("<s>", 1)])
    t = Tokenizer(hf, "<s>", "</s>", None)
    assert [t.hf.id_to_token(i) for i in t.encode_continuation("paris")] == ["par", "is"]
    assert [t.hf.id_to_token(i) for i in t.encode_completion("the capital i", "s paris")] == \
        ["s", "\u2581paris"]


def test_a_response_keeps_its_text_where_it_does_not_begin_with_the_template_s_lead():
    # Llama 2's template writes " " after "[/INST]": a response that starts without it ("yes"
    # glued on) loses no character of its own; a byte-level tokenizer with that template has
    # the lead taken off as SentencePiece's has.
    from gptlab.data.instruct import encode_prompt, encode_response
    chat = [{"role": "user", "content": "is the cat happy?"}]
    t = sentencepiece_tokenizer(LLAMA2_CHAT)
    start = encode_prompt(t, chat)
    assert t.decode_response(chat, start, t.encode_continuation("yes it is")) == "yes it is"
    byte_level = Tokenizer(train_tokenizer(["the capital is paris, yes it is"] * 20,
                                           vocab_size=300).hf, BOS, EOS, None,
                           chat_template=LLAMA2_CHAT)
    ids = encode_response(byte_level, "yes it is", chat)
    assert byte_level.decode(ids) == " yes it is "
    assert byte_level.decode_response(chat, encode_prompt(byte_level, chat), ids) == "yes it is "


def test_no_answer_lead_where_the_answered_conversation_does_not_begin_with_the_prompt():
    # The generation prompt ("A:") is not what the template writes before an answer
    # ("ASSISTANT: "), or the template writes no answer at all: no text is the lead.
    chat = [{"role": "user", "content": "is the cat happy?"}]
    users = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + "
             "'\\n' }}")
    other_header = (users + "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}"
                    "{% endfor %}{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
    no_answer = (users + "{% endif %}{% endfor %}{% if add_generation_prompt %}"
                 "{{ 'ASSISTANT: ' }}{% endif %}")
    for template in (other_header, no_answer):
        assert sentencepiece_tokenizer(template).answer_lead(chat) == ""


def test_an_lstrip_end_of_turn_that_took_a_content_s_space_is_the_template_s_in_runs():
    # An lstrip "</s>" after "yes it is " takes the answer's last space into its offsets: it is
    # still the template's end of turn, one token, not special-token text typed in the answer.
    hf = tokenizers.Tokenizer.from_str(sentencepiece_tokenizer().hf.to_str())
    hf.add_special_tokens([tokenizers.AddedToken("</s>", special=True, normalized=False,
                                                 lstrip=True),
                           tokenizers.AddedToken("<tool>", special=True, normalized=False)])
    t = Tokenizer(hf, "<s>", "</s>", None, chat_template=ZEPHYR_CHAT)
    chat = [{"role": "user", "content": "is the <tool> cat happy?"},
            {"role": "assistant", "content": "yes it is "}]
    ids, mask = t.render_chat(chat)
    assert [hf.id_to_token(i) for i, m in zip(ids, mask) if m] == \
        ["yes", "\u2581it", "\u2581is", "</s>"]
    assert ids.count(hf.token_to_id("</s>")) == 2


def test_a_byte_level_tokenizer_named_llama_tokenizer_gets_no_transformers_5_note(tmp_path,
                                                                                  capsys):
    # transformers 5 reads a ByteLevel tokenizer.json as written, whatever class it is given.
    d = tmp_path / "tok"
    train_tokenizer(["the capital is paris, yes it is"] * 20, vocab_size=300).save(d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {**config, "tokenizer_class": "LlamaTokenizer", "legacy": False}))
    capsys.readouterr()
    load_tokenizer(d)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("cls, fields, why", [
    ("LlamaTokenizerFast", {"legacy": False}, "legacy false"),
    ("LlamaTokenizer", {}, "no legacy, which transformers 5 takes as false")])
def test_the_note_names_the_class_and_why_its_space_rule_is_transformers_5_s(cls, fields, why,
                                                                             tmp_path, capsys):
    d = tmp_path / "tok"
    Tokenizer(sentencepiece_tokenizer().hf, "<s>", "</s>", None).save(d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("legacy", None)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {**config, "tokenizer_class": cls, **fields}))
    capsys.readouterr()
    load_tokenizer(d)
    assert (f"note: {d / 'tokenizer_config.json'}, field 'tokenizer_class': {cls} ({why}): "
            f"transformers 5 builds this class") in capsys.readouterr().err


def test_a_model_config_that_cannot_be_read_leaves_the_note_to_the_model_s_loader(tmp_path,
                                                                                    capsys):
    d = tmp_path / "tok"
    Tokenizer(sentencepiece_tokenizer().hf, "<s>", "</s>", None).save(d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {**config, "tokenizer_class": "LlamaTokenizer", "legacy": False}))
    (d / "config.json").write_text("{not json")
    capsys.readouterr()
    load_tokenizer(d)
    assert capsys.readouterr().err == ""


def _byte_level_bpe(pipeline: str) -> tokenizers.Tokenizer:
    """A byte-level BPE learned as GPT-2's, SmolLM's (every digit split off first), Qwen2's
    (NFC, its split) or Llama 3's (its split, ignore_merges) tokenizer.json are."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    from gptlab.tokenizer import _QWEN2_SPLIT
    llama3 = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = {"gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False),
             "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)]),
             "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT),
                                                                    "isolated"), byte_level]),
             "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), "isolated"),
                                                byte_level])}[pipeline]
    hf = tokenizers.Tokenizer(models.BPE(ignore_merges=pipeline == "llama3"))
    hf.pre_tokenizer = split
    if pipeline == "qwen2":
        hf.normalizer = normalizers.NFC()
    hf.decoder = decoders.ByteLevel()
    lines = ["hello world 12345 and 2024\n\n1. first", "le caf\u00e9 cafe\u0301 na\u00efve",
             "it's the   answer 42", "select name from users;", "\n\n2. second item"] * 20
    hf.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return hf


def test_probe_texts_are_listed_so_that_texts_that_look_alike_differ():
    from gptlab.tokenizer import listed_probes
    assert listed_probes(["caf\u00e9 cafe\u0301", "\n\n1. first", " it's"]) == (
        "'caf\\xe9 cafe\\u0301', '\\n\\n1. first', \" it's\"")


@pytest.mark.parametrize("pipeline, model_type, cls, noted", [
    # SmolLM's directories: transformers 5 drops the digit split ("\n\n1." is "\n", "\n", ...).
    ("smollm", "llama", "GPT2Tokenizer", "tokenizer_config.json"),
    ("qwen2", None, "GPT2TokenizerFast", "tokenizer_config.json"),
    # A qwen2 model gets Qwen2's pipeline whatever class it names (gptlab's own export names
    # PreTrainedTokenizerFast).
    ("gpt2", "qwen2", "PreTrainedTokenizerFast", "config.json"),
    ("llama3", "qwen2", None, "config.json"),
    # Read as written: the file is the class's own pipeline, or the class is read as written.
    ("gpt2", "gpt2", "GPT2Tokenizer", None),
    ("gpt2", "gpt2", None, None),
    ("qwen2", "qwen2", "Qwen2Tokenizer", None),
    ("llama3", "llama", "PreTrainedTokenizerFast", None),
    ("smollm", "mistral", "GPT2Tokenizer", None),
])
def test_byte_level_classes_transformers_5_rebuilds_are_noted_where_its_ids_differ(
        pipeline, model_type, cls, noted, tmp_path, capsys):
    """transformers 5 builds GPT2Tokenizer and Qwen2Tokenizer (every model_type qwen2's) from
    tokenizer.json's vocabulary and merges with its own normalizer and pre-tokenizer; gptlab
    reads the file as written, as transformers 4 does, and said nothing where 5's ids differ.
    The note names the probes where they differ, exactly those where transformers 5's do."""
    from gptlab.tokenizer import _BYTE_LEVEL_PROBES
    d = tmp_path / "tok"
    Tokenizer(_byte_level_bpe(pipeline), None, "<|endoftext|>", None).save(d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {**config, **({"tokenizer_class": cls} if cls else {})}))
    if model_type:
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    capsys.readouterr()
    ours = load_tokenizer(d)
    err = capsys.readouterr().err
    assert ("note:" in err) is (noted is not None), err
    if noted:
        assert err.startswith(f"note: {d / noted}, field "
                              f"'{'model_type' if noted == 'config.json' else 'tokenizer_class'}'")
        # The probes escaped: "caf\u00e9 cafe\u0301" printed by repr as two words alike.
        assert err.isascii(), err
    if transformers_major() >= 5:
        theirs = auto_tokenizer(d)
        measured = {text for text in _BYTE_LEVEL_PROBES
                    if ours.encode(text) != theirs(text, add_special_tokens=False)["input_ids"]}
        assert measured == {text for text in _BYTE_LEVEL_PROBES if ascii(text) in err}
        assert bool(measured) is (noted is not None)
    load_tokenizer(d)
    assert capsys.readouterr().err == ""  # once per process


def test_a_tokenizer_trains_on_texts_given_as_strings_and_refuses_what_is_none(tmp_path):
    from gptlab.tokenizer import train_tokenizer
    tok = train_tokenizer(["select name from staff", "", "select id from staff"], 300)
    assert tok.decode(tok.encode("select name")) == "select name"
    assert tok.vocab_size < 300  # two short texts hold fewer merges than asked
    (tmp_path / "c.txt").write_text("select name from staff\n", encoding="utf-8")
    assert train_tokenizer(str(tmp_path / "c.txt"), 300).encode("select name") \
        == train_tokenizer([tmp_path / "c.txt"], 300).encode("select name")
    for texts, said in (
            ([], "the corpus is empty: no paths or texts given"),
            (["", " \n"], "the corpus is empty: every text is empty"),
            (["a", 3], "field 'paths_or_texts': item 1 is of type int, expected a string"),
            (["a", "b\udc80"], "field 'paths_or_texts[1]': not UTF-8 text: byte 0x80 at "
                               "character 2 cannot be decoded")):
        with pytest.raises(UserError) as e:
            train_tokenizer(texts, 300)
        assert str(e.value) == said
    with pytest.raises(UserError) as e:
        train_tokenizer(["a"], 300, special_tokens=["<|bos|>"])
    assert str(e.value) == "field 'special_tokens': need at least BOS and EOS"
    with pytest.raises(UserError) as e:
        tok.encode(5)
    assert str(e.value) == "expected text, got int"


def test_a_text_ending_in_a_replacement_character_of_its_own_is_no_cut_character():
    """A vocabulary with no byte tokens (a word-level one) spells U+FFFD as a word of its own:
    no continuation byte can complete it, so a cut keeps it, and `decodes_apart` reads it as
    a character still open (it cannot tell), but an empty text as final."""
    from tokenizers import models, pre_tokenizers
    hf = tokenizers.Tokenizer(models.WordLevel({"a": 0, "\ufffd": 1, "</s>": 2},
                                               unk_token="</s>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    t = Tokenizer(hf, None, "</s>", None)
    assert t.encode("a \ufffd") == [0, 1]
    assert t.decode_cut([0, 1]) == t.decode([0, 1]) == "a \ufffd"
    assert t.decodes_apart([], 1) is True
    assert (t.decodes_apart([0], 0), t.decodes_apart([0, 1], 0)) == (True, False)


def test_a_template_that_cannot_render_the_prompt_or_the_answer_gives_no_lead():
    """Llama 2's template refuses two assistant turns in a row: after a conversation that ends
    with an answer there is no answer to render, so no text between prompt and answer (it was
    the template's UserError). A template that reads messages[0] cannot render the empty
    prompt before a greeting the assistant opens with: the greeting has no lead, and the chat
    still renders, each answer masked with its end of turn."""
    chat = [{"role": "user", "content": "is the cat happy?"},
            {"role": "assistant", "content": "yes it is"}]
    t = sentencepiece_tokenizer(LLAMA2_CHAT)
    assert t.answer_lead(chat[:1]) == " " and t.answer_lead(chat) == ""
    first = ("{% if messages[0]['role'] == 'system' %}{{ bos_token }}{% endif %}"
             + ZEPHYR_CHAT)
    t = sentencepiece_tokenizer(first)
    greeted = [{"role": "assistant", "content": "no it is not"}, *chat]
    ids, mask = t.render_chat(greeted)
    assert t.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == \
        "no it is not</s>yes it is</s>"
    assert ids == t.hf.encode(t._render(greeted, False), add_special_tokens=False).ids


def test_a_tokenizer_config_s_null_and_malformed_token_lists(plain, tmp_path, capsys):
    """additional_special_tokens and generation_config.json's eos_token_id null name none; an
    added_tokens_decoder that is no object is refused, naming its file and field."""
    d = hf_dir(plain, tmp_path, {"additional_special_tokens": None},
               added=[("<|im_end|>", False)], generation={"eos_token_id": None})
    t = load_tokenizer(d)
    # </s> and the template's end of turn, <|im_end|>
    assert (t.extra_special_tokens, t.end_ids, t.stop_ids) == ((), (), {1, plain.vocab_size})
    assert t.decode(t.encode("a<|im_end|>")) == "a<|im_end|>"
    d = hf_dir(plain, tmp_path, {"added_tokens_decoder": ["<|im_end|>"]})
    with pytest.raises(UserError) as e:
        load_tokenizer(d)
    assert str(e.value) == (f"{d / 'tokenizer_config.json'}, field 'added_tokens_decoder': "
                            f"must be an object of token id -> added token, got ['<|im_end|>']")


def test_a_tokenizer_without_a_known_end_or_a_named_bos_it_has_is_refused(tmp_path):
    """No config, no generation_config.json and no end gptlab knows by name: which token ends a
    sequence is the user's to say. A BOS the vocabulary lacks is refused with add_bos_token
    false as well (whether the post-processor starts with it is not asked of it)."""
    odd = train_tokenizer(CORPUS, vocab_size=300, special_tokens=["<a>", "<b>"])
    odd.hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'tokenizer_config.json'}, field 'eos_token': cannot "
                            f"tell the end-of-sequence token: add a tokenizer_config.json with "
                            f"eos_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<b>", "bos_token": "<s>", "add_bos_token": False}))
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'tokenizer_config.json'}, field 'bos_token': token "
                            f"'<s>' is not in the vocabulary of tokenizer.json")


def test_a_post_processor_s_bos_is_found_in_a_vocabulary_that_spells_no_probe(tmp_path,
                                                                              capsys):
    """A vocabulary that spells none of "a", "0", " ", "." encodes each to no ids: whether its
    post-processor starts sequences with BOS is read on the empty text, where it adds BOS."""
    from tokenizers import models, processors
    hf = tokenizers.Tokenizer(models.BPE({"<s>": 0, "</s>": 1, "b": 2}, merges=[]))
    hf.add_special_tokens(["<s>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "bos_token": "<s>", "add_bos_token": False}))
    assert load_tokenizer(tmp_path).bos_id is None  # no post-processor: as the config says
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf.save(str(tmp_path / "tokenizer.json"))
    capsys.readouterr()
    t = load_tokenizer(tmp_path)
    assert (t.bos_id, t.encode("bab", bos=True)) == (0, [0, 2, 2])
    assert "post-processor of tokenizer.json starts each sequence with '<s>'" in \
        capsys.readouterr().err


def test_a_word_level_tokenizer_named_gpt2_gets_no_byte_level_note(tmp_path, capsys):
    """transformers 5 rebuilds a GPT2Tokenizer from a BPE's vocabulary and merges; a word-level
    tokenizer.json has none to compare, so nothing is noted (was a comparison of two BPEs)."""
    from gptlab.tokenizer import byte_level_rebuild_differs
    from tokenizers import models, pre_tokenizers
    hf = tokenizers.Tokenizer(models.WordLevel({"</s>": 0, "hello": 1, "world": 2},
                                               unk_token="</s>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    assert byte_level_rebuild_differs(hf, "GPT2Tokenizer", {}) == ([], "")
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "tokenizer_class": "GPT2TokenizerFast"}))
    capsys.readouterr()
    assert load_tokenizer(tmp_path).encode("hello world") == [1, 2]
    assert capsys.readouterr().err == ""


def test_single_word_special_tokens_leave_llama_2_s_space_after_markup_as_it_is():
    """Whether a run of text after a markup token gets "▁" is read from how "<tok>a" encodes;
    special tokens that are single_word match only between non-word characters, so no token
    tells: Llama 2's normalizer (a "▁" before each stretch between special tokens) is then
    assumed, and a chat with special-token text typed in it has the whole rendered text's ids
    (no "▁": "[INST]" after "<s>" would be "<0x5B>" alone)."""
    raw = json.loads(sentencepiece_tokenizer().hf.to_str())
    for added in raw["added_tokens"]:
        added["single_word"] = True
    hf = tokenizers.Tokenizer.from_str(json.dumps(raw))
    t = Tokenizer(hf, "<s>", "</s>", None, chat_template=LLAMA2_CHAT)
    chat = [{"role": "user", "content": "is the cat<s>happy?"},
            {"role": "assistant", "content": "yes it is"}]
    ids, mask = t.render_chat(chat)
    text = "<s>[INST] is the cat<s>happy? [/INST] yes it is </s>"
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert [hf.id_to_token(i) for i in ids[:3]] == ["<s>", "\u2581", "<0x5B>"]
    assert t.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "yes it is </s>"


# --- what a tokenizer.json may carry that gptlab does not apply or cannot read ----------------

def _edited(tok: Tokenizer, tmp_path: Path, edit) -> Path:
    tok.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    edit(data)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    return tmp_path


def test_truncation_and_padding_saved_in_tokenizer_json_are_not_applied(tok, tmp_path):
    # Saved after enable_truncation / enable_padding (as HF files may be), they cut every text
    # to 5 tokens, or padded it, without a word: prompts, and SFT's answers, cut short.
    text = "the cat sat on the mat while the dog slept in the sun"
    whole = tok.encode(text)
    assert len(whole) > 8

    def settings(data):
        data["truncation"] = {"direction": "Right", "max_length": 5, "strategy": "LongestFirst",
                              "stride": 0}
        data["padding"] = {"strategy": {"Fixed": 40}, "direction": "Right",
                           "pad_to_multiple_of": None, "pad_id": tok.pad_id,
                           "pad_type_id": 0, "pad_token": "<|pad|>"}
    d = _edited(tok, tmp_path, settings)
    assert len(tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")).encode(text).ids) == 40
    loaded = load_tokenizer(d)
    assert loaded.encode(text) == whole and loaded.encode_batch([text, "cat"]) == [
        whole, tok.encode("cat")]
    assert loaded.hf.truncation is None and loaded.hf.padding is None


def test_a_token_id_given_twice_is_refused_and_a_skipped_id_counts_toward_the_vocabulary(
        tok, tmp_path):
    from gptlab.checkpoint import check_tokenizer_fits
    from gptlab.model import GPT, GPTConfig
    vocab = tok.hf.get_vocab()
    last = max(vocab, key=vocab.get)
    other = next(t for t, i in vocab.items() if i == vocab[last] - 1)

    def twice(data):
        data["model"]["vocab"][last] = vocab[last] - 1
    with pytest.raises(UserError) as e:  # a bare Exception from the Rust side, on first use
        load_tokenizer(_edited(tok, tmp_path / "twice", twice))
    assert str(e.value) == (f"{tmp_path / 'twice' / 'tokenizer.json'}, field 'model.vocab': "
                            f"token id {vocab[last] - 1} is given to two tokens, "
                            f"{min(last, other)!r} and {max(last, other)!r}")

    def skipped(data):  # the last id moved past the end: still as many tokens
        data["model"]["vocab"][last] = tok.vocab_size + 50
    gapped = load_tokenizer(_edited(tok, tmp_path / "gap", skipped))
    assert gapped.hf.get_vocab_size() == tok.vocab_size  # the count, which an IndexError hid
    assert gapped.vocab_size == tok.vocab_size + 51
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context=16, n_layers=1, n_heads=2,
                          d_model=16))
    with pytest.raises(UserError, match=f"tokenizer has {tok.vocab_size + 51} tokens but the "
                                        f"model's embedding has {tok.vocab_size} rows"):
        check_tokenizer_fits(model, gapped)


def test_a_tokenizer_json_with_a_byte_order_mark_reads_as_without(tok, tmp_path):
    # "not a valid tokenizer.json (expected value at line 1 column 1)": every other JSON file
    # gptlab reads drops the mark Notepad writes.
    tok.save(tmp_path)
    f = tmp_path / "tokenizer.json"
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    assert load_tokenizer(tmp_path).encode("the cat sat") == tok.encode("the cat sat")
    f.write_bytes(b"\xff" + f.read_bytes()[3:])
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == f"{f}: not UTF-8 text (byte offset 0)"
