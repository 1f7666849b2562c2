"""`or1 run`: every role as its own process on this machine, over the real bus.

    build (or reuse) the model  →  write the resolved config  →  start the learner,
    the reward workers and the actors (logs under RUN_DIR/logs/)  →  follow metrics.jsonl with a
    live progress bar  →  summary and curves.png.  Ctrl-C stops every child cleanly.

The children are started exactly as a user would start them on other nodes (`or1 learner`,
`or1 reward --learner …`, `or1 actor --learner …`), with the resolved config file, so what works
here works across machines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import Config, save_config
from common.metrics import JsonlTail, read_jsonl

if TYPE_CHECKING:
    from deploy.placement import Placement

STOP_GRACE_S = 15.0
PLAIN_EVERY = 10  # steps between progress lines when stdout is not a terminal


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path


@dataclass
class Fleet:
    run_dir: Path
    config_path: Path
    learner_ep: str
    children: list[Child] = field(default_factory=list)
    placement: "Placement | None" = None  # GPU ids per role (deploy/placement.py); None on a CPU machine

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, ranks: int = 1) -> Child:
        """`or1 <args>` as a child in its own session, logging to logs/NAME.log; with `ranks` > 1 under
        torchrun (a rendezvous on a free local port, so concurrent runs do not collide)."""
        log = self.run_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
        cmd = [sys.executable, *launch, "-m", "deploy.cli", *args, "--config", str(self.config_path), "--log-format", "json"]
        # One OpenMP thread per process unless the user says otherwise: the roles share this machine's
        # cores, and oversubscribed OpenMP threads spin against each other (10x slower steps seen).
        base = {"OMP_NUM_THREADS": "1", **os.environ}
        proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**base, **(env or {})}, start_new_session=True)
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def start_actor(self, i: int) -> Child:
        args = ["actor", "--learner", self.learner_ep, "--worker-id", f"actor{i}", "--relay-bind", "tcp://127.0.0.1:0"]
        env = None
        if self.placement is not None:
            env = self.placement.actor_env(i)
            share = self.placement.memory[i]
            if share is not None:
                args += ["--set", f"actor.gpu_memory_utilization={share}"]
        return self.start(f"actor{i}", args, env=env)

    def start_reward(self, i: int) -> Child:
        env = None if self.placement is None else self.placement.reward_env()
        return self.start(f"reward{i}", ["reward", "--learner", self.learner_ep, "--worker-id", f"reward{i}"], env=env)

    def start_learner(self, ranks: int) -> Child:
        env = None if self.placement is None else self.placement.learner_env()
        return self.start("learner", ["learner"], env=env, ranks=ranks)

    def stop(self) -> None:
        """SIGTERM everyone (actors release leases, workers say Bye), SIGKILL whoever lingers."""
        for c in self.children:
            if c.proc.poll() is None:
                _signal(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for c in self.children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(c.proc, signal.SIGKILL)
                c.proc.wait()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def prepare(cfg: Config, explicit_out: bool) -> Config:
    """Resolve what the children need: run dir, model folder, ports."""
    lc = cfg.learner
    if not explicit_out and lc.run_dir == "runs/latest":
        lc.run_dir = f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    if lc.model == "tiny":
        from common.tinymodel import tiny_model_for

        print(f"or1: building or reusing the embedded tiny model in {cfg.run.cache_dir} ...", flush=True)
        lc.model = str(tiny_model_for(cfg))
    # A taken port (another run): the learner binds a free one instead and writes RUN_DIR/endpoint,
    # which the other roles read (checking ports here and binding them there would race).
    lc.any_free_port = True
    lc.bind_host = "127.0.0.1"
    lc.advertise_host = "127.0.0.1"
    return cfg


def _interrupt(*_) -> None:
    """SIGTERM (timeout, a scheduler, kill) stops every child as Ctrl-C does, instead of orphaning them."""
    raise KeyboardInterrupt


def run(cfg: Config, explicit_out: bool = False, log_format: str = "auto") -> int:
    t_start = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)
    cfg = prepare(cfg, explicit_out)
    run_dir = Path(cfg.learner.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    save_config(cfg, config_path)
    fleet = Fleet(run_dir, config_path, "")
    try:
        fleet.placement = plan_devices(cfg)
    except ValueError as e:
        print(f"or1: {e}", flush=True)
        return 2
    (run_dir / "endpoint").unlink(missing_ok=True)
    interrupted = failed = False
    try:
        learner = fleet.start_learner(cfg.run.learner_ranks)
        fleet.learner_ep = wait_endpoint(run_dir / "endpoint", learner)
        print(f"or1: run directory {run_dir}  (learner {fleet.learner_ep}; `or1 status --learner {fleet.learner_ep}`)",
              flush=True)
        for i in range(cfg.run.reward_workers):
            fleet.start_reward(i)
        for i in range(cfg.run.actors):
            fleet.start_actor(i)
        follow(fleet, learner, total_steps(cfg))
    except KeyboardInterrupt:
        interrupted = True
        print("\nor1: interrupted; stopping every process ...", flush=True)
    except RuntimeError as e:
        print(f"or1: {e}", flush=True)
        failed = True
    finally:
        fleet.stop()
    rc = learner.proc.returncode if learner.proc.returncode is not None else 1
    print(summary(run_dir, time.monotonic() - t_start))
    try:
        from deploy.plot import plot_run

        print(f"or1: curves in {plot_run(run_dir)}")
    except Exception as e:  # a run without metrics still ends cleanly
        print(f"or1: no plot ({e})")
    if interrupted:
        return 130
    if failed and rc == 0:
        return 1
    if rc != 0:
        print(f"or1: the learner exited with {rc}; see {learner.log}")
    return rc


def plan_devices(cfg: Config) -> "Placement | None":
    """The GPU plan for this machine (deploy/placement.py), printed; None without GPUs; ValueError
    when the roles cannot be placed (it says which setting to change)."""
    from common.devices import visible_gpus
    from deploy.placement import place

    gpus = visible_gpus()
    if not gpus:
        return None
    plan = place(gpus, cfg.run.learner_ranks, cfg.run.actors, cfg.actor.tensor_parallel_size,
                 cfg.actor.gpu_memory_utilization)
    for line in plan.lines():
        print(f"or1: {line}", flush=True)
    return plan


def wait_endpoint(path: Path, learner: Child, timeout_s: float = 600.0) -> str:
    """The control endpoint the learner bound, once it serves (it writes RUN_DIR/endpoint)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if learner.proc.poll() is not None:
            raise RuntimeError(f"the learner exited with {learner.proc.returncode} before serving; see {learner.log}")
        time.sleep(0.2)
    raise TimeoutError(f"the learner did not serve within {timeout_s:.0f} s; see {learner.log}")


