"""Batched generation with a KV cache, on token ids only (the engine knows no text).

Prompts of different lengths are left-padded so every row writes the cache at the same position;
position ids are derived from the attention mask, so padding changes nothing for real tokens.
Each step is one batched forward of one token per row: no Python work per row (but the
`stop_when` check a caller may give, which stop strings need: text is the caller's).
"""
from __future__ import annotations

import math
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from gptlab.devices import queued_copy
from gptlab.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `greedy` takes the most likely one (the temperature is then unused;
    a temperature of 0 is not a way to ask for greedy decoding). Checked when made: a bad value
    is a UserError naming its field (the CLI flag of the same name). Frozen, so that it stays
    as checked: `params.temperature = 0` is refused (dataclasses.FrozenInstanceError); make
    another with `dataclasses.replace(params, temperature=0.5)`, which is checked in turn."""
    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = None    # None: no top-k filter
    top_p: float | None = None  # None (or 1): no nucleus filter
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # A list given stays no list the caller could change later (the one way into a frozen
        # dataclass's fields is object.__setattr__).
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise UserError(f"must be an integer of at least 1, got {self.max_new_tokens!r}",
                            field="max_new_tokens")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature):
            raise UserError(f"must be a finite number, got {self.temperature!r}",
                            field="temperature")
        if not self.greedy and self.temperature <= 0:
            raise UserError(f"must be > 0, got {self.temperature!r} (greedy decoding is "
                            f"--greedy, greedy=True in Python)", field="temperature")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise UserError(f"must be an integer of at least 1, got {self.top_k!r} (no top-k "
                            f"filter is no --top-k, top_k=None in Python)", field="top_k")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise UserError(f"must be in (0, 1], got {self.top_p!r}", field="top_p")
        for name in ("top_k", "top_p"):
            if self.greedy and getattr(self, name) is not None:
                # Every filter keeps the most likely token: with greedy it would change nothing.
                raise UserError(f"filters sampling, but greedy decoding takes the most likely "
                                f"token, which {name} always keeps; drop one of them",
                                field=name)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Generation:
    """One generation per prompt. `finished[i]`: a stop token or a stop string ended row i
    (not max_new_tokens or the context). A stop token ends `tokens[i]`; a stop string (see
    `generate`'s `stop_when`), marked in `stopped_by_string[i]`, leaves every token drawn up to
    and including the one that completed it, since it can start or end inside a token: the
    caller cuts the text (`stop_strings.cut_at_stop`).

    `logprobs[i][t]` is log softmax(logits / temperature) of the chosen token (temperature 1
    when greedy), before any top-k / top-p truncation, so that a PPO update that recomputes
    log-probabilities from logits / temperature gets the same numbers (`scale_logits` says what
    a temperature too small for that division gives).
    """
    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    prompt_lengths: list[int] = field(default_factory=list)
    stopped_by_string: list[bool] = field(default_factory=list)


def left_pad(prompts: list[list[int]], pad_id: int = 0,
             device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(ids (B, P), attention mask (B, P)) with each prompt right-aligned, built on the host
    and copied to `device` queued (see `queued_copy`)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
    return queued_copy(ids, device), queued_copy(mask, device)


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p.

    Each filter is a threshold on the logit, so a token tied with the last one kept stays too:
    which of equal tokens survive never depends on the order a sort put them in."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits = torch.sort(logits, descending=True, dim=-1).values
        probs = sorted_logits.softmax(-1)
        # Keep a token while the mass before it is below top_p (the top token always stays).
        kept = probs.cumsum(-1) - probs < top_p
        floor = sorted_logits.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def sampling_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution (B, V) a sampled token is drawn from: softmax of logits / temperature
    after top-k, then top-p, as transformers' Temperature, TopK and TopP warpers give it (the
    README's "Against transformers" says where the two part: ties at the nucleus's edge, a
    top_p on it to float precision, a temperature that overflows the division)."""
    scaled = scale_logits(logits, params.temperature)
    return filter_logits(scaled, params.top_k, params.top_p).softmax(-1)


def scale_logits(logits: Tensor, temperature: float, read_overflow: bool | None = None
                 ) -> Tensor:
    """logits / temperature, well defined at any temperature above 0.

    A tiny temperature (1e-39) overflows the division to ±inf, and softmax to NaN. Such a row
    is divided after subtracting its largest logit, which is set to 0 (below float32's range
    the temperature itself rounds to 0, and 0 / 0 is NaN) while the others go to -inf: the row
    samples as greedy decoding (exact ties share the draw) and log-probabilities stay finite.
    Rows that do not overflow are divided as they are, bit for bit as before.

    `read_overflow`: whether a row overflowed is read on the host, and the shifted rows made
    only then (on a GPU the read waits for the device); else they are made always, the same
    values. None: read only where autograd records a graph of `logits`, whose shifted rows'
    backward would keep the logits and a (B, T, V) mask of their maxima alive (amax's and
    masked_fill's), for rows whose gradient depends on which entries tie the maximum. Without
    a graph the shifted rows are made in the division's own buffer: nothing kept, and no more
    memory than the division alone."""
    scaled = logits / temperature
    overflow = ~torch.isfinite(scaled).all(-1, keepdim=True)  # (B, 1)
    graph = torch.is_grad_enabled() and logits.requires_grad
    if read_overflow is None:
        read_overflow = graph
    if read_overflow and not bool(overflow.any()):
        return scaled
    top = logits.amax(-1, keepdim=True)
    if graph:
        shifted = ((logits - top) / temperature).masked_fill(logits == top, 0.0)
        return torch.where(overflow, shifted, scaled)
    del scaled
    # A row that does not overflow subtracts +0.0, which leaves every float as it is.
    out = (logits - torch.where(overflow, top, 0.0)).div_(temperature)
    return out.masked_fill_((logits == top) & overflow, 0.0)


# Seeds the generator of the uniforms' low bits apart from the main one (a fixed odd mix).
_FINE_SEED_MIX = 0x9E3779B97F4A7C15


def fine_generator(gen: torch.Generator) -> torch.Generator:
    """The generator `sample_from` refines `gen`'s uniforms with, seeded from `gen`'s seed."""
    fine = torch.Generator(device=gen.device)
    fine.manual_seed(gen.initial_seed() ^ _FINE_SEED_MIX)
    return fine


def sample_from(probs: Tensor, gen: torch.Generator, fine: torch.Generator) -> Tensor:
    """One token per row drawn from `probs` (B, V) by inverting the CDF with one uniform each:
    the same distribution as torch.multinomial at a fraction of its cost on CPU.

    The CDF is summed and searched in float64: in float32 its steps near 1 are 6e-8 apart, so a
    token of probability 1e-9 would get no interval (or one 60 times too wide). The uniform is
    `gen`'s float32 draw (a multiple of 2^-24; seeded generations draw what they drew before)
    plus a float64 draw from `fine` (see `fine_generator`) times 2^-24 for the bits below it.

    The generators' device does the drawing: Apple's MPS has no float64, so `generate` keeps
    an MPS model's generators on the CPU, and the probabilities go there to be drawn from."""
    device = probs.device
    if gen.device != device:  # MPS: drawn on the CPU
        probs = probs.to(gen.device)
    cdf = probs.double().cumsum(-1)  # (B, V)
    shape = (probs.shape[0], 1)
    u = torch.rand(shape, generator=gen, device=probs.device, dtype=torch.float32).double()
    u = u + torch.rand(shape, generator=fine, device=probs.device, dtype=torch.float64) * 2**-24
    tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    # Rounding can put u·total past the last nonzero entry; step back onto a token with mass.
    tok = tok.clamp(max=probs.shape[1] - 1)
    bad = probs.gather(-1, tok[:, None])[:, 0] <= 0
    # A where, not tok[bad] = ...: asking whether any row is bad waits for a GPU every token.
    tok = torch.where(bad, probs.argmax(-1), tok)
    return tok if tok.device == device else tok.to(device)


# Called at each step with the prompts (their indices) that drew a token and the token each
# drew, a stop token included; a row that stopped draws no more.
OnTokens = Callable[[list[int], list[int]], None]
# Called at each step with the prompts still going after the stop tokens and the token each
# drew; returns those that end now (`stop_strings.StopStrings` watches their text).
StopWhen = Callable[[list[int], list[int]], list[int]]


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams,
             seed: int | None = None, pad_id: int = 0, on_tokens: OnTokens | None = None,
             stop_when: StopWhen | None = None) -> Generation:
    """Continue each prompt until a stop token (or string) or `max_new_tokens` (or the context)
    is reached.

    Each row gets min(`max_new_tokens`, context - its own prompt's length) new tokens, as it
    would alone: left padding makes the batch longer than a short row, but positions (and the
    model's context check) count a row's real tokens. A row that fills the context leaves the
    batch unfinished (`finished` is True only for a row ended by a stop token or string). NaN
    logits for a token a row draws are a UserError naming the row (field `model`), raised at
    the end, or with `on_tokens`, at that step, before its tokens are handed on.

    `on_tokens(rows, tokens)` gets each step's tokens as they are drawn (`OnTokens`), for a
    reply shown as it is written; the tokens, log-probabilities and draws are the same with
    it or without, and without it a step reads no more from the device than before.

    `stop_when(rows, tokens)` (`StopWhen`) ends the rows it returns at this step, as a stop
    token would, but keeping the token drawn: `finished` and `stopped_by_string` are True for
    them. It costs one read from the device a step; without it nothing changes."""
    if not prompts:
        raise ValueError("no prompts to continue")
    device = next(model.parameters()).device
    context = model.config.context
    for i, p in enumerate(prompts):
        if not 0 < len(p) < context:
            raise ValueError(f"prompt {i} has {len(p)} tokens: every prompt needs at least one, "
                             f"and room after it in the context of {context}")
    limits = [min(params.max_new_tokens, context - len(p)) for p in prompts]
    with eval_mode(model):
        return _generate(model, prompts, params, seed, pad_id, device, limits, on_tokens,
                         stop_when)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off inside; the model's own mode back after, also when the body raises."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _nan_logits(prompt: int, step: int) -> UserError:
    """The refusal of a generation whose prompt `prompt` drew from NaN logits at `step`."""
    return UserError(f"gave NaN logits for prompt {prompt} at new token {step + 1}: its weights "
                     f"hold NaN or its activations overflow its dtype; no token can be drawn "
                     f"from them", field="model")


