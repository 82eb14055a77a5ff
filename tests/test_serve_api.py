"""The OpenAI-compatible server: the real server (uvicorn on a free 127.0.0.1 port) over a folder of tiny runs,
driven by the official openai client and by httpx for what a client library would not send."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from openai import OpenAI

from gptlab.config import SampleConfig
from gptlab.generate import generate
from gptlab.serve.app import ServeSettings, create_app
from gptlab.serve.registry import Registry
from gptlab.tokenizer import load_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(root, settings: ServeSettings | None = None, **registry_options):
    """(base URL, registry) of a server over `root` running in a thread; stopped and closed afterwards."""
    registry = Registry(root, **{"slots": 4, "max_queue": 16, **registry_options})
    app = create_app(registry, settings or ServeSettings())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}", registry
    finally:
        server.should_exit = True
        thread.join(10)
        registry.close()


@contextlib.contextmanager
def slow_model(registry, name: str, seconds: float):
    """Every forward pass of run `name` takes `seconds` longer: requests overlap, or are still running when cut."""
    engine = registry.get(name).engine
    model = engine.model

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *args, **kwargs):
            time.sleep(seconds)
            return model(*args, **kwargs)

    engine.model = Slow()
    try:
        yield
    finally:
        engine.model = model


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, eval_runs, make_export_run, chat_tokenizer):
    """A folder with a trained base run ("base", context 32) and a random-weight chat run ("chat", context 128)."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(eval_runs[1], root / "base")
    shutil.copytree(make_export_run("serve-chat", tokenizer=load_tokenizer(chat_tokenizer), context_length=128),
                    root / "chat")
    return root


@pytest.fixture(scope="module")
def server(runs_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with serving(runs_dir, ServeSettings(max_n=4, max_body_bytes=20_000, max_tokens_limit=100)) as (url, registry):
        yield url, registry
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def post(url, path, body, **kwargs):
    return httpx.post(url + path, json=body, timeout=30, **kwargs)


def sse(lines) -> list[dict]:
    """The JSON payloads of a server-sent event stream, checking that it ends with [DONE]."""
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# --------------------------------------------------------------------------- what a client sees


def test_health_and_models(server, client):
    url, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok", "models": ["base", "chat"], "api_key_required": False}
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "chat"}
    assert models["base"].model_extra == {"chat": False, "context_length": 32}
    assert models["chat"].model_extra == {"chat": True, "context_length": 128}
    assert models["chat"].owned_by == "gptlab" and models["chat"].object == "model"
    assert client.models.retrieve("chat").id == "chat"
    for name in ("nope", "..%2Fbase", "chat%2F..%2Fbase", "a/b"):
        missing = httpx.get(url + "/v1/models/" + name)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found", name
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")


def test_greedy_completion_is_what_generate_gives(server, client):
    _, registry = server
    served = registry.get("base")
    got = client.completions.create(model="base", prompt="Once upon a time", max_tokens=12, temperature=0)
    want = generate(served.engine.model, served.tokenizer, ["Once upon a time"],
                    SampleConfig(temperature=0, max_new_tokens=12), data=served.cfg.data)[0]
    assert got.choices[0].text == want
    assert got.object == "text_completion" and got.model == "base"
    prompt_tokens = len(served.text_prompt("Once upon a time"))
    completion_tokens = len(served.tokenizer.encode(want)) if got.choices[0].finish_reason == "stop" else 12
    assert got.usage.prompt_tokens == prompt_tokens
    assert got.usage.completion_tokens == completion_tokens
    assert got.usage.total_tokens == prompt_tokens + completion_tokens


