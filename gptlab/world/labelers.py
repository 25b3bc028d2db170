"""Simulated labelers: rank K SQL responses to a question the way a careful person would.

The careful order: a correct result beats a query that runs but answers wrongly, which beats a
query that fails. With ties (the default) the answers of one tier are tied: equally good, so the
reward model learns no preference between them. Without ties, among equals the shorter
normalized SQL (whitespace collapsed, no trailing semicolon) wins, then the earlier response.
Real labelers disagree (InstructGPT reports about 73% agreement), so a labeler perturbs the
order of its levels (tiers, or single responses without ties) with Mallows noise calibrated so
that, in expectation, a fraction `disagreement` of all pairs of levels comes out flipped;
`agreement` measures it between two labelers. (Counted over pairs of responses in different
tiers, that is exact when each tier holds one response; Mallows flips neighbouring levels more
often than distant ones, so unequal tiers move it: for 0.1 on 3 tiers of 8 answers, from 0.088
(tiers of 6 / 1 / 1) to 0.124 (1 / 6 / 1), bounded by the neighbouring levels' flip rate, 0.132.)
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
    """A labeler's ranking of the responses to one question: best first, with ties."""

    id: str  # the question id, carried along so rankings join back to prompts and gold SQL
    responses: tuple[str, ...]  # as given
    order: tuple[int, ...]  # indices into `responses`, best first, tied ones side by side
    verdicts: tuple[Verdict, ...]  # per response, as given
    groups: tuple[int, ...]  # the level of each place of `order` (0 = best, equal = tied)

    def ranked(self) -> list[str]:
        """The responses best first, tied groups flattened."""
        return [self.responses[i] for i in self.order]

    def tied_groups(self) -> list[list[str]]:
        """The responses as levels, best first; each level a list of tied responses."""
        out: list[list[str]] = [[] for _ in range(len(set(self.groups)))]
        for i, level in zip(self.order, self.groups):
            out[level].append(self.responses[i])
        return out

    def ranked_json(self) -> list[str | list[str]]:
        """The rankings file's `ranked` value: a response, or a list of tied responses."""
        return [g[0] if len(g) == 1 else g for g in self.tied_groups()]

    def levels(self) -> dict[int, int]:
        """Response index -> its level."""
        return dict(zip(self.order, self.groups))

    def to_json(self) -> dict:
        """The ranking as a JSON object: responses best first, order, groups and verdicts."""
        return {"id": self.id, "responses": self.ranked(), "order": list(self.order),
                "groups": list(self.groups),
                "verdicts": [self.verdicts[i].kind for i in self.order]}


class SqlLabeler:
    """`rank(id, responses)`; the same labeler gives the same ranking for the same item.

    ties=True: one level per verdict tier present (correct > wrong > error), its responses tied.
    ties=False: a strict order, shorter SQL first within a tier.
    """

    def __init__(self, world: "World", disagreement: float = 0.0, seed: int = 0,
                 ties: bool = True):
        if not 0.0 <= disagreement <= 0.5:
            raise UserError(f"disagreement must be in [0, 0.5] (0.5 is a random ranking), "
                            f"got {disagreement}", field="disagreement")
        self.world, self.disagreement, self.seed, self.ties = world, disagreement, seed, ties

    @staticmethod
    def careful_key(verdict: Verdict, response: str) -> tuple[int, int]:
        """What the careful labeler prefers, smallest first: correct, then wrong, then answers
        that do not run; among equals, the shorter SQL. Equal keys are equally good."""
        return _TIER.get(verdict.kind, 2), len(normalize_sql(response))

    def careful_order(self, verdicts: list[Verdict], responses: list[str]) -> list[int]:
        """The noise-free strict order of `responses` (indices, best first)."""
        # The index breaks ties between equal keys: a strict order, first given first.
        return sorted(range(len(responses)),
                      key=lambda i: (*self.careful_key(verdicts[i], responses[i]), i))

    def equal_key_levels(self, verdicts: list[Verdict], responses: list[str]
                         ) -> list[list[int]]:
        """The careful order with equal keys in one level: the truth a strict order's
        position-broken ties would misstate (two answers of one verdict and length)."""
        levels: list[list[int]] = []
        keys = [self.careful_key(v, r) for v, r in zip(verdicts, responses)]
        for i in self.careful_order(verdicts, responses):
            if levels and keys[levels[-1][0]] == keys[i]:
                levels[-1].append(i)
            else:
                levels.append([i])
        return levels

    def careful_levels(self, verdicts: list[Verdict], responses: list[str]) -> list[list[int]]:
        """The noise-free ranking as levels of response indices, best first."""
        if not self.ties:
            return [[i] for i in self.careful_order(verdicts, responses)]
        tiers: dict[int, list[int]] = {}
        for i, v in enumerate(verdicts):
            tiers.setdefault(_TIER.get(v.kind, 2), []).append(i)
        return [tiers[t] for t in sorted(tiers)]

    def rank(self, qid: str, responses: list[str]) -> Ranking:
        """Rank the `responses` to question `qid` by their verdicts, with the labeler's
        disagreement (seeded by the item)."""
        verdicts = [self.world.check(qid, r) for r in responses]
        levels = self.careful_levels(verdicts, responses)
        if self.disagreement > 0 and len(levels) > 1:
            # Seeded by the item, not by call order, so rankings are reproducible one by one.
            rng = random.Random(f"{self.seed}|{qid}|" + "\x1f".join(responses))
            perm = mallows_perturb(list(range(len(levels))),
                                   _dispersion(len(levels), self.disagreement), rng)
            levels = [levels[g] for g in perm]
        order = tuple(i for level in levels for i in level)
        groups = tuple(n for n, level in enumerate(levels) for _ in level)
        return Ranking(qid, tuple(responses), order, tuple(verdicts), groups)


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
    """Fraction of response pairs (over all items) that both labelers order the same way.

    A pair either labeler ties has no order to agree on and is left out: with tier ties this is
    the fraction of cross-tier pairs; without ties, of all pairs.
    """
    same = total = 0
    for qid, responses in items:
        level_a = labeler_a.rank(qid, responses).levels()
        level_b = labeler_b.rank(qid, responses).levels()
        for i, j in itertools.combinations(range(len(responses)), 2):
            if level_a[i] == level_a[j] or level_b[i] == level_b[j]:
                continue
            same += (level_a[i] < level_a[j]) == (level_b[i] < level_b[j])
            total += 1
    if total == 0:
        raise UserError("agreement needs at least one pair of responses that both labelers "
                        "rank apart (an item with two or more responses, not all tied)")
    return same / total
