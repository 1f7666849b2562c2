"""Tensor-parallel actors (actor.tensor_parallel_size = 2) on real vLLM: two worker processes, each
holding half of every sharded layer (the tiny model's 4 query / 2 KV heads, 384 MLP and 2048 vocab
rows all split in two), CPU cores bound per shard by the engine.

* Greedy generation equals a TP=1 engine's on the same folder (token for token; log-probs within
  1e-4: the shards' partial sums are all-reduced in another order).
* An in-place reload reaches both shards: after loading other weights, from a store in /dev/shm
  (the workers map its file) and from one in private memory (written to a file for the load, the
  tied head omitted), greedy output equals a fresh TP=1 engine built on those weights. A shard left
  on the old weights would mix two models' halves and give other tokens.

The models are the tiny architecture re-drawn with peaked outputs (`sharp_model`), so greedy paths
have clear winners and summation order cannot flip a token. ~70 s here (one TP=2 build ~30-40 s).
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from actors.engine import vllm_available
from actors.weights_io import named_tensors, state_dict_arrays
from bus.messages import SamplingSpec
from bus.weights.store import WeightStore

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")]

GREEDY = SamplingSpec(n=1, temperature=0.0, max_tokens=12)


def cfg(tp: int):
    from common.config import ActorConfig

    return ActorConfig(kv_cache_gb=1 / 16, max_model_len=256, seed=0, tensor_parallel_size=tp)


@pytest.fixture(scope="module")
def folders(tiny_model, sharp_model, tmp_path_factory):
    """Two model folders of the tiny architecture with different (peaked) weights."""
    out = []
    for seed in (11, 12):
        d = tmp_path_factory.mktemp(f"sharp{seed}") / "m"
        shutil.copytree(tiny_model, d)
        sharp_model(tiny_model, seed=seed).save_pretrained(d)
        out.append(d)
    return out


@pytest.fixture(scope="module")
def tp2(folders):
    from actors.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    eng = VLLMEngine(str(folders[0]), cfg(2))
    print(f"TP=2 engine built in {time.perf_counter() - t0:.1f} s")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(folders, prompts):
    """Greedy samples of a fresh TP=1 engine on each folder."""
    from actors.vllm_engine import VLLMEngine

    out = []
    for d in folders:
        eng = VLLMEngine(str(d), cfg(1))
        try:
            out.append(eng.generate(prompts, GREEDY))
        finally:
            eng.close()
    return out


def ids(groups) -> list[list[int]]:
    return [s.token_ids.tolist() for g in groups for s in g]


def same(got, want) -> None:
    assert ids(got) == ids(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g[0].logprobs, w[0].logprobs, atol=1e-4)


def store_of(folder, version: int, shared: bool, drop: tuple[str, ...] = ()) -> WeightStore:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    arrays = [(n, a) for n, a in state_dict_arrays(model) if n not in drop]
    return WeightStore.from_arrays(version, arrays, shared=shared)


def test_tp2_greedy_matches_tp1(tp2, reference, prompts):
    assert tp2.tensor_parallel_size == 2 and tp2.max_model_len == 256
    assert ids(reference[0]) != ids(reference[1])  # the two folders really differ
    same(tp2.generate(prompts, GREEDY), reference[0])


def test_reload_reaches_every_shard(tp2, reference, folders, prompts):
    shared = store_of(folders[1], 1, shared=True)
    assert shared.shared is not None, "the test needs room in /dev/shm"
    m = tp2.load_weights(named_tensors(shared), 1)
    print(f"TP=2 reload from /dev/shm: {m['weights/load_s']:.2f} s")
    assert tp2.version == 1
    same(tp2.generate(prompts, GREEDY), reference[1])

    private = store_of(folders[0], 2, shared=False, drop=("lm_head.weight",))  # tied: the head may be omitted
    m = tp2.load_weights(named_tensors(private), 2)
    print(f"TP=2 reload from private memory (file written): {m['weights/load_s']:.2f} s")
    same(tp2.generate(prompts, GREEDY), reference[0])


def test_bad_weights_refused_whole(tp2, folders, prompts):
    before = ids(tp2.generate(prompts, GREEDY))
    named = [(n, t[:1] if n.endswith("mlp.up_proj.weight") else t)
             for n, t in named_tensors(store_of(folders[1], 3, shared=False))]
    with pytest.raises(ValueError, match="weights refused"):
        tp2.load_weights(named, 3)
    assert tp2.version == 2 and ids(tp2.generate(prompts, GREEDY)) == before


def test_close_removes_the_all_reduce_segments(tp2):
    """vLLM 0.32's CPU all-reduce may leave its /dev/shm segments behind (when the shutdown has to
    kill its workers); the engine's close removes them."""
    from pathlib import Path

    segments = [p for i in tp2._dist_idents for p in Path("/dev/shm").glob(f"{i}-*-cpushm_*")]
    if not segments:
        pytest.skip("no CPU all-reduce segments (a GPU build)")
    tp2.close()
    assert not [p for p in segments if p.exists()]
