"""The training pieces every stage shares, and the common loop simple stages hand their batches to.

Pieces (each usable alone; PPO builds its own loop from them):

    check_fields(cfg, rules)                    a UserError naming the first bad field (its
                                                type against its annotation, then the rules)
    check_run_dir(out, resume, inputs, cfg)     OUT (and the checkpoint to resume) checked
                                                before a stage writes to it
    select_device(name)                         "auto" -> cuda or cpu
    make_optimizer(model, lr, wd, betas)        AdamW with decay on weight matrices only
    lr_at(step, warmup, total, peak, min_ratio) linear warmup, then cosine down to peak*min_ratio
    inverse_sqrt_lr(step, warmup, peak)         linear warmup, then peak*sqrt(warmup/step) (the
                                                2017 Transformer's schedule)
    set_lr(optimizer, lr)
    autocast(device, bf16)                      bf16 autocast on CUDA, a no-op elsewhere
    allow_tf32(device)                          TF32 float32 matmuls on CUDA
    accumulate_gradients(model, micro, loss_fn) backward over micro-batches, mean loss (per
                                                micro-batch, or weighted: `weight_of`)
    backward_micro_batches, clip_grad_norm      the same, their results left on the device
    clip_gradients(model, max_norm)             the global grad norm (before clipping)
    evaluate(model, batches, loss_fn)           mean loss, no grad, dropout off (per batch, or
                                                weighted: `weight_of`)
    rng_state() / set_rng_state(s), preserved_rng()
    held_interrupt()                            Ctrl-C inside a block takes effect at its end
    MetricsLog(path, tensorboard_dir)           metrics.jsonl, one flushed JSON object per line
                                                (a NaN loss null, named in `non_finite`;
                                                `read_metrics` gives the float back)
    steps_for_budget(...)                       --max-minutes -> a step count

The common loop, `train(model, batches, loss_fn, cfg, out_dir, ...)`: a stage gives it

    batches   an endless iterator of batches with `state() -> dict` and `load_state(dict)`
              (its data position; see gptlab.data.tokens.BlockBatches / EpochSampler)
    loss_fn   loss_fn(model, batch) -> scalar loss tensor (the batch already on the device)
    val_batches  a list of batches (or a function returning an iterable) for validation

and the loop does the rest: schedule, accumulation, clipping, evaluation (loss and perplexity,
plus an optional `on_eval(model, step, val_loss) -> dict` such as a generated sample; a row with
`"stop": True` ends training there: early stopping), checkpoints with
optimizer, data position and RNG states, metrics.jsonl, progress bar, exact resume.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import numbers
import os
import random
import re
import signal
import sys
import threading
import time
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from gptlab.checkpoint import Checkpointer
from gptlab.devices import queued_copy, to_device
from gptlab.engine import eval_mode
from gptlab.errors import UserError, counted
from gptlab.io import (check_dir_out, named_os_error, restore_non_finite, strict_json,
                       write_json_atomic, write_jsonl_atomic)

DEFAULT_MAX_STEPS = 1000  # when neither max_steps nor max_minutes is given
# Settings that decide which rows are trained on and which are held out: a resume must keep them.
SPLIT_SETTINGS = ("seed", "val_fraction", "block_size", "batch_size", "grad_accum")
# Settings of the update and its schedule: a resume must keep them too. The optimizer's saved
# state holds the betas and weight decay it was made with, and loading it would silently put
# them back in place of new ones; another lr or warmup would bend the schedule mid-run.
OPTIMIZER_SETTINGS = ("lr", "min_lr_ratio", "warmup_steps", "clip", "weight_decay", "beta1",
                      "beta2", "schedule")
# The trainer-state keys a resume of the common loop reads (`train`); `max_minutes` and the
# others it reads with a default may be absent (a checkpoint written before they were saved).
RESUMED_STATE = ("step", "tokens", "elapsed_s", "total_steps", "budget_pending", "data", "rng")
_UNRECORDED = object()    # a run's time budget, resumed from a checkpoint that did not record it
MEASURE_STEPS = 3         # steps timed (after the first, which pays for warm-up) for max_minutes


@dataclass
class TrainConfig:
    """Settings every training stage shares (optimizer, schedule, length, batches,
    evaluation, checkpoints, device); each stage's config extends it."""

    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={
        "help": "the cosine schedule ends at lr * min_lr_ratio"})
    warmup_steps: int = field(default=100, metadata={"help": "steps of linear warmup to lr"})
    max_steps: int | None = field(default=None, metadata={
        "help": "optimizer updates (default: from --max-minutes when given; else sft, reward and "
                f"finetune count --epochs, pretrain takes {DEFAULT_MAX_STEPS})"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "a time budget in minutes, turned into max_steps after a few steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per update (effective batch: batch_size * grad_accum)"})
    clip: float = field(default=1.0, metadata={"help": "max global gradient norm (0: no clipping)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    eval_every: int = field(default=100, metadata={
        "help": "steps between validations (0: only at the end)"})
    eval_batches: int = field(default=10, metadata={
        "help": "validation batches per evaluation in pretraining; sft and reward evaluate their "
                "whole held-out set at any value above 0 (0: no validation)"})
    save_every: int = field(default=500, metadata={
        "help": "steps between checkpoints (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "checkpoints kept in OUT/checkpoints (the oldest are removed)"})
    log_every: int = field(default=10, metadata={
        "help": "steps between training-loss rows in metrics.jsonl"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the model for the forward pass"})
    bf16: bool = field(default=True, metadata={
        "help": "bf16 autocast on CUDA (the CPU always trains in float32)"})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA where there is a GPU, else the CPU), cpu, cuda, cuda:N or mps"})
    tensorboard: bool = field(default=False, metadata={
        "help": "also write OUT/tensorboard/ (needs the tensorboard package)"})
    progress: bool = field(default=True, metadata={"help": "a progress bar on stderr"})

    def check(self) -> None:
        """Raise a UserError naming the first field with an impossible value."""
        self.check_values()
        select_device(self.device)

    def check_values(self) -> None:
        """Raise a UserError naming the first field whose value no run can take (`rules`):
        reading no file and starting no device, it runs in the config loader too, which names
        the YAML line or the flag that wrote the value."""
        check_fields(self, self.rules)

    def rules(self) -> list[tuple[str, bool, str]]:
        """(field, holds, what is expected); a stage's config adds its own."""
        return [
            ("lr", self.lr > 0, "must be > 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1"),
            ("max_minutes", self.max_minutes is None or self.max_minutes > 0, "must be > 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("clip", self.clip >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            decay_rule(self.lr, self.weight_decay),
            ("beta1", 0 <= self.beta1 < 1, "must be in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "must be in [0, 1)"),
            ("eval_every", self.eval_every >= 0, "must be >= 0"),
            ("eval_batches", self.eval_batches >= 0, "must be >= 0"),
            ("save_every", self.save_every >= 0, "must be >= 0"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            # numpy's generators take no negative seed, torch's none of 2**64 or more.
            ("seed", 0 <= self.seed < 2**64, "must be in [0, 2**64)"),
        ]


def decay_rule(lr: float, weight_decay: float) -> tuple[str, bool, str]:
    """AdamW multiplies the weights by 1 - lr * weight_decay each step: at a product of 1 or
    more it zeroes or flips them, and the run trains to nan and saves that."""
    # Built with the other rules, before the one that refuses an lr of 0 is read.
    bound = 1 / lr if lr > 0 else math.inf
    return ("weight_decay", lr * weight_decay < 1,
            f"must be below 1 / lr = {bound:g} (AdamW multiplies the weights by 1 - lr x "
            f"weight_decay each step, which at {lr:g} x {weight_decay:g} zeroes or flips them)")


def held_out_rule(val_data: str | None, data: str | None) -> tuple[str, bool, str]:
    """A --val-data that is the --data file, or holds it or lies in it (a directory of shards
    is read as one file): validation would score what the model trains on, and best-checkpoint
    selection and early stopping would follow the training loss."""
    how = None
    if val_data and data:
        v, d = Path(val_data).resolve(), Path(data).resolve()
        how = "is" if v == d else "lies in" if d in v.parents else "holds" if v in d.parents \
            else None
    return ("val_data", how is None,
            f"{how} the training data (data, --data): validation would score what the model "
            f"trains on; give held-out data, or leave val_data (--val-data) out to hold out a "
            f"slice of data")


def check_held_out(train: list, val: list, key: Callable[[Any], Hashable], val_path: str,
                   what: str, data_path: str) -> None:
    """Refuse a --val-data whose records, as encoded, are those of --data, in any order: the
    same rows in another file or format (a .parquet of the .jsonl, `messages` for `prompt` and
    `completion`), which `held_out_rule`, comparing paths, lets through. Validation would score
    what the model trains on. A set that merely shares records with --data is the user's call,
    said in a warning naming the first shared record in each file (`warn_shared_held_out`)."""
    if val and len(val) == len(train) and Counter(map(key, val)) == Counter(map(key, train)):
        raise UserError(
            f"holds the same {len(val)} {what} as the training data (data, --data), in another "
            f"file or format: validation would score what the model trains on; give held-out "
            f"data, or leave val_data (--val-data) out to hold out a slice of data",
            path=val_path, field="val_data")
    warn_shared_held_out(train, val, key, val_path, what, data_path)


def warn_shared_held_out(train: list, val: list, key: Callable[[Any], Hashable], val_path: str,
                         what: str, data_path: str) -> None:
    """Warn, on stderr, where some of --val-data's records, as encoded, are records of --data
    too: their validation loss and score are those of examples trained on, so the held-out
    figures, the best checkpoint and early stopping lean towards memorising. `train` and `val`
    hold records with `line` and `file` (their shard, None for a file given as such)."""
    first_in_train: dict[Hashable, Any] = {}
    for t in train:
        first_in_train.setdefault(key(t), t)
    shared = [v for v in val if key(v) in first_in_train]
    if not shared:
        return
    v, t = shared[0], first_in_train[key(shared[0])]
    print(f"warning: {v.file or val_path}:{v.line}: {len(shared)} of {len(val)} held-out {what} "
          f"(val_data, --val-data) are training {what} too (data, --data), the first of them "
          f"at {t.file or data_path}:{t.line}: validation scores them as trained on; remove them "
          f"from one of the files", file=sys.stderr)


def diverged(step: int, values: dict[str, float], out: Path,
             checkpoint: Path | None) -> UserError:
    """The error that ends a run at a step whose loss or gradient norm is NaN or infinite:
    AdamW's update from it is no number either, and the weights it leaves are not saved; the
    last checkpoint (`checkpoint`, None: none yet) stays as it was. `values`: the step's
    numbers to name (`loss`, `grad_norm`; PPO's non-finite ones)."""
    kept = f"the last checkpoint, {checkpoint}, is kept as it was" if checkpoint is not None \
        else "no checkpoint was saved before it"
    named = ", ".join(f"{k} {v}" for k, v in values.items())
    return UserError(f"the training diverged at step {step} ({named}): the run stops without "
                     f"saving the weights of that update; {kept}. A resume replays the same "
                     f"steps: start again with a lower lr (--lr) or a longer warmup "
                     f"(--warmup-steps)", path=out)


def check_fields(cfg: Any, rules: Callable[[], list[tuple[str, bool, str]]]) -> None:
    """Raise a UserError naming the first field of the dataclass `cfg` whose value is not of
    its annotated type, or else holds a non-finite number (nan, inf), or else the first of
    `rules()` that does not hold. `rules` is called only once the types are right: a rule such
    as `max_steps >= 1` on the string "2" would be a bare TypeError naming no field."""
    check_types(cfg)
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"must be a finite number, got {value}", field=f.name)
        # An optional setting given as "" (an unset shell variable, `--val-data "$VAL"`) read
        # as not given would run silently with the default.
        if isinstance(value, str) and not value.strip() and type(None) in typing.get_args(
                hints.get(f.name)):
            raise UserError("is empty; give a value, or leave it out for its default",
                            field=f.name)
    for name, ok, expected in rules():
        if not ok:
            raise UserError(f"{expected}, got {getattr(cfg, name)}", field=name)


def check_types(cfg: Any) -> None:
    """Raise a UserError naming the first field of the dataclass `cfg` whose value does not fit
    its annotation. The command line and YAML convert their text to these types; a config built
    in Python gets no conversion, and a str where a list is meant would be read letter by
    letter. An int is a float; a path (os.PathLike) is a str."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        problem = _type_problem(getattr(cfg, f.name), hints.get(f.name))
        if problem:
            raise UserError(problem, field=f.name)


_SCALARS: dict[type, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, (bool, np.bool_))),  # numpy's too
    int: ("an int", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
    str: ("a str", lambda v: isinstance(v, (str, os.PathLike))),
}


def _type_problem(value: Any, annotation: Any) -> str | None:
    """What is wrong with `value` as a value of `annotation`, or None (also for annotations
    this check does not know)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) != 1:
            return None
        problem = _type_problem(value, others[0])
        return problem and problem.replace(", got", " or None, got", 1)
    if typing.get_origin(annotation) in (list, tuple):
        if isinstance(value, (str, os.PathLike)):
            return f"must be a list, got the single {type(value).__name__} {str(value)!r}; " \
                   f"pass a list: [{str(value)!r}]"
        if not isinstance(value, (list, tuple)):
            return f"must be a list, got {_shown(value)}"
        element = args[0] if args else None
        for i, item in enumerate(value):
            problem = _type_problem(item, element)
            if problem:
                return problem.replace("must be", f"item {i} must be", 1)
        return None
    if annotation not in _SCALARS:
        return None
    name, fits = _SCALARS[annotation]
    return None if fits(value) else f"must be {name}, got {_shown(value)}"


def _shown(value: Any) -> str:
    return "None" if value is None else f"the {type(value).__name__} {value!r}"


def check_run_dir(out: str | Path, resume: bool,
                  inputs: dict[str, str | Path | None] | None = None,
                  cfg: Any = None, resume_from: str | None = None) -> Path | None:
    """Check a stage's OUT before anything is written; return the checkpoint to resume from.

    OUT must not be, hold or sit inside an input model (`inputs`: field -> path), which the
    run would overwrite. Without `resume` it must hold no run (checkpoints) and no model;
    with `resume` it must hold a checkpoint that is whole and, when the common loop's `cfg` is
    given, was written with the settings a resume must keep (see `_check_split_settings`).
    The checkpoint is the latest, or the one `resume_from` names (`step-N`, `N`, or its path;
    naming one resumes, with or without `resume`)."""
    resume = resume or resume_from is not None
    out = check_dir_out(out, field="out")
    where = out.resolve()
    for name, given in (inputs or {}).items():
        if not given or not Path(given).exists():
            continue
        model, flag = Path(given).resolve(), "--" + name.replace("_", "-")
        if model == where:
            why = f"is the input model ({name}, {flag}); training would overwrite it"
        elif model in where.parents:
            why = f"is inside the input model {given} ({name}, {flag})"
        elif where in model.parents:
            why = f"holds the input model {given} ({name}, {flag})"
        else:
            continue
        raise UserError(why + "; choose another out (--out)", path=out, field="out")
    checkpoints = Checkpointer(out)
    # Before any step is trained: every save replaces the pointer, and failed on a directory.
    checkpoints.check_pointer()
    latest = checkpoints.latest()
    if resume and latest is None:
        raise UserError("nothing to resume: no checkpoint in this run directory",
                        path=out / "checkpoints",
                        field="resume" if resume_from is None else "resume_from")
    if resume_from is not None:
        latest = checkpoints.named(resume_from)  # verified there, its stage's files required
    elif resume:
        # Here, not only when training loads it: the stage writes run.json and OUT/best first.
        Checkpointer.verify(latest)
        Checkpointer.require(latest, Checkpointer.stage_files(latest))
    if resume:
        # Read here too, for the same reason: a trainer.pt or optimizer.pt that a hash in an
        # edited manifest passes, but that cannot be read or lacks what a resume reads. The
        # optimizer's tensors are mapped, not read: training reads them once, when it loads.
        # A checkpoint named with --resume-from is not to be removed to reach the one before.
        advice = None if resume_from is None else checkpoints.named_advice()
        try:
            state = Checkpointer.state_of(latest, RESUMED_STATE if cfg is not None else (),
                                          advice)
            Checkpointer.optimizer_state(latest, mmap=True, advice=advice)
        except UserError as e:
            if resume_from is None:
                raise
            raise UserError(e.message, path=e.path, field="resume_from") from None
        if cfg is not None:
            _check_split_settings(cfg, state.get("settings", {}), latest)
            _check_budget(cfg, state, latest)
    if not resume and latest is not None:
        raise UserError("already holds a training run; pass resume (--resume) to continue it, or "
                        "choose another out (--out)", path=out, field="out")
    # config.json is written last: weights without it are a save that never finished.
    if not resume and (out / "config.json").exists():
        raise UserError("already holds a finished model and no checkpoint to continue from; "
                        "choose another out (--out); a run saved with save_every (--save-every) "
                        "continues with resume (--resume)", path=out, field="out")
    return latest


def resuming(cfg: Any) -> Any:
    """`cfg` (a stage's config) with `resume` set where `resume_from` names a checkpoint:
    naming one resumes from it, `--resume` or not."""
    if cfg.resume_from is not None and not cfg.resume:
        return dataclasses.replace(cfg, resume=True)
    return cfg


# --- small pieces ------------------------------------------------------------------------------

def select_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, else the CPU; a named device (Apple's `mps` too) must exist. MPS is
    not picked by `auto`: no part of gptlab has run on it, and its kernels lack float64."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    # torch names more device types (xpu, hpu, meta, ...) than gptlab runs on: each failed
    # later, in a traceback, after a training verb had written its run.json.
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{name}' (auto, cpu, cuda, cuda:N, mps)",
                        field="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but is not available here", field="device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UserError(f"there is no GPU {dev.index} here: this machine has {n} "
                        f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})", field="device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("MPS was asked for but is not available here", field="device")
    return dev


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on weight matrices (2-D and up) of every layer but
    the embeddings; none on biases, norm gains and embedding tables (a tied output head shares
    the embedding's tensor, so it is not decayed either). Decaying embeddings only shrinks the
    rows of rare tokens, which get few gradient updates to push back."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                        for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters yields a shared tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if all(p.is_cuda for p in decay + no_decay) and decay else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **fused)


def lr_at(step: int, warmup: int, total: int, peak: float, min_ratio: float) -> float:
    """Learning rate of update `step` (0-based): linear warmup to `peak` over `warmup` updates,
    then a cosine to `peak * min_ratio` reached at the last update (step = total - 1)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def inverse_sqrt_lr(step: int, warmup: int, peak: float) -> float:
    """Learning rate of update `step` (0-based) under the 2017 Transformer's schedule,
    d_model^-0.5 * min(n^-0.5, n * warmup^-1.5) for update n = step + 1: a linear rise to
    `peak` at n = warmup, then down as 1/sqrt(n). The paper's peak is d_model^-0.5 *
    warmup^-0.5 (7.0e-4 for d_model 512 and 4,000 warmup steps)."""
    n, w = step + 1, max(1, warmup)
    return peak * min(n / w, math.sqrt(w / n))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _computes_in_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.4 counts no emulation
        return torch.cuda.is_bf16_supported()


def autocast(device: torch.device, bf16: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU that computes in bf16 (Ampere and later; weights and optimizer
    stay float32); an older GPU, which would only emulate it, slowly, and the CPU, which stays
    bit-reproducible, run plain float32."""
    if bf16 and device.type == "cuda" and _computes_in_bf16():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def allow_tf32(device: torch.device) -> None:
    """On CUDA, float32 matrix products outside autocast (PPO's, a reward model's scoring) run
    on the tensor cores in TF32, as every training verb's do; the CPU is left as it is."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


LossFn = Callable[[nn.Module, Any], Tensor]


def accumulate_gradients(model: nn.Module, micro_batches: Iterable[Any], loss_fn: LossFn,
                         device: torch.device | None = None, bf16: bool = True,
                         weight_of: Callable[[Any], float] | None = None) -> float:
    """Backward each micro-batch's loss times its share of the update, and return the update's
    loss, the same weighted mean. The shares are equal (1 / n) by default: the big batch's
    gradients when micro-batches hold equal numbers of what the loss averages over (full
    blocks). `weight_of(batch)`: that number when it varies, such as a mean over target
    tokens (SFT): then the gradients are the big batch's per-token mean over the whole update,
    not a mean of the micro-batches' means that weighs a token of a short micro-batch more."""
    micro = list(micro_batches)
    return backward_micro_batches(model, micro, micro_batch_shares(micro, weight_of), loss_fn,
                                  device, bf16).item()


def micro_batch_shares(micro: list[Any], weight_of: Callable[[Any], float] | None
                       ) -> list[float]:
    """Each micro-batch's weight relative to their mean: exactly 1 without `weight_of` or with
    one micro-batch, where the update is the plain mean's bit for bit. Nothing to weigh by:
    equal shares."""
    n = len(micro)
    weights = [float(weight_of(b)) for b in micro] if weight_of else [1.0] * n
    whole = sum(weights)
    return [w * n / whole for w in weights] if whole > 0 else [1.0] * n


def backward_micro_batches(model: nn.Module, micro: list[Any], rel: list[float],
                           loss_fn: LossFn, device: torch.device | None = None,
                           bf16: bool = True) -> Tensor:
    """`accumulate_gradients`' backward, each micro-batch's loss weighed by `rel` (relative to
    their mean); the weighted mean loss stays on the device (reading it waits for a GPU)."""
    n = len(micro)
    device = device or next(model.parameters()).device
    total = torch.zeros((), device=device)
    for batch, r in zip(micro, rel):
        if r == 0:  # no share (no target tokens): its loss is a mean over nothing, nan
            continue
        with autocast(device, bf16):
            loss = loss_fn(model, to_device(batch, device))
        (loss * r / n).backward()
        total += loss.detach().float() * r
    return total / n


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0: no clipping); return the norm before."""
    return float(clip_grad_norm(model, max_norm))


def clip_grad_norm(model: nn.Module, max_norm: float) -> Tensor:
    """`clip_gradients` with the norm left on the device: reading it waits for a GPU, and PPO
    never reads it."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm()
                                                 for p in params]))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn,
             device: torch.device | None = None, bf16: bool = True,
             weight_of: Callable[[Any], float] | None = None) -> float:
    """Mean of `loss_fn` over `batches` in eval mode (dropout off); nan when there are none.
    `weight_of(batch)`: what `loss_fn` averages over in a batch (SFT's target tokens), so that
    the mean is over all of them, as in `accumulate_gradients`, not a mean of batch means; a
    batch with nothing to weigh is passed over."""
    device = device or next(model.parameters()).device
    losses, weights = [], []
    with eval_mode(model):
        for batch in batches:
            w = float(weight_of(batch)) if weight_of else 1.0
            if w == 0:  # no target tokens: its loss is a mean over nothing, nan
                continue
            with autocast(device, bf16):
                losses.append(float(loss_fn(model, to_device(batch, device))))
            weights.append(w)
    whole = sum(weights)
    return sum(l * w for l, w in zip(losses, weights)) / whole if whole else float("nan")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states, for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU of the machine that saved it (every one it had, though a run uses
        # one); a machine with fewer GPUs restores the states of those it has.
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (an evaluation, a sample) without moving the training RNG streams, so that
    how often one evaluates does not change the training run."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def out_of_memory(e: BaseException) -> bool:
    """An allocation the device could not make: CUDA's OutOfMemoryError, the CPU allocator's
    or MPS's RuntimeError, or Python's MemoryError."""
    oom = getattr(torch, "OutOfMemoryError", MemoryError)
    return isinstance(e, (MemoryError, oom)) or (isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("can't allocate memory", "out of memory")))


