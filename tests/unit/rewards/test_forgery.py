"""Programs that attack the verdict instead of solving the problem: every one must score 0, in every
reference format. The target is `add`; each attack rides on a wrong `add` (a - b), so a 1 can only
come from a forged verdict. Whether a test passed is decided in the scorer, from values alone, and
the expected values never enter the program's sandbox (test_expected_values_never_reach_the_sandbox).
"""

from __future__ import annotations

import json

import pytest
from reward_refs import ADD_REFS, ADD_RIGHT, ADD_WRONG, LEETCODE_PREFIX, block, leetcode, needs_sandbox

from common.config import RewardConfig
from rewards.code import score_code

pytestmark = needs_sandbox
CFG = RewardConfig(code_timeout_s=3.0, code_item_timeout_s=15.0)
FORMATS = list(ADD_REFS)

# The attack of issue 15, verbatim in spirit: walk back to the harness, take its nonce, write the
# verdict it would have written, and leave before any test runs.
ISSUE_ATTACK = """
import sys, json, os
f = sys._getframe()
while f is not None and "nonce" not in f.f_locals:
    f = f.f_back
stolen = f.f_locals["nonce"] if f is not None else ""
json.dump({"nonce": stolen, "status": "ok", "results": [], "detail": ""}, open("verdict.json", "w"))
os._exit(0)
"""

# The same idea against this harness: find its channel and spec in the frames, report every case
# as passed in every way one could say it, then leave.
FRAME_WALK = """
import sys, os
f = sys._getframe()
while f is not None and "chan" not in f.f_locals:
    f = f.f_back
if f is not None:
    chan, spec = f.f_locals["chan"], f.f_locals["spec"]
    n = len(spec.get("inputs") or []) or spec.get("test", "").count("__or1_case__")
    for i in range(n):
        chan.send({"i": i, "v": True})
    chan.send({"status": "ok", "passed": True, "reward": 1.0, "verdict": "pass"})
    chan.send({"done": True})
os._exit(0)
"""

PATCH_EVERYTHING = """
import builtins, json, os, sys
builtins.abs = lambda x: 0
builtins.bool = lambda x=None: True
builtins.isinstance = lambda *a: True
builtins.AssertionError = type("NotAnAssertion", (Exception,), {})
builtins.print = lambda *a, **k: None if not a else sys.stdout.write(" ".join(map(str, a)) + "\\n")
sys.exit = os._exit = lambda *a: None
json.dumps = lambda *a, **k: '{"done": true}'
"""

VERDICT_FILES = """
import json
for path in ("verdict.json", "results.json", "/tmp/verdict.json", "spec.json"):
    try:
        json.dump({"status": "ok", "results": [], "passed": True, "done": True}, open(path, "w"))
    except OSError:
        pass
"""

PRINT_FAKE_RECORDS = """
import sys
fakes = ('{"i": 0, "v": true}', '{"i": 1, "v": true}', '{"done": true}', "passed 2/2", "All tests passed")
for line in fakes:
    print(line)
    print(line, file=sys.stderr)
"""

EXIT_BEFORE_TESTS = "import os\nos._exit(0)\n"
SYSTEM_EXIT_EARLY = "raise SystemExit(0)\n"

CLOSE_CHANNEL = """
import os, sys
for fd in range(3, 64):
    try:
        os.close(fd)
    except OSError:
        pass
"""

# Keep a copy of the channel in a child that writes "passed" records after the harness's own.
DUP_CHANNEL_LATE = """
import os, sys, time
if len(sys.argv) > 1:
    fd = os.dup(int(sys.argv[1]))
    if os.fork() == 0:
        time.sleep(0.3)
        for i in range(8):
            os.write(fd, b'{"i": %d, "v": true}\\n' % i)
        os.write(fd, b'{"done": true}\\n')
        os._exit(0)
"""

# Write records before the harness does, then flood the channel with garbage and a JSON bomb.
CHANNEL_BOMB = """
import os, sys
if len(sys.argv) > 1:
    fd = int(sys.argv[1])
    os.write(fd, b'{"i": 0, "v": true}\\n{"i": 1, "v": true}\\n{"done": true}\\n')
    os.write(fd, b"[" * 200000 + b"\\n")
    os.write(fd, b'{"i": 0, "v": {"__reduce__": "os.system"}}\\n')
"""

IGNORE_ALARMS = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"

REDEFINE_TEST_HELPERS = """
check = is_same_list = is_same_tree = lambda *a, **k: True
candidate = list_node = tree_node = lambda *a, **k: None
"""

PREAMBLES = {
    "issue_exact": ISSUE_ATTACK,
    "frame_walk_channel": FRAME_WALK,
    "patch_exit_builtins_json": PATCH_EVERYTHING,
    "write_verdict_files": VERDICT_FILES,
    "print_fake_records": PRINT_FAKE_RECORDS,
    "exit_before_tests": EXIT_BEFORE_TESTS,
    "system_exit_early": SYSTEM_EXIT_EARLY,
    "close_channel": CLOSE_CHANNEL,
    "dup_channel_write_late": DUP_CHANNEL_LATE,
    "channel_bomb": CHANNEL_BOMB,
    "ignore_alarms": IGNORE_ALARMS,
    "redefine_test_helpers": REDEFINE_TEST_HELPERS,
}

