"""The database world: database, questions and splits, dialogs, corpus, export and the CLI."""
import hashlib
import json
import random
import re
import sqlite3
import tempfile
from dataclasses import replace

import pytest

from gptlab.cli import main
from gptlab.errors import UserError
from gptlab.world import build_world, load_world, make_schema
from gptlab.world.build import FILES, database_digest
from gptlab.world.database import CITIES
from gptlab.world.intents import INTENTS
from gptlab.world.database import HIRE_YEARS
from gptlab.world.questions import (Combo, SplitSizes, balanced_take, build_questions, phrase,
                                     slot_domains, split_combos)

SMALL = dict(n_train=300, n_validation=60, n_test=120, n_dialogs=40, corpus_chars=30_000)


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def varied():
    return build_world(3, vary_schema=True, **SMALL)


def _rows(world, sql):
    result = world.executor().run(sql)
    assert result.ok, (sql, result.error)
    return result.rows


# --- database and schema ------------------------------------------------------------------

def test_default_schema_renders_one_line_per_table():
    assert make_schema().lines() == [
        "departments(id, name, city, budget)",
        "employees(id, name, dept_id, city, salary, hire_year)",
        "projects(id, name, dept_id, budget)",
        "assignments(employee_id, project_id, role, hours)"]


def test_database_has_a_few_hundred_rows_with_cities_salaries_years_budgets(world):
    counts = {t: _rows(world, f"SELECT COUNT(*) FROM {t}")[0][0]
              for t in ("departments", "employees", "projects", "assignments")}
    assert counts["departments"] == 8 and counts["employees"] == 200 and counts["projects"] == 30
    assert 200 <= counts["assignments"] <= 600
    cities = {r[0] for r in _rows(world, "SELECT DISTINCT city FROM employees")}
    assert {"Lyon", "Paris", "Berlin"} <= cities <= set(CITIES)
    salaries = [r[0] for r in _rows(world, "SELECT salary FROM employees")]
    assert len(set(salaries)) == 200 and 28_000 <= min(salaries) and max(salaries) <= 140_000
    years = [r[0] for r in _rows(world, "SELECT hire_year FROM employees")]
    assert 2005 <= min(years) and max(years) <= 2023
    assert _rows(world, "SELECT COUNT(*) FROM projects WHERE budget > 0")[0][0] == 30
    # every foreign key points at a row
    assert _rows(world, "SELECT COUNT(*) FROM employees WHERE dept_id NOT IN "
                        "(SELECT id FROM departments)")[0][0] == 0


