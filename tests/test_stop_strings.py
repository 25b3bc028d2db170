"""Stop strings: a row ends at the token that completes one, its text is cut before it, other
rows are untouched, and the text is decoded a bounded piece at a time."""
import dataclasses
import functools

import pytest
import torch

from gptlab.api import generate_text
from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.engine import SamplingParams, generate
from gptlab.errors import UserError
from gptlab.model import GPT, GPTConfig
from gptlab.stop_strings import (StopStrings, check_stop_strings, cut_at_stop, cut_reply,
                                  earliest_stop)
from gptlab.tokenizer import BOS, EOS, PAD, Tokenizer, train_tokenizer


def random_model() -> GPT:
    torch.manual_seed(0)
    # Untied: a tied random model's greedy path repeats its last token.
    return GPT(GPTConfig(vocab_size=61, context=48, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_model=32, positions="rotary", norm="rmsnorm", activation="swiglu",
                         bias=False, tie_embeddings=False)).eval()


# Token i of `random_model` reads as two letters: a stop string can start inside a token.
PIECES = [chr(ord("a") + i % 26) + chr(ord("a") + (i * 7 + 3) % 26) for i in range(61)]


class Letters:
    """A tokenizer whose text is its tokens' `PIECES` one after another."""

    def decode(self, ids) -> str:
        return "".join(PIECES[i] for i in ids)


def test_a_stop_string_that_starts_inside_a_token_and_spans_the_next_ends_the_row_there():
    net, tok, prompt = random_model(), Letters(), [3, 4, 5]
    free = generate(net, [prompt], SamplingParams(max_new_tokens=12, greedy=True)).tokens[0]
    text = tok.decode(free)
    stop = text[5:8]  # the second letter of token 2, and token 3
    assert text.find(stop) == 5
    out = generate(net, [prompt], SamplingParams(max_new_tokens=12, greedy=True),
                   stop_when=StopStrings(tok, [stop], [prompt]))
    assert out.tokens == [free[:4]]  # up to the token that completed it, which stays
    assert len(out.logprobs[0]) == 4
    assert out.finished == [True] and out.stopped_by_string == [True]
    assert cut_at_stop(tok.decode(out.tokens[0]), [stop]) == (text[:5], True)


def test_rows_that_stop_early_leave_the_other_rows_as_they_are_alone():
    net, tok = random_model(), Letters()
    prompts = [[3, 4, 5], [20, 21], [30], [40, 41, 42]]
    params = SamplingParams(max_new_tokens=12, greedy=True)
    free = generate(net, prompts, params).tokens
    texts = [tok.decode(t) for t in free]
    # Row 0 stops at its 2nd token, row 2 at its 3rd, each string begun inside a token; rows 1
    # and 3 hold neither, and the batch compacts (2 of 4 rows left) while they go on.
    stops = [texts[0][1:4], texts[2][3:6]]
    assert [[t.find(s) for s in stops] for t in texts] == [[1, -1], [-1, -1], [-1, 3], [-1, -1]]
    out = generate(net, prompts, params, stop_when=StopStrings(tok, stops, prompts))
    assert out.tokens == [free[0][:2], free[1], free[2][:3], free[3]]
    assert out.finished == out.stopped_by_string == [True, False, True, False]
    for i, p in enumerate(prompts):
        alone = generate(net, [p], params, stop_when=StopStrings(tok, stops, [p]))
        assert alone.tokens == [out.tokens[i]]
        # the same numbers, to float rounding: a padded batch sums in another order
        assert alone.logprobs[0] == pytest.approx(out.logprobs[i], abs=1e-5)
        assert alone.stopped_by_string == [out.stopped_by_string[i]]


