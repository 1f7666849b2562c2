"""The learner's serving side in one process, for tests of the actor and of the service: the bus
`Server` with `LearnerService` and `Scheduler`, a `WeightServer` publishing versions (what
learner/run.py `_serve_and_train` wires, without the trainer), and a reward worker on the bus."""

from __future__ import annotations

import threading
import time

import numpy as np

from bus.client import Client
from bus.messages import ROLE_ACTOR, ROLE_REWARD, Hello, Ready, ScoreOut, ScoreRequest, ScoreResult
from bus.server import Server
from bus.weights.server import WeightServer
from bus.weights.store import WeightStore
from common.config import load_config
from learner.scheduler import Prompt, Scheduler
from learner.service import LearnerService

RUN_LEN = 64  # the context the learner announces
MODEL = "fake-model"


class Learner:
    """The learner's serving side in this process. `publish(v)` serves version v's weights (each
    version's one tensor holds v); `step()` is `train_one` without the trainer."""

    def __init__(self, *, eta: int = 0, lease_timeout_s: float = 600.0, publish_first: bool = True,
                 extra: tuple[str, ...] = ()):
        self.cfg = load_config(overrides=[*extra,
            "bus.heartbeat_s=0.2", "bus.shared_memory=false", f"learner.max_staleness={eta}",
            "learner.lease_groups=2", f"learner.lease_timeout_s={lease_timeout_s}",
            "learner.stages=[{steps=50, max_response_tokens=8, prompts_per_batch=2, group_size=2}]",
            "actor.max_groups=2", "actor.worker_id=act",
        ])
        self.events: list[dict] = []
        prompts = [Prompt(f"p{i}", np.array([1, 2, 3 + i], np.int32), "math", "1") for i in range(8)]
        self.scheduler = Scheduler.from_config(prompts, self.cfg.learner, 0, on_event=self.events.append)
        self.weights = WeightServer("tcp://127.0.0.1:0")
        if publish_first:
            self.publish(0)
        self.service = LearnerService(self.cfg, self.scheduler, run_id="run", model=MODEL,
                                      weights_endpoint=self.weights.endpoint, max_model_len=RUN_LEN)
        self.server = Server("tcp://127.0.0.1:0", heartbeat_s=0.2, liveness=50)  # a gone peer said Bye
        self.service.attach(self.server)
        self.server.start()
        self.cfg.actor.learner = self.server.endpoint

    def publish(self, version: int) -> None:
        self.weights.publish(WeightStore.from_arrays(version, [("w", np.full(4, version, np.float32))]))

    def step(self) -> int:
        """Wait for a batch of scored groups, publish the next version, advance: the new version."""
        batch = self.service.next_batch(threading.Event())
        assert batch is not None
        self.publish(batch.version + 1)
        self.service.step_done(batch.version + 1)
        return batch.version + 1

    def seen(self, event: str, **fields) -> list[dict]:
        return [e for e in list(self.events) if e["event"] == event and all(e.get(k) == v for k, v in fields.items())]

    def actors(self) -> list:
        return [p for p in self.server.peers() if p.role == ROLE_ACTOR]

    def close(self) -> None:
        self.server.stop()
        self.weights.stop()


class Scorer:
    """A reward worker on the bus: each group's samples get rewards 0, 1, 0, … (a useful group)."""

    def __init__(self, endpoint: str):
        self.client = Client(endpoint, lambda: Hello(role=ROLE_REWARD, worker_id="rw"), heartbeat_s=0.2)
        self.client.connect(timeout=10)
        self.client.send(Ready(credits=1000))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            msg = self.client.recv(timeout=0.05)
            if isinstance(msg, ScoreRequest):
                results = [ScoreOut(reward=float(i % 2)) for i in range(len(msg.items))]
                self.client.send(ScoreResult(request_id=msg.request_id, results=results))
                self.client.send(Ready(credits=1000))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


def until(cond, timeout: float = 15.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or cond}")
