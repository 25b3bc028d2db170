"""One PPO step's numbers against hand computations on a tiny random policy: the per-token
rewards (−β KL on response tokens, the score on each row's last real token), the missing-EOS
penalty, the sampling temperature shared by rollout, reference and update, the update's total
loss, and the logged KL."""
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.checkpoint import load_model, save_model
from gptlab.errors import UserError
from gptlab.model import GPT, get_preset
from gptlab.model.heads import ScalarHeadModel
from gptlab.tokenizer import train_tokenizer
from gptlab.train import ppo as ppo_module
from gptlab.train.ppo import (PPOConfig, PPOTrainer, Rollout, layout, response_logprobs,
                              response_values)
from gptlab.train.rl_math import clipped_policy_loss, clipped_value_loss

import instruct_task as task

T = 1.5  # the pipeline's PPO temperature; at 1.0 a forgotten temperature would go unseen


def record_score(prompts, responses, records):
    """Each record's own `score`: a reward function whose opinions we choose."""
    return [r.get("score", 0.0) for r in records]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny policy, and another one of the same tokenizer to be its reference."""
    d = tmp_path_factory.mktemp("ppo_step")
    paths = task.write_task(d, n=40)
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
    for seed, name in ((0, "policy"), (1, "reference")):
        torch.manual_seed(seed)
        save_model(d / name, GPT(cfg), tok)
    return d, paths


def trainer(setup, out, reward_fn=record_score, **kw):
    d, paths = setup
    cfg = PPOConfig(policy=str(d / "policy"), prompts=str(paths["prompts"]), out=str(out),
                    device="cpu", temperature=T, max_new_tokens=6, batch_size=4,
                    minibatch_size=4, ppo_epochs=1, **kw)
    return PPOTrainer(cfg, reward_fn=reward_fn)


def hand_rollout(t, prompts, responses, finished):
    ids, mask, rmask, P, prefix = layout(prompts, responses, t.tok.pad_id, "cpu")
    return Rollout(ids, mask, rmask, P, [{"prompt": "p", "score": 0.0} for _ in prompts],
                   responses, torch.tensor(finished), prefix)


@torch.no_grad()
def row_logprobs(model, prompt, response, temperature):
    """log softmax(logits / T) of each response token, from one unpadded forward."""
    logits = model(torch.tensor([prompt + response]))[0, len(prompt) - 1:-1].float()
    return (logits / temperature).log_softmax(-1).gather(
        -1, torch.tensor(response)[:, None])[:, 0]


# Rows of different response lengths: 3 and 1 are right-padded to 6.
PROMPTS = [[20, 21, 22, 23], [30, 31], [40, 41, 42]]
RESPONSES = [[50, 51, 52], [60, 61, 62, 63, 64, 65], [70]]


def test_rewards_are_minus_beta_kl_on_response_tokens_and_the_score_on_the_last(setup,
                                                                              tmp_path):
    # γ = λ = 0: A_t = r_t − V_t, so the returns are the per-token rewards themselves.
    beta = 0.5
    t = trainer(setup, tmp_path / "run", reference=str(setup[0] / "reference"), kl_coef=beta,
                gae_gamma=0.0, gae_lambda=0.0, whiten_advantages=False)
    ro = hand_rollout(t, PROMPTS, RESPONSES, [True] * 3)
    scores = torch.tensor([1.0, -2.0, 3.0])
    batch = t.advantages(ro, scores)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        n = len(r)
        logp = row_logprobs(t.policy, p, r, T)
        kl = logp - row_logprobs(t.reference, p, r, T)
        assert kl.abs().max() > 0.05  # the two models disagree: the KL term is seen
        rewards = -beta * kl
        rewards[-1] += scores[i]
        torch.testing.assert_close(batch["old_logp"][i, :n], logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(batch["kl"][i, :n], kl, atol=1e-5, rtol=0)
        torch.testing.assert_close(batch["returns"][i, :n], rewards, atol=1e-5, rtol=0)
        # Padding carries no KL and no reward.
        assert batch["kl"][i, n:].eq(0).all() and batch["returns"][i, n:].eq(0).all()


def test_a_missing_eos_is_penalised_on_unfinished_responses_only(setup, tmp_path):
    t = trainer(setup, tmp_path / "run", missing_eos_penalty=0.7)
    ro = hand_rollout(t, PROMPTS, RESPONSES, [True, False, True])
    ro.records = [{"prompt": "p", "score": s} for s in (1.0, 2.0, 3.0)]
    torch.testing.assert_close(t.score(ro), torch.tensor([1.0, 1.3, 3.0]))


def test_rollout_reference_and_update_use_the_sampling_temperature(setup, tmp_path,
                                                                   monkeypatch):
    gens, real = [], ppo_module.generate

    def spy(*args, **kw):
        gens.append(real(*args, **kw))
        return gens[-1]
    monkeypatch.setattr(ppo_module, "generate", spy)
    t = trainer(setup, tmp_path / "run")  # the reference is the initial policy
    ro = t.rollout(1)
    batch = t.advantages(ro, t.score(ro))
    m = ro.response_mask.bool()
    # The engine's log-probs of the tokens it sampled are those the update's ratio starts from.
    sampled = torch.tensor([x for row in gens[0].logprobs for x in row])
    torch.testing.assert_close(batch["old_logp"][m], sampled, atol=1e-4, rtol=0)
    at_one, _ = response_logprobs(t.policy, ro, 1.0)
    assert (at_one - batch["old_logp"])[m].abs().max() > 0.01  # T matters for these numbers
    # The reference is the policy at the same temperature: no KL at all.
    assert batch["kl"].eq(0).all()
    # One minibatch, before any optimizer step: the ratio is exactly 1.
    stats = t.update(ro, batch, t.cfg.lr, 1).read()
    assert stats["approx_kl"] == 0 and stats["clipfrac"] == 0


def test_with_dropout_in_the_policy_rollout_and_update_see_one_network(setup, tmp_path,
                                                                       monkeypatch):
    # The setup's policy has no dropout, where a policy, reference or value model left in
    # training mode would go unseen: here each of their forwards would draw its own mask.
    d, paths = setup
    _, tok, _ = load_model(d / "policy")
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64,
                              dropout=0.3)
    torch.manual_seed(0)
    save_model(tmp_path / "policy", GPT(cfg), tok)
    t = PPOTrainer(PPOConfig(policy=str(tmp_path / "policy"), prompts=str(paths["prompts"]),
                             out=str(tmp_path / "run"), device="cpu", temperature=T,
                             max_new_tokens=6, batch_size=8, minibatch_size=2, ppo_epochs=2),
                   reward_fn=record_score)
    ro = t.rollout(1)
    batch = t.advantages(ro, t.score(ro))
    assert batch["kl"].eq(0).all()  # the reference is the initial policy: the same network
    kls = []
    real = ppo_module.clipped_policy_loss

    def spy(*args, **kw):
        loss, stats = real(*args, **kw)
        kls.append(float(stats["approx_kl"].detach()))
        return loss, stats
    monkeypatch.setattr(ppo_module, "clipped_policy_loss", spy)
    t.update(ro, batch, t.cfg.lr, 1)
    # The first minibatch, before any optimizer step, recomputes the rollout's log-probs: ratio 1.
    assert len(kls) == 8 and kls[0] == 0
    assert not any(m.training for m in (t.policy, t.reference, t.value_model))


def test_the_logged_entropy_is_at_the_temperature_and_keeps_no_graph(setup, tmp_path):
    # Only logged: its graph kept two (B, R, V) tensors alive through the update's backward and
    # the next minibatch's forward.
    t = trainer(setup, tmp_path / "run")
    ro = hand_rollout(t, PROMPTS, RESPONSES, [True] * 3)
    logp, entropy = response_logprobs(t.policy, ro, T, with_entropy=True)
    assert logp.requires_grad and entropy.grad_fn is None and not entropy.requires_grad
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
            logits = t.policy(torch.tensor([p + r]))[0, len(p) - 1:-1].float() / T
            want = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            torch.testing.assert_close(entropy[i, :len(r)], want, atol=1e-5, rtol=0)


def test_the_update_loss_is_pg_plus_vf_coef_vf_plus_ptx_coef_ptx(setup, tmp_path, monkeypatch):
    d, paths = setup
    vf_coef, ptx_coef = 0.3, 0.25
    t = trainer(setup, tmp_path / "run", reference=str(d / "reference"), vf_coef=vf_coef,
                ptx_coef=ptx_coef, ptx_data=[str(paths["corpus"])], ptx_batch_size=2,
                ptx_block_size=16, cache_dir=str(tmp_path / "cache"))
    ro = t.rollout(1)
    for i, rec in enumerate(ro.records):
        rec["score"] = float(i) - 1.5
    batch = t.advantages(ro, t.score(ro))
    # By hand on the whole batch (the update's one minibatch is the batch in another order).
    state = t.ptx.state()
    block = next(t.ptx)
    t.ptx.load_state(state)
    m = ro.response_mask.float()
    logp, _ = response_logprobs(t.policy, ro, T)
    pg, _ = clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], m, t.cfg.clip)
    vf, _ = clipped_value_loss(response_values(t.value_model, ro), batch["old_values"],
                               batch["returns"], m, t.cfg.value_clip)
    ptx = t.policy(block[:, :-1], labels=block[:, 1:])
    t.optimizer.zero_grad(set_to_none=True)
    (pg + vf_coef * vf + ptx_coef * ptx).backward()
    want = [p.grad.clone() for p in t.trained.parameters() if p.grad is not None]
    t.optimizer.zero_grad(set_to_none=True)

    got = []
    real = ppo_module.clip_grad_norm

    def spy(model, max_norm):  # the gradients of the update's loss, before clipping
        got.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        return real(model, max_norm)
    monkeypatch.setattr(ppo_module, "clip_grad_norm", spy)
    stats = t.update(ro, batch, t.cfg.lr, 1).read()
    assert stats["pg_loss"] == pytest.approx(pg.item(), abs=1e-6)
    assert stats["value_loss"] == pytest.approx(vf.item(), rel=1e-5)
    assert stats["ptx_loss"] == pytest.approx(ptx.item(), rel=1e-5)
    assert len(got) == 1 and len(got[0]) == len(want)
    for g, w in zip(got[0], want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_the_logged_kl_is_the_per_sequence_sum_averaged_over_responses(setup, tmp_path):
    t = trainer(setup, tmp_path / "run", reference=str(setup[0] / "reference"), steps=1)
    batches = []
    real = t.advantages

    def spy(ro, scores):
        batches.append(real(ro, scores))
        return batches[-1]
    t.advantages = spy
    t.train()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    kl = batches[0]["kl"]
    per_sequence = kl.sum(1).mean().item()
    assert kl.mean().item() != pytest.approx(per_sequence, rel=0.5)  # the readings differ
    assert row["kl"] == pytest.approx(per_sequence, rel=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_logged_kl_coef_is_the_beta_of_the_step_as_given(setup, tmp_path, adaptive):
    # It went through a float32 tensor: --kl-coef 0.02 was logged as 0.019999999552965164.
    t = trainer(setup, tmp_path / "run", kl_coef=0.02, adaptive_kl=adaptive, steps=2)
    betas = []
    real = t.update

    def spy(*args):
        betas.append(t.kl_ctl.value if adaptive else 0.02)  # before this step's update
        return real(*args)
    t.update = spy
    t.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["kl_coef"] for r in rows] == betas and betas[0] == 0.02
    if adaptive:
        assert betas[1] != 0.02  # the controller moved it


@pytest.mark.parametrize("chat", [False, True])
def test_the_reward_model_reads_a_rollout_as_it_read_its_rankings(setup, tmp_path, chat):
    # The reward model learned on responses closed by EOS (or the end of turn), cut at
    # max_new_tokens or not (`encode_response`); PPO fed it a cut response without one, so its
    # score was read on another token than in training, of a sequence it had never seen.
    from gptlab.data.instruct import Ranking, encode_prompt, end_of_response
    from gptlab.model.attention import common_prefix_length
    from gptlab.model.heads import ScalarHeadModel
    from gptlab.train.reward import collate_rankings, encode_ranking, ranked_scores
    d, paths = setup
    policy, tok, _ = ppo_module.load_model(d / "policy")
    torch.manual_seed(3)
    rm = ScalarHeadModel.from_gpt(policy)
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # scores that differ between responses
    save_model(tmp_path / "rm", rm, tok, extra={"stage": "reward"})
    t = PPOTrainer(PPOConfig(policy=str(d / "policy"), prompts=str(paths["prompts"]),
                             out=str(tmp_path / "run"), reward=str(tmp_path / "rm"), device="cpu",
                             max_new_tokens=6, batch_size=4, minibatch_size=4,
                             missing_eos_penalty=0.0))
    prompt = [{"role": "user", "content": "Is the cat happy?"}] if chat else "Is the cat happy?"
    texts = ["yes", "no no maybe", "ok yes"]
    # The first answer ended with its EOS; the other two were cut at max_new_tokens.
    responses = [tok.encode(texts[0]) + [tok.eos_id], tok.encode(texts[1]), tok.encode(texts[2])]
    finished = [True, False, False]
    prompts = [encode_prompt(tok, prompt)] * 3
    for shared in (0, common_prefix_length(prompts)):
        ids, mask, rmask, P, prefix = layout(prompts, responses, tok.pad_id, "cpu", shared)
        record = {"messages": prompt} if chat else {"prompt": prompt}
        ro = Rollout(ids, mask, rmask, P, [record] * 3, responses, torch.tensor(finished),
                     prefix, [end_of_response(tok, prompt)] * 3)
        got = t.score(ro)
        # The reward stage's own path: the three as a ranking, encoded, batched and scored.
        batch = collate_rankings([encode_ranking(tok, Ranking(prompt, texts), 64)], tok.pad_id)
        want = ranked_scores(t.reward_model, batch)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert len(set(round(x, 3) for x in want.tolist())) == 3


def test_a_cut_response_that_fills_the_context_gives_its_last_token_to_the_eos(setup,
                                                                               tmp_path):
    from gptlab.train.ppo import reward_model_scores
    from gptlab.train.reward import scored_response
    from gptlab.model.heads import ScalarHeadModel
    d, _ = setup
    policy, tok, _ = ppo_module.load_model(d / "policy")
    torch.manual_seed(3)
    rm = ScalarHeadModel.from_gpt(policy).eval()
    prompts = [[20, 21, 22, 23] * 14, [30, 31]]  # 56 and 2 tokens; the context is 64
    cut = [list(range(40, 48)), list(range(50, 58))]  # 8 tokens each, no EOS
    closed = [scored_response(r, False, [tok.eos_id], 64 - len(p)) for p, r in zip(prompts, cut)]
    assert closed == [cut[0][:7] + [tok.eos_id], cut[1] + [tok.eos_id]]
    got = reward_model_scores(rm, prompts, closed, tok.pad_id, "cpu")  # 56 + 9 > 64: row by row
    with torch.no_grad():
        want = [float(rm(torch.tensor([p + r]))[0]) for p, r in zip(prompts, closed)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def _reward_trainer(d, prompts, out, tok=None):
    """A trainer scoring with a random reward model built from the policy in `d`."""
    from gptlab.model.heads import ScalarHeadModel
    policy, policy_tok, _ = ppo_module.load_model(d / "policy")
    torch.manual_seed(3)
    rm = ScalarHeadModel.from_gpt(policy)
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # scores that differ between responses
    save_model(out / "rm", rm, tok or policy_tok, extra={"stage": "reward"})
    if tok is not None:
        save_model(out / "policy", policy, tok)
    return PPOTrainer(PPOConfig(policy=str(out / "policy" if tok else d / "policy"),
                                prompts=str(prompts), out=str(out / "run"),
                                reward=str(out / "rm"), device="cpu", max_new_tokens=6,
                                batch_size=2, minibatch_size=2, missing_eos_penalty=0.0))


def test_a_rollout_with_a_shared_prompt_prefix_is_scored_as_each_whole_sequence(setup, tmp_path):
    # Prompts of different lengths that share their first 20 tokens: the prefix is encoded once
    # and the rest left-padded. Each row is scored as its own prompt + response, the cut one
    # closed by EOS within the context (its prompt fills all the room max_new_tokens leaves).
    from gptlab.model.attention import common_prefix_length
    d, paths = setup
    t = _reward_trainer(d, paths["prompts"], tmp_path)
    eos = t.tok.eos_id
    head = list(range(10, 30))
    prompts = [head + [40] * 38, head + [41, 42]]  # 58 (= 64 - max_new_tokens) and 22 tokens
    responses = [list(range(50, 56)), [60, 61, eos]]  # cut at max_new_tokens; finished
    shared = common_prefix_length(prompts)
    assert shared == 20
    ids, mask, rmask, P, prefix = layout(prompts, responses, t.tok.pad_id, "cpu", shared)
    ro = Rollout(ids, mask, rmask, P, [{"prompt": "p"}] * 2, responses,
                 torch.tensor([False, True]), prefix, [[eos], [eos]])
    got = t.score(ro)
    with torch.no_grad():
        want = [float(t.reward_model(torch.tensor([p + r]))[0]) for p, r in
                zip(prompts, [responses[0][:5] + [eos], responses[1]])]
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_each_prompt_of_a_rollout_is_closed_by_its_own_end_of_turn(setup, tmp_path):
    # A text prompt's response ends with EOS, a chat prompt's with the template's end of turn
    # (Llama 2's " " + EOS): in one batch, each response is scored with the end of its prompt.
    from gptlab.data.instruct import end_of_response, prompt_of
    from gptlab.tokenizer import BOS, EOS, PAD, Tokenizer
    d, paths = setup
    base = ppo_module.load_model(d / "policy")[1]
    llama2 = Tokenizer(base.hf, BOS, EOS, PAD, chat_template=(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
        "' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Is the cat happy?"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Is the dog happy?"}]}) + "\n")
    t = _reward_trainer(d, prompts, tmp_path, tok=llama2)
    ends = [end_of_response(t.tok, prompt_of(r)) for r in t.records]
    assert ends[0] == [t.tok.eos_id] and len(ends[1]) == 2
    ro = t.rollout(0)
    assert len(ro.records) == 2
    assert ro.ends == [end_of_response(t.tok, prompt_of(r)) for r in ro.records]


def test_any_seed_in_torchs_range_runs_a_step_and_one_outside_is_refused(setup, tmp_path):
    """Each step's seeds are derived from --seed (seed * 100_003 + step): a large seed must
    not overflow torch's generator midway through the first update."""
    for bad in (-1, 2**64):
        with pytest.raises(UserError) as e:
            trainer(setup, tmp_path / f"bad{bad}", seed=bad)
        assert e.value.field == "seed"
    t = trainer(setup, tmp_path / "big", seed=2**64 - 1)
    ro = t.rollout(1)
    batch = t.advantages(ro, t.score(ro))
    stats = t.update(ro, batch, 1e-4, 1).read()
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


