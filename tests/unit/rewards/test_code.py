"""Code reward: parsing of responses and references (pure), and real programs through the
sandbox for every reference format, right and wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reward_refs import LEETCODE_PREFIX, block, leetcode, needs_sandbox

from common.config import RewardConfig
from rewards.code import (
    AssertTests,
    CallTests,
    StdioTests,
    call_output_matches,
    extract_program,
    normalize_output,
    parse_spec,
    score_code,
)

CFG = RewardConfig(code_timeout_s=3.0, code_item_timeout_s=20.0)
SKYWORK_SAMPLE = Path(__file__).parents[3] / "common" / "toydata" / "skywork_sample.jsonl"


# --- pure parts -------------------------------------------------------------------------------


def test_extract_program_takes_last_python_block_after_think():
    resp = ("<think>```python\nprint('draft')\n```</think>\n"
            "```python\nprint(1)\n```\n```python3\nprint(2)\n```")
    assert extract_program(resp) == "print(2)\n"
    assert extract_program("<think>```python\nprint(1)\n```</think> no code") is None
    assert extract_program("```js\nconsole.log(1)\n```") is None
    assert extract_program("```python\nx = 1\n```") == "x = 1\n"


def test_parse_spec_formats():
    stdio = parse_spec('{"inputs": ["1\\n", ["a", "b"]], "outputs": ["2", ["c"]]}')
    assert stdio == StdioTests(["1\n", "a\nb"], ["2", "c"])
    assert parse_spec({"fn_name": "f", "inputs": [[1, 2]], "outputs": [3]}) == CallTests("f", [[1, 2]], [3])
    # LiveCodeBench: one JSON value per line, outputs as JSON text
    lcb = parse_spec({"fn_name": "f", "inputs": ["[1,2]\n3"], "outputs": ["[0, 1]"]})
    assert lcb == CallTests("f", [[[1, 2], 3]], [[0, 1]])
    double_encoded = json.dumps(json.dumps({"test": "assert 1", "entry_point": ""}))
    assert parse_spec(double_encoded) == AssertTests("assert 1", "")
    lc = parse_spec({"import_prefix": "import math\n", "test_code": "def check(candidate): ...",
                     "entry_point": " Solution().twoSum "})
    assert lc == AssertTests("def check(candidate): ...", "Solution().twoSum", "import math\n")
    assert parse_spec({"assert_case": ["assert f(1) == 2", "assert f(2) == 3"]}) == AssertTests(
        "assert f(1) == 2\nassert f(2) == 3", "", "")


def test_skywork_sample_code_rows_all_parse():
    rows = [json.loads(line) for line in SKYWORK_SAMPLE.read_text().splitlines()]
    code = [r["reward_model"]["ground_truth"] for r in rows if r["ability"] == "code"]
    kinds = [type(parse_spec(ref)).__name__ for ref in code]
    assert kinds == ["StdioTests", "StdioTests", "CallTests", "AssertTests"]


@pytest.mark.parametrize("bad,reason", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"inputs": [1]}', "none of the known formats"),
    ('{"import_prefix": "x", "entry_point": "f"}', "none of the known formats"),
    ('{"test_code": 5}', "'test_code' must be a string"),
    ('{"test_code": "", "import_prefix": 3}', "'import_prefix' must be a string"),
    ('{"assert_case": "assert 1"}', "'assert_case' must be"),
    ('{"inputs": [1, 2], "outputs": [1]}', "2 inputs and 1 outputs"),
    ('{"inputs": [], "outputs": []}', "0 inputs"),
    ('{"test": 5}', "'test' must be a string"),
])
def test_parse_spec_rejects(bad: str, reason: str):
    with pytest.raises(ValueError, match=reason):
        parse_spec(bad)


def test_normalize_output():
    assert normalize_output("1 2  \n3\t\n\n\n") == "1 2\n3"
    assert normalize_output("a\r\nb\r\n") == "a\nb"
    assert normalize_output(" lead") == " lead"  # leading space is significant


def test_call_output_matches():
    assert call_output_matches([1, 2], [1, 2])
    assert call_output_matches(3, [3])  # APPS wraps outputs
    assert not call_output_matches(3, [3, 3])
    assert call_output_matches(True, True) and not call_output_matches("3", 3)


def test_unjudgeable_items_carry_an_error():
    mbpp = '{"test": "assert f(1) == 2"}'
    assert score_code("no code here", mbpp, CFG).error == "no ```python code block"
    out = score_code(block("def f(:\n  pass"), mbpp, CFG)
    assert out.reward == 0.0 and out.detail.startswith("syntax error") and out.error == ""


@pytest.mark.parametrize("ref,reason", [
    ("{bad", "reference is not JSON"),
    ('{"fn_name": "f"}', "none of the known formats"),
    ('{"test": "assert True"}', "checks nothing"),
    ('{"test": "assert f(1) == 2", "entry_point": "f"}', "defines no check"),
    ('{"test_code": "def check(candidate):\\n    assert candidate(", "entry_point": "f"}', "does not parse"),
])
def test_bad_references_are_a_distinct_error_not_a_silent_zero(ref: str, reason: str, capsys):
    """Any reference no format parses: reward 0 with error `bad_reference: <why>`, logged."""
    out = score_code(block("def f(x):\n    return x"), ref, CFG)
    assert out.reward == 0.0 and out.error.startswith("bad_reference: ") and reason in out.error, out
    assert out.error.split(":")[0] == "bad_reference"
    assert "code/bad_reference" in capsys.readouterr().out


# --- real runs --------------------------------------------------------------------------------

STDIO = json.dumps({"inputs": ["1 2\n", "10 -3\n", "0 0"], "outputs": ["3\n", "7", "0\n\n"]})
CALL = json.dumps({"fn_name": "add", "inputs": [[1, 2], [10, -3]], "outputs": [3, [7]]})
CALL_LCB = json.dumps({"fn_name": "twoSum", "inputs": ["[2,7,11,15]\n9", "[3,2,4]\n6"],
                       "outputs": ["[0, 1]", "[1, 2]"]})
ASSERT = json.dumps({"test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"
                             "    assert candidate(-1, 1) == 0\n", "entry_point": "add"})
MBPP = json.dumps({"test": "assert add(1, 2) == 3\nassert add(2, 2) == 4"})

ROWS = [
    ("stdio right", "a, b = map(int, input().split())\nprint(a + b)   ", STDIO, 1.0),
    ("stdio wrong", "a, b = map(int, input().split())\nprint(a * b)", STDIO, 0.0),
    ("stdio crash", "print(1 / 0)", STDIO, 0.0),
    ("stdio uses prelude", "n = list(map(int, input().split()))\nprint(reduce(add, n))", STDIO, 1.0),
    ("call function", "def add(a, b):\n    return a + b", CALL, 1.0),
    ("call class", "class Solution:\n    def add(self, a: int, b: int) -> int:\n        return a + b",
     CALL, 1.0),
    ("call wrong", "def add(a, b):\n    return a - b", CALL, 0.0),
    ("call missing fn", "def plus(a, b):\n    return a + b", CALL, 0.0),  # operator.add must not count
    ("assert missing fn", "def plus(a, b):\n    return a + b", ASSERT, 0.0),
    ("mbpp missing fn", "x = 1", MBPP, 0.0),
    ("call lcb tuple result",
     "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
     "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
     "                return (seen[target - x], i)\n            seen[x] = i", CALL_LCB, 1.0),
    ("call lcb wrong", "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 0]",
     CALL_LCB, 0.0),
    ("assert right", "def add(a, b):\n    return a + b", ASSERT, 1.0),
    ("assert wrong", "def add(a, b):\n    return a * b", ASSERT, 0.0),
    ("mbpp right", "def add(a, b):\n    return a + b", MBPP, 1.0),
    ("mbpp wrong", "def add(a, b):\n    return 3", MBPP, 0.0),
    ("main guard", "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(1, 1))",
     ASSERT, 1.0),
]


@needs_sandbox
@pytest.mark.parametrize("name,code,ref,expected", ROWS, ids=[r[0] for r in ROWS])
def test_programs(name: str, code: str, ref: str, expected: float):
    out = score_code(block(code), ref, CFG)
    assert out.error == ""
    assert out.reward == expected, out


@needs_sandbox
def test_call_case_timeout_and_detail():
    out = score_code(block("def add(a, b):\n    while a == 10:\n        pass\n    return a + b"), CALL,
                     RewardConfig(code_timeout_s=1.0))
    assert out.reward == 0.0 and out.detail == "case 1: timeout"


@needs_sandbox
def test_item_budget_stops_long_stdio_runs():
    many = json.dumps({"inputs": [""] * 50, "outputs": ["x"] * 50})
    cfg = RewardConfig(code_timeout_s=1.0, code_item_timeout_s=1.5)
    out = score_code(block("import time\ntime.sleep(0.4)\nprint('x')"), many, cfg)
    assert out.reward == 0.0 and ("budget" in out.detail or "timeout" in out.detail), out


@needs_sandbox
def test_cpu_limit_scales_with_cases_in_one_run():
    # three cases of 0.6 s CPU each in one harness run: over a 1 s budget, within 3 × 1 s
    code = ("import time\ndef add(a, b):\n    t = time.process_time()\n"
            "    while time.process_time() - t < 0.6:\n        pass\n    return a + b")
    three = json.dumps({"fn_name": "add", "inputs": [[1, 2], [2, 2], [3, 2]], "outputs": [3, 4, 5]})
    out = score_code(block(code), three, RewardConfig(code_cpu_s=1, code_timeout_s=3.0))
    assert out.reward == 1.0, out


# --- LeetCode (Skywork's rows) and more assertion shapes ------------------------------------------------

TWO_SUM = """\
class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
"""
SAMPLE_LEETCODE = json.loads(SKYWORK_SAMPLE.read_text().splitlines()[9])["reward_model"]["ground_truth"]
REVERSE_LIST = leetcode([
    "assert is_same_list(candidate(head = list_node([1, 2, 3, 4, 5])), list_node([5, 4, 3, 2, 1]))",
    "assert is_same_list(candidate(head = list_node([1, 2])), list_node([2, 1]))",
    "assert is_same_list(candidate(head = list_node([])), list_node([]))"], "Solution().reverseList")
REVERSE_RIGHT = """\
class Solution:
    def reverseList(self, head: Optional[ListNode]) -> Optional[ListNode]:
        prev = None
        while head:
            head.next, prev, head = prev, head, head.next
        return prev
