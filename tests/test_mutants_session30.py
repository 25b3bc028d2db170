"""Slips in this session's code that every earlier test let through (mutation testing): the KL
reference's parts (their size and each row's padding flag), a streamed reply's cost after an
invalid byte late in a long run of byte fallback, and the context fit's renders."""
import pytest
import torch
from types import SimpleNamespace

import gptlab.eval.pipeline_eval as pipeline_eval
from gptlab.chat import fit_messages
from gptlab.train.ppo import Rollout
from test_chat import (fitted, n_words, stream_counting_decodes, stream_tokenizer,
                       streamed_as_before, sys_msg, user)

GPT2_VOCAB = 50257


def parts_scored(monkeypatch, B: int, R: int, vocab: int, right_padded: list[bool]) -> list:
    """(rows, right_padded) of each forward `_response_logprob_sums` makes for a batch of B
    responses of R tokens over `vocab`, and the sums it returns (each row's response holds
    row + 1 tokens, each of log-probability -(row + 1))."""
    seen = []

    def fake_logprobs(model, part, temperature):
        seen.append((len(part.ids), part.right_padded))
        rows = part.ids[:, 0].double()  # each row's index, kept in its first id
        return (-(rows + 1))[:, None].expand(-1, R).float(), None

    monkeypatch.setattr(pipeline_eval, "response_logprobs", fake_logprobs)
    ids = torch.zeros(B, 2 + R, dtype=torch.long)
    ids[:, 0] = torch.arange(B)
    rmask = (torch.arange(R)[None] <= torch.arange(B)[:, None]).long()
    ro = Rollout(ids, torch.ones(B, 2 + R, dtype=torch.long), rmask, 2, [], [],
                 torch.zeros(B, dtype=torch.bool), right_padded=right_padded)
    sums = pipeline_eval._response_logprob_sums(SimpleNamespace(config=SimpleNamespace(
        vocab_size=vocab)), ro)
    return seen, sums.tolist()


def test_the_kl_reference_s_parts_hold_2_to_the_26_log_probabilities_at_most(monkeypatch):
    """64 samples of 80 tokens over GPT-2's vocabulary go 16 rows a forward (17 would pass
    2^26 = 67,108,864 values); 64 of 20 are one forward. A smaller bound (2^20) passed every
    test: the demo's batches, one forward, went in parts."""
    flags = [True] * 64
    seen, sums = parts_scored(monkeypatch, 64, 80, GPT2_VOCAB, flags)
    assert [n for n, _ in seen] == [16, 16, 16, 16]
    assert 16 * 80 * GPT2_VOCAB <= 2**26 < 17 * 80 * GPT2_VOCAB
    want = [-float(min(r + 1, 80) * (r + 1)) for r in range(64)]
    assert sums == want
    seen, _ = parts_scored(monkeypatch, 64, 20, GPT2_VOCAB, flags)
    assert [n for n, _ in seen] == [64]


def test_a_response_too_long_for_one_row_under_the_bound_is_scored_a_row_at_a_time(monkeypatch):
    """A row alone past 2^26 values (2,000 tokens over GPT-2's vocabulary) still goes, one row
    a forward: `max(1, ...)` as `max(0, ...)` passed every test and made a range of step 0."""
    seen, sums = parts_scored(monkeypatch, 3, 2000, GPT2_VOCAB, [True, False, True])
    assert [n for n, _ in seen] == [1, 1, 1]
    assert sums == [-1.0, -4.0, -9.0]


def test_each_part_of_the_kl_reference_keeps_its_own_rows_padding_flags(monkeypatch):
    """A part's `right_padded` is its own rows' (the fast causal path is taken only for a part
    all right-padded): the first rows' flags for every part passed every test, and would run
    a row with a gap of padding as if it had none."""
    flags = [i % 3 == 0 for i in range(40)]
    seen, _ = parts_scored(monkeypatch, 40, 80, GPT2_VOCAB, flags)
    assert [n for n, _ in seen] == [16, 16, 8]
    assert [f for _, f in seen] == [flags[0:16], flags[16:32], flags[32:40]]


