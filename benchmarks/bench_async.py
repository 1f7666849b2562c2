"""Asynchronous (eta = 1) against synchronous (eta = 0) training: the same trained groups, less time.

One learner, ONE actor and one reward worker, each a real `or1` process over the real bus, each
limited to one thread (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1; `actor.threads=1` sets the actor's
torch threads), on the embedded tiny model and toy task with the HF engine. With one actor the run
is a two-stage pipeline:

    stage G (actor side): lease → generate → submit → score → the learner has a batch
    stage T (learner):    train → publish weights → metrics

At eta = 0 a batch can only be leased once the previous step's weights exist, so a step costs
G + T; at eta = 1 the actor generates batch k+1 while the learner trains batch k, so a step costs
max(G, T) and the ideal speedup is (G + T) / max(G, T) (2 when G = T).

Measurement. One run, one fleet: eta alternates 0, 1, 0, 1, 0, 1 (`Set(max_staleness)` from an
admin client on the bus, as `or1 set` does), --phase-steps steps each, so startup costs nothing and
a change of background load hits both settings alike. The first SETTLE steps after each switch are
not measured (work admitted under the old eta drains). Per phase: the wall time per step from
metrics.jsonl's step timestamps (the same number of steps, hence trained groups, for both eta).
G and T come from the eta = 0 phases, where the stages alternate: G = the learner's `learner/wait_s`
(lease to scored batch, all of stage G as the learner sees it), T = wall time per step - G
(training, publishing, bookkeeping). Then

    async_speedup = wall/step(eta=0) / wall/step(eta=1),   ideal = (G + T) / max(G, T),
    frac_of_ideal = async_speedup / ideal   (goal >= 0.95).

The batch shape (B = 16 prompts x n = 16 samples, 8 response tokens) makes G and T comparable
here (~0.6 s and ~0.7 s). Both processes run one thread, so the overlap needs two free cores: on a
shared 2-core machine other load (and the reward worker) takes part of them, which shows as a
slower learner step at eta = 1. Staleness drops (`staleness/dropped`) at eta = 1 are reported: each
is a generated group thrown away, which costs the pipeline directly; the closing "diagnosis" line
scales G by the extra groups generated per step and T by the contention and compares that bound
with the measured eta = 1 step. Heartbeats run every 0.2 s (liveness 0.6 s): actors learn of a new
version from heartbeats, and at steps of ~1 s the default 1 s would add a version-discovery delay
that a run with minute-long steps does not have; much shorter (0.05 s) makes busy peers look dead.

Last line: RESULT async_speedup=… ideal=… frac_of_ideal=… goal=0.95 g_s=… t_s=…
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = 0.95
SETTLE = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(run_dir: Path, model: Path, args) -> Path:
    from common.config import load_config, save_config

    cfg = load_config(overrides=[
        f"learner.model={model}", f"learner.run_dir={run_dir}", "learner.bind_host=127.0.0.1",
        "learner.advertise_host=127.0.0.1", f"learner.control_port={free_port()}",
        f"learner.weights_port={free_port()}", "learner.max_staleness=0",
        f"learner.lease_groups={args.batch}",
        "learner.optim.lr=1e-5", "learner.optim.weight_decay=0.0", "learner.trainer.micro_batch_tokens=8192",
        "learner.entropy.enabled=false",
        f"learner.stages=[{{steps=100000, max_response_tokens={args.tokens}, prompts_per_batch={args.batch}, "
        f"group_size={args.group}}}]",
        f"bus.heartbeat_s={args.heartbeat}", "reward.workers=1", "actor.engine=hf",
        f"actor.max_groups={args.batch}", "actor.max_model_len=128", "actor.threads=1",
    ])
    path = run_dir / "config.json"
    save_config(cfg, path)
    return path


def start(name: str, args: list[str], config: Path, logs: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deploy.cli", *args, "--config", str(config), "--log-format", "json"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(logs / f"{name}.log", "ab"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "reward/mean" in r:
            out.append(r)
    return out


def wait_step(run_dir: Path, step: int, learner: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = rows(run_dir)
        if r and r[-1]["step"] >= step:
            return
        if learner.poll() is not None:
            raise RuntimeError(f"learner exited with {learner.returncode}; see {run_dir}/../logs/learner.log")
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def set_eta(admin, eta: int) -> None:
    from bus.messages import Set, SetReply

    reply = admin.request(Set(key="max_staleness", value=eta), timeout=10)
    assert isinstance(reply, SetReply) and reply.new == eta, reply


def phase_stats(rs: list[dict], first: int, last: int) -> dict[str, float]:
    """Steps first..last inclusive (first's own timestamp is the start line)."""
    sel = {r["step"]: r for r in rs if first <= r["step"] <= last}
    steps = sorted(sel)
    wall = (sel[steps[-1]]["time"] - sel[steps[0]]["time"]) / (len(steps) - 1)
    body = [sel[s] for s in steps[1:]]
    return {
        "wall_s": wall,
        "wait_s": statistics.mean(r["learner/wait_s"] for r in body),
        "step_s": statistics.mean(r["learner/step_s"] for r in body),
        "dropped": sum(r["staleness/dropped"] for r in body),
        "stale_max": max(r["staleness/max"] for r in body),
        "kept_frac": statistics.mean(r["filter/kept_frac"] for r in body),
        "scored": statistics.mean(r["filter/useful_groups"] + r["filter/zero_adv_groups"] for r in body),
        "steps": len(body),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="prompts per batch B (and lease size)")
    ap.add_argument("--group", type=int, default=16, help="samples per prompt n")
    ap.add_argument("--tokens", type=int, default=8, help="max response tokens")
    ap.add_argument("--phase-steps", type=int, default=10, help="measured steps per phase (after SETTLE)")
    ap.add_argument("--rounds", type=int, default=3, help="eta = 0, 1 phase pairs")
    ap.add_argument("--heartbeat", type=float, default=0.2, help="bus heartbeat seconds")
    ap.add_argument("--cache", default=os.environ.get("OR1_CACHE", "~/.cache/or1"), help="tiny model cache")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    args = ap.parse_args()

    from bus.client import Client
    from bus.messages import ROLE_ADMIN, Hello
    from common.tinymodel import ensure_tiny_model

    model = ensure_tiny_model(Path(args.cache).expanduser(), warm=True)
    base = Path(tempfile.mkdtemp(prefix="bench_async_"))
    run_dir, logs = base / "run", base / "logs"
    run_dir.mkdir(parents=True)
    logs.mkdir()
    config = write_config(run_dir, model, args)
    cfg = json.loads(config.read_text())
    ep = f"tcp://127.0.0.1:{cfg['learner']['control_port']}"
    print(f"bench_async: B={args.batch} n={args.group} max_tokens={args.tokens}, 1 actor (HF, 1 thread), "
          f"1 learner (1 thread), 1 reward worker; run dir {base}", flush=True)
    procs = [start("learner", ["learner"], config, logs),
             start("reward0", ["reward", "--learner", ep, "--worker-id", "reward0"], config, logs),
             start("actor0", ["actor", "--learner", ep, "--worker-id", "actor0"], config, logs)]
    admin = Client(ep, lambda: Hello(role=ROLE_ADMIN, worker_id="bench-async", host=socket.gethostname()),
                   heartbeat_s=args.heartbeat)
    phases: list[tuple[int, dict]] = []
    try:
        admin.connect(timeout=300)
        wait_step(run_dir, 2, procs[0])
        for eta in (0, 1) * args.rounds:
            set_eta(admin, eta)
            start_step = rows(run_dir)[-1]["step"] + SETTLE
            end_step = start_step + args.phase_steps
            wait_step(run_dir, end_step, procs[0])
            st = phase_stats(rows(run_dir), start_step, end_step)
            phases.append((eta, st))
            print(f"  eta={eta} steps {start_step + 1}-{end_step}: wall/step {st['wall_s']:.3f} s, "
                  f"learner wait {st['wait_s']:.3f} s, step {st['step_s']:.3f} s, staleness max "
                  f"{st['stale_max']:.0f}, dropped {st['dropped']:.0f}, kept {st['kept_frac']:.2f}",
                  flush=True)
    finally:
        admin.close()
        for p in reversed(procs):
            stop(p)
    sync = [st for eta, st in phases if eta == 0]
    asyn = [st for eta, st in phases if eta == 1]
    t0 = statistics.mean(s["wall_s"] for s in sync)
    t1 = statistics.mean(s["wall_s"] for s in asyn)
    g = statistics.mean(s["wait_s"] for s in sync)
    t = t0 - g
    speedup = t0 / t1
    ideal = (g + t) / max(g, t)
    frac = speedup / ideal
    print(f"eta=0: {t0:.3f} s/step (G {g:.3f} s + T {t:.3f} s)")
    print(f"eta=1: {t1:.3f} s/step; stale groups dropped {sum(s['dropped'] for s in asyn):.0f} "
          f"over {sum(s['steps'] for s in asyn)} steps")
    print(f"speedup {speedup:.3f} against the ideal (G+T)/max(G,T) = {ideal:.3f}: {frac:.1%} of it")
    # Where the rest goes: groups generated (scored) per step rise by the stale drops, and the learner
    # trains slower while the actor computes beside it (two 1-thread processes on shared cores).
    gen0, gen1 = (statistics.mean(s["scored"] for s in x) for x in (sync, asyn))
    tr0, tr1 = (statistics.mean(s["step_s"] for s in x) for x in (sync, asyn))
    explained = max(g * gen1 / gen0, t * tr1 / tr0)
    print(f"diagnosis: groups scored per step {gen0:.1f} (eta=0) -> {gen1:.1f} (eta=1, stale drops); "
          f"learner/step_s {tr0:.3f} -> {tr1:.3f} s (CPU contention); "
          f"max(G*{gen1 / gen0:.2f}, T*{tr1 / tr0:.2f}) = {explained:.3f} s/step against {t1:.3f} measured")
    if not args.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    print(f"RESULT async_speedup={speedup:.3f} ideal={ideal:.3f} frac_of_ideal={frac:.3f} goal={GOAL} "
          f"g_s={g:.3f} t_s={t:.3f}")


if __name__ == "__main__":
    main()
