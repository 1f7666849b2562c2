"""learner/scheduler.py: dataset order, leases, admission, submit checks, stages, ledger, state."""

import json

import numpy as np
import pytest

from bus.messages import (
    ERR_STALE_EPOCH, ERR_UNKNOWN_LEASE, FINISH_LENGTH, FINISH_STOP, WAIT_ADMISSION, WAIT_DONE, WAIT_NO_DATA,
    WAIT_WEIGHTS, Group, Lease, Sample, Wait,
)
from common.config import LearnerConfig, SamplingConfig, StageConfig
from learner.scheduler import Prompt, Scheduler


def prompts(n):
    return [Prompt(f"p{i}", np.array([1, i + 2], np.int32), "math", str(i)) for i in range(n)]


def stage(steps=100, B=2, n=2, max_tokens=8):
    return StageConfig(steps=steps, max_response_tokens=max_tokens, prompts_per_batch=B, group_size=n)


def make(n_prompts=6, stages=None, eta=0, lease_groups=4, events=None, epoch=1, seed=0, timeout=10.0):
    return Scheduler(prompts(n_prompts), stages or [stage()], SamplingConfig(temperature=0.9, top_p=0.95),
                     epoch=epoch, max_staleness=eta, lease_groups=lease_groups, lease_timeout_s=timeout,
                     seed=seed, on_event=None if events is None else events.append)


def grp(pid, n, w, finish=FINISH_STOP, tokens=3):
    ids, lp = np.arange(tokens, dtype=np.int32), np.full(tokens, -0.5, np.float32)
    return Group(pid, w, [Sample(ids, lp, finish, "x") for _ in range(n)])


def fulfil(s, lease, w, rewards, actor="a", now=0.0):
    """Submit every prompt of `lease` and score it with `rewards` (a list per prompt or one list)."""
    groups = [grp(p.prompt_id, lease.sampling.n, w) for p in lease.prompts]
    res = s.submit(actor, lease.lease_id, lease.epoch, groups, now)
    assert not res.rejected
    return [s.scored(a.group_id, rewards) for a in res.accepted]


def leased_ids(lease):
    return [p.prompt_id for p in lease.prompts]


# --- dataset order ------------------------------------------------------------------------


def test_dataset_order_seeded_reshuffled_per_pass_and_requeue_first():
    def order(seed, k):
        s = make(n_prompts=5, stages=[stage(B=100)], eta=0, lease_groups=1, seed=seed)
        out = []
        for _ in range(k):
            lease = s.grant("a", 1, 0, 0.0)
            out += leased_ids(lease)
            fulfil(s, lease, 0, [0, 0])  # all wrong: filtered, prompt free again, not requeued
        return out

    a = order(0, 15)
    assert a == order(0, 15)  # seeded
    assert a != order(1, 15)
    passes = [a[0:5], a[5:10], a[10:15]]
    assert all(sorted(p) == [f"p{i}" for i in range(5)] for p in passes)  # each pass: every prompt once
    assert len({tuple(p) for p in passes}) == 3  # reshuffled each pass

    s = make(n_prompts=5, stages=[stage(B=100)], lease_groups=2)
    first = s.grant("a", 2, 0, 0.0)
    s.release("a", [first.lease_id])
    again = s.grant("a", 2, 0, 0.0)
    assert leased_ids(again) == leased_ids(first)  # requeued prompts are served first


# --- grant --------------------------------------------------------------------------------


