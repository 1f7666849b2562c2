"""HFEngine: processed log-probs computed by hand (temperature, top-p nucleus renormalisation), strict
all-or-none weight loads, tied heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.hf_engine import HFEngine
from actors.weights_io import named_tensors, state_dict_arrays
from bus.messages import SamplingSpec
from bus.weights.store import WeightStore

GREEDY = SamplingSpec(n=1, temperature=0.0, max_tokens=8)


def token_lists(groups) -> list[list[int]]:
    return [s.token_ids.tolist() for g in groups for s in g]


@pytest.fixture(scope="module")
def engine(tiny_model, actor_cfg):
    torch.set_num_threads(1)
    return HFEngine(str(tiny_model), actor_cfg)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.3), (0.6, 0.05)])
def test_logprobs_are_the_processed_distribution(engine, prompts, temperature, top_p, reference_logprobs):
    spec = SamplingSpec(n=3, temperature=temperature, top_p=top_p, max_tokens=10, seed=9)
    groups = engine.generate(prompts, spec)
    for p, g in zip(prompts, groups):
        for s in g:
            ref_at = reference_logprobs(engine.model, p, s.token_ids, temperature, top_p)
            assert np.all(np.isfinite(ref_at))  # every sampled token lies inside the nucleus
            np.testing.assert_allclose(s.logprobs, ref_at, atol=1e-4)


def test_greedy_is_argmax(engine, prompts, reference_logprobs):
    for p, g in zip(prompts, engine.generate(prompts, GREEDY)):
        logits = reference_logprobs(engine.model, p, g[0].token_ids, 1.0, 1.0, full=True)
        assert g[0].token_ids.tolist() == logits.argmax(-1).tolist()


def test_seed_leaves_global_rng_alone(engine, prompts):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate(prompts[:1], SamplingSpec(n=2, temperature=1.0, max_tokens=4, seed=1))
    assert torch.equal(torch.rand(3), expected)


def test_load_weights_strict_all_or_none(engine, prompts, tiny_model, sharp_model):
    before = engine.generate(prompts, GREEDY)
    model = sharp_model(tiny_model, seed=4)
    arrays = state_dict_arrays(model, "float32")
    bad = [(n, a[:2] if n.endswith("down_proj.weight") else a) for n, a in arrays]
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights(named_tensors(WeightStore.from_arrays(1, bad)), 1)
    with pytest.raises(ValueError, match="missing"):
        engine.load_weights(named_tensors(WeightStore.from_arrays(1, arrays[3:])), 1)
    with pytest.raises(ValueError, match="unknown"):
        extra = arrays + [("extra.weight", arrays[0][1])]
        engine.load_weights(named_tensors(WeightStore.from_arrays(1, extra)), 1)
    assert engine.version == -1
    after_bad = engine.generate(prompts, GREEDY)
    assert token_lists(after_bad) == token_lists(before)

    no_head = [(n, a) for n, a in arrays if n != "lm_head.weight"]
    m = engine.load_weights(named_tensors(WeightStore.from_arrays(7, no_head)), 7)
    assert engine.version == 7 and m["weights/load_s"] >= 0
    sd = engine.model.state_dict()
    torch.testing.assert_close(sd["lm_head.weight"], model.lm_head.weight, rtol=0, atol=0)
    up = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(sd[up], model.model.layers[1].mlp.up_proj.weight, rtol=0, atol=0)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight  # still tied


def test_folder_generation_config_does_not_shape_sampling(tiny_model, actor_cfg, prompts, reference_logprobs,
                                                          tmp_path):
    """A folder asking for top_k=5 and repetition_penalty=1.5 (Qwen ships top_k=20, 1.05) must not
    change the lease's distribution: log-probs stay the plain tempered ones, greedy stays argmax."""
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(top_k=5, repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=3)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    eng = HFEngine(str(folder), actor_cfg)
    for p, g in zip(prompts, eng.generate(prompts, SamplingSpec(n=2, temperature=0.8, max_tokens=8, seed=2))):
        for s in g:
            ref = reference_logprobs(eng.model, p, s.token_ids, 0.8, 1.0)
            np.testing.assert_allclose(s.logprobs, ref, atol=1e-4)
    for p, g in zip(prompts, eng.generate(prompts, GREEDY)):
        table = reference_logprobs(eng.model, p, g[0].token_ids, 1.0, 1.0, full=True)
        assert g[0].token_ids.tolist() == table.argmax(-1).tolist()


