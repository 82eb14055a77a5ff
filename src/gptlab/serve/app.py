"""The HTTP server: OpenAI-compatible endpoints over a Registry of runs, /health, /metrics, and the pages."""

from __future__ import annotations

from fastapi import FastAPI

from gptlab.serve import pages
from gptlab.serve.registry import Registry


def create_app(registry: Registry) -> FastAPI:
    app = FastAPI(title="gptlab")
    app.state.registry = registry
    pages.install(app)
    return app
