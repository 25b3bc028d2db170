"""Simulated labelers: the careful order, calibrated disagreement, agreement between labelers."""
import json

import pytest

from gptlab.errors import UserError
from gptlab.world import SqlLabeler, agreement, build_world
from gptlab.world.labelers import _dispersion, _expected_flip_fraction, normalize_sql


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(0, n_train=100, n_validation=20, n_test=600, n_dialogs=5,
                       corpus_chars=1000, db_path=tmp_path_factory.mktemp("db") / "c.sqlite")


def _q(world, intent):
    return next(q for q in world.test if q.intent == intent)


def test_careful_ranking_on_a_hand_made_example(world):
    q = _q(world, "count_employees_city")  # SELECT COUNT(*) FROM employees WHERE city = '...'
    city = q.values["city"]
    responses = [
        "SELEC COUNT(*) FROM employees",                                        # 0 error
        f"SELECT COUNT(*) FROM employees WHERE city != '{city}' AND 1 = 1",     # 1 wrong, long
        f"SELECT   COUNT(id)  FROM employees WHERE city = '{city}' AND id > 0;",  # 2 correct, long
        q.sql,                                                                  # 3 correct, short
        "SELECT COUNT(*) FROM employees",                                       # 4 wrong, short
        "DROP TABLE employees",                                                 # 5 error (refused)
    ]
    ranking = world.labeler(disagreement=0.0, ties=False).rank(q.id, responses)
    assert ranking.order == (3, 2, 4, 1, 5, 0) and ranking.groups == (0, 1, 2, 3, 4, 5)
    assert [v.kind for v in ranking.verdicts] == ["error", "wrong", "correct", "correct",
                                                 "wrong", "error"]
    assert ranking.id == q.id and ranking.ranked()[0] == q.sql
    assert ranking.ranked_json() == ranking.ranked()
    assert ranking.to_json()["id"] == q.id and ranking.to_json()["verdicts"][0] == "correct"
    assert normalize_sql(" SELECT  1 ;\n") == "SELECT 1"
    # With ties (the default) each verdict tier is one level, no length tie-break.
    tied = world.labeler(disagreement=0.0).rank(q.id, responses)
    assert tied.order == (2, 3, 1, 4, 0, 5) and tied.groups == (0, 0, 1, 1, 2, 2)
    r = responses
    assert tied.ranked_json() == [[r[2], r[3]], [r[1], r[4]], [r[0], r[5]]]
    assert tied.ranked() == [r[2], r[3], r[1], r[4], r[0], r[5]]
    one_wrong = world.labeler().rank(q.id, [r[4], r[3], r[2]])
    assert one_wrong.ranked_json() == [[r[3], r[2]], r[4]]


def test_mallows_dispersion_is_calibrated_to_the_disagreement():
    for k in (2, 4, 7):
        for p in (0.05, 0.1, 0.27):
            assert abs(_expected_flip_fraction(k, _dispersion(k, p)) - p) < 1e-9
    assert _dispersion(4, 0.0) < 1e-12


def _items(world, n):
    items = []
    for q in world.test[:n]:
        items.append((q.id, [q.sql, q.sql + " LIMIT 1", "SELECT 1", "SELEC x"]))
    return items


def test_measured_disagreement_matches_the_configured_rate(world):
    items = _items(world, 600)
    careful = world.labeler(disagreement=0.0, ties=False)
    for p in (0.1, 0.25):
        noisy = SqlLabeler(world, disagreement=p, seed=7, ties=False)
        assert abs((1 - agreement(careful, noisy, items)) - p) <= 0.03, p
    assert agreement(careful, world.labeler(0.0, seed=99, ties=False), items) == 1.0
    # two independent noisy labelers disagree more than either does with the truth
    a, b = SqlLabeler(world, 0.1, seed=1, ties=False), SqlLabeler(world, 0.1, seed=2, ties=False)
    assert 0.75 <= agreement(a, b, items[:300]) <= 0.87


def mean_disagreement(world, careful, items, p: float, seed: int, seeds: int = 4) -> float:
    """1 − agreement with the truth, averaged over labelers at `p` of `seeds` seeds from `seed`."""
    return sum(1 - agreement(careful, SqlLabeler(world, disagreement=p, seed=s), items)
               for s in range(seed, seed + seeds)) / seeds


# One labeler's disagreement on these 600 items, across 64 seeds, has a standard deviation of
# 0.012 at p = 0.25 (0.0074 at 0.1): one labeler within 0.03 was 2.5 SD, and seed 3 failed it
# (0.2835). The mean of four labelers has SD 0.006: 0.02 is 3.3 SD at 0.25 (5 at 0.1). Measured
# with seeds 0..19 as `seed`, every mean passed (at most 0.017 off) and labelers configured 0.05
# too high or too low failed on every one (at least 0.033 off).
CALIBRATION_TOLERANCE = 0.02


