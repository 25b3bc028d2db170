"""InstructGPT step 2: a reward model from K-wise rankings.

The model is the SFT model with a scalar head reading the last real token. For a prompt with K
ranked responses the loss is −1/C(K,2) Σ_{i<j} log σ(r(x, y_i) − r(x, y_j)) (y_i ranked above
y_j); all pairs of a prompt share one batch element, so each prompt is one gradient
contribution however large K is. Tied responses form no pair: the loss and the pairwise
accuracy are taken over the pairs with a real preference only. Without --val-data, the held-out
rankings are drawn by prompt (a prompt ranked in two rounds is held out or trained on whole),
and the held-out accuracy's interval takes the prompts as its draws (`clustered_rate`). After
training, a bias and a scale are set so that the policy's samples for the training prompts (a
samples file, or else the training rankings' responses) score mean 0, std 1; samples it scores
alike (raw std below MIN_SCORE_STD) are only shifted, with a warning, as dividing by so small a
spread would multiply PPO's rewards.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gptlab.checkpoint import is_value_model, load_model, model_kind, read_meta, save_model
from gptlab.data.instruct import (Ranking, SkipCounter, encode_prompt, encode_response,
                                  prompt_of, read_rankings, responses_of, template_tail)
from gptlab.devices import queued_copy, to_device
from gptlab.errors import (UserError, WrongKind, check_given, counted, reports_path_errors,
                           setting)
from gptlab.io import (check_dir_out, check_out_of_read_dirs, no_records, read_jsonl,
                       record_file)
from gptlab.model.gpt import GPT
from gptlab.model.heads import ScalarHeadModel, has_scored_token
from gptlab.provenance import record_run
from gptlab.train.batching import ListBatches, data_key, fixed_list_batches, warn_if_data_changed
from gptlab.train.loop import (TrainConfig, annotate_resume, annotate_run, check_held_out,
                               check_run_dir, held_out_rule, refuse_other_settings, resuming,
                               train)
from gptlab.eval.stats import clustered_rate
from gptlab.train.rl_math import kwise_ranking_loss, preference_pairs


# Settings that decide what an evaluation measures (the held-out rankings; without a file, the
# split settings the common loop keeps): a resume must keep them, or the run's held-out
# accuracies would be of two sets.
MEASURE_SETTINGS = ("val_data",)


@dataclass
class RewardConfig(TrainConfig):
    """Settings of `gptlab reward`: the SFT model, the rankings, the samples to normalise
    on, besides the shared training settings."""

    model: str = field(default="", metadata={"help": "the SFT model the reward model starts from"})
    data: str = field(default="", metadata={
        "help": "rankings, .jsonl, .parquet or a directory of them (ranked, best first, or "
                "chosen/rejected; tied responses are a list inside ranked, and in Parquet "
                "every item is then a list: [[\"a\"], [\"b\", \"c\"]])"})
    out: str = field(default="runs/reward", metadata={"help": "output model directory"})
    val_data: str | None = field(default=None, metadata={
        "help": "held-out rankings, .jsonl, .parquet or a directory of them (default: a slice "
                "of --data)"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of --data's rankings held out for validation when --val-data is not "
                "given (drawn by prompt: a prompt's rankings are all held out or all trained on)"})
    samples: str | None = field(default=None, metadata={
        "help": "samples, .jsonl, .parquet or a directory of them (`gptlab sample` output, "
                "e.g. the SFT model's) whose responses, duplicates included, score mean 0, "
                "std 1 (default: the training rankings' responses)"})
    epochs: float = field(default=2.0, metadata={
        "help": "passes over the rankings: sets max_steps when neither max_steps nor "
                "max_minutes is given"})
    lr: float = 5e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = field(default=8, metadata={
        "help": "prompts (rankings) per batch, all their pairs inside"})
    eval_every: int = 50
    save_every: int = 0
    resume: bool = field(default=False, metadata={"help": "continue from OUT's latest checkpoint"})
    resume_from: str | None = field(default=None, metadata={
        "help": "continue from this checkpoint of OUT instead: step-N, N, or its path "
                "(OUT/checkpoints/step-N); implies resume"})

    def rules(self) -> list[tuple[str, bool, str]]:
        """(field, holds, what is expected): the shared rules and the reward model's."""
        return super().rules() + [
            ("val_fraction", 0 <= self.val_fraction < 1, "must be in [0, 1)"),
            held_out_rule(self.val_data, self.data),
            ("epochs", self.epochs > 0, "must be > 0"),
        ]


