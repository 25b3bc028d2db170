"""The shared training pieces: schedule, optimizer groups, accumulation, clipping, sampler, and
the common loop (overfitting, exact resume after an interrupt, time budget)."""
from __future__ import annotations

import copy
import errno
import json
import dataclasses
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.checkpoint import Checkpointer
from gptlab.data.tokens import BlockBatches, EpochSampler, fixed_batches
from gptlab.errors import UserError
from gptlab.model.gpt import GPT
from gptlab.model.presets import get_preset
from gptlab.train.loop import (MetricsLog, TrainConfig, accumulate_gradients, check_run_dir,
                               clip_gradients, lr_at, make_optimizer, read_metrics,
                               rng_state, select_device, set_rng_state, steps_for_budget,
                               train)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two pytest workers on two cores: one thread each avoids oversubscription.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lm_loss(model, block):
    return model(block[:, :-1], labels=block[:, 1:])


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_preset("tiny", **overrides))


# --- schedule and optimizer ---------------------------------------------------------------------

def test_lr_warmup_then_cosine_to_min():
    peak, lo = 1.0, 0.1
    assert lr_at(0, 10, 110, peak, lo) == pytest.approx(0.1)
    assert lr_at(4, 10, 110, peak, lo) == pytest.approx(0.5)
    assert lr_at(9, 10, 110, peak, lo) == pytest.approx(1.0)
    assert lr_at(10, 10, 110, peak, lo) == pytest.approx(1.0)    # cosine starts at the peak
    assert lr_at(109, 10, 110, peak, lo) == pytest.approx(0.1)   # the last update is at the floor
    assert lr_at(500, 10, 110, peak, lo) == pytest.approx(0.1)   # and stays there
    # Halfway through the cosine: min + (peak - min) / 2.
    assert lr_at(50, 0, 101, 2.0, 0.0) == pytest.approx(1.0)
    assert lr_at(25, 0, 101, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    vals = [lr_at(s, 10, 110, peak, lo) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_adamw_groups_decay_matrices_only():
    model = tiny()
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    kept = sorted(names[id(p)] for p in no_decay["params"])
    # 2 layers x (q, k, v, o, gate, up, down); the tied head is the embedding: no decay.
    assert len(decayed) == 14 and all(n.startswith("blocks.") for n in decayed)
    assert kept == sorted(["tok_emb.weight", "final_norm.weight"]
                          + [f"blocks.{i}.{k}.weight" for i in range(2)
                             for k in ("attn_norm", "mlp_norm")])
    # Every trainable tensor is in exactly one group (the tied head is not counted twice).
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_adamw_groups_with_biases_and_learned_positions():
    model = tiny(positions="learned", norm="layernorm", bias=True, activation="gelu",
                 tie_embeddings=False)
    decay, no_decay = make_optimizer(model, 1e-3, 0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "pos_emb.weight" in kept and "tok_emb.weight" in kept
    assert all(n.endswith(".bias") or "norm" in n or "emb" in n for n in kept)
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}


def test_grad_accumulation_equals_the_big_batch():
    torch.manual_seed(1)
    data = torch.randint(0, 512, (8, 17))
    a = tiny(3).double()
    b = copy.deepcopy(a)
    opt_a, opt_b = make_optimizer(a, 1e-2, 0.1), make_optimizer(b, 1e-2, 0.1)
    loss_a = accumulate_gradients(a, [data], lm_loss)                     # one batch of 8
    loss_b = accumulate_gradients(b, [data[:4], data[4:]], lm_loss)       # 2 x 4, accumulated
    assert loss_a == pytest.approx(loss_b, abs=1e-12)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=1e-13)
    opt_a.step()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-12)


def test_clip_returns_the_norm_before_clipping():
    model = tiny()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    n = sum(p.numel() for p in model.parameters())
    norm = clip_gradients(model, 1.0)
    assert norm == pytest.approx(0.5 * math.sqrt(n), rel=1e-5)
    after = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert float(after) == pytest.approx(1.0, rel=1e-4)
    assert clip_gradients(model, 0) == pytest.approx(1.0, rel=1e-4)  # 0: measure only


def test_steps_for_budget():
    # 2 minutes, 10 s spent, 4 steps done at 0.5 s a step, no evaluation: 4 + 110 / 0.5.
    assert steps_for_budget(2, 10.0, 4, 0.5) == 224
    # An evaluation of 5 s every 10 steps adds 0.5 s to each step.
    assert steps_for_budget(2, 10.0, 4, 0.5, eval_every=10, eval_s=5.0) == 114
    assert steps_for_budget(2, 10.0, 4, 0.5, cap=50) == 50
    assert steps_for_budget(0.01, 60.0, 4, 0.5) == 4   # over budget already: stop now


def test_config_and_device_errors_name_the_field():
    with pytest.raises(UserError, match="grad_accum"):
        TrainConfig(grad_accum=0).check()
    with pytest.raises(UserError, match="device"):
        select_device("tpu")
    assert select_device("cpu").type == "cpu"


def test_a_gpu_the_machine_lacks_is_a_user_error(monkeypatch):
    """`--device cuda:1` on a one-GPU machine: a UserError naming the field, before anything
    is written (torch itself fails only at the first tensor moved there, with "CUDA error:
    invalid device ordinal")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("cuda:0") == torch.device("cuda:0")
    assert select_device("cuda") == torch.device("cuda")
    with pytest.raises(UserError, match=r"field 'device': there is no GPU 1 here: this "
                                        r"machine has 1 \(cuda:0\)"):
        select_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"has 2 \(cuda:0 to cuda:1\)"):
        TrainConfig(device="cuda:2").check()


def test_auto_picks_cuda_where_there_is_one_and_never_mps(monkeypatch):
    """`auto`: CUDA where torch sees a GPU, else the CPU, also on a Mac whose MPS is available
    (no part of gptlab has run on MPS; its kernels lack the float64 sampling uses); `mps`
    named is taken where it exists."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    assert select_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="MPS was asked for but is not available"):
        select_device("mps")


def test_a_checkpoint_from_a_machine_with_more_gpus_restores_the_rng_of_those_here(
        monkeypatch):
    """A run saved on a node of 8 GPUs holds 8 CUDA RNG states; torch sets state i on GPU i,
    and on a machine with one GPU GPU 1 does not exist (torch.cuda.default_generators[1]:
    IndexError). The states of the GPUs present are restored."""
    restored = []

    def set_rng_state_all(states):
        states = list(states)
        if len(states) > torch.cuda.device_count():
            raise IndexError("tuple index out of range")  # as torch.cuda.set_rng_state does
        restored.extend(states)

    state = rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], state["cuda"][0])


@pytest.mark.parametrize("values,message", [
    ({"beta1": 2.0}, "field 'beta1': must be in [0, 1), got 2.0"),
    ({"beta2": -1.0}, "field 'beta2': must be in [0, 1), got -1.0"),
    ({"lr": math.inf}, "field 'lr': must be a finite number, got inf"),
    ({"weight_decay": math.nan}, "field 'weight_decay': must be a finite number, got nan"),
    ({"weight_decay": -0.1}, "field 'weight_decay': must be >= 0, got -0.1"),
    ({"max_minutes": math.inf}, "field 'max_minutes': must be a finite number, got inf"),
    ({"clip": -1.0}, "field 'clip': must be >= 0, got -1.0"),
    ({"device": "nope"}, "field 'device': unknown device 'nope'"),
    # Device types torch names but gptlab never runs on: a traceback later, after run.json.
    ({"device": "xpu"}, "field 'device': unknown device 'xpu' (auto, cpu, cuda, cuda:N, mps)"),
    ({"device": "meta"}, "field 'device': unknown device 'meta'"),
])
def test_impossible_training_settings_name_the_field(values, message):
    with pytest.raises(UserError) as err:
        TrainConfig(**values).check()
    assert str(err.value).startswith(message)


def _stage_config(name):
    from gptlab.train.pipeline import PipelineConfig
    from gptlab.train.ppo import PPOConfig
    from gptlab.train.pretrain import PretrainConfig
    from gptlab.train.reward import RewardConfig
    from gptlab.train.sft import SFTConfig
    return {"pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig,
            "ppo": PPOConfig, "pipeline": PipelineConfig}[name]


