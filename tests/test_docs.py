"""What the documentation shows is what gptlab has: every `gptlab ...` line of a shell block in
README.md and docs/ parses with the verb's own flags, and every Python example compiles and
imports names that exist."""
import argparse
import ast
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from gptlab.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_blocks(text: str, langs: tuple[str, ...]) -> list[str]:
    """The bodies of the fenced blocks marked with one of `langs`, those indented under a list
    item too (their indent removed)."""
    blocks, body, lang, indent = [], None, "", 0
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if body is None:
                body, lang = [], line.lstrip()[3:].strip()
                indent = len(line) - len(line.lstrip())
            else:
                if lang in langs:
                    blocks.append("\n".join(body))
                body = None
        elif body is not None:
            body.append(line[indent:] if line[:indent].isspace() else line)
    return blocks


def gptlab_commands(text: str) -> list[list[str]]:
    """The arguments of each `gptlab` command, continuation lines joined, with the shell's
    comments, pipes, `&&`, redirections, `time` and leading VAR=value assignments left out."""
    commands = []
    for block in fenced_blocks(text, ("bash", "sh", "console")):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;()<>")
            lexer.whitespace_split = True
            words, parts, target = [], [], False
            for token in lexer:  # operators (|, &&, ;, >) come as tokens of their own
                if token[0] in "|&;()":
                    parts.append(words)
                    words = []
                elif token[0] in "<>":
                    target = True  # the file a redirection names is not an argument
                elif target:
                    target = False
                else:
                    words.append(token)
            parts.append(words)
            for words in parts:
                while words and (re.match(r"^[A-Za-z_]\w*=", words[0]) or words[0] == "time"):
                    words = words[1:]
                if words[:1] == ["gptlab"]:
                    commands.append(words[1:])
    return commands


COMMANDS = [(doc.name, args) for doc in DOCS for args in gptlab_commands(doc.read_text())]


def test_a_block_indented_under_a_list_item_is_read_too():
    text = "- a step:\n\n  ```bash\n  gptlab ppo --steps 4 \\\n    --resume\n  ```\n"
    assert gptlab_commands(text) == [["ppo", "--steps", "4", "--resume"]]


def test_the_documentation_shows_every_verb():
    shown = {args[0] for _, args in COMMANDS}
    verbs = set(build_parser()._subparsers._group_actions[0].choices)
    assert verbs <= shown, sorted(verbs - shown)


@pytest.mark.parametrize("doc,args", COMMANDS, ids=[f"{d}:{' '.join(a[:2])}" for d, a in COMMANDS])
def test_a_documented_command_parses(doc, args):
    build_parser().parse_args(args)


def test_the_commands_are_read_as_a_shell_would_and_a_wrong_flag_is_caught(capsys):
    text = ("```bash\n# a comment: gptlab sample\nGPTLAB_WORLD=w time gptlab world score "
            "--world w \\\n  --in a.jsonl > out.txt | head -3 && gptlab sample --model m "
            "--prompts p.jsonl --out s.jsonl --frobnicate 3  # a typo\n```\n")
    score, sample = gptlab_commands(text)
    assert score == ["world", "score", "--world", "w", "--in", "a.jsonl"]
    build_parser().parse_args(score)
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(sample)
    assert stop.value.code == 2 and "unknown flag --frobnicate;" in \
        capsys.readouterr().err



PYTHON = [(doc.name, code) for doc in DOCS
          for code in fenced_blocks(doc.read_text(), ("python",))]


@pytest.mark.parametrize("doc,code", PYTHON, ids=[f"{d}:{i}" for i, (d, _) in enumerate(PYTHON)])
def test_a_documented_python_example_compiles_and_imports_what_gptlab_has(doc, code):
    tree = ast.parse(code, doc)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "gptlab":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(
                    f"{node.module}.{alias.name}"), f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gptlab":
                    importlib.import_module(alias.name)


def gptlab_calls(code: str) -> list[tuple[str, object, ast.Call]]:
    """Each call in `code` of a name imported from gptlab (`pretrain(...)`, `api.load(...)`),
    with the object it names."""
    tree = ast.parse(code)
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "gptlab":
            module = importlib.import_module(node.module)
            for alias in node.names:
                names[alias.asname or alias.name] = getattr(module, alias.name, None) or \
                    importlib.import_module(f"{node.module}.{alias.name}")
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, attrs = node.func, []
        while isinstance(func, ast.Attribute):
            attrs.insert(0, func.attr)
            func = func.value
        if not isinstance(func, ast.Name) or func.id not in names:
            continue
        obj = names[func.id]
        for attr in attrs:
            obj = getattr(obj, attr, None)
        if obj is not None and callable(obj):
            calls.append((ast.unparse(node.func), obj, node))
    return calls


