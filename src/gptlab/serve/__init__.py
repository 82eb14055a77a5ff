"""The serve stage: a run behind an OpenAI-compatible HTTP API with continuous batching, a playground and a dashboard."""

from gptlab.serve.engine import (
    Completion,
    DoneEvent,
    Engine,
    EngineBusy,
    EngineStats,
    GenerationRequest,
    Handle,
    TokenEvent,
)

__all__ = ["Completion", "DoneEvent", "Engine", "EngineBusy", "EngineStats", "GenerationRequest", "Handle", "TokenEvent"]
