"""`or1 status` and `or1 set`: an admin client on the learner's control port."""

from __future__ import annotations

import json
import socket
import time

from bus.client import Client, RemoteError
from bus.messages import ERR_BAD_REPLY, ROLE_ADMIN, Hello, Set, SetReply, Status, StatusReply
from common.config import Config

SETTABLE = {"max-staleness": "max_staleness", "max_staleness": "max_staleness"}


def _client(endpoint: str, cfg: Config, admin_key: str = "") -> Client:
    wid = f"admin-{socket.gethostname()}-{time.time_ns() % 10**9}"
    from bus.auth import client_curve

    c = Client(endpoint, lambda: Hello(role=ROLE_ADMIN, worker_id=wid, host=socket.gethostname(), admin_key=admin_key),
               heartbeat_s=cfg.bus.heartbeat_s, liveness=cfg.bus.liveness, curve=client_curve(cfg.bus.curve_dir, ROLE_ADMIN, cfg.bus.client_key))
    c.connect(timeout=10.0)
    return c


def fetch_status(endpoint: str, cfg: Config, admin_key: str = "") -> StatusReply:
    c = _client(endpoint, cfg, admin_key)
    try:
        reply = c.request(Status(), timeout=10.0)
    finally:
        c.close(bye="done")
    if not isinstance(reply, StatusReply):
        raise RemoteError(ERR_BAD_REPLY, f"expected status_reply, got {reply.TYPE}")
    return reply


def render_status(s: StatusReply) -> str:
    lines = [f"run {s.run_id}  epoch {s.epoch}  version {s.version}  max_staleness {s.max_staleness}  stage {s.stage}",
             "queues: " + "  ".join(f"{k}={v}" for k, v in sorted(s.queues.items())),
             "rates:  " + "  ".join(f"{k}={v:.3g}" for k, v in sorted(s.rates.items())),
             f"{'role':<7} {'id':<28} {'host':<16} {'address':<15} {'device':<9} {'version':>7} {'lag':>4} "
             f"{'tok/s':>8} {'leases':>6} {'seen':>6}"]
    for p in sorted(s.fleet, key=lambda p: (p.role, p.worker_id)):
        lines.append(f"{p.role:<7} {p.worker_id[:28]:<28} {p.host[:16]:<16} {p.address[:15]:<15} "
                     f"{(p.device or '-')[:9]:<9} {p.weight_version:>7} "
                     f"{p.lag:>4} {p.tokens_per_s:>8.1f} {p.leases:>6} {p.last_seen_s:>5.1f}s")
        if p.problem:
            lines.append(f"        ! {p.problem}")
    return "\n".join(lines)


def show_status(endpoint: str, cfg: Config, *, watch: float = 0.0, as_json: bool = False, admin_key: str = "") -> int:
    while True:
        try:
            s = fetch_status(endpoint, cfg, admin_key)
        except (TimeoutError, RemoteError, OSError) as e:
            print(f"or1: no answer from {endpoint}: {e}")
            return 1
        if as_json:
            from dataclasses import asdict

            print(json.dumps(asdict(s)))
        else:
            print(render_status(s), flush=True)
        if watch <= 0:
            return 0
        time.sleep(watch)
        print()


def set_value(endpoint: str, key: str, value: str, cfg: Config, *, admin_key: str = "") -> int:
    name = SETTABLE.get(key)
    if name is None:
        print(f"or1: unknown setting {key!r}; settable: {', '.join(sorted(set(SETTABLE)))}")
        return 2
    try:
        parsed = int(value)
    except ValueError:
        print(f"or1: {key} needs an integer, got {value!r}")
        return 2
    try:
        c = _client(endpoint, cfg, admin_key)
        try:
            reply = c.request(Set(key=name, value=parsed, admin_key=admin_key), timeout=10.0)
        finally:
            c.close(bye="done")
    except (TimeoutError, RemoteError, OSError) as e:
        print(f"or1: set {key} failed: {e}")
        return 1
    if isinstance(reply, SetReply):
        print(f"{key}: {reply.old} -> {reply.new}")
        return 0
    print(f"or1: unexpected reply {reply.TYPE}")
    return 1