def returning(value):
    """A reward function that returns `value` for any batch."""
    def fn(prompts, responses, records):
        return value
    return fn


@pytest.mark.parametrize("value, said", [
    # NumPy's and torch's bools were read as 1.0 and 0.0, where Python's were refused.
    (np.array([True, False, True]), "a bool (np.True_) for prompt id q1; a score must be a "
                                    "real number"),
    ([1.0, np.False_, 1.0], "a bool (np.False_) for prompt id q2; a score must be a real "
                            "number"),
    (torch.tensor([True, False, True]), "a Tensor (tensor(True)) for prompt id q1; a score must "
                                        "be a real number"),
    # A dict was read through its keys (0, 1, 2 as the scores); a set has no order, a string's
    # characters are no scores.
    ({0: 1.0, 1: 1.0, 2: 1.0}, "a dict, not a list of 3 scores (one per response)"),
    ({1.0, 2.0, 3.0}, "a set, not a list of 3 scores (one per response)"),
    ("123", "a str, not a list of 3 scores (one per response)"),
    # A 0-d tensor or array was "raised TypeError: iteration over a 0-d tensor": the function
    # raised nothing.
    (torch.tensor(1.0), "a Tensor, not a list of 3 scores (one per response)"),
    (np.array(1.0), "an ndarray, not a list of 3 scores (one per response)")])
