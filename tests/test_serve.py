"""`gptlab serve`: the OpenAI-compatible chat completions API and the chat page, on a tiny model."""
from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is part of make test's install")
from fastapi.testclient import TestClient  # noqa: E402

import test_chat  # noqa: E402
from gptlab.chat import ChatConfig, ChatSession  # noqa: E402
from gptlab.chat import server as serve_module  # noqa: E402
from gptlab.chat.server import ChatServer, ServeConfig, create_app  # noqa: E402
from gptlab.checkpoint import load_model  # noqa: E402
from gptlab.cli import main  # noqa: E402
from gptlab.tokenizer import Tokenizer  # noqa: E402

tiny_dir = test_chat.tiny_dir  # the tiny chat model `gptlab chat`'s tests talk to (a fixture)

SYSTEM = {"role": "system", "content": "be kind"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def client_of(tiny_dir: Path, **settings) -> TestClient:
    model, tok, _ = load_model(tiny_dir)
    cfg = ServeConfig(model=str(tiny_dir), **{"max_new_tokens": 16, **settings})
    return TestClient(create_app(ChatServer(model, tok, cfg)))


@pytest.fixture(scope="module")
def client(tiny_dir) -> TestClient:
    return client_of(tiny_dir)


def ask(client: TestClient, messages: list[dict], **body) -> dict:
    r = client.post("/v1/chat/completions", json={"model": "model", "messages": messages, **body})
    assert r.status_code == 200, r.text
    return r.json()


def events(client: TestClient, messages: list[dict], **body) -> list:
    r = client.post("/v1/chat/completions",
                    json={"messages": messages, "stream": True, **body})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    said = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in said) and said[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in said[:-1]]


