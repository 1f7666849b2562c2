"""actors/sync.py `WeightSync` against a real `WeightServer`: a version the source no longer holds
is followed at once by a pull of the newer one (no back-off: the source answered)."""

import threading
import time
from types import SimpleNamespace

import numpy as np

from actors.sync import RETRY_PULL_S, WeightSync
from bus.messages import SOURCE_LEARNER, WeightSource
from bus.weights.server import WeightServer
from bus.weights.store import WeightStore
from common.config import BusConfig


class Client:
    """What the pull thread asks of the bus client: the newest version announced, the learner's
    weights endpoint, and WeightSource answers naming the learner."""

    def __init__(self, weights_endpoint: str):
        self.endpoint = "tcp://127.0.0.1:1"
        self.welcome = SimpleNamespace(weights_endpoint=weights_endpoint)
        self.server_version = -1

    def request(self, msg, timeout: float):
        assert isinstance(msg, WeightSource)
        return WeightSource(version=msg.version, endpoint="learner", source_id=SOURCE_LEARNER)


def store(version: int) -> WeightStore:
    return WeightStore.from_arrays(version, [("w", np.full(4, version, np.float32))])


def test_a_version_gone_is_followed_at_once_by_the_newer_one():
    server = WeightServer("tcp://127.0.0.1:0", keep_versions=1)
    client = Client(server.endpoint)
    sync = WeightSync(client, BusConfig())
    try:
        server.publish(store(2))  # version 1 came and went before we asked
        sync.want(1)
        sync.start()
        time.sleep(0.3)  # the pull of 1 was refused ("not held")
        client.server_version = 2
        t0 = time.monotonic()
        got = sync.wait_for(2, timeout=10.0)
        assert got is not None and got.manifest.version == 2
        assert time.monotonic() - t0 < RETRY_PULL_S / 2, "waited as after a failure"
        assert sync.stats.failures >= 1 and sync.problem == ""
    finally:
        sync.stop()
        server.close()


def test_want_wakes_the_idle_pull_thread_at_once():
    """The learner answers Wait(weights) the moment it publishes: the pull starts then, not at the
    idle poll's next look (an actor waited ~25 ms a step on the embedded run for it)."""
    from actors.sync import IDLE_S

    server = WeightServer("tcp://127.0.0.1:0", keep_versions=1)
    client = Client(server.endpoint)
    sync = WeightSync(client, BusConfig())
    sync._wake.wait = lambda timeout=None: threading.Event.wait(sync._wake, 100 * IDLE_S)  # an idle poll of 5 s
    try:
        sync.start()
        time.sleep(0.2)  # idle: nothing wanted
        server.publish(store(3))
        t0 = time.monotonic()
        sync.want(3)
        got = sync.wait_for(3, timeout=10.0)
        assert got is not None and got.manifest.version == 3
        assert time.monotonic() - t0 < 2.0, "the pull waited for the idle poll"
    finally:
        sync.stop()
        server.close()
