"""Staleness admission and the group ledger under random interleavings (hypothesis state machine).

Several actors lease with the weights they hold, submit (sometimes with old weights or broken
groups), pull newer weights, die, release and miss deadlines; reward results arrive in any order;
the trainer takes a batch whenever one is ready; eta changes at run time; a stage boundary changes
B and n. Checked after every step: no group trained with staleness > eta, no prompt leased twice at
once, every granted (lease, prompt) ends exactly once and the live ones are exactly the scheduler's
in-flight set, nothing trained twice, requeued prompts are in the requeue, and the admission
inequality after every grant. With eta = 0: one batch in flight, every group trained by the weights
that generated it. Each machine runs twice: batches filled with B useful groups (learner.fill_batch,
the default) and batches of the next B scored groups (fill_batch = false).
"""

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bus.messages import FINISH_LENGTH, FINISH_STOP, WAIT_ADMISSION, WAIT_WEIGHTS, Group, Lease, Sample
from common.config import SamplingConfig, StageConfig
from learner.scheduler import Prompt, Scheduler

ACTORS = ("a0", "a1", "a2")
REQUEUING = {"stale", "released", "requeued"}
STAGES = [
    StageConfig(steps=3, max_response_tokens=6, prompts_per_batch=3, group_size=2),
    StageConfig(steps=1000, max_response_tokens=8, prompts_per_batch=2, group_size=3),
]
SETTINGS = settings(max_examples=200, stateful_step_count=50, deadline=None)


def make_group(pid, n, w, rng):
    samples = []
    for _ in range(n):
        k = int(rng.integers(0, 4))
        finish = FINISH_LENGTH if rng.random() < 0.1 else FINISH_STOP
        samples.append(Sample(np.arange(k, dtype=np.int32), np.full(k, -0.3, np.float32), finish, ""))
    return Group(pid, w, samples)


