"""Hand-built cases for the data pipeline (corpus reading, the token cache, blocks and the
split, SFT examples, the world's splits, dialogs and corpus) that a mutation pass found
unchecked: each test here failed on a plausible bug (named in its docstring) that the rest of
the suite let through."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptlab.data.corpus import check_out_of_corpus, read_documents
from gptlab.data.tokens import cache_key
from gptlab.errors import UserError
from gptlab.tokenizer import train_tokenizer

DOCS = ["the cat sat on the mat.", "a dog ran to the park.", "the red ball is on the mat."]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, vocab_size=300)


# --- corpus.py ---------------------------------------------------------------------------------

def test_a_parquet_text_column_of_large_strings_is_read_as_text(tmp_path):
    """Arrow's large_string (64-bit offsets: what polars writes, and pyarrow for long texts) is
    a string column as much as string is. Accepting string only (a large_string column refused
    as "expected a string column") went unseen."""
    f = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": pa.array(["x y", None, "z"], pa.large_string())}), f)
    assert pa.types.is_large_string(pq.read_schema(f).field("text").type)
    assert read_documents([f]) == ["x y", "z"]


@pytest.mark.parametrize("blank", ["", " "])
def test_an_empty_corpus_path_is_refused_before_a_run_writes_anything(tmp_path, blank):
    """`Path("")` is the current directory: every corpus file under it would be read.
    `check_out_of_corpus` (called before a run writes) refuses it by name; dropping that check
    went unseen, as the readers refuse it later on their own."""
    with pytest.raises(UserError, match="an empty path; name a corpus file or directory") as e:
        check_out_of_corpus(tmp_path / "run", [tmp_path / "a.txt", blank])
    assert e.value.field == "data"
    with pytest.raises(UserError) as e:
        check_out_of_corpus(tmp_path / "run", [blank], flag="--ptx-data")
    assert e.value.field == "ptx_data"


# --- tokens.py: the cache key ------------------------------------------------------------------

class _Shifted:
    """A stat result with one field moved on by one: the rest read through."""

    def __init__(self, real, name: str):
        self._real, self._name = real, name

    def __getattr__(self, name):
        value = getattr(self._real, name)
        return value + 1 if name == self._name else value


@pytest.mark.parametrize("stat_field,keyed", [
    ("st_size", True), ("st_mtime_ns", True), ("st_ctime_ns", True), ("st_ino", True),
    ("st_atime_ns", False)])  # reading a file is no change to it
def test_each_stat_field_of_a_corpus_file_keys_the_token_cache(tmp_path, tok, monkeypatch,
                                                               stat_field, keyed):
    """The key holds a file's size, mtime, ctime and inode, each on its own: where timestamps
    are coarse (a second, on some filesystems) a rewrite within the second changes only the
    size, and `cp -p` or `touch -r` sets the mtime back. Leaving the size, the mtime or the
    inode out went unseen (every test's rewrite changed the ctime too)."""
    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    before = cache_key([str(src)], tok)
    real = Path.stat

    def stat(self, *args, **kwargs):
        st = real(self, *args, **kwargs)
        return _Shifted(st, stat_field) if self.name == "a.txt" else st

    monkeypatch.setattr(Path, "stat", stat)
    assert (cache_key([str(src)], tok) != before) == keyed


def test_a_bos_setting_alone_keys_the_token_cache_where_tokenizer_json_prepends_bos(tmp_path,
                                                                                     tok):
    """A tokenizer.json whose post-processor prepends BOS (Llama's) saves the same with
    add_bos on or off: only the key's own "start:" tells their token files apart. Keying EOS
    alone went unseen (the suite's add_bos=False tokenizer changed tokenizer.json too), and
    the file with BOS before every document was reused for a tokenizer without it."""
    from gptlab.data.tokens import tokenize_corpus
    from gptlab.tokenizer import Tokenizer

    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    llama_like = tok.hf_as_saved()
    with_bos = Tokenizer(llama_like, tok.bos_token, tok.eos_token, tok.pad_token)
    without = Tokenizer(llama_like, tok.bos_token, tok.eos_token, tok.pad_token, add_bos=False)
    assert with_bos.hf_as_saved().to_str() == without.hf_as_saved().to_str()
    first = tokenize_corpus([src], with_bos, tmp_path / "cache")
    second = tokenize_corpus([src], without, tmp_path / "cache")
    assert not second.reused and second.key != first.key
    assert second.tokens.tolist() == [i for d in DOCS for i in tok.encode(d) + [tok.eos_id]]
    assert first.tokens.tolist() == [i for d in DOCS
                                     for i in [tok.bos_id] + tok.encode(d) + [tok.eos_id]]


def test_a_killed_runs_temporary_of_a_real_key_is_removed_by_the_next_run(tmp_path, tok):
    """The cache's sweep of killed runs' temporaries matches names of 32 hex digits: the key's
    own length. A key cut to another length went unseen (the suite's stale names were written
    by hand with 32 digits), and every killed run's partial token file stayed for good."""
    from gptlab.data.tokens import tokenize_corpus

    a, b, cache = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "cache"
    a.write_text(DOCS[0] + "\n", encoding="utf-8")
    b.write_text(DOCS[1] + "\n", encoding="utf-8")
    key = cache_key([str(a)], tok)
    assert len(key) == 32 and int(key, 16) >= 0
    stale = cache / f".{key}.bin.k1ll3d.tmp"  # as atomic_path names a write killed midway
    stale.mkdir(parents=True)
    (stale / "file.tmp").write_bytes(b"\0" * 100)
    tf = tokenize_corpus([b], tok, cache)
    assert sorted(p.name for p in cache.iterdir()) == [f"{tf.key}.bin", f"{tf.key}.json"]


def test_a_cache_entry_of_another_format_is_rebuilt_not_read(tmp_path, tok):
    """An entry whose .json names another token format (an earlier layout, without BOS) is
    tokenized again. Reading it whatever its format went unseen."""
    import json

    from gptlab.data.tokens import TOKENS_FORMAT, tokenize_corpus

    src, cache = tmp_path / "a.txt", tmp_path / "cache"
    src.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    first = tokenize_corpus([src], tok, cache)
    meta = cache / f"{first.key}.json"
    record = json.loads(meta.read_text(encoding="utf-8"))
    assert record["format"] == TOKENS_FORMAT == "gptlab-tokens/2"
    meta.write_text(json.dumps({**record, "format": "gptlab-tokens/1"}), encoding="utf-8")
    again = tokenize_corpus([src], tok, cache)
    assert not again.reused and again.tokens.tolist() == first.tokens.tolist()
    assert json.loads(meta.read_text(encoding="utf-8"))["format"] == TOKENS_FORMAT
    assert tokenize_corpus([src], tok, cache).reused


def test_a_corpus_of_exactly_one_block_trains_on_it(tmp_path, tok):
    """block_size + 1 tokens are one block (inputs and targets of block_size tokens each):
    refusing a corpus that is exactly one block long (`<=` for `<`) went unseen."""
    from gptlab.data.tokens import load_token_data

    src = tmp_path / "a.txt"
    src.write_text(DOCS[0] + "\n", encoding="utf-8")
    n = 1 + len(tok.encode(DOCS[0])) + 1  # BOS + text + EOS
    data = load_token_data([str(src)], tok, block_size=n - 1, val_fraction=0.0,
                           cache_dir=tmp_path / "cache")
    assert data.file.n_tokens == n and data.train_ids.tolist() == [0]
    assert next(data.train_batches(1, seed=0))[0].tolist() == data.file.tokens.tolist()
    with pytest.raises(UserError, match=f"the corpus has {n} tokens, fewer than one training "
                                        f"block of {n + 1}"):
        load_token_data([str(src)], tok, block_size=n, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_a_validation_fraction_outside_0_to_1_is_refused(fraction):
    """val_fraction 1 would hold out every block but one (the floor of one training block),
    not what was asked: it is refused with the field named. Accepting 1 went unseen."""
    from gptlab.data.tokens import split_blocks

    with pytest.raises(UserError, match=r"must be in \[0, 1\)") as e:
        split_blocks(10, fraction, seed=0)
    assert e.value.field == "val_fraction"


def test_the_validation_share_rounds_to_the_nearest_block():
    """10 blocks x 0.17 = 1.7 hold out 2 blocks, not 1: the share rounds, it is not cut down.
    `int()` for `round()` went unseen (every case of the suite was a whole number or below 1).
    default_rng(0) permutes range(10) to 4 6 2 7 3 5 9 0 8 1 (its first 2 are held out)."""
    from gptlab.data.tokens import split_blocks

    train, val = split_blocks(10, 0.17, seed=0)
    assert val.tolist() == [4, 6]
    assert train.tolist() == [0, 1, 2, 3, 5, 7, 8, 9]
    assert [len(x) for x in split_blocks(10, 0.14, seed=0)] == [9, 1]  # 1.4 rounds to 1


def test_the_sampler_reshuffles_every_epoch_by_its_seed_and_number():
    """Epoch e walks default_rng([seed, e])'s permutation: each epoch its own order. Seeding
    every epoch alike (the same order each pass over the data) went unseen: the suite checked
    each index drawn once per epoch, and that a resumed sampler agrees, never that epochs
    differ."""
    import numpy as np

    from gptlab.data.tokens import EpochSampler

    s = EpochSampler(6, 4, seed=3)
    drawn = [s.next_indices().tolist() for _ in range(3)]
    # default_rng([3, 0]), ([3, 1]), ([3, 2]) permute range(6) to these three orders:
    orders = [[2, 5, 4, 1, 3, 0], [1, 2, 0, 4, 5, 3], [4, 0, 1, 2, 3, 5]]
    assert orders == [np.random.default_rng([3, e]).permutation(6).tolist() for e in range(3)]
    assert drawn == [[2, 5, 4, 1], [3, 0, 1, 2], [0, 4, 5, 3]]  # epochs 0 and 1, then 1
    assert s.state() == {"epoch": 2, "index": 0}
    assert s.next_indices().tolist() == [4, 0, 1, 2]
    plain = EpochSampler(6, 4, seed=3, shuffle=False)
    assert [plain.next_indices().tolist() for _ in range(2)] == [[0, 1, 2, 3], [4, 5, 0, 1]]


@pytest.mark.parametrize("fields", [("data", "block_size"), ("ptx_data", "ptx_block_size")])
def test_a_block_size_below_1_is_refused_naming_its_setting(tmp_path, tok, fields):
    """load_token_data refuses block_size 0 itself (PPO's ptx reaches it without pretrain's
    config check): letting 0 through went unseen, and n_blocks then divided by zero."""
    from gptlab.data.tokens import load_token_data

    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="must be at least 1, got 0") as e:
        load_token_data([str(src)], tok, 0, cache_dir=tmp_path / "cache", fields=fields)
    assert e.value.field == fields[1]
    assert not (tmp_path / "cache").exists()


def test_no_earlier_entry_is_noted_where_the_tokenizer_is_saved_as_it_is_held(tmp_path, tok,
                                                                             capsys):
    """Where tokenizer.json already prepends BOS, the earlier version's key is this one: the
    entry just written is no earlier one, to be removed. Noting it so (the `earlier == key`
    check dropped) went unseen."""
    from gptlab.data.tokens import note_earlier_entry, tokenize_corpus
    from gptlab.tokenizer import Tokenizer

    src, cache = tmp_path / "a.txt", tmp_path / "cache"
    src.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    held = Tokenizer(tok.hf_as_saved(), tok.bos_token, tok.eos_token, tok.pad_token)
    assert cache_key([str(src)], held, as_saved=False) == cache_key([str(src)], held)
    tf = tokenize_corpus([src], held, cache)
    assert note_earlier_entry([str(src)], held, tf.key, cache) is None
    assert capsys.readouterr().err == ""


def test_a_reused_token_file_counts_its_documents_as_the_fresh_one_did(tmp_path, tok):
    """The entry's .json keeps the document count that a reused file reports. Writing another
    count there (the token count) went unseen: only a fresh file's count was checked."""
    import json

    from gptlab.data.tokens import tokenize_corpus

    src, cache = tmp_path / "a.txt", tmp_path / "cache"
    src.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    fresh = tokenize_corpus([src], tok, cache)
    reused = tokenize_corpus([src], tok, cache)
    n = sum(len(tok.encode(d)) + 2 for d in DOCS)
    assert (fresh.n_documents, fresh.n_tokens, fresh.reused) == (3, n, False)
    assert (reused.n_documents, reused.n_tokens, reused.reused) == (3, n, True)
    meta = json.loads((cache / f"{fresh.key}.json").read_text(encoding="utf-8"))
    assert (meta["n_documents"], meta["n_tokens"], meta["eos_id"]) == (3, n, tok.eos_id)


def test_training_batches_are_drawn_in_the_order_of_the_seed_given(tmp_path, tok):
    """TokenData.train_batches hands its seed to the sampler: ignoring it (every run drawing
    seed 0's order) went unseen."""
    from gptlab.data.tokens import EpochSampler, load_token_data

    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(DOCS * 4) + "\n", encoding="utf-8")
    data = load_token_data([str(src)], tok, 4, val_fraction=0.0, cache_dir=tmp_path / "cache")
    n = len(data.train_ids)
    assert n >= 10
    firsts = []
    for seed in (0, 1, 2):
        batch = next(data.train_batches(3, seed=seed))
        ids = data.train_ids[EpochSampler(n, 3, seed).next_indices()]
        stream = data.file.tokens
        assert batch.tolist() == [stream[i * 4:i * 4 + 5].tolist() for i in ids]
        firsts.append(batch.tolist())
    assert firsts[0] != firsts[1] != firsts[2] != firsts[0]