def test_a_stop_check_that_stops_nothing_changes_no_draw_and_a_stop_token_comes_first():
    net = random_model()
    prompts = [[3, 4, 5], [20, 21], [30]]
    params = SamplingParams(max_new_tokens=10, temperature=1.3, top_p=0.9)
    free = generate(net, prompts, params, seed=7)
    seen = []
    out = generate(net, prompts, params, seed=7,
                   stop_when=lambda rows, tokens: seen.append((rows, tokens)) or [])
    assert (out.tokens, out.logprobs) == (free.tokens, free.logprobs)
    assert out.stopped_by_string == [False] * 3 and len(seen) == 10
    # A row that drew a stop token has ended: the text check never sees it.
    stop = free.tokens[1][2]
    out = generate(net, prompts, dataclasses.replace(params, stop_ids=(stop,)), seed=7,
                   stop_when=lambda rows, tokens: [r for r, t in zip(rows, tokens) if t == stop])
    assert out.tokens[1] == free.tokens[1][:free.tokens[1].index(stop) + 1]
    assert out.stopped_by_string[1] is False and out.finished[1] is True
    with pytest.raises(ValueError, match=r"stop_when ended rows \[7\], which were not going"):
        generate(net, prompts, params, stop_when=lambda rows, tokens: [7])


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return train_tokenizer(["the price is 5 dollars now. " * 20], vocab_size=290)


def fed(tok, stop: list[str], prompt: list[int], tokens: list[int]) -> int | None:
    """The index of the token at which `StopStrings` ends a row writing `tokens`, or None."""
    check = StopStrings(tok, stop, [prompt])
    return next((k for k, t in enumerate(tokens) if check([0], [t]) == [0]), None)


def test_a_character_whose_bytes_span_tokens_stops_once_it_is_whole(byte_tok):
    tok = byte_tok
    prompt, reply = tok.encode("the price"), tok.encode(" is 5 € now €")
    def first(stop: str) -> int:  # the token whose text completes `stop`
        return next(k for k in range(len(reply)) if stop in tok.decode(reply[:k + 1]))
    euro = first("€")
    assert "5 \ufffd" in tok.decode(reply[:euro])  # its first bytes are tokens of their own
    assert fed(tok, ["5 €"], prompt, reply) == euro
    assert fed(tok, ["€ n"], prompt, reply) == first("€ n") > euro
    assert fed(tok, ["\ufffd"], prompt, reply) is None  # half a character is no text yet
    # The continuation is read after its prompt: " is" keeps its space.
    assert fed(tok, [" is"], prompt, reply) == 0


def test_each_step_decodes_a_bounded_number_of_tokens(byte_tok):
    tok = byte_tok
    calls: list[int] = []

    class Counting:
        def decode(self, ids):
            calls.append(len(ids))
            return tok.decode(ids)
    reply = tok.encode("the price is 5 € now. " * 150)  # 1,500 tokens and more
    assert len(reply) > 1500
    assert fed(Counting(), ["dollars"], tok.encode("the"), reply) is None
    assert max(calls) <= 16 and len(calls) <= 2 * len(reply)
    assert fed(tok, ["dollars"], tok.encode("the"), reply + tok.encode(" 5 dollars")) == \
        len(reply) + 2


def test_stop_strings_are_checked_and_cut_at_the_earliest():
    assert check_stop_strings(None) == () and check_stop_strings(["a", "b", "a"]) == ("a", "b")
    for bad, message in [("User:", r"got a single str; pass \['User:'\] to stop at it"),
                         ([""], "item 0 is empty"), (["a", 3], "item 1 must be a str"),
                         ({"a"}, "must be a list of texts, got the set")]:
        with pytest.raises(UserError, match=message) as e:
            check_stop_strings(bad)
        assert e.value.field == "stop"
    assert cut_at_stop("Hello there, friend.", ["friend", "there", "x"]) == ("Hello ", True)
    assert cut_at_stop("Hello", ["x"]) == ("Hello", False)
    # Where it begins, and which: of two that begin at one place, the first given.
    assert earliest_stop("Hello there", ["there", "Hello th", "Hell"]) == (0, "Hello th")
    assert earliest_stop("Hello there", ["here", "th"]) == (6, "th")
    assert earliest_stop("Hello", ["x", "y"]) is None
    # A chat response decoded with the template's lead (Llama 2's " " after "[/INST]"), as
    # StopStrings watched it: cut there, then the lead left out, even where the stop string
    # begins in the lead.
    assert cut_reply(" yes it is", " ", ["it"]) == ("yes ", "it")
    assert cut_reply(" yes it is", " ", [" yes", "is"]) == ("", " yes")
    assert cut_reply(" yes it is", " ", ["no"]) == ("yes it is", None)
    assert cut_reply("yes", "", ["es"]) == ("y", "es")
    assert cut_reply("[A] yes", "[A] ", ["A]"]) == ("", "A]")  # inside it: nothing of it kept


