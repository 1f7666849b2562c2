"""learner/buffer.py: zero-advantage filter, staleness at consumption, micro-batch packing."""

import numpy as np
import pytest

from bus.messages import FINISH_LENGTH, FINISH_STOP, Sample
from learner.buffer import (
    GroupBuffer, ScoredGroup, TrainSample, build_micro_batch, build_shared_micro_batch, make_micro_batches,
    to_train_samples,
)


def sample(n_tokens, finish=FINISH_STOP, start=10):
    ids = np.arange(start, start + n_tokens, dtype=np.int32)
    return Sample(ids, -0.1 * np.arange(1, n_tokens + 1, dtype=np.float32), finish, "text")


def group(gid, rewards, w=0):
    return ScoredGroup(gid, lease_id=gid, prompt_id=f"p{gid}", prompt_ids=np.array([1, 2], dtype=np.int32),
                       weight_version=w, samples=[sample(3) for _ in rewards],
                       rewards=np.array(rewards, np.float32))


def ts(p, r, adv=1.0, truncated=False):
    return TrainSample(np.arange(1, p + 1, dtype=np.int32), np.arange(100, 100 + r, dtype=np.int32),
                       -np.ones(r, np.float32), adv, 1.0, truncated, 0, "x")


# --- zero-advantage filter and staleness --------------------------------------------------


def test_zero_advantage_groups_dropped_and_counted():
    buf = GroupBuffer()
    kinds = [buf.add(group(i, r)) for i, r in enumerate([[1, 1], [0, 0], [1, 0], [0, 0], [0, 1]])]
    assert kinds == ["all_correct", "all_wrong", "useful", "all_wrong", "useful"]
    assert len(buf) == 2
    groups, m = buf.take(2, version=0, eta=0)
    assert [g.group_id for g in groups] == [2, 4]
    assert m["filter/zero_adv_groups"] == 3 and m["filter/zero_adv_all_correct"] == 1
    assert m["filter/zero_adv_all_wrong"] == 2 and m["filter/useful_groups"] == 2
    assert m["filter/kept_frac"] == pytest.approx(0.4)
    assert m["reward/mean"] == pytest.approx(4 / 10)  # 4 ones among the 10 scored samples
    _, m2 = buf.take(0, 0, 0)
    assert m2 == {}  # nothing taken, counters still reset by the previous batch


def test_keep_zero_advantage_buffers_equal_reward_groups_with_advantage_zero():
    buf = GroupBuffer(keep_zero_advantage=True)
    kinds = [buf.add(group(i, r)) for i, r in enumerate([[1, 1], [0, 0], [1, 0]])]
    assert kinds == ["zero_adv_kept", "zero_adv_kept", "useful"]
    assert len(buf) == 3
    groups, m = buf.take(3, version=0, eta=0)
    assert [g.group_id for g in groups] == [0, 1, 2]
    # still counted as zero-advantage groups, and as kept
    assert m["filter/zero_adv_groups"] == 2 and m["filter/zero_adv_kept"] == 2 and m["filter/useful_groups"] == 1
    assert m["filter/zero_adv_all_correct"] == 1 and m["filter/zero_adv_all_wrong"] == 1
    assert m["filter/kept_frac"] == 1.0
    advantages = [s.advantage for s in to_train_samples(groups)]
    assert advantages[:4] == [0.0, 0.0, 0.0, 0.0] and advantages[4] > 0 > advantages[5]


def test_keep_zero_advantage_is_off_by_default():
    from common.config import LossConfig

    assert LossConfig().keep_zero_advantage is False
    buf = GroupBuffer()
    assert buf.add(group(0, [0, 0])) == "all_wrong" and len(buf) == 0
    buf.add(group(1, [1, 0]))
    _, m = buf.take(1, 0, 0)
    assert "filter/zero_adv_kept" not in m and m["filter/kept_frac"] == 0.5


def test_staleness_checked_at_consumption_and_oldest_weights_first():
    buf = GroupBuffer()
    for gid, w in [(1, 5), (2, 3), (3, 4), (4, 2), (5, 5)]:
        buf.add(group(gid, [1, 0], w=w))
    # at version 5 with eta 2 the group made with weights 2 has staleness 3 > 2: dropped
    stale = buf.purge_stale(version=5, eta=2)
    assert [g.group_id for g in stale] == [4]
    assert buf.take(5, 5, 2) == ([], {})  # only 4 left: not enough
    groups, m = buf.take(3, 5, 2)
    assert [g.weight_version for g in groups] == [3, 4, 5]  # oldest weights first; tie -> arrival
    assert [g.group_id for g in groups] == [2, 3, 1]
    assert m["staleness/dropped"] == 1
    # staleness 2, 1, 0 -> mean 1, max 2, histogram over 0..eta
    assert (m["staleness/mean"], m["staleness/max"], m["staleness/hist"]) == (1.0, 2.0, [1, 1, 1])
    assert len(buf) == 1