@pytest.mark.parametrize("doc,code", PYTHON, ids=[f"{d}:{i}" for i, (d, _) in enumerate(PYTHON)])
def test_a_documented_python_call_passes_arguments_its_function_takes(doc, code):
    # An example that imports real names can still call them with a keyword renamed since.
    import inspect
    for name, obj, call in gptlab_calls(code):
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):
            continue
        if any(isinstance(a, ast.Starred) for a in call.args) or \
                any(k.arg is None for k in call.keywords):
            continue
        try:
            signature.bind(*range(len(call.args)), **{k.arg: None for k in call.keywords})
        except TypeError as e:
            raise AssertionError(f"{doc}: {ast.unparse(call)}: {e}") from None


def test_a_documented_call_with_a_renamed_keyword_is_caught():
    code = ("from gptlab.world import build_world\nfrom gptlab import api\n"
            "build_world(seed=0, vary_schema=False)\napi.load('m', device='cpu')\n")
    assert [name for name, _, _ in gptlab_calls(code)] == ["build_world", "api.load"]
    test_a_documented_python_call_passes_arguments_its_function_takes("x.md", code)
    with pytest.raises(AssertionError, match="build_world.*'vary_schemas'"):
        test_a_documented_python_call_passes_arguments_its_function_takes(
            "x.md", code.replace("vary_schema=", "vary_schemas="))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_github_anchor_is_githubs():
    assert github_anchor("InstructGPT: SFT → rankings → reward model → PPO") == \
        "instructgpt-sft--rankings--reward-model--ppo"
    assert github_anchor("The whole recipe: `gptlab pipeline` (what `make demo` runs)") == \
        "the-whole-recipe-gptlab-pipeline-what-make-demo-runs"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_to_a_section_of_the_same_file_finds_it(doc):
    text = doc.read_text()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    anchors = {github_anchor(m) for m in re.findall(r"^#+ (.+)$", prose, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", prose)
    assert [link for link in links if link not in anchors] == []


def prose_of(text: str) -> str:
    """`text` without its fenced blocks, those indented under a list item too."""
    return re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.S | re.M)


def contents_gaps(text: str) -> list[str]:
    """The `## ` sections after README's `## Contents` that its list links to none of."""
    _, _, after = prose_of(text).partition("\n## Contents\n")
    listed, _, rest = after.partition("\n## ")
    linked = set(re.findall(r"\]\(#([^)]+)\)", listed))
    sections = re.findall(r"^## (.+)$", "## " + rest, flags=re.M)
    return [s for s in sections if github_anchor(s) not in linked]


def test_the_readme_contents_list_every_section():
    assert contents_gaps((ROOT / "README.md").read_text()) == []


def test_a_section_the_contents_miss_is_caught():
    text = ("# t\n## Contents\n\n- [A](#a)\n\n## A\n```bash\n## not a heading\n```\n"
            "### A sub-section\n## B: `gptlab b`\n")
    assert contents_gaps(text) == ["B: `gptlab b`"]


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each verb's parser, and each action's as `VERB ACTION` (`world score`)."""
    parsers = {}
    for verb, parser in build_parser()._subparsers._group_actions[0].choices.items():
        parsers[verb] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.update({f"{verb} {name}": p for name, p in action.choices.items()})
    return parsers


def code_spans(text: str) -> list[str]:
    """The text of each backquoted span, as Markdown pairs them: a run of backquotes closes at
    the next run as long (``a `b` c`` is one span), within a paragraph."""
    return [m[1] for m in re.findall(r"(?<!`)(`+)(?!`)((?:(?!\n\n).)+?)(?<!`)\1(?!`)", text,
                                     flags=re.S)]


def flags_shown_with_a_verb(text: str, verbs: set[str]) -> list[tuple[str, str]]:
    """(verb, flag) of each flag in a backquoted span of prose that begins with a verb, after
    `gptlab` or not (`gptlab ppo --kl-coef 0.1`, `world score --in`, `label --no-ties`)."""
    shown = []
    for span in code_spans(prose_of(text)):
        words = [w.strip("[](){},;") for w in span.split()]
        words = words[1:] if words[:1] == ["gptlab"] else words
        words = words[:words.index("--")] if "--" in words else words  # then arguments only
        two = " ".join(words[:2])
        verb = two if two in verbs else words[0] if words and words[0] in verbs else None
        if verb is not None:
            shown += [(verb, w.split("=")[0]) for w in words if w.startswith("--")]
    return shown


def test_every_flag_the_prose_shows_after_a_verb_is_that_verbs():
    # The shell blocks are parsed whole above; prose names flags in spans such as `sft --data`.
    parsers = verb_parsers()
    shown = [(doc.name, verb, flag) for doc in DOCS
             for verb, flag in flags_shown_with_a_verb(doc.read_text(), set(parsers))]
    assert ("README.md", "world score", "--in") in shown and len(shown) > 50
    assert [s for s in shown if s[2] not in parsers[s[1]]._option_string_actions] == []


def test_a_flag_shown_with_the_wrong_verb_is_caught():
    text = ("`gptlab sample --k 1 [--greedy]`, `world score --in` and\n`reward --samples`;\n"
            "```bash\n`sft --in`\n```\n`gptlab --help`, `--seed`, `gptlab sfx --x`, "
            "``said `sft --in` `` and `label\n--in -- --x`")
    verbs = set(verb_parsers())
    assert flags_shown_with_a_verb(text, verbs) == [
        ("sample", "--k"), ("sample", "--greedy"), ("world score", "--in"),
        ("reward", "--samples"), ("label", "--in")]
    assert "--samples" not in verb_parsers()["sft"]._option_string_actions


# Flags the documents show only to say they are refused: cut short (`--temp`), or a prefix.
NOT_FLAGS = {"--temp", "--max-step", "--no-tie", "--no-"}


def backquoted_flags(text: str) -> set[str]:
    """Each `--flag` that begins a backquoted span (`--kl-coef`, `--out=-x`, `--top-k 5`)."""
    return {m for span in code_spans(prose_of(text))
            for m in re.findall(r"^\s*(--\w[\w-]*)", span)}


def test_every_flag_the_documents_name_is_a_flag_of_some_verb():
    known = {flag for parser in verb_parsers().values() for flag in parser._option_string_actions}
    named = set().union(*(backquoted_flags(doc.read_text()) for doc in DOCS))
    assert {"--kl-coef", "--ptx-data", "--no-ties", "--vary-schema"} <= named
    assert sorted(named - known - NOT_FLAGS) == []


def test_a_flag_no_verb_has_is_caught():
    assert backquoted_flags("`--kl-coef 0.1`, `--out=-x`, `-- -x` and ``--kl-coeff``") == \
        {"--kl-coef", "--out", "--kl-coeff"}
    assert "--kl-coeff" not in {f for p in verb_parsers().values()
                                for f in p._option_string_actions}


# --- docs/ARCHITECTURE.md: the tree it draws, the names it gives, the arrows it states ---------

ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def architecture_paths(text: str) -> list[str]:
    """The files the tree block of ARCHITECTURE.md names, as paths from the repository root:
    each entry (`cli.py, __main__.py`, `model/`), the `*.py` / `*.sh` files a folder's
    description lists, or, where it lists bare module names after a colon (`world/`: `database,
    schema (...), intents`), those as `NAME.py`."""
    tree = fenced_blocks(text, ("",))[0]
    entries: list[list[str]] = []  # [path, description], continuation lines joined
    top = ""
    for line in tree.splitlines():
        indent = len(line) - len(line.lstrip())
        name, _, description = line.strip().partition("  ")
        if indent == 0:
            top = name if name.endswith("/") else ""
            entries.append([name, description])
        elif indent == 2 and re.fullmatch(r"[\w.]+/?(, [\w.]+/?)*", name):
            entries.append([", ".join(top + n for n in name.split(", ")), description])
        else:
            entries[-1][1] += " " + line.strip()
    paths = []
    for entry, description in entries:
        paths += entry.split(", ")
        folder = entry if entry.endswith("/") else entry.rpartition("/")[0] + "/"
        files = re.findall(r"\b\w+\.(?:py|sh)\b", description)
        prose = re.sub(r"\([^()]*\)", "", re.sub(r"`[^`]*`", "", description))
        if not files and entry.endswith("/") and ":" in prose:
            files = [f"{item.split()[0]}.py" for item in prose.split(":", 1)[1].split(",")
                     if item.strip()]
        paths += [folder + f for f in files]
    return paths


def test_every_file_the_architecture_tree_names_exists():
    paths = architecture_paths(ARCHITECTURE.read_text())
    for expected in ("gptlab/cli.py", "gptlab/model/heads.py", "gptlab/world/rewards.py",
                     "gptlab/train/rl_math.py", "gptlab/eval/headroom.py", "bench/gpu.sh",
                     "bench/sft_memory.py"):
        assert expected in paths, expected  # the reader still finds what it should
    assert [p for p in paths if not (ROOT / p).exists()] == []


def test_a_file_the_tree_names_that_is_gone_is_caught():
    text = ARCHITECTURE.read_text().replace("rewards (execution", "reward (execution")
    assert "gptlab/world/reward.py" in architecture_paths(text)
    assert not (ROOT / "gptlab/world/reward.py").exists()


def dotted_names(text: str) -> list[str]:
    """Each `gptlab.x.y` in backquotes, a call's arguments left out."""
    return [m.split("(")[0] for m in re.findall(r"`(gptlab(?:\.\w+)+)[^`]*`", text)]


def resolves(dotted: str) -> bool:
    """A module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS + [ROOT / "BENCHMARKS.md"], ids=lambda p: p.name)
def test_every_gptlab_name_in_backquotes_exists(doc):
    names = dotted_names(doc.read_text())
    assert [n for n in names if not resolves(n)] == []


def test_a_name_that_is_gone_is_caught():
    assert dotted_names("`gptlab.errors.UserError(msg, path=)` and `gptlab.io`") == \
        ["gptlab.errors.UserError", "gptlab.io"]
    assert resolves("gptlab.errors.UserError") and resolves("gptlab.world.checker")
    assert not resolves("gptlab.errors.UserFault") and not resolves("gptlab.world.checkers")


# --- the short names ARCHITECTURE.md and the module docstrings give --------------------------

def gptlab_module_names() -> list[str]:
    return [".".join(p.relative_to(ROOT).with_suffix("").parts[:-1]
                     if p.name == "__init__.py" else p.relative_to(ROOT).with_suffix("").parts)
            for p in sorted((ROOT / "gptlab").rglob("*.py"))]


def has_name(obj: object, name: str) -> bool:
    """`name` is an attribute of `obj`, or a dataclass field of it (one without a default is
    no class attribute: `Generation.tokens`)."""
    return hasattr(obj, name) or name in getattr(obj, "__dataclass_fields__", {})


def classes_of(module: object) -> list[type]:
    """The classes `module` defines (not those it imports), a package's those it exports."""
    return [v for v in vars(module).values() if isinstance(v, type)
            and v.__module__.startswith(module.__name__)]


FILE_SUFFIXES = {"json", "jsonl", "safetensors", "pt", "py", "sh", "md", "html", "png", "txt",
                 "gguf", "parquet", "bin"}


def short_references(text: str) -> list[tuple[str, str]]:
    """(owner, name) of each backquoted `owner.name`, a call's arguments left out, whose owner
    is a gptlab module by its last name or a gptlab class (`loop.held_interrupt`,
    `checkpoint._assign_weights`, `model.new_cache(batch, max_len)`,
    `ScalarHeadModel.score_continuations`); a file's name (`model.safetensors`) is none, nor is
    a `gptlab.NAME` (test_every_gptlab_name_in_backquotes_exists reads those)."""
    owners = {m.rsplit(".", 1)[-1] for m in gptlab_module_names()} | \
        {c.__name__ for m in gptlab_module_names() for c in classes_of(importlib.import_module(m))}
    found = []
    for span in re.findall(r"`([^`\n]+)`", text):
        m = re.fullmatch(r"(\w+)\.(\w+)(?:\(.*\))?", span)
        if m and m[1] in owners - {"gptlab"} and m[2] not in FILE_SUFFIXES:
            found.append((m[1], m[2]))
    return found


def short_resolves(owner: str, name: str) -> bool:
    """`name` is an attribute of the gptlab module whose last name is `owner`, or of a class it
    defines (`model.new_cache`: gptlab.model's GPT's), or of a gptlab class named `owner`."""
    for module in map(importlib.import_module, gptlab_module_names()):
        if module.__name__.rsplit(".", 1)[-1] == owner:
            if has_name(module, name) or any(has_name(c, name) for c in classes_of(module)):
                return True
        if any(c.__name__ == owner and has_name(c, name) for c in classes_of(module)):
            return True
    return False


def module_docstrings() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), ast.get_docstring(ast.parse(p.read_text())) or "")
            for p in sorted((ROOT / "gptlab").rglob("*.py"))]


