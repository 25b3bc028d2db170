"""gptlab as a library: what `import gptlab` costs and does, and the errors a notebook gets from
the stage functions (the same lines the command line prints, as exceptions)."""
import copy
import dataclasses
import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab.errors import PathError, UserError, reports_path_errors
from gptlab.model import GPT, get_preset
from gptlab.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny model directory and one small file of each kind a stage reads."""
    d = tmp_path_factory.mktemp("inputs")
    tok = train_tokenizer(["hello world, the quick brown fox " * 20], vocab_size=300)
    torch.manual_seed(0)
    save_model(d / "model", GPT(dataclasses.replace(get_preset("tiny"),
                                                    vocab_size=tok.vocab_size, context=32)), tok)
    (d / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    (d / "demos.jsonl").write_text("".join(json.dumps({"prompt": f"hello {i}",
                                                       "completion": " world"}) + "\n"
                                           for i in range(4)))
    (d / "prompts.jsonl").write_text('{"id": "p1", "prompt": "hello"}\n')
    (d / "rankings.jsonl").write_text("".join(json.dumps({"prompt": f"hello {i}",
                                                          "ranked": [" world", " fox"]}) + "\n"
                                              for i in range(4)))
    (d / "samples.jsonl").write_text(json.dumps({"id": "s0-test-00001", "prompt": "Q",
                                                 "responses": ["SELECT 1", "SELECT 2"]}) + "\n")
    return d


# --- import gptlab -----------------------------------------------------------------------------

def test_import_gptlab_is_light_and_writes_nothing(tmp_path):
    # A notebook's `import gptlab` (and of the stage modules) must not set torch's threads or
    # TF32, write a file (to the working directory, $HOME or the temp directory) or load torch
    # for the package alone.
    home, work, tmp = tmp_path / "home", tmp_path / "work", tmp_path / "tmp"
    for d in (home, work, tmp):
        d.mkdir()
    script = """
import sys
import gptlab
light = sorted(m for m in ("torch", "numpy", "tokenizers") if m in sys.modules)
import torch
torch.set_num_threads(3)
before = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32)
import gptlab.api, gptlab.train.pretrain, gptlab.train.sft, gptlab.train.reward
import gptlab.train.ppo, gptlab.train.pipeline, gptlab.world, gptlab.chat, gptlab.interop
import gptlab.feedback, gptlab.tokenizer, gptlab.engine, gptlab.model
after = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32)
print(light, before == after, gptlab.__version__)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPTLAB_", "HF_", "XDG_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(ROOT),
               PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, "-c", script], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[]", "True", "0.1.0"]
    assert run.stderr == ""
    assert [p for p in tmp_path.rglob("*") if p not in (home, work, tmp)] == []


