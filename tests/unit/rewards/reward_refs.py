"""References in each format of Skywork-OR1-RL-Data's code split, shared by the code-reward tests."""

from __future__ import annotations

import json

import pytest

from rewards.sandbox import sandbox_problem

needs_sandbox = pytest.mark.skipif(bool(sandbox_problem()), reason=f"no sandbox here: {sandbox_problem()}")

# The helpers LeetCode rows ship in `import_prefix` (LeetCodeDataset's, same names and behaviour).
LEETCODE_PREFIX = """\
from typing import *
from functools import *
from collections import *
from itertools import *
from heapq import *
from bisect import *
from string import *
from operator import *
from math import *
import math
import datetime
inf = float('inf')

class ListNode:
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next

def list_node(values: list):
    if not values:
        return None
    head = ListNode(values[0])
    p = head
    for val in values[1:]:
        p.next = ListNode(val)
        p = p.next
    return head

def is_same_list(p1, p2):
    if p1 is None and p2 is None:
        return True
    if not p1 or not p2:
        return False
    return p1.val == p2.val and is_same_list(p1.next, p2.next)

class TreeNode:
    def __init__(self, val=0, left=None, right=None):
        self.val = val
        self.left = left
        self.right = right

def tree_node(values: list):
    if not values:
        return None
    root = TreeNode(values[0])
    i = 1
    queue = deque([root])
    while queue:
        node = queue.popleft()
        if i < len(values) and values[i] is not None:
            node.left = TreeNode(values[i])
            queue.append(node.left)
        i += 1
        if i < len(values) and values[i] is not None:
            node.right = TreeNode(values[i])
            queue.append(node.right)
        i += 1
    return root

def is_same_tree(p, q):
    if not p and not q:
        return True
    if not p or not q or p.val != q.val:
        return False
    return is_same_tree(p.left, q.left) and is_same_tree(p.right, q.right)
"""


def block(code: str, lang: str = "python") -> str:
    return f"Reasoning...\n```{lang}\n{code}\n```\nDone."


def leetcode(test_lines: list[str], entry: str) -> str:
    """A LeetCode row's ground truth, as the dataset stores it (JSON text)."""
    test = "def check(candidate):\n" + "".join(f"    {line}\n" for line in test_lines)
    return json.dumps({"import_prefix": LEETCODE_PREFIX, "test_code": test, "entry_point": entry})


# `add` in every format; the expected sums are long enough to appear nowhere else by chance, so a
# program that finds them has found the reference.
ADD_CASES = [(314159265358, 271828182845, 585987448203), (141421356237, 173205080756, 314626436993)]
ADD_REFS = {
    "stdio": json.dumps({"inputs": [f"{a} {b}\n" for a, b, _ in ADD_CASES],
                         "outputs": [f"{c}\n" for _, _, c in ADD_CASES]}),
    "call": json.dumps({"fn_name": "add", "inputs": [[a, b] for a, b, _ in ADD_CASES],
                        "outputs": [c for _, _, c in ADD_CASES]}),
    "humaneval": json.dumps({"test": "def check(candidate):\n" + "".join(
        f"    assert candidate({a}, {b}) == {c}\n" for a, b, c in ADD_CASES), "entry_point": "add"}),
    "leetcode": leetcode([f"assert candidate(a = {a}, b = {b}) == {c}" for a, b, c in ADD_CASES],
                         "Solution().add"),
}
ADD_RIGHT = {
    "stdio": "a, b = map(int, input().split())\nprint(a + b)",
    "call": "def add(a, b):\n    return a + b",
    "humaneval": "def add(a, b):\n    return a + b",
    "leetcode": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        return a + b",
}
ADD_WRONG = {k: v.replace("a + b", "a - b") for k, v in ADD_RIGHT.items()}
