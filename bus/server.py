"""The ROUTER side of the control bus: peers, liveness, dispatch (zguide's Paranoid Pirate, server half).

One daemon thread owns the ROUTER socket and runs this loop:

1. poll the ROUTER and an inproc PULL socket (the outbox other threads push to) until the next
   liveness check is due;
2. for each message ``[identity, header, *buffers]``: decode (``bus.codec``); a ProtocolError is
   counted in ``bus/bad_messages`` and answered ``Error(bad_message)``. Hello → ``on_hello(peer)``
   returns a Welcome (peer registered under its worker_id; an older identity with the same
   worker_id is replaced only when the Hello carries the same session and key: a reconnect of the
   same process; any other claim of a live id is refused with ``Error(id_in_use)``) or an Error
   (refused). Each peer records the address its Hello came from and, under CurveZMQ, its key's name. Anything else from an
   unknown identity → ``Error(hello_first)``, which tells a client the server restarted. From a
   known peer: every message refreshes ``last_seen``; Heartbeat is answered by
   ``heartbeat_reply(peer)``; Bye removes the peer and fires ``on_dead``; any other type goes to its
   handler, whose returned message is sent back with the request's rid. A handler registered
   ``deferrable`` also gets a ``ReplyTo`` and may return None to answer later, from any thread, with
   ``answer(reply_to, msg)`` (a long poll: the learner holds a lease request the staleness bound
   turns away until a slot frees). A handler exception is logged and answered ``Error(internal)``;
   nothing a peer sends can stop the loop;
3. outbox: ``send(worker_id, msg)`` from any thread encodes in the caller, pushes
   ``[worker_id, *frames]`` to the inproc PUSH (under a lock) and the loop routes it;
4. ticks: ``on_tick(fn)`` runs ``fn`` on this thread about every ``TICK_S`` (deadlines of
   deferred answers);
5. liveness: a peer silent for ``liveness × heartbeat_s`` is removed and ``on_dead`` fires. Time the
   loop itself was not listening does not count as the peers' silence: when one iteration overruns
   (a slow handler, the process starved of CPU or the GIL), every peer's ``last_seen`` is moved on
   by the overrun before the check, since their heartbeats are waiting, unread, in the socket. A
   learner that stalls for seconds would otherwise declare its whole fleet dead and requeue every lease.

Sends are non-blocking (a full or vanished peer costs a ``bus/send_failed``, never a stall).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import zmq

from bus.codec import decode, encode
from bus.messages import (
    ERR_BAD_MESSAGE,
    ERR_HELLO_FIRST,
    ERR_ID_IN_USE,
    ERR_INTERNAL,
    ERR_NOT_FOUND,
    HEARTBEAT_S,
    LIVENESS,
    MAX_MESSAGE_BYTES,
    ROLES,
    Bye,
    Error,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    Welcome,
)
from common.log import get_logger

if TYPE_CHECKING:
    from bus.auth import CurveConfig

log = get_logger(component="bus.server")
_ids = itertools.count()


@dataclass
class Peer:
    identity: bytes
    role: str
    worker_id: str
    host: str
    hello: Hello
    last_seen: float
    joined: float
    weight_version: int
    stats: dict[str, float] = field(default_factory=dict)
    address: str = ""  # the IP its Hello came from (libzmq's Peer-Address; "" for ipc/inproc)
    key: str = ""  # under CurveZMQ, the name of its client key (bus.auth: it decides the role); "" in plaintext
    problem: str = ""  # the last Heartbeat.problem


@dataclass(frozen=True)
class ReplyTo:
    """Whom a deferred answer goes to: the peer and its request's rid (`Server.answer`)."""
    worker_id: str
    rid: int


Handler = Callable[[Peer, Message], "Message | None"]
DeferrableHandler = Callable[[Peer, Message, ReplyTo], "Message | None"]
TICK_S = 0.05  # the period of `on_tick` callbacks: deferred answers keep deadlines this fine