def test_lease_fields_and_sizes():
    s = make(n_prompts=10, stages=[stage(B=3, n=4, max_tokens=16)], eta=1, lease_groups=4)
    lease = s.grant("a", 10, 0, now=100.0)
    assert isinstance(lease, Lease) and lease.epoch == 1 and len(lease.prompts) == 4  # lease_groups caps
    assert (lease.sampling.n, lease.sampling.max_tokens) == (4, 16)
    assert (lease.sampling.temperature, lease.sampling.top_p) == (0.9, 0.95)
    assert lease.min_version == 0 and lease.deadline_s == 10.0
    assert lease.prompts[0].token_ids.dtype == np.int32
    assert len(s.grant("b", 1, 0, 100.0).prompts) == 1  # max_groups caps
    # room: (0 + 1 + 1)·3 = 6 groups; 5 are out, so the next lease gets 1 although 4 were asked
    assert len(s.grant("c", 4, 0, 100.0).prompts) == 1
    w = s.grant("c", 4, 0, 100.0)
    assert isinstance(w, Wait) and w.reason == WAIT_ADMISSION and w.retry_after_s == 0.2
    assert s.admission_load() == 6 == s.admission_cap()
    s.admission_retry_s = 0.02  # learner.admission_retry_s
    assert s.grant("c", 4, 0, 100.0).retry_after_s == 0.02
    with pytest.raises(ValueError):
        s.grant("a", 0, 0, 100.0)


def test_wait_weights_no_data_and_done():
    s = make(n_prompts=2, stages=[stage(steps=1, B=2)], eta=0)
    w = s.grant("a", 4, -1, 0.0)  # holds no weights yet
    assert (w.reason, w.min_version) == (WAIT_WEIGHTS, 0)
    lease = s.grant("a", 4, 0, 0.0)
    assert len(lease.prompts) == 2
    s2 = make(n_prompts=2, stages=[stage(B=4)], eta=0)
    s2.grant("a", 4, 0, 0.0)
    assert s2.grant("b", 4, 0, 0.0).reason == WAIT_NO_DATA  # both prompts busy, room left
    fulfil(s, lease, 0, [1, 0])
    batch = s.take_batch()
    s.on_step()
    assert batch.version == 0 and s.version == 1 and s.done
    assert s.grant("a", 4, 1, 0.0).reason == WAIT_DONE
    assert s.take_batch() is None


def test_actor_must_hold_recent_weights_and_future_weights_refused():
    s = make(n_prompts=20, stages=[stage(B=1)], eta=1)
    for v in range(3):  # three steps, actor "a" keeps up
        lease = s.grant("a", 1, v, 0.0)
        fulfil(s, lease, v, [1, 0])
        s.take_batch()
        s.on_step()
    assert s.version == 3
    w = s.grant("old", 1, 1, 0.0)  # holds 1 < 3 - 1
    assert (w.reason, w.min_version) == (WAIT_WEIGHTS, 2)
    ok = s.grant("ok", 1, 2, 0.0)
    assert isinstance(ok, Lease)
    s.release("ok", [ok.lease_id])
    w = s.grant("ahead", 1, 7, 0.0)  # weights from a future this (restarted) learner never reached
    assert (w.reason, w.min_version) == (WAIT_WEIGHTS, 3)
    # while a batch trains, its weights (v + 1) may be published before on_step: not the future
    assert s.grant("ahead", 1, 4, 0.0).reason == WAIT_WEIGHTS
    lease = s.grant("a", 1, 3, 0.0)
    fulfil(s, lease, 3, [1, 0])
    s.take_batch()
    early = s.grant("early", 1, 4, 0.0)
    assert isinstance(early, Lease) and s.newest_weights == 4
    s.on_step()
    fulfil(s, early, 4, [0, 1], actor="early")
    assert s.take_batch().metrics["staleness/max"] == 0


# --- submit -------------------------------------------------------------------------------