def test_streamed_text_is_the_non_streamed_text_and_seeds_repeat(client):
    settings = dict(model="base", prompt="The dog", max_tokens=15, temperature=1.0, extra_body={"top_k": 20}, seed=11, n=2)
    once = client.completions.create(**settings)
    again = client.completions.create(**settings)
    assert [c.text for c in once.choices] == [c.text for c in again.choices]
    streamed = ["", ""]
    finish = [None, None]
    for chunk in client.completions.create(**settings, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    assert streamed == [c.text for c in once.choices]
    assert finish == [c.finish_reason for c in once.choices] and set(finish) <= {"stop", "length"}


def test_completion_logprobs(client):
    got = client.completions.create(model="base", prompt="Once", max_tokens=8, temperature=0, logprobs=3)
    choice = got.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == \
        got.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    # greedy: each chosen token is the most likely one
    assert all(abs(max(top.values()) - v) < 1e-4 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_stop_strings_cut_the_text_also_when_streamed(client):
    full = client.completions.create(model="base", prompt="Once upon", max_tokens=20, temperature=0).choices[0].text
    stop = full[6:9]
    assert len(full) > 9 and stop.strip()
    want = full[: full.find(stop)]
    got = client.completions.create(model="base", prompt="Once upon", max_tokens=20, temperature=0, stop=[stop, "zzzq"])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="base", prompt="Once upon", max_tokens=20, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_completion_streamed_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    got = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, seed=3, logprobs=True,
                                         top_logprobs=2)
    choice = got.choices[0]
    assert got.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and got.usage.completion_tokens <= 10
    assert len(choice.logprobs.content) == got.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    chunks = list(client.chat.completions.create(model="chat", messages=messages, max_tokens=10, seed=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_a_base_run_has_no_chat(server):
    r = post(server[0], "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    assert "base model without chat tokens" in r.json()["error"]["message"]
    assert "gptlab sft" in r.json()["error"]["message"]


# --------------------------------------------------------------------------- bad input


BAD = [
    # (body or raw bytes, status, param, words in the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": "base", "prompt": "x", "colour": "red"}, 400, "colour", "unknown field"),
    ({"model": "base", "prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias", "not supported"),
    ({"model": "base", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ({"model": "base", "prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    ({"model": "base", "prompt": 5}, 400, "prompt", "prompt"),
    ({"model": "base", "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "between 1 and 100"),
    ({"model": "base", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens", "between 1 and 100"),
    ({"model": "base", "prompt": "x", "n": 5}, 400, "n", "limit of 4"),
    ({"model": "base", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"model": "base", "prompt": "the " * 60}, 400, "prompt", "context length 32"),
    ({"model": "nope", "prompt": "x"}, 404, "model", "does not exist"),
    ({"model": "../base", "prompt": "x"}, 404, "model", "does not exist"),
    ({"model": "a/b", "prompt": "x"}, 404, "model", "does not exist"),
    ({"prompt": "x"}, 400, "model", "model is required"),
    ({"model": "base", "prompt": "x" * 30_000}, 413, None, "larger than 20,000 bytes"),
]


@pytest.mark.parametrize("body,status,param,words", BAD)
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server, body, status, param, words):
    url, _ = server
    if isinstance(body, bytes):
        r = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = post(url, "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]
    assert post(url, "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_neutral_openai_fields_are_accepted(server):
    r = post(server[0], "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2, "user": "me",
                                            "frequency_penalty": 0, "presence_penalty": 0.0, "best_of": 1, "echo": False})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_a_conversation_over_the_context_is_a_400(server):
    r = post(server[0], "/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "word " * 300}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "context_length=128" in r.json()["error"]["message"]
    r = post(server[0], "/v1/chat/completions", {"model": "chat", "messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 400 and "unknown role" in r.json()["error"]["message"]


def test_unknown_routes_are_openai_errors(server):
    r = httpx.get(server[0] + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- the engine behind it


def test_a_client_that_goes_away_frees_its_slot(server):
    url, registry = server
    before = registry.stats.requests.get("cancelled", 0)
    with slow_model(registry, "chat", 0.05):
        with httpx.stream("POST", url + "/v1/completions", json={"model": "chat", "prompt": "Once", "max_tokens": 100,
                                                                  "temperature": 0, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # the first token came: hang up
        deadline = time.monotonic() + 10
        while registry.stats.requests.get("cancelled", 0) == before:
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.05)
    assert registry.get("chat").engine.active == 0
    assert 'gptlab_generations_total{reason="cancelled"}' in httpx.get(url + "/metrics").text
    assert post(url, "/v1/completions", {"model": "chat", "prompt": "x", "max_tokens": 3}).status_code == 200


def test_concurrent_streams_share_the_forward_passes(server, client):
    url, registry = server
    steps, batched = registry.stats.steps, registry.stats.batched_tokens

    def one(i):
        text = ""
        for chunk in client.completions.create(model="chat", prompt=f"Story {i}:", max_tokens=20, temperature=0.8,
                                               seed=i, stream=True):
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    with slow_model(registry, "chat", 0.01), ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    alone = [client.completions.create(model="chat", prompt=f"Story {i}:", max_tokens=20, temperature=0.8,
                                       seed=i).choices[0].text for i in (0, 5)]
    assert [texts[0], texts[5]] == alone  # seeded: the same alone as in a batch
    steps, batched = registry.stats.steps - steps, registry.stats.batched_tokens - batched
    assert steps > 0 and batched / steps > 1.5
    metrics = httpx.get(url + "/metrics").text
    assert 'gptlab_http_requests_total{code="200",endpoint="/v1/completions"}' in metrics
    for name in ("gptlab_batch_size_bucket", "gptlab_time_to_first_token_seconds_bucket",
                 "gptlab_request_latency_seconds_bucket", "gptlab_queue_length", "gptlab_active_requests",
                 "gptlab_completion_tokens_total", "gptlab_prompt_tokens_total", "gptlab_cached_tokens_total"):
        assert name in metrics


def test_the_request_timeout_ends_a_request(runs_dir):
    with serving(runs_dir, ServeSettings(request_timeout=0.5)) as (url, registry), slow_model(registry, "chat", 0.05):
        r = post(url, "/v1/completions", {"model": "chat", "prompt": "Once", "max_tokens": 100, "temperature": 0})
        assert r.status_code == 200
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" and 0 < r.json()["usage"]["completion_tokens"] < 100


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread's end
def test_a_failing_model_does_not_stop_the_others(runs_dir):
    with serving(runs_dir) as (url, registry):
        engine = registry.get("chat").engine

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory (simulated)")

        engine.model = broken
        r = post(url, "/v1/completions", {"model": "chat", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 500 and "simulated" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        assert post(url, "/v1/completions", {"model": "chat", "prompt": "x"}).status_code == 500
        assert post(url, "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 3}).status_code == 200


# --------------------------------------------------------------------------- the API key


def test_the_api_key_guards_the_api_but_not_the_pages(runs_dir):
    with serving(runs_dir, ServeSettings(api_key="s3cret")) as (url, _):
        assert httpx.get(url + "/health").json()["api_key_required"] is True
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for path in ("/v1/models", "/api/runs", "/metrics"):
                r = httpx.get(url + path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        keyed = OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.completions.create(model="base", prompt="x", max_tokens=2).usage.completion_tokens <= 2
        assert httpx.get(url + "/").status_code != 401  # the playground page loads without the key


def test_a_client_that_stops_waiting_cancels_its_request(server):
    url, registry = server
    before = registry.stats.requests.get("cancelled", 0)
    with slow_model(registry, "chat", 0.05):
        with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up before the answer
            httpx.post(url + "/v1/completions", json={"model": "chat", "prompt": "Once", "max_tokens": 100,
                                                      "temperature": 0}, timeout=0.5)
        deadline = time.monotonic() + 10
        while registry.stats.requests.get("cancelled", 0) == before:
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.05)
    assert post(url, "/v1/completions", {"model": "chat", "prompt": "x", "max_tokens": 3}).status_code == 200


def test_a_full_queue_is_a_429(runs_dir):
    with serving(runs_dir, slots=1, max_queue=1) as (url, registry), slow_model(registry, "chat", 0.05):
        body = {"model": "chat", "prompt": "Once", "max_tokens": 10, "temperature": 0}
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: post(url, "/v1/completions", body), range(4)))
        codes = sorted(r.status_code for r in answers)
        assert codes[0] == 200 and codes[-1] == 429, codes
        busy = next(r for r in answers if r.status_code == 429).json()["error"]
        assert busy["code"] == "rate_limit_exceeded" and "busy" in busy["message"]


def test_streamed_text_keeps_whole_characters_and_holds_back_stop_strings(tiny_tokenizer):
    from gptlab.serve.engine import TokenEvent
    from gptlab.serve.openai_api import Choice

    tokenizer = load_tokenizer(tiny_tokenizer)
    text = "héllo wörld ✓ — the END is near"
    choice = Choice(0, tokenizer, ["END", "E!"])
    pieces = [choice.add(TokenEvent(t, -1.0, [])) for t in tokenizer.encode(text)]
    pieces.append(choice.end("length"))
    assert "".join(pieces) == "héllo wörld ✓ — the " == choice.text and choice.finish == "stop"
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 3  # streamed in pieces, not all at the end
    plain = Choice(1, tokenizer, [])
    assert "".join([plain.add(TokenEvent(t, -1.0, [])) for t in tokenizer.encode(text)] + [plain.end("length")]) == text


def test_fastapi_validation_errors_of_other_routes_are_openai_400s(runs_dir):
    from fastapi.testclient import TestClient

    registry = Registry(runs_dir)
    app = create_app(registry, ServeSettings(api_key="k"))

    @app.get("/api/echo")
    def echo(n: int):  # a route such as the dashboard's, with FastAPI's own validation
        return {"n": n}

    with TestClient(app) as http:
        assert http.get("/api/echo?n=3").status_code == 401  # /api/ needs the key too
        key = {"Authorization": "Bearer k"}
        assert http.get("/api/echo?n=3", headers=key).json() == {"n": 3}
        r = http.get("/api/echo?n=three", headers=key)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert r.json()["error"]["type"] == "invalid_request_error"
    registry.close()
