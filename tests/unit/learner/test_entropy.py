"""learner/entropy.py: the Skywork-OR1 adaptive entropy controller."""

import json

import pytest

from common.config import EntropyConfig
from learner.entropy import EntropyController


def cfg(**kw):
    return EntropyConfig(**{"target": 0.2, "delta": 1e-4, "coef_min": 0.0, "coef_max": 0.005, **kw})


def test_rises_below_target_and_gates_alpha():
    c = EntropyController(cfg())
    assert c.coef == 0.0 and c.alpha() == 0.0  # no measurement yet
    m = c.update(0.1)  # below target: c = 0 + 1e-4, bonus active
    assert m == {"entropy/coef": pytest.approx(1e-4), "entropy/alpha": pytest.approx(1e-4)}
    c.update(0.15)
    assert c.coef == pytest.approx(2e-4) and c.alpha() == pytest.approx(2e-4)


def test_falls_above_target_and_alpha_is_zero_there():
    c = EntropyController(cfg(coef_init=0.003))
    m = c.update(0.5)  # above target: c = 0.003 - 1e-4 = 0.0029, but no bonus above target
    assert m["entropy/coef"] == pytest.approx(0.0029) and m["entropy/alpha"] == 0.0
    assert c.alpha() == 0.0
    c.update(0.2)  # exactly at target: c unchanged, and the strict `<` gate gives alpha 0
    assert c.coef == pytest.approx(0.0029) and c.alpha() == 0.0


def test_clipped_at_both_bounds():
    c = EntropyController(cfg())
    for _ in range(60):  # 50 steps of 1e-4 reach the 0.005 cap; 10 more stay there
        c.update(0.0)
    assert c.coef == pytest.approx(0.005) and c.alpha() == pytest.approx(0.005)
    for _ in range(60):
        c.update(1.0)
    assert c.coef == 0.0 and c.alpha() == 0.0
    c.update(1.0)
    assert c.coef == 0.0  # not below coef_min


def test_paper_delta_is_one_value_away():
    c = EntropyController(cfg(delta=0.005, coef_max=1.0))
    c.update(0.1)
    c.update(0.1)
    assert c.coef == pytest.approx(0.01)


def test_disabled_means_alpha_zero():
    c = EntropyController(cfg(enabled=False, coef_init=0.002))
    for e in (0.0, 0.1, 5.0):
        m = c.update(e)
        assert m == {"entropy/coef": 0.002, "entropy/alpha": 0.0}
    assert c.alpha() == 0.0


def test_state_round_trip_mid_run_continues_identically():
    seq = [0.5, 0.3, 0.1, 0.05, 0.19, 0.25, 0.1, 0.1, 0.3, 0.0]
    a = EntropyController(cfg())
    for e in seq[:5]:
        a.update(e)
    b = EntropyController(cfg())
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # JSON-safe, as a checkpoint stores it
    assert b.alpha() == a.alpha() and b.coef == a.coef
    for e in seq[5:]:
        assert a.update(e) == b.update(e)
        assert a.alpha() == b.alpha()
    assert a.state_dict() == b.state_dict()


def test_non_finite_entropy_rejected_and_bad_config_refused():
    c = EntropyController(cfg())
    with pytest.raises(ValueError):
        c.update(float("nan"))
    assert c.steps == 0
    with pytest.raises(ValueError):
        EntropyConfig(coef_init=0.01, coef_max=0.005)
