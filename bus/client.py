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

Session state machine:

- *open*: a new DEALER connects and sends ``Hello(hello())`` (a callable, so a resent Hello carries
  current state, e.g. the held weight version). Messages sent before the Welcome are held and
  flushed after it.
- *ready* (Welcome received): every ``heartbeat_s`` send ``Heartbeat(stats(), held version)``; the
  server answers each with its version and η. The Welcome's heartbeat interval and liveness replace
  ours so both ends agree on when a peer is dead. ``on_welcome`` fires on every Welcome (a new
  epoch means the learner restarted).
- ``Error(hello_first)`` (the server does not know us: it restarted): say Hello again at once; a
  request answered so was not processed, so it is resent after the Welcome.
- silence for ``liveness × heartbeat_s`` (nothing heard at all): close the socket, wait the backoff
  (RECONNECT_MIN_S doubling to RECONNECT_MAX_S, reset by a Welcome), open a new one. Requests in
  flight on the old socket have an unknown fate: they fail with TimeoutError at their deadline and
  the caller decides whether to retry.
- an Error answering the Hello itself (refused, e.g. a bad admin key) is final: ``connect`` raises it.
"""

from __future__ import annotations

import itertools
import os
import queue
import select
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import zmq

from bus.codec import decode, encode
from bus.messages import (
    ERR_HELLO_FIRST,
    HEARTBEAT_S,
    LIVENESS,
    MAX_MESSAGE_BYTES,
    RECONNECT_MAX_S,
    RECONNECT_MIN_S,
    Bye,
    Error,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    Welcome,
)
from bus.server import EVENTS, NOBLOCK, POLLIN, configure_socket, recv_frames, send_frames
from common.log import get_logger

if TYPE_CHECKING:
    from bus.auth import CurveConfig

log = get_logger(component="bus.client")
_BYE_LINGER_MS = 500  # the one place we linger: give a Bye a moment to leave so leases return at once
_PUMP_BUDGET = 1024  # most messages handled per pump, so one flood cannot hold the lock forever
_BUSY_POLL_S = 0.05  # the I/O thread's poll period while callers pump the socket themselves


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


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _poke(fd: int) -> None:
    try:
        os.write(fd, b"x")
    except (BlockingIOError, OSError):  # full means it is readable already; closed means we are done
        pass


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _wait_readable(fds: list[int], timeout: float) -> None:  # noqa: D103
    try:
        select.select(fds, [], [], max(0.0, timeout))
    except (OSError, ValueError):  # a socket closed under us (reconnect): just go round again
        time.sleep(0.001)


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
        self._curve = curve
        self._ctx = zmq.Context(io_threads=1)
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._pending: dict[int, _Waiter] = {}
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._welcome_cbs: list[Callable[[Welcome], None]] = []
        self._welcomed = threading.Event()
        self._fatal: RemoteError | None = None
        self._wake_r, self._wake_w = _pipe()  # wakes the I/O thread
        self._dlv_r, self._dlv_w = _pipe()  # wakes callers whose reply another thread pumped
        self._fd_waiters = 0
        self._last_wait = 0.0  # when a caller last stopped waiting on the socket
        self._s = _Session(self)
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
        _poke(self._wake_w)
        _poke(self._dlv_w)
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
                    ready = select.select(fds, [], [], remaining)[0]
                except (OSError, ValueError):  # the socket closed under us (reconnect): go round
                    ready = []
                    time.sleep(0.001)
                if self._dlv_r in ready:
                    _drain_pipe(self._dlv_r)
                if not waiter.done:
                    with self._lock:
                        self._s.pump()
                        fd = self._s.fd
            return True
        finally:
            with self._lock:
                self._fd_waiters -= 1
                self._last_wait = time.monotonic()

    def _deliver(self, rid: int, msg: Message) -> bool:
        """Under the lock: hand a reply to its waiter (False: nobody waits, e.g. it timed out)."""
        waiter = self._pending.pop(rid, None)
        if waiter is None:
            return False
        waiter.value = msg
        waiter.done = True
        if waiter.thread != threading.get_ident():
            _poke(self._dlv_w)  # it may be asleep in select on the socket we just drained
        return True

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
                for w in callbacks:
                    self._run_welcome_callbacks(w)
                if callbacks:
                    self._welcomed.set()
                if s.need_hello and hello is None and time.monotonic() >= s.hello_retry_at:
                    continue  # build the Hello now, outside the lock
                _wait_readable([self._wake_r] if fd is None else [self._wake_r, fd], timeout)
                _drain_pipe(self._wake_r)
        except Exception:  # noqa: BLE001
            log.exception("client I/O thread failed", endpoint=self.endpoint)
        finally:
            self._welcomed.set()  # never leave connect() waiting on a dead thread

    def _call_hello(self) -> Hello | None:
        try:
            return self._hello_fn()
        except Exception:  # noqa: BLE001 — retried a heartbeat later
            log.exception("hello() failed")
            self._s.hello_retry_at = time.monotonic() + self.heartbeat_s
            return None

    def _make_heartbeat(self) -> Heartbeat:
        try:
            version = self._hello_fn().weight_version
            stats = {k: float(v) for k, v in (self._stats_fn() if self._stats_fn else {}).items()}
        except Exception:  # noqa: BLE001 — a broken stats callback must not stop heartbeats
            log.exception("stats() failed")
            version, stats = -1, {}
        return Heartbeat(weight_version=version, stats=stats)

    def _run_welcome_callbacks(self, w: Welcome) -> None:
        for fn in self._welcome_cbs:
            try:
                fn(w)
            except Exception:  # noqa: BLE001
                log.exception("on_welcome callback failed")


class _Session:
    """Socket and session state; every method runs under the client's lock."""

    def __init__(self, client: Client):
        self.c = client
        self.sock: zmq.Socket | None = None
        self.fd: int | None = None
        self.running = True
        self.ready = False
        self.need_hello = True
        self.hello_retry_at = 0.0
        self.hello_rid = 0
        self.hello_sent = 0.0
        self.last_heard = time.monotonic()
        self.next_hb = 0.0
        self.backoff = RECONNECT_MIN_S
        self.reopen_at: float | None = None
        self.held: list[tuple[int, list[Any]]] = []  # (rid, frames) waiting for the session
        self.inflight: dict[int, list[Any]] = {}  # rid -> frames, to resend after hello_first
        self.welcomes: list[Welcome] = []  # for the I/O thread's on_welcome callbacks

    def next_deadline(self) -> float:
        if self.reopen_at is not None:
            return self.reopen_at
        due = self.last_heard + self.c.liveness * self.c.heartbeat_s
        if self.ready:
            due = min(due, self.next_hb)
        if self.need_hello:
            due = min(due, self.hello_retry_at)
        return due

    # --- socket lifecycle

    def open(self) -> None:
        c = self.c
        sock = c._ctx.socket(zmq.DEALER)
        configure_socket(sock, c.max_message_bytes)
        if c._curve is not None:
            from bus.auth import apply_client

            apply_client(sock, c._curve)
        sock.connect(c.endpoint)
        self.sock, self.fd = sock, sock.getsockopt(zmq.FD)
        self.reopen_at = None
        self.last_heard = time.monotonic()

    def shutdown_socket(self, bye: str | None) -> None:
        if self.sock is None:
            return
        if bye is not None and self.ready:
            self.raw_send(encode(Bye(reason=bye)))
            self.sock.setsockopt(zmq.LINGER, _BYE_LINGER_MS)
        self.sock.close()
        self.sock = self.fd = None
        self.ready = False
        self.inflight.clear()  # their fate is unknown: the callers time out and decide

    def raw_send(self, frames: list[Any]) -> bool:
        if self.sock is None:
            return False
        try:
            send_frames(self.sock, frames, NOBLOCK)
            self.c.metrics["bus/messages_out"] += 1
            return True
        except zmq.ZMQError as e:  # EAGAIN: the server is not draining; the request times out
            log.warning("send failed", error=str(e))
            return False

    def submit(self, rid: int, frames: list[Any]) -> None:
        if not self.ready:
            self.held.append((rid, frames))
            return
        if rid:
            self.inflight[rid] = frames
        self.raw_send(frames)

    # --- timers (I/O thread)

    def tick(self, now: float, hello: Hello | None, beat: Heartbeat | None) -> None:
        if self.reopen_at is not None:
            if now < self.reopen_at:
                return
            self.open()
            self.need_hello = True
        if self.sock is None:
            self.open()
        if self.need_hello and hello is not None:
            self.need_hello = False
            self.hello_rid = next(self.c._rids)
            self.hello_sent = now
            self.raw_send(encode(hello, self.hello_rid))
        if now - self.last_heard > self.c.liveness * self.c.heartbeat_s:
            log.warning("server silent, reconnecting", endpoint=self.c.endpoint, backoff_s=self.backoff)
            self.shutdown_socket(None)
            self.reopen_at = now + self.backoff
            self.backoff = min(self.backoff * 2, RECONNECT_MAX_S)
            return
        if beat is not None and self.ready:
            self.next_hb = now + self.c.heartbeat_s
            self.raw_send(encode(beat))
            self.inflight = {r: f for r, f in self.inflight.items() if r in self.c._pending}

    # --- input (any thread)

    def pump(self) -> None:
        """Handle every message the socket holds now (ZMQ_FD is edge-triggered: read to empty)."""
        for _ in range(_PUMP_BUDGET):
            if self.sock is None or not self.sock.get(EVENTS) & POLLIN:
                return
            frames = recv_frames(self.sock, NOBLOCK)
            self.last_heard = time.monotonic()
            self.c.metrics["bus/messages_in"] += 1
            try:
                msg, rid = decode(frames, max_bytes=self.c.max_message_bytes)
            except ProtocolError as e:
                self.c.metrics["bus/bad_messages"] += 1
                log.warning("bad message from server", reason=str(e))
                continue
            self.on_message(msg, rid)
        _poke(self.c._wake_w)  # budget spent: let the I/O thread continue

    def on_message(self, msg: Message, rid: int) -> None:
        c = self.c
        if isinstance(msg, Welcome):
            self.on_welcome(msg)
        elif isinstance(msg, Heartbeat):
            if msg.version >= 0:
                c.server_version = msg.version
            if msg.max_staleness >= 0:
                c.server_max_staleness = msg.max_staleness
        elif isinstance(msg, Error) and msg.code == ERR_HELLO_FIRST:
            if rid in self.inflight:
                self.held.append((rid, self.inflight.pop(rid)))
            if self.ready or (not self.need_hello and time.monotonic() - self.hello_sent > c.heartbeat_s):
                log.info("server does not know us: saying Hello again", endpoint=c.endpoint)
                self.ready, self.need_hello = False, True
                _poke(c._wake_w)
        elif isinstance(msg, Error) and rid == self.hello_rid:
            c._fatal = RemoteError(msg.code, msg.message)
            log.error("hello refused", code=msg.code, message=msg.message)
            self.running = False
            c._welcomed.set()
            _poke(c._wake_w)
        elif rid:
            self.inflight.pop(rid, None)
            c._deliver(rid, msg)  # False: a late reply to a request that timed out
        elif isinstance(msg, Error):
            c.metrics["bus/errors"] += 1
            log.warning("server error", code=msg.code, message=msg.message)
        else:
            c._inbox.put(msg)

    def on_welcome(self, w: Welcome) -> None:
        c = self.c
        if c.welcome is not None:
            c.reconnects += 1
            c.metrics["bus/reconnects"] = float(c.reconnects)
        c.welcome = w
        c.server_version = w.version
        c.server_max_staleness = w.max_staleness
        if w.heartbeat_s > 0:
            c.heartbeat_s = w.heartbeat_s
        if w.liveness > 0:
            c.liveness = w.liveness
        self.ready = True
        self.need_hello = False
        self.backoff = RECONNECT_MIN_S
        self.next_hb = time.monotonic() + c.heartbeat_s
        held, self.held = self.held, []
        for rid, frames in held:
            if rid == 0 or rid in c._pending:
                self.submit(rid, frames)
        self.welcomes.append(w)
        _poke(c._wake_w)  # the I/O thread runs the callbacks, then releases connect()