def _generate(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams,
              seed: int | None, pad_id: int, device: torch.device, limits: list[int],
              on_tokens: OnTokens | None = None, stop_when: StopWhen | None = None
              ) -> Generation:
    gen = torch.Generator(device="cpu" if device.type == "mps" else device)  # see sample_from
    # torch takes seeds in [-2**63, 2**64) and reads a negative one modulo 2**64; any other
    # integer (a large --seed, or `sample`'s seed * 1_000_003 + batch) is read the same way.
    gen.manual_seed((0 if seed is None else seed) % 2**64)
    fine = fine_generator(gen)

    # Identical prompts (K samples of one prompt) are encoded once; their cache rows are copied.
    unique: dict[tuple[int, ...], int] = {}
    row_of = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
    ids, mask = left_pad([list(p) for p in unique], pad_id, device)
    B, P, steps = len(prompts), ids.shape[1], max(limits)
    # Room for every row: the copies below stay in it. P + steps may pass the context when a
    # short prompt sits beside a long one; each row's real tokens stay within it.
    # Rows are left-padded: local layers keep only their window's positions.
    cache = model.new_cache(B, P + steps, left_padded=True)
    cache.use_rows(len(unique))
    # What the host knows goes to the device queued: a plain copy waits for the GPU's queue.
    stop = queued_copy(torch.tensor(sorted(set(params.stop_ids)), dtype=torch.long), device)
    out_tokens = torch.zeros((B, steps), dtype=torch.long, device=device)
    out_logprobs = torch.zeros((B, steps), dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    by_string = torch.zeros(B, dtype=torch.bool, device=device)
    stops_early = bool(stop.numel()) or stop_when is not None
    limit = queued_copy(torch.tensor(limits, dtype=torch.long), device)
    lengths = limit.clone()  # a row that reaches its limit ends there, unfinished
    ragged = min(limits) < steps  # some rows fill the context before the last step

    logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1].float()
    if len(unique) < B:
        cache.select(row_of)  # a list: the cache moves its rows without reading them
        rows = queued_copy(torch.tensor(row_of), device)
        logits, mask = logits[rows], mask[rows]
    n = 0
    # Rows still decoding (finished ones are dropped), and the host's copy: on a GPU each read
    # of a tensor waits for the device, so a token reads one number at most (how many rows go
    # on, with stop tokens) and the rows themselves only when the batch compacts.
    live = torch.arange(B, device=device)
    live_rows = list(range(B))
    # The longest live prompt: with the tokens drawn since, the most real tokens of a row,
    # which the model would otherwise count on the device where the padded batch passes the
    # context (a short prompt beside a long one).
    longest_prompt = max(map(len, prompts))
    for t in range(steps):
        # Scaled once for the log-probabilities and the draw (sampling_probs' steps).
        scaled = scale_logits(logits, 1.0 if params.greedy else params.temperature,
                              read_overflow=False)
        logprobs = scaled.log_softmax(-1)
        if params.greedy:
            tok = logits.argmax(-1)
        else:
            probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1)
            tok = sample_from(probs, gen, fine)
        drawn_logprobs = logprobs.gather(-1, tok[:, None])[:, 0]
        out_tokens[live, t] = tok
        out_logprobs[live, t] = drawn_logprobs
        n = t + 1
        if on_tokens is not None:
            # One read: the tokens, which rows had not stopped (a stopped row waits for the
            # batch to compact, drawing tokens that are not its own), and which drew from NaN
            # logits: refused before their token is handed on (a chat would print it).
            drawn, going, nan = torch.stack([tok, (~done[live]).long(),
                                             drawn_logprobs.isnan().long()]).tolist()
            bad = [r for r, g, x in zip(live_rows, going, nan) if g and x]
            if bad:
                raise _nan_logits(min(bad), t)
            on_tokens([r for r, g in zip(live_rows, going) if g],
                      [d for d, g in zip(drawn, going) if g])
        if stop.numel():
            hit = torch.isin(tok, stop) & ~done[live]
            stopped = torch.zeros_like(done).scatter(0, live, hit)  # (B,) the rows ended now
            lengths.masked_fill_(stopped, t + 1)
            done |= stopped
        if stop_when is not None:
            # One read: the tokens, and which rows go on after the stop tokens.
            drawn, going = torch.stack([tok, (~done[live]).long()]).tolist()
            rows_going = [r for r, g in zip(live_rows, going) if g]
            ended = stop_when(rows_going, [d for d, g in zip(drawn, going) if g])
            if set(ended) - set(rows_going):
                raise ValueError(f"stop_when ended rows {sorted(set(ended) - set(rows_going))}, "
                                 f"which were not going")
            if ended:
                rows_ended = queued_copy(torch.tensor(sorted(set(ended))), device)
                lengths[rows_ended] = t + 1
                done[rows_ended] = True
                by_string[rows_ended] = True
        if t + 1 == steps:
            break
        keep = ~done[live]
        full = [False] * len(live_rows)
        if ragged:  # a row at its limit has filled the context: it leaves before the next step
            full = [limits[r] <= t + 1 for r in live_rows]
            keep &= ~(limit[live] <= t + 1)
        # Every row done is none left to go on: the early exit.
        going_on = int(keep.sum()) if stops_early else full.count(False)
        if going_on == 0:
            break
        if any(full) or going_on <= 0.75 * len(live_rows):  # compact: stop paying for them
            kept = [i for i, k in enumerate(keep.tolist() if stops_early
                                            else [not f for f in full]) if k]
            cache.select(kept)
            idx = queued_copy(torch.tensor(kept), device)
            live, mask, tok = live[idx], mask[idx], tok[idx]
            live_rows = [live_rows[i] for i in kept]
            longest_prompt = max(len(prompts[r]) for r in live_rows)
        mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=device)], 1)
        logits = model(tok[:, None], attention_mask=mask, cache=cache,
                       longest_row=longest_prompt + t + 1)[:, -1].float()

    # One read (on a GPU each read waits for the device): each row's n tokens, its n
    # log-probabilities as their float32 bits (rebuilt on the host exactly), its length,
    # whether a stop string ended it and whether it finished.
    rows = torch.cat([out_tokens[:, :n], out_logprobs[:, :n].view(torch.int32).long(),
                      lengths.clamp(max=n)[:, None], by_string[:, None].long(),
                      done[:, None].long()], 1).tolist()
    tokens, logprobs = [], []
    for row in rows:
        length = row[2 * n]
        tokens.append(row[:length])
        logprobs.append(array("f", array("i", row[n:n + length]).tobytes()).tolist())
    # A NaN logit makes its row's log-softmax NaN, and argmax or the CDF then pick a token
    # that means nothing: refuse the generation rather than return it.
    for i, lps in enumerate(logprobs):
        for t, lp in enumerate(lps):
            if math.isnan(lp):
                raise _nan_logits(i, t)
    return Generation(tokens=tokens, logprobs=logprobs, finished=[bool(r[-1]) for r in rows],
                      prompt_lengths=[len(p) for p in prompts],
                      stopped_by_string=[bool(r[-2]) for r in rows])
