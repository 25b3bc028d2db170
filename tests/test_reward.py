"""The reward model's batches, loss and accuracy with tied responses; bad settings."""
import dataclasses
import inspect
import json
import math

import pytest
import torch
from torch import nn

from gptlab.data.instruct import Ranking
from gptlab.engine import left_pad
from gptlab.train.reward import (EncodedRanking, collate_rankings, encode_ranking,
                                 pairwise_accuracy, reward_loss)


class FirstTokenScore(nn.Module):
    """Scores a sequence by its first token id: a reward model whose opinions we choose."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask):
        return self.scale * input_ids[:, 0].float()


class CharTokenizer:
    bos_id, eos_id = None, 0

    def encode(self, text, bos=False):
        return [ord(c) for c in text]

    def encode_completion(self, prompt, completion):  # no "▁" before a text: on its own
        return self.encode(completion)


def test_groups_travel_from_the_ranking_into_a_padded_batch():
    r = Ranking("p", ["a", "b", "c"], groups=[0, 1, 1])
    e = encode_ranking(CharTokenizer(), r, context=16)
    assert e.seqs == [[112, 97, 0], [112, 98, 0], [112, 99, 0]] and e.groups == [0, 1, 1]
    assert Ranking("p", ["a", "b"]).groups == [0, 1]  # old call sites: one level each
    batch = collate_rankings([e, EncodedRanking([[1], [2]])], pad_id=0)
    assert batch["k"].tolist() == [3, 2]
    assert batch["groups"].tolist() == [[0, 1, 1], [0, 1, 0]]


def test_a_tied_pair_is_neither_trained_on_nor_counted_by_accuracy():
    # Best first: [5], then [1] and [9] tied. The model prefers 9 > 5 > 1.
    tied = collate_rankings([EncodedRanking([[5], [1], [9]], groups=[0, 1, 1])], pad_id=0)
    strict = collate_rankings([EncodedRanking([[5], [1], [9]])], pad_id=0)
    model = FirstTokenScore()
    # Pairs 5>1 (right) and 5>9 (wrong); the tied 1, 9 is no pair.
    assert pairwise_accuracy(model, [tied]) == pytest.approx(1 / 2)
    assert pairwise_accuracy(model, [strict]) == pytest.approx(1 / 3)  # 1 > 9 counts, wrong

    def logsig(x):
        return -math.log1p(math.exp(-x))
    assert reward_loss(model, tied).item() == pytest.approx(-(logsig(4) + logsig(-4)) / 2,
                                                           abs=1e-5)


def test_equal_scores_count_half_a_pair():
    # Best first: [5], [5], [1]. The first pair is scored equal (half right), the others right.
    batch = collate_rankings([EncodedRanking([[5], [5], [1]])], pad_id=0)
    assert pairwise_accuracy(FirstTokenScore(), [batch]) == pytest.approx(2.5 / 3)


def test_normalisation_reads_raw_scores_even_of_a_normalised_reward_model():
    """Continuing from a reward model (a new round of rankings): its old bias and scale do not
    leak into the new normalisation, which starts from the raw scores."""
    from gptlab.model import GPT, GPTConfig
    from gptlab.model.heads import ScalarHeadModel
    from gptlab.train.reward import normalize_scores
    torch.manual_seed(0)
    model = ScalarHeadModel.from_gpt(GPT(GPTConfig(vocab_size=40, context=32, n_layers=1,
                                                   n_heads=2, d_model=16)))
    model.eval()
    seqs = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12], [13, 14]]

    def scores():
        with torch.no_grad():
            return torch.cat([model(torch.tensor([s])) for s in seqs])
    raw = scores()
    model.score_bias.fill_(5.0)     # an earlier round's normalisation
    model.score_scale.fill_(2.0)
    mean, std = normalize_scores(model, seqs, pad_id=0)
    assert mean == pytest.approx(raw.mean().item(), abs=1e-6)
    assert std == pytest.approx(raw.std().item(), rel=1e-5)
    new = scores()
    assert new.mean().item() == pytest.approx(0, abs=1e-5)
    assert new.std().item() == pytest.approx(1, rel=1e-5)


def test_shared_prompt_scoring_equals_scoring_each_sequence_whole():
    """A prompt encoded once for its K responses gives the scores and gradients of K whole
    sequences (prompts of different lengths: left padding on the prompt side)."""
    from gptlab.model import GPT, GPTConfig
    from gptlab.model.heads import ScalarHeadModel
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=40, context=32, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                    positions="rotary", norm="rmsnorm", activation="swiglu", bias=False)
    model = ScalarHeadModel.from_gpt(GPT(cfg))
    items = [EncodedRanking([[3, 4, 5, 6, 7], [3, 4, 5, 9], [3, 4, 5, 11, 12, 13]], prompt_len=3),
             EncodedRanking([[8, 9, 10, 11, 12, 2, 2], [8, 9, 10, 11, 12, 1]], groups=[0, 0],
                            prompt_len=5)]
    shared = collate_rankings(items, pad_id=0)
    assert shared["rows"].tolist() == [0, 0, 0, 1, 1]
    assert shared["prompt_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    whole = {k: shared[k] for k in ("input_ids", "attention_mask", "k", "groups")}
    from gptlab.train.reward import ranked_scores
    a, b = ranked_scores(model, shared), ranked_scores(model, whole)
    assert (a - b).abs().max().item() < 1e-5
    reward_loss(model, shared).backward()
    ga = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reward_loss(model, whole).backward()
    for g, p in zip(ga, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)



def test_shared_prompt_scoring_falls_back_when_the_padded_layout_overflows_the_context():
    """A long prompt with short answers next to a short prompt with a long answer: each
    sequence fits the context of 32, but the longest prompt (24) plus the longest answer (20)
    would not. The scores are still those of the sequences scored one by one."""
    from gptlab.model import GPT, GPTConfig
    from gptlab.model.heads import ScalarHeadModel
    from gptlab.train.reward import ranked_scores
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=40, context=32, n_layers=2, n_heads=4, d_model=32,
                    positions="learned", bias=False)
    model = ScalarHeadModel.from_gpt(GPT(cfg))
    long_prompt, short_prompt = list(range(1, 25)), [5, 6, 7]
    items = [EncodedRanking([long_prompt + [30, 31], long_prompt + [32]], prompt_len=24),
             EncodedRanking([short_prompt + [9] * 20, short_prompt + [8, 8]], prompt_len=3)]
    batch = collate_rankings(items, pad_id=0)
    assert batch["prompt_ids"].shape[1] + batch["cont_ids"].shape[1] == 44
    scores = ranked_scores(model, batch)
    with torch.no_grad():
        alone = torch.tensor([[model(torch.tensor([s])).item() for s in it.seqs] for it in items])
    assert (scores - alone).abs().max().item() < 1e-5


def _pad_reading_model():
    """A small reward model that never reads its score at token 2 (its pad, as a Hugging Face
    classifier whose pad is its end of turn)."""
    from gptlab.model import GPT, GPTConfig
    from gptlab.model.heads import ScalarHeadModel
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=40, context=32, n_layers=2, n_heads=4, d_model=32,
                    positions="rotary", bias=False)
    model = ScalarHeadModel.from_gpt(GPT(cfg)).eval()
    model.pad_token_id = 2
    return model


def test_a_row_of_nothing_but_pad_tokens_is_read_at_its_last_real_token():
    # With no token but the pad, the score is read at the row's last real token, not at the
    # batch's last position, which for a right-padded row is padding.
    model = _pad_reading_model()
    ids = torch.tensor([[5, 6, 7, 2], [2, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        got = model(ids, mask)
        alone = [model(torch.tensor([[5, 6, 7]]))[0], model(torch.tensor([[2, 2]]))[0]]
    assert torch.allclose(got, torch.stack(alone), atol=1e-5), (got, alone)


def test_a_continuation_of_nothing_but_pad_tokens_is_read_in_its_prompt():
    # A response that is only the pad (an end of turn and nothing before it) is scored where the
    # whole sequence is: at the prompt's last token, which the shared-prompt path cannot read.
    model = _pad_reading_model()
    with torch.no_grad():
        got = model.score_continuations(torch.tensor([[5, 6, 7]]), torch.ones(1, 3).long(),
                                        torch.tensor([0, 0]), torch.tensor([[8, 2], [2, 0]]),
                                        torch.tensor([[1, 1], [1, 0]]))
        whole = model(torch.tensor([[5, 6, 7, 8, 2], [5, 6, 7, 2, 2]]),
                      torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]))
        at_prompt = model(torch.tensor([[5, 6, 7]]))[0]
    assert torch.allclose(got, whole, atol=1e-5), (got, whole)
    assert torch.allclose(got[1], at_prompt, atol=1e-5)


def _normalised_model():
    """`_pad_reading_model` reading at the last real token, with a normalisation as `reward`
    sets after training (bias 0.7, scale 2.5) and a head bias of its own."""
    model = _pad_reading_model()
    model.pad_token_id = None
    with torch.no_grad():
        model.head.bias.fill_(0.3)
        model.score_bias.fill_(0.7)
        model.score_scale.fill_(2.5)
    return model


@pytest.mark.parametrize("long_prompt", [False, True])
def test_shared_prompt_scores_are_normalised_as_forwards_are(long_prompt):
    # Both paths of score_continuations (the prompt encoded once; and, when the padded prompt
    # and continuation overflow the context, the whole sequences) read on forward's scale.
    model = _normalised_model()
    prompts = [[5, 6, 7], [9] * (21 if long_prompt else 2)]
    conts = [[12, 13, 14] * 4, [8, 11]] if long_prompt else [[8, 11], [12, 13, 14]]
    p_ids, p_mask = left_pad(prompts)
    R = max(map(len, conts))
    c_ids = torch.tensor([c + [0] * (R - len(c)) for c in conts])
    c_mask = torch.tensor([[1] * len(c) + [0] * (R - len(c)) for c in conts])
    assert (p_ids.shape[1] + R > model.config.context) == long_prompt
    with torch.no_grad():
        got = model.score_continuations(p_ids, p_mask, torch.tensor([0, 1]), c_ids, c_mask)
        raw = torch.stack([model.values(torch.tensor([p + c]))[0, -1] for p, c in zip(prompts,
                                                                                     conts)])
    assert torch.allclose(got, (raw - 0.7) * 2.5, atol=1e-5), (got, raw)


def test_the_head_starts_normal_with_std_one_over_sqrt_d_plus_one_and_no_bias():
    # The init (InstructGPT's): nothing checked it, a mutant to nn.Linear's default
    # (uniform, std 1/sqrt(3d)) or to std 1 went unseen.
    from gptlab.model import GPTConfig
    from gptlab.model.heads import ScalarHeadModel
    torch.manual_seed(0)
    d = 2048
    head = ScalarHeadModel(GPTConfig(vocab_size=8, context=4, n_layers=1, n_heads=2,
                                     d_model=d)).head
    w = head.weight.detach().double().flatten()
    assert w.std().item() == pytest.approx(1 / math.sqrt(d + 1), rel=0.05)
    assert abs(w.mean().item()) < 3 / math.sqrt(d + 1) / math.sqrt(d)  # centred
    assert (w.abs() > 2 / math.sqrt(d + 1)).double().mean().item() == pytest.approx(
        0.0455, abs=0.015)  # normal tails, not a uniform's (none past 1.73 std)
    assert head.bias.tolist() == [0.0]


def test_folding_the_normalisation_puts_values_on_the_scale_of_scores():
    model = _normalised_model()
    ids = torch.tensor([[5, 6, 7, 8, 11]])
    with torch.no_grad():
        raw, score = model.values(ids), model(ids)
        model.fold_normalisation()
        folded, score_after = model.values(ids), model(ids)
    assert model.score_bias.item() == 0.0 and model.score_scale.item() == 1.0
    assert torch.allclose(folded, (raw - 0.7) * 2.5, atol=1e-5), (folded, raw)
    assert torch.allclose(score_after, score, atol=1e-5) and abs(score.item()) > 0.1


# --- bad input: exit code 2, a message naming the field, nothing new in --out -------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model directory (the reward model's start) and chosen/rejected rankings."""
    import instruct_task as task
    from gptlab.checkpoint import save_model
    from gptlab.model import GPT, get_preset
    from gptlab.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("reward_cli")
    paths = task.write_task(d, n=20)
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
    save_model(d / "sft", GPT(config), tok)
    rankings = d / "rankings.jsonl"
    rankings.write_text("".join(json.dumps({"prompt": f"Is the cat happy? {i}",
                                            "chosen": " yes", "rejected": " no"}) + "\n"
                                for i in range(12)))
    return d, rankings


