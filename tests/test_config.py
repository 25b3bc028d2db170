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
    "finetune": ("gptlab.train.finetune.FinetuneConfig", "gptlab.train.finetune.finetune"),
    "seq2seq": ("gptlab.train.seq2seq.Seq2SeqConfig", "gptlab.train.seq2seq.seq2seq"),
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


@pytest.fixture
def unchecked(monkeypatch):
    """The config verbs' value checks left out: a test of which layer wins gives each field
    values no stage would take (`kl_estimator: yaml`)."""
    for cls_path, _ in CONFIG_VERBS.values():
        monkeypatch.setattr(_load(cls_path), "check_values", lambda self: None)


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
    assert capsys.readouterr().err == (
        f"gptlab {verb}: error: argument {_flag(name)}: expected {expected}, or null for none; "
        f"got {value!r}\n")


@pytest.mark.parametrize("argv, said", [
    (["generate", "--model", "m", "--prompt", "p", "--top-k", "1.5"],
     "gptlab generate: error: argument --top-k: invalid int value: '1.5'"),
    (["pipeline", "--rounds", "two"], "gptlab pipeline: error: argument --rounds: invalid int "
                                      "value: 'two'"),
    (["chat", "--model", "m", "--greedy", "--temperature", "1"],
     "gptlab chat: error: argument --temperature: not allowed with argument --greedy")])
def test_a_flags_bad_value_is_one_line_without_the_usage(argv, said, capsys):
    # A config verb's usage, every flag of it, was 25 lines above the one that named the flag.
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == said + "\n"


@pytest.mark.parametrize("verb, name, tp", OPTIONAL)
def test_null_for_an_optional_field_is_none_over_the_config_files_value(verb, name, tp,
                                                                        captured, unchecked,
                                                                        tmp_path):
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


def _layers(tp: type, is_list: bool, default) -> tuple:
    """(YAML value, override text, flag arguments, flag value): each of a field's layers gives it
    another value, so that which one won shows."""
    if is_list:
        return ["y1.txt", "y2.txt"], "[o1.txt,o2.txt]", ["f1.txt", "f2.txt"], ["f1.txt", "f2.txt"]
    if tp is bool:  # YAML flips the default, the override flips it back, the flag (--x or
        return not default, str(default).lower(), [], not default  # --no-x) flips it again
    return {int: (11, "12", ["13"], 13), float: (0.25, "0.5", ["0.75"], 0.75),
            str: ("yaml", "override", ["flag"], "flag")}[tp]


