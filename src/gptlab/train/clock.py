"""The run's clock: seconds spent training, which the time limit, the schedule and tokens/s go by.

Evaluation, sampling and checkpoints are not training: the trainer runs them inside `clock.paused()`.
A resumed run's clock starts at the time its checkpoint had trained.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


class RunClock:
    def __init__(self, elapsed: float = 0.0, now: Callable[[], float] = time.perf_counter):
        self._now = now
        self._counted = elapsed  # seconds up to the last pause (or the start)
        self._since: float | None = None  # when it last started running; None while stopped or paused

    def start(self) -> None:
        if self._since is None:
            self._since = self._now()

    def stop(self) -> None:
        self._counted = self.elapsed()
        self._since = None

    def elapsed(self) -> float:
        return self._counted + (self._now() - self._since if self._since is not None else 0.0)

    def at_least(self, seconds: float) -> None:
        """Count `seconds` if more time than that has not been counted already (distributed: the ranks go by
        the slowest one's time)."""
        self._counted += max(0.0, seconds - self.elapsed())

    @contextmanager
    def paused(self) -> Iterator[None]:
        """What runs inside is not counted; nested pauses are one pause."""
        running = self._since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()
