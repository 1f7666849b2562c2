"""The embedded tiny model: a 1.05M-parameter Qwen2 causal LM with its own byte-level BPE, built
locally in seconds so `or1 run` needs no download (docs/training.md#the-embedded-default).

Build (`build_tiny_model`):
1. Tokenizer: byte-level BPE (`tokenizers`), vocab 2048, trained on the toy tasks' chat text plus a
   small shipped ASCII corpus (`toydata/tokenizer_corpus.jsonl`). Normalizer NFC and the pre-tokenizer
   of `transformers`' `Qwen2Tokenizer` (Qwen's split regex, then ByteLevel without its own regex):
   `AutoTokenizer` rebuilds `Qwen2Tokenizer` from `model_type=qwen2` using only vocab + merges, so a
   BPE trained with any other pre-tokenizer would get different ids there. Special tokens first:
   `<|endoftext|>`=0 (pad), `<|im_start|>`=1, `<|im_end|>`=2 (eos). Chat template: minimal ChatML
   without a default system prompt, `<|im_start|>{role}\\n{content}<|im_end|>\\n`, so a toy prompt is 11
   tokens and the answer ` \\boxed{7}<|im_end|>` is 6 (7 for a two-digit sum): Qwen's regex splits it
   into ` \\`, `boxed`, `{`, one token per digit, `}`.
2. Model: Qwen2, hidden 128, 4 layers, 4 query heads and 2 KV heads of head_dim 32 (a size vLLM's CPU
   attention backend supports: 32/64/80/…), MLP 384, tied embeddings, rope θ 10000, 4096 positions
   (RoPE has no parameters, so a long limit costs nothing and fits the actors' default max_model_len),
   float32 (the learner trains fp32 on CPU and vLLM CPU runs fp32, so actor and learner log-probs match).
   Weights from `torch.manual_seed(seed)` and the model's own normal init, but with std 0.2 instead of
   0.02: measured, the warm start's clean phase then converges in 100–260 steps instead of 500+ (the
   small init sits on a long plateau before the model finds the two operands).

Warm start, one per task (`WARM_TASKS`): `common/tinywarm.py` (toy:addition, the default) and
`common/tinywarm_chain.py` (toy:chain, worked running sums). A run on `toy:NAME` data gets the model
warm-started on NAME where there is such a warm start (`tiny_model_for`). `ensure_tiny_model` caches the finished folder under
`cache_dir/tiny-<hash of the build settings and BUILD_VERSION>`, built in a temp dir and renamed at the
end, so a crash mid-build is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BUILD_VERSION = 1
"""Bump when the build or warm start changes, so cached folders from older code are not reused."""

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
"""transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX, copied so the tokenizer can be trained without it."""
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL_SHAPE: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    initializer_range=0.2,
)
VOCAB_SIZE = 2048
WARM_SECONDS_CAP = 120.0
"""Wall-clock cap of the warm start inside `ensure_tiny_model`/`main`. The warm start needs ~10–15 s of
one idle core; the cap only stops a pathological run, so a cached model does not depend on how busy the
machine was while it was built."""
CHAIN_WARM_SECONDS_CAP = 600.0
"""The same for toy:chain, whose warm start needs ~60–80 s of one idle core (290 steps)."""
STALE_PARTIAL_S = 3600.0
"""A partial build folder older than this is from a dead process (a build takes ~20 s) and is removed."""
CORPUS_FILE = Path(__file__).parent / "toydata" / "tokenizer_corpus.jsonl"


def chat_text(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """CHAT_TEMPLATE rendered in Python (the tokenizer corpus needs it before a tokenizer exists)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def answer_text(reference: str) -> str:
    """The toy tasks' target completion (before eos)."""
    return f" \\boxed{{{reference}}}"


