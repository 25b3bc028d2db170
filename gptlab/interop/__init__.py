"""Pretrained models in and out: Hugging Face directories and GGUF files become gptlab `GPT`
models with the exact same function; gptlab models export to Hugging Face directories and
(Llama- and GPT-2-shaped ones) to GGUF files.

    model, tokenizer = load_pretrained("path/to/hf-dir-or-file.gguf")
    export_hf(model, tokenizer, "out/hf")
    export_gguf(model, tokenizer, "out/model.gguf", dtype="f16")

HF directories need only safetensors and tokenizers; GGUF needs the `gguf` package
(`pip install gptlab[hf]`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from gptlab.errors import (NotFound, UserError, WrongKind, reports_path_errors,
                           require_file)
from gptlab.io import (check_dir_out, check_file_out, check_holds_none, missing_dirs,
                       old_files_aside)
from gptlab.interop.gguf import GGUF_DTYPES, SUPPORTED_GGUF, export_gguf, load_gguf
from gptlab.interop.hf import HF_EXPORT_FILES, SUPPORTED_HF, export_hf, load_hf

__all__ = ["load_pretrained", "export_hf", "export_gguf", "convert_to_gptlab", "convert_to_hf",
           "convert_to_gguf", "SUPPORTED_HF", "SUPPORTED_GGUF", "GGUF_DTYPES"]


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, Tokenizer or None) from a Hugging Face directory or a .gguf file:
    a GPT, or a reward model (ScalarHeadModel) from a one-label sequence classifier."""
    p = Path(path)
    if not p.exists():
        raise NotFound("model not found", path=p)
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf(p, dtype)
    if p.is_dir():
        return load_hf(p, dtype)
    raise UserError("expected a Hugging Face model directory or a .gguf file", path=p)


# What a model directory or a training run holds (both formats): another model's files.
MODEL_OR_RUN = ("config.json", "model.safetensors", "tokenizer.json", "run.json", "checkpoints")


def check_out_apart(src: str | Path, out_dir: str | Path) -> Path:
    """`out_dir` as a Path, unless it is `src`, inside it or contains it: a conversion would
    then overwrite (or mix its files into) the model it reads; or unless it holds another
    model or a training run, whose files the conversion would mix with its own."""
    out = check_dir_out(out_dir, field="out")  # not "": Path("") is the current directory
    a, b = Path(src).resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        where = "is" if a == b else "is inside" if a in b.parents else "contains"
        raise UserError(f"the output directory {where} the model being converted ({src}); "
                        f"choose another out (--out)", path=out, field="out")
    check_holds_none(out, MODEL_OR_RUN)
    return out


@reports_path_errors
def convert_to_gptlab(src: str | Path, out_dir: str | Path, source: str | None = None) -> Path:
    """Import `src` (source 'hf', 'gguf' or None to detect) and write a gptlab model directory.
    Without tokenizer files in `src` the directory has none either: a warning says so."""
    from gptlab.checkpoint import save_model

    p = require_file(src, "model")  # a missing file is not a file of the wrong kind
    check_out_apart(p, out_dir)
    if source == "gguf" and not (p.is_file() and p.suffix == ".gguf"):
        why = "is a directory" if p.is_dir() else "is a file whose name does not end in .gguf"
        raise WrongKind(f"{why}; --from gguf reads a .gguf file", path=p)
    if source == "hf" and not p.is_dir():
        raise WrongKind("is a file; --from hf reads a Hugging Face model directory (config.json "
                        "and *.safetensors)", path=p)
    model, tokenizer = load_pretrained(p)
    if tokenizer is None:
        where = "tokenizer.ggml.model" if p.suffix == ".gguf" else "tokenizer.json"
        print(f"warning: {p} has no tokenizer ({where}): the converted model has none; "
              f"copy tokenizer.json and tokenizer_config.json into it before generating or "
              f"training", file=sys.stderr)
    # check_out_apart refused another model's directory: what else of a model's files `out`
    # holds (a tokenizer_config.json, a generation_config.json) is put back if the save fails,
    # and the files it wrote are removed, so the same command runs again
    made = missing_dirs(out_dir)
    with old_files_aside(out_dir, HF_EXPORT_FILES, made):
        return save_model(out_dir, model, tokenizer, extra={"source": str(p)})


@reports_path_errors
def convert_to_hf(src: str | Path, out_dir: str | Path) -> Path:
    """Export a gptlab model directory (or anything `load_model` reads) to Hugging Face."""
    from gptlab.checkpoint import is_value_model, load_model

    check_out_apart(src, out_dir)
    if is_value_model(src):  # export_hf's reason, and the flag that reads it
        raise UserError("PPO's value model does not export to Hugging Face: the score layer of "
                        "transformers' *ForSequenceClassification has no bias, so this model's "
                        "head bias would be lost and its values would differ; use the directory "
                        "itself (gptlab ppo --value DIR)", path=src)
    model, tokenizer, _ = load_model(src)
    try:
        # check_out_apart refused another model's directory: the rest is replaced, and a
        # failed export leaves it as it was
        return export_hf(model, tokenizer, out_dir, overwrite=True)
    except UserError as e:  # a model that does not map: say which one
        raise e.at(src) from None


@reports_path_errors
def convert_to_gguf(src: str | Path, out_file: str | Path, dtype: str = "f32") -> Path:
    """Export a gptlab model directory (or anything `load_model` reads) to a new .gguf file
    (`export_gguf`); an `out_file` that exists is refused, as is one `load_pretrained` would not
    read as GGUF (its name must end in .gguf) and one inside the model's directory."""
    from gptlab.checkpoint import is_value_model, load_model

    out = check_file_out(out_file)
    if out.suffix != ".gguf":
        raise UserError("must end in .gguf: every verb's --model reads a file as GGUF by that "
                        "name", path=out, field="out")
    if out.exists() or out.is_symlink():
        raise UserError("already exists; choose another out (--out) or remove it", path=out,
                        field="out")
    if Path(src).resolve() in out.resolve().parents:  # a file mixed into the model it reads
        raise UserError(f"the output file is inside the model being converted ({src}); "
                        f"choose another out (--out)", path=out, field="out")
    if dtype not in GGUF_DTYPES:  # before the model is read
        raise UserError(f"expects one of {', '.join(GGUF_DTYPES)}, not {dtype!r}",
                        field="dtype")
    if is_value_model(src):
        raise UserError("PPO's value model does not export to GGUF: llama.cpp's llama, qwen2 "
                        "and gpt2 have no scalar head; use the directory itself (gptlab ppo "
                        "--value DIR)", path=src)
    model, tokenizer, _ = load_model(src)
    try:
        return export_gguf(model, tokenizer, out, dtype, name=Path(src).resolve().name)
    except UserError as e:  # a model that does not map: say which one
        raise e.at(src) from None
