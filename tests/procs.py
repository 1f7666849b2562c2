"""Process helpers for integration and e2e tests: start real `or1` commands, stop them, wait."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


_given: set[int] = set()


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (what bind(0) and outgoing connections use)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range. A port that bind(0) hands out lies in
    that range, and between this call and the bind of the process it is meant for, any bind(0) or
    outgoing connection (gloo, a zmq DEALER, a vLLM actor) may be given it: seen in CI as the
    learner's EADDRINUSE. Below the range, only an explicit bind can take it."""
    lo = ephemeral_low()
    low = 10000 if lo > 12000 else 1024
    for _ in range(200):
        port = random.randrange(low, lo)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in [{low}, {lo})")


def or1(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `or1 ARGS` as a real process (its own session, so the test can kill the whole group)."""
    cmd = [sys.executable, "-m", "deploy.cli", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def wait_for(pred, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
