"""Collecting feedback: sample K responses per prompt, then have labelers rank them.

The rankings file is the interface for human feedback: people can write it by hand, and the
built-in world's simulated labelers write the same format.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from gptlab.data.instruct import (SkipCounter, encode_prompt, prompt_of, read_prompts,
                                  responses_of)
from gptlab.engine import Generation, SamplingParams, generate
from gptlab.errors import UserError, counted, exception_line, kind_of, reports_path_errors
from gptlab.io import (check_file_out, check_not_input, check_not_inside,
                       check_out_of_read_dirs, read_jsonl, record_file, write_jsonl_atomic)
from gptlab.plugin import load_function
from gptlab.stop_strings import StopStrings, check_stop_strings, cut_reply, reply_stops

# (record, distinct responses) -> the responses best first, an item a response or a list of
# tied responses; or one score per response, in their order (higher is better, equal ones tie)
RankFn = Callable[[dict, list[str]], list[str | list[str]] | list[float]]


def sample_responses(model: torch.nn.Module, tokenizer: Any, records: list[dict], k: int,
                     params: SamplingParams, seed: int = 0, batch_size: int = 256,
                     skips: SkipCounter | None = None, cut: list[int] | None = None,
                     path: str | Path = "", mark_cut: bool = False,
                     progress: bool = False, stop: Sequence[str] = ()) -> list[dict]:
    """K responses per prompt record: `{**record, "responses": [...]}`.

    Each prompt is repeated K times in the batch; rows differ by the sampler's random stream.
    `cut`, a list, gets the number of responses that `max_new_tokens` stopped before their EOS
    (or end of turn) appended. `path`, the file the records come from, is named with a record's
    line when its prompt cannot be encoded (a conversation the chat template refuses).
    `mark_cut` (`gptlab sample`) adds `"finished": [...]`, per response whether it ended on its
    own, and decodes a cut response without a last character the cut split (`decode_cut`: no
    U+FFFD at the end); without it (the pipeline) every response is decoded whole. Each is
    decoded as the response to its prompt (`Tokenizer.decode_response`): the text that
    encodes back to the tokens sampled.
    `progress`: a bar of the responses made on stderr, when stderr is a terminal.
    `stop` (`gptlab sample --stop`): texts that end a response as soon as its text holds one
    (`stop_strings.StopStrings`); each response is written before the earliest one it holds,
    and `"stopped_by": [...]` says per response which one that was (null: none). Without it
    no record holds `stopped_by` (a samples file sampled again loses its old one).
    """
    skips = skips if skips is not None else SkipCounter()
    stop = check_stop_strings(stop)
    stop_ids = params.stop_ids or tuple(sorted(tokenizer.stop_ids))
    room = model.config.context - params.max_new_tokens
    jobs = []
    for rec in records:
        try:
            prompt = prompt_of(rec, path and record_file(rec, path), rec.get("_line"))
            ids = encode_prompt(tokenizer, prompt)
        except UserError as e:
            raise (e.at(record_file(rec, path), rec.get("_line")) if path else e) from None
        if len(ids) > room:
            skips.add("prompts longer than the context minus max_new_tokens")
            continue
        jobs.append((rec, prompt, ids))
    # A chat prompt's answer ends where its template ends an assistant turn, as `gptlab chat`
    # ends a reply: in a token, or in text for a template whose turns end in plain text (its
    # next "\nUser:"), which the model would otherwise run on into. A text prompt has none.
    turn_ids, turn_texts = (reply_stops(tokenizer)
                            if any(not isinstance(p, str) for _, p, _ in jobs) else ((), ()))
    if not params.stop_ids:
        stop_ids = tuple(sorted({*stop_ids, *turn_ids}))
    params = dataclasses.replace(params, stop_ids=stop_ids)  # the caller's stays as it was
    ends_of = [() if isinstance(p, str) else turn_texts for _, p, _ in jobs]
    out = []
    from tqdm import tqdm
    bar = tqdm(total=len(jobs) * k, unit="response", leave=False, file=sys.stderr,
               disable=None if progress else True)  # None: only on a terminal
    per_batch = max(1, batch_size // k)
    for b in range(0, len(jobs), per_batch):
        chunk = jobs[b:b + per_batch]
        ends = ends_of[b:b + per_batch]
        if k <= batch_size:
            prompts = [ids for _, _, ids in chunk for _ in range(k)]
            gen = generate(model, prompts, params, seed=seed * 1_000_003 + b,
                           pad_id=tokenizer.pad_id,
                           **_stop_when(tokenizer, stop, prompts,
                                        [e for e in ends for _ in range(k)]))
        else:
            # K past the batch: the prompt's K rows in batches of at most `batch_size`, each
            # with a seed of its own (the first one's as before), never one batch of K rows
            # (--k 1000000 asked for a 50 GB cache at once).
            parts = []
            for start in range(0, k, batch_size):
                batch = [chunk[0][2]] * min(batch_size, k - start)
                parts.append(generate(
                    model, batch, params,
                    seed=seed * 1_000_003 + b + start // batch_size * len(jobs),
                    pad_id=tokenizer.pad_id,
                    **_stop_when(tokenizer, stop, batch, [ends[0]] * len(batch))))
            gen = _concat(parts)
        bar.update(len(gen.tokens))
        if cut is not None:
            cut.append(gen.finished.count(False))
        for j, (rec, prompt, ids) in enumerate(chunk):
            rows = range(j * k, (j + 1) * k)
            row = {key: v for key, v in rec.items()
                   if key not in ("_line", "_file", "stopped_by")}
            # With stop strings, decoded with the template's lead (the text StopStrings watched)
            # and cut in it, then the lead left out, as `decode_response` leaves it out; without
            # them, the call made before (a stand-in tokenizer need not take `lead`). A
            # template's end of turn ends the response as EOS does: no `stopped_by` of its own.
            row_stop = tuple(dict.fromkeys(stop + ends[j]))
            kept = {"lead": ""} if row_stop else {}
            responses = [tokenizer.decode_response(prompt, ids, gen.tokens[i],
                                                   cut=mark_cut and not gen.finished[i], **kept)
                         for i in rows]
            said = {}
            if row_stop:
                lead = "" if isinstance(prompt, str) else tokenizer.answer_lead(prompt)
                responses, found = zip(*(cut_reply(r, lead, row_stop) for r in responses))
                responses = list(responses)
                if stop:
                    said = {"stopped_by": [f if f in stop else None for f in found]}
            if not mark_cut:
                out.append({**row, "responses": responses, **said})
                continue
            out.append({**row, "responses": responses,
                        "finished": [bool(gen.finished[i]) for i in rows], **said})
    bar.close()
    return out


def _stop_when(tokenizer: Any, stop: tuple[str, ...], prompts: list[list[int]],
               row_stops: list[tuple[str, ...]]) -> dict[str, StopStrings]:
    """`generate`'s `stop_when` keyword for `prompts`' rows: the stop strings' check, `stop`
    and each row's own (`row_stops`, its template's end of turn in text); none without any,
    so that the call is the one made before `--stop` was (a stand-in for `generate` that does
    not take it, in a test or a plugin, still works)."""
    if not stop and not any(row_stops):
        return {}
    return {"stop_when": StopStrings(tokenizer, stop, prompts, row_stops)}


def _concat(gens: list[Generation]) -> Generation:
    """One Generation of the rows of several, in order."""
    return Generation(tokens=[t for g in gens for t in g.tokens],
                      logprobs=[lp for g in gens for lp in g.logprobs],
                      finished=[f for g in gens for f in g.finished],
                      prompt_lengths=[n for g in gens for n in g.prompt_lengths],
                      stopped_by_string=[s for g in gens for s in g.stopped_by_string])


# `gptlab sample`'s defaults: its flags read them from here, so the verb and the function agree.
SAMPLE_K = 4
SAMPLE_MAX_NEW_TOKENS = 96


@reports_path_errors
def sample_file(model_path: str | Path, prompts: str | Path, out: str | Path, k: int = SAMPLE_K,
                greedy: bool = False, temperature: float = 1.0, top_p: float | None = None,
                max_new_tokens: int = SAMPLE_MAX_NEW_TOKENS, seed: int = 0,
                device: str = "auto", stop: Sequence[str] | None = None) -> int:
    """`gptlab sample`: write K responses per prompt to `out` (JSONL), on `device` (`auto`:
    CUDA where there is a GPU). `stop`: texts that end a response (`sample_responses`).
    Returns rows written."""
    from gptlab.api import load
    if k < 1:
        raise UserError("must be at least 1", field="k")
    if greedy and k > 1:
        # Greedy decoding has one answer per prompt: K copies of it cost K times the compute,
        # and `label` would merge them and skip every prompt.
        raise UserError(f"{k} greedy responses per prompt would be {k} copies of one; use "
                        f"--k 1 with --greedy, or sample K different ones with a temperature",
                        field="k")
    # Flags, the output path and the prompts are checked before the model loads.
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=greedy,
                            temperature=temperature, top_p=top_p)
    stop = check_stop_strings(stop)
    check_file_out(out)
    check_not_input(out, {"--prompts": prompts})
    check_out_of_read_dirs(out, {"--prompts": prompts}, "prompts", writes="the samples")
    check_not_inside(out, {"--model": model_path})  # `--out MODEL/config.json` ends the model
    records = read_prompts(prompts)
    model, tok = load(model_path, device)
    skips, cut = SkipCounter(), []
    rows = sample_responses(model, tok, records, k, params, seed, skips=skips, cut=cut,
                            path=prompts, mark_cut=True, progress=True, stop=stop)
    if not rows:
        raise UserError(f"no prompt could be sampled ({skips.report('prompts')}); the model's "
                        f"context is {model.config.context} tokens, --max-new-tokens "
                        f"{max_new_tokens}", path=prompts)
    n = write_jsonl_atomic(out, rows)
    if skips.total:
        print(skips.report("prompts"), file=sys.stderr)
    if sum(cut):
        # Such a response is no finished answer, though a rankings file cannot tell: `reward`
        # reads it closed by EOS (the end of turn) like any other.
        they = ("it is", "its") if sum(cut) == 1 else ("they are", "their")
        print(f"note: {sum(cut)} of {counted(len(rows) * k, 'response')} reached "
              f"--max-new-tokens {max_new_tokens} unfinished (no end of sequence or end of "
              f"turn): {they[0]} written cut, false in {they[1]} line's \"finished\"",
              file=sys.stderr)
    return n


def distinct(responses: Iterable[str]) -> list[str]:
    """Responses with exact duplicates merged (first occurrence kept)."""
    return list(dict.fromkeys(responses))


# Fields of a sample that its ranking leaves out: its responses (ranked now), whether each
# finished and the stop string that ended each (in the responses' order, which the ranking
# changes), its line, and another ranking of the prompt.
_NOT_CARRIED = ("responses", "finished", "stopped_by", "_line", "_file", "chosen", "rejected")


def label_samples(samples: list[dict], rank: RankFn, skips: SkipCounter | None = None,
                  source: str | Path = "", dropped: SkipCounter | None = None) -> list[dict]:
    """Rankings `{"prompt"/"messages", "ranked": [best...worst], other fields}` from samples
    (other than `chosen` and `rejected`, a preference file's own ranking of the prompt).

    Identical responses are merged first and empty ones dropped (a rankings file cannot hold
    one), counted in `dropped` (default: `skips`); a prompt left with fewer than 2 distinct
    responses is skipped and counted in `skips`, and so is one whose responses the labeler
    ties all together (no preference to learn from). `rank` gets a copy of the sample and of
    its distinct responses, and returns them best first or scores them (RankFn). Tied groups
    of one are written as plain strings. An error names `source` (the samples file) and the
    sample's `_line`, when known.
    """
    skips = skips if skips is not None else SkipCounter()
    dropped = dropped if dropped is not None else skips
    rankings = []
    for s in samples:
        line, where = s.get("_line"), record_file(s, source)
        prompt_of(s, where, line)  # a ranking needs its prompt: refuse here, not in `reward`
        responses = distinct(responses_of(s, where, line))
        for _ in range(sum(not r.strip() for r in responses)):
            dropped.add("empty responses left out of rankings")
        responses = [r for r in responses if r.strip()]
        if len(responses) < 2:
            skips.add("prompts with fewer than 2 distinct responses")
            continue
        try:
            # Copies, deep: a labeler that sorts its list in place or edits a message changes
            # no sample, and its answer is checked against the responses it was given.
            levels = _ranking_levels(rank(copy.deepcopy(s), list(responses)), responses,
                                     s.get("id"))
        except UserError as e:
            raise (e.at(where, line) if where else e) from None
        if len(levels) < 2:
            skips.add("prompts whose responses are all tied")
            continue
        # A preference file sampled as prompts carries its own `chosen`/`rejected`: beside the
        # new `ranked`, `gptlab reward` would refuse the line for holding two rankings.
        row = {k: v for k, v in s.items() if k not in _NOT_CARRIED}
        rankings.append({**row, "ranked": [lv[0] if len(lv) == 1 else lv for lv in levels]})
    return rankings


def _ranking_levels(answer: Any, responses: list[str], sample_id: Any = None
                   ) -> list[list[str]]:
    """A labeler's answer (RankFn) as levels, best first: its order (a plain string is a level
    of one), or its scores grouped, highest first, equal scores one level (in `responses`'
    order). A UserError (field `ranked`, naming `sample_id` when given) unless the answer
    orders exactly `responses`, each once, in non-empty levels, or gives each a real score."""
    of_id = "" if sample_id is None else f" for id {sample_id!r}"
    if hasattr(answer, "tolist") and not isinstance(answer, (list, tuple)) \
            and getattr(answer, "ndim", 1) != 0:  # 0-d: one number, not a list, said as such
        answer = answer.tolist()  # scores as a NumPy array or a tensor, as PPO's reward takes
    if not isinstance(answer, (list, tuple)):
        raise UserError(f"the labeler returned {kind_of(answer)}{of_id}, not a list: the responses "
                        f"best first (tied ones as lists), or one score per response",
                        field="ranked")
    if answer and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in answer):
        return _score_levels(list(answer), responses, of_id)
    if answer and not any(isinstance(x, (str, list, tuple)) for x in answer):
        # Scores, one of which is none (True, None): "must return a permutation" misled.
        i, x = next((i, x) for i, x in enumerate(answer)
                    if isinstance(x, bool) or not isinstance(x, numbers.Real))
        shown = "" if x is None else f" ({x!r:.40})"
        raise UserError(f"the labeler returned {kind_of(x)}{shown} as the score of response "
                        f"{i + 1} of {len(answer)}{of_id}; a score must be a real number",
                        field="ranked")
    levels = [item if isinstance(item, list) else [item] for item in answer]
    bad = next((r for item in answer if isinstance(item, list) for r in item
                if isinstance(r, numbers.Real)), None)
    if bad is not None:
        # A list of lists of numbers (scores as a 2-D array): not responses, not one score each.
        raise UserError(f"the labeler returned a list holding {kind_of(bad)} ({bad!r:.40}) "
                        f"inside a list{of_id}: a level of tied responses holds texts; scores "
                        f"are one real number per response, in a flat list", field="ranked")
    flat = [r for level in levels for r in level]
    if not all(levels) or not all(isinstance(r, str) for r in flat) \
            or sorted(flat) != sorted(responses):
        about = f"; it did not{of_id}" if of_id else ""
        raise UserError("the labeler must return a permutation of the responses (tied ones as "
                        f"non-empty lists), or one score per response{about}", field="ranked")
    return levels


def _score_levels(scores: list[numbers.Real], responses: list[str], of_id: str
                  ) -> list[list[str]]:
    """`responses` grouped by their `scores` (as floats), highest first; equal scores are one
    level."""
    if len(scores) != len(responses):
        raise UserError(f"the labeler returned {len(scores)} scores{of_id}, for "
                        f"{len(responses)} responses (one score per response, in their order)",
                        field="ranked")
    floats = []
    for i, x in enumerate(scores):
        try:
            floats.append(float(x))
        except OverflowError:  # an integer such as 10 ** 400: no float holds it
            raise UserError(f"the labeler returned a score out of a float's range (beyond "
                            f"±1.8e308){of_id}, response {i + 1} of {len(responses)}",
                            field="ranked") from None
        if not math.isfinite(floats[-1]):  # NaN would compare unequal to itself and to all
            raise UserError(f"the labeler returned a non-finite score ({floats[-1]}){of_id}, "
                            f"response {i + 1} of {len(responses)}", field="ranked")
    by_score: dict[float, list[str]] = {}
    for x, r in zip(floats, responses):
        by_score.setdefault(x, []).append(r)
    return [by_score[x] for x in sorted(by_score, reverse=True)]


def sqlworld_ranker(world_dir: str | Path | None = None, disagreement: float = 0.1,
                    seed: int = 0, ties: bool = True) -> RankFn:
    """The built-in world's simulated labeler as a RankFn (records need the world's `id`).

    ties=True: correct > wrong > error with the answers of one tier tied; False: a strict order.
    """
    from gptlab.world.build import open_world
    world = open_world(world_dir or "builtin")
    labeler = world.labeler(disagreement=disagreement, seed=seed, ties=ties)

    def check_id(record: dict) -> None:
        """Refuse a record whose `id` is no question of the world, naming the field."""
        if "id" not in record:
            raise UserError("the sqlworld labeler needs each sample's 'id'", field="id")
        if not isinstance(record["id"], str):  # the world's own message
            world.gold(record["id"])
        try:
            world.gold(record["id"])
        except UserError as e:  # most often samples of one's own task, not the world's
            raise UserError(f"{e.message}; the sqlworld labeler ranks only the built-in "
                            f"world's questions: for your own data, rank with your own function "
                            f"(--labeler module:function) or write the rankings file yourself "
                            f"(README, 'Your own task')", field="id") from None

    def rank(record: dict, responses: list[str]) -> list[str | list[str]]:
        check_id(record)
        return labeler.rank(record["id"], responses).ranked_json()
    rank.check_id = check_id  # type: ignore[attr-defined]  # for every line, ranked or not
    return rank


def own_ranker(spec: str) -> RankFn:
    """`gptlab label --labeler module:function`: the user's RankFn, imported. Whatever it
    raises stops the labeling as a UserError naming the function, the exception and the
    sample's id (label_samples adds the samples file and line); its own UserError passes."""
    _, fn = load_function(spec, "labeler")

    def rank(record: dict, responses: list[str]) -> Any:
        try:
            return fn(record, responses)
        except UserError:
            raise
        except (Exception, SystemExit) as e:  # the user's function: never a traceback, nor a
            # silent end (sys.exit(0) would exit with success and no rankings)
            of_id = f" for id {record['id']!r}" if "id" in record else ""
            raise UserError(f"the labeler {spec} raised {exception_line(e)}{of_id}",
                            field="labeler") from e
    return rank


