"""The client's DEALER socket and session state machine (``Session``), and its wake-up pipes.

Every ``Session`` method runs under the owning client's lock. What the session needs from its
client is the ``SessionHost`` protocol below, and nothing else: the settings and server state it
reads and updates (endpoint, heartbeat and liveness, metrics, the last Welcome and version) and the
calls that hand results back (``deliver`` a reply, ``disconnected``, ``refused``, ``push`` an
unsolicited message, ``wake`` the I/O thread). ``bus.client.Client`` is the one implementation.
``pump`` reads the socket to empty (ZMQ_FD is edge-triggered), at most ``_PUMP_BUDGET`` messages
per call so one flood cannot hold the lock forever.

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

import os
import select
import time
from typing import TYPE_CHECKING, Any, Protocol

import zmq

from bus.codec import decode, encode
from bus.messages import (
    ERR_HELLO_FIRST,
    ERR_ID_IN_USE,
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

log = get_logger(component="bus.client")  # the client's session: its lines stay under bus.client
_BYE_LINGER_MS = 500  # the one place we linger: give a Bye a moment to leave so leases return at once
_PUMP_BUDGET = 1024  # most messages handled per pump, so one flood cannot hold the lock forever


def pipe() -> tuple[int, int]:
    """A non-blocking wake-up pipe (read end, write end)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def poke(fd: int) -> None:
    """Wake whoever polls the read end of the pipe whose write end is `fd`."""
    try:
        os.write(fd, b"x")
    except (BlockingIOError, OSError):  # full means it is readable already; closed means we are done
        pass


def drain_pipe(fd: int) -> None:
    """Empty a wake-up pipe's read end."""
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def wait_readable(fds: list[int], timeout: float) -> None:
    """Sleep until one of `fds` is readable or `timeout` s passed."""
    try:
        select.select(fds, [], [], max(0.0, timeout))
    except (OSError, ValueError):  # a socket closed under us (reconnect): just go round again
        time.sleep(0.001)



class SessionHost(Protocol):
    """The client as its session sees it (all called under the client's lock)."""

    endpoint: str
    max_message_bytes: int
    heartbeat_s: float  # replaced by the Welcome's
    liveness: int  # replaced by the Welcome's
    metrics: dict[str, float]  # bus/* counters
    welcome: Welcome | None  # the last Welcome
    reconnects: int
    server_version: int  # from the last Welcome or heartbeat reply
    server_max_staleness: int

    def next_rid(self) -> int:
        """A request id not used before (Hello's included)."""
        ...

    def is_pending(self, rid: int) -> bool:
        """Whether a caller still waits for the reply to `rid`."""
        ...

    def deliver(self, rid: int, msg: Message) -> bool:
        """Hand a reply to its waiter (False: nobody waits, e.g. it timed out)."""
        ...

    def disconnected(self, rid: int) -> None:
        """The session carrying request `rid` is gone: its caller gets Disconnected."""
        ...

    def refused(self, error: Error) -> None:
        """The server answered our Hello with `error` (final): ``connect`` raises it."""
        ...

    def push(self, msg: Message) -> None:
        """An unsolicited message for ``recv``."""
        ...

    def wake(self) -> None:
        """Wake the I/O thread (callbacks to run, timers changed)."""
        ...


class Session:
    """Socket and session state; every method runs under the client's lock."""

    def __init__(self, client: SessionHost, ctx: zmq.Context, curve: "CurveConfig | None" = None):
        self.c = client
        self.ctx, self.curve = ctx, curve
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
        sock = self.ctx.socket(zmq.DEALER)
        configure_socket(sock, c.max_message_bytes)
        if self.curve is not None:
            from bus.auth import apply_client

            apply_client(sock, self.curve)
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
            self.hello_rid = self.c.next_rid()
            self.hello_sent = now
            self.raw_send(encode(hello, self.hello_rid))
        if now - self.last_heard > self.c.liveness * self.c.heartbeat_s:
            log.warning("server silent, reconnecting", endpoint=self.c.endpoint, backoff_s=self.backoff)
            # Requests sent on this session will never be answered (a restarted server never saw them):
            # fail them now so callers retry at once instead of sitting out their whole timeout.
            for rid in list(self.inflight):
                self.c.disconnected(rid)
            self.inflight = {}
            self.shutdown_socket(None)
            self.reopen_at = now + self.backoff
            self.backoff = min(self.backoff * 2, RECONNECT_MAX_S)
            return
        if beat is not None and self.ready:
            self.next_hb = now + self.c.heartbeat_s
            self.raw_send(encode(beat))
            self.inflight = {r: f for r, f in self.inflight.items() if self.c.is_pending(r)}

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
        self.c.wake()  # budget spent: let the I/O thread continue

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
                c.wake()
        elif isinstance(msg, Error) and rid == self.hello_rid and msg.code == ERR_ID_IN_USE:
            # our worker id is still held by a session the server has not declared dead yet (we
            # restarted quickly): say Hello again once it must have been
            log.warning("worker id in use: hello again later", endpoint=c.endpoint, message=msg.message)
            self.need_hello = True
            self.hello_retry_at = time.monotonic() + c.liveness * c.heartbeat_s
            c.wake()
        elif isinstance(msg, Error) and rid == self.hello_rid:
            c.refused(msg)
            log.error("hello refused", code=msg.code, message=msg.message)
            self.running = False
            c.wake()
        elif rid:
            self.inflight.pop(rid, None)
            c.deliver(rid, msg)  # False: a late reply to a request that timed out
        elif isinstance(msg, Error):
            c.metrics["bus/errors"] += 1
            log.warning("server error", code=msg.code, message=msg.message)
        else:
            c.push(msg)

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
            if rid == 0 or c.is_pending(rid):
                self.submit(rid, frames)
        self.welcomes.append(w)
        c.wake()  # the I/O thread runs the callbacks, then releases connect()
