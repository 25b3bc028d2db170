"""How many times one step of each training verb makes the host wait for a GPU, counted on the
CPU (see device_waits): at most what was measured, and no more with 4 layers than with 2.

The first GPU run found SFT steps bound by launches and waits, 68 of them a step where one a
layer had crept in. The 4-layer models here are the 2-layer ones with two more layers whose
outputs are zero (their output projections are), so they compute the same numbers and take the
same data-dependent branches: only the layers' count differs."""
import json
import random

import pytest
import torch

from device_waits import count_waits
from gptlab.checkpoint import save_model
from gptlab.data.instruct import Example
from gptlab.devices import queued_copy, to_device
from gptlab.engine import SamplingParams, generate, scale_logits
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.model.attention import KVCache, PrefixKV, is_right_padded
from gptlab.model.heads import ScalarHeadModel, has_scored_token
from gptlab.tokenizer import train_tokenizer
from gptlab.train.batching import ListBatches, pad_examples
from gptlab.train.loop import TrainConfig, count_tokens, train
from gptlab.train.pretrain import lm_loss
from gptlab.train.ppo import PPOConfig, PPOTrainer, layout, minibatches, right_padded_rows
from gptlab.train.reward import (EncodedRanking, collate_rankings, normalize_scores,
                                 pairs_right_by_ranking, ranked_scores, reward_loss)
from gptlab.train.sft import plan_batch, sft_loss, target_tokens

import instruct_task as task


def test_the_counter_counts_each_kind_of_wait_and_nothing_else():
    x = torch.arange(6.0)
    with count_waits() as c:
        y = (x * 2).exp().sum(0)
        x[torch.tensor([0, 2])]
    assert c.total == 0
    with count_waits() as c:
        x.sum().item(), x.tolist(), bool(x.any()), int(x[0]), float(x[1]), range(int(x[2]))
        x[x > 2], (x > 2).nonzero(), torch.equal(x, y), x.masked_select(x > 1)
        z = x.clone()
        z[z > 3] = 0.0
        torch.repeat_interleave(torch.tensor([1, 2]))
    assert c.total == 12
    assert [n for site, n in c.sites.items() if site.startswith("tolist tests/")] == [1]
    # copies, when asked for: those that name a device and block, not a change of dtype
    for copies, expected in ((False, 0), (True, 5)):
        with count_waits(copies=copies) as c:
            x.to("cpu"), x.to(torch.device("cpu"), torch.float64), x.to(x)
            x.to(torch.float64), x.to("cpu", non_blocking=True), torch.tensor([1.0])
            torch.tensor([1.0], device="cpu"), torch.as_tensor([1.0], device="cpu")
        assert c.total == expected


def widened(model: GPT, layers: int) -> GPT:
    """`model` with `layers` layers: the added ones copies of its last, their outputs zero."""
    cfg = GPTConfig(**{**model.config.__dict__, "n_layers": layers})
    wide = GPT(cfg)
    state = model.state_dict()
    for i in range(model.config.n_layers, layers):
        last = model.config.n_layers - 1
        state.update({k.replace(f"blocks.{last}.", f"blocks.{i}."): v.clone()
                      for k, v in model.state_dict().items() if k.startswith(f"blocks.{last}.")})
    wide.load_state_dict(state)
    with torch.no_grad():
        for block in wide.blocks[model.config.n_layers:]:
            block.attn.o_proj.weight.zero_()
            block.mlp.down.weight.zero_()
    return wide


def tiny(layers: int, vocab: int = 64) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, context=96, n_layers=2, n_heads=4, d_model=32,
                    positions="rotary", bias=False)
    return widened(GPT(cfg), layers)


def test_a_widened_model_computes_what_the_narrow_one_does():
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny(2)(ids), tiny(4)(ids))


