"""Elastic fleet end to end: actors and reward workers join and vanish mid-run, and the run still
trains every step with nothing lost or trained twice.

    learner + reward rw0, rw1 + actors actor0, actor1        (each its own `or1` process)
    step >= 2:   actor2 joins     → pulls the current weights, its submissions are accepted
    then:        actor0 SIGKILL   → the learner declares it dead, requeues its leases
                 rw0 SIGKILL      → its score requests go to rw1
    the run completes all its steps; the ledger invariants hold (e2e_support.check_ledger).

Shared memory is off here and each source serves one child per version: every process shares
this host, so with shared memory on each version would be mapped from the learner's /dev/shm copy,
and the TCP relay tree (and its failover when a relaying actor is killed) would go untested
between real processes.
"""

from __future__ import annotations

import pytest

from e2e_support import (
    STARTUP_S, JsonlTail, check_ledger, last_step, ledger, log_events, make_fleet, metrics, open_leases,
    small_config, wait_step,
)
from procs import wait_for

pytestmark = pytest.mark.slow
B, ETA = 4, 1
# ~0.3-0.5 s a step here: long enough for a third actor to start (~10 s) and get weights mid-run,
# which can take another ~10 s while versions come faster than heartbeats (see the e2e report).
STEPS = 120
MIN_STEPS_AFTER_KILLS = 5


def test_actors_and_reward_workers_join_and_die_mid_run(tmp_path, tiny_model_dir):
    # lr 2e-5: at 1e-4 the tiny model answers nearly every prompt right by step ~80, and rejection
    # sampling then makes the last steps 1-2 s each; this test is about the fleet, not learning
    cfg, path = small_config(tmp_path, tiny_model_dir, steps=STEPS, eta=ETA, batch=B,
                             extra=("bus.shared_memory=false", "bus.relay_fanout=1", "learner.optim.lr=2e-5"))
    fleet = make_fleet(tmp_path, cfg, path)
    try:
        fleet.start_run(reward_workers=2)
        wait_step(fleet, 2, STARTUP_S)

        fleet.actor("actor2")
        accepted = lambda: _accepted_from(ledger(fleet), "actor2")
        wait_for(lambda: accepted() >= B or fleet.procs["learner"].poll() is not None, 180,
                 what="accepted submissions from actor2")
        welcome = log_events(fleet.log("actor2"), "actor.welcome")
        loaded = log_events(fleet.log("actor2"), "weights.loaded")
        assert welcome and loaded, fleet.tail("actor2")
        assert loaded[0]["version"] >= welcome[0]["version"] >= 2, (welcome[0], loaded[0])
        pulled = log_events(fleet.log("actor2"), "weights.pulled")
        assert pulled and not any(e["shared"] for e in pulled), pulled[:3]  # over TCP: shared memory is off
        # The learner's WeightSource answers: actor2 is sent to the learner or to a relay peer, and
        # with one child per source, most versions reach someone through a relay
        answers = log_events(fleet.log("learner"), "weights.source")
        assert {e["source"] for e in answers if e["peer"] == "actor2"} <= {"learner", "actor0", "actor1"}
        assert [e for e in answers if e["peer"] == "actor2"], "actor2 never asked where to pull"
        assert any(e["source"] != "learner" for e in answers), "no version went through a relay"

        step_at_kill = last_step(fleet)
        assert step_at_kill <= STEPS - 2 * MIN_STEPS_AFTER_KILLS, "the run nearly ended before the kills"
        # Kill actor0 while it holds a lease (generation takes ~0.1 s a lease: poll the ledger fast)
        tail = JsonlTail(fleet.run_dir / "ledger.jsonl")
        held = wait_for(lambda: open_leases(tail.poll(), "actor0"), 60, interval=0.01,
                        what="actor0 holding a lease")
        fleet.kill("actor0")
        fleet.kill("rw0")
        wait_for(lambda: _gone(fleet, "actor.gone", "actor0") and _gone(fleet, "reward.gone", "rw0"), 60,
                 what="the learner declaring actor0 and rw0 dead")
        assert last_step(fleet) <= STEPS - MIN_STEPS_AFTER_KILLS, "no steps left after the kills"

        wait_step(fleet, STEPS, 600, watch=("learner",))
        assert fleet.wait_exit("learner", 120) == 0, fleet.tail("learner")
        for a in ("actor1", "actor2"):
            assert fleet.wait_exit(a, 60) == 0, fleet.tail(a)
    finally:
        fleet.close()

    rows = metrics(fleet)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(sum(r["staleness/hist"]) == B and r["staleness/max"] <= ETA for r in rows)
    assert max(r["actor/count"] for r in rows) == 3

    events = ledger(fleet)
    summary = check_ledger(events, B, STEPS, eta_max=ETA)
    assert summary.accepted_by_actor["actor2"] >= B
    assert summary.accepted_by_actor["actor1"] > 0
    # actor0's leases were requeued as dead (and only actor0's), never left dangling
    dead = [e for e in events if e["event"] == "end" and e.get("reason") == "actor_dead"]
    assert all(summary.grants[(e["epoch"], e["lease_id"], e["prompt_id"])] == "actor0" for e in dead)
    # the lease it held when killed was either submitted in the last instant or requeued as dead
    submitted = {e["lease_id"] for e in events if e["event"] == "lease_end" and e["reason"] == "completed"}
    assert all(lid in submitted or lid in {e["lease_id"] for e in dead} for lid in held), (held, dead)
    assert not [k for k in summary.open_keys if summary.grants[k] == "actor0"], "actor0's leases dangle"
    print(f"elastic: {STEPS} steps; actor2 joined at step 2 and had "
          f"{summary.accepted_by_actor['actor2']} groups accepted; kills at step {step_at_kill}; "
          f"held {sorted(held)}, requeued as dead: {len(dead)}; "
          f"score reassigned: {max(r.get('bus/score_reassigned', 0) for r in rows)}; actor2 failed weight pulls: "
          f"{len(log_events(fleet.log('actor2'), 'weights.pull_failed'))}")


def _accepted_from(events: list[dict], actor: str) -> int:
    leases = {e["lease_id"] for e in events if e["event"] == "lease" and e["actor"] == actor}
    return sum(1 for e in events if e["event"] == "accept" and e["lease_id"] in leases)


def _gone(fleet, event: str, peer: str) -> bool:
    return any(e.get("peer") == peer for e in log_events(fleet.log("learner"), event))
