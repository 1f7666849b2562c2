"""bus.server against raw DEALER sockets on tcp loopback: hello, dispatch, errors, liveness, push."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from bus import messages as M
from bus.codec import decode, encode
from bus.server import Peer, Server

BIG = 1 << 30


class RawPeer:
    """A bare DEALER speaking the codec, so tests control every byte and every timing."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg: M.Message, rid: int = 0) -> None:
        self.sock.send_multipart(encode(msg, rid), copy=False)

    def recv(self, timeout: float = 5.0) -> tuple[M.Message, int]:
        assert self.sock.poll(timeout * 1000), "no reply"
        return decode(self.sock.recv_multipart(copy=False), max_bytes=BIG)

    def ask(self, msg: M.Message, rid: int = 1) -> M.Message:
        self.send(msg, rid)
        reply, got = self.recv()
        assert got == rid
        return reply

    def hello(self, worker_id: str = "w1", role: str = "actor") -> M.Message:
        return self.ask(M.Hello(role=role, worker_id=worker_id, weight_version=4), rid=99)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server("tcp://127.0.0.1:0", heartbeat_s=0.1, liveness=3)
    yield srv
    srv.stop()


@pytest.fixture
def peer(server: Server) -> Iterator[RawPeer]:
    p = RawPeer(server.endpoint)
    yield p
    p.close()


def test_endpoint_is_resolved_to_the_bound_port(server: Server) -> None:
    assert server.endpoint.startswith("tcp://127.0.0.1:") and not server.endpoint.endswith(":0")


def test_hello_gets_default_welcome_and_registers_peer(server: Server, peer: RawPeer) -> None:
    server.start()
    w = peer.hello("w1")
    assert isinstance(w, M.Welcome) and w.heartbeat_s == 0.1 and w.liveness == 3
    (p,) = server.peers()
    assert (p.worker_id, p.role, p.weight_version) == ("w1", "actor", 4)
    assert server.metrics["bus/peers"] == 1


def test_on_hello_decides_and_can_refuse(server: Server) -> None:
    def decide(p: Peer) -> M.Message:
        if p.hello.admin_key != "secret":
            return M.Error(M.ERR_FORBIDDEN, "bad admin key")
        return M.Welcome(run_id="run", epoch=3, version=9, heartbeat_s=0.1, liveness=3, max_staleness=1)

    server.on_hello(decide)
    server.start()
    a, b = RawPeer(server.endpoint), RawPeer(server.endpoint)
    try:
        refused = a.ask(M.Hello(role="admin", worker_id="x"))
        assert refused == M.Error(M.ERR_FORBIDDEN, "bad admin key")
        assert server.peers() == []
        ok = b.ask(M.Hello(role="admin", worker_id="y", admin_key="secret"))
        assert isinstance(ok, M.Welcome) and ok.epoch == 3
        assert [p.worker_id for p in server.peers()] == ["y"]
    finally:
        a.close()
        b.close()


def test_message_before_hello_is_answered_hello_first(server: Server, peer: RawPeer) -> None:
    server.on(M.Ready, lambda p, m: M.SubmitAck(lease_id=0, accepted=m.credits))
    server.start()
    assert peer.ask(M.Ready(credits=2), rid=5) == M.Error(M.ERR_HELLO_FIRST, "unknown peer: say Hello")
    peer.hello()
    assert peer.ask(M.Ready(credits=2), rid=6) == M.SubmitAck(lease_id=0, accepted=2)


def test_handler_reply_carries_the_request_rid(server: Server, peer: RawPeer) -> None:
    seen: list[tuple[str, int]] = []

    def on_ready(p: Peer, m: M.Message) -> M.Message:
        seen.append((p.worker_id, m.credits))
        return M.SubmitAck(lease_id=m.credits, accepted=1)

    server.on(M.Ready, on_ready)
    server.start()
    peer.hello("w7")
    for rid in (1, 2**40, 3):
        assert peer.ask(M.Ready(credits=rid % 100), rid=rid) == M.SubmitAck(lease_id=rid % 100, accepted=1)
    assert seen == [("w7", 1), ("w7", 2**40 % 100), ("w7", 3)]