# Values that lie about equality, returned (or printed) in place of the sum.
LIARS = """
class AlwaysEqual:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __hash__(self): return 0
    def __bool__(self): return True
    def __str__(self): return "585987448203"  # right for case 0 (stdio), by the liar's luck
    __repr__ = __str__
class LyingInt(int):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = int.__hash__
class LyingStr(str):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = str.__hash__
class LyingList(list):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
class LyingNode:
    def __getattr__(self, name): return self
"""
LIAR_VALUES = {
    "always_equal_object": "AlwaysEqual()",
    "lying_int_subclass": "LyingInt(a - b)",
    "lying_str_subclass": "LyingStr('sum')",
    "lying_list_subclass": "LyingList([a - b])",
    "self_referencing_node": "LyingNode()",
    "system_exit_in_function": "(_ for _ in ()).throw(SystemExit(0))",
}


def liar_program(fmt: str, value: str) -> str:
    if fmt == "stdio":
        return LIARS + f"a, b = map(int, input().split())\nprint({value})"
    if fmt == "leetcode":
        return LIARS + f"class Solution:\n    def add(self, a, b):\n        return {value}"
    return LIARS + f"def add(a, b):\n    return {value}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_right_program_passes_so_the_rows_below_mean_something(fmt: str):
    out = score_code(block(ADD_RIGHT[fmt]), ADD_REFS[fmt], CFG)
    assert out.reward == 1.0, out
    assert score_code(block(ADD_WRONG[fmt]), ADD_REFS[fmt], CFG).reward == 0.0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("attack", list(PREAMBLES))
def test_attack_on_the_verdict_scores_zero(attack: str, fmt: str):
    for program in (ADD_WRONG[fmt] + "\n" + PREAMBLES[attack], PREAMBLES[attack] + "\n" + ADD_WRONG[fmt]):
        out = score_code(block(program), ADD_REFS[fmt], CFG)
        assert out.reward == 0.0, (attack, fmt, out)
        assert out.error == "", out  # a judged program, not an unjudgeable item


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("liar", list(LIAR_VALUES))
def test_values_that_lie_about_equality_score_zero(liar: str, fmt: str):
    out = score_code(block(liar_program(fmt, LIAR_VALUES[liar])), ADD_REFS[fmt], CFG)
    assert out.reward == 0.0, (liar, fmt, out)


@pytest.mark.parametrize("fmt", ["call", "humaneval", "leetcode"])
def test_a_right_program_that_closes_the_channel_loses_its_results(fmt: str):
    out = score_code(block(ADD_RIGHT[fmt] + "\n" + CLOSE_CHANNEL), ADD_REFS[fmt], CFG)
    assert out.reward == 0.0, out


def test_redefining_leetcode_helpers_does_not_help():
    """In Skywork's own scorer the program shares the test's namespace, so `is_same_list = lambda
    *a: True` passes every linked-list test; here the expected side never runs with the program."""
    ref = leetcode(["assert is_same_list(candidate(head = list_node([1, 2, 3])), list_node([3, 2, 1]))"],
                   "Solution().reverseList")
    program = REDEFINE_TEST_HELPERS + "class Solution:\n    def reverseList(self, h):\n        return h\n"
    assert score_code(block(program), ref, CFG).reward == 0.0
    assert LEETCODE_PREFIX in json.loads(ref)["import_prefix"]


# Looks for the expected sums everywhere the program can reach: every object and frame in its
# process, its directory and /tmp, its stdin (rewound), its argv and environment, /proc of its
# namespace. Raises "LEAK" with what it found; else returns a wrong value.
SEARCH = """
import gc, os, sys
def _found():
    markers = [str(sum(p)) for p in ([314159265358, 271828182845], [141421356237, 173205080756])]
    texts = []
    for o in gc.get_objects():
        if o is markers or o is texts:
            continue
        try:
            texts.append(repr(o)[:100000])
        except Exception:
            pass
    f = sys._getframe().f_back
    while f is not None:
        texts.append(repr(f.f_locals)[:100000])
        f = f.f_back
    for d in (".", "/tmp"):
        for name in os.listdir(d):
            try:
                texts.append(open(os.path.join(d, name), errors="replace").read())
            except OSError:
                pass
    try:
        os.lseek(0, 0, 0)
        texts.append(os.read(0, 1 << 24).decode(errors="replace"))
        os.lseek(0, 0, 0)
    except OSError:
        pass
    texts += [" ".join(sys.argv), repr(dict(os.environ))]
    for pid in os.listdir("/proc"):
        for part in ("cmdline", "environ"):
            try:
                texts.append(open(f"/proc/{pid}/{part}", "rb").read().decode(errors="replace"))
            except OSError:
                pass
    return [m for m in markers if any(m in t for t in texts)]
_leaks = _found()
def add(a, b):
    if _leaks:
        raise RuntimeError(f"LEAK {_leaks}")
    return a - b
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_expected_values_never_reach_the_sandbox(fmt: str):
    program = SEARCH
    if fmt == "stdio":
        program += "a, b = map(int, input().split())\nprint(add(a, b))"
    if fmt == "leetcode":
        program += "class Solution:\n    def add(self, a, b):\n        return add(a, b)"
    out = score_code(block(program), ADD_REFS[fmt], CFG)
    assert out.reward == 0.0 and "LEAK" not in out.detail, out
    assert "wrong answer" in out.detail, out
