"""The whole recipe end to end at toy sizes: every stage runs, the report has every number,
and rerunning the same command reuses the finished stages."""
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.errors import UserError
from gptlab.eval.stats import clustered_rate, excludes_zero, paired_delta, sign_test, t_975

ARGS = ["--pretrain-steps", "4", "--pretrain-batch", "4", "--sft-steps", "4",
        "--sft-eval-every", "2", "--sft-exec-eval", "8", "--sample-prompts", "12", "--k", "3",
        "--reward-epochs", "1", "--ppo-steps", "2", "--ppo-batch", "8", "--ppo-minibatch", "4",
        "--max-new-tokens", "24", "--eval-limit", "24", "--rounds", "2",
        "--no-ties"]  # 4 SFT steps answer with errors only: tied, nothing would be ranked


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run made as `make demo` makes one: --out relative to where it starts."""
    base, here = tmp_path_factory.mktemp("pipeline"), os.getcwd()
    os.chdir(base)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            assert main(["pipeline", "--out", "runs/demo", *ARGS, "--threads", "1"]) == 0
    finally:
        os.chdir(here)
    (base / "stdout.txt").write_text(stdout.getvalue())
    # Later tests rerun the pipeline into it with an absolute --out: the report as first made
    # is kept aside for the tests of what a relative --out gives.
    shutil.copy(base / "runs" / "demo" / "report.md", base / "report_as_made.md")
    return base / "runs" / "demo"


def test_stdout_holds_the_report_s_path_alone(run):
    # The evaluation's lines ("  sft: exec_acc 0.742") went to stdout before the path, so
    # `REPORT=$(gptlab pipeline ...)` held them too; they go to stderr, as every verb's do.
    assert (run.parent.parent / "stdout.txt").read_text() == "runs/demo/report.md\n"


def test_every_stage_leaves_its_directory(run):
    for stage in ("world/world.json", "pretrain/model.safetensors", "sft/model.safetensors",
                  "round-1/samples.jsonl", "round-1/rankings.jsonl",
                  "round-1/reward/model.safetensors", "round-1/ppo/model.safetensors",
                  "round-2/rankings_all.jsonl", "round-2/ppo/value/model.safetensors",
                  "sft_continued/model.safetensors", "eval/answers.jsonl",
                  "report.md", "report.html", "report.json"):
        assert (run / stage).exists(), stage
    # Round 2's reward model is trained on both rounds' rankings.
    n1 = sum(1 for _ in open(run / "round-1" / "rankings.jsonl"))
    n2 = sum(1 for _ in open(run / "round-2" / "rankings_all.jsonl"))
    assert n2 > n1


def test_report_has_every_number(run):
    r = json.loads((run / "report.json").read_text())
    for key in ("sft", "sft_continued", "ppo", "ppo_round_1", "ppo_round_2", "pretrained"):
        assert 0.0 <= r["exec_acc"][key] <= 1.0
        assert key in r["exec_acc_unseen_phrasing"]
    for key in ("delta_ppo_vs_sft", "delta_ppo_vs_sft_continued"):
        lo, hi = r[key]["ci95"]
        assert lo <= r[key]["mean"] <= hi
    assert 0.0 <= r["rm_pairwise_acc"] <= 1.0 and len(r["rm_pairwise_acc_per_round"]) == 2
    assert all(isinstance(n, int) and n >= 1 for n in r["rm_heldout_rankings_per_round"])
    assert all(0.0 <= a <= 1.0 for a in r["rm_pairwise_acc_labelers_per_round"])
    for a, n, ci in zip(r["rm_pairwise_acc_per_round"], r["rm_heldout_rankings_per_round"],
                        r["rm_pairwise_acc_ci95_per_round"]):
        assert ci is None if n < 2 else 0.0 <= ci[0] <= a <= ci[1] <= 1.0
    assert 0.0 <= r["win_rate_ppo_vs_sft"] <= 1.0
    assert math.isfinite(r["kl_ppo_vs_sft"])
    assert r["ptx"]["corpus_ppl_sft"] > 1 and r["ptx"]["corpus_ppl_ppo"] > 1
    assert r["n_test"] == 24 and r["minutes"] > 0
    # The stages' minutes as measured (kept in stage_minutes.json), not rounded before the
    # report rounds them again.
    assert r["stage_minutes"] == json.loads((run / "stage_minutes.json").read_text())


def test_the_pretrained_model_s_corpus_perplexity_is_measured_on_the_blocks_of_sft_s_and_ppo_s(
        run):
    """ptx.corpus_ppl_pretrained, the reference for what SFT forgot and PPO-ptx brought back,
    is the pretrained model's perplexity on the very validation blocks SFT's and PPO's are of
    (the report gave only those two)."""
    from gptlab.checkpoint import load_model
    from gptlab.data.tokens import load_token_data
    from gptlab.eval.report import fmt_significant
    from gptlab.eval.pipeline_eval import corpus_perplexity
    from gptlab.provenance import load_run
    ptx = json.loads((run / "report.json").read_text())["ptx"]
    pc = load_run(run / "pretrain")["config"]
    models = {name: load_model(run / d)[0]
              for name, d in (("pretrained", "pretrain"), ("sft", "sft"), ("ppo", "round-2/ppo"))}
    tok = load_model(run / "sft")[1]
    data = load_token_data(pc["data"], tok, pc["block_size"] or models["sft"].config.context,
                           pc["val_fraction"], pc["seed"], pc["cache_dir"])
    val = data.val_batches(8, 8)
    for name, model in models.items():
        assert ptx[f"corpus_ppl_{name}"] == pytest.approx(corpus_perplexity(model, val),
                                                          rel=1e-6), name
    md = (run / "report.md").read_text()
    assert f"- Pretraining-corpus perplexity, pretrained model: " \
           f"{fmt_significant(ptx['corpus_ppl_pretrained'])}\n- Pretraining-corpus " \
           "perplexity, SFT: " in md


def test_report_counts_answers_that_do_not_run_and_those_right_on_the_test_suite(run):
    """exec_error_rate: the share of each model's answers the checker says do not run, and
    exec_acc_test_suite, recomputed here from the answers the evaluation wrote."""
    from gptlab.world import load_world
    r = json.loads((run / "report.json").read_text())
    world = load_world(run / "world")
    answers = [json.loads(line) for line in open(run / "eval" / "answers.jsonl")]
    for name in ("pretrained", "sft", "sft_continued", "ppo_round_1", "ppo_round_2"):
        kinds = [world.check(a["id"], a[name].strip()).kind for a in answers]
        assert r["exec_error_rate"][name] == pytest.approx(kinds.count("error") / len(kinds))
        assert r["exec_error_rate"][name] + r["exec_acc"][name] <= 1.0
        on_suite = [world.correct_on_test_suite(a["id"], a[name].strip()) for a in answers]
        assert [a[f"{name}_correct_on_test_suite"] for a in answers] == on_suite
        assert r["exec_acc_test_suite"][name] == pytest.approx(sum(on_suite) / len(on_suite))
        assert r["exec_acc_test_suite"][name] <= r["exec_acc"][name]
    assert r["exec_error_rate"]["ppo"] == r["exec_error_rate"]["ppo_round_2"]
    assert r["exec_acc_test_suite"]["ppo"] == r["exec_acc_test_suite"]["ppo_round_2"]
    assert r["test_suite_variants"] == 16


def test_the_control_took_as_many_optimizer_steps_as_ppo(run):
    meta = json.loads((run / "sft_continued" / "config.json").read_text())
    # 2 rounds x 2 PPO steps x 2 epochs x (8 / 4) minibatches
    assert meta["step"] == 16


def test_rerunning_reuses_finished_stages_and_refuses_other_settings(run, capsys, monkeypatch,
                                                                     tmp_path):
    before = (run / "sft" / "model.safetensors").stat().st_mtime_ns
    first = json.loads((run / "report.json").read_text())
    assert first["config"]["threads"] == 1  # every stage ran on one thread
    # From another directory, OUT spelled another way: every stage recorded where its inputs
    # are, not where they were from the directory the run started in.
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    threads = torch.get_num_threads()
    from gptlab.train import pipeline
    monkeypatch.setattr(pipeline, "usable_cpus", lambda: 2)  # two threads on any machine
    assert main(["pipeline", "--out", str(run), *ARGS, "--threads", "2"]) == 0
    assert torch.get_num_threads() == threads != 2  # the caller's setting is back
    assert (run / "sft" / "model.safetensors").stat().st_mtime_ns == before
    # Every reused stage says so (the rounds' sample and label stages said nothing).
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("== ")]
    assert "== round 2: sample (done)" in printed and "== round 2: label (done)" in printed
    assert [line for line in printed if not line.endswith("(done)")] == ["== evaluation"]
    # The reused stages report the minutes they took when they ran, and so does the total.
    again = json.loads((run / "report.json").read_text())
    reused = {k: v for k, v in first["stage_minutes"].items() if k != "evaluation"}
    assert {k: again["stage_minutes"][k] for k in reused} == reused
    assert "round 2: sample" in reused and reused["sft"] > 0 and reused["sft_continued"] > 0
    assert again["minutes"] >= sum(reused.values())
    for key in ("exec_acc", "rm_pairwise_acc_per_round", "rm_heldout_rankings_per_round"):
        assert again[key] == first[key], key
    # Only the evaluation ran now, on two threads; the report says which stage ran on what.
    assert again["config"]["threads"] == {**{k: 1 for k in reused}, "evaluation": 2}
    assert main(["pipeline", "--out", str(run), *ARGS, "--seed", "5"]) == 2
    assert "made with other settings (seed)" in capsys.readouterr().err


def _check_settings(out, **options):
    from gptlab.train.pipeline import Pipeline, PipelineConfig
    pipe = Pipeline(PipelineConfig(out=str(out), **options))
    out.mkdir(exist_ok=True)
    pipe._check_same_run()
    return json.loads((out / "pipeline.json").read_text())


def test_a_rerun_may_change_the_settings_of_stages_that_have_not_started(tmp_path, capsys):
    """A run stopped with "lower --max-new-tokens" or "use --no-ties" can take that advice
    without losing the stages before; a started stage's settings never change under it."""
    out = tmp_path / "demo"
    _check_settings(out)
    (out / "pretrain").mkdir()  # pretraining done: the test prompts are found too long
    assert _check_settings(out, max_new_tokens=40)["max_new_tokens"] == 40
    assert "settings changed for stages that have not run yet: max_new_tokens" in \
        capsys.readouterr().err
    (out / "sft_data.jsonl").write_text("")  # the demonstrations drawn: they need no SFT option
    _check_settings(out, max_new_tokens=40, sft_lr=5e-4)
    with pytest.raises(UserError, match=r"whose sft_data.jsonl was made with other settings "
                                        r"\(sft_examples\)"):
        _check_settings(out, max_new_tokens=40, sft_lr=5e-4, sft_examples=10)
    _check_settings(out, max_new_tokens=40)  # and back: SFT has still not started
    (out / "sft").mkdir()
    with pytest.raises(UserError) as err:
        _check_settings(out, max_new_tokens=60)
    assert str(err.value) == (f"{out}, field 'out': holds a pipeline run whose sft was made with "
                              f"other settings (max_new_tokens); choose another out (--out), or "
                              f"remove it to redo it with the new settings")
    (out / "round-1").mkdir()
    (out / "round-1" / "samples.jsonl").write_text("")  # drawn again until ranked
    _check_settings(out, max_new_tokens=40, ties=False)  # nothing ranked yet
    (out / "round-1" / "rankings.jsonl").write_text("")
    with pytest.raises(UserError, match=r"whose round-1/rankings.jsonl was made with other "
                                        r"settings \(ties\)"):
        _check_settings(out, max_new_tokens=40)
    with pytest.raises(UserError, match=r"whose pretrain, sft_data.jsonl, sft, "
                                        r"round-1/rankings.jsonl were made with other settings "
                                        r"\(seed\)"):
        _check_settings(out, max_new_tokens=40, ties=False, seed=3)
    # The evaluation always runs again; rounds beyond the last are new stages.
    _check_settings(out, max_new_tokens=40, ties=False, eval_limit=10, rounds=3)
    (out / "sft_continued").mkdir()  # the control takes as many steps as all rounds together
    with pytest.raises(UserError, match=r"whose sft_continued was made with other settings "
                                        r"\(rounds\)"):
        _check_settings(out, max_new_tokens=40, ties=False, rounds=2)


