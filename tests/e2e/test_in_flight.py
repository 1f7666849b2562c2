"""`or1 run --task chain` with in-flight weight updates on the real vLLM AsyncLLM engine: η = 1, one
actor taking two batches a lease (so versions change while it generates), a few steps through the
whole system. Every group is admitted by its oldest version (staleness ≤ η), no submit is refused
(the version spans pass the learner's check), and the token-level staleness never exceeds the
group-level one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from actors.engine import vllm_available
from e2e_support import read_jsonl
from procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")]
STEPS = 8


def test_or1_run_in_flight(tmp_path):
    out = tmp_path / "run"
    cache = os.environ.get("OR1_CACHE", "~/.cache/or1")
    sets = [f"run.cache_dir={cache}", "learner.control_port=0", "learner.weights_port=0", "run.actors=1",
            "run.learner_ranks=1", "actor.update_mode=in_flight", "learner.max_staleness=1",
            "learner.lease_groups=16", "actor.max_groups=16"]
    cmd = [sys.executable, "-m", "deploy.cli", "run", "--task", "chain", "--engine", "vllm", "--steps", str(STEPS),
           "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == STEPS
    assert all(r["staleness/max"] <= 1 and r["staleness/dropped"] == 0 for r in rows)
    assert all(r["staleness/token_mean"] <= r["staleness/mean"] + 1e-9 for r in rows)
    actor_log = (out / "logs" / "actor0.log").read_text(errors="replace")
    assert "vllm_async.ready" in actor_log and "submit_partly_rejected" not in actor_log
    assert "submit_refused" not in actor_log
    print(f"in-flight loads: {actor_log.count('weights.loaded_in_flight')}, mixed samples per step: "
          f"{[round(r['staleness/mixed_frac'], 3) for r in rows]}")
