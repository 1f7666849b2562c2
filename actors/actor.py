"""The actor: a rollout worker that any number of can join or leave a run at any time.

    Hello → Welcome (model, version, η)
    loop:
        load newer weights if the background sync has them      (pause = load only)
        LeaseRequest(max_groups, held version) → Lease | Wait
            Wait(weights)   → block until the sync has ≥ min_version, load it
            Wait(admission) → sleep retry_after (the staleness bound admits nothing now)
            Wait(done)      → leave
        never generate with weights older than the lease's min_version
        generate n samples per prompt → Submit(groups tagged with the held version) → SubmitAck
    SIGTERM / SIGINT → Release(held leases) → Bye

Heartbeats run on the bus client's own thread, so a generation of minutes never looks like death.
After a learner restart the client says Hello again and the new epoch's leases simply continue.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

from bus.client import Client, RemoteError
from bus.messages import (
    ROLE_ACTOR, WAIT_DONE, WAIT_WEIGHTS, Group, Hello, Lease, LeaseRequest, Release, Sample, Submit, SubmitAck, Wait,
)
from common.config import Config
from common.log import get_logger, setup_logging

log = get_logger()
REQUEST_TIMEOUT_S = 30.0


RATE_WINDOW_S = 5.0  # actor/tokens_per_s is measured over intervals of at least this (a lease's tokens land at once)


@dataclass
class ActorStats:
    """Counters behind the `actor/*` metrics sent with each heartbeat.

    `actor/tokens_per_s` is the rate of the last interval: tokens generated per wall-clock second
    since the previous measurement, taken at most every RATE_WINDOW_S (a lease's tokens are counted
    when it ends, so a per-heartbeat rate would jump between 0 and bursts). The learner sums it over
    actors as the fleet's throughput. `actor/tokens_per_gen_s` is the cumulative average over time
    spent generating (the engine's own speed, idle time excluded)."""

    tokens: int = 0
    gen_s: float = 0.0
    idle_s: float = 0.0
    groups: int = 0
    leases: int = 0
    load_s: float = 0.0
    pause_s: float = 0.0
    _rate: float = 0.0
    _mark: tuple[float, int] | None = None  # (monotonic time, tokens) at the last rate measurement

    def interval_rate(self, now: float) -> float:
        if self._mark is None:
            self._mark = (now, self.tokens)
        elif now - self._mark[0] >= RATE_WINDOW_S:
            t0, n0 = self._mark
            self._rate = (self.tokens - n0) / (now - t0)
            self._mark = (now, self.tokens)
        return self._rate

    def as_metrics(self, held: int, sync_stats) -> dict[str, float]:
        return {
            "actor/tokens_per_s": self.interval_rate(time.monotonic()),
            "actor/tokens_per_gen_s": self.tokens / self.gen_s if self.gen_s else 0.0,
            "actor/tokens": float(self.tokens),
            "actor/idle_s": self.idle_s,
            "actor/groups": float(self.groups),
            "actor/leases": float(self.leases),
            "weights/retries": float(sync_stats.retries),
            "weights/failures": float(sync_stats.failures),
            "actor/weight_version": float(held),
            "weights/transfer_s": sync_stats.transfer_s,
            "weights/load_s": self.load_s,
            "weights/pause_s": self.pause_s,
            "weights/receiving_version": float(sync_stats.receiving_version),
            "weights/have_version": float(max(held, sync_stats.have_version)),
        }


def default_worker_id(prefix: str) -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}"


def relay_advertise(bound: str, advertise: str) -> str:
    """The relay endpoint sent in Hello: the explicit one, else the address it bound (a wildcard
    host, which the learner replaces by the address it sees us at: bus/address.py)."""
    return advertise if advertise or not bound else bound


