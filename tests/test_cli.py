"""The command line: verbs, config files and overrides, exit codes, run provenance."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab import cli
from gptlab.cli import VERBS, build_parser, main
from gptlab.config import load_config
from gptlab.errors import NotFound, UserError, WrongKind
from gptlab.io import read_jsonl, write_jsonl_atomic
from gptlab.model import GPT, get_preset
from gptlab.provenance import record_run
from gptlab.tokenizer import train_tokenizer
from gptlab.train.ppo import PPOConfig


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    tok = train_tokenizer(["hello world, the quick brown fox " * 20], vocab_size=300)
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=32)
    save_model(d, GPT(cfg), tok)
    return d


def command(argv: list[str]) -> str:
    """The command `argv` runs, as its errors begin: `gptlab sft`, `gptlab world check`."""
    return "gptlab " + " ".join(argv[:2] if argv[0] in ("tokenizer", "world") else argv[:1])


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out
    assert len(VERBS) >= 10


@pytest.mark.parametrize("verb,flag,default", [
    (["pipeline"], "--ptx-coef", "0.002"), (["pipeline"], "--seed", "0"),
    (["ppo"], "--kl-coef", "0.02"), (["sft"], "--lr", None), (["tokenizer", "train"],
    "--vocab-size", "4096"), (["chat"], "--max-new-tokens", "256"), (["chat"], "--seed", "0"),
    (["label"], "--disagreement", "0.1 with sqlworld"), (["world", "export"], "--test", "600")])
def test_help_shows_each_flags_default(capsys, verb, flag, default):
    # README sends users to --help for the defaults: they were not there.
    from gptlab.train.sft import SFTConfig
    if default is None:
        default = str(SFTConfig.lr)
    with pytest.raises(SystemExit) as e:
        main([*verb, "--help"])
    assert e.value.code == 0
    capsys.readouterr()
    text = flag_help(capsys, verb, flag)  # which may name another flag (`--no-ties`)
    assert text.endswith(f"(default: {default})"), text


@pytest.mark.parametrize("verb", [["tokenizer", "train"], ["pretrain"]])
def test_help_says_data_takes_what_the_readme_says_it_takes(capsys, verb):
    # README: `--data` reads files, directories and Hub datasets; `tokenizer train --help` said
    # "text / .jsonl / .parquet files", and neither verb's help named the other two.
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    data = text.split("--data DATA [DATA ...] ", 1)[1].split(" --", 1)[0]
    assert "directories" in data and ".jsonl" in data and "Hub dataset" in data, data


@pytest.mark.parametrize("verb", [["tokenizer", "train", "--data", "{f}", "--out", "{out}"],
                                  ["sample", "--model", "{model}", "--prompts", "{f}", "--out",
                                   "{out}/s.jsonl"]])
def test_a_gzipped_jsonl_exits_2_saying_so_and_writes_nothing(verb, tiny_model, tmp_path,
                                                              capsys):
    import gzip
    f = tmp_path / "d.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"prompt": "hello", "text": "hello world"}\n', mtime=0))
    fill = dict(f=f, out=tmp_path / "out", model=tiny_model)
    assert main([a.format(**fill) for a in verb]) == 2
    assert capsys.readouterr().err == (f"{command(verb)}: error: {f}: is gzip-compressed, not "
                                       f"text; decompress it first (gunzip -k {f}) and "
                                       f"give what it holds\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", [["tokenizer", "train"], ["pretrain", "max_steps=1"]])
def test_data_of_two_splits_exits_2_naming_the_files_and_writes_nothing(verb, tmp_path, capsys,
                                                                       monkeypatch):
    # `--data train.txt test.txt` pretrained on the test split; the directory of both was refused.
    monkeypatch.chdir(tmp_path)
    for name, text in (("train.txt", "one doc\n"), ("test.txt", "another doc\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert main([*verb, "--data", "train.txt", "test.txt", "--out", "out"]) == 2
    field = "--data" if verb[0] == "pretrain" else "data"  # a config verb names the flag
    assert capsys.readouterr().err.endswith(  # after pretrain's "training a BPE tokenizer"
        f"{command(verb)}: error: field '{field}': gives the files of 2 splits (train, test), as "
        f"datasets names them: train.txt is train's, test.txt test's; read as one, a split held "
        f"out for evaluation would be trained on: give one split's files\n")
    assert not (tmp_path / "out").exists()


def flag_help(capsys, verb: list[str], flag: str) -> str:
    """A flag's entry in `--help`, its lines joined (the entry ends where the next flag's
    starts, at an indent of two)."""
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    lines = capsys.readouterr().out.split("options:", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {flag} "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("  -")),
               len(lines))
    return " ".join(" ".join(lines[start:end]).split())


@pytest.mark.parametrize("verb", [["label"], ["pipeline"]])
def test_help_states_the_disagreement_range_the_labeler_enforces(capsys, verb):
    # `label --help` spoke of pairs of verdict tiers only (with --no-ties a level is one answer)
    # and stated no range; the labeler refuses anything outside [0, 0.5].
    import re

    from gptlab.world.labelers import SqlLabeler
    text = flag_help(capsys, verb, "--disagreement").replace("--no- ties", "--no-ties")
    low, high = map(float, re.search(r"in \[([\d.]+), ([\d.]+)\]", text).groups())
    assert "--no-ties" in text and (low, high) == (0.0, 0.5), text
    SqlLabeler(None, disagreement=low)
    SqlLabeler(None, disagreement=high)
    for outside in (low - 0.01, high + 0.01):
        with pytest.raises(UserError, match=r"\[0, 0.5\]"):
            SqlLabeler(None, disagreement=outside)


def test_help_says_where_ppos_value_model_starts_without_a_reward_model(capsys):
    # `--value` said "(default: the reward model)"; with --reward-fn there is none, and the
    # value model starts from the policy with a new head.
    text = flag_help(capsys, ["ppo"], "--value")
    assert "the reward model" in text and "--reward-fn, the policy" in text, text


@pytest.mark.parametrize("verb", [["generate"], ["chat"], ["pretrain"], ["sft"], ["sample"],
                                  ["reward"], ["ppo"]])
def test_every_device_flag_says_what_it_takes(capsys, verb):
    # The training verbs' --device said only "(default: auto)"; `sample`'s named the choices.
    text = flag_help(capsys, verb, "--device")
    for choice in ("auto", "cpu", "cuda:N", "mps"):
        assert choice in text, text


@pytest.mark.parametrize("verb", [["sft"], ["reward"]])
def test_help_says_sft_and_reward_validate_on_their_whole_held_out_set(capsys, verb):
    # `--eval-batches (default: 10)` read as 10 batches a validation; only pretraining counts them.
    assert "whole held-out set" in flag_help(capsys, verb, "--eval-batches")
    text = flag_help(capsys, verb, "--max-steps")
    assert "--epochs" in text and "--max-minutes" in text, text
    assert "the CPU always trains in float32" in flag_help(capsys, verb, "--bf16,")


def test_unknown_flag_exits_2_with_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ppo", "--kl-coeff", "0.1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "gptlab ppo: error: unknown flag --kl-coeff; did you mean " \
                                      "--kl-coef?\n"


@pytest.mark.parametrize("argv, said", [
    (["world", "export", "--out", "x", "--tain", "5"],
     "gptlab world export: error: unknown flag --tain; did you mean --train?"),
    (["tokenizer", "train", "--data", "a", "--out", "b", "--vocab-sise", "5"],
     "gptlab tokenizer train: error: unknown flag --vocab-sise; did you mean --vocab-size?")])
def test_an_unknown_flag_of_a_verbs_action_is_answered_by_that_action(argv, said, capsys):
    # `gptlab world` answered, with its own usage and no suggestion: it has no --train.
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == said + "\n"


@pytest.mark.parametrize("argv, said", [
    # argparse took a flag's beginning as the flag: a script's `--temp` would have changed
    # meaning, or broken, the day a flag `--temp...` came.
    (["generate", "--model", "m", "--prompt", "p", "--temp", "0.7"],
     "gptlab generate: error: unknown flag --temp; did you mean --temperature?"),
    (["generate", "--model", "m", "--prompt", "p", "--temp=0.7"],
     "gptlab generate: error: unknown flag --temp; did you mean --temperature?"),
    (["sft", "--max-step", "3"], "gptlab sft: error: unknown flag --max-step; did you mean "
                                 "--max-steps?"),
    (["sft", "--conf", "c.yaml"], "gptlab sft: error: unknown flag --conf; did you mean --config?"),
    (["label", "--in", "s", "--out", "r", "--no-tie"],
     "gptlab label: error: unknown flag --no-tie; did you mean --no-ties?"),
    (["world", "export", "--out", "x", "--vary"],
     "gptlab world export: error: unknown flag --vary; did you mean --vary-schema?"),
    (["sft", "--max", "3"], "gptlab sft: error: unknown flag --max; did you mean --max-steps, "
                            "--max-minutes or --max-new-tokens?"),
    # A close flag, not --help: `--tempx` read "did you mean '--help'?".
    (["generate", "--model", "m", "--prompt", "p", "--tempx", "1", "--sed", "2"],
     "gptlab generate: error: unknown flags --tempx (did you mean --temperature?), --sed (did you "
     "mean --seed?); `gptlab generate --help` lists the flags"),
    (["generate", "--model", "m", "--prompt", "p", "--zzz"],
     "gptlab generate: error: unknown flag --zzz; `gptlab generate --help` lists the "
     "flags"),
    (["world", "check", "--world", "w", "--id", "q", "SELECT", "1"],
     "gptlab world check: error: unexpected argument '1' (quote a value that holds spaces; "
     "`gptlab world check --help` lists the arguments)")])
def test_a_flag_cut_short_is_refused_in_one_line_naming_the_flag_meant(argv, said, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == said + "\n"


@pytest.mark.parametrize("argv, said", [
    (["sfx"], "gptlab: error: argument VERB: invalid choice: 'sfx' (choose from 'seq2seq', "
              "'translate', 'tokenizer', 'generate', 'chat', 'serve', 'pretrain', 'finetune', "
              "'incontext', 'sft', 'sample', 'label', 'reward', 'ppo', 'pipeline', 'convert', "
              "'world'); did you mean 'sft'?"),
    (["world", "exprt"], "gptlab world: error: argument action: invalid choice: 'exprt' (choose "
                         "from 'export', 'check', 'score'); did you mean 'export'?"),
    (["tokenizer", "zzz"], "gptlab tokenizer: error: argument action: invalid choice: 'zzz' "
                           "(choose from 'train', 'encode')"),
    # The flag was named twice: "field '--from': --from expects ...".
    (["convert", "--from", "xx", "p", "--out", "o"],
     "gptlab convert: error: field '--from': expects 'hf' or 'gguf', not 'xx'")])
def test_a_mistyped_verb_or_action_names_the_one_meant(argv, said, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2 and capsys.readouterr().err == said + "\n"


def test_an_action_s_error_names_the_verb_and_the_action_as_its_flag_errors_do(
        tmp_path, monkeypatch, capsys):
    # Its own errors began `gptlab world: error:` where argparse's, for a flag of the same
    # action, began `gptlab world check: error:`.
    corpus = tmp_path / "gone.txt"
    world = ["world", "check", "--world", str(tmp_path / "nope"), "--id", "x", "SELECT 1"]
    for argv, begins in (
            (world, "gptlab world check: error: "),
            (["world", "score", "--world", str(tmp_path / "nope"), "--in", "s.jsonl"],
             "gptlab world score: error: "),
            (["tokenizer", "train", "--data", str(corpus), "--out", str(tmp_path / "t")],
             "gptlab tokenizer train: error: "),
            (["tokenizer", "encode", "--tokenizer", str(tmp_path / "nope"), "hi"],
             "gptlab tokenizer encode: error: "),
            (["sft", "--model", ""], "gptlab sft: error: ")):
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith(begins), argv
    with pytest.raises(SystemExit):
        main([*world, "--idd", "x"])
    assert capsys.readouterr().err.startswith("gptlab world check: error: unknown flag --idd")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(world) == 2
    assert capsys.readouterr().err.startswith("gptlab world check: error: started as 2 ")


def test_flags_written_in_full_config_files_and_overrides_still_parse(tmp_path):
    from gptlab.cli import build_parser
    f = tmp_path / "sft.yaml"
    f.write_text("max_steps: 5\nlr: 0.001\n")
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p",
                                      "--temperature", "0.7", "--top-p=0.9"])
    assert (args.temperature, args.top_p) == (0.7, 0.9)
    args = build_parser().parse_args(["sft", "--config", str(f), "--max-steps", "7", "seed=3"])
    assert (args.config, args.max_steps, args.overrides) == (str(f), 7, ["seed=3"])
    from gptlab.config import config_from_args
    from gptlab.train.sft import SFTConfig
    cfg = config_from_args(SFTConfig, args)
    assert (cfg.max_steps, cfg.lr, cfg.seed) == (7, 0.001, 3)
    args = build_parser().parse_args(["label", "--in", "s", "--out", "r", "--no-ties"])
    assert args.ties is False


def test_unknown_override_key_names_the_closest_key(tmp_path, capsys):
    code = main(["ppo", "--policy", "x", "--prompts", "y", "--out", str(tmp_path), "kl_coeff=0.1"])
    err = capsys.readouterr().err
    assert code == 2 and "kl_coeff" in err and "did you mean 'kl_coef'" in err


def test_yaml_config_errors_name_file_and_key(tmp_path):
    f = tmp_path / "ppo.yaml"
    f.write_text("steps: 10\nkl_coef: lots\n")
    with pytest.raises(UserError, match=r"ppo.yaml.*field 'kl_coef'"):
        load_config(PPOConfig, f)
    f.write_text("steps: 10\nclip_range: 0.2\n")
    with pytest.raises(UserError, match="unknown key 'clip_range'"):
        load_config(PPOConfig, f)
    f.write_text("steps: [1\n")
    with pytest.raises(UserError, match=r"ppo.yaml:\d+.*not valid YAML"):
        load_config(PPOConfig, f)


def test_a_yaml_error_names_the_line_it_is_on(tmp_path):
    f = tmp_path / "ppo.yaml"
    f.write_text("steps: 10\nlr: 1\n  bad: 2\n")
    with pytest.raises(UserError) as e:
        load_config(PPOConfig, f)
    assert str(e.value) == (f"{f}:3:6, field 'bad': not valid YAML: mapping values are not "
                            "allowed here")


@pytest.mark.parametrize("text, said", [
    # Each was five lines or more: PyYAML's own, of '"<unicode string>", line 2, column 7'.
    ("steps: 10\nlr: [1\n", ":2:7, field 'lr': not valid YAML: expected ',' or ']', but got "
                            "'<stream end>' (while parsing a flow sequence at line 2, column 5)"),
    ('steps: "a\n', ":1:10, field 'steps': not valid YAML: found unexpected end of stream (while "
                   "scanning a quoted scalar at line 1, column 8)"),
    ("seed: 1\nsteps:\t10\n", ":2:7, field 'steps': not valid YAML: found character '\\t' that "
                            "cannot start any token (while scanning for the next token)"),
    ("steps: 10\n---\nsteps: 3\n", ":2:1: not valid YAML: expected a single document in the "
                                  "stream, but found another document"),
    ("steps: 1\nlr: *b\n", ":2:5, field 'lr': not valid YAML: found undefined alias 'b'"),
    ("steps: 1\nseed: \x07\n", ":2:7: not valid YAML: character #x0007: special characters are "
                              "not allowed"),
    # Wrong types were OmegaConf's "Value 'lots' of type 'str' could not be converted to Float",
    # with no line.
    ("steps: 10\nkl_coef: lots\n", ":2, field 'kl_coef': expected a number, got 'lots'"),
    ("\nsteps: [1, 2]\n", ":2, field 'steps': expected an integer, got a list [1, 2]"),
    ("steps:\n  a: 1\n", ":1, field 'steps': expected an integer, got a mapping {'a': 1}"),
    ("steps: 1.5\n", ":1, field 'steps': expected an integer, got 1.5"),
    ("steps: null\n", ":1, field 'steps': expected an integer, got null"),
    ("adaptive_kl: maybe\n", ":1, field 'adaptive_kl': expected true or false, got 'maybe'"),
    ("policy: [a, b]\n", ":1, field 'policy': expected a string, got a list ['a', 'b']"),
    ("steps: 1\nclip_range: 0.2\n", ":2, field 'clip_range': unknown key 'clip_range'; did you "
                                   "mean 'clip', 'grad_clip' or 'value_clip'? (`gptlab ppo "
                                   "--help` lists the keys)"),
    # A list item that is a list or a mapping was let through, to fail as a path later.
    ("seed: 1\nptx_data: [a.txt, [b.txt]]\n", ":2, field 'ptx_data': item 1 is a list ['b.txt']; "
                                            "expected a string"),
    # at the item's line, not the key's
    ("ptx_data:\n  - a.txt\n  - null\n", ":3, field 'ptx_data': item 1 is null; expected a "
                                        "string"),
    ("steps: 1\nptx_data: [a.txt, {b: c}]\n", ":2, field 'ptx_data': item 1 is a mapping "
                                              "{'b': 'c'}; expected a string"),
    # a field that may be null says so; YAML's words for a value, a long one cut
    ("reward: [a]\n", ":1, field 'reward': expected a string, or null, got a list ['a']"),
    ("seed: true\n", ":1, field 'seed': expected an integer, got true"),
    ("seed: " + "x" * 100 + "\n", ":1, field 'seed': expected an integer, got '" + "x" * 56
     + "..."),
    # A value YAML reads but Python cannot build had no line nor key.
    ("steps: 1\nseed: 2024-13-01\n", ":2, field 'seed': a value cannot be read: month must be "
                                    "in 1..12"),
    # An interpolation that gave a wrong type was blamed on the command line.
    ("lr: 0.5\nsteps: ${lr}\n", ":2, field 'steps': '${lr}' gives 0.5; expected an integer"),
])
def test_a_config_files_error_is_one_line_naming_file_line_and_key(text, said, tmp_path, capsys):
    f = tmp_path / "ppo.yaml"
    f.write_text(text)
    assert main(["ppo", "--config", str(f), "--policy", "p", "--prompts", "q",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gptlab ppo: error: {f}{said}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, said", [
    ("steps=lots", "field 'steps': expected an integer, got 'lots'"),
    ("kl_coef=[1]", "field 'kl_coef': expected a number, got a list [1]"),
    ("ptx_data=[a,[b]]", "field 'ptx_data': item 1 is a list ['b']; expected a string")])
def test_an_overrides_wrong_type_names_the_command_line_and_the_key(override, said, capsys):
    assert main(["ppo", "--policy", "p", "--prompts", "q", "--out", "o", override]) == 2
    assert capsys.readouterr().err == f"gptlab ppo: error: command line, {said}\n"


def test_an_override_of_a_files_key_is_blamed_for_its_interpolation(tmp_path, capsys):
    # The file wrote steps too, but the value that failed is the override's.
    f = tmp_path / "ppo.yaml"
    f.write_text("lr: 0.5\nsteps: 3\n")
    assert main(["ppo", "--config", str(f), "--policy", "p", "--prompts", "q", "--out", "o",
                 "steps=${lr}"]) == 2
    assert capsys.readouterr().err == ("gptlab ppo: error: command line, field 'steps': "
                                       "'${lr}' gives 0.5; expected an integer\n")


def test_a_flag_whose_default_is_empty_shows_no_default(capsys):
    # --ptx-data defaults to no files: "(default: )" would read as a missing value.
    text = flag_help(capsys, ["ppo"], "--ptx-data")
    assert "default" not in text, text


def test_a_key_given_twice_in_a_config_file_is_refused_naming_both_lines(tmp_path):
    # PyYAML keeps the last value: the run took kl_coef 0.5, silently.
    f = tmp_path / "ppo.yaml"
    f.write_text("kl_coef: 0.1\nsteps: 10\nkl_coef: 0.5\n")
    with pytest.raises(UserError) as e:
        load_config(PPOConfig, f)
    assert str(e.value) == f"{f}:3: the key 'kl_coef' is given twice (lines 1 and 3); keep one"
    f.write_text('{"steps": 10, "steps": 20}')   # JSON too
    with pytest.raises(UserError, match="'steps' is given twice"):
        load_config(PPOConfig, f)
    # A value a merge key (<<) brings may be overridden: that is no key given twice.
    f.write_text("steps: 10\nkl_coef: 0.1\n<<: {steps: 3, grad_clip: 0.3}\n")
    cfg = load_config(PPOConfig, f)
    assert (cfg.steps, cfg.kl_coef, cfg.grad_clip) == (10, 0.1, 0.3)


def test_a_config_that_cannot_be_read_or_an_override_that_cannot_be_parsed_exits_2(tmp_path,
                                                                                  capsys):
    # Each was a traceback and exit 1: IsADirectoryError, UnicodeDecodeError, yaml's ParserError.
    (tmp_path / "adir").mkdir()
    (tmp_path / "latin1.yaml").write_bytes(b"steps: 10\nout: caf\xe9\n")
    for argv, message in (
            (["--config", str(tmp_path / "adir")],
             f"{tmp_path / 'adir'}, field '--config': is a directory, not a file"),
            (["--config", str(tmp_path / "latin1.yaml")],
             f"{tmp_path / 'latin1.yaml'}:2: not UTF-8 text: byte 0xe9 at byte offset 18 cannot be "
             f"decoded; save the file as UTF-8"),
            (["steps=[1"], "command line, field 'steps': override 'steps=[1': the value is not "
                           "valid YAML (did not find expected ',' or ']')"),
            # Values YAML parses but Python cannot build were ValueError tracebacks.
            (["--config", str(tmp_path / "date.yaml")],
             f"{tmp_path / 'date.yaml'}:2, field 'seed': a value cannot be read: month must be "
             f"in 1..12"),
            (["--config", str(tmp_path / "long.yaml")],
             f"{tmp_path / 'long.yaml'}:1, field 'steps': a value cannot be read: an integer of "
             f"more than 4300 digits; write it as a string"),
            (["steps=" + "9" * 5000], "command line, field 'steps': override 'steps=" + "9" * 54
             + "...': the value cannot be read (an integer of more than 4300 digits; write it "
               "as a string)")):
        (tmp_path / "date.yaml").write_text("steps: 10\nseed: 2024-13-01\n")
        (tmp_path / "long.yaml").write_text("steps: " + "9" * 5000 + "\n")
        assert main(["ppo", *argv]) == 2
        assert capsys.readouterr().err == f"gptlab ppo: error: {message}\n"


@pytest.mark.parametrize("yaml_text,override,got,item", [
    ("ptx_data: corpus.txt\n", "ptx_data=corpus.txt", "the single str 'corpus.txt'",
     "corpus.txt"),
    # a mapping (the Hub's data_files habit) was a bare TypeError, exit 1
    ("ptx_data:\n  train: corpus.txt\n", "ptx_data.train=corpus.txt",
     "a mapping ({'train': 'corpus.txt'})", "ITEM, ..."),
])
def test_a_list_field_given_one_value_names_the_field_and_the_list_to_write(
        tmp_path, capsys, yaml_text, override, got, item):
    f = tmp_path / "ppo.yaml"
    f.write_text(yaml_text)
    with pytest.raises(UserError) as err:
        load_config(PPOConfig, f)
    assert str(err.value) == (f"{f}:1, field 'ptx_data': must be a list, got {got}; "
                              f"write ptx_data: [{item}]")
    with pytest.raises(UserError) as err:
        load_config(PPOConfig, None, [override])
    assert str(err.value) == (f"command line, field 'ptx_data': must be a list, got {got}; "
                              f"write ptx_data=[{item}]")
    assert main(["ppo", "--config", str(f), "--policy", "x", "--prompts", "y",
                 "--out", str(tmp_path / "out")]) == 2
    assert "field 'ptx_data': must be a list" in capsys.readouterr().err
    assert load_config(PPOConfig, None, ["ptx_data=[a.txt,b.txt]"]).ptx_data == ["a.txt", "b.txt"]
    assert not (tmp_path / "out").exists()


def test_yaml_then_overrides_then_flags(tmp_path):
    f = tmp_path / "ppo.yaml"
    f.write_text("steps: 10\nkl_coef: 0.05\nlr: 0.001\n")
    cfg = load_config(PPOConfig, f, ["kl_coef=0.1", "clip=0.3"], lr=0.002, steps=None)
    assert (cfg.steps, cfg.kl_coef, cfg.clip, cfg.lr) == (10, 0.1, 0.3, 0.002)


def test_generate_prints_a_continuation(tiny_model, capsys):
    assert main(["generate", "--model", str(tiny_model), "--prompt", "hello", "--greedy",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_output_into_a_pipe_whose_reader_is_gone_ends_quietly_as_sigpipe_would(tiny_model):
    # `gptlab world score ... | head -1` printed a BrokenPipeError traceback and exited 1, the
    # internal-error code: a reader that stops reading is no error of gptlab's.
    import os
    import subprocess
    import sys
    from pathlib import Path
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    # The checkout first, then whatever PYTHONPATH already holds (a GPU machine keeps the
    # packages it lacks there).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, "-m", "gptlab", "generate", "--model",
                               str(tiny_model), "--prompt", "hello", "--prompt", "world",
                               "--greedy", "--max-new-tokens", "5"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
                              timeout=300)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


def test_a_prompt_longer_than_the_context_is_an_error_or_reported_truncation(tiny_model, capsys):
    long_prompt = "the quick brown fox " * 20
    assert main(["generate", "--model", str(tiny_model), "--prompt", long_prompt,
                 "--max-new-tokens", "4"]) == 2
    assert "--truncate" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model), "--prompt", long_prompt,
                 "--max-new-tokens", "4", "--truncate", "--greedy"]) == 0
    assert "truncated: dropped its first" in capsys.readouterr().err


def test_truncation_keeps_the_bos_a_model_was_trained_with(capsys):
    from gptlab.api import fit_prompt
    ids = [0, 5, 6, 7, 8, 9]  # BOS (id 0), then five tokens; room for 4 with context 5
    assert fit_prompt(ids, 5, 1, True, bos_id=0) == ([0, 7, 8, 9], 2)
    assert "dropped its first 2 of 6 tokens after BOS" in capsys.readouterr().err
    assert fit_prompt(ids, 5, 1, True) == ([6, 7, 8, 9], 2)  # no BOS to keep
    with pytest.raises(UserError, match="leaves no room"):
        fit_prompt(ids, 5, 4, True, bos_id=0)  # room 1: BOS alone, nothing of the prompt


def test_generate_on_a_missing_model_exits_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "model not found" in capsys.readouterr().err


def test_torchrun_with_more_than_one_process_is_refused_before_anything_runs(
        tiny_model, tmp_path, monkeypatch, capsys):
    # Distributed training is not built: N processes would each train and write the same --out.
    monkeypatch.setenv("WORLD_SIZE", "2")
    out, corpus = tmp_path / "pre", tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    assert main(["pretrain", "--data", str(corpus), "--model", "tiny", "--max-steps", "1",
                 "--out", str(out)]) == 2
    assert "WORLD_SIZE=2" in capsys.readouterr().err and not out.exists()
    for one in ("1", "²"):  # torchrun --nproc-per-node 1 runs as usual; "²" is no count
        monkeypatch.setenv("WORLD_SIZE", one)
        assert main(["generate", "--model", str(tiny_model), "--prompt", "hello", "--greedy",
                     "--max-new-tokens", "3"]) == 0


def test_sft_and_reward_without_model_or_data_name_the_missing_field():
    from gptlab.train.reward import RewardConfig, train_reward_model
    from gptlab.train.sft import SFTConfig, sft
    for run, cfg, field in ((sft, SFTConfig(data="d.jsonl", out="o"), "model"),
                            (sft, SFTConfig(model="m", out="o"), "data"),
                            (train_reward_model, RewardConfig(data="r.jsonl", out="o"), "model"),
                            (train_reward_model, RewardConfig(model="m", out="o"), "data")):
        with pytest.raises(UserError) as err:
            run(cfg)
        assert err.value.field == field and "needs model (--model) and data (--data)" in str(
            err.value)


def test_pretrain_prints_its_model_directory_like_the_other_training_verbs(tmp_path, capsys):
    # sft, reward, ppo and pipeline end their output with what they wrote; pretrain did not.
    corpus, out = tmp_path / "corpus.txt", tmp_path / "pre"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    # `--data FILE key=value`: argparse gives the override to --data; it is handed back.
    assert main(["pretrain", "--model", "tiny", "--max-steps", "1", "--no-progress",
                 "--sample-tokens", "0", "--out", str(out), "--data", str(corpus),
                 "lr=0.002"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(out)
    assert json.loads((out / "run.json").read_text())["config"]["lr"] == 0.002


def test_a_training_verbs_evaluation_lines_go_to_stderr_and_stdout_holds_only_its_out(
        tmp_path, capsys):
    # `OUT=$(gptlab pretrain ...)`: the evaluation lines went to stdout (tqdm.write's default),
    # before OUT, though the README has stdout hold OUT and the pipeline's stderr hold them.
    corpus, out = tmp_path / "corpus.txt", tmp_path / "pre"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    assert main(["pretrain", "--model", "tiny", "--max-steps", "2", "--eval-every", "1",
                 "--no-progress", "--sample-tokens", "4", "--out", str(out),
                 "--data", str(corpus)]) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [str(out)]
    assert [line.split(":")[0] for line in cap.err.splitlines()
            if line.startswith("step ")] == ["step 0", "step 1", "step 2"]
    assert cap.err.count("  sample: ") == 3


def test_run_directory_records_config_versions_and_command(tmp_path):
    record_run(tmp_path, PPOConfig(steps=3))
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["config"]["steps"] == 3
    assert info["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert "command" in info and "git_commit" in info and "git_dirty" in info


def test_run_json_command_of_python_m_gptlab_can_be_typed_again(tmp_path, monkeypatch):
    # It was ["__main__.py", "pretrain", ...]: no command of that name exists.
    import os
    import sys
    import gptlab
    main_py = os.path.join(os.path.dirname(gptlab.__file__), "__main__.py")
    monkeypatch.setattr(sys, "argv", [main_py, "pretrain", "--data", "c.txt"])
    record_run(tmp_path, PPOConfig(steps=3))
    assert json.loads((tmp_path / "run.json").read_text())["command"] == [
        os.path.basename(sys.executable), "-m", "gptlab", "pretrain", "--data", "c.txt"]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/gptlab", "sft", "--out", "x"])
    record_run(tmp_path, PPOConfig(steps=3))
    assert json.loads((tmp_path / "run.json").read_text())["command"] == [
        "gptlab", "sft", "--out", "x"]


def test_git_commit_is_gptlabs_own_and_says_when_its_files_differ(tmp_path):
    # A copy of the package inside another project's repository, but not tracked by it (a
    # virtual environment in the project), recorded that project's commit as gptlab's.
    import shutil
    import subprocess
    from gptlab.provenance import git_state
    if shutil.which("git") is None:
        pytest.skip("no git")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "README").write_text("a project\n")
    git("add", "README")
    git("commit", "-q", "-m", "project")
    pkg = tmp_path / "venv" / "gptlab"
    pkg.mkdir(parents=True)
    (pkg / "provenance.py").write_text("x = 1\n")
    assert git_state(pkg) is None
    git("add", "venv")
    git("commit", "-q", "-m", "the package")
    head = git("rev-parse", "HEAD")
    assert git_state(pkg) == (head, False)
    (pkg / "provenance.py").write_text("x = 2\n")   # edited, not committed
    assert git_state(pkg) == (head, True)
    (tmp_path / "README").write_text("the project's own file, not gptlab's\n")
    (pkg / "provenance.py").write_text("x = 1\n")
    assert git_state(pkg) == (head, False)


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "-1"],
     "field '--max-new-tokens': must be an integer of at least 1, got -1"),
    (["--temperature", "nan"], "field 'temperature': must be a finite number, got nan"),
    (["--temperature", "0"], "field 'temperature': must be > 0"),
    (["--top-k", "-3"], "field '--top-k': must be an integer of at least 1, got -3"),
    (["--top-p", "1.5"], "field '--top-p': must be in (0, 1], got 1.5"),
    (["--top-p", "0"], "field '--top-p': must be in (0, 1], got 0.0"),
])
def test_generate_refuses_bad_sampling_flags(tiny_model, flags, message, capsys):
    assert main(["generate", "--model", str(tiny_model), "--prompt", "hello", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptlab generate: error: ") and message in err


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "-1"],
     "field '--max-new-tokens': must be an integer of at least 1, got -1"),
    (["--temperature", "-1"], "field 'temperature': must be > 0, got -1.0 (greedy decoding is "
                              "--greedy, greedy=True in Python)"),
    (["--temperature", "0"], "field 'temperature': must be > 0, got 0.0"),
    (["--top-p", "2"], "field '--top-p': must be in (0, 1], got 2.0"),
])
def test_sample_refuses_bad_sampling_flags_like_generate(tiny_model, tmp_path, flags, message,
                                                          capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [prompts]


def _one_prompt_args(verb, tmp_path):
    """A decoding verb's arguments for one prompt, "hello", and the file sample would write."""
    prompts, out = tmp_path / "p.jsonl", tmp_path / "s.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    return {"generate": ["--prompt", "hello"], "chat": [],
            "sample": ["--prompts", str(prompts), "--k", "1", "--out", str(out)]}[verb], out


