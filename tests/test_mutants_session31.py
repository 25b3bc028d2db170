"""Slips in this session's code that every earlier test let through (mutation testing):
GPTConfig.attention_scale's own checks, GPT-Neo's config.json in and out, the local layers'
ring KV cache, the metrics rows a checkpoint keeps and SFT's step-0 restore from --model."""
import math

import pytest

from gptlab.model.gpt import GPTConfig

BASE = dict(vocab_size=97, context=64, n_layers=2, n_heads=4, d_model=32)


@pytest.mark.parametrize("scale", [0, 0.0, -1.0, math.inf, math.nan, True, False, "1"])
def test_gptconfig_refuses_an_attention_scale_that_is_no_finite_number_above_0(scale):
    """A scale of 0 (every query attends evenly), an infinite one, a bool or a string is
    refused by GPTConfig itself (config.json's check covers loaded models alone): `0 <=`,
    `<= math.inf` and a dropped bool check each passed every test."""
    with pytest.raises(ValueError, match=r"attention_scale must be a finite number above 0 .*"
                                         + "not " + repr(scale).replace("'", ".")):
        GPTConfig(**BASE, attention_scale=scale)


@pytest.mark.parametrize("scale", [1, 1.0, 0.125, 1e-9, 1e9])
def test_gptconfig_takes_any_finite_attention_scale_above_0(scale):
    assert GPTConfig(**BASE, attention_scale=scale).attention_scale == scale


def neo_config(**changes) -> dict:
    """A GPT-Neo config.json of 4 layers, GPT-Neo's alternation (global first), a window of 5."""
    return {"model_type": "gpt_neo", "architectures": ["GPTNeoForCausalLM"], "vocab_size": 97,
            "hidden_size": 32, "num_heads": 4, "num_layers": 4, "max_position_embeddings": 64,
            "window_size": 5, "attention_types": [[["global", "local"], 2]], **changes}


def test_attention_layers_that_list_attention_types_expansion_are_read_without_a_note(
        tmp_path, capsys):
    """transformers writes both: [[["global", "local"], 2]] expands to global, local, global,
    local (the pair repeated, not each kind repeated), so the two agree and nothing is noted.
    Expanding each kind n times passed every test."""
    from gptlab.interop.hf import hf_config_to_gpt
    cfg = hf_config_to_gpt(neo_config(attention_layers=["global", "local"] * 2),
                           tmp_path / "config.json")
    assert (cfg.attention_window, cfg.local_attention_layers) == (5, "odd")
    assert capsys.readouterr().err == ""


def test_a_kind_repeated_0_times_is_no_layer_of_a_model_too_long_to_list(tmp_path):
    """[[["local"], N], [["global"], 0]] is N local layers: "all", with no list of them made, for
    a number of layers no list holds (a kind repeated 0 times counted passed every test)."""
    from gptlab.interop.hf import _MOST_LISTED, hf_config_to_gpt
    n = _MOST_LISTED + 1
    cfg = hf_config_to_gpt(neo_config(num_layers=n, attention_types=[
        [["local"], n], [["global"], 0]]), tmp_path / "config.json")
    assert (cfg.n_layers, cfg.attention_window, cfg.local_attention_layers) == (n, 5, "all")


def test_weights_key_tells_apart_the_same_bytes_under_another_name_shape_or_dtype():
    """SFT's start digest: the same bytes as another parameter, another shape or another dtype
    are other weights (hashing the values' bytes alone passed every test)."""
    import torch
    from torch import nn
    from gptlab.checkpoint import weights_key

    def module(**tensors):
        m = nn.Module()
        for name, t in tensors.items():
            m.register_buffer(name, t)
        return m

    values = torch.arange(6, dtype=torch.float32)
    keys = {weights_key(module(a=values.reshape(2, 3))),
            weights_key(module(a=values.reshape(3, 2))),
            weights_key(module(b=values.reshape(2, 3))),
            weights_key(module(a=values.view(torch.int32).reshape(2, 3)))}
    assert len(keys) == 4
    assert weights_key(module(a=values.reshape(2, 3).clone())) == weights_key(
        module(a=values.reshape(2, 3)))
    assert weights_key(module(a=values + 1)) != weights_key(module(a=values))


