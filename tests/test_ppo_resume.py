"""PPO's checkpoints and --resume: a run stopped after its checkpoint, or by Ctrl-C, and resumed,
ends with the same weights and the same metrics rows as a run that never stopped (adaptive β
and PPO-ptx included)."""
import dataclasses
import hashlib
import json
import math
import re
import shutil
import signal

import pytest
import torch

from gptlab.checkpoint import Checkpointer, load_model, save_model
from gptlab.cli import main
from gptlab.errors import UserError
from gptlab.model import GPT, get_preset
from gptlab.model.heads import ScalarHeadModel
from gptlab.tokenizer import train_tokenizer
from gptlab.train import ppo as ppo_module
from gptlab.train.loop import read_metrics
from gptlab.train.pipeline import Pipeline, PipelineConfig
from gptlab.train.ppo import PPOConfig, PPOTrainer, ppo

import instruct_task as task

STEPS = 4
STOP = {"at": None, "calls": 0}  # stopping_reward raises KeyboardInterrupt on call number `at`


def varied_reward(prompts, responses, records):
    """Distinct characters: a random policy's responses get different scores."""
    return [len(set(r)) / 8 for r in responses]


def stopping_reward(prompts, responses, records):
    STOP["calls"] += 1
    if STOP["calls"] == STOP["at"]:
        raise KeyboardInterrupt  # as Ctrl-C would, while step `at` is being scored
    return varied_reward(prompts, responses, records)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny policy (no SFT: these tests are about the bookkeeping, not learning), and
    the settings of every run: adaptive β that moves every step, and the pretraining mix."""
    d = tmp_path_factory.mktemp("ppo_resume")
    paths = task.write_task(d, n=200)
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
    save_model(d / "policy", GPT(cfg), tok)
    args = ["--policy", str(d / "policy"), "--prompts", str(paths["prompts"]),
            "--batch-size", "8", "--minibatch-size", "4", "--ppo-epochs", "2",
            "--max-new-tokens", "6", "--lr", "1e-3", "--adaptive-kl", "--target-kl", "0.5",
            "--kl-horizon", "50", "--ptx-data", str(paths["corpus"]), "--ptx-coef", "0.1",
            "--ptx-batch-size", "4", "--ptx-block-size", "32", "--cache-dir", str(d / "cache"),
            "--device", "cpu", "--seed", "3"]
    straight = d / "straight"
    assert main([*ppo_cli(args, straight), "--steps", str(STEPS)]) == 0
    return d, args, straight


def ppo_cli(args, out, reward="varied_reward", save_every=2):
    """`gptlab ppo` arguments for a run of this file's setup into `out`."""
    return ["ppo", *args, "--reward-fn", f"{__name__}:{reward}", "--save-every", str(save_every),
            "--out", str(out)]


def rows(run):
    """metrics.jsonl without the wall-clock column."""
    return [{k: v for k, v in r.items() if k != "elapsed_s"}
            for r in read_metrics(run / "metrics.jsonl")]


def assert_same_run(a, b):
    assert rows(a) == rows(b) and len(rows(a)) == STEPS
    for sub in ("", "value"):
        wa = load_model(a / sub)[0].state_dict()
        wb = load_model(b / sub)[0].state_dict()
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sub


def test_the_straight_run_moves_beta_mixes_ptx_and_keeps_every_checkpoint(setup):
    _, _, straight = setup
    got = rows(straight)
    assert len({r["kl_coef"] for r in got}) == STEPS  # β adapted at every step
    assert all(r["ptx_loss"] > 0 for r in got)
    ckpts = straight / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-2", "step-4"]
    # A checkpoint is a policy any verb reads, with its value model and trainer state.
    assert isinstance(load_model(ckpts / "step-2")[0], GPT)
    Checkpointer.verify(ckpts / "step-2")
    manifest = json.loads((ckpts / "step-2" / "manifest.json").read_text())["sha256"]
    assert {"value/model.safetensors", "optimizer.pt", "trainer.pt"} <= manifest.keys()
    state = torch.load(ckpts / "step-2" / "trainer.pt", weights_only=False)
    assert state["step"] == 2 and state["ptx"] != {"epoch": 0, "index": 0}
    # The β the checkpoint holds is the one step 3 used, and logged, exactly.
    assert state["kl_coef"] == got[2]["kl_coef"]


