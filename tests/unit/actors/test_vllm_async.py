"""AsyncVLLMEngine on the real vLLM AsyncLLM (CPU): weights loaded in the middle of a generation.

The acceptance case of in-flight updates: a 300-token greedy generation (end tokens ignored)
receives a new version midway. The sample must record both versions, keep every token exactly
once (its first part is what the old weights generate alone), and — with the KV cache recomputed
at the switch — its tokens and log-probs after the switch must be what a fresh engine holding the
new weights generates from the prompt plus the tokens before the switch.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from actors.engine import GenerationAborted, vllm_available
from actors.weights_io import named_tensors, state_dict_arrays
from bus.messages import SamplingSpec
from bus.weights.store import WeightStore

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")]

LONG = 300
GREEDY_LONG = SamplingSpec(n=1, temperature=0.0, max_tokens=LONG)
PROMPTS = [np.array([1, 5, 6, 7], dtype=np.int32), np.array([1, 400, 17, 900], dtype=np.int32),
           np.array([1, 33, 250, 7, 8], dtype=np.int32)]


def store_of(model, version: int) -> WeightStore:
    return WeightStore.from_arrays(version, list(state_dict_arrays(model, "float32")), chunk_bytes=1 << 16)


def async_engine(model_dir, actor_cfg, kv: str):
    from actors.vllm_async import AsyncVLLMEngine

    cfg = actor_cfg.model_copy(update={"max_model_len": 512, "update_mode": "in_flight", "in_flight_kv": kv})
    return AsyncVLLMEngine(str(model_dir), cfg, ignore_eos=True)


@pytest.fixture(scope="module")
def recompute_engine(tiny_model, actor_cfg):
    eng = async_engine(tiny_model, actor_cfg, "recompute")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def new_model(tiny_model, sharp_model):
    return sharp_model(tiny_model, seed=1)


def generate_with_switch(engine, store, version: int, after_tokens: int):
    """Generate PROMPTS greedily on a thread; once `after_tokens` tokens have streamed, load `store`
    from this thread. Returns the groups and the load's metrics."""
    out: dict = {}
    start = engine.tokens_generated
    t = threading.Thread(target=lambda: out.setdefault("groups", engine.generate(PROMPTS, GREEDY_LONG)))
    t.start()
    deadline = time.monotonic() + 120
    while engine.tokens_generated - start < after_tokens and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert t.is_alive(), "the generation ended before the switch"
    m = engine.load_weights(named_tensors(store), version)
    t.join(timeout=120)
    return out["groups"], m


def test_switch_midway_matches_fresh_engines(recompute_engine, tiny_model, new_model, actor_cfg):
    eng = recompute_engine
    assert eng.version == -1
    old = [g[0] for g in eng.generate(PROMPTS, GREEDY_LONG)]  # the old weights alone
    assert all(len(s.token_ids) == LONG and s.versions == [(-1, 0)] for s in old)

    groups, m = generate_with_switch(eng, store_of(new_model, 7), 7, after_tokens=60)
    assert eng.version == 7 and m["weights/pause_s"] < m["weights/load_s"] < 30
    switched = [g[0] for g in groups]
    assert all(len(s.token_ids) == LONG and len(s.logprobs) == LONG for s in switched)  # nothing lost or doubled
    ks = []
    for s, o in zip(switched, old):
        assert [v for v, _ in s.versions] == [-1, 7], s.versions  # both versions, in order
        k = s.versions[1][1]
        assert 0 < k < LONG
        ks.append(k)
        assert s.token_ids[:k].tolist() == o.token_ids[:k].tolist()  # before the switch: the old weights
        np.testing.assert_allclose(s.logprobs[:k], o.logprobs[:k], atol=1e-5)

    # after the switch: what a fresh engine holding the new weights continues from the same tokens
    from actors.vllm_engine import VLLMEngine

    fresh = VLLMEngine(str(tiny_model), actor_cfg.model_copy(update={"max_model_len": 512}))
    try:
        fresh.load_weights(named_tensors(store_of(new_model, 7)), 7)
        for p, s, k in zip(PROMPTS, switched, ks):
            (ref,) = fresh.generate([np.concatenate([p, s.token_ids[:k]])],
                                    SamplingSpec(n=1, temperature=0.0, max_tokens=LONG - k))
            n = len(ref[0].token_ids)  # the fresh engine stops at an end token; ours ignores them
            assert n > 0
            assert s.token_ids[k:k + n].tolist() == ref[0].token_ids.tolist()
            np.testing.assert_allclose(s.logprobs[k:k + n], ref[0].logprobs, atol=1e-4)
    finally:
        fresh.close()