def test_a_reward_function_s_return_that_is_no_list_of_real_numbers_is_refused(
        setup, tmp_path, value, said):
    t = trainer(setup, tmp_path / "run", reward_fn=returning(value))
    t.reward_fn_name = "own:fn"
    ro = hand_rollout(t, PROMPTS, RESPONSES, [True] * 3)
    ro.records = [{"prompt": "p", "id": f"q{i + 1}"} for i in range(3)]
    with pytest.raises(UserError) as e:
        t.score(ro)
    assert str(e.value).endswith("field 'reward_fn': the reward function own:fn returned "
                                 + said), str(e.value)
    # A list, a tuple, a generator and a 1-D array or tensor of numbers are scores.
    for good in ([1, 2.5, 3], (1, 2.5, 3), (x for x in [1, 2.5, 3]), np.array([1, 2.5, 3]),
                 torch.tensor([1, 2.5, 3])):
        t.reward_fn = returning(good)
        assert t.score(ro).tolist() == [1.0, 2.5, 3.0]


def test_a_reward_function_that_edits_its_prompts_changes_none_of_ppo_s(setup, tmp_path):
    # It was given PPO's own records: appending the response to a prompt's messages, to score
    # the conversation, made the next draw of that prompt "must end on a user turn".
    def conversation_score(prompts, responses, records):
        for m, r, rec in zip(prompts, responses, records):
            m.append({"role": "assistant", "content": r})
            rec["seen"] = True
        return [float(len(m)) for m in prompts]
    t = trainer(setup, tmp_path / "run", reward_fn=conversation_score)
    ro = hand_rollout(t, PROMPTS, RESPONSES, [True] * 3)
    ro.records = [{"messages": [{"role": "user", "content": "hi"}]} for _ in range(3)]
    before = json.dumps(ro.records)
    assert t.score(ro).tolist() == [2.0] * 3
    assert t.score(ro).tolist() == [2.0] * 3  # the second call sees the prompts unchanged
    assert json.dumps(ro.records) == before


def test_a_bad_score_names_the_prompts_file_and_line_of_its_prompt(setup, tmp_path):
    """A prompt without an `id` was named by its position in the step's draw ('prompt id 1'),
    which no file holds; the score's prompt is found by its file and line."""
    t = trainer(setup, tmp_path / "run")
    ro = hand_rollout(t, PROMPTS, RESPONSES, [True] * 3)
    ro.records = [{"prompt": "p", "score": 1.0, "_line": 7},
                  {"prompt": "p", "score": float("nan"), "_line": 3},
                  {"prompt": "p", "score": "2", "_line": 5, "id": "q5"}]
    with pytest.raises(UserError) as e:
        t.score(ro)
    assert str(e.value) == (f"{t.cfg.prompts}:3, field 'reward_fn': the reward function "
                            f"{__name__}:record_score returned a non-finite score (nan)")
    ro.records[1]["score"] = 0.0
    with pytest.raises(UserError) as e:
        t.score(ro)
    assert str(e.value) == (f"{t.cfg.prompts}:5, field 'reward_fn': the reward function "
                            f"{__name__}:record_score returned a str ('2') for prompt id q5; "
                            f"a score must be a real number")


