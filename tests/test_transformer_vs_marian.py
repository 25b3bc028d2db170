"""gptlab's encoder-decoder Transformer against transformers' MarianMTModel, the same 2017
architecture: the same weights give the same logits, padded or not, and the same greedy
decoding."""
import pytest
import torch

from gptlab.errors import UserError
from gptlab.model.presets import build_model, get_preset

pytest.importorskip("transformers")
from gptlab.interop.marian import to_marian  # noqa: E402

PAD, START, EOS = 2, 0, 1


def _pair(seed=0, **over):
    torch.manual_seed(seed)
    m = build_model(get_preset("transformer-tiny", vocab_size=97, context=32, n_encoder_layers=2,
                               n_decoder_layers=2, **over)).eval()
    with torch.no_grad():  # trained-looking weights: every bias and norm off its init
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return m, to_marian(m, PAD, START, EOS)


def _batch(rows, width):
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def test_the_same_weights_give_marians_logits_on_a_right_padded_batch():
    m, hf = _pair()
    g = torch.Generator().manual_seed(1)
    src, src_mask = _batch([torch.randint(3, 97, (n,), generator=g).tolist() for n in (9, 4, 7)],
                           9)
    tgt, tgt_mask = _batch([[START] + torch.randint(3, 97, (n,), generator=g).tolist()
                            for n in (5, 8, 2)], 9)
    with torch.no_grad():
        ours = m(src, tgt, src_mask, tgt_mask)
        theirs = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt,
                    decoder_attention_mask=tgt_mask).logits
    real = tgt_mask.bool()
    assert ours[real].shape == theirs[real].shape
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)
    assert ours[real].std() > 1  # logits with spread, not a constant matched


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A transformer-tiny that `gptlab seq2seq` trained on the number task of test_seq2seq:
    its greedy answers vary by source and end with EOS."""
    from test_seq2seq import _number_pairs

    from gptlab.checkpoint import load_model
    from gptlab.train.seq2seq import Seq2SeqConfig, seq2seq
    d = tmp_path_factory.mktemp("marian")
    rows = _number_pairs(d / "train.jsonl", 400, 0)
    seq2seq(Seq2SeqConfig(model="transformer-tiny", data=str(d / "train.jsonl"),
                          out=str(d / "m"), max_steps=150, warmup_steps=50, lr=3e-3,
                          eval_pairs=0, progress=False))
    model, tok, _ = load_model(d / "m")
    return model.eval(), tok, rows, d / "m"


def test_greedy_decoding_is_marians_generate(trained):
    from gptlab.train.seq2seq import start_id
    m, tok, rows, _ = trained
    sources = [tok.encode(r["source"]) + [tok.eos_id] for r in rows[:8]]
    src, mask = _batch(sources, max(map(len, sources)))
    src = src.masked_fill(mask == 0, tok.pad_id)
    hf = to_marian(m, tok.pad_id, start_id(tok), tok.eos_id)
    ours = m.greedy_decode(src, start_id(tok), tok.eos_id, 16, src_mask=mask).tolist()
    theirs = hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=16,
                         do_sample=False, num_beams=1, min_length=0).tolist()

    def upto_eos(r):
        return r[:r.index(tok.eos_id) + 1] if tok.eos_id in r else r
    assert [upto_eos(o) for o in ours] == [upto_eos(t[1:]) for t in theirs]  # t[0]: the start
    assert len({tuple(upto_eos(o)) for o in ours}) >= 6  # answers that differ by source
    assert all(tok.eos_id in o for o in ours)


def test_a_model_marian_cannot_compute_is_refused_by_what_differs():
    torch.manual_seed(0)
    m = build_model(get_preset("transformer-tiny", prenorm=True, tie_embeddings=False))
    with pytest.raises(UserError) as e:
        to_marian(m, PAD, START, EOS)
    assert "pre-norm" in e.value.message and "not shared" in e.value.message


def test_convert_to_hf_writes_a_marian_directory_transformers_loads_and_decodes_alike(
        trained, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from gptlab.cli import main
    from gptlab.train.seq2seq import translate_ids
    m, tok, rows, path = trained
    assert main(["convert", "--to", "hf", str(path), "--out", str(tmp_path / "hf")]) in (0, None)
    hf = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "MarianMTModel"
    texts = [r["source"] for r in rows[:6]]
    enc = hf_tok(texts, return_tensors="pt", padding=True)
    sources = [tok.encode(t) + [tok.eos_id] for t in texts]
    assert [[i for i, k in zip(row, keep) if k] for row, keep in
            zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())] == sources
    with torch.no_grad():
        src, mask = _batch(sources, max(map(len, sources)))
        src = src.masked_fill(mask == 0, tok.pad_id)
        tgt = torch.tensor([[0, 5, 9, 12]] * len(texts))
        torch.testing.assert_close(m(src, tgt, mask), hf(input_ids=src, attention_mask=mask,
                                                       decoder_input_ids=tgt).logits,
                                   rtol=1e-4, atol=1e-4)
    out = hf.generate(**enc, max_new_tokens=16, do_sample=False, num_beams=1)
    theirs = [t.strip() for t in hf_tok.batch_decode(out, skip_special_tokens=True)]
    assert theirs == translate_ids(m, tok, sources, beam=1, alpha=0.0)
    assert len(set(theirs)) >= 4
