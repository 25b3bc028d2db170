"""The encoder-decoder Transformer's task: the paper's schedule, beam search against greedy
decoding and an exhaustive search, pairs and their batches, `gptlab seq2seq` on an invented
task and on the built-in world, resume, and `gptlab translate`."""
import itertools
import json
import math

import pytest
import torch

from gptlab.cli import main
from gptlab.errors import UserError
from gptlab.model.presets import build_model, get_preset
from gptlab.train.loop import inverse_sqrt_lr
from gptlab.train.seq2seq import (Pair, Seq2SeqConfig, collate, read_pairs, scores, seq2seq,
                                  translate)


def _model(vocab=7, seed=0, context=16):
    torch.manual_seed(seed)
    m = build_model(get_preset("transformer-tiny", vocab_size=vocab, context=context,
                               dropout=0.0))
    # Larger weights than the init's make the distributions sharp and the search's choices
    # matter.
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    return m.eval()


def test_the_schedule_is_the_papers_formula():
    d, w = 512, 4000
    peak = d ** -0.5 * w ** -0.5
    for step in (0, 1, 99, 3998, 3999, 4000, 9999, 99999):
        n = step + 1
        paper = d ** -0.5 * min(n ** -0.5, n * w ** -1.5)
        assert inverse_sqrt_lr(step, w, peak) == pytest.approx(paper, rel=1e-12)
    assert inverse_sqrt_lr(3, 4, 1.0) == 1.0 and inverse_sqrt_lr(0, 4, 1.0) == 0.25
    assert inverse_sqrt_lr(15, 4, 1.0) == 0.5


