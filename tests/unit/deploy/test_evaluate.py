"""`or1 eval` (deploy/evaluate.py, learner/evaluation.py): the unbiased pass@k against hand-computed
values, avg@n, per-source summaries, and a real run of the tiny model whose printed figures are
recomputed here from the per-problem rewards and rescored samples."""

from __future__ import annotations

import json
from fractions import Fraction
from math import comb

import pytest

from common.config import load_config
from common.data import Problem
from deploy.evaluate import evaluate, parse_ks
from learner.evaluation import default_ks, pass_at_k, summarize, summarize_by_source


@pytest.mark.parametrize("n, c, k, want", [
    (4, 0, 1, 0.0), (4, 1, 1, 0.25), (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (4, 3, 2, 1.0),  # n - c < k: every 2 of the 4 hold a solved one
    (4, 4, 4, 1.0), (16, 1, 4, 0.25), (10, 3, 5, 1 - comb(7, 5) / comb(10, 5)),
])
def test_pass_at_k_hand_values(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    n, c, k = 2000, 7, 500  # C(2000, 500) ~ 1e486: no float holds it
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_is_not_any_of_k():
    # with n = 8 samples, one solved: "any of the 8" says 1, the estimator for k = 2 says 1/4
    assert pass_at_k(8, 1, 2) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarize_hand_computed():
    rewards = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    s = summarize(rewards, [1, 2, 4])
    assert s["problems"] == 3
    assert s["avg@4"] == pytest.approx((0.25 + 0.5 + 0) / 3)
    assert s["pass@1"] == pytest.approx(0.25)
    assert s["pass@2"] == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    assert s["pass@4"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same number"):
        summarize([[1, 0], [1]], [1])


def test_summarize_by_source_groups_by_the_rows_data_source():
    def p(ds):
        return Problem("x", [], "math", "1", source="file", data_source=ds)

    out = summarize_by_source([(p("aime24"), [1, 1]), (p("aime24"), [0, 0]), (p("aime25"), [1, 0])], [1, 2])
    assert out["sources"]["aime24"] == {"problems": 2, "avg@2": 0.5, "pass@1": 0.5, "pass@2": 0.5}
    assert out["sources"]["aime25"]["pass@2"] == 1.0 and out["overall"]["problems"] == 3


def test_ks():
    assert default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]
    assert parse_ks("8,1", 8) == [1, 8]
    with pytest.raises(ValueError):
        parse_ks("16", 8)


def test_or1_eval_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    """Two data sources in one plain-schema file; figures recomputed from --out, samples rescored."""
    from bus.messages import ScoreItem
    from common.config import RewardConfig
    from rewards.core import score_one

    rows = [{"id": f"q{a}{b}", "prompt": f"{a}+{b}", "answer": str(a + b), "data_source": "small" if a < 3 else "big"}
            for a in range(6) for b in (1, 4)]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(overrides=["actor.engine=hf", "actor.max_model_len=64", "reward.workers=1"])
    out = tmp_path / "per_problem.jsonl"
    assert evaluate(str(tiny_model_dir), cfg, data=str(data), samples=4, temperature=1.0, max_tokens=8,
                    out=str(out)) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    per = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(per) == len(rows) and printed["problems"] == len(rows)
    gold = {r["id"]: r["answer"] for r in rows}
    for rec in per:  # the rewards are the training rewards of these very responses
        assert len(rec["rewards"]) == 4
        for text, reward in zip(rec["responses"], rec["rewards"]):
            assert score_one(ScoreItem("math", text, gold[rec["id"]]), RewardConfig()).reward == reward
    for name, recs in [("small", [r for r in per if r["data_source"] == "small"]),
                       ("big", [r for r in per if r["data_source"] == "big"])]:
        got = printed["sources"][name]
        assert got["problems"] == len(recs)
        assert got["avg@4"] == pytest.approx(sum(sum(r["rewards"]) for r in recs) / (4 * len(recs)))
        for k in (1, 2, 4):
            want = sum(1 - comb(4 - r["solved"], k) / comb(4, k) for r in recs) / len(recs)
            assert got[f"pass@{k}"] == pytest.approx(want)
    # the warm-started tiny model solves some, not all: the figures are not trivially 0 or 1
    assert 0 < printed["avg@4"] < 1 and printed["pass@1"] < printed["pass@4"]
