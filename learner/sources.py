"""Where an actor pulls a weight version from: the learner's weights port or a relay peer.

A relay is an actor started with `--relay-bind`: it serves every chunk it has already received,
so pulls form a tree whose depth grows like log_fanout(N) while each chunk is pipelined down it.
Each source (learner or relay) gets at most `fanout` children per version; a child leaves the
count when it reports the version as held (heartbeat), dies, asks again, or after `ttl_s` (a pull of
a whole version rarely takes longer; without it, fast steps would keep the learner's slots "busy"
with children that finished long ago but have not heartbeated yet). The learner is preferred while it
has room (it has the whole buffer at once); then the relay with the fewest children. A relay counts
as holding or receiving a version when its heartbeat says so, or as soon as this learner sent it to
pull that version (versions may come faster than heartbeats).

Same host first (``shared``, i.e. ``bus.shared_memory``): a requester on the learner's host is sent
to the learner, and one on a relay's host to that relay (one holding the version before one still
receiving it), whatever their load: a same-host source hands the version over as a shared-memory
file (``bus.weights.shm``), so no bytes cross the network and a node of N actors costs one transfer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from bus.messages import SOURCE_LEARNER as LEARNER_ID


@dataclass
class RelayView:
    """What the learner knows of one relay-capable actor (from Hello and heartbeats)."""

    worker_id: str
    endpoint: str
    have_version: int  # newest complete version it can serve
    receiving_version: int  # version it is pulling now (-1 = none)
    host: str = ""  # its Hello's host_id (bus.weights.shm.host_id; "" = unknown: never treated as same-host)


class WeightSources:
    def __init__(self, learner_endpoint: str, fanout: int, ttl_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, learner_host: str = "", shared: bool = False):
        self.learner_endpoint = learner_endpoint
        self.fanout = fanout
        self.learner_host = learner_host
        self.shared = shared
        self.ttl_s = ttl_s
        self.clock = clock
        self._children: dict[tuple[str, int], set[str]] = {}
        self._local: set[str] = set()  # children of a same-host source: tracked (no cycles), not load
        self._since: dict[str, float] = {}  # child -> when it was last assigned

    def choose(self, version: int, requester: str, relays: list[RelayView], host: str = "") -> tuple[str, str]:
        """(endpoint, source_id) for `requester` (on host `host`, a ``bus.weights.shm.host_id()``) to pull `version` from."""
        now = self.clock()
        for child in [c for c, t in self._since.items() if now - t > self.ttl_s]:
            self._forget_child(child)
        self._forget_child(requester)
        # a relay we sent to pull `version` is receiving it from then on: fresher than its heartbeat
        assigned = {c for (_, v), kids in self._children.items() if v == version for c in kids}
        candidates = [(LEARNER_ID, self.learner_endpoint)] + [
            (r.worker_id, r.endpoint) for r in relays
            if r.worker_id != requester and r.endpoint
            and (version in (r.have_version, r.receiving_version) or r.worker_id in assigned)
            and not self._is_descendant(r.worker_id, requester, version)
        ]
        load = {sid: len(self._children.get((sid, version), set()) - self._local) for sid, _ in candidates}
        local = self._same_host(version, host, relays, {sid for sid, _ in candidates})
        if local is not None:
            sid, ep = local
        elif load[LEARNER_ID] < self.fanout:
            sid, ep = candidates[0]
        else:
            open_ = [(load[sid], sid, ep) for sid, ep in candidates[1:] if load[sid] < self.fanout]
            _, sid, ep = min(open_) if open_ else (0, LEARNER_ID, self.learner_endpoint)
        self._children.setdefault((sid, version), set()).add(requester)
        self._since[requester] = now
        if local is not None:
            self._local.add(requester)
        return ep, sid

    def _same_host(self, version: int, host: str, relays: list[RelayView],
                   allowed: set[str]) -> tuple[str, str] | None:
        if not (self.shared and host):
            return None
        if host == self.learner_host:
            return LEARNER_ID, self.learner_endpoint
        local = sorted((r.have_version != version, r.worker_id, r.endpoint) for r in relays
                       if r.host == host and r.worker_id in allowed)
        return (local[0][1], local[0][2]) if local else None

    def done(self, worker_id: str, held_version: int) -> None:
        """A child that holds `held_version` no longer loads its source for it (or older ones)."""
        for (sid, v), kids in list(self._children.items()):
            if v <= held_version:
                kids.discard(worker_id)
                if not kids:
                    del self._children[(sid, v)]

    def dead(self, worker_id: str) -> None:
        """Forget a dead peer as child and as source (its children will ask again after a timeout)."""
        self._forget_child(worker_id)
        for key in [k for k in self._children if k[0] == worker_id]:
            del self._children[key]

    def children(self, source_id: str, version: int) -> set[str]:
        return set(self._children.get((source_id, version), ()))

    def _forget_child(self, worker_id: str) -> None:
        self._since.pop(worker_id, None)
        self._local.discard(worker_id)
        for key, kids in list(self._children.items()):
            kids.discard(worker_id)
            if not kids:
                del self._children[key]

    def _is_descendant(self, candidate: str, ancestor: str, version: int) -> bool:
        """True if `candidate` pulls `version` (directly or not) from `ancestor`: no cycles."""
        frontier, seen = {ancestor}, set()
        while frontier:
            node = frontier.pop()
            seen.add(node)
            kids = self._children.get((node, version), set())
            if candidate in kids:
                return True
            frontier |= kids - seen
        return False
