"""The read-only executor and the execution checker."""
import hashlib
import os
import signal
import sys
import threading

import pytest

from gptlab.errors import UserError
from gptlab.world import SqlExecutor, build_world, check


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "company.sqlite"
    return build_world(0, n_train=100, n_validation=20, n_test=40, n_dialogs=5,
                       corpus_chars=1000, db_path=path)


@pytest.fixture()
def ex(world):
    with SqlExecutor(world.db_path, max_vm_steps=2_000_000, max_rows=50) as executor:
        yield executor


GOLD_LYON = "SELECT name FROM employees WHERE city = 'Lyon'"


def test_executor_returns_columns_and_rows(ex):
    r = ex.run("SELECT name, salary FROM employees WHERE city = 'Lyon' "
               "ORDER BY salary DESC LIMIT 3")
    assert r.ok and r.columns == ["name", "salary"] and len(r.rows) == 3
    assert r.rows[0][1] > r.rows[1][1] > r.rows[2][1]


def test_executor_row_limit_truncates(ex):
    r = ex.run("SELECT * FROM assignments")
    assert r.ok and r.truncated and len(r.rows) == 50


def test_executor_refuses_writes_attach_and_pragma_writes_and_leaves_the_file_alone(ex, world):
    before = hashlib.sha256(world.db_path.read_bytes()).hexdigest()
    for sql in ("DROP TABLE employees", "INSERT INTO departments VALUES (99, 'X', 'Lyon', 1)",
                "UPDATE employees SET salary = 0", "DELETE FROM projects",
                "CREATE TABLE t (x INTEGER)", "ATTACH DATABASE ':memory:' AS other",
                "PRAGMA user_version = 5", "PRAGMA journal_mode = WAL",
                f"VACUUM INTO '{world.db_path.parent / 'copy.sqlite'}'", "VACUUM",
                "UPDATE sqlite_master SET sql = ''", "UPDATE sqlite_schema SET name = 'x'",
                "PRAGMA writable_schema = ON", "SELECT * FROM pragma_writable_schema"):
        r = ex.run(sql)
        assert not r.ok and r.error.kind == "forbidden", (sql, r.error)
    assert hashlib.sha256(world.db_path.read_bytes()).hexdigest() == before
    assert not (world.db_path.parent / "copy.sqlite").exists()
    assert ex.run("SELECT COUNT(*) FROM employees").rows == [(200,)]
    # Describing the schema is a read, as a statement or as a table.
    for sql in ("PRAGMA table_info(employees)",
                "SELECT cid, name FROM pragma_table_info('employees')"):
        info = ex.run(sql)
        assert info.ok and [row[1] for row in info.rows][:3] == ["id", "name", "dept_id"], sql


RECURSIVE = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT MAX(x) FROM c"
CROSS = "SELECT COUNT(*) FROM assignments a, assignments b, assignments c, assignments d"


def test_executor_stops_runaway_queries_at_the_step_budget(world):
    """The budget counts SQLite steps, not seconds: a runaway query stops at the same step on
    every run, however loaded the machine (the backstop is out of reach here)."""
    for sql in (RECURSIVE, CROSS):
        stopped_at = set()
        for _ in range(2):
            with SqlExecutor(world.db_path, max_vm_steps=300_000, backstop_s=1e9) as executor:
                for _ in range(2):  # the same text again on the same connection, too
                    r = executor.run(sql)
                    assert not r.ok and r.error.kind == "timeout", sql
                    assert "budget of 300000 SQLite steps" in r.error.message
                    stopped_at.add(r.steps)
                assert executor.run("SELECT 1").rows == [(1,)]  # usable afterwards
        assert stopped_at == {300_100}, sql  # the first count past the budget


def test_a_runaway_answer_is_an_error_naming_the_budget_wherever_a_models_sql_runs(world):
    """The labelers, the evaluation and PPO's execution reward all run a model's SQL through
    the world's one executor: a cartesian join or a correlated subquery over one stops at the
    step budget (the same step on every run) and is an error, ranked and scored below a wrong
    answer, never a wait."""
    from gptlab.eval.execution import exec_verdicts
    from gptlab.world.rewards import execution_reward
    q = next(q for q in world.test if q.intent == "employees_in_city")
    runaway = ("SELECT e.name FROM employees e WHERE e.salary > (SELECT AVG(b.hours) FROM "
               "assignments a, assignments b, assignments c WHERE c.employee_id = e.id)", CROSS)
    executor = world.executor()
    saved = executor.max_vm_steps
    executor.max_vm_steps = 300_000
    try:
        for sql in runaway:
            assert executor.run(sql).steps == 300_100
            v = world.check(q.id, sql)
            assert (v.kind, v.detail) == ("error", "timeout: query stopped: it ran past the "
                                                   "budget of 300000 SQLite steps")
            assert exec_verdicts(world, [world.record(q)], [sql]) == ["error"]
            answers = [sql, "SELECT name FROM employees", q.sql]
            assert execution_reward(world)([q.text] * 3, answers, [{"id": q.id}] * 3) == \
                [-1.0, 0.0, 1.0]
            ranking = world.labeler(ties=False).rank(q.id, answers)
            assert ranking.order == (2, 1, 0)
            assert not world.correct_on_test_suite(q.id, sql)
    finally:
        executor.max_vm_steps = saved


def test_a_gold_query_stopped_by_a_lowered_budget_names_the_budget_not_the_database(world):
    """A budget lowered below what a gold query needs said "does not run on DB (...); was the
    database replaced?", pointing at the file; and the failed gold result was kept, so that
    raising the budget again changed nothing. A gold result kept from a check under the
    higher budget was used under the lower one, and the same SQL checked against it was
    judged an error: the answer blamed for the budget."""
    executor = world.executor()
    q = max(world.test, key=lambda q: executor.run(q.sql).steps)
    needs = executor.run(q.sql).steps
    assert needs >= 300
    assert world.check(q.id, q.sql).correct  # its gold result kept, under the default budget
    saved = executor.max_vm_steps
    executor.max_vm_steps = 100
    try:
        with pytest.raises(UserError) as e:
            world.check(q.id, q.sql)
        assert str(e.value) == (
            f"field 'max_vm_steps': gold SQL of '{q.id}' ran past the executor's step budget of "
            f"100 SQLite steps: the budget is below what the world's own queries need (at most "
            f"about 3,500 steps); raise it (World.executor().max_vm_steps, default 20000000)")
    finally:
        executor.max_vm_steps = saved
    assert world.check(q.id, q.sql).correct  # the budget raised, the gold runs again