def test_with_ties_noise_flips_the_configured_share_of_cross_tier_pairs(world):
    items = _items(world, 600)  # correct, correct or wrong, wrong, error: 2-3 tiers each
    careful = world.labeler(disagreement=0.0)
    levels = [len(careful.rank(*it).tied_groups()) for it in items]
    assert min(levels) >= 2 and levels.count(3) > 500
    for p in (0.1, 0.25):
        measured = mean_disagreement(world, careful, items, p, seed=7)
        assert abs(measured - p) <= CALIBRATION_TOLERANCE, (p, measured)
        # Noise reorders whole tiers: a tied group is never split.
        noisy = SqlLabeler(world, disagreement=p, seed=7)
        for it in items[:50]:
            kinds = [{v.kind for v in r} for r in _verdict_groups(noisy.rank(*it))]
            assert all(len(k) == 1 for k in kinds) and len(kinds) == len(set(map(min, kinds)))
    assert agreement(careful, world.labeler(0.0, seed=99), items) == 1.0


def _verdict_groups(ranking):
    out = {}
    for i, level in zip(ranking.order, ranking.groups):
        out.setdefault(level, []).append(ranking.verdicts[i])
    return [out[level] for level in sorted(out)]


def test_the_sqlworld_ranker_writes_tied_tiers_and_skips_all_tied_prompts(world):
    from gptlab.data.instruct import SkipCounter, ranking_of
    from gptlab.feedback import label_samples, sqlworld_ranker
    q = world.test[0]
    samples = [{"id": q.id, "prompt": "p", "responses": [q.sql, "SELEC x", q.sql + " ;"]},
               {"id": q.id, "prompt": "p", "responses": ["SELEC x", "SELEC y"]}]
    skips = SkipCounter()
    tied = label_samples(samples, sqlworld_ranker(world, disagreement=0.0), skips)
    assert [r["ranked"] for r in tied] == [[[q.sql, q.sql + " ;"], "SELEC x"]]
    assert skips.counts == {"prompts whose responses are all tied": 1}
    assert ranking_of(tied[0]).groups == [0, 0, 1]
    strict = label_samples(samples, sqlworld_ranker(world, 0.0, ties=False))
    assert [r["ranked"] for r in strict] == [[q.sql, q.sql + " ;", "SELEC x"],
                                             ["SELEC x", "SELEC y"]]


def test_rankings_are_reproducible_per_item_and_seed(world):
    qid, responses = _items(world, 1)[0]
    a, b = SqlLabeler(world, 0.3, seed=5), SqlLabeler(world, 0.3, seed=5)
    b.rank(*_items(world, 2)[1])  # another item first must not change this one
    assert a.rank(qid, responses).order == b.rank(qid, responses).order


def test_labeler_rejects_a_disagreement_outside_its_range(world):
    with pytest.raises(UserError, match="disagreement"):
        SqlLabeler(world, disagreement=0.7)
    with pytest.raises(UserError, match="agreement needs"):
        agreement(world.labeler(), world.labeler(), [])
    with pytest.raises(UserError, match="agreement needs"):  # all tied: no pair to agree on
        agreement(world.labeler(), world.labeler(), [(world.test[0].id, ["SELEC x", "SELEC y"])])


def test_the_label_verb_ties_by_default_and_not_with_no_ties(world, tmp_path):
    from gptlab.cli import main
    from gptlab.io import read_jsonl, write_jsonl_atomic
    world.export(tmp_path / "w")
    q = world.test[0]
    write_jsonl_atomic(tmp_path / "s.jsonl", [
        {"id": q.id, "prompt": "p", "responses": [q.sql + " ;", q.sql, "SELEC x"]}])
    for flags, ranked in (([], [[q.sql + " ;", q.sql], "SELEC x"]),
                          (["--no-ties"], [q.sql + " ;", q.sql, "SELEC x"])):
        out = tmp_path / "r.jsonl"
        assert main(["label", "--world", str(tmp_path / "w"), "--in", str(tmp_path / "s.jsonl"),
                     "--out", str(out), "--disagreement", "0", *flags]) == 0
        assert read_jsonl(out)[0]["ranked"] == ranked


