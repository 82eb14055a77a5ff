"""OpenAI's API over the engines: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{id}].

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=50, stream=True)
    client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi!"}])

Fields: model (a run's name; may be left out when the server offers one run), prompt (a string, a list of
them, or token ids) / messages, max_tokens (max_completion_tokens for chat), temperature (0: greedy),
top_p, top_k (ours: OpenAI has none), n, stop (up to 4 strings; the text ends before the first one, and a
stream holds back text that may be the start of one), seed (choice i uses seed + i), logprobs (completions:
0..5 alternatives; chat: true, with top_logprobs 0..20), stream (server-sent events, OpenAI's chunks, then
`data: [DONE]`), stream_options.include_usage. OpenAI fields gptlab does not implement are accepted at
their neutral value (frequency_penalty=0, echo=false, ...) and otherwise refused naming the field, as is
any unknown field.

Each choice is one engine request (Engine.submit); its events come on the engine's thread and are handed
to the event loop (call_soon_threadsafe). A client that goes away, a stop string, or the server's
request timeout cancels the engine requests, which frees their slots at the engine's next pass.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from gptlab.errors import GptlabError
from gptlab.generate import chat_prompt
from gptlab.runs import load_run_config
from gptlab.serve.engine import DoneEvent, EngineBusy, GenerationRequest, TokenEvent
from gptlab.serve.registry import ServedModel, UnknownModel
from gptlab.tokenizer import load_tokenizer
from gptlab.tokenizer.chat import has_chat_tokens

router = APIRouter()

# OpenAI fields gptlab does not implement: accepted (and ignored) at these neutral values or null, else a 400.
NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "repetition_penalty": (1,), "logit_bias": ({},),
           "echo": (False,), "best_of": (1,), "suffix": ("",), "response_format": ({"type": "text"},),
           "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
           "parallel_tool_calls": (True, False), "modalities": (["text"],), "reasoning_effort": ()}
# OpenAI fields that change nothing about the text: always accepted, ignored.
IGNORED = ("user", "metadata", "store", "service_tier")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


def error_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


# --------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    # strict: "5" is not a number and true is not 1; forbid: an unknown field is an error, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # ours; 0 or null: no top-k filter
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the end of the context
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


async def _parse(request: Request, kind: type[_Strict]):
    """The body as `kind`, or a 400 naming what is wrong (FastAPI's body parsing would answer 422 in its own shape)."""
    try:
        data = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    for name in list(data):
        if name in IGNORED:
            del data[name]
        elif name in NEUTRAL:
            value = data.pop(name)
            if value is not None and value not in NEUTRAL[name]:
                neutral = " or ".join(json.dumps(v) for v in NEUTRAL[name]) or "null"
                raise ApiError(400, f"{name}={json.dumps(value)[:80]} is not supported by gptlab serve (leave it out, "
                               f"or send {neutral})", param=name, code="unsupported_parameter")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"unknown field {where!r} (see the fields of OpenAI's {kind.__name__.removesuffix('Request')} API)"
        else:
            message = f"{where}: {first['msg']} (got {json.dumps(first.get('input'), default=str)[:80]})"
        raise ApiError(400, message, param=param) from None


# --------------------------------------------------------------------------- checks


async def _served(request: Request, name: str | None) -> ServedModel:
    """The model a request names (or the only one served); 404 model_not_found for any other name."""
    registry = request.app.state.registry
    if name is None:
        name = registry.default()
        if name is None:
            raise ApiError(400, f"model is required: this server offers {', '.join(registry.names())}", param="model")
    try:
        return await run_in_threadpool(registry.get, name)  # the first request of a run loads it
    except UnknownModel:
        names = registry.names()
        raise ApiError(404, f"the model {name!r} does not exist: this server offers {', '.join(names) or 'none'}",
                       param="model", code="model_not_found") from None
    except GptlabError as e:
        raise ApiError(500, f"the model {name!r} could not be loaded: {e}", code="model_load_failed") from None


def _check_limits(body: _Sampling, served: ServedModel, settings, max_tokens: int | None, choices: int) -> int:
    """max_tokens within 1..limit (None: the limit), n and stop within bounds; returns max_tokens."""
    limit = settings.max_tokens_limit or served.context_length
    if max_tokens is None:
        max_tokens = limit
    elif not 1 <= max_tokens <= limit:
        why = "the server's --max-tokens-limit" if settings.max_tokens_limit else f"{served.name}'s context length"
        raise ApiError(400, f"max_tokens={max_tokens}: must be between 1 and {limit} ({why})", param="max_tokens")
    if body.n > settings.max_n or choices > settings.max_n:
        raise ApiError(400, f"n={body.n} gives {choices} choices, over the server's limit of {settings.max_n} "
                       "(--max-n)", param="n")
    stops = _stops(body.stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: give at most 4 non-empty strings", param="stop")
    return max_tokens


def _stops(stop: str | list[str] | None) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def _check_prompt(ids: list[int], served: ServedModel, settings) -> None:
    """A prompt must leave room for a token in the context, and be within the server's --max-prompt-tokens."""
    context = served.context_length
    limit = min(context - 1, settings.max_prompt_tokens or context)
    if len(ids) > limit:
        server = f", the server's --max-prompt-tokens {settings.max_prompt_tokens}" if settings.max_prompt_tokens else ""
        raise ApiError(400, f"the prompt has {len(ids)} tokens, over the limit of {limit} (model {served.name}'s "
                       f"context length {context}{server})", param="prompt", code="context_length_exceeded")
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if min(ids) < 0 or max(ids) >= served.cfg.model.vocab_size:
        raise ApiError(400, f"prompt token ids must lie in [0, {served.cfg.model.vocab_size})", param="prompt")


# --------------------------------------------------------------------------- one request's choices


class Choice:
    """One choice's text as its tokens come: decoded whole characters at a time, cut before a stop string."""

    def __init__(self, index: int, tokenizer, stops: list[str]):
        self.index, self.tokenizer, self.stops = index, tokenizer, stops
        self.ids: list[int] = []
        self.events: list[TokenEvent] = []
        self.pending: list[TokenEvent] = []  # tokens whose log-probabilities are not sent yet
        self.decoded = 0  # characters of decode(ids) taken so far
        self.held = ""  # decoded text not sent yet: it may be the start of a stop string
        self.text = ""  # the text sent
        self.finish: str | None = None
        self.handle = None
        self.prompt_tokens = self.cached_tokens = 0
        self.error: ApiError | None = None

    def add(self, event: TokenEvent) -> str:
        """A new token: the text it makes sendable ("" while a character or a possible stop string is incomplete)."""
        if self.finish is not None:  # cut at a stop string already: the tokens in flight are dropped
            return ""
        self.ids.append(event.token)
        self.events.append(event)
        self.pending.append(event)
        return self._advance(final=False)

    def end(self, reason: str) -> str:
        """The engine request ended ("stop" or "length"): the text still held back."""
        if self.finish is not None:
            return ""
        self.finish = reason
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        full = self.tokenizer.decode(self.ids)
        if not final and full.endswith("\ufffd"):  # part of a multi-byte character: wait for the rest
            return ""
        self.held += full[self.decoded:]
        self.decoded = len(full)
        cuts = [self.held.find(s) for s in self.stops if s in self.held]
        if cuts:
            out, self.held, self.finish = self.held[: min(cuts)], "", "stop"
            if self.handle is not None:
                self.handle.cancel()  # the text is complete: free the slot
        else:
            keep = 0 if final else self._stop_start()
            out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        self.text += out
        return out

    def _stop_start(self) -> int:
        """The length of the longest end of `held` that a stop string starts with (to hold back)."""
        for k in range(min(len(self.held), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(self.held[-k:]) for s in self.stops):
                return k
        return 0

    def take_logprobs(self) -> list[TokenEvent]:
        out, self.pending = self.pending, []
        return out

    def kept_events(self) -> list[TokenEvent]:
        """The tokens of the text kept (a stop string's tokens and those after it are not)."""
        kept, length = [], 0
        for event in self.events:
            if length >= len(self.text) and self.finish == "stop":
                break
            kept.append(event)
            length += len(self.tokenizer.decode([event.token]))
        return kept


class ClientGone(Exception):
    pass


class Generation:
    """The engine requests of one HTTP request, their events gathered on the event loop."""

    def __init__(self, served: ServedModel, choices: list[Choice], requests: list[GenerationRequest],
                 timeout: float | None):
        self.served, self.choices, self.requests, self.timeout = served, choices, requests, timeout
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.timed_out = self.gone = False

    def start(self) -> None:
        engine = self.served.engine
        if engine.failure is not None:
            raise ApiError(500, f"the model {self.served.name} stopped working ({type(engine.failure).__name__}: "
                           f"{engine.failure}); the server's other models still answer; restart it to reload",
                           code="engine_failed")
        for choice, request in zip(self.choices, self.requests):
            def on_event(event, i=choice.index):  # on the engine's thread: hand it to the event loop
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
            try:
                choice.handle = engine.submit(request, on_event)
            except EngineBusy as e:
                self.cancel()
                raise ApiError(429, f"the server is busy ({e}); try again later", type="rate_limit_error",
                               code="rate_limit_exceeded") from None

    def cancel(self) -> None:
        for choice in self.choices:
            if choice.handle is not None:
                choice.handle.cancel()

    async def watch(self, request: Request) -> None:
        """Cancel every choice when the client goes away (a streamed response needs none: Starlette cancels it)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.cancel()

    async def events(self) -> AsyncIterator[tuple[Choice, str, bool]]:
        """(choice, new text, whether the choice just finished) as the tokens come; ApiError where a choice failed
        before it produced anything, ClientGone where its client went away."""
        by_index = {c.index: c for c in self.choices}
        open_choices = len(self.choices)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while open_choices:
            if deadline is not None and time.monotonic() > deadline and not self.timed_out:
                self.timed_out = True
                self.cancel()  # each ends with a "cancelled" DoneEvent, taken as "length" below
            wait = 0.5 if deadline is None or self.timed_out else min(0.5, max(0.0, deadline - time.monotonic()) + 0.01)
            try:
                index, event = await asyncio.wait_for(self.queue.get(), wait)
            except TimeoutError:
                continue
            choice = by_index[index]
            if isinstance(event, TokenEvent):
                text = choice.add(event)
                if text:
                    yield choice, text, False
                continue
            open_choices -= 1
            choice.prompt_tokens, choice.cached_tokens = event.prompt_tokens, event.cached_tokens
            yield choice, choice.end(self._reason(choice, event)), True

    def _reason(self, choice: Choice, done: DoneEvent) -> str:
        if done.reason in ("stop", "length"):
            return done.reason
        if done.reason == "cancelled" and self.gone:
            raise ClientGone()
        if done.reason == "cancelled" and (choice.finish == "stop" or (self.timed_out and choice.ids)):
            return "length"
        if done.reason == "cancelled" and self.timed_out:
            raise ApiError(503, f"the request produced nothing within the server's --request-timeout of "
                           f"{self.timeout:g} s", code="timeout")
        if done.reason == "timeout":
            raise ApiError(503, f"the server is busy: the request {done.error}; try again later", code="queue_timeout")
        if done.reason == "error":
            raise ApiError(500, f"the model {self.served.name} failed: {done.error}", code="engine_failed")
        raise ApiError(500, f"the request ended early ({done.reason})")


def _requests(prompts: list[list[int]], body: _Sampling, max_tokens: int, stop_ids, top_logprobs: int):
    """One engine request per choice: each prompt n times, choice i seeded seed + i."""
    out = []
    for p in prompts:
        for _ in range(body.n):
            seed = None if body.seed is None else (body.seed + len(out)) % 2**63
            out.append(GenerationRequest(p, max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k or None,
                                         top_p=body.top_p, stop_ids=frozenset(stop_ids), seed=seed,
                                         top_logprobs=top_logprobs))
    return out


def _usage(choices: list[Choice], prompts: list[list[int]]) -> dict:
    completion = sum(len(c.ids) for c in choices)
    prompt = sum(len(p) for p in prompts)  # each prompt once, whatever n (as OpenAI counts)
    n = max(1, len(choices) // max(1, len(prompts)))
    cached = sum(c.cached_tokens for c in choices[::n])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _finite(logprob: float) -> float:
    return max(logprob, -1e4)  # JSON has no -Infinity (a token the model gives no chance at all)


def _completion_logprobs(tokenizer, events: list[TokenEvent], offset: int) -> dict:
    tokens = [_token_text(tokenizer, e.token) for e in events]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [_finite(e.logprob) for e in events],
            "top_logprobs": [{_token_text(tokenizer, t): _finite(lp) for t, lp in e.top} for e in events],
            "text_offset": offsets}


def _chat_logprobs(tokenizer, events: list[TokenEvent]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                        for e in events], "refusal": None}


# --------------------------------------------------------------------------- the routes


async def _run(request: Request, served: ServedModel, body: _Sampling, prompts: list[list[int]], max_tokens: int,
               stop_ids, top_logprobs: int, chunk, final) -> object:
    """Generate every choice; a JSON response from final(choices, usage), or a stream of chunk(choice, text, ...)."""
    settings = request.app.state.settings
    stops = _stops(body.stop)
    requests = _requests(prompts, body, max_tokens, stop_ids, top_logprobs)
    choices = [Choice(i, served.tokenizer, stops) for i in range(len(requests))]
    generation = Generation(served, choices, requests, settings.request_timeout)
    generation.start()
    if not body.stream:
        watcher = asyncio.create_task(generation.watch(request))
        try:
            async for _ in generation.events():
                pass
        except ClientGone:  # nobody reads this answer; it is counted in /metrics as 499 (nginx's "client closed")
            return JSONResponse(error_body(ApiError(499, "the client closed the request")), status_code=499)
        finally:
            watcher.cancel()
            generation.cancel()
        return JSONResponse(final(choices, _usage(choices, prompts)))

    events = generation.events()
    watcher = asyncio.create_task(generation.watch(request))  # while waiting for a slot; then Starlette watches
    try:
        first = await anext(events)  # an error before any token is still an HTTP error, not a broken stream
    except ClientGone:
        return JSONResponse(error_body(ApiError(499, "the client closed the request")), status_code=499)
    except BaseException:
        generation.cancel()
        raise
    finally:
        watcher.cancel()
    usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream():
        def data(payload: dict) -> str:
            if usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        try:
            for opening in chunk(None, None, False, opening=True):
                yield data(opening)
            yield data(chunk(*first))
            async for choice, text, finished in events:
                yield data(chunk(choice, text, finished))
            if usage:
                yield f"data: {json.dumps({**chunk(None, None, False, empty=True), 'usage': _usage(choices, prompts)})}\n\n"
        except ApiError as e:  # a choice failed after others had streamed: say so in the stream
            yield f"data: {json.dumps(error_body(e))}\n\n"
        finally:
            generation.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/v1/completions")
async def completions(request: Request):
    """Continue text prompts, as OpenAI's (legacy) completions endpoint."""
    settings = request.app.state.settings
    body = await _parse(request, CompletionRequest)
    served = await _served(request, body.model)
    raw = body.prompt
    if isinstance(raw, str):
        prompts = [served.text_prompt(raw)]
    elif raw and all(isinstance(p, int) for p in raw):  # token ids, taken as they are
        prompts = [list(raw)]
    elif raw and all(isinstance(p, list) for p in raw):
        prompts = [list(p) for p in raw]
    elif raw:
        prompts = [served.text_prompt(p) for p in raw]
    else:
        raise ApiError(400, "prompt: give a string, a list of strings or of token ids", param="prompt")
    asked = body.max_tokens
    if "max_tokens" not in body.model_fields_set:  # OpenAI's default of 16, within a lower --max-tokens-limit
        asked = min(asked, settings.max_tokens_limit or asked)
    max_tokens = _check_limits(body, served, settings, asked, len(prompts) * body.n)
    for ids in prompts:
        _check_prompt(ids, served, settings)
    top = body.logprobs or 0
    rid, created, tok = f"cmpl-{uuid.uuid4().hex}", int(time.time()), served.tokenizer

    def head(choices: list[dict]) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": served.name, "choices": choices,
                "system_fingerprint": None}

    def chunk(choice, text, finished, opening=False, empty=False):
        if opening:
            return []  # completions have no opening chunk
        if empty:
            return head([])
        logprobs = None
        if body.logprobs is not None:
            events = choice.take_logprobs()
            logprobs = _completion_logprobs(tok, events, len(choice.text) - len(text))
        return head([{"index": choice.index, "text": text, "logprobs": logprobs,
                      "finish_reason": choice.finish if finished else None}])

    def final(choices: list[Choice], usage: dict) -> dict:
        out = []
        for c in choices:
            logprobs = None if body.logprobs is None else _completion_logprobs(tok, c.kept_events(), 0)
            out.append({"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish})
        return {**head(out), "usage": usage}

    return await _run(request, served, body, prompts, max_tokens, served.stop_ids, top, chunk, final)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    """The assistant's next message, through the run's chat template (oldest turns dropped to fit the context)."""
    settings = request.app.state.settings
    body = await _parse(request, ChatRequest)
    served = await _served(request, body.model)
    if served.chat is None:
        raise ApiError(400, f"the model {served.name} is a base model without chat tokens; use /v1/completions, "
                       "or fine-tune it with gptlab sft", param="model", code="model_not_chat")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = _check_limits(body, served, settings, asked, body.n)
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])}
                for m in body.messages]
    try:
        prompt = chat_prompt(served.tokenizer, messages, served.context_length, max_tokens, what=served.name)
    except GptlabError as e:
        raise ApiError(400, str(e), param="messages", code="context_length_exceeded" if "context" in str(e) else None) from None
    _check_prompt(prompt.ids, served, settings)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    rid, created, tok = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), served.tokenizer

    def head(choices: list[dict], kind: str) -> dict:
        return {"id": rid, "object": kind, "created": created, "model": served.name, "choices": choices,
                "system_fingerprint": None}

    def chunk(choice, text, finished, opening=False, empty=False):
        if opening:  # every choice's first delta carries the role
            return [head([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}], "chat.completion.chunk") for i in range(len(prompts) * body.n)]
        if empty:
            return head([], "chat.completion.chunk")
        logprobs = _chat_logprobs(tok, choice.take_logprobs()) if body.logprobs else None
        delta = {"content": text} if text or not finished else {}
        return head([{"index": choice.index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": choice.finish if finished else None}], "chat.completion.chunk")

    def final(choices: list[Choice], usage: dict) -> dict:
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(tok, c.kept_events()) if body.logprobs else None, "finish_reason": c.finish}
               for c in choices]
        return {**head(out, "chat.completion"), "usage": usage}

    prompts = [prompt.ids]
    return await _run(request, served, body, prompts, prompt.max_new_tokens, prompt.stop_ids, top, chunk, final)


def _model_entry(registry, name: str) -> dict | None:
    """/v1/models' entry for a run: read from the loaded model, or from the run's files (no weights loaded)."""
    served = registry.loaded.get(name)
    if served is not None:
        chat, context, created = served.chat is not None, served.context_length, served.created
    else:
        try:
            run_dir = registry.run_dir(name)
            context = load_run_config(run_dir).model.context_length
            chat = has_chat_tokens(load_tokenizer(run_dir / "tokenizer.json"))
            created = int(run_dir.stat().st_mtime)
        except (GptlabError, OSError, UnknownModel):  # a run being written, or gone since the listing
            return None
    return {"id": name, "object": "model", "created": created, "owned_by": "gptlab", "chat": chat,
            "context_length": context}


@router.get("/v1/models")
def list_models(request: Request):
    registry = request.app.state.registry
    entries = [_model_entry(registry, name) for name in registry.names()]
    return {"object": "list", "data": [e for e in entries if e is not None]}


@router.get("/v1/models/{name:path}")
def get_model(request: Request, name: str):
    entry = None
    try:
        request.app.state.registry.run_dir(name)
        entry = _model_entry(request.app.state.registry, name)
    except UnknownModel:
        pass
    if entry is None:
        raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
    return entry