def test_a_beam_of_one_without_length_penalty_is_greedy_decoding():
    m = _model()
    src = torch.randint(3, 7, (6, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(src)
    mask[0, 3:] = 0  # a right-padded row
    greedy = m.greedy_decode(src, 0, 1, 9, src_mask=mask).tolist()
    beam = m.beam_search(src, 0, 1, 9, beam=1, alpha=0.0, src_mask=mask)
    for g, b in zip(greedy, beam):
        assert (g[:g.index(1)] if 1 in g else g) == b


@torch.no_grad()
def _exhaustive(m, src, bos, eos, n, alpha):
    """The best normalised score over every token sequence of up to n tokens (ended by EOS,
    or cut at n), scored by teacher forcing."""
    V = m.config.vocab_size
    best = (-math.inf, None)
    for length in range(1, n + 1):
        for seq in itertools.product(range(V), repeat=length):
            if eos in seq[:-1]:
                continue
            tgt = torch.tensor([[bos, *seq[:-1]]])
            logp = torch.log_softmax(m(src[None], tgt)[0].float(), -1)
            s = float(sum(logp[i, t] for i, t in enumerate(seq)))
            if seq[-1] != eos and length < n:
                continue  # unfinished before the limit: not a hypothesis
            score = s / ((5 + length) / 6) ** alpha
            if score > best[0]:
                best = (score, list(seq[:-1]) if seq[-1] == eos else list(seq))
    return best


def _flat_model():
    """A model whose next-token distributions are flat enough that greedy decoding, the best
    sequence, and the best at each length penalty part ways (checked below)."""
    torch.manual_seed(2)
    m = build_model(get_preset("transformer-tiny", vocab_size=5, context=16, dropout=0.0,
                               tie_embeddings=False))
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 0.1)
    return m.eval()


def test_a_wide_beam_finds_the_exhaustive_searchs_best_at_each_length_penalty():
    m = _flat_model()
    bests, greedy_missed = set(), 0
    for seed in range(4):
        src = torch.randint(2, 5, (1, 4), generator=torch.Generator().manual_seed(seed))
        g = m.greedy_decode(src, 0, 1, 3)[0].tolist()
        for alpha in (0.0, 0.6, 2.0):
            _, want = _exhaustive(m, src[0], 0, 1, 3, alpha)
            assert m.beam_search(src, 0, 1, 3, beam=5 ** 3, alpha=alpha)[0] == want
            bests.add((seed, tuple(want)))
            greedy_missed += (g[:g.index(1)] if 1 in g else g) != want
    assert greedy_missed >= 4 and len(bests) == 8  # the search and the penalty both matter


def test_beam_search_reads_a_padded_batch_as_its_rows_alone():
    m = _model(vocab=9, seed=2)
    rows = [[3, 4, 5, 6, 7], [8, 3], [5, 5, 6]]
    alone = [m.beam_search(torch.tensor([r]), 0, 1, 8, beam=3)[0] for r in rows]
    src = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for i, r in enumerate(rows):
        src[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    assert m.beam_search(src, 0, 1, 8, beam=3, src_mask=mask) == alone


def test_beam_search_refuses_a_width_below_one():
    with pytest.raises(ValueError, match="beam must be"):
        _model().beam_search(torch.tensor([[3]]), 0, 1, 4, beam=0)


def test_a_batch_feeds_the_start_then_the_target_and_learns_the_target_then_eos():
    items = [Pair("a", "b", src=[5, 6, 1], tgt=[7, 8, 9]), Pair("c", "d", src=[5, 1], tgt=[7])]
    b = collate(items, pad_id=2, start=0, eos_id=1)
    assert b["src"].tolist() == [[5, 6, 1], [5, 1, 2]]
    assert b["src_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["tgt"].tolist() == [[0, 7, 8, 9], [0, 7, 2, 2]]
    assert b["tgt_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[7, 8, 9, 1], [7, 1, -100, -100]]


def test_a_bad_pair_names_its_file_line_and_field(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"source": "one", "target": "1"}\n{"source": "two"}\n')
    with pytest.raises(UserError) as e:
        read_pairs(f)
    assert (e.value.line, e.value.field) == (2, "target") and "is missing" in e.value.message
    f.write_text('{"source": "one", "target": "1"}\n{"source": " ", "target": "2"}\n')
    with pytest.raises(UserError) as e:
        read_pairs(f)
    assert (e.value.line, e.value.field) == (2, "source")
    f.write_text('{"en": "one", "de": "eins", "id": 7}\n')
    p = read_pairs(f, "en", "de")[0]
    assert (p.source, p.target, p.id) == ("one", "eins", "7")
    assert read_pairs(f, "en", "fr", need_target=False)[0].target is None


def test_scores_are_sacrebleus():
    import sacrebleu
    hyps, refs = ["select a from b", "select c from d where e = 1"], \
        ["select a from b", "select c from d"]
    s = scores(hyps, refs)
    assert s["bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    assert s["chrf"] == round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)
    assert s["exact_match"] == 0.5 and 0 < s["bleu"] < 100
    assert scores(refs, refs)["bleu"] == 100.0


# An invented task: a number in words -> its digits, in reverse order.
WORDS = "zero one two three four five six seven eight nine".split()


def _number_pairs(path, n, seed):
    import random
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        digits = [rng.randrange(10) for _ in range(rng.randint(2, 4))]
        rows.append({"source": " ".join(WORDS[d] for d in digits),
                     "target": " ".join(str(d) for d in reversed(digits)), "id": f"n{i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("s2s")
    _number_pairs(d / "train.jsonl", 600, 0)
    _number_pairs(d / "test.jsonl", 60, 1)
    out = d / "model"
    seq2seq(Seq2SeqConfig(model="transformer-tiny", data=str(d / "train.jsonl"),
                          test_data=str(d / "test.jsonl"), out=str(out), max_steps=250,
                          warmup_steps=50, lr=3e-3, eval_every=125, progress=False))
    return d, out


def test_seq2seq_learns_an_invented_task_and_scores_its_test(trained):
    d, out = trained
    test = json.loads((out / "test.json").read_text())
    rows = [json.loads(line) for line in (out / "test_translations.jsonl").read_text().split("\n")
            if line]
    assert test["n"] == len(rows) == 60 and test["beam"] == 4
    assert test["exact_match"] >= 0.5 and test["bleu"] >= 50
    assert test["exact_match"] == sum(r["translation"] == r["target"] for r in rows) / 60
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().split("\n")
               if line]
    val = [r for r in metrics if "val_bleu" in r]
    assert [r["step"] for r in val] == [0, 125, 250]
    assert val[-1]["val_bleu"] > val[0]["val_bleu"] + 30
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "transformer" and config["test"]["bleu"] == test["bleu"]
    lrs = {r["step"]: r["lr"] for r in metrics if "lr" in r}
    assert lrs[50] == pytest.approx(inverse_sqrt_lr(49, 50, 3e-3))
    assert lrs[200] == pytest.approx(inverse_sqrt_lr(199, 50, 3e-3))


def test_translate_decodes_a_file_and_scores_it_as_training_did(trained, tmp_path, capsys):
    d, out = trained
    dest = tmp_path / "t.jsonl"
    assert main(["translate", "--model", str(out), "--data", str(d / "test.jsonl"),
                 "--out", str(dest)]) in (0, None)
    rows = [json.loads(line) for line in dest.read_text().split("\n") if line]
    before = [json.loads(line) for line in
              (out / "test_translations.jsonl").read_text().split("\n") if line]
    assert [r["translation"] for r in rows] == [r["translation"] for r in before]
    assert rows[0]["id"] == "n0"
    records = [json.loads(line) for line in (d / "test.jsonl").read_text().split("\n") if line]
    assert [{k: v for k, v in r.items() if k != "translation"} for r in rows] == records
    assert "BLEU" in capsys.readouterr().err
    sources = tmp_path / "sources.jsonl"  # no targets: translations on stdout, no scores
    sources.write_text("".join(json.dumps({"source": r["source"]}) + "\n" for r in rows[:3]))
    assert main(["translate", "--model", str(out), "--data", str(sources)]) in (0, None)
    said = capsys.readouterr()
    assert said.out.split("\n")[:3] == [r["translation"] for r in rows[:3]]
    assert "BLEU" not in said.err
    got = translate(out, d / "test.jsonl", beam=1, length_penalty=0.0)
    assert got["n"] == 60 and 0 <= got["bleu"] <= 100
    from gptlab import api
    assert api.translate(out, [r["source"] for r in rows[:5]]) == \
        [r["translation"] for r in rows[:5]]
    with pytest.raises(UserError) as e:
        api.translate(out, ["one " * 200])
    assert e.value.field == "texts[0]"


def test_translate_refuses_a_language_model_by_name(tmp_path):
    from gptlab.checkpoint import save_model
    from gptlab.tokenizer import train_tokenizer
    tok = train_tokenizer(["one two three"], vocab_size=300)
    torch.manual_seed(0)
    save_model(tmp_path / "gpt", build_model(get_preset("tiny", vocab_size=tok.vocab_size)), tok)
    f = tmp_path / "x.jsonl"
    f.write_text('{"source": "one"}\n')
    with pytest.raises(UserError, match="not an encoder-decoder"):
        translate(tmp_path / "gpt", f)


def test_a_resumed_run_ends_with_the_weights_of_one_run_straight(tmp_path):
    from safetensors.torch import load_file
    _number_pairs(tmp_path / "train.jsonl", 80, 0)
    common = dict(model="transformer-tiny", data=str(tmp_path / "train.jsonl"), max_steps=6,
                  warmup_steps=2, batch_size=8, eval_every=0, progress=False)
    seq2seq(Seq2SeqConfig(**common, out=str(tmp_path / "straight")))
    seq2seq(Seq2SeqConfig(**{**common, "max_steps": 3}, out=str(tmp_path / "split"),
                          save_every=3))
    seq2seq(Seq2SeqConfig(**common, out=str(tmp_path / "split"), resume=True))
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seq2seq_refuses_a_gpt_preset_and_a_world_with_data(tmp_path):
    _number_pairs(tmp_path / "train.jsonl", 10, 0)
    with pytest.raises(UserError, match="decoder-only GPT"):
        seq2seq(Seq2SeqConfig(model="tiny", data=str(tmp_path / "train.jsonl"),
                              out=str(tmp_path / "o"), progress=False))
    with pytest.raises(UserError) as e:
        seq2seq(Seq2SeqConfig(data=str(tmp_path / "train.jsonl"), world="builtin",
                              out=str(tmp_path / "o"), progress=False))
    assert e.value.field == "world"
    assert not (tmp_path / "o").exists()


def test_on_the_world_the_test_split_is_scored_by_execution(tmp_path):
    out = tmp_path / "world"
    seq2seq(Seq2SeqConfig(model="transformer-tiny", out=str(out), max_steps=2, batch_size=16,
                          eval_pairs=0, beam=1, length_penalty=0.0, progress=False))
    test = json.loads((out / "test.json").read_text())
    rows = [json.loads(line) for line in (out / "test_translations.jsonl").read_text().split("\n")
            if line]
    assert test["n"] == len(rows) == 600 and test["unseen_phrasing_n"] == 145
    assert test["exec_acc"] == sum(r["correct"] for r in rows) / 600
    assert all(r["id"] and r["target"].startswith("SELECT") for r in rows)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().split("\n")
               if line]
    assert any("val_loss" in r for r in metrics)
    assert not any("val_bleu" in r for r in metrics)  # --eval-pairs 0: no decoding


def test_averaging_checkpoints_gives_each_parameter_its_mean(tmp_path):
    from gptlab.checkpoint import Checkpointer
    from gptlab.train.seq2seq import average_checkpoints
    ckpt = Checkpointer(tmp_path, keep=None)
    models = [_model(seed=s) for s in (0, 1, 2)]
    for step, m in enumerate(models, 1):
        ckpt.save(step, m)
    m = _model(seed=5)
    average_checkpoints(m, ckpt.last(2))  # steps 2 and 3
    for name, p in m.named_parameters():
        a, b = dict(models[1].named_parameters())[name], dict(models[2].named_parameters())[name]
        assert torch.allclose(p, (a + b) / 2, atol=1e-7), name
    assert m.lm_head.weight is m.embed.weight  # still tied
    average_checkpoints(m, ckpt.last(1))  # one checkpoint: its weights exactly
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), models[2].parameters()))
    assert [p.name for p in ckpt.last(5)] == ["step-1", "step-2", "step-3"]
    p0, w = dict(models[0].named_parameters()), "encoder.0.attn.q_proj.weight"
    average_checkpoints(m, ckpt.last(3))  # a hand check on one weight
    x = (p0[w][0, 0] + dict(models[1].named_parameters())[w][0, 0]
         + dict(models[2].named_parameters())[w][0, 0]) / 3
    assert dict(m.named_parameters())[w][0, 0].item() == pytest.approx(x.item(), abs=1e-7)


def test_average_last_makes_the_final_model_the_mean_of_the_last_checkpoints(tmp_path):
    from safetensors.torch import load_file
    _number_pairs(tmp_path / "train.jsonl", 80, 0)
    _number_pairs(tmp_path / "test.jsonl", 8, 1)
    out = tmp_path / "avg"
    seq2seq(Seq2SeqConfig(model="transformer-tiny", data=str(tmp_path / "train.jsonl"),
                          test_data=str(tmp_path / "test.jsonl"), out=str(out), max_steps=9,
                          warmup_steps=2, batch_size=8, eval_every=0, save_every=3,
                          average_last=3, progress=False))
    test = json.loads((out / "test.json").read_text())
    assert test["averaged_steps"] == [3, 6, 9]
    assert json.loads((out / "config.json").read_text())["averaged_steps"] == [3, 6, 9]
    saved = [load_file(out / "checkpoints" / f"step-{s}" / "model.safetensors")
             for s in (3, 6, 9)]  # kept: --keep-checkpoints rose to 3
    final = load_file(out / "model.safetensors")
    assert final.keys() == saved[0].keys()
    for k in final:
        mean = (saved[0][k].double() + saved[1][k].double() + saved[2][k].double()) / 3
        assert torch.allclose(final[k].double(), mean, atol=1e-6), k
    assert not torch.equal(final["embed.weight"], saved[2]["embed.weight"])
    with pytest.raises(UserError) as e:  # nothing saved to average
        seq2seq(Seq2SeqConfig(model="transformer-tiny", data=str(tmp_path / "train.jsonl"),
                              out=str(tmp_path / "o"), average_last=3, progress=False))
    assert e.value.field == "save_every"