def step_waits(model, items, collate, loss_fn, tmp_path, **kw) -> int:
    """The waits of one step of the common loop, blocking copies included: a run of 2 steps
    less a run of 1 (what they share, the start and the final save, cancels). The optimizer
    is AdamW as on a GPU, fused: the CPU's per-parameter one reads each step count, which no
    GPU run does."""
    counts = []
    for steps in (1, 2):
        m = type(model)(model.config) if isinstance(model, GPT) else model
        m.load_state_dict(model.state_dict())
        cfg = TrainConfig(max_steps=steps, batch_size=2, eval_every=0, eval_batches=0,
                          save_every=0, log_every=1, progress=False, device="cpu", lr=1e-3)
        # The batches are built, weighed and counted on the CPU, before they move.
        with count_waits(cpu_side=(ListBatches.__next__, target_tokens, count_tokens),
                         copies=True) as c:
            train(m, ListBatches(items, 2, 0, collate), loss_fn, cfg, tmp_path / f"run{steps}",
                  **kw)
        counts.append(c.total)
    return counts[1] - counts[0]


@pytest.fixture(autouse=True)
def fused_adamw(monkeypatch):
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: real(*a, **{**kw, "fused": True}))


# Measured after the waits that bought nothing were taken out (before: 3, 12 and 6; for PPO's
# phases see below), and the blocking copies (before: 1, 1 and 5: the gradient norm moved to
# the loss's device, the reward model's k and groups each step). Each names what is left.
PRETRAIN_WAITS = 1  # the loss and the gradient norm, read together after the update
SFT_WAITS = 1       # the same; the prefix and the targets are found on the CPU
REWARD_WAITS = 1    # the same; the batch says which prompt each response continues, and
                    # whether each has a token to score at (before: 3)


@pytest.mark.parametrize("layers", [2, 4])
def test_a_pretraining_step_waits_once_at_any_depth(layers, tmp_path):
    blocks = [torch.randint(0, 64, (17,), generator=torch.Generator().manual_seed(i))
              for i in range(8)]
    waits = step_waits(tiny(layers), blocks, torch.stack, lm_loss, tmp_path)
    assert waits <= PRETRAIN_WAITS


def sft_examples(prefix_len: int) -> list[Example]:
    rng = random.Random(0)
    prefix = [rng.randrange(1, 60) for _ in range(prefix_len)]
    out = []
    for _ in range(6):
        tail = [rng.randrange(1, 60) for _ in range(rng.randrange(1, 6))]
        completion = [rng.randrange(1, 60) for _ in range(rng.randrange(2, 9))]
        out.append(Example(prefix + tail + completion,
                           [0] * (prefix_len + len(tail)) + [1] * len(completion)))
    return out


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("prefix_len", [20, 0])
def test_an_sft_step_waits_once_at_any_depth(layers, prefix_len, tmp_path):
    waits = step_waits(tiny(layers), sft_examples(prefix_len),
                       lambda b: plan_batch(pad_examples(b, 0)), sft_loss, tmp_path,
                       loss_weight=target_tokens)
    assert waits <= SFT_WAITS