def test_submit_rejections():
    events = []
    s = make(n_prompts=8, stages=[stage(B=4, n=2, max_tokens=4)], eta=1, events=events)
    lease = s.grant("a", 3, 0, 0.0)
    p0, p1, p2 = leased_ids(lease)
    other = s.grant("b", 1, 0, 0.0)
    def sub(groups, actor="a", lease_id=lease.lease_id, epoch=1):
        return s.submit(actor, lease_id, epoch, groups, 1.0)

    assert sub([grp(p0, 2, 0)], epoch=0).rejected == [(p0, ERR_STALE_EPOCH)]
    assert sub([grp(p0, 2, 0)], lease_id=999).rejected == [(p0, ERR_UNKNOWN_LEASE)]
    assert sub([grp(p0, 2, 0)], actor="b").rejected == [(p0, "wrong_actor")]
    res = sub([grp(leased_ids(other)[0], 2, 0), grp(p0, 3, 0), grp(p1, 2, 0, tokens=5),
               Group(p2, 0, [Sample(np.arange(2, dtype=np.int32), np.array([0.0, np.nan], np.float32),
                                    FINISH_STOP, "")] * 2)])
    assert [r for _, r in res.rejected] == ["not_in_lease", "bad_group_size", "bad_sample", "bad_sample"]
    assert res.reason == "bad_group_size,bad_sample,not_in_lease"
    # a rejected group leaves its prompt pending: a good resubmit is accepted, a second one is a duplicate
    res = sub([grp(p0, 2, 0), grp(p0, 2, 0), grp(p1, 2, 1)])
    assert [a.prompt.prompt_id for a in res.accepted] == [p0]
    assert [r for _, r in res.rejected] == ["duplicate", "future_weights"]
    assert res.accepted[0].prompt.reference == p0[1:] and res.accepted[0].group.prompt_id == p0
    assert s.groups_in_flight == 4  # p1, p2 still leased, p0 scoring, other leased
    # the whole lease is checked again later: all remaining prompts accepted -> lease completed
    res = sub([grp(p1, 2, 0), grp(p2, 2, 0)])
    assert len(res.accepted) == 2 and sub([grp(p1, 2, 0)]).rejected == [(p1, ERR_UNKNOWN_LEASE)]
    assert any(e["event"] == "lease_end" and e["reason"] == "completed" for e in events)


def test_old_weights_rejected_by_lease_min_version():
    s = make(n_prompts=20, stages=[stage(B=1)], eta=2)
    for v in range(3):
        lease = s.grant("a", 1, v, 0.0)
        fulfil(s, lease, v, [0, 1])
        s.take_batch()
        s.on_step()
    lease = s.grant("a", 1, 3, 0.0)
    assert lease.min_version == 1
    res = s.submit("a", lease.lease_id, 1, [grp(lease.prompts[0].prompt_id, 2, 0)], 0.0)
    assert res.rejected[0][1] == "old_weights"


def test_release_death_expiry_requeue_at_once_and_late_submit_rejected():
    events = []
    s = make(n_prompts=12, stages=[stage(B=6)], eta=0, lease_groups=2, events=events, timeout=10.0)
    la, lb, lc = (s.grant(x, 2, 0, now=0.0) for x in "abc")
    assert s.grant("d", 2, 0, 0.0).reason == WAIT_ADMISSION  # 6 of 6 out
    assert s.leases_by_actor() == {"a": 1, "b": 1, "c": 1}
    assert s.release("a", [la.lease_id, lb.lease_id, la.lease_id]) == 2  # b's lease is not a's to release
    assert s.actor_dead("b") == 2
    assert s.expire(now=5.0) == 0 and s.expire(now=10.5) == 2
    assert s.admission_load() == 0
    again = [s.grant("d", 2, 0, 11.0) for _ in range(3)]
    assert sorted(sum(map(leased_ids, again), [])) == sorted(sum(map(leased_ids, (la, lb, lc)), []))
    for old in (la, lb, lc):
        res = s.submit("a", old.lease_id, 1, [grp(old.prompts[0].prompt_id, 2, 0)], 11.0)
        assert res.rejected[0][1] == ERR_UNKNOWN_LEASE and not res.accepted
    ends = [(e["outcome"], e["reason"]) for e in events if e["event"] == "end"]
    assert ends[:4] == [("released", "released")] * 2 + [("requeued", "actor_dead")] * 2
    assert ends[4:] == [("requeued", "expired")] * 2
    # a submit after the deadline that expire() has not yet seen is refused and requeues at once
    late = again[0]
    res = s.submit("d", late.lease_id, 1, [grp(late.prompts[0].prompt_id, 2, 0)], now=30.0)
    assert res.rejected[0][1] == "expired" and s.counts()["requeued"] == 2


