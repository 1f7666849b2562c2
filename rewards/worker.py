"""`or1 reward`: the reward worker service — score what the learner sends, in a process pool.

Protocol (DEALER side, `bus.client.Client`):
1. Hello(role="reward", worker_id, capacity=workers); after every Welcome (first connect,
   reconnect, learner restart) send Ready(free), free = workers + queue_items − items held (the
   queued items keep the pool busy across the round trip to the learner between requests).
2. ScoreRequest(request_id, items): every item goes to the pool (`rewards.pool.ScorePool`) at
   once, unless its verdict is already known or being found (`rewards.memo.ScoreMemo`: math
   verdicts are a function of response and reference); when the last one resolves, ScoreResult(request_id, results in item order) goes back,
   followed by Ready(free). Ready is absolute ("I can take `free` more now"), matching
   `learner.dispatch.ScoreDispatcher.ready`; a request bigger than `free` is still accepted and simply
   queues in the pool.
3. Wait(WAIT_DONE) or Bye from the learner, SIGTERM or SIGINT: say Bye, stop the pool, return.
   (The learner gives a departed worker's requests to another.)

Results are sent from the pool's manager thread as items finish (`Client.send` is thread-safe);
the main thread only receives. One item failing never fails the request: the pool turns every
failure into reward 0 with an error.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from bus.messages import (
    ROLE_REWARD,
    WAIT_DONE,
    Bye,
    Error,
    Hello,
    Ready,
    ScoreOut,
    ScoreRequest,
    ScoreResult,
    Wait,
    Welcome,
)
from common.config import BusConfig, RewardConfig
from common.log import get_logger

RECV_POLL_S = 0.2  # how often the receive loop looks at the stop flag
CONNECT_POLL_S = 1.0


@dataclass
class _Pending:
    """One ScoreRequest being scored: results fill in as the pool finishes items."""

    request_id: int
    results: list[ScoreOut | None]
    left: int
    lock: threading.Lock = field(default_factory=threading.Lock)


class RewardService:
    """The service's state: the pool, the client, how many items it holds."""

    def __init__(self, cfg: RewardConfig, bus: BusConfig):
        from bus.client import Client
        from rewards.memo import ScoreMemo
        from rewards.pool import ScorePool

        self.cfg = cfg
        self.worker_id = cfg.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.log = get_logger(component="reward", worker_id=self.worker_id)
        self.stop = threading.Event()
        self._held = 0
        self._held_lock = threading.Lock()
        self.pool = ScorePool(cfg.workers, cfg)
        self.memo = ScoreMemo(cfg.memo_items)
        self.client = Client(cfg.learner, self._hello, heartbeat_s=bus.heartbeat_s, liveness=bus.liveness,
                             stats=self._stats, curve=_curve(bus), max_message_bytes=bus.max_message_bytes,
                             health_file=bus.health_file)
        self.client.on_welcome(self._on_welcome)

    def _hello(self) -> Hello:
        return Hello(role=ROLE_REWARD, worker_id=self.worker_id, host=socket.gethostname(),
                     capacity=self.cfg.workers)

    def _stats(self) -> dict[str, float]:
        stats = {k: float(v) for k, v in self.pool.stats.metrics().items()}
        return {**stats, **self.memo.metrics(), "reward/held": float(self._held)}

    def _free(self) -> int:
        with self._held_lock:
            return max(0, self.cfg.workers + self.cfg.queue_items - self._held)

    def _on_welcome(self, welcome: Welcome) -> None:
        self.log.info("welcome", epoch=welcome.epoch, run_id=welcome.run_id)
        self.client.send(Ready(credits=self._free()))

    def handle(self, req: ScoreRequest) -> None:
        """Start scoring a request; its result is sent when its last item finishes."""
        n = len(req.items)
        if n == 0:
            self.client.send(ScoreResult(request_id=req.request_id, results=[]))
            return
        with self._held_lock:
            self._held += n
        pending = _Pending(req.request_id, [None] * n, n)
        for i, item in enumerate(req.items):
            fut = self.memo.score(item, self.pool.submit)
            fut.add_done_callback(lambda fut, i=i: self._item_done(pending, i, fut))

    def _item_done(self, pending: _Pending, index: int, fut: Future) -> None:
        with pending.lock:
            pending.results[index] = fut.result()
            pending.left -= 1
            last = pending.left == 0
        if not last:
            return
        with self._held_lock:
            self._held -= len(pending.results)
        try:
            self.client.send(ScoreResult(request_id=pending.request_id, results=list(pending.results)))
            self.client.send(Ready(credits=self._free()))
        except RuntimeError as e:  # the client closed during shutdown: the learner reassigns
            self.log.info("result dropped at shutdown", request_id=pending.request_id, reason=str(e))

    def serve(self) -> None:
        """Connect, then receive until told to stop."""
        while not self.stop.is_set():
            try:
                self.client.connect(timeout=CONNECT_POLL_S)
                break
            except TimeoutError:
                continue
        self.log.info("reward worker ready", learner=self.cfg.learner, workers=self.cfg.workers)
        while not self.stop.is_set():
            msg = self.client.recv(timeout=RECV_POLL_S)
            if msg is None:
                continue
            if isinstance(msg, ScoreRequest):
                self.handle(msg)
            elif isinstance(msg, Bye) or (isinstance(msg, Wait) and msg.reason == WAIT_DONE):
                self.log.info("learner says done", message=msg.TYPE)
                break
            elif isinstance(msg, Error):
                self.log.warning("learner error", code=msg.code, message=msg.message)

    def close(self) -> None:
        try:
            self.client.close(bye="shutdown")
        finally:
            self.pool.close()


def _curve(bus: BusConfig):
    """CurveZMQ keys from `bus.curve_dir` (the `reward` key pair, or `bus.client_key`), or None."""
    from bus.auth import client_curve

    return client_curve(bus.curve_dir, ROLE_REWARD, bus.client_key)


def run(cfg: RewardConfig, bus: BusConfig) -> None:
    """The `or1 reward` service; returns on SIGTERM/SIGINT or when the learner says it is done."""
    service = RewardService(cfg, bus)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: service.stop.set())
    try:
        service.serve()
    finally:
        service.close()
        service.log.info("reward worker stopped", **service.pool.stats.metrics())


def main(argv: list[str] | None = None) -> None:
    """`python -m rewards.worker --learner tcp://HOST:5555 --workers N` (what `or1 reward` runs)."""
    from common.config import load_config
    from common.log import setup_logging

    p = argparse.ArgumentParser(prog="python -m rewards.worker", description=__doc__.splitlines()[0])
    p.add_argument("--learner", help="the learner's control endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--workers", type=int, help="scoring processes")
    p.add_argument("--worker-id", help="stable id of this reward worker")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = p.parse_args(argv)
    flags = {"reward.learner": args.learner, "reward.workers": args.workers,
             "reward.worker_id": args.worker_id}
    config = load_config(args.config, args.set, **flags)
    setup_logging("reward", config.reward.worker_id)
    run(config.reward, config.bus)


if __name__ == "__main__":
    main()
