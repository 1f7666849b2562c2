"""Hosts on one machine: network namespaces on a private bridge, each with its own address,
hostname and /etc/hosts, as separate nodes look to or1.

    switch namespace  ── bridge br0 ──┬── veth ── host "nodeA" 10.77.0.1  (eth0)
                                      ├── veth ── host "nodeB" 10.77.0.2
                                      └── ...

- Each host is a network namespace (`ip netns`), so its ports, addresses and routes are its own:
  every host can bind :5555, and only the bridge connects them.
- Commands run as `ip netns exec NS unshare --uts sh -c 'hostname NAME; exec CMD'`: a host has
  its own hostname, and its /etc/hosts (`/etc/netns/NS/hosts`, which `ip netns exec` mounts over
  /etc/hosts) maps that name to 127.0.1.1 as Debian does, and knows no other host's name. That is
  the setting where a process that advertises its own hostname is unreachable from elsewhere.
- `cut(host)` / `heal(host)` take the host's switch port down and up: this kernel has no
  `tc netem`, and a link down drops every packet both ways, as a pulled cable would.
- /dev/shm is the machine's, shared by all hosts; or1 tells hosts apart by network namespace
  (bus/weights/shm.host_id), so no weights travel through it between these hosts.

Traffic stays inside these namespaces: the bridge is not connected to the machine's network.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str:
    """Why namespaces cannot be made here ("" when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"or1probe{secrets.token_hex(3)}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


@dataclass
class Host:
    name: str  # hostname inside it, e.g. nodeA
    ns: str  # network namespace
    address: str  # its address on the bridge
    switch_port: str  # its veth end in the switch namespace

    def argv(self, cmd: list[str]) -> list[str]:
        script = f"hostname {shlex.quote(self.name)} && exec {shlex.join(cmd)}"
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", script]

    def popen(self, cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
              ) -> subprocess.Popen:
        """Start `cmd` on this host in its own session (the test can kill its whole group)."""
        return subprocess.Popen(self.argv(cmd), stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})}, start_new_session=True)

    def run(self, cmd: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(cmd), capture_output=True, text=True, timeout=timeout)


@dataclass
class Network:
    """A bridge and its hosts; `close()` removes every namespace (and so every veth)."""

    tag: str
    switch: str
    hosts: dict[str, Host] = field(default_factory=dict)

    @classmethod
    def make(cls, names: list[str]) -> "Network":
        tag = secrets.token_hex(2)
        net = cls(tag, f"or1{tag}sw")
        try:
            _ip("netns", "add", net.switch)
            _ip("-n", net.switch, "link", "set", "lo", "up")
            _ip("-n", net.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", net.switch, "link", "set", "br0", "up")
            for i, name in enumerate(names, start=1):
                net._add_host(i, name)
        except BaseException:
            net.close()
            raise
        return net

    def _add_host(self, i: int, name: str) -> None:
        ns, here, there = f"or1{self.tag}h{i}", f"o{self.tag}h{i}", f"o{self.tag}s{i}"
        _ip("netns", "add", ns)
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {name}\n::1 localhost ip6-localhost\n")
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", here, "netns", ns)
        _ip("link", "set", there, "netns", self.switch)
        _ip("-n", ns, "link", "set", here, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "set", there, "master", "br0")
        _ip("-n", self.switch, "link", "set", there, "up")
        self.hosts[name] = Host(name, ns, f"{SUBNET}.{i}", there)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def cut(self, name: str) -> None:
        """Partition a host: its switch port goes down (every packet either way is lost)."""
        _ip("-n", self.switch, "link", "set", self.hosts[name].switch_port, "down")

    def heal(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", self.hosts[name].switch_port, "up")

    def close(self) -> None:
        for host in self.hosts.values():
            _kill_namespace(host.ns)
            _ip("netns", "del", host.ns, check=False)
            shutil.rmtree(Path("/etc/netns") / host.ns, ignore_errors=True)
        _ip("netns", "del", self.switch, check=False)


def _kill_namespace(ns: str) -> None:
    """SIGKILL whatever still runs in `ns` (a namespace with live processes outlives `netns del`)."""
    res = _ip("netns", "pids", ns, check=False)
    for pid in res.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