def test_every_short_module_name_in_backquotes_exists():
    texts = [("ARCHITECTURE.md", ARCHITECTURE.read_text()), *module_docstrings()]
    refs = [(where, *ref) for where, text in texts for ref in short_references(text)]
    assert ("ARCHITECTURE.md", "loop", "held_interrupt") in refs
    assert ("ARCHITECTURE.md", "model", "new_cache") in refs
    assert [r for r in refs if not short_resolves(r[1], r[2])] == []


def method_references(text: str) -> list[tuple[str, str]]:
    """(module, name) of each backquoted `.name` (`.decode_cut(ids)`, `.bos_id/.eos_id`) in a
    paragraph of ARCHITECTURE.md's contracts headed `**What** (`gptlab.module`)`."""
    found = []
    for paragraph in re.split(r"\n(?=\*\*)", text):
        head = re.match(r"\*\*[^*]+\*\* \(`(gptlab(?:\.\w+)+)`\)", paragraph)
        if head:
            for span in re.findall(r"`([^`\n]+)`", paragraph):
                found += [(head[1], n) for n in re.findall(r"(?:^|/)\.(\w+)", span)]
    return found


def test_every_method_a_contract_names_is_its_modules():
    refs = method_references(ARCHITECTURE.read_text())
    assert ("gptlab.tokenizer", "decode_cut") in refs and ("gptlab.engine", "finished") in refs
    wrong = [(m, n) for m, n in refs
             if not any(has_name(c, n) for c in classes_of(importlib.import_module(m)))]
    assert wrong == []


