"""weights_io: state dict → flat WeightStore → named torch tensors, in float32 and bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.weights_io import check_named, expected_shapes, folder_dtype, named_tensors, state_dict_arrays
from bus.codec import BFloat16Array
from bus.weights.store import WeightStore


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip(model, dtype):
    arrays = state_dict_arrays(model, dtype)
    store = WeightStore.from_arrays(3, arrays, chunk_bytes=1 << 15)
    assert all(t.dtype == dtype for t in store.manifest.tensors)
    got = dict(named_tensors(store))
    sd = model.state_dict()
    assert set(got) == set(sd) and "lm_head.weight" in got
    for name, t in sd.items():
        assert got[name].dtype == getattr(torch, dtype) and got[name].shape == t.shape
        assert torch.equal(got[name], t.to(getattr(torch, dtype)))


def test_views_are_zero_copy(model):
    store = WeightStore.from_arrays(1, state_dict_arrays(model, "bfloat16"))
    base = store.buffer.ctypes.data
    for meta, (name, t) in zip(store.manifest.tensors, named_tensors(store)):
        assert t.data_ptr() == base + meta.offset, name


def test_bf16_arrays_are_tagged(model):
    arrays = state_dict_arrays(model, "bfloat16")
    assert all(isinstance(a, BFloat16Array) and a.dtype == np.uint16 for _, a in arrays)


def test_tied_head_added_to_a_state_dict_that_lacks_it(model):
    class Wrapped(torch.nn.Module):  # a model whose state_dict drops the tied alias (as some wrappers do)
        def __init__(self, m):
            super().__init__()
            self.inner, self.config = m, m.config

        def state_dict(self):
            return {k: v for k, v in self.inner.state_dict().items() if k != "lm_head.weight"}

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

    names = [n for n, _ in state_dict_arrays(Wrapped(model), "float32")]
    assert "lm_head.weight" in names


def test_check_named(tiny_model, model):
    shapes, tied = expected_shapes(str(tiny_model))
    assert tied and shapes["model.embed_tokens.weight"] == (2048, 128)
    good = list(model.state_dict().items())
    assert len(check_named(iter(good), shapes, tied)) == len(good)
    with pytest.raises(ValueError, match="twice"):
        check_named(good + good[:1], shapes, tied)
    with pytest.raises(ValueError, match="non-floating"):
        check_named([(n, t.long()) if i == 0 else (n, t) for i, (n, t) in enumerate(good)], shapes, tied)


def test_bad_dtype_and_input():
    with pytest.raises(ValueError):
        state_dict_arrays({}, "int8")
    with pytest.raises(TypeError):
        state_dict_arrays(42, "float32")


def test_folder_dtype(tiny_model):
    assert folder_dtype(str(tiny_model), "auto") == "float32"
    assert folder_dtype(str(tiny_model), "bfloat16") == "bfloat16"