@pytest.mark.parametrize("stage,values,message", [
    # A str where a list is meant was read letter by letter ("c, field 'data': not found").
    ("pretrain", {"data": "corpus.txt"}, "field 'data': must be a list, got the single str "
                                         "'corpus.txt'; pass a list: ['corpus.txt']"),
    ("ppo", {"ptx_data": "corpus.txt"}, "field 'ptx_data': must be a list, got the single str "
                                        "'corpus.txt'; pass a list: ['corpus.txt']"),
    ("pretrain", {"data": ["a.txt", 3]}, "field 'data': item 1 must be a str, got the int 3"),
    # Wrong scalars were a bare TypeError from a rule's comparison, naming no field.
    ("pretrain", {"max_steps": "2"}, "field 'max_steps': must be an int or None, got the str "
                                     "'2'"),
    ("sft", {"lr": "1e-3"}, "field 'lr': must be a number, got the str '1e-3'"),
    ("reward", {"epochs": None}, "field 'epochs': must be a number, got None"),
    ("ppo", {"steps": 2.5}, "field 'steps': must be an int, got the float 2.5"),
    ("ppo", {"adaptive_kl": "yes"}, "field 'adaptive_kl': must be true or false, got the str "
                                    "'yes'"),
    ("sft", {"batch_size": True}, "field 'batch_size': must be an int, got the bool True"),
    ("pipeline", {"rounds": "2"}, "field 'rounds': must be an int, got the str '2'"),
    ("pipeline", {"preset": 5}, "field 'preset': must be a str, got the int 5"),
])
def test_a_value_of_the_wrong_type_names_the_field_and_the_type(stage, values, message):
    with pytest.raises(UserError) as err:
        _stage_config(stage)(**values).check()
    assert str(err.value) == message


def test_an_int_is_a_float_and_a_path_is_a_str(tmp_path):
    _stage_config("sft")(lr=1, epochs=2, out=tmp_path).check()
    _stage_config("pretrain")(data=(tmp_path / "a.txt",), max_steps=np.int64(2)).check()
    _stage_config("ppo")(adaptive_kl=np.bool_(True)).check()  # numpy's bool is a bool


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("out,model,message", [
    ("m", "m", "field 'out': is the input model (model, --model); training would overwrite "
               "it; choose another out (--out)"),
    ("m/run", "m", "field 'out': is inside the input model {model} (model, --model); choose "
                   "another out (--out)"),
    (".", "m", "field 'out': holds the input model {model} (model, --model); choose another "
               "out (--out)"),
])
def test_a_run_directory_may_not_overlap_an_input_model(tmp_path, out, model, message):
    model = _model_dir(tmp_path / model)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError) as err:
        check_run_dir(tmp_path / out, False, {"model": str(model), "value": None})
    assert str(err.value) == f"{tmp_path / out}, " + message.format(model=model)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_run_directory_in_the_place_of_a_file_is_refused(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for out, message in ((a_file, "is a file, not a directory"),
                         (a_file / "run", f"parent is a file: {a_file} is not a directory")):
        with pytest.raises(UserError) as err:
            check_run_dir(out, False)
        assert str(err.value) == f"{out}, field 'out': {message}"
    assert a_file.read_text() == "x"


def test_a_run_directory_with_a_run_or_a_model_needs_resume(tmp_path):
    out = tmp_path / "run"
    assert check_run_dir(out, False) is None and not out.exists()
    with pytest.raises(UserError, match="field 'resume': nothing to resume"):
        check_run_dir(out, True)
    _model_dir(out)
    # A save killed between the weights and config.json (written last) finished nothing.
    config = (out / "config.json").read_bytes()
    (out / "config.json").unlink()
    (out / "model.safetensors").write_bytes(b"weights")
    assert check_run_dir(out, False) is None
    (out / "config.json").write_bytes(config)
    with pytest.raises(UserError) as err:
        check_run_dir(out, False)
    assert str(err.value) == (f"{out}, field 'out': already holds a finished model and no "
                              "checkpoint to continue from; choose another out (--out); a run "
                              "saved with save_every (--save-every) continues with resume "
                              "(--resume)")
    net = tiny()  # a stage's checkpoint holds its optimizer's state, which a resume requires
    path = Checkpointer(out).save(1, net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(UserError, match="already holds a training run; pass resume"):
        check_run_dir(out, False)
    assert check_run_dir(out, True) == path


# --- sampler ------------------------------------------------------------------------------------

def test_epoch_sampler_permutes_each_epoch_and_resumes():
    s = EpochSampler(10, 4, seed=7)
    drawn = np.concatenate([s.next_indices() for _ in range(5)])  # 20 = two epochs exactly
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert list(drawn[:10]) != list(drawn[10:])        # a fresh order each epoch
    assert s.state() == {"epoch": 2, "index": 0}
    a = EpochSampler(10, 4, seed=7)
    for _ in range(3):
        a.next_indices()
    b = EpochSampler(10, 4, seed=7)
    b.load_state(a.state())
    assert [list(a.next_indices()) for _ in range(4)] == [list(b.next_indices()) for _ in range(4)]


# --- the common loop ----------------------------------------------------------------------------

def _stream(seed: int = 0, n: int = 600, vocab: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


def test_tiny_gpt_overfits_a_short_text(tmp_path):
    tokens = _stream(n=129)                       # 4 blocks of 32 (+1) random tokens to memorize
    ids = np.arange(4)
    batches = BlockBatches(tokens, 32, ids, batch_size=4, seed=0)
    cfg = TrainConfig(lr=1e-2, warmup_steps=10, max_steps=80, min_lr_ratio=0.1,
                      weight_decay=0.0, eval_every=40, eval_batches=1, save_every=0,
                      log_every=10, progress=False, device="cpu")
    model = tiny()
    result = train(model, batches, lm_loss, cfg, tmp_path,
                   val_batches=fixed_batches(tokens, 32, ids, 4, 1))
    assert result.step == 80
    assert result.loss < 0.1 and result.val_loss < 0.1
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in rows] == [0, 40, 80]
    assert rows[0]["val_loss"] > 6.0 > 0.1 > rows[-1]["val_loss"]   # from ~log(512) to near 0


class _Interrupting:
    """A batch stream that raises KeyboardInterrupt (as Ctrl-C would) before batch `at`."""

    def __init__(self, inner: BlockBatches, at: int):
        self.inner, self.at, self.n = inner, at, 0

    def __next__(self):
        if self.n == self.at:
            raise KeyboardInterrupt
        self.n += 1
        return next(self.inner)

    def state(self):
        return self.inner.state()

    def load_state(self, state):
        self.inner.load_state(state)


def _curve(path):
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("val_loss"))
            for r in read_metrics(path) if "event" not in r]


def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path):
    tokens = _stream(1, n=2000)
    ids = np.arange(60)
    cfg = TrainConfig(lr=3e-3, warmup_steps=4, max_steps=16, grad_accum=2, batch_size=4,
                      eval_every=4, eval_batches=2, save_every=100, log_every=1,
                      progress=False, device="cpu", seed=3)
    val = fixed_batches(tokens, 16, np.arange(60, 70), 4, 2)
    make = lambda: tiny(5, dropout=0.1)  # dropout: the torch RNG must be restored too  # noqa: E731

    full = make()
    train(full, BlockBatches(tokens, 16, ids, 4, seed=3), lm_loss, cfg, tmp_path / "a",
          val_batches=val)

    first = make()
    with pytest.raises(KeyboardInterrupt):   # Ctrl-C during step 8's batches
        train(first, _Interrupting(BlockBatches(tokens, 16, ids, 4, seed=3), at=15), lm_loss,
              cfg, tmp_path / "b", val_batches=val)
    assert Checkpointer(tmp_path / "b").latest().name == "step-7"
    # Different initial weights: all come from the checkpoint.
    second = tiny(99, dropout=0.1)
    result = train(second, BlockBatches(tokens, 16, ids, 4, seed=3), lm_loss, cfg,
                   tmp_path / "b", val_batches=val, resume=True)
    assert result.step == 16
    assert _curve(tmp_path / "a" / "metrics.jsonl") == _curve(tmp_path / "b" / "metrics.jsonl")
    # Tokens count every micro-batch of every step of the whole run: 2 x 4 blocks of 17.
    assert result.tokens == 16 * 2 * 4 * 17
    for run in "ab":
        rows = [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]
        assert [r["tokens"] for r in rows] == [136 * step for step in range(1, 17)]
    for pa, pb in zip(full.parameters(), second.parameters()):
        assert torch.equal(pa, pb)