def test_each_step_prints_the_metrics_to_watch(setup, tmp_path, capsys):
    # The list for the progress output: reward, KL, entropy, response length, clip
    # fraction, value loss, approximate KL (entropy and approx_kl were only in metrics.jsonl).
    _, args, _ = setup
    assert main([*ppo_cli(args, tmp_path / "run", save_every=0), "--steps", "2"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ppo step")]
    for line, r in zip(lines, rows(tmp_path / "run"), strict=True):
        assert line == (f"ppo step {r['step']}/2 reward {r['reward']:+.3f} kl {r['kl']:.3f} "
                        f"entropy {r['entropy']:.3f} len {r['response_length']:.1f} "
                        f"clip {r['clipfrac']:.3f} approx_kl {r['approx_kl']:.4f} "
                        f"vloss {r['value_loss']:.3f}")


def test_ppo_ends_on_a_line_of_its_last_step_as_sft_and_reward_end_on_theirs(setup, tmp_path,
                                                                            capsys):
    # It ended on the run directory alone, where sft and reward print what they did.
    _, args, _ = setup
    run = tmp_path / "run"
    assert main([*ppo_cli(args, run, save_every=1), "--steps", "2", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    r = rows(run)[-1]
    said = (f"PPO: 2 steps; last step: reward {r['reward']:+.3f}, kl {r['kl']:.3f}, response "
            f"length {r['response_length']:.1f} tokens; saved to {run}")
    assert err.splitlines()[-1] == said and out == f"{run}\n"
    # Resumed with no step left, it says the same of the step metrics.jsonl holds.
    assert main([*ppo_cli(args, run, save_every=1), "--steps", "2", "--resume"]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == said


def test_ppo_s_last_line_says_nan_of_a_value_metrics_jsonl_kept_as_null(tmp_path):
    # A resume with no step left reads the row back, where a non-finite value is null: the
    # line's format raised TypeError on None after the policy was saved.
    trainer = PPOTrainer.__new__(PPOTrainer)
    trainer.step, trainer.out = 3, tmp_path
    line = trainer._summary({"reward": None, "kl": 0.25, "response_length": None})
    assert line == (f"PPO: 3 steps; last step: reward nan, kl 0.250, response length nan "
                    f"tokens; saved to {tmp_path}")


def test_no_progress_silences_the_step_lines_not_metrics(setup, tmp_path, capsys):
    # `--no-progress` (progress=False) prints no
    # per-step line; metrics.jsonl is the same as with them, and a resume may change it.
    _, args, _ = setup
    loud, quiet = tmp_path / "loud", tmp_path / "quiet"
    assert main([*ppo_cli(args, loud, save_every=1), "--steps", "2"]) == 0
    assert capsys.readouterr().err.count("ppo step") == 2
    assert main([*ppo_cli(args, quiet, save_every=1), "--steps", "1", "--no-progress"]) == 0
    assert "ppo step" not in capsys.readouterr().err
    assert main([*ppo_cli(args, quiet, save_every=1), "--steps", "2", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and err.count("ppo step") == 1  # step 2 of 2, loud again
    assert rows(quiet) == rows(loud)
    assert PPOConfig().progress
    for progress in (False, True):  # the pipeline's PPO prints its steps either way
        pipe = Pipeline(PipelineConfig(out=str(tmp_path / "pipe"), progress=progress))
        cfg = pipe.ppo_config(tmp_path / "sft", tmp_path / "sft", tmp_path / "p", 2, 0)
        assert cfg.progress is True


def test_resume_from_a_checkpoint_continues_exactly(setup, monkeypatch, capsys):
    d, args, straight = setup
    out = d / "split"
    common = ppo_cli(args, out)
    assert main([*common, "--steps", "2"]) == 0
    assert main([*common, "--steps", str(STEPS)]) == 2   # a run is there: needs --resume
    other = ppo_cli(args, out, reward="stopping_reward")  # another --reward-fn
    assert main([*other, "--steps", str(STEPS), "--resume"]) == 2
    assert (f"field '--reward-fn': was written with other settings (reward_fn: "
            f"'{__name__}:varied_reward' there, '{__name__}:stopping_reward' now); resume with "
            f"the same settings, or choose another out (--out)") in capsys.readouterr().err
    verified = []
    verify = Checkpointer.verify.__func__
    monkeypatch.setattr(Checkpointer, "verify",
                        classmethod(lambda cls, path: (verified.append(path), verify(cls, path))))
    capsys.readouterr()
    assert main([*common, "--steps", str(STEPS), "--resume"]) == 0
    assert "warning" not in capsys.readouterr().err  # the same prompts
    assert verified == [out / "checkpoints" / "step-2"]  # its files hashed once
    assert_same_run(straight, out)
    assert json.loads((out / "run.json").read_text())["resumed_from"] == "step-2"


def test_a_resume_on_other_prompts_says_so(setup, tmp_path, capsys):
    # The rollouts draw prompts by position: edited (16 prompts left of 200, say), the resumed
    # run drew from other ones and said nothing, where sft and reward warn.
    d, args, _ = setup
    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(args[args.index("--prompts") + 1], prompts)
    mine = [prompts if a == args[args.index("--prompts") + 1] else a for a in args]
    common = [*ppo_cli([str(a) for a in mine], tmp_path / "run"), "--steps"]
    assert main([*common, "2"]) == 0
    prompts.write_text("".join(prompts.read_text().splitlines(keepends=True)[:16]))
    capsys.readouterr()
    assert main([*common, "3", "--resume"]) == 0
    assert ("warning: the prompts changed since the checkpoint; the data position now points "
            "into other prompts") in capsys.readouterr().err


def test_resume_from_a_named_earlier_step_continues_exactly(setup, capsys):
    """A finished run resumed from its step-2 by name (`latest` names step-4) ends as the run
    that never stopped; a step that is not there is refused listing those that are."""
    d, args, straight = setup
    out = d / "named"
    common = ppo_cli(args, out, save_every=1)
    assert main([*common, "--steps", str(STEPS)]) == 0
    ckpts = out / "checkpoints"
    assert main([*common, "--steps", str(STEPS), "--resume-from", "step-5"]) == 2
    assert (f"{ckpts / 'step-5'}, field '--resume-from': no such checkpoint; the checkpoints in "
            f"{ckpts}: step-1, step-2, step-3, step-4") in capsys.readouterr().err
    assert main([*common, "--steps", str(STEPS), "--resume-from", "step-2"]) == 0
    assert f"resuming from {ckpts / 'step-2'} (step 2 of {STEPS})" in capsys.readouterr().err
    assert_same_run(straight, out)
    assert Checkpointer(out).latest() == ckpts / "step-4"
    assert json.loads((out / "run.json").read_text())["resumed_from"] == "step-2"


def test_rows_after_the_checkpoint_are_dropped_on_resume(setup):
    d, args, straight = setup
    out = d / "crashed"
    common = ppo_cli(args, out)
    assert main([*common, "--steps", "3"]) == 0
    # A crash after step 3: its row is in metrics.jsonl, its state only in memory.
    ckpts = out / "checkpoints"
    for name in ("step-3", "step-2"):
        assert (ckpts / name).is_dir()
    shutil.rmtree(ckpts / "step-3")
    (ckpts / "latest").write_text("step-2\n")
    assert len(rows(out)) == 3
    assert main([*common, "--steps", str(STEPS), "--resume"]) == 0
    assert_same_run(straight, out)


def test_ctrl_c_saves_the_last_finished_step_and_resume_finishes_the_run(setup, capsys):
    d, args, straight = setup
    out = d / "interrupted"
    common = [*ppo_cli(args, out, "stopping_reward", save_every=100), "--steps", str(STEPS)]
    STOP.update(at=3, calls=0)
    try:
        assert main(common) == 130          # the CLI's exit code for KeyboardInterrupt
    finally:
        STOP.update(at=None)
    err = capsys.readouterr().err
    ckpt = out / "checkpoints" / "step-2"
    assert f"interrupted: saved {ckpt}; continue with --resume" in err
    assert Checkpointer(out).latest() == ckpt and not (out / "config.json").exists()
    assert len(rows(out)) == 2
    assert main([*common, "--resume"]) == 0
    assert_same_run(straight, out)


def test_ctrl_c_while_the_policy_is_saved_saves_a_checkpoint_of_the_last_step(setup, capsys,
                                                                             monkeypatch):
    # --save-every 0 (the default, the pipeline's): no checkpoint holds the run when the last
    # step is done. A Ctrl-C while the policy was written saved none: every step was lost.
    d, args, straight = setup
    out = d / "interrupted_in_save"
    common = [*ppo_cli(args, out, save_every=0), "--steps", str(STEPS)]
    save = PPOTrainer.save

    def ctrl_c(self, path):
        monkeypatch.setattr(PPOTrainer, "save", save)  # once
        raise KeyboardInterrupt

    monkeypatch.setattr(PPOTrainer, "save", ctrl_c)
    assert main(common) == 130
    ckpt = out / "checkpoints" / f"step-{STEPS}"
    assert f"interrupted: saved {ckpt}; continue with --resume" in capsys.readouterr().err
    assert Checkpointer(out).latest() == ckpt and not (out / "config.json").exists()
    assert main([*common, "--resume"]) == 0
    assert_same_run(straight, out)


def test_ctrl_c_during_an_update_finishes_that_step_first(setup, capsys, monkeypatch):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    d, args, straight = setup
    out = d / "interrupted_in_update"
    real_clip, calls = ppo_module.clip_grad_norm, [0]

    def clip_then_ctrl_c(*a, **kw):   # 4 optimizer steps per PPO step: call 9 is in step 3
        calls[0] += 1
        if calls[0] == 9:
            signal.raise_signal(signal.SIGINT)
        return real_clip(*a, **kw)

    monkeypatch.setattr(ppo_module, "clip_grad_norm", clip_then_ctrl_c)
    cfg = PPOConfig(policy=str(d / "policy"), prompts=str(d / "prompts.jsonl"), out=str(out),
                    steps=STEPS, batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=6,
                    lr=1e-3, adaptive_kl=True, target_kl=0.5, kl_horizon=50,
                    ptx_data=[str(d / "corpus.txt")], ptx_coef=0.1, ptx_batch_size=4,
                    ptx_block_size=32, cache_dir=str(d / "cache"), device="cpu", seed=3)
    with pytest.raises(KeyboardInterrupt):
        ppo(cfg, reward_fn=varied_reward)
    err = capsys.readouterr().err
    assert "finishing this PPO update" in err
    assert f"interrupted: saved {out / 'checkpoints' / 'step-3'}" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    monkeypatch.setattr(ppo_module, "clip_grad_norm", real_clip)
    ppo(dataclasses.replace(cfg, resume=True), reward_fn=varied_reward)
    assert_same_run(straight, out)


def break_at(monkeypatch, step: int, what: str) -> None:
    """From step `step` on, make `what` (pg_loss, value_loss, grad_norm, reward or entropy) of
    each PPO step NaN (the grad norm: infinite), as a diverging run makes them."""
    now = {"step": 0}
    rollout = PPOTrainer.rollout

    def counted_rollout(self, s):
        now["step"] = s
        return rollout(self, s)

    def broken(value, bad=math.nan):
        return value * bad if now["step"] >= step else value

    monkeypatch.setattr(PPOTrainer, "rollout", counted_rollout)
    if what in ("pg_loss", "value_loss"):
        name = {"pg_loss": "clipped_policy_loss", "value_loss": "clipped_value_loss"}[what]
        loss = getattr(ppo_module, name)
        monkeypatch.setattr(ppo_module, name,
                            lambda *a, **k: (lambda v, x: (broken(v), x))(*loss(*a, **k)))
    elif what == "grad_norm":  # the norm overflowed: the gradients are scaled to 0 or NaN
        clip = ppo_module.clip_grad_norm
        monkeypatch.setattr(ppo_module, "clip_grad_norm",
                            lambda *a, **k: broken(clip(*a, **k), math.inf))
    elif what == "reward":  # a reward model's score overflowed (a function's NaN is refused)
        score = PPOTrainer.score
        monkeypatch.setattr(PPOTrainer, "score", lambda self, ro: broken(score(self, ro)))
    else:  # only logged
        entropy = ppo_module.entropy_from_logprobs
        monkeypatch.setattr(ppo_module, "entropy_from_logprobs",
                            lambda logp: broken(entropy(logp)))


@pytest.mark.parametrize("what,named", [
    # A NaN minibatch makes the weights, and so the next minibatches' every loss, NaN.
    ("pg_loss", "pg_loss nan, value_loss nan, ptx_loss nan, grad_norm nan"),
    ("value_loss", "pg_loss nan, value_loss nan, ptx_loss nan, grad_norm nan"),
    ("grad_norm", "grad_norm inf"),  # only the norm read: the update was clipped as before
])
def test_a_step_that_diverges_stops_the_run_before_a_save_keeping_the_last_checkpoint(
        setup, tmp_path, monkeypatch, capsys, what, named):
    """PPO went on past a NaN update, saving NaN checkpoints and a NaN policy. Step 3's update
    is made NaN here: the run logs its row and stops (exit 2), step-2 as the run that never
    diverged saved it, no step-3, no policy in OUT."""
    _, args, straight = setup
    out = tmp_path / "run"
    break_at(monkeypatch, 3, what)
    assert main([*ppo_cli(args, out, save_every=1), "--steps", str(STEPS)]) == 2
    ckpts = out / "checkpoints"
    err = capsys.readouterr().err
    assert (f"{out}: the training diverged at step 3 ({named}): the run stops without saving "
            f"the weights of that update; the last checkpoint, {ckpts / 'step-2'}, is kept as "
            f"it was. A resume replays the same steps") in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-1", "step-2"]
    assert Checkpointer(out).latest() == ckpts / "step-2"
    Checkpointer.verify(ckpts / "step-2")
    for name in ("model.safetensors", "value/model.safetensors", "optimizer.pt"):
        assert (ckpts / "step-2" / name).read_bytes() == \
            (straight / "checkpoints" / "step-2" / name).read_bytes(), name
    assert not any((out / name).exists() for name in ("config.json", "model.safetensors",
                                                        "value"))
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[:2] == rows(straight)[:2]
    assert not math.isfinite(got[2][what])


def test_a_reward_models_nan_score_stops_the_run_naming_its_prompt(
        setup, tmp_path, monkeypatch, capsys):
    """A reward model's NaN score ended the run as a divergence, asking for a lower lr: it is
    the reward's, named with its prompt, and its step's row is not logged."""
    _, args, straight = setup
    out = tmp_path / "run"
    break_at(monkeypatch, 3, "reward")
    assert main([*ppo_cli(args, out, save_every=1), "--steps", str(STEPS)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"\n[^\n]*prompts\.jsonl:\d+, field 'reward_fn': step 3: the score the "
                     rf"reward function {__name__}:varied_reward gave the response to prompt id "
                     r"t\d+ \(nan\)( \(less the missing-EOS penalty 1\))? is not a number\n$",
                     err), err
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-1", "step-2"]
    assert (ckpts / "step-2" / "model.safetensors").read_bytes() == \
        (straight / "checkpoints" / "step-2" / "model.safetensors").read_bytes()
    assert not (out / "config.json").exists()
    assert rows(out) == rows(straight)[:2]


def test_a_step_whose_logged_statistics_only_are_nan_goes_on(setup, tmp_path, monkeypatch):
    # The entropy is only logged: a NaN of it leaves the weights as they are, and the run on.
    _, args, straight = setup
    out = tmp_path / "run"
    break_at(monkeypatch, 3, "entropy")
    assert main([*ppo_cli(args, out), "--steps", str(STEPS)]) == 0
    got = rows(out)
    assert [math.isnan(r["entropy"]) for r in got] == [False, False, True, True]
    assert [{k: v for k, v in r.items() if k != "entropy"} for r in got] == \
        [{k: v for k, v in r.items() if k != "entropy"} for r in rows(straight)]
    a, b = (load_model(run)[0].state_dict() for run in (straight, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_needs_a_checkpoint_and_the_same_settings(setup, tmp_path, monkeypatch):
    d, _, _ = setup
    cfg = PPOConfig(policy=str(d / "policy"), prompts=str(d / "prompts.jsonl"),
                    out=str(tmp_path / "run"), steps=1, batch_size=4, minibatch_size=4,
                    ppo_epochs=1, max_new_tokens=4, save_every=1, device="cpu")
    with pytest.raises(UserError, match="nothing to resume") as err:
        ppo(dataclasses.replace(cfg, resume=True), reward_fn=varied_reward)
    assert str(tmp_path / "run" / "checkpoints") in str(err.value)
    ppo(cfg, reward_fn=varied_reward)
    with pytest.raises(UserError, match="field 'batch_size': was written with other settings "
                                        r"\(batch_size: 4 there, 8 now\)"):
        ppo(dataclasses.replace(cfg, resume=True, steps=2, batch_size=8), reward_fn=varied_reward)
    with pytest.raises(UserError, match="field 'seed'"):
        ppo(dataclasses.replace(cfg, resume=True, seed=1), reward_fn=varied_reward)
    # Another reward: a function given in Python is named; a reward model is a setting.
    with pytest.raises(UserError, match="field 'reward_fn': was written with another reward "
                                        f"function \\('{__name__}:varied_reward' there, "
                                        f"'{__name__}:stopping_reward' now\\); resume with "
                                        "the same one"):
        ppo(dataclasses.replace(cfg, resume=True, steps=2), reward_fn=stopping_reward)
    policy, tok, _ = load_model(d / "policy")
    save_model(tmp_path / "rm", ScalarHeadModel.from_gpt(policy), tok)
    with pytest.raises(UserError, match="field 'reward': was written with other settings "
                                        r"\(reward: None there, "):
        ppo(dataclasses.replace(cfg, resume=True, steps=2, reward=str(tmp_path / "rm")))
    # Where to stop, how often to save and the device may change.
    ppo(dataclasses.replace(cfg, resume=True, steps=2, save_every=1), reward_fn=varied_reward)
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2]
    # ... but not to before the run's own step.
    with pytest.raises(UserError, match="field 'steps': the run is at step 2 already; give "
                                        "steps \\(--steps\\) of at least that to continue it"):
        ppo(dataclasses.replace(cfg, resume=True, steps=1), reward_fn=varied_reward)
    # The same files spelled another way, from where the resume runs, are the same settings.
    monkeypatch.chdir(d)
    ppo(dataclasses.replace(cfg, resume=True, steps=3, policy="policy", prompts="prompts.jsonl"),
        reward_fn=varied_reward)
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3]
    # A run directory inside the pretraining text's directory would read itself as text.
    with pytest.raises(UserError, match="field 'out': is inside the corpus directory"):
        ppo(dataclasses.replace(cfg, out=str(d / "run"), ptx_data=[str(d)], ptx_coef=0.1),
            reward_fn=varied_reward)
    assert not (d / "run").exists()


def test_the_pipeline_resumes_a_ppo_stage_with_a_checkpoint(tmp_path):
    pipe = Pipeline(PipelineConfig(out=str(tmp_path)))
    out = tmp_path / "round-1" / "ppo"
    args = (tmp_path / "sft", tmp_path / "sft", out, 2, 0)
    assert not pipe.ppo_config(*args).resume
    torch.manual_seed(0)
    Checkpointer(out).save(1, GPT(get_preset("tiny")))
    assert pipe.ppo_config(*args).resume


# --- bad input: exit code 2, a message naming the field, nothing new in --out -------------------

def raising_reward(prompts, responses, records):
    raise RuntimeError("boom from reward fn")


def ppo_args(d, out, *args):
    return ["ppo", "--policy", str(d / "policy"), "--prompts", str(d / "prompts.jsonl"),
            "--reward-fn", f"{__name__}:varied_reward", "--steps", "1", "--batch-size", "2",
            "--minibatch-size", "2", "--max-new-tokens", "4", "--device", "cpu", "--out",
            str(out), *args]


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "field '--steps': must be >= 1, got 0"),
    (["--steps", "-1"], "field '--steps': must be >= 1, got -1"),
    (["--batch-size", "0"], "field '--batch-size': must be >= 1, got 0"),
    (["--minibatch-size", "0"], "field '--minibatch-size': must be >= 1, got 0"),
    (["--minibatch-size", "4"], "field '--minibatch-size': must be <= batch_size (2), got 4"),
    (["--ppo-epochs", "0"], "field '--ppo-epochs': must be >= 1, got 0"),
    (["--lr", "-1"], "field '--lr': must be > 0, got -1.0"),
    (["--lr", "inf"], "field '--lr': must be a finite number, got inf"),
    (["--warmup-steps", "-1"], "field '--warmup-steps': must be >= 0, got -1"),
    (["--weight-decay", "-1"], "field '--weight-decay': must be >= 0, got -1.0"),
    (["--grad-clip", "-1"], "field '--grad-clip': must be >= 0 (0: no clipping), got -1.0"),
    (["--kl-coef", "-1"], "field '--kl-coef': must be >= 0, got -1.0"),
    (["--kl-estimator", "k9"], "field '--kl-estimator': must be one of k1, k3, got k9"),
    (["--adaptive-kl", "--target-kl", "0"], "field '--target-kl': must be > 0 with adaptive_kl, "
                                            "got 0.0"),
    (["--adaptive-kl", "--kl-coef", "0"], "field '--kl-coef': must be > 0 with adaptive_kl (the "
                                          "controller scales it), got 0.0"),
    (["--kl-horizon", "0"], "field '--kl-horizon': must be >= 1, got 0"),
    (["--clip", "0"], "field '--clip': must be > 0, got 0.0"),
    (["--value-clip", "-0.2"], "field '--value-clip': must be > 0, got -0.2"),
    (["--vf-coef", "-1"], "field '--vf-coef': must be >= 0, got -1.0"),
    (["--gae-gamma", "1.5"], "field '--gae-gamma': must be in [0, 1], got 1.5"),
    (["--gae-lambda", "-0.1"], "field '--gae-lambda': must be in [0, 1], got -0.1"),
    (["--temperature", "0"], "field '--temperature': must be >= 0.01, got 0.0"),
    # Below it logits / T overflows: NaN entropy, and a NaN gradient where T rounds to 0.
    (["--temperature", "1e-50"], "field '--temperature': must be >= 0.01, got 1e-50"),
    (["--temperature", "nan"], "field '--temperature': must be a finite number, got nan"),
    (["--max-new-tokens", "0"], "field '--max-new-tokens': must be >= 1, got 0"),
    (["--max-new-tokens", "-2"], "field '--max-new-tokens': must be >= 1, got -2"),
    (["--max-new-tokens", "64"], "field '--max-new-tokens': must be below the policy's context "
                                 "of 64, got 64"),
    (["--missing-eos-penalty", "inf"], "field '--missing-eos-penalty': must be a finite number, "
                                       "got inf"),
    # A negative penalty was taken: a bonus for the responses that never end.
    (["--missing-eos-penalty", "-1"], "field '--missing-eos-penalty': must be >= 0, got -1.0"),
    (["--ptx-coef", "-0.1"], "field '--ptx-coef': must be >= 0, got -0.1"),
    (["--ptx-batch-size", "0"], "field '--ptx-batch-size': must be >= 1, got 0"),
    (["--ptx-block-size", "0"], "field '--ptx-block-size': must be >= 1, got 0"),
    (["--save-every", "-1"], "field '--save-every': must be >= 0, got -1"),
    (["--device", "nope"], "field '--device': unknown device 'nope'"),
    (["--reward-fn", "syntaxmod:f"], "field '--reward-fn': cannot load 'syntaxmod:f': importing "
                                     "syntaxmod failed with SyntaxError: invalid syntax"),
    (["--reward-fn", ":f"], "field '--reward-fn': ':f' should look like module:function"),
    (["--reward-fn", "varied_reward"], "field '--reward-fn': 'varied_reward' should look like "
                                       "module:function"),
    (["--reward-fn", "syntaxfree:nope"], "field '--reward-fn': cannot load 'syntaxfree:nope': "
                                         "module syntaxfree has no 'nope'"),
    (["--reward-fn", "syntaxfree:x"], "field '--reward-fn': cannot load 'syntaxfree:x': x is not "
                                      "callable"),
    (["--reward-fn", "syntaxfree:boom"], "field '--reward-fn': the reward function "
                                         "syntaxfree:boom raised RuntimeError: boom from "
                                         "reward fn"),
    (["--reward-fn", "syntaxfree:short"], "field '--reward-fn': the reward function "
                                          "syntaxfree:short returned 1 score for 2 responses"),
    (["--reward-fn", "syntaxfree:quits"], "field '--reward-fn': the reward function "
                                          "syntaxfree:quits raised SystemExit: 0"),
    # A message of several lines is one line of the error (it split the error's line).
    (["--reward-fn", "syntaxfree:lines"], "field '--reward-fn': the reward function "
                                          "syntaxfree:lines raised ValueError: no answer for "
                                          "the question\n"),
])
def test_impossible_settings_fail_before_anything_is_written(setup, tmp_path, monkeypatch,
                                                             capsys, args, message):
    d, _, _ = setup
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "syntaxmod.py").write_text("def f(:\n")
    (mods / "syntaxfree.py").write_text(
        "def boom(p, r, rec):\n    raise RuntimeError('boom from reward fn')\n\n"
        "def short(p, r, rec):\n    return [1.0]\n\n"
        "def quits(p, r, rec):\n    raise SystemExit(0)\n\n"
        "def lines(p, r, rec):\n    raise ValueError('no answer\\nfor the question')\n\n"
        "def huge(p, r, rec):\n    return [10 ** 400] * len(r)\n\nx = 3\n")
    monkeypatch.syspath_prepend(str(mods))
    out = tmp_path / "run"
    assert main(ppo_args(d, out, *args)) == 2
    assert f"gptlab ppo: error: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_a_reward_no_float_holds_is_a_clear_error(setup, tmp_path, monkeypatch, capsys):
    """An integer score past float's range (10 ** 400) was an OverflowError traceback, exit 1."""
    d, _, _ = setup
    (tmp_path / "hugemod.py").write_text("def huge(p, r, rec):\n    return [10 ** 400] * len(r)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(ppo_args(d, out, "--reward-fn", "hugemod:huge")) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptlab ppo: error: ") and err.count("\n") == 1
    assert re.search(r"prompts\.jsonl:\d+, field 'reward_fn': the reward function hugemod:huge "
                     r"returned an integer of 401 digits for prompt id \S+, too large for a "
                     r"score \(a float\)\n$", err), err
    assert not out.exists()


def test_a_reward_no_float32_holds_is_a_clear_error(setup, tmp_path, monkeypatch, capsys):
    """1e39 is a finite float, and was taken: the float32 rewards made it infinite."""
    d, _, _ = setup
    (tmp_path / "bigmod.py").write_text("def big(p, r, rec):\n    return [-1e39] * len(r)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(ppo_args(d, out, "--reward-fn", "bigmod:big")) == 2
    err = capsys.readouterr().err
    assert re.search(r"prompts\.jsonl:\d+, field 'reward_fn': the reward function bigmod:big "
                     r"returned a score \(-1e\+39\) for prompt id \S+ beyond the ±1e\+15 a "
                     r"score may reach \(PPO squares rewards in float32, in the value loss and "
                     r"the advantages' whitening\)\n$", err), err
    assert not out.exists()
    assert ppo_module.reward_number(1e15, "m:f") == 1e15  # the bound itself is taken


def test_no_prompt_that_fits_is_a_clear_error_that_leaves_nothing(setup, tmp_path, capsys):
    d, _, _ = setup
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "cat " * 80}) + "\n")
    out = tmp_path / "run"
    args = ppo_args(d, out)
    args[args.index("--prompts") + 1] = str(prompts)
    assert main(args) == 2
    assert (f"{prompts}: the prompt does not fit the policy's context of 64 "
            "tokens with max_new_tokens 4; use shorter prompts or a smaller max_new_tokens "
            "(--max-new-tokens)" in capsys.readouterr().err)
    assert not out.exists()


def test_a_step_that_draws_only_prompts_too_long_draws_again(setup, tmp_path, capsys):
    # It stopped the run mid-way (exit 2), leaving run.json and metrics.jsonl but no model
    # and no checkpoint.
    d, _, _ = setup
    prompts = tmp_path / "mixed.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n"
                               for p in ["cat", "cat " * 80, "cat " * 80, "cat " * 80]))
    out = tmp_path / "run"
    args = ppo_args(d, out, "--steps", "6", "--batch-size", "1", "--minibatch-size", "1",
                    "--seed", "2", "--save-every", "3")  # steps 1 to 3 draw the short prompt,
    args[args.index("--prompts") + 1] = str(prompts)       # step 4 a long one
    assert main(args) == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
    # The count is of prompts, each once, not of the draws that met them (there were more).
    skipped = json.loads((out / "config.json").read_text())["skipped"]
    assert skipped == {"prompts longer than the context minus max_new_tokens": 3}
    assert ("skipped 3 prompts: 3 prompts longer than the context minus max_new_tokens"
            in capsys.readouterr().err)
    args[args.index("--steps") + 1] = "8"
    assert main([*args, "--resume"]) == 0  # a resume counts them again, not on top
    assert json.loads((out / "config.json").read_text())["skipped"] == skipped


