"""The file path of weight loads for tensor-parallel workers (actors/vllm_worker.py): a store in
shared memory names its own file, any tensors can be written to one, and a worker-side read of it
gives back exactly the tensors, bf16 included; a replaced file is refused before anything loads."""

from __future__ import annotations

import os

import pytest
import torch

from actors.vllm_engine import _open_same
from actors.vllm_worker import FileChanged, WeightFileLoader, file_tensors, map_file
from actors.weights_io import named_tensors, state_dict_arrays, weight_file, write_weight_file
from bus.weights.store import WeightStore


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(5, 3, generator=g), "b.bias": torch.randn(7, generator=g),
            "c.weight": torch.randn(2, 2, 2, generator=g).to(torch.bfloat16), "empty": torch.zeros(0)}


def read_back(wf) -> dict[str, torch.Tensor]:
    """What a worker maps: the file through this process's fd of it, as the engine names it."""
    fd = _open_same(wf)
    assert fd is not None
    try:
        return dict(file_tensors(map_file(f"/proc/{os.getpid()}/fd/{fd}", wf.file_id), wf.entries))
    finally:
        os.close(fd)  # the mapping stays valid


def test_written_file_reads_back_exactly():
    src = tensors()
    wf = write_weight_file(list(src.items()))
    try:
        got = read_back(wf)
        assert list(got) == list(src)
        for name, t in src.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
        aliased = wf.with_alias("head", of="a.weight")
        assert torch.equal(read_back(aliased)["head"], src["a.weight"])
    finally:
        wf.close()
    assert not os.path.exists(wf.path)  # a written file lives only for the load


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_shared_store_names_its_own_file(dtype):
    src = {k: v for k, v in tensors().items() if v.dtype == torch.float32}
    store = WeightStore.from_arrays(3, state_dict_arrays(src, dtype), shared=True)
    if store.shared is None:
        pytest.skip("no room in /dev/shm")
    wf = weight_file(named_tensors(store))
    assert wf is not None and wf.path == str(store.shared.path) and wf.owned is None
    got = read_back(wf)
    for name, t in named_tensors(store):
        assert torch.equal(got[name], t)
    wf.close()
    assert os.path.exists(wf.path)  # the store's own file is not ours to remove
    private = WeightStore.from_arrays(3, state_dict_arrays(src))
    assert weight_file(named_tensors(private)) is None
    assert weight_file(iter(src.items())) is None


def test_another_file_at_the_path_is_refused():
    wf = write_weight_file(list(tensors().items()))
    try:
        assert _open_same(type(wf)(wf.path, "0:1", wf.entries)) is None  # the engine's own check
        with pytest.raises(FileChanged):
            map_file(wf.path, "0:1")
        bad = [(n, d, s, o + 10**6, b) for n, d, s, o, b in wf.entries]
        with pytest.raises(ValueError, match="do not fit"):
            file_tensors(map_file(wf.path, wf.file_id), bad)
    finally:
        wf.close()


def test_the_worker_method_loads_through_reload_weights():
    """The extension's method hands vLLM's reload_weights every tensor of the file, as views."""
    src = tensors()
    wf = write_weight_file(list(src.items()))

    class FakeWorker(WeightFileLoader):
        def reload_weights(self, weights_iterator, is_checkpoint_format):
            self.got = dict(weights_iterator)
            self.fmt = is_checkpoint_format

    w = FakeWorker()
    try:
        assert w.or1_reload_from_file(wf.path, wf.file_id, wf.entries) == len(src)
    finally:
        wf.close()
    assert w.fmt is True and all(torch.equal(w.got[k], v) for k, v in src.items())