@pytest.mark.parametrize("returned,what", [(None, "None"), (1.0, "a float")])
def test_a_reward_function_that_returns_no_list_says_so(setup, tmp_path, returned, what):
    """A function that forgot its `return` was reported as having raised ('raised TypeError:
    'NoneType' object is not iterable'): the error was list()'s, not the function's."""
    t = trainer(setup, tmp_path / "run")
    t.reward_fn = lambda prompts, responses, records: returned
    with pytest.raises(UserError) as e:
        t.score(hand_rollout(t, PROMPTS, RESPONSES, [True] * 3))
    assert str(e.value) == (f"field 'reward_fn': the reward function {__name__}:record_score "
                            f"returned {what}, not a list of 3 scores (one per response)")


def test_the_rewards_take_the_adaptive_beta_and_the_controller_counts_the_batch(setup,
                                                                               tmp_path):
    # The penalty uses the controller's β of the step, not --kl-coef ...
    t = trainer(setup, tmp_path / "a", reference=str(setup[0] / "reference"), kl_coef=0.5,
                adaptive_kl=True, gae_gamma=0.0, gae_lambda=0.0, whiten_advantages=False)
    t.kl_ctl.value = 2.0
    ro = hand_rollout(t, PROMPTS, RESPONSES, [True] * 3)
    batch = t.advantages(ro, torch.zeros(3))
    m = ro.response_mask.float()
    torch.testing.assert_close(batch["returns"], -2.0 * batch["kl"] * m, atol=1e-6, rtol=0)
    assert float(batch["beta"]) == 2.0 and batch["kl"].abs().max() > 0.05
    # ... and the controller moves β by the step's KL over as many samples as the batch held:
    # β ← β · (1 + clip(KL / target − 1, ±0.2) · n / horizon), n = 4 prompts.
    t = trainer(setup, tmp_path / "b", reference=str(setup[0] / "reference"), kl_coef=0.5,
                adaptive_kl=True, target_kl=0.1, kl_horizon=20, steps=2)
    t.train()
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    error = max(-0.2, min(0.2, rows[0]["kl"] / 0.1 - 1))
    assert rows[1]["kl_coef"] == pytest.approx(0.5 * (1 + error * 4 / 20), rel=1e-9)
    assert rows[1]["kl_coef"] != 0.5


def test_the_learning_rate_warms_up_from_the_first_step(setup, tmp_path):
    t = trainer(setup, tmp_path / "run", lr=1e-3, warmup_steps=2, steps=3)
    t.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3], rel=1e-12)


def test_a_prompt_that_leaves_exactly_max_new_tokens_is_drawn_and_not_counted_skipped(
        setup, tmp_path):
    d, paths = setup
    t = trainer(setup, tmp_path / "probe")
    longest = max(len(p) for p in t.prompt_ids)
    cfg = dataclasses.replace(t.cfg, out=str(tmp_path / "run"),
                              max_new_tokens=t.context - longest, batch_size=40)
    t = PPOTrainer(cfg, reward_fn=record_score)
    assert len(t.records) == 40 and t.skips.total == 0
    ro = t.rollout(1)
    assert len(ro.records) == 40  # the longest prompts fill the context with their response


@pytest.mark.parametrize("whiten", [True, False])
def test_advantages_are_whitened_over_the_real_tokens_unless_asked_not_to(setup, tmp_path,
                                                                          whiten):
    from gptlab.train.rl_math import gae
    t = trainer(setup, tmp_path / "run", reference=str(setup[0] / "reference"),
                whiten_advantages=whiten)
    ro = hand_rollout(t, PROMPTS, RESPONSES, [True] * 3)
    batch = t.advantages(ro, torch.tensor([1.0, -2.0, 3.0]))
    m = ro.response_mask.float()
    rewards = -t.cfg.kl_coef * batch["kl"]
    rewards[torch.arange(3), m.sum(1).long() - 1] += torch.tensor([1.0, -2.0, 3.0])
    raw, _ = gae(rewards, batch["old_values"] * m, m, t.cfg.gae_gamma, t.cfg.gae_lambda)
    real = batch["advantages"][m.bool()]
    if whiten:
        assert real.mean().item() == pytest.approx(0, abs=1e-5)
        assert real.var(unbiased=False).item() == pytest.approx(1, abs=1e-4)
        assert batch["advantages"][~m.bool()].eq(0).all()
    else:
        torch.testing.assert_close(batch["advantages"], raw, atol=1e-6, rtol=0)
        assert abs(real.mean().item()) > 0.01


def test_each_step_samples_and_shuffles_its_minibatches_with_its_own_seed(setup, tmp_path):
    t = trainer(setup, tmp_path / "probe")
    cfg = dataclasses.replace(t.cfg, out=str(tmp_path / "run"), batch_size=8, minibatch_size=4,
                              ppo_epochs=2, steps=2)
    t = PPOTrainer(cfg, reward_fn=record_score)
    orders, seeds = [], []
    real_rows, real_generate = Rollout.rows, ppo_module.generate

    def rows(self, idx, at=None):
        orders[-1].append(idx.tolist())
        assert at == orders[-1][-1]  # the host's copy of the rows
        return real_rows(self, idx, at)

    def generate(*args, **kwargs):
        seeds.append(kwargs["seed"])
        orders.append([])
        return real_generate(*args, **kwargs)

    import unittest.mock as mock
    with mock.patch.object(Rollout, "rows", rows), \
            mock.patch.object(ppo_module, "generate", generate):
        t.train()
    assert seeds == [t.step_seed(1), t.step_seed(2)] and seeds[0] != seeds[1]
    for step in orders:  # two epochs of two minibatches, each epoch all 8 rows
        assert len(step) == 4
        for epoch in (step[:2], step[2:]):
            assert sorted(epoch[0] + epoch[1]) == list(range(8))
    assert orders[0] != orders[1]  # another order each step
    assert any(sum(step, []) != list(range(8)) * 2 for step in orders)  # shuffled


def test_the_logged_reward_std_of_two_scores(setup, tmp_path):
    t = trainer(setup, tmp_path / "run")
    ro = hand_rollout(t, PROMPTS[:2], RESPONSES[:2], [True, False])
    batch = {"kl": torch.zeros(2, 6), "beta": torch.tensor(0.1, dtype=torch.float64)}
    row, _, _ = PPOTrainer._rollout_metrics(1, ro, torch.tensor([1.0, 3.0]), batch, 1e-3)
    assert row["reward"] == 2.0 and row["reward_std"] == pytest.approx(2 ** 0.5)
    assert row["eos_fraction"] == 0.5 and row["response_length"] == 4.5


def test_ppo_steps_keep_no_tensors_from_step_to_step(setup, tmp_path):
    """Rollouts, caches, advantages and metrics of a finished step are let go: the live
    tensors after the second step and after the eighth are as many (300 steps measured: 246
    tensors and 332 MB from the first step to the last)."""
    import gc
    t = trainer(setup, tmp_path / "run", steps=8, save_every=0)
    counts, update = {}, t.update

    def counted(*args, **kwargs):
        out = update(*args, **kwargs)
        gc.collect()
        counts[args[3]] = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
        return out
    t.update = counted
    t.train()
    assert sorted(counts) == list(range(1, 9)) and counts[2] == counts[8], counts


