"""Config verbs' flags, YAML files and overrides: types, null, and which value wins."""
import dataclasses
import importlib
import typing

import pytest

from gptlab.cli import VERBS, main
from gptlab.config import _flag_type

# verb -> (config class, the stage function the verb calls)
CONFIG_VERBS = {
    "pretrain": ("gptlab.train.pretrain.PretrainConfig", "gptlab.train.pretrain.pretrain"),
    "sft": ("gptlab.train.sft.SFTConfig", "gptlab.train.sft.sft"),
    "reward": ("gptlab.train.reward.RewardConfig", "gptlab.train.reward.train_reward_model"),
    "ppo": ("gptlab.train.ppo.PPOConfig", "gptlab.train.ppo.ppo"),
    "pipeline": ("gptlab.train.pipeline.PipelineConfig", "gptlab.train.pipeline.pipeline"),
}


def _load(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _optional_fields() -> list[tuple[str, str, type]]:
    """(verb, field, scalar type) for every `X | None` field of a config verb."""
    found = []
    for verb, (cls_path, _) in CONFIG_VERBS.items():
        cls = _load(cls_path)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if type(None) in typing.get_args(hints[f.name]):
                found.append((verb, f.name, _flag_type(hints[f.name])[0]))
    return found


OPTIONAL = _optional_fields()


def _verbs_with(flag: str) -> set[str]:
    import argparse

    from gptlab.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {verb for verb, p in sub.choices.items()
            if any(flag in a.option_strings for a in p._actions)}


def test_every_config_verb_is_covered_and_optional_fields_are_found():
    assert _verbs_with("--config") == set(CONFIG_VERBS) and set(CONFIG_VERBS) <= set(VERBS)
    names = {(verb, name) for verb, name, _ in OPTIONAL}
    assert {("pretrain", "max_steps"), ("pretrain", "block_size"), ("sft", "val_data"),
            ("ppo", "reward_fn"), ("pipeline", "sft_examples"), ("pipeline", "eval_limit"),
            ("pipeline", "threads")} <= names
    assert {tp for _, _, tp in OPTIONAL} == {int, float, str}


@pytest.fixture
def captured(monkeypatch):
    """Each config verb's stage replaced by one that keeps the config it was called with."""
    seen = {}
    for verb, (_, fn_path) in CONFIG_VERBS.items():
        module, name = fn_path.rsplit(".", 1)
        monkeypatch.setattr(importlib.import_module(module), name,
                            lambda cfg, verb=verb: seen.__setitem__(verb, cfg))
    return seen


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("verb, name, tp, value", [
    (*o, value) for o in OPTIONAL if o[2] is not str
    for value in ("abc", "", "0x10", *(("1.5",) if o[2] is int else ()))])
def test_a_bad_number_for_an_optional_field_is_one_line_naming_the_flag(verb, name, tp, value,
                                                                          captured, capsys):
    # `int | None` was a str flag: OmegaConf's "command line, field 'max_steps': Value '1.5' of
    # type 'str' could not be converted to Integer" named no flag.
    with pytest.raises(SystemExit) as e:
        main([verb, _flag(name), value])
    assert e.value.code == 2 and verb not in captured
    expected = "an integer" if tp is int else "a number"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"gptlab {verb}: error: argument {_flag(name)}: expected {expected}, or null for none; "
        f"got {value!r}")


@pytest.mark.parametrize("verb, name, tp", OPTIONAL)
def test_null_for_an_optional_field_is_none_over_the_config_files_value(verb, name, tp,
                                                                        captured, tmp_path):
    # `--sft-examples null` (use every demonstration) was refused: "Value 'null' of type 'str'
    # could not be converted to Integer"; only the override sft_examples=null reached None.
    value = {int: 3, float: 2.5, str: "x"}[tp]
    f = tmp_path / "c.yaml"
    f.write_text(f"{name}: {value}\n")
    assert main([verb, "--config", str(f)]) == 0
    assert getattr(captured[verb], name) == value
    assert main([verb, "--config", str(f), _flag(name), "null"]) == 0
    assert getattr(captured[verb], name) is None
    assert main([verb, "--config", str(f), f"{name}=null"]) == 0
    assert getattr(captured[verb], name) is None
    given = {int: "7", float: "0.5", str: "y"}[tp]
    assert main([verb, "--config", str(f), _flag(name), given]) == 0
    got = getattr(captured[verb], name)
    assert got == tp(given) and type(got) is tp


def test_pipeline_sft_examples_null_uses_every_demonstration(captured):
    from gptlab.train.pipeline import PipelineConfig
    assert PipelineConfig.sft_examples == 1500
    assert main(["pipeline", "--sft-examples", "null"]) == 0
    assert captured["pipeline"].sft_examples is None
    assert main(["pipeline"]) == 0
    assert captured["pipeline"].sft_examples == 1500
