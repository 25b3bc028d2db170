"""Execution as a reward: the world's checker scores a response directly, no reward model.

InstructGPT learns its reward from human rankings. On the built-in world the execution that the
simulated labelers rank by can also score a response itself: correct 1, wrong 0, error −1. PPO
with this reward is what a perfect reward model would give, so the pipeline trains it as an
upper bound (`gptlab pipeline --headroom`); users can train with it too:

    gptlab ppo --policy SFT --reward-fn gptlab.world.rewards:execution --prompts FILE --out DIR
"""
from __future__ import annotations

import os
from typing import Any, Callable

from gptlab.errors import UserError
from gptlab.io import record_file
from gptlab.world.checker import CORRECT, ERROR, WRONG

SCORES = {CORRECT: 1.0, WRONG: 0.0, ERROR: -1.0}

# (prompts, responses, records) -> one score per response: the `--reward-fn` signature
RewardFn = Callable[[list[Any], list[str], list[dict]], list[float]]


def execution_reward(world: Any) -> RewardFn:
    """A reward function scoring each response by executing it against `world`'s database;
    records carry the world's question `id` (as the world's prompts.jsonl does). Its
    `check_records(records, path)`, which `gptlab ppo` calls before training, refuses a
    record without an id the world knows, naming its file and line."""
    def reward(prompts: list[Any], responses: list[str], records: list[dict]) -> list[float]:
        scores = []
        for response, record in zip(responses, records):
            if "id" not in record:
                raise UserError("the execution reward needs each prompt record's world 'id'",
                                field="id")
            scores.append(SCORES[world.check(record["id"], response.strip()).kind])
        return scores

    def check_records(records: list[dict], path: Any = None) -> None:
        for r in records:
            try:
                if "id" not in r:
                    raise UserError("the execution reward needs each prompt record's world "
                                    "'id'", field="id")
                world.gold(r["id"])
            except UserError as e:
                raise (e.at(record_file(r, path), r.get("_line")) if path else e) from None

    reward.check_records = check_records  # type: ignore[attr-defined]
    return reward


_from_env: dict[str, RewardFn] = {}


def _env_reward() -> RewardFn:
    from gptlab.world.build import open_world
    spec = os.environ.get("GPTLAB_WORLD", "builtin")
    if spec not in _from_env:
        _from_env[spec] = execution_reward(open_world(spec, "GPTLAB_WORLD"))
    return _from_env[spec]


def execution(prompts: list[Any], responses: list[str], records: list[dict]) -> list[float]:
    """`--reward-fn gptlab.world.rewards:execution`: the world exported to $GPTLAB_WORLD (a
    directory from `gptlab world export`), or the built-in world when that is unset."""
    return _env_reward()(prompts, responses, records)


execution.check_records = (  # type: ignore[attr-defined]
    lambda records, path=None: _env_reward().check_records(records, path))
