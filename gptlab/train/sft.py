"""InstructGPT step 1: supervised fine-tuning on demonstrations.

Demonstrations are `prompt`/`completion` or `messages` records; the loss is the next-token
cross-entropy on the assistant's tokens only (the prompt, the user's turns and the template's
role markers are context, not targets). Training runs in the common loop; each evaluation
measures validation loss and, on the built-in world, execution accuracy, and the best
evaluation's weights are what OUT holds at the end ("train to the validation optimum").
"""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.checkpoint import (Checkpointer, is_gptlab_dir, load_language_model, load_model,
                               read_meta, replace_model, save_model, weights_key)
from gptlab.data.instruct import Example, SkipCounter, read_demonstrations
from gptlab.errors import UserError, check_given, counted, reports_path_errors
from gptlab.io import (check_dir_out, check_out_of_read_dirs, read_jsonl, remove_dir,
                       remove_stale_temps)
from gptlab.model.attention import MIN_SHARED_PREFIX, PrefixKV
from gptlab.model.gpt import GPT
from gptlab.provenance import record_run
from gptlab.train.batching import (ListBatches, data_key, fixed_list_batches, pad_examples,
                                   warn_if_data_changed)
from gptlab.train.loop import (MetricsLog, TrainConfig, annotate_resume, annotate_run,
                               check_held_out, check_run_dir, held_out_rule,
                               refuse_other_settings, resuming, train)

# Settings that decide what an evaluation measures: the held-out demonstrations, the world whose
# execution accuracy is the score and, with a world, how many questions and how long an answer.
# A resume must keep them, or one best-step choice would compare evaluations of two kinds.
MEASURE_SETTINGS = ("val_data", "world", "exec_eval", "max_new_tokens")
# Settings that decide when evaluations are made and what is done with them, not what they
# measure: a resume may change them, and stderr says what that means for the run.
NOTED_SETTINGS = {
    "eval_every": "the best step is chosen among evaluations at both intervals, and patience "
                  "counts them all",
    "patience": "counted over the run's evaluations so far too",
    "select_best": "the choice is made at the end, among all the run's evaluations",
}


