"""Rewards by kind and by data source, between two optimizer steps (every scored group, kept or not).

For each kind k ("math", "code") and each source s (learner.data source names), over the samples
scored since the last batch:

    reward/<k>/mean, reward/<s>/mean                 mean reward (after the truncation rule, as trained)
    reward/<k>/pass_rate, reward/<s>/pass_rate       share of samples with reward >= SOLVED_REWARD
    reward/<k>/response_len, reward/<s>/response_len mean response tokens
    reward/<k>/samples, reward/<s>/samples           samples scored
    reward/<s>/errors                                samples whose score carries an error
    reward/errors, reward/errors/<code>              the same over all sources, and per error code

An error code is the scorer's error text up to its first ":" (rewards/code.py: `bad_reference`,
`reference_eval`, ...; rewards/math.py: `timeout`, ...), made metric-safe. A kind or source with no
sample in the window is absent from that step's record (not 0).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

from bus.messages import ScoreOut
from learner.advantage import SOLVED_REWARD, shape_reward
from learner.scheduler import Prompt

_FIELDS = ("reward", "solved", "len", "samples", "errors")


def error_code(error: str) -> str:
    """`bad_reference: reference is not JSON` -> "bad_reference"; metric-safe, at most 40 chars."""
    head = error.split(":", 1)[0].strip().lower()
    return re.sub(r"[^a-z0-9_]+", "_", head).strip("_")[:40] or "unknown"


class RewardBreakdown:
    """Accumulates scored groups (`add`) and hands out the window's metrics (`take`)."""

    def __init__(self, zero_truncated_reward: bool = True):
        self.zero_truncated_reward = zero_truncated_reward
        self._sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(_FIELDS, 0.0))
        self._codes: dict[str, int] = defaultdict(int)

    def add(self, prompt: Prompt, samples: Sequence, results: Sequence[ScoreOut]) -> None:
        """One group: its prompt (kind, source), its samples (token_ids, finish_reason) and scores."""
        keys = [prompt.kind] + ([prompt.source] if prompt.source and prompt.source != prompt.kind else [])
        for s, r in zip(samples, results):
            reward = shape_reward(r.reward, s.finish_reason, self.zero_truncated_reward)
            for key in keys:
                acc = self._sums[key]
                acc["reward"] += reward
                acc["solved"] += reward >= SOLVED_REWARD
                acc["len"] += len(s.token_ids)
                acc["samples"] += 1
                acc["errors"] += bool(r.error)
            if r.error:
                self._codes[error_code(r.error)] += 1

    def take(self) -> dict[str, float]:
        """The window's metrics (see the module docstring); starts a new window."""
        out: dict[str, float] = {}
        for key, acc in self._sums.items():
            n = acc["samples"]
            if not n:
                continue
            out[f"reward/{key}/mean"] = acc["reward"] / n
            out[f"reward/{key}/pass_rate"] = acc["solved"] / n
            out[f"reward/{key}/response_len"] = acc["len"] / n
            out[f"reward/{key}/samples"] = n
            if key not in ("math", "code"):
                out[f"reward/{key}/errors"] = acc["errors"]
        out["reward/errors"] = float(sum(self._codes.values()))
        out.update({f"reward/errors/{code}": float(k) for code, k in sorted(self._codes.items())})
        self._sums.clear()
        self._codes.clear()
        return out
