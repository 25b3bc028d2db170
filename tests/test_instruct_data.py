"""The demonstrations and prompts readers: a bad record's error names file, line and field."""
import json

import pytest

from gptlab.data.instruct import read_demonstrations, read_prompts
from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer, train_tokenizer

import instruct_task as task


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    paths = task.write_task(tmp_path_factory.mktemp("task"), n=50)
    return train_tokenizer([paths["corpus"]], vocab_size=300)


def write(path, *rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


USER = {"role": "user", "content": "Is the cat happy?"}
ASSISTANT = {"role": "assistant", "content": "yes"}


def test_prompt_messages_must_end_on_a_user_turn(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    f = write(tmp_path / "p.jsonl", {"id": 1, "messages": [system, USER]},
              {"id": 2, "messages": [USER, ASSISTANT]})
    with pytest.raises(UserError) as err:  # a demonstration given as a prompt: its answer shown
        read_prompts(f)
    assert str(err.value) == f"{f}:2, field 'messages': must end on a user turn, not 'assistant'"
    write(f, {"id": 1, "messages": [USER, ASSISTANT, {"role": "user", "content": "And the dog?"}]})
    assert len(read_prompts(f)) == 1


@pytest.mark.parametrize("message,field,expected", [
    ({"role": "bot", "content": "hi"}, "messages[0].role", "message 0 has role 'bot'"),
    ({"role": "user", "content": 3}, "messages[0].content", "message 0 content must be a string"),
    ("hi", "messages[0]", "message 0 must be a mapping"),
])
@pytest.mark.parametrize("reader", ["demonstrations", "prompts"])
def test_a_bad_message_names_file_line_and_field(tok, tmp_path, reader, message, field, expected):
    f = write(tmp_path / "d.jsonl", {"prompt": "Is the dog happy?", "completion": " no"},
              {"messages": [message, USER, ASSISTANT][:3 if reader == "demonstrations" else 2]})
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 64) if reader == "demonstrations" else read_prompts(f)
    assert str(err.value).startswith(f"{f}:2, field '{field}': {expected}")
    assert (err.value.path, err.value.line, err.value.field) == (f, 2, field)


def test_a_chat_template_refusing_a_demonstration_names_file_and_line(tok, tmp_path):
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                   "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    strict = Tokenizer(tok.hf, tok.bos_token, tok.eos_token, tok.pad_token,
                       chat_template=alternating)
    f = write(tmp_path / "d.jsonl", {"messages": [USER, ASSISTANT]},
              {"messages": [USER, ASSISTANT, ASSISTANT]})
    with pytest.raises(UserError) as err:
        read_demonstrations(f, strict, 64)
    assert str(err.value) == (f"{f}:2, field 'chat_template': the chat template failed: "
                              "roles must alternate user/assistant")


def test_prompts_files_read_as_utf8_with_bom_and_crlf_and_refuse_other_bytes(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt": "caf\xc3\xa9?"}\r\n\r\n{"id": 2, "prompt": "b"}\r\n')
    assert [r["prompt"] for r in read_prompts(f)] == ["café?", "b"]
    f.write_bytes(b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "caf\xe9?"}\n')  # Latin-1
    with pytest.raises(UserError) as err:
        read_prompts(f)
    assert str(err.value) == (f"{f}:2: not UTF-8 text: byte 0xe9 at byte offset 49 cannot be "
                              "decoded; save the file as UTF-8")
    with pytest.raises(UserError, match="is a directory, not a file"):
        read_prompts(tmp_path)