def test_a_reward_model_with_a_shorter_context_bounds_prompt_and_response(setup, tmp_path,
                                                                         capsys):
    # The reward and value models read every prompt and response too: a reward model of 32
    # positions under a policy of 64 failed mid-run with an error from inside the model.
    from gptlab.model.heads import ScalarHeadModel
    d, _, _ = setup
    policy, tok, _ = load_model(d / "policy")
    torch.manual_seed(0)
    short = dataclasses.replace(policy.config, context=32)
    save_model(tmp_path / "rm", ScalarHeadModel(short), tok)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "cat " * 36}) + "\n")
    assert len(tok.encode("cat " * 36)) > 28  # fits the policy's 64, not the reward model's 32

    def run(out, *extra):
        args = ppo_args(d, out, *extra)
        i = args.index("--reward-fn")
        args[i:i + 2] = ["--reward", str(tmp_path / "rm")]
        args[args.index("--prompts") + 1] = str(prompts)
        return main(args)
    assert run(tmp_path / "a", "--max-new-tokens", "40") == 2
    assert ("field '--max-new-tokens': must be below the reward model's context of 32, got 40"
            in capsys.readouterr().err)
    assert run(tmp_path / "b") == 2
    assert ("the prompt does not fit the reward model's context of 32 tokens "
            "with max_new_tokens 4" in capsys.readouterr().err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # The reference reads them too (its crash was a ValueError from inside the model).
    save_model(tmp_path / "ref", GPT(short), tok)
    args = ppo_args(d, tmp_path / "c", "--reference", str(tmp_path / "ref"))
    args[args.index("--prompts") + 1] = str(prompts)
    assert main(args) == 2
    assert ("the prompt does not fit the reference's context of 32 tokens"
            in capsys.readouterr().err)
    assert not (tmp_path / "c").exists()


def test_a_finished_run_or_an_input_model_is_never_overwritten(setup, tmp_path, capsys):
    d, _, _ = setup
    out = tmp_path / "run"
    assert main(ppo_args(d, out)) == 0                     # save_every 0: no checkpoint
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(ppo_args(d, out)) == 2
    assert (f"{out}, field '--out': already holds a finished model and no checkpoint to continue "
            "from; choose another out (--out); a run saved with save_every (--save-every) "
            "continues with resume (--resume)"
            in capsys.readouterr().err)
    assert main(ppo_args(d, out, "--resume")) == 2
    assert "field '--resume': nothing to resume" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files
    policy, other = d / "policy", tmp_path / "other"
    shutil.copytree(policy, other)
    before = {p: p.stat().st_mtime_ns for p in [*policy.rglob("*"), *other.rglob("*")]}
    assert main(ppo_args(d, policy / "ppo")) == 2
    assert (f"{policy / 'ppo'}, field '--out': is inside the input model {policy} (policy, "
            "--policy); choose another out (--out)") in capsys.readouterr().err
    for flag in ("--reference", "--value"):
        assert main([*ppo_args(d, other), flag, str(other)]) == 2
        assert (f"{other}, field '--out': is the input model ({flag[2:]}, {flag}); training would "
                "overwrite it; choose another out (--out)") in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in [*policy.rglob("*"), *other.rglob("*")]} == before