def test_a_query_counts_the_same_steps_every_time_it_runs(world):
    """A cached statement carried its step count into its next run, which moved where the
    handler was first called: the same text counted one call more the second time."""
    sql = "SELECT city, COUNT(*), AVG(salary) FROM employees GROUP BY city ORDER BY 2 DESC"
    with SqlExecutor(world.db_path) as executor:
        counts = {executor.run(sql).steps for _ in range(3)}
    assert len(counts) == 1 and 0 < counts.pop() < 10_000


def test_every_gold_query_fits_the_step_budget_with_a_wide_margin(world):
    """Every gold SQL the world can ask (each intent with each value) on the company and on
    each variant database needs under a thousandth of the budget (at most 3,500 steps)."""
    import sqlite3

    from gptlab.world.executor import MAX_VM_STEPS
    from gptlab.world.questions import enumerate_combos
    from gptlab.world.variants import VariantDatabases
    conn = sqlite3.connect(world.db_path)
    golds = sorted({c.sql for c in enumerate_combos(world.company, world.schema, conn)}
                   | {world.gold(q.id) for q in world.test})
    conn.close()
    variants = VariantDatabases(world.company, world.schema)
    most = 0
    for executor in [world.executor(), *variants.executors]:
        for sql in golds:
            r = executor.run(sql)
            assert r.ok, (sql, r.error)
            most = max(most, r.steps)
    assert len(golds) > 1500 and 1000 <= most <= MAX_VM_STEPS // 1000


def test_the_wall_clock_backstop_stops_a_query_whose_steps_are_slow(world):
    # A backstop already passed stops the query at the handler's first call, whatever the
    # budget left; it says which limit it was.
    with SqlExecutor(world.db_path, max_vm_steps=10**12, backstop_s=0.0) as executor:
        r = executor.run(CROSS)
        assert not r.ok and r.error.kind == "timeout" and "backstop" in r.error.message
        assert r.steps == 100


def test_executor_settings_are_checked(world):
    for kw in ({"max_vm_steps": 0}, {"max_vm_steps": 1.5}, {"max_rows": -1}):
        with pytest.raises(UserError, match="positive integer"):
            SqlExecutor(world.db_path, **kw)
    for bad in (-1.0, float("nan"), "30"):
        with pytest.raises(UserError, match="seconds"):
            SqlExecutor(world.db_path, backstop_s=bad)


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="needs Python's own Ctrl-C handler (KeyboardInterrupt)")
def test_a_ctrl_c_during_a_query_is_raised_not_reported_as_a_timeout(world):
    """SQLite calls the step-budget check from inside the query; a Ctrl-C raised there used to
    be swallowed, the query reported as timed out, and the command finished with that verdict."""
    with SqlExecutor(world.db_path, max_vm_steps=10**12) as executor:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                executor.run(RECURSIVE)
        finally:
            timer.cancel()
        assert executor.run("SELECT 1").rows == [(1,)]  # usable afterwards


def test_executor_reports_syntax_and_runtime_errors(ex):
    assert ex.run("SELEC name FROM employees").error.kind == "syntax"
    assert ex.run("SELECT name FROM").error.kind == "syntax"
    assert ex.run("SELECT 1; SELECT 2").error.kind == "syntax"
    assert ex.run("SELECT 1\x00").error.kind == "syntax"  # a NUL character in the text
    assert ex.run("SELECT nope FROM employees").error.kind == "runtime"


def test_executor_refuses_text_with_no_statement(ex):
    for sql in ("", "   ", "-- nothing", "/* a comment */", "/* a */ ; -- b\n"):
        r = ex.run(sql)
        assert not r.ok and r.error.kind == "syntax" and "no SQL statement" in r.error.message
    # A statement that returns no result and changes nothing (REINDEX on the read-only
    # database) was called "no SQL statement" too: it is none of the queries allowed.
    for sql in ("REINDEX employees", "REINDEX", "/* x */ REINDEX"):
        r = ex.run(sql)
        assert (r.error.kind, r.error.message) == ("forbidden", "only read-only SELECT queries "
                                                                "are allowed")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3's setlimit is Python 3.11+")
def test_executor_refuses_values_too_long_to_hold(ex):
    # One value built in one step: no handler call can stop it, the length limit does.
    for sql in ("SELECT zeroblob(50000000) FROM employees LIMIT 10",
                "SELECT length(randomblob(400000000))"):
        r = ex.run(sql)
        assert not r.ok and r.error.kind == "runtime" and "too big" in r.error.message, sql
    assert ex.run("SELECT length(zeroblob(1000))").rows == [(1000,)]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3's setlimit is Python 3.11+")
def test_executor_bounds_values_that_take_long_to_build(ex):
    # `replace` over ~1 MB strings takes seconds in one instruction, and once a row: with 1 MB
    # values this query ran a minute past its 1 s limit and returned rows, scored as an answer.
    sql = ("SELECT length(replace(hex(zeroblob(450000 + 0 * id)), "
           "substr(hex(zeroblob(450000)), 1, 200000) || '1', 'x')) FROM employees LIMIT 3")
    r = ex.run(sql)
    assert not r.ok and r.error.kind == "runtime" and "too big" in r.error.message
    assert ex.run("SELECT length(hex(zeroblob(40000)))").rows == [(80000,)]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3's setlimit is Python 3.11+")
def test_executor_bounds_the_bytes_and_columns_of_a_result(ex):
    # 12 values of 99 kB a row, each under the value limit: the 406 rows, 480 MB, were held
    # in memory and returned as an answer.
    wide = ", ".join(["zeroblob(99000)"] * 12)
    r = ex.run(f"SELECT {wide} FROM assignments")
    assert not r.ok and r.error.kind == "runtime" and "than 10000000 bytes" in r.error.message
    r = ex.run("SELECT " + ", ".join(["zeroblob(99000)"] * 101))
    assert not r.ok and r.error.kind == "runtime" and "too many columns" in r.error.message
    assert ex.run("SELECT " + ", ".join(["id"] * 100) + " FROM employees LIMIT 2").ok
    assert ex.run("SELECT * FROM employees, departments, projects, assignments LIMIT 3").ok
    # The limit itself is allowed: 50 rows of 2 x 100,000 bytes, 10,000,000; one more is not.
    rows = ("SELECT zeroblob(100000), zeroblob(100000) FROM (SELECT id FROM employees LIMIT 49) "
            "UNION ALL SELECT zeroblob(100000), zeroblob(100000)")
    assert [len(r[0]) + len(r[1]) for r in ex.run(rows).rows] == [200000] * 50
    r = ex.run(rows + " UNION ALL SELECT zeroblob(1), 'x'")
    assert not r.ok and "than 10000000 bytes" in r.error.message