def _fields(verb: str):
    """(name, flag, type, is_list, default) of each field of the verb's config."""
    cls = _load(CONFIG_VERBS[verb][0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_list = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield f.name, _flag(f.name), tp, is_list, default


def _flag_args(name: str, tp: type, default, args: list) -> list[str]:
    if tp is bool:  # the flag that sets what the YAML file set: not the default
        return [_flag(name) if default is False else "--no-" + _flag(name)[2:]]
    return [_flag(name), *args]


@pytest.mark.parametrize("verb", CONFIG_VERBS)
def test_later_layers_win_for_every_field_of_every_config_verb(verb, captured, unchecked,
                                                               tmp_path):
    # README: "Later values win: defaults, then the YAML file, then key=value overrides, then
    # flags" -- held for each field, scalar, optional, bool (--x / --no-x) and list alike.
    import yaml
    fields = list(_fields(verb))
    layers = {name: _layers(tp, is_list, default) for name, _, tp, is_list, default in fields}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({name: layer[0] for name, layer in layers.items()}))
    overrides = [f"{name}={layer[1]}" for name, layer in layers.items()]
    # A list flag last: the overrides after it are argparse's values for it, handed back.
    flags = [a for name, _, tp, _, default in sorted(fields, key=lambda f: f[3])
             for a in _flag_args(name, tp, default, layers[name][2])]

    assert main([verb]) == 0
    assert {n: getattr(captured[verb], n) for n in layers} == {
        name: default for name, _, _, _, default in fields}
    assert main([verb, "--config", str(f)]) == 0
    assert {n: getattr(captured[verb], n) for n in layers} == {
        n: layer[0] for n, layer in layers.items()}
    assert main([verb, "--config", str(f), *overrides]) == 0
    got = {n: getattr(captured[verb], n) for n in layers}
    for name, _, tp, is_list, default in fields:
        expected = (["o1.txt", "o2.txt"] if is_list else default if tp is bool
                    else tp(layers[name][1]))
        assert got[name] == expected, name
    # Flags win whichever side of the overrides they stand (a list flag's values end where an
    # override starts: `--data a.txt lr=1e-3`).
    for argv in ([*flags, *overrides], [*overrides, *flags]):
        assert main([verb, "--config", str(f), *argv]) == 0
        assert {n: getattr(captured[verb], n) for n in layers} == {
            n: layer[3] for n, layer in layers.items()}, argv


@pytest.mark.parametrize("verb", CONFIG_VERBS)
def test_an_unknown_key_in_a_config_file_names_the_file_the_key_and_the_closest_key(
        verb, captured, tmp_path, capsys):
    name = [n for n, *_ in _fields(verb)][-1]
    f = tmp_path / "c.yaml"
    for key in (name + "x", name.replace("_", "-")):
        if key == name:
            continue
        f.write_text(f"{key}: 1\n")
        assert main([verb, "--config", str(f)]) == 2 and verb not in captured
        assert capsys.readouterr().err == (f"gptlab {verb}: error: {f}:1, field '{key}': unknown "
                                           f"key '{key}'; did you mean '{name}'?\n")
    f.write_text("zzzzzz: 1\n")
    assert main([verb, "--config", str(f)]) == 2
    assert capsys.readouterr().err == (f"gptlab {verb}: error: {f}:1, field 'zzzzzz': unknown "
                                       f"key 'zzzzzz'; `gptlab {verb} --help` lists the keys\n")


@pytest.mark.parametrize("verb, key, said", [
    # The line listed every key (~40) when no single key was close.
    ("ppo", "clip_range", "did you mean 'clip', 'grad_clip' or 'value_clip'? (`gptlab ppo "
                          "--help` lists the keys)"),
    ("pipeline", "lr", "did you mean 'sft_lr', 'ppo_lr', 'reward_lr' or 'pretrain_lr'? "
                       "(`gptlab pipeline --help` lists the keys)"),
    ("pipeline", "steps", "did you mean 'sft_steps', 'ppo_steps' or 'pretrain_steps'? "
                          "(`gptlab pipeline --help` lists the keys)"),
    ("sft", "max", "did you mean 'max_steps', 'max_minutes' or 'max_new_tokens'? (`gptlab sft "
                   "--help` lists the keys)"),
    ("pretrain", "lr_min", "did you mean 'lr' or 'min_lr_ratio'? (`gptlab pretrain --help` "
                           "lists the keys)"),
    ("ppo", "gamma", "did you mean 'gae_gamma'?"),
    ("ppo", "clip-range", "did you mean 'clip', 'grad_clip' or 'value_clip'? (`gptlab ppo "
                          "--help` lists the keys)"),  # its words are split at the dash too
    ("ppo", "temp", "did you mean 'temperature'?"),  # begins it, shares no word
    ("ppo", "Seed", "did you mean 'seed'?"),
    ("sft", "max_step", "did you mean 'max_steps'?"),
    ("pipeline", "clip", "`gptlab pipeline --help` lists the keys")])
def test_an_unknown_key_names_the_keys_it_begins_or_shares_a_word_with_not_every_key(
        verb, key, said, captured, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(f"seed: 1\n{key}: 1\n")
    assert main([verb, "--config", str(f)]) == 2 and verb not in captured
    assert capsys.readouterr().err == (f"gptlab {verb}: error: {f}:2, field '{key}': unknown "
                                       f"key '{key}'; {said}\n")
    assert main([verb, f"{key}=1"]) == 2 and verb not in captured
    assert capsys.readouterr().err == (f"gptlab {verb}: error: command line, field '{key}': "
                                       f"unknown key '{key}'; {said}\n")


def test_an_unknown_key_given_to_load_config_points_to_the_dataclass():
    from gptlab.config import load_config
    from gptlab.errors import UserError
    from gptlab.train.ppo import PPOConfig
    with pytest.raises(UserError) as e:
        load_config(PPOConfig, None, ["zzzzzz=1"])
    assert str(e.value) == ("command line, field 'zzzzzz': unknown key 'zzzzzz'; the fields of "
                            "PPOConfig are the keys")
    with pytest.raises(UserError) as e:
        load_config(PPOConfig, None, ["kl=1"])
    assert str(e.value) == ("command line, field 'kl': unknown key 'kl'; did you mean 'kl_coef', "
                            "'kl_horizon', 'kl_estimator' or 'target_kl'? (the fields of "
                            "PPOConfig are the keys)")


@pytest.mark.parametrize("verb, flag, typos", [
    ("pretrain", "--data", ("max_step=5", "max-steps=5", "seeds=1")),
    ("ppo", "--ptx-data", ("kl_coeff=0.1", "seeds=1"))])
def test_a_misspelled_override_after_a_list_flag_is_an_unknown_key_not_a_file(
        verb, flag, typos, captured, tmp_path, capsys, monkeypatch):
    # `--data corpus.txt max_step=5` read max_step=5 as a corpus file: "max_step=5, field
    # 'data': corpus file not found", the typo unnamed.
    monkeypatch.chdir(tmp_path)
    for typo in typos:
        key = typo.split("=")[0]
        assert main([verb, flag, "a.txt", typo]) == 2 and verb not in captured
        err = capsys.readouterr().err
        assert err.startswith(f"gptlab {verb}: error: command line, field '{key}': unknown key "
                              f"'{key}'; did you mean '"), err
    # A file of that name is a file; a name close to no field is one too.
    (tmp_path / "seeds=1").write_text("x")
    assert main([verb, flag, "a.txt", "seeds=1", "b=c.txt", "seed=3"]) == 0
    cfg = captured[verb]
    assert getattr(cfg, flag[2:].replace("-", "_")) == ["a.txt", "seeds=1", "b=c.txt"]
    assert cfg.seed == 3


def test_a_list_flags_value_is_an_override_by_its_keys_field(captured, tmp_path, capsys,
                                                              monkeypatch):
    # A path holding '=' is a file though its name ends close to a field's ("unknown key
    # 'runs/seed'; did you mean 'seed'?", "Key '' not in 'PretrainConfig'" of ./seed=1); a value
    # holding '=' is the override's.
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--data", "a.txt", "runs/seed=1", "./seed=1", "sample_prompt=a=b",
                 "Seed=3"]) == 2
    assert capsys.readouterr().err == ("gptlab pretrain: error: command line, field 'Seed': "
                                       "unknown key 'Seed'; did you mean 'seed'?\n")
    assert main(["pretrain", "--data", "a.txt", "runs/seed=1", "./seed=1", "sample_prompt=a=b",
                 "seed=3"]) == 0
    cfg = captured["pretrain"]
    assert (cfg.data, cfg.sample_prompt, cfg.seed) == (["a.txt", "runs/seed=1", "./seed=1"],
                                                       "a=b", 3)
    # A key inside a field is that field's override, refused for what it is, not a file.
    assert main(["pretrain", "--data", "a.txt", "model.n_layers=2"]) == 2
    assert capsys.readouterr().err == (
        "gptlab pretrain: error: command line, field 'model.n_layers': unknown key "
        "'model.n_layers': 'model' is one value (a string), not a group of keys; write "
        "model=VALUE\n")