@dataclass
class SFTConfig(TrainConfig):
    """Settings of `gptlab sft`: the model, the demonstrations, the held-out ones, the world
    to score on, besides the shared training settings."""

    model: str = field(default="", metadata={
        "help": "pretrained model (gptlab dir, HF dir, .gguf)"})
    data: str = field(default="", metadata={
        "help": "demonstrations (.jsonl, .parquet or a directory of them)"})
    out: str = field(default="runs/sft", metadata={"help": "output model directory"})
    val_data: str | None = field(default=None, metadata={
        "help": "held-out demonstrations, .jsonl, .parquet or a directory of them (default: a "
                "slice of --data)"})
    val_fraction: float = field(default=0.05, metadata={
        "help": "share of --data held out for validation when --val-data is not given"})
    epochs: float = field(default=3.0, metadata={
        "help": "passes over the data: sets max_steps when neither max_steps nor max_minutes "
                "is given"})
    world: str | None = field(default=None, metadata={
        "help": "built-in world directory: also measure execution accuracy ('builtin' = "
                "default world)"})
    exec_eval: int = field(default=200, metadata={
        "help": "validation questions scored by execution accuracy with --world (0: off)"})
    max_new_tokens: int = field(default=96, metadata={
        "help": "longest answer generated for the execution accuracy"})
    select_best: bool = field(default=True, metadata={
        "help": "keep the weights of the best evaluation"})
    patience: int = field(default=0, metadata={
        "help": "stop after this many evaluations in which neither the score nor the validation "
                "loss improved (0: run every step)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT's latest checkpoint"})
    resume_from: str | None = field(default=None, metadata={
        "help": "continue from this checkpoint of OUT instead: step-N, N, or its path "
                "(OUT/checkpoints/step-N); implies resume"})
    lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_every: int = 100
    save_every: int = 0
    batch_size: int = 16

    def rules(self) -> list[tuple[str, bool, str]]:
        """(field, holds, what is expected): the shared rules and SFT's."""
        return super().rules() + [
            ("val_fraction", 0 <= self.val_fraction < 1, "must be in [0, 1)"),
            held_out_rule(self.val_data, self.data),
            ("epochs", self.epochs > 0, "must be > 0"),
            ("exec_eval", self.exec_eval >= 0, "must be >= 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("patience", self.patience >= 0, "must be >= 0"),
        ]


def shared_prefix(batch: dict) -> int:
    """How many leading tokens every row of a right-padded batch has in common and takes no
    loss on (a system prompt, a schema), leaving each row at least one token of its own."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    same = (ids == ids[:1]).all(0).long().cumprod(0)
    targets = (labels != -100).any(0).long()
    first_target = int(targets.argmax()) if bool(targets.any()) else ids.shape[1]
    return min(int(same.sum()), first_target, int(mask.sum(1).min()) - 1)


def plan_batch(batch: dict) -> dict:
    """The batch with what `sft_loss` decides from its values: `shared_prefix`, the tokens
    encoded once (0: none), and `targets`, the flat indices of the labelled positions after
    them. Decided here, on the CPU where the batch is built; decided by `sft_loss` on a GPU,
    each read of a value waits for the device (eight waits a step)."""
    n = shared_prefix(batch)
    n = n if n >= MIN_SHARED_PREFIX else 0
    targets = (batch["labels"][:, n:] != -100).flatten().nonzero()[:, 0]
    return {**batch, "shared_prefix": n, "targets": targets}


def sft_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy on the target tokens. Right padding: the causal fast path is exact for real
    tokens, padding carries -100. A prefix shared by all rows (the world's schema is 60% of each
    example) is encoded once and its keys/values shared, gradients flowing through them; the
    loss equals the plain forward's (a test checks, with gradients) at about half the compute.
    A batch from `plan_batch` brings its prefix and targets; another one is planned here."""
    if not isinstance(model, GPT):
        return model(batch["input_ids"], labels=batch["labels"])
    if "targets" not in batch:
        batch = plan_batch(batch)
    ids, labels, n = batch["input_ids"], batch["labels"], batch["shared_prefix"]
    if n == 0:
        h, _ = model.hidden_states(ids)
        return model.lm_loss(h, labels, batch["targets"])
    prefix = PrefixKV()
    model.hidden_states(ids[:1, :n], cache=prefix)
    # A list: expanding reads the rows, which on a GPU would wait for the device.
    rows = [0] * ids.shape[0]
    h, _ = model.hidden_states(ids[:, n:], batch["attention_mask"], cache=prefix.expand(rows))
    return model.lm_loss(h, labels[:, n:], batch["targets"])


def target_tokens(batch: dict) -> int:
    """The tokens `sft_loss` averages over: with --grad-accum, each micro-batch's loss weighs
    by them, so the update is the per-token mean over all its micro-batches, as one batch."""
    return int((batch["labels"] != -100).sum())


def note_unended_answers(examples: list[Example], tok: Any, path: str | Path) -> None:
    """Say on stderr how many demonstrations train no stop token at the end of their answer:
    under a chat template whose assistant turn ends in plain text (`User: ...\nAssistant:
    ...\n`) nothing after the answer is trained, so the model learns no end to an answer, and
    `sample`, `ppo` and `chat`, which stop at the template's next turn, wait for one it was never
    taught to write. A `prompt`/`completion` answer ends with EOS; gptlab's, ChatML's and
    Llama's turns end with a token."""
    stops = tok.stop_ids
    lasts = [max((i for i, m in enumerate(ex.loss_mask) if m), default=None) for ex in examples]
    unended = sum(1 for ex, last in zip(examples, lasts)
                  if last is not None and ex.ids[last] not in stops)
    if unended:
        print(f"note: {path}: {unended} of {counted(len(examples), 'demonstration')} end their "
              f"answer with no stop token, which SFT would train (the chat template ends an "
              f"assistant turn in text): the model does not learn to end an answer; give a "
              f"template that ends a turn with EOS, or prompt/completion records",
              file=sys.stderr)


def split_examples(examples: list[Example], fraction: float,
                   seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(examples) * fraction)) if len(examples) > 1 else 0
    val = [examples[i] for i in sorted(order[:n_val])]
    return [examples[i] for i in sorted(order[n_val:])], val


