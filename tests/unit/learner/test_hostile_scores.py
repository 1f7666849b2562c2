"""The learner's service under hostile reward peers (hypothesis state machine).

One honest and one rogue reward worker score the groups actors submit through the real
LearnerService (scheduler, dispatcher, ledger) with a fake transport. The rogue answers requests
it holds and requests it does not with NaN, ±inf, out-of-range, wrong-count and valid results; it
may also die. Checked after every step: every group the scheduler has scoring is one the service
is having scored (the landed code lost that link on a NaN and deadlocked admission). At the end
the honest worker scores what is left, the run closes, and then nothing is in flight, admission
load is only what was trained, and every granted (lease, prompt) ended exactly once.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bus.messages import (
    FINISH_STOP, ROLE_ACTOR, ROLE_REWARD, Group, Hello, Lease, LeaseRequest, Ready, Sample, ScoreOut,
    ScoreRequest, ScoreResult, Submit,
)
from bus.server import Peer
from common.config import load_config
from learner.scheduler import Prompt, Scheduler
from learner.service import LearnerService

N = 3
HOSTILE = st.one_of(
    st.just([ScoreOut(math.nan)] * N), st.just([ScoreOut(math.inf)] * N), st.just([ScoreOut(-math.inf)] * N),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=N, max_size=N).map(lambda r: [ScoreOut(x) for x in r]),
    st.lists(st.sampled_from([0.0, 1.0]), min_size=0, max_size=2 * N).map(lambda r: [ScoreOut(x) for x in r]),
)


class FakeServer:
    def __init__(self):
        self.inbox: dict[str, list] = {}

    def send(self, worker_id, msg) -> bool:
        self.inbox.setdefault(worker_id, []).append(msg)
        return True

    def peers(self):
        return []


def peer(role: str, wid: str) -> Peer:
    return Peer(wid.encode(), role, wid, "h", Hello(role=role, worker_id=wid), 0.0, 0.0, 0)


class HostileScores(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        cfg = load_config(overrides=[
            "learner.stages=[{steps=1000, max_response_tokens=4, prompts_per_batch=2, group_size=3}]",
            "learner.max_staleness=1", "learner.lease_groups=2"])
        self.events: list[dict] = []
        prompts = [Prompt(f"p{i}", np.array([1, i], np.int32), "math", "1") for i in range(12)]
        self.sched = Scheduler.from_config(prompts, cfg.learner, 0, on_event=self.events.append)
        self.svc = LearnerService(cfg, self.sched, run_id="r", model="m", weights_endpoint="tcp://*:1",
                                  clock=lambda: self.now)
        self.server = FakeServer()
        self.svc.server = self.server
        self.now = 0.0
        self.rogue_alive = True
        self.call(self.svc.ready_msg, peer(ROLE_REWARD, "honest"), Ready(credits=100))
        self.call(self.svc.ready_msg, peer(ROLE_REWARD, "rogue"), Ready(credits=100))
        self.rng = np.random.default_rng(0)

    def call(self, handler, *args):
        """A bus handler as the server runs it: under the service's lock (LearnerService._guard)."""
        with self.svc.lock:
            return handler(*args)

    def _requests(self, wid: str) -> list[ScoreRequest]:
        return [m for m in self.server.inbox.get(wid, []) if isinstance(m, ScoreRequest)]

    @rule()
    def actor_leases_and_submits(self):
        reply = self.call(self.svc.lease, peer(ROLE_ACTOR, "a"), LeaseRequest(max_groups=2, weight_version=self.sched.version))
        if isinstance(reply, Lease):
            groups = [Group(p.prompt_id, self.sched.version, [
                Sample(np.arange(2, dtype=np.int32), np.full(2, -0.5, np.float32), FINISH_STOP, "x") for _ in range(N)])
                for p in reply.prompts]
            self.call(self.svc.submit, peer(ROLE_ACTOR, "a"), Submit(reply.lease_id, reply.epoch, groups))

    @precondition(lambda self: self.rogue_alive)
    @rule(results=HOSTILE, pick=st.integers(0, 50), foreign=st.booleans())
    def rogue_answers(self, results, pick, foreign):
        reqs = self._requests("honest" if foreign else "rogue")
        if reqs:
            rid = reqs[pick % len(reqs)].request_id
            self.call(self.svc.score_result, peer(ROLE_REWARD, "rogue"), ScoreResult(rid, results))

    @rule(pick=st.integers(0, 50))
    def honest_answers(self, pick):
        reqs = self._requests("honest")
        if reqs:
            req = reqs.pop(pick % len(reqs))
            self.server.inbox["honest"].remove(req)
            rewards = [ScoreOut(float(self.rng.integers(0, 2))) for _ in req.items]
            self.call(self.svc.score_result, peer(ROLE_REWARD, "honest"), ScoreResult(req.request_id, rewards))

    @precondition(lambda self: self.rogue_alive)
    @rule()
    def rogue_dies(self):
        self.rogue_alive = False
        self.call(self.svc.dead, peer(ROLE_REWARD, "rogue"))

    @rule()
    def train(self):
        with self.svc.lock:
            batch = self.sched.take_batch()
        if batch is not None:
            self.svc.step_done(self.sched.version + 1)

    @rule()
    def time_passes(self):
        self.now += 50.0
        with self.svc.lock:
            self.svc.dispatcher.tick(self.now)

    @invariant()
    def scoring_is_never_stranded(self):
        assert set(self.sched._scoring) == set(self.svc._scoring)

    def teardown(self):
        # the rogue leaves, the honest worker answers everything still out or queued, the run ends
        if self.rogue_alive:
            self.call(self.svc.dead, peer(ROLE_REWARD, "rogue"))
        for _ in range(200):
            reqs = self._requests("honest")
            if not reqs and not self.svc.dispatcher.queued:
                break
            for req in reqs:
                self.server.inbox["honest"].remove(req)
                self.call(self.svc.score_result, peer(ROLE_REWARD, "honest"), ScoreResult(req.request_id, [ScoreOut(1.0)] * len(req.items)))
            self.call(self.svc.ready_msg, peer(ROLE_REWARD, "honest"), Ready(credits=100))
        assert self.svc.dispatcher.outstanding == 0 and self.svc.dispatcher.queued == 0
        self.svc.close_run()
        assert self.sched.groups_in_flight == 0 and len(self.sched._buffer) == 0
        assert self.sched.admission_load() == self.sched.groups_trained  # only what was trained
        grants = Counter((e["lease_id"], p) for e in self.events if e["event"] == "lease" for p in e["prompts"])
        ends = Counter((e["lease_id"], e["prompt_id"]) for e in self.events if e["event"] == "end")
        assert ends == grants, (grants - ends, ends - grants)


HostileScores.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestHostileScores = HostileScores.TestCase
