"""Typed configs: dataclasses, loaded from YAML and overridden from the command line.

OmegaConf does the merging and the type checks; this module turns its errors into `UserError`s
that name the file, the line (a list item's own), the key path and the keys meant. An override's
key is checked before OmegaConf reads it: its field is its first part (`model` of
`model.n_layers=2`, `override_field`), and a key no field could have (`./seed=1`) is refused as
such; after a list flag the CLI reads that word as a path (`--data runs/seed=1`). A value the
config's stage would refuse (`seed: -1`) is refused here, by the config's `check_values`, naming
the flag, the override or the YAML line that wrote it.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException, ValidationError

from gptlab.errors import NotFound, UserError
from gptlab.io import utf8_lines

T = TypeVar("T")


def _valid_keys(cls: type, path: str) -> list[str]:
    node: Any = cls
    for part in [p for p in path.split(".")[:-1] if p]:
        hints = typing.get_type_hints(node)
        node = hints.get(part)
        if node is None or not dataclasses.is_dataclass(node):
            return []
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _keys_meant(key: str, valid: Sequence[str]) -> list[str]:
    """The valid keys an unknown `key` may have meant: the one it misspells (`max-steps`,
    `kl_coeff`), else those it begins or shares a word with (`clip`: `grad_clip`, `value_clip`),
    the closest first, else the few closest to it; at most four."""
    written = key.replace("-", "_").lower()
    typo = difflib.get_close_matches(written, valid, n=1, cutoff=0.8)
    if typo:
        return typo
    words = set(written.split("_")) - {""}
    related = [k for k in valid if k.startswith(written) or words & set(k.split("_"))]
    if related:
        def closeness(k: str) -> tuple[bool, float]:
            return not k.startswith(written), -difflib.SequenceMatcher(None, written, k).ratio()
        return sorted(related, key=closeness)[:4]  # sorted() keeps the fields' order in ties
    return difflib.get_close_matches(written, valid, n=3)


def _unknown_key(key: str, valid: Sequence[str], keys_help: str) -> str:
    """`unknown key 'clip_range'; did you mean 'clip', 'grad_clip' or 'value_clip'? (...)`: the
    keys meant, and where all are listed unless one alone is meant (not all ~40 on the line)."""
    meant = [f"'{k}'" for k in _keys_meant(key.split(".")[-1], valid)]
    said = f"unknown key '{key}'"
    if len(meant) == 1:
        return f"{said}; did you mean {meant[0]}?"
    if meant:
        return f"{said}; did you mean {', '.join(meant[:-1])} or {meant[-1]}? ({keys_help})"
    return f"{said}; {keys_help}"


# A key as an override writes it: a field's name, then a nested one's (`model.n_layers`) or an
# item's (`data[0]`); dashes too (`max-steps`), which the unknown-key hint corrects.
_KEY = re.compile(r"[A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*")


def override_field(item: str) -> str | None:
    """The field a `key=value` override sets (`model` of `model.n_layers=2`, the value may hold
    '=' too); None if `item` is no override: no '=', or a key no field has the form of
    (`runs/seed=1`, `./x=1`: a path)."""
    key, eq, _ = item.partition("=")
    return re.split(r"[.\[]", key, maxsplit=1)[0] if eq and _KEY.fullmatch(key) else None


def _check_override_key(cls: type, item: str, command: str | None) -> None:
    """Refuse an override whose key no field can have (OmegaConf said `Key '' not in
    'PretrainConfig'` of `./seed=1`), or that sets a key inside a field of one value
    (`lr.x=1`, `model.n_layers=2`: OmegaConf said the field got a mapping)."""
    key = item.split("=", 1)[0]
    field = override_field(item)
    if field is None:
        raise UserError(f"override '{item}': '{key}' is not a key; a key is a field's name "
                        f"({_keys_help(cls, command)})", path="command line")
    hint = typing.get_type_hints(cls).get(field)
    tp, is_list = _flag_type(hint) if hint is not None else (None, False)
    if key != field and hint is not None and not is_list and not dataclasses.is_dataclass(tp):
        takes = f" ({_expected(hint)})" if _expected(hint) else ""
        raise UserError(f"unknown key '{key}': '{field}' is one value{takes}, not a group of "
                        f"keys; write {field}=VALUE", path="command line", field=key)


def _keys_help(cls: type, command: str | None) -> str:
    """Where the keys of `cls` are listed: the verb's --help, or the dataclass itself."""
    return f"`{command} --help` lists the keys" if command else \
        f"the fields of {cls.__name__} are the keys"


