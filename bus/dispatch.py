"""Credit-based dispatch of score requests to reward workers, with reassignment on death.

Reward workers announce credits with `Ready(credits)` (how many more items they can take). The
dispatcher queues work units (one per group: its n responses), sends each as one ScoreRequest to
the worker with the most free credits, and remembers what each worker holds. When a worker dies
(the bus server's liveness check) or a request times out, its outstanding requests go back to the
front of the queue for another worker — a killed reward worker loses no item. A result is accepted
once per unit: a late answer from a worker already given up on is ignored (`bus/late_results`).

Pure bookkeeping: `send` is injected (the server's thread-safe send), time is passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

from bus.messages import ScoreItem, ScoreOut, ScoreRequest, ScoreResult


@dataclass
class _Unit:
    key: Hashable
    items: list[ScoreItem]
    attempts: int = 0


@dataclass
class _Outstanding:
    unit: _Unit
    worker_id: str
    sent_at: float


@dataclass
class _Worker:
    credits: int = 0
    outstanding: set[int] = field(default_factory=set)


class ScoreDispatcher:
    def __init__(self, send: Callable[[str, ScoreRequest], bool], on_result: Callable[[Hashable, list[ScoreOut]], None],
                 *, timeout_s: float = 120.0, max_attempts: int = 5):
        self._send = send
        self._on_result = on_result
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self._queue: deque[_Unit] = deque()
        self._workers: dict[str, _Worker] = {}
        self._out: dict[int, _Outstanding] = {}
        self._next_rid = 1
        self.metrics: dict[str, float] = dict.fromkeys(
            ("bus/score_requests", "bus/score_reassigned", "bus/late_results", "bus/score_failed"), 0.0)

    # --- events -------------------------------------------------------------------------------

    def submit(self, key: Hashable, items: list[ScoreItem], now: float) -> None:
        self._queue.append(_Unit(key, items))
        self._pump(now)

    def ready(self, worker_id: str, credits: int, now: float) -> None:
        """A worker's Ready: it can take `credits` more items (not counting what it holds)."""
        self._workers.setdefault(worker_id, _Worker()).credits = max(0, int(credits))
        self._pump(now)

    def result(self, worker_id: str, msg: ScoreResult, now: float) -> bool:
        out = self._out.get(msg.request_id)
        if out is None or out.worker_id != worker_id:
            self.metrics["bus/late_results"] += 1
            return False
        if len(msg.results) != len(out.unit.items):
            # a malformed answer: give the unit to someone else rather than guess
            self._requeue(msg.request_id)
            self._pump(now)
            return False
        del self._out[msg.request_id]
        w = self._workers.get(worker_id)
        if w is not None:
            w.outstanding.discard(msg.request_id)
        self._on_result(out.unit.key, list(msg.results))
        self._pump(now)
        return True

    def worker_dead(self, worker_id: str, now: float) -> int:
        """Requeue everything a dead worker held; returns how many requests."""
        w = self._workers.pop(worker_id, None)
        if w is None:
            return 0
        for rid in sorted(w.outstanding):
            self._requeue(rid)
        self._pump(now)
        return len(w.outstanding)

    def tick(self, now: float) -> None:
        """Requeue requests older than timeout_s (a worker alive but stuck)."""
        for rid in [rid for rid, o in self._out.items() if now - o.sent_at > self.timeout_s]:
            w = self._workers.get(self._out[rid].worker_id)
            if w is not None:
                w.outstanding.discard(rid)
            self._requeue(rid)
        self._pump(now)

    # --- views --------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def outstanding(self) -> int:
        return len(self._out)

    def workers(self) -> dict[str, int]:
        return {wid: w.credits for wid, w in self._workers.items()}

    # --- internals ----------------------------------------------------------------------------

    def _requeue(self, rid: int) -> None:
        out = self._out.pop(rid)
        self.metrics["bus/score_reassigned"] += 1
        if out.unit.attempts >= self.max_attempts:
            # no worker could score it: every item 0 with the error, so the group still ends
            self.metrics["bus/score_failed"] += 1
            self._on_result(out.unit.key, [ScoreOut(0.0, error="unscored: workers died or timed out")] * len(out.unit.items))
            return
        self._queue.appendleft(out.unit)

    def _pump(self, now: float) -> None:
        while self._queue:
            wid = self._pick(len(self._queue[0].items))
            if wid is None:
                return
            unit = self._queue.popleft()
            rid, self._next_rid = self._next_rid, self._next_rid + 1
            w = self._workers[wid]
            if not self._send(wid, ScoreRequest(request_id=rid, items=unit.items)):
                self._workers.pop(wid, None)  # unknown to the server: it is gone
                self._queue.appendleft(unit)
                continue
            unit.attempts += 1
            w.credits = max(0, w.credits - len(unit.items))
            w.outstanding.add(rid)
            self._out[rid] = _Outstanding(unit, wid, now)
            self.metrics["bus/score_requests"] += 1

    def _pick(self, n_items: int) -> str | None:
        """The worker with the most credits; a unit bigger than any credit goes to a worker with
        nothing outstanding (so a group of n > credits still gets scored)."""
        best = max(self._workers.items(), key=lambda kv: (kv[1].credits, -len(kv[1].outstanding)), default=None)
        if best is None:
            return None
        wid, w = best
        if w.credits >= n_items or (w.credits > 0 and not w.outstanding):
            return wid
        return None