"""
REVERSE_TO_PYTHON_LIST = """\
class Solution:
    def reverseList(self, head):
        out = []
        while head:
            out.insert(0, head.val)
            head = head.next
        return out
"""
REVERSE_OWN_NODES = """\
class Node:
    def __init__(self, val, next=None):
        self.val, self.next = val, next
class Solution:
    def reverseList(self, head):
        prev = None
        while head:
            prev = Node(head.val, prev)
            head = head.next
        return prev
"""
INVERT_TREE = leetcode([
    "assert is_same_tree(candidate(root = tree_node([4, 2, 7, 1, 3, 6, 9])),"
    " tree_node([4, 7, 2, 9, 6, 3, 1]))",
    "assert is_same_tree(candidate(root = tree_node([2, 1, None, 5])), tree_node([2, None, 1, None, 5]))",
    "assert candidate(root = tree_node([])) is None"], "Solution().invertTree")
INVERT_RIGHT = """\
class Solution:
    def invertTree(self, root):
        if root:
            root.left, root.right = self.invertTree(root.right), self.invertTree(root.left)
        return root
"""
MAX_DEPTH = leetcode(["assert candidate(root = tree_node([3, 9, 20, None, None, 15, 7])) == 3",
                      "assert candidate(root = tree_node([1, None, 2])) == 2",
                      "assert candidate(root = tree_node([])) == 0"], "Solution().maxDepth")
MAX_DEPTH_RIGHT = """\
class Solution:
    def maxDepth(self, root: Optional[TreeNode]) -> int:
        return 1 + max(self.maxDepth(root.left), self.maxDepth(root.right)) if root else 0
