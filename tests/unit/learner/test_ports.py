"""learner.learner.bind_or_any: a taken port fails the bind, unless learner.any_free_port (or1 run)."""

from __future__ import annotations

import threading

import pytest
import zmq

from bus.server import Server
from bus.weights.server import WeightServer
from learner.learner import bind_or_any
from tests.procs import free_port


@pytest.fixture()
def taken_port():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = free_port()
    sock.bind(f"tcp://127.0.0.1:{port}")
    yield port
    sock.close(0)
    ctx.term()


@pytest.mark.parametrize("make", [lambda ep: Server(ep), lambda ep: WeightServer(ep)], ids=["control", "weights"])
def test_a_taken_port_fails_unless_any_free_port(taken_port: int, make) -> None:
    threads = threading.active_count()
    with pytest.raises(zmq.ZMQError) as e:
        bind_or_any(make, "127.0.0.1", taken_port, any_free=False)
    assert e.value.errno == zmq.EADDRINUSE
    assert threading.active_count() == threads  # the failed server left no thread behind
    server = bind_or_any(make, "127.0.0.1", taken_port, any_free=True)
    try:
        port = int(server.endpoint.rsplit(":", 1)[1])
        assert port not in (0, taken_port)
    finally:
        server.stop()


def test_or1_run_lets_its_learner_take_any_free_port() -> None:
    from common.config import Config
    from deploy.local import prepare

    cfg = Config()
    cfg.learner.model = "/nonexistent-model-folder"  # not "tiny": nothing is built
    assert not cfg.learner.any_free_port
    assert prepare(cfg, explicit_out=True).learner.any_free_port