def run_reward(base, out, *args):
    from gptlab.cli import main
    d, rankings = base
    return main(["reward", "--model", str(d / "sft"), "--data", str(rankings), "--out",
                 str(out), "--max-steps", "1", "--batch-size", "4", "--no-progress",
                 "--device", "cpu", *args])


def snapshot(path):
    return {p: p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else None


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0", "max_steps=null"], "field '--epochs': must be > 0, got 0.0"),
    (["--val-fraction", "-1"], "field '--val-fraction': must be in [0, 1), got -1.0"),
    (["--val-fraction", "1"], "field '--val-fraction': must be in [0, 1), got 1.0"),
    (["--beta1", "1"], "field '--beta1': must be in [0, 1), got 1.0"),
    (["--weight-decay", "nan"], "field '--weight-decay': must be a finite number, got nan"),
    (["--resume"], "checkpoints, field '--resume': nothing to resume: no checkpoint in this run "
                   "directory"),
])
def test_impossible_settings_fail_before_anything_is_written(base, tmp_path, capsys, args,
                                                             message):
    out = tmp_path / "rm"
    assert run_reward(base, out, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_finished_run_or_the_input_model_is_never_overwritten(base, tmp_path, capsys):
    d, _ = base
    out = tmp_path / "rm"
    assert run_reward(base, out) == 0
    files = snapshot(out)
    assert run_reward(base, out) == 2
    assert (f"{out}, field '--out': already holds a training run; pass resume (--resume) to "
            "continue it, or choose another out (--out)") in capsys.readouterr().err
    assert snapshot(out) == files
    before = snapshot(d)
    for target, why in ((d / "sft",
                         "is the input model (model, --model); training would overwrite it"),
                        (d, f"holds the input model {d / 'sft'} (model, --model)")):
        assert run_reward(base, target) == 2
        assert (f"{target}, field '--out': {why}; choose another out (--out)"
                in capsys.readouterr().err)
    assert snapshot(d) == before
    assert run_reward(base, out, "--resume", "--max-steps", "2") == 0
    assert json.loads((out / "config.json").read_text())["step"] == 2


def test_a_ppo_value_model_is_no_reward_model_to_continue(base, tmp_path, capsys):
    # It was continued as a reward model: a scalar head on the scale of PPO's returns.
    from gptlab.checkpoint import load_model, save_model
    from gptlab.cli import main
    from gptlab.model.heads import ScalarHeadModel
    d, rankings = base
    gpt, tok, _ = load_model(d / "sft")
    value = tmp_path / "value"
    save_model(value, ScalarHeadModel.from_gpt(gpt), tok, extra={"stage": "value"})
    out = tmp_path / "rm"
    assert main(["reward", "--model", str(value), "--data", str(rankings), "--out", str(out),
                 "--max-steps", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"gptlab reward: error: {value}, field '--model': is PPO's value model, not a reward "
        f"model: trained, it predicts returns, not rewards; start from the SFT model, or "
        f"continue a reward model (the pipeline's round-N/reward)\n")
    assert not out.exists()


def test_a_run_stopped_after_a_checkpoint_and_resumed_equals_one_that_never_stopped(
        base, tmp_path):
    import shutil
    from gptlab.checkpoint import load_model
    from gptlab.train.loop import read_metrics
    args = ("--max-steps", "8", "--grad-accum", "2", "--eval-every", "2", "--save-every", "3",
            "--log-every", "1", "--keep-checkpoints", "5", "--lr", "3e-3", "--seed", "4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_reward(base, straight, *args) == 0
    assert run_reward(base, resumed, *args) == 0
    # A crash after the step-3 checkpoint: later checkpoints, the model and rows 4.. remain.
    ckpts = resumed / "checkpoints"
    for step in (6, 8):
        shutil.rmtree(ckpts / f"step-{step}")
    for name in ("config.json", "model.safetensors"):
        (resumed / name).unlink()
    assert run_reward(base, resumed, *args, "--resume") == 0
    assert json.loads((resumed / "run.json").read_text())["resumed_from"] == "step-3"

    def rows(run):
        return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")}
                for r in read_metrics(run / "metrics.jsonl")]
    assert rows(straight) == rows(resumed) and len(rows(straight)) == 8 + 5
    a, b = (load_model(run)[0].state_dict() for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = (torch.load(run / "checkpoints" / "step-8" / "optimizer.pt", weights_only=False)
              for run in (straight, resumed))
    assert all(torch.equal(oa["state"][i][k], ob["state"][i][k])
               for i in oa["state"] for k in oa["state"][i])


def test_a_finished_run_resumed_from_a_named_step_equals_one_that_never_stopped(base, tmp_path):
    from gptlab.checkpoint import load_model
    from gptlab.train.loop import read_metrics
    args = ("--max-steps", "6", "--eval-every", "2", "--save-every", "2", "--log-every", "1",
            "--keep-checkpoints", "5", "--lr", "3e-3", "--seed", "4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_reward(base, straight, *args) == 0
    assert run_reward(base, resumed, *args) == 0
    assert run_reward(base, resumed, *args, "--resume-from", "step-2") == 0
    assert json.loads((resumed / "run.json").read_text())["resumed_from"] == "step-2"

    def rows(run):
        return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")}
                for r in read_metrics(run / "metrics.jsonl")]
    assert rows(straight) == rows(resumed) and len(rows(straight)) == 6 + 4
    a, b = (load_model(run)[0].state_dict() for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_on_other_rankings_says_so(base, tmp_path, capsys):
    _, rankings = base
    out, data = tmp_path / "rm", tmp_path / "rankings.jsonl"
    data.write_text(rankings.read_text())
    resume = ("--save-every", "1", "--resume", "--max-steps")
    assert run_reward(base, out, "--data", str(data), "--save-every", "1") == 0
    assert run_reward(base, out, "--data", str(data), *resume, "2") == 0
    assert "warning" not in capsys.readouterr().err
    data.write_text(data.read_text().replace(" yes", " yes yes", 1))
    assert run_reward(base, out, "--data", str(data), *resume, "3") == 0
    assert ("warning: the rankings changed since the checkpoint; the data position now points "
            "into other rankings") in capsys.readouterr().err


def test_rankings_of_one_prompt_all_held_out_say_why_none_are_left(base, tmp_path, capsys):
    # The held-out tenth is drawn by prompt: one prompt's 9 rankings went to it whole, and the
    # error said "no rankings left to train on" of a file of 9 valid ones.
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Is the cat happy?", "chosen": f" yes {i}",
                                        "rejected": " no"}) + "\n" for i in range(9)))
    out = tmp_path / "rm"
    assert run_reward(base, out, "--data", str(data)) == 2
    assert capsys.readouterr().err == (
        f"gptlab reward: error: {data}: the held-out rankings (val_fraction (--val-fraction) "
        f"0.1, chosen by prompt) took all 9 rankings, of 1 prompt: rank more prompts, or give "
        f"val_fraction (--val-fraction) 0, or held-out rankings with val_data (--val-data)\n")
    assert not out.exists()
    assert run_reward(base, out, "--data", str(data), "--val-fraction", "0") == 0


