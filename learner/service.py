"""The learner's bus handlers: leases, submissions, scoring, weights sources, status and settings.

Handlers run on the control server's thread; the training loop runs on the main thread. Both
touch the scheduler only under `self.lock`; the loop waits on `self.ready` for a batch.

    actor   Hello → Welcome;  LeaseRequest → Lease | Wait (held while the bound admits nothing);
            Submit → SubmitAck;  Release
            WeightSource → where to pull (learner or a relay peer, ≤ relay_fanout children each)
    reward  Hello → Welcome;  Ready(credits);  ScoreRequest ← ;  ScoreResult
    admin   Status → StatusReply;  Set(max_staleness) → SetReply
    death   (liveness) → the actor's leases are requeued, the reward worker's requests reassigned

Submitted groups are scored as one ScoreRequest per group (its n responses) and enter the
scheduler's buffer with their rewards; every scheduler event goes to the ledger.

A lease request the staleness bound turns away (Wait(admission)) is not answered at once: it is
parked (a long poll, one per actor) and granted again whenever something may have opened a slot —
a step ended, a handler changed the scheduler (a group filtered or requeued, a lease released,
η raised), a batch dropped stale groups — and answered with the first reply that is not
Wait(admission), or with Wait(admission, retry 0) once `learner.admission_retry_s` has passed (the
actor asks again at once, and meanwhile looks at its stop flag). So an idle actor starts on the
next batch the moment the step that frees it ends, instead of after its next poll
(docs/staleness.md#a-request-turned-away-is-held-a-long-poll).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from bus.weights import shm
from bus.address import fill_peer_host
from bus.auth import key_role
from learner.dispatch import ScoreDispatcher
from bus.messages import (
    ERR_BAD_VALUE, ERR_FORBIDDEN, ERR_NOT_FOUND, FINISH_LENGTH, ROLE_ACTOR, ROLE_ADMIN, ROLE_REWARD, WAIT_ADMISSION,
    WAIT_DONE, Error,
    Heartbeat, LeaseRequest, Message, PeerInfo, Ready, Release, ScoreItem, ScoreOut, ScoreResult, Set, SetReply, Status,
    StatusReply, Submit, SubmitAck, Wait, WeightSource, Welcome,
)
from bus.server import Peer, ReplyTo, Server
from common.config import Config
from common.log import get_logger
from learner.reward_stats import RewardBreakdown
from learner.scheduler import Accepted, Batch, Scheduler
from learner.sources import RelayView, WeightSources

log = get_logger()
HOLD_MAX_S = 10.0  # a held lease request is answered within this whatever admission_retry_s (up to 60):
                   # well inside an actor's request timeout (actors/actor.py REQUEST_TIMEOUT_S, 30 s)


class Ledger:
    """Append-only jsonl of every scheduler event (lease, accept, reject, end, step, …): the proof
    that each lease ended as trained, filtered, released or requeued and nothing trained twice."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1)

    def write(self, event: dict[str, Any]) -> None:
        self._f.write(json.dumps(event, default=float) + "\n")

    def close(self) -> None:
        self._f.close()


@dataclass
class Parked:
    """An actor's lease request held until a slot may be free (or `until`, monotonic seconds)."""
    request: LeaseRequest
    reply_to: ReplyTo
    until: float


def relay_endpoint(peer: Peer) -> str:
    """The endpoint other actors dial for this peer's relay ("" = it does not relay)."""
    return fill_peer_host(peer.hello.relay_endpoint, peer.address) if peer.hello.relay_endpoint else ""