def test_a_resume_from_a_named_step_moves_latest_there_as_a_hand_edit_would(tmp_path):
    """Resumed from step-4 of a finished 8-step run, a Ctrl-C before any save: `latest` names
    step-4, as if moved back by hand, so --resume goes on on that line, not from step-8; the
    run then ends as the uninterrupted one, rows and weights."""
    tokens = _stream(2, n=2000)
    ids = np.arange(60)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=8, batch_size=4, eval_every=2,
                      eval_batches=1, save_every=2, keep_checkpoints=2, log_every=1,
                      progress=False, device="cpu", seed=4)
    val = fixed_batches(tokens, 16, np.arange(60, 70), 4, 1)
    batches = lambda: BlockBatches(tokens, 16, ids, 4, seed=4)  # noqa: E731
    full = tiny(5, dropout=0.1)
    train(full, batches(), lm_loss, cfg, tmp_path / "a", val_batches=val)
    b = tmp_path / "b"
    train(tiny(5, dropout=0.1), batches(), lm_loss,
          dataclasses.replace(cfg, keep_checkpoints=10), b, val_batches=val)
    ckpts = b / "checkpoints"
    step4 = check_run_dir(b, False, cfg=cfg, resume_from="step-4")
    assert step4 == ckpts / "step-4"
    with pytest.raises(KeyboardInterrupt):  # during step 5's batch
        train(tiny(99, dropout=0.1), _Interrupting(batches(), at=0), lm_loss, cfg, b,
              val_batches=val, resume=True, verified=step4, resume_from=step4)
    assert Checkpointer(b).latest() == step4
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-2", "step-4", "step-6",
                                                       "step-8"]
    resumed = tiny(99, dropout=0.1)
    assert train(resumed, batches(), lm_loss, cfg, b, val_batches=val, resume=True).step == 8
    assert _curve(tmp_path / "a" / "metrics.jsonl") == _curve(b / "metrics.jsonl")
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    # Steps 6 and 8 were saved again in place, and keep_checkpoints 2 kept the last two.
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-6", "step-8"]


class _Crash(Exception):
    pass


def test_a_last_save_killed_once_latest_names_it_is_tidied_by_the_resume(tmp_path, monkeypatch):
    """Killed between the rename of the pointer to the last checkpoint and the removal of the
    pointer's temporary (before the save removed the checkpoints past keep_checkpoints), a
    run's resume trains no step and saves nothing: it left `.latest.<random>.tmp` and step-2
    beside step-4 for good. The resume removes both, and ends as the run that never stopped."""
    import shutil
    tokens = _stream(7, n=1000)
    cfg = TrainConfig(lr=3e-3, warmup_steps=1, max_steps=4, eval_every=2, eval_batches=1,
                      save_every=2, keep_checkpoints=1, log_every=1, progress=False,
                      device="cpu", seed=2)
    val = fixed_batches(tokens, 16, np.arange(50, 60), 4, 1)
    run = lambda out, **kw: train(  # noqa: E731
        tiny(), BlockBatches(tokens, 16, np.arange(50), 4, 2), lm_loss, cfg, out,
        val_batches=val, **kw)
    full = run(tmp_path / "a")
    b = tmp_path / "b"
    ckpts = b / "checkpoints"
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # as a SIGKILL there: nothing after it runs
        if Path(path).name.startswith(".latest.") and (ckpts / "step-4").exists():
            raise _Crash
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(_Crash):
        run(b)
    monkeypatch.undo()
    assert (ckpts / "latest").read_text() == "step-4\n"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".latest.")) == [
        "latest", "step-2", "step-4"]
    resumed = run(b, resume=True)
    assert resumed.step == full.step == 4
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-4"]
    assert _curve(tmp_path / "a" / "metrics.jsonl") == _curve(b / "metrics.jsonl")
    for name in ("model.safetensors", "optimizer.pt"):
        assert ((ckpts / "step-4" / name).read_bytes()
                == (tmp_path / "a" / "checkpoints" / "step-4" / name).read_bytes())


class _Crashing(_Interrupting):
    """A batch stream whose process dies (nothing saved) before batch `at`."""

    def __next__(self):
        if self.n == self.at:
            raise _Crash
        return super().__next__()


def test_a_resume_from_a_step_of_an_earlier_line_restores_that_lines_metrics_rows(tmp_path):
    """An 8-step run (line A) resumed from step-2 with --max-steps 12 (line B: another schedule,
    other rows) dies in step 6, after logging steps 3 to 5; resumed then from step-6, A's. Rows
    up to step 6 were kept as A's: B's 3 to 5 stayed and A's 3 to 6, dropped when B began, were
    gone. Now the rows are A's throughout: the run ends as the one that never forked."""
    tokens = _stream(2, n=2000)
    ids = np.arange(60)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=8, batch_size=4, eval_every=2,
                      eval_batches=1, save_every=2, keep_checkpoints=10, log_every=1,
                      progress=False, device="cpu", seed=4)
    val = fixed_batches(tokens, 16, np.arange(60, 70), 4, 1)
    batches = lambda: BlockBatches(tokens, 16, ids, 4, seed=4)  # noqa: E731
    train(tiny(5), batches(), lm_loss, cfg, tmp_path / "a", val_batches=val)
    b = tmp_path / "b"
    train(tiny(5), batches(), lm_loss, cfg, b, val_batches=val)
    longer = dataclasses.replace(cfg, max_steps=12)
    step2 = check_run_dir(b, False, cfg=longer, resume_from="step-2")
    with pytest.raises(_Crash):  # in step 6: B logged 3, 4 (and its evaluation), 5; saved 4
        train(tiny(99), _Crashing(batches(), at=3), lm_loss, longer, b, val_batches=val,
              resume=True, verified=step2, resume_from=step2)
    forked = _curve(b / "metrics.jsonl")
    assert [r[0] for r in forked] == [0, 1, 2, 2, 3, 4, 4, 5]
    assert forked[5][2] != _curve(tmp_path / "a" / "metrics.jsonl")[5][2]  # B's own lr at 4
    step6 = check_run_dir(b, False, cfg=cfg, resume_from="step-6")
    train(tiny(99), batches(), lm_loss, cfg, b, val_batches=val, resume=True, verified=step6,
          resume_from=step6)
    assert _curve(b / "metrics.jsonl") == _curve(tmp_path / "a" / "metrics.jsonl")
    # Each checkpoint keeps its own line's rows: B's step 4, A's step 6.
    assert [r["step"] for r in MetricsLog.line_rows(b / "metrics.jsonl", Checkpointer.state_of(
        b / "checkpoints" / "step-4")) if "loss" in r] == [1, 2, 3, 4]


def test_a_resume_from_names_its_checkpoint_or_is_refused_listing_those_there(tmp_path):
    cfg = TrainConfig(max_steps=4, save_every=2, keep_checkpoints=5, progress=False,
                      device="cpu")
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(UserError, match="nothing to resume") as err:
        check_run_dir(tmp_path, False, cfg=cfg, resume_from="2")
    assert err.value.field == "resume_from"
    train(tiny(), BlockBatches(_stream(), 16, np.arange(10), 2, 0), lm_loss, cfg, tmp_path)
    assert check_run_dir(tmp_path, False, cfg=cfg, resume_from=" step-02 ") == ckpts / "step-2"
    assert check_run_dir(tmp_path, False, cfg=cfg, resume_from="step-4/") == ckpts / "step-4"
    other = tmp_path / "other" / "checkpoints" / "step-2"
    for name, path, said in (
            ("3", ckpts / "step-3", "no such checkpoint"),
            ("step-x", Path("step-x"), "is not a checkpoint of this run: give a step"),
            (str(other), other, "is not a checkpoint of this run: give a step")):
        with pytest.raises(UserError) as err:
            check_run_dir(tmp_path, True, cfg=cfg, resume_from=name)
        assert err.value.path == path and err.value.field == "resume_from"
        assert err.value.message == f"{said}" + (
            f" (step-N or N) of {ckpts}" if "give" in said else "") + \
            f"; the checkpoints in {ckpts}: step-2, step-4"
    (ckpts / "step-2" / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="is damaged .*; it cannot be resumed from; the "
                                        "checkpoints in .*: step-2, step-4") as err:
        check_run_dir(tmp_path, True, cfg=cfg, resume_from="2")
    assert err.value.path == ckpts / "step-2" / "manifest.json"


def test_ctrl_c_between_an_update_and_its_bookkeeping_saves_nothing(tmp_path):
    calls = []

    def tokens_in(batch):  # counted after step 3's update, before the loop records step 3
        calls.append(batch)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return batch.numel()

    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=6, eval_every=0, save_every=0,
                      progress=False, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), BlockBatches(_stream(4, n=1000), 16, np.arange(50), 4, 0), lm_loss, cfg,
              tmp_path, tokens_in=tokens_in)
    # The weights and optimizer are step 3's, the data position and RNG still step 2's: saved
    # together as step 2, a resumed run would train on step 3's batch twice.
    assert Checkpointer(tmp_path).latest() is None


