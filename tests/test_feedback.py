"""`gptlab label --labeler module:function`: a ranking function of the user's, from the command
line, into a rankings file `gptlab reward` reads; a broken one is a clear error, nothing
written."""
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.data.instruct import SkipCounter
from gptlab.errors import UserError
from gptlab.feedback import label_samples
from gptlab.io import read_jsonl
from gptlab.model import GPT, get_preset
from gptlab.tokenizer import train_tokenizer

SAMPLES = [
    {"id": "t1", "prompt": "Is the cat happy?", "reference": "yes",
     "responses": ["no", "yes yes", "yes", "yes", "maybe"], "finished": [True] * 5},
    {"id": "t2", "prompt": "Is the dog happy?", "responses": ["ok", "ok"]},
    {"id": "t3", "messages": [{"role": "user", "content": "Is the fox happy?"}],
     "responses": ["no", "ok"]},
    {"prompt": "Is the owl happy?", "reference": "no", "responses": ["yes no", "no", "", "no no"]},
]

SCORES = '''
import numpy as np

def rank(record, responses):
    """More of the reference word is better; equal counts tie."""
    word = record.get("reference", "yes")
    return [np.float32(r.split().count(word)) for r in responses]
'''

ORDER = '''
def rank(record, responses):
    word = record.get("reference", "yes")
    return sorted(responses, key=lambda r: -r.split().count(word))
'''


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    """write(name, source): a module file in the working directory, importable as `name` (as
    `gptlab label` imports it), forgotten by sys.modules and sys.path after the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    names = []

    def write(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
    yield write
    for name in names:
        sys.modules.pop(name, None)


def write_samples(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("source,ranked", [
    # scores: equal ones tie, in the responses' order; t3's two responses tie, so it is skipped
    (SCORES, [{"id": "t1", "prompt": "Is the cat happy?", "reference": "yes",
               "ranked": ["yes yes", "yes", ["no", "maybe"]]},
              {"prompt": "Is the owl happy?", "reference": "no",
               "ranked": ["no no", ["yes no", "no"]]}]),
    # an order: as it is given
    (ORDER, [{"id": "t1", "prompt": "Is the cat happy?", "reference": "yes",
              "ranked": ["yes yes", "yes", "no", "maybe"]},
             {"id": "t3", "messages": [{"role": "user", "content": "Is the fox happy?"}],
              "ranked": ["no", "ok"]},
             {"prompt": "Is the owl happy?", "reference": "no",
              "ranked": ["no no", "yes no", "no"]}])])
def test_label_ranks_with_the_users_function_into_rankings_reward_reads(own_module, tmp_path,
                                                                        capsys, source, ranked):
    own_module("my_ranker", source)
    samples = write_samples(tmp_path / "samples.jsonl", SAMPLES)
    assert main(["label", "--labeler", "my_ranker:rank", "--in", "samples.jsonl",
                 "--out", "rankings.jsonl"]) == 0
    rows = read_jsonl(tmp_path / "rankings.jsonl")
    assert [{k: v for k, v in r.items() if k != "_line"} for r in rows] == ranked
    out, err = capsys.readouterr()
    assert out == f"wrote {len(ranked)} rankings to rankings.jsonl\n"
    tied = "1 prompt whose responses are all tied, " if source == SCORES else ""
    skipped = 3 - len(ranked) + 1
    assert err == ("skipped 1 response: 1 empty response left out of rankings\n"
                   f"skipped {skipped} prompt{'s' * (skipped > 1)}: {tied}1 prompt with fewer "
                   f"than 2 distinct responses\n"
                   f"ranked {len(ranked)} prompts\n")
    # `gptlab reward` takes the file as it is.
    tok = train_tokenizer([" ".join(json.dumps(r) for r in SAMPLES)] * 20, vocab_size=300)
    torch.manual_seed(0)
    save_model(tmp_path / "base", GPT(dataclasses.replace(
        get_preset("tiny"), vocab_size=tok.vocab_size, context=32)), tok)
    assert main(["reward", "--model", "base", "--data", "rankings.jsonl", "--out", "rm",
                 "--max-steps", "1", "--batch-size", "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["arch"] == "scalar"
    assert samples.exists()


def rank_for_t2(misbehaviour: str) -> str:
    """A ranking function that misbehaves only on the second line (id t2), as written."""
    return ("import sys\nfrom gptlab.errors import UserError\n\n"
            "def rank(record, responses):\n"
            "    if record['id'] != 't2':\n"
            "        return list(range(len(responses)))\n"
            f"    {misbehaviour}\n")


BAD_LINE = "{samples}:2, field 'ranked': the labeler "
NOT_AN_ORDER = (BAD_LINE + "must return a permutation of the responses (tied ones as non-empty "
                "lists), or one score per response; it did not for id 't2'")


@pytest.mark.parametrize("source,spec,message", [
    ("import no_such_module_anywhere\n", "broken:rank",
     "field 'labeler': cannot load 'broken:rank': importing broken failed with "
     "ModuleNotFoundError: No module named 'no_such_module_anywhere'"),
    ("def rank(:\n", "broken:rank",
     "field 'labeler': cannot load 'broken:rank': importing broken failed with SyntaxError: "),
    ("def score(record, responses):\n    return []\n", "broken:rank",
     "field 'labeler': cannot load 'broken:rank': module broken has no 'rank'"),
    # the module ends at the first colon: not an import of 'broken:rank'
    ("def rank(record, responses):\n    return []\n", "broken:rank:x",
     "field 'labeler': cannot load 'broken:rank:x': module broken has no 'rank:x'"),
    ("rank = [3, 2, 1]\n", "broken:rank",
     "field 'labeler': cannot load 'broken:rank': rank is not callable"),
    ("", "broken.py:rank",
     "field 'labeler': 'broken.py:rank' names a file, where a module is meant: write "
     "broken:rank"),
    ("", "broken", "field 'labeler': unknown labeler 'broken' (available: sqlworld, or "
                   "module:function for a ranking function of your own; README, 'Your own "
                   "task')"),
    (rank_for_t2("raise KeyError('reference')"), "broken:rank",
     "{samples}:2, field 'labeler': the labeler broken:rank raised KeyError: 'reference' for "
     "id 't2'"),
    # sys.exit(0) would have ended `gptlab label` with success and no rankings
    (rank_for_t2("sys.exit(0)"), "broken:rank",
     "{samples}:2, field 'labeler': the labeler broken:rank raised SystemExit: 0 for id 't2'"),
    (rank_for_t2("raise UserError('no reference answer', field='reference')"), "broken:rank",
     "{samples}:2, field 'reference': no reference answer"),
    (rank_for_t2("responses.sort()"), "broken:rank",  # a forgotten `return`
     BAD_LINE + "returned None for id 't2', not a list: the responses best first (tied ones as "
                "lists), or one score per response"),
    (rank_for_t2("return {r: 1.0 for r in responses}"), "broken:rank",
     BAD_LINE + "returned a dict for id 't2', not a list: the responses best first (tied ones "
                "as lists), or one score per response"),
    (rank_for_t2("return [1.0, 2.0]"), "broken:rank",
     BAD_LINE + "returned 2 scores for id 't2', for 3 responses (one score per response, in "
                "their order)"),
    # one score too many was cut off by zip, the labeler's mistake unseen
    (rank_for_t2("return [1.0, 2.0, 3.0, 4.0]"), "broken:rank",
     BAD_LINE + "returned 4 scores for id 't2', for 3 responses (one score per response, in "
                "their order)"),
    (rank_for_t2("return [1.0, float('nan'), 0.0]"), "broken:rank",
     BAD_LINE + "returned a non-finite score (nan) for id 't2', response 2 of 3"),
    (rank_for_t2("return [1.0, float('inf'), 0.0]"), "broken:rank",
     BAD_LINE + "returned a non-finite score (inf) for id 't2', response 2 of 3"),
    # an integer no float holds was an OverflowError: a traceback, exit 1
    (rank_for_t2("return [1, -10 ** 400, 0]"), "broken:rank",
     BAD_LINE + "returned a score out of a float's range (beyond ±1.8e308) for id 't2', "
                "response 2 of 3"),
    (rank_for_t2("return responses[:2]"), "broken:rank",
     NOT_AN_ORDER),
    (rank_for_t2("return [responses[0], responses[0], responses[1]]"), "broken:rank",
     NOT_AN_ORDER),
    # every response there, one of them twice: a set would have taken it
    (rank_for_t2("return [*responses, responses[0]]"), "broken:rank",
     NOT_AN_ORDER),
    # an empty level would have been written as a rank of its own
    (rank_for_t2("return [[], *responses]"), "broken:rank",
     NOT_AN_ORDER),
    # an empty list is neither an order nor scores ("0 scores" would blame the wrong mistake)
    (rank_for_t2("return []"), "broken:rank",
     NOT_AN_ORDER),
    (rank_for_t2("return [responses[0], 'something else', responses[2]]"), "broken:rank",
     NOT_AN_ORDER),
    (rank_for_t2("return [responses[0], 1.0, responses[2]]"), "broken:rank",
     NOT_AN_ORDER)])
def test_a_broken_ranking_function_is_named_with_file_line_and_field(own_module, tmp_path,
                                                                     capsys, source, spec,
                                                                     message):
    own_module("broken", source)
    samples = write_samples(tmp_path / "samples.jsonl", [
        {"id": "t1", "prompt": "p", "responses": ["a", "b"]},
        {"id": "t2", "prompt": "q", "responses": ["a", "b", "c"]}])
    assert main(["label", "--labeler", spec, "--in", str(samples), "--out", "r.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptlab label: error: " + message.format(samples=samples)), err
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("source,message", [
    (rank_for_t2("raise ValueError('no reference answer\\n  in the record')"),
     "{samples}:2, field 'labeler': the labeler broken:rank raised ValueError: no reference "
     "answer in the record for id 't2'"),
    ("raise RuntimeError('cannot reach the scorer:\\n  connection refused')\n",
     "field 'labeler': cannot load 'broken:rank': importing broken failed with RuntimeError: "
     "cannot reach the scorer: connection refused")])
def test_a_ranking_functions_exception_is_one_line(own_module, tmp_path, capsys, source,
                                                   message):
    """An exception whose text holds a line break (raised by the function, or by its module's
    import) is reported on one line: the message broke in two, its id on the second."""
    own_module("broken", source)
    samples = write_samples(tmp_path / "samples.jsonl", [
        {"id": "t1", "prompt": "p", "responses": ["a", "b"]},
        {"id": "t2", "prompt": "q", "responses": ["a", "b", "c"]}])
    assert main(["label", "--labeler", "broken:rank", "--in", str(samples),
                 "--out", "r.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err == f"gptlab label: error: {message.format(samples=samples)}\n"
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("flags,field,flag", [
    (["--world", "data/world"], "world", "--world"), (["--no-ties"], "ties", "--no-ties"),
    (["--ties"], "ties", "--ties"), (["--disagreement", "0"], "disagreement", "--disagreement"),
    (["--seed", "3"], "seed", "--seed")])
def test_the_sqlworld_labelers_settings_are_refused_with_ones_own(own_module, tmp_path, capsys,
                                                                 flags, field, flag):
    # Each would have been ignored without a word.
    own_module("my_ranker", ORDER)
    write_samples(tmp_path / "samples.jsonl", SAMPLES)
    assert main(["label", "--labeler", "my_ranker:rank", "--in", "samples.jsonl",
                 "--out", "r.jsonl", *flags]) == 2
    assert capsys.readouterr().err == (
        f"gptlab label: error: field '{field}': is a setting of the sqlworld labeler; "
        f"my_ranker:rank, a labeler of your own, ranks as it likes: leave {flag} out\n")
    assert not (tmp_path / "r.jsonl").exists()


def test_label_samples_takes_scores_and_gives_the_labeler_copies():
    seen = []

    def rank(record, responses):
        seen.append((dict(record), list(responses)))
        record.clear()  # neither changes the sample nor what the answer is checked against
        responses.reverse()
        return [0.5, 2, 0.5, -1]
    samples = [{"id": 1, "prompt": "p", "responses": ["w", "x", "y", "x", "z"], "_line": 1}]
    skips = SkipCounter()
    assert label_samples(samples, rank, skips) == [
        {"id": 1, "prompt": "p", "ranked": ["x", ["w", "y"], "z"]}]
    assert seen == [(samples[0], ["w", "x", "y", "z"])] and skips.total == 0
    assert label_samples(samples, lambda record, responses: (3.0, 2.0, 1.0, 0.0)) == [
        {"id": 1, "prompt": "p", "ranked": ["w", "x", "y", "z"]}]
    with pytest.raises(UserError, match=r"a bool \(True\) as the score of response 1 of 4"):
        label_samples(samples, lambda record, responses: [True, False, False, False])


def test_a_labeler_may_score_with_an_array_or_a_tensor():
    """As PPO's reward function may: a 1-D NumPy array or tensor of scores is read as a list;
    a 0-d one is one number for every response, refused naming what it is."""
    samples = [{"id": 1, "prompt": "p", "responses": ["a", "b", "c"], "_line": 1}]
    want = [{"id": 1, "prompt": "p", "ranked": ["b", ["a", "c"]]}]
    assert label_samples(samples, lambda rec, rs: np.array([0.5, 2.0, 0.5])) == want
    assert label_samples(samples, lambda rec, rs: torch.tensor([0.5, 2.0, 0.5])) == want
    with pytest.raises(UserError, match=r"returned a float64 for id 1, not a list"):
        label_samples(samples, lambda rec, rs: np.float64(1.0))
    # A 0-d tensor or array was read as the number it holds, and said to be "a float".
    with pytest.raises(UserError, match=r"returned a Tensor for id 1, not a list"):
        label_samples(samples, lambda rec, rs: torch.tensor(1.0))
    with pytest.raises(UserError, match=r"returned an ndarray for id 1, not a list"):
        label_samples(samples, lambda rec, rs: np.array(1.0))
    with pytest.raises(UserError, match=r"returned an int for id 1, not a list"):
        label_samples(samples, lambda rec, rs: 3)


def test_a_labeler_that_edits_a_message_changes_no_ranking():
    """The copy the labeler gets is deep: editing a turn of `messages` in it leaves the prompt
    that the ranking carries as the sample had it."""
    def rank(record, responses):
        record["messages"][0]["content"] = "edited"
        record["meta"]["tags"].append("x")
        return [1.0, 0.0]
    samples = [{"id": 1, "messages": [{"role": "user", "content": "hi"}],
                "meta": {"tags": []}, "responses": ["a", "b"], "_line": 1}]
    assert label_samples(samples, rank) == [
        {"id": 1, "messages": [{"role": "user", "content": "hi"}], "meta": {"tags": []},
         "ranked": ["a", "b"]}]


def test_the_sqlworld_ranker_called_from_python_on_a_record_without_id_names_the_field():
    # `gptlab label` refuses such a samples file first; a RankFn called from Python met none.
    from gptlab.feedback import sqlworld_ranker
    rank = sqlworld_ranker()
    with pytest.raises(UserError) as e:
        rank({"prompt": "How many employees are there?"}, ["SELECT 1", "SELECT 2"])
    assert str(e.value) == "field 'id': the sqlworld labeler needs each sample's 'id'"
