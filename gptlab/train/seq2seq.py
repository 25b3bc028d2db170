"""The 2017 Transformer's own task (`gptlab seq2seq`, `gptlab translate`): an encoder–decoder
trained from scratch on source → target pairs, as "Attention Is All You Need" trained it for
translation, and scored as it was, by BLEU.

    data       pairs (a source field and a target field per record), or by default the built-in
               world's questions → their gold SQL (its train / validation / test splits)
    tokenizer  one BPE shared by source and target (the paper's shared vocabulary), trained
               here on both sides of the training pairs, or given
    model      a Transformer preset (`transformer-small` for a CPU, the paper's
               `transformer-base` and `transformer-big`) or a seq2seq model directory to continue
    training   label-smoothed cross-entropy on the target tokens (the preset's 0.1); Adam with
               β2 = 0.98 and no weight decay; the paper's schedule, a linear warmup and then
               down as 1/√step (`--schedule inverse_sqrt`), or the cosine of the other stages
    decoding   beam search, 4 wide with length penalty α = 0.6, up to the source's length + 50
               tokens (the paper's §6.1); `--beam 1` is greedy
    scores     corpus BLEU and chrF (sacrebleu, its default 13a tokenization), exact match and,
               on the world, execution accuracy against the database, overall and on the
               phrasing reserved for the test

A source is encoded with EOS last; the decoder reads BOS (EOS where the tokenizer has no BOS)
and then the target, and learns to write the target and then EOS.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from gptlab.checkpoint import (MODEL_FILE, Checkpointer, build_from_meta, load_model,
                               load_weights, read_meta, save_model)
from gptlab.data.instruct import SkipCounter
from gptlab.errors import NotFound, UserError, WrongKind, counted, reports_path_errors
from gptlab.eval.stats import clustered_rate
from gptlab.io import (check_dir_out, check_file_out, check_out_of_read_dirs, fields_instead,
                       no_records, read_jsonl, record_file, write_json_atomic,
                       write_jsonl_atomic)
from gptlab.model.transformer import Transformer
from gptlab.provenance import record_run
from gptlab.tokenizer import check_text
from gptlab.train.batching import ListBatches, data_key, fixed_list_batches, warn_if_data_changed
from gptlab.train.loop import (TrainConfig, annotate_resume, annotate_run, check_held_out,
                               check_run_dir, held_out_rule, inverse_sqrt_lr, lr_at, resuming,
                               select_device, train)

SCHEDULES = ("inverse_sqrt", "cosine")
EXTRA_TOKENS = 50  # the paper's longest output: the source's length + 50


@dataclass
class Seq2SeqConfig(TrainConfig):
    """Settings of `gptlab seq2seq`: the pairs, the model, the tokenizer, decoding and the
    shared training settings (the paper's optimizer and schedule as defaults)."""

    model: str = field(default="transformer-small", metadata={
        "help": "a Transformer preset (transformer-small, transformer-base, ...) or a seq2seq "
                "model directory to continue"})
    data: str = field(default="", metadata={
        "help": "training pairs, .jsonl, .parquet or a directory of them; without it, the "
                "world's questions and their SQL"})
    val_data: str | None = field(default=None, metadata={
        "help": "held-out pairs (default: the world's validation split, or a slice of --data)"})
    test_data: str | None = field(default=None, metadata={
        "help": "pairs scored after training (default: the world's test split; none with "
                "--data)"})
    world: str | None = field(default=None, metadata={
        "help": "the world directory whose questions are the pairs when --data is not given "
                "(default: the built-in world)"})
    out: str = field(default="runs/seq2seq", metadata={"help": "output model directory"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer directory (default: a BPE trained on both sides of the training "
                "pairs, of the preset's vocabulary size)"})
    source_field: str = field(default="source", metadata={"help": "the field holding the source"})
    target_field: str = field(default="target", metadata={"help": "the field holding the target"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of --data held out for validation when --val-data is not given"})
    epochs: float = field(default=10.0, metadata={
        "help": "passes over the training pairs: sets max_steps when neither max_steps nor "
                "max_minutes is given"})
    schedule: str = field(default="inverse_sqrt", metadata={
        "help": "the learning rate's schedule: inverse_sqrt (the paper's: warmup, then "
                "lr * sqrt(warmup / step)) or cosine (down to lr * min_lr_ratio)"})
    eval_pairs: int = field(default=300, metadata={
        "help": "held-out pairs decoded greedily at each evaluation, for val_bleu and "
                "val_exact_match (0: none)"})
    beam: int = field(default=4, metadata={
        "help": "beam width of the test's decoding (the paper's 4; 1: greedy)"})
    length_penalty: float = field(default=0.6, metadata={
        "help": "α of the length penalty ((5 + length) / 6)^α that ranks finished beams "
                "(the paper's 0.6)"})
    average_last: int = field(default=1, metadata={
        "help": "the final model is the mean of the weights of the last N checkpoints (the "
                "paper's 5 for its base models; --save-every sets how often one is saved, and "
                "N are kept); 1: the last weights"})
    lr: float = 1e-3
    warmup_steps: int = 400
    beta2: float = 0.98  # the paper's
    weight_decay: float = 0.0  # the paper uses none
    batch_size: int = 32
    eval_every: int = 200
    save_every: int = 0
    resume: bool = field(default=False, metadata={"help": "continue from OUT's latest checkpoint"})
    resume_from: str | None = field(default=None, metadata={
        "help": "continue from this checkpoint of OUT instead: step-N, N, or its path "
                "(OUT/checkpoints/step-N); implies resume"})

    def rules(self) -> list[tuple[str, bool, str]]:
        return super().rules() + [
            ("val_fraction", 0 <= self.val_fraction < 1, "must be in [0, 1)"),
            held_out_rule(self.val_data, self.data),
            ("epochs", self.epochs > 0, "must be > 0"),
            ("schedule", self.schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
            ("beam", self.beam >= 1, "must be at least 1"),
            ("eval_pairs", self.eval_pairs >= 0, "must be >= 0"),
            ("length_penalty", self.length_penalty >= 0, "must be >= 0"),
            ("average_last", self.average_last >= 1, "must be at least 1"),
            ("save_every", self.average_last == 1 or self.save_every > 0,
             "must be > 0 with --average-last above 1: the checkpoints it averages are saved "
             "every --save-every steps"),
            ("source_field", bool(self.source_field), "must be a field name"),
            ("target_field", bool(self.target_field), "must be a field name"),
        ]


@dataclass
class Pair:
    source: str
    target: str | None  # None: a source to translate, with no reference
    id: str | None = None
    file: Any = None  # where it was read, for messages
    line: int | None = None
    src: list[int] = field(default_factory=list)
    tgt: list[int] = field(default_factory=list)
    record: dict = field(default_factory=dict)  # the record's fields as read, for translate


def read_pairs(path: str | Path, source_field: str = "source", target_field: str = "target",
               need_target: bool = True) -> list[Pair]:
    """The pairs of a file; a record without its source (or, where `need_target`, its target)
    stops with its file, line and field. An `id` field is kept."""
    rows = read_jsonl(path)
    if not rows:
        raise no_records(path, "pairs")
    out = []
    for row in rows:
        where = (record_file(row, path), row.get("_line"))
        texts = []
        for name, flag, needed in ((source_field, "--source-field", True),
                                   (target_field, "--target-field", need_target)):
            if name not in row:
                if not needed:
                    texts.append(None)
                    continue
                raise UserError("is missing" + fields_instead(row, (name,))
                                + f" ({flag} names its field)", path=where[0], line=where[1],
                                field=name)
            text = row[name]
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"must be a non-empty text, got {text!r}", path=where[0],
                                line=where[1], field=name)
            try:
                check_text(text, field=name, from_json=True)
            except UserError as e:
                raise UserError(e.message, path=where[0], line=where[1], field=name) from None
            texts.append(text)
        rid = row.get("id")
        record = {k: v for k, v in row.items() if k not in ("_line", "_file")}
        out.append(Pair(texts[0], texts[1], None if rid is None else str(rid), *where,
                        record=record))
    return out


def world_pairs(world: Any, split: str) -> list[Pair]:
    """The world's questions of `split` as pairs: the question → its gold SQL."""
    return [Pair(q.text, q.sql, q.id, f"the world's {split} split") for q in world.splits[split]]


def start_id(tok: Any) -> int:
    """The token the decoder starts from: BOS, or EOS where the tokenizer has none."""
    bos = tok.hf.token_to_id(tok.bos_token) if tok.bos_token is not None else None
    return tok.eos_id if bos is None else bos


def encode_pairs(tok: Any, pairs: list[Pair], context: int, skips: SkipCounter) -> list[Pair]:
    """Each pair's token ids (the source with EOS, the target without); a source longer than
    the context, or a target that does not fit it with its BOS, is skipped and counted."""
    out = []
    sources = tok.encode_batch([p.source for p in pairs])
    targets = tok.encode_batch([p.target for p in pairs]) if pairs and all(
        p.target is not None for p in pairs) else [[] for _ in pairs]
    for p, s, t in zip(pairs, sources, targets):
        s = s + [tok.eos_id]
        if len(s) > context:
            skips.add(f"source longer than the context of {context}")
            continue
        if len(t) + 1 > context:
            skips.add(f"target longer than the context of {context}")
            continue
        out.append(replace(p, src=s, tgt=t))
    return out


def _padded(rows: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def collate(items: list[Pair], pad_id: int, start: int, eos_id: int) -> dict:
    """Right-padded sources and decoder inputs (start token, then the target), and labels
    (the target, then EOS; -100 on padding)."""
    src, src_mask = _padded([it.src for it in items], pad_id)
    tgt, tgt_mask = _padded([[start] + it.tgt for it in items], pad_id)
    labels, _ = _padded([it.tgt + [eos_id] for it in items], -100)
    return {"src": src, "src_mask": src_mask, "tgt": tgt, "tgt_mask": tgt_mask,
            "labels": labels}


def seq2seq_loss(model: nn.Module, batch: dict) -> Tensor:
    """Label-smoothed cross-entropy, the mean over the batch's target tokens."""
    return model(batch["src"], batch["tgt"], batch["src_mask"], batch["tgt_mask"],
                 batch["labels"])


def target_tokens(batch: dict) -> int:
    return int((batch["labels"] != -100).sum())


@torch.no_grad()
def translate_ids(model: Transformer, tok: Any, sources: list[list[int]], beam: int = 4,
                  alpha: float = 0.6, batch_size: int = 32,
                  max_new_tokens: int | None = None) -> list[str]:
    """The decoded text of each source (token ids ending with EOS), up to `max_new_tokens`
    or the source's length + 50 (the longest of a batch), and never past the context."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(sources), batch_size):
        chunk = sources[i:i + batch_size]
        src, mask = _padded(chunk, tok.pad_id)
        n = max_new_tokens or max(len(s) for s in chunk) + EXTRA_TOKENS
        n = min(n, model.config.context)
        if beam == 1 and alpha == 0:
            ids = model.greedy_decode(src.to(device), start_id(tok), tok.eos_id, n,
                                      src_mask=mask.to(device)).tolist()
            ids = [r[:r.index(tok.eos_id)] if tok.eos_id in r else r for r in ids]
        else:
            ids = model.beam_search(src.to(device), start_id(tok), tok.eos_id, n, beam, alpha,
                                    src_mask=mask.to(device))
        out += [tok.decode(r).strip() for r in ids]
    model.train(was)
    return out


def scores(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu's defaults) and exact match, with its 95% interval."""
    from sacrebleu.metrics import BLEU, CHRF
    metric = BLEU()
    bleu = metric.corpus_score(hypotheses, [references])
    chrf = CHRF().corpus_score(hypotheses, [references])
    exact = clustered_rate([(int(h.strip() == r.strip()), 1)
                            for h, r in zip(hypotheses, references)])
    return {"bleu": round(bleu.score, 2), "chrf": round(chrf.score, 2),
            "bleu_signature": str(metric.get_signature()), "exact_match": exact["mean"],
            "exact_match_ci95": exact["ci95"], "n": len(references)}


def world_scores(world: Any, ids: list[str], hypotheses: list[str]) -> dict:
    """Execution accuracy on the world: overall, and on the phrasing reserved for the test."""
    correct = [int(world.check(qid, sql).correct) for qid, sql in zip(ids, hypotheses)]
    unseen = [c for qid, c in zip(ids, correct) if world.unseen_phrasing(qid)]
    overall = clustered_rate([(c, 1) for c in correct])
    return {"exec_acc": overall["mean"], "exec_acc_ci95": overall["ci95"],
            "exec_acc_unseen_phrasing": sum(unseen) / len(unseen) if unseen else None,
            "unseen_phrasing_n": len(unseen), "correct": correct}


def score_pairs(model: Transformer, tok: Any, pairs: list[Pair], world: Any = None,
                beam: int = 4, alpha: float = 0.6, batch_size: int = 32) -> tuple[dict, list]:
    """(scores, one row per pair with its translation) of `pairs`, decoded with the beam."""
    hyps = translate_ids(model, tok, [p.src for p in pairs], beam, alpha, batch_size)
    result = scores(hyps, [p.target for p in pairs])
    rows = [{**({"id": p.id} if p.id is not None else {}), "source": p.source,
             "target": p.target, "translation": h} for p, h in zip(pairs, hyps)]
    if world is not None:
        w = world_scores(world, [p.id for p in pairs], hyps)
        for row, c in zip(rows, w.pop("correct")):
            row["correct"] = bool(c)
        result.update(w)
    return result, rows


@torch.no_grad()
def average_checkpoints(model: nn.Module, checkpoints: Sequence[Path]) -> None:
    """Set `model`'s parameters to the mean of theirs in `checkpoints` (each verified first):
    the paper's checkpoint averaging. Summed in float64, each parameter once (tied ones
    too); buffers, the same in every checkpoint, are left as they are."""
    if not checkpoints:
        raise ValueError("no checkpoint to average")
    sums: list[Tensor] = []
    for path in checkpoints:
        Checkpointer.verify(path)
        load_weights(model, Path(path) / MODEL_FILE)
        params = [p.detach().double() for p in model.parameters()]
        sums = params if not sums else [a + b for a, b in zip(sums, params)]
    for p, total in zip(model.parameters(), sums):
        p.copy_(total / len(checkpoints))


def _tokenizer(cfg: Seq2SeqConfig, pairs: list[Pair], vocab_size: int) -> Any:
    from gptlab.tokenizer import load_tokenizer, train_tokenizer
    if cfg.tokenizer:
        if not Path(cfg.tokenizer).exists():
            raise NotFound("tokenizer not found", path=cfg.tokenizer, field="tokenizer")
        return load_tokenizer(cfg.tokenizer)
    print(f"training a BPE tokenizer ({vocab_size} tokens) on both sides of the pairs",
          file=sys.stderr)
    return train_tokenizer([t for p in pairs for t in (p.source, p.target)], vocab_size)


def _model(cfg: Seq2SeqConfig, pairs: list[Pair]) -> tuple[Transformer, Any]:
    """(model, tokenizer): a seq2seq directory's, or a preset's with a tokenizer for it."""
    from gptlab.model.presets import PRESETS, build_model, get_preset
    from gptlab.model.transformer import TransformerConfig
    path = Path(cfg.model)
    if path.is_dir():
        model, tok, _ = load_model(path)
        if not isinstance(model, Transformer):
            raise WrongKind("is not an encoder-decoder Transformer: seq2seq trains those (a "
                            "preset such as transformer-small, or a directory seq2seq wrote)",
                            path=path, field="model")
        if tok is None:
            raise UserError("the model has no tokenizer", path=path, field="model")
        if cfg.tokenizer:
            raise UserError("sets the tokenizer of a new model; a model directory is "
                            "continued with its own", field="tokenizer")
        return model.train(), tok
    if cfg.model not in PRESETS and ("/" in cfg.model or path.suffix):
        raise NotFound("model directory not found", path=path, field="model")
    config = get_preset(cfg.model)
    if not isinstance(config, TransformerConfig):
        raise UserError(f"preset '{cfg.model}' is a decoder-only GPT; seq2seq trains an "
                        f"encoder-decoder (transformer-small, transformer-base, ...)",
                        field="model")
    tok = _tokenizer(cfg, pairs, config.vocab_size)
    config = replace(config, vocab_size=tok.vocab_size)
    torch.manual_seed(cfg.seed)
    return build_model(config), tok


def _schedule(cfg: Seq2SeqConfig):
    if cfg.schedule == "cosine":
        return lambda step, total: lr_at(step, cfg.warmup_steps, total, cfg.lr, cfg.min_lr_ratio)
    return lambda step, total: inverse_sqrt_lr(step, cfg.warmup_steps, cfg.lr)


def _splits(cfg: Seq2SeqConfig) -> tuple[list[Pair], list[Pair] | None, list[Pair], Any]:
    """(training pairs, held-out ones (None: a slice of the training pairs), test pairs,
    world or None)."""
    from gptlab.world.build import open_world
    if cfg.data:
        if cfg.world is not None:
            raise UserError("sets the built-in world's pairs, which --data replaces",
                            field="world")
        pairs = read_pairs(cfg.data, cfg.source_field, cfg.target_field)
        val = read_pairs(cfg.val_data, cfg.source_field, cfg.target_field) \
            if cfg.val_data else None
        test = read_pairs(cfg.test_data, cfg.source_field, cfg.target_field) \
            if cfg.test_data else []
        return pairs, val, test, None
    for name in ("val_data", "test_data"):
        if getattr(cfg, name):
            raise UserError("sets held-out pairs of a --data of your own; the world's are its "
                            "validation and test splits", field=name)
    world = open_world(cfg.world or "builtin")
    return (world_pairs(world, "train"), world_pairs(world, "validation"),
            world_pairs(world, "test"), world)


@reports_path_errors
def seq2seq(cfg: Seq2SeqConfig) -> Path:
    """Train an encoder-decoder Transformer on source → target pairs; OUT is its model
    directory, with OUT/test.json and OUT/test_translations.jsonl where there is a test set."""
    cfg.check()
    out = check_dir_out(cfg.out, field="out")
    check_out_of_read_dirs(out, {"data, --data": cfg.data or None,
                                 "val_data, --val-data": cfg.val_data,
                                 "test_data, --test-data": cfg.test_data}, "pairs")
    cfg = resuming(cfg)
    if cfg.keep_checkpoints < cfg.average_last:  # the checkpoints to average are kept
        cfg = replace(cfg, keep_checkpoints=cfg.average_last)
    reads_model = Path(cfg.model).is_dir() and not cfg.resume
    latest = check_run_dir(out, cfg.resume, {"model": cfg.model if reads_model else None}, cfg,
                           cfg.resume_from)
    pairs, val_pairs, test_pairs, world = _splits(cfg)
    if cfg.resume:  # the checkpoint's shape and tokenizer; `train` loads its weights
        from gptlab.tokenizer import load_tokenizer
        model, tok = build_from_meta(read_meta(latest), latest / "config.json"), \
            load_tokenizer(latest)
    else:
        model, tok = _model(cfg, pairs)
    context = model.config.context
    counters = {name: SkipCounter() for name in ("train", "val", "test")}
    items = encode_pairs(tok, pairs, context, counters["train"])
    if val_pairs is not None:
        train_items = items
        val_items = encode_pairs(tok, val_pairs, context, counters["val"])
        if cfg.val_data:
            check_held_out(train_items, val_items, lambda p: (p.source, p.target), cfg.val_data,
                           "pairs", cfg.data)
    else:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed))
        n_val = int(len(items) * cfg.val_fraction)
        val_items = [items[i] for i in order[:n_val].tolist()]
        train_items = [items[i] for i in order[n_val:].tolist()]
    test_items = encode_pairs(tok, test_pairs, context, counters["test"])
    for name, counter in counters.items():
        if counter.total:
            print(f"{name} pairs: {counter.report('pairs')}", file=sys.stderr)
    if not train_items:
        raise UserError("no pair left to train on", path=cfg.data or None)
    if cfg.max_steps is None and cfg.max_minutes is None and not cfg.resume:
        cfg = replace(cfg, max_steps=max(1, int(cfg.epochs * len(train_items)
                                               / (cfg.batch_size * cfg.grad_accum))))
    key = data_key([p.src, p.tgt] for p in train_items)
    if cfg.resume:
        warn_if_data_changed(latest, key, "pairs")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        annotate_resume(out, cfg, latest.name)
    else:
        record_run(out, cfg)
    print(f"{len(train_items):,} training / {len(val_items):,} validation / "
          f"{len(test_items):,} test pairs; model {model.num_params():,} parameters",
          file=sys.stderr)
    start = start_id(tok)

    def batch_of(b: list[Pair]) -> dict:
        return collate(b, tok.pad_id, start, tok.eos_id)
    val_batches = fixed_list_batches(val_items, cfg.batch_size, batch_of) if val_items else None

    decoded = val_items[:cfg.eval_pairs]

    def on_eval(m: nn.Module, step: int, val_loss: float) -> dict:
        hyps = translate_ids(m, tok, [p.src for p in decoded], 1, 0.0, cfg.batch_size)
        got = scores(hyps, [p.target for p in decoded])
        return {"val_bleu": got["bleu"], "val_exact_match": got["exact_match"]}

    result = train(model, ListBatches(train_items, cfg.batch_size, cfg.seed, batch_of),
                   seq2seq_loss, cfg, out, val_batches=val_batches, tokenizer=tok,
                   on_eval=on_eval if decoded else None, resume=cfg.resume,
                   verified=latest, resume_from=latest, tokens_in=target_tokens,
                   loss_weight=target_tokens, lr_schedule=_schedule(cfg),
                   extra={"stage": "seq2seq", "data_key": key})
    averaged = None
    if cfg.average_last > 1:
        checkpoints = Checkpointer(out).last(cfg.average_last)
        averaged = [Checkpointer.step_of(p) for p in checkpoints]
        if len(checkpoints) < cfg.average_last:
            print(f"note: {counted(len(checkpoints), 'checkpoint')} saved, fewer than "
                  f"--average-last {cfg.average_last}: averaging those", file=sys.stderr)
        print(f"averaging the weights of steps {', '.join(map(str, averaged))}",
              file=sys.stderr)
        average_checkpoints(model, checkpoints)
    model.eval()
    test = None
    if test_items:
        print(f"decoding {counted(len(test_items), 'test pair')} (beam {cfg.beam}, "
              f"α {cfg.length_penalty})", file=sys.stderr)
        test, rows = score_pairs(model, tok, test_items, world, cfg.beam, cfg.length_penalty,
                                 cfg.batch_size)
        write_jsonl_atomic(out / "test_translations.jsonl", rows)
        write_json_atomic(out / "test.json", {**test, "beam": cfg.beam,
                                              "length_penalty": cfg.length_penalty,
                                              "step": result.step,
                                              **({} if averaged is None
                                                 else {"averaged_steps": averaged})})
    save_model(out, model, tok, extra={"stage": "seq2seq", "step": result.step,
                                       **({} if averaged is None
                                          else {"averaged_steps": averaged}),
                                       "val_loss": result.val_loss,
                                       "train_pairs": len(train_items),
                                       "skipped": counters["train"].counts,
                                       **({} if test is None else {"test": {
                                           k: test[k] for k in ("bleu", "chrf", "exact_match")
                                           if k in test}})})
    annotate_run(out, test=test)
    summary = "no test pairs" if test is None else (
        f"test BLEU {test['bleu']:.2f}, chrF {test['chrf']:.2f}, exact match "
        f"{test['exact_match']:.3f}" + ("" if "exec_acc" not in test else
                                        f", execution accuracy {test['exec_acc']:.3f}"))
    val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
    print(f"seq2seq: {counted(result.step, 'step')}; val_loss {val}; {summary}; model saved to "
          f"{out}", file=sys.stderr)
    return out


@reports_path_errors
def translate(model_path: str | Path, data: str | Path, out: str | Path | None = None,
              source_field: str = "source", target_field: str = "target", beam: int = 4,
              length_penalty: float = 0.6, batch_size: int = 32,
              max_new_tokens: int | None = None, device: str = "auto") -> dict:
    """`gptlab translate`: decode each record's source with a seq2seq model, write the records
    (every field as read) with a `translation` field added to `out` (JSONL), and score them
    where they hold targets."""
    for name, value in (("beam", beam), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"must be a whole number of at least 1, got {value!r}", field=name)
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool)
                                       or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise UserError(f"must be a whole number of at least 1, got {max_new_tokens!r}",
                        field="max_new_tokens")
    if length_penalty < 0:
        raise UserError(f"must be >= 0, got {length_penalty!r}", field="length_penalty")
    if out is not None:
        check_file_out(out)
    model, tok, _ = load_model(model_path)
    if not isinstance(model, Transformer):
        raise WrongKind("is not an encoder-decoder Transformer (translate decodes the models "
                        "`gptlab seq2seq` trains)", path=model_path, field="model")
    if tok is None:
        raise UserError("the model has no tokenizer", path=model_path, field="model")
    model.to(select_device(device))
    pairs = read_pairs(data, source_field, target_field, need_target=False)
    skips = SkipCounter()
    items = encode_pairs(tok, [replace(p, target=None) for p in pairs], model.config.context,
                         skips)
    if skips.total:
        raise UserError(f"{skips.report('sources')}: shorten them", path=data,
                        field=source_field)
    hyps = translate_ids(model, tok, [p.src for p in items], beam, length_penalty, batch_size,
                         max_new_tokens)
    rows = [{**p.record, "translation": h} for p, h in zip(pairs, hyps)]
    if out is not None:
        write_jsonl_atomic(out, rows)
    refs = [p.target for p in pairs]
    result: dict = {"n": len(rows), "translations": hyps}
    if all(r is not None for r in refs):
        result.update(scores(hyps, refs))
        print(f"BLEU {result['bleu']:.2f}, chrF {result['chrf']:.2f}, exact match "
              f"{result['exact_match']:.3f} on {counted(len(rows), 'pair')} "
              f"({result['bleu_signature']})", file=sys.stderr)
    elif any(r is not None for r in refs):
        print(f"note: {sum(r is None for r in refs)} of {len(refs)} records have no "
              f"{target_field}: no scores", file=sys.stderr)
    if out is None:
        for h in hyps:
            print(h)
    return result