# Frames under this are copied even when sent with copy=False: a zero-copy frame costs a message to
# pyzmq's garbage-collector thread when libzmq releases it, dearer than memcpy of a small frame.
# Measured here (1 MB messages of 64 KB arrays): zero-copy from 64 KB on used less sender CPU than
# copying up to 256 KB, so this stays at pyzmq's default.
COPY_THRESHOLD = 64 << 10
# pyzmq's constants are enums; mixing them costs ~1 µs per operation on the hot path, so plain ints.
NOBLOCK, SNDMORE, EVENTS, POLLIN = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.EVENTS), int(zmq.POLLIN)


def configure_socket(sock: zmq.Socket, max_message_bytes: int) -> None:
    """Options every bus socket gets: no linger, a size limit, TCP keepalive (dead NATs/links)."""
    sock.copy_threshold = COPY_THRESHOLD
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint a socket actually bound (tcp port 0 / '*' resolved to the real port)."""
    ep = sock.getsockopt(zmq.LAST_ENDPOINT)
    return ep.decode() if isinstance(ep, bytes) else str(ep)


def bind_endpoint(endpoint: str) -> str:
    """libzmq spells an ephemeral port '*', not 0: accept both."""
    return endpoint[:-2] + ":*" if endpoint.startswith("tcp://") and endpoint.endswith(":0") else endpoint


def bind_or_release(sock: zmq.Socket, endpoint: str, ctx: zmq.Context, auth: Any = None) -> str:
    """Bind `sock` (a server's only socket so far) and return the bound endpoint. If the bind fails
    (the port is taken), release what the server made before raising: the socket, its ZAP
    authenticator thread and its context, so a caller may try another port in the same process."""
    try:
        sock.bind(bind_endpoint(endpoint))
    except zmq.ZMQError:
        sock.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()
        raise
    return bound_endpoint(sock)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """A multipart message as zero-copy Frames. Faster than pyzmq's recv_multipart, which asks
    the socket for RCVMORE through Python after every part; `Frame.more` already holds it."""
    frame = sock.recv(flags, copy=False)
    parts = [frame]
    while frame.more:
        frame = sock.recv(copy=False)
        parts.append(frame)
    return parts


def send_frames(sock: zmq.Socket, frames: list[Any], flags: int = 0) -> None:
    """Send a multipart message with copy=False (frames under COPY_THRESHOLD are copied by pyzmq)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, flags | SNDMORE if i < last else flags, copy=False)


def peer_address(frame: zmq.Frame) -> str:
    """The IP address a received message came from over TCP ("" for ipc/inproc or if unknown)."""
    try:
        return frame.get("Peer-Address") or ""
    except zmq.ZMQError:
        return ""


def user_id(frame: zmq.Frame) -> str:
    """The ZAP User-Id of a received message (the client key's name under bus.auth), or ""."""
    try:
        return frame.get("User-Id") or ""
    except zmq.ZMQError:
        return ""


def recv_ready(sock: zmq.Socket) -> list[zmq.Frame] | None:
    """One message from a socket poll reported readable (None if it was not, after all)."""
    try:
        return recv_frames(sock, NOBLOCK)
    except zmq.Again:
        return None


class Outbox:
    """A thread-safe way into a socket-owning thread: callers push frame lists to an inproc PUSH
    under a lock; the owner polls the PULL end. Frames travel over inproc without a copy."""

    def __init__(self, ctx: zmq.Context, name: str):
        addr = f"inproc://or1-{name}-{next(_ids)}"
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(addr)
        self._push = ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 0)  # never block or drop a caller's message
        self._push.copy_threshold = COPY_THRESHOLD
        self._push.connect(addr)
        self._lock = threading.Lock()

    def put(self, frames: list[Any]) -> None:
        with self._lock:
            if not self._push.closed:
                send_frames(self._push, frames)

    def close(self) -> None:
        with self._lock:
            self._push.close(0)
        self.pull.close(0)


