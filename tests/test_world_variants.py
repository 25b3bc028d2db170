"""The test suite's variant databases: what they keep, what they change, and the wrong queries
that pass on the company but not on them."""
import re

import pytest

from gptlab.world import build_world
from gptlab.world.questions import slot_domains
from gptlab.world.variants import VariantDatabases, variant_company


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "company.sqlite"
    return build_world(0, n_train=100, n_validation=20, n_test=300, n_dialogs=5,
                       corpus_chars=1000, db_path=path)


def test_a_variant_keeps_ids_and_names_and_redraws_the_rest(world):
    company = world.company
    v = variant_company(company, 3)
    assert v == variant_company(company, 3) and v != variant_company(company, 4)
    for table, key in (("dept", (0, 1)), ("emp", (0, 1)), ("proj", (0, 1))):
        assert ([tuple(r[i] for i in key) for r in v.rows[table]]
                == [tuple(r[i] for i in key) for r in company.rows[table]])
    emp, dept, proj = v.rows["emp"], v.rows["dept"], v.rows["proj"]
    moved = sum(a[2] != b[2] for a, b in zip(emp, company.rows["emp"]))
    assert moved > len(emp) / 2  # most people are in another department
    # Unique salaries and project budgets: ORDER BY ... LIMIT keeps one answer.
    assert len({r[4] for r in emp}) == len(emp) and len({r[3] for r in proj}) == len(proj)
    ids = {r[0] for r in dept}
    assert all(r[2] in ids for r in emp) and all(r[2] in ids for r in proj)
    emp_ids, proj_ids = {r[0] for r in emp}, {r[0] for r in proj}
    assert all(a[0] in emp_ids and a[1] in proj_ids for a in v.rows["asg"])


def test_variants_hold_values_at_and_beside_the_questions_thresholds(world):
    domains = slot_domains(world.company)
    amounts = {d["amount"] for d in domains["amount"]}
    budgets = {d["budget"] for d in domains["budget"]}
    for k in range(4):
        v = variant_company(world.company, k)
        salaries = {r[4] for r in v.rows["emp"]}
        assert len(salaries & amounts) >= 5  # `>=` and `>` differ on these
        assert salaries & {a + 1 for a in amounts} and salaries & {a - 1 for a in amounts}
        spent = {r[3] for r in v.rows["proj"]}
        assert spent & budgets and len(spent & {b + d for b in budgets for d in (-1, 0, 1)}) >= 8


def test_a_wrong_query_that_returns_the_gold_rows_on_the_company_fails_the_suite(world):
    q = next(q for q in world.test if q.intent == "department_of_employee")
    name = q.values["employee"]
    # A colleague in the same department gives the same rows on the company.
    dept = next(r[2] for r in world.company.rows["emp"] if r[1] == name)
    colleague = next(r[1] for r in world.company.rows["emp"] if r[2] == dept and r[1] != name)
    wrong = q.sql.replace(f"'{name}'", f"'{colleague}'")
    assert world.check(q.id, wrong).correct
    assert not world.correct_on_test_suite(q.id, wrong)
    assert world.correct_on_test_suite(q.id, q.sql)


@pytest.mark.parametrize("intent, rewrite", [
    # Equivalent queries are right on every variant too.
    ("count_employees_city", lambda s: s.replace("COUNT(*)", "COUNT(id)")),
    ("employees_salary_above", lambda s: re.sub(r"salary > (\d+)", r"NOT salary <= \1", s)),
    ("top_paid_employees_city", lambda s: s.replace("SELECT name, salary", "SELECT salary, name")),
    ("department_of_employee", lambda s: (
        "SELECT name FROM departments WHERE id = (SELECT dept_id FROM employees WHERE name = "
        + s.split("T1.name = ")[1] + ")")),
])
def test_equivalent_queries_pass_the_suite(world, intent, rewrite):
    q = next(q for q in world.test if q.intent == intent)
    other = rewrite(q.sql)
    assert other != q.sql
    assert world.correct_on_test_suite(q.id, other)


EMPTY_SAFE_REWRITES = {
    # Equivalent on every informative result, apart where a result is empty, NULL or 0.
    "count_employees_city": lambda s: s + " GROUP BY city",
    "average_salary_city": lambda s: s + " GROUP BY city",
    "count_employees_department_city": lambda s: s + " GROUP BY T1.city",
    "total_project_budget_department": lambda s: s.replace(
        "SUM(T1.budget)", "COALESCE(SUM(T1.budget), 0)"),
}


def test_a_variant_where_the_gold_result_is_empty_null_or_0_does_not_count(world):
    # The world asks no question whose answer is empty, a lone NULL or a lone 0; a variant can
    # make it one (a city left without staff), where equivalent queries part ways.
    from gptlab.world.questions import informative
    questions = [q for q in world.test if q.intent in EMPTY_SAFE_REWRITES]
    suite = VariantDatabases(world.company, world.schema)
    uninformative = [q for q in questions
                     if any(not informative(ex.run(q.sql).rows) for ex in suite.executors)]
    assert len(uninformative) >= 3  # the case is there to be judged
    for q in questions:
        other = EMPTY_SAFE_REWRITES[q.intent](q.sql)
        assert other != q.sql and world.check(q.id, other).correct
        assert world.correct_on_test_suite(q.id, other), (q.id, other)