class BestKeeper:
    """An `on_eval` callback: scores the model (execution accuracy when a world is given, else
    −validation loss) and, with `keep_weights`, saves the best weights to OUT/best."""

    def __init__(self, out: Path, tokenizer: Any, exec_eval: Any = None, patience: int = 0,
                 keep_weights: bool = True):
        self.dir, self.tok, self.exec_eval = out / "best", tokenizer, exec_eval
        self.keep_weights = keep_weights
        self.best_step: int | None = None
        self.best_val_loss: float | None = None  # of the best evaluation
        self._best_key: tuple[float, float] | None = None  # (score, -val_loss) of the best
        # For `patience`: evaluations since the last progress (a best score or a new lowest
        # validation loss), and that lowest loss.
        self.patience, self.since_progress = patience, 0
        self.lowest_val_loss: float | None = None

    @property
    def best(self) -> float | None:
        """The best evaluation's score."""
        return self._best_key[0] if self._best_key is not None else None

    def __call__(self, model: nn.Module, step: int, val_loss: float | None) -> dict:
        row: dict = {}
        if self.exec_eval is not None:
            row["exec_acc"] = self.exec_eval(model)
        if self._record(step, row.get("exec_acc"), val_loss) and self.keep_weights:
            replace_model(self.dir, model, self.tok, extra={"stage": "sft", "step": step})
        if self.patience and self.since_progress >= self.patience:
            row["stop"] = True  # the validation optimum is behind us
        return row

    def _record(self, step: int, exec_acc: float | None, val_loss: float | None) -> bool:
        """Take one evaluation into account; True when its score is the best so far."""
        score = exec_acc if self.exec_eval is not None else (
            -val_loss if val_loss is not None else None)
        best = improved = False
        # Equal execution accuracy (0 before the model writes any SQL that runs) goes to the
        # lower validation loss, so a trained model is never passed over for the untrained one.
        key = None if score is None else (
            score, -val_loss if val_loss is not None else -math.inf)
        if key is not None and (self._best_key is None or key > self._best_key):
            self.best_step, self._best_key, self.best_val_loss = step, key, val_loss
            best = True
        if val_loss is not None and (self.lowest_val_loss is None
                                     or val_loss < self.lowest_val_loss):
            # A falling validation loss is progress too: execution accuracy can sit flat for a
            # while before the model learns to copy values, and must not end training there.
            self.lowest_val_loss, improved = val_loss, True
        self.since_progress = 0 if best or improved else self.since_progress + 1
        return best

    def restore(self, metrics: list[dict], upto: int, checkpoint: Path | None = None,
                start: nn.Module | None = None, start_gone: str = "") -> None:
        """On resume: replay the evaluations of the run so far (up to its checkpoint's step),
        so a later, worse evaluation does not replace the best weights saved in OUT/best.
        OUT/best must hold that best evaluation's weights: a run that died after its checkpoint,
        or a line of it left by `--resume-from` an earlier step, may have left a later
        evaluation's there, which this run has not made (yet). They are then taken from the
        checkpoint of the best step, where there is one (`_saved_best`); step 0's, which none
        holds, from `start`, the input model, where it still holds them (else `start_gone`
        says why it does not)."""
        for row in metrics:
            if row["step"] <= upto and "val_loss" in row:
                self._record(row["step"], row.get("exec_acc"), row["val_loss"])
        if not self.keep_weights or self.best is None or \
                _meta_of(self.dir).get("step") == self.best_step:
            return
        out = self.dir.parent
        source: Path | nn.Module | None
        finished = _meta_of(out)
        if checkpoint is not None and self.best_step == upto:
            source = checkpoint  # the weights its own step's evaluation measured
        elif finished.get("best_step") == self.best_step \
                and finished.get("val_loss") == self.best_val_loss:
            # A finished run: OUT holds its best weights, OUT/best is gone. Its val_loss is
            # its weights' own: a run with --no-select-best records the best step too, but
            # holds the last weights, which were taken for the best's on a resume selecting.
            source = out
        elif self.best_step == 0 and start is not None:
            source = start  # the input model, its weights checked against the run's start
        else:
            source, why_not = self._saved_best(out, metrics)
            if self.best_step == 0 and start_gone:
                why_not += f", and {start_gone}"
        if source is None:
            print(f"note: {self.dir} is missing or holds another evaluation's weights, and "
                  f"{why_not}; the best evaluation so far (step {self.best_step}) can no longer "
                  f"be selected", file=sys.stderr)
            self.best_step = self._best_key = self.best_val_loss = None
            return
        model = source if isinstance(source, nn.Module) else load_model(source)[0]
        replace_model(self.dir, model, self.tok, extra={"stage": "sft", "step": self.best_step})

    def _saved_best(self, out: Path, metrics: list[dict]) -> tuple[Path | None, str]:
        """OUT/checkpoints/step-<best step> where it holds the weights the best evaluation
        measured: its files pass the manifest check, and its training row is the one
        metrics.jsonl logged at that step (where it logged one: every log_every steps), so it
        is not another line's, saved at that step after the metrics' line passed it. Else None
        and why not."""
        path = Checkpointer(out).dir / f"step-{self.best_step}"
        if not path.is_dir():
            return None, f"no checkpoint holds them ({path} is not there)"
        try:
            Checkpointer.verify(path, advice="")
        except UserError as e:
            return None, f"their checkpoint fails its manifest check ({e})"
        theirs = Checkpointer.state_of(path).get("row") or {}
        logged = next((r for r in metrics if r["step"] == self.best_step and "loss" in r), None)
        if logged is not None and any(logged.get(k) != v for k, v in theirs.items()):
            return None, (f"{path} is another line's (its training row differs from "
                          f"metrics.jsonl's)")
        return path, ""