@pytest.mark.parametrize("verb", ["generate", "sample", "chat"])
def test_greedy_and_a_temperature_exclude_each_other_in_every_verb(tiny_model, tmp_path, verb,
                                                                    capsys):
    # `chat` refused `--greedy --temperature 0.5`; `generate` and `sample` decoded greedily and
    # dropped the temperature without a word.
    args, out = _one_prompt_args(verb, tmp_path)
    with pytest.raises(SystemExit) as e:
        main([verb, "--model", str(tiny_model), *args, "--max-new-tokens", "2", "--greedy",
              "--temperature", "0.5"])
    assert e.value.code == 2
    assert "argument --temperature: not allowed with argument --greedy" in capsys.readouterr().err
    assert not out.exists()


def test_generate_names_a_prompt_too_long_by_its_flag(tiny_model, capsys):
    # It said `field 'prompts[1]'`, generate_text's parameter, which no one typed.
    long = "the cat sat on the mat " * 200
    assert main(["generate", "--model", str(tiny_model), "--prompt", "hi", "--prompt", long,
                 "--max-new-tokens", "4"]) == 2
    assert capsys.readouterr().err.startswith(
        "gptlab generate: error: field '--prompt (the 2nd)': prompt has ")
    assert main(["generate", "--model", str(tiny_model), "--prompt", long,
                 "--max-new-tokens", "4"]) == 2
    assert capsys.readouterr().err.startswith("gptlab generate: error: field '--prompt': prompt ")