def known_words() -> set[str]:
    """Every name gptlab's code defines or uses (functions, classes, variables, parameters,
    keywords, attributes) and every identifier a string of its code holds (a record's field:
    `non_finite`, `best_score`), docstrings left out."""
    words: set[str] = set()
    for path in sorted((ROOT / "gptlab").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                        ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)
                      and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                words.add(node.name)
            elif isinstance(node, ast.Name):
                words.add(node.id)
            elif isinstance(node, ast.Attribute):
                words.add(node.attr)
            elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
                words.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings:
                words |= set(re.findall(r"\w+", node.value))
    return words


def named_identifiers(text: str) -> list[str]:
    """The code names a text gives in backquotes: a bare name with an underscore (`read_meta`,
    `non_finite`), or the name a call begins with (`fit_messages(...)`, `GPT(cfg)`); in the tree
    of ARCHITECTURE.md, where names stand without backquotes, those of its descriptions too
    (`write_json_atomic`, `setting(name)`)."""
    spans = re.findall(r"`([^`\n]+)`", text)
    tree = fenced_blocks(text, ("",))[:1] if "\ngptlab/\n" in text else []
    names = [s for s in spans if re.fullmatch(r"_?[a-z]\w*_\w*", s)]
    for piece in spans + tree:
        names += re.findall(r"(?<![\w.'\"-])([A-Za-z_]\w*)\(", piece)
    if tree:
        names += re.findall(r"(?<![\w.'\"/-])([a-z]\w*_\w*)(?![\w./-])", tree[0])
    return list(dict.fromkeys(names))