def test_a_real_ctrl_c_during_an_update_waits_for_it_then_saves_it(tmp_path):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    calls = []

    def tokens_in(batch):  # the same moment as above, now a real Ctrl-C (SIGINT)
        calls.append(batch)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return batch.numel()

    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=6, eval_every=0, save_every=0,
                      progress=False, device="cpu")
    batches = lambda: BlockBatches(_stream(4, n=1000), 16, np.arange(50), 4, 0)  # noqa: E731
    full = tiny()
    train(full, batches(), lm_loss, cfg, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), batches(), lm_loss, cfg, tmp_path / "b", tokens_in=tokens_in)
    assert Checkpointer(tmp_path / "b").latest().name == "step-3"  # the update it waited for
    resumed = tiny(99)
    assert train(resumed, batches(), lm_loss, cfg, tmp_path / "b", resume=True).step == 6
    for pa, pb in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_max_minutes_becomes_a_recorded_step_count(tmp_path):
    tokens = _stream(2, n=1000)
    cfg = TrainConfig(max_minutes=0.02, max_steps=40, warmup_steps=5, eval_every=0,
                      eval_batches=1, save_every=0, progress=False, device="cpu")
    result = train(tiny(), BlockBatches(tokens, 16, np.arange(50), 4, 0), lm_loss, cfg, tmp_path,
                   val_batches=fixed_batches(tokens, 16, np.arange(50, 60), 4, 1))
    budget = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "budget"]
    assert len(budget) == 1 and budget[0]["step"] == 4      # resolved after 1 + 3 timed steps
    assert 4 <= budget[0]["total_steps"] <= 40              # capped by max_steps
    assert result.step == result.total_steps == budget[0]["total_steps"]
    state = torch.load(Checkpointer(tmp_path).latest() / "trainer.pt", weights_only=False)
    assert state["total_steps"] == result.total_steps and not state["budget_pending"]


def test_the_step_budget_is_recorded_in_run_json(tmp_path):
    # README: run.json holds, with --max-minutes, the step budget (beside the config, versions,
    # git commit and command line record_run writes).
    import json

    from gptlab.provenance import record_run
    tokens = _stream(2, n=1000)
    cfg = TrainConfig(max_minutes=0.02, max_steps=12, warmup_steps=2, eval_every=0,
                      eval_batches=1, save_every=0, progress=False, device="cpu")
    record_run(tmp_path, cfg)
    train(tiny(), BlockBatches(tokens, 16, np.arange(50), 4, 0), lm_loss, cfg, tmp_path)
    info = json.loads((tmp_path / "run.json").read_text())
    row = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "budget"][0]
    assert info["budget"] == {k: row[k] for k in ("max_minutes", "sec_per_step", "eval_s",
                                                  "total_steps")}
    assert info["config"]["max_minutes"] == 0.02 and info["config"]["max_steps"] == 12
    assert {"command", "versions", "git_commit", "host", "started"} <= set(info)


def test_a_resume_is_recorded_in_run_json_with_the_config_it_changed(tmp_path, monkeypatch):
    # run.json kept the first session's config and command only: a resume with another lr
    # or max_steps left it saying what no longer ran.
    import json
    import sys

    from gptlab.provenance import record_run
    from gptlab.train.loop import annotate_resume
    monkeypatch.setattr(sys, "argv", ["gptlab", "pretrain", "--max-steps", "10"])
    record_run(tmp_path, TrainConfig(max_steps=10, lr=1e-3))
    monkeypatch.setattr(sys, "argv", ["gptlab", "pretrain", "--max-steps", "20", "--resume"])
    annotate_resume(tmp_path, TrainConfig(max_steps=20, lr=1e-3), "step-10")
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["config"]["max_steps"] == 10 and info["command"][-1] == "10"
    assert info["resumed_from"] == "step-10"
    [resume] = info["resumes"]
    assert resume["from"] == "step-10" and resume["changed"] == {"max_steps": 20}
    assert resume["command"] == ["gptlab", "pretrain", "--max-steps", "20", "--resume"]
    assert {"started", "git_commit", "git_dirty"} <= set(resume)
    annotate_resume(tmp_path, TrainConfig(max_steps=10, lr=2e-3), "step-20")
    info = json.loads((tmp_path / "run.json").read_text())
    assert [r["changed"] for r in info["resumes"]] == [{"max_steps": 20}, {"lr": 2e-3}]


def test_run_json_holds_a_non_finite_number_as_strict_json_and_keeps_it_when_annotated(tmp_path):
    # A dict config (the pipeline's records, a script's) with NaN made run.json no JSON.
    from gptlab.provenance import load_run, record_run
    from gptlab.train.loop import annotate_run
    from test_io import strict_loads
    record_run(tmp_path, {"lr": 1e-3, "clip": math.inf})
    annotate_run(tmp_path, budget=math.nan, steps=4)
    info = strict_loads((tmp_path / "run.json").read_text())
    assert info["config"] == {"lr": 1e-3, "clip": None} and info["budget"] is None
    assert info["non_finite"] == {"/config/clip": "Infinity", "/budget": "NaN"}
    run = load_run(tmp_path)
    assert run["config"]["clip"] == math.inf and math.isnan(run["budget"]) and run["steps"] == 4


def test_resume_without_a_checkpoint_is_a_user_error(tmp_path):
    """Named as check_run_dir names it: the checkpoints directory and the field `resume`."""
    with pytest.raises(UserError, match="nothing to resume") as err:
        train(tiny(), BlockBatches(_stream(), 16, np.arange(10), 2, 0), lm_loss,
              TrainConfig(max_steps=2, progress=False, device="cpu"), tmp_path, resume=True)
    assert err.value.field == "resume" and err.value.path == tmp_path / "checkpoints"


def test_a_resume_hashes_its_checkpoint_once_and_still_refuses_a_corrupted_one(tmp_path,
                                                                                monkeypatch):
    """check_run_dir verifies the checkpoint before the stage writes anything; the loop given
    it as `verified` does not hash its files again. Called alone, the loop verifies."""
    cfg = TrainConfig(max_steps=2, save_every=1, progress=False, device="cpu")
    run = lambda **kw: train(tiny(), BlockBatches(_stream(), 16, np.arange(10), 2, 0),  # noqa: E731
                             lm_loss, cfg, tmp_path, **kw)
    run()
    calls = []
    verify = Checkpointer.verify.__func__
    monkeypatch.setattr(Checkpointer, "verify",
                        classmethod(lambda cls, path: (calls.append(path), verify(cls, path))))
    latest = check_run_dir(tmp_path, True, cfg=cfg)
    cfg.max_steps = 3
    assert run(resume=True, verified=latest).step == 3
    assert calls == [latest]
    calls.clear()
    cfg.max_steps = 4
    assert run(resume=True).step == 4  # not verified before: the loop does it
    assert len(calls) == 1
    state = Checkpointer(tmp_path).latest() / "trainer.pt"
    state.write_bytes(state.read_bytes()[:-1])  # truncated
    for resume in (lambda: check_run_dir(tmp_path, True, cfg=cfg), lambda: run(resume=True)):
        with pytest.raises(UserError, match="checkpoint file is missing or corrupt") as err:
            resume()
        assert err.value.path == state


def test_metrics_rewind_without_the_checkpoints_rows_keeps_those_up_to_its_step(tmp_path):
    # A checkpoint saved before checkpoints kept their rows: those up to its step are its line's.
    log = MetricsLog(tmp_path / "m.jsonl")
    for s in (0, 5, 10, 15):
        log.log({"step": s, "loss": float(s)})
    log.close()
    MetricsLog.rewind(tmp_path / "m.jsonl", {"step": 10})
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [0, 5, 10]
    # A run that died while appending a row leaves it torn: resuming dropped dead on it.
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 11, "lo')
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [0, 5, 10]
    MetricsLog.rewind(tmp_path / "m.jsonl", {"step": 10})
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 3
    # A bad row before the last is not a torn write: named, with its line.
    (tmp_path / "m.jsonl").write_text('{"step": 0}\nnot json\n{"step": 5}\n')
    with pytest.raises(UserError, match=r"m.jsonl:2: is not a metrics row"):
        read_metrics(tmp_path / "m.jsonl")


def test_a_row_whose_sample_holds_a_unicode_line_separator_is_read_as_one_row(tmp_path):
    # Pretraining logs its sample text, written as it is: U+2028, U+2029 and U+0085 (NEL) are
    # no line end of JSON Lines, but str.splitlines ended the row there, and the run's next
    # save (or its resume) stopped on "metrics.jsonl:1: is not a metrics row".
    log = MetricsLog(tmp_path / "m.jsonl")
    rows = [{"step": 0, "val_loss": 1.5, "sample": "a\u2028b\u2029c\x85d\x1c"},
            {"step": 1, "loss": 1.0}]
    for row in rows:
        log.log(row)
    log.close()
    assert read_metrics(tmp_path / "m.jsonl") == rows