def total_steps(cfg: Config) -> int:
    return cfg.run.steps or sum(s.steps for s in cfg.learner.stages)


def follow(fleet: Fleet, learner: Child, steps: int) -> None:
    """A live progress bar fed by metrics.jsonl until the learner exits (on a terminal; elsewhere,
    e.g. in CI logs, a plain line every few steps)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tail = JsonlTail(fleet.run_dir / "metrics.jsonl")
    live = sys.stdout.isatty()
    cols = [TextColumn("[bold]or1"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}")]
    with Progress(*cols, refresh_per_second=4, disable=not live) as bar:
        task = bar.add_task("starting: building engines ...", total=steps)
        seen, reported = 0, set()
        while learner.proc.poll() is None:
            time.sleep(0.5)
            rows = [r for r in tail.new() if "reward/mean" in r]
            if rows:
                r = rows[-1]
                bar.update(task, completed=r["step"], description=progress_line(r))
                if not live and (r["step"] // PLAIN_EVERY > seen // PLAIN_EVERY or seen == 0):
                    print(f"or1 step {r['step']}/{steps}  {progress_line(r)}", flush=True)
                seen += len(rows)
            for c in fleet.children:
                if c is not learner and c.proc.poll() not in (None, 0) and c.name not in reported:
                    reported.add(c.name)
                    bar.console.print(f"[yellow]{c.name} exited with {c.proc.returncode}; see {c.log}")
            gone = lost_role(fleet, learner)
            if gone:
                raise RuntimeError(gone)


def lost_role(fleet: Fleet, learner: Child) -> str:
    """'' while a role `or1 run` started still has a live process; else what was lost: with all its
    actors (or all its reward workers) gone, one or more of them failed, the learner would wait for
    data forever. (Processes that all left cleanly were stopped on purpose: others may be joining.)"""
    for role in ("actor", "reward"):
        started = [c for c in fleet.children if c is not learner and c.name.rstrip("0123456789") == role]
        failed = [c for c in started if c.proc.poll() not in (None, 0)]
        if failed and all(c.proc.poll() is not None for c in started):
            which = ", ".join(f"{c.name} with {c.proc.returncode}" for c in failed)
            return (f"every {role} process exited ({which}); the run cannot go on: see {failed[0].log}, "
                    "fix what it says and start again")
    return ""


def progress_line(r: dict) -> str:
    return (f"reward {r.get('reward/mean', 0):.2f}  len {r.get('reward/response_len', 0):.1f}  "
            f"trunc {r.get('reward/truncated_frac', 0):.2f}  entropy {r.get('entropy/mean', 0):.3f}  "
            f"stale {r.get('staleness/max', 0):.0f}  tok/s {r.get('actor/tokens_per_s', 0):.0f}")


def summary(run_dir: Path, wall_s: float) -> str:
    path = run_dir / "metrics.jsonl"
    rows = [r for r in read_jsonl(path) if "reward/mean" in r] if path.exists() else []
    if not rows:
        return f"or1: no training step finished ({wall_s:.0f} s)"
    mean = lambda xs: sum(xs) / len(xs)
    first = mean([r["reward/mean"] for r in rows[:5]])
    last = mean([r["reward/mean"] for r in rows[-10:]])
    ent = rows[-1].get("entropy/mean", float("nan"))
    stale = max(r.get("staleness/max", 0) for r in rows)
    return (f"or1: {len(rows)} steps in {wall_s:.0f} s — reward {first:.2f} (first 5) → {last:.2f} (last 10), "
            f"entropy {ent:.3f}, staleness max {stale:.0f}; run directory {run_dir}")