def test_an_invalid_byte_late_in_a_long_run_keeps_each_token_s_cost_bounded(request):
    """After an invalid byte, the bytes that follow decode after a seam of the bytes from the
    broken character on (the run is U+FFFD byte for byte, whatever comes): a seam of the whole
    run (300 tokens here), or a `final` that no longer moves while the run is invalid, gave
    the same text at a cost that grows with the run. The pieces are those the whole reply
    decoded at each token gives."""
    tok, _ = stream_tokenizer("byte-fallback", request)
    messages = [user("hi")]
    prompt = tok.render_chat(messages, add_generation_prompt=True)[0]
    valid = tok.encode("東京 🎉 é!" * 60)
    byte = {tok.fallback_byte(t): t for t in range(256)}
    reply = valid[:301] + [byte[0xE6]] + valid[301:600] + tok.encode("a")
    assert all(tok.fallback_byte(t) is not None for t in reply[:-1])
    pieces, per_token, stream = stream_counting_decodes(tok, messages, prompt, reply)
    per_token = [n for _, n in per_token]
    assert pieces == streamed_as_before(tok, messages, prompt, reply)
    # The prompt's "\n" and the reply's 600 bytes: one run, each byte U+FFFD.
    assert stream.before == "\ufffd" * 601
    # A few decodes of the seam's 16 tokens and the bytes since (a seam of the run: 300 more).
    assert max(per_token[310:]) <= 4 * (16 + 9)


def test_a_lone_question_over_budget_is_refused_after_one_render():
    """With no earlier turn to drop, the count of the whole conversation is the question's:
    counting it again (`if last:` dropped) rendered it twice."""
    conversation = [sys_msg(), user("one two three four five six")]
    message, dropped, renders = fitted(fit_messages, conversation, n_words, 4)
    assert dropped is None and "TurnTooLong" in message and renders == 1


def test_starts_with_reads_the_first_text_its_vocabulary_spells():
    """A vocabulary without "a" encodes it to no ids, and a post-processor that appends
    <|endoftext|> then gives [<|endoftext|>] alone, as on "": read there (`if plain:` dropped)
    it starts sequences with it. "." is spelled: [".", <|endoftext|>] does not."""
    from tokenizers import AddedToken, Tokenizer, models, processors

    from gptlab.tokenizer import starts_with
    for template, starts in (("$A <|endoftext|>", False), ("<|endoftext|> $A", True)):
        hf = Tokenizer(models.BPE({"<|endoftext|>": 0, ".": 1}, []))
        hf.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
        hf.post_processor = processors.TemplateProcessing(single=template,
                                                          special_tokens=[("<|endoftext|>", 0)])
        assert hf.encode("a", add_special_tokens=False).ids == [] and hf.encode(".").ids == (
            [0, 1] if starts else [1, 0])
        assert starts_with(hf, "<|endoftext|>") is starts


@pytest.fixture
def run_with_steps(tmp_path):
    """A run directory with checkpoints step-3 and step-6, and a step-9 without a manifest."""
    from gptlab.checkpoint import Checkpointer
    from test_checkpoint import tiny
    c = Checkpointer(tmp_path / "run", keep=None)
    net = tiny()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)  # every stage saves one
    for step in (3, 6):
        c.save(step, net, optimizer=optimizer, state={"step": step})
    (c.dir / "step-9").mkdir()
    return c


@pytest.mark.parametrize("name", ["6", "06", "step-6", "step-06", "step-6/", " step-6 "])
def test_a_named_step_is_its_checkpoint(run_with_steps, name):
    """`int` reads the step: "step-06" names step-6 (read as written it was no checkpoint)."""
    step6 = run_with_steps.dir / "step-6"
    assert run_with_steps.named(name) == step6 and run_with_steps.named(str(step6)) == step6


@pytest.mark.parametrize("name, said", [
    ("step-²", "is not a checkpoint of this run"),  # a digit int() cannot read: no ValueError
    ("²", "is not a checkpoint of this run"),
    ("step-x", "is not a checkpoint of this run"),
    ("step-7", "no such checkpoint"),
    ("step-9", "checkpoint is incomplete (no manifest.json)"),  # and not listed
])
def test_a_name_that_is_no_checkpoint_of_the_run_is_refused_listing_those_there(
        run_with_steps, name, said):
    from gptlab.errors import UserError
    c = run_with_steps
    with pytest.raises(UserError) as e:
        c.named(name, field="from")
    assert e.value.field == "from" and said in e.value.message
    assert e.value.message.endswith(f"; the checkpoints in {c.dir}: step-3, step-6")


