"""Pulling a weight version from a weights ROUTER: credit-pipelined chunk requests, retry, failover.

``pull``: one DEALER, GetManifest, then GetChunk with at most ``window`` requests outstanding
(zguide ch. 7 credit pipelining). A chunk failing its crc is requested again; a request unanswered
for ``chunk_timeout_s`` (or an Error reply) abandons the source: a new socket to ``source_fn()``'s
next endpoint (or the same one again) continues with the chunks still missing. More than
``max_retries`` such switches raises TimeoutError. Received frames are copied once into the
destination (the partial's buffer) and checked there, on a verifier thread, so the receiving
thread keeps the pipe full meanwhile.

Same host (``bus.weights.shm``): unless told not to (``shared=False``, or a ``partial`` to fill), ``pull``
first asks the source, on the connection it then pulls chunks over, for the version in shared
memory (GetShared). A source on this host that keeps it in ``/dev/shm`` answers with the file,
which is mapped read-only: no bytes move. Any other answer (another host, a private buffer, a file
already gone, no answer within ``shared_timeout_s``) costs one round trip, and the chunks are
pulled as usual into private memory: only a process that serves what it pulls (a relay, which
brings its own ``partial``) keeps it in ``/dev/shm``.

``fetch_manifest`` asks one source for a manifest alone (e.g. to create the ``PartialStore`` a
relay publishes before pulling into it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import zmq

from bus.weights import shm
from bus.codec import decode, encode
from bus.messages import (
    CHUNK_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    PULL_WINDOW,
    Chunk,
    Error,
    GetChunk,
    GetManifest,
    GetShared,
    Manifest,
    Message,
    ProtocolError,
    Shared,
)
from bus.server import NOBLOCK, configure_socket, recv_frames, send_frames
from bus.weights.store import PartialStore, WeightStore, check_manifest
from common.log import get_logger

if TYPE_CHECKING:
    from bus.auth import CurveConfig

log = get_logger(component="bus.weights.store")  # one log component for the whole weight transfer

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
        """Never blocks: a DEALER left with no pipe (a refused CURVE handshake, a dropped
        connection) would wait forever; that source counts as timed out instead."""
        try:
            send_frames(self.sock, encode(msg, rid), NOBLOCK)
        except zmq.Again:
            raise TimeoutError(f"{self.endpoint}: no connection to send on") from None

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


def attach_shared(endpoint: str, version: int, timeout: float, curve: "CurveConfig | None" = None,
                  max_message_bytes: int = MAX_MESSAGE_BYTES) -> WeightStore | None:
    """`version` (-1 = latest) mapped from the shared memory of a source on this host, or None
    (another host, not in shared memory, gone, no answer within `timeout` s)."""
    if not shm.available():
        return None
    with _Puller(endpoint, curve, max_message_bytes) as p:
        return _attach(p, version, timeout)


def _attach(puller: _Puller, version: int, timeout: float) -> WeightStore | None:
    try:
        puller.send(GetShared(version, shm.host_id()))
        reply = puller.recv(timeout)
    except TimeoutError:  # no connection: the chunk path will find out and fail over
        return None
    except ProtocolError as e:
        log.warning("bad shared reply", endpoint=puller.endpoint, error=str(e)[:120])
        return None
    if not isinstance(reply, Shared) or version not in (-1, reply.manifest.version):
        return None
    try:
        check_manifest(reply.manifest)
        buf = shm.attach(reply.path, reply.manifest.total_bytes, reply.file_id)
    except (OSError, ValueError) as e:  # dropped meanwhile, or another /dev/shm (containers)
        log.info("shared weights not attachable", path=reply.path, error=str(e)[:120])
        return None
    return WeightStore(reply.manifest, buf.array, buf)


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
         max_message_bytes: int = MAX_MESSAGE_BYTES, shared: bool = True,
         shared_timeout_s: float | None = None,
         on_partial: Callable[[PartialStore], None] | None = None) -> tuple[WeightStore, dict[str, float]]:
    """Pull `version` (-1 = the source's latest) from `source` (an endpoint, or a callable giving the
    endpoint to use next, asked again whenever a source stalls or fails). Fills `partial` when given
    (a relay publishes it first). With `shared`, a same-host source's shared memory is mapped
    instead (waiting up to `shared_timeout_s`, default 3 × `chunk_timeout_s`, for a relay still
    receiving). `on_partial(partial)` is called once the version's PartialStore exists (its chunks
    can be read as they land: actors/actor.py streams them into the engine). Returns the verified
    store and `weights/*` metrics. A source that does not hold the version (its manifest answered
    "not found": newer versions replaced it) raises LookupError at once, not after `max_retries`:
    the caller asks for a newer one."""
    next_endpoint: Callable[[], str] = source if callable(source) else (lambda: source)  # type: ignore
    if partial is not None and version not in (-1, partial.version):
        raise ValueError(f"partial holds version {partial.version}, asked for {version}")
    t0 = time.perf_counter()
    stats = {"weights/retries": 0.0, "weights/bad_chunks": 0.0, "weights/shared": 0.0}
    try_shared = shared and partial is None and shm.available()
    bad: dict[int, int] = {}
    ctx = zmq.Context(io_threads=1)
    verifier: _Verifier | None = None
    try:
        endpoint = next_endpoint()
        while True:
            puller = _Puller(endpoint, curve, max_message_bytes, ctx)
            try:
                if try_shared:  # first, on the same connection: a same-host source's copy
                    try_shared = False
                    attached = _attach(puller, version, 3 * chunk_timeout_s if shared_timeout_s is None
                                       else shared_timeout_s)
                    if attached is not None:
                        stats["weights/shared"] = 1.0
                        store = attached
                        break
                if partial is None:
                    partial = PartialStore(puller.manifest(version, chunk_timeout_s))
                    if on_partial is not None:
                        on_partial(partial)
                verifier = verifier or _Verifier(partial)
                _pull_chunks(puller, verifier, window, chunk_timeout_s, on_chunk, stats, bad, max_retries)
                break
            except (TimeoutError, LookupError, ProtocolError, ValueError, _SourceFailed) as e:
                if isinstance(e, LookupError) and partial is None:
                    raise  # the source does not hold the version (newer ones replaced it): asking again won't help
                stats["weights/retries"] += 1
                log.warning("weight source failed", endpoint=endpoint, error=str(e)[:200])
                if stats["weights/retries"] > max_retries:
                    raise TimeoutError(f"pull of version {version} failed after {max_retries} retries") from e
                endpoint = next_endpoint()
            finally:
                puller.close()
        if partial is not None:
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
