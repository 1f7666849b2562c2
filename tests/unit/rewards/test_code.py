"""Code reward: parsing of responses and references (pure), and real programs through the
sandbox for all three test formats, right and wrong."""

from __future__ import annotations

import json

import pytest

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
from rewards.sandbox import sandbox_problem

CFG = RewardConfig(code_timeout_s=3.0, code_item_timeout_s=20.0)
needs_sandbox = pytest.mark.skipif(bool(sandbox_problem()), reason=f"no sandbox here: {sandbox_problem()}")


def block(code: str, lang: str = "python") -> str:
    return f"Reasoning...\n```{lang}\n{code}\n```\nDone."


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


@pytest.mark.parametrize("bad,reason", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"inputs": [1]}', "'inputs' and 'outputs'"),
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
    assert score_code("no code here", '{"test": "assert True"}', CFG).error == "no ```python code block"
    assert score_code(block("print(1)"), "{bad", CFG).error.startswith("bad reference")
    out = score_code(block("def f(:\n  pass"), '{"test": "assert True"}', CFG)
    assert out.reward == 0.0 and out.detail.startswith("syntax error")


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