@contextlib.contextmanager
def memory_named(device: torch.device, what: str, sizes: dict[str, int], advice: str
                 ) -> Iterator[None]:
    """An out-of-memory in `what` (a training step, an evaluation, a rollout) becomes one line
    naming the `sizes` that set its memory (the first as its field) and `advice`, not an
    allocator's traceback: --batch-size 1000000 asked for 32 GB at once."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        asked = re.search(r"allocate (\d+ bytes|[\d.]+ [KMGT]i?B)", str(e))
        raise UserError(f"out of memory on {device} in {what} with "
                        + " and ".join(f"{k} {v}" for k, v in sizes.items())
                        + (f" (an allocation of {asked.group(1)})" if asked else "")
                        + f"; {advice}", field=next(iter(sizes))) from None


def batch_memory_named(cfg: "TrainConfig", device: torch.device,
                       what: str) -> contextlib.AbstractContextManager[None]:
    """`memory_named` for the common loop, whose memory batch_size sets."""
    return memory_named(device, what, {"batch_size": cfg.batch_size},
                        "lower it (--batch-size), and raise grad_accum (--grad-accum) to keep "
                        "the update's size")


@contextlib.contextmanager
def held_interrupt(note: str = "finishing this step to save it") -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block until the block has finished, then raise
    KeyboardInterrupt; a second Ctrl-C raises at once. For work that a checkpoint needs whole
    or not at all (PPO's update is many optimizer steps). Only where Python's own SIGINT
    handler is in place, in the main thread; elsewhere the block runs as it is."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pressed = []

    def hold(signum: int, frame: Any) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)
        print(f"\ninterrupt: {note} (Ctrl-C again to stop now, without saving)",
              file=sys.stderr)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, flushed per line (a crash loses nothing
    written); optionally mirrored to TensorBoard."""

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                print("note: TensorBoard logging is off: the `tensorboard` package is not "
                      "installed (pip install tensorboard); metrics still go to "
                      f"{self.path}", file=sys.stderr)

    def log(self, row: dict) -> None:
        with self._named():
            self._file.write(strict_json(row, non_finite="null", ensure_ascii=False) + "\n")
            self._file.flush()
        if self._tb is not None and "step" in row:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, row["step"])
                elif isinstance(v, str):
                    self._tb.add_text(k, v, row["step"])

    def close(self) -> None:
        with self._named():  # what a full disk left unwritten is written again here
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        """A failed write() names no file: name metrics.jsonl, so the CLI says which."""
        try:
            yield
        except OSError as e:
            if e.filename is not None:
                raise
            raise named_os_error(e, self.path) from e

    # A checkpoint keeps its line's rows: metrics.jsonl up to a step is not always the line's
    # whose checkpoint is resumed. Resumed from step-4 of a run that reached step-8, a line that
    # died at step 5 left 0..4 of the first and its own 5; resumed then from step-6 (the first
    # line's), keeping rows up to 6 kept the abandoned line's 5 and had lost the first's 5..6.
    @staticmethod
    def with_rows(path: str | Path, state: dict) -> dict:
        """A checkpoint's trainer `state` (at `state["step"]`) with metrics.jsonl's rows up to
        its step, the ones its line logged, for a resume to restore (`rewind`)."""
        path = Path(path)
        rows = read_metrics(path) if path.exists() else []
        return {**state, "metrics": [r for r in rows if r.get("step", 0) <= state["step"]]}

    @staticmethod
    def line_rows(path: str | Path, state: dict) -> list[dict]:
        """The rows of the line a checkpoint's trainer `state` was saved on, up to its step: the
        ones it keeps (`with_rows`); for a checkpoint saved before it kept them, metrics.jsonl's
        rows up to its step, taken for its line's."""
        if isinstance(state.get("metrics"), list):
            return state["metrics"]
        path = Path(path)
        rows = read_metrics(path) if path.exists() else []
        return [r for r in rows if r.get("step", 0) <= state["step"]]

    @staticmethod
    def rewind(path: str | Path, state: dict) -> None:
        """metrics.jsonl as the line of a checkpoint's trainer `state` left it at its step
        (`line_rows`): rows logged after it (by a run that died after its last checkpoint, or
        by a later line abandoned by a resume from an earlier step) are dropped, and its own
        line's rows that such a line had dropped come back, so a resumed run's curve
        continues exactly where the checkpoint left it."""
        path = Path(path)
        if not path.exists() and "metrics" not in state:
            return
        write_jsonl_atomic(path, MetricsLog.line_rows(path, state), non_finite="null")