def test_the_label_verb_fills_in_the_sqlworld_labelers_documented_defaults(world, tmp_path):
    """label_file takes None for a setting not given (so that a labeler of one's own can refuse
    it); what it fills in is --disagreement 0.1, --seed 0, --ties, and an explicit 0 stays 0."""
    from gptlab.feedback import label_file
    from gptlab.io import read_jsonl, write_jsonl_atomic
    world.export(tmp_path / "w")
    samples = tmp_path / "s.jsonl"
    write_jsonl_atomic(samples, [{"id": q.id, "prompt": "p", "responses": [
        "SELEC x", "SELECT 'no such answer'", q.sql]} for q in world.test[:40]])

    def ranked(out, **settings):
        label_file(samples, tmp_path / out, world=tmp_path / "w", **settings)
        return [r["ranked"] for r in read_jsonl(tmp_path / out)]
    default = ranked("default.jsonl")
    assert default == ranked("explicit.jsonl", disagreement=0.1, seed=0, ties=True)
    assert default != ranked("seed1.jsonl", seed=1)  # the seed matters to these samples
    careful = [world.labeler(disagreement=0.0).rank(q.id, ["SELEC x", "SELECT 'no such answer'",
                                                         q.sql]).ranked_json()
               for q in world.test[:40]]
    assert ranked("noise_free.jsonl", disagreement=0) == careful != default


