"""How long a run will take: said at start-up, corrected once its first steps are measured.

A run's wall time is its training steps plus the pauses between them: every train.eval_every steps and at
the end, an evaluation with the checkpoint and plots written after it (a checkpoint alone where the data has no
validation split), and a sample every train.sample_every steps. At start-up each is a guess from FLOPs at a
typical MFU; as steps and pauses are measured, the measured times replace the guesses, and a pause not yet
measured is scaled by how far off the steps' guess proved to be.
"""

from __future__ import annotations

import math

WARMUP_STEPS = 2  # not timed: the first steps compile, fill caches and allocate
TIMED_STEPS = 3  # steps measured before the estimate is corrected ...
SETTLED_EVALS = 2  # ... and evaluations (the first also imports and draws the plots) ...
SETTLE_SECONDS = 30.0  # ... or this much training time, if fewer evaluations came in it


class RunEstimate:
    """Seconds left of a run at the pace guessed at start-up, and then at the pace measured.

    `guess`: seconds a training step, an evaluation pause and a sample pause. Call `timed_step(step, trained)`
    after each step with the training seconds so far, `timed_pause(kind, seconds)` after each pause."""

    def __init__(self, guess: dict[str, float], eval_every: int, sample_every: int):
        self.guess, self.eval_every, self.sample_every = guess, eval_every, sample_every
        self.measured: dict[str, float] = {}
        self._timed_from = (0, 0.0)  # (step, training seconds) where step timing starts: the last warm-up step's
        self._steps_seen = self._timed = 0
        self.pauses = {"eval": 0, "sample": 0}  # pauses timed

    def pace(self, kind: str) -> float:
        """Seconds a step ("step"), an evaluation ("eval") or a sample ("sample"): measured, else guessed."""
        if kind in self.measured:
            return self.measured[kind]
        off = self.measured["step"] / self.guess["step"] if "step" in self.measured and self.guess["step"] else 1.0
        return self.guess[kind] * off

    def timed_step(self, step: int, trained: float) -> None:
        self._steps_seen += 1
        if self._steps_seen <= WARMUP_STEPS:
            self._timed_from = (step, trained)
            return
        first, since = self._timed_from
        self._timed = step - first
        self.measured["step"] = (trained - since) / self._timed

    def timed_pause(self, kind: str, seconds: float) -> None:
        self.measured[kind] = seconds  # the latest: the first evaluation also imports and draws the plots
        self.pauses[kind] += 1

    def settled(self, trained: float) -> bool:
        """Enough is measured to correct the start-up estimate: steps past the warm-up, and two evaluations
        or SETTLE_SECONDS of training."""
        return self._timed >= TIMED_STEPS and (self.pauses["eval"] >= SETTLED_EVALS or trained >= SETTLE_SECONDS)

    def seconds_left(self, step: int, steps_left: float | None, train_seconds_left: float | None) -> dict[str, float]:
        """{"train", "pauses", "total"}: the seconds left from `step`, with `steps_left` steps planned and/or
        `train_seconds_left` of max_time (None: no such limit; one of the two must be set)."""
        step_s = self.pace("step")
        by_time = train_seconds_left / step_s if train_seconds_left is not None else math.inf
        steps = max(min(steps_left if steps_left is not None else math.inf, by_time), 0.0)
        end = step + math.ceil(steps)
        evals = end // self.eval_every - step // self.eval_every
        if end > step and end % self.eval_every:
            evals += 1  # the last step is always evaluated
        samples = end // self.sample_every - step // self.sample_every if self.sample_every else 0
        train = min(steps * step_s, train_seconds_left if train_seconds_left is not None else math.inf)
        pauses = evals * self.pace("eval") + samples * self.pace("sample")
        return {"train": train, "pauses": pauses, "total": train + pauses}
