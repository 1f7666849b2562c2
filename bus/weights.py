"""Versioned weights as one flat buffer, served in chunks, pulled with credit pipelining, relayed.

Layout (``WeightStore.from_arrays``): tensors in the given order, each at the next 64-byte aligned
offset of one contiguous uint8 buffer (padding zeroed). The buffer is cut into ``chunk_bytes``
chunks (the last one shorter); the Manifest lists the tensors (name, dtype tag, shape, offset,
nbytes), the crc32 of every chunk and the crc32 of the whole buffer.

Checksums: CRC-32 per chunk (zlib's polynomial; computed with ISA-L where the `isal` wheel is
installed, ~5x faster than zlib.crc32 and bit-identical, else with zlib). The whole-buffer crc32 is
not a second pass over the bytes: it is ``crc32_combine`` of the chunk crcs (zlib's algorithm:
crc(A‖B) = M_len(B)·crc(A) ⊕ crc(B) over GF(2), M_len the "append len zero bytes" operator, cached
per length). A puller takes each chunk's crc on its own destination buffer after copying the frame
in, so the combined value is exactly the crc32 of the buffer it will load, checked against the
manifest's at the end.

Serving (``WeightServer``): a ROUTER on its own thread answers GetManifest (version -1 = latest)
and GetChunk from the stores it holds (the newest ``keep_versions``). A ``PartialStore`` — a relay
still receiving — can be published too: a GetChunk for a chunk it lacks is parked and answered the
moment ``put`` delivers it (the partial's listener wakes the server thread through its outbox), so
a relay serves chunk i as soon as it has it. Chunks leave as zero-copy frames of the store buffer.

Pulling (``pull``): one DEALER, GetManifest, then GetChunk with at most ``window`` requests
outstanding (zguide ch. 7 credit pipelining). A chunk failing its crc is requested again; a
request unanswered for ``chunk_timeout_s`` (or an Error reply) abandons the source: a new socket to
``source_fn()``'s next endpoint (or the same one again) continues with the chunks still missing.
More than ``max_retries`` such switches raises TimeoutError. Received frames are copied once into
the destination (the partial's buffer) and checked there, on a verifier thread.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import zmq

try:  # ISA-L's CRC-32 (carry-less multiply) runs ~5x zlib's here; the same polynomial, the same values
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover — plain zlib where the wheel is missing
    from zlib import crc32

from bus.codec import decode, dtype_name, encode, numpy_dtype
from bus.messages import (
    ALLOWED_DTYPES,
    CHUNK_BYTES,
    CHUNK_TIMEOUT_S,
    ERR_BAD_MESSAGE,
    ERR_NOT_FOUND,
    MAX_MESSAGE_BYTES,
    PULL_WINDOW,
    Chunk,
    Error,
    GetChunk,
    GetManifest,
    Manifest,
    Message,
    ProtocolError,
    TensorMeta,
)
from bus.server import (
    NOBLOCK,
    Outbox,
    bind_endpoint,
    bound_endpoint,
    configure_socket,
    recv_frames,
    recv_ready,
    send_frames,
)
from common.log import get_logger

if TYPE_CHECKING:
    from bus.auth import CurveConfig

log = get_logger(component="bus.weights")
ALIGN = 64


# --- crc32 combination ------------------------------------------------------------------------


def _gf2_times(mat: Sequence[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_mul(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """The operator "apply b, then a"."""
    return [_gf2_times(a, col) for col in b]


@functools.lru_cache(maxsize=64)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """GF(2) matrix (32 columns) that advances a crc32 register over `nbytes` zero bytes."""
    one_bit = [0xEDB88320] + [1 << n for n in range(31)]  # reflected CRC-32 polynomial, one zero bit
    byte = one_bit
    for _ in range(3):  # 8 zero bits = one_bit squared three times
        byte = _gf2_mul(byte, byte)
    result: list[int] | None = None
    power = byte
    while nbytes:
        if nbytes & 1:
            result = power if result is None else _gf2_mul(power, result)
        nbytes >>= 1
        if nbytes:
            power = _gf2_mul(power, power)
    return tuple(result if result is not None else [1 << n for n in range(32)])


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32(A ‖ B) from crc32(A), crc32(B) and len(B) (zlib's crc32_combine)."""
    return (_gf2_times(_zeros_operator(len2), crc1) ^ crc2) if len2 else crc1