def test_a_world_exported_again_is_another_world_and_a_moved_one_the_same(tmp_path):
    world, out = tmp_path / "w", tmp_path / "demo"
    world.mkdir()
    (world / "world.json").write_text('{"format": "gptlab-world/1", "options": {"seed": 3}}')
    _check_settings(out, world=str(world))
    (out / "pretrain").mkdir()
    # Exported again:
    (world / "world.json").write_text('{"format": "gptlab-world/1", "options": {"seed": 5}}')
    with pytest.raises(UserError, match=r"whose pretrain was made with other settings "
                                        r"\(world_digest\)"):
        _check_settings(out, world=str(world))
    (world / "world.json").write_text('{"format": "gptlab-world/1", "options": {"seed": 3}}')
    shutil.copytree(world, tmp_path / "moved")
    assert _check_settings(out, world=str(tmp_path / "moved"))["world"] == str(tmp_path / "moved")
    # A PPO stage stopped after a checkpoint names the world's files by path: it cannot follow.
    from gptlab.checkpoint import Checkpointer
    from gptlab.model import GPT, get_preset
    Checkpointer(out / "round-1" / "ppo").save(1, GPT(get_preset("tiny")))
    moved = re.escape(f"moved (world from {tmp_path / 'moved'}) while round-1/ppo was stopped "
                      f"after a checkpoint")
    with pytest.raises(UserError, match=moved):
        _check_settings(out, world=str(world))
    _check_settings(out, world=str(tmp_path / "moved"))  # where it stopped: it continues


def test_paired_delta_by_hand():
    d = paired_delta([1, 1, 0, 1], [0, 1, 0, 0])  # differences 1, 0, 0, 1
    assert d["mean"] == 0.5
    # sd of (1,0,0,1) = sqrt(1/3); half-width t(3) · sqrt(1/3) / 2, t(3) = 3.182
    assert d["ci95"][1] - 0.5 == pytest.approx(3.182 * (1 / 3) ** 0.5 / 2, abs=1e-3)
    assert not excludes_zero(d)
    assert excludes_zero(paired_delta([1] * 30 + [0] * 2, [0] * 32))
    assert (d["better"], d["worse"]) == (2, 0) and d["p_sign"] == 2 * 1 / 4  # 2 of 2, p = 2·¼


def test_the_sign_test_stays_honest_where_the_normal_interval_does_not():
    # 4 questions of 600 answered right by one model only: the interval excludes 0, yet a
    # 4-0 split happens one time in eight with two equally good models.
    d = paired_delta([1] * 4 + [0] * 596, [0] * 600)
    assert excludes_zero(d) and (d["better"], d["worse"]) == (4, 0)
    assert d["p_sign"] == 2 / 16
    # 6 against 24: 2 · (C(30,0) + ... + C(30,6)) / 2^30
    d = paired_delta([1] * 6 + [0] * 24 + [1] * 10, [0] * 6 + [1] * 24 + [1] * 10)
    tail = sum(math.comb(30, i) for i in range(7))
    assert (d["better"], d["worse"]) == (6, 24) and d["p_sign"] == pytest.approx(2 * tail / 2 ** 30)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0 and sign_test(0, 1) == 1.0


def test_clustered_rate_by_hand():
    # Three prompts: 2 of 3 pairs right, 1 of 1, 0.5 of 2 (a tie counts half); 3.5 of 6.
    r = clustered_rate([(2, 3), (1, 1), (0.5, 2), (0, 0)])
    assert r["mean"] == pytest.approx(3.5 / 6) and r["clusters"] == 3 and r["n"] == 6
    # Three prompts say little: the bootstrap's level is 7e-8 each side, its ends the lowest
    # and highest resample, 0.5 / 2 and 1 / 1; the floor 3.5/6 · w, w = 3 / (3 + 4.303²) =
    # 0.139, is lower: [0.081, 1].
    assert r["ci95"] == pytest.approx([3.5 / 6 * 3 / (3 + t_975(2) ** 2), 1.0])
    assert round(r["ci95"][0], 3) == 0.081
    # One prompt gives no interval; no pairs give no rate.
    assert clustered_rate([(3, 3), (2, 3)])["ci95"][1] == 1.0
    assert clustered_rate([(2, 3)]) == {"mean": 2 / 3, "ci95": None, "clusters": 1, "n": 3}
    assert clustered_rate([])["mean"] is None
    # Every prompt at the same rate: no spread between prompts to resample, yet two prompts say
    # little: the floor, 0.5 ∓ 0.5 · (1 − w), w = 2 / (2 + 12.706²), [0.006, 0.994], where it
    # was [0.5, 0.5].
    w = 2 / (2 + t_975(1) ** 2)
    assert clustered_rate([(1, 2), (2, 4)])["ci95"] == pytest.approx([0.5 * w, 1 - 0.5 * w])
    assert round(0.5 * w, 3) == 0.006


