"""The world as one object: build it from a seed, export it to a directory, load it back.

`build_world` is deterministic: the same options give the same database, the same questions
with the same ids, the same dialogs and the same corpus. `load_world` does not trust the
exported JSONL files for gold SQL; it rebuilds from `world.json` and checks a fingerprint, so
the gold answers a checker uses cannot drift from the database.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import NotFound, UserError, WrongKind, check_bool, reports_path_errors
from gptlab.io import (atomic_path, check_holds_none, missing_dirs, old_files_aside, read_json,
                       write_json_atomic, write_jsonl_atomic, write_text_atomic)
from gptlab.world.checker import Verdict, compare, has_top_level_order_by
from gptlab.world.corpus import build_corpus
from gptlab.world.database import (Company, contents_digest, generate_company,
                                   memory_database, write_database)
from gptlab.world.dialogs import Dialog, build_dialogs
from gptlab.world.executor import BACKSTOP_S, MAX_VM_STEPS, QueryResult, SqlExecutor
from gptlab.world.labelers import SqlLabeler
from gptlab.world.questions import (Combo, Question, SplitSizes, build_questions,
                                    enumerate_combos)
from gptlab.world.schema import Schema, make_schema
from gptlab.world.variants import VariantDatabases

FORMAT = "gptlab-world/1"
FILES = ("corpus.txt", "sft.jsonl", "validation.jsonl", "test.jsonl", "dialogs.jsonl",
         "prompts.jsonl", "company.sqlite", "world.json")


@dataclass(frozen=True)
class WorldOptions:
    """What a world is built from: the seeds, the schema's renaming and the sizes."""

    seed: int = 0
    vary_schema: bool = False
    schema_seed: int | None = None  # which renaming; defaults to `seed`
    n_train: int = 3500
    n_validation: int = 300
    n_test: int = 600
    n_dialogs: int = 600
    corpus_chars: int = 1_000_000

    def validate(self) -> None:
        """Raise a UserError naming the first option of the wrong type or out of range."""
        check_bool(self.vary_schema, "vary_schema")  # "no" would be true: another world
        for f in ("seed", "schema_seed", "n_train", "n_validation", "n_test", "n_dialogs",
                  "corpus_chars"):
            v = getattr(self, f)
            if v is None and f == "schema_seed":
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                raise UserError(f"must be an integer, got {v!r}", field=f)
            if v < 0 and f not in ("seed", "schema_seed"):
                raise UserError(f"must be >= 0, got {v}", field=f)


def format_prompt(question: str, schema: str) -> str:
    """The one prompt layout: schema lines, the question, then the cue the SQL follows."""
    return f"{schema}\nQuestion: {question}\nSQL:"