def test_a_prompt_that_is_not_utf8_is_refused(tiny_model, capsys):
    # A byte that is not UTF-8 in argv reaches Python as a lone surrogate.
    assert main(["generate", "--model", str(tiny_model), "--prompt", "h\udcffi"]) == 2
    assert capsys.readouterr().err == ("gptlab generate: error: field 'prompt': not UTF-8 "
                                       "text: byte 0xff at character 2 cannot be decoded\n")
    # chat's --system too (it named no field, once the model had loaded).
    assert main(["chat", "--model", str(tiny_model / "gone"), "--system", "caf\udce9"]) == 2
    assert capsys.readouterr().err == ("gptlab chat: error: field 'system': not UTF-8 "
                                       "text: byte 0xe9 at character 4 cannot be decoded\n")
    # tokenizer encode's text is named too (it named no field), before the tokenizer loads.
    assert main(["tokenizer", "encode", "--tokenizer", str(tiny_model / "gone"), "caf\udce9"]) == 2
    assert capsys.readouterr().err == ("gptlab tokenizer encode: error: field 'text': not UTF-8 "
                                       "text: byte 0xe9 at character 4 cannot be decoded\n")


def test_sample_writes_nothing_when_no_prompt_fits(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "world"}\n')
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--out", str(out), "--max-new-tokens", "1000"]) == 2
    assert capsys.readouterr().err == (
        f"gptlab sample: error: {prompts}: no prompt could be sampled (skipped 2 prompts: 2 "
        f"prompts longer than the context minus max_new_tokens); the model's context is 32 "
        f"tokens, --max-new-tokens 1000\n")
    assert not out.exists()


def test_a_model_with_nan_weights_is_an_error_and_sample_writes_nothing(tiny_model, tmp_path,
                                                                         capsys):
    """Refused as it loads, naming the tensor (NaN logits, the engine's own refusal, are
    tested in test_engine on a model changed in memory)."""
    from gptlab.checkpoint import load_model
    net, tok, _ = load_model(tiny_model)
    with torch.no_grad():
        net.lm_head.weight[3] = float("nan")
    save_model(tmp_path / "nan", net, tok)
    assert main(["generate", "--model", str(tmp_path / "nan"), "--prompt", "hello",
                 "--max-new-tokens", "4"]) == 2
    said = (f"{tmp_path / 'nan' / 'model.safetensors'}: tensor 'tok_emb.weight' holds "
            f"non-finite weights (")  # tied: lm_head's row is the embedding's
    assert said in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(tmp_path / "nan"), "--prompts", str(prompts),
                 "--out", str(out), "--max-new-tokens", "4"]) == 2
    assert said in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan", "p.jsonl"]


def test_sample_names_a_bad_prompts_line_before_loading_the_model(tmp_path, capsys):
    # The prompts were read after the model loaded: a broken line waited for it (minutes for a
    # large model), and a missing model hid it.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"id": 2}\n')
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts),
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"gptlab sample: error: {prompts}:2: needs a 'prompt' "
                                       f"or a 'messages' field; the line has 'id'\n")
    assert not out.exists()


def test_sample_refuses_k_greedy_copies_of_one_response(tiny_model, tmp_path, capsys):
    # `--greedy` with the default --k 4 wrote 4 identical responses per prompt, which `label`
    # merges and then skips every prompt for.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "hello"}\n')
    out = tmp_path / "s.jsonl"
    for model in (tiny_model, tmp_path / "no-model"):  # refused before the model loads
        assert main(["sample", "--model", str(model), "--prompts", str(prompts),
                     "--out", str(out), "--max-new-tokens", "2", "--greedy"]) == 2
        assert capsys.readouterr().err == (
            "gptlab sample: error: field 'k': 4 greedy responses per prompt would be 4 copies "
            "of one; use --k 1 with --greedy, or sample K different ones with a temperature\n")
        assert not out.exists()
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--out", str(out), "--max-new-tokens", "2", "--greedy", "--k", "1"]) == 0
    rows = read_jsonl(out)
    assert [(r["id"], len(r["responses"])) for r in rows] == [(1, 1)]


def test_any_integer_seed_samples_and_the_seeds_torch_took_sample_as_before(tiny_model, tmp_path,
                                                                           capsys):
    # A --seed past torch's range [-2**63, 2**64) was a traceback (ValueError: Overflow when
    # unpacking long long), for `sample` already from 10**13 (it seeds seed * 1_000_003 + batch).
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')

    def sample(seed: int) -> list[str]:
        out = tmp_path / f"s{seed}.jsonl"
        assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts), "--k", "2",
                     "--max-new-tokens", "4", "--seed", str(seed), "--out", str(out)]) == 0
        return read_jsonl(out)[0]["responses"]
    assert sample(10**13) == sample(10**13)
    capsys.readouterr()

    def generate(seed: int) -> str:
        assert main(["generate", "--model", str(tiny_model), "--prompt", "hello",
                     "--max-new-tokens", "6", "--seed", str(seed)]) == 0
        return capsys.readouterr().out
    # modulo 2**64, as torch reads a negative seed: -1 is 2**64 - 1, as it was
    assert generate(2**70 + 7) == generate(7) != generate(8)
    assert generate(-1) == generate(2**64 - 1)


def test_sample_says_how_many_responses_max_new_tokens_cut(tiny_model, tmp_path, capsys):
    # A response stopped by --max-new-tokens was written like a finished one, and nothing said
    # so; ranked and trained on, it reads as an answer closed by EOS.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "the quick"}\n')
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts), "--k", "3",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("note: 6 of 6 responses reached --max-new-tokens 2 unfinished (no "
                            "end of sequence or end of turn): they are written cut, false in "
                            "their line's \"finished\"\n")
    assert captured.out == f"wrote 2 prompts x 3 responses to {out}\n"
    assert [r["finished"] for r in read_jsonl(out)] == [[False] * 3] * 2

    # One prompt, one response: "1 of 1 responses ... they are", "wrote 1 prompts x 1 responses".
    prompts.write_text('{"prompt": "hello"}\n')
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts), "--k", "1",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("note: 1 of 1 response reached --max-new-tokens 2 unfinished (no "
                            "end of sequence or end of turn): it is written cut, false in "
                            "its line's \"finished\"\n")
    assert captured.out == f"wrote 1 prompt x 1 response to {out}\n"


