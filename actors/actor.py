"""The actor: a rollout worker that any number of can join or leave a run at any time.

    Hello → Welcome (model, version, η, the run's max_model_len) → build the engine
    loop (`Actor.cycle`, one lease per cycle):
        load newer weights if the background sync has them      (pause = load only)
        LeaseRequest(max_groups, held version) → Lease | Wait
            Wait(weights)   → block until the sync has ≥ min_version, load it (an engine that
                              loads lazily loads it while it arrives: chunk by chunk, below)
            Wait(admission) → sleep retry_after (the staleness bound admits nothing now)
            Wait(done)      → leave
        never generate with weights older than the lease's min_version
        generate n samples per prompt → Submit(groups tagged with the held version) → SubmitAck
            (actor.update_mode = in_flight: newer weights load while the lease generates; each
             sample says which tokens each version sampled, its group is tagged with the oldest)
    stop flag (SIGTERM / SIGINT) → Release(held leases) → Bye

Threads: the main thread runs the loop; the engine runs on its own thread (`EngineThread`), so the
main thread waits for a generation or the stop flag, whichever comes first. A signal only sets the
flag; the main thread then aborts the generation (`Engine.abort`), hands the held leases back at
once and leaves, without waiting out a generation of minutes. The main thread never blocks on the
flag itself (only `is_set`, and waits in slices of `POLL_S`): a handler that set it while the main
thread sat inside `stop.wait` would deadlock on the event's own lock. Heartbeats run on the bus
client's thread, so a long generation never looks like death. After a learner restart the client
says Hello again and the new epoch's leases simply continue.

Streamed loads: when the actor must wait for a version (a Wait(weights), a lease's min_version)
and the engine `streams_loads` (vLLM in-process), it does not wait for the pull to finish: it
loads from the sync's PartialStore as chunks land (`weights_io.StreamedTensors`), so the load
overlaps the transfer. Should the pull give that partial up (or a chunk miss the lease's deadline)
midway, the engine holds part of two versions: the actor then holds no version (held -1, so it
generates nothing) until it loads a whole one, which the sync's retried pull brings.

One constructor for every use: `or1 actor` (`run`) builds `Actor(cfg)` with the real engine; tests
build `Actor(cfg, make_engine=...)` with a fake one against an in-process learner.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from actors.engine import context_error
from actors.engine_thread import POLL_S, Call, EngineThread
from actors.sync import WeightSync
from actors.weights_io import StreamBroken, StreamedTensors, named_tensors
from bus.auth import client_curve, server_curve
from bus.client import Client, RemoteError
from bus.messages import (
    ROLE_ACTOR, WAIT_DONE, WAIT_WEIGHTS, Group, Hello, Lease, LeaseRequest, Release, Sample, Submit, SubmitAck,
    VersionSpan, Wait, Welcome,
)
from bus.weights import shm
from bus.weights.server import WeightServer
from bus.weights.store import PartialStore
from common.config import ActorConfig, Config
from common.devices import device_label
from common.log import get_logger, setup_logging
from learner.staleness import fresh_enough

if TYPE_CHECKING:
    from actors.engine import Engine, GenSample
    from bus.weights.store import WeightStore

log = get_logger()
REQUEST_TIMEOUT_S = 30.0
CONNECT_POLL_S = 1.0  # connect waits for the Welcome in slices this long, looking at the stop flag between them
ABORT_GRACE_S = 5.0  # after leaving the bus, how long an aborted generation may take to end before the engine is closed


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
    in_flight_loads: int = 0
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
            "weights/in_flight_loads": float(self.in_flight_loads),
            "weights/receiving_version": float(sync_stats.receiving_version),
            "weights/have_version": float(max(held, sync_stats.have_version)),
        }


EngineFactory = Callable[[str, ActorConfig, "int | None"], "Engine"]
"""(model, actor config, the run's max_model_len from the Welcome or None) → an engine."""


def group_of(prompt_id: str, samples: "list[GenSample]", version: int) -> Group:
    """A prompt's samples as a Group tagged with the oldest weights any token came from: `version`
    (held when the generation started), or older where an engine's spans say so. A sample carries
    its spans only when it mixes versions or differs from the group's (most carry none)."""
    oldest = min([version] + [s.versions[0][0] for s in samples if s.versions])
    return Group(prompt_id=prompt_id, weight_version=oldest, samples=[
        Sample(token_ids=s.token_ids, logprobs=s.logprobs, finish_reason=s.finish_reason, text=s.text,
               versions=[VersionSpan(v, start) for v, start in s.versions]
               if len(s.versions) > 1 or (s.versions and s.versions[0][0] != oldest) else [])
        for s in samples])


def default_worker_id(prefix: str) -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}"