def _config_error(cls: type, err: OmegaConfBaseException, source: str | Path,
                  data: dict | None = None, lines: dict[str, int] | None = None,
                  command: str | None = None) -> UserError:
    """OmegaConf's error as one line naming `source` (the file, at the key's line in `lines`,
    or "command line") and the key; an unknown key names the keys meant (`command`'s --help
    lists them all), a wrong type says what the field takes and what it got from `data`
    (OmegaConf's "Value 'x' of type 'str' could not be converted to Integer")."""
    key = str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")
    # A merge error (a value where a nested config goes) has no msg: its text says it.
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    if "not in" in msg and key:
        msg = _unknown_key(key, _valid_keys(cls, key), _keys_help(cls, command))
    elif isinstance(err, ValidationError):
        top = re.split(r"[.\[]", key, maxsplit=1)[0]
        expected = _expected(typing.get_type_hints(cls).get(top))
        if expected and isinstance(err, InterpolationResolutionError):
            written = (data or {}).get(top)
            msg = f"{written!r} gives {_shown(err.value)}; expected {expected}"
        elif expected:
            msg = f"expected {expected}, got {_shown(err.value)}"
    line = (lines or {}).get(key) or (lines or {}).get(key.split("[")[0])
    return UserError(msg, path=source, line=line, field=key or None)


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _expected(hint: Any) -> str | None:
    """What a field of type `hint` takes, in words: "an integer, or null"; None if unknown."""
    if hint is None:
        return None
    tp, is_list = _flag_type(hint)
    if tp not in _NAMES:
        return None
    what = f"a list of {_NAMES[tp].split(' ', 1)[1]}s" if is_list and tp is not bool else \
        _NAMES[tp]
    return what + (", or null" if type(None) in typing.get_args(hint) else "")


def _shown(value: Any) -> str:
    """A YAML value as a message names it: null, true, 'text', a list [1, 2], a mapping {...}."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value) if isinstance(value, (str, list, dict)) else str(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"a list {text}" if isinstance(value, list) else \
        f"a mapping {text}" if isinstance(value, dict) else text


def _key_lines(text: str, source: str | Path = "config") -> dict[str, int]:
    """The line of each key of a YAML mapping, nested keys dotted (`a.b`), and of each item of
    a list, by its index (`data[1]`), as OmegaConf names them; a key brought by a merge (`<<`)
    has none. A value holding itself (`x: &a {y: *a}`) is refused, naming its key: OmegaConf
    recursed on it until Python's stack ran out."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str, inside: frozenset[int], record: bool = True) -> None:
        if id(node) in inside:
            raise UserError("holds itself (an alias inside the anchor it names); a config is "
                            "a tree of values", path=source, line=lines.get(path), field=path)
        inside = inside | {id(node)}
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    at = f"{path}.{key.value}" if path else key.value
                    if record:
                        lines.setdefault(at, key.start_mark.line + 1)
                    walk(value, at, inside, record)
                else:  # a merge's keys have no line of their own; it may still hold itself
                    walk(value, path, inside, record=False)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                if path and record:
                    lines.setdefault(f"{path}[{i}]", item.start_mark.line + 1)
                walk(item, f"{path}[{i}]", inside, record and bool(path))
    walk(yaml.compose(text, Loader=yaml.SafeLoader), "", frozenset())
    return lines