@dataclass
class EncodedRanking:
    """The K responses of one prompt as full token sequences, best first."""
    seqs: list[list[int]]
    id: Any = None
    groups: list[int] | None = None  # per sequence its level (0 = best, equal = tied)
    prompt_len: int | None = None    # the shared prompt's length: scored once for all K
    line: int | None = None          # the ranking's line in its file, for a message
    file: str | None = None          # its shard, where a directory was read as one file

    def __post_init__(self) -> None:
        if self.groups is None:
            self.groups = list(range(len(self.seqs)))


def encode_ranking(tokenizer: Any, r: Ranking, context: int,
                   tail: bool = False) -> EncodedRanking | None:
    """None when a response does not fit the context with its prompt (counted by the caller).
    `tail`: each response is followed by the chat template's text after its end of turn, as a
    reward model that `reads_template_tail` reads it."""
    p = encode_prompt(tokenizer, r.prompt)
    after = template_tail(tokenizer, r.prompt) if tail else []
    seqs = [p + encode_response(tokenizer, resp, r.prompt) + after for resp in r.ranked]
    if max(len(s) for s in seqs) > context:
        return None
    return EncodedRanking(seqs, r.id, list(r.groups), len(p), r.line, r.file)


def encode_rankings(tokenizer: Any, rankings: list[Ranking], context: int, skips: SkipCounter,
                    path: str | Path, tail: bool = False) -> list[EncodedRanking]:
    """The rankings of the file `path` that fit the context, encoded; the others are counted
    in `skips`. An error (the chat template may refuse a conversation) names the line."""
    out = []
    for r in rankings:
        try:
            e = encode_ranking(tokenizer, r, context, tail)
        except UserError as err:
            raise err.at(r.file or path, r.line) from None
        if e is None:
            skips.add(f"rankings longer than the context of {context}")
        else:
            out.append(e)
    return out


def scored_response(tokens: list[int], finished: bool, end: list[int], room: int,
                    tail: list[int] | None = None) -> list[int]:
    """A generated response as the reward model learned to read one (`encode_response`: the
    response's own tokens, then its end of turn `end`, then `tail`, the template's text after
    it, for a reward model that `reads_template_tail`): the stop token it wrote, or for a
    response cut at max_new_tokens the end it never reached, becomes `end`, so that the score is
    read on the same token, as in training. One that would overflow the `room` left after its
    prompt gives its last tokens to the end and the tail."""
    tail = tail or []
    if finished and len(end) > 1 and tokens[-len(end):] == end:
        # An end of turn of several tokens (Llama 2's " </s>") written whole: the model stopped
        # on its last token, and the tokens before it are the end's, not the response's.
        body = tokens[:-len(end)]
    else:
        body = tokens[:-1] if finished else tokens
    return body[:max(0, room - len(end) - len(tail))] + end + tail


# A collated batch of rankings: tensors, and with a shared prompt two host lists (`prompt_of`,
# `cont_tokens`) that say what the device would otherwise be read for.
RankingBatch = dict[str, Any]


