"""Fixtures of the multi-host suite: a fresh set of namespace hosts per test (tests/multihost/netns.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # e2e_support: ledger checks, readers

from netns import Network, unavailable  # noqa: E402

from cluster import HOSTS  # noqa: E402


@pytest.fixture
def network():
    why = unavailable()
    if why:
        print(f"multi-host test skipped: {why}")
        pytest.skip(f"network namespaces cannot be made here: {why}")
    net = Network.make(HOSTS)
    try:
        yield net
    finally:
        net.close()