def test_a_stalled_loop_does_not_blame_its_peers(server: Server, peer: RawPeer) -> None:
    """A handler that blocks the loop for 4x the liveness window (0.3 s): the peer's heartbeats wait
    unread meanwhile, so it is not declared dead, and the stall is reported."""
    dead: list[str] = []
    server.on_dead(lambda p: dead.append(p.worker_id))
    server.on(M.Release, lambda p, m: time.sleep(1.2) or M.SubmitAck(lease_id=2, accepted=1))
    server.start()
    peer.hello()
    assert peer.ask(M.Release(lease_ids=[1]), rid=4) == M.SubmitAck(lease_id=2, accepted=1)
    time.sleep(0.1)
    assert dead == [] and server.metrics["bus/dead_peers"] == 0
    assert server.metrics["bus/loop_stall_s"] >= 1.0


def test_handler_returning_none_sends_nothing(server: Server, peer: RawPeer) -> None:
    server.on(M.Release, lambda p, m: None)
    server.start()
    peer.hello()
    peer.send(M.Release(lease_ids=[1]), rid=3)
    assert not peer.sock.poll(200)


def test_handler_exception_is_answered_internal_and_loop_survives(server: Server, peer: RawPeer) -> None:
    def boom(p: Peer, m: M.Message) -> M.Message:
        raise RuntimeError("kaput")

    server.on(M.Release, boom)
    server.on(M.Ready, lambda p, m: M.SubmitAck(lease_id=1, accepted=1))
    server.start()
    peer.hello()
    err = peer.ask(M.Release(lease_ids=[1]), rid=8)
    assert isinstance(err, M.Error) and err.code == M.ERR_INTERNAL and "kaput" in err.message
    assert peer.ask(M.Ready(credits=1), rid=9) == M.SubmitAck(lease_id=1, accepted=1)
    assert server.metrics["bus/handler_errors"] == 1


def test_unhandled_type_is_answered_not_found(server: Server, peer: RawPeer) -> None:
    server.start()
    peer.hello()
    err = peer.ask(M.Status(), rid=4)
    assert isinstance(err, M.Error) and err.code == M.ERR_NOT_FOUND


def test_bad_message_is_counted_and_answered(server: Server, peer: RawPeer) -> None:
    server.start()
    peer.sock.send_multipart([b"\xc1garbage"])
    reply, rid = peer.recv()
    assert isinstance(reply, M.Error) and reply.code == M.ERR_BAD_MESSAGE and rid == 0
    peer.sock.send_multipart([b""])
    assert peer.recv()[0].code == M.ERR_BAD_MESSAGE
    assert server.metrics["bus/bad_messages"] == 2
    assert isinstance(peer.hello(), M.Welcome)  # still serving


def test_hello_with_unknown_role_is_refused(server: Server, peer: RawPeer) -> None:
    server.start()
    err = peer.ask(M.Hello(role="wizard", worker_id="x"))
    assert isinstance(err, M.Error) and err.code == M.ERR_BAD_MESSAGE
    assert server.peers() == []


def test_heartbeat_reply_and_peer_stats(server: Server, peer: RawPeer) -> None:
    server.heartbeat_reply(lambda p: M.Heartbeat(version=12, max_staleness=2))
    server.start()
    peer.hello()
    reply = peer.ask(M.Heartbeat(weight_version=11, stats={"tokens_per_s": 5.0}), rid=0)
    assert reply == M.Heartbeat(version=12, max_staleness=2)
    (p,) = server.peers()
    assert p.weight_version == 11 and p.stats == {"tokens_per_s": 5.0}


def test_silent_peer_is_declared_dead_after_liveness_intervals(server: Server, peer: RawPeer) -> None:
    deaths: list[tuple[str, float, str]] = []
    server.on_dead(lambda p: deaths.append((p.worker_id, time.monotonic(), threading.current_thread().name)))
    server.start()
    peer.hello("quiet")
    t0 = time.monotonic()
    deadline = t0 + 3
    while not deaths and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(deaths) == 1
    worker, when, thread = deaths[0]
    elapsed = when - t0
    assert worker == "quiet" and thread == "bus-control"
    assert 0.3 <= elapsed <= 0.3 + 0.3, elapsed  # liveness 3 × 0.1 s, checked every 0.03 s
    assert server.peers() == [] and server.metrics["bus/dead_peers"] == 1
    time.sleep(0.4)
    assert len(deaths) == 1  # fired once
    assert peer.ask(M.Heartbeat()).code == M.ERR_HELLO_FIRST  # a dead peer must say Hello again