def test_a_resume_with_other_held_out_rankings_is_refused(base, tmp_path, capsys,
                                                          monkeypatch):
    """--val-data decides what each evaluation measures: changed on resume, the run's held-out
    accuracies would be of two sets. Refused, as SFT refuses it, before anything is written."""
    _, rankings = base
    out, val, other = tmp_path / "rm", tmp_path / "val.jsonl", tmp_path / "other.jsonl"
    lines = rankings.read_text().splitlines(keepends=True)
    val.write_text("".join(lines[:4]))
    other.write_text("".join(lines[4:8]))
    keep = ("--save-every", "1", "--keep-checkpoints", "5")
    assert run_reward(base, out, *keep, "--val-data", str(val)) == 0
    files = snapshot(out)
    step1 = out / "checkpoints" / "step-1"
    for args, shown in (([], f"val_data: {str(val)!r} there, None now"),
                        (["--val-data", str(other)],
                         f"val_data: {str(val)!r} there, {str(other)!r} now")):
        assert run_reward(base, out, "--resume", "--max-steps", "2", *keep, *args) == 2
        field = "--val-data" if args else "val_data"  # named by the flag where one gave it
        assert (f"{step1}, field '{field}': was written with other settings ({shown}); they "
                f"decide what each evaluation measures") in capsys.readouterr().err
        assert snapshot(out) == files  # nothing written
    from gptlab.checkpoint import Checkpointer
    verified = []
    verify = Checkpointer.verify.__func__
    monkeypatch.setattr(Checkpointer, "verify",
                        classmethod(lambda cls, path: (verified.append(path), verify(cls, path))))
    assert run_reward(base, out, "--resume", "--max-steps", "2", *keep,
                      "--val-data", str(val)) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 2
    assert verified == [step1]  # its files hashed once, before anything was written