def test_executor_refuses_temp_objects_files_and_extensions(ex, world, tmp_path):
    db = tmp_path / "company.sqlite"
    db.write_bytes(world.db_path.read_bytes())
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    new = tmp_path / "new.sqlite"
    with SqlExecutor(db) as executor:
        for sql in (f"ATTACH DATABASE '{new}' AS other", f"VACUUM INTO '{new}'",
                    "CREATE TEMP TABLE t (x)", "CREATE TEMP VIEW v AS SELECT 1",
                    "CREATE TEMP TRIGGER g AFTER INSERT ON employees BEGIN SELECT 1; END",
                    "REPLACE INTO departments VALUES (1, 'X', 'Lyon', 1)",
                    f"SELECT load_extension('{tmp_path / 'x.so'}')",
                    "PRAGMA temp_store_directory = '/tmp'", "PRAGMA query_only = 0",
                    "PRAGMA hard_heap_limit = 1", "PRAGMA mmap_size = 1000000"):
            r = executor.run(sql)
            assert not r.ok and r.error.kind == "forbidden", (sql, r.error)
        for sql in (f"SELECT writefile('{new}', 'x')", "SELECT 1; DROP TABLE employees",
                    "SELECT " + "(" * 5000 + "1" + ")" * 5000, "SELECT 1" + " + 1" * 200_000,
                    "SELECT name FROM employees WHERE name LIKE '" + "%a" * 30_000 + "'"):
            r = executor.run(sql)
            assert not r.ok and r.error.kind in ("runtime", "syntax"), (sql[:60], r.error)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["company.sqlite"]


def test_executor_needs_an_existing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        SqlExecutor(tmp_path / "missing.sqlite")


def test_check_correct_even_with_other_column_names_and_row_order(ex):
    assert check("SELECT name AS who FROM employees WHERE city = 'Lyon' ORDER BY name DESC",
                 GOLD_LYON, ex).kind == "correct"
    assert check("SELECT COUNT(id) AS n FROM employees WHERE city = 'Lyon';",
                 "SELECT COUNT(*) FROM employees WHERE city = 'Lyon'", ex).kind == "correct"


def test_check_takes_the_columns_in_any_order_but_rows_as_they_pair(ex):
    top = "SELECT name, salary FROM employees ORDER BY salary DESC LIMIT 3"
    v = check("SELECT salary, name FROM employees ORDER BY salary DESC LIMIT 3", top, ex)
    assert v.correct and "another order" in v.detail
    assert check("SELECT salary, name FROM employees ORDER BY salary LIMIT 3", top,
                 ex).kind == "wrong"
    pairs = "SELECT name, salary FROM employees WHERE city = 'Lyon'"
    assert check("SELECT salary, name FROM employees WHERE city = 'Lyon'", pairs, ex).correct
    # Each column holds the gold's values, in the other order, but names go with other
    # people's salaries: no order of the columns pairs them as the gold does.
    shifted = ("SELECT b.salary, a.name FROM (SELECT name, ROW_NUMBER() OVER (ORDER BY id) AS i "
               "FROM employees WHERE city = 'Lyon') a JOIN (SELECT salary, ROW_NUMBER() OVER "
               "(ORDER BY id) AS i FROM employees WHERE city = 'Lyon') b ON b.i = a.i % "
               "(SELECT COUNT(*) FROM employees WHERE city = 'Lyon') + 1")
    v = check(shifted, pairs, ex)
    assert v.kind == "wrong" and "differ" in v.detail
    # Columns of equal values allow many orders: a bounded number is tried.
    same = ", ".join(["id"] * 8)
    lyon = "FROM employees WHERE city = 'Lyon'"
    assert check(f"SELECT {same} {lyon}", f"SELECT {same} {lyon}", ex).correct
    assert check(f"SELECT {same} {lyon}",
                 f"SELECT {', '.join(['id'] * 7)}, id + 1 {lyon}", ex).kind == "wrong"


def test_check_float_tolerance(ex):
    gold = "SELECT AVG(salary) FROM employees WHERE city = 'Paris'"
    assert check("SELECT SUM(salary) * 1.0 / COUNT(*) FROM employees WHERE city = 'Paris'",
                 gold, ex).kind == "correct"
    assert check("SELECT AVG(salary) + 0.5 FROM employees WHERE city = 'Paris'",
                 gold, ex).kind == "wrong"
    # A truncated or rounded average is another answer, even where it is off by only 6e-7 of
    # itself (Rome's, 59814.035).
    rome = "SELECT AVG(salary) FROM employees WHERE city = 'Rome'"
    assert ex.run(rome).rows[0][0] == pytest.approx(59814.035, abs=1e-3)
    for sql in ("SELECT SUM(salary) / COUNT(*) FROM employees WHERE city = 'Rome'",
                "SELECT ROUND(AVG(salary)) FROM employees WHERE city = 'Rome'"):
        assert check(sql, rome, ex).kind == "wrong", sql
    # Integers compare exactly: 10 off a sum of millions is wrong.
    total = "SELECT SUM(salary) FROM employees"
    assert check("SELECT SUM(salary) + 10 FROM employees", total, ex).kind == "wrong"
    assert check("SELECT TOTAL(salary) FROM employees", total, ex).kind == "correct"  # 1.0 == 1


def test_an_empty_answer_is_an_error_not_a_wrong_one(ex):
    for sql in ("", "-- SELECT name FROM employees"):
        assert check(sql, GOLD_LYON, ex).kind == "error"


def test_check_wrong_results(ex):
    v = check("SELECT name FROM employees WHERE city = 'Paris'", GOLD_LYON, ex)
    assert v.kind == "wrong" and "rows" in v.detail
    assert check("SELECT name, city FROM employees WHERE city = 'Lyon'", GOLD_LYON,
                 ex).kind == "wrong"
    assert check("SELECT * FROM assignments", GOLD_LYON, ex).kind == "wrong"  # truncated


def test_check_ordered_only_when_gold_orders(ex):
    gold = "SELECT name FROM employees ORDER BY salary DESC LIMIT 5"
    assert check("SELECT name FROM employees ORDER BY salary DESC LIMIT 5", gold, ex).correct
    v = check("SELECT name FROM (SELECT name, salary FROM employees ORDER BY salary DESC LIMIT 5) "
              "ORDER BY salary ASC", gold, ex)
    assert v.kind == "wrong" and "row 1" in v.detail
    # ORDER BY inside a subquery of the gold does not make the comparison ordered
    nested = ("SELECT name FROM employees WHERE id IN "
              "(SELECT id FROM employees ORDER BY salary LIMIT 3)")
    assert check("SELECT name FROM employees WHERE id IN "
                 "(SELECT id FROM employees ORDER BY salary LIMIT 3) ORDER BY name DESC",
                 nested, ex).correct


