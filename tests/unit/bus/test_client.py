"""bus.client against a real bus.server (and a raw ROUTER where the server must misbehave)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from bus import messages as M
from bus.client import Client, RemoteError
from bus.codec import decode, encode
from bus.server import Peer, Server

HB = 0.1
LIVE = 10  # 1 s of silence before anyone is declared dead: robust on a loaded machine


class State:
    """What an actor's hello() reads: the weight version it holds right now."""

    def __init__(self) -> None:
        self.version = 0


def make_client(endpoint: str, state: State | None = None, worker_id: str = "a1", **kw) -> Client:
    st = state or State()
    return Client(endpoint, lambda: M.Hello(role="actor", worker_id=worker_id, weight_version=st.version),
                  heartbeat_s=HB, **kw)


def welcome(version: int = 3, epoch: int = 1, liveness: int = LIVE) -> M.Welcome:
    return M.Welcome(run_id="r", epoch=epoch, version=version, heartbeat_s=HB, liveness=liveness,
                     max_staleness=2)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server("tcp://127.0.0.1:0", heartbeat_s=HB, liveness=LIVE)
    srv.on_hello(lambda p: welcome())
    srv.on(M.Ready, lambda p, m: M.SubmitAck(lease_id=m.credits, accepted=1))
    srv.on(M.Release, lambda p, m: None)
    srv.on(M.LeaseRequest, lambda p, m: M.Error(M.ERR_STALE_EPOCH, "old"))
    yield srv
    srv.stop()


def test_connect_request_and_errors(server: Server) -> None:
    server.start()
    c = make_client(server.endpoint)
    try:
        w = c.connect(timeout=5)
        assert w == welcome() and c.server_version == 3 and c.server_max_staleness == 2
        assert c.request(M.Ready(credits=7), timeout=5) == M.SubmitAck(lease_id=7, accepted=1)
        with pytest.raises(RemoteError) as e:
            c.request(M.LeaseRequest(max_groups=1, weight_version=0), timeout=5)
        assert e.value.code == M.ERR_STALE_EPOCH and e.value.message == "old"
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            c.request(M.Release(lease_ids=[1]), timeout=0.3)  # the handler never answers
        assert 0.3 <= time.monotonic() - t0 < 1.0
        assert c.request(M.Ready(credits=8), timeout=5).lease_id == 8  # still fine after a timeout
    finally:
        c.close()


def test_concurrent_requests_from_many_threads(server: Server) -> None:
    server.start()
    c = make_client(server.endpoint)
    c.connect(timeout=5)
    errors: list[BaseException] = []

    def worker(base: int) -> None:
        try:
            for i in range(100):
                assert c.request(M.Ready(credits=base + i), timeout=10).lease_id == base + i
        except BaseException as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c.close()
    assert errors == []


def test_push_from_server_arrives_via_recv(server: Server) -> None:
    server.start()
    c = make_client(server.endpoint, worker_id="rw")
    try:
        c.connect(timeout=5)
        assert c.recv(timeout=0.05) is None
        assert server.send("rw", M.ScoreRequest(request_id=1, items=[M.ScoreItem("math", "x", "1")]))
        msg = c.recv(timeout=5)
        assert isinstance(msg, M.ScoreRequest) and msg.request_id == 1
    finally:
        c.close()


def test_heartbeats_keep_a_blocked_caller_alive_and_carry_stats(server: Server) -> None:
    deaths: list[str] = []
    server.on_dead(lambda p: deaths.append(p.worker_id))
    learner_version = [5]
    server.heartbeat_reply(lambda p: M.Heartbeat(version=learner_version[0], max_staleness=4))
    server.start()
    state = State()
    c = make_client(server.endpoint, state, stats=lambda: {"tokens_per_s": 42.0})
    try:
        c.connect(timeout=5)
        state.version = 2
        learner_version[0] = 6
        time.sleep(1.0)  # "generation": the caller does nothing for 10 heartbeat intervals
        assert deaths == []
        (p,) = server.peers()
        assert p.stats == {"tokens_per_s": 42.0} and p.weight_version == 2
        assert c.server_version == 6 and c.server_max_staleness == 4
    finally:
        c.close()
    time.sleep(0.3)
    assert deaths == ["a1"]  # the Bye on close


