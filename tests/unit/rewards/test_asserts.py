"""Assertion tests split into trusted cases (pure: the oracle here is an in-process stand-in)."""

from __future__ import annotations

import ast

import pytest

from rewards.asserts import CASE_FN, BadReference, Case, build_plan, judge
from rewards.results import ListValue, Opaque


class FakeOracle:
    """Evaluates like the sandboxed oracle (prefix, then setup, then each expression), in process."""

    def __init__(self):
        self.calls: list[tuple[str, list[str], list[str]]] = []

    def __call__(self, prefix: str, setup: list[str], exprs: list[str]):
        self.calls.append((prefix, setup, exprs))
        ns: dict = {}
        exec(prefix, ns)
        for s in setup:
            exec(s, ns)
        out = []
        for e in exprs:
            try:
                value = eval(e, ns)
                out.append((True, ListValue(tuple(_values(value))) if hasattr(value, "next") else value))
            except Exception as err:  # noqa: BLE001
                out.append((False, repr(err)))
        return out


def _values(node):
    while node is not None:
        yield node.val
        node = node.next


PREFIX = """\
class ListNode:
    def __init__(self, val=0, next=None):
        self.val, self.next = val, next
def list_node(values):
    head = None
    for v in reversed(values):
        head = ListNode(v, head)
    return head
"""

SHAPES = """\
import math
LIMIT = 10
def helper(x):
    return x * 3
def check(candidate):
    assert candidate(1) == 1001
    assert 1002 == candidate(2), "reversed"
    assert candidate(3) != 1003
    assert candidate(4) is None
    assert candidate(5) is not True
    assert abs(candidate(6) - 1006.5) < 1e-6
    assert 1e-3 >= math.fabs(1007 - candidate(7))
    assert math.isclose(candidate(8), 1008.0, rel_tol=1e-9)
    assert is_same_list(candidate(list_node([9])), list_node([1009, 2009]))
    assert candidate(10)
    assert not candidate(11)
    assert candidate(12) == helper(LIMIT) + 1012
    assert True, "always"
"""


def test_every_shape_becomes_a_case_and_no_expected_value_reaches_the_sandbox():
    oracle = FakeOracle()
    plan = build_plan(SHAPES, "f", PREFIX, oracle)
    kinds = [c.kind for c in plan.cases]
    assert kinds == ["eq", "eq", "ne", "is", "is_not", "close", "close", "isclose", "eq", "truth", "falsy",
                     "eq"]
    assert [c.expected for c in plan.cases] == [1001, 1002, 1003, None, True, 1006.5, 1007, 1008.0,
                                                ListValue((1009, 2009)), None, None, 1042]
    assert plan.cases[5].tol == 1e-6 and plan.cases[5].op == "<"
    assert plan.cases[6].tol == 1e-3 and plan.cases[6].op == "<="
    assert plan.cases[7].options == (("rel_tol", 1e-9),)
    assert plan.unverified == 0 and plan.prefix == PREFIX and plan.entry_point == "f"
    for marker in ("100", "1012", "2009", "is_same_list", "helper(LIMIT)", "always", "reversed"):
        assert marker not in plan.test, marker
    assert plan.test.count(CASE_FN) == 12
    compile(plan.test, "test.py", "exec")
    # only the non-literals went to the oracle, with the deterministic setup
    [(prefix, setup, exprs)] = oracle.calls
    assert prefix == PREFIX and exprs == ["list_node([1009, 2009])", "helper(LIMIT) + 1012"]
    assert setup[0] == "import math" and setup[1] == "LIMIT = 10" and setup[2].startswith("def helper")


def test_what_cannot_be_split_stays_and_is_counted():
    test = """\
import random
SEED = random.random()
def check(candidate):
    x = candidate(0)
    assert x == 5
    for k in range(3):
        assert candidate(k) == k
    assert candidate(1) == x
    assert candidate(2) == SEED
    assert (candidate(3) == 4) == True
    assert candidate(4) in (1, 2)
    assert candidate(5) == program_helper(5)
    check_more(candidate)
"""
    plan = build_plan(test, "f", "", FakeOracle())
    # `x == 5` is safe: the sandbox reports x; the rest needs values the scorer cannot trust
    assert [(c.kind, c.expected) for c in plan.cases] == [("eq", 5)]
    # the loop, candidate(1) == x (a local), SEED (random at module level), the comparison inside the
    # actual side, `in`, a name the oracle lacks, and the bare call
    assert plan.unverified == 7
    assert "range(3)" in plan.test and "program_helper(5)" in plan.test and "(1, 2)" in plan.test