def test_token_staleness_counts_each_span_from_its_own_version():
    """In-flight samples: the group counts from its oldest version (staleness/mean), its tokens each
    from theirs (staleness/token_mean); mixed_frac is the share of samples with several versions."""
    from bus.messages import VersionSpan
    from learner.buffer import staleness_metrics

    g = group(1, [1, 0], w=3)
    g.samples[0].token_ids = np.arange(4, dtype=np.int32)
    g.samples[0].versions = [VersionSpan(3, 0), VersionSpan(5, 1)]  # 1 token from v3, 3 from v5
    g.samples[1].token_ids = np.arange(4, dtype=np.int32)  # all 4 from the group's v3
    m = staleness_metrics([g], version=5, eta=2)
    assert m["staleness/mean"] == 2.0 and m["staleness/hist"] == [0, 0, 1]
    assert m["staleness/mixed_frac"] == 0.5
    assert m["staleness/token_mean"] == (1 * 2 + 3 * 0 + 4 * 2) / 8


def test_scored_batches_take_the_useful_ones_among_the_next_b_scored():
    """fill=False: a batch every B scored groups, in scoring order, made of their useful ones."""
    buf = GroupBuffer(fill=False)
    for i, r in enumerate([[1, 0], [1, 1], [0, 0], [0, 1], [1, 0]]):  # useful, -, -, useful, useful
        buf.add(group(i, r))
    assert buf.pending == 5 and len(buf) == 3
    groups, m = buf.take(3, version=0, eta=0)
    assert [g.group_id for g in groups] == [0]  # slots 0..2: one useful, two dropped at scoring
    assert m["filter/useful_groups"] == 3 and m["filter/zero_adv_groups"] == 2
    assert buf.pending == 2 and buf.take(3, 0, 0) == ([], {})  # 2 scored so far: not yet a batch
    buf.add(group(5, [0, 0]))
    groups, _ = buf.take(3, 0, 0)
    assert [g.group_id for g in groups] == [3, 4] and buf.pending == 0 and len(buf) == 0


def test_scored_slots_without_a_useful_group_give_no_batch_and_are_discarded():
    buf = GroupBuffer(fill=False)
    for i, r in enumerate([[1, 1], [0, 0], [1, 0], [0, 1]]):
        buf.add(group(i, r))
    groups, m = buf.take(2, 0, 0)  # slots 0-1 hold nothing to learn from: skipped, then 2-3
    assert [g.group_id for g in groups] == [2, 3] and m["filter/empty_batches"] == 1


def test_scored_stale_groups_leave_their_slots():
    buf = GroupBuffer(fill=False)
    buf.add(group(0, [1, 0], w=0))
    buf.add(group(1, [0, 0], w=0))
    buf.add(group(2, [0, 1], w=3))
    assert [g.group_id for g in buf.purge_stale(version=3, eta=1)] == [0]
    assert buf.pending == 2  # the dropped group's slot stays (it was consumed as scored), the stale one's goes
    groups, _ = buf.take(2, 3, 1)
    assert [g.group_id for g in groups] == [2]


def test_train_samples_carry_group_advantages():
    g = group(7, [1, 0, 0, 0], w=3)
    g.samples[1] = sample(3, FINISH_LENGTH)
    out = to_train_samples([g])
    assert [s.advantage for s in out] == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert [s.truncated for s in out] == [False, True, False, False]
    assert out[0].weight_version == 3 and out[0].prompt_id == "p7" and out[0].reward == 1.0


# --- micro-batches ------------------------------------------------------------------------


def test_micro_batch_arrays_are_position_aligned():
    rows = [ts(2, 3, adv=0.5), ts(1, 1, adv=-2.0, truncated=True)]
    mb = build_micro_batch(rows, pad_id=9, mask_truncated=True)
    assert mb.input_ids.tolist() == [[1, 2, 100, 101, 102], [1, 100, 9, 9, 9]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert mb.loss_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]  # truncated row masked
    assert mb.behaviour_logprobs.tolist() == [[0, 0, -1, -1, -1], [0, -1, 0, 0, 0]]
    assert mb.advantages.tolist() == [[0, 0, 0.5, 0.5, 0.5], [0, -2.0, 0, 0, 0]]
    assert mb.n_tokens == 3 and mb.input_ids.dtype == np.int64 and mb.loss_mask.dtype == np.float32
    kept = build_micro_batch([ts(1, 1, truncated=True)])
    assert kept.n_tokens == 1  # not masked unless asked (Skywork-OR1 keeps truncated responses)
    assert build_micro_batch([ts(0, 2)]).loss_mask.tolist() == [[0, 1]]  # position 0 never counts


