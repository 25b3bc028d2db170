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
