"""The model directory and training checkpoints.

A model directory is `config.json` (with `"format": "gptlab/1"`, so it is never mistaken for a
Hugging Face directory; a NaN or an infinity in it is null, named in its `non_finite` field) +
`model.safetensors` + the tokenizer files. `save_model` writes each file atomically and config.json
last, and over an existing model directory moves the old model's files aside first, config.json
first (`old_files_aside`): a save that fails puts them back, byte for byte; a killed one leaves no
config.json, never its new weights under the old one (another step, another validation loss),
and the old files for the next save into the directory, or the next reader, to put back.
`replace_model` writes a directory saved again and again (SFT's best) whole beside the old one,
then swaps the two.

Training checkpoints live in `RUN/checkpoints/step-N/`: each is written in full under a temporary
name, its manifest (sha256 of every file) last, flushed to the disk, then renamed into place;
`checkpoints/latest` is replaced atomically after that. A reader therefore never sees a partial
checkpoint, and the previous one stays usable until the new one is complete. The temporary copy
(`.step-N.<random>.tmp`, held by its writer as `gptlab.io`'s temporaries are) is no `step-N`: never
a checkpoint; a killed save's is removed by the next save or by a resume (`Checkpointer.load`).
Where two directories cannot be swapped, a step saved again has its old copy renamed aside
(`.old-files.<random>/step-N`) while the new one is renamed in: a kill between the two leaves it
there for the next save or resume to put back (`settle_old_files`). A checkpoint must hold, and its
manifest list, the files every save writes (`SAVED_FILES`) and, for a training stage's resume, its
optimizer's state and PPO's value model (`Checkpointer.stage_files`); one that lacks one, or whose
trainer.pt or optimizer.pt cannot be read or lacks what a resume reads, is damaged, said as the
manifest's damage is: which file, and to remove the checkpoint. A damaged checkpoint is never
passed over for an earlier one: a resume from it stops, and says so.

The manifest also numbers each save (`save`: the order the checkpoints were written in) and records
the CPU thread count the run computed on (`threads`, which a resume on another count is told of). A
`latest` that is lost, or names no complete checkpoint, falls back to the checkpoint written last,
not the highest step: after a resume from an earlier checkpoint, that can be the line of the run
that was abandoned. The last `keep` checkpoints are kept, counted only up to the step just saved
(later ones are another line of the run, and stay). An old checkpoint is renamed aside to a hidden
copy like a save's before it is removed (`remove_dir`), so a kill midway leaves none with part of
its files; one that cannot be renamed stays whole, with a warning, for a later save to remove.

A training stage's model says which in config.json's `stage`: `pretrain`, `sft`, `reward`, `ppo`,
or `value`, PPO's value model, a scalar head like a reward model's that predicts returns once
trained. `load_language_model` and `load_reward_model` refuse a model of another kind, naming it
(`model_kind`; `is_value_model` knows a value model written before that mark by its place, a
`value/` beside a PPO policy).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import reprlib
import shutil
import sys
import zipfile
from itertools import chain
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model as st_load_model, save_model as st_save_model

from gptlab.errors import NotFound, UserError, WrongKind, check_bool
from gptlab.io import (OLD_FILES_PREFIX, atomic_path, ensure_dir, fsync_path, held_temp,
                       missing_dirs, named_os_error, new_temp_dir, old_files_aside, read_json,
                       remove_dir, remove_stale_temps, replace_dir, restore_non_finite,
                       settle_old_files, write_json_atomic, write_text_atomic)

FORMAT = "gptlab/1"
MODEL_FILE = "model.safetensors"
# config.json's "stage" of PPO's value model (OUT/value, checkpoints/step-N/value): a scalar-head
# model like a reward model, but once trained it predicts returns, not rewards.
VALUE_STAGE = "value"
# The files every checkpoint save writes (`Checkpointer.save`), and the optimizer's state, which
# every training stage's save writes too: listed in a manifest or not, a checkpoint without one
# resumed with a fresh optimizer, or failed on a bare file name.
SAVED_FILES = ("config.json", MODEL_FILE, "trainer.pt")
OPTIMIZER_FILE = "optimizer.pt"


def _arch_registry() -> dict[str, tuple[type, type]]:
    from gptlab.model.gpt import GPT, GPTConfig
    from gptlab.model.heads import ClassifierModel, ScalarHeadModel
    from gptlab.model.transformer import Transformer, TransformerConfig
    # Order matters for _arch_of: the first matching class names the arch.
    return {"gpt": (GPT, GPTConfig), "scalar": (ScalarHeadModel, GPTConfig),
            "transformer": (Transformer, TransformerConfig),
            "classifier": (ClassifierModel, GPTConfig)}


def _arch_of(model: torch.nn.Module) -> str:
    for name, (cls, _) in _arch_registry().items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"cannot save a {type(model).__name__}: not a gptlab model")


def model_files(tokenizer: Any = None) -> tuple[str, ...]:
    """The files `save_model` writes in a model directory, config.json first: moved aside in
    that order (`old_files_aside`), the directory is no model from the first rename on."""
    if tokenizer is None:
        return "config.json", MODEL_FILE
    from gptlab.tokenizer import TOKENIZER_FILES
    return ("config.json", MODEL_FILE, *TOKENIZER_FILES)


def save_model(out_dir: str | Path, model: torch.nn.Module, tokenizer: Any = None,
               extra: dict | None = None) -> Path:
    """Write a model directory. Every file is written atomically; config.json goes last, so a
    directory with a config.json has its weights in place. Over a model directory (a resumed
    run's OUT saved again) the old model's files are moved aside first, config.json first
    (`old_files_aside`): a save that fails puts them back, byte for byte; a save killed
    before it was done leaves no config.json, never the new weights under the old one (its
    step, its validation loss), and the old files for the next save into the directory, or a
    reader (`read_meta`), to put back."""
    arch = _arch_of(model)  # before anything is written: a model of no arch saves nothing
    made = missing_dirs(out_dir)
    out = ensure_dir(out_dir)
    with old_files_aside(out, model_files(tokenizer), made):
        if tokenizer is not None:
            tokenizer.save(out)
        with atomic_path(out / MODEL_FILE) as tmp:
            st_save_model(model, str(tmp))
        meta = {"format": FORMAT, "arch": arch,
                "model": dataclasses.asdict(model.config), **(extra or {})}
        if getattr(model, "pad_token_id", None) is not None:  # a reward model's scoring position
            meta["pad_token_id"] = model.pad_token_id
        if getattr(model, "reads_template_tail", False):  # scored as whole conversations
            meta["reads_template_tail"] = True
        if arch == "classifier":  # the head's outputs, by name
            meta["labels"] = list(model.labels)
        write_json_atomic(out / "config.json", meta, non_finite="null")
    return out


def replace_model(out_dir: str | Path, model: torch.nn.Module, tokenizer: Any = None,
                  extra: dict | None = None) -> Path:
    """`save_model` for a directory saved over and over (SFT's OUT/best): written whole beside
    it (`.NAME.<random>.tmp`), then swapped in for the old one. A save that fails or is killed
    leaves the old one as it was; file by file, it left the new weights under the old
    config.json, which a resume took for the old evaluation's."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    settle_old_files(out.parent)
    remove_stale_temps(out.parent, glob.escape(f".{out.name}.") + "*.tmp*")
    with held_temp(lambda: new_temp_dir(out)) as tmp:
        try:
            save_model(tmp, model, tokenizer, extra)
            if out.exists():
                replace_dir(tmp, out)
            else:
                os.replace(tmp, out)
                fsync_path(out.parent)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_for_target(e, tmp, out)
    return out


def raise_for_target(e: BaseException, tmp: Path, target: Path) -> None:
    """Re-raise `e`, an error met writing the temporary directory `tmp` in place of `target`;
    an OSError naming a file in `tmp` names that file in `target` instead (the temporary's
    random name means nothing to the user, and is gone)."""
    if isinstance(e, OSError) and e.filename and Path(e.filename).is_relative_to(tmp):
        raise OSError(e.errno, e.strerror, str(target / Path(e.filename).relative_to(tmp))) from e
    raise e


def check_pad_token_id(value: Any, vocab_size: int, path: str | Path, field: str) -> int | None:
    """A reward model's `pad_token_id` (the id its score is never read at): None or a token id."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 <= value < vocab_size):
        raise UserError(f"must be null or a token id in [0, {vocab_size}), got {value!r}",
                        path=path, field=field)
    return value


def read_meta(path: str | Path) -> dict:
    """The config.json of model directory `path`. A NaN or an infinity in it (a null its
    `non_finite` field names, or the bare token an earlier version wrote) is read as a number,
    so that `check_config` names its field."""
    cfg = Path(path) / "config.json"
    if not cfg.exists() and any(Path(path).glob(glob.escape(OLD_FILES_PREFIX) + "*")):
        try:  # a save into it killed before it was done: the old model is put back
            settle_old_files(path)
        except OSError:  # a directory we may not write: said below
            pass
        if not cfg.exists():
            raise WrongKind("not a model directory (config.json is missing): a save into it "
                            "is under way, or was stopped and left the old model's files in "
                            f"{OLD_FILES_PREFIX}*/, which the next save into it puts back",
                            path=path)
    if not cfg.exists():
        if Path(path).is_file():  # `--model data.jsonl`: no directory to lack a config.json
            raise WrongKind("is a file, not a model: a model is a directory (config.json, "
                            "model.safetensors, the tokenizer's files) or a .gguf file",
                            path=path)
        raise WrongKind("not a model directory (config.json is missing)", path=path)
    return restore_non_finite(read_json(cfg))


def _config_format(path: Path) -> Any:
    """The `format` field of `path`/config.json, or None (no such file, not a JSON object)."""
    try:
        meta = read_json(path / "config.json")
    except (UserError, OSError):
        return None
    return meta.get("format")


def _looks_ours(config: Path) -> bool:
    """Whether `config` has gptlab's `arch` and `model` fields and no Hugging Face
    `model_type`: a gptlab config.json whose format marker was lost."""
    try:
        meta = read_json(config)
    except (UserError, OSError):
        return False
    return isinstance(meta, dict) and "model_type" not in meta and "arch" in meta \
        and isinstance(meta.get("model"), dict)


def is_gptlab_dir(path: str | Path) -> bool:
    return _config_format(Path(path)) == FORMAT


_REQUIRED = {"vocab_size", "context", "n_layers", "n_heads", "d_model", "n_encoder_layers",
             "n_decoder_layers"}
# Config fields that count things: each must be at least 1.
_COUNTS = {"vocab_size", "context", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff",
           "head_dim", "n_encoder_layers", "n_decoder_layers", "attention_window"}
# Float fields with a range: (what the message says, the test).
_RANGES = {"norm_eps": ("> 0", lambda v: v > 0), "rope_theta": ("> 0", lambda v: v > 0),
           "attention_scale": ("> 0", lambda v: v > 0),
           "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
           "label_smoothing": ("in [0, 1)", lambda v: 0 <= v < 1)}
_KIND_NAMES = {"None": "null", "int": "an integer", "float": "a number", "bool": "true or false",
               "str": "a string", "list[int]": "a list of integers"}


def _has_type(v: Any, kind: str) -> bool:
    """Whether JSON value `v` is of annotation `kind` (JSON's true is no integer here)."""
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "list[int]":
        return isinstance(v, list) and all(_has_type(x, "int") for x in v)
    if isinstance(v, bool):
        return False
    return {"int": isinstance(v, int), "float": isinstance(v, (int, float)),
            "str": isinstance(v, str), "None": v is None}.get(kind, False)


def check_config(cfg: Any, path: str | Path | None = None, prefix: str = "") -> None:
    """A UserError naming the first field of a model config (a dataclass instance) whose value
    has the wrong type or lies out of range; its field is `prefix` + the field's name."""
    for f in dataclasses.fields(cfg):
        v, name = getattr(cfg, f.name), prefix + f.name
        kinds = [t.strip() for t in str(f.type).split("|")]  # "int | None" -> ["int", "None"]
        if not any(_has_type(v, k) for k in kinds):
            expected = " or ".join(_KIND_NAMES.get(k, k) for k in kinds)
            raise UserError(f"must be {expected}, got {v!r}", path=path, field=name)
        if v is None or isinstance(v, (bool, str, list)):  # a list's range: __post_init__'s
            continue
        if isinstance(v, int) and abs(v) > sys.float_info.max:  # math.isfinite(10**400) raised
            raise UserError(f"must be a finite number, got an integer of {len(str(abs(v)))} "
                            f"digits", path=path, field=name)
        if not math.isfinite(v):
            raise UserError(f"must be a finite number, got {v!r}", path=path, field=name)
        if f.name in _COUNTS and v < 1:
            raise UserError(f"must be at least 1, got {v!r}", path=path, field=name)
        if f.name in _RANGES and not _RANGES[f.name][1](v):
            raise UserError(f"must be {_RANGES[f.name][0]}, got {v!r}", path=path, field=name)
    # float32 counts whole numbers exactly only up to 2**24: a sinusoidal table longer than that
    # gives positions past it one another's encoding (and, at 10**9, asked for 128 GB).
    if getattr(cfg, "positions", "sinusoidal") == "sinusoidal" and cfg.context > 2**24:
        raise UserError(f"must be at most 2**24 (16777216) with sinusoidal positions, whose "
                        f"float32 table tells no positions past it apart; got {cfg.context}",
                        path=path, field=prefix + "context")


def build_from_meta(meta: dict, path: str | Path = "config.json") -> torch.nn.Module:
    """The (untrained) model a config.json describes, its config checked field by field."""
    registry = _arch_registry()
    arch = meta.get("arch")
    if not isinstance(arch, str) or arch not in registry:
        raise UserError(f"unknown arch {arch!r} (known: {', '.join(registry)})", path=path,
                        field="arch")
    model_cls, cfg_cls = registry[arch]
    if "model" not in meta:
        raise UserError("missing: the model's configuration (its sizes and options)",
                        path=path, field="model")
    fields = meta["model"]
    if not isinstance(fields, dict):
        raise UserError("expected an object of model config fields", path=path, field="model")
    names = [f.name for f in dataclasses.fields(cfg_cls)]
    unknown = set(fields) - set(names)
    if unknown:
        raise UserError(f"unknown model config keys {sorted(unknown)}", path=path, field="model")
    # The sizes are required: a default in their place builds a model of another shape. Other
    # fields (added in later versions) may be absent and take their defaults.
    missing = [n for n in names if n in _REQUIRED and n not in fields]
    if missing:
        raise UserError(f"missing model config keys {missing}", path=path, field="model")
    cfg = _make_config(cfg_cls, fields, path)
    if arch == "classifier":
        labels = meta.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 \
                or not all(isinstance(x, str) for x in labels) or len(set(labels)) < len(labels):
            raise UserError(f"must be a list of two or more distinct label names, got "
                            f"{labels!r}", path=path, field="labels")
        return model_cls(cfg, labels)
    try:
        return model_cls(cfg)
    except (TypeError, ValueError) as e:
        raise UserError(str(e), path=path, field="model") from None
    except (RuntimeError, OverflowError) as e:  # sizes past what torch can address
        raise UserError(f"describes a model that cannot be built ({str(e).splitlines()[0]})",
                        path=path, field="model") from None


def check_layer_counts(meta: dict, path: Path, weights: Path) -> None:
    """Refuse a config.json whose layer count (`n_layers`, `n_encoder_layers`, ...) exceeds the
    number of tensors in `weights`, each layer having tensors of its own: building its model
    (10^30 layers, a typo's or a corrupt file's) would loop and fill the memory before the
    weights could be compared with it. A file that cannot be read is left to `load_weights`."""
    fields = meta.get("model")
    if not isinstance(fields, dict) or not weights.is_file():
        return
    from safetensors import safe_open
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = len(f.keys())
    except (SafetensorError, OSError):
        return
    for name, value in fields.items():
        if name.endswith("layers") and isinstance(value, int) and not isinstance(value, bool) \
                and value > tensors:
            raise UserError(f"is {value}, but {weights.name} holds {tensors} tensors, fewer than "
                            f"one per layer: the config does not describe these weights",
                            path=path, field=f"model.{name}")


def _make_config(cfg_cls: type, fields: dict, path: str | Path) -> Any:
    # Filled in without __init__ first, so that every type is checked before __post_init__
    # does arithmetic with the values.
    unchecked = cfg_cls.__new__(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        object.__setattr__(unchecked, f.name, fields.get(f.name, f.default))
    check_config(unchecked, path, prefix="model.")
    try:
        return cfg_cls(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(str(e), path=path, field="model") from None


def _shape_mismatches(model: torch.nn.Module, file: Path) -> list[str]:
    """One line for each tensor of `file` whose shape differs from the model's."""
    from safetensors import safe_open

    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    out = []
    with safe_open(str(file), framework="pt") as f:
        for name in f.keys():
            found = tuple(f.get_slice(name).get_shape())
            if name in expected and expected[name] != found:
                out.append(f"{name} is {found} in the file, the config implies {expected[name]}")
            # An integer or boolean tensor where the model has a float one: cast, it loaded
            # silently as whole numbers (a damaged or foreign file, never a saved model).
            kind = f.get_slice(name).get_dtype()
            if name in expected and state[name].is_floating_point() \
                    and not kind.startswith(("F", "BF")):
                out.append(f"{name} is of type {kind} in the file, the model's is a floating-point "
                           f"type")
    return out


def refuse_non_finite(tensors: Iterable[tuple[str, torch.Tensor]], path: str | Path) -> None:
    """A UserError naming `path` and the first floating-point tensor of `tensors` (name,
    tensor) that holds a NaN or an infinity, with how many: a diverged run's weights, whose
    every logit would be NaN. No weight of a model has a reason to hold one (masks of -inf
    are buffers gptlab builds, never reads from a file)."""
    for name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        # One pass, no copy (a NaN propagates to both): isfinite().all() writes a mask of the
        # whole tensor first, 40 times slower (as long as reading SmolLM2-135M's file).
        low, high = torch.aminmax(t.detach())
        if not (math.isfinite(low) and math.isfinite(high)):
            nan = int(torch.isnan(t).sum())
            inf = int(torch.isinf(t).sum())
            said = " and ".join(f"{n} {what}" for n, what in (
                (nan, "NaN"), (inf, "infinite")) if n)
            raise UserError(f"tensor '{name}' holds non-finite weights ({said} of its "
                            f"{t.numel()} values): the weights of a run that diverged, whose "
                            f"every output would be NaN; load an earlier checkpoint", path=path)


def load_weights(model: torch.nn.Module, file: str | Path) -> None:
    """Load `file` into `model`: in place, or, for a model built on the meta device (shapes
    only, no random init to throw away), by taking the file's tensors as its weights. Weights
    that hold a NaN or an infinity are refused (`refuse_non_finite`)."""
    file = Path(file)
    if not file.exists():
        raise UserError("model weights are missing", path=file)
    try:
        wrong = _shape_mismatches(model, file)
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read weights (truncated or corrupt file?): {e}",
                        path=file) from None
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise UserError(f"weights do not fit the model's config.json: {wrong[0]}{more}",
                        path=file)
    try:
        if any(t.is_meta for t in model.parameters()):
            missing, unexpected = _assign_weights(model, load_file(str(file)))
        else:
            missing, unexpected = st_load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"cannot read weights (truncated or corrupt file?): {e}",
                        path=file) from None
    if missing or unexpected:
        parts = [f"{len(names)} tensor(s) {what} ({', '.join(sorted(names)[:3])}"
                 f"{', ...' if len(names) > 3 else ''})"
                 for names, what in ((missing, "the config implies are not in the file"),
                                     (unexpected, "in the file are not in the model"))
                 if names]
        raise UserError(f"weights do not fit the model's config.json: {'; '.join(parts)}",
                        path=file)
    refuse_non_finite(chain(model.named_parameters(), model.named_buffers()), file)


def _assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]
                    ) -> tuple[list[str], list[str]]:
    """Make `state`'s tensors the weights of a model built on the meta device, each in the
    dtype the model declares; a tensor the model shares under several names (tied embeddings)
    stays one tensor, found under any of them (safetensors keeps one). Buffers the file does not
    hold (a sinusoidal table) are rebuilt by their module's `reset_buffers`. Returns the names
    missing from the file and those in it the model lacks."""
    saved = set(model.state_dict())
    tied: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, t in chain(model.named_parameters(remove_duplicate=False),
                         model.named_buffers(remove_duplicate=False)):
        if name in saved:
            tied.setdefault(id(t), (t, []))[1].append(name)
    missing = []
    for ref, names in tied.values():
        found = [n for n in names if n in state]
        if not found:
            missing += names
            continue
        value = state[found[0]].to(ref.dtype)
        if isinstance(ref, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=ref.requires_grad)
        for name in names:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, value)
    if not missing:
        for module in model.modules():
            if any(b is not None and b.is_meta for b in module._buffers.values()):
                try:
                    with torch.device("cpu"):
                        module.reset_buffers()
                except RuntimeError as e:  # out of memory: the config's size, not the file
                    raise UserError(f"its sinusoidal position table cannot be made "
                                    f"({str(e).splitlines()[0][:200]})",
                                    field="model.context") from None
    return missing, [n for n in state if n not in saved]