def test_padding_fraction_hand_example():
    # lengths 4, 3, 2 (prompt 1 + response 3/2/1), budget 8, one rank: sorted 4,3,2;
    # [4, 3] pads to 2×4 = 8 <= 8; adding 2 would need 3×4 = 12 > 8 -> [2] alone: 2.
    # padded 10 positions for 9 real tokens -> padding_frac 0.1
    mbs, m = make_micro_batches([ts(1, 1), ts(1, 3), ts(1, 2)], token_budget=8, n_ranks=1)
    assert [mb.input_ids.shape for mb in mbs[0]] == [(2, 4), (1, 2)]
    assert m["learner/padding_frac"] == pytest.approx(0.1)
    assert m["learner/micro_batches"] == 2 and m["learner/loss_tokens"] == 6


def _unsorted_padding(samples, budget):
    """The same greedy packing without sorting: a micro-batch pads to its longest sample so far."""
    padded, width, b = 0, 0, 0
    for s in samples:
        if b and (b + 1) * max(width, s.length) > budget:
            padded += b * width
            width, b = 0, 0
        width, b = max(width, s.length), b + 1
    return 1 - sum(s.length for s in samples) / (padded + b * width)


def test_budget_equal_counts_balance_and_sorting_lowers_padding():
    rng = np.random.default_rng(0)
    samples = [ts(int(rng.integers(1, 20)), int(rng.integers(1, 120))) for _ in range(64)]
    samples.append(ts(10, 500))  # longer than the budget: alone in its micro-batch
    budget = 400
    per_rank, m = make_micro_batches(samples, token_budget=budget, n_ranks=3)
    assert len({len(r) for r in per_rank}) == 1  # the same number of micro-batches on every rank
    for mbs in per_rank:
        for mb in mbs:
            assert mb.input_ids.size <= budget or mb.size == 1
    assert sum(mb.size for r in per_rank for mb in r) == len(samples)
    oversize = [mb for r in per_rank for mb in r if mb.input_ids.shape[1] == 510]
    assert len(oversize) == 1 and oversize[0].size == 1
    tokens = [sum(int(mb.attention_mask.sum()) for mb in r) for r in per_rank]
    assert max(tokens) / (sum(tokens) / 3) == pytest.approx(m["learner/rank_token_imbalance"])
    assert m["learner/rank_token_imbalance"] < 1.2  # the 510-token sample lands on a rank that gets less else
    assert m["learner/loss_tokens"] == sum(len(s.response_ids) for s in samples)
    assert m["learner/padding_frac"] < _unsorted_padding(samples, budget) / 2


def test_ranks_padded_with_empty_micro_batches():
    per_rank, m = make_micro_batches([ts(2, 5), ts(2, 4), ts(2, 3)], token_budget=100, n_ranks=4)
    assert [len(r) for r in per_rank] == [1, 1, 1, 1]
    assert [r[0].size for r in per_rank] == [1, 1, 1, 0]  # one each, then an empty one (b = 0)
    assert per_rank[3][0].n_tokens == 0 and per_rank[3][0].input_ids.shape == (0, 0)
    with pytest.raises(ValueError):
        make_micro_batches([], token_budget=0, n_ranks=1)
    empty, m = make_micro_batches([], token_budget=10, n_ranks=2)
    assert [len(r) for r in empty] == [0, 0] and m["learner/padding_frac"] == 0.0


# --- shared prompts -----------------------------------------------------------------------


def gs(pid, p, r, adv=1.0, truncated=False):
    """A sample of group `pid`: prompt 1..p (the group's), response 100.. of length r."""
    return TrainSample(np.arange(1, p + 1, dtype=np.int32), np.arange(100, 100 + r, dtype=np.int32),
                       -np.ones(r, np.float32), adv, 1.0, truncated, 0, pid)


