"""Generative pretraining (GPT-1 stage one): next-token prediction on unlabeled text.

    tokenizer  the one given, the one of the model being continued, or a BPE trained here on
               the corpus with the preset's vocabulary size
    data       the corpus tokenized once into a cached memmap, cut into blocks of context + 1
               tokens, a seeded slice of them held out for validation
    loss       L1 = -sum_t log P(u_t | u_<t): cross-entropy of each block's tokens against the
               same tokens shifted by one
    loop       gptlab.train.loop.train: AdamW, warmup + cosine, accumulation, clipping,
               validation loss / perplexity and a sample, checkpoints, exact resume

The run directory ends as a model directory (config.json, model.safetensors, tokenizer) that
every later stage and `gptlab generate` read, plus checkpoints/, metrics.jsonl and run.json.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from gptlab.checkpoint import build_from_meta, check_tokenizer_fits, is_gptlab_dir, \
    load_language_model, read_meta, save_model
from gptlab.errors import (NotFound, UserError, WrongKind, check_given, reports_path_errors,
                           setting)
from gptlab.io import check_dir_out
from gptlab.model.gpt import GPTConfig
from gptlab.provenance import record_run
from gptlab.train.loop import (TrainConfig, annotate_resume, annotate_run, check_run_dir,
                               resuming, train)


@dataclass
class PretrainConfig(TrainConfig):
    """Settings of `gptlab pretrain`: the corpus, the model (a preset or a directory), the
    tokenizer and the output, besides the shared training settings."""

    data: list[str] = field(default_factory=list, metadata={
        "help": "corpus files (.txt/.jsonl/.json/.parquet) or directories, of one split (not "
                "train.txt with test.txt), or a Hub dataset user/name"})
    model: str = field(default="demo", metadata={"help": "a preset name, or a gptlab model "
                                                         "directory to continue training"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer directory (default: a model directory's own; with a preset, one "
                "trained on the data)"})
    out: str = field(default="runs/pretrain", metadata={"help": "run / model directory"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT's latest checkpoint"})
    resume_from: str | None = field(default=None, metadata={
        "help": "continue from this checkpoint of OUT instead: step-N, N, or its path "
                "(OUT/checkpoints/step-N); implies resume"})
    block_size: int | None = field(default=None, metadata={
        "help": "tokens per training sequence (default: the model's context)"})
    val_fraction: float = field(default=0.05, metadata={
        "help": "share of blocks held out for validation"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "directory of the tokenized corpus cache (default: $GPTLAB_CACHE/tokens, "
                "else ~/.cache/gptlab/tokens)"})
    sample_prompt: str = field(default="", metadata={
        "help": "text the sample at each evaluation continues (after an EOS)"})
    sample_tokens: int = field(default=48, metadata={
        "help": "tokens sampled at each evaluation (0: no sample); a sample cut there ends "
                "before a character the cut split"})
    # Pretraining defaults for small models on small corpora.
    lr: float = 1e-3
    warmup_steps: int = 20          # short: CPU runs are a few hundred steps
    eval_every: int = 50
    save_every: int = 200

    def rules(self) -> list[tuple[str, bool, str]]:
        """(field, holds, what is expected): the shared rules and pretraining's."""
        return super().rules() + [
            ("block_size", self.block_size is None or self.block_size >= 1, "must be >= 1"),
            ("val_fraction", 0 <= self.val_fraction < 1, "must be in [0, 1)"),
            ("sample_tokens", self.sample_tokens >= 0, "must be >= 0"),
        ]


def lm_loss(model: nn.Module, block: Tensor) -> Tensor:
    """Next-token cross-entropy of a (B, T + 1) block: inputs block[:, :-1], targets
    block[:, 1:]. Every position has a target: the head need not look for -100 labels (a wait
    for the GPU each step)."""
    return model(block[:, :-1], labels=block[:, 1:], all_targets=True)


def share_of_batch(batch_size: int) -> Callable[[Tensor], float]:
    """A batch's blocks as a share of a full one: what its mean loss averages over, so that a
    short last validation batch weighs as the blocks it holds and the validation loss is the
    cross entropy of every validation token. A full batch weighs exactly 1, as with no weights:
    training batches are always full, and their update is unchanged bit for bit."""
    return lambda block: block.shape[0] / batch_size


def _tokenizer_for(cfg: PretrainConfig, vocab_size: int) -> Any:
    """--tokenizer, or a BPE of `vocab_size` tokens trained on the data."""
    from gptlab.tokenizer import load_tokenizer, train_tokenizer
    if cfg.tokenizer:
        if not Path(cfg.tokenizer).exists():
            raise NotFound("tokenizer not found", path=cfg.tokenizer, field="tokenizer")
        return load_tokenizer(cfg.tokenizer)
    print(f"training a BPE tokenizer ({vocab_size} tokens) on the data", file=sys.stderr)
    return train_tokenizer([Path(p) for p in cfg.data], vocab_size=vocab_size)


