"""Raw-text corpora: the documents a tokenizer and a pretraining run read.

A corpus is a list of paths. Each path is read by its suffix:

- `.jsonl` and `.ndjson`, and a `.json` file named on its own: one JSON object per line, the
  document in its `text` field (`datasets`' `to_json` writes JSON Lines under any of them);
- `.parquet`: the document in the `text` column (null rows are skipped);
- `.csv` and `.tsv`: refused, with the command that writes them as JSON Lines (`datasets`
  reads them as tables; read as text, their commas and quotes were trained on);
- anything else: UTF-8 text whose documents are separated by one or more blank lines;
- a directory: every `.txt`, `.jsonl`, `.ndjson` and `.parquet` file under it, in sorted order
  (not a `.json`: a run directory's `config.json` is no corpus; not a hidden one, `.*` or in a
  `__*` folder, as `datasets` reads none); the other files it holds (`README.md`, a `.json`)
  are left out and named in a note on stderr, once a process; the files of two splits as
  `datasets` names them (`train.txt` beside `test.txt`), or a compressed file among them
  (`b.txt.gz`), are refused (`gptlab.io.files_in`), as are the files of two splits given as
  several paths (`train.txt test.txt`);
- a name such as `user/dataset` that is not a local path: a Hugging Face Hub dataset (streamed,
  `train` split, `text` column).

Whitespace-only documents are skipped; a corpus with no document at all is an error.
Parquet is read by pyarrow, a batch of rows at a time, the `text` column alone; Hub datasets by
the Hugging Face `datasets` library, streamed, with a throwaway cache dir and no progress bars.
JSONL is read line by line here, so that every error names its line.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from gptlab.errors import NotFound, UserError, counted
from gptlab.io import (PARQUET_NAMES_NOT_UTF8, check_one_split_given, check_out_of_read_dirs,
                       check_unique_columns, csv_refused, fields_instead, files_in,
                       files_left_out, is_hub_name, json_objects, not_utf8_row, parquet_not_utf8,
                       unreadable_parquet, utf8_lines)
from gptlab.tokenizer import check_text, note_once

# What a directory's files are read by: `.ndjson` is JSON Lines as `.jsonl` is (`datasets`
# shards are named so), a `.json` is none (a run directory's config.json).
CORPUS_SUFFIXES = (".txt", ".jsonl", ".ndjson", ".parquet")
TEXT_FIELD = "text"


def iter_documents(paths: str | Path | Iterable[str | Path],
                   field: str = "data") -> Iterator[str]:
    """Yield every non-empty document of the corpus at `paths`, file after file; `field`: the
    setting that gave the paths, which errors name (PPO's `ptx_data`)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise UserError("no corpus files given")
    corpus_files(paths, field)  # refuses a file given twice before reading any
    n = 0
    for path in paths:
        for doc in _iter_path(path):
            if doc.strip():
                n += 1
                yield doc
    if n == 0:
        raise UserError("the corpus is empty: no non-empty document in "
                        + ", ".join(str(p) for p in paths))


def read_documents(paths: str | Path | Iterable[str | Path]) -> list[str]:
    """All documents of the corpus at `paths`, as a list."""
    return list(iter_documents(paths))


def corpus_files(paths: Sequence[str | Path], field: str = "data") -> list[Path]:
    """The local files the corpus at `paths` reads, in order: a directory stands for its corpus
    files, a Hub dataset for none. A file reached twice (the same path given twice, or a
    directory and a file in it), or a Hub dataset named twice, is a UserError: read twice, its
    documents would fill both training and validation blocks. So are files of two splits as
    `datasets` names them (`train.txt` and `test.txt`, `train/` and `test/`), given one by one
    as a directory of them is refused (`gptlab.io.check_one_split_given`): the held-out split
    would be trained on. So is an empty path, before it is taken for the current directory.
    `field`: the setting that gave the paths, which errors name."""
    files: list[Path] = []
    hows: list[tuple[Path, str]] = []
    reached: dict[Path, str] = {}  # resolved file -> how the corpus first reached it
    hub_names: set[str] = set()
    for given in paths:
        if not str(given).strip():  # Path("") is the current directory: all of it a corpus
            raise UserError("an empty path; name a corpus file or directory", field=field)
        p = Path(given)
        if p.is_dir():
            found = files_in(p, CORPUS_SUFFIXES)  # none is refused
            _note_left_out(p)
        elif p.exists():
            csv = csv_refused(p)  # a table, not text: refused before any file is read
            if csv is not None:
                raise csv
            found = [p]
        elif is_hub_name(given):
            if str(given) in hub_names:
                raise UserError("is given twice; its documents would be read twice: give it "
                                "once", path=str(given), field=field)
            hub_names.add(str(given))
            found = []
        else:
            raise NotFound("corpus file not found", path=p)
        for f in found:
            how = str(f) if f == p else f"{f} (in {given})"
            if f.resolve() in reached:
                # A link in a directory reaches its target a second time: the user gave it once.
                fix = (f"remove the link {f} or give the files one by one" if f.is_symlink()
                       else "give each file once")
                raise UserError(f"is given twice: as {reached[f.resolve()]} and as {how}; its "
                                f"documents would be read twice: {fix}", path=f, field=field)
            reached[f.resolve()] = how
            hows.append((f, how))
        files += found
    check_one_split_given([Path(p) for p in paths if not is_hub_name(p)], hows, field)
    return files


def _note_left_out(d: Path) -> None:
    """Say which files of corpus directory `d` no corpus reads, rather than leave them out
    without a word: `datasets` reads a directory by its commonest suffix, so a user may expect
    its `.json` or `.csv` files read too."""
    left = files_left_out(d, CORPUS_SUFFIXES)
    if not left:
        return
    names = [str(f.relative_to(d)) for f in left[:5]] + (
        [f"{len(left) - 5} more"] if len(left) > 5 else [])
    json_hint = (" (a .json file of JSON Lines as .jsonl)"
                 if any(f.suffix.lower() == ".json" for f in left) else "")
    note_once(d, f"left out {counted(len(left), 'file')} that a corpus directory does not read "
                 f"(only {', '.join(CORPUS_SUFFIXES)}): {', '.join(names)}; to read one, rename "
                 f"it{json_hint} or give it on its own")


def read_once(path: str | Path) -> str | None:
    """What `path` is where its text can be read only once, said for an error (a pipe:
    `/dev/stdin` fed by another command, bash's `<(cat more.txt)`); None for a file, a
    directory, a Hub dataset, or `/dev/stdin` redirected from a file (`< corpus.txt`)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # no such path: a Hub dataset, or missing (refused as such elsewhere)
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return {stat.S_IFIFO: "a pipe", stat.S_IFSOCK: "a socket",
            stat.S_IFCHR: "a character device"}.get(stat.S_IFMT(mode), "no regular file")


def check_out_of_corpus(out: str | Path, paths: Iterable[str | Path], flag: str = "--data",
                        writes: str = "the run's own files") -> None:
    """Refuse a run directory that is, or is inside, a corpus directory: every .txt, .jsonl,
    .ndjson and .parquet file under it is read, so the run's own files (metrics.jsonl, ...) would
    become documents of the corpus, and a resumed run would read another corpus. `writes`:
    what the message says would become part of it."""
    name = flag.lstrip("-").replace("-", "_")
    paths = list(paths)
    if any(not str(given).strip() for given in paths):  # Path(""): all of the current directory
        raise UserError("an empty path; name a corpus file or directory", field=name)
    check_out_of_read_dirs(out, {f"{name}, {flag}": paths}, "corpus", writes)


def _iter_path(path: str | Path) -> Iterator[str]:
    # An empty path was refused by corpus_files; a file is missing here only if removed since.
    p = Path(path)
    if p.is_dir():
        for f in files_in(p, CORPUS_SUFFIXES):
            yield from _iter_file(f)
    elif p.exists():
        yield from _iter_file(p)
    elif is_hub_name(path):
        yield from _iter_hub(str(path))
    else:
        raise NotFound("corpus file not found", path=p)


def document_format(p: str | Path) -> str:
    """How file `p` is read, by its own suffix (a link's, not its target's): `jsonl` (`.json`
    and `.ndjson` too, as `datasets` reads them: read as text, their records' JSON syntax would
    be trained on), `parquet` or `text`."""
    suffix = Path(p).suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
            ".parquet": "parquet"}.get(suffix, "text")


def _iter_file(p: Path) -> Iterator[str]:
    kind = document_format(p)
    if kind == "jsonl":
        yield from _iter_jsonl(p)
    elif kind == "parquet":
        yield from _iter_parquet(p)
    else:
        yield from _iter_text(p)


def _iter_text(p: Path) -> Iterator[str]:
    doc: list[str] = []
    for _, line in utf8_lines(p):
        if line.strip():
            doc.append(line)
        elif doc:
            yield "\n".join(doc)
            doc = []
    if doc:
        yield "\n".join(doc)


def _iter_jsonl(p: Path) -> Iterator[str]:
    # Read here, not by `datasets`: its JSON loader fails on valid files that mix blank lines
    # with fields of varying type, and an error must name the line.
    # A .json file is JSON Lines here, as every other reader takes it; say so where it is not.
    hint = ("; a .json file is read as JSON Lines: name it .txt to train on its text as it is"
            if p.suffix.lower() == ".json" else "")
    for lineno, row in json_objects(p, "a JSON object with a 'text' field" + hint):
        if TEXT_FIELD not in row:
            raise UserError("missing the document text" + fields_instead(row, (TEXT_FIELD,))
                            + hint, path=p, line=lineno, field=TEXT_FIELD)
        if row[TEXT_FIELD] is None:  # no document, as a Parquet file's null rows
            continue
        if not isinstance(row[TEXT_FIELD], str):
            raise UserError(f"expected a string, got {type(row[TEXT_FIELD]).__name__}", path=p,
                            line=lineno, field=TEXT_FIELD)
        try:  # a \ud800 escape alone is valid JSON but no text a tokenizer can encode
            text = check_text(row[TEXT_FIELD], field=TEXT_FIELD, from_json=True)
        except UserError as e:
            raise e.at(p, lineno) from None
        yield text


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[str]:
    """Silence `datasets` (no progress bars, warnings only) and give it a throwaway cache dir."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars = datasets.is_progress_bar_enabled()
    level = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        with tempfile.TemporaryDirectory(prefix="gptlab-datasets-") as cache_dir:
            yield cache_dir
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _iter_parquet(p: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(p)
        rows = pq.read_metadata(p).num_rows
    except (pa.ArrowException, OSError) as e:
        raise unreadable_parquet(p, e) from None
    except UnicodeDecodeError:
        raise UserError(PARQUET_NAMES_NOT_UTF8, path=p) from None
    if TEXT_FIELD not in schema.names:
        raise UserError(f"no '{TEXT_FIELD}' column (columns: {', '.join(schema.names)})",
                        path=p, field=TEXT_FIELD)
    check_unique_columns(p, schema.names, [TEXT_FIELD])
    kind = schema.field(TEXT_FIELD).type
    if pa.types.is_dictionary(kind):  # pandas' category dtype: each distinct text stored once
        kind = kind.value_type
    if pa.types.is_null(kind):  # no documents: pandas' type for a column of missing texts
        return
    # string_view: what Polars writes, which the record verbs read already.
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
        raise UserError(f"expected a string column, got {kind}", path=p, field=TEXT_FIELD)
    if rows == 0:  # no documents
        return
    # Read by pyarrow, the text column alone, as the record verbs read Parquet: `datasets` typed
    # every column of the file first, and one it has no type for (a map, which Spark writes)
    # stopped the corpus with a traceback, though its text was never read.
    try:
        for batch in pq.ParquetFile(p).iter_batches(columns=[TEXT_FIELD]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    except UnicodeDecodeError:  # Parquet stores any bytes as text: say which row
        raise parquet_not_utf8(p, [TEXT_FIELD]) from None
    except (pa.ArrowException, OSError) as e:  # a corrupt page, found only when it is read
        raise unreadable_parquet(p, e) from None


def _iter_hub(name: str) -> Iterator[str]:
    import datasets

    with _quiet_datasets() as cache_dir:
        try:
            ds = datasets.load_dataset(name, split="train", streaming=True, cache_dir=cache_dir)
        except Exception as e:  # network, authentication, unknown name: the user's to fix
            raise UserError(f"not a local file, and not loadable as a Hugging Face Hub dataset "
                            f"({_reason(e)})", path=name) from None
        n = 0  # rows read; errors name row n + 1 as a Parquet file's do
        rows = iter(ds)
        while True:
            try:
                row = next(rows, None)
            except UnicodeDecodeError:  # its Parquet files store any bytes as text
                raise _hub_not_utf8(ds, name, n) from None
            except Exception as e:  # the connection lost midway, a shard that cannot be read
                raise UserError(f"Hugging Face Hub dataset: reading row {n + 1} failed "
                                f"({_reason(e)})", path=name) from None
            if row is None:
                return
            n += 1
            if TEXT_FIELD not in row:
                raise UserError(f"Hub dataset has no '{TEXT_FIELD}' column", path=name,
                                field=TEXT_FIELD)
            text = row[TEXT_FIELD]
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"expected a string, got {type(text).__name__}", path=name,
                                line=n, field=TEXT_FIELD)
            try:
                yield check_text(text, field=TEXT_FIELD)
            except UserError as e:
                raise e.at(name, n) from None


def _reason(e: BaseException) -> str:
    """`e` in one line: its type and the first line of its message."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _hub_not_utf8(ds: Any, name: str, rows_before: int) -> UserError:
    """The value a Hub dataset could not decode as UTF-8, found by reading its rows from
    `rows_before` on as Arrow batches (which hold the raw bytes), named as a local Parquet
    file's is: the row, the column and the byte offset."""
    n = rows_before
    try:
        for batch in ds.skip(rows_before).with_format("arrow").iter(batch_size=1000):
            try:
                batch.to_pylist()
            except UnicodeDecodeError:
                return not_utf8_row(batch, name, n)
            n += batch.num_rows
    except Exception:  # noqa: S110 - the row stays unknown; the message below says so
        pass
    return UserError(f"not UTF-8 text in row {rows_before + 1} or a row soon after; write the "
                     f"text as UTF-8", path=name, field=TEXT_FIELD)
