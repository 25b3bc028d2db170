"""Strict JSON out of every writer: a NaN or an infinity is null named in the record's
`non_finite` field, or refused before anything is written; the readers read it back, and read
an earlier version's bare NaN too."""
import json
import math

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