# --- a model that writes the next turn of a plain-text template -------------------------------

PLAIN = ("{{ bos_token }}{% for m in messages %}"
         "{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
         "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}Assistant:{% endif %}")
CONVERSATION = [{"role": "user", "content": "the cat sat"},
                {"role": "assistant", "content": "Hello there, friend."},
                {"role": "user", "content": "what now"},
                {"role": "assistant", "content": "Nothing."}]


@functools.cache
def plain_chat() -> tuple[GPT, Tokenizer]:
    """A tiny model that learned one conversation in `PLAIN`, a template whose turns end in no
    token: after "User: the cat sat\\nAssistant:" it writes the reply, then the next turn."""
    base = train_tokenizer(["User: the cat sat\nAssistant: Hello there, friend.\nUser: what now\n"]
                           * 10, vocab_size=300)
    tok = Tokenizer(base.hf, BOS, EOS, PAD, chat_template=PLAIN)
    ids, _ = tok.render_chat(CONVERSATION)
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=tok.vocab_size, context=64, n_layers=1, n_heads=2, d_model=32))
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    x = torch.tensor([ids])
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(net(x[:, :-1])[0], x[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), tok


def test_generate_text_returns_the_text_before_the_stop_string():
    pair = plain_chat()
    prompt = ["User: the cat sat\nAssistant:"]
    run_on = generate_text(pair, prompt, max_new_tokens=12, greedy=True)
    assert run_on[0].startswith(" Hello there, friend.\nUser: what now")
    assert generate_text(pair, prompt, max_new_tokens=12, greedy=True,
                         stop=["\nUser:"]) == [" Hello there, friend."]
    assert generate_text(pair, prompt, max_new_tokens=12, greedy=True,
                         stop=["ere, fr"]) == [" Hello th"]  # from inside a token
    assert generate_text(pair, prompt, max_new_tokens=12, greedy=True,
                         stop=["friend", "there"]) == [" Hello "]
    with pytest.raises(UserError, match="field 'stop': item 0 is empty"):
        generate_text("no/such/model", prompt, stop=[""])  # before the model loads


def test_cli_generate_stops_at_each_stop_given(tmp_path, capsys):
    net, tok = plain_chat()
    save_model(tmp_path / "m", net, tok)
    args = ["generate", "--model", str(tmp_path / "m"), "--greedy", "--max-new-tokens", "12",
            "--prompt", "User: the cat sat\nAssistant:", "--prompt", "User: what now\nAssistant:"]
    assert main(args + ["--stop", "\nUser:", "--stop", "friend"]) == 0
    assert capsys.readouterr().out == " Hello there, \n: Hello there, \n"
    assert main(args + ["--stop", ""]) == 2
    assert "field 'stop': item 0 is empty" in capsys.readouterr().err


# --- gptlab sample --stop ------------------------------------------------------------------------

def sampled(tmp_path, capsys, *flags: str, name: str = "s.jsonl") -> list[dict]:
    """`gptlab sample` of `plain_chat` on a text prompt, a `messages` prompt and a prompt it
    answers with no turn, 12 new tokens; the lines written."""
    import json
    model = tmp_path / "m"
    if not model.exists():
        save_model(model, *plain_chat())
        (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
            {"id": "a", "prompt": "User: the cat sat\nAssistant:"},
            {"id": "b", "messages": [{"role": "user", "content": "the cat sat"}]},
            {"id": "c", "prompt": "what now"}]))
    assert main(["sample", "--model", str(model), "--prompts", str(tmp_path / "p.jsonl"),
                 "--out", str(tmp_path / name), "--max-new-tokens", "12", *flags]) == 0
    capsys.readouterr()
    return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]


