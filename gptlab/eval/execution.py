"""Execution accuracy: answer each question greedily, run the SQL, compare with the gold result."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from gptlab.data.instruct import SkipCounter
from gptlab.engine import SamplingParams
from gptlab.errors import UserError
from gptlab.io import record_file
from gptlab.world.build import open_world  # noqa: F401 - where callers have found it


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer: Any, records: list[dict], max_new_tokens: int = 96,
           batch_size: int = 64) -> list[str]:
    """Greedy responses to prompt records (the fixed evaluation decoding)."""
    # Decoded as the pipeline's samples are, a cut one whole (no mark_cut), unlike `gptlab
    # sample`: SFT keeps the weights of its best execution accuracy on these answers, and the
    # demo's published weights and eval/answers.jsonl are these bytes.
    from gptlab.feedback import sample_responses
    skips = SkipCounter()
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    rows = sample_responses(model, tokenizer, records, 1, params, batch_size=batch_size,
                            skips=skips)
    if skips.total:
        raise UserError("some evaluation prompts do not fit the context: "
                        + skips.report("prompts"), field="prompt")
    return [r["responses"][0] for r in rows]


def exec_verdicts(world: Any, records: list[dict], responses: list[str]) -> list[str]:
    """The checker's verdict per record: "correct", "wrong" (runs, other result) or "error"
    (does not run: a syntax error, an unknown column, the step budget)."""
    return [world.check(r["id"], resp.strip()).kind for r, resp in zip(records, responses)]


def exec_correct(world: Any, records: list[dict], responses: list[str]) -> list[int]:
    """1 where the response's SQL returns the gold result, else 0 (per record)."""
    return [int(kind == "correct") for kind in exec_verdicts(world, records, responses)]


def world_exec_evaluator(world_spec: Any, tokenizer: Any, records: list[dict],
                         max_new_tokens: int = 96, path: str | Path | None = None,
                         context: int | None = None) -> Callable[[torch.nn.Module], float]:
    """A function model -> execution accuracy on `records` (which carry world ids). Checked
    here, before any training: every id is the world's and, given the model's `context`,
    every prompt leaves room for `max_new_tokens`; errors name `path` and the record's line."""
    from gptlab.data.instruct import encode_prompt, prompt_of
    world = open_world(world_spec)
    records = [r for r in records if "id" in r]
    if not records:
        raise UserError("no records with an 'id' to evaluate execution accuracy on", path=path,
                        field="id")
    for r in records:
        try:
            world.gold(str(r["id"]))
            if context is not None:
                n = len(encode_prompt(tokenizer, prompt_of(r)))
                if n > context - max_new_tokens:
                    raise UserError(f"the prompt's {n} tokens leave no room for max_new_tokens "
                                    f"{max_new_tokens} in the model's context of {context}; use "
                                    f"a smaller --max-new-tokens", field="prompt")
        except UserError as e:
            raise (e.at(record_file(r, path), r.get("_line")) if path else e) from None

    def evaluate(model: torch.nn.Module) -> float:
        responses = answer(model, tokenizer, records, max_new_tokens)
        hits = exec_correct(world, records, responses)
        return sum(hits) / len(hits)
    return evaluate


def score_samples(world: Any, path: str | Path) -> tuple[dict[str, Any], list[dict]]:
    """`gptlab world score`: execution accuracy of a samples file (what `gptlab sample`
    writes: `id` and `responses` per line). The first response of each prompt is the one
    scored as the model's answer (the greedy one with `--greedy`); every response counts
    towards `all_responses`. Returns the summary and one verdict row per prompt."""
    from gptlab.data.instruct import responses_of
    from gptlab.io import read_jsonl
    rows = read_jsonl(path, required=("id", "responses"))
    if not rows:
        raise UserError("no samples to score", path=path)
    first: list[int] = []
    first_on_suite: list[int] = []  # first responses right on the variant databases too
    errors = 0  # first responses that do not run
    every: list[int] = []
    unseen: list[int] = []
    verdicts = []
    line_of: dict[str, tuple[str | Path, int]] = {}
    for r in rows:
        where = record_file(r, path)
        responses = responses_of(r, where, r["_line"])
        # A question counted twice would weigh twice in the accuracy.
        seen = line_of.setdefault(str(r["id"]), (where, r["_line"]))
        if seen != (where, r["_line"]):
            first = f"line {seen[1]}" + ("" if seen[0] == where else f" of {seen[0]}")
            raise UserError(f"id {r['id']!r} is repeated (first on {first}); score each "
                            f"question once, with all its responses on one line", path=where,
                            line=r["_line"], field="id")
        try:
            kinds = [world.check(r["id"], resp.strip()).kind for resp in responses]
        except UserError as e:  # an id the world does not know: say where it came from
            raise e.at(where, r["_line"]) from None
        hits = [int(k == "correct") for k in kinds]
        first.append(hits[0])
        first_on_suite.append(int(hits[0] and world.agrees_on_variants(str(r["id"]),
                                                                   responses[0].strip())))
        errors += kinds[0] == "error"
        every.extend(hits)
        if world.unseen_phrasing(str(r["id"])):  # the world's mark, not the file's
            unseen.append(hits[0])
        verdicts.append({"id": r["id"], "verdicts": kinds, "correct": bool(hits[0]),
                         "correct_on_test_suite": bool(first_on_suite[-1])})
    summary = {"prompts": len(rows), "exec_acc": sum(first) / len(first),
               "exec_acc_test_suite": sum(first_on_suite) / len(first),
               "exec_errors": errors, "exec_error_rate": errors / len(first),
               "all_responses": sum(every) / len(every), "responses": len(every),
               "unseen_phrasing": sum(unseen) / len(unseen) if unseen else None,
               "n_unseen_phrasing": len(unseen)}
    return summary, verdicts
