"""A scoring process pool that survives its workers: `ScorePool.submit(item) -> Future[ScoreOut]`.

Why not `concurrent.futures.ProcessPoolExecutor`: when one worker dies it marks the whole pool
broken and fails every pending future; and it cannot kill a worker that hangs on one item.

Algorithm. `workers` processes are forked from a forkserver that has preloaded `rewards.core`
and math-verify, so a replacement is ready in milliseconds. Each worker has its own pipe and
scores one item at a time (JSON over the pipe). A manager thread in the parent hands queued
items to idle workers, each with a hard deadline (`core.item_deadline_s`), and waits on the
pipes, the workers' exit sentinels and a wake-up pipe. Then:
- a result arrives → its future resolves; the worker takes the next item;
- a worker exits while holding an item → that item gets reward 0, error "worker crashed (...)",
  and a fresh worker replaces it;
- a deadline passes → the worker is SIGKILLed (its sandboxes die with it: they carry
  PR_SET_PDEATHSIG), the item gets reward 0, error "timeout", and a fresh worker replaces it.
Other items are never affected. Workers are child subreapers, so orphans of sandboxed programs
are reaped by them (`isolation.reap_orphans`) rather than left as zombies; a starting worker
removes run directories that a killed predecessor left (`isolation.clean_stale`).
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from bus.messages import ScoreItem, ScoreOut
from common.config import RewardConfig

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PRELOAD = ["rewards.core", "math_verify", "math_verify.grader"]
JOIN_S = 2.0  # how long close() waits for a worker to leave on its own


def _worker_main(conn: Connection, cfg_json: str) -> None:
    """Pool worker: score items from `conn` until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # Our parent is the forkserver, which exits when the pool's process dies: follow it.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        return
    from common.log import setup_logging

    # stderr, like every or1 process: `or1 score` prints its results on stdout
    setup_logging("score_worker", str(os.getpid()))
    from rewards.core import score_one, warm_up

    cfg = RewardConfig.model_validate_json(cfg_json)
    warm_up()
    try:
        from rewards.isolation import UID_SLOTS, clean_stale

        clean_stale(cfg.code_uid_base, UID_SLOTS)  # what a worker killed mid-run left behind
    except OSError:
        pass
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        item = ScoreItem(**json.loads(data))
        try:
            conn.send_bytes(json.dumps(asdict(score_one(item, cfg))).encode())
        except OSError:
            return  # the pool closed while we scored


@dataclass
class _Task:
    item: ScoreItem
    future: Future


@dataclass
class _Worker:
    proc: Any  # multiprocessing.Process
    conn: Connection
    task: _Task | None = None
    deadline: float = 0.0


@dataclass
class PoolStats:
    items: int = 0
    timeouts: int = 0
    crashes: int = 0
    restarts: int = 0

    def metrics(self) -> dict[str, float]:
        return {"pool/items": self.items, "pool/timeouts": self.timeouts,
                "pool/crashes": self.crashes, "pool/restarts": self.restarts}


class ScorePool:
    """`workers` scoring processes; thread-safe `submit`; `close()` (or a with-block) ends them."""

    def __init__(self, workers: int, cfg: RewardConfig):
        from rewards.core import item_deadline_s

        self._deadline_of = item_deadline_s
        self.cfg = cfg
        self.stats = PoolStats()
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._cfg_json = cfg.model_dump_json()
        self._queue: deque[_Task] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._workers = [self._start_worker() for _ in range(workers)]
        self._thread = threading.Thread(target=self._manage, name="score-pool", daemon=True)
        self._thread.start()

    # --- public ---------------------------------------------------------------------------------

    def submit(self, item: ScoreItem) -> Future:
        """Queue one item; the future resolves to its ScoreOut (never to an exception)."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                fut.set_result(ScoreOut(0.0, error="pool closed"))
                return fut
            self._queue.append(_Task(item, fut))
        self._wake()
        return fut

    def map(self, items: list[ScoreItem]) -> list[ScoreOut]:
        return [f.result() for f in [self.submit(i) for i in items]]

    def worker_pids(self) -> list[int]:
        """Pids of the current worker processes (they change when a worker is replaced)."""
        return [w.proc.pid for w in list(self._workers)]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        self._thread.join()
        for w in self._workers:
            if w.task is not None:  # answered "pool closed" already: don't wait for it
                w.proc.kill()
            w.conn.close()  # EOF: an idle worker leaves its loop
        for w in self._workers:
            w.proc.join(JOIN_S)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> "ScorePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- manager thread -------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already awake

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self._cfg_json), daemon=True,
                                 name="or1-score")
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _manage(self) -> None:
        while True:
            with self._lock:
                closed = self._closed
            if closed:
                break
            self._assign()
            busy = [w for w in self._workers if w.task]
            now = time.monotonic()
            timeout = min((w.deadline - now for w in busy), default=None)
            ready = wait([self._wake_r] + [w.conn for w in busy] + [w.proc.sentinel for w in self._workers],
                         timeout=None if timeout is None else max(0.0, timeout))
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            for i, w in enumerate(self._workers):
                self._workers[i] = self._check(w, ready)
        self._fail_pending("pool closed")

    def _assign(self) -> None:
        for w in self._workers:
            if w.task is None:
                with self._lock:
                    if not self._queue:
                        return
                    task = self._queue.popleft()
                try:
                    w.conn.send_bytes(json.dumps(asdict(task.item)).encode())
                except (OSError, ValueError):
                    pass  # a dead worker: its sentinel reports it next round, with this task failed
                w.task, w.deadline = task, time.monotonic() + self._deadline_of(task.item, self.cfg)

    def _check(self, w: _Worker, ready: list) -> _Worker:
        """Advance one worker: take its result, or replace it after a crash or a timeout."""
        if w.task and w.conn in ready:
            try:
                out = ScoreOut(**json.loads(w.conn.recv_bytes()))
            except (EOFError, OSError, ValueError, TypeError):
                out = None  # dead or garbled: the exit below decides
            if out is not None:
                self._finish(w, out)
                return w
        if w.proc.sentinel in ready or not w.proc.is_alive():
            w.proc.join()
            if w.task:
                self.stats.crashes += 1
                self._finish(w, ScoreOut(0.0, error=f"worker crashed (exit code {w.proc.exitcode})"))
            return self._replace(w)
        if w.task and time.monotonic() >= w.deadline:
            self.stats.timeouts += 1
            self._finish(w, ScoreOut(0.0, error="timeout"))
            return self._replace(w)
        return w

    def _finish(self, w: _Worker, out: ScoreOut) -> None:
        self.stats.items += 1
        w.task.future.set_result(out)
        w.task = None

    def _replace(self, w: _Worker) -> _Worker:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        w.conn.close()
        self.stats.restarts += 1
        return self._start_worker()

    def _fail_pending(self, reason: str) -> None:
        with self._lock:
            tasks = list(self._queue)
            self._queue.clear()
        tasks += [w.task for w in self._workers if w.task]
        for t in tasks:
            if not t.future.done():
                t.future.set_result(ScoreOut(0.0, error=reason))
