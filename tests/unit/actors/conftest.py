"""Shared fixtures for the engine tests: the embedded tiny model (built once per session) and a
variant whose greedy continuation of EOS_PROMPT is the end token, so the "stop" path is exercised
deterministically: the embedding rows of <|im_end|> and of the token the model would pick there are
swapped (the embeddings are tied, so this swaps both the input and the output side of the two
tokens; the prompt uses neither, so its hidden states — and hence the winning logit — are unchanged).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines drown pytest's output

EOS_PROMPT = np.array([1, 100, 200, 300], dtype=np.int32)
PROMPTS = [EOS_PROMPT, np.array([1, 5, 6], dtype=np.int32),
           np.array([1, 400, 17, 900, 33, 250, 7], dtype=np.int32)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from common.tinymodel import build_tiny_model

    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture(scope="session")
def eos_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("eos") / "m"
    shutil.copytree(tiny_model, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    eos = 2  # <|im_end|>, the folder's eos
    with torch.no_grad():
        logits = model(torch.tensor([EOS_PROMPT.tolist()])).logits[0, -1]
        top = int(logits.argmax())
        assert top != eos and top not in EOS_PROMPT
        emb = model.get_input_embeddings().weight
        emb[[eos, top]] = emb[[top, eos]].clone()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def actor_cfg():
    from common.config import ActorConfig

    return ActorConfig(kv_cache_gb=1 / 16, max_model_len=256, seed=0)


@pytest.fixture(scope="session")
def prompts() -> list[np.ndarray]:
    return [p.copy() for p in PROMPTS]


@pytest.fixture(scope="session")
def sharp_model():
    return make_sharp_model


def make_sharp_model(model_dir: Path, seed: int, embed_std: float = 0.4):
    """The folder's architecture re-initialised with another seed, its tied embedding drawn with
    std `embed_std` (logit std ≈ embed_std·√hidden ≈ 4.5 on the tiny model), so the output
    distribution is peaked and greedy paths have clear winners (no near-ties between engines whose
    float32 sums differ in the last bits), whatever init the tiny model builder uses."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embed_std)
    return model


@pytest.fixture(scope="session")
def reference_logprobs():
    return processed_logprobs


def processed_logprobs(model, prompt: np.ndarray, response: np.ndarray, temperature: float, top_p: float,
                       full: bool = False) -> np.ndarray:
    """By hand, from one plain forward pass over prompt + response: the log-prob of each response
    token under the tempered, top-p renormalised distribution (sort ascending, drop the tokens whose
    cumulative mass is ≤ 1 − top_p, always keeping the top one, renormalise). `full` returns the
    whole [L, V] table instead of the sampled tokens' entries."""
    import torch

    seq = torch.tensor(np.concatenate([prompt, response]).astype(np.int64))[None]
    with torch.no_grad():
        logits = model(seq).logits[0, len(prompt) - 1 : -1].float()
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1)
    drop_sorted = sorted_p.cumsum(-1) <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    kept = probs.masked_fill(drop, 0.0)
    table = torch.log(kept / kept.sum(-1, keepdim=True))
    if full:
        return table.numpy()
    return table.gather(-1, torch.from_numpy(response.astype(np.int64))[:, None])[:, 0].numpy()
