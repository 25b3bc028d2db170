"""SFT's run: which records it measures execution accuracy on."""
import dataclasses
import json

import pytest
import torch

import gptlab.eval.execution as execution
import gptlab.train.sft as sft_module
from gptlab.checkpoint import save_model
from gptlab.data.instruct import Example
from gptlab.io import read_jsonl
from gptlab.model import GPT, get_preset
from gptlab.tokenizer import train_tokenizer
from gptlab.train.sft import SFTConfig, sft

import instruct_task as task


class _Stop(Exception):
    pass


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A tiny model, demonstrations whose first line is too long for its context, and `sft`
    stopped where training would start, with what it measures execution accuracy on."""
    paths = task.write_task(tmp_path, n=60)
    rows = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    rows.insert(0, {"id": "long", "prompt": "cat " * 100, "completion": " yes"})
    paths["sft"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
    save_model(tmp_path / "base", GPT(config), tok)
    seen = {}

    def evaluator(world, tokenizer, records, max_new_tokens=96):
        seen["exec"] = records
        return lambda model: 0.0

    def train(model, batches, *args, **kwargs):
        seen["train"] = batches.items
        raise _Stop

    monkeypatch.setattr(execution, "world_exec_evaluator", evaluator)
    monkeypatch.setattr(sft_module, "train", train)
    cfg = SFTConfig(model=str(tmp_path / "base"), data=str(paths["sft"]), out=str(tmp_path / "sft"),
                    world="builtin", val_fraction=0.2, progress=False, device="cpu")
    return cfg, seen


def test_execution_accuracy_without_val_data_is_on_the_held_out_records(setup):
    cfg, seen = setup
    with pytest.raises(_Stop):
        sft(cfg)
    trained = {ex.id for ex in seen["train"]}
    measured = [r["id"] for r in seen["exec"]]
    usable = [r["id"] for r in read_jsonl(cfg.data) if r["id"] != "long"]
    assert len(trained) == 48 and len(measured) == 12      # 60 usable: 20% held out
    assert not trained & set(measured)
    assert measured == [i for i in usable if i not in trained]   # in file order
    assert all(isinstance(ex, Example) and ex.line is not None for ex in seen["train"])


def test_execution_accuracy_with_val_data_is_on_its_first_records(setup, tmp_path):
    cfg, seen = setup
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"id": f"v{i}", "prompt": "Is the owl happy?",
                                       "completion": " no"}) + "\n" for i in range(8)))
    with pytest.raises(_Stop):
        sft(dataclasses.replace(cfg, val_data=str(val), exec_eval=5))
    assert seen["exec"] == read_jsonl(val)[:5]
    assert len(seen["train"]) == 60                        # all of --data is trained on