@pytest.mark.parametrize("override, said", [
    # OmegaConf's "Key '' not in 'PPOConfig'" for each of the first three
    ("./seed=1", "command line: override './seed=1': './seed' is not a key; a key is a field's "
                 "name (the fields of PPOConfig are the keys)"),
    ("=5", "command line: override '=5': '' is not a key; a key is a field's name (the fields "
           "of PPOConfig are the keys)"),
    ("seed.=1", "command line: override 'seed.=1': 'seed.' is not a key; a key is a field's name "
                "(the fields of PPOConfig are the keys)"),
    # "field 'lr': expected a number, got a mapping {'x': 1}"
    ("lr.x=1", "command line, field 'lr.x': unknown key 'lr.x': 'lr' is one value (a number), "
               "not a group of keys; write lr=VALUE"),
    ("reward.path=x", "command line, field 'reward.path': unknown key 'reward.path': 'reward' is "
                      "one value (a string, or null), not a group of keys; write reward=VALUE"),
    ("seed[0]=1", "command line, field 'seed[0]': unknown key 'seed[0]': 'seed' is one value (an "
                  "integer), not a group of keys; write seed=VALUE"),
    # unchanged: a misspelled group names the field meant; a list's item is refused as before
    ("sed.x=1", "command line, field 'sed': unknown key 'sed'; did you mean 'seed'?"),
    ("ptx_data.0=a", "command line, field 'ptx_data': must be a list, got a mapping ({'0': "
                     "'a'}); write ptx_data=[ITEM, ...]")])
