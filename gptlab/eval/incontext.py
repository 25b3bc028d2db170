"""GPT-3's in-context learning: a model asked a task with 0, 1 or K solved examples in its
prompt, and no gradient step (`gptlab incontext`).

A task is an optional instruction, a pool of solved examples and the items to answer. Each
item's prompt is the instruction, then K examples drawn from the pool, then the item, joined
by a blank line, as GPT-3's evaluation lays them out:

    Translate English to French:          <- the instruction (zero-shot has only this)

    sea otter => loutre de mer            <- an example: its prompt, then its completion

    cheese =>                             <- the item; the model writes the rest

Two ways to answer, as in GPT-3:
- free text (an item's `completion`): greedy decoding until the blank line (or a stop token),
  scored by exact match after surrounding whitespace is dropped; on the built-in world, the
  SQL is executed and scored as every stage scores it;
- multiple choice (an item's `choices` and `answer`): the choice whose tokens the model finds
  most likely after the prompt, by mean log-probability per token.

Each item draws its examples at random from the pool (never the item itself), one order per
item, so that its 1-shot example is the first of its 5-shot ones: the shot counts differ by
the examples added, not by others drawn. Where K examples do not fit the context, the last
drawn are left out ("as many as fit") and the report counts the items so cut.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from gptlab.engine import SamplingParams, eval_mode, generate
from gptlab.errors import UserError
from gptlab.eval.stats import clustered_rate, paired_delta
from gptlab.stop_strings import check_stop_strings, cut_at_stop

SEPARATOR = "\n\n"
DEFAULT_SHOTS = (0, 1, 5)


@dataclass
class Item:
    """One solved or asked case: `prompt`, and `completion` (free text) or `choices` with the
    index of the right one (`answer`); `id` the built-in world's question id."""
    prompt: str
    completion: str | None = None
    choices: list[str] | None = None
    answer: int | None = None
    id: str | None = None
    where: tuple[str | None, int | None] = (None, None)  # file and line, for errors

    def solved(self) -> str:
        """The item with its answer, as an example in a prompt."""
        return self.prompt + (self.completion if self.choices is None
                              else self.choices[self.answer])


@dataclass
class Task:
    """What `evaluate` asks: `items`, each with examples drawn from `pool`."""
    name: str
    items: list[Item]
    pool: list[Item]
    instruction: str = ""
    # Between the instruction and what follows: the world's schema is followed by one line
    # break, so that its zero-shot prompt is exactly the prompt every stage trains on.
    after_instruction: str = SEPARATOR
    stop: tuple[str, ...] = (SEPARATOR,)
    score: Callable[[Item, str], bool] | None = None  # free text; None: exact match
    pool_is_items: bool = False  # the examples come from the items' own file: skip the item
    notes: list[str] = field(default_factory=list)


def exact_match(item: Item, text: str) -> bool:
    return text.strip() == (item.completion or "").strip()


def _item_of(row: dict, path: str | None, line: int | None) -> Item:
    """An item from a JSONL record: `prompt` text with `completion` text, or with `choices`
    (two or more texts) and `answer` (the right one's index)."""
    where = (path, line)

    def bad(message: str, name: str) -> UserError:
        return UserError(message, path=path, line=line, field=name)
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("must be a non-empty text (in-context tasks are raw text, not messages)"
                  if "prompt" in row else "needs a 'prompt' and a 'completion' (or 'choices' "
                  "and 'answer')", "prompt")
    if "choices" in row:
        choices, answer = row["choices"], row.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) and c for c in choices):
            raise bad("must be a list of two or more non-empty texts", "choices")
        if len(set(choices)) < len(choices):
            raise bad("holds the same text twice", "choices")
        if isinstance(answer, bool) or not isinstance(answer, int) \
                or not 0 <= answer < len(choices):
            raise bad(f"must be the index of the right choice, 0 to {len(choices) - 1}, got "
                      f"{answer!r}", "answer")
        return Item(prompt, choices=choices, answer=answer, where=where)
    completion = row.get("completion")
    if not isinstance(completion, str) or not completion.strip():
        raise bad("must be a non-empty text (or give 'choices' and 'answer')", "completion")
    return Item(prompt, completion=completion, where=where)