class World:
    """Database, questions (by split), dialogs and corpus; gold SQL by id."""

    def __init__(self, options: WorldOptions, company: Company, schema: Schema, db_path: Path,
                 splits: dict[str, list[Question]], combos: dict[str, list[Combo]],
                 dialogs: list[Dialog], db_digest: str = ""):
        self.options, self.company, self.schema, self.db_path = options, company, schema, db_path
        self.db_digest = db_digest  # `contents_digest` of the database it was built from
        self.splits, self.combos, self.dialogs = splits, combos, dialogs
        self._questions = {q.id: q for qs in splits.values() for q in qs}
        self._gold = {q.id: q.sql for q in self._questions.values()}
        for d in dialogs:
            for turn, sql in enumerate(d.sqls, 1):
                self._gold[f"{d.id}/{turn}"] = sql
        self._executor: SqlExecutor | None = None
        self._gold_results: dict[tuple[str, int, float], QueryResult] = {}
        self._variants: VariantDatabases | None = None  # the test suite's, made on first use
        self._corpus: str | None = None

    # --- questions and gold --------------------------------------------------------------
    @property
    def train(self) -> list[Question]:
        return self.splits["train"]

    @property
    def validation(self) -> list[Question]:
        return self.splits["validation"]

    @property
    def test(self) -> list[Question]:
        return self.splits["test"]

    def question(self, qid: str) -> Question:
        """The question with id `qid`; a UserError if this world has none."""
        if qid not in self._questions:
            raise UserError(f"no question with id '{qid}' in this world", field="id")
        return self._questions[qid]

    def unseen_phrasing(self, qid: str) -> bool:
        """Whether `qid` is a test question in the phrasing reserved for the test (a dialog
        turn, `{dialog id}/{turn}`, never is)."""
        q = self._questions.get(qid)
        return q is not None and q.unseen_phrasing

    def gold(self, qid: str) -> str:
        """Gold SQL of a question id, or of a dialog turn `{dialog id}/{turn}` (1-based)."""
        if not isinstance(qid, str):  # a list or an object is no key at all (TypeError)
            raise UserError(f"must be a question id string, such as '{next(iter(self._gold))}', "
                            f"got {qid!r}", field="id")
        if qid not in self._gold:
            raise UserError(f"no question with id '{qid}' in this world", field="id")
        return self._gold[qid]

    def prompt(self, question: str, schema: Schema | str | None = None) -> str:
        """Format a question the way every stage does; `schema` defaults to this world's."""
        rendered = schema.render() if isinstance(schema, Schema) else schema
        return format_prompt(question, rendered if rendered is not None else self.schema.render())

    # --- execution -----------------------------------------------------------------------
    def executor(self) -> SqlExecutor:
        """The read-only SQL executor on this world's database (one, made on first use)."""
        if self._executor is None:
            self._executor = SqlExecutor(self.db_path)
        return self._executor

    def check(self, qid: str, pred_sql: str) -> Verdict:
        """Execute `pred_sql` and compare its result with the gold answer of `qid`."""
        gold_sql = self.gold(qid)
        ex = self.executor()
        # Kept per limits: with a budget lowered since, the gold SQL runs again under it, so
        # that a budget below what it needs is said as such, not blamed on `pred_sql`.
        key = (gold_sql, ex.max_vm_steps, ex.backstop_s)
        if key not in self._gold_results:
            gold = ex.run(gold_sql)
            if not gold.ok:  # not kept: with a budget raised, the next check runs it again
                raise self._gold_failed(qid, gold)
            self._gold_results[key] = gold
        gold = self._gold_results[key]
        return compare(self.executor().run(pred_sql), gold, has_top_level_order_by(gold_sql))

    def _gold_failed(self, qid: str, gold: QueryResult) -> UserError:
        """Why the gold SQL of `qid` gave no result: a limit of the executor set lower than
        the world's own queries need, or else a database that is not this world's."""
        ex = self.executor()
        if gold.error.kind == "timeout" and gold.steps > ex.max_vm_steps:
            return UserError(f"gold SQL of '{qid}' ran past the executor's step budget of "
                             f"{ex.max_vm_steps} SQLite steps: the budget is below what the "
                             f"world's own queries need (at most about 3,500 steps); raise it "
                             f"(World.executor().max_vm_steps, default {MAX_VM_STEPS})",
                             field="max_vm_steps")
        if gold.error.kind == "timeout":
            return UserError(f"gold SQL of '{qid}' ran past the executor's wall-clock backstop "
                             f"of {ex.backstop_s:g} s; raise it (World.executor().backstop_s, "
                             f"default {BACKSTOP_S:g})", field="backstop_s")
        return UserError(f"gold SQL of '{qid}' does not run on {self.db_path} "
                         f"({gold.error.message}); was the database replaced?", field="id")

    def correct_on_test_suite(self, qid: str, pred_sql: str) -> bool:
        """Whether `pred_sql` returns the gold's result on the company and on each of its
        variant databases (see variants.py): stricter than `check`, which a wrong query passes
        when it happens to return the gold's rows on this one database."""
        return self.check(qid, pred_sql).correct and self.agrees_on_variants(qid, pred_sql)

    def agrees_on_variants(self, qid: str, pred_sql: str) -> bool:
        """The variant half of `correct_on_test_suite`, for a caller that has `check`ed the
        answer on the company already."""
        if self._variants is None:
            self._variants = VariantDatabases(self.company, self.schema)
        return self._variants.agrees(pred_sql, self.gold(qid))

    def labeler(self, disagreement: float = 0.0, seed: int = 0, ties: bool = True) -> SqlLabeler:
        """A simulated labeler that ranks answers to this world's questions by execution."""
        return SqlLabeler(self, disagreement=disagreement, seed=seed, ties=ties)

    # --- text and records -----------------------------------------------------------------
    def corpus(self) -> str:
        """The pretraining corpus: documents separated by a blank line (built once)."""
        if self._corpus is None:
            rng = random.Random(f"corpus-{self.options.seed}")
            self._corpus = build_corpus(self.company, self.schema, self.train,
                                        self.combos["train"], self.options.corpus_chars, rng,
                                        format_prompt)
        return self._corpus

    def record(self, q: Question) -> dict:
        """The JSONL line of question `q` in sft.jsonl, validation.jsonl or test.jsonl."""
        rec = {"id": q.id, "prompt": self.prompt(q.text), "completion": " " + q.sql,
               "question": q.text, "intent": q.intent, "kind": q.kind, "values": q.values,
               "phrasing": q.phrasing}
        if q.split == "test":
            rec["unseen_phrasing"] = q.unseen_phrasing
        return rec

    def fingerprint(self) -> str:
        """A hash of every gold query by id: two worlds with equal fingerprints agree."""
        h = hashlib.sha256()
        for qid in sorted(self._gold):
            h.update(f"{qid}\t{self._gold[qid]}\n".encode())
        return h.hexdigest()

    @reports_path_errors
    def export(self, out_dir: str | Path) -> dict[str, Path]:
        """Write every file of the world to `out_dir`, each atomically, `world.json` last: a
        world exported over another is not a world until it is whole (an interrupted export
        leaves no manifest to mix the two). The old world's files are moved aside first,
        world.json first, and put back, byte for byte, if the export fails
        (`old_files_aside`)."""
        made = missing_dirs(out_dir)
        out = _prepare_out_dir(out_dir)
        paths = {name: out / name for name in FILES}
        own_db = paths["company.sqlite"].resolve() == self.db_path.resolve()
        writes = ["world.json", *(name for name in FILES if name != "world.json"
                                  and not (own_db and name == "company.sqlite"))]
        with old_files_aside(out, writes, made):
            write_text_atomic(paths["corpus.txt"], self.corpus())
            write_jsonl_atomic(paths["sft.jsonl"], (self.record(q) for q in self.train))
            write_jsonl_atomic(paths["validation.jsonl"],
                               (self.record(q) for q in self.validation))
            write_jsonl_atomic(paths["test.jsonl"], (self.record(q) for q in self.test))
            write_jsonl_atomic(paths["dialogs.jsonl"],
                               ({"id": d.id, "messages": d.messages} for d in self.dialogs))
            write_jsonl_atomic(paths["prompts.jsonl"], ({"id": q.id, "prompt": self.prompt(q.text),
                                                         "intent": q.intent} for q in self.train))
            if not own_db:  # a world loaded from `out_dir` has its database there already
                with atomic_path(paths["company.sqlite"]) as tmp:
                    shutil.copyfile(self.db_path, tmp)
            write_json_atomic(paths["world.json"], self.manifest())
        return paths

    def manifest(self) -> dict:
        """world.json: the format, options, schema, counts and the fingerprint."""
        return {"format": FORMAT, "options": dataclasses.asdict(self.options),
                "schema": self.schema.to_json(), "database": "company.sqlite",
                "counts": {"train": len(self.train), "validation": len(self.validation),
                           "test": len(self.test), "dialogs": len(self.dialogs),
                           "unseen_phrasing": sum(q.unseen_phrasing for q in self.test)},
                "prompt_format": format_prompt("<question>", "<schema lines>") + " <sql>",
                "fingerprint": self.fingerprint()}


