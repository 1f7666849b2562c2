"""`EngineThread`: an actor's engine calls, one at a time, on one daemon thread of their own.

Why a thread: a generation can run for minutes, and nothing can safely interrupt an engine from
the outside mid-step (vLLM's `LLM` is not thread-safe; an exception raised into it by a signal
handler leaves it half-way through a step). With the calls on their own thread, the actor's main
thread only waits — for the call's end or the actor's stop flag, whichever comes first — so it can
hand its leases back at once while the generation winds down (`Engine.abort`) or is left to the
process exit.

One long-lived thread for every call (weight loads and `close` too, not only generation): the
engine sees a single thread, as when the main thread drove it — one OpenMP pool, one CUDA current
stream, thread-local state set up once. A daemon thread and not a ThreadPoolExecutor: the
interpreter joins an executor's threads at exit, which would wait out the very generation the
actor walked away from.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
POLL_S = 0.1  # how often a waiter looks at the stop flag and the clock


class Call(Generic[T]):
    """One call made on the engine thread: `wait` for it, then take its `result`."""

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        self._fn, self._args = fn, args
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as e:  # noqa: BLE001 — handed to the waiting thread by result()
            self._error = e
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, stop: threading.Event | None = None, timeout: float | None = None) -> bool:
        """True once the call has ended; False as soon as `stop` is set or `timeout` s have passed
        first (the call runs on). `stop` is only read, never waited on: a signal handler that sets
        it on the main thread would deadlock on the event's lock if it interrupted that same
        thread inside `stop.wait`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.wait(POLL_S):
            if stop is not None and stop.is_set():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    def result(self) -> T:
        """The call's return value, or its exception raised again here; only after `wait` said True."""
        if not self._done.is_set():
            raise RuntimeError("the call has not ended")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class EngineThread:
    """Runs submitted calls in order on one daemon thread (see the module doc)."""

    def __init__(self, name: str = "engine") -> None:
        self._calls: queue.SimpleQueue[Call[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Call[T]:
        call: Call[T] = Call(fn, args)
        self._calls.put(call)
        return call

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the engine thread, waited for to the end (loads, close: seconds at most)."""
        call = self.submit(fn, *args)
        call.wait()
        return call.result()

    def stop(self) -> None:
        """End the thread after the calls already submitted."""
        self._calls.put(None)

    def _loop(self) -> None:
        while (call := self._calls.get()) is not None:
            call.run()