def test_an_override_key_that_is_no_key_or_sets_a_key_inside_a_value_says_so(override, said):
    from gptlab.config import load_config
    from gptlab.errors import UserError
    from gptlab.train.ppo import PPOConfig
    with pytest.raises(UserError) as e:
        load_config(PPOConfig, None, [override])
    assert str(e.value) == said


@pytest.mark.parametrize("text, argv, said", [
    ("seed: 1\npolicy: ???\n", [], "{f}:2, field 'policy': ??? is OmegaConf's missing value; "
                                   "give a value or leave the key out"),
    ("seed: '???'\n", [], "{f}:1, field 'seed': ??? is OmegaConf's missing value; give a value "
                          "or leave the key out"),
    # at the item's line: it was the key's (1)
    ("ptx_data:\n  - a.txt\n\n  - ???\n", [], "{f}:4, field 'ptx_data[1]': ??? is OmegaConf's "
                                              "missing value; give a value or leave the item out"),
    ("seed: 1\nptx_data: [a.txt,\n  b.txt, '???']\n", [], "{f}:3, field 'ptx_data[2]': ??? is "
                                                       "OmegaConf's missing value; give a value "
                                                       "or leave the item out"),
    ("", ["policy=???"], "command line, field 'policy': ??? is OmegaConf's missing value; give a "
                         "value or leave the key out"),
    ("", ["seed=???"], "command line, field 'seed': ??? is OmegaConf's missing value; give a "
                       "value or leave the key out"),
    # A flag's value is named by the flag, as any other value a flag gave.
    ("", ["--reward-fn", "???"], "field '--reward-fn': ??? is OmegaConf's missing "
                                 "value; give a value or leave --reward-fn out"),
    ("", ["--ptx-data", "a.txt", "???"], "field '--ptx-data': ??? is OmegaConf's "
                                         "missing value; give a value or leave the item out")])
def test_omegaconfs_missing_value_is_refused_not_the_default_kept(text, argv, said, captured,
                                                                  tmp_path, capsys):
    # `policy: ???` left the default in place: OmegaConf's merge passes over a missing value.
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert main(["ppo", "--config", str(f), "seed=2", *argv]) == 2 and "ppo" not in captured
    assert capsys.readouterr().err == "gptlab ppo: error: " + said.format(f=f) + "\n"