def test_each_files_skipped_rankings_are_reported_on_that_file(base, tmp_path, capsys):
    d, rankings = base
    val = tmp_path / "val.jsonl"
    long = json.dumps({"prompt": "Is the cat happy? " * 40, "chosen": " yes", "rejected": " no"})
    val.write_text(long + "\n" + rankings.read_text().splitlines()[0] + "\n")
    out = tmp_path / "rm"
    assert run_reward(base, out, "--val-data", str(val)) == 0
    err = capsys.readouterr().err
    assert f"{val}: skipped 1 ranking: 1 ranking longer than" in err
    assert f"{rankings}: skipped" not in err  # (its shared ranking is warned of, naming it)
    meta = json.loads((out / "config.json").read_text())
    assert meta["skipped"] == {} and sum(meta["val_skipped"].values()) == 1


def test_evaluations_log_pairwise_accuracy_and_no_perplexity(base, tmp_path, capsys):
    # A ranking loss has no perplexity: its exp was logged and printed as `ppl`.
    out = tmp_path / "rm"
    assert run_reward(base, out) == 0
    cap = capsys.readouterr()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert evals and all("val_ppl" not in r and 0 <= r["pairwise_acc"] <= 1 for r in evals)
    line = cap.err.split("step 0: val_loss", 1)[1].splitlines()[0]
    assert "ppl" not in line and f"pairwise_acc {evals[0]['pairwise_acc']:.4f}" in line


def test_the_validation_loss_does_not_depend_on_how_the_held_out_rankings_are_batched(
        base, tmp_path):
    # 5 held-out rankings: at --batch-size 4 a batch of 4 and one of 1, whose mean of batch
    # means weighed the last ranking 4 times (step 0: 0.69464 against 0.69339 in one batch).
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": f"Is the dog happy? {i}", "chosen": " yes",
                                       "rejected": [" no", " maybe", " ok"][i % 3]}) + "\n"
                           for i in range(5)))
    losses = []
    for size in ("1", "4", "5"):
        out = tmp_path / size
        assert run_reward(base, out, "--batch-size", size, "--val-data", str(val)) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses.append(next(r["val_loss"] for r in rows if r["step"] == 0))
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert losses[2] == pytest.approx(losses[0], abs=1e-6)
    # Training batches all hold --batch-size rankings: with --grad-accum their shares stay
    # exactly equal, the update the plain mean's bit for bit.
    from gptlab.train.loop import micro_batch_shares
    from gptlab.train.reward import rankings_in
    batch = collate_rankings([EncodedRanking([[1], [2]])] * 4, pad_id=0)
    assert micro_batch_shares([batch, batch, batch], rankings_in) == [1.0, 1.0, 1.0]


def test_samples_too_long_to_normalise_on_are_counted_on_stderr(base, tmp_path, capsys):
    # They were left out silently: "every response of --samples" was normalised on but one.
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": "Is the cat happy?",
                                   "responses": [" yes", " no", " yes" * 80]}) + "\n")
    assert run_reward(base, tmp_path / "rm", "--samples", str(samples)) == 0
    err = capsys.readouterr().err
    assert f"{samples}: skipped 1 sample: 1 sample longer than the context of 64, not " \
           f"normalised on\n" in err
    assert "scores normalised on 2 samples" in err