def default_corpus() -> list[str]:
    """Training text of the tokenizer: the toy conversations (special tokens left out: they are
    added tokens, matched before BPE) and the shipped general ASCII corpus."""
    from common.data import toy_problems

    texts = [json.loads(line)["text"] for line in CORPUS_FILE.read_text().splitlines() if line.strip()]
    for name in ("addition", "code"):
        for p in toy_problems(name):
            convo = chat_text(p.messages) + (answer_text(p.reference) if p.kind == "math" else "")
            texts.append(convo.replace(IM_START, "").replace(IM_END, ""))
    return texts


def train_tokenizer(corpus: Iterable[str], vocab_size: int = VOCAB_SIZE) -> "PreTrainedTokenizerFast":
    """Byte-level BPE with Qwen2's normalizer/pre-tokenizer/decoder, wrapped for transformers with
    the special tokens, eos `<|im_end|>`, pad `<|endoftext|>` and CHAT_TEMPLATE. Deterministic for a
    given corpus. The vocab can fall short of `vocab_size` when the corpus runs out of pairs."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _save_tokenizer(tokenizer: "PreTrainedTokenizerFast", out: Path) -> None:
    """Save, then name the class `Qwen2Tokenizer` so AutoTokenizer (and vLLM) load it as Qwen's; the
    ids are the same because the pre-tokenizer is the same (checked in the tests)."""
    tokenizer.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["chat_template"] = CHAT_TEMPLATE  # also inline, for transformers versions without chat_template.jinja
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, task: str = "toy:addition") -> Path:
    """Write an untrained tiny Qwen2 + tokenizer into `out_dir` (created; must be empty or absent).
    The tokenizer is trained on a fixed corpus (addition, code and the ASCII text: byte-level, so it
    encodes any text), so `task` is only checked and recorded (or1_tiny.json)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from common.data import TOY_SETS

    if not task.startswith("toy:") or task[4:] not in TOY_SETS:
        known = ", ".join("toy:" + n for n in TOY_SETS)
        raise ValueError(f"tiny model: task must be one of {known}, got {task!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"tiny model: {out} is not empty")
    tokenizer = train_tokenizer(default_corpus())
    _save_tokenizer(tokenizer, out)
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    vocab = max(VOCAB_SIZE, -(-len(tokenizer) // 64) * 64)
    ids = dict(bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id)
    config = Qwen2Config(vocab_size=vocab, **ids, **MODEL_SHAPE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    # plain sampling by default (transformers' default is top_k=50): a policy samples its whole distribution
    gen = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=None,
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
    )
    gen.save_pretrained(str(out))
    info = {"build_version": BUILD_VERSION, "seed": seed, "task": task}
    info |= {"params": count_parameters(model), "vocab": len(tokenizer)}
    (out / "or1_tiny.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def count_parameters(model: Any) -> int:
    """Unique parameters (a tied lm_head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


WARM_TASKS = ("addition", "chain")
"""The toy sets with a warm start: the task a tiny model is warm-started on."""


def warm_task(source: str | None) -> str:
    """The warm start for a run whose data source is `source`: NAME for `toy:NAME` when NAME has one
    (`WARM_TASKS`), else addition (the embedded default's)."""
    name = source[4:] if source and source.startswith("toy:") else ""
    return name if name in WARM_TASKS else "addition"


def warm_start(model_dir: str | Path, *, seconds: float | None = None, seed: int = 0,
               task: str = "addition") -> dict[str, float]:
    """Supervised warm start of the folder's model on toy:`task`, saved back into the folder; the
    algorithms are in `common/tinywarm.py` (addition) and `common/tinywarm_chain.py` (chain)."""
    if task == "chain":
        from common.tinywarm_chain import run_chain_warm_start

        return run_chain_warm_start(Path(model_dir), seconds=seconds or CHAIN_WARM_SECONDS_CAP, seed=seed)
    if task != "addition":
        raise ValueError(f"no warm start for task {task!r}; known: {', '.join(WARM_TASKS)}")
    from common.tinywarm import run_warm_start

    return run_warm_start(Path(model_dir), seconds=seconds or WARM_SECONDS_CAP, seed=seed)


def build_key(*, warm: bool, seed: int, task: str = "addition") -> str:
    """Hash of everything the built folder depends on (the warm start's task and schedule included;
    an addition build's key has no task field, so folders built before tasks existed are reused)."""
    from common.tinywarm import WarmSchedule
    from common.tinywarm_chain import ChainSchedule

    schedule = (ChainSchedule() if task == "chain" else WarmSchedule()) if warm else ""
    settings = {"v": BUILD_VERSION, "warm": warm, "seed": seed, "shape": MODEL_SHAPE, "vocab": VOCAB_SIZE}
    settings |= {"template": CHAT_TEMPLATE, "schedule": repr(schedule) if warm else ""}
    if warm and task != "addition":  # the task and its problems, in the order the warm start sees them
        from common.data import toy_problems

        settings["task"] = task
        settings["problems"] = hashlib.sha256("\n".join(p.id for p in toy_problems(task)).encode()).hexdigest()
    settings["corpus"] = hashlib.sha256(CORPUS_FILE.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def tiny_model_for(cfg: Any) -> Path:
    """The embedded model a config's `learner.model = "tiny"` stands for: built (and warm-started on
    the task of its data, `warm_task`) once into `run.cache_dir`."""
    task = warm_task(cfg.learner.data.source)
    return ensure_tiny_model(Path(cfg.run.cache_dir).expanduser(), warm=cfg.run.warm_start, task=task)


def ensure_tiny_model(cache_dir: str | Path, *, warm: bool = True, seed: int = 0, task: str = "addition") -> Path:
    """Return `cache_dir/tiny-<key>`, building (and warm-starting) it first if absent. The build goes
    to a temp dir beside it and is renamed into place only when complete, so a crashed build is never
    reused (its temp dir is removed, or after a hard kill swept by a later call once an hour old); two
    processes racing both build and one rename wins."""
    cache = Path(cache_dir).expanduser()
    final = cache / f"tiny-{build_key(warm=warm, seed=seed, task=task)}"
    if (final / "or1_tiny.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(".tiny-*.partial-*"):
        if time.time() - stale.stat().st_mtime > STALE_PARTIAL_S:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=cache))
    try:
        build_tiny_model(tmp / "m", seed=seed, task=f"toy:{task}")
        if warm:
            metrics = warm_start(tmp / "m", seed=seed, task=task)
            info = json.loads((tmp / "m" / "or1_tiny.json").read_text())
            (tmp / "m" / "or1_tiny.json").write_text(json.dumps({**info, "warm": metrics}, indent=2) + "\n")
        try:
            os.rename(tmp / "m", final)
        except OSError:
            if not (final / "or1_tiny.json").is_file():  # else: lost a race to a complete build, fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(out_dir: str, warm: bool = True, seed: int = 0, task: str = "addition") -> int:
    """`or1 tiny-model DIR [--task chain]`: build (and warm-start) into DIR and print a short summary."""
    t0 = time.perf_counter()
    try:
        if task not in WARM_TASKS:
            raise ValueError(f"--task must be one of {', '.join(WARM_TASKS)}, got {task!r}")
        out = build_tiny_model(out_dir, seed=seed, task=f"toy:{task}")
    except (OSError, ValueError) as e:
        print(f"or1 tiny-model: {e}", file=sys.stderr)
        return 1
    info = json.loads((out / "or1_tiny.json").read_text())
    took = time.perf_counter() - t0
    print(f"built {out}: {info['params']:,} parameters, vocab {info['vocab']} ({took:.1f}s)")
    if warm:
        metrics = warm_start(out, seed=seed, task=task)
        (out / "or1_tiny.json").write_text(json.dumps({**info, "warm": metrics}, indent=2) + "\n")
        print("warm start: " + " ".join(f"{k}={v:.3g}" for k, v in metrics.items()))
    return 0
