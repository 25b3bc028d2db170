import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptlab.data.corpus import iter_documents, read_documents
from gptlab.data.tokens import tokenize_corpus
from gptlab.errors import UserError
from gptlab.tokenizer import train_tokenizer


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc\nsecond line\n\n\n  \nsecond doc\r\n\nthird\n", encoding="utf-8")
    assert read_documents(f) == ["first doc\nsecond line", "second doc", "third"]


def test_txt_byte_order_mark_is_dropped(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffhello".encode("utf-8"))
    assert read_documents([f]) == ["hello"]


def test_jsonl_text_field_and_blank_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    rows = [{"text": "alpha", "meta": 1}, {"text": "   "}, {"text": "gamma\n\ndelta", "meta": "x"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_documents([str(f)]) == ["alpha", "gamma\n\ndelta"]


def test_a_json_file_is_read_as_json_lines_not_as_text_and_no_directory_reads_one(tmp_path):
    # `datasets`' to_json("c.json") writes JSON Lines: pretraining on it trained on the
    # JSON syntax, '{"text": "alpha"}' as a document, and Alpaca's array too, without a word.
    f = tmp_path / "d" / "c.json"
    f.parent.mkdir()
    f.write_text('{"text": "alpha"}\n{"text": "beta", "meta": 1}\n', encoding="utf-8")
    assert read_documents([f]) == ["alpha", "beta"]
    with pytest.raises(UserError, match="corpus file not found"):  # a name, not a document
        train_tokenizer([str(tmp_path / "missing.json")], vocab_size=270)
    (tmp_path / "d" / "b.txt").write_text("only this", encoding="utf-8")
    assert read_documents([tmp_path / "d"]) == ["only this"]  # a run's config.json is no corpus
    f.write_text('{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_documents([f])
    assert str(e.value) == (f"{f}:1, field 'text': missing the document text; the line has "
                            f"'body'; a .json file is "
                            f"read as JSON Lines: name it .txt to train on its text as it is")
    f.write_text(json.dumps([{"text": "alpha"}], indent=2), encoding="utf-8")
    with pytest.raises(UserError, match=r"c.json:1: starts a JSON array; write JSON Lines"):
        read_documents([f])


def test_jsonl_null_text_is_skipped_as_parquet_null_rows_are(tmp_path):
    # pandas writes a missing text as null; it was "expected a string, got NoneType".
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "x y"}\n{"text": null}\n{"text": "z"}\n', encoding="utf-8")
    assert read_documents([f]) == ["x y", "z"]


def test_parquet_text_column_skips_nulls(tmp_path):
    f = tmp_path / "a[1].parquet"  # glob characters in the name must not matter
    pq.write_table(pa.table({"text": ["x y", None, "z"], "n": [1, 2, 3]}), f)
    assert read_documents([f]) == ["x y", "z"]


def test_a_parquet_text_column_of_nulls_only_has_no_documents(tmp_path):
    # pandas writes a column whose every value is None with Arrow's null type; it was refused
    # ("expected a string column, got null") where the same rows among texts are skipped.
    f = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [None, None], "n": [1, 2]}), f)  # as pandas writes it
    assert pa.types.is_null(pq.read_schema(f).field("text").type)
    full = tmp_path / "f.parquet"
    pq.write_table(pa.table({"text": ["one"]}), full)
    assert read_documents([f, full]) == ["one"]


def test_a_parquet_file_without_rows_is_still_refused_for_a_text_column_of_numbers(tmp_path):
    # Letting a null-typed column through let every file without rows through as well.
    f = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.int64())}), f)
    with pytest.raises(UserError, match="expected a string column, got int64"):
        read_documents([f])


def test_a_parquet_text_column_of_pandas_category_dtype_is_read_as_text(tmp_path):
    # It was refused ("expected a string column, got dictionary<values=string, ...>"), while
    # the SFT, prompts and rankings readers took the same column.
    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": pa.array(["x y", None, "z", "x y"]).dictionary_encode()}), f)
    assert pa.types.is_dictionary(pq.read_schema(f).field("text").type)
    assert read_documents([f]) == ["x y", "z", "x y"]
    pq.write_table(pa.table({"text": pa.array([1, 2]).dictionary_encode()}), f)
    with pytest.raises(UserError, match="expected a string column, got int64"):
        read_documents([f])


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string(), pa.string_view()])
def test_a_parquet_text_column_of_any_arrow_string_type_is_read(tmp_path, kind):
    # string_view, what Polars writes, was refused ("expected a string column, got
    # string_view") while the record verbs read it.
    f = tmp_path / "s.parquet"
    pq.write_table(pa.table({"text": pa.array(["hello world", None, "foo bar"], kind)}), f)
    assert list(iter_documents([f])) == ["hello world", "foo bar"]


def test_a_parquet_text_column_given_twice_is_refused_naming_it(tmp_path):
    # pyarrow writes two columns of one name; reading it raised a KeyError ('Column text does
    # not exist in schema') with a traceback. A JSON Lines object with `text` twice is refused.
    f = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], ["text", "text"]), f)
    with pytest.raises(UserError) as e:
        read_documents([f])
    assert str(e.value) == (f"{f}, field 'text': is a column 2 times; readers differ in which "
                            f"one they take (pyarrow's to_pylist the last, pandas all of them): "
                            f"keep one")
    # another column twice is no concern of the corpus, which reads `text` alone
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array([1]), pa.array([2])],
                                        ["text", "id", "id"]), f)
    assert read_documents([f]) == ["a"]