def test_a_step_of_another_run_or_path_is_refused_and_a_corrupt_one_names_the_field(
        run_with_steps, tmp_path):
    from gptlab.checkpoint import Checkpointer
    from gptlab.errors import UserError
    from test_checkpoint import tiny
    c = run_with_steps
    other = Checkpointer(tmp_path / "other")
    other.save(6, tiny())
    for name in (str(other.dir / "step-6"), str(c.dir / "step-x"), str(c.dir.parent / "step-6")):
        with pytest.raises(UserError, match="is not a checkpoint of this run"):
            c.named(name)
    (c.dir / "step-6" / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(UserError) as e:
        c.named("6")
    assert e.value.field == "resume_from" and "it cannot be resumed from" in e.value.message


def test_refuse_non_finite_passes_empty_and_integer_tensors_and_names_an_infinity():
    """An empty tensor has no extremes (aminmax of it raised: a traceback for a model with a
    zero-size buffer), an integer or bool one holds no NaN; +inf alone is refused too."""
    from gptlab.checkpoint import refuse_non_finite
    from gptlab.errors import UserError
    refuse_non_finite([("empty", torch.empty(0, 4)), ("ids", torch.arange(3)),
                       ("mask", torch.ones(2, dtype=torch.bool))], "w.safetensors")
    with pytest.raises(UserError) as e:
        refuse_non_finite([("ok", torch.zeros(2)), ("bad", torch.tensor([1.0, float("inf"),
                                                                           float("nan")]))],
                          "w.safetensors")
    assert "tensor 'bad'" in e.value.message and "1 NaN and 1 infinite of its 3" in e.value.message
    for bad in (float("inf"), -float("inf")):  # the highest or the lowest value alone
        with pytest.raises(UserError, match="1 infinite of its 2"):
            refuse_non_finite([("one", torch.tensor([0.0, bad]))], "w.safetensors")


@pytest.mark.parametrize("what, said", [("grad", "loss 6.25"), ("loss", "loss inf")])
def test_a_step_whose_grad_norm_or_loss_alone_is_not_finite_stops_the_run(tmp_path, what, said):
    """A finite loss whose gradient is NaN (sqrt at 0: 0 x inf), or an infinite loss whose
    gradient is finite (a constant added): either alone stops the run at that step, before a
    save (a check of the loss alone, or of the grad norm alone, went on and saved)."""
    import numpy as np

    from gptlab.data.tokens import BlockBatches
    from gptlab.errors import UserError
    from gptlab.train.loop import TrainConfig, train
    from gptlab.train.pretrain import lm_loss
    from test_loop import _stream, tiny
    calls = []

    def loss_fn(model, block):
        calls.append(model.training)
        loss = lm_loss(model, block)
        if sum(calls) < 3:
            return loss
        if what == "grad":
            return loss + torch.sqrt(next(model.parameters()).sum() * 0)
        return loss + float("inf")
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=4, save_every=1, eval_every=0,
                      progress=False, device="cpu")
    with pytest.raises(UserError, match="diverged at step 3 \\(" + said) as e:
        train(tiny(), BlockBatches(_stream(), 16, np.arange(30), 4, seed=0), loss_fn, cfg,
              tmp_path)
    assert ("grad_norm nan" in str(e.value)) is (what == "grad")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step-1", "step-2"]


def test_the_window_read_from_a_config_json_as_transformers_reads_it(tmp_path):
    """Llama reads no window whatever sliding_window says; Mistral's left out is 4096 (dense
    within a context of 4096); Qwen2's applies only with use_sliding_window, false where left
    out. Each mutant (Llama's window read, 4095, Qwen2's flag true by default) went unseen."""
    from gptlab.interop.hf import _sliding_window
    path = tmp_path / "config.json"
    llama = {"model_type": "llama", "sliding_window": 16, "use_sliding_window": True,
             "max_window_layers": 0}
    assert _sliding_window(llama, 4, 64, path) == (None, "all")
    assert _sliding_window({"model_type": "mistral"}, 4, 8192, path) == (4096, "all")
    assert _sliding_window({"model_type": "mistral"}, 4, 4096, path) == (None, "all")
    assert _sliding_window({"model_type": "mistral"}, 4, 4097, path) == (4096, "all")
    qwen2 = {"model_type": "qwen2", "sliding_window": 16, "max_window_layers": 1}
    assert _sliding_window(qwen2, 4, 64, path) == (None, "all")
    assert _sliding_window({**qwen2, "use_sliding_window": True}, 4, 64, path) == (16, [1, 2, 3])


def test_a_qwen2_export_s_max_window_layers_is_its_first_local_layer():
    """transformers 4 reads max_window_layers (the window from that layer on): local layers 2
    and 3 of 4 write 2, and layer_types the same (2 + 1, one dense layer more, went unseen)."""
    from gptlab.interop.hf import _export_family, _hf_config
    from gptlab.model.gpt import GPTConfig
    cfg = GPTConfig(vocab_size=32, context=32, n_layers=4, n_heads=2, d_model=16,
                    positions="rotary", norm="rmsnorm", activation="swiglu", bias=False,
                    qkv_bias=True, attention_window=8, local_attention_layers=[2, 3])
    assert _export_family(cfg) == "qwen2"
    out = _hf_config(cfg, "qwen2", None, torch.float32)
    assert (out["use_sliding_window"], out["sliding_window"], out["max_window_layers"]) == (
        True, 8, 2)
    assert out["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
