"""Learner crash and resume end to end.

    learner + reward rw0 + actors actor0, actor1 (real processes), checkpoint every 3 steps
    checkpoints/step_000003/COMPLETE appears → SIGKILL the learner (mid-run, no goodbye)
    `or1 learner --resume` on the same ports and run directory → epoch 1, version = checkpoint's
    the actors and the reward worker were never restarted: they reconnect on their own (Hello again,
    Welcome epoch 1), lease and submit in epoch 1, and training goes on to the last step.

The resumed steps continue from the checkpoint (metrics steps c+1 … S), the checkpoint's in-flight
groups come back as "restart" requeues served first, and epoch 1's ledger satisfies every
invariant of e2e_support.check_ledger.
"""

from __future__ import annotations

import pytest

from e2e_support import (
    STARTUP_S, check_ledger, ledger, log_events, make_fleet, metrics, small_config,
)
from learner import checkpoint as ckpt
from procs import wait_for

pytestmark = pytest.mark.slow
B, ETA, STEPS, EVERY = 4, 1, 24, 3


def test_learner_sigkill_and_resume(tmp_path, tiny_model_dir):
    cfg, path = small_config(tmp_path, tiny_model_dir, steps=STEPS, eta=ETA, batch=B,
                             extra=(f"learner.checkpoint_every={EVERY}", "learner.keep_checkpoints=3"))
    fleet = make_fleet(tmp_path, cfg, path)
    first = ckpt.checkpoint_dir(fleet.run_dir, EVERY)
    try:
        fleet.learner()
        fleet.actor("actor0")
        fleet.actor("actor1")
        # No step can finish before a reward worker scores: start it once both actors hold weights,
        # so a slow-starting actor cannot leave the other to finish the run before the kill.
        wait_for(lambda: min(held(fleet).values()) >= 0, STARTUP_S, interval=0.1,
                 what="both actors holding version 0")
        fleet.reward("rw0")
        # Kill a step or two past the checkpoint, so an actor holds weights the resumed learner
        # never made (it must drop them) and the ledger has epoch-0 work that epoch 1 redoes. Not
        # "both actors": on a loaded machine one actor may do all the work while the other waits on
        # admission holding old weights, and the run would end before the kill.
        past = lambda: max(held(fleet).values()) > EVERY or last_step(fleet) > EVERY + 1  # noqa: E731
        wait_for(lambda: (ckpt.is_complete(first) and past()) or fleet.procs["learner"].poll() is not None,
                 STARTUP_S, interval=0.05,
                 what=f"{first}/COMPLETE and an actor holding weights newer than it")
        fleet.kill("learner")
        held_at_kill = held(fleet)
        steps_before = [r["step"] for r in metrics(fleet)]
        latest = ckpt.latest_checkpoint(fleet.run_dir)
        assert latest is not None and steps_before, fleet.tail("learner")
        c = ckpt.checkpoint_step(latest)
        assert c % EVERY == 0 and c < STEPS - 5, f"killed too late: checkpoint {c}, steps {steps_before}"
        saved = ckpt.read_state(latest)["client_state"]

        fleet.learner("--resume", name="learner2")  # same config file: same ports, same run dir
        wait_step_after(fleet, steps_before, STEPS)
        assert fleet.wait_exit("learner2", 120) == 0, fleet.tail("learner2")
        for name in ("actor0", "actor1"):  # never restarted: one process each, the whole run
            assert fleet.wait_exit(name, 60) == 0, fleet.tail(name)
    finally:
        fleet.close()

    resumed = log_events(fleet.log("learner2"), "resumed")
    assert len(resumed) == 1 and resumed[0]["version"] == c and resumed[0]["epoch"] == 1, resumed
    rows = [r["step"] for r in metrics(fleet)]
    assert rows[:len(steps_before)] == list(range(1, len(steps_before) + 1))
    assert rows[len(steps_before):] == list(range(c + 1, STEPS + 1)), rows

    events = ledger(fleet)
    epoch1 = [e for e in events if e["epoch"] == 1]
    restart = [e for e in epoch1 if e["event"] == "end" and e.get("reason") == "restart"]
    in_flight = sorted(map(tuple, saved["scheduler"]["in_flight"]))
    assert sorted((e["lease_id"], e["prompt_id"]) for e in restart) == in_flight
    summary = check_ledger(epoch1, B, STEPS, eta_max=ETA, first_step=c,
                           requeue=saved["scheduler"]["order"]["requeue"])
    assert summary.accepted_by_actor["actor0"] > 0 and summary.accepted_by_actor["actor1"] > 0
    assert {e["version"] for e in epoch1 if e["event"] == "step"} == set(range(c + 1, STEPS + 1))
    # the reward worker said Hello again and was welcomed into epoch 1
    assert any(e.get("epoch") == 1 for e in log_events(fleet.log("rw0"), "welcome")), fleet.tail("rw0")
    # Every actor saw the new epoch and dropped the weights it held: they came from a history the
    # resumed learner no longer has (versions after c are retrained with other weights).
    ahead = {n: log_events(fleet.log(n), "actor.new_epoch") for n in ("actor0", "actor1")}
    assert all(evs and evs[0]["epoch"] == 1 and evs[0]["learner"] >= c for evs in ahead.values()), ahead
    print(f"restart: killed after step {steps_before[-1]}, resumed from checkpoint {c}; "
          f"restart requeues {len(restart)}; epoch-1 accepts {dict(summary.accepted_by_actor)}; "
          f"held at kill {held_at_kill}; actors that dropped their weights on the new epoch: "
          f"{[n for n, evs in ahead.items() if evs]}")


def held(fleet) -> dict[str, int]:
    """The weights version each actor last loaded, from its log."""
    out = {}
    for name in ("actor0", "actor1"):
        loaded = log_events(fleet.log(name), "weights.loaded")
        out[name] = loaded[-1]["version"] if loaded else -1
    return out


def last_step(fleet) -> int:
    rows = metrics(fleet)
    return rows[-1]["step"] if rows else 0


def wait_step_after(fleet, steps_before: list[int], last: int) -> None:
    """Wait for the resumed learner's metrics rows (appended after the killed one's) to reach `last`."""
    def done() -> bool:
        if fleet.procs["learner2"].poll() is not None and len(metrics(fleet)) - len(steps_before) < 1:
            raise AssertionError(f"resumed learner exited early:\n{fleet.tails()}")
        rows = metrics(fleet)[len(steps_before):]
        return bool(rows) and rows[-1]["step"] >= last
    wait_for(done, 600, interval=0.5, what=f"resumed run reaching step {last}")