def random_rankings(seed: int, n: int) -> list[EncodedRanking]:
    """n rankings of 3 responses, each a prompt of 3-8 tokens and 1-5 more, drawn from seed."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        p = [rng.randrange(1, 60) for _ in range(rng.randrange(3, 9))]
        items.append(EncodedRanking([p + [rng.randrange(1, 60) for _ in range(rng.randint(1, 5))]
                                     for _ in range(3)], prompt_len=len(p)))
    return items


@pytest.mark.parametrize("layers", [2, 4])
def test_a_reward_model_step_waits_once_at_any_depth(layers, tmp_path):
    items = random_rankings(0, 4)
    rm = ScalarHeadModel(tiny(2).config)
    rm.backbone = tiny(layers)
    rm.config = rm.backbone.config
    waits = step_waits(rm, items, lambda b: collate_rankings(b, 0), reward_loss, tmp_path,
                       perplexity=False)
    assert waits <= REWARD_WAITS


def test_a_forward_told_its_padding_reads_no_mask_and_computes_the_same():
    model = tiny(2)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    right = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 7 + [0] * 2])
    left = right.flip(1)
    for mask, told in ((right, True), (left, False)):
        with count_waits() as c:
            asked = model(ids, mask)
        assert c.total >= 1  # the mask read: 2 for right padding, 1 for left
        with count_waits() as c:
            given = model(ids, mask, right_padded=told)
        assert c.total == 0
        assert torch.equal(asked, given)


def test_a_rollouts_rows_know_their_padding_as_the_mask_says():
    rng = random.Random(0)
    for _ in range(200):
        B, shared = rng.randint(1, 4), rng.choice([0, 0, 2])
        head = [7] * shared
        prompts = [head + [rng.randrange(1, 9) for _ in range(rng.choice([0, 3, 3, 5]))]
                   for _ in range(B)]
        responses = [[rng.randrange(1, 9) for _ in range(rng.choice([0, 1, 4]))]
                     for _ in range(B)]
        if max(len(p) for p in prompts) + max(len(r) for r in responses) == 0:
            continue
        _, mask, _, _, _ = layout(prompts, responses, 0, "cpu", shared)
        assert right_padded_rows(prompts, responses, shared) == [
            is_right_padded(mask[i:i + 1]) for i in range(B)]


def test_a_reward_batch_says_on_the_host_what_scoring_it_would_read():
    torch.manual_seed(0)
    rm = ScalarHeadModel(tiny(2).config)
    items = [EncodedRanking([[5, 6, 7, 8, 9], [5, 6, 7, 3]], prompt_len=3),
             EncodedRanking([[4, 5, 9, 9], [4, 5, 1, 2, 3], [4, 5, 6]], prompt_len=2)]
    # pad 9: a response of nothing else is scored in its prompt, by the sequences themselves
    for pad, scored in ((None, True), (8, True), (9, False), (3, False)):
        rm.pad_token_id = pad
        batch = collate_rankings(items, 0)
        plain = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        assert scored == all(has_scored_token(t, pad) for t in batch["cont_tokens"])
        with count_waits() as c:
            told = ranked_scores(rm, batch)
        if scored:
            assert c.total == 0
        with count_waits() as c:
            read = ranked_scores(rm, plain)
        assert c.total >= 2  # the rows' layout, and whether each has a token to score
        assert torch.equal(told, read)


def test_logits_scaled_without_a_graph_read_nothing_and_are_the_read_ones_bit_for_bit():
    logits = torch.tensor([[1e-30, -0.0, 3.0, 3.0], [1e30, 1e30, -2.0, 0.0],
                           [float("inf"), 1.0, 0.0, -0.0], [-0.0, 0.0, -1.0, 2.5],
                           [-3e38, 1e-45, 7.0, -7.0]])
    for t in (1e-39, 1e-10, 0.01, 0.7, 1.0, 3.0):
        scaled = logits / t  # scale_logits as it was: the rows read, the overflowed shifted
        overflow = ~torch.isfinite(scaled).all(-1, keepdim=True)
        top = logits.amax(-1, keepdim=True)
        shifted = ((logits - top) / t).masked_fill(logits == top, 0.0)
        expected = torch.where(overflow, shifted, scaled) if overflow.any() else scaled
        with count_waits() as c:
            got = [scale_logits(logits, t), scale_logits(logits, t, read_overflow=False)]
        assert c.total == 0
        for g in got:  # the same bits, signs of zero included
            assert torch.equal(g.view(torch.int32), expected.view(torch.int32))
        with count_waits() as c:  # with a graph: read
            scale_logits(logits.clone().requires_grad_(), t)
        assert c.total == 1


def test_ppo_s_plain_division_is_scale_logits_where_its_temperature_lets_nothing_overflow():
    # PPO's update divides its logits by T plainly (`response_logprobs`): scale_logits, with a
    # graph, reads whether a row overflowed, a wait each minibatch. PPOConfig takes T >= 0.01,
    # where a float32 logit overflows only past 3.4e36: below that, the same values and
    # gradients bit for bit, ties and logits near the bound included (the bound itself:
    # tests/test_ppo_resume.py refuses --temperature below 0.01).
    gen = torch.Generator().manual_seed(0)
    big = torch.finfo(torch.float32).max * 0.0099  # 3.37e36
    for scale in (1.0, 30.0, 1e20, big):
        logits = (torch.rand(3, 2, 5, generator=gen) * 2 - 1) * scale  # |logit| <= scale
        logits[0, 0, :2] = logits[0, 0, 2]  # three alike
        logits[2, 0, 1] = big
        for t in (0.01, 0.7, 1.0, 3.0):
            upstream = torch.randn(logits.shape, generator=gen)
            x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            want = scale_logits(x, t).log_softmax(-1)
            want.backward(upstream)
            with count_waits() as c:
                got = (y / t).log_softmax(-1)
                got.backward(upstream)
            assert c.total == 0 and torch.isfinite(y / t).all()
            for a, b in ((got, want), (y.grad, x.grad)):
                assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (scale, t)


def test_the_loss_and_gradients_of_each_step_are_those_of_the_plain_reads():
    # sft_loss's targets found on the CPU and indexed, against the head's own search.
    for prefix_len in (20, 0):
        model = tiny(2)
        batch = pad_examples(sft_examples(prefix_len), 0)
        grads = []
        for fn in (lambda: sft_loss(model, plan_batch(batch)), lambda: reference_sft(model, batch)):
            model.zero_grad()
            loss = fn()
            loss.backward()
            grads.append((loss, [p.grad.clone() for p in model.parameters()]))
        (a, ga), (b, gb) = grads
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    # pretraining's every-position loss, against the search that finds no -100
    model, block = tiny(2), torch.randint(0, 64, (3, 17))
    out = []
    for fn in (lambda: lm_loss(model, block), lambda: model(block[:, :-1], labels=block[:, 1:])):
        model.zero_grad()
        loss = fn()
        loss.backward()
        out.append((loss, [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(x, y) for x, y in zip(out[0][1], out[1][1]))


def reference_sft(model: GPT, batch: dict) -> torch.Tensor:
    """sft_loss as it was: the prefix and the targets found on the batch's device."""
    from gptlab.model.attention import MIN_SHARED_PREFIX, PrefixKV
    from gptlab.train.sft import shared_prefix
    ids, labels = batch["input_ids"], batch["labels"]
    n = shared_prefix(batch)
    if n < MIN_SHARED_PREFIX:
        return model(ids, labels=labels)
    prefix = PrefixKV()
    model.hidden_states(ids[:1, :n], cache=prefix)
    rows = torch.zeros(ids.shape[0], dtype=torch.long)
    h, _ = model.hidden_states(ids[:, n:], batch["attention_mask"], cache=prefix.expand(rows))
    return model.lm_loss(h, labels[:, n:])