def relay_advertise(bound: str, advertise: str) -> str:
    """The relay endpoint sent in Hello: the explicit one, else the address it bound (a wildcard
    host, which the learner replaces by the address it sees us at: bus/address.py)."""
    return advertise if advertise or not bound else bound


def real_engine(model: str, a: ActorConfig, max_model_len: int | None) -> "Engine":
    """The engine `actor.engine` names (vLLM, or the transformers fallback)."""
    from actors.engine import make_engine

    return make_engine(a.engine, model, a, max_model_len=max_model_len)


def run(cfg: Config, log_format: str = "auto") -> int:
    """`or1 actor`: the process around one `Actor` (logging, allocator, signals); its exit code."""
    setup_logging("actor", cfg.actor.worker_id or default_worker_id("actor"), log_format)
    if cfg.bus.keep_frame_memory:
        from bus.memory import keep_frame_memory

        keep_frame_memory()
    actor = Actor(cfg)
    actor.install_signals()
    return actor.run()


class Actor:
    """One actor: its bus client, relay, weight sync and engine, and the lease loop (module doc).

    Build it, call `run()` once (it closes everything it opened); `stop` may be set from any
    thread, or by SIGTERM / SIGINT after `install_signals()`. The engine is built by `make_engine`
    after the Welcome, since the model and the run's context length come from the learner."""

    abort_grace_s = ABORT_GRACE_S

    def __init__(self, cfg: Config, make_engine: EngineFactory = real_engine):
        self.cfg, self.a = cfg, cfg.actor
        self.worker_id = self.a.worker_id or default_worker_id("actor")
        self.stop = threading.Event()
        self.stats = ActorStats()
        self.held_leases: set[int] = set()
        self.engine: Engine | None = None
        self.epoch: tuple[str, int] | None = None  # (run id, epoch) of the last Welcome
        self.device = device_label()  # for `or1 status` (Hello.device)
        self._make_engine = make_engine
        self._engine_thread: EngineThread | None = None
        self._abandoned: Call[Any] | None = None  # a generation left running when the actor stopped
        self._broken: PartialStore | None = None  # a partial whose streamed load broke: not streamed again
        self.curve = client_curve(cfg.bus.curve_dir, ROLE_ACTOR, cfg.bus.client_key)
        self.relay = self._make_relay()
        self.relay_endpoint = relay_advertise(self.relay.endpoint if self.relay else "", self.a.relay_advertise)
        self.client = Client(self.a.learner, self._hello, heartbeat_s=cfg.bus.heartbeat_s, liveness=cfg.bus.liveness,
                             stats=self._heartbeat_stats, max_message_bytes=cfg.bus.max_message_bytes,
                             curve=self.curve, problem=lambda: self.sync.problem, health_file=cfg.bus.health_file)
        self.sync = WeightSync(self.client, cfg.bus, self.relay, curve=self.curve)
        self.client.on_welcome(self._on_welcome)

    def _make_relay(self) -> WeightServer | None:
        bus = self.cfg.bus
        if not self.a.relay_bind:
            return None
        return WeightServer(self.a.relay_bind, max_message_bytes=bus.max_message_bytes,
                            curve=server_curve(bus.curve_dir, bus.allow_readable_keys))

    @property
    def held_version(self) -> int:
        return self.sync.held_version

    # --- the process ------------------------------------------------------------------------

    def install_signals(self) -> None:
        """SIGTERM and SIGINT set the stop flag (call from the main thread, where Python runs handlers)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, *_: Any) -> None:
        # Only the flag: the handler runs between two bytecodes of whatever the main thread is doing.
        # Every wait of the loop looks at it every POLL_S, and a generation in progress is abandoned:
        # it may run for minutes, and its leases are worth more back in the queue (another actor
        # takes them now) than finished here after the operator asked us to go.
        self.stop.set()

    def run(self) -> int:
        """Join the run, work lease after lease until Wait(done) or the stop flag, then leave.
        Returns the exit code: 0, or 2 when this actor's settings do not fit the run."""
        try:
            welcome = self._connect()
            if welcome is None:
                return 0
            why = context_error(self.a.max_model_len, welcome.max_model_len, self.a.tensor_parallel_size, self.a.engine,
                                self.a.update_mode)
            if why:  # a bad setting: say which, and leave before building an engine
                log.error("actor.refused", error=why)
                return 2
            self._start_engine(welcome)
            while not self.stop.is_set() and self.cycle():
                pass
            return 0
        finally:
            self._leave()

    def _connect(self) -> Welcome | None:
        """Hello until the Welcome (None: stopped before the learner answered)."""
        log.info("actor.connecting", learner=self.a.learner)
        while not self.stop.is_set():
            try:
                welcome = self.client.connect(timeout=CONNECT_POLL_S)
            except TimeoutError:
                continue
            log.info("actor.welcome", run_id=welcome.run_id, epoch=welcome.epoch, version=welcome.version,
                     model=self.a.model or welcome.model)
            return welcome
        return None

    def _start_engine(self, welcome: Welcome) -> None:
        self.engine = self._make_engine(self.a.model or welcome.model, self.a, welcome.max_model_len or None)
        log.info("actor.engine", engine=type(self.engine).__name__, max_model_len=self.engine.max_model_len,
                 run_needs=welcome.max_model_len)
        self._engine_thread = EngineThread()
        self.sync.start()

    def _leave(self) -> None:
        """Give the held leases back, say Bye, stop the sync and the relay, close the engine."""
        if self.held_leases:
            self._release(sorted(self.held_leases))
        self.sync.stop()
        self.client.close(bye="shutdown")
        if self.relay is not None:
            self.relay.stop()
        self._close_engine()

    def _close_engine(self) -> None:
        """Close the engine on its thread, unless an abandoned generation still runs on it after
        `abort_grace_s`: then the process exit frees it."""
        if self.engine is None or self._engine_thread is None:
            return
        if self._abandoned is not None and not self._abandoned.wait(timeout=self.abort_grace_s):
            log.info("actor.engine_left_running", why="the aborted generation has not ended; the process exit frees it")
            return
        self._engine_thread.run(self.engine.close)
        self._engine_thread.stop()

    # --- the bus client's thread --------------------------------------------------------------

    def _hello(self) -> Hello:
        return Hello(role=ROLE_ACTOR, worker_id=self.worker_id, host=socket.gethostname(), host_id=shm.host_id(),
                     capacity=self.a.max_groups, weight_version=self.held_version, relay_endpoint=self.relay_endpoint,
                     device=self.device)

    def _heartbeat_stats(self) -> dict[str, float]:
        return self.stats.as_metrics(self.held_version, self.sync.stats)

    def _on_welcome(self, w: Welcome) -> None:
        """Every (re)Welcome. A learner restarted from a checkpoint (a new epoch), or started afresh
        without one (a new run id, epoch 0 again), may retrain versions we hold with other weights:
        whatever we hold came from a history it no longer has, so pull its current version."""
        if self.epoch is not None and (w.run_id, w.epoch) != self.epoch:
            log.warning("actor.new_epoch", held=self.held_version, learner=w.version, epoch=w.epoch, run_id=w.run_id)
            self.sync.reset()
        self.epoch = (w.run_id, w.epoch)
        engine = self.engine
        if engine is not None and w.max_model_len > engine.max_model_len:  # a restarted learner with longer stages
            log.warning("actor.context_short", max_model_len=engine.max_model_len, run_needs=w.max_model_len,
                        fix="restart this actor (it sizes its engine at start)")

    # --- one lease cycle ----------------------------------------------------------------------

    def cycle(self) -> bool:
        """One lease: load what the sync finished, ask for a lease, obey the reply. False when the
        actor is done: the run ended (Wait(done)) or the stop flag was set."""
        self._load(self.sync.ready())
        if self.stop.is_set():
            return False
        reply = self._request_lease()
        if reply is None:
            return True
        if isinstance(reply, Wait):
            return self._obey(reply)
        return self._work(reply)

    def _request_lease(self) -> Lease | Wait | None:
        msg = LeaseRequest(max_groups=self.a.max_groups, weight_version=self.held_version)
        try:
            reply = self.client.request(msg, timeout=REQUEST_TIMEOUT_S)
        except (TimeoutError, RemoteError) as e:
            log.warning("actor.lease_failed", error=str(e))
            self._pause(1.0)
            return None
        return reply if isinstance(reply, (Lease, Wait)) else None

    def _obey(self, wait: Wait) -> bool:
        if wait.reason == WAIT_DONE:
            log.info("actor.done")
            return False
        t0 = time.perf_counter()
        if wait.reason == WAIT_WEIGHTS:
            self.sync.want(wait.min_version)
            self._load(self._wait_version(wait.min_version, timeout=max(wait.retry_after_s, 5.0)))
        else:
            self._pause(wait.retry_after_s)
        self.stats.idle_s += time.perf_counter() - t0
        return True

    def _work(self, lease: Lease) -> bool:
        """Generate the lease with weights ≥ its min_version and submit it; give it back when those
        weights do not come in time. False when stopped in the middle of the generation."""
        self.held_leases.add(lease.lease_id)
        if not self._weights_for(lease):
            self._release([lease.lease_id])
            return True
        groups = self._generate(lease)
        if groups is None:
            return False
        self._submit(lease, groups)
        self.held_leases.discard(lease.lease_id)
        return True

    def _weights_for(self, lease: Lease) -> bool:
        """Hold weights ≥ the lease's min_version (the learner checks too; we never generate with
        older ones; the rule is learner/staleness.py's): wait up to its deadline for the sync to bring
        them. False if they did not come."""
        if fresh_enough(self.held_version, lease.min_version):
            return True
        self.sync.want(lease.min_version)
        deadline = time.monotonic() + lease.deadline_s
        while (got := self._wait_version(lease.min_version, timeout=deadline - time.monotonic())) is not None:
            self._load(got, deadline)
            if fresh_enough(self.held_version, lease.min_version):
                return True
        return False

    # --- the engine ---------------------------------------------------------------------------

    def _load(self, got: "WeightStore | PartialStore | None", deadline: float | None = None) -> None:
        """Load a whole store, or (from `_wait_version`) a version still arriving, until `deadline`."""
        if got is None:
            return
        assert self.engine is not None and self._engine_thread is not None
        version = got.manifest.version
        streamed = isinstance(got, PartialStore)
        t0 = time.perf_counter()
        if streamed:
            alive = lambda: self.sync.receiving(version) is got or got.complete  # noqa: E731
            named: Any = StreamedTensors(got, alive, deadline or time.monotonic() + self.cfg.bus.chunk_timeout_s * 6)
        else:
            named = named_tensors(got)
        try:
            m = self._engine_thread.run(self.engine.load_weights, named, version)
        except StreamBroken as e:
            self._broken = got
            self.sync.loaded(-1)  # part of two versions in the engine: none whole until one loads
            log.warning("weights.stream_broken", version=version, error=str(e)[:200],
                        then="waiting for the whole version before generating")
            return
        self.sync.loaded(version)
        self.stats.load_s = m.get("weights/load_s", time.perf_counter() - t0)
        self.stats.pause_s = time.perf_counter() - t0
        log.info("weights.loaded", version=version, load_s=round(self.stats.load_s, 3), streamed=streamed,
                 ended_at=round(time.time(), 3))

    def _generate(self, lease: Lease) -> list[Group] | None:
        """The lease's groups, tagged with the held version; None when the stop flag came first
        (the engine is told to abort, and the generation is abandoned to it)."""
        assert self.engine is not None and self._engine_thread is not None
        version = self.held_version
        log.info("actor.generating", lease_id=lease.lease_id, groups=len(lease.prompts), version=version)
        t0 = time.perf_counter()
        call = self._engine_thread.submit(self.engine.generate, [p.token_ids for p in lease.prompts], lease.sampling)
        if not self._wait_generation(call):
            log.info("actor.interrupted", leases=sorted(self.held_leases))
            self.engine.abort()
            self._abandoned = call
            return None
        return self._groups(lease, call.result(), version, time.perf_counter() - t0)

    @property
    def in_flight(self) -> bool:
        """Load weights while generating (actor.update_mode = in_flight, on an engine that can)."""
        return self.a.update_mode == "in_flight" and bool(getattr(self.engine, "updates_in_flight", False))

    def _wait_generation(self, call: Call[Any]) -> bool:
        """Wait for the generation; False when the stop flag came first. In flight, every version the
        sync finishes meanwhile is loaded into the running engine from this thread at once."""
        if not self.in_flight:
            return call.wait(self.stop)
        while not call.wait(self.stop, timeout=POLL_S):
            if self.stop.is_set():
                return False
            store = self.sync.ready()
            if store is not None:
                self._load_in_flight(store)
        return True

    def _load_in_flight(self, store: "WeightStore") -> None:
        assert self.engine is not None
        version = store.manifest.version
        m = self.engine.load_weights(named_tensors(store), version)
        self.sync.loaded(version)
        self.stats.load_s = m.get("weights/load_s", 0.0)
        self.stats.pause_s = m.get("weights/pause_s", self.stats.load_s)
        self.stats.in_flight_loads += 1
        log.info("weights.loaded_in_flight", version=version, load_s=round(self.stats.load_s, 3),
                 pause_s=round(self.stats.pause_s, 3))

    def _groups(self, lease: Lease, outs: "list[list[GenSample]]", version: int, gen_s: float) -> list[Group]:
        groups = [group_of(prompt.prompt_id, samples, version) for prompt, samples in zip(lease.prompts, outs)]
        tokens = sum(len(s.token_ids) for g in groups for s in g.samples)
        self.stats.tokens += tokens
        self.stats.gen_s += gen_s
        self.stats.groups += len(groups)
        self.stats.leases += 1
        log.info("actor.generated", lease_id=lease.lease_id, groups=len(groups), gen_s=round(gen_s, 3), tokens=tokens)
        return groups

    # --- the learner ----------------------------------------------------------------------------

    def _submit(self, lease: Lease, groups: list[Group]) -> None:
        msg = Submit(lease_id=lease.lease_id, epoch=lease.epoch, groups=groups)
        for _ in range(3):
            try:
                ack = self.client.request(msg, timeout=REQUEST_TIMEOUT_S)
            except TimeoutError:
                continue
            except RemoteError as e:  # e.g. a restarted learner refuses an old epoch's lease: drop it
                log.warning("actor.submit_refused", lease_id=lease.lease_id, error=str(e))
                return
            if isinstance(ack, SubmitAck) and ack.rejected:
                log.warning("actor.submit_partly_rejected", lease_id=lease.lease_id, rejected=ack.rejected,
                            reason=ack.reason)
            return
        log.warning("actor.submit_lost", lease_id=lease.lease_id)

    def _release(self, lease_ids: list[int]) -> None:
        """Give leases back unfinished: the learner requeues their prompts at once."""
        self.client.send(Release(lease_ids=lease_ids))
        self.held_leases.difference_update(lease_ids)
        log.info("actor.released", leases=lease_ids)

    # --- waiting (in slices: the stop flag is read, never waited on; see the module doc) --------

    def _wait_version(self, version: int, timeout: float) -> "WeightStore | PartialStore | None":
        """The sync's store of at least `version`, or None after `timeout` s or on stop. An engine
        that `streams_loads` gets the version as soon as its pull has begun (the PartialStore), to
        load while it arrives: unless streaming that very partial broke before."""
        deadline = time.monotonic() + timeout
        streams = bool(getattr(self.engine, "streams_loads", False))
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            store = self.sync.wait_for(version, timeout=min(left, POLL_S))
            if store is not None:
                return store
            partial = self.sync.receiving(version) if streams else None
            if partial is not None and partial is not self._broken:
                return partial
        return None

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, POLL_S))