class AdmissionMachine(RuleBasedStateMachine):
    initial_eta = 1
    eta_changes = True
    fill_batch = True

    def __init__(self):
        super().__init__()
        self.events = []
        prompts = [Prompt(f"p{i}", np.array([1, i], np.int32), "math", "1") for i in range(14)]
        self.s = Scheduler(prompts, STAGES, SamplingConfig(), epoch=3, max_staleness=self.initial_eta,
                           lease_groups=3, lease_timeout_s=20.0, fill_batch=self.fill_batch,
                           on_event=self.events.append)
        self.now = 0.0
        self.held = {a: 0 for a in ACTORS}
        self.leases: dict[int, tuple[str, Lease]] = {}  # open leases, as the actors see them
        self.closed: dict[int, tuple[str, Lease]] = {}
        self.scoring: dict[int, int] = {}  # group id -> n
        self.batch = None  # taken, training, on_step not yet called
        self.rng = np.random.default_rng(0)
        # ledger replayed from the events
        self.seen = 0
        self.live: dict[tuple[int, str], str] = {}  # (lease, prompt) -> state
        self.ended: set[tuple[int, str]] = set()
        self.trained: set[tuple[int, str]] = set()
        self.last_end: dict[str, str] = {}  # prompt -> outcome of its last END, cleared when leased
        self.stale_ends = 0

    # --- actors ---------------------------------------------------------------------------

    @rule(actor=st.sampled_from(ACTORS), k=st.integers(1, 4))
    def lease(self, actor, k):
        s, held = self.s, self.held[actor]
        r = s.grant(actor, k, held, self.now)
        if isinstance(r, Lease):
            self.leases[r.lease_id] = (actor, r)
            assert 1 <= len(r.prompts) <= k
            assert s.admission_load() <= s.admission_cap(), "admission inequality broken by a grant"
            # the same, counted independently: each step consumed exactly B, so trained - v·B
            # cancels and what is out must fit in eta + 1 batches
            c = s.counts()
            assert c["leased"] + c["scoring"] + c["buffered"] + c["training"] <= (s.eta + 1) * s.batch_size
            assert s.version - s.eta <= held <= s.newest_weights
            assert s.version - s.eta <= r.min_version <= held
            assert r.sampling.n == s.stage_config.group_size
        elif r.reason == WAIT_WEIGHTS:
            # too old for the lag bound, from a future the learner never reached, or too old for the
            # batch its next group would land in: (held + eta - stage_v0 + 1)·B - load <= 0
            fit = (held + s.eta - s._stage_v0 + 1) * s.batch_size - s.admission_load()
            assert held < max(0, s.version - s.eta) or held > s.newest_weights or fit <= 0
            assert r.min_version > held or held > s.newest_weights
        elif r.reason == WAIT_ADMISSION:
            assert s.admission_load() >= s.admission_cap()

    @rule(data=st.data())
    def submit(self, data):
        """Any subset of a lease, possibly with duplicates, older weights or a wrong group size."""
        known = {**self.closed, **self.leases}
        if not known:
            return  # closed ones too: late work must be refused
        lid = data.draw(st.sampled_from(sorted(known)))
        actor, lease = known[lid]
        chosen = data.draw(st.lists(st.sampled_from(lease.prompts), min_size=1,
                                    max_size=len(lease.prompts) + 1))
        held = self.held[actor]
        w = data.draw(st.sampled_from([held, held - 1]))
        n = lease.sampling.n + data.draw(st.sampled_from([0, 0, 1]))
        self._submit(actor, lease, [p.prompt_id for p in chosen], n, w)

    @rule(actor=st.sampled_from(ACTORS))
    def generate(self, actor):
        """The actor finishes its oldest open lease, with the weights it holds now."""
        mine = [lease for a, lease in self.leases.values() if a == actor]
        if mine:
            lease = mine[0]
            pids = [p.prompt_id for p in lease.prompts]
            self._submit(actor, lease, pids, lease.sampling.n, self.held[actor])

    @rule(actor=st.sampled_from(ACTORS), k=st.integers(1, 4), data=st.data())
    def cycle(self, actor, k, data):
        """Lease, generate, score, train in one go: keeps the pipeline moving between the rarer events."""
        self.pull_weights(actor, data)
        self.lease(actor, k)
        self.generate(actor)
        while self.scoring:
            self.score(data)
        if self.batch is not None:
            self.step()
        self.take()
        if self.batch is not None and data.draw(st.booleans()):
            self.step()  # or leave it training while the next cycle leases

    def _submit(self, actor, lease, pids, n, w):
        groups = [make_group(p, n, w, self.rng) for p in pids]
        res = self.s.submit(actor, lease.lease_id, lease.epoch, groups, self.now)
        assert len(res.accepted) + len(res.rejected) == len(pids)
        for a in res.accepted:
            assert a.group.weight_version >= lease.min_version and len(a.group.samples) == lease.sampling.n
            self.scoring[a.group_id] = lease.sampling.n
        if lease.lease_id in self.closed:
            assert not res.accepted and {r for _, r in res.rejected} == {"unknown_lease"}

    @rule(actor=st.sampled_from(ACTORS), data=st.data())
    def pull_weights(self, actor, data):
        # while a batch trains its weights may already be published: v + 1
        self.held[actor] = data.draw(st.integers(max(self.held[actor], 0), self.s.newest_weights))

    @rule(actor=st.sampled_from(ACTORS), fresh=st.booleans())
    def die(self, actor, fresh):
        self.s.actor_dead(actor)
        if fresh:
            self.held[actor] = -1  # a restarted actor holds no weights until it pulls

    @rule(actor=st.sampled_from(ACTORS), data=st.data())
    def release(self, actor, data):
        mine = sorted(lid for lid, (a, _) in self.leases.items() if a == actor)
        if mine:
            self.s.release(actor, data.draw(st.lists(st.sampled_from(mine), max_size=3)))

    @rule(dt=st.floats(0.0, 4.0))
    def tick(self, dt):
        self.now += dt
        self.s.expire(self.now)

    # --- learner --------------------------------------------------------------------------

    @rule(data=st.data())
    def score(self, data):
        if not self.scoring:
            return
        gid = data.draw(st.sampled_from(sorted(self.scoring)))
        n = self.scoring.pop(gid)
        if data.draw(st.integers(0, 19)) == 0:
            assert self.s.requeue_group(gid, "scorer_lost")
            return
        rewards = data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
        if data.draw(st.booleans()):
            rewards[0] = 1.0 - rewards[-1]  # a useful group: half the groups at least
        assert self.s.scored(gid, rewards) in ("buffered", "all_correct", "all_wrong")

    @precondition(lambda self: self.batch is None)
    @rule()
    def take(self):
        """The trainer takes a batch when one is ready (eta now is the eta it trains under)."""
        s = self.s
        v, eta, B = s.version, s.eta, s.batch_size
        batch = s.take_batch()
        if batch is None:
            return
        k = len(batch.groups)
        assert batch.version == v and (k == B if self.fill_batch else 1 <= k <= B)
        assert len({g.prompt_id for g in batch.groups}) == k
        for g in batch.groups:
            assert 0 <= v - g.weight_version <= eta, f"staleness {v - g.weight_version} > eta {eta}"
            self.check_batch_group(g, v)
        self.batch = batch

    @precondition(lambda self: self.batch is not None)
    @rule()
    def step(self):
        self.s.on_step()
        self.batch = None

    def check_batch_group(self, g, v):
        pass

    @precondition(lambda self: self.eta_changes)
    @rule(eta=st.integers(0, 3))
    def set_eta(self, eta):
        self.s.set_max_staleness(eta)

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def ledger(self):
        for e in self.events[self.seen :]:
            if e["event"] == "lease":
                for pid in e["prompts"]:
                    assert not any(p == pid for (_, p) in self.live), f"{pid} leased twice at once"
                    self.live[(e["lease_id"], pid)] = "leased"
                    self.last_end.pop(pid, None)
            elif e["event"] == "lease_end":
                self.closed[e["lease_id"]] = self.leases.pop(e["lease_id"])
            elif e["event"] == "end":
                key = (e["lease_id"], e["prompt_id"])
                assert key in self.live and key not in self.ended, f"{key} ended twice or never granted"
                del self.live[key]
                self.ended.add(key)
                if e["outcome"] == "trained":
                    assert key not in self.trained
                    self.trained.add(key)
                self.last_end[e["prompt_id"]] = e["outcome"]
                self.stale_ends += e["outcome"] == "stale"
        self.seen = len(self.events)
        state = self.s.state_dict()
        assert {tuple(x) for x in state["in_flight"]} == set(self.live)
        requeue = set(state["order"]["requeue"])
        dropped = set(state["dropped"])
        for pid, outcome in self.last_end.items():
            if outcome in REQUEUING and pid not in dropped:
                assert pid in requeue, f"{pid} was requeued ({outcome}) but is lost"
        c = self.s.counts()
        assert self.s.groups_in_flight == c["leased"] + c["scoring"]
        assert c["leased"] + c["scoring"] + c["buffered"] + c["training"] == len(self.live)


class SyncMachine(AdmissionMachine):
    """eta = 0 all along: exactly one batch in flight, trained by the weights that made it."""

    initial_eta = 0
    eta_changes = False

    def check_batch_group(self, g, v):
        assert g.weight_version == v

    @invariant()
    def one_batch_in_flight(self):
        c = self.s.counts()
        assert c["leased"] + c["scoring"] + c["buffered"] + c["training"] <= self.s.batch_size
        assert self.stale_ends == 0, "eta = 0 never produces a stale group"


class ScoredAdmissionMachine(AdmissionMachine):
    fill_batch = False


class ScoredSyncMachine(SyncMachine):
    fill_batch = False


TestAdmission = AdmissionMachine.TestCase
TestAdmission.settings = SETTINGS
TestSynchronous = SyncMachine.TestCase
TestScoredAdmission = ScoredAdmissionMachine.TestCase
TestScoredAdmission.settings = SETTINGS
TestScoredSynchronous = ScoredSyncMachine.TestCase
TestSynchronous.settings = SETTINGS
TestScoredSynchronous.settings = SETTINGS
