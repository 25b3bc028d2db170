"""The pretraining corpus: plain text a small model can learn the world's language from.

Documents (separated by a blank line) of four kinds: English sentences about rows, the schema
described in words, training questions with their SQL (half in the exact prompt format), and
training SQL with its result rendered as text. Only training material goes in: no validation or
test question, and no reserved phrasing, ever appears here.
"""
from __future__ import annotations

import random
from typing import Callable

from gptlab.world.database import Company
from gptlab.world.questions import Combo, Question
from gptlab.world.schema import Schema

_EMPLOYEE_FACTS = (
    "{name} works in {dept} in {city} and earns {salary}.",
    "{name} joined the company in {year} and works for {dept}.",
    "{name} is based in {city}. {name} earns {salary} a year.",
    "The {dept} department employs {name}, hired in {year}, with a salary of {salary}.",
    "{name} has worked in {dept} since {year}; the office is in {city}.",
)
_DEPT_FACTS = (
    "The {dept} department is based in {city} and has a budget of {budget}.",
    "{dept} has its office in {city}. Its budget is {budget}.",
)
_PROJECT_FACTS = (
    "Project {project} belongs to {dept} and has a budget of {budget}.",
    "The {project} project is run by the {dept} department with {budget}.",
)
_ASSIGNMENT_FACTS = (
    "{name} works on {project} as {role} for {hours} hours a week.",
    "On project {project}, {name} is a {role} ({hours} hours per week).",
)
_MAX_RESULT_ROWS = 8


def build_corpus(company: Company, schema: Schema, train: list[Question],
                 train_combos: list[Combo], target_chars: int, rng: random.Random,
                 prompt: Callable[[str, str], str]) -> str:
    """Documents drawn at random (facts 40%, questions 40%, results 15%, schema 5%) until the
    text reaches `target_chars`."""
    facts = _fact_makers(company)
    makers: list[tuple[float, Callable[[], str]]] = [
        (0.40, lambda: rng.choice(facts)(rng)),
        (0.40, lambda: _question_doc(rng.choice(train), schema, rng, prompt)),
        (0.15, lambda: _result_doc(rng.choice(train_combos))),
        (0.05, lambda: _schema_doc(schema)),
    ]
    # Without training questions (or without facts) the documents made of them are left out.
    makers = [(w, m) for (w, m), source in zip(makers, (facts, train, train_combos, [schema]))
              if source]
    weights = [w for w, _ in makers]
    docs: list[str] = []
    size = 0
    while size < target_chars:
        make = rng.choices([m for _, m in makers], weights)[0]
        doc = make()
        docs.append(doc)
        size += len(doc) + 2
    return "\n\n".join(docs) + "\n"


def _money(v: int) -> str:
    return f"{v:,}"


def _fact_makers(company: Company) -> list[Callable[[random.Random], str]]:
    """One maker per row; each picks a phrasing, and groups a few sentences per document."""
    dept = {r[0]: r for r in company.rows["dept"]}
    emp = {r[0]: r for r in company.rows["emp"]}
    proj = {r[0]: r for r in company.rows["proj"]}

    def employee(r: tuple) -> Callable[[random.Random], str]:
        v = dict(name=r[1], dept=dept[r[2]][1], city=r[3], salary=_money(r[4]), year=r[5])
        return lambda rng: " ".join(t.format(**v) for t in rng.sample(_EMPLOYEE_FACTS, 2))

    def department(r: tuple) -> Callable[[random.Random], str]:
        v = dict(dept=r[1], city=r[2], budget=_money(r[3]))
        return lambda rng: rng.choice(_DEPT_FACTS).format(**v)

    def project(r: tuple) -> Callable[[random.Random], str]:
        v = dict(project=r[1], dept=dept[r[2]][1], budget=_money(r[3]))
        return lambda rng: rng.choice(_PROJECT_FACTS).format(**v)

    def assignment(r: tuple) -> Callable[[random.Random], str]:
        v = dict(name=emp[r[0]][1], project=proj[r[1]][1], role=r[2], hours=r[3])
        return lambda rng: rng.choice(_ASSIGNMENT_FACTS).format(**v)

    return ([employee(r) for r in company.rows["emp"]]
            + [department(r) for r in company.rows["dept"]]
            + [project(r) for r in company.rows["proj"]]
            + [assignment(r) for r in company.rows["asg"]])


def _question_doc(q: Question, schema: Schema, rng: random.Random,
                  prompt: Callable[[str, str], str]) -> str:
    if rng.random() < 0.5:
        return prompt(q.text, schema.render()) + " " + q.sql
    return f"Question: {q.text}\nSQL: {q.sql}"


def _result_doc(combo: Combo) -> str:
    rows = combo.rows[:_MAX_RESULT_ROWS]
    lines = [" | ".join(_cell(v) for v in row) for row in rows]
    more = len(combo.rows) - len(rows)
    tail = f"\n... and {more} more rows" if more > 0 else ""
    count = f"{len(combo.rows)} row" + ("s" if len(combo.rows) != 1 else "")
    return f"SQL: {combo.sql}\nResult ({count}):\n" + "\n".join(lines) + tail


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _schema_doc(schema: Schema) -> str:
    parts = []
    for line in schema.lines():
        table, cols = line[:-1].split("(", 1)
        parts.append(f"The table {table} has the columns {cols}.")
    return " ".join(parts)
