"""learner/reward_stats.py: rewards per kind and per source between two steps, hand-computed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from bus.messages import ScoreOut
from learner.reward_stats import RewardBreakdown, error_code
from learner.scheduler import Prompt


@dataclass
class S:
    token_ids: list
    finish_reason: str = "stop"


def prompt(kind: str, source: str) -> Prompt:
    return Prompt("p", np.array([1], np.int32), kind, "ref", source)


def test_breakdown_by_kind_and_source():
    b = RewardBreakdown(zero_truncated_reward=True)
    b.add(prompt("math", "addition"), [S([1, 2]), S([1, 2, 3, 4])], [ScoreOut(1.0), ScoreOut(0.0)])
    # a truncated response scores 0 whatever the scorer said, as in training
    b.add(prompt("math", "deepscaler"), [S([1] * 6, "length"), S([1] * 2)], [ScoreOut(1.0), ScoreOut(1.0)])
    b.add(prompt("code", "taco"), [S([1] * 3), S([1] * 5)],
          [ScoreOut(0.0, error="bad_reference: reference is not JSON"), ScoreOut(0.0, error="bad_reference: x")])
    m = b.take()
    assert m["reward/math/mean"] == pytest.approx(2 / 4) and m["reward/math/pass_rate"] == pytest.approx(0.5)
    assert m["reward/math/response_len"] == pytest.approx((2 + 4 + 6 + 2) / 4) and m["reward/math/samples"] == 4
    assert m["reward/addition/mean"] == 0.5 and m["reward/deepscaler/mean"] == 0.5
    assert m["reward/code/mean"] == 0.0 and m["reward/code/response_len"] == 4.0
    assert m["reward/taco/errors"] == 2 and m["reward/addition/errors"] == 0
    assert m["reward/errors"] == 2 and m["reward/errors/bad_reference"] == 2
    assert "reward/code/errors" not in m
    assert b.take() == {"reward/errors": 0.0}  # a new window: nothing scored, no kind reported


def test_truncated_reward_kept_when_the_rule_is_off():
    b = RewardBreakdown(zero_truncated_reward=False)
    b.add(prompt("math", "s"), [S([1], "length")], [ScoreOut(1.0)])
    assert b.take()["reward/math/mean"] == 1.0


@pytest.mark.parametrize("error, code", [("bad_reference: no format", "bad_reference"), ("timeout", "timeout"),
                                         ("no ```python code block", "no_python_code_block"),
                                         ("ValueError: boom", "valueerror"), ("", "unknown")])
def test_error_codes(error, code):
    assert error_code(error) == code
