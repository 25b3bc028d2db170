"""Execution checking: a predicted query is correct when it returns the gold query's result.

Rows are compared as a multiset unless the gold query orders its output (top-level ORDER BY);
integers exactly, other numbers within a relative 1e-9 (AVG computed two ways differs in the
last bits; a truncated or rounded average does not pass); column names are ignored (`COUNT(*)`
and `COUNT(id) AS n` are the same answer), and so is the order of the columns: `SELECT salary,
name` answers "the names and salaries" as well as `SELECT name, salary` (as in the test-suite
evaluation of Spider, Zhong et al. 2020).
"""
from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from gptlab.errors import UserError, counted
from gptlab.world.executor import QueryResult, SqlExecutor

CORRECT, WRONG, ERROR = "correct", "wrong", "error"
_REL_TOL, _ABS_TOL = 1e-9, 1e-12


@dataclass(frozen=True)
class Verdict:
    """An answer judged against the gold SQL: `kind` correct, wrong or error, and why."""

    kind: str  # correct / wrong / error
    detail: str = ""

    @property
    def correct(self) -> bool:
        return self.kind == CORRECT


def check(pred_sql: str, gold_sql: str, executor: SqlExecutor,
          gold: QueryResult | None = None) -> Verdict:
    """Run both queries and compare results; pass `gold` to reuse an earlier gold result."""
    gold = gold if gold is not None else executor.run(gold_sql)
    if not gold.ok:
        raise UserError(f"gold SQL does not run ({gold.error.message}): {gold_sql}")
    pred = executor.run(pred_sql)
    return compare(pred, gold, ordered=has_top_level_order_by(gold_sql))


def compare(pred: QueryResult, gold: QueryResult, ordered: bool) -> Verdict:
    if not pred.ok:
        return Verdict(ERROR, f"{pred.error.kind}: {pred.error.message}")
    if pred.truncated:
        return Verdict(WRONG, "returned more rows than the row limit")
    if pred.columns and gold.columns and len(pred.columns) != len(gold.columns):
        return Verdict(WRONG, f"{len(pred.columns)} columns, expected {len(gold.columns)}")
    if len(pred.rows) != len(gold.rows):
        return Verdict(WRONG, f"{counted(len(pred.rows), 'row')}, expected {len(gold.rows)}")
    difference = _difference(pred.rows, gold.rows, ordered)
    if difference is None:
        return Verdict(CORRECT, f"{counted(len(gold.rows), 'row')} "
                                f"{'matches' if len(gold.rows) == 1 else 'match'}")
    for order in _other_column_orders(pred.rows, gold.rows):
        if _difference([tuple(r[j] for j in order) for r in pred.rows], gold.rows,
                       ordered) is None:
            return Verdict(CORRECT, f"{counted(len(gold.rows), 'row')} "
                                    f"{'matches' if len(gold.rows) == 1 else 'match'}, columns "
                                    f"in another order")
    return Verdict(WRONG, difference)