def _check_split_settings(cfg: Any, theirs: dict, path: Path) -> None:
    """Refuse to resume with a setting that moves rows between training and validation,
    changes the batches, or changes the update or its schedule (a checkpoint from before these
    were recorded passes)."""
    diff = [k for k, v in theirs.items() if hasattr(cfg, k) and getattr(cfg, k) != v]
    if diff:
        raise UserError("was written with other settings (" + ", ".join(
            f"{k}: {theirs[k]!r} there, {getattr(cfg, k)!r} now" for k in diff) + "); resume "
            "with the same settings, or choose another out (--out)", path=path, field=diff[0])


def _check_budget(cfg: Any, state: dict, path: Path) -> None:
    """Refuse a resume with a --max-minutes that is not the run's own. A time budget is turned
    into the run's step count (and its cosine laid out) when the run starts; a new or another
    budget on resume used to be ignored without a word. Leaving --max-minutes out, or giving the
    same one, resumes; --max-steps changes the length. A checkpoint from before the budget was
    recorded passes, unless its budget was still being measured and none is given."""
    mine = getattr(cfg, "max_minutes", None)
    if "max_minutes" not in state:
        if state.get("budget_pending") and mine is None:
            raise UserError("was saved while its time budget was still being measured, before "
                            "the budget was recorded in checkpoints; resume with the run's "
                            "max_minutes (--max-minutes)", path=path, field="max_minutes")
        return
    theirs = state["max_minutes"]
    if mine is None or mine == theirs:
        return
    done = f"{state['step']} steps done in {state['elapsed_s']:.0f} s of training"
    if theirs is None:
        why = (f"is a fixed-length run ({state['total_steps']} steps, {done}) and a time budget "
               f"is set only when a run starts, which lays out its schedule; max_minutes "
               f"{mine!r} now")
    else:
        length = ("its step count is still being measured" if state.get("budget_pending")
                  else f"its step count, {state['total_steps']}")
        why = (f"was started with max_minutes {theirs!r} ({length}; {done}); max_minutes "
               f"{mine!r} now")
    raise UserError(why + ": resume without max_minutes (--max-minutes), or with the run's own, "
                    "and with max_steps (--max-steps) to change its length", path=path,
                    field="max_minutes")


