"""The InstructGPT data formats: demonstrations, prompts, samples and rankings.

- demonstrations (SFT): `{"prompt": ..., "completion": ...}` or `{"messages": [...]}`
- prompts (sample, PPO): `{"prompt": ...}` or `{"messages": [...]}` ending on a user turn
- samples: `{"id": ..., "prompt": ..., "responses": [...]}` (other prompt fields carried along),
  `responses` a non-empty list of strings
- rankings: `{"prompt": ..., "ranked": [best, ..., worst]}` with K ≥ 2 distinct responses,
  an item being a response or a list of responses tied with each other (at least 2 levels),
  or `{"prompt": ..., "chosen": ..., "rejected": ...}` (K = 2)

TRL's conversational forms are read as they are: a `prompt` may be a list of messages, and then
a `completion`, `chosen` or `rejected` a list holding one assistant message; `chosen` and
`rejected` without a prompt may be whole conversations whose shared messages are the prompt
(TRL's implicit prompt). TRL's other types are refused with what to write instead.

Each is read from JSON Lines, a `.parquet` file or a directory of their shards as one file
(`gptlab.io.read_jsonl`); an error names a record's shard and line, which `Example` and
`Ranking` keep (`file`, `line`).

A prompt is tokenized on its own and a response after it, exactly as generation sees them, so
the tokens trained on are the tokens sampled. A plain-text response ends with EOS; it joins its
prompt as written (TRL's rule: a completion's leading space is its own), and a SentencePiece
tokenizer encodes it as the continuation of the prompt's text (`Tokenizer.encode_completion`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.errors import UserError, counted
from gptlab.io import fields_instead, no_records, read_jsonl, record_file
from gptlab.tokenizer import check_messages, check_text


@dataclass
class Example:
    """Token ids and a 0/1 mask of the tokens the loss is taken on."""
    ids: list[int]
    loss_mask: list[int]
    id: Any = None
    line: int | None = None        # the record's line in its file
    file: str | None = None        # its shard, where a directory was read as one file


@dataclass
class Ranking:
    prompt: Any                    # text or a list of chat messages
    ranked: list[str]              # best first, tied responses next to each other
    id: Any = None
    line: int | None = None
    groups: list[int] | None = None  # per response its level (0 = best, equal = tied)
    file: str | None = None        # as Example's

    def __post_init__(self) -> None:
        if self.groups is None:
            self.groups = list(range(len(self.ranked)))


@dataclass
class SkipCounter:
    """Records dropped inside a stage are counted and reported, never silently lost."""
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self, what: str) -> str:
        """`skipped 3 prompts: 1 prompt too long, 2 prompts ...`: `what` is the plural of the
        thing counted, and where a reason names it (reasons are written plural, as `counts`
        keeps them), it agrees in number with its count too."""
        if not self.counts:
            return ""
        parts = ", ".join(f"{n} {_in_number(reason, what, n)}"
                          for reason, n in sorted(self.counts.items()))
        return f"skipped {counted(self.total, what.removesuffix('s'))}: {parts}"


def _in_number(phrase: str, plural: str, n: int) -> str:
    """`phrase` with its first word `plural` in the singular if `n` is 1: "prompts longer than
    the context" is "prompt longer than the context" after a 1."""
    if n != 1:
        return phrase
    return re.sub(rf"\b{re.escape(plural)}\b", plural.removesuffix("s"), phrase, count=1)


def _check_messages_at(msgs: list, path: str | Path | None, line: int | None,
                       field: str = "messages") -> None:
    """Refuse messages without a known role and string content that a tokenizer can encode
    (the chat template's own checks, here naming the file, line and field: `prompt[0].role`
    for the messages of a `prompt`)."""
    try:
        check_messages(msgs)
    except UserError as e:
        e = UserError(e.message, field=field + (e.field or "").removeprefix("messages"))
        raise (e.at(path, line) if path else e) from None
    for i, m in enumerate(msgs):
        _checked_text(m["content"], path, line, f"{field}[{i}].content")


