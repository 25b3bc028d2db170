"""Token files (cache, dtype, split) and the `pretrain` stage end to end through the CLI."""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from gptlab.checkpoint import Checkpointer, load_model
from gptlab.cli import main
from gptlab.errors import UserError
from gptlab.data.tokens import (fixed_batches, load_token_data, n_blocks, split_blocks,
                                token_dtype, tokenize_corpus)
from gptlab.tokenizer import load_tokenizer, train_tokenizer
from gptlab.train.loop import read_metrics

WORDS = "the cat sat on a mat and the dog ran to the park with a red ball".split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def documents(n: int = 120, seed: int = 0) -> list[str]:
    """A learnable corpus: short sentences over a tiny vocabulary."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + "."
            for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = documents()
    (d / "a.txt").write_text("\n\n".join(docs) + "\n")
    tok = train_tokenizer(docs, vocab_size=300)
    tok.save(d / "tok")
    return d, docs, tok


def run(*args: str) -> int:
    return main(["pretrain", "--model", "tiny", "--no-progress", "--sample-tokens", "0",
                 *args])


def test_a_corpus_given_twice_or_of_two_splits_fails_before_any_output(tmp_path, capsys):
    # The corpus was first read while the tokenizer trained on it, so stderr said "training a
    # BPE tokenizer (...) on the data" before the error, as if the run had begun.
    for name in ("a.txt", "train.txt", "test.txt"):
        (tmp_path / name).write_text("one doc\n\nanother doc\n", encoding="utf-8")
    a, train, test = (str(tmp_path / n) for n in ("a.txt", "train.txt", "test.txt"))
    for data, says in (([a, a], f"{a}, field '--data': is given twice: as {a} and as {a}; "),
                       ([train, test], "field '--data': gives the files of 2 splits (train, "
                                       "test)")):
        capsys.readouterr()
        assert run("--data", *data, "--out", str(tmp_path / "out"), "--cache-dir",
                   str(tmp_path / "cache")) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"gptlab pretrain: error: {says}") and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def piped(text: str) -> str:
    """A /dev/fd path reading `text` from a pipe, as bash's <(cat more.txt) gives one."""
    r, w = os.pipe()
    os.write(w, text.encode("utf-8"))  # a small text: the pipe's buffer holds it
    os.close(w)
    return f"/dev/fd/{r}"


def test_a_pipe_is_refused_where_the_tokenizer_is_trained_on_the_data(corpus, tmp_path, capsys):
    # The tokenizer trained here read the pipe to its end, and tokenizing read nothing more:
    # its 40 documents were left out of the training data without a word.
    d, docs, _ = corpus
    more = "\n\n".join(documents(40, seed=1)) + "\n"
    pipe = piped(more)
    common = ["--out", str(tmp_path / "out"), "--max-steps", "1", "--block-size", "16",
              "--cache-dir", str(tmp_path / "cache")]
    assert run("--data", str(d / "a.txt"), pipe, *common) == 2
    err = capsys.readouterr().err
    assert err == (f"gptlab pretrain: error: {pipe}, field '--data': is a pipe, which can be read "
                   f"once, and the tokenizer trained on the data reads the corpus before it is "
                   f"tokenized; write it to a file first, or give a tokenizer (--tokenizer)\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    os.close(int(pipe.rsplit("/", 1)[1]))
    # Given a tokenizer, the pipe is read once, all of it.
    pipe = piped(more)
    assert run("--data", str(d / "a.txt"), pipe, "--tokenizer", str(d / "tok"), *common) == 0
    os.close(int(pipe.rsplit("/", 1)[1]))
    info = json.loads((tmp_path / "out" / "run.json").read_text())["data"]
    assert info["documents"] == len(docs) + 40


# --- token files --------------------------------------------------------------------------------

def test_tokens_are_documents_between_bos_and_eos(corpus, tmp_path):
    d, docs, tok = corpus
    tf = tokenize_corpus([d / "a.txt"], tok, tmp_path)
    assert tok.bos_id is not None and tok.bos_id != tok.eos_id
    expected = [i for doc in docs for i in [tok.bos_id] + tok.encode(doc) + [tok.eos_id]]
    assert tf.dtype == "uint16" and tf.n_documents == len(docs)
    assert tf.tokens.tolist() == expected
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_special_token_text_in_a_document_is_text_not_a_boundary(corpus, tmp_path):
    """A document quoting "<|eos|>" (or separated by "<|endoftext|>", as GPT-2 dumps are) keeps
    it as text: BOS and EOS come only at the documents' edges, the blank lines and rows."""
    d, docs, tok = corpus
    quoting = ["the cat <|eos|><|bos|> sat.", "a mat<|endoftext|>the dog ran."]
    (tmp_path / "q.txt").write_text("\n\n".join(quoting) + "\n")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in quoting))
    for name in ("q.txt", "q.jsonl"):
        ids = tokenize_corpus([tmp_path / name], tok, tmp_path / "cache").tokens.tolist()
        assert ids == [i for doc in quoting for i in [tok.bos_id] + tok.encode(doc) + [tok.eos_id]]
        assert (ids.count(tok.bos_id), ids.count(tok.eos_id)) == (2, 2)
        assert tok.decode(ids) == "".join(quoting)


def test_token_cache_is_reused_and_keyed_on_the_files(corpus, tmp_path):
    d, docs, tok = corpus
    src = tmp_path / "c.txt"
    shutil.copy(d / "a.txt", src)
    first = tokenize_corpus([src], tok, tmp_path / "cache")
    stat = os.stat(first.path)
    second = tokenize_corpus([src], tok, tmp_path / "cache")
    assert not first.reused and second.reused and second.path == first.path
    assert os.stat(second.path).st_ino == stat.st_ino
    assert os.stat(second.path).st_mtime_ns == stat.st_mtime_ns
    src.write_text("a different corpus entirely\n")      # new size and mtime: a new entry
    third = tokenize_corpus([src], tok, tmp_path / "cache")
    assert not third.reused and third.key != first.key
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".bin", ".bin",
                                                                        ".json", ".json"]


def test_a_cache_entry_whose_token_file_lost_bytes_is_rebuilt_not_trusted(corpus, tmp_path):
    d, docs, tok = corpus
    first = tokenize_corpus([d / "a.txt"], tok, tmp_path)
    want = first.tokens.tolist()
    with open(first.path, "r+b") as f:  # a disk-full copy, or a file cut short by hand
        f.truncate(first.path.stat().st_size - 2)
    again = tokenize_corpus([d / "a.txt"], tok, tmp_path)
    assert not again.reused and again.n_tokens == first.n_tokens
    assert again.path.stat().st_size == 2 * first.n_tokens and again.tokens.tolist() == want


def test_a_cached_corpus_too_small_for_a_larger_block_is_refused_as_a_fresh_one_is(corpus,
                                                                                    tmp_path):
    src, cache, tok = tmp_path / "small.txt", tmp_path / "cache", corpus[2]
    src.write_text("the cat sat.\n")
    n = len(tokenize_corpus([src], tok, tmp_path / "other").tokens)
    errors = []
    for _ in range(2):  # fresh (nothing is cached), then cached with no minimum, then reused
        with pytest.raises(UserError) as err:
            load_token_data([src], tok, n, cache_dir=cache)
        errors.append((err.value.field, str(err.value)))
        tokenize_corpus([src], tok, cache)
    assert errors[0] == errors[1] and errors[0][0] == "data"
    assert f"the corpus has {n} tokens, fewer than one training block of {n + 1}" in errors[0][1]
    assert load_token_data([src], tok, n - 1, cache_dir=cache).file.reused


def test_token_cache_is_not_reused_for_new_content_of_the_same_size_and_mtime(corpus, tmp_path):
    # The key was the path, size and mtime: a file rewritten with as many bytes and its mtime
    # set back (`cp -p`, `rsync -t`, `tar x`, `touch -r`) reused the old file's tokens.
    d, docs, tok = corpus
    src = tmp_path / "c.txt"
    src.write_text("aaaa bbbb\n")
    first = tokenize_corpus([src], tok, tmp_path / "cache")
    st = src.stat()
    src.write_text("cccc dddd\n")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = tokenize_corpus([src], tok, tmp_path / "cache")
    assert not second.reused and second.key != first.key
    assert second.tokens.tolist() == [tok.bos_id] + tok.encode("cccc dddd") + [tok.eos_id]


def test_token_cache_is_keyed_on_how_a_file_is_read_not_only_on_its_target(corpus, tmp_path):
    # A link `b.txt -> b.jsonl` is read as text, its target as JSON lines; the key held the
    # resolved path only, so the second reused the first's tokens.
    d, docs, tok = corpus
    (tmp_path / "b.jsonl").write_text('{"text": "the cat"}\n')
    (tmp_path / "b.txt").symlink_to(tmp_path / "b.jsonl")
    as_json = tokenize_corpus([tmp_path / "b.jsonl"], tok, tmp_path / "cache")
    as_text = tokenize_corpus([tmp_path / "b.txt"], tok, tmp_path / "cache")
    assert not as_text.reused and as_text.key != as_json.key
    assert tok.decode(as_text.tokens.tolist()) == '{"text": "the cat"}'