# --- scoring, batches, stages -------------------------------------------------------------


def test_filtered_groups_free_their_slot_and_truncated_reward_zeroed():
    events = []
    s = make(n_prompts=10, stages=[stage(B=2, n=2)], eta=0, events=events)
    lease = s.grant("a", 4, 0, 0.0)
    assert len(lease.prompts) == 2 and s.grant("a", 4, 0, 0.0).reason == WAIT_ADMISSION
    assert fulfil(s, lease, 0, [1, 1]) == ["all_correct", "all_correct"]
    assert s.admission_load() == 0  # the slots are free again
    lease = s.grant("a", 4, 0, 0.0)
    pid = lease.prompts[0].prompt_id
    mixed = Group(pid, 0, [grp(pid, 1, 0).samples[0], grp(pid, 1, 0, FINISH_LENGTH).samples[0]])
    res = s.submit("a", lease.lease_id, 1, [mixed], 0.0)
    # the scorer said [1, 1], but the second response ran into the cap: [1, 0], a useful group
    assert s.scored(res.accepted[0].group_id, [1.0, 1.0]) == "buffered"
    assert events[-1]["event"] == "scored" and events[-1]["rewards"] == [1.0, 0.0]
    assert s.pass_rate(pid) == 0.5
    assert s.scored(res.accepted[0].group_id, [1.0, 1.0]) == "unknown"  # a late duplicate score
    assert s.scored(999, [1.0]) == "unknown"
    res = s.submit("a", lease.lease_id, 1, [grp(lease.prompts[1].prompt_id, 2, 0)], 0.0)
    with pytest.raises(ValueError, match="finite rewards"):
        s.scored(res.accepted[0].group_id, [1.0])  # a wrong count is an error; the group stays scoring
    assert s.requeue_group(res.accepted[0].group_id, "no_scorer") and s.counts()["requeued"] == 1
    assert not s.requeue_group(res.accepted[0].group_id, "no_scorer")


def test_batch_step_ledger_and_stage_filter():
    events = []
    stages = [stage(steps=2, B=2, n=2, max_tokens=8), stage(steps=3, B=1, n=3, max_tokens=16)]
    s = make(n_prompts=6, stages=stages, eta=0, events=events)
    seen: dict[str, list[float]] = {}

    def score(gid, pid, r):
        seen.setdefault(pid, []).extend(r)
        return s.scored(gid, r)

    for step in range(2):
        lease = s.grant("a", 4, step, 0.0)
        ids = leased_ids(lease)
        res = s.submit("a", lease.lease_id, 1, [grp(p, 2, step) for p in ids], 0.0)
        # first prompt: all correct (filtered, counts as solved); second: useful
        assert score(res.accepted[0].group_id, ids[0], [1, 1]) == "all_correct"
        assert score(res.accepted[1].group_id, ids[1], [1, 0]) == "buffered"
        assert s.take_batch() is None  # one useful group of B = 2
        lease = s.grant("a", 4, step, 0.0)
        res = s.submit("a", lease.lease_id, 1, [grp(p, 2, step) for p in leased_ids(lease)], 0.0)
        [score(a.group_id, a.prompt.prompt_id, [0, 1]) for a in res.accepted]
        batch = s.take_batch()
        assert batch.version == step and len(batch.groups) == 2
        assert batch.metrics["filter/zero_adv_all_correct"] == 1 and batch.metrics["staleness/max"] == 0
        with pytest.raises(RuntimeError):
            s.take_batch()
        m = s.on_step()
    assert s.version == 2 and s.stage == 1 and m["learner/stage"] == 1
    # stage 0's fully solved prompts (every sample reward 1) are dropped
    want = sorted(pid for pid, r in seen.items() if all(x == 1 for x in r))
    dropped = next(e for e in events if e["event"] == "stage")["dropped"]
    assert dropped == want and len(want) >= 1 and m["filter/solved_prompts_dropped"] == len(want)
    for _ in range(4):  # the dropped prompts never come back; the others do
        lease = s.grant("a", 4, 2, 0.0)
        # the new stage's n, max_tokens and B = 1
        assert (lease.sampling.n, lease.sampling.max_tokens, len(lease.prompts)) == (3, 16, 1)
        assert not set(leased_ids(lease)) & set(dropped)
        s.release("a", [lease.lease_id])
    trained = [e for e in events if e["event"] == "end" and e["outcome"] == "trained"]
    assert len(trained) == 4 and {e["version"] for e in trained} == {0, 1}
    assert all(e["staleness"] == 0 for e in trained)


