"""Upper bounds on what feedback can add (the execution reward and best-of-K), and the reward
model judged by the noise-free labeler."""
import math

import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab.data.instruct import encode_prompt, encode_response, read_rankings
from gptlab.errors import UserError
from gptlab.eval.headroom import best_of_k, pick_stats, score_responses
from gptlab.eval.pipeline_eval import rm_accuracy_noise_free
from gptlab.eval.stats import clustered_rate
from gptlab.io import write_jsonl_atomic
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.model.heads import ScalarHeadModel
from gptlab.tokenizer import train_tokenizer
from gptlab.provenance import record_run
from gptlab.train.ppo import layout
from gptlab.train.reward import (RewardConfig, collate_rankings, encode_ranking,
                                 pairwise_accuracy)
from gptlab.world import build_world, rewards
from gptlab.world.rewards import execution_reward


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(0, n_train=50, n_validation=10, n_test=40, n_dialogs=2,
                       corpus_chars=20_000, db_path=tmp_path_factory.mktemp("db") / "c.sqlite")


@pytest.fixture(scope="module")
def models(world):
    torch.manual_seed(0)
    tok = train_tokenizer([world.corpus()], vocab_size=300)
    cfg = GPTConfig(vocab_size=tok.vocab_size, context=256, d_model=32, n_layers=1, n_heads=2)
    policy = GPT(cfg).eval()
    rm = ScalarHeadModel.from_gpt(policy).eval()
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # scores that differ between responses
    return tok, policy, rm


def test_execution_reward_scores_correct_wrong_and_error(world):
    q = next(q for q in world.test if q.intent == "count_employees_city")
    reward = execution_reward(world)
    responses = [q.sql, f" {q.sql} ", "SELECT COUNT(*) FROM employees", "SELEC nothing"]
    assert reward([None] * 4, responses, [{"id": q.id}] * 4) == [1.0, 1.0, 0.0, -1.0]
    with pytest.raises(UserError, match="'id'"):
        reward([None], [q.sql], [{"prompt": "x"}])


def test_execution_reward_by_name_reads_the_world_from_the_environment(world, tmp_path,
                                                                      monkeypatch):
    world.export(tmp_path / "w")
    monkeypatch.setenv("GPTLAB_WORLD", str(tmp_path / "w"))
    q = world.test[0]
    assert rewards.execution(["p", "p"], [q.sql, "SELECT 1"], [{"id": q.id}] * 2) == [1.0, 0.0]
    monkeypatch.setenv("GPTLAB_WORLD", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="world directory not found") as e:
        rewards.execution(["p"], [q.sql], [{"id": q.id}])
    assert e.value.field == "GPTLAB_WORLD"  # the setting that named it: there is no --world


def test_ppo_checks_every_prompt_id_of_the_execution_reward_before_training(world, models,
                                                                           tmp_path, monkeypatch,
                                                                           capsys):
    import json
    from gptlab.cli import main
    tok, policy, _ = models
    save_model(tmp_path / "policy", policy, tok)
    world.export(tmp_path / "w")
    monkeypatch.setenv("GPTLAB_WORLD", str(tmp_path / "w"))
    q = world.test[0]
    prompts = tmp_path / "p.jsonl"
    for bad, message in (({"id": "s0-train-99999", "prompt": "x"},
                          "field 'id': no question with id 's0-train-99999' in this world"),
                         ({"prompt": "x"}, "field 'id': the execution reward needs each prompt "
                                           "record's world 'id'")):
        prompts.write_text(json.dumps({"id": q.id, "prompt": q.text}) + "\n"
                           + json.dumps(bad) + "\n")
        out = tmp_path / "run"
        assert main(["ppo", "--policy", str(tmp_path / "policy"), "--reward-fn",
                     "gptlab.world.rewards:execution", "--prompts", str(prompts), "--out",
                     str(out), "--steps", "1", "--batch-size", "2", "--minibatch-size", "2",
                     "--max-new-tokens", "4", "--device", "cpu"]) == 2
        assert f"{prompts}:2, {message}" in capsys.readouterr().err
        assert not out.exists()


def test_an_execution_evaluator_without_a_context_checks_ids_only(world, models):
    from gptlab.eval.execution import world_exec_evaluator
    tok, policy, _ = models
    q = world.test[0]
    evaluate = world_exec_evaluator(world, tok, [{"id": q.id, "prompt": q.text}], 4)
    assert evaluate(policy) == 0.0  # an untrained model: wrong, but measured
    with pytest.raises(UserError, match="no question with id"):
        world_exec_evaluator(world, tok, [{"id": "nope", "prompt": "x"}], 4)