def test_refused_hello_raises_on_connect(server: Server) -> None:
    server.on_hello(lambda p: M.Error(M.ERR_FORBIDDEN, "bad admin key"))
    server.start()
    c = make_client(server.endpoint)
    try:
        with pytest.raises(RemoteError) as e:
            c.connect(timeout=5)
        assert e.value.code == M.ERR_FORBIDDEN
    finally:
        c.close()


def test_connect_times_out_without_a_server() -> None:
    with zmq.Context() as ctx:  # find a port nobody listens on
        s = ctx.socket(zmq.ROUTER)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        s.close(0)
    c = make_client(f"tcp://127.0.0.1:{port}")
    try:
        with pytest.raises(TimeoutError):
            c.connect(timeout=0.3)
    finally:
        c.close()


def test_messages_sent_before_welcome_are_held_then_flushed(server: Server) -> None:
    got: list[int] = []
    server.on(M.Ready, lambda p, m: got.append(m.credits))
    c = make_client(server.endpoint)
    try:
        c.send(M.Ready(credits=1))  # before connect: held
        c.send(M.Ready(credits=2))
        server.start()
        c.connect(timeout=5)
        deadline = time.monotonic() + 3
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [1, 2]
    finally:
        c.close()


def test_learner_restart_in_process_rehello_with_current_state() -> None:
    first = Server("tcp://127.0.0.1:0", heartbeat_s=HB, liveness=LIVE)
    endpoint = first.endpoint
    first.on_hello(lambda p: welcome(epoch=1))
    first.start()
    state = State()
    c = make_client(endpoint, state)
    welcomes: list[int] = []
    c.on_welcome(lambda w: welcomes.append(w.epoch))
    try:
        c.connect(timeout=5)
        first.stop()
        state.version = 9
        hellos: list[M.Hello] = []
        second = Server(endpoint, heartbeat_s=HB, liveness=LIVE)
        second.on_hello(lambda p: (hellos.append(p.hello), welcome(epoch=2))[1])
        second.on(M.Ready, lambda p, m: M.SubmitAck(lease_id=m.credits, accepted=1))
        second.start()
        try:
            # the request reaches a server that does not know us: hello_first, re-Hello, resend
            assert c.request(M.Ready(credits=4), timeout=10) == M.SubmitAck(lease_id=4, accepted=1)
            assert hellos and hellos[-1].worker_id == "a1" and hellos[-1].weight_version == 9
            assert c.welcome is not None and c.welcome.epoch == 2 and c.reconnects == 1
            deadline = time.monotonic() + 2
            while welcomes != [1, 2] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert welcomes == [1, 2]
        finally:
            second.stop()
    finally:
        c.close()