def check_tokenizer_fits(model: torch.nn.Module, tok: Any, path: str | Path | None = None
                         ) -> None:
    """Every id `tok` can give needs an embedding row, or the model fails with a bare
    IndexError on the first such token."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if tok is not None and vocab is not None and tok.vocab_size > vocab:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model's embedding has "
                        f"{vocab} rows", path=path, field="vocab_size")


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any, dict]:
    """Load a gptlab model directory, a Hugging Face directory or a .gguf file.

    Returns (model in eval mode, tokenizer or None, meta dict).
    """
    p = Path(path)
    if not p.exists():
        raise NotFound("model not found", path=p)
    # A config.json with a "format" of gptlab's (any version) is gptlab's, even one this
    # version cannot read; any other is a Hugging Face model's.
    fmt = _config_format(p) if p.is_dir() else None
    ours = isinstance(fmt, str) and fmt.startswith("gptlab/")
    if p.is_dir() and not ours and _looks_ours(p / "config.json"):
        # Read as a Hugging Face config, it was "architecture None is not supported".
        said = "is missing" if fmt is None else f"is {fmt!r}"
        raise UserError(f"{said}: a gptlab model directory's config.json has \"format\": "
                        f"\"{FORMAT}\" (its arch and model fields are gptlab's)",
                        path=p / "config.json", field="format")
    if (p.is_file() and p.suffix == ".gguf") or (p.is_dir() and not ours
                                                  and (p / "config.json").exists()):
        from gptlab.interop import load_pretrained
        model, tok = load_pretrained(p)
        meta = {"format": "imported", "source": str(p), "arch": _arch_of(model),
                "model": dataclasses.asdict(model.config)}
    else:
        meta = read_meta(p)
        if meta.get("format") != FORMAT:
            raise UserError(f"config.json has format {meta.get('format')!r}, expected "
                            f"'{FORMAT}'", path=p / "config.json", field="format")
        check_layer_counts(meta, p / "config.json", p / MODEL_FILE)
        with torch.device("meta"):  # shapes only: the weights come from the file
            model = build_from_meta(meta, p / "config.json")
        try:
            load_weights(model, p / MODEL_FILE)
        except UserError as e:  # one that names no file is the config's (`_assign_weights`)
            raise e.at(p / "config.json") from None
        if hasattr(model, "pad_token_id"):
            model.pad_token_id = check_pad_token_id(meta.get("pad_token_id"),
                                                    model.config.vocab_size,
                                                    p / "config.json", "pad_token_id")
        if hasattr(model, "reads_template_tail"):
            model.reads_template_tail = check_bool(meta.get("reads_template_tail", False),
                                                   "reads_template_tail", p / "config.json")
        tok = None
        if (p / "tokenizer.json").exists():
            from gptlab.tokenizer import load_tokenizer
            tok = load_tokenizer(p)
    check_tokenizer_fits(model, tok, p)
    model.to(device=device, dtype=dtype)  # dtype None: each tensor keeps its own
    return model.eval(), tok, meta


def load_language_model(path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, need_tokenizer: bool = True,
                        field: str = "model", instead: str | None = None,
                        ) -> tuple[torch.nn.Module, Any, dict]:
    """`load_model` for the verbs that generate or train text: the model must be a decoder-only
    GPT with a tokenizer (a reward model's directory looks the same from outside). Errors name
    `field`, the setting that gave `path`; `instead` ends the refusal of a reward or value
    model (what to give, and where that one goes)."""
    from gptlab.model.gpt import GPT

    model, tok, meta = load_model(path, device, dtype)
    if not isinstance(model, GPT):
        said = f"; {instead}" if instead and _arch_of(model) == "scalar" else ""
        raise WrongKind(f"not a decoder-only language model: this is "
                        f"{model_kind(model, path)}, which has no text to say{said}",
                        path=path, field=field)
    if tok is None and need_tokenizer:
        raise UserError("the model has no tokenizer (tokenizer.json)", path=path, field=field)
    return model, tok, meta


def model_kind(model: torch.nn.Module, path: str | Path) -> str:
    """What `model`, read from `path`, is, in words, where a decoder-only language model was
    expected: PPO's value model (`is_value_model`), a reward or value model (another scalar
    head), a classifier, or an encoder-decoder."""
    if _arch_of(model) == "classifier":
        return "a classifier (gptlab finetune's; `api.classify` reads it)"
    if _arch_of(model) != "scalar":
        return f"an encoder-decoder {type(model).__name__}"
    return "PPO's value model" if is_value_model(path) else "a reward or value model"


def _stage(path: Path) -> Any:
    """The `stage` field of `path`/config.json, or None (no such file, not a JSON object)."""
    try:
        meta = read_json(path / "config.json")
    except (UserError, OSError):
        return None
    return meta.get("stage") if isinstance(meta, dict) else None


def is_value_model(path: str | Path) -> bool:
    """Whether `path` is PPO's value model: its config.json's stage says so, or, written before
    that was recorded, it is a `value/` directory without a stage beside a PPO policy (OUT/value,
    checkpoints/step-N/value), the only place PPO writes one."""
    p = Path(path).absolute()
    stage = _stage(p)
    if stage == VALUE_STAGE:
        return True
    return stage is None and p.name == "value" and _stage(p.parent) == "ppo"


def load_reward_model(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, field: str | None = "reward",
                      instead: str = "give the reward model's directory (the pipeline's "
                                     "round-N/reward)") -> tuple[torch.nn.Module, Any, dict]:
    """`load_model` where a reward model is expected: a scalar-head model (or a one-label
    classifier) that is not PPO's value model, which reads the same from outside but, trained,
    predicts returns rather than scores. Errors name `field` and end with `instead`."""
    from gptlab.model.heads import ScalarHeadModel

    if is_value_model(path):
        raise WrongKind(f"is PPO's value model, not a reward model: trained, it predicts "
                        f"returns, not rewards; {instead}", path=path, field=field)
    model, tok, meta = load_model(path, device, dtype)
    if not isinstance(model, ScalarHeadModel):
        raise WrongKind("not a reward model (expected a scalar-head model or a one-label "
                        "sequence classifier)", path=path, field=field)
    return model, tok, meta


# --- training checkpoints ----------------------------------------------------------------------

def torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a full disk then stops the run as the OSError it is,
    naming `path` (torch's own writer says `unexpected pos 832 vs 726`, naming no file)."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except Exception as e:
        named = named_os_error(e, path)
        if named is e:
            raise
        raise named from e


def weights_key(model: torch.nn.Module) -> str:
    """A digest of `model`'s weights (names, dtypes, shapes, values), whichever file they came
    from: SFT records its input model's, so that a resume can tell whether the input still holds
    the weights its step 0 evaluated."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _step_dirs(directory: Path) -> dict[int, Path]:
    """The `step-N` directories a save names, by N (a user's `step-4-keep` is not one)."""
    # isdecimal, not isdigit: "²" is a digit that int() cannot read
    return {int(p.name[5:]): p for p in directory.glob("step-*")
            if p.name[5:].isdecimal() and p.is_dir()}


