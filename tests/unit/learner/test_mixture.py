"""learner/mixture.py: weighted draws over sources, deterministic given the seed; and the scheduler
granting leases from a mixture (learner/scheduler.py with source weights)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from common.config import SamplingConfig, StageConfig
from learner.mixture import MixtureOrder, make_order
from learner.order import DatasetOrder
from learner.scheduler import Prompt, Scheduler


def sources(n_a: int = 100, n_b: int = 5) -> dict[str, str]:
    return {**{f"a{i}": "A" for i in range(n_a)}, **{f"b{i}": "B" for i in range(n_b)}}


def draw(order, k: int, blocked=lambda pid: False) -> list[str]:
    return [order.next(blocked, 0) for _ in range(k)]


def test_draws_follow_the_weights():
    """4000 draws at weights 3:1: the share of A is 0.75 ± 4 sd (sd = sqrt(.75 * .25 / 4000) = 0.0068),
    whatever the sources' sizes (A has 100 prompts, B 5)."""
    got = draw(MixtureOrder(sources(), {"A": 3.0, "B": 1.0}, seed=0), 4000)
    share = sum(pid.startswith("a") for pid in got) / len(got)
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 4000), share
    # equal weights: 1/2 each, though A is 20 times larger
    got = draw(MixtureOrder(sources(), {"A": 1.0, "B": 1.0}, seed=3), 4000)
    share = sum(pid.startswith("a") for pid in got) / len(got)
    assert abs(share - 0.5) < 4 * np.sqrt(0.25 / 4000), share


def test_deterministic_given_the_seed_and_different_across_seeds():
    w = {"A": 2.0, "B": 1.0}
    assert draw(MixtureOrder(sources(), w, seed=7), 300) == draw(MixtureOrder(sources(), w, seed=7), 300)
    assert draw(MixtureOrder(sources(), w, seed=7), 300) != draw(MixtureOrder(sources(), w, seed=8), 300)


def test_each_source_cycles_through_its_own_permutation():
    order = MixtureOrder(sources(), {"A": 1.0, "B": 1.0}, seed=1)
    bs = [pid for pid in draw(order, 400) if pid.startswith("b")]
    for i in range(0, len(bs) - 4, 5):  # every pass of B holds each of its 5 prompts once
        assert sorted(bs[i:i + 5]) == [f"b{j}" for j in range(5)], bs[i:i + 5]
    assert len({tuple(bs[i:i + 5]) for i in range(0, 50, 5)}) > 1  # reshuffled each pass


def test_blocked_source_is_left_out_and_requeue_comes_first():
    order = MixtureOrder(sources(), {"A": 1.0, "B": 100.0}, seed=0)
    got = draw(order, 50, blocked=lambda pid: pid.startswith("b"))
    assert all(pid.startswith("a") for pid in got)
    order.requeue.extend(["b3", "a7"])
    assert order.next(lambda pid: False, 0) == "b3" and order.next(lambda pid: False, 0) == "a7"
    assert order.next(lambda pid: True, 105) is None  # everything blocked


def test_state_round_trip_continues_the_same_sequence():
    w = {"A": 1.0, "B": 2.0}
    a = MixtureOrder(sources(), w, seed=5)
    draw(a, 1500)  # past the first block of 1024 draws
    a.requeue.append("a1")
    state = a.state_dict()
    b = MixtureOrder(sources(), w, seed=5)
    b.load_state_dict(state)
    assert draw(a, 200) == draw(b, 200)
    with pytest.raises(ValueError, match="different data mixture"):
        MixtureOrder(sources(), {"A": 1.0, "B": 3.0}, seed=5).load_state_dict(state)


def test_make_order_keeps_one_source_on_the_dataset_order():
    assert isinstance(make_order({"x": "A", "y": "A"}, {"A": 1.0}, 0), DatasetOrder)
    assert isinstance(make_order({"x": "A", "y": "B"}, None, 0), DatasetOrder)
    assert isinstance(make_order({"x": "A", "y": "B"}, {"A": 1.0, "B": 1.0}, 0), MixtureOrder)
    with pytest.raises(ValueError, match="without a weight"):
        MixtureOrder({"x": "A", "y": "C"}, {"A": 1.0}, 0)


def test_scheduler_leases_follow_the_mixture():
    """A scheduler over two sources (weights 3:1) hands out prompts in that proportion: leases are
    released at once so every grant is a fresh draw."""
    prompts = [Prompt(pid, np.array([1, 2], np.int32), "math" if s == "A" else "code", "1", s)
               for pid, s in sources(40, 40).items()]
    stage = StageConfig(steps=10, max_response_tokens=4, prompts_per_batch=4, group_size=2)
    sched = Scheduler(prompts, [stage], SamplingConfig(), epoch=0, lease_groups=4, seed=2,
                      source_weights={"A": 3.0, "B": 1.0})
    kinds: Counter = Counter()
    for t in range(500):
        lease = sched.grant("actor", 4, 0, now=float(t))
        kinds.update(sched._prompts[p.prompt_id].source for p in lease.prompts)
        sched.release("actor", [lease.lease_id])
        sched._order.requeue.clear()  # released prompts would come first: draw fresh ones instead
    share = kinds["A"] / sum(kinds.values())
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / sum(kinds.values())), kinds