def _given_for(model_dir: Path, own: Any, given: Any) -> Any:
    """`given` (--tokenizer) to continue the model in `model_dir`, unless the model has a
    tokenizer of its own that differs: its embeddings are rows for its own tokens' ids, it
    was trained with or without BOS first, and with its own EOS between documents (what it
    learned ends one). Each is compared as saved: a directory saved before `save` wrote the
    post-processor that prepends BOS holds the same tokenizer as one saved since. The
    post-processor is not compared: gptlab encodes without it (special tokens are its own to
    add), so it changes no id a document gets, and the BOS it prepends is the BOS setting,
    compared as such. The decoder changes no id either, but the text the model's output reads
    as. The refusal says what differs, so that the user can tell which to keep."""
    if own is None:
        return given
    mine, theirs = (json.loads(t.hf_as_saved().to_str()) for t in (own, given))
    parts = [part for part in dict.fromkeys([*mine, *theirs])
             if part != "post_processor" and mine.get(part) != theirs.get(part)]
    bos, eos = own.bos_id != given.bos_id, own.eos_id != given.eos_id
    if not parts and not bos and not eos:
        return given
    keep = "leave out tokenizer (--tokenizer) to continue with its own"
    if parts == ["decoder"] and not bos and not eos:
        raise UserError("has its own tokenizer.json, which differs from tokenizer (--tokenizer) "
                        "only in its decoder: a document gets the same token ids from either, "
                        "but the decoder turns the ids the model writes back into text, and "
                        "the latter's would read its samples and replies as other text than "
                        f"its own does; {keep}", path=model_dir, field="tokenizer")
    if parts in ([], ["decoder"]):
        # the same tokens: another BOS first (the post-processor that prepends it), another
        # EOS between documents, or both
        def first(t: Any) -> str:
            return (f"with {t.bos_token!r} (add_bos_token: true)" if t.bos_id is not None
                    else "with none (add_bos_token: false)")
        what = " and ".join([*(["the start of a sequence"] if bos else []),
                             *(["the end of a document"] if eos else [])])
        if bos and eos:
            how = (f"its own starts each sequence {first(own)} and ends each document with "
                   f"{own.eos_token!r} (eos_token), tokenizer (--tokenizer) starts each "
                   f"{first(given)} and ends each with {given.eos_token!r}")
        elif bos:
            how = (f"its own starts each sequence {first(own)}, tokenizer (--tokenizer) each "
                   f"{first(given)}")
        else:
            how = (f"its own ends each document with {own.eos_token!r} (eos_token), tokenizer "
                   f"(--tokenizer) each with {given.eos_token!r}")
        decoder = (" (their decoders differ too, which turn the ids the model writes back into "
                   "text)" if parts else "")
        raise UserError(f"has its own tokenizer, the same tokens as tokenizer (--tokenizer) but "
                        f"for {what}: {how}{decoder}; the model was trained on the former and "
                        f"would be continued on the latter: {keep}", path=model_dir,
                        field="tokenizer")
    named = ", ".join(_TOKENIZER_PARTS.get(part, part) for part in parts)
    raise UserError(f"has its own tokenizer.json, which differs from tokenizer (--tokenizer) "
                    f"in its {named}: its embeddings are rows for its own tokens, and another "
                    f"tokenizer would give them other meanings; {keep}", path=model_dir,
                    field="tokenizer")


# tokenizer.json's sections, as a refusal names them
_TOKENIZER_PARTS = {"model": "vocabulary and merges", "added_tokens": "added tokens",
                    "pre_tokenizer": "pre-tokenizer"}


def _note_unused_on_resume(cfg: PretrainConfig, out: Path) -> None:
    """A resume continues its checkpoint's model with its checkpoint's tokenizer: a `model` or
    `tokenizer` set to other than the run's own (its run.json's first config) is not used,
    and stderr says so, where it was silently ignored. Left at its default it is no request
    (`--resume` alone keeps the run's own); one set to the default is not told from it."""
    from gptlab.provenance import load_run
    try:
        first = load_run(out).get("config")
    except (OSError, ValueError):  # a run.json lost or broken: nothing to compare with
        return
    if not isinstance(first, dict):
        return
    default = PretrainConfig()
    for name in ("model", "tokenizer"):
        given, own = getattr(cfg, name), first.get(name)
        if given and given != own and given != getattr(default, name):
            print(f"note: {setting(name)} {given} is not used: a resume continues the run's "
                  f"own model and tokenizer from its checkpoint (the run began with {name} "
                  f"{own}); train another in a new run (another --out)", file=sys.stderr)


