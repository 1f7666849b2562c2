"""The DEALER side of the control bus: hello, heartbeat, reconnect (zguide's Paranoid Pirate, client half).

Threads. One lock guards the DEALER and the session state; every socket call happens under it
(zmq allows a socket to move between threads across a full memory barrier, which the lock is).
Callers send directly under the lock and then wait for their reply by polling the socket's
``zmq.FD`` themselves and pumping it under the lock, so a request costs no thread hand-off; a
background I/O thread does the same whenever input arrives while nobody waits (pushes, heartbeat
replies) and runs the timers, so heartbeats go on while the caller blocks for minutes in
generation. Whoever pumps a reply that belongs to another thread marks that waiter done and
writes a byte to a wake-up pipe the waiting callers also poll. User callables (``hello()``,
``stats()``, ``on_welcome``) run on the I/O thread and never under the lock.

The socket and the session state machine (hello, heartbeat, reconnect) are ``bus.session``; the
client is its ``SessionHost`` (the public methods under "session host" below), the one interface
between the two.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import secrets
import queue
import select
import threading
import time
from typing import TYPE_CHECKING, Callable

import zmq

from bus.codec import encode
from bus.messages import (
    HEARTBEAT_S,
    LIVENESS,
    MAX_MESSAGE_BYTES,
    MAX_PROBLEM_CHARS,
    Error,
    Heartbeat,
    Hello,
    Message,
    Welcome,
)
from bus.session import Session, drain_pipe, pipe, poke, wait_readable
from common.log import get_logger

if TYPE_CHECKING:
    from bus.auth import CurveConfig

log = get_logger(component="bus.client")
_BUSY_POLL_S = 0.05  # the I/O thread's poll period while callers pump the socket themselves
_WAIT_SLICE_S = 0.05  # longest a waiting caller sleeps before re-checking its reply


class Disconnected(TimeoutError):
    """The session was lost while a request waited: it may or may not have been handled; retry it
    (a TimeoutError, so callers that retry on a timeout retry on this too)."""


class RemoteError(RuntimeError):
    """The server answered a request with Error(code, message)."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class _Waiter:
    __slots__ = ("done", "value", "thread")

    def __init__(self) -> None:
        self.done = False
        self.value: Message | None = None
        self.thread = threading.get_ident()



class HealthFile:
    """A file whose mtime says "this process hears from the learner" (``bus.health_file``): touched
    at most once a second by the client's I/O thread while its session is alive, so a liveness probe
    (Kubernetes exec, a supervisor) reads its age. A write error is logged once, never raised."""

    def __init__(self, path: str):
        self.path = path
        self._last = 0.0
        self._warned = False

    def touch(self, now: float) -> None:
        if now - self._last < 1.0:
            return
        self._last = now
        try:
            with open(self.path, "a"):
                os.utime(self.path)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("health file not writable", path=self.path, error=str(e))


