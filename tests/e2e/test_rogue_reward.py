"""A rogue reward peer in a live run: it answers its score requests with NaN, out-of-range and
wrong-count results (and answers requests it does not hold). The run still trains every step,
every ledger entry is closed at the end, and the learner counted and dropped the rogue.

The landed code removed such a group from the service before the scheduler refused it: it stayed
"scoring" forever and held admission, and training stopped at step 7 after 14 bad answers.
"""

from __future__ import annotations

import math
import threading

import pytest

from bus.client import Client
from bus.messages import ROLE_REWARD, Hello, Ready, ScoreOut, ScoreRequest, ScoreResult
from e2e_support import STARTUP_S, check_ledger, ledger, make_fleet, metrics, small_config, wait_step

pytestmark = pytest.mark.slow
B, ETA, STEPS = 4, 1, 30


class Rogue:
    """A reward worker that lies: a real bus client in this test process."""

    def __init__(self, endpoint: str):
        self.client = Client(endpoint, lambda: Hello(role=ROLE_REWARD, worker_id="rogue", host="evil"), heartbeat_s=0.5)
        self.answers = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        self.client.connect(timeout=STARTUP_S)
        self.client.send(Ready(credits=1000))
        lies = ([ScoreOut(math.nan)], [ScoreOut(7.0)], [ScoreOut(-1.0)], [], [ScoreOut(math.inf)])
        while not self.stop.is_set():
            msg = self.client.recv(timeout=0.2)
            if isinstance(msg, ScoreRequest):
                lie = lies[self.answers % len(lies)]
                results = lie * len(msg.items) if lie else []
                self.client.send(ScoreResult(msg.request_id, results))
                self.client.send(ScoreResult(msg.request_id + 1, [ScoreOut(1.0)] * len(msg.items)))  # not its request
                self.answers += 1
                self.client.send(Ready(credits=1000))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.client.close()


def test_rogue_reward_peer_cannot_stall_or_fool_the_run(tmp_path, tiny_model_dir):
    cfg, path = small_config(tmp_path, tiny_model_dir, steps=STEPS, eta=ETA, batch=B)
    fleet = make_fleet(tmp_path, cfg, path)
    rogue = Rogue(fleet.endpoint)
    try:
        fleet.learner()
        rogue.thread.start()  # first, so it takes the first requests
        fleet.actor("actor0")
        fleet.actor("actor1")
        fleet.reward("rw0")
        wait_step(fleet, STEPS, 600)
        assert fleet.wait_exit("learner", 120) == 0, fleet.tail("learner")
    finally:
        rogue.close()
        fleet.close()
    assert rogue.answers >= 3, "the rogue never got work"
    check_ledger(ledger(fleet), B, STEPS, eta_max=ETA)  # every grant ended exactly once, nothing twice
    last = metrics(fleet)[-1]
    assert last["bus/bad_scores"] >= 3 and last["bus/dropped_workers"] >= 1, {k: v for k, v in last.items() if k.startswith("bus/")}
    assert last["bus/late_results"] >= 1
    assert "bus/bad_messages" in last and "weights/bad_messages" in last  # both ports' rejected-message counts
    print(f"rogue: {rogue.answers} lies; bad_scores {last['bus/bad_scores']:.0f}, dropped {last['bus/dropped_workers']:.0f}, "
          f"foreign results ignored {last['bus/late_results']:.0f}; {STEPS} steps trained, ledger closed")
