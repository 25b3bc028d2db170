"""Simulated labelers: the careful order, calibrated disagreement, agreement between labelers."""
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
    ranking = world.labeler(disagreement=0.0).rank(q.id, responses)
    assert ranking.order == (3, 2, 4, 1, 5, 0)
    assert [v.kind for v in ranking.verdicts] == ["error", "wrong", "correct", "correct",
                                                 "wrong", "error"]
    assert ranking.id == q.id and ranking.ranked()[0] == q.sql
    assert ranking.to_json()["id"] == q.id and ranking.to_json()["verdicts"][0] == "correct"
    assert normalize_sql(" SELECT  1 ;\n") == "SELECT 1"


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
    careful = world.labeler(disagreement=0.0)
    for p in (0.1, 0.25):
        noisy = SqlLabeler(world, disagreement=p, seed=7)
        assert abs((1 - agreement(careful, noisy, items)) - p) <= 0.03, p
    assert agreement(careful, world.labeler(0.0, seed=99), items) == 1.0
    # two independent noisy labelers disagree more than either does with the truth
    a, b = SqlLabeler(world, 0.1, seed=1), SqlLabeler(world, 0.1, seed=2)
    assert 0.75 <= agreement(a, b, items[:300]) <= 0.87


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
