"""Serving weight versions: a ROUTER on its own thread answers GetManifest and GetChunk.

``WeightServer`` answers GetManifest (version -1 = latest) and GetChunk from the stores it holds
(the newest ``keep_versions``). A ``PartialStore`` — a relay still receiving — can be published
too: a GetChunk for a chunk it lacks is parked and answered the moment ``put`` delivers it (the
partial's listener wakes the server thread through its outbox), so a relay serves chunk i as soon
as it has it. Dropping a version answers the requests parked on it with Error(not_found). Chunks
leave as zero-copy frames of the store buffer.

A GetManifest or GetShared for a version newer than any held waits up to ``VERSION_WAIT_S`` for it:
the learner sends a child to a relay the moment it has sent that relay to pull the same version,
so the child's first request often lands before the relay has published it (its own manifest is
one round trip away). Answering not_found there would send the child back to the learner, and
undo the fan-out the relay exists for. The wait ends with the version's publication, a newer one's
(the awaited one will not come), or not_found at the deadline.

GetShared (``bus.weights.shm``): a store whose buffer lives in ``/dev/shm`` is offered to pullers of the
same host as its file (Shared), so they map it instead of pulling it; a partial answers once it is
complete. Anyone else — another host, a private buffer — gets Error(not_found) at once and pulls
chunks. Dropping a version the server's process owns in shared memory unlinks its file (mappings
made before stay valid), and publishing one makes the buffer for the next version in advance
(``store.prepare_next``): a source is sent new versions all run long.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import zmq

from bus.weights import shm
from bus.codec import decode, encode
from bus.messages import (
    ERR_BAD_MESSAGE,
    ERR_NOT_FOUND,
    MAX_MESSAGE_BYTES,
    MAX_QUEUED_REPLIES,
    VERSION_WAIT_S,
    Chunk,
    Error,
    GetChunk,
    GetManifest,
    GetShared,
    Message,
    ProtocolError,
    Shared,
)
from bus.server import NOBLOCK, Outbox, bind_or_release, configure_socket, recv_ready, send_frames
from bus.weights.spare import later
from bus.weights.store import PartialStore, WeightStore, prepare_next
from common.log import get_logger

if TYPE_CHECKING:
    from bus.auth import CurveConfig

log = get_logger(component="bus.weights.store")  # one log component for the whole weight transfer


class WeightServer:
    """ROUTER answering GetManifest / GetChunk from the newest `keep_versions` stores (own thread)."""

    def __init__(self, endpoint: str, *, curve: "CurveConfig | None" = None, keep_versions: int = 2,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, name: str = "weights",
                 version_wait_s: float = VERSION_WAIT_S):
        self.keep_versions = keep_versions
        self.version_wait_s = version_wait_s
        self.max_message_bytes = max_message_bytes
        self.metrics: dict[str, float] = dict.fromkeys(
            ("weights/chunks_served", "weights/bytes_served", "weights/manifests_served", "weights/shared_served",
             "weights/bad_messages", "weights/send_failed", "weights/refused_requests"), 0.0)
        self._ctx = zmq.Context(io_threads=1)
        self._auth = None
        self._sock = self._ctx.socket(zmq.ROUTER)
        configure_socket(self._sock, max_message_bytes)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # An honest puller has at most its window outstanding; a hostile one that asks and never
        # reads gets at most this many replies queued, then its replies are dropped (send_failed).
        self._sock.setsockopt(zmq.SNDHWM, MAX_QUEUED_REPLIES)
        if curve is not None:
            from bus.auth import apply_server

            self._auth = apply_server(self._sock, curve, self._ctx)
        self.endpoint = bind_or_release(self._sock, endpoint, self._ctx, self._auth)
        self._outbox = Outbox(self._ctx, name)
        self._lock = threading.Lock()
        self._stores: dict[int, WeightStore | PartialStore] = {}
        self._parked: dict[tuple[int, int], list[tuple[bytes, int]]] = {}
        self._parked_by: dict[bytes, int] = {}  # identity -> requests it has parked
        # version -> (identity, request, rid, deadline): asked for a version before it was published
        self._awaiting: dict[int, list[tuple[bytes, Message, int, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bus-{name}", daemon=True)
        self._thread.start()

    def publish(self, store: "WeightStore | PartialStore") -> None:
        """Serve `store` (thread-safe); versions beyond the newest `keep_versions` are dropped."""
        with self._lock:
            self._stores[store.version] = store
            dropped = [self._stores.pop(v) for v in sorted(self._stores)[:-self.keep_versions]]
        for old in dropped:
            _unlink(old)
        if store.complete:
            prepare_next(store)  # a source gets new versions all run long: make the next buffer now
        self._outbox.put([b"P"])  # lets the thread refuse requests parked on a dropped version

    def publish_partial(self, partial: PartialStore) -> None:
        """Serve a version still being received: chunk i is served as soon as `partial` has it."""
        version = partial.version
        partial.add_listener(lambda i: self._outbox.put([b"C", version.to_bytes(8, "little", signed=True),
                                                         i.to_bytes(8, "little")]))
        self.publish(partial)

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._stores)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            _unlink(store, now=True)
        self._outbox.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    close = stop

    def chunk_payload(self, store: "WeightStore | PartialStore", index: int) -> memoryview:
        """The bytes sent for chunk `index` (a zero-copy view; a seam tests override to corrupt)."""
        return store.chunk(index)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._outbox.pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if self._sock in events and (frames := recv_ready(self._sock)):
                    self._on_request(frames)
                if self._outbox.pull in events and (frames := recv_ready(self._outbox.pull)):
                    self._on_notice(frames)
                if self._awaiting:
                    self._expire_awaiting(time.monotonic())
        except Exception:  # noqa: BLE001
            log.exception("weight server loop failed")
        finally:
            self._sock.close(0)

    def _send(self, identity: bytes, msg: Message, rid: int) -> None:
        try:
            send_frames(self._sock, [identity, *encode(msg, rid)], NOBLOCK)
        except zmq.ZMQError:  # the puller went away
            self.metrics["weights/send_failed"] += 1

    def _on_request(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        try:
            msg, rid = decode(frames[1:], max_bytes=self.max_message_bytes)
        except ProtocolError as e:
            self.metrics["weights/bad_messages"] += 1
            self._send(identity, Error(ERR_BAD_MESSAGE, str(e)[:200]), 0)
            return
        if not isinstance(msg, (GetManifest, GetChunk, GetShared)):
            self._send(identity, Error(ERR_BAD_MESSAGE, f"unexpected {msg.TYPE} on the weights port"), rid)
        else:
            self._answer(identity, msg, rid, may_wait=True)

    def _answer(self, identity: bytes, msg: "GetManifest | GetChunk | GetShared", rid: int, may_wait: bool) -> None:
        with self._lock:
            latest = max(self._stores) if self._stores else None
            version = latest if isinstance(msg, (GetManifest, GetShared)) and msg.version == -1 else msg.version
            store = self._stores.get(version) if isinstance(version, int) else None
        if store is None:
            if may_wait and isinstance(msg, (GetManifest, GetShared)) and _ahead(version, latest):
                self._await(version, identity, msg, rid)
            else:
                self._send(identity, Error(ERR_NOT_FOUND, f"version {version} not held"), rid)
        elif isinstance(msg, GetManifest):
            self.metrics["weights/manifests_served"] += 1
            self._send(identity, store.manifest, rid)
        elif isinstance(msg, GetShared):
            if store.shared is None or msg.host != shm.host_id():
                self._send(identity, Error(ERR_NOT_FOUND, "not in shared memory on this host"), rid)
            elif isinstance(store, PartialStore) and not store.complete:
                self._park((store.version, -1), identity, rid)
            else:
                self._send_shared(identity, store, rid)
        elif not 0 <= msg.index < store.n_chunks:
            self._send(identity, Error(ERR_NOT_FOUND, f"chunk {msg.index} out of range"), rid)
        elif isinstance(store, PartialStore) and not store.has(msg.index):
            self._park((store.version, msg.index), identity, rid)
        else:
            self._serve(identity, store, msg.index, rid)

    def _await(self, version: int, identity: bytes, msg: Message, rid: int) -> None:
        """Hold a request for a version not published yet (module docstring), within the peer's
        MAX_QUEUED_REPLIES like any parked request."""
        if not self._count_parked(identity, rid):
            return
        self._awaiting.setdefault(version, []).append((identity, msg, rid, time.monotonic() + self.version_wait_s))

    def _release_awaiting(self) -> None:
        """Answer the requests held for versions now published, or passed by a newer one."""
        with self._lock:
            held = set(self._stores)
        latest = max(held) if held else None
        for version in [v for v in self._awaiting if v in held or not _ahead(v, latest)]:
            for identity, msg, rid, _ in self._awaiting.pop(version):
                self._unpark([(identity, rid)])
                self._answer(identity, msg, rid, may_wait=False)

    def _expire_awaiting(self, now: float) -> None:
        for version in list(self._awaiting):
            due = [w for w in self._awaiting[version] if w[3] <= now]
            if not due:
                continue
            self._awaiting[version] = [w for w in self._awaiting[version] if w[3] > now]
            if not self._awaiting[version]:
                del self._awaiting[version]
            for identity, _, rid, _ in due:
                self._unpark([(identity, rid)])
                self._send(identity, Error(ERR_NOT_FOUND, f"version {version} not held (waited "
                                           f"{self.version_wait_s:g} s for it)"), rid)

    def _park(self, key: tuple[int, int], identity: bytes, rid: int) -> None:
        """Answer later, when a partial version has the chunk."""
        if self._count_parked(identity, rid):
            self._parked.setdefault(key, []).append((identity, rid))

    def _count_parked(self, identity: bytes, rid: int) -> bool:
        """A peer may have at most MAX_QUEUED_REPLIES requests parked or awaiting (more is refused:
        an honest puller keeps its window)."""
        self._parked_by[identity] = self._parked_by.get(identity, 0) + 1
        if self._parked_by[identity] > MAX_QUEUED_REPLIES:
            self._parked_by[identity] -= 1
            self.metrics["weights/refused_requests"] += 1
            self._send(identity, Error(ERR_BAD_MESSAGE, f"more than {MAX_QUEUED_REPLIES} requests waiting"), rid)
            return False
        return True

    def _unpark(self, waiting: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
        for identity, _ in waiting:
            left = self._parked_by.get(identity, 1) - 1
            if left > 0:
                self._parked_by[identity] = left
            else:
                self._parked_by.pop(identity, None)
        return waiting

    def _serve(self, identity: bytes, store: "WeightStore | PartialStore", index: int, rid: int) -> None:
        data = np.frombuffer(self.chunk_payload(store, index), dtype=np.uint8)
        self._send(identity, Chunk(store.version, index, data), rid)
        self.metrics["weights/chunks_served"] += 1
        self.metrics["weights/bytes_served"] += data.nbytes

    def _send_shared(self, identity: bytes, store: "WeightStore | PartialStore", rid: int) -> None:
        assert store.shared is not None
        self._send(identity, Shared(str(store.shared.path), store.manifest, store.shared.file_id), rid)
        self.metrics["weights/shared_served"] += 1

    def _on_notice(self, frames: list[zmq.Frame]) -> None:
        if frames[0].bytes == b"C":  # chunk `index` of partial `version` arrived
            key = (int.from_bytes(frames[1].bytes, "little", signed=True),
                   int.from_bytes(frames[2].bytes, "little"))
            waiting = self._unpark(self._parked.pop(key, []))
            with self._lock:
                store = self._stores.get(key[0])
            for identity, rid in waiting:
                if store is None:
                    self._send(identity, Error(ERR_NOT_FOUND, f"version {key[0]} dropped"), rid)
                else:
                    self._serve(identity, store, key[1], rid)
            if store is not None and store.complete:  # the last chunk: parked GetShared can map it now
                for identity, rid in self._unpark(self._parked.pop((key[0], -1), [])):
                    self._send_shared(identity, store, rid)
        with self._lock:
            held = set(self._stores)
        for key in [k for k in self._parked if k[0] not in held]:
            for identity, rid in self._unpark(self._parked.pop(key)):
                self._send(identity, Error(ERR_NOT_FOUND, f"version {key[0]} dropped"), rid)
        if self._awaiting:
            self._release_awaiting()


def _ahead(version: int | None, latest: int | None) -> bool:
    """`version` is one this server may still be given: newer than all it holds."""
    return isinstance(version, int) and version >= 0 and (latest is None or version > latest)


def _unlink(store: "WeightStore | PartialStore", now: bool = False) -> None:
    """A dropped version's shared-memory file goes (if this process made it), on the housekeeping
    thread unless `now`: freeing its pages must not slow the version that replaces it. It is
    attached no more either way: the server no longer names it."""
    if store.shared is not None and store.shared.owner:
        if now:
            store.shared.unlink()
        else:
            later(store.shared.unlink)