def test_the_package_reaches_its_python_api_by_name(tmp_path):
    # `import gptlab` then `gptlab.api.load(...)` was an AttributeError: the subpackages the
    # package's docstring names were reachable only once imported by name themselves.
    script = """
import sys
import gptlab
assert "torch" not in sys.modules and "gptlab.api" not in sys.modules
assert {"api", "train", "world", "interop", "model", "tokenizer"} <= set(dir(gptlab))
print(gptlab.api.load.__name__, gptlab.world.build_world.__name__)
# Every module of the package, not only those a list named: stop_strings and devices were not.
import pkgutil
names = [m.name for m in pkgutil.iter_modules(gptlab.__path__) if m.name != "__main__"]
print({"stop_strings", "devices", "cli"} <= set(names),
      all(getattr(gptlab, n).__name__ == "gptlab." + n for n in names))
try:
    gptlab.nothing
except AttributeError as e:
    print(e)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["load build_world", "True True",
                                       "module 'gptlab' has no attribute 'nothing'"]


# What a notebook is pointed at: the packages' exported names, the stage functions and configs,
# the tokenizer, the engine, the feedback helpers, the errors and the model-directory format.
PUBLIC_MODULES = ["gptlab.api", "gptlab.model", "gptlab.train", "gptlab.world", "gptlab.chat",
                  "gptlab.interop", "gptlab.data"]
PUBLIC_NAMES = {
    "gptlab.train.pretrain": ["PretrainConfig", "pretrain"],
    "gptlab.train.sft": ["SFTConfig", "sft"],
    "gptlab.train.reward": ["RewardConfig", "train_reward_model"],
    "gptlab.train.ppo": ["PPOConfig", "ppo"],
    "gptlab.train.pipeline": ["PipelineConfig", "pipeline"],
    "gptlab.tokenizer": ["Tokenizer", "train_tokenizer", "load_tokenizer"],
    "gptlab.engine": ["SamplingParams", "generate"],
    "gptlab.stop_strings": ["StopStrings", "check_stop_strings", "cut_at_stop"],
    "gptlab.feedback": ["sample_file", "label_file", "label_samples"],
    "gptlab.errors": ["UserError", "PathError"], "gptlab.checkpoint": ["save_model", "load_model"]}


def _public() -> dict:
    import importlib
    import inspect
    found = {}
    for name in PUBLIC_MODULES:
        m = importlib.import_module(name)
        names = getattr(m, "__all__", None) or [
            n for n, o in vars(m).items() if not n.startswith("_")
            and getattr(o, "__module__", None) == name and inspect.isroutine(o)]
        found.update({f"{name}.{n}": getattr(m, n) for n in names})
    for name, names in PUBLIC_NAMES.items():
        m = importlib.import_module(name)
        found.update({f"{name}.{n}": getattr(m, n) for n in names})
    return {q: o for q, o in found.items() if callable(o)}


def test_public_functions_and_classes_say_what_they_do_with_types():
    # Each has a docstring of its own (a dataclass's generated "Name(field=...)" is none), and
    # each public function and method types its parameters and its result.
    import inspect
    problems = []
    for q, obj in _public().items():
        routines = [(q, obj)]
        if inspect.isclass(obj):
            doc = obj.__doc__ or ""
            if not doc.strip() or doc.startswith(obj.__name__ + "("):
                problems.append(f"{q}: no docstring")
            routines = [(f"{q}.{k}", v) for k, v in vars(obj).items()
                        if inspect.isfunction(v) and not k.startswith("_") and k != "forward"]
        for name, f in routines:
            if not (f.__doc__ or "").strip():
                problems.append(f"{name}: no docstring")
            sig = inspect.signature(f)
            untyped = [p for p, v in sig.parameters.items() if p not in ("self", "cls")
                       and v.annotation is inspect.Parameter.empty]
            if untyped or sig.return_annotation is inspect.Signature.empty:
                problems.append(f"{name}: untyped {untyped or 'result'}")
    assert problems == []
    assert len(_public()) > 60


# --- an out that cannot be written, from Python ------------------------------------------------

def _stages(inputs, out, **settings):
    """Every stage function the verbs call, each writing to `out` (a directory, or a file where
    the stage writes one), and the name of the argument or config field that `out` is; the
    configs' other fields from `settings`."""
    from gptlab import interop
    from gptlab.feedback import label_file, sample_file
    from gptlab.tokenizer import load_tokenizer
    from gptlab.train.pipeline import PipelineConfig, pipeline
    from gptlab.train.ppo import PPOConfig, ppo
    from gptlab.train.pretrain import PretrainConfig, pretrain
    from gptlab.train.reward import RewardConfig, train_reward_model
    from gptlab.train.sft import SFTConfig, sft
    from gptlab.world import build_world
    d, cpu = inputs, {"device": "cpu", **settings}
    return {
        "pretrain": (lambda: pretrain(PretrainConfig(data=[str(d / "corpus.txt")], model="tiny",
                                                     out=str(out), max_steps=1, **cpu)), "out"),
        "sft": (lambda: sft(SFTConfig(model=str(d / "model"), data=str(d / "demos.jsonl"),
                                      out=str(out), max_steps=1, **cpu)), "out"),
        "reward": (lambda: train_reward_model(RewardConfig(
            model=str(d / "model"), data=str(d / "rankings.jsonl"), out=str(out), max_steps=1,
            **cpu)), "out"),
        "ppo": (lambda: ppo(PPOConfig(policy=str(d / "model"), prompts=str(d / "prompts.jsonl"),
                                      out=str(out), steps=1, **cpu),
                            reward_fn=lambda prompts, responses, records: [0.0] * len(prompts)),
                "out"),
        "pipeline": (lambda: pipeline(PipelineConfig(out=str(out), **settings)), "out"),
        "sample": (lambda: sample_file(d / "model", d / "prompts.jsonl", out, k=1,
                                       max_new_tokens=2, device="cpu"), "out"),
        "label": (lambda: label_file(d / "samples.jsonl", out), "out"),
        "world export": (lambda: build_world(0, n_train=20, n_validation=5, n_test=5,
                                             n_dialogs=5, corpus_chars=2000).export(out),
                         "out_dir"),
        "tokenizer save": (lambda: load_tokenizer(d / "model").save(out), "directory"),
        "convert to hf": (lambda: interop.convert_to_hf(d / "model", out), "out_dir"),
    }


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo"])
def test_a_training_stage_seeds_pythons_numpys_and_torchs_generators(inputs, tmp_path, stage):
    # PPO seeded torch's alone, while the README says every stage seeds all three.
    import random

    import numpy as np
    more = {"max_new_tokens": 4} if stage == "ppo" else {}
    call, _ = _stages(inputs, tmp_path / "out", seed=7, **more)[stage]
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    call()
    after = random.random(), np.random.random()
    random.seed(7)
    np.random.seed(7)
    assert after == (random.random(), np.random.random())


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo", "pipeline", "sample",
                                   "label", "world export", "tokenizer save", "convert to hf"])
