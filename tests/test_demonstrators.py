"""A careless demonstrator's flaws: what they rewrite, how many, and that execution reveals them."""
import json

import pytest

from gptlab.errors import UserError
from gptlab.io import read_jsonl
from gptlab.train.pipeline import Pipeline, PipelineConfig
from gptlab.world import build_world
from gptlab.world.demonstrators import (flaw_demonstrations, lists_columns, make_inclusive,
                                        reverse_order, select_star)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(0, n_train=300, n_validation=10, n_test=40, n_dialogs=2,
                       corpus_chars=20_000, db_path=tmp_path_factory.mktemp("db") / "c.sqlite")


@pytest.fixture(scope="module")
def world_dir(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("world") / "w"
    world.export(d)
    return d


def test_the_flaws_rewrite_sql_by_hand():
    top = "SELECT name, salary FROM employees WHERE city = 'Rome' ORDER BY salary DESC LIMIT 3"
    assert reverse_order(top) == top.replace("DESC", "ASC")
    assert reverse_order(reverse_order(top)) == top
    assert reverse_order("SELECT name FROM projects ORDER BY budget ASC LIMIT 2") == \
        "SELECT name FROM projects ORDER BY budget DESC LIMIT 2"
    assert make_inclusive("SELECT name FROM employees WHERE hire_year > 2010 AND salary < 5") == \
        "SELECT name FROM employees WHERE hire_year >= 2010 AND salary <= 5"
    assert select_star(top) == top.replace("name, salary FROM", "* FROM")
    join = ("SELECT DISTINCT T1.name FROM employees AS T1 JOIN assignments AS T2 ON T1.id = "
            "T2.employee_id WHERE T2.project_id IN (SELECT id FROM projects WHERE budget > 5)")
    assert select_star(join) == join.replace("T1.name FROM", "* FROM", 1)
    # Aggregates and queries already selecting * are not the habit's: left as they are.
    rows = [{"completion": " SELECT COUNT(*) FROM employees"},
            {"completion": " SELECT * FROM employees WHERE name = 'Ann'"},
            {"completion": " SELECT name FROM departments"}]
    flawed, n = flaw_demonstrations(rows, "star", 1.0, seed=0)
    assert n == 1 and flawed[:2] == rows[:2]
    assert flawed[2]["completion"] == " SELECT * FROM departments"


def test_rate_seed_and_untouched_rows():
    rows = [{"id": i, "prompt": "p", "completion": f" SELECT a FROM t ORDER BY a DESC LIMIT {i}"}
            for i in range(200)] + [{"id": "x", "prompt": "p", "completion": " SELECT a FROM t"}]
    every, n_all = flaw_demonstrations(rows, "order", 1.0, seed=0)
    assert n_all == 200 and all("ASC" in r["completion"] for r in every[:200])
    assert every[200] == rows[200] and rows[0]["completion"].endswith("DESC LIMIT 0")  # copies
    assert flaw_demonstrations(rows, "order", 0.0, seed=0) == (rows, 0)
    half, n = flaw_demonstrations(rows, "order", 0.5, seed=1)
    assert 70 <= n <= 130 and flaw_demonstrations(rows, "order", 0.5, seed=1) == (half, n)
    assert flaw_demonstrations(rows, "order", 0.5, seed=2)[0] != half
    with pytest.raises(UserError, match="unknown flaw 'typo'"):
        flaw_demonstrations(rows, "typo", 0.5, 0)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        flaw_demonstrations(rows, "order", 1.5, 0)


def test_execution_reveals_a_reversed_order(world):
    ordered = [q for q in world.train if " ORDER BY " in q.sql and " LIMIT " in q.sql]
    assert len(ordered) >= 10
    assert all(world.check(q.id, q.sql).kind == "correct" for q in ordered)
    assert all(world.check(q.id, reverse_order(q.sql)).kind == "wrong" for q in ordered)


def test_execution_reveals_select_star(world):
    listing = [q for q in world.train if lists_columns(q.sql)]
    assert len(listing) >= 100
    assert all(world.check(q.id, select_star(q.sql)).kind == "wrong" for q in listing)


def test_the_pipeline_trains_sft_on_the_flawed_demonstrations(world_dir, tmp_path):
    cfg = PipelineConfig(out=str(tmp_path / "run"), world=str(world_dir), sft_examples=120,
                         demonstrator_flaw="order", demonstrator_flaw_rate=1.0, seed=3)
    rows = read_jsonl(Pipeline(cfg).demonstrations())
    full = read_jsonl(world_dir / "sft.jsonl")[:120]
    assert len(rows) == 120
    changed = [(a, b) for a, b in zip(full, rows) if a["completion"] != b["completion"]]
    assert changed and len(changed) == sum(" ORDER BY " in r["completion"] for r in full)
    assert all(b["completion"] == reverse_order(a["completion"]) for a, b in changed)


def test_a_bad_flaw_stops_the_pipeline_before_any_stage(tmp_path):
    with pytest.raises(UserError, match="unknown flaw"):
        Pipeline(PipelineConfig(out=str(tmp_path / "run"), demonstrator_flaw="typo"))
    with pytest.raises(UserError, match="demonstrator_flaw_rate"):
        Pipeline(PipelineConfig(out=str(tmp_path / "run"), demonstrator_flaw="order",
                                demonstrator_flaw_rate=-0.1))
    assert not (tmp_path / "run").exists()


def test_a_run_made_before_a_setting_existed_is_still_the_same_run(tmp_path):
    cfg = PipelineConfig(out=str(tmp_path))
    Pipeline(cfg)._check_same_run()
    saved = json.loads((tmp_path / "pipeline.json").read_text())
    del saved["demonstrator_flaw"], saved["demonstrator_flaw_rate"]  # an older run's file
    (tmp_path / "pipeline.json").write_text(json.dumps(saved))
    (tmp_path / "sft").mkdir()  # a stage made with those settings
    Pipeline(cfg)._check_same_run()  # the defaults it lacks are the run's settings
    (tmp_path / "pipeline.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match=r"sft was made with other settings \(demonstrator_flaw\)"):
        Pipeline(PipelineConfig(out=str(tmp_path), demonstrator_flaw="order"))._check_same_run()