def test_out_of_memory_in_a_rollout_or_an_update_names_its_sizes(setup, tmp_path, monkeypatch):
    """`ppo --ptx-batch-size 1000000` ended in the CPU allocator's traceback; now one line
    naming what sizes the update (or the rollout), exit 2, and OUT left unwritten."""
    cpu = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
           "memory: you tried to allocate 16384000000 bytes. Error code 12")
    for part, message in (
            ("update", "field 'minibatch_size': out of memory on cpu in a PPO update with "
                       "minibatch_size 4 (an allocation of 16384000000 bytes); lower it "
                       "(--minibatch-size)"),
            ("rollout", "field 'batch_size': out of memory on cpu in a rollout with batch_size "
                        "4 (an allocation of 16384000000 bytes); lower it (--batch-size)")):
        out = tmp_path / part
        t = trainer(setup, out, steps=2, save_every=0)

        def oom(*args, **kwargs):
            raise RuntimeError(cpu)
        monkeypatch.setattr(t, part, oom)
        with pytest.raises(UserError) as e:
            t.train()
        assert str(e.value) == message and not out.exists()
    ptx = trainer(setup, tmp_path / "ptx", steps=1, ptx_data=[str(setup[1]["corpus"])],
                  ptx_coef=0.1, ptx_batch_size=3, ptx_block_size=8)
    assert ptx._update_sizes() == {"minibatch_size": 4, "ptx_batch_size": 3}


OWN_TURNS = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@pytest.mark.parametrize("template, differs", [
    # a default system prompt, as SmolLM2's template writes one
    ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}{{ '<|system|>\\nBe brief.' + "
     "eos_token }}{% endif %}" + OWN_TURNS, "token 1 of a user-assistant exchange is "
     "'<|system|>' in its rendering, '<|user|>' in the policy's"),
    # text after each end of turn, as ChatML's "\n" after <|im_end|>
    ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + "
     "eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
     "{% endif %}", "is '\\n' in its rendering, '<|assistant|>' in the policy's"),
    ("{{ bos_token }}" + OWN_TURNS, None),  # the policy's template, written otherwise
], ids=["system-prompt", "text-after-end-of-turn", "same"])
def test_a_model_with_another_chat_template_is_noted_once_naming_both(setup, tmp_path, capsys,
                                                                      template, differs):
    # Only the vocabulary was checked: a reward model trained with another template (another
    # default system prompt, another end of turn) scored the policy's conversations without a
    # word. Noted, not refused: one trained on the same base with a plainer one may be meant.
    from gptlab.model.heads import ScalarHeadModel
    from gptlab.tokenizer import BOS, EOS, PAD, Tokenizer
    d, paths = setup
    policy, tok, _ = ppo_module.load_model(d / "policy")
    other = Tokenizer(tok.hf, BOS, EOS, PAD, chat_template=template)
    save_model(tmp_path / "rm", ScalarHeadModel.from_gpt(policy), other,
               extra={"stage": "reward"})
    capsys.readouterr()
    # the same directory as the value model's start too: one note
    PPOTrainer(PPOConfig(policy=str(d / "policy"), prompts=str(paths["prompts"]),
                         out=str(tmp_path / "run"), reward=str(tmp_path / "rm"),
                         value=str(tmp_path / "rm"), device="cpu", max_new_tokens=6,
                         batch_size=2, minibatch_size=2))
    notes = capsys.readouterr().err.splitlines()
    if differs is None:
        assert notes == []
        return
    assert len(notes) == 1, notes
    assert notes[0].startswith(
        f"note: --reward {tmp_path / 'rm'}: its chat template writes a conversation otherwise "
        f"than the policy's (--policy {d / 'policy'}): token ")
    assert notes[0].endswith(f"{differs}; PPO gives the reward model conversations as the "
                             f"policy's template writes them")


@pytest.mark.parametrize("tail", [False, True])
def test_ppo_gives_the_template_tail_only_to_a_reward_model_that_reads_it(tmp_path, tail):
    """With a ChatML policy, PPO closes each response with <|im_end|> and, for a reward model
    that reads_template_tail (a Hugging Face classifier's), the "\\n" after it: the score is
    its reading of prompt + response + <|im_end|> + "\\n". gptlab's own reward model, trained
    without that "\\n", reads the response closed by <|im_end|> alone, as it was trained."""
    from gptlab.data.instruct import encode_prompt
    from test_reward import chatml_models
    tok, im_end, newline, _, rm = chatml_models(tail, tmp_path)
    chats = [[{"role": "user", "content": "the dog"}],
             [{"role": "user", "content": "the lazy fox"}]]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": c}) + "\n"
                                                    for c in chats))
    t = PPOTrainer(PPOConfig(policy=str(tmp_path / "policy"), reward=str(tmp_path / "rm"),
                             prompts=str(tmp_path / "prompts.jsonl"), out=str(tmp_path / "run"),
                             device="cpu", max_new_tokens=6, batch_size=2, minibatch_size=2,
                             missing_eos_penalty=0.0))
    assert t.prompt_ends == [[im_end], [im_end]]
    assert t.prompt_tails == ([newline, newline] if tail else [[], []])
    ro = t.rollout(0)
    assert ro.tails == t.prompt_tails
    got = t.score(ro).tolist()
    read, other = [], []
    with torch.no_grad():
        for rec, r, done in zip(ro.records, ro.responses, ro.finished.tolist()):
            closed = encode_prompt(tok, rec["prompt"]) + (r[:-1] if done else r) + [im_end]
            read.append(float(rm(torch.tensor([closed + (newline if tail else [])]))[0]))
            other.append(float(rm(torch.tensor([closed + ([] if tail else newline)]))[0]))
    assert got == pytest.approx(read, abs=1e-5)
    assert all(abs(a - b) > 1e-2 for a, b in zip(read, other))  # the "\n" moves every score


def test_a_saved_value_model_reads_as_its_reward_model_and_its_settings_mislead_no_loader(
        tmp_path):
    """PPO's value model starts as a copy of the reward model, the normalisation folded into
    its head, and its directories (checkpoints/step-N/value, OUT/value) carry the reward
    model's pad_token_id and reads_template_tail. Those say where `forward` reads a sequence's
    score, which the fold leaves as the reward model's: loaded, the untrained copy scores as
    the reward model does, a row closed by <|im_end|> (the pad) read before it. `values`, all
    that PPO reads of a value model, is per position whatever they say: a --value start and a
    resume get the saved values exactly, the fold not applied twice."""
    import copy
    from gptlab.data.instruct import encode_prompt
    from test_reward import chatml_models
    tok, im_end, newline, _, rm = chatml_models(True, tmp_path)
    rm.pad_token_id = im_end  # SmolLM2's: its end of turn
    rm.score_bias.fill_(0.3)
    rm.score_scale.fill_(2.0)
    save_model(tmp_path / "rm", rm, tok, extra={"stage": "reward"})
    chat = [{"role": "user", "content": "the dog"}]
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": chat}) + "\n")
    cfg = PPOConfig(policy=str(tmp_path / "policy"), reward=str(tmp_path / "rm"),
                    prompts=str(tmp_path / "prompts.jsonl"), out=str(tmp_path / "run"),
                    device="cpu", max_new_tokens=6, batch_size=1, minibatch_size=1, steps=1,
                    save_every=1, progress=False)
    t = PPOTrainer(cfg)
    closed = encode_prompt(tok, chat) + tok.encode("the fox") + [im_end]
    rows = [torch.tensor([closed + newline]), torch.tensor([closed])]

    def scores(model):
        with torch.no_grad():
            return [float(model(r)[0]) for r in rows]

    want = scores(rm)
    unpadded = copy.deepcopy(rm)
    unpadded.pad_token_id = None
    assert abs(scores(unpadded)[1] - want[1]) > 1e-2  # the pad moves the second reading
    vm = t.value_model
    assert (float(vm.score_bias), float(vm.score_scale)) == (0.0, 1.0)
    assert scores(vm) == pytest.approx(want, abs=1e-5)
    save_model(tmp_path / "value0", vm)
    assert scores(load_model(tmp_path / "value0")[0]) == pytest.approx(want, abs=1e-5)

    ids = rows[0]
    with torch.no_grad():
        before = vm.values(ids)
    t.train()
    with torch.no_grad():
        trained = vm.values(ids)
    assert not torch.equal(before, trained)  # the step moved it
    run = tmp_path / "run"
    for d in (run / "value", run / "checkpoints" / "step-1" / "value"):
        meta = json.loads((d / "config.json").read_text())
        assert (meta["pad_token_id"], meta["reads_template_tail"]) == (im_end, True)
        saved = load_model(d)[0]
        assert (float(saved.score_bias), float(saved.score_scale)) == (0.0, 1.0)
        with torch.no_grad():
            assert torch.equal(saved.values(ids), trained)
    started = PPOTrainer(dataclasses.replace(cfg, out=str(tmp_path / "run2"),
                                             value=str(run / "value")))
    resumed = PPOTrainer(dataclasses.replace(cfg, steps=2, resume=True))
    assert resumed.resumed_from == run / "checkpoints" / "step-1"
    with torch.no_grad():
        for other in (started, resumed):
            assert torch.equal(other.value_model.values(ids), trained)


