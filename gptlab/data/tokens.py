"""Corpus -> one memory-mapped token file -> packed blocks -> resumable shuffled batches.

1. `tokenize_corpus` encodes every document once, as BOS + text + EOS, into a flat file of
   token ids (uint16 when the vocabulary fits, else uint32) under the token cache (no BOS
   where the tokenizer has none, or where it is EOS itself, as GPT-2's is):
   `$GPTLAB_CACHE/tokens/` (default `~/.cache/gptlab/tokens/`, or the `cache_dir` argument).
   The file is named by a key: sha256 of the sources in their order (every file's format,
   absolute path, size, mtime, ctime and inode; a Hub dataset's name) plus the tokenizer's
   JSON as `save` writes it (`tokenizer_fingerprint`: a tokenizer trained in memory and the
   same one loaded from its files are one key) and the BOS and EOS ids it writes around
   each document, so a second run over the same files with the same tokenizer reuses it,
   and editing a file or changing the tokenizer makes a new one. `KEY.bin` is written under
   a temporary name and renamed; `KEY.json` (counts, dtype) is written after it, so a cache
   entry without its `.json` is never read, and an error leaves nothing behind (a killed
   run's temporary is removed by the next run that tokenizes into the cache). A corpus
   tokenized under a key that an earlier version computed otherwise (a tokenizer keyed as
   held, before `save` added the post-processor that prepends BOS) leaves that version's
   entry in place, with a note naming it (`note_earlier_entry`).
2. The token stream is cut into blocks of `block_size + 1` tokens with stride `block_size`:
   block i is tokens[i*T : i*T + T + 1], inputs are its first T tokens and targets its last T,
   so every token is a target exactly once.
3. `split_blocks` holds out a seeded random `val_fraction` of the blocks for validation, in
   a seeded random order: an evaluation that reads the first few samples the whole corpus.
4. `EpochSampler` walks a fresh seeded permutation each epoch; its whole state is
   (epoch, index), which a checkpoint stores so a resumed run draws the same next batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from gptlab.data.corpus import (corpus_files, document_format, is_hub_name,
                                iter_documents)
from gptlab.errors import UserError
from gptlab.io import atomic_path, remove_stale_temps, write_json_atomic

TOKENS_FORMAT = "gptlab-tokens/2"  # /2: BOS at the start of every document
_ENCODE_CHUNK = 512  # documents encoded per batch call


def default_cache_dir() -> Path:
    """`$GPTLAB_CACHE/tokens`, or `~/.cache/gptlab/tokens`."""
    root = os.environ.get("GPTLAB_CACHE") or Path.home() / ".cache" / "gptlab"
    return Path(root) / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def tokenizer_fingerprint(tokenizer: Any, as_saved: bool = True) -> str:
    """sha256 of the tokenizer's serialized form (vocabulary, merges, special tokens), as it is
    saved: a tokenizer trained in memory and the same one loaded from its files are one key.
    `as_saved=False`: as it is held, the form keyed before `save` added the post-processor
    that prepends BOS (the key in a checkpoint from then)."""
    saved = getattr(tokenizer, "hf_as_saved", None) if as_saved else None
    hf = saved() if saved is not None else getattr(tokenizer, "hf", None)
    if hf is not None and hasattr(hf, "to_str"):
        text = hf.to_str()
    else:  # any tokenizer that can save itself
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            tokenizer.save(d)
            text = (Path(d) / "tokenizer.json").read_text(encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(paths: Sequence[str | Path], tokenizer: Any, field: str = "data",
              as_saved: bool = True) -> str:
    """Key of a token file: the sources in their order (each file's format, path, size, mtime,
    ctime and inode; a Hub dataset's name), the tokenizer, and the ids around each document.
    `field`: the setting that gave the paths, which errors name; `as_saved`: see
    `tokenizer_fingerprint`."""
    corpus_files(paths, field)  # refuses a file reached twice
    h = hashlib.sha256(TOKENS_FORMAT.encode())
    for given in paths:
        if is_hub_name(given):
            h.update(f"hub:{given}\n".encode())  # a Hub dataset is keyed by its name
            continue
        for f in corpus_files([given], field):
            st = f.stat()
            # ctime and inode too: a rewrite that keeps the size and sets the mtime back
            # (`cp -p`, `rsync -t`, `touch -r`) changes them, and no user can set them back.
            h.update(f"{document_format(f)}\0{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
                     f"\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
    h.update(tokenizer_fingerprint(tokenizer, as_saved).encode())
    # BOS, EOS and add_bos come from tokenizer_config.json, which the fingerprint does not see:
    # tokenizers that differ only there write other ids between documents.
    h.update(f"start:{document_start(tokenizer)}\0eos:{tokenizer.eos_id}\n".encode())
    return h.hexdigest()[:32]


@dataclass
class TokenFile:
    """A tokenized corpus on disk: `tokens` is a read-only memmap of the whole stream."""
    path: Path
    key: str
    n_tokens: int
    n_documents: int
    dtype: str
    reused: bool  # True when it came from the cache rather than being tokenized now
    sha256: str | None = None  # of the stream's bytes, as tokenizing recorded it

    @property
    def tokens(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def digest(self) -> str:
        """What the stream holds: its dtype and SHA-256 (first 32 hex digits). A resume compares
        it, not the key: the key changes with a file's times (`touch`, a copy), the tokens not.
        An entry cached before digests were recorded is read through once."""
        if self.sha256 is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            self.sha256 = h.hexdigest()
        return f"{self.dtype}:{self.sha256[:32]}"


def _read_cached(bin_path: Path, meta_path: Path, key: str) -> TokenFile | None:
    if not (bin_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        if (meta.get("format") != TOKENS_FORMAT
                or bin_path.stat().st_size != meta["n_tokens"] * itemsize):
            return None
        sha = meta.get("sha256")
        return TokenFile(bin_path, key, int(meta["n_tokens"]), int(meta["n_documents"]),
                         meta["dtype"], reused=True, sha256=sha if isinstance(sha, str) else None)
    except (ValueError, KeyError, TypeError, OSError):
        # A damaged entry (broken JSON, bytes not UTF-8, a count that is no number) is rebuilt,
        # not trusted.
        return None


def _chunks(docs: Iterable[str], n: int) -> Iterable[list[str]]:
    chunk: list[str] = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def document_start(tokenizer: Any) -> list[int]:
    """What every pretraining document starts with: [BOS], so that a prompt that starts with
    BOS (as SFT examples and `generate` do) is what pretraining saw; [] where BOS is EOS or
    missing (the EOS before a document already marks its start)."""
    bos = getattr(tokenizer, "bos_id", None)
    return [] if bos is None or bos == tokenizer.eos_id else [bos]


def tokenize_corpus(paths: Sequence[str | Path], tokenizer: Any,
                    cache_dir: str | Path | None = None, min_tokens: int = 1,
                    progress: bool = False, fields: tuple[str, str] = ("data", "block_size")
                    ) -> TokenFile:
    """Tokenize the corpus at `paths` once (each document BOS + text + EOS), or reuse the cache.

    A corpus of fewer than `min_tokens` tokens is a UserError, and is not cached. `fields` name
    the settings that gave the corpus and the block size (PPO's are `ptx_data` and
    `ptx_block_size`).
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise UserError("no corpus files given", field=fields[0])
    key = cache_key(paths, tokenizer, fields[0])
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    bin_path, meta_path = cache / f"{key}.bin", cache / f"{key}.json"
    cached = _read_cached(bin_path, meta_path, key)
    if cached is not None:
        if cached.n_tokens < min_tokens:
            raise _too_small(paths, cached.n_tokens, min_tokens, fields)
        return cached

    if cache.is_dir():  # what killed runs left, of any key: a corpus since edited has another
        for suffix in (".bin", ".json"):
            remove_stale_temps(cache, "." + "[0-9a-f]" * 32 + suffix + ".*.tmp")
    dtype = token_dtype(tokenizer.vocab_size)
    eos, start = tokenizer.eos_id, document_start(tokenizer)
    n_tokens = n_docs = 0
    sha = hashlib.sha256()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="tokenizing", unit="doc", leave=False)
    with atomic_path(bin_path) as tmp, open(tmp, "wb") as f:
        try:
            for docs in _chunks(iter_documents(paths, fields[0]), _ENCODE_CHUNK):
                ids = tokenizer.encode_batch(docs) if hasattr(tokenizer, "encode_batch") \
                    else [tokenizer.encode(d) for d in docs]
                for row in ids:
                    data = np.asarray(start + row + [eos], dtype=dtype).tobytes()
                    f.write(data)
                    sha.update(data)
                    n_tokens += len(data) // dtype.itemsize
                n_docs += len(docs)
                if bar is not None:
                    bar.update(len(docs))
        finally:  # a bad document's error must not be printed on the bar's line
            if bar is not None:
                bar.close()
        if n_tokens < min_tokens:
            raise _too_small(paths, n_tokens, min_tokens, fields)  # atomic_path drops the file
    write_json_atomic(meta_path, {"format": TOKENS_FORMAT, "dtype": dtype.name,
                                  "n_tokens": n_tokens, "n_documents": n_docs,
                                  "eos_id": eos, "sources": paths,
                                  "sha256": sha.hexdigest()})
    note_earlier_entry(paths, tokenizer, key, cache, fields[0])
    return TokenFile(bin_path, key, n_tokens, n_docs, dtype.name, reused=False,
                     sha256=sha.hexdigest())


