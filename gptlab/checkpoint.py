"""The model directory and training checkpoints.

A model directory is `config.json` (with `"format": "gptlab/1"`, so it is never mistaken for a
Hugging Face directory) + `model.safetensors` + the tokenizer files. Training checkpoints live in
`RUN/checkpoints/step-N/`: each is written in full under a temporary name, its manifest (sha256
of every file) last, then renamed into place; `checkpoints/latest` is replaced atomically after
that. A reader therefore never sees a partial checkpoint, and the previous one stays usable
until the new one is complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model, save_model as st_save_model

from gptlab.errors import UserError
from gptlab.io import atomic_path, write_json_atomic, write_text_atomic

FORMAT = "gptlab/1"
MODEL_FILE = "model.safetensors"


def _arch_registry() -> dict[str, tuple[type, type]]:
    from gptlab.model.gpt import GPT, GPTConfig
    from gptlab.model.heads import ScalarHeadModel
    from gptlab.model.transformer import Transformer, TransformerConfig
    # Order matters for _arch_of: the first matching class names the arch.
    return {"gpt": (GPT, GPTConfig), "scalar": (ScalarHeadModel, GPTConfig),
            "transformer": (Transformer, TransformerConfig)}


def _arch_of(model: torch.nn.Module) -> str:
    for name, (cls, _) in _arch_registry().items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"cannot save a {type(model).__name__}: not a gptlab model")


def save_model(out_dir: str | Path, model: torch.nn.Module, tokenizer: Any = None,
               extra: dict | None = None) -> Path:
    """Write a model directory. Every file is written atomically; config.json goes last, so a
    directory with a config.json has its weights in place."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a directory", path=out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(out)
    with atomic_path(out / MODEL_FILE) as tmp:
        st_save_model(model, str(tmp))
    meta = {"format": FORMAT, "arch": _arch_of(model),
            "model": dataclasses.asdict(model.config), **(extra or {})}
    write_json_atomic(out / "config.json", meta)
    return out


def read_meta(path: str | Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise UserError("not a model directory (config.json is missing)", path=path)
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"config.json is not valid JSON ({e.msg})", path=cfg, line=e.lineno) from None
    return meta


def is_gptlab_dir(path: str | Path) -> bool:
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    try:
        return json.loads((p / "config.json").read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, OSError):
        return False


def build_from_meta(meta: dict, path: str | Path = "config.json") -> torch.nn.Module:
    registry = _arch_registry()
    arch = meta.get("arch")
    if arch not in registry:
        raise UserError(f"unknown arch '{arch}' (known: {', '.join(registry)})", path=path,
                        field="arch")
    model_cls, cfg_cls = registry[arch]
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    fields = meta.get("model", {})
    unknown = set(fields) - names
    if unknown:
        raise UserError(f"unknown model config keys {sorted(unknown)}", path=path, field="model")
    try:
        cfg = cfg_cls(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(str(e), path=path, field="model") from None
    return model_cls(cfg)


def load_weights(model: torch.nn.Module, file: str | Path) -> None:
    file = Path(file)
    if not file.exists():
        raise UserError("model weights are missing", path=file)
    try:
        missing, unexpected = st_load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"cannot read weights (truncated or corrupt file?): {e}", path=file) from None
    if missing or unexpected:
        raise UserError(f"weights do not fit the model: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}", path=file)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any, dict]:
    """Load a gptlab model directory, a Hugging Face directory or a .gguf file.

    Returns (model in eval mode, tokenizer or None, meta dict).
    """
    p = Path(path)
    if not p.exists():
        raise UserError("model not found", path=p)
    if p.is_file() and p.suffix == ".gguf" or (p.is_dir() and not is_gptlab_dir(p)
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
        model = build_from_meta(meta, p / "config.json")
        load_weights(model, p / MODEL_FILE)
        tok = None
        if (p / "tokenizer.json").exists():
            from gptlab.tokenizer import load_tokenizer
            tok = load_tokenizer(p)
    vocab = getattr(model.config, "vocab_size", None)
    if tok is not None and vocab is not None and tok.vocab_size > vocab:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model's embedding has "
                        f"{vocab} rows", path=p, field="vocab_size")
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval(), tok, meta


# --- training checkpoints ----------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Checkpointer:
    """`RUN/checkpoints/step-N/` directories, the `latest` pointer, and the last `keep` kept
    (all of them when `keep` is None)."""

    def __init__(self, run_dir: str | Path, keep: int | None = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = None if keep is None else max(1, keep)

    def save(self, step: int, model: torch.nn.Module, tokenizer: Any = None,
             optimizer: torch.optim.Optimizer | None = None, state: dict | None = None,
             extra: dict | None = None, models: dict[str, torch.nn.Module] | None = None
             ) -> Path:
        """Write checkpoint `step`; `state` is any picklable trainer state (RNG, data position);
        `models` are more model directories inside it, by name (PPO's value model: `value/`)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step}"
        tmp = self.dir / f".step-{step}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(tmp, model, tokenizer, extra)
        for name, other in (models or {}).items():
            save_model(tmp / name, other)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(state or {}, tmp / "trainer.pt")
        manifest = {f.relative_to(tmp).as_posix(): _sha256(f) for f in sorted(tmp.rglob("*"))
                    if f.is_file()}
        write_json_atomic(tmp / "manifest.json", {"step": step, "sha256": manifest})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(self.dir / "latest", final.name + "\n")
        self._prune(final)
        return final

    def _prune(self, newest: Path) -> None:
        if self.keep is None:
            return
        steps = sorted((p for p in self.dir.glob("step-*") if p.is_dir()),
                       key=lambda p: int(p.name.split("-")[1]))
        for old in steps[:-self.keep]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        return path if (path / "manifest.json").exists() else None

    @staticmethod
    def verify(path: str | Path) -> None:
        """Raise UserError if any file of the checkpoint is missing or differs from its sha256."""
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.exists():
            raise UserError("checkpoint is incomplete (no manifest.json)", path=path)
        for name, digest in json.loads(mf.read_text())["sha256"].items():
            f = path / name
            if not f.exists() or _sha256(f) != digest:
                raise UserError("checkpoint file is missing or corrupt", path=f)

    def load(self, path: str | Path, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer | None = None,
             models: dict[str, torch.nn.Module] | None = None) -> dict:
        """Restore weights (those of `models` too, by name, and the optimizer) in place;
        return the trainer state."""
        path = Path(path)
        self.verify(path)
        load_weights(model, path / MODEL_FILE)
        for name, other in (models or {}).items():
            load_weights(other, path / name / MODEL_FILE)
        if optimizer is not None and (path / "optimizer.pt").exists():
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        return torch.load(path / "trainer.pt", weights_only=False)