def test_a_reward_function_reads_each_response_as_sample_writes_it(tmp_path, monkeypatch):
    """PPO gave a `--reward-fn` each response decoded alone: after Zephyr's
    "<|assistant|>\\n" a SentencePiece "▁yes" lost the space that `sample` writes."""
    from gptlab.engine import SamplingParams
    from gptlab.feedback import sample_responses
    from gptlab.io import write_jsonl_atomic
    from test_cli import answering, sentencepiece_model
    from test_tokenizer import ZEPHYR_CHAT

    tok = sentencepiece_model(tmp_path / "policy", ZEPHYR_CHAT)
    said = [tok.hf.token_to_id(p) for p in ("\u2581yes", "\u2581it")] + [tok.eos_id]
    records = [{"id": 1, "messages": [{"role": "user", "content": "is the cat happy?"}]},
               {"id": 2, "prompt": "is it?"}]
    write_jsonl_atomic(tmp_path / "p.jsonl", records)
    monkeypatch.setattr("gptlab.feedback.generate", answering(said))
    monkeypatch.setattr(ppo_module, "generate", answering(said))
    seen = {}

    def reward(prompts, responses, recs):
        seen.update((r["id"], text) for r, text in zip(recs, responses))
        return [0.0] * len(responses)

    cfg = PPOConfig(policy=str(tmp_path / "policy"), prompts=str(tmp_path / "p.jsonl"),
                    out=str(tmp_path / "out"), device="cpu", max_new_tokens=4, batch_size=2,
                    minibatch_size=2, ppo_epochs=1)
    t = PPOTrainer(cfg, reward_fn=reward)
    t.score(t.rollout(0))
    sampled = sample_responses(t.policy, t.tok, records, 1, SamplingParams(max_new_tokens=4),
                               mark_cut=True)
    assert seen == {r["id"]: r["responses"][0] for r in sampled} == {1: " yes it", 2: " yes it"}


def test_the_value_models_mark_changes_its_config_json_and_nothing_else(setup, tmp_path):
    """OUT/value and checkpoints/step-N/value say `"stage": "value"` in config.json; the
    weights file is the one PPO wrote without it, byte for byte (the demo's published
    SHA-256), and the directory loads to the same scores and values."""
    t = trainer(setup, tmp_path / "run", steps=1, save_every=1)
    t.train()
    plain = save_model(tmp_path / "plain", t.value_model)  # as OUT/value was written before
    want = json.loads((plain / "config.json").read_text())
    ids = torch.tensor([PROMPTS[0] + RESPONSES[0]])
    for d in (tmp_path / "run" / "value", tmp_path / "run" / "checkpoints" / "step-1" / "value"):
        assert json.loads((d / "config.json").read_text()) == {**want, "stage": "value"}
        assert (d / "model.safetensors").read_bytes() == \
            (plain / "model.safetensors").read_bytes()
        loaded, ours = load_model(d)[0], load_model(plain)[0]
        trained = t.value_model.state_dict()
        assert all(torch.equal(w, trained[k]) for k, w in loaded.state_dict().items())
        with torch.no_grad():
            assert torch.equal(loaded(ids), ours(ids))
            assert torch.equal(loaded.values(ids), ours.values(ids))


def test_a_reward_function_reads_a_response_cut_inside_a_character_as_sample_writes_it(
        setup, tmp_path, monkeypatch):
    """A response cut at max_new_tokens between the byte tokens of "€" reached a `--reward-fn`
    whole, ending in U+FFFD, where `sample` writes it without the split character; one that
    ended on its own keeps the U+FFFD the model chose to end on."""
    from gptlab.engine import Generation
    tok = load_model(setup[0] / "policy")[1]
    said = tok.encode("ok €")
    assert len(tok.encode("€")) > 1 and tok.decode(said[:-1]) == "ok \ufffd"
    rows = [said[:-1], said[:-1] + [tok.eos_id]] * 2  # cut, finished, cut, finished

    def generate(model, prompts, params, seed=None, pad_id=0):
        return Generation([list(r) for r in rows], [[0.0] * len(r) for r in rows],
                          [len(r) == len(said) for r in rows])
    monkeypatch.setattr(ppo_module, "generate", generate)
    seen = []

    def reward(prompts, responses, recs):
        seen.extend(responses)
        return [0.0] * len(responses)

    t = trainer(setup, tmp_path / "out", reward_fn=reward)
    t.score(t.rollout(0))
    assert seen == ["ok ", "ok \ufffd", "ok ", "ok \ufffd"]


def test_the_update_clips_the_ratio_by_clip_and_the_value_by_value_clip(setup, tmp_path,
                                                                        monkeypatch):
    # Both default to 0.2, where swapping them goes unseen; the one minibatch's ratio is 1 and
    # its values the rollout's, where no clip binds: the losses are told which ε they use.
    t = trainer(setup, tmp_path / "run", clip=0.1, value_clip=0.3)
    ro = t.rollout(1)
    batch = t.advantages(ro, t.score(ro))
    told = {"policy": [], "value": []}
    real_pg, real_vf = ppo_module.clipped_policy_loss, ppo_module.clipped_value_loss

    def pg(*args):
        told["policy"].append(args[4])
        return real_pg(*args)

    def vf(*args):
        told["value"].append(args[4])
        return real_vf(*args)
    monkeypatch.setattr(ppo_module, "clipped_policy_loss", pg)
    monkeypatch.setattr(ppo_module, "clipped_value_loss", vf)
    t.update(ro, batch, t.cfg.lr, 1)
    assert told == {"policy": [0.1], "value": [0.3]}


def test_a_save_stopped_after_the_value_model_puts_the_old_policy_and_value_back(
        setup, tmp_path, monkeypatch):
    # Stopped after the new value model, OUT read as the old policy beside a new value model;
    # then as no model at all, the old one lost.
    out = tmp_path / "out"
    t = trainer(setup, out)
    t.save(out)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "value/config.json"} <= set(before)
    with torch.no_grad():
        for p in [*t.policy.parameters(), *t.value_model.parameters()]:
            p.add_(1.0)
    calls = []

    def stopped_after_the_value_model(path, *args, **kwargs):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save_model(path, *args, **kwargs)
    monkeypatch.setattr(ppo_module, "save_model", stopped_after_the_value_model)
    with pytest.raises(KeyboardInterrupt):
        t.save(out)
    assert calls == ["value", "out"]
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and not list(out.glob(".*"))


# --- rewards PPO's float32 arithmetic cannot take ------------------------------------------

