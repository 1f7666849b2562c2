"""The reward service end to end: real `python -m rewards.worker` processes on a real bus, with
the learner side played by the real pieces the learner uses (bus.server.Server and
learner.dispatch.ScoreDispatcher). A worker killed mid-request loses no item; a late answer from a
worker the learner gave up on is ignored; every item gets exactly one result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from learner.dispatch import ScoreDispatcher
from bus.messages import WAIT_DONE, Ready, ScoreItem, ScoreOut, ScoreRequest, ScoreResult, Wait
from bus.server import Peer, Server
from rewards.sandbox import sandbox_problem

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(sandbox_problem()), reason=f"no sandbox here: {sandbox_problem()}")]

ROOT = Path(__file__).resolve().parents[2]
CODE_SLEEP_S = 0.5


class Learner:
    """The learner's side of scoring: Server + ScoreDispatcher, results recorded per key."""

    def __init__(self, heartbeat_s: float, liveness: int, timeout_s: float):
        self.server = Server("tcp://127.0.0.1:0", heartbeat_s=heartbeat_s, liveness=liveness)
        self.lock = threading.Lock()
        self.results: dict[int, list[list[ScoreOut]]] = defaultdict(list)
        self.sent: list[tuple[str, int]] = []  # (worker_id, request_id) of every ScoreRequest
        self.failed: dict[int, str] = {}
        self.dispatcher = ScoreDispatcher(self._send, self._on_result, on_failed=self.failed.__setitem__,
                                          timeout_s=timeout_s)
        self.server.on(Ready, self._on_ready)
        self.server.on(ScoreResult, self._on_score_result)
        self.server.on_dead(self._on_dead)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self.server.start()
        self._ticker.start()

    # server-thread handlers: the dispatcher is plain bookkeeping, guarded by one lock
    def _on_ready(self, peer: Peer, msg: Ready) -> None:
        with self.lock:
            self.dispatcher.ready(peer.worker_id, msg.credits, time.monotonic())

    def _on_score_result(self, peer: Peer, msg: ScoreResult) -> None:
        with self.lock:
            self.dispatcher.result(peer.worker_id, msg, time.monotonic())

    def _on_dead(self, peer: Peer) -> None:
        with self.lock:
            self.dispatcher.worker_dead(peer.worker_id, time.monotonic())

    def _send(self, worker_id: str, msg: ScoreRequest) -> bool:
        self.sent.append((worker_id, msg.request_id))
        return self.server.send(worker_id, msg)

    def _on_result(self, key: int, outs: list[ScoreOut]) -> None:
        self.results[key].append(outs)

    def _tick(self) -> None:
        while not self._stop.wait(0.1):
            with self.lock:
                self.dispatcher.tick(time.monotonic())

    def submit(self, key: int, items: list[ScoreItem]) -> None:
        with self.lock:
            self.dispatcher.submit(key, items, time.monotonic())

    def wait_for(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if pred():
                    return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        self.server.stop()


def start_worker(endpoint: str, worker_id: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rewards.worker", "--learner", endpoint, "--workers", "1",
         "--worker-id", worker_id, "--set", "reward.code_timeout_s=5", "--set", "reward.math_timeout_s=5"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def unit(k: int) -> list[ScoreItem]:
    """A slow right program (reward 1) and a math answer right for even k only."""
    code = f"```python\nimport time\ntime.sleep({CODE_SLEEP_S})\nprint(int(input()) * 2)\n```"
    spec = json.dumps({"inputs": [f"{k}\n"], "outputs": [str(2 * k)]})
    gold = str(k if k % 2 == 0 else k + 1)
    return [ScoreItem("code", code, spec), ScoreItem("math", f"\\boxed{{{k}}}", gold)]


def expected(k: int) -> list[float]:
    return [1.0, 1.0 if k % 2 == 0 else 0.0]


@pytest.fixture
def fleet():
    procs: list[subprocess.Popen] = []
    learners: list[Learner] = []

    def make(heartbeat_s: float, liveness: int, timeout_s: float):
        learner = Learner(heartbeat_s, liveness, timeout_s)
        learners.append(learner)
        workers = {wid: start_worker(learner.server.endpoint, wid) for wid in ("w1", "w2")}
        procs.extend(workers.values())
        learner.wait_for(lambda: set(learner.dispatcher.workers()) == {"w1", "w2"}, 60, "both workers' Ready")
        # credits: one pool process + the default queue (reward.queue_items)
        assert learner.dispatcher.workers() == {"w1": 1 + 32, "w2": 1 + 32}
        return learner, workers

    yield make
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for learner in learners:
        learner.close()


def descendants(root: int) -> set[int]:
    """Every live process below `root` (forkserver, pool workers, sandbox holders...)."""
    parent = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                parent[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def assert_exactly_once(learner: Learner, keys: range) -> None:
    with learner.lock:
        assert sorted(learner.results) == list(keys)
        for k in keys:
            assert len(learner.results[k]) == 1, f"key {k} delivered {len(learner.results[k])} times"
            assert [o.reward for o in learner.results[k][0]] == expected(k), (k, learner.results[k])
            assert all(o.error == "" for o in learner.results[k][0]), learner.results[k]


def test_worker_killed_mid_request_loses_nothing(fleet):
    learner, workers = fleet(heartbeat_s=0.2, liveness=5, timeout_s=60.0)
    keys = range(8)
    for k in keys:
        learner.submit(k, unit(k))
    learner.wait_for(lambda: any(wid == "w1" for wid, _ in learner.sent), 10, "a request to w1")
    time.sleep(0.2)  # w1 is inside its slow code item, with more of its requests queued behind it
    w1_held = [rid for wid, rid in learner.sent if wid == "w1"]
    assert len(w1_held) >= 2, learner.sent  # credits = 1 process + queue_items: it took a queue
    below = descendants(workers["w1"].pid)
    assert len(below) >= 2  # its forkserver and pool worker at least
    workers["w1"].kill()
    learner.wait_for(lambda: len(learner.results) == len(keys), 60, "all results")
    assert_exactly_once(learner, keys)
    assert learner.dispatcher.metrics["bus/score_reassigned"] >= 1
    assert "w1" not in learner.dispatcher.workers()
    assert workers["w2"].poll() is None  # the survivor is still serving
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in below) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in below if alive(pid)] == []  # nothing of w1 outlives it
    workers["w2"].terminate()  # SIGTERM: Bye, pool closed, exit 0
    assert workers["w2"].wait(15) == 0
    learner.wait_for(lambda: learner.dispatcher.workers() == {}, 5, "w2's Bye")


def test_late_result_from_a_worker_given_up_on_is_ignored(fleet):
    # liveness 10 s: a frozen worker stays a peer; the dispatcher's 1 s request timeout gives up first
    learner, workers = fleet(heartbeat_s=0.5, liveness=20, timeout_s=1.0)
    learner.submit(0, unit(0))
    learner.wait_for(lambda: bool(learner.sent), 10, "the first request")
    first_worker = learner.sent[0][0]
    workers[first_worker].send_signal(signal.SIGSTOP)
    learner.wait_for(lambda: 0 in learner.results, 30, "the reassigned result")
    assert {wid for wid, _ in learner.sent} == {"w1", "w2"}
    workers[first_worker].send_signal(signal.SIGCONT)  # its answer now arrives late
    learner.wait_for(lambda: learner.dispatcher.metrics["bus/late_results"] >= 1, 10, "the late result")
    for k in range(1, 5):  # both workers keep working afterwards
        learner.submit(k, unit(k))
    learner.wait_for(lambda: len(learner.results) == 5, 30, "the rest")
    assert_exactly_once(learner, range(5))
    for wid, proc in workers.items():  # the learner says the run is over
        assert learner.server.send(wid, Wait(reason=WAIT_DONE))
        assert proc.wait(15) == 0
