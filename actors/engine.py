"""The generation engine contract (docs/extending.md#an-engine) and the pieces both engines share.

An `Engine` turns prompts (token ids) into groups: for each prompt, `sampling.n` samples, each with
its sampled token ids (int32), the log-probability of every sampled token under the distribution it
was sampled from — after temperature and top-p, i.e. log_softmax(logits / T) renormalised over the
top-p nucleus (vLLM's "processed_logprobs") — why it ended, and its decoded text (special tokens
skipped). `load_weights` swaps the weights in place from (name, tensor) pairs in HF checkpoint names.

Shared rules, so the two engines agree sample for sample where they can:
- Seeds: prompt i of a call is sampled with seed `sampling.seed + i * n` (vLLM then seeds its j-th
  sample with that + j; HF draws the prompt's n samples from that one stream), so identical prompts
  in one call still get different samples and a call is reproducible per engine (the two engines'
  RNGs differ). `seed=None` uses the engine's own RNG.
- Length: a response gets at most `min(max_tokens, max_model_len - prompt length)` tokens; a prompt
  that leaves no room is bad input. `max_model_len` is the config's, else the one the learner
  announces for the run (`make_engine(..., max_model_len=)`), else the model's own limit.
- Finish reason: "stop" when the last token is an end token (the stop check precedes the length
  check, as in vLLM), "length" otherwise. The end token stays in `token_ids` (it is trained on).
- Text: `tokenizer.decode(ids, skip_special_tokens=True)`, one batched call per generate; a pure
  function of the ids in both engines.
- temperature 0 means greedy (tests; n greedy samples are identical); RL samples at temperature > 0.
Bad input raises ValueError with a one-line reason before the engine is touched.

Threads: the actor makes every call of one engine from one thread of its own
(`actors.engine_thread.EngineThread`), except `abort`, which comes from the actor's main thread while
a generation runs, so that a stop never waits for a generation of minutes to end.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from bus.messages import FINISH_LENGTH, FINISH_STOP, SamplingSpec

if TYPE_CHECKING:
    import torch

    from common.config import ActorConfig

MAX_SAMPLES = 1024  # most samples per prompt one call may ask for (a lease larger than this is malformed)


@dataclass
class GenSample:
    """One sampled response (see the module doc for what `logprobs` holds)."""

    token_ids: np.ndarray  # int32 [L]
    logprobs: np.ndarray  # float32 [L], ≤ 0
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH
    text: str
    versions: list[tuple[int, int]] = field(default_factory=list)  # (version, first token): in-flight switches


class Engine(Protocol):
    version: int
    """Weights version held (-1 = the model folder's own weights)."""

    def generate(self, prompts: list[np.ndarray], sampling: SamplingSpec) -> list[list[GenSample]]:
        """One list of `sampling.n` samples per prompt, in prompt order."""
        ...

    updates_in_flight: bool
    """True when `load_weights` may be called from any thread while `generate` runs (the AsyncLLM
    engine): the generation pauses, the new weights take over, and each sample's `versions` says
    from which token on. False: loads only between generations, on the engine thread."""

    streams_loads: bool
    """True when `load_weights` also takes a version still arriving (`weights_io.StreamedTensors`,
    read lazily as its chunks land: vLLM in-process). Optional: an engine without it gets whole stores."""

    def load_weights(self, named: Iterable[tuple[str, "torch.Tensor"]], version: int) -> dict[str, float]:
        """Replace every weight in place (all or none); returns {"weights/load_s": seconds}. A
        streamed version that stops arriving raises `weights_io.StreamBroken` with `version` -1."""
        ...

    def abort(self) -> None:
        """Stop generating, from any thread: a `generate` in progress ends as soon as the engine can
        safely stop it and raises GenerationAborted, as does every later call. The actor calls it
        only when it leaves in the middle of a generation."""
        ...

    def close(self) -> None: ...


class GenerationAborted(RuntimeError):
    """`generate` was stopped by `Engine.abort` (its partial output is thrown away)."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(kind: Literal["auto", "vllm", "vllm-async", "hf"], model: str, cfg: "ActorConfig",
                max_model_len: int | None = None) -> Engine:
    """`auto` = vLLM where importable, else the transformers fallback; vLLM's AsyncLLM engine for
    `vllm-async` or in-flight updates. `max_model_len`: the context when `cfg.max_model_len` is
    unset (the run's, from the learner; None = the model's own limit)."""
    if cfg.max_model_len is None and max_model_len:
        cfg = cfg.model_copy(update={"max_model_len": max_model_len})
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind == "vllm-async" or (kind == "vllm" and cfg.update_mode == "in_flight"):
        from actors.vllm_async import AsyncVLLMEngine

        return AsyncVLLMEngine(model, cfg)
    if kind == "vllm":
        from actors.vllm_engine import VLLMEngine

        return VLLMEngine(model, cfg)
    if kind == "hf":
        from actors.hf_engine import HFEngine

        return HFEngine(model, cfg)
    raise ValueError(f"engine must be auto, vllm, vllm-async or hf, got {kind!r}")


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def model_context_len(config: Any) -> int | None:
    """The longest sequence a model allows, from its HF config (or a model folder's): the first of
    CONTEXT_KEYS it sets; None when it names none."""
    if isinstance(config, (str, os.PathLike)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config)
    config = getattr(config, "text_config", None) or config
    for key in CONTEXT_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def context_error(own: int | None, announced: int, tensor_parallel_size: int = 1, kind: str = "auto",
                  update_mode: str = "between_leases") -> str:
    """Why an actor should not start ("" = fine): its set actor.max_model_len is below the context the
    learner announced for the run (the run's prompts + its longest stage's responses), so some
    prompts would not fit and responses would be cut short of the stage's budget; or tensor
    parallelism or in-flight updates asked of the transformers engine."""
    hf = kind == "hf" or (kind == "auto" and not vllm_available())
    if tensor_parallel_size > 1 and hf:
        return (f"actor.tensor_parallel_size = {tensor_parallel_size} needs the vLLM engine; "
                "set actor.engine = vllm or actor.tensor_parallel_size = 1")
    if update_mode == "in_flight" and hf:
        return ("actor.update_mode = in_flight needs the vLLM engine (AsyncLLM); "
                "set actor.engine = vllm (install vllm) or actor.update_mode = between_leases")
    if own is not None and announced and own < announced:
        return (f"actor.max_model_len = {own} is less than this run needs ({announced} tokens: its "
                "prompts plus the longest stage's max_response_tokens, as the learner announced); unset "
                f"actor.max_model_len so the actor takes the run's, or raise it to at least {announced}")
    return ""


def check_request(prompts: Sequence[np.ndarray], sampling: SamplingSpec, vocab_size: int,
                  max_model_len: int) -> list[list[int]]:
    """Validate a generate call; returns the prompts as lists of ints. ValueError on bad input."""
    s = sampling
    if not 1 <= s.n <= MAX_SAMPLES:
        raise ValueError(f"n must be in [1, {MAX_SAMPLES}], got {s.n}")
    if not (np.isfinite(s.temperature) and s.temperature >= 0):
        raise ValueError(f"temperature must be ≥ 0, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {s.top_p}")
    if s.max_tokens < 1:
        raise ValueError(f"max_tokens must be ≥ 1, got {s.max_tokens}")
    if s.seed is not None and not 0 <= s.seed < 2**62:
        raise ValueError(f"seed must be in [0, 2^62), got {s.seed}")
    out = []
    for i, p in enumerate(prompts):
        a = np.asarray(p)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"prompt {i}: expected a non-empty 1-d integer array, got {a.dtype} {a.shape}")
        if a.min() < 0 or a.max() >= vocab_size:
            raise ValueError(f"prompt {i}: token ids must be in [0, {vocab_size}), "
                             f"got [{a.min()}, {a.max()}]")
        if a.size >= max_model_len:
            raise ValueError(f"prompt {i}: {a.size} tokens leave no room under max_model_len {max_model_len}")
        out.append(a.tolist())
    return out


def response_budget(prompt_len: int, max_tokens: int, max_model_len: int) -> int:
    return min(max_tokens, max_model_len - prompt_len)


def prompt_seed(sampling: SamplingSpec, i: int) -> int | None:
    return None if sampling.seed is None else sampling.seed + i * sampling.n


def decode_texts(tokenizer: Any, samples: Sequence[np.ndarray]) -> list[str]:
    """Text of each sample: one batched `decode(ids, skip_special_tokens=True)` (the Rust tokenizer
    decodes the batch in one call). Both engines use this, so text is a pure function of the ids —
    vLLM's incremental detokenizer instead withholds a trailing incomplete UTF-8 sequence."""
    return tokenizer.batch_decode([s.tolist() for s in samples], skip_special_tokens=True)


def make_sample(ids: np.ndarray, logprobs: np.ndarray, text: str, end_ids: frozenset[int]) -> GenSample:
    """The sample, its finish reason read off its last token."""
    stop = ids.size > 0 and int(ids[-1]) in end_ids
    return GenSample(ids, logprobs, FINISH_STOP if stop else FINISH_LENGTH, text)


def end_token_ids(model_dir: str, tok: Any) -> frozenset[int]:
    """Ids that end a response: the tokenizer's eos plus generation_config's eos_token_id (one or a
    list) — what vLLM stops on (its eos plus `stop_token_ids` from the generation config)."""
    from transformers import AutoConfig, GenerationConfig

    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json: the model config's eos
        eos = getattr(AutoConfig.from_pretrained(model_dir), "eos_token_id", None)
    if eos is not None:
        ids.update([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    return frozenset(ids)
