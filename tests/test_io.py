"""Strict JSON out of every writer: a NaN or an infinity is null named in the record's
`non_finite` field, or refused before anything is written; the readers read it back, and read
an earlier version's bare NaN too."""
import json
import math
from pathlib import Path

import pytest

from gptlab.errors import UserError
from gptlab.io import (restore_non_finite, strict_json, write_json_atomic,
                       write_jsonl_atomic)


def strict_loads(text: str):
    """json.loads as JavaScript's JSON.parse and jq read: NaN, Infinity and -Infinity are
    errors, not numbers."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def same(a, b) -> bool:
    """Equal, with a NaN equal to a NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def test_strict_loads_refuses_what_python_writes_by_default():
    with pytest.raises(ValueError, match="NaN is not JSON"):
        strict_loads(json.dumps({"loss": math.nan}))
    with pytest.raises(ValueError, match="-Infinity is not JSON"):
        strict_loads(json.dumps([-math.inf]))


def test_a_non_finite_number_is_null_named_by_its_pointer_and_read_back():
    record = {"step": 3, "loss": math.nan, "ptx": {"ppl": math.inf, "a/b~": [1.5, -math.inf]},
              "ci95": (math.nan, 0.25), "ok": 0.5}
    text = strict_json(record, non_finite="null")
    doc = strict_loads(text)
    assert doc == {"step": 3, "loss": None, "ptx": {"ppl": None, "a/b~": [1.5, None]},
                   "ci95": [None, 0.25], "ok": 0.5,
                   "non_finite": {"/loss": "NaN", "/ptx/ppl": "Infinity",
                                  "/ptx/a~1b~0/1": "-Infinity", "/ci95/0": "NaN"}}
    back = restore_non_finite(doc)
    assert same(back, {**record, "ci95": [math.nan, 0.25]})
    assert math.copysign(1, back["ptx"]["a/b~"][1]) == -1


def test_finite_records_are_written_byte_for_byte_as_before(tmp_path):
    # The demo's files are compared by SHA-256 across runs: strictness adds nothing to them.
    record = {"a": [1, 2.5, (3, "é")], "b": {"c": None, "d": True}, "p": tmp_path}
    write_json_atomic(tmp_path / "r.json", record, non_finite="null")
    assert (tmp_path / "r.json").read_text() == json.dumps(record, indent=2, default=str) + "\n"
    write_jsonl_atomic(tmp_path / "r.jsonl", [{"x": "é", "y": [0.1]}], non_finite="null")
    assert (tmp_path / "r.jsonl").read_text(encoding="utf-8") == '{"x": "é", "y": [0.1]}\n'


def test_a_refused_number_names_file_line_and_field_and_leaves_the_old_file(tmp_path):
    out = tmp_path / "rankings.jsonl"
    out.write_text('{"old": 1}\n')
    rows = [{"id": 1, "scores": [0.5, 1.0]}, {"id": 2, "scores": [0.5, math.nan]}]
    with pytest.raises(UserError, match=r"rankings.jsonl:2, field 'scores\[1\]': is NaN, which "
                                        r"JSON has no number for; nothing was written"):
        write_jsonl_atomic(out, rows)
    assert out.read_text() == '{"old": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rankings.jsonl"]  # no temporary left
    with pytest.raises(UserError, match=r"w.json, field 'a.b': is -Infinity"):
        write_json_atomic(tmp_path / "w.json", {"a": {"b": -math.inf}})
    assert not (tmp_path / "w.json").exists()


def test_a_value_that_is_no_object_cannot_be_marked_and_is_refused():
    with pytest.raises(UserError, match="is Infinity"):
        strict_json([math.inf], non_finite="null", path="x.json")
    with pytest.raises(ValueError, match="'null' or 'refuse'"):
        strict_json({}, non_finite="nan")


def test_an_earlier_version_s_bare_nan_and_a_hand_edited_marker_are_read_as_they_are():
    assert same(restore_non_finite(json.loads('{"loss": NaN, "kl": -Infinity}')),
                {"loss": math.nan, "kl": -math.inf})
    # A marker naming no null (edited since, or naming nothing) changes no value.
    doc = restore_non_finite({"loss": 2.0, "x": [None], "non_finite": {
        "/loss": "NaN", "/x/3": "NaN", "/y/z": "Infinity", "loss": "NaN", "/x/0": "lots"}})
    assert doc == {"loss": 2.0, "x": [None]}


def test_a_record_written_again_keeps_the_marks_it_was_read_with():
    # A record read without restoring (by another tool) and written again loses no mark.
    first = strict_loads(strict_json({"a": math.nan}, non_finite="null"))
    again = strict_loads(strict_json({**first, "b": math.inf}, non_finite="null"))
    assert again["non_finite"] == {"/a": "NaN", "/b": "Infinity"}
    assert same(restore_non_finite(again), {"a": math.nan, "b": math.inf})


def test_a_refusal_names_the_first_non_finite_number_and_a_bare_one_no_field():
    # Of two, the first in the record's order is named; a bare NaN is the whole value, no field.
    with pytest.raises(UserError) as e:
        strict_json({"a": [1.0, math.inf], "b": math.nan}, path="r.jsonl", line=4)
    assert str(e.value) == ("r.jsonl:4, field 'a[1]': is Infinity, which JSON has no number "
                            "for; nothing was written")
    with pytest.raises(UserError) as e:
        strict_json(math.nan, non_finite="null", path="x.json")
    assert str(e.value) == "x.json: is NaN, which JSON has no number for; nothing was written"


def test_a_marker_restores_only_a_null_it_names_by_a_pointer():
    # A key that is no JSON Pointer ("xloss"), a field that is not there, and an index one past
    # a list's end, at the end of the pointer or inside it, change nothing (and raise nothing);
    # the marker is dropped all the same.
    doc = restore_non_finite({"loss": None, "x": [None], "non_finite": {
        "xloss": "NaN", "/absent": "Infinity", "/x/1": "-Infinity", "/x/1/y": "NaN"}})
    assert doc == {"loss": None, "x": [None]}


def test_a_key_holding_tilde_and_slash_is_read_back_by_its_escaped_pointer():
    # RFC 6901: "~1" is "/", "~0" is "~", unescaped in that order: "~01" is the key "~1".
    for key in ("~1", "~0", "a/b", "~/"):
        doc = strict_loads(strict_json({key: math.nan}, non_finite="null"))
        assert doc[key] is None and same(restore_non_finite(doc), {key: math.nan}), key