def test_three_question_marks_inside_a_value_are_text(captured, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sample_prompt: what ??? now\n")
    assert main(["pretrain", "--config", str(f), "--out", "???x"]) == 0
    assert (captured["pretrain"].sample_prompt, captured["pretrain"].out) == ("what ??? now",
                                                                             "???x")


@pytest.mark.parametrize("verb, argv, word", [
    ("sft", ["foo"], "foo"),
    ("pretrain", ["--sample-prompt", "Hello", "world"], "world"),  # a value with a space
    ("ppo", ["seed", "3"], "seed")])
def test_a_stray_word_is_one_line_with_the_hint_other_verbs_give(verb, argv, word, captured,
                                                                 capsys):
    # It said only "override 'foo' should look like key=value".
    assert main([verb, *argv]) == 2 and verb not in captured
    assert capsys.readouterr().err == (
        f"gptlab {verb}: error: command line: override '{word}' should look like key=value "
        f"(quote a value that holds spaces; flags start with --; `gptlab {verb} --help` lists "
        f"the keys)\n")
    from gptlab.config import load_config
    from gptlab.errors import UserError
    from gptlab.train.sft import SFTConfig
    with pytest.raises(UserError) as e:  # from Python, no command to point to
        load_config(SFTConfig, None, [word])
    assert str(e.value) == (f"command line: override '{word}' should look like key=value (quote "
                            f"a value that holds spaces; flags start with --)")


@pytest.mark.parametrize("verb, key, value, said", [
    ("pretrain", "seed", "-1", "must be in [0, 2**64), got -1"),
    ("sft", "batch_size", "0", "must be >= 1, got 0"),
    ("reward", "val_fraction", "1.5", "must be in [0, 1), got 1.5"),
    ("ppo", "gae_lambda", "-0.5", "must be in [0, 1], got -0.5"),
    ("ppo", "seed", "-1", "must be in [0, 2**64), got -1"),
    ("pipeline", "seed", "-1", "must be in [0, 18446744073709551515] (each stage's seed, up "
                               "to seed + 100, must be below 2**64), got -1"),
    ("pipeline", "disagreement", "0.7", "must be in [0, 0.5] (0.5 is a random ranking), got 0.7"),
    ("pipeline", "demonstrator_flaw", "typo", "unknown flaw 'typo'; choose one of inclusive, "
                                              "order, star")])
def test_a_value_the_stage_would_refuse_is_refused_as_the_config_loads_naming_who_wrote_it(
        verb, key, value, said, captured, tmp_path, capsys):
    # `seed: -1` loaded, and the stage refused it later naming no file and no line ("field
    # 'seed': must be in [0, 2**64)"); a flag's was named as the field, not the flag.
    f = tmp_path / "c.yaml"
    f.write_text(f"max_new_tokens: 8\n{key}: {value}\n" if verb in ("ppo", "pipeline")
                 else f"lr: 0.001\n{key}: {value}\n")
    assert main([verb, "--config", str(f)]) == 2 and verb not in captured
    assert capsys.readouterr().err == f"gptlab {verb}: error: {f}:2, field '{key}': {said}\n"
    assert main([verb, f"{key}={value}"]) == 2 and verb not in captured
    assert capsys.readouterr().err == (f"gptlab {verb}: error: command line, field '{key}': "
                                       f"{said}\n")
    # The layer that wins is the one named: a flag over the file's good value, the file's bad
    # value under a good flag not at all.
    good = tmp_path / "good.yaml"
    good.write_text("progress: false\n")
    assert main([verb, "--config", str(good), _flag(key), value]) == 2 and verb not in captured
    assert capsys.readouterr().err == f"gptlab {verb}: error: field '{_flag(key)}': {said}\n"
    fine = {"seed": "2", "batch_size": "2", "val_fraction": "0.5", "gae_lambda": "0.5",
            "disagreement": "0.2", "demonstrator_flaw": "star"}[key]
    assert main([verb, "--config", str(f), _flag(key), fine]) == 0 and verb in captured


def test_a_value_refused_as_the_config_loads_from_python_names_the_file_too(tmp_path):
    from gptlab.config import load_config
    from gptlab.errors import UserError
    from gptlab.train.ppo import PPOConfig
    f = tmp_path / "c.yaml"
    f.write_text("steps: 3\nminibatch_size: 64\n")
    with pytest.raises(UserError) as e:
        load_config(PPOConfig, f)
    assert str(e.value) == f"{f}:2, field 'minibatch_size': must be <= batch_size (32), got 64"
    # A default that another value makes impossible is named as the field alone, as the stage
    # names it.
    with pytest.raises(UserError) as e:
        load_config(PPOConfig, None, batch_size=2)
    assert str(e.value) == "field 'minibatch_size': must be <= batch_size (2), got 8"


def test_a_config_file_that_is_missing_not_a_mapping_or_holds_a_list_key_is_refused_by_name(
        tmp_path):
    from gptlab.config import load_config
    from gptlab.errors import UserError
    from gptlab.train.ppo import PPOConfig
    f = tmp_path / "c.yaml"
    with pytest.raises(UserError) as e:
        load_config(PPOConfig, f)
    assert str(e.value) == f"{f}: config file not found"
    f.write_text("- steps\n- 3\n")
    with pytest.raises(UserError) as e:
        load_config(PPOConfig, f)
    assert str(e.value) == f"{f}: a config file must be a mapping of keys to values"
    f.write_text("- 2024-13-01\n")  # no key to name: the value is not one's
    with pytest.raises(UserError) as e:
        load_config(PPOConfig, f)
    assert str(e.value) == f"{f}: a value cannot be read: month must be in 1..12"
    f.write_text("seed: 1\n? [1, 2]\n: 3\n")  # a key YAML reads as a list
    with pytest.raises(UserError) as e:
        load_config(PPOConfig, f)
    assert (e.value.path, e.value.line) == (f, 2)
    assert e.value.message.startswith("not valid YAML: found unhashable key")


@dataclasses.dataclass
class _Inner:
    depth: int = 1


@dataclasses.dataclass
class _Outer:
    """A config of no stage: a nested one, a required field, fields without help."""
    name: str
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    steps: int = dataclasses.field(default=2, metadata={"help": "how many"})
    label: str = ""

    def check_values(self) -> None:
        from gptlab.errors import UserError
        if self.steps < 0:
            raise UserError("must be >= 0", path="elsewhere.yaml", field="steps")
        if self.steps == 0:
            raise UserError("cannot be 0")


def test_add_config_flags_leaves_out_a_nested_config_and_says_required_and_defaults():
    import argparse

    from gptlab.config import add_config_flags
    parser = argparse.ArgumentParser()
    add_config_flags(parser, _Outer)
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert helps == {"name": "(required)", "steps": "how many (default: 2)", "label": ""}


def test_a_nested_config_s_unknown_key_names_its_own_keys_and_a_check_s_own_file_is_kept():
    from gptlab.config import NULL, load_config
    from gptlab.errors import UserError
    assert load_config(_Outer, None, ["inner.depth=3"], name="a").inner.depth == 3
    with pytest.raises(UserError) as e:
        load_config(_Outer, None, ["inner.dpeth=3"], name="a")
    assert str(e.value) == ("command line, field 'inner.dpeth': unknown key 'inner.dpeth'; did "
                            "you mean 'depth'?")
    with pytest.raises(UserError) as e:
        load_config(_Outer, None, ["inner=3"], name="a")  # a nested config is no integer
    assert str(e.value) == "command line: Merge error: int is not a subclass of _Inner. value: 3"
    with pytest.raises(UserError) as e:  # the check named its own file: kept
        load_config(_Outer, None, name="a", steps=-1)
    assert str(e.value) == "elsewhere.yaml, field 'steps': must be >= 0"
    with pytest.raises(UserError) as e:  # the check named no field: raised as it is
        load_config(_Outer, None, name="a", steps=0)
    assert str(e.value) == "cannot be 0"
    assert repr(NULL) == "null"


def test_a_config_value_nested_too_deeply_is_refused_by_its_line(tmp_path):
    # A list 100 levels deep in a YAML file was a RecursionError in OmegaConf (3,000 levels, in
    # the YAML reader itself), exit 1; one given as an override printed the whole value.
    from gptlab.config import load_config
    from gptlab.errors import UserError
    from gptlab.train.pretrain import PretrainConfig
    f = tmp_path / "deep.yaml"
    said = ("nested too deeply (lists or mappings more than 20 levels inside one another; a "
            "config's values are numbers, texts, or lists of them)")
    for n, where in ((25, f"{f}:2, field 'lr': the value is "), (3000, f"{f}: cannot be read: ")):
        f.write_text(f"model: tiny\nlr: {'[' * n}{']' * n}\n")
        with pytest.raises(UserError) as e:
            load_config(PretrainConfig, f)
        assert str(e.value) == where + said
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, None, ["lr=" + "[" * 3000 + "]" * 3000])
    assert str(e.value).startswith("command line, field 'lr': override 'lr=[[[[[[[[[[")
    assert len(str(e.value)) < 200  # not the 6,000 characters of the value


