"""common/tinymodel.py: the tokenizer (AutoTokenizer gives the trained ids; exact round trip), the
folder (transformers loads it; shape and size), build caching, the warm start, and vLLM (marked)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from common import tinymodel  # noqa: E402
from common.data import toy_problems  # noqa: E402
from common.tinymodel import (  # noqa: E402
    CHAT_TEMPLATE,
    IM_END,
    build_key,
    build_tiny_model,
    default_corpus,
    ensure_tiny_model,
    train_tokenizer,
)

VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
ARBITRARY = [
    "Hello, World!  Two  spaces,\ttabs\nand\r\nnewlines.",
    "Let $x^2 - 5x + 6 = 0$; then x ∈ {2, 3}. Émile paid 12,345.67 € — naïve café 東京 😀",
    "```python\ndef f(a, b):\n    return a + b  # it's they're we'll\n```",
    "   leading and trailing   ",
    "<|im_start|>user\n3+4<|im_end|>\n<|im_start|>assistant\n \\boxed{7}<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture(scope="module")
def auto_tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def trained_tok():
    return train_tokenizer(default_corpus())


def toy_strings() -> list[str]:
    out = []
    for p in toy_problems("addition")[:20] + toy_problems("code"):
        out.append(tinymodel.chat_text(p.messages) + tinymodel.answer_text(p.reference) + IM_END)
    return out


def test_pretokenizer_regex_is_qwen2s():
    from transformers.models.qwen2 import tokenization_qwen2

    assert tinymodel.QWEN2_PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX


def test_auto_tokenizer_is_qwen2_with_identical_ids(auto_tok, trained_tok):
    assert type(auto_tok).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    for text in toy_strings() + ARBITRARY:
        assert auto_tok.encode(text, add_special_tokens=False) == trained_tok.encode(text, add_special_tokens=False), text
    assert auto_tok.get_vocab() == trained_tok.get_vocab()


@pytest.mark.parametrize("text", ARBITRARY + ["3+4", " \\boxed{18}"])
def test_round_trip(auto_tok, text):
    assert auto_tok.decode(auto_tok.encode(text, add_special_tokens=False)) == text


def test_vocab_special_tokens_and_generation_config(folder, auto_tok):
    assert len(auto_tok) == 2048
    assert auto_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert auto_tok.eos_token == IM_END and auto_tok.eos_token_id == 2 and auto_tok.pad_token_id == 0
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == 2
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["eos_token_id"] == 2 and cfg["model_type"] == "qwen2"


def test_chat_template_and_answer_length(auto_tok):
    from common.data import tokenize_prompts

    assert auto_tok.chat_template == CHAT_TEMPLATE
    p = next(p for p in toy_problems("addition") if p.id == "add-3+4")
    [(_, ids)] = tokenize_prompts([p], auto_tok)
    assert auto_tok.decode(ids.tolist()) == "<|im_start|>user\n3+4<|im_end|>\n<|im_start|>assistant\n"
    assert len(ids) == 11
    answer = auto_tok.encode(" \\boxed{7}" + IM_END, add_special_tokens=False)
    assert len(answer) == 6 and answer[-1] == auto_tok.eos_token_id
    assert len(auto_tok.encode(" \\boxed{17}" + IM_END, add_special_tokens=False)) == 7


def test_model_loads_with_transformers(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    n = tinymodel.count_parameters(model)
    assert 1_000_000 <= n <= 2_000_000
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.head_dim in VLLM_CPU_HEAD_SIZES
    assert model.config.vocab_size == 2048
    out = model(input_ids=torch.tensor([[1, 276, 201]])).logits
    assert out.shape == (1, 3, 2048) and torch.isfinite(out).all()


def test_build_is_deterministic(folder, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert (again / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_build_refuses_non_empty_dir(tmp_path):
    (tmp_path / "junk").write_text("x")
    with pytest.raises(FileExistsError):
        build_tiny_model(tmp_path, seed=0)


def test_ensure_caches_and_ignores_partial_builds(tmp_path, monkeypatch):
    key = build_key(warm=False, seed=0)
    # a crash mid-build leaves nothing that a later call would reuse
    real_build = tinymodel.build_tiny_model

    def crashing_build(out_dir, **kw):
        real_build(out_dir, **kw)
        (Path(out_dir) / "model.safetensors").write_bytes(b"truncated")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(tinymodel, "build_tiny_model", crashing_build)
    with pytest.raises(RuntimeError):
        ensure_tiny_model(tmp_path, warm=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(tinymodel, "build_tiny_model", real_build)
    # a stale partial folder from a hard kill is not mistaken for the model either
    stale = tmp_path / f".tiny-{key}.partial-dead" / "m"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    first = ensure_tiny_model(tmp_path, warm=False)
    assert first.name == f"tiny-{key}" and (first / "model.safetensors").stat().st_size > 1_000_000
    t0 = time.perf_counter()
    assert ensure_tiny_model(tmp_path, warm=False) == first
    assert time.perf_counter() - t0 < 0.5
    assert build_key(warm=True, seed=0) != key and build_key(warm=False, seed=1) != key


def twice(warm, folder: Path, tmp_path: Path, schedule) -> list[dict[str, float]]:
    """`warm` run on two copies of the untrained folder (tmp_path/a, tmp_path/b), same seed."""
    import shutil

    runs = []
    for name in ("a", "b"):
        shutil.copytree(folder, tmp_path / name)
        runs.append(warm(tmp_path / name, seconds=300.0, seed=0, schedule=schedule))
    return runs


def test_warm_task_follows_the_toy_data_and_keys_differ():
    assert tinymodel.warm_task("toy:chain") == "chain"
    assert tinymodel.warm_task("toy:addition") == tinymodel.warm_task("toy:code") == "addition"
    assert tinymodel.warm_task("data/train.jsonl") == tinymodel.warm_task(None) == "addition"
    assert build_key(warm=True, seed=0, task="chain") != build_key(warm=True, seed=0)
    assert build_key(warm=False, seed=0, task="chain") == build_key(warm=False, seed=0)  # no warm start, same folder
    with pytest.raises(ValueError, match="no warm start"):
        tinymodel.warm_start("unused", task="code")


def test_short_chain_warm_start_learns_the_format_deterministically(folder, tmp_path):
    """60 steps (step-capped): the scratchpad's form is learned (most samples end in a boxed number),
    and two runs give the same weights."""
    from common.tinywarm_chain import ChainSchedule, run_chain_warm_start

    a, b = twice(run_chain_warm_start, folder, tmp_path, ChainSchedule(max_steps=60, target_p=1.0, samples=1))
    assert a["warm/steps"] == 60 and a["warm/budget_hit"] == 0
    assert a["warm/format_rate_t1"] >= 0.5
    weights = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert weights == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert {k: v for k, v in a.items() if "seconds" not in k} == {k: v for k, v in b.items() if "seconds" not in k}


def test_short_warm_start_learns_and_is_deterministic(folder, tmp_path):
    """60 clean steps and 6 noisy ones (step-capped, so the result does not depend on the machine's
    load): the format is learned, greedy is far above chance, and two runs give the same weights."""
    from common.tinywarm import WarmSchedule, run_warm_start

    a, b = twice(run_warm_start, folder, tmp_path, WarmSchedule(max_clean_steps=60, max_noisy_steps=6, samples=2))
    assert set(a) >= {"warm/accuracy_greedy", "warm/accuracy_t1", "warm/format_rate_t1", "warm/seconds", "warm/p_correct_t1"}
    assert a["warm/budget_hit"] == 0 and a["warm/clean_steps"] == 60 and a["warm/noisy_steps"] == 6
    assert a["warm/format_rate_t1"] >= 0.8
    assert a["warm/accuracy_greedy"] >= 0.5  # chance: ~0.1 for the likeliest sum (measured 0.77)
    weights = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert weights != (folder / "model.safetensors").read_bytes()
    assert weights == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert {k: v for k, v in a.items() if "seconds" not in k} == {k: v for k, v in b.items() if "seconds" not in k}


@pytest.mark.slow
def test_full_warm_start_greedy_right_and_sampling_partly_right(folder, tmp_path):
    import shutil

    shutil.copytree(folder, tmp_path / "w")
    m = tinymodel.warm_start(tmp_path / "w", seconds=tinymodel.WARM_SECONDS_CAP, seed=0)
    assert m["warm/budget_hit"] == 0
    assert m["warm/accuracy_greedy"] >= 0.9
    assert m["warm/format_rate_t1"] >= 0.9
    assert 0.2 <= m["warm/accuracy_t1"] <= 0.5
    assert m["warm/accuracy_t1"] == pytest.approx(m["warm/p_correct_t1"], abs=0.06)


vllm_marker = pytest.mark.vllm


@vllm_marker
def test_vllm_loads_generates_and_matches_transformers_logprobs(folder, auto_tok):
    """vLLM CPU runs the folder in float32; its sampled tokens' log-probs match transformers'."""
    pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from common.data import tokenize_prompts

    [(_, prompt)] = tokenize_prompts(toy_problems("addition", n=1), auto_tok)
    llm = LLM(model=str(folder), dtype="float32", max_model_len=64, seed=0, enforce_eager=True)
    sp = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=8, logprobs=0, seed=0)
    [out] = llm.generate([{"prompt_token_ids": prompt.tolist()}], sp)
    assert len(out.outputs) == 4
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    for o in out.outputs:
        ids = list(o.token_ids)
        assert 1 <= len(ids) <= 8 and len(o.logprobs) == len(ids)
        vllm_lp = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, ids)])
        seq = torch.tensor([prompt.tolist() + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq).logits[0, len(prompt) - 1 : -1].float(), -1)
        hf_lp = logp.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        assert torch.allclose(vllm_lp, hf_lp, atol=1e-3), (vllm_lp, hf_lp)


def test_main_builds_and_reports(tmp_path, capsys):
    assert tinymodel.main(str(tmp_path / "cli"), warm=False) == 0
    out = capsys.readouterr().out
    assert "1,050,752 parameters, vocab 2048" in out
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert tinymodel.main(str(tmp_path / "cli"), warm=False) == 1  # not empty: refused, no traceback
    assert "not empty" in capsys.readouterr().err


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        build_tiny_model(tmp_path / "x", task="gsm8k")