# Names of SQL and of the libraries gptlab follows that its docstrings cite: `zeroblob(10**9)`
# of a huge result, TRL's use of `apply_chat_template`.
SQL_AND_LIBRARIES = {"zeroblob", "apply_chat_template"}


def test_every_code_name_a_document_gives_is_in_the_code():
    # A function renamed or removed leaves its name in the documents that explain it; a name
    # gptlab's code neither defines nor uses (nor writes as a field) is such a name.
    known = known_words() | SQL_AND_LIBRARIES
    texts = [("ARCHITECTURE.md", ARCHITECTURE.read_text()), *module_docstrings()]
    named = {(where, n) for where, text in texts for n in named_identifiers(text)}
    assert {("ARCHITECTURE.md", "write_json_atomic"), ("ARCHITECTURE.md", "setting"),
            ("ARCHITECTURE.md", "read_meta"), ("gptlab/chat/terminal.py", "reply_block")} <= named
    assert sorted((w, n) for w, n in named if n not in known) == []


def test_a_short_name_that_is_gone_is_caught():
    text = ("`loop.held_interrupt`, `model.new_cache(b, n)`, `ScalarHeadModel.score_continuations`"
            ", `model.safetensors`, `loop.held_interupt`, `checkpoint.assign_weights`\n\n"
            "**Tokenizer** (`gptlab.tokenizer`): `.decode_cut(ids)`, `.bos_id/.eos_ids`.\n")
    refs = short_references(text)
    assert refs == [("loop", "held_interrupt"), ("model", "new_cache"),
                    ("ScalarHeadModel", "score_continuations"), ("loop", "held_interupt"),
                    ("checkpoint", "assign_weights")]
    assert [short_resolves(*r) for r in refs] == [True, True, True, False, False]
    assert method_references(text) == [("gptlab.tokenizer", "decode_cut"),
                                       ("gptlab.tokenizer", "bos_id"),
                                       ("gptlab.tokenizer", "eos_ids")]
    assert not any(has_name(c, "eos_ids")
                   for c in classes_of(importlib.import_module("gptlab.tokenizer")))
    tree = "x\n```\ngptlab/\n  io.py  atomic writes (write_json_atomc, remove_dir(path))\n```\n"
    assert named_identifiers(tree + "`read_metta` and `fit_messagez(m)`") == \
        ["read_metta", "fit_messagez", "remove_dir", "write_json_atomc"]
    assert {"write_json_atomc", "read_metta", "fit_messagez"}.isdisjoint(known_words())


