"""bus.codec: round trips of every message type (in memory and over real sockets), zero-copy
receive, and one test per validation rule."""

from __future__ import annotations

import re
import dataclasses

import msgpack
import numpy as np
import pytest
import zmq

from bus import messages as M
from bus.codec import BFloat16Array, as_bfloat16, decode, encode
from bus.messages import MESSAGE_TYPES, PROTOCOL_VERSION, ProtocolError

BIG = 1 << 30


def _arr(n: int, dtype: str, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 100).astype(dtype)


def sample_messages() -> list[M.Message]:
    """One instance of every wire type, with arrays both inline-sized and frame-sized."""
    sampling = M.SamplingSpec(n=4, temperature=0.7, top_p=0.9, max_tokens=64, seed=3)
    samples = [M.Sample(_arr(600, "int32", 1), _arr(600, "float32", 2), M.FINISH_STOP, "12 \\boxed{3}"),
               M.Sample(_arr(3, "int32", 3), _arr(3, "float32", 4), M.FINISH_LENGTH, "")]
    out: list[M.Message] = [
        M.Hello(role="actor", worker_id="a-1", host="h", capacity=2, weight_version=5,
                relay_endpoint="tcp://h:1"),
        M.Welcome(run_id="r", epoch=2, version=7, heartbeat_s=1.0, liveness=3, max_staleness=1,
                  sampling=sampling),
        M.Heartbeat(version=3, max_staleness=2, weight_version=1, stats={"tokens_per_s": 12.5}),
        M.Bye(reason="shutdown"),
        M.Error(code=M.ERR_INTERNAL, message="x"),
        M.LeaseRequest(max_groups=4, weight_version=3),
        M.Lease(lease_id=9, epoch=2,
                prompts=[M.PromptItem("p1", _arr(5, "int32")), M.PromptItem("p2", _arr(700, "int32"))],
                sampling=sampling, min_version=2, deadline_s=600.0),
        M.Wait(reason=M.WAIT_WEIGHTS, retry_after_s=0.5, min_version=4),
        M.Submit(lease_id=9, epoch=2, groups=[M.Group("p1", 3, samples)]),
        M.SubmitAck(lease_id=9, accepted=1, rejected=1, reason="stale"),
        M.Release(lease_ids=[1, 2, 3]),
        M.Ready(credits=8),
        M.ScoreRequest(request_id=4, items=[M.ScoreItem("math", "\\boxed{2}", "2")]),
        M.ScoreResult(request_id=4,
                      results=[M.ScoreOut(1.0), M.ScoreOut(0.0, error="timeout", detail="10s")]),
        M.WeightSource(version=3, endpoint="tcp://x:5556", source_id="a-2"),
        M.GetManifest(version=-1),
        M.Manifest(version=3, tensors=[M.TensorMeta("w", "bfloat16", [2, 3], 0, 12)], total_bytes=12,
                   chunk_bytes=8, chunk_crcs=[1, 2], checksum=3),
        M.GetChunk(version=3, index=1),
        M.Chunk(version=3, index=1, data=np.arange(5000, dtype=np.uint8)),
        M.GetShared(version=3, host="node1/boot"),
        M.Shared(path="/dev/shm/or1-w-1-2-ab", manifest=M.Manifest(
            version=3, tensors=[M.TensorMeta("w", "float32", [2], 0, 8)], total_bytes=8, chunk_bytes=8,
            chunk_crcs=[1], checksum=1)),
        M.Status(),
        M.StatusReply(run_id="r", epoch=1, version=2, max_staleness=0,
                      fleet=[M.PeerInfo("actor", "a", "h", 1, 0, 3.5, 0.2, leases=1)], queues={"q": 1},
                      rates={"r": 0.5}),
        M.Set(key="max_staleness", value=2, admin_key="k"),
        M.SetReply(key="max_staleness", old=0, new=[1, {"a": None}]),
    ]
    assert {type(m) for m in out} == set(MESSAGE_TYPES.values())
    return out


