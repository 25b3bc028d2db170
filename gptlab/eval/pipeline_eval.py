"""The pipeline's fixed evaluation, so numbers compare across runs: greedy decoding on the whole
held-out test split, the noise-free labeler, paired intervals, win rate, KL and the ptx check."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

from gptlab.checkpoint import load_model, load_reward_model, read_meta
from gptlab.devices import queued_copy
from gptlab.engine import SamplingParams, generate
from gptlab.eval.execution import answer, exec_verdicts
from gptlab.eval.stats import paired_delta
from gptlab.io import read_jsonl, write_jsonl_atomic
from gptlab.model.attention import common_prefix_length
from gptlab.train.loop import select_device
from gptlab.train.ppo import Rollout, layout, response_logprobs, right_padded_rows
from gptlab.world.variants import VARIANTS


def read_test_questions(world: Any, path: Path, limit: int | None = None) -> list[dict]:
    """The evaluation's questions: the first `limit` (all: None or 0) of the world's
    test.jsonl at `path`, each checked before any model answers it, naming its line: an `id`
    of the world's test split, once, and a `prompt` of text. Its gold SQL (`completion`) and
    `unseen_phrasing` are the world's own, whatever the line says: scoring always went by the
    world, and the report would show an edited line's."""
    from gptlab.errors import UserError
    from gptlab.io import record_file
    records = read_jsonl(path, required=("id", "prompt"))[:limit or None]
    lines: dict[str, int] = {}
    for r in records:
        try:
            gold = world.gold(r["id"])  # an id string of this world
            if world.question(r["id"]).split != "test":
                raise UserError(f"'{r['id']}' is a {world.question(r['id']).split} question, "
                                f"not a test one: the evaluation answers held-out questions "
                                f"only", field="id")
            if r["id"] in lines:  # counted twice, it would weigh twice in every figure
                raise UserError(f"'{r['id']}' is repeated (first on line {lines[r['id']]}); "
                                f"each question counts once", field="id")
            if not isinstance(r["prompt"], str):
                raise UserError(f"expected text, got {type(r['prompt']).__name__}",
                                field="prompt")
        except UserError as e:
            raise e.at(record_file(r, path), r["_line"]) from None
        lines[r["id"]] = r["_line"]
        r["completion"] = " " + gold
        r["unseen_phrasing"] = world.unseen_phrasing(r["id"])
    return records


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def win_rate(world: Any, records: list[dict], a: list[str], b: list[str],
             by_verdict: bool = False) -> float:
    """Share of questions where the noise-free labeler prefers a's answer; ties count half.

    Its strict preference (the labelers' with `--no-ties`): a correct answer over a wrong one
    over one that does not run, and among equals the shorter SQL; answers it cannot tell apart
    (the same verdict and length, identical answers among them) are ties. `by_verdict`: as the
    labelers rank by default, answers of one verdict are ties whatever their length. Either
    way, swapping a and b gives 1 minus the rate. No records have no rate (it divided by 0),
    and answers not one of each per record would be paired with the wrong questions (zip
    dropped the extra ones): both are refused, as `paired_delta` refuses them."""
    if not records or not len(records) == len(a) == len(b):
        raise ValueError(f"win_rate needs one answer of a and one of b for each of at least one "
                         f"record, got {len(records)} records, {len(a)} and {len(b)} answers")
    labeler = world.labeler(disagreement=0.0)
    wins = 0.0
    for rec, x, y in zip(records, a, b):
        kx = labeler.careful_key(world.check(rec["id"], x.strip()), x)
        ky = labeler.careful_key(world.check(rec["id"], y.strip()), y)
        if by_verdict:
            kx, ky = kx[:1], ky[:1]
        wins += 0.5 if kx == ky else float(kx < ky)
    return wins / len(records)