def test_sample_cuts_each_response_at_the_earliest_stop_string_and_names_it(tmp_path, capsys):
    greedy = ("--greedy", "--k", "1")
    free = sampled(tmp_path, capsys, *greedy)
    # The chat prompt ("b") ends where its template ends the assistant's turn, at the next
    # "\nUser:", as `gptlab chat` ends a reply (it ran on into a made-up turn); a text prompt
    # has no template, and runs on.
    assert [r["responses"] for r in free] == [
        [" Hello there, friend.\nUser: what now\nAssistant"],
        ["Hello there, friend."],
        ["\n cat sat\nAssistant: Hello there,\n\n\n"]]
    assert [r["finished"] for r in free] == [[False], [True], [False]]
    assert all(set(r) == {"id", "prompt" if r["id"] != "b" else "messages", "responses",
                          "finished"} for r in free)
    # From inside a token, across the next: the response ends before it, at the token that
    # completed it; a prompt whose response never holds it is written as without --stop.
    rows = sampled(tmp_path, capsys, *greedy, "--stop", "ere, fr")
    assert [r["responses"] for r in rows] == [[" Hello th"], ["Hello th"], free[2]["responses"]]
    assert [r["stopped_by"] for r in rows] == [["ere, fr"], ["ere, fr"], [None]]
    assert [r["finished"] for r in rows] == [[True], [True], [False]]
    assert list(rows[0]) == ["id", "prompt", "responses", "finished", "stopped_by"]
    # Several: the earliest in the text, whichever was given first.
    rows = sampled(tmp_path, capsys, *greedy, "--stop", "\nUser:", "--stop", "friend",
                   "--stop", "Assistant: Hello")
    assert [r["responses"] for r in rows] == [[" Hello there, "], ["Hello there, "],
                                              ["\n cat sat\n"]]
    assert [r["stopped_by"] for r in rows] == [["friend"], ["friend"], ["Assistant: Hello"]]
    # One that begins in the " " the template writes after "Assistant:", which a chat
    # response leaves out ("b"): it ended the response there, which was written as the rest,
    # "Hello", with no stopped_by.
    rows = sampled(tmp_path, capsys, *greedy, "--stop", " Hello")
    assert [r["responses"] for r in rows] == [[""], [""], ["\n cat sat\nAssistant:"]]
    assert [r["stopped_by"] for r in rows] == [[" Hello"]] * 3
    # None that appears: the file is the one without --stop, each line with its null.
    rows = sampled(tmp_path, capsys, *greedy, "--stop", "zebra")
    assert rows == [{**r, "stopped_by": [None]} for r in free]


def test_sample_stops_k_sampled_responses_and_label_and_reward_read_them(tmp_path, capsys):
    from gptlab.data.instruct import encode_prompt, encode_response
    from gptlab.feedback import label_samples
    from gptlab.train.reward import sample_sequences
    free = sampled(tmp_path, capsys, "--k", "3", "--seed", "3", name="free.jsonl")
    # It learned one answer to the conversation; "what now" alone, no turn, it answers anyhow.
    assert [len(set(r["responses"])) for r in free[:2]] == [1, 1]
    rows = sampled(tmp_path, capsys, "--k", "3", "--seed", "3", "--stop", "\nUser:",
                   "--stop", "zebra")
    assert [r["responses"] for r in rows[:2]] == [[" Hello there, friend."] * 3,
                                                  ["Hello there, friend."] * 3]
    assert [r["stopped_by"] for r in rows] == [["\nUser:"] * 3] * 2 + [[None] * 3]
    assert [r["finished"] for r in rows] == [[True] * 3] * 2 + [[False] * 3]
    # `label` leaves `stopped_by` (in the responses' order) out of the rankings, as `finished`.
    ranked = label_samples([{**rows[0], "responses": ["Hi.", rows[0]["responses"][0]]}],
                           lambda rec, responses: [1.0, 0.0])
    assert ranked == [{"id": "a", "prompt": rows[0]["prompt"],
                       "ranked": ["Hi.", " Hello there, friend."]}]
    # `reward --samples` reads a stopped response closed by EOS, as a finished one.
    _, tok = plain_chat()
    seqs = sample_sequences(tok, tmp_path / "s.jsonl", context=64)
    first = encode_prompt(tok, rows[0]["prompt"])
    assert seqs[0] == first + encode_response(tok, " Hello there, friend.", rows[0]["prompt"])
    assert seqs[0][-1] == tok.eos_id and len(seqs) == 9