@pytest.mark.parametrize("fields, message", [
    # GPT-Neo's heads are d_model / n_heads wide: a custom head_dim alone is refused too.
    (dict(qkv_bias=False, attention_scale=1.0, head_dim=16),
     r"attention_scale=1.0 with qkv_bias=False exports as GPT-Neo alone .*; this model has "
     r"grouped-query attention "
     r"or a custom head_dim$"),
    # Neither family's positions: the scale is named beside them.
    (dict(positions="sinusoidal", attention_scale=1.0),
     r"positions='sinusoidal' with norm='layernorm' \(GPT2 and GPT-Neo need learned \+ "
     r"layernorm, Llama/Qwen2 rotary \+ rmsnorm\); attention_scale=1.0 \(Llama, Mistral and "
     r"Qwen2 divide QKᵀ by √head_dim; GPT2 and GPT-Neo can leave it undivided, attention_scale "
     r"1.0, with learned positions and layernorm\)$"),
])
def test_export_refuses_a_gpt_neo_shape_it_cannot_write_naming_each_setting(fields, message,
                                                                           tmp_path):
    """Each part of the refusal went unseen (mutation testing): without the head_dim check the
    export wrote Q/K/V weights of another shape than GPT-Neo's."""
    import torch
    from gptlab.errors import UserError
    from gptlab.interop.hf import export_hf
    from gptlab.model.gpt import GPT
    torch.manual_seed(0)
    model = GPT(GPTConfig(**BASE, **fields))
    with pytest.raises(UserError, match=message):
        export_hf(model, None, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_left_padded_cache_decodes_past_the_window_without_an_attention_mask():
    """`new_cache(left_padded=True)` fed no attention mask (rows of real tokens only): a local
    layer's band over its ring is built from the positions it keeps, as with a mask. Built
    over every position since the start, it passed every test (each one gives a mask)."""
    import torch
    from gptlab.model.gpt import GPT
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, "n_layers": 3}, positions="learned", attention_window=5,
                          local_attention_layers="odd", dropout=0.0)).eval()
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16, left_padded=True)
        steps = [model(ids[:, :7], cache=cache), model(ids[:, 7:10], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(10, 16)]
    assert cache.wk.shape[3] == 5
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_a_resume_puts_its_checkpoints_rows_back_where_metrics_jsonl_is_gone(tmp_path):
    """A checkpoint keeps its line's rows: with metrics.jsonl removed, rewinding writes them
    (returning early where the file is missing passed every test)."""
    from gptlab.train.loop import MetricsLog, read_metrics
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": math.nan}]
    MetricsLog.rewind(path, {"step": 2, "metrics": rows})
    got = read_metrics(path)
    assert got[0] == rows[0] and got[1]["step"] == 2 and math.isnan(got[1]["loss"])
    MetricsLog.rewind(tmp_path / "none.jsonl", {"step": 2})  # nothing kept, nothing there
    assert not (tmp_path / "none.jsonl").exists()


def test_a_gpt_neo_layer_count_no_float_holds_is_refused_naming_num_layers(tmp_path):
    """GPTConfig's own checks are named by config.json's key: GPT-Neo's layer count is
    num_layers (Llama's name for it passed every test)."""
    from gptlab.errors import UserError
    from gptlab.interop.hf import hf_config_to_gpt
    n = 10**400
    with pytest.raises(UserError) as err:
        hf_config_to_gpt(neo_config(num_layers=n, attention_types=[[["global"], n]]),
                         tmp_path / "config.json")
    assert err.value.field == "num_layers" and "an integer of 401 digits" in err.value.message


def _neo_shaped(tie: bool, dropout: float = 0.0):
    import torch
    from gptlab.model.gpt import GPT
    torch.manual_seed(3)
    model = GPT(GPTConfig(**BASE, qkv_bias=False, attention_scale=1.0, attention_window=3,
                          local_attention_layers="odd", tie_embeddings=tie,
                          dropout=dropout)).eval()
    with torch.no_grad():  # every weight random: a bias or norm left at its init would hide a swap
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def test_an_untied_gpt_neo_exports_its_head_as_lm_head_and_reads_back_the_same(tmp_path):
    """GPTNeoForCausalLM's head is lm_head.weight, beside transformer.* (under the prefix it
    was neither written where transformers reads it nor read back: that passed every test)."""
    import torch
    from safetensors.torch import load_file
    from gptlab.interop.hf import export_hf, load_hf
    model = _neo_shaped(tie=False)
    export_hf(model, None, tmp_path / "out")
    sd = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(sd["lm_head.weight"], model.lm_head.weight)
    assert "transformer.lm_head.weight" not in sd
    back, _ = load_hf(tmp_path / "out")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_a_gpt_neo_checkpoint_without_the_transformer_prefix_imports_the_same(tmp_path):
    """A base GPTNeoModel's weights carry no "transformer." (as GPT-2's may not): read as
    they are (the prefix taken for granted passed every test)."""
    import torch
    from safetensors.torch import load_file, save_file
    from gptlab.interop.hf import export_hf, load_hf
    model = _neo_shaped(tie=True)
    export_hf(model, None, tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    sd = load_file(str(path))
    save_file({k.removeprefix("transformer."): v for k, v in sd.items()}, str(path),
              metadata={"format": "pt"})
    back, _ = load_hf(tmp_path / "out")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_a_gpt_neo_export_writes_the_one_dropout_rate_at_each_of_its_places(tmp_path, capsys):
    """gptlab's one rate is GPT-Neo's embedding, attention and residual dropout alike, and reads
    back without a note (embed_dropout written as 0 passed every test)."""
    import json
    from gptlab.interop.hf import export_hf, load_hf
    model = _neo_shaped(tie=True, dropout=0.125)
    export_hf(model, None, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [cfg[k] for k in ("embed_dropout", "attention_dropout", "resid_dropout")] == [0.125] * 3
    capsys.readouterr()
    back, _ = load_hf(tmp_path / "out")
    assert back.config.dropout == 0.125 and capsys.readouterr().err == ""


@pytest.mark.parametrize("n_layers, layers, types, kinds", [
    (4, "all", [[["local"], 4]], ["local"] * 4),
    (4, "odd", [[["global", "local"], 2]], ["global", "local"] * 2),
    (3, [1, 2], [[["global"], 1], [["local"], 2]], ["global", "local", "local"]),
])
def test_a_gpt_neo_export_writes_attention_types_that_expand_to_its_layers(
        n_layers, layers, types, kinds, tmp_path):
    """attention_types expands to one kind a layer, and gptlab reads its own export back with
    the same local layers (a pattern of one kind counted as pairs, or each run counted as one
    layer, passed every test: transformers reads attention_layers, written beside them)."""
    import json
    import torch
    from gptlab.interop.hf import export_hf, load_hf
    from gptlab.model.gpt import GPT
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, "n_layers": n_layers}, qkv_bias=False, attention_scale=1.0,
                          attention_window=3, local_attention_layers=layers)).eval()
    export_hf(model, None, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["attention_types"], cfg["attention_layers"], cfg["window_size"]) == (
        types, kinds, 3)
    back, _ = load_hf(tmp_path / "out")
    assert (back.config.attention_window, back.config.local_attention_layers) == (3, layers)


def test_a_gpt_neo_activation_maps_to_its_own_function_and_an_unknown_one_is_refused(tmp_path):
    """GPT-Neo's activation_function maps as GPT-2's: plain gelu is the exact GELU, not gelu_new
    (gptlab's gelu_tanh; taken for it, it passed every test of its time), and a name gptlab
    cannot compute is refused naming the key."""
    from gptlab.errors import UserError
    from gptlab.interop.hf import hf_config_to_gpt
    assert hf_config_to_gpt(neo_config(activation_function="gelu"),
                            tmp_path / "config.json").activation == "gelu"
    assert hf_config_to_gpt(neo_config(activation_function="gelu_new"),
                            tmp_path / "config.json").activation == "gelu_tanh"
    with pytest.raises(UserError, match="quick_gelu") as err:
        hf_config_to_gpt(neo_config(activation_function="quick_gelu"), tmp_path / "config.json")
    assert err.value.field == "activation_function"