def _is_conversation(value: Any) -> bool:
    """Whether `value` is written as chat messages (a non-empty list of objects)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _checked_text(text: str, path: str | Path | None, line: int | None, field: str) -> str:
    """`text` if a tokenizer can encode it, else a UserError naming file, line and field. Read
    from a file, whose bytes were UTF-8, a lone surrogate came from a JSON `\\u` escape."""
    try:
        return check_text(text, field=field, from_json=bool(path))
    except UserError as e:
        raise UserError(e.message, path=path, line=line, field=field) from None


def prompt_of(record: dict, path: str | Path | None = None, line: int | None = None) -> Any:
    """The prompt of a record: its `prompt` (text, or messages as TRL's conversational form
    writes it) or its `messages`; messages end on a user turn."""
    if "prompt" in record and "messages" in record:
        # Which one is the prompt would be a guess: refuse, as SFT does.
        raise UserError("has both 'prompt' and 'messages'; give one of them", path=path,
                        line=line, field="messages")
    if "prompt" in record:
        if isinstance(record["prompt"], list):
            return _prompt_messages(record["prompt"], path, line, "prompt")
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise UserError("must be a non-empty string", path=path, line=line, field="prompt")
        if not record["prompt"].strip():
            # The model would be asked nothing: its answers (sampled, ranked, trained on)
            # could only be noise.
            raise UserError("is only whitespace; it must ask something", path=path, line=line,
                            field="prompt")
        return _checked_text(record["prompt"], path, line, "prompt")
    if "messages" in record:
        return _prompt_messages(record["messages"], path, line, "messages")
    if "conversations" in record:
        raise _sharegpt(path, line)
    raise UserError("needs a 'prompt' or a 'messages' field"
                    + fields_instead(record, ("prompt", "messages")), path=path, line=line)


def _prompt_messages(msgs: Any, path: str | Path | None, line: int | None, field: str) -> list:
    """`msgs` if they are a conversation to answer: checked messages ending on a user turn."""
    if not isinstance(msgs, list) or not msgs:
        raise UserError("must be a non-empty list of messages", path=path, line=line,
                        field=field)
    _check_messages_at(msgs, path, line, field)
    if msgs[-1]["role"] != "user":
        # Rendered for generation, a final assistant turn would be part of the prompt: the
        # model would be shown the answer it is asked for.
        raise UserError(f"must end on a user turn, not {msgs[-1]['role']!r}", path=path,
                        line=line, field=field)
    if not msgs[-1]["content"].strip():  # the question answered: as a text prompt, not blank
        raise UserError("is empty or only whitespace; the last user turn must ask something",
                        path=path, line=line, field=f"{field}[{len(msgs) - 1}].content")
    return msgs


def _response_text(value: Any, prompt: Any, path: str | Path | None, line: int | None,
                   field: str) -> str:
    """A response (a `completion`, `chosen` or `rejected`) as text: a string, or after a
    conversational prompt, TRL's list holding one assistant message."""
    if isinstance(value, list) and isinstance(prompt, str):
        raise UserError("is a list of messages but the prompt is text; write both as text or "
                        "both as lists of messages", path=path, line=line, field=field)
    if isinstance(value, list):
        _check_messages_at(value, path, line, field)
        if len(value) != 1 or value[0]["role"] != "assistant":
            raise UserError("must be one assistant message, [{\"role\": \"assistant\", "
                            "\"content\": ...}] (a longer conversation goes in 'messages')",
                            path=path, line=line, field=field)
        value, field = value[0]["content"], f"{field}[0].content"
    if not isinstance(value, str) or not value.strip():
        # An empty one would teach the model to answer with nothing but its end of turn.
        raise UserError("must be a non-empty string", path=path, line=line, field=field)
    return _checked_text(value, path, line, field)


