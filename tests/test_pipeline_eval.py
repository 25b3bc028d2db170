"""The evaluation's bookkeeping by hand: which answers each column of the report counts, which
model each comparison puts first, and which round stands for "ppo" (evaluate_pipeline), and what
`gptlab world score` and SFT's execution evaluator count (gptlab.eval.execution). The models,
the checker and the measurements are stand-ins (an answer's first word is its verdict), so the
figures are counted by hand; the end-to-end run in test_pipeline.py checks only their ranges."""
import json
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from gptlab.eval import pipeline_eval
from gptlab.world.checker import Verdict
from gptlab.world.labelers import SqlLabeler

# Four test questions (a fifth past --eval-limit 4); questions 1 and 3 in the unseen phrasing.
# An answer's first word is its verdict; "suite" marks one right on the variant databases too.
ANSWERS = {
    "pretrained": ["error", "error", "error", "error"],
    "sft": ["correct a b c d e f", "wrong", "error", "correct suite"],
    "sft_continued": ["correct", "correct", "wrong", "correct"],
    "ppo_round_1": ["wrong", "wrong", "wrong", "wrong"],
    "ppo_round_2": ["correct suite", "correct", "correct", "error suite"],
}


class StandInWorld:
    """check: the answer's first word; agrees_on_variants: whether it says "suite" (asked of
    wrong answers too, as the variant databases would be)."""

    def check(self, qid: str, sql: str) -> Verdict:
        return Verdict(sql.split()[0])

    def agrees_on_variants(self, qid: str, sql: str) -> bool:
        return "suite" in sql

    def gold(self, qid: str) -> str:
        return f"gold {qid[1:]}"  # test.jsonl's completion: "q3" is " gold 3"

    def question(self, qid: str) -> SimpleNamespace:
        return SimpleNamespace(split="test")

    def unseen_phrasing(self, qid: str) -> bool:
        return qid in ("q1", "q3")

    def labeler(self, disagreement: float = 0.0, seed: int = 0, ties: bool = True):
        return SqlLabeler(self, disagreement=disagreement, seed=seed, ties=ties)


class Held(str):
    """A stand-in model: its name, which a weak reference can follow to know it still held."""


def evaluate_with_stand_ins(tmp_path, monkeypatch, headroom: bool = False,
                            loaded: Callable[[Held], None] = lambda model: None,
                            val_blocks: list | None = None):
    """evaluate_pipeline on the stand-ins: each model it loads is a `Held` of its name, given
    to `loaded` as it is made (the reward models too: "rm" for each round, and "rm_last" for
    best-of-K). `val_blocks`: the pretraining corpus's validation batches (one by default)."""
    val_blocks = ["block"] if val_blocks is None else val_blocks
    from gptlab.train.pipeline import PipelineConfig
    out, world_dir = tmp_path / "out", tmp_path / "world"
    world_dir.mkdir()
    (world_dir / "test.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "question": f"Q{i}?", "prompt": f"Q{i}?",
                    "completion": f" gold {i}", "unseen_phrasing": i in (1, 3)}) + "\n"
        for i in range(5)))
    dirs = {"pretrained": tmp_path / "pre", "sft": tmp_path / "sft",
            "sft_continued": tmp_path / "control", "ppo_round_1": out / "round-1" / "ppo",
            "ppo_round_2": out / "round-2" / "ppo",
            "ppo_execution_reward": out / "ppo_execution_reward",
            "ppo_execution_reward_on_test": out / "ppo_execution_reward_on_test"}
    name_of = {path: name for name, path in dirs.items()}
    answers = {**ANSWERS, "ppo_execution_reward": ANSWERS["sft"],
               "ppo_execution_reward_on_test": ANSWERS["ppo_round_2"]}
    kl_of = {("ppo_round_2", "sft"): 0.7}

    def load(name: str) -> Held:
        model = Held(name)
        loaded(model)
        return model

    def rm_accuracy(world, d, ties, data, device):
        rm = load("rm")  # held while it scores, as rm_accuracy_noise_free's own load is
        assert rm
        return {"round-1": (0.6, 3, 9, [0.1, 0.9]), "round-2": (0.8, 4, 12, [0.3, 1.0])}[
            d.parent.name]

    monkeypatch.setattr(pipeline_eval, "select_device", lambda _: "cpu")
    monkeypatch.setattr(pipeline_eval, "load_model",
                        lambda path, device: (load(name_of[Path(path)]), "tok", None))
    monkeypatch.setattr(pipeline_eval, "load_reward_model",
                        lambda path, device, field: (load("rm_last"), "tok", None))
    monkeypatch.setattr(pipeline_eval, "answer",
                        lambda model, tok, test, n: answers[model][:len(test)])
    monkeypatch.setattr(pipeline_eval, "read_meta",
                        lambda d: {"heldout_pairwise_acc": {"round-1": 0.55, "round-2": 0.65}[
                            d.parent.name]})
    monkeypatch.setattr(pipeline_eval, "rm_accuracy_noise_free", rm_accuracy)
    monkeypatch.setattr(pipeline_eval, "sequence_kl", lambda policy, ref, *a, **kw:
                        kl_of[policy, ref])
    monkeypatch.setattr(pipeline_eval, "corpus_perplexity",
                        lambda model, val: {"sft": 3.0, "ppo_round_2": 3.5, "pretrained": 1.5}[
                            model] if val == ["block"] else 1 / 0)
    import gptlab.data.tokens
    import gptlab.eval.headroom
    monkeypatch.setattr(gptlab.data.tokens, "load_token_data",
                        lambda *a: SimpleNamespace(val_batches=lambda *b: val_blocks))
    monkeypatch.setattr(gptlab.eval.headroom, "best_of_k",
                        lambda policy, tok, rm, *a, **kw: {"of": [policy, rm]})
    pretrain = SimpleNamespace(data="corpus.txt", block_size=8, val_fraction=0.1, seed=0,
                               cache_dir=None)
    world = StandInWorld()
    pipe = SimpleNamespace(cfg=PipelineConfig(rounds=2, eval_limit=4, headroom=headroom),
                           out=out, world=world, world_dir=world_dir,
                           pretrain_config=lambda: pretrain,
                           test_questions=lambda: pipeline_eval.read_test_questions(
                               world, world_dir / "test.jsonl", 4))
    r = pipeline_eval.evaluate_pipeline(pipe, dirs["pretrained"], dirs["sft"],
                                        dirs["sft_continued"])
    return r, out


