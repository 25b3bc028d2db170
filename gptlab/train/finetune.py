"""GPT-1's supervised fine-tuning (`gptlab finetune`): the pretrained GPT, a linear layer on the
final hidden state of each text's last token to one logit per label, trained on labelled
texts with the language-modelling loss kept as an auxiliary objective,

    L3 = L2 (the labels' cross-entropy) + λ · L1 (next-token cross-entropy of the same texts),

λ = `lm_coef`, 0.5 in the paper, where it improved generalisation and sped convergence.

A text is encoded as pretraining encodes a document (BOS first where the tokenizer has one)
and ends with the tokenizer's EOS, the token whose final hidden state the classifier reads
(GPT-1's "extract" token): every text ends alike, whatever its last word. Labels are the
distinct values of the label field in the training data, sorted; the model directory keeps
their names (config.json `labels`).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.checkpoint import load_model, save_model
from gptlab.data.instruct import SkipCounter
from gptlab.errors import UserError, WrongKind, check_given, counted, reports_path_errors
from gptlab.eval.stats import clustered_rate
from gptlab.io import (check_dir_out, check_out_of_read_dirs, fields_instead, no_records,
                       read_jsonl, record_file)
from gptlab.model.gpt import GPT
from gptlab.model.heads import ClassifierModel
from gptlab.provenance import record_run
from gptlab.tokenizer import check_text
from gptlab.train.batching import ListBatches, data_key, fixed_list_batches, warn_if_data_changed
from gptlab.train.loop import (TrainConfig, annotate_resume, annotate_run, check_held_out,
                               check_run_dir, held_out_rule, resuming, train)


@dataclass
class FinetuneConfig(TrainConfig):
    """Settings of `gptlab finetune`: the pretrained model, the labelled texts, the auxiliary
    loss's weight, besides the shared training settings (GPT-1's own as defaults)."""

    model: str = field(default="", metadata={
        "help": "the pretrained model (gptlab dir, HF dir or .gguf), or a classifier to "
                "continue"})
    data: str = field(default="", metadata={
        "help": "labelled texts, .jsonl, .parquet or a directory of them: a text field and a "
                "label field per record"})
    out: str = field(default="runs/finetune", metadata={"help": "output model directory"})
    val_data: str | None = field(default=None, metadata={
        "help": "held-out labelled texts (default: a slice of --data)"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of --data held out for validation when --val-data is not given"})
    text_field: str = field(default="text", metadata={"help": "the field holding the text"})
    label_field: str = field(default="label", metadata={
        "help": "the field holding the label (a text, a whole number or a boolean)"})
    lm_coef: float = field(default=0.5, metadata={
        "help": "λ, the weight of the auxiliary language-modelling loss (GPT-1: 0.5; 0: none)"})
    epochs: float = field(default=3.0, metadata={
        "help": "passes over the data: sets max_steps when neither max_steps nor max_minutes "
                "is given (GPT-1: 3)"})
    lr: float = 6.25e-5  # GPT-1's
    warmup_steps: int = 10
    weight_decay: float = 0.01  # GPT-1's
    batch_size: int = 32  # GPT-1's
    eval_every: int = 50
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
            ("lm_coef", self.lm_coef >= 0, "must be >= 0"),
            ("text_field", bool(self.text_field), "must be a field name"),
            ("label_field", bool(self.label_field), "must be a field name"),
        ]


@dataclass
class Labelled:
    ids: list[int]
    label: str
    file: Any = None  # where it was read, for messages
    line: int | None = None


def read_labelled(path: str | Path, text_field: str, label_field: str) -> list[tuple]:
    """(text, label name, file, line) per record; a record without a text or a label stops
    with its file, line and field."""
    rows = read_jsonl(path)
    if not rows:
        raise no_records(path, "labelled texts")
    out = []
    for row in rows:
        where = (record_file(row, path), row.get("_line"))
        text = row.get(text_field)
        if text_field not in row:
            raise UserError("is missing" + fields_instead(row, (text_field,))
                            + " (--text-field names the text's field)", path=where[0],
                            line=where[1], field=text_field)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"must be a non-empty text, got {text!r}", path=where[0],
                            line=where[1], field=text_field)
        try:
            check_text(text, field=text_field, from_json=True)
        except UserError as e:
            raise UserError(e.message, path=where[0], line=where[1], field=text_field) from None
        label = row.get(label_field)
        if isinstance(label, bool):
            label = str(label).lower()
        elif isinstance(label, int) or (isinstance(label, str) and label):
            label = str(label)
        else:
            raise UserError("is missing" + fields_instead(row, (label_field,))
                            + " (--label-field names the label's field)"
                            if label_field not in row else
                            f"must be a text, a whole number or a boolean, got {label!r}",
                            path=where[0], line=where[1], field=label_field)
        out.append((text, label, *where))
    return out


def sorted_labels(names: set[str]) -> list[str]:
    """Label names in order: numerically where all are whole numbers (one number written two
    ways, "01" and "1", two labels in the order of their text, the same on every run), else
    as text."""
    if all(re.fullmatch(r"-?[0-9]+", n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def encode(tok: Any, rows: list[tuple], context: int, skips: SkipCounter) -> list[Labelled]:
    """Each text as pretraining encodes a document, with the EOS the classifier reads last;
    a text longer than the context is skipped and counted."""
    out = []
    end = [tok.eos_id] if tok.eos_id is not None else []
    for text, label, path, line in rows:
        ids = tok.encode(text, bos=tok.bos_id is not None) + end
        if len(ids) > context:
            skips.add(f"longer than the context of {context}")
            continue
        out.append(Labelled(ids, label, path, line))
    return out


def collate(items: list[Labelled], pad_id: int, index: dict[str, int]) -> dict:
    T = max(len(it.ids) for it in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, :len(it.ids)], mask[i, :len(it.ids)] = torch.tensor(it.ids), 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([index[it.label] for it in items])}


def lm_loss(lm_logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the real tokens that follow a real token."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(lm_logits[:, :-1].float().reshape(-1, lm_logits.shape[-1]),
                           targets.reshape(-1), ignore_index=-100)


def finetune_loss(lm_coef: float):
    """The loss function `train` calls: L2 + λ·L1 (`lm_coef` λ), or L2 alone at λ = 0, where the
    language-model head is not run at all."""
    def loss(model: nn.Module, batch: dict) -> Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if lm_coef == 0:
            return F.cross_entropy(model(ids, mask, right_padded=True), batch["labels"])
        logits, lm_logits = model.logits_and_lm(ids, mask, right_padded=True)
        return F.cross_entropy(logits, batch["labels"]) + lm_coef * lm_loss(lm_logits, ids, mask)
    return loss


@torch.no_grad()
def predictions(model: ClassifierModel, batches: list[dict]) -> tuple[list[int], list[int]]:
    """(predicted label index, true index) of every held-out text, in order."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    pred, true = [], []
    for b in batches:
        logits = model(b["input_ids"].to(device), b["attention_mask"].to(device),
                       right_padded=True)
        pred += logits.argmax(-1).tolist()
        true += b["labels"].tolist()
    model.train(was)
    return pred, true


