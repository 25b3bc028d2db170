"""InstructGPT on a task of our own (not the built-in world): sft -> sample -> rank with our own
Python function -> reward model -> PPO, through the command line, checking that reward goes up."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import load_model, save_model
from gptlab.cli import main
from gptlab.data.instruct import demonstration, read_rankings
from gptlab.eval.stats import clustered_rate, t_975
from gptlab.errors import UserError
from gptlab.feedback import label_samples
from gptlab.io import read_jsonl, write_jsonl_atomic
from gptlab.model import GPT, get_preset
from gptlab.tokenizer import train_tokenizer
from gptlab.train.ppo import PPOConfig, PPOTrainer
from gptlab.train.reward import split_rankings

import instruct_task as task

QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("instruct")
    paths = task.write_task(d)
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
    save_model(d / "base", GPT(cfg), tok)
    assert main(["sft", "--model", str(d / "base"), "--data", str(paths["sft"]),
                 "--out", str(d / "sft"), "--max-steps", "120", "--batch-size", "16",
                 "--lr", "3e-3", "--eval-every", "40", *QUIET]) == 0
    assert main(["sample", "--model", str(d / "sft"), "--prompts", str(paths["prompts"]),
                 "--k", "4", "--out", str(d / "samples.jsonl"), "--max-new-tokens", "8"]) == 0
    rankings = label_samples(read_jsonl(d / "samples.jsonl"), task.score)
    write_jsonl_atomic(d / "rankings.jsonl", rankings)
    assert main(["reward", "--model", str(d / "sft"), "--data", str(d / "rankings.jsonl"),
                 "--out", str(d / "rm"), "--max-steps", "80", "--lr", "2e-3",
                 "--batch-size", "8", "--eval-every", "40", *QUIET]) == 0
    return d, paths


def test_sft_loss_is_on_the_completion_only(run):
    d, paths = run
    _, tok, _ = load_model(d / "sft")
    ex = demonstration(tok, {"prompt": "Is the cat happy?", "completion": " yes no"})
    prompt_len = len(tok.encode("Is the cat happy?", bos=True))
    assert ex.loss_mask == [0] * prompt_len + [1] * (len(ex.ids) - prompt_len)
    assert ex.ids[-1] == tok.eos_id  # the model learns to stop
    metrics = [json.loads(line) for line in (d / "sft" / "metrics.jsonl").open()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert val[-1] < val[0] - 1.0


def test_samples_carry_ids_and_k_responses(run):
    d, _ = run
    rows = read_jsonl(d / "samples.jsonl")
    assert len(rows) == 64 and all(len(r["responses"]) == 4 for r in rows)
    assert rows[0]["id"] == "t0"


def test_reward_model_learns_the_preference_and_is_normalised(run):
    d, _ = run
    meta = json.loads((d / "rm" / "config.json").read_text())
    assert meta["arch"] == "scalar"
    assert meta["heldout_pairwise_acc"] >= 0.7
    rm, tok, _ = load_model(d / "rm")
    # Normalised: the policy's samples (the training rankings' responses) score mean 0, std 1.
    seqs = []
    train_rankings, _ = split_rankings(read_rankings(d / "rankings.jsonl"), 0.1, 0)
    for r in train_rankings:
        for resp in r.ranked:
            seqs.append(tok.encode(r.prompt, bos=True) + tok.encode(resp) + [tok.eos_id])
    seqs = sorted({tuple(s) for s in seqs})
    scores = torch.cat([rm(torch.tensor([s])) for s in seqs])
    assert abs(scores.mean().item()) < 1e-3 and abs(scores.std().item() - 1) < 1e-3


def test_held_out_accuracy_and_its_interval_recomputed_by_hand(run):
    d, _ = run
    meta = json.loads((d / "rm" / "config.json").read_text())
    rm, tok, _ = load_model(d / "rm")
    _, held = split_rankings(read_rankings(d / "rankings.jsonl"), 0.1, 0)
    by_prompt = {}  # (pairs ordered rightly, pairs with a preference) of each held-out prompt
    for r in held:
        with torch.no_grad():
            s = [rm(torch.tensor([tok.encode(r.prompt, bos=True) + tok.encode(x) + [tok.eos_id]]))
                 .item() for x in r.ranked]
        pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if r.groups[i] < r.groups[j]]
        a, n = by_prompt.get(r.prompt, (0, 0))  # one prompt ranked twice is one draw
        by_prompt[r.prompt] = (a + sum((s[i] > s[j]) + 0.5 * (s[i] == s[j]) for i, j in pairs),
                               n + len(pairs))
    per_prompt = [(a, n) for a, n in by_prompt.values() if n]
    right, total, k = sum(a for a, _ in per_prompt), sum(n for _, n in per_prompt), len(per_prompt)
    assert k >= 2 and meta["heldout_pairs"] == total
    acc = right / total
    assert meta["heldout_pairwise_acc"] == pytest.approx(acc)
    # The prompts the draws: where every prompt has one rate (this model: right on both) the
    # floor alone, rate · w below and (1 − rate) · w above, w = k / (k + t²); otherwise the
    # cluster bootstrap's interval (tests/test_stats.py) on these per-prompt counts.
    w = k / (k + t_975(k - 1) ** 2)
    if len({a / n for a, n in per_prompt}) == 1:
        expected = [acc * w, 1 - (1 - acc) * w]
    else:
        expected = clustered_rate(per_prompt)["ci95"]
    assert meta["heldout_pairwise_acc_ci95"] == pytest.approx(expected, abs=1e-6)


def test_reward_model_normalised_on_a_samples_file(run, tmp_path):
    d, _ = run
    assert main(["reward", "--model", str(d / "sft"), "--data", str(d / "rankings.jsonl"),
                 "--samples", str(d / "samples.jsonl"), "--out", str(tmp_path / "rm"),
                 "--max-steps", "2", "--batch-size", "8", *QUIET]) == 0
    rm, tok, _ = load_model(tmp_path / "rm")
    # Every response of the samples file, duplicates included (64 prompts x 4), scores
    # mean 0, std 1; the distinct ranked responses alone do not.
    seqs = [tok.encode(r["prompt"], bos=True) + tok.encode(x) + [tok.eos_id]
            for r in read_jsonl(d / "samples.jsonl") for x in r["responses"]]
    assert len(seqs) == 256 and len(set(map(tuple, seqs))) < 256
    with torch.no_grad():
        scores = torch.cat([rm(torch.tensor([s])) for s in seqs])
        distinct = torch.cat([rm(torch.tensor([s])) for s in sorted(set(map(tuple, seqs)))])
    assert abs(scores.mean().item()) < 1e-3 and abs(scores.std().item() - 1) < 1e-3
    assert abs(distinct.mean().item()) > 0.01


def test_a_bad_samples_file_for_normalisation_fails_before_training(run, tmp_path, capsys):
    d, _ = run
    bad = tmp_path / "samples.jsonl"
    for second, why in (('"yes"', "must be a non-empty list of response strings, got a string"),
                        ("[]", "must be a non-empty list of response strings, got an empty list"),
                        ('["no", null]', "item 2 must be a response string, got null")):
        bad.write_text('{"prompt": "Is it?", "responses": ["yes"]}\n'
                       f'{{"prompt": "Is it?", "responses": {second}}}\n')
        assert main(["reward", "--model", str(d / "sft"), "--data", str(d / "rankings.jsonl"),
                     "--samples", str(bad), "--out", str(tmp_path / "rm"), *QUIET]) == 2
        assert f"samples.jsonl:2, field 'responses': {why}" in capsys.readouterr().err
        assert not (tmp_path / "rm").exists()


def test_value_model_equals_reward_model_at_start(run):
    d, paths = run
    t = PPOTrainer(PPOConfig(policy=str(d / "sft"), reward=str(d / "rm"),
                             prompts=str(paths["prompts"]), out=str(d / "unused"),
                             max_new_tokens=8))
    rm = t.reward_model
    assert abs(rm.score_bias.item()) > 0.01 and abs(rm.score_scale.item() - 1) > 0.01
    ids = torch.randint(0, 200, (2, 12)).to(t.device)  # where the trainer put its models
    with torch.no_grad():
        # V at the last token is the reward model's normalised score: the scale of the rewards
        torch.testing.assert_close(t.value_model.values(ids)[:, -1], rm(ids))
        torch.testing.assert_close(t.value_model(ids), rm(ids))
    assert t.value_model is not t.reward_model


def mean(xs):
    return sum(xs) / len(xs)


def test_ppo_with_the_reward_model_raises_reward(run):
    d, paths = run
    assert main(["ppo", "--policy", str(d / "sft"), "--reward", str(d / "rm"),
                 "--prompts", str(paths["prompts"]), "--out", str(d / "ppo"), "--steps", "16",
                 "--batch-size", "32", "--minibatch-size", "16", "--lr", "3e-4",
                 "--max-new-tokens", "8", "--kl-coef", "0.02"]) == 0
    rows = [json.loads(line) for line in (d / "ppo" / "metrics.jsonl").open()]
    assert len(rows) == 16
    for key in ("reward", "kl", "entropy", "response_length", "clipfrac", "value_loss",
                "approx_kl"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert mean([r["reward"] for r in rows[-4:]]) > mean([r["reward"] for r in rows[:4]]) + 0.3
    # The true preference (not the reward model's view of it) improved too.
    def true_score(model_dir):
        out = d / f"{model_dir}.samples.jsonl"
        main(["sample", "--model", str(d / model_dir), "--prompts", str(paths["prompts"]),
              "--k", "4", "--out", str(out), "--max-new-tokens", "8", "--seed", "9"])
        return mean([task.preference(x) for r in read_jsonl(out) for x in r["responses"]])
    assert true_score("ppo") > true_score("sft") + 0.3


def test_ppo_with_a_reward_function_and_ptx(run):
    d, paths = run
    assert main(["ppo", "--policy", str(d / "sft"), "--reward-fn", "instruct_task:reward_fn",
                 "--prompts", str(paths["prompts"]), "--out", str(d / "ppo_fn"), "--steps", "12",
                 "--batch-size", "32", "--minibatch-size", "16", "--lr", "3e-4",
                 "--max-new-tokens", "8", "--ptx-data", str(paths["corpus"]),
                 "--ptx-coef", "0.5"]) == 0
    rows = [json.loads(line) for line in (d / "ppo_fn" / "metrics.jsonl").open()]
    assert all("ptx_loss" in r and r["ptx_loss"] > 0 for r in rows)
    assert mean([r["reward"] for r in rows[-3:]]) > mean([r["reward"] for r in rows[:3]])


@pytest.mark.parametrize("fn,message", [
    ("instruct_task:raising_reward_fn", "the reward function instruct_task:raising_reward_fn "
                                        "raised RuntimeError: scorer crashed"),
    ("instruct_task:nan_reward_fn", "the reward function instruct_task:nan_reward_fn returned "
                                    "a non-finite score (nan) for prompt id t"),
    ("instruct_task:text_reward_fn", "the reward function instruct_task:text_reward_fn "
                                     "returned a str ('1.0') for prompt id t"),
    ("instruct_task:missing", "cannot load 'instruct_task:missing': module instruct_task has no "
                              "'missing'"),
    # its check_records raising a plain exception was a traceback, exit 1
    ("instruct_task:picky_reward_fn", "the reward function instruct_task:picky_reward_fn: "
                                      "check_records raised ValueError: {prompts}:4: prompt t3 "
                                      "is not about an animal")])
def test_a_broken_reward_function_is_a_clear_error(run, capsys, fn, message):
    d, paths = run
    code = main(["ppo", "--policy", str(d / "sft"), "--reward-fn", fn,
                 "--prompts", str(paths["prompts"]), "--out", str(d / "ppo_bad"), "--steps", "1",
                 "--batch-size", "4", "--minibatch-size", "4", "--max-new-tokens", "4"])
    assert code == 2
    message = message.format(prompts=paths["prompts"])
    # Named by the flag, except where the error is at the prompts file (or a line of it).
    err = capsys.readouterr().err
    field = "reward_fn" if f"{paths['prompts']}" in err.split("field")[0] else "--reward-fn"
    assert f"field '{field}': {message}" in err
    assert not (d / "ppo_bad").exists()   # it failed before its first step: nothing written


def test_a_check_records_beside_the_reward_function_not_on_it_is_said(tmp_path, monkeypatch,
                                                                    capsys):
    # Written as a function of the module, the check was silently never called.
    from gptlab.train.ppo import load_reward_fn
    (tmp_path / "own_date_reward.py").write_text(
        "def score(prompts, responses, records):\n    return [0.0 for r in responses]\n"
        "def check_records(records, path):\n    raise ValueError('checked')\n"
        "def checked(prompts, responses, records):\n    return [0.0 for r in responses]\n"
        "checked.check_records = check_records\n")
    monkeypatch.chdir(tmp_path)
    assert load_reward_fn("own_date_reward:score").__name__ == "score"
    assert capsys.readouterr().err == (
        "note: own_date_reward defines check_records, but own_date_reward:score has no "
        "check_records attribute, so it is not called; to check the prompts first, set "
        "score.check_records = check_records in own_date_reward\n")
    assert load_reward_fn("own_date_reward:checked").__name__ == "checked"
    assert capsys.readouterr().err == ""


def test_a_reward_function_may_return_numpy_numbers(run):
    d, paths = run
    assert main(["ppo", "--policy", str(d / "sft"), "--reward-fn", "instruct_task:numpy_reward_fn",
                 "--prompts", str(paths["prompts"]), "--out", str(d / "ppo_np"), "--steps", "1",
                 "--batch-size", "4", "--minibatch-size", "4", "--max-new-tokens", "4"]) == 0
    row = json.loads((d / "ppo_np" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and row["reward"] >= 0


def float32(transformers) -> dict:
    """from_pretrained's float32: `dtype` in transformers 5, `torch_dtype` in 4."""
    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": torch.float32}