def test_a_zstd_file_read_as_text_is_named_with_its_fix(tmp_path):
    from gptlab.io import other_format
    f = tmp_path / "a b.jsonl"
    f.write_bytes(b"\x28\xb5\x2f\xfd\x20\x05\x29\x00\x00hello")
    assert other_format(f) == (f"is zstd-compressed, not text; decompress it first (unzstd "
                               f"'{f}') and give what it holds")


def test_utf16_text_without_a_byte_order_mark_is_named_as_utf16(tmp_path):
    """Python's "utf-16-le" and `iconv -t UTF-16LE` write no byte-order mark: such a file was
    valid UTF-8, read with a NUL after each letter. Text with a few NULs is still text."""
    from gptlab.io import other_format, utf8_lines
    said = ("is UTF-16 text without a byte-order mark (a zero byte beside each character of its "
            "start); save the file as UTF-8")
    text = "Hello world\nIt\u2019s 5 \u20ac.\n\nSecond document\n" * 20
    for encoding in ("utf-16-le", "utf-16-be"):
        f = tmp_path / f"{encoding}.txt"
        f.write_bytes(text.encode(encoding))
        assert other_format(f) == said
        with pytest.raises(UserError) as e:
            list(utf8_lines(f))
        assert e.value.path == f and e.value.message == said
    f = tmp_path / "nul.txt"
    f.write_bytes(b"a\x00b\x00c\x00 plain text after three NULs\n\x00\x00\n")
    assert other_format(f) is None
    assert [line for _, line in utf8_lines(f)] == ["a\x00b\x00c\x00 plain text after three NULs",
                                                   "\x00\x00"]


def test_utf32_text_is_named_as_utf32_with_a_byte_order_mark_or_without(tmp_path):
    """UTF-32 passed as UTF-8 text, three NULs after each letter and no blank line between
    documents (a tokenizer trained on it); with its byte-order mark it was called UTF-16."""
    from gptlab.io import other_format, utf8_lines
    text = "First document.\n\nSecond document, 5 \u20ac.\n" * 10
    for encoding, said in (
            ("utf-32", "is UTF-32 text (it starts with a UTF-32 byte-order mark); save the file "
                       "as UTF-8"),
            ("utf-32-le", "is UTF-32 text without a byte-order mark (three zero bytes beside "
                          "each character of its start); save the file as UTF-8"),
            ("utf-32-be", "is UTF-32 text without a byte-order mark (three zero bytes beside "
                          "each character of its start); save the file as UTF-8")):
        f = tmp_path / f"{encoding}.txt"
        f.write_bytes(text.encode(encoding))
        assert other_format(f) == said, encoding
        with pytest.raises(UserError) as e:
            list(utf8_lines(f))
        assert e.value.message == said
    f = tmp_path / "be-bom.txt"
    f.write_bytes(b"\x00\x00\xfe\xff" + text.encode("utf-32-be"))
    assert other_format(f).startswith("is UTF-32 text (it starts with a UTF-32 byte-order mark)")
    for encoding in ("utf-16", "utf-16-le"):  # UTF-16 is still UTF-16
        f = tmp_path / f"{encoding}.txt"
        f.write_bytes(text.encode(encoding))
        assert other_format(f).startswith("is UTF-16 text"), encoding