def wrong_neighbours(sql, domains):
    """Queries a careless writer would produce: another value of the same kind in place of a
    quoted one, `>=` for `>` (`<=` for `<`)."""
    out = set()
    for m in re.finditer(r"'((?:[^']|'')*)'", sql):
        for kind in ("city", "department", "employee", "project", "role"):
            values = [d[kind] for d in domains[kind]]
            if m.group(1) in values:
                out |= {sql[:m.start()] + "'" + v.replace("'", "''") + "'" + sql[m.end():]
                        for v in values if v != m.group(1)}
    for m in re.finditer(r"([<>]) (\d+)", sql):
        out.add(sql[:m.start()] + m.group(1) + "= " + m.group(2) + sql[m.end():])
    return out


def test_the_suite_tells_apart_most_wrong_queries_the_company_cannot(world):
    domains = slot_domains(world.company)
    passed = caught = 0
    for q in world.test[:150]:
        for wrong in wrong_neighbours(q.sql, domains):
            if world.check(q.id, wrong).correct:  # a wrong query the company cannot tell
                passed += 1
                caught += not world.correct_on_test_suite(q.id, wrong)
    assert passed > 100
    assert caught / passed >= 0.95, (caught, passed)


def _top_paid(world):
    return next(q for q in world.test if q.intent == "top_paid_employees")


def test_an_ordered_answer_in_another_order_is_wrong_on_the_variants(world):
    q = _top_paid(world)  # ... ORDER BY salary DESC LIMIT n: the same rows, reversed
    reversed_ = f"SELECT name FROM ({q.sql.replace('SELECT name', 'SELECT name, salary')}) " \
                "AS g ORDER BY salary ASC"
    world.correct_on_test_suite(q.id, q.sql)  # opens the variants
    assert not world._variants.agrees(reversed_, q.sql)
    assert world._variants.agrees(q.sql, q.sql)


def test_an_answer_wrong_on_the_company_is_wrong_on_the_test_suite(world):
    q = _top_paid(world)
    top = max(r[4] for r in world.company.rows["emp"])
    # Leaves out the company's top earner only: right on the variants, wrong on the company.
    wrong = q.sql.replace("FROM employees", f"FROM employees WHERE salary <> {top}")
    assert not world.check(q.id, wrong).correct
    world.correct_on_test_suite(q.id, q.sql)
    assert world._variants.agrees(wrong, q.sql)
    assert not world.correct_on_test_suite(q.id, wrong)


def test_a_verdict_is_kept_and_a_timeout_is_not(world):
    q = _top_paid(world)
    suite = VariantDatabases(world.company, world.schema)
    runs = []
    for ex in suite.executors:
        ex.run = (lambda run: lambda sql: runs.append(sql) or run(sql))(ex.run)
    wrong = f"SELECT name FROM ({q.sql.replace('SELECT name', 'SELECT name, salary')}) " \
            "AS g ORDER BY salary ASC"
    assert suite.agrees(q.sql, q.sql) and not suite.agrees(wrong, q.sql)
    first = len(runs)
    assert first > len(suite.executors)  # the gold's and the answers' runs
    # Asked again (another model's same answer): the same verdicts, no query run.
    assert suite.agrees(q.sql, q.sql) and not suite.agrees(wrong, q.sql)
    assert len(runs) == first
    # A verdict a timeout decided is not kept: with the budget back, the answer runs again.
    same = q.sql + " "
    budgets = [ex.max_vm_steps for ex in suite.executors]
    for ex in suite.executors:
        ex.max_vm_steps = 1
    assert not suite.agrees(same, q.sql)
    for ex, b in zip(suite.executors, budgets):
        ex.max_vm_steps = b
    before = len(runs)
    assert suite.agrees(same, q.sql) and len(runs) == before + len(suite.executors)


def test_a_verdict_an_interrupted_query_decided_is_not_kept(world):
    from gptlab.world.executor import ExecError, QueryResult
    q = _top_paid(world)
    suite = VariantDatabases(world.company, world.schema, variants=2)
    ex = suite.executors[0]
    real = ex.run
    ex.run = lambda sql: (QueryResult(error=ExecError("interrupted", "Ctrl-C"))
                          if sql != q.sql else real(sql))
    same = q.sql + " "
    assert not suite.agrees(same, q.sql)
    ex.run = real  # the query runs again, not the interrupted verdict
    assert suite.agrees(same, q.sql)


def test_every_project_of_a_variant_may_be_assigned(world):
    """Each employee works on 1-3 of all the projects, the last one included."""
    company = world.company
    proj_ids = {r[0] for r in company.rows["proj"]}
    for k in range(3):
        assert {a[1] for a in variant_company(company, k).rows["asg"]} == proj_ids


def test_the_gold_query_not_the_answer_decides_whether_row_order_counts(world):
    # The same rows as the gold's ORDER BY salary DESC LIMIT n, in the order of their ids: wrong
    # on the company and on the variants, since the gold orders. Judged by the answer's SQL,
    # which has no top-level ORDER BY, both called it right.
    q = _top_paid(world)
    unordered = ("SELECT name FROM employees WHERE id IN (SELECT id FROM ("
                 + q.sql.replace("SELECT name", "SELECT id, name") + "))")
    company = world.executor()
    assert sorted(company.run(unordered).rows) == sorted(company.run(q.sql).rows)
    assert company.run(unordered).rows != company.run(q.sql).rows
    assert world.check(q.id, unordered).kind == "wrong"
    world.correct_on_test_suite(q.id, q.sql)  # opens the variants
    assert not world._variants.agrees(unordered, q.sql)
