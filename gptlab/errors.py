"""Errors a user can act on.

`UserError` is bad input: the CLI prints it and exits with code 2. Anything else that escapes
is an internal error (exit code 1, with a traceback).
"""
from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input from the user: a file, a line, a field, and what was expected."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        self.message, self.path, self.line, self.field = message, path, line, field
        where = []
        if path is not None:
            where.append(str(path) + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)

    def at(self, path: str | Path, line: int | None = None) -> "UserError":
        """The same error located in `path` (and `line`), unless it already names a file."""
        if self.path is not None:
            return self
        return UserError(self.message, path=path, line=line, field=self.field)


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return `path` as a Path, or raise a UserError if it does not exist."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found", path=p)
    return p


def setting(name: str) -> str:
    """A config field named as Python and as the command line write it, for a message that
    either may read: `setting("kl_coef")` is "kl_coef (--kl-coef)"."""
    return f"{name} (--{name.replace('_', '-')})"


def check_given(cfg: object, names: tuple[str, ...], stage: str) -> None:
    """Raise a UserError naming the first of the fields `names` of `cfg` that is unset or
    empty: the paths a stage cannot run without ("" is the current directory, no file)."""
    for name in names:
        value = getattr(cfg, name)
        if value is None or not str(value).strip():
            listed = " and ".join(filter(None, [", ".join(map(setting, names[:-1])),
                                                setting(names[-1])]))
            raise UserError(f"is empty or not given; {stage} needs {listed}", field=name)