def _manifest_field(checkpoint: Path, name: str) -> int | None:
    """An integer field of `checkpoint`'s manifest (`save`, `threads`), or None: a manifest
    written before the field was, or one that cannot be read (`_manifest` names it when the
    checkpoint is loaded)."""
    try:
        value = json.loads((checkpoint / "manifest.json").read_text(encoding="utf-8")).get(name)
    except (OSError, ValueError, AttributeError):  # missing, not JSON or UTF-8, not an object
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _earlier(checkpoint: Path) -> str:
    return f"; remove {checkpoint} to resume from the checkpoint before it, if there is one"


def _unpickled(file: Path, advice: str, mmap: bool = False) -> Any:
    """The object `file` (a checkpoint's trainer.pt or optimizer.pt) holds, read onto the CPU
    (a run saved on a GPU resumes on a machine without one); one that cannot be unpickled is a
    damaged checkpoint, its message ending with `advice`. `mmap`: its tensors mapped, not read
    (a check of what it holds costs no copy of a large model's optimizer state)."""
    try:
        # Only torch.save's zip format maps; bytes in another are read, and say what they are.
        mmap = mmap and zipfile.is_zipfile(file)
        return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    except OSError:  # not the file's content: said as such, naming it, by the CLI
        raise
    except Exception as e:  # bytes that are no pickle: unpickling them raises anything
        said = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"is damaged ({type(e).__name__}: {said})" + advice, path=file) from None


