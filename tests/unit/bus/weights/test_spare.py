"""bus.weights.spare: a buffer made ahead of the next version, handed over once, per size."""

from __future__ import annotations

import os
import time

import numpy as np

from bus.weights import spare as spare_mod
from bus.weights.spare import Spare, faulted
from bus.weights.store import WeightStore, allocate, prepare_next


def _wait_ready(s: Spare, nbytes: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while (s.ready is None or s.ready.nbytes != nbytes) and time.monotonic() < deadline:
        time.sleep(0.005)
    return s.ready


def test_take_hands_over_the_spare_of_that_size_once() -> None:
    made: list[int] = []
    s: Spare[np.ndarray] = Spare(lambda n: made.append(n) or np.zeros(n, np.uint8), lambda a: a.nbytes)
    assert s.take(100) is None  # nothing prepared
    s.prepare(100)
    buf = _wait_ready(s, 100)
    assert buf is not None and made == [100]
    assert s.take(50) is None and s.ready is buf  # another size: the spare stays for its own
    assert s.take(100) is buf and s.ready is None and s.take(100) is None
    s.prepare(100)
    s.prepare(100)  # already on its way: made once
    _wait_ready(s, 100)
    assert made == [100, 100]


def test_a_spare_of_another_size_replaces_the_old_one_which_is_discarded() -> None:
    discarded: list[int] = []
    s: Spare[np.ndarray] = Spare(lambda n: np.zeros(n, np.uint8), lambda a: a.nbytes,
                                 lambda a: discarded.append(a.nbytes))
    s.prepare(10)
    _wait_ready(s, 10)
    s.prepare(20)
    assert _wait_ready(s, 20) is not None and discarded == [10]


def test_a_failed_make_leaves_no_spare_and_take_says_none() -> None:
    def refuse(n: int) -> np.ndarray:
        raise OSError("no room")

    s: Spare[np.ndarray] = Spare(refuse, lambda a: a.nbytes)
    s.prepare(10)
    spare_mod.later(lambda: None)
    deadline = time.monotonic() + 5
    while s._preparing and time.monotonic() < deadline:
        time.sleep(0.005)
    assert s.ready is None and s.take(10) is None and not s._preparing


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_faulted_memory_is_resident_before_anything_writes_it() -> None:
    """The point of the spare: the next version's copy into it finds every page there (no fault
    per page on the transfer's path). A fresh buffer of the same size is not resident yet."""
    n = 64 << 20
    r0 = _rss()
    fresh = np.empty(n, np.uint8)
    fresh_resident = _rss() - r0
    r0 = _rss()
    ready = faulted(n)
    ready_resident = _rss() - r0
    assert fresh_resident < n / 8 and ready_resident > 0.95 * n, (fresh_resident, ready_resident)
    del fresh, ready


def test_private_stores_take_the_spare_that_prepare_next_made() -> None:
    arrays = [("w", np.arange(300_000, dtype=np.float32))]
    first = WeightStore.from_arrays(0, arrays)
    assert first.shared is None
    prepare_next(first)  # as a WeightServer does when it publishes a complete store
    spare = _wait_ready(spare_mod.private, first.manifest.total_bytes)
    assert spare is not None
    second = WeightStore.from_arrays(1, arrays)
    assert second.buffer is spare and spare_mod.private.ready is None
    assert second.verify() and second.manifest.checksum == first.manifest.checksum  # padding zeroed too
    other, shared = allocate(1000, shared=False)  # another size: plain memory
    assert shared is None and other.nbytes == 1000 and other is not spare


def test_a_forked_child_starts_without_the_parents_spare() -> None:
    spare_mod.private.prepare(4096)
    _wait_ready(spare_mod.private, 4096)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if spare_mod.private.ready is None and spare_mod._chore_thread is None else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert spare_mod.private.take(4096) is not None  # the parent keeps its own