def test_several_files_and_a_directory_in_order(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("b1\n\nb2", encoding="utf-8")
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "a1"}\n', encoding="utf-8")
    (tmp_path / "d" / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "c.txt").write_text("c1", encoding="utf-8")
    assert read_documents([tmp_path / "c.txt", tmp_path / "d"]) == ["c1", "a1", "b1", "b2"]


def test_broken_jsonl_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_documents([f])
    assert e.value.line == 3 and str(e.value).startswith(f"{f}:3: not valid JSON")


def test_jsonl_missing_or_wrong_text_field(tmp_path):
    f = tmp_path / "nofield.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_documents([f])
    assert (e.value.line, e.value.field) == (2, "text")
    f.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(UserError, match="expected a string, got int") as e:
        read_documents([f])
    assert e.value.line == 1
    f.write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(UserError, match="JSON object"):
        read_documents([f])


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl"])
def test_non_utf8_names_file_line_and_byte_offset(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError) as e:
        read_documents([f])
    assert e.value.line == 2
    message = str(e.value)
    assert "not UTF-8" in message and "byte offset 30" in message and str(f) in message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="corpus file not found") as e:
        read_documents([tmp_path / "nope.txt"])
    assert e.value.path == tmp_path / "nope.txt"


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("\n  \n\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": ""}\n', encoding="utf-8")
    with pytest.raises(UserError, match="corpus is empty"):
        read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    with pytest.raises(UserError, match="no corpus files"):
        read_documents([])


def test_parquet_without_text_column_and_corrupt_parquet(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"]}), f)
    with pytest.raises(UserError, match="no 'text' column") as e:
        read_documents([f])
    assert e.value.field == "text"
    f.write_bytes(b"\x00not parquet at all")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        read_documents([f])


def corrupt_parquet(path, column, where):
    """A one-column Parquet file whose footer's column name (`where` "name") or first page
    header (`where` "page") is corrupt: the footer, and so the schema, still reads for a page."""
    pq.write_table(pa.table({column: ["the cat is happy"] * 3}), path, compression="none",
                   store_schema=False)
    b = bytearray(path.read_bytes())
    if where == "name":
        b[b.find(column.encode())] = 0xA0   # the schema's name: the first place it is written
    else:
        b[4:8] = b"\xff\xff\xff\xff"         # the page header, right after the magic PAR1
    path.write_bytes(bytes(b))
    return path


@pytest.mark.parametrize("where, message", [
    # pyarrow's UnicodeDecodeError, and a page's OSError met only while `datasets` read it,
    # were tracebacks.
    ("name", "not a readable Parquet file (a column name in its metadata is not UTF-8: is the "
             "file corrupt?)"),
    ("page", "not a readable Parquet file (Couldn't deserialize thrift: "),
])
def test_a_corrupt_parquet_corpus_is_refused_naming_the_file(tmp_path, where, message):
    f = corrupt_parquet(tmp_path / "a.parquet", "text", where)
    with pytest.raises(UserError) as e:
        read_documents([f])
    assert str(e.value).startswith(f"{f}: {message}")


def test_a_parquet_corpus_with_a_map_column_beside_its_text_is_read(tmp_path):
    # Spark and pyarrow write map columns; `datasets`, which read the corpus, typed every column
    # of the file first and stopped with a traceback ("ValueError: Arrow type map<string,
    # int64> does not have a datasets dtype equivalent"), though only `text` is read.
    f = tmp_path / "m.parquet"
    counts = pa.map_(pa.string(), pa.int64())
    pq.write_table(pa.table({
        "text": ["first doc", None, "second doc"],
        "counts": pa.array([[("a", 1)], [], [("b", 2)]], type=counts),
        "meta": pa.array([{"m": [("c", 3)]}] * 3, type=pa.struct([("m", counts)]))}), f)
    assert read_documents([f]) == ["first doc", "second doc"]


def test_reading_leaves_no_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    f = tmp_path / "a.parquet"  # read by pyarrow, as a .jsonl file is read without `datasets`
    pq.write_table(pa.table({"text": ["a", "b"]}), f)
    assert list(iter_documents(f)) == ["a", "b"]
    leftovers = list((tmp_path / "hf").rglob("*")) if (tmp_path / "hf").exists() else []
    assert [p for p in leftovers if p.is_file()] == []


def test_a_parquet_file_without_rows_has_no_documents(tmp_path):
    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    full = tmp_path / "f.parquet"
    pq.write_table(pa.table({"text": ["one", "two"]}), full)
    assert read_documents([empty, full]) == ["one", "two"]
    with pytest.raises(UserError, match=f"the corpus is empty: no non-empty document in "
                                        f"{empty}"):
        train_tokenizer([empty], vocab_size=300)


def test_a_lone_surrogate_in_jsonl_names_file_line_and_field(tmp_path):
    # `\ud800` alone is valid JSON but no text a tokenizer can encode: it crashed tokenizer
    # training (UnicodeEncodeError) and pretraining's batch encoding (TypeError).
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "bad \\ud800"}\n', encoding="utf-8")
    tok = train_tokenizer(["fine"], vocab_size=300)
    for read in (read_documents, lambda p: train_tokenizer(p, vocab_size=300),
                 lambda p: tokenize_corpus(p, tok, tmp_path / "cache")):
        with pytest.raises(UserError) as e:
            read([f])
        assert (e.value.path, e.value.line, e.value.field) == (f, 2, "text")
        assert str(e.value) == (f"{f}:2, field 'text': not valid Unicode: \\ud800 at character 5 "
                                "is half of a UTF-16 surrogate pair without its other half; "
                                "write the character itself or both halves")