def test_an_out_whose_name_is_too_long_names_the_field_from_python(inputs, tmp_path, stage):
    # It was a bare OSError ("[Errno 36] File name too long: ...") from Python, while the
    # command line printed one line naming the path and the flag. Now it is the same line, as a
    # PathError: a UserError, and still an OSError for `except OSError` callers.
    out = tmp_path / ("a" * 300)
    call, field = _stages(inputs, out)[stage]
    with pytest.raises(PathError) as raised:
        call()
    e = raised.value
    assert isinstance(e, UserError) and isinstance(e, OSError)
    assert (e.errno, e.filename, e.field) == (errno.ENAMETOOLONG, str(out), field)
    assert str(e) == f"{out}, field '{field}': File name too long"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_mid_run_names_the_file_and_field_from_python(inputs, tmp_path,
                                                                  monkeypatch):
    # A failed write of the weights (safetensors' own error) is the OSError of the file, raised
    # from the stage as a PathError naming it and `out`; its partial checkpoint is removed.
    from safetensors import SafetensorError

    from gptlab import checkpoint as ck
    from gptlab.train.pretrain import PretrainConfig, pretrain

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    monkeypatch.setattr(ck, "st_save_model", full)
    out = tmp_path / "run"
    with pytest.raises(PathError) as raised:
        pretrain(PretrainConfig(data=[str(inputs / "corpus.txt")], model="tiny", out=str(out),
                                max_steps=1, eval_every=0, sample_tokens=0, progress=False,
                                device="cpu", cache_dir=str(tmp_path / "cache")))
    weights = out / "checkpoints" / "step-1" / "model.safetensors"
    assert (raised.value.errno, raised.value.field) == (errno.EFBIG, "out")
    assert str(raised.value) == f"{weights}, field 'out': File too large"
    assert not weights.parent.exists()


@pytest.mark.parametrize("code,kind", [(errno.EACCES, PermissionError),
                                        (errno.ENOENT, FileNotFoundError),
                                        (errno.ENOSPC, OSError)])
def test_a_path_error_stays_the_oserror_subclass_it_was_and_pickles(tmp_path, code, kind):
    # Before the stage functions named the field, a notebook's `except PermissionError` (or
    # FileNotFoundError) around a stage caught these; it still does. An exception that crosses
    # processes (multiprocessing, concurrent.futures) is pickled: PathError(error, field) could
    # not be rebuilt from its message, and the parent got a TypeError in its place.
    @reports_path_errors
    def stage(out: str) -> None:
        raise kind(code, os.strerror(code), os.path.join(out, "f"))
    with pytest.raises(kind) as raised:
        stage(str(tmp_path / "run"))
    e = raised.value
    assert isinstance(e, PathError) and isinstance(e, UserError) and e.field == "out"
    for back in (pickle.loads(pickle.dumps(e)), copy.copy(e)):
        assert type(back) is type(e) and str(back) == str(e)
        assert (back.errno, back.strerror, back.filename, back.field, back.path) == \
            (code, os.strerror(code), str(tmp_path / "run" / "f"), "out", e.path)


def test_an_error_that_is_not_the_users_stays_the_oserror_it_was(tmp_path):
    @reports_path_errors
    def stage(out: str) -> None:
        raise OSError(errno.EIO, "Input/output error", os.path.join(out, "f"))
    with pytest.raises(OSError) as raised:
        stage(str(tmp_path / "x"))
    assert type(raised.value) is OSError and raised.value.errno == errno.EIO

    @reports_path_errors
    def reads(data: str) -> None:  # a missing file that no argument names: a bug, not input
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/elsewhere/f")
    with pytest.raises(FileNotFoundError):
        reads(str(tmp_path / "data.txt"))