def run(cfg: Config, log_format: str = "auto") -> int:
    a = cfg.actor
    worker_id = a.worker_id or default_worker_id("actor")
    setup_logging("actor", worker_id, log_format)
    if cfg.bus.keep_frame_memory:
        from bus.memory import keep_frame_memory

        keep_frame_memory()
    stop = threading.Event()
    generating = {"now": False}

    def on_signal(*_) -> None:
        # Leave at once: a generation may run for minutes, and its leases are worth more back in
        # the queue (another actor takes them now) than finished here after the operator asked us to go.
        stop.set()
        if generating["now"]:
            generating["now"] = False
            raise Shutdown()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    from bus.weights import shm
    from bus.auth import client_curve, server_curve
    from bus.weights.server import WeightServer

    curve = client_curve(cfg.bus.curve_dir, ROLE_ACTOR, cfg.bus.client_key)
    relay = WeightServer(a.relay_bind, max_message_bytes=cfg.bus.max_message_bytes,
                         curve=server_curve(cfg.bus.curve_dir, cfg.bus.allow_readable_keys)) if a.relay_bind else None
    relay_ep = relay_advertise(relay.endpoint if relay else "", a.relay_advertise)
    stats = ActorStats()
    held = {"version": -1}
    sync_box: list = []

    def hello() -> Hello:
        return Hello(role=ROLE_ACTOR, worker_id=worker_id, host=socket.gethostname(), host_id=shm.host_id(),
                     capacity=a.max_groups, weight_version=held["version"], relay_endpoint=relay_ep)

    def heartbeat_stats() -> dict[str, float]:
        return stats.as_metrics(held["version"], sync_box[0].stats) if sync_box else {}

    client = Client(a.learner, hello, heartbeat_s=cfg.bus.heartbeat_s, liveness=cfg.bus.liveness,
                    stats=heartbeat_stats, max_message_bytes=cfg.bus.max_message_bytes, curve=curve,
                    problem=lambda: sync_box[0].problem if sync_box else "", health_file=cfg.bus.health_file)
    log.info("actor.connecting", learner=a.learner)
    welcome = client.connect(timeout=None)
    model = a.model or welcome.model
    log.info("actor.welcome", run_id=welcome.run_id, epoch=welcome.epoch, version=welcome.version, model=model)

    from actors.engine import context_error, make_engine
    from actors.sync import WeightSync
    from actors.weights_io import named_tensors

    why = context_error(a.max_model_len, welcome.max_model_len, a.tensor_parallel_size, a.engine)
    if why:  # a bad setting: say which, and leave before building an engine
        log.error("actor.refused", error=why)
        client.close(bye="shutdown")
        if relay is not None:
            relay.stop()
        return 2
    engine = make_engine(a.engine, model, a, max_model_len=welcome.max_model_len or None)
    log.info("actor.engine", engine=type(engine).__name__, max_model_len=engine.max_model_len,
             run_needs=welcome.max_model_len)
    sync = WeightSync(client, cfg.bus, relay, curve=curve)
    sync_box.append(sync)
    sync.start()

    epoch = {"now": (welcome.run_id, welcome.epoch)}

    def on_welcome(w) -> None:
        # A learner restarted from a checkpoint (a new epoch), or started afresh without one (a new
        # run id, epoch 0 again), may retrain versions we hold with other weights: whatever we hold
        # came from a history it no longer has, so pull its current version.
        if (w.run_id, w.epoch) != epoch["now"]:
            log.warning("actor.new_epoch", held=held["version"], learner=w.version, epoch=w.epoch, run_id=w.run_id)
            epoch["now"] = (w.run_id, w.epoch)
            held["version"] = -1
            sync.reset()
        if w.max_model_len > engine.max_model_len:  # a restarted learner with longer stages or prompts
            log.warning("actor.context_short", max_model_len=engine.max_model_len, run_needs=w.max_model_len,
                        fix="restart this actor (it sizes its engine at start)")

    client.on_welcome(on_welcome)

    def load(store) -> None:
        t0 = time.perf_counter()
        m = engine.load_weights(named_tensors(store), store.manifest.version)
        held["version"] = sync.held_version = store.manifest.version
        stats.load_s = m.get("weights/load_s", time.perf_counter() - t0)
        stats.pause_s = time.perf_counter() - t0
        log.info("weights.loaded", version=held["version"], load_s=round(stats.load_s, 3))

    held_leases: set[int] = set()
    interrupted = False
    try:
        while not stop.is_set():
            store = sync.ready()
            if store is not None:
                load(store)
            reply = _lease(client, a.max_groups, held["version"], stop)
            if reply is None:
                continue
            if isinstance(reply, Wait):
                if reply.reason == WAIT_DONE:
                    log.info("actor.done")
                    break
                t0 = time.perf_counter()
                if reply.reason == WAIT_WEIGHTS:
                    sync.want(reply.min_version)
                    store = sync.wait_for(reply.min_version, timeout=max(reply.retry_after_s, 5.0))
                    if store is not None:
                        load(store)
                else:
                    stop.wait(reply.retry_after_s)
                stats.idle_s += time.perf_counter() - t0
                continue
            lease: Lease = reply
            held_leases.add(lease.lease_id)
            if held["version"] < lease.min_version:  # the learner checks too; never generate with older weights
                sync.want(lease.min_version)
                store = sync.wait_for(lease.min_version, timeout=lease.deadline_s)
                if store is None:
                    client.send(Release(lease_ids=[lease.lease_id]))
                    held_leases.discard(lease.lease_id)
                    continue
                load(store)
            log.info("actor.generating", lease_id=lease.lease_id, groups=len(lease.prompts), version=held["version"])
            generating["now"] = True
            groups = _generate(engine, lease, held["version"], stats)
            generating["now"] = False
            _submit(client, lease, groups)
            held_leases.discard(lease.lease_id)
    except Shutdown:
        interrupted = True
        log.info("actor.interrupted", leases=sorted(held_leases))
    finally:
        generating["now"] = False
        if held_leases:
            client.send(Release(lease_ids=sorted(held_leases)))
            log.info("actor.released", leases=sorted(held_leases))
        sync.stop()
        client.close(bye="shutdown")
        if relay is not None:
            relay.stop()
        if not interrupted:
            engine.close()  # an interrupted engine may be mid-step: the process exit frees it
    return 0


