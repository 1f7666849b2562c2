"""Mixture order: prompts drawn from several sources by weight, deterministic given the seed.

Draw i (counting every draw that reaches the sources; requeued prompts are served first, as in
`DatasetOrder`) takes u_i, the (i mod 1024)-th number of default_rng([seed, MIX_STREAM, i // 1024]),
and picks the source whose slice of the cumulative weights holds u_i · Σw; so P(source s) = w_s / Σw
and the sequence of sources is a pure function of the seed. Within a source, prompts follow that
source's own seeded permutation per pass (default_rng([seed, 1 + source index, pass])) with a
cursor, as `DatasetOrder` does for one data set: a small source is cycled through more often than a
large one of the same weight. A source whose prompts are all blocked (busy or dropped) is left out
of that draw, and u_i is read against the remaining sources' weights.

State (`state_dict`, JSON): draws, each source's pass and cursor, the requeue, and a fingerprint of
the sources, their prompt ids and weights (a checkpoint of another mixture is refused).
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Callable, Mapping, Sequence

import numpy as np

from learner.order import DatasetOrder, PassCursor

MIX_STREAM = 0x6D6978  # "mix": keeps the draws' stream apart from the per-source permutations
BLOCK = 1024


class _SourceCursor(PassCursor):
    """One source's seeded per-pass permutation with a cursor (key [seed, 1 + its index])."""

    def __init__(self, ids: list[str], seed: int, index: int):
        super().__init__(ids, [seed, 1 + index])

    def next(self, blocked: Callable[[str], bool]) -> str | None:
        """The next unblocked prompt, or None after one full cycle of blocked ones."""
        for _ in range(len(self.ids)):
            pid = self.advance()
            if not blocked(pid):
                return pid
        return None


class MixtureOrder:
    """Weighted draws over sources (see the module docstring); the same interface as DatasetOrder:
    `next(blocked, n_blocked)`, a `requeue` deque served first, `state_dict` / `load_state_dict`."""

    def __init__(self, source_of: Mapping[str, str], weights: Mapping[str, float], seed: int):
        present = set(source_of.values())
        names = [s for s in weights if s in present]  # sources with prompts
        unknown = sorted(present - set(weights))
        if unknown:
            raise ValueError(f"prompts of sources without a weight: {unknown}")
        if not names:
            raise ValueError("no source has prompts")
        if any(not (weights[s] > 0) for s in names):
            raise ValueError(f"weights must be > 0, got {dict(weights)}")
        self.names = names
        self.weights = np.array([float(weights[s]) for s in names])
        self.seed = seed
        self.total = len(source_of)
        by_source: dict[str, list[str]] = {s: [] for s in names}
        for pid, s in source_of.items():
            by_source[s].append(pid)
        self.cursors = [_SourceCursor(by_source[s], seed, i) for i, s in enumerate(names)]
        self.draws = 0
        self.requeue: deque[str] = deque()
        self._block_index, self._block = -1, np.empty(0)
        text = "\n".join(f"{s}\t{weights[s]!r}\t" + ",".join(by_source[s]) for s in names)
        self._fingerprint = hashlib.sha1(text.encode()).hexdigest()

    def _u(self, i: int) -> float:
        b = i // BLOCK
        if b != self._block_index:
            self._block = np.random.default_rng([self.seed, MIX_STREAM, b]).random(BLOCK)
            self._block_index = b
        return float(self._block[i % BLOCK])

    def pick_source(self, u: float, allowed: Sequence[bool]) -> int:
        """The source whose share of the allowed sources' cumulative weight holds u."""
        w = np.where(allowed, self.weights, 0.0)
        edges = np.cumsum(w)
        k = int(np.searchsorted(edges, u * edges[-1], side="right"))
        k = min(k, len(w) - 1)
        while not allowed[k]:  # u * total landed exactly on an edge before a disallowed source
            k -= 1
        return k

    def next(self, blocked: Callable[[str], bool], n_blocked: int) -> str | None:
        """The next prompt id that is not `blocked`, or None when all `n_blocked` of them are."""
        while self.requeue:
            pid = self.requeue.popleft()
            if not blocked(pid):
                return pid
        if n_blocked >= self.total:
            return None
        u = self._u(self.draws)
        self.draws += 1
        allowed = [True] * len(self.cursors)
        while any(allowed):
            k = self.pick_source(u, allowed)
            pid = self.cursors[k].next(blocked)
            if pid is not None:
                return pid
            allowed[k] = False  # every prompt of this source is blocked now
        return None

    def state_dict(self) -> dict:
        return {"draws": self.draws, "sources": {name: [c.pass_, c.cursor] for name, c in zip(self.names, self.cursors)},
                "requeue": list(self.requeue), "fingerprint": self._fingerprint}

    def load_state_dict(self, d: dict) -> None:
        if d.get("fingerprint") != self._fingerprint:
            raise ValueError("scheduler state was saved with a different data mixture (sources, weights or prompt ids differ)")
        self.draws = int(d["draws"])
        for name, c in zip(self.names, self.cursors):
            c.load(*d["sources"][name])
        self.requeue = deque(d["requeue"])


def make_order(prompt_sources: Mapping[str, str], weights: Mapping[str, float] | None, seed: int):
    """DatasetOrder for one source (or no weights: the order of a single data set, unchanged), else a
    MixtureOrder. `prompt_sources`: prompt id -> source name, in dataset order."""
    if not weights or len({s for s in prompt_sources.values()}) <= 1:
        return DatasetOrder(list(prompt_sources), seed)
    return MixtureOrder(prompt_sources, weights, seed)
