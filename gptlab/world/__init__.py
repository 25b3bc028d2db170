"""The built-in database world: a company in SQLite, questions with gold SQL, dialogs, a
pretraining corpus, a read-only executor, an execution checker and simulated labelers.
It knows no model."""
from gptlab.world.build import World, WorldOptions, build_world, format_prompt, load_world
from gptlab.world.checker import Verdict, check
from gptlab.world.executor import QueryResult, SqlExecutor
from gptlab.world.labelers import Ranking, SqlLabeler, agreement
from gptlab.world.schema import Schema, make_schema

__all__ = ["World", "WorldOptions", "build_world", "load_world", "format_prompt", "Verdict",
           "check", "QueryResult", "SqlExecutor", "Ranking", "SqlLabeler", "agreement",
           "Schema", "make_schema"]
