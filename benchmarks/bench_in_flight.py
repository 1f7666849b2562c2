"""In-flight weight updates against loads between leases, on the embedded task with long answers.

    python benchmarks/bench_in_flight.py [--steps 40] [--seeds 0] [--lease-groups 16] [--actors 1]

Runs `or1 run --task chain` (worked running sums, 35-60-token answers: generation dominates) twice
per seed, one after the other, each given the whole machine, identical but for
`actor.update_mode`:

- `between_leases`: an actor loads a new version before its next lease;
- `in_flight`: it loads as soon as the version is pulled, while its lease generates (vLLM's
  AsyncLLM pauses keeping its requests; actors/vllm_async.py).

Both sides run the same engine (`actor.engine = vllm-async`), so the update mode is the only
difference; η = 1, one learner rank, `--actors` actors taking `--lease-groups` groups per lease
(the defaults, one actor and two batches a lease, make generation the longer part of a step and a
lease span a version change: where loading in flight can matter), a fixed number of steps
(`stop_at_reward` is left out of reach so both train exactly `--steps`).

Figures per side, from the run's metrics.jsonl (steps after the first 3, which include the engines'
start):
- staleness histogram (groups, counted from their oldest weights, as the admission rule counts),
  and the mean staleness of the tokens themselves (`staleness/token_mean`);
- `staleness/mixed_frac`: the share of samples whose tokens came from more than one version;
- learner idle: mean `learner/wait_s` per step (waiting for a batch);
- wall time per step: the mean gap between consecutive steps' `time`;
- in-flight loads and their mean pause (from the actors' logs).

Ends with `RESULT wait_ratio=… step_ratio=… token_staleness_in_flight=… token_staleness_between=…`
(ratios in_flight / between_leases, means over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SKIP = 3  # first steps left out: engines starting, the first pulls
MODES = ("between_leases", "in_flight")


def run_side(mode: str, seed: int, steps: int, lease_groups: int, actors: int, work: Path) -> dict:
    out = work / f"{mode}-seed{seed}"
    sets = [f"run.actors={actors}", 
        "actor.engine=vllm-async", f"actor.update_mode={mode}", "learner.max_staleness=1",
        f"learner.lease_groups={lease_groups}", f"actor.max_groups={lease_groups}", "run.learner_ranks=1",
        f"learner.stages=[{{steps={steps}, max_response_tokens=64, prompts_per_batch=8, group_size=8}}]",
        "learner.stop_at_reward=1.0", f"learner.trainer.seed={seed}", f"learner.data.seed={seed}",
        f"actor.seed={seed}", "learner.control_port=0", "learner.weights_port=0",
    ]
    cmd = [sys.executable, "-m", "deploy.cli", "run", "--task", "chain", "--out", str(out), "--log-format", "json"]
    cmd += [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    with open(work / f"{mode}-seed{seed}.out", "wb") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            timeout=3600).returncode
    if rc != 0:
        raise RuntimeError(f"or1 run ({mode}) exited with {rc}; see {work / f'{mode}-seed{seed}.out'}")
    return summarise(out, time.perf_counter() - t0)


def summarise(run_dir: Path, total_s: float) -> dict:
    from common.metrics import read_jsonl

    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/mean" in r][SKIP:]
    if len(rows) < 2:
        raise RuntimeError(f"{run_dir}: too few steps")
    hist: list[int] = []
    for r in rows:
        h = r.get("staleness/hist", [])
        hist = [a + b for a, b in zip(hist + [0] * (len(h) - len(hist)), h + [0] * (len(hist) - len(h)))]
    mean = lambda key: sum(float(r.get(key, 0.0)) for r in rows) / len(rows)  # noqa: E731
    loads, pauses = in_flight_loads(run_dir / "logs")
    return {
        "steps": len(rows), "total_s": total_s, "staleness_hist": hist,
        "token_staleness": mean("staleness/token_mean"), "mixed_frac": mean("staleness/mixed_frac"),
        "wait_s": mean("learner/wait_s"),
        "step_s": (float(rows[-1]["time"]) - float(rows[0]["time"])) / (len(rows) - 1),
        "reward_last10": sum(float(r["reward/mean"]) for r in rows[-10:]) / len(rows[-10:]),
        "in_flight_loads": loads, "pause_s": (sum(pauses) / len(pauses)) if pauses else 0.0,
    }


def in_flight_loads(logs: Path) -> tuple[int, list[float]]:
    pauses = []
    for path in logs.glob("actor*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if '"weights.loaded_in_flight"' in line:
                try:
                    pauses.append(float(json.loads(line)["pause_s"]))
                except (ValueError, KeyError):
                    continue
    return len(pauses), pauses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--lease-groups", type=int, default=16)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--work", default="")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="or1-inflight-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.pop("OMP_NUM_THREADS", None)
    res: dict[str, list[dict]] = {m: [] for m in MODES}
    for seed in a.seeds:
        for mode in MODES:
            r = run_side(mode, seed, a.steps, a.lease_groups, a.actors, work)
            res[mode].append(r)
            print(f"{mode:>15} seed={seed}: {r['steps']} steps, {r['step_s']:.2f} s/step, learner wait "
                  f"{r['wait_s']:.2f} s/step, staleness hist {r['staleness_hist']}, token staleness "
                  f"{r['token_staleness']:.3f}, mixed samples {r['mixed_frac']:.3f}, in-flight loads "
                  f"{r['in_flight_loads']} (pause {r['pause_s'] * 1000:.0f} ms), reward last 10 "
                  f"{r['reward_last10']:.3f}", flush=True)

    def avg(mode: str, key: str) -> float:
        return sum(r[key] for r in res[mode]) / len(res[mode])

    b, f = "between_leases", "in_flight"
    print(f"RESULT wait_ratio={avg(f, 'wait_s') / max(avg(b, 'wait_s'), 1e-9):.3f} "
          f"step_ratio={avg(f, 'step_s') / avg(b, 'step_s'):.3f} "
          f"token_staleness_in_flight={avg(f, 'token_staleness'):.3f} "
          f"token_staleness_between={avg(b, 'token_staleness'):.3f} "
          f"mixed_frac_in_flight={avg(f, 'mixed_frac'):.3f} seeds={len(a.seeds)}")


if __name__ == "__main__":
    main()
