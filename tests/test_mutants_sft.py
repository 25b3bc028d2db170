"""Hand-computed cases for SFT's data and run that a mutation pass found unchecked: each test
here failed on a plausible bug (named in its docstring) that the rest of the suite let
through."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import gptlab.train.sft as sft_module
from gptlab.checkpoint import save_model
from gptlab.data.instruct import Example
from gptlab.model import GPT, get_preset
from gptlab.tokenizer import train_tokenizer
from gptlab.train.sft import SFTConfig, sft, split_examples

import instruct_task as task


def test_the_split_keeps_both_sides_in_file_order():
    """The held-out demonstrations in the shuffled order rather than the file's went unseen
    (the training ones are checked sorted only through the sampler). random.Random(0) shuffles
    range(10) to 7 8 1 5 3 4 2 0 9 6: its first int(10 * 0.3) = 3 are held out."""
    examples = [Example([1, 2, 3], [0, 1, 1], id=i, line=i + 1) for i in range(10)]
    train, val = split_examples(examples, 0.3, seed=0)
    assert [e.id for e in val] == [1, 7, 8]
    assert [e.id for e in train] == [0, 2, 3, 4, 5, 6, 9]


class _Stop(Exception):
    pass


@pytest.fixture
def stopped_at_train(tmp_path, monkeypatch):
    """A tiny base model and 40 demonstrations; `sft` stopped where it calls the common loop,
    with the config it hands over."""
    paths = task.write_task(tmp_path, n=40)
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
    save_model(tmp_path / "base", GPT(config), tok)
    seen = {}

    def train(model, batches, loss_fn, cfg, out, **kwargs):
        seen["items"], seen["cfg"] = batches.items, cfg
        raise _Stop

    monkeypatch.setattr(sft_module, "train", train)
    cfg = SFTConfig(model=str(tmp_path / "base"), data=str(paths["sft"]),
                    out=str(tmp_path / "sft"), val_fraction=0.25, progress=False, device="cpu")
    return cfg, seen


@pytest.mark.parametrize("batch_size,grad_accum,epochs,steps", [
    (4, 3, 2.0, 5),    # 2 x 30 / (4 x 3) = 5
    (4, 1, 2.0, 15),   # 2 x 30 / 4 = 15
    (8, 1, 0.5, 1),    # 0.5 x 30 / 8 = 1.875: whole updates, rounded down
    (8, 2, 0.1, 1),    # 0.1 x 30 / 16 = 0.19: at least one step
])
def test_epochs_count_updates_of_batch_size_times_grad_accum(stopped_at_train, batch_size,
                                                             grad_accum, epochs, steps):
    """--epochs sets max_steps to epochs x demonstrations / (batch_size x grad_accum): an
    update takes batch_size x grad_accum of them. Leaving grad_accum out (grad_accum times as
    many passes over the data as asked) went unseen."""
    cfg, seen = stopped_at_train
    with pytest.raises(_Stop):
        sft(dataclasses.replace(cfg, batch_size=batch_size, grad_accum=grad_accum,
                                epochs=epochs))
    assert len(seen["items"]) == 30  # 40 less int(40 x 0.25) = 10 held out
    assert seen["cfg"].max_steps == steps
    assert cfg.max_steps is None  # on a copy: the caller's config is left as it was


def test_a_demonstration_keeps_its_records_id_in_either_format(tmp_path):
    """A `messages` record's id dropped (a `prompt`/`completion` one's kept) went unseen."""
    from gptlab.data.instruct import demonstration

    paths = task.write_task(tmp_path, n=8)
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    chat = demonstration(tok, {"id": "m1", "messages": [
        {"role": "user", "content": "Is the cat happy?"},
        {"role": "assistant", "content": "yes"}]}, "d.jsonl", 3)
    text = demonstration(tok, {"id": "p1", "prompt": "Is the cat happy?", "completion": " yes"},
                         "d.jsonl", 4)
    assert (chat.id, chat.line, text.id, text.line) == ("m1", 3, "p1", 4)


def test_an_eos_that_is_no_markup_closes_an_assistant_turn_in_the_mask(tmp_path):
    """EOS is an end of turn even where it is an ordinary vocabulary token (not an added or
    special one): the mask trains on it after the answer. Taking only markup and the other
    `end_ids` as ends of turn went unseen: the answer's EOS fell out of the loss, and a model
    fine-tuned so never learns to stop."""
    from gptlab.tokenizer import Tokenizer

    paths = task.write_task(tmp_path, n=8)
    plain = train_tokenizer([paths["corpus"]], vocab_size=300, special_tokens=["<s>", "</s>"])
    newline = plain.encode("\n")[0]  # a byte token, no markup
    tok = Tokenizer(plain.hf, bos_token=None, eos_token=plain.hf.id_to_token(newline),
                    pad_token=None,
                    chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert tok.eos_id == newline and tok.end_ids == ()
    ids, mask = tok.render_chat([{"role": "user", "content": "Who?"},
                                 {"role": "assistant", "content": "yes no"},
                                 {"role": "user", "content": "And?"}])
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("yes no") + [newline]