@pytest.mark.parametrize("sql,ordered", [
    ("SELECT a FROM t ORDER BY a", True),
    ("SELECT a FROM t\nORDER\n  BY a", True),                      # any whitespace between
    ("SELECT a FROM t WHERE n <> ')' ORDER BY a", True),            # a bracket in a string
    ("SELECT a FROM t WHERE n = 'it''s (' ORDER BY a", True),       # an escaped quote too
    ("SELECT a FROM (SELECT a FROM t ORDER BY a)", False),
    ("SELECT COUNT(*) FROM t GROUP BY b ORDER BY 1", True),          # after a closed bracket
    ("SELECT a FROM t WHERE b IN (SELECT b FROM u) ORDER BY a", True),
    ("SELECT 'ORDER BY' FROM t", False),                            # words in a string
    ('SELECT "order by" FROM t', False),                            # or in a quoted name
    ("SELECT reorder BYx FROM t", False),
])
def test_top_level_order_by_ignores_strings_and_subqueries(sql, ordered):
    from gptlab.world.checker import has_top_level_order_by
    assert has_top_level_order_by(sql) is ordered


def test_check_errors_syntax_timeout_and_writes(ex):
    assert check("SELEC name FROM employees", GOLD_LYON, ex).kind == "error"
    v = check("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c "
              "WHERE x < 0", GOLD_LYON, ex)
    assert v.kind == "error" and "timeout" in v.detail
    for sql in ("DROP TABLE employees", "INSERT INTO departments VALUES (9, 'X', 'Lyon', 1)"):
        v = check(sql, GOLD_LYON, ex)
        assert v.kind == "error" and "forbidden" in v.detail
    with pytest.raises(UserError, match="gold SQL"):
        check("SELECT 1", "SELECT nope FROM employees", ex)


def test_world_check_uses_gold_by_id(world):
    q = world.test[0]
    assert world.check(q.id, q.sql).correct
    assert world.check(q.id, "SELECT 1").kind == "wrong"
    assert world.check(q.id, "DROP TABLE employees").kind == "error"


def test_exec_verdicts_and_accuracy_count_each_kind(world):
    """What the pipeline's evaluation counts: correct, wrong (runs, other result), error."""
    from gptlab.eval.execution import exec_correct, exec_verdicts
    records = [world.record(q) for q in world.test[:4]]
    gold = [r["completion"] for r in records]
    responses = [gold[0], "SELECT 1", "SELEC name FROM employees", " " + gold[3] + "  "]
    assert exec_verdicts(world, records, responses) == ["correct", "wrong", "error", "correct"]
    assert exec_correct(world, records, responses) == [1, 0, 0, 1]


def test_a_result_of_exactly_the_row_limit_is_whole(ex):
    """50 rows under a limit of 50 is the whole result; only a 51st row makes it truncated."""
    exact = "SELECT * FROM assignments ORDER BY rowid LIMIT 50"
    r = ex.run(exact)
    assert r.ok and len(r.rows) == 50 and not r.truncated
    r = ex.run("SELECT * FROM assignments ORDER BY rowid LIMIT 51")
    assert r.ok and len(r.rows) == 50 and r.truncated
    assert check(exact, exact, ex).correct


def test_a_truncated_answer_is_wrong_even_where_its_first_rows_are_the_gold(ex):
    # The executor keeps the first 50 rows, which are exactly the gold's 50.
    gold = "SELECT * FROM assignments ORDER BY rowid LIMIT 50"
    v = check("SELECT * FROM assignments ORDER BY rowid", gold, ex)
    assert v.kind == "wrong" and v.detail == "returned more rows than the row limit"


def test_extra_rows_after_the_gold_ones_are_wrong(ex):
    # The first three rows are the gold's, in its order; the fourth is one too many.
    gold = "SELECT name FROM employees ORDER BY salary DESC, id LIMIT 3"
    v = check("SELECT name FROM employees ORDER BY salary DESC, id LIMIT 4", gold, ex)
    assert v.kind == "wrong" and v.detail == "4 rows, expected 3"


def test_integers_compare_exactly_even_within_the_float_tolerance(ex):
    # 10^10 and 10^10 + 1 differ by 1e-10 of themselves, inside the relative 1e-9 for floats.
    assert check("SELECT 10000000001", "SELECT 10000000000", ex).kind == "wrong"
    assert check("SELECT 10000000000", "SELECT 10000000000", ex).correct
    from gptlab.world.checker import _values_equal
    assert not _values_equal(10**10 + 1, 10**10)
    assert _values_equal(1e10 + 1, 1e10)  # floats keep the tolerance


def _result(rows, columns=None):
    from gptlab.world.executor import QueryResult
    width = len(rows[0]) if rows else 1
    return QueryResult(columns=columns or [f"c{j}" for j in range(width)], rows=rows)


def test_an_empty_answer_with_the_wrong_number_of_columns_is_wrong():
    from gptlab.world.checker import compare
    v = compare(_result([], ["name", "salary"]), _result([], ["name"]), ordered=False)
    assert v.kind == "wrong" and v.detail == "2 columns, expected 1"
    assert compare(_result([], ["n"]), _result([], ["name"]), ordered=False).correct


def test_numbers_near_zero_are_compared_within_an_absolute_1e_12():
    from gptlab.world.checker import compare
    zero = _result([(0.0,)])
    assert compare(_result([(1e-13,)]), zero, ordered=False).correct
    assert compare(_result([(1e-7,)]), zero, ordered=False).kind == "wrong"
    assert compare(_result([(1e-12,)]), zero, ordered=False).correct  # at the tolerance
    assert compare(_result([(1e-11,)]), zero, ordered=False).kind == "wrong"  # 10 times it


def test_text_that_spells_a_number_is_not_the_number():
    # As in SQLite, where '5' = 5 is false: CAST(x AS TEXT) is another answer.
    from gptlab.world.checker import compare
    for text, number in (("5", 5), ("1.5", 1.5)):
        assert compare(_result([(text,)]), _result([(number,)]), ordered=False).kind == "wrong"
        assert compare(_result([(number,)]), _result([(text,)]), ordered=False).kind == "wrong"


def test_columns_in_another_order_match_with_numbers_within_the_tolerance():
    # Salary 1e-10 of itself off the gold's, its columns swapped: a column "fits" where its
    # values equal the gold column's within the tolerance, not only exactly.
    from gptlab.world.checker import compare
    gold = _result([("Ada", 1.0), ("Bo", 2.0)])
    assert compare(_result([(1.0000000001, "Ada"), (2.0, "Bo")]), gold, ordered=False).correct
    assert compare(_result([(1.0000000001, "Ada"), (2.0, "Bo")]), gold, ordered=True).correct
    assert compare(_result([(1.01, "Ada"), (2.0, "Bo")]), gold, ordered=False).kind == "wrong"


