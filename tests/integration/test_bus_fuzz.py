"""Property-based bad input against a live Server: random, truncated, oversized and type-confused
multipart messages from a raw DEALER. Nothing escapes the loop, a well-formed client keeps being
served in between, every bad message is answered Error(bad_message), and `bus/bad_messages`
counts exactly the bad messages sent."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bus import messages as M
from bus.client import Client
from bus.codec import decode, encode
from bus.server import Server

MAX_BYTES = 256 << 10  # the server's limit: oversized messages are several frames, each under it

VALID: list[M.Message] = [
    M.Hello(role="actor", worker_id="fuzz", weight_version=3),
    M.Heartbeat(version=1, stats={"a": 1.0}),
    M.LeaseRequest(max_groups=2, weight_version=1),
    M.Submit(lease_id=1, epoch=0, groups=[M.Group("p", 1, [
        M.Sample(np.arange(600, dtype=np.int32), np.zeros(600, np.float32), M.FINISH_STOP, "t"),
        M.Sample(np.arange(3, dtype=np.int32), np.zeros(3, np.float32), M.FINISH_LENGTH, "")])]),
    M.ScoreResult(request_id=3, results=[M.ScoreOut(1.0), M.ScoreOut(0.0, error="x")]),
    M.Chunk(version=1, index=0, data=np.arange(2000, dtype=np.uint8)),
    M.Set(key="max_staleness", value=2),
    M.Welcome(run_id="r", epoch=0, version=0, heartbeat_s=1.0, liveness=3, max_staleness=0,
              sampling=M.SamplingSpec(n=2)),
]

plain = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
         | st.text(max_size=12) | st.binary(max_size=12))


def containers(c: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3)


values = st.recursive(plain, containers, max_leaves=8)


def frames_of(msg: M.Message) -> list[bytes]:
    return [bytes(f) for f in encode(msg)]


def replace_somewhere(draw, obj, value):  # type: ignore[no-untyped-def]
    """Replace one value at a random path inside a decoded header (type confusion, deep or shallow)."""
    if isinstance(obj, dict) and obj:
        key = draw(st.sampled_from(sorted(obj, key=str)))
        if draw(st.booleans()) and isinstance(obj[key], (dict, list)) and obj[key]:
            obj[key] = replace_somewhere(draw, obj[key], value)
        else:
            obj[key] = value
    elif isinstance(obj, list) and obj:
        i = draw(st.integers(0, len(obj) - 1))
        obj[i] = replace_somewhere(draw, obj[i], value) if draw(st.booleans()) else value
    return obj


@st.composite
def bad_message(draw) -> list[bytes]:  # type: ignore[no-untyped-def]
    frames = frames_of(draw(st.sampled_from(VALID)))
    kind = draw(st.sampled_from(["random", "truncated", "confused", "oversized", "frames", "missing", "extra",
                                 "shape", "header"]))
    header = msgpack.unpackb(frames[0], raw=False)
    if kind == "random":
        frames = draw(st.lists(st.binary(max_size=80), min_size=1, max_size=4))
    elif kind == "truncated":
        frames[0] = frames[0][:draw(st.integers(0, len(frames[0]) - 1))]
    elif kind == "confused":
        frames[0] = msgpack.packb(replace_somewhere(draw, header, draw(values)))
    elif kind == "oversized":
        frames += [bytes(100 << 10)] * 3
    elif kind == "frames":  # drop, duplicate or truncate a raw frame
        if len(frames) > 1 and draw(st.booleans()):
            i = draw(st.integers(1, len(frames) - 1))
            frames[i] = frames[i][:draw(st.integers(0, max(0, len(frames[i]) - 1)))]
        else:
            frames.append(draw(st.binary(max_size=40)))
    elif kind == "missing":
        header.pop(draw(st.sampled_from(sorted(header))))
        frames[0] = msgpack.packb(header)
    elif kind == "extra":
        header[draw(st.text(min_size=1, max_size=8))] = draw(values)
        frames[0] = msgpack.packb(header)
    elif kind == "shape":  # lie about an array: shape, dtype or element count
        spec = {"__nd__": 1, "dtype": draw(st.sampled_from(["int32", "object", "float64", "<U4", 7])),
                "shape": draw(st.lists(st.integers(-2, 1 << 40), max_size=3))}
        frames = [msgpack.packb({**msgpack.unpackb(frames_of(VALID[5])[0]), "data": spec}), bytes(2000)]
    else:  # header noise: version, type, rid
        header[draw(st.sampled_from(["v", "type", "rid"]))] = draw(values)
        frames[0] = msgpack.packb(header)
    return frames


def is_bad(frames: list[bytes]) -> bool:
    try:
        decode(frames, max_bytes=MAX_BYTES)
    except M.ProtocolError:
        return True
    return False


@pytest.mark.slow
def test_fuzzed_messages_never_hurt_the_server() -> None:
    srv = Server("tcp://127.0.0.1:0", heartbeat_s=5.0, max_message_bytes=MAX_BYTES)
    srv.on(M.Ready, lambda p, m: M.SubmitAck(lease_id=m.credits, accepted=1))
    srv.start()
    client = Client(srv.endpoint, lambda: M.Hello(role="actor", worker_id="good"),
                    max_message_bytes=MAX_BYTES)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(srv.endpoint)
    counts = {"sent": 0, "answered": 0, "checks": 0}

    def drain(expect_all: bool) -> None:
        deadline = time.monotonic() + 10
        while raw.poll(0 if not expect_all else 50) or (expect_all and counts["answered"] < counts["sent"]):
            if time.monotonic() > deadline:
                return
            if not raw.poll(0):
                continue
            reply, _ = decode(raw.recv_multipart(), max_bytes=1 << 20)
            assert isinstance(reply, M.Error) and reply.code == M.ERR_BAD_MESSAGE
            counts["answered"] += 1

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large])
    @given(st.lists(bad_message(), min_size=4, max_size=10))
    def run(batch: list[list[bytes]]) -> None:
        for frames in batch:
            assume(is_bad(frames))
        for frames in batch:
            raw.send_multipart(frames)
            counts["sent"] += 1
        drain(expect_all=False)
        counts["checks"] += 1
        assert client.request(M.Ready(credits=counts["checks"]), timeout=10).lease_id == counts["checks"]

    t0 = time.monotonic()
    try:
        client.connect(timeout=10)
        run()
        drain(expect_all=True)
        deadline = time.monotonic() + 10
        while srv.metrics["bus/bad_messages"] < counts["sent"] and time.monotonic() < deadline:
            time.sleep(0.01)
        print("fuzz counts", counts)
        assert counts["sent"] >= 2000, counts
        assert srv.metrics["bus/bad_messages"] == counts["sent"]
        assert counts["answered"] == counts["sent"]
        assert srv.metrics["bus/handler_errors"] == 0 and srv._thread is not None and srv._thread.is_alive()
        assert client.request(M.Ready(credits=1), timeout=5).accepted == 1
        assert time.monotonic() - t0 < 90
    finally:
        client.close()
        ctx.destroy(linger=0)
        srv.stop()


def test_frame_over_zmq_limit_drops_that_connection_only() -> None:
    """A frame above MAXMSGSIZE never reaches the codec: libzmq drops the sender's connection.
    The server keeps serving everyone else."""
    srv = Server("tcp://127.0.0.1:0", max_message_bytes=64 << 10)
    srv.on(M.Ready, lambda p, m: M.SubmitAck(lease_id=0, accepted=1))
    srv.start()
    client = Client(srv.endpoint, lambda: M.Hello(role="actor", worker_id="good"))
    ctx = zmq.Context()
    try:
        client.connect(timeout=5)
        raw = ctx.socket(zmq.DEALER)
        raw.connect(srv.endpoint)
        raw.send_multipart([bytes(128 << 10)])
        time.sleep(0.3)
        assert client.request(M.Ready(credits=1), timeout=5).accepted == 1
        assert srv.metrics["bus/bad_messages"] == 0
    finally:
        client.close()
        ctx.destroy(linger=0)
        srv.stop()