def test_module_level_asserts_need_literal_expected_values():
    test = ("import math\nassert add(1, 2) == 3\nassert add(2, 2) == math.pi\n"
            "assert is_even(4)\nassert not is_even(3)\n")
    plan = build_plan(test, "", "", FakeOracle())
    assert [(c.kind, c.expected) for c in plan.cases] == [("eq", 3), ("truth", None), ("falsy", None)]
    assert plan.unverified == 1 and "math.pi" in plan.test


@pytest.mark.parametrize("test,entry,prefix,reason", [
    ("def check(candidate):\n    assert candidate(", "f", "", "test code does not parse"),
    ("def check(c):\n    assert c(1) == 2\n", "f", "class (", "import prefix does not parse"),
    ("assert f(1) == 2\n", "f", "", "defines no check"),
    ("def check():\n    assert True\n", "f", "", "takes no parameter"),
    ("def check(c):\n    assert c(1) == 2\n", "__import__('os').system('x')", "", "calls with arguments"),
    ("def check(c):\n    assert c(1) == 2\n", "f[0]", "", "not a name, attribute or call"),
    ("def check(c):\n    pass\n", "f", "", "checks nothing"),
    ("def check(c):\n    assert True\n", "f", "", "checks nothing"),
    ("def check(c):\n    assert c(1) == " + "[" * 5000 + "]" * 5000 + "\n", "f", "", "does not parse"),
])
def test_unusable_tests_are_bad_references(test, entry, prefix, reason):
    with pytest.raises(BadReference, match=reason):
        build_plan(test, entry, prefix, FakeOracle())


def test_entry_points_that_build_objects_are_fine():
    plan = build_plan("def check(candidate):\n    assert candidate(nums=[1]) == [0]\n", "Solution().f", "",
                      FakeOracle())
    assert plan.entry_point == "Solution().f" and plan.cases == (Case("eq", 2, [0]),)


@pytest.mark.parametrize("kind,value,expected,ok", [
    ("eq", [1, 2], [1, 2], True),
    ("eq", (1, 2), [1, 2], False),  # Python's == (the test's own semantics)
    ("eq", 1, 1.0, True),
    ("eq", True, 1, True),
    ("eq", {1, 2}, frozenset({2, 1}), True),
    ("eq", float("nan"), float("nan"), False),
    ("eq", ListValue((1, 2)), ListValue((1, 2)), True),
    ("eq", None, ListValue(()), False),
    ("ne", 3, 4, True),
    ("is", None, None, True),
    ("is", 0, None, False),
    ("is", 1, True, False),
    ("is_not", 1, True, True),
    ("truth", [0], None, True),
    ("truth", [], None, False),
    ("falsy", 0, None, True),
    ("eq", Opaque("Weird", True), 3, False),
    ("truth", Opaque("Weird", True), None, True),
    ("falsy", Opaque("Weird", True), None, False),
    ("is_not", Opaque("Weird", False), None, True),
])
def test_judge(kind, value, expected, ok):
    assert (judge(Case(kind, 1, expected), value) == "") is ok


def test_judge_tolerances():
    assert judge(Case("close", 1, 2.0, tol=1e-6, op="<"), 2.0000001) == ""
    assert judge(Case("close", 1, 2.0, tol=1e-6, op="<"), 2.1) == "wrong answer"
    assert judge(Case("close", 1, 2.0, tol=0.5, op="<="), 2.5) == ""
    assert judge(Case("close", 1, 2.0, tol=0.5, op="<"), 2.5) == "wrong answer"
    assert judge(Case("close", 1, 2.0, tol=0.1, op="<"), "2.0") == "wrong answer"  # TypeError is a fail
    assert judge(Case("isclose", 1, 1.0, options=(("rel_tol", 1e-3),)), 1.0005) == ""
    assert judge(Case("isclose", 1, 1.0), 1.0005) == "wrong answer"


def test_rewritten_test_keeps_order_and_scope():
    test = "def check(candidate):\n    y = 2\n    assert candidate(y) == 4\n    assert candidate(3) == 6\n"
    plan = build_plan(test, "f", "", FakeOracle())
    body = ast.parse(plan.test).body[0].body
    assert isinstance(body[0], ast.Assign)
    assert [ast.unparse(s) for s in body[1:]] == [f"{CASE_FN}(0, lambda: candidate(y))",
                                                  f"{CASE_FN}(1, lambda: candidate(3))"]
