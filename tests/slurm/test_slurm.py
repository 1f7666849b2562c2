"""The Slurm scripts end to end, through a real Slurm: the local 3-node cluster of
scripts/slurm-local.sh (Debian's slurm-wlm; CI starts it in .ci/run, this test starts it when run
as root and it is not up).

    sbatch : : --nodes=1 deploy/slurm/or1.sbatch     learner n1 · reward worker n2 · 1 actor n3
    step >= 1:  sbatch deploy/slurm/or1-actors.sbatch   an actor joins from a job of its own
    once it has had work accepted and holds a lease:  scancel that job
    the run trains to its end; the job ends by itself (the first actor leaves on Wait(done))

Then: reward rose, the run directory is complete, and the ledger invariants hold
(tests/e2e/e2e_support.check_ledger: every lease ends at most once, no group trained twice,
nothing lost) with every lease of the cancelled actor ended (given back or completed).
Outside CI, where the cluster cannot be started (not root, no apt-get), it skips saying why; in
CI (CI=true) that is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from e2e_support import JsonlTail, check_ledger, log_events, open_leases, read_jsonl, status_json  # noqa: E402
from learner.checkpoint import checkpoint_dir  # noqa: E402
from procs import ROOT, wait_for  # noqa: E402

pytestmark = pytest.mark.slow
STEPS, B, ETA = 60, 8, 1  # the embedded tiny config: B = 8 prompts a step, η = 1
STARTUP_S = 300.0
LOCAL_CLUSTER = "or1local"  # ClusterName in scripts/slurm-local.sh


def _run(*cmd: str, timeout: float = 30.0, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _cluster_name() -> str:
    if not shutil.which("scontrol"):
        return ""
    res = _run("scontrol", "show", "config", timeout=15)
    for line in res.stdout.splitlines():
        if line.startswith("ClusterName"):
            return line.split("=", 1)[1].strip()
    return ""


def _unavailable(reason: str) -> None:
    """Slurm cannot be had here: a failure in CI (CI=true), else a skip saying why."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm() -> None:
    """The local cluster, up with every node answering (started here if need be)."""
    name = _cluster_name()
    if name and name != LOCAL_CLUSTER:
        pytest.skip(f"this host's Slurm is cluster {name!r}, not the local test cluster: not submitting to it")
    if os.geteuid() != 0:
        if name == LOCAL_CLUSTER:
            return  # up already (started by root, e.g. CI's .ci/run): usable by anyone
        reason = "the local Slurm cluster is not up, and starting it needs root (bash scripts/slurm-local.sh)"
        _unavailable(reason)
    if not (shutil.which("slurmctld") or shutil.which("apt-get")):
        reason = "no slurm-wlm and no apt-get to install it (bash scripts/slurm-local.sh)"
        _unavailable(reason)
    res = _run("bash", "scripts/slurm-local.sh", timeout=600)  # idempotent: checks the nodes when up
    if res.returncode != 0:
        pytest.fail(f"scripts/slurm-local.sh failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    assert _cluster_name() == LOCAL_CLUSTER


def _squeue(job: str) -> list[str]:
    """`JOBID STATE` rows of a job (het components as JOBID+K); [] once it has left the queue."""
    res = _run("squeue", "-h", "-j", job, "-o", "%i %T")
    return res.stdout.strip().splitlines() if res.returncode == 0 else []


def _sbatch(env: dict, *args: str) -> str:
    res = _run("sbatch", "--parsable", *args, env=env)
    assert res.returncode == 0, f"sbatch {args} failed: {res.stdout}\n{res.stderr}"
    return res.stdout.strip().split(";")[0]


def _steps(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "reward/mean" in r]


def _last_step(run: Path) -> int:
    rows = _steps(run)
    return rows[-1]["step"] if rows else 0


def test_run_as_heterogeneous_job_with_an_elastic_actor_job(slurm, tmp_path, tiny_model_dir):
    t0 = time.monotonic()
    run = tmp_path / "run"
    env = {
        **os.environ,
        "OR1_BIN": str(Path(sys.executable).parent / "or1"),
        "OR1_RUN_DIR": str(run),
        "OR1_PORT": "0",  # the 3 nodes share this host: any free port (the batch script reads RUN_DIR/endpoint)
        # fill_batch=true: the ledger check counts B trained groups at every step (the tiny config
        # steps every B scored groups, training only their useful ones)
        "OR1_ARGS": (f"--set actor.engine=hf --set learner.fill_batch=true --set run.steps={STEPS} "
                     f"--set run.cache_dir={tiny_model_dir.parent}"),
        "OR1_STOP_GRACE": "30",
    }
    job = _sbatch(env, f"--output={tmp_path}/job-%j.out", ":", ":", "--nodes=1", "deploy/slurm/or1.sbatch")
    out = tmp_path / f"job-{job}.out"
    elastic = ""

    def job_info() -> str:
        text = out.read_text() if out.exists() else "(no job output)"
        logs = sorted((run / "logs").glob("*.log")) if (run / "logs").exists() else []
        return text + "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-1500:]}" for p in logs)

    def started() -> bool:
        if not _squeue(job) and _last_step(run) < 1:
            raise AssertionError(f"job {job} ended before step 1:\n{job_info()}")
        return _last_step(run) >= 1

    try:
        wait_for(started, STARTUP_S, interval=0.5, what="the first training step")
        rows = _squeue(job)
        assert sorted(rows) == [f"{job}+{k} RUNNING" for k in range(3)], rows  # learner, reward, actors

        endpoint = (run / "endpoint").read_text().strip()
        assert endpoint.startswith("tcp://localhost:"), endpoint  # n1's NodeAddr, from Slurm
        elastic = _sbatch({**env, "OR1_ARGS": "--set actor.engine=hf"}, f"--output={tmp_path}/actors-%j.out",
                          "deploy/slurm/or1-actors.sbatch")
        step_at_join = _last_step(run)
        wid = f"actor-{elastic}-0"
        wait_for(lambda: _accepted_from(ledger_of(run), wid) >= 1 or not _squeue(job), 180,
                 what=f"work accepted from {wid}")
        assert _accepted_from(ledger_of(run), wid) >= 1, f"{wid} never had work accepted:\n{job_info()}"
        fleet = {p["worker_id"] for p in status_json(endpoint)["fleet"]}
        assert {wid, f"actor-{job}-0", f"reward-{job}-0"} <= fleet, fleet

        tail = JsonlTail(run / "ledger.jsonl")
        held = wait_for(lambda: open_leases(tail.poll(), wid), 60, interval=0.01, what=f"{wid} holding a lease")
        step_at_cancel = _last_step(run)
        assert _run("scancel", elastic).returncode == 0
        wait_for(lambda: not _squeue(elastic), 60, what=f"actors job {elastic} to leave the queue")
        assert step_at_cancel <= STEPS - 3, f"the run nearly ended before the scancel (step {step_at_cancel})"

        wait_for(lambda: not _squeue(job), 600, interval=1.0, what=f"job {job} to end")
    finally:
        for j in (job, elastic):
            if j and _squeue(j):
                _run("scancel", j)
    wall = time.monotonic() - t0
    text = job_info()
    assert "the learner exited with 0" in text, text
    assert "actors still running" not in text, text  # the job's actor left on the learner's Wait(done)

    rows = _steps(run)
    n = rows[-1]["step"]
    assert [r["step"] for r in rows] == list(range(1, n + 1))
    target = log_events(run / "logs" / "learner.log", "learner.target_reached")
    assert n == STEPS or target, f"stopped at step {n} of {STEPS} without reaching the target"
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 0.15, (first, last)
    assert max(r["actor/count"] for r in rows) == 2

    for f in ("learner_config.json", "metrics.jsonl", "ledger.jsonl", "endpoint", "model/model.safetensors",
              "model/config.json", str(checkpoint_dir(".", n)), "logs/learner.log", f"logs/reward-{job}-0.log",
              f"logs/actor-{job}-0.log", f"logs/actor-{elastic}-0.log"):
        assert (run / f).exists(), f"{f} missing from the run directory: {sorted(p.name for p in run.iterdir())}"
    assert log_events(run / "logs" / f"actor-{job}-0.log", "actor.done"), "the job's actor did not hear Wait(done)"
    # the cancelled actor handled SIGTERM: it gave back what it held and said Bye (not declared dead)
    byes = log_events(run / "logs" / "learner.log", "peer said bye")
    assert [e for e in byes if e.get("worker_id") == wid], f"no Bye from {wid}:\n{job_info()}"

    events = ledger_of(run)
    summary = check_ledger(events, B, n, eta_max=ETA)
    assert summary.accepted_by_actor[wid] >= 1 and summary.accepted_by_actor[f"actor-{job}-0"] > 0
    dangling = [k for k in summary.open_keys if summary.grants[k] == wid]
    assert not dangling, f"leases of the cancelled actor never ended: {dangling}"
    ended = {e["lease_id"]: e["reason"] for e in events if e["event"] == "lease_end"}
    assert all(lid in ended for lid in held), (held, ended)
    print(f"slurm: {n} steps, reward {first:.2f} -> {last:.2f}; actors job {elastic} joined at step {step_at_join}, "
          f"{summary.accepted_by_actor[wid]} groups accepted, cancelled at step {step_at_cancel} holding "
          f"{sorted(held)} (ended: {[ended[lid] for lid in sorted(held)]}); wall {wall:.0f} s")


def ledger_of(run: Path) -> list[dict]:
    return read_jsonl(run / "ledger.jsonl")


def _accepted_from(events: list[dict], actor: str) -> int:
    leases = {e["lease_id"] for e in events if e["event"] == "lease" and e["actor"] == actor}
    return sum(1 for e in events if e["event"] == "accept" and e["lease_id"] in leases)