def test_pick_stats_by_hand():
    # question 1: answer 2 is correct and the reward model's favourite;
    # question 2: nothing correct; question 3: one correct, the reward model picks a wrong one.
    s = pick_stats([[0, 1], [0, 0], [1, 0]], [[0.2, 0.9], [0.5, 0.1], [-1.0, 3.0]])
    assert s["pass_at_k"] == pytest.approx(2 / 3)
    assert s["rm_best_of_k"] == pytest.approx(1 / 3)
    assert s["sample_mean"] == pytest.approx((0.5 + 0 + 0.5) / 3)
    with pytest.raises(ValueError):
        pick_stats([], [])


def test_scores_of_shared_prompts_equal_whole_sequences(models):
    tok, _, rm = models
    prompts = [tok.encode("employees in Paris", bos=True), tok.encode("Question: x", bos=True)]
    responses = [tok.encode(" SELECT"), tok.encode(" name FROM t"), [],
                 tok.encode(" a"), tok.encode(" WHERE city = 'Rome'"), tok.encode(" b c")]
    got = score_responses(rm, prompts, 3, responses, tok.pad_id)
    full = [p for p in prompts for _ in range(3)]
    ids, mask, _, _, _ = layout(full, [r or [tok.pad_id] for r in responses], tok.pad_id, "cpu")
    want = rm(ids, mask).tolist()
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(x, 4) for x in got)) > 1


class EvenLengthWorld:
    """A stand-in checker: an answer is 'correct' when its text has an even length."""
    class _Verdict:
        def __init__(self, ok):
            self.correct = ok

    def check(self, qid, text):
        return self._Verdict(len(text) % 2 == 0)


def test_best_of_k_bounds(models):
    tok, policy, rm = models
    records = [{"id": str(i), "prompt": f"Question {i}: who?"} for i in range(12)]
    s = best_of_k(policy, tok, rm, EvenLengthWorld(), records, k=4, max_new_tokens=6)
    assert 0 < s["sample_mean"] < 1 and s["k"] == 4 and s["temperature"] == 1.0
    assert s["sample_mean"] <= s["pass_at_k"] and s["rm_best_of_k"] <= s["pass_at_k"]
    one = best_of_k(policy, tok, rm, EvenLengthWorld(), records, k=1, max_new_tokens=6)
    assert one["pass_at_k"] == one["rm_best_of_k"] == one["sample_mean"]


def test_reward_model_accuracy_is_judged_by_the_noise_free_labeler(world, models, tmp_path):
    tok, _, rm = models
    wrong, error = "SELECT name FROM employees", "SELEC nothing"
    qs = [q for q in world.test if world.check(q.id, wrong).kind == "wrong"][:6]
    assert len(qs) == 6
    # Labelers who got every ranking backwards: the error first, the correct answer last.
    rows = [{"id": q.id, "prompt": world.prompt(q.text), "ranked": [error, wrong, q.sql]}
            for q in qs]
    write_jsonl_atomic(tmp_path / "held.jsonl", rows)
    save_model(tmp_path / "rm", rm, tok, extra={"stage": "reward"})
    record_run(tmp_path / "rm", RewardConfig(model="sft", data=str(tmp_path / "held.jsonl"),
                                             val_data=str(tmp_path / "held.jsonl")))
    acc, n, pairs, ci = rm_accuracy_noise_free(world, tmp_path / "rm")
    # By hand: the truth is correct > wrong > error; count the pairs the scores order so.
    per_prompt = []
    for q in qs:
        prompt = world.prompt(q.text)
        p = encode_prompt(tok, prompt)
        with torch.no_grad():
            s = [float(rm(torch.tensor([p + encode_response(tok, r, prompt)]))[0])
                 for r in (q.sql, wrong, error)]
        per_prompt.append((s[0] > s[1]) + (s[0] > s[2]) + (s[1] > s[2]))
    right = sum(per_prompt)
    assert n == 6 and pairs == 18 and acc == pytest.approx(right / 18)
    assert 0 < right < 18  # the random head orders some pairs each way
    # The interval treats the 6 prompts as the draws: the prompt bootstrap of the hand counts,
    # 3 pairs each (tests/test_stats.py checks the rule itself).
    assert ci == pytest.approx(clustered_rate([(r, 3) for r in per_prompt])["ci95"])
    assert ci[0] < acc < ci[1]
    # Against the labelers' own (reversed) rankings the same scores get the complement.
    held = [encode_ranking(tok, r, 256) for r in read_rankings(tmp_path / "held.jsonl")]
    assert pairwise_accuracy(rm, [collate_rankings(held, tok.pad_id)]) == pytest.approx(1 - acc)