def test_a_nan_loss_is_logged_as_strict_json_and_a_resume_reads_it_back(tmp_path):
    # Python's json wrote the bare token NaN: jq and JSON.parse refused the whole metrics.jsonl
    # of a run whose loss diverged, the one a user most needs to read.
    from test_io import strict_loads
    tokens = _stream(n=300)
    ids = np.arange(8)
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=2, eval_every=2, eval_batches=1,
                      save_every=2, log_every=1, progress=False, device="cpu")
    # The validation loss is NaN (a training loss so stops the run: see below).
    nan_in_eval = lambda model, block: lm_loss(model, block) * (  # noqa: E731
        1.0 if model.training else math.nan)
    val = fixed_batches(tokens, 16, ids, 4, 1)
    train(tiny(), BlockBatches(tokens, 16, ids, 4, seed=0), nan_in_eval, cfg, tmp_path,
          val_batches=val)
    resumed = dataclasses.replace(cfg, max_steps=3)
    train(tiny(), BlockBatches(tokens, 16, ids, 4, seed=0), nan_in_eval, resumed, tmp_path,
          val_batches=val, resume=True)  # rewrites the rows up to its checkpoint, read back
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [strict_loads(line) for line in lines]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [0, 2, 3]
    assert all(r["val_loss"] is None for r in val_rows)
    assert all(r["non_finite"] == {"/val_loss": "NaN", "/val_ppl": "NaN"} for r in val_rows)
    read = read_metrics(tmp_path / "metrics.jsonl")
    assert all(math.isnan(r["val_loss"]) for r in read if "val_loss" in r)
    assert [r["step"] for r in read if "loss" in r] == [1, 2, 3]


def _nan_from(step: int):
    """lm_loss, NaN from training step `step` on (a run that diverges there)."""
    calls = []

    def loss(model, block):
        if model.training:
            calls.append(1)
        return lm_loss(model, block) * (math.nan if len(calls) >= step else 1.0)
    return loss


def test_a_diverged_step_stops_the_run_before_a_save_and_keeps_the_good_checkpoints(tmp_path):
    """A NaN loss made the update NaN, and the next saves wrote NaN weights over the good
    checkpoints (keep_checkpoints rotated them out). Now the run stops at the step, its row
    logged, nothing saved: the last checkpoint is the one before, whole and finite."""
    from test_io import strict_loads
    tokens = _stream(n=600)
    ids = np.arange(30)
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=8, save_every=2, keep_checkpoints=2,
                      log_every=4, eval_every=0, progress=False, device="cpu")
    model = tiny()
    with pytest.raises(UserError, match="diverged at step 5 \\(loss nan, grad_norm nan\\)") \
            as err:
        train(model, BlockBatches(tokens, 16, ids, 4, seed=0), _nan_from(5), cfg, tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert f"the last checkpoint, {ckpts / 'step-4'}, is kept as it was" in str(err.value)
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # the update's NaN
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-2", "step-4"]
    assert Checkpointer(tmp_path).latest() == ckpts / "step-4"
    for step in (2, 4):
        Checkpointer.verify(ckpts / f"step-{step}")
        loaded = tiny(1)
        Checkpointer(tmp_path).load(ckpts / f"step-{step}", loaded)
        assert all(torch.isfinite(p).all() for p in loaded.parameters())
    # Step 4's weights are those of the same run that never diverged, byte for byte.
    train(tiny(), BlockBatches(tokens, 16, ids, 4, seed=0), lm_loss,
          dataclasses.replace(cfg, keep_checkpoints=4), tmp_path / "good")
    good = tmp_path / "good" / "checkpoints" / "step-4" / "model.safetensors"
    assert (ckpts / "step-4" / "model.safetensors").read_bytes() == good.read_bytes()
    # The diverged step's row is logged (off log_every), its numbers null, as JSON has none.
    rows = [strict_loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 5]
    assert rows[1]["loss"] is None and rows[1]["non_finite"]["/loss"] == "NaN"
    assert not (tmp_path / "config.json").exists()


def test_a_run_that_diverges_before_its_first_save_says_there_is_no_checkpoint(tmp_path):
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=4, save_every=2, eval_every=0,
                      progress=False, device="cpu")
    with pytest.raises(UserError, match="no checkpoint was saved before it"):
        train(tiny(), BlockBatches(_stream(), 16, np.arange(30), 4, seed=0), _nan_from(1), cfg,
              tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_an_earlier_metrics_file_with_bare_nan_is_read_and_rewritten_strict(tmp_path):
    from test_io import strict_loads
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN, "grad_norm": Infinity}\n{"step": 2, "loss": 1.5}\n')
    rows = read_metrics(path)
    assert math.isnan(rows[0]["loss"]) and rows[0]["grad_norm"] == math.inf
    MetricsLog.rewind(path, {"step": 1})
    assert [strict_loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": None, "grad_norm": None,
         "non_finite": {"/loss": "NaN", "/grad_norm": "Infinity"}}]
    log = MetricsLog(path)  # a resumed run appends to it
    log.log({"step": 2, "loss": -math.inf, "sample": "é"})
    log.close()
    assert strict_loads(path.read_text().splitlines()[1]) == {
        "step": 2, "loss": None, "sample": "é", "non_finite": {"/loss": "-Infinity"}}
    assert read_metrics(path)[1]["loss"] == -math.inf


def test_on_eval_can_stop_training_early_and_the_stop_is_saved(tmp_path):
    tokens = _stream(3, n=1000)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=30, eval_every=5, eval_batches=1,
                      save_every=0, progress=False, device="cpu")
    seen = []

    def on_eval(model, step, val_loss):
        seen.append(step)
        return {"stop": step >= 10}

    result = train(tiny(), BlockBatches(tokens, 16, np.arange(50), 4, 0), lm_loss, cfg, tmp_path,
                   val_batches=fixed_batches(tokens, 16, np.arange(50, 60), 4, 1), on_eval=on_eval)
    assert seen == [0, 5, 10] and result.step == result.total_steps == 10
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert {"step": 10, "event": "early_stop"} in rows
    assert all("stop" not in r for r in rows)
    assert Checkpointer(tmp_path).latest().name == "step-10"


def test_sft_best_keeper_stops_after_patience_evaluations_without_progress(tmp_path, monkeypatch):
    import gptlab.train.sft as sft_module
    saved = []
    monkeypatch.setattr(sft_module, "replace_model",
                        lambda d, m, t, extra: saved.append(extra["step"]))
    scores = iter([0.1, 0.5, 0.4, 0.5, 0.45, 0.45, 0.6])
    losses = [1.0, 0.8, 0.9, 0.9, 0.7, 0.75, 0.75]
    keeper = sft_module.BestKeeper(tmp_path, None, exec_eval=lambda m: next(scores), patience=2)
    stops = [keeper(None, 100 * i, loss).get("stop", False) for i, loss in enumerate(losses)]
    # Steps 200 and 300 improve neither score nor loss: stop at 300 (patience 2). Step 400's
    # lower loss resets the count, 500 is one without progress, 600's score is a new best.
    assert stops == [False, False, False, True, False, False, False]
    assert saved == [0, 100, 600] and keeper.best == 0.6 and keeper.best_step == 600


def test_sft_best_keeper_breaks_ties_by_validation_loss(tmp_path, monkeypatch):
    import gptlab.train.sft as sft_module
    saved = []
    monkeypatch.setattr(sft_module, "replace_model",
                        lambda d, m, t, extra: saved.append(extra["step"]))
    keeper = sft_module.BestKeeper(tmp_path, None, exec_eval=lambda m: 0.0)
    for i, loss in enumerate([5.9, 5.0, 4.8, 4.9]):  # no SQL runs yet, but the loss falls
        keeper(None, 100 * i, loss)
    assert saved == [0, 100, 200] and keeper.best_step == 200 and keeper.best_val_loss == 4.8


class _InterruptedEval:
    """on_eval that raises KeyboardInterrupt (as Ctrl-C would) the first time it sees `at`."""

    def __init__(self, at: int):
        self.at, self.fired = at, False

    def __call__(self, model, step, val_loss):
        if step == self.at and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return {}


def test_a_ctrl_c_during_an_evaluation_is_made_good_on_resume(tmp_path):
    tokens = _stream(2, n=2000)
    ids = np.arange(60)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=12, batch_size=4, eval_every=4,
                      eval_batches=2, save_every=100, log_every=1, progress=False, device="cpu")
    val = fixed_batches(tokens, 16, np.arange(60, 70), 4, 2)
    full = tiny(1)
    train(full, BlockBatches(tokens, 16, ids, 4, seed=0), lm_loss, cfg, tmp_path / "a",
          val_batches=val, on_eval=lambda m, s, v: {})
    first = tiny(1)
    with pytest.raises(KeyboardInterrupt):  # step 8 is trained and logged, its evaluation cut
        train(first, BlockBatches(tokens, 16, ids, 4, seed=0), lm_loss, cfg, tmp_path / "b",
              val_batches=val, on_eval=_InterruptedEval(8))
    assert Checkpointer(tmp_path / "b").latest().name == "step-8"
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")
            if "val_loss" in r] == [0, 4]
    second = tiny(7)
    train(second, BlockBatches(tokens, 16, ids, 4, seed=0), lm_loss, cfg, tmp_path / "b",
          val_batches=val, on_eval=lambda m, s, v: {}, resume=True)
    assert _curve(tmp_path / "a" / "metrics.jsonl") == _curve(tmp_path / "b" / "metrics.jsonl")
    for pa, pb in zip(full.parameters(), second.parameters()):
        assert torch.equal(pa, pb)