def _syntax_error(e: yaml.YAMLError, text: str, path: Path) -> UserError:
    """PyYAML's error (five lines, of "<unicode string>") as one naming the file, the line and
    the column, and the key on that line: `c.yaml:2:7, field 'lr': not valid YAML: expected ','
    or ']', but got '<stream end>' (while parsing a flow sequence at line 2, column 5)`."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem, context = getattr(e, "problem", None), getattr(e, "context", None)
    if isinstance(e, yaml.reader.ReaderError):  # a control character, by its offset
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        return UserError(f"not valid YAML: character #x{e.character:04x}: {e.reason}",
                         path=path, line=line, column=column)
    if mark is None or problem is None:
        return UserError(f"not valid YAML: {' '.join(str(e).split())}", path=path)
    said = problem
    if context and problem.startswith("but "):  # "expected a single document ..., but found"
        said = f"{context}, {problem}"
    elif context:
        start = getattr(e, "context_mark", None)
        where = "" if start is None or (start.line, start.column) == (mark.line, mark.column) \
            else f" at line {start.line + 1}, column {start.column + 1}"
        said += f" ({context}{where})"
    lines = text.split("\n")
    on_line = re.match(r"\s*(?:-\s+)*([A-Za-z_][\w.-]*)\s*:(\s|$)",
                       lines[mark.line] if mark.line < len(lines) else "")
    return UserError(f"not valid YAML: {said}", path=path, line=mark.line + 1,
                     column=mark.column + 1, field=on_line.group(1) if on_line else None)


def _unreadable_at(text: str) -> tuple[str | None, int | None]:
    """The key and line of the first top-level value YAML parses but Python cannot build."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    for key, value in root.value if isinstance(root, yaml.MappingNode) else ():
        try:
            yaml.SafeLoader("").construct_document(value)
        except ValueError:
            return (key.value if isinstance(key, yaml.ScalarNode) else None,
                    value.start_mark.line + 1)
        except yaml.YAMLError:
            continue
    return None, None


def _check_lists(cls: type, data: dict, source: str, fix: str,
                 lines: dict[str, int] | None = None) -> None:
    """Refuse a value that is not a list for a list field, naming it and showing the list to
    write: OmegaConf reports a single value there as an `AnyNode`, and a mapping
    (`data: {train: corpus.txt}`) as a bare TypeError. Refuse an item that is no single value
    too, which OmegaConf lets through (`data: [a.txt, [b.txt]]`)."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in hints or value is None or not _flag_type(hints[key])[1]:
            continue
        line = (lines or {}).get(key)
        if isinstance(value, list):
            for i, item in enumerate(value):
                if item is None or isinstance(item, (list, dict)):
                    raise UserError(f"item {i} is {_shown(item)}; expected "
                                    f"{_NAMES.get(_flag_type(hints[key])[0], 'a value')}",
                                    path=source, line=(lines or {}).get(f"{key}[{i}]", line),
                                    field=key)
            continue
        if isinstance(value, dict):
            got, item = f"a mapping ({value})", "ITEM, ..."
        else:
            got, item = f"the single {type(value).__name__} {value!r}", value
        raise UserError(f"must be a list, got {got}; write " + fix.format(key=key, item=item),
                        path=source, line=line, field=key)


def _scalar_texts(text: str) -> dict[str, str]:
    """The text as written of each top-level scalar value of the YAML mapping `text`, and of
    each scalar item of a top-level list (`data[1]`); {} for text YAML does not compose."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return {}
    written: dict[str, str] = {}
    for key, value in node.value if isinstance(node, yaml.MappingNode) else ():
        if not isinstance(key, yaml.ScalarNode):
            continue
        if isinstance(value, yaml.ScalarNode):
            written[key.value] = value.value
        elif isinstance(value, yaml.SequenceNode):
            written.update({f"{key.value}[{i}]": item.value for i, item in enumerate(value.value)
                            if isinstance(item, yaml.ScalarNode)})
    return written


