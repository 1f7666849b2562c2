"""Score results checked at the door (learner/dispatch.py): nothing a reward peer sends can make
the learner believe a reward outside the protocol's range, strand a group, or take work it holds."""

from __future__ import annotations

import math

import pytest

from bus.messages import ScoreItem, ScoreOut, ScoreRequest, ScoreResult
from learner.dispatch import ScoreDispatcher, check_results

ITEMS = [ScoreItem("math", "r", "1")] * 3


class Harness:
    def __init__(self, **kw):
        self.sent: list[tuple[str, ScoreRequest]] = []
        self.results: dict = {}
        self.failed: dict = {}
        self.dropped: list[str] = []
        self.d = ScoreDispatcher(self.send, self.results.__setitem__, on_failed=self.failed.__setitem__,
                                 on_drop=lambda w, why: self.dropped.append(w), **kw)

    def send(self, wid: str, msg: ScoreRequest) -> bool:
        self.sent.append((wid, msg))
        return True

    def last(self, wid: str) -> ScoreRequest:
        return [m for w, m in self.sent if w == wid][-1]


def good(n: int = 3) -> list[ScoreOut]:
    return [ScoreOut(1.0)] * n


@pytest.mark.parametrize("results,why", [
    ([ScoreOut(math.nan)] * 3, "outside"),
    ([ScoreOut(math.inf)] * 3, "outside"),
    ([ScoreOut(1.0), ScoreOut(-0.5), ScoreOut(0.0)], "item 1"),
    ([ScoreOut(2.0)] * 3, "outside"),
    (good(2), "2 results for 3"),
    (good(4), "4 results for 3"),
])
def test_check_results_refuses(results, why):
    assert why in check_results(results, 3)


def test_check_results_accepts_the_range():
    assert check_results([ScoreOut(0.0), ScoreOut(1.0), ScoreOut(0.5)], 3) == ""


def test_a_nan_result_goes_to_another_worker_and_only_the_good_one_counts():
    """The landed code removed the group and then raised in Scheduler.scored: it stayed 'scoring'
    forever. Now nothing is removed on a bad result; the unit is reassigned."""
    h = Harness()
    h.d.ready("rogue", 10, 0.0)
    h.d.submit("g1", ITEMS, 0.0)
    rid = h.last("rogue").request_id
    h.d.ready("honest", 3, 0.0)
    assert not h.d.result("rogue", ScoreResult(rid, [ScoreOut(math.nan)] * 3), 1.0)
    assert h.results == {} and h.d.metrics["bus/bad_scores"] == 1
    req = h.last("honest")  # reassigned, and not to the worker that sent the bad result
    assert req.items == ITEMS
    assert h.d.result("honest", ScoreResult(req.request_id, good()), 2.0)
    assert h.results == {"g1": good()} and h.d.outstanding == 0 and h.d.queued == 0
    # latency of the accepted result only: sent to "honest" at 1.0, answered at 2.0
    assert h.d.metrics["bus/score_results"] == 1 and h.d.metrics["bus/score_s"] == pytest.approx(1.0)


def test_a_result_from_a_peer_that_does_not_hold_the_request_is_ignored():
    h = Harness()
    h.d.ready("w1", 10, 0.0)
    h.d.submit("g1", ITEMS, 0.0)
    rid = h.last("w1").request_id
    assert not h.d.result("intruder", ScoreResult(rid, good()), 1.0)
    assert h.results == {} and h.d.outstanding == 1 and h.d.metrics["bus/late_results"] == 1
    assert h.d.result("w1", ScoreResult(rid, good()), 1.0)


def test_a_repeat_offender_is_dropped_and_its_work_reassigned():
    h = Harness(max_bad=3)
    h.d.ready("rogue", 100, 0.0)
    for k in range(5):
        h.d.submit(f"g{k}", ITEMS, 0.0)
    rids = [m.request_id for w, m in h.sent if w == "rogue"]
    assert len(rids) == 5
    for rid in rids[:3]:
        h.d.result("rogue", ScoreResult(rid, [ScoreOut(7.0)] * 3), 1.0)
    assert h.dropped == ["rogue"] and h.d.metrics["bus/dropped_workers"] == 1
    assert "rogue" not in h.d.workers()
    h.d.ready("rogue", 100, 2.0)  # its credits are not taken any more
    assert "rogue" not in h.d.workers()
    assert h.d.queued == 5 and h.d.outstanding == 0  # all five back in the queue, none lost
    h.d.ready("honest", 100, 3.0)
    for w, m in [x for x in h.sent if x[0] == "honest"]:
        h.d.result("honest", ScoreResult(m.request_id, good()), 4.0)
    assert sorted(h.results) == [f"g{k}" for k in range(5)]


def test_a_unit_nobody_scores_fails_instead_of_scoring_zero():
    h = Harness(max_attempts=2, max_bad=100)
    h.d.ready("w", 10, 0.0)
    h.d.submit("g1", ITEMS, 0.0)
    for t in (1.0, 2.0):
        h.d.result("w", ScoreResult(h.last("w").request_id, good(1)), t)
    assert h.results == {} and list(h.failed) == ["g1"] and "unscored" in h.failed["g1"]


def test_a_unit_a_worker_sat_on_goes_to_another_worker():
    """A peer that takes work and never answers (it announced many credits) loses the unit at the
    timeout, and the unit is not handed back to it while another worker can take it."""
    h = Harness(timeout_s=10.0)
    h.d.ready("hoarder", 1000, 0.0)
    h.d.submit("g1", ITEMS, 0.0)
    h.d.ready("honest", 3, 1.0)
    assert [w for w, _ in h.sent] == ["hoarder"]
    h.d.tick(11.0)
    assert [w for w, _ in h.sent] == ["hoarder", "honest"]
    assert h.d.result("honest", ScoreResult(h.last("honest").request_id, good()), 12.0)
