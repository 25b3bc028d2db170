"""The company schema: four logical tables whose physical names can vary.

Everything else in the world (questions, dialogs, corpus) is written once against logical names
(`{emp}`, `{emp.salary}`) and rendered through a `Schema`, so a varied schema renames the
identifiers in every gold query at once while the English stays the same.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

# Logical tables and their columns, in display order. `*_id` foreign keys follow the name of
# the table they point to, so they are derived rather than listed as synonyms.
LOGICAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "dept": ("id", "name", "city", "budget"),
    "emp": ("id", "name", "dept_id", "city", "salary", "hire_year"),
    "proj": ("id", "name", "dept_id", "budget"),
    "asg": ("employee_id", "project_id", "role", "hours"),
}

# (table name, name of a foreign key pointing at it); the first entry is the default schema.
TABLE_SYNONYMS: dict[str, tuple[tuple[str, str], ...]] = {
    "dept": (("departments", "dept_id"), ("divisions", "division_id"), ("teams", "team_id"),
             ("units", "unit_id")),
    "emp": (("employees", "employee_id"), ("staff", "staff_id"), ("workers", "worker_id"),
            ("personnel", "person_id")),
    "proj": (("projects", "project_id"), ("initiatives", "initiative_id"),
             ("programs", "program_id"), ("ventures", "venture_id")),
    "asg": (("assignments", ""), ("allocations", ""), ("engagements", ""),
            ("memberships", "")),
}

COLUMN_SYNONYMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("dept", "name"): ("name", "title", "label"),
    ("dept", "city"): ("city", "location", "site"),
    ("dept", "budget"): ("budget", "funding", "annual_budget"),
    ("emp", "name"): ("name", "full_name", "employee_name"),
    ("emp", "city"): ("city", "location", "office"),
    ("emp", "salary"): ("salary", "pay", "annual_salary", "wage"),
    ("emp", "hire_year"): ("hire_year", "joined_year", "start_year", "year_hired"),
    ("proj", "name"): ("name", "title", "code_name"),
    ("proj", "budget"): ("budget", "funding", "cost"),
    ("asg", "role"): ("role", "position", "duty"),
    ("asg", "hours"): ("hours", "weekly_hours", "hours_per_week"),
}

# Which logical table each foreign-key column refers to.
FOREIGN_KEYS: dict[tuple[str, str], str] = {
    ("emp", "dept_id"): "dept", ("proj", "dept_id"): "dept",
    ("asg", "employee_id"): "emp", ("asg", "project_id"): "proj",
}

_PLACEHOLDER = re.compile(r"\{(\w+)(?:\.(\w+))?\}")


@dataclass(frozen=True)
class Schema:
    """Physical names for the logical tables (`tables['emp'] == 'employees'`) and columns."""
    tables: dict[str, str]
    columns: dict[str, dict[str, str]] = field(default_factory=dict)

    def table(self, key: str) -> str:
        """The physical name of table `key` (`emp` -> `employees`)."""
        return self.tables[key]

    def column(self, table_key: str, logical: str) -> str:
        """The physical name of column `logical` of table `table_key`."""
        return self.columns[table_key][logical]

    def lines(self) -> list[str]:
        """One line per table: `employees(id, name, dept_id, city, salary, hire_year)`."""
        return [f"{self.tables[t]}({', '.join(self.columns[t][c] for c in cols)})"
                for t, cols in LOGICAL_COLUMNS.items()]

    def render(self) -> str:
        """The schema as the prompt shows it, one line per table."""
        return "\n".join(self.lines())

    def fill(self, template: str, values: dict | None = None) -> str:
        """Replace `{emp}` / `{emp.salary}` by physical names and `{slot}` by an SQL literal."""
        values = values or {}

        def sub(m: re.Match) -> str:
            head, col = m.group(1), m.group(2)
            if head in self.tables:
                return self.column(head, col) if col else self.tables[head]
            return sql_literal(values[head])

        return _PLACEHOLDER.sub(sub, template)

    def to_json(self) -> dict:
        """The physical table and column names, as world.json holds them."""
        return {"tables": dict(self.tables),
                "columns": {k: dict(v) for k, v in self.columns.items()}}


def sql_literal(value: object) -> str:
    """A value as canonical SQL: strings single-quoted (quotes doubled), numbers as written."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def make_schema(vary: bool = False, seed: int = 0) -> Schema:
    """The default schema, or (vary=True) one whose names are drawn from the synonym lists."""
    rng = random.Random(f"schema-{seed}")
    pick = (lambda options: rng.choice(options)) if vary else (lambda options: options[0])
    chosen = {t: pick(TABLE_SYNONYMS[t]) for t in LOGICAL_COLUMNS}
    tables = {t: name for t, (name, _) in chosen.items()}
    columns: dict[str, dict[str, str]] = {}
    for t, cols in LOGICAL_COLUMNS.items():
        columns[t] = {}
        for c in cols:
            if (t, c) in FOREIGN_KEYS:
                columns[t][c] = chosen[FOREIGN_KEYS[(t, c)]][1]
            elif (t, c) in COLUMN_SYNONYMS:
                columns[t][c] = pick(COLUMN_SYNONYMS[(t, c)])
            else:
                columns[t][c] = c
    return Schema(tables=tables, columns=columns)