def _check_texts(cls: type, data: dict, source: str, written: dict[str, str],
                 lines: dict[str, int] | None = None) -> None:
    """Refuse a value of a text field (or an item of a list of texts) that YAML read as
    something else and would give back as other text: `yes` (true, "True"), `0x10` (16),
    `12:30` (750), `1_000` (1000). OmegaConf turned each into a string silently. A number
    written as its own text (`out: 2024`) is that text, and passes; `written` holds each
    value's text as written (`_scalar_texts`)."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in hints or _flag_type(hints[key])[0] is not str:
            continue
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] \
            if isinstance(value, list) else [(key, value)]
        for name, item in items:
            if item is None or isinstance(item, (str, list, dict)):
                continue
            raw = written.get(name)
            if not isinstance(item, bool) and raw is not None and str(item) == raw:
                continue
            kind = "a boolean" if isinstance(item, bool) else \
                "a number" if isinstance(item, (int, float)) else f"a {type(item).__name__}"
            how = f"reads {raw} as {kind}, {_shown(item)}; quote it, '{raw}'," if raw is not None \
                else f"read it as {kind}, {_shown(item)}; quote it"
            raise UserError(f"expected a string, but YAML {how} to give it as text",
                            path=source, line=(lines or {}).get(name, (lines or {}).get(key)),
                            field=key)


def _missing_at(data: Any, prefix: str = "") -> str | None:
    """The key (`policy`, `data[1]`) of the first value `???` in `data`: OmegaConf's mark of a
    mandatory value not given yet, which a merge passes over, leaving the default in place."""
    items = enumerate(data) if isinstance(data, list) else \
        data.items() if isinstance(data, dict) else ()
    for k, value in items:
        key = f"{prefix}[{k}]" if isinstance(data, list) else f"{prefix}.{k}" if prefix else str(k)
        if isinstance(value, str) and value == "???":
            return key
        found = _missing_at(value, key)
        if found is not None:
            return found
    return None


def _check_missing(data: Any, source: str | Path, lines: dict[str, int] | None = None,
                   flags: bool = False) -> None:
    """Refuse a value `???` in `data` (of the file `source`, of overrides, or of `flags`),
    naming its key and the line that wrote it."""
    key = _missing_at(data)
    if key is not None:
        line = (lines or {}).get(key) or (lines or {}).get(key.split("[")[0])
        what = "the item" if key.endswith("]") else \
            "--" + key.replace("_", "-") if flags else "the key"
        if flags:  # named by its flag, as any other value a flag gave
            key = "--" + key.split("[")[0].replace("_", "-")
            raise UserError(f"??? is OmegaConf's missing value; give a value or leave {what} "
                            f"out", field=key)
        raise UserError(f"??? is OmegaConf's missing value; give a value or leave {what} out",
                        path=source, line=line, field=key)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    value, so `seed: 1` above a forgotten `seed: 2` would run with 2, silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<`: its values may be overridden
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(f"the key '{key}' is given twice (lines {seen[key]} and "
                                        f"{line}); keep one", line)
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep)


def _unreadable(e: ValueError) -> str:
    """Why YAML's constructors could not build a value: a date that does not exist (2024-13-01),
    or an integer longer than Python reads (whose own message advises a Python call)."""
    if "integer string conversion" in str(e):
        return (f"an integer of more than {sys.get_int_max_str_digits()} digits; write it as a "
                f"string")
    return str(e)


# A config's values are numbers, texts, or lists of them: lists nested deeper than this are
# refused before OmegaConf, which recurses into them, reads them.
MAX_DEPTH = 20
_TOO_DEEP = (f"nested too deeply (lists or mappings more than {MAX_DEPTH} levels inside one "
             f"another; a config's values are numbers, texts, or lists of them)")


def _depth(value: Any) -> int:
    """How many lists or mappings deep `value` is nested (0: a scalar), counted without
    recursion, as far as MAX_DEPTH + 1."""
    depth, level = 0, [value]
    while level and depth <= MAX_DEPTH:
        level = [v for x in level if isinstance(x, (list, dict))
                 for v in (x.values() if isinstance(x, dict) else x)]
        depth += 1 if level else 0
    return depth


def load_config(cls: type[T], yaml_path: str | Path | None = None,
                overrides: Sequence[str] = (), command: str | None = None,
                origins: dict[str, UserError] | None = None, **values: Any) -> T:
    """Build `cls` from its defaults, then a YAML file, then `key=value` overrides, then `values`,
    and check its values (`_check_values`).

    `values` are explicit command-line flags; a value of None means "not given". `command`
    (`gptlab ppo`) is the one whose --help an error points to. `origins`, a dict, gets for each
    field a layer wrote where its value came from, as the UserError that names it (`--seed`;
    `command line, field 'seed'`; `pt.yaml:3, field 'seed'`; `.message` left empty): what a
    stage's later check of the value names instead of the bare field.
    """
    conf = OmegaConf.structured(cls)
    data: dict = {}
    lines: dict[str, int] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.exists():
            raise NotFound("config file not found", path=path)
        # utf8_lines refuses a directory, and a byte that is not UTF-8 by its line.
        text = "\n".join(line for _, line in utf8_lines(path))
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a safe loader
        except _DuplicateKey as e:
            raise UserError(str(e), path=path, line=e.line) from None
        except yaml.YAMLError as e:
            raise _syntax_error(e, text, path) from None
        except ValueError as e:  # a value YAML parses but Python cannot build
            key, line = _unreadable_at(text)
            raise UserError(f"a value cannot be read: {_unreadable(e)}", path=path, line=line,
                            field=key) from None
        except RecursionError:  # nested deeper than the YAML reader recurses
            raise UserError(f"cannot be read: {_TOO_DEEP}", path=path) from None
        if not isinstance(data, dict):
            raise UserError("a config file must be a mapping of keys to values", path=path)
        lines = _key_lines(text, path)
        for key, value in data.items():
            if _depth(value) > MAX_DEPTH:  # OmegaConf recurses into it (a traceback past 90)
                raise UserError(f"the value is {_TOO_DEEP}", path=path, line=lines.get(key),
                                field=key)
        _check_lists(cls, data, str(path), "{key}: [{item}]", lines)
        _check_texts(cls, data, str(path), _scalar_texts(text), lines)
        try:
            conf = OmegaConf.merge(conf, OmegaConf.create(data))
        except OmegaConfBaseException as e:
            raise _config_error(cls, e, path, data, lines, command) from None
        _check_missing(data, path, lines)
    for item in overrides:
        if "=" not in item:  # a stray word: of a value that holds spaces, or of a flag
            listed = f"; `{command} --help` lists the keys" if command else ""
            # `sft --data a.jsonl b.jsonl`, as a shell's glob gives them: the second file.
            path = (f"; {item!r} is a path: a flag that reads one file or directory takes a "
                    f"directory of several files instead" if os.path.exists(item) else "")
            raise UserError(f"override '{item}' should look like key=value (quote a value that "
                            f"holds spaces; flags start with --{listed}){path}",
                            path="command line")
        _check_override_key(cls, item, command)
        try:  # OmegaConf reads the value as YAML, and lets its errors through
            OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except RecursionError:
            raise UserError(f"override '{item[:60]}{'...' if len(item) > 60 else ''}': the value "
                            f"is {_TOO_DEEP}", path="command line",
                            field=item.split("=", 1)[0]) from None
        except yaml.YAMLError as e:
            raise UserError(f"override '{item[:60]}{'...' if len(item) > 60 else ''}': the value "
                            f"is not valid YAML ({getattr(e, 'problem', None) or e})",
                            path="command line",
                            field=item.split("=", 1)[0]) from None
        except ValueError as e:
            raise UserError(f"override '{item[:60]}{'...' if len(item) > 60 else ''}': the value "
                            f"cannot be read ({_unreadable(e)})", path="command line",
                            field=item.split("=", 1)[0]) from None
    # None is "not given"; NULL (`--max-steps null`) is None given, over the YAML's value.
    given = {k: None if v is NULL else v for k, v in values.items() if v is not None}
    typed: dict = {}
    try:
        if overrides:
            dotlist = OmegaConf.from_dotlist(list(overrides))
            typed = OmegaConf.to_container(dotlist)  # type: ignore[assignment]
            _check_lists(cls, typed, "command line", "{key}=[{item}]")
            _check_texts(cls, typed, "command line", _scalar_texts("\n".join(
                ": ".join(item.split("=", 1)) for item in overrides)))
            conf = OmegaConf.merge(conf, dotlist)
            _check_missing(typed, "command line")
        if given:
            _check_missing(given, "command line", flags=True)
            conf = OmegaConf.merge(conf, OmegaConf.create(given))
    except OmegaConfBaseException as e:
        raise _config_error(cls, e, "command line", {**typed, **given}, command=command) \
            from None
    try:  # interpolations (`${lr}`) are resolved here: blame the layer that wrote the key
        config = OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "").split(".")[0].split("[")[0]
        if yaml_path is not None and key in data and key not in typed and key not in given:
            raise _config_error(cls, e, Path(yaml_path), data, lines, command) from None
        raise _config_error(cls, e, "command line", {**typed, **given}, command=command) \
            from None
    _check_values(config, yaml_path, data, lines, typed, given)
    if origins is not None:
        origins.update({key: _named_where(key, "", yaml_path, data, lines, typed, given)
                        for key in {**data, **typed, **given}})
    return config  # type: ignore[return-value]


def _named_where(key: str, message: str, yaml_path: str | Path | None, data: dict,
                 lines: dict[str, int], typed: dict, given: dict) -> UserError:
    """`message` about field `key` naming the layer that wrote its value: its flag (`--seed`),
    the override's key on the command line, or the YAML file, line and key; a value no layer
    wrote (a default that another value makes impossible) as the field alone."""
    if key in given:
        return UserError(message, field="--" + key.replace("_", "-"))
    if key in typed:
        return UserError(message, path="command line", field=key)
    if yaml_path is not None and key in data:
        return UserError(message, path=yaml_path, line=lines.get(key), field=key)
    return UserError(message, field=key)


def _check_values(config: Any, yaml_path: str | Path | None, data: dict, lines: dict[str, int],
                  typed: dict, given: dict) -> None:
    """Run the config's own checks of its values (`check_values`, where it has them: the rules
    its stage refuses a run by, a seed below 0, a batch of 0, a share outside [0, 1]) now,
    before the stage reads or writes anything, naming who wrote the value refused: its flag
    (`--seed`), the override's key on the command line, or the YAML file, line and key. A
    value no layer wrote (a default that another value makes impossible) is named as a field
    alone, as the stage would."""
    check = getattr(config, "check_values", None)
    if not callable(check):
        return
    try:
        check()
    except UserError as e:
        if e.path is not None or e.field is None:
            raise
        raise _named_where(e.field, e.message, yaml_path, data, lines, typed, given) from None


def _flag_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) for a dataclass field annotation; `int | None` is int."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    # `int | None` is a types.UnionType, `Optional[int]` a typing.Union.
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin in (list, tuple, Sequence):
        return (args[0] if args else str), True
    return tp, False


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a `--field-name` flag for each scalar or list field of a dataclass config.

    Every flag defaults to None so `load_config` can tell "not given" from a value.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_list = _flag_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = _with_default(_field_help(cls, f.name), f)
        scalar = tp if tp in (int, float) else str
        if tp is bool and not is_list:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif is_list:
            parser.add_argument(flag, dest=f.name, nargs="+", type=tp, default=None, help=help_text)
        elif type(None) in typing.get_args(hints[f.name]):
            parser.add_argument(flag, dest=f.name, type=_or_null(scalar), default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=scalar, default=None, help=help_text)


def _field_help(cls: type, name: str) -> str:
    """The help of field `name` of dataclass `cls`: its own, else that of the first base class
    giving one (a stage that only changes a shared setting's default, SFT's lr, keeps its help)."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return f.metadata["help"]
    return ""