def test_silent_server_triggers_reconnect_with_new_socket() -> None:
    """A ROUTER that answers the first Hello and then goes mute: the client must give up on the
    socket after liveness × heartbeat, back off, and say Hello on a new socket (new identity)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    c = make_client(f"tcp://127.0.0.1:{port}")
    hellos: list[tuple[bytes, float]] = []
    try:
        connected = threading.Thread(target=lambda: c.connect(timeout=10), daemon=True)
        connected.start()
        deadline = time.monotonic() + 6
        while len(hellos) < 2 and time.monotonic() < deadline:
            if router.poll(50):
                ident, *frames = router.recv_multipart(copy=False)
                msg, rid = decode(frames, max_bytes=1 << 20)
                if isinstance(msg, M.Hello):
                    hellos.append((ident.bytes, time.monotonic()))
                    if len(hellos) == 1:
                        router.send_multipart([ident.bytes, *encode(welcome(liveness=3), rid)])
        assert len(hellos) == 2, hellos
        assert hellos[0][0] != hellos[1][0]
        gap = hellos[1][1] - hellos[0][1]
        assert 0.3 + 1.0 <= gap < 0.3 + 1.0 + 1.5, gap  # silence window, then the first 1 s backoff
    finally:
        c.close()
        ctx.destroy(linger=0)


def test_hello_callable_failure_does_not_kill_the_client(server: Server) -> None:
    server.start()
    calls = [0]

    def flaky() -> M.Hello:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("not ready yet")
        return M.Hello(role="actor", worker_id="flaky")

    c = Client(server.endpoint, flaky, heartbeat_s=HB)
    try:
        assert isinstance(c.connect(timeout=5), M.Welcome)
    finally:
        c.close()


def test_close_is_idempotent_and_request_after_close_times_out(server: Server) -> None:
    server.start()
    c = make_client(server.endpoint)
    c.connect(timeout=5)
    c.close()
    c.close()
    with pytest.raises(TimeoutError):
        c.request(M.Ready(credits=1), timeout=0.2)


def test_peer_handler_sees_worker_identity(server: Server) -> None:
    seen: list[str] = []

    def on_ready(p: Peer, m: M.Message) -> M.Message:
        seen.append(p.worker_id)
        return M.SubmitAck(lease_id=0, accepted=0)

    server.on(M.Ready, on_ready)
    server.start()
    a, b = make_client(server.endpoint, worker_id="a"), make_client(server.endpoint, worker_id="b")
    try:
        a.connect(timeout=5)
        b.connect(timeout=5)
        a.request(M.Ready(credits=1), timeout=5)
        b.request(M.Ready(credits=1), timeout=5)
        assert seen == ["a", "b"]
    finally:
        a.close()
        b.close()


def test_request_waiting_on_a_lost_session_fails_fast_with_disconnected() -> None:
    """A server that welcomes, then dies with a request unanswered: the caller gets Disconnected
    (a TimeoutError) once the session is declared lost, not after its own 30 s timeout."""
    from bus.client import Disconnected

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    c = make_client(f"tcp://127.0.0.1:{port}")
    try:
        def serve_hello_then_go_mute() -> None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if router.poll(50):
                    ident, *frames = router.recv_multipart(copy=False)
                    msg, rid = decode(frames, max_bytes=1 << 20)
                    if isinstance(msg, M.Hello):
                        router.send_multipart([ident.bytes, *encode(welcome(liveness=3), rid)])
                        return

        t = threading.Thread(target=serve_hello_then_go_mute, daemon=True)
        t.start()
        c.connect(timeout=5)
        t.join()
        t0 = time.monotonic()
        with pytest.raises(Disconnected):
            c.request(M.LeaseRequest(max_groups=1, weight_version=0), timeout=30)
        assert time.monotonic() - t0 < 5  # liveness 3 x 0.1 s, plus scheduling slack
    finally:
        c.close(bye=None)
        ctx.destroy(linger=0)


def test_two_threads_waiting_both_get_their_replies_promptly() -> None:
    """Replies for two threads arriving together: a poke drained by one waiter must not leave the
    other asleep until its timeout (the delivery pipe is shared)."""
    srv = Server("tcp://127.0.0.1:0", heartbeat_s=HB, liveness=LIVE)
    srv.on_hello(lambda p: welcome())
    gate = threading.Event()

    def slow(p, m):
        gate.wait(2)
        return M.SubmitAck(lease_id=m.max_groups, accepted=1)

    srv.on(M.LeaseRequest, slow)
    srv.start()
    c = make_client(srv.endpoint)
    try:
        c.connect(timeout=5)
        took: dict[int, float] = {}

        def ask(i: int) -> None:
            t0 = time.monotonic()
            for _ in range(20):
                assert c.request(M.LeaseRequest(max_groups=i, weight_version=0), timeout=20).lease_id == i
            took[i] = time.monotonic() - t0

        gate.set()
        threads = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert set(took) == {1, 2} and max(took.values()) < 10, took
    finally:
        c.close()
        srv.stop()