# A model's, a training run's or a pipeline run's files: a world written among them would mix
# the two (the pipeline exports its world into OUT/world, not OUT).
MODEL_OR_RUN = ("config.json", "model.safetensors", "tokenizer.json", "run.json", "checkpoints",
                "pipeline.json")


def _prepare_out_dir(out_dir: str | Path) -> Path:
    if not str(out_dir).strip():  # Path("") is the current directory, never named
        raise UserError("is empty; give a directory (write . for the current directory)",
                        field="out")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError("--out must be a directory, but this is an existing file", path=out)
    check_holds_none(out, MODEL_OR_RUN)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output directory ({e.strerror})", path=out) from None
    return out


# The most one export makes, past which it takes many minutes and GBs of memory, all held
# until the files are written: 300,000 training questions took 18 s and 420 MB, 100 million
# corpus characters 11 s and 580 MB, 30,000 dialogs 11 s (2 cores at a load of 4).
MAX_QUESTIONS = 1_000_000  # in each split
MAX_DIALOGS = 1_000_000
MAX_CORPUS_CHARS = 1_000_000_000


def build_world(seed: int = 0, vary_schema: bool = False, *, schema_seed: int | None = None,
                n_train: int = 3500, n_validation: int = 300, n_test: int = 600,
                n_dialogs: int = 600, corpus_chars: int = 1_000_000,
                db_path: str | Path | None = None) -> World:
    """Build the world. The database goes to `db_path`, by default a cache file named after
    its content under the system temp directory (so repeated builds share it)."""
    options = WorldOptions(seed=seed, vary_schema=vary_schema, schema_seed=schema_seed,
                           n_train=n_train, n_validation=n_validation, n_test=n_test,
                           n_dialogs=n_dialogs, corpus_chars=corpus_chars)
    options.validate()
    _check_sizes(options)
    return _build(options, Path(db_path) if db_path is not None else None, write_db=True)