def test_identical_answers_give_an_interval_of_zero_that_does_not_exclude_it():
    d = paired_delta([1, 0, 1], [1, 0, 1])  # every difference 0: the interval is [0, 0]
    assert d["mean"] == 0 and d["ci95"] == [0.0, 0.0]
    assert not excludes_zero(d)
    # Every difference 1 (or −1): no spread, no interval ([1, 1] excluded 0 on two questions).
    assert paired_delta([1, 1], [0, 0])["ci95"] is None
    assert not excludes_zero(paired_delta([1, 1], [0, 0]))
    assert not excludes_zero(paired_delta([0, 0], [1, 1]))


def _run_up_to(run, stages, out):
    """A copy of `run` as it was when `stages` had finished (ties, max_new_tokens: options a
    rerun may change while the stages that depend on them have not started)."""
    out.mkdir()
    shutil.copy(run / "pipeline.json", out)
    for stage in stages:
        (shutil.copytree if (run / stage).is_dir() else shutil.copy)(run / stage, out / stage)
    return out


def test_a_round_with_nothing_ranked_stops_with_a_clear_error(run, tmp_path, capsys):
    # With ties on, a 4-step SFT model's answers (all errors) are all tied: nothing to rank.
    demo = _run_up_to(run, ("world", "pretrain", "sft_data.jsonl", "sft"), tmp_path / "demo")
    args = [a for a in ARGS if a != "--no-ties"]
    assert main(["pipeline", "--out", str(demo), *args]) == 2
    err = capsys.readouterr().err
    assert "note: settings changed for stages that have not run yet: ties" in err
    assert ("round 1: the labelers ranked none of 12 prompts (skipped 12 prompts: 12 prompts "
            "whose responses are all tied)") in err
    assert not (demo / "round-1" / "rankings.jsonl").exists()


def test_test_prompts_without_room_to_answer_stop_the_run_before_sft(run, tmp_path, capsys):
    demo = _run_up_to(run, ("world", "pretrain"), tmp_path / "demo")
    args = [*ARGS, "--max-new-tokens", "320"]  # the last flag wins; the context is 384
    assert main(["pipeline", "--out", str(demo), *args]) == 2
    err = capsys.readouterr().err
    assert "test.jsonl, field 'max_new_tokens': the longest test prompt has " in err
    assert "which leaves no room for 320 new ones in the context of 384" in err
    assert not (demo / "sft").exists()
    (demo / "world" / "test.jsonl").write_text("")  # edited by hand: once a bare max() error
    assert main(["pipeline", "--out", str(demo), *ARGS]) == 2
    assert capsys.readouterr().err.endswith(
        "test.jsonl: has no test questions for the evaluation to answer; export the world "
        "again (gptlab world export)\n")
    assert not (demo / "sft").exists()


def test_headroom_adds_the_execution_reward_control_to_a_finished_run(run, tmp_path):
    # On a copy: the stages it adds would change what a rerun of `run` reports. Hard links
    # suffice, as the pipeline replaces files (write, then rename) and never edits one in place.
    run = Path(shutil.copytree(run, tmp_path / "demo", copy_function=os.link))
    before = (run / "round-2" / "ppo" / "model.safetensors").stat().st_mtime_ns
    assert main(["pipeline", "--out", str(run), *ARGS, "--headroom", "--headroom-k", "2"]) == 0
    assert (run / "round-2" / "ppo" / "model.safetensors").stat().st_mtime_ns == before
    meta = json.loads((run / "ppo_execution_reward" / "config.json").read_text())
    assert meta["ppo_steps"] == 4  # 2 rounds x 2 PPO steps
    r = json.loads((run / "report.json").read_text())
    assert 0.0 <= r["exec_acc"]["ppo_execution_reward"] <= 1.0
    h = r["headroom"]
    assert h["k"] == 2 and h["sft_greedy"] == r["exec_acc"]["sft"]
    assert h["sample_mean"] <= h["pass_at_k"] and h["rm_best_of_k"] <= h["pass_at_k"] <= 1.0
    d = r["delta_ppo_execution_reward_vs_sft"]
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    # The ceiling trained on the test questions' own prompts, and only on those.
    ceiling = run / "ppo_execution_reward_on_test"
    meta = json.loads((ceiling / "config.json").read_text())
    assert meta["ppo_steps"] == 4
    assert json.loads((ceiling / "run.json").read_text())["config"]["prompts"] == str(
        run / "world" / "test.jsonl")
    c = r["delta_ppo_execution_reward_on_test_vs_sft"]
    assert c["ci95"][0] <= c["mean"] <= c["ci95"][1]
    assert c["mean"] == pytest.approx(
        r["exec_acc"]["ppo_execution_reward_on_test"] - r["exec_acc"]["sft"])
    md = (run / "report.md").read_text()
    assert "PPO on the execution reward − SFT" in md and "Best of K = 2" in md
    assert "Ceiling: PPO on the execution reward, trained on the test prompts" in md


def _tree(root):
    """Every path under `root` (links not followed): a file's or link's inode and mtime, for
    what changed; None for a folder (whose mtime a file removed from it changes)."""
    found = {}
    for where, folders, files in os.walk(root):
        for name in folders + files:
            p = Path(where, name)
            st = p.lstat()
            found[str(p.relative_to(root))] = (None if p.is_dir() and not p.is_symlink()
                                               else (st.st_ino, st.st_mtime_ns))
    return found


def test_a_rerun_removes_the_temporaries_killed_writes_left_and_nothing_else(run, tmp_path,
                                                                           capsys):
    # A kill between a file's rename and its temporary's removal, in a stage that then counted
    # as finished, left an empty hidden directory for good: no later write of world.json or a
    # round's ppo/config.json came to remove it, as README said one would.
    import secrets

    from gptlab.io import held_temp, new_temp_dir
    run = Path(shutil.copytree(run, tmp_path / "demo", copy_function=os.link))
    left = [Path(new_temp_dir(run / "world" / "world.json")),
            Path(new_temp_dir(run / "round-1" / "ppo" / "config.json")),
            run / "sft" / f".best.{secrets.token_hex(8)}.tmp"]  # a killed removal's aside
    (left[2] / "sub").mkdir(parents=True)
    (left[2] / "sub" / "model.safetensors").write_bytes(b"weights")
    # What is no killed write's temporary stays: other names, a file or a link of such a name,
    # what a hidden folder holds; and one a live writer holds.
    (run / "world" / ".notes.tmp").mkdir()
    (run / "world" / ".world.json.keep.tmp").mkdir()
    (run / "world" / "world.json.abcdefgh.tmp").mkdir()
    (run / "world" / ".world.json.abcdefgh.tmp.bak").mkdir()
    (run / "round-1" / ".samples.jsonl.abcdefgh.tmp").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (run / "round-1" / ".rankings.jsonl.abcdefgh.tmp").symlink_to(tmp_path / "elsewhere")
    (run / ".mine" / ".x.abcdefgh.tmp").mkdir(parents=True)
    before = _tree(run)
    capsys.readouterr()
    with held_temp(lambda: new_temp_dir(run / "sft" / "config.json")) as held:
        assert main(["pipeline", "--out", str(run), *ARGS]) == 0
    assert held.is_dir()
    held.rmdir()
    err = capsys.readouterr().err
    names = ", ".join(str(p.relative_to(run)) for p in sorted(left))
    assert f"note: removed 3 temporaries that killed writes left in {run}: {names}\n" in err
    after = _tree(run)
    gone = {k for k in before if any(Path(k) == p.relative_to(run) or
                                    p.relative_to(run) in Path(k).parents for p in left)}
    assert len(gone) == 5 and gone.isdisjoint(after) and set(before) - gone <= set(after)
    # What the rerun writes anew: the evaluation (its corpus tokenized where the copy's world
    # lies), the report with its plots, and the run's records.
    anew = ("eval", "cache", "plots")
    assert all(Path(k).parts[0] in anew for k in set(after) - set(before))
    changed = {k for k in set(after) & set(before) if after[k] != before[k]
               and Path(k).parts[0] not in anew}
    assert changed <= {"pipeline.json", "stage_minutes.json", "stage_threads.json",
                       "report.md", "report.html", "report.json"}
    assert all(after[k] == before[k] for k in after if Path(k).parts[0] in (
        "world", "pretrain", "sft", "round-1", "round-2", "sft_continued", ".mine"))