def test_varied_schema_renames_tables_and_columns_in_db_and_gold_sql(varied):
    names = set(re.findall(r"\w+", varied.schema.render()))
    assert names != set(re.findall(r"\w+", make_schema().render()))
    conn = sqlite3.connect(varied.db_path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert tables == set(varied.schema.tables.values())
    for q in varied.test[:100]:
        assert _rows(varied, q.sql), q.sql  # the renamed gold runs on the renamed database
    assert all(varied.schema.table("emp") in q.sql or varied.schema.table("proj") in q.sql
               or varied.schema.table("dept") in q.sql or varied.schema.table("asg") in q.sql
               for q in varied.train)
    assert varied.record(varied.test[0])["prompt"].startswith(varied.schema.render())


# --- intents, phrasings, splits -------------------------------------------------------------

def test_at_least_20_intents_with_3_seen_phrasings_each_covering_sql_features():
    assert len(INTENTS) >= 20
    for intent in INTENTS:
        assert len(intent.seen_phrasings) >= 3
        assert len(set(intent.phrasings)) == len(intent.phrasings)
    sqls = " || ".join(i.sql for i in INTENTS)
    for feature in ("WHERE", "COUNT(*)", "AVG(", "SUM(", "MIN(", "MAX(", "GROUP BY", "HAVING",
                    "ORDER BY", "LIMIT", "JOIN", "BETWEEN", "DISTINCT", "(SELECT"):
        assert feature in sqls, feature
    assert any(i.sql.count("JOIN") == 2 for i in INTENTS)  # a three-table join
    assert {i.kind for i in INTENTS} >= {"selection", "filter", "count", "aggregate", "group",
                                         "order", "join", "nested"}


def test_split_sizes_and_every_intent_is_tested_with_an_unseen_phrasing(world):
    assert (len(world.train), len(world.validation), len(world.test)) == (3500, 300, 600)
    assert len({q.text for q in world.train}) == 3500  # the default asks no repeats
    unseen = [q for q in world.test if q.unseen_phrasing]
    assert 0.15 * 600 <= len(unseen) <= 0.4 * 600
    assert {q.intent for q in unseen} == {i.name for i in INTENTS}
    assert {q.intent for q in world.test} == {i.name for i in INTENTS}
    assert len({q.id for s in world.splits.values() for q in s}) == 4400


def test_test_questions_and_value_combos_never_appear_in_training(world):
    train_texts = {q.text for q in world.train}
    val_texts = {q.text for q in world.validation}
    combo = lambda q: (q.intent, tuple(sorted(q.values.items())))  # noqa: E731
    train_combos = {combo(q) for q in world.train}
    assert not {q.text for q in world.test} & (train_texts | val_texts)
    assert not {combo(q) for q in world.test} & train_combos
    assert not {combo(q) for q in world.validation} & train_combos
    assert not {combo(q) for q in world.test} & {combo(q) for q in world.validation}
    # the gold SQL of a held-out combo is never taught through dialogs either
    held_out_sql = {q.sql for q in world.test + world.validation}
    assert not held_out_sql & {s for d in world.dialogs for s in d.sqls}
    assert not held_out_sql & {q.sql for q in world.train}


def _literal_chunks(template):
    """The fixed text of a phrasing between its slots, e.g. 'Who is on the payroll in '."""
    return [c for c in re.split(r"\{\w+\}", template) if len(c.strip(" ?.,")) >= 8]


def test_reserved_phrasings_appear_only_in_test(world):
    reserved = {i.name: len(i.phrasings) - 1 for i in INTENTS}
    assert all(q.phrasing != reserved[q.intent] for q in world.train + world.validation)
    assert all(q.unseen_phrasing == (q.phrasing == reserved[q.intent]) for q in world.test)
    training_text = "\n".join([world.corpus()] + [q.text for q in world.train + world.validation]
                              + [m["content"] for d in world.dialogs for m in d.messages])
    for intent in INTENTS:
        chunks = _literal_chunks(intent.reserved_phrasing)
        assert chunks, intent.name
        for chunk in chunks:
            assert chunk not in training_text, (intent.name, chunk)


def test_intents_with_more_or_fewer_phrasings_keep_their_own_reserved_one_for_the_test():
    # The splits once counted the phrasings of the first intent for every intent.
    three = replace(INTENTS[0], name="three", phrasings=("a {city}", "b {city}", "c {city}"))
    five = replace(INTENTS[0], name="five", phrasings=tuple(f"{x} {{city}}" for x in "vwxyz"))
    combos = [Combo(i, (("city", c),), f"SELECT {k}", ((k,),))
              for i in (three, five) for k, c in enumerate(CITIES * 4)]
    splits, _ = build_questions(combos, SplitSizes(train=60, validation=8, test=30),
                                random.Random(0), "t")
    for q in splits["train"] + splits["validation"]:
        assert not q.unseen_phrasing
        assert q.text.split()[0] in {"three": "ab", "five": "vwxy"}[q.intent]
    reserved = {(q.intent, q.text.split()[0]) for q in splits["test"] if q.unseen_phrasing}
    assert reserved == {("three", "c"), ("five", "z")}



def _split_counts(sizes_by_intent, sizes):
    """(test, validation, train) combos per intent of `split_combos`, for intents of four
    phrasings with these numbers of combos."""
    combos = []
    for name, n in sizes_by_intent.items():
        intent = replace(INTENTS[0], name=name, phrasings=tuple(f"{x} {{city}}" for x in "abcd"))
        combos += [Combo(intent, (("city", f"c{k}"),), f"SELECT {k}", ((k,),)) for k in range(n)]
    parts = split_combos(combos, sizes, random.Random(0))
    return {name: tuple(sum(c.intent.name == name for c in parts[s])
                        for s in ("test", "validation", "train")) for name in sizes_by_intent}


def test_split_combos_holds_out_per_intent_by_its_size():
    # Sizes far above what there is: the held-out shares are capped at 30% test, 20% validation;
    # 3 combos or more give a test combo, 4 or more a validation combo.
    got = _split_counts({"n2": 2, "n3": 3, "n4": 4, "n10": 10},
                        SplitSizes(train=10, validation=1000, test=1000))
    assert got == {"n2": (0, 0, 2), "n3": (1, 0, 2), "n4": (1, 1, 2), "n10": (3, 2, 5)}
    # Small sizes: test share 1.3 * 4 / (4 phrasings * 20 combos) = 0.065; from 8 combos on an
    # intent still gets two test combos, and one validation combo from 4 on.
    got = _split_counts({"n8": 8, "n12": 12}, SplitSizes(train=10, validation=0, test=4))
    assert got == {"n8": (2, 1, 5), "n12": (2, 1, 9)}
    # The margin of 1.3: test share 1.3 * 10 / (4 * 20) = 0.1625, 3 of 20 (without it, 2).
    got = _split_counts({"n20": 20}, SplitSizes(train=10, validation=0, test=10))
    assert got == {"n20": (3, 1, 16)}



def test_balanced_take_goes_round_robin_and_repeats_only_when_asked():
    groups = {"a": [1, 2, 3], "b": [4], "c": []}
    assert sorted(balanced_take(groups, 2, random.Random(0))) in ([1, 4], [2, 4], [3, 4])
    once = balanced_take(groups, 10, random.Random(0))
    assert sorted(once) == [1, 2, 3, 4]  # the groups ran dry: no question asked twice
    again = balanced_take(groups, 10, random.Random(0), repeat=True)
    assert len(again) == 10 and set(again) == {1, 2, 3, 4}


def test_year_slots_lie_inside_the_hire_years_and_spans_reach_the_last(world):
    first, last = HIRE_YEARS
    domains = slot_domains(world.company)
    assert [d["year"] for d in domains["year"]] == list(range(first + 1, last))
    spans = [(d["lo"], d["hi"]) for d in domains["span"]]
    assert min(lo for lo, _ in spans) == first and max(hi for _, hi in spans) == last
    assert all(hi - lo in (2, 3, 4, 5) for lo, hi in spans)



def test_money_reads_with_thousands_separators_and_other_values_as_they_are():
    assert (phrase("{n} over {amount} or {budget} in {city} since {year}",
                   {"n": 3, "amount": 60000, "budget": 1250000, "city": "Rome", "year": 2010})
            == "3 over 60,000 or 1,250,000 in Rome since 2010")


def test_gold_sql_is_canonical_and_returns_non_empty_results(world):
    questions = world.train[:600] + world.validation + world.test
    non_empty = sum(bool(_rows(world, q.sql)) for q in questions)
    assert non_empty / len(questions) >= 0.95
    for q in questions:
        assert "  " not in q.sql and q.sql == q.sql.strip() and not q.sql.endswith(";")
        code = re.sub(r"'[^']*'", "''", q.sql)  # keywords are checked outside string literals
        for kw in ("select", "from", "where", "and", "group by", "having", "order by", "limit",
                   "join", "as", "on", "in", "between", "desc", "asc", "count", "avg", "sum"):
            assert not re.search(rf"\b{kw}\b", code), (kw, q.sql)


def test_prompt_is_schema_question_cue_and_fits_the_context(world):
    rec = world.record(world.test[0])
    assert rec["prompt"] == world.prompt(world.test[0].text)
    assert rec["prompt"] == world.prompt(world.test[0].text, world.schema.render())
    assert rec["prompt"].startswith(world.schema.render() + "\nQuestion: ")
    assert rec["prompt"].endswith("\nSQL:") and rec["completion"].startswith(" SELECT ")
    longest = max(len(world.prompt(q.text)) + len(q.sql) + 1
                  for q in world.train + world.validation + world.test)
    assert longest <= 600  # < 200 tokens at ~3.5 characters per token (384-token context)


def test_gold_is_kept_by_id_for_questions_and_dialog_turns(world):
    q = world.test[7]
    assert world.gold(q.id) == q.sql and world.question(q.id) is q
    d = world.dialogs[0]
    assert [world.gold(f"{d.id}/{t}") for t in range(1, len(d.sqls) + 1)] == d.sqls
    with pytest.raises(UserError, match="no question"):
        world.gold("nope")


# --- dialogs and corpus ----------------------------------------------------------------------

def test_dialogs_refine_the_previous_question_with_sql_per_turn(world):
    assert len(world.dialogs) == 600
    texts = [m["content"] for d in world.dialogs for m in d.messages if m["role"] == "user"]
    for cue in ("Only those in", "Sort them by salary", "How many is that?", "Just the top"):
        assert any(t.startswith(cue) for t in texts), cue
    for d in world.dialogs[:150]:
        roles = [m["role"] for m in d.messages]
        assert roles[0] == "system" and d.messages[0]["content"] == world.schema.render()
        assert roles[1:] == ["user", "assistant"] * (len(roles[1:]) // 2) and len(roles) >= 5
        assert [m["content"] for m in d.messages if m["role"] == "assistant"] == d.sqls
        for sql in d.sqls:
            assert _rows(world, sql) not in ([], [(0,)])
    # a follow-up refines the previous query: "only those in X" keeps every earlier condition
    refined = 0
    for d in world.dialogs:
        users = [m["content"] for m in d.messages if m["role"] == "user"]
        for prev, user, sql in zip(d.sqls, users[1:], d.sqls[1:]):
            m = re.match(r"Only those in (\w+)\.", user)
            if m and not prev.startswith("SELECT COUNT"):
                conditions = re.split(r" ORDER BY | LIMIT ", prev.split(" WHERE ")[1])[0]
                assert f"city = '{m.group(1)}'" in sql
                assert all(c in sql for c in conditions.split(" AND ")), (prev, sql)
                refined += 1
    assert refined > 10


def test_every_follow_up_answers_within_the_previous_turns_answer(world):
    # "Only those in Lyon" after "just the top 3" lists some of those 3, never the top 3 of Lyon
    for d in world.dialogs:
        for prev, sql in zip(d.sqls, d.sqls[1:]):
            if not sql.startswith("SELECT COUNT"):
                earlier = {r[0] for r in _rows(world, prev)}
                assert {r[0] for r in _rows(world, sql)} <= earlier, (d.id, prev, sql)


def test_a_limit_after_an_ascending_sort_is_not_called_the_top(world):
    for d in world.dialogs:
        users = [m["content"] for m in d.messages if m["role"] == "user"]
        for user, sql in zip(users[1:], d.sqls[1:]):
            if user.startswith("Just the top"):
                assert " ORDER BY salary DESC LIMIT " in sql, (d.id, user, sql)


def test_corpus_has_facts_questions_results_and_no_test_material(world):
    corpus = world.corpus()
    assert abs(len(corpus) - world.options.corpus_chars) < 2_000
    assert re.search(r"\w+ \w+ works in \w+ in (Lyon|Paris|Berlin|\w+) and earns [\d,]+\.", corpus)
    assert "\nSQL: SELECT" in corpus and "Result (" in corpus
    assert sum(q.text in corpus for q in world.train[:200]) > 50
    docs = set(corpus.split("\n\n"))
    for q in world.test + world.validation:
        assert f"Question: {q.text}\n" not in corpus
        assert f"SQL: {q.sql}\nResult" not in corpus
    assert len(docs) > 1000


def test_corpus_size_is_configurable():
    small = build_world(1, n_train=100, n_validation=20, n_test=40, n_dialogs=5,
                        corpus_chars=5_000)
    assert 5_000 <= len(small.corpus()) < 6_000


# --- export, load, determinism, CLI -----------------------------------------------------------

def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_export_writes_all_files_and_load_world_round_trips(tmp_path):
    world = build_world(5, **SMALL)
    paths = world.export(tmp_path / "w")
    names = {"corpus.txt", "sft.jsonl", "validation.jsonl", "test.jsonl", "dialogs.jsonl",
             "prompts.jsonl", "company.sqlite", "world.json"}
    assert {p.name for p in (tmp_path / "w").iterdir()} == names == set(paths)
    sft = [json.loads(line) for line in open(paths["sft.jsonl"])]
    test = [json.loads(line) for line in open(paths["test.jsonl"])]
    dialogs = [json.loads(line) for line in open(paths["dialogs.jsonl"])]
    prompts = [json.loads(line) for line in open(paths["prompts.jsonl"])]
    assert len(sft) == 300 and len(test) == 120 and len(dialogs) == 40 and len(prompts) == 300
    assert {"id", "prompt", "completion", "intent", "values"} <= set(sft[0])
    assert {"id", "prompt", "completion", "unseen_phrasing"} <= set(test[0])
    assert set(dialogs[0]) == {"id", "messages"} and {"id", "prompt"} <= set(prompts[0])
    assert [p["id"] for p in prompts] == [r["id"] for r in sft]

    loaded = load_world(tmp_path / "w")
    assert loaded.db_path == tmp_path / "w" / "company.sqlite"
    for rec in sft[:50] + test:
        assert " " + loaded.gold(rec["id"]) == rec["completion"]
    assert loaded.check(test[0]["id"], test[0]["completion"]).kind == "correct"
    assert loaded.fingerprint() == world.fingerprint()


@pytest.mark.parametrize("failing", ["sft.jsonl", "prompts.jsonl", "world.json"])
def test_a_world_exported_over_another_that_fails_leaves_the_old_one_byte_for_byte(
        tmp_path, monkeypatch, failing):
    """Each file is written atomically, but a world is all of them: an export over another
    that stops half-way must not leave the old manifest over a mix of the two worlds. It
    unlinked world.json first and lost the old world with it; now the old world's files wait
    aside, world.json among none of the new ones, and come back as they were (the same files)
    when the export fails, at any of its files."""
    import os

    from gptlab.world import build as world_build
    w = tmp_path / "w"
    old = build_world(5, **SMALL)
    old.export(w)
    (w / "notes.txt").write_bytes(b"mine")
    before = {p.name: (p.read_bytes(), os.stat(p).st_ino) for p in sorted(w.iterdir())}
    real_jsonl, real_json = world_build.write_jsonl_atomic, world_build.write_json_atomic

    def stop_at(real):
        def write(path, *a, **k):
            assert not (w / "world.json").exists()  # no manifest over a mix of two worlds
            if os.path.basename(path) == failing:
                raise KeyboardInterrupt
            return real(path, *a, **k)
        return write
    monkeypatch.setattr(world_build, "write_jsonl_atomic", stop_at(real_jsonl))
    monkeypatch.setattr(world_build, "write_json_atomic", stop_at(real_json))
    with pytest.raises(KeyboardInterrupt):
        build_world(6, **SMALL).export(w)
    assert {p.name: (p.read_bytes(), os.stat(p).st_ino) for p in sorted(w.iterdir())} == before
    assert load_world(w).fingerprint() == old.fingerprint()
    monkeypatch.undo()
    new = build_world(6, **SMALL)
    new.export(w)
    assert load_world(w).fingerprint() == new.fingerprint() != old.fingerprint()
    assert sorted(p.name for p in w.iterdir()) == sorted([*FILES, "notes.txt"])


def test_a_world_loaded_from_its_directory_exports_there_again(tmp_path):
    """Its database is the one in the directory: kept in place, never moved aside."""
    w = tmp_path / "w"
    build_world(5, **SMALL).export(w)
    before = _digests(w)
    load_world(w).export(w)
    assert _digests(w) == before


def test_load_world_refuses_missing_or_tampered_directories(tmp_path):
    with pytest.raises(UserError, match="world.json"):
        load_world(tmp_path)
    world = build_world(5, **SMALL)
    world.export(tmp_path / "w")
    manifest = json.loads((tmp_path / "w" / "world.json").read_text())
    # A database name that is no file name is a damaged manifest, not a file "not found".
    for name in (5, "", None):
        (tmp_path / "w" / "world.json").write_text(json.dumps({**manifest, "database": name}))
        with pytest.raises(UserError) as err:
            load_world(tmp_path / "w")
        assert str(err.value) == (
            f"{tmp_path / 'w' / 'world.json'}, field 'database': expected the database's file "
            f"name in the world directory (a string), got {name!r}; export the world again")
    manifest["options"]["seed"] = 6
    (tmp_path / "w" / "world.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="different version of gptlab, or its options were "
                                        "edited; export it again"):
        load_world(tmp_path / "w")
    del manifest["fingerprint"]
    (tmp_path / "w" / "world.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="expected the world's fingerprint"):
        load_world(tmp_path / "w")
    manifest["options"]["colour"] = 1
    (tmp_path / "w" / "world.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="options"):
        load_world(tmp_path / "w")


def test_a_database_edited_after_export_or_in_the_cache_is_never_trusted(tmp_path, monkeypatch):
    world = build_world(5, **SMALL)
    world.export(tmp_path / "w")
    q = next(q for q in world.test if q.intent == "salary_of_employee")
    db = tmp_path / "w" / "company.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE employees SET salary = 1")
    with pytest.raises(UserError) as err:
        load_world(tmp_path / "w")
    assert str(err.value) == (f"{db}: the database's contents differ from the world's (was it "
                              "edited?); export the world again")
    # The build cache under the temp directory is checked too, and rebuilt.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    cache = build_world(5, **SMALL).db_path
    with sqlite3.connect(cache) as conn:
        conn.execute("UPDATE employees SET salary = 1")
    rebuilt = build_world(5, **SMALL)
    assert rebuilt.db_path == cache
    assert rebuilt.check(q.id, "SELECT 1").kind == "wrong"
    assert rebuilt.check(q.id, q.sql).kind == "correct"
    cache.write_bytes(b"not a database")  # unreadable: rebuilt too
    assert build_world(5, **SMALL).check(q.id, q.sql).kind == "correct"


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    build_world(2, **SMALL, db_path=tmp_path / "a.sqlite").export(tmp_path / "a")
    build_world(2, **SMALL, db_path=tmp_path / "b.sqlite").export(tmp_path / "b")
    build_world(4, **SMALL, db_path=tmp_path / "c.sqlite").export(tmp_path / "c")
    a, b, c = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert a == b and len(a) == 8
    assert all(a[name] != c[name] for name in a)


def test_cli_export_then_check_and_bad_out_exits_2(tmp_path, capsys):
    out = tmp_path / "world"
    argv = ["world", "export", "--out", str(out), "--seed", "1", "--train", "200",
            "--validation", "40", "--test", "80", "--dialogs", "10", "--corpus-chars", "8000"]
    assert main(argv) == 0
    assert "wrote 8 files" in capsys.readouterr().out
    test = [json.loads(line) for line in open(out / "test.jsonl")]
    assert len(test) == 80
    assert main(["world", "check", "--world", str(out), "--id", test[0]["id"],
                 test[0]["completion"].strip()]) == 0
    assert capsys.readouterr().out.startswith("correct")
    assert main(["world", "check", "--world", str(out), "--id", "nope", "SELECT 1"]) == 2
    assert capsys.readouterr().err.endswith(
        f"error: {out}, field '--id': no question with id 'nope' in this world (its questions' "
        f"ids are in its .jsonl files, such as '{test[0]['id']}')\n")
    assert main(["world", "export", "--out", str(out), "--vary-schema", "--train", "50",
                 "--corpus-chars", "2000"]) == 0
    schema = json.loads((out / "world.json").read_text())["schema"]
    assert schema != make_schema().to_json()

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["world", "export", "--out", str(a_file)]) == 2
    assert "existing file" in capsys.readouterr().err
    assert main(["world", "check", "--world", str(tmp_path / "none"), "--id", "x", "SELECT 1"]) == 2

    # A folder of the user's named as a world file is refused, not moved aside and deleted.
    mine = tmp_path / "mine"
    (mine / "world.json").mkdir(parents=True)
    (mine / "world.json" / "notes.txt").write_text("kept")
    assert main(["world", "export", "--out", str(mine), "--train", "50"]) == 2
    err = capsys.readouterr().err
    assert "world.json: is a directory where a file world.json is written" in err
    assert sorted(p.name for p in mine.rglob("*")) == ["notes.txt", "world.json"]


def test_cli_score_counts_the_first_response_and_names_bad_lines(tmp_path, capsys):
    out = tmp_path / "world"
    assert main(["world", "export", "--out", str(out), "--seed", "1", "--train", "50",
                 "--validation", "10", "--test", "40", "--dialogs", "2",
                 "--corpus-chars", "2000"]) == 0
    rows = [json.loads(line) for line in open(out / "test.jsonl")]
    test = ([t for t in rows if not t["unseen_phrasing"]][:2]
            + [t for t in rows if t["unseen_phrasing"]][:2])
    gold = [t["completion"].strip() for t in test]
    # Question 0: right first; 1: wrong first, right second; 2 (unseen phrasing): an error;
    # 3 (unseen phrasing): right.
    responses = [[gold[0], "SELECT 1"], ["SELECT 1", gold[1]], ["SELEC nothing"], [gold[3]]]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({**t, "responses": r}) + "\n"
                               for t, r in zip(test, responses)))
    capsys.readouterr()
    verdicts = tmp_path / "verdicts.jsonl"
    assert main(["world", "score", "--world", str(out), "--in", str(samples),
                 "--out", str(verdicts)]) == 0
    printed = capsys.readouterr().out
    assert "execution accuracy 0.5000 on 4 questions" in printed
    assert "does not run 0.2500 (1 of 4)" in printed  # question 2's only response
    assert "all 6 responses: 0.5000" in printed  # 3 of 6 responses right
    rows = [json.loads(line) for line in open(verdicts)]
    assert [r["correct"] for r in rows] == [True, False, False, True]
    assert [r["correct_on_test_suite"] for r in rows] == [True, False, False, True]
    assert "on the test suite 0.5000" in printed  # the gold's own SQL is right everywhere
    assert rows[1]["verdicts"] == ["wrong", "correct"] and rows[2]["verdicts"] == ["error"]
    assert "unseen phrasing 0.5000 on 2 questions" in printed
    # Only `id` and `responses`, as a hand-made file has: the world knows which questions use
    # the reserved phrasing (this line was missing).
    samples.write_text("".join(json.dumps({"id": t["id"], "responses": r}) + "\n"
                               for t, r in zip(test, responses)))
    assert main(["world", "score", "--world", str(out), "--in", str(samples)]) == 0
    assert "unseen phrasing 0.5000 on 2 questions" in capsys.readouterr().out
    samples.write_text("".join(json.dumps({"id": t["id"], "responses": r}) + "\n"
                               for t, r in zip(test[:3], responses)))  # one unseen phrasing
    assert main(["world", "score", "--world", str(out), "--in", str(samples)]) == 0
    assert "unseen phrasing 0.0000 on 1 question\n" in capsys.readouterr().out  # not "questions"
    # A dialog's turns are scored too (`{dialog id}/{turn}`), and are no test question.
    dialog = json.loads((out / "dialogs.jsonl").read_text().splitlines()[0])
    turns = [m["content"] for m in dialog["messages"] if m["role"] == "assistant"]
    samples.write_text("".join(json.dumps({"id": f"{dialog['id']}/{t}", "responses": [sql]})
                               + "\n" for t, sql in enumerate(turns, 1)))
    assert main(["world", "score", "--world", str(out), "--in", str(samples)]) == 0
    printed = capsys.readouterr().out
    assert f"execution accuracy 1.0000 on {len(turns)} questions" in printed
    assert "unseen phrasing" not in printed

    # An id the world does not have, and a record without responses: file, line and field.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": test[0]["id"], "responses": [gold[0]]}) + "\n"
                   + json.dumps({"id": "s1-test-99999", "responses": ["SELECT 1"]}) + "\n")
    assert main(["world", "score", "--world", str(out), "--in", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: {bad}:2, field 'id': no question with id 's1-test-99999' in "
                        "this world\n")
    bad.write_text(json.dumps({"id": test[0]["id"], "responses": []}) + "\n")
    assert main(["world", "score", "--world", str(out), "--in", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "field 'responses'" in err


def test_a_world_without_training_questions_exports_and_loads(tmp_path):
    out = tmp_path / "w"
    assert main(["world", "export", "--out", str(out), "--train", "0", "--validation", "5",
                 "--test", "5", "--dialogs", "2", "--corpus-chars", "3000"]) == 0
    assert (out / "sft.jsonl").read_text() == "" and len((out / "corpus.txt").read_text()) > 3000
    test = json.loads((out / "test.jsonl").read_text().splitlines()[0])
    assert load_world(out).check(test["id"], test["completion"]).kind == "correct"


@pytest.mark.parametrize("manifest, message", [
    ({"format": "gptlab-world/1", "options": {"n_train": "x"}},
     "field 'options.n_train': must be an integer, got 'x'"),
    # A string is truthy: "no" built a varied world, refused as "a different version of gptlab".
    ({"format": "gptlab-world/1", "options": {"vary_schema": "no"}, "fingerprint": "f"},
     "field 'options.vary_schema': must be true or false, got 'no'"),
    # Past what an export writes: the world was rebuilt from it question by question, until the
    # memory ran out (13 GB after ten minutes, for 10**12).
    ({"format": "gptlab-world/1", "options": {"n_train": 10**12}, "fingerprint": "f"},
     "field 'options.n_train': at most 1,000,000 questions, got 1,000,000,000,000: no export "
     "writes more; export the world again"),
    ({"format": "gptlab-world/1", "options": {"corpus_chars": 10**10}, "fingerprint": "f"},
     "field 'options.corpus_chars': at most 1,000,000,000 characters, got 10,000,000,000: no "
     "export writes more; export the world again"),
])
def test_load_world_refuses_a_manifest_of_the_wrong_shape(tmp_path, manifest, message, capsys):
    (tmp_path / "world.json").write_text(json.dumps(manifest))
    assert main(["world", "check", "--world", str(tmp_path), "--id", "x", "SELECT 1"]) == 2
    where = tmp_path / "world.json"
    assert capsys.readouterr().err in (f"gptlab world check: error: {where}: {message}\n",
                                       f"gptlab world check: error: {where}, {message}\n")


MAKE_ONE = "(make one with `gptlab world export`)"


@pytest.mark.parametrize("make, says", [
    (lambda d: None, f"world directory not found {MAKE_ONE}"),
    (lambda d: d.write_text("x"), f"is a file, not a world directory {MAKE_ONE}"),
    (lambda d: d.mkdir(), "is not a world directory: it holds no world.json (make one with "
                          "`gptlab world export`; an export stopped before its end leaves none: "
                          "export it again)"),
    (lambda d: (d.mkdir(), (d / "world.json").write_text('{"format":\n')),
     "is not a world directory: its world.json is no world's manifest: not valid JSON "
     "(Expecting value) on line 2; export the world again"),
    (lambda d: (d.mkdir(), (d / "world.json").write_text("[1]")),
     "is not a world directory: its world.json is no world's manifest: expected a JSON object; "
     "export the world again"),
    (lambda d: (d.mkdir(), (d / "world.json").write_text('{"format": "maps/2"}')),
     "is not a world directory: its world.json is no world's manifest: its format is 'maps/2', "
     "not 'gptlab-world/1'; export the world again"),
], ids=["missing", "a-file", "no-manifest", "broken-json", "not-an-object", "other-format"])
def test_every_reader_of_a_world_directory_says_alike_what_is_wrong_with_it(tmp_path, capsys,
                                                                            make, says):
    # The pipeline said "not an exported world (no world.json)", world check and label "world
    # directory not found", and a directory without world.json "DIR/world.json: not a world
    # directory", naming a file the user never typed and no field.
    from gptlab.world.build import open_world
    world = tmp_path / "w"
    make(world)
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"id": "s0-test-00001", "prompt": "p",
                                   "responses": ["SELECT 1", "SELECT 2"]}) + "\n")
    for argv in (["world", "check", "--world", str(world), "--id", "x", "SELECT 1"],
                 ["world", "score", "--world", str(world), "--in", str(samples)],
                 ["label", "--world", str(world), "--in", str(samples), "--out",
                  str(tmp_path / "r.jsonl")],
                 ["pipeline", "--world", str(world), "--out", str(tmp_path / "run")]):
        assert main(argv) == 2
        command = " ".join(argv[:2] if argv[0] == "world" else argv[:1])
        # A world not found, or not a world, names the flag that gave it, as any input not
        # found or of the wrong kind.
        assert capsys.readouterr().err == f"gptlab {command}: error: {world}, field '--world': " \
                                          f"{says}\n"
    for read in (load_world, open_world):
        with pytest.raises(UserError) as err:
            read(world)
        assert str(err.value) == f"{world}, field 'world': {says}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl", "w"][:1 + world.exists()]


