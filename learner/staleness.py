"""The staleness rule, in one place (docs/staleness.md).

A group generated with weights version w and trained by the optimizer step that turns version v
into v + 1 has staleness v - w. With the bound η (`learner.max_staleness`, changeable while the run
goes on; η = 0 is synchronous on-policy training)::

    admissible(v, w, η)   ⇔   v - w ≤ η
    min_weights(v, η)     =   max(0, v - η)       the oldest weights a group trained at v may come from
    last_trainable(w, η)  =   w + η               the newest version a group from w may train at

Every place that enforces the rule calls these functions:

- **grant** (`Scheduler.grant`): an actor must hold w ≥ min_weights(v, η) to get a lease; it may
  take only the groups that train by last_trainable(w, η); the lease's `min_version` is
  min_weights(t, η) for the version t its last group trains at.
- **submit** (`Scheduler._check_group`): every group must carry `fresh_enough(w, lease.min_version)`.
- **consumption** (`GroupBuffer.purge_stale`): a buffered group that is no longer admissible at the
  version being trained is dropped and its prompt requeued. This is the guarantee: η may have
  shrunk since the lease, and the zero-advantage filter reorders what reaches the buffer.
- **the actor** (`actors/actor.py`): never generates with weights that are not
  `fresh_enough(held, lease.min_version)`; it waits for the sync to bring them first.
- **in-flight updates** (`actor.update_mode = in_flight`): a sample's tokens may come from several
  versions (`Sample.versions`). Its group's w is the oldest of them, so every rule above, stated
  for w, bounds every token; `spans_ok` checks at submit that no token claims weights older than
  w or newer than any the learner published.

Pure functions of integers, tested at and around the bound in
tests/unit/learner/test_staleness_rule.py; the hypothesis state machine
(tests/unit/learner/test_admission_machine.py) drives the scheduler through every path above.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any


def staleness(version: int, weight_version: int) -> int:
    """v - w: how many optimizer steps the weights that generated a group are behind."""
    return version - weight_version


def admissible(version: int, weight_version: int, eta: int) -> bool:
    """May a group generated with `weight_version` be trained at `version`?"""
    return staleness(version, weight_version) <= eta


def min_weights(version: int, eta: int) -> int:
    """The oldest weights version a group trained at `version` may come from (never below 0)."""
    return max(0, version - eta)


def last_trainable(weight_version: int, eta: int) -> int:
    """The newest version at which a group generated with `weight_version` may still be trained."""
    return weight_version + eta


def fresh_enough(weight_version: int, min_version: int) -> bool:
    """Do weights `weight_version` meet a lease's `min_version`?"""
    return weight_version >= min_version


def check_eta(eta: Any) -> int:
    """η as an int, or ValueError saying what is allowed (a bool is not an integer here)."""
    if isinstance(eta, bool) or not isinstance(eta, Integral) or eta < 0:
        raise ValueError(f"max_staleness must be an integer >= 0, got {eta!r}")
    return int(eta)


def spans_ok(spans: list[tuple[int, int]], n_tokens: int, weight_version: int, newest: int) -> bool:
    """Are a sample's (version, start) spans well formed for a group of `weight_version`: starts
    strictly increasing from 0 and inside the sample, versions strictly increasing, none below the
    group's (the oldest, which staleness counts from) and none above `newest` published? An empty
    list (one version: the group's) is fine."""
    if not spans:
        return True
    versions, starts = [v for v, _ in spans], [s for _, s in spans]
    return (starts[0] == 0 and starts[-1] < max(n_tokens, 1)
            and all(a < b for a, b in zip(starts, starts[1:]))
            and all(a < b for a, b in zip(versions, versions[1:]))
            and versions[0] >= weight_version and versions[-1] <= newest)