@pytest.mark.parametrize("flag", ["--reference", "--value"])
@pytest.mark.parametrize("vocab", [300, 280])
def test_a_reference_or_value_model_with_another_tokenizer_is_refused(setup, tmp_path, capsys,
                                                                      flag, vocab):
    # Like --reward: one the same size read the policy's ids as other tokens (KL 83, exit 0);
    # a smaller one crashed with an IndexError inside the embedding.
    from gptlab.model.heads import ScalarHeadModel
    d, _, _ = setup
    policy = load_model(d / "policy")[0]
    words = [a + b + c for a in "qzxj" for b in "aeiou" for c in "vwkp"]
    tok = train_tokenizer([" ".join(words * 20)], vocab_size=vocab)
    assert tok.vocab_size == vocab
    torch.manual_seed(0)
    config = dataclasses.replace(policy.config, vocab_size=vocab)
    model = GPT(config) if flag == "--reference" else ScalarHeadModel(config)
    save_model(tmp_path / "other", model, tok)
    out = tmp_path / "run"
    assert main([*ppo_args(d, out), flag, str(tmp_path / "other")]) == 2
    what = "reference" if flag == "--reference" else "value"
    assert (f"{tmp_path / 'other'}, field '{flag}': the {what} model's tokenizer is not the "
            f"policy's" in capsys.readouterr().err)
    assert not out.exists()


