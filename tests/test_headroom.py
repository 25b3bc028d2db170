"""Upper bounds on what feedback can add: the execution reward and best-of-K."""
import pytest
import torch

from gptlab.errors import UserError
from gptlab.eval.headroom import best_of_k, pick_stats, score_responses
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.model.heads import ScalarHeadModel
from gptlab.tokenizer import train_tokenizer
from gptlab.train.ppo import layout
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
    with pytest.raises(UserError, match="world directory not found"):
        rewards.execution(["p"], [q.sql], [{"id": q.id}])


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
