"""gptlab: the recipe behind ChatGPT, from the Transformer up.

The Python API mirrors the command line: `gptlab.api` (load, generate_text), the stages in
`gptlab.train` (pretrain, sft, train_reward_model, ppo, pipeline), the built-in world in
`gptlab.world`, and Hugging Face / GGUF interop in `gptlab.interop`. `import gptlab` loads
none of them (nor torch): each subpackage is imported when first named, `gptlab.api` too.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

_SUBMODULES = ("api", "chat", "checkpoint", "config", "data", "engine", "errors", "eval",
               "feedback", "interop", "io", "model", "plugin", "provenance", "tokenizer", "train",
               "world")


def __getattr__(name: str) -> ModuleType:
    """`gptlab.api` and the other subpackages, imported on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])