# Near 1 the tolerance is 1e-9, near 100 it is 1e-7: E = 6e-8 and 2E = 1.2e-7 either side of it.
_E, _e = 6e-8, 6e-10


def test_rows_pair_up_where_the_first_pairing_tried_must_be_undone():
    # A1 equals B1 and B2; A2 equals B1 only. A1, sorted first, takes B1; A2 then needs it, and
    # A1 moves to B2 (an augmenting path). Kept as first taken, A2 found none: "wrong".
    # The two columns cannot swap (values near 1 and near 100), so no other order rescues it.
    from gptlab.world.checker import compare
    a1, a2 = (1.0, 100.0), (1.0, 100.0 + 2 * _E)
    b1, b2 = (1.0, 100.0 + _E), (1.0 + _e, 100.0)
    assert compare(_result([a1, a2]), _result([b1, b2]), ordered=False).correct
    assert compare(_result([a2, a1]), _result([b2, b1]), ordered=False).correct


def test_rows_with_copies_pair_up_only_as_far_as_the_copies_go():
    # A1 once and A2 three times against B1 and B2 twice each: A2 equals B1 only, whose two
    # copies cannot take A2's three: wrong. Moving A1 from B1 to B2 frees one copy of B1, not
    # two; a path that moved more than the one copy A1 had made room for all three.
    from gptlab.world.checker import compare
    a1, a2 = (1.0, 100.0), (1.0, 100.0 + 2 * _E)
    b1, b2 = (1.0, 100.0 + _E), (1.0 + _e, 100.0)
    assert compare(_result([a1] + [a2] * 3), _result([b1] * 2 + [b2] * 2),
                   ordered=False).kind == "wrong"
    # Two copies of A2 fit: A1 moves to B2, A2 takes both copies of B1.
    assert compare(_result([a1] + [a2] * 2 + [b2]), _result([b1] * 2 + [b2] * 2),
                   ordered=False).correct


def test_unordered_rows_pair_up_however_close_their_numbers():
    from gptlab.world.checker import compare
    # 1.02 and 1.04 sort apart (the sort key keeps 6 decimals), so the multisets match.
    assert compare(_result([(1.02,), (1.04,)]), _result([(1.04,), (1.02,)]), ordered=False).correct
    assert compare(_result([(1.02, "x"), (1.04, "x")]), _result([(1.04, "x"), (1.02, "x")]),
                   ordered=False).correct


def test_eight_columns_in_any_order_are_matched_nine_are_not_tried():
    from gptlab.world.checker import compare
    for width, kind in ((8, "correct"), (9, "wrong")):
        gold = [tuple(10 * r + j for j in range(width)) for r in range(3)]
        reversed_columns = [row[::-1] for row in gold]
        assert compare(_result(reversed_columns), _result(gold), ordered=False).kind == kind, width


def test_columns_of_equal_values_are_tried_in_their_other_order_too():
    from gptlab.world.checker import compare
    # Gold (a, b, c) with a and b both holding {1, 2}; the answer gives (c, b, a). The first
    # order the values allow, (a <- 1, b <- 2, c <- 0), pairs the rows wrongly; the next is right.
    gold = [(1, 2, "x"), (2, 1, "y")]
    pred = [("x", 2, 1), ("y", 1, 2)]
    v = compare(_result(pred), _result(gold), ordered=False)
    assert v.correct and "another order" in v.detail


def test_one_answer_column_cannot_stand_for_two_gold_columns():
    from gptlab.world.checker import compare
    gold = [(1, 1), (2, 2)]  # SELECT id, id
    assert compare(_result([(1, 5), (2, 6)]), _result(gold), ordered=False).kind == "wrong"


def test_the_authorizer_alone_refuses_writes_other_than_to_the_schema_table():
    # The authorizer is one of three guards: it must refuse an UPDATE of a table by itself,
    # whatever the read-only connection would say; only the schema table's (a PRAGMA read as
    # a table asks for it) passes.
    import sqlite3
    from gptlab.world.executor import _authorize
    update, read = sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_READ
    assert _authorize(update, "employees", "salary", "main", None) == sqlite3.SQLITE_DENY
    assert _authorize(update, "sqlite_master", "sql", "main", None) == sqlite3.SQLITE_OK
    assert _authorize(read, "employees", "salary", "main", None) == sqlite3.SQLITE_OK


def test_unordered_rows_pair_up_by_values_within_the_float_tolerance():
    from gptlab.world.checker import compare
    from gptlab.world.executor import QueryResult
    # Two groups whose averages are equal, computed two ways (1e-12 apart, as AVG and
    # SUM / COUNT differ in the last bits): the rows still pair up by their other column.
    a = 2.5 + 1e-12
    pred = QueryResult(["avg", "city"], [(a, "Lyon"), (2.5, "Rome")])
    gold = QueryResult(["avg", "city"], [(2.5, "Lyon"), (a, "Rome")])
    assert compare(pred, gold, ordered=False).kind == "correct"
    assert compare(pred, QueryResult(["avg", "city"], [(2.5, "Lyon"), (2.6, "Rome")]),
                   ordered=False).kind == "wrong"


# --- properties of the comparison, on random results -----------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Near-equal numbers on purpose: 0.1234565 sits on a 6-decimal rounding boundary.
_FLOATS = st.sampled_from([0.1234565, 0.1234566, 2.5, 1.0, -3.75, 0.0, 1e10])
_VALUE = {"int": st.integers(-3, 3), "float": _FLOATS, "text": st.sampled_from(["a", "b", "c"]),
          "mixed": st.one_of(st.none(), st.integers(0, 2), _FLOATS, st.just("a"))}


@st.composite
def _rows_and_noise(draw):
    kinds = draw(st.lists(st.sampled_from(sorted(_VALUE)), min_size=1, max_size=3))
    rows = draw(st.lists(st.tuples(*(_VALUE[k] for k in kinds)), min_size=1, max_size=7))
    # Each float moved by less than a tenth of the relative tolerance (1e-9); integers exact.
    noisy = [tuple(v * (1 + draw(st.integers(-3, 3)) * 1e-11) if isinstance(v, float) else v
                   for v in row) for row in rows]
    order = draw(st.permutations(range(len(rows))))
    return rows, [noisy[i] for i in order]


@settings(deadline=None, derandomize=True, max_examples=300)
@given(_rows_and_noise())
def test_unordered_rows_equal_within_the_tolerance_match_in_any_order(case):
    from gptlab.world.checker import compare
    gold, pred = case
    assert compare(_result(pred), _result(gold), ordered=False).correct, (pred, gold)
    assert compare(_result(gold), _result(pred), ordered=False).correct, (pred, gold)