def test_resume_keeps_an_early_stop_and_refuses_another_split(tmp_path):
    tokens = _stream(3, n=1000)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=30, eval_every=5, eval_batches=1,
                      save_every=0, progress=False, device="cpu")
    run = lambda c, **kw: train(  # noqa: E731
        tiny(), BlockBatches(tokens, 16, np.arange(50), 4, 0), lm_loss, c, tmp_path,
        val_batches=fixed_batches(tokens, 16, np.arange(50, 60), 4, 1),
        on_eval=lambda m, s, v: {"stop": s >= 10}, **kw)
    assert run(cfg).step == 10
    rows = read_metrics(tmp_path / "metrics.jsonl")
    again = run(cfg, resume=True)  # the same command: the run is finished, not stretched to 30
    assert again.step == again.total_steps == 10
    assert read_metrics(tmp_path / "metrics.jsonl") == rows
    with pytest.raises(UserError) as err:
        run(dataclasses.replace(cfg, seed=1), resume=True)
    assert err.value.field == "seed" and "seed: 0 there, 1 now" in str(err.value)
    # Asked for another length, it trains on; from then on that length is the run's own.
    longer = dataclasses.replace(cfg, max_steps=40, save_every=4, keep_checkpoints=20)
    on_eval = lambda m, s, v: {}  # noqa: E731  (no more early stops)
    first = train(tiny(), BlockBatches(tokens, 16, np.arange(50), 4, 0), lm_loss, longer,
                  tmp_path, val_batches=fixed_batches(tokens, 16, np.arange(50, 60), 4, 1),
                  on_eval=on_eval, resume=True)
    assert first.step == 40
    ckpt = Checkpointer(tmp_path)
    (ckpt.dir / "latest").write_text("step-16\n")  # as if stopped at step 16
    again = train(tiny(), BlockBatches(tokens, 16, np.arange(50), 4, 0), lm_loss,
                  dataclasses.replace(cfg, max_steps=30), tmp_path,
                  val_batches=fixed_batches(tokens, 16, np.arange(50, 60), 4, 1),
                  on_eval=on_eval, resume=True)
    assert again.step == again.total_steps == 30  # not 40: the stop at 10 no longer holds


def _four_steps_saved_every_two(tmp_path):
    """A finished 4-step run in tmp_path with checkpoints at steps 2 and 4, its config, and a
    function that trains again into tmp_path with a config given."""
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=4, eval_every=0, save_every=2,
                      progress=False, device="cpu")

    def run(c, **kw):
        return train(tiny(), BlockBatches(_stream(6, n=1000), 16, np.arange(50), 4, 0), lm_loss,
                     c, tmp_path, **kw)
    run(cfg)
    return cfg, run


@pytest.mark.parametrize("change", [{"weight_decay": 0.5}, {"beta2": 0.99}, {"lr": 1e-3},
                                    {"warmup_steps": 0}, {"clip": 0.5}])
def test_resume_refuses_another_optimizer_setting(tmp_path, change):
    """The optimizer's saved state holds its betas and weight decay: a resume with new ones
    went on with the old, silently; another lr or warmup bent the schedule unannounced."""
    cfg, run = _four_steps_saved_every_two(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step-2\n")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    with pytest.raises(UserError) as err:
        run(dataclasses.replace(cfg, **change), resume=True)
    [(field, value)] = change.items()
    assert err.value.field == field
    assert f"{field}: {getattr(cfg, field)!r} there, {value!r} now" in str(err.value)
    assert read_metrics(tmp_path / "metrics.jsonl") == rows  # nothing truncated or written
    assert run(cfg, resume=True).step == 4  # the same settings continue


def test_an_early_stop_decided_by_a_resumed_evaluation_is_kept(tmp_path):
    tokens = _stream(5, n=2000)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=12, batch_size=4, eval_every=4,
                      eval_batches=1, save_every=100, progress=False, device="cpu")
    cut = _InterruptedEval(8)

    def on_eval(model, step, val_loss):  # cut short at step 8 once; on resume, stop there
        return {**(cut(model, step, val_loss) or {}), "stop": step == 8}

    run = lambda **kw: train(  # noqa: E731
        tiny(), BlockBatches(tokens, 16, np.arange(60), 4, 0), lm_loss, cfg, tmp_path,
        val_batches=fixed_batches(tokens, 16, np.arange(60, 70), 4, 1), on_eval=on_eval, **kw)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert run(resume=True).step == 8
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert {"step": 8, "event": "early_stop"} in rows
    again = run(resume=True)
    assert again.step == again.total_steps == 8 and read_metrics(tmp_path / "metrics.jsonl") == rows