def test_a_stage_calling_another_names_its_own_field(tmp_path):
    # The outer stage's caller gave its config, not the inner call's arguments: the field named
    # is the outer one's (pipeline -> export of its world), where the file lies in one of them.
    @dataclasses.dataclass
    class Config:
        world: str
        out: str

    @reports_path_errors
    def export(out_dir: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(out_dir, "a.jsonl"))

    @reports_path_errors
    def run(cfg: Config) -> None:
        export(os.path.join(cfg.out, "world"))
    with pytest.raises(PathError) as raised:
        run(Config(world=str(tmp_path / "w"), out=str(tmp_path / "run")))
    assert raised.value.field == "out"
    assert str(raised.value) == (f"{tmp_path / 'run' / 'world' / 'a.jsonl'}, field 'out': No "
                                 f"space left on device")

    @reports_path_errors
    def elsewhere(cfg: Config) -> None:  # in none of the outer fields: the inner name stays
        export(str(tmp_path / "scratch"))
    with pytest.raises(PathError) as raised:
        elsewhere(Config(world=str(tmp_path / "w"), out=str(tmp_path / "run")))
    assert raised.value.field == "out_dir"


# --- bad config values from Python -------------------------------------------------------------

@pytest.mark.parametrize("stage,field,value,message", [
    ("pretrain", "lr", -0.5, "field 'lr': must be > 0, got -0.5"),
    ("sft", "lr", -0.5, "field 'lr': must be > 0, got -0.5"),
    ("reward", "batch_size", 0, "field 'batch_size': must be >= 1, got 0"),
    ("ppo", "kl_estimator", "k2", "field 'kl_estimator': must be one of k1, k3, got k2"),
    ("pipeline", "seed", -1, "field 'seed': must be in [0, 18446744073709551515] (each "
                             "stage's seed, up to seed + 100, must be below 2**64), got -1"),
])
def test_a_bad_config_value_from_python_is_the_clis_error(inputs, tmp_path, capsys, stage,
                                                          field, value, message):
    # The stage function refuses it before anything is written, with the line the command line
    # prints after "gptlab VERB: error: command line, " (where the override wrote it).
    from gptlab.cli import main
    out = tmp_path / "out"
    call, _ = _stages(inputs, out, **{field: value})[stage]
    with pytest.raises(UserError) as raised:
        call()
    assert str(raised.value) == message
    assert not isinstance(raised.value, OSError)
    assert not out.exists()
    d = inputs
    argv = {"pretrain": ["--data", str(d / "corpus.txt"), "--model", "tiny"],
            "sft": ["--model", str(d / "model"), "--data", str(d / "demos.jsonl")],
            "reward": ["--model", str(d / "model"), "--data", str(d / "rankings.jsonl")],
            "ppo": ["--policy", str(d / "model"), "--prompts", str(d / "prompts.jsonl"),
                    "--reward", str(d / "model")],
            "pipeline": []}[stage]
    assert main([stage, *argv, "--out", str(out), f"{field}={value}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"gptlab {stage}: error: command line, "
                                                        f"{message}")
    assert not out.exists()


# --- a config is the caller's ------------------------------------------------------------------

def test_a_config_run_twice_sets_its_length_from_each_runs_data(inputs, tmp_path):
    # SFT and the reward model set max_steps from epochs in the config they were given: run
    # again (on other data) with the same config, a notebook's second run took the first run's
    # length. (SFT holds one demonstration out even at val_fraction 0: 3 and 7 left.)
    from gptlab.train.reward import RewardConfig, train_reward_model
    from gptlab.train.sft import SFTConfig, sft
    more = tmp_path / "more.jsonl"
    more.write_text((inputs / "demos.jsonl").read_text() * 2)
    more_rankings = tmp_path / "more_rankings.jsonl"
    more_rankings.write_text((inputs / "rankings.jsonl").read_text() * 2)
    common = dict(model=str(inputs / "model"), epochs=2.0, batch_size=2, val_fraction=0.0,
                  eval_every=0, progress=False, device="cpu")
    for stage, cfg, data in ((sft, SFTConfig(**common, data=str(inputs / "demos.jsonl")), more),
                             (train_reward_model, RewardConfig(
                                 **common, data=str(inputs / "rankings.jsonl")), more_rankings)):
        steps = []
        for n, path in enumerate((cfg.data, str(data))):
            cfg.data, cfg.out = path, str(tmp_path / f"{stage.__name__}-{n}")
            stage(cfg)
            assert cfg.max_steps is None
            steps.append(json.loads((Path(cfg.out) / "config.json").read_text())["step"])
        assert steps == {"sft": [3, 7], "train_reward_model": [4, 8]}[stage.__name__]


# --- api.generate_text -------------------------------------------------------------------------

def test_generate_text_names_a_model_that_is_no_path_nor_pair(inputs):
    # A bare model, a pair without a tokenizer, or the two swapped were an AttributeError or a
    # TypeError from deep inside ("'NoneType' object has no attribute 'encode'").
    from gptlab import api
    from gptlab.tokenizer import load_tokenizer
    model, tok = api.load(inputs / "model")
    start = "field 'model': must be a model path, or the (model, tokenizer) pair api.load returns"
    for given, got in ((model, ", got the GPT"), ([model, tok], ", got the list"),
                       ((model, tok, 1), ", got a tuple of 3"),
                       ((model, None), ": its second item must be a Tokenizer, got None (the "
                                       "model has no tokenizer)"),
                       ((tok, model), ": its first item must be a decoder-only GPT, got the "
                                      "Tokenizer")):
        with pytest.raises(UserError) as raised:
            api.generate_text(given, ["hello"])
        assert str(raised.value) == start + got
    by_pair = api.generate_text((model, load_tokenizer(inputs / "model")), ["hello"],
                                greedy=True, max_new_tokens=4)
    assert by_pair == api.generate_text(inputs / "model", ["hello"], greedy=True,
                                        max_new_tokens=4, device="cpu")
    assert len(by_pair) == 1


def test_generate_text_takes_a_compiled_model_and_runs_the_model_it_wraps(inputs):
    # torch.compile's wrapper is not a GPT; it was refused as 'the OptimizedModule'. Compiling
    # is lazy: nothing is compiled here, the wrapped GPT decodes.
    import torch
    from gptlab import api
    model, tok = api.load(inputs / "model")
    compiled = torch.compile(model)
    assert api.generate_text((compiled, tok), ["hello"], greedy=True, max_new_tokens=4) == \
        api.generate_text((model, tok), ["hello"], greedy=True, max_new_tokens=4)


def test_generate_text_refuses_prompts_that_are_no_list_and_an_empty_one_without_bos():
    import dataclasses

    import torch

    from gptlab.api import generate_text
    from gptlab.model import GPT, get_preset
    from gptlab.tokenizer import Tokenizer, train_tokenizer
    tok = train_tokenizer(["hello world"], 300)
    no_bos = Tokenizer(tok.hf, bos_token=None, eos_token="<|eos|>", pad_token="<|pad|>")
    torch.manual_seed(0)
    net = GPT(dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=32))
    for model, prompts, said in (
            ((net, tok), {"a": 1}, "field 'prompts': must be a list of texts, got the dict"),
            ((net, tok), 5, "field 'prompts': must be a list of texts, got the int"),
            ((net, no_bos), ["hello", ""], "field 'prompts[1]': the prompt is empty")):
        with pytest.raises(UserError) as e:
            generate_text(model, prompts, max_new_tokens=2)
        assert str(e.value) == said
    assert len(generate_text((net, no_bos), ["hello"], max_new_tokens=2, greedy=True)) == 1


def test_generate_text_names_which_of_its_prompts_is_too_long():
    """A prompt past the context less max_new_tokens is named by its index, as an empty one is:
    generate_text has no parameter 'prompt'."""
    import dataclasses

    import torch

    from gptlab.api import generate_text
    from gptlab.model import GPT, get_preset
    from gptlab.tokenizer import train_tokenizer
    tok = train_tokenizer(["hello world"], 300)
    torch.manual_seed(0)
    net = GPT(dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=32))
    long = " ".join(["hello world"] * 20)
    with pytest.raises(UserError) as e:
        generate_text((net, tok), ["hello", long], max_new_tokens=4)
    assert str(e.value).startswith(f"field 'prompts[1]': prompt has "
                                   f"{len(tok.encode(long, bos=True))} tokens, but the context "
                                   f"of 32 minus max_new_tokens 4 leaves room for 28")