@pytest.mark.parametrize("args,message", [
    (["--preset", "nope"], "field '--preset': unknown preset 'nope'"),
    (["--preset", "transformer-base"], "field '--preset': preset 'transformer-base' is not a "
                                       "decoder-only GPT"),
    (["--rounds", "0"], "field '--rounds': must be >= 1, got 0"),
    (["--threads", "0"], "field '--threads': must be >= 1, got 0"),
    (["--pretrain-lr", "inf"], "field '--pretrain-lr': must be a finite number, got inf"),
    (["--sft-steps", "0"], "field '--sft-steps': must be >= 1, got 0"),
    (["--sft-examples", "-1"], "field '--sft-examples': must be >= 1, got -1"),
    (["--disagreement", "3"], "field '--disagreement': must be in [0, 0.5] (0.5 is a random "
                              "ranking), got 3.0"),
    (["--k", "0"], "field '--k': must be >= 2 (responses to rank per prompt), got 0"),
    (["--k", "1"], "field '--k': must be >= 2 (responses to rank per prompt), got 1"),
    (["--sample-temperature", "-1"], "field '--sample-temperature': must be > 0, got -1.0"),
    (["--reward-epochs", "0"], "field '--reward-epochs': must be > 0, got 0.0"),
    (["--ppo-steps", "-1"], "field '--ppo-steps': must be >= 1, got -1"),
    (["--ppo-minibatch", "64"], "field '--ppo-minibatch': must be in [1, ppo_batch (32)], got 64"),
    (["--kl-coef", "-1"], "field '--kl-coef': must be >= 0, got -1.0"),
    (["--ppo-temperature", "nan"], "field '--ppo-temperature': must be a finite number, got nan"),
    (["--ppo-temperature", "1e-39"], "field '--ppo-temperature': must be >= 0.01, got 1e-39"),
    (["--max-new-tokens", "384"], "field '--max-new-tokens': must be in [1, 384) (the preset's "
                                  "context is 384), got 384"),
    (["--eval-limit", "-1"], "field '--eval-limit': must be >= 1, got -1"),
    (["--demonstrator-flaw", "order", "--demonstrator-flaw-rate", "2"],
     "field '--demonstrator-flaw-rate': must be in [0, 1], got 2.0"),
    (["--world", "nowhere"], "nowhere, field '--world': world directory not found (make one with "
                             "`gptlab world export`)"),
])
def test_bad_options_fail_before_any_stage_runs(tmp_path, capsys, args, message):
    out = tmp_path / "demo"
    assert main(["pipeline", "--out", str(out), *args]) == 2
    assert f"gptlab pipeline: error: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_an_out_under_a_file_fails_before_any_stage_runs(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert main(["pipeline", "--out", str(a_file / "demo")]) == 2
    assert (f"gptlab pipeline: error: {a_file / 'demo'}, field '--out': parent is a file: "
            f"{a_file} is not a directory") in capsys.readouterr().err