@settings(deadline=None, derandomize=True, max_examples=300)
@given(_rows_and_noise(), _rows_and_noise(), st.booleans())
def test_the_verdict_is_symmetric_and_blind_to_row_order_when_unordered(a, b, ordered):
    from gptlab.world.checker import compare
    (x, x_shuffled), (y, _) = a, b
    if len(x[0]) != len(y[0]):
        y = [tuple(row[0] for _ in x[0]) for row in y]
    forward = compare(_result(x), _result(y), ordered).kind
    assert compare(_result(y), _result(x), ordered).kind == forward
    if not ordered:
        # x_shuffled is x reordered, with its floats moved within the tolerance.
        assert compare(_result(x_shuffled), _result(y), ordered).kind == forward


def test_numbers_either_side_of_a_rounding_boundary_still_pair_up():
    """The multiset order rounded numbers to 6 decimals: 0.1234565 - 1e-12 and + 1e-12, equal
    within the tolerance, rounded to 0.123456 and 0.123457 and sorted apart from a third row
    (0.1234566, rounded to 0.123457 too), so equal results were wrong."""
    from gptlab.world.checker import compare
    lo, hi = 0.1234565 - 1e-12, 0.1234565 + 1e-12
    assert round(lo, 6) != round(hi, 6)
    pred = _result([(lo, "z"), (0.1234566, "a")])
    gold = _result([(hi, "z"), (0.1234566, "a")])
    assert compare(pred, gold, ordered=False).correct
    assert compare(gold, pred, ordered=False).correct
    assert compare(pred, _result([(hi, "z"), (0.1234567, "a")]), ordered=False).kind == "wrong"


def test_rows_of_two_near_equal_numbers_pair_up_whichever_sorts_first():
    """Sorted by their exact values, (1, 2) and (1 + 1e-12, 1) pair with (1 + 1e-12, 2) and
    (1, 1) crosswise: the side-by-side rows differ, yet each row has its equal."""
    from gptlab.world.checker import compare
    e = 1.0 + 1e-12
    pred, gold = _result([(1.0, 2.0), (e, 1.0)]), _result([(1.0, 1.0), (e, 2.0)])
    assert compare(pred, gold, ordered=False).correct
    assert compare(pred, gold, ordered=True).kind == "wrong"
    v = compare(pred, _result([(1.0, 1.5), (e, 2.0)]), ordered=False)
    assert v.kind == "wrong" and v.detail.startswith("rows differ")


# Chains of numbers each within 1e-9 of the next but not of the one after: tolerance is not
# transitive, so which row takes which decides whether all rows pair.
_CHAIN = st.sampled_from([1.0, 1.0 + 0.8e-9, 1.0 + 1.6e-9, 2.0, 2.0 + 1.6e-9, 0.1234565])


@settings(deadline=None, derandomize=True, max_examples=300)
@given(st.integers(1, 2), st.data())
def test_unordered_rows_match_exactly_when_some_pairing_of_them_does(width, data):
    import itertools
    from gptlab.world.checker import _difference, _rows_equal
    row = st.tuples(*[st.one_of(_CHAIN, st.sampled_from(["a", "b"]))] * width)
    a = data.draw(st.lists(row, min_size=1, max_size=6))
    b = data.draw(st.lists(row, min_size=len(a), max_size=len(a)))
    pairs = any(all(map(_rows_equal, a, p)) for p in itertools.permutations(b))
    assert (_difference(a, b, ordered=False) is None) == pairs, (a, b)


def test_many_equal_rows_are_paired_as_one_row_with_copies(monkeypatch):
    """1,000 equal rows against 999 of them and another: the pairing counts copies (it was a
    million row comparisons, over a second, for a wrong answer)."""
    from gptlab.world import checker
    compared = []
    equal = checker._rows_equal
    monkeypatch.setattr(checker, "_rows_equal", lambda x, y: compared.append(1) or equal(x, y))
    many = [(1.0, 2.0)] * 1000
    assert checker._difference(many, [(1.0, 2.0)] * 999 + [(1.0, 3.0)], False) is not None
    assert checker._difference(many, [(1.0 + 1e-12, 2.0)] * 500 + [(1.0, 2.0)] * 500,
                               False) is None
    assert len(compared) < 5000


