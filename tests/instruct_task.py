"""A small instruction task of our own, not the built-in world, for the InstructGPT tests.

Prompts ask for a short answer about an animal; a response is better the more times it says
"yes". The demonstrations mix four words, so SFT learns all of them and only the preference
(rankings -> reward model -> PPO) can push the policy towards "yes".
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ANIMALS = ["cat", "dog", "fox", "owl", "cow", "pig", "hen", "elk"]
WORDS = ["yes", "no", "maybe", "ok"]


def preference(response: str) -> float:
    words = response.split()
    return float(words.count("yes"))


def reward_fn(prompts, responses, records):
    return [preference(r) for r in responses]


def raising_reward_fn(prompts, responses, records):
    raise RuntimeError("scorer crashed")


def nan_reward_fn(prompts, responses, records):
    return [float("nan")] * len(responses)


def text_reward_fn(prompts, responses, records):
    return ["1.0"] * len(responses)


def numpy_reward_fn(prompts, responses, records):
    import numpy as np
    return [np.float32(preference(r)) for r in responses]


def picky_reward_fn(prompts, responses, records):
    return reward_fn(prompts, responses, records)


def _refuse_t3(records, path):
    for r in records:
        if r["id"] == "t3":
            raise ValueError(f"{path}:{r['_line']}: prompt t3 is not about an animal")


picky_reward_fn.check_records = _refuse_t3


def rank(record: dict, responses: list[str]) -> list[str]:
    return sorted(responses, key=lambda r: (-preference(r), len(r)))


def score(record: dict, responses: list[str]) -> list[float]:
    """The preference alone, equal responses tied: what a reward model for PPO learns from.
    `rank` also orders ties by length, shortest first; a reward model learns that too and
    scores the empty response, which no rankings file holds, among the best, and PPO then
    learns to answer nothing (on CPU with model seeds 3 and 4, and on CUDA with seed 0)."""
    return [preference(r) for r in responses]


def write_task(d: Path, n: int = 400, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    demos, prompts, corpus = [], [], []
    for i in range(n):
        animal = rng.choice(ANIMALS)
        prompt = f"Is the {animal} happy?"
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        demos.append({"id": f"t{i}", "prompt": prompt, "completion": " " + answer})
        prompts.append({"id": f"t{i}", "prompt": prompt})
        corpus.append(f"{prompt} {answer}")
    paths = {"sft": d / "sft.jsonl", "prompts": d / "prompts.jsonl", "corpus": d / "corpus.txt"}
    paths["sft"].write_text("".join(json.dumps(r) + "\n" for r in demos))
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in prompts[:64]))
    paths["corpus"].write_text("\n\n".join(corpus))
    return paths