# --- PPO: rollout, score, advantages (rewards with KL and GAE), update ----------------------

@pytest.fixture(scope="module")
def ppo_dirs(tmp_path_factory):
    """A tokenizer, prompts sharing a long start (as the world's schema), and for 2 and 4
    layers a policy and a reward model that compute the same numbers."""
    d = tmp_path_factory.mktemp("ppo_waits")
    paths = task.write_task(d, n=40)
    records = [json.loads(line) for line in paths["prompts"].read_text().splitlines()]
    shared = d / "shared.jsonl"
    shared.write_text("".join(json.dumps({
        "id": r["id"], "prompt": "You answer questions about the animals of the farm, in a "
        "few words and nothing more. " + r["prompt"]}) + "\n" for r in records))
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    for layers in (2, 4):
        policy = tiny(layers, tok.vocab_size)
        save_model(d / f"policy{layers}", policy, tok)
        rm = ScalarHeadModel(policy.config)
        rm.backbone.load_state_dict(policy.state_dict())
        torch.manual_seed(1)
        torch.nn.init.normal_(rm.head.weight)
        save_model(d / f"rm{layers}", rm, tok, extra={"stage": "reward"})
    return d, {"plain": paths["prompts"], "shared": shared}


def ppo_waits(ppo_dirs, layers: int, prompts: str, max_new_tokens: int = 8,
              batch_size: int = 6, **kw) -> dict[str, int]:
    """The waits of each phase of a PPO step, blocking copies included."""
    d, files = ppo_dirs
    t = PPOTrainer(PPOConfig(policy=str(d / f"policy{layers}"), prompts=str(files[prompts]),
                             out=str(d / "out"), reward=str(d / f"rm{layers}"), device="cpu",
                             max_new_tokens=max_new_tokens, batch_size=batch_size,
                             minibatch_size=3, ppo_epochs=2, progress=False, **kw))
    counts = {}
    with count_waits(copies=True) as c:
        ro = t.rollout(1)
    counts["rollout"] = c.total
    with count_waits(copies=True) as c:
        scores = t.score(ro)
    counts["score"] = c.total
    with count_waits(copies=True) as c:
        batch = t.advantages(ro, scores)
    counts["advantages"] = c.total
    # The minibatches' order is drawn and listed on the CPU.
    with count_waits(cpu_side=(minibatches,), copies=True) as c:
        t._rollout_metrics(1, ro, scores, batch, 1e-3, t.update(ro, batch, 1e-3, 1))
    counts["update"] = c.total
    counts["new_tokens"] = ro.response_mask.shape[1]
    return counts