def test_parquet_text_that_is_not_utf8_names_file_row_and_field(tmp_path):
    # Parquet stores any bytes in a string column; reading them crashed (UnicodeDecodeError).
    f = tmp_path / "a.parquet"
    raw = pa.array([b"fine", b"bad \xed\xa0\x80"], pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"text": raw}), f)
    with pytest.raises(UserError) as e:
        read_documents([f])
    assert str(e.value) == (f"{f}:2, field 'text': not UTF-8 text: byte 0xed at byte offset 4 "
                            "of the value cannot be decoded; write the text as UTF-8")


def test_a_lone_surrogate_among_texts_to_train_on_names_the_item():
    with pytest.raises(UserError) as e:
        train_tokenizer(["fine", "bad \ud800"], vocab_size=300)
    assert e.value.field == "paths_or_texts[1]" and "U+D800" in str(e.value)


def test_a_file_given_twice_is_refused(tmp_path, monkeypatch):
    # Read twice, its documents filled both training and validation blocks (28 of 30
    # validation blocks of `pretrain --data c.txt c.txt` were training blocks too).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "c.txt").write_text("one doc\n\nanother doc\n", encoding="utf-8")
    (tmp_path / "e.txt").write_text("a third doc\n", encoding="utf-8")
    tok = train_tokenizer(["one doc"], vocab_size=300)
    for paths, message in (
            (["e.txt", "e.txt"], "e.txt, field 'data': is given twice: as e.txt and as e.txt"),
            (["./e.txt", tmp_path / "e.txt"], f"{tmp_path / 'e.txt'}, field 'data': is given "
                                              "twice: as e.txt and as"),
            (["d", "e.txt", "d/c.txt"], "d/c.txt, field 'data': is given twice: as d/c.txt "
                                        "(in d) and as d/c.txt;")):
        for read in (read_documents, lambda p: train_tokenizer(p, vocab_size=300),
                     lambda p: tokenize_corpus(p, tok, tmp_path / "cache")):
            with pytest.raises(UserError) as e:
                read(paths)
            assert str(e.value).startswith(message), str(e.value)
    assert not (tmp_path / "cache").exists()
    assert read_documents(["d", "e.txt"]) == ["one doc", "another doc", "a third doc"]
    # A link inside the directory reaches c.txt twice though the user gave only `d`: say so.
    (tmp_path / "d" / "latest.txt").symlink_to(tmp_path / "d" / "c.txt")
    with pytest.raises(UserError) as e:
        read_documents(["d"])
    assert "remove the link d/latest.txt or give the files one by one" in str(e.value)


