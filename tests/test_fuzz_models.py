"""Fuzzed model directories, checkpoints and configs: one thing changed in a valid one gives a
UserError naming the file and the field (exit 2 from the command line), or a load that equals
the original where the change is harmless; never a traceback, a hang, or a model loaded wrong.

Each fuzz starts from a tiny valid file (a gptlab model directory, a checkpoint, a `--config`
YAML, a Hugging Face directory made with transformers, a GGUF written with `gguf`); the plain
tests after each fuzz are the defects it found, one case each."""
from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from gptlab import checkpoint as ck
from gptlab.cli import main
from gptlab.config import load_config
from gptlab.errors import UserError
from gptlab.model import GPT, Transformer, TransformerConfig, get_preset
from gptlab.model.heads import ScalarHeadModel
from gptlab.tokenizer import train_tokenizer
from gptlab.train.sft import SFTConfig

FUZZ = settings(deadline=None, derandomize=True, max_examples=40,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["hello world, the quick brown fox " * 20], vocab_size=300)


def _gpt(tok, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=32,
                                   n_layers=1, d_model=32, **kw))


@pytest.fixture(scope="module")
def bases(tok, tmp_path_factory) -> dict[str, Path]:
    """Valid model directories: a rotary GPT with grouped-query attention, a sinusoidal GPT, a
    reward model, an encoder-decoder."""
    root = tmp_path_factory.mktemp("bases")
    reward = ScalarHeadModel.from_gpt(_gpt(tok))
    reward.pad_token_id = 0
    torch.manual_seed(0)
    models = {"rotary": _gpt(tok, n_kv_heads=2),
              "sinusoidal": _gpt(tok, positions="sinusoidal", norm="layernorm", bias=True,
                                 activation="gelu"),
              "reward": reward,
              "transformer": Transformer(TransformerConfig(
                  vocab_size=tok.vocab_size, context=16, n_encoder_layers=1,
                  n_decoder_layers=1, d_model=16, n_heads=2, d_ff=32))}
    for name, model in models.items():
        ck.save_model(root / name, model, tok)
    return {name: root / name for name in models}


def _copy(base: Path, tmp: Path) -> Path:
    d = tmp / "m"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(base, d)
    return d


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _refused(d: Path, file: str, *words: str) -> UserError:
    """Load `d`; expect a UserError that names `file` and each of `words`."""
    with pytest.raises(UserError) as e:
        ck.load_model(d)
    said = str(e.value)
    assert str(d / file) in said, said
    for word in words:
        assert word in said, said
    return e.value


# --- config.json --------------------------------------------------------------------------------

BAD_VALUES = ["x", "", [], {}, None, True, False, 0, -1, 1.5, 0.5, 10**9, 10**30, 2**31, 2**63,
              10**400, float("nan"), float("inf"), -float("inf")]


def _write_config(d: Path, meta: dict) -> None:
    # allow_nan: json writes NaN, Infinity bare, as an earlier gptlab did (read_meta reads them)
    (d / "config.json").write_text(json.dumps(meta, allow_nan=True))


@FUZZ
@given(base=st.sampled_from(["rotary", "sinusoidal", "reward", "transformer"]),
       key=st.integers(0, 30), value=st.sampled_from(BAD_VALUES))
def test_a_config_field_set_to_a_wrong_value_is_refused_by_name_or_loads_as_written(
        bases, tmp_path, base, key, value):
    """Every model field set to a wrong type, zero, a negative, a float for an int, a huge or a
    non-finite number: refused naming config.json and `model.FIELD` (or `model` where the
    fields together describe no model), or loaded with exactly that value and the file's
    weights; never built at the size asked before the weights are compared (n_layers 10**9)."""
    d = _copy(bases[base], tmp_path)
    meta = json.loads((d / "config.json").read_text())
    names = sorted(meta["model"])
    name = names[key % len(names)]
    meta["model"][name] = value
    _write_config(d, meta)
    original, _, _ = ck.load_model(bases[base])
    try:
        model, _, _ = ck.load_model(d)
    except UserError as e:
        said = str(e)
        assert str(d / "config.json") in said or str(d / "model.safetensors") in said, said
        assert "field 'model" in said or "do not fit" in said, said
        return
    got = getattr(model.config, name)
    assert type(got) is type(value) and (got == value or got != got), (name, got, value)
    assert _same_weights(model, original)


