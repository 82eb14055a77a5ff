"""The browser pages: the playground (/) and the training dashboard (/runs), with every asset served from the package."""

from __future__ import annotations

from fastapi import FastAPI


def install(app: FastAPI) -> None:
    """Add the pages, their JSON endpoints (/api/...) and the static assets to the app."""
