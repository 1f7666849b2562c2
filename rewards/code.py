"""Code reward: run the response's program against the reference tests in the sandbox; 1 only if
every test passes.

Algorithm (``score_code``):

1. The program is the last fenced block opened with ```` ```python ```` (```` ```python3 ```` too) in
   the text after the last ``</think>`` (the whole response if none). No block → 0 with an error;
   a program that does not compile → 0 (detail "syntax error"), without running anything.
2. The reference (JSON text, or JSON text holding a JSON string) is one of:
   - **stdin/stdout** ``{"inputs": [...], "outputs": [...]}`` (LiveCodeBench, TACO): one sandbox
     run per case with the input on stdin; outputs compared after stripping trailing whitespace of
     each line and trailing blank lines. A case given as a list of lines is joined with newlines.
   - **call-based** ``{"fn_name": f, "inputs": [...], "outputs": [...]}`` (LiveCodeBench, TACO,
     APPS): every case in one sandbox run through ``HARNESS``: ``Solution().f`` when the program
     defines ``class Solution`` with that method, else the module-level ``f``; called with
     ``*args``, each case under its own timer. An input that is a list is the argument list; a
     string is LiveCodeBench's one-JSON-value-per-line (and its output is then JSON text too).
     A result passes if, after a JSON round trip (tuples become lists), it ``==`` the expected
     output, or the expected output is a one-element list holding it (APPS convention).
   - **assertion** ``{"test": "def check(candidate): ...", "entry_point": "add"}`` (HumanEval):
     the program, then the test code, then ``check(add)``; without ``entry_point`` the test code
     itself (e.g. MBPP's asserts) is the check. One sandbox run.
   Every program runs after ``IMPORT_PRELUDE`` (the LiveCodeBench/Skywork habit: ``List``,
   ``defaultdict``, ``heapq``, ``inf``... without imports). The function under test and the
   assertion code see only names the program itself defined, so the prelude's ``operator.add``
   never stands in for a missing ``add``.
3. Cases run in order and stop at the first failure. Each gets ``code_timeout_s`` of wall time;
   all of an item's runs share ``code_item_timeout_s``.

The harness writes its verdict to a file with a nonce it read from stdin, only after the tests
ran, so a program that exits early (``sys.exit(0)``, ``os._exit(0)``) or crashes never passes.
It guards against accidents and cheap tricks, not a program that digs the nonce out of the
harness's own frames. ``error`` is set when the item could not be judged (no code block, bad
reference, sandbox failure); why a judged program failed goes to ``detail``.
"""

from __future__ import annotations

import ast
import json
import math as _math
import re
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Any, Union

from bus.messages import ScoreOut
from common.config import RewardConfig
from rewards.sandbox import RunResult, SandboxLimits, run_program

THINK_END = "</think>"
CODE_BLOCK = re.compile(r"```python3?[ \t]*\r?\n(.*?)```", re.DOTALL)
RUN_OVERHEAD_S = 1.0  # interpreter start + harness, added to a call-based run's wall budget
DETAIL_CHARS = 200

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

# Runs inside the sandbox as main.py, beside solution.py and spec.json; stdin holds the nonce.
HARNESS = r'''
import json, os, signal, sys

class _CaseTimeout(BaseException):
    pass

def _expire(signum, frame):
    raise _CaseTimeout()

def _jsonable(o):
    if isinstance(o, (set, frozenset)):
        try:
            return sorted(o)
        except TypeError:
            return list(o)
    raise TypeError(f"result of type {type(o).__name__} is not JSON serialisable")

def _resolve(defined, name):
    cls = defined.get("Solution")
    if isinstance(cls, type) and hasattr(cls, name):
        return getattr(cls(), name)
    if callable(defined.get(name)):
        return defined[name]
    raise NameError(f"function {name!r} is not defined")

def _main():
    nonce = sys.stdin.readline().strip()
    sys.stdin = open(os.devnull)
    with open("spec.json") as f:
        spec = json.load(f)
    with open("solution.py") as f:
        source = f.read()
    verdict = {"nonce": nonce, "status": "error", "results": [], "detail": ""}
    signal.signal(signal.SIGALRM, _expire)
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        signal.setitimer(signal.ITIMER_REAL, spec["timeout_s"])
        exec(compile(spec["prelude"], "<prelude>", "exec"), g)
        prelude = dict(g)
        exec(compile(source, "solution.py", "exec"), g)
        signal.setitimer(signal.ITIMER_REAL, 0)
        # Tests see only what the program defined: operator.add from the prelude is no `add`.
        defined = {k: v for k, v in g.items() if k not in prelude or v is not prelude[k]}
        if spec["mode"] == "call":
            fn = _resolve(defined, spec["fn_name"])
            for args in spec["inputs"]:
                signal.setitimer(signal.ITIMER_REAL, spec["timeout_s"])
                out = fn(*args)
                signal.setitimer(signal.ITIMER_REAL, 0)
                verdict["results"].append(json.loads(json.dumps(out, default=_jsonable)))
        else:
            signal.setitimer(signal.ITIMER_REAL, spec["timeout_s"])
            t = {"__name__": "__main__", "__builtins__": __builtins__, **defined}
            exec(compile(spec["test"], "test.py", "exec"), t)
            if spec["entry_point"]:
                t["check"](defined[spec["entry_point"]])
            signal.setitimer(signal.ITIMER_REAL, 0)
        verdict["status"] = "ok"
    except _CaseTimeout:
        verdict["status"], verdict["detail"] = "timeout", f"case {len(verdict['results'])}: timeout"
    except SystemExit as e:
        verdict["detail"] = f"program exited ({e.code!r}) before the tests finished"
    except BaseException as e:
        verdict["detail"] = f"case {len(verdict['results'])}: {type(e).__name__}: {e}"[:500]
    signal.setitimer(signal.ITIMER_REAL, 0)
    with open("verdict.json", "w") as f:
        json.dump(verdict, f)

_main()
'''


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


