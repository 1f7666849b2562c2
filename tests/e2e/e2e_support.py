"""Shared pieces of the end-to-end tests: a small run config, a fleet of real `or1` processes,
readers for metrics / ledger / logs, and the ledger invariants every run must satisfy.

Every role runs as its own `or1` process (`tests/procs.py`), exactly as a user starts them on
separate nodes; the tests only talk to them through files (config.json in, metrics.jsonl,
ledger.jsonl and logs out), signals, and the `or1 status` / `or1 set` admin commands.

Ledger invariants (`check_ledger`), from the scheduler's contract (learner/scheduler.py):

* every (epoch, lease_id, prompt_id) granted ends exactly once, and every END names a granted one:
  a run that ended closes its ledger (work still out then ends "abandoned"); only an epoch whose
  learner was killed (`closed=False`) may leave grants open, at most (eta_max + 1) * B of them;
* no group_id is trained twice, and each step (the `version` field of its END trained events)
  trains exactly B groups;
* no prompt is lost: prompts ended as requeued / released / stale go to a FIFO queue that the
  next leases must serve first, in order (DatasetOrder.requeue); so a prompt still queued at the
  end was requeued after the last lease of the run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import load_config, save_config
from procs import ROOT, free_port, or1, stop, wait_for

REQUEUE_OUTCOMES = {"requeued", "released", "stale"}
END_OUTCOMES = {"trained", "filtered", "abandoned"} | REQUEUE_OUTCOMES
STARTUP_S = 240.0  # DeepSpeed + model load of three processes on 2 busy cores


def small_config(tmp_path: Path, model_dir: Path, *, steps: int, eta: int, batch: int = 4, group: int = 4,
                 extra: tuple[str, ...] = ()) -> tuple[Any, Path]:
    """A fast run: the tiny model on the toy task, HF engine, B=batch, n=group, 8 response tokens,
    0.5 s heartbeats, fresh ports. Returns (config, path of its config.json)."""
    cfg = load_config(overrides=[
        f"learner.model={model_dir}", f"learner.run_dir={tmp_path / 'run'}", "learner.bind_host=127.0.0.1",
        "learner.advertise_host=127.0.0.1", f"learner.control_port={free_port()}",
        f"learner.weights_port={free_port()}", f"learner.max_staleness={eta}", "learner.lease_groups=4",
        "learner.optim.lr=1e-4", "learner.optim.weight_decay=0.0", "learner.trainer.micro_batch_tokens=4096",
        f"learner.stages=[{{steps={steps}, max_response_tokens=8, prompts_per_batch={batch}, "
        f"group_size={group}}}]",
        "bus.heartbeat_s=0.5", "reward.workers=1", "actor.engine=hf", "actor.max_groups=4",
        "actor.max_model_len=64", "actor.threads=1", *extra,
    ])
    path = tmp_path / "config.json"
    save_config(cfg, path)
    return cfg, path


@dataclass
class Fleet:
    """Real `or1` processes of one run; `close()` stops whatever is still alive."""

    cfg: Any
    config_path: Path
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.cfg.learner.control_port}"

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.learner.run_dir)

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        proc = or1(*args, "--config", str(self.config_path), "--log-format", "json", log=self.log(name))
        self.procs[name] = proc
        return proc

    def learner(self, *extra: str, name: str = "learner") -> subprocess.Popen:
        return self.start(name, "learner", *extra)

    def actor(self, wid: str) -> subprocess.Popen:
        return self.start(wid, "actor", "--learner", self.endpoint, "--worker-id", wid,
                          "--relay-bind", "tcp://127.0.0.1:0")

    def reward(self, wid: str) -> subprocess.Popen:
        return self.start(wid, "reward", "--learner", self.endpoint, "--worker-id", wid)

    def start_run(self, actors: int = 2, reward_workers: int = 1) -> None:
        """The usual run: the learner, then reward workers rw0.., then actors actor0.."""
        self.learner()
        for i in range(reward_workers):
            self.reward(f"rw{i}")
        for i in range(actors):
            self.actor(f"actor{i}")

    def kill(self, name: str) -> None:
        """SIGKILL the process and everything in its session (a node that vanishes)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def wait_exit(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            tail = self.tail(name)
            raise AssertionError(f"{name} still running after {timeout}s; log tail:\n{tail}") from None

    def tail(self, name: str, chars: int = 4000) -> str:
        p = self.log(name)
        return p.read_text(errors="replace")[-chars:] if p.exists() else "(no log)"

    def tails(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.tail(n, 1500)}" for n in self.procs)

    def close(self) -> None:
        for proc in self.procs.values():
            stop(proc)


def make_fleet(tmp_path: Path, cfg: Any, config_path: Path) -> Fleet:
    return Fleet(cfg, config_path, tmp_path / "logs")


# --- readers ----------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines only: a line being written right now is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


class JsonlTail:
    """Reads a growing jsonl file incrementally (only new complete lines on each call)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rows = path, 0, []

    def poll(self) -> list[dict]:
        if self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self.offset += end
            self.rows += [json.loads(x) for x in data[:end].splitlines() if x.strip()]
        return self.rows


def open_leases(events: list[dict], actor: str) -> set[int]:
    """Lease ids granted to `actor` and not yet closed (no lease_end) in these events."""
    mine = {e["lease_id"] for e in events if e["event"] == "lease" and e["actor"] == actor}
    return mine - {e["lease_id"] for e in events if e["event"] == "lease_end"}


def metrics(fleet: Fleet) -> list[dict]:
    return [r for r in read_jsonl(fleet.run_dir / "metrics.jsonl") if "reward/mean" in r]


def ledger(fleet: Fleet) -> list[dict]:
    return read_jsonl(fleet.run_dir / "ledger.jsonl")


def last_step(fleet: Fleet) -> int:
    rows = metrics(fleet)
    return rows[-1]["step"] if rows else 0


def wait_step(fleet: Fleet, step: int, timeout: float, watch: tuple[str, ...] = ("learner",)) -> int:
    """Wait until metrics.jsonl has reached `step`; fail early if a watched process died."""
    def reached() -> int:
        for name in watch:
            rc = fleet.procs[name].poll()
            if rc is not None and last_step(fleet) < step:
                raise AssertionError(f"{name} exited with {rc} before step {step}:\n{fleet.tails()}")
        s = last_step(fleet)
        return s if s >= step else 0
    return wait_for(reached, timeout, interval=0.2, what=f"step {step}")


_CONSOLE = re.compile(r"\[\s*(\w+)\s*\]\s+(\S+)\s*(.*)$")
_KV = re.compile(r"(\w[\w./-]*)=(\S+)")


def log_events(path: Path, event: str) -> list[dict]:
    """Events named `event` from a process log, whether written as JSON lines or by structlog's
    console renderer (`... [info     ] name   k=v k=v`); values that look like ints become ints."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        rec: dict | None = None
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
        else:
            m = _CONSOLE.search(line)
            if m and m.group(2) == event:
                rec = {"event": m.group(2), "level": m.group(1)}
                for k, v in _KV.findall(m.group(3)):
                    rec[k] = int(v) if re.fullmatch(r"-?\d+", v) else v
        if rec is not None and rec.get("event") == event:
            out.append(rec)
    return out


# --- admin commands ---------------------------------------------------------------------------


def or1_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deploy.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def status_json(endpoint: str) -> dict:
    """`or1 status --learner EP --json`, parsed."""
    res = or1_cli("status", "--learner", endpoint, "--json")
    assert res.returncode == 0, f"or1 status failed ({res.returncode}): {res.stdout}\n{res.stderr}"
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    assert lines, f"no JSON from or1 status: {res.stdout}\n{res.stderr}"
    return json.loads(lines[-1])


# --- ledger invariants ------------------------------------------------------------------------


@dataclass
class LedgerSummary:
    grants: dict[tuple[int, int, str], str]  # (epoch, lease_id, prompt_id) -> actor
    ends: Counter
    open_keys: list[tuple[int, int, str]]
    trained_per_step: dict[int, int]
    accepted_by_actor: Counter


def check_ledger(events: list[dict], batch: int, steps: int, eta_max: int, first_step: int = 0,
                 requeue: list[str] = (), closed: bool = True) -> LedgerSummary:
    """Assert the ledger invariants of the module docstring for one epoch's events; returns counts.
    A resumed run: `first_step` is the checkpoint's version and `requeue` its saved requeue queue;
    its "restart" END events (the checkpoint's in-flight groups, requeued on load) need no grant."""
    grants: dict[tuple[int, int, str], str] = {}
    ends: Counter = Counter()
    lease_actor: dict[tuple[int, int], str] = {}
    trained_groups: list[int] = []
    trained_per_step: Counter = Counter()
    accepted_by_actor: Counter = Counter()
    queue: deque[str] = deque(requeue)
    for i, e in enumerate(events):
        kind, ep = e["event"], e["epoch"]
        if kind == "end" and e.get("reason") == "restart":
            queue.append(e["prompt_id"])
            continue
        if kind == "lease":
            lease_actor[(ep, e["lease_id"])] = e["actor"]
            for pid in e["prompts"]:
                key = (ep, e["lease_id"], pid)
                assert key not in grants, f"lease granted twice: {key}"
                grants[key] = e["actor"]
                if queue:  # requeued prompts are served first, in order
                    want = queue.popleft()
                    assert pid == want, f"event {i}: lease {e['lease_id']} gave {pid} before requeued {want}"
        elif kind == "accept":
            accepted_by_actor[lease_actor[(ep, e["lease_id"])]] += 1
        elif kind == "end":
            key = (ep, e["lease_id"], e["prompt_id"])
            assert e["outcome"] in END_OUTCOMES, f"unknown outcome {e}"
            assert key in grants, f"END of a lease never granted: {e}"
            ends[key] += 1
            assert ends[key] == 1, f"{key} ended twice: {e}"
            if e["outcome"] in REQUEUE_OUTCOMES:
                queue.append(e["prompt_id"])
            if e["outcome"] == "trained":
                trained_groups.append(e["group_id"])
                trained_per_step[e["version"]] += 1
                assert e["staleness"] <= eta_max, f"trained with staleness {e['staleness']} > {eta_max}: {e}"
    assert len(trained_groups) == len(set(trained_groups)), "a group was trained twice"
    assert dict(trained_per_step) == {v: batch for v in range(first_step, steps)}, dict(trained_per_step)
    open_keys = [k for k in grants if ends[k] == 0]
    if closed:
        assert not open_keys, f"the run ended but {len(open_keys)} grants never ended: {open_keys}"
    assert len(open_keys) <= (eta_max + 1) * batch, f"{len(open_keys)} grants never ended: {open_keys}"
    return LedgerSummary(grants, ends, open_keys, dict(trained_per_step), accepted_by_actor)


def max_outstanding(events: list[dict]) -> list[int]:
    """Groups granted and not yet ended after each ledger event (the admission load minus the
    v * B already trained): at most (eta + 1) * B while eta holds."""
    out, open_ = [], 0
    for e in events:
        if e["event"] == "lease":
            open_ += len(e["prompts"])
        elif e["event"] == "end":
            open_ -= 1
        out.append(open_)
    return out