"""
FIB = leetcode(["assert candidate(n = 2) == 1", "assert candidate(n = 10) == 55",
                "assert candidate(n = 38) == 39088169"], "Solution().fib")
FIB_FAST = """\
class Solution:
    def fib(self, n: int) -> int:
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a
"""
FIB_SLOW = """\
class Solution:
    def fib(self, n: int) -> int:
        return n if n < 2 else self.fib(n - 1) + self.fib(n - 2)
"""
FRESH = leetcode(["assert candidate(x = 1) == 2", "assert candidate(x = 5) == 6"], "Solution().step")
STATEFUL = """\
class Solution:
    def __init__(self):
        self.n = 0
    def step(self, x):
        self.n += 1
        return x + self.n
"""
HUMANEVAL_SHAPES = json.dumps({"test": (
    "def check(candidate):\n"
    "    assert abs(candidate([1.0, 2.0]) - 1.5) < 1e-6\n"
    "    assert candidate([]) is None, 'empty'\n"
    "    assert candidate([4.0]) == 4.0\n"), "entry_point": "mean"})
MEAN_RIGHT = "def mean(xs):\n    if not xs:\n        return None\n    return sum(xs) / len(xs)"
HUMANEVAL_LOOP = json.dumps({"test": (
    "def check(candidate):\n    assert candidate(2) == 4\n"
    "    for x in range(50):\n        assert candidate(x) == 2 * x\n"), "entry_point": "double"})
ASSERT_CASE = json.dumps({"assert_case": ["assert is_even(4)", "assert not is_even(7)",
                                          "assert is_even(0) == True"]})
# right on the asserts a prompt shows (the first two), wrong only on the last, hidden one
TWO_SUM_HIDDEN_WRONG = TWO_SUM.replace("        seen = {}\n",
                                       "        seen = {}\n"
                                       "        if nums == [3, 3]:\n"
                                       "            return [1, 0]\n")

LEETCODE_ROWS = [
    ("sample twoSum right", TWO_SUM, SAMPLE_LEETCODE, 1.0),
    ("sample twoSum wrong order", TWO_SUM.replace("[seen[target - x], i]", "[i, seen[target - x]]"),
     SAMPLE_LEETCODE, 0.0),
    ("sample twoSum wrong on a hidden assert", TWO_SUM_HIDDEN_WRONG, SAMPLE_LEETCODE, 0.0),
    ("twoSum function, no Solution class", "def twoSum(nums, target):\n    return [0, 1]",
     SAMPLE_LEETCODE, 0.0),
    ("ListNode right", REVERSE_RIGHT, REVERSE_LIST, 1.0),
    ("ListNode unchanged", "class Solution:\n    def reverseList(self, head):\n        return head\n",
     REVERSE_LIST, 0.0),
    ("ListNode as a python list", REVERSE_TO_PYTHON_LIST, REVERSE_LIST, 0.0),
    ("ListNode own class", REVERSE_OWN_NODES, REVERSE_LIST, 1.0),
    ("TreeNode right", INVERT_RIGHT, INVERT_TREE, 1.0),
    ("TreeNode not inverted", "class Solution:\n    def invertTree(self, root):\n        return root\n",
     INVERT_TREE, 0.0),
    ("TreeNode input, int output", MAX_DEPTH_RIGHT, MAX_DEPTH, 1.0),
    ("TreeNode input, off by one", MAX_DEPTH_RIGHT.replace("else 0", "else 1"), MAX_DEPTH, 0.0),
    ("fresh Solution per call", STATEFUL, FRESH, 1.0),
    ("humaneval tolerance and None", MEAN_RIGHT, HUMANEVAL_SHAPES, 1.0),
    ("humaneval no None for empty", MEAN_RIGHT.replace("return None", "return 0"), HUMANEVAL_SHAPES, 0.0),
    ("humaneval off by a little", MEAN_RIGHT.replace("/ len(xs)", "/ len(xs) + 1e-3"), HUMANEVAL_SHAPES, 0.0),
    ("assert_case right", "def is_even(n):\n    return n % 2 == 0", ASSERT_CASE, 1.0),
    ("assert_case wrong", "def is_even(n):\n    return n % 2 == 1", ASSERT_CASE, 0.0),
    ("assert_case always true", "def is_even(n):\n    return True", ASSERT_CASE, 0.0),
]


@needs_sandbox
@pytest.mark.parametrize("name,code,ref,expected", LEETCODE_ROWS, ids=[r[0] for r in LEETCODE_ROWS])
def test_leetcode_and_assertion_rows(name: str, code: str, ref: str, expected: float):
    out = score_code(block(code), ref, CFG)
    assert out.error == ""
    assert out.reward == expected, out


@needs_sandbox
def test_leetcode_too_slow_for_the_time_limit():
    cfg = RewardConfig(code_timeout_s=1.0, code_item_timeout_s=20.0)
    assert score_code(block(FIB_FAST), FIB, cfg).reward == 1.0
    out = score_code(block(FIB_SLOW), FIB, cfg)  # fib(38) the naive way: ~10^8 calls, seconds
    assert out.reward == 0.0 and out.detail == "case 2 (line 4): timeout", out


@needs_sandbox
def test_unverified_statements_are_run_and_named_in_the_detail():
    out = score_code(block("def double(x):\n    return 2 * x"), HUMANEVAL_LOOP, CFG)
    assert out.reward == 1.0 and out.detail == "passed 1/1; 1 statements unverified"
    out = score_code(block("def double(x):\n    return 4 if x == 2 else 3 * x"), HUMANEVAL_LOOP, CFG)
    assert out.reward == 0.0 and "AssertionError" in out.detail


@needs_sandbox
def test_leetcode_prefix_is_what_the_oracle_runs():
    """Expected values that need the prefix's helpers (list_node, tree_node) come from a run of the
    prefix alone, and the plan is cached per reference (a group's responses share it)."""
    from rewards.code import assert_plan
    from rewards.results import ListValue

    plan = assert_plan(parse_spec(REVERSE_LIST), CFG)
    assert [c.expected for c in plan.cases] == [ListValue((5, 4, 3, 2, 1)), ListValue((2, 1)), None]
    assert plan.prefix == LEETCODE_PREFIX and "list_node([5" not in plan.test
    assert assert_plan(parse_spec(REVERSE_LIST), CFG) is plan


@needs_sandbox
def test_the_first_wrong_case_ends_the_run():
    """As the first failing assert ends a plain test: later (slow) cases never run."""
    import time

    ref = leetcode([f"assert candidate(x = {k}) == {k}" for k in range(6)], "Solution().f")
    slow_and_wrong = ("import time\nclass Solution:\n    def f(self, x):\n"
                      "        if x > 0:\n            time.sleep(1.5)\n        return x + 1\n")
    t0 = time.monotonic()
    out = score_code(block(slow_and_wrong), ref, RewardConfig(code_timeout_s=3.0, code_item_timeout_s=30.0))
    assert out.reward == 0.0 and out.detail == "case 0 (line 2): wrong answer"
    assert time.monotonic() - t0 < 3.0  # not 5 x 1.5 s
    call = json.dumps({"fn_name": "f", "inputs": [[k] for k in range(6)], "outputs": list(range(6))})
    t0 = time.monotonic()
    as_function = slow_and_wrong.replace("class Solution:\n    def f(self, x)", "if True:\n    def f(x)")
    out = score_code(block(as_function), call, RewardConfig(code_timeout_s=3.0, code_item_timeout_s=30.0))
    assert out.reward == 0.0 and out.detail == "case 0: wrong answer"
    assert time.monotonic() - t0 < 3.0


@needs_sandbox
def test_a_prefix_that_fails_in_the_oracle_is_a_bad_reference():
    ref = json.dumps({"import_prefix": "import no_such_module_or1\n", "entry_point": "Solution().f",
                      "test_code": "def check(candidate):\n    assert candidate(x = 1) == list_node([1])\n"})
    out = score_code(block("class Solution:\n    def f(self, x):\n        return x"), ref, CFG)
    assert out.error.startswith("bad_reference: import prefix or test setup fails: ModuleNotFoundError"), out


SAMPLE_ROWS = [  # the code rows of common/toydata/skywork_sample.jsonl (lines 7-10), right and wrong
    (7, "a, b = map(int, input().split())\nprint(a + b)", 1.0),
    (7, "a, b = map(int, input().split())\nprint(a * b)", 0.0),
    (8, "s = input().strip()\nprint('YES' if s == s[::-1] else 'NO')", 1.0),
    (8, "input()\nprint('YES')", 0.0),
    (9, "def max_gap(xs):\n    xs = sorted(xs)\n"
        "    return max((b - a for a, b in zip(xs, xs[1:])), default=0)", 1.0),
    (9, "class Solution:\n    def max_gap(self, xs):\n        xs = sorted(xs)\n"
        "        return max((b - a for a, b in zip(xs, xs[1:])), default=0)", 1.0),
    (9, "def max_gap(xs):\n    return max(xs) - min(xs)", 0.0),
    (10, TWO_SUM, 1.0),
    (10, TWO_SUM_HIDDEN_WRONG, 0.0),
]


@needs_sandbox
@pytest.mark.parametrize("line,code,expected", SAMPLE_ROWS)
def test_skywork_sample_rows(line: int, code: str, expected: float):
    ref = json.loads(SKYWORK_SAMPLE.read_text().splitlines()[line - 1])["reward_model"]["ground_truth"]
    out = score_code(block(code), ref, CFG)
    assert out.error == "" and out.reward == expected, out
