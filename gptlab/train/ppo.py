"""InstructGPT step 3: PPO against a reward model, with a per-token KL penalty to the SFT model
and, optionally, the pretraining mix (PPO-ptx).

One iteration reads as the algorithm:
  1. rollout   — sample responses to a batch of prompts with the KV-cache engine
  2. score     — reward model (or a reward function) at the end of each response
  3. rewards   — r_t = −β · KL_t per token, plus the score on the last token
  4. GAE       — advantages and returns from the value model
  5. update    — several epochs of clipped policy and value losses over minibatches,
                 plus ptx_coef · LM loss on pretraining text
PPO owns this loop; it borrows only the shared pieces (optimizer, schedule, checkpoints, logs).

Every `save_every` steps, at the end (when save_every is set) and on Ctrl-C, OUT/checkpoints/
step-N holds the policy (a model directory), `value/` (its config.json's stage "value", as
OUT/value's, so that no verb takes it for a reward model), the optimizer and what else the next
step depends on: the prompt sampler's state, the adaptive β, the ptx data position, the RNG
states.
`resume` continues from the latest one exactly: the same rows, the same weights.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Set
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import Tensor

from gptlab.checkpoint import (VALUE_STAGE, Checkpointer, is_value_model, load_language_model,
                               load_model, load_reward_model, model_files, model_kind,
                               save_model)
from gptlab.data.instruct import (SkipCounter, encode_prompt, encode_response, end_of_response,
                                  prompt_of, read_prompts, template_tail)
from gptlab.devices import queued_copy
from gptlab.engine import SamplingParams, generate
from gptlab.errors import (UserError, WrongKind, check_given, counted, exception_line, kind_of,
                           reports_path_errors, setting)
from gptlab.io import (check_out_of_read_dirs, ensure_dir, missing_dirs, old_files_aside,
                       record_file)
from gptlab.model.attention import PrefixKV, common_prefix_length, row_is_right_padded
from gptlab.model.gpt import GPT
from gptlab.model.heads import ScalarHeadModel
from gptlab.plugin import load_function
from gptlab.provenance import record_run
from gptlab.stop_strings import StopStrings, cut_reply, reply_stops
from gptlab.train.loop import (MetricsLog, allow_tf32, annotate_resume,
                               check_fields, check_run_dir, clip_grad_norm, decay_rule,
                               diverged, held_interrupt, interrupted_saved, lr_at, make_optimizer,
                               memory_named,
                               read_metrics, resuming, rng_state, same_setting, seed_everything,
                               select_device, set_lr, set_rng_state)
from gptlab.train.batching import data_key, warn_if_data_changed
from gptlab.train.reward import scored_response
from gptlab.train.rl_math import (KL_ESTIMATORS, AdaptiveKLController, clipped_policy_loss,
                                  clipped_value_loss, entropy_from_logprobs, gae, kl_per_token,
                                  masked_mean, whiten)

if TYPE_CHECKING:
    from gptlab.data.tokens import BlockBatches


@dataclass
class PPOConfig:
    """Settings of PPO(-ptx): the policy, the reward, the prompts, and the algorithm's."""

    policy: str = field(default="", metadata={
        "help": "SFT model directory (the policy starts here)"})
    prompts: str = field(default="", metadata={
        "help": "prompts, .jsonl, .parquet or a directory of them, each with prompt or "
                "messages"})
    out: str = field(default="", metadata={"help": "run directory (the final policy, value/)"})
    reward: str | None = field(default=None, metadata={
        "help": "reward model directory (not a PPO run's value/: that is a --value)"})
    reward_fn: str | None = field(default=None, metadata={
        "help": "or module:function scoring (prompts, responses, records)"})
    reference: str | None = field(default=None, metadata={
        "help": "the KL anchor, a language model such as the SFT model (default: the "
                "initial policy)"})
    value: str | None = field(default=None, metadata={
        "help": "value model init, e.g. a PPO run's value/ (default: the reward model; with "
                "--reward-fn, the policy with a new scalar head)"})
    steps: int = field(default=50, metadata={"help": "rollout → update iterations"})
    batch_size: int = field(default=32, metadata={"help": "prompts per rollout"})
    minibatch_size: int = field(default=8, metadata={
        "help": "rollouts (prompt and response) per update, in each PPO epoch"})
    ppo_epochs: int = field(default=2, metadata={
        "help": "passes of clipped updates over each rollout batch"})
    lr: float = field(default=1e-5, metadata={
        "help": "peak learning rate of the policy and the value model"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warmup to lr"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={
        "help": "max global gradient norm (0: no clipping)"})
    kl_coef: float = field(default=0.02, metadata={
        "help": "beta of the per-token KL penalty to the reference"})
    kl_estimator: str = field(default="k1", metadata={
        "help": "the per-token KL estimate: k1 (log ratio) or k3"})
    adaptive_kl: bool = field(default=False, metadata={
        "help": "adapt kl_coef so that the KL tracks target_kl (Ziegler et al.)"})
    target_kl: float = field(default=6.0, metadata={
        "help": "the KL the adaptive controller aims at"})
    kl_horizon: int = field(default=10000, metadata={
        "help": "the adaptive controller's horizon, in samples"})
    clip: float = field(default=0.2, metadata={"help": "policy ratio clip epsilon"})
    value_clip: float = field(default=0.2, metadata={
        "help": "value clip around the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    gae_gamma: float = field(default=1.0, metadata={"help": "GAE discount gamma"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda"})
    whiten_advantages: bool = field(default=True, metadata={
        "help": "normalise the advantages of a batch to mean 0, std 1"})
    # The full softmax at this temperature, in rollouts and updates alike: the ratio and the KL
    # need the distribution the tokens were sampled from, so there is no top-k / top-p here.
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature of rollouts and updates (the full softmax: no top-k, "
                "top-p)"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest response a rollout samples"})
    missing_eos_penalty: float = field(default=1.0, metadata={
        "help": "subtracted from the score of a response without EOS (0 to 1e15)"})
    ptx_data: list[str] = field(default_factory=list, metadata={
        "help": "pretraining text for PPO-ptx, read as pretrain --data reads it: files "
                "(.txt/.jsonl/.json/.parquet) or directories of one split, or a Hub dataset "
                "user/name (used when ptx_coef > 0)"})
    ptx_coef: float = field(default=0.0, metadata={
        "help": "weight of the language-model loss on ptx_data (PPO-ptx; 0: off)"})
    ptx_batch_size: int = field(default=8, metadata={"help": "ptx_data blocks per update"})
    ptx_block_size: int = field(default=128, metadata={"help": "tokens per ptx_data block"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "token cache for ptx_data (default: $GPTLAB_CACHE/tokens, else "
                "~/.cache/gptlab/tokens)"})
    save_every: int = field(default=0, metadata={
        "help": "steps between checkpoints, all kept (0: only on Ctrl-C)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT's latest checkpoint"})
    resume_from: str | None = field(default=None, metadata={
        "help": "continue from this checkpoint of OUT instead: step-N, N, or its path "
                "(OUT/checkpoints/step-N); implies resume"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA where there is a GPU, else the CPU), cpu, cuda, cuda:N or mps"})
    progress: bool = field(default=True, metadata={
        "help": "a line per step on stderr (metrics.jsonl is written either way)"})

    def check(self) -> None:
        """Raise a UserError naming the first field with an impossible value."""
        self.check_values()
        select_device(self.device)

    def check_values(self) -> None:
        """Raise a UserError naming the first field whose value no run can take (`rules`), as
        TrainConfig.check_values does (the config loader runs it too)."""
        check_fields(self, self.rules)

    def rules(self) -> list[tuple[str, bool, str]]:
        """(field, holds, what is expected)."""
        return [
            ("steps", self.steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("minibatch_size", self.minibatch_size >= 1, "must be >= 1"),
            ("minibatch_size", self.minibatch_size <= self.batch_size,
             f"must be <= batch_size ({self.batch_size})"),
            ("ppo_epochs", self.ppo_epochs >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            decay_rule(self.lr, self.weight_decay),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0: no clipping)"),
            ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
            ("kl_estimator", self.kl_estimator in KL_ESTIMATORS,
             f"must be one of {', '.join(KL_ESTIMATORS)}"),
            ("target_kl", not self.adaptive_kl or self.target_kl > 0,
             "must be > 0 with adaptive_kl"),
            # The controller multiplies β, so a β of 0 would stay 0.
            ("kl_coef", not self.adaptive_kl or self.kl_coef > 0,
             "must be > 0 with adaptive_kl (the controller scales it)"),
            ("kl_horizon", self.kl_horizon >= 1, "must be >= 1"),
            ("clip", self.clip > 0, "must be > 0"),
            ("value_clip", self.value_clip > 0, "must be > 0"),
            ("vf_coef", self.vf_coef >= 0, "must be >= 0"),
            ("gae_gamma", 0 <= self.gae_gamma <= 1, "must be in [0, 1]"),
            ("gae_lambda", 0 <= self.gae_lambda <= 1, "must be in [0, 1]"),
            # Below 0.01 the policy samples as greedy and logits / T can overflow: the entropy
            # and, where T rounds to 0 in float32, the gradient are NaN.
            ("temperature", self.temperature >= 0.01, "must be >= 0.01"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            # Negative, it would reward the responses that never end.
            ("missing_eos_penalty", self.missing_eos_penalty >= 0, "must be >= 0"),
            ("missing_eos_penalty", self.missing_eos_penalty <= MAX_REWARD,
             f"must be <= {MAX_REWARD:g}, as a score ({SQUARED})"),
            ("ptx_coef", self.ptx_coef >= 0, "must be >= 0"),
            ("ptx_batch_size", self.ptx_batch_size >= 1, "must be >= 1"),
            ("ptx_block_size", self.ptx_block_size >= 1, "must be >= 1"),
            ("save_every", self.save_every >= 0, "must be >= 0"),
            # torch's generators take seeds in [0, 2**64); each step's own seeds are derived
            # from this one and read modulo 2**64.
            ("seed", 0 <= self.seed < 2**64, "must be in [0, 2**64)"),
        ]


# A step whose metrics hold a NaN or an infinity here has made the weights no numbers: the
# losses and the gradient norm went into the update, and a reward or KL into every advantage
# and return. The statistics (entropy, approx_kl, clip fractions, reward_std) are only logged,
# and a non-finite one of them leaves the weights as they are.
DIVERGED_IF = ("reward", "kl", "pg_loss", "value_loss", "ptx_loss", "grad_norm")

# Settings a resumed run may change: none of them alters the steps taken or the next ones (the
# learning rate after warmup is constant, so `steps` only says where to stop).
RESUMABLE = ("steps", "save_every", "resume", "resume_from", "out", "device", "cache_dir",
             "progress")


def load_reward_fn(spec: str) -> Callable:
    """`module:function`; the function takes (prompts, responses, records) -> list of floats."""
    module, fn = load_function(spec, "reward_fn")
    mod, _, name = spec.partition(":")
    if not hasattr(fn, "check_records") and callable(getattr(module, "check_records", None)):
        # A check written beside the function, not on it, would never run, without a word.
        print(f"note: {mod} defines check_records, but {spec} has no check_records attribute, "
              f"so it is not called; to check the prompts first, set {name}.check_records = "
              f"check_records in {mod}", file=sys.stderr)
    return fn


def _scalar_model_instead(path: str, wanted: str) -> str:
    """What to give in place of the reward or value model at `path`, given where a language
    model belongs (`wanted`), and the flag that takes that one."""
    this = "this one as --value to start the value model from it" if is_value_model(path) \
        else "this one as --reward (a value model as --value)"
    return f"give {wanted}, and {this}"


def reward_fn_name(fn: Callable) -> str:
    """`module:function` of a reward function given as a Python object."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


@dataclass
class Rollout:
    """One batch of prompts and sampled responses, laid out as prompt (left-padded, P tokens)
    then response (right-padded, R tokens). When every prompt starts with the same tokens (a
    system prompt, the world's schema), those are `prefix`, kept out of `ids` and encoded once
    per forward; `attention_mask` then covers prefix + ids."""
    ids: Tensor            # (B, P + R)
    attention_mask: Tensor  # (B, [n +] P + R)
    response_mask: Tensor  # (B, R)
    P: int
    records: list[dict]
    responses: list[list[int]]
    finished: Tensor       # (B,) bool: ended with a stop token (or its end of turn in text)
    prefix: Tensor | None = None  # (1, n) the shared start of every prompt
    ends: list[list[int]] = field(default_factory=list)  # each prompt's end of turn
    tails: list[list[int]] = field(default_factory=list)  # what the reward model reads after it
    # The host's copies of each row's prompt tokens and of `finished` (empty: read from the
    # tensors, which on a GPU waits for the device, twice a row for the prompts).
    prompt_ids: list[list[int]] = field(default_factory=list)
    finished_list: list[bool] = field(default_factory=list)
    # Whether each row's attention_mask is right padding only (`right_padded_rows`; empty:
    # unknown, and a forward without the prefix reads the mask, a wait on a GPU).
    right_padded: list[bool] = field(default_factory=list)
    # Each row's texts that end its response, its chat template's end of turn in plain text
    # (`PPOTrainer.prompt_stops`; empty: none in the rollout).
    stops: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def response_ids(self) -> Tensor:
        return self.ids[:, self.P:]

    @property
    def all_right_padded(self) -> bool | None:
        """`right_padded` for a forward of all the rows (None: unknown)."""
        return all(self.right_padded) if self.right_padded else None

    def rows(self, idx: Tensor, at: list[int] | None = None) -> "Rollout":
        """A minibatch: these rows (`at`: the same on the host), the same prefix."""
        return Rollout(self.ids[idx], self.attention_mask[idx], self.response_mask[idx], self.P,
                       [], [], self.finished[idx], self.prefix, right_padded=[
                           self.right_padded[i] for i in at] if at and self.right_padded else [])


def layout(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
           device: torch.device | str, shared: int = 0
           ) -> tuple[Tensor, Tensor, Tensor, int, Tensor | None]:
    """(ids, attention_mask, response_mask, P, prefix): the first `shared` tokens of every
    prompt become the prefix (None when 0), the rest is laid out as in `Rollout`."""
    prefix = queued_copy(torch.tensor([prompts[0][:shared]]), device) if shared else None
    prompts = [p[shared:] for p in prompts]
    P = max(len(p) for p in prompts)
    R = max(len(r) for r in responses)
    B = len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, P - len(p):P + len(r)] = 1
    full_mask = torch.cat([torch.ones((B, shared), dtype=torch.long), mask], 1)
    return (queued_copy(ids, device), queued_copy(full_mask, device),
            queued_copy(mask[:, P:], device), P, prefix)


def right_padded_rows(prompts: list[list[int]], responses: list[list[int]],
                      shared: int = 0) -> list[bool]:
    """For each row `layout` makes of these, whether its attention mask is right padding only,
    from the lengths: its prompt fills the P columns (or the prefix starts it and nothing
    follows)."""
    P = max(len(p) - shared for p in prompts)
    return [row_is_right_padded([(0, shared), (shared + P - (len(p) - shared),
                                               shared + P + len(r))])
            for p, r in zip(prompts, responses)]


def minibatches(order: Tensor, size: int, device: torch.device | str
                ) -> list[tuple[Tensor, list[int]]]:
    """An epoch's minibatches of rollout rows, `order` (a permutation on the CPU) cut in
    `size`s: each as indices on `device` (moved at once, the host not waiting) and as a list
    on the host (read from the CPU: no wait)."""
    moved = queued_copy(order, device)
    host = order.tolist()
    return [(idx, host[i:i + size]) for i, idx in zip(range(0, len(host), size),
                                                      moved.split(size))]


def prefix_cache(backbone: GPT, prefix: Tensor | None, rows: int) -> PrefixKV | None:
    """The shared prefix (1, n) encoded once, its keys/values read by each of `rows` rows
    (gradients flow)."""
    if prefix is None:
        return None
    cache = PrefixKV()
    backbone.hidden_states(prefix, cache=cache)
    # A list: expanding reads the rows, which on a GPU would wait for the device.
    return cache.expand([0] * rows)


@torch.no_grad()
def reward_model_scores(model: ScalarHeadModel, prompts: list[list[int]],
                        responses: list[list[int]], pad_id: int, device: torch.device | str,
                        shared: int = 0) -> Tensor:
    """Scores (B,) of prompt + response rows, laid out as a rollout (the `shared` first tokens
    encoded once); one row at a time where the longest prompt and the longest response, of
    different rows, would overflow the context together."""
    groups = [list(range(len(prompts)))]
    if max(map(len, prompts)) + max(map(len, responses)) > model.config.context:
        groups = [[i] for i in range(len(prompts))]
    scores = []
    for rows in groups:
        ps, rs = [prompts[i] for i in rows], [responses[i] for i in rows]
        ids, mask, _, _, prefix = layout(ps, rs, pad_id, device, shared)
        scores.append(model(ids, mask, prefix_cache(model.backbone, prefix, len(ids)),
                            all(right_padded_rows(ps, rs, shared))))
    return torch.cat(scores).float()


def response_logprobs(model: GPT, ro: Rollout, temperature: float,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log π(y_t | x, y_<t) of each response token, logits divided by the temperature
    exactly as in the rollout. (B, R).

    The rollout's `scale_logits` guards rows where logits / T overflows; PPO's temperature is
    at least 0.01 (`PPOConfig`), where only a logit past 3.4e36 or an infinite one (a diverged
    model) would, so the update divides plainly: the same values bit for bit, and no read of
    whether a row overflowed, which would wait for the device each minibatch."""
    cache = prefix_cache(model, ro.prefix, len(ro.ids))
    h, _ = model.hidden_states(ro.ids, ro.attention_mask, cache=cache,
                               right_padded=ro.all_right_padded)
    # (B, R, V); the logits go as they are made: nothing but the function holds them
    logp = (model.lm_head(h[:, ro.P - 1:-1]).float() / temperature).log_softmax(-1)
    lp = logp.gather(-1, ro.response_ids[..., None]).squeeze(-1)
    # The entropy is only logged: with a graph, it would keep two (B, R, V) tensors alive
    # through the backward and the next minibatch's forward.
    return lp, entropy_from_logprobs(logp.detach()) if with_entropy else None


def response_values(value_model: ScalarHeadModel, ro: Rollout) -> Tensor:
    """V(s_t) at the position that predicts response token t. (B, R)."""
    cache = prefix_cache(value_model.backbone, ro.prefix, len(ro.ids))
    return value_model.values(ro.ids, ro.attention_mask, cache,
                              ro.all_right_padded)[:, ro.P - 1:-1]


# PPO squares its rewards in float32: the value loss (V − R)² and the whitening's variance are
# means of squares over a batch's tokens, which overflow to inf (the advantages then 0 or NaN)
# well below float32's 3.4e38: a score of 1e30 did. Within ±1e15 a square is 1e30, and a sum
# of them holds 3e8 tokens. A return (a score less the KL penalty, summed over the tokens after)
# is allowed ten times more, so that only a KL penalty gone wild reaches it.
MAX_REWARD = 1e15
MAX_RETURN = 1e16
SQUARED = "PPO squares rewards in float32, in the value loss and the advantages' whitening"


def is_score_list(returned: Any) -> bool:
    """Whether a reward function's `returned` can be its scores in the responses' order: a
    list, a tuple, a generator, a 1-D array or tensor; not a mapping (read as its keys), a set
    (no order), a string (its characters) or a 0-d array (no iteration)."""
    if isinstance(returned, (str, bytes, Mapping, Set)) or not isinstance(returned, Iterable):
        return False
    return getattr(returned, "ndim", 1) != 0


def reward_number(v: Any, name: str, prompt_id: Any = None) -> float:
    """A reward function's score as a float: any real number (Python, NumPy or a 0-d tensor)
    within ±MAX_REWARD, never a bool, a string or a non-finite value. `name` is the function's
    module:function; the error names the prompt's `id` when it has one (the caller adds its
    file and line)."""
    of = "" if prompt_id is None else f" for prompt id {prompt_id}"
    # NumPy's and torch's bools too: float(np.True_) is 1.0, a score no one meant.
    boolean = isinstance(v, bool) or str(getattr(v, "dtype", "")) in ("bool", "torch.bool")
    try:
        x = None if boolean or isinstance(v, (str, bytes)) else float(v)
    except (TypeError, ValueError):
        x = None
    except OverflowError:  # an integer no float holds (10 ** 400)
        raise UserError(f"the reward function {name} returned an integer of {len(str(abs(v)))} "
                        f"digits{of}, too large for a score (a float)", field="reward_fn") from None
    if x is None:
        raise UserError(f"the reward function {name} returned {kind_of(v)} ({v!r})"
                        f"{of}; a score must be a real number", field="reward_fn")
    if not math.isfinite(x):
        raise UserError(f"the reward function {name} returned a non-finite score ({x}){of}",
                        field="reward_fn")
    if abs(x) > MAX_REWARD:
        raise UserError(f"the reward function {name} returned a score ({x}){of} beyond "
                        f"the ±{MAX_REWARD:g} a score may reach ({SQUARED})", field="reward_fn")
    return x


# A user-assistant exchange: two chat templates that render it to the same ids write PPO's
# conversations alike (the system prompt a template adds by default, the turns, the end of turn
# and what follows it are all in it).
TEMPLATE_PROBE = ({"role": "user", "content": "Is the cat happy?"},
                  {"role": "assistant", "content": "Yes, it is."})


def template_difference(ours: Any, theirs: Any) -> str | None:
    """Where tokenizer `theirs` (of the same vocabulary) renders TEMPLATE_PROBE otherwise than
    `ours`: its first differing token, decoded, in words; None where both render it alike, or
    where `ours` cannot render it (no template: the prompts are text; or one that refuses the
    exchange: nothing to compare)."""
    if ours.chat_template is None:
        return None
    try:
        mine, _ = ours.render_chat(list(TEMPLATE_PROBE))
    except UserError:
        return None
    if theirs.chat_template is None:
        return "it has none"
    try:
        other, _ = theirs.render_chat(list(TEMPLATE_PROBE))
    except UserError as e:
        return f"it cannot render a user-assistant exchange ({e})"
    if other == mine:
        return None
    k = next((i for i, (a, b) in enumerate(zip(mine, other)) if a != b), min(len(mine),
                                                                             len(other)))

    def token(tok: Any, ids: list[int]) -> str:
        return repr(tok.decode([ids[k]], skip_special=False)) if k < len(ids) else "its end"

    return (f"token {k} of a user-assistant exchange is {token(theirs, other)} in its "
            f"rendering, {token(ours, mine)} in the policy's")


@dataclass
class UpdateStats:
    """An update's statistics, still on the device: `table` (minibatches, statistics), a row
    per minibatch in the order of `names`."""
    names: list[str]
    table: Tensor

    def means(self, values: list[float]) -> dict[str, float]:
        """Each statistic's mean over the minibatches, from `table`'s values as read (flat)."""
        n, k = len(values) // len(self.names), len(self.names)
        return {name: sum(values[r * k + i] for r in range(n)) / n
                for i, name in enumerate(self.names)}

    def read(self) -> dict[str, float]:
        """The means, read on their own (a wait on a GPU)."""
        return self.means(self.table.flatten().tolist())


class PPOTrainer:
    """`reward_fn`, a function instead of `cfg.reward_fn`'s `module:function`, is for callers
    that build their reward in Python (the pipeline's execution-reward control)."""

    def __init__(self, cfg: PPOConfig, reward_fn: Callable | None = None):
        check_given(cfg, ("policy", "prompts", "out"), "ppo")
        given = [x for x in (cfg.reward, cfg.reward_fn, reward_fn) if x is not None]
        if len(given) != 1:
            raise UserError(f"give exactly one of {setting('reward')}, a reward model, or "
                            f"{setting('reward_fn')}",
                            field="reward")
        cfg.check()
        cfg = resuming(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out)
        check_out_of_read_dirs(self.out, {"prompts, --prompts": cfg.prompts}, "prompts")
        if cfg.ptx_coef:
            from gptlab.data.corpus import check_out_of_corpus
            check_out_of_corpus(self.out, cfg.ptx_data, flag="--ptx-data")
        elif cfg.ptx_data:  # never read (a note says so below), but a path mistyped is refused
            from gptlab.data.corpus import corpus_files
            corpus_files(cfg.ptx_data, field="ptx_data")
        latest = check_run_dir(self.out, cfg.resume, {
            "policy": cfg.policy, "reference": cfg.reference, "reward": cfg.reward,
            "value": cfg.value}, resume_from=cfg.resume_from)
        self.device = select_device(cfg.device)
        allow_tf32(self.device)  # as in the other training verbs (PPO runs no autocast)
        seed_everything(cfg.seed)  # Python's, NumPy's and torch's, as the other stages do
        self.policy, self.tok, _ = load_language_model(
            cfg.policy, self.device, field="policy",
            instead=_scalar_model_instead(cfg.policy, "the SFT model the policy starts from (the "
                                                       "pipeline's OUT/sft)"))
        if cfg.max_new_tokens >= self.policy.config.context:
            raise UserError(f"must be below the policy's context of "
                            f"{self.policy.config.context}, got {cfg.max_new_tokens}",
                            field="max_new_tokens")
        self._noted_templates: set[Path] = set()  # directories whose template was noted
        self.reference = self._load_reference()
        self._load_reward(reward_fn)
        self.value_model = self._init_value_model()
        # Every sequence goes through the reference, reward and value models too: the shortest
        # context of them all bounds a prompt and its response.
        self.context, self.context_of = min(
            (m.config.context, name) for name, m in (
                ("the policy's", self.policy), ("the reference's", self.reference),
                ("the reward model's", self.reward_model),
                ("the value model's", self.value_model)) if m is not None)
        if cfg.max_new_tokens >= self.context:
            raise UserError(f"must be below {self.context_of} context of {self.context}, got "
                            f"{cfg.max_new_tokens}", field="max_new_tokens")
        # Dropout off during RL: the rollout and the update must see the same network.
        for m in (self.policy, self.reference, self.value_model, self.reward_model):
            if m is not None:
                m.eval()
        # One optimizer over both networks: the loss is pg_loss + vf_coef * vf_loss (+ ptx).
        self.trained = torch.nn.ModuleList([self.policy, self.value_model])
        self.optimizer = make_optimizer(self.trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) \
            if cfg.adaptive_kl else None
        self.records = read_prompts(cfg.prompts)
        self._check_records()
        self.prompt_ids, self.prompt_ends, self.prompt_tails = self._encode_prompts()
        # What the rollouts draw from, by position: a resume on other prompts is warned of.
        self.data_key = data_key(
            [ids, {k: v for k, v in rec.items() if k not in ("_line", "_file")}]
            for ids, rec in zip(self.prompt_ids, self.records))
        # A `messages` prompt's response ends where its chat template ends an assistant turn,
        # as `gptlab sample` and `gptlab chat` end one: in a token, or, for a template whose
        # turns end in plain text, before its next "\nUser:" (the rest of the rollout is the
        # made-up turn the model would otherwise run on into). A text prompt has no template.
        chats = [not isinstance(prompt_of(rec), str) for rec in self.records]
        turn_ids, turn_texts = reply_stops(self.tok) if any(chats) else ((), ())
        self.stop_ids = tuple(sorted({*self.tok.stop_ids, *turn_ids}))
        self.prompt_stops = [turn_texts if chat else () for chat in chats]
        if not any(len(p) <= self.context - cfg.max_new_tokens for p in self.prompt_ids):
            n = len(self.prompt_ids)
            which = f"none of the {n} prompts fits" if n != 1 else "the prompt does not fit"
            raise UserError(f"{which} {self.context_of} context of {self.context} tokens with "
                            f"max_new_tokens "
                            f"{cfg.max_new_tokens}; use shorter prompts or a smaller "
                            f"{setting('max_new_tokens')}", path=cfg.prompts)
        # Counted once per prompt, here: a prompt too long is skipped every time it is drawn.
        self.skips = SkipCounter()
        for p in self.prompt_ids:
            if len(p) > self.context - cfg.max_new_tokens:
                self.skips.add("prompts longer than the context minus max_new_tokens")
        fit = len(self.prompt_ids) - self.skips.total
        if fit < cfg.batch_size:  # a prompt is drawn at most once a rollout
            print(f"note: {cfg.prompts} has {counted(fit, 'prompt')} that "
                  f"{'fits' if fit == 1 else 'fit'}, fewer than --batch-size "
                  f"{cfg.batch_size}: a rollout holds at most "
                  f"{'that one' if fit == 1 else f'those {fit}'}", file=sys.stderr)
        self.rng = random.Random(cfg.seed)
        self.ptx = self._ptx_batches() if cfg.ptx_coef > 0 else None
        if cfg.ptx_data and not cfg.ptx_coef:
            print("note: --ptx-data is not used: --ptx-coef is 0 (PPO-ptx needs a coefficient "
                  "above 0, e.g. --ptx-coef 0.002)", file=sys.stderr)
        self.step, self.elapsed = 0, 0.0  # steps done, and the seconds they took
        self.resumed_from = latest if cfg.resume else None
        if self.resumed_from is not None:
            self._restore(self.resumed_from)

    def _load_reference(self) -> GPT:
        """The frozen KL anchor: `cfg.reference`, or a copy of the initial policy."""
        cfg = self.cfg
        if cfg.reference:
            reference, ref_tok, _ = load_model(cfg.reference, self.device)
            if not isinstance(reference, GPT):
                instead = _scalar_model_instead(
                    cfg.reference, "the SFT model the policy started from (the pipeline's "
                    "OUT/sft; without --reference, a copy of --policy is the reference)"
                ) if isinstance(reference, ScalarHeadModel) else ""
                raise WrongKind(f"not a decoder-only language model: this is "
                                f"{model_kind(reference, cfg.reference)}; the reference must be "
                                f"one (the KL is measured against its log-probabilities)"
                                f"{': ' + instead if instead else ''}", path=cfg.reference,
                                field="reference")
            self._check_vocabulary(reference, ref_tok, "reference", "the reference model")
        else:
            reference = copy.deepcopy(self.policy)
        return reference.requires_grad_(False)

    def _load_reward(self, reward_fn: Callable | None) -> None:
        """Set `reward_model` (frozen, from `cfg.reward`), or `reward_fn` (given, or imported
        from `cfg.reward_fn`) and its `reward_fn_name`; the others stay None."""
        cfg = self.cfg
        self.reward_model: ScalarHeadModel | None = None
        self.reward_fn: Callable | None = None
        self.reward_fn_name: str | None = None
        if cfg.reward:
            self.reward_model, rm_tok, _ = load_reward_model(
                cfg.reward, self.device, instead="give the reward model's directory (the "
                "pipeline's round-N/reward), and this one as --value to start the value model "
                "from it")
            self._check_vocabulary(self.reward_model, rm_tok, "reward", "the reward model")
            self.reward_model.requires_grad_(False)
        else:
            self.reward_fn = reward_fn or load_reward_fn(cfg.reward_fn)
            self.reward_fn_name = cfg.reward_fn or reward_fn_name(reward_fn)

    def _check_records(self) -> None:
        """A reward function may check every prompt up front with its `check_records`."""
        check_records = getattr(self.reward_fn, "check_records", None)
        if check_records is None:
            return
        try:
            check_records(self.records, self.cfg.prompts)
        except UserError:
            raise
        except (Exception, SystemExit) as e:  # the user's check, reported as its score is
            raise UserError(f"the reward function {self.reward_fn_name}: check_records "
                            f"raised {exception_line(e)}", path=self.cfg.prompts,
                            field="reward_fn") from e

    def _encode_prompts(self) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Every prompt's token ids, encoded once, before the first step: one the chat template
        refuses stops the run here, naming its line, not at the step that first draws it. With
        a reward model, also the end of turn that closes a response to each (`scored_response`),
        and the chat template's text after it where the reward model reads that too
        (`reads_template_tail`); without one, those lists are empty."""
        path = self.cfg.prompts
        ids, ends, tails = [], [], []
        rm = self.reward_model
        for rec in self.records:
            prompt = prompt_of(rec, record_file(rec, path), rec.get("_line"))
            try:
                ids.append(encode_prompt(self.tok, prompt))
                if rm is not None:
                    ends.append(end_of_response(self.tok, prompt))
                    tails.append(template_tail(self.tok, prompt) if rm.reads_template_tail
                                 else [])
            except UserError as e:
                raise e.at(record_file(rec, path), rec.get("_line")) from None
        return ids, ends, tails

    def _check_vocabulary(self, model: torch.nn.Module, tok: Any, field: str, what: str) -> None:
        """A model given as --reward, --reference or --value reads the policy's token ids: its
        tokenizer (when it has one) must be the policy's, and it needs an embedding row for
        every id the policy can sample. Another chat template is only noted
        (`_note_other_template`)."""
        flag = "--" + field
        if tok is not None and tok.hf.get_vocab() != self.tok.hf.get_vocab():
            raise UserError(f"{what}'s tokenizer is not the policy's (it would read the "
                            f"policy's token ids as other tokens); give a {flag} made with the "
                            f"policy's tokenizer", path=getattr(self.cfg, field), field=field)
        if model.config.vocab_size < self.tok.vocab_size:
            raise UserError(f"{what} has {model.config.vocab_size} embeddings, the policy's "
                            f"tokenizer {self.tok.vocab_size} tokens; give a {flag} made with "
                            f"the policy's tokenizer", path=getattr(self.cfg, field), field=field)
        if tok is not None:
            self._note_other_template(tok, field, what)

    def _note_other_template(self, tok: Any, field: str, what: str) -> None:
        """Every model reads conversations as the policy's chat template writes them: one
        whose own template writes them otherwise (another default system prompt, another end
        of turn) is noted on stderr, once per directory. Not refused: a reward model trained
        on the same base with a plainer template may be meant."""
        difference = template_difference(self.tok, tok)
        where = Path(getattr(self.cfg, field)).resolve()
        if difference is None or where in self._noted_templates:
            return
        self._noted_templates.add(where)
        print(f"note: --{field} {getattr(self.cfg, field)}: its chat template writes a "
              f"conversation otherwise than the policy's (--policy {self.cfg.policy}): "
              f"{difference}; PPO gives {what} conversations as the policy's template writes "
              f"them", file=sys.stderr)

    def _init_value_model(self) -> ScalarHeadModel:
        if self.cfg.value:
            vm, vm_tok, _ = load_model(self.cfg.value, self.device)
            if not isinstance(vm, ScalarHeadModel):
                raise WrongKind("the value model must be a scalar-head model",
                                path=self.cfg.value, field="value")
            self._check_vocabulary(vm, vm_tok, "value", "the value model")
        elif self.reward_model is not None:
            vm = copy.deepcopy(self.reward_model)
        else:  # a reward function: start the value model from the policy, head at its init
            vm = ScalarHeadModel.from_gpt(self.policy)
        vm.fold_normalisation()  # from a reward model: V(s_T) on the scale PPO's rewards use
        vm.requires_grad_(True)
        return vm

    def _ptx_batches(self) -> BlockBatches:
        """Endless random blocks of the pretraining text (tokenized once, cached), with the
        policy's tokenizer; its position is `state()`, for checkpoints."""
        from gptlab.data.tokens import load_token_data
        if not self.cfg.ptx_data:
            raise UserError(f"{setting('ptx_coef')} > 0 needs {setting('ptx_data')}, "
                            f"pretraining text", field="ptx_data")
        block = min(self.policy.config.context, self.cfg.ptx_block_size)
        data = load_token_data(self.cfg.ptx_data, self.tok, block, val_fraction=0.0,
                               seed=self.cfg.seed, cache_dir=self.cfg.cache_dir,
                               fields=("ptx_data", "ptx_block_size"))
        return data.train_batches(self.cfg.ptx_batch_size, self.cfg.seed)

    # --- checkpoints --------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """What the next step depends on besides the weights and the optimizer. Nothing in a
        step draws from the global RNGs (the sampler and the minibatch order have their own
        seeded generators); their states are kept so that nothing that does later breaks
        exactness."""
        return {"step": self.step, "elapsed_s": self.elapsed, "prompt_rng": self.rng.getstate(),
                "kl_coef": self.kl_ctl.value if self.kl_ctl else None,
                "ptx": self.ptx.state() if self.ptx is not None else None, "rng": rng_state(),
                "skipped": dict(self.skips.counts), "config": dataclasses.asdict(self.cfg),
                "reward_fn_name": self.reward_fn_name}

    def checkpoint(self, state: dict) -> Path:
        """OUT/checkpoints/step-N: the policy as a model directory (every verb reads it),
        `value/`, the optimizer (one over both) and `state`. All are kept: each is a policy."""
        return Checkpointer(self.out, keep=None).save(
            state["step"], self.policy, self.tok, self.optimizer,
            MetricsLog.with_rows(self.out / "metrics.jsonl", state),
            extra={"stage": "ppo", "step": state["step"], "ppo_steps": self.cfg.steps,
                   "skipped": state["skipped"], "data_key": self.data_key},
            models={"value": self.value_model}, models_extra={"value": {"stage": VALUE_STAGE}})

    def _restore(self, path: Path) -> None:
        """Continue from checkpoint `path`: its policy and value weights, optimizer and state.
        The reference stays the initial policy (cfg.reference or cfg.policy)."""
        # check_run_dir verified it, before anything was written
        state = Checkpointer(self.out).load(path, self.policy, self.optimizer,
                                            models={"value": self.value_model}, verify=False)
        self._check_settings(state["config"], path)
        warn_if_data_changed(path, self.data_key, "prompts")
        # A function given in Python (the pipeline's execution reward) is in no setting: its
        # name is kept beside them (a checkpoint from before it was kept passes).
        theirs = state.get("reward_fn_name")
        if theirs is not None and theirs != self.reward_fn_name:
            raise UserError(f"was written with another reward function ({theirs!r} there, "
                            f"{self.reward_fn_name!r} now); resume with the same one, or choose "
                            f"another out (--out)", path=path, field="reward_fn")
        if state["step"] > self.cfg.steps:
            raise UserError(f"the run is at step {state['step']} already; give "
                            f"{setting('steps')} of at "
                            f"least that to continue it", path=path, field="steps")
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        self.resumed_state = state  # its line's metrics rows, which `train` restores
        self.rng.setstate(state["prompt_rng"])
        if self.kl_ctl is not None:
            self.kl_ctl.value = state["kl_coef"]
        if self.ptx is not None:
            self.ptx.load_state(state["ptx"])
        set_rng_state(state["rng"])

    def _check_settings(self, theirs: dict, path: Path) -> None:
        """Refuse to continue a run with settings that change its steps (see RESUMABLE)."""
        # A setting newer than the checkpoint was at its default there.
        defaults = {f.name: f.default for f in dataclasses.fields(self.cfg)
                    if f.default is not dataclasses.MISSING}
        theirs = {**defaults, **theirs}
        mine = dataclasses.asdict(self.cfg)
        diff = [k for k in mine
                if k not in RESUMABLE and not same_setting(theirs.get(k), mine[k])]
        if diff:
            raise UserError("was written with other settings (" + ", ".join(
                f"{k}: {theirs.get(k)!r} there, {mine[k]!r} now" for k in diff) + "); resume "
                "with the same settings, or choose another out (--out)", path=path, field=diff[0])

    def step_seed(self, step: int) -> int:
        """Step `step`'s own seed, for its rollout's sampling and its minibatch order: each
        step draws afresh, the same on a resumed run."""
        return (self.cfg.seed * 100_003 + step) % 2**64

    # --- 1. rollout ---------------------------------------------------------------------------
    def rollout(self, step: int) -> Rollout:
        cfg = self.cfg
        room = self.context - cfg.max_new_tokens
        prompts, records, ends, tails, stops = [], [], [], [], []
        # A draw with no prompt that fits is drawn again (one fits: __init__ checked).
        while not prompts:
            # (drawn by position: the same draws as sampling the records themselves)
            for i in self.rng.sample(range(len(self.records)), min(cfg.batch_size,
                                                                   len(self.records))):
                if len(self.prompt_ids[i]) > room:  # counted in __init__
                    continue
                prompts.append(self.prompt_ids[i])
                records.append(self.records[i])
                stops.append(self.prompt_stops[i])
                if self.prompt_ends:  # with a reward model: the end of turn closing its response
                    ends.append(self.prompt_ends[i])
                    tails.append(self.prompt_tails[i])
        stop_when = ({"stop_when": StopStrings(self.tok, (), prompts, stops)}
                     if any(stops) else {})
        gen = generate(self.policy, prompts, SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            stop_ids=self.stop_ids), seed=self.step_seed(step), pad_id=self.tok.pad_id,
            **stop_when)
        shared = common_prefix_length(prompts)
        ids, mask, rmask, P, prefix = layout(prompts, gen.tokens, self.tok.pad_id, self.device,
                                             shared)
        return Rollout(ids, mask, rmask, P, records, gen.tokens,
                       queued_copy(torch.tensor(gen.finished), self.device), prefix, ends, tails,
                       prompts, gen.finished, right_padded_rows(prompts, gen.tokens, shared),
                       stops if any(stops) else [])

    # --- 2. score -----------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, ro: Rollout) -> Tensor:
        if self.reward_model is not None:
            scores = self._reward_model_scores(ro)
        else:
            scores = self._reward_fn_scores(ro)
        # A response that never ended is penalised by a fixed amount.
        return scores - self.cfg.missing_eos_penalty * (~ro.finished).float()

    def _reward_fn_scores(self, ro: Rollout) -> Tensor:
        """The reward function's scores of the decoded responses: one real number each, or
        a UserError naming the function (and the prompt's line, for a bad score)."""
        # Copies, as `label` gives its labeler: a function that appends the response to a
        # prompt's messages, to score the conversation, changes none of PPO's prompts.
        records = copy.deepcopy(ro.records)
        prompts = [r.get("prompt", r.get("messages")) for r in records]
        texts, _ = self._response_texts(ro)
        name = self.reward_fn_name
        try:
            returned = self.reward_fn(prompts, texts, records)
            # (a generator runs here: what it raises is the function's)
            values = list(returned) if is_score_list(returned) else None
        except (Exception, SystemExit) as e:  # the user's function: report it, never a
            # silent zero, nor a silent end (sys.exit(0) would exit with success)
            raise UserError(f"the reward function {name} raised {exception_line(e)}",
                            field="reward_fn") from e
        if values is None:  # a forgotten `return`, one number for the whole batch, a dict
            what = kind_of(returned)
            raise UserError(f"the reward function {name} returned {what}, not a list of "
                            f"{len(texts)} scores (one per response)", field="reward_fn")
        if len(values) != len(texts):
            raise UserError(f"the reward function {name} returned "
                            f"{counted(len(values), 'score')} for "
                            f"{counted(len(texts), 'response')}", field="reward_fn")
        numbers = []
        for v, rec in zip(values, ro.records):
            try:
                numbers.append(reward_number(v, name, rec.get("id")))
            except UserError as e:
                raise e.at(record_file(rec, self.cfg.prompts), rec.get("_line")) from None
        return queued_copy(torch.tensor(numbers, dtype=torch.float32), self.device)

    def _response_texts(self, ro: Rollout) -> tuple[list[str], list[bool]]:
        """Each response's text as `gptlab sample` writes it: a cut one without the character
        its cut split, one its template's end of turn in text ended (`Rollout.stops`) cut
        before it; and for each, whether that end of turn ended it."""
        texts, ended = [], []
        stops = ro.stops or [()] * len(ro.responses)
        for rec, ids, r, done, stop in zip(ro.records, self._prompt_ids(ro), ro.responses,
                                           self._finished(ro), stops):
            prompt = prompt_of(rec)
            if not stop:
                texts.append(self.tok.decode_response(prompt, ids, r, cut=not done))
                ended.append(False)
                continue
            # Decoded with the template's lead (the text StopStrings watched), cut there, then
            # the lead left out, as `sample_responses` writes a response.
            text = self.tok.decode_response(prompt, ids, r, cut=not done, lead="")
            text, found = cut_reply(text, self.tok.answer_lead(prompt), stop)
            texts.append(text)
            ended.append(found is not None)
        return texts, ended

    def _reward_model_scores(self, ro: Rollout) -> Tensor:
        """The reward model reads each response as it learned to read one (`scored_response`):
        closed by the end of turn, a response cut at max_new_tokens included, then the
        template's text after it for one that reads whole conversations."""
        shared = 0 if ro.prefix is None else ro.prefix.shape[1]
        prompts = self._prompt_ids(ro)
        tails = ro.tails or [[]] * len(prompts)
        finished = self._finished(ro)
        tokens = list(ro.responses)
        if ro.stops:
            # A response its end of turn in text ended is read as the reward model learned
            # one: its text before that end, encoded (`encode_response`, less the end of turn
            # it closes with), then closed by `scored_response` as one cut short is.
            texts, ended = self._response_texts(ro)
            finished = list(finished)
            for i, rec in enumerate(ro.records):
                if ended[i]:
                    whole = encode_response(self.tok, texts[i], prompt_of(rec))
                    tokens[i], finished[i] = whole[:len(whole) - len(ro.ends[i])], False
        responses = [scored_response(r, done, end, self.context - len(p), tail)
                     for r, done, end, p, tail in zip(tokens, finished, ro.ends, prompts, tails)]
        return reward_model_scores(self.reward_model, prompts, responses, self.tok.pad_id,
                                   self.device, shared)

    @staticmethod
    def _prompt_ids(ro: Rollout) -> list[list[int]]:
        """Each row's prompt tokens: the shared prefix, then its own, without padding."""
        if ro.prompt_ids:
            return ro.prompt_ids
        shared = 0 if ro.prefix is None else ro.prefix.shape[1]
        head = [] if ro.prefix is None else ro.prefix[0].tolist()
        return [head + ro.ids[i, :ro.P][ro.attention_mask[i, shared:shared + ro.P].bool()]
                .tolist() for i in range(len(ro.responses))]

    @staticmethod
    def _finished(ro: Rollout) -> list[bool]:
        return ro.finished_list or ro.finished.tolist()

    # --- 3 + 4. rewards with KL, then GAE ------------------------------------------------------
    @torch.no_grad()
    def advantages(self, ro: Rollout, scores: Tensor) -> dict[str, Tensor | float]:
        cfg = self.cfg
        old_logp, _ = response_logprobs(self.policy, ro, cfg.temperature)
        ref_logp, _ = response_logprobs(self.reference, ro, cfg.temperature)
        old_values = response_values(self.value_model, ro)
        m = ro.response_mask.float()
        # Zeroed past each response's end, not multiplied by the mask: there the log-ratio is
        # the pad token's, no estimate of anything, and k3's exp of it can be inf (× 0: NaN).
        kl = kl_per_token(old_logp, ref_logp, cfg.kl_estimator).masked_fill(m == 0, 0.0)
        beta = self.kl_ctl.value if self.kl_ctl else cfg.kl_coef
        # r_t = −β KL_t, and the score is paid on the last real token.
        rewards = -beta * kl
        last = m.sum(1).long() - 1
        rewards[torch.arange(len(last), device=last.device), last] += scores
        adv, returns = gae(rewards, old_values * m, m, cfg.gae_gamma, cfg.gae_lambda)
        if cfg.whiten_advantages:
            adv = whiten(adv, m)
        # β as the host knows it: logged with no read of a tensor.
        return {"old_logp": old_logp, "old_values": old_values, "advantages": adv,
                "returns": returns, "kl": kl, "beta": beta}

    # --- 5. clipped updates -------------------------------------------------------------------
    def update(self, ro: Rollout, batch: dict[str, Tensor | float], lr: float, step: int
               ) -> UpdateStats:
        """The step's PPO epochs; their statistics are left on the device, to be read with the
        step's other metrics (`_rollout_metrics`)."""
        cfg = self.cfg
        set_lr(self.optimizer, lr)
        B = ro.ids.shape[0]
        names = ["ptx_loss"] * (self.ptx is not None) + [
            "pg_loss", "value_loss", "clipfrac", "approx_kl", "value_clipfrac", "entropy",
            "grad_norm"]
        rows: list[Tensor] = []  # each minibatch's statistics, in the order of `names`
        g = torch.Generator().manual_seed(self.step_seed(step))
        for _ in range(cfg.ppo_epochs):
            for idx, at in minibatches(torch.randperm(B, generator=g), cfg.minibatch_size,
                                       self.device):
                mb = ro.rows(idx, at)
                m = mb.response_mask.float()
                logp, entropy = response_logprobs(self.policy, mb, cfg.temperature, True)
                pg_loss, pg = clipped_policy_loss(logp, batch["old_logp"][idx],
                                                  batch["advantages"][idx], m, cfg.clip)
                values = response_values(self.value_model, mb)
                vf_loss, vf_clipfrac = clipped_value_loss(values, batch["old_values"][idx],
                                                          batch["returns"][idx], m,
                                                          cfg.value_clip)
                loss = pg_loss + cfg.vf_coef * vf_loss
                ptx = []
                if self.ptx is not None:
                    block = queued_copy(next(self.ptx), self.device)
                    ptx_loss = self.policy(block[:, :-1], labels=block[:, 1:],
                                           all_targets=True)
                    loss = loss + cfg.ptx_coef * ptx_loss
                    ptx = [ptx_loss]
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # The norm before clipping, read with the step's metrics: no wait here.
                grad_norm = clip_grad_norm(self.trained, cfg.grad_clip)
                self.optimizer.step()
                rows.append(torch.stack([v.detach().float() for v in (
                    *ptx, pg_loss, vf_loss, pg["clipfrac"], pg["approx_kl"], vf_clipfrac,
                    masked_mean(entropy, m), grad_norm)]))
        return UpdateStats(names, torch.stack(rows))

    def train(self) -> Path:
        """Run the steps left to `cfg.steps`; Ctrl-C saves a checkpoint of the last finished
        step, then re-raises KeyboardInterrupt. A step with a non-finite `DIVERGED_IF` metric
        ends the run with a UserError once its row is logged, before anything is saved."""
        cfg = self.cfg
        metrics_path = self.out / "metrics.jsonl"
        log: MetricsLog | None = None
        if self.resumed_from is not None:
            MetricsLog.rewind(metrics_path, self.resumed_state)
            annotate_resume(self.out, cfg, self.resumed_from.name)
            Checkpointer(self.out).point_latest(self.resumed_from)
            log = MetricsLog(metrics_path)
            print(f"resuming from {self.resumed_from} (step {self.step} of {cfg.steps})",
                  file=sys.stderr)
        start = time.time() - self.elapsed
        saved = self.step  # the step of the latest checkpoint (0: none)
        good = self.snapshot()  # the state after the last finished step, for Ctrl-C
        updating = False
        last: dict | None = None  # the last step's metrics.jsonl row, for the summary
        try:
            while self.step < cfg.steps:
                step = self.step + 1
                with memory_named(self.device, "a rollout", {"batch_size": cfg.batch_size},
                                  "lower it (--batch-size)"):
                    ro = self.rollout(step)
                scores = self.score(ro)
                batch = self.advantages(ro, scores)
                lr = lr_at(step - 1, cfg.warmup_steps, cfg.steps, cfg.lr, 1.0)
                # Up to here a step changed only what `good` holds; from here on, a Ctrl-C
                # waits for the step to finish, so that a checkpoint holds all of it.
                with held_interrupt("finishing this PPO update to save it"):
                    updating = True
                    with memory_named(self.device, "a PPO update", self._update_sizes(),
                                      "lower " + ("them (--minibatch-size, --ptx-batch-size)"
                                                  if self.ptx else "it (--minibatch-size)")):
                        update = self.update(ro, batch, lr, step)
                    row, stats, largest = self._rollout_metrics(step, ro, scores, batch, lr,
                                                                update)
                    self._check_rewards(step, ro, scores, batch, largest)
                    if self.kl_ctl:
                        self.kl_ctl.update(row["kl"], len(ro.records))
                    self.step, self.elapsed = step, time.time() - start
                    row = {**row, "elapsed_s": round(self.elapsed, 2), **stats}
                    if log is None:  # a new run: OUT gets its first files once a step is done
                        log = self._start_run(metrics_path)
                    log.log(row)
                    last = row
                    broken = {k: row[k] for k in DIVERGED_IF if k in row
                              and not math.isfinite(row[k])}
                    if broken:
                        # The update has made the weights NaN: its row is logged, but nothing
                        # is saved, which would write a NaN policy over a good one.
                        raise diverged(step, broken, self.out, Checkpointer(self.out).latest())
                    good = self.snapshot()
                    updating = False
                    if cfg.progress:
                        print(f"ppo step {step}/{cfg.steps} reward {row['reward']:+.3f} "
                              f"kl {row['kl']:.3f} entropy {row['entropy']:.3f} "
                              f"len {row['response_length']:.1f} "
                              f"clip {row['clipfrac']:.3f} approx_kl {row['approx_kl']:.4f} "
                              f"vloss {row['value_loss']:.3f}", file=sys.stderr)
                    if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):
                        self.checkpoint(good)
                        saved = step
            if self.skips.total:
                print(self.skips.report("prompts"), file=sys.stderr)
            # Inside the try: with save_every 0 (the default) no checkpoint holds the run yet,
            # and a Ctrl-C while the policy is written must save one, or every step was lost.
            out = self.save(self.out)
        except KeyboardInterrupt:
            if not updating and good["step"] > 0:
                path = self.checkpoint(good) if good["step"] > saved \
                    else Checkpointer(self.out).latest()
                interrupted_saved(path)
            raise
        finally:
            if log is not None:
                log.close()
        if last is None and self.step > 0:  # resumed at its last step: the row is logged
            last = next((r for r in read_metrics(metrics_path) if r.get("step") == self.step),
                        None)
        print(self._summary(last), file=sys.stderr)
        return out

    def _summary(self, last: dict | None) -> str:
        """The line `gptlab ppo` ends on, as `sft` and `reward` end on theirs: the steps, the
        last step's mean reward, KL from the reference (summed over a response) and response
        length, and where the policy is."""
        def num(key: str, spec: str) -> str:  # metrics.jsonl stores a non-finite value as null
            value = last[key]
            return format(value, spec) if isinstance(value, (int, float)) else "nan"
        said = ""
        if last is not None and {"reward", "kl", "response_length"} <= last.keys():
            said = (f"; last step: reward {num('reward', '+.3f')}, kl {num('kl', '.3f')}, "
                    f"response length {num('response_length', '.1f')} tokens")
        return f"PPO: {counted(self.step, 'step')}{said}; saved to {self.out}"

    def _update_sizes(self) -> dict[str, int]:
        """The settings that size an update's memory, as an out-of-memory names them."""
        return {"minibatch_size": self.cfg.minibatch_size,
                **({"ptx_batch_size": self.cfg.ptx_batch_size} if self.ptx else {})}

    @staticmethod
    def _rollout_metrics(step: int, ro: Rollout, scores: Tensor,
                         batch: dict[str, Tensor | float], lr: float,
                         update: UpdateStats | None = None
                         ) -> tuple[dict[str, float], dict[str, float], tuple[float, float] | None]:
        """Step `step`'s rollout as metrics.jsonl logs it, its update's statistics (empty
        without `update`), and the largest |score| and |return| (None without the batch's
        returns), for `_check_rewards`; `kl` is a response's summed per-token KL, averaged over
        responses: the scale of `target_kl`."""
        bounds = [scores.abs().max(), batch["returns"].abs().max()] if "returns" in batch else []
        rollout = torch.stack([v.float() for v in (
            scores.mean(), scores.std() if len(scores) > 1 else scores.new_zeros(()),
            batch["kl"].sum(1).mean(), ro.response_mask.sum(1).float().mean(),
            ro.finished.float().mean(), *bounds)])
        # Read at once, the step's one read: read one by one, each waited for the GPU.
        if update is None:
            values, stats = rollout.tolist(), {}
        else:
            values = torch.cat([rollout, update.table.flatten()]).tolist()
            stats = update.means(values[len(rollout):])
        reward, std, kl, length, eos = values[:5]
        largest = (values[5], values[6]) if bounds else None
        return {"step": step, "reward": reward, "reward_std": std, "kl": kl,
                "kl_coef": float(batch["beta"]), "response_length": length,
                "eos_fraction": eos, "lr": lr}, stats, largest

    def _check_rewards(self, step: int, ro: Rollout, scores: Tensor,
                       batch: dict[str, Tensor | float],
                       largest: tuple[float, float] | None) -> None:
        """End the run with a UserError, before step `step`'s row is logged or anything saved,
        where a score is non-finite or beyond ±MAX_REWARD (a reward model's: a reward
        function's were refused as it returned them, `reward_number`), naming its prompt's file
        and line, where a return is NaN (`_nan_return`), or where one is beyond ±MAX_RETURN
        (the KL penalty's). Its update went through overflowed arithmetic: its advantages 0 or
        NaN, its value loss inf."""
        if largest is None:
            return
        score, ret = largest
        if not score <= MAX_REWARD:  # NaN too
            values = scores.tolist()  # a read, on the way to the error alone
            i = next(i for i, v in enumerate(values) if not abs(v) <= MAX_REWARD)
            rec, penalty = ro.records[i], self.cfg.missing_eos_penalty
            source, field = (f"the reward model {self.cfg.reward}", "reward") \
                if self.reward_model is not None \
                else (f"the reward function {self.reward_fn_name}", "reward_fn")
            of = "" if rec.get("id") is None else f" to prompt id {rec['id']}"
            less = f" (less the missing-EOS penalty {penalty:g})" \
                if penalty and not self._finished(ro)[i] else ""
            why = "is not a number" if math.isnan(values[i]) else \
                f"is beyond the ±{MAX_REWARD:g} a score may reach ({SQUARED})"
            raise UserError(f"step {step}: the score {source} gave the response{of} "
                            f"({values[i]}){less} {why}", field=field).at(
                record_file(rec, self.cfg.prompts), rec.get("_line"))
        if math.isnan(ret):
            raise self._nan_return(step, ro, batch)
        if not ret <= MAX_RETURN:
            raise UserError(f"step {step}: a return (the score less the KL penalty, kl_coef "
                            f"{batch['beta']:g} times the per-token KL to the reference, summed) "
                            f"reached "
                            f"{ret}, beyond the ±{MAX_RETURN:g} PPO takes ({SQUARED}); give a "
                            f"smaller {setting('kl_coef')}", field="kl_coef")

    def _nan_return(self, step: int, ro: Rollout, batch: dict[str, Tensor | float]
                    ) -> UserError:
        """The error of a NaN return where every score is finite: no kl_coef makes it a
        number, so it names what does, read on the way to the error alone: the policy's
        log-probabilities of its responses (not finite: −inf less −inf is NaN too), else the
        reference's (a NaN KL beside the policy's finite ones is theirs), else the value
        model's values (GAE adds them), else an infinite KL or value that the sums met."""
        m = ro.response_mask.bool()
        cfg = self.cfg
        if not bool(batch["old_logp"][m].isfinite().all()):
            why, field = (f"the policy {cfg.policy} gives its own responses' tokens "
                          f"log-probabilities that are not finite"), "policy"
        elif bool(batch["kl"][m].isnan().any()):
            why, field = (f"the reference model {cfg.reference or cfg.policy} gives the "
                          f"responses' tokens log-probabilities that are NaN"), \
                "reference" if cfg.reference else "policy"
        elif bool(batch["old_values"][m].isnan().any()):
            why, field = "the value model's values of the responses are NaN", "value"
        else:
            return UserError(f"step {step}: a return is not a number: the per-token KL to the "
                             f"reference (times kl_coef {batch['beta']:g}) or the value "
                             f"model's values are infinite at a token")
        return UserError(f"step {step}: a return (the score less the KL penalty) is not a "
                         f"number: {why} (weights that hold NaN, or a forward pass that "
                         f"overflowed)", field=field)

    def _start_run(self, metrics_path: Path) -> MetricsLog:
        """run.json and a fresh metrics.jsonl, written only once the first step is done, so
        that a run failing before it (a reward function that raises, no prompt that fits)
        leaves nothing behind."""
        self.out.mkdir(parents=True, exist_ok=True)
        record_run(self.out, self.cfg)
        metrics_path.unlink(missing_ok=True)
        return MetricsLog(metrics_path)

    def save(self, path: Path) -> Path:
        # The value model goes first, into OUT/value: OUT's old model, if any, is moved aside
        # before it, config.json first, or a save killed there left the old policy's config
        # beside the new value model; a save that fails puts the old policy and value back.
        made = missing_dirs(path)
        with old_files_aside(ensure_dir(path), (*model_files(self.tok), "value"), made,
                             dirs=["value"]):
            save_model(path / "value", self.value_model, None, extra={"stage": VALUE_STAGE})
            save_model(path, self.policy, self.tok,
                       extra={"stage": "ppo", "ppo_steps": self.cfg.steps,
                              "skipped": self.skips.counts})
        return path


@reports_path_errors
def ppo(cfg: PPOConfig, reward_fn: Callable | None = None) -> Path:
    """Run PPO and write the policy (a model directory) to `cfg.out`."""
    return PPOTrainer(cfg, reward_fn).train()