@pytest.mark.parametrize("name, damage, says", [
    ("pipeline.json", '{"seed": 0,', "it holds the settings the run's stages were made with"),
    ("pipeline.json", "[]", "it holds the settings the run's stages were made with"),
    ("stage_minutes.json", "3 minutes", "it only records what the stages took"),
    ("stage_threads.json", b"\xff", "it only records what the stages took"),
])
def test_a_damaged_record_of_the_run_is_named_and_left_as_it_is(tmp_path, capsys, name, damage,
                                                                  says):
    out = tmp_path / "demo"
    out.mkdir()
    path = out / name
    (path.write_bytes if isinstance(damage, bytes) else path.write_text)(damage)
    assert main(["pipeline", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"gptlab pipeline: error: {path}: is not the JSON object the pipeline wrote" in err
    assert says in err
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing written, nothing run
    assert (path.read_bytes() if isinstance(damage, bytes) else path.read_text()) == damage


@pytest.mark.parametrize("field, value, says", [
    ("rounds", "2", "must be a number of rounds (an integer >= 1), got '2'"),
    ("rounds", 0, "must be a number of rounds (an integer >= 1), got 0"),
    ("world", 5, "must be the world directory's path (a string) or null, got 5")])
def test_a_setting_of_the_run_s_record_edited_into_another_type_is_named(tmp_path, capsys,
                                                                         field, value, says):
    # "rounds": "2" was a TypeError ('>' between str and int), "world": 5 one in abspath.
    out = tmp_path / "demo"
    out.mkdir()
    path = out / "pipeline.json"
    path.write_text(json.dumps({"seed": 0, field: value}))
    assert main(["pipeline", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"gptlab pipeline: error: {path}, field '{field}': {says}; it holds the settings the "
        f"run's stages were made with: put it back as it was, or choose another out (--out)\n")
    assert sorted(p.name for p in out.iterdir()) == ["pipeline.json"]


def test_stage_settings_name_the_pipeline_option(monkeypatch, tmp_path):
    """A stage's own check, run before any stage, names the option that set the value."""
    from gptlab.errors import UserError
    from gptlab.train import ppo
    from gptlab.train.pipeline import Pipeline, PipelineConfig

    def check(self):
        raise UserError("must be > 0, got 5e-05", field="lr")
    monkeypatch.setattr(ppo.PPOConfig, "check", check)
    with pytest.raises(UserError) as err:
        Pipeline(PipelineConfig(out=str(tmp_path / "demo")))
    assert str(err.value) == ("field 'ppo_lr': gives the ppo stage an impossible lr: must be > 0, "
                              "got 5e-05")
    assert not (tmp_path / "demo").exists()


def test_a_pretrain_lr_that_makes_the_weight_decay_zero_the_weights_names_pretrain_lr(tmp_path):
    # Pretraining's weight decay (0.1) is no pipeline option: the lr is what makes it too large.
    from gptlab.errors import UserError
    from gptlab.train.pipeline import Pipeline, PipelineConfig
    with pytest.raises(UserError) as err:
        Pipeline(PipelineConfig(out=str(tmp_path / "demo"), pretrain_lr=20.0))
    assert str(err.value) == (
        "field 'pretrain_lr': gives the pretrain stage an impossible weight_decay: must be below "
        "1 / lr = 0.05 (AdamW multiplies the weights by 1 - lr x weight_decay each step, which "
        "at 20 x 0.1 zeroes or flips them), got 0.1")
    assert not (tmp_path / "demo").exists()


def test_a_seed_whose_stage_seeds_pass_2_64_is_refused_before_any_stage(tmp_path, capsys):
    # Each stage's seed is derived from --seed (round R's reward model and PPO: seed + R, the
    # execution-reward PPO: seed + 100). Only seed >= 0 was checked: 2**64 - 50 over 60 rounds
    # passed, and round 50's reward model refused its seed hours into the run; 2**64 - 3 was
    # refused naming a seed the user never gave (2**64 + 4, the control's).
    from gptlab.cli import main
    from gptlab.train.pipeline import Pipeline, PipelineConfig
    out = tmp_path / "demo"
    for seed, rounds in ((2**64 - 50, 60), (2**64 - 3, 2), (2**64 - 100, 2), (2**64, 2)):
        with pytest.raises(UserError) as err:
            PipelineConfig(out=str(out), seed=seed, rounds=rounds).check()
        assert str(err.value) == (
            f"field 'seed': must be in [0, {2**64 - 101}] (each stage's seed, up to seed + 100, "
            f"must be below 2**64), got {seed}")
    assert main(["pipeline", "--out", str(out), "--rounds", "150", "--seed", str(2**64 - 150)]) \
        == 2
    assert capsys.readouterr().err == (
        f"gptlab pipeline: error: field '--seed': must be in [0, {2**64 - 151}] "
        f"(each stage's seed, up to seed + 150, must be below 2**64), got {2**64 - 150}\n")
    assert not out.exists()
    # the largest: every stage's seed, the execution-reward PPO's too, is torch's to take
    p = Pipeline(PipelineConfig(out=str(out), seed=2**64 - 101))
    assert p.ppo_config(out, out, out, 1, p.cfg.seed + 100).seed == 2**64 - 1
    from gptlab.train.pipeline import max_seed
    assert max_seed(2) == 2**64 - 101 and max_seed(150) == 2**64 - 151


def test_threads_beyond_the_cores_are_refused_before_out_is_written(monkeypatch, tmp_path,
                                                                    capsys):
    # --threads 10**30 was a traceback (torch's overflow), --threads 100000 a crash of the
    # tokenizer's thread pool, each after OUT/pipeline.json was written.
    from gptlab.cli import main
    from gptlab.train import pipeline
    monkeypatch.setattr(pipeline, "usable_cpus", lambda: 4)
    out = tmp_path / "demo"
    for threads in ("5", "100000", str(10**30)):
        assert main(["pipeline", "--out", str(out), "--threads", threads]) == 2
        assert capsys.readouterr().err == (
            f"gptlab pipeline: error: field '--threads': must be at most 4, the CPU cores this "
            f"process may use, got {threads}\n")
    assert not out.exists()
    pipeline.PipelineConfig(out=str(out), threads=4).check()


def test_a_stage_stopped_after_a_checkpoint_is_resumed(tmp_path):
    import torch
    from gptlab.checkpoint import Checkpointer
    from gptlab.model import GPT, get_preset
    from gptlab.train.pipeline import Pipeline, PipelineConfig
    pipe = Pipeline(PipelineConfig(out=str(tmp_path)))
    configs = {"pretrain": pipe.pretrain_config,
               "sft": lambda: pipe.sft_config(tmp_path / "m", tmp_path / "d"),
               "round-1/reward": lambda: pipe.reward_config(tmp_path / "m", tmp_path / "d", 1),
               "sft_continued": lambda: pipe.sft_continued_config(tmp_path / "m", tmp_path / "d")}
    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    for stage, config in configs.items():
        assert not config().resume, stage
        Checkpointer(tmp_path / stage).save(1, model)
        assert config().resume, stage


def test_clustered_rate_stays_within_zero_and_one():
    # 1 of 6 prompts right (one pair each): rate 1/6. Resamples with no right prompt have rate
    # 0; at the expanded level (0.0024, the 5th of 2,000 from each end) the upper end is 4 of 6
    # drawn right, above the floor's 1 − 5/6 · 6 / (6 + 2.571²) = 0.603.
    r = clustered_rate([(0, 1)] * 5 + [(1, 1)])
    assert r["mean"] == pytest.approx(1 / 6)
    assert r["ci95"] == pytest.approx([0.0, 4 / 6])


@pytest.mark.parametrize("damaged, stage", [
    ("sft/model.safetensors", "sft"),
    ("round-2/reward/tokenizer.json", "round-2/reward"),
    ("round-1/rankings_all.jsonl", "round-1/reward"),  # the evaluation reads it
    ("round-1/samples.jsonl", "round-1/rankings.jsonl"),  # every reward model's scale
])
def test_a_finished_stage_missing_a_file_is_refused_before_any_stage_runs(run, tmp_path, capsys,
                                                                          damaged, stage):
    """A stage is finished once its config.json (or rankings.jsonl) is written; one that lost
    a file since was reused as it was and failed only when the evaluation read it."""
    run = Path(shutil.copytree(run, tmp_path / "demo", copy_function=os.link))
    (run / damaged).unlink()
    capsys.readouterr()
    assert main(["pipeline", "--out", str(run), *ARGS]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"gptlab pipeline: error: {run / damaged}: is missing, though {stage} "
                        f"finished: it would be reused without it; remove {stage} to redo it\n")
    assert "== " not in err  # refused before any stage ran, the world included


def test_a_world_missing_a_file_is_refused_before_any_stage_runs(run, tmp_path, capsys):
    run = Path(shutil.copytree(run, tmp_path / "demo", copy_function=os.link))
    (run / "world" / "corpus.txt").unlink()
    assert main(["pipeline", "--out", str(run), *ARGS]) == 2
    err = capsys.readouterr().err
    assert f"error: {run / 'world' / 'corpus.txt'}: is missing from the world, whose world.json " \
           f"says it is whole; remove {run / 'world'} to export it again" in err
    assert "== " not in err


def _a_run_with_a_stage(tmp_path):
    """A pipeline OUT as a run leaves it: pipeline.json, and a finished stage (a model)."""
    run = tmp_path / "demo"
    (run / "sft").mkdir(parents=True)
    (run / "pipeline.json").write_text('{"preset": "demo", "rounds": 2}')
    (run / "sft" / "config.json").write_text('{"format": "gptlab/1"}')
    return run


@pytest.mark.parametrize("where, says", [
    ("demo/sft", "{out}, field '--out': is inside the pipeline run {run}; choose an "
                 "out (--out) outside it"),
    ("demo/sft/more", "{out}, field '--out': is inside the pipeline run {run}; choose an "
                      "out (--out) outside it"),
    ("demo/round-9", "{out}, field '--out': is inside the pipeline run {run}; choose an "
                     "out (--out) outside it"),
    ("model", "{out}, field '--out': already holds config.json and model.safetensors; choose "
              "another out (--out) or remove it"),
    ("afile", "{out}, field '--out': is a file, not a directory"),
])
def test_an_out_in_another_run_or_at_a_model_or_a_file_is_refused(tmp_path, capsys, monkeypatch,
                                                                   where, says):
    """Another run's stage (or a folder beside its stages) is no OUT: the two runs' files would
    mix. Nor is a model's directory or a file."""
    from gptlab.train.pipeline import Pipeline

    def export_world(self):
        raise AssertionError("a stage ran")
    monkeypatch.setattr(Pipeline, "export_world", export_world)
    run = _a_run_with_a_stage(tmp_path)
    (tmp_path / "model").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "model" / name).write_text("{}")
    (tmp_path / "afile").write_text("x")
    out = tmp_path / where
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["pipeline", "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert f"gptlab pipeline: error: {says.format(run=run, out=out)}" in err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


def test_another_tools_pipeline_json_above_out_is_no_pipeline_run(tmp_path):
    """A project folder may hold a pipeline.json of its own (a CI or data tool's): an OUT below
    it is not inside a pipeline run."""
    from gptlab.train.pipeline import check_out_is_its_own
    (tmp_path / "pipeline.json").write_text('{"stages": ["build", "test"]}')
    check_out_is_its_own(tmp_path / "runs" / "demo")
    (tmp_path / "pipeline.json").write_text("not json")
    check_out_is_its_own(tmp_path / "runs" / "demo")
    (tmp_path / "pipeline.json").write_text('{"preset": "demo", "rounds": 2, "seed": 0}')
    with pytest.raises(UserError, match="is inside the pipeline run"):
        check_out_is_its_own(tmp_path / "runs" / "demo")


def test_a_world_from_another_version_of_gptlab_is_refused_saying_to_start_again(
        run, tmp_path, capsys, monkeypatch):
    # Exporting the world again (what load_world says) would make it another world than the
    # one the run's stages were made from, and every stage would then be refused in turn.
    from gptlab.world.build import World
    run = Path(shutil.copytree(run, tmp_path / "demo", copy_function=os.link))
    monkeypatch.setattr(World, "fingerprint", lambda self: "0" * 64)  # another version's gold SQL
    assert main(["pipeline", "--out", str(run), *ARGS]) == 2
    assert capsys.readouterr().err.endswith(
        f"gptlab pipeline: error: {run / 'world' / 'world.json'}, field 'fingerprint': this world "
        f"was exported by a different version of gptlab, or its options were edited: its "
        f"questions or dialogs differ; "
        f"choose another out (--out), or remove this run to start again\n")


def test_stages_without_their_pipeline_json_are_refused_not_reused_unchecked(run, tmp_path,
                                                                             capsys):
    run = Path(shutil.copytree(run, tmp_path / "demo", copy_function=os.link))
    (run / "pipeline.json").unlink()
    assert main(["pipeline", "--out", str(run), *ARGS, "--ppo-lr", "1e-3"]) == 2
    assert capsys.readouterr().err.endswith(
        f"gptlab pipeline: error: {run}, field '--out': holds pipeline stages (world, pretrain, "
        f"sft_data.jsonl, sft, round-1/rankings.jsonl, round-1/reward, round-1/ppo, "
        f"round-2/rankings.jsonl, round-2/reward, round-2/ppo, sft_continued) but no "
        f"pipeline.json, which records the settings they were made with; choose another out "
        f"(--out), or remove them to redo them\n")
    assert not (run / "pipeline.json").exists()


def test_with_world_given_an_unrelated_world_dir_in_out_is_not_a_stage(tmp_path):
    # With --world, OUT/world is none of the run's: it was refused as "stages without their
    # pipeline.json" (world), which a run reading another world never made nor reads.
    world = tmp_path / "w"
    world.mkdir()
    (world / "world.json").write_text('{"format": "gptlab-world/1"}')
    out = tmp_path / "demo"
    (out / "world").mkdir(parents=True)
    assert _check_settings(out, world=str(world))["world"] == str(world)
    (out / "pipeline.json").unlink()
    with pytest.raises(UserError, match=r"holds pipeline stages \(world\) but no pipeline.json"):
        _check_settings(out)  # without --world, OUT/world is the run's world


def test_a_world_json_without_its_fingerprint_says_so_not_another_version(tmp_path):
    # The pipeline's "exported by a different version" caught every error about the field,
    # also load_world's "expected the world's fingerprint (a string)" for a damaged world.json.
    from gptlab.train.pipeline import Pipeline, PipelineConfig
    from gptlab.world.build import FORMAT, WorldOptions
    world = tmp_path / "w"
    world.mkdir()
    (world / "world.json").write_text(json.dumps(
        {"format": FORMAT, "options": dataclasses.asdict(WorldOptions())}))
    pipe = Pipeline(PipelineConfig(out=str(tmp_path / "demo"), world=str(world)))
    with pytest.raises(UserError) as e:
        pipe.export_world()
    assert str(e.value) == (f"{world / 'world.json'}, field 'fingerprint': expected the world's "
                            f"fingerprint (a string); export the world again")


def test_a_round_directory_named_with_a_superscript_is_no_round(tmp_path):
    # "²".isdigit(), and int("²") failed: a traceback where the stages without pipeline.json
    # are looked for (the same as checkpoints' step-²).
    out = tmp_path / "demo"
    (out / "round-²").mkdir(parents=True)
    assert _check_settings(out)["rounds"] == 2


def test_ppo_optimizer_steps_count_a_last_smaller_minibatch():
    from gptlab.train.pipeline import PipelineConfig, _ppo_optimizer_steps
    cfg = PipelineConfig(rounds=2, ppo_steps=3, ppo_batch=10, ppo_minibatch=4, ppo_epochs=2)
    assert _ppo_optimizer_steps(cfg) == 2 * 3 * 2 * 3  # minibatches of 4, 4 and 2


def test_each_round_s_stages_depend_on_every_earlier_round_s_options():
    from gptlab.train.pipeline import (FEEDBACK_OPTIONS, PPO_OPTIONS, REWARD_OPTIONS,
                                       stage_dependencies)
    stages = dict(stage_dependencies(2))
    assert list(stages) == [
        "world", "pretrain", "sft_data.jsonl", "sft", "round-1/rankings.jsonl", "round-1/reward",
        "round-1/ppo", "round-2/rankings.jsonl", "round-2/reward", "round-2/ppo",
        "sft_continued", "ppo_execution_reward", "ppo_execution_reward_on_test"]
    assert not stages["round-1/rankings.jsonl"] & set(REWARD_OPTIONS + PPO_OPTIONS)
    assert set(FEEDBACK_OPTIONS) <= stages["round-1/rankings.jsonl"]
    # Round 2 samples from round 1's policy: its rankings depend on round 1's PPO.
    assert set(REWARD_OPTIONS + PPO_OPTIONS) <= stages["round-2/rankings.jsonl"]
    assert "rounds" in stages["sft_continued"] and "rounds" not in stages["round-2/ppo"]


def test_the_timer_keeps_a_reused_stage_s_earlier_minutes_and_counts_them_saved(tmp_path,
                                                                             monkeypatch):
    from gptlab.train import pipeline as pipeline_module
    (tmp_path / "stage_minutes.json").write_text(json.dumps({"sft": 5.0, "pretrain": 2.0,
                                                            "round 1: sample": 1.5}))
    clock = iter([100.0, 106.0, 200.0, 200.0, 300.0, 312.0])
    monkeypatch.setattr(pipeline_module.time, "time", lambda: next(clock))
    t = pipeline_module.Timer(tmp_path)
    t.run("sft", lambda: None, done=True)      # found finished: its 5 minutes, 4.9 saved
    t.run("pretrain", lambda: None)             # run again: the 0 minutes it took now
    t.run("eval", lambda: None)                 # a new stage: 0.2 minutes
    t.reuse("round 1: sample")                  # not run at all: 1.5 saved
    assert t.minutes == pytest.approx({"sft": 5.0, "pretrain": 0.0, "eval": 0.2,
                                       "round 1: sample": 1.5})
    assert t.saved == pytest.approx(5.0 - 0.1 + 1.5)
    kept = json.loads((tmp_path / "stage_minutes.json").read_text())
    assert kept == pytest.approx({"sft": 5.0, "pretrain": 0.0, "eval": 0.2,
                                  "round 1: sample": 1.5})
    threads = torch.get_num_threads()
    assert t.threads_used() == threads  # the stages run here, on one thread count
    t.threads["eval"] = [threads + 1]
    assert t.threads_used() == {"pretrain": threads, "eval": threads + 1}
    t.threads["pretrain"] = [threads, threads + 1]  # resumed on another count
    assert t.threads_used() == {"pretrain": [threads, threads + 1], "eval": threads + 1}


def test_a_run_from_before_stage_minutes_json_reuses_the_minutes_its_report_holds(tmp_path,
                                                                                  capsys):
    # Runs made before stage_minutes.json kept the figures in report.json alone.
    from gptlab.train import pipeline as pipeline_module
    (tmp_path / "report.json").write_text(json.dumps({"stage_minutes": {"sft": 5.0,
                                                                        "pretrain": 2.5}}))
    t = pipeline_module.Timer(tmp_path)
    t.reuse("pretrain", "sft")
    assert (t.minutes, t.saved) == ({"pretrain": 2.5, "sft": 5.0}, 7.5)
    assert json.loads((tmp_path / "stage_minutes.json").read_text()) == {"sft": 5.0,
                                                                         "pretrain": 2.5}
    (tmp_path / "stage_minutes.json").unlink()
    (tmp_path / "report.json").write_text(json.dumps({"stage_minutes": None}))
    assert pipeline_module.Timer(tmp_path).earlier == {}  # a report without them: none
    keeps = "it only records what the stages took: remove it to start the record anew"
    (tmp_path / "report.json").write_text("[]")
    with pytest.raises(UserError) as err:
        pipeline_module.Timer(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'report.json'}: is not the JSON object the pipeline "
                              f"wrote; {keeps}")
    # edited by hand: each was a TypeError as the minutes were added up
    for name, record, said in (
            ("report.json", {"stage_minutes": 5}, "field 'stage_minutes': must be an object of "
                                                  "stage name -> minutes, got 5"),
            ("report.json", {"stage_minutes": {"sft": "5"}},
             "field 'stage_minutes.sft': must be a number of minutes (0 or more), got '5'"),
            ("stage_minutes.json", {"sft": True}, "field 'sft': must be a number of minutes (0 "
                                                  "or more), got True"),
            # taken, it made the report's total wall time -4.7 minutes
            ("stage_minutes.json", {"sft": -5}, "field 'sft': must be a number of minutes (0 "
                                                "or more), got -5"),
            # dropped without a word, the stage's counts were lost from the record and report
            ("stage_threads.json", {"pretrain": "x"}, "field 'pretrain': must be a thread "
                                                      "count (an integer >= 1) or a list of "
                                                      "them, got 'x'"),
            ("stage_threads.json", {"sft": [2, 0]}, "field 'sft': must be a thread count (an "
                                                    "integer >= 1) or a list of them, got "
                                                    "[2, 0]")):
        for other in ("stage_minutes.json", "stage_threads.json"):
            (tmp_path / other).unlink(missing_ok=True)
        (tmp_path / name).write_text(json.dumps(record))
        with pytest.raises(UserError) as err:
            pipeline_module.Timer(tmp_path).reuse("sft")
        assert str(err.value) == f"{tmp_path / name}, {said}; {keeps}"
    (tmp_path / "stage_threads.json").write_text(json.dumps({"pretrain": 2, "sft": [1, 2]}))
    (tmp_path / "report.json").unlink()
    assert pipeline_module.Timer(tmp_path).threads == {"pretrain": [2], "sft": [1, 2]}


def test_sft_learns_from_every_demonstration_without_sft_examples_or_a_flaw(tmp_path):
    from gptlab.train.pipeline import Pipeline, PipelineConfig
    p = Pipeline(PipelineConfig(out=str(tmp_path / "run"), sft_examples=None))
    assert p.demonstrations() == tmp_path / "run" / "world" / "sft.jsonl"
    assert not (tmp_path / "run").exists()  # the world's own file: no subset is written


def test_a_stage_resumed_on_another_thread_count_is_warned_of(tmp_path, monkeypatch, capsys):
    """A rerun with another --threads resumed a stage stopped after a checkpoint without a
    word, and the count it had run on was never recorded (the record was written only as a
    stage ended): its losses could differ in the last bits from a run that never stopped."""
    from gptlab.checkpoint import Checkpointer
    from gptlab.model import GPT, get_preset
    from gptlab.train import pipeline as pipeline_module
    from gptlab.train.loop import annotate_resume, interrupted_saved
    from gptlab.train.pipeline import Pipeline, PipelineConfig
    monkeypatch.setattr(pipeline_module, "usable_cpus", lambda: 2)
    for name in ("export_world", "_record_world", "_check_finished_stages_whole",
                 "test_questions"):
        monkeypatch.setattr(Pipeline, name, lambda self: None)
    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    ran_on: list[int] = []

    def stopped_after_a_checkpoint(self):
        ran_on.append(torch.get_num_threads())
        latest = Checkpointer(self.out / "pretrain").latest()
        if latest is not None:  # as `pretrain --resume` records its resume
            annotate_resume(self.out / "pretrain", self.pretrain_config(), latest.name)
        path = Checkpointer(self.out / "pretrain").save(len(ran_on), model)
        interrupted_saved(path)  # as the stage says it when Ctrl-C stops it
        raise KeyboardInterrupt
    monkeypatch.setattr(Pipeline, "pretrain", stopped_after_a_checkpoint)
    threads = torch.get_num_threads()
    records, told = [], []
    try:
        for n in (1, 1, 2, 2, 1):
            with pytest.raises(KeyboardInterrupt):
                Pipeline(PipelineConfig(out=str(tmp_path / "run"), threads=n)).run()
            record = json.loads((tmp_path / "run" / "stage_threads.json").read_text())
            records.append(record["pretrain"])  # on record though the stage never ended
            err = capsys.readouterr().err
            told.append([line for line in err.splitlines()
                         if line.startswith(("warning", "note: resuming"))])
            # Not the stage's own "continue with --resume": the pipeline has no --resume.
            assert "; run the same command again to continue\n" in err
    finally:
        torch.set_num_threads(threads)
    assert ran_on == [1, 1, 2, 2, 1]
    # Every count it was resumed on, in turn, not only the last.
    assert records == [[1], [1], [1, 2], [1, 2], [1, 2, 1]]
    # Told once (not again by the stage's own note): on 2 threads after it ran on 1, and on 1
    # after it ran on 1, then 2; the first start and a resume on the count it ran on say nothing.
    assert told == [[], [], [
        "warning: pretrain resumes from its checkpoint on 2 CPU threads, but the checkpoint was "
        "saved on 1: its losses may differ in the last bits from a run that never stopped "
        "(--threads 1 resumes it as it ran)"], [], [
        "warning: pretrain resumes from its checkpoint on 1 CPU thread, but the checkpoint was "
        "saved on 2 (it ran on 1, then 2): its losses may differ in the last bits from a run "
        "that never stopped (--threads 2 resumes it as it ran)"]]
    # A record of a count alone, as runs before the list wrote it, is that count's list.
    (tmp_path / "run" / "stage_threads.json").write_text(json.dumps({"pretrain": 2}))
    assert pipeline_module.Timer(tmp_path / "run").threads == {"pretrain": [2]}
    t = pipeline_module.Timer(tmp_path / "run")  # a stage that starts afresh: nothing to say
    t.run("pretrain", lambda: None)
    assert "warning" not in capsys.readouterr().err


def test_a_resume_is_warned_of_by_the_checkpoint_s_thread_count_not_the_record_s_last(
        tmp_path, capsys):
    """A session that started on another count and stopped before it saved put that count last
    in stage_threads.json, and the warning went by it: a resume on the count the checkpoint was
    saved on was warned of, one on the crashed session's count not. The checkpoint's manifest
    says what it was saved on; a checkpoint saved before it did falls back to the record."""
    from gptlab.checkpoint import Checkpointer
    from gptlab.model import GPT, get_preset
    from gptlab.train.pipeline import Timer
    torch.manual_seed(0)
    ckpt = Checkpointer(tmp_path / "run" / "pretrain")
    ckpt.save(1, GPT(get_preset("tiny")))
    latest = ckpt.latest()
    manifest = json.loads((latest / "manifest.json").read_text())

    def saved_on(threads):
        fields = {k: v for k, v in manifest.items() if k != "threads"}
        (latest / "manifest.json").write_text(json.dumps(
            fields if threads is None else {**fields, "threads": threads}))

    def warned(on, record, threads):
        (tmp_path / "run" / "stage_threads.json").write_text(json.dumps({"pretrain": record}))
        saved_on(threads)
        torch.set_num_threads(on)
        Timer(tmp_path / "run").run("pretrain", lambda: None, resumes=latest)
        return [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning")]
    before = torch.get_num_threads()
    try:
        # saved on 1, then a session on 2 stopped before it saved
        assert warned(1, [1, 2], 1) == []
        assert warned(2, [1, 2], 1) == [
            "warning: pretrain resumes from its checkpoint on 2 CPU threads, but the checkpoint "
            "was saved on 1 (it ran on 1, then 2): its losses may differ in the last bits from "
            "a run that never stopped (--threads 1 resumes it as it ran)"]
        # with no count on record for the stage
        assert len(warned(2, [], 1)) == 1
        # a checkpoint saved before its manifest had the count: the record's last
        assert warned(2, [1, 2], None) == []
        assert warned(1, [1, 2], None) == [
            "warning: pretrain resumes from its checkpoint on 1 CPU thread, but ran on 1, then "
            "2 before it stopped: its losses may differ in the last bits from a run that never "
            "stopped (--threads 2 resumes it as it last ran)"]
    finally:
        torch.set_num_threads(before)


def test_the_control_continues_sft_at_a_tenth_of_its_learning_rate(tmp_path):
    from gptlab.train.pipeline import Pipeline, PipelineConfig
    p = Pipeline(PipelineConfig(out=str(tmp_path / "run"), sft_lr=1e-3, rounds=3, ppo_steps=2,
                                ppo_batch=8, ppo_minibatch=4, ppo_epochs=2))
    cfg = p.sft_continued_config(tmp_path / "sft", tmp_path / "data.jsonl")
    assert cfg.lr == pytest.approx(1e-4) and cfg.min_lr_ratio == 1.0
    assert cfg.max_steps == 3 * 2 * 2 * 2 and cfg.warmup_steps == 0


def _stub_pipeline(tmp_path, world=True, **kw):
    from gptlab.train.pipeline import Pipeline, PipelineConfig
    p = Pipeline(PipelineConfig(out=str(tmp_path / "run"), seed=4, ppo_steps=3, **kw))
    if world:
        p.world_dir.mkdir(parents=True)
    return p


def test_each_round_samples_from_the_policy_the_last_round_trained(tmp_path, monkeypatch):
    import gptlab.eval.pipeline_eval as pipeline_eval
    import gptlab.eval.report as report
    p = _stub_pipeline(tmp_path, world=False, rounds=3)
    calls, sft = [], tmp_path / "sft"
    p.export_world = lambda: None
    p.test_questions = lambda: None
    p.pretrain = lambda: tmp_path / "pre"
    p.check_test_prompts_fit = lambda pre: None
    p.sft = lambda model: sft
    p.feedback = lambda policy, rnd: calls.append(("feedback", policy.name, rnd))
    p.reward = lambda sft_dir, rnd: calls.append(("reward", sft_dir.name, rnd)) or \
        tmp_path / f"rm{rnd}"
    p.ppo = lambda policy, sft_dir, rm, rnd: calls.append(("ppo", policy.name, rm.name, rnd)) \
        or tmp_path / f"ppo{rnd}"
    p.sft_continued = lambda sft_dir: tmp_path / "control"
    monkeypatch.setattr(pipeline_eval, "evaluate_pipeline", lambda *a: {})
    monkeypatch.setattr(report, "write_report", lambda *a: None)
    p.run()
    assert calls == [("feedback", "sft", 1), ("reward", "sft", 1), ("ppo", "sft", "rm1", 1),
                     ("feedback", "ppo1", 2), ("reward", "sft", 2), ("ppo", "ppo1", "rm2", 2),
                     ("feedback", "ppo2", 3), ("reward", "sft", 3), ("ppo", "ppo2", "rm3", 3)]


def test_each_round_draws_its_own_prompts_and_seeds_and_its_reward_model_reads_every_round(
        tmp_path, monkeypatch):
    import random
    import gptlab.feedback as feedback
    import gptlab.train.ppo as ppo_module
    import gptlab.train.reward as reward_module
    from gptlab.io import read_jsonl, write_jsonl_atomic
    from gptlab.train import pipeline as pipeline_module
    p = _stub_pipeline(tmp_path, rounds=2, sample_prompts=5, k=2)
    prompts = [{"id": f"p{i}", "prompt": f"question {i}"} for i in range(30)]
    write_jsonl_atomic(p.world_dir / "prompts.jsonl", prompts)
    p.world = None
    drawn = {}
    monkeypatch.setattr(pipeline_module, "load_model", lambda *a: (None, None, None))
    monkeypatch.setattr(feedback, "sqlworld_ranker", lambda *a: None)
    monkeypatch.setattr(feedback, "sample_responses", lambda model, tok, chosen, k, params, seed:
                        drawn.setdefault(seed, [r["id"] for r in chosen]) and
                        [{"prompt": r["prompt"], "responses": ["a", "b"]} for r in chosen])
    monkeypatch.setattr(feedback, "label_samples",
                        lambda samples, rank, skips, dropped: [{"prompt": s["prompt"],
                                                                "ranked": ["a", "b"]}
                                                               for s in samples])
    for rnd in (1, 2):
        p.feedback(tmp_path / "policy", rnd)
    want = {4000 + rnd: [r["id"] for r in random.Random(4000 + rnd).sample(prompts, 5)]
            for rnd in (1, 2)}
    assert drawn == want and want[4001] != want[4002]
    trained, ran = [], []
    monkeypatch.setattr(reward_module, "train_reward_model", trained.append)
    p.reward(tmp_path / "sft", 2)
    assert len(read_jsonl(p.out / "round-2" / "rankings_all.jsonl")) == 10  # both rounds
    assert trained[0].seed == 6 and trained[0].samples.endswith("round-1/samples.jsonl")
    monkeypatch.setattr(ppo_module, "ppo", lambda cfg, reward_fn=None: ran.append(cfg))
    p.ppo(tmp_path / "policy", tmp_path / "sft", tmp_path / "rm", 2)
    assert (ran[-1].seed, ran[-1].steps) == (6, 3)
    import gptlab.world.rewards as world_rewards
    monkeypatch.setattr(world_rewards, "execution_reward", lambda world: "execution")
    for on_test in (False, True):
        p.ppo_execution_reward(tmp_path / "sft", on_test=on_test)
    assert [(c.seed, c.steps) for c in ran[-2:]] == [(104, 6), (104, 6)]  # every round's steps
    assert ran[-1].prompts.endswith("test.jsonl") and ran[-2].prompts.endswith("prompts.jsonl")


def test_sft_learns_from_the_first_sft_examples_demonstrations(tmp_path):
    from gptlab.io import read_jsonl, write_jsonl_atomic
    p = _stub_pipeline(tmp_path, sft_examples=4)
    write_jsonl_atomic(p.world_dir / "sft.jsonl",
                       [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)])
    rows = read_jsonl(p.demonstrations())
    assert [r["prompt"] for r in rows] == ["q0", "q1", "q2", "q3"]


def test_a_rerun_with_fewer_rounds_still_checks_the_stages_of_the_later_rounds(tmp_path):
    out = tmp_path / "demo"
    _check_settings(out, rounds=3)
    (out / "round-3" / "ppo").mkdir(parents=True)  # only round 3's PPO has started
    with pytest.raises(UserError, match=r"whose round-3/ppo was made with other settings "
                                        r"\(ppo_lr\)"):
        _check_settings(out, rounds=2, ppo_lr=1e-4)
    _check_settings(out, rounds=2)  # fewer rounds alone change no started stage's settings


def test_a_finished_stage_lacking_a_file_is_found_and_the_headroom_stages_only_with_headroom(
        tmp_path):
    from gptlab.checkpoint import FORMAT
    from gptlab.train.pipeline import missing_from_finished
    p = _stub_pipeline(tmp_path, world=False)
    out = p.out
    (out / "round-1").mkdir(parents=True)
    (out / "round-1" / "rankings.jsonl").write_text("")
    assert missing_from_finished(out, p.world_dir, ["round-1/rankings.jsonl"]) == (
        out / "round-1" / "rankings.jsonl", out / "round-1" / "samples.jsonl")
    (out / "round-1" / "samples.jsonl").write_text("")
    assert missing_from_finished(out, p.world_dir, ["round-1/rankings.jsonl"]) is None
    stage = out / "ppo_execution_reward"
    stage.mkdir()
    (stage / "config.json").write_text(json.dumps({"format": FORMAT}))  # finished, no weights
    p._check_finished_stages_whole()  # not a stage of this run: without --headroom, unread
    p = _stub_pipeline(tmp_path, world=False, headroom=True)
    with pytest.raises(UserError, match="model.safetensors.*is missing, though "
                                        "ppo_execution_reward finished"):
        p._check_finished_stages_whole()


def test_the_world_s_digest_is_recorded_once_the_run_has_exported_it(tmp_path):
    import hashlib
    p = _stub_pipeline(tmp_path, world=False)
    p.out.mkdir(parents=True)
    p._check_same_run()
    assert json.loads((p.out / "pipeline.json").read_text())["world_digest"] is None
    p.world_dir.mkdir()
    (p.world_dir / "world.json").write_text('{"seed": 0}')
    p._record_world()
    assert json.loads((p.out / "pipeline.json").read_text())["world_digest"] == \
        hashlib.sha256(b'{"seed": 0}').hexdigest()


def test_a_test_split_the_evaluation_cannot_answer_is_refused_before_any_stage(tmp_path):
    # A test.jsonl line without `completion` or `id` was a traceback (KeyError), an unknown or
    # wrongly typed id an error without its line, a repeated id counted twice in every figure:
    # all found at the evaluation, after every stage had trained. An edited `completion` was
    # the report's gold though scoring went by the world's.
    from gptlab.eval.pipeline_eval import read_test_questions
    from gptlab.train.pipeline import Pipeline, PipelineConfig
    from gptlab.world import build_world
    world = build_world(5, n_train=30, n_validation=10, n_test=20, n_dialogs=4,
                        corpus_chars=1000)
    w = tmp_path / "w"
    world.export(w)
    path = w / "test.jsonl"
    good = [json.loads(line) for line in path.read_text().splitlines()]
    a, b = good[0]["id"], good[1]["id"]

    def test_file(*records):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    test_file({**good[0], "completion": " SELECT 1", "unseen_phrasing": "maybe"},
              {"id": b, "prompt": good[1]["prompt"]})
    got = read_test_questions(world, path)
    assert [(r["id"], r["completion"], r["unseen_phrasing"]) for r in got] == [
        (a, " " + world.gold(a), world.unseen_phrasing(a)),
        (b, " " + world.gold(b), world.unseen_phrasing(b))]
    for bad, said in (
            ({"prompt": "p"}, "field 'id': missing"),
            ({"id": 7, "prompt": "p"}, "field 'id': must be a question id string"),
            ({"id": "s9-test-99999", "prompt": "p"},
             "field 'id': no question with id 's9-test-99999' in this world"),
            ({"id": world.train[0].id, "prompt": "p"},
             f"field 'id': '{world.train[0].id}' is a train question, not a test one"),
            (good[0], f"field 'id': '{a}' is repeated (first on line 1); each question counts "
                      f"once"),
            ({"id": b, "prompt": 5}, "field 'prompt': expected text, got int")):
        test_file(good[0], bad)
        with pytest.raises(UserError) as e:
            read_test_questions(world, path)
        assert str(e.value).startswith(f"{path}:2, {said}"), str(e.value)
    # The run stops there, before it pretrains.
    pipe = Pipeline(PipelineConfig(out=str(tmp_path / "run"), world=str(w)))
    with pytest.raises(UserError, match=f"{path}:2, field 'prompt'"):
        pipe.run()
    assert not (tmp_path / "run" / "pretrain").exists()


def test_the_longest_test_prompt_may_fill_the_context_less_max_new_tokens_exactly(tmp_path):
    from gptlab.data.instruct import encode_prompt
    from gptlab.io import write_jsonl_atomic
    from gptlab.model.presets import get_preset
    from gptlab.tokenizer import train_tokenizer
    tok = train_tokenizer(["which employees earn more than 60,000 in Paris?"] * 20,
                          vocab_size=300)
    tok.save(tmp_path / "pre")
    prompts = ["which employees earn more?", "which employees earn more than 60,000 in Paris?"]
    longest = max(len(encode_prompt(tok, p)) for p in prompts)
    room = get_preset("demo").context - longest
    from gptlab.world import build_world
    world = build_world(5, n_train=30, n_validation=10, n_test=20, n_dialogs=4,
                        corpus_chars=1000)
    for max_new, refused in ((room, False), (room + 1, True)):
        p = _stub_pipeline(tmp_path / str(max_new), max_new_tokens=max_new)
        p.world = world
        write_jsonl_atomic(p.world_dir / "test.jsonl", [{"id": q.id, "prompt": text} for q, text
                                                        in zip(world.test, prompts)])
        if refused:
            with pytest.raises(UserError, match=f"the longest test prompt has {longest} tokens"):
                p.check_test_prompts_fit(tmp_path / "pre")
        else:
            p.check_test_prompts_fit(tmp_path / "pre")


def test_the_report_is_titled_by_out_as_the_run_was_made_with_it(run):
    """The title is the settings' `out` (relative here, as `make demo` gives it); the run's own
    report, written where `out` is, has no line saying where it was written."""
    md = (run.parent.parent / "report_as_made.md").read_text()
    assert md.startswith("# gptlab pipeline report: runs/demo\n\nPipeline settings: ")
    assert "This report was written in" not in md


def test_a_world_seed_beside_a_world_given_is_refused_as_unused(tmp_path, capsys):
    # It ran, was recorded as the run's world_seed and shown in the report as the world's,
    # and then refused every rerun without it as "made with other settings (world_seed)".
    from gptlab.train.pipeline import PipelineConfig
    with pytest.raises(UserError) as e:
        PipelineConfig(world=str(tmp_path / "w"), world_seed=3).check_values()
    assert e.value.field == "world_seed"
    PipelineConfig(world=str(tmp_path / "w")).check_values()  # its default: nothing said
    PipelineConfig(world_seed=3).check_values()  # the built-in world's seed
    assert main(["pipeline", "--out", str(tmp_path / "run"), "--world", str(tmp_path / "w"),
                 "--world-seed", "3"]) == 2
    assert capsys.readouterr().err == (
        "gptlab pipeline: error: field '--world-seed': is not used with world (--world), which "
        "was exported with its own seed (its world.json); drop it, or export a world with that "
        "seed (gptlab world export --seed)\n")
    assert not (tmp_path / "run").exists()
