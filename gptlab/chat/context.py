"""Context management for multi-turn chat: the conversation as a stack of turns.

A conversation is an optional system message, then turns: a user message and the assistant's
reply. When the rendered conversation no longer fits the model's context (minus the room kept
for the reply), the oldest turns are popped off the bottom of the stack until it fits. The
system message (the instructions) and the latest user message (the question being answered)
are never dropped; if those two alone do not fit, no amount of forgetting helps: that is a
`TurnTooLong` error, whose advice for more room the caller gives (`more_room`: a lower
--max-new-tokens, or a larger --max-context-tokens where the chat lowered it).
"""
from __future__ import annotations

from typing import Callable, Sequence

from gptlab.errors import UserError

CountTokens = Callable[[list[dict]], int]


class TurnTooLong(UserError):
    """The system message plus the latest user message alone exceed the budget."""


def split_turns(messages: Sequence[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(head, turns): the head is what precedes the first user message (normally the system
    message), never dropped; each turn is a user message and what follows it up to the next
    user message (normally one assistant reply)."""
    head: list[dict] = []
    turns: list[list[dict]] = []
    for m in messages:
        if m.get("role") == "user":
            turns.append([m])
        elif turns:  # replies (or a system message mid-conversation) belong to their turn
            turns[-1].append(m)
        else:
            head.append(m)
    return head, turns


def _lower_max_new_tokens(needed: int) -> str:
    return "lower max_new_tokens (--max-new-tokens)"


def fit_messages(messages: Sequence[dict], count_tokens: CountTokens, budget: int,
                 more_room: Callable[[int], str] | None = None) -> tuple[list[dict], int]:
    """Drop the fewest oldest user/assistant turns that make `count_tokens(kept) <= budget`.

    `count_tokens` measures a message list as the model will see it (rendered with the chat
    template and its generation prompt); `budget` is the context minus the tokens reserved for
    the reply. Returns (kept messages, number of turns dropped). Raises `TurnTooLong` when the
    system message and the last turn alone are over budget; its advice after "shorten it" is
    `more_room(tokens needed)` ("" where only shortening helps), by default to lower
    max_new_tokens.
    """
    head, turns = split_turns(messages)
    if not turns:
        raise UserError("the conversation has no user message to answer", field="messages")

    def kept(dropped: int) -> list[dict]:
        return head + [m for turn in turns[dropped:] for m in turn]

    # Each turn adds tokens (its role markers at least), so the count falls as turns are
    # dropped: the fewest drops that fit are found by bisection, in 2 + log2(turns) renders,
    # where dropping one at a time rendered the conversation once a turn dropped (a chat of
    # 200 turns, 200 renders of up to 200 turns). The result is the same.
    n = count_tokens(kept(0))
    if n <= budget:
        return kept(0), 0
    last = len(turns) - 1  # the latest turn, the question, stays
    if last:
        n = count_tokens(kept(last))
    if n > budget:
        around = "the system prompt and the chat template" if head else "the chat template"
        more = (more_room or _lower_max_new_tokens)(n)
        raise TurnTooLong(f"the message needs {n} tokens with {around}, but only "
                          f"{budget} fit (the context minus the tokens kept for the reply); "
                          f"shorten it{', or ' + more if more else ''}", field="message")
    over, fits = 0, last  # dropping `over` turns is too few, dropping `fits` is enough
    while fits - over > 1:
        mid = (over + fits) // 2
        if count_tokens(kept(mid)) <= budget:
            fits = mid
        else:
            over = mid
    return kept(fits), fits