def refuse_other_settings(cfg: Any, theirs: dict, keys: Iterable[str], path: Path,
                          why: str) -> None:
    """Refuse a resume whose `keys` differ from the values checkpoint `path` recorded
    (`theirs`; a key it did not record passes), naming the first; `why` says what they decide."""
    diff = [k for k in keys if k in theirs and not same_setting(theirs[k], getattr(cfg, k))]
    if diff:
        raise UserError("was written with other settings (" + ", ".join(
            f"{k}: {theirs[k]!r} there, {getattr(cfg, k)!r} now" for k in diff) + f"); {why}: "
            "resume with the same settings, or choose another out (--out)", path=path,
            field=diff[0])


def same_setting(theirs: Any, mine: Any) -> bool:
    """Equal, or the same file spelled another way (`runs/x/sft` and `/home/me/runs/x/sft` run
    from /home/me): a path recorded as typed is read from where the resume runs."""
    if isinstance(theirs, list) and isinstance(mine, list):
        return len(theirs) == len(mine) and all(map(same_setting, theirs, mine))
    if isinstance(theirs, str) and isinstance(mine, str) and theirs != mine:
        return os.path.abspath(theirs) == os.path.abspath(mine)
    return theirs == mine


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl. Rows are appended as they come, so a run that died while
    writing one leaves it torn: a last line that does not parse is left out (a bad line before
    it is an error naming it). A row ends at "\\n" alone, as JSON Lines has it: a sample text
    in a row may hold U+2028 or U+0085, which `str.splitlines` would end a line at."""
    path = Path(path)
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace")
                                               .split("\n"), 1) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            row = restore_non_finite(json.loads(line))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if k == len(lines) - 1:
                break
            raise UserError(f"is not a metrics row ({e})", path=path, line=i) from None
        rows.append(row)
    return rows


def steps_for_budget(minutes: float, elapsed_s: float, done_steps: int, sec_per_step: float,
                     eval_every: int = 0, eval_s: float = 0.0, cap: int | None = None) -> int:
    """The total step count that fits `minutes` of training: the steps done, plus the remaining
    time over the time per step (evaluation time spread over its interval)."""
    per_step = sec_per_step + (eval_s / eval_every if eval_every else 0.0)
    remaining = max(0.0, minutes * 60 - elapsed_s)
    total = max(done_steps, 1, done_steps + int(remaining / max(per_step, 1e-9)))
    return min(total, cap) if cap is not None else total


def annotate_run(out_dir: str | Path, **fields: Any) -> None:
    """Add fields to OUT/run.json (written by gptlab.provenance.record_run), if there is one."""
    _update_run(out_dir, lambda info: info.update(fields))


# True while a caller that warns of a resume on another thread count itself runs a stage (the
# pipeline, whose warning names --threads): the stage's note would say it a second time.
_THREADS_TOLD = contextvars.ContextVar("threads_told", default=False)
# How a stage stopped by Ctrl-C after its checkpoint is continued: a verb's own --resume, or
# what the caller that runs it says (the pipeline has no --resume: its command run again).
_HOW_TO_CONTINUE = contextvars.ContextVar("how_to_continue",
                                          default="continue with --resume")


@contextlib.contextmanager
def run_by_caller(how_to_continue: str) -> Iterator[None]:
    """Within it, a stage is the caller's: `annotate_resume` leaves a thread count other than
    the checkpoint's unsaid (the caller warns of it), and a Ctrl-C says `how_to_continue`."""
    threads = _THREADS_TOLD.set(True)
    how = _HOW_TO_CONTINUE.set(how_to_continue)
    try:
        yield
    finally:
        _HOW_TO_CONTINUE.reset(how)
        _THREADS_TOLD.reset(threads)