@reports_path_errors
def label_file(samples_path: str | Path, out: str | Path, labeler: str = "sqlworld",
               world: str | Path | None = None, disagreement: float | None = None,
               seed: int | None = None, ties: bool | None = None) -> int:
    """`gptlab label`: rank a samples file into a rankings file. Returns rankings written.

    `labeler`: `sqlworld`, the built-in world's simulated labeler, whose settings are `world`,
    `disagreement`, `seed` and `ties` (None: the built-in world, 0.1, 0, True); or
    `module:function`, a RankFn of the user's, which takes none of them."""
    given = {"world": world, "disagreement": disagreement, "seed": seed, "ties": ties}
    if ":" in labeler:
        for name, value in given.items():
            if value is not None:  # silently ignored, the user would think it applied
                flag = "--no-ties" if value is False else f"--{name}"
                raise UserError(f"is a setting of the sqlworld labeler; {labeler}, a labeler "
                                f"of your own, ranks as it likes: leave {flag} out",
                                field=name)
        rank = own_ranker(labeler)
    elif labeler != "sqlworld":
        raise UserError(f"unknown labeler '{labeler}' (available: sqlworld, or module:function "
                        f"for a ranking function of your own; README, 'Your own task')",
                        field="labeler")
    elif world is not None and not str(world).strip():  # not the built-in world, silently
        raise UserError("is empty; give a world directory, or leave --world out for the "
                        "built-in world", field="world")
    check_file_out(out)
    # The samples, or a file of the world, would be replaced by the rankings.
    from gptlab.world.build import FILES
    check_not_input(out, {"--in": samples_path, **({} if world is None else {
        f"{name} of --world": Path(world) / name for name in FILES})})
    check_out_of_read_dirs(out, {"--in": samples_path}, "samples", writes="the rankings")
    if labeler == "sqlworld":
        # Every line, also one that would be skipped (its responses all the same), needs its id.
        samples = read_jsonl(samples_path, required=("id",))
        rank = sqlworld_ranker(world, 0.1 if disagreement is None else disagreement,
                               seed or 0, True if ties is None else ties)
        # A line skipped for its responses (all the same) is checked too: an id the world
        # does not have was refused only where it was ranked.
        for rec in samples:
            try:
                rank.check_id(rec)  # type: ignore[attr-defined]
            except UserError as e:
                raise e.at(record_file(rec, samples_path), rec.get("_line")) from None
    else:
        samples = read_jsonl(samples_path)
    skips, dropped = SkipCounter(), SkipCounter()
    rankings = label_samples(samples, rank, skips, samples_path, dropped)
    if dropped.total:
        print(dropped.report("responses"), file=sys.stderr)
    if not rankings:  # an empty rankings file would only fail later, in `gptlab reward`
        raise UserError(f"ranked none of {counted(len(samples), 'prompt')}: "
                        f"{skips.report('prompts') if skips.total else 'no samples'}",
                        path=samples_path)
    n = write_jsonl_atomic(out, rankings)
    if skips.total:
        print(skips.report("prompts"), file=sys.stderr)
    print(f"ranked {counted(n, 'prompt')}", file=sys.stderr)
    return n