def check_resume_settings(cfg: SFTConfig, checkpoint: Path) -> None:
    """Refuse to resume with another MEASURE_SETTINGS value (with a world: its question count
    and answer length too), naming the first; note a changed NOTED_SETTINGS value. A checkpoint
    from before these were recorded passes."""
    theirs = read_meta(checkpoint).get("eval_settings")
    if not isinstance(theirs, dict):
        return
    checked = MEASURE_SETTINGS if cfg.world else ("val_data", "world")
    refuse_other_settings(cfg, theirs, checked, checkpoint, "they decide what each evaluation "
                          "measures, and the best step is chosen among all the run's evaluations")
    for k, meaning in NOTED_SETTINGS.items():
        if k in theirs and theirs[k] != getattr(cfg, k):
            print(f"note: {k} changed from {theirs[k]!r} to {getattr(cfg, k)!r} on resume; "
                  f"{meaning}", file=sys.stderr)


def _meta_of(path: Path) -> dict:
    """The config.json of the gptlab model directory `path`; {} if it is none."""
    return read_meta(path) if is_gptlab_dir(path) else {}


@reports_path_errors
def sft(cfg: SFTConfig) -> Path:
    """Fine-tune `cfg.model` on `cfg.data`; returns the model directory `cfg.out`."""
    from gptlab.eval.execution import world_exec_evaluator

    check_given(cfg, ("model", "data"), "sft")
    cfg.check()
    out = check_dir_out(cfg.out, field="out")  # not "", the current directory
    check_out_of_read_dirs(out, {"data, --data": cfg.data, "val_data, --val-data": cfg.val_data},
                           "demonstrations")
    cfg = resuming(cfg)
    latest = check_run_dir(out, cfg.resume, {"model": cfg.model}, cfg, cfg.resume_from)
    if cfg.resume:
        check_resume_settings(cfg, latest)
    model, tok, _ = load_language_model(cfg.model)
    # Step 0's weights: no checkpoint holds them, so a resume whose best evaluation is step 0
    # takes them from the input model, where it still holds the run's (its checkpoints record
    # the digest of the first session's).
    start_key = weights_key(model)
    run_start_key = read_meta(latest).get("start_key") if cfg.resume else start_key
    torch.manual_seed(cfg.seed)
    context = model.config.context
    # One counter per file: each file's skips are reported (and blamed) on that file alone.
    skips, val_skips = SkipCounter(), SkipCounter()
    examples = read_demonstrations(cfg.data, tok, context, skips)
    if cfg.val_data:
        train_ex, val_ex = examples, read_demonstrations(cfg.val_data, tok, context, val_skips)
    else:
        # val_fraction < 1 leaves training at least one: read_demonstrations refuses none
        train_ex, val_ex = split_examples(examples, cfg.val_fraction, cfg.seed)
    for path, counter in ((cfg.data, skips), (cfg.val_data, val_skips)):
        if counter.total:
            print(f"{path}: {counter.report('demonstrations')}", file=sys.stderr)
    note_unended_answers(examples, tok, cfg.data)
    if cfg.val_data:
        check_held_out(train_ex, val_ex, lambda ex: (tuple(ex.ids), tuple(ex.loss_mask)),
                       cfg.val_data, "demonstrations", cfg.data)
    # --epochs sets a new run's length; a resume without --max-steps keeps the run's own (a
    # time budget's too), as the checkpoint recorded it.
    if cfg.max_steps is None and cfg.max_minutes is None and not cfg.resume:
        # On a copy: the caller's config, run again on other data, must set its own length.
        cfg = replace(cfg, max_steps=max(1, int(cfg.epochs * len(train_ex)
                                               / (cfg.batch_size * cfg.grad_accum))))

    exec_eval = None
    if cfg.world and cfg.exec_eval > 0:
        if cfg.val_data:
            val_records = read_jsonl(cfg.val_data)
        else:  # the held-out records of --data, never ones trained on
            held_out = {(ex.file, ex.line) for ex in val_ex}
            val_records = [r for r in read_jsonl(cfg.data)
                           if (r.get("_file"), r["_line"]) in held_out]
        exec_eval = world_exec_evaluator(cfg.world, tok, val_records[:cfg.exec_eval],
                                         cfg.max_new_tokens, cfg.val_data or cfg.data, context)
    key = data_key([ex.ids, ex.loss_mask] for ex in train_ex)
    if cfg.resume:
        warn_if_data_changed(latest, key, "demonstrations")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        annotate_resume(out, cfg, latest.name)
    else:
        record_run(out, cfg)
    annotate_run(out, data={"train": len(train_ex), "validation": len(val_ex),
                            "skipped": skips.counts, "val_skipped": val_skips.counts})
    keeper = BestKeeper(out, tok, exec_eval, cfg.patience, keep_weights=cfg.select_best)
    if cfg.resume:
        # The resumed line's rows: metrics.jsonl may hold an abandoned line's past its fork.
        same = run_start_key == start_key
        keeper.restore(MetricsLog.line_rows(out / "metrics.jsonl", Checkpointer.state_of(latest)),
                       Checkpointer.step_of(latest), latest, start=model if same else None,
                       start_gone="" if same else (
                           f"{cfg.model} (--model) no longer holds the weights the run started "
                           "from" if run_start_key is not None else "the run's checkpoints "
                           "record no digest of the input model's weights to check it by"))

    collate = lambda b: plan_batch(pad_examples(b, tok.pad_id))  # noqa: E731
    # No held-out demonstration (a --data of one): no evaluation, so the keeper is never called.
    val_batches = fixed_list_batches(val_ex, cfg.batch_size, collate) if val_ex else None
    result = train(model, ListBatches(train_ex, cfg.batch_size, cfg.seed, collate), sft_loss,
                   cfg, out, val_batches=val_batches, tokenizer=tok, on_eval=keeper,
                   resume=cfg.resume, verified=latest, resume_from=latest,
                   loss_weight=target_tokens, extra={
                       "stage": "sft", "data_key": key, "start_key": run_start_key,
                       "eval_settings": {
                           k: getattr(cfg, k) for k in (*MEASURE_SETTINGS, *NOTED_SETTINGS)}})
    val_loss = result.val_loss
    if cfg.select_best and keeper.best is not None:
        best, _, _ = load_model(keeper.dir)
        model, val_loss = best, keeper.best_val_loss  # the saved weights' own loss
    save_model(out, model, tok, extra={"stage": "sft", "step": result.step,
                                       "best_step": keeper.best_step, "best_score": keeper.best,
                                       "val_loss": val_loss})
    # In one step: file by file, a kill midway left OUT/best's config.json without its weights,
    # which a resume took for the best evaluation's.
    remove_dir(keeper.dir)
    remove_stale_temps(out, ".best.*.tmp*")  # a killed save's or removal's copy of OUT/best
    if keeper.best is None:
        kept = "no evaluation ran: the last weights"
    else:
        kept = (f"best evaluation at step {keeper.best_step} ("
                + (f"exec_acc {keeper.best:.4f}" if exec_eval else f"val_loss {-keeper.best:.4f}")
                + ")")
        if not cfg.select_best:
            kept = f"the last weights, step {result.step} ({kept}, not selected)"
    print(f"SFT: {counted(result.step, 'step')}; {kept}; saved to {out}", file=sys.stderr)
    if cfg.select_best and keeper.best_step == 0 and result.step > 0:
        print(f"note: no evaluation after step 0 beat the starting model "
              f"({'on execution accuracy' if exec_eval else 'on validation loss'}), so {out} "
              f"holds the starting weights; with --world, more --exec-eval questions measure "
              f"finer, and --no-select-best keeps the last weights", file=sys.stderr)
    return out
