"""learner/advantage.py: reward shaping, zero-advantage classification and group advantages,
against hand-worked numbers (the arithmetic is in the comments)."""

import numpy as np
import pytest

from learner.advantage import (
    ADV_EPS, ALL_CORRECT, ALL_WRONG, USEFUL, classify, group_advantages, shape_reward, shape_rewards,
)


def test_group_advantages_hand_values():
    r = np.array([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    a = group_advantages(r)
    assert a.dtype == np.float32
    # [1,0,0,0]: mean 0.25; unbiased var = (0.75² + 3·0.25²)/3 = (0.5625 + 0.1875)/3 = 0.25, std 0.5
    # -> 0.75/0.5 = 1.5 and -0.25/0.5 = -0.5 (the +1e-6 moves the 6th digit)
    assert np.allclose(a[0], [1.5, -0.5, -0.5, -0.5], atol=1e-5)
    assert a[0, 0] == pytest.approx(0.75 / (0.5 + ADV_EPS), rel=1e-6)
    # all equal: numerator 0 -> exactly 0, not NaN
    assert np.array_equal(a[1], np.zeros(4)) and np.array_equal(a[2], np.zeros(4))
    # [1,0,1,0]: mean 0.5, unbiased var = 4·0.25/3 = 1/3, std 0.57735 -> ±0.5/0.57735 = ±0.866025
    assert np.allclose(a[3], [0.866025, -0.866025, 0.866025, -0.866025], atol=1e-5)


def test_one_group_equals_its_row_and_single_samples_are_zero():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2, size=(16, 8)).astype(np.float32)
    rows = np.stack([group_advantages(row) for row in r])
    assert np.array_equal(rows, group_advantages(r))
    assert np.array_equal(group_advantages(np.array([[1.0], [0.0]])), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="scalar"):
        group_advantages(np.float32(1.0))


def test_classify_zero_advantage_groups():
    assert classify(np.array([1, 1, 1.0])) == ALL_CORRECT
    assert classify(np.array([0, 0, 0.0])) == ALL_WRONG
    assert classify(np.array([0.5, 0.5])) == ALL_WRONG  # equal but below SOLVED_REWARD
    assert classify(np.array([1, 0, 1.0])) == USEFUL


def test_truncated_responses_score_zero_only_when_asked():
    assert shape_reward(1.0, "length", zero_truncated=True) == 0.0
    assert shape_reward(1.0, "length", zero_truncated=False) == 1.0
    assert shape_reward(1.0, "stop", zero_truncated=True) == 1.0
    r = shape_rewards([1.0, 1.0, 0.0], ["stop", "length", "length"], zero_truncated=True)
    assert r.dtype == np.float32 and r.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError):  # one finish reason per reward
        shape_rewards([1.0, 1.0], ["stop"], zero_truncated=True)
