"""Test-suite databases: variants of the company that tell apart queries the company cannot.

A wrong query can return the gold's rows on one database: "What department is Alice Martin
in?" answered with a colleague's name, or `>=` for `>` where no salary equals the threshold.
As in the test-suite evaluation of Spider (Zhong et al. 2020), the world also runs an answer on
variants of its company: the same departments, people and projects (ids and names) under the
same schema, with every relation and number drawn again, and salaries, budgets and city head
counts placed at and beside the thresholds the questions ask about. An answer is correct on
the test suite when it returns the gold's result on the company and on every variant where
that result is informative (as every question's is on the company); so execution accuracy on
the test suite is at most execution accuracy.
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Callable

from gptlab.world.checker import compare, has_top_level_order_by
from gptlab.world.database import CITIES, HIRE_YEARS, ROLES, Company, write_database
from gptlab.world.executor import QueryResult, SqlExecutor
from gptlab.world.questions import informative, slot_domains
from gptlab.world.schema import Schema

# Of the 1,824 wrong queries to seed 0's test questions that return the gold's rows on the
# company (another value, `>=` for `>`, a threshold off by one), 8 variants miss 150 (8.2%),
# 16 miss 71 (3.9%).
VARIANTS = 16


def variant_company(company: Company, k: int) -> Company:
    """The k-th variant: ids and names kept, everything else drawn again from a seed of the
    company's contents and k. Salaries and project budgets stay unique, as in the company, so
    that ORDER BY ... LIMIT has one answer on every variant."""
    rng = random.Random(f"test-suite-{company.fingerprint()}-{k}")
    domains = slot_domains(company)
    salaries = _beside([d["amount"] for d in domains["amount"]])
    budgets = _beside([d["budget"] for d in domains["budget"]])
    head_counts = _beside([d["count"] for d in domains["count"]])
    rows = company.rows
    n_dept, n_emp, n_proj = len(rows["dept"]), len(rows["emp"]), len(rows["proj"])

    dept_budgets = rng.sample(range(400_000, 3_000_001, 10_000), n_dept)
    depts = [(r[0], r[1], rng.choice(CITIES), b) for r, b in zip(rows["dept"], dept_budgets)]
    cities = _cities_with_head_counts(rng, n_emp, head_counts)
    taken: set[int] = set()
    emps = [(r[0], r[1], rng.randrange(n_dept) + 1, city,
             _unique(rng, taken, salaries, 0.25, lambda: rng.randrange(280, 1401) * 100),
             rng.randint(*HIRE_YEARS)) for r, city in zip(rows["emp"], cities)]
    taken = set()
    projs = [(r[0], r[1], rng.randrange(n_dept) + 1,
              _unique(rng, taken, budgets, 0.5, lambda: rng.randrange(10, 201) * 5_000))
             for r in rows["proj"]]
    asgs = [(e[0], p, rng.choice(ROLES), rng.choice(range(4, 41, 2)))
            for e in emps for p in sorted(rng.sample(range(1, n_proj + 1), rng.randint(1, 3)))]
    return Company(rows={"dept": depts, "emp": emps, "proj": projs, "asg": asgs})


def _beside(thresholds: list[int]) -> list[int]:
    """Each threshold and its neighbours: what tells `>` from `>=` and from a threshold off by
    one."""
    return sorted({t + d for t in thresholds for d in (-1, 0, 1)})


def _unique(rng: random.Random, taken: set[int], near: list[int], p_near: float,
            draw: Callable[[], int]) -> int:
    while True:
        value = rng.choice(near) if rng.random() < p_near else draw()
        if value not in taken:
            taken.add(value)
            return value


def _cities_with_head_counts(rng: random.Random, n_emp: int, head_counts: list[int]) -> list[str]:
    """A city for each employee, most cities given a head count at or beside a threshold of
    "which cities have more than N employees", the rest spread over the last one."""
    order = rng.sample(CITIES, len(CITIES))
    cities: list[str] = []
    for city in order[:-1]:
        n = rng.choice(head_counts)
        if len(cities) + n <= n_emp:
            cities += [city] * n
    cities += [order[-1]] * (n_emp - len(cities))
    rng.shuffle(cities)
    return cities


class VariantDatabases:
    """The variants of one company written under its schema, each with its own executor."""

    def __init__(self, company: Company, schema: Schema, variants: int = VARIANTS):
        self._dir = tempfile.TemporaryDirectory(prefix="gptlab-test-suite-")
        self.executors = [SqlExecutor(write_database(variant_company(company, k), schema,
                                                     Path(self._dir.name) / f"variant-{k}.sqlite"))
                          for k in range(variants)]
        self._gold: dict[tuple[int, str], QueryResult] = {}
        # Each (answer, gold) pair's verdict: the pipeline's evaluation asks about the same
        # answer for several models (1794 answers of the demo's five models are 477 distinct).
        self._verdicts: dict[tuple[str, str], bool] = {}

    def agrees(self, pred_sql: str, gold_sql: str) -> bool:
        """Whether `pred_sql` returns the gold's result on every variant where that result is
        informative. The world asks no question whose answer on the company is empty, a lone
        NULL or a lone 0, where equivalent queries part ways (`SUM` is NULL where `TOTAL` is
        0; `COUNT(*)` is 0 where `COUNT(*) ... GROUP BY city` has no row); a variant may make
        the answer one of those (a city left with no staff), and there it tells nothing.

        The databases are read-only and the step budget deterministic, so a verdict is kept
        and not run again; one that a timeout decided is not (the wall-clock backstop is a
        timeout too, and need not strike again)."""
        key = (pred_sql, gold_sql)
        if key in self._verdicts:
            return self._verdicts[key]
        verdict, timed_out = True, False
        ordered = has_top_level_order_by(gold_sql)
        for k, executor in enumerate(self.executors):
            if (k, gold_sql) not in self._gold:
                self._gold[k, gold_sql] = executor.run(gold_sql)
            gold = self._gold[k, gold_sql]
            if not informative(gold.rows):
                continue
            pred = executor.run(pred_sql)
            timed_out = pred.error is not None and pred.error.kind in ("timeout", "interrupted")
            if not compare(pred, gold, ordered).correct:
                verdict = False
                break
        if not timed_out:
            self._verdicts[key] = verdict
        return verdict
