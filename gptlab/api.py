"""The Python API behind the verbs, for notebooks and scripts.

    from gptlab import api
    model, tok = api.load("runs/demo/round-2/ppo")
    print(api.generate_text((model, tok), ["SELECT"], greedy=True))
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch

from gptlab.checkpoint import check_tokenizer_fits
from gptlab.engine import SamplingParams, generate
from gptlab.errors import UserError
from gptlab.stop_strings import StopStrings, check_stop_strings, cut_at_stop


def load(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a gptlab model directory, a Hugging Face directory or a .gguf,
    on `device` (cpu, cuda, cuda:N, mps, or auto: a GPU where there is one)."""
    from gptlab.checkpoint import load_language_model
    from gptlab.train.loop import select_device
    model, tok, _ = load_language_model(path, device=select_device(device))
    return model, tok


def fit_prompt(ids: list[int], context: int, max_new_tokens: int, truncate: bool,
               bos_id: int | None = None, field: str = "prompt") -> tuple[list[int], int]:
    """Make room for generation: with `truncate`, drop the oldest tokens (and say so on
    stderr), keeping a leading `bos_id` (the model was trained with BOS first); without it, a
    prompt that does not fit is a UserError naming `field` (`generate_text`'s `prompts[i]`).
    Returns (ids, dropped)."""
    room = context - max_new_tokens
    if len(ids) <= room:
        return ids, 0
    # The shortest prompt there is: a token, after the BOS a prompt begins with.
    keep = ids[:1] if bos_id is not None and ids and ids[0] == bos_id else []
    if room < len(keep) + 1:  # no prompt fits, shortened or truncated
        least = "BOS and one token" if keep else "one token"
        raise UserError(f"max_new_tokens {max_new_tokens} leaves no room in the context of "
                        f"{context} for a prompt of {least}; lower it (--max-new-tokens) to at "
                        f"most {context - len(keep) - 1}", field="max_new_tokens")
    if not truncate:
        raise UserError(f"prompt has {len(ids)} tokens, but the context of {context} minus "
                        f"max_new_tokens {max_new_tokens} leaves room for {room}; shorten it, "
                        f"lower max_new_tokens (--max-new-tokens), or set truncate (--truncate) "
                        f"to drop the oldest tokens",
                        field=field)
    dropped = len(ids) - room
    print(f"note: prompt truncated: dropped its first {dropped} of {len(ids)} tokens"
          + (" after BOS" if keep else ""), file=sys.stderr)
    return keep + ids[len(keep) + dropped:], dropped


def generate_text(model: str | Path | tuple[torch.nn.Module, Any], prompts: list[str], *,
                  max_new_tokens: int = 64, greedy: bool = False, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
                  truncate: bool = False, device: str = "auto",
                  stop: list[str] | None = None) -> list[str]:
    """Continue each raw text prompt; returns the continuations (without the prompt), one per
    prompt. `prompts` is a list: a single str is refused, not continued letter by letter.
    `model` is a model path or the (model, tokenizer) pair `load` returns; `device` is where a
    model loaded from a path runs (`auto`: CUDA where there is a GPU). `stop`: texts that end
    a continuation as soon as its text holds one (across tokens, or inside one); the text
    returned ends before it."""
    _check_prompts(prompts)
    stop = check_stop_strings(stop)
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=greedy,
                            temperature=temperature, top_k=top_k, top_p=top_p)
    if not prompts:  # no continuation to make (the engine needs a batch of one or more)
        return []
    path = isinstance(model, (str, os.PathLike))
    net, tok = load(model, device) if path else _model_pair(model)
    check_tokenizer_fits(net, tok)  # a (model, tokenizer) pair was never checked together
    encoded = []
    for i, text in enumerate(prompts):
        ids = tok.encode(text, bos=tok.bos_id is not None)
        if not ids:  # a tokenizer without BOS: nothing for the model to continue
            raise UserError("the prompt is empty", field=f"prompts[{i}]")
        encoded.append(fit_prompt(ids, net.config.context, max_new_tokens, truncate,
                                  bos_id=tok.bos_id, field=f"prompts[{i}]")[0])
    params = dataclasses.replace(params, stop_ids=tuple(sorted(tok.stop_ids)))
    out = generate(net, encoded, params, seed=seed, pad_id=tok.pad_id,
                   stop_when=StopStrings(tok, stop, encoded) if stop else None)
    # Decoded after its prompt, a continuation keeps the space its first word's "▁" stands for
    # (SentencePiece); one cut at max_new_tokens ends where it was cut, never in half a character.
    texts = [tok.decode_continuation(ids, t, cut=not done)
             for ids, t, done in zip(encoded, out.tokens, out.finished)]
    return [cut_at_stop(text, stop)[0] for text in texts] if stop else texts