def test_token_cache_key_follows_the_order_of_hub_datasets_and_files(corpus, tmp_path):
    # Local files were hashed first and Hub names after: [hub, file] and [file, hub], whose
    # documents come in another order, shared one key.
    from gptlab.data.tokens import cache_key
    d, docs, tok = corpus
    f = str(d / "a.txt")
    assert cache_key(["user/ds", f], tok) != cache_key([f, "user/ds"], tok)
    assert cache_key(["user/ds", "other/ds"], tok) != cache_key(["other/ds", "user/ds"], tok)
    assert cache_key([f, "user/ds"], tok) == cache_key([f, "user/ds"], tok)


def test_a_tokenizer_in_memory_and_the_same_one_loaded_from_its_files_share_a_cache_key(
        corpus, tmp_path):
    # Saving adds the post-processor that prepends BOS for transformers; keyed by what it held
    # in memory, the trained tokenizer and its files were two keys and the corpus was
    # tokenized twice.
    from gptlab.data.tokens import cache_key
    from gptlab.tokenizer import load_tokenizer
    d, docs, tok = corpus
    tok.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    f = str(d / "a.txt")
    assert cache_key([f], back) == cache_key([f], tok)


def test_a_corpus_tokenized_again_under_the_new_key_names_the_earlier_entry_and_leaves_it(
        corpus, tmp_path, monkeypatch, capsys):
    """The key of a tokenizer read as saved tokenizes a corpus an earlier version cached again,
    and the earlier entry stayed for good without a word: the cache grew by a corpus."""
    from gptlab.tokenizer import Tokenizer
    d, _, tok = corpus
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:  # as that version keyed a tokenizer
        m.setattr(Tokenizer, "hf_as_saved", lambda self: self.hf)
        earlier = tokenize_corpus([d / "a.txt"], tok, cache)
    capsys.readouterr()
    now = tokenize_corpus([d / "a.txt"], tok, cache)
    assert now.key != earlier.key and not now.reused
    size = earlier.path.stat().st_size / 2**20
    assert capsys.readouterr().err == (
        f"note: the token cache also holds this corpus as an earlier gptlab tokenized it "
        f"({earlier.path} and its .json, {size:.1f} MiB), which only an earlier version reads: "
        f"remove both to free the space, once no run of an earlier version uses them\n")
    # Left in place: a run of the earlier version may be reading it (the cache locks no entry).
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{k}.{ext}" for k in (earlier.key, now.key) for ext in ("bin", "json"))
    assert np.array_equal(earlier.tokens, now.tokens)
    assert tokenize_corpus([d / "a.txt"], tok, cache).reused  # said once, as it is tokenized
    assert capsys.readouterr().err == ""
    for p in cache.glob(f"{earlier.key}.*"):  # removed as the note says: nothing more to say
        p.unlink()
    now.path.unlink()
    tokenize_corpus([d / "a.txt"], tok, cache)
    assert capsys.readouterr().err == ""


def test_a_killed_tokenization_of_another_corpus_leaves_no_temporary_behind(corpus, tmp_path):
    # Only the temporaries of the key being written were removed: a run killed midway, whose
    # corpus was then edited (a new key), left its partial token file in the cache for good.
    d, docs, tok = corpus
    cache = tmp_path / "cache"
    stale = cache / f".{'0' * 32}.bin.k1ll3d.tmp"
    stale.mkdir(parents=True)
    (stale / "file.tmp").write_bytes(b"\0" * 1000)
    (cache / f".{'1' * 32}.json.k1ll3d.tmp").mkdir()
    (cache / ".notes.tmp").write_text("not gptlab's")
    tf = tokenize_corpus([d / "a.txt"], tok, cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [".notes.tmp", f"{tf.key}.bin", f"{tf.key}.json"])


def test_token_cache_is_keyed_on_the_bos_and_eos_from_tokenizer_config(corpus, tmp_path):
    # The key covered tokenizer.json only: a tokenizer with another eos_token (or add_bos) in
    # its tokenizer_config.json reused a token file whose documents the other EOS separated.
    from gptlab.tokenizer import Tokenizer
    d, docs, tok = corpus
    other_eos = Tokenizer(tok.hf, tok.bos_token, "<|pad|>", None)
    no_bos = Tokenizer(tok.hf, tok.bos_token, tok.eos_token, tok.pad_token, add_bos=False)
    first = tokenize_corpus([d / "a.txt"], tok, tmp_path)
    for other in (other_eos, no_bos):
        tf = tokenize_corpus([d / "a.txt"], other, tmp_path)
        assert not tf.reused and tf.key != first.key
        start = [] if other.bos_id is None else [other.bos_id]
        assert tf.tokens.tolist() == [i for doc in docs
                                      for i in start + tok.encode(doc) + [other.eos_id]]
    assert tokenize_corpus([d / "a.txt"], tok, tmp_path).reused