TestSpec = Union[StdioTests, CallTests, AssertTests]


def extract_program(response: str) -> str | None:
    """The last ```python block after the last `</think>` (or in the whole response), or None."""
    head, sep, tail = response.rpartition(THINK_END)
    blocks = CODE_BLOCK.findall(tail if sep else response)
    return blocks[-1] if blocks else None


def _as_text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _lcb_args(text: str) -> list[Any]:
    return [json.loads(line) for line in text.split("\n") if line.strip()]


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
    if "test" in spec:
        if not isinstance(spec["test"], str):
            raise ValueError("reference 'test' must be a string")
        return AssertTests(spec["test"], str(spec.get("entry_point") or ""))
    inputs, outputs = spec.get("inputs"), spec.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ValueError("reference needs 'inputs' and 'outputs' lists, or 'test'")
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


def sandbox_limits(cfg: RewardConfig, wall_s: float, cases: int = 1) -> SandboxLimits:
    """Limits of one run holding `cases` test cases: CPU seconds are per case, capped by the wall."""
    return SandboxLimits(
        wall_s=wall_s,
        cpu_s=max(1, min(cfg.code_cpu_s * cases, _math.ceil(wall_s) + 1)),
        memory_mb=cfg.code_memory_mb,
        fsize_mb=cfg.code_max_file_mb,
        max_processes=cfg.code_max_processes,
        max_output_bytes=cfg.code_max_output_bytes,
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


def _run_harness(program: str, tests: CallTests | AssertTests, cfg: RewardConfig,
                 deadline: float) -> ScoreOut:
    n = len(tests.inputs) if isinstance(tests, CallTests) else 1
    spec = {"prelude": IMPORT_PRELUDE, "timeout_s": cfg.code_timeout_s}
    if isinstance(tests, CallTests):
        spec.update(mode="call", fn_name=tests.fn_name, inputs=tests.inputs)
    else:
        spec.update(mode="assert", test=tests.test, entry_point=tests.entry_point)
    wall = min(cfg.code_timeout_s * n + RUN_OVERHEAD_S, deadline - time.monotonic())
    if wall <= 0:
        return ScoreOut(0.0, detail="item time budget spent")
    nonce = secrets.token_hex(16)
    files = {"solution.py": program, "spec.json": json.dumps(spec)}
    run, verdict = _run_with_verdict(HARNESS, nonce, files, sandbox_limits(cfg, wall, n))
    if verdict is None or verdict.get("nonce") != nonce:
        return ScoreOut(0.0, detail=_failure(run, 0) if run.killed_reason or run.returncode else "no verdict")
    if verdict.get("status") != "ok":
        return ScoreOut(0.0, detail=str(verdict.get("detail", ""))[:DETAIL_CHARS])
    if isinstance(tests, CallTests):
        results = verdict.get("results")
        if not isinstance(results, list) or len(results) != n:
            return ScoreOut(0.0, detail="missing results")
        for i, (got, expected) in enumerate(zip(results, tests.outputs)):
            if not call_output_matches(got, expected):
                return ScoreOut(0.0, detail=f"case {i}: wrong answer")
    return ScoreOut(1.0, detail=f"passed {n}/{n}")


def _run_with_verdict(harness: str, nonce: str, files: dict[str, str],
                      limits: SandboxLimits) -> tuple[RunResult, dict | None]:
    """Run the harness (nonce on stdin) and read back the verdict.json it wrote, if any."""
    run = run_program(harness, nonce + "\n", limits, files, collect=("verdict.json",))
    try:
        verdict = json.loads(run.collected.get("verdict.json", b""))
    except ValueError:
        return run, None
    return run, verdict if isinstance(verdict, dict) else None


def score_code(response: str, reference: str | dict, cfg: RewardConfig) -> ScoreOut:
    """1.0 if the response's program passes every test of `reference`, else 0.0 (see module doc)."""
    try:
        tests = parse_spec(reference)
    except ValueError as e:
        return ScoreOut(0.0, error=f"bad reference: {e}"[:DETAIL_CHARS])
    program = extract_program(response)
    if program is None:
        return ScoreOut(0.0, error="no ```python code block")
    try:
        ast.parse(program)
    except (SyntaxError, ValueError) as e:
        return ScoreOut(0.0, detail=f"syntax error: {e}"[:DETAIL_CHARS])
    deadline = time.monotonic() + cfg.code_item_timeout_s
    if isinstance(tests, StdioTests):
        return _run_stdio(program, tests, cfg, deadline)
    return _run_harness(program, tests, cfg, deadline)
