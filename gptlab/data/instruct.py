"""The InstructGPT data formats: demonstrations, prompts, samples and rankings.

- demonstrations (SFT): `{"prompt": ..., "completion": ...}` or `{"messages": [...]}`
- prompts (sample, PPO): `{"prompt": ...}` or `{"messages": [...]}` ending on a user turn
- samples: `{"id": ..., "prompt": ..., "responses": [...]}` (other prompt fields carried along),
  `responses` a non-empty list of strings
- rankings: `{"prompt": ..., "ranked": [best, ..., worst]}` with K ≥ 2 distinct responses,
  an item being a response or a list of responses tied with each other (at least 2 levels),
  or `{"prompt": ..., "chosen": ..., "rejected": ...}` (K = 2)

A prompt is tokenized on its own and a response after it, exactly as generation sees them, so
the tokens trained on are the tokens sampled. A plain-text response ends with EOS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.errors import UserError
from gptlab.io import read_jsonl
from gptlab.tokenizer import check_messages, check_text


@dataclass
class Example:
    """Token ids and a 0/1 mask of the tokens the loss is taken on."""
    ids: list[int]
    loss_mask: list[int]
    id: Any = None
    line: int | None = None        # the record's line in its file


@dataclass
class Ranking:
    prompt: Any                    # text or a list of chat messages
    ranked: list[str]              # best first, tied responses next to each other
    id: Any = None
    line: int | None = None
    groups: list[int] | None = None  # per response its level (0 = best, equal = tied)

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
        if not self.counts:
            return ""
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total} {what}: {parts}"


def _checked_messages(msgs: list, path: str | Path, line: int | None) -> list:
    """`msgs` if every message has a known role and string content that a tokenizer can encode
    (the chat template's own checks, here naming the file, line and field)."""
    try:
        check_messages(msgs)
    except UserError as e:
        raise (e.at(path, line) if path else e) from None
    for i, m in enumerate(msgs):
        _checked_text(m["content"], path, line, f"messages[{i}].content")
    return msgs


def _checked_text(text: str, path: str | Path, line: int | None, field: str) -> str:
    """`text` if a tokenizer can encode it, else a UserError naming file, line and field. Read
    from a file, whose bytes were UTF-8, a lone surrogate came from a JSON `\\u` escape."""
    try:
        return check_text(text, field=field, from_json=bool(path))
    except UserError as e:
        raise UserError(e.message, path=path or None, line=line, field=field) from None


def prompt_of(record: dict, path: str | Path = "", line: int | None = None) -> Any:
    """The prompt of a record: its `prompt` text or its `messages`, which end on a user turn."""
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise UserError("must be a non-empty string", path=path, line=line, field="prompt")
        return _checked_text(record["prompt"], path, line, "prompt")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError("must be a non-empty list of messages", path=path, line=line,
                            field="messages")
        _checked_messages(msgs, path, line)
        if msgs[-1]["role"] != "user":
            # Rendered for generation, a final assistant turn would be part of the prompt: the
            # model would be shown the answer it is asked for.
            raise UserError(f"must end on a user turn, not {msgs[-1]['role']!r}", path=path,
                            line=line, field="messages")
        return msgs
    raise UserError("needs a 'prompt' or a 'messages' field", path=path, line=line)


def encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """Tokens of a prompt, ready for the response to follow."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
    ids, _ = tokenizer.render_chat(prompt, add_generation_prompt=True)
    return ids


def encode_response(tokenizer: Any, response: str, prompt: Any) -> list[int]:
    """Tokens of a response, closed by EOS (the chat template's end of turn for chat prompts),
    as the model writes them after the prompt's tokens."""
    if isinstance(prompt, str):
        return tokenizer.encode(response) + [tokenizer.eos_id]
    start = encode_prompt(tokenizer, prompt)
    answer = _assistant_tokens_after(tokenizer, prompt, response, start)
    if answer is not None:
        return answer
    # BPE merged the generation prompt's last characters with the response's first ones (its
    # "\n" and a response's "\n\n" are one token): the prompt's own tokens come first, so the
    # response is tokens of its own, then the template's end of turn.
    end = _assistant_tokens_after(tokenizer, prompt, "", start)
    return tokenizer.encode(response) + (end if end is not None else [tokenizer.eos_id])


def _assistant_tokens_after(tokenizer: Any, prompt: list, response: str,
                            start: list[int]) -> list[int] | None:
    """The assistant tokens (the response and its end of turn) of the conversation `prompt` +
    `response` that follow the generation prompt's tokens `start`; None when its rendering
    does not begin with `start`."""
    full, mask = tokenizer.render_chat(list(prompt) + [{"role": "assistant", "content": response}])
    if full[:len(start)] != start:
        return None
    return [t for t, m in zip(full[len(start):], mask[len(start):]) if m]


def demonstration(tokenizer: Any, record: dict, path: str | Path = "",
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
        if not any(m["role"] == "assistant" for m in _checked_messages(msgs, path, line)):
            raise UserError("needs at least one assistant message", path=path, line=line,
                            field="messages")
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and not m["content"].strip():
                # Every assistant turn is trained on; an empty one, like an empty completion,
                # would teach the model to answer with nothing but its end of turn.
                raise UserError("must be a non-empty string", path=path, line=line,
                                field=f"messages[{i}].content")
        try:
            ids, mask = tokenizer.render_chat(msgs)
        except UserError as e:  # the template may refuse a conversation (roles must alternate)
            raise (e.at(path, line) if path else e) from None
        return Example(ids, list(mask), record.get("id"), line)
    if "prompt" not in record or "completion" not in record:
        raise UserError("needs 'prompt' and 'completion' fields, or 'messages'", path=path,
                        line=line)
    if not isinstance(record["completion"], str) or not record["completion"].strip():
        # An empty one would teach the model to answer with nothing but EOS.
        raise UserError("must be a non-empty string", path=path, line=line, field="completion")
    _checked_text(record["completion"], path, line, "completion")
    p = encode_prompt(tokenizer, prompt_of(record, path, line))
    c = encode_response(tokenizer, record["completion"], record["prompt"])
    return Example(p + c, [0] * len(p) + [1] * len(c), record.get("id"), line)


def read_demonstrations(path: str | Path, tokenizer: Any, context: int,
                        skips: SkipCounter | None = None) -> list[Example]:
    """SFT examples from JSONL; records longer than the context are skipped and counted."""
    skips = skips if skips is not None else SkipCounter()
    out = []
    for row in read_jsonl(path):
        ex = demonstration(tokenizer, row, path, row.get("_line"))
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
        prompt_of(row, path, row.get("_line"))
    if not rows:
        raise UserError("no prompts in the file", path=path)
    return rows


def responses_of(row: dict, path: str | Path = "", line: int | None = None) -> list[str]:
    """The `responses` of a samples line: a non-empty list of strings."""
    if "responses" not in row:
        raise UserError("missing required field", path=path or None, line=line,
                        field="responses")
    responses = row["responses"]
    if not isinstance(responses, list) or not responses:
        raise UserError(f"must be a non-empty list of response strings, got "
                        f"{_json_kind(responses)}", path=path or None, line=line,
                        field="responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise UserError(f"item {i + 1} must be a response string, got {_json_kind(r)}",
                            path=path or None, line=line, field="responses")
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


def ranking_of(row: dict, path: str | Path = "", line: int | None = None) -> Ranking:
    """Validate one rankings line: K ≥ 2 distinct, non-empty responses in ≥ 2 levels.

    An item of `ranked` is a response or a list of responses that are equally good (tied).
    """
    prompt = prompt_of(row, path, line)
    if "ranked" in row and ("chosen" in row or "rejected" in row):
        raise UserError("has both 'ranked' and 'chosen'/'rejected'; give one of them", path=path,
                        line=line, field="ranked")
    if "ranked" in row:
        items, fname = row["ranked"], "ranked"
        expected = "a list, best first, of responses or lists of tied responses"
    elif "chosen" in row and "rejected" in row:
        items, fname = [row["chosen"], row["rejected"]], "chosen/rejected"
        expected = "response strings"
        if not all(isinstance(r, str) for r in items):
            raise UserError(f"must be {expected}", path=path, line=line, field=fname)
    else:
        raise UserError("needs 'ranked' (best first) or 'chosen' and 'rejected'", path=path,
                        line=line)
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


def read_rankings(path: str | Path) -> list[Ranking]:
    rows = read_jsonl(path)
    if not rows:
        raise UserError("no rankings in the file", path=path)
    return [ranking_of(r, path, r.get("_line")) for r in rows]
