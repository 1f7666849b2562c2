"""Reward throughput: `or1 score` (score_file, 2 pool workers, sandbox) against bare loops.

- math: N distinct answers (fractions, radicals, intervals, sets; right and wrong) scored by
  `score_file(kind="math", workers=2)` vs a plain in-process loop calling math-verify's
  parse/verify with the same rule (imports warmed up first).
- code: M stdin/stdout programs × 3 cases scored by `score_file(kind="code", workers=2)` (own
  uid, namespaces, rlimits, output caps) vs a loop running the same program text (prelude
  included) with plain `subprocess.run`, no isolation, same interpreter.

score_file times include starting its pool (forkserver + math-verify import); the steady-state
rate subtracts the time of a one-record run. Ratios are items/s of score_file ÷ items/s of the
bare loop (so > 1 means the two workers more than pay for isolation). Ends with one RESULT line.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.config import RewardConfig  # noqa: E402
from rewards.code import IMPORT_PRELUDE, extract_program  # noqa: E402
from rewards.math import extract_answer, parse_golds, verify_answer  # noqa: E402
from rewards.sandbox import SandboxLimits, sandbox_python  # noqa: E402
from rewards.score import score_file  # noqa: E402

N_MATH = 400
N_CODE = 30
WORKERS = 2
GOAL_MATH_RATIO = 1.0
GOAL_CODE_RATIO = 0.5


def math_records(n: int) -> list[dict]:
    recs = []
    for k in range(n):
        shape = k % 4
        if shape == 0:
            resp, gold = f"so \\boxed{{\\dfrac{{{k + 1}}}{{{k + 2}}}}}", f"\\frac{{{k + 1}}}{{{k + 2}}}"
        elif shape == 1:
            resp, gold = f"<think>...</think> \\boxed{{{k}\\sqrt{{2}}}}", f"\\sqrt{{{2 * k * k}}}"
        elif shape == 2:
            resp, gold = f"The answer is \\boxed{{\\left( -{k}, {k + 1} \\right]}}", f"(-{k},{k + 1}]"
        else:
            resp, gold = f"\\boxed{{\\{{{k}, {k + 3}\\}}}}", f"\\{{{k + 3},{k + 1}\\}}"  # wrong
        recs.append({"response": resp, "reference": gold})
    return recs


PROGRAMS = [
    ("print(sum(map(int, input().split())))", lambda k: (f"{k} {k + 1} {k + 2}\n", str(3 * k + 3))),
    ("s = input().strip()\nprint(s[::-1])", lambda k: (f"abc{k}\n", f"{k}"[::-1] + "cba")),
    ("n = int(input())\nprint(max(range(n + 1), key=lambda x: (x * 7) % (n + 3)))",
     lambda k: (f"{k + 5}\n", str(max(range(k + 6), key=lambda x: (x * 7) % (k + 8))))),
]


def code_records(n: int) -> list[dict]:
    recs = []
    for k in range(n):
        prog, case = PROGRAMS[k % len(PROGRAMS)]
        cases = [case(k + j) for j in range(3)]
        spec = {"inputs": [c[0] for c in cases], "outputs": [c[1] for c in cases]}
        recs.append({"response": f"```python\n{prog}\n```", "reference": spec})
    return recs


def timed_score_file(records: list[dict], kind: str, cfg: RewardConfig) -> tuple[float, list[dict]]:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    out = io.StringIO()
    t0 = time.perf_counter()
    code = score_file(f.name, kind, WORKERS, cfg, out)
    elapsed = time.perf_counter() - t0
    os.unlink(f.name)
    assert code == 0
    return elapsed, [json.loads(line) for line in out.getvalue().splitlines()]


def bare_math(records: list[dict]) -> tuple[float, list[float]]:
    verify_answer("\\boxed{1}", ["1"])  # imports and first-call costs out of the timing
    t0 = time.perf_counter()
    rewards = []
    for r in records:
        ok, _ = verify_answer(extract_answer(r["response"]), parse_golds(r["reference"]))
        rewards.append(float(ok))
    return time.perf_counter() - t0, rewards


def bare_code(records: list[dict], python: str) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    rewards = []
    for r in records:
        code = IMPORT_PRELUDE + extract_program(r["response"])
        ok = True
        for stdin, want in zip(r["reference"]["inputs"], r["reference"]["outputs"]):
            p = subprocess.run([python, "-I", "-c", code], input=stdin, capture_output=True, text=True,
                               timeout=10)
            if p.returncode != 0 or p.stdout.strip() != want:
                ok = False
                break
        rewards.append(1.0 if ok else 0.0)
    return time.perf_counter() - t0, rewards


def measure(kind: str, records: list[dict], cfg: RewardConfig, bare) -> dict[str, float]:
    startup, _ = timed_score_file(records[:1], kind, cfg)
    total, rows = timed_score_file(records, kind, cfg)
    bare_s, bare_rewards = bare(records)
    assert [r["reward"] for r in rows] == bare_rewards, "score_file and the bare loop disagree"
    n = len(records)
    steady = n / max(1e-9, total - startup)
    e2e, base = n / total, n / bare_s
    print(f"{kind:5s} n={n:4d}  score_file {total:6.2f} s (pool start {startup:.2f} s)  "
          f"e2e {e2e:7.1f}/s  steady {steady:7.1f}/s  | bare loop {bare_s:6.2f} s {base:7.1f}/s  "
          f"| ratio steady {steady / base:.2f} e2e {e2e / base:.2f}  "
          f"(mean reward {sum(bare_rewards) / n:.2f})")
    return {"steady": steady, "e2e": e2e, "base": base}


def main() -> None:
    cfg = RewardConfig()
    python = sandbox_python(SandboxLimits())
    m = measure("math", math_records(N_MATH), cfg, bare_math)
    c = measure("code", code_records(N_CODE), cfg, lambda recs: bare_code(recs, python))
    print(f"RESULT math_ratio={m['steady'] / m['base']:.2f} goal_math_ratio={GOAL_MATH_RATIO} "
          f"code_ratio={c['steady'] / c['base']:.2f} goal_code_ratio={GOAL_CODE_RATIO} "
          f"math_items_per_s={m['steady']:.1f} code_items_per_s={c['steady']:.1f} "
          f"math_ratio_e2e={m['e2e'] / m['base']:.2f} code_ratio_e2e={c['e2e'] / c['base']:.2f}")


if __name__ == "__main__":
    main()
