"""Dataset order: a seeded permutation per dataset pass, with a cursor; requeued prompts first.

Pass p uses numpy default_rng([seed, p]).permutation, so the order is a pure function of the seed
and the pass number, and a checkpoint only needs (pass, cursor, requeue). Prompts busy when their
turn comes are skipped for that pass (an earlier occurrence is still being worked on).
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Callable, Sequence

import numpy as np


class DatasetOrder:
    """Seeded per-pass permutation with a cursor; requeued prompt ids are served first."""

    def __init__(self, prompt_ids: Sequence[str], seed: int):
        self.ids = list(prompt_ids)
        self.seed = seed
        self.pass_ = 0
        self.cursor = 0
        self.requeue: deque[str] = deque()
        self._perm = self._permutation()
        self._fingerprint = hashlib.sha1("\n".join(self.ids).encode()).hexdigest()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.pass_]).permutation(len(self.ids))

    def next(self, blocked: Callable[[str], bool], n_blocked: int) -> str | None:
        """The next prompt id that is not `blocked`, or None when all `n_blocked` of them are."""
        while self.requeue:
            pid = self.requeue.popleft()
            if not blocked(pid):
                return pid
        if n_blocked >= len(self.ids):
            return None
        while True:  # ends within two passes: some prompt is unblocked
            if self.cursor >= len(self.ids):
                self.pass_, self.cursor = self.pass_ + 1, 0
                self._perm = self._permutation()
            pid = self.ids[self._perm[self.cursor]]
            self.cursor += 1
            if not blocked(pid):
                return pid

    def state_dict(self) -> dict:
        return {"pass": self.pass_, "cursor": self.cursor, "requeue": list(self.requeue),
                "fingerprint": self._fingerprint}

    def load_state_dict(self, d: dict) -> None:
        if d["fingerprint"] != self._fingerprint:
            raise ValueError("scheduler state was saved with a different dataset (prompt ids differ)")
        self.pass_, self.cursor = int(d["pass"]), int(d["cursor"])
        self.requeue = deque(d["requeue"])
        self._perm = self._permutation()