def read_items(path: str | Path) -> list[Item]:
    """The items of a JSONL, Parquet or directory of them, each checked (file, line, field)."""
    from gptlab.io import no_records, read_jsonl, record_file
    rows = read_jsonl(path)
    if not rows:
        raise no_records(path, "records")
    items = [_item_of(r, record_file(r, path), r.get("_line")) for r in rows]
    kinds = {it.choices is None for it in items}
    if len(kinds) > 1:
        first = next(it for it in items if it.choices is not None)
        raise UserError("mixes multiple-choice records ('choices') with free-text ones "
                        "('completion'); a task is one or the other", path=first.where[0],
                        line=first.where[1], field="choices")
    return items


def file_task(data: str | Path, examples: str | Path | None = None,
              instruction: str = "", stop: Sequence[str] | None = None) -> Task:
    """A task of one's own: items from `data`; examples from `examples`, or from `data`
    itself (each item never its own example)."""
    items = read_items(data)
    pool = read_items(examples) if examples is not None else items
    if (pool[0].choices is None) != (items[0].choices is None):
        raise UserError("is multiple choice where the items are free text, or the other way",
                        path=Path(examples), field="examples")
    return Task(name=str(data), items=items, pool=pool, instruction=instruction,
                stop=check_stop_strings(stop) or (SEPARATOR,),
                pool_is_items=examples is None)


def world_task(world: Any, split: str = "test") -> Task:
    """The built-in world as GPT-3 would be asked it: the schema once, as the instruction,
    then solved questions of the training split, then the question; the answer is scored by
    executing it. Zero-shot, the prompt is the world's own (`World.prompt`)."""
    def item(q: Any) -> Item:
        return Item(f"Question: {q.text}\nSQL:", completion=" " + q.sql, id=q.id)

    def executes_right(it: Item, text: str) -> bool:
        return world.check(it.id, text.strip()).correct
    return Task(name=f"sqlworld ({split})", items=[item(q) for q in world.splits[split]],
                pool=[item(q) for q in world.train], instruction=world.schema.render(),
                after_instruction="\n", stop=("\n",), score=executes_right)


@dataclass
class Prompt:
    ids: list[int]
    shots: int  # examples it holds (fewer than asked where they did not fit)


def draw(pool: list[Item], k: int, rng: random.Random) -> list[Item]:
    """`k` distinct items of `pool`, one at a time: the first k of k + 1 drawn with the same
    generator (`random.sample` switches its method with k, so its 5 are not the first of its
    6 on a pool of 22 or more)."""
    picked: list[Item] = []
    seen: set[int] = set()
    while len(picked) < k:
        j = rng.randrange(len(pool))
        if j not in seen:
            seen.add(j)
            picked.append(pool[j])
    return picked


def build_prompts(task: Task, tok: Any, shots: int, room: int, seed: int) -> list[Prompt]:
    """Each item's prompt with up to `shots` examples, at most `room` tokens."""
    out = []
    for i, it in enumerate(task.items):
        # One order per item and seed, whatever `shots` is: K-shot extends (K-1)-shot.
        pool = [e for e in task.pool if not (task.pool_is_items and e is it)]
        drawn = draw(pool, min(shots, len(pool)), random.Random(f"{seed}/{i}"))
        for k in range(len(drawn), -1, -1):
            text = _prompt_text(task, drawn[:k], it)
            ids = tok.encode(text, bos=tok.bos_id is not None)
            if len(ids) <= room:
                out.append(Prompt(ids, k))
                break
        else:
            path, line = it.where
            raise UserError(f"the prompt alone has {len(ids)} tokens, more than the {room} the "
                            f"model's context leaves for it; shorten it or lower "
                            f"--max-new-tokens", path=path, line=line, field="prompt")
    return out


def _prompt_text(task: Task, examples: list[Item], item: Item) -> str:
    blocks = [e.solved() for e in examples] + [item.prompt]
    body = SEPARATOR.join(blocks)
    return task.instruction + task.after_instruction + body if task.instruction else body