_SIZES = (("n_train", "--train", MAX_QUESTIONS, "questions"),
          ("n_validation", "--validation", MAX_QUESTIONS, "questions"),
          ("n_test", "--test", MAX_QUESTIONS, "questions"),
          ("n_dialogs", "--dialogs", MAX_DIALOGS, "dialogs"),
          ("corpus_chars", "--corpus-chars", MAX_CORPUS_CHARS, "characters"))


def _check_sizes(options: WorldOptions, written: bool = False) -> None:
    """Refuse a size past what an export takes, naming the option: at the export, with its
    flag; in a world.json (`written`), before the world is rebuilt from it (an edited
    `n_train` of 10**12 was generated question by question until the memory ran out)."""
    for name, flag, cap, what in _SIZES:
        if getattr(options, name) > cap:
            raise UserError(f"at most {cap:,} {what}, got {getattr(options, name):,}: no export "
                            f"writes more; export the world again" if written else
                            f"at most {cap:,} {what} ({flag}), got {getattr(options, name):,}: "
                            f"the export holds everything in memory until it writes",
                            field=name)


def _build(options: WorldOptions, db_path: Path | None, write_db: bool) -> World:
    options.validate()
    company = generate_company(options.seed)
    schema = make_schema(options.vary_schema, schema_seed_of(options))
    cached = db_path is None
    if cached:
        key = hashlib.sha256((company.fingerprint() + json.dumps(schema.to_json(), sort_keys=True))
                             .encode()).hexdigest()[:16]
        db_path = Path(tempfile.gettempdir()) / "gptlab-world" / f"company-{key}.sqlite"
        write_db = not db_path.exists()
    if write_db:
        write_database(company, schema, db_path)
    conn = memory_database(company, schema)
    try:
        # The checker runs gold SQL on the file: a cache must hold what the world is built
        # from (`load_world` checks an exported file the same way).
        digest = contents_digest(conn)
        if cached and _cache_digest(db_path) != digest:
            write_database(company, schema, db_path)  # stale, tampered or unreadable: rebuilt
        rng = random.Random(f"questions-{options.seed}")
        prefix = f"s{options.seed}" + (f"v{schema_seed_of(options)}" if options.vary_schema else "")
        sizes = SplitSizes(options.n_train, options.n_validation, options.n_test)
        splits, combos = build_questions(enumerate_combos(company, schema, conn), sizes, rng,
                                         prefix)
        held_out = {c.sql for c in combos["validation"] + combos["test"]}
        dialogs = build_dialogs(combos["train"], schema, conn, held_out, options.n_dialogs,
                                random.Random(f"dialogs-{options.seed}"), prefix)
    finally:
        conn.close()
    return World(options, company, schema, db_path, splits, combos, dialogs, digest)