def test_cli_score_refuses_non_string_responses_and_repeated_ids(tmp_path, capsys):
    out = tmp_path / "world"
    build_world(1, n_train=20, n_validation=5, n_test=5, n_dialogs=1,
                corpus_chars=500, db_path=tmp_path / "c.sqlite").export(out)
    qid, other = [json.loads(line)["id"]
                  for line in (out / "test.jsonl").read_text().splitlines()[:2]]
    bad = tmp_path / "bad.jsonl"
    verdicts = tmp_path / "v.jsonl"
    for lines, message in (
            ([{"id": qid, "responses": [None]}],
             f"{bad}:1, field 'responses': item 1 must be a response string, got null"),
            ([{"id": qid, "responses": ["SELECT 1", 1]}],
             f"{bad}:1, field 'responses': item 2 must be a response string, got a number"),
            ([{"id": qid, "responses": "SELECT 1"}],
             f"{bad}:1, field 'responses': must be a non-empty list of response strings, got a "
             f"string"),
            ([{"id": qid, "responses": ["SELECT 1"]}, {"id": other, "responses": ["SELECT 1"]},
              {"id": qid, "responses": ["SELECT 2"]}],
             f"{bad}:3, field 'id': id '{qid}' is repeated (first on line 1); score each "
             f"question once, with all its responses on one line")):
        bad.write_text("".join(json.dumps(r) + "\n" for r in lines))
        assert main(["world", "score", "--world", str(out), "--in", str(bad),
                     "--out", str(verdicts)]) == 2
        assert capsys.readouterr().err == f"gptlab world score: error: {message}\n"
        assert not verdicts.exists()
    assert main(["world", "score", "--world", str(out), "--in", str(bad),
                 "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"gptlab world score: error: {tmp_path}: is a directory; " \
                                      f"give a file name\n"


def test_cli_score_never_writes_its_verdicts_over_the_samples_or_the_world(tmp_path, capsys):
    out = tmp_path / "world"
    build_world(1, n_train=20, n_validation=5, n_test=5, n_dialogs=1,
                corpus_chars=500, db_path=tmp_path / "c.sqlite").export(out)
    qid = json.loads((out / "test.jsonl").read_text().splitlines()[0])["id"]
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"id": qid, "responses": ["SELECT 1"]}) + "\n")
    before = {p.name: p.read_bytes() for p in [samples, *out.iterdir()]}
    (tmp_path / "sub").mkdir()
    for target, what in ((tmp_path / "sub" / ".." / "samples.jsonl", "--in"),
                         (out / "test.jsonl", "test.jsonl of --world"),
                         (out / "company.sqlite", "company.sqlite of --world")):
        assert main(["world", "score", "--world", str(out), "--in", str(samples),
                     "--out", str(target)]) == 2
        assert capsys.readouterr().err == (
            f"gptlab world score: error: {target}, field 'out': is the input file ({what}); "
            f"writing would replace it, choose another out (--out)\n")
    assert {p.name: p.read_bytes() for p in [samples, *out.iterdir()]} == before
    assert main(["world", "score", "--world", str(out), "--in", str(samples),
                 "--out", str(tmp_path / "verdicts.jsonl")]) == 0