def test_stale_buffered_group_dropped_and_requeued():
    events = []
    s = make(n_prompts=10, stages=[stage(B=1)], eta=1, events=events)
    slow = s.grant("slow", 1, 0, 0.0)  # made with weights 0, submitted after two steps
    for v in range(2):
        lease = s.grant("a", 1, v, 0.0)
        fulfil(s, lease, v, [1, 0])
        assert s.take_batch().groups[0].prompt_id == leased_ids(lease)[0]
        s.on_step()
    fulfil(s, slow, 0, [1, 0], actor="slow")
    assert s.take_batch() is None  # staleness 2 - 0 > 1: dropped at consumption
    end = [e for e in events if e["event"] == "end"][-1]
    assert (end["outcome"], end["staleness"], end["prompt_id"]) == ("stale", 2, leased_ids(slow)[0])
    lease = s.grant("a", 1, 2, 0.0)
    assert leased_ids(lease) == leased_ids(slow)  # requeued first
    fulfil(s, lease, 2, [1, 0])
    assert s.take_batch().metrics["staleness/dropped"] == 1


def test_set_max_staleness():
    s = make(eta=0)
    assert s.set_max_staleness(3) == 0 and s.eta == 3
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError):
            s.set_max_staleness(bad)
    assert s.eta == 3


# --- state --------------------------------------------------------------------------------


def _run(s, steps):
    """Drive an eta = 0 run to `steps` steps; rewards depend only on (prompt, version).
    Returns the leased prompt ids in order."""
    seen = []
    while s.version < steps:
        lease = s.grant("a", 2, s.version, 0.0)
        if isinstance(lease, Wait):
            assert s.take_batch() is not None
            s.on_step()
            continue
        seen += leased_ids(lease)
        for p in leased_ids(lease):
            rng = np.random.default_rng([s.version, int(p[1:])])
            res = s.submit("a", lease.lease_id, s.epoch, [grp(p, lease.sampling.n, s.version)], 0.0)
            assert res.accepted, res.rejected
            s.scored(res.accepted[0].group_id, [int(x) for x in rng.integers(0, 2, lease.sampling.n)])
    return seen


def test_state_round_trip_continues_exactly_and_requeues_in_flight():
    stages = [stage(steps=4, B=2), stage(steps=50, B=3, n=2, max_tokens=12)]
    full = make(n_prompts=7, stages=stages)
    whole = _run(full, 8)
    a = make(n_prompts=7, stages=stages)
    first = _run(a, 5)
    state = json.loads(json.dumps(a.state_dict()))
    b_events = []
    b = make(n_prompts=7, stages=stages, epoch=2, events=b_events)
    b.load_state_dict(state)
    assert b_events == []  # saved between steps of an eta = 0 run: nothing was in flight
    assert (b.version, b.stage, b.groups_trained) == (a.version, a.stage, a.groups_trained)
    assert first + _run(b, 8) == whole
    # a state saved with work in flight: those prompts come back first, with ledger events
    c = make(n_prompts=7, stages=stages)
    lease = c.grant("a", 2, 0, 0.0)
    d_events = []
    d = make(n_prompts=7, stages=stages, epoch=2, events=d_events)
    d.load_state_dict(c.state_dict())
    ends = [(e["outcome"], e["reason"], e["lease_id"]) for e in d_events]
    assert ends == [("requeued", "restart", lease.lease_id)] * 2
    again = d.grant("a", 2, 0, 0.0)
    assert leased_ids(again) == leased_ids(lease) and again.lease_id > lease.lease_id and again.epoch == 2
    late = d.submit("a", lease.lease_id, 1, [grp(leased_ids(lease)[0], 2, 0)], 0.0)
    assert late.rejected[0][1] == ERR_STALE_EPOCH
    with pytest.raises(ValueError, match="different dataset"):
        make(n_prompts=8, stages=stages).load_state_dict(c.state_dict())
    with pytest.raises(RuntimeError):
        d.load_state_dict(c.state_dict())