def test_a_finished_response_is_scored_as_the_reward_stage_encoded_it_with_a_long_end_of_turn():
    # Llama 2's template closes an answer with " " + EOS: an end of turn of two tokens. The
    # stop token alone was replaced by the whole end, giving " ", " ", EOS: a sequence the
    # reward model never read, its score read after a token it never saw there.
    from gptlab.data.instruct import encode_response, end_of_response
    from gptlab.tokenizer import BOS, EOS, PAD, Tokenizer, train_tokenizer
    from gptlab.train.reward import scored_response
    base = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    llama2 = Tokenizer(base.hf, BOS, EOS, PAD, chat_template=(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
        "' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"))
    prompt = [{"role": "user", "content": "the dog"}]
    end = end_of_response(llama2, prompt)
    assert len(end) == 2 and end[-1] == llama2.eos_id  # " ", EOS
    written = encode_response(llama2, "the fox", prompt)  # as SFT taught the model to write it
    assert written[-2:] == end
    assert scored_response(written, True, end, 100) == written
    # A response that stopped on EOS without the end's space is closed by the whole end, and
    # a cut one gets it appended, as before.
    assert scored_response(written[:-2] + [llama2.eos_id], True, end, 100) == written
    assert scored_response(written[:-2], False, end, 100) == written
    assert scored_response(written, True, end, 3) == written[:1] + end


def test_the_template_tail_is_what_a_whole_conversation_ends_with_after_the_end_of_turn():
    # A Hugging Face reward model reads a response as TRL renders the whole conversation:
    # end of turn, then the template's text after it (ChatML's "\n"), none for a template
    # that stops at its end of turn or a plain prompt. A cut response that would overflow its
    # room gives its last tokens to both.
    from gptlab.data.instruct import encode_prompt, end_of_response, template_tail
    from gptlab.tokenizer import train_tokenizer
    from gptlab.train.reward import scored_response
    chatml, im_end, newline = _chatml_tokenizer()
    assert len(newline) == 1
    chat = [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "the fox"},
            {"role": "user", "content": "the lazy dog"}]
    for prompt in (chat[:1], chat):  # an earlier answer's end of turn is not this one's
        assert end_of_response(chatml, prompt) == [im_end]
        assert template_tail(chatml, prompt) == newline
        whole, _ = chatml.render_chat(prompt + [{"role": "assistant", "content": "the cat"}])
        assert whole == (encode_prompt(chatml, prompt) + chatml.encode("the cat") + [im_end]
                         + newline)
    assert template_tail(chatml, "the dog") == []
    own = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    assert template_tail(own, chat[:1]) == []  # gptlab's template stops at its EOS
    cut = chatml.encode("the quick brown fox jumps")
    assert scored_response(cut, False, [im_end], 4, newline) == cut[:2] + [im_end] + newline
    assert scored_response(cut + [im_end], True, [im_end], 100, newline) == \
        cut + [im_end] + newline


def test_an_empty_samples_file_is_said_to_be_empty(tmp_path):
    # It was "no sample fits the context to normalise the scores on".
    from gptlab.errors import UserError
    from gptlab.train.reward import sample_sequences
    f = tmp_path / "samples.jsonl"
    f.write_text("\n")
    with pytest.raises(UserError) as err:
        sample_sequences(CharTokenizer(), f, context=16)
    assert str(err.value) == f"{f}, field 'samples': no samples in the file"
    d = tmp_path / "samples"  # a directory of empty shards: not "in the file"
    d.mkdir()
    f.rename(d / "samples.jsonl")
    with pytest.raises(UserError) as err:
        sample_sequences(CharTokenizer(), d, context=16)
    assert str(err.value) == (f"{d}, field 'samples': no samples in this directory: its shard "
                              f"(samples.jsonl) holds no record")


def test_a_chat_template_refusing_a_samples_prompt_names_file_and_line(base, tmp_path, capsys):
    # `reward --samples` met the refusal while encoding the samples it normalises on: the
    # error named no file and no line ("field 'chat_template': the chat template failed").
    from gptlab.checkpoint import load_model, save_model
    from gptlab.tokenizer import Tokenizer
    d, _ = base
    model, tok, _ = load_model(d / "sft")
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                   "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    strict = Tokenizer(tok.hf, tok.bos_token, tok.eos_token, tok.pad_token,
                       chat_template=alternating)
    save_model(tmp_path / "sft", model, strict)
    user = {"role": "user", "content": "Is the cat happy?"}
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text("".join(json.dumps({"prompt": [user], "chosen": " yes",
                                            "rejected": " no"}) + "\n" for _ in range(4)))
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": [user], "responses": [" yes"]}) + "\n"
                       + json.dumps({"prompt": [user, user], "responses": [" no"]}) + "\n")
    out = tmp_path / "rm"
    assert run_reward((tmp_path, rankings), out, "--samples", str(samples)) == 2
    assert capsys.readouterr().err == (f"gptlab reward: error: {samples}:2, field "
                                       "'chat_template': the chat template failed: roles must "
                                       "alternate user/assistant\n")
    assert not out.exists()


def test_the_held_out_accuracy_reuses_the_final_evaluation_and_scores_anew_on_a_resume(
        base, tmp_path, monkeypatch):
    # The final evaluation scored the held-out rankings with the final weights already: the
    # accuracy saved with the model is its number, not another pass over them.
    import gptlab.train.reward as reward
    calls = []
    real = reward.pairs_right_by_ranking
    monkeypatch.setattr(reward, "pairs_right_by_ranking",
                        lambda *a: calls.append(1) or real(*a))
    out = tmp_path / "rm"
    assert run_reward(base, out, "--val-fraction", "0.5", "--save-every", "1") == 0
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 1] and len(calls) == 2
    meta = json.loads((out / "config.json").read_text())
    assert meta["heldout_pairwise_acc"] == evals[-1]["pairwise_acc"]
    # Resumed at its last step, this session evaluates nothing: the accuracy is scored anew.
    del calls[:]
    assert run_reward(base, out, "--val-fraction", "0.5", "--resume") == 0
    assert len(calls) == 1
    assert json.loads((out / "config.json").read_text())["heldout_pairwise_acc"] == \
        meta["heldout_pairwise_acc"]


