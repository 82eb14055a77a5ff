"""Stop signals: the first asks the run to stop after its step, a second stops at once, except a Ctrl-C that
torchrun's agent relays moments after the terminal's."""

from __future__ import annotations

import os
import signal

import pytest

from gptlab.train.signals import StopSignals


def test_the_first_signal_is_recorded_and_a_second_stops_at_once():
    s = StopSignals()
    with s.caught():
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.name == "SIGTERM" and s.number == signal.SIGTERM.value
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_under_torchrun_a_relayed_second_signal_within_a_second_is_the_same_request():
    s = StopSignals(relayed=True)
    s.receive(signal.SIGINT)
    s.receive(signal.SIGINT)  # the agent's copy
    assert s.name == "SIGINT"
    s._first -= 2.0
    with pytest.raises(KeyboardInterrupt):
        s.receive(signal.SIGINT)