def test_a_score_whose_square_overflows_float32_is_refused_as_returned(setup, tmp_path):
    """1e30 is a float32, and was taken: the whitening's variance and the value loss, means of
    squares, were inf, the advantages 0, and the run ended as if lr had diverged it."""
    t = trainer(setup, tmp_path / "run")
    ro = hand_rollout(t, PROMPTS, RESPONSES, [True] * 3)
    ro.records = [{"prompt": "p", "score": 1.0, "_line": 7},
                  {"prompt": "p", "score": -1e30, "_line": 3, "id": "q3"},
                  {"prompt": "p", "score": 2.0, "_line": 5}]
    with pytest.raises(UserError) as e:
        t.score(ro)
    assert str(e.value) == (f"{t.cfg.prompts}:3, field 'reward_fn': the reward function "
                            f"{__name__}:record_score returned a score (-1e+30) for prompt id "
                            f"q3 beyond the ±1e+15 a score may reach (PPO squares rewards in "
                            f"float32, in the value loss and the advantages' whitening)")
    ro.records[1]["score"] = -1e15  # the bound itself is a score
    torch.testing.assert_close(t.score(ro), torch.tensor([1.0, -1e15, 2.0]))
    with pytest.raises(UserError, match=r"eos_penalty': must be <= 1e\+15"):
        trainer(setup, tmp_path / "eos", missing_eos_penalty=2e15)


@pytest.fixture(scope="module")
def loud_reward_model(setup):
    """A reward model that scores every response 1e30 (its head's bias)."""
    d, _ = setup
    policy, tok, _ = load_model(d / "policy")
    rm = ScalarHeadModel(policy.config)
    rm.backbone.load_state_dict(policy.state_dict())
    with torch.no_grad():
        rm.head.weight.zero_()
        rm.head.bias.fill_(1e30)
    save_model(d / "loud_rm", rm, tok, extra={"stage": "reward"})
    return d / "loud_rm"


def test_a_reward_model_score_past_the_bound_ends_the_run_naming_it_and_the_prompt(
        setup, tmp_path, loud_reward_model):
    d, paths = setup
    out = tmp_path / "run"
    t = PPOTrainer(PPOConfig(policy=str(d / "policy"), prompts=str(paths["prompts"]),
                             reward=str(loud_reward_model),
                             out=str(out), device="cpu", max_new_tokens=6, batch_size=4,
                             minibatch_size=4, ppo_epochs=1, steps=2, progress=False))
    with pytest.raises(UserError) as e:
        t.train()
    lines = {json.loads(line)["id"]: i + 1 for i, line in enumerate(
        paths["prompts"].read_text().splitlines())}
    found = re.fullmatch(
        rf"{re.escape(str(paths['prompts']))}:(\d+), field 'reward': step 1: the score the "
        rf"reward model {re.escape(str(loud_reward_model))} gave the response to prompt id "
        rf"(\S+) \(1\.0000000150474662e\+30\)( \(less the missing-EOS penalty 1\))? is beyond "
        rf"the ±1e\+15 a score may reach \(PPO squares rewards in float32, in the value loss "
        rf"and the advantages' whitening\)", str(e.value))
    assert found, str(e.value)
    assert lines[found[2]] == int(found[1])  # the prompt's own line
    assert not out.exists()  # the first step's row is not logged, nothing saved


def test_a_kl_penalty_past_the_bound_ends_the_run_naming_kl_coef(setup, tmp_path):
    out = tmp_path / "run"
    t = trainer(setup, out, reference=str(setup[0] / "reference"), kl_coef=1e25, steps=1,
                progress=False)
    with pytest.raises(UserError) as e:
        t.train()
    assert re.fullmatch(r"field 'kl_coef': step 1: a return \(the score less the KL penalty, "
                        r"kl_coef 1e\+25 times the per-token KL to the reference, summed\) "
                        r"reached \S+e\+2[45], beyond the ±1e\+16 PPO takes \(PPO squares "
                        r"rewards in float32, in the value loss and the advantages' "
                        r"whitening\); give a smaller kl_coef \(--kl-coef\)", str(e.value)), \
        str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_what_padding_predicts_changes_no_advantage_or_logged_kl(setup, tmp_path, estimator):
    """A row's rewards, advantages and KL are its own whatever the rows padded beside it hold.
    After a response ends, the log-ratio of the pad token is no estimate of anything: here,
    a policy far from its reference at the smallest temperature, it is below −150 nats, where
    k3's exp overflows to inf, and inf times the mask was NaN, carried by GAE back over its
    row's real tokens (the row's own k3 are finite: its tokens are the policy's greedy picks)."""
    from gptlab.engine import SamplingParams, generate
    d, paths = setup
    model, tok, _ = load_model(d / "policy")
    with torch.no_grad():
        model.final_norm.weight.mul_(3.0)
    save_model(tmp_path / "policy", model, tok)
    cfg = PPOConfig(policy=str(tmp_path / "policy"), reference=str(d / "reference"),
                    prompts=str(paths["prompts"]), out=str(tmp_path / "run"), device="cpu",
                    temperature=0.01, max_new_tokens=6, batch_size=4, minibatch_size=4,
                    kl_estimator=estimator, whiten_advantages=False)
    t = PPOTrainer(cfg, reward_fn=record_score)
    greedy = generate(t.policy, PROMPTS, SamplingParams(max_new_tokens=6, greedy=True),
                      pad_id=tok.pad_id).tokens
    responses = [g[:len(r)] for g, r in zip(greedy, RESPONSES)]
    scores = torch.tensor([1.0, -2.0, 3.0])
    ro = hand_rollout(t, PROMPTS, responses, [True] * 3)
    pad_logp, _ = response_logprobs(t.policy, ro, 0.01)
    pad_ref, _ = response_logprobs(t.reference, ro, 0.01)
    assert (pad_logp - pad_ref)[~ro.response_mask.bool()].min() < -150  # k3: exp(150) = inf
    batch = t.advantages(ro, scores)
    for i, (p, r) in enumerate(zip(PROMPTS, responses)):
        alone = t.advantages(hand_rollout(t, [p], [r], [True]), scores[i:i + 1])
        for key in ("advantages", "returns", "kl"):
            torch.testing.assert_close(batch[key][i, :len(r)], alone[key][0], atol=1e-4,
                                       rtol=1e-5)
            assert batch[key][i, len(r):].eq(0).all()
    row, _, _ = PPOTrainer._rollout_metrics(1, ro, scores, batch, 1e-3)
    assert math.isfinite(row["kl"])


# --- _check_rewards read row by row (hand-mutation of ca0b14d) -----------------------------

def checked(t, scores, largest, finished=(True, False, True), beta=0.25, **nan):
    """`t._check_rewards` on a hand rollout of three prompts (ids q1..q3, lines 11..13, the
    second from a shard of its own), its batch's log-probabilities, KL and values 0 but for
    `nan`'s keys (NaN at the second row's first token); the UserError's text, or None where it
    passes."""
    ro = hand_rollout(t, PROMPTS, RESPONSES, list(finished))
    ro.records = [{"prompt": "p", "_line": 11, "id": "q1"},
                  {"prompt": "p", "_line": 12, "id": "q2", "_file": "shard-2.jsonl"},
                  {"prompt": "p", "_line": 13}]
    batch = {"beta": beta, **{k: torch.zeros(ro.response_mask.shape)
                              for k in ("old_logp", "kl", "old_values")}}
    for key, value in nan.items():
        batch[key][1, 0] = value
    try:
        t._check_rewards(4, ro, torch.tensor(scores), batch, largest)
    except UserError as e:
        return str(e)
    return None


BEYOND = ("is beyond the ±1e+15 a score may reach (PPO squares rewards in float32, in the value "
          "loss and the advantages' whitening)")