# --- the world: questions, dialogs, corpus ------------------------------------------------------

SMALL = dict(n_train=300, n_validation=60, n_test=120, n_dialogs=40, corpus_chars=30_000)


@pytest.fixture(scope="module")
def small_world():
    from gptlab.world import build_world
    return build_world(3, **SMALL)


def _city_combos(n_intents: int = 2):
    """Combos of intents of four phrasings over the cities (as test_world's)."""
    from dataclasses import replace

    from gptlab.world.database import CITIES
    from gptlab.world.intents import INTENTS
    from gptlab.world.questions import Combo

    combos = []
    for k in range(n_intents):
        intent = replace(INTENTS[0], name=f"i{k}", phrasings=tuple(f"{x} {{city}}" for x in "abcd"))
        combos += [Combo(intent, (("city", c),), f"SELECT {k}, {j}", ((j + 1,),))
                   for j, c in enumerate(CITIES * 2)]
    return combos


def test_question_ids_count_from_1_in_five_digits_per_split():
    """Ids are `{prefix}-{split}-00001` on: counting from 0 went unseen (the suite checked the
    ids unique only), and every exported id, which samples and scores refer to, moved by one."""
    import random

    from gptlab.world.questions import SplitSizes, build_questions

    splits, _ = build_questions(_city_combos(), SplitSizes(train=12, validation=3, test=4),
                                random.Random(0), "t")
    for split, n in (("train", 12), ("validation", 3), ("test", 4)):
        assert [q.id for q in splits[split]] == [f"t-{split}-{i:05d}" for i in range(1, n + 1)]


