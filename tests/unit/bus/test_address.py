"""The addressing rules of bus/address.py: what a peer dials for an advertised endpoint."""

from __future__ import annotations

import socket

import pytest

from bus import address as A

LEARNER = "tcp://10.77.0.1:5555"


@pytest.mark.parametrize("host", ["*", "0.0.0.0", "", "::", "[::]"])
def test_wildcard_becomes_the_host_the_peer_dialed(host):
    assert A.resolve_advertised(f"tcp://{host}:5556", LEARNER) == "tcp://10.77.0.1:5556"


def test_loopback_name_becomes_the_host_the_peer_dialed():
    # the bug of the old addressing: the learner advertised its hostname, which maps to a loopback
    # address on Debian (127.0.1.1) and on this machine; the actor then dialed itself
    assert A.resolve_advertised("tcp://localhost:5556", LEARNER) == "tcp://10.77.0.1:5556"
    assert A.resolve_advertised("tcp://127.0.1.1:5556", LEARNER) == "tcp://10.77.0.1:5556"
    if A.is_loopback(socket.gethostname()):
        assert A.resolve_advertised(f"tcp://{socket.gethostname()}:5556", LEARNER) == "tcp://10.77.0.1:5556"


def test_unresolvable_name_becomes_the_host_the_peer_dialed():
    assert A.resolve_advertised("tcp://no-such-host.invalid:5556", LEARNER) == "tcp://10.77.0.1:5556"


def test_a_real_address_is_kept():
    assert A.resolve_advertised("tcp://10.0.0.9:5556", LEARNER) == "tcp://10.0.0.9:5556"  # e.g. --advertise on IB


def test_loopback_is_kept_when_the_peer_dialed_loopback_too():
    assert A.resolve_advertised("tcp://127.0.0.1:5556", "tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5556"
    assert A.resolve_advertised("tcp://*:5556", "tcp://localhost:5555") == "tcp://localhost:5556"


def test_other_transports_are_left_alone():
    assert A.resolve_advertised("ipc:///tmp/w", LEARNER) == "ipc:///tmp/w"
    assert A.resolve_advertised("tcp://*:5556", "ipc:///tmp/c") == "tcp://*:5556"


def test_relay_endpoint_gets_the_peer_address():
    assert A.fill_peer_host("tcp://0.0.0.0:5557", "10.77.0.3") == "tcp://10.77.0.3:5557"
    assert A.fill_peer_host("tcp://*:5557", "10.77.0.3") == "tcp://10.77.0.3:5557"
    assert A.fill_peer_host("tcp://127.0.0.1:5557", "10.77.0.3") == "tcp://10.77.0.3:5557"
    assert A.fill_peer_host("tcp://*:5557", "fd00::3") == "tcp://[fd00::3]:5557"


def test_relay_endpoint_kept_when_explicit_or_unknown_peer():
    assert A.fill_peer_host("tcp://10.0.0.9:5557", "10.77.0.3") == "tcp://10.0.0.9:5557"  # --advertise
    assert A.fill_peer_host("tcp://0.0.0.0:5557", "") == "tcp://0.0.0.0:5557"  # ipc/inproc: no Peer-Address
    assert A.fill_peer_host("tcp://127.0.0.1:5557", "127.0.0.1") == "tcp://127.0.0.1:5557"  # all on one host


def test_learner_advertise_host():
    assert A.learner_advertise_host("", "*") == A.ANY_HOST
    assert A.learner_advertise_host("", "0.0.0.0") == A.ANY_HOST
    assert A.learner_advertise_host("", "10.1.2.3") == "10.1.2.3"
    assert A.learner_advertise_host("ib0.node7", "*") == "ib0.node7"


def test_reachable_host_is_not_loopback_when_an_interface_exists():
    host = A.reachable_host("", "*")
    if A.interface_addresses():
        assert not A.is_loopback(host)
    assert A.reachable_host("nodeA", "*") == "nodeA"


def test_hint_names_endpoint_and_setting():
    assert "tcp://vm:5556" in A.hint("tcp://vm:5556", True) and "--advertise" in A.hint("tcp://vm:5556", True)
    assert "actor.relay_advertise" in A.hint("tcp://x:5557", False)


def test_server_records_the_peer_address():
    """A Hello over TCP carries libzmq's Peer-Address into the server's Peer."""
    from bus.client import Client
    from bus.messages import ROLE_ACTOR, Hello
    from bus.server import Server

    server = Server("tcp://127.0.0.1:0", heartbeat_s=0.2)
    server.start()
    client = Client(server.endpoint, lambda: Hello(role=ROLE_ACTOR, worker_id="a1"), heartbeat_s=0.2)
    try:
        client.connect(timeout=10)
        (peer,) = server.peers()
        assert peer.address == "127.0.0.1"
    finally:
        client.close()
        server.stop()