def _difference(a: list[tuple], b: list[tuple], ordered: bool) -> str | None:
    """None when the rows are equal (as a multiset unless `ordered`), else where they differ."""
    if not ordered:
        (a, exact_a), (b, exact_b) = _sorted_rows(a), _sorted_rows(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if not _rows_equal(x, y):
            if not ordered and _pair_up(a, exact_a, b, exact_b):
                return None
            where = f"row {i + 1}" if ordered else "rows"
            return f"{where} differ: got {x!r}, expected {y!r}"
    return None


def _sorted_rows(rows: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """`rows` sorted by `_row_key`, and the exact parts of their keys (each key made once)."""
    keys = [_row_key(r) for r in rows]
    order = sorted(range(len(rows)), key=keys.__getitem__)
    return [rows[i] for i in order], [keys[i][0] for i in order]


def _pair_up(a: list[tuple], exact_a: list[tuple], b: list[tuple], exact_b: list[tuple]) -> bool:
    """Whether the rows of `a` pair one to one with equal rows of `b` (both sorted by _row_key,
    `exact_*` their keys' exact parts, as many of each): the sorted rows side by side need not
    be the pairs when numbers within the tolerance sort apart (two columns of near-equal
    numbers, in other orders). Rows pair only within a run of the same exact parts; there, by
    augmenting paths (see `_perfect_matching`), so a pairing is found whenever one exists."""
    runs_a, runs_b = _runs(a, exact_a), _runs(b, exact_b)
    if [(k, len(r)) for k, r in runs_a] != [(k, len(r)) for k, r in runs_b]:
        return False
    return all(_perfect_matching(ra, rb) for (_, ra), (_, rb) in zip(runs_a, runs_b))


def _runs(rows: list[tuple], exact: list[tuple]) -> list[tuple[tuple, list[tuple]]]:
    out: list[tuple[tuple, list[tuple]]] = []
    for row, key in zip(rows, exact):
        if out and out[-1][0] == key:
            out[-1][1].append(row)
        else:
            out.append((key, [row]))
    return out


def _perfect_matching(a: list[tuple], b: list[tuple]) -> bool:
    numbers = [j for j, v in enumerate(a[0]) if _is_number(v)]
    if not any(isinstance(r[j], float) for rows in (a, b) for r in rows for j in numbers):
        # Integers compare exactly: sorted alike, equal rows stand side by side.
        return all(map(_rows_equal, a, b))
    # Repeated rows count once, with their number of copies (a result of 1,000 equal rows is
    # one node, not a million candidate pairs): pairing is then a flow from the distinct rows
    # of `a` (each sends its copies) to those of `b` (each takes its own), along equal pairs.
    supply, room = Counter(a), Counter(b)
    rows_a, rows_b = list(supply), list(room)
    candidates = _candidates(rows_a, rows_b, numbers)
    left = [supply[r] for r in rows_a]  # copies of each row of `a` not yet paired
    free = [room[r] for r in rows_b]    # copies of each row of `b` not yet taken
    flow: list[dict[int, int]] = [{} for _ in rows_b]  # flow[j][i]: copies of a[i] in b[j]
    # One row of `a` at a time (a row that finds no path now never will: Kuhn's algorithm),
    # so that each search starts from that row alone, not from every row still unpaired.
    for source in range(len(rows_a)):
        while left[source]:
            # Breadth-first search for a path: the source, to a row of `b`, back along a pairing
            # already made to the row of `a` it took, ... to a row of `b` with room.
            came: dict[int, int] = {}  # row of `b` -> the row of `a` it was reached from
            via: dict[int, int] = {source: -1}  # row of `a` -> the row of `b` it came by
            frontier, end = [source], -1
            while frontier and end < 0:
                nxt = []
                for i in frontier:
                    for j in candidates[i]:
                        if j in came:
                            continue
                        came[j] = i
                        if free[j]:
                            end = j
                            break
                        for k in flow[j]:
                            if k not in via:
                                via[k] = j
                                nxt.append(k)
                    if end >= 0:
                        break
                frontier = nxt
            if end < 0:
                return False
            path, j = [], end  # (row of `a`, row of `b` it takes), from the end to the source
            while j >= 0:
                i = came[j]
                path.append((i, j))
                j = via[i]
            # Each row of `a` on the path but the source gives up the row of `b` it came by.
            undone = [(i, j) for (i, _), (_, j) in zip(path, path[1:])]
            amount = min(free[end], left[source], *(flow[j][i] for i, j in undone))
            for i, j in path:
                flow[j][i] = flow[j].get(i, 0) + amount
            for i, j in undone:
                flow[j][i] -= amount
                if not flow[j][i]:
                    del flow[j][i]
            free[end] -= amount
            left[source] -= amount
    return True


def _candidates(rows_a: list[tuple], rows_b: list[tuple], numbers: list[int]) -> list[list[int]]:
    """For each row of `a`, the rows of `b` equal to it. Only rows near it in every number
    column are compared (a window on one column alone holds most rows when each column has
    few values: a grid of 10 x 10 x 10 numbers, 100 comparisons a row, not one), and only
    those in a window on the column of most values are looked at, a block of `a` at a time."""
    out: list[list[int]] = [[] for _ in rows_a]
    with np.errstate(invalid="ignore", over="ignore"):
        a_all = np.array([[r[j] for j in numbers] for r in rows_a], dtype=float)  # (A, m)
        b_all = np.array([[r[j] for j in numbers] for r in rows_b], dtype=float)  # (B, m)
        c = max(range(len(numbers)), key=lambda k: len(np.unique(b_all[:, k])))
        order_a, order_b = np.argsort(a_all[:, c]), np.argsort(b_all[:, c])
        column = b_all[order_b, c]
        for start in range(0, len(rows_a), _BLOCK):
            ia = order_a[start:start + _BLOCK]
            a = a_all[ia][:, None]  # (k, 1, m)
            # Twice the tolerance: past any number within it of a's (inf and -inf: themselves)
            reach = (np.abs(a) * _REL_TOL + _ABS_TOL) * 2
            lo, hi = 0, len(rows_b)
            if np.isfinite(a[:, 0, c]).all():
                lo = np.searchsorted(column, (a[:, 0, c] - reach[:, 0, c]).min(), "left")
                hi = np.searchsorted(column, (a[:, 0, c] + reach[:, 0, c]).max(), "right")
            jb = order_b[lo:hi]
            near = ((np.abs(a - b_all[jb]) <= reach) | (a == b_all[jb])).all(-1)  # (k, window)
            for i, j in zip(*(ix.tolist() for ix in np.nonzero(near))):
                i, j = int(ia[i]), int(jb[j])
                if _rows_equal(rows_a[i], rows_b[j]):
                    out[i].append(j)
    return out


_BLOCK = 64  # rows of `a` a time: at most 64 x 1,000 rows x 8 columns of differences, 4 MB

_MAX_PERMUTED_COLUMNS = 8


def _other_column_orders(pred: list[tuple], gold: list[tuple]) -> list[tuple[int, ...]]:
    """Orders of the predicted columns, other than their own, in which each column holds the
    same values as the gold column at its place (as a multiset): the only orders in which the
    rows can match, so few are tried even when many columns are."""
    width = len(gold[0]) if gold else 0
    if width < 2 or width > _MAX_PERMUTED_COLUMNS or not pred or len(pred[0]) != width:
        return []

    def values(rows: list[tuple], j: int) -> list:
        return sorted((r[j] for r in rows), key=_value_key)

    gold_cols = [values(gold, i) for i in range(width)]
    pred_cols = [values(pred, j) for j in range(width)]
    fits = [[j for j in range(width) if len(pred_cols[j]) == len(gold_cols[i])
             and all(map(_values_equal, pred_cols[j], gold_cols[i]))] for i in range(width)]
    identity = tuple(range(width))
    return [order for order in itertools.islice(_assignments(fits, ()), _MAX_ORDERS)
            if order != identity]


# Eight columns with the same values have 8! orders; the first 120 are tried, so that checking
# a wrong answer of 1,000 such rows stays near a second.
_MAX_ORDERS = 120


def _assignments(fits: list[list[int]], chosen: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    if len(chosen) == len(fits):
        yield chosen
        return
    for j in fits[len(chosen)]:
        if j not in chosen:
            yield from _assignments(fits, chosen + (j,))


_STRING_OR_NAME = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_ORDER_BY = re.compile(r"\bORDER\s+BY\b", re.IGNORECASE)


def has_top_level_order_by(sql: str) -> bool:
    """True when ORDER BY applies to the whole result, not only inside a subquery (brackets
    and words inside string literals and quoted names do not count)."""
    depth = 0
    text = _STRING_OR_NAME.sub("''", sql)
    order_at = {m.start() for m in _ORDER_BY.finditer(text)}
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and i in order_at:
            return True
    return False


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float))


def _value_key(v: object) -> tuple:
    """Orders None, then numbers by their exact value (never rounded: a rounding boundary
    would put two numbers within the tolerance far apart), then the rest by their text."""
    if v is None:
        return (0, 0, "")
    if isinstance(v, (int, float)):
        return (1, v, "")
    # A blob apart from text: b'x' and the text "b'x'" write alike but are never equal.
    return (2 if isinstance(v, str) else 3, 0, str(v))


def _row_key(row: tuple) -> tuple:
    """The exact parts of a row (each value's kind, and what is not a number) before its
    numbers: rows that may be equal within the tolerance differ in their numbers only, so they
    sort together whatever those numbers, and the rest orders them alike on both sides."""
    keys = list(map(_value_key, row))
    return tuple([(k[0], k[2]) for k in keys]), tuple([k[1] for k in keys])


def _values_equal(x: object, y: object) -> bool:
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return math.isclose(float(x), float(y), rel_tol=_REL_TOL, abs_tol=_ABS_TOL)
    return x == y


def _rows_equal(x: tuple, y: tuple) -> bool:
    return len(x) == len(y) and all(_values_equal(a, b) for a, b in zip(x, y))
