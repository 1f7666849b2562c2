"""`or1 run --task chain`: the second embedded task (running sums worked step by step), a few steps
through the whole system. The warm start on the task (common/tinywarm_chain.py) is built first when
the cache lacks it (~90 s of one core); then the actors write the scratchpad (35–60 tokens) and the
reward worker scores its boxed answer: right about half the time after the warm start (measured
0.46 at temperature 1), far from 0 (no format) and from 1 (nothing left to learn)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from e2e_support import read_jsonl
from procs import ROOT

pytestmark = pytest.mark.slow
STEPS = 6


def test_or1_run_task_chain(tmp_path):
    out = tmp_path / "run"
    cache = os.environ.get("OR1_CACHE", "~/.cache/or1")
    cmd = [sys.executable, "-m", "deploy.cli", "run", "--task", "chain", "--steps", str(STEPS), "--out", str(out),
           "--set", f"run.cache_dir={cache}", "--set", "learner.control_port=0", "--set", "learner.weights_port=0"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == STEPS
    lengths = [r["reward/response_len"] for r in rows]
    rewards = [r["reward/mean"] for r in rows]
    print(f"or1 run --task chain: response lengths {lengths}, rewards {rewards}")
    assert all(30 <= n <= 64 for n in lengths), lengths
    assert 0.15 <= sum(rewards) / STEPS <= 0.85, rewards
    assert all(r["reward/truncated_frac"] <= 0.25 for r in rows)