class LearnerService:
    def __init__(self, cfg: Config, scheduler: Scheduler, *, run_id: str, model: str, weights_endpoint: str,
                 clock: Callable[[], float] = time.monotonic, max_model_len: int = 0):
        self.cfg = cfg
        self.scheduler = scheduler
        self.run_id = run_id
        self.model = model
        self.max_model_len = max_model_len  # the run's context for Welcome (common.data.run_context)
        self.clock = clock
        self.lock = threading.RLock()
        self.ready = threading.Condition(self.lock)
        self.published_version = scheduler.version
        self.finished = False
        self.server: Server | None = None
        self.sources = WeightSources(weights_endpoint, cfg.bus.relay_fanout, learner_host=shm.host_id(),
                                     shared=cfg.bus.shared_memory)
        self.dispatcher = ScoreDispatcher(self._send, self._on_scores, on_failed=self._on_unscored,
                                          on_drop=self._on_reward_dropped, timeout_s=cfg.learner.score_timeout_s)
        self._scoring: dict[int, Accepted] = {}
        self._parked: dict[str, Parked] = {}  # worker_id → its held lease request, oldest first
        self._window = {"len": 0.0, "trunc": 0.0, "samples": 0.0}
        self.breakdown = RewardBreakdown(cfg.learner.loss.zero_truncated_reward)  # reward/<kind|source>/*

    # --- wiring -------------------------------------------------------------------------------

    def attach(self, server: Server) -> None:
        self.server = server
        server.on_hello(self.hello)
        server.on_dead(self.dead)
        server.heartbeat_reply(self.heartbeat)
        server.on_tick(self.tick)
        server.on(LeaseRequest, self._guarded_lease, deferrable=True)
        for msg_type, fn in ((Submit, self.submit), (Release, self.release), (Ready, self.ready_msg),
                             (ScoreResult, self.score_result), (Status, self.status), (Set, self.set),
                             (WeightSource, self.weight_source)):
            server.on(msg_type, self._guard(fn))

    def _guard(self, fn: Callable[[Peer, Any], Message | None]) -> Callable[[Peer, Any], Message | None]:
        def handler(peer: Peer, msg: Any) -> Message | None:
            with self.lock:
                out = fn(peer, msg)
                self._serve_parked()  # the handler may have freed a slot (a filtered group, a release, η)
                return out
        return handler

    def _guarded_lease(self, peer: Peer, msg: LeaseRequest, reply_to: ReplyTo) -> Message | None:
        with self.lock:
            return self.lease(peer, msg, reply_to)

    def _send(self, worker_id: str, msg: Message) -> bool:
        return self.server is not None and self.server.send(worker_id, msg)

    # --- session ------------------------------------------------------------------------------

    def hello(self, peer: Peer) -> Message:
        why = self._refusal(peer)
        if why:
            log.warning("peer.refused", peer=peer.worker_id, role=peer.role, key=peer.key, address=peer.address, why=why)
            return Error(ERR_FORBIDDEN, why)
        with self.lock:
            log.info("peer.hello", peer=peer.worker_id, role=peer.role, host=peer.host, address=peer.address,
                     held=peer.hello.weight_version, relay=relay_endpoint(peer))
            return Welcome(run_id=self.run_id, epoch=self.scheduler.epoch, version=self.published_version,
                           heartbeat_s=self.cfg.bus.heartbeat_s, liveness=self.cfg.bus.liveness,
                           max_staleness=self.scheduler.eta, model=self.model,
                           weights_endpoint=self.sources.learner_endpoint, stage=self.scheduler.stage,
                           max_model_len=self.max_model_len)

    def _refusal(self, peer: Peer) -> str:
        """Why `peer` may not join in the role it claims ("" = it may). Under CurveZMQ its key
        decides its role (bus.auth.key_role); the admin role also opens to learner.admin_key."""
        admin_key = self.cfg.learner.admin_key
        has_admin_key = bool(admin_key) and peer.hello.admin_key == admin_key
        if self.server is not None and self.server.secure:
            granted = key_role(peer.key)
            if peer.role == granted or (peer.role == ROLE_ADMIN and has_admin_key):
                return ""
            return (f"client key {peer.key!r} grants the role {granted!r}, not {peer.role!r}: give this client a "
                    f"{peer.role} key (`or1 keys DIR --client {peer.role}-NAME`)")
        if peer.role == ROLE_ADMIN and admin_key and not has_admin_key:
            return "admin key required (or1 status/set --admin-key, or OR1_ADMIN_KEY)"
        return ""

    def heartbeat(self, peer: Peer) -> Heartbeat:
        with self.lock:
            if peer.role == ROLE_ACTOR and peer.weight_version >= 0:
                self.sources.done(peer.worker_id, peer.weight_version)
            return Heartbeat(version=self.published_version, max_staleness=self.scheduler.eta)

    def dead(self, peer: Peer) -> None:
        with self.lock:
            now = self.clock()
            if peer.role == ROLE_ACTOR:
                self._parked.pop(peer.worker_id, None)
                n = self.scheduler.actor_dead(peer.worker_id)
                self.sources.dead(peer.worker_id)
                log.warning("actor.gone", peer=peer.worker_id, requeued=n)
            elif peer.role == ROLE_REWARD:
                n = self.dispatcher.worker_dead(peer.worker_id, now)
                log.warning("reward.gone", peer=peer.worker_id, reassigned=n)
            self._serve_parked()  # its requeued groups left the admission count
            self.ready.notify_all()

    # --- actors -------------------------------------------------------------------------------

    def lease(self, peer: Peer, msg: LeaseRequest, reply_to: ReplyTo | None = None) -> Message | None:
        """A Lease or why not; with `reply_to` (the bus handler), a Wait(admission) is parked instead
        and answered later (`_serve_parked`): None."""
        out = self._grant(peer.worker_id, msg)
        if reply_to is not None and self.server is not None and _turned_away(out):
            self._parked.pop(peer.worker_id, None)  # a re-ask replaces its old request (a reconnect's)
            hold_s = min(self.scheduler.admission_retry_s, HOLD_MAX_S)
            self._parked[peer.worker_id] = Parked(msg, reply_to, self.clock() + hold_s)
            return None
        return out

    def _grant(self, worker_id: str, msg: LeaseRequest) -> Message:
        if self.finished:
            return Wait(reason=WAIT_DONE, retry_after_s=5.0)
        now = self.clock()
        self.scheduler.expire(now)
        return self.scheduler.grant(worker_id, max(1, msg.max_groups), msg.weight_version, now)

    def _serve_parked(self) -> None:
        """Grant every parked request again, oldest first (under the lock); answer each one whose
        reply is no longer Wait(admission), or whose wait is over."""
        for worker_id, parked in list(self._parked.items()):
            out = self._grant(worker_id, parked.request)
            if _turned_away(out):
                if self.clock() < parked.until:
                    continue
                out = replace(out, retry_after_s=0.0)  # ask again at once (and be parked again)
            del self._parked[worker_id]
            if self.server is not None:
                self.server.answer(parked.reply_to, out)

    def tick(self) -> None:
        """The control server's timer: parked requests whose wait is over are answered."""
        if self._parked:
            with self.lock:
                self._serve_parked()

    def submit(self, peer: Peer, msg: Submit) -> SubmitAck:
        now = self.clock()
        res = self.scheduler.submit(peer.worker_id, msg.lease_id, msg.epoch, msg.groups, now)
        for acc in res.accepted:
            self._scoring[acc.group_id] = acc
            items = [ScoreItem(kind=acc.prompt.kind, response=s.text, reference=acc.prompt.reference)
                     for s in acc.group.samples]
            self.dispatcher.submit(acc.group_id, items, now)
        if res.rejected:
            log.warning("submit.rejected", peer=peer.worker_id, lease_id=msg.lease_id, reason=res.reason)
        return SubmitAck(lease_id=msg.lease_id, accepted=len(res.accepted), rejected=len(res.rejected), reason=res.reason)

    def release(self, peer: Peer, msg: Release) -> None:
        n = self.scheduler.release(peer.worker_id, msg.lease_ids)
        log.info("lease.released", peer=peer.worker_id, leases=list(msg.lease_ids), requeued=n)
        self.ready.notify_all()

    def weight_source(self, peer: Peer, msg: WeightSource) -> Message:
        version = self.published_version if msg.version < 0 else msg.version
        if version > self.published_version:
            return Error(ERR_NOT_FOUND, f"version {version} not published yet (latest {self.published_version})")
        endpoint, source_id = self.sources.choose(version, peer.worker_id, self._relays(), peer.hello.host_id)
        log.info("weights.source", peer=peer.worker_id, version=version, source=source_id, endpoint=endpoint)
        return WeightSource(version=version, endpoint=endpoint, source_id=source_id)

    def _relays(self) -> list[RelayView]:
        out = []
        for p in self.server.peers() if self.server else []:
            if p.role == ROLE_ACTOR and p.hello.relay_endpoint:
                have = int(p.stats.get("weights/have_version", p.weight_version))
                recv = int(p.stats.get("weights/receiving_version", -1))
                out.append(RelayView(p.worker_id, relay_endpoint(p), have, recv, p.hello.host_id))
        return out

    # --- reward workers -----------------------------------------------------------------------

    def ready_msg(self, peer: Peer, msg: Ready) -> None:
        self.dispatcher.ready(peer.worker_id, msg.credits, self.clock())

    def score_result(self, peer: Peer, msg: ScoreResult) -> None:
        self.dispatcher.result(peer.worker_id, msg, self.clock())

    def _on_scores(self, group_id: int, results: list[ScoreOut]) -> None:
        """Called by the dispatcher (under the lock) with one group's checked rewards. Whatever
        goes wrong in accepting them, the group ends (requeued) and the scheduler stays consistent."""
        acc = self._scoring.pop(group_id, None)
        if acc is None:
            return
        errors = [r.error for r in results if r.error]
        if errors:
            log.warning("score.errors", group_id=group_id, n=len(errors), first=errors[0][:120])
        try:
            self.scheduler.scored(group_id, [r.reward for r in results])
        except Exception as e:  # noqa: BLE001 — a bug or a result the checks missed must not strand the group
            log.exception("score.rejected", group_id=group_id, error=str(e)[:200])
            self.scheduler.requeue_group(group_id, "score_error")
            self.ready.notify_all()
            return
        for s in acc.group.samples:
            self._window["len"] += len(s.token_ids)
            self._window["trunc"] += s.finish_reason == FINISH_LENGTH
            self._window["samples"] += 1
        self.breakdown.add(acc.prompt, acc.group.samples, results)
        self.ready.notify_all()

    def _on_unscored(self, group_id: int, why: str) -> None:
        """No reward worker scored the group: its prompt goes back to the queue, never trained on 0s."""
        if self._scoring.pop(group_id, None) is not None:
            log.warning("score.failed", group_id=group_id, why=why)
            self.scheduler.requeue_group(group_id, "unscored")
            self.ready.notify_all()

    def _on_reward_dropped(self, worker_id: str, why: str) -> None:
        log.error("reward.dropped", peer=worker_id, why=why[:200])

    # --- admin --------------------------------------------------------------------------------

    def status(self, peer: Peer, msg: Status) -> Message:
        if peer.role != ROLE_ADMIN:
            return Error(ERR_FORBIDDEN, "status needs the admin role (or1 status)")
        now = time.monotonic()
        leases = self.scheduler.leases_by_actor()
        fleet = [PeerInfo(role=p.role, worker_id=p.worker_id, host=p.host, weight_version=p.weight_version,
                          lag=max(0, self.published_version - p.weight_version) if p.role == ROLE_ACTOR else 0,
                          tokens_per_s=float(p.stats.get("actor/tokens_per_s", 0.0)), last_seen_s=now - p.last_seen,
                          leases=leases.get(p.worker_id, 0), relay_endpoint=relay_endpoint(p),
                          address=p.address, problem=p.problem, device=p.hello.device)
                 for p in (self.server.peers() if self.server else []) if p.role != ROLE_ADMIN]
        queues = {**self.scheduler.counts(), "score_queued": self.dispatcher.queued,
                  "score_outstanding": self.dispatcher.outstanding,
                  "admission_load": self.scheduler.admission_load(), "admission_cap": self.scheduler.admission_cap()}
        rates = {"actor/tokens_per_s": sum(p.tokens_per_s for p in fleet)}
        return StatusReply(run_id=self.run_id, epoch=self.scheduler.epoch, version=self.published_version,
                           max_staleness=self.scheduler.eta, fleet=fleet, queues=queues, rates=rates,
                           stage=self.scheduler.stage)

    def set(self, peer: Peer, msg: Set) -> Message:
        if peer.role != ROLE_ADMIN:  # admitted as admin by its key or the admin key (hello)
            return Error(ERR_FORBIDDEN, "settings need the admin role (or1 set)")
        if msg.key != "max_staleness":
            return Error(ERR_NOT_FOUND, f"unknown setting {msg.key!r} (settable: max_staleness)")
        try:
            old = self.scheduler.set_max_staleness(msg.value)
        except ValueError as e:
            return Error(ERR_BAD_VALUE, str(e))
        log.info("set", key=msg.key, old=old, new=msg.value, by=peer.worker_id)
        self.ready.notify_all()
        return SetReply(key=msg.key, old=old, new=self.scheduler.eta)

    # --- the training loop's side ---------------------------------------------------------------

    def next_batch(self, stop: threading.Event, poll_s: float = 0.25) -> Batch | None:
        """Block until B useful groups are buffered (expiring leases and timed-out scores meanwhile)."""
        with self.lock:
            while not stop.is_set():
                now = self.clock()
                self.scheduler.expire(now)
                self.dispatcher.tick(now)
                batch = self.scheduler.take_batch()
                self._serve_parked()  # stale groups it dropped left the admission count
                if batch is not None:
                    w = self._window
                    batch.metrics["reward/response_len"] = w["len"] / w["samples"] if w["samples"] else 0.0
                    batch.metrics["reward/truncated_frac"] = w["trunc"] / w["samples"] if w["samples"] else 0.0
                    self._window = {"len": 0.0, "trunc": 0.0, "samples": 0.0}
                    batch.metrics.update(self.breakdown.take())
                    return batch
                if self.scheduler.done:
                    return None
                self.ready.wait(poll_s)
        return None

    def step_done(self, version: int) -> dict[str, float]:
        """The batch was trained and weights `version` are published: advance the scheduler."""
        with self.lock:
            self.published_version = version
            m = self.scheduler.on_step()
            self._serve_parked()  # the step freed a batch of slots: parked actors start on it now
            self.ready.notify_all()
            return m

    def fleet_metrics(self) -> dict[str, float]:
        """Actor throughput and sync times from the last heartbeats (sum of tokens/s, mean of the rest)."""
        actors = [p for p in (self.server.peers() if self.server else []) if p.role == ROLE_ACTOR]
        out: dict[str, float] = {"actor/count": float(len(actors)), "actor/tokens_per_s": 0.0}
        for key in ("actor/idle_s", "weights/transfer_s", "weights/load_s", "weights/pause_s"):
            vals = [float(p.stats[key]) for p in actors if key in p.stats]
            if vals:
                out[key] = sum(vals) / len(vals)
        out["actor/tokens_per_s"] = sum(float(p.stats.get("actor/tokens_per_s", 0.0)) for p in actors)
        if self.server is not None:
            out.update({k: float(v) for k, v in self.server.metrics.items()})
        out.update(self.dispatcher.metrics)
        return out

    def finish(self) -> None:
        """The run is over: actors hear Wait(done) at their next lease request, reward workers at once."""
        with self.lock:
            self.finished = True
            self._serve_parked()  # every parked actor hears Wait(done) now
        for p in self.server.peers() if self.server else []:
            if p.role == ROLE_REWARD:
                self._send(p.worker_id, Wait(reason=WAIT_DONE, retry_after_s=5.0))

    def close_run(self) -> None:
        """End every grant still open in the ledger (scheduler.close_run) once the fleet has left."""
        with self.lock:
            n = self.scheduler.close_run()
        if n:
            log.info("ledger.closed", abandoned=n)

    def wait_fleet_gone(self, timeout: float) -> None:
        """Keep serving until every actor and reward worker has said Bye (an actor still generating
        submits, is told Wait(done) and leaves), the peers are declared dead, or `timeout` s. A run
        stopped by SIGTERM waits too: the fleet must hear Wait(done), or it would keep calling a
        learner that is gone (a second Ctrl-C cuts the wait: KeyboardInterrupt)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(p.role in (ROLE_ACTOR, ROLE_REWARD) for p in (self.server.peers() if self.server else [])):
                return
            time.sleep(0.1)


def _turned_away(reply: Message) -> bool:
    return isinstance(reply, Wait) and reply.reason == WAIT_ADMISSION
