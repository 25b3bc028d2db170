"""Execution checking: a predicted query is correct when it returns the gold query's result.

Rows are compared as a multiset unless the gold query orders its output (top-level ORDER BY);
integers exactly, other numbers within a relative 1e-9 (AVG computed two ways differs in the
last bits; a truncated or rounded average does not pass); column names are ignored (`COUNT(*)`
and `COUNT(id) AS n` are the same answer), and so is the order of the columns: `SELECT salary,
name` answers "the names and salaries" as well as `SELECT name, salary` (as in the test-suite
evaluation of Spider, Zhong et al. 2020).
"""
from __future__ import annotations

import bisect
import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from gptlab.errors import UserError
from gptlab.world.executor import QueryResult, SqlExecutor

CORRECT, WRONG, ERROR = "correct", "wrong", "error"
_REL_TOL, _ABS_TOL = 1e-9, 1e-12


@dataclass(frozen=True)
class Verdict:
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
        return Verdict(WRONG, f"{len(pred.rows)} rows, expected {len(gold.rows)}")
    difference = _difference(pred.rows, gold.rows, ordered)
    if difference is None:
        return Verdict(CORRECT, f"{len(gold.rows)} rows match")
    for order in _other_column_orders(pred.rows, gold.rows):
        if _difference([tuple(r[j] for j in order) for r in pred.rows], gold.rows,
                       ordered) is None:
            return Verdict(CORRECT, f"{len(gold.rows)} rows match, columns in another order")
    return Verdict(WRONG, difference)


def _difference(a: list[tuple], b: list[tuple], ordered: bool) -> str | None:
    """None when the rows are equal (as a multiset unless `ordered`), else where they differ."""
    if not ordered:
        a, b = sorted(a, key=_row_key), sorted(b, key=_row_key)
    for i, (x, y) in enumerate(zip(a, b)):
        if not _rows_equal(x, y):
            if not ordered and _pair_up(a, b):
                return None
            where = f"row {i + 1}" if ordered else "rows"
            return f"{where} differ: got {x!r}, expected {y!r}"
    return None


def _pair_up(a: list[tuple], b: list[tuple]) -> bool:
    """Whether the rows of `a` pair one to one with equal rows of `b` (both sorted by _row_key,
    as many of each): the sorted rows side by side need not be the pairs when numbers within
    the tolerance sort apart (two columns of near-equal numbers, in other orders). Rows pair
    only within a run of the same exact parts; there, by augmenting paths (see
    `_perfect_matching`), so a pairing is found whenever one exists."""
    runs_a, runs_b = _runs(a), _runs(b)
    if [(k, len(r)) for k, r in runs_a] != [(k, len(r)) for k, r in runs_b]:
        return False
    return all(_perfect_matching(ra, rb) for (_, ra), (_, rb) in zip(runs_a, runs_b))


def _runs(rows: list[tuple]) -> list[tuple[tuple, list[tuple]]]:
    out: list[tuple[tuple, list[tuple]]] = []
    for row in rows:
        key = _row_key(row)[0]
        if out and out[-1][0] == key:
            out[-1][1].append(row)
        else:
            out.append((key, [row]))
    return out


def _perfect_matching(a: list[tuple], b: list[tuple]) -> bool:
    numbers = [j for j, v in enumerate(a[0]) if _is_number(v)]
    if not numbers:  # the exact parts are the whole rows
        return all(map(_rows_equal, a, b))
    # Repeated rows count once, with their number of copies (a result of 1,000 equal rows is
    # one node, not a million candidate pairs): pairing is then a flow from the distinct rows
    # of `a` (each sends its copies) to those of `b` (each takes its own), along equal pairs.
    supply, room = Counter(a), Counter(b)
    rows_a, rows_b = list(supply), list(room)
    # Candidates by a window on the column of most distinct values (few candidates per row).
    c = max(numbers, key=lambda j: len({r[j] for r in rows_b}))
    rows_b.sort(key=lambda r: r[c])
    column = [float(r[c]) for r in rows_b]
    candidates = []
    for row in rows_a:
        x = float(row[c])
        reach = (abs(x) * _REL_TOL + _ABS_TOL) * 2 if math.isfinite(x) else 0.0
        # `reach` is past any value within the tolerance of x
        lo, hi = bisect.bisect_left(column, x - reach), bisect.bisect_right(column, x + reach)
        candidates.append([j for j in range(lo, hi) if _rows_equal(row, rows_b[j])])
    left = [supply[r] for r in rows_a]  # copies of each row of `a` not yet paired
    free = [room[r] for r in rows_b]    # copies of each row of `b` not yet taken
    flow: list[dict[int, int]] = [{} for _ in rows_b]  # flow[j][i]: copies of a[i] in b[j]
    while any(left):
        # Breadth-first search for a path: a row of `a` with copies left, to a row of `b`, back
        # along a pairing already made to the row of `a` it took, ... to a row of `b` with room.
        came: dict[int, int] = {}  # row of `b` -> the row of `a` it was reached from
        via: dict[int, int] = {i: -1 for i, n in enumerate(left) if n}  # a -> the b it came by
        frontier, end = list(via), -1
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
        path, j = [], end  # (row of `a`, row of `b` it takes), from the end back to a source
        while j >= 0:
            i = came[j]
            path.append((i, j))
            j = via[i]
        # Each row of `a` on the path but the source gives up the row of `b` it came by.
        undone = [(i, j) for (i, _), (_, j) in zip(path, path[1:])]
        amount = min(free[end], left[path[-1][0]], *(flow[j][i] for i, j in undone))
        for i, j in path:
            flow[j][i] = flow[j].get(i, 0) + amount
        for i, j in undone:
            flow[j][i] -= amount
            if not flow[j][i]:
                del flow[j][i]
        free[end] -= amount
        left[path[-1][0]] -= amount
    return True


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
    if _is_number(v):
        return (1, v, "")
    return (2, 0, str(v))


def _row_key(row: tuple) -> tuple:
    """The exact parts of a row (each value's kind, and what is not a number) before its
    numbers: rows that may be equal within the tolerance differ in their numbers only, so they
    sort together whatever those numbers, and the rest orders them alike on both sides."""
    keys = [_value_key(v) for v in row]
    return tuple((k[0], k[2]) for k in keys), tuple(k[1] for k in keys)


def _values_equal(x: object, y: object) -> bool:
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return math.isclose(float(x), float(y), rel_tol=_REL_TOL, abs_tol=_ABS_TOL)
    return x == y


def _rows_equal(x: tuple, y: tuple) -> bool:
    return len(x) == len(y) and all(_values_equal(a, b) for a, b in zip(x, y))
