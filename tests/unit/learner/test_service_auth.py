"""Roles bound to keys, ids bound to sessions, secret keys kept secret (issue 15, items 5–6): the real
LearnerService on a real bus Server, with and without CurveZMQ."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from bus import messages as M
from bus.auth import CurveConfig, KeyFileError, check_secret_key, key_role, make_layout, server_curve
from bus.client import Client, RemoteError
from bus.server import Server
from common.config import load_config
from learner.scheduler import Prompt, Scheduler
from learner.service import LearnerService


def start(tmp_path: Path, curve_dir: Path | None = None, admin_key: str = "") -> tuple[LearnerService, Server]:
    cfg = load_config(overrides=["bus.heartbeat_s=0.2", f"learner.admin_key={admin_key!r}" if admin_key else "learner.admin_key=''"])
    sched = Scheduler.from_config([Prompt("p0", np.array([1, 2], np.int32), "math", "1")], cfg.learner, 0)
    svc = LearnerService(cfg, sched, run_id="r", model="m", weights_endpoint="tcp://*:1")
    srv = Server("tcp://127.0.0.1:0", heartbeat_s=0.2, curve=CurveConfig.server_from_dir(curve_dir) if curve_dir else None)
    svc.attach(srv)
    srv.start()
    return svc, srv


def client(srv: Server, role: str, wid: str, keys: Path | None = None, key: str = "", admin_key: str = "") -> Client:
    curve = CurveConfig.client_from_dir(keys, key) if keys else None
    return Client(srv.endpoint, lambda: M.Hello(role=role, worker_id=wid, admin_key=admin_key), heartbeat_s=0.2, curve=curve)


def test_key_names_grant_roles():
    assert [key_role(n) for n in ("actor", "actor-node7", "reward_b", "admin2", "actors", "evil", "")] == \
        ["actor", "actor", "reward", "admin", None, None, None]
    with pytest.raises(ValueError, match="grant no role"):
        make_layout("/tmp/never-made", ["mallory"])


def test_with_curve_the_key_decides_the_role(tmp_path):
    keys = tmp_path / "keys"
    make_layout(keys, ["actor", "reward", "admin"])
    svc, srv = start(tmp_path, keys, admin_key="sesame")
    made = []
    try:
        ok = client(srv, "actor", "a1", keys, "actor"); made.append(ok)
        assert isinstance(ok.connect(timeout=5), M.Welcome)
        with pytest.raises(RemoteError, match="status needs the admin role"):
            ok.request(M.Status(), timeout=5)  # an actor key holder cannot read the fleet
        impostor = client(srv, "actor", "a2", keys, "reward"); made.append(impostor)
        with pytest.raises(RemoteError, match="grants the role 'reward', not 'actor'"):
            impostor.connect(timeout=5)  # the reward key is not an actor's
        admin = client(srv, "admin", "ad", keys, "admin"); made.append(admin)
        admin.connect(timeout=5)
        assert isinstance(admin.request(M.Status(), timeout=5), M.StatusReply)
        by_key = client(srv, "admin", "ad2", keys, "actor", admin_key="sesame"); made.append(by_key)
        by_key.connect(timeout=5)  # the admin key opens the admin role to any allowed key
        assert isinstance(by_key.request(M.Set("max_staleness", 2), timeout=5), M.SetReply)
    finally:
        for c in made:
            c.close()
        srv.stop()


def test_plaintext_status_needs_admin_role_and_key(tmp_path):
    svc, srv = start(tmp_path, admin_key="sesame")
    made = []
    try:
        actor = client(srv, "actor", "a1"); made.append(actor)
        actor.connect(timeout=5)
        with pytest.raises(RemoteError, match="admin role"):
            actor.request(M.Status(), timeout=5)
        with pytest.raises(RemoteError, match="admin role"):
            actor.request(M.Set("max_staleness", 5), timeout=5)
        nokey = client(srv, "admin", "ad"); made.append(nokey)
        with pytest.raises(RemoteError, match="admin key required"):
            nokey.connect(timeout=5)
        admin = client(srv, "admin", "ad2", admin_key="sesame"); made.append(admin)
        admin.connect(timeout=5)
        assert isinstance(admin.request(M.Status(), timeout=5), M.StatusReply)
    finally:
        for c in made:
            c.close()
        srv.stop()


def test_a_live_worker_id_cannot_be_taken_over(tmp_path):
    """The landed code treated any Hello with a known worker_id as a reconnect and kicked the real
    actor out. Now only the same session (a reconnect of the same process) may take it over."""
    svc, srv = start(tmp_path)
    real = client(srv, "actor", "a1")
    thief = client(srv, "actor", "a1")
    try:
        real.connect(timeout=5)
        with pytest.raises(TimeoutError):
            thief.connect(timeout=1.0)  # refused with id_in_use, and told to retry later
        (peer,) = srv.peers()
        assert peer.hello.session == real.session and srv.metrics["bus/refused_hellos"] >= 1
        assert isinstance(real.request(M.LeaseRequest(1, 0), timeout=5), (M.Lease, M.Wait))  # still served
    finally:
        thief.close()
        real.close()
        srv.stop()


def test_keys_are_private_and_a_readable_server_key_is_refused(tmp_path):
    keys = tmp_path / "keys"
    make_layout(keys, ["actor"])
    for path in (keys / "server.key_secret", keys / "clients" / "actor.key_secret"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for d in (keys, keys / "clients"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert server_curve(str(keys)) is not None
    os.chmod(keys / "server.key_secret", 0o640)  # group-readable (Kubernetes fsGroup Secrets): fine
    check_secret_key(keys / "server.key_secret")
    os.chmod(keys / "server.key_secret", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        server_curve(str(keys))
    assert server_curve(str(keys), allow_readable=True) is not None