def test_a_policy_or_reward_model_of_the_wrong_kind_names_its_flag(setup, tmp_path, capsys):
    # The errors named field 'model', which ppo has no flag for, and no field at all.
    from gptlab.model.heads import ScalarHeadModel
    d, _, _ = setup
    policy, tok, _ = load_model(d / "policy")
    save_model(tmp_path / "rm", ScalarHeadModel(policy.config), tok)
    out = tmp_path / "run"
    args = ppo_args(d, out)
    args[args.index("--policy") + 1] = str(tmp_path / "rm")
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"gptlab ppo: error: {tmp_path / 'rm'}, field '--policy': not a decoder-only language "
        f"model: this is a reward or value model, which has no text to say; give the SFT model "
        f"the policy starts from (the pipeline's OUT/sft), and this one as --reward (a value "
        f"model as --value)\n")
    args = ppo_args(d, out)
    i = args.index("--reward-fn")
    args[i:i + 2] = ["--reward", str(d / "policy")]
    assert main(args) == 2
    assert (f"{d / 'policy'}, field '--reward': not a reward model" in capsys.readouterr().err)
    assert not out.exists()


def test_a_ptx_corpus_smaller_than_a_block_names_ptx_data_and_ptx_block_size(setup, tmp_path,
                                                                              capsys):
    # It named field 'data' and advised lowering block_size, which ppo has neither of.
    d, _, _ = setup
    small = tmp_path / "small.txt"
    small.write_text("Is it? yes\n")
    out = tmp_path / "run"
    assert main(ppo_args(d, out, "--ptx-data", str(small), "--ptx-coef", "0.1",
                         "--ptx-block-size", "16", "--cache-dir", str(tmp_path / "cache"))) == 2
    err = capsys.readouterr().err
    assert f"{small}, field '--ptx-data': the corpus has " in err
    assert "fewer than one training block of 17 (ptx_block_size + 1); add text or lower " \
           "ptx_block_size" in err
    assert not out.exists()


