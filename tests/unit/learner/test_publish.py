"""learner/run.py publish: one version's store, built straight from the export, a tied alias sent once
(engines re-tie it)."""

from __future__ import annotations

import numpy as np
import pytest

from bus.weights.store import WeightStore
from common.config import load_config
from learner.run import publish


class FakeRanks:
    """What `RankGroup` gives publish for a tied model: the layout lists the embedding once (its
    alias, lm_head.weight, is the same tensor), and the export hands each tensor to the sink."""

    exports_shards = False  # ZeRO-3's sharded publish: tests/integration/test_trainer_multirank.py

    def __init__(self):
        self.emb = np.arange(12, dtype=np.float32).reshape(4, 3)
        self.norm = np.ones(3, np.float32)

    def weights_layout(self, dtype="auto"):
        return [("model.embed_tokens.weight", "float32", [4, 3]), ("model.norm.weight", "float32", [3])]

    def export_into(self, dtype, sink):
        sink("model.embed_tokens.weight", self.emb)
        sink("model.norm.weight", self.norm)


class FakeServer:
    def __init__(self):
        self.stores: list[WeightStore] = []

    def publish(self, store):
        self.stores.append(store)


def test_a_tied_alias_is_published_once():
    server, ranks = FakeServer(), FakeRanks()
    publish(ranks, server, 7, load_config(overrides=["bus.shared_memory=false"]))
    [store] = server.stores
    assert store.version == 7 and store.verify()
    assert [t.name for t in store.manifest.tensors] == ["model.embed_tokens.weight", "model.norm.weight"]
    assert store.manifest.total_bytes < 2 * 48 + 64  # the embedding's 48 bytes once (64-byte aligned)
    got = dict(store.arrays())
    assert np.array_equal(got["model.embed_tokens.weight"], ranks.emb)


def test_build_equals_from_arrays():
    """The same tensors laid out from a layout and written one by one, or from arrays: same bytes,
    manifest and checksum (padding zeroed even in a reused private buffer)."""
    arrays = [("a", np.arange(5, dtype=np.float32)), ("b", np.arange(7, dtype=np.uint16).reshape(7, 1)),
              ("c", np.float32(3.0) * np.ones((2, 3), np.float32))]
    tags = {"b": "bfloat16"}
    ref = WeightStore.from_arrays(3, arrays, chunk_bytes=32, dtype_names=tags)
    specs = [(n, tags.get(n, "float32"), list(a.shape)) for n, a in arrays]
    built = WeightStore.build(3, specs, lambda write: [write(n, a) for n, a in reversed(arrays)], chunk_bytes=32)
    assert built.manifest == ref.manifest and np.array_equal(built.buffer, ref.buffer)


@pytest.mark.parametrize("fill, error", [
    (lambda write: write("a", np.zeros(5, np.float32)), "never written"),
    (lambda write: [write("a", np.zeros(5, np.float32)), write("a", np.zeros(5, np.float32))], "written twice"),
    (lambda write: write("a", np.zeros(4, np.float32)), "bytes for a slot"),
    (lambda write: write("zz", np.zeros(5, np.float32)), "not in the layout"),
])
def test_build_refuses_a_fill_that_does_not_match_the_layout(fill, error):
    specs = [("a", "float32", [5]), ("b", "float32", [2])]
    with pytest.raises(ValueError, match=error):
        WeightStore.build(1, specs, fill)


def test_build_shared_equals_build_and_cleans_up_after_a_refused_fill():
    """A store filled through `shm.open_writer` (as other ranks do) holds what `build` lays out; a
    fill that reports failure or raises leaves no file in /dev/shm."""
    from bus.weights import shm

    arrays = [("a", np.arange(5, dtype=np.float32)), ("b", np.arange(6, dtype=np.float32).reshape(2, 3))]
    specs = [(n, "float32", list(a.shape)) for n, a in arrays]
    ref = WeightStore.build(1, specs, lambda write: [write(n, a) for n, a in arrays], chunk_bytes=16)

    def fill(file, metas):
        with shm.open_writer(str(file.path), file.file_id) as write:
            for m, (_, a) in zip(metas, arrays):
                write(m.offset, a)
        return True

    built = WeightStore.build_shared(1, specs, fill, chunk_bytes=16)
    assert built.manifest == ref.manifest and np.array_equal(built.buffer, ref.buffer) and built.shared.owner
    paths = []

    def refuse(file, metas):
        paths.append(file.path)
        return False

    assert WeightStore.build_shared(1, specs, refuse) is None and not paths[-1].exists()
    with pytest.raises(RuntimeError):
        WeightStore.build_shared(1, specs, lambda file, metas: paths.append(file.path) or (_ for _ in ()).throw(RuntimeError()))
    assert not paths[-1].exists()