class _Null:
    """The value of `--field null`: None given, which the flag left out (None too) is not."""

    def __repr__(self) -> str:
        return "null"


NULL = _Null()
_EXPECTED = {int: "an integer", float: "a number"}


def _or_null(tp: type) -> Callable[[str], Any]:
    """An optional field's flag type: `null` (as YAML and `key=null` write it) is NULL, anything
    else a `tp`; argparse reports a bad value as `argument --flag: expected ...`, exit 2."""
    def convert(text: str) -> Any:
        if text in ("null", "Null", "NULL"):
            return NULL
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {_EXPECTED[tp]}, or null for none; got {text!r}") from None
    return convert


def _with_default(help_text: str, f: dataclasses.Field) -> str:
    """The field's default in its help (the flag itself defaults to None, see above)."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    else:
        return (help_text + " " if help_text else "") + "(required)"
    if default is None or default == "" or default == [] or default == ():
        return help_text
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    return (help_text + " " if help_text else "") + f"(default: {shown})".replace("%", "%%")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build `cls` from parsed args: `--config FILE`, the dataclass flags, and `key=value`
    extras."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    verb = getattr(args, "verb", None)
    if values.get("resume") is False and values.get("resume_from") is not None:
        # --resume-from resumes: with --no-resume the run would resume all the same.
        raise UserError("--resume-from resumes from a checkpoint, and --no-resume says not to "
                        "resume; drop one", field="--no-resume")
    origins: dict[str, UserError] = {}
    config = load_config(cls, getattr(args, "config", None),
                         getattr(args, "overrides", None) or (),
                         f"gptlab {verb}" if verb else None, origins, **values)
    args._origins = origins  # for the command line to name a later error's field by its origin
    return config