def test_load_between_generations_labels_every_token(recompute_engine, tiny_model, sharp_model):
    eng = recompute_engine
    eng.load_weights(named_tensors(store_of(sharp_model(tiny_model, seed=2), 8)), 8)
    (g,) = eng.generate(PROMPTS[:1], SamplingSpec(n=3, temperature=1.0, max_tokens=20, seed=3))
    assert eng.version == 8 and all(s.versions == [(8, 0)] for s in g)


def test_bad_store_refused_before_the_pause(recompute_engine, tiny_model, sharp_model):
    eng = recompute_engine
    version = eng.version
    named = list(named_tensors(store_of(sharp_model(tiny_model, seed=3), 99)))[:-2]
    with pytest.raises(ValueError, match="weights refused"):
        eng.load_weights(named, 99)
    assert eng.version == version
    (g,) = eng.generate(PROMPTS[:1], SamplingSpec(n=1, temperature=0.0, max_tokens=8))
    assert g[0].versions == [(version, 0)]


def test_keep_kv_switch_records_both_versions(tiny_model, new_model, actor_cfg):
    """With the old KV kept there is no exact reference after the switch; the spans, the count and
    the tokens before the switch still hold."""
    eng = async_engine(tiny_model, actor_cfg, "keep")
    try:
        old = [g[0] for g in eng.generate(PROMPTS, GREEDY_LONG)]
        groups, _ = generate_with_switch(eng, store_of(new_model, 3), 3, after_tokens=60)
        for (s,), o in zip(groups, old):
            assert len(s.token_ids) == LONG and [v for v, _ in s.versions] == [-1, 3]
            k = s.versions[1][1]
            assert s.token_ids[:k].tolist() == o.token_ids[:k].tolist()
        # aborting a generation under way ends it at once, and the engine refuses more
        t0 = time.monotonic()
        result: dict = {}

        def run() -> None:
            try:
                eng.generate(PROMPTS, SamplingSpec(n=1, temperature=0.0, max_tokens=LONG))
            except GenerationAborted as e:
                result["aborted"] = e

        start = eng.tokens_generated
        t = threading.Thread(target=run)
        t.start()
        while eng.tokens_generated - start < 10 and time.monotonic() - t0 < 60:
            time.sleep(0.002)
        eng.abort()
        t.join(timeout=30)
        assert "aborted" in result and not t.is_alive()
        with pytest.raises(GenerationAborted):
            eng.generate(PROMPTS[:1], GREEDY_LONG)
    finally:
        eng.close()


def test_seeded_prompts_beyond_one_step_budget(recompute_engine):
    """128 seeded requests of 41 prompt tokens (5,248 > a step's 4,096): with chunked prefill a
    prompt split over two steps killed vLLM 0.32's CPU engine ("CPU Generator does not use
    offset"); engine_args turns chunking off on CPU."""
    prompts = [np.array([1, *range(5 + i, 45 + i)], dtype=np.int32) for i in range(16)]
    groups = recompute_engine.generate(prompts, SamplingSpec(n=8, temperature=1.0, max_tokens=4, seed=5))
    assert len(groups) == 16 and all(len(g) == 8 and all(len(s.token_ids) >= 1 for s in g) for g in groups)