def test_a_grid_of_few_values_a_column_is_paired_by_every_column_at_once(monkeypatch):
    """1,000 distinct rows of 3 float columns of 10 values each, two rows changed: a window on
    one column held 100 rows of `b` for each row of `a` (100,000 row comparisons, about a
    second with the column orders tried); the rows near in every column are one or two."""
    from gptlab.world import checker
    compared = []
    equal = checker._rows_equal
    monkeypatch.setattr(checker, "_rows_equal", lambda x, y: compared.append(1) or equal(x, y))
    grid = [(float(x), float(y), float(z)) for x in range(10) for y in range(10)
            for z in range(10)]
    wrong = list(grid)
    wrong[0], wrong[11] = (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    assert checker._difference(wrong, grid, False) is not None
    near = [(x + 1e-12, y, z) for x, y, z in reversed(grid)]
    assert checker._difference(near, grid, False) is None
    assert len(compared) < 10_000


def test_a_blob_and_the_text_it_prints_as_are_never_paired():
    # b'x' and "b'x'" print alike: sorted as one kind they met the other side's in the wrong
    # order, and equal results were wrong.
    from gptlab.world.checker import _difference
    for blob, text in (((b"x",), ("b'x'",)), ((b"x", 1), ("b'x'", 1))):
        assert _difference([blob, text], [text, blob], ordered=False) is None
        assert _difference([blob, blob], [text, blob], ordered=False) is not None


_ODD = st.sampled_from([None, 0, 1, True, -0.0, 1.0 + 0.8e-9, 1.0, float("inf"), float("-inf"),
                        2**62, float(2**62), "1", b"1", "b'1'"])


@settings(deadline=None, derandomize=True, max_examples=300)
@given(st.integers(1, 2), st.data())
def test_rows_of_odd_values_match_exactly_when_some_pairing_of_them_does(width, data):
    # None beside numbers, bools, infinities, ints past float precision, text and blobs.
    import itertools
    from gptlab.world.checker import _difference, _rows_equal
    row = st.tuples(*[_ODD] * width)
    a = data.draw(st.lists(row, min_size=1, max_size=6))
    b = data.draw(st.lists(row, min_size=len(a), max_size=len(a)))
    pairs = any(all(map(_rows_equal, a, p)) for p in itertools.permutations(b))
    assert (_difference(a, b, ordered=False) is None) == pairs, (a, b)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3's setlimit is Python 3.11+")
def test_executor_refuses_a_printf_wider_than_the_value_limit_before_running_it(ex):
    """SQLite's printf repeats `%c` `precision` times in one step, past the value limit: with
    2**31 - 1 it ran 15 s, out of reach of the budget and the backstop, once per row, and read
    as NULL. Its width and precision are now checked first, whichever way they are given."""
    for sql in ("SELECT printf('%.*c', 2147483647, 'x') FROM employees",
                "SELECT format('%.1000000000c', 'x')", "SELECT printf('%1000000000d', 1)",
                "SELECT printf('%s %*.*f', 'a', 5, 200000, 1.0)",
                "SELECT printf('%.*c', -9223372036854775808, 'x')",
                "SELECT printf('%.' || hex(zeroblob(20)) || '1c', 'x')"):
        r = ex.run(sql)
        assert not r.ok and r.error.kind == "runtime", (sql, r.error)
        assert "longer than 100000 bytes: a printf width or precision" in r.error.message
    # Everything else is SQLite's own printf, as it was: %s's precision is a maximum.
    r = ex.run("SELECT printf('%.*c|%d%%|%5.2f|%-4s|%.*s|%*d|%!.3f|%,d|%q', 3, 'x', 42, "
               "3.14159, 'ab', 1000000000, 'xyz', 3, 7, 1.5, 1234567, 'it''s'), "
               "format('%s', NULL), printf(NULL), length(printf('%.*c', 99999, 'x')), "
               "printf('%.2f', AVG(salary)) = printf('%.2f', SUM(salary) * 1.0 / COUNT(*)) "
               "FROM employees")
    assert r.ok and r.rows == [("xxx|42%| 3.14|ab  |xyz|  7|1.5|1,234,567|it''s", "", None,
                                99999, 1)]


def test_executor_keeps_what_a_query_holds_in_memory_under_a_cap(ex):
    """An ORDER BY, a DISTINCT or a recursive UNION keeps every row it has seen: with 40 to
    90 kB values (each under the value limit) they filled temporary files, 7 GB in /tmp before
    the backstop stopped the ORDER BY after 30 s. They are held in memory now, up to a cap."""
    for sql in ("SELECT COUNT(*) FROM (SELECT hex(randomblob(40000)) AS h "
                "FROM assignments a, assignments b ORDER BY h)",
                "SELECT COUNT(*) FROM (SELECT DISTINCT randomblob(90000) "
                "FROM assignments a, assignments b)",
                "WITH RECURSIVE c(x, y) AS (SELECT 1, randomblob(90000) UNION "
                "SELECT x + 1, randomblob(90000) FROM c) SELECT COUNT(*) FROM c"):
        r = ex.run(sql)
        assert not r.ok and r.error.kind == "runtime", (sql, r.error)
        assert r.error.message == "the query needs more than 256 MB of memory"
        # Stopped well before the step budget, by what it held.
        assert r.steps < ex.max_vm_steps // 10
        assert ex.run("SELECT COUNT(*) FROM employees").rows == [(200,)]
    # Sorting what fits is an answer as before.
    r = ex.run("SELECT COUNT(*) FROM (SELECT DISTINCT name, hex(randomblob(1000)) AS h "
               "FROM employees ORDER BY h)")
    assert r.ok and r.rows == [(200,)], r.error


HEAP_LIMITS = ("hard_heap_limit", "soft_heap_limit")


def limits() -> list[int]:
    """SQLite's hard and soft heap limits (one each for the whole process), read by PRAGMA."""
    import sqlite3
    conn = sqlite3.connect(":memory:")
    return [conn.execute(f"PRAGMA {p}").fetchone()[0] for p in HEAP_LIMITS]


BIG_BLOB = "SELECT length(CAST(zeroblob(48000000) || x'01' AS BLOB))"  # 48 MB held at once


def test_the_heap_limit_holds_only_while_the_executor_runs_a_query(world, monkeypatch):
    """SQLite's heap limit is one for the whole process, and making an executor lowered it for
    good: a program's own SQLite databases, beside the world's, could never again hold more
    than the executor's cap. It is set while a query runs and put back as it was."""
    import sqlite3

    from gptlab.world import executor as executor_module
    monkeypatch.setattr(executor_module, "MAX_HEAP_BYTES", 32 * 2**20)
    mine = sqlite3.connect(":memory:")
    before = [mine.execute(f"PRAGMA {p}").fetchone()[0] for p in HEAP_LIMITS]
    assert mine.execute(BIG_BLOB).fetchone() == (48_000_001,)
    with SqlExecutor(world.db_path) as executor:
        r = executor.run("SELECT COUNT(*) FROM (SELECT DISTINCT randomblob(90000) "
                         "FROM assignments a, assignments b)")
        assert not r.ok and r.error.message == "the query needs more than 32 MB of memory"
        # Between the executor's queries and after them, another connection is unaffected.
        assert [mine.execute(f"PRAGMA {p}").fetchone()[0] for p in HEAP_LIMITS] == before
        assert mine.execute(BIG_BLOB).fetchone() == (48_000_001,)
        assert executor.run("SELECT COUNT(*) FROM employees").rows == [(200,)]
    assert [sqlite3.connect(":memory:").execute(f"PRAGMA {p}").fetchone()[0]
            for p in HEAP_LIMITS] == before
    assert mine.execute(BIG_BLOB).fetchone() == (48_000_001,)


def test_overlapping_queries_share_the_heap_limit_and_a_lower_one_is_kept():
    """Two executors' queries in two threads overlap: the limit is put back only when the last
    one ends. A lower limit the program has set is kept while they run, and after."""
    from gptlab.world.executor import _HEAP_LIMIT
    if not _HEAP_LIMIT.scoped:
        pytest.skip("ctypes cannot reach this SQLite's sqlite3_hard_heap_limit64")

    before = limits()
    with _HEAP_LIMIT.held() as one:
        set_at = limits()
        with _HEAP_LIMIT.held() as two:
            assert one == two == 256 * 2**20 and limits() == set_at
        assert limits() == set_at  # the first query still runs
    # 256 MB above what SQLite's heap held as the first query began.
    assert set_at[0] == set_at[1] and 0 < set_at[0] - one < 64 * 2**20
    assert limits() == before
    try:
        _HEAP_LIMIT._hard(100 * 2**20)
        _HEAP_LIMIT._soft(50 * 2**20)
        with _HEAP_LIMIT.held() as room:
            assert limits() == [100 * 2**20, 50 * 2**20]
            assert 100 * 2**20 - 64 * 2**20 < room < 100 * 2**20
        assert limits() == [100 * 2**20, 50 * 2**20]
    finally:
        _HEAP_LIMIT._hard(before[0])
        _HEAP_LIMIT._soft(before[1])
    assert limits() == before


def test_memory_a_program_holds_in_its_own_sqlite_databases_leaves_the_query_its_cap(
        world, monkeypatch):
    """The cap counted all of SQLite's heap in the process: a program holding more than it in
    its own databases made every query of every executor fail as out of memory. It is on top
    of what the heap holds when the query begins now, and still stops a query past it."""
    import sqlite3

    from gptlab.world import executor as executor_module
    if not executor_module._HEAP_LIMIT.scoped:
        pytest.skip("ctypes cannot reach this SQLite's sqlite3_hard_heap_limit64")
    monkeypatch.setattr(executor_module, "MAX_HEAP_BYTES", 8 * 2**20)
    mine = sqlite3.connect(":memory:")  # its pages live in SQLite's heap: 24 MB held
    mine.executescript("CREATE TABLE t(b); WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
                       "SELECT x + 1 FROM c WHERE x < 24) INSERT INTO t SELECT "
                       "randomblob(1000000) FROM c;")
    try:
        with SqlExecutor(world.db_path) as executor:
            r = executor.run("SELECT COUNT(*) FROM employees")
            assert r.ok and r.rows == [(200,)], r.error
            r = executor.run("SELECT COUNT(*) FROM (SELECT DISTINCT randomblob(90000) "
                             "FROM assignments a, assignments b)")
            assert not r.ok and r.error.message == "the query needs more than 8 MB of memory"
        assert mine.execute("SELECT COUNT(*), SUM(length(b)) FROM t").fetchone() == \
            (24, 24_000_000)
    finally:
        mine.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_process_forked_while_another_thread_runs_a_query_has_the_limit_put_back():
    """A fork copies the heap limit a query of another thread set, its count of running
    queries and its lock, but not the thread: the child's limit stayed lowered for good (no
    query of its own ever put it back) and, forked while that thread held the lock, its first
    query waited forever. The child starts as if no query ran."""
    from gptlab.world.executor import _HEAP_LIMIT
    if not _HEAP_LIMIT.scoped:
        pytest.skip("ctypes cannot reach this SQLite's sqlite3_hard_heap_limit64")

    before = limits()
    inside, done = threading.Event(), threading.Event()

    def query() -> None:  # a query that runs, caught at the moment it takes the lock
        with _HEAP_LIMIT.held(), _HEAP_LIMIT._lock:
            inside.set()
            done.wait(30)
    t = threading.Thread(target=query)
    t.start()
    try:
        assert inside.wait(30) and limits() != before
        pid = os.fork()
        if pid == 0:  # the child: report by exit code, never return into pytest
            code = 3
            try:
                signal.alarm(20)  # a lock left held would wait forever
                code = 1
                if limits() == before:
                    code = 2
                    with _HEAP_LIMIT.held():
                        lowered = limits() != before
                    code = 0 if lowered and limits() == before else 2
            finally:
                os._exit(code)
    finally:
        done.set()
        t.join()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert limits() == before


def test_a_verdicts_row_count_agrees_in_number(ex):
    # `world check` printed "correct: 1 rows match" and "wrong: 1 rows, expected 2".
    one = "SELECT COUNT(*) FROM employees"
    assert check(one, one, ex).detail == "1 row matches"
    two = "SELECT name FROM employees ORDER BY id LIMIT 2"
    assert check(two, two, ex).detail == "2 rows match"
    assert check("SELECT name FROM employees ORDER BY id LIMIT 1", two, ex).detail == \
        "1 row, expected 2"
    swapped = "SELECT id, name FROM employees ORDER BY id LIMIT 1"
    assert check(swapped, "SELECT name, id FROM employees ORDER BY id LIMIT 1", ex).detail == \
        "1 row matches, columns in another order"


def _heap_limits() -> list[int]:
    import sqlite3
    conn = sqlite3.connect(":memory:")
    return [conn.execute(f"PRAGMA {p}").fetchone()[0] for p in HEAP_LIMITS]


def test_a_soft_limit_alone_is_put_back_after_a_query_after_a_fork_and_after_the_probe():
    """A program's soft heap limit without a hard one (3 GiB: past what 32 bits hold) is
    back after a query, in a child as after a fork, and after the probe for SQLite's functions:
    setting the hard limit to none (0) takes the soft one to none too, so the hard one is put
    back first, then the soft one."""
    from gptlab.world import executor as executor_module
    limit = executor_module._HEAP_LIMIT
    if not limit.scoped:
        pytest.skip("ctypes cannot reach this SQLite's sqlite3_hard_heap_limit64")
    before = _heap_limits()
    soft = 3 * 2**30
    try:
        limit._hard(0)
        limit._soft(soft)
        assert _heap_limits() == [0, soft]
        with limit.held() as room:
            hard = _heap_limits()[0]
            assert _heap_limits() == [hard, hard] and 0 < hard - room < 64 * 2**20
        assert _heap_limits() == [0, soft]
        child = executor_module._HeapLimit()  # a fresh one: its count is then left at -1
        with child.held():
            child._after_fork()  # as in a child forked while this query ran
            assert _heap_limits() == [0, soft] and child._queries == 0
        assert _heap_limits() == [0, soft]
        assert executor_module._heap_limit_functions()[0] is not None
        assert _heap_limits() == [0, soft]
    finally:
        limit._hard(before[0])
        limit._soft(before[1])


def test_where_the_heap_limit_cannot_be_scoped_a_query_has_the_whole_cap():
    from gptlab.world import executor as executor_module
    unscoped = executor_module._HeapLimit()
    unscoped.scoped = False
    before = _heap_limits()
    with unscoped.held() as room:
        assert room == executor_module.MAX_HEAP_BYTES == 256 * 2**20
        assert _heap_limits() == before  # nothing set: each executor's PRAGMA lowers it


def test_heap_functions_of_a_library_the_sqlite3_module_does_not_use_are_not_taken(
        monkeypatch):
    """A SQLite library ctypes finds that is not the one the sqlite3 module runs on (its limit
    is not what the module's PRAGMA reads): setting its limit would hold nothing."""
    import ctypes

    from gptlab.world import executor as executor_module

    class OtherSqlite:
        def __init__(self, name):
            self.limits = [0, 0]
            self.sqlite3_hard_heap_limit64 = self._setter(0)
            self.sqlite3_soft_heap_limit64 = self._setter(1)
            self.sqlite3_memory_used = lambda: 0

        def _setter(self, i):
            def f(n):
                old = self.limits[i]
                if n >= 0:
                    self.limits[i] = n
                return old
            return f
    monkeypatch.setattr(ctypes, "CDLL", OtherSqlite)
    before = _heap_limits()
    assert executor_module._heap_limit_functions() == (None, None, None)
    assert _heap_limits() == before
