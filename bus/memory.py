"""glibc's allocator and the bus's large frames: stop returning receive buffers to the kernel.

libzmq's I/O thread mallocs a buffer for every frame it receives (a 4 MB weight chunk, a 1–16 MB
Submit) and the consumer frees it moments later. glibc's defaults serve that badly: a block above
``M_MMAP_THRESHOLD`` (128 KB at start, raised only to the size of the largest freed mmapped block)
is mapped and unmapped per frame, and an arena whose free top exceeds ``M_TRIM_THRESHOLD`` (twice
that) is trimmed, so the next frame faults its pages in again. Pulling 256 MB in 4 MB chunks took
4,000–16,000 minor page faults (~10–30 ms of kernel time) on top of the 128 huge-page faults of the
destination buffer, depending on how the chunks' lifetimes happened to interleave.

``keep_frame_memory`` fixes both thresholds at the ceilings glibc's own adaptation stops at
(``DEFAULT_MMAP_THRESHOLD_MAX`` = 32 MB on 64-bit, trim = 2× that): blocks up to 32 MB come from
the arenas and up to 64 MB of free arena top is kept for the next frames. A pull then takes ~130
faults (the destination's huge pages). The price is that a process keeps up to that much freed
memory per arena instead of giving it back, which a learner or an actor — processes that hold
whole models — does not notice.

It is a per-process setting: each role calls it once at start (``bus.keep_frame_memory`` in the
config turns it off). It is a no-op off glibc, and when the user has set the allocator up through
``GLIBC_TUNABLES`` / ``MALLOC_*_`` themselves.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20

_done = False


def user_tuned() -> bool:
    """The user set glibc's malloc thresholds (environment), which we then leave alone."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"))


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr at all
        return False


def keep_frame_memory() -> bool:
    """Fix glibc's mmap / trim thresholds for this process (once); True if they are now set."""
    global _done
    if _done:
        return True
    if not _glibc() or user_tuned():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