@FUZZ
@given(base=st.sampled_from(["rotary", "reward"]),
       key=st.text("abcdefgh_", min_size=1, max_size=8),
       value=st.sampled_from(["x", 1, None, [1], {"a": 1}]))
def test_an_unknown_top_level_key_is_harmless_and_an_unknown_model_key_is_refused(
        bases, tmp_path, base, key, value):
    d = _copy(bases[base], tmp_path)
    meta = json.loads((d / "config.json").read_text())
    original, _, _ = ck.load_model(bases[base])
    if key not in meta:
        _write_config(d, {**meta, key: value})
        model, _, got = ck.load_model(d)
        assert _same_weights(model, original) and got[key] == value
    if key not in meta["model"]:
        meta["model"][key] = value
        _write_config(d, meta)
        _refused(d, "config.json", "field 'model'", f"unknown model config keys ['{key}']")


@pytest.mark.parametrize("change, field", [
    ({"n_heads": 3}, "model"),                        # d_model 32 not divisible by 3
    ({"n_kv_heads": 3}, "multiple of n_kv_heads"),    # 4 query heads, 3 key/value heads
    ({"head_dim": 7}, "model"),                       # rotary on an odd head size
    ({"vocab_size": 100}, "do not fit"),              # the embedding's rows are in the file
    ({"n_layers": 10**9}, "field 'model.n_layers'"),  # never built: fewer tensors than layers
])
def test_inconsistent_shapes_are_refused(bases, tmp_path, change, field):
    d = _copy(bases["rotary"], tmp_path)
    meta = json.loads((d / "config.json").read_text())
    meta["model"].update(change)
    _write_config(d, meta)
    with pytest.raises(UserError) as e:
        ck.load_model(d)
    assert field in str(e.value) and str(d) in str(e.value)


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_naming_vocab_size(tok, tmp_path):
    ck.save_model(tmp_path, GPT(dataclasses.replace(get_preset("tiny"), vocab_size=20,
                                                    n_layers=1)), tok)
    _refused(tmp_path, "", "field 'vocab_size'", f"tokenizer has {tok.vocab_size} tokens")


# Defects the config fuzz found.

@pytest.mark.parametrize("name", ["n_heads", "norm_eps", "context"])
def test_an_integer_too_large_for_a_float_is_refused_not_an_overflow(bases, tmp_path, name):
    # math.isfinite(10**400) raised OverflowError: a traceback, exit 1.
    d = _copy(bases["rotary"], tmp_path)
    meta = json.loads((d / "config.json").read_text())
    meta["model"][name] = 10**400
    _write_config(d, meta)
    _refused(d, "config.json", f"field 'model.{name}'", "an integer of 401 digits")


@pytest.mark.parametrize("base", ["sinusoidal", "transformer"])
@pytest.mark.parametrize("context", [10**9, 2**63, 10**30])
def test_a_huge_sinusoidal_context_is_refused_before_its_table_is_made(bases, tmp_path, base,
                                                                      context):
    # 10**9 asked for a 128 GB table and ended as "cannot read weights (truncated or corrupt
    # file?)" of an intact model.safetensors; 2**63 and 10**30 were tracebacks.
    d = _copy(bases[base], tmp_path)
    meta = json.loads((d / "config.json").read_text())
    meta["model"]["context"] = context
    _write_config(d, meta)
    _refused(d, "config.json", "field 'model.context'")


def test_sizes_torch_cannot_address_are_refused_naming_the_model(bases, tmp_path):
    # A model of d_model 2**31 overflowed torch's storage size even on the meta device.
    d = _copy(bases["sinusoidal"], tmp_path)
    meta = json.loads((d / "config.json").read_text())
    meta["model"]["d_model"] = 2**31
    _write_config(d, meta)
    _refused(d, "config.json", "field 'model'", "cannot be built")


def test_a_sinusoidal_table_that_cannot_be_allocated_names_the_context_not_the_file(
        bases, tmp_path, monkeypatch):
    # Out of memory making the table read "cannot read weights (truncated or corrupt file?)".
    def out_of_memory(self):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")
    monkeypatch.setattr(GPT, "reset_buffers", out_of_memory)
    e = _refused(_copy(bases["sinusoidal"], tmp_path), "config.json", "field 'model.context'",
                 "not enough memory")
    assert "corrupt" not in str(e)