@pytest.fixture
def results(tmp_path, monkeypatch):
    return evaluate_with_stand_ins(tmp_path, monkeypatch)


@pytest.mark.parametrize("headroom", [False, True])
def test_the_evaluation_holds_two_models_at_most_and_one_where_it_can(tmp_path, monkeypatch,
                                                                     headroom):
    # Each load counts the models still held with the one it made: the pretrained model's
    # perplexity was measured beside the policy and SFT (3), best-of-K's reward model beside
    # them too; each answer loop's load found the previous model still named (2).
    held: weakref.WeakSet = weakref.WeakSet()
    at_load: list[tuple[str, int]] = []

    def loaded(model: Held) -> None:
        held.add(model)
        at_load.append((str(model), len(held)))

    r, _ = evaluate_with_stand_ins(tmp_path, monkeypatch, headroom, loaded)
    answering = ["pretrained", "sft", "sft_continued", "ppo_round_1", "ppo_round_2"] + [
        "ppo_execution_reward", "ppo_execution_reward_on_test"] * headroom
    assert at_load == [(name, 1) for name in answering] + [("rm", 1), ("rm", 1)] + [
        ("ppo_round_2", 1), ("sft", 2), ("pretrained", 2)] + [("rm_last", 2)] * headroom
    # the same figures from the models it compares
    assert r["kl_ppo_vs_sft"] == 0.7
    assert r["ptx"] == {"corpus_ppl_sft": 3.0, "corpus_ppl_ppo": 3.5,
                        "corpus_ppl_pretrained": 1.5}
    if headroom:
        assert r["headroom"]["of"] == ["sft", "rm_last"]


def test_a_corpus_with_no_validation_block_has_no_perplexities(tmp_path, monkeypatch,
                                                                capsys):
    # A single-block corpus: pretraining holds no block out and trains on. The evaluation
    # divided by 0 there, after every stage had trained, and no report was written; the
    # figures are None (n/a), the other figures measured, and the pretrained model not loaded.
    # (The stand-in perplexity divides by 0 on no blocks, as the real one did.)
    held: list[str] = []
    r, _ = evaluate_with_stand_ins(tmp_path, monkeypatch, loaded=lambda m: held.append(str(m)),
                                   val_blocks=[])
    assert r["ptx"] == {"corpus_ppl_sft": None, "corpus_ppl_ppo": None,
                        "corpus_ppl_pretrained": None}
    assert r["kl_ppo_vs_sft"] == 0.7 and r["exec_acc"]["ppo"] == 0.75
    assert held[-2:] == ["ppo_round_2", "sft"]  # the pretrained model only answered
    assert "none held out for validation" in capsys.readouterr().err


def test_corpus_perplexity_refuses_no_batches():
    import torch

    from gptlab.eval.pipeline_eval import corpus_perplexity
    with pytest.raises(ValueError, match="at least one batch"):
        corpus_perplexity(torch.nn.Linear(1, 1), [])  # it divided by 0


def test_each_exec_column_counts_its_own_answers(results):
    r, _ = results
    assert r["n_test"] == 4 and r["n_unseen_phrasing"] == 2
    # correct: sft 1 0 0 1, control 1 1 0 1, round 1 none, round 2 1 1 1 0
    assert r["exec_acc"] == {"pretrained": 0.0, "sft": 0.5, "sft_continued": 0.75,
                             "ppo_round_1": 0.0, "ppo_round_2": 0.75, "ppo": 0.75}
    # questions 1 and 3 only: sft wrong, correct; round 2 correct, error; control both right
    assert r["exec_acc_unseen_phrasing"] == {"pretrained": 0.0, "sft": 0.5,
                                             "sft_continued": 1.0, "ppo_round_1": 0.0,
                                             "ppo_round_2": 0.5, "ppo": 0.5}
    # answers that do not run, not answers that are not right (sft's "wrong" is no error)
    assert r["exec_error_rate"] == {"pretrained": 1.0, "sft": 0.25, "sft_continued": 0.0,
                                    "ppo_round_1": 0.0, "ppo_round_2": 0.25, "ppo": 0.25}
    # right on the company and on the variants: round 2's "error suite" is not
    assert r["exec_acc_test_suite"] == {"pretrained": 0.0, "sft": 0.25, "sft_continued": 0.0,
                                        "ppo_round_1": 0.0, "ppo_round_2": 0.25, "ppo": 0.25}