def test_the_held_out_interval_takes_the_rankings_of_one_prompt_as_one_draw(base, tmp_path,
                                                                             monkeypatch):
    # Held-out rankings P, P, Q, Q, R, S, T, U (P and Q ranked twice, other answers), one pair
    # each, right on P's, R's and T's: by prompt (2, 2), (0, 2), (1, 1), (0, 1), (1, 1), (0, 1),
    # var = 6/5 · 3 / 8²; eight draws of their own claimed var = 8/7 · 2 / 8².
    import gptlab.train.reward as reward
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": f"Is the dog happy? {p}", "chosen": f" yes {i}",
                                       "rejected": " no"}) + "\n"
                           for i, p in enumerate("PPQQRSTU")))
    right = [(1.0, 1), (1.0, 1), (0.0, 1), (0.0, 1), (1.0, 1), (0.0, 1), (1.0, 1), (0.0, 1)]
    monkeypatch.setattr(reward, "pairs_right_by_ranking", lambda *a: list(right))
    out = tmp_path / "rm"
    assert run_reward(base, out, "--val-data", str(val)) == 0
    meta = json.loads((out / "config.json").read_text())
    # Six prompts: resamples of the prompts reach rates 0 and 1 at the bootstrap's level; as
    # eight draws it would claim [0.125, 0.875].
    assert (meta["heldout_pairwise_acc"], meta["heldout_pairs"]) == (0.5, 8)
    assert meta["heldout_pairwise_acc_ci95"] == [0.0, 1.0]


def test_a_resume_without_max_steps_keeps_the_runs_own_length_not_the_epochs(base, tmp_path):
    """A time-budget run (capped at 6 steps) resumed without --max-minutes, as the refusal of
    another budget advises: --epochs (here 22 steps) must not lengthen it."""
    from gptlab.cli import main
    d, rankings = base
    out = tmp_path / "rm"
    args = ["reward", "--model", str(d / "sft"), "--data", str(rankings), "--out", str(out),
            "--batch-size", "1", "--warmup-steps", "0", "--eval-every", "0", "--no-progress",
            "--device", "cpu"]
    assert main(args + ["--max-minutes", "100", "--max-steps", "6"]) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 6
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 6


def test_scores_are_laid_out_per_prompt_when_prompts_have_different_numbers_of_responses():
    from gptlab.train.reward import ranked_scores
    batch = collate_rankings([EncodedRanking([[7], [3], [4]]), EncodedRanking([[9], [2]])],
                             pad_id=0)
    assert ranked_scores(FirstTokenScore(), batch).tolist() == [[7, 3, 4], [9, 2, 0]]


def test_pairwise_accuracy_pools_the_pairs_of_every_ranking():
    # One ranking of 1 pair, right; one of 3 pairs, all wrong: 1 of 4 pairs, not (1 + 0) / 2.
    batch = collate_rankings([EncodedRanking([[5], [1]]), EncodedRanking([[1], [5], [9]])],
                             pad_id=0)
    assert pairwise_accuracy(FirstTokenScore(), [batch]) == pytest.approx(1 / 4)
    apart = [collate_rankings([EncodedRanking([[5], [1]])], pad_id=0),
             collate_rankings([EncodedRanking([[1], [5], [9]])], pad_id=0)]
    assert pairwise_accuracy(FirstTokenScore(), apart) == pytest.approx(1 / 4)



class ModeDependentScore(FirstTokenScore):
    """Scores as FirstTokenScore in eval mode and reversed in training mode (as dropout would
    make a real model's scores differ between the two)."""

    def forward(self, input_ids, attention_mask):
        s = super().forward(input_ids, attention_mask)
        return -s if self.training else s


def test_pairwise_accuracy_scores_in_eval_mode_and_restores_the_mode():
    batch = collate_rankings([EncodedRanking([[5], [1], [3]])], pad_id=0)
    model = ModeDependentScore().train()
    assert pairwise_accuracy(model, [batch]) == pytest.approx(2 / 3)  # 5 > 1 and 5 > 3 right
    assert model.training
    assert pairwise_accuracy(model.eval(), [batch]) == pytest.approx(2 / 3)
    assert not model.training


def test_training_holds_one_copy_of_the_weights_not_the_sft_model_beside_it(base, tmp_path,
                                                                          monkeypatch):
    # from_gpt copies the SFT model's weights into the reward model; the SFT model stayed
    # referenced through training, one model more in memory (SmolLM2-135M: 3.60 GB peak, 3.07
    # GB without it, the same weights byte for byte).
    import gc

    import gptlab.train.reward as reward
    from gptlab.model import GPT
    seen = []
    real = reward.train
    # Models that other tests of this process still hold are not this run's: held here, none
    # of them can die and leave its id to a model of this run.
    gc.collect()
    before = [o for o in gc.get_objects() if isinstance(o, GPT)]
    known = {id(o) for o in before}

    def counting_train(model, *args, **kwargs):
        gc.collect()
        seen.append([o for o in gc.get_objects() if isinstance(o, GPT)
                     and o is not model.backbone and id(o) not in known])
        return real(model, *args, **kwargs)
    monkeypatch.setattr(reward, "train", counting_train)
    assert run_reward(base, tmp_path / "rm") == 0
    assert [len(s) for s in seen] == [0]


