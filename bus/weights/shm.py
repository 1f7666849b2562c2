"""Weight buffers in shared memory: processes on one host hold one copy of a version and map it.

A weight source (the learner, a relay actor) may keep a version's flat buffer in a file under
``/dev/shm`` (tmpfs). A puller on the same host then asks for it (``GetShared`` → ``Shared``, see
``bus.weights.server``) and maps the file read-only instead of receiving every chunk over TCP: a
version reaches N actors of one node at the cost of one transfer, and the node's memory holds one
copy of it instead of N.

- ``SharedBuffer.create(nbytes)`` makes the file (refused with OSError when tmpfs has not that much
  free: Docker's default ``/dev/shm`` is 64 MB; the caller then uses private memory) and maps it
  read-only; the owner fills it with ``write`` (pwrite(2)), never through the mapping, so a tmpfs
  that fills up meanwhile fails that write with ENOSPC instead of killing the process with SIGBUS.
- ``take(nbytes)`` / ``prepare(nbytes)``: a process that serves versions (learner, relay) makes the
  next version's buffer (pages allocated) on a low-priority thread once it publishes one, so the
  transfer of the next version only copies.
- ``open_writer(path, file_id)``: another process of the same job writes into a file the owner
  made (the learner's ranks fill rank 0's version together, each its own ZeRO-3 partitions),
  through pwrite(2) like the owner, after checking the file is that one.
- ``attach(path, nbytes)`` maps a file another process made, read-only. It fails (OSError) when the
  file is gone (its owner dropped the version) or has another size; the puller then falls back to
  chunks over TCP.
- The owner unlinks the file when its source drops the version, when the buffer is garbage
  collected, or at exit; processes that mapped it keep their pages until they drop them (POSIX).
  File names carry the owner's pid and pid namespace, so ``sweep()`` can remove the files of owners
  killed without cleaning up (SIGKILL, OOM), and never those of another namespace's live processes.
- ``host_id()`` names this host's shared memory by what two distinct hosts cannot share: the
  kernel's boot id (random per boot), the network namespace and the ``/dev/shm`` mount (its device
  number). Hostnames are not used: namespaces, containers and cloned images share them. Two
  network namespaces of one machine count as two hosts (the multi-host tests rely on it), and two
  containers with their own ``/dev/shm`` as two hosts. As a last guard the source names the file's
  identity (``SharedBuffer.file_id``: device and inode) and ``attach`` maps it only if the file it opens is that
  one, so a lookalike path in another ``/dev/shm`` is never mapped: the puller pulls chunks instead.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import socket
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from bus.weights.spare import Spare

SHM_DIR = Path("/dev/shm")
_PREFIX = "or1-w-"
_NAME = re.compile(rf"^{_PREFIX}(\d+)-(\d+)-[0-9a-f]+$")  # namespace, pid, random


@lru_cache(maxsize=1)
def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@lru_cache(maxsize=1)
def host_id() -> str:
    """Names this host's shared memory: boot id / network namespace / device of /dev/shm (Linux);
    the hostname leads only to make it readable in logs."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "noboot"
    try:
        net = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        net = 0
    try:
        dev = os.stat(SHM_DIR).st_dev
    except OSError:
        dev = 0
    return f"{socket.gethostname()}/{boot}/net{net}/shm{dev}"


def available(shm_dir: Path = SHM_DIR) -> bool:
    return shm_dir.is_dir() and os.access(shm_dir, os.W_OK)


class SharedBuffer:
    """A file in shared memory and a read-only uint8 numpy view of it. The owner (its creator)
    fills it with `write` and unlinks it (`unlink()`, garbage collection or exit); attached
    buffers only unmap."""

    def __init__(self, path: Path, array: np.ndarray, fd: int | None, file_id: str = ""):
        self.path = path
        self.array = array
        self.file_id = file_id  # device:inode, fixed at create/attach (the path may be unlinked later)
        self._fd = fd
        # the finalizer holds only path, fd and pid: the array (and its mapping) may outlive this
        # object, and a forked child that exits must not unlink its parent's files
        self._finalizer = weakref.finalize(self, _release, path, fd, os.getpid()) if fd is not None else None

    @property
    def owner(self) -> bool:
        return self._fd is not None

    @classmethod
    def create(cls, nbytes: int, shm_dir: Path = SHM_DIR, reserve: bool = False) -> "SharedBuffer":
        """A new zero-filled buffer of `nbytes`; OSError when tmpfs has not that much free. With
        `reserve`, its pages are allocated now (posix_fallocate), so `write` later only copies."""
        st = os.statvfs(shm_dir)
        if st.f_bavail * st.f_frsize < nbytes:
            raise OSError(errno.ENOSPC, f"{shm_dir} has {st.f_bavail * st.f_frsize} bytes free, {nbytes} needed")
        path = shm_dir / f"{_PREFIX}{_pid_namespace()}-{os.getpid()}-{secrets.token_hex(6)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)  # holes read as zeros; pages are allocated as `write` fills them
            if reserve and nbytes:
                os.posix_fallocate(fd, 0, nbytes)
            array = _map(fd, nbytes)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(path, array, fd, f"{st.st_dev}:{st.st_ino}")

    def write(self, offset: int, data: Any) -> None:
        """Copy `data` (any buffer) into the file at `offset`. Through write(2), not the mapping:
        tmpfs running out of pages fails here with OSError(ENOSPC) instead of killing the process
        with SIGBUS, and the kernel copies into its pages without a page fault per 4 KB."""
        assert self._fd is not None, "only the owner writes"
        _pwrite(self._fd, offset, data)

    def unlink(self) -> None:
        """Remove the file now (owners only): no new attach; existing mappings stay valid."""
        if self._finalizer is not None:
            self._finalizer()