def test_an_empty_ptx_data_path_is_refused_naming_ptx_data(setup, tmp_path, monkeypatch,
                                                            capsys):
    # `--ptx-data ''` (an unset "$CORPUS") is Path(''), the current directory: with --out under
    # it, it was "inside the corpus directory  (--ptx-data)"; elsewhere an empty path of
    # field 'data', a flag ppo does not have.
    d, _, _ = setup
    for cwd, out in ((tmp_path, tmp_path / "run"), (tmp_path / "cwd", tmp_path / "run2")):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        assert main(ppo_args(d, out, "--ptx-data", "", "--ptx-coef", "0.1")) == 2
        assert capsys.readouterr().err == ("gptlab ppo: error: field '--ptx-data': an empty path; "
                                           "name a corpus file or directory\n")
        assert not out.exists()


def test_a_ptx_corpus_given_twice_or_of_two_splits_names_ptx_data(setup, tmp_path, capsys):
    # The corpus's own checks named field 'data', a setting ppo does not have.
    d, _, _ = setup
    for name in ("corpus.txt", "train.txt", "test.txt"):
        (tmp_path / name).write_text("Is it? yes\n")
    for given, says in (
            (["corpus.txt", "corpus.txt"], "is given twice: as {0}corpus.txt and as "
                                           "{0}corpus.txt; its documents would be read twice"),
            (["train.txt", "test.txt"], "gives the files of 2 splits (train, test)")):
        out = tmp_path / "run"
        assert main(ppo_args(d, out, "--ptx-data", *[str(tmp_path / g) for g in given],
                             "--ptx-coef", "0.1", "--cache-dir", str(tmp_path / "cache"))) == 2
        err = capsys.readouterr().err
        assert f"field '--ptx-data': {says.format(str(tmp_path) + '/')}" in err, err
        assert "field 'data'" not in err and not out.exists()