def test_a_dialog_longer_than_the_limit_is_drawn_again(monkeypatch):
    """A dialog whose messages pass _MAX_CHARS (the demo model's context) is dropped and drawn
    again: dropping the check went unseen, as no default dialog reaches 1,000 characters."""
    import gptlab.world.dialogs as dialogs
    from gptlab.world import build_world

    monkeypatch.setattr(dialogs, "_MAX_CHARS", 400)
    world = build_world(3, **SMALL)
    sizes = [sum(len(m["content"]) for m in d.messages) for d in world.dialogs]
    assert len(sizes) == 40 and max(sizes) <= 400
    assert [d.id for d in world.dialogs] == [f"s3-dialog-{i:05d}" for i in range(1, 41)]


def test_a_result_document_shows_eight_rows_and_counts_the_rest():
    """The corpus's "SQL and result" text lists the first 8 rows, then how many more; one row
    is "1 row". Listing 7 went unseen."""
    from gptlab.world.corpus import _result_doc
    from gptlab.world.questions import Combo

    intent = _city_combos(1)[0].intent
    ten = Combo(intent, (), "SELECT x", tuple((i, i / 3) for i in range(10)))
    doc = _result_doc(ten)
    lines = doc.split("\n")
    assert lines[:2] == ["SQL: SELECT x", "Result (10 rows):"]
    assert lines[2:] == [f"{i} | {i / 3:.2f}" for i in range(8)] + ["... and 2 more rows"]
    eight = Combo(intent, (), "SELECT y", tuple((i,) for i in range(8)))
    assert _result_doc(eight).split("\n")[1:] == ["Result (8 rows):"] + [str(i) for i in range(8)]
    one = Combo(intent, (), "SELECT z", (("Lyon",),))
    assert _result_doc(one) == "SQL: SELECT z\nResult (1 row):\nLyon"