def openai_error(r, status: int, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> str:
    """The message of response `r`, an error of `status` in OpenAI's shape."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error
    assert error["type"] == kind
    return error["message"]


def test_models_health_and_the_page(client):
    assert client.get("/health").json() == {"status": "ok"}
    card = {"id": "model", "object": "model", "created": 0, "owned_by": "gptlab"}
    assert client.get("/v1/models").json() == {"object": "list", "data": [card]}
    assert client.get("/v1/models/model").json() == card  # the openai client's retrieve
    assert "The model 'gpt-4o' does not exist" in openai_error(
        client.get("/v1/models/gpt-4o"), 404, "model", "model_not_found")
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'const MODEL = "model";' in page.text and "/v1/chat/completions" in page.text
    head = client.head("/")  # a check of the page's, as monitors and browsers make it
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/html")


def test_no_route_and_no_method_are_errors_in_openai_s_shape(client):
    assert openai_error(client.get("/v1/nothing"), 404) == "Invalid URL (GET /v1/nothing)"
    r = client.get("/v1/chat/completions")
    assert openai_error(r, 405) == "Method not allowed (GET /v1/chat/completions; it takes POST)"
    assert r.headers["allow"] == "POST"


def test_a_model_name_cannot_break_out_of_the_page_s_script(tiny_dir):
    name = "x</script><script>alert(1)</script><!--&\u2028"
    page = client_of(tiny_dir, name=name).get("/").text
    template = Path(serve_module.__file__).with_name("page.html").read_text(encoding="utf-8")
    assert page.count("</script") == template.count("</script")
    assert "<!--" not in page and "\u2028" not in page
    literal = re.search(r"const MODEL = (.*);\n", page).group(1)
    assert json.loads(literal) == name


def test_a_greedy_completion_is_the_reply_gptlab_chat_gives(tiny_dir, client):
    model, tok, _ = load_model(tiny_dir)
    session = ChatSession(model, tok, ChatConfig(model=str(tiny_dir), system="be kind",
                                                 max_new_tokens=12, temperature=1.0, seed=5))
    want = [session.reply("the cat sat"), session.reply("the dog ran")]  # seeds 5 and 6
    assert all(want)  # random weights, sampled: some text
    # The client sends the history each time; the server keeps none.
    first = ask(client, [SYSTEM, user("the cat sat")], temperature=1.0, max_tokens=12, seed=5)
    history = [SYSTEM, user("the cat sat"), {"role": "assistant", "content": want[0]},
               user("the dog ran")]
    second = ask(client, history, temperature=1.0, max_tokens=12, seed=6)
    assert [first["choices"][0]["message"]["content"],
            second["choices"][0]["message"]["content"]] == want
    assert first["object"] == "chat.completion" and first["model"] == "model"
    assert first["id"].startswith("chatcmpl-") and first["id"] != second["id"]
    ids, _ = tok.render_chat(history, add_generation_prompt=True)
    usage = second["usage"]
    assert usage["prompt_tokens"] == len(ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 12
    finish = second["choices"][0]["finish_reason"]
    assert finish == ("length" if usage["completion_tokens"] == 12 else "stop")


def test_a_streamed_completion_says_what_a_whole_one_says(client):
    messages = [SYSTEM, user("what is the capital of france?")]
    # random weights: a seed whose sampled reply holds some text
    seed, whole = next((s, w) for s in range(10) for w in [ask(client, messages, seed=s)]
                       if w["choices"][0]["message"]["content"])
    chunks = events(client, messages, seed=seed,
                    stream_options={"include_usage": True})
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    *_, last, usage = chunks
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": whole["choices"][0]["finish_reason"]}
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    # without include_usage, no usage chunk
    assert all(c["choices"] for c in events(client, messages, temperature=0, max_tokens=4))


def test_n_completions_sampled_under_a_seed_are_reproducible(tiny_dir, client):
    messages = [user("the cat sat")]
    a = ask(client, messages, n=4, seed=7, temperature=1.0)
    b = ask(client, messages, n=4, seed=7, temperature=1.0)
    answers = [c["message"]["content"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3]
    assert answers == [c["message"]["content"] for c in b["choices"]]
    assert len(set(answers)) > 1  # each completion is drawn on its own
    assert a["usage"]["prompt_tokens"] == 4 * ask(client, messages)["usage"]["prompt_tokens"]
    # Without a seed: the server's --seed plus the requests before it, so a server started
    # alike answers alike, and its second request is not sampled as its first.
    one, two = client_of(tiny_dir), client_of(tiny_dir)
    firsts = [ask(c, messages, n=4)["choices"] for c in (one, two)]
    assert firsts[0] == firsts[1]
    assert ask(one, messages, n=4)["choices"] != firsts[0]


def test_a_stop_string_ends_the_reply_before_it(client):
    # Under one seed the reply is drawn alike up to the stop, which ends it there.
    # Random weights: a seed whose reply holds letters after some text, the stop.
    messages = [user("the dog ran")]
    for seed in range(20):
        whole = ask(client, messages, seed=seed)["choices"][0]["message"]["content"]
        found = re.search(r"[a-z]{2,}", whole)
        if found and whole[:found.start()].strip():
            break
    else:
        pytest.fail("no reply holds letters after some text")
    stop = found.group()
    cut = ask(client, messages, seed=seed, stop=stop)["choices"][0]
    assert cut["message"]["content"] == whole[:found.start()].strip()
    assert cut["finish_reason"] == "stop"
    assert ask(client, messages, seed=seed, stop=[stop, "zzz"])["choices"][0] == cut


def test_a_conversation_past_the_context_loses_its_oldest_turns(tiny_dir):
    client = client_of(tiny_dir, max_context_tokens=60)
    long = [SYSTEM]
    for i in range(6):
        long += [user(f"the cat sat on the mat {i}"), {"role": "assistant", "content": "a bird"}]
    r = client.post("/v1/chat/completions", json={"messages": long + [user("the dog ran")],
                                                  "temperature": 0, "max_tokens": 8})
    assert r.status_code == 200 and int(r.headers["x-gptlab-dropped-turns"]) >= 1
    assert r.json()["usage"]["prompt_tokens"] <= 60 - 8
    # A last message that alone does not fit is refused, as OpenAI's API refuses it, with
    # the advice that helps: a message longer than the context, to shorten it alone.
    said = openai_error(client.post("/v1/chat/completions", json={
        "messages": [user("the cat sat on the mat " * 20)], "max_tokens": 8}),
        400, "messages", "context_length_exceeded")
    assert said.startswith("This model's maximum context length is 60 tokens, too few for these "
                           "messages: the message needs ")
    assert said.endswith("; shorten it")
    # The tiny tokenizer: 56 tokens, which a reply of 4 leaves room for.
    for field in ("max_tokens", "max_completion_tokens"):
        said = openai_error(client.post("/v1/chat/completions", json={
            "messages": [user("the cat " * 16)], field: 8}),
            400, "messages", "context_length_exceeded")
        assert said.endswith(f"needs 56 tokens with the chat template, but only 52 fit (the "
                             f"context minus the tokens kept for the reply); shorten it, or "
                             f"lower {field} to at most 4")
    ask(client, [user("the cat " * 16)], max_tokens=4)


@pytest.mark.parametrize("body, status, param, message", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     'tools [{"type": "function", "function": {"name": "f"}}] is not supported by gptlab serve'),
    ({"logprobs": True}, 400, "logprobs", "logprobs true is not supported"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format", "response_format"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty", "frequency_penalty 0.5 is not"),
    ({"best_of": 2}, 400, "best_of", "Unrecognized request argument supplied: best_of"),
    ({"temperature": 3}, 400, "temperature", "temperature must be from 0 to 2, got 3"),
    ({"temperature": 0, "top_p": 0.5}, 400, "top_p", "temperature 0 is greedy decoding"),
    ({"top_p": 0}, 400, "top_p", "top_p must be in (0, 1], got 0"),
    ({"top_p": 1.5}, 400, "top_p", "top_p must be in (0, 1], got 1.5"),
    ({"top_p": float("nan")}, 400, "top_p", "top_p must be a number, got NaN"),
    ({"temperature": float("inf")}, 400, "temperature", "temperature must be a number, got "
                                                        "Infinity"),
    ({"stream": 0}, 400, "stream", "stream must be true or false, got 0"),
    ({"stream": "true"}, 400, "stream", 'stream must be true or false, got "true"'),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage", 'stream_options.include_usage must be true or false, got '
                                     '"yes"'),
    ({"stream_options": False}, 400, "stream_options",
     "stream_options must be an object of include_usage alone, got false"),
    ({"frequency_penalty": False}, 400, "frequency_penalty", "frequency_penalty false is not"),
    ({"presence_penalty": False}, 400, "presence_penalty", "presence_penalty false is not"),
    ({"logprobs": 0}, 400, "logprobs", "logprobs 0 is not supported"),
    ({"user": 5}, 400, "user", "user must be a string, got 5"),
    ({"model": 5}, 400, "model", "model must be a string, got 5"),
    ({"messages": [{"role": "user", "content": "hi", "foo": 1}]}, 400, "messages[0].foo",
     "Unrecognized request argument supplied: messages[0].foo"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400, "messages[0].name",
     'messages[0].name "bob" is not supported by gptlab serve (it accepts only null or "")'),
    ({"max_tokens": 0}, 400, "max_tokens", "max_tokens must be an integer of at least 1, got 0"),
    ({"max_tokens": 17}, 400, "max_tokens", "at most 16 new tokens (the server's"),
    ({"n": 2, "stream": True}, 400, "n", "a streamed request has one completion"),
    ({"n": 0}, 400, "n", "n must be an integer from 1 to 16, got 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "stop takes at most 4 texts, got 5"),
    ({"stop": [""]}, 400, "stop", "stop: item 0 is empty"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed when"),
    ({"model": "gpt-4o"}, 404, "model", "The model 'gpt-4o' does not exist"),
    ({"messages": []}, 400, "messages", "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 400,
     "messages[0].content", "content is a list of parts"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     400, "messages[1].role", "the last message must be the user's to answer"),
    ({"messages": [{"role": "tool", "content": "42"}]}, 400, "messages[0].role",
     "role 'tool'; expected one of system, developer, user, assistant"),
])
def test_a_request_gptlab_cannot_honour_is_refused_as_openai_refuses(client, body, status, param,
                                                                     message):
    # json.dumps writes NaN and Infinity, which Python's JSON reads (httpx's refuses them)
    r = client.post("/v1/chat/completions", content=json.dumps({"messages": [user("hi")], **body}),
                    headers={"content-type": "application/json"})
    said = openai_error(r, status, param, "model_not_found" if status == 404 else None)
    # The openai client shows the message alone: it names the field.
    assert message in said and param in said, said


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("body", ["[" * 100000 + "]" * 100000,
                                  '{"a": ' * 100000 + "1" + "}" * 100000])
def test_a_body_nested_too_deeply_is_no_json_it_takes(client, path, body):
    assert openai_error(client.post(path, content=body.encode()), 400) == (
        "the request body is not valid JSON: nested too deeply")


def test_a_developer_message_is_a_system_message(client):
    def reply(role: str) -> str:
        return ask(client, [{"role": role, "content": "be kind"}, user("hi")],
                   temperature=0)["choices"][0]["message"]["content"]
    assert reply("developer") == reply("system")


def test_neutral_settings_and_a_body_that_is_no_json(client):
    # What a client sends at its default changes nothing and is accepted (the openai client's
    # and LangChain's requests hold such fields).
    greedy = ask(client, [user("hi")], temperature=0)
    assert ask(client, [user("hi")], temperature=0, frequency_penalty=0, presence_penalty=0.0,
               logprobs=False, tools=[], response_format={"type": "text"}, user="me",
               top_p=1, stop=None, seed=None, stream=False)["choices"] == greedy["choices"]
    assert ask(client, [{**user("hi"), "name": "", "tool_calls": None}],
               temperature=0)["choices"] == greedy["choices"]
    r = client.post("/v1/chat/completions", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_serve_loads_the_model_and_runs_uvicorn(tiny_dir, monkeypatch, capsys):
    import uvicorn
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    assert main(["serve", "--model", str(tiny_dir), "--name", "tiny", "--port", "8123",
                 "--max-new-tokens", "16", "--allow-origin", "http://a.test",
                 "--allow-origin", "http://b.test"]) == 0
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 8123)
    assert "serving tiny on http://127.0.0.1:8123/" in capsys.readouterr().out
    client = TestClient(ran["app"])
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny"]
    for origin in ("http://a.test", "http://b.test"):
        assert preflight(client, origin).headers["access-control-allow-origin"] == origin


def preflight(client: TestClient, origin: str):
    """The OPTIONS request a browser sends before a page of `origin` posts JSON to the API."""
    return client.options("/v1/chat/completions", headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, authorization"})


def test_no_website_calls_the_api_unless_allowed(tiny_dir, client):
    # By default (the server on 127.0.0.1): a page of any website a browser visits gets no
    # answer it may read, nor may it post JSON.
    r = preflight(client, "http://evil.test")
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    allowed = client_of(tiny_dir, allow_origins=("http://localhost:3000",))
    r = preflight(allowed, "http://localhost:3000")
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert preflight(allowed, "http://evil.test").status_code == 400
    r = allowed.post("/v1/chat/completions", json={"messages": [user("hi")], "max_tokens": 2},
                     headers={"origin": "http://localhost:3000"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-gptlab-dropped-turns" in r.headers["access-control-expose-headers"]
    r = preflight(client_of(tiny_dir, allow_origins=("*",)), "http://any.test")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", {"messages": [user("hi")]}),
                                        ("/v1/completions", {"prompt": "hi"})])
def test_a_page_of_another_website_cannot_make_the_model_work(tiny_dir, client, monkeypatch,
                                                              path, body):
    # A browser posts a form or text/plain across sites without asking first (no preflight);
    # CORS only hides the answer. The server refuses before the model does anything.
    asked = []
    monkeypatch.setattr(ChatServer, "prepare", lambda *a: asked.append(a))
    monkeypatch.setattr(ChatServer, "prepare_text", lambda *a: asked.append(a))
    simple = {"content-type": "text/plain"}
    for origin in ("http://evil.test", "null", "http://testserver.evil.test"):
        r = client.post(path, content=json.dumps(body), headers={**simple, "origin": origin})
        assert openai_error(r, 403, kind="permission_error") == (
            f"a page of {origin} may not call this server: start it with "
            f"--allow-origin {origin} to let it")
    assert asked == []
    monkeypatch.undo()
    # The server's own page (its origin's host is the one asked), an allowed origin, and a
    # client that is no browser (no Origin: curl, the SDKs) are answered.
    for origin in ("http://testserver", "https://testserver"):
        r = client.post(path, json={**body, "max_tokens": 2}, headers={"origin": origin})
        assert r.status_code == 200, r.text
    allowed = client_of(tiny_dir, allow_origins=("http://localhost:3000",))
    r = allowed.post(path, json={**body, "max_tokens": 2},
                     headers={"origin": "http://localhost:3000"})
    assert r.status_code == 200, r.text
    refused = allowed.post(path, json=body, headers={"origin": "http://evil.test"})
    assert openai_error(refused, 403, kind="permission_error").startswith(
        "a page of http://evil.test may not")
    r = client_of(tiny_dir, allow_origins=("*",)).post(
        path, json={**body, "max_tokens": 2}, headers={"origin": "http://any.test"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, body, prepare", [
    ("/v1/chat/completions", {"messages": [user("hi")]}, "prepare"),
    ("/v1/completions", {"prompt": "hi"}, "prepare_text"),
])
def test_other_requests_are_answered_while_a_request_is_prepared(tiny_dir, monkeypatch, path,
                                                                 body, prepare):
    # Encoding a long history takes a while: /health is answered meanwhile.
    model, tok, _ = load_model(tiny_dir)
    server = ChatServer(model, tok, ServeConfig(model=str(tiny_dir), max_new_tokens=4))
    original, started, answered = getattr(server, prepare), threading.Event(), threading.Event()
    waited = []

    def slow(body):
        started.set()
        waited.append(answered.wait(timeout=5))  # without the fix: the health check waits
        return original(body)
    monkeypatch.setattr(server, prepare, slow)
    with TestClient(create_app(server)) as client:  # one event loop for both requests
        done = []
        asked = threading.Thread(target=lambda: done.append(client.post(path, json=body)))
        asked.start()
        assert started.wait(timeout=30)
        assert client.get("/health").status_code == 200
        answered.set()
        asked.join(timeout=60)
        assert done[0].status_code == 200
        # and a request refused in the thread is the same 400
        assert "n must be" in openai_error(client.post(path, json={**body, "n": 0}), 400, "n")
    assert waited == [True, True]


def test_serve_without_a_model_there_exits_2_naming_the_flag(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "none" in err


def test_a_fault_of_the_server_is_a_500_in_openai_s_shape(tiny_dir, monkeypatch):
    model, tok, _ = load_model(tiny_dir)
    server = ChatServer(model, tok, ServeConfig(model=str(tiny_dir), max_new_tokens=16))

    def broken(*args):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(server, "complete", broken)
    r = TestClient(create_app(server), raise_server_exceptions=False).post(
        "/v1/chat/completions", json={"messages": [user("hi")]})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "RuntimeError: out of memory",
                                  "type": "server_error", "param": None, "code": None}}


def test_a_default_reply_that_fills_the_context_is_refused_at_start(tiny_dir, capsys):
    # The tiny model's context is 96: every request without max_tokens would have been refused.
    assert main(["serve", "--model", str(tiny_dir), "--max-new-tokens", "96"]) == 2
    assert capsys.readouterr().err.endswith(
        "field '--max-new-tokens': 96 leaves no room for a conversation in a context of 96 "
        "tokens; lower it (--max-new-tokens)\n")


def test_a_text_completion_continues_the_prompt_as_generate_text_does(tiny_dir, client):
    from gptlab import api
    pair = load_model(tiny_dir)[:2]
    prompts = ["the cat sat on", "paris is the"]
    want = api.generate_text(pair, prompts, max_new_tokens=12, seed=4)
    r = client.post("/v1/completions", json={"model": "model", "prompt": prompts,
                                             "max_tokens": 12, "seed": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["text"] for c in body["choices"]] == want and all(want)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    tok = pair[1]
    used = sum(len(tok.encode(p, bos=tok.bos_id is not None)) for p in prompts)
    assert body["usage"]["prompt_tokens"] == used
    assert body["usage"]["total_tokens"] == used + body["usage"]["completion_tokens"]
    # greedy, a single prompt, n and a stop string
    greedy = api.generate_text(pair, ["the dog"], max_new_tokens=16, greedy=True)
    one = client.post("/v1/completions", json={"prompt": "the dog", "temperature": 0}).json()
    assert [c["text"] for c in one["choices"]] == greedy
    many = client.post("/v1/completions", json={"prompt": "the dog", "n": 3, "seed": 2}).json()
    texts = [c["text"] for c in many["choices"]]
    assert len(texts) == 3 and len(set(texts)) > 1
    # random weights: a completion with letters after some text, and those letters the stop
    k, found = next((k, f) for k, t in enumerate(texts) for f in [re.search(r"[a-z]{2,}", t)]
                    if f and f.start() > 0)
    stop = found.group()
    cut = client.post("/v1/completions",
                      json={"prompt": "the dog", "n": 3, "seed": 2, "stop": stop}).json()
    assert cut["choices"][k]["text"] == texts[k][:found.start()]
    assert cut["choices"][k]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, param, message, code", [
    ({"prompt": "hi", "echo": True}, "echo", "echo true is not supported", None),
    ({"prompt": "hi", "logprobs": 2}, "logprobs", "logprobs 2 is not supported", None),
    ({"prompt": "the cat sat " * 40}, "prompt", "prompt has", "context_length_exceeded"),
    ({"prompt": ["hi", "the cat sat " * 40]}, "prompt[1]", "prompt[1] has",
     "context_length_exceeded"),
    ({"prompt": "hi", "stream": 1}, "stream", "stream must be true or false, got 1", None),
    ({"prompt": []}, "prompt", "prompt must be a text or a non-empty list", None),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages",
     "Unrecognized request argument supplied: messages", None),
])
def test_a_text_completion_gptlab_cannot_honour_is_refused(client, body, param, message, code):
    said = openai_error(client.post("/v1/completions", json=body), 400, param, code)
    assert message in said and param in said, said


def test_a_prompt_too_long_is_told_what_a_client_can_change(client, monkeypatch):
    # The tiny tokenizer: BOS and 80 tokens, in a context of 96 less a reply of 16.
    for field in ("max_tokens", None):
        said = openai_error(client.post("/v1/completions", json={
            "prompt": "the cat " * 26, **({field: 16} if field else {})}),
            400, "prompt", "context_length_exceeded")
        assert said == ("This model's maximum context length is 96 tokens: prompt has 81 tokens, "
                        "but max_tokens 16 leaves room for 80; shorten it, or lower max_tokens "
                        "to at most 15")
    said = openai_error(client.post("/v1/completions", json={"prompt": "the cat " * 40}),
                        400, "prompt", "context_length_exceeded")
    assert said.endswith("prompt has 123 tokens, but max_tokens 16 leaves room for 80; shorten "
                         "it")
    # A tokenizer without BOS: an empty prompt is nothing to continue.
    monkeypatch.setattr(Tokenizer, "bos_id", property(lambda self: None))
    assert openai_error(client.post("/v1/completions", json={"prompt": ["hi", ""]}), 400,
                        "prompt[1]") == "prompt[1] is empty"


def text_events(client: TestClient, **body) -> list:
    r = client.post("/v1/completions", json={"stream": True, **body})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    said = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in said) and said[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in said[:-1]]


def joined(chunks: list) -> str:
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def test_a_streamed_text_completion_joins_to_the_whole_one(client):
    pieces = 0
    for seed in range(4):
        whole = client.post("/v1/completions",
                            json={"prompt": "the cat sat on", "seed": seed}).json()
        chunks = text_events(client, prompt="the cat sat on", seed=seed,
                             stream_options={"include_usage": True})
        assert {c["object"] for c in chunks} == {"text_completion"}
        assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
        assert joined(chunks) == whole["choices"][0]["text"]
        *said, last, usage = chunks
        assert all(c["choices"][0]["finish_reason"] is None for c in said)
        assert last["choices"] == [{"text": "", "index": 0, "logprobs": None,
                                    "finish_reason": whole["choices"][0]["finish_reason"]}]
        assert usage["choices"] == [] and usage["usage"] == whole["usage"]
        pieces = max(pieces, len(said))
    assert pieces > 3  # the text came in pieces
    # without include_usage, no usage chunk; a list of one prompt streams too
    assert all(c["choices"] for c in text_events(client, prompt=["the dog"], temperature=0))


def test_a_stop_string_cuts_a_streamed_text_completion_as_a_whole_one(client):
    # Random weights: a seed whose completion holds two letters that are the ends of two
    # pieces streamed (of two tokens, most likely), found there first, after some text.
    for seed in range(20):
        said = [c["choices"][0]["text"] for c in
                text_events(client, prompt="the dog", seed=seed)[:-1]]
        text = "".join(said)
        ends = [k for k in range(1, len(said)) for at in [len("".join(said[:k]))]
                if said[k - 1][-1:].isalpha() and said[k][:1].isalpha() and at > 1
                and text.find(text[at - 1:at + 1]) == at - 1]
        if ends:
            break
    else:
        pytest.fail("no completion holds two letters across pieces")
    at = len("".join(said[:ends[0]]))
    stop = text[at - 1:at + 1]
    body = {"prompt": "the dog", "seed": seed, "stop": [stop, "zzz"]}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    assert whole["text"] == text[:at - 1] and whole["finish_reason"] == "stop"
    # The stop's first letter ended a piece: held back, as its start, then cut with it.
    chunks = text_events(client, **body)
    assert joined(chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_streamed_text_completion_gptlab_cannot_honour_is_refused(client):
    for body, param, message in [
            ({"n": 2}, "n", "a streamed request has one completion (n 1)"),
            ({"prompt": ["hi", "yo"]}, "prompt", "a streamed request has one completion (one "
                                                 "prompt)")]:
        r = client.post("/v1/completions", json={"prompt": "hi", "stream": True, **body})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["param"] == param and message in error["message"]
    r = client.post("/v1/completions", json={"prompt": "hi", "stream_options":
                                             {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def abandon_stream(app, path: str, body: dict, reached, spec: str, told=None,
                   sent: list | None = None) -> None:
    """POST `body` to `path` of the ASGI `app` and go away once `reached` is set: an
    `http.disconnect` where the server listens for it (ASGI 2.3, as uvicorn), else (2.4) a
    send that fails. `told` is set once the app has taken the disconnect in (the step after
    the one it was received in); `sent` gets the messages the app sends."""
    async def drive() -> None:
        asked = False

        async def receive() -> dict:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": json.dumps(body).encode(),
                        "more_body": False}
            while not reached.is_set():
                await asyncio.sleep(0.01)
            if told is not None:
                asyncio.get_running_loop().call_soon(told.set)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if sent is not None:
                sent.append(message)
            if spec == "2.4" and message["type"] == "http.response.body":
                raise OSError("the client went away")

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec},
                 "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000)}
        try:
            await app(scope, receive, send)
        except Exception as e:  # ASGI 2.4: Starlette says ClientDisconnect
            assert type(e).__name__ == "ClientDisconnect", e
    asyncio.run(drive())


@pytest.mark.parametrize("path, body, spec", [
    ("/v1/chat/completions", {"messages": [user("the cat sat")]}, "2.3"),
    ("/v1/completions", {"prompt": "the cat sat"}, "2.3"),
    ("/v1/chat/completions", {"messages": [user("the cat sat")]}, "2.4"),  # a role chunk first
])
def test_a_stream_whose_client_goes_away_stops_and_frees_the_model(tiny_dir, path, body,
                                                                   spec):
    model, tok, _ = load_model(tiny_dir)
    server = ChatServer(model, tok, ServeConfig(model=str(tiny_dir), max_new_tokens=32))
    app = create_app(server)
    client = TestClient(app)
    # Random weights: a seed whose completion runs to max_tokens.
    seed = next(s for s in range(20) if client.post(path, json={**body, "seed": s}).json()
                ["usage"]["completion_tokens"] == 32)
    # The model's forward passes: the prompt's, then one a token. The `at`-th waits until the
    # client has gone and the app has returned: under ASGI 2.3 the one that draws the third
    # token; under 2.4 the prompt's, as a chat's first chunk (its role) fails to be sent.
    forwards, reached, returned = [], threading.Event(), threading.Event()
    at = 1 if spec == "2.4" else 3

    def hook(*_) -> None:
        forwards.append(1)
        if len(forwards) == at:
            reached.set()
            returned.wait(timeout=30)  # without the fix: the app returns at the reply's end
    handle = model.register_forward_hook(hook)
    try:
        abandon_stream(app, path, {**body, "seed": seed, "stream": True}, reached, spec)
        returned.set()
        assert server.lock.acquire(timeout=60)  # the generation ended, and freed the model
        server.lock.release()
    finally:
        returned.set()
        handle.remove()
    assert len(forwards) == at  # the token drawn after the client went was the last
    r = client.post(path, json={**body, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [user("the cat sat")]}),
    ("/v1/completions", {"prompt": "the cat sat"}),
])
def test_a_whole_completion_whose_client_goes_away_stops_and_frees_the_model(tiny_dir, path,
                                                                             body):
    model, tok, _ = load_model(tiny_dir)
    server = ChatServer(model, tok, ServeConfig(model=str(tiny_dir), max_new_tokens=32))
    app = create_app(server)
    client = TestClient(app)
    seed = next(s for s in range(20) if client.post(path, json={**body, "seed": s}).json()
                ["usage"]["completion_tokens"] == 32)
    # The client goes while the third forward pass (the second token's) runs; that pass
    # waits until the server has taken the disconnect in. The next token is not drawn.
    forwards, reached, told, sent = [], threading.Event(), threading.Event(), []

    def hook(*_) -> None:
        forwards.append(1)
        if len(forwards) == 3:
            reached.set()
            assert told.wait(timeout=60)
    handle = model.register_forward_hook(hook)
    try:
        abandon_stream(app, path, {**body, "seed": seed}, reached, "2.3", told, sent)
    finally:
        reached.set()
        told.set()
        handle.remove()
    assert len(forwards) == 3  # without the fix: 33, the prompt's and 32 tokens'
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert server.lock.acquire(blocking=False)  # the model is free for the next request
    server.lock.release()
    r = client.post(path, json={**body, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
