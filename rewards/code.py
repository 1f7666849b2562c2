"""Code reward: run the response's program against the reference tests in the sandbox; 1 only if
every test passes. Whether a test passed is decided here, in the scorer, never inside the
sandbox that runs the program.

Algorithm (``score_code``):

1. The program is the last fenced block opened with ```` ```python ```` (```` ```python3 ```` too) in
   the text after the last ``</think>`` (the whole response if none). No block → 0 with an error;
   a program that does not compile → 0 (detail "syntax error"), without running anything.
2. The reference (JSON text, or JSON text holding a JSON string; the formats of
   Skywork-OR1-RL-Data's code split and of the benchmarks it borrows from) is one of:
   - **stdin/stdout** ``{"inputs": [...], "outputs": [...]}`` (TACO, LiveCodeBench): one sandbox
     run per case with the input on stdin; outputs compared after stripping trailing whitespace of
     each line and trailing blank lines. A case given as a list of lines is joined with newlines.
   - **call-based** ``{"fn_name": f, "inputs": [...], "outputs": [...]}`` (TACO, APPS,
     LiveCodeBench): all cases in one harness run: ``Solution().f`` when the program defines
     ``class Solution`` with that method, else the module-level ``f``; called with ``*args``. An
     input that is a list is the argument list; a string is LiveCodeBench's one-JSON-value-per-line
     (and its output is then JSON text too). A result passes if, after a JSON round trip (tuples
     become lists, sets sorted lists), it ``==`` the expected output, or the expected output is a
     one-element list holding it (APPS convention).
   - **LeetCode** ``{"import_prefix": P, "test_code": "def check(candidate): ...",
     "entry_point": "Solution().twoSum"}`` (Skywork's LeetCode rows): P (imports, ``ListNode``,
     ``TreeNode`` and their helpers) runs before the program; ``check`` gets the entry point, a fresh
     ``Solution()`` per call.
   - **assertion** ``{"test": "def check(candidate): ...", "entry_point": "add"}`` (HumanEval; an
     optional ``import_prefix`` as above); without ``entry_point`` the test code itself is the
     check (MBPP's asserts), and ``{"assert_case": [code, ...]}`` (Skywork's scorer) is that too.
   LeetCode and assertion tests are split by ``rewards/asserts.py``: the scorer evaluates each
   expected value itself and compares it with the value the sandbox reports; what cannot be split
   still runs in the sandbox the old way (counted in the detail as "unverified").
   Every program runs after ``IMPORT_PRELUDE`` (the LiveCodeBench/Skywork habit: ``List``,
   ``defaultdict``, ``heapq``, ``inf``... without imports). The function under test and the test
   code see only names the program (or the reference's prefix) defined, so the prelude's
   ``operator.add`` never stands in for a missing ``add``.
3. Cases run in order; the first failure decides (the scorer follows the results as they arrive
   and ends a run at its first failing case). Each case gets ``code_timeout_s`` of wall time; all
   of an item's runs (the oracle's included) share ``code_item_timeout_s``.

Trust: the sandbox runs ``rewards/harness.py`` around the program and reports only *values* over a
pipe (``rewards/results.py`` parses them as data). The program can rewrite the harness, exit
early, patch builtins or forge records, but it cannot see the expected values (they never enter
its sandbox), so a forged report can only pass by carrying the right outputs. The one exception is
an assertion test's unverified remainder, whose verdict is still the sandbox's (see asserts.py).

Errors: ``error`` is set when the item could not be judged; why a judged program failed goes to
``detail``. Error codes (the text before the first ":"), for counting per source:
- ``bad_reference`` — the reference matches no format, or its test code is unusable (does not
  parse, checks nothing, no ``check`` for its entry point...). Logged once per reference with the
  reason; the item scores 0. Fix the data.
- ``reference_eval`` — evaluating the reference's expected values failed in a way that may not
  recur (the oracle run was killed); the item scores 0.
- ``no ```python code block`` — the response holds no program.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math as _math
import re
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import structlog

from bus.messages import ScoreOut
from common.config import RewardConfig
from rewards.asserts import BadReference, Oracle, Plan, build_plan, judge
from rewards.results import Opaque, Report, add_line, parse_channel
from rewards.sandbox import RunResult, SandboxLimits, run_program

log = structlog.get_logger()

THINK_END = "</think>"
CODE_BLOCK = re.compile(r"```python3?[ \t]*\r?\n(.*?)```", re.DOTALL)
RUN_OVERHEAD_S = 1.0  # interpreter start + harness, added to a harness run's wall budget
DETAIL_CHARS = 200
PLAN_CACHE_SIZE = 128  # assertion plans kept per process: a group's responses share one reference
HARNESS = (Path(__file__).parent / "harness.py").read_text()
BAD_REFERENCE = "bad_reference"
REFERENCE_EVAL = "reference_eval"

IMPORT_PRELUDE = """\
from typing import *
from collections import *
from functools import *
from itertools import *
from heapq import *
from bisect import *
from math import *
from string import *
from operator import *
import sys, os, re, math, heapq, bisect, collections, itertools, functools, string, operator
inf = float('inf')
"""


@dataclass
class StdioTests:
    inputs: list[str]
    outputs: list[str]


@dataclass
class CallTests:
    fn_name: str
    inputs: list[list[Any]]
    outputs: list[Any]


@dataclass
class AssertTests:
    test: str
    entry_point: str
    prefix: str = ""


TestSpec = Union[StdioTests, CallTests, AssertTests]


@dataclass
class _Run:
    """What one harness run reported, with how to judge case i's value ("" = passed)."""

    run: RunResult
    report: Report
    cases: int
    judge: Callable[[int, Any], str]
    label: Callable[[int], str] = field(default=lambda i: f"case {i}")