def note_earlier_entry(paths: Sequence[str], tokenizer: Any, key: str, cache: Path,
                       field: str = "data") -> Path | None:
    """Where the cache also holds the corpus just tokenized under `key` as an earlier version
    keyed it (the tokenizer as held: `tokenizer_fingerprint`), a note on stderr naming that
    entry, which only an earlier version reads; returns its `.bin`. It is left in place: the
    cache takes no lock on an entry being read, so a run of an earlier version sharing the
    cache could be between reading its `.json` and mapping its `.bin`, and fail."""
    earlier = cache_key(paths, tokenizer, field, as_saved=False)
    if earlier == key:  # a tokenizer whose saved form is the one held
        return None
    bin_path = cache / f"{earlier}.bin"
    if _read_cached(bin_path, cache / f"{earlier}.json", earlier) is None:
        return None
    mib = bin_path.stat().st_size / 2**20
    print(f"note: the token cache also holds this corpus as an earlier gptlab tokenized it "
          f"({bin_path} and its .json, {mib:.1f} MiB), which only an earlier version reads: "
          f"remove both to free the space, once no run of an earlier version uses them",
          file=sys.stderr)
    return bin_path


def _too_small(paths: Sequence[str], n_tokens: int, min_tokens: int,
               fields: tuple[str, str]) -> UserError:
    data, block = fields
    return UserError(f"the corpus has {n_tokens} tokens, fewer than one training block of "
                     f"{min_tokens} ({block} + 1); add text or lower {block}",
                     path=", ".join(paths), field=data)