# The demo's world, byte for byte: the figures README and docs/EXPERIMENTS.md publish were
# measured on these files (EXPERIMENTS lists the run's hashes). A change to the world's
# generation moves every figure; it should be made on purpose, with this table and the
# figures updated together.
DEMO_WORLD_SHA256 = {
    "corpus.txt": "1f54021c6cca1ae4", "sft.jsonl": "33d423bd45b42512",
    "validation.jsonl": "baf871e0c753bd98", "test.jsonl": "da7d21079f196f64",
    "dialogs.jsonl": "04b9b3908297f10d", "prompts.jsonl": "a573dab9b0fa3562",
}


def test_the_demo_world_is_the_one_its_figures_were_measured_on(world, tmp_path):
    paths = world.export(tmp_path / "world")
    got = {name: hashlib.sha256(paths[name].read_bytes()).hexdigest()[:16]
           for name in DEMO_WORLD_SHA256}
    assert got == DEMO_WORLD_SHA256
    assert database_digest(paths["company.sqlite"])[:16] == "2639032598f2016c"
    assert world.fingerprint()[:16] == "56727669c4d19592"


def test_a_negative_option_an_unknown_question_and_a_missing_database_are_named(
        world, tmp_path):
    from gptlab.world.build import open_world
    with pytest.raises(UserError) as e:
        build_world(0, n_test=-1)
    assert str(e.value) == "field 'n_test': must be >= 0, got -1"
    with pytest.raises(UserError) as e:
        world.question("no-such-id")
    assert str(e.value) == "field 'id': no question with id 'no-such-id' in this world"
    assert open_world("builtin").fingerprint() == world.fingerprint()
    build_world(5, **SMALL).export(tmp_path / "w")
    (tmp_path / "w" / "company.sqlite").unlink()
    with pytest.raises(UserError) as e:
        load_world(tmp_path / "w")
    assert str(e.value) == f"{tmp_path / 'w' / 'company.sqlite'}: database file not found"
