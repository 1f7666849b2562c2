"""What a group's rewards become before the loss: reward shaping, zero-advantage classification,
group-normalised advantages. The one home of these rules (docs/training.md#loss); the scheduler, the
reward breakdown, evaluation and the buffer all call it. Pure numpy.

For one group (one prompt, n samples, scorer rewards s_1..s_n, finish reasons f_i)::

    r_i = 0 if f_i = "length" and loss.zero_truncated_reward else s_i       (shape_rewards)
    kind = "all_correct"  if every r_i equal and r_1 >= SOLVED_REWARD         (classify)
           "all_wrong"    if every r_i equal otherwise
           "useful"       else
    A_i = (r_i - mean(r)) / (std(r) + ADV_EPS)    std unbiased (n - 1); n = 1 -> 0   (group_advantages)

A truncated response scores 0 whatever the scorer said: Skywork-OR1 (§3.2.3) found that masking
truncated responses out instead hurts, and a cut-off answer that happens to parse is luck, not
skill. An all-equal group has A_i = 0 exactly: it gives no policy gradient and is dropped before
batching (only `loss.keep_zero_advantage`, for systems benchmarks of untrained models, keeps it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bus.messages import FINISH_LENGTH

ADV_EPS = 1e-6  # Skywork-OR1 / verl's epsilon in the advantage denominator
SOLVED_REWARD = 1.0  # a sample with reward >= this counts as solved (pass rate, all-correct filter)
USEFUL, ALL_CORRECT, ALL_WRONG = "useful", "all_correct", "all_wrong"


def shape_reward(reward: float, finish_reason: str, zero_truncated: bool) -> float:
    """One sample's training reward: 0 for a truncated response when `zero_truncated`."""
    return 0.0 if zero_truncated and finish_reason == FINISH_LENGTH else float(reward)


def shape_rewards(rewards: Sequence[float] | np.ndarray, finish_reasons: Sequence[str],
                  zero_truncated: bool) -> np.ndarray:
    """A group's training rewards, float32 [n] (`shape_reward` per sample)."""
    return np.array([shape_reward(r, f, zero_truncated) for r, f in zip(rewards, finish_reasons, strict=True)],
                    dtype=np.float32)


def classify(rewards: np.ndarray) -> str:
    """USEFUL, or for a zero-advantage group (all rewards equal) ALL_CORRECT / ALL_WRONG."""
    r = np.asarray(rewards)
    if r.size and np.all(r == r.flat[0]):
        return ALL_CORRECT if r.flat[0] >= SOLVED_REWARD else ALL_WRONG
    return USEFUL


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """Advantages of one group [n] (or of groups [G, n]), float32: (r - mean) / (std + ADV_EPS) with
    the unbiased std. All-equal groups give exactly 0 (numerator 0, not NaN); a group of one sample
    gives 0 (its std is undefined). Computed in float64 so the result does not depend on n's rounding."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim == 0:
        raise ValueError("rewards must be [samples] or [groups, samples], got a scalar")
    if r.shape[-1] < 2:
        return np.zeros(r.shape, dtype=np.float32)
    mean = r.mean(axis=-1, keepdims=True)
    std = r.std(axis=-1, ddof=1, keepdims=True)
    return ((r - mean) / (std + ADV_EPS)).astype(np.float32)
