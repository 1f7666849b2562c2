"""The learner's signal handling: SIGTERM/SIGINT ask for a graceful end (set before the bus is
served, so a signal that lands while the learner is still building is not lost); a second SIGINT
forces one, a second SIGTERM (a launcher forwarding it) does not."""

from __future__ import annotations

import os
import signal

import pytest

from learner.run import stop_on_signals


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_sigterm_stops_gracefully_however_often(restore_handlers):
    stop = stop_on_signals()
    assert not stop.is_set()
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in this (main) thread before kill returns
    assert stop.is_set()
    os.kill(os.getpid(), signal.SIGTERM)  # no KeyboardInterrupt
    assert stop.is_set()


def test_second_sigint_forces(restore_handlers):
    stop = stop_on_signals()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.is_set()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
