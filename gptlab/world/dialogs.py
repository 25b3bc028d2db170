"""Multi-turn dialogs: a first question about employees, then follow-ups that refine it
("only those in Lyon", "sort them by salary", "how many is that?"), each answered with SQL.

A dialog is a small query state (filters, extra column, order, limit, count) rendered to SQL
after every turn. Filters render in a fixed column order so that a state equal to a question
intent gives exactly that intent's SQL: a dialog turn whose SQL is a held-out gold query is
rejected, which keeps test (intent, values) combos out of training through dialogs too.
"""
from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass, field, replace

from gptlab.world.database import CITIES
from gptlab.world.questions import Combo, informative, phrase
from gptlab.world.schema import Schema, sql_literal

# (logical column, operator), in the order filters are written in SQL.
_FILTER_ORDER = (("city", "="), ("salary", ">"), ("hire_year", ">"))
_FILTER_SLOT = {"city": "city", "salary": "amount", "hire_year": "year"}  # its `phrase` slot
_OPENING_INTENTS = ("employees_in_city", "employees_salary_above", "employees_hired_after",
                    "employees_city_salary")
_MAX_CHARS = 1000  # keeps schema + all turns well inside the demo model's 384-token context

FOLLOW_UPS: dict[str, tuple[str, ...]] = {
    "city": ("Only those in {city}.", "Just the ones based in {city}.",
             "Keep only the employees in {city}."),
    "salary": ("Only those earning more than {amount}.", "Which of them earn over {amount}?",
               "Restrict that to salaries above {amount}."),
    "hire_year": ("Only those hired after {year}.", "Just the ones who joined after {year}."),
    "show_salary": ("Show their salaries too.", "Include their salary as well."),
    "sort_desc": ("Sort them by salary, highest first.",
                  "Order them from the highest salary down."),
    "sort_asc": ("Sort them by salary.", "Order them by salary, lowest first."),
    "limit": ("Just the top {n}.", "Only the first {n}."),
    "limit_asc": ("Just the lowest {n}.", "Only the first {n}."),  # "top" reads as highest paid
    "count": ("How many is that?", "How many are there?", "Count them."),
}


@dataclass(frozen=True)
class QueryState:
    filters: tuple[tuple[str, object], ...] = ()  # (logical column, value)
    show_salary: bool = False
    order: str = ""  # "", "ASC" or "DESC" (always by salary: salaries are unique)
    limit: int = 0
    count: bool = False

    def sql(self, schema: Schema) -> str:
        def e(logical: str) -> str:
            return schema.column("emp", logical)

        ops = dict(_FILTER_ORDER)
        present = dict(self.filters)
        where = [f"{e(c)} {ops[c]} {sql_literal(present[c])}" for c, _ in _FILTER_ORDER
                 if c in present]
        where_sql = (" WHERE " + " AND ".join(where)) if where else ""
        if self.count:
            return f"SELECT COUNT(*) FROM {schema.table('emp')}{where_sql}"
        cols = e("name") + (f", {e('salary')}" if self.show_salary else "")
        sql = f"SELECT {cols} FROM {schema.table('emp')}{where_sql}"
        if self.order:
            sql += f" ORDER BY {e('salary')}" + (" DESC" if self.order == "DESC" else "")
        if self.limit:
            sql += f" LIMIT {self.limit}"
        return sql


@dataclass
class Dialog:
    id: str
    messages: list[dict] = field(default_factory=list)
    sqls: list[str] = field(default_factory=list)  # one per assistant turn


def _opening_state(combo: Combo) -> QueryState:
    v = dict(combo.values)
    filters = [("city", v["city"])] if "city" in v else []
    filters += [("salary", v["amount"])] if "amount" in v else []
    filters += [("hire_year", v["year"])] if "year" in v else []
    return QueryState(filters=tuple(filters))


def _follow_up(state: QueryState, rng: random.Random) -> tuple[str, QueryState] | None:
    """One refinement that makes sense after `state`, as (user text, new state); None after a
    count, or when nothing is left to refine."""
    if state.count:
        return None
    # A filter after a LIMIT would filter before the LIMIT in SQL: "only those in Lyon" after
    # "just the top 3" would give the top 3 of Lyon, people the last answer did not list.
    have = {c for c, _ in state.filters}
    options = [c for c, _ in _FILTER_ORDER if c not in have] if not state.limit else []
    if not state.show_salary:
        options.append("show_salary")
    if not state.order:
        options += ["sort_desc", "sort_asc"]
    elif not state.limit:
        options.append("limit")
    if not state.limit:
        options.append("count")
    if not options:
        return None
    move = rng.choice(options)
    template = rng.choice(FOLLOW_UPS["limit_asc" if move == "limit" and state.order == "ASC"
                                     else move])
    if move in _FILTER_SLOT:
        value = _filter_value(move, rng)
        return (phrase(template, {_FILTER_SLOT[move]: value}),
                replace(state, filters=state.filters + ((move, value),)))
    if move == "show_salary":
        return template, replace(state, show_salary=True)
    if move in ("sort_desc", "sort_asc"):
        return template, replace(state, order="DESC" if move == "sort_desc" else "ASC")
    if move == "limit":
        n = rng.randint(2, 5)
        return phrase(template, {"n": n}), replace(state, limit=n)
    return template, replace(state, count=True, order="", limit=0, show_salary=False)


def _filter_value(column: str, rng: random.Random) -> str | int:
    """A value for a follow-up's filter, within the question slots' domains."""
    if column == "city":
        return rng.choice(CITIES)
    if column == "salary":
        return rng.randrange(40_000, 100_001, 5_000)
    return rng.randint(2008, 2020)  # hire_year


def build_dialogs(train_combos: list[Combo], schema: Schema, conn: sqlite3.Connection,
                  held_out_sql: set[str], n: int, rng: random.Random, prefix: str) -> list[Dialog]:
    """`n` dialogs of 2 to 4 turns opened by training questions (seen phrasings only)."""
    openers = [c for c in train_combos if c.intent.name in _OPENING_INTENTS]
    system = schema.render()
    dialogs: list[Dialog] = []
    attempts = 0
    while len(dialogs) < n and openers and attempts < 50 * n:
        attempts += 1
        combo = rng.choice(openers)
        first = phrase(rng.choice(combo.intent.seen_phrasings), dict(combo.values))
        turns = [(first, _opening_state(combo))]
        for _ in range(rng.randint(1, 3)):
            step = _follow_up(turns[-1][1], rng)
            if step is None:
                break
            turns.append(step)
        sqls = [state.sql(schema) for _, state in turns]
        if not _acceptable(sqls, conn, held_out_sql):
            continue
        messages = [{"role": "system", "content": system}]
        for (text, _), sql in zip(turns, sqls):
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": sql}]
        if sum(len(m["content"]) for m in messages) > _MAX_CHARS:
            continue
        dialogs.append(Dialog(id=f"{prefix}-dialog-{len(dialogs) + 1:05d}", messages=messages,
                              sqls=sqls))
    return dialogs


def _acceptable(sqls: list[str], conn: sqlite3.Connection, held_out_sql: set[str]) -> bool:
    """Every turn is informative as a question must be (no empty result, no zero count) and
    none is a held-out gold query."""
    return all(sql not in held_out_sql and informative(conn.execute(sql).fetchall())
               for sql in sqls)
