"""`gptlab serve`: a chat model behind an OpenAI-compatible HTTP API, and a web page to talk to it.

Endpoints (FastAPI, served by uvicorn):

- `GET /v1/models`: the one model served, under its name (`--name`, by default its directory's);
  `GET /v1/models/{name}`: that model (OpenAI's retrieve), another name a 404.
- `POST /v1/chat/completions`: OpenAI's chat completions, whole or streamed as server-sent
  events (`"stream": true`, ended by `data: [DONE]`, usage in a last chunk with
  `"stream_options": {"include_usage": true}`). A conversation is stateless, as in OpenAI's API:
  the client sends the history each time. One that outgrows the context loses its oldest turns
  first, as `gptlab chat` fits it (`fit_messages`); the system message and the last user message
  are never dropped, and where those alone do not fit, the request is refused
  (`context_length_exceeded`). The response's `x-gptlab-dropped-turns` header counts the turns
  left out.
- `POST /v1/completions`: OpenAI's text completions, whole or, for one prompt, streamed as
  chat completions stream (`text_completion` chunks whose `choices[0].text` join to the whole
  completion): each prompt continued as raw text, as `gptlab generate` continues it (the
  built-in world's SQL model is served so: its prompt is the schema, the question and `SQL:`).
- `GET /` (and `HEAD /`): a chat page (one HTML file, no outside assets) that streams from the
  API.
- `GET /health`: `{"status": "ok"}`.

The request's settings are OpenAI's: `max_tokens` (or `max_completion_tokens`), `temperature`
(0 is greedy decoding, as OpenAI's API reads it), `top_p`, `n`, `stop` (a string or up to 4),
`seed`. A request without a seed takes the server's `--seed` plus the number of requests before
it: a server started alike answers alike, yet two requests are not sampled alike. A setting that
would change the answer and that gptlab does not do (`tools`, `logprobs`, `response_format`
other than text, penalties, `logit_bias`) is refused, and so is a field OpenAI's API does not
know, as OpenAI's own refuses it: no setting is ignored without a word; so is a message's key
other than `role` and `content` (a `name`, which no chat template renders, included). A
`developer` message is read as a system message (OpenAI's new name for it). Errors have
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with status 400 (a bad
request, its message naming the field, as the `openai` client shows only the message), 404
(another model's name, an unknown path), 405 (a method a path does not take) or 500. No
website's page may call the API from a browser unless `--allow-origin` names it (CORS).
Requests are answered one at a time (the model is one); a streamed completion whose client goes
away stops at its next token, freeing the model for the next request.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, AsyncIterator, Callable

# The serve extra (pip install gptlab[serve]); FastAPI reads the handlers' annotations by name.
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from gptlab.chat.context import TurnTooLong, fit_messages
from gptlab.chat.terminal import StreamedReply, reply_text
from gptlab.engine import Generation, SamplingParams, generate
from gptlab.errors import UserError
from gptlab.stop_strings import StopStrings, check_stop_strings, cut_at_stop
from gptlab.tokenizer import check_messages, check_text

# OpenAI's chat request fields gptlab honours, and those it accepts at the value that changes
# nothing.
HONOURED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
            "n", "stop", "seed", "stream", "stream_options", "user"}
NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,),
           "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",),
           "parallel_tool_calls": (False, True), "response_format": ({"type": "text"},),
           "store": (False,), "metadata": ({},)}
# The same of a text completion (`/v1/completions`): a prompt or a list of them for messages.
TEXT_HONOURED = HONOURED - {"messages", "max_completion_tokens"} | {"prompt"}
TEXT_NEUTRAL = {**{k: NEUTRAL[k] for k in ("frequency_penalty", "presence_penalty",
                                            "logit_bias")},
                "logprobs": (None,), "echo": (False,), "suffix": (None, ""), "best_of": (1,)}
# A message's keys: those honoured, and OpenAI's others at the value that changes nothing (a
# `name` is not rendered by chat templates; tool calls are refused by `check_messages`).
MESSAGE_HONOURED = {"role", "content"}
MESSAGE_NEUTRAL = {"name": ("",), "tool_calls": ([],), "function_call": (), "tool_call_id": (),
                   "refusal": ()}
MAX_N = 16  # completions of one request (the batch of one generation)
MAX_STOP = 4  # as OpenAI's API


@dataclass
class ServeConfig:
    """Settings of `gptlab serve`."""

    model: str = ""
    name: str | None = None  # the model's id in the API (default: its directory's name)
    host: str = "127.0.0.1"
    port: int = 8000
    max_new_tokens: int = 256  # a request's reply when it gives no max_tokens, and its ceiling
    max_context_tokens: int | None = None
    seed: int = 0
    device: str = "auto"
    allow_origins: tuple[str, ...] = ()  # websites whose pages may call the API (CORS; "*": any)


class APIError(Exception):
    """A request refused, as OpenAI's API says it: status, message, type, param, code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        # The openai client shows only the message: it names the field too.
        if param is not None and not re.search(rf"(?<![\w.\]]){re.escape(param)}(?![\w\[])",
                                               message):
            message = f"{param}: {message}"
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = (message, param, status,
                                                                       code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    @classmethod
    def of(cls, e: UserError, **kw: Any) -> "APIError":
        return cls(e.message, e.field, **kw)


def model_not_found(name: str, served: str) -> APIError:
    return APIError(f"The model {name!r} does not exist; this server serves {served!r}", "model",
                    status=404, code="model_not_found")


@dataclass
class Request:
    """A completion request's settings, checked (a text completion's `messages` are [])."""

    messages: list[dict]
    params: SamplingParams
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    max_tokens_field: str  # the field that sets the reply's length: max_(completion_)tokens


def _int(body: dict, key: str, low: int, high: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        within = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise APIError(f"{key} must be an integer {within}, got {json.dumps(v)}", key)
    return v


def _number(body: dict, key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    # Python's JSON reads NaN and Infinity, which are no JSON numbers.
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise APIError(f"{key} must be a number, got {json.dumps(v)}", key)
    return float(v)


def _bool(obj: dict, key: str, field: str | None = None) -> bool:
    """A JSON boolean (false where left out): no 0, no "true"."""
    v = obj.get(key)
    if v is not None and not isinstance(v, bool):
        raise APIError(f"{field or key} must be true or false, got {json.dumps(v)}", field or key)
    return bool(v)


def _string(body: dict, key: str) -> str | None:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise APIError(f"{key} must be a string, got {json.dumps(v)}", key)
    return v


def _same(value: Any, neutral: Any) -> bool:
    """JSON's equality, where Python's holds false == 0."""
    return type(value) is type(neutral) and value == neutral


def _check_fields(obj: Any, honoured: set[str], neutral: dict[str, tuple],
                  where: str = "") -> dict:
    """`obj` (the request body, or where `where` names it, one of its objects), a JSON object
    whose every field is honoured or null or at a value that changes nothing; an `APIError`
    names the first that is not."""
    if not isinstance(obj, dict):
        raise APIError(f"{where.rstrip('.') or 'the request body'} must be a JSON object")
    for key, value in obj.items():
        field = where + key
        if key in honoured:
            continue
        if key not in neutral:
            raise APIError(f"Unrecognized request argument supplied: {field}", field)
        if value is not None and not any(_same(value, v) for v in neutral[key]):
            accepted = " or ".join(json.dumps(v) for v in (None, *neutral[key]))
            raise APIError(f"{field} {json.dumps(value)} is not supported by gptlab serve (it "
                           f"accepts only {accepted})", field)
    return obj


def parse_request(body: Any, max_new_tokens: int, stop_strings: tuple[str, ...],
                  stop_ids: tuple[int, ...]) -> Request:
    """Check a chat completion request's JSON body; an `APIError` names the field."""
    body = _check_fields(body, HONOURED, NEUTRAL)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list of {role, content} messages",
                       "messages")
    # `developer` is OpenAI's newer name for the system message.
    messages = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer"
                else m for m in messages]
    try:
        check_messages(messages, roles_read=("system", "developer", "user", "assistant"))
        for i, m in enumerate(messages):
            check_text(m["content"], field=f"messages[{i}].content")
            _check_fields(m, MESSAGE_HONOURED, MESSAGE_NEUTRAL, f"messages[{i}].")
    except UserError as e:
        raise APIError.of(e) from None
    if messages[-1]["role"] != "user":
        raise APIError(f"the last message must be the user's to answer, not "
                       f"{messages[-1]['role']!r}", f"messages[{len(messages) - 1}].role")
    return _settings(body, max_new_tokens, stop_strings, stop_ids, messages)


def _settings(body: dict, max_new_tokens: int, stop_strings: tuple[str, ...],
              stop_ids: tuple[int, ...], messages: list[dict]) -> Request:
    """The sampling settings of a request, chat or text completion, checked."""
    tokens_field = ("max_completion_tokens" if body.get("max_completion_tokens") is not None
                    else "max_tokens")
    tokens = _int(body, tokens_field, 1)
    if tokens is not None and tokens > max_new_tokens:
        raise APIError(f"{tokens_field}: at most {max_new_tokens} new tokens (the server's "
                       f"--max-new-tokens), got {tokens}", tokens_field)
    temperature = _number(body, "temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise APIError(f"temperature must be from 0 to 2, got {json.dumps(body['temperature'])}",
                       "temperature")
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(f"top_p must be in (0, 1], got {json.dumps(body['top_p'])}", "top_p")
    greedy = temperature == 0
    if greedy and top_p is not None and top_p < 1:
        raise APIError("temperature 0 is greedy decoding, which top_p would not change; "
                       "leave one of them out", "top_p")
    try:
        params = SamplingParams(max_new_tokens=tokens or max_new_tokens, greedy=greedy,
                                temperature=1.0 if temperature in (None, 0) else temperature,
                                top_p=None if greedy or top_p == 1 else top_p,
                                stop_ids=stop_ids)
    except UserError as e:
        raise APIError.of(e) from None
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop  # OpenAI's API takes one as a string
    try:
        stop = check_stop_strings(stop)
    except UserError as e:
        raise APIError(f"stop: {e.message}", "stop") from None
    if len(stop) > MAX_STOP:
        raise APIError(f"stop takes at most {MAX_STOP} texts, got {len(stop)}", "stop")
    n = _int(body, "n", 1, MAX_N) or 1
    stream = _bool(body, "stream")
    if stream and n > 1:
        raise APIError("a streamed request has one completion (n 1)", "n")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(f"stream_options must be an object of include_usage alone, got "
                       f"{json.dumps(options)}", "stream_options")
    if options and not stream:
        raise APIError("stream_options is only allowed when stream is true", "stream_options")
    include_usage = _bool(options, "include_usage", "stream_options.include_usage")
    seed = _int(body, "seed", -2**63)
    _string(body, "user")
    return Request(messages, params, n, tuple(dict.fromkeys(stop_strings + stop)), seed,
                   stream, include_usage, tokens_field)


class ChatServer:
    """One model and tokenizer, answering chat completion requests one at a time."""

    def __init__(self, model: Any, tokenizer: Any, cfg: ServeConfig):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.name = cfg.name or Path(cfg.model).name or "gptlab"
        stop_ids, self.template_stops = tokenizer.reply_stops
        self.stop_ids = tuple(sorted(stop_ids))
        SamplingParams(max_new_tokens=cfg.max_new_tokens)  # checked at start
        if cfg.max_context_tokens is not None and cfg.max_context_tokens < 1:
            raise UserError("must be at least 1", field="max_context_tokens")
        self.context = min(model.config.context, cfg.max_context_tokens or model.config.context)
        if cfg.max_new_tokens >= self.context:
            # Every request without max_tokens would be refused: said at start, as chat says it.
            raise UserError(f"{cfg.max_new_tokens} leaves no room for a conversation in a "
                            f"context of {self.context} tokens; lower it (--max-new-tokens)",
                            field="max_new_tokens")
        self.lock = threading.Lock()
        self.requests = 0

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.tok.render_chat(messages, add_generation_prompt=True)[0])

    def prepare(self, body: Any) -> tuple[Request, list[dict], list[int], int]:
        """The checked request, the messages kept, their ids and the turns dropped."""
        req = parse_request(body, self.cfg.max_new_tokens, tuple(self.template_stops),
                            self.stop_ids)
        # At least 1: max_tokens is at most --max-new-tokens, below the context (checked at
        # start).
        budget = self.context - req.params.max_new_tokens
        try:
            kept, dropped = fit_messages(req.messages, self.count_tokens, budget,
                                         lambda needed: self._shorter_reply(req, needed))
        except TurnTooLong as e:
            raise self._too_long(f", too few for these messages: {e.message}",
                                 "messages") from None
        ids, _ = self.tok.render_chat(kept, add_generation_prompt=True)
        return req, kept, ids, dropped

    def _shorter_reply(self, req: Request, needed: int) -> str:
        """The advice to lower max_tokens where that makes room for `needed` tokens of
        prompt (the context holds them and a reply of 1 token); "" where it would not."""
        most = self.context - needed
        return f"lower {req.max_tokens_field} to at most {most}" if most >= 1 else ""

    def _too_long(self, why: str, param: str) -> APIError:
        """A prompt refused, as OpenAI's API says it, `why` the rest of the sentence."""
        return APIError(f"This model's maximum context length is {self.context} tokens{why}",
                        param, code="context_length_exceeded")

    def _seed(self, req: Request) -> int:
        seed = self.cfg.seed + self.requests if req.seed is None else req.seed
        self.requests += 1
        return seed

    def complete(self, req: Request, kept: list[dict], ids: list[int],
                 gone: threading.Event | None = None) -> dict:
        """A whole chat completion (`chat.completion`); where `gone` is set meanwhile (no one
        waits for it any more), its generation stops at the next token (`_Abandoned`)."""
        with self.lock:
            gen = generate(self.model, [ids] * req.n, req.params, seed=self._seed(req),
                           pad_id=self.tok.pad_id, on_tokens=_abandon_when(gone),
                           stop_when=(StopStrings(self.tok, req.stop, [ids] * req.n)
                                      if req.stop else None))
        choices = [{"index": i, "message": {"role": "assistant",
                                            "content": reply_text(self.tok, kept, ids, gen, i,
                                                                  req.stop)},
                    "logprobs": None, "finish_reason": "stop" if gen.finished[i] else "length"}
                   for i in range(req.n)]
        done = sum(len(t) for t in gen.tokens)
        return {**self._head("chat.completion"), "choices": choices,
                "usage": {"prompt_tokens": len(ids) * req.n, "completion_tokens": done,
                          "total_tokens": len(ids) * req.n + done}}

    def prepare_text(self, body: Any) -> tuple[Request, list[list[int]]]:
        """A text completion request checked, and its prompts' ids: each continued as raw text,
        as `gptlab generate` and `api.generate_text` continue it (BOS first, the tokenizer's
        stop tokens end it, a stop string cuts it)."""
        body = _check_fields(body, TEXT_HONOURED, TEXT_NEUTRAL)
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts \
                or not all(isinstance(p, str) for p in prompts):
            raise APIError("prompt must be a text or a non-empty list of texts", "prompt")
        req = _settings(body, self.cfg.max_new_tokens, (), tuple(sorted(self.tok.stop_ids)), [])
        if req.stream and len(prompts) > 1:
            raise APIError("a streamed request has one completion (one prompt)", "prompt")
        field = "prompt" if isinstance(body["prompt"], str) else "prompt[{}]"
        encoded = []
        for i, text in enumerate(prompts):
            try:
                check_text(text, field=field.format(i))
            except UserError as e:
                raise APIError.of(e) from None
            ids = self.tok.encode(text, bos=self.tok.bos_id is not None)
            if not ids:
                raise APIError(f"{field.format(i)} is empty", field.format(i))
            room = self.context - req.params.max_new_tokens
            if len(ids) > room:  # refused, as OpenAI's API refuses it: not cut
                more = self._shorter_reply(req, len(ids))
                raise self._too_long(
                    f": {field.format(i)} has {len(ids)} tokens, but {req.max_tokens_field} "
                    f"{req.params.max_new_tokens} leaves room for {room}; shorten it"
                    f"{', or ' + more if more else ''}", field.format(i))
            encoded.append(ids)
        return req, encoded

    def complete_text(self, req: Request, prompts: list[list[int]],
                      gone: threading.Event | None = None) -> dict:
        """A whole text completion (`text_completion`), `n` choices a prompt; `gone` as
        `complete` reads it."""
        batch = [ids for ids in prompts for _ in range(req.n)]
        with self.lock:
            gen = generate(self.model, batch, req.params, seed=self._seed(req),
                           pad_id=self.tok.pad_id, on_tokens=_abandon_when(gone),
                           stop_when=StopStrings(self.tok, req.stop, batch) if req.stop else None)
        choices = [{"text": continuation_text(self.tok, ids, gen, i, req.stop), "index": i,
                    "logprobs": None, "finish_reason": "stop" if gen.finished[i] else "length"}
                   for i, ids in enumerate(batch)]
        used, done = sum(len(ids) for ids in batch), sum(len(t) for t in gen.tokens)
        return {**self._head("text_completion", "cmpl"), "choices": choices,
                "usage": {"prompt_tokens": used, "completion_tokens": done,
                          "total_tokens": used + done}}

    def _head(self, kind: str, prefix: str = "chatcmpl") -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.name}

    def stream(self, req: Request, kept: list[dict], ids: list[int]) -> AsyncIterator[str]:
        """A streamed chat completion: `chat.completion.chunk`s, the first the role's, then
        each piece of the reply once no later token can change it (`StreamedReply`)."""
        def choice(text: str, finish: str | None = None) -> dict:
            return {"index": 0, "delta": {} if finish else {"content": text}, "logprobs": None,
                    "finish_reason": finish}
        return self._events(
            req, ids, self._head("chat.completion.chunk"), choice,
            lambda on_text: StreamedReply(self.tok, kept, ids, req.params.stop_ids, on_text,
                                          req.stop),
            lambda gen: reply_text(self.tok, kept, ids, gen, 0, req.stop),
            opening={**choice(""), "delta": {"role": "assistant", "content": ""}})

    def stream_text(self, req: Request, ids: list[int]) -> AsyncIterator[str]:
        """A streamed text completion: `text_completion` chunks, each piece of the text once
        no later token can change it (`StreamedReply`, raw)."""
        def choice(text: str, finish: str | None = None) -> dict:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return self._events(
            req, ids, self._head("text_completion", "cmpl"), choice,
            lambda on_text: StreamedReply(self.tok, [], ids, req.params.stop_ids, on_text,
                                          req.stop, raw=True),
            lambda gen: continuation_text(self.tok, ids, gen, 0, req.stop))

    async def _events(self, req: Request, ids: list[int], head: dict,
                      choice: Callable[..., dict],
                      streamer: Callable[[Callable[[str], None]], StreamedReply],
                      whole: Callable[[Generation], str],
                      opening: dict | None = None) -> AsyncIterator[str]:
        """The server-sent events of a streamed completion of `ids`: the `opening` choice, a
        `choice(piece)` for each piece of text the `streamer` hands on while the tokens come,
        the rest of the `whole` text at the end, `choice("", finish_reason)`, the usage where
        asked, and `[DONE]`. The generation runs in a thread, under the lock. Where the client
        goes away, Starlette cancels (or closes) this generator: its generation then stops at
        its next token, and the lock is freed for the next request."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()  # no one reads this stream any more

        def put(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is closed
                gone.set()

        def run() -> None:
            def on_tokens(rows: list[int], tokens: list[int]) -> None:
                if gone.is_set():
                    raise _Abandoned
                streamed.add(rows, tokens)
            try:
                streamed = streamer(lambda text: put("text", text))
                with self.lock:
                    gen = generate(self.model, [ids], req.params, seed=self._seed(req),
                                   pad_id=self.tok.pad_id, on_tokens=on_tokens,
                                   stop_when=(StopStrings(self.tok, req.stop, [ids])
                                              if req.stop else None))
                # The rest of the text as a whole completion keeps it. Where a later token
                # changed text handed on already (byte fallback's invalid bytes), no chunk
                # takes that back: the streamed text is what was sent.
                text = whole(gen)
                if text.startswith(streamed.given) and len(text) > len(streamed.given):
                    put("text", text[len(streamed.given):])
                put("end", gen)
            except _Abandoned:
                pass
            except Exception as e:  # said in the stream: its status line is sent already
                put("error", e)

        def event(choices: list[dict], **more: Any) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **more})}\n\n"

        threading.Thread(target=run, daemon=True).start()
        try:
            if opening is not None:
                yield event([opening])
            while True:
                kind, value = await pieces.get()
                if kind == "text":
                    yield event([choice(value)])
                    continue
                if kind == "error":
                    error = APIError(str(value), status=500, kind="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                gen = value
                yield event([choice("", "stop" if gen.finished[0] else "length")])
                if req.include_usage:
                    done = len(gen.tokens[0])
                    yield event([], usage={"prompt_tokens": len(ids), "completion_tokens": done,
                                           "total_tokens": len(ids) + done})
                break
            yield "data: [DONE]\n\n"
        finally:
            gone.set()


class _Abandoned(Exception):
    """Raised in a completion's generation whose client went away: it ends there."""


