"""Typed configs: dataclasses, loaded from YAML and overridden from the command line.

OmegaConf does the merging and the type checks; this module turns its errors into `UserError`s
that name the file, the key path and the closest valid key.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gptlab.errors import UserError
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


def _config_error(cls: type, err: OmegaConfBaseException, source: str) -> UserError:
    key = str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")
    msg = str(getattr(err, "msg", err)).splitlines()[0]
    if "not in" in msg and key:
        close = difflib.get_close_matches(key.split(".")[-1], _valid_keys(cls, key), n=1)
        msg = f"unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else "")
        valid = _valid_keys(cls, key)
        if not close and valid:
            msg += f"; valid keys: {', '.join(valid)}"
    return UserError(msg, path=source, field=key or None)


def _check_lists(cls: type, data: dict, source: str, fix: str) -> None:
    """Refuse a value that is not a list for a list field, naming it and showing the list to
    write: OmegaConf reports a single value there as an `AnyNode`, and a mapping
    (`data: {train: corpus.txt}`) as a bare TypeError."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in hints or value is None or isinstance(value, list):
            continue
        if not _flag_type(hints[key])[1]:
            continue
        if isinstance(value, dict):
            got, item = f"a mapping ({value})", "ITEM, ..."
        else:
            got, item = f"the single {type(value).__name__} {value!r}", value
        raise UserError(f"must be a list, got {got}; write " + fix.format(key=key, item=item),
                        path=source, field=key)


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


def load_config(cls: type[T], yaml_path: str | Path | None = None,
                overrides: Sequence[str] = (), **values: Any) -> T:
    """Build `cls` from its defaults, then a YAML file, then `key=value` overrides, then `values`.

    `values` are explicit command-line flags; a value of None means "not given".
    """
    conf = OmegaConf.structured(cls)
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.exists():
            raise UserError("config file not found", path=path)
        # utf8_lines refuses a directory, and a byte that is not UTF-8 by its line.
        text = "\n".join(line for _, line in utf8_lines(path))
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a safe loader
        except _DuplicateKey as e:
            raise UserError(str(e), path=path, line=e.line) from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise UserError(f"not valid YAML: {e}", path=path,
                            line=None if line is None else line + 1) from None
        except ValueError as e:  # a value YAML parses but Python cannot build
            raise UserError(f"a value cannot be read: {_unreadable(e)}", path=path) from None
        if not isinstance(data, dict):
            raise UserError("a config file must be a mapping of keys to values", path=path)
        _check_lists(cls, data, str(path), "{key}: [{item}]")
        try:
            conf = OmegaConf.merge(conf, OmegaConf.create(data))
        except OmegaConfBaseException as e:
            raise _config_error(cls, e, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' should look like key=value", path="command line")
        try:  # OmegaConf reads the value as YAML, and lets its errors through
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:
            raise UserError(f"override '{item}': the value is not valid YAML "
                            f"({getattr(e, 'problem', None) or e})", path="command line",
                            field=item.split("=", 1)[0]) from None
        except ValueError as e:
            raise UserError(f"override '{item[:60]}{'...' if len(item) > 60 else ''}': the value "
                            f"cannot be read ({_unreadable(e)})", path="command line",
                            field=item.split("=", 1)[0]) from None
    try:
        if overrides:
            dotlist = OmegaConf.from_dotlist(list(overrides))
            _check_lists(cls, OmegaConf.to_container(dotlist), "command line", "{key}=[{item}]")
            conf = OmegaConf.merge(conf, dotlist)
        # None is "not given"; NULL (`--max-steps null`) is None given, over the YAML's value.
        given = {k: None if v is NULL else v for k, v in values.items() if v is not None}
        if given:
            conf = OmegaConf.merge(conf, OmegaConf.create(given))
        return OmegaConf.to_object(conf)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _config_error(cls, e, "command line") from None


def to_dict(config: Any) -> dict:
    """A plain dict of a dataclass config (for config.json / run.json)."""
    return dataclasses.asdict(config)


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


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """Add a `--field-name` flag for each scalar or list field of a dataclass config.

    Every flag defaults to None so `load_config` can tell "not given" from a value.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, is_list = _flag_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") if f.metadata else ""
        help_text = _with_default(help_text, f)
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
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", None) or (),
                       **values)