def collate_rankings(items: list[EncodedRanking], pad_id: int) -> RankingBatch:
    """All responses of the batch, flattened to (N, T) right-padded rows; `k` per prompt and
    `groups` (B, Kmax), each response's level, padded past k."""
    seqs = [s for it in items for s in it.seqs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    k = torch.tensor([len(it.seqs) for it in items])
    groups = torch.zeros((len(items), int(k.max())), dtype=torch.long)
    for b, it in enumerate(items):
        groups[b, :len(it.groups)] = torch.tensor(it.groups)
    batch = {"input_ids": ids, "attention_mask": mask, "k": k, "groups": groups}
    if all(it.prompt_len for it in items):
        batch.update(shared_prompt_batch(items, pad_id))
    return batch


def shared_prompt_batch(items: list[EncodedRanking], pad_id: int) -> RankingBatch:
    """The same batch as prompts (B, P) left-padded plus responses (N, R) right-padded, so a
    prompt is encoded once for its K responses (see ScalarHeadModel.score_continuations);
    on the host, lists: `prompt_of`, each response's prompt (`rows`), and `cont_tokens`, each
    response's distinct tokens."""
    prompts = [it.seqs[0][:it.prompt_len] for it in items]
    conts = [s[it.prompt_len:] for it in items for s in it.seqs]
    P, R = max(map(len, prompts)), max(map(len, conts))
    p_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    p_mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        p_ids[i, P - len(p):], p_mask[i, P - len(p):] = torch.tensor(p), 1
    c_ids = torch.full((len(conts), R), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(conts), R), dtype=torch.long)
    for i, c in enumerate(conts):
        c_ids[i, :len(c)], c_mask[i, :len(c)] = torch.tensor(c), 1
    rows = torch.repeat_interleave(torch.arange(len(items)),
                                   torch.tensor([len(it.seqs) for it in items]))
    # Known here, on the host; read from the device, each would wait for a GPU every step.
    prompt_of = [b for b, it in enumerate(items) for _ in it.seqs]
    return {"prompt_ids": p_ids, "prompt_mask": p_mask, "rows": rows, "prompt_of": prompt_of,
            "cont_ids": c_ids, "cont_mask": c_mask,
            "cont_tokens": [frozenset(c) for c in conts]}


def ranked_scores(model: ScalarHeadModel, batch: RankingBatch) -> Tensor:
    """Scores laid out (B, Kmax) best first, padded with 0 past each prompt's K."""
    if "prompt_ids" in batch:
        # Each continuation's distinct tokens say whether it has one to score (not the model's
        # pad) without reading the device.
        scored = None if "cont_tokens" not in batch else all(
            has_scored_token(t, model.pad_token_id) for t in batch["cont_tokens"])
        flat = model.score_continuations(batch["prompt_ids"], batch["prompt_mask"], batch["rows"],
                                         batch["cont_ids"], batch["cont_mask"],
                                         batch.get("prompt_of"), scored)
    else:
        flat = model(batch["input_ids"], batch["attention_mask"])
    k = batch["k"]
    # The widest ranking is the width of `groups` (collate_rankings pads it so): read on the
    # device, k.max() would make the host wait for a GPU, as would rows of unknown number.
    K = batch["groups"].shape[1] if "groups" in batch else int(k.max())
    # `k` is where the scores are (the common loop moved the batch), else copied there queued.
    k = queued_copy(k, flat.device)
    out = torch.zeros(len(k), K, dtype=flat.dtype, device=flat.device)
    rows = torch.repeat_interleave(torch.arange(len(k), device=flat.device), k,
                                   output_size=len(flat))
    starts = torch.cumsum(k, 0) - k
    cols = torch.arange(len(flat), device=flat.device) - starts[rows]
    out[rows, cols] = flat
    return out


def rankings_in(batch: RankingBatch) -> int:
    """The rankings `reward_loss` averages over: the validation loss weighs each batch by them,
    so it is the mean over every held-out ranking, the last, shorter batch's too. (Training
    batches all hold --batch-size rankings: their shares stay exactly equal.)"""
    return len(batch["k"])


def reward_loss(model: nn.Module, batch: RankingBatch) -> Tensor:
    device = batch["input_ids"].device
    return kwise_ranking_loss(ranked_scores(model, batch), queued_copy(batch["k"], device),
                              queued_copy(batch["groups"], device))


@torch.no_grad()
def pairwise_accuracy(model: ScalarHeadModel, batches: list[RankingBatch]) -> float:
    """Share of pairs with a real preference (i above j, not tied) that the model scores
    r_i > r_j (equal scores count half)."""
    return share_right(pairs_right_by_ranking(model, batches))


def share_right(counts: list[tuple[float, int]]) -> float:
    """Pairwise accuracy from `pairs_right_by_ranking`'s counts."""
    return sum(r for r, _ in counts) / max(sum(n for _, n in counts), 1)


@torch.no_grad()
def pairs_right_by_ranking(model: ScalarHeadModel, batches: list[RankingBatch]
                           ) -> list[tuple[float, int]]:
    """For each ranking, (pairs the model orders rightly, equal scores counting half; pairs
    with a real preference)."""
    out = []
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    for b in batches:
        b = to_device(b, device)
        s = ranked_scores(model, b)
        pairs = preference_pairs(b["k"], s.shape[1], b["groups"])
        diff = s[:, :, None] - s[:, None, :]
        right = ((diff > 0) & pairs).sum((1, 2)) + 0.5 * ((diff == 0) & pairs).sum((1, 2))
        counts = torch.stack([right.float(), pairs.sum((1, 2)).float()], 1).tolist()
        out += [(r, int(n)) for r, n in counts]  # one read a batch
    model.train(was)
    return out


