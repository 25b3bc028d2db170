"""gptlab: the recipe behind ChatGPT, from the Transformer up.

The Python API mirrors the command line: `gptlab.api` (load, generate_text), the stages in
`gptlab.train` (pretrain, sft, train_reward_model, ppo, pipeline), the built-in world in
`gptlab.world`, and Hugging Face / GGUF interop in `gptlab.interop`. `import gptlab` loads
none of them (nor torch): each subpackage is imported when first named, `gptlab.api` too.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__version__ = "0.1.0"

# Every module and subpackage of the package, found by name (no import): one added is reached
# as `gptlab.NAME` without a list here to keep up (`stop_strings` and `devices` were missed).
_SUBMODULES = tuple(m.name for m in pkgutil.iter_modules(__path__) if m.name != "__main__")


def __getattr__(name: str) -> ModuleType:
    """`gptlab.api` and the other subpackages, imported on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])
