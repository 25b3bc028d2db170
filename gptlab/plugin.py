"""A function of the user's, named on the command line as `module:function` (`gptlab ppo
--reward-fn`, `gptlab label --labeler`), imported as `python -m gptlab` would find it."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

from gptlab.errors import UserError, exception_line


def import_from_cwd(name: str) -> Any:
    """Import module `name` as `python -m gptlab` would find it: the console script leaves the
    working directory off sys.path, python -m puts it first. It stays there afterwards, as
    under python -m, so the module's own later imports of its neighbours work too."""
    cwd = os.getcwd()
    if not any(isinstance(p, str) and os.path.abspath(p) == cwd for p in sys.path):
        sys.path.insert(0, cwd)
    return importlib.import_module(name)


def load_function(spec: str, field: str) -> tuple[Any, Callable]:
    """(module, function) of `spec`, `module:function`; a UserError naming `field` (the
    setting it came from) when it has another form, names a file, does not import, or has no
    such callable."""
    mod, _, name = spec.partition(":")
    if not mod or not name:
        raise UserError(f"'{spec}' should look like module:function", field=field)
    if mod.endswith(".py") or "/" in mod or os.sep in mod:
        raise UserError(f"'{spec}' names a file, where a module is meant: "
                        f"{_as_module(mod, name)}", field=field)
    try:
        module = import_from_cwd(mod)
    except (Exception, SystemExit) as e:  # not found, a syntax error, or anything its
        # import raised: a sys.exit(0) there (a script's argparse) ended gptlab in silence
        raise UserError(f"cannot load '{spec}': importing {mod} failed with "
                        f"{exception_line(e)}", field=field) from None
    fn = getattr(module, name, None)
    if fn is None:
        raise UserError(f"cannot load '{spec}': module {mod} has no '{name}'", field=field)
    if not callable(fn):
        raise UserError(f"cannot load '{spec}': {name} is not callable", field=field)
    return module, fn


def _as_module(path: str, name: str) -> str:
    """What to write for function `name` of the file `path`: its dotted module name where it
    lies under the working directory, else its name and where its directory goes."""
    parts = [p for p in Path(path.removesuffix(".py")).parts if p != "."]
    if parts and not Path(path).is_absolute() and all(p.isidentifier() for p in parts):
        return "write " + ".".join(parts) + f":{name}"
    stem = Path(path.removesuffix(".py")).name
    return f"put its directory on PYTHONPATH (or run from there) and write {stem}:{name}"