def test_a_prompt_ranked_in_two_rounds_is_one_draw_of_the_interval(world, models, tmp_path):
    # Round 2's reward model is judged on rankings of both rounds, where one prompt can be
    # ranked twice (other samples): its pairs share the prompt, and the interval counted the
    # two rankings as two independent draws.
    tok, _, rm = models
    wrong, error = "SELECT name FROM employees", "SELEC nothing"
    qs = [q for q in world.test if world.check(q.id, wrong).kind == "wrong"][:4]
    assert len(qs) == 4
    answers = {q.id: (q.sql, wrong, error) for q in qs}
    rows = [{"id": q.id, "prompt": world.prompt(q.text), "ranked": list(answers[q.id])}
            for q in qs]
    rows.insert(1, {"id": qs[0].id, "prompt": world.prompt(qs[0].text), "ranked": [wrong, error]})
    write_jsonl_atomic(tmp_path / "held.jsonl", rows)
    save_model(tmp_path / "rm", rm, tok, extra={"stage": "reward"})
    record_run(tmp_path / "rm", RewardConfig(model="sft", data=str(tmp_path / "held.jsonl"),
                                             val_data=str(tmp_path / "held.jsonl")))
    acc, n, pairs, ci = rm_accuracy_noise_free(world, tmp_path / "rm")
    right = {}  # per prompt (id): (pairs the scores order as the truth, pairs)
    for row in rows:
        prompt = row["prompt"]
        p = encode_prompt(tok, prompt)
        with torch.no_grad():
            s = [float(rm(torch.tensor([p + encode_response(tok, r, prompt)]))[0])
                 for r in row["ranked"]]  # each ranking already best first: correct, wrong, error
        got = sum(s[i] > s[j] for i in range(len(s)) for j in range(i + 1, len(s)))
        r0, n0 = right.get(row["id"], (0, 0))
        right[row["id"]] = (r0 + got, n0 + len(s) * (len(s) - 1) // 2)
    assert (n, pairs) == (5, 3 + 1 + 3 + 3 + 3) and len(right) == 4
    assert acc == pytest.approx(sum(r for r, _ in right.values()) / 13)
    # Four draws, the prompt ranked twice summed into one: not five.
    assert ci == pytest.approx(clustered_rate(list(right.values()))["ci95"])


def test_without_ties_two_answers_of_one_verdict_and_length_are_no_pair_to_judge(world, models,
                                                                                   tmp_path):
    # A strict labeler ranks them by position; the truth has them equally good. They were
    # counted as a pair, the "right" order whichever the noisy labelers happened to give.
    tok, _, rm = models
    a, b = "SELECT name FROM employees", "SELECT city FROM employees"  # both wrong, 26 long
    qs = [q for q in world.test if world.check(q.id, a).kind == world.check(q.id, b).kind
          == "wrong"][:4]
    assert len(qs) == 4
    write_jsonl_atomic(tmp_path / "held.jsonl", [
        {"id": q.id, "prompt": world.prompt(q.text), "ranked": [a, b, q.sql]} for q in qs])
    save_model(tmp_path / "rm", rm, tok, extra={"stage": "reward"})
    record_run(tmp_path / "rm", RewardConfig(model="sft", data=str(tmp_path / "held.jsonl"),
                                             val_data=str(tmp_path / "held.jsonl")))
    _, n, pairs, _ = rm_accuracy_noise_free(world, tmp_path / "rm", ties=False)
    assert n == 4 and pairs == 4 * 2  # the gold above each wrong answer; a and b not a pair
    _, n, pairs, _ = rm_accuracy_noise_free(world, tmp_path / "rm", ties=True)
    assert n == 4 and pairs == 4 * 2  # with ties the two wrong answers tie by verdict alone


def test_the_reward_models_favourite_is_its_highest_score():
    assert pick_stats([[0, 1, 0]], [[0.1, 0.9, 0.5]])["rm_best_of_k"] == 1.0
    assert pick_stats([[0, 1, 0]], [[0.1, 0.5, 0.9]])["rm_best_of_k"] == 0.0


def spy_on_best_of_k(monkeypatch) -> dict:
    """What best-of-K generates ("gen") and the scores it picks from ("scores"), as it runs."""
    import gptlab.eval.headroom as headroom
    seen = {}
    real_generate, real_pick = headroom.generate, headroom.pick_stats

    def generate(*args, **kwargs):
        seen["gen"] = real_generate(*args, **kwargs)
        return seen["gen"]

    def pick(correct, scores):
        seen["scores"] = scores
        return real_pick(correct, scores)

    monkeypatch.setattr(headroom, "generate", generate)
    monkeypatch.setattr(headroom, "pick_stats", pick)
    return seen


def test_best_of_k_scores_each_answer_of_each_question(models, monkeypatch):
    tok, policy, rm = models
    seen = spy_on_best_of_k(monkeypatch)
    records = [{"id": str(i), "prompt": f"Question {i}: who?"} for i in range(3)]
    best_of_k(policy, tok, rm, EvenLengthWorld(), records, k=4, max_new_tokens=6)
    prompts = [encode_prompt(tok, r["prompt"]) for r in records]
    gen = seen["gen"]
    assert not all(gen.finished)  # answers cut at max_new_tokens are read closed by EOS too
    closed = [(t[:-1] if done else t) + [tok.eos_id] for t, done in zip(gen.tokens, gen.finished)]
    flat = score_responses(rm, prompts, 4, closed, tok.pad_id)
    assert seen["scores"] == [flat[0:4], flat[4:8], flat[8:12]]


def test_sequence_kl_by_hand(models):
    from gptlab.engine import SamplingParams, generate
    from gptlab.eval.pipeline_eval import sequence_kl
    tok, policy, _ = models
    torch.manual_seed(1)
    reference = GPT(policy.config).eval()
    records = [{"prompt": f"Question {i}: who earns most?"} for i in range(3)]
    got = sequence_kl(policy, reference, tok, records, max_new_tokens=5, seed=4)
    prompts = [encode_prompt(tok, r["prompt"]) for r in records]
    gen = generate(policy, prompts, SamplingParams(max_new_tokens=5,
                                                   stop_ids=tuple(sorted(tok.stop_ids))),
                   seed=4, pad_id=tok.pad_id)
    kls = []
    with torch.no_grad():
        for p, r in zip(prompts, gen.tokens):
            ids = torch.tensor([p + r])
            lp = [m(ids)[0].log_softmax(-1) for m in (policy, reference)]
            kls.append(sum(float(lp[0][len(p) - 1 + t, y] - lp[1][len(p) - 1 + t, y])
                           for t, y in enumerate(r)))
    assert all(len(r) > 0 for r in gen.tokens) and abs(kls[0]) > 1e-3
    assert got == pytest.approx(sum(kls) / 3, abs=1e-4)
    assert sequence_kl(policy, policy, tok, records, max_new_tokens=5) == pytest.approx(0, abs=1e-4)


def kl_one_sequence_at_a_time(policy, reference, tok, records, seed, batch_size):
    """`sequence_kl` as it was: the same draws, each sequence through the reference alone."""
    kls = []
    with torch.no_grad():
        for b in range(0, len(records), batch_size):
            for p, resp, lp in generate_for(policy, tok, records[b:b + batch_size], seed + b):
                ids = torch.tensor([p + resp])
                ref = reference(ids)[0, len(p) - 1:-1].float().log_softmax(-1)
                kls.append(float(sum(lp) - ref.gather(-1, ids[0, len(p):, None])[:, 0].sum()))
    return sum(kls) / len(kls)


@pytest.mark.parametrize("preamble", ["", "Tables: employees(id, name, city, salary), "
                                          "offices(id, city, budget). Question: "])
def test_sequence_kl_runs_the_reference_once_a_batch_as_one_sequence_at_a_time(models, preamble):
    """Each batch's sequences, prompts of different lengths, go through the reference in one
    forward (a shared start of the prompts in one more, encoded once), as PPO scores a
    rollout: the KL is the one-at-a-time KL's to float noise. Before: one forward a
    sequence, each a wait for the device and its launches on a GPU."""
    from gptlab.eval.pipeline_eval import sequence_kl
    from gptlab.model.attention import common_prefix_length
    tok, policy, _ = models
    torch.manual_seed(1)
    reference = GPT(policy.config).eval()
    questions = ["who?", "which employees in Paris earn more than 5000?", "count offices",
                 "name the city with the most employees and the largest budget"]
    records = [{"prompt": preamble + q} for q in questions]
    prompts = [encode_prompt(tok, r["prompt"]) for r in records]
    assert len({len(p) for p in prompts}) == 4
    assert (common_prefix_length(prompts[:3]) > 0) == bool(preamble)
    rows = []  # the rows of each forward through the reference
    hook = reference.blocks[0].register_forward_hook(lambda m, args, out:
                                                     rows.append(args[0].shape[0]))
    try:
        got = sequence_kl(policy, reference, tok, records, max_new_tokens=5, seed=4,
                          batch_size=3)
    finally:
        hook.remove()
    # batches of 3 and 1; with a preamble the 3 encode it first, one row (the 1 shares it
    # with no other)
    assert rows == ([1, 3, 1] if preamble else [3, 1])
    want = kl_one_sequence_at_a_time(policy, reference, tok, records, seed=4, batch_size=3)
    assert abs(want) > 1e-2 and got == pytest.approx(want, rel=1e-5, abs=0)


def test_sequence_kl_scores_a_batch_too_large_for_one_forward_in_parts(models, monkeypatch):
    """A batch whose reference log-probabilities (rows x response tokens x vocabulary) pass
    KL_SCORE_ELEMENTS goes through the reference a few rows at a time, to the same KL: one
    forward of 64 samples over GPT-2's vocabulary held 1 GiB tensors where one sample at a
    time had held 16 MiB. A batch within it is still one forward."""
    import gptlab.eval.pipeline_eval as pipeline_eval
    tok, policy, _ = models
    torch.manual_seed(1)
    reference = GPT(policy.config).eval()
    records = [{"prompt": q} for q in ("who?", "count offices", "which city?", "name one",
                                       "who earns most?")]
    rows = []
    hook = reference.blocks[0].register_forward_hook(lambda m, args, out:
                                                     rows.append(args[0].shape[0]))
    try:
        whole = pipeline_eval.sequence_kl(policy, reference, tok, records, max_new_tokens=5,
                                          seed=2)
        assert rows == [5]
        rows.clear()
        # Room for two rows of 5 response tokens at most.
        monkeypatch.setattr(pipeline_eval, "KL_SCORE_ELEMENTS", 2 * 5 * tok.vocab_size,
                            raising=False)
        parts = pipeline_eval.sequence_kl(policy, reference, tok, records, max_new_tokens=5,
                                          seed=2)
    finally:
        hook.remove()
    assert rows == [2, 2, 1]
    assert abs(whole) > 1e-2 and parts == pytest.approx(whole, rel=1e-5, abs=0)


def test_sequence_kl_reads_a_conversation_prompt_as_the_answers_do(models):
    """The evaluation's answers read a record's prompt with `prompt_of`, `messages` included;
    the KL of the same records read only `prompt` (a KeyError on `messages`)."""
    from gptlab.eval.pipeline_eval import sequence_kl
    tok, policy, _ = models
    torch.manual_seed(1)
    reference = GPT(policy.config).eval()
    messages = [{"role": "user", "content": "who earns most?"}]
    got = sequence_kl(policy, reference, tok, [{"messages": messages}], max_new_tokens=5)
    same = sequence_kl(policy, reference, tok, [{"prompt": messages}], max_new_tokens=5)
    assert got == pytest.approx(same) and got != 0


def test_a_ranking_of_equally_good_answers_is_not_counted(world, models, tmp_path):
    tok, _, rm = models
    q1, q2 = world.test[:2]
    # Two correct answers of one length (the ';' is no part of the normalised SQL): no pair.
    write_jsonl_atomic(tmp_path / "held.jsonl", [
        {"id": q1.id, "prompt": world.prompt(q1.text), "ranked": [q1.sql, "SELEC nothing"]},
        {"id": q2.id, "prompt": world.prompt(q2.text), "ranked": [q2.sql, q2.sql + ";"]}])
    save_model(tmp_path / "rm", rm, tok, extra={"stage": "reward"})
    record_run(tmp_path / "rm", RewardConfig(model="sft", data=str(tmp_path / "held.jsonl"),
                                             val_data=str(tmp_path / "held.jsonl")))
    for ties in (True, False):
        _, n, pairs, ci = rm_accuracy_noise_free(world, tmp_path / "rm", ties=ties)
        assert (n, pairs, ci) == (1, 1, None)  # one ranking, one pair: one cluster, no interval


def test_sequence_kl_draws_each_batch_with_its_own_seed_and_averages_over_prompts(models):
    from gptlab.engine import SamplingParams, generate
    from gptlab.eval.pipeline_eval import sequence_kl
    tok, policy, _ = models
    torch.manual_seed(1)
    reference = GPT(policy.config).eval()
    prompts = [encode_prompt(tok, f"Question {i}: who earns most?") for i in range(3)]
    records = [{"prompt": f"Question {i}: who earns most?"} for i in range(3)]

    def by_hand(ps, seed):
        gen = generate(policy, ps, SamplingParams(max_new_tokens=5,
                                                  stop_ids=tuple(sorted(tok.stop_ids))),
                       seed=seed, pad_id=tok.pad_id)
        out = []
        with torch.no_grad():
            for p, r in zip(ps, gen.tokens):
                ids = torch.tensor([p + r])
                lp = [m(ids)[0].log_softmax(-1) for m in (policy, reference)]
                out.append(sum(float(lp[0][len(p) - 1 + t, y] - lp[1][len(p) - 1 + t, y])
                               for t, y in enumerate(r)))
        return out

    # Batches of 2: records 0-1 drawn with seed 4, record 2 with seed 4 + 2.
    last = by_hand(prompts[2:], 6)
    assert last != by_hand(prompts[2:], 4)
    want = (sum(by_hand(prompts[:2], 4)) + sum(last)) / 3
    got = sequence_kl(policy, reference, tok, records, max_new_tokens=5, seed=4, batch_size=2)
    assert got == pytest.approx(want, abs=1e-4)
    one = sequence_kl(policy, reference, tok, records[:1], max_new_tokens=5, seed=4)
    assert one == pytest.approx(by_hand(prompts[:1], 4)[0], abs=1e-4) and abs(one) > 1e-3


def test_without_val_data_the_accuracy_is_on_the_rankings_the_run_held_out(world, models,
                                                                            tmp_path):
    from gptlab.train.reward import split_rankings
    tok, _, rm = models
    qs = world.test[:5]
    write_jsonl_atomic(tmp_path / "all.jsonl", [
        {"id": q.id, "prompt": world.prompt(q.text), "ranked": [q.sql, "SELEC nothing"]}
        for q in qs])
    save_model(tmp_path / "rm", rm, tok, extra={"stage": "reward"})
    record_run(tmp_path / "rm", RewardConfig(model="sft", data=str(tmp_path / "all.jsonl"),
                                             val_fraction=0.4, seed=3))
    train, held = split_rankings(read_rankings(tmp_path / "all.jsonl"), 0.4, 3)
    assert (len(train), len(held)) == (3, 2)
    _, n, pairs, _ = rm_accuracy_noise_free(world, tmp_path / "rm")
    assert (n, pairs) == (2, 2)


def test_best_of_k_checks_each_question_s_own_answers_stripped_with_a_seed_per_batch(
        models, monkeypatch):
    """Each of a question's K answers is checked against that question, as its stripped text;
    each batch of prompts samples with its own seed; the result names the temperature."""
    import gptlab.eval.headroom as headroom
    tok, policy, rm = models
    seeds, gens, checked = [], [], []
    real_generate = headroom.generate

    def generate(*args, **kwargs):
        seeds.append(kwargs["seed"])
        gens.append(real_generate(*args, **kwargs))
        return gens[-1]

    class RecordingWorld(EvenLengthWorld):
        def check(self, qid, text):
            checked.append((qid, text))
            return super().check(qid, text)

    monkeypatch.setattr(headroom, "generate", generate)
    records = [{"id": f"q{i}", "prompt": f"Question {i}: who?"} for i in range(3)]
    s = best_of_k(policy, tok, rm, RecordingWorld(), records, k=3, temperature=0.7,
                  max_new_tokens=6, seed=5, prompts_per_batch=2)
    assert seeds == [5 * 1_000_003 + 0, 5 * 1_000_003 + 2]  # one per batch of 2 prompts
    texts = [tok.decode(t) if done else tok.decode_cut(t)
             for g in gens for t, done in zip(g.tokens, g.finished)]
    # (the batches' rows in order are the records', 3 each; a cut answer as `sample` writes it)
    want = [(r["id"], text.strip())
            for r, text in zip([r for r in records for _ in range(3)], texts)]
    assert checked == want
    assert any(text != whole for (_, text), whole in zip(checked, texts))  # something stripped
    assert s["k"] == 3 and s["temperature"] == 0.7


@pytest.mark.parametrize("tail", [False, True])
def test_best_of_k_gives_the_template_tail_only_to_a_reward_model_that_reads_it(monkeypatch,
                                                                               tail):
    """With a ChatML policy, best-of-K scores each answer closed by <|im_end|> and, for a
    reward model that reads_template_tail (a Hugging Face classifier's), the "\\n" after it;
    gptlab's own reward model reads the answer closed by <|im_end|> alone."""
    from test_reward import chatml_models
    tok, im_end, newline, policy, rm = chatml_models(tail)
    seen = spy_on_best_of_k(monkeypatch)
    records = [{"id": str(i), "prompt": [{"role": "user", "content": text}]}
               for i, text in enumerate(["the dog", "the lazy fox"])]
    best_of_k(policy, tok, rm, EvenLengthWorld(), records, k=3, max_new_tokens=6)
    gen = seen["gen"]
    read, other = [], []
    with torch.no_grad():
        for i, (t, done) in enumerate(zip(gen.tokens, gen.finished)):
            closed = (encode_prompt(tok, records[i // 3]["prompt"]) + (t[:-1] if done else t)
                      + [im_end])
            read.append(float(rm(torch.tensor([closed + (newline if tail else [])]))[0]))
            other.append(float(rm(torch.tensor([closed + ([] if tail else newline)]))[0]))
    assert [s for scores in seen["scores"] for s in scores] == pytest.approx(read, abs=1e-5)
    assert all(abs(a - b) > 1e-2 for a, b in zip(read, other))  # the "\n" moves every score


@pytest.mark.parametrize("tail", [False, True])
def test_the_noise_free_accuracy_reads_the_template_tail_only_where_the_reward_model_does(
        world, tmp_path, tail):
    """rm_accuracy_noise_free encodes the held-out rankings as the reward model reads them:
    with the chat template's "\\n" after each answer's <|im_end|> for one that
    reads_template_tail, without it for gptlab's own."""
    from test_reward import chatml_models
    tok, _, newline, _, rm = chatml_models(tail, tmp_path, context=256)
    wrong, error = "SELECT name FROM employees", "SELEC nothing"
    qs = [q for q in world.test if world.check(q.id, wrong).kind == "wrong"][:6]
    prompts = [[{"role": "user", "content": q.text}] for q in qs]
    write_jsonl_atomic(tmp_path / "held.jsonl", [
        {"id": q.id, "prompt": p, "ranked": [error, wrong, q.sql]} for q, p in zip(qs, prompts)])
    record_run(tmp_path / "rm", RewardConfig(model="sft", data=str(tmp_path / "held.jsonl"),
                                             val_data=str(tmp_path / "held.jsonl")))
    acc, n, pairs, _ = rm_accuracy_noise_free(world, tmp_path / "rm")

    def pairs_right(after):  # the truth: correct > wrong > error
        right = 0
        for q, prompt in zip(qs, prompts):
            p = encode_prompt(tok, prompt)
            with torch.no_grad():
                s = [float(rm(torch.tensor([p + encode_response(tok, r, prompt) + after]))[0])
                     for r in (q.sql, wrong, error)]
            right += (s[0] > s[1]) + (s[0] > s[2]) + (s[1] > s[2])
        return right

    read, other = (newline, []) if tail else ([], newline)
    assert (n, pairs) == (6, 18) and acc == pytest.approx(pairs_right(read) / 18)
    assert pairs_right(read) != pairs_right(other)


def test_best_of_k_checks_an_answer_cut_inside_a_character_as_sample_writes_it(models,
                                                                                monkeypatch):
    """An answer cut at max_new_tokens between the byte tokens of "€" was checked whole, ending
    in U+FFFD, where `gptlab sample` (and so `world score`) reads it without the split
    character; an answer that ended on its own keeps the U+FFFD it chose to end on."""
    import gptlab.eval.headroom as headroom
    from gptlab.engine import Generation
    tok, policy, rm = models
    said = tok.encode("SELECT€")
    assert len(tok.encode("€")) > 1 and tok.decode(said[:-1]) == "SELECT\ufffd"
    rows = [said[:-1], said[:-1] + [tok.eos_id]]  # cut, finished

    def generate(model, prompts, params, seed=None, pad_id=0):
        assert len(prompts) == 2
        return Generation([list(r) for r in rows], [[0.0] * len(r) for r in rows],
                          [False, True])

    checked = []

    class RecordingWorld(EvenLengthWorld):
        def check(self, qid, text):
            checked.append(text)
            return super().check(qid, text)

    monkeypatch.setattr(headroom, "generate", generate)
    s = best_of_k(policy, tok, rm, RecordingWorld(), [{"id": "q", "prompt": "who?"}], k=2,
                  max_new_tokens=len(said) - 1)
    assert checked == ["SELECT", "SELECT\ufffd"]
    assert s["pass_at_k"] == 1.0 and s["sample_mean"] == 0.5  # 6 characters even, 7 odd


def test_evaluation_copies_nothing_plainly_and_reads_once(models):
    """Scoring best-of-K's responses, the KL and the corpus perplexity move what the host built
    queued (they made plain copies: on a GPU each waits for the device) and read once: the
    scores, a batch's KLs, the losses (the KL read each record's, the perplexity each batch's,
    and asked the device whether its labels were all targets). Scoring tells the reward model
    each response's prompt and whether it has a token to score at, where it read them, also
    where an empty answer (a pad) has none. The numbers are the same bit for bit (the KL, its
    reference now run a batch at a time, to float noise)."""
    from device_waits import count_waits
    from gptlab.engine import _generate
    from gptlab.eval.pipeline_eval import corpus_perplexity, sequence_kl
    from gptlab.train.reward import EncodedRanking, shared_prompt_batch
    tok, policy, rm = models
    prompts = [tok.encode("employees in Paris", bos=True), tok.encode("Question: x", bos=True)]
    responses = [tok.encode(" SELECT"), tok.encode(" name FROM t"), [],
                 tok.encode(" a"), tok.encode(" WHERE city = 'Rome'"), tok.encode(" b c")]
    items = [EncodedRanking([p + (r or [tok.pad_id]) for r in responses[i * 3:(i + 1) * 3]],
                            prompt_len=len(p)) for i, p in enumerate(prompts)]
    b = shared_prompt_batch(items, tok.pad_id)
    with count_waits(cpu_side=(shared_prompt_batch,), copies=True) as c:
        got = score_responses(rm, prompts, 3, responses, tok.pad_id)
    assert got == rm.score_continuations(b["prompt_ids"], b["prompt_mask"], b["rows"],
                                         b["cont_ids"], b["cont_mask"]).tolist()
    assert c.total == 1, c
    # A reward model that never scores at the pad: the empty answer has no token to score at,
    # and the sequences themselves are scored, right-padded, as they were (their lengths read
    # once; each row's mask was read twice, the padding twice more).
    seqs = [s for it in items for s in it.seqs]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_id] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    rm.pad_token_id = tok.pad_id
    try:
        with count_waits(cpu_side=(shared_prompt_batch,), copies=True) as c:
            got = score_responses(rm, prompts, 3, responses, tok.pad_id)
        assert got == rm(ids, mask).tolist() and c.total == 2, c
    finally:
        rm.pad_token_id = None

    torch.manual_seed(1)
    reference = GPT(policy.config).eval()
    records = [{"prompt": f"Question {i}: who earns most?"} for i in range(3)]
    with count_waits(cpu_side=(_generate,), copies=True) as c:
        kl = sequence_kl(policy, reference, tok, records, max_new_tokens=5, seed=4, batch_size=2)
    assert c.total == 2, c  # one a batch
    gens = [generate_for(policy, tok, records[i:i + 2], seed=4 + i) for i in (0, 2)]
    total = 0.0
    with torch.no_grad():
        for p, resp, lp in (x for g in gens for x in g):
            ids = torch.tensor([p + resp])
            ref = reference(ids)[0, len(p) - 1:-1].float().log_softmax(-1)
            total += float(sum(lp) - ref.gather(-1, ids[0, len(p):, None])[:, 0].sum())
    assert kl == pytest.approx(total / 3, rel=1e-5, abs=0)

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, tok.vocab_size, (2, 9), generator=g),
               torch.randint(0, tok.vocab_size, (1, 9), generator=g)]
    with count_waits(copies=True) as c:
        ppl = corpus_perplexity(policy, batches)
    assert c.total == 1, c
    with torch.no_grad():
        total = sum(float(policy(b[:, :-1], labels=b[:, 1:])) * b[:, 1:].numel() for b in batches)
    assert ppl == math.exp(total / 24)