def _implicit_prompt(chosen: list, rejected: list, path: str | Path | None,
                     line: int | None) -> tuple[list, list, list]:
    """TRL's implicit prompt: `chosen` and `rejected` are whole conversations that share every
    message but their last; the shared messages are the prompt. (prompt, chosen's last message,
    rejected's last message), each a list of messages."""
    _check_messages_at(chosen, path, line, "chosen")
    _check_messages_at(rejected, path, line, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and \
            (chosen[n]["role"], chosen[n]["content"]) == (rejected[n]["role"],
                                                          rejected[n]["content"]):
        n += 1
    if n == len(chosen) == len(rejected):
        n -= 1  # the same conversation twice: refused below as duplicate responses
    if n == 0:
        raise UserError("is missing, and 'chosen' and 'rejected' share no first messages to "
                        "take it from: give it in 'prompt', or begin both conversations with "
                        "the prompt's messages", path=path, line=line, field="prompt")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if len(conv) - n != 1:
            raise UserError(f"without a 'prompt', 'chosen' and 'rejected' must be the same "
                            f"conversation but for their last message, an assistant turn; "
                            f"{name} has {len(conv) - n} messages after the {n} they share "
                            f"(or give the prompt in 'prompt')", path=path, line=line,
                            field=name)
        if conv[-1]["role"] != "assistant":
            raise UserError("must be 'assistant': without a 'prompt', the last message of "
                            "'chosen' and of 'rejected' is the response", path=path, line=line,
                            field=f"{name}[{len(conv) - 1}].role")
    return _prompt_messages(chosen[:n], path, line, "chosen"), chosen[n:], rejected[n:]


def encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """Tokens of a prompt, ready for the response to follow."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
    ids, _ = tokenizer.render_chat(prompt, add_generation_prompt=True)
    return ids


def encode_response(tokenizer: Any, response: str, prompt: Any) -> list[int]:
    """Tokens of a response, closed by EOS (the chat template's end of turn for chat prompts),
    as the model writes them after the prompt's tokens: after a text prompt, the continuation
    of its text where the tokenizer puts a "▁" before a text (`Tokenizer.encode_completion`:
    " Paris" is "▁Paris"), else the response's own tokens."""
    if isinstance(prompt, str):
        return tokenizer.encode_completion(prompt, response) + [tokenizer.eos_id]
    return _response_after(tokenizer, prompt, response, encode_prompt(tokenizer, prompt))


def end_of_response(tokenizer: Any, prompt: Any) -> list[int]:
    """The tokens `encode_response` closes a response to `prompt` with: EOS, or the chat
    template's end of turn (Llama 2's "▁", "</s>"), without the template text that comes before
    an answer (`_closing_after`)."""
    if isinstance(prompt, str):
        return encode_response(tokenizer, "", prompt)
    start = encode_prompt(tokenizer, prompt)
    end = _closing_after(tokenizer, prompt, start)
    return end if end is not None else [tokenizer.eos_id]


def template_tail(tokenizer: Any, prompt: Any) -> list[int]:
    """The tokens the chat template writes after the end of turn that closes a response to
    `prompt`, where the conversation rendered whole ends (ChatML's "\\n" after `<|im_end|>`);
    none for a plain-text prompt, or a template that stops at the end of turn (gptlab's own,
    Llama 3's). A Hugging Face reward model reads them: it was trained on, and scores, whole
    conversations (see ScalarHeadModel.reads_template_tail)."""
    if isinstance(prompt, str):
        return []
    full, mask = tokenizer.render_chat(list(prompt) + [{"role": "assistant", "content": ""}])
    closed = [i for i, m in enumerate(mask) if m]  # the empty answer's end of turn, last
    if not closed or closed[-1] < len(encode_prompt(tokenizer, prompt)) \
            or not end_of_response(tokenizer, prompt):
        return []  # no end of turn closes the answer: nothing to read after it
    return full[closed[-1] + 1:]


def _response_after(tokenizer: Any, prompt: list, response: str, start: list[int]) -> list[int]:
    """`encode_response` of a chat prompt whose tokens are `start`."""
    answer = _assistant_tokens_after(tokenizer, prompt, response, start)
    if answer is not None:
        return answer
    # BPE merged the generation prompt's last characters with the response's first ones (its
    # "\n" and a response's "\n\n" are one token; a SentencePiece "▁" after "ASSISTANT:"
    # and "▁yes"): the prompt's own tokens come first, so the response is tokens of its own, as
    # the template writes it (stripped, by one that trims), with no "▁" put before it (it goes
    # on after the prompt's text, as `encode_completion`'s seam), then the end of turn.
    written = tokenizer.content_as_written(
        list(prompt) + [{"role": "assistant", "content": response}], len(prompt))
    end = _closing_after(tokenizer, prompt, start)
    return tokenizer.encode_continuation(written) + (end if end is not None
                                                     else [tokenizer.eos_id])


def _closing_after(tokenizer: Any, prompt: list, start: list[int]) -> list[int] | None:
    """The tokens that close an answer to the chat `prompt` whose tokens are `start`: an empty
    answer's (`_assistant_tokens_after`) less the template text between the generation prompt
    and the answer (`answer_lead`), which comes before an answer, not after it (Llama 2's "▁",
    "▁", "</s>" is "▁", "</s>"); None as `_assistant_tokens_after`.

    The lead ends where the text the tokens add after `start` passes it, not where its own
    tokens would: one token may hold the lead and the closing's first characters (Llama 2's
    vocabulary has "▁▁", and its empty answer is "▁▁", "</s>"), whose rest is then encoded
    as it goes on after an answer ("▁", "</s>")."""
    end = _assistant_tokens_after(tokenizer, prompt, "", start)
    lead = tokenizer.answer_lead(prompt) if end else ""
    if not lead:
        return end
    for n in range(1, len(end) + 1):
        text = tokenizer.decode_continuation(start, end[:n])
        if len(text) >= len(lead):
            if not text.startswith(lead):
                return end  # the tokens do not write the lead first: nothing to leave out
            rest = text[len(lead):]
            return (tokenizer.encode_continuation(rest) if rest else []) + end[n:]
    return end


def _assistant_tokens_after(tokenizer: Any, prompt: list, response: str,
                            start: list[int]) -> list[int] | None:
    """The tokens the model writes after the generation prompt's tokens `start` in the
    conversation `prompt` + `response`: its assistant mask's (`render_chat`), the response
    through its end of turn with any template text between the two (Llama 2's " " after
    "[/INST]", which has no generation prompt: a "▁" token of its own before "(yes)"), as
    transformers' `{% generation %}` spans everything the model generates; None when the
    rendering does not begin with `start`."""
    full, mask = tokenizer.render_chat(list(prompt) + [{"role": "assistant", "content": response}])
    if full[:len(start)] != start:
        return None
    return [t for t, m in zip(full[len(start):], mask[len(start):]) if m]


def chat_demonstration(tokenizer: Any, messages: list) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation to fine-tune on. Each assistant turn is
    tokenized as the model writes it when asked: after the tokens of the conversation before
    it, rendered with the generation prompt (what `sample`, PPO and `chat` give the model), as
    `encode_response` does; the loss is on the turn and its end of turn. Rendering the whole
    conversation at once would let BPE merge the template's "\n" with a reply's leading
    newline or spaces into a token the model never writes after the generation prompt's "\n".
    Messages after the last assistant turn hold nothing to learn and are left out."""
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = messages[:i]
        start, seen = tokenizer.render_chat(before, add_generation_prompt=True)
        # The template text since the last assistant turn's end of turn (all of `start` before
        # the first): the turns before it are in `ids` already, as the model wrote them.
        since = len(seen) - seen[::-1].index(1) if 1 in seen else 0
        ids += start[since:]
        mask += [0] * (len(start) - since)
        answer = _response_after(tokenizer, before, m["content"], start)
        ids += answer
        mask += [1] * len(answer)
    return ids, mask


def demonstration(tokenizer: Any, record: dict, path: str | Path | None = None,
                  line: int | None = None) -> Example:
    """Tokens of one SFT record with the loss on the assistant's tokens only."""
    if "messages" in record and ("prompt" in record or "completion" in record):
        # Which one would be trained on is a guess: refuse, as rankings refuse 'ranked' beside
        # 'chosen'/'rejected'.
        raise UserError("has both 'messages' and 'prompt'/'completion'; give one of them",
                        path=path, line=line)
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list):
            raise UserError("must be a list of messages", path=path, line=line, field="messages")
        _check_messages_at(msgs, path, line)
        if not any(m["role"] == "assistant" for m in msgs):
            # A prompt whose responses are ranked (`chosen`, `ranked`): a reward model's data.
            raise _preference_data(record, path, line) or UserError(
                "needs at least one assistant message", path=path, line=line, field="messages")
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and m.get("weight") == 0:
                # OpenAI's fine-tuning format marks a turn not to learn so; trained on like
                # every other, it would be learned without a word.
                raise UserError("is 0, OpenAI's mark of a turn not to train on; gptlab trains "
                                "on every assistant message of 'messages': write each turn to "
                                "learn as a record of its own, the messages before it in "
                                "'prompt' and it in 'completion'", path=path, line=line,
                                field=f"messages[{i}].weight")
            if m["role"] == "assistant" and not m["content"].strip():
                # Every assistant turn is trained on; an empty one, like an empty completion,
                # would teach the model to answer with nothing but its end of turn.
                raise UserError("must be a non-empty string", path=path, line=line,
                                field=f"messages[{i}].content")
            if m["role"] == "user" and not m["content"].strip():  # as a prompt's last turn
                raise UserError("is empty or only whitespace; a user turn must ask something",
                                path=path, line=line, field=f"messages[{i}].content")
        try:
            ids, mask = chat_demonstration(tokenizer, msgs)
        except UserError as e:  # the template may refuse a conversation (roles must alternate)
            raise (e.at(path, line) if path else e) from None
        return Example(ids, mask, record.get("id"), line)
    if "prompt" not in record or "completion" not in record:
        raise _not_a_demonstration(record, path, line)
    if isinstance(record.get("label"), bool):
        # TRL's unpaired preference: SFT would train on the completions marked bad as well.
        raise UserError("is a preference label (TRL's unpaired preference): SFT trains on every "
                        "completion; keep the rows labeled true and drop 'label'", path=path,
                        line=line, field="label")
    prompt = prompt_of(record, path, line)
    said = record["completion"]
    if isinstance(said, list) and said and isinstance(said[0], dict) \
            and said[0].get("weight") == 0:
        # As in 'messages': a turn OpenAI's format marks not to learn, which the completion
        # (all a record trains on) was trained on without a word.
        raise UserError("is 0, OpenAI's mark of a turn not to train on; SFT trains on the "
                        "completion of every record: leave the record out", path=path,
                        line=line, field="completion[0].weight")
    completion = _response_text(said, prompt, path, line, "completion")
    try:
        p = encode_prompt(tokenizer, prompt)
        c = encode_response(tokenizer, completion, prompt)
    except UserError as e:  # the template may refuse a conversation (roles must alternate)
        raise (e.at(path, line) if path else e) from None
    return Example(p + c, [0] * len(p) + [1] * len(c), record.get("id"), line)


def _not_a_demonstration(record: dict, path: str | Path | None, line: int | None) -> UserError:
    """Why `record` is no demonstration, with what to do with TRL's other dataset types."""
    if "text" in record:
        return UserError("is language-modeling text, which SFT does not train on (its loss is "
                         "on answers only): continue pretraining on it (gptlab pretrain "
                         "--model DIR --data FILE), or write 'prompt' and 'completion'",
                         path=path, line=line, field="text")
    preference = _preference_data(record, path, line)
    if preference is not None:
        return preference
    if "conversations" in record:
        return _sharegpt(path, line)
    # Name the half of a prompt-completion pair that is missing, where the other half is there.
    missing = [k for k in ("prompt", "completion") if k not in record]
    field = missing[0] if len(missing) == 1 else None
    return UserError("needs 'prompt' and 'completion' fields, or 'messages'"
                     + fields_instead(record, tuple(missing) + ("messages",)), path=path,
                     line=line, field=field)


def _preference_data(record: dict, path: str | Path | None, line: int | None
                     ) -> UserError | None:
    """The error for a line of rankings (`chosen`/`rejected`, or `ranked`) given as a
    demonstration, naming the field that shows it; None for a line that holds neither."""
    for key, what, best in (("chosen", "'chosen'/'rejected' (preference data)", "chosen"),
                            ("rejected", "'chosen'/'rejected' (preference data)", "chosen"),
                            ("ranked", "'ranked' (responses ranked best first)", "best")):
        if key in record:
            return UserError(f"has {what}, which is a reward model's data: train one on it with "
                             f"gptlab reward, or write the {best} response as 'completion' for "
                             f"SFT", path=path, line=line, field=key)
    return None


def _sharegpt(path: str | Path | None, line: int | None) -> UserError:
    """The error for a ShareGPT line (`conversations` of {"from", "value"} messages)."""
    return UserError("is ShareGPT's key; gptlab reads a conversation from 'messages': rename "
                     "'conversations' to 'messages' and, in each message, 'from' to 'role' "
                     "and 'value' to 'content' (roles system, user and assistant, not human "
                     "and gpt)", path=path, line=line, field="conversations")


def read_demonstrations(path: str | Path, tokenizer: Any, context: int,
                        skips: SkipCounter | None = None) -> list[Example]:
    """SFT examples from JSONL; records longer than the context are skipped and counted."""
    skips = skips if skips is not None else SkipCounter()
    out = []
    rows = read_jsonl(path)
    if not rows:  # said as the other readers say it, not as demonstrations all skipped
        raise no_records(path, "demonstrations")
    for row in rows:
        ex = demonstration(tokenizer, row, record_file(row, path), row.get("_line"))
        ex.file = row.get("_file")
        if len(ex.ids) > context:
            skips.add(f"longer than the context of {context}")
            continue
        out.append(ex)
    if not out:
        raise UserError("no usable demonstrations" + (f" ({skips.report('records')})"
                                                      if skips.total else ""), path=path)
    return out


def read_prompts(path: str | Path) -> list[dict]:
    """Prompt records (every field kept); each needs `prompt` or `messages`."""
    rows = read_jsonl(path)
    for row in rows:
        prompt_of(row, record_file(row, path), row.get("_line"))
    if not rows:
        raise no_records(path, "prompts")
    return rows


def responses_of(row: dict, path: str | Path | None = None, line: int | None = None) -> list[str]:
    """The `responses` of a samples line: a non-empty list of strings."""
    if "responses" not in row:
        raise UserError("missing required field" + fields_instead(row, ("responses",)),
                        path=path, line=line, field="responses")
    responses = row["responses"]
    if not isinstance(responses, list) or not responses:
        raise UserError(f"must be a non-empty list of response strings, got "
                        f"{_json_kind(responses)}", path=path, line=line,
                        field="responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise UserError(f"item {i + 1} must be a response string, got {_json_kind(r)}",
                            path=path, line=line, field="responses")
        _checked_text(r, path, line, f"responses[{i}]")
    return responses


def _json_kind(v: Any) -> str:
    """How JSON names the type of `v` (for messages about a file's content)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string" if v else "an empty string"
    if isinstance(v, list):
        return "a list" if v else "an empty list"
    return "an object"


def ranking_of(row: dict, path: str | Path | None = None, line: int | None = None) -> Ranking:
    """Validate one rankings line: K ≥ 2 distinct, non-empty responses in ≥ 2 levels.

    An item of `ranked` is a response or a list of responses that are equally good (tied);
    `chosen` and `rejected` may be TRL's conversational forms (see the module's docstring).
    """
    implicit = "prompt" not in row and "messages" not in row and "chosen" in row \
        and "rejected" in row
    if "ranked" not in row and not ("chosen" in row and "rejected" in row) \
            and any(k in row for k in ("prompt", "messages", "chosen", "rejected")):
        # What such a line lacks is the ranking: a conversation to imitate (SFT's `messages`,
        # ending on the assistant) is not to be told that it must end on a user turn, and a
        # lone `chosen` is half of TRL's implicit-prompt pair, which needs no prompt.
        raise _not_a_ranking(row, path, line)
    prompt = None if implicit else prompt_of(row, path, line)
    if "ranked" in row and ("chosen" in row or "rejected" in row):
        raise UserError("has both 'ranked' and 'chosen'/'rejected'; give one of them", path=path,
                        line=line, field="ranked")
    if "ranked" not in row:  # chosen and rejected: a row with neither was refused above
        return _pair_ranking(row, prompt, implicit, path, line)
    items, fname = row["ranked"], "ranked"
    expected = "a list, best first, of responses or lists of tied responses"
    if not isinstance(items, list):
        raise UserError(f"must be {expected}", path=path, line=line, field=fname)
    ranked: list[str] = []
    groups: list[int] = []
    for level, item in enumerate(items):
        group = item if isinstance(item, list) else [item]
        if not group:
            raise UserError(f"item {level + 1} is an empty list of tied responses", path=path,
                            line=line, field=fname)
        if not all(isinstance(r, str) for r in group):
            raise UserError(f"item {level + 1} must be a response string or a list of "
                            f"tied response strings", path=path, line=line, field=fname)
        ranked += group
        groups += [level] * len(group)
    if len(ranked) < 2:
        raise UserError(f"needs at least 2 responses, got {len(ranked)}", path=path, line=line,
                        field=fname)
    if any(not r.strip() for r in ranked):
        raise UserError("a response is empty", path=path, line=line, field=fname)
    for r in ranked:
        _checked_text(r, path, line, fname)
    if len(set(ranked)) != len(ranked):
        raise UserError("has duplicate responses (merge them before ranking)", path=path,
                        line=line, field=fname)
    if len(items) < 2:
        raise UserError("needs at least 2 levels of preference; all responses are tied",
                        path=path, line=line, field=fname)
    return Ranking(prompt, ranked, row.get("id"), line, groups)


def _pair_ranking(row: dict, prompt: Any, implicit: bool, path: str | Path | None,
                  line: int | None) -> Ranking:
    """A `chosen`/`rejected` line as a ranking of two, chosen first. An error names the one
    that is bad (`chosen` or `rejected`, or a message inside it) and says what is wrong: not a
    response, empty, or the same response as the other."""
    pair = {"chosen": row["chosen"], "rejected": row["rejected"]}
    for name, r in pair.items():
        if not (isinstance(r, str) or _is_conversation(r)):
            raise UserError(f"must be a response string (or a list of chat messages), got "
                            f"{_json_kind(r)}", path=path, line=line, field=name)
    if implicit and not all(_is_conversation(r) for r in pair.values()):
        # A common prefix of two texts is no prompt: it may end inside a word.
        raise UserError("is missing: write the prompt in 'prompt' and the two responses "
                        "after it in 'chosen' and 'rejected', or write them as "
                        "conversations (lists of messages) that share their prompt turns",
                        path=path, line=line, field="prompt")
    if implicit:
        prompt, pair["chosen"], pair["rejected"] = _implicit_prompt(
            pair["chosen"], pair["rejected"], path, line)
    texts = []
    for name, r in pair.items():
        if isinstance(r, str) and not r.strip():
            # A reward model would learn to score a response that says nothing.
            said = "is empty" if not r else "is only whitespace"
            raise UserError(f"{said}; a ranked response must say something", path=path,
                            line=line, field=name)
        texts.append(_response_text(r, prompt, path, line, name))
    if texts[0] == texts[1]:
        raise UserError("is the same response as 'chosen'; a pair ranks two different "
                        "responses (write the worse one here, or drop the line)", path=path,
                        line=line, field="rejected")
    return Ranking(prompt, texts, row.get("id"), line, [0, 1])


def _not_a_ranking(row: dict, path: str | Path | None, line: int | None) -> UserError:
    """Why `row` is no ranking; TRL's per-response labels cannot train this reward model."""
    rank_it = ("a reward model learns from responses to one prompt ranked against each other: "
               "write 'chosen' and 'rejected' (a better and a worse response to the prompt) or "
               "'ranked' (best first)")
    if "completion" in row and "label" in row:
        return UserError(f"labels one completion (TRL's unpaired preference); {rank_it}",
                         path=path, line=line, field="label")
    if "completions" in row and "labels" in row:
        return UserError(f"labels the steps of one completion (TRL's stepwise supervision); "
                         f"{rank_it}", path=path, line=line, field="labels")
    # Name the half of a chosen/rejected pair that is missing, where the other half is there.
    missing = [k for k in ("chosen", "rejected") if k not in row]
    field = missing[0] if len(missing) == 1 else None
    return UserError("needs 'ranked' (best first) or 'chosen' and 'rejected'"
                     + fields_instead(row, ("ranked", *missing)), path=path, line=line,
                     field=field)


def read_rankings(path: str | Path) -> list[Ranking]:
    rows = read_jsonl(path)
    if not rows:
        raise no_records(path, "rankings")
    rankings = []
    for r in rows:
        rankings.append(ranking_of(r, record_file(r, path), r.get("_line")))
        rankings[-1].file = r.get("_file")
    return rankings
