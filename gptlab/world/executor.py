"""The one read-only SQL executor, shared by the world's checker and the chat assistant.

Independent guards, because a model's SQL is untrusted: the file is opened read-only
(`mode=ro`), an authorizer refuses anything but reads, and a progress handler stops a query
that runs past its budget of SQLite virtual-machine steps. A row limit, a limit on the bytes of
a whole result, and limits on the length of any one value and on the number of columns keep a
huge result (many rows, or `zeroblob(10**9)`) from filling memory. What a query holds while it
runs (the rows an ORDER BY, a DISTINCT or a UNION keeps) stays in memory, not in temporary
files, under a cap on SQLite's heap, so it can fill neither the disk nor the memory. That cap
is SQLite's for the whole process: it is set while a query runs, `MAX_HEAP_BYTES` above what the
heap holds as the query begins (the program's own databases are not the query's), and put back
as it was after, also in a child process forked meanwhile (`_HeapLimit`, which reaches SQLite's
`sqlite3_hard_heap_limit64` through ctypes), so the program's other SQLite connections are held
to it only meanwhile. Where ctypes cannot reach it, a PRAGMA lowers the limit for good.

The budget counts steps, not seconds, so that whether a slow query is stopped does not depend
on the machine or its load: evaluation numbers and the labelers' rankings compare across runs
and machines. A wall-clock backstop, far above the time the budget takes, stops a query whose
every step is slow (each one building a 100 kB value), which the step budget would let run for
many minutes.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gptlab.errors import NotFound, UserError

# Actions a read-only query needs. RECURSIVE is a read too; the step budget is what stops a
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
# The step budget: SQLite virtual-machine instructions one query may run (its preparation and
# every row fetched), counted by the progress handler in its units of 100. Every gold SQL of
# seed 0 (its 2,313 questions' and dialogs' queries, with and without a varied schema) needs at
# most 3,500 on the company and on every variant database, and so did every answer in the demo
# run: the budget leaves a margin of over 5,000x. A runaway query (a recursive CTE that never
# ends, a cartesian join, a GROUP BY over one) stops after 0.25 to 1.3 s on a 2-core machine at
# a load of 3 (16 to 80 million such steps a second), 0.3 to 2.3 s at a load of 5: about the
# 1 s the limit used to be in time. A COUNT(DISTINCT ...) of text over a cartesian join, each
# step a B-tree insert, stopped after 2.7 to 4.7 s at a load of 2.
MAX_VM_STEPS = 20_000_000
# SQLite virtual-machine instructions between two calls of the handler: often, for the backstop's
# sake (checking every 100 costs about a fifth more time on a large join than every 1,000).
_PROGRESS_EVERY = 100
# The wall-clock backstop, in seconds. A step may be slow: building a 100 kB value takes
# thousands of times longer than adding two numbers, and a join of such values ran at 4,000
# steps a second, where the budget would take over an hour. A query of ordinary steps reaches
# the budget at least 13 times sooner than the backstop even at a load of 5 on 2 cores, so only
# one whose average step is that much slower stops here: one that builds or searches values of
# kilobytes in every step, which no answer over the world's values (a few dozen bytes) does.
# The handler checks the clock between steps, so a single slow step is bounded by the value
# length limit below, not by the backstop.
BACKSTOP_S = 30.0
# The longest string or blob a query may make or read, in bytes. One value can be built in a
# single instruction, which no handler interrupts, and some functions take time quadratic in
# their arguments' length (`replace`, `instr`): at this length one call takes under 0.1 s (at
# 1 MB, one call took 5 s). The world's longest value is a few dozen bytes.
MAX_VALUE_BYTES = 100_000
# At most this many columns in a result (or a table, view or GROUP BY), and this many bytes in
# the rows a query returns (text and blobs by their length, numbers 8 bytes): 1,000 rows of
# 2,000 columns of 100 kB would have been 200 GB held in memory. A 4-table `SELECT *` of the
# world has 18 columns, and its largest result a few dozen kB.
MAX_COLUMNS = 100
MAX_RESULT_BYTES = 10_000_000
# The most memory a query may take in SQLite's heap, in bytes, above what the heap held when
# it began: the rows a query sorts, deduplicates or keeps for a window or a recursive UNION
# (each under the value limit) live there, and past this the query stops as out of memory.
# Before, they went to temporary files: an ORDER BY of 80 kB values wrote 7 GB to /tmp before
# the backstop stopped it. SQLite's heap limit is one for the whole process, so it holds only
# while a query runs, and on top of what the program's own databases hold (see `_HeapLimit`).
MAX_HEAP_BYTES = 256 * 2**20
# A printf conversion (`%c`, `%d`, `%f`, ...): its width and precision, each digits or `*` (the
# next argument), then the conversion character. SQLite's `printf('%.*c', 2**31 - 1, 'x')`
# repeats the character in one step, for 15 s, whatever the value limit (its result then reads
# as NULL), so a width or a precision past the value limit is refused before SQLite sees it.
_PRINTF_SPEC = re.compile(r"%[-+ #0!,]*(\*|\d*)(?:\.(\*|\d*))?l{0,2}(.)", re.DOTALL)
# Conversions whose precision is a maximum (of characters taken), not a length to fill.
_PRECISION_IS_A_MAXIMUM = set("sSzqQwT")


@dataclass(frozen=True)
class ExecError:
    """Why a query gave no result: kind is syntax / forbidden / timeout (past the step budget or
    the wall-clock backstop) / runtime / interrupted (a Ctrl-C, raised once SQLite returns)."""
    kind: str
    message: str


@dataclass
class QueryResult:
    """The columns and rows a query returned (at most the row limit), or its error."""

    columns: list[str] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)
    truncated: bool = False  # more rows existed than the row limit
    error: ExecError | None = None
    # Virtual-machine steps the query ran, in the handler's units (a multiple of 100, counted
    # as the budget counts them): the same for the same query on the same database anywhere.
    steps: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


class SqlExecutor:
    """Run one SELECT at a time against a SQLite file, read-only, within a budget of SQLite
    virtual-machine steps (`max_vm_steps`), a wall-clock backstop (`backstop_s`) and a row
    limit."""

    def __init__(self, db_path: str | Path, max_vm_steps: int = MAX_VM_STEPS,
                 max_rows: int = 1000, backstop_s: float = BACKSTOP_S):
        self.db_path = Path(db_path)
        if not self.db_path.is_file():
            raise NotFound("database file not found", path=self.db_path)
        for name, v in (("max_vm_steps", max_vm_steps), ("max_rows", max_rows)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"must be a positive integer, got {v!r}", field=name)
        if (not isinstance(backstop_s, (int, float)) or isinstance(backstop_s, bool)
                or not backstop_s >= 0):
            raise UserError(f"must be a number of seconds >= 0, got {backstop_s!r}",
                            field="backstop_s")
        self.max_vm_steps, self.max_rows, self.backstop_s = max_vm_steps, max_rows, backstop_s
        uri = self.db_path.resolve().as_uri() + "?mode=ro"
        # No statement cache: a cached statement carries its step count from one run into the
        # next, which moves where the handler is first called, so the steps counted for the
        # same text would depend on what ran before it.
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False,
                                     cached_statements=0)
        # printf and format, with the width and precision checked, computed by SQLite's own
        # printf on a second connection with the same value limit.
        self._printf_conn = sqlite3.connect(":memory:", check_same_thread=False)
        for conn in (self._conn, self._printf_conn):
            if hasattr(conn, "setlimit"):  # Python 3.11+; on 3.10 only the row limits hold
                conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
                conn.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, MAX_COLUMNS)
        self._conn.execute("PRAGMA temp_store = MEMORY")
        if not _HEAP_LIMIT.scoped:  # only a PRAGMA reaches the limit: lowered for good
            self._conn.execute(f"PRAGMA hard_heap_limit = {MAX_HEAP_BYTES}")
        for name in ("printf", "format"):
            self._conn.create_function(name, -1, self._printf, deterministic=True)
        self._too_long = ""  # why a printf of the query running was refused
        self._conn.set_authorizer(_authorize)
        self._lock = threading.Lock()  # one connection, so one query at a time
        self._calls = 0  # progress-handler calls of the query running
        self._deadline = 0.0  # the backstop's
        self._interrupted = False
        self._conn.set_progress_handler(self._past_budget, _PROGRESS_EVERY)

    def _past_budget(self) -> int:
        self._calls += 1
        return 1 if (self._interrupted or self._calls * _PROGRESS_EVERY > self.max_vm_steps
                     or time.monotonic() > self._deadline) else 0

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

    def _printf(self, fmt: Any, *args: Any) -> str | None:
        """SQLite's printf(fmt, args...), refused (raising, which fails the query) when one
        conversion's width or precision (digits, or `*` and its argument) passes the value
        limit; the arguments are numbered as SQLite numbers them ('%%' and '%n' take none)."""
        if fmt is None:
            return None
        text = fmt.decode("utf-8", "replace") if isinstance(fmt, bytes) else str(fmt)
        i = 0  # the next argument
        for width, precision, conversion in _PRINTF_SPEC.findall(text):
            sizes = []
            for part in (width, precision):
                if part == "*":
                    sizes.append(abs(self._printf_conn.execute(  # as SQLite reads it
                        "SELECT CAST(? AS INTEGER)", (args[i] if i < len(args) else 0,)
                    ).fetchone()[0]))
                    i += 1
                elif part:
                    sizes.append(int(part[:12]) if len(part) <= 12 else MAX_VALUE_BYTES + 1)
                else:
                    sizes.append(0)
            if conversion in _PRECISION_IS_A_MAXIMUM:
                sizes[1] = 0
            if max(sizes) > MAX_VALUE_BYTES:
                self._too_long = (f"a value longer than {MAX_VALUE_BYTES} bytes: a printf width "
                                  f"or precision of {max(sizes)}")
                raise OverflowError(self._too_long)
            if conversion not in "%n":
                i += 1
        marks = ", ".join("?" * (1 + len(args)))
        return self._printf_conn.execute(f"SELECT printf({marks})", (fmt, *args)).fetchone()[0]

    def run(self, sql: str) -> QueryResult:
        """Run one read-only statement under the time and row limits; errors are returned,
        not raised."""
        with self._lock, self._ctrl_c_after_the_query(), _HEAP_LIMIT.held() as heap_room:
            self._calls = 0
            self._too_long = ""
            self._deadline = time.monotonic() + self.backstop_s
            try:
                cur = self._conn.execute(sql)
                if cur.description is None:  # no result columns: no query
                    cur.close()
                    if _SQL_COMMENT.sub("", sql).strip(" \t\n\r\f;"):
                        # A statement that returns nothing (REINDEX, which the read-only
                        # connection lets through doing nothing): not a query either.
                        return QueryResult(error=ExecError(
                            "forbidden", "only read-only SELECT queries are allowed"))
                    return QueryResult(error=ExecError("syntax", "no SQL statement to run"))
                columns = [d[0] for d in cur.description]
                rows, size = [], 0
                for row in cur:  # one at a time, to stop at the row or the byte limit
                    size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)
                    if size > MAX_RESULT_BYTES:
                        cur.close()
                        return QueryResult(error=ExecError(
                            "runtime", f"the result is larger than {MAX_RESULT_BYTES} bytes"),
                            steps=self._steps())
                    rows.append(row)
                    if len(rows) > self.max_rows:
                        break
                cur.close()
            except sqlite3.Error as e:
                if self._interrupted:  # stopped by a Ctrl-C, raised on the way out
                    return QueryResult(error=ExecError("interrupted", str(e)),
                                       steps=self._steps())
                if self._too_long:  # a printf refused, which SQLite reports as an exception
                    return QueryResult(error=ExecError("runtime", self._too_long),
                                       steps=self._steps())
                return QueryResult(error=self._classify(e), steps=self._steps())
            except MemoryError:  # past the heap limit: SQLite's "out of memory"
                return QueryResult(error=ExecError(
                    "runtime", f"the query needs more than {_megabytes(heap_room)} of "
                               f"memory"), steps=self._steps())
            except (ValueError, OverflowError) as e:  # e.g. a NUL character in the text
                return QueryResult(error=ExecError("syntax", str(e)), steps=self._steps())
        truncated = len(rows) > self.max_rows
        return QueryResult(columns=columns, rows=rows[: self.max_rows], truncated=truncated,
                           steps=self._steps())

    def _steps(self) -> int:
        return self._calls * _PROGRESS_EVERY

    def _classify(self, e: sqlite3.Error) -> ExecError:
        if "interrupted" in str(e):
            if self._calls * _PROGRESS_EVERY > self.max_vm_steps:
                return ExecError("timeout", f"query stopped: it ran past the budget of "
                                            f"{self.max_vm_steps} SQLite steps")
            return ExecError("timeout", f"query stopped: it ran past the wall-clock backstop "
                                        f"of {self.backstop_s:g} s")
        return _classify(e)

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()
        self._printf_conn.close()

    def __enter__(self) -> "SqlExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _megabytes(n: int) -> str:
    return f"{n // 2**20} MB" if n >= 2**20 else f"{n} bytes"


class _HeapLimit:
    """SQLite's hard heap limit, which is one for the whole process, held `MAX_HEAP_BYTES`
    above what SQLite's heap held when the query began (`sqlite3_memory_used`: the program's
    own databases, whose memory is not the query's), or at a lower limit the program has set,
    only while some executor runs a query, then put back as it was, with the soft heap limit
    that setting it lowers too. A PRAGMA can only lower the limit; putting it back takes
    SQLite's own `sqlite3_hard_heap_limit64`, reached with ctypes in the library the sqlite3
    module runs on. Where that cannot be reached (`scoped` false), each executor lowers it to
    `MAX_HEAP_BYTES` with the PRAGMA, for the rest of the process, counting all of it."""

    def __init__(self) -> None:
        self._hard, self._soft, self._used = _heap_limit_functions()
        self.scoped = self._hard is not None
        self._lock = threading.Lock()
        self._queries = 0  # running now, in every executor of the process
        self._saved = (0, 0)  # the hard and soft limits before the first of them
        self._limit = 0
        self._room = 0  # what the queries may hold together under the limit
        if self.scoped and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        """In a child process only the thread that forked runs: the queries other threads
        were running are not, so the limit they set is put back (no query of the child's
        would ever do it), and a lock one of them held, which no thread would release, is a
        new one."""
        self._lock = threading.Lock()
        if self._queries:
            self._queries = 0
            self._hard(self._saved[0])
            self._soft(self._saved[1])

    @contextlib.contextmanager
    def held(self) -> Iterator[int]:
        """Hold the limit while the block runs (and any other executor's query that overlaps
        it); yields the bytes the queries may hold under it."""
        if not self.scoped:
            yield MAX_HEAP_BYTES
            return
        with self._lock:
            if self._queries == 0:
                self._saved = (self._hard(-1), self._soft(-1))  # -1 reads, changing nothing
                hard = self._saved[0]
                used = self._used()
                self._limit = min(hard, used + MAX_HEAP_BYTES) if hard > 0 \
                    else used + MAX_HEAP_BYTES
                self._room = max(self._limit - used, 0)
                self._hard(self._limit)
            self._queries += 1
            room = self._room
        try:
            yield room
        finally:
            with self._lock:
                self._queries -= 1
                if self._queries == 0:
                    self._hard(self._saved[0])  # first: it would lower the soft limit again
                    self._soft(self._saved[1])


def _heap_limit_functions() -> tuple[Any, Any, Any]:
    """`sqlite3_hard_heap_limit64`, `sqlite3_soft_heap_limit64` and `sqlite3_memory_used` of
    the SQLite library the sqlite3 module uses (checked: what the first sets, that module's
    PRAGMA reads), or Nones."""
    import _sqlite3
    names = [getattr(_sqlite3, "__file__", None), ctypes.util.find_library("sqlite3")]
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
            hard, soft = lib.sqlite3_hard_heap_limit64, lib.sqlite3_soft_heap_limit64
            used = lib.sqlite3_memory_used
        except (OSError, AttributeError):
            continue
        for f in (hard, soft):
            f.restype, f.argtypes = ctypes.c_int64, [ctypes.c_int64]
        used.restype, used.argtypes = ctypes.c_int64, []
        probe = sqlite3.connect(":memory:")
        try:
            saved = (hard(-1), soft(-1))
            trial = saved[0] - 1 if saved[0] > 1 else 2**62
            hard(trial)
            same = probe.execute("PRAGMA hard_heap_limit").fetchone()[0] == trial
            hard(saved[0])
            soft(saved[1])
        finally:
            probe.close()
        if same:
            return hard, soft, used
    return None, None, None


_HEAP_LIMIT = _HeapLimit()


# SQL's comments: what is left of a text without them is its statements.
_SQL_COMMENT = re.compile(r"--[^\n]*|/\*.*?(\*/|$)", re.DOTALL)


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
    if ("not authorized" in msg or "authorization denied" in msg or "readonly" in msg
            or "may not be modified" in msg):
        return ExecError("forbidden", "only read-only SELECT queries are allowed")
    if "too big" in msg:
        return ExecError("runtime", f"a value longer than {MAX_VALUE_BYTES} bytes: {msg}")
    if ("syntax error" in msg or "incomplete input" in msg or "one statement" in msg
            or "null character" in msg):
        return ExecError("syntax", msg)
    return ExecError("runtime", msg)