def generate_for(policy, tok, records, seed):
    """(prompt, response, log-probabilities) of each record, as `sequence_kl` samples them."""
    from gptlab.engine import SamplingParams, generate
    prompts = [encode_prompt(tok, r["prompt"]) for r in records]
    gen = generate(policy, prompts, SamplingParams(max_new_tokens=5,
                                                   stop_ids=tuple(sorted(tok.stop_ids))),
                   seed=seed, pad_id=tok.pad_id)
    return list(zip(prompts, gen.tokens, gen.logprobs))


def test_two_rankings_of_one_prompt_are_one_draw_of_the_noise_free_accuracy(world, models,
                                                                             tmp_path):
    # One prompt ranked in two rounds: two rankings, two pairs, one cluster, so no interval
    # (counted as two draws it had one, from a single prompt).
    tok, _, rm = models
    q = world.test[0]
    write_jsonl_atomic(tmp_path / "held.jsonl", [
        {"id": q.id, "prompt": world.prompt(q.text), "ranked": [q.sql, bad]}
        for bad in ("SELEC nothing", "SELEC other")])
    save_model(tmp_path / "rm", rm, tok, extra={"stage": "reward"})
    record_run(tmp_path / "rm", RewardConfig(model="sft", data=str(tmp_path / "held.jsonl"),
                                             val_data=str(tmp_path / "held.jsonl")))
    _, n, pairs, ci = rm_accuracy_noise_free(world, tmp_path / "rm")
    assert (n, pairs, ci) == (2, 2, None)