def gptlab_imports() -> dict[str, set[str]]:
    """Each gptlab module and the gptlab modules it imports, at its top or inside a function
    (a lazy import is still an arrow), each with the packages above it that importing runs."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "gptlab").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        graph[module] = names
    modules = set(graph)
    for module, names in graph.items():
        found = {n for n in names if n in modules}
        graph[module] = found | {".".join(n.split(".")[:i]) for n in found
                                 for i in range(2, n.count(".") + 1)}
    return graph


def reached(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [m for m in graph if m == start or m.startswith(start + ".")]
    while todo:
        for name in graph.get(todo.pop(), ()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def under(names: set[str], *packages: str) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in packages)}


def test_the_arrows_point_one_way():
    # ARCHITECTURE.md: the model knows no stage; the engine knows no text; the world knows no
    # model. "Knows" counts every import on the way, lazy ones too. The model may raise a
    # UserError and copy its host-known rows queued (gptlab.devices imports no gptlab).
    graph = gptlab_imports()
    assert under(reached(graph, "gptlab.model"), "gptlab") <= \
        under(set(graph), "gptlab.model") | {"gptlab", "gptlab.errors", "gptlab.devices"}
    assert under(reached(graph, "gptlab.devices"), "gptlab") <= {"gptlab"}
    assert under(reached(graph, "gptlab.engine"), "gptlab.tokenizer", "gptlab.data",
                 "gptlab.world", "gptlab.chat") == set()
    assert under(reached(graph, "gptlab.world"), "gptlab.model", "gptlab.engine",
                 "gptlab.checkpoint", "gptlab.train", "gptlab.eval") == set()


def test_an_arrow_the_wrong_way_is_caught():
    graph = gptlab_imports()
    assert "gptlab.world.executor" in reached(graph, "gptlab.world.checker")
    graph["gptlab.world.rewards"] = graph["gptlab.world.rewards"] | {"gptlab.eval.execution"}
    assert "gptlab.model.gpt" in reached(graph, "gptlab.world")  # via feedback and checkpoint


PATH_IN_PROSE = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w-]+\.(?:py|sh))\b")


@pytest.mark.parametrize("doc", DOCS + [ROOT / "BENCHMARKS.md"], ids=lambda p: p.name)
def test_every_source_path_a_document_names_exists(doc):
    # `gptlab/train/ppo.py`, `train/pipeline.py` (under gptlab/), `bench/gpu.sh`
    paths = set(PATH_IN_PROSE.findall(doc.read_text()))
    assert [p for p in sorted(paths) if not (ROOT / p).exists()
            and not (ROOT / "gptlab" / p).exists()] == []


def bench_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, its arguments) of each `python bench/NAME.py ...` in `text`."""
    found = re.findall(r"python (bench/\w+\.py)((?: --?[\w-]+(?: [^\s`-][^\s`]*)?)*)", text)
    return [(script, shlex.split(args)) for script, args in found]


def bench_flags(script: Path) -> set[str]:
    return set(re.findall(r"add_argument\(\"(--[\w-]+)\"", script.read_text()))


def test_every_benchmark_command_names_its_scripts_flags():
    commands = bench_commands((ROOT / "BENCHMARKS.md").read_text())
    assert {script for script, _ in commands} >= {
        "bench/sampling.py", "bench/sft_step.py", "bench/reward_step.py", "bench/ppo_step.py",
        "bench/sft_memory.py"}
    for script, args in commands:
        flags = {a.split("=")[0] for a in args if a.startswith("--")}
        assert flags <= bench_flags(ROOT / script), (script, flags - bench_flags(ROOT / script))


def test_a_benchmark_flag_that_is_gone_is_caught():
    text = "`.venv/bin/python bench/sampling.py --model runs/demo/sft --prompt p.jsonl` (after"
    assert bench_commands(text) == [("bench/sampling.py",
                                     ["--model", "runs/demo/sft", "--prompt", "p.jsonl"])]
    assert "--prompt" not in bench_flags(ROOT / "bench/sampling.py")


def test_no_line_of_python_is_longer_than_100_characters():
    # The house style: about 40 lines of gptlab/, tests/ and bench/ had grown past it.
    long = [f"{path.relative_to(ROOT)}:{n} ({len(line)})"
            for folder in ("gptlab", "tests", "bench")
            for path in sorted((ROOT / folder).rglob("*.py"))
            for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1)
            if len(line) > 100]
    assert long == []


# --- the defaults README states beside a flag are the parser's ----------------------------------

