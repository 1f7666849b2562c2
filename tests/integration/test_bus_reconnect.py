"""A client survives its server *process* being killed (SIGKILL) and restarted on the same port:
it notices, says Hello again with the same worker_id and current state, and requests work again."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from procs import free_port

from bus import messages as M
from bus.client import Client

ROOT = Path(__file__).resolve().parents[2]

SERVER = r"""
import sys, time
from bus import messages as M
from bus.server import Server
endpoint, epoch = sys.argv[1], int(sys.argv[2])
srv = Server(endpoint, heartbeat_s=0.2, liveness=3)
def hello(peer):
    print(f"HELLO {peer.worker_id} {peer.hello.weight_version}", flush=True)
    return M.Welcome(run_id="r", epoch=epoch, version=10 * epoch, heartbeat_s=0.2, liveness=3,
                     max_staleness=0)
srv.on_hello(hello)
srv.on(M.Ready, lambda p, m: M.SubmitAck(lease_id=epoch, accepted=m.credits))
srv.start()
print("READY", srv.endpoint, flush=True)
while True:
    time.sleep(1)
"""


class ServerProcess:
    def __init__(self, endpoint: str, epoch: int):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, endpoint, str(epoch)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                     cwd=ROOT)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line from the server within {timeout} s")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.mark.slow
def test_client_rehellos_after_server_process_restart() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = ServerProcess(endpoint, epoch=1)
    second: ServerProcess | None = None
    held = {"version": 1}
    client = Client(endpoint,
                    lambda: M.Hello(role="actor", worker_id="actor-7", weight_version=held["version"]),
                    heartbeat_s=0.2)
    epochs: list[int] = []
    client.on_welcome(lambda w: epochs.append(w.epoch))
    try:
        first.expect("READY", 30)
        assert client.connect(timeout=10).epoch == 1
        assert first.expect("HELLO", 5) == "HELLO actor-7 1"
        assert client.request(M.Ready(credits=2), timeout=5) == M.SubmitAck(lease_id=1, accepted=2)

        first.kill()
        held["version"] = 4  # the actor pulled new weights meanwhile: the next Hello must say so
        time.sleep(0.5)
        second = ServerProcess(endpoint, epoch=2)
        second.expect("READY", 30)
        assert second.expect("HELLO", 20) == "HELLO actor-7 4"  # same worker_id, current state
        deadline = time.monotonic() + 10
        while (client.welcome is None or client.welcome.epoch != 2) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.welcome is not None and client.welcome.epoch == 2
        assert client.server_version == 20 and client.reconnects == 1
        assert client.request(M.Ready(credits=3), timeout=5) == M.SubmitAck(lease_id=2, accepted=3)
        assert epochs[:2] == [1, 2]
    finally:
        client.close()
        first.kill()
        if second is not None:
            second.kill()