def test_sample_marks_each_cut_response_and_ends_it_before_a_split_character(tiny_model,
                                                                             tmp_path,
                                                                             monkeypatch):
    # A response cut between the byte tokens of one character ("€", three bytes) ended in
    # U+FFFD, and which responses were cut was nowhere in the file. Now a `finished` list per
    # line says it, and a cut response ends before that character, as `chat` and `generate`
    # cut; the pipeline's own sampling (no mark_cut) is as it was.
    from gptlab.checkpoint import load_model
    from gptlab.engine import Generation, SamplingParams
    from gptlab.feedback import label_samples, sample_responses
    model, tok, _ = load_model(tiny_model)
    cut = tok.encode("the cat €")[:-1]
    assert tok.decode(cut) == "the cat \ufffd"
    done = tok.encode("the mat \ufffd") + [tok.eos_id]  # invalid bytes it chose to end on stay

    def generate(model, prompts, params, seed=None, pad_id=0):
        tokens = [cut if i % 2 == 0 else done for i in range(len(prompts))]
        return Generation(tokens, [[0.0] * len(t) for t in tokens],
                          [i % 2 == 1 for i in range(len(prompts))])
    monkeypatch.setattr("gptlab.feedback.generate", generate)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "hello"}\n')
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts), "--k", "2",
                 "--max-new-tokens", "8", "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert [{k: v for k, v in r.items() if k != "_line"} for r in rows] == [
        {"id": 1, "prompt": "hello", "responses": ["the cat ", "the mat \ufffd"],
         "finished": [False, True]}]
    ranked = label_samples(rows, lambda rec, responses: sorted(responses))
    assert ranked == [{"id": 1, "prompt": "hello", "ranked": ["the cat ", "the mat \ufffd"]}]
    plain = sample_responses(model, tok, [{"prompt": "hello"}], 2,
                             SamplingParams(max_new_tokens=8))
    assert plain == [{"prompt": "hello", "responses": ["the cat \ufffd", "the mat \ufffd"]}]


def sentencepiece_model(d, template):
    """A tiny random GPT with `test_tokenizer`'s SentencePiece tokenizer and `template`."""
    from test_tokenizer import sentencepiece_tokenizer
    tok = sentencepiece_tokenizer(template)
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
    save_model(d, GPT(cfg), tok)
    return tok


def answering(ids):
    """An engine that answers every prompt with `ids`, which end it."""
    from gptlab.engine import Generation

    def generate(model, prompts, params, seed=None, pad_id=0):
        return Generation([list(ids) for _ in prompts], [[0.0] * len(ids) for _ in prompts],
                          [True] * len(prompts))
    return generate


@pytest.mark.parametrize("template, chat_text", [("ZEPHYR_CHAT", " yes it is"),
                                                 ("LLAMA2_CHAT", "yes it is")])
def test_sample_writes_a_sentencepiece_response_as_its_prompt_reads_it_back(
        tmp_path, monkeypatch, template, chat_text):
    # "▁yes ▁it ▁is" after Zephyr's "<|assistant|>\n" is " yes it is": the template writes
    # nothing before an answer, so the space is the model's (the file said "yes it is", which
    # renders back as "yes", no "▁"). After Llama 2's "[/INST]" the template's own " " comes
    # first: no space. After a text prompt the space is the model's too: " yes it is" is the
    # continuation of "is it?", as `reward` and `sft` encode a completion ("yes it is" would
    # read back glued on to the "?", no "▁").
    import test_tokenizer
    from gptlab.data.instruct import encode_response
    tok = sentencepiece_model(tmp_path / "m", getattr(test_tokenizer, template))
    said = [tok.hf.token_to_id(p) for p in ("\u2581yes", "\u2581it", "\u2581is")] + [tok.eos_id]
    monkeypatch.setattr("gptlab.feedback.generate", answering(said))
    chat = [{"role": "user", "content": "is the cat happy?"}]
    prompts = tmp_path / "p.jsonl"
    write_jsonl_atomic(prompts, [{"id": 1, "messages": chat}, {"id": 2, "prompt": "is it?"}])
    assert main(["sample", "--model", str(tmp_path / "m"), "--prompts", str(prompts), "--k", "1",
                 "--max-new-tokens", "8", "--out", str(tmp_path / "s.jsonl")]) == 0
    rows = read_jsonl(tmp_path / "s.jsonl")
    assert [r["responses"] for r in rows] == [[chat_text], [" yes it is"]]
    for r, prompt in zip(rows, (chat, "is it?")):  # as `reward` and `sft` read them
        tail = [tok.hf.token_to_id("\u2581")] if template == "LLAMA2_CHAT" and r["id"] == 1 \
            else []  # Llama 2's " " before </s>
        assert encode_response(tok, r["responses"][0], prompt) == said[:-1] + tail + said[-1:]


@pytest.mark.parametrize("said", [["\u2581paris"], ["par", "is"], ["s", "\u2581paris"],
                                  ["\u2581", "\u2581paris"], ["<0x0A>", "\u2581yes", "\u2581it"]])
def test_a_sentencepiece_sample_after_a_text_prompt_reads_back_as_the_tokens_sampled(
        tmp_path, monkeypatch, said):
    """`sample` wrote a text prompt's response decoded alone, and `reward` and `sft` encoded it
    alone: "▁paris" after "the capital is" came back "▁paris" only by luck of the "▁" that
    encoding puts first; "par", "is" came back "▁paris", and "▁", "▁paris" as "▁paris". Now the
    response is the continuation of the prompt's text, and reads back as what was sampled,
    finished or cut."""
    from gptlab.data.instruct import encode_response
    tok = sentencepiece_model(tmp_path / "m", None)
    ids = [tok.hf.token_to_id(p) for p in said]
    prompts = tmp_path / "p.jsonl"
    texts = ["the capital is", "the capital i", "is the cat happy?", "yes it is "]
    write_jsonl_atomic(prompts, [{"id": i, "prompt": t} for i, t in enumerate(texts)])
    for finished in (True, False):
        monkeypatch.setattr("gptlab.feedback.generate",
                            answering(ids + [tok.eos_id]) if finished else cut_at(ids))
        assert main(["sample", "--model", str(tmp_path / "m"), "--prompts", str(prompts),
                     "--k", "1", "--max-new-tokens", "8", "--out", str(tmp_path / "s.jsonl")]) == 0
        for row, prompt in zip(read_jsonl(tmp_path / "s.jsonl"), texts):
            assert row["finished"] == [finished]
            assert encode_response(tok, row["responses"][0], prompt) == ids + [tok.eos_id]


def cut_at(ids):
    """An engine that answers every prompt with `ids`, cut at max_new_tokens."""
    from gptlab.engine import Generation

    def generate(model, prompts, params, seed=None, pad_id=0):
        return Generation([list(ids) for _ in prompts], [[0.0] * len(ids) for _ in prompts],
                          [False] * len(prompts))
    return generate


def test_sample_and_label_never_write_over_their_input(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    before = prompts.read_bytes()
    (tmp_path / "sub").mkdir()
    same = tmp_path / "sub" / ".." / "p.jsonl"  # the same file, spelled otherwise
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--out", str(same)]) == 2
    assert capsys.readouterr().err == (
        f"gptlab sample: error: {same}, field 'out': is the input file (--prompts); writing "
        f"would replace it, choose another out (--out)\n")
    assert main(["label", "--in", str(prompts), "--out", str(prompts)]) == 2
    assert "field 'out': is the input file (--in)" in capsys.readouterr().err
    assert prompts.read_bytes() == before


def test_nan_in_a_jsonl_line_is_refused_and_never_written(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "world", "weight": NaN}\n')
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--out", str(out), "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err == (f"gptlab sample: error: {prompts}:2, field 'weight': not "
                                       f"valid JSON (NaN is not a JSON number; write null or a "
                                       f"finite number)\n")
    assert not out.exists()
    prompts.write_text('{"prompt": "hello", "weight": -Infinity}\n')
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--out", str(out), "--max-new-tokens", "2"]) == 2
    assert "-Infinity is not a JSON number" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"s.jsonl:1, field 'x': is NaN, which JSON has no "):
        write_jsonl_atomic(out, [{"x": float("nan")}])
    assert not out.exists()


def test_a_number_too_large_to_read_in_a_jsonl_line_is_refused_naming_its_line(
        tiny_model, tmp_path, capsys):
    # 1e999 was read as infinity, carried into the samples and refused by the writer after
    # sampling (a ValueError traceback); 5,000 digits made json's int() raise one at once.
    prompts = tmp_path / "p.jsonl"
    out = tmp_path / "s.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "world", "weight": 1e999}\n')
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--out", str(out), "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err == (f"gptlab sample: error: {prompts}:2, field 'weight': not "
                                       f"valid JSON (1e999 is too large for a 64-bit float; write "
                                       f"null or a finite number)\n")
    prompts.write_text('{"prompt": "hello"}\n\n{"prompt": "world", "weight": ' + "9" * 5000
                       + '}\n')
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--out", str(out), "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err == (
        f"gptlab sample: error: {prompts}:3, field 'weight': cannot be read: an integer of 5000 "
        f"digits is more than the 4300 digits a number may have here; write it as a string\n")
    assert not out.exists()
    prompts.write_text('{"prompt": "hello", "weight": 1e308, "n": -' + "9" * 4300 + '}\n')
    assert read_jsonl(prompts)[0]["weight"] == 1e308     # the largest still read as they are
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    text = (model / "config.json").read_text()
    (model / "config.json").write_text(text.replace("{", '{"x": ' + "9" * 5000 + ",", 1))
    assert main(["generate", "--model", str(model), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == (
        f"gptlab generate: error: {model / 'config.json'}: cannot be read: an integer of 5000 "
        f"digits is more than the 4300 digits a number may have here; write it as a string\n")


def test_outputs_in_the_place_of_a_directory_or_under_a_file_are_refused(tiny_model, tmp_path,
                                                                         capsys):
    a_file, a_dir = tmp_path / "afile", tmp_path / "adir"
    a_file.write_text("x")
    a_dir.mkdir()
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, the quick brown fox\n" * 20)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    sample = ["sample", "--model", str(tiny_model), "--prompts", str(prompts),
              "--max-new-tokens", "2", "--out"]
    for argv, message in (
            (["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out",
              str(a_file)], f"{a_file}, field 'out': is a file, not a directory"),
            (["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out",
              str(a_file / "sub")], f"{a_file / 'sub'}, field 'out': parent is a file: {a_file} "
                                    f"is not a directory"),
            (sample + [str(a_dir)], f"{a_dir}: is a directory; give a file name"),
            (sample + [str(a_file / "x.jsonl")],
             f"{a_file / 'x.jsonl'}: parent is a file: {a_file} is not a directory")):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"{command(argv)}: error: {message}\n"
    assert a_file.read_text() == "x" and list(a_dir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "c.txt", "p.jsonl"]
    with pytest.raises(UserError, match="is a directory"):
        write_jsonl_atomic(a_dir, [{"x": 1}])


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_model):
    from gptlab.checkpoint import load_model
    from gptlab.model.heads import ScalarHeadModel

    model, tok, _ = load_model(tiny_model)
    d = tmp_path_factory.mktemp("rm")
    save_model(d, ScalarHeadModel(model.config), tok)
    return d


