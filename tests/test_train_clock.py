"""The run's clock: training time only, paused around evaluation, sampling and checkpoints."""

from __future__ import annotations

import pytest

from gptlab.train.clock import RunClock


class FakeTime:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_paused_spans_are_not_counted_and_nested_pauses_are_one():
    t = FakeTime()
    clock = RunClock(now=t)
    assert clock.elapsed() == 0.0
    t.now += 5  # not started yet
    clock.start()
    t.now += 2
    with clock.paused():
        t.now += 10
        with clock.paused():
            t.now += 1
        t.now += 3  # still paused after the inner pause ends
        assert clock.elapsed() == 2.0
    t.now += 4
    assert clock.elapsed() == 6.0
    clock.stop()
    t.now += 7
    assert clock.elapsed() == 6.0


def test_a_resumed_clock_starts_at_its_checkpoint_time_and_a_pause_while_stopped_does_not_start_it():
    t = FakeTime()
    clock = RunClock(30.0, now=t)
    with clock.paused():
        t.now += 1
    t.now += 1
    assert clock.elapsed() == 30.0
    clock.start()
    t.now += 0.5
    assert clock.elapsed() == pytest.approx(30.5)


def test_at_least_catches_up_with_the_slowest_rank_but_never_goes_back():
    t = FakeTime()
    clock = RunClock(now=t)
    clock.start()
    t.now += 2
    clock.at_least(3.5)
    assert clock.elapsed() == pytest.approx(3.5)
    clock.at_least(1.0)
    assert clock.elapsed() == pytest.approx(3.5)
    t.now += 1
    assert clock.elapsed() == pytest.approx(4.5)


def test_an_exception_inside_a_pause_restarts_the_clock():
    t = FakeTime()
    clock = RunClock(now=t)
    clock.start()
    with pytest.raises(KeyError), clock.paused():
        raise KeyError
    t.now += 1
    assert clock.elapsed() == 1.0