def _ctrl_c_after_logging(monkeypatch, row_matches):
    """A real Ctrl-C (SIGINT) right after metrics.jsonl gets the first row `row_matches`."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    log, fired = MetricsLog.log, []

    def log_then_ctrl_c(self, row):
        log(self, row)
        if row_matches(row) and not fired:
            fired.append(row)
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(MetricsLog, "log", log_then_ctrl_c)
    return fired


@pytest.mark.parametrize("after", ["val_loss", "event"])
def test_a_ctrl_c_once_an_evaluation_that_stops_early_is_logged_keeps_the_stop(
        tmp_path, monkeypatch, after):
    # Between the evaluation's row (or the early_stop row) and the stop being recorded, a
    # Ctrl-C saved step 8 as not stopped: resumed, the row was there, so no evaluation decided
    # again, and the run trained on to step 12.
    tokens = _stream(5, n=2000)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=12, batch_size=4, eval_every=4,
                      eval_batches=1, save_every=100, log_every=1, progress=False, device="cpu")
    run = lambda out, **kw: train(  # noqa: E731
        tiny(), BlockBatches(tokens, 16, np.arange(60), 4, 0), lm_loss, cfg, out,
        val_batches=fixed_batches(tokens, 16, np.arange(60, 70), 4, 1),
        on_eval=lambda m, s, v: {"stop": s == 8}, **kw)
    straight = run(tmp_path / "a")
    assert straight.step == 8
    fired = _ctrl_c_after_logging(monkeypatch, lambda r: r.get("step") == 8 and after in r)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    assert fired and Checkpointer(tmp_path / "b").latest().name == "step-8"
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.step == resumed.total_steps == 8
    untimed = lambda run: [{k: v for k, v in r.items()  # noqa: E731
                            if k not in ("tokens_per_s", "elapsed_s")}
                           for r in read_metrics(tmp_path / run / "metrics.jsonl")]
    assert untimed("b") == untimed("a")  # the early_stop row once, at step 8


def test_a_ctrl_c_once_the_time_budget_is_logged_keeps_the_budget(tmp_path, monkeypatch):
    # Between the budget row and the budget being recorded, a Ctrl-C saved a checkpoint still
    # measuring: the resumed run measured again and logged a second budget row.
    tokens = _stream(2, n=1000)
    cfg = TrainConfig(max_minutes=1.0, max_steps=8, warmup_steps=2, eval_every=0,
                      save_every=0, progress=False, device="cpu")
    run = lambda **kw: train(  # noqa: E731
        tiny(), BlockBatches(tokens, 16, np.arange(50), 4, 0), lm_loss, cfg, tmp_path, **kw)
    fired = _ctrl_c_after_logging(monkeypatch, lambda r: r.get("event") == "budget")
    with pytest.raises(KeyboardInterrupt):
        run()
    assert fired
    state = torch.load(Checkpointer(tmp_path).latest() / "trainer.pt", weights_only=False)
    assert state["step"] == 4 and not state["budget_pending"] and state["total_steps"] == 8
    assert run(resume=True).step == 8
    budget = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "budget"]
    assert budget == fired  # one, the first session's


def test_clip_zero_measures_and_leaves_the_gradients_as_they_are():
    model = tiny()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    assert clip_gradients(model, 0) > 1.0
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_the_loop_clips_each_update_and_counts_the_tokens_of_the_whole_run(tmp_path):
    tokens = _stream(6, n=1000)
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=3, clip=1e-6, weight_decay=0.0,
                      eval_every=0, save_every=0, log_every=1, progress=False, device="cpu")
    batches = lambda: BlockBatches(tokens, 16, np.arange(50), 4, 0)  # noqa: E731
    model = tiny(2)
    clipped, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    result = train(model, batches(), lm_loss, cfg, tmp_path)
    # By hand: the same batches, lr and AdamW, with and without clipping to norm 1e-6 (so small
    # that AdamW's eps makes the clipped update far smaller than the unclipped one).
    for m, clip in ((clipped, 1e-6), (unclipped, 0.0)):
        opt, data = make_optimizer(m, 1e-2, 0.0, (0.9, 0.95)), batches()
        for step in range(3):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, 0, 3, 1e-2, 0.1)
            accumulate_gradients(m, [next(data)], lm_loss)
            clip_gradients(m, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, c, u in zip(model.parameters(), clipped.parameters(), unclipped.parameters()):
        torch.testing.assert_close(p, c, rtol=0, atol=1e-6)
    assert not all(torch.allclose(c, u, atol=1e-4)
                   for c, u in zip(clipped.parameters(), unclipped.parameters()))
    # Tokens add up over the run: 4 blocks of 17 tokens a step.
    assert result.tokens == 3 * 4 * 17
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["tokens"] for r in rows] == [68, 136, 204]


def test_how_often_one_evaluates_does_not_change_the_training_run(tmp_path):
    tokens = _stream(7, n=2000)

    def on_eval(model, step, val_loss):  # a sample drawn at each evaluation uses the RNG
        return {"draw": float(torch.rand(()))}

    def run(out, eval_every):
        cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=6, eval_every=eval_every,
                          eval_batches=1, save_every=0, log_every=1, progress=False, device="cpu")
        model = tiny(3, dropout=0.2)  # dropout: training draws from the torch RNG
        train(model, BlockBatches(tokens, 16, np.arange(60), 4, 0), lm_loss, cfg, out,
              val_batches=fixed_batches(tokens, 16, np.arange(60, 70), 4, 1), on_eval=on_eval)
        return model, [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]

    (a, loss_a), (b, loss_b) = run(tmp_path / "a", 1), run(tmp_path / "b", 0)
    assert loss_a == loss_b and len(loss_a) == 6
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def _rewrite_trainer_state(checkpoint, change) -> None:
    """Edit a checkpoint's trainer.pt (as an older gptlab would have written it), keeping its
    manifest's sha256 in step."""
    import hashlib
    import json
    path = checkpoint / "trainer.pt"
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["sha256"]["trainer.pt"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_a_resume_refuses_a_time_budget_the_run_was_not_started_with(tmp_path):
    """A fixed-length run resumed with --max-minutes went on to its old length: the budget was
    ignored without a word. A budget lays out the schedule when a run starts, so a resume
    refuses a new or another one, naming the field, before anything is written."""
    cfg, run = _four_steps_saved_every_two(tmp_path)
    step2 = tmp_path / "checkpoints" / "step-2"
    (tmp_path / "checkpoints" / "latest").write_text("step-2\n")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    for check in (lambda c: check_run_dir(tmp_path, True, cfg=c),
                  lambda c: run(c, resume=True)):
        with pytest.raises(UserError) as err:
            check(dataclasses.replace(cfg, max_minutes=10.0))
        assert err.value.field == "max_minutes" and err.value.path == step2
        assert ("is a fixed-length run (4 steps, 2 steps done in" in str(err.value)
                and "max_minutes 10.0 now: resume without max_minutes (--max-minutes), or with "
                "the run's own, and with max_steps (--max-steps) to change its length"
                in str(err.value))
        assert read_metrics(tmp_path / "metrics.jsonl") == rows  # nothing truncated or written
    assert run(cfg, resume=True).step == 4  # without it, the run continues

    # A budget run: the same budget resumes, another is refused.
    budget = dataclasses.replace(cfg, max_minutes=5.0, max_steps=6, save_every=5)
    out = tmp_path / "budget"
    train(tiny(), BlockBatches(_stream(6, n=1000), 16, np.arange(50), 4, 0), lm_loss, budget,
          out)  # 5 minutes hold far more than 6 steps: capped at 6
    (out / "checkpoints" / "latest").write_text("step-5\n")
    with pytest.raises(UserError) as err:
        check_run_dir(out, True, cfg=dataclasses.replace(budget, max_minutes=1.0))
    assert err.value.field == "max_minutes"
    assert "was started with max_minutes 5.0 (its step count, 6; 5 steps done" in str(err.value)
    again = lambda c: train(  # noqa: E731
        tiny(), BlockBatches(_stream(6, n=1000), 16, np.arange(50), 4, 0), lm_loss, c, out,
        resume=True)
    assert again(budget).step == 6
    (out / "checkpoints" / "latest").write_text("step-5\n")
    assert again(dataclasses.replace(budget, max_minutes=None)).step == 6

    # A checkpoint from before the budget was recorded resumes as before...
    _rewrite_trainer_state(step2, lambda s: s.pop("max_minutes"))
    (tmp_path / "checkpoints" / "latest").write_text("step-2\n")
    assert run(dataclasses.replace(cfg, max_minutes=10.0), resume=True).step == 4
    # ...and one saved while its budget was measured, resumed without it, is a clear error
    # (it was a TypeError on None * 60).
    def pending(state):
        state.update(budget_pending=True, total_steps=None)
    _rewrite_trainer_state(step2, pending)
    (tmp_path / "checkpoints" / "latest").write_text("step-2\n")
    with pytest.raises(UserError) as err:
        run(cfg, resume=True)
    assert err.value.field == "max_minutes"
    assert "resume with the run's max_minutes (--max-minutes)" in str(err.value)


def test_evaluate_turns_dropout_off_keeps_no_graph_and_gives_the_mode_back():
    from gptlab.train.loop import evaluate
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    batches = [torch.ones(2, 4), torch.full((2, 4), 2.0)]
    graphs = []

    def loss_fn(m, b):
        out = m(b).sum()
        graphs.append(out.requires_grad)
        return out

    got = evaluate(net, batches, loss_fn, torch.device("cpu"))
    with torch.no_grad():  # by hand: the linear layer alone (dropout is the identity in eval)
        want = sum(float((x @ net[0].weight.T + net[0].bias).sum()) for x in batches) / 2
    assert got == pytest.approx(want, rel=1e-6)
    assert net.training and graphs == [False, False]


def test_the_last_step_is_logged_though_log_every_does_not_divide_it(tmp_path):
    tokens = _stream(3, n=400)
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=5, log_every=2, eval_every=0,
                      save_every=0, progress=False, device="cpu")
    result = train(tiny(), BlockBatches(tokens, 16, np.arange(20), 2, 0), lm_loss, cfg,
                   tmp_path)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 5] and rows[-1]["loss"] == result.loss


def test_a_resume_with_two_other_settings_names_both_and_the_first_as_its_field(tmp_path):
    cfg, run = _four_steps_saved_every_two(tmp_path)
    with pytest.raises(UserError) as err:
        run(dataclasses.replace(cfg, lr=1e-3, seed=5), resume=True)
    assert err.value.field == "seed"  # the split's settings first, then the optimizer's
    assert "seed: 0 there, 5 now, lr: 0.003 there, 0.001 now" in str(err.value)


def test_elapsed_time_adds_up_the_steps_of_the_run(tmp_path, monkeypatch):
    import time
    import types
    clock = iter(range(10**6))  # each reading 0.5 s after the last: every step takes 0.5 s
    monkeypatch.setattr("gptlab.train.loop.time", types.SimpleNamespace(
        perf_counter=lambda: next(clock) * 0.5, strftime=time.strftime))
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=4, log_every=1, eval_every=0,
                      save_every=0, progress=False, device="cpu")
    result = train(tiny(), BlockBatches(_stream(3, n=400), 16, np.arange(20), 2, 0), lm_loss,
                   cfg, tmp_path)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["elapsed_s"] for r in rows] == [0.5, 1.0, 1.5, 2.0] and result.elapsed_s == 2.0
    assert [r["tokens_per_s"] for r in rows] == [68.0] * 4  # 2 blocks of 17 per 0.5 s


def test_a_resume_asking_for_fewer_steps_than_done_ends_there_and_says_so(tmp_path, capsys):
    """Not 'the cosine is stretched' and a length below the step reached: the run ends at
    the step it has reached, which is its length."""
    tokens = _stream(3, n=1000)
    cfg = TrainConfig(warmup_steps=0, max_steps=4, eval_every=0, eval_batches=0,
                      progress=False, device="cpu")
    run = lambda c, **kw: train(  # noqa: E731
        tiny(), BlockBatches(tokens, 16, np.arange(50), 4, 0), lm_loss, c, tmp_path, **kw)
    assert run(cfg).step == 4
    capsys.readouterr()
    again = run(dataclasses.replace(cfg, max_steps=2), resume=True)
    assert again.step == again.total_steps == 4
    err = capsys.readouterr().err
    assert "max_steps 2 is not past step 4, which the run has reached: it ends there" in err
    assert "stretched" not in err and "(step 4 of 4)" in err


def test_count_tokens_counts_real_tokens_not_padding():
    from gptlab.train.loop import count_tokens
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert count_tokens(batch) == 8
    assert count_tokens({"input_ids": torch.zeros(2, 5, dtype=torch.long)}) == 10
    assert count_tokens(torch.zeros(3, 4)) == 12 and count_tokens([]) == 0


# --- a full disk at every write of a run ---------------------------------------------------------

