"""`HFEngine`: the Engine contract on a transformers model, for machines without vLLM.

Generation, one batch per call (per response budget, `by_budget`): every prompt repeated `n`
times, left-padded to the longest with an attention mask (`left_padded`), then `decode`: one
prefill, then one forward per new token over a `DynamicCache`, positions from the mask (as
generate() derives them). Each step's next token is drawn by `pick` from the logits divided by the
temperature, the tokens outside top-p masked to -inf (HF's `TopPLogitsWarper` rule): the
distribution actually sampled from, whose log-softmax at the sampled token is the processed
log-prob, the same quantity as vLLM's "processed_logprobs". Greedy (T = 0) is the argmax, its
log-prob that of the raw logits. Nothing else shapes the distribution: the folder's
generation_config (Qwen ships top_k=20, repetition_penalty=1.05) is not read, as vLLM given
explicit SamplingParams reads only the end tokens from it. A sample ends at its first end token
(kept); the loop stops once every row has ended or at the budget. Text:
`actors.engine.decode_texts`. Device: CUDA when available, else CPU. Context: `cfg.max_model_len`,
or the model's own limit (`max_position_embeddings`) when None. One shard only (no tensor parallelism).

Why a loop of its own and not transformers' `generate`: on the embedded tiny model generate's cost
per decoding step is mostly fixed, and a fifth of it was `torch.multinomial` (1.1 ms for 32 rows of
2,048 on one CPU thread); `pick` draws by inverse CDF (one uniform per row, `searchsorted` in the
cumulative sum: 0.05 ms), exact for the same distribution. It also keeps only the sampled token's
log-prob per step instead of every step's full scores. Measured on `toy:chain` (32 rows × 50 tokens):
see docs/training.md#against-trl. Why one batch and not one call per prompt: 4 prompts × 8 samples
take about half as long in one batch as in four separate calls. The forwards themselves are the
model's `LeanDecoder` (actors/lean_decoder.py) for a Qwen2- or Llama-style model unless
`actor.hf_decoder = "transformers"`: the same arithmetic without transformers' fixed cost per
call, which was most of a decoding step on the embedded model.
Seeds: a `torch.Generator` on the engine's device seeded with the batch's first prompt's seed (a
fresh random seed when None), so the global RNG is untouched; the batch's samples draw from that
one stream (not vLLM's per-sample streams: the two engines are each reproducible, not identical to
each other).

Abort: `abort()` sets an event the loop reads before every forward, so a generation stopped from
another thread ends within one decoding step and raises GenerationAborted (its partial samples are
dropped); an aborted engine generates no more.

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
from common.log import get_logger

if TYPE_CHECKING:
    import torch

    from actors.lean_decoder import LeanDecoder
    from common.config import ActorConfig

log = get_logger()


class HFEngine:
    updates_in_flight = False

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
        self.lean = self._lean_decoder(cfg.hf_decoder)
        self.startup_s = time.perf_counter() - t0

    def _lean_decoder(self, choice: str) -> "LeanDecoder | None":
        """The model's own decoding forward when `actor.hf_decoder` allows and the model is one it
        runs (actors/lean_decoder.py); else None: transformers' forward. Says which in the log."""
        from actors.lean_decoder import LeanDecoder, supports

        why = "actor.hf_decoder = transformers" if choice == "transformers" else supports(self.model)
        log.info("hf_engine.decoder", decoder="transformers" if why else "lean", why=why or None)
        return None if why else LeanDecoder(self.model)

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
        """One `decode` for every prompt's n samples (left-padded to the longest)."""
        import torch

        self._check_aborted()
        x, mask = left_padded(prompts, s.n, self._pad_id)
        gen = torch.Generator(device=self.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        with torch.inference_mode():
            new, logprobs = decode(self.model, x.to(self.device), mask.to(self.device), budget=budget,
                                   temperature=s.temperature, top_p=s.top_p, end_ids=self._end_ids,
                                   pad_id=self._pad_id, generator=gen, aborted=self._aborted, copies=s.n,
                                   lean=self.lean)
        new, logprobs = new.cpu(), logprobs.cpu()
        cut = [self._cut(new[j].tolist(), logprobs[j].numpy()) for j in range(new.shape[0])]
        texts = decode_texts(self.tokenizer, [ids for ids, _ in cut])
        samples = [make_sample(ids, lp, text, self._end_ids) for (ids, lp), text in zip(cut, texts)]
        return [samples[j:j + s.n] for j in range(0, len(samples), s.n)]

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


def decode(model: Any, ids: "torch.Tensor", mask: "torch.Tensor", *, budget: int, temperature: float,
           top_p: float, end_ids: Iterable[int], pad_id: int, generator: "torch.Generator",
           aborted: threading.Event, copies: int = 1, lean: "LeanDecoder | None" = None,
           ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Up to `budget` new tokens for each left-padded row: (tokens, their log-probs), [rows, steps],
    a row's positions after its end token filled with `pad_id` and 0. Raises GenerationAborted when
    `aborted` is set before a forward. `copies` > 1: the rows are each prompt `copies` times in a
    row (`left_padded`), so the prompts are run once and their keys and values repeated for the
    copies (each copy still draws its own tokens from the same first distribution). With `lean`
    (the model's `LeanDecoder`), the forwards are its own; the sampling is the same."""
    import torch

    rows = ids.shape[0]
    ends = torch.tensor(sorted(end_ids), device=ids.device)
    tokens = torch.full((rows, budget), pad_id, dtype=torch.long, device=ids.device)
    logprobs = torch.zeros((rows, budget), dtype=torch.float32, device=ids.device)
    done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    forward = (_lean_forward(lean, ids, mask, copies, budget) if lean is not None
               else _hf_forward(model, ids, mask, copies))
    tok, steps = None, 0
    for t in range(budget):
        if aborted.is_set():
            raise GenerationAborted("the engine was aborted")
        tok, lp = pick(forward(tok).float(), temperature, top_p, generator)
        tokens[:, t] = torch.where(done, pad_id, tok)
        logprobs[:, t] = torch.where(done, 0.0, lp)
        done |= torch.isin(tok, ends)
        steps = t + 1
        if bool(done.all()):
            break
    return tokens[:, :steps], logprobs[:, :steps]


def _hf_forward(model: Any, ids: "torch.Tensor", mask: "torch.Tensor", copies: int):
    """`forward(None)`: the prompts' last logits per row; `forward(tok)`: the next position's,
    through transformers' forward over a DynamicCache (positions from the mask, as generate())."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    state = {"mask": mask, "pos": (mask.cumsum(-1) - 1).clamp(min=0)}

    def forward(tok: "torch.Tensor | None") -> "torch.Tensor":
        if tok is None and copies > 1:  # the prompts once, then their cache and logits per copy
            pos = state["pos"]
            out = model(input_ids=ids[::copies], attention_mask=mask[::copies], position_ids=pos[::copies],
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(copies)
            return out.logits[:, -1].repeat_interleave(copies, dim=0)
        if tok is not None:
            state["pos"] = state["pos"][:, -1:] + 1
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones((ids.shape[0], 1))], dim=1)
        out = model(input_ids=ids if tok is None else tok[:, None], attention_mask=state["mask"],
                    position_ids=state["pos"], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    return forward


def _lean_forward(lean: "LeanDecoder", ids: "torch.Tensor", mask: "torch.Tensor", copies: int, budget: int):
    """`_hf_forward`'s contract on the LeanDecoder."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    state = {"pos": positions[:, -1]}

    def forward(tok: "torch.Tensor | None") -> "torch.Tensor":
        if tok is None:
            return lean.start(ids, mask, positions, copies, budget)
        state["pos"] = state["pos"] + 1
        return lean.step(tok, state["pos"])

    return forward


def pick(logits: "torch.Tensor", temperature: float, top_p: float,
         generator: "torch.Generator") -> tuple["torch.Tensor", "torch.Tensor"]:
    """The next token of each row [rows, vocab] and its log-prob under the distribution sampled:
    greedy argmax (raw logits) at T = 0; else logits / T with top-p applied, drawn by inverse CDF."""
    import torch

    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    z = logits / temperature
    if top_p < 1.0:
        z = z.masked_fill(outside_top_p(z, top_p), float("-inf"))
    logp = torch.log_softmax(z, -1)
    cdf = logp.exp().cumsum(-1)
    u = torch.rand((z.shape[0], 1), generator=generator, device=z.device) * cdf[:, -1:]
    # right=True: the first index whose cumulative mass exceeds u, never a token of probability 0
    tok = torch.searchsorted(cdf, u, right=True).clamp_(max=z.shape[-1] - 1).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def outside_top_p(z: "torch.Tensor", top_p: float) -> "torch.Tensor":
    """HF's TopPLogitsWarper rule: sorted ascending, drop the tokens whose cumulative probability is
    at most 1 - top_p, always keeping the likeliest."""
    import torch

    ascending, order = torch.sort(z, descending=False)
    drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return drop.scatter(1, order, drop)


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