def test_only_a_test_record_says_whether_its_phrasing_is_the_reserved_one(small_world):
    """sft.jsonl and validation.jsonl carry no `unseen_phrasing` (no question of theirs is in
    a reserved phrasing; the field would be a constant and change the files' bytes);
    test.jsonl's says it per question. Writing it on every record went unseen."""
    world = small_world
    keys = ["id", "prompt", "completion", "question", "intent", "kind", "values", "phrasing"]
    for q in world.train[:5] + world.validation[:5]:
        assert list(world.record(q)) == keys
    test = [world.record(q) for q in world.test]
    assert all(list(r) == keys + ["unseen_phrasing"] for r in test)
    assert {r["unseen_phrasing"] for r in test} == {True, False}
    assert sum(r["unseen_phrasing"] for r in test) == world.manifest()["counts"]["unseen_phrasing"]


def test_a_corpus_question_in_the_prompt_format_is_the_sft_record_s_prompt_and_completion(
        small_world):
    """Half the question documents are the exact prompt, then " " + SQL: what SFT's record
    (prompt, completion " " + SQL) and generation show the model. Dropping the space (the
    corpus teaching "SQL:SELECT") went unseen."""
    import random

    from gptlab.world.build import format_prompt
    from gptlab.world.corpus import _question_doc

    world = small_world
    q = world.train[0]
    record = world.record(q)

    class Draw(random.Random):
        def __init__(self, x):
            super().__init__(0)
            self.x = x

        def random(self):
            return self.x

    assert _question_doc(q, world.schema, Draw(0.25), format_prompt) == \
        record["prompt"] + record["completion"]
    assert _question_doc(q, world.schema, Draw(0.75), format_prompt) == \
        f"Question: {q.text}\nSQL: {q.sql}"
    docs = world.corpus().split("\n\n")
    in_prompt_format = [d for d in docs if d.startswith(world.schema.render() + "\nQuestion: ")]
    assert in_prompt_format and all("\nSQL: SELECT " in d for d in in_prompt_format)