def test_any_message_counts_as_heartbeat() -> None:
    srv = Server("tcp://127.0.0.1:0", heartbeat_s=0.1, liveness=5)
    deaths: list[str] = []
    srv.on_dead(lambda p: deaths.append(p.worker_id))
    srv.on(M.Ready, lambda p, m: None)
    srv.start()
    peer = RawPeer(srv.endpoint)
    try:
        peer.hello("busy")
        for _ in range(20):  # 1 s (twice the 0.5 s liveness window) of Ready and no Heartbeat
            peer.send(M.Ready(credits=1))
            time.sleep(0.05)
        assert deaths == [] and len(srv.peers()) == 1
    finally:
        peer.close()
        srv.stop()


def test_bye_removes_peer_and_fires_on_dead_once(server: Server, peer: RawPeer) -> None:
    deaths: list[str] = []
    server.on_dead(lambda p: deaths.append(p.worker_id))
    server.start()
    peer.hello("leaver")
    peer.send(M.Bye(reason="shutdown"))
    time.sleep(0.5)
    assert deaths == ["leaver"] and server.peers() == []


def test_rehello_from_new_identity_is_a_reconnect_not_a_death(server: Server) -> None:
    deaths: list[str] = []
    server.on_dead(lambda p: deaths.append(p.worker_id))
    server.start()
    old, new = RawPeer(server.endpoint), RawPeer(server.endpoint)
    try:
        old.hello("same")
        first = server.peers()[0]
        new.hello("same")
        (p,) = server.peers()
        assert p.identity != first.identity and p.joined == first.joined
        assert old.ask(M.Heartbeat()).code == M.ERR_HELLO_FIRST  # the old socket is forgotten
        assert deaths == []
    finally:
        old.close()
        new.close()


def test_send_is_thread_safe_and_reaches_the_peer(server: Server, peer: RawPeer) -> None:
    server.start()
    peer.hello("target")
    assert server.send("nobody", M.Ready(credits=1)) is False

    def push(base: int) -> None:
        for i in range(50):
            assert server.send("target", M.ScoreRequest(request_id=base + i, items=[]))

    threads = [threading.Thread(target=push, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = set()
    for _ in range(200):
        msg, rid = peer.recv()
        assert rid == 0 and isinstance(msg, M.ScoreRequest)
        got.add(msg.request_id)
    assert got == {k * 1000 + i for k in range(4) for i in range(50)}
    assert server.metrics["bus/messages_out"] >= 201


def test_stop_without_start_releases_the_port() -> None:
    srv = Server("tcp://127.0.0.1:0")
    endpoint = srv.endpoint
    srv.stop()
    again = Server(endpoint)
    again.stop()


def test_a_deferrable_handler_answers_later_with_the_request_rid(server: Server, peer: RawPeer) -> None:
    """A long poll: the handler keeps the ReplyTo and answers from another thread; other requests
    are served meanwhile, and an answer to a peer that left is refused."""
    held: list = []
    server.on(M.Ready, lambda p, m, to: held.append(to), deferrable=True)
    server.on(M.Release, lambda p, m: M.SubmitAck(lease_id=2, accepted=1))
    server.start()
    peer.hello("w3")
    peer.send(M.Ready(credits=1), rid=41)
    assert not peer.sock.poll(200)  # nothing yet
    assert peer.ask(M.Release(lease_ids=[1]), rid=42) == M.SubmitAck(lease_id=2, accepted=1)
    (to,) = held
    assert (to.worker_id, to.rid) == ("w3", 41)
    threading.Thread(target=server.answer, args=(to, M.SubmitAck(lease_id=7, accepted=0))).start()
    assert peer.recv() == (M.SubmitAck(lease_id=7, accepted=0), 41)
    peer.send(M.Bye(reason="done"))
    time.sleep(0.2)
    assert server.answer(to, M.SubmitAck(lease_id=8, accepted=0)) is False


def test_on_tick_runs_on_the_server_thread_and_survives_a_failure(server: Server) -> None:
    ticks: list[str] = []

    def tick() -> None:
        ticks.append(threading.current_thread().name)
        if len(ticks) == 1:
            raise RuntimeError("a bug in the callback")

    server.on_tick(tick)
    server.start()
    time.sleep(0.5)
    assert len(ticks) >= 3, "ticks stopped after a failing one"
    assert set(ticks) == {"bus-control"}
    assert server.metrics["bus/handler_errors"] == 1