def test_the_score_past_the_bound_is_named_by_its_own_row_file_line_and_penalty(setup, tmp_path):
    """The first score past ±1e15 is named, with its own record's file, line, id and value;
    the missing-EOS penalty is said where that row had it (unfinished, a penalty above 0)."""
    t = trainer(setup, tmp_path / "run")  # missing_eos_penalty 1
    name = f"{__name__}:record_score"
    # Row 2 (unfinished) is the first past the bound; row 3 too, the other way (float32's
    # numbers: as the scores are).
    assert checked(t, [1.0, 2.0 ** 51, -3 * 2.0 ** 50], (3 * 2.0 ** 50, 1.0)) == (
        f"shard-2.jsonl:12, field 'reward_fn': step 4: the score the reward function {name} "
        f"gave the response to prompt id q2 (2251799813685248.0) (less the missing-EOS "
        f"penalty 1) {BEYOND}")
    # Row 3: finished, no penalty; a record without an id names none; the prompts' own file.
    assert checked(t, [1.0, 2.0, -3 * 2.0 ** 50], (3 * 2.0 ** 50, 1.0)) == (
        f"{t.cfg.prompts}:13, field 'reward_fn': step 4: the score the reward function {name} "
        f"gave the response (-3377699720527872.0) {BEYOND}")
    assert checked(t, [1.0, float("nan"), 2.0], (float("nan"), 1.0)) == (
        f"shard-2.jsonl:12, field 'reward_fn': step 4: the score the reward function {name} "
        f"gave the response to prompt id q2 (nan) (less the missing-EOS penalty 1) is not a "
        f"number")
    # Row 1 unfinished, row 2 finished: the penalty said is row 2's own (none).
    assert checked(t, [1.0, 2.0 ** 51, 2.0], (2.0 ** 51, 1.0), finished=(False, True, True)) == (
        f"shard-2.jsonl:12, field 'reward_fn': step 4: the score the reward function {name} "
        f"gave the response to prompt id q2 (2251799813685248.0) {BEYOND}")
    # Without a penalty, an unfinished row lost nothing: none is said.
    t0 = trainer(setup, tmp_path / "run0", missing_eos_penalty=0.0)
    assert checked(t0, [1.0, 2.0 ** 51, 2.0], (2.0 ** 51, 1.0)) == (
        f"shard-2.jsonl:12, field 'reward_fn': step 4: the score the reward function {name} "
        f"gave the response to prompt id q2 (2251799813685248.0) {BEYOND}")
    # The bounds themselves pass, a score of ±1e15 and a return of ±1e16.
    assert checked(t, [1.0, -1e15, 1e15], (1e15, 1e16)) is None


def test_a_return_past_the_bound_names_the_steps_own_kl_coef(setup, tmp_path):
    """The KL coefficient the message names is the step's (an adaptive one moves away from
    --kl-coef)."""
    t = trainer(setup, tmp_path / "run", kl_coef=0.02)

    def said(ret, beta):
        return (f"field 'kl_coef': step 4: a return (the score less the KL penalty, kl_coef "
                f"{beta} times the per-token KL to the reference, summed) reached {ret}, beyond "
                f"the ±1e+16 PPO takes (PPO squares rewards in float32, in the value loss and "
                f"the advantages' whitening); give a smaller kl_coef (--kl-coef)")

    assert checked(t, [1.0, 2.0, 3.0], (3.0, 2e16), beta=0.25) == said(2e16, 0.25)
    # A score past its bound is said first, whatever the returns.
    assert checked(t, [1.0, 2.0, 3e15], (3e15, 4e16)).startswith(f"{t.cfg.prompts}:13, ")


def test_a_nan_return_names_what_is_nan_not_kl_coef(setup, tmp_path):
    """A NaN return is refused too, not trained on, but no smaller kl_coef makes it a number:
    the message named kl_coef. It names the policy's log-probabilities, else the reference's
    (a NaN KL beside finite policy ones), else the value model's values."""
    d = setup[0]
    t = trainer(setup, tmp_path / "run", reference=str(d / "reference"))
    nan, ret = float("nan"), (3.0, float("nan"))
    tail = "(weights that hold NaN, or a forward pass that overflowed)"
    assert checked(t, [1.0, 2.0, 3.0], ret, old_logp=nan, kl=nan) == (
        f"field 'policy': step 4: a return (the score less the KL penalty) is not a number: the "
        f"policy {d / 'policy'} gives its own responses' tokens log-probabilities that are not "
        f"finite {tail}")
    assert checked(t, [1.0, 2.0, 3.0], ret, old_logp=-math.inf, kl=nan) == (
        f"field 'policy': step 4: a return (the score less the KL penalty) is not a number: the "
        f"policy {d / 'policy'} gives its own responses' tokens log-probabilities that are not "
        f"finite {tail}")
    assert checked(t, [1.0, 2.0, 3.0], ret, kl=nan, old_values=nan) == (
        f"field 'reference': step 4: a return (the score less the KL penalty) is not a number: "
        f"the reference model {d / 'reference'} gives the responses' tokens log-probabilities "
        f"that are NaN {tail}")
    assert checked(t, [1.0, 2.0, 3.0], ret, old_values=nan) == (
        f"field 'value': step 4: a return (the score less the KL penalty) is not a number: the "
        f"value model's values of the responses are NaN {tail}")
    assert checked(t, [1.0, 2.0, 3.0], ret, kl=math.inf, beta=0.0) == (
        "step 4: a return is not a number: the per-token KL to the reference (times kl_coef 0) "
        "or the value model's values are infinite at a token")
    # Without --reference the reference is the policy's own start: the policy is named.
    t0 = trainer(setup, tmp_path / "run0")
    assert checked(t0, [1.0, 2.0, 3.0], ret, kl=nan) == (
        f"field 'policy': step 4: a return (the score less the KL penalty) is not a number: the "
        f"reference model {d / 'policy'} gives the responses' tokens log-probabilities that are "
        f"NaN {tail}")


def test_a_reference_that_gives_nan_ends_the_run_naming_it(setup, tmp_path):
    # Weights that hold NaN are refused as they load: here the reference's forward gives NaN
    # as one that overflowed would, and the message said "give a smaller kl_coef".
    d = setup[0]
    out = tmp_path / "run"
    t = trainer(setup, out, reference=str(d / "reference"), steps=1, progress=False)
    with torch.no_grad():
        t.reference.final_norm.weight[0] = float("nan")
    with pytest.raises(UserError) as e:
        t.train()
    assert str(e.value) == (
        f"field 'reference': step 1: a return (the score less the KL penalty) is not a number: "
        f"the reference model {d / 'reference'} gives the responses' tokens "
        f"log-probabilities that are NaN (weights that hold NaN, or a forward pass that "
        f"overflowed)")
    assert not out.exists()


def test_the_missing_eos_penalty_may_be_the_score_bound_itself(setup, tmp_path):
    assert trainer(setup, tmp_path / "run", missing_eos_penalty=1e15).cfg.missing_eos_penalty \
        == 1e15
    with pytest.raises(UserError, match=r"eos_penalty': must be <= 1e\+15"):
        trainer(setup, tmp_path / "eos", missing_eos_penalty=1.0000000000000002e15)


def test_the_largest_score_and_return_are_read_as_magnitudes(setup, tmp_path):
    """A reward model's −1e30 or a KL penalty's −1e25 overflows as +1e30 does: the bounds
    `_check_rewards` reads are the largest |score| and |return|, NaN where one is NaN."""
    t = trainer(setup, tmp_path / "run")
    ro = hand_rollout(t, PROMPTS, RESPONSES, [True, False, True])
    returns = torch.zeros(3, 6)
    returns[1, 2], returns[2, 0] = -2.0 ** 54, 2.0 ** 53
    batch = {"kl": torch.zeros(3, 6), "beta": 0.1, "returns": returns}
    _, _, largest = PPOTrainer._rollout_metrics(1, ro, torch.tensor([1.0, -2.0 ** 51, 3.0]),
                                                batch, 1e-3)
    assert largest == (2.0 ** 51, 2.0 ** 54)
    returns[1, 2] = float("nan")
    _, _, (score, ret) = PPOTrainer._rollout_metrics(
        1, ro, torch.tensor([1.0, float("nan"), 3.0]), batch, 1e-3)
    assert math.isnan(score) and math.isnan(ret)
    assert PPOTrainer._rollout_metrics(1, ro, torch.tensor([1.0, 2.0, 3.0]),
                                       {"kl": torch.zeros(3, 6), "beta": 0.1}, 1e-3)[2] is None