def rm_accuracy_noise_free(world: Any, reward_dir: Path, ties: bool = True,
                           data: Path | None = None, device: str | torch.device = "cpu"
                           ) -> tuple[float | None, int, int, list[float] | None]:
    """A reward model's pairwise accuracy on its held-out rankings, judged by the noise-free
    labeler: the same held-out prompts and responses the training run set aside, re-ranked
    without the labelers' disagreement, so the number is the reward model's agreement with the
    truth rather than with one noisy labeler. `data`: the rankings it was trained on, where
    they are now (its run.json has them as given, maybe relative to another directory).
    Returns (accuracy, rankings with a preference, the pairs judged, its 95% interval with the
    prompts as the independent draws, a prompt ranked in two rounds one draw:
    `stats.clustered_rate`)."""
    from gptlab.data.instruct import Ranking, read_rankings
    from gptlab.provenance import load_run
    from gptlab.eval.stats import clustered_rate
    from gptlab.train.reward import (collate_rankings, encode_ranking, pairs_right_by_ranking,
                                     prompt_clusters, split_rankings)
    rc = load_run(reward_dir)["config"]
    if rc.get("val_data"):
        held = read_rankings(rc["val_data"])
    else:
        held = split_rankings(read_rankings(data or rc["data"]), rc["val_fraction"],
                              rc["seed"])[1]
    labeler = world.labeler(disagreement=0.0, ties=ties)
    model, tok, _ = load_reward_model(reward_dir, device, field=None)
    encoded, pairs = [], 0
    for r in held:
        verdicts = [world.check(r.id, x) for x in r.ranked]
        # Without ties the labelers' strict order puts answers of one verdict and length by
        # position: the truth has them equally good, no pair to judge.
        levels = (labeler.careful_levels if ties else labeler.equal_key_levels)(verdicts,
                                                                                r.ranked)
        if len(levels) < 2:
            continue  # every response equally good: no pair to judge
        truth = Ranking(r.prompt, [r.ranked[i] for level in levels for i in level], r.id,
                        groups=[n for n, level in enumerate(levels) for _ in level])
        e = encode_ranking(tok, truth, model.config.context, model.reads_template_tail)
        if e is not None:
            encoded.append(e)
            pairs += sum(len(a) * len(b) for i, a in enumerate(levels) for b in levels[i + 1:])
    if not encoded:
        return None, 0, 0, None
    batches = [collate_rankings(encoded[i:i + 8], tok.pad_id) for i in range(0, len(encoded), 8)]
    rate = clustered_rate(pairs_right_by_ranking(model, batches), prompt_clusters(encoded))
    return rate["mean"], len(encoded), pairs, rate["ci95"]


@torch.no_grad()
def sequence_kl(policy: torch.nn.Module, reference: torch.nn.Module, tok: Any,
                records: list[dict], max_new_tokens: int, seed: int = 0,
                batch_size: int = 64) -> float:
    """Mean over prompts of Σ_t log π(y_t)/π_ref(y_t) (k1) for responses sampled from π.

    Each batch's sequences go through the reference together, laid out as a PPO rollout is
    (prompts left-padded, a shared start encoded once) and scored as PPO scores them against
    its reference (a batch whose log-probabilities would pass KL_SCORE_ELEMENTS, in as few
    forwards as keep them under it); the batch's KLs are read together: on a GPU each read,
    plain copy or forward of its own waits for the device or pays its launches."""
    from gptlab.data.instruct import encode_prompt, prompt_of
    total, n = 0.0, 0
    device = next(reference.parameters()).device
    for b in range(0, len(records), batch_size):
        prompts = [encode_prompt(tok, prompt_of(r)) for r in records[b:b + batch_size]]
        gen = generate(policy, prompts, SamplingParams(max_new_tokens=max_new_tokens,
                                                       stop_ids=tuple(sorted(tok.stop_ids))),
                       seed=seed + b, pad_id=tok.pad_id)
        # A prompt alone shares its start with no other: encoding it apart is one more forward.
        shared = common_prefix_length(prompts) if len(prompts) > 1 else 0
        ids, mask, rmask, P, prefix = layout(prompts, gen.tokens, tok.pad_id, device, shared)
        ro = Rollout(ids, mask, rmask, P, [], gen.tokens, torch.tensor(gen.finished), prefix,
                     right_padded=right_padded_rows(prompts, gen.tokens, shared))
        ref_sum = _response_logprob_sums(reference, ro)
        # The policy's sums in float32, as the reference's are (and as they were subtracted
        # one sequence at a time).
        own = queued_copy(torch.tensor([sum(lp) for lp in gen.logprobs]), device)
        for kl in (own - ref_sum).tolist():
            total += kl
            n += 1
    return total / max(n, 1)


# The most log-probabilities (rows x response tokens x vocabulary) the KL's reference computes
# in one forward: float32, 256 MiB a tensor, of which the forward holds about three at once.
# 64 samples of 80 tokens over GPT-2's vocabulary are 1 GiB each: those go 16 rows at a time.
KL_SCORE_ELEMENTS = 2**26