def classify(model: str | Path | tuple[torch.nn.Module, Any], texts: list[str], *,
             device: str = "auto", batch_size: int = 32) -> list[str]:
    """The label a classifier (`gptlab finetune`'s OUT) gives each text, by name. `model` is
    its path or the (model, tokenizer) pair `load` returns. Each text is encoded as
    fine-tuning encoded it (BOS first where the tokenizer has one, EOS last); one longer
    than the context is a UserError naming `texts[i]`."""
    from gptlab.model.heads import ClassifierModel
    from gptlab.train.finetune import Labelled, collate
    _check_prompts(texts)
    net, tok = _model_and_tokenizer(model, device)
    if not isinstance(net, ClassifierModel):
        raise UserError(f"must be a classifier (gptlab finetune's output), got the "
                        f"{type(net).__name__}", field="model")
    end = [tok.eos_id] if tok.eos_id is not None else []
    items = []
    for i, text in enumerate(texts):
        ids = tok.encode(text, bos=tok.bos_id is not None) + end
        if len(ids) > net.config.context:
            raise UserError(f"has {len(ids)} tokens, more than the model's context of "
                            f"{net.config.context}", field=f"texts[{i}]")
        items.append(Labelled(ids, net.labels[0]))
    index = {name: i for i, name in enumerate(net.labels)}
    device_of = next(net.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            b = collate(items[start:start + batch_size], tok.pad_id, index)
            logits = net.eval()(b["input_ids"].to(device_of), b["attention_mask"].to(device_of),
                                right_padded=True)
            out += [net.labels[j] for j in logits.argmax(-1).tolist()]
    return out


def translate(model: str | Path | tuple[torch.nn.Module, Any], texts: list[str], *,
              beam: int = 4, length_penalty: float = 0.6, device: str = "auto",
              batch_size: int = 32, max_new_tokens: int | None = None) -> list[str]:
    """What an encoder-decoder Transformer (`gptlab seq2seq`'s OUT) writes for each source
    text, by beam search (`beam` 1 with `length_penalty` 0: greedy), up to the source's
    length + 50 tokens or `max_new_tokens`. `model` is its path or the (model, tokenizer) pair
    `load` returns; a text longer than the context is a UserError naming `texts[i]`."""
    from gptlab.model.transformer import Transformer
    from gptlab.train.seq2seq import translate_ids
    _check_prompts(texts)
    net, tok = _model_and_tokenizer(model, device)
    if not isinstance(net, Transformer):
        raise UserError(f"must be an encoder-decoder Transformer (gptlab seq2seq's output), "
                        f"got the {type(net).__name__}", field="model")
    sources = []
    for i, text in enumerate(texts):
        ids = tok.encode(text) + [tok.eos_id]
        if len(ids) > net.config.context:
            raise UserError(f"has {len(ids)} tokens, more than the model's context of "
                            f"{net.config.context}", field=f"texts[{i}]")
        sources.append(ids)
    return translate_ids(net, tok, sources, beam, length_penalty, batch_size, max_new_tokens)


def _model_pair(model: Any) -> tuple[torch.nn.Module, Any]:
    """`model` as the (GPT, Tokenizer) pair `load` returns; a UserError naming what it is
    instead (a bare model, a tokenizer of None, the two swapped)."""
    from gptlab.model.gpt import GPT
    from gptlab.tokenizer import Tokenizer
    expected = "a model path, or the (model, tokenizer) pair api.load returns"
    if not isinstance(model, tuple) or len(model) != 2:
        got = f"a tuple of {len(model)}" if isinstance(model, tuple) else \
            f"the {type(model).__name__}"
        raise UserError(f"must be {expected}, got {got}", field="model")
    net, tok = model
    # A torch.compile'd model wraps the GPT: generation runs the GPT itself (a KV-cache decode
    # changes shape at every step, which a compiled graph would recompile for).
    net = getattr(net, "_orig_mod", net)
    if not isinstance(net, GPT):
        raise UserError(f"must be {expected}: its first item must be a decoder-only GPT, got "
                        f"the {type(net).__name__}", field="model")
    if not isinstance(tok, Tokenizer):
        got = "None (the model has no tokenizer)" if tok is None else f"the {type(tok).__name__}"
        raise UserError(f"must be {expected}: its second item must be a Tokenizer, got {got}",
                        field="model")
    return net, tok


def _model_and_tokenizer(model: Any, device: str) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of a model directory's path, loaded on `device`, or of the pair
    `load` returned, as given."""
    if isinstance(model, (str, os.PathLike)):
        from gptlab.checkpoint import load_model
        from gptlab.train.loop import select_device
        net, tok, _ = load_model(model, select_device(device))
        return net, tok
    return model


def _check_prompts(prompts: Any) -> None:
    """`prompts` must be a list of str: a str is itself a sequence (of its letters)."""
    if isinstance(prompts, str):
        raise UserError("must be a list of texts, got a single str; pass [text] to continue "
                        "one text", field="prompts")
    if not isinstance(prompts, (list, tuple)):
        raise UserError(f"must be a list of texts, got the {type(prompts).__name__}",
                        field="prompts")
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise UserError(f"item {i} must be a str, got the {type(text).__name__}",
                            field="prompts")
