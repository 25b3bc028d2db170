"""The one read-only SQL executor, shared by the world's checker and the chat assistant.

Three independent guards, because a model's SQL is untrusted: the file is opened read-only
(`mode=ro`), an authorizer refuses anything but reads, and a progress handler aborts a query
that runs past its time limit. A row limit and a limit on the length of any one value keep a
huge result (many rows, or `zeroblob(10**9)`) from filling memory.
"""
from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gptlab.errors import UserError

# Actions a read-only query needs. RECURSIVE is a read too; the time limit is what stops a
# recursive CTE that never ends.
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
# PRAGMAs that only describe the schema (their argument is a table name); every other PRAGMA
# is refused, since most of them can also change settings (`PRAGMA journal_mode = WAL`).
_READ_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info",
                 "foreign_key_list"}
# Reading a PRAGMA as a table (`SELECT name FROM pragma_table_info('employees')`) makes SQLite
# ask, while it prepares the statement, to update the schema table's columns. Nothing is
# written: the connection is read-only, and SQLite refuses a real UPDATE of the schema table
# unless `PRAGMA writable_schema`, which is refused here.
_SCHEMA_TABLES = {"sqlite_master", "sqlite_schema"}
_PROGRESS_EVERY = 100  # SQLite virtual-machine instructions between deadline checks
# The longest string or blob a query may make or read, in bytes. One value can be built in a
# single instruction, which the deadline never interrupts, and some functions take time
# quadratic in their arguments' length (`replace`, `instr`): at this length one call takes
# under 0.1 s, and a query built of such calls overran a 1 s limit by about 1 s on a loaded
# 2-core machine (at 1 MB and 1,000 instructions between checks, one call took 5 s and a query
# ran 55 s and returned rows). Checking every 100 instructions costs about a fifth more time
# on a large join. The world's longest value is a few dozen bytes.
MAX_VALUE_BYTES = 100_000


@dataclass(frozen=True)
class ExecError:
    """Why a query gave no result: kind is syntax / forbidden / timeout / runtime."""
    kind: str
    message: str


@dataclass
class QueryResult:
    columns: list[str] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)
    truncated: bool = False  # more rows existed than the row limit
    error: ExecError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class SqlExecutor:
    """Run one SELECT at a time against a SQLite file, read-only, with time and row limits."""

    def __init__(self, db_path: str | Path, time_limit_s: float = 1.0, max_rows: int = 1000):
        self.db_path = Path(db_path)
        if not self.db_path.is_file():
            raise UserError("database file not found", path=self.db_path)
        self.time_limit_s, self.max_rows = time_limit_s, max_rows
        uri = self.db_path.resolve().as_uri() + "?mode=ro"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        if hasattr(self._conn, "setlimit"):  # Python 3.11+; on 3.10 only the row limit holds
            self._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        self._conn.set_authorizer(_authorize)
        self._lock = threading.Lock()  # one connection, so one query at a time
        self._deadline = 0.0
        self._interrupted = False
        self._conn.set_progress_handler(self._past_deadline, _PROGRESS_EVERY)

    def _past_deadline(self) -> int:
        return 1 if self._interrupted or time.monotonic() > self._deadline else 0

    @contextlib.contextmanager
    def _ctrl_c_after_the_query(self) -> Iterator[None]:
        """Python raises a Ctrl-C at the next Python code it runs, which during a query is this
        progress handler, inside SQLite: the sqlite3 module swallows the exception there and
        the query reads as timed out. So while a query runs (in the main thread, under
        Python's own handler) a Ctrl-C only stops it, and is raised once SQLite has returned."""
        self._interrupted = False
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield
            return

        def stop(signum: int, frame: Any) -> None:
            self._interrupted = True
        signal.signal(signal.SIGINT, stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self._interrupted:
            raise KeyboardInterrupt

    def run(self, sql: str) -> QueryResult:
        with self._lock, self._ctrl_c_after_the_query():
            self._deadline = time.monotonic() + self.time_limit_s
            try:
                cur = self._conn.execute(sql)
                if cur.description is None:  # empty text or only a comment: no query at all
                    cur.close()
                    return QueryResult(error=ExecError("syntax", "no SQL statement to run"))
                rows = cur.fetchmany(self.max_rows + 1)
                columns = [d[0] for d in cur.description]
                cur.close()
            except sqlite3.Error as e:
                if self._interrupted:  # stopped by a Ctrl-C, raised on the way out
                    return QueryResult(error=ExecError("interrupted", str(e)))
                return QueryResult(error=_classify(e))
            except (ValueError, OverflowError) as e:  # e.g. a NUL character in the text
                return QueryResult(error=ExecError("syntax", str(e)))
        truncated = len(rows) > self.max_rows
        return QueryResult(columns=columns, rows=rows[: self.max_rows], truncated=truncated)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "SqlExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _authorize(action: int, arg1: str | None, arg2: str | None, db: str | None,
               trigger: str | None) -> int:
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_UPDATE and (arg1 or "").lower() in _SCHEMA_TABLES:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _classify(e: sqlite3.Error) -> ExecError:
    msg = str(e)
    if "interrupted" in msg:
        return ExecError("timeout", "query stopped: it ran past the time limit")
    if ("not authorized" in msg or "authorization denied" in msg or "readonly" in msg
            or "may not be modified" in msg):
        return ExecError("forbidden", "only read-only SELECT queries are allowed")
    if "too big" in msg:
        return ExecError("runtime", f"a value longer than {MAX_VALUE_BYTES} bytes: {msg}")
    if ("syntax error" in msg or "incomplete input" in msg or "one statement" in msg
            or "null character" in msg):
        return ExecError("syntax", msg)
    return ExecError("runtime", msg)