@pytest.mark.parametrize("fmt", [None, 5, "gpt"])
def test_a_gptlab_config_without_its_format_marker_is_named_so(bases, tmp_path, fmt):
    # It was read as a Hugging Face config: "architecture None () is not supported".
    d = _copy(bases["rotary"], tmp_path)
    meta = json.loads((d / "config.json").read_text())
    meta.pop("format") if fmt is None else meta.update(format=fmt)
    _write_config(d, meta)
    _refused(d, "config.json", "field 'format'", '"format": "gptlab/1"')
    assert main(["convert", "--to", "hf", str(d), "--out", str(tmp_path / "hf")]) == 2


# --- tokenizer files ----------------------------------------------------------------------------

@FUZZ
@given(cut=st.floats(0, 0.999))
def test_a_truncated_tokenizer_json_is_refused_naming_it(bases, tmp_path, cut):
    d = _copy(bases["rotary"], tmp_path)
    text = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(text[:int(len(text) * cut)])
    _refused(d, "tokenizer.json", "not a valid tokenizer.json")


@FUZZ
@given(where=st.sampled_from(["", "model", "pre_tokenizer", "decoder"]),
       index=st.integers(0, 20), value=st.sampled_from(["x", 5, -1, [], {}, None, True, 1.5]))
def test_a_tokenizer_field_of_a_wrong_type_is_refused_or_loads_and_encodes(
        bases, tmp_path, where, index, value):
    d = _copy(bases["rotary"], tmp_path)
    data = json.loads((d / "tokenizer.json").read_text())
    node = data[where] if where else data
    if not isinstance(node, dict) or not node:
        return
    key = sorted(node)[index % len(node)]
    node[key] = value
    (d / "tokenizer.json").write_text(json.dumps(data))
    try:
        _, tok, _ = ck.load_model(d)
    except UserError as e:
        assert str(d / "tokenizer") in str(e), str(e)
        return
    ids = tok.encode("hello world")  # what loads, works: ids the model has rows for
    assert all(0 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize("field", ["bos_token", "eos_token", "pad_token"])
def test_a_special_token_object_without_content_is_refused(bases, tmp_path, field):
    # {} was read as "no such token": the model's BOS was dropped from every prompt unseen.
    d = _copy(bases["rotary"], tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg[field] = {"lstrip": False}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    _refused(d, "tokenizer_config.json", f"field '{field}'", "'content' string")


# --- model.safetensors --------------------------------------------------------------------------

@FUZZ
@given(at=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_a_flipped_header_byte_is_refused_naming_the_file_or_loads_the_same(
        bases, tmp_path, at, bit):
    d = _copy(bases["reward"], tmp_path)
    raw = bytearray((d / "model.safetensors").read_bytes())
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[at % header] ^= 1 << bit
    (d / "model.safetensors").write_bytes(bytes(raw))
    try:
        model, _, _ = ck.load_model(d)
    except UserError as e:
        assert str(d / "model.safetensors") in str(e), str(e)
        return
    assert _same_weights(model, ck.load_model(bases["reward"])[0])  # metadata's bytes only


@FUZZ
@given(base=st.sampled_from(["rotary", "reward", "transformer"]), index=st.integers(0, 50),
       change=st.sampled_from(["drop", "extra", "shape", "flat", "int64", "bool", "uint8",
                               "float16", "float64", "bfloat16"]))
def test_a_wrong_missing_or_extra_tensor_is_refused_naming_it(bases, tmp_path, base, index,
                                                              change):
    d = _copy(bases[base], tmp_path)
    state = load_file(str(d / "model.safetensors"))
    name = sorted(state)[index % len(state)]
    t = state[name]
    if change == "drop":
        del state[name]
    elif change == "extra":
        state[name + ".extra"] = torch.zeros(2)
    elif change == "shape":
        state[name] = torch.zeros(*t.shape[:-1], t.shape[-1] + 1)
    elif change == "flat":
        state[name] = t.reshape(1, -1)
    else:
        state[name] = t.to(getattr(torch, change))
    save_file(state, str(d / "model.safetensors"))
    original = ck.load_model(bases[base])[0]
    if change.startswith(("float", "bfloat")):  # another float type: the file's values
        model = ck.load_model(d)[0]
        want = original.state_dict()[name].to(getattr(torch, change)).float()
        assert torch.equal(model.state_dict()[name], want)
        return
    shown = name + ".extra" if change == "extra" else name
    _refused(d, "model.safetensors", "do not fit")
    with pytest.raises(UserError, match=shown.replace(".", r"\.")[:60]):
        ck.load_model(d)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_an_integer_tensor_is_refused_not_loaded_as_whole_numbers(bases, tmp_path, dtype):
    # Cast to float32 without a word: a weight of 0s and 1s, a model computing garbage.
    d = _copy(bases["rotary"], tmp_path)
    state = load_file(str(d / "model.safetensors"))
    state["blocks.0.attn.q_proj.weight"] = state["blocks.0.attn.q_proj.weight"].to(dtype)
    save_file(state, str(d / "model.safetensors"))
    _refused(d, "model.safetensors", "blocks.0.attn.q_proj.weight is of type",
             "floating-point")


# --- checkpoints' manifest.json ----------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    model = _gpt(tok)
    ck.Checkpointer(run).save(3, model, tok, torch.optim.AdamW(model.parameters()),
                              state={"step": 3})
    return run


def _resume(run: Path, tok) -> dict:
    c = ck.Checkpointer(run)
    model = _gpt(tok)
    return c.load(c.latest(), model, torch.optim.AdamW(model.parameters()))


@FUZZ
@given(index=st.integers(0, 20),
       change=st.sampled_from(["sum", "drop", "step", "sha256", "file"]),
       value=st.sampled_from(["x", 1.5, None, True, -1, [], {}, 10**400]))
def test_a_manifest_that_does_not_vouch_for_its_files_is_refused(checkpoint, tok, tmp_path,
                                                                 index, change, value):
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(checkpoint, run)
    mf = run / "checkpoints" / "step-3" / "manifest.json"
    manifest = json.loads(mf.read_text())
    name = sorted(manifest["sha256"])[index % len(manifest["sha256"])]
    if change == "sum":
        manifest["sha256"][name] = "0" * 64
    elif change == "drop":
        del manifest["sha256"][name]
    elif change == "file":
        (mf.parent / name).write_bytes((mf.parent / name).read_bytes() + b"\0")
    else:
        manifest[change] = value
    mf.write_text(json.dumps(manifest))
    with pytest.raises(UserError) as e:
        _resume(run, tok)
    assert str(mf.parent) in str(e.value) and "remove" in str(e.value)


def test_a_manifest_step_that_is_no_step_number_is_refused(checkpoint, tok, tmp_path):
    # int() read 1.5 and true as step 1, and 1e400 (infinity) raised OverflowError.
    for step in ("1e400", "1.5", "true", '"3"'):
        run = tmp_path / step
        shutil.copytree(checkpoint, run)
        mf = run / "checkpoints" / "step-3" / "manifest.json"
        mf.write_text(mf.read_text().replace('"step": 3', f'"step": {step}'))
        with pytest.raises(UserError, match="manifest.json: is damaged .*not a step number"):
            _resume(run, tok)


def test_a_file_the_manifest_does_not_list_is_refused_unverified(checkpoint, tok, tmp_path):
    # A manifest whose sha256 was emptied verified nothing, and the weights loaded unchecked.
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    mf = run / "checkpoints" / "step-3" / "manifest.json"
    manifest = json.loads(mf.read_text())
    del manifest["sha256"]["model.safetensors"]
    mf.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="model.safetensors: checkpoint file is not listed"):
        _resume(run, tok)
    (mf.parent / ".DS_Store").write_bytes(b"x")  # a hidden file is no save's: not asked for
    manifest["sha256"]["model.safetensors"] = ck._sha256(mf.parent / "model.safetensors")
    mf.write_text(json.dumps(manifest))
    assert _resume(run, tok) == {"step": 3}


# --- a --config YAML ----------------------------------------------------------------------------

YAML_VALUES = ["x", "[1, 2]", "{a: 1}", "null", "true", "1.5", "-3", "1e400", ".nan", "???",
               "2024-13-01", "&a 1", "!!binary aGk=", "'1'", "{a: {b: {c: 1}}}"]


@FUZZ
@given(index=st.integers(0, 60), value=st.sampled_from(YAML_VALUES),
       nest=st.sampled_from(["", "x.", "model."]))
def test_a_yaml_config_value_of_the_wrong_kind_is_refused_naming_file_line_and_key(
        tmp_path, index, value, nest):
    names = sorted(f.name for f in dataclasses.fields(SFTConfig))
    name = names[index % len(names)]
    text = f"seed: 1\n{name}: {value}\n"
    if nest:  # a key nested under one that holds one value, or under no field
        top, _ = nest.split(".")
        text = f"seed: 1\n{top}:\n  {name}: {value}\n"
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        cfg = load_config(SFTConfig, path, command="gptlab sft")
    except UserError as e:
        assert str(e).startswith(str(path)) and "field '" in str(e) or "twice" in str(e), str(e)
        return
    assert not nest and cfg.seed == 1  # taken as written: the field takes such a value


@pytest.mark.parametrize("text, line, key", [
    ("x: &a\n  y: *a\n", 2, "x.y"), ("data: &a [*a]\n", 1, "data[0]"),
    ("seed: 1\nlr: &a\n  - 1\n  - z: *a\n", 4, "lr[1].z")])
def test_a_yaml_value_that_holds_itself_is_refused_not_a_recursion_error(tmp_path, text, line,
                                                                        key):
    # OmegaConf recursed on it until Python's stack ran out: a RecursionError, exit 1.
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(SFTConfig, path)
    assert str(e.value).startswith(f"{path}:{line}, field '{key}': holds itself")
    assert main(["sft", "--config", str(path), "--model", "m", "--data", "d",
                 "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_yaml_anchors_and_merges_that_do_not_recurse_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: &x 0.001\nmin_lr_ratio: *x\n<<: {seed: 4}\n")
    cfg = load_config(SFTConfig, path)
    assert (cfg.lr, cfg.min_lr_ratio, cfg.seed) == (0.001, 0.001, 4)


# --- a Hugging Face directory and a GGUF file -------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from test_interop import _hf_model

    d = tmp_path_factory.mktemp("hf")
    _hf_model("llama", num_hidden_layers=1).save_pretrained(d)
    return d


@FUZZ
@given(index=st.integers(0, 60), value=st.sampled_from(BAD_VALUES))
def test_a_hugging_face_config_field_of_a_wrong_value_is_refused_naming_it(
        hf_dir, tmp_path, index, value):
    from gptlab.interop import load_pretrained

    d = tmp_path / "hf"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(hf_dir, d)
    raw = json.loads((d / "config.json").read_text())
    key = sorted(raw)[index % len(raw)]
    raw[key] = value
    (d / "config.json").write_text(json.dumps(raw))
    original = load_pretrained(hf_dir)[0]
    try:
        model = load_pretrained(d)[0]
    except UserError as e:
        assert str(d) in str(e), str(e)
        return
    # Loaded: a field gptlab does not read (dtype, ids, dropout), or one it reads as written.
    assert _same_weights(model, original)


def test_a_hugging_face_epsilon_too_large_for_a_float_is_refused(hf_dir, tmp_path):
    from gptlab.interop import load_pretrained

    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    text = (d / "config.json").read_text()
    raw = json.loads(text)
    raw["rms_norm_eps"] = 10**400
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="field 'rms_norm_eps': .*an integer of 401 digits"):
        load_pretrained(d)


def test_a_hugging_face_integer_tensor_is_refused(hf_dir, tmp_path):
    from gptlab.interop import load_pretrained

    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    state = load_file(str(d / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int64)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="model.norm.weight is of type int64"):
        load_pretrained(d)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from test_interop import _hf_model, _write_gguf

    return _write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf",
                       _hf_model("llama", num_hidden_layers=1))


@FUZZ
@given(at=st.integers(0, 10**6), bit=st.integers(0, 7), cut=st.booleans())
def test_a_damaged_gguf_is_refused_naming_it_or_loads(gguf_file, tmp_path, at, bit, cut):
    from gptlab.interop import load_pretrained

    raw = bytearray(gguf_file.read_bytes())
    head = min(len(raw), 4096)  # the header and metadata: the tensors' bytes are any floats
    if cut:
        raw = raw[:at % len(raw)]
    else:
        raw[at % head] ^= 1 << bit
    p = tmp_path / "m.gguf"
    p.write_bytes(bytes(raw))
    try:
        load_pretrained(p)
    except UserError as e:
        assert str(p) in str(e), str(e)
