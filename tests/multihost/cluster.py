"""An or1 run spread over network-namespace hosts, started with the README's multi-node commands.

    nodeA 10.77.0.1   or1 learner --config run.toml --max-staleness 1
    nodeB 10.77.0.2   or1 reward  --learner tcp://10.77.0.1:5555 --workers 1
    nodeC 10.77.0.3   or1 actor   --learner tcp://10.77.0.1:5555 --relay-bind tcp://*:5557
    nodeD 10.77.0.4   or1 actor   --learner tcp://10.77.0.1:5555 --relay-bind tcp://*:5557

No advertise setting, default ports, no worker ids: exactly what a user types. Hostnames do not
resolve across hosts (netns.py), as on nodes without a shared DNS. The run's files (run.toml, the
run directory, one log per process) are in the test's tmp folder, which every host sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from netns import Network
from procs import wait_for

OR1 = str(Path(sys.executable).parent / "or1")  # the console script `pip install` made
LEARNER_HOST, REWARD_HOST, ACTOR_HOSTS = "nodeA", "nodeB", ("nodeC", "nodeD")
HOSTS = [LEARNER_HOST, REWARD_HOST, *ACTOR_HOSTS]
STARTUP_S = 240.0


def run_toml(tmp: Path, model_dir: Path, *, steps: int, bus: str = "", learner: str = "", lr: float = 1e-4) -> Path:
    """A small run of the tiny model (HF engine, B=4, n=8, 8 tokens, 0.5 s heartbeats) as a TOML
    file; `bus` and `learner` are more TOML lines for those sections."""
    path = tmp / "run.toml"
    path.write_text(f"""
[bus]
heartbeat_s = 0.5
{bus}

[learner]
model = "{model_dir}"
run_dir = "{tmp / 'run'}"
lease_groups = 4
{learner}

[[learner.stages]]
steps = {steps}
max_response_tokens = 8
prompts_per_batch = 4
group_size = 8

[learner.optim]
lr = {lr}
weight_decay = 0.0

[learner.trainer]
micro_batch_tokens = 4096

[actor]
engine = "hf"
max_groups = 4
max_model_len = 64
threads = 1
""")
    return path


@dataclass
class Run:
    net: Network
    tmp: Path
    config: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def learner_ep(self) -> str:
        return f"tcp://{self.net[LEARNER_HOST].address}:5555"

    @property
    def run_dir(self) -> Path:
        return self.tmp / "run"

    def log(self, name: str) -> Path:
        return self.tmp / "logs" / f"{name}.log"

    def start(self, name: str, host: str, *args: str, cmd: list[str] | None = None) -> subprocess.Popen:
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        proc = self.net[host].popen(cmd or [OR1, *args], self.log(name), env={"OMP_NUM_THREADS": "1"}, cwd=self.tmp)
        self.procs[name] = proc
        return proc

    # the README's commands -------------------------------------------------------------------

    def learner(self, *extra: str, name: str = "learner") -> subprocess.Popen:
        return self.start(name, LEARNER_HOST, "learner", "--config", str(self.config), "--max-staleness", "1", *extra)

    def reward(self, *extra: str) -> subprocess.Popen:
        return self.start("reward", REWARD_HOST, "reward", "--config", str(self.config), "--learner",
                          self.learner_ep, "--workers", "1", *extra)

    def actor(self, host: str, *extra: str) -> subprocess.Popen:
        return self.start(f"actor-{host}", host, "actor", "--config", str(self.config), "--learner", self.learner_ep,
                          "--relay-bind", "tcp://*:5557", *extra)

    def start_all(self, *extra: str) -> None:
        self.learner(*extra)
        self.reward(*extra)
        for host in ACTOR_HOSTS:
            self.actor(host, *extra)

    # reading -------------------------------------------------------------------------------

    def tail(self, name: str, chars: int = 3000) -> str:
        p = self.log(name)
        return p.read_text(errors="replace")[-chars:] if p.exists() else "(no log)"

    def tails(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.tail(n, 1500)}" for n in self.procs)

    def metrics(self) -> list[dict]:
        from e2e_support import read_jsonl

        return [r for r in read_jsonl(self.run_dir / "metrics.jsonl") if "reward/mean" in r]

    def ledger(self) -> list[dict]:
        from e2e_support import read_jsonl

        return read_jsonl(self.run_dir / "ledger.jsonl")

    def step(self) -> int:
        rows = self.metrics()
        return rows[-1]["step"] if rows else 0

    def wait_step(self, step: int, timeout: float, learner: str = "learner") -> None:
        def reached() -> bool:
            if self.procs[learner].poll() is not None and self.step() < step:
                raise AssertionError(f"{learner} exited before step {step}:\n{self.tails()}")
            return self.step() >= step
        wait_for(reached, timeout, interval=0.2, what=f"step {step}")

    def wait_exit(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout}s:\n{self.tails()}") from None

    def actor_ids(self) -> dict[str, str]:
        """host -> worker id of the actor started there (from the ledger's grants)."""
        out = {}
        for e in self.ledger():
            if e["event"] == "lease":
                for host in ACTOR_HOSTS:
                    if f"-{host}-" in e["actor"]:
                        out[host] = e["actor"]
        return out

    def status(self, host: str = REWARD_HOST, *extra: str) -> dict:
        """`or1 status --json` run on `host` (another node than the learner's)."""
        res = self.net[host].run([OR1, "status", "--learner", self.learner_ep, "--json", *extra], timeout=60)
        lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
        assert res.returncode == 0 and lines, f"or1 status failed: {res.stdout}\n{res.stderr}"
        return json.loads(lines[-1])

    def close(self) -> None:
        from procs import stop

        for proc in self.procs.values():
            stop(proc, timeout=10)


def partition(run: Run, host: str, seconds: float) -> float:
    """Cut `host`'s link for `seconds`, then heal it; returns the monotonic time of the heal."""
    run.net.cut(host)
    time.sleep(seconds)
    run.net.heal(host)
    return time.monotonic()
