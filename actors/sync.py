"""Background weight sync for an actor: pull the newest version while generation goes on.

The learner announces its version in every reply (Welcome, Heartbeat). As soon as it is ahead of
what this actor holds, a background thread asks the learner for a source (`WeightSource`: the
learner's weights port or a relay peer), pulls the flat buffer chunk by chunk, and — when this actor
relays — serves each chunk to its own children as soon as it has arrived. The run loop loads the
finished store into the engine between leases, so generation pauses only for the load, not for
the transfer (docs/weights.md#pulls-and-failover: the actor keeps generating with its old weights, within η).
A stalled or failed transfer is retried from another source; the old weights stay in use.

On one host (``bus.shared_memory``): a source on this actor's host hands the version over as a
``/dev/shm`` file that is mapped, not pulled (``bus.weights.shm``); a relay keeps what it receives there, and
re-offers a mapped version to its own same-host children.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from bus.address import hint, resolve_advertised
from bus.client import Client, RemoteError
from bus.messages import ERR_NOT_FOUND, SOURCE_LEARNER, WeightSource
from bus.weights.pull import attach_shared, fetch_manifest, pull
from bus.weights.server import WeightServer
from bus.weights.store import PartialStore, WeightStore, prepare_next
from common.config import BusConfig
from common.log import get_logger

log = get_logger()
RETRY_PULL_S = 1.0  # after a pull that failed (source down, timeout): the weights in hand stay
IDLE_S = 0.05  # the pull thread's poll for a newer version announced (`want` wakes it at once)


@dataclass
class SyncStats:
    transfer_s: float = 0.0
    retries: int = 0
    failures: int = 0
    receiving_version: int = -1
    have_version: int = -1  # newest complete store (served by the relay before the engine loads it)


class WeightSync:
    """Owns the pull thread. `ready()` hands the newest complete store to the run loop (once);
    `wait_for(version)` blocks until a store of at least that version is there; the run loop says
    what it loaded with `loaded(version)`. The held version is read by the pull thread, the bus
    client's thread (Hello, heartbeat stats, a new epoch's `reset`) and the run loop, so it lives
    under the lock."""

    def __init__(self, client: Client, bus: BusConfig, relay: WeightServer | None = None, curve=None):
        self.client = client
        self.curve = curve
        self.bus = bus
        self.relay = relay
        self._held = -1  # version loaded into the engine (`loaded`), under _cv
        self.stats = SyncStats()
        self.problem = ""  # one line for `or1 status` while pulls keep failing ("" = fine)
        self._failed_in_row = 0
        self._endpoint = ""  # the source of the pull under way (for the error)
        self._from_learner = True
        self._store: WeightStore | None = None
        self._partial: PartialStore | None = None  # the version being pulled, readable as it lands
        self._want = -1
        self._handed = -1
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by `want` and `stop`: the idle pull thread looks again now
        self._thread = threading.Thread(target=self._loop, name="weight-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._cv:
            self._cv.notify_all()

    @property
    def held_version(self) -> int:
        """The version loaded into the engine (-1: none yet, or forgotten by `reset`)."""
        with self._cv:
            return self._held

    def loaded(self, version: int) -> None:
        """The run loop loaded `version` into the engine."""
        with self._cv:
            self._held = version

    def reset(self) -> None:
        """Forget what is held (the learner restarted behind us): the next wanted version is its latest."""
        with self._cv:
            self._held = -1
            self._want = -1
            self._handed = -1
            self._store = None
            self.stats.have_version = -1

    def ready(self) -> WeightStore | None:
        """The newest complete store newer than the held version, handed over once."""
        with self._cv:
            store, self._store = self._store, None
            if store is None:
                return None
            self._handed = max(self._handed, store.manifest.version)
            return store if store.manifest.version > self._held else None

    def wait_for(self, version: int, timeout: float) -> WeightStore | None:
        """Block until a complete store with version ≥ `version` is there (or timeout)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._stop.is_set():
                if self._store is not None and self._store.manifest.version >= version:
                    store, self._store = self._store, None
                    self._handed = max(self._handed, store.manifest.version)
                    return store
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(min(left, 0.2))
        return None

    def receiving(self, version: int) -> PartialStore | None:
        """The version this sync is pulling now, if it is at least `version`: its chunks can be read
        as they land and pass their crc (the run loop streams them into an engine that loads lazily,
        actors/weights_io.StreamedTensors). None once that pull has ended, well or not."""
        with self._cv:
            p = self._partial
            return p if p is not None and p.version >= version else None

    def _receive(self, partial: PartialStore | None) -> None:
        with self._cv:
            self._partial = partial
            self._cv.notify_all()

    def want(self, version: int) -> None:
        """The learner asked for at least `version` (a Wait or a Lease said so): pull it now rather
        than at the next heartbeat that announces it. Wakes the pull thread: its idle poll cost the
        embedded run ~25 ms of every step, the actor waiting for weights the learner had published."""
        with self._cv:
            self._want = max(self._want, version)
        self._wake.set()

    def _wanted(self) -> int:
        with self._cv:
            # a store handed to the run loop but not loaded yet counts as held: don't pull it twice
            have = max(self._held, self._handed, self._store.manifest.version if self._store else -1)
            latest = max(self.client.server_version, self._want)
        return latest if latest > have else -1

    def _loop(self) -> None:
        while not self._stop.is_set():
            version = self._wanted()
            if version < 0:
                self._wake.wait(IDLE_S)
                self._wake.clear()  # before `_wanted` looks again: a `want` from now on is seen
                continue
            try:
                store = self._pull(version)
            except Exception as e:  # a failed pull keeps the old weights; try again shortly
                self._stop.wait(self._failed(version, e))
                continue
            finally:
                self._receive(None)
            self._failed_in_row, self.problem = 0, ""
            with self._cv:
                if self._store is None or store.manifest.version > self._store.manifest.version:
                    self._store = store
                self._cv.notify_all()

    def _failed(self, version: int, e: Exception) -> float:
        """Count a failed pull and return how long to wait before the next; from the third
        unanswered one in a row on, say loudly which endpoint failed and which setting fixes it, in
        the log and (Heartbeat.problem) in `or1 status`. A source that answered "not held"
        (LookupError: versions came faster than we pulled) was reached: the next try, after the idle
        poll's IDLE_S, asks for the newest version announced (a full RETRY_PULL_S here cost the
        embedded run ~1 s each time, the learner idle)."""
        self.stats.failures += 1
        if isinstance(e, LookupError):
            self._failed_in_row, self.problem = 0, ""
            log.info("weights.version_gone", version=version, endpoint=self._endpoint, error=str(e)[:200])
            return IDLE_S
        self._failed_in_row += 1
        fix = hint(self._endpoint, self._from_learner) if self._endpoint else "no weight source answered"
        if self._failed_in_row >= 3:
            self.problem = f"{self._failed_in_row} weight pulls failed: {fix}"
            log.error("weights.pull_failing", version=version, endpoint=self._endpoint, error=str(e)[:200],
                      failures=self._failed_in_row, fix=fix)
        else:
            log.warning("weights.pull_failed", version=version, endpoint=self._endpoint, error=str(e)[:200])
        return RETRY_PULL_S

    def _source(self, version: int) -> str:
        reply = self.client.request(WeightSource(version=version), timeout=10.0)
        if not isinstance(reply, WeightSource) or not reply.endpoint:
            raise RemoteError(ERR_NOT_FOUND, f"no source for version {version}")
        if reply.source_id == SOURCE_LEARNER:
            return self._learner_endpoint()
        self._endpoint, self._from_learner = reply.endpoint, False
        return reply.endpoint

    def _learner_endpoint(self) -> str:
        """The learner's weights endpoint as this host reaches it (bus/address.py)."""
        w = self.client.welcome
        if w is None or not w.weights_endpoint:
            raise RemoteError(ERR_NOT_FOUND, "the learner announced no weights endpoint")
        self._endpoint = resolve_advertised(w.weights_endpoint, self.client.endpoint)
        self._from_learner = True
        return self._endpoint

    def _pull(self, version: int) -> WeightStore:
        """Pull `version` from the source the learner names; if that source fails (a relay that
        already dropped the version, a stalled peer), fall back to the learner itself, which
        always holds its newest versions."""
        self.stats.receiving_version = version
        sources = [self._source(version)]
        partial = None
        shared = self.bus.shared_memory
        if shared and self.relay is not None:  # (a plain puller tries the same inside `pull`)
            t0 = time.perf_counter()
            attached = attach_shared(sources[0], version, 3 * self.bus.chunk_timeout_s, self.curve,
                                     self.bus.max_message_bytes)
            if attached is not None:
                self.relay.publish(attached)
                return self._pulled(attached, time.perf_counter() - t0, 0)
        if self.relay is not None:
            # Relay while receiving: children may ask for chunks we are still pulling.
            try:
                manifest = fetch_manifest(sources[0], version, timeout=self.bus.chunk_timeout_s, curve=self.curve)
            except (TimeoutError, RemoteError, LookupError, ValueError) as e:
                log.info("weights.source_fallback", version=version, source=sources[0], error=str(e)[:120])
                sources = [self._learner_endpoint()]
                manifest = fetch_manifest(sources[0], version, timeout=self.bus.chunk_timeout_s, curve=self.curve)
            partial = PartialStore(manifest, shared=shared)
            self.relay.publish_partial(partial)
            self._receive(partial)
        store, metrics = pull(
            lambda: sources.pop() if sources else self._learner_endpoint(),
            version,
            window=self.bus.pull_window,
            chunk_timeout_s=self.bus.chunk_timeout_s,
            partial=partial,
            max_message_bytes=self.bus.max_message_bytes,
            curve=self.curve,
            shared=shared,
            on_partial=self._receive,
        )
        if self.relay is not None:
            self.relay.publish(store)
        return self._pulled(store, metrics.get("weights/transfer_s", 0.0), int(metrics.get("weights/retries", 0)))

    def _pulled(self, store: WeightStore, transfer_s: float, retries: int) -> WeightStore:
        self.stats.have_version = store.manifest.version
        self.stats.transfer_s = transfer_s
        self.stats.retries += retries
        self.stats.receiving_version = -1
        prepare_next(store)  # the next version lands in memory faulted in while this one is used
        log.info("weights.pulled", version=store.manifest.version, transfer_s=round(transfer_s, 3),
                 ended_at=round(time.time(), 3),
                 shared=store.shared is not None and not store.shared.owner)
        return store