@pytest.mark.parametrize("verb, args", [
    ("generate", ["--model", "{rm}", "--prompt", "hello"]),
    ("sample", ["--model", "{rm}", "--prompts", "{data}", "--k", "2", "--out", "{out}/s.jsonl"]),
    ("sft", ["--model", "{rm}", "--data", "{data}", "--out", "{out}/run", "--max-steps", "1"]),
    ("pretrain", ["--model", "{rm}", "--data", "{text}", "--out", "{out}/run",
                  "--max-steps", "1"]),
    ("chat", ["--model", "{rm}"]),
    ("ppo", ["--policy", "{rm}", "--reward", "{rm}", "--prompts", "{data}", "--out", "{out}/run"]),
])
def test_a_reward_model_given_where_a_language_model_is_needed_is_refused(
        verb, args, tiny_reward_model, tmp_path, capsys):
    """A reward model's directory looks like any other model's; every verb that generates or
    trains text says what it is (exit 2) and leaves nothing behind."""
    (tmp_path / "d.jsonl").write_text('{"prompt": "hello", "completion": " world"}\n')
    (tmp_path / "t.txt").write_text("hello world, the quick brown fox " * 50)
    (tmp_path / "out").mkdir()
    fill = dict(rm=tiny_reward_model, data=tmp_path / "d.jsonl", text=tmp_path / "t.txt",
                out=tmp_path / "out")
    code = main([verb, *[a.format(**fill) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and "this is a reward or value model" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []


def test_a_ppo_value_model_given_where_a_language_model_is_needed_is_named_so(
        tiny_reward_model, tmp_path, capsys):
    """PPO's value/ (its config.json's stage "value") is named as what it is."""
    import shutil
    value = shutil.copytree(tiny_reward_model, tmp_path / "run" / "value")
    meta = json.loads((value / "config.json").read_text())
    (value / "config.json").write_text(json.dumps({**meta, "stage": "value"}))
    assert main(["generate", "--model", str(value), "--prompt", "hello"]) == 2
    assert capsys.readouterr().err == (
        f"gptlab generate: error: {value}, field '--model': not a decoder-only language model: "
        f"this is PPO's value model, which has no text to say\n")


def test_a_ctrl_c_while_the_verbs_load_is_one_line_and_exit_130(monkeypatch, capsys):
    """Building the parser imports torch (seconds): a Ctrl-C then is no traceback."""
    import gptlab.cli as cli

    def slow_import():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", slow_import)
    assert cli.main(["sample", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_full_disk_or_a_read_only_out_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    # It was a traceback and exit 1 (root ignores permission bits, so the error is simulated
    # where the file is written).
    import errno

    from gptlab import tokenizer as tk
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\n" * 50)
    out = tmp_path / "tok"

    def full(self, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "tokenizer.json"))
    monkeypatch.setattr(tk.Tokenizer, "save", full)
    assert main(["tokenizer", "train", "--data", str(text), "--vocab-size", "300",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"gptlab tokenizer train: error: {out / 'tokenizer.json'}, field '--out': "
                   f"No space left on device\n")

    def other(self, directory):  # not the user's to fix: stays an internal error
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(tk.Tokenizer, "save", other)
    with pytest.raises(OSError):
        main(["tokenizer", "train", "--data", str(text), "--vocab-size", "300", "--out", str(out)])


@pytest.mark.parametrize("library", ["torch", "safetensors"])
def test_a_full_disk_inside_torch_or_safetensors_is_one_line_and_exit_2(tmp_path, monkeypatch,
                                                                         capsys, library):
    # Their own errors (a RuntimeError naming no file; a SafetensorError) were a traceback and
    # exit 1, at the largest files a run writes: the weights and the optimizer's state.
    import errno

    from safetensors import SafetensorError

    from gptlab import checkpoint as ck

    def torch_full(*a, **k):  # torch's writer, on the OSError of the file it writes to
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    def safetensors_full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    if library == "torch":
        monkeypatch.setattr(ck.torch, "save", torch_full)
    else:
        monkeypatch.setattr(ck, "st_save_model", safetensors_full)
    text, out = tmp_path / "t.txt", tmp_path / "run"
    text.write_text("the cat sat on the mat\n" * 50)
    assert main(["pretrain", "--data", str(text), "--model", "tiny", "--max-steps", "1",
                 "--eval-every", "0", "--sample-tokens", "0", "--no-progress", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    file = "optimizer.pt" if library == "torch" else "model.safetensors"
    # The checkpoint's file, not its temporary's (a random name, removed).
    assert err == (f"gptlab pretrain: error: {out}/checkpoints/step-1/{file}, field '--out': "
                   f"File too large")
    assert not (out / "checkpoints" / "step-1").exists()


def test_an_out_whose_name_is_too_long_is_one_line_and_exit_2(tmp_path, capsys):
    # A name past the file system's 255 bytes was a traceback and exit 1 in every verb (Path's
    # exists() raises ENAMETOOLONG), after the tokenizer had been trained.
    out = tmp_path / ("a" * 300)
    assert main(["world", "export", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"gptlab world export: error: {out}, field '--out': "
                                       f"File name too long\n")
    assert list(tmp_path.iterdir()) == []


def test_an_out_from_the_config_file_is_named_by_its_field(tmp_path, capsys):
    # No flag gave the path, so the line names the field the stage named (as from Python); it
    # was dropped, leaving the path alone.
    out = tmp_path / ("a" * 300)
    config = tmp_path / "pretrain.yaml"
    config.write_text(f"out: {out}\nmodel: tiny\nmax_steps: 1\n")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\n" * 50)
    assert main(["pretrain", "--config", str(config), "--data", str(text), "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == (f"gptlab pretrain: error: {out}, field 'out': File name "
                                       f"too long\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("aaa")]


def test_a_failed_write_names_the_file_it_was_writing(tmp_path, monkeypatch, capsys):
    # Python's write() raises ENOSPC without a file name: the message said "a file".
    import errno

    from gptlab import tokenizer as tk
    from gptlab.io import write_text_atomic
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\n" * 50)
    out = tmp_path / "tok"

    def full(self, directory):
        write_text_atomic(out / "tokenizer.json", "{}")
    monkeypatch.setattr(tk.Tokenizer, "save", full)

    def no_room(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("pathlib.Path.write_text", no_room)
    assert main(["tokenizer", "train", "--data", str(text), "--vocab-size", "300",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"gptlab tokenizer train: error: {out / 'tokenizer.json'}, field '--out': "
                   f"No space left on device\n")
    assert not out.exists()  # the temporary file is gone too, and the directory made for it


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_out_that_cannot_be_made_is_one_line_naming_the_flag(tiny_model, tmp_path, capsys):
    # /proc makes no new entries, not even for root (who passes every permission check): a
    # directory or a file there was a traceback and exit 1 (ENOENT, and a temporary's name).
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\n" * 50)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    for argv, where in (
            (["tokenizer", "train", "--data", str(text), "--vocab-size", "300", "--out",
              "/proc/gptlab_x/tok"], "/proc/gptlab_x"),
            (["sample", "--model", str(tiny_model), "--prompts", str(prompts), "--k", "1",
              "--max-new-tokens", "2", "--out", "/proc/gptlab_x.jsonl"], "/proc/gptlab_x.jsonl")):
        assert main(argv) == 2
        assert capsys.readouterr().err == (f"{command(argv)}: error: {where}, field '--out': "
                                           f"No such file or directory\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "t.txt"]


def test_a_missing_file_no_flag_named_stays_an_internal_error(tmp_path, monkeypatch):
    # ENOENT or ENOTDIR on a path the user gave is theirs to fix; elsewhere it is a bug.
    import errno

    from gptlab import tokenizer as tk
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\n" * 50)

    def lost(self, directory):
        raise OSError(errno.ENOTDIR, "Not a directory", str(tmp_path / "elsewhere" / "x"))
    monkeypatch.setattr(tk.Tokenizer, "save", lost)
    with pytest.raises(NotADirectoryError):
        main(["tokenizer", "train", "--data", str(text), "--vocab-size", "300",
              "--out", str(tmp_path / "tok")])

    def under_out(self, directory):
        raise OSError(errno.ENOTDIR, "Not a directory", str(tmp_path / "tok" / "x"))
    monkeypatch.setattr(tk.Tokenizer, "save", under_out)
    assert main(["tokenizer", "train", "--data", str(text), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 2


def test_the_sample_function_has_the_verbs_defaults(tiny_model, tmp_path):
    # sample_file sampled 64 new tokens where `gptlab sample` samples 96, and needed k.
    from gptlab.feedback import sample_file
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--out", str(tmp_path / "verb.jsonl")]) == 2  # 96 new tokens fill the 32
    with pytest.raises(UserError, match="--max-new-tokens 96"):
        sample_file(tiny_model, prompts, tmp_path / "api.jsonl")
    assert sample_file(tiny_model, prompts, tmp_path / "api.jsonl", max_new_tokens=4) == 1
    assert len(read_jsonl(tmp_path / "api.jsonl")[0]["responses"]) == 4


def test_git_state_leaves_the_repository_index_alone(tmp_path):
    # `git status` refreshes stale stat data and rewrites .git/index under index.lock, so a
    # run starting while the user ran git there could make their command fail on the lock.
    import os
    import shutil
    import subprocess
    from gptlab.provenance import git_state
    if shutil.which("git") is None:
        pytest.skip("no git")

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    pkg = tmp_path / "gptlab"
    pkg.mkdir()
    (pkg / "provenance.py").write_text("x = 1\n")
    git("add", "gptlab")
    git("commit", "-q", "-m", "the package")
    os.utime(pkg / "provenance.py", ns=(10**18, 10**18))  # same content, stale stat data
    index = (tmp_path / ".git" / "index").read_bytes()
    assert git_state(pkg)[1] is False
    assert (tmp_path / ".git" / "index").read_bytes() == index


@pytest.mark.parametrize("verb, flag, value", [
    ("generate", "--top-p", "0.5"), ("sample", "--top-p", "0.5"), ("chat", "--top-p", "0.5"),
    ("generate", "--top-k", "5"),  # only generate has --top-k
])
def test_greedy_with_a_top_k_or_top_p_filter_is_refused(tiny_model, tmp_path, verb, flag, value,
                                                        capsys):
    # The filters always keep the most likely token: with --greedy they were dropped silently.
    args, out = _one_prompt_args(verb, tmp_path)
    assert main([verb, "--model", str(tiny_model), *args, "--max-new-tokens", "2", "--greedy",
                 flag, value]) == 2
    name = flag[2:].replace("-", "_")
    assert capsys.readouterr().err == (
        f"gptlab {verb}: error: field '{flag}': filters sampling, but greedy decoding takes the "
        f"most likely token, which {name} always keeps; drop one of them\n")
    assert not out.exists()


def test_sample_and_label_never_write_into_their_model_or_world(tiny_model, tmp_path, capsys):
    # `sample --out MODEL/config.json` replaced the model's config with samples, and `label
    # --out WORLD/world.json` the world's manifest with rankings; both exited 0.
    from gptlab.world import build_world
    world = tmp_path / "w"
    build_world(n_train=4, n_validation=1, n_test=1, n_dialogs=1, corpus_chars=100).export(world)
    model = tmp_path / "m"
    save_model(model, GPT(dataclasses.replace(get_preset("tiny"), vocab_size=300, context=32)),
               train_tokenizer(["hello world " * 20], vocab_size=300))
    before = {p: p.read_bytes() for d in (model, world) for p in d.iterdir()}
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    for out in (model / "config.json", model / "s.jsonl"):
        assert main(["sample", "--model", str(model), "--prompts", str(prompts),
                     "--max-new-tokens", "2", "--out", str(out)]) == 2
        assert capsys.readouterr().err == (
            f"gptlab sample: error: {out}, field 'out': is inside the input {model} (--model); "
            f"writing there could replace its files, choose another out (--out)\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"id": "s0-train-00001", "prompt": "x",
                                   "responses": [" SELECT 1", " nonsense ("]}) + "\n")
    for name in ("world.json", "test.jsonl"):
        assert main(["label", "--in", str(samples), "--world", str(world),
                     "--out", str(world / name)]) == 2
        assert capsys.readouterr().err == (
            f"gptlab label: error: {world / name}, field 'out': is the input file ({name} of "
            f"--world); writing would replace it, choose another out (--out)\n")
    assert {p: p.read_bytes() for d in (model, world) for p in d.iterdir()} == before


def test_world_export_refuses_a_schema_seed_without_vary_schema_and_a_model_directory(
        tiny_model, tmp_path, capsys):
    # `--schema-seed 3` alone was recorded in world.json and changed nothing; `--out MODEL`
    # wrote the world's eight files among the model's.
    out = tmp_path / "w"
    assert main(["world", "export", "--out", str(out), "--train", "2", "--schema-seed",
                 "3"]) == 2
    assert capsys.readouterr().err == (
        "gptlab world export: error: field '--schema-seed': chooses a renaming of the schema, "
        "which only --vary-schema makes; add --vary-schema or drop --schema-seed\n")
    before = sorted(p.name for p in tiny_model.iterdir())
    assert main(["world", "export", "--out", str(tiny_model), "--train", "2"]) == 2
    assert capsys.readouterr().err == (
        f"gptlab world export: error: {tiny_model}, field 'out': already holds config.json, "
        f"model.safetensors and tokenizer.json; choose another out (--out) or remove it\n")
    assert sorted(p.name for p in tiny_model.iterdir()) == before and not out.exists()
    # A pipeline run's OUT (its pipeline.json): the world went in among its stages.
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.json").write_text('{"seed": 0}')
    assert main(["world", "export", "--out", str(run), "--train", "2"]) == 2
    assert capsys.readouterr().err == (
        f"gptlab world export: error: {run}, field 'out': already holds pipeline.json; choose "
        f"another out (--out) or remove it\n")
    assert sorted(p.name for p in run.iterdir()) == ["pipeline.json"]


def test_world_export_refuses_sizes_past_memory_and_notes_splits_it_could_not_fill(
        tmp_path, capsys):
    """`--train 1000000000` ran for hours, silent, growing toward an out-of-memory death; a
    `--test` past the questions held out gave fewer, said only in the counts line."""
    out = tmp_path / "w"
    for flag, value, what in (("--train", "1000001", "1,000,000 questions"),
                              ("--validation", "10000000", "1,000,000 questions"),
                              ("--test", "1000001", "1,000,000 questions"),
                              ("--dialogs", "1000000000", "1,000,000 dialogs"),
                              ("--corpus-chars", "10000000000", "1,000,000,000 characters")):
        assert main(["world", "export", "--out", str(out), flag, value]) == 2
        assert capsys.readouterr().err == (
            f"gptlab world export: error: field '{flag}': at most {what} ({flag}), got "
            f"{int(value):,}: the export holds everything in memory until it writes\n")
        assert not out.exists()
    assert main(["world", "export", "--out", str(out), "--train", "10", "--validation", "5000",
                 "--test", "100000", "--dialogs", "3", "--corpus-chars", "1000"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("note: --validation 5000: the world has only 918; wrote those\n"
                            "note: --test 100000: the world has only 1840; wrote those\n")
    assert "train 10, validation 918, test 1840, dialogs 3" in captured.out


@pytest.mark.parametrize("argv, message", [
    (["tokenizer", "train", "--data", "{corpus}", "--vocab-size", "300", "--out", ""],
     "gptlab tokenizer train: error: field 'out': is empty; give a path (write . for the current "
     "directory)"),
    (["pretrain", "--model", "tiny", "--data", "{corpus}", "--max-steps", "1", "--out", ""],
     "gptlab pretrain: error: field '--out': is empty; give a path (write . for the current "
     "directory)"),
    (["sample", "--model", "{model}", "--prompts", "{prompts}", "--out", ""],
     "gptlab sample: error: field 'out': is empty; give a path (write . for the current "
     "directory)"),
    # convert read '' as Path('.') and found it apart from the model, then failed writing
    # with no field named ('--to hf' named the model being converted instead).
    (["convert", "--to", "hf", "{model}", "--out", ""],
     "gptlab convert: error: field 'out': is empty; give a path (write . for the current "
     "directory)"),
    (["convert", "--from", "hf", "{model}", "--out", ""],
     "gptlab convert: error: field 'out': is empty; give a path (write . for the current "
     "directory)"),
    (["world", "export", "--out", "", "--train", "2"],
     "gptlab world export: error: field 'out': is empty; give a directory (write . for the current "
     "directory)"),
    (["label", "--in", "{prompts}", "--out", "{tmp}/r.jsonl", "--world", ""],
     "gptlab label: error: field 'world': is empty; give a world directory, or leave --world "
     "out for the built-in world"),
])
def test_an_empty_path_is_refused_not_read_as_the_current_directory(
        argv, message, tiny_model, tmp_path, monkeypatch, capsys):
    # `--out ''` was Path(''), the current directory: a tokenizer, a trained model or a world
    # was written there, over any file of the same name, and `label --world ''` fell back to
    # the built-in world.
    (tmp_path / "c.txt").write_text("hello world, the quick brown fox\n" * 20)
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n')
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fill = dict(corpus=tmp_path / "c.txt", model=tiny_model, prompts=tmp_path / "p.jsonl",
                tmp=tmp_path)
    assert main([a.format(**fill) for a in argv]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert list(cwd.iterdir()) == [] and not (tmp_path / "r.jsonl").exists()


EMPTY = "is empty; give a path (write . for the current directory)"


@pytest.mark.parametrize("argv, message", [
    # Each was read as Path(''), the current directory: ".: is a directory, not a file", a
    # model or world "not found" there, or (`world score --out ''`) no --out at all.
    (["label", "--in", "", "--out", "r.jsonl"], f"field '--in': {EMPTY}"),
    (["sample", "--model", "{model}", "--prompts", "", "--out", "s.jsonl"],
     f"field 'prompts': {EMPTY}"),
    (["sample", "--model", "", "--prompts", "{prompts}", "--out", "s.jsonl"],
     f"field 'model': {EMPTY}"),
    (["generate", "--model", "", "--prompt", "hello"], f"field 'model': {EMPTY}"),
    (["convert", "--from", "hf", "", "--out", "m"], f"field '--from': {EMPTY}"),
    (["world", "check", "--world", "", "--id", "q", "SELECT 1"], f"field 'world': {EMPTY}"),
    (["world", "score", "--world", "w", "--in", ""], f"field '--in': {EMPTY}"),
    (["world", "score", "--world", "w", "--in", "{prompts}", "--out", ""],
     f"field 'out': {EMPTY}"),
    (["tokenizer", "encode", "--tokenizer", "", "hello"], f"field 'tokenizer': {EMPTY}"),
    (["sft", "--config", "", "--model", "{model}", "--data", "{prompts}"],
     f"field 'config': {EMPTY}"),
    (["ppo", "--policy", "", "--reward", "{model}", "--prompts", "{prompts}", "--out", "o"],
     "field '--policy': is empty or not given; ppo needs policy (--policy), prompts (--prompts) "
     "and out (--out)"),
    (["pretrain", "--model", "", "--data", "{prompts}", "--out", "o"],
     "field '--model': is empty or not given; pretrain needs model (--model)"),
])
def test_every_verbs_empty_input_path_is_refused_naming_its_field(
        argv, message, tiny_model, tmp_path, monkeypatch, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n')
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fill = dict(model=tiny_model, prompts=tmp_path / "p.jsonl")
    assert main([a.format(**fill) for a in argv]) == 2
    assert capsys.readouterr().err == f"{command(argv)}: error: {message}\n"
    assert list(cwd.iterdir()) == []


def test_a_stage_names_a_setting_both_as_python_and_as_the_command_line_write_it(
        tiny_model, tmp_path, capsys):
    # Called from Python, messages named only flags ("ppo needs --policy, --prompts and --out",
    # "sft needs --model and --data", "pass --resume"), which a Python caller never wrote; and
    # `ppo` named no field at all. Each message now reads the same from both.
    from gptlab.train.ppo import PPOConfig, ppo
    from gptlab.train.sft import SFTConfig, sft
    (tmp_path / "d.jsonl").write_text('{"prompt": "hello", "completion": " world"}\n' * 4)
    data, out = str(tmp_path / "d.jsonl"), tmp_path / "out"
    cases = [
        (ppo, PPOConfig(policy=str(tiny_model), reward=str(tiny_model), out=str(out)),
         ["ppo", "--policy", str(tiny_model), "--reward", str(tiny_model), "--out", str(out)],
         "field 'prompts': is empty or not given; ppo needs policy (--policy), prompts "
         "(--prompts) and out (--out)"),
        (ppo, PPOConfig(policy=str(tiny_model), prompts=data, out=str(out)),
         ["ppo", "--policy", str(tiny_model), "--prompts", data, "--out", str(out)],
         "field 'reward': give exactly one of reward (--reward), a reward model, or reward_fn "
         "(--reward-fn)"),
        (sft, SFTConfig(data=data, out=str(out)), ["sft", "--data", data, "--out", str(out)],
         "field 'model': is empty or not given; sft needs model (--model) and data (--data)"),
        (sft, SFTConfig(model=str(tiny_model), data=data, out=str(tiny_model / "run")),
         ["sft", "--model", str(tiny_model), "--data", data, "--out", str(tiny_model / "run")],
         f"{tiny_model / 'run'}, field 'out': is inside the input model {tiny_model} (model, "
         f"--model); choose another out (--out)"),
    ]
    for run, cfg, argv, message in cases:
        with pytest.raises(UserError) as err:
            run(cfg)
        assert str(err.value) == message
        assert main(argv) == 2
        # The command line names the field by the flag that gave it, where one did.
        field = err.value.field
        flag = "--" + field.replace("_", "-")
        said = message.replace(f"field '{field}'", f"field '{flag}'") if flag in argv else message
        assert capsys.readouterr().err == f"gptlab {argv[0]}: error: {said}\n"
    assert not out.exists() and not (tiny_model / "run").exists()


@pytest.mark.parametrize("verb", ["pretrain", "tokenizer"])
def test_an_empty_data_path_is_refused_not_read_as_the_whole_current_directory(
        verb, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("not meant as a corpus\n" * 50)
    monkeypatch.chdir(cwd)
    argv = {"pretrain": ["pretrain", "--model", "tiny", "--max-steps", "1"],
            "tokenizer": ["tokenizer", "train", "--vocab-size", "300"]}[verb]
    assert main([*argv, "--data", "", "--out", str(tmp_path / "out")]) == 2
    field = "--data" if verb == "pretrain" else "data"  # a config verb names the flag
    assert capsys.readouterr().err == (f"{command(argv)}: error: field '{field}': an empty "
                                       f"path; name a corpus file or directory\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb, args", [
    ("pretrain", ["--model", "tiny", "--data", "{text}", "--max-steps", "2", "--weight-decay",
                  "1e30"]),
    ("sft", ["--model", "{model}", "--data", "{sft}", "--max-steps", "2", "--weight-decay",
             "1e30", "--lr", "1e-3"]),
    ("ppo", ["--policy", "{model}", "--reward", "{model}", "--prompts", "{sft}",
             "--weight-decay", "1e30", "--lr", "1e-3"]),
])
def test_a_weight_decay_that_would_zero_or_flip_the_weights_is_refused(verb, args, tiny_model,
                                                                        tmp_path, capsys):
    # `pretrain --weight-decay 1e30` trained to `val_loss nan`, saved that model and exited 0:
    # AdamW multiplies the weights by 1 - lr x weight_decay each step.
    (tmp_path / "t.txt").write_text("hello world, the quick brown fox " * 50)
    (tmp_path / "d.jsonl").write_text('{"prompt": "hello", "completion": " world"}\n' * 4)
    fill = dict(text=tmp_path / "t.txt", sft=tmp_path / "d.jsonl", model=tiny_model)
    out = tmp_path / "out"
    assert main([verb, *[a.format(**fill) for a in args], "--out", str(out),
                 "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"gptlab {verb}: error: field '--weight-decay': must be below 1 / lr = 1000 (AdamW "
        f"multiplies the weights by 1 - lr x weight_decay each step, which at 0.001 x 1e+30 "
        f"zeroes or flips them), got 1e+30\n")
    assert not out.exists()


@pytest.mark.parametrize("verb, data", [
    ("sft", '{"prompt": "hello", "completion": " world"}\n'),
    ("reward", '{"prompt": "hello", "chosen": " world", "rejected": " fox"}\n'),
])
def test_val_data_that_is_the_training_data_is_refused(verb, data, tiny_model, tmp_path,
                                                       capsys):
    # It trained, and validated (chose the best checkpoint, stopped early) on the training set.
    (tmp_path / "sub").mkdir()
    train = tmp_path / "d.jsonl"
    train.write_text(data * 4)
    out = tmp_path / "out"
    assert main([verb, "--model", str(tiny_model), "--data", str(train), "--val-data",
                 str(tmp_path / "sub" / ".." / "d.jsonl"), "--max-steps", "1", "--out", str(out),
                 "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"gptlab {verb}: error: field '--val-data': is the training data (data, --data): "
        f"validation would score what the model trains on; give held-out data, or leave "
        f"val_data (--val-data) out to hold out a slice of data, got "
        f"{tmp_path / 'sub' / '..' / 'd.jsonl'}\n")
    assert not out.exists()


@pytest.mark.parametrize("verb, rows, same_rows, what", [
    ("sft", [{"prompt": [{"role": "user", "content": f"q{i}"}],
              "completion": [{"role": "assistant", "content": f"a{i}"}]} for i in range(4)],
     # the same conversations as `messages`: the same tokens and loss mask
     [{"messages": [{"role": "user", "content": f"q{i}"},
                    {"role": "assistant", "content": f"a{i}"}]} for i in range(4)],
     "demonstrations"),
    ("reward", [{"prompt": f"q{i}", "chosen": f" a{i}", "rejected": " b"} for i in range(4)],
     [{"prompt": f"q{i}", "ranked": [f" a{i}", " b"]} for i in range(4)], "rankings"),
])
def test_val_data_holding_the_training_records_in_another_file_or_format_is_refused_some_warned(
        verb, rows, same_rows, what, tiny_model, tmp_path, capsys):
    # Only the --data path itself was refused: its rows as Parquet, reordered, or written in
    # another of the formats read as the same tokens trained and validated on the training set.
    import pandas as pd
    train = tmp_path / "d.jsonl"
    write_jsonl_atomic(train, rows)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    write_jsonl_atomic(tmp_path / "reordered.jsonl", rows[::-1])
    write_jsonl_atomic(tmp_path / "other_format.jsonl", same_rows)
    write_jsonl_atomic(tmp_path / "three.jsonl", rows[:3])  # held out from nothing, but fewer
    out = tmp_path / "out"
    run = [verb, "--model", str(tiny_model), "--data", str(train), "--max-steps", "1",
           "--out", str(out), "--device", "cpu", "--no-progress"]
    for name in ("d.parquet", "reordered.jsonl", "other_format.jsonl"):
        assert main([*run, "--val-data", str(tmp_path / name)]) == 2, name
        assert capsys.readouterr().err == (
            f"gptlab {verb}: error: {tmp_path / name}, field '--val-data': holds the same 4 {what} "
            f"as the training data (data, --data), in another file or format: validation would "
            f"score what the model trains on; give held-out data, or leave val_data (--val-data) "
            f"out to hold out a slice of data\n")
        assert not out.exists()
    # Records shared with --data, not all of them: the user's call, said in a warning naming the
    # first in each file (it was silent: the held-out figures scored 3 records trained on).
    write_jsonl_atomic(tmp_path / "three.jsonl", [rows[3], rows[0], rows[2]])
    assert main([*run, "--val-data", str(tmp_path / "three.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "holds the same" not in err
    assert (f"warning: {tmp_path / 'three.jsonl'}:1: 3 of 3 held-out {what} (val_data, "
            f"--val-data) are training {what} too (data, --data), the first of them at "
            f"{train}:4: validation scores them as trained on; remove them from one of the "
            f"files\n") in err
    shutil.rmtree(out)
    unseen = json.loads(json.dumps(rows[0]).replace("q0", "unseen"))
    write_jsonl_atomic(tmp_path / "held_out.jsonl", same_rows[1:][::-1] + [unseen])
    assert main([*run, "--val-data", str(tmp_path / "held_out.jsonl")]) == 0
    assert "warning: " + str(tmp_path / "held_out.jsonl") + ":1: 3 of 4 held-out" in \
        capsys.readouterr().err
    shutil.rmtree(out)
    write_jsonl_atomic(tmp_path / "unseen.jsonl", [unseen])
    assert main([*run, "--val-data", str(tmp_path / "unseen.jsonl")]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("verb, args, field", [
    ("pretrain", ["--model", "tiny", "--data", "{text}", "--max-steps", "1", "--cache-dir", ""],
     "cache_dir"),
    ("pretrain", ["--model", "tiny", "--data", "{text}", "--max-steps", "1", "--tokenizer", ""],
     "tokenizer"),
    ("sft", ["--model", "{model}", "--data", "{sft}", "--max-steps", "1", "--val-data", ""],
     "val_data"),
    ("sft", ["--model", "{model}", "--data", "{sft}", "--max-steps", "1", "--world", ""],
     "world"),
    ("reward", ["--model", "{model}", "--data", "{rank}", "--max-steps", "1", "--samples", ""],
     "samples"),
    ("ppo", ["--policy", "{model}", "--reward", "{model}", "--prompts", "{sft}", "--reference",
             ""], "reference"),
    ("pipeline", ["--world", ""], "world"),
])
def test_an_optional_setting_given_empty_is_refused_not_read_as_its_default(
        verb, args, field, tiny_model, tmp_path, capsys):
    # `--val-data ''` (an unset `$VAL`) trained with a slice of --data held out, `--cache-dir ''`
    # with the default cache, `--reference ''` against the initial policy: all without a word.
    (tmp_path / "t.txt").write_text("hello world, the quick brown fox " * 50)
    (tmp_path / "d.jsonl").write_text('{"prompt": "hello", "completion": " world"}\n' * 4)
    (tmp_path / "r.jsonl").write_text('{"prompt": "hi", "chosen": " a", "rejected": " b"}\n' * 4)
    fill = dict(text=tmp_path / "t.txt", sft=tmp_path / "d.jsonl", rank=tmp_path / "r.jsonl",
                model=tiny_model)
    out = tmp_path / "out"
    assert main([verb, *[a.format(**fill) for a in args], "--out", str(out)]) == 2
    flag = "--" + field.replace("_", "-")  # named as given: the config refuses it as it loads
    assert capsys.readouterr().err == (f"gptlab {verb}: error: field '{flag}': is empty; give a "
                                       f"value, or leave it out for its default\n")
    assert not out.exists()


def test_every_kind_of_config_flag_reaches_the_config():
    import argparse
    from gptlab.config import add_config_flags, config_from_args
    from gptlab.train.pipeline import PipelineConfig
    parser = argparse.ArgumentParser()
    add_config_flags(parser, PPOConfig)
    args = parser.parse_args(["--seed", "7", "--adaptive-kl", "--ptx-data", "a.txt", "b.txt",
                              "--kl-coef", "0.5", "--vf-coef", "0", "--reward", "rm",
                              "--no-whiten-advantages"])
    cfg = config_from_args(PPOConfig, args)
    assert (cfg.seed, cfg.adaptive_kl, cfg.ptx_data, cfg.kl_coef, cfg.vf_coef, cfg.reward,
            cfg.whiten_advantages) == (7, True, ["a.txt", "b.txt"], 0.5, 0.0, "rm", False)
    parser = argparse.ArgumentParser()
    add_config_flags(parser, PipelineConfig)
    cfg = config_from_args(PipelineConfig, parser.parse_args(["--eval-limit", "5"]))
    assert cfg.eval_limit == 5 and cfg.rounds == PipelineConfig.rounds  # int | None: an int


def test_an_error_at_the_current_directory_names_no_flag(tmp_path, monkeypatch):
    # Every relative value lies in the current directory (--data's, --out's, --device cpu):
    # an EEXIST there (a bug making it again) was one line naming the first such flag.
    import errno

    from gptlab import tokenizer as tk
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("the cat sat on the mat\n" * 50)

    def again(self, directory):
        raise OSError(errno.EEXIST, "File exists", ".")
    monkeypatch.setattr(tk.Tokenizer, "save", again)
    with pytest.raises(FileExistsError):
        main(["tokenizer", "train", "--data", "t.txt", "--vocab-size", "300", "--out", "tok"])


def test_a_failed_path_names_the_flag_it_lies_deepest_in(tmp_path, monkeypatch):
    from gptlab.cli import _flag_given, build_parser
    monkeypatch.chdir(tmp_path)
    args, _ = build_parser().parse_known_args(
        ["sft", "--model", "runs", "--data", "d.jsonl", "--out", "runs/sft", "--device", "cpu"])
    assert _flag_given(args, "runs/sft/best/config.json") == "--out"  # not --model, first
    assert _flag_given(args, "runs/x") == "--model"
    assert _flag_given(args, str(tmp_path)) is None  # not --device
    assert _flag_given(args, "elsewhere/x") is None
    args, _ = build_parser().parse_known_args(
        ["sft", "--model", "/proc/gptlab_x/m", "--data", "d.jsonl", "--out", "/proc/gptlab_x/o"])
    assert _flag_given(args, "/proc/gptlab_x") == "--out"  # made on the way to --out only


def _help_entries(parser) -> dict[str, str]:
    """Each flag's entry in a parser's --help as printed, its lines joined, by its first flag."""
    entries: dict[str, str] = {}
    current = None
    for line in parser.format_help().split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current:
            entries[current] += " " + line
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


def test_every_default_every_help_shows_is_the_real_default():
    # A config verb's flag defaults to None ("not given") and its help writes the dataclass
    # field's default by hand (config._with_default); every other verb's shows argparse's own.
    import argparse
    import re

    from test_config import CONFIG_VERBS, _load

    from gptlab.cli import _with_actions, build_parser
    from gptlab.train.loop import DEFAULT_MAX_STEPS
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for verb, verb_parser in sub.choices.items():
        fields = {}
        if "--config" in verb_parser._option_string_actions:
            cls = _load(CONFIG_VERBS[verb][0])
            fields = {f.name: (f.default if f.default is not dataclasses.MISSING
                               else f.default_factory()) for f in dataclasses.fields(cls)}
        for parser in _with_actions(verb_parser):
            entries = _help_entries(parser)
            for action in parser._actions:
                if not action.option_strings or argparse.SUPPRESS in (action.help,
                                                                      action.default):
                    continue  # --help
                entry = entries[action.option_strings[0]]
                real = fields[action.dest] if action.dest in fields else action.default
                shown = re.findall(r"\(default: ([^()]*)\)", entry)
                where = f"{parser.prog} {action.option_strings[0]}: {entry}"
                if real is None:  # a description of what happens, never a value
                    assert not shown or not re.fullmatch(r"[-\d.e]+|True|False", shown[-1]), where
                    if action.dest == "max_steps":
                        assert f"pretrain takes {DEFAULT_MAX_STEPS})" in entry, where
                    continue
                if real is False or real == [] or real == "":
                    assert not shown or shown[-1] == "False", where
                    continue
                assert len(shown) == 1, where
                text = shown[0]
                if isinstance(real, bool):
                    assert text == str(real), where
                elif isinstance(real, (int, float)):
                    assert type(real)(text) == real, where
                elif isinstance(real, list):
                    assert text.split() == [str(v) for v in real], where
                else:
                    assert text == real, where
                checked += 1
    assert checked > 150  # every verb's, the config verbs' ~140 among them


@pytest.mark.parametrize("argv, field, value", [
    (["sft", "--seed", "-1"], "seed", -1),
    (["sft", "--lr", "-0.5"], "lr", -0.5),
    # argparse's own pattern of a negative number is `-1` or `-0.5`: these were flags left
    # without a value ("argument --lr: expected one argument").
    (["sft", "--lr", "-1e-3"], "lr", -1e-3),
    (["sft", "--lr", "-1."], "lr", -1.0),
    (["ppo", "--temperature", "-.5E-1"], "temperature", -0.05),
    (["ppo", "--missing-eos-penalty", "-2e0"], "missing_eos_penalty", -2.0),
    (["sft", "--seed", "-1_000"], "seed", -1000),
    (["generate", "--model", "m", "--prompt", "-1e3", "--temperature", "-1e-3"], "temperature",
     -1e-3)])
def test_a_negative_number_after_a_flag_is_its_value(argv, field, value):
    from gptlab.cli import build_parser
    assert getattr(build_parser().parse_args(argv), field) == value


def test_a_negative_value_reaches_the_check_that_refuses_it_in_one_line(capsys):
    from gptlab.cli import build_parser
    from gptlab.config import config_from_args
    from gptlab.train.sft import SFTConfig
    with pytest.raises(UserError) as e:  # as the config loads, naming the flag
        config_from_args(SFTConfig, build_parser().parse_args(["sft", "--seed", "-1"]))
    assert str(e.value) == "field '--seed': must be in [0, 2**64), got -1"
    for t in ("-0.5", "-1e-3"):
        assert main(["generate", "--model", "m", "--prompt", "p", "--temperature", t]) == 2
        assert capsys.readouterr().err == (
            f"gptlab generate: error: field 'temperature': must be > 0, got {float(t)} (greedy "
            f"decoding is --greedy, greedy=True in Python)\n")


@pytest.mark.parametrize("argv, said", [
    (["sft", "-x"], "unknown flag -x; `gptlab sft --help` lists the flags"),
    (["generate", "--model", "m", "--prompt", "p", "-x"],
     "unknown flag -x; `gptlab generate --help` lists the flags"),
    # -1 was a stray override and -1e3 an unexpected argument: both are stray words now.
    (["sft", "-1"], "command line: override '-1' should look like key=value (quote a value that "
                    "holds spaces; flags start with --; `gptlab sft --help` lists the keys)"),
    (["sft", "-1e3"], "command line: override '-1e3' should look like key=value (quote a value "
                      "that holds spaces; flags start with --; `gptlab sft --help` lists the "
                      "keys)"),
    (["generate", "--model", "m", "--prompt", "p", "-1e3"],
     "unexpected argument '-1e3' (--prompt takes one value each time: write --prompt again "
     "before it for another, or quote a value that holds spaces; `gptlab generate --help` "
     "lists the arguments)"),
    # After a flag's one value: it said only "quote a value that holds spaces", though the
    # values were quoted.
    (["generate", "--model", "m", "--prompt", "a b", "c d"],
     "unexpected argument 'c d' (--prompt takes one value each time: write --prompt again "
     "before it for another, or quote a value that holds spaces; `gptlab generate --help` "
     "lists the arguments)"),
    (["generate", "--model=m", "x y", "--prompt", "p"],
     "unexpected argument 'x y' (--model takes one value: quote a value that holds spaces; "
     "`gptlab generate --help` lists the arguments)")])
def test_a_stray_dash_word_is_refused_in_one_line(argv, said, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2 and capsys.readouterr().err == f"gptlab {argv[0]}: error: {said}\n"


@pytest.mark.parametrize("argv, said", [
    # argparse said `argument --out: expected one argument` for each, the word at fault unnamed.
    (["sample", "--model", "m", "--prompts", "p", "--out", "-x"],
     "argument --out: expected one argument, got none before '-x', which begins with '-' and is "
     "read as a flag; write --out=-x for it to be the value"),
    (["generate", "--model", "m", "--prompt", "-x"],
     "argument --prompt: expected one argument, got none before '-x', which begins with '-' and "
     "is read as a flag; write --prompt=-x for it to be the value"),
    (["sft", "--out", "o", "--out", "--x"],  # the second --out is the one without its value
     "argument --out: expected one argument, got none before '--x', which begins with '-' and "
     "is read as a flag; write --out=--x for it to be the value"),
    (["pretrain", "--data", "-x.txt"],
     "argument --data: expected at least one argument, got none before '-x.txt', which begins "
     "with '-' and is read as a flag; write --data=-x.txt for it to be the value (one value; a "
     "path may be written ./-x.txt)"),
    (["convert", "--from", "hf", "-m", "--out", "o"],
     "argument --from: expected 2 arguments, got only 1 before '-m', which begins with '-' and "
     "is read as a flag; write a path that begins with '-' as ./-m"),
    # A value left out: the flag that followed, or the end of the line.
    (["generate", "--model", "m", "--prompt", "p", "--top-k", "--seed", "1"],
     "argument --top-k: expected one argument, got none before --seed"),
    (["generate", "--model", "m", "--prompt", "p", "--top-k", "--seed=1"],
     "argument --top-k: expected one argument, got none before --seed=1"),
    (["generate", "--model", "m", "--prompt", "--"],
     "argument --prompt: expected one argument, got none before --"),
    (["sft", "--lr"], "argument --lr: expected one argument, got none before the end of the "
                      "command line"),
    (["convert", "--out", "o", "--from", "hf"],
     "argument --from: expected 2 arguments, got only 1 before the end of the command line"),
    (["convert", "--from=hf", "m", "--out", "o"],
     "argument --from: expected 2 arguments: '=' gives a flag one value; write the 2 after a "
     "space (--from hf|gguf PATH)"),
    # Not a flag's value: the message is argparse's.
    (["generate", "--model", "m", "--prompt", "p", "--top-k", "x"],
     "argument --top-k: invalid int value: 'x'")])
def test_a_missing_value_or_one_that_begins_with_a_dash_says_which_and_how_to_write_it(
        argv, said, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == f"gptlab {argv[0]}: error: {said}\n"


def test_a_value_that_begins_with_a_dash_is_taken_after_an_equals_sign(capsys):
    from gptlab.cli import build_parser
    args = build_parser().parse_args(["generate", "--model=-m", "--prompt=-x", "--prompt",
                                      "-- hello", "--temperature=-1"])
    assert (args.model, args.prompt, args.temperature) == ("-m", ["-x", "-- hello"], -1.0)
    args = build_parser().parse_args(["pretrain", "--data=-x.txt", "--out=-o"])
    assert (args.data, args.out) == (["-x.txt"], "-o")
    args = build_parser().parse_args(["tokenizer", "encode", "--tokenizer", "t", "--", "-x"])
    assert args.text == "-x"
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "encode", "--tokenizer", "t", "-x"])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        "gptlab tokenizer encode: error: the following arguments are required: text ('-x' "
        "begins with '-' and is read as a flag; write -- -x for it to be the text)")


def _parsers(parser, prog=("gptlab",)):
    """(command words, parser) of `parser` and of every verb and action under it."""
    import argparse
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*prog, name))


def test_every_flag_of_every_verb_says_what_it_is():
    # `ppo --help` showed --ptx-data with no text at all, and some 130 flags (--lr, --ptx-coef,
    # --batch-size, tokenizer encode's --tokenizer) only with their default.
    import argparse
    import re

    from gptlab.cli import build_parser
    bare = []
    for words, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            text = (action.help or "").replace("%(default)s", str(action.default))
            said = re.sub(r"\((default: .*|required)\)$", "", text).strip()
            if not said:
                bare.append(" ".join(words[1:]) + " " + "/".join(action.option_strings
                                                                  or [action.dest]))
    assert bare == [], f"{len(bare)} without help: {', '.join(bare)}"


def _switches():
    """(command words, flag spellings, action kind) of every flag of every verb that takes no
    value (--help aside): store_true and --x/--no-x flags, new ones included."""
    import argparse

    from gptlab.cli import build_parser
    for words, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.nargs == 0 and not isinstance(action, argparse._HelpAction):
                kind = "both" if isinstance(action, argparse.BooleanOptionalAction) else "on"
                for flag in action.option_strings:
                    yield pytest.param(list(words[1:]), flag, kind, action.option_strings,
                                       id=" ".join([*words[1:], flag]))


@pytest.mark.parametrize("words,flag,kind,spellings", list(_switches()))
def test_a_switch_given_a_value_says_it_takes_none_and_how_to_turn_it_on_and_off(
        capsys, words, flag, kind, spellings):
    # `--greedy=yes` said argparse's "argument --greedy: ignored explicit argument 'yes'".
    with pytest.raises(SystemExit) as e:
        main([*words, f"{flag}=yes"])
    name = "/".join(spellings)
    how = (f"write {spellings[0]} to turn it on, {spellings[1]} to turn it off" if kind == "both"
           else f"write {flag} to turn it on, and leave it out to leave it off")
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"gptlab {' '.join(words)}: error: argument {name}: takes no value, got "
        f"'{flag}=yes'; {how}\n")


def test_switches_are_found_in_every_kind_of_verb():
    # The parametrization above covers a plain verb's, an action's and a config verb's switches.
    found = {p.id for p in _switches()}
    assert {"generate --greedy", "world export --vary-schema", "label --no-ties",
            "sft --compile", "ppo --no-adaptive-kl", "pipeline --no-headroom"} <= found


def test_a_switch_given_a_value_is_named_by_its_own_word_among_others_with_values(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model=m", "--prompt=p", "--greedy=yes"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "gptlab generate: error: argument --greedy: takes no value, got '--greedy=yes'; write "
        "--greedy to turn it on, and leave it out to leave it off\n")


@pytest.mark.parametrize("add, said", [
    (dict(action="store_false"), "write --quiet to turn it off, and leave it out to leave it on"),
    (dict(action="store_const", const=3), "write --quiet alone")])
def test_a_switch_of_another_kind_given_a_value_says_how_it_is_written(add, said, capsys):
    # No verb has these kinds yet: a parser of gptlab's kind with one of them.
    from gptlab.cli import _Parser
    parser = _Parser(prog="p")
    parser.add_argument("-q", "--quiet", "--silent", **add)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--quiet=no"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"p: error: argument -q/--quiet/--silent: takes no value, got '--quiet=no'; {said}\n")


@pytest.mark.parametrize("argv, said", [
    # "-" (standard input) and a word with a space are values, as argparse reads them: the
    # flag that stopped --from is --out.
    (["convert", "--from", "-", "--out", "o"],
     "argument --from: expected 2 arguments, got only 1 before --out"),
    (["convert", "--from", "-m x", "--out", "o"],
     "argument --from: expected 2 arguments, got only 1 before --out"),
    # An earlier --out=o had its value: the --out at the end is the one without.
    (["sft", "--out=o", "--out"],
     "argument --out: expected one argument, got none before the end of the command line")])
def test_the_word_that_stopped_a_flag_s_values_is_one_argparse_reads_as_a_flag(argv, said,
                                                                               capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == f"gptlab {argv[0]}: error: {said}\n"


@pytest.mark.parametrize("args,flag", [
    (["sft", "--model", "{m}", "--data", "{ok}", "--val-data", "{gone}", "--out", "{out}"],
     "--val-data"),
    (["reward", "--model", "{m}", "--data", "{ok}", "--samples", "{gone}", "--out", "{out}"],
     "--samples"),
    (["label", "--labeler", "json:dumps", "--in", "{gone}", "--out", "{out}"], "--in"),
    (["tokenizer", "train", "--data", "{ok}", "{gone}", "--out", "{out}"], "--data"),
])
def test_a_missing_input_file_names_the_flag_that_gave_it(tmp_path, tiny_model, capsys, args,
                                                          flag):
    # "nope.jsonl: file not found" left the user to work out which of --data, --val-data and
    # --samples was mistyped.
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"prompt": "a", "completion": " b", "chosen": " b", "rejected": " c",
                              "text": "c"}) + "\n")
    gone, out = tmp_path / "gone.jsonl", tmp_path / "out"
    assert main([a.format(m=tiny_model, ok=ok, gone=gone, out=out) for a in args]) == 2
    err = capsys.readouterr().err
    assert f": error: {gone}, field '{flag}': " in err and err.endswith("not found\n"), err
    assert not out.exists()


@pytest.mark.parametrize("args, flag, said", [
    # Each named its config field or parameter ('data', 'tokenizer', 'world'), or no flag.
    (["pretrain", "--data", "{gone}", "--out", "{out}"], "--data", "corpus file not found"),
    (["pretrain", "--data", "{ok}", "--tokenizer", "{gone}", "--out", "{out}"], "--tokenizer",
     "tokenizer not found"),
    (["pretrain", "--data", "{ok}", "--model", "{gone}", "--out", "{out}"], "--model",
     "model directory not found"),
    (["label", "--in", "{ok}", "--world", "{gone}", "--out", "{out}"], "--world",
     "world directory not found (make one with `gptlab world export`)"),
    (["tokenizer", "encode", "--tokenizer", "{gone}", "hi"], "--tokenizer",
     "tokenizer not found (expected a directory with tokenizer.json, or a tokenizer.json file)"),
    (["sft", "--model", "{m}", "--data", "{ok}", "--world", "{gone}", "--out", "{out}"],
     "--world", "world directory not found (make one with `gptlab world export`)"),
])
def test_an_input_not_found_names_the_flag_typed_not_the_field_behind_it(
        tmp_path, tiny_model, capsys, args, flag, said):
    ok = tmp_path / "ok.txt"
    ok.write_text(json.dumps({"prompt": "a", "completion": " b", "id": "x",
                              "responses": ["a", "b"]}) + "\n")
    gone, out = tmp_path / "gone", tmp_path / "out"
    argv = [a.format(m=tiny_model, ok=ok, gone=gone, out=out) for a in args]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"{command(argv)}: error: {gone}, field '{flag}': {said}\n"
    assert not out.exists()


@pytest.mark.parametrize("argv, said", [
    (["tokenizer", "train", "--data", "{ok}", "--vocab-size", "3", "--out", "{out}"],
     "field '--vocab-size': 3 is too small: 256 byte tokens + 6 special tokens need at least "
     "262"),
    (["tokenizer", "train", "--data", "{ok}", "--vocab-size=3", "--out", "{out}"],
     "field '--vocab-size': 3 is too small: 256 byte tokens + 6 special tokens need at least "
     "262"),
    # A flag spelled as its field is named so, as an empty one is (`field 'seed'`).
    (["label", "--labeler", "json:dumps", "--in", "{ok}", "--seed", "3", "--out", "{out}"],
     "field 'seed': is a setting of the sqlworld labeler; json:dumps, a labeler of your own, "
     "ranks as it likes: leave --seed out"),
    # A config verb's field is set by YAML and key=value too: its check names who set it.
    (["tokenizer", "train", "--data", "{ok}", "--out", "{out}"], None),
])
def test_a_bad_value_of_a_verb_without_config_names_the_flag_typed(tmp_path, capsys, argv, said):
    # `tokenizer train --vocab-size 3` said "field 'vocab_size'", a name the user never typed.
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"id": "x", "prompt": "a", "responses": ["a", "b"],
                              "text": "hello world"}) + "\n")
    out = tmp_path / "out"
    argv = [a.format(ok=ok, out=out) for a in argv]
    if said is None:  # the same error raised with no flag typed keeps the field's name
        from gptlab.cli import _named_by_flag, build_parser
        args = build_parser().parse_args(argv)
        error = UserError("3 is too small", field="vocab_size")
        assert _named_by_flag(error, args) is error
        return
    assert main(argv) == 2
    assert capsys.readouterr().err == f"{command(argv)}: error: {said}\n"
    assert not out.exists()


def test_only_a_path_not_found_is_renamed_for_its_flag_not_a_message_that_ends_alike(
        tmp_path, capsys, monkeypatch):
    # The flag was chosen by the message's last words ("not found"): any error about a path
    # given that ended so was said to be that flag's missing file.
    import gptlab.feedback as feedback
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    for error, said in ((NotFound("file not found", path=data), f"{data}, field '--in': "),
                        (UserError("its id is not found", path=data), f"{data}: ")):
        def fail(*_a, _error=error, **_k):
            raise _error
        monkeypatch.setattr(feedback, "label_file", fail)
        assert main(["label", "--labeler", "json:dumps", "--in", str(data), "--out",
                     str(tmp_path / "out.jsonl")]) == 2
        assert f": error: {said}" in capsys.readouterr().err


@pytest.mark.parametrize("action", [["check", "--id", "s0-test-00001", "SELECT 1"],
                                    ["score", "--in", "s.jsonl"]])
def test_world_check_and_score_name_a_missing_world_as_label_does(tmp_path, capsys, action):
    # It named "nope/world.json: not a world directory", a file the user never typed.
    world = tmp_path / "nope"
    assert main(["world", action[0], "--world", str(world), *action[1:]]) == 2
    assert capsys.readouterr().err == (f"gptlab world {action[0]}: error: {world}, field "
                                       f"'--world': world directory not found (make one with "
                                       f"`gptlab world export`)\n")


def test_an_input_of_the_wrong_kind_names_the_flag_typed(tmp_path, tiny_model, capsys,
                                                         monkeypatch):
    # Each named only the path, as an error about what a file holds does: the mistake is which
    # path went to which flag. A file inside the directory a flag gave names that flag.
    adir, ok, out = tmp_path / "adir", tmp_path / "ok.jsonl", tmp_path / "out"
    adir.mkdir()
    ok.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    bare = tmp_path / "bare"  # a model whose template is chat_template.jinja, here a directory
    shutil.copytree(tiny_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").mkdir()
    sample = ["sample", "--prompts", str(ok), "--k", "2", "--out", str(out)]
    for argv, path, flag, said in (
            (["sft", "--model", str(adir), "--data", str(ok), "--out", str(out)], adir,
             "--model", "not a model directory (config.json is missing)"),
            (["sft", "--model", str(ok), "--data", str(ok), "--out", str(out)], ok, "--model",
             "is a file, not a model: a model is a directory"),
            ([*sample, "--model", str(bare)], bare / "chat_template.jinja", "--model",
             "is a directory, not a file"),
            (["reward", "--model", str(tiny_model), "--data", str(ok), "--out", str(out),
              "--config", str(adir)], adir, "--config", "is a directory, not a file")):
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith(
            f"{command(argv)}: error: {path}, field '{flag}': {said}"), argv
        assert not out.exists()
    # The current directory holds no input: `--prompts .` (a directory of prompt files) does
    # not give a model directory beside it that the command line never named.
    monkeypatch.chdir(tmp_path)
    parsed, _ = build_parser().parse_known_args([*sample[:1], "--model", "x", "--prompts", ".",
                                                 "--k", "2", "--out", "o"])
    error = cli._named_by_flag(WrongKind("is a directory, not a file",
                                         path="bare/chat_template.jinja"), parsed)
    assert str(error) == "bare/chat_template.jinja: is a directory, not a file"
    # A path in --out's directory is the run's own, even where --out lies in an input's.
    parsed, _ = build_parser().parse_known_args(["sft", "--model", "m", "--data", "d.jsonl",
                                                 "--out", "m/sft"])
    for path, said in (("m/sft/checkpoints/step-2", "m/sft/checkpoints/step-2: "),
                       ("m/sft", "m/sft: "), ("m/chat_template.jinja",
                                              "m/chat_template.jinja, field '--model': ")):
        error = cli._named_by_flag(WrongKind("not a model directory", path=path), parsed)
        assert str(error) == said + "not a model directory"
    # Content at fault keeps the path alone: a file that is there and read as what it is.
    (tmp_path / "x").write_text("")
    error = cli._named_by_flag(UserError("no rankings left to train on", path="x"), parsed)
    assert (str(error), type(error)) == ("x: no rankings left to train on", UserError)


def test_tokenizer_encode_prints_the_ids_and_a_directory_without_one_is_named(
        tiny_model, tmp_path, capsys):
    from gptlab.tokenizer import load_tokenizer
    assert main(["tokenizer", "encode", "--tokenizer", str(tiny_model), "hello world"]) == 0
    ids = load_tokenizer(tiny_model).encode("hello world")
    assert capsys.readouterr().out == " ".join(map(str, ids)) + "\n" and len(ids) >= 2
    # A directory without tokenizer.json is there but no tokenizer: named by the flag, as a
    # tokenizer not found is (it named tokenizer.json inside it, and no flag).
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path), "hello"]) == 2
    assert capsys.readouterr().err == (
        f"gptlab tokenizer encode: error: {tmp_path}, field '--tokenizer': tokenizer not found "
        f"(expected a directory with tokenizer.json, or a tokenizer.json file)\n")


def test_no_verb_prints_the_verbs_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: gptlab [-h] VERB ...")
    assert all(f"\n    {verb}" in out for verb in VERBS)


def test_a_reader_gone_ends_quietly_with_141_and_stdout_to_the_null_device(
        tiny_model, tmp_path, monkeypatch, capsys):
    # `gptlab tokenizer encode ... | head -0`: the flush meets a closed pipe.
    import io
    sink = open(tmp_path / "stdout", "w")  # what stdout's descriptor becomes: /dev/null

    class ClosedPipe(io.StringIO):
        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            return sink.fileno()

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    try:
        assert main(["tokenizer", "encode", "--tokenizer", str(tiny_model), "hello"]) == 141
        os.write(sink.fileno(), b"lost")
        assert os.path.samestat(os.fstat(sink.fileno()), os.stat(os.devnull))
    finally:
        sink.close()
    assert (tmp_path / "stdout").read_text() == "" and capsys.readouterr().err == ""


def test_sample_refuses_k_below_1_before_the_model_is_read(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(tmp_path / "absent"), "--prompts",
                 str(tmp_path / "p.jsonl"), "--k", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "gptlab sample: error: field 'k': must be at least 1\n"
    assert not out.exists()
