"""A careless demonstrator: a systematic mistake in part of SFT's demonstrations.

InstructGPT's labelers both wrote demonstrations and ranked samples, and ranking is the easier,
more reliable job: rankings can know what the demonstrations get wrong. The built-in world's
demonstrations are perfect, which leaves feedback little to add. `flaw_demonstrations`
rewrites a share of them the way a careless person would, so a run can show what feedback fixes
and imitation cannot: SFT learns the habit, execution-based rankings reveal it, PPO unlearns it.

Flaws:
- `order`: the ORDER BY direction reversed (ASC for DESC and back). With a LIMIT the result is
  always different ("the top 3 earners" become the bottom 3).
- `inclusive`: strict comparisons written inclusive (`>=` for `>`, `<=` for `<`). The result
  differs only where a value equals the threshold, so execution seldom reveals it.
- `star`: the column list of a query that lists columns written as `*` ("list the employees
  in Paris" answered with every column of every table joined). Execution always reveals it:
  the columns differ. Aggregates and queries already selecting `*` are left as they are.
"""
from __future__ import annotations

import random
import re
from typing import Callable

from gptlab.errors import UserError


def reverse_order(sql: str) -> str:
    return re.sub(r" (ASC|DESC)\b", lambda m: " DESC" if m.group(1) == "ASC" else " ASC", sql)


def make_inclusive(sql: str) -> str:
    return sql.replace(" > ", " >= ").replace(" < ", " <= ")


# The top-level column list: what follows SELECT [DISTINCT] up to the first FROM.
_SELECT_LIST = re.compile(r"^(\s*SELECT (?:DISTINCT )?)(.+?)( FROM .*)$", re.DOTALL)


def lists_columns(sql: str) -> bool:
    m = _SELECT_LIST.match(sql)
    return m is not None and "(" not in m.group(2) and m.group(2).strip() != "*"


def select_star(sql: str) -> str:
    m = _SELECT_LIST.match(sql)
    return f"{m.group(1)}*{m.group(3)}" if m else sql


# name -> (does the flaw apply to this SQL, the flawed SQL)
FLAWS: dict[str, tuple[Callable[[str], bool], Callable[[str], str]]] = {
    "order": (lambda sql: re.search(r" (ASC|DESC)\b", sql) is not None, reverse_order),
    "inclusive": (lambda sql: " > " in sql or " < " in sql, make_inclusive),
    "star": (lists_columns, select_star),
}


def check_flaw(flaw: str, rate: float) -> None:
    """A UserError unless `flaw` is one of FLAWS and `rate` a share in [0, 1]."""
    if flaw not in FLAWS:
        raise UserError(f"unknown flaw {flaw!r}; choose one of {', '.join(sorted(FLAWS))}",
                        field="demonstrator_flaw")
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"must be in [0, 1], got {rate}", field="demonstrator_flaw_rate")


def flaw_demonstrations(rows: list[dict], flaw: str, rate: float, seed: int
                        ) -> tuple[list[dict], int]:
    """Rewrite the `completion` of each demonstration the flaw applies to with probability
    `rate` (seeded, in file order). Returns the new rows and how many were rewritten."""
    check_flaw(flaw, rate)
    applies, rewrite = FLAWS[flaw]
    rng = random.Random(seed)
    out, n = [], 0
    for row in rows:
        sql = row.get("completion")
        if isinstance(sql, str) and applies(sql) and rng.random() < rate:
            row = {**row, "completion": rewrite(sql)}
            n += 1
        out.append(row)
    return out, n
