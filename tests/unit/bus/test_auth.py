"""bus.auth: CurveZMQ allow-list on the control and weights ports; unknown keys get no answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bus import messages as M
from bus.auth import CurveConfig, make_keys, make_layout
from bus.client import Client
from bus.server import Server
from bus.weights.pull import pull
from bus.weights.server import WeightServer
from bus.weights.store import WeightStore


def hello(worker: str):
    return lambda: M.Hello(role="actor", worker_id=worker)


def test_make_keys_writes_zmq_certificates(tmp_path: Path) -> None:
    public, secret = make_keys(tmp_path, "alice")
    assert public == tmp_path / "alice.key" and secret == tmp_path / "alice.key_secret"
    assert "curve" in public.read_text() and "secret-key" in secret.read_text()


def test_allowed_key_talks_unknown_key_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    make_layout(keys, ["actor1"])
    make_keys(tmp_path / "elsewhere", "mallory")  # a valid key pair the learner never allowed
    srv = Server("tcp://127.0.0.1:0", heartbeat_s=0.5, curve=CurveConfig.server_from_dir(keys))
    srv.on(M.Ready, lambda p, m: M.SubmitAck(lease_id=0, accepted=m.credits))
    hellos: list[str] = []
    srv.on_hello(lambda p: (hellos.append(p.worker_id), M.Welcome("r", 0, 0, 0.5, 3, 0))[1])
    srv.start()
    good = Client(srv.endpoint, hello("actor1"), curve=CurveConfig.client_from_dir(keys, "actor1"))
    bad = Client(srv.endpoint, hello("mallory"), curve=CurveConfig.client(
        tmp_path / "elsewhere" / "mallory.key_secret", keys / "server.key"))
    plain = Client(srv.endpoint, hello("plain"))
    try:
        assert isinstance(good.connect(timeout=5), M.Welcome)
        assert good.request(M.Ready(credits=3), timeout=5) == M.SubmitAck(lease_id=0, accepted=3)
        with pytest.raises(TimeoutError):
            bad.connect(timeout=1.0)
        with pytest.raises(TimeoutError):
            plain.connect(timeout=0.5)
        assert [p.worker_id for p in srv.peers()] == ["actor1"]
        assert hellos == ["actor1"]  # nothing from the other two got through the handshake
        assert srv.metrics["bus/bad_messages"] == 0
    finally:
        for c in (good, bad, plain):
            c.close()
        srv.stop()


def test_weights_port_with_curve(tmp_path: Path) -> None:
    make_layout(tmp_path, ["actor1"])
    srv = WeightServer("tcp://127.0.0.1:0", curve=CurveConfig.server_from_dir(tmp_path))
    try:
        arrays = [("w", np.arange(100_000, dtype=np.float32))]
        store = WeightStore.from_arrays(1, arrays, chunk_bytes=64 << 10)
        srv.publish(store)
        got, _ = pull(srv.endpoint, 1, curve=CurveConfig.client_from_dir(tmp_path, "actor1"))
        assert np.array_equal(got.buffer, store.buffer)
        with pytest.raises(TimeoutError):
            pull(srv.endpoint, 1, chunk_timeout_s=0.3, max_retries=0)  # plaintext: no answer
    finally:
        srv.stop()


def test_config_validation(tmp_path: Path) -> None:
    from bus.auth import apply_client, apply_server
    import zmq

    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.ROUTER)
        with pytest.raises(ValueError, match="allowed_clients_dir"):
            apply_server(sock, CurveConfig("x"), ctx)
        with pytest.raises(FileNotFoundError):
            apply_server(sock, CurveConfig.server("x", tmp_path / "missing"), ctx)
        with pytest.raises(ValueError, match="server_public_key_file"):
            apply_client(sock, CurveConfig("x"))
    finally:
        ctx.destroy(linger=0)
