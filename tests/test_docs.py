"""What the documentation shows is what gptlab has: every `gptlab ...` line of a shell block in
README.md and docs/ parses with the verb's own flags, and every Python example compiles and
imports names that exist."""
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
    assert stop.value.code == 2 and "unrecognized arguments: --frobnicate 3" in \
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