def combine_chunks(crcs: Sequence[int], chunk_bytes: int, total_bytes: int) -> int:
    crc = 0
    for i, c in enumerate(crcs):
        crc = crc32_combine(crc, c, min(chunk_bytes, total_bytes - i * chunk_bytes))
    return crc


# --- stores --------------------------------------------------------------------------------------


def n_chunks(m: Manifest) -> int:
    return -(-m.total_bytes // m.chunk_bytes)


def chunk_range(m: Manifest, i: int) -> tuple[int, int]:
    start = i * m.chunk_bytes
    return start, min(start + m.chunk_bytes, m.total_bytes)


def check_manifest(m: Manifest, max_bytes: int = 1 << 40) -> None:
    """Reject a manifest that is inconsistent (ValueError): a bad source must not crash a puller."""
    if not 0 <= m.total_bytes <= max_bytes or m.chunk_bytes <= 0:
        raise ValueError(f"manifest sizes: total {m.total_bytes}, chunk {m.chunk_bytes}")
    if len(m.chunk_crcs) != n_chunks(m):
        raise ValueError(f"manifest has {len(m.chunk_crcs)} chunk crcs for {n_chunks(m)} chunks")
    for t in m.tensors:
        if t.dtype not in ALLOWED_DTYPES or any(d < 0 for d in t.shape):
            raise ValueError(f"tensor {t.name}: dtype {t.dtype} / shape {t.shape} not allowed")
        itemsize = numpy_dtype(t.dtype).itemsize
        if t.nbytes != math.prod(t.shape) * itemsize:
            raise ValueError(f"tensor {t.name}: {t.nbytes} bytes do not fit shape {t.shape} {t.dtype}")
        if t.offset < 0 or t.offset + t.nbytes > m.total_bytes or t.offset % itemsize:
            raise ValueError(f"tensor {t.name} at offset {t.offset} lies outside the buffer")


@dataclass
class WeightStore:
    """One complete weight version: `buffer` (uint8, read-only by convention) and its `manifest`."""

    manifest: Manifest
    buffer: np.ndarray

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def n_chunks(self) -> int:
        return n_chunks(self.manifest)

    @classmethod
    def from_arrays(cls, version: int, arrays: Sequence[tuple[str, np.ndarray]],
                    chunk_bytes: int = CHUNK_BYTES,
                    dtype_names: dict[str, str] | None = None) -> "WeightStore":
        """Lay `arrays` out in order at 64-byte aligned offsets of one zeroed uint8 buffer and
        checksum it. A tensor's dtype tag is `dtype_names[name]` if given (e.g. "bfloat16" for
        uint16 bits), else the array's own (see ``codec.dtype_name``)."""
        metas, offset = [], 0
        for name, arr in arrays:
            tag = (dtype_names or {}).get(name) or dtype_name(arr)
            if tag not in ALLOWED_DTYPES or numpy_dtype(tag).itemsize != arr.dtype.itemsize:
                raise ValueError(f"{name}: dtype tag {tag} does not fit array dtype {arr.dtype}")
            offset = -(-offset // ALIGN) * ALIGN
            metas.append(TensorMeta(name, tag, [int(d) for d in arr.shape], offset, int(arr.nbytes)))
            offset += arr.nbytes
        buffer = np.zeros(offset, dtype=np.uint8)
        for (_, arr), meta in zip(arrays, metas):
            flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            buffer[meta.offset:meta.offset + meta.nbytes] = flat
        crcs = [crc32(buffer[i:i + chunk_bytes]) for i in range(0, offset, chunk_bytes)]
        checksum = combine_chunks(crcs, chunk_bytes, offset)
        manifest = Manifest(version, metas, offset, chunk_bytes, crcs, checksum)
        return cls(manifest, buffer)

    @classmethod
    def from_buffer(cls, manifest: Manifest, buffer: np.ndarray) -> "WeightStore":
        check_manifest(manifest)
        if buffer.dtype != np.uint8 or buffer.ndim != 1 or buffer.nbytes != manifest.total_bytes:
            raise ValueError("buffer must be a flat uint8 array of manifest.total_bytes")
        return cls(manifest, buffer)

    def chunk(self, i: int) -> memoryview:
        start, end = chunk_range(self.manifest, i)
        return memoryview(self.buffer[start:end])

    def arrays(self) -> list[tuple[str, np.ndarray]]:
        """(name, view) per tensor; bfloat16 comes back as uint16 bits (the consumer converts)."""
        views = []
        for t in self.manifest.tensors:
            raw = self.buffer[t.offset:t.offset + t.nbytes]
            views.append((t.name, raw.view(numpy_dtype(t.dtype)).reshape(t.shape)))
        return views

    def verify(self) -> bool:
        return crc32(self.buffer) == self.manifest.checksum


class PartialStore:
    """A version being received: chunks arrive in any order, each checked against its crc."""

    def __init__(self, manifest: Manifest):
        check_manifest(manifest)
        self.manifest = manifest
        self.buffer = np.empty(manifest.total_bytes, dtype=np.uint8)
        self._crcs = [0] * n_chunks(manifest)
        self._have = [False] * n_chunks(manifest)
        self._count = 0
        self._cond = threading.Condition()
        self._listeners: list[Callable[[int], None]] = []

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def n_chunks(self) -> int:
        return len(self._have)

    @property
    def complete(self) -> bool:
        return self._count == len(self._have)

    def add_listener(self, fn: Callable[[int], None]) -> None:
        """`fn(i)` is called (in the putting thread) after chunk i became available."""
        self._listeners.append(fn)

    def has(self, i: int) -> bool:
        return self._have[i]

    def missing(self) -> list[int]:
        return [i for i, h in enumerate(self._have) if not h]

    def put(self, i: int, data: Any) -> bool:
        """Copy chunk i in and check its crc there; False (chunk not taken) on a size or crc mismatch."""
        if not 0 <= i < len(self._have):
            return False
        if self._have[i]:
            return True
        start, end = chunk_range(self.manifest, i)
        src = np.frombuffer(data, dtype=np.uint8)
        if src.nbytes != end - start:
            return False
        dest = self.buffer[start:end]
        dest[:] = src  # the one unavoidable copy: frame → destination
        crc = crc32(dest)
        if crc != self.manifest.chunk_crcs[i]:
            return False
        with self._cond:
            self._crcs[i] = crc
            self._have[i] = True
            self._count += 1
            self._cond.notify_all()
        for fn in self._listeners:
            fn(i)
        return True

    def wait(self, i: int, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._have[i], timeout)

    def chunk(self, i: int) -> memoryview:
        if not self._have[i]:
            raise KeyError(f"chunk {i} not received yet")
        start, end = chunk_range(self.manifest, i)
        return memoryview(self.buffer[start:end])

    def to_store(self) -> WeightStore:
        """The finished store; ValueError if incomplete or the whole-buffer checksum differs."""
        if not self.complete:
            raise ValueError(f"{len(self.missing())} chunks still missing")
        m = self.manifest
        if combine_chunks(self._crcs, m.chunk_bytes, m.total_bytes) != m.checksum:
            raise ValueError("whole-buffer checksum mismatch")
        return WeightStore(m, self.buffer)



# --- serving ------------------------------------------------------------------------------------


class WeightServer:
    """ROUTER answering GetManifest / GetChunk from the newest `keep_versions` stores (own thread)."""

    def __init__(self, endpoint: str, *, curve: "CurveConfig | None" = None, keep_versions: int = 2,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, name: str = "weights"):
        self.keep_versions = keep_versions
        self.max_message_bytes = max_message_bytes
        self.metrics: dict[str, float] = dict.fromkeys(
            ("weights/chunks_served", "weights/bytes_served", "weights/manifests_served", "bus/bad_messages",
             "bus/send_failed"), 0.0)
        self._ctx = zmq.Context(io_threads=1)
        self._auth = None
        self._sock = self._ctx.socket(zmq.ROUTER)
        configure_socket(self._sock, max_message_bytes)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.SNDHWM, 0)  # pullers bound what is queued by their window
        if curve is not None:
            from bus.auth import apply_server

            self._auth = apply_server(self._sock, curve, self._ctx)
        self._sock.bind(bind_endpoint(endpoint))
        self.endpoint = bound_endpoint(self._sock)
        self._outbox = Outbox(self._ctx, name)
        self._lock = threading.Lock()
        self._stores: dict[int, WeightStore | PartialStore] = {}
        self._parked: dict[tuple[int, int], list[tuple[bytes, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bus-{name}", daemon=True)
        self._thread.start()

    def publish(self, store: "WeightStore | PartialStore") -> None:
        """Serve `store` (thread-safe); versions beyond the newest `keep_versions` are dropped."""
        with self._lock:
            self._stores[store.version] = store
            for v in sorted(self._stores)[:-self.keep_versions]:
                del self._stores[v]
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
        except Exception:  # noqa: BLE001
            log.exception("weight server loop failed")
        finally:
            self._sock.close(0)


    def _send(self, identity: bytes, msg: Message, rid: int) -> None:
        try:
            send_frames(self._sock, [identity, *encode(msg, rid)], NOBLOCK)
        except zmq.ZMQError:  # the puller went away
            self.metrics["bus/send_failed"] += 1

    def _on_request(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        try:
            msg, rid = decode(frames[1:], max_bytes=self.max_message_bytes)
        except ProtocolError as e:
            self.metrics["bus/bad_messages"] += 1
            self._send(identity, Error(ERR_BAD_MESSAGE, str(e)[:200]), 0)
            return
        with self._lock:
            latest = max(self._stores) if self._stores else None
            version = getattr(msg, "version", None)
            if isinstance(msg, GetManifest) and version == -1:
                version = latest
            store = self._stores.get(version) if isinstance(version, int) else None
        if not isinstance(msg, (GetManifest, GetChunk)):
            self._send(identity, Error(ERR_BAD_MESSAGE, f"unexpected {msg.TYPE} on the weights port"), rid)
        elif store is None:
            self._send(identity, Error(ERR_NOT_FOUND, f"version {version} not held"), rid)
        elif isinstance(msg, GetManifest):
            self.metrics["weights/manifests_served"] += 1
            self._send(identity, store.manifest, rid)
        elif not 0 <= msg.index < store.n_chunks:
            self._send(identity, Error(ERR_NOT_FOUND, f"chunk {msg.index} out of range"), rid)
        elif isinstance(store, PartialStore) and not store.has(msg.index):
            self._parked.setdefault((store.version, msg.index), []).append((identity, rid))
        else:
            self._serve(identity, store, msg.index, rid)

    def _serve(self, identity: bytes, store: "WeightStore | PartialStore", index: int, rid: int) -> None:
        data = np.frombuffer(self.chunk_payload(store, index), dtype=np.uint8)
        self._send(identity, Chunk(store.version, index, data), rid)
        self.metrics["weights/chunks_served"] += 1
        self.metrics["weights/bytes_served"] += data.nbytes

    def _on_notice(self, frames: list[zmq.Frame]) -> None:
        if frames[0].bytes == b"C":  # chunk `index` of partial `version` arrived
            key = (int.from_bytes(frames[1].bytes, "little", signed=True),
                   int.from_bytes(frames[2].bytes, "little"))
            waiting = self._parked.pop(key, [])
            with self._lock:
                store = self._stores.get(key[0])
            for identity, rid in waiting:
                if store is None:
                    self._send(identity, Error(ERR_NOT_FOUND, f"version {key[0]} dropped"), rid)
                else:
                    self._serve(identity, store, key[1], rid)
        with self._lock:
            held = set(self._stores)
        for key in [k for k in self._parked if k[0] not in held]:
            for identity, rid in self._parked.pop(key):
                self._send(identity, Error(ERR_NOT_FOUND, f"version {key[0]} dropped"), rid)


# --- pulling ------------------------------------------------------------------------------------

Source = "str | Callable[[], str]"


def fetch_manifest(endpoint: str, version: int = -1, timeout: float = CHUNK_TIMEOUT_S,
                   curve: "CurveConfig | None" = None) -> Manifest:
    """Ask one weights ROUTER for a manifest (e.g. to create the PartialStore a relay publishes)."""
    with _Puller(endpoint, curve, MAX_MESSAGE_BYTES) as p:
        return p.manifest(version, timeout)


class _Puller:
    """One DEALER to one weight source."""

    def __init__(self, endpoint: str, curve: "CurveConfig | None", max_message_bytes: int,
                 ctx: zmq.Context | None = None):
        self.endpoint = endpoint
        self.max_message_bytes = max_message_bytes
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context(io_threads=1)
        self.sock = self.ctx.socket(zmq.DEALER)
        configure_socket(self.sock, max_message_bytes)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        if curve is not None:
            from bus.auth import apply_client

            apply_client(self.sock, curve)
        self.sock.connect(endpoint)

    def __enter__(self) -> "_Puller":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def send(self, msg: Message, rid: int = 0) -> None:
        send_frames(self.sock, encode(msg, rid))

    def recv(self, timeout: float) -> Message | None:
        """Next reply or None after `timeout` s; a malformed reply raises ProtocolError."""
        if not self.sock.poll(max(0.0, timeout) * 1000):
            return None
        frames = recv_frames(self.sock)
        return decode(frames, max_bytes=self.max_message_bytes)[0]

    def manifest(self, version: int, timeout: float) -> Manifest:
        self.send(GetManifest(version))
        reply = self.recv(timeout)
        if reply is None:
            raise TimeoutError(f"no manifest from {self.endpoint} within {timeout} s")
        if isinstance(reply, Error):
            raise LookupError(f"{self.endpoint}: {reply.code}: {reply.message}")
        if not isinstance(reply, Manifest):
            raise ProtocolError(f"expected manifest, got {reply.TYPE}")
        check_manifest(reply)
        return reply


class _SourceFailed(Exception):
    """This source keeps sending chunks that fail their crc."""


class _Verifier:
    """Copies received chunks into the PartialStore and checks their crc on its own thread (numpy's
    copy and the crc release the GIL), so the receiving thread keeps the pipe full meanwhile.
    Results, ``(index, ok)``, queue up for the puller to collect when it next looks: no wake-up of
    the receiving thread per chunk."""

    def __init__(self, partial: PartialStore):
        self.partial = partial
        self.busy: set[int] = set()  # submitted, result not collected yet (puller thread only)
        self._jobs: "queue.SimpleQueue[tuple[int, Any] | None]" = queue.SimpleQueue()
        self._results: "queue.SimpleQueue[tuple[int, bool]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="bus-verify", daemon=True)
        self._thread.start()

    def submit(self, index: int, data: Any) -> None:
        self.busy.add(index)
        self._jobs.put((index, data))

    def results(self, timeout: float | None = None) -> list[tuple[int, bool]]:
        """Results ready now; with a timeout, wait that long for the first one."""
        out = []
        try:
            if timeout is not None:
                out.append(self._results.get(timeout=max(0.0, timeout)))
            while True:
                out.append(self._results.get_nowait())
        except queue.Empty:
            pass
        for i, _ in out:
            self.busy.discard(i)
        return out

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                ok = self.partial.put(*job)
            except Exception:  # noqa: BLE001 — never leave the puller waiting: treat as a bad chunk
                log.exception("chunk check failed", index=job[0])
                ok = False
            self._results.put((job[0], ok))

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)


def pull(source: "str | Callable[[], str]", version: int, *, window: int = PULL_WINDOW,
         chunk_timeout_s: float = CHUNK_TIMEOUT_S, on_chunk: Callable[[int], None] | None = None,
         partial: PartialStore | None = None, max_retries: int = 5, curve: "CurveConfig | None" = None,
         max_message_bytes: int = MAX_MESSAGE_BYTES) -> tuple[WeightStore, dict[str, float]]:
    """Pull `version` (-1 = the source's latest) from `source` (an endpoint, or a callable giving the
    endpoint to use next, asked again whenever a source stalls or fails). Fills `partial` when given
    (a relay publishes it first). Returns the verified store and `weights/*` metrics."""
    next_endpoint: Callable[[], str] = source if callable(source) else (lambda: source)  # type: ignore
    if partial is not None and version not in (-1, partial.version):
        raise ValueError(f"partial holds version {partial.version}, asked for {version}")
    t0 = time.perf_counter()
    stats = {"weights/retries": 0.0, "weights/bad_chunks": 0.0}
    bad: dict[int, int] = {}
    ctx = zmq.Context(io_threads=1)
    verifier: _Verifier | None = None
    try:
        endpoint = next_endpoint()
        while True:
            puller = _Puller(endpoint, curve, max_message_bytes, ctx)
            try:
                if partial is None:
                    partial = PartialStore(puller.manifest(version, chunk_timeout_s))
                verifier = verifier or _Verifier(partial)
                _pull_chunks(puller, verifier, window, chunk_timeout_s, on_chunk, stats, bad, max_retries)
                break
            except (TimeoutError, LookupError, ProtocolError, ValueError, _SourceFailed) as e:
                stats["weights/retries"] += 1
                log.warning("weight source failed", endpoint=endpoint, error=str(e)[:200])
                if stats["weights/retries"] > max_retries:
                    raise TimeoutError(f"pull of version {version} failed after {max_retries} retries") from e
                endpoint = next_endpoint()
            finally:
                puller.close()
        store = partial.to_store()
    finally:
        if verifier is not None:
            verifier.close()
        ctx.term()
    stats["weights/transfer_s"] = time.perf_counter() - t0
    stats["weights/bytes"] = float(store.manifest.total_bytes)
    return store, stats


def _pull_chunks(puller: _Puller, verifier: _Verifier, window: int, timeout: float,
                 on_chunk: Callable[[int], None] | None, stats: dict[str, float], bad: dict[int, int],
                 max_retries: int) -> None:
    """Credit pipelining: keep `window` GetChunk requests outstanding (and at most `window` chunks
    awaiting verification, which bounds memory) until every chunk is in and verified."""
    partial = verifier.partial
    todo = deque(i for i in partial.missing() if i not in verifier.busy)
    outstanding: dict[int, float] = {}  # chunk index -> deadline
    while todo or outstanding or verifier.busy:
        # block on the verifier only when nothing is on the wire and nothing more may be sent
        stuck = not outstanding and (not todo or len(verifier.busy) >= window)
        for i, ok in verifier.results(timeout if stuck else None):
            if ok:
                if on_chunk is not None:
                    on_chunk(i)
                continue
            stats["weights/bad_chunks"] += 1
            bad[i] = bad.get(i, 0) + 1
            log.warning("bad chunk", endpoint=puller.endpoint, index=i, times=bad[i])
            if bad[i] > max_retries:
                raise _SourceFailed(f"chunk {i} failed its crc {bad[i]} times")
            todo.appendleft(i)
        now = time.monotonic()
        while todo and len(outstanding) < window and len(verifier.busy) < window:
            i = todo.popleft()
            if not partial.has(i):
                puller.send(GetChunk(partial.version, i))
                outstanding[i] = now + timeout
        if not outstanding:
            continue
        reply = puller.recv(min(outstanding.values()) - now)
        if reply is None:
            raise TimeoutError(f"{puller.endpoint}: chunk not answered within {timeout} s")
        if isinstance(reply, Error):
            raise LookupError(f"{puller.endpoint}: {reply.code}: {reply.message}")
        if isinstance(reply, Chunk) and reply.version == partial.version and reply.index in outstanding:
            del outstanding[reply.index]
            verifier.submit(reply.index, reply.data)