# Measured, whatever the depth (before: a rollout waited about 7 times a token, the update 7
# times a minibatch, scoring twice a row). The rollout: one a token but the last (how many rows
# go on, the early exit), one a compaction of the batch, 5 at its end (before: 6 and 21
# copies: the prompts, stop ids, limits and prompt copies' rows moved plainly, and the cache
# asked which rows to copy; the draws moved twice a token to where they were). Scoring and the
# advantages none: the rollout's rows say whether their mask is right padding, a forward without
# a graph makes logits / T's overflowed rows without asking, and the layout's copies and the
# shared prefix's rows do not block (before: 1 and 5, 5 and 5 with a shared prefix). The
# update and the step's metrics: one read of the rollout's metrics and the minibatches'
# statistics together (before: 7, each of the 4 minibatches asking whether the policy's
# logits / T overflowed, the statistics, the metrics and the KL coefficient, a CPU tensor,
# each read apart; earlier, 3 a minibatch, or 2 and 2 copies).
@pytest.mark.parametrize("prompts", ["plain", "shared"])
def test_each_phase_of_a_ppo_step_waits_as_often_at_any_depth(ppo_dirs, prompts):
    two, four = ppo_waits(ppo_dirs, 2, prompts), ppo_waits(ppo_dirs, 4, prompts)
    assert two == four
    assert two["rollout"] <= two["new_tokens"] - 1 + 5
    assert two["score"] == 0
    assert two["advantages"] == 0
    assert two["update"] == 1


def test_a_ppo_ptx_update_moves_its_text_without_waiting(ppo_dirs):
    d, _ = ppo_dirs
    ptx = dict(ptx_coef=0.1, ptx_data=[str(d / "corpus.txt")], ptx_batch_size=2,
               ptx_block_size=16, cache_dir=str(d / "cache"))
    assert ppo_waits(ppo_dirs, 2, "plain", **ptx)["update"] == ppo_waits(
        ppo_dirs, 2, "plain")["update"]


def test_a_queued_copy_to_a_gpu_goes_through_pinned_memory(monkeypatch):
    # No GPU here: what it asks of torch, recorded.
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda t, *a, **kw: calls.append(("to", *map(str, a), kw)) or t)
    x = torch.arange(3)
    queued_copy(x, "cuda")
    assert calls == ["pin", ("to", "cuda", {"non_blocking": True})]
    calls.clear()
    assert queued_copy(x, "cpu") is x and calls == []  # there already
    queued_copy(torch.empty(3, device="meta"), "cuda")  # not on the host: nothing to pin
    assert calls == [("to", "cuda", {})]