def test_shared_micro_batch_layout():
    # group a: prompt [1, 2], responses of 3 and 1 tokens (the second truncated); group b: prompt [1, 2, 3]
    units = [[gs("a", 2, 3, adv=0.5), gs("a", 2, 1, adv=-2.0, truncated=True)], [gs("b", 3, 2, adv=1.0)]]
    mb = build_shared_micro_batch(units, pad_id=9, mask_truncated=True)
    assert mb.shared and mb.prompt_ids.tolist() == [[9, 1, 2], [1, 2, 3]]  # left-padded
    assert mb.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert mb.row_prompt.tolist() == [0, 0, 1]
    assert mb.input_ids.tolist() == [[100, 101, 102], [100, 9, 9], [100, 101, 9]]  # responses, right-padded
    assert mb.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert mb.loss_mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 0]]  # unshifted; the truncated row masked
    assert mb.advantages.tolist() == [[0.5, 0.5, 0.5], [-2.0, 0, 0], [1.0, 1.0, 0]]
    assert mb.behaviour_logprobs.tolist() == [[-1, -1, -1], [-1, 0, 0], [-1, -1, 0]]
    assert mb.n_tokens == 5 and mb.size == 3 and mb.positions == 6 + 9
    assert build_shared_micro_batch([[gs("c", 0, 2)]]).loss_mask.tolist() == [[0, 1]]  # nothing predicts token 0
    empty = build_shared_micro_batch([])
    assert empty.shared and empty.size == 0 and empty.n_tokens == 0
    with pytest.raises(ValueError, match="needs a sample"):
        build_shared_micro_batch([[]])


def test_shared_packing_runs_each_prompt_once_and_cuts_groups_over_the_budget():
    rng = np.random.default_rng(1)
    samples = [gs(f"g{g}", 10 + g, int(rng.integers(1, 30))) for g in range(6) for _ in range(8)]
    samples += [gs("big", 20, 60) for _ in range(8)]  # 20 + 8 x 60 > the budget: cut into pieces
    budget = 400
    per_rank, m = make_micro_batches(samples, token_budget=budget, n_ranks=2, share_prompts=True)
    assert m["learner/shared_prompts"] == 1
    _, mf = make_micro_batches(samples, token_budget=budget, n_ranks=2)
    mbs = [mb for r in per_rank for mb in r]
    assert len(per_rank[0]) == len(per_rank[1]) and all(mb.shared for mb in mbs)  # fillers too
    assert sum(mb.size for mb in mbs) == len(samples)
    assert all(mb.positions <= budget for mb in mbs)
    pieces = [mb for mb in mbs if mb.size and (mb.input_ids[:, 0] == 100).all() and mb.prompt_ids.shape[1] == 20]
    big_prompts = sum(int((mb.prompt_mask.sum(1) == 20).sum()) for mb in mbs)
    assert pieces and big_prompts == -(-8 // ((budget - 20) // 60))  # the big group in the fewest pieces
    for mb in mbs:  # every response row continues its own group's prompt
        for i, g in enumerate(mb.row_prompt):
            assert mb.prompt_mask[g].sum() >= 10
    assert m["learner/loss_tokens"] == mf["learner/loss_tokens"] == sum(len(s.response_ids) for s in samples)
    real = sum(int(mb.prompt_mask.sum() + mb.attention_mask.sum()) for mb in mbs)  # each piece's prompt once
    assert m["learner/positions"] == sum(mb.positions for mb in mbs)
    assert m["learner/padding_frac"] == pytest.approx(1 - real / m["learner/positions"])
    assert m["learner/shared_prompts"] == 1 and mf["learner/shared_prompts"] == 0
    assert m["learner/positions"] < mf["learner/positions"]


def test_shared_prompts_only_when_they_compute_fewer_positions():
    """Short prompts and responses of spread lengths: a group padded to its longest response costs
    more than its repeated prompt, so the flat form (sorted by length across groups) is built."""
    rng = np.random.default_rng(2)
    samples = [gs(f"g{g}", 2, int(rng.integers(1, 300))) for g in range(4) for _ in range(8)]
    shared, m = make_micro_batches(samples, token_budget=1200, n_ranks=1, share_prompts=True)
    _, mf = make_micro_batches(samples, token_budget=1200, n_ranks=1)
    assert m["learner/shared_prompts"] == 0 and not any(mb.shared for mb in shared[0])
    assert m["learner/positions"] == mf["learner/positions"]
    _, m = make_micro_batches([gs("a", 4, 2), gs("a", 4, 2), gs("b", 0, 2)], token_budget=100, n_ranks=1,
                              share_prompts=True)
    assert m["learner/shared_prompts"] == 0  # a prompt-less row: the trainer needs >= 1 prompt token