def _torch_writer_full(*args, **kwargs):
    """What torch.save does on a full disk: its writer raises a RuntimeError while the OSError of
    the Python file it writes to is being handled (through a path, it names neither)."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726")


def _safetensors_full(*args, **kwargs):
    from safetensors import SafetensorError
    raise SafetensorError("Error while serializing: I/O error: No space left on device "
                          "(os error 28)")


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _rename_full(src, dst, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))


class _FullMetrics:
    """metrics.jsonl's file, whose `at`-th row meets a full disk (write() names no file)."""

    def __init__(self, f, at: int):
        self.f, self.at, self.n = f, at, 0

    def write(self, text):
        self.n += 1
        if self.n == self.at:
            _disk_full()
        return self.f.write(text)

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def _fail_at(n: int, real, fail):
    """`real`, except that its call number `n` (from 1) runs `fail` instead."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return (fail if calls[0] == n else real)(*args, **kwargs)
    return wrapper


def _write_points():
    import builtins
    import os

    import gptlab.checkpoint as ck
    import gptlab.train.loop as loop_module
    open_ = builtins.open
    return {  # name: (object, attribute, the write as it is, n -> the write failing at call n)
        "rename": (os, "replace", os.replace,
                   lambda n: _fail_at(n, os.replace, _rename_full)),
        "torch.save": (torch, "save", torch.save,
                       lambda n: _fail_at(n, torch.save, _torch_writer_full)),
        "safetensors": (ck, "st_save_model", ck.st_save_model,
                        lambda n: _fail_at(n, ck.st_save_model, _safetensors_full)),
        "metrics row": (loop_module, "open", open_,
                        lambda n: lambda *a, **k: _FullMetrics(open_(*a, **k), n)),
    }


@pytest.mark.parametrize("point", ["rename", "torch.save", "safetensors", "metrics row"])
def test_a_full_disk_at_any_write_of_a_run_names_the_file_and_a_rerun_ends_as_a_straight_run(
        tmp_path, monkeypatch, point):
    """Every write of a run (4 steps, a checkpoint every 2, an evaluation every 2) meets a full
    disk in turn: the run stops with an OSError naming the file (the CLI's one line, exit 2),
    what it leaves is whole (the latest checkpoint verifies, no temporary is left), and the same
    run again (with --resume where a checkpoint is left) ends with the straight run's weights
    and metrics rows, none twice and none missing."""
    tokens = _stream(2, n=1200)
    cfg = TrainConfig(lr=3e-3, warmup_steps=1, max_steps=4, batch_size=2, eval_every=2,
                      eval_batches=1, save_every=2, log_every=1, progress=False, device="cpu",
                      seed=1)
    val = fixed_batches(tokens, 16, np.arange(40, 44), 2, 1)

    def run(out, resume=False):
        model = tiny(7)
        train(model, BlockBatches(tokens, 16, np.arange(40), 2, seed=1), lm_loss, cfg, out,
              val_batches=val, resume=resume)
        return model

    straight = run(tmp_path / "straight")
    obj, name, real, failing = _write_points()[point]
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)
    with monkeypatch.context() as m:
        if point == "metrics row":  # rows, not opens, are the writes counted
            m.setattr(obj, name, lambda *a, **k: _FullMetrics(real(*a, **k), 0), raising=False)
            run(tmp_path / "count")
            calls[0] = len(read_metrics(tmp_path / "count" / "metrics.jsonl"))
        else:
            m.setattr(obj, name, counted)
            run(tmp_path / "count")
    assert calls[0] >= 2
    for n in range(1, calls[0] + 1):
        out = tmp_path / f"{n}"
        with monkeypatch.context() as m:
            m.setattr(obj, name, failing(n), raising=False)
            with pytest.raises(OSError) as failed:
                run(out)
        assert failed.value.errno == errno.ENOSPC, n
        assert str(failed.value.filename).startswith(str(out)), n
        latest = Checkpointer(out).latest()
        if latest is not None:
            Checkpointer.verify(latest)
        resumed = run(out, resume=latest is not None)
        assert all(torch.equal(a, b) for a, b in zip(straight.parameters(),
                                                     resumed.parameters())), n
        assert _curve(out / "metrics.jsonl") == _curve(tmp_path / "straight" / "metrics.jsonl"), n
        assert not [p for p in out.rglob("*") if ".tmp" in p.name], n


def test_out_of_memory_in_a_step_or_an_evaluation_names_the_batch_size(tmp_path):
    """`pretrain --batch-size 1000000` ended in the CPU allocator's traceback ("DefaultCPUAllocator:
    can't allocate memory: you tried to allocate 32768000000 bytes"): now one line naming
    batch_size. Another RuntimeError is left as it is."""
    cpu = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
           "memory: you tried to allocate 32768000000 bytes. Error code 12 (Cannot allocate "
           "memory)")
    cuda = getattr(torch, "OutOfMemoryError", MemoryError)(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB")
    cfg = TrainConfig(lr=1e-3, max_steps=2, eval_every=0, save_every=0, batch_size=4,
                      progress=False, device="cpu")
    batches = BlockBatches(_stream(n=600), 16, np.arange(30), 4, 0)
    for error, asked in ((RuntimeError(cpu), "32768000000 bytes"), (cuda, "20.00 GiB"),
                         (MemoryError(), None)):
        def loss(model, block, error=error):
            raise error
        with pytest.raises(UserError) as e:
            train(tiny(), batches, loss, cfg, tmp_path / "run")
        assert str(e.value) == (
            "field 'batch_size': out of memory on cpu in a training step with batch_size 4"
            + (f" (an allocation of {asked})" if asked else "")
            + "; lower it (--batch-size), and raise grad_accum (--grad-accum) to keep the "
              "update's size")
    calls = []

    def oom_in_eval(model, block):
        calls.append(model.training)
        if not model.training:
            raise RuntimeError(cpu)
        return lm_loss(model, block)
    with pytest.raises(UserError, match="out of memory on cpu in the validation loss with "
                                        "batch_size 4 "):
        train(tiny(), batches, oom_in_eval, dataclasses.replace(cfg, eval_batches=1),
              tmp_path / "run2", val_batches=[next(batches)])

    def other(model, block):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(tiny(), batches, other, cfg, tmp_path / "run3")


def test_the_optimizer_leaves_frozen_weights_out_and_no_gradient_clips_to_zero():
    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    model.tok_emb.weight.requires_grad_(False)  # tied: the output head is frozen with it
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert id(model.tok_emb.weight) not in held and len(held) == len(trainable)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == \
        sum(p.numel() for p in trainable) == \
        sum(p.numel() for p in model.parameters()) - model.tok_emb.weight.numel()
    assert clip_gradients(model, 1.0) == 0.0  # no backward yet: no gradient, norm 0


def test_a_metrics_row_or_run_json_that_is_no_object(tmp_path, capsys):
    from gptlab.train.loop import annotate_run
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n[2]\n{"step": 3}\n')
    with pytest.raises(UserError) as e:
        read_metrics(path)
    assert str(e.value) == f"{path}:2: is not a metrics row (not a JSON object)"
    path.write_text('{"step": 1}\n[2]\n')  # a torn last row is left out
    assert read_metrics(path) == [{"step": 1}]
    # run.json only records how the run was made: damaged, it is written anew, not a stop
    for damaged in (b"[1, 2]", b'{"config": \xff}'):
        (tmp_path / "run.json").write_bytes(damaged)
        annotate_run(tmp_path, step_budget=7)
        assert json.loads((tmp_path / "run.json").read_text()) == {"step_budget": 7}
        assert capsys.readouterr().err.startswith(f"note: {tmp_path / 'run.json'} is damaged (")
    annotate_run(tmp_path / "none", step_budget=7)  # no run.json: nothing to add to
    assert not (tmp_path / "none").exists()


def test_tokens_are_counted_in_a_batch_of_any_shape():
    from gptlab.train.loop import count_tokens
    ids, mask = torch.zeros(2, 5, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert count_tokens((ids, ids)) == 10 and count_tokens([ids]) == 10
    assert count_tokens({"input_ids": ids, "attention_mask": mask}) == 3
    assert count_tokens({"input_ids": ids}) == 10 and count_tokens({"x": mask}) == 6
    assert count_tokens([]) == 0 and count_tokens(None) == 0


def test_config_types_a_list_given_a_number_and_annotations_the_check_does_not_know():
    from gptlab.train.loop import check_fields
    from gptlab.train.pretrain import PretrainConfig
    with pytest.raises(UserError) as e:
        PretrainConfig(data=5, model="tiny").check_values()
    assert str(e.value) == "field 'data': must be a list, got the int 5"

    @dataclasses.dataclass
    class Other:
        either: int | str = 1        # two types: not this check's to tell apart
        anything: object = None      # an annotation it does not know
        count: int = 1
    check_fields(Other(either="x", anything=object()), list)
    with pytest.raises(UserError) as e:
        check_fields(Other(count="2"), list)
    assert str(e.value) == "field 'count': must be an int, got the str '2'"
