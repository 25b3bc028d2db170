"""GPT-1's fine-tuning (`gptlab finetune`): the classifier on the last real token, the loss
L2 + λ·L1 against a hand computation, training to a held-out accuracy, the model directory
and `api.classify`, resume, and bad input by file, line and field."""
from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab import api
from gptlab.checkpoint import load_model, read_meta, save_model
from gptlab.cli import main
from gptlab.errors import UserError
from gptlab.model import GPT, get_preset
from gptlab.model.heads import ClassifierModel
from gptlab.tokenizer import train_tokenizer
from gptlab.train.finetune import FinetuneConfig, collate, finetune, finetune_loss, Labelled

ANIMALS = {"cat": ["cat", "kitten", "tabby"], "dog": ["dog", "puppy", "hound"]}
PLACES = ["on the mat", "in the garden", "by the door", "under the table", "near the river"]
VERBS = ["sat", "slept", "waited", "played", "ran"]


def texts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["cat", "dog"])
        rows.append({"text": f"the {rng.choice(ANIMALS[label])} {rng.choice(VERBS)} "
                             f"{rng.choice(PLACES)}", "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ft") / "pretrained"
    tok = train_tokenizer([" ".join(r["text"] for r in texts(300, 9))], vocab_size=300)
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=32)
    save_model(d, GPT(cfg), tok)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ft_data")
    train = texts(256, 1)
    seen = {r["text"] for r in train}
    val = [r for r in texts(400, 2) if r["text"] not in seen][:64]  # held out: none trained on
    return write_jsonl(d / "train.jsonl", train), write_jsonl(d / "val.jsonl", val)


def test_the_classifier_reads_the_last_real_token_and_keeps_the_language_model(pretrained):
    gpt, tok, _ = load_model(pretrained)
    torch.manual_seed(0)
    model = ClassifierModel.from_gpt(gpt, ["cat", "dog"]).eval()
    short = tok.encode("the cat sat", bos=True) + [tok.eos_id]
    long = tok.encode("the puppy slept in the garden", bos=True) + [tok.eos_id]
    batch = collate([Labelled(short, "cat"), Labelled(long, "dog")],
                    tok.pad_id, {"cat": 0, "dog": 1})
    with torch.no_grad():
        both = model(batch["input_ids"], batch["attention_mask"], right_padded=True)
        alone = model(torch.tensor([short]))
        _, lm = model.logits_and_lm(torch.tensor([long]))
        want_lm = gpt.eval()(torch.tensor([long]))
    assert torch.allclose(both[0], alone[0], atol=1e-5)  # padding after it changes nothing
    assert torch.allclose(lm, want_lm, atol=1e-5)  # the pretrained LM, whole
    assert both.shape == (2, 2) and model.head.weight.std().item() < 0.05


def test_the_loss_is_the_labels_cross_entropy_plus_lambda_times_the_lm_loss(pretrained):
    gpt, tok, _ = load_model(pretrained)
    torch.manual_seed(1)
    model = ClassifierModel.from_gpt(gpt, ["cat", "dog"])
    rows = [tok.encode(t, bos=True) + [tok.eos_id] for t in ("the cat sat", "the dog ran by the "
                                                                           "door")]
    batch = collate([Labelled(rows[0], "cat"), Labelled(rows[1], "dog")],
                    tok.pad_id, {"cat": 0, "dog": 1})
    with torch.no_grad():
        # By hand: each row alone, no padding.
        ce = [F.cross_entropy(model(torch.tensor([r])), torch.tensor([i])).item()
              for i, r in enumerate(rows)]
        nll, count = 0.0, 0
        for r in rows:
            logp = gpt.eval()(torch.tensor([r]))[0].log_softmax(-1)
            nll -= sum(logp[t, r[t + 1]].item() for t in range(len(r) - 1))
            count += len(r) - 1
        for coef in (0.0, 0.5, 2.0):
            got = finetune_loss(coef)(model.eval(), batch).item()
            assert math.isclose(got, sum(ce) / 2 + coef * nll / count, rel_tol=1e-5)


def test_finetuning_learns_the_labels_and_saves_a_classifier(pretrained, data, tmp_path):
    train, val = data
    out = finetune(FinetuneConfig(model=str(pretrained), data=str(train), val_data=str(val),
                                  out=str(tmp_path / "ft"), lr=3e-3, max_steps=40,
                                  batch_size=16, eval_every=20, progress=False))
    meta = read_meta(out)
    assert meta["stage"] == "finetune" and meta["labels"] == ["cat", "dog"]
    assert meta["val_accuracy"] >= 0.9 and meta["val_texts"] == 64 and meta["lm_coef"] == 0.5
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text()
            .splitlines()]
    accs = [r["accuracy"] for r in rows if "accuracy" in r]
    assert accs[0] < 0.75 <= accs[-1]  # from chance to learnt
    model, tok, _ = load_model(out)
    assert isinstance(model, ClassifierModel)
    held = [json.loads(line) for line in val.read_text().splitlines()]
    said = api.classify((model, tok), [r["text"] for r in held], device="cpu")
    right = sum(s == r["label"] for s, r in zip(said, held)) / 64
    assert math.isclose(right, meta["val_accuracy"])
    assert api.classify(str(out), [r["text"] for r in held], device="cpu") == said
    with pytest.raises(UserError, match="must be a classifier"):
        api.classify(str(pretrained), ["the cat"], device="cpu")