def _build(cfg: PretrainConfig, resume_from: Path | None) -> tuple[nn.Module, Any]:
    """(model, tokenizer): from the checkpoint to resume, a model directory, or a preset."""
    from gptlab.model.presets import PRESETS, build_model, get_preset
    from gptlab.tokenizer import load_tokenizer

    if resume_from is not None:
        meta = read_meta(resume_from)
        model = build_from_meta(meta, resume_from / "config.json")
        tok = load_tokenizer(resume_from)
        check_tokenizer_fits(model, tok, resume_from)  # as every load of a model checks it
        return model, tok
    model_path = Path(cfg.model)
    if _continues_a_model(cfg.model):
        if not is_gptlab_dir(model_path):
            raise WrongKind("not a gptlab model directory (config.json with format gptlab/1); "
                            "import other models with `gptlab convert` first", path=model_path,
                            field="model")
        model, tok, _ = load_language_model(model_path, need_tokenizer=False)
        if tok is None and not cfg.tokenizer:
            # Its embeddings are rows for some tokenizer's ids: a new tokenizer trained here
            # would give them other meanings, silently.
            raise UserError("has no tokenizer.json; pass the tokenizer its weights were made "
                            "with as tokenizer (--tokenizer)", path=model_path, field="model")
        if cfg.tokenizer:
            tok = _given_for(model_path, tok, _tokenizer_for(cfg, model.config.vocab_size))
        if tok.vocab_size > model.config.vocab_size:
            raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model's "
                            f"embedding has {model.config.vocab_size} rows", field="tokenizer")
        return model.train(), tok
    if cfg.model not in PRESETS and ("/" in cfg.model or model_path.suffix):
        if model_path.exists():
            raise WrongKind("not a gptlab model directory; pretraining continues only those: "
                            "import other models with `gptlab convert` first", path=model_path,
                            field="model")
        raise NotFound("model directory not found", path=model_path, field="model")
    config = get_preset(cfg.model)
    if not isinstance(config, GPTConfig):
        raise UserError(f"preset '{cfg.model}' is not a decoder-only GPT", field="model")
    tok = _tokenizer_for(cfg, config.vocab_size)
    # The tokenizer sizes the embedding, given or trained here (asked for the preset's size, BPE
    # stops short on a small corpus: 1,177 tokens for the demo's 2,048). A row past its last id
    # is never a target, yet is sampled now and then and decodes to nothing: with 2,048 rows
    # the demo's SFT model drew 3 such ids in 64 answers at T = 1.5.
    config = dataclasses.replace(config, vocab_size=tok.vocab_size)
    torch.manual_seed(cfg.seed)  # the initial weights follow the seed, whatever ran before
    return build_model(config), tok


def _sampler(tok: Any, cfg: PretrainConfig, context: int):
    """An `on_eval` callback: continue sample_prompt as the start of a new document. A prompt
    that leaves no room in the context is a UserError here, before OUT is written, rather than
    the engine's error at the first evaluation."""
    from gptlab.data.tokens import document_start
    from gptlab.engine import SamplingParams, generate

    prompt = [tok.eos_id] + document_start(tok) + tok.encode(cfg.sample_prompt)
    if len(prompt) >= context:
        raise UserError(f"is {len(prompt)} tokens as the start of a new document, which leaves "
                        f"no room in the model's context of {context} for the sample; shorten "
                        f"it, or set sample_tokens (--sample-tokens) to 0 for no sample",
                        field="sample_prompt")

    def sample(model: nn.Module, step: int, val_loss: float) -> dict:
        params = SamplingParams(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50,
                                stop_ids=(tok.eos_id,))
        gen = generate(model, [prompt], params, seed=cfg.seed, pad_id=tok.pad_id)
        # cut at sample_tokens: no half a character at its end, as `gptlab sample` writes one
        return {"sample": cfg.sample_prompt + tok.decode_continuation(
            prompt, gen.tokens[0], cut=not gen.finished[0])}

    return sample


def _continues_a_model(model: str) -> bool:
    """--model names a directory to continue, not a preset: a preset's name is a preset unless
    a gptlab model of that name is here (`--model demo --out demo` starts from the preset)."""
    from gptlab.model.presets import PRESETS
    path = Path(model)
    return path.is_dir() and (model not in PRESETS or is_gptlab_dir(path))