def test_the_schema_document_names_each_table_s_columns_without_the_parenthesis():
    """The corpus's schema text reads "The table departments has the columns id, name, city,
    budget." Keeping the schema line's ")" (a cut off by one) went unseen."""
    from gptlab.world.corpus import _schema_doc
    from gptlab.world.schema import make_schema

    assert _schema_doc(make_schema()) == (
        "The table departments has the columns id, name, city, budget. "
        "The table employees has the columns id, name, dept_id, city, salary, hire_year. "
        "The table projects has the columns id, name, dept_id, budget. "
        "The table assignments has the columns employee_id, project_id, role, hours.")


# --- instruct.py ------------------------------------------------------------------------------

def test_a_ranking_read_from_a_directory_of_shards_keeps_its_shard_and_line(tmp_path):
    """Rankings, like demonstrations, keep the shard they came from (`file`) beside their line,
    which the reward stage's errors name. Dropping the rankings' went unseen."""
    import json

    from gptlab.data.instruct import read_rankings

    d = tmp_path / "rankings"
    d.mkdir()
    rows = [{"prompt": "Is the cat happy?", "chosen": "yes", "rejected": "no"},
            {"prompt": "Is the dog happy?", "ranked": [["yes", "maybe"], "no"]},
            {"prompt": "Is it red?", "ranked": ["no", "yes"]}]
    for name, part in (("train-00000-of-00002.jsonl", rows[:2]),
                       ("train-00001-of-00002.jsonl", rows[2:])):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    got = read_rankings(d)
    assert [(r.file, r.line) for r in got] == [
        (str(d / "train-00000-of-00002.jsonl"), 1), (str(d / "train-00000-of-00002.jsonl"), 2),
        (str(d / "train-00001-of-00002.jsonl"), 1)]
    assert [r.groups for r in got] == [[0, 1], [0, 0, 1], [0, 1]]
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    assert [(r.file, r.line) for r in read_rankings(one)] == [(None, 1)]


