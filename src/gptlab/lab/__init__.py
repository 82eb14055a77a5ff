"""The architecture lab: tools to look inside a model (shape traces), for the command line and notebooks."""

from gptlab.lab.trace import TraceRow, format_trace, trace, trace_model

__all__ = ["TraceRow", "format_trace", "trace", "trace_model"]