# Below this raw std the samples' scores carry no preference (the head starts with scores that
# spread about 1), and 1/std would multiply PPO's rewards by over a thousand, drowning the KL
# penalty: such scores are shifted to mean 0 and left at scale 1.
MIN_SCORE_STD = 1e-3


@torch.no_grad()
def normalize_scores(model: ScalarHeadModel, sequences: list[list[int]], pad_id: int,
                     batch_size: int = 32) -> tuple[float, float]:
    """Set bias and scale so the given sequences score mean 0, std 1; return (mean, std) raw.
    A std below MIN_SCORE_STD is warned of on stderr and leaves the scale at 1."""
    model.score_bias.zero_()
    model.score_scale.fill_(1.0)
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(sequences), batch_size):
        b = collate_rankings([EncodedRanking(sequences[i:i + batch_size])], pad_id)
        scores.append(model(queued_copy(b["input_ids"], device),
                            queued_copy(b["attention_mask"], device)))
    s = torch.cat(scores)
    mean, std = s.mean().item(), (s.std().item() if len(s) > 1 else 1.0)
    model.score_bias.fill_(mean)
    if std < MIN_SCORE_STD:
        print(f"warning: the reward model scores the {counted(len(s), 'sample')} it is "
              f"normalised on alike (raw std {std:.3g}, below {MIN_SCORE_STD:g}): it learned no "
              f"preference between them, or they are one response repeated; their scores are "
              f"shifted to mean 0 but not scaled (scale 1), since dividing by so small a spread "
              f"would multiply PPO's rewards by over {1 / MIN_SCORE_STD:.0f}", file=sys.stderr)
    else:
        model.score_scale.fill_(1.0 / std)
    return mean, std


def sample_sequences(tokenizer: Any, path: str | Path, context: int, tail: bool = False,
                     skips: SkipCounter | None = None) -> list[list[int]]:
    """Prompt + response token ids of every response of a samples file, duplicates included
    (they weigh as the policy samples them); those longer than the context are left out,
    counted in `skips`. `tail`: as `encode_ranking`'s."""
    skips = skips if skips is not None else SkipCounter()
    seqs = []
    records = read_jsonl(path)
    if not records:  # else reported as none fitting the context
        raise no_records(path, "samples", field="samples")
    for rec in records:
        where, line = record_file(rec, path), rec["_line"]
        responses = responses_of(rec, where, line)
        prompt = prompt_of(rec, where, line)
        try:
            p = encode_prompt(tokenizer, prompt)
            after = template_tail(tokenizer, prompt) if tail else []
            encoded = [p + encode_response(tokenizer, r, prompt) + after for r in responses]
        except UserError as e:  # the chat template may refuse a conversation
            raise e.at(where, line) from None
        for s in encoded:
            if len(s) <= context:
                seqs.append(s)
            else:
                skips.add(f"samples longer than the context of {context}")
    return seqs


def prompt_clusters(items: list[EncodedRanking]) -> list[Any]:
    """Each ranking's prompt, as its tokens: the held-out accuracy's independent draws, so that
    two rankings of one prompt (ranked in two rounds) are one draw. A ranking encoded without
    its prompt's length is a draw of its own."""
    return [tuple(e.seqs[0][:e.prompt_len]) if e.prompt_len else ("ranking", i)
            for i, e in enumerate(items)]


