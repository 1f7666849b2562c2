"""Scores already known: a bounded memo of math verdicts, so a response scored once is not scored again.

GRPO samples n responses per prompt, and once a model has learned a short-answer task most of a
group's responses are the same string (the embedded addition task: " \\boxed{7}" eight times), and
the same prompt comes back every dataset pass. A math verdict is a pure function of (response,
reference) (`rewards/math.py`): the same pair always gets the same reward, so it is kept and
reused. Code verdicts are not memoised (a program's run depends on time and the machine), nor
is any result with an error (a timeout, a crash: the next try may succeed).

Keys are a 16-byte BLAKE2b digest of kind, reference and response, so memory stays
`max_items` x ~150 bytes whatever the responses' length (long chains of thought are rarely repeated
anyway, and cost one hash each). Least recently used entries go first. A pair that is already
being scored is not sent twice: later askers share the first one's future (`pending`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable

from bus.messages import ScoreItem, ScoreOut

MEMO_KINDS = frozenset({"math"})


def memo_key(item: ScoreItem) -> bytes | None:
    """The item's key, or None for a kind whose verdict is not reproducible (code)."""
    if item.kind not in MEMO_KINDS:
        return None
    h = hashlib.blake2b(digest_size=16)
    for part in (item.kind, item.reference, item.response):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


class ScoreMemo:
    """`score(item, submit) -> Future[ScoreOut]`: a known verdict at once, else the future of the
    one scoring of that pair in flight, else `submit(item)`'s (whose clean result is kept).
    Thread-safe. `max_items` = 0 turns it off."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._known: OrderedDict[bytes, ScoreOut] = OrderedDict()
        self._pending: dict[bytes, Future] = {}
        self._lock = threading.Lock()
        self.hits = self.shared = self.misses = 0

    def score(self, item: ScoreItem, submit: Callable[[ScoreItem], Future]) -> Future:
        key = memo_key(item) if self.max_items else None
        if key is None:
            return submit(item)
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self._known.move_to_end(key)
                self.hits += 1
                done: Future = Future()
                done.set_result(known)
                return done
            if key in self._pending:
                self.shared += 1
                return self._pending[key]
            self.misses += 1
            fut = submit(item)
            self._pending[key] = fut
        fut.add_done_callback(lambda f: self._settle(key, f))
        return fut

    def _settle(self, key: bytes, fut: Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            out = None if fut.cancelled() or fut.exception() is not None else fut.result()
            if out is None or out.error:
                return
            self._known[key] = out
            while len(self._known) > self.max_items:
                self._known.popitem(last=False)

    def metrics(self) -> dict[str, float]:
        """reward/memo_hits (known verdicts reused), reward/memo_shared (joined a scoring in flight),
        reward/memo_misses (sent to the pool)."""
        return {"reward/memo_hits": float(self.hits), "reward/memo_shared": float(self.shared),
                "reward/memo_misses": float(self.misses)}
