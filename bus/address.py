"""Which address a peer dials: the rules for advertised endpoints across hosts, in one place.

Two endpoints travel in messages and are dialed by *other* hosts: the learner's weights port (in
Welcome and WeightSource replies) and a relay actor's weights port (in its Hello, passed on by the
learner in WeightSource replies). A process cannot know by itself which of its addresses a peer can
reach: its hostname often maps to a loopback address (Debian and Ubuntu's /etc/hosts: ``127.0.1.1
vm``), containers share or fake hostnames, and nodes are multi-homed (InfiniBand and Ethernet). So
by default nobody advertises a guessed name; the address is filled in by the side that knows one
that works:

- **The learner's weights port** is advertised as ``tcp://*:PORT`` (no host: "where you reached
  me") unless ``learner.advertise_host`` (``or1 learner --advertise HOST``) or a concrete
  ``learner.bind_host`` says otherwise. The *peer* resolves it with ``resolve_advertised``: a
  wildcard, loopback-only or unresolvable host is replaced by the host the peer itself dialed for
  the control port, which it knows reaches the learner (both ports are bound on the same
  interfaces).
- **A relay's port** is advertised as its bind address (``tcp://0.0.0.0:5557``) unless
  ``actor.relay_advertise`` (``or1 actor --advertise ENDPOINT``) says otherwise. The *learner*
  fills it in with ``fill_peer_host``, using the address it sees the relay's Hello come from
  (libzmq's ``Peer-Address`` of that message): the address other actors can reach it at too, unless
  NAT is in between (then set ``--advertise``).

An explicit advertise setting is always used as given: it is the knob for multi-homed nodes.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache

WILDCARD_HOSTS = frozenset({"", "*", "0.0.0.0", "::", "[::]"})
ANY_HOST = "*"  # an advertised endpoint's host meaning "the address you reached me at"


def split_tcp(endpoint: str) -> tuple[str, str] | None:
    """(host, port) of a ``tcp://host:port`` endpoint (IPv6 hosts keep their brackets), or None
    for any other transport (ipc://, inproc://), whose endpoints are used as they are."""
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    if not sep or not port:
        return None
    return host, port


def tcp(host: str, port: str | int) -> str:
    return f"tcp://{host}:{port}"


def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


@lru_cache(maxsize=256)
def _addresses(host: str) -> tuple[str, ...]:
    """Every address `host` resolves to here, () when it does not resolve. Cached: names are
    resolved on rare events (a Hello, a weight source), and a slow resolver must not be asked twice."""
    try:
        return tuple({info[4][0] for info in socket.getaddrinfo(_bare(host), None, proto=socket.IPPROTO_TCP)})
    except (OSError, UnicodeError):
        return ()


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to here is a loopback address (127/8, ::1)."""
    addrs = _addresses(host)
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def resolve_advertised(endpoint: str, via: str) -> str:
    """The endpoint to dial for `endpoint`, advertised by the process we reached at `via` (the
    learner's control endpoint we connected to). Its host is replaced by `via`'s host when it is a
    wildcard, does not resolve here, or resolves only to loopback while `via` does not (the
    advertiser's hostname maps to its own loopback)."""
    ours, theirs = split_tcp(endpoint), split_tcp(via)
    if ours is None or theirs is None:
        return endpoint
    host, port = ours
    if (host in WILDCARD_HOSTS or not _addresses(host)
            or (is_loopback(host) and not is_loopback(theirs[0]))):
        return tcp(theirs[0], port)
    return endpoint


def fill_peer_host(endpoint: str, peer_address: str) -> str:
    """A relay endpoint as the learner passes it on: a wildcard or loopback host is replaced by the
    address the relay's messages come from (`peer_address`, from libzmq's Peer-Address), so actors
    on other hosts can dial it. Unchanged when there is no peer address (ipc, inproc) or the
    relay's host is a real one."""
    ours = split_tcp(endpoint)
    if ours is None or not peer_address:
        return endpoint
    host, port = ours
    peer = peer_address if ":" not in peer_address else f"[{peer_address}]"
    if host in WILDCARD_HOSTS or (is_loopback(host) and not is_loopback(peer)):
        return tcp(peer, port)
    return endpoint


def learner_advertise_host(advertise_host: str, bind_host: str) -> str:
    """The host part of the learner's advertised weights endpoint: the explicit setting, else a
    concrete bind address, else ANY_HOST (the peer fills in what it dialed)."""
    if advertise_host:
        return advertise_host
    return ANY_HOST if bind_host in WILDCARD_HOSTS else bind_host


def hint(endpoint: str, learner_source: bool) -> str:
    """What to change when pulls from `endpoint` keep failing: one line for logs and `or1 status`."""
    if learner_source:
        return (f"weights endpoint {endpoint} is not reachable from this host: start the learner with "
                f"--advertise HOST (learner.advertise_host), HOST being an address of the learner this host can reach")
    return (f"relay endpoint {endpoint} is not reachable from this host: start that actor with --advertise "
            f"tcp://HOST:PORT (actor.relay_advertise), or open its relay port")


def interface_addresses() -> list[str]:
    """This host's IPv4 addresses on its non-loopback interfaces, in interface order (Linux ioctl;
    [] elsewhere). Reads the kernel's tables: no traffic, no resolver."""
    return [addr for _, addr in _interfaces() if not ipaddress.ip_address(addr).is_loopback]


def _interfaces() -> list[tuple[str, str]]:
    """(name, IPv4 address) of each interface that has one (SIOCGIFADDR; [] off Linux)."""
    import fcntl
    import struct

    out = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
                except OSError:  # no IPv4 address on it
                    continue
                out.append((name, socket.inet_ntoa(packed[20:24])))
    except (OSError, AttributeError):
        pass
    return out


def reachable_host(advertise_host: str, bind_host: str) -> str:
    """A host name or address of this machine for people and tools on other hosts (the learner's
    ``RUN_DIR/endpoint`` file): the explicit setting, a concrete bind address, the hostname when it
    resolves to a non-loopback address, else the first interface address, else the hostname."""
    if advertise_host:
        return advertise_host
    if bind_host not in WILDCARD_HOSTS:
        return bind_host
    name = socket.gethostname()
    if _addresses(name) and not is_loopback(name):
        return name
    addrs = interface_addresses()
    return addrs[0] if addrs else name


def interface_towards(host: str, port: int = 9) -> str:
    """The name of the interface this host uses to reach `host` ("" if unknown). A connected UDP
    socket asks the kernel's routing table which source address it would use: nothing is sent."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            local = s.getsockname()[0]
    except OSError:
        return ""
    return next((name for name, addr in _interfaces() if addr == local), "")