class StopAfterText:
    """The engine's `stop_when` for an answer: a row ends once its text holds a stop string
    after its first non-space character. A model that starts its answer on a new line (" \n
    Paris") is not cut to nothing by a stop at the line's end."""

    def __init__(self, tok: Any, stop: Sequence[str], prompts: Sequence[Sequence[int]]):
        self.tok, self.stop, self.prompts = tok, tuple(stop), prompts
        self.drawn: list[list[int]] = [[] for _ in prompts]

    def __call__(self, rows: list[int], tokens: list[int]) -> list[int]:
        ended = []
        for r, t in zip(rows, tokens):
            self.drawn[r].append(int(t))
            text = self.tok.decode_continuation(self.prompts[r], self.drawn[r], cut=True)
            if any(s in text.lstrip() for s in self.stop):
                ended.append(r)
        return ended


def answer_free_text(model: torch.nn.Module, tok: Any, prompts: list[Prompt], task: Task,
                     max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations, leading space dropped, each cut before the task's stop text."""
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True,
                            stop_ids=tuple(sorted(tok.stop_ids)))
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = [p.ids for p in prompts[start:start + batch_size]]
        gen = generate(model, batch, params, seed=0, pad_id=tok.pad_id,
                       stop_when=StopAfterText(tok, task.stop, batch))
        for ids, t, done in zip(batch, gen.tokens, gen.finished):
            text = tok.decode_continuation(ids, t, cut=not done).lstrip()
            texts.append(cut_at_stop(text, task.stop)[0])
    return texts


def choice_logprobs(model: torch.nn.Module, tok: Any, prompt: list[int],
                    choices: list[str]) -> list[float]:
    """Mean log-probability per token of each choice after `prompt` (one batch, right
    padded: a causal model's real positions never see the padding after them)."""
    conts = [tok.encode(c, bos=False) for c in choices]
    rows = [prompt + c for c in conts]
    width = max(len(r) for r in rows)
    if width > model.config.context:
        raise UserError(f"a choice makes the prompt {width} tokens, past the model's context "
                        f"of {model.config.context}", field="choices")
    device = next(model.parameters()).device
    x = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
    with eval_mode(model), torch.no_grad():
        logp = model(x.to(device)).float().log_softmax(-1).cpu()
    out = []
    for i, c in enumerate(conts):
        at = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c))
        out.append(logp[i, at, torch.tensor(c)].mean().item())
    return out


def check_shots(shots: Sequence[int]) -> list[int]:
    """The shot counts, each once, fewest first; a UserError unless whole numbers >= 0."""
    if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in shots):
        raise UserError(f"must be whole numbers of at least 0, got {list(shots)}", field="shots")
    return sorted(set(shots))


def evaluate(model: torch.nn.Module, tok: Any, task: Task, shots: Sequence[int] = DEFAULT_SHOTS,
             seed: int = 0, max_new_tokens: int = 64, batch_size: int = 8,
             progress: Callable[[str], None] | None = None) -> dict:
    """Accuracy at each shot count, with a 95% interval, and each count against zero-shot
    (or the fewest asked) as a paired difference on the same items."""
    shots = check_shots(shots)
    free = task.items[0].choices is None
    context = model.config.context
    room = context - (max_new_tokens if free else max(
        len(tok.encode(c, bos=False)) for it in task.items for c in it.choices))
    if room < 1:
        raise UserError(f"leaves no room for a prompt in the model's context of {context}; "
                        f"lower it", field="max_new_tokens")
    if max(shots) > 0 and len(task.pool) - task.pool_is_items < 1:
        raise UserError("no example to show: the pool holds none besides the item",
                        field="examples")
    results: dict[str, Any] = {"task": task.name, "n": len(task.items), "seed": seed,
                               "kind": "free text" if free else "multiple choice",
                               "shots": {}}
    per_item: dict[int, list[int]] = {}
    answers: dict[int, list] = {}
    for k in shots:
        prompts = build_prompts(task, tok, k, room, seed)
        if free:
            texts = answer_free_text(model, tok, prompts, task, max_new_tokens, batch_size)
            score = task.score or exact_match
            right = [int(score(it, t)) for it, t in zip(task.items, texts)]
            answers[k] = texts
        else:
            picks = []
            for it, p in zip(task.items, prompts):
                lp = choice_logprobs(model, tok, p.ids, it.choices)
                picks.append(max(range(len(lp)), key=lp.__getitem__))
            right = [int(c == it.answer) for c, it in zip(picks, task.items)]
            answers[k] = picks
        per_item[k] = right
        rate = clustered_rate([(r, 1) for r in right])
        cut = sum(p.shots < k for p in prompts)
        results["shots"][str(k)] = {
            "accuracy": rate["mean"], "ci95": rate["ci95"], "correct": sum(right),
            "examples_mean": sum(p.shots for p in prompts) / len(prompts),
            "cut_to_fit": cut,
            "prompt_tokens_mean": sum(len(p.ids) for p in prompts) / len(prompts)}
        if progress:
            progress(f"{k}-shot: {sum(right)}/{len(right)} right"
                     + (f" ({cut} with fewer examples, to fit the context)" if cut else ""))
    base = shots[0]
    for k in shots[1:]:
        results["shots"][str(k)][f"delta_vs_{base}_shot"] = paired_delta(per_item[k],
                                                                         per_item[base])
    results["answers"] = {str(k): v for k, v in answers.items()}
    results["right"] = {str(k): v for k, v in per_item.items()}
    return results