def test_a_queued_copy_of_a_pinned_tensor_reads_a_copy_of_it(monkeypatch):
    # pin_memory gives a pinned tensor itself: the queued copy read it after the host changed it.
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **kw: t)  # what the copy reads
    x = torch.arange(3)
    read = queued_copy(x, "cuda")
    x += 10
    assert read is not x and read.tolist() == [0, 1, 2]


def test_the_common_loops_batches_go_to_a_gpu_through_pinned_memory(monkeypatch):
    # Each tensor of every verb's batches, pinned afresh (nothing writes it while it is read).
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda t, *a, **kw: calls.append(("to", *map(str, a), kw)) or t)
    batch = {"ids": torch.arange(3), "pair": (torch.arange(2), [5]), "prompt_of": [0, 0]}
    moved = to_device(batch, torch.device("cuda"))
    assert calls == ["pin", ("to", "cuda", {"non_blocking": True})] * 2
    assert moved["pair"][1] == [5] and moved["prompt_of"] == [0, 0]


def test_a_rollout_waits_once_a_token(ppo_dirs):
    short, long = (ppo_waits(ppo_dirs, 2, "plain", max_new_tokens=n) for n in (4, 12))
    assert long["rollout"] - short["rollout"] <= long["new_tokens"] - short["new_tokens"] + 2


def test_a_generation_moves_what_the_host_knows_without_waiting(monkeypatch):
    """Prompts, stop ids, limits, the rows of a prompt's copies and of each compaction are
    copied queued, and the cache is told its rows as lists: no blocking copy, and the engine
    reads once a token but the last, once a compaction and once at the end (the draws stay
    where they are made). Before: 33 blocking copies (24 of them the draws, moved twice a
    token to where they were) and a read, the cache's of the rows it was given as a tensor."""
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 64) for _ in range(n)] for n in (3, 7, 5)]
    # two copies of a prompt; one that fills the context (96) after 4 new tokens
    prompts += [prompts[0], prompts[0], [rng.randrange(1, 64) for _ in range(92)]]
    params = SamplingParams(max_new_tokens=12, stop_ids=tuple(range(1, 9)))
    selects, select = [], KVCache.select
    monkeypatch.setattr(KVCache, "select",
                        lambda cache, rows: selects.append(rows) or select(cache, rows))
    with count_waits(copies=True) as c:
        gen = generate(tiny(2), prompts, params, seed=1)
    # the copies' rows, then 2 compactions (the full row and a stopped one leaving, then more)
    assert selects == [[0, 1, 2, 0, 0, 3], [0, 1, 2, 3], [0, 3]]
    assert not any(site.startswith("copy") for site in c.sites), c
    # The padded batch passes the context (96) after 4 new tokens, while every row fits it:
    # the engine tells the model its longest row, which read the mask each token (7 waits).
    engine = sum(n for site, n in c.sites.items() if "gptlab/engine.py" in site)
    assert engine == max(map(len, gen.tokens)) - 1 + 2 + 1 and c.total == engine, c


def test_a_generation_reads_once_at_the_end():
    """The tokens, log-probabilities, lengths and stops come back in one read (there were 5:
    whether a log-probability was NaN, the lengths, the tokens, the log-probabilities and the
    stops), the log-probabilities the float32 values drawn, bit for bit. Without stop ids a
    generation of rows that fit reads nothing else; with them, once a token but the last."""
    prompts = [[3, 4, 5], [7, 8, 9]]
    model = tiny(2)
    for stop_ids, per_token in (((), 0), ((1, 60), 1)):  # no row draws 1 or 60
        params = SamplingParams(max_new_tokens=6, stop_ids=stop_ids)
        with count_waits(copies=True) as c:
            gen = generate(model, prompts, params, seed=5)
        steps = max(map(len, gen.tokens))
        assert steps == 6 and c.total == per_token * (steps - 1) + 1, c
    # The last generation's: each log-probability is log softmax of the logits of a forward of
    # its row (to float noise: the cache's sums differ), and a float32 value.
    with torch.no_grad():
        for p, toks, lps in zip(prompts, gen.tokens, gen.logprobs):
            logp = model(torch.tensor([p + toks]))[0, len(p) - 1:-1].float().log_softmax(-1)
            want = logp.gather(-1, torch.tensor(toks)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(lps), want, atol=1e-5)
            assert torch.tensor(lps, dtype=torch.float32).tolist() == lps