def test_from_config():
    cfg = LearnerConfig(max_staleness=2, lease_groups=3)
    s = Scheduler.from_config(prompts(4), cfg, epoch=5)
    assert (s.eta, s.lease_groups, s.epoch, s.batch_size) == (2, 3, 5, 8)
    with pytest.raises(ValueError):
        Scheduler(prompts(2) + prompts(1), [stage()], SamplingConfig(), epoch=0)


def test_token_ids_outside_the_vocabulary_are_refused_at_submit():
    """An out-of-vocabulary id used to pass the scheduler and raise in the trainer's embedding
    lookup, which stopped the learner: one hostile actor could end the run."""
    from bus.messages import FINISH_STOP, Group, Lease, Sample
    from common.config import SamplingConfig, StageConfig
    from bus.messages import REJECT_BAD_SAMPLE
    from learner.scheduler import Prompt, Scheduler

    s = Scheduler([Prompt("p0", np.array([1], np.int32), "math", "1")],
                  [StageConfig(steps=5, max_response_tokens=4, prompts_per_batch=1, group_size=2)],
                  SamplingConfig(), epoch=0, vocab_size=100)
    lease = s.grant("a", 1, 0, 0.0)
    assert isinstance(lease, Lease)
    bad = [Sample(np.array([5, 100], np.int32), np.zeros(2, np.float32), FINISH_STOP, "")] * 2
    res = s.submit("a", lease.lease_id, 0, [Group("p0", 0, bad)], 0.0)
    assert not res.accepted and res.reason == REJECT_BAD_SAMPLE
    neg = [Sample(np.array([-1], np.int32), np.zeros(1, np.float32), FINISH_STOP, "")] * 2
    assert s.submit("a", lease.lease_id, 0, [Group("p0", 0, neg)], 0.0).reason == REJECT_BAD_SAMPLE


def test_in_flight_version_spans_are_checked_at_submit():
    """A sample whose spans claim a version older than its group's (staleness undercounted) or one
    never published is refused; well-formed spans from the group's version on are accepted."""
    from bus.messages import FINISH_STOP, REJECT_BAD_SAMPLE, Group, Lease, Sample, VersionSpan
    from common.config import SamplingConfig, StageConfig
    from learner.scheduler import Prompt, Scheduler

    s = Scheduler([Prompt("p0", np.array([1], np.int32), "math", "1")],
                  [StageConfig(steps=5, max_response_tokens=4, prompts_per_batch=1, group_size=2)],
                  SamplingConfig(), epoch=0, vocab_size=100)
    lease = s.grant("a", 1, 0, 0.0)
    assert isinstance(lease, Lease)

    def samples(*spans):
        return [Sample(np.array([5, 6, 7], np.int32), np.zeros(3, np.float32), FINISH_STOP, "",
                       [VersionSpan(v, st) for v, st in spans])] * 2

    assert s.submit("a", lease.lease_id, 0, [Group("p0", 1, samples((0, 0)))], 0.0).reason  # group claims newer
    assert s.submit("a", lease.lease_id, 0, [Group("p0", 0, samples((0, 0), (1, 2)))], 0.0).reason == \
        REJECT_BAD_SAMPLE  # version 1 is not published (the learner is at 0)
    res = s.submit("a", lease.lease_id, 0, [Group("p0", 0, samples((0, 0)))], 0.0)
    assert res.accepted and not res.reason


