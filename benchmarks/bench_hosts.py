"""Wall time to the target reward across four network-namespace hosts against one host.

The same run (tests/multihost/cluster.py's small config, stop at a last-10 mean reward of 0.95,
relay fanout 1) is started with the README's multi-node commands twice, one after the other:
    hosts=4   learner, reward worker and two actors each on their own host (10.77.0.1-4)
    hosts=1   all four processes on one host (the same namespace, the same commands)
Both go through the bus over TCP between processes; across hosts the weights cross a veth bridge,
relays serve the other actor host, and no host maps another's /dev/shm. Needs root (namespaces).

    .venv/bin/python benchmarks/bench_hosts.py [--seeds 2]

Ends with `RESULT wall_ratio=<4 hosts / 1 host> steps_ratio=... wall_4=... wall_1=...`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "multihost"), str(ROOT / "tests" / "e2e")]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path("~/.cache/or1/torch_extensions").expanduser()))

from cluster import ACTOR_HOSTS, HOSTS, LEARNER_HOST, REWARD_HOST, Run, run_toml  # noqa: E402
from netns import Network, unavailable  # noqa: E402

TARGET = 0.95


def one_run(model: Path, spread: bool, seed: int) -> tuple[float, int]:
    net = Network.make(HOSTS)
    tmp = Path(tempfile.mkdtemp(prefix="or1-bench-hosts-"))
    cfg = run_toml(tmp, model, steps=200, bus="relay_fanout = 1",
                   learner=f"stop_at_reward = {TARGET}\nstop_window = 10\n[learner.data]\nseed = {seed}")
    run = Run(net, tmp, cfg)
    place = {LEARNER_HOST: LEARNER_HOST, REWARD_HOST: REWARD_HOST, **{h: h for h in ACTOR_HOSTS}} if spread \
        else {h: LEARNER_HOST for h in HOSTS}
    t0 = time.monotonic()
    try:
        run.start("learner", place[LEARNER_HOST], "learner", "--config", str(cfg), "--max-staleness", "1")
        run.start("reward", place[REWARD_HOST], "reward", "--config", str(cfg), "--learner", run.learner_ep, "--workers", "1")
        for h in ACTOR_HOSTS:
            run.start(f"actor-{h}", place[h], "actor", "--config", str(cfg), "--learner", run.learner_ep,
                      "--relay-bind", "tcp://*:5557" if spread else "tcp://*:0")
        assert run.wait_exit("learner", 900) == 0, run.tail("learner")
        wall = time.monotonic() - t0
    finally:
        run.close()
        net.close()
    rows = run.metrics()
    last = sum(r["reward/mean"] for r in rows[-10:]) / len(rows[-10:])
    assert last >= TARGET, f"did not reach {TARGET}: {last:.2f} after {len(rows)} steps"
    return wall, rows[-1]["step"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    why = unavailable()
    if why:
        sys.exit(f"bench_hosts: {why}")
    from common.tinymodel import ensure_tiny_model

    model = ensure_tiny_model(Path("~/.cache/or1").expanduser(), warm=True)
    res = {4: [], 1: []}
    for seed in range(args.seeds):
        for hosts in (4, 1):  # interleaved, so host noise falls on both
            wall, steps = one_run(model, hosts == 4, seed)
            res[hosts].append((wall, steps))
            print(f"hosts={hosts} seed={seed}: {steps} steps to last-10 mean >= {TARGET} in {wall:.1f} s", flush=True)
    w4, w1 = (sum(w for w, _ in res[h]) / len(res[h]) for h in (4, 1))
    s4, s1 = (sum(s for _, s in res[h]) / len(res[h]) for h in (4, 1))
    print(f"RESULT wall_ratio={w4 / w1:.3f} steps_ratio={s4 / s1:.3f} wall_4={w4:.1f} wall_1={w1:.1f} steps_4={s4:.0f} steps_1={s1:.0f}")


if __name__ == "__main__":
    main()