def test_comparisons_put_the_last_round_first(results):
    r, out = results
    # PPO (round 2) minus SFT: 0, 1, 1, −1; minus the control: 0, 0, 1, −1
    assert r["delta_ppo_vs_sft"]["mean"] == 0.25
    assert (r["delta_ppo_vs_sft"]["better"], r["delta_ppo_vs_sft"]["worse"]) == (2, 1)
    assert r["delta_ppo_vs_sft_continued"]["mean"] == 0.0
    assert (r["delta_ppo_vs_sft_continued"]["better"],
            r["delta_ppo_vs_sft_continued"]["worse"]) == (1, 1)
    # Round 2 against SFT: both correct, round 2's shorter (1); correct over wrong (1); correct
    # over error (1); error against correct (0): 3 of 4. By verdict the first is a tie: 2.5 of 4.
    assert r["win_rate_ppo_vs_sft"] == 0.75
    assert r["win_rate_ppo_vs_sft_by_verdict"] == 0.625
    assert r["kl_ppo_vs_sft"] == 0.7  # the policy sampled, SFT the reference
    assert r["ptx"] == {"corpus_ppl_sft": 3.0, "corpus_ppl_ppo": 3.5,
                        "corpus_ppl_pretrained": 1.5}
    # the reward model of the last round is "the" reward model's accuracy
    assert r["rm_pairwise_acc"] == 0.8
    assert r["rm_pairwise_acc_per_round"] == [0.6, 0.8]
    assert r["rm_pairwise_acc_ci95_per_round"] == [[0.1, 0.9], [0.3, 1.0]]
    assert r["rm_pairwise_acc_labelers_per_round"] == [0.55, 0.65]
    assert r["rm_heldout_rankings_per_round"] == [3, 4]
    assert r["rm_heldout_pairs_per_round"] == [9, 12]
    rows = [json.loads(line) for line in open(out / "eval" / "answers.jsonl")]
    assert [row["id"] for row in rows] == ["q0", "q1", "q2", "q3"]
    assert [row["ppo_round_2_correct"] for row in rows] == [True, True, True, False]
    assert [row["ppo_round_2_correct_on_test_suite"] for row in rows] == [True, False, False,
                                                                         False]
    assert rows[0]["gold"] == "gold 0" and rows[0]["sft"] == "correct a b c d e f"


def test_score_counts_the_first_response_its_errors_and_its_test_suite(tmp_path):
    from gptlab.eval.execution import score_samples
    samples = tmp_path / "samples.jsonl"
    responses = [["correct suite", "error"],     # right everywhere; a later response fails
                 ["wrong suite", "correct"],     # wrong, though it agrees on the variants
                 ["error", "correct suite"],     # fails to run
                 ["correct", "wrong"]]           # right on the company only
    samples.write_text("".join(json.dumps({"id": f"q{i}", "responses": r}) + "\n"
                               for i, r in enumerate(responses)))
    summary, verdicts = score_samples(StandInWorld(), samples)
    assert summary == {"prompts": 4, "exec_acc": 0.5, "exec_acc_test_suite": 0.25,
                       "exec_errors": 1, "exec_error_rate": 0.25, "all_responses": 0.5,
                       "responses": 8, "unseen_phrasing": 0.5, "n_unseen_phrasing": 2}
    assert [v["correct_on_test_suite"] for v in verdicts] == [True, False, False, False]
    assert verdicts[2]["verdicts"] == ["error", "correct"]


def test_the_execution_evaluator_s_accuracy_and_its_prompts_that_just_fit(monkeypatch):
    # Prompts of n words read as n tokens: in a context of 10 with 4 new tokens, 6 fit, 7 do not.
    import gptlab.data.instruct
    from gptlab.errors import UserError
    from gptlab.eval import execution
    monkeypatch.setattr(gptlab.data.instruct, "encode_prompt", lambda tok, p: p.split())
    monkeypatch.setattr(execution, "answer", lambda model, tok, records, n: ANSWERS[model])
    records = [{"id": f"q{i}", "prompt": "a b c d e f"} for i in range(4)]
    evaluate = execution.world_exec_evaluator(StandInWorld(), "tok", records, 4, context=10)
    assert evaluate("sft_continued") == 0.75 and evaluate("pretrained") == 0.0
    with pytest.raises(UserError, match="prompt's 7 tokens leave no room"):
        execution.world_exec_evaluator(StandInWorld(), "tok",
                                       [{"id": "q0", "prompt": "a b c d e f g"}], 4, context=10)
