"""The command line: verbs, config files and overrides, exit codes, run provenance."""
import dataclasses
import json

import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab.cli import VERBS, main
from gptlab.config import load_config
from gptlab.errors import UserError
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


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out
    assert len(VERBS) >= 10


def test_unknown_flag_exits_2_with_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ppo", "--kl-coeff", "0.1"])
    assert e.value.code == 2
    assert "did you mean '--kl-coef'" in capsys.readouterr().err


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


def test_yaml_then_overrides_then_flags(tmp_path):
    f = tmp_path / "ppo.yaml"
    f.write_text("steps: 10\nkl_coef: 0.05\nlr: 0.001\n")
    cfg = load_config(PPOConfig, f, ["kl_coef=0.1", "clip=0.3"], lr=0.002, steps=None)
    assert (cfg.steps, cfg.kl_coef, cfg.clip, cfg.lr) == (10, 0.1, 0.3, 0.002)


def test_generate_prints_a_continuation(tiny_model, capsys):
    assert main(["generate", "--model", str(tiny_model), "--prompt", "hello", "--greedy",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_a_prompt_longer_than_the_context_is_an_error_or_reported_truncation(tiny_model, capsys):
    long_prompt = "the quick brown fox " * 20
    assert main(["generate", "--model", str(tiny_model), "--prompt", long_prompt,
                 "--max-new-tokens", "4"]) == 2
    assert "--truncate" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model), "--prompt", long_prompt,
                 "--max-new-tokens", "4", "--truncate", "--greedy"]) == 0
    assert "truncated: dropped its first" in capsys.readouterr().err


def test_generate_on_a_missing_model_exits_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "model not found" in capsys.readouterr().err


def test_run_directory_records_config_versions_and_command(tmp_path):
    record_run(tmp_path, PPOConfig(steps=3))
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["config"]["steps"] == 3
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"]
    assert "command" in info and "git_commit" in info