def test_a_generation_streamed_reads_once_more_a_token_and_only_then():
    """`on_tokens` (a chat's reply shown as it is written) costs one read a token, its tokens
    and which rows go on, all at once; without it a generation reads as it did."""
    prompts = [[3, 4, 5], [7, 8], [9]]
    params = SamplingParams(max_new_tokens=10, stop_ids=(1, 2, 3))
    with count_waits() as plain:
        gen = generate(tiny(2), prompts, params, seed=3)
    with count_waits() as streamed:
        assert generate(tiny(2), prompts, params, seed=3,
                        on_tokens=lambda rows, tokens: None) == gen
    steps = max(map(len, gen.tokens))
    assert streamed.total == plain.total + steps, (plain, streamed)

def test_a_generation_past_the_context_in_padding_is_what_reading_the_mask_gave(monkeypatch):
    """The longest row the engine counts on the host is the one the model read on the device:
    the same tokens and log-probabilities as where the model reads the mask, and a model told
    a row longer than its context refuses it as it did."""
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 64) for _ in range(n)] for n in (3, 90, 60, 3)]
    params = SamplingParams(max_new_tokens=12, stop_ids=(5, 6))
    told = generate(tiny(2), prompts, params, seed=2)
    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a, longest_row=None, **kw:
                        forward(self, *a, **kw))
    read = generate(tiny(2), prompts, params, seed=2)
    assert told == read and max(map(len, told.tokens)) > 6  # past the 96 of the context
    monkeypatch.undo()
    # A batch of 97 positions whose rows hold 95 and 96 real tokens: told, the model computes
    # what it computes reading the mask; told a row of 97, it refuses it.
    model = tiny(2)
    ids = torch.randint(1, 64, (2, 97), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = mask[1, :1] = 0
    with count_waits() as c:
        logits = model(ids, mask, longest_row=96)
    assert torch.equal(logits, model(ids, mask)) and c.total == 1  # is_right_padded's read
    with pytest.raises(ValueError, match="sequence of 97 tokens exceeds the context of 96"):
        model(ids, mask, longest_row=97)


def test_a_prefix_expanded_out_of_order_copies_its_rows_queued():
    model = tiny(2)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    prefix = PrefixKV()
    with torch.no_grad():
        model.hidden_states(ids, cache=prefix)
    with count_waits(copies=True) as c:
        listed = prefix.expand([1, 0, 1])
    assert c.total == 0
    told = prefix.expand(torch.tensor([1, 0, 1]))
    assert all(torch.equal(a, b) for a, b in zip(listed.k + listed.v, told.k + told.v))


def test_normalizing_a_reward_models_scores_copies_its_batches_queued():
    rm = ScalarHeadModel(tiny(2).config)
    seqs = [list(range(1, n)) for n in (4, 6, 9)]
    with count_waits(copies=True) as c:
        normalize_scores(rm, seqs, 0, batch_size=2)
    assert not any(site.startswith("copy") for site in c.sites), c


def test_held_out_accuracy_reads_each_batch_once():
    """pairs_right_by_ranking, which the pipeline's noise-free check and `reward`'s held-out
    accuracy run: one read a batch for its counts (two a ranking before), the same counts."""
    items = random_rankings(1, 6)
    rm = ScalarHeadModel(tiny(2).config)
    batches = [collate_rankings(items[i:i + 3], 0) for i in (0, 3)]
    with count_waits() as c:
        got = pairs_right_by_ranking(rm, batches)
    assert len(got) == 6 and all(n == 3 for _, n in got)
    assert all(r in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0) for r, _ in got)
    assert c.total <= len(batches), c  # one read a batch, of the counts
