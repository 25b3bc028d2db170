"""What can be asked of the company database: intents, each a gold SQL template with slots and
several English phrasings.

The last phrasing of every intent is *reserved*: it only ever appears in the test split (marked
`unseen_phrasing`), never in training, validation, dialogs or the pretraining corpus, so the
test can tell memorised wording from understanding.

SQL templates name tables and columns logically (`{emp.salary}`, see schema.py) and values by
slot (`{city}`); joins alias tables T1, T2, T3 so the canonical form is the same for any schema.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Intent:
    name: str
    kind: str  # selection / filter / count / aggregate / group / order / join / nested
    sql: str
    phrasings: tuple[str, ...]  # the last one is reserved for the test split
    slots: tuple[str, ...]  # value domains, see questions.slot_domains

    @property
    def seen_phrasings(self) -> tuple[str, ...]:
        return self.phrasings[:-1]

    @property
    def reserved_phrasing(self) -> str:
        return self.phrasings[-1]


_EMP_DEPT = "{emp} AS T1 JOIN {dept} AS T2 ON T1.{emp.dept_id} = T2.{dept.id}"
_PROJ_DEPT = "{proj} AS T1 JOIN {dept} AS T2 ON T1.{proj.dept_id} = T2.{dept.id}"
_EMP_ASG_PROJ = ("{emp} AS T1 JOIN {asg} AS T2 ON T1.{emp.id} = T2.{asg.employee_id} "
                 "JOIN {proj} AS T3 ON T2.{asg.project_id} = T3.{proj.id}")

INTENTS: tuple[Intent, ...] = (
    Intent("employees_in_city", "filter",
           "SELECT {emp.name} FROM {emp} WHERE {emp.city} = {city}",
           ("Which employees work in {city}?",
            "List the employees based in {city}.",
            "Show the names of all employees located in {city}.",
            "Who is on the payroll in {city}?"), ("city",)),
    Intent("employees_salary_above", "filter",
           "SELECT {emp.name} FROM {emp} WHERE {emp.salary} > {amount}",
           ("Which employees earn more than {amount}?",
            "List employees with a salary above {amount}.",
            "Show everyone whose salary is greater than {amount}.",
            "Who takes home over {amount} a year?"), ("amount",)),
    Intent("employees_hired_after", "filter",
           "SELECT {emp.name} FROM {emp} WHERE {emp.hire_year} > {year}",
           ("Which employees were hired after {year}?",
            "List the employees who joined after {year}.",
            "Show employees with a hire year later than {year}.",
            "Who came on board later than {year}?"), ("year",)),
    Intent("employees_city_salary", "filter",
           "SELECT {emp.name} FROM {emp} WHERE {emp.city} = {city} AND {emp.salary} > {amount}",
           ("Which employees in {city} earn more than {amount}?",
            "List employees based in {city} with a salary above {amount}.",
            "Show the {city} employees whose salary exceeds {amount}.",
            "Among the people in {city}, who makes over {amount}?"), ("city", "amount")),
    Intent("employees_hired_between", "filter",
           "SELECT {emp.name} FROM {emp} WHERE {emp.hire_year} BETWEEN {lo} AND {hi}",
           ("Which employees were hired between {lo} and {hi}?",
            "List employees who joined from {lo} to {hi}.",
            "Show everyone with a hire year between {lo} and {hi}.",
            "Who started sometime in the years {lo} through {hi}?"), ("span",)),
    Intent("salary_of_employee", "selection",
           "SELECT {emp.salary} FROM {emp} WHERE {emp.name} = {employee}",
           ("What is the salary of {employee}?",
            "How much does {employee} earn?",
            "Show the salary of {employee}.",
            "Tell me what {employee} is paid."), ("employee",)),
    Intent("employee_record", "selection",
           "SELECT * FROM {emp} WHERE {emp.name} = {employee}",
           ("Show all the details of {employee}.",
            "Give every column of the employee record for {employee}.",
            "Display everything stored about employee {employee}.",
            "Pull up the full file on {employee}."), ("employee",)),
    Intent("departments_in_city", "selection",
           "SELECT {dept.name} FROM {dept} WHERE {dept.city} = {city}",
           ("Which departments are based in {city}?",
            "List the departments located in {city}.",
            "Show the names of departments whose office is in {city}.",
            "What parts of the company have their home in {city}?"), ("city",)),
    Intent("count_employees_city", "count",
           "SELECT COUNT(*) FROM {emp} WHERE {emp.city} = {city}",
           ("How many employees work in {city}?",
            "Count the employees based in {city}.",
            "What is the number of employees located in {city}?",
            "What's the headcount in {city}?"), ("city",)),
    Intent("count_employees_salary_above", "count",
           "SELECT COUNT(*) FROM {emp} WHERE {emp.salary} > {amount}",
           ("How many employees earn more than {amount}?",
            "Count the employees with a salary above {amount}.",
            "What is the number of employees paid more than {amount}?",
            "How many people make over {amount}?"), ("amount",)),
    Intent("count_employees_department", "count",
           f"SELECT COUNT(*) FROM {_EMP_DEPT} WHERE T2.{{dept.name}} = {{department}}",
           ("How many employees are in the {department} department?",
            "Count the employees who belong to {department}.",
            "What is the number of people in {department}?",
            "How large is {department} in terms of staff?"), ("department",)),
    Intent("count_employees_department_city", "count",
           f"SELECT COUNT(*) FROM {_EMP_DEPT} WHERE T2.{{dept.name}} = {{department}} "
           "AND T1.{emp.city} = {city}",
           ("How many {department} employees work in {city}?",
            "Count the employees of {department} based in {city}.",
            "What is the number of {department} staff located in {city}?",
            "In {city}, how many people does {department} have?"), ("department", "city")),
    Intent("average_salary_city", "aggregate",
           "SELECT AVG({emp.salary}) FROM {emp} WHERE {emp.city} = {city}",
           ("What is the average salary of employees in {city}?",
            "Compute the mean salary for employees based in {city}.",
            "Show the average salary in {city}.",
            "On average, how much are {city} employees paid?"), ("city",)),
    Intent("min_salary_hire_year", "aggregate",
           "SELECT MIN({emp.salary}) FROM {emp} WHERE {emp.hire_year} = {year}",
           ("What is the lowest salary among employees hired in {year}?",
            "Find the minimum salary of employees who joined in {year}.",
            "Show the smallest salary for the {year} hires.",
            "Of the people who started in {year}, what is the least anyone earns?"), ("year",)),
    Intent("max_salary_department", "aggregate",
           f"SELECT MAX(T1.{{emp.salary}}) FROM {_EMP_DEPT} "
           f"WHERE T2.{{dept.name}} = {{department}}",
           ("What is the highest salary in the {department} department?",
            "Find the maximum salary of employees in {department}.",
            "Show the top salary paid in {department}.",
            "How much does the best-paid person in {department} make?"), ("department",)),
    Intent("total_project_budget_department", "aggregate",
           f"SELECT SUM(T1.{{proj.budget}}) FROM {_PROJ_DEPT} "
           f"WHERE T2.{{dept.name}} = {{department}}",
           ("What is the total budget of the projects run by {department}?",
            "Sum the budgets of all {department} projects.",
            "Show the combined project budget for the {department} department.",
            "Adding up every project owned by {department}, how much money is that?"),
           ("department",)),
    Intent("total_hours_project", "aggregate",
           "SELECT SUM(T1.{asg.hours}) FROM {asg} AS T1 JOIN {proj} AS T2 "
           "ON T1.{asg.project_id} = T2.{proj.id} WHERE T2.{proj.name} = {project}",
           ("How many hours per week are spent on {project} in total?",
            "What is the total number of assigned hours on the {project} project?",
            "Sum the weekly hours of everyone assigned to {project}.",
            "Altogether, how much weekly time goes into {project}?"), ("project",)),
    Intent("average_hours_role", "aggregate",
           "SELECT AVG({asg.hours}) FROM {asg} WHERE {asg.role} = {role}",
           ("What is the average number of weekly hours for the role {role}?",
            "Compute the mean hours of assignments with the role {role}.",
            "Show the average hours worked in the {role} role.",
            "Typically, how many hours does someone acting as {role} put in each week?"),
           ("role",)),
    Intent("count_per_city_hired_after", "group",
           "SELECT {emp.city}, COUNT(*) FROM {emp} WHERE {emp.hire_year} > {year} "
           "GROUP BY {emp.city}",
           ("How many employees hired after {year} are there in each city?",
            "Count the employees who joined after {year}, per city.",
            "For each city, show the number of employees hired after {year}.",
            "Break down by city the headcount of people who started after {year}."), ("year",)),
    Intent("cities_with_many_employees", "group",
           "SELECT {emp.city} FROM {emp} GROUP BY {emp.city} HAVING COUNT(*) > {count}",
           ("Which cities have more than {count} employees?",
            "List the cities with over {count} employees.",
            "Show every city where more than {count} employees work.",
            "In what cities does the company employ above {count} people?"), ("count",)),
    Intent("departments_average_salary_above", "group",
           f"SELECT T2.{{dept.name}} FROM {_EMP_DEPT} GROUP BY T2.{{dept.name}} "
           "HAVING AVG(T1.{emp.salary}) > {amount}",
           ("Which departments have an average salary above {amount}?",
            "List the departments whose employees earn more than {amount} on average.",
            "Show departments with a mean salary greater than {amount}.",
            "In which departments does pay, once averaged, exceed {amount}?"), ("amount",)),
    Intent("average_salary_per_department_hired_after", "group",
           f"SELECT T2.{{dept.name}}, AVG(T1.{{emp.salary}}) FROM {_EMP_DEPT} "
           "WHERE T1.{emp.hire_year} > {year} GROUP BY T2.{dept.name}",
           ("What is the average salary per department for employees hired after {year}?",
            "For each department, compute the average salary of employees who joined after {year}.",
            "Show each department's mean salary among hires after {year}.",
            "Department by department, what do people who started after {year} earn on average?"),
           ("year",)),
    Intent("top_paid_employees", "order",
           "SELECT {emp.name} FROM {emp} ORDER BY {emp.salary} DESC LIMIT {n}",
           ("Who are the {n} highest paid employees?",
            "List the {n} employees with the largest salaries.",
            "Show the top {n} employees by salary.",
            "Give me the {n} best earners in the company."), ("n",)),
    Intent("top_paid_employees_city", "order",
           "SELECT {emp.name}, {emp.salary} FROM {emp} WHERE {emp.city} = {city} "
           "ORDER BY {emp.salary} DESC LIMIT {n}",
           ("Who are the {n} best paid employees in {city}, with their salaries?",
            "List the {n} highest salaries in {city} and who earns them.",
            "Show the names and salaries of the top {n} earners in {city}.",
            "In {city}, which {n} people earn the most, and how much?"), ("city", "n")),
    Intent("cheapest_projects", "order",
           "SELECT {proj.name} FROM {proj} ORDER BY {proj.budget} ASC LIMIT {n}",
           ("Which {n} projects have the smallest budgets?",
            "List the {n} projects with the lowest budget.",
            "Show the {n} cheapest projects by budget.",
            "Name the {n} projects that were given the least money."), ("n",)),
    Intent("projects_budget_above", "filter",
           "SELECT {proj.name} FROM {proj} WHERE {proj.budget} > {budget}",
           ("Which projects have a budget above {budget}?",
            "List projects with a budget greater than {budget}.",
            "Show all projects whose budget exceeds {budget}.",
            "What projects were funded with over {budget}?"), ("budget",)),
    Intent("department_of_employee", "join",
           f"SELECT T2.{{dept.name}} FROM {_EMP_DEPT} WHERE T1.{{emp.name}} = {{employee}}",
           ("Which department does {employee} belong to?",
            "What department is {employee} in?",
            "Show the department of {employee}.",
            "Where in the org chart does {employee} sit?"), ("employee",)),
    Intent("employees_department_salary_below", "join",
           f"SELECT T1.{{emp.name}} FROM {_EMP_DEPT} WHERE T2.{{dept.name}} = {{department}} "
           "AND T1.{emp.salary} < {amount}",
           ("Which {department} employees earn less than {amount}?",
            "List employees in {department} with a salary below {amount}.",
            "Show the {department} staff paid under {amount}.",
            "Inside {department}, who makes under {amount}?"), ("department", "amount")),
    Intent("employees_on_project", "join",
           f"SELECT T1.{{emp.name}} FROM {_EMP_ASG_PROJ} WHERE T3.{{proj.name}} = {{project}}",
           ("Which employees work on the {project} project?",
            "List the employees assigned to {project}.",
            "Show everyone staffed on project {project}.",
            "Who is part of the {project} effort?"), ("project",)),
    Intent("projects_of_employee", "join",
           f"SELECT T3.{{proj.name}} FROM {_EMP_ASG_PROJ} WHERE T1.{{emp.name}} = {{employee}}",
           ("Which projects does {employee} work on?",
            "List the projects {employee} is assigned to.",
            "Show all projects that {employee} is staffed on.",
            "What is {employee} busy with, project-wise?"), ("employee",)),
    Intent("employees_with_role_city", "join",
           "SELECT DISTINCT T1.{emp.name} FROM {emp} AS T1 JOIN {asg} AS T2 "
           "ON T1.{emp.id} = T2.{asg.employee_id} WHERE T2.{asg.role} = {role} "
           "AND T1.{emp.city} = {city}",
           ("Which employees in {city} have the role {role} on a project?",
            "List the {city} employees assigned with the role {role}.",
            "Show employees based in {city} who work as {role} on some project.",
            "Among people in {city}, who serves as {role} somewhere?"), ("city", "role")),
    Intent("employees_above_city_average", "nested",
           "SELECT {emp.name} FROM {emp} WHERE {emp.salary} > "
           "(SELECT AVG({emp.salary}) FROM {emp} WHERE {emp.city} = {city})",
           ("Which employees earn more than the average salary in {city}?",
            "List employees whose salary is above the {city} average.",
            "Show everyone paid more than the mean salary of {city} employees.",
            "Who out-earns the typical {city} salary?"), ("city",)),
    Intent("employees_of_departments_in_city", "nested",
           "SELECT {emp.name} FROM {emp} WHERE {emp.dept_id} IN "
           "(SELECT {dept.id} FROM {dept} WHERE {dept.city} = {city})",
           ("Which employees belong to a department based in {city}?",
            "List employees whose department is located in {city}.",
            "Show the employees of departments headquartered in {city}.",
            "Who reports into a {city}-based department?"), ("city",)),
)