def test_sample_stops_responses_batched_past_the_batch_size():
    from gptlab.engine import SamplingParams
    from gptlab.feedback import sample_responses
    net, tok = plain_chat()
    records = [{"id": "a", "prompt": "User: the cat sat\nAssistant:"}]
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    # K = 5 in batches of 2 (2, 2, 1), each batch its own stop check.
    rows = sample_responses(net, tok, records, 5, params, batch_size=2, mark_cut=True,
                            stop=("\nUser:",))
    assert rows == [{**records[0], "responses": [" Hello there, friend."] * 5,
                     "finished": [True] * 5, "stopped_by": ["\nUser:"] * 5}]
    # A samples line sampled again loses the `stopped_by` of its old responses.
    again = sample_responses(net, tok, rows, 1, params, mark_cut=True)
    assert "stopped_by" not in again[0] and set(again[0]) == {"id", "prompt", "responses",
                                                              "finished"}


def test_sample_refuses_an_empty_stop_string_before_it_loads_the_model(tmp_path, capsys):
    from gptlab.feedback import sample_file
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    args = ["sample", "--model", str(tmp_path / "none"), "--prompts", str(tmp_path / "p.jsonl"),
            "--out", str(tmp_path / "s.jsonl")]
    assert main(args + ["--stop", "\nUser:", "--stop", ""]) == 2
    assert "field 'stop': item 1 is empty" in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()
    with pytest.raises(UserError, match=r"field 'stop': must be a list of texts, got a single "
                                        r"str; pass \['x'\]"):
        sample_file(tmp_path / "none", tmp_path / "p.jsonl", tmp_path / "s.jsonl", stop="x")


# --- PPO's rollouts ------------------------------------------------------------------------------

def _plain_ppo(tmp_path, reward_fn=None, reward=False):
    """A PPO trainer of `plain_chat` on a `messages` prompt and a text prompt, both drawn in
    each rollout: by a reward function, or by a random reward model of the same network."""
    import json

    from gptlab.model.heads import ScalarHeadModel
    from gptlab.train.ppo import PPOConfig, PPOTrainer
    net, tok = plain_chat()
    save_model(tmp_path / "m", net, tok)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "b", "messages": [{"role": "user", "content": "the cat sat"}]},
        {"id": "a", "prompt": "User: the cat sat\nAssistant:"}]))
    kw = {"reward_fn": reward_fn}
    if reward:
        torch.manual_seed(3)
        rm = ScalarHeadModel.from_gpt(net)
        torch.nn.init.normal_(rm.head.weight, std=1.0)
        save_model(tmp_path / "rm", rm, tok, extra={"stage": "reward"})
        kw = {}
    cfg = PPOConfig(policy=str(tmp_path / "m"), prompts=str(tmp_path / "p.jsonl"),
                    out=str(tmp_path / "run"), device="cpu", max_new_tokens=12, batch_size=2,
                    minibatch_size=2, ppo_epochs=1, temperature=1.0,
                    **({"reward": str(tmp_path / "rm")} if reward else {}))
    return PPOTrainer(cfg, **kw)