def test_jsonl_and_parquet_give_the_same_tokens_as_text(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, docs, tok = corpus
    with open(tmp_path / "c.jsonl", "w") as f:
        for doc in docs[:60]:
            f.write(json.dumps({"text": doc}) + "\n")
    pq.write_table(pa.table({"text": docs[60:]}), tmp_path / "c.parquet")
    mixed = tokenize_corpus([tmp_path / "c.jsonl", tmp_path / "c.parquet"], tok, tmp_path / "x")
    text = tokenize_corpus([d / "a.txt"], tok, tmp_path / "y")
    assert mixed.tokens.tolist() == text.tokens.tolist()


def test_split_is_seeded_and_disjoint():
    train, val = split_blocks(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    again = split_blocks(100, 0.1, seed=3)
    assert train.tolist() == again[0].tolist() and val.tolist() == again[1].tolist()
    assert split_blocks(100, 0.1, seed=4)[1].tolist() != val.tolist()
    assert len(split_blocks(1, 0.1, 0)[1]) == 0            # a single block stays for training
    assert n_blocks(33, 32) == 1 and n_blocks(32, 32) == 0 and n_blocks(65, 32) == 2
    # The validation ids keep the permutation's order: an evaluation that reads the first few
    # samples the whole corpus, not its first blocks.
    assert val.tolist() != sorted(val.tolist())


def test_a_split_holds_out_at_least_one_block_and_trains_on_at_least_one():
    assert [len(x) for x in split_blocks(10, 0.01, seed=0)] == [9, 1]   # 0.1 rounds to 1, not 0
    assert [len(x) for x in split_blocks(2, 0.9, seed=0)] == [1, 1]     # 1.8 rounds to 2: 1 left
    assert [len(x) for x in split_blocks(10, 0.0, seed=0)] == [10, 0]
    # A half rounds to the even whole, as README says: 8.5 holds out 8, 9.5 holds out 10.
    assert [len(x[1]) for x in (split_blocks(170, 0.05, 0), split_blocks(190, 0.05, 0))] == [8, 10]


def test_fixed_batches_are_the_first_max_batches_full_batches_of_the_ids():
    tokens = np.arange(200, dtype=np.uint16)
    ids = np.array([7, 3, 9, 1, 4, 8, 2, 0, 5])
    batches = fixed_batches(tokens, 4, ids, batch_size=4, max_batches=2)
    assert [b.shape for b in batches] == [(4, 5), (4, 5)]
    assert [int(row[0]) // 4 for b in batches for row in b] == [7, 3, 9, 1, 4, 8, 2, 0]
    assert batches[0][0].tolist() == [28, 29, 30, 31, 32]  # block 7: tokens 28..32
    assert [b.shape[0] for b in fixed_batches(tokens, 4, ids, 4, 5)] == [4, 4, 1]


def test_validation_batches_sample_the_whole_held_out_set_not_its_start():
    # 10,000 blocks, two files of 5,000; 500 held out, of which evaluation reads 10 batches of 8.
    train, val = split_blocks(10_000, 0.05, seed=0)
    assert train.tolist() == sorted(train.tolist())  # the training stream is unchanged
    T = 4
    tokens = np.arange(10_000 * T + 1, dtype=np.uint32)  # token i*T starts block i
    read = [int(row[0]) // T for b in fixed_batches(tokens, T, val, 8, 10) for row in b]
    assert len(read) == len(set(read)) == 80 and set(read) <= set(val.tolist())
    # Once the first 80 held-out blocks by position: 36 to 1919, none from the second file.
    second = sum(i >= 5_000 for i in read)
    assert 25 <= second <= 55 and max(read) > 9_000 and min(read) < 1_000
    assert split_blocks(10_000, 0.05, seed=0)[1].tolist() == val.tolist()  # seeded


def test_blocks_are_context_plus_one_with_shared_boundaries(corpus, tmp_path):
    d, _, tok = corpus
    data = load_token_data([d / "a.txt"], tok, 16, val_fraction=0.0, cache_dir=tmp_path)
    batch = next(data.train_batches(batch_size=3, seed=0))
    assert batch.shape == (3, 17) and batch.dtype == torch.int64
    stream = data.file.tokens
    first = data.train_batches(1, 0).sampler.next_indices()[0]
    assert torch.equal(next(data.train_batches(1, 0))[0],
                       torch.from_numpy(stream[first * 16:first * 16 + 17].astype(np.int64)))


# --- the stage through the CLI ------------------------------------------------------------------

def test_pretrain_learns_and_writes_a_model_directory(corpus, tmp_path):
    d, _, tok = corpus
    out = tmp_path / "run"
    rc = run("--data", str(d / "a.txt"), "--tokenizer", str(d / "tok"), "--out", str(out),
             "--max-steps", "60", "--block-size", "32", "--batch-size", "8", "--eval-every", "20",
             "--cache-dir", str(tmp_path / "cache"), "lr=3e-3", "warmup_steps=10")
    assert rc == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl",
                 "run.json"):
        assert (out / name).exists(), name
    assert Checkpointer(out).latest().name == "step-60"
    val = [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert len(val) == 4                                   # steps 0, 20, 40, 60
    assert all(a > b for a, b in zip(val, val[1:]))        # every validation improves
    assert val[0] > 5.0 and val[-1] < 3.0
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["config"]["lr"] == 3e-3 and run_info["data"]["block_size"] == 32
    model, loaded_tok, meta = load_model(out)
    assert meta["stage"] == "pretrain" and meta["step"] == 60
    assert loaded_tok.encode("the cat") == tok.encode("the cat")
    # `gptlab generate` reads the directory.
    assert main(["generate", "--model", str(out), "--prompt", "the cat", "--greedy",
                 "--max-new-tokens", "5"]) == 0
    # Resuming the finished run trains nothing and keeps its last validation loss.
    assert run("--data", str(d / "a.txt"), "--tokenizer", str(d / "tok"), "--out", str(out),
               "--max-steps", "60", "--block-size", "32", "--batch-size", "8", "--eval-every",
               "20", "--cache-dir", str(tmp_path / "cache"), "lr=3e-3", "warmup_steps=10",
               "--resume") == 0
    meta = json.loads((out / "config.json").read_text())
    assert (meta["step"], meta["val_loss"]) == (60, val[-1])


def test_val_loss_is_the_cross_entropy_of_every_validation_token(corpus, tmp_path):
    # 3 validation blocks in batches of 2: the short last batch's one block weighed as much as
    # the first batch's two (a mean of batch means, 9e-4 off the cross entropy on such a run).
    d, _, tok = corpus
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert run("--data", str(d / "a.txt"), "--tokenizer", str(d / "tok"), "--out", str(out),
               "--max-steps", "2", "--block-size", "16", "--batch-size", "2",
               "--eval-every", "0", "--cache-dir", str(cache), "val_fraction=0.03") == 0
    info = json.loads((out / "run.json").read_text())["data"]
    tokens = np.fromfile(info["cache"], dtype=np.uint16).astype(np.int64)
    n = (len(tokens) - 1) // 16                        # blocks of 17 tokens, stride 16
    val_ids = np.random.default_rng(0).permutation(n)[:round(n * 0.03)]
    assert info["val_blocks"] == len(val_ids) == 3
    blocks = torch.tensor(np.stack([tokens[i * 16:i * 16 + 17] for i in val_ids]))
    model, _, _ = load_model(out)
    with torch.no_grad():
        logits = model.eval()(blocks[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 blocks[:, 1:].reshape(-1)).item()
    last = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r][-1]
    assert last["step"] == 2 and last["val_loss"] == pytest.approx(expected, abs=1e-5)


def test_resume_after_a_crash_gives_the_same_curve(corpus, tmp_path):
    d, _, _ = corpus
    common = ["--data", str(d / "a.txt"), "--max-steps", "12", "--block-size", "16",
              "--batch-size", "4", "--eval-every", "3", "--save-every", "6", "--log-every", "1",
              "--cache-dir", str(tmp_path / "cache"), "seed=1"]
    # No --tokenizer: one is trained on the data, saved with the run and reused on resume.
    assert run(*common, "--out", str(tmp_path / "a")) == 0
    assert run(*common, "--out", str(tmp_path / "b")) == 0
    # Simulate a crash after the step-6 checkpoint: drop step 12, point `latest` back.
    ckpts = tmp_path / "b" / "checkpoints"
    shutil.rmtree(ckpts / "step-12")
    (ckpts / "latest").write_text("step-6\n")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "b" / name).unlink()
    assert run(*common, "--out", str(tmp_path / "b")) == 2     # a run is there: needs --resume
    assert run(*common, "--out", str(tmp_path / "b"), "--resume") == 0

    def curve(p):
        return [(r["step"], r.get("loss"), r.get("lr"), r.get("val_loss"))
                for r in read_metrics(p / "metrics.jsonl")]
    a, b = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert len(a) == 12 + 5 and a == b                     # 12 loss rows + 5 validations, equal
    wa = load_model(tmp_path / "a")[0].state_dict()
    wb = load_model(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert info["resumed_from"] == "step-6"
    assert [(r["from"], r["changed"]) for r in info["resumes"]] == [("step-6", {})]


def test_resume_from_a_named_earlier_step_gives_the_uninterrupted_run(corpus, tmp_path,
                                                                      capsys):
    """--resume-from step-6 on a finished run of 12 steps saved every 3: the same rows and
    weights as a run that never stopped, the later checkpoints left alone or saved again in
    place, `latest` naming the last one saved. A step that is not there, or does not verify,
    is refused naming it and listing the steps there are, with nothing written."""
    d, _, _ = corpus
    common = ["--data", str(d / "a.txt"), "--max-steps", "12", "--block-size", "16",
              "--batch-size", "4", "--eval-every", "3", "--save-every", "3", "--log-every", "1",
              "--keep-checkpoints", "10", "--cache-dir", str(tmp_path / "cache"), "seed=1"]
    assert run(*common, "--out", str(tmp_path / "a")) == 0
    b = tmp_path / "b"
    assert run(*common, "--out", str(b)) == 0
    ckpts = b / "checkpoints"
    files = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    there = f"the checkpoints in {ckpts}: step-3, step-6, step-9, step-12"
    for name in ("step-7", "7", "x"):
        assert run(*common, "--out", str(b), "--resume-from", name) == 2
        err = capsys.readouterr().err
        # A path not there, as typed, or a step it looked for in OUT: named by the flag.
        assert "field '--resume-from'" in err and there in err, err
    step9 = ckpts / "step-9"
    (step9 / "trainer.pt").write_bytes(b"damaged")
    assert run(*common, "--out", str(b), "--resume-from", "step-9") == 2
    assert (f"{step9 / 'trainer.pt'}, field 'resume_from': checkpoint file is missing or corrupt; "
            f"it cannot be resumed from; {there}") in capsys.readouterr().err
    (step9 / "trainer.pt").write_bytes(files[step9 / "trainer.pt"])
    assert {p: p.read_bytes() for p in b.rglob("*") if p.is_file()} == files
    # Step 6 by its number, by its name or by its path (a shell completes that one).
    for name in ("6", "step-6", str(ckpts / "step-6")):
        assert run(*common, "--out", str(b), "--resume-from", name) == 0
        assert f"resuming from {ckpts / 'step-6'} (step 6 of 12)" in capsys.readouterr().err

        def curve(p):
            return [(r["step"], r.get("loss"), r.get("lr"), r.get("val_loss"))
                    for r in read_metrics(p / "metrics.jsonl")]
        assert curve(tmp_path / "a") == curve(b) and len(curve(b)) == 12 + 5
        wa = load_model(tmp_path / "a")[0].state_dict()
        wb = load_model(b)[0].state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert sorted(p.name for p in ckpts.iterdir()) == [
            "latest", "step-12", "step-3", "step-6", "step-9"]
        assert Checkpointer(b).latest() == ckpts / "step-12"
        for step in (3, 6, 9, 12):
            assert (ckpts / f"step-{step}" / "model.safetensors").read_bytes() == (
                tmp_path / "a" / "checkpoints" / f"step-{step}" / "model.safetensors"
            ).read_bytes()
    info = json.loads((b / "run.json").read_text())
    assert [(r["from"], r["changed"]) for r in info["resumes"]] == [("step-6", {})] * 3


def test_a_run_that_diverges_exits_2_and_keeps_its_last_checkpoint(corpus, tmp_path, capsys):
    """At lr 1e10 the second update makes the weights NaN: the run stops there (exit 2), before
    a save, where it saved those weights over step-1 (keep_checkpoints 1) and went on."""
    d, _, _ = corpus
    out = tmp_path / "run"
    assert run("--data", str(d / "a.txt"), "--max-steps", "4", "--block-size", "16",
               "--batch-size", "4", "--eval-every", "0", "--save-every", "1",
               "--keep-checkpoints", "1", "--lr", "1e10", "--weight-decay", "0",
               "--warmup-steps", "0", "--cache-dir", str(tmp_path / "cache"),
               "--out", str(out)) == 2
    ckpt = out / "checkpoints" / "step-1"
    assert (f"{out}: the training diverged at step 2 (loss nan, grad_norm nan): the run stops "
            f"without saving the weights of that update; the last checkpoint, {ckpt}, is kept "
            f"as it was") in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-1"]
    Checkpointer.verify(ckpt)
    model, _, _ = load_model(ckpt)  # refuses non-finite weights
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (out / "config.json").exists()


def test_a_run_checkpointed_before_the_bos_post_processor_resumes_without_a_corpus_warning(
        corpus, tmp_path, monkeypatch, capsys):
    """A checkpoint from before `save` added the post-processor that prepends BOS recorded the
    corpus's key with the tokenizer as held; the cache key now reads it as saved, so the resume
    of such a run warned that the corpus or tokenizer had changed, though neither had."""
    from gptlab.tokenizer import Tokenizer
    d, _, _ = corpus
    data, out = tmp_path / "a.txt", tmp_path / "run"
    shutil.copy(d / "a.txt", data)
    common = ["--data", str(data), "--max-steps", "4", "--block-size", "16",
              "--batch-size", "4", "--save-every", "2", "--out", str(out),
              "--cache-dir", str(tmp_path / "cache")]
    with monkeypatch.context() as m:  # as that version saved and keyed a tokenizer
        m.setattr(Tokenizer, "hf_as_saved", lambda self: self.hf)
        assert run(*common) == 0
    assert json.loads((out / "checkpoints" / "step-2" / "tokenizer.json").read_text())[
        "post_processor"] is None
    shutil.rmtree(out / "checkpoints" / "step-4")  # stopped after step 2
    for name in ("config.json", "model.safetensors"):
        (out / name).unlink()
    capsys.readouterr()
    assert run(*common, "--resume") == 0
    assert "the corpus or tokenizer changed" not in capsys.readouterr().err
    # A corpus that did change is still warned of.
    shutil.rmtree(out / "checkpoints" / "step-4")
    for name in ("config.json", "model.safetensors"):
        (out / name).unlink()
    with open(data, "a") as f:
        f.write("\nthe dog sat.\n")
    assert run(*common, "--resume") == 0
    assert "the corpus or tokenizer changed" in capsys.readouterr().err


def test_a_resume_after_touch_or_a_copy_of_the_same_corpus_is_not_warned_of(corpus, tmp_path,
                                                                            capsys):
    """The resume compared the cache key, which holds each file's times and inode: `touch` or
    a copy of the same text warned that the data position pointed into other blocks. It now
    compares the tokens' digest, which the cache records (and an older entry reads through)."""
    import os
    d, _, _ = corpus
    data, out, cache = tmp_path / "a.txt", tmp_path / "run", tmp_path / "cache"
    shutil.copy(d / "a.txt", data)
    common = ["--data", str(data), "--max-steps", "4", "--block-size", "16",
              "--batch-size", "4", "--save-every", "2", "--out", str(out),
              "--cache-dir", str(cache)]

    def resumed_after_step_2() -> str:
        shutil.rmtree(out / "checkpoints" / "step-4")
        (out / "checkpoints" / "latest").write_text("step-2\n")
        for name in ("config.json", "model.safetensors"):
            (out / name).unlink()
        capsys.readouterr()
        assert run(*common, "--resume") == 0
        return capsys.readouterr().err

    assert run(*common) == 0
    digest = json.loads((out / "checkpoints" / "step-2" / "config.json").read_text())[
        "tokens_digest"]
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch: a new cache key
    err = resumed_after_step_2()
    assert "tokenized" in err and "the corpus or tokenizer changed" not in err
    assert len(list(cache.glob("*.bin"))) == 2  # tokenized again, to the same tokens
    for meta in cache.glob("*.json"):  # entries of a version that recorded no digest
        m = json.loads(meta.read_text())
        del m["sha256"]
        meta.write_text(json.dumps(m))
    err = resumed_after_step_2()
    assert "cached" in err and "the corpus or tokenizer changed" not in err
    data.write_bytes(data.read_bytes())  # a copy in place: another ctime
    assert "the corpus or tokenizer changed" not in resumed_after_step_2()
    assert json.loads((out / "checkpoints" / "step-4" / "config.json").read_text())[
        "tokens_digest"] == digest
    with open(data, "a") as f:  # a corpus that did change is still warned of
        f.write("\nthe dog sat.\n")
    assert "the corpus or tokenizer changed" in resumed_after_step_2()


def test_a_resume_notes_a_model_or_tokenizer_other_than_the_run_s_own_as_unused(corpus,
                                                                               tmp_path, capsys):
    # They were ignored without a word: the run went on with its checkpoint's model and
    # tokenizer, and only run.json's resumes[-1].changed held what was asked.
    d, _, _ = corpus
    out = tmp_path / "run"
    common = ["--data", str(d / "a.txt"), "--block-size", "16", "--batch-size", "4",
              "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert run(*common, "--max-steps", "2") == 0
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["pretrain", "--no-progress", "--sample-tokens", "0", *common, "--max-steps",
                 "3", "--resume", "--model", "gpt1", "--tokenizer", str(d / "tok")]) == 0
    err = capsys.readouterr().err
    assert "note: model (--model) gpt1 is not used: a resume continues the run's own model " \
           "and tokenizer from its checkpoint (the run began with model tiny); train another " \
           "in a new run (another --out)" in err
    assert f"note: tokenizer (--tokenizer) {d / 'tok'} is not used: " in err
    assert "(the run began with tokenizer None)" in err
    assert (out / "model.safetensors").read_bytes() != weights  # trained on: step 3
    # The run's own again, or left out (the default preset): no note.
    assert run(*common, "--max-steps", "4", "--resume") == 0
    assert "is not used" not in capsys.readouterr().err
    assert main(["pretrain", "--no-progress", "--sample-tokens", "0", *common, "--max-steps",
                 "5", "--resume"]) == 0
    assert "is not used" not in capsys.readouterr().err


def test_a_resume_on_another_thread_count_than_its_checkpoint_is_noted(corpus, tmp_path,
                                                                       capsys):
    """The training verbs recorded no thread count, so a resume on another one (bit-exact only
    on the same count) went without a word outside the pipeline."""
    d, _, _ = corpus
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    common = ["--data", str(d / "a.txt"), "--max-steps", "4", "--block-size", "16",
              "--batch-size", "4", "--save-every", "2", "--out", str(out),
              "--cache-dir", str(tmp_path / "cache")]

    def stopped_after_step_2() -> None:
        shutil.rmtree(ckpts / "step-4")
        (ckpts / "latest").write_text("step-2\n")
        for name in ("config.json", "model.safetensors"):
            (out / name).unlink()

    def resumed_on(threads: int) -> list[str]:
        stopped_after_step_2()
        capsys.readouterr()
        torch.set_num_threads(threads)
        try:
            assert run(*common, "--resume") == 0
        finally:
            torch.set_num_threads(1)
        return [line for line in capsys.readouterr().err.splitlines() if "thread" in line]

    assert run(*common) == 0  # on one thread (the module's)
    assert Checkpointer.threads_of(ckpts / "step-2") == 1
    assert resumed_on(2) == [
        f"note: resuming from {ckpts / 'step-2'} on 2 CPU threads, but it was saved on 1: the "
        f"losses may differ in the last bits from a run that never stopped (OMP_NUM_THREADS=1 "
        f"resumes it as it ran)"]
    assert Checkpointer.threads_of(ckpts / "step-4") == 2  # the resumed session's save
    assert resumed_on(1) == []  # step 2 again, on the count it was saved on
    info = json.loads((out / "run.json").read_text())
    assert [r["threads"] for r in info["resumes"]] == [2, 1]


def test_a_resume_refused_for_a_damaged_checkpoint_or_another_setting_writes_nothing(
        corpus, tmp_path, capsys):
    """The checkpoint was verified, and its settings compared, only once training loaded it:
    the refused resume had already marked run.json `resumed_from` it."""
    d, _, _ = corpus
    out = tmp_path / "run"
    common = ["--data", str(d / "a.txt"), "--max-steps", "4", "--block-size", "16",
              "--batch-size", "4", "--eval-every", "0", "--save-every", "2",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert run(*common) == 0
    ckpt = out / "checkpoints" / "step-4"
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert run(*common, "--resume", "--lr", "0.01") == 2
    assert f"{ckpt}, field '--lr': was written with other settings (lr: 0.001 there, 0.01 now)" \
        in capsys.readouterr().err
    # Set by a YAML line or an override, the checkpoint stays named, and what set it is said:
    # it named neither.
    (tmp_path / "lr.yaml").write_text("seed: 0\nlr: 0.01\n")
    for where, flags in ((f"{tmp_path / 'lr.yaml'}:2", ["--config", str(tmp_path / "lr.yaml")]),
                         ("an override on the command line", ["lr=0.01"])):
        assert run(*common, "--resume", *flags) == 2
        assert capsys.readouterr().err.endswith(
            f"{ckpt}, field 'lr': was written with other settings (lr: 0.001 there, 0.01 now); "
            f"resume with the same settings, or choose another out (--out) (now set by "
            f"{where})\n")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    state = ckpt / "trainer.pt"
    state.write_bytes(state.read_bytes()[:-1])  # truncated
    files[state] = state.read_bytes()
    assert run(*common, "--resume") == 2
    assert (f"{state}: checkpoint file is missing or corrupt; remove {ckpt} to resume from the "
            "checkpoint before it") in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_a_resume_refuses_a_checkpoint_tokenizer_larger_than_the_embedding(corpus, tmp_path,
                                                                          capsys):
    """A checkpoint whose tokenizer has more tokens than the model's embedding has rows (its
    tokenizer.json replaced, the manifest made to agree) was resumed as it was: every load of
    a model refuses that, a resume did not check it."""
    import hashlib
    d, docs, _ = corpus
    out = tmp_path / "run"
    common = ["--data", str(d / "a.txt"), "--tokenizer", str(d / "tok"), "--max-steps", "2",
              "--block-size", "16", "--batch-size", "4", "--eval-every", "0", "--save-every",
              "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert run(*common) == 0
    ckpt = out / "checkpoints" / "step-2"
    words = [f"w{i}x{i * 7 % 13}" for i in range(400)]
    big = train_tokenizer(docs + [" ".join(words)] * 3, vocab_size=400)
    assert big.vocab_size > 300
    big.save(ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["sha256"]["tokenizer.json"] = hashlib.sha256(
        (ckpt / "tokenizer.json").read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run(*common, "--resume", "--max-steps", "4") == 2
    assert capsys.readouterr().err == (f"gptlab pretrain: error: {ckpt}, field 'vocab_size': "
                                       f"tokenizer has {big.vocab_size} tokens but the model's "
                                       f"embedding has 300 rows\n")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_pretrain_reads_jsonl_and_parquet(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, docs, _ = corpus
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:60]))
    pq.write_table(pa.table({"text": docs[60:]}), tmp_path / "c.parquet")
    out = tmp_path / "run"
    assert run("--data", str(tmp_path / "c.jsonl"), str(tmp_path / "c.parquet"),
               "--tokenizer", str(d / "tok"), "--out", str(out), "--max-steps", "3",
               "--block-size", "16", "--cache-dir", str(tmp_path / "cache")) == 0
    info = json.loads((out / "run.json").read_text())["data"]
    assert info["documents"] == len(docs)


def test_continue_training_a_model_directory(corpus, tmp_path):
    d, _, tok = corpus
    base = ["--data", str(d / "a.txt"), "--block-size", "16", "--max-steps", "2",
            "--cache-dir", str(tmp_path / "cache")]
    assert run(*base, "--tokenizer", str(d / "tok"), "--out", str(tmp_path / "one")) == 0
    assert main(["pretrain", "--model", str(tmp_path / "one"), "--no-progress",
                 "--sample-tokens", "0", *base, "--out", str(tmp_path / "two")]) == 0
    start = load_model(tmp_path / "one")[0].state_dict()
    _, tok_two, _ = load_model(tmp_path / "two")
    assert tok_two.encode("the red ball") == tok.encode("the red ball")   # the model's tokenizer
    first = read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    last = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "val_loss" in r][-1]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(last["val_loss"], abs=1e-5)
    assert start.keys() == load_model(tmp_path / "two")[0].state_dict().keys()
    # Without its tokenizer.json the model is refused: a new tokenizer trained on the data
    # would give its embeddings other meanings (it did, silently).
    (tmp_path / "one" / "tokenizer.json").unlink()
    assert main(["pretrain", "--model", str(tmp_path / "one"), "--no-progress",
                 *base, "--out", str(tmp_path / "three")]) == 2
    assert not (tmp_path / "three").exists()
    assert main(["pretrain", "--model", str(tmp_path / "one"), "--no-progress", "--sample-tokens",
                 "0", *base, "--tokenizer", str(d / "tok"), "--out", str(tmp_path / "four")]) == 0


def test_the_tokenizer_sizes_a_presets_embedding(corpus, tmp_path):
    # `tiny` kept its 512 rows for a 300-token tokenizer: ids 300-511 were sampled and dropped.
    d, _, tok = corpus
    assert run("--data", str(d / "a.txt"), "--tokenizer", str(d / "tok"), "--block-size", "16",
               "--max-steps", "1", "--cache-dir", str(tmp_path / "cache"),
               "--out", str(tmp_path / "run")) == 0
    assert tok.vocab_size == 300
    assert load_model(tmp_path / "run")[0].config.vocab_size == 300
    # One trained here, asked for the preset's 512, stops short on this small corpus: the
    # embedding follows it too (the demo's kept 2,048 rows for 1,177 tokens).
    assert run("--data", str(d / "a.txt"), "--block-size", "16", "--max-steps", "1",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "own")) == 0
    model, own, _ = load_model(tmp_path / "own")
    assert own.vocab_size < 512 and model.config.vocab_size == own.vocab_size


def test_continuing_a_model_with_another_tokenizer_than_its_own_is_refused(corpus, tmp_path,
                                                                          capsys):
    d, docs, _ = corpus
    base = ["--data", str(d / "a.txt"), "--block-size", "16", "--max-steps", "1",
            "--cache-dir", str(tmp_path / "cache")]
    assert run(*base, "--tokenizer", str(d / "tok"), "--out", str(tmp_path / "one")) == 0
    train_tokenizer(list(reversed(docs)) + ["a dog, a cat"], vocab_size=300).save(
        tmp_path / "other")

    def cont(tokenizer, out):
        return main(["pretrain", "--model", str(tmp_path / "one"), "--no-progress",
                     "--sample-tokens", "0", *base, "--tokenizer", str(tokenizer), "--out",
                     str(out)])
    capsys.readouterr()
    assert cont(tmp_path / "other", tmp_path / "two") == 2
    assert capsys.readouterr().err == (
        f"gptlab pretrain: error: {tmp_path / 'one'}, field '--tokenizer': has its own "
        f"tokenizer.json, which differs from tokenizer (--tokenizer) in its vocabulary and "
        f"merges: its embeddings are rows "
        f"for its own tokens, and another tokenizer would give them other meanings; leave out "
        f"tokenizer (--tokenizer) to continue with its own\n")
    assert not (tmp_path / "two").exists()
    assert cont(d / "tok", tmp_path / "three") == 0  # its own tokenizer, given again


def test_a_tokenizer_that_differs_only_in_bos_first_is_refused_saying_so(corpus, tmp_path):
    """The same tokens with add_bos_token false (and no post-processor that prepends BOS, which
    transformers would go by): another start for every sequence than the model was trained
    with, refused, but the refusal said only that the tokenizer.json differed and that another
    tokenizer would give the embeddings other meanings, which it does not. It says what
    differs, the BOS setting, each way. (`pretrain --model DIR --tokenizer` asks `_given_for`;
    the test above runs it.)"""
    from gptlab.train.pretrain import _given_for
    d, _, tok = corpus
    no_bos = tmp_path / "no-bos"
    no_bos.mkdir()
    config = json.loads((d / "tok" / "tokenizer_config.json").read_text())
    (no_bos / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    tok.hf.save(str(no_bos / "tokenizer.json"))  # no post-processor
    bos_first, plain = load_tokenizer(d / "tok"), load_tokenizer(no_bos)
    assert (bos_first.bos_id, plain.bos_id) == (0, None)
    for own, other_tok, starts, other in (
            (bos_first, plain, "with '<|bos|>' (add_bos_token: true)",
             "with none (add_bos_token: false)"),
            (plain, bos_first, "with none (add_bos_token: false)",
             "with '<|bos|>' (add_bos_token: true)")):
        with pytest.raises(UserError) as e:
            _given_for(tmp_path / "model", own, other_tok)
        assert str(e.value) == (
            f"{tmp_path / 'model'}, field 'tokenizer': has its own tokenizer, the same tokens "
            f"as tokenizer (--tokenizer) but for the start of a sequence: its own starts each "
            f"sequence {starts}, tokenizer (--tokenizer) each {other}; the model was trained on "
            f"the former and would be continued on the latter: leave out tokenizer "
            f"(--tokenizer) to continue with its own")
    assert _given_for(tmp_path / "model", plain, load_tokenizer(no_bos)) is not None
    # add_bos_token false beside the post-processor that prepends BOS is read as transformers
    # reads it, BOS first: the model's own tokenizer.
    shutil.copy(d / "tok" / "tokenizer.json", no_bos / "tokenizer.json")
    same = load_tokenizer(no_bos)
    assert _given_for(tmp_path / "model", bos_first, same) is same


def test_a_tokenizer_saved_before_its_bos_post_processor_is_a_model_s_own(corpus, tmp_path):
    """`save` now gives tokenizer.json the post-processor that prepends BOS for transformers;
    a tokenizer directory saved without it holds the same tokenizer as a model saved since,
    and continues it (it was refused as another tokenizer)."""
    d, _, tok = corpus
    base = ["--data", str(d / "a.txt"), "--block-size", "16", "--max-steps", "1",
            "--cache-dir", str(tmp_path / "cache")]
    assert run(*base, "--tokenizer", str(d / "tok"), "--out", str(tmp_path / "one")) == 0
    old = tmp_path / "old-tok"
    old.mkdir()
    shutil.copy(d / "tok" / "tokenizer_config.json", old)
    tok.hf.save(str(old / "tokenizer.json"))  # as saved before: no post-processor
    assert json.loads((tmp_path / "one" / "tokenizer.json").read_text())["post_processor"]
    assert main(["pretrain", "--model", str(tmp_path / "one"), "--no-progress",
                 "--sample-tokens", "0", *base, "--tokenizer", str(old), "--out",
                 str(tmp_path / "two")]) == 0


# --- bad input: exit code 2, a message naming the problem, nothing left behind ------------------

def _nothing_left(tmp_path, out):
    assert not out.exists()
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_missing_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--data", str(tmp_path / "nope.txt"), "--out", str(out),
               "--cache-dir", str(tmp_path / "cache")) == 2
    assert "nope.txt" in capsys.readouterr().err
    _nothing_left(tmp_path, out)


def test_a_model_file_is_refused_as_not_a_gptlab_directory(corpus, tmp_path, capsys):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    out = tmp_path / "run"
    # A model not found names the flag that gave it; so does one that is there but no gptlab
    # model directory (it named the field, 'model').
    for model, field, why in ((weights, "--model", "not a gptlab model directory"),
                              (tmp_path / "nope.gguf", "--model", "model directory not found")):
        assert run("--data", str(corpus[0] / "a.txt"), "--model", str(model), "--out",
                   str(out), "--cache-dir", str(tmp_path / "cache")) == 2
        assert f"{model}, field '{field}': {why}" in capsys.readouterr().err
    _nothing_left(tmp_path, out)


def test_broken_jsonl_line_names_file_and_line(corpus, tmp_path, capsys):
    _, _, _ = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    out = tmp_path / "run"
    assert run("--data", str(bad), "--tokenizer", str(corpus[0] / "tok"), "--out", str(out),
               "--cache-dir", str(tmp_path / "cache")) == 2
    assert f"{bad}:3" in capsys.readouterr().err
    _nothing_left(tmp_path, out)


def test_corpus_smaller_than_one_block(corpus, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("the cat sat.\n")
    out = tmp_path / "run"
    assert run("--data", str(small), "--tokenizer", str(corpus[0] / "tok"), "--out", str(out),
               "--cache-dir", str(tmp_path / "cache")) == 2
    err = capsys.readouterr().err
    assert "fewer than one training block of 129" in err and "small.txt" in err
    _nothing_left(tmp_path, out)


def test_bad_config_values_name_the_field(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--data", str(corpus[0] / "a.txt"), "--out", str(out), "batch_size=0") == 2
    assert "batch_size" in capsys.readouterr().err
    assert run("--data", str(corpus[0] / "a.txt"), "--out", str(out), "bacth_size=4") == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err
    assert run("--data", str(corpus[0] / "a.txt"), "--out", str(out), "--block-size", "4096",
               "--tokenizer", str(corpus[0] / "tok")) == 2
    assert "context of 128" in capsys.readouterr().err
    assert not out.exists()


def test_a_single_path_for_data_in_python_is_refused_as_a_str(corpus, tmp_path):
    # It was read letter by letter: "c, field 'data': corpus file not found".
    from gptlab.errors import UserError
    from gptlab.train.pretrain import PretrainConfig, pretrain
    path = str(corpus[0] / "a.txt")
    with pytest.raises(UserError) as err:
        pretrain(PretrainConfig(data=path, model="tiny", out=str(tmp_path / "run")))
    assert str(err.value) == (f"field 'data': must be a list, got the single str {path!r}; "
                              f"pass a list: [{path!r}]")
    assert not (tmp_path / "run").exists()


def test_a_hub_dataset_name_is_passed_to_datasets_and_fails_clearly_offline(tmp_path):
    """`user/name` goes to the Hugging Face Hub (no network here): a clear exit 2, no output."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gptlab", "pretrain", "--data", "someuser/corpus",
                        "--model", "tiny", "--out", str(tmp_path / "out"), "--max-steps", "1",
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert "someuser/corpus" in r.stderr and "Hugging Face Hub dataset" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--beta1", "2"], "field '--beta1': must be in [0, 1), got 2.0"),
    (["--lr", "inf"], "field '--lr': must be a finite number, got inf"),
    (["--lr", "nan"], "field '--lr': must be a finite number, got nan"),
    (["--sample-tokens", "-1"], "field '--sample-tokens': must be >= 0, got -1"),
    (["--val-fraction", "1"], "field '--val-fraction': must be in [0, 1), got 1.0"),
    (["--device", "nope"], "field '--device': unknown device 'nope'"),
    # numpy's generators take no negative seed, torch's none past 2**64: both were tracebacks.
    (["--seed", "-1"], "field '--seed': must be in [0, 2**64), got -1"),
    (["--seed", str(2**64)], f"field '--seed': must be in [0, 2**64), got {2**64}"),
])
def test_impossible_settings_fail_before_anything_is_written(corpus, tmp_path, capsys, args,
                                                             message):
    out = tmp_path / "run"
    assert run("--data", str(corpus[0] / "a.txt"), "--tokenizer", str(corpus[0] / "tok"),
               "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *args) == 2
    assert f"gptlab pretrain: error: {message}" in capsys.readouterr().err
    _nothing_left(tmp_path, out)


def test_a_sample_prompt_that_fills_the_context_fails_before_anything_is_written(
        corpus, tmp_path, capsys):
    # The engine refused it at the first evaluation: a ValueError traceback (exit 1) after
    # run.json and metrics.jsonl were written. A prompt one token shorter samples.
    d, _, tok = corpus
    out = tmp_path / "run"
    words = "the cat sat on a mat " * 30
    ids = tok.encode(words)
    fits = tok.decode(ids[:128 - 3])  # EOS + BOS + 125 tokens: 127 of tiny's context of 128
    too_long = tok.decode(ids[:128 - 2])
    base = ["--data", str(d / "a.txt"), "--tokenizer", str(d / "tok"), "--cache-dir",
            str(tmp_path / "cache"), "--block-size", "16", "--max-steps", "1",
            "--sample-tokens", "4"]
    assert run(*base, "--out", str(out), "--sample-prompt", too_long) == 2
    assert ("gptlab pretrain: error: field '--sample-prompt': is 128 tokens as the start of a new "
            "document, which leaves no room in the model's context of 128 for the sample; "
            "shorten it, or set sample_tokens (--sample-tokens) to 0 for no sample"
            ) in capsys.readouterr().err
    _nothing_left(tmp_path, out)
    assert run(*base, "--out", str(out), "--sample-prompt", fits) == 0
    samples = [r["sample"] for r in read_metrics(out / "metrics.jsonl") if "sample" in r]
    assert samples and all(s.startswith(fits) for s in samples)


def test_continuing_a_model_directory_into_itself_is_refused(corpus, tmp_path, capsys):
    d, _, _ = corpus
    base = ["--data", str(d / "a.txt"), "--block-size", "16", "--max-steps", "1",
            "--cache-dir", str(tmp_path / "cache")]
    one = tmp_path / "one"
    assert run(*base, "--tokenizer", str(d / "tok"), "--out", str(one)) == 0
    files = {p: p.stat().st_mtime_ns for p in one.rglob("*")}
    for out, why in ((one, "is the input model (model, --model); training would overwrite it"),
                     (one / "more", f"is inside the input model {one} (model, --model)")):
        assert run(*base, "--model", str(one), "--out", str(out)) == 2
        assert f"{out}, field '--out': {why}; choose another out (--out)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in one.rglob("*")} == files


def test_a_preset_is_a_preset_though_a_directory_has_its_name(corpus, tmp_path, monkeypatch):
    """`--model tiny --out tiny/run` (as `gptlab pipeline --out demo` runs it): the preset, not
    the directory of that name, which is no input model to protect; a gptlab model directory
    named like a preset is continued."""
    d, _, _ = corpus
    monkeypatch.chdir(tmp_path)
    base = ["--data", str(d / "a.txt"), "--tokenizer", str(d / "tok"), "--block-size", "16",
            "--max-steps", "1", "--cache-dir", str(tmp_path / "cache")]
    (tmp_path / "tiny").mkdir()
    assert run(*base, "--model", "tiny", "--out", "tiny/run") == 0
    (tmp_path / "tiny").rename(tmp_path / "runs")
    (tmp_path / "runs" / "run").rename(tmp_path / "tiny")  # now a model named like the preset
    assert run(*base, "--model", "tiny", "--out", "more") == 0
    last = [r for r in read_metrics(tmp_path / "tiny" / "metrics.jsonl") if "val_loss" in r][-1]
    first = read_metrics(tmp_path / "more" / "metrics.jsonl")[0]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(last["val_loss"], abs=1e-5)
    # `--model tiny --out tiny` from the preset, then resumed: a resume never reads --model.
    again = [a if a != "1" else "2" for a in base]  # --max-steps 2
    assert run(*again, "--model", "tiny", "--out", "fresh/tiny", "--save-every", "1") == 0
    monkeypatch.chdir(tmp_path / "fresh")
    more = [a if a != "2" else "4" for a in again]  # --max-steps 4
    assert run(*more, "--model", "tiny", "--out", "tiny", "--save-every", "1", "--resume") == 0
    assert [r["step"] for r in read_metrics(tmp_path / "fresh" / "tiny" / "metrics.jsonl")
            if "loss" in r][-1] == 4


def test_out_in_a_corpus_directory_is_refused(corpus, tmp_path, capsys):
    """Every .txt/.jsonl under a --data directory is read: the run's metrics.jsonl would join
    the corpus, and --resume would find another one."""
    data = tmp_path / "corpus"
    data.mkdir()
    shutil.copy(corpus[0] / "a.txt", data / "a.txt")
    base = ["--tokenizer", str(corpus[0] / "tok"), "--block-size", "16", "--max-steps", "1",
            "--cache-dir", str(tmp_path / "cache")]
    for out, why in ((data, "is the corpus directory (data, --data)"),
                     (data / "run", f"is inside the corpus directory {data} (data, --data)"),
                     (data / "runs" / "a",
                      f"is inside the corpus directory {data} (data, --data)")):
        assert run("--data", str(corpus[0] / "a.txt"), str(data), "--out", str(out),
                   *base) == 2
        assert (f"{out}, field '--out': {why}; the run's own files would become part of the "
                "corpus; choose another out (--out)") in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "corpus"]
    # A directory beside it, or a --data file inside --out, is fine.
    assert run("--data", str(data), "--out", str(tmp_path / "corpus-run"), *base) == 0
    assert run("--data", str(data / "a.txt"), "--out", str(data), *base) == 0


def test_a_document_starts_with_bos_only_where_bos_is_not_eos():
    from types import SimpleNamespace
    from gptlab.data.tokens import document_start
    assert document_start(SimpleNamespace(bos_id=1, eos_id=2)) == [1]
    assert document_start(SimpleNamespace(bos_id=5, eos_id=5)) == []  # GPT-2: <|endoftext|>
    assert document_start(SimpleNamespace(bos_id=None, eos_id=2)) == []


# --- properties of blocks, splits and the sampler ------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gptlab.data.tokens import EpochSampler, gather_blocks  # noqa: E402


@settings(deadline=None, derandomize=True, max_examples=100)
@given(st.integers(2, 300), st.integers(1, 40), st.floats(0, 0.9), st.integers(0, 9))
def test_blocks_make_every_token_but_the_first_a_target_once_and_split_them_apart(
        n_tokens, T, val_fraction, seed):
    tokens = np.arange(n_tokens, dtype=np.uint16)
    n = n_blocks(n_tokens, T)
    assert n * T + 1 <= n_tokens < (n + 1) * T + 1  # as many blocks as fit, no more
    if n == 0:
        return
    train, val = split_blocks(n, val_fraction, seed)
    assert sorted(train.tolist() + val.tolist()) == list(range(n)) and len(train) >= 1
    blocks = gather_blocks(tokens, T, np.arange(n))
    assert blocks.shape == (n, T + 1)
    assert blocks[:, 1:].flatten().tolist() == list(range(1, n * T + 1))  # each target once
    assert (blocks[1:, 0] == blocks[:-1, -1]).all()  # a block's input starts at its last target


@settings(deadline=None, derandomize=True, max_examples=100)
@given(st.integers(1, 30), st.integers(1, 40), st.integers(0, 5), st.integers(1, 12),
       st.booleans())
def test_the_sampler_draws_each_index_once_per_epoch_and_resumes_where_it_stopped(
        n, batch_size, seed, n_batches, shuffle):
    s = EpochSampler(n, batch_size, seed, shuffle)
    drawn = [s.next_indices().tolist() for _ in range(n_batches)]
    assert all(len(b) == batch_size for b in drawn)
    stream = [i for b in drawn for i in b]
    for e in range(len(stream) // n):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    tail = stream[len(stream) // n * n:]
    assert len(set(tail)) == len(tail)  # a part epoch repeats nothing either
    resumed = EpochSampler(n, batch_size, seed, shuffle)
    resumed.load_state(s.state())
    assert [resumed.next_indices().tolist() for _ in range(3)] == \
        [s.next_indices().tolist() for _ in range(3)]


def test_the_sampler_turns_to_the_next_epoch_as_the_last_index_is_drawn():
    # Drawn to the end of an epoch, the state is the next epoch's start: a sampler that turned
    # only past the end drew nothing more from an order it had used up, and looped forever.
    for n, batch_size in ((4, 4), (6, 3), (5, 2)):
        s = EpochSampler(n, batch_size, seed=0)
        for _ in range(n // batch_size):
            s.next_indices()
        left = n % batch_size
        turned = {"epoch": 1, "index": 0} if left == 0 else {"epoch": 0, "index": n - left}
        assert s.state() == turned
        if left:
            assert len(s.next_indices()) == batch_size
            assert s.state() == {"epoch": 1, "index": batch_size - left}


def test_a_sample_cut_inside_a_character_ends_before_it(corpus, monkeypatch):
    """The sample logged at each evaluation, cut at sample_tokens between the byte tokens of
    "€", ended in U+FFFD; it ends before the split character, as `gptlab sample` writes a cut
    response. A sample that ended on its own keeps the U+FFFD it chose to end on."""
    import gptlab.engine
    from gptlab.engine import Generation
    from gptlab.train.pretrain import PretrainConfig, _sampler
    _, _, tok = corpus
    said = tok.encode(" ran €")
    assert len(tok.encode("€")) > 1 and tok.decode(said[:-1]) == " ran \ufffd"
    made = {"finished": False}

    def generate(model, prompts, params, seed=None, pad_id=0):
        tokens = said[:-1] + ([tok.eos_id] if made["finished"] else [])
        return Generation([tokens], [[0.0] * len(tokens)], [made["finished"]])
    monkeypatch.setattr(gptlab.engine, "generate", generate)
    sample = _sampler(tok, PretrainConfig(sample_prompt="the dog", sample_tokens=4), 128)
    assert sample(None, 1, 0.0) == {"sample": "the dog ran "}
    made["finished"] = True
    assert sample(None, 1, 0.0) == {"sample": "the dog ran \ufffd"}


def test_a_tokenizer_that_differs_only_in_its_eos_is_refused_saying_so(corpus, tmp_path):
    """The same tokenizer.json with another eos_token (tokenizer_config.json): another token
    between documents than the model was trained with, and another that it learned ends one. It
    was accepted, as only tokenizer.json and BOS were compared; it is refused, saying what
    differs, alone or beside another BOS setting."""
    from gptlab.train.pretrain import _given_for
    d, _, tok = corpus
    config = json.loads((d / "tok" / "tokenizer_config.json").read_text())

    def variant(name: str, **changes):
        path = tmp_path / name
        path.mkdir()
        (path / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))
        shutil.copy(d / "tok" / "tokenizer.json", path / "tokenizer.json")
        return load_tokenizer(path)
    own = load_tokenizer(d / "tok")
    pad_ends = variant("pad-ends", eos_token="<|pad|>")
    assert (own.eos_id, pad_ends.eos_id) == (1, 2)
    keep = ("the model was trained on the former and would be continued on the latter: leave "
            "out tokenizer (--tokenizer) to continue with its own")
    with pytest.raises(UserError) as e:
        _given_for(tmp_path / "model", own, pad_ends)
    assert str(e.value) == (
        f"{tmp_path / 'model'}, field 'tokenizer': has its own tokenizer, the same tokens as "
        f"tokenizer (--tokenizer) but for the end of a document: its own ends each document "
        f"with '<|eos|>' (eos_token), tokenizer (--tokenizer) each with '<|pad|>'; {keep}")
    # Another BOS setting too: both are said.
    no_bos = tmp_path / "no-bos"
    no_bos.mkdir()
    (no_bos / "tokenizer_config.json").write_text(json.dumps(
        {**config, "add_bos_token": False, "eos_token": "<|pad|>"}))
    tok.hf.save(str(no_bos / "tokenizer.json"))  # no post-processor
    with pytest.raises(UserError) as e:
        _given_for(tmp_path / "model", own, load_tokenizer(no_bos))
    assert str(e.value) == (
        f"{tmp_path / 'model'}, field 'tokenizer': has its own tokenizer, the same tokens as "
        f"tokenizer (--tokenizer) but for the start of a sequence and the end of a document: "
        f"its own starts each sequence with '<|bos|>' (add_bos_token: true) and ends each "
        f"document with '<|eos|>' (eos_token), tokenizer (--tokenizer) starts each with none "
        f"(add_bos_token: false) and ends each with '<|pad|>'; {keep}")
    # Only what does not reach the model (its chat template) may differ.
    templated = variant("templated", chat_template="{{ messages[0]['content'] }}")
    assert _given_for(tmp_path / "model", own, templated) is templated


def test_a_tokenizer_that_differs_only_in_its_post_processor_continues_the_model(corpus,
                                                                                tmp_path):
    """A tokenizer.json whose only difference is its post-processor (what transformers adds
    around a text) was refused as another tokenizer whose ids would give the embeddings other
    meanings. gptlab encodes without it, and the BOS it prepends is the BOS setting: where
    that agrees, every document gets the same ids, and the tokenizer is accepted, BOS first or
    not; and a pretraining run continues the model with it."""
    from tokenizers import processors

    from gptlab.data.tokens import document_start
    from gptlab.train.pretrain import _given_for
    d, docs, tok = corpus
    config = json.loads((d / "tok" / "tokenizer_config.json").read_text())

    def variant(name: str, post_processor, **changes):
        path = tmp_path / name
        path.mkdir()
        (path / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))
        hf = load_tokenizer(d / "tok").hf
        hf.post_processor = post_processor
        hf.save(str(path / "tokenizer.json"))
        return load_tokenizer(path)
    # BOS first in both; transformers' tokenizer(text) would end this one's sequences with EOS
    bos_eos = variant("bos-eos", processors.TemplateProcessing(
        single="<|bos|> $A <|eos|>", special_tokens=[("<|bos|>", 0), ("<|eos|>", 1)]))
    # BOS first in neither; a byte-level post-processor only moves offsets
    plain = variant("plain", None, add_bos_token=False)
    offsets = variant("offsets", processors.ByteLevel(trim_offsets=True), add_bos_token=False)
    own = load_tokenizer(d / "tok")
    for mine, theirs in ((own, bos_eos), (plain, offsets)):
        mine_json, theirs_json = (json.loads(t.hf_as_saved().to_str()) for t in (mine, theirs))
        assert mine_json["post_processor"] != theirs_json["post_processor"]
        assert {**mine_json, "post_processor": None} == {**theirs_json, "post_processor": None}
        assert _given_for(tmp_path / "model", mine, theirs) is theirs
        for doc in docs:
            assert document_start(mine) + mine.encode(doc) + [mine.eos_id] == \
                document_start(theirs) + theirs.encode(doc) + [theirs.eos_id]
    assert document_start(own) == [0] and document_start(plain) == []
    assert bos_eos.hf.encode("the cat").ids[-1] == 1 != own.hf.encode("the cat").ids[-1]
    base = ["--data", str(d / "a.txt"), "--block-size", "16", "--max-steps", "1",
            "--cache-dir", str(tmp_path / "cache")]
    assert run(*base, "--tokenizer", str(d / "tok"), "--out", str(tmp_path / "one")) == 0
    assert main(["pretrain", "--model", str(tmp_path / "one"), "--no-progress",
                 "--sample-tokens", "0", *base, "--tokenizer", str(tmp_path / "bos-eos"),
                 "--out", str(tmp_path / "two")]) == 0


def test_a_tokenizer_that_differs_only_in_its_decoder_is_refused_saying_what_it_changes(
        corpus, tmp_path):
    """A tokenizer.json whose only difference is its decoder was refused saying that another
    tokenizer would give the embeddings other meanings: a decoder gives no token an id, it
    reads the ids the model writes back as text. The refusal says so."""
    from tokenizers import decoders

    from gptlab.train.pretrain import _given_for
    d, _, _ = corpus
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(d / "tok" / "tokenizer_config.json", fused)
    hf = load_tokenizer(d / "tok").hf
    hf.decoder = decoders.Fuse()  # no byte-level decoding: "Ġcat" stays "Ġcat"
    hf.save(str(fused / "tokenizer.json"))
    own, given = load_tokenizer(d / "tok"), load_tokenizer(fused)
    assert own.encode("the cat sat") == given.encode("the cat sat")
    assert own.decode(own.encode("the cat")) == "the cat" != given.decode(own.encode("the cat"))
    keep = "leave out tokenizer (--tokenizer) to continue with its own"
    with pytest.raises(UserError) as e:
        _given_for(tmp_path / "model", own, given)
    assert str(e.value) == (
        f"{tmp_path / 'model'}, field 'tokenizer': has its own tokenizer.json, which differs "
        f"from tokenizer (--tokenizer) only in its decoder: a document gets the same token ids "
        f"from either, but the decoder turns the ids the model writes back into text, and the "
        f"latter's would read its samples and replies as other text than its own does; {keep}")
    assert "other meanings" not in str(e.value)
    # Beside another EOS: the tokens are the same, the EOS and the decoders differ.
    (fused / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((d / "tok" / "tokenizer_config.json").read_text()),
         "eos_token": "<|pad|>"}))
    with pytest.raises(UserError) as e:
        _given_for(tmp_path / "model", own, load_tokenizer(fused))
    assert str(e.value).endswith(
        "but for the end of a document: its own ends each document with '<|eos|>' (eos_token), "
        "tokenizer (--tokenizer) each with '<|pad|>' (their decoders differ too, which turn the "
        f"ids the model writes back into text); the model was trained on the former and would "
        f"be continued on the latter: {keep}")


def test_a_model_that_pretraining_cannot_start_from_is_refused_naming_the_flag(
        corpus, tmp_path, capsys):
    d, _, _ = corpus
    data = ["--data", str(d / "a.txt"), "--block-size", "16", "--max-steps", "1",
            "--cache-dir", str(tmp_path / "cache")]
    (tmp_path / "plain").mkdir()
    for args, said in (
            (["--model", "transformer-base"],
             "field '--model': preset 'transformer-base' is not a decoder-only GPT"),
            (["--model", str(tmp_path / "plain")],
             f"{tmp_path / 'plain'}, field '--model': not a gptlab model directory (config.json "
             f"with format gptlab/1); import other models with `gptlab convert` first"),
            (["--tokenizer", str(tmp_path / "none")],
             f"{tmp_path / 'none'}, field '--tokenizer': tokenizer not found")):
        assert main(["pretrain", "--model", "tiny", "--no-progress", *data, *args,
                     "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == f"gptlab pretrain: error: {said}\n"
        assert not (tmp_path / "out").exists()
    assert main(["pretrain", "--model", "tiny", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("gptlab pretrain: error: field 'data': no training "
                                       "data: give data (--data FILE...)\n")


def test_a_tokenizer_larger_than_the_model_s_embedding_is_refused(corpus, tmp_path, capsys):
    d, docs, _ = corpus
    base = ["--data", str(d / "a.txt"), "--block-size", "16", "--max-steps", "1",
            "--cache-dir", str(tmp_path / "cache")]
    assert run(*base, "--tokenizer", str(d / "tok"), "--out", str(tmp_path / "one")) == 0
    (tmp_path / "one" / "tokenizer.json").unlink()
    big = train_tokenizer(docs + ["zebra quagga"], vocab_size=400)
    big.save(tmp_path / "big")
    capsys.readouterr()
    assert main(["pretrain", "--model", str(tmp_path / "one"), "--no-progress", *base,
                 "--tokenizer", str(tmp_path / "big"), "--out", str(tmp_path / "two")]) == 2
    assert capsys.readouterr().err.endswith(
        f"field '--tokenizer': the tokenizer has {big.vocab_size} tokens but the model's embedding "
        f"has 300 rows\n")
    assert big.vocab_size > 300
