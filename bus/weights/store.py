"""Versioned weights as one flat buffer, cut into checksummed chunks: the store side.

Layout (``WeightStore.from_arrays``): tensors in the given order, each at the next 64-byte aligned
offset of one contiguous uint8 buffer (padding zeroed). The buffer is cut into ``chunk_bytes``
chunks (the last one shorter); the Manifest lists the tensors (name, dtype tag, shape, offset,
nbytes), the crc32 of every chunk and the crc32 of the whole buffer.

Checksums (``bus.weights.crc``): CRC-32 per chunk; the whole-buffer crc32 is not a second pass over the
bytes but ``crc32_combine`` of the chunk crcs. A ``PartialStore`` (a version being received, e.g.
by a puller or a relay) takes each chunk's crc on its own destination buffer after copying the
frame in, so the combined value is exactly the crc32 of the buffer it will load, checked against
the manifest's in ``to_store`` (a shared-memory partial checks the frame, then write(2) copies it).
``check_manifest`` rejects an inconsistent manifest with ValueError, so a bad source cannot crash a
puller.

Shared memory (``bus.weights.shm``): with ``shared=True`` a store's (or a partial's) buffer is a file in
``/dev/shm`` that same-host pullers map instead of pulling (``GetShared``); when tmpfs cannot hold
it the buffer is private memory, as without the flag. ``WeightStore.shared`` is that file
(owned, or attached from another process), or None.

Serving these stores is ``bus.weights.server``; pulling them is ``bus.weights.pull``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from bus.weights import shm, spare
from bus.codec import dtype_name, numpy_dtype
from bus.weights.crc import combine_chunks, copy_crc, crc32
from bus.messages import ALLOWED_DTYPES, CHUNK_BYTES, Manifest, TensorMeta
from common.log import get_logger

log = get_logger(component="bus.weights.store")

ALIGN = 64


def n_chunks(m: Manifest) -> int:
    return -(-m.total_bytes // m.chunk_bytes)


def chunk_range(m: Manifest, i: int) -> tuple[int, int]:
    start = i * m.chunk_bytes
    return start, min(start + m.chunk_bytes, m.total_bytes)


def allocate(nbytes: int, shared: bool) -> tuple[np.ndarray, "shm.SharedBuffer | None"]:
    """A uint8 buffer of `nbytes`: a read-only view of a shared-memory file (filled through
    ``SharedBuffer.write``) if asked and tmpfs can hold it, else private writable memory (the
    spare made by `prepare_next` if it has that size)."""
    if shared and shm.available():
        try:
            buf = shm.take(nbytes)
            return buf.array, buf
        except OSError as e:  # full or small tmpfs: private memory, same semantics
            log.warning("shm.unavailable", nbytes=nbytes, error=str(e)[:120])
    made = spare.private.take(nbytes)
    return (made if made is not None else np.empty(nbytes, dtype=np.uint8)), None


def lay_out(specs: Sequence[tuple[str, str, list[int]]]) -> tuple[list[TensorMeta], int]:
    """(name, dtype tag, shape) specs → each tensor's place (64-byte aligned, in order) and the
    total size: the one layout rule every store is built by."""
    metas, offset = [], 0
    if len({name for name, _, _ in specs}) != len(specs):
        raise ValueError("a tensor name appears twice in the layout")
    for name, tag, shape in specs:
        if tag not in ALLOWED_DTYPES:
            raise ValueError(f"{name}: dtype tag {tag} is not one of {ALLOWED_DTYPES}")
        nbytes = math.prod(shape) * numpy_dtype(tag).itemsize
        offset = -(-offset // ALIGN) * ALIGN
        metas.append(TensorMeta(name, tag, [int(d) for d in shape], offset, int(nbytes)))
        offset += nbytes
    return metas, offset


def prepare_next(store: "WeightStore | PartialStore") -> None:
    """This process will want a buffer like `store`'s for its next version: make it now, in the
    background (``bus.weights.spare``), if it is one this process fills (private memory, or a
    shared-memory file it owns). A mapped copy of another process's file needs none."""
    if store.shared is None:
        spare.private.prepare(store.manifest.total_bytes)
    elif store.shared.owner:
        shm.prepare(store.manifest.total_bytes)


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
    shared: "shm.SharedBuffer | None" = None  # the buffer's /dev/shm file, if it lives in one

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def n_chunks(self) -> int:
        return n_chunks(self.manifest)

    complete = True  # as PartialStore.complete: every chunk is there

    @classmethod
    def from_arrays(cls, version: int, arrays: Sequence[tuple[str, np.ndarray]],
                    chunk_bytes: int = CHUNK_BYTES, dtype_names: dict[str, str] | None = None,
                    shared: bool = False) -> "WeightStore":
        """Lay `arrays` out in order at 64-byte aligned offsets of one uint8 buffer (padding zeroed;
        in shared memory if `shared`) and checksum it. A tensor's dtype tag is `dtype_names[name]`
        if given (e.g. "bfloat16" for uint16 bits), else the array's own (``codec.dtype_name``)."""
        specs = []
        for name, arr in arrays:
            tag = (dtype_names or {}).get(name) or dtype_name(arr)
            if tag not in ALLOWED_DTYPES or numpy_dtype(tag).itemsize != arr.dtype.itemsize:
                raise ValueError(f"{name}: dtype tag {tag} does not fit array dtype {arr.dtype}")
            specs.append((name, tag, [int(d) for d in arr.shape]))
        by_name = dict(arrays)

        def fill(write: Callable[[str, np.ndarray], None]) -> None:
            for name, _, _ in specs:
                write(name, by_name[name])

        return cls.build(version, specs, fill, chunk_bytes=chunk_bytes, shared=shared)

    @classmethod
    def build(cls, version: int, specs: Sequence[tuple[str, str, list[int]]],
              fill: Callable[[Callable[[str, np.ndarray], None]], None], chunk_bytes: int = CHUNK_BYTES,
              shared: bool = False) -> "WeightStore":
        """A store laid out from (name, dtype tag, shape) `specs` before any data exists: `fill`
        gets a `write(name, array)` that copies each tensor's bytes straight into its place in the
        buffer (the learner exports into it tensor by tensor, so no second copy of the whole model
        is ever held: learner/run.py `publish`). Every spec must be written exactly once, with the
        bytes its dtype and shape say; then the buffer is checksummed."""
        metas, offset = lay_out(specs)
        buffer, shared_buf = allocate(offset, shared)
        where = {m.name: m for m in metas}
        written: set[str] = set()

        def write(name: str, arr: np.ndarray) -> None:
            meta = where.get(name)
            if meta is None or name in written:
                raise ValueError(f"{name}: not in the layout, or written twice")
            flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            if flat.nbytes != meta.nbytes:
                raise ValueError(f"{name}: {flat.nbytes} bytes for a slot of {meta.nbytes}")
            if shared_buf is not None:
                shared_buf.write(meta.offset, flat)
            else:
                buffer[meta.offset:meta.offset + meta.nbytes] = flat
            written.add(name)

        try:
            fill(write)
            if len(written) != len(metas):
                missing = [m.name for m in metas if m.name not in written]
                raise ValueError(f"{len(missing)} tensor(s) never written, e.g. {missing[:3]}")
        except BaseException:
            if shared_buf is not None:  # a half-written file must not stay in /dev/shm
                shared_buf.unlink()
            raise
        if shared_buf is None:  # private memory may hold an older version: zero the padding (a fresh file reads 0)
            end = 0
            for m in metas:
                buffer[end:m.offset] = 0
                end = m.offset + m.nbytes
        return cls._checksummed(version, metas, buffer, chunk_bytes, shared_buf)

    @classmethod
    def build_shared(cls, version: int, specs: Sequence[tuple[str, str, list[int]]],
                     fill: Callable[[shm.SharedBuffer, list[TensorMeta]], bool],
                     chunk_bytes: int = CHUNK_BYTES) -> "WeightStore | None":
        """A store laid out from `specs` (as `build`) in a /dev/shm file that `fill(file, metas)`
        fills through any processes of this host (``shm.open_writer``), not only this one: the
        learner's ZeRO-3 ranks each write their own partitions (learner/run.py `publish`). `fill`
        returns whether every byte was written; if not (or it raises) the file is unlinked and
        None comes back (raised, for an exception). OSError when tmpfs cannot hold the file."""
        metas, total = lay_out(specs)
        if not shm.available():
            raise OSError(f"{shm.SHM_DIR} is not usable")
        buf = shm.take(total)  # a fresh (or made-ahead, never used) file reads 0: padding is zeroed
        try:
            done = fill(buf, metas)
        except BaseException:
            buf.unlink()
            raise
        if not done:
            buf.unlink()
            return None
        return cls._checksummed(version, metas, buf.array, chunk_bytes, buf)

    @classmethod
    def _checksummed(cls, version: int, metas: list[TensorMeta], buffer: np.ndarray, chunk_bytes: int,
                     shared_buf: "shm.SharedBuffer | None") -> "WeightStore":
        total = buffer.nbytes
        crcs = [crc32(buffer[i:i + chunk_bytes]) for i in range(0, total, chunk_bytes)]
        manifest = Manifest(version, metas, total, chunk_bytes, crcs, combine_chunks(crcs, chunk_bytes, total))
        return cls(manifest, buffer, shared_buf)

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

    def __init__(self, manifest: Manifest, shared: bool = False):
        check_manifest(manifest)
        self.manifest = manifest
        self.buffer, self.shared = allocate(manifest.total_bytes, shared)
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
        if self.shared is not None:  # crc on the frame, then the kernel copies it into the file
            crc = crc32(src)
            if crc != self.manifest.chunk_crcs[i]:
                return False
            self.shared.write(start, src)
        else:
            # the one unavoidable copy, frame → destination, and the crc of the destination: exactly
            # the bytes that will be loaded
            crc = copy_crc(self.buffer[start:end], src)
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
        return WeightStore(m, self.buffer, self.shared)