class Client:
    def __init__(
        self,
        endpoint: str,
        hello: Callable[[], Hello],
        *,
        heartbeat_s: float = HEARTBEAT_S,
        liveness: int = LIVENESS,
        stats: Callable[[], dict[str, float]] | None = None,
        curve: "CurveConfig | None" = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        problem: Callable[[], str] | None = None,
        health_file: str = "",
    ):
        self.endpoint = endpoint
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.max_message_bytes = max_message_bytes
        self.welcome: Welcome | None = None
        self.server_version = -1
        self.server_max_staleness = -1
        self.reconnects = 0
        self.metrics: dict[str, float] = dict.fromkeys(
            ("bus/reconnects", "bus/bad_messages", "bus/errors", "bus/messages_in", "bus/messages_out"), 0.0)
        self._hello_fn = hello
        self._stats_fn = stats
        self.session = secrets.token_hex(8)  # sent in every Hello: a reconnect is told apart from an impostor
        self._problem_fn = problem
        self._health = HealthFile(health_file) if health_file else None
        self._ctx = zmq.Context(io_threads=1)
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._pending: dict[int, _Waiter] = {}
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._welcome_cbs: list[Callable[[Welcome], None]] = []
        self._welcomed = threading.Event()
        self._fatal: RemoteError | None = None
        self._wake_r, self._wake_w = pipe()  # wakes the I/O thread
        self._dlv_r, self._dlv_w = pipe()  # wakes callers whose reply another thread pumped
        self._fd_waiters = 0
        self._last_wait = 0.0  # when a caller last stopped waiting on the socket
        self._s = Session(self, self._ctx, curve)
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- caller API --------------------------------------------------------------------------

    def on_welcome(self, fn: Callable[[Welcome], None]) -> None:
        """Called on the I/O thread after every (re)Welcome."""
        self._welcome_cbs.append(fn)

    def connect(self, timeout: float | None = None) -> Welcome:
        """Start the I/O thread (once), say Hello, wait for the Welcome; TimeoutError if none came."""
        if self._closed:
            raise RuntimeError("client is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._io_main, name="bus-client", daemon=True)
            self._thread.start()
        if not self._welcomed.wait(timeout):
            raise TimeoutError(f"no Welcome from {self.endpoint} within {timeout} s")
        if self._fatal is not None:
            raise self._fatal
        if self.welcome is None:
            raise RuntimeError("client stopped before a Welcome")
        return self.welcome

    def request(self, msg: Message, timeout: float) -> Message:
        """Send `msg` and wait for the reply with its rid; TimeoutError, or RemoteError on Error."""
        rid = next(self._rids)
        waiter = _Waiter()
        frames = encode(msg, rid)
        with self._lock:
            self._pending[rid] = waiter
            self._s.submit(rid, frames)
            self._s.pump()
        if not self._wait(waiter, time.monotonic() + timeout):
            with self._lock:
                self._pending.pop(rid, None)
            if not waiter.done:
                raise TimeoutError(f"no reply to {msg.TYPE} within {timeout} s")
        reply = waiter.value
        if reply is None:
            raise Disconnected(f"connection to {self.endpoint} lost while waiting for the reply to {msg.TYPE}")
        if isinstance(reply, Error):
            raise RemoteError(reply.code, reply.message)
        assert reply is not None
        return reply

    def send(self, msg: Message) -> None:
        """Fire and forget (held until the session is up)."""
        frames = encode(msg)
        with self._lock:
            self._s.submit(0, frames)
            self._s.pump()

    def recv(self, timeout: float | None) -> Message | None:
        """The next unsolicited message from the server, or None after `timeout` seconds."""
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self, bye: str | None = "shutdown") -> None:
        """Say Bye (if given), stop the I/O thread, close the socket; pending requests time out."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._s.running = False
            self._s.shutdown_socket(bye)
        poke(self._wake_w)
        poke(self._dlv_w)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for fd in (self._wake_r, self._wake_w, self._dlv_r, self._dlv_w):
            os.close(fd)
        self._ctx.term()

    # --- waiting -----------------------------------------------------------------------------

    def _wait(self, waiter: _Waiter, deadline: float) -> bool:
        """Until `waiter` is done or the deadline: poll the socket ourselves, pump under the lock.
        (`request` pumped right after sending, so the first step is to wait.)"""
        with self._lock:
            self._fd_waiters += 1
            fd = self._s.fd
        try:
            while not waiter.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return False
                fds = [self._dlv_r] if fd is None else [self._dlv_r, fd]
                try:
                    # bounded: the delivery pipe is shared by every waiting thread, so another
                    # waiter may drain the poke meant for us; we then notice within _WAIT_SLICE_S
                    ready = select.select(fds, [], [], min(remaining, _WAIT_SLICE_S))[0]
                except (OSError, ValueError):  # the socket closed under us (reconnect): go round
                    ready = []
                    time.sleep(0.001)
                if self._dlv_r in ready:
                    drain_pipe(self._dlv_r)
                if not waiter.done:
                    with self._lock:
                        self._s.pump()
                        fd = self._s.fd
            return True
        finally:
            with self._lock:
                self._fd_waiters -= 1
                self._last_wait = time.monotonic()

    # --- session host (bus.session.SessionHost: called by the session under the lock) -----------

    def next_rid(self) -> int:
        return next(self._rids)

    def is_pending(self, rid: int) -> bool:
        return rid in self._pending

    def push(self, msg: Message) -> None:
        self._inbox.put(msg)

    def wake(self) -> None:
        poke(self._wake_w)

    def deliver(self, rid: int, msg: Message) -> bool:
        """Under the lock: hand a reply to its waiter (False: nobody waits, e.g. it timed out)."""
        waiter = self._pending.pop(rid, None)
        if waiter is None:
            return False
        waiter.value = msg
        waiter.done = True
        if waiter.thread != threading.get_ident():
            poke(self._dlv_w)  # it may be asleep in select on the socket we just drained
        return True

    def disconnected(self, rid: int) -> None:
        """Under the lock: the session carrying request `rid` is gone; its caller gets Disconnected."""
        waiter = self._pending.pop(rid, None)
        if waiter is None:
            return
        waiter.value = None
        waiter.done = True
        if waiter.thread != threading.get_ident():
            poke(self._dlv_w)

    def refused(self, error: Error) -> None:
        """Under the lock: the server answered our Hello with `error`; ``connect`` raises it."""
        self._fatal = RemoteError(error.code, error.message)
        self._welcomed.set()

    # --- I/O thread --------------------------------------------------------------------------

    def _io_main(self) -> None:
        s = self._s
        try:
            while True:
                hello = self._call_hello() if s.need_hello and time.monotonic() >= s.hello_retry_at else None
                beat = self._make_heartbeat() if s.ready and time.monotonic() >= s.next_hb else None
                with self._lock:
                    if not s.running:
                        break
                    s.pump()
                    s.tick(time.monotonic(), hello, beat)
                    s.pump()
                    callbacks, s.welcomes = s.welcomes, []
                    now = time.monotonic()
                    timeout = s.next_deadline() - now
                    # While callers are busy with requests they pump the socket themselves; this
                    # thread then only glances every _BUSY_POLL_S instead of racing them per reply.
                    busy = self._fd_waiters or now - self._last_wait < _BUSY_POLL_S
                    fd = None if busy else s.fd
                    if busy:
                        timeout = min(timeout, _BUSY_POLL_S)
                if self._health is not None and s.ready and now - s.last_heard < self.heartbeat_s * self.liveness:
                    self._health.touch(now)
                for w in callbacks:
                    self._run_welcome_callbacks(w)
                if callbacks:
                    self._welcomed.set()
                if s.need_hello and hello is None and time.monotonic() >= s.hello_retry_at:
                    continue  # build the Hello now, outside the lock
                wait_readable([self._wake_r] if fd is None else [self._wake_r, fd], timeout)
                drain_pipe(self._wake_r)
        except Exception:  # noqa: BLE001
            log.exception("client I/O thread failed", endpoint=self.endpoint)
        finally:
            self._welcomed.set()  # never leave connect() waiting on a dead thread

    def _call_hello(self) -> Hello | None:
        try:
            hello = self._hello_fn()
            return hello if hello.session else dataclasses.replace(hello, session=self.session)
        except Exception:  # noqa: BLE001 — retried a heartbeat later
            log.exception("hello() failed")
            self._s.hello_retry_at = time.monotonic() + self.heartbeat_s
            return None

    def _make_heartbeat(self) -> Heartbeat:
        try:
            version = self._hello_fn().weight_version
            stats = {k: float(v) for k, v in (self._stats_fn() if self._stats_fn else {}).items()}
            problem = self._problem_fn() if self._problem_fn else ""
        except Exception:  # noqa: BLE001 — a broken stats callback must not stop heartbeats
            log.exception("stats() failed")
            version, stats, problem = -1, {}, ""
        return Heartbeat(weight_version=version, stats=stats, problem=problem[:MAX_PROBLEM_CHARS])

    def _run_welcome_callbacks(self, w: Welcome) -> None:
        for fn in self._welcome_cbs:
            try:
                fn(w)
            except Exception:  # noqa: BLE001
                log.exception("on_welcome callback failed")
