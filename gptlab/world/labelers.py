"""Simulated labelers: rank K SQL responses to a question the way a careful person would.

The careful order: a correct result beats a query that runs but answers wrongly, which beats a
query that fails; among equals the shorter normalized SQL (whitespace collapsed, no trailing
semicolon) wins, then the earlier response. Real labelers disagree (InstructGPT reports about
73% agreement), so a labeler perturbs that order with Mallows noise calibrated so that, in
expectation, a fraction `disagreement` of all response pairs comes out flipped; `agreement`
measures it between two labelers.
"""
from __future__ import annotations

import functools
import itertools
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from gptlab.errors import UserError
from gptlab.world.checker import CORRECT, WRONG, Verdict

if TYPE_CHECKING:
    from gptlab.world.build import World

_TIER = {CORRECT: 0, WRONG: 1}  # anything else (error) is tier 2


def normalize_sql(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip().rstrip(";").strip()


@dataclass(frozen=True)
class Ranking:
    id: str  # the question id, carried along so rankings join back to prompts and gold SQL
    responses: tuple[str, ...]  # as given
    order: tuple[int, ...]  # indices into `responses`, best first
    verdicts: tuple[Verdict, ...]  # per response, as given

    def ranked(self) -> list[str]:
        return [self.responses[i] for i in self.order]

    def to_json(self) -> dict:
        return {"id": self.id, "responses": self.ranked(), "order": list(self.order),
                "verdicts": [self.verdicts[i].kind for i in self.order]}


class SqlLabeler:
    """`rank(id, responses)`; the same labeler gives the same ranking for the same item."""

    def __init__(self, world: "World", disagreement: float = 0.0, seed: int = 0):
        if not 0.0 <= disagreement <= 0.5:
            raise UserError(f"disagreement must be in [0, 0.5] (0.5 is a random ranking), "
                            f"got {disagreement}", field="disagreement")
        self.world, self.disagreement, self.seed = world, disagreement, seed

    def careful_order(self, verdicts: list[Verdict], responses: list[str]) -> list[int]:
        return sorted(range(len(responses)), key=lambda i: (
            _TIER.get(verdicts[i].kind, 2), len(normalize_sql(responses[i])), i))

    def rank(self, qid: str, responses: list[str]) -> Ranking:
        verdicts = [self.world.check(qid, r) for r in responses]
        order = self.careful_order(verdicts, responses)
        if self.disagreement > 0 and len(order) > 1:
            # Seeded by the item, not by call order, so rankings are reproducible one by one.
            rng = random.Random(f"{self.seed}|{qid}|" + "\x1f".join(responses))
            order = mallows_perturb(order, _dispersion(len(order), self.disagreement), rng)
        return Ranking(qid, tuple(responses), tuple(order), tuple(verdicts))


def mallows_perturb(order: list[int], phi: float, rng: random.Random) -> list[int]:
    """Repeated insertion: the i-th item of `order` lands j places above its due position with
    probability proportional to phi**j, which creates j flipped pairs."""
    out: list[int] = []
    for i, item in enumerate(order):
        weights = [phi ** j for j in range(i + 1)]
        j = rng.choices(range(i + 1), weights)[0]
        out.insert(len(out) - j, item)
    return out


def _expected_flip_fraction(k: int, phi: float) -> float:
    pairs = k * (k - 1) / 2
    flips = 0.0
    for i in range(k):
        w = [phi ** j for j in range(i + 1)]
        flips += sum(j * x for j, x in enumerate(w)) / sum(w)
    return flips / pairs


@functools.lru_cache(maxsize=None)
def _dispersion(k: int, disagreement: float) -> float:
    """The phi whose expected fraction of flipped pairs among k items is `disagreement`."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _expected_flip_fraction(k, mid) < disagreement else (lo, mid)
    return (lo + hi) / 2


def agreement(labeler_a: SqlLabeler, labeler_b: SqlLabeler,
              items: Iterable[tuple[str, list[str]]]) -> float:
    """Fraction of response pairs (over all items) that both labelers order the same way."""
    same = total = 0
    for qid, responses in items:
        pos_a = _positions(labeler_a.rank(qid, responses).order)
        pos_b = _positions(labeler_b.rank(qid, responses).order)
        for i, j in itertools.combinations(range(len(responses)), 2):
            same += (pos_a[i] < pos_a[j]) == (pos_b[i] < pos_b[j])
            total += 1
    if total == 0:
        raise UserError("agreement needs at least one item with two or more responses")
    return same / total


def _positions(order: tuple[int, ...]) -> dict[int, int]:
    return {item: pos for pos, item in enumerate(order)}
