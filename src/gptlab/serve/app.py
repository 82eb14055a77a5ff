"""The HTTP server: OpenAI-compatible endpoints over a Registry of runs, /health, /metrics, and the pages.

    registry = Registry("runs/", slots=16)
    app = create_app(registry, ServeSettings(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)      # what `gptlab serve runs/` does

What guards every request, before any route runs (the `Guard` middleware, so the dashboard's /api/
routes that serve/pages.py adds get it too):
  - the API key, when one is set: `Authorization: Bearer KEY` on /v1/*, /api/* and /metrics (Prometheus
    scrapes with `authorization: {credentials: KEY}`); the pages (/, /runs, their assets) and /health stay
    open, so a browser can load the playground and then send the key with its requests;
  - the body size: a body over max_body_bytes is refused with 413 before it is parsed.
Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}, FastAPI's own 422s and 404s
included, and no error stops the server.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.serve import pages
from gptlab.serve.metrics import Metrics
from gptlab.serve.openai_api import ApiError, error_body, router
from gptlab.serve.registry import Registry

# Paths that need the API key (when one is set); everything else (pages, assets, /health) is open.
PROTECTED = ("/v1/", "/api/", "/metrics")


@dataclass
class ServeSettings:
    """The server's limits (the engine's slots, queue and queue timeout are the Registry's)."""

    api_key: str | None = None
    max_tokens_limit: int | None = None  # the most max_tokens a request may ask for (None: the model's context)
    max_prompt_tokens: int | None = None  # the longest prompt taken (None: the model's context less one)
    max_n: int = 8  # the most choices (n) per request
    max_body_bytes: int = 1_000_000  # a larger request body is refused (413) before it is parsed
    request_timeout: float | None = 600.0  # seconds a request may generate for; then it ends ("length")


class Guard:
    """ASGI middleware: the API key and the body size limit (see the module docstring), and the request counts
    of /metrics by endpoint and status code."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(path, message["status"])
            await send(message)

        if self.settings.api_key and path.startswith(PROTECTED) and not self._authorized(scope):
            return await _send_error(counting_send, ApiError(
                401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                type="authentication_error", code="invalid_api_key"))
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive)
            if body is None:
                return await _send_error(counting_send, ApiError(
                    413, f"the request body is larger than {self.settings.max_body_bytes:,} bytes (the server's "
                    "--max-body-bytes)", code="request_too_large"))
            receive = _replay(body, receive)
        await self.app(scope, receive, counting_send)

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = given.partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.settings.api_key.encode())

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None as soon as it is over the limit (a Content-Length over it is not even read)."""
        limit = self.settings.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive() that hands the app the body already read, then goes on to the real one (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps(error_body(error)).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status)


def create_app(registry: Registry, settings: ServeSettings | None = None) -> FastAPI:
    """The server over `registry`'s runs; run it with uvicorn. The registry stays the caller's to close."""
    settings = settings or ServeSettings()
    app = FastAPI(title="gptlab", summary="an OpenAI-compatible server for gptlab runs, with a playground and a dashboard")
    app.state.registry, app.state.settings = registry, settings
    app.state.metrics = metrics = Metrics(registry)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        # FastAPI answers 422 with its own shape; OpenAI's clients expect 400 and {"error": {...}}
        first = error.errors()[0] if error.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request")
        return _error_response(ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else str(error.detail)
        return _error_response(ApiError(error.status_code, message, type=kind, code=code))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):  # a bug: the request fails, the server goes on
        return _error_response(ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))

    @app.get("/health")
    def health():
        """Open to all: is the server up, what it serves, whether the API needs a key."""
        return {"status": "ok", "models": registry.names(), "api_key_required": bool(settings.api_key)}

    @app.get("/metrics")
    def prometheus_metrics():
        """Prometheus text (needs the API key when one is set)."""
        text, content_type = metrics.text()
        return Response(text, media_type=content_type)

    app.include_router(router)
    pages.install(app)
    app.add_middleware(Guard, settings=settings, metrics=metrics)
    return app
