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


class PassCursor:
    """Ids in a seeded permutation per pass, with a cursor: pass p is
    default_rng([*key, p]).permutation(len(ids)), so (pass, cursor) is the whole state."""

    def __init__(self, ids: Sequence[str], key: Sequence[int]):
        self.ids, self.key = list(ids), list(key)
        self.pass_ = self.cursor = 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([*self.key, self.pass_]).permutation(len(self.ids))

    def advance(self) -> str:
        """The id under the cursor, moving on (to the next pass's permutation after the last)."""
        if self.cursor >= len(self.ids):
            self.pass_, self.cursor = self.pass_ + 1, 0
            self._perm = self._permutation()
        pid = self.ids[self._perm[self.cursor]]
        self.cursor += 1
        return pid

    def load(self, pass_: int, cursor: int) -> None:
        self.pass_, self.cursor = int(pass_), int(cursor)
        self._perm = self._permutation()


class DatasetOrder:
    """Seeded per-pass permutation with a cursor; requeued prompt ids are served first."""

    def __init__(self, prompt_ids: Sequence[str], seed: int):
        self.ids = list(prompt_ids)
        self.seed = seed
        self.requeue: deque[str] = deque()
        self._cursor = PassCursor(self.ids, [seed])
        self._fingerprint = hashlib.sha1("\n".join(self.ids).encode()).hexdigest()

    def next(self, blocked: Callable[[str], bool], n_blocked: int) -> str | None:
        """The next prompt id that is not `blocked`, or None when all `n_blocked` of them are."""
        while self.requeue:
            pid = self.requeue.popleft()
            if not blocked(pid):
                return pid
        if n_blocked >= len(self.ids):
            return None
        while True:  # ends within two passes: some prompt is unblocked
            pid = self._cursor.advance()
            if not blocked(pid):
                return pid

    def state_dict(self) -> dict:
        return {"pass": self._cursor.pass_, "cursor": self._cursor.cursor, "requeue": list(self.requeue),
                "fingerprint": self._fingerprint}

    def load_state_dict(self, d: dict) -> None:
        if d["fingerprint"] != self._fingerprint:
            raise ValueError("scheduler state was saved with a different dataset (prompt ids differ)")
        self._cursor.load(d["pass"], d["cursor"])
        self.requeue = deque(d["requeue"])
