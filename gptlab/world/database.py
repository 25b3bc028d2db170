"""The sample company: departments, employees, projects and assignments, generated from a seed
and written to SQLite under a (possibly varied) schema."""
from __future__ import annotations

import hashlib
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from gptlab.io import atomic_path
from gptlab.world.schema import LOGICAL_COLUMNS, Schema

CITIES = ("Lyon", "Paris", "Berlin", "Madrid", "London", "Rome", "Amsterdam", "Lisbon",
          "Vienna", "Brussels")
DEPARTMENTS = ("Sales", "Engineering", "Marketing", "Finance", "Research", "Support", "Legal",
               "Operations", "Design", "Logistics")
FIRST_NAMES = ("Alice", "Bruno", "Chloe", "David", "Emma", "Felix", "Grace", "Hugo", "Ines",
               "Jonas", "Karen", "Louis", "Maria", "Nadia", "Oscar", "Paula", "Quentin", "Rosa",
               "Samir", "Tara", "Ugo", "Vera", "Walter", "Xenia", "Yann", "Zoe", "Anna", "Boris",
               "Clara", "Diego", "Elena", "Franz", "Gina", "Henri", "Irene", "Jan", "Lena",
               "Marco", "Nina", "Pablo")
LAST_NAMES = ("Martin", "Bernard", "Dubois", "Schmidt", "Muller", "Garcia", "Rossi", "Smith",
              "Jansen", "Silva", "Weber", "Lopez", "Moreau", "Fischer", "Bianchi", "Brown",
              "Novak", "Costa", "Laurent", "Wagner", "Ferrari", "Taylor", "Peeters", "Santos",
              "Klein", "Romano", "Fournier", "Becker", "Meyer", "Russo")
PROJECT_NAMES = ("Atlas", "Apollo", "Orion", "Phoenix", "Nova", "Titan", "Zephyr", "Aurora",
                 "Comet", "Falcon", "Helix", "Kepler", "Lumen", "Magellan", "Nimbus", "Onyx",
                 "Pulsar", "Quasar", "Raven", "Sierra", "Tundra", "Vega", "Willow", "Xenon",
                 "Zenith", "Cobalt", "Ember", "Granite", "Harbor", "Indigo", "Juniper", "Lotus")
ROLES = ("lead", "developer", "analyst", "tester", "designer")
# Salary level per department, so that departments differ and HAVING AVG(...) is informative.
_SALARY_BASE = {"Engineering": 72000, "Research": 70000, "Legal": 68000, "Finance": 64000,
                "Design": 58000, "Marketing": 56000, "Sales": 54000, "Operations": 50000,
                "Logistics": 46000, "Support": 44000}
HIRE_YEARS = (2005, 2023)


@dataclass(frozen=True)
class Company:
    """Rows per logical table, as tuples in `LOGICAL_COLUMNS` order."""
    rows: dict[str, list[tuple]]

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(sorted(self.rows.items())).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CompanySize:
    departments: int = 8
    employees: int = 200
    projects: int = 30


def generate_company(seed: int, size: CompanySize = CompanySize()) -> Company:
    """A few hundred rows. Salaries and budgets are unique so ORDER BY ... LIMIT has one answer."""
    rng = random.Random(f"company-{seed}")
    dept_names = rng.sample(DEPARTMENTS, size.departments)
    dept_cities = [rng.choice(CITIES[:6]) for _ in dept_names]  # offices cluster in big cities
    budgets = rng.sample(range(400_000, 3_000_001, 10_000), size.departments)
    depts = [(i + 1, n, c, b) for i, (n, c, b) in enumerate(zip(dept_names, dept_cities, budgets))]

    names = rng.sample([f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES], size.employees)
    used_salaries: set[int] = set()
    emps = []
    for i, name in enumerate(names):
        d = rng.randrange(size.departments)
        city = dept_cities[d] if rng.random() < 0.6 else rng.choice(CITIES)
        salary = _unique_salary(rng, _SALARY_BASE[dept_names[d]], used_salaries)
        emps.append((i + 1, name, d + 1, city, salary, rng.randint(*HIRE_YEARS)))

    proj_names = rng.sample(PROJECT_NAMES, size.projects)
    proj_budgets = rng.sample(range(50_000, 1_000_001, 5_000), size.projects)
    projs = [(i + 1, n, rng.randrange(size.departments) + 1, b)
             for i, (n, b) in enumerate(zip(proj_names, proj_budgets))]

    asgs = []
    for emp_id, *_ in emps:
        for proj_id in sorted(rng.sample(range(1, size.projects + 1), rng.randint(1, 3))):
            asgs.append((emp_id, proj_id, rng.choice(ROLES), rng.choice(range(4, 41, 2))))
    return Company(rows={"dept": depts, "emp": emps, "proj": projs, "asg": asgs})


def _unique_salary(rng: random.Random, base: int, used: set[int]) -> int:
    while True:
        salary = int(round(rng.gauss(base, 14000) / 100) * 100)
        salary = min(max(salary, 28000), 140000)
        if salary not in used:
            used.add(salary)
            return salary


def create_tables(conn: sqlite3.Connection, company: Company, schema: Schema) -> None:
    """Create the four tables under `schema`'s names and insert the rows."""
    for t, cols in LOGICAL_COLUMNS.items():
        defs = []
        for c in cols:
            kind = "TEXT" if c in ("name", "city", "role") else "INTEGER"
            defs.append(schema.column(t, c) + " " + kind + (" PRIMARY KEY" if c == "id" else ""))
        conn.execute(f"CREATE TABLE {schema.table(t)} ({', '.join(defs)})")
        marks = ", ".join("?" * len(cols))
        conn.executemany(f"INSERT INTO {schema.table(t)} VALUES ({marks})", company.rows[t])
    conn.commit()


def contents_digest(conn: sqlite3.Connection) -> str:
    """A hash of every table's name, columns and rows (in any order): two databases with the
    same digest answer every query alike."""
    h = hashlib.sha256()
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    for t in tables:
        cur = conn.execute(f'SELECT * FROM "{t}"')
        h.update(repr((t, [d[0] for d in cur.description], sorted(map(repr, cur)))).encode())
    return h.hexdigest()[:16]


def memory_database(company: Company, schema: Schema) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    create_tables(conn, company, schema)
    return conn


def write_database(company: Company, schema: Schema, path: str | Path) -> Path:
    """Write the database file atomically (a reader never sees a half-written file)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.unlink()  # sqlite wants to create the file itself
        conn = sqlite3.connect(tmp)
        try:
            create_tables(conn, company, schema)
        finally:
            conn.close()
    return path