def interrupted_saved(path: Path | None) -> None:
    """Say on stderr that Ctrl-C stopped the run after saving checkpoint `path`, and how to go
    on from it."""
    print(f"\ninterrupted: saved {path}; {_HOW_TO_CONTINUE.get()}", file=sys.stderr)


def note_other_threads(checkpoint: Path) -> None:
    """A note on stderr when a resume computes on another CPU thread count than `checkpoint`
    was saved on (its manifest's `threads`): sums split among threads otherwise round
    otherwise, so the losses may differ in the last bits from a run that never stopped."""
    before, now = Checkpointer.threads_of(checkpoint), torch.get_num_threads()
    if before is None or before == now or _THREADS_TOLD.get():
        return
    print(f"note: resuming from {checkpoint} on {counted(now, 'CPU thread')}, but it was saved "
          f"on {before}: the losses may differ in the last bits from a run that never stopped "
          f"(OMP_NUM_THREADS={before} resumes it as it ran)", file=sys.stderr)


def annotate_resume(out_dir: str | Path, config: Any, resumed_from: str) -> None:
    """Add this resume to OUT/run.json's `resumes` (and set `resumed_from`): its command, start,
    commit, CPU threads and the config fields it changed. `config` and `command` stay the first
    session's; without this a resume with another --lr or --max-steps left them saying what no
    longer ran. A thread count other than the checkpoint's is noted (`note_other_threads`)."""
    from gptlab.provenance import command_line, git_state

    note_other_threads(Path(out_dir) / "checkpoints" / resumed_from)

    def add(info: dict) -> None:
        first = info.get("config") if isinstance(info.get("config"), dict) else {}
        now = json.loads(json.dumps(dataclasses.asdict(config), default=str))
        git = git_state(None)
        info["resumed_from"] = resumed_from
        info.setdefault("resumes", []).append({
            "from": resumed_from, "command": command_line(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": git[0] if git else None, "git_dirty": git[1] if git else None,
            "threads": torch.get_num_threads(),
            "changed": {k: v for k, v in now.items()
                        if k not in ("resume", "resume_from") and first.get(k) != v}})
    _update_run(out_dir, add)


def _update_run(out_dir: str | Path, update: Callable[[dict], None]) -> None:
    path = Path(out_dir) / "run.json"
    if path.exists():
        try:
            info = restore_non_finite(json.loads(path.read_text(encoding="utf-8")))
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            # A record of how the run was made, nothing more: start it again rather than stop.
            print(f"note: {path} is damaged ({e}); writing it anew", file=sys.stderr)
            info = {}
        update(info)
        write_json_atomic(path, info, non_finite="null")


def count_tokens(batch: Any) -> int:
    """Tokens in a batch: a tensor's elements, or the attention mask's ones, or input_ids'."""
    if isinstance(batch, Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return count_tokens(batch.get("input_ids", next(iter(batch.values()))))
    if isinstance(batch, (list, tuple)) and batch:
        return count_tokens(batch[0])
    return 0


# --- the common loop ---------------------------------------------------------------------------

class Batches(Protocol):
    """What `train` needs from a data stream: endless batches and a resumable position."""

    def __next__(self) -> Any: ...
    def state(self) -> dict: ...
    def load_state(self, state: dict) -> None: ...


@dataclass
class TrainResult:
    """What `train` returns: the last step, the losses, tokens, time and the last checkpoint."""

    step: int
    total_steps: int
    loss: float | None         # training loss of the last step (of this session)
    val_loss: float | None     # the last validation loss
    tokens: int                # tokens trained on, over the whole run
    tokens_per_s: float        # throughput of this session, evaluation excluded
    elapsed_s: float           # training time over the whole run
    checkpoint: Path | None


def train(model: nn.Module, batches: Batches, loss_fn: LossFn, cfg: TrainConfig,
          out_dir: str | Path, *, val_batches: list | Callable[[], Iterable] | None = None,
          tokenizer: Any = None,
          on_eval: Callable[[nn.Module, int, float], dict | None] | None = None,
          tokens_in: Callable[[Any], int] = count_tokens, resume: bool = False,
          extra: dict | None = None, perplexity: bool = True,
          verified: Path | None = None, resume_from: Path | None = None,
          loss_weight: Callable[[Any], float] | None = None,
          lr_schedule: Callable[[int, int], float] | None = None) -> TrainResult:
    """Train `model` in place on `batches` with `loss_fn`; checkpoints go to OUT/checkpoints/,
    metrics to OUT/metrics.jsonl. With `resume`, continue from the latest checkpoint in OUT
    (weights, optimizer, step, schedule, data position, RNG) so the run continues exactly; or
    from `resume_from`, another of OUT's checkpoints, which `latest` then names (as if the
    pointer had been moved back by hand). A step whose loss or gradient norm is not finite
    ends the run with a UserError before anything is saved (see `diverged`).
    Ctrl-C saves a checkpoint of the last finished step, then re-raises KeyboardInterrupt.
    `perplexity`: the loss is a language model's (a reward model's is not), so its exp means
    something and is logged as val_ppl. `verified`: the checkpoint `check_run_dir` returned,
    verified there; resumed from, it is not hashed again. `loss_weight(batch)`: what
    `loss_fn` averages over in a batch (SFT's target tokens), so that `grad_accum`
    micro-batches weigh as one batch of them all (see `accumulate_gradients`), and so that the
    validation loss is the mean over all the validation set's targets (see `evaluate`).
    `lr_schedule(step, total)`: the learning rate of each update, in place of `lr_at`'s cosine."""
    cfg.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.device)
    allow_tf32(device)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    ckpt = Checkpointer(out, keep=cfg.keep_checkpoints)
    ckpt.check_pointer()  # refused now, not by the first save, once steps were trained
    metrics_path = out / "metrics.jsonl"

    # Run state that survives a resume; everything else is rebuilt from cfg.
    step, tokens, elapsed = 0, 0, 0.0
    minutes = cfg.max_minutes          # the run's time budget (a resume keeps the first's)
    budget_pending = cfg.max_minutes is not None
    total = cfg.max_steps or (None if budget_pending else DEFAULT_MAX_STEPS)
    eval_s = 0.0                       # the step-0 evaluation's time, which a time budget counts in
    stopped_early, cap = False, total  # cap: the length before an early stop
    if resume:
        path = Path(resume_from) if resume_from is not None else ckpt.latest()
        if path is None:
            raise UserError("nothing to resume: no checkpoint in this run directory",
                            path=ckpt.dir, field="resume")
        state = ckpt.load(path, model, optimizer, verify=verified is None
                          or Path(verified).resolve() != path.resolve(), needs=RESUMED_STATE)
        _check_split_settings(cfg, state.get("settings", {}), path)
        _check_budget(cfg, state, path)
        # A checkpoint from before the budget was recorded: a pending one's is the one given
        # (_check_budget saw to it); a resolved one's stays unknown, and unrecorded.
        minutes = state["max_minutes"] if "max_minutes" in state else (
            cfg.max_minutes if state["budget_pending"] else _UNRECORDED)
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed_s"]
        total, budget_pending = state["total_steps"], state["budget_pending"]
        eval_s = state.get("eval_s", 0.0)
        stopped_early, cap = bool(state.get("stopped_early")), state.get("cap", total)
        batches.load_state(state["data"])
        set_rng_state(state["rng"])
        # An early-stopped run asked for the same length again is finished, not to be stretched.
        finished_early = stopped_early and cfg.max_steps == cap
        if not budget_pending and cfg.max_minutes is None and cfg.max_steps \
                and cfg.max_steps != total and not finished_early:
            if cfg.max_steps > step:
                print(f"note: max_steps changed from {total} to {cfg.max_steps}; the cosine "
                      f"schedule is stretched from here on", file=sys.stderr)
            else:
                print(f"note: max_steps {cfg.max_steps} is not past step {step}, which the run "
                      f"has reached: it ends there", file=sys.stderr)
            total = max(cfg.max_steps, step)
            stopped_early, cap = False, total  # a new length, not a stop
        MetricsLog.rewind(metrics_path, state)
        ckpt.point_latest(path)
        if total is not None and step >= total:
            # No step is left, so no save follows: the removals of the last one, killed once
            # `latest` named it, are done here, or the run kept a checkpoint past `keep`.
            ckpt.prune(step)
        print(f"resuming from {path} (step {step} of {total or '?'})", file=sys.stderr)
    else:
        seed_everything(cfg.seed)
        metrics_path.unlink(missing_ok=True)
    # Until max_minutes is resolved, the cap (or a large number) stands in for the schedule's
    # length; only updates past the warmup would notice, and the first few are in the warmup.
    schedule_total = total or cfg.max_steps or 10**9

    metrics = MetricsLog(metrics_path, out / "tensorboard" if cfg.tensorboard else None)
    fwd_model = torch.compile(model) if cfg.compile else model
    val = (lambda: val_batches() if callable(val_batches) else val_batches)
    has_val = val_batches is not None and cfg.eval_batches > 0

    def run_eval(at: int, may_stop: bool = False) -> tuple[float, float, bool]:
        """Evaluate at step `at` and log its row; with `may_stop`, an early stop on_eval asks
        for ends the run at `at`, recorded in `good` as one with the row: a Ctrl-C between the
        two saved a checkpoint that, resumed, found the row and trained on past the stop."""
        nonlocal total, stopped_early, good
        t0 = time.perf_counter()
        with preserved_rng(), batch_memory_named(cfg, device, "the validation loss"):
            loss = evaluate(fwd_model, val(), loss_fn, device, cfg.bf16, loss_weight)
            row = {"step": at, "val_loss": loss}
            if perplexity:
                row["val_ppl"] = math.exp(min(loss, 50))
            if on_eval is not None:
                row.update(on_eval(model, at, loss) or {})
        with held_interrupt("recording this evaluation to save it"):
            stop = bool(row.pop("stop", False)) and may_stop  # on_eval may end training
            metrics.log(row)
            if stop:
                metrics.log({"step": at, "event": "early_stop"})
                total, stopped_early = at, True
                good = snapshot()
        # What on_eval measured too (execution accuracy, pairwise accuracy) is on the line.
        measured = "".join(f", {k} {v:.4f}" for k, v in row.items()
                           if k not in ("step", "val_loss", "val_ppl") and isinstance(v, float))
        bar.write(f"step {at}: val_loss {loss:.4f}"
                  + (f" (ppl {row['val_ppl']:.2f})" if perplexity else "") + measured
                  + (f"\n  sample: {row['sample']!r}" if "sample" in row else ""),
                  file=sys.stderr)  # stdout holds the verb's result alone: OUT at the end
        return loss, time.perf_counter() - t0, stop

    def eval_due(at: int, is_last: bool) -> bool:
        return has_val and (is_last or bool(cfg.eval_every) and at % cfg.eval_every == 0)

    def snapshot() -> dict:
        # `row`: the step's training row, so a resume can log it if a Ctrl-C came first.
        return {"step": step, "tokens": tokens, "elapsed_s": elapsed, "total_steps": total,
                "budget_pending": budget_pending, "data": batches.state(), "rng": rng_state(),
                "eval_s": eval_s, "row": last_row, "stopped_early": stopped_early, "cap": cap,
                "settings": {k: getattr(cfg, k) for k in SPLIT_SETTINGS + OPTIMIZER_SETTINGS
                             if hasattr(cfg, k)},
                **({} if minutes is _UNRECORDED else {"max_minutes": minutes})}

    def save(state: dict) -> Path:
        return ckpt.save(state["step"], model, tokenizer, optimizer,
                         MetricsLog.with_rows(metrics_path, state), extra)

    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
               disable=not cfg.progress, file=sys.stderr)
    last_loss: float | None = None
    # On resume, the last validation loss the run recorded until a new evaluation replaces it.
    earlier = read_metrics(metrics_path) if resume and metrics_path.exists() else []
    val_loss: float | None = next((r["val_loss"] for r in reversed(earlier)
                                   if r.get("val_loss") is not None), None)
    last_row: dict | None = None
    session_tokens, session_time = 0, 0.0
    measured: list[float] = []
    saved_step = step if resume else -1
    good = snapshot()  # the state after the last finished step, for Ctrl-C
    updating = False
    try:
        if not resume and has_val:
            val_loss, eval_s, _ = run_eval(0)
        if resume and step > 0:
            # A Ctrl-C between a step's update and its row or evaluation saved the step without
            # them: do them now, or they would never be done.
            done = [r for r in read_metrics(metrics_path) if r.get("step") == step]
            is_last = total is not None and step >= total
            if state.get("row") and (step % cfg.log_every == 0 or is_last) \
                    and not any("loss" in r for r in done):
                metrics.log(state["row"])
            if eval_due(step, is_last) and not any("val_loss" in r for r in done):
                val_loss, _, stop = run_eval(step, may_stop=not is_last)
                if stop:
                    save(good)
        while total is None or step < total:
            t0 = time.perf_counter()
            lr = (lr_at(step, cfg.warmup_steps, total or schedule_total, cfg.lr, cfg.min_lr_ratio)
                  if lr_schedule is None else lr_schedule(step, total or schedule_total))
            set_lr(optimizer, lr)
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            with batch_memory_named(cfg, device, "a training step"):
                # The loss and the norm stay on the device until the update is queued.
                loss_t = backward_micro_batches(fwd_model, micro,
                                                micro_batch_shares(micro, loss_weight),
                                                loss_fn, device, cfg.bf16)
            norm_t = clip_grad_norm(model, cfg.clip)
            # From the update until `good` records its step, the weights and optimizer are a
            # step ahead of `good`: a Ctrl-C waits for the step to be recorded; one that
            # cannot wait (a second Ctrl-C) saves nothing.
            with held_interrupt():
                updating = True
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the run's GPU (cuda:1), not the current one
                # Read once, after the update: read apart, before it, each waited for the GPU.
                # (A norm of no gradients is a CPU zero; any other is on the device already.)
                last_loss, grad_norm = torch.stack(
                    [loss_t.float(), queued_copy(norm_t.float(), loss_t.device)]).tolist()
                dt = time.perf_counter() - t0
                step += 1
                n_tok = sum(tokens_in(b) for b in micro)
                tokens += n_tok
                elapsed += dt
                session_tokens += n_tok
                session_time += dt
                last_row = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                            "tokens": tokens, "tokens_per_s": session_tokens / session_time,
                            "elapsed_s": round(elapsed, 3)}
                if not (math.isfinite(last_loss) and math.isfinite(grad_norm)):
                    # The update has made the weights NaN: its row is the user's to see, but no
                    # save may follow, which could rotate the good checkpoints out.
                    metrics.log(last_row)
                    raise diverged(step, {"loss": last_loss, "grad_norm": grad_norm}, out,
                                   ckpt.latest())
                good = snapshot()
                updating = False

            if budget_pending:
                measured.append(dt)
                if len(measured) == MEASURE_STEPS + 1:
                    # The budget's row and `good` as one: a Ctrl-C between them saved a
                    # checkpoint still measuring, whose resume logged a second budget row.
                    with held_interrupt("recording the time budget to save it"):
                        sec_per_step = sum(measured[1:]) / MEASURE_STEPS
                        total = steps_for_budget(minutes, elapsed + eval_s, step, sec_per_step,
                                                 cfg.eval_every, eval_s if has_val else 0.0,
                                                 cfg.max_steps)
                        budget_pending = False
                        budget = {"max_minutes": minutes, "sec_per_step": sec_per_step,
                                  "eval_s": eval_s, "total_steps": total}
                        metrics.log({"step": step, "event": "budget", **budget})
                        annotate_run(out, budget=budget)
                        bar.total = total
                        bar.refresh()
                        good = snapshot()
            is_last = total is not None and step >= total
            if step % cfg.log_every == 0 or is_last:
                metrics.log(last_row)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{session_tokens / session_time:.0f}")
            if eval_due(step, is_last):
                val_loss, _, stop = run_eval(step, may_stop=not is_last)
                is_last = is_last or stop
            if is_last or (cfg.save_every and step % cfg.save_every == 0):
                save(good)
                saved_step = step
    except KeyboardInterrupt:
        bar.close()
        if not updating and good["step"] > saved_step and good["step"] > 0:
            path = save(good)
            interrupted_saved(path)
        raise
    finally:
        bar.close()
        metrics.close()
    return TrainResult(step=step, total_steps=total or step, loss=last_loss, val_loss=val_loss,
                       tokens=tokens, tokens_per_s=session_tokens / max(session_time, 1e-9),
                       elapsed_s=elapsed, checkpoint=ckpt.latest())