def test_ptx_data_without_a_ptx_coef_says_it_is_unused_and_must_be_there(setup, tmp_path, capsys):
    # Given alone, --ptx-data was silently left unused (ptx_coef defaults to 0).
    d, _, _ = setup
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Is it? yes\n")
    assert main(ppo_args(d, tmp_path / "run", "--ptx-data", str(corpus))) == 0
    assert "note: --ptx-data is not used: --ptx-coef is 0" in capsys.readouterr().err
    assert main(ppo_args(d, tmp_path / "run2")) == 0
    assert "--ptx-data" not in capsys.readouterr().err
    # Unread, a path mistyped was only that note, and the run went on: it is refused as any
    # input not found, before anything loads or is written.
    assert main(ppo_args(d, tmp_path / "run3", "--ptx-data", str(tmp_path / "corpus.text"))) == 2
    assert capsys.readouterr().err == (f"gptlab ppo: error: {tmp_path / 'corpus.text'}, field "
                                       f"'--ptx-data': corpus file not found\n")
    assert not (tmp_path / "run3").exists()


@pytest.mark.parametrize("flag,message", [
    # A reward model's directory as --reference ran a rollout and the reward function, then
    # crashed with an AttributeError inside the KL computation.
    ("--reference", "not a decoder-only language model: this is a reward or value model; the "
                    "reference must be one (the KL is measured against its log-probabilities): "
                    "give the SFT model the policy started from (the pipeline's OUT/sft; "
                    "without --reference, a copy of --policy is the reference), and this one as "
                    "--reward (a value model as --value)\n"),
    ("--value", "the value model must be a scalar-head model"),
])
def test_a_reference_or_value_model_of_the_wrong_kind_is_refused(setup, tmp_path, capsys, flag,
                                                                 message):
    from gptlab.model.heads import ScalarHeadModel
    d, _, _ = setup
    policy, tok, _ = load_model(d / "policy")
    torch.manual_seed(0)
    wrong = ScalarHeadModel(policy.config) if flag == "--reference" else policy
    save_model(tmp_path / "wrong", wrong, tok)
    out = tmp_path / "run"
    assert main(ppo_args(d, out, flag, str(tmp_path / "wrong"))) == 2
    assert (f"{tmp_path / 'wrong'}, field '{flag}': {message}"
            in capsys.readouterr().err)
    assert not out.exists()


SEEN = []  # counting_reward's batch sizes


def counting_reward(prompts, responses, records):
    SEEN.append(len(responses))
    return varied_reward(prompts, responses, records)


def test_a_batch_size_above_the_prompts_that_fit_is_said_not_silently_cut(setup, tmp_path,
                                                                          capsys):
    # A user's own small prompts file with the default --batch-size 32 gave rollouts of all its
    # prompts, no more, without a word: the batch asked for was not the batch trained on.
    d, _, _ = setup
    prompts = tmp_path / "few.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n"
                               for p in ["cat", "dog", "cat " * 80, "bird"]))
    out = tmp_path / "run"
    args = ppo_args(d, out, "--steps", "2", "--batch-size", "8")
    args[args.index("--prompts") + 1] = str(prompts)
    args[args.index("--reward-fn") + 1] = f"{__name__}:counting_reward"
    SEEN.clear()
    assert main(args) == 0
    assert SEEN == [3, 3]
    assert (f"note: {prompts} has 3 prompts that fit, fewer than --batch-size 8: a "
            "rollout holds at most those 3" in capsys.readouterr().err)