def _chatml_tokenizer():
    """A ChatML tokenizer whose template writes "\\n" after each <|im_end|>: (tokenizer, the
    <|im_end|> id, the "\\n" ids)."""
    from gptlab.tokenizer import BOS, EOS, PAD, Tokenizer, train_tokenizer
    base = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300,
                           special_tokens=[BOS, EOS, PAD, "<|im_start|>", "<|im_end|>"])
    chatml = Tokenizer(base.hf, None, "<|im_end|>", PAD, chat_template=(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"))
    return chatml, base.hf.token_to_id("<|im_end|>"), chatml.encode("\n")


def chatml_models(tail, d=None, seed=0, context=64):
    """A random tiny policy on `_chatml_tokenizer`'s tokenizer, and a random reward model
    from it that reads the template's tail (as a Hugging Face classifier does) or not (as
    gptlab's own); saved as `d`/policy and `d`/rm when `d` is given. Returns (tokenizer,
    <|im_end|> id, "\\n" ids, policy, reward model)."""
    from gptlab.checkpoint import save_model
    from gptlab.model import GPT, get_preset
    from gptlab.model.heads import ScalarHeadModel
    tok, im_end, newline = _chatml_tokenizer()
    torch.manual_seed(seed)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=context)
    policy = GPT(cfg).eval()
    rm = ScalarHeadModel.from_gpt(policy).eval()
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # scores that differ between positions
    rm.reads_template_tail = tail
    if d is not None:
        save_model(d / "policy", policy, tok)
        save_model(d / "rm", rm, tok, extra={"stage": "reward"})
    return tok, im_end, newline, policy, rm


def test_rankings_and_samples_read_the_template_tail_only_when_asked(tmp_path):
    """encode_ranking, encode_rankings and sample_sequences add the tail after each response's
    end of turn with tail=True (a Hugging Face classifier's reading), never without (gptlab's
    own reward model); the context counts it."""
    from gptlab.data.instruct import SkipCounter, encode_prompt
    from gptlab.train.reward import encode_rankings, sample_sequences
    chatml, im_end, newline = _chatml_tokenizer()
    prompt = [{"role": "user", "content": "the dog"}]
    r = Ranking(prompt, ["the fox", "the lazy cat"])
    p = encode_prompt(chatml, prompt)
    closed = [p + chatml.encode(a) + [im_end] for a in r.ranked]
    whole = [s + newline for s in closed]
    assert encode_ranking(chatml, r, 64).seqs == closed
    assert encode_ranking(chatml, r, 64, tail=True).seqs == whole
    assert encode_rankings(chatml, [r], 64, SkipCounter(), "r.jsonl")[0].seqs == closed
    assert encode_rankings(chatml, [r], 64, SkipCounter(), "r.jsonl", tail=True)[0].seqs == whole
    room = max(map(len, closed))  # the longest fits closed, not with its tail
    assert encode_ranking(chatml, r, room) is not None
    assert encode_ranking(chatml, r, room, tail=True) is None
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": prompt, "responses": r.ranked}) + "\n")
    assert sample_sequences(chatml, samples, 64) == closed
    assert sample_sequences(chatml, samples, 64, tail=True) == whole


def test_no_template_tail_where_no_end_of_turn_closes_the_answer():
    """A template without an end-of-turn token masks only an answer's text: the empty answer
    has no closing token, and an earlier answer's last token is no end of this one's (its
    "tail" was the rest of the conversation). A closing that overflows the room is whole."""
    from gptlab.data.instruct import template_tail
    from gptlab.tokenizer import BOS, EOS, PAD, Tokenizer
    from gptlab.train.reward import scored_response
    chatml, im_end, newline = _chatml_tokenizer()
    plain = Tokenizer(chatml.hf, BOS, EOS, PAD, chat_template=(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"))
    chat = [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "the fox"},
            {"role": "user", "content": "the lazy dog"}]
    assert template_tail(plain, chat[:1]) == template_tail(plain, chat) == []
    cut = chatml.encode("the quick brown fox")
    assert scored_response(cut, False, [im_end], 1, newline) == [im_end] + newline


def test_a_reward_model_that_reads_the_template_tail_trains_and_evaluates_on_it(
        base, tmp_path, monkeypatch):
    """`gptlab reward --model` continuing a Hugging Face classifier (reads_template_tail)
    encodes its training and held-out rankings and its normalisation samples with the tail."""
    import gptlab.train.reward as reward
    from gptlab.checkpoint import load_model, save_model
    from gptlab.model.heads import ScalarHeadModel
    d, rankings = base
    model, tok, _ = load_model(d / "sft")
    torch.manual_seed(0)
    rm = ScalarHeadModel.from_gpt(model)
    rm.reads_template_tail = True
    save_model(tmp_path / "rm0", rm, tok)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": "Is the cat happy?", "responses": [" yes"]}) + "\n")
    tails = []
    for name in ("encode_rankings", "sample_sequences"):
        def spy(*args, _real=getattr(reward, name), _name=name, **kwargs):
            call = inspect.signature(_real).bind(*args, **kwargs)
            call.apply_defaults()
            tails.append((_name, call.arguments["tail"]))
            return _real(*args, **kwargs)
        monkeypatch.setattr(reward, name, spy)
    from gptlab.cli import main
    assert main(["reward", "--model", str(tmp_path / "rm0"), "--data", str(rankings),
                 "--samples", str(samples), "--out", str(tmp_path / "rm"), "--max-steps", "1",
                 "--batch-size", "4", "--no-progress", "--device", "cpu"]) == 0
    assert tails == [("encode_rankings", True), ("encode_rankings", True),
                     ("sample_sequences", True)]


def test_the_held_out_rankings_are_drawn_by_prompt():
    # Round 2's reward model reads both rounds' rankings, and a prompt ranked in both was held
    # out on one side and trained on on the other: 8 of seed 0's 70 held-out rankings, at 0.889
    # against 0.797 for the rest.
    import random as rnd
    from gptlab.data.instruct import Ranking
    from gptlab.train.reward import split_rankings
    rng = rnd.Random(5)
    prompts = [f"q{i}" for i in range(40)] + [[{"role": "user", "content": "hi"}]]
    items = [Ranking(prompt=rng.choice(prompts), ranked=["a", "b"], id=i) for i in range(120)]
    train, held = split_rankings(items, 0.1, 0)
    assert sorted(r.id for r in train + held) == list(range(120))
    key = lambda r: json.dumps(r.prompt)  # noqa: E731
    assert {key(r) for r in train}.isdisjoint({key(r) for r in held})
    assert 12 <= len(held) < 12 + max(sum(key(r) == key(x) for x in items) for r in items)
    # Each prompt ranked once: the rankings a draw of single rankings holds out (the published
    # round-1 reward models keep their held-out set).
    once = [Ranking(prompt=f"q{i}", ranked=["a", "b"], id=i) for i in range(70)]
    order = list(range(70))
    rnd.Random(3).shuffle(order)
    assert [r.id for r in split_rankings(once, 0.1, 3)[1]] == sorted(order[:7])


def test_reward_help_says_parquet_holds_ties_when_every_item_is_a_list(tmp_path, capsys):
    # `--help` said "ties: JSONL", where README says Parquet holds them too, every item of
    # `ranked` a list; Parquet refuses only a column that mixes strings and lists.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gptlab.cli import main
    from gptlab.data.instruct import read_rankings
    with pytest.raises(SystemExit):
        main(["reward", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    data = text.split("--data DATA ", 1)[1].split(" --out ", 1)[0]
    assert "JSONL" not in data
    assert 'in Parquet every item is then a list: [["a"], ["b", "c"]]' in data, data
    pq.write_table(pa.table({"prompt": ["p"], "ranked": [[["a"], ["b", "c"], ["d"]]]}),
                   tmp_path / "r.parquet")
    [ranking] = read_rankings(tmp_path / "r.parquet")
    assert (ranking.ranked, ranking.groups) == (["a", "b", "c", "d"], [0, 1, 1, 2])
    with pytest.raises(pa.ArrowTypeError):  # a tie among plain strings: JSONL only
        pa.table({"prompt": ["p"], "ranked": [["a", ["b", "c"], "d"]]})


class LastTokenScore(nn.Module):
    """A scalar-head stand-in that scores a sequence by its last real token's id, normalised
    as ScalarHeadModel.forward normalises: (raw − score_bias) · score_scale."""

    def __init__(self, unit: float = 1.0):
        super().__init__()
        self.unit = unit  # a raw score is the id times this
        self.unused = nn.Parameter(torch.zeros(()))  # normalize_scores finds the device by it
        self.register_buffer("score_bias", torch.zeros(()))
        self.register_buffer("score_scale", torch.ones(()))

    def forward(self, input_ids, attention_mask):
        last = attention_mask.sum(1) - 1
        raw = input_ids.gather(1, last[:, None])[:, 0].float() * self.unit
        return (raw - self.score_bias) * self.score_scale


@pytest.mark.parametrize("batch_size", [1, 2, 3, 32])
def test_normalisation_reads_every_sample_whatever_the_batch_size(batch_size):
    from gptlab.train.reward import normalize_scores
    # Raw scores 1, 2, 3, 4, 10 (rows of different lengths, right-padded in a batch):
    # mean 4, std (n − 1) sqrt((9 + 4 + 1 + 0 + 36) / 4) = sqrt(12.5).
    seqs = [[5, 1], [2], [9, 9, 3], [4], [6, 10]]
    model = LastTokenScore()
    mean, std = normalize_scores(model, seqs, pad_id=0, batch_size=batch_size)
    assert (mean, std) == pytest.approx((4.0, math.sqrt(12.5)), abs=1e-6)
    assert model.score_bias.item() == pytest.approx(4.0)
    assert model.score_scale.item() == pytest.approx(1 / math.sqrt(12.5))


def test_normalisation_of_two_samples_and_of_one():
    from gptlab.train.reward import normalize_scores
    # Two samples, 1 and 3: mean 2, std sqrt(2) (n − 1), so they score ∓1/sqrt(2) ...
    model = LastTokenScore()
    assert normalize_scores(model, [[1], [3]], pad_id=0) == pytest.approx((2.0, math.sqrt(2)))
    with torch.no_grad():
        scores = model(torch.tensor([[1], [3]]), torch.ones(2, 1, dtype=torch.long))
    assert scores.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])
    # ... and one sample has no spread to divide by: shifted to 0, scale 1 (not NaN).
    assert normalize_scores(model, [[7]], pad_id=0) == (7.0, 1.0)
    assert (model.score_bias.item(), model.score_scale.item()) == (7.0, 1.0)


def test_scores_all_alike_are_shifted_not_scaled_up_with_a_warning(capsys):
    """A reward model that scored every normalisation sample the same (it learned nothing, or
    the samples were one response repeated) got the scale 1/1e-6: PPO's rewards were a million
    times the score differences it then found. Below a std of 1e-3 the scale stays 1, with a
    warning naming the cause; above it, the scale is 1/std as before, to the bit."""
    from gptlab.train.reward import MIN_SCORE_STD, normalize_scores
    assert MIN_SCORE_STD == 1e-3
    model = LastTokenScore()
    assert normalize_scores(model, [[7], [3, 7], [7]], pad_id=0) == (7.0, 0.0)
    assert (model.score_bias.item(), model.score_scale.item()) == (7.0, 1.0)
    assert capsys.readouterr().err == (
        "warning: the reward model scores the 3 samples it is normalised on alike (raw std 0, "
        "below 0.001): it learned no preference between them, or they are one response "
        "repeated; their scores are shifted to mean 0 but not scaled (scale 1), since dividing "
        "by so small a spread would multiply PPO's rewards by over 1000\n")
    model = LastTokenScore(unit=1e-4)  # raw 1e-4 and 2e-4: std 7.07e-5
    mean, std = normalize_scores(model, [[1], [2]], pad_id=0)
    assert std == pytest.approx(math.sqrt(2) * 0.5e-4, rel=1e-5) and std < MIN_SCORE_STD
    assert model.score_scale.item() == 1.0
    assert "raw std 7.07e-05, below 0.001" in capsys.readouterr().err
    model = LastTokenScore(unit=1e-2)  # std 7.07e-3: scaled as before, no warning
    mean, std = normalize_scores(model, [[1], [2]], pad_id=0)
    assert std > MIN_SCORE_STD
    assert model.score_scale.item() == torch.tensor(1.0 / std).item()
    assert capsys.readouterr().err == ""


def test_a_model_without_tokenizer_or_of_another_kind_and_rankings_too_long_are_refused(
        base, tmp_path, capsys):
    import shutil

    from gptlab.checkpoint import load_model, save_model
    from gptlab.model import Transformer, get_preset
    d, _ = base
    bare = tmp_path / "bare"
    shutil.copytree(d / "sft", bare)
    (bare / "tokenizer.json").unlink()
    t5 = tmp_path / "t5"
    config = dataclasses.replace(get_preset("transformer-base"), vocab_size=300, context=16,
                                 n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_model=8,
                                 d_ff=8)
    save_model(t5, Transformer(config), load_model(d / "sft")[1])
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "cat " * 80, "chosen": " yes", "rejected": " no"})
                    + "\n")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": "cat " * 80, "responses": [" yes"]}) + "\n")
    for args, said in (
            (["--model", str(bare)], f"{bare}: the model has no tokenizer"),
            (["--model", str(t5)],
             f"{t5}, field '--model': the reward model must start from a GPT model, not an "
             f"encoder-decoder Transformer"),
            (["--data", str(long)], f"{long}: no rankings left to train on"),
            (["--samples", str(samples)], f"{samples}, field '--samples': no sample fits the "
                                          f"context to normalise the scores on")):
        capsys.readouterr()
        assert run_reward(base, tmp_path / "out", *args) == 2
        assert capsys.readouterr().err.endswith(f"gptlab reward: error: {said}\n")
        assert not (tmp_path / "out").exists()