@pytest.mark.parametrize("blank", ["", " "])
def test_an_empty_corpus_path_is_refused_as_such_before_the_current_directory_is_listed(
        tmp_path, tok, monkeypatch, blank):
    """The readers' own check of an empty path came after `corpus_files` had taken it for the
    current directory: read_documents, tokenize_corpus and load_token_data (PPO's ptx, the
    pipeline's evaluation) said what was wrong with the files there (two splits, a file given
    twice, no corpus file) instead."""
    from gptlab.data.corpus import corpus_files
    from gptlab.data.tokens import load_token_data, tokenize_corpus

    for name in ("train.txt", "test.txt"):
        (tmp_path / name).write_text("x y\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for read in (lambda: read_documents([blank]),
                 lambda: read_documents(["train.txt", blank]),
                 lambda: corpus_files([blank], "ptx_data"),
                 lambda: tokenize_corpus([blank], tok, tmp_path / "cache"),
                 lambda: load_token_data([blank], tok, 4, cache_dir=tmp_path / "cache")):
        with pytest.raises(UserError) as e:
            read()
        assert e.value.message == "an empty path; name a corpus file or directory"
        assert e.value.field in ("data", "ptx_data")
    assert not (tmp_path / "cache").exists()


def test_a_varied_schema_world_s_ids_name_its_schema_seed():
    """Question and dialog ids of a world with a renamed schema carry `v{schema seed}`: its
    samples cannot be scored against the default world's questions by mistake. Dropping it
    went unseen (the suite compared a varied world's questions to the default's by text)."""
    from gptlab.world import build_world

    varied = build_world(3, vary_schema=True, schema_seed=5, **SMALL)
    assert varied.train[0].id == "s3v5-train-00001" and varied.test[0].id == "s3v5-test-00001"
    assert varied.dialogs[0].id == "s3v5-dialog-00001"
    own = build_world(3, vary_schema=True, **SMALL)  # the schema seed defaults to the seed
    assert own.validation[0].id == "s3v3-validation-00001"


def test_an_answer_closed_by_eos_right_after_it_ends_with_eos_alone():
    """A Llama 2 template that writes " " + answer + EOS (no space before EOS): an empty
    answer is "▁", "</s>", all of whose text is the lead " " before an answer. The lead ends
    exactly at the first token's end, so the end of a response is "</s>" alone, as every
    answer ends. Passing that point only where the text runs past the lead (`>` for `>=`)
    went unseen: EOS writes no text, and the end kept the lead's "▁"."""
    import test_tokenizer
    from gptlab.data.instruct import encode_response, end_of_response

    template = test_tokenizer.LLAMA2_CHAT.replace("' ' + eos_token", "eos_token")
    assert template != test_tokenizer.LLAMA2_CHAT
    t = test_tokenizer.sentencepiece_tokenizer(template)
    chat = [{"role": "user", "content": "is the cat happy?"}]
    assert t.answer_lead(chat) == " "
    end = end_of_response(t, chat)
    assert [t.hf.id_to_token(i) for i in end] == ["</s>"]
    for answer in ("yes", "(yes)"):
        assert encode_response(t, answer, chat)[-1:] == end