# --- blocks and the split ----------------------------------------------------------------------

def n_blocks(n_tokens: int, block_size: int) -> int:
    """How many blocks of block_size + 1 tokens, stride block_size, fit in n_tokens."""
    return max(0, (n_tokens - 1) // block_size)


def split_blocks(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train block ids, validation block ids): a seeded random `val_fraction` of the blocks
    (at least one when there are two or more blocks and val_fraction > 0) goes to validation,
    the count rounded as `round` rounds it, a half to the even whole (kept so: rounding it up
    would move a block of every corpus whose count lands on a half, and with it the runs on
    it, for no gain).

    The training ids are sorted; the validation ids keep their random order, so that the first
    few (what an evaluation of `eval_batches` reads) sample the whole corpus, not its start."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"must be in [0, 1), got {val_fraction}", field="val_fraction")
    n_val = 0 if n < 2 or val_fraction == 0 else max(1, int(round(n * val_fraction)))
    n_val = min(n_val, n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), perm[:n_val]


def gather_blocks(tokens: np.ndarray, block_size: int, ids: np.ndarray) -> torch.Tensor:
    """(len(ids), block_size + 1) int64 tensor of the given blocks."""
    T = block_size
    rows = np.stack([tokens[i * T:i * T + T + 1] for i in ids]).astype(np.int64)
    return torch.from_numpy(rows)


class EpochSampler:
    """Batches of indices into range(n): a new seeded permutation each epoch, no index repeated
    within an epoch; a batch that runs past the end of an epoch continues into the next.

    Its state is (epoch, index) only: the permutation of epoch e is derived from (seed, e)."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        if n < 1:
            raise ValueError("nothing to sample from")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, np.arange(n)

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(self.n)
                           if self.shuffle else np.arange(self.n))
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        out = []
        while len(out) < self.batch_size:
            take = self.order(self.epoch)[self.index:self.index + self.batch_size - len(out)]
            out.extend(take.tolist())
            self.index += len(take)
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return np.asarray(out, dtype=np.int64)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class BlockBatches:
    """An endless, resumable stream of (batch_size, block_size + 1) token blocks for training."""

    def __init__(self, tokens: np.ndarray, block_size: int, block_ids: np.ndarray,
                 batch_size: int, seed: int):
        self.tokens, self.block_size, self.block_ids = tokens, block_size, block_ids
        self.sampler = EpochSampler(len(block_ids), batch_size, seed)

    def __iter__(self) -> "BlockBatches":
        return self

    def __next__(self) -> torch.Tensor:
        return gather_blocks(self.tokens, self.block_size,
                             self.block_ids[self.sampler.next_indices()])

    def state(self) -> dict:
        return self.sampler.state()

    def load_state(self, state: dict) -> None:
        self.sampler.load_state(state)


def fixed_batches(tokens: np.ndarray, block_size: int, block_ids: np.ndarray, batch_size: int,
                  max_batches: int) -> list[torch.Tensor]:
    """The first `max_batches` batches of `block_ids` in their order: the same validation set
    every time, so validation losses are comparable across steps and runs."""
    ids = block_ids[:max_batches * batch_size]
    return [gather_blocks(tokens, block_size, ids[i:i + batch_size])
            for i in range(0, len(ids), batch_size)]


@dataclass
class TokenData:
    """A tokenized corpus, cut into blocks and split into training and validation."""
    file: TokenFile
    block_size: int
    train_ids: np.ndarray
    val_ids: np.ndarray

    def train_batches(self, batch_size: int, seed: int) -> BlockBatches:
        return BlockBatches(self.file.tokens, self.block_size, self.train_ids, batch_size, seed)

    def val_batches(self, batch_size: int, max_batches: int) -> list[torch.Tensor]:
        return fixed_batches(self.file.tokens, self.block_size, self.val_ids, batch_size,
                             max_batches)


def load_token_data(paths: Sequence[str | Path], tokenizer: Any, block_size: int,
                    val_fraction: float = 0.05, seed: int = 0,
                    cache_dir: str | Path | None = None, progress: bool = False,
                    fields: tuple[str, str] = ("data", "block_size")) -> TokenData:
    """Tokenize (or reuse) the corpus and split its blocks; fewer tokens than one block of
    `block_size + 1` is a UserError naming `fields` (see `tokenize_corpus`)."""
    if block_size < 1:
        raise UserError(f"must be at least 1, got {block_size}", field=fields[1])
    tf = tokenize_corpus(paths, tokenizer, cache_dir, min_tokens=block_size + 1,
                         progress=progress, fields=fields)
    train_ids, val_ids = split_blocks(n_blocks(tf.n_tokens, block_size), val_fraction, seed)
    return TokenData(tf, block_size, train_ids, val_ids)