@pytest.mark.parametrize("decoder", ["auto", "transformers"])
def test_abort_ends_a_generation_at_the_next_token(eos_model, actor_cfg, prompts, monkeypatch, decoder):
    """abort() from inside the 3rd decoding step (as the actor calls it from another thread): that
    generate stops after its 3rd token and raises, and the engine generates no more; with either
    decoding forward (actor.hf_decoder)."""
    import actors.hf_engine as hf
    from actors.engine import GenerationAborted

    # its own: an aborted engine stays aborted
    eng = HFEngine(str(eos_model), actor_cfg.model_copy(update={"hf_decoder": decoder}))
    assert (eng.lean is None) == (decoder == "transformers")
    steps = []
    pick = hf.pick

    def counted_pick(*args):
        steps.append(1)
        if len(steps) == 3:
            eng.abort()
        return pick(*args)

    monkeypatch.setattr(hf, "pick", counted_pick)
    spec = SamplingSpec(n=2, temperature=0.0, max_tokens=6)  # prompts[1] runs to the length limit here
    with pytest.raises(GenerationAborted):
        eng.generate(prompts[1:2], spec)
    assert len(steps) == 3
    with pytest.raises(GenerationAborted):
        eng.generate(prompts[1:2], spec)
    assert len(steps) == 3


def test_prompts_are_left_padded_and_grouped_by_budget() -> None:
    from actors.hf_engine import by_budget, left_padded

    ids, mask = left_padded([[5, 6], [7, 8, 9]], n=2, pad_id=0)
    assert ids.tolist() == [[0, 5, 6], [0, 5, 6], [7, 8, 9], [7, 8, 9]]
    assert mask.tolist() == [[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]]
    # a prompt near the context limit gets its own, shorter batch; the others keep max_tokens
    assert by_budget([[1] * 3, [1] * 60, [1] * 5], max_tokens=8, max_model_len=64) == {8: [0, 2], 4: [1]}


def test_one_generate_call_per_budget(engine, prompts, monkeypatch) -> None:
    import actors.hf_engine as hf

    calls = []
    real = hf.decode
    monkeypatch.setattr(hf, "decode", lambda m, x, mask, **kw: calls.append(x.shape) or real(m, x, mask, **kw))
    groups = engine.generate(prompts, SamplingSpec(n=2, temperature=1.0, max_tokens=4, seed=3))
    assert [len(g) for g in groups] == [2] * len(prompts)
    assert calls == [(2 * len(prompts), max(len(p) for p in prompts))]


def test_pick_draws_the_processed_distribution() -> None:
    """Inverse-CDF draws match softmax(logits / T) with top-p applied (HF's rule) within sampling
    error, never a token outside top-p, and report that distribution's log-probs."""
    import torch

    from actors.hf_engine import outside_top_p, pick

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(40000, 1)
    gen = torch.Generator().manual_seed(0)
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.8)):
        z = logits[:1] / temperature
        z = z.masked_fill(outside_top_p(z, top_p), float("-inf"))
        want = torch.softmax(z, -1)[0]
        tok, lp = pick(logits, temperature, top_p, gen)
        freq = torch.bincount(tok, minlength=6).double() / len(tok)
        assert torch.all((freq - want).abs() <= 0.01), (temperature, top_p, freq, want)
        assert torch.all(freq[want == 0] == 0)
        assert torch.allclose(lp, torch.log(want)[tok], atol=1e-5)
    # probabilities .56 .21 .13 .08 .03 .004: the likeliest three hold .89 >= .8, the likeliest two .77
    assert outside_top_p(logits[:1], 0.8).tolist() == [[False, False, False, True, True, True]]
    tok, lp = pick(logits[:2], 0.0, 1.0, gen)  # greedy: argmax, raw log-prob
    assert tok.tolist() == [0, 0] and torch.allclose(lp, torch.log_softmax(logits[:2], -1)[:, 0])


def test_prompts_run_once_for_their_copies(engine, prompts) -> None:
    """`decode(copies=n)` prefills each prompt once and repeats its cache: the same draws, the same
    log-probs (to float rounding) as running every copy's prompt."""
    import threading

    from actors.hf_engine import decode, left_padded

    x, mask = left_padded([list(p) for p in prompts], n=4, pad_id=0)
    runs = []
    for copies in (1, 4):
        gen = torch.Generator().manual_seed(5)
        with torch.inference_mode():
            runs.append(decode(engine.model, x, mask, budget=6, temperature=1.0, top_p=1.0, end_ids=[2],
                               pad_id=0, generator=gen, aborted=threading.Event(), copies=copies))
    (t1, lp1), (t4, lp4) = runs
    assert t1.tolist() == t4.tolist() and len({tuple(r) for r in t1.tolist()}) > len(prompts)  # copies differ
    np.testing.assert_allclose(lp4.numpy(), lp1.numpy(), atol=1e-5)
