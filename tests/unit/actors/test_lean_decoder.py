"""LeanDecoder: the same logits as transformers' forward (full recompute, no cache) for left-padded
prompts shared by several rows, at every decoding step; Qwen2 (the embedded model, biases, tied head)
and Llama (no biases, untied head, grouped-query attention); the models it must refuse; and the
engine's use of it (the default, the switch, weights loaded after it was built)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from actors.hf_engine import HFEngine, decode, left_padded
from actors.lean_decoder import LeanDecoder, supports
from actors.weights_io import named_tensors, state_dict_arrays
from bus.messages import SamplingSpec
from bus.weights.store import WeightStore

PROMPTS = [[1, 276, 201, 20, 13], [1, 5], [1, 400, 17, 900, 33, 250, 7]]


def _qwen2(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def _small(kind: str, **extra):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra)
    if kind == "llama":
        cfg = transformers.LlamaConfig(tie_word_embeddings=False, **common)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.Qwen3Config(head_dim=16, **common)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def _reference(model, rows: list[list[int]]) -> torch.Tensor:
    """Last-position logits of each row by transformers' forward on the whole left-padded row."""
    x, mask = left_padded(rows, 1, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=x, attention_mask=mask, position_ids=pos).logits[:, -1]


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_logits_match_transformers_at_every_step(tiny_model, kind):
    model = _qwen2(tiny_model) if kind == "qwen2" else _small("llama")
    assert supports(model) == ""
    copies, steps = 3, 5
    x, mask = left_padded(PROMPTS, copies, 0)
    rows = [p for p in PROMPTS for _ in range(copies)]
    lean = LeanDecoder(model)
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        logits = lean.start(x, mask, (mask.cumsum(-1) - 1).clamp(min=0), copies, steps)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1]
        for t in range(steps):
            torch.testing.assert_close(logits, _reference(model, rows), atol=2e-5, rtol=1e-5, msg=f"step {t}")
            tok = torch.as_tensor(rng.integers(3, 500, len(rows)))
            rows = [r + [int(k)] for r, k in zip(rows, tok)]
            pos = pos + 1
            logits = lean.step(tok, pos)


def test_decode_draws_the_same_samples_either_way(tiny_model):
    model = _qwen2(tiny_model)
    x, mask = left_padded(PROMPTS, 4, 0)

    def run(lean):
        g = torch.Generator()
        g.manual_seed(3)
        with torch.inference_mode():
            return decode(model, x, mask, budget=12, temperature=1.0, top_p=0.9, end_ids=[2], pad_id=0,
                          generator=g, aborted=threading.Event(), copies=4, lean=lean)

    (tokens, logprobs), (lean_tokens, lean_logprobs) = run(None), run(LeanDecoder(model))
    assert torch.equal(tokens, lean_tokens)
    torch.testing.assert_close(logprobs, lean_logprobs, atol=1e-5, rtol=0)


def test_models_it_does_not_run_are_refused():
    qwen3 = _small("qwen3")  # q/k norms inside attention
    assert "qwen3" in supports(qwen3)
    assert "mlp.down_proj.bias" in supports(_small("llama", mlp_bias=True))  # a parameter it does not apply
    scaled = _small("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert "linear" in supports(scaled)
    with pytest.raises(ValueError, match="cannot run"):
        LeanDecoder(qwen3)


def test_engine_uses_it_by_default_and_after_a_weight_load(tiny_model, actor_cfg):
    engine = HFEngine(str(tiny_model), actor_cfg)
    assert engine.lean is not None
    assert HFEngine(str(tiny_model), actor_cfg.model_copy(update={"hf_decoder": "transformers"})).lean is None
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in engine.model.state_dict().items()}
    store = WeightStore.from_arrays(1, state_dict_arrays(state))
    engine.load_weights(named_tensors(store), 1)
    spec = SamplingSpec(n=2, temperature=1.0, max_tokens=6, seed=5)
    prompts = [np.asarray(p, dtype=np.int32) for p in PROMPTS]
    with_lean = engine.generate(prompts, spec)
    engine.lean = None  # transformers' forward on the same loaded weights
    plain = engine.generate(prompts, spec)
    for a, b in zip(with_lean, plain):
        for s, r in zip(a, b):
            assert s.token_ids.tolist() == r.token_ids.tolist()
            np.testing.assert_allclose(s.logprobs, r.logprobs, atol=1e-5)