@reports_path_errors
def pretrain(cfg: PretrainConfig) -> Path:
    """Pretrain (or continue) a GPT on `cfg.data`; returns the model directory `cfg.out`."""
    from gptlab.data.tokens import cache_key, load_token_data

    cfg.check()  # first: a str given as `data` would be read below as paths of one letter
    cfg = resuming(cfg)
    check_given(cfg, ("model",), "pretrain")  # a preset or a directory, not "" (the current one)
    if not cfg.data:
        raise UserError("no training data: give data (--data FILE...)", field="data")
    from gptlab.data.corpus import check_out_of_corpus, corpus_files, is_hub_name, read_once
    for path in cfg.data:
        if not str(path).strip():  # Path("") is the current directory: all of it a corpus
            raise UserError("an empty path; name a corpus file or directory", field="data")
        if not Path(path).exists() and not is_hub_name(path):
            raise NotFound("corpus file not found", path=path, field="data")
    # A file given twice, the files of two splits, a directory of none: refused before any
    # output or work (the tokenizer trained on the data reads it first).
    corpus_files(cfg.data)
    if not cfg.resume and not cfg.tokenizer and not _continues_a_model(cfg.model):
        # The tokenizer trained on the data reads a pipe to its end: tokenizing would find it
        # empty, and its documents would be missing from the training data without a word.
        for path in cfg.data:
            kind = read_once(path)
            if kind is not None:
                raise UserError(f"is {kind}, which can be read once, and the tokenizer "
                                f"trained on the data reads the corpus before it is tokenized; "
                                f"write it to a file first, or give a tokenizer (--tokenizer)",
                                path=path, field="data")
    out = check_dir_out(cfg.out, field="out")  # not "", the current directory
    check_out_of_corpus(out, cfg.data)
    # A resume reads its checkpoint, never --model: OUT may be what --model names.
    reads_model = _continues_a_model(cfg.model) and not cfg.resume
    latest = check_run_dir(out, cfg.resume, {"model": cfg.model if reads_model else None},
                           cfg, cfg.resume_from)

    # Everything that can fail on bad input happens before OUT is created.
    model, tok = _build(cfg, latest if cfg.resume else None)
    context = model.config.context
    block = cfg.block_size or context
    if block > context:
        raise UserError(f"{block} exceeds the model's context of {context}", field="block_size")
    sample = _sampler(tok, cfg, context) if cfg.sample_tokens > 0 else None
    data = load_token_data(cfg.data, tok, block, cfg.val_fraction, cfg.seed, cfg.cache_dir,
                           progress=cfg.progress)
    if len(data.val_ids) == 0 and cfg.val_fraction > 0:
        print("note: the corpus has a single block; no validation", file=sys.stderr)
    print(f"{data.file.n_tokens:,} tokens in {data.file.n_documents:,} documents "
          f"({'cached' if data.file.reused else 'tokenized'}: {data.file.path}); "
          f"{len(data.train_ids)} training / {len(data.val_ids)} validation blocks of {block}; "
          f"model {sum(p.numel() for p in model.parameters()):,} parameters", file=sys.stderr)

    # The checkpoint's tokens are compared, not the files' key, which `touch` or a copy changes.
    # A checkpoint from before digests has the key alone; one saved before the key read the
    # tokenizer as saved has the key of the same tokenizer as held: that tokenizes alike.
    if cfg.resume:
        saved = read_meta(latest)
        if "tokens_digest" in saved:
            same = saved["tokens_digest"] == data.file.digest()
        else:
            same = saved.get("data_key") in (data.file.key,
                                             cache_key(cfg.data, tok, as_saved=False))
        if not same:
            print("warning: the corpus or tokenizer changed since the checkpoint; the data "
                  "position now points into different blocks", file=sys.stderr)
        _note_unused_on_resume(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        annotate_resume(out, cfg, latest.name)
    else:
        record_run(out, cfg)
    annotate_run(out, data={"tokens": data.file.n_tokens, "documents": data.file.n_documents,
                            "cache": str(data.file.path), "block_size": block,
                            "train_blocks": len(data.train_ids), "val_blocks": len(data.val_ids)})

    batches = data.train_batches(cfg.batch_size, cfg.seed)
    val = data.val_batches(cfg.batch_size, cfg.eval_batches) if len(data.val_ids) else None
    result = train(model, batches, lm_loss, cfg, out, val_batches=val, tokenizer=tok,
                   on_eval=sample,
                   tokens_in=lambda b: b.shape[0] * (b.shape[1] - 1), resume=cfg.resume,
                   verified=latest, resume_from=latest,
                   loss_weight=share_of_batch(cfg.batch_size),
                   extra={"stage": "pretrain", "data_key": data.file.key,
                          "tokens_digest": data.file.digest()})
    save_model(out, model, tok, extra={"stage": "pretrain", "step": result.step,
                                       "val_loss": result.val_loss, "tokens": result.tokens})
    speed = (f"{result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s
             else "no step left to train")
    print(f"pretrained {result.step} steps, {result.tokens:,} tokens ({speed}); "
          f"val_loss {'n/a' if result.val_loss is None else f'{result.val_loss:.4f}'}; model "
          f"saved to {out}", file=sys.stderr)
    return out