# Where README lists a verb's defaults: (the text that starts the list, the text after it, verb).
DEFAULT_LISTS = [("**Export options**, with their defaults:", "\n\n###", "world export"),
                 ("All are flags (`gptlab pipeline --help`).", "**Why `--ptx-coef", "pipeline"),
                 ("| flag | default | |", "\n\n", "chat")]


def stated_defaults(text: str) -> list[tuple[str, str, str]]:
    """(verb, flag, value) of each default a list of DEFAULT_LISTS states: a table row
    `| `--flag ARG` | VALUE |`, `--flag VALUE` (`--sft-lr 1e-3`) or `--flag` (VALUE) (`--seed`
    (0)); a span that shows a command (`gptlab sample --k 1`) is an example, not a default."""
    stated = []
    for start, end, verb in DEFAULT_LISTS:
        _, found, after = text.partition(start)
        assert found, start  # the list is still where this test looks for it
        block = after.split(end)[0]
        rows = [line for line in block.splitlines() if line.startswith("| `--")]
        for row in rows:
            flag, value = re.match(r"\| `(--[\w-]+)[^|]*\| ([^|]+) \|", row).groups()
            stated.append((verb, flag, value.strip()))
        prose = "\n".join(line for line in block.splitlines() if not line.startswith("|"))
        for span in code_spans(prose):
            if re.fullmatch(r"--[\w-]+ [^\s]+", span):
                stated.append((verb, *span.split()))
        for flag, value in re.findall(r"`(--[\w-]+)` \(([\w.,]+)\)", prose):
            stated.append((verb, flag, value))
    return stated


def shown_default(parser: argparse.ArgumentParser, action: argparse.Action) -> object:
    """The default `--help` shows for `action` (a config verb's comes from its config, not
    from argparse), else argparse's."""
    shown = re.search(r"\(default: ([^()]*)\)$", parser._get_formatter()._expand_help(action)
                      if action.help else "")
    return shown[1] if shown else action.default


def stated_value_is_default(value: str, parser: argparse.ArgumentParser,
                            action: argparse.Action) -> bool:
    """Whether README's `value` says what the default is: a number equal to the one `--help`
    shows, `(required)`, or `none`/`off`/`the model's context` for no default value."""
    if value == "(required)":
        return action.required
    if value in ("none", "off", "the model's context"):
        return action.default is None and not action.required
    default = shown_default(parser, action)
    try:
        return float(value.replace(",", "")) == float(default)
    except (TypeError, ValueError):
        return str(default) == value


def test_every_default_the_readme_states_is_the_parsers():
    parsers = verb_parsers()
    stated = stated_defaults((ROOT / "README.md").read_text())
    assert {("world export", "--train", "3500"), ("pipeline", "--sft-lr", "1e-3"),
            ("chat", "--max-new-tokens", "256"), ("chat", "--model", "(required)"),
            ("world export", "--seed", "0")} <= set(stated)
    actions = {(verb, flag): (parsers[verb], parsers[verb]._option_string_actions[flag])
               for verb, flag, _ in stated}
    wrong = [(verb, flag, value, shown_default(*actions[verb, flag]))
             for verb, flag, value in stated
             if not stated_value_is_default(value, *actions[verb, flag])]
    assert wrong == []


def test_a_default_the_parser_no_longer_has_is_caught():
    text = ("**Export options**, with their defaults:\n\n- `--seed` (1): which world.\n"
            "- `--train 3500`\n\n### Next\n"
            "All are flags (`gptlab pipeline --help`).\n- `--sft-lr 3e-4`, "
            "`gptlab sample --k 1`\n**Why `--ptx-coef 0.002`.**\n"
            "| flag | default | |\n|---|---|---|\n| `--seed N` | 0 | |\n"
            "| `--temperature T` / `--greedy` | 1.0 | x |\n\n")
    stated = stated_defaults(text)
    assert stated == [("world export", "--train", "3500"), ("world export", "--seed", "1"),
                      ("pipeline", "--sft-lr", "3e-4"), ("chat", "--seed", "0"),
                      ("chat", "--temperature", "1.0")]
    parsers = verb_parsers()
    assert [s for s in stated if not stated_value_is_default(
        s[2], parsers[s[0]], parsers[s[0]]._option_string_actions[s[1]])] == [
        ("world export", "--seed", "1"), ("pipeline", "--sft-lr", "3e-4"),
        ("chat", "--temperature", "1.0")]


# --- the presets README's Models section lists are gptlab's ------------------------------------