def test_ppo_rollouts_end_a_messages_prompt_s_response_at_its_template_s_end_of_turn(tmp_path):
    # A plain-text template's turn ends in no token: PPO's rollouts ran on into a made-up
    # "\nUser: what now" turn, which the reward function was given as the response, and which
    # cost the missing-EOS penalty. They now end as `sample` ends them; a text prompt runs on.
    seen = []

    def reward_fn(prompts, responses, records):
        seen.extend(zip([r["id"] for r in records], responses))
        return [1.0] * len(responses)
    t = _plain_ppo(tmp_path, reward_fn)
    ro = t.rollout(1)
    ids = [r["id"] for r in ro.records]
    assert ro.stops == [("\nUser:",) if i == "b" else () for i in ids]
    by_id = dict(zip(ids, zip(ro.finished.tolist(), ro.responses)))
    assert by_id["b"][0] and not by_id["a"][0]  # ended; cut at max_new_tokens
    # The tokens through the one that completed "\nUser:" are the response the policy wrote
    # (the " " the template writes after "Assistant:" first).
    assert t.tok.decode(by_id["b"][1]) == " Hello there, friend.\nUser:"
    scores = t.score(ro)
    assert dict(seen)["b"] == "Hello there, friend."
    assert dict(seen)["a"].startswith(" Hello there, friend.\nUser: what now")
    # No missing-EOS penalty (1 by default) for the ended one: 1.0 - 0 and 1.0 - 1.
    assert dict(zip(ids, scores.tolist())) == {"b": 1.0, "a": 0.0}


def test_ppo_s_reward_model_reads_a_response_ended_in_text_as_it_learned_one(tmp_path):
    # It read the tokens the policy wrote, " Hello there, friend.\nUser:", less the last as
    # for a response ended by a stop token: " Hello there, friend.\nUser".
    from gptlab.data.instruct import encode_prompt, encode_response, end_of_response
    t = _plain_ppo(tmp_path, reward=True)
    ro = t.rollout(1)
    got = dict(zip([r["id"] for r in ro.records], t.score(ro).tolist()))
    messages = [{"role": "user", "content": "the cat sat"}]
    # The text before "\nUser:", encoded as a rankings file's response is; this template's
    # end of turn is text, none of a response's tokens.
    assert end_of_response(t.tok, messages) == []
    read = encode_prompt(t.tok, messages) + encode_response(t.tok, "Hello there, friend.",
                                                            messages)
    assert t.tok.decode(read).endswith("Assistant: Hello there, friend.")
    with torch.no_grad():
        want = float(t.reward_model(torch.tensor([read]))[0])
    assert got["b"] == pytest.approx(want, abs=1e-5)


def test_sft_says_when_its_answers_end_in_no_stop_token(tmp_path, capsys):
    # Under a template whose turn ends in text, nothing after an answer is trained: the model
    # learns no end to an answer (sample then ran to --max-new-tokens on every response), and
    # nothing said so.
    import json
    save_model(tmp_path / "m", *plain_chat())
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"the cat sat {i}"},
        {"role": "assistant", "content": "Hello there."}]}) + "\n" for i in range(4)))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"prompt": f"the cat sat {i}",
                                         "completion": " Hello."}) + "\n" for i in range(4)))
    args = ["sft", "--model", str(tmp_path / "m"), "--max-steps", "1", "--batch-size", "2",
            "--val-fraction", "0.25", "--no-progress", "--device", "cpu"]
    assert main([*args, "--data", str(chats), "--out", str(tmp_path / "a")]) == 0
    assert (f"note: {chats}: 4 of 4 demonstrations end their answer with no stop token, which "
            f"SFT would train (the chat template ends an assistant turn in text): the model does "
            f"not learn to end an answer; give a template that ends a turn with EOS, or "
            f"prompt/completion records\n") in capsys.readouterr().err
    assert main([*args, "--data", str(texts), "--out", str(tmp_path / "b")]) == 0
    assert "stop token" not in capsys.readouterr().err  # each completion ends with EOS