_swept = False


def _make_spare(nbytes: int) -> SharedBuffer:
    return SharedBuffer.create(nbytes, reserve=True)


# Allocating tmpfs pages costs about as much as copying into them (4 KB pages: tmpfs gets no huge
# pages here), and a model's next version has the same size: a source makes it ahead (`prepare`).
spare: Spare[SharedBuffer] = Spare(_make_spare, lambda b: b.array.nbytes, lambda b: b.unlink())


def take(nbytes: int) -> SharedBuffer:
    """A new buffer of `nbytes`: the spare made in advance by `prepare` if it has that size. The
    first call of a process also sweeps the files of dead owners."""
    global _swept
    if not _swept:
        _swept = True
        sweep()
    return spare.take(nbytes) or SharedBuffer.create(nbytes)


def prepare(nbytes: int) -> None:
    """Make a spare buffer of `nbytes` for `take`, in the background (``bus.weights.spare``). Costs
    one version of /dev/shm per process that serves versions."""
    spare.prepare(nbytes)


def _pwrite(fd: int, offset: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _open_ours(path: str, flags: int, expect_id: str) -> tuple[int, os.stat_result]:
    """Open an or1 buffer file; OSError if the path is not one, or not the file `expect_id` names."""
    p = Path(path)
    if p.parent != SHM_DIR or not _NAME.match(p.name):
        raise OSError(f"{path} is not an or1 shared-memory buffer")
    fd = os.open(p, flags)
    st = os.fstat(fd)
    if expect_id and f"{st.st_dev}:{st.st_ino}" != expect_id:
        os.close(fd)
        raise OSError(f"{path} is another file than the source's ({expect_id}): another /dev/shm")
    return fd, st


@contextlib.contextmanager
def open_writer(path: str, expect_id: str) -> Iterator[Callable[[int, Any], None]]:
    """`write(offset, data)` into the buffer file `path` another process of this job owns (it
    stays the owner: it checksums, serves and unlinks the file). OSError if the file is gone or is
    not `expect_id` (``SharedBuffer.file_id``): a process on another host, or in another
    ``/dev/shm``, cannot write into it, and says so instead of writing elsewhere."""
    fd, st = _open_ours(path, os.O_WRONLY, expect_id)
    try:
        def write(offset: int, data: Any) -> None:
            if offset < 0 or offset + memoryview(data).nbytes > st.st_size:
                raise ValueError(f"{memoryview(data).nbytes} bytes at {offset} overrun {path} ({st.st_size})")
            _pwrite(fd, offset, data)

        yield write
    finally:
        os.close(fd)


def _map(fd: int, nbytes: int) -> np.ndarray:
    if not nbytes:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ), dtype=np.uint8)  # read-only


def attach(path: str, nbytes: int, expect_id: str = "") -> SharedBuffer:
    """Map another process's buffer read-only; OSError if it is gone, not `nbytes` long, or not
    the file `expect_id` (``SharedBuffer.file_id``) names: the same path in another /dev/shm."""
    fd, st = _open_ours(path, os.O_RDONLY, expect_id)
    p = Path(path)
    try:
        size, fid = st.st_size, f"{st.st_dev}:{st.st_ino}"
        if size != nbytes:
            raise OSError(f"{path} holds {size} bytes, expected {nbytes}")
        array = _map(fd, nbytes)
    finally:
        os.close(fd)
    return SharedBuffer(p, array, None, fid)


def sweep(shm_dir: Path = SHM_DIR) -> int:
    """Unlink buffers whose owner process is gone; returns how many."""
    removed = 0
    try:
        entries = list(shm_dir.iterdir())
    except OSError:
        return 0
    for entry in entries:
        m = _NAME.match(entry.name)
        if m and int(m.group(1)) == _pid_namespace() and not _alive(int(m.group(2))):
            removed += _unlink(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _release(path: Path, fd: int, owner_pid: int) -> None:
    os.close(fd)
    if os.getpid() == owner_pid:
        _unlink(path)


def _after_fork_in_child() -> None:
    """The spare belongs to the parent: a child that unlinked it would take the parent's file away."""
    spare.forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _unlink(path: Path) -> int:
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0