def test_the_label_verb_on_samples_of_ones_own_task_says_what_to_do_instead(world, tmp_path,
                                                                             capsys):
    # A user with their own data reaches for `gptlab label` first; the world's own message
    # ("no question with id 'p0' in this world") left them to guess what world was meant.
    from gptlab.cli import main
    world.export(tmp_path / "w")
    samples, out = tmp_path / "s.jsonl", tmp_path / "r.jsonl"
    samples.write_text(json.dumps({"id": "p0", "prompt": "Convert: March 3, 2021\nISO:",
                                   "responses": [" 2021-03-03", " 2021-3-3"]}) + "\n")
    assert main(["label", "--world", str(tmp_path / "w"), "--in", str(samples),
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"gptlab label: error: {samples}:1, field 'id': no question with id 'p0' in this "
        "world; the sqlworld labeler ranks only the built-in world's questions: for your own "
        "data, rank with your own function (--labeler module:function) or write the rankings file "
        "yourself (README, 'Your own task')\n")
    assert not out.exists()


def test_the_label_verb_checks_the_id_of_a_line_it_skips_for_its_responses(world, tmp_path,
                                                                          capsys):
    # A line whose responses are all one answer is skipped, and its id was never checked: an
    # id the world lacks, or 7, went through with exit 0.
    from gptlab.cli import main
    world.export(tmp_path / "w")
    q = world.test[0]
    samples, out = tmp_path / "s.jsonl", tmp_path / "r.jsonl"
    ranked = {"id": q.id, "prompt": q.text, "responses": [q.sql, "SELECT 1"]}
    for bad, said in (("s0-test-99999", "no question with id 's0-test-99999' in this world; "
                                        "the sqlworld labeler ranks only"),
                      (7, "must be a question id string, such as ")):
        samples.write_text(json.dumps(ranked) + "\n" + json.dumps(
            {"id": bad, "prompt": "P", "responses": ["SELECT 1"]}) + "\n")
        assert main(["label", "--world", str(tmp_path / "w"), "--in", str(samples),
                     "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(
            f"gptlab label: error: {samples}:2, field 'id': {said}")
        assert not out.exists()
    samples.write_text(json.dumps(ranked) + "\n" + json.dumps(
        {"id": q.id, "prompt": "P", "responses": ["SELECT 1"]}) + "\n")  # a good id: skipped
    assert main(["label", "--world", str(tmp_path / "w"), "--in", str(samples),
                 "--out", str(out)]) == 0
    assert "1 prompt" in capsys.readouterr().err and len(out.read_text().splitlines()) == 1


def test_the_label_verb_names_file_line_and_field_of_bad_samples(world, tmp_path, capsys):
    from gptlab.cli import main
    world.export(tmp_path / "w")
    q = world.test[0]
    good = {"id": q.id, "prompt": q.text, "responses": ["SELECT 1", "SELECT name FROM employees"]}
    samples, out = tmp_path / "s.jsonl", tmp_path / "r.jsonl"
    for bad, message in (
            ({"id": q.id, "prompt": q.text, "responses": "SELECT 1"},
             ", field 'responses': must be a non-empty list of response strings, got a string"),
            ({"id": q.id, "prompt": q.text, "responses": [None, "SELECT 1"]},
             ", field 'responses': item 1 must be a response string, got null"),
            ({"id": q.id, "prompt": q.text, "responses": [1, 2]},
             ", field 'responses': item 1 must be a response string, got a number"),
            ({"id": q.id, "prompt": q.text}, ", field 'responses': missing required field; "
             "the line has 'id' and 'prompt'"),
            ({"id": "s0-train-99999", "prompt": q.text, "responses": ["SELECT 1", "SELECT 2"]},
             ", field 'id': no question with id 's0-train-99999' in this world; the sqlworld "
             "labeler ranks only the built-in world's questions: for your own data, rank with "
             "your own function (--labeler module:function) or write the rankings file yourself "
             "(README, 'Your own task')"),
            ({"prompt": q.text, "responses": ["SELECT 1", "SELECT 2"]},
             ", field 'id': missing required field; the line has 'prompt' and 'responses'"),
            # A list or an object was a TypeError (unhashable) traceback; a number named no type.
            ({"id": [q.id], "prompt": q.text, "responses": ["SELECT 1", "SELECT 2"]},
             f", field 'id': must be a question id string, such as '{world.train[0].id}', got "
             f"['{q.id}']"),
            ({"id": 7, "prompt": q.text, "responses": ["SELECT 1", "SELECT 2"]},
             f", field 'id': must be a question id string, such as '{world.train[0].id}', got 7"),
            # the rankings would need it: refused here, not later by `gptlab reward`
            ({"id": q.id, "responses": ["SELECT 1", "SELECT 2"]},
             ": needs a 'prompt' or a 'messages' field; the line has 'id' and 'responses'")):
        samples.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        assert main(["label", "--world", str(tmp_path / "w"), "--in", str(samples),
                     "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"gptlab label: error: {samples}:2{message}\n"
        assert not out.exists()
    # A line that would be skipped (one distinct response) is no excuse: the first line
    # without an id is named, not the next one that reached the labeler.
    samples.write_text(json.dumps({"prompt": q.text, "responses": ["SELECT 1", "SELECT 1"]})
                       + "\n"
                       + json.dumps({"prompt": q.text, "responses": ["SELECT 1", "SELECT 2"]})
                       + "\n")
    assert main(["label", "--world", str(tmp_path / "w"), "--in", str(samples),
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err.endswith(f"{samples}:1, field 'id': missing required field; "
                                             f"the line has 'prompt' and 'responses'\n")


def test_the_label_verb_writes_nothing_when_every_prompt_is_skipped(world, tmp_path, capsys):
    from gptlab.cli import main
    world.export(tmp_path / "w")
    q = world.test[0]
    samples, out = tmp_path / "s.jsonl", tmp_path / "r.jsonl"
    samples.write_text(json.dumps({"id": q.id, "prompt": q.text,
                                   "responses": [q.sql, q.sql, "", " "]}) + "\n")
    assert main(["label", "--world", str(tmp_path / "w"), "--in", str(samples),
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "skipped 2 responses: 2 empty responses left out of rankings\n"
        f"gptlab label: error: {samples}: ranked none of 1 prompt: skipped 1 prompt: 1 "
        "prompt with fewer than 2 distinct responses\n")
    assert not out.exists()
    # One prompt ranked: "ranked 1 prompts", "wrote 1 rankings" (a response and a prompt
    # skipped, besides).
    q2 = world.test[1]
    samples.write_text(json.dumps({"id": q.id, "prompt": q.text, "responses": [q.sql, q.sql]})
                       + "\n" + json.dumps({"id": q2.id, "prompt": q2.text,
                                            "responses": [q2.sql, "SELECT 1", ""]}) + "\n")
    assert main(["label", "--world", str(tmp_path / "w"), "--in", str(samples),
                 "--out", str(out), "--disagreement", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("skipped 1 response: 1 empty response left out of rankings\n"
                            "skipped 1 prompt: 1 prompt with fewer than 2 distinct responses\n"
                            "ranked 1 prompt\n")
    assert captured.out == f"wrote 1 ranking to {out}\n"


def test_win_rate_refuses_no_records_and_answers_that_do_not_pair_up(world):
    # No records divided by zero; one answer short dropped a record from the rate unnoticed.
    from gptlab.eval.pipeline_eval import win_rate
    records = [{"id": q.id} for q in world.test[:2]]
    for recs, a, b in (([], [], []), (records, ["SELECT 1"] * 2, ["SELECT 1"]),
                       (records[:1], ["SELECT 1"] * 2, ["SELECT 1"] * 2)):
        with pytest.raises(ValueError, match="at least one record, got"):
            win_rate(world, recs, a, b)


def test_win_rate_is_symmetric_and_ties_what_the_labeler_cannot_tell_apart(world):
    from gptlab.eval.pipeline_eval import win_rate
    q = _q(world, "count_employees_city")
    city = q.values["city"]
    other = next(c for c in ("Paris", "Berlin", "London", "Madrid") if c != city and
                 len(c) != len(city))
    records = [{"id": q.id}] * 6
    a = [q.sql + ";",                        # the same SQL after normalising: a tie
         "SELECT  " + q.sql[len("SELECT "):],  # a doubled space: a tie
         "SELEC x", q.sql,                   # an error against a correct answer: b wins
         f"SELECT COUNT(*) FROM employees WHERE city = '{other}'",  # wrong vs correct: b wins
         "SELEC y"]                           # two errors of one length: a tie
    b = [q.sql, q.sql, q.sql, "SELEC z",      # a correct answer against an error: a wins
         q.sql, "SELEC w"]
    # ties 0.5 + 0.5 + 0.5, a wins 1, b wins twice: (1.5 + 1) / 6
    assert win_rate(world, records, a, b) == pytest.approx(2.5 / 6)
    assert win_rate(world, records, b, a) == pytest.approx(1 - 2.5 / 6)
    # Among answers of one verdict the shorter wins, whichever side it is on.
    longer = q.sql + " AND 1 = 1"
    assert win_rate(world, records[:1], [q.sql], [longer]) == 1.0
    assert win_rate(world, records[:1], [longer], [q.sql]) == 0.0
    # By verdict alone, as the default labelers rank, one verdict is a tie whatever the length;
    # a different verdict still decides.
    assert win_rate(world, records[:1], [q.sql], [longer], by_verdict=True) == 0.5
    assert win_rate(world, records, a, b, by_verdict=True) == pytest.approx(2.5 / 6)
    wrong_long = f"SELECT COUNT(*) FROM employees WHERE city = '{other}' AND 1 = 1"
    assert win_rate(world, records[:2], [wrong_long, q.sql], ["SELEC x", longer],
                    by_verdict=True) == pytest.approx(1.5 / 2)


def test_noise_also_flips_rankings_of_two_tiers(world):
    # One correct and one wrong answer per question: two levels, the smallest noisy ranking.
    careful = world.labeler(disagreement=0.0)
    items = [it for it in ((q.id, [q.sql, "SELECT 1"]) for q in world.test)
             if len(careful.rank(*it).tied_groups()) == 2]
    assert len(items) > 500
    noisy = SqlLabeler(world, disagreement=0.25, seed=7)
    flipped = sum(noisy.rank(*it).order == (1, 0) for it in items) / len(items)
    assert abs(flipped - 0.25) <= 0.04
    assert flipped == pytest.approx(1 - agreement(careful, noisy, items))


def test_equal_key_levels_put_answers_of_one_verdict_and_length_in_one_level(world):
    from gptlab.world.checker import Verdict
    labeler = world.labeler(disagreement=0.0, ties=False)
    verdicts = [Verdict("wrong"), Verdict("correct"), Verdict("correct"), Verdict("correct"),
                Verdict("error")]
    responses = ["SELECT 1", "SELECT b", "SELECT a", "SELECT aa", "SELEC"]
    # 1 and 2: correct, 8 characters each -> one level; 3 is correct but longer.
    assert labeler.equal_key_levels(verdicts, responses) == [[1, 2], [3], [0], [4]]
    assert labeler.careful_levels(verdicts, responses) == [[1], [2], [3], [0], [4]]


def test_agreement_leaves_out_pairs_that_only_one_labeler_ties(world):
    q = _q(world, "count_employees_city")
    short, longer = q.sql, q.sql + " AND 1 = 1"
    items = [(q.id, [short, longer, "SELECT 1"])]  # correct, correct, wrong
    tied, strict = world.labeler(disagreement=0.0), world.labeler(disagreement=0.0, ties=False)
    assert [v.kind for v in tied.rank(*items[0]).verdicts] == ["correct", "correct", "wrong"]
    # The tied labeler has no order for (short, longer): only the two cross-tier pairs count,
    # and both labelers order them alike.
    assert agreement(tied, strict, items) == 1.0
    assert agreement(strict, tied, items) == 1.0


def test_a_disagreement_of_one_half_is_a_random_ranking_and_allowed(world):
    assert SqlLabeler(world, disagreement=0.5).disagreement == 0.5
    assert _dispersion(4, 0.5) == pytest.approx(1.0, abs=1e-9)  # every order equally likely
    with pytest.raises(UserError, match="disagreement"):
        SqlLabeler(world, disagreement=0.5001)
    with pytest.raises(UserError, match="disagreement"):
        SqlLabeler(world, disagreement=-0.01)