def database_digest(path: Path) -> str:
    """`contents_digest` of a database file, opened read-only."""
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        return contents_digest(conn)
    except sqlite3.DatabaseError as e:
        raise UserError(f"not a readable SQLite database ({e})", path=path) from None
    finally:
        conn.close()


def _cache_digest(path: Path) -> str | None:
    try:
        return database_digest(path)
    except UserError:  # not a database at all
        return None


def schema_seed_of(options: WorldOptions) -> int:
    return options.seed if options.schema_seed is None else options.schema_seed


class OtherVersionWorld(UserError):
    """A whole world.json whose gold SQL this version of gptlab builds differently."""


def open_world(spec: str | Path | World, field: str = "world") -> World:
    """A world object, a world directory (from `gptlab world export`), or "builtin"; `field`
    names the setting that gave a directory, as an error about it says."""
    if not isinstance(spec, (str, Path)):
        return spec
    if str(spec) == "builtin":
        return build_world()
    return load_world(spec, field)


MAKE_ONE = "make one with `gptlab world export`"


def world_manifest(directory: str | Path, field: str = "world") -> dict:
    """The manifest (`world.json`) of the world exported to `directory`, which the setting
    `field` gave. Every reader of a world directory asks here, so that each says alike what is
    wrong with one, naming the directory and `field`: it is not there (or is a file), it holds
    no world.json (no world, or an export stopped before writing it, last), or its world.json
    cannot be read or is not a gptlab world's."""
    d = Path(directory)
    if not d.exists():
        raise UserError(f"world directory not found ({MAKE_ONE})", path=d, field=field)
    if not d.is_dir():
        raise WrongKind(f"is a file, not a world directory ({MAKE_ONE})", path=d, field=field)
    if not (d / "world.json").exists():
        raise WrongKind(f"is not a world directory: it holds no world.json ({MAKE_ONE}; an "
                        f"export stopped before its end leaves none: export it again)",
                        path=d, field=field)
    try:
        manifest = read_json(d / "world.json")
    except UserError as e:
        why = e.message + ("" if e.line is None else f" on line {e.line}")
    except OSError as e:  # no permission to read it, say
        why = f"cannot be read: {e.strerror or e}"
    else:
        if manifest.get("format") == FORMAT:
            return manifest
        why = f"its format is {manifest.get('format')!r}, not '{FORMAT}'"
    raise WrongKind(f"is not a world directory: its world.json is no world's manifest: "
                    f"{why}; export the world again", path=d, field=field)


def load_world(directory: str | Path, field: str = "world") -> World:
    """Rebuild an exported world from its `world.json`, using its `company.sqlite`; `field`
    names the setting that gave `directory`, as `world_manifest` says."""
    directory = Path(directory)
    manifest_path = directory / "world.json"
    manifest = world_manifest(directory, field)
    known = {f.name for f in dataclasses.fields(WorldOptions)}
    raw = manifest.get("options")
    if not isinstance(raw, dict) or set(raw) - known:
        raise UserError(f"expected an object with fields {sorted(known)}", path=manifest_path,
                        field="options")
    options = WorldOptions(**raw)
    try:
        options.validate()
        _check_sizes(options, written=True)
    except UserError as e:
        raise UserError(e.message, path=manifest_path, field=f"options.{e.field}") from None
    if not isinstance(manifest.get("fingerprint"), str):
        raise UserError("expected the world's fingerprint (a string); export the world again",
                        path=manifest_path, field="fingerprint")
    name = manifest.get("database", "company.sqlite")
    if not isinstance(name, str) or not name:
        raise UserError(f"expected the database's file name in the world directory (a "
                        f"string), got {name!r}; export the world again", path=manifest_path,
                        field="database")
    db_path = directory / name
    if not db_path.is_file():
        raise NotFound("database file not found", path=db_path)
    world = _build(options, db_path, write_db=False)
    if manifest.get("fingerprint") != world.fingerprint():
        raise OtherVersionWorld("the world its options rebuild is not the one it records: it "
                                "was exported by a different version of gptlab, or its options "
                                "were edited; export it again",
                                path=manifest_path, field="fingerprint")
    if database_digest(db_path) != world.db_digest:
        raise UserError("the database's contents differ from the world's (was it edited?); "
                        "export the world again", path=db_path)
    return world