class TrainerState(dict):
    """A checkpoint's trainer state (its trainer.pt): a key a resume reads that it lacks is a
    damaged checkpoint, said as one (the file, and to remove the checkpoint), not a KeyError.
    Pickled, copied or saved again, it is a plain dict."""

    def __init__(self, state: dict, path: Path, advice: str):
        super().__init__(state)
        self.path, self.advice = path, advice

    def __missing__(self, key: Any) -> Any:
        raise self.lacking(key)

    def lacking(self, key: Any) -> UserError:
        return UserError(f"is damaged (it holds no {key!r}, which every save writes)"
                         + self.advice, path=self.path)

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)


class Checkpointer:
    """`RUN/checkpoints/step-N/` directories, the `latest` pointer, and the last `keep` up to
    the step last saved kept (all of them when `keep` is None)."""

    def __init__(self, run_dir: str | Path, keep: int | None = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = None if keep is None else max(1, keep)

    def save(self, step: int, model: torch.nn.Module, tokenizer: Any = None,
             optimizer: torch.optim.Optimizer | None = None, state: dict | None = None,
             extra: dict | None = None, models: dict[str, torch.nn.Module] | None = None,
             models_extra: dict[str, dict] | None = None) -> Path:
        """Write checkpoint `step`; `state` is any picklable trainer state (RNG, data position);
        `models` are more model directories inside it, by name (PPO's value model: `value/`),
        `models_extra` their config.json fields besides the model's, by the same names."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step}"
        # A save that was killed left its copy here (`.step-N.<random>.tmp`), or the old copy of
        # a step saved again, put aside where there is no swap (`.old-files.<random>/step-N`,
        # put back); one being written by a live process is locked and stays.
        settle_old_files(self.dir)
        remove_stale_temps(self.dir, ".step-*.tmp*")
        with held_temp(lambda: new_temp_dir(final)) as tmp:
            try:
                save_model(tmp, model, tokenizer, extra)
                for name, other in (models or {}).items():
                    save_model(tmp / name, other, extra=(models_extra or {}).get(name))
                if optimizer is not None:
                    torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch_save(state or {}, tmp / "trainer.pt")
                files = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
                for f in files:  # torch.save's files are not flushed to the disk otherwise
                    fsync_path(f)
                manifest = {f.relative_to(tmp).as_posix(): _sha256(f) for f in files}
                # `save` numbers the saves in the order they were written, which `latest`
                # falls back on; `threads`, the CPU threads this run computed on, which a
                # resume on another count is told of (`note_other_threads`).
                saves = [_manifest_field(p, "save") or 0 for p in _step_dirs(self.dir).values()]
                # Written (and flushed) last: the names of every file above are on the disk.
                write_json_atomic(tmp / "manifest.json", {
                    "step": step, "save": max(saves, default=0) + 1,
                    "threads": torch.get_num_threads(), "sha256": manifest})
                if final.exists():  # the same step saved again: never a moment without it
                    replace_dir(tmp, final)
                else:
                    os.replace(tmp, final)
                    fsync_path(self.dir)  # on the disk before `latest` names it, older pruned
            except BaseException as e:
                # A failed save leaves nothing behind: its copy, or the old one swapped out.
                shutil.rmtree(tmp, ignore_errors=True)
                raise_for_target(e, tmp, final)
        write_text_atomic(self.dir / "latest", final.name + "\n")
        self.prune(step)
        return final

    def prune(self, newest: int) -> None:
        """Remove all but the last `keep` checkpoints up to step `newest`, the one just saved,
        each in one step (`remove_dir`): file by file, a kill midway left a `step-N` with its
        manifest and part of its files. Those past `newest` are another line of the run (one
        resumed from an earlier checkpoint, the pointer moved back by hand) and stay: counted
        in, they had the save remove the checkpoint it was resumed from, the only other one
        of its line. One that cannot be renamed aside (`remove_dir`) stays whole, and the next
        save tries again. A run resumed at its last step calls it too: its last save, killed
        once `latest` named it, removed none, and no save follows."""
        if self.keep is None:
            return
        steps = [p for n, p in sorted(_step_dirs(self.dir).items()) if n <= newest]
        for old in steps[:-self.keep]:
            remove_dir(old)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; if it names none that is complete (the pointer
        removed, edited by hand, or naming a checkpoint since deleted), the complete checkpoint
        written last, which the pointer named then (by its manifest's `save`). The highest
        step could be another line of the run: one abandoned when the run was resumed from an
        earlier checkpoint. A pointer naming a `step-N` since deleted (damaged, and removed as
        the error advised) named the last save: what comes before it has a step below N, and
        the fallback looks there first. Checkpoints written before `save` was recorded count
        as written before any that has it, and among themselves by their steps; where a
        manifest is damaged, the order is unknown, and the highest step is taken. A step a
        killed save had put aside is put back first (`settle_old_files`)."""
        settle_old_files(self.dir)
        pointer = self.dir / "latest"
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):  # missing, or not the text a save writes
            name = ""
        complete = {n: p for n, p in _step_dirs(self.dir).items()
                    if (p / "manifest.json").is_file()}
        named = next((p for p in complete.values() if p.name == name), None)
        if named is not None or not complete:
            return named
        gone = int(name[5:]) if name.startswith("step-") and name[5:].isdecimal() else None
        before = {n: p for n, p in complete.items() if gone is not None and n < gone}

        candidates = before or complete
        try:
            for n in candidates:
                self._manifest(complete[n])
        except UserError:  # a damaged manifest: when it was written is unknown, its step is
            return complete[max(candidates)]  # (and a load names it, with what to do)

        def written(n: int) -> tuple[bool, int, int]:
            save = _manifest_field(complete[n], "save")
            return save is not None, save or 0, n
        return complete[max(candidates, key=written)]

    def last(self, n: int) -> list[Path]:
        """The last `n` complete checkpoints up to the latest (`latest`), oldest first: those
        past it are another line of the run."""
        newest = self.latest()
        if newest is None:
            return []
        top = self.step_of(newest)
        return [p for step, p in sorted(_step_dirs(self.dir).items())
                if step <= top and (p / "manifest.json").is_file()][-n:]

    def named(self, name: str, field: str = "resume_from") -> Path:
        """The checkpoint `name` names, verified against its manifest: `step-N`, `N`, or the
        path of this run's `checkpoints/step-N`. One that is not there, is another directory's,
        or fails the manifest check is a UserError naming its path and `field`, and listing
        the checkpoints there are. A training stage resumes from it: the files each stage's save
        writes are required (`stage_files`)."""
        there = self._listing()
        text = str(name).strip()
        # "step-6/" is how a shell completes the directory's name
        number = text.rstrip("/" + os.sep).removeprefix("step-")
        if number.isdecimal():  # isdecimal, not isdigit: "²" is a digit int() cannot read
            path = self.dir / f"step-{int(number)}"
        else:
            path = Path(text)
            if path.parent.resolve() != self.dir.resolve() or not (
                    path.name.startswith("step-") and path.name[5:].isdecimal()):
                raise UserError(f"is not a checkpoint of this run: give a step (step-N or N) "
                                f"of {self.dir}{there}", path=path, field=field)
            path = self.dir / path.name
        if not path.is_dir():
            raise UserError("no such checkpoint" + there, path=path, field=field)
        try:
            advice = self.named_advice()
            self.verify(path, advice=advice)
            self.require(path, self.stage_files(path), advice)
        except UserError as e:
            raise UserError(e.message, path=e.path, field=field) from None
        return path

    def named_advice(self) -> str:
        """What a message about a checkpoint the user named (`named`) ends with: that it cannot
        be resumed from, and the others there are; not to remove it to resume from the one
        before it, as for the latest (the user chose this one)."""
        return f"; it cannot be resumed from{self._listing()}"

    def _listing(self) -> str:
        steps = sorted(n for n, p in _step_dirs(self.dir).items()
                       if (p / "manifest.json").is_file())
        return (f"; the checkpoints in {self.dir}: " + ", ".join(f"step-{n}" for n in steps)
                if steps else f"; {self.dir} holds no checkpoint")

    def point_latest(self, path: Path) -> None:
        """Make `latest` name checkpoint `path` (a resume from a checkpoint named by its step,
        as if the pointer had been moved there by hand): a later `--resume` continues its line,
        not the one it left."""
        latest = self.latest()
        if latest is None or latest.resolve() != Path(path).resolve():
            write_text_atomic(self.dir / "latest", Path(path).name + "\n")

    def check_pointer(self) -> None:
        """Refuse a `latest` that is no file (a directory made there): a resume passed over it
        to the checkpoint written last, and the first save, which replaces it, failed once the
        steps before it were trained."""
        pointer = self.dir / "latest"
        if pointer.is_dir():
            raise UserError("is a directory where the checkpoint pointer, a file, goes; remove it",
                            path=pointer)
        if pointer.exists() and not pointer.is_file():  # a FIFO: reading it would wait forever
            raise UserError("is no regular file where the checkpoint pointer, a file, goes; "
                            "remove it", path=pointer)

    @staticmethod
    def stage_files(path: str | Path) -> tuple[str, ...]:
        """The files a training stage's save writes in checkpoint `path`, which a resume
        requires: every save's, the optimizer's state (every stage has one) and, in a PPO
        checkpoint (its config.json's `stage`), the value model (`value/`)."""
        value = (("value/config.json", f"value/{MODEL_FILE}")
                 if _stage(Path(path)) == "ppo" else ())
        return (*SAVED_FILES, OPTIMIZER_FILE, *value)

    @staticmethod
    def threads_of(path: str | Path) -> int | None:
        """The CPU threads the run computed on when it saved checkpoint `path` (None: saved
        before that was recorded)."""
        return _manifest_field(Path(path), "threads")

    @staticmethod
    def _manifest(path: Path, advice: str | None = None) -> dict:
        """The manifest's step and hashes; a UserError ending with `advice` (by default, to
        remove the checkpoint) where there is none or it is damaged."""
        advice = _earlier(path) if advice is None else advice
        mf = path / "manifest.json"
        if not mf.exists():
            raise UserError("checkpoint is incomplete (no manifest.json)" + advice, path=path)
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
            step, files = manifest["step"], manifest["sha256"]
            # int() read 1.5 and true as step 1, and failed on 1e400 (infinity) untold.
            if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63:
                raise TypeError(f"step is {reprlib.repr(step)}, not a step number")
            if not isinstance(files, dict):
                raise TypeError("sha256 is not an object")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise UserError(f"is damaged ({type(e).__name__}: {e})" + advice, path=mf) from None
        return {"step": step, "sha256": files}

    @classmethod
    def step_of(cls, path: str | Path) -> int:
        """The training step a checkpoint was saved at."""
        return cls._manifest(Path(path))["step"]

    @classmethod
    def verify(cls, path: str | Path, advice: str | None = None) -> None:
        """Raise UserError if any file of the checkpoint is missing or differs from its sha256,
        or one every save writes (`SAVED_FILES`) is not there; its message ends with `advice` (by
        default, to remove the checkpoint)."""
        path = Path(path)
        advice = _earlier(path) if advice is None else advice
        listed = cls._manifest(path, advice)["sha256"]
        for name, digest in listed.items():
            f = path / name
            if not f.is_file() or _sha256(f) != digest:
                raise UserError("checkpoint file is missing or corrupt" + advice, path=f)
        # A save lists every file it writes: one the manifest lacks (an edited manifest) would
        # be loaded unverified. Hidden files (a file browser's) are no save's.
        for f in sorted(path.rglob("*")):
            name = f.relative_to(path).as_posix()
            if f.is_file() and name != "manifest.json" and name not in listed \
                    and not any(part.startswith(".") for part in f.relative_to(path).parts):
                raise UserError("checkpoint file is not listed in manifest.json, so it cannot be "
                                "verified" + advice, path=f)
        cls._require(path, listed, SAVED_FILES, advice)

    @classmethod
    def require(cls, path: str | Path, files: Iterable[str], advice: str | None = None) -> None:
        """Raise UserError if checkpoint `path` lacks one of `files` (`stage_files`), there
        and listed in its manifest; its message ends with `advice` (by default, to remove the
        checkpoint). Their hashes are `verify`'s to check."""
        path = Path(path)
        advice = _earlier(path) if advice is None else advice
        cls._require(path, cls._manifest(path, advice)["sha256"], files, advice)

    @staticmethod
    def _require(path: Path, listed: dict, required: Iterable[str], advice: str) -> None:
        """A UserError for the first of the files `required` that checkpoint `path` lacks:
        checked by its manifest alone, a checkpoint whose manifest left one out (edited by hand)
        passed, and resumed without it."""
        for name in required:
            f, there = path / name, (path / name).is_file()
            if name in listed and there:
                continue
            if there:
                why = "is not listed in manifest.json, so it cannot be verified"
            elif name in listed:
                why = "is missing or corrupt"
            else:
                why = "is missing: every save writes it, and manifest.json does not list it"
            raise UserError("checkpoint file " + why + advice, path=f)

    def load(self, path: str | Path, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer | None = None,
             models: dict[str, torch.nn.Module] | None = None, verify: bool = True,
             needs: Iterable[str] = ()) -> TrainerState:
        """Restore weights (those of `models` too, by name, and the optimizer) in place;
        return the trainer state, which must hold the keys `needs` (see `state_of`). Each file
        these are read from must be there. `verify=False`: the caller has just verified `path`
        (`check_run_dir` does), and its files are not hashed again."""
        path = Path(path)
        required = (*SAVED_FILES, *((OPTIMIZER_FILE,) if optimizer is not None else ()),
                    *(f"{name}/{f}" for name in models or {} for f in ("config.json", MODEL_FILE)))
        if verify:
            self.verify(path)
        self.require(path, required)
        # What a kill left of a save or of a removal (`prune`'s, of the last save: a run that
        # was done with its steps saves no more, and no save would remove it), and of the
        # pointer's write: killed between its rename and its temporary's removal, that save
        # left `.latest.<random>.tmp`, which only the next write of the pointer removes.
        settle_old_files(self.dir)
        remove_stale_temps(self.dir, ".step-*.tmp*")
        remove_stale_temps(self.dir, glob.escape(".latest.") + "*.tmp")
        load_weights(model, path / MODEL_FILE)
        for name, other in (models or {}).items():
            load_weights(other, path / name / MODEL_FILE)
        if optimizer is not None:
            state = self.optimizer_state(path)
            try:  # load_state_dict moves the optimizer's state to its parameters' device
                optimizer.load_state_dict(state)
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
                # The weights loaded: an optimizer state that does not fit them is the file's.
                said = (str(e).splitlines() or [""])[0][:200]
                raise UserError(f"is damaged ({type(e).__name__}: {said})" + _earlier(path),
                                path=path / OPTIMIZER_FILE) from None
        return self.state_of(path, needs)

    @staticmethod
    def optimizer_state(path: str | Path, mmap: bool = False, advice: str | None = None) -> dict:
        """The optimizer state checkpoint `path` holds, read onto the CPU (not verified); one
        that cannot be read, or lacks the `state` and `param_groups` an optimizer reads, is a
        damaged checkpoint, its message ending with `advice` (by default, to remove it).
        `mmap`: its tensors mapped, not read (`_unpickled`)."""
        file = Path(path) / OPTIMIZER_FILE
        advice = _earlier(Path(path)) if advice is None else advice
        state = _unpickled(file, advice, mmap)
        groups = state.get("param_groups") if isinstance(state, dict) else None
        if not (isinstance(groups, list) and isinstance(state.get("state"), dict)
                and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                        for g in groups)):
            raise UserError("is damaged (not an optimizer's state: it needs a 'state' object and "
                            "a list of 'param_groups', each with its 'params')" + advice,
                            path=file)
        return state

    @staticmethod
    def state_of(path: str | Path, needs: Iterable[str] = (), advice: str | None = None
                 ) -> TrainerState:
        """The trainer state checkpoint `path` holds, read onto the CPU (not verified). One
        that cannot be read, is no dict, or lacks one of the keys `needs` (or any read from it
        later) is a damaged checkpoint, its message ending with `advice` (by default, to
        remove it)."""
        path = Path(path)
        file, advice = path / "trainer.pt", _earlier(path) if advice is None else advice
        state = _unpickled(file, advice)
        if not isinstance(state, dict):
            raise UserError(f"is damaged (it holds {type(state).__name__!r}, not a trainer's "
                            f"state)" + advice, path=file)
        state = TrainerState(state, file, advice)
        missing = [key for key in needs if key not in state]
        if missing:
            raise state.lacking(missing[0])
        return state
