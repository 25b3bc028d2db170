"""How much could feedback gain? Best-of-K from the SFT model on the test questions.

RL can only make a policy prefer answers it can already produce. Sampling K answers per
question shows how far that goes: `pass_at_k` is the share of questions with at least one
correct answer among the K (a perfect judge picking the best), `rm_best_of_k` the share where
the reward model's favourite is correct, `sample_mean` a single sample's accuracy. With the
pipeline's PPO on the execution reward (`--headroom`) these bound what a reward model could add.
"""
from __future__ import annotations

from typing import Any

import torch

from gptlab.data.instruct import encode_prompt, end_of_response, template_tail
from gptlab.devices import to_device
from gptlab.engine import SamplingParams, generate
from gptlab.model.heads import ScalarHeadModel, has_scored_token
from gptlab.train.reward import EncodedRanking, scored_response, shared_prompt_batch


def pick_stats(correct: list[list[int]], scores: list[list[float]]) -> dict[str, float]:
    """Per question, K verdicts (1 correct) and K reward-model scores → the three shares."""
    n = len(correct)
    if n == 0:
        raise ValueError("no questions")
    best = [c[max(range(len(s)), key=s.__getitem__)] for c, s in zip(correct, scores)]
    return {"pass_at_k": sum(max(c) for c in correct) / n,
            "rm_best_of_k": sum(best) / n,
            "sample_mean": sum(sum(c) / len(c) for c in correct) / n}


@torch.no_grad()
def score_responses(reward_model: ScalarHeadModel, prompts: list[list[int]], k: int,
                    responses: list[list[int]], pad_id: int) -> list[float]:
    """Reward-model scores of K responses per prompt (responses grouped by prompt), each prompt
    encoded once. The batch goes to the model's device queued, and what its layout holds on
    the host (each response's prompt, whether each has a token to score at) is told, not read
    back: on a GPU each would wait for the device."""
    items = [EncodedRanking([p + (r or [pad_id]) for r in responses[i * k:(i + 1) * k]],
                            prompt_len=len(p))  # an empty answer still gets a score
             for i, p in enumerate(prompts)]
    b = to_device(shared_prompt_batch(items, pad_id), next(reward_model.parameters()).device)
    scored = all(has_scored_token(t, reward_model.pad_token_id) for t in b["cont_tokens"])
    return reward_model.score_continuations(b["prompt_ids"], b["prompt_mask"], b["rows"],
                                            b["cont_ids"], b["cont_mask"], b["prompt_of"],
                                            scored).tolist()


@torch.no_grad()
def best_of_k(policy: torch.nn.Module, tok: Any, reward_model: ScalarHeadModel, world: Any,
              records: list[dict], k: int = 8, temperature: float = 1.0,
              max_new_tokens: int = 80, seed: int = 0, prompts_per_batch: int = 32
              ) -> dict[str, float]:
    """Sample K answers per record (records carry the world's `id` and a `prompt`), check each
    by execution and score each with the reward model; returns `pick_stats` plus k and T."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_ids=tuple(sorted(tok.stop_ids)))
    correct: list[list[int]] = []
    scores: list[list[float]] = []
    for b in range(0, len(records), prompts_per_batch):
        chunk = records[b:b + prompts_per_batch]
        prompts = [encode_prompt(tok, r["prompt"]) for r in chunk]
        gen = generate(policy, [p for p in prompts for _ in range(k)], params,
                       seed=seed * 1_000_003 + b, pad_id=tok.pad_id)
        # Read as the reward model learned to read a response: closed by its end of turn, one
        # cut at max_new_tokens included.
        ends = [end_of_response(tok, r["prompt"]) for r in chunk]
        tails = [template_tail(tok, r["prompt"]) if reward_model.reads_template_tail else []
                 for r in chunk]
        room = [reward_model.config.context - len(p) for p in prompts]
        closed = [scored_response(t, done, ends[i // k], room[i // k], tails[i // k])
                  for i, (t, done) in enumerate(zip(gen.tokens, gen.finished))]
        s = score_responses(reward_model, prompts, k, closed, tok.pad_id)
        for j, r in enumerate(chunk):
            # Checked as `gptlab sample` writes them: a cut answer without the character its
            # cut split (`world score` of sampled answers agrees).
            rows = range(j * k, (j + 1) * k)
            texts = [tok.decode_response(r["prompt"], prompts[j], gen.tokens[i],
                                         cut=not gen.finished[i]) for i in rows]
            correct.append([int(world.check(r["id"], t.strip()).correct) for t in texts])
            scores.append(s[j * k:(j + 1) * k])
    return {**pick_stats(correct, scores), "k": k, "temperature": temperature}