def assert_same(a: object, b: object) -> None:
    """Deep equality that compares arrays by dtype tag, shape and bytes."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert (type(a) is BFloat16Array) == (type(b) is BFloat16Array)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b and type(a) is type(b), (a, b)


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: m.TYPE)
def test_round_trip_every_type(msg: M.Message) -> None:
    frames = encode(msg, rid=77)
    out, rid = decode(frames, max_bytes=BIG)
    assert rid == 77
    assert_same(msg, out)


def test_round_trip_over_real_sockets() -> None:
    ctx = zmq.Context()
    try:
        for transport in ("inproc://codec-test", "tcp://127.0.0.1:*"):
            router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
            router.bind(transport)
            dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())
            for i, msg in enumerate(sample_messages()):
                dealer.send_multipart(encode(msg, i), copy=False)
                frames = router.recv_multipart(copy=False)
                out, rid = decode(frames[1:], max_bytes=BIG)
                assert rid == i
                assert_same(msg, out)
            router.close(0)
            dealer.close(0)
    finally:
        ctx.destroy(linger=0)


def test_large_arrays_become_frames_small_ones_inline() -> None:
    msg = M.Lease(lease_id=1, epoch=0, prompts=[M.PromptItem("a", np.zeros(10, np.int32)),
                                               M.PromptItem("b", np.zeros(1000, np.int32))],
                  sampling=M.SamplingSpec(n=2), min_version=0, deadline_s=1.0)
    frames = encode(msg)
    assert len(frames) == 2 and frames[1].nbytes == 4000
    header = msgpack.unpackb(frames[0])
    assert header["prompts"][0]["token_ids"]["__nd__"] == bytes(40)
    assert header["prompts"][1]["token_ids"] == {"__nd__": 1, "dtype": "int32", "shape": [1000]}


def test_strided_and_nd_arrays_travel_as_contiguous_frames() -> None:
    """A strided view is copied once into a contiguous frame (zmq refuses a strided buffer:
    `arr.reshape(-1)` of a 1-D strided view is still strided), an N-D array goes flat."""
    strided = np.arange(2000, dtype=np.int32)[::2]
    grid = np.arange(600, dtype=np.float32).reshape(20, 30)
    msg = M.Set(key="k", value=[strided, grid])
    frames = encode(msg)
    assert all(f.flags.c_contiguous and f.ndim == 1 for f in frames[1:])
    ctx = zmq.Context()
    try:
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send_multipart(frames, copy=False)
        out, _ = decode(pull.recv_multipart(copy=False), max_bytes=BIG)
    finally:
        ctx.destroy(linger=0)
    assert np.array_equal(out.value[0], strided) and np.array_equal(out.value[1], grid)


def test_zero_copy_64mb_frame_arrives_bit_identical() -> None:
    data = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind("tcp://127.0.0.1:*")
        push.connect(pull.getsockopt(zmq.LAST_ENDPOINT).decode())
        push.send_multipart(encode(M.Chunk(version=1, index=0, data=data)), copy=False)
        frames = pull.recv_multipart(copy=False)
        chunk, _ = decode(frames, max_bytes=BIG)
        assert np.array_equal(chunk.data, data)
        # the array is a read-only view of the zmq frame's own buffer: no copy on receive
        assert np.shares_memory(chunk.data, np.frombuffer(frames[1].buffer, dtype=np.uint8))
        assert not chunk.data.flags.owndata and not chunk.data.flags.writeable
        push.close(0)
        pull.close(0)
    finally:
        ctx.destroy(linger=0)


def test_bfloat16_tag_round_trips() -> None:
    bits = np.array([0x3F80, 0x4000, 0xC040], dtype=np.uint16)  # 1.0, 2.0, -3.0 in bf16
    msg = M.Chunk(version=0, index=0, data=as_bfloat16(bits))
    out, _ = decode(encode(msg), max_bytes=BIG)
    assert type(out.data) is BFloat16Array and out.data.dtype == np.uint16
    assert msgpack.unpackb(encode(out)[0])["data"]["dtype"] == "bfloat16"
    assert np.array_equal(out.data.view(np.uint16), bits)


def test_numpy_scalars_and_tuples_encode_as_plain_values() -> None:
    msg = M.LeaseRequest(max_groups=np.int64(3), weight_version=np.int32(-1))  # type: ignore[arg-type]
    out, _ = decode(encode(msg), max_bytes=BIG)
    assert out == M.LeaseRequest(max_groups=3, weight_version=-1) and type(out.max_groups) is int


# --- validation: one test per rule ---------------------------------------------------------------


def _frames(header: dict, *buffers: bytes) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def _ok_header(**fields: object) -> dict:
    return {"v": PROTOCOL_VERSION, "type": "lease_request", "rid": 0, "max_groups": 1, "weight_version": 0,
            **fields}


def _rejects(frames: list, match: str, max_bytes: int = BIG) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(frames, max_bytes=max_bytes)


def test_valid_baseline_decodes() -> None:
    assert decode(_frames(_ok_header()), max_bytes=BIG)[0] == M.LeaseRequest(1, 0)


def test_rejects_empty_message() -> None:
    _rejects([], "empty")


def test_rejects_non_msgpack_header() -> None:
    _rejects([b"\xc1\xc1\xc1"], "not msgpack")
    _rejects([msgpack.packb({"v": 1})[:-1]], "not msgpack")  # truncated


def test_rejects_header_that_is_not_a_map() -> None:
    _rejects([msgpack.packb([1, 2])], "not a map")


def test_rejects_wrong_protocol_version() -> None:
    _rejects(_frames(_ok_header(v=PROTOCOL_VERSION + 1)), "protocol version")
    _rejects(_frames(_ok_header(v=True)), "protocol version")


def test_rejects_unknown_type() -> None:
    _rejects(_frames(_ok_header(type="launch_missiles")), "unknown message type")
    _rejects(_frames(_ok_header(type=5)), "unknown message type")


def test_rejects_bad_rid() -> None:
    _rejects(_frames(_ok_header(rid=-1)), "bad rid")
    _rejects(_frames(_ok_header(rid="1")), "bad rid")


def test_rejects_missing_required_field() -> None:
    h = _ok_header()
    del h["max_groups"]
    _rejects(_frames(h), "missing field 'max_groups'")


def test_optional_fields_may_be_absent() -> None:
    out, _ = decode(_frames({"v": PROTOCOL_VERSION, "type": "heartbeat", "rid": 0}), max_bytes=BIG)
    assert out == M.Heartbeat()


def test_rejects_unknown_extra_field() -> None:
    _rejects(_frames(_ok_header(surprise=1)), "unknown field 'surprise'")


def test_rejects_wrong_scalar_types() -> None:
    _rejects(_frames(_ok_header(max_groups="4")), "max_groups: expected int")
    _rejects(_frames(_ok_header(max_groups=True)), "max_groups: expected int")  # ints are not bools
    _rejects(_frames(_ok_header(max_groups=1.5)), "max_groups: expected int")
    h = {"v": PROTOCOL_VERSION, "type": "bye", "rid": 0, "reason": b"bytes"}
    _rejects(_frames(h), "reason: expected str")


def test_floats_accept_ints() -> None:
    h = {"v": PROTOCOL_VERSION, "type": "wait", "rid": 0, "reason": "x", "retry_after_s": 2}
    out, _ = decode(_frames(h), max_bytes=BIG)
    assert out.retry_after_s == 2.0 and type(out.retry_after_s) is float


def test_rejects_bad_nested_types() -> None:
    base = {"v": PROTOCOL_VERSION, "type": "release", "rid": 0}
    _rejects(_frames({**base, "lease_ids": [1, "2"]}), r"lease_ids: \[1\]: expected int")
    _rejects(_frames({**base, "lease_ids": 3}), "lease_ids: expected list")
    hb = {"v": PROTOCOL_VERSION, "type": "heartbeat", "rid": 0}
    _rejects(_frames({**hb, "stats": {"a": "fast"}}), "stats: \\['a'\\]: expected float")
    _rejects(_frames({**hb, "stats": [1.0]}), "stats: expected map")
    w = {"v": PROTOCOL_VERSION, "type": "welcome", "rid": 0, "run_id": "r", "epoch": 0, "version": 0,
         "heartbeat_s": 1.0, "liveness": 3, "max_staleness": 0}
    assert decode(_frames({**w, "sampling": None}), max_bytes=BIG)[0].sampling is None  # X | None
    _rejects(_frames({**w, "sampling": {"n": "4"}}), r"sampling: SamplingSpec.n: expected int")
    _rejects(_frames({**w, "sampling": {"n": 4, "bogus": 1}}), "unknown field 'bogus'")
    _rejects(_frames({**w, "sampling": 4}), "expected SamplingSpec map")
    _rejects(_frames({**w, "epoch": None}), "epoch: expected int")


def test_rejects_any_values_outside_plain_data() -> None:
    h = {"v": PROTOCOL_VERSION, "type": "set", "rid": 0, "key": "k",
         "value": msgpack.ExtType(5, b"x")}
    _rejects(_frames(h), "not allowed")


def _chunk_header(**spec: object) -> dict:
    return {"v": PROTOCOL_VERSION, "type": "chunk", "rid": 0, "version": 0, "index": 0,
            "data": {"__nd__": 1, "dtype": "uint8", "shape": [4], **spec}}


def test_array_reference_must_be_well_formed() -> None:
    assert decode(_frames(_chunk_header(), b"abcd"), max_bytes=BIG)[0].data.tobytes() == b"abcd"
    _rejects(_frames({**_chunk_header(), "data": [1, 2]}), "array reference")
    _rejects(_frames({**_chunk_header(), "data": {"__nd__": 1, "dtype": "uint8"}}), "array reference")


def test_rejects_disallowed_dtype() -> None:
    _rejects(_frames(_chunk_header(dtype="object"), b"abcd"), "dtype 'object' not allowed")
    _rejects(_frames(_chunk_header(dtype="complex64"), b"abcd" * 2), "not allowed")


def test_rejects_shape_length_mismatch() -> None:
    _rejects(_frames(_chunk_header(), b"abc"), "needs 4 bytes, frame has 3")
    _rejects(_frames(_chunk_header(dtype="int32", shape=[2]), b"abcd"), "needs 8 bytes")
    _rejects(_frames(_chunk_header(shape=[-4]), b"abcd"), "bad array shape")
    _rejects(_frames(_chunk_header(shape=[2.0, 2]), b"abcd"), "bad array shape")


def test_rejects_too_many_elements() -> None:
    _rejects(_frames(_chunk_header(shape=[1 << 20, 1 << 20]), b"abcd"), "elements >")


def test_rejects_missing_extra_or_reused_frames() -> None:
    _rejects(_frames(_chunk_header()), "frame 1 does not exist")
    _rejects(_frames(_chunk_header(), b"abcd", b"extra"), "1 unreferenced frame")
    h = {"v": PROTOCOL_VERSION, "type": "set", "rid": 0, "key": "k",
         "value": [{"__nd__": 1, "dtype": "uint8", "shape": [4]}] * 2}
    _rejects(_frames(h, b"abcd"), "referenced twice")
    _rejects(_frames(_chunk_header(__nd__="1"), b"abcd"), "frame index or bytes")


def test_inline_array_checked_too() -> None:
    assert decode(_frames(_chunk_header(__nd__=b"wxyz")), max_bytes=BIG)[0].data.tobytes() == b"wxyz"
    _rejects(_frames(_chunk_header(__nd__=b"wxy")), "needs 4 bytes")


def test_rejects_too_many_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bus.codec.MAX_FRAMES", 2)
    _rejects([b"x"] * 4, "4 frames > 3")


def test_rejects_message_over_max_bytes() -> None:
    _rejects(_frames(_chunk_header(), b"abcd"), "bytes > 20", max_bytes=20)


def test_rejects_header_over_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bus.codec.MAX_HEADER_BYTES", 16)
    _rejects(_frames(_ok_header()), "header of")


def test_rejects_deep_nesting_with_protocol_error() -> None:
    value: object = 1
    for _ in range(3000):
        value = [value]
    packed = msgpack.packb({"v": PROTOCOL_VERSION, "type": "set", "rid": 0, "key": "k"})
    # hand-build a header with a 3000-deep list (msgpack.packb itself refuses such depth)
    deep = b"\x91" * 3000 + b"\x01"
    header = packed[:1].replace(b"\x84", b"\x85") + packed[1:] + msgpack.packb("value") + deep
    _rejects([header], "nested too deeply|not msgpack")


def test_encode_refuses_disallowed_dtype() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        encode(M.Chunk(version=0, index=0, data=np.zeros(3, dtype=np.complex64)))


@pytest.mark.parametrize("msg,what", [
    (M.Hello(role="actor", worker_id="x" * 100_000), "Hello.worker_id: 100000 > 256 characters"),
    (M.Hello(role="actor", worker_id="a", relay_endpoint="tcp://" + "h" * 600 + ":1"), "Hello.relay_endpoint"),
    (M.Heartbeat(stats={f"k{i}": 1.0 for i in range(600)}), "Heartbeat.stats: 600 > 512 entries"),
    (M.Error(code="c", message="m" * 5000), "Error.message"),
    (M.ScoreResult(1, [M.ScoreOut(1.0, error="e" * 5000)]), "ScoreOut.error"),
])
def test_peer_strings_and_maps_are_bounded(msg, what):
    """A 100 KB worker_id used to be accepted and logged in full (control headers may be 16 MB)."""
    with pytest.raises(M.ProtocolError, match=re.escape(what)):
        decode(encode(msg), max_bytes=1 << 30)
