"""Errors a user can act on.

`UserError` is bad input: the CLI prints it and exits with code 2. `NotFound`, a UserError, is
a path given that does not exist, and `WrongKind` one that is there but not the kind of thing
read there (a directory for a file, a file or another stage's model for a model): the CLI names
each with the flag that gave it. `PathError`, a
UserError and an OSError, is a file a stage could not write or make where the user pointed it (a
full disk, no permission, a name too long). Anything else that escapes is an internal error
(exit code 1, with a traceback).
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Mapping, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# The user's to fix: no room, no right to write there, or a name longer than the file system
# takes (a path pasted into --out twice, say).
USERS_TO_FIX = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENAMETOOLONG}
# Also the user's, when they befall a path the user gave: a directory that cannot be made there
# (under /proc, a file system that has no such entries), a file where a directory should be.
USERS_WHERE_GIVEN = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


class UserError(Exception):
    """Bad input from the user: a file, a line (and column), a field, and what was expected."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None, column: int | None = None):
        self.message, self.path, self.line, self.field = message, path, line, field
        self.column = column
        where = []
        if path is not None:
            where.append(str(path) + (f":{line}" if line is not None else "")
                         + (f":{column}" if line is not None and column is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)

    def at(self, path: str | Path, line: int | None = None) -> "UserError":
        """The same error located in `path` (and `line`), unless it already names a file."""
        if self.path is not None:
            return self
        return UserError(self.message, path=path, line=line, field=self.field)


class NotFound(UserError):
    """A path the user gave that does not exist: the command line names the flag that gave it."""


class WrongKind(UserError):
    """A path the user gave, or a file in the directory given, that is there but not the kind
    of thing read there (a directory for a file, a directory that is no model, a reward model
    for a language model): the command line names the flag that gave it, as for `NotFound`,
    since the mistake is which path went to which flag, not what the file holds."""


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return `path` as a Path, or raise NotFound if it does not exist."""
    p = Path(path)
    if not p.exists():
        raise NotFound(f"{what} not found", path=p)
    return p


def setting(name: str) -> str:
    """A config field named as Python and as the command line write it, for a message that
    either may read: `setting("kl_coef")` is "kl_coef (--kl-coef)"."""
    return f"{name} (--{name.replace('_', '-')})"


def counted(n: int, noun: str) -> str:
    """`n` and `noun` agreeing in number, for a message: "1 prompt", "2 prompts" (`noun` the
    singular, whose plural adds an s)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def kind_of(x: Any) -> str:
    """What a value is, in a message: 'None', 'a bool', 'an ndarray'."""
    if x is None:
        return "None"
    kind = type(x).__name__
    vowel = kind[0] in "aeiou" or kind == "ndarray"  # said "en-dee-array"
    return f"{'an' if vowel else 'a'} {kind}"


def exception_line(e: BaseException) -> str:
    """`e` as one line of a message, its type and its text: "ValueError: no reference answer".
    The text of a user's exception may hold line breaks; the line would stop at the first."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def check_bool(value: Any, field: str, path: str | Path | None = None) -> bool:
    """`value` if it is true or false, else a UserError naming `path` and `field`: a string
    ("no", "false") is truthy, and would be read as true."""
    if not isinstance(value, bool):
        raise UserError(f"must be true or false, got {value!r}", path=path, field=field)
    return value


def check_given(cfg: object, names: tuple[str, ...], stage: str) -> None:
    """Raise a UserError naming the first of the fields `names` of `cfg` that is unset or
    empty: the paths a stage cannot run without ("" is the current directory, no file)."""
    for name in names:
        value = getattr(cfg, name)
        if value is None or not str(value).strip():
            listed = " and ".join(filter(None, [", ".join(map(setting, names[:-1])),
                                                setting(names[-1])]))
            raise UserError(f"is empty or not given; {stage} needs {listed}", field=name)


class PathError(UserError, OSError):
    """An OSError the user can fix, met at a path they gave: `str()` names the file and the
    field (or flag) it came from; `errno`, `strerror` and `filename` are the OSError's, so an
    `except OSError` still catches it (`PathError.of`: an `except PermissionError` too)."""

    def __init__(self, error: OSError, field: str | None):
        super().__init__(error.strerror or str(error), path=error.filename or "a file",
                         field=field)
        self.errno, self.strerror = error.errno, error.strerror
        self.filename, self.filename2 = error.filename, error.filename2

    @staticmethod
    def of(error: OSError, field: str | None) -> PathError:
        """`error` as a PathError that is also the OSError subclass Python raises for its
        errno (PermissionError, FileNotFoundError, ...), as `error` itself was."""
        return _path_error_class(error.errno)(error, field)

    def __str__(self) -> str:  # UserError's line, not OSError's "[Errno 28] ..."
        return self.args[0]

    def __reduce__(self) -> tuple:
        # Rebuilt from the OSError's parts: the default, `cls(*args)`, would call
        # `PathError(message)` (pickled across processes, copied).
        return _rebuilt_path_error, (self.errno, self.strerror, self.filename, self.filename2,
                                     self.field)


@functools.cache
def _path_error_class(code: int | None) -> type[PathError]:
    kind = type(OSError(code, "")) if isinstance(code, int) else OSError
    if kind is OSError:
        return PathError
    return type(PathError.__name__, (PathError, kind), {"__module__": __name__,
                                                         "__qualname__": PathError.__qualname__})


def _rebuilt_path_error(code: int | None, strerror: str | None, filename: Any,
                        filename2: Any, field: str | None) -> PathError:
    return PathError.of(OSError(code, strerror, filename, None, filename2), field)


def field_of_path(filename: object, given: Mapping[str, Any], writer: str,
                  parents: bool = True) -> str | None:
    """The name in `given` (name -> a path, a list of paths, or anything else) whose path
    `filename` is, else the one whose path it lies deepest in, else one whose path it is a
    parent of (made on the way to it, `writer`'s first); None if none. (A writer's temporary is
    reported as the file it writes: io.py.) The current directory and those above it are no
    name's parent: every relative value (`device="cpu"` too) lies in them. Without `parents`,
    a name whose path lies in `filename` is none."""
    if not isinstance(filename, (str, os.PathLike)):
        return None
    try:
        here = os.getcwd()
    except OSError:  # the current directory was removed: no relative path is anywhere
        return None
    failed = os.path.abspath(filename)
    above_here = failed == here or here.startswith(failed.rstrip(os.sep) + os.sep)
    inside, parent_of = [], []
    for name, values in given.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
                continue
            path = os.path.abspath(value)
            if failed == path:
                return name
            if failed.startswith(path.rstrip(os.sep) + os.sep):
                inside.append((len(path), name))
            elif not above_here and path.startswith(failed.rstrip(os.sep) + os.sep):
                parent_of.append(name)
    if inside:
        return max(inside, key=lambda x: x[0])[1]  # the deepest: out runs/a in model runs
    # Only a writer makes directories on the way: `writer`'s, where another's is there too.
    return min(parent_of, key=lambda name: name != writer) if parent_of and parents else None


def path_error(error: OSError, given: Mapping[str, Any], writer: str = "out") -> PathError | None:
    """`error` as a PathError naming the name in `given` its file came from (see
    `field_of_path`), if it is the user's to fix; None if it is not (an internal error)."""
    field = field_of_path(error.filename, given, writer)
    if error.errno in USERS_TO_FIX or (field and error.errno in USERS_WHERE_GIVEN):
        return PathError.of(error, field)
    return None


def reports_path_errors(stage: Callable[P, R]) -> Callable[P, R]:
    """Make `stage` raise a PathError for an OSError the user can fix, naming the argument, or
    the field of a config argument, whose path the failed file is (or lies in): what the
    command line prints. Other OSErrors pass through unchanged."""
    signature = inspect.signature(stage)

    def given(args: tuple, kwargs: dict, configs_only: bool = False) -> dict[str, Any]:
        given: dict[str, Any] = {}
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                given.update({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
            elif not configs_only:
                given[name] = value
        return given

    @functools.wraps(stage)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return stage(*args, **kwargs)
        except (NotFound, WrongKind) as e:
            # An input not there, or of the wrong kind, named by the config field that gave it
            # (the command line then names that field's flag): the path alone said which.
            if e.field is not None or e.line is not None or e.path is None:
                raise
            field = input_field_of(e, given(args, kwargs, configs_only=True))
            if field is None:
                raise
            raise type(e)(e.message, path=e.path, field=field) from e.__cause__
        except OSError as e:
            error = path_error(e, given(args, kwargs))
            if error is None or (isinstance(e, PathError) and error.field is None):
                raise  # not the user's, or named already by the stage this one called
            raise error from e
    return run


def input_field_of(error: UserError, given: Mapping[str, Any]) -> str | None:
    """The input field in `given` (name -> a path or a list of paths; `out`, written, is no
    input) that gave the path of `error`, a `NotFound` or `WrongKind`: the one whose path it
    is, or, for one of the wrong kind, the one whose directory it lies deepest in
    (`model="runs/sft"` for runs/sft/config.json). A path not found is named only where it was
    given: a stage looks for many files in a directory given."""
    inputs = {name: value for name, value in given.items() if name != "out"}
    field = field_of_path(error.path, inputs, writer="", parents=False)
    if field is None or isinstance(error, WrongKind):
        return field
    failed = os.path.abspath(error.path)
    values = inputs[field]
    return field if any(isinstance(v, (str, os.PathLike)) and os.path.abspath(v) == failed
                        for v in (values if isinstance(values, (list, tuple)) else [values])
                        ) else None
