"""The learner's signal handling: the first SIGTERM/SIGINT asks for a graceful end (set before the
bus is served, so a signal that lands while the learner is still building is not lost), the second
forces one."""

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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_sets_stop_second_forces(sig, restore_handlers):
    stop = stop_on_signals()
    assert not stop.is_set()
    os.kill(os.getpid(), sig)  # the handler runs in this (main) thread before kill returns to Python code
    assert stop.is_set()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), sig)