def table(results: dict) -> str:
    """The results as a Markdown table."""
    shots = list(results["shots"])
    base = shots[0]
    lines = [f"{results['task']}: {results['n']} items, {results['kind']}", "",
             f"| shots | accuracy [95% CI] | examples (mean) | vs {base}-shot [95% CI] |",
             "|---:|---|---:|---|"]
    for k in shots:
        r = results["shots"][k]
        ci = "" if r["ci95"] is None else f" [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        d = r.get(f"delta_vs_{base}_shot")
        # Where every item moved alike the interval is none: the sign test says it.
        vs = "" if d is None else f"{d['mean']:+.3f}" + (
            f" (sign test p = {d['p_sign']:.2g})" if d["ci95"] is None
            else f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
        lines.append(f"| {k} | {r['accuracy']:.3f}{ci} | {r['examples_mean']:.2f} | {vs} |")
    return "\n".join(lines)


def incontext(model_path: str | Path, task: str = "sqlworld", data: str | None = None,
              examples: str | None = None, world: str | None = None, split: str | None = None,
              shots: Sequence[int] = DEFAULT_SHOTS, limit: int | None = None, seed: int = 0,
              instruction: str | None = None, stop: Sequence[str] | None = None,
              max_new_tokens: int = 64, batch_size: int = 8, device: str = "auto",
              out: str | Path | None = None) -> dict:
    """`gptlab incontext`: load the model, ask the task at each shot count, print the table,
    and write the results (with every answer) to `out` as JSON."""
    from gptlab.api import load
    from gptlab.io import check_file_out, strict_json, write_text_atomic
    from gptlab.world.build import open_world
    # Every setting checked before anything loads.
    check_shots(shots)
    SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    for name, value in (("limit", limit), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise UserError(f"must be a whole number of at least 1, got {value!r}", field=name)
    if out is not None:
        check_file_out(out)
    if data is not None:
        for name, value in (("world", world), ("split", split)):
            if value is not None:
                raise UserError("sets the built-in world's task, which --data replaces",
                                field=name)
        the_task = file_task(data, examples, instruction or "", stop)
    else:
        if examples is not None:
            raise UserError("sets a --data task's examples; the built-in world's are its "
                            "training questions", field="examples")
        split = split or "test"
        if task != "sqlworld":
            raise UserError(f"is the built-in task 'sqlworld' or, with --data, a file of your "
                            f"own; got {task!r}", field="task")
        if split not in ("train", "validation", "test"):
            raise UserError(f"must be train, validation or test, got {split!r}", field="split")
        the_task = world_task(open_world(world or "builtin"), split)
        if instruction or stop:
            raise UserError("sets a file task's prompt; the built-in world's is its own",
                            field="instruction" if instruction else "stop")
    if limit is not None:
        the_task.items = the_task.items[:limit]
    model, tok = load(model_path, device)
    results = evaluate(model, tok, the_task, shots, seed, max_new_tokens, batch_size,
                       progress=lambda s: print(s, file=sys.stderr, flush=True))
    results["model"] = str(model_path)
    print(table(results))
    if out is not None:
        write_text_atomic(out, strict_json(results, non_finite="null", path=out, indent=1)
                          + "\n")
    return results
