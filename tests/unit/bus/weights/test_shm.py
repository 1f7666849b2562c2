"""bus.weights.shm and the shared-memory path of the weight transfer: a same-host puller maps the source's
/dev/shm file instead of pulling chunks; every other case falls back to chunks over TCP."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pytest
import zmq

from bus import messages as M
from bus.weights import shm
from bus.weights import spare as spare_mod
from bus.codec import decode, encode
from bus.weights.pull import attach_shared, fetch_manifest, pull
from bus.weights.server import WeightServer
from bus.weights.store import PartialStore, WeightStore

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")


def arrays(seed: int = 0, mb: float = 2.0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    n = int(mb * (1 << 20)) // 4
    return [("embed", rng.standard_normal(n - 7).astype(np.float32)), ("norm", np.arange(7, dtype=np.float16))]


def ask_shared(endpoint: str, version: int, host: str) -> M.Message:
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.connect(endpoint)
    try:
        d.send_multipart(encode(M.GetShared(version, host), 5))
        assert d.poll(5000)
        return decode(d.recv_multipart(copy=False), max_bytes=1 << 30)[0]
    finally:
        d.close(0)
        ctx.term()


def test_create_attach_unlink() -> None:
    owned = shm.SharedBuffer.create(1 << 20)
    assert not owned.array.any()  # a fresh file reads zeros
    data = np.random.default_rng(0).integers(0, 255, 1 << 19, dtype=np.uint8)
    owned.write(1 << 19, data)
    with pytest.raises(ValueError):
        owned.array[0] = 1  # the owner writes through write(2) only, never through the mapping
    assert np.array_equal(owned.array[1 << 19:], data) and not owned.array[: 1 << 19].any()
    seen = shm.attach(str(owned.path), 1 << 20)
    assert not seen.owner and np.array_equal(seen.array, owned.array)
    with pytest.raises(ValueError):
        seen.array[0] = 1  # mapped read-only
    with pytest.raises(OSError):
        shm.attach(str(owned.path), 1 << 19)  # another size: not that version
    owned.unlink()
    assert not owned.path.exists()
    assert seen.array[5] == owned.array[5]  # mappings outlive the file
    with pytest.raises(OSError):
        shm.attach(str(owned.path), 1 << 20)


def test_attach_refuses_foreign_paths(tmp_path) -> None:
    (tmp_path / "x").write_bytes(b"1234")
    for path in (str(tmp_path / "x"), "/etc/passwd", "/dev/shm/../etc/passwd", "/dev/shm/something-else"):
        with pytest.raises(OSError):
            shm.attach(path, 4)


def test_garbage_collected_owner_unlinks() -> None:
    buf = shm.SharedBuffer.create(4096)
    path = buf.path
    del buf
    assert not path.exists()


def test_full_tmpfs_falls_back_to_private_memory(monkeypatch) -> None:
    class Full:
        f_bavail, f_frsize = 10, 4096  # 40 KB free

    monkeypatch.setattr(shm.os, "statvfs", lambda path: Full())
    with pytest.raises(OSError, match="bytes free"):
        shm.SharedBuffer.create(1 << 20)
    store = WeightStore.from_arrays(1, arrays(mb=0.1), shared=True)
    assert store.shared is None and store.verify()
    assert PartialStore(store.manifest, shared=True).shared is None


def _exit_at_once() -> None:
    pass


def test_sweep_removes_only_files_of_dead_owners() -> None:
    p = mp.get_context("spawn").Process(target=_exit_at_once)
    p.start()
    p.join()
    ns = os.stat("/proc/self/ns/pid").st_ino
    dead = shm.SHM_DIR / f"or1-w-{ns}-{p.pid}-abcdef"
    other_ns = shm.SHM_DIR / f"or1-w-{ns + 1}-{p.pid}-abcdef"  # another namespace: never ours to judge
    live = shm.SharedBuffer.create(64)
    try:
        dead.write_bytes(b"x")
        other_ns.write_bytes(b"x")
        assert shm.sweep() >= 1
        assert not dead.exists() and other_ns.exists() and live.path.exists()
    finally:
        other_ns.unlink(missing_ok=True)
        live.unlink()


def test_same_host_pull_maps_the_store_and_moves_no_chunk() -> None:
    store = WeightStore.from_arrays(3, arrays(), chunk_bytes=256 << 10, shared=True)
    assert store.shared is not None and store.shared.owner and store.verify()
    server = WeightServer("tcp://127.0.0.1:0")
    try:
        server.publish(store)
        got, stats = pull(server.endpoint, -1)
        assert stats["weights/shared"] == 1.0 and server.metrics["weights/chunks_served"] == 0
        assert got.version == 3 and got.verify() and np.array_equal(got.buffer, store.buffer)
        assert got.shared is not None and not got.shared.owner and not got.buffer.flags.writeable
        # shared=False (or another host) takes the chunk path and gets the same bytes
        private, stats = pull(server.endpoint, 3, shared=False)
        assert stats["weights/shared"] == 0.0 and private.shared is None and private.verify()
        assert server.metrics["weights/chunks_served"] == store.n_chunks
        assert isinstance(ask_shared(server.endpoint, 3, "elsewhere/boot"), M.Error)
    finally:
        server.stop()
    assert not store.shared.path.exists()  # stopping the server unlinks what its process made
    assert got.verify()  # the puller's mapping is still good


def test_private_store_and_dropped_version_fall_back_to_chunks() -> None:
    server = WeightServer("tcp://127.0.0.1:0", keep_versions=1)
    try:
        server.publish(WeightStore.from_arrays(1, arrays(1)))  # private memory
        got, stats = pull(server.endpoint, 1)
        assert stats["weights/shared"] == 0.0 and got.verify()
        assert isinstance(ask_shared(server.endpoint, 1, shm.host_id()), M.Error)

        v2 = WeightStore.from_arrays(2, arrays(2), shared=True)
        server.publish(v2)
        reply = ask_shared(server.endpoint, 2, shm.host_id())
        assert isinstance(reply, M.Shared) and reply.path == str(v2.shared.path)
        server.publish(WeightStore.from_arrays(3, arrays(3), shared=True))  # drops 2: its file goes
        assert isinstance(ask_shared(server.endpoint, 2, shm.host_id()), M.Error)  # no longer named
        deadline = time.monotonic() + 10  # unlinked by the housekeeping thread, soon
        while v2.shared.path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not v2.shared.path.exists()
        with pytest.raises(OSError):
            shm.attach(reply.path, reply.manifest.total_bytes)
        assert attach_shared(server.endpoint, 2, 5.0) is None  # not held: Error, then chunks (and not_found)
    finally:
        server.stop()


def test_relay_answers_get_shared_when_its_partial_completes() -> None:
    """A relay receiving into shared memory parks a same-host GetShared until the last chunk is in."""
    source = WeightStore.from_arrays(7, arrays(4, mb=8), chunk_bytes=256 << 10)
    learner = WeightServer("tcp://127.0.0.1:0", name="learner")
    relay = WeightServer("tcp://127.0.0.1:0", name="relay")
    try:
        learner.publish(source)
        partial = PartialStore(fetch_manifest(learner.endpoint, 7), shared=True)
        relay.publish_partial(partial)
        out: dict[str, object] = {}
        follower = threading.Thread(target=lambda: out.update(r=pull(relay.endpoint, 7)))
        follower.start()
        relay_store, _ = pull(learner.endpoint, 7, partial=partial)
        relay.publish(relay_store)
        follower.join(30)
        got, stats = out["r"]
        assert stats["weights/shared"] == 1.0 and relay.metrics["weights/chunks_served"] == 0
        assert got.verify() and np.array_equal(got.buffer, source.buffer)
        assert learner.metrics["weights/chunks_served"] == source.n_chunks  # one transfer for two holders
    finally:
        relay.stop()
        learner.stop()


def _child_pull(endpoint: str, conn) -> None:
    from bus.weights.pull import pull

    store, stats = pull(endpoint, -1)
    conn.send((stats["weights/shared"], store.verify(), int(store.buffer[: 1 << 16].sum())))


def test_another_process_maps_the_learner_store() -> None:
    store = WeightStore.from_arrays(4, arrays(5), shared=True)
    server = WeightServer("tcp://127.0.0.1:0")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    try:
        server.publish(store)
        p = ctx.Process(target=_child_pull, args=(server.endpoint, child))
        p.start()
        assert parent.poll(60)
        assert parent.recv() == (1.0, True, int(store.buffer[: 1 << 16].sum()))
        p.join(10)
    finally:
        server.stop()


def test_prepared_spare_is_taken_for_the_next_version_of_that_size() -> None:
    shm.prepare(3 << 20)  # replaces a spare of another size an earlier test left
    deadline = time.monotonic() + 10
    while (shm.spare.ready is None or shm.spare.ready.array.nbytes != 3 << 20) and time.monotonic() < deadline:
        time.sleep(0.01)
    spare = shm.spare.ready
    assert spare is not None and spare.array.nbytes == 3 << 20
    assert os.stat(spare.path).st_blocks * 512 >= 3 << 20  # pages allocated ahead of the transfer
    other = shm.take(1 << 20)  # another size: a new buffer, the spare stays
    assert other.path != spare.path and shm.spare.ready is spare
    got = shm.take(3 << 20)
    assert got is spare and shm.spare.ready is None and not got.array.any()
    other.unlink()
    got.unlink()


def test_a_forked_child_never_unlinks_its_parents_files() -> None:
    buf = shm.SharedBuffer.create(4096)
    try:
        pid = os.fork()
        if pid == 0:  # the child's finalizers run (as at its exit): they must leave the file alone
            code = 1
            try:
                buf.unlink()
                code = 0 if shm.spare.ready is None and spare_mod._chore_thread is None else 2
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert buf.path.exists()
    finally:
        buf.unlink()
    assert not buf.path.exists()


def test_host_id_separates_network_namespaces_not_hostnames():
    """Two hosts can share a hostname (namespaces, containers, cloned images) but not the boot id,
    network namespace and /dev/shm device that host_id is made of."""
    import os

    hid = shm.host_id()
    assert str(os.stat("/proc/self/ns/net").st_ino) in hid
    assert str(os.stat("/dev/shm").st_dev) in hid


def test_attach_refuses_another_file_at_the_same_path():
    """The source names its file's device:inode; a lookalike path (another /dev/shm) is not mapped."""
    buf = shm.SharedBuffer.create(4096)
    try:
        assert shm.attach(str(buf.path), 4096, buf.file_id).file_id == buf.file_id
        with pytest.raises(OSError, match="another file"):
            shm.attach(str(buf.path), 4096, "1:2")
    finally:
        buf.unlink()


def test_open_writer_writes_into_the_owners_file_and_refuses_others(tmp_path):
    """Another process of the job (a learner rank) writes its part through pwrite; only into an or1
    file that is the one the owner names, and never past its end."""
    import multiprocessing as mp

    buf = shm.SharedBuffer.create(4096)
    try:
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=_write_ones, args=(str(buf.path), buf.file_id))
        p.start()
        p.join(60)
        assert p.exitcode == 0 and buf.array[1024:2048].all() and not buf.array[:1024].any()
        with pytest.raises(OSError, match="another file"), shm.open_writer(str(buf.path), "1:2"):
            pass
        with shm.open_writer(str(buf.path), buf.file_id) as write, pytest.raises(ValueError, match="overrun"):
            write(4000, np.ones(200, np.uint8))
        (tmp_path / "x").write_bytes(b"1234")
        for path in (str(tmp_path / "x"), "/dev/shm/something-else"):
            with pytest.raises(OSError), shm.open_writer(path, ""):
                pass
    finally:
        buf.unlink()


def _write_ones(path: str, file_id: str) -> None:
    with shm.open_writer(path, file_id) as write:
        write(1024, np.ones(1024, np.uint8))
