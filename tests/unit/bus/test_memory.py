"""bus.memory: glibc keeps large freed frame buffers mapped once the thresholds are fixed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bus import memory

ROOT = Path(__file__).resolve().parents[3]

# Frames of 4 MB, 8 in flight, freed after use: the pattern of a weight pull's receive buffers.
CHURN = """
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tuned":
    from bus.memory import keep_frame_memory
    assert keep_frame_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
size, before = 4 << 20, faults()
for _ in range(30):
    blocks = [libc.malloc(size) for _ in range(8)]
    for b in blocks:
        ctypes.memset(b, 1, size)  # what the I/O thread's recv does: touch every page
    for b in blocks:
        libc.free(b)
print(faults() - before)
"""


def churn_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", CHURN, mode], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@pytest.mark.skipif(not memory._glibc(), reason="glibc's allocator only")
def test_fixed_thresholds_stop_refaulting_frame_buffers():
    default, tuned = churn_faults("default"), churn_faults("tuned")
    one_pass = 8 * (4 << 20) // 4096  # every page of 8 blocks touched once
    # default glibc: mmap threshold rises to 4 MB, trim to 8 MB, so each round's 32 MB is trimmed
    # and faulted in again; fixed thresholds fault the pages in the first round only
    assert default > 10 * one_pass, default
    assert tuned < 2 * one_pass, tuned


def test_user_settings_win(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")
    assert memory.user_tuned()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.user_tuned()
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert not memory.user_tuned()