def test_a_split_word_ends_at_a_digit_as_datasets_reads_it(tmp_path):
    # `datasets`' split patterns take a digit as a separator: test1.jsonl is the test split's.
    from gptlab.io import files_in
    (tmp_path / "train.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "test1.jsonl").write_text('{"a": 2}\n')
    with pytest.raises(UserError) as e:
        files_in(tmp_path, (".jsonl",))
    assert e.value.message.startswith("holds the files of 2 splits (train, test), as datasets "
                                      "names them: train.jsonl is train's, test1.jsonl test's")


def test_shards_of_two_splits_of_any_name_in_data_are_refused_and_elsewhere_read(tmp_path):
    # `datasets` names a shard `data/{split}-00000-of-00001.*` whatever the split is called,
    # with a fingerprint too, as datasets before 2.15 pushed them; outside `data/` such a name
    # is no split's: wiki-* beside books-* in a pretraining folder were refused as two.
    from gptlab.io import files_in
    (tmp_path / "data").mkdir()
    for shard in ("zeta-00000-of-00001", "alpha-00000-of-00001-5f1e2d3c"):
        (tmp_path / "data" / f"{shard}.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(UserError) as e:
        files_in(tmp_path, (".jsonl",))
    assert e.value.message.startswith(
        "holds the files of 2 splits (alpha, zeta), as datasets names them: "
        "data/alpha-00000-of-00001-5f1e2d3c.jsonl is alpha's, data/zeta-00000-of-00001.jsonl "
        "zeta's; ")
    (tmp_path / "data").rename(tmp_path / "wiki")
    assert len(files_in(tmp_path, (".jsonl",))) == 2


def test_a_file_named_for_two_splits_is_refused_as_both(tmp_path):
    # `datasets` puts train/test/a.jsonl (and train_test.jsonl) in both splits.
    from gptlab.io import files_in
    (tmp_path / "train" / "test").mkdir(parents=True)
    (tmp_path / "train" / "test" / "a.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(UserError) as e:
        files_in(tmp_path, (".jsonl",))
    assert str(e.value) == (
        f"{tmp_path}: holds the files of 2 splits (train, test), as datasets names them: "
        f"train/test/a.jsonl is train's and test's; read as one, a split held out for "
        f"evaluation would be read with the others: give one split's folder instead "
        f"({tmp_path}/train)")
    assert len(files_in(tmp_path / "train", (".jsonl",))) == 1


# Layouts of a data directory and the splits `datasets.get_data_patterns` makes of them ("train"
# where no name says: all files one split); a third item where gptlab refuses more: where
# `datasets` leaves out of its one split a file that a later rule names for another (test.jsonl
# beside train/), which a verb, reading every file, would train on.
SPLIT_LAYOUTS = [
    (("wiki-00000-of-00002.jsonl", "wiki-00001-of-00002.jsonl", "books-00000-of-00001.jsonl"),
     ("train",)),
    (("data/wiki-00000-of-00002.jsonl", "data/wiki-00001-of-00002.jsonl",
      "data/books-00000-of-00001.jsonl"), ("books", "wiki")),
    (("x/wiki-00000-of-00001.jsonl", "y/books-00000-of-00001.jsonl"), ("train",)),
    (("corpus/data/wiki-00000-of-00001.jsonl", "corpus/data/books-00000-of-00001.jsonl"),
     ("train",)),
    (("Data/wiki-00000-of-00001.jsonl", "Data/books-00000-of-00001.jsonl"), ("train",)),
    (("data/wiki-0-of-2.jsonl", "data/books-0-of-1.jsonl"), ("train",)),
    (("data/wiki-00000-of-00001.jsonl", "data/sub/books-00000-of-00001.jsonl"), ("wiki",)),
    (("data/train-00000-of-00002-5f1e2d3c4b5a6978.jsonl",
      "data/test-00000-of-00001-0a1b2c3d4e5f6789.jsonl"), ("train", "test")),
    (("data/train-00000-of-00001.jsonl", "data/validation-00000-of-00001.jsonl",
      "data/extra-00000-of-00001.jsonl"), ("train", "validation", "extra")),
    (("data/train-00000-of-00001.jsonl", "test.jsonl", "data/test.jsonl"), ("train",),
     ("train", "test")),
    (("data/my-wiki-00000-of-00001.jsonl", "data/my-books-00000-of-00001.jsonl"),
     ("my-books", "my-wiki")),
    (("train.jsonl", "test.jsonl"), ("train", "test")),
    (("train.jsonl", "notes.jsonl"), ("train",)),
    (("train_0.jsonl", "train_1.jsonl", "test_0.jsonl"), ("train", "test")),
    (("train.jsonl", "my_test_file.jsonl", "validation1.jsonl"), ("train", "validation", "test")),
    (("train.jsonl", "test1.jsonl"), ("train", "test")),
    (("train.jsonl", "testing.jsonl"), ("train", "test")),
    (("train.jsonl", "contest.jsonl", "devices.jsonl", "interval.jsonl"), ("train",)),
    (("pretrain.jsonl", "test.jsonl"), ("test",)),
    (("TRAIN.jsonl", "TEST.jsonl"), ("train",)),
    (("train_test.jsonl",), ("train", "test")),
    (("train/a.jsonl", "test/b.jsonl"), ("train", "test")),
    (("default/train/0000.jsonl", "default/test/0000.jsonl"), ("train", "test")),
    (("x/y/train/a.jsonl", "x/z/validation/b.jsonl"), ("train", "validation")),
    (("dev_set/a.jsonl", "training-2/b.jsonl"), ("train", "validation")),
    (("train/a.jsonl", "test.jsonl"), ("train",), ("train", "test")),
    (("train/test/a.jsonl",), ("train", "test")),
    (("a/train.x/b.jsonl", "test.jsonl"), ("train",), ("train", "test")),
    (("pretrain/a.jsonl", "contest/b.jsonl", "tests/c.jsonl", "trainings/d.jsonl"), ("train",)),
    (("train.jsonl", ".ipynb_checkpoints/test-checkpoint.jsonl", "__pycache__/dev.jsonl"),
     ("train",)),
]


@pytest.mark.parametrize("layout, held, more", [(*case, None)[:3] for case in SPLIT_LAYOUTS],
                         ids=[",".join(case[0]) for case in SPLIT_LAYOUTS])
def test_a_directory_is_refused_where_datasets_reads_two_splits_or_leaves_one_out(
        tmp_path, layout, held, more):
    import ast
    import re
    from datasets.data_files import get_data_patterns
    from gptlab.io import files_in
    for name in layout:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"a": 1}\n')
    try:
        by_datasets = tuple(map(str, get_data_patterns(str(tmp_path))))
    except ValueError as e:  # a split name it does not take, which it names
        by_datasets = tuple(sorted(ast.literal_eval(str(e).rsplit(" but got ", 1)[1][1:-2])))
    assert by_datasets == held
    try:
        files_in(tmp_path, (".jsonl",))
        refused: tuple[str, ...] = ()
    except UserError as e:
        refused = tuple(re.match(r"holds the files of \d+ splits \((.*?)\)", e.message)[1]
                        .split(", "))
    assert refused == (more or (held if len(held) > 1 else ()))


def test_an_out_in_a_read_directory_is_refused_by_any_path_to_it(tmp_path, monkeypatch):
    # A Path as a str, an out reached through a link; "" is no directory here (the caller's to
    # refuse), not the current one.
    from gptlab.io import check_out_of_read_dirs
    data = tmp_path / "prompts"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    for inputs, out in (({"--in": data}, data / "run"),
                        ({"--in": [str(data)]}, tmp_path / "link" / "run")):
        with pytest.raises(UserError) as e:
            check_out_of_read_dirs(out, inputs, "prompts", "the samples")
        assert str(e.value) == (f"{out}, field 'out': is inside the prompts directory {data} "
                                f"(--in); the samples would become part of the prompts; choose "
                                f"another out (--out)")
    monkeypatch.chdir(tmp_path)
    check_out_of_read_dirs(tmp_path / "run", {"--in": ""}, "prompts")


def test_no_records_names_a_lone_shard_in_the_singular_and_the_field_of_a_file(tmp_path):
    from gptlab.io import no_records
    (tmp_path / "d" / "data").mkdir(parents=True)
    (tmp_path / "d" / "data" / "train.jsonl").write_text("")
    assert str(no_records(tmp_path / "d", "samples", field="samples")) == (
        f"{tmp_path / 'd'}, field 'samples': no samples in this directory: its shard "
        f"(data/train.jsonl) holds no record")
    assert str(no_records(tmp_path / "d" / "data" / "train.jsonl", "samples", field="samples")) \
        == f"{tmp_path / 'd' / 'data' / 'train.jsonl'}, field 'samples': no samples in the file"


def test_lines_end_at_lf_crlf_and_a_lone_cr_as_python_universal_newlines_end_them(tmp_path):
    """A classic Mac OS file (lone \\r endings) read as one line with its \\r kept, and
    `rstrip("\\r\\n")` took a line's own trailing \\r along with its CRLF. Each file reads as
    Python's universal newlines read it (open(f, newline=None)), numbered so."""
    from gptlab.io import utf8_lines
    cases = {
        b"one\ntwo\n\nthree": ["one", "two", "", "three"],
        b"one\r\ntwo\r\n\r\nthree\r\n": ["one", "two", "", "three"],
        b"one\rtwo\r\rthree\r": ["one", "two", "", "three"],
        b"one\rtwo\r\nthree\n\rfour": ["one", "two", "three", "", "four"],
        b"x\r\r\ny\r\n": ["x", "", "y"],  # a \r before its CRLF ends a line of its own
        b"\xef\xbb\xbf\r\rz": ["", "", "z"],
        b"\r\n": [""],
        b"": [],
    }
    for i, (data, lines) in enumerate(cases.items()):
        f = tmp_path / f"{i}.txt"
        f.write_bytes(data)
        assert [line for _, line in utf8_lines(f)] == lines, data
        assert [n for n, _ in utf8_lines(f)] == list(range(1, len(lines) + 1))
        with open(f, encoding="utf-8-sig", newline=None) as fh:
            assert fh.read().splitlines() == lines
    f = tmp_path / "bad.txt"
    f.write_bytes(b"one\rtwo\r\nth\xffree\r")
    with pytest.raises(UserError) as e:
        list(utf8_lines(f))
    assert e.value.line == 3
    assert e.value.message.startswith("not UTF-8 text: byte 0xff at byte offset 11 ")


def test_a_crlf_cut_by_a_read_block_is_one_line_end():
    """Lines are read a block at a time: a \\r\\n split between two blocks, or a line across
    several, reads as it does whole, each line at its byte offset."""
    import io
    from gptlab.io import _byte_lines
    data = b"ab\r\ncd\r\r\nefghij\rk\n\n\r"
    for block in (1, 2, 3, 4, 5, 64):
        assert list(_byte_lines(io.BytesIO(data), block)) == [
            (0, b"ab"), (4, b"cd"), (7, b""), (9, b"efghij"), (16, b"k"), (18, b""), (19, b"")]


def test_json_lines_end_at_lf_or_crlf_and_a_lone_cr_in_a_record_is_white_space(tmp_path):
    """A lone \\r between a record's values is JSON's white space (json.loads reads it); read as
    a line end, it cut the record in two broken lines. CRLF files read as LF ones, at every read
    block size."""
    import io
    from gptlab.io import _byte_lines, json_objects
    f = tmp_path / "r.jsonl"
    f.write_bytes(b'{"prompt": "a",\r"completion": "b"}\r\n{"prompt": "c"}\n\r\n{"x": 1}\r')
    assert list(json_objects(f)) == [(1, {"prompt": "a", "completion": "b"}),
                                     (2, {"prompt": "c"}), (4, {"x": 1})]
    data = b'ab\r\ncd\r\r\nef\rgh\n\n\r'
    for block in (1, 2, 3, 64):
        assert list(_byte_lines(io.BytesIO(data), block, lone_cr=False)) == [
            (0, b"ab"), (4, b"cd\r"), (9, b"ef\rgh"), (15, b""), (16, b"\r")]


def split_verdict(*paths: str) -> str:
    """What the split check says of these paths given together: which is whose, or one split."""
    from gptlab.io import check_one_split_given
    given = [Path(p) for p in paths]
    try:
        check_one_split_given(given, [(p, str(p)) for p in given], "data")
    except UserError as e:
        return str(e).split(" as datasets names them: ")[1].split(";")[0]
    return "one split"


def test_paths_that_share_only_the_root_are_named_from_it_but_for_dev():
    # `--data train.txt <(cat more.txt)` gives bash's /dev/fd/63: with only `/` in common, its
    # folder `dev` was read as a validation split's, and the two refused as train's and
    # validation's. Files in two splits are still refused from `/`, /dev/shm's too.

    assert split_verdict("/home/me/train.txt", "/dev/fd/63") == "one split"
    assert split_verdict("/home/me/train.txt", "/dev/stdin", "/tmp/notes.txt") == "one split"
    assert split_verdict("/data/train.jsonl", "/tmp/val.jsonl") == \
        "/data/train.jsonl is train's, /tmp/val.jsonl validation's"
    assert split_verdict("/home/me/train.txt", "/dev/shm/test.txt") == \
        "/home/me/train.txt is train's, /dev/shm/test.txt test's"
    assert split_verdict("/train/a.txt", "/srv/test/b.txt") == \
        "/train/a.txt is train's, /srv/test/b.txt test's"
    assert split_verdict("/srv/dev/a.txt", "/tmp/train.txt") == \
        "/tmp/train.txt is train's, /srv/dev/a.txt validation's"
    # `data/` right in the root holds a shard of a split, as right in any folder given
    assert split_verdict("/data/wiki-00000-of-00001.parquet", "/tmp/test.jsonl") == \
        "/tmp/test.jsonl is test's, /data/wiki-00000-of-00001.parquet wiki's"
    assert split_verdict("/data/wiki-00000-of-00001.parquet",
                         "/tmp/books-00000-of-00001.parquet") == "one split"


def test_paths_on_two_windows_drives_share_no_folder_and_are_named_from_their_roots(
        monkeypatch):
    # ntpath.commonpath raises ValueError for paths on two drives (C:\\ and D:\\): the split
    # check let it out as a traceback (exit 1). Such paths share no folder; each is looked at
    # from its own root, as paths that share only the root are.
    import ntpath
    import os

    def commonpath(paths):
        return ntpath.commonpath(["C:\\data\\train.txt", "D:\\test.txt"])  # its ValueError
    monkeypatch.setattr(os.path, "commonpath", commonpath)

    assert split_verdict("/data/train.jsonl", "/other/val.jsonl") == \
        "/data/train.jsonl is train's, /other/val.jsonl validation's"
    assert split_verdict("/train/a.txt", "/srv/test/b.txt") == \
        "/train/a.txt is train's, /srv/test/b.txt test's"
    assert split_verdict("/home/me/train.txt", "/dev/fd/63") == "one split"
    assert split_verdict("/home/me/a.txt", "/srv/b.txt") == "one split"
    assert split_verdict("/data/wiki-00000-of-00001.parquet", "/tmp/test.jsonl") == \
        "/tmp/test.jsonl is test's, /data/wiki-00000-of-00001.parquet wiki's"


def test_splits_none_holds_out_are_refused_saying_so(tmp_path):
    # A shard split `wiki` beside train.jsonl (or beside another shard split) is refused, but
    # the reason was that a split held out for evaluation would be read with the others, though
    # none is: it says they would be one corpus, which datasets does not make of them.
    from gptlab.io import check_one_split_given, files_in
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wiki-00000-of-00001.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "train.jsonl").write_text('{"a": 2}\n')
    with pytest.raises(UserError) as e:
        files_in(tmp_path, (".jsonl",))
    assert str(e.value) == (
        f"{tmp_path}: holds the files of 2 splits (train, wiki), as datasets names them: "
        f"train.jsonl is train's, data/wiki-00000-of-00001.jsonl wiki's; neither is held out "
        f"for evaluation, but read as one, they would be one corpus, which datasets does not "
        f"make of them: give one split's file instead ({tmp_path}/train.jsonl)")
    (tmp_path / "data" / "books-00000-of-00001.jsonl").write_text('{"a": 3}\n')
    with pytest.raises(UserError) as e:
        files_in(tmp_path, (".jsonl",))
    assert "(books, wiki), " in str(e.value)  # datasets' two splits; train.jsonl no stray
    assert "; neither is held out for evaluation, but read as one, they would be one corpus, " \
        "which datasets does not make of them: " in str(e.value)
    given = [Path("/data/wiki-00000-of-00001.parquet"), Path("/tmp/train.jsonl"),
             Path("/tmp/books-00000-of-00001.parquet")]
    with pytest.raises(UserError) as e:
        check_one_split_given(given, [(p, str(p)) for p in given], "data")
    assert str(e.value) == (
        "field 'data': gives the files of 2 splits (train, wiki), as datasets names them: "
        "/tmp/train.jsonl is train's, /data/wiki-00000-of-00001.parquet wiki's; neither is "
        "held out for evaluation, but read as one, they would be one corpus, which datasets "
        "does not make of them: give one split's files")
    # With one held out among them, the reason is still that one.
    (tmp_path / "test.jsonl").write_text('{"a": 4}\n')
    (tmp_path / "data" / "books-00000-of-00001.jsonl").unlink()
    with pytest.raises(UserError) as e:
        files_in(tmp_path, (".jsonl",))
    assert "(train, test, wiki), " in str(e.value) and str(e.value).endswith(
        f"; read as one, a split held out for evaluation would be read with the others: give "
        f"one split's file instead ({tmp_path}/train.jsonl)")


def test_a_marker_whose_pointer_passes_through_a_number_or_past_a_list_restores_nothing():
    doc = {"a": 1, "l": [None, {"y": None}], "x": None,
           "non_finite": {"/a/b/c": "NaN", "/l/5/x": "NaN", "/l/0": "Infinity", "/x": "NaN",
                          "/l/1/y": "-Infinity"}}
    back = restore_non_finite(doc)
    assert back["a"] == 1 and back["l"] == [math.inf, {"y": -math.inf}]
    assert math.isnan(back["x"])
    assert "non_finite" not in back


def test_a_nan_on_a_line_broken_after_it_is_refused_as_a_nan_naming_no_field(tmp_path):
    # The line's field is found by reading it again past the NaN, which its syntax error stops.
    from gptlab.io import read_jsonl
    (tmp_path / "a.jsonl").write_text('{"ok": 1}\n{"a": NaN, \n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_jsonl(tmp_path / "a.jsonl")
    assert (e.value.line, e.value.field) == (2, None)
    assert e.value.message == ("not valid JSON (NaN is not a JSON number; write null or a finite "
                               "number)")


def test_a_key_given_twice_is_named_the_first_that_repeats(tmp_path):
    from gptlab.io import read_jsonl
    (tmp_path / "a.jsonl").write_text('{"b": 1, "a": 2, "a": 3, "b": 4}\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_jsonl(tmp_path / "a.jsonl")
    assert (e.value.line, e.value.field) == (1, "a")


def test_a_key_given_twice_in_a_json_file_is_refused_naming_its_second_line(tmp_path):
    # A model directory's files kept the last silently: a second "eos_token" made the pad
    # token the end of sequence; a second "context" halved the model's.
    from gptlab.io import read_json
    from gptlab.tokenizer import load_tokenizer, train_tokenizer
    f = tmp_path / "c.json"
    f.write_text('{\n  "context": 128,\n  "inner": {"a": 1},\n  "context": 64\n}\n')
    with pytest.raises(UserError) as e:
        read_json(f)
    assert str(e.value) == (f"{f}:4, field 'context': is given twice in one object; JSON "
                            f"readers differ in which value they take (Python's json the last, "
                            f"others the first or none): keep one")
    f.write_text('{"a": {"b": 1, "b": 2}}')  # inside an object too, on one line
    with pytest.raises(UserError, match=r"c.json:1, field 'b': is given twice"):
        read_json(f)
    tok = train_tokenizer(["the cat sat on the mat"] * 5, vocab_size=280)
    tok.save(tmp_path / "tok")
    config = tmp_path / "tok" / "tokenizer_config.json"
    text = config.read_text()
    config.write_text(text.replace('"eos_token":', '"eos_token": "<|pad|>", "eos_token":', 1))
    with pytest.raises(UserError, match="field 'eos_token': is given twice"):
        load_tokenizer(tmp_path / "tok")


def test_read_json_refuses_a_directory_and_an_integer_longer_than_python_reads(tmp_path):
    import sys

    from gptlab.io import read_json
    with pytest.raises(UserError) as e:
        read_json(tmp_path)
    assert str(e.value) == f"{tmp_path}: is a directory, not a file"
    (tmp_path / "l.json").write_bytes(b'{"name": "caf\xe9"}')  # Latin-1
    with pytest.raises(UserError) as e:
        read_json(tmp_path / "l.json")
    assert str(e.value) == f"{tmp_path / 'l.json'}: not UTF-8 text"
    limit = sys.get_int_max_str_digits()
    (tmp_path / "n.json").write_text('{"n": ' + "9" * (limit + 1) + "}", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_json(tmp_path / "n.json")
    assert str(e.value) == (f"{tmp_path / 'n.json'}: cannot be read: an integer of {limit + 1} "
                            f"digits is more than the {limit} digits a number may have here; "
                            f"write it as a string")


def test_a_parquet_name_holding_text_or_other_bytes_is_named_for_what_it_holds(tmp_path):
    from gptlab.io import parquet_objects
    with pytest.raises(UserError) as e:
        list(parquet_objects(tmp_path / "none.parquet"))
    assert str(e.value) == f"{tmp_path / 'none.parquet'}: file not found"
    text = tmp_path / "t.parquet"
    text.write_bytes(("a" + "é" * 100 + "\n").encode("utf-8"))  # byte 200 cuts the last é
    with pytest.raises(UserError) as e:
        list(parquet_objects(text))
    assert e.value.message.startswith(f"is text, not Parquet (it begins {'a' + 'é' * 39!r}); ")
    binary = tmp_path / "b.parquet"
    binary.write_bytes(b"\xc3\x28" + bytes(range(32, 128)) * 3)  # not UTF-8 before byte 200
    with pytest.raises(UserError) as e:
        list(parquet_objects(binary))
    assert e.value.message.startswith("not a readable Parquet file (")
    (tmp_path / "d.parquet").mkdir()
    with pytest.raises(UserError) as e:
        list(parquet_objects(tmp_path / "d.parquet"))
    assert e.value.message.startswith("not a readable Parquet file (")


def test_a_parquet_record_column_given_twice_is_refused_naming_it(tmp_path):
    # Each row was a dict of the last column of the name: the first `prompt` column was dropped
    # without a word, where a JSON Lines object with `prompt` twice is refused.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gptlab.io import parquet_objects
    f = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"]), pa.array(["c"])],
                                        ["prompt", "id", "prompt"]), f)
    with pytest.raises(UserError) as e:
        list(parquet_objects(f))
    assert str(e.value) == (f"{f}, field 'prompt': is a column 2 times; readers differ in which "
                            f"one they take (pyarrow's to_pylist the last, pandas all of them): "
                            f"keep one")


def test_a_pipe_named_as_data_in_a_directory_is_not_read(tmp_path):
    import os

    from gptlab.io import files_in
    (tmp_path / "a.jsonl").write_text('{"prompt": "a"}\n', encoding="utf-8")
    os.mkfifo(tmp_path / "b.jsonl")  # reading it would wait for a writer
    assert files_in(tmp_path, (".jsonl",)) == [tmp_path / "a.jsonl"]


def test_a_hub_cache_folder_without_refs_main_is_refused_naming_no_latest(tmp_path):
    from gptlab.io import files_in
    d = tmp_path / "cache"
    for sub in ("blobs", "refs", "snapshots/r1", "snapshots/r2"):
        (d / sub).mkdir(parents=True)
    for rev in ("r1", "r2"):
        (d / "snapshots" / rev / "a.jsonl").write_text('{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        files_in(d, (".jsonl",))
    assert str(e.value) == (
        f"{d}: is a Hugging Face Hub cache folder holding 2 revisions of a dataset "
        f"(snapshots/r1, snapshots/r2); read as one, its records would be read once per "
        f"revision: give one revision's folder")


def test_a_write_removes_stale_temporary_files_and_links_but_no_link_s_target(tmp_path):
    """Temporaries a killed write left beside its target go before the next write: a directory
    (this version's) or a file (an earlier version's), and a link by itself, never what it
    points to; a link that points nowhere cannot be opened, so it cannot be locked and is
    left as it is, as a temporary another writer holds is."""
    target = tmp_path / "out.json"
    kept = tmp_path / "elsewhere"
    kept.mkdir()
    (kept / "x").write_text("keep")
    (tmp_path / ".out.json.old.tmp").write_text("half a file")
    (tmp_path / ".out.json.link.tmp").symlink_to(kept)
    (tmp_path / ".out.json.dead.tmp").symlink_to(tmp_path / "nothing")
    (tmp_path / ".other.json.old.tmp").write_text("another target's")
    write_json_atomic(target, {"n": 1})
    assert json.loads(target.read_text()) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.json.old.tmp", ".out.json.dead.tmp", "elsewhere", "out.json"]
    assert (kept / "x").read_text() == "keep"


def test_the_utf8_finders_name_the_file_alone_where_every_value_decodes(tmp_path):
    """`parquet_not_utf8` and `not_utf8_row` are asked after a reader met bytes that are not
    UTF-8; where they find none (the file rewritten meanwhile), the error names the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gptlab.io import not_utf8_row, parquet_not_utf8
    path = tmp_path / "d.parquet"
    table = pa.table({"text": ["caf\u00e9", "ok"], "n": [1, 2]})
    pq.write_table(table, path)
    assert str(parquet_not_utf8(path)) == f"{path}: not UTF-8 text"
    assert str(not_utf8_row(table, path, 5)) == f"{path}: not UTF-8 text"
    bad = pa.array([b"ok", b"caf\xe9"], pa.binary()).cast(pa.string(), safe=False)
    e = not_utf8_row(pa.table({"n": [1, 2], "text": bad}), path, 5)
    assert (e.line, e.field) == (7, "text")
    assert str(e).endswith("not UTF-8 text: byte 0xe9 at byte offset 3 of the value cannot be "
                           "decoded; write the text as UTF-8")


def _tree(d: Path) -> dict:
    """Every entry under `d`, hidden ones too: a file's bytes and inode (a file put back is
    the same file, renamed), a directory as None."""
    import os
    return {p.relative_to(d).as_posix(): None if p.is_dir() else
            (p.read_bytes(), os.stat(p).st_ino) for p in sorted(d.rglob("*"))}


def _old_output(d: Path) -> dict:
    d.mkdir()
    (d / "config.json").write_bytes(b'{"old": 1}\n')
    (d / "weights.bin").write_bytes(bytes(range(256)) * 3)
    (d / "sub").mkdir()
    (d / "sub" / "part").write_bytes(b"old part")
    (d / "notes.txt").write_bytes(b"the user's, not written")
    return _tree(d)


def test_old_files_aside_deletes_the_old_files_once_the_write_is_done(tmp_path):
    from gptlab.io import old_files_aside
    d = tmp_path / "out"
    _old_output(d)
    writes = ("config.json", "weights.bin", "tokenizer.json", "sub")
    with old_files_aside(d, writes, dirs=["sub"]) as held:
        assert held == ["config.json", "weights.bin", "sub"]
        aside, = d.glob(".old-files.*")
        assert json.loads((aside / "held.json").read_text()) == {
            "from": str(d.resolve()), "moved": held, "writes": list(writes)}
        assert not (d / "config.json").exists()  # no old config.json beside new weights
        (d / "weights.bin").write_bytes(b"new")
        (d / "tokenizer.json").write_bytes(b"{}")
    # sub/ and config.json, not written again, went with the old files
    assert {k: v[0] for k, v in _tree(d).items()} == {
        "notes.txt": b"the user's, not written", "tokenizer.json": b"{}", "weights.bin": b"new"}


@pytest.mark.parametrize("made", [False, True])
def test_a_write_that_fails_leaves_its_directory_byte_for_byte_as_it_was(tmp_path, made):
    import errno

    from gptlab.io import old_files_aside
    d = tmp_path / "out"
    before = {} if made else _old_output(d)
    with pytest.raises(OSError, match="No space left"):
        with old_files_aside(d, ("config.json", "weights.bin", "tokenizer.json", "sub"),
                             made=made, dirs=["sub"]):
            d.mkdir(exist_ok=True)
            (d / "tokenizer.json").write_bytes(b"new")
            (d / "sub").mkdir()
            (d / "sub" / "new").write_bytes(b"new part")
            (d / "weights.bin").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    if made:
        assert not d.exists()
    else:
        assert _tree(d) == before


def test_a_move_aside_that_fails_midway_puts_back_what_it_moved(tmp_path, monkeypatch):
    import os

    from gptlab.io import old_files_aside
    d = tmp_path / "out"
    before = _old_output(d)
    replace = os.replace

    def refused(src, dst):
        if Path(src).name == "sub" and ".old-files." in str(dst):
            raise OSError("refused")
        return replace(src, dst)
    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError, match="refused"):
        with old_files_aside(d, ("config.json", "sub", "weights.bin"), dirs=["sub"]):
            raise AssertionError("not reached")
    assert _tree(d) == before


_KILLED = """
import os, shutil, signal, sys
from pathlib import Path
from gptlab.io import old_files_aside
d = Path(sys.argv[1])
with old_files_aside(d, ("config.json", "weights.bin", "tokenizer.json", "sub"), dirs=["sub"]):
    (d / "tokenizer.json").write_bytes(b"new")
    (d / "weights.bin").write_bytes(b"new weights")
    kill = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[2] == "writing":
        kill()
    shutil.rmtree = kill  # done: killed removing the old files
"""


def test_a_directory_where_a_file_is_written_is_refused_before_anything_moves(tmp_path):
    """A done write deletes what it moved aside: a folder of the user's under a file's name
    would go with it."""
    from gptlab.io import old_files_aside
    d = tmp_path / "out"
    _old_output(d)
    (d / "weights.bin").unlink()
    (d / "weights.bin").mkdir()
    (d / "weights.bin" / "mine.txt").write_bytes(b"kept")
    before = _tree(d)
    with pytest.raises(UserError, match=r"is a directory where a file weights.bin is written"):
        with old_files_aside(d, ("config.json", "weights.bin")):
            raise AssertionError("not reached")
    assert _tree(d) == before


@pytest.mark.parametrize("killed", ["writing", "done"])
def test_what_a_killed_write_left_aside_is_settled_by_the_next_write(tmp_path, capsys,
                                                                      killed):
    """Killed before it was done, a write is undone by the next write to the directory: its
    files removed, the old ones put back; killed once done, its old files are removed."""
    import os
    import subprocess
    import sys

    from gptlab.io import old_files_aside
    d = tmp_path / "out"
    before = _old_output(d)
    r = subprocess.run([sys.executable, "-c", _KILLED, str(d), killed], timeout=120)
    assert r.returncode == -9
    aside, = d.glob(".old-files.*")
    assert sorted(os.listdir(aside)) == (["config.json", "held.json", "sub", "weights.bin"]
                                         if killed == "writing" else
                                         ["config.json", "sub", "weights.bin"])
    capsys.readouterr()
    with old_files_aside(d, ("weights.bin",)) as held:  # the next write settles it first
        assert held == ["weights.bin"]
        assert [p for p in d.glob(".old-files.*") if p != aside] == list(d.glob(".old-files.*"))
    tree = _tree(d)
    if killed == "writing":
        assert capsys.readouterr().err == (
            f"note: {d}: a write killed before it was done was undone: its old config.json, "
            f"weights.bin, sub put back from {aside.name}\n")
        assert tree == {k: v for k, v in before.items() if k != "weights.bin"}
    else:
        assert capsys.readouterr().err == ""
        assert {k: v[0] for k, v in tree.items()} == {
            "notes.txt": b"the user's, not written", "tokenizer.json": b"new"}


def test_a_live_writer_s_old_files_are_left_alone(tmp_path):
    from gptlab.io import old_files_aside, settle_old_files
    d = tmp_path / "out"
    _old_output(d)
    with old_files_aside(d, ("config.json",)):
        aside, = d.glob(".old-files.*")
        assert settle_old_files(d) == []
        assert (aside / "config.json").read_bytes() == b'{"old": 1}\n'
    assert not list(d.glob(".old-files.*"))


@pytest.mark.parametrize("held", ['{"moved": ["config.json"], "writes": ["../config.json"]}',
                                  '{"moved": ["config.json"]}', '[1]'])
def test_old_files_left_with_a_list_that_names_no_file_here_are_left_for_the_user(tmp_path,
                                                                                   held):
    """An edited held.json could have the undo remove files outside the directory: refused,
    naming it, and nothing is touched."""
    from gptlab.io import old_files_aside
    d = tmp_path / "out"
    before = _old_output(d)
    aside = d / ".old-files.abc"
    aside.mkdir()
    (aside / "config.json").write_bytes(b"older")
    (aside / "held.json").write_text(held)
    (tmp_path / "config.json").write_bytes(b"outside")
    left = _tree(d)
    with pytest.raises(UserError) as e:
        with old_files_aside(d, ("config.json",)):
            raise AssertionError("not reached")
    assert str(e.value).startswith(f"{aside / 'held.json'}" if held == "[1]" else f"{aside}: ")
    assert _tree(d) == left and set(before) < set(left)
    assert (tmp_path / "config.json").read_bytes() == b"outside"


def _arrow_files(tmp_path: Path) -> tuple[Path, Path]:
    """An Arrow IPC file (ARROW1 at its start) and an IPC stream (no magic, as `datasets`
    writes its cache files and save_to_disk's shards), each holding one record."""
    import pyarrow as pa
    table = pa.table({"prompt": ["a"], "completion": [" b"]})
    made = []
    for name, open_writer in (("t.arrow", pa.ipc.new_file), ("cache-1a2b.arrow",
                                                              pa.ipc.new_stream)):
        with pa.OSFile(str(tmp_path / name), "wb") as sink, \
                open_writer(sink, table.schema) as writer:
            writer.write_table(table)
        made.append(tmp_path / name)
    return made[0], made[1]


def test_apache_arrow_read_as_text_or_parquet_is_named_with_its_conversion(tmp_path):
    # A `datasets` cache file given as --data was "not UTF-8 text: byte 0xff at byte offset 0".
    import pyarrow.parquet as pq

    from gptlab.io import json_objects, other_format, utf8_lines
    ipc_file, stream = _arrow_files(tmp_path)
    as_file = (f"is an Apache Arrow file, not text; convert it to Parquet first: python -c "
               f"\"import pyarrow.ipc, pyarrow.parquet as pq; pq.write_table(pyarrow.ipc."
               f"open_file({str(ipc_file)!r}).read_all(), 'data.parquet')\"")
    as_stream = (f"is an Apache Arrow stream (as datasets writes its cache files and "
                 f"save_to_disk's shards), not text; convert it first: datasets.Dataset."
                 f"from_file({str(stream)!r}).to_json('data.jsonl') writes JSON Lines, "
                 f".to_parquet('data.parquet') Parquet")
    assert other_format(ipc_file) == as_file and other_format(stream) == as_stream
    # Known by its magic under any name, as JSON Lines, text or Parquet.
    for suffix in (".jsonl", ".txt", ".parquet"):
        renamed = ipc_file.with_suffix(suffix)
        renamed.write_bytes(ipc_file.read_bytes())
        with pytest.raises(UserError) as e:
            list(json_objects(renamed))
        read_as = "Parquet" if suffix == ".parquet" else "text"
        assert str(e.value) == f"{renamed}: " + as_file.replace(
            repr(str(ipc_file)), repr(str(renamed))).replace("not text", f"not {read_as}")
    with pytest.raises(UserError) as e:
        list(utf8_lines(stream))
    assert str(e.value) == f"{stream}: {as_stream}"
    # The conversion said works: its Parquet holds the records.
    import pyarrow.ipc
    pq.write_table(pyarrow.ipc.open_file(str(ipc_file)).read_all(), tmp_path / "data.parquet")
    assert [r for _, r in json_objects(tmp_path / "data.parquet")] == [
        {"prompt": "a", "completion": " b"}]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_file(str(stream)).to_json(tmp_path / "data.jsonl")
    assert [r for _, r in json_objects(tmp_path / "data.jsonl")] == [
        {"prompt": "a", "completion": " b"}]


def test_text_named_arrow_is_read_as_text_and_an_old_arrow_stream_is_named(tmp_path):
    # A text file named .arrow was refused as an Apache Arrow stream, by its name alone.
    from gptlab.io import other_format, utf8_lines
    text = tmp_path / "notes.arrow"
    text.write_text("hi\n")
    assert other_format(text) is None and list(utf8_lines(text)) == [(1, "hi")]
    (tmp_path / "empty.arrow").write_bytes(b"")
    assert other_format(tmp_path / "empty.arrow") is None
    # A stream in the format before the continuation marker begins with its metadata's length:
    # named by its name and the NUL bytes of that length, as before.
    old = tmp_path / "cache-old.arrow"
    old.write_bytes((272).to_bytes(4, "little") + b"\x10\x00\x00\x00" + b"\x0c" * 8)
    assert other_format(old).startswith("is an Apache Arrow stream")
    old.rename(tmp_path / "cache-old.txt")  # by the name alone: text with NUL bytes
    assert other_format(tmp_path / "cache-old.txt") is None


def test_text_that_begins_with_the_word_arrow1_is_text_and_arrow_files_are_still_named(
        tmp_path):
    # Any file beginning with the six letters ARROW1 was refused as an Apache Arrow file; an
    # IPC file's magic is ARROW1 and two zero bytes of padding, which no text holds.
    from gptlab.data.corpus import read_documents
    from gptlab.io import other_format, utf8_lines
    for i, body in enumerate(("ARROW1 is the magic of Arrow files\n\nsecond doc\n",
                              "ARROW1\nthe word alone on its first line\n", "ARROW1")):
        text = tmp_path / f"notes{i}.txt"
        text.write_text(body, encoding="utf-8")
        assert other_format(text) is None
        assert [line for _, line in utf8_lines(text)] == body.splitlines()
        assert "\n\n".join(read_documents(text)) == body.strip("\n")
    ipc_file, stream = _arrow_files(tmp_path)
    assert ipc_file.read_bytes()[:8] == b"ARROW1\x00\x00"  # as pyarrow writes one
    assert stream.read_bytes()[:4] == b"\xff\xff\xff\xff"
    for arrow, kind in ((ipc_file, "file"), (stream, "stream")):
        named = arrow.with_suffix(".txt")  # by its bytes, not its name
        named.write_bytes(arrow.read_bytes())
        assert other_format(named).startswith(f"is an Apache Arrow {kind}")
        with pytest.raises(UserError, match=f"is an Apache Arrow {kind}"):
            read_documents(named)


def test_a_directory_of_arrow_files_alone_says_how_to_convert_it(tmp_path):
    # A `datasets` save_to_disk directory read as data: "no .jsonl, .parquet files" alone.
    from gptlab.io import read_jsonl
    d = tmp_path / "saved"
    d.mkdir()
    _arrow_files(d)
    with pytest.raises(UserError) as e:
        read_jsonl(d)
    assert str(e.value) == (
        f"{d}: no .jsonl, .ndjson, .parquet files in this directory; it holds 2 Apache Arrow "
        f"files, which no verb reads (the first: cache-1a2b.arrow): convert a datasets "
        f"save_to_disk "
        f"directory with datasets.load_from_disk({str(d)!r}).to_json('data.jsonl') (JSON "
        f"Lines) or .to_parquet('data.parquet'), one file with datasets.Dataset.from_file(FILE)")


def test_json_nested_deeper_than_python_reads_is_refused_naming_the_file(tmp_path):
    # Valid JSON 1,000 levels deep was a RecursionError traceback, exit 1; Python's message
    # for a control character or an unterminated string read "at at column".
    from gptlab.io import json_objects, read_json
    deep = '{"text": "hello", "meta": ' + "[" * 1000 + "]" * 1000 + "}"
    lines = tmp_path / "deep.jsonl"
    lines.write_text('{"text": "fine"}\n' + deep + "\n")
    with pytest.raises(UserError) as e:
        list(json_objects(lines))
    assert str(e.value) == (f"{lines}:2: cannot be read: its JSON is nested too deeply (arrays "
                            f"or objects inside one another about 1,000 levels deep, more than "
                            f"Python's reader goes)")
    whole = tmp_path / "deep.json"
    whole.write_text(deep)
    with pytest.raises(UserError, match=r"deep.json: cannot be read: its JSON is nested too"):
        read_json(whole)
    shallow = '{"text": "hello", "meta": ' + "[" * 100 + "]" * 100 + "}"
    lines.write_text(shallow + "\n")
    assert [row["text"] for _, row in json_objects(lines)] == ["hello"]
    for text, said in (('{"text": "a\tb"}', "Invalid control character at column 12"),
                       ('{"text": "abc', "Unterminated string starting at column 10")):
        lines.write_text(text + "\n")
        with pytest.raises(UserError) as e:
            list(json_objects(lines))
        assert f"not valid JSON ({said})" in str(e.value), str(e.value)