def test_files_of_two_splits_given_one_by_one_are_refused_as_their_directory_is(
        tmp_path, monkeypatch):
    # `--data d` of train.txt and test.txt was refused, `--data d/train.txt d/test.txt` read as
    # one corpus: the test split pretrained on (and among the validation blocks).
    monkeypatch.chdir(tmp_path)
    for name in ("train.txt", "test.txt", "notes.txt", "dev/a.txt", "train/b.txt",
                 "test/books/c.txt", "test/books/d.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name + "\n", encoding="utf-8")
    tok = train_tokenizer(["one doc"], vocab_size=300)
    for paths, message in (
            (["train.txt", "test.txt"], "train.txt is train's, test.txt test's"),
            (["notes.txt", "test.txt", "dev"], "dev/a.txt (in dev) is validation's, test.txt "
                                               "test's"),
            (["train", "test/books"], "train/b.txt (in train) is train's, test/books/c.txt (in "
                                      "test/books) test's")):
        for read in (read_documents, lambda p: train_tokenizer(p, vocab_size=300),
                     lambda p: tokenize_corpus(p, tok, tmp_path / "cache")):
            with pytest.raises(UserError) as e:
                read(paths)
            assert str(e.value).startswith("field 'data': gives the files of 2 splits ("), \
                str(e.value)
            assert f"as datasets names them: {message}; read as one, a split held out for " \
                   "evaluation would be trained on: give one split's files" in str(e.value)
    assert not (tmp_path / "cache").exists()
    # One split, or a split word only in a folder above the paths given, names no mix.
    assert read_documents(["train.txt", "notes.txt", "train"]) == ["train.txt", "notes.txt",
                                                                    "train/b.txt"]
    assert len(read_documents(["test/books/c.txt", "test/books/d.txt"])) == 2
    assert read_documents(["test.txt"]) == ["test.txt"]


def test_a_hub_dataset_named_twice_is_refused_before_it_is_read(tmp_path, monkeypatch):
    # A file given twice was refused, a Hub dataset given twice was read twice.
    monkeypatch.chdir(tmp_path)
    tok = train_tokenizer(["one doc"], vocab_size=300)
    for read in (read_documents, lambda p: train_tokenizer(p, vocab_size=300),
                 lambda p: tokenize_corpus(p, tok, tmp_path / "cache")):
        with pytest.raises(UserError) as e:  # Paths, as the CLI gives them
            read([Path("someuser/corpus"), Path("someuser/corpus")])
        assert str(e.value) == ("someuser/corpus, field 'data': is given twice; its documents "
                                "would be read twice: give it once")
    assert not (tmp_path / "cache").exists()


def _hub_returns(monkeypatch, make):
    """`datasets.load_dataset(name, ...)` (a Hub dataset; there is no network here) returns
    `make()`; the name it was asked for is recorded."""
    import datasets
    asked = []

    def load_dataset(name, **kwargs):
        asked.append(name)
        return make()
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return asked


def test_a_hub_name_among_strings_to_train_on_is_the_dataset_not_its_name(monkeypatch):
    # `train_tokenizer("user/name")` read the Hub dataset, `train_tokenizer(["user/name"])`
    # trained on the text "user/name": a tokenizer of the byte tokens and a few merges.
    asked = _hub_returns(monkeypatch, lambda: [{"text": "the quick brown fox"}] * 20)
    tok = train_tokenizer(["someuser/corpus"], vocab_size=300)
    assert asked == ["someuser/corpus"]
    assert tok.encode("the quick") == [tok.hf.token_to_id("the"), tok.hf.token_to_id("Ġquick")]


def test_hub_text_that_is_not_utf8_names_the_dataset_row_field_and_byte(tmp_path, monkeypatch):
    # A Hub dataset's Parquet shards store any bytes as text: reading them failed with "not
    # a local file, and not loadable as a Hugging Face Hub dataset (UnicodeDecodeError: ...)".
    import datasets
    real = datasets.load_dataset
    f = tmp_path / "shard.parquet"
    texts = [f"doc {i}".encode() for i in range(2500)]
    texts[2344] = b"caf\xe9 au lait"  # row 2345, past the first Arrow batches
    pq.write_table(pa.table({"id": list(range(2500)), "text": pa.array(texts, pa.binary())
                             .cast(pa.string(), safe=False)}), f, row_group_size=700)
    asked = _hub_returns(monkeypatch, lambda: real("parquet", data_files=str(f), split="train",
                                                  streaming=True))
    with pytest.raises(UserError) as e:
        read_documents(["someuser/corpus"])
    assert asked == ["someuser/corpus"]
    assert (e.value.path, e.value.line, e.value.field) == ("someuser/corpus", 2345, "text")
    assert str(e.value) == ("someuser/corpus:2345, field 'text': not UTF-8 text: byte 0xe9 at "
                            "byte offset 3 of the value cannot be decoded; write the text as UTF-8")


@pytest.mark.parametrize("rows, message", [
    ([{"text": "fine"}, {"text": 3}],
     "someuser/corpus:2, field 'text': expected a string, got int"),
    ([{"text": None}, {"text": "bad \udce9"}],
     "someuser/corpus:2, field 'text': not UTF-8 text: byte 0xe9 at character 5 cannot be "
     "decoded"),
    ([{"body": "x"}], "someuser/corpus, field 'text': Hub dataset has no 'text' column"),
])
def test_hub_rows_that_are_no_text_name_the_dataset_row_and_field(monkeypatch, rows, message):
    # A number crashed iter_documents (AttributeError: 'int' object has no attribute 'strip').
    _hub_returns(monkeypatch, lambda: iter(rows))
    with pytest.raises(UserError) as e:
        read_documents(["someuser/corpus"])
    assert str(e.value) == message


def test_a_hub_dataset_failing_midway_names_the_row_not_the_name(monkeypatch):
    def rows():
        yield {"text": "fine"}
        raise ConnectionError("connection reset by peer")
    _hub_returns(monkeypatch, rows)
    with pytest.raises(UserError) as e:
        read_documents(["someuser/corpus"])
    assert str(e.value) == ("someuser/corpus: Hugging Face Hub dataset: reading row 2 failed "
                            "(ConnectionError: connection reset by peer)")


def test_pretrain_on_a_hub_dataset_with_bad_text_exits_2_and_writes_nothing(tmp_path,
                                                                            monkeypatch, capsys):
    from gptlab.cli import main
    _hub_returns(monkeypatch, lambda: iter([{"text": "fine"}, {"text": 3.5}]))
    out = tmp_path / "run"
    assert main(["pretrain", "--data", "someuser/corpus", "--model", "tiny", "--out", str(out),
                 "--max-steps", "1", "--no-progress", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "someuser/corpus:2, field 'text': expected a string, got float" in \
        capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("damage", [
    lambda meta: {**meta, "n_documents": "many"},     # was int()'s ValueError, a traceback
    lambda meta: b"\xff" + json.dumps(meta).encode(),  # was a UnicodeDecodeError
])
def test_a_damaged_token_cache_entry_is_rebuilt_not_a_traceback(tmp_path, damage):
    f = tmp_path / "a.txt"
    f.write_text("the cat is happy\n\nthe dog is sad\n", encoding="utf-8")
    tok = train_tokenizer(["the cat is happy", "the dog is sad"], vocab_size=300)
    first = tokenize_corpus([f], tok, tmp_path / "cache")
    meta_path = first.path.with_suffix(".json")
    broken = damage(json.loads(meta_path.read_text()))
    meta_path.write_bytes(broken if isinstance(broken, bytes) else json.dumps(broken).encode())
    again = tokenize_corpus([f], tok, tmp_path / "cache")
    assert not again.reused and again.n_documents == first.n_documents == 2
    assert again.tokens.tolist() == first.tokens.tolist()


def test_a_directory_reads_its_corpus_files_whatever_the_case_of_their_suffix(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.TXT").write_text("one\n\ntwo\n", encoding="utf-8")
    (d / "b.JsonL").write_text(json.dumps({"text": "three"}) + "\n", encoding="utf-8")
    (d / "c.md").write_text("not a corpus file\n", encoding="utf-8")
    assert read_documents(d) == ["one", "two", "three"]


def test_a_directory_reads_its_ndjson_shards_as_json_lines_as_a_file_named_alone_is_read(
        tmp_path, capsys):
    # A `.ndjson` shard named alone was JSON Lines, but beside `.jsonl` ones in a directory it
    # was left out without a word: half the corpus unread, by pretraining and the tokenizer.
    from gptlab.cli import main
    from gptlab.data.corpus import corpus_files
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n", encoding="utf-8")
    (d / "b.ndjson").write_text(json.dumps({"text": "two"}) + "\n", encoding="utf-8")
    (d / "c.NDJSON").write_text(json.dumps({"text": "three"}) + "\n", encoding="utf-8")
    assert read_documents(d) == read_documents(sorted(d.iterdir())) == ["one", "two", "three"]
    assert corpus_files([d]) == [d / "a.jsonl", d / "b.ndjson", d / "c.NDJSON"]
    tok = train_tokenizer(["one two three"], vocab_size=300)
    assert tokenize_corpus([d], tok, tmp_path / "cache").n_documents == 3
    assert main(["tokenizer", "train", "--data", str(d), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    from gptlab.data.tokens import tokenizer_fingerprint
    from gptlab.tokenizer import load_tokenizer
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "tok")) == tokenizer_fingerprint(
        train_tokenizer(["one", "two", "three"], vocab_size=300))
    assert "left out" not in capsys.readouterr().err  # nothing was


def test_the_files_a_corpus_directory_does_not_read_are_named_once_on_stderr(tmp_path, capsys):
    # A `.json` (a run directory's config.json is no corpus), a README or a `.csv` in a corpus
    # directory were left out without a word: a user who expected them read never knew.
    from gptlab.data.corpus import corpus_files
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("one\n", encoding="utf-8")
    (d / "sub" / "b.json").write_text(json.dumps({"text": "two"}) + "\n", encoding="utf-8")
    (d / "README.md").write_text("# about\n", encoding="utf-8")
    (d / ".hidden.json").write_text("{}\n", encoding="utf-8")  # hidden: left out as documented
    assert read_documents(d) == ["one"]
    corpus_files([d])
    assert read_documents([d]) == ["one"]
    assert capsys.readouterr().err == (
        f"note: {d}, left out 2 files that a corpus directory does not read (only .txt, .jsonl, "
        f".ndjson, .parquet): README.md, sub/b.json; to read one, rename it (a .json file of JSON "
        f"Lines as .jsonl) or give it on its own\n")
    for i in range(6):
        (d / f"x{i}.csv").write_text("text\n", encoding="utf-8")
    other = tmp_path / "other"
    d.rename(other)
    (other / "sub" / "b.json").unlink()
    read_documents(other)
    assert capsys.readouterr().err == (
        f"note: {other}, left out 7 files that a corpus directory does not read (only .txt, "
        f".jsonl, .ndjson, .parquet): README.md, x0.csv, x1.csv, x2.csv, x3.csv, 2 more; to read "
        f"one, rename it or give it on its own\n")


def test_a_directory_of_compressed_files_only_names_them_and_how_to_read_them(tmp_path):
    # It said only "no .txt, .jsonl, .parquet files in this directory", of a directory full of
    # data: the compressed shards it had skipped went unnamed.
    import bz2
    import gzip
    d = tmp_path / "corpus"
    (d / "part").mkdir(parents=True)
    (d / "part" / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "one"}\n'))
    (d / "c.txt.bz2").write_bytes(bz2.compress(b"two\n"))
    (d / "notes.md").write_text("not a corpus file\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_documents(d)
    assert str(e.value) == (
        f"{d}: no .txt, .jsonl, .ndjson, .parquet files in this directory; it holds 2 compressed "
        f"files, which no verb reads (the first: c.txt.bz2, bzip2-compressed): decompress it first "
        f"(bunzip2 -k {d}/c.txt.bz2), and the others likewise")
    (d / "c.txt.bz2").unlink()
    with pytest.raises(UserError) as e:
        read_documents(d)
    assert e.value.message.endswith(
        f"; it holds 1 compressed file, which no verb reads (part/b.jsonl.gz, gzip-compressed): "
        f"decompress it first (gunzip -k {d}/part/b.jsonl.gz)")
    (d / "part" / "b.jsonl.gz").unlink()
    with pytest.raises(UserError) as e:  # nothing compressed: nothing more to say
        read_documents(d)
    assert e.value.message == "no .txt, .jsonl, .ndjson, .parquet files in this directory"



def test_a_datasets_arrow_cache_file_given_as_corpus_says_how_to_convert_it(tmp_path):
    # `pretrain --data ~/.cache/huggingface/datasets/.../cache-1a2b.arrow` was "not UTF-8 text:
    # byte 0xff at byte offset 0", as if the file were text in another encoding.
    cache = tmp_path / "cache-1a2b.arrow"
    table = pa.table({"text": ["one doc"]})
    with pa.OSFile(str(cache), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    said = (f"{cache}: is an Apache Arrow stream (as datasets writes its cache files and "
            f"save_to_disk's shards), not text; convert it first: datasets.Dataset.from_file("
            f"{str(cache)!r}).to_json('data.jsonl') writes JSON Lines, .to_parquet("
            f"'data.parquet') Parquet")
    for read in (read_documents, lambda p: train_tokenizer([p], vocab_size=300)):
        with pytest.raises(UserError) as e:
            read(cache)
        assert str(e.value) == said
    d = tmp_path / "saved"  # save_to_disk's directory: its shards, beside no file read
    d.mkdir()
    cache.rename(d / "data-00000-of-00001.arrow")
    with pytest.raises(UserError) as e:
        read_documents(d)
    assert e.value.message == (
        f"no .txt, .jsonl, .ndjson, .parquet files in this directory; it holds 1 Apache Arrow "
        f"file, which no verb reads (data-00000-of-00001.arrow): convert a datasets save_to_disk "
        f"directory with datasets.load_from_disk({str(d)!r}).to_json('data.jsonl') (JSON Lines) or "
        f".to_parquet('data.parquet'), one file with datasets.Dataset.from_file(FILE)")


def test_a_directory_holding_compressed_files_beside_read_ones_is_refused_naming_them(tmp_path):
    # The compressed ones were skipped without a word: a user who gzipped half the shards
    # trained on half the corpus.
    import gzip
    import lzma

    from gptlab.data.corpus import corpus_files
    d = tmp_path / "corpus"
    (d / "part").mkdir(parents=True)
    (d / "a.txt").write_text("one\n", encoding="utf-8")
    (d / "part" / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "two"}\n'))
    (d / "part" / "c.txt.xz").write_bytes(lzma.compress(b"three\n"))
    for read in (read_documents, lambda p: corpus_files([p])):
        with pytest.raises(UserError) as e:
            read(d)
        assert str(e.value) == (
            f"{d}: holds 2 compressed files (the first: part/b.jsonl.gz, gzip-compressed), which "
            f"no verb reads, beside the .txt, .jsonl, .ndjson, .parquet files it reads: left out, "
            f"part of the data would go unread; decompress it first (gunzip -k "
            f"{d}/part/b.jsonl.gz), and the others likewise, or move them out of the directory")
    (d / "part" / "b.jsonl.gz").unlink()
    with pytest.raises(UserError) as e:
        read_documents(d)
    assert e.value.message == (
        f"holds 1 compressed file (part/c.txt.xz, xz-compressed), which no verb reads, beside the "
        f".txt, .jsonl, .ndjson, .parquet files it reads: left out, part of the data would go "
        f"unread; decompress it first (unxz -k {d}/part/c.txt.xz), or move it out of the "
        f"directory")
    # A compressed file that no verb would read decompressed either (a .tar.gz, a .json.gz:
    # a corpus directory reads no .json) is no part of the corpus, as a .md is not.
    (d / "part" / "c.txt.xz").rename(d / "part" / "c.tar.xz")
    (d / "d.json.gz").write_bytes(gzip.compress(b'{"text": "four"}\n'))
    assert read_documents(d) == ["one"]



def test_hidden_files_and_folders_of_a_corpus_directory_are_no_documents(tmp_path):
    # They were read as documents: a notebook's checkpoint copy pretrained on twice, a .git
    # folder's files and __pycache__'s as text.
    d = tmp_path / "corpus"
    for rel, text in (("a.txt", "one"), (".ipynb_checkpoints/a-checkpoint.txt", "one"),
                      (".git/info/exclude.txt", "git"), ("__pycache__/c.txt", "cache"),
                      (".notes.txt", "hidden"), ("part/.b.txt", "hidden"), ("part/b.txt", "two")):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text + "\n", encoding="utf-8")
    (d / ".git" / "x.txt.gz").write_bytes(b"\x1f\x8b")  # nor refused as a compressed one
    assert read_documents(d) == ["one", "two"]
    only_hidden = tmp_path / "hidden"
    (only_hidden / ".ipynb_checkpoints").mkdir(parents=True)
    (only_hidden / ".ipynb_checkpoints" / "a.txt").write_text("one\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_documents(only_hidden)
    assert e.value.message == "no .txt, .jsonl, .ndjson, .parquet files in this directory"


def test_an_unreadable_file_in_a_corpus_directory_is_named(tmp_path, monkeypatch):
    # Looking for compressed files opened every file under the directory: one it could not
    # read escaped as a bare PermissionError (a traceback, exit 1). The test runs as root too,
    # whom no mode keeps from reading, so the refusal is made by a stand-in for open.
    import builtins

    import gptlab.io
    d = tmp_path / "corpus"
    (d / "part").mkdir(parents=True)
    (d / "notes.md").write_text("not a corpus file\n", encoding="utf-8")
    locked = d / "part" / "b.jsonl.gz"
    locked.write_bytes(b"\x1f\x8b")

    def refusing_open(file, *args, **kwargs):
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)
    monkeypatch.setattr(gptlab.io, "open", refusing_open, raising=False)
    message = (f"{locked}: cannot be read (Permission denied) to learn whether it is "
               f"compressed; make it readable or move it out of the directory")
    with pytest.raises(UserError) as e:  # nothing read: the note on compressed files
        read_documents(d)
    assert str(e.value) == message
    (d / "a.txt").write_text("one\n", encoding="utf-8")
    with pytest.raises(UserError) as e:  # beside what is read: the check of .jsonl.gz names
        read_documents(d)
    assert str(e.value) == message


def test_the_decompress_advice_names_the_file_from_where_the_user_stands(tmp_path, monkeypatch):
    # It named the file alone (gunzip -k b.txt.gz), which run where the user stands finds no
    # file: the path is the one given, joined to the file's place in the directory (and quoted
    # for the shell where it must be).
    import gzip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my corpus" / "part").mkdir(parents=True)
    (tmp_path / "my corpus" / "a.txt").write_text("one\n", encoding="utf-8")
    (tmp_path / "my corpus" / "part" / "b.txt.gz").write_bytes(gzip.compress(b"two\n"))
    with pytest.raises(UserError) as e:
        read_documents("my corpus")
    assert ("; decompress it first (gunzip -k 'my corpus/part/b.txt.gz'), or move it"
            in str(e.value))
    (tmp_path / "my corpus" / "a.txt").unlink()
    with pytest.raises(UserError) as e:
        read_documents("my corpus")
    assert str(e.value).endswith("(gunzip -k 'my corpus/part/b.txt.gz')")
    with pytest.raises(UserError) as e:  # a file given on its own: named as given
        read_documents("my corpus/part/b.txt.gz")
    assert "(gunzip -k 'my corpus/part/b.txt.gz')" in str(e.value)


def test_a_corpus_directory_of_two_splits_shards_is_refused_as_a_record_directory_is(tmp_path):
    # `train-*` beside `test-*` were read as one corpus without a word (the record verbs refuse
    # it): the test split pretrained on.
    from gptlab.data.corpus import corpus_files
    d = tmp_path / "wiki"
    (d / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["one", "two"]}), d / "data" / "train-00000-of-00001.parquet")
    (d / "data" / "validation-00000-of-00001.txt").write_text("three\n", encoding="utf-8")
    for read in (read_documents, lambda p: corpus_files([p])):
        with pytest.raises(UserError) as e:
            read(d)
        assert str(e.value) == (
            f"{d}: holds the files of 2 splits (train, validation), as datasets names them: "
            f"data/train-00000-of-00001.parquet is train's, data/validation-00000-of-00001.txt "
            f"validation's; read as one, a split held out for evaluation would be read with the "
            f"others: give one split's file instead ({d}/data/train-00000-of-00001.parquet)")
    (d / "data" / "validation-00000-of-00001.txt").rename(d / "data" / "train-notes.txt")
    assert read_documents(d) == ["one", "two", "three"]  # one split's shards, and other files


def test_a_corpus_directory_of_two_splits_by_file_or_folder_name_is_refused(tmp_path):
    # Only `train-00000-of-00001.*` names counted: train.txt beside test.txt, or the Hub's
    # parquet conversion (default/train/0000.parquet beside default/test/0000.parquet), were
    # read as one corpus, the test split pretrained on.
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.txt").write_text("one\n", encoding="utf-8")
    (d / "eval.txt").write_text("two\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_documents(d)
    assert e.value.message.startswith("holds the files of 2 splits (train, test), as datasets "
                                      "names them: train.txt is train's, eval.txt test's; ")
    assert e.value.message.endswith(f": give one split's file instead ({d}/train.txt)")
    assert read_documents(d / "train.txt") == ["one"]
    hub = tmp_path / "hub"
    for split, text in (("train", "one"), ("test", "two")):
        (hub / "default" / split).mkdir(parents=True)
        pq.write_table(pa.table({"text": [text]}), hub / "default" / split / "0000.parquet")
    with pytest.raises(UserError) as e:
        read_documents(hub)
    assert e.value.message.endswith(f"give one split's folder instead ({hub}/default/train)")
    assert read_documents(hub / "default" / "train") == ["one"]
    # A split word inside a word, in capitals, or in a folder above the one given names none.
    plain = tmp_path / "test" / "books"
    plain.mkdir(parents=True)
    for name in ("contest.txt", "devices.txt", "TRAIN.txt", "retrain.txt", "interval.txt"):
        (plain / name).write_text(name + "\n", encoding="utf-8")
    assert len(read_documents(plain)) == 5


def test_a_run_directory_in_or_at_a_corpus_directory_is_refused_but_one_above_it_is_not(
        tmp_path):
    from gptlab.data.corpus import check_out_of_corpus
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    with pytest.raises(UserError, match="is inside the corpus directory"):
        check_out_of_corpus(corpus / "run", [corpus])
    with pytest.raises(UserError, match="is the corpus directory"):
        check_out_of_corpus(corpus, [corpus])
    check_out_of_corpus(tmp_path / "data", [corpus])  # its parent: the run's files are not read
    check_out_of_corpus(tmp_path / "run", [corpus, tmp_path / "file.txt"])


def test_a_missing_path_with_a_suffix_is_a_missing_file_not_a_hub_dataset(tmp_path,
                                                                           monkeypatch):
    from gptlab.data.corpus import is_hub_name
    monkeypatch.chdir(tmp_path)
    assert is_hub_name("user/dataset") and is_hub_name("user-1/data_set")
    assert not is_hub_name("user/corpus.txt") and not is_hub_name("a/b/c")
    with pytest.raises(UserError, match="corpus file not found"):
        read_documents("user/corpus.txt")


def test_txt_documents_of_a_classic_mac_file_are_separated_by_blank_lines(tmp_path):
    # Lone \r line ends read as one document holding every \r; a \r before a CRLF is a line
    # end of its own, as an editor shows it, so "x\r\r\n" ends a document.
    f = tmp_path / "mac.txt"
    f.write_bytes(b"first doc\rsecond line\r\rsecond doc\r")
    assert read_documents(f) == ["first doc\nsecond line", "second doc"]
    f.write_bytes(b"x\r\r\ny\r\n")
    assert read_documents(f) == ["x", "y"]


def test_a_corpus_file_removed_while_an_earlier_one_is_read_is_named_not_found(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first\n", encoding="utf-8")
    b.write_text("second\n", encoding="utf-8")
    docs = iter_documents([a, b])
    assert next(docs) == "first"
    b.unlink()
    with pytest.raises(UserError) as e:
        next(docs)
    assert str(e.value) == f"{b}: corpus file not found"


def test_tokenize_corpus_refuses_no_files_and_a_bar_changes_no_token(tmp_path, capsys):
    import numpy as np

    from gptlab.data.tokens import _ENCODE_CHUNK
    tok = train_tokenizer(["a b c"], vocab_size=300)
    with pytest.raises(UserError) as e:
        tokenize_corpus([], tok, tmp_path / "cache")
    assert str(e.value) == "field 'data': no corpus files given"
    f = tmp_path / "c.jsonl"  # a whole number of encoding chunks: no last, shorter one
    f.write_text("".join(json.dumps({"text": f"a {i}"}) + "\n" for i in range(2 * _ENCODE_CHUNK)),
                 encoding="utf-8")
    shown = tokenize_corpus([f], tok, tmp_path / "shown", progress=True)
    assert "tokenizing" in capsys.readouterr().err
    quiet = tokenize_corpus([f], tok, tmp_path / "quiet")
    assert shown.n_documents == quiet.n_documents == 2 * _ENCODE_CHUNK
    assert np.array_equal(np.fromfile(shown.path, dtype=shown.dtype),
                          np.fromfile(quiet.path, dtype=quiet.dtype))


def test_an_epoch_sampler_of_nothing_is_refused_and_block_batches_iterate_themselves():
    import numpy as np

    from gptlab.data.tokens import BlockBatches, EpochSampler
    with pytest.raises(ValueError, match="nothing to sample from"):
        EpochSampler(0, 2, seed=0)
    batches = BlockBatches(np.arange(10, dtype=np.uint16), 4, np.array([0]), 2, seed=0)
    assert iter(batches) is batches and next(batches).shape == (2, 5)


def test_a_tokenizer_known_only_by_its_save_is_keyed_by_the_tokenizer_json_it_saves(tmp_path):
    """A tokenizer with no `hf` (any object that saves a tokenizer.json) is keyed by the bytes
    of the file it saves: the same tokenizer, the same key; another, another."""
    import hashlib

    from gptlab.data.tokens import tokenizer_fingerprint

    class SavesItself:
        def __init__(self, texts):
            self.tok = train_tokenizer(texts, vocab_size=300)

        def save(self, directory):
            self.tok.save(directory)

    wrapped = SavesItself(["select name from staff"] * 4)
    wrapped.save(tmp_path)
    saved = hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()
    assert tokenizer_fingerprint(wrapped) == tokenizer_fingerprint(wrapped) == saved
    assert tokenizer_fingerprint(SavesItself(["select id from staff"] * 4)) != saved


def test_an_ndjson_corpus_is_json_lines_and_a_csv_one_is_refused(tmp_path, capsys):
    # `datasets` reads .ndjson as JSON Lines and .csv/.tsv as tables; gptlab read each as plain
    # text and trained on its JSON syntax, or its header, commas and quotes, without a word.
    from gptlab.cli import main
    nd = tmp_path / "c.ndjson"
    nd.write_text(json.dumps({"text": "doc one"}) + "\n" + json.dumps({"text": "doc two"}) + "\n",
                  encoding="utf-8")
    assert read_documents(nd) == ["doc one", "doc two"]
    for missing in ("missing.ndjson", "missing.csv"):  # a path mistyped, not a text
        with pytest.raises(UserError, match="corpus file not found"):
            train_tokenizer([str(tmp_path / missing)], vocab_size=300)
    for name, sep, kind in (("c.csv", "", "comma"), ("c.tsv", ", sep='\\t'", "tab")):
        f = tmp_path / name
        f.write_text('text\n"doc one, with a comma"\n', encoding="utf-8")
        expected = (f"{f}: is {kind}-separated values ({f.suffix}), which gptlab does not read; "
                    f"write its rows as JSON Lines: python -c \"import datasets; "
                    f"datasets.load_dataset('csv', data_files='{f}'{sep}, split='train')"
                    f".to_json('c.jsonl')\"")
        with pytest.raises(UserError) as err:  # refused before the other file is read
            read_documents([nd, f])
        assert str(err.value) == expected
        out = tmp_path / "tok"
        assert main(["tokenizer", "train", "--data", str(f), "--vocab-size", "300",
                     "--out", str(out)]) == 2
        assert expected in capsys.readouterr().err
        assert not out.exists()