def extract_program(response: str) -> str | None:
    """The last ```python block after the last `</think>` (or in the whole response), or None."""
    head, sep, tail = response.rpartition(THINK_END)
    blocks = CODE_BLOCK.findall(tail if sep else response)
    return blocks[-1] if blocks else None


def _as_text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _lcb_args(text: str) -> list[Any]:
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _text_field(spec: dict, key: str) -> str:
    value = spec.get(key) or ""
    if not isinstance(value, str):
        raise ValueError(f"reference {key!r} must be a string, got {type(value).__name__}")
    return value


def parse_spec(reference: str | dict) -> TestSpec:
    """The test spec in a reference; ValueError with a one-line reason when it is not one."""
    spec: Any = reference
    for _ in range(2):  # JSON text, or JSON text of a JSON string (double-encoded datasets)
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise ValueError(f"reference is not JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"reference must be a JSON object, got {type(spec).__name__}")
    if "test_code" in spec or "test" in spec:
        key = "test_code" if "test_code" in spec else "test"
        if not isinstance(spec[key], str):
            raise ValueError(f"reference {key!r} must be a string")
        entry = _text_field(spec, "entry_point").strip()
        return AssertTests(spec[key], entry, _text_field(spec, "import_prefix"))
    if "assert_case" in spec:
        cases = spec["assert_case"]
        if not isinstance(cases, list) or not cases or not all(isinstance(c, str) for c in cases):
            raise ValueError("reference 'assert_case' must be a non-empty list of strings")
        return AssertTests("\n".join(cases), "", _text_field(spec, "import_prefix"))
    inputs, outputs = spec.get("inputs"), spec.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ValueError(f"reference has none of the known formats (keys: {', '.join(sorted(spec))[:100]}): "
                         "needs 'inputs' and 'outputs' lists, 'test_code' or 'test', or 'assert_case'")
    if len(inputs) != len(outputs) or not inputs:
        raise ValueError(f"reference has {len(inputs)} inputs and {len(outputs)} outputs")
    if spec.get("fn_name"):
        args, expected = [], []
        for inp, out in zip(inputs, outputs):
            if isinstance(inp, str):  # LiveCodeBench: one JSON value per line, output as JSON text
                try:
                    args.append(_lcb_args(inp))
                    expected.append(json.loads(out) if isinstance(out, str) else out)
                except ValueError as e:
                    raise ValueError(f"call-based case {len(args)} is not JSON lines: {e}") from None
            elif isinstance(inp, list):
                args.append(inp)
                expected.append(out)
            else:
                args.append([inp])
                expected.append(out)
        return CallTests(str(spec["fn_name"]), args, expected)
    return StdioTests([_as_text(i) for i in inputs], [_as_text(o) for o in outputs])


def normalize_output(text: str) -> str:
    """Trailing whitespace of every line and trailing blank lines removed."""
    return "\n".join(line.rstrip() for line in text.rstrip().split("\n"))


def call_output_matches(got: Any, expected: Any) -> bool:
    """== after the JSON round trip, or expected == [got] (APPS wraps outputs in a list)."""
    if got == expected:
        return True
    return isinstance(expected, list) and len(expected) == 1 and got == expected[0]


def _jsonable(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        try:
            return sorted(o)
        except TypeError:
            return list(o)
    raise TypeError(f"result of type {type(o).__name__} is not JSON serialisable")


def json_round_trip(value: Any) -> Any:
    """A decoded call result as the old harness's JSON round trip left it (TypeError if none)."""
    return json.loads(json.dumps(value, default=_jsonable))


def sandbox_limits(cfg: RewardConfig, wall_s: float, cases: int = 1) -> SandboxLimits:
    """Limits of one run holding `cases` test cases: CPU seconds are per case, capped by the wall."""
    return SandboxLimits(
        wall_s=wall_s,
        cpu_s=max(1, min(cfg.code_cpu_s * cases, _math.ceil(wall_s) + 1)),
        memory_mb=cfg.code_memory_mb,
        fsize_mb=cfg.code_max_file_mb,
        max_processes=cfg.code_max_processes,
        max_output_bytes=cfg.code_max_output_bytes,
        disk_mb=cfg.code_disk_mb,
        network_isolation=cfg.code_network_namespace,
        python=cfg.code_python,
        uid_base=cfg.code_uid_base,
    )


def _failure(run: RunResult, case: int) -> str:
    if run.killed_reason:
        return f"case {case}: {run.killed_reason}"
    if run.returncode is not None and run.returncode < 0:  # SIGKILL: the CPU limit, most often
        return f"case {case}: killed by {signal.Signals(-run.returncode).name}"
    last = run.stderr.strip().splitlines()[-1:] or [f"exit code {run.returncode}"]
    return f"case {case}: {last[0]}"[:DETAIL_CHARS]


# --- stdin/stdout -----------------------------------------------------------------------------------


def _run_stdio(program: str, tests: StdioTests, cfg: RewardConfig, deadline: float) -> ScoreOut:
    code = IMPORT_PRELUDE + program
    for i, (stdin, expected) in enumerate(zip(tests.inputs, tests.outputs)):
        left = deadline - time.monotonic()
        if left <= 0:
            return ScoreOut(0.0, detail=f"case {i}: item time budget spent")
        run = run_program(code, stdin, sandbox_limits(cfg, min(cfg.code_timeout_s, left)))
        if run.killed_reason or run.returncode != 0:
            return ScoreOut(0.0, detail=_failure(run, i))
        if normalize_output(run.stdout) != normalize_output(expected):
            return ScoreOut(0.0, detail=f"case {i}: wrong answer")
    return ScoreOut(1.0, detail=f"passed {len(tests.inputs)}/{len(tests.inputs)}")


# --- harness runs (call-based, assertion, oracle) -------------------------------------------------------


class _StopAtFirstFailure:
    """Follows the result channel during the run and says stop at the first case that fails (or
    anything malformed), so a wrong answer does not make every later case run, as the first
    failing assert ends a plain test."""

    def __init__(self, judge_case: Callable[[int, Any], str]):
        self.judge_case, self.report, self.partial, self.judged = judge_case, Report(), b"", set()

    def __call__(self, chunk: bytes) -> bool:
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        for line in lines:
            add_line(line, self.report)
        rep = self.report
        if rep.errors or rep.malformed:
            return True
        for i in rep.values.keys() - self.judged:
            self.judged.add(i)
            if self.judge_case(i, rep.values[i]):
                return True
        return False


def _harness(spec: dict, units: int, cfg: RewardConfig, deadline: float, channel_bytes: int,
             judge_case: Callable[[int, Any], str] | None = None) -> tuple[RunResult, Report] | None:
    """Run the harness on `spec` with a budget of `units` × code_timeout_s; None if no time is left.
    With `judge_case` the run ends at the first failing case."""
    wall = min(cfg.code_timeout_s * units + RUN_OVERHEAD_S, deadline - time.monotonic())
    if wall <= 0:
        return None
    spec = {**spec, "timeout_s": cfg.code_timeout_s, "budget_s": max(0.05, wall - RUN_OVERHEAD_S)}
    watch = _StopAtFirstFailure(judge_case) if judge_case else None
    run = run_program(HARNESS, json.dumps(spec), sandbox_limits(cfg, wall, units), channel_bytes, watch)
    return run, parse_channel(run.channel)


def _verdict(r: _Run, passed: str) -> ScoreOut:
    """1.0 only if every case has a value that its judge accepts and the harness ran through."""
    rep = r.report
    if rep.malformed:
        return ScoreOut(0.0, detail=f"result channel: {rep.malformed}")
    for i in range(r.cases):
        if i in rep.errors:
            return ScoreOut(0.0, detail=f"{r.label(i)}: {rep.errors[i]}"[:DETAIL_CHARS])
        if i not in rep.values:
            if r.run.killed_reason:
                why = r.run.killed_reason
            elif rep.error:
                why = rep.error
            elif r.run.returncode:
                why = _failure(r.run, i).split(": ", 1)[1]
            else:
                why = "no result"
            return ScoreOut(0.0, detail=f"{r.label(i)}: {why}"[:DETAIL_CHARS])
        why = r.judge(i, rep.values[i])
        if why:
            return ScoreOut(0.0, detail=f"{r.label(i)}: {why}"[:DETAIL_CHARS])
    if not rep.done:
        why = rep.error or r.run.killed_reason or "the tests did not run through"
        return ScoreOut(0.0, detail=why[:DETAIL_CHARS])
    return ScoreOut(1.0, detail=passed)


def _judge_call(expected: list[Any]) -> Callable[[int, Any], str]:
    def judge_case(i: int, value: Any) -> str:
        if i >= len(expected):
            return "no such case"
        if isinstance(value, Opaque):
            return f"result of type {value.type_name} is not JSON serialisable"
        try:
            got = json_round_trip(value)
        except (TypeError, ValueError, RecursionError) as e:
            return str(e)[:DETAIL_CHARS]
        return "" if call_output_matches(got, expected[i]) else "wrong answer"
    return judge_case


def _run_call(program: str, tests: CallTests, cfg: RewardConfig, deadline: float, ref_size: int) -> ScoreOut:
    n = len(tests.inputs)
    spec = {"mode": "call", "prelude": IMPORT_PRELUDE, "prefix": "", "source": program,
            "fn_name": tests.fn_name, "inputs": tests.inputs}
    judge_case = _judge_call(tests.outputs)
    done = _harness(spec, n, cfg, deadline, _channel_bytes(cfg, ref_size), judge_case)
    if done is None:
        return ScoreOut(0.0, detail="item time budget spent")
    return _verdict(_Run(done[0], done[1], n, judge_case), f"passed {n}/{n}")


def _run_assert(program: str, plan: Plan, cfg: RewardConfig, deadline: float, ref_size: int) -> ScoreOut:
    n = len(plan.cases)
    spec = {"mode": "assert", "prelude": IMPORT_PRELUDE, "prefix": plan.prefix, "source": program,
            "test": plan.test, "entry_point": plan.entry_point}
    def judge_case(i: int, value: Any) -> str:
        return judge(plan.cases[i], value) if i < n else "no such case"

    done = _harness(spec, n + 1, cfg, deadline, _channel_bytes(cfg, ref_size), judge_case)
    if done is None:
        return ScoreOut(0.0, detail="item time budget spent")
    passed = f"passed {n}/{n}" + (f"; {plan.unverified} statements unverified" if plan.unverified else "")
    r = _Run(done[0], done[1], n, judge_case, lambda i: f"case {i} (line {plan.cases[i].line})")
    return _verdict(r, passed)


def _channel_bytes(cfg: RewardConfig, ref_size: int) -> int:
    """Room for the results: the output cap plus twice the reference (expected values live there)."""
    return cfg.code_max_output_bytes + 2 * ref_size


# --- assertion plans and the oracle --------------------------------------------------------------------

_plans: OrderedDict[bytes, Plan | BadReference] = OrderedDict()  # sha256 of the reference's parts


class ReferenceEvalError(RuntimeError):
    """The oracle run failed in a way that may not recur (not cached)."""


def assert_plan(tests: AssertTests, cfg: RewardConfig, deadline: float | None = None) -> Plan:
    """The (cached) plan of an assertion reference; BadReference or ReferenceEvalError. Building it
    may take an oracle run, which must end by `deadline` (default: code_item_timeout_s from now)."""
    key = hashlib.sha256(json.dumps([tests.prefix, tests.test, tests.entry_point]).encode()).digest()
    hit = _plans.get(key)
    if hit is None:
        if deadline is None:
            deadline = time.monotonic() + cfg.code_item_timeout_s
        try:
            hit = build_plan(tests.test, tests.entry_point, tests.prefix, _oracle(cfg, deadline))
        except BadReference as e:
            hit = e
        _plans[key] = hit
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    if isinstance(hit, BadReference):
        raise hit
    return hit


def _oracle(cfg: RewardConfig, deadline: float) -> Oracle:
    """Evaluates expected values in a sandbox that holds the reference's prefix and setup only."""
    def evaluate(prefix: str, setup: list[str], exprs: list[str]) -> list[tuple[bool, Any]]:
        spec = {"mode": "oracle", "prefix": prefix, "setup": setup, "exprs": exprs}
        size = len(prefix) + sum(map(len, setup)) + sum(map(len, exprs))
        done = _harness(spec, len(exprs) + 1, cfg, deadline, _channel_bytes(cfg, size))
        if done is None:
            raise ReferenceEvalError("no time left to evaluate the expected values")
        run, rep = done
        if not rep.done:
            if rep.error and not run.killed_reason:
                raise BadReference(f"import prefix or test setup fails: {rep.error}"[:DETAIL_CHARS])
            if run.killed_reason == "timeout" or rep.error == "timeout":
                raise BadReference("evaluating the expected values timed out")
            raise ReferenceEvalError(f"oracle run failed: {_failure(run, 0)}")
        out = []
        for i in range(len(exprs)):
            value = rep.values.get(i)
            if i in rep.values and not isinstance(value, Opaque):
                out.append((True, value))
            else:
                out.append((False, rep.errors.get(i, "no value")))
        return out
    return evaluate


_logged_bad: set[str] = set()


def _bad_reference(reason: str, reference: str | dict) -> ScoreOut:
    """ScoreOut with a `bad_reference` error; logged once per reference (a group shares one)."""
    text = reference if isinstance(reference, str) else json.dumps(reference, default=str)
    digest = hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()
    if digest not in _logged_bad:
        if len(_logged_bad) > 100_000:
            _logged_bad.clear()
        _logged_bad.add(digest)
        log.warning("code/bad_reference", reason=reason, reference=text[:300], sha1=digest[:12])
    return ScoreOut(0.0, error=f"{BAD_REFERENCE}: {reason}"[:DETAIL_CHARS])


def score_code(response: str, reference: str | dict, cfg: RewardConfig) -> ScoreOut:
    """1.0 if the response's program passes every test of `reference`, else 0.0 (see module doc)."""
    deadline = time.monotonic() + cfg.code_item_timeout_s  # for everything below, the oracle included
    try:
        tests = parse_spec(reference)
    except ValueError as e:
        return _bad_reference(str(e), reference)
    plan = None
    if isinstance(tests, AssertTests):
        try:
            plan = assert_plan(tests, cfg, deadline)
        except BadReference as e:
            return _bad_reference(str(e), reference)
        except ReferenceEvalError as e:
            return ScoreOut(0.0, error=f"{REFERENCE_EVAL}: {e}"[:DETAIL_CHARS])
    program = extract_program(response)
    if program is None:
        return ScoreOut(0.0, error="no ```python code block")
    try:
        ast.parse(program)
        program.encode("utf-8")
    except (SyntaxError, ValueError) as e:
        return ScoreOut(0.0, detail=f"syntax error: {e}"[:DETAIL_CHARS])
    ref_size = len(reference) if isinstance(reference, str) else len(json.dumps(reference, default=str))
    if isinstance(tests, StdioTests):
        return _run_stdio(program, tests, cfg, deadline)
    if isinstance(tests, CallTests):
        return _run_call(program, tests, cfg, deadline, ref_size)
    return _run_assert(program, plan, cfg, deadline, ref_size)
