"""Hand-computed cases for the shared training pieces that a mutation pass found unchecked:
each test here failed on a plausible bug (named in its docstring) that the rest of the suite
let through."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from gptlab.data.tokens import BlockBatches
from gptlab.model.gpt import GPT
from gptlab.model.presets import get_preset
from gptlab.train.loop import (TrainConfig, make_optimizer, rng_state, seed_everything,
                               set_rng_state, train)


def _draws() -> tuple:
    return (random.random(), float(np.random.random_sample()), float(torch.rand(())))


def test_adamw_two_updates_by_hand_with_the_betas_and_decay_given():
    """betas (0.5, 0.75) ignored for AdamW's defaults went unseen: every other check either
    made one update (whose bias-corrected size is lr whatever the betas) or compared two runs
    that both took the defaults."""
    model = nn.Linear(1, 1)  # a 1x1 weight matrix (decayed) and a bias (not decayed)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
    opt = make_optimizer(model, lr=0.1, weight_decay=0.5, betas=(0.5, 0.75))
    assert [g["betas"] for g in opt.param_groups] == [(0.5, 0.75)] * 2
    for g in (1.0, 3.0):
        model.weight.grad = torch.tensor([[g]])
        model.bias.grad = torch.tensor([g])
        opt.step()
    # Update 1: m^ = 1, v^ = 1, so the step is lr = 0.1; the weight first decays by
    # 1 - lr * wd = 0.95: w = 0.95 - 0.1 = 0.85, b = 1 - 0.1 = 0.9.
    # Update 2 (g = 3): m = 0.5 * 0.5 + 0.5 * 3 = 1.75, m^ = 1.75 / (1 - 0.25) = 7/3;
    # v = 0.75 * 0.25 + 0.25 * 9 = 2.4375, v^ = 2.4375 / (1 - 0.5625) = 39/7;
    # step = 0.1 * (7/3) / sqrt(39/7) = 0.0988538.
    step2 = 0.1 * (7 / 3) / math.sqrt(39 / 7)
    assert step2 == pytest.approx(0.0988538, abs=1e-7)
    assert float(model.weight.detach()) == pytest.approx(0.85 * 0.95 - step2, abs=1e-6)  # 0.7086462
    assert float(model.bias.detach()) == pytest.approx(0.9 - step2, abs=1e-6)            # 0.8011462


def test_the_loop_builds_adamw_from_the_configs_betas_and_weight_decay(tmp_path):
    """The loop must hand cfg.beta1, cfg.beta2 and cfg.weight_decay to the optimizer: the
    saved optimizer state is what a resume continues with."""
    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    tokens = np.random.default_rng(0).integers(0, 64, 200).astype(np.uint16)
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, max_steps=1, beta1=0.5, beta2=0.75,
                      weight_decay=0.05, eval_every=0, save_every=0, progress=False,
                      device="cpu")
    train(model, BlockBatches(tokens, 16, np.arange(10), 2, 0), lambda m, b: m(
        b[:, :-1], labels=b[:, 1:]), cfg, tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "step-1" / "optimizer.pt",
                       weights_only=False)
    groups = saved["param_groups"]
    assert [g["betas"] for g in groups] == [(0.5, 0.75)] * 2
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [g["lr"] for g in groups] == [pytest.approx(0.5e-3)] * 2  # warmup: lr * 1 / 2


def test_set_rng_state_restores_the_python_numpy_and_torch_streams():
    """A checkpoint's RNG state not put back for Python's `random` or NumPy's global stream went
    unseen: the loop's own draws are torch's, but a stage's loss or data may draw from the
    others, and a resume must continue them exactly."""
    seed_everything(5)
    state = rng_state()
    first = [_draws() for _ in range(3)]
    seed_everything(6)  # move every stream elsewhere
    set_rng_state(state)
    assert [_draws() for _ in range(3)] == first


def test_seed_everything_seeds_the_python_numpy_and_torch_streams():
    """seed_everything without NumPy's (or Python's) global stream went unseen: a run's draws
    from it would differ from one run to the next."""
    seed_everything(11)
    a = [_draws() for _ in range(3)]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    seed_everything(11)
    assert [_draws() for _ in range(3)] == a
    # And seed 11 is not seed 12, stream by stream.
    seed_everything(12)
    b = _draws()
    assert all(x != y for x, y in zip(a[0], b))


def _tiny_run(tmp_path, monkeypatch=None, **settings):
    """A tiny GPT trained by the loop on random tokens; the metrics rows."""
    from gptlab.data.tokens import fixed_batches
    from gptlab.train.loop import read_metrics

    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    tokens = np.random.default_rng(0).integers(0, 64, 600).astype(np.uint16)
    cfg = TrainConfig(**{"lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 4, "eval_every": 0,
                         "save_every": 0, "log_every": 1, "progress": False, "device": "cpu",
                         **settings})
    result = train(model, BlockBatches(tokens, 16, np.arange(20), 2, 0),
                   lambda m, b: m(b[:, :-1], labels=b[:, 1:]), cfg, tmp_path,
                   val_batches=fixed_batches(tokens, 16, np.arange(20, 30), 2, 1))
    return result, read_metrics(tmp_path / "metrics.jsonl")


def test_eval_batches_zero_is_no_validation(tmp_path):
    """eval_batches 0 means no validation (its --help says so); `>= 0` in its place, which
    evaluated anyway, went unseen."""
    result, rows = _tiny_run(tmp_path, max_steps=2, eval_batches=0)
    assert result.val_loss is None
    assert [r["step"] for r in rows] == [1, 2] and not any("val_loss" in r for r in rows)


def test_a_time_budget_lays_the_cosine_over_the_step_count_it_resolves_to(tmp_path,
                                                                          monkeypatch):
    """Once --max-minutes is turned into a step count, the schedule ends at it: the last
    update's lr is lr * min_ratio. The schedule kept on its stand-in length (10**9 steps)
    went unseen: the run ended near the peak lr."""
    import time
    import types

    from gptlab.train.loop import lr_at

    clock = iter(range(10**6))  # each reading 0.5 s after the last: a step takes 0.5 s
    monkeypatch.setattr("gptlab.train.loop.time", types.SimpleNamespace(
        perf_counter=lambda: next(clock) * 0.5, strftime=time.strftime))
    # 6 s: 4 steps (1 + 3 timed) take 2 s, the 4 s left hold 8 more: 12 steps.
    result, rows = _tiny_run(tmp_path, max_minutes=0.1, eval_batches=0)
    assert result.step == result.total_steps == 12
    lrs = [r["lr"] for r in rows if "loss" in r]
    # Steps 0-3 are the warmup (measured while the length is still unknown), 4-11 the cosine.
    assert lrs == [pytest.approx(lr_at(s, 4, 12, 1e-3, 0.1), abs=1e-12) for s in range(12)]
    assert lrs[3] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