class Shutdown(Exception):
    """Raised by the signal handler inside a generation to leave it at once."""


def _lease(client: Client, max_groups: int, version: int, stop: threading.Event) -> Lease | Wait | None:
    try:
        reply = client.request(LeaseRequest(max_groups=max_groups, weight_version=version), timeout=REQUEST_TIMEOUT_S)
    except (TimeoutError, RemoteError) as e:
        log.warning("actor.lease_failed", error=str(e))
        stop.wait(1.0)
        return None
    return reply if isinstance(reply, (Lease, Wait)) else None


def _generate(engine, lease: Lease, version: int, stats: ActorStats) -> list[Group]:
    t0 = time.perf_counter()
    outs = engine.generate([p.token_ids for p in lease.prompts], lease.sampling)
    dt = time.perf_counter() - t0
    groups = []
    for prompt, samples in zip(lease.prompts, outs):
        groups.append(Group(prompt_id=prompt.prompt_id, weight_version=version, samples=[
            Sample(token_ids=s.token_ids, logprobs=s.logprobs, finish_reason=s.finish_reason, text=s.text)
            for s in samples]))
        stats.tokens += sum(len(s.token_ids) for s in samples)
    stats.gen_s += dt
    stats.groups += len(groups)
    stats.leases += 1
    log.info("actor.generated", lease_id=lease.lease_id, groups=len(groups), gen_s=round(dt, 3),
             tokens=sum(len(s.token_ids) for g in groups for s in g.samples))
    return groups


def _submit(client: Client, lease: Lease, groups: list[Group]) -> None:
    msg = Submit(lease_id=lease.lease_id, epoch=lease.epoch, groups=groups)
    for attempt in range(3):
        try:
            ack = client.request(msg, timeout=REQUEST_TIMEOUT_S)
        except TimeoutError:
            continue
        except RemoteError as e:  # e.g. a restarted learner refuses an old epoch's lease: drop it
            log.warning("actor.submit_refused", lease_id=lease.lease_id, error=str(e))
            return
        if isinstance(ack, SubmitAck) and ack.rejected:
            log.warning("actor.submit_partly_rejected", lease_id=lease.lease_id, rejected=ack.rejected, reason=ack.reason)
        return
    log.warning("actor.submit_lost", lease_id=lease.lease_id)