@pytest.mark.parametrize("written, got", [
    ("yes", "a boolean, true"), ("off", "a boolean, false"), ("12:30", "a number, 750"),
    ("0x10", "a number, 16"), ("1_000", "a number, 1000")])
def test_a_text_setting_that_yaml_reads_as_another_value_is_refused(tmp_path, written, got):
    # OmegaConf turned each into other text in silence: `sample_prompt: yes` sampled after
    # "True", `tokenizer: no` looked for a tokenizer at "False".
    from gptlab.config import load_config
    from gptlab.errors import UserError
    from gptlab.train.pretrain import PretrainConfig
    f = tmp_path / "c.yaml"
    f.write_text(f"model: tiny\nsample_prompt: {written}\n")
    said = (f"expected a string, but YAML reads {written} as {got}; quote it, '{written}', to "
            f"give it as text")
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, f)
    assert str(e.value) == f"{f}:2, field 'sample_prompt': {said}"
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, None, [f"sample_prompt={written}"])
    assert str(e.value) == f"command line, field 'sample_prompt': {said}"
    f.write_text(f"model: tiny\nsample_prompt: '{written}'\n")  # quoted, it is that text
    assert load_config(PretrainConfig, f).sample_prompt == written


def test_a_number_written_as_its_own_text_is_that_text():
    from gptlab.config import load_config
    from gptlab.errors import UserError
    from gptlab.train.pretrain import PretrainConfig
    cfg = load_config(PretrainConfig, None, ["sample_prompt=2024", "out=2024"])
    assert (cfg.sample_prompt, cfg.out) == ("2024", "2024")
    cfg = load_config(PretrainConfig, None, ["data=[a.txt, 2024]"])
    assert cfg.data == ["a.txt", "2024"]
    # An override is read by OmegaConf's YAML, which takes 1e3 for a number (PyYAML's, text).
    with pytest.raises(UserError, match="YAML reads 1e3 as a number, 1000.0; quote it"):
        load_config(PretrainConfig, None, ["sample_prompt=1e3"])
    with pytest.raises(UserError, match=r"field 'data': expected a string, but YAML reads yes"):
        load_config(PretrainConfig, None, ["data=[a.txt, yes]"])


def test_a_second_file_after_a_flag_that_reads_one_says_to_give_a_directory(tmp_path, captured,
                                                                           capsys, monkeypatch):
    # `sft --data a.jsonl b.jsonl`, as a shell's glob (`--data shards/*.jsonl`) gives them:
    # b.jsonl was only "override 'b.jsonl' should look like key=value", no word of the files.
    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"prompt": "a", "completion": " b"}\n')
    assert main(["sft", "--data", "a.jsonl", "b.jsonl"]) == 2 and "sft" not in captured
    assert capsys.readouterr().err == (
        "gptlab sft: error: command line: override 'b.jsonl' should look like key=value (quote "
        "a value that holds spaces; flags start with --; `gptlab sft --help` lists the keys); "
        "'b.jsonl' is a path: a flag that reads one file or directory takes a directory of "
        "several files instead\n")
