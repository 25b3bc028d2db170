"""Questions with gold SQL, and their train / validation / test splits.

A *combo* is an intent with concrete slot values drawn from the database. Combos whose gold
result is empty (or a lone 0 / NULL) are dropped so answers are informative. Whole combos are
held out for validation and test, so a test question never shares (intent, values) with
training; the test also gets every intent's reserved phrasing (`unseen_phrasing`).
"""
from __future__ import annotations

import itertools
import random
import sqlite3
from dataclasses import dataclass

from gptlab.world.database import CITIES, HIRE_YEARS, ROLES, Company
from gptlab.world.intents import INTENTS, Intent
from gptlab.world.schema import Schema


@dataclass(frozen=True)
class Combo:
    intent: Intent
    values: tuple[tuple[str, object], ...]  # sorted (slot, value) pairs, hashable
    sql: str
    rows: tuple[tuple, ...]  # the gold result, kept for the corpus's "SQL and result" text


@dataclass
class Question:
    id: str
    split: str  # train / validation / test
    intent: str
    kind: str
    values: dict
    phrasing: int  # index into the intent's phrasings
    text: str
    sql: str
    unseen_phrasing: bool = False


def slot_domains(company: Company) -> dict[str, list[dict]]:
    """Every value a slot may take; each entry is a dict because `span` fills two slots."""
    emp_names = [r[1] for r in company.rows["emp"]]
    assigned = {r[1] for r in company.rows["asg"]}
    return {
        "city": [{"city": c} for c in CITIES],
        "amount": [{"amount": a} for a in range(40_000, 110_001, 5_000)],
        "budget": [{"budget": b} for b in range(100_000, 900_001, 50_000)],
        "year": [{"year": y} for y in range(HIRE_YEARS[0] + 1, HIRE_YEARS[1])],
        "span": [{"lo": lo, "hi": lo + d} for lo in range(HIRE_YEARS[0], HIRE_YEARS[1])
                 for d in (2, 3, 4, 5) if lo + d <= HIRE_YEARS[1]],
        "employee": [{"employee": n} for n in emp_names],
        "department": [{"department": r[1]} for r in company.rows["dept"]],
        "project": [{"project": r[1]} for r in company.rows["proj"] if r[0] in assigned],
        "role": [{"role": r} for r in ROLES],
        "n": [{"n": n} for n in range(2, 9)],
        "count": [{"count": c} for c in range(4, 41, 2)],
    }


def enumerate_combos(company: Company, schema: Schema, conn: sqlite3.Connection) -> list[Combo]:
    """All combos of all intents whose gold SQL gives a non-trivial result, in a fixed order."""
    domains = slot_domains(company)
    combos = []
    for intent in INTENTS:
        for parts in itertools.product(*(domains[s] for s in intent.slots)):
            values = {k: v for part in parts for k, v in part.items()}
            sql = schema.fill(intent.sql, values)
            rows = tuple(conn.execute(sql).fetchall())
            if informative(rows):
                combos.append(Combo(intent, tuple(sorted(values.items())), sql, rows))
    return combos


def informative(rows: tuple[tuple, ...] | list[tuple]) -> bool:
    """A result worth asking for: not empty, not a lone NULL, not a lone 0."""
    return bool(rows) and tuple(rows) not in (((None,),), ((0,),))


def phrase(template: str, values: dict) -> str:
    """Fill an English template; money reads with thousands separators (60,000)."""
    shown = {k: (f"{v:,}" if k in ("amount", "budget") else str(v)) for k, v in values.items()}
    return template.format(**shown)


@dataclass(frozen=True)
class SplitSizes:
    train: int = 3500
    validation: int = 300
    test: int = 600


def split_combos(combos: list[Combo], sizes: SplitSizes, rng: random.Random
                 ) -> dict[str, list[Combo]]:
    """Hold out whole combos per intent: enough for the test and validation sizes asked for,
    at least one test combo per intent of three or more combos (two from eight on), and most
    combos kept for training."""
    by_intent: dict[str, list[Combo]] = {}
    for c in combos:
        by_intent.setdefault(c.intent.name, []).append(c)
    total = len(combos)
    phrasings = sum(len(c.intent.phrasings) for c in combos) / total  # per combo, on average
    # A margin of 1.3 so that the balanced draw below still finds enough questions.
    test_frac = min(0.3, 1.3 * sizes.test / (phrasings * total))
    val_frac = min(0.2, 1.3 * sizes.validation / ((phrasings - 1) * total))
    out: dict[str, list[Combo]] = {"train": [], "validation": [], "test": []}
    for name in sorted(by_intent):
        group = list(by_intent[name])
        rng.shuffle(group)
        # Two test combos where an intent has room, so one value is not the whole verdict.
        least = 2 if len(group) >= 8 else 1
        n_test = max(least, round(len(group) * test_frac)) if len(group) >= 3 else 0
        n_val = max(1, round(len(group) * val_frac)) if len(group) >= 4 else 0
        out["test"] += group[:n_test]
        out["validation"] += group[n_test:n_test + n_val]
        out["train"] += group[n_test + n_val:]
    return out


def questions_for(combos: list[Combo], reserved: bool = False
                  ) -> dict[str, list[tuple[Combo, int]]]:
    """(combo, phrasing index) candidates grouped by intent: the seen phrasings, and with
    `reserved` the intent's reserved one too."""
    groups: dict[str, list[tuple[Combo, int]]] = {}
    for c in combos:
        for p in range(len(c.intent.phrasings if reserved else c.intent.seen_phrasings)):
            groups.setdefault(c.intent.name, []).append((c, p))
    return groups


def balanced_take(groups: dict[str, list], n: int, rng: random.Random, repeat: bool = False
                  ) -> list:
    """Take `n` items round-robin over the groups (so small intents are not drowned out by
    intents with hundreds of values); with `repeat`, cycle again when the groups run dry."""
    queues = {k: rng.sample(v, len(v)) for k, v in sorted(groups.items()) if v}
    taken: list = []
    while len(taken) < n and queues:
        progressed = False
        for k in sorted(queues):
            if queues[k] and len(taken) < n:
                taken.append(queues[k].pop())
                progressed = True
        if not progressed:
            if not repeat:
                break
            queues = {k: rng.sample(v, len(v)) for k, v in sorted(groups.items()) if v}
    return taken


def make_question(qid: str, split: str, combo: Combo, phrasing: int) -> Question:
    intent = combo.intent
    values = dict(combo.values)
    return Question(id=qid, split=split, intent=intent.name, kind=intent.kind, values=values,
                    phrasing=phrasing, text=phrase(intent.phrasings[phrasing], values),
                    sql=combo.sql, unseen_phrasing=phrasing == len(intent.phrasings) - 1)


def build_questions(combos: list[Combo], sizes: SplitSizes, rng: random.Random, prefix: str
                    ) -> tuple[dict[str, list[Question]], dict[str, list[Combo]]]:
    """The three splits of questions, ids `{prefix}-train-00001` and so on."""
    parts = split_combos(combos, sizes, rng)
    picks = {
        "train": balanced_take(questions_for(parts["train"]), sizes.train, rng, repeat=True),
        "validation": balanced_take(questions_for(parts["validation"]), sizes.validation, rng),
        "test": balanced_take(questions_for(parts["test"], reserved=True), sizes.test, rng),
    }
    out = {}
    for split, chosen in picks.items():
        rng.shuffle(chosen)
        out[split] = [make_question(f"{prefix}-{split}-{i + 1:05d}", split, c, p)
                      for i, (c, p) in enumerate(chosen)]
    return out, parts