def listed_presets(text: str, presets: list[str]) -> list[str]:
    """The presets the first column of the Models section's table names, in order; a cell
    `a` … `b` names the presets from a to b in `presets`' order."""
    section = text.split("\n## Models\n", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cell = re.findall(r"`([^`]+)`", line.split("|")[1])
        if "…" in line.split("|")[1]:
            cell = presets[presets.index(cell[0]):presets.index(cell[-1]) + 1]
        names += cell
    return names


def test_the_models_section_lists_every_preset_and_no_other():
    from gptlab.model import PRESETS
    assert listed_presets((ROOT / "README.md").read_text(), list(PRESETS)) == list(PRESETS)


def test_a_preset_the_models_section_lists_that_is_gone_is_caught():
    text = "\n## Models\n\n| preset | shape |\n|---|---|\n| `a`, `b` | x |\n| `c` … `e` | y |\n"
    assert listed_presets(text, ["a", "b", "c", "d", "e"]) == ["a", "b", "c", "d", "e"]
    assert listed_presets(text.replace("`b`", "`gone`"), list("abcde")) != list("abcde")


def test_the_evaluation_s_module_docstrings_say_what_the_modules_do_now():
    # stats' said "Paired comparisons of two models on the same questions.", though the reward
    # model's interval is its clustered_rate; report's that any missing value reads n/a, though
    # an unset setting reads what it means, and it named neither corpus_ppl_pretrained, a line
    # only some report.json files have, nor the reward-model plot's intervals.
    from gptlab.eval import report, stats
    spans = set(re.findall(r"`([^`]+)`", stats.__doc__))
    assert {"paired_delta", "t_975", "sign_test", "clustered_rate"} <= spans
    assert "Student's t" in stats.__doc__ and "fixed seed" in stats.__doc__
    spans = set(re.findall(r"`([^`]+)`", report.__doc__))
    assert {"UNSET_MEANS", "corpus_ppl_pretrained", "stats.clustered_rate"} <= spans
    assert 'A result that is None (a stage that did not run) reads "n/a"' in \
        " ".join(report.__doc__.split())


# --- an example file README writes, and the commands it then runs, give what README shows ------

def example_files(text: str) -> list[tuple[str, str, str]]:
    """(file name, its Python, the shell block after it) for each "A file `NAME.py`" README
    gives in a Python block and then uses in a shell block."""
    found = []
    for m in re.finditer(r"A file `(\w+\.py)`[^\n]*:\n", text):
        python, shell = fenced_blocks(text[m.end():], ("python",))[0], \
            fenced_blocks(text[m.end():], ("bash",))[0]
        found.append((m.group(1), python, shell))
    return found


def run_example(name: str, python: str, shell: str, where: Path) -> list[tuple[str, str]]:
    """Write file `name` holding `python` in `where`, run `shell`'s lines there (`echo '...' >
    FILE`, `gptlab ...`, `cat FILE`): (what each `cat` is shown to print, in the `# ` lines after
    it, and what it prints), a line each."""
    from gptlab.cli import main
    (where / name).write_text(python + "\n")
    shown = []
    lines = shell.splitlines()
    for i, line in enumerate(lines):
        words = shlex.split(line, comments=True)
        if words[:1] == ["echo"] and words[-2] == ">":
            (where / words[-1]).write_text(" ".join(words[1:-2]) + "\n")
        elif words[:1] == ["gptlab"]:
            assert main(words[1:]) == 0, line
        elif words[:1] == ["cat"]:
            said = [x[2:] for x in lines[i + 1:]]
            said = said[:next((j for j, x in enumerate(lines[i + 1:])
                               if not x.startswith("# ")), len(said))]
            got = (where / words[1]).read_text().splitlines()
            shown += list(zip(said, got)) + [("", "")] * (len(said) != len(got))
    return shown


def test_every_example_file_the_readme_writes_gives_what_it_shows(tmp_path, monkeypatch):
    # README's rank function of your own was shown returning what label would refuse, and
    # nothing ran it.
    import json
    examples = example_files((ROOT / "README.md").read_text())
    assert [name for name, _, _ in examples] == ["myrank.py"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, python, shell in examples:
        shown = run_example(name, python, shell, tmp_path)
        assert shown and all(json.loads(said) == json.loads(got) for said, got in shown), shown


def test_an_example_file_that_gives_other_than_readme_shows_is_caught(tmp_path, monkeypatch):
    import json
    (name, python, shell), = example_files((ROOT / "README.md").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    reversed_scores = python.replace("return [", "return [-")  # the worst ranked first
    assert reversed_scores != python
    shown = run_example("myrank_reversed.py", reversed_scores,
                        shell.replace("myrank:", "myrank_reversed:"), tmp_path)
    assert shown and any(json.loads(said) != json.loads(got) for said, got in shown)