def test_ppo_with_a_hugging_face_sequence_classifier_as_reward_model(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")  # an extra: gptlab[hf] installs it
    from gptlab.interop import export_hf
    d, paths = run
    model, tok, _ = load_model(d / "sft")
    export_hf(model, tok, tmp_path / "hf")
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf", num_labels=1, **float32(transformers))
    clf.save_pretrained(tmp_path / "rm")  # weights and config only, no tokenizer
    args = ["ppo", "--policy", str(d / "sft"), "--reward", str(tmp_path / "rm"),
            "--prompts", str(paths["prompts"]), "--steps", "2", "--batch-size", "8",
            "--minibatch-size", "4", "--max-new-tokens", "8"]
    assert main([*args, "--out", str(tmp_path / "ppo")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").open()]
    assert len(rows) == 2 and all(r["reward"] == r["reward"] for r in rows)
    # A reward model with another tokenizer would read the policy's ids as other tokens.
    train_tokenizer(["completely different text " * 50], vocab_size=280).save(tmp_path / "rm")
    assert main([*args, "--out", str(tmp_path / "ppo2")]) == 2
    assert "tokenizer is not the policy's" in capsys.readouterr().err


@pytest.mark.parametrize("pad", ["pad", "eos"])
def test_ppo_scores_with_a_hugging_face_classifier_as_transformers_does(run, tmp_path, pad):
    # #4: a Llama sequence classifier saved by transformers (pad_token_id set: its own pad, or
    # the EOS as SmolLM2's) scores PPO's rollouts as transformers scores the same sequences,
    # right- or left-padded: at the last token that is not the pad.
    transformers = pytest.importorskip("transformers")
    from gptlab.data.instruct import encode_prompt, prompt_of
    from gptlab.interop import export_hf, load_pretrained
    from gptlab.train.reward import scored_response
    d, paths = run
    model, tok, _ = load_model(d / "sft")
    export_hf(model, tok, tmp_path / "hf")
    pad_id = tok.pad_id if pad == "pad" else tok.eos_id
    clf = transformers.LlamaForSequenceClassification.from_pretrained(
        tmp_path / "hf", num_labels=1, pad_token_id=pad_id, **float32(transformers)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        clf.score.weight.normal_()
    clf.save_pretrained(tmp_path / "rm")
    trainer = PPOTrainer(PPOConfig(policy=str(d / "sft"), reward=str(tmp_path / "rm"),
                                   prompts=str(paths["prompts"]), out=str(tmp_path / "ppo"),
                                   batch_size=8, max_new_tokens=8, missing_eos_penalty=0.0))
    ro = trainer.rollout(1)
    got = trainer.score(ro).cpu()  # the trainer scores on its device; transformers, here on the CPU
    seqs = []
    for rec, resp, done in zip(ro.records, ro.responses, ro.finished.tolist()):
        prompt = encode_prompt(tok, prompt_of(rec))
        seqs.append(prompt + scored_response(resp, done, [tok.eos_id],
                                                  trainer.context - len(prompt)))
    assert len({len(s) for s in seqs}) > 1  # rows of several lengths: padding is exercised
    T = max(map(len, seqs))
    right = torch.tensor([s + [pad_id] * (T - len(s)) for s in seqs])
    left = torch.tensor([[pad_id] * (T - len(s)) + s for s in seqs])
    real = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    ours = load_pretrained(tmp_path / "rm")[0]
    with torch.no_grad():
        for ids, mask in ((right, real), (left, real.flip(1))):
            want = clf(input_ids=ids, attention_mask=mask).logits[:, 0]
            # On CUDA the trainer scores in TF32, as it trains: about 1e-3 of the score
            assert torch.allclose(got, want, atol=1e-4 if trainer.device.type == "cpu" else 5e-3,
                                  rtol=0 if trainer.device.type == "cpu" else 1e-3), (got, want)
            assert torch.allclose(ours(ids, mask), want, atol=1e-4)


def test_ppo_takes_exactly_one_reward_source(run):
    d, paths = run
    cfg = PPOConfig(policy=str(d / "sft"), prompts=str(paths["prompts"]), out=str(d / "x"),
                    reward=str(d / "rm"), max_new_tokens=8)
    with pytest.raises(UserError, match="exactly one"):
        PPOTrainer(cfg, reward_fn=task.reward_fn)
    with pytest.raises(UserError, match="exactly one"):
        PPOTrainer(dataclasses.replace(cfg, reward=None))
    trainer = PPOTrainer(dataclasses.replace(cfg, reward=None), reward_fn=task.reward_fn)
    assert trainer.reward_fn is task.reward_fn and trainer.reward_model is None


@pytest.mark.parametrize("line,message", [
    ({"prompt": "p", "ranked": ["only one"]}, "at least 2"),
    ({"prompt": "p", "ranked": ["a", "a"]}, "duplicate"),
    ({"prompt": "p", "ranked": ["a", " "]}, "empty"),
    ({"prompt": "p", "chosen": "a"}, "needs 'ranked'"),
    ({"prompt": "p", "ranked": ["a", "b"], "chosen": "b", "rejected": "a"},
     "field 'ranked': has both 'ranked' and 'chosen'/'rejected'; give one of them"),
])
def test_bad_rankings_lines_name_file_and_line(run, tmp_path, capsys, line, message):
    d, _ = run
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "y"}) + "\n"
                 + json.dumps(line) + "\n")
    code = main(["reward", "--model", str(d / "sft"), "--data", str(f),
                 "--out", str(tmp_path / "rm"), "--max-steps", "1", *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and f"{f}:2" in err and message in err


def test_identical_responses_are_merged_and_short_prompts_skipped():
    samples = [{"id": 1, "prompt": "p", "responses": ["yes", "yes", "no"]},
               {"id": 2, "prompt": "q", "responses": ["ok", "ok", "ok"]}]
    from gptlab.data.instruct import SkipCounter
    skips = SkipCounter()
    out = label_samples(samples, task.rank, skips)
    assert out == [{"id": 1, "prompt": "p", "ranked": ["yes", "no"]}]
    assert skips.total == 1


@pytest.mark.parametrize("prompt", ["p", [{"role": "user", "content": "p"}]])
def test_a_preference_file_sampled_as_prompts_labels_into_rankings_reward_reads(tmp_path,
                                                                                prompt):
    # `sample` takes prompt + chosen + rejected as prompts and carries the other fields; its
    # chosen/rejected then sat beside the new `ranked`, and `reward` refused the line.
    samples = [{"id": 1, "prompt": prompt, "chosen": [{"role": "assistant", "content": "a"}]
                if isinstance(prompt, list) else "a", "rejected": "b", "score": 2,
                "responses": ["no", "yes no", "yes"]}]
    f = tmp_path / "rankings.jsonl"
    write_jsonl_atomic(f, label_samples(samples, task.rank))
    assert read_jsonl(f) == [{"id": 1, "prompt": prompt, "score": 2,
                              "ranked": ["yes", "yes no", "no"], "_line": 1}]
    assert [(r.prompt, r.ranked) for r in read_rankings(f)] == [(prompt, ["yes", "yes no", "no"])]


def test_tied_responses_share_a_level_and_plain_strings_are_levels_of_one(tmp_path):
    f = tmp_path / "r.jsonl"
    rows = [{"prompt": "p", "ranked": ["SELECT a", ["SELECT b", "SELECT c"], "SELECT d"]},
            {"prompt": "q", "ranked": [["x"], "y"]},
            {"prompt": "r", "chosen": "x", "rejected": "y"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tied, single, pair = read_rankings(f)
    assert tied.ranked == ["SELECT a", "SELECT b", "SELECT c", "SELECT d"]
    assert tied.groups == [0, 1, 1, 2]
    assert single.ranked == pair.ranked == ["x", "y"] and single.groups == pair.groups == [0, 1]


@pytest.mark.parametrize("line,message", [
    ({"prompt": "p", "ranked": ["a", [], "b"]}, "item 2 is an empty list of tied responses"),
    ({"prompt": "p", "ranked": ["a", ["b", 3]]}, "item 2 must be a response string"),
    ({"prompt": "p", "ranked": ["a", ["b", ["c"]]]}, "item 2 must be a response string"),
    ({"prompt": "p", "ranked": ["a", ["b", " "]]}, "a response is empty"),
    ({"prompt": "p", "ranked": ["a", ["b", "a"]]}, "duplicate"),
    ({"prompt": "p", "ranked": [["a", "b"]]}, "at least 2 levels of preference; all responses"),
    ({"prompt": "p", "ranked": [["a"]]}, "at least 2 responses, got 1"),
    ({"prompt": "p", "ranked": "a"}, "must be a list"),
])
def test_bad_tied_rankings_name_file_line_and_field(tmp_path, line, message):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"prompt": "p", "ranked": ["x", "y"]}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(UserError) as err:
        read_rankings(f)
    assert f"{f}:2" in str(err.value) and "field 'ranked'" in str(err.value)
    assert message in str(err.value)


def test_chosen_and_rejected_cannot_be_tied_groups(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": ["a", "b"], "rejected": "c"}) + "\n")
    with pytest.raises(UserError, match=r"r.jsonl:1, field 'chosen': must be a response string"):
        read_rankings(f)


def test_a_labeler_may_tie_and_prompts_it_ties_all_together_are_skipped():
    def rank(record, responses):  # longer is better; equal lengths tie
        by_length: dict[int, list[str]] = {}
        for r in responses:
            by_length.setdefault(len(r), []).append(r)
        return [by_length[n] for n in sorted(by_length, reverse=True)]
    from gptlab.data.instruct import SkipCounter, ranking_of
    samples = [{"id": 1, "prompt": "p", "responses": ["aa", "b", "c", "b"]},
               {"id": 2, "prompt": "q", "responses": ["x", "y"]}]
    skips = SkipCounter()
    out = label_samples(samples, rank, skips)
    assert out == [{"id": 1, "prompt": "p", "ranked": ["aa", ["b", "c"]]}]
    assert skips.counts == {"prompts whose responses are all tied": 1}
    assert ranking_of(out[0]).groups == [0, 1, 1]
    with pytest.raises(UserError, match="permutation"):
        label_samples(samples[:1], lambda record, responses: [["aa"], [], ["b", "c"]])


@pytest.mark.parametrize("ranked,message", [
    (["a"], "the labeler must return a permutation of the responses (tied ones as non-empty "
            "lists), or one score per response; it did not for id 't7'"),
    (["a", "b", "b"], "the labeler must return a permutation of the responses (tied ones as "
                      "non-empty lists), or one score per response; it did not for id 't7'"),
    (["a", 2], "the labeler must return a permutation of the responses (tied ones as non-empty "
               "lists), or one score per response; it did not for id 't7'"),
    (None, "the labeler returned None for id 't7', not a list: the responses best first (tied "
           "ones as lists), or one score per response"),
    # one value per response, as scores are: "must return a permutation" misled
    ([True, False], "the labeler returned a bool (True) as the score of response 1 of 2 for id "
                    "'t7'; a score must be a real number"),
    ([0.5, None], "the labeler returned None as the score of response 2 of 2 for id 't7'; a "
                  "score must be a real number"),
    ([[0.5], [0.1]], "the labeler returned a list holding a float (0.5) inside a list for id "
                     "'t7': a level of tied responses holds texts; scores are one real number "
                     "per response, in a flat list")])
def test_a_labeler_that_returns_no_permutation_is_named_by_file_line_and_id(ranked, message):
    # The docstring promised the samples file and line; the error named neither, nor the id.
    samples = [{"id": "t7", "prompt": "p", "responses": ["a", "b"], "_line": 3}]
    with pytest.raises(UserError) as e:
        label_samples(samples, lambda record, responses: ranked, source="samples.jsonl")
    assert str(e.value) == f"samples.jsonl:3, field 'ranked': {message}"


def test_prompts_longer_than_the_context_are_skipped_and_counted(run, tmp_path, capsys):
    d, _ = run
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": 1, "prompt": "Is the cat happy?"}) + "\n"
                 + json.dumps({"id": 2, "prompt": "cat " * 200}) + "\n")
    assert main(["sample", "--model", str(d / "sft"), "--prompts", str(f), "--k", "2",
                 "--out", str(tmp_path / "s.jsonl"), "--max-new-tokens", "4"]) == 0
    assert len(read_jsonl(tmp_path / "s.jsonl")) == 1
    assert ("skipped 1 prompt: 1 prompt longer than the context minus max_new_tokens\n"
            in capsys.readouterr().err)


MYRANK = '''
def reward(prompts, responses, records):
    from pathlib import Path

    from mywords import score  # a neighbour imported at call time, as under python -m
    Path("called").write_text(str(len(responses)))
    return [score(r) for r in responses]
'''


def test_the_console_script_finds_a_reward_module_in_the_working_directory(tmp_path):
    """`gptlab ppo --reward-fn myrank:reward` with myrank.py in the current directory: the
    console script does not put the working directory on sys.path, `python -m gptlab` does."""
    script = Path(sys.executable).parent / "gptlab"
    if not script.exists():
        pytest.skip("the gptlab console script is not installed next to this Python")
    tok = train_tokenizer(["Is the cat happy? yes no maybe ok"] * 20, vocab_size=270)
    torch.manual_seed(0)
    save_model(tmp_path / "base", GPT(dataclasses.replace(
        get_preset("tiny"), vocab_size=tok.vocab_size, context=32)), tok)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"id": "t0", "prompt": "Is it?"}) + "\n")
    (tmp_path / "myrank.py").write_text(MYRANK)
    (tmp_path / "mywords.py").write_text("def score(r):\n    return float(len(r))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(script), "ppo", "--policy", "base", "--reward-fn", "myrank:reward",
                        "--prompts", "prompts.jsonl", "--out", "out", "--steps", "1",
                        "--batch-size", "2", "--minibatch-size", "2", "--max-new-tokens", "4"],
                       cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int((tmp_path / "called").read_text()) >= 1
    assert (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("spec,write", [
    ("myreward.py:score", "write myreward:score"), ("./myreward.py:score", "write myreward:score"),
    ("tasks/myreward:score", "write tasks.myreward:score"),
    # a directory no module name can hold: no 'write my-tasks.myreward:score'
    ("my-tasks/myreward.py:score", "put its directory on PYTHONPATH (or run from there) and "
                                   "write myreward:score"),
    ("/abs/myreward.py:score", "put its directory on PYTHONPATH (or run from there) and write "
                               "myreward:score")])
def test_a_reward_function_given_as_a_file_says_the_module_to_write(spec, write):
    # Python's own error was all there was: "No module named 'myreward.py'", or a TypeError
    # about relative imports for ./myreward.py.
    from gptlab.train.ppo import load_reward_fn
    with pytest.raises(UserError) as err:
        load_reward_fn(spec)
    assert str(err.value) == (f"field 'reward_fn': '{spec}' names a file, where a module is "
                              f"meant: {write}")


@pytest.mark.parametrize("code", [0, 3])
def test_a_reward_module_that_exits_as_it_is_imported_is_named(tmp_path, monkeypatch, code):
    # A module that runs a script's argparse, or sys.exit, when imported ended gptlab in
    # silence, with its exit code: 0, success, with nothing trained.
    from gptlab.train.ppo import load_reward_fn
    name = f"exiting_reward_{code}"
    (tmp_path / f"{name}.py").write_text(f"import sys\nsys.exit({code})\n")
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(UserError) as err:
            load_reward_fn(f"{name}:score")
    finally:
        sys.modules.pop(name, None)
    assert str(err.value) == (f"field 'reward_fn': cannot load '{name}:score': importing {name} "
                              f"failed with SystemExit: {code}")


def test_load_reward_fn_imports_from_the_working_directory(tmp_path, monkeypatch):
    from gptlab.train.ppo import load_reward_fn
    (tmp_path / "cwd_reward_mod.py").write_text("def reward(p, r, rec):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    monkeypatch.setattr(sys, "path", [p for p in sys.path  # as the console script runs
                                      if os.path.abspath(p) != cwd])
    try:
        fn = load_reward_fn("cwd_reward_mod:reward")
        assert fn([], ["x"], [{}]) == [1.0]
        assert sys.path[0] == cwd  # first, as python -m puts it
        assert load_reward_fn("cwd_reward_mod:reward") is fn
        assert sys.path.count(cwd) == 1
    finally:
        sys.modules.pop("cwd_reward_mod", None)
