"""Buffers made ahead of need, and the housekeeping thread that makes them.

A process that receives or publishes weight versions needs one buffer of the same size per version,
all run long. Getting fresh memory is not free: the kernel faults every page in on first touch, and
on a virtual machine whose guest pages are not yet backed by the host this costs far more than the
copy itself (bench_scale, 0.5B shape: 8.6–12.6 s to store 1 GB into fresh private memory against
0.2–0.3 s into memory touched before). So once a process has used a buffer of some size, it makes
the next one of that size on a low-priority thread while it trains or generates, and ``take`` hands
it over when the next version arrives.

- ``Spare(make, size_of, discard)``: one spare per kind (``bus.weights.shm`` keeps one for its
  /dev/shm files, this module one for private memory, ``private``).
- ``later(fn, *args)``: the process's housekeeping thread (nice 19), for spares and for freeing
  dropped versions.

Cost: one version's worth of memory per kind a process uses, held between versions.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Generic, TypeVar

import numpy as np

T = TypeVar("T")

PAGE = 4096


class Spare(Generic[T]):
    """At most one buffer of one size, made in the background (`prepare`) and handed over once
    (`take`). `make(nbytes)` builds one (it may raise OSError: then there is no spare and `take`'s
    caller makes its own), `size_of(buf)` reads its size, `discard(buf)` releases one replaced by a
    spare of another size."""

    def __init__(self, make: Callable[[int], T], size_of: Callable[[T], int],
                 discard: Callable[[T], None] = lambda buf: None):
        self._make, self._size_of, self._discard = make, size_of, discard
        self._lock = threading.Lock()
        self._buf: T | None = None
        self._preparing = False

    def forget(self) -> None:
        """Drop the spare without releasing it (a forked child: the buffer is its parent's)."""
        self._buf, self._preparing, self._lock = None, False, threading.Lock()

    @property
    def ready(self) -> T | None:
        """The spare now held, if any (tests)."""
        return self._buf

    def take(self, nbytes: int) -> T | None:
        """The spare if it has `nbytes`, else None (and the spare stays for its own size)."""
        with self._lock:
            if self._buf is not None and self._size_of(self._buf) == nbytes:
                buf, self._buf = self._buf, None
                return buf
        return None

    def prepare(self, nbytes: int) -> None:
        """Make a spare of `nbytes` on the housekeeping thread, unless one is held or on its way."""
        with self._lock:
            if self._preparing or (self._buf is not None and self._size_of(self._buf) == nbytes):
                return
            self._preparing = True
        later(self._fill, nbytes)

    def _fill(self, nbytes: int) -> None:
        try:
            buf: T | None = self._make(nbytes)
        except OSError:  # no room: `take` finds nothing and its caller allocates on its own
            buf = None
        with self._lock:
            old = self._buf if buf is not None else None
            self._buf, self._preparing = buf if buf is not None else self._buf, False
        if old is not None:
            self._discard(old)


def faulted(nbytes: int) -> np.ndarray:
    """Private memory of `nbytes` with every page already faulted in (one write per page)."""
    array = np.empty(nbytes, dtype=np.uint8)
    array[::PAGE] = 0
    return array


private: Spare[np.ndarray] = Spare(faulted, lambda a: a.nbytes)


_chores: "queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]]" = queue.SimpleQueue()
_chore_thread: threading.Thread | None = None
_chore_lock = threading.Lock()


def later(fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` on this process's housekeeping thread, at the lowest CPU priority. For work
    such as making a spare buffer or unlinking a dropped version (tmpfs frees 256 MB of 4 KB pages
    in about 45 ms of CPU here): it must not compete with the transfer of the next version, so it
    runs when the CPU would otherwise idle."""
    global _chore_thread
    with _chore_lock:
        if _chore_thread is None:
            _chore_thread = threading.Thread(target=_do_chores, name="or1-chores", daemon=True)
            _chore_thread.start()
    _chores.put((fn, args))


def _do_chores() -> None:
    try:  # Linux: a thread id names the thread alone
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError):
        pass
    while True:
        fn, args = _chores.get()
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 — housekeeping must never take the process down
            pass


def _forget_thread_in_child() -> None:
    """A forked child has no housekeeping thread (threads do not survive fork) nor its parent's
    spares: it starts both anew if it needs them."""
    global _chore_thread, _chores
    _chore_thread, _chores = None, queue.SimpleQueue()
    private.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_thread_in_child)
