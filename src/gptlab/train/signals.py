"""Ctrl-C and SIGTERM while training: finish the current step, save a checkpoint and return; a second
Ctrl-C stops at once."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator


class StopSignals:
    """`name`: the first stop signal received while `caught()` was active ("SIGINT", "SIGTERM"), else None.

    `relayed`: under torchrun a Ctrl-C arrives twice within moments (from the terminal, then relayed by the
    agent), so only a second signal more than a second after the first means "stop at once".
    """

    def __init__(self, relayed: bool = False):
        self.name: str | None = None
        self.relayed = relayed
        self._first = 0.0

    @property
    def number(self) -> int:
        return signal.Signals[self.name].value if self.name else 0

    def receive(self, signum: int) -> None:
        if self.name and not (self.relayed and time.monotonic() - self._first < 1.0):
            raise KeyboardInterrupt
        if not self.name:
            self.name, self._first = signal.Signals(int(signum)).name, time.monotonic()

    @contextmanager
    def caught(self) -> Iterator[None]:
        """SIGINT and SIGTERM handled by `receive` inside the block (the main thread only: elsewhere Python
        cannot set handlers); the previous handlers come back after it."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, lambda signum, frame: self.receive(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
