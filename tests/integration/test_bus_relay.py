"""A 100 MB weight version through one relay to two pullers, over tcp loopback.

Puller A pulls from the learner's WeightServer into a PartialStore that its own WeightServer (the
relay) publishes while it fills; puller B pulls from A's relay at the same time. Both end with the
learner's exact bytes, the learner sends every chunk once (to A only), and B's first chunk arrives
before A has finished: the relay serves chunk i as soon as it has it.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bus.weights.pull import fetch_manifest, pull
from bus.weights.server import WeightServer
from bus.weights.store import PartialStore, WeightStore


@pytest.mark.slow
def test_relay_chain_of_two_pullers_100mb() -> None:
    rng = np.random.default_rng(7)
    arrays = [(f"layer{i}.weight", rng.standard_normal((1280, 2048)).astype(np.float32)) for i in range(10)]
    store = WeightStore.from_arrays(12, arrays)
    assert store.manifest.total_bytes >= 100 * 10**6
    learner = WeightServer("tcp://127.0.0.1:0", name="learner-weights")
    relay = WeightServer("tcp://127.0.0.1:0", name="relay-weights")
    times: dict[str, list[float]] = {"a": [], "b": []}
    results: dict[str, object] = {}
    try:
        learner.publish(store)
        partial = PartialStore(fetch_manifest(learner.endpoint, 12))
        relay.publish_partial(partial)

        def run(name: str, source: str, part: PartialStore | None) -> None:
            try:
                results[name] = pull(source, 12, partial=part,
                                     on_chunk=lambda i: times[name].append(time.monotonic()))
            except BaseException as e:  # noqa: BLE001 — surfaced by the asserts below
                results[name] = e

        a = threading.Thread(target=run, args=("a", learner.endpoint, partial))
        b = threading.Thread(target=run, args=("b", relay.endpoint, None))
        a.start()
        b.start()
        a.join(timeout=120)
        b.join(timeout=120)
        got_a, metrics_a = results["a"]  # type: ignore[misc]
        got_b, metrics_b = results["b"]  # type: ignore[misc]
        for got in (got_a, got_b):
            assert got.manifest.checksum == store.manifest.checksum and got.verify()
            assert np.array_equal(got.buffer, store.buffer)
        for (name, x), (_, y) in zip(got_b.arrays(), arrays):
            assert np.array_equal(x, y), name
        n = store.n_chunks
        assert learner.metrics["weights/chunks_served"] == n  # the learner fed A only
        assert relay.metrics["weights/chunks_served"] == n  # B got everything from the relay
        assert min(times["b"]) < max(times["a"])  # B was served while A was still receiving
        assert metrics_a["weights/bad_chunks"] == metrics_b["weights/bad_chunks"] == 0
    finally:
        learner.stop()
        relay.stop()