def test_keep_zero_advantage_from_config_trains_all_wrong_groups():
    """loss.keep_zero_advantage (benchmarks of untrained models): all-wrong groups are buffered
    and trained instead of filtered; the ledger shows them trained, none filtered."""
    cfg = LearnerConfig()
    cfg.stages = [stage(B=2, n=2)]
    cfg.loss.keep_zero_advantage = True
    events: list[dict] = []
    s = Scheduler.from_config(prompts(4), cfg, epoch=0, on_event=events.append)
    lease = s.grant("a", 2, 0, 0.0)
    assert fulfil(s, lease, 0, [0, 0]) == ["buffered", "buffered"]
    batch = s.take_batch()
    assert batch is not None and len(batch.groups) == 2
    assert batch.metrics["filter/zero_adv_kept"] == 2 and batch.metrics["filter/zero_adv_all_wrong"] == 2
    s.on_step()
    outcomes = [e["outcome"] for e in events if e["event"] == "end"]
    assert outcomes == ["trained", "trained"]

    cfg.loss.keep_zero_advantage = False  # the default: the same groups are filtered
    s = Scheduler.from_config(prompts(4), cfg, epoch=0)
    assert fulfil(s, s.grant("a", 2, 0, 0.0), 0, [0, 0]) == ["all_wrong", "all_wrong"]
    assert s.take_batch() is None


@pytest.mark.parametrize("fill", [True, False])
def test_a_group_scored_late_is_waited_for_on_its_last_step_and_trained(fill):
    """Scoring can finish out of order (the reward worker's queue, verdicts it already knew). A group
    whose last admissible step is now (v - w = eta) and which is still being scored goes into this
    batch ahead of newer groups: take_batch waits for it instead of leaving it to turn stale."""
    s = make(n_prompts=10, stages=[stage(B=2, n=2)], eta=1, lease_groups=2)
    s._buffer.fill = fill
    late = s.grant("a", 2, 0, 0.0)
    late_ids = [x.group_id for x in s.submit("a", late.lease_id, late.epoch,
                                             [grp(p.prompt_id, 2, 0) for p in late.prompts], 0.0).accepted]
    fulfil(s, s.grant("b", 2, 0, 0.0), 0, [1, 0], actor="b")
    first = s.take_batch()  # v = 0: the late groups (w = 0) may still train at v = 1
    assert first is not None and not {g.group_id for g in first.groups} & set(late_ids)
    s.on_step()
    fulfil(s, s.grant("b", 2, 1, 0.0), 1, [1, 0], actor="b")  # two newer groups (w = 1) are ready
    assert s.take_batch() is None  # v = 1: the late groups' last step, and they are still scoring
    for gid in late_ids:
        s.scored(gid, [1, 0])
    batch = s.take_batch()
    assert sorted(g.group_id for g in batch.groups) == sorted(late_ids)
    assert batch.metrics["staleness/dropped"] == 0 and batch.metrics["staleness/max"] == 1


def test_slots_keep_older_weights_first_when_scoring_ends_out_of_order():
    from learner.buffer import GroupBuffer, ScoredGroup

    def sg(gid, w):
        return ScoredGroup(gid, gid, f"p{gid}", np.array([1], np.int32), w, [], np.array([1.0, 0.0], np.float32))

    buf = GroupBuffer(fill=False)
    for gid, w in ((1, 2), (2, 3), (3, 1), (4, 2)):
        buf.add(sg(gid, w))
    assert buf.newest_in_next(2) == 2
    groups, _ = buf.take(2, 3, 2)
    assert [g.group_id for g in groups] == [3, 1]  # weights 1, then 2 in scoring order
