"""Credit-based dispatch of score requests to reward workers, with reassignment on death — and
results checked at the door.

Reward workers announce credits with `Ready(credits)` (how many more items they can take). The
dispatcher queues work units (one per group: its n responses), sends each as one ScoreRequest to
the worker with the most free credits, and remembers what each worker holds. When a worker dies
(the bus server's liveness check) or a request times out, its outstanding requests go back to the
front of the queue for another worker — a killed reward worker loses no item. A result is accepted
once per unit, and only from the worker that holds the request: anything else is late or foreign
(`bus/late_results`) and ignored.

A result is checked before anything is removed (`check_results`): one ScoreOut per item, every
reward finite and within REWARD_RANGE. A bad one is not believed: the unit goes to another worker
(`bus/bad_scores`), and a worker that sent `max_bad` bad results is dropped — it is sent no more
work and its held requests are reassigned (`bus/dropped_workers`, and `on_drop` so the learner can
log it). A unit no worker scored within `max_attempts` ends through `on_failed`: the learner
requeues its prompt rather than train on made-up rewards.

Pure bookkeeping: `send` is injected (the server's thread-safe send), time is passed in.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

from bus.messages import REWARD_RANGE, ScoreItem, ScoreOut, ScoreRequest, ScoreResult


def check_results(results: list[ScoreOut], n_items: int) -> str:
    """Why a score result cannot be believed ("" = it can): the wrong count, or a reward that is
    not a finite number within REWARD_RANGE."""
    if len(results) != n_items:
        return f"{len(results)} results for {n_items} items"
    lo, hi = REWARD_RANGE
    for i, r in enumerate(results):
        if not isinstance(r.reward, (int, float)) or not math.isfinite(r.reward) or not lo <= r.reward <= hi:
            return f"item {i}: reward {r.reward!r} outside [{lo}, {hi}]"
    return ""


@dataclass
class _Unit:
    key: Hashable
    items: list[ScoreItem]
    attempts: int = 0
    refused_by: set[str] = field(default_factory=set)  # workers whose result for it was bad


@dataclass
class _Outstanding:
    unit: _Unit
    worker_id: str
    sent_at: float


@dataclass
class _Worker:
    credits: int = 0
    outstanding: set[int] = field(default_factory=set)
    bad: int = 0


class ScoreDispatcher:
    def __init__(self, send: Callable[[str, ScoreRequest], bool], on_result: Callable[[Hashable, list[ScoreOut]], None],
                 *, on_failed: Callable[[Hashable, str], None], on_drop: Callable[[str, str], None] = lambda w, why: None,
                 timeout_s: float = 120.0, max_attempts: int = 5, max_bad: int = 3):
        self._send = send
        self._on_result = on_result
        self._on_failed = on_failed
        self._on_drop = on_drop
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.max_bad = max_bad
        self._queue: deque[_Unit] = deque()
        self._workers: dict[str, _Worker] = {}
        self._dropped: set[str] = set()
        self._out: dict[int, _Outstanding] = {}
        self._next_rid = 1
        # counters since the start; bus/score_s sums the send-to-accepted-result time of the
        # bus/score_results accepted (mean scoring latency = their ratio between two reads)
        self.metrics: dict[str, float] = dict.fromkeys(
            ("bus/score_requests", "bus/score_reassigned", "bus/late_results", "bus/score_failed", "bus/bad_scores",
             "bus/dropped_workers", "bus/score_results", "bus/score_s"), 0.0)

    # --- events -------------------------------------------------------------------------------

    def submit(self, key: Hashable, items: list[ScoreItem], now: float) -> None:
        self._queue.append(_Unit(key, items))
        self._pump(now)

    def ready(self, worker_id: str, credits: int, now: float) -> None:
        """A worker's Ready: it can take `credits` more items (not counting what it holds)."""
        if worker_id in self._dropped:
            return
        self._workers.setdefault(worker_id, _Worker()).credits = max(0, int(credits))
        self._pump(now)

    def result(self, worker_id: str, msg: ScoreResult, now: float) -> bool:
        """Accept a worker's result for its own outstanding request if `check_results` passes;
        otherwise reassign the unit (and count the worker's bad answers). True if accepted."""
        out = self._out.get(msg.request_id)
        if out is None or out.worker_id != worker_id:
            self.metrics["bus/late_results"] += 1
            return False
        why = check_results(msg.results, len(out.unit.items))
        if why:
            self._bad(worker_id, msg.request_id, why)
            self._pump(now)
            return False
        del self._out[msg.request_id]
        self.metrics["bus/score_results"] += 1
        self.metrics["bus/score_s"] += max(0.0, now - out.sent_at)
        w = self._workers.get(worker_id)
        if w is not None:
            w.outstanding.discard(msg.request_id)
        self._on_result(out.unit.key, list(msg.results))
        self._pump(now)
        return True

    def worker_dead(self, worker_id: str, now: float) -> int:
        """Requeue everything a dead worker held; returns how many requests."""
        n = self._forget(worker_id)
        self._pump(now)
        return n

    def tick(self, now: float) -> None:
        """Requeue requests older than timeout_s (a worker alive but stuck, or one that takes work and
        never answers): the unit then prefers another worker, as after a bad result."""
        for rid in [rid for rid, o in self._out.items() if now - o.sent_at > self.timeout_s]:
            out = self._out[rid]
            out.unit.refused_by.add(out.worker_id)
            w = self._workers.get(out.worker_id)
            if w is not None:
                w.outstanding.discard(rid)
            self._requeue(rid, f"no answer from {out.worker_id} within {self.timeout_s:.0f} s")
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

    def _bad(self, worker_id: str, rid: int, why: str) -> None:
        """A result that cannot be believed: reassign the unit elsewhere; drop a repeat offender."""
        self.metrics["bus/bad_scores"] += 1
        w = self._workers.get(worker_id)
        self._out[rid].unit.refused_by.add(worker_id)
        if w is not None:
            w.outstanding.discard(rid)
            w.bad += 1
        self._requeue(rid, why)
        if w is not None and w.bad >= self.max_bad:
            self._dropped.add(worker_id)
            self._forget(worker_id)
            self.metrics["bus/dropped_workers"] += 1
            self._on_drop(worker_id, f"{w.bad} bad score results, last: {why}")

    def _forget(self, worker_id: str) -> int:
        """Stop using a worker; its outstanding requests go back to the queue. Returns how many."""
        w = self._workers.pop(worker_id, None)
        if w is None:
            return 0
        for rid in sorted(w.outstanding):
            self._requeue(rid, f"worker {worker_id} gone")
        return len(w.outstanding)

    def _requeue(self, rid: int, why: str = "") -> None:
        out = self._out.pop(rid)
        self.metrics["bus/score_reassigned"] += 1
        if out.unit.attempts >= self.max_attempts:
            # no worker scored it: the learner requeues the prompt (never made-up rewards)
            self.metrics["bus/score_failed"] += 1
            self._on_failed(out.unit.key, f"unscored after {out.unit.attempts} attempts: {why}"[:200])
            return
        self._queue.appendleft(out.unit)

    def _pump(self, now: float) -> None:
        while self._queue:
            wid = self._pick(self._queue[0])
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

    def _pick(self, unit: _Unit) -> str | None:
        """The worker with the most credits, preferring one that has not sent a bad result for
        this unit; a unit bigger than any credit goes to a worker with nothing outstanding (so a
        group of n > credits still gets scored)."""
        n_items = len(unit.items)
        best = max(self._workers.items(), default=None,
                   key=lambda kv: (kv[0] not in unit.refused_by, kv[1].credits, -len(kv[1].outstanding)))
        if best is None:
            return None
        wid, w = best
        if w.credits >= n_items or (w.credits > 0 and not w.outstanding):
            return wid
        return None