def test_a_resumed_run_ends_where_one_run_ends(pretrained, data, tmp_path):
    train, val = data
    settings = dict(model=str(pretrained), data=str(train), val_data=str(val), lr=3e-3,
                    batch_size=16, eval_every=0, progress=False, lm_coef=0.5)
    one = finetune(FinetuneConfig(**settings, out=str(tmp_path / "one"), max_steps=12))
    finetune(FinetuneConfig(**settings, out=str(tmp_path / "two"), max_steps=6, save_every=6))
    two = finetune(FinetuneConfig(**settings, out=str(tmp_path / "two"), max_steps=12,
                                  resume=True))
    a, _, _ = load_model(one)
    b, _, _ = load_model(two)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("row, field, message", [
    ({"txt": "the cat", "label": "cat"}, "text", "is missing; the line has 'txt' and 'label'"),
    ({"text": "", "label": "cat"}, "text", "must be a non-empty text"),
    ({"text": "the cat"}, "label", "is missing"),
    ({"text": "the cat", "label": 1.5}, "label", "a text, a whole number or a boolean, got 1.5"),
    ({"text": "the cat", "label": None}, "label", "is missing"),  # a null is a field left out
])
def test_a_bad_record_is_named_by_file_line_and_field(pretrained, tmp_path, row, field,
                                                      message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "the dog", "label": "dog"}, row])
    with pytest.raises(UserError) as e:
        finetune(FinetuneConfig(model=str(pretrained), data=str(path), out=str(tmp_path / "o"),
                                progress=False))
    assert (str(e.value.path), e.value.line, e.value.field) == (str(path), 2, field)
    assert message in e.value.message
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_labels_a_classifier_cannot_have_are_refused(pretrained, data, tmp_path):
    train, _ = data
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "the cat", "label": "cat"}] * 4)
    with pytest.raises(UserError, match="one label only"):
        finetune(FinetuneConfig(model=str(pretrained), data=str(one), out=str(tmp_path / "o"),
                                progress=False))
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "the cat", "label": "cat"},
                                               {"text": "the bird", "label": "bird"}])
    with pytest.raises(UserError) as e:
        finetune(FinetuneConfig(model=str(pretrained), data=str(train), val_data=str(val),
                                out=str(tmp_path / "o"), progress=False))
    assert (str(e.value.path), e.value.line, e.value.field) == (str(val), 2, "label")
    assert "'bird', a label the training data does not have" in e.value.message


def test_numbers_and_booleans_are_labels_by_name_in_numeric_order(pretrained, tmp_path):
    rows = [{"text": f"the cat sat {'on the mat' * (i % 3)}", "label": [10, 2, 1][i % 3]}
            for i in range(12)]
    out = finetune(FinetuneConfig(model=str(pretrained), data=str(write_jsonl(
        tmp_path / "n.jsonl", rows)), out=str(tmp_path / "n"), max_steps=1, val_fraction=0,
        progress=False))
    assert read_meta(out)["labels"] == ["1", "2", "10"]
    from gptlab.train.finetune import sorted_labels
    assert sorted_labels({"01", "1", "-3", "10"}) == ["-3", "01", "1", "10"]
    assert sorted_labels({"--1", "2"}) == ["--1", "2"]  # not a number: sorted as text


def test_the_verb_fine_tunes_and_texts_too_long_are_counted(pretrained, data, tmp_path, capsys):
    train, val = data
    rows = [*map(json.loads, train.read_text().splitlines()[:30]),
            {"text": "the cat sat " * 40, "label": "cat"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["finetune", "--model", str(pretrained), "--data", str(path), "--val-data",
                 str(val), "--out", str(tmp_path / "v"), "--max-steps", "2", "--no-progress",
                 "--lm-coef", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{path}: skipped 1 text: 1 longer than the context of 32" in err, err
    assert "warning" not in err  # the held-out texts are none of the training ones
    assert "held-out accuracy" in err
    assert main(["finetune", "--model", str(pretrained), "--data", str(path), "--out",
                 str(tmp_path / "w"), "--lm-coef", "-1"]) == 2
    assert "field '--lm-coef': must be >= 0, got -1.0" in capsys.readouterr().err


def test_a_classifier_is_no_language_model_nor_a_reward_model(pretrained, data, tmp_path,
                                                                capsys):
    train, _ = data
    out = finetune(FinetuneConfig(model=str(pretrained), data=str(train), val_fraction=0,
                                  out=str(tmp_path / "c"), max_steps=1, progress=False))
    assert main(["generate", "--model", str(out), "--prompt", "the cat"]) == 2
    assert "not a decoder-only language model: this is a classifier (gptlab finetune's" in \
        capsys.readouterr().err
    assert main(["reward", "--model", str(out), "--data", str(train), "--out",
                 str(tmp_path / "r")]) == 2
    assert "the reward model must start from a GPT model, not a classifier" in \
        capsys.readouterr().err
