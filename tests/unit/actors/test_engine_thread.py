"""EngineThread: every call on one daemon thread, in order; a waiter leaves on the stop flag or a
timeout while the call runs on, and gets the call's exception raised back."""

from __future__ import annotations

import threading
import time

import pytest

from actors.engine_thread import EngineThread


def test_calls_run_in_order_on_one_daemon_thread():
    et = EngineThread()
    try:
        threads = [et.run(threading.current_thread) for _ in range(3)]
        assert len({t.ident for t in threads}) == 1 and threads[0] is not threading.current_thread()
        assert threads[0].daemon  # the interpreter does not wait for it at exit
        order: list[int] = []
        calls = [et.submit(order.append, i) for i in range(5)]
        assert all(c.wait(timeout=5) for c in calls) and order == list(range(5))
    finally:
        et.stop()


def test_an_exception_is_raised_in_the_waiting_thread():
    et = EngineThread()
    try:
        with pytest.raises(ValueError, match="bad prompt"):
            et.run(lambda: (_ for _ in ()).throw(ValueError("bad prompt")))
        assert et.run(lambda: 7) == 7  # the thread survives it
    finally:
        et.stop()


def test_the_waiter_leaves_on_stop_or_timeout_and_the_call_runs_on():
    et = EngineThread()
    release, stop = threading.Event(), threading.Event()
    try:
        call = et.submit(release.wait, 30)
        t0 = time.monotonic()
        assert call.wait(timeout=0.2) is False and 0.2 <= time.monotonic() - t0 < 1.0
        threading.Timer(0.2, stop.set).start()
        assert call.wait(stop) is False and not call.done
        with pytest.raises(RuntimeError, match="not ended"):
            call.result()
        release.set()
        assert call.wait(stop) is True and call.result() is True  # done wins over a set stop flag
    finally:
        release.set()
        et.stop()