class Server:
    """Control ROUTER with peer tracking. Handlers run on the server thread; `send` is thread-safe."""

    def __init__(
        self,
        endpoint: str,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        liveness: int = LIVENESS,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        curve: "CurveConfig | None" = None,
        name: str = "control",
    ):
        self.name = name
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.max_message_bytes = max_message_bytes
        self.metrics: dict[str, float] = dict.fromkeys(
            ("bus/bad_messages", "bus/messages_in", "bus/messages_out", "bus/dead_peers", "bus/peers",
             "bus/send_failed", "bus/handler_errors", "bus/refused_hellos", "bus/loop_stall_s"), 0.0)
        self._ctx = zmq.Context(io_threads=1)
        self._auth = None
        self._sock = self._ctx.socket(zmq.ROUTER)
        configure_socket(self._sock, max_message_bytes)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if curve is not None:
            from bus.auth import apply_server

            self._auth = apply_server(self._sock, curve, self._ctx)
        self.secure = curve is not None
        self.endpoint = bind_or_release(self._sock, endpoint, self._ctx, self._auth)
        self._outbox = Outbox(self._ctx, name)
        self._handlers: dict[str, Handler] = {}
        self._deferrable: set[str] = set()
        self._on_tick: Callable[[], None] | None = None
        self._on_hello: Callable[[Peer], Message] | None = None
        self._on_dead: Callable[[Peer], None] | None = None
        self._hb_reply: Callable[[Peer], Heartbeat] | None = None
        self._lock = threading.Lock()  # guards the two peer tables (read by `send`/`peers` elsewhere)
        self._by_worker: dict[str, Peer] = {}
        self._by_identity: dict[bytes, Peer] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- registration (before start) ---------------------------------------------------------

    def on(self, msg_type: type[Message], handler: Handler | DeferrableHandler, *, deferrable: bool = False) -> None:
        """Route `msg_type` to `handler`; a `deferrable` one is called with a third argument, the
        request's ReplyTo, and may return None to `answer` it later."""
        self._handlers[msg_type.TYPE] = handler
        self._deferrable.discard(msg_type.TYPE)
        if deferrable:
            self._deferrable.add(msg_type.TYPE)

    def on_tick(self, fn: Callable[[], None]) -> None:
        self._on_tick = fn

    def on_hello(self, fn: Callable[[Peer], Message]) -> None:
        self._on_hello = fn

    def on_dead(self, fn: Callable[[Peer], None]) -> None:
        self._on_dead = fn

    def heartbeat_reply(self, fn: Callable[[Peer], Heartbeat]) -> None:
        self._hb_reply = fn

    # --- any thread --------------------------------------------------------------------------

    def send(self, worker_id: str, msg: Message) -> bool:
        """Push `msg` (rid 0) to a peer from any thread; False if no such peer now."""
        return self.answer(ReplyTo(worker_id, 0), msg)

    def answer(self, to: ReplyTo, msg: Message) -> bool:
        """Answer a deferred request (or push, rid 0) from any thread; False if that peer is gone (a
        peer that reconnected since finds no waiter for the rid and drops it)."""
        with self._lock:
            if to.worker_id not in self._by_worker:
                return False
        self._outbox.put([to.worker_id.encode(), *encode(msg, to.rid)])
        return True

    def peers(self) -> list[Peer]:
        with self._lock:
            return [replace(p, stats=dict(p.stats)) for p in self._by_worker.values()]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"bus-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        else:
            self._sock.close(0)
        self._outbox.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # --- server thread -----------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._outbox.pull, zmq.POLLIN)
        check_every = min(self.heartbeat_s * self.liveness / 10, 0.25)
        next_check = time.monotonic() + check_every
        next_tick = time.monotonic() + TICK_S if self._on_tick is not None else float("inf")
        try:
            while not self._stop.is_set():
                timeout_s = min(max(0.0, min(next_check, next_tick) - time.monotonic()), 0.1)
                t0 = time.monotonic()
                events = dict(poller.poll(timeout_s * 1000))
                t1 = time.monotonic()
                # One message per socket per poll: fair, and cheaper than draining until zmq.Again.
                if self._sock in events and (frames := recv_ready(self._sock)):
                    self._on_frames(frames)
                if self._outbox.pull in events and (frames := recv_ready(self._outbox.pull)):
                    self._route(frames)
                overrun = max(0.0, t1 - t0 - timeout_s) + time.monotonic() - t1
                if overrun > check_every:
                    self._excuse(overrun)
                if time.monotonic() >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + TICK_S
                if time.monotonic() >= next_check:
                    self._reap(time.monotonic())
                    next_check = time.monotonic() + check_every
        except Exception:  # noqa: BLE001 — only a zmq/context failure gets here
            log.exception("server loop failed", server=self.name)
        finally:
            self._sock.close(0)


    def _tick(self) -> None:
        try:
            self._on_tick()
        except Exception:  # noqa: BLE001 — a callback bug must not kill the loop
            self.metrics["bus/handler_errors"] += 1
            log.exception("tick failed", server=self.name)

    def _route(self, frames: list[zmq.Frame]) -> None:
        worker_id = frames[0].bytes.decode()
        with self._lock:
            peer = self._by_worker.get(worker_id)
        if peer is None:
            self.metrics["bus/send_failed"] += 1
            return
        self._send_frames(peer.identity, frames[1:])

    def _send_frames(self, identity: bytes, frames: list[Any]) -> None:
        try:
            send_frames(self._sock, [identity, *frames], NOBLOCK)
            self.metrics["bus/messages_out"] += 1
        except zmq.ZMQError as e:  # EHOSTUNREACH (peer gone) or EAGAIN (peer's queue full)
            self.metrics["bus/send_failed"] += 1
            log.debug("send failed", server=self.name, error=str(e))

    def _reply(self, identity: bytes, msg: Message, rid: int) -> None:
        self._send_frames(identity, encode(msg, rid))

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        self.metrics["bus/messages_in"] += 1
        identity = frames[0].bytes
        try:
            msg, rid = decode(frames[1:], max_bytes=self.max_message_bytes)
        except ProtocolError as e:
            self.metrics["bus/bad_messages"] += 1
            log.debug("bad message", server=self.name, reason=str(e))
            self._reply(identity, Error(ERR_BAD_MESSAGE, str(e)[:200]), 0)
            return
        try:
            if isinstance(msg, Hello):
                key = user_id(frames[1]) if self.secure else ""
                self._hello(identity, msg, rid, peer_address(frames[1]), key)
            else:
                self._dispatch(identity, msg, rid)
        except Exception as e:  # noqa: BLE001 — a handler bug must not kill the loop
            self.metrics["bus/handler_errors"] += 1
            log.exception("handler failed", server=self.name, type=msg.TYPE)
            self._reply(identity, Error(ERR_INTERNAL, f"{type(e).__name__}: {e}"[:200]), rid)

    def _dispatch(self, identity: bytes, msg: Message, rid: int) -> None:
        peer = self._by_identity.get(identity)
        if peer is None:
            if not isinstance(msg, (Bye, Error)):  # never answer an Error: no ping-pong
                self._reply(identity, Error(ERR_HELLO_FIRST, "unknown peer: say Hello"), rid)
            return
        peer.last_seen = time.monotonic()
        if isinstance(msg, Heartbeat):
            peer.stats = dict(msg.stats)
            peer.weight_version = msg.weight_version
            peer.problem = msg.problem
            self._reply(identity, self._hb_reply(peer) if self._hb_reply else Heartbeat(), rid)
        elif isinstance(msg, Bye):
            log.info("peer said bye", server=self.name, worker_id=peer.worker_id, reason=msg.reason)
            self._remove(peer)
        elif isinstance(msg, Error):
            log.warning("peer sent error", server=self.name, worker_id=peer.worker_id, code=msg.code)
        elif (handler := self._handlers.get(msg.TYPE)) is None:
            self._reply(identity, Error(ERR_NOT_FOUND, f"no handler for {msg.TYPE}"), rid)
        else:
            out = (handler(peer, msg, ReplyTo(peer.worker_id, rid)) if msg.TYPE in self._deferrable
                   else handler(peer, msg))
            if out is not None:
                self._reply(identity, out, rid)

    def _hello(self, identity: bytes, hello: Hello, rid: int, address: str = "", key: str = "") -> None:
        if hello.role not in ROLES or not hello.worker_id:
            self.metrics["bus/bad_messages"] += 1
            self._reply(identity, Error(ERR_BAD_MESSAGE, f"bad hello: role {hello.role!r}"), rid)
            return
        with self._lock:
            holder = self._by_worker.get(hello.worker_id)
        if holder is not None and holder.identity != identity and (holder.hello.session != hello.session
                                                                    or holder.key != key):
            # not a reconnect of the same process: another one (or an impostor) claims a live id
            self.metrics["bus/refused_hellos"] += 1
            log.warning("hello refused: worker id in use", server=self.name, worker_id=hello.worker_id, address=address)
            self._reply(identity, Error(ERR_ID_IN_USE, f"worker id {hello.worker_id!r} is held by a live session: "
                                        "use another --worker-id, or wait until that one is gone"), rid)
            return
        now = time.monotonic()
        peer = Peer(identity, hello.role, hello.worker_id, hello.host, hello, now, now, hello.weight_version,
                    address=address, key=key)
        answer = self._on_hello(peer) if self._on_hello else self._default_welcome()
        if isinstance(answer, Welcome):
            with self._lock:
                old = self._by_worker.pop(hello.worker_id, None)
                if old is not None:  # a reconnect: same worker, new socket; not a death
                    self._by_identity.pop(old.identity, None)
                    peer.joined = old.joined
                stale = self._by_identity.pop(identity, None)
                if stale is not None and stale.worker_id != hello.worker_id:
                    self._by_worker.pop(stale.worker_id, None)
                self._by_worker[hello.worker_id] = peer
                self._by_identity[identity] = peer
                self.metrics["bus/peers"] = float(len(self._by_worker))
            log.info("peer joined", server=self.name, worker_id=hello.worker_id, role=hello.role,
                     reconnect=old is not None)
        self._reply(identity, answer, rid)

    def _default_welcome(self) -> Welcome:
        return Welcome(run_id="", epoch=0, version=0, heartbeat_s=self.heartbeat_s,
                       liveness=self.liveness, max_staleness=0)

    def _remove(self, peer: Peer) -> None:
        with self._lock:
            if self._by_worker.get(peer.worker_id) is peer:
                del self._by_worker[peer.worker_id]
            self._by_identity.pop(peer.identity, None)
            self.metrics["bus/peers"] = float(len(self._by_worker))
        if self._on_dead is not None:
            try:
                self._on_dead(peer)
            except Exception:  # noqa: BLE001
                log.exception("on_dead failed", server=self.name, worker_id=peer.worker_id)

    def _excuse(self, deaf_s: float) -> None:
        """The loop did not listen for `deaf_s` seconds: that silence is ours, not the peers'."""
        with self._lock:
            for peer in self._by_identity.values():
                peer.last_seen += deaf_s
        self.metrics["bus/loop_stall_s"] = max(self.metrics["bus/loop_stall_s"], deaf_s)

    def _reap(self, now: float) -> None:
        limit = self.liveness * self.heartbeat_s
        for peer in [p for p in self._by_identity.values() if now - p.last_seen > limit]:
            self.metrics["bus/dead_peers"] += 1
            log.warning("peer dead", server=self.name, worker_id=peer.worker_id,
                        silent_s=round(now - peer.last_seen, 2))
            self._remove(peer)
