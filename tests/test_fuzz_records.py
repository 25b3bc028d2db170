"""Fuzzing the record readers: almost valid files, one field (or one line) wrong at a time.

Every reader a verb uses (`sft --data`, `sample`/`ppo --prompts`, `label --in`, `reward --data`
and `--samples`, `world score --in`) must read each file either cleanly, as the records say, or
refuse it with a UserError naming the file, the line and the field (exit 2): never a traceback,
and never a record skipped or read as something else without a word.
"""
import copy
import datetime
import decimal
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.data.instruct import read_demonstrations, read_prompts, read_rankings
from gptlab.errors import UserError
from gptlab.eval.execution import score_samples
from gptlab.feedback import label_samples
from gptlab.io import read_jsonl, without_nulls
from gptlab.tokenizer import train_tokenizer
from gptlab.train.reward import sample_sequences

import instruct_task as task

FUZZ = settings(deadline=None, derandomize=True, max_examples=60,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

USER = {"role": "user", "content": "Is the cat happy?"}
YES = {"role": "assistant", "content": "yes"}
NO = {"role": "assistant", "content": "no"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    paths = task.write_task(tmp_path_factory.mktemp("task"), n=50)
    return train_tokenizer([paths["corpus"]], vocab_size=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from gptlab.world import build_world
    return build_world(0, n_train=20, n_validation=5, n_test=10, n_dialogs=2,
                       corpus_chars=1000, db_path=tmp_path_factory.mktemp("db") / "c.sqlite")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# Each reader: how a verb calls it, its almost valid records, and what a clean read of
# `records` must give back (`check(result, records)`).

def _demonstrations(tok, world):
    def read(path):
        return read_demonstrations(path, tok, 512)

    def check(examples, records):
        assert [ex.line for ex in examples] == [r["_line"] for r in records]
        for ex, r in zip(examples, records):
            assert ex.id == r.get("id")
            trained = tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m])
            answers = ([m["content"] for m in r["messages"] if m["role"] == "assistant"]
                       if "messages" in r else [r["completion"]] if isinstance(
                           r["completion"], str) else [r["completion"][0]["content"]])
            for answer in answers:
                assert answer in trained
    return read, check, [{"id": "d1", "prompt": "Is the cat happy?", "completion": " yes"},
                         {"id": "d2", "messages": [USER, YES]},
                         {"prompt": [USER], "completion": [YES]}]


def _prompts(tok, world):
    def check(rows, records):
        assert [{k: v for k, v in row.items() if k != "_line"} for row in rows] == \
            [{k: v for k, v in r.items() if k != "_line"} for r in records]
    return read_prompts, check, [{"id": "p1", "prompt": "Is the cat happy?"},
                                 {"id": 7, "messages": [USER]}, {"prompt": [USER]}]


def _samples_labeled(tok, world):
    def read(path):
        from gptlab.data.instruct import SkipCounter
        skips = SkipCounter()
        rows = label_samples(read_jsonl(path), task.score, skips, path, SkipCounter())
        return rows, skips

    def check(result, records):
        rows, skips = result
        assert len(rows) + skips.total == len(records)  # each one ranked, or counted
        kept = iter(rows)
        for r in records:
            distinct = list(dict.fromkeys(x for x in r["responses"] if x.strip()))
            scores = {task.preference(x) for x in distinct}
            if len(distinct) < 2 or len(scores) < 2:
                continue
            row = next(kept)
            flat = [x for item in row["ranked"] for x in (item if isinstance(item, list)
                                                           else [item])]
            assert sorted(flat) == sorted(distinct) and row.get("id") == r.get("id")
    return read, check, [{"id": "s1", "prompt": "Is the cat happy?",
                          "responses": ["yes", "no", "yes yes"], "finished": [True, True, False]},
                         {"id": "s2", "messages": [USER], "responses": ["no", "yes"]}]


def _samples_for_reward(tok, world):
    def read(path):
        return sample_sequences(tok, path, 512)

    def check(seqs, records):
        assert len(seqs) == sum(len(r["responses"]) for r in records)
    return read, check, [{"id": "s1", "prompt": "Is the cat happy?", "responses": ["yes", "no"]},
                         {"messages": [USER], "responses": ["ok"]}]


def _rankings(tok, world):
    def check(rankings, records):
        assert [r.line for r in rankings] == [r["_line"] for r in records]
        for got, r in zip(rankings, records):
            if "ranked" in r:
                levels = [x if isinstance(x, list) else [x] for x in r["ranked"]]
            else:
                levels = [[x if isinstance(x, str) else x[-1]["content"]]
                          for x in (r["chosen"], r["rejected"])]
            assert got.ranked == [x for level in levels for x in level]
            assert got.groups == [i for i, level in enumerate(levels) for _ in level]
            assert got.id == r.get("id")
            if "prompt" in r or "messages" in r:
                assert got.prompt == r.get("prompt", r.get("messages"))
    return read_rankings, check, [
        {"id": "r1", "prompt": "Is the cat happy?", "ranked": ["yes", ["no", "ok"], "maybe"]},
        {"prompt": "Is the cat happy?", "chosen": "yes", "rejected": "no"},
        {"messages": [USER], "chosen": "yes", "rejected": "no"},
        {"prompt": [USER], "chosen": [YES], "rejected": [NO]},
        {"chosen": [USER, YES], "rejected": [USER, NO]}]


def _scored(tok, world):
    def read(path):
        return score_samples(world, path)

    def check(result, records):
        summary, verdicts = result
        assert summary["prompts"] == len(records) == len(verdicts)
        assert summary["responses"] == sum(len(r["responses"]) for r in records)
        assert [v["id"] for v in verdicts] == [r["id"] for r in records]
    q = world.test[0]
    return read, check, [{"id": q.id, "prompt": "q?", "responses": [q.sql, "SELECT 1"]},
                         {"id": world.test[1].id, "responses": ["SELEC nothing"]}]


READERS = {"sft --data": _demonstrations, "sample/ppo --prompts": _prompts,
           "label --in": _samples_labeled, "reward --samples": _samples_for_reward,
           "reward --data": _rankings, "world score --in": _scored}


@pytest.fixture(params=list(READERS))
def reader(request, tok, world):
    return READERS[request.param](tok, world)


def _paths(value, at=()):
    """The path of every value inside a record: ('messages', 0, 'content'), ..."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield at + (k,)
            yield from _paths(v, at + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield at + (i,)
            yield from _paths(v, at + (i,))


_GONE = object()  # a field left out

# What a field may become: each JSON type, empty ones, huge and non-finite numbers, text no
# tokenizer encodes, OpenAI's content parts, a list of one.
VALUES = st.one_of(
    st.sampled_from([0, -1, 1.5, True, False, None, "", " \n", "x", [], {}, [[]], ["x"], [1],
                     {"role": "user"}, {"a": 1}, [{"type": "text", "text": "hi"}], "\ud800",
                     _GONE]),
    st.integers(min_value=2 ** 63, max_value=10 ** 40), st.integers(max_value=-2 ** 63),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.text(max_size=4), st.lists(st.text(max_size=3), max_size=2))


def _named(path):
    """`path` as an error names a field: messages[0].content."""
    name = str(path[0])
    for p in path[1:]:
        name += f"[{p}]" if isinstance(p, int) else f".{p}"
    return name


@st.composite
def mutated(draw, bases):
    """(a base record index, the record with one value replaced or left out, its path)."""
    i = draw(st.integers(0, len(bases) - 1))
    record = copy.deepcopy(bases[i])
    path = draw(st.sampled_from(list(_paths(record))))
    value = draw(VALUES)
    holder = record
    for p in path[:-1]:
        holder = holder[p]
    if value is _GONE:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return i, record, path


def _outcome(read, check, path, records, bad_line, field=None, lines=(1, 2)):
    """`read(path)` gives what `records` (on `lines`) say, or a UserError naming `path`,
    `bad_line` and (for a value mutated) a field."""
    try:
        result = read(path)
    except UserError as e:
        assert e.path is not None and Path(e.path) == path, str(e)
        assert e.line == bad_line, str(e)
        assert str(e).startswith(f"{path}:{bad_line}"), str(e)
        if field is not None:  # the field, or the fields it says the line lacks
            assert e.field is not None or "'" in e.message, str(e)
        return "refused"
    rows = [without_nulls(r) for r in records]
    for n, r in zip(lines, rows):
        r["_line"] = n
    check(result, rows)
    return "read"


@FUZZ
@given(data=st.data())
def test_a_record_with_one_field_wrong_is_read_as_written_or_refused_naming_it(
        reader, scratch, data):
    read, check, bases = reader
    i, record, at = data.draw(mutated(bases))
    first = _other(bases, i)
    path = scratch / "f.jsonl"
    # NaN and Infinity: json writes them as the tokens, which are no JSON.
    path.write_text(json.dumps(first) + "\n" + json.dumps(record) + "\n")
    _outcome(read, check, path, [first, record], 2, _named(at))


def _other(bases, i):
    """A record for the line before base `i`'s: another one where there is another (`world
    score` refuses an id given twice)."""
    return bases[1] if i == 0 and len(bases) > 1 else bases[0]


LINE_FAULTS = ["bom", "bom-later", "truncated", "blank-lines", "not-an-object", "not-utf8",
               "repeated-key", "nested-repeated-key", "crlf", "no-final-newline", "array"]


@FUZZ
@given(data=st.data())
def test_a_file_with_one_line_wrong_is_read_as_written_or_refused_naming_the_line(
        reader, scratch, data):
    read, check, bases = reader
    i = data.draw(st.integers(0, len(bases) - 1))
    base, first = bases[i], _other(bases, i)
    fault = data.draw(st.sampled_from(LINE_FAULTS))
    good = json.dumps(first).encode()
    line = json.dumps(base).encode()
    bad_line, records, lines = 2, [first, base], (1, 2)
    if fault == "bom":
        raw = b"\xef\xbb\xbf" + good + b"\n" + line + b"\n"
        bad_line = None
    elif fault == "bom-later":  # two files joined, the second one Notepad's
        raw = good + b"\n\xef\xbb\xbf" + line + b"\n"
    elif fault == "truncated":  # a copy cut short
        raw = good + b"\n" + line[:data.draw(st.integers(1, len(line) - 1))]
    elif fault == "blank-lines":
        raw = b"\n" + good + b"\n \n\t\n" + line + b"\n\n"
        bad_line, lines = None, (2, 5)
    elif fault == "not-an-object":
        raw = good + b"\n" + data.draw(st.sampled_from([b"3", b'"x"', b"null", b"[1]", b"true"]))
    elif fault == "not-utf8":
        raw = good + b"\n" + line[:-1] + b', "note": "caf\xe9"}\n'
    elif fault == "repeated-key":
        key = data.draw(st.sampled_from(sorted(base)))
        raw = good + b"\n" + line[:-1] + b", " + json.dumps(key).encode() + b": \"x\"}\n"
    elif fault == "nested-repeated-key":
        raw = good + b"\n" + line[:-1] + b', "meta": {"a": 1, "a": 2}}\n'
    elif fault == "crlf":
        raw = good + b"\r\n" + line + b"\r\n"
        bad_line = None
    elif fault == "no-final-newline":
        raw = good + b"\n" + line
        bad_line = None
    else:  # a JSON array of the records, as Alpaca's .json holds them
        raw = json.dumps([first, base]).encode()
        bad_line = 1
    path = scratch / "f.jsonl"
    path.write_bytes(raw)
    if bad_line is None:
        assert _outcome(read, check, path, records, None, lines=lines) == "read"
        return
    assert _outcome(read, check, path, records, bad_line) == "refused"


def _column(kind):
    """Two rows' values of a Parquet column of the type `kind`."""
    import pyarrow as pa
    return {"int": pa.array([1, 2]), "float": pa.array([1.5, float("nan")]),
            "bool": pa.array([True, False]), "bytes": pa.array([b"a", b"b"]),
            "date": pa.array([datetime.date(2020, 1, 1)] * 2),
            "decimal": pa.array([decimal.Decimal("1.5")] * 2),
            "timestamp": pa.array([datetime.datetime(2020, 1, 1)] * 2),
            "strings": pa.array([["a"], ["b"]]), "struct": pa.array([{"a": 1}, {"a": 2}]),
            "map": pa.array([[("a", 1)], [("b", 2)]], type=pa.map_(pa.string(), pa.int64())),
            "nulls": pa.array([None, None], type=pa.string()),
            "large-string": pa.array(["a", "b"], type=pa.large_string()),
            "dictionary": pa.array(["x", "y"]).dictionary_encode(),
            "messages-without-content": pa.array([[{"role": "user"}]] * 2),
            "messages-bad-role": pa.array([[{"role": "bot", "content": "x"}]] * 2),
            "content-parts": pa.array([[{"role": "user", "content": [
                {"type": "text", "text": "hi"}]}]] * 2)}[kind]


PARQUET_KINDS = ["int", "float", "bool", "bytes", "date", "decimal", "timestamp", "strings",
                 "struct", "map", "nulls", "large-string", "dictionary",
                 "messages-without-content", "messages-bad-role", "content-parts"]


@FUZZ
@given(data=st.data())
def test_a_parquet_column_of_the_wrong_type_is_read_as_written_or_refused_naming_it(
        reader, scratch, data):
    import pyarrow as pa
    import pyarrow.parquet as pq
    read, check, bases = reader
    base = bases[data.draw(st.integers(0, len(bases) - 1))]
    if any(isinstance(v, list) and any(isinstance(x, list) for x in v) and
           not all(isinstance(x, list) for x in v) for v in base.values()):
        base = {**base, "ranked": [["yes"], ["no", "ok"], ["maybe"]]}  # Parquet's ties
    field = data.draw(st.sampled_from(sorted(base)))
    kind = data.draw(st.sampled_from(PARQUET_KINDS))
    columns = {k: pa.array([v, v]) for k, v in base.items()}
    ids = [b["id"] for b in bases if isinstance(b.get("id"), str)]
    if "id" in base and len(set(ids)) > 1:  # `world score` refuses an id given twice
        columns["id"] = pa.array(ids[:2])
    columns[field] = _column(kind)
    path = scratch / "f.parquet"
    pq.write_table(pa.table(columns), path)
    records = [{k: c.to_pylist()[row] for k, c in columns.items()} for row in (0, 1)]
    try:
        result = read(path)
    except UserError as e:
        assert e.path is not None and Path(e.path) == path, str(e)
        assert e.line in (1, 2) and str(e).startswith(f"{path}:{e.line}"), str(e)
        assert e.field is not None or "'" in e.message, str(e)
        return
    rows = [without_nulls(r) for r in records]
    for n, r in enumerate(rows, 1):
        r["_line"] = n
    check(result, rows)


# The defects the fuzzing found, each as a plain regression test.

def test_a_field_given_twice_on_a_line_is_refused_naming_it(tmp_path):
    # Python's json kept the last value without a word; jq keeps the last too, other readers
    # the first: which prompt was meant was a guess.
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Is the cat happy?"}\n'
                 '{"prompt": "Is the dog happy?", "id": 1, "prompt": "Is the owl happy?"}\n')
    with pytest.raises(UserError) as err:
        read_prompts(f)
    assert str(err.value) == (
        f"{f}:2, field 'prompt': is given twice in one object; JSON readers differ in which "
        f"value they take (Python's json the last, others the first or none): keep one")
    f.write_text('{"messages": [{"role": "user", "content": "a"}, '
                 '{"role": "assistant", "content": "b", "content": "c"}]}\n')
    with pytest.raises(UserError) as err:
        read_jsonl(f)
    assert (err.value.line, err.value.field) == (1, "messages[1].content")
    f.write_text('{"prompt": "Is the cat happy?", "id": {"a": 1, "b": {"a": 2}}}\n')
    assert read_prompts(f)[0]["id"] == {"a": 1, "b": {"a": 2}}  # a name once per object


@pytest.mark.parametrize("value,field,said", [
    ("NaN", "score", "not valid JSON (NaN is not a JSON number"),
    ('[1, {"b": -Infinity}]', "score[1].b", "not valid JSON (-Infinity is not a JSON number"),
    ("1e999", "score", "not valid JSON (1e999 is too large for a 64-bit float"),
    ("9" * 5000, "score", "cannot be read: an integer of 5000 digits"),
    ('{"x": 1e999, "x": 2}', "score.x", "not valid JSON (1e999"),  # the one json met first
    ('{"x": 1, "x": 2}', "score.x", "is given twice in one object")])
def test_a_number_json_lines_cannot_hold_is_refused_naming_its_field(tmp_path, value, field,
                                                                     said):
    # The line was named, not the field: "p.jsonl:2: not valid JSON (NaN is not ...)".
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "score": ' + value + '}\n')
    with pytest.raises(UserError) as err:
        read_jsonl(f)
    assert (err.value.line, err.value.field) == (2, field)
    assert str(err.value).startswith(f"{f}:2, field '{field}': {said}")


def test_content_given_as_openai_parts_is_refused_saying_so(tok, tmp_path):
    # It read "message 0 content must be a string", which did not say what to write instead.
    parts = {"role": "user", "content": [{"type": "text", "text": "Is the cat happy?"}]}
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Is the dog happy?", "completion": " no"}) + "\n"
                 + json.dumps({"messages": [parts, YES]}) + "\n")
    expected = (f"{f}:2, field 'messages[0].content': message 0 content is a list of parts "
                f"(OpenAI's format); gptlab reads text only: write the content as one string")
    for read in (read_prompts, lambda p: read_demonstrations(p, tok, 64)):
        with pytest.raises(UserError) as err:
            read(f)
        assert str(err.value) == expected


def test_a_parquet_map_column_is_refused_as_a_map(tmp_path):
    # pyarrow gives a map's value as (key, value) tuples: "field 'meta[0]': a tuple is not a
    # JSON value" named neither the column nor the type written.
    import pyarrow as pa
    import pyarrow.parquet as pq
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "meta": pa.array(
        [[("k", 1)], [("k", 2)]], type=pa.map_(pa.string(), pa.int64()))}), f)
    with pytest.raises(UserError) as err:
        read_prompts(f)
    assert str(err.value) == (f"{f}:1, field 'meta': is a Parquet map, which JSON has no type "
                              f"for; store it as a struct (an object) or a list")


def test_a_lone_surrogate_carried_in_an_id_is_written_as_its_escape(tmp_path, capsys):
    # `label` (and `sample`) carry a line's id: a `\ud800` escape read from JSON, written raw,
    # failed the write with a UnicodeEncodeError traceback (exit 1).
    from gptlab.cli import main
    from gptlab.io import write_jsonl_atomic
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"id": "q\\ud800", "\\udfff": 1, "prompt": "Is it?", '
                       '"responses": ["yes", "no"]}\n')
    out = tmp_path / "r.jsonl"
    assert main(["label", "--labeler", "instruct_task:score", "--in", str(samples),
                 "--out", str(out)]) == 0
    assert out.read_text() == ('{"id": "q\\ud800", "\\udfff": 1, "prompt": "Is it?", '
                               '"ranked": ["yes", "no"]}\n')
    assert read_jsonl(out)[0]["id"] == "q\ud800"
    # Other text is written as before, byte for byte.
    write_jsonl_atomic(out, [{"id": "é\U0001f600", "n": [1.5]}])
    assert out.read_bytes() == '{"id": "é\U0001f600", "n": [1.5]}\n'.encode()


def test_world_score_refuses_an_id_that_is_no_string_as_the_labeler_does(world, tmp_path):
    from gptlab.world.rewards import execution_reward
    # `str(id)` looked the number 7 up as the question '7': "no question with id '7'".
    f = tmp_path / "s.jsonl"
    for bad, said in ((7, "7"), (True, "True"), (["x"], "['x']")):
        f.write_text(json.dumps({"id": world.test[0].id, "responses": ["SELECT 1"]}) + "\n"
                     + json.dumps({"id": bad, "responses": ["SELECT 1"]}) + "\n")
        with pytest.raises(UserError) as err:
            score_samples(world, f)
        assert str(err.value) == (f"{f}:2, field 'id': must be a question id string, such as "
                                  f"'{world.train[0].id}', got {said}")
        # `ppo --reward-fn gptlab.world.rewards:execution` checks its prompts' ids alike.
        with pytest.raises(UserError) as err:
            execution_reward(world).check_records(read_jsonl(f), f)
        assert str(err.value) == (f"{f}:2, field 'id': must be a question id string, such as "
                                  f"'{world.train[0].id}', got {said}")


# End to end: the command line exits 2 with the message, and writes nothing.

@pytest.fixture(scope="module")
def tiny(tok, tmp_path_factory):
    import dataclasses

    import torch

    from gptlab.checkpoint import save_model
    from gptlab.model import GPT, get_preset
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny") / "model"
    save_model(d, GPT(dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size,
                                          context=64)), tok)
    return d


@pytest.mark.parametrize("verb,flag,line,expected", [
    ("sft", "--data", '{"prompt": "Is it?", "completion": NaN}',
     "not valid JSON (NaN is not a JSON number; write null or a finite number)"),
    ("sample", "--prompts", '{"prompt": "Is it?", "prompt": "Is it not?"}',
     "field 'prompt': is given twice in one object"),
    ("sample", "--prompts", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}]}),
     "field 'messages[0].content': message 0 content is a list of parts"),
    ("reward", "--data", json.dumps({"prompt": "Is it?", "ranked": ["yes", ["yes"]]}),
     "field 'ranked': has duplicate responses"),
    ("reward", "--data", json.dumps({"prompt": "Is it?", "chosen": 3, "rejected": "no"}),
     "field 'chosen': must be a response string (or a list of chat messages), got a number"),
    ("label", "--in", json.dumps({"prompt": "Is it?", "responses": "yes"}),
     "field 'responses': must be a non-empty list of response strings, got a string"),
    ("world score", "--in", json.dumps({"id": 7, "responses": ["SELECT 1"]}),
     "field 'id': must be a question id string"),
])
def test_the_command_line_exits_2_naming_file_line_and_field(tiny, world, tmp_path, capsys,
                                                             verb, flag, line, expected):
    from gptlab.cli import main
    good = {"sft": {"prompt": "Is it?", "completion": " yes"},
            "sample": {"prompt": "Is it?"},
            "reward": {"prompt": "Is it?", "ranked": ["yes", "no"]},
            "label": {"prompt": "Is it?", "responses": ["yes", "no"]},
            "world score": {"id": world.test[0].id, "responses": ["SELECT 1"]}}[verb]
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps(good) + "\n" + line + "\n")
    out = tmp_path / "out"
    args = {"sft": ["--model", str(tiny), "--max-steps", "1", "--no-progress"],
            "sample": ["--model", str(tiny), "--k", "2", "--max-new-tokens", "2"],
            "reward": ["--model", str(tiny), "--max-steps", "1", "--no-progress"],
            "label": ["--labeler", "instruct_task:score"],
            "world score": ["--world", str(_exported(world, tmp_path))]}[verb]
    capsys.readouterr()
    assert main([*verb.split(), *args, flag, str(f), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gptlab {verb}: error: {f}:2"), err
    assert expected in err and "Traceback" not in err
    assert not out.exists()


def _exported(world, tmp_path):
    d = tmp_path / "world"
    world.export(d)
    return d


@pytest.mark.parametrize("chosen,rejected,field,said", [
    (3, "no", "chosen", "must be a response string (or a list of chat messages), got a number"),
    ("yes", ["no"], "rejected",
     "must be a response string (or a list of chat messages), got a list"),
    ("yes", {"a": 1}, "rejected",
     "must be a response string (or a list of chat messages), got an object"),
    ("", "no", "chosen", "is empty; a ranked response must say something"),
    ("yes", " \n", "rejected", "is only whitespace; a ranked response must say something"),
    ("yes", "yes", "rejected", "is the same response as 'chosen'; a pair ranks two different "
                               "responses (write the worse one here, or drop the line)"),
    ([YES], [YES], "rejected", "is the same response as 'chosen'"),
    ([YES], [{"role": "assistant", "content": " "}], "rejected[0].content",
     "must be a non-empty string"),
])
def test_a_bad_chosen_or_rejected_is_named_alone_saying_what_is_wrong(tmp_path, chosen, rejected,
                                                                      field, said):
    # Both were named as one field, 'chosen/rejected', with "must be response strings", "a
    # response is empty" or "has duplicate responses": which of the two was bad, unsaid.
    prompt = [USER] if isinstance(chosen, list) else "Is the cat happy?"
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"prompt": "Is it?", "chosen": "yes", "rejected": "no"}) + "\n"
                 + json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    with pytest.raises(UserError) as err:
        read_rankings(f)
    assert (err.value.path, err.value.line, err.value.field) == (f, 2, field)
    assert str(err.value).startswith(f"{f}:2, field '{field}': {said}")


@pytest.mark.parametrize("finished", [[True, False], "no", True, [1, 0], [True], {"a": 1}])
def test_finished_is_read_by_no_reader_and_passes_as_written(tok, world, tmp_path, finished):
    # No reader uses `finished` (gptlab sample writes it; README, "Data formats"): a foreign or
    # hand-edited value is not refused, and reads as the line without it. `label` leaves it out
    # of the ranking; a labeler of one's own is given it as written.
    q = world.test[0]
    bare = {"id": q.id, "prompt": "Is the cat happy?", "responses": [q.sql, "SELECT 1"]}
    f, without = tmp_path / "s.jsonl", tmp_path / "bare.jsonl"
    f.write_text(json.dumps({**bare, "finished": finished}) + "\n")
    without.write_text(json.dumps(bare) + "\n")
    seen = []

    def rank(record, responses):
        seen.append(record["finished"])
        return task.score(record, responses)
    assert label_samples(read_jsonl(f), rank, source=f) == \
        label_samples(read_jsonl(without), task.score, source=without)
    assert seen == [finished]
    assert sample_sequences(tok, f, 512) == sample_sequences(tok, without, 512)
    assert score_samples(world, f) == score_samples(world, without)