def _response_logprob_sums(reference: torch.nn.Module, ro: Rollout) -> torch.Tensor:
    """Σ_t log π_ref(y_t) of each row of `ro` (B,), its rows scored together as far as
    KL_SCORE_ELEMENTS allows (a batch within it, as the demo's, in one forward)."""
    B, R = ro.response_mask.shape
    rows = max(1, KL_SCORE_ELEMENTS // max(1, R * reference.config.vocab_size))
    parts = [ro] if rows >= B else [
        ro.rows(torch.arange(i, min(i + rows, B), device=ro.ids.device),
                list(range(i, min(i + rows, B)))) for i in range(0, B, rows)]
    sums = []
    for part in parts:
        ref_lp, _ = response_logprobs(reference, part, temperature=1.0)  # (rows, R)
        sums.append(ref_lp.masked_fill(part.response_mask == 0, 0.0).sum(-1))
    return torch.cat(sums)


@torch.no_grad()
def corpus_perplexity(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """exp of the mean loss per token: each batch's mean loss weighted by its tokens, so a
    short last batch counts for what it holds. The batches go to the model's device queued,
    every position of a block a target (`all_targets`: no read of the labels), and the
    losses are read together at the end: on a GPU each read or plain copy waits. No batches
    have no perplexity (it divided by 0): refused, as `win_rate` refuses no records."""
    if not batches:
        raise ValueError("corpus_perplexity needs at least one batch of blocks, got none")
    device = next(model.parameters()).device
    losses = [model(queued_copy(b[:, :-1], device), labels=queued_copy(b[:, 1:], device),
                    all_targets=True) for b in batches]
    total = sum(loss * b[:, 1:].numel()
                for loss, b in zip(torch.stack(losses).tolist() if losses else [], batches))
    return math.exp(total / sum(b[:, 1:].numel() for b in batches))


def evaluate_pipeline(pipe: Any, pretrain_dir: Path, sft_dir: Path, control_dir: Path) -> dict:
    """The report's figures (README: "The evaluation and `report.json`") for every model of the
    run; writes each model's answers to eval/answers.jsonl."""
    cfg, out, world = pipe.cfg, pipe.out, pipe.world
    device = select_device("auto")  # where the stages trained: a GPU where there is one
    test = pipe.test_questions()
    unseen = [i for i, r in enumerate(test) if r.get("unseen_phrasing")]
    models = {"pretrained": pretrain_dir, "sft": sft_dir, "sft_continued": control_dir}
    for rnd in range(1, cfg.rounds + 1):
        models[f"ppo_round_{rnd}"] = out / f"round-{rnd}" / "ppo"
    final = f"ppo_round_{cfg.rounds}"
    if cfg.headroom:
        models["ppo_execution_reward"] = out / "ppo_execution_reward"
        models["ppo_execution_reward_on_test"] = out / "ppo_execution_reward_on_test"

    answers: dict[str, list[str]] = {}
    correct: dict[str, list[int]] = {}
    errors: dict[str, list[int]] = {}  # 1 where the answer's SQL does not run
    on_suite: dict[str, list[int]] = {}  # 1 where it is also right on the variant databases
    # One model is held at a time, two where a figure compares them (the KL, best-of-K): the
    # name is dropped before the next load, or a large preset held three on one GPU.
    for name, path in models.items():
        model, tok, _ = load_model(path, device)
        answers[name] = answer(model, tok, test, cfg.max_new_tokens)
        del model
        kinds = exec_verdicts(world, test, answers[name])
        correct[name] = [int(k == "correct") for k in kinds]
        errors[name] = [int(k == "error") for k in kinds]
        on_suite[name] = [int(hit and world.agrees_on_variants(r["id"], a.strip()))
                          for hit, r, a in zip(correct[name], test, answers[name])]
        print(f"  {name}: exec_acc {mean(correct[name]):.3f}", file=sys.stderr, flush=True)
    write_jsonl_atomic(out / "eval" / "answers.jsonl", (
        {"id": r["id"], "question": r.get("question"), "gold": r["completion"].strip(),
         **{n: answers[n][i] for n in models},
         **{f"{n}_correct": bool(correct[n][i]) for n in models},
         **{f"{n}_correct_on_test_suite": bool(on_suite[n][i]) for n in models}}
        for i, r in enumerate(test)))

    def per_model(flags: dict[str, list[int]], idx: list[int] | None = None) -> dict:
        """Each model's share of questions flagged 1 (of those at `idx`, else of all), and
        "ppo": the last round's."""
        means = {n: mean(flags[n] if idx is None else [flags[n][i] for i in idx])
                 for n in models}
        return {**means, "ppo": means[final]}

    exec_acc = per_model(correct)
    exec_unseen = per_model(correct, unseen)
    exec_error = per_model(errors)
    exec_suite = per_model(on_suite)

    # Reward-model accuracy on each round's held-out rankings: against the noise-free labeler
    # (the evaluation's judge, as for the win rate), and against the noisy labelers who made
    # the rankings (what `gptlab reward` reports, bounded by their disagreement).
    rm_acc, rm_ci, rm_acc_labelers, rm_heldout, rm_pairs = [], [], [], [], []
    for rnd in range(1, cfg.rounds + 1):
        rm_dir = out / f"round-{rnd}" / "reward"
        meta = read_meta(rm_dir)
        acc_true, n_true, pairs, ci = rm_accuracy_noise_free(
            world, rm_dir, cfg.ties, data=out / f"round-{rnd}" / "rankings_all.jsonl",
            device=device)
        rm_acc.append(acc_true)
        rm_ci.append(ci)
        rm_acc_labelers.append(meta.get("heldout_pairwise_acc"))
        rm_heldout.append(n_true)
        rm_pairs.append(pairs)

    policy, tok, _ = load_model(models[final], device)
    sft_model, _, _ = load_model(sft_dir, device)
    kl = sequence_kl(policy, sft_model, tok, test, cfg.max_new_tokens, seed=cfg.seed)
    from gptlab.data.tokens import load_token_data
    pc = pipe.pretrain_config()  # the pretraining run's validation blocks, split as it split them
    data = load_token_data(pc.data, tok, pc.block_size or sft_model.config.context,
                           pc.val_fraction, pc.seed, pc.cache_dir)
    val = data.val_batches(8, 8)
    # The pretrained model's figure is the reference: what SFT forgot, what PPO-ptx brought back.
    # A corpus of one block holds none out (pretraining notes it and trains on): no figure, not
    # a division by 0 once every stage has trained.
    ptx = dict.fromkeys(("corpus_ppl_sft", "corpus_ppl_ppo", "corpus_ppl_pretrained"))
    if val:
        ptx.update(corpus_ppl_sft=corpus_perplexity(sft_model, val),
                   corpus_ppl_ppo=corpus_perplexity(policy, val))
    else:
        print("  note: the pretraining corpus is a single block, none held out for validation: "
              "no corpus perplexities (n/a)", file=sys.stderr)
    del policy
    if val:
        pretrained = load_model(pretrain_dir, device)[0]
        ptx["corpus_ppl_pretrained"] = corpus_perplexity(pretrained, val)
        del pretrained

    samples = []  # as the report's SAMPLES_NOTE says: the first three, then where they differ
    for i, r in enumerate(test):
        if len(samples) >= 10:
            break
        if answers["sft"][i] != answers[final][i] or i < 3:
            samples.append({"id": r["id"], "question": r.get("question"),
                            "gold": r["completion"].strip(), "sft": answers["sft"][i].strip(),
                            "ppo": answers[final][i].strip(),
                            "sft_correct": bool(correct["sft"][i]),
                            "ppo_correct": bool(correct[final][i])})
    results = {
        "exec_acc": exec_acc,
        "exec_acc_unseen_phrasing": exec_unseen,
        "exec_error_rate": exec_error,
        "exec_acc_test_suite": exec_suite,
        "test_suite_variants": VARIANTS,
        "delta_ppo_vs_sft": paired_delta(correct[final], correct["sft"]),
        "delta_ppo_vs_sft_continued": paired_delta(correct[final], correct["sft_continued"]),
        "rm_pairwise_acc": rm_acc[-1],
        "rm_pairwise_acc_per_round": rm_acc,
        "rm_pairwise_acc_ci95_per_round": rm_ci,
        "rm_pairwise_acc_labelers_per_round": rm_acc_labelers,
        "rm_heldout_rankings_per_round": rm_heldout,
        "rm_heldout_pairs_per_round": rm_pairs,
        "win_rate_ppo_vs_sft": win_rate(world, test, answers[final], answers["sft"]),
        "win_rate_ppo_vs_sft_by_verdict": win_rate(world, test, answers[final], answers["sft"],
                                                   by_verdict=True),
        "kl_ppo_vs_sft": kl,
        "ptx": ptx,
        "n_test": len(test),
        "n_unseen_phrasing": len(unseen),
        "samples": samples,
    }
    if cfg.headroom:
        from gptlab.eval.headroom import best_of_k
        rm = load_reward_model(out / f"round-{cfg.rounds}" / "reward", device, field=None)[0]
        results["headroom"] = best_of_k(sft_model, tok, rm, world, test, cfg.headroom_k,
                                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        results["headroom"]["sft_greedy"] = exec_acc["sft"]
        results["delta_ppo_execution_reward_vs_sft"] = paired_delta(
            correct["ppo_execution_reward"], correct["sft"])
        results["delta_ppo_execution_reward_on_test_vs_sft"] = paired_delta(
            correct["ppo_execution_reward_on_test"], correct["sft"])
    return results