def split_rankings(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out) rankings: about `fraction` of them held out, by prompt. All the
    rankings of one prompt (ranked in two rounds, or twice in a hand-made file) fall on the
    same side: a held-out ranking whose prompt the model trained on is judged by a model that
    has seen other answers to it ranked. Prompts are drawn in a shuffled order until
    round(len(items) * fraction) rankings are held out; where every prompt is ranked once, this
    holds out exactly those rankings that a draw of single rankings would."""
    by_prompt: dict[str, list[int]] = {}
    for i, x in enumerate(items):
        key = json.dumps(x.prompt, sort_keys=True) if isinstance(x, Ranking) else str(i)
        by_prompt.setdefault(key, []).append(i)
    groups = list(by_prompt.values())
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(items) * fraction))
    val: set[int] = set()
    for g in order:
        if len(val) >= n_val:
            break
        val.update(groups[g])
    return [x for i, x in enumerate(items) if i not in val], [items[i] for i in sorted(val)]


def check_resume_settings(cfg: RewardConfig, checkpoint: Path) -> None:
    """Refuse to resume with another MEASURE_SETTINGS value, naming the first (a checkpoint
    from before these were recorded passes)."""
    theirs = read_meta(checkpoint).get("eval_settings")
    if isinstance(theirs, dict):
        refuse_other_settings(cfg, theirs, MEASURE_SETTINGS, checkpoint, "they decide what "
                              "each evaluation measures, and the run's held-out accuracies "
                              "would be of two sets")


@reports_path_errors
def train_reward_model(cfg: RewardConfig) -> Path:
    """Train a reward model; OUT is a scalar-head model directory."""
    check_given(cfg, ("model", "data"), "reward")
    cfg.check()
    out = check_dir_out(cfg.out, field="out")  # not "", the current directory
    check_out_of_read_dirs(out, {"data, --data": cfg.data, "val_data, --val-data": cfg.val_data},
                           "rankings")
    check_out_of_read_dirs(out, {"samples, --samples": cfg.samples}, "samples")
    cfg = resuming(cfg)
    latest = check_run_dir(out, cfg.resume, {"model": cfg.model}, cfg, cfg.resume_from)
    if cfg.resume:
        check_resume_settings(cfg, latest)
    if is_value_model(cfg.model):  # a scalar head too, but on the scale of PPO's returns
        raise WrongKind("is PPO's value model, not a reward model: trained, it predicts returns, "
                        "not rewards; start from the SFT model, or continue a reward model "
                        "(the pipeline's round-N/reward)", path=cfg.model, field="model")
    base, tok, _ = load_model(cfg.model)
    if tok is None:
        raise UserError("the model has no tokenizer", path=cfg.model)
    if isinstance(base, ScalarHeadModel):
        model = base  # continue training a reward model (a new round of rankings)
    elif isinstance(base, GPT):
        torch.manual_seed(cfg.seed)
        model = ScalarHeadModel.from_gpt(base)
        del base  # from_gpt copied its weights: held through training, it was one model more
    else:
        raise WrongKind(f"the reward model must start from a GPT model, not "
                        f"{model_kind(base, cfg.model)}", path=cfg.model)
    context = model.config.context
    rankings = read_rankings(cfg.data)
    if cfg.val_data:
        train_r, val_r = rankings, read_rankings(cfg.val_data)
    else:
        train_r, val_r = split_rankings(rankings, cfg.val_fraction, cfg.seed)
        if rankings and not train_r:  # held out by prompt: one prompt's are all held out
            n = len({json.dumps(r.prompt, sort_keys=True) for r in rankings})  # (Rankings)
            raise UserError(f"the held-out rankings ({setting('val_fraction')} "
                            f"{cfg.val_fraction:g}, chosen by prompt) took all "
                            f"{counted(len(rankings), 'ranking')}, of "
                            f"{counted(n, 'prompt')}: rank more prompts, or give "
                            f"{setting('val_fraction')} 0, or held-out rankings with "
                            f"{setting('val_data')}", path=cfg.data)
    # Skips are counted per file, so that each is reported on the file that holds them.
    skips = SkipCounter()
    val_skips = SkipCounter() if cfg.val_data else skips
    # A Hugging Face classifier continued here keeps reading where it was trained to.
    tail = model.reads_template_tail
    train_e = encode_rankings(tok, train_r, context, skips, cfg.data, tail)
    val_e = encode_rankings(tok, val_r, context, val_skips, cfg.val_data or cfg.data, tail)
    for path, counter in ((cfg.data, skips), (cfg.val_data, val_skips)):
        if path and counter.total:
            print(f"{path}: {counter.report('rankings')}", file=sys.stderr)
    if not train_e:
        raise UserError("no rankings left to train on", path=cfg.data)
    if cfg.val_data:
        check_held_out(train_e, val_e, lambda e: (tuple(map(tuple, e.seqs)), tuple(e.groups)),
                       cfg.val_data, "rankings", cfg.data)
    # What the scores are normalised on, read before training so a bad file fails fast.
    if cfg.samples:
        sample_skips = SkipCounter()
        samples = sample_sequences(tok, cfg.samples, context, tail, sample_skips)
        if samples and sample_skips.total:  # none left is the error below
            print(f"{cfg.samples}: {sample_skips.report('samples')}, not normalised on",
                  file=sys.stderr)
    else:  # the training rankings hold the policy's samples, duplicates merged
        samples = [list(s) for s in sorted({tuple(s) for e in train_e for s in e.seqs})]
    if not samples:
        raise UserError("no sample fits the context to normalise the scores on",
                        path=cfg.samples, field="samples")
    # --epochs sets a new run's length; a resume without --max-steps keeps the run's own (a
    # time budget's too), as the checkpoint recorded it.
    if cfg.max_steps is None and cfg.max_minutes is None and not cfg.resume:
        # On a copy: the caller's config, run again on other data, must set its own length.
        cfg = replace(cfg, max_steps=max(1, int(cfg.epochs * len(train_e)
                                               / (cfg.batch_size * cfg.grad_accum))))
    key = data_key([e.seqs, e.groups] for e in train_e)
    if cfg.resume:
        warn_if_data_changed(latest, key, "rankings")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        annotate_resume(out, cfg, latest.name)
    else:
        record_run(out, cfg)
    collate = lambda b: collate_rankings(b, tok.pad_id)  # noqa: E731
    val_batches = fixed_list_batches(val_e, cfg.batch_size, collate) if val_e else None

    # The last evaluation's pair counts per held-out ranking: at the final step they are the
    # trained model's, which the held-out accuracy below reports without scoring them again.
    measured: dict[str, Any] = {}

    def on_eval(m: nn.Module, step: int, val_loss: float) -> dict:
        counts = pairs_right_by_ranking(m, val_batches)
        measured.update(step=step, counts=counts)
        return {"pairwise_acc": share_right(counts)}

    result = train(model, ListBatches(train_e, cfg.batch_size, cfg.seed, collate), reward_loss,
                   cfg, out, val_batches=val_batches, tokenizer=tok, on_eval=on_eval,
                   resume=cfg.resume, verified=latest, resume_from=latest, perplexity=False,
                   loss_weight=rankings_in, extra={
                       "stage": "reward", "data_key": key,
                       "eval_settings": {k: getattr(cfg, k) for k in MEASURE_SETTINGS}})
    model.eval()
    # The held-out accuracy with its interval, the prompts as the draws (their pairs share
    # answers), rankings of one prompt one draw; none without held-out rankings.
    if not val_batches:
        counts = []
    elif measured.get("step") == result.step:
        counts = measured["counts"]  # this session evaluated the final weights
    else:
        counts = pairs_right_by_ranking(model, val_batches)
    held = clustered_rate(counts, prompt_clusters(val_e) if counts else None)
    acc = held["mean"]
    mean, std = normalize_scores(model, samples, tok.pad_id)
    save_model(out, model, tok, extra={"stage": "reward", "step": result.step,
                                       "heldout_pairwise_acc": acc,
                                       "heldout_pairwise_acc_ci95": held["ci95"],
                                       "heldout_pairs": held["n"], "val_loss": result.val_loss,
                                       "raw_score_mean": mean, "raw_score_std": std,
                                       "train_rankings": len(train_e),
                                       "heldout_rankings": len(val_e),
                                       "skipped": skips.counts,
                                       **({"val_skipped": val_skips.counts} if cfg.val_data
                                          else {})})
    annotate_run(out, heldout_pairwise_acc=acc)
    interval = "" if held["ci95"] is None else " [{:.3f}, {:.3f}]".format(*held["ci95"])
    print(f"reward model: {counted(result.step, 'step')}; held-out pairwise accuracy "
          f"{'n/a' if acc is None else f'{acc:.3f}'}{interval} on "
          f"{counted(len(val_e), 'ranking')} ({counted(held['n'], 'pair')}); scores "
          f"normalised on {counted(len(samples), 'sample')} (raw mean {mean:.3f}, std "
          f"{std:.3f})",
          file=sys.stderr)
    return out