def _abandon_when(gone: threading.Event | None) -> Callable[[list[int], list[int]], None] | None:
    """A generation's `on_tokens` that ends it (`_Abandoned`) once `gone` is set."""
    if gone is None:
        return None

    def on_tokens(rows: list[int], tokens: list[int]) -> None:
        if gone.is_set():
            raise _Abandoned
    return on_tokens


async def _unless_gone(request: HTTPRequest, work: Callable[..., dict], *args: Any,
                       headers: dict | None = None) -> Response:
    """`work(*args, gone)` in a thread, its answer as JSON; where the client goes away
    meanwhile (`http.disconnect`), `gone` is set and the generation ends at its next token,
    freeing the model for the next request (the answer, 499, goes to no one)."""
    gone = threading.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
    watcher = asyncio.ensure_future(watch())
    try:
        return JSONResponse(await run_in_threadpool(work, *args, gone), headers=headers)
    except _Abandoned:
        return Response(status_code=499)  # "client closed request", as nginx logs it
    finally:
        watcher.cancel()


def continuation_text(tok: Any, ids: list[int], gen: Generation, row: int,
                      stop: tuple[str, ...]) -> str:
    """The text row `row` of generation `gen` adds after its prompt `ids`, cut before a stop
    string: a text completion's choice (no half a character where it ran out of tokens)."""
    text = tok.decode_continuation(ids, gen.tokens[row], cut=not gen.finished[row])
    return cut_at_stop(text, stop)[0] if stop else text


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends: a client gone
    ends a streamed completion's generation so (Starlette cancels the response on
    `http.disconnect`, or, under ASGI 2.4, its send fails)."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def create_app(server: ChatServer) -> FastAPI:
    """The FastAPI application serving `server`."""
    app = FastAPI(title="gptlab", version="1")
    if server.cfg.allow_origins:
        # Without it, a browser lets no page of another website read the API's answers.
        app.add_middleware(CORSMiddleware, allow_origins=list(server.cfg.allow_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=["x-gptlab-dropped-turns"])

    @app.exception_handler(APIError)
    def refused(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    def no_route(request: HTTPRequest, e: HTTPException) -> JSONResponse:
        # Starlette's own refusals (an unknown path, a method the path does not take), said in
        # OpenAI's shape too.
        where = f"{request.method} {request.url.path}"
        allowed = (e.headers or {}).get("Allow")
        message = {404: f"Invalid URL ({where})",
                   405: f"Method not allowed ({where}; it takes {allowed})"}.get(e.status_code,
                                                                                 e.detail)
        return JSONResponse(APIError(message, status=e.status_code).body(),
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    def failed(_: HTTPRequest, e: Exception) -> JSONResponse:
        # A fault of the server's, said in OpenAI's shape too: clients read `error.message`.
        error = APIError(f"{type(e).__name__}: {e}", status=500, kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    def card() -> dict:
        return {"id": server.name, "object": "model", "created": 0, "owned_by": "gptlab"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")  # a name may hold a "/" (org/model)
    def retrieve(name: str) -> dict:
        if name != server.name:
            raise model_not_found(name, server.name)
        return card()

    def _check_origin(request: HTTPRequest) -> None:
        """Refuse a browser's request from a page of another website not allowed.

        CORS keeps such a page from reading the answer, but a browser sends a "simple" POST
        (a form, or `text/plain`) without asking first: the model would spend its time, or a
        page could drive it blind. A browser names the page's origin on every POST; curl and
        the SDKs send none."""
        origin = request.headers.get("origin")
        if origin is None or origin in server.cfg.allow_origins \
                or "*" in server.cfg.allow_origins:
            return
        # The server's own page: its origin's host and port are those the browser asked for
        # (behind a proxy that ends TLS, the scheme may differ).
        if urlsplit(origin).netloc == request.headers.get("host"):
            return
        raise APIError(f"a page of {origin} may not call this server: start it with "
                       f"--allow-origin {origin} to let it", status=403,
                       kind="permission_error")

    async def _json_body(request: HTTPRequest) -> Any:
        """The request's JSON body, its `model` the one served."""
        _check_origin(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None
        except RecursionError:  # arrays or objects nested past Python's recursion limit
            raise APIError("the request body is not valid JSON: nested too deeply") from None
        name = _string(body, "model") if isinstance(body, dict) else None
        if name is not None and name != server.name:
            raise model_not_found(name, server.name)
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        # Checking and encoding a long history takes a while: in a thread, so that other
        # requests (/health) are answered meanwhile.
        body = await _json_body(request)
        req, kept, ids, dropped = await run_in_threadpool(server.prepare, body)
        headers = {"x-gptlab-dropped-turns": str(dropped)}
        if req.stream:
            return EventStream(server.stream(req, kept, ids), headers=headers)
        return await _unless_gone(request, server.complete, req, kept, ids, headers=headers)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        body = await _json_body(request)
        req, prompts = await run_in_threadpool(server.prepare_text, body)
        if req.stream:
            return EventStream(server.stream_text(req, prompts[0]))
        return await _unless_gone(request, server.complete_text, req, prompts)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    def page() -> str:
        return (Path(__file__).with_name("page.html").read_text(encoding="utf-8")
                .replace("{{MODEL}}", script_json(server.name)))

    return app


# In a <script>, "</script" in a string ends the script, and "<!--" opens a comment: JSON with
# "<", ">" and "&" escaped holds neither, and with U+2028 and U+2029 escaped, no line end of
# older JavaScript's.
SCRIPT_ESCAPES = {ord(c): f"\\u{ord(c):04x}" for c in "<>&\u2028\u2029"}


def script_json(value: Any) -> str:
    """`value` as JSON to write inside an HTML <script>."""
    return json.dumps(value).translate(SCRIPT_ESCAPES)


def serve(cfg: ServeConfig) -> None:
    """`gptlab serve`: load the model and answer requests until interrupted."""
    import uvicorn

    from gptlab.checkpoint import load_language_model
    from gptlab.train.loop import select_device

    if not cfg.model:
        raise UserError("serve needs a model (--model)", field="model")
    model, tok, _ = load_language_model(Path(cfg.model), select_device(cfg.device))
    server = ChatServer(model, tok, cfg)
    print(f"serving {server.name} on http://{cfg.host}:{cfg.port}/ (OpenAI API under /v1)",
          flush=True)
    uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level="warning")
