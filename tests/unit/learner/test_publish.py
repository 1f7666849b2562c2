"""learner/run.py publish: one version's store, a tied alias sent once (engines re-tie it)."""

from __future__ import annotations

import numpy as np

from bus.weights.store import WeightStore
from common.config import load_config
from learner.run import publish, unique_arrays


class FakeRanks:
    """export_weights as the Trainer returns it for tied embeddings: the alias is the same array."""

    def __init__(self):
        emb = np.arange(12, dtype=np.float32).reshape(4, 3)
        self.exported = [("model.embed_tokens.weight", emb, "float32"),
                         ("model.norm.weight", np.ones(3, np.float32), "float32"),
                         ("lm_head.weight", emb, "float32")]

    def export_weights(self, dtype="auto"):
        return self.exported


class FakeServer:
    def __init__(self):
        self.stores: list[WeightStore] = []

    def publish(self, store):
        self.stores.append(store)


def test_a_tied_alias_is_published_once():
    server = FakeServer()
    publish(FakeRanks(), server, 7, load_config(overrides=["bus.shared_memory=false"]))
    [store] = server.stores
    assert store.version == 7
    assert [t.name for t in store.manifest.tensors] == ["model.embed_tokens.weight", "model.norm.weight"]
    assert store.manifest.total_bytes < 2 * 48 + 64  # the embedding's 48 bytes once (64-byte aligned)


def test_distinct_arrays_are_all_kept_even_when_equal():
    a, b = np.zeros(3, np.float32), np.zeros(3, np.float32)  # an untied head equal to the embedding
    got = unique_arrays([("x", a, "float32"), ("y", b, "float32"), ("z", a, "float32")])
    assert [n for n, _, _ in got] == ["x", "y"]
