"""bus.weights.store, bus.weights.crc, bus.weights.server, bus.weights.pull: store layout and checksums, partial stores,
WeightServer + pull over tcp loopback."""

from __future__ import annotations

import random
import threading
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from bus import messages as M
from bus.codec import as_bfloat16, decode, encode
from bus.weights.crc import combine_chunks, crc32_combine
from bus.weights.pull import fetch_manifest, pull
from bus.weights.server import WeightServer
from bus.weights.store import PartialStore, WeightStore, check_manifest


def make_store(version: int = 1, chunk_bytes: int = 64 << 10, mb: float = 1.0, seed: int = 0) -> WeightStore:
    rng = np.random.default_rng(seed)
    n = int(mb * (1 << 20)) // 4
    return WeightStore.from_arrays(version, [
        ("embed", rng.standard_normal((n // 256, 256)).astype(np.float32)),
        ("norm", rng.standard_normal(7).astype(np.float16)),
        ("bias", rng.integers(0, 9, 5, dtype=np.int64)),
    ], chunk_bytes=chunk_bytes)


@pytest.fixture
def wserver() -> Iterator[WeightServer]:
    srv = WeightServer("tcp://127.0.0.1:0")
    yield srv
    srv.stop()


# --- checksums and layout ------------------------------------------------------------------------


def test_crc32_combine_matches_zlib_on_random_splits() -> None:
    rnd = random.Random(0)
    data = bytes(rnd.getrandbits(8) for _ in range(5000))
    for _ in range(50):
        cut = rnd.randint(0, len(data))
        a, b = data[:cut], data[cut:]
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)
    crcs = [zlib.crc32(data[i:i + 333]) for i in range(0, len(data), 333)]
    assert combine_chunks(crcs, 333, len(data)) == zlib.crc32(data)


def test_fast_crc_is_zlibs_crc32() -> None:
    from bus.weights.crc import crc32

    data = np.random.default_rng(3).integers(0, 256, (1 << 20) + 7, dtype=np.uint8)
    assert crc32(data) == zlib.crc32(data) and crc32(data[5:], 77) == zlib.crc32(data[5:], 77)


def test_store_layout_alignment_padding_and_checksums() -> None:
    a = np.arange(10, dtype=np.float32)
    b = np.arange(6, dtype=np.int64).reshape(2, 3)
    bf = as_bfloat16(np.array([0x3F80, 0x4000], dtype=np.uint16))
    s = WeightStore.from_arrays(4, [("a", a), ("b", b), ("bf", bf)], chunk_bytes=64)
    m = s.manifest
    assert [(t.name, t.dtype, t.shape, t.offset, t.nbytes) for t in m.tensors] == [
        ("a", "float32", [10], 0, 40), ("b", "int64", [2, 3], 64, 48), ("bf", "bfloat16", [2], 128, 4)]
    assert m.total_bytes == 132 and s.n_chunks == 3 and m.version == 4
    assert not s.buffer[40:64].any() and not s.buffer[112:128].any()  # zeroed padding
    assert m.chunk_crcs == [zlib.crc32(s.buffer[i:i + 64]) for i in (0, 64, 128)]
    assert m.checksum == zlib.crc32(s.buffer) and s.verify()
    out = dict(s.arrays())
    assert np.array_equal(out["a"], a) and np.array_equal(out["b"], b)
    assert out["bf"].dtype == np.uint16 and list(out["bf"]) == [0x3F80, 0x4000]
    assert bytes(s.chunk(2)) == s.buffer[128:].tobytes()


def test_dtype_names_override_and_mismatch() -> None:
    bits = np.array([1, 2], dtype=np.uint16)
    s = WeightStore.from_arrays(0, [("w", bits)], dtype_names={"w": "bfloat16"})
    assert s.manifest.tensors[0].dtype == "bfloat16"
    with pytest.raises(ValueError, match="does not fit"):
        WeightStore.from_arrays(0, [("w", bits)], dtype_names={"w": "float32"})


def test_from_buffer_and_manifest_checks() -> None:
    s = make_store(mb=0.1)
    assert WeightStore.from_buffer(s.manifest, s.buffer.copy()).verify()
    with pytest.raises(ValueError):
        WeightStore.from_buffer(s.manifest, s.buffer[:-1])
    bad = M.Manifest(**{**s.manifest.__dict__, "chunk_crcs": s.manifest.chunk_crcs[:-1]})
    with pytest.raises(ValueError, match="chunk crcs"):
        check_manifest(bad)
    beyond = [M.TensorMeta("x", "float32", [4], s.manifest.total_bytes, 16)]
    outside = M.Manifest(**{**s.manifest.__dict__, "tensors": beyond})
    with pytest.raises(ValueError, match="outside"):
        check_manifest(outside)


# --- partial stores ------------------------------------------------------------------------------


def test_partial_store_checks_each_chunk_and_completes() -> None:
    s = make_store(mb=0.25, chunk_bytes=16 << 10)
    p = PartialStore(s.manifest)
    arrived: list[int] = []
    p.add_listener(arrived.append)
    corrupt = bytearray(s.chunk(0))
    corrupt[5] ^= 1
    assert p.put(0, corrupt) is False and not p.has(0)
    assert p.put(0, bytes(s.chunk(0))[:-1]) is False
    assert p.put(999, b"") is False
    with pytest.raises(ValueError, match="missing"):
        p.to_store()
    order = list(range(s.n_chunks))
    random.Random(1).shuffle(order)
    for i in order:
        assert p.put(i, s.chunk(i))
    assert p.complete and arrived == order and p.missing() == []
    assert np.array_equal(p.to_store().buffer, s.buffer)


def test_partial_wait_wakes_when_chunk_arrives() -> None:
    s = make_store(mb=0.1)
    p = PartialStore(s.manifest)
    assert p.wait(0, timeout=0.05) is False
    threading.Timer(0.1, lambda: p.put(0, s.chunk(0))).start()
    t0 = time.monotonic()
    assert p.wait(0, timeout=5) is True and time.monotonic() - t0 < 2


# --- serving and pulling -------------------------------------------------------------------------


def test_pull_round_trip_with_window_and_callbacks(wserver: WeightServer) -> None:
    s = make_store(version=3, mb=2)
    wserver.publish(s)
    seen: list[int] = []
    got, metrics = pull(wserver.endpoint, 3, window=4, on_chunk=seen.append)
    assert np.array_equal(got.buffer, s.buffer) and got.manifest == s.manifest
    assert sorted(seen) == list(range(s.n_chunks))
    assert metrics["weights/bytes"] == s.manifest.total_bytes and metrics["weights/retries"] == 0
    assert metrics["weights/bad_chunks"] == 0 and metrics["weights/transfer_s"] > 0
    assert wserver.metrics["weights/chunks_served"] == s.n_chunks
    assert wserver.metrics["weights/bytes_served"] == s.manifest.total_bytes
    for (name, a), (_, b) in zip(got.arrays(), s.arrays()):
        assert np.array_equal(a, b), name


def test_latest_version_and_eviction(wserver: WeightServer) -> None:
    for v in (1, 2, 3):
        wserver.publish(make_store(version=v, mb=0.1, seed=v))
    assert wserver.versions() == [2, 3]  # keep_versions=2
    assert fetch_manifest(wserver.endpoint, -1).version == 3
    got, _ = pull(wserver.endpoint, -1)
    assert got.version == 3
    with pytest.raises(LookupError, match="not held"):
        pull(wserver.endpoint, 1, max_retries=5)  # evicted: not_found at once, no retry


def test_corrupted_chunk_is_detected_and_refetched() -> None:
    class FlipOnce(WeightServer):
        flipped = 0

        def chunk_payload(self, store, index):  # type: ignore[no-untyped-def]
            data = super().chunk_payload(store, index)
            if index == 2 and not self.flipped:
                self.flipped += 1
                bad = bytearray(data)
                bad[100] ^= 0xFF
                return memoryview(bytes(bad))
            return data

    srv = FlipOnce("tcp://127.0.0.1:0")
    try:
        s = make_store(mb=1)
        srv.publish(s)
        got, metrics = pull(srv.endpoint, 1)
        assert srv.flipped == 1 and metrics["weights/bad_chunks"] == 1
        assert np.array_equal(got.buffer, s.buffer)
        assert srv.metrics["weights/chunks_served"] == s.n_chunks + 1
    finally:
        srv.stop()


def test_stalled_source_is_abandoned_for_the_next_one(wserver: WeightServer) -> None:
    class Stall(WeightServer):
        def _serve(self, identity, store, index, rid):  # type: ignore[no-untyped-def]
            if index >= 3:
                return  # answers the manifest and three chunks, then goes quiet
            super()._serve(identity, store, index, rid)

    stalling = Stall("tcp://127.0.0.1:0")
    try:
        s = make_store(mb=1)
        stalling.publish(s)
        wserver.publish(s)
        sources = iter([stalling.endpoint, wserver.endpoint])
        got, metrics = pull(lambda: next(sources), 1, chunk_timeout_s=0.3)
        assert np.array_equal(got.buffer, s.buffer) and metrics["weights/retries"] == 1
        # the good source only had to send what the stalled one did not
        assert wserver.metrics["weights/chunks_served"] == s.n_chunks - 3
    finally:
        stalling.stop()


def test_relay_parks_requests_until_the_partial_has_the_chunk(wserver: WeightServer) -> None:
    s = make_store(version=5, mb=0.5, chunk_bytes=64 << 10)
    p = PartialStore(s.manifest)
    wserver.publish_partial(p)
    result: dict[str, object] = {}

    def puller() -> None:
        result["store"], result["m"] = pull(wserver.endpoint, 5, chunk_timeout_s=10)

    t = threading.Thread(target=puller)
    t.start()
    time.sleep(0.2)
    assert wserver.metrics["weights/chunks_served"] == 0  # all parked
    for i in reversed(range(s.n_chunks)):
        p.put(i, s.chunk(i))
        time.sleep(0.01)
    t.join(timeout=10)
    assert np.array_equal(result["store"].buffer, s.buffer)  # type: ignore[union-attr]


def test_dropping_a_partial_answers_parked_requests_not_found(wserver: WeightServer) -> None:
    s = make_store(version=1, mb=0.1)
    wserver.publish_partial(PartialStore(s.manifest))
    ctx = zmq.Context()
    try:
        d = ctx.socket(zmq.DEALER)
        d.connect(wserver.endpoint)
        d.send_multipart(encode(M.GetChunk(version=1, index=0), 7))
        time.sleep(0.1)
        wserver.publish(make_store(version=2, mb=0.1))
        wserver.publish(make_store(version=3, mb=0.1))  # version 1 evicted
        assert d.poll(3000)
        err, rid = decode(d.recv_multipart(), max_bytes=1 << 20)
        assert rid == 7 and isinstance(err, M.Error) and err.code == M.ERR_NOT_FOUND
    finally:
        ctx.destroy(linger=0)


def test_a_request_for_a_version_about_to_arrive_waits_for_it(wserver: WeightServer) -> None:
    """A child sent to a relay asks before the relay has published the version (it is one round
    trip from its own manifest): the request waits for the publication, not not_found (which
    sent every such child back to the learner)."""
    wserver.publish(make_store(version=1, mb=0.1))
    s = make_store(version=2, mb=0.5, chunk_bytes=64 << 10, seed=2)
    result: dict[str, object] = {}

    def child() -> None:
        t0 = time.perf_counter()
        result["store"], _ = pull(wserver.endpoint, 2, chunk_timeout_s=10)
        result["s"] = time.perf_counter() - t0

    t = threading.Thread(target=child)
    t.start()
    time.sleep(0.3)  # the child's GetManifest is in, the relay's own pull has not begun
    p = PartialStore(s.manifest)
    wserver.publish_partial(p)
    for i in range(s.n_chunks):
        p.put(i, s.chunk(i))
    t.join(timeout=10)
    assert np.array_equal(result["store"].buffer, s.buffer)  # type: ignore[union-attr]
    assert 0.3 <= result["s"] < M.VERSION_WAIT_S  # type: ignore[operator]


def test_a_wait_for_a_version_ends_at_its_deadline_or_when_passed() -> None:
    srv = WeightServer("tcp://127.0.0.1:0", version_wait_s=0.5)
    ctx = zmq.Context()
    try:
        srv.publish(make_store(version=1, mb=0.1))
        d = ctx.socket(zmq.DEALER)
        d.connect(srv.endpoint)

        def answer(timeout_ms: int) -> tuple[M.Message, int, float]:
            t0 = time.perf_counter()
            assert d.poll(timeout_ms), "no answer"
            msg, rid = decode(d.recv_multipart(), max_bytes=1 << 20)
            return msg, rid, time.perf_counter() - t0

        d.send_multipart(encode(M.GetManifest(version=0), 1))  # older than held: at once
        err, rid, waited = answer(3000)
        assert rid == 1 and err.code == M.ERR_NOT_FOUND and waited < 0.3  # type: ignore[attr-defined]
        d.send_multipart(encode(M.GetManifest(version=2), 2))  # never comes: not_found at the deadline
        err, rid, waited = answer(3000)
        assert rid == 2 and err.code == M.ERR_NOT_FOUND and "waited" in err.message  # type: ignore[attr-defined]
        assert 0.4 <= waited < 2.0
        d.send_multipart(encode(M.GetManifest(version=2), 3))  # passed by version 3: version 2 will not come
        time.sleep(0.1)
        srv.publish(make_store(version=3, mb=0.1))
        err, rid, waited = answer(3000)
        assert rid == 3 and err.code == M.ERR_NOT_FOUND and waited < 0.3  # type: ignore[attr-defined]
        extra = 5  # waiting requests count against the peer's MAX_QUEUED_REPLIES like parked ones
        for i in range(M.MAX_QUEUED_REPLIES + extra):
            d.send_multipart(encode(M.GetManifest(version=9), 100 + i))
        codes = [answer(3000)[0].code for _ in range(extra)]  # type: ignore[attr-defined]
        assert codes == [M.ERR_BAD_MESSAGE] * extra and srv.metrics["weights/refused_requests"] == extra
    finally:
        ctx.destroy(linger=0)
        srv.stop()


def test_weights_port_answers_bad_and_unexpected_messages(wserver: WeightServer) -> None:
    wserver.publish(make_store(mb=0.1))
    ctx = zmq.Context()
    try:
        d = ctx.socket(zmq.DEALER)
        d.connect(wserver.endpoint)
        d.send_multipart([b"\x00junk"])
        d.send_multipart(encode(M.Ready(credits=1), 2))
        d.send_multipart(encode(M.GetChunk(version=1, index=10_000), 3))
        codes = []
        for _ in range(3):
            assert d.poll(3000)
            msg, rid = decode(d.recv_multipart(), max_bytes=1 << 20)
            codes.append((rid, msg.code))
        assert codes == [(0, M.ERR_BAD_MESSAGE), (2, M.ERR_BAD_MESSAGE), (3, M.ERR_NOT_FOUND)]
        assert wserver.metrics["weights/bad_messages"] == 1
    finally:
        ctx.destroy(linger=0)


def test_copy_crc_copies_and_checksums_in_blocks() -> None:
    from bus.weights.crc import COPY_BLOCK, copy_crc

    rng = np.random.default_rng(3)
    for n in (0, 1, COPY_BLOCK - 1, COPY_BLOCK, 3 * COPY_BLOCK + 17):
        src = rng.integers(0, 256, n, dtype=np.uint8)
        dest = np.zeros(n, dtype=np.uint8)
        assert copy_crc(dest, src) == zlib.crc32(src.tobytes())
        assert np.array_equal(dest, src)


def test_a_peer_cannot_park_unbounded_requests(wserver: WeightServer) -> None:
    """Requests for chunks a relay has not received yet wait (parked); one peer gets at most
    MAX_QUEUED_REPLIES of them, the rest are refused at once (the queue had no per-peer limit)."""
    s = make_store(version=1, mb=0.1)
    wserver.publish_partial(PartialStore(s.manifest))
    ctx = zmq.Context()
    try:
        d = ctx.socket(zmq.DEALER)
        d.connect(wserver.endpoint)
        extra = 20
        for i in range(M.MAX_QUEUED_REPLIES + extra):
            d.send_multipart(encode(M.GetChunk(version=1, index=0), i + 1))
        refused = []
        while d.poll(1000):
            msg, rid = decode(d.recv_multipart(), max_bytes=1 << 20)
            refused.append(rid)
        assert len(refused) == extra and all(r > M.MAX_QUEUED_REPLIES for r in refused)
        assert wserver.metrics["weights/refused_requests"] == extra
    finally:
        ctx.destroy(linger=0)
