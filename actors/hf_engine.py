"""`HFEngine`: the Engine contract on transformers `generate`, for machines without vLLM.

Generation, one batch per call (per response budget, `by_budget`): every prompt repeated `n`
times, left-padded to the longest with an attention mask (`left_padded`; generate() derives the
positions from the mask), `generate(do_sample=T > 0, temperature=T, top_p, max_new_tokens,
eos_token_id=<end ids>, output_scores=True)` with a GenerationConfig built here, every other
distribution-shaping field set to its neutral value (top_k=0, repetition_penalty=1, …): generate()
would otherwise fill them from the folder's generation_config (Qwen ships top_k=20,
repetition_penalty=1.05), while vLLM given explicit SamplingParams takes only the end tokens from
it. `scores` are the logits after the logits processors (temperature, then top-p masking to -inf),
the distribution actually sampled from; log_softmax of them at the sampled token is the processed
log-prob, the same quantity as vLLM's "processed_logprobs". Greedy (T = 0) scores are the raw
logits. A sample ends at its first end token (kept); later positions are generate's padding. Text:
`actors.engine.decode_texts`. Device: CUDA when available, else CPU. Context: `cfg.max_model_len`,
or the model's own limit (`max_position_embeddings`) when None. One shard only (no tensor parallelism).
Seeds: the RNG is seeded with the batch's first prompt's seed inside `torch.random.fork_rng`, so
the caller's global RNG is untouched; the batch's samples then draw from that one stream (not
vLLM's per-sample streams: the two engines are each reproducible, not identical to each other).
Why one batch and not one generate per prompt: on the embedded tiny model, 4 prompts × 8 samples
take 57 ms as one batch against 120 ms as four (CPU, one thread): generate's cost per decoding step
is mostly fixed.

Abort: `abort()` sets an event that a StoppingCriteria reads after every token, so a generation
stopped from another thread ends within one decoding step and raises GenerationAborted (its partial
samples are dropped); an aborted engine generates no more.

Weights: `load_state_dict(strict=True)` after checking names and shapes (all or none); a tied model
may omit `lm_head.weight` (it is the embedding). Tensors of another floating dtype are converted by
the copy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.engine import (
    GenerationAborted,
    GenSample,
    check_request,
    decode_texts,
    end_token_ids,
    make_sample,
    model_context_len,
    prompt_seed,
    response_budget,
)
from actors.weights_io import check_named, expected_shapes, folder_dtype
from bus.messages import SamplingSpec

if TYPE_CHECKING:
    import torch

    from common.config import ActorConfig


class HFEngine:
    def __init__(self, model: str, cfg: "ActorConfig", device: str = ""):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        if cfg.tensor_parallel_size > 1:
            raise ValueError(f"actor.tensor_parallel_size = {cfg.tensor_parallel_size} needs the vLLM engine "
                             "(actor.engine = vllm); the transformers engine runs one shard")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model_dir = model
        self.version = -1
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        dtype = getattr(torch, folder_dtype(model, cfg.dtype))
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        # None: the model's own limit (what vLLM derives too)
        self.max_model_len = cfg.max_model_len or model_context_len(self.model.config)
        self._shapes, self._tied = expected_shapes(model)
        self._end_ids = end_token_ids(model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(self._end_ids)
        self._aborted = threading.Event()
        self._stopping = _abort_criteria(self._aborted)
        self.startup_s = time.perf_counter() - t0

    def generate(self, prompts: list[np.ndarray], sampling: SamplingSpec) -> list[list[GenSample]]:
        ids = check_request(prompts, sampling, self.vocab_size, self.max_model_len)
        groups: list[list[GenSample]] = [[] for _ in ids]
        for budget, rows in by_budget(ids, sampling.max_tokens, self.max_model_len).items():
            batch = self._generate_batch([ids[i] for i in rows], sampling, budget, prompt_seed(sampling, rows[0]))
            for i, group in zip(rows, batch):
                groups[i] = group
        return groups

    def _generate_batch(self, prompts: list[list[int]], s: SamplingSpec, budget: int,
                        seed: int | None) -> list[list[GenSample]]:
        """One `generate` for every prompt's n samples (left-padded to the longest prompt)."""
        import torch

        self._check_aborted()
        x, mask = left_padded(prompts, s.n, self._pad_id)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(x.to(self.device), attention_mask=mask.to(self.device),
                                      stopping_criteria=self._stopping, generation_config=self._gen_config(s, budget))
        self._check_aborted()
        new = out.sequences[:, x.shape[1]:]  # [k*n, steps]
        scores = torch.stack(out.scores, dim=1).float()  # [k*n, steps, V] processed logits
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1).cpu()
        new = new.cpu()
        cut = [self._cut(new[j].tolist(), logprobs[j].numpy()) for j in range(new.shape[0])]
        texts = decode_texts(self.tokenizer, [ids for ids, _ in cut])
        samples = [make_sample(ids, lp, text, self._end_ids) for (ids, lp), text in zip(cut, texts)]
        return [samples[j:j + s.n] for j in range(0, len(samples), s.n)]

    def _gen_config(self, s: SamplingSpec, budget: int) -> Any:
        from transformers import GenerationConfig

        sample = s.temperature > 0
        # generate() fills every field left None from the folder's generation_config (e.g. Qwen's
        # top_k=20, repetition_penalty=1.05): set each distribution-shaping one to its neutral value.
        neutral = dict(top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                       repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                       min_length=0, min_new_tokens=0)
        return GenerationConfig(
            max_new_tokens=budget, do_sample=sample, temperature=s.temperature if sample else 1.0,
            top_p=s.top_p if sample else 1.0, eos_token_id=sorted(self._end_ids), pad_token_id=self._pad_id,
            bos_token_id=None, return_dict_in_generate=True, output_scores=True, **neutral)

    def _cut(self, tokens: list[int], logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Up to and including the first end token; the rest is generate's padding."""
        end = next((k + 1 for k, t in enumerate(tokens) if t in self._end_ids), len(tokens))
        return np.asarray(tokens[:end], dtype=np.int32), logprobs[:end].astype(np.float32)

    def load_weights(self, named: Iterable[tuple[str, "torch.Tensor"]], version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        state = dict(check_named(named, self._shapes, self._tied))
        if self._tied and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        self.model.load_state_dict(state, strict=True)
        self.version = version
        return {"weights/load_s": time.perf_counter() - t0}

    def abort(self) -> None:
        self._aborted.set()

    def _check_aborted(self) -> None:
        if self._aborted.is_set():
            raise GenerationAborted("the engine was aborted")

    def close(self) -> None:
        self.model = None


def _abort_criteria(flag: threading.Event) -> Any:
    """A StoppingCriteriaList that ends every sequence of a `generate` once `flag` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Aborted(StoppingCriteria):
        def __call__(self, input_ids: "torch.LongTensor", scores: Any, **kwargs: Any) -> "torch.BoolTensor":
            return torch.full((input_ids.shape[0],), flag.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Aborted()])


def by_budget(prompts: list[list[int]], max_tokens: int, max_model_len: int) -> dict[int, list[int]]:
    """Prompt indices by response budget: one batch per budget, so a prompt near the context limit
    never shortens the others' responses (usually every prompt has the stage's max_tokens)."""
    out: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        out.setdefault(response_budget(len(p), max_tokens, max_model_len), []).append(i)
    return out


def left_padded(prompts: list[list[int]], n: int, pad_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Each prompt `n` times, left-padded to the longest: ids and attention mask, [k*n, L]. Left, so
    every row's next token follows its last prompt token; generate() derives positions from the mask."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts) * n, width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(prompts):
        rows = slice(j * n, (j + 1) * n)
        ids[rows, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[rows, width - len(p):] = 1
    return ids, mask
