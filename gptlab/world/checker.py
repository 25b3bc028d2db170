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
    """None when the rows are equal, else where they first differ."""
    if not ordered:
        a, b = sorted(a, key=_row_key), sorted(b, key=_row_key)
    for i, (x, y) in enumerate(zip(a, b)):
        if not _rows_equal(x, y):
            where = f"row {i + 1}" if ordered else "rows"
            return f"{where} differ: got {x!r}, expected {y!r}"
    return None


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


def _value_key(v: object) -> tuple:
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, (int, float)):
        return (1, round(float(v), 6), "")
    return (2, 0.0, str(v))


def _row_key(row: tuple) -> tuple:
    return tuple(_value_key(v) for v in row)


def _values_equal(x: object, y: object) -> bool:
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return math.isclose(float(x), float(y), rel_tol=_REL_TOL, abs_tol=_ABS_TOL)
    return x == y


def _rows_equal(x: tuple, y: tuple) -> bool:
    return len(x) == len(y) and all(_values_equal(a, b) for a, b in zip(x, y))