# --- PPO's value model: a scalar head as a reward model's, never taken for one ------------------

def strip_value_marks(run):
    """`run` as PPO wrote it before value/ said `"stage": "value"`: each value/config.json
    without it, each checkpoint's manifest matching (an old run's checkpoints verify)."""
    for cfg in run.rglob("config.json"):
        meta = json.loads(cfg.read_text())
        if meta.get("stage") != "value":
            continue
        del meta["stage"]
        cfg.write_text(json.dumps(meta))
        manifest = cfg.parent.parent / "manifest.json"
        if manifest.exists():
            m = json.loads(manifest.read_text())
            m["sha256"]["value/config.json"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
            manifest.write_text(json.dumps(m))
    return run


def reward_args(d, out, reward, *args):
    """ppo_args with `--reward reward` in place of the reward function."""
    argv = ppo_args(d, out, *args)
    i = argv.index("--reward-fn")
    argv[i:i + 2] = ["--reward", str(reward)]
    return argv


@pytest.mark.parametrize("where", ["value", "checkpoints/step-2/value", "old/value",
                                   "old/checkpoints/step-2/value"])
def test_a_ppo_value_model_given_as_the_reward_model_is_refused(setup, tmp_path, capsys, where):
    # It was taken without a word: at step 0 a copy of the reward model, once trained it
    # predicts returns. "old/": a run written before value/ was marked, its value/ found as
    # PPO writes it, beside a PPO policy.
    d, _, straight = setup
    if where.startswith("old/"):
        strip_value_marks(shutil.copytree(straight, tmp_path / "old"))
        value = tmp_path / where
        assert "stage" not in json.loads((value / "config.json").read_text())
    else:
        value = straight / where
        assert json.loads((value / "config.json").read_text())["stage"] == "value"
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(reward_args(d, out, value)) == 2
    assert capsys.readouterr().err == (
        f"gptlab ppo: error: {value}, field '--reward': is PPO's value model, not a reward model: "
        f"trained, it predicts returns, not rewards; give the reward model's directory (the "
        f"pipeline's round-N/reward), and this one as --value to start the value model from "
        f"it\n")
    assert not out.exists()


def test_an_old_value_model_moved_away_from_its_run_is_taken_as_a_reward_model(setup, tmp_path):
    # Without the mark and outside PPO's layout nothing tells it from a reward model: it is
    # taken, as it always was.
    d, _, straight = setup
    old = strip_value_marks(shutil.copytree(straight / "value", tmp_path / "scorer"))
    assert "stage" not in json.loads((old / "config.json").read_text())
    assert main(reward_args(d, tmp_path / "run", old)) == 0


@pytest.mark.parametrize("flag", ["--reference", "--policy"])
@pytest.mark.parametrize("where", ["value", "old/checkpoints/step-2/value"])
def test_a_ppo_value_model_given_as_reference_or_policy_is_named_with_its_flag(
        setup, tmp_path, capsys, flag, where):
    # --reference said "is a ScalarHeadModel, not a decoder-only language model", naming a class
    # and no flag; --policy named what it is but not what to give instead. "old/": a run
    # written before value/ was marked.
    d, _, straight = setup
    if where.startswith("old/"):
        strip_value_marks(shutil.copytree(straight, tmp_path / "old"))
    value = (tmp_path if where.startswith("old/") else straight) / where
    out = tmp_path / "run"
    args = ppo_args(d, out)
    if flag == "--policy":
        args[args.index("--policy") + 1] = str(value)
        said = (", which has no text to say; give the SFT model the policy starts from (the "
                "pipeline's OUT/sft)")
    else:
        args += ["--reference", str(value)]
        said = ("; the reference must be one (the KL is measured against its log-probabilities): "
                "give the SFT model the policy started from (the pipeline's OUT/sft; without "
                "--reference, a copy of --policy is the reference)")
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"gptlab ppo: error: {value}, field '{flag}': not a decoder-only language model: "
        f"this is PPO's value model{said}, and this one as --value to start the value model "
        f"from it\n")
    assert not out.exists()


@pytest.mark.parametrize("marked", [True, False])
def test_value_and_resume_still_take_a_value_model_marked_or_not(setup, tmp_path, marked):
    d, args, straight = setup
    run = shutil.copytree(straight, tmp_path / "run")
    if not marked:
        strip_value_marks(run)
        assert not any("stage" in json.loads(p.read_text())
                       for p in run.rglob("value/config.json"))
    saved = load_model(straight / "value")[0].state_dict()
    cfg = PPOConfig(policy=str(d / "policy"), prompts=str(d / "prompts.jsonl"),
                    out=str(tmp_path / "started"), reward_fn=f"{__name__}:varied_reward",
                    value=str(run / "value"), device="cpu", max_new_tokens=4)
    started = ppo_module.PPOTrainer(cfg).value_model.state_dict()
    assert all(torch.equal(started[k], saved[k]) for k in saved)
    # The run resumed from its step-2 (step-4 lost), the value model's weights read from it.
    shutil.rmtree(run / "checkpoints" / "step-4")
    assert main([*ppo_cli(args, run), "--steps", str(STEPS), "--resume"]) == 0
    assert_same_run(straight, run)
    assert json.loads((run / "value" / "config.json").read_text())["stage"] == "value"


def test_a_resume_from_a_step_of_an_earlier_line_restores_that_lines_metrics_rows(setup):
    """A run saved at every step; a line forked from its step-1 then died in step 3, leaving its
    own rows 2 and 3 in metrics.jsonl (the first line's 2 to 4 gone). Resumed from step-2, the
    first line's, the run ends as the one that never forked: step-2 keeps its line's rows and
    the resume puts them back. Saved without them, or rewound to metrics.jsonl's rows up to the
    step, the abandoned line's row 2 stayed (mutation testing: each passed every test)."""
    d, args, straight = setup
    out = d / "forked"
    common = ppo_cli(args, out, save_every=1)
    assert main([*common, "--steps", str(STEPS)]) == 0
    first = read_metrics(out / "metrics.jsonl")
    abandoned = [{**r, "reward": -1.0 - r["step"]} for r in first[1:3]]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                               for r in first[:1] + abandoned))
    assert main([*common, "--steps", str(STEPS), "--resume-from", "step-2"]) == 0
    assert_same_run(straight, out)
