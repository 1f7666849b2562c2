"""`or1 run` with the learner under ZeRO-3 on 2 ranks: each rank writes its own partitions of every
version into rank 0's /dev/shm file (learner/run.py `publish_sharded`), and the actors pull or map
that file and load it, step after step. The bytes equal the gathered export's exactly
(tests/integration/test_trainer_multirank.py); here the whole loop runs on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from e2e_support import read_jsonl
from procs import ROOT

pytestmark = pytest.mark.slow
STEPS = 4


def test_or1_run_zero3_publishes_sharded(tmp_path):
    out = tmp_path / "run"
    cache = os.environ.get("OR1_CACHE", "~/.cache/or1")
    sets = [f"run.cache_dir={cache}", "learner.control_port=0", "learner.weights_port=0", "run.learner_ranks=2",
            "learner.trainer.zero_stage=3"]
    cmd = [sys.executable, "-m", "deploy.cli", "run", "--steps", str(STEPS), "--out", str(out),
           *[a for s in sets for a in ("--set", s)]]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == STEPS and all(r["learner/publish_sharded"] == 1.0 for r in rows), rows
    learner_log = (out / "logs" / "learner.log").read_text(errors="replace")
    assert "shards_refused" not in learner_log and "no_shared_file" not in learner_log
    loaded = [json.loads(line)["version"] for name in os.listdir(out / "logs") if name.startswith("actor")
              for line in (out / "logs" / name).read_text(errors="replace").splitlines()
              if '"weights.loaded"' in line]
    assert loaded and max(loaded) >= STEPS - 1, loaded  # every checksum held: versions the ranks wrote, loaded