@reports_path_errors
def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune a pretrained GPT to classify texts (GPT-1); OUT is a classifier directory."""
    check_given(cfg, ("model", "data"), "finetune")
    cfg.check()
    out = check_dir_out(cfg.out, field="out")
    check_out_of_read_dirs(out, {"data, --data": cfg.data, "val_data, --val-data": cfg.val_data},
                           "labelled texts")
    cfg = resuming(cfg)
    latest = check_run_dir(out, cfg.resume, {"model": cfg.model}, cfg, cfg.resume_from)
    rows = read_labelled(cfg.data, cfg.text_field, cfg.label_field)
    val_rows = read_labelled(cfg.val_data, cfg.text_field, cfg.label_field) if cfg.val_data \
        else []
    base, tok, _ = load_model(cfg.model)
    if tok is None:
        raise UserError("the model has no tokenizer", path=cfg.model)
    if isinstance(base, ClassifierModel):
        model, labels = base, base.labels  # continued: its labels stay
        unknown = sorted({r[1] for r in rows} - set(labels))
        if unknown:
            raise UserError(f"holds labels the classifier has no output for: {unknown} (it "
                            f"has {labels})", path=cfg.data, field=cfg.label_field)
    elif isinstance(base, GPT):
        labels = sorted_labels({r[1] for r in rows})
        if len(labels) < 2:
            raise UserError(f"holds one label only ({labels[0]!r}): a classifier needs two or "
                            f"more", path=cfg.data, field=cfg.label_field)
        torch.manual_seed(cfg.seed)
        model = ClassifierModel.from_gpt(base, labels)
        del base
    else:
        raise WrongKind("fine-tuning starts from a GPT (a language model) or a classifier",
                        path=cfg.model, field="model")
    index = {name: i for i, name in enumerate(labels)}
    for text, label, path, line in val_rows:
        if label not in index:
            raise UserError(f"is {label!r}, a label the training data does not have (it has "
                            f"{labels})", path=path, line=line, field=cfg.label_field)
    context = model.config.context
    skips, val_skips = SkipCounter(), SkipCounter()
    items = encode(tok, rows, context, skips)
    if cfg.val_data:
        train_items, val_items = items, encode(tok, val_rows, context, val_skips)
        check_held_out(train_items, val_items, lambda e: (tuple(e.ids), e.label), cfg.val_data,
                       "labelled texts", cfg.data)
    else:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed))
        n_val = int(len(items) * cfg.val_fraction)
        val_items = [items[i] for i in order[:n_val].tolist()]
        train_items = [items[i] for i in order[n_val:].tolist()]
    for path, counter in ((cfg.data, skips), (cfg.val_data, val_skips)):
        if path and counter.total:
            print(f"{path}: {counter.report('texts')}", file=sys.stderr)
    if not train_items:
        raise UserError("no labelled text left to train on", path=cfg.data)
    if cfg.max_steps is None and cfg.max_minutes is None and not cfg.resume:
        cfg = replace(cfg, max_steps=max(1, int(cfg.epochs * len(train_items)
                                               / (cfg.batch_size * cfg.grad_accum))))
    key = data_key([e.ids, e.label] for e in train_items)
    if cfg.resume:
        warn_if_data_changed(latest, key, "labelled texts")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        annotate_resume(out, cfg, latest.name)
    else:
        record_run(out, cfg)

    def batch_of(b: list[Labelled]) -> dict:
        return collate(b, tok.pad_id, index)
    val_batches = fixed_list_batches(val_items, cfg.batch_size, batch_of) if val_items else None

    def on_eval(m: nn.Module, step: int, val_loss: float) -> dict:
        pred, true = predictions(m, val_batches)
        return {"accuracy": sum(p == t for p, t in zip(pred, true)) / len(true)}

    result = train(model, ListBatches(train_items, cfg.batch_size, cfg.seed, batch_of),
                   finetune_loss(cfg.lm_coef), cfg, out, val_batches=val_batches, tokenizer=tok,
                   on_eval=on_eval if val_batches else None, resume=cfg.resume,
                   verified=latest, resume_from=latest, perplexity=False,
                   loss_weight=lambda b: len(b["labels"]),
                   extra={"stage": "finetune", "data_key": key})
    model.eval()
    held = {"mean": None, "ci95": None, "n": 0}
    if val_batches:
        pred, true = predictions(model, val_batches)
        held = clustered_rate([(int(p == t), 1) for p, t in zip(pred, true)])
    save_model(out, model, tok, extra={"stage": "finetune", "step": result.step,
                                       "lm_coef": cfg.lm_coef, "val_accuracy": held["mean"],
                                       "val_accuracy_ci95": held["ci95"],
                                       "val_texts": held["n"], "train_texts": len(train_items),
                                       "skipped": skips.counts})
    annotate_run(out, val_accuracy=held["mean"])
    acc = "n/a" if held["mean"] is None else f"{held['mean']:.3f}" + (
        "" if held["ci95"] is None else " [{:.3f}, {:.3f}]".format(*held["ci95"]))
    print(f"finetune: {counted(result.step, 'step')}; {len(labels)} labels; held-out accuracy "
          f"{acc} on {counted(held['n'], 'text')}", file=sys.stderr)
    return out
