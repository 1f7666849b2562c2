"""The DeepSpeed learner: forward, GRPO loss, backward and one optimizer step per batch.

DeepSpeed's engine does the work (`deepspeed.initialize`, `engine(...)`, `engine.backward`,
`engine.step`) with the same code on CPU (its CPU accelerator, gloo) and GPU (nccl).

One batch (`train_step`), on every rank with the same number of micro-batches M:

    T       = mask tokens of the whole batch (all micro-batches, all ranks; all-reduced and checked
              against the caller's total_tokens)
    for each micro-batch j:  log pi, H = engine(input_ids, attention_mask, loss positions)  (below)
        L_j       = policy_loss(..., mask = loss_mask[:, 1:], total_tokens = T)    (learner/loss.py)
        engine.backward(L_j * world_size, scale_wrt_gas=False)
    engine.step()                                                                   version += 1

Why this gives the exact token-level mean: L_j is already the micro-batch's share of the batch mean
(its token-sum over T), so the gradient we want is sum over ranks and micro-batches of grad L_j.
DeepSpeed would divide each backward by gradient_accumulation_steps (so the config pins GAS = 1
and backward passes scale_wrt_gas=False), and its data-parallel reduction AVERAGES over ranks
(allreduce / world_size in ZeRO 0-1, the same in ZeRO-2/3's reduce-scatter), which the
x world_size factor undoes. One engine.step() per batch whatever M is: the accumulation boundary is
set by hand (`set_gradient_accumulation_boundary`, False before the last micro-batch, True on it),
which is also when ZeRO 0-1 all-reduce; ZeRO-2/3 reduce in their backward hooks as they go.

Empty filler micro-batches (b = 0, so every rank makes the same number of calls) run a real
forward/backward on one dummy 2-token row with an all-zero mask: the loss is exactly 0 with a zero
gradient, but every parameter is in the graph, so ZeRO-3's gather/reduce hooks fire in lockstep.

`loss.sgd_steps` = K > 1 (ablations): pi_prox is recomputed first (a no-grad forward of every
micro-batch), the micro-batches are split into K contiguous mini-batches (the same split on every
rank since M is the same), and each gets its own T_k and optimizer step. Metrics are weighted by
T_k / T so they stay batch token-means.

No [b, L, V] logits: for the engine's forward the model's forward is swapped for `_score_tokens`
(`scoring_forward`), which runs the backbone (`model.base_model`) to the final hidden states, keeps
the rows of the positions whose next token is in the loss, and calls the LM head module once on
those rows; the head's forward is swapped for `loss.head_logprobs_and_entropy`, which makes the
logits chunk by chunk under activation checkpointing (one [rows, V] slab at a time, forward and
backward). With V = 151,936 one 16K-token sequence would otherwise hold 9.7 GB of float32 logits,
prompt positions included. Swapping the forwards instead of calling the parts from outside keeps
every call where DeepSpeed hooks it: the engine registers its backward prologue on the outputs of
its forward, and ZeRO-3 gathers the head's partitioned weight (the embedding's, when tied) in the
head module's forward and again in its backward, where the checkpointed chunks are recomputed. One
head call per micro-batch on every rank, however many chunks each rank's tokens need, so ZeRO-3's
collectives stay in lockstep; a micro-batch without loss tokens (a filler) scores one dummy row
whose result enters the loss times 0.

Shared prompts (learner/buffer.py MicroBatch, the shared form; `trainer.share_prompts`): a GRPO
group's n responses continue one prompt, so the forward runs the micro-batch's g prompts once,
keeping their keys and values, and then the responses on top of them (`_shared_prompt_hidden`):
g * P + b * R positions instead of b * (P + R), with the same arithmetic (tests check the gradient
against the flat form's). Both backbone calls happen inside the one engine forward, fillers
included, so ZeRO-3's gathers pair up across ranks; all ranks must hold one form (checked with the
rest below).

Input checks (shapes, token ranges, finite values, equal M on all ranks, one form, T) end in one all-reduce,
so a bad batch raises the same ValueError on every rank before any forward: nothing hangs.
"""

from __future__ import annotations

import logging
import math
import time
import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from common.config import LearnerConfig
from learner import checkpoint as ckpt
from learner import ds_setup

if TYPE_CHECKING:
    from learner.buffer import MicroBatch


@dataclass
class _Batch:
    """One micro-batch as tensors; the per-token ones aligned with the scored targets (the [:, 1:]
    slices flat, the response tokens themselves with shared prompts: learner/buffer.py MicroBatch)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    behaviour: torch.Tensor
    advantages: torch.Tensor
    prompts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # ids, mask, row_prompt


class Trainer:
    """One rank's DeepSpeed engine. Every rank calls the same methods in the same order
    (learner/dist.py arranges that); `version` = optimizer steps done."""

    def __init__(self, model_path: str | Path, cfg: LearnerConfig, *, temperature: float):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.rank, self.world_size = ds_setup.init_distributed()
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.utils import logger as ds_logger
        from transformers import AutoConfig

        ds_logger.setLevel(logging.WARNING)
        self.cfg, self.temperature, self.version = cfg, float(temperature), 0
        self.model_path = str(model_path)
        on_gpu = get_accelerator().device_name() != "cpu"
        self.precision = ds_setup.resolve_precision(cfg.trainer.precision, on_gpu)
        self.ds_config = ds_setup.build_deepspeed_config(cfg.trainer, cfg.optim, on_gpu=on_gpu,
                                                         world_size=self.world_size)
        torch.manual_seed(cfg.trainer.seed)
        model = ds_setup.load_model(self.model_path, self.ds_config, self.precision)
        if cfg.trainer.gradient_checkpointing:  # non-reentrant: the variant that works under ZeRO-3
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # from_pretrained returns eval mode, where HF skips gradient checkpointing
        self.vocab_size = int(model.config.vocab_size)
        check_scorable(model)
        # the folder's own dtype (weights_dtype "auto"), not the loaded copy's: that follows the
        # training precision (fp32 on CPU), which would send actors 2x the bytes of a bf16 folder
        self.model_dtype = ds_setup.folder_dtype(AutoConfig.from_pretrained(self.model_path))
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=self.ds_config)
        self.zero_stage = int(self.engine.zero_optimization_stage())
        self.device = self.engine.device
        if self.world_size == 1 and self.zero_stage == 0:
            # one rank has nothing to all-reduce, but the engine would still flatten every gradient
            # into a buffer, all-reduce it with itself and copy it back (~3 ms of a ~0.1 s step here)
            self.engine.enable_backward_allreduce = False

    # ---- training -------------------------------------------------------------------------

    def train_step(
        self, micro_batches: Sequence[MicroBatch], total_tokens: int, entropy_coef: float
    ) -> dict[str, float]:
        """This rank's micro-batches (the same count on every rank) -> sgd_steps optimizer steps.
        Returns metrics summed over micro-batches and ranks (loss metrics are batch token-means)."""
        start = time.perf_counter()
        n, k = len(micro_batches), self.cfg.loss.sgd_steps
        spans = _spans(n, k)
        error = next((e for e in (self._check(mb) for mb in micro_batches) if e), "")
        forms = {mb.prompt_ids is not None for mb in micro_batches}
        if len(forms) > 1:
            error = error or "micro-batches of both forms (shared prompts and flat) in one step"
        local = [sum(_tokens(mb) for mb in micro_batches[a:b]) for a, b in spans]
        span_tokens = self._agree(n, int(total_tokens), error, local, int(True in forms and len(forms) == 1))
        batches = [self._tensors(mb) for mb in micro_batches]
        prox: list[torch.Tensor | None] = [None] * n
        if k > 1:  # pi_prox = the policy before this batch's first step (PPO's pi_old)
            with torch.no_grad():
                prox = [self._score(b)[0] for b in batches]
        sums: dict[str, torch.Tensor] = {}
        norms: list[float] = []
        fwd_bwd_s = optim_s = 0.0
        for (a, b), tokens in zip(spans, span_tokens):
            if tokens == 0:
                continue  # the same on every rank: the tokens were all-reduced
            t_pass = time.perf_counter()
            for i in range(a, b):
                self.engine.set_gradient_accumulation_boundary(i == b - 1)
                out = self._loss(batches[i], prox[i], entropy_coef, tokens)
                self.engine.backward(out.loss * self.world_size, scale_wrt_gas=False)
                share = tokens / total_tokens
                for key, value in out.metrics.items():
                    sums[key] = sums.get(key, 0.0) + value.double() * share
                sums["loss/total"] = sums.get("loss/total", 0.0) + out.loss.detach().double() * share
            t_opt = time.perf_counter()
            fwd_bwd_s += t_opt - t_pass
            norms.append(self._optimizer_step())
            optim_s += time.perf_counter() - t_opt
            self.version += 1
        metrics = self._sum_over_ranks(sums)
        metrics["learner/grad_norm"] = float(np.mean(norms))
        metrics["learner/lr"] = float(self.engine.get_lr()[0])
        metrics["learner/tokens"] = float(total_tokens)
        metrics["learner/train_s"] = time.perf_counter() - start  # the loop times the whole step: step_s
        metrics["learner/fwd_bwd_s"] = fwd_bwd_s  # this rank's forwards + backwards (ZeRO-2/3 reduce inside)
        metrics["learner/optim_s"] = optim_s  # this rank's engine.step() calls (clip, AdamW, ZeRO-0/1 reduce)
        return metrics

    def _loss(self, batch: _Batch, prox: torch.Tensor | None, entropy_coef: float, tokens: int):
        from learner.loss import LossInputs, policy_loss

        logp, entropy = self._score(batch)
        inputs = LossInputs(logprobs=logp, entropy=entropy, behaviour_logprobs=batch.behaviour,
                            advantages=batch.advantages, mask=batch.mask, prox_logprobs=prox)
        return policy_loss(inputs, self.cfg.loss, entropy_coef, float(tokens))

    def _score(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_theta and H of the micro-batch's loss tokens at the sampling temperature, both
        float32 aligned with batch.mask (0 elsewhere), via the engine's forward."""
        with scoring_forward(self.engine.module, self.temperature):
            return self.engine(batch.input_ids, batch.attention_mask, batch.mask > 0, batch.prompts)

    def _optimizer_step(self) -> float:
        """engine.step(); the pre-clip global gradient norm (DeepSpeed reports it for ZeRO >= 1;
        under ZeRO 0 the module's grads are already all-reduced here, so we measure it)."""
        own = ds_setup.grad_norm(self.engine.module) if self.zero_stage == 0 else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = own if norm is None else norm
        return float(norm) if norm is not None else math.nan

    def _check(self, mb: MicroBatch) -> str:
        """'' or why this micro-batch is unusable (checked before any collective)."""
        try:
            shape = np.shape(mb.input_ids)
            for name in ("attention_mask", "loss_mask", "behaviour_logprobs", "advantages"):
                if np.shape(getattr(mb, name)) != shape:
                    return f"{name} has shape {np.shape(getattr(mb, name))}, input_ids {shape}"
            if len(shape) != 2:
                return f"input_ids must be [b, L], got shape {shape}"
            if shape[0] == 0:
                return ""
            ids, mask = np.asarray(mb.input_ids), np.asarray(mb.loss_mask)
            if mb.prompt_ids is not None:
                why = self._check_prompts(mb, shape)
                if why:
                    return why
            elif shape[1] < 2:
                return f"sequences need >= 2 tokens, got L={shape[1]}"
            elif np.any(mask[:, 0] != 0):
                return "loss_mask[:, 0] must be 0 (no logit predicts position 0)"
            if ids.min() < 0 or ids.max() >= self.vocab_size:
                return f"token ids outside [0, {self.vocab_size})"
            live = mask > 0
            finite = [np.isfinite(np.asarray(a)[live]).all() for a in (mb.advantages, mb.behaviour_logprobs)]
            if not all(finite):
                return "non-finite advantages or behaviour log-probs at loss positions"
            if int(mb.n_tokens) != int(live.sum()):
                return f"n_tokens={mb.n_tokens} but loss_mask has {int(live.sum())} tokens"
        except (AttributeError, TypeError, ValueError) as e:
            return f"malformed micro-batch: {e}"
        return ""

    def _check_prompts(self, mb: MicroBatch, shape: tuple[int, ...]) -> str:
        """'' or why the shared-prompt arrays of `mb` (learner/buffer.py MicroBatch) are unusable."""
        prompts, pmask = np.asarray(mb.prompt_ids), np.asarray(mb.prompt_mask)
        rows = np.asarray(mb.row_prompt)
        if prompts.ndim != 2 or pmask.shape != prompts.shape or prompts.shape[0] == 0:
            return f"prompt_ids must be [g >= 1, P] like prompt_mask, got {prompts.shape} and {pmask.shape}"
        if shape[1] < 1:
            return "responses need >= 1 token, got L=0"
        if rows.shape != (shape[0],) or rows.min() < 0 or rows.max() >= prompts.shape[0]:
            return f"row_prompt must be [{shape[0]}] prompt rows in [0, {prompts.shape[0]})"
        if prompts.size and (prompts.min() < 0 or prompts.max() >= self.vocab_size):
            return f"prompt token ids outside [0, {self.vocab_size})"
        if np.any(pmask.sum(axis=1) == 0) or np.any(np.diff(pmask, axis=1) < 0):
            return "every prompt needs >= 1 token, left-padded (prompt_mask 0...0 1...1)"
        return ""

    def _agree(self, n: int, total: int, error: str, local_tokens: list[int], shared: int) -> list[int]:
        """One MAX and one SUM all-reduce: the same verdict on every rank, then the global tokens
        of each mini-batch. `shared`: 1 if this rank's micro-batches take the shared-prompt form."""
        import torch.distributed as dist

        flags = torch.tensor([n, -n, int(bool(error)), total, -total, shared, -shared],
                             dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        tokens = torch.tensor(local_tokens or [0], dtype=torch.int64, device=self.device)
        dist.all_reduce(tokens)
        n_max, n_min, bad, t_max, t_min, s_max, s_min = flags.tolist()
        n_min, t_min, s_min = -n_min, -t_min, -s_min
        span_tokens = tokens.tolist()[: len(local_tokens)]
        if bad:
            raise ValueError(f"bad micro-batch: {error}" if error else "bad micro-batch on another rank")
        if n_max != n_min:
            raise ValueError(f"ranks hold different micro-batch counts ({n_min}..{n_max}); "
                             "pad with empty ones")
        if s_max != s_min:  # the shared form runs the backbone twice: ZeRO-3's gathers would not pair up
            raise ValueError("ranks hold micro-batches of different forms (shared prompts or flat); "
                             "build every rank's, fillers included, in one form")
        if t_max != t_min or sum(span_tokens) != total:
            raise ValueError(f"total_tokens={total} (ranks {t_min}..{t_max}) but the batch has "
                             f"{sum(span_tokens)} loss tokens")
        if total <= 0:
            raise ValueError("the batch has no loss tokens")
        return span_tokens

    def _tensors(self, mb: MicroBatch) -> _Batch:
        ids = np.asarray(mb.input_ids)
        cut = mb.prompt_ids is None  # flat: the per-token arrays' [:, 1:] (MicroBatch)
        if ids.shape[0] == 0:  # filler: one dummy row of the same form, all-zero mask (module docstring)
            zeros = torch.zeros((1, 1), dtype=torch.float32, device=self.device)
            dummy = torch.zeros((1, 2 if cut else 1), dtype=torch.long, device=self.device)
            row = torch.zeros(1, dtype=torch.long, device=self.device)
            prompt = None if cut else (dummy, torch.ones_like(dummy), row)
            return _Batch(dummy, torch.ones_like(dummy), zeros, zeros, zeros, prompt)

        def t(a: Any, dtype: torch.dtype, cut: bool = False) -> torch.Tensor:
            a = np.asarray(a)[:, 1:] if cut else np.asarray(a)
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=self.device, dtype=dtype)

        prompts = None if cut else (t(mb.prompt_ids, torch.long), t(mb.prompt_mask, torch.long),
                                    t(mb.row_prompt, torch.long))
        return _Batch(t(ids, torch.long), t(mb.attention_mask, torch.long),
                      t(mb.loss_mask, torch.float32, cut), t(mb.behaviour_logprobs, torch.float32, cut),
                      t(mb.advantages, torch.float32, cut), prompts)

    def _sum_over_ranks(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(sums)
        if not keys:
            return {}
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in keys]).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(vec)
        return dict(zip(keys, vec.tolist()))

    # ---- weights and checkpoints ----------------------------------------------------------

    def export_weights(self, dtype: str = "auto",
                       sink: Callable[[str, np.ndarray], None] | None = None) -> list[tuple[str, np.ndarray, str]] | None:
        """The full state dict as (HF name, array, dtype name) triples in state-dict order, tied
        aliases included (lm_head.weight for tied embeddings, so vLLM's loader finds it). bfloat16
        has no numpy dtype: its arrays are the raw bits as uint16 with dtype name "bfloat16".
        Every rank must call (ZeRO-3 gathers collectively); rank 0 gets the list, others None.
        With `sink` (rank 0), each tensor goes to `sink(name, array)` as soon as it is gathered and
        converted, once per tensor (a tied alias under its first name, as `weights_layout` lists
        it), and nothing is kept: the publisher writes straight into the version's buffer."""
        name = self.weights_dtype_name(dtype)
        tdtype = getattr(torch, name)
        keys, tensors, distinct = self._state_tensors()
        name_of = {id(t): key for key, t in distinct.items()}
        host: dict[int, np.ndarray] = {}
        for group in ds_setup.gather_groups(list(distinct.values()), self.zero_stage):
            with ds_setup.gathered(group, self.zero_stage):
                if self.rank == 0:
                    for t in group:
                        if sink is not None:
                            sink(name_of[id(t)], ds_setup.to_numpy(t, tdtype))
                        else:
                            host[id(t)] = ds_setup.to_numpy(t, tdtype)
        if self.rank != 0 or sink is not None:
            return None
        return [(key, host[id(tensors[key])], name) for key in keys]

    def export_shards(self, dtype: str, path: str, file_id: str, offsets: dict[str, int]) -> bool:
        """Every rank (ZeRO-3 on one host): write this rank's own partition of each tensor, converted
        to `dtype`, at its place in the version file `path` that rank 0 laid out (`offsets`: each
        tensor of `weights_layout` → its byte offset), through ``shm.open_writer``. No gather: each
        rank moves 1/world of the bytes, all at once, and nothing crosses the process group but one
        all-reduced flag. Tensors ZeRO does not partition (buffers) come whole from rank 0.

        Returns, on every rank alike, whether every rank wrote all of its share: False when a rank
        cannot open the file (another host or another /dev/shm: the ranks do not share it) or a
        partition is not laid out as ZeRO-3's plain flat split (rank r holds elements
        [r·s, (r+1)·s) of the flattened tensor, s = ds_tensor.ds_numel); the caller then gathers."""
        from bus.weights import shm

        tdtype = getattr(torch, self.weights_dtype_name(dtype))
        itemsize = torch.tensor([], dtype=tdtype).element_size()
        ok = self.zero_stage == 3
        try:
            with shm.open_writer(path, file_id) as write:
                for key, t in self._state_tensors()[2].items():
                    if not ok:
                        break
                    piece = ds_setup.own_partition(t, self.rank, self.world_size)
                    if piece is None:  # not partitioned: rank 0 writes it whole
                        if self.rank == 0:
                            write(offsets[key], ds_setup.to_numpy(t, tdtype))
                    elif piece is ds_setup.UNKNOWN_LAYOUT:
                        ok = False
                    elif piece[0].numel():
                        write(offsets[key] + piece[1] * itemsize, ds_setup.host_bytes(piece[0], tdtype))
        except (OSError, ValueError) as e:
            logging.getLogger(__name__).warning("export_shards on rank %d: %s", self.rank, e)
            ok = False
        return self._sum_over_ranks({"failed": torch.tensor(0.0 if ok else 1.0)})["failed"] == 0

    def weights_layout(self, dtype: str = "auto") -> list[tuple[str, str, list[int]]]:
        """(HF name, dtype name, shape) of each tensor `export_weights(dtype, sink)` will hand over,
        in that order (a tied alias once, under its first name): this rank alone, no collective
        (ZeRO-3 shards report their full shape, `ds_shape`)."""
        name = self.weights_dtype_name(dtype)
        _, _, distinct = self._state_tensors()
        return [(key, name, [int(d) for d in getattr(t, "ds_shape", t.shape)]) for key, t in distinct.items()]

    def _state_tensors(self) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """State-dict keys, the tensor behind each (parameters and buffers, aliases kept), and the
        distinct tensors under their first key, in state-dict order."""
        module = self.engine.module
        keys = list(module.state_dict(keep_vars=True).keys())
        tensors = dict(module.named_buffers(remove_duplicate=False))
        tensors.update(module.named_parameters(remove_duplicate=False))
        seen: set[int] = set()
        distinct: dict[str, torch.Tensor] = {}
        for key in keys:
            if id(tensors[key]) not in seen:
                seen.add(id(tensors[key]))
                distinct[key] = tensors[key]
        return keys, tensors, distinct

    def weights_dtype_name(self, dtype: str = "auto") -> str:
        """auto -> trainer.weights_dtype -> (auto) bfloat16 when training in bf16 (on GPU: bf16
        throughout, half the bytes of an fp32 folder per version), else the model folder's dtype."""
        name = dtype if dtype != "auto" else self.cfg.trainer.weights_dtype
        if name == "auto":
            name = "bfloat16" if self.precision == "bf16" else self.model_dtype
        if name not in ds_setup.WEIGHT_DTYPES:
            raise ValueError(f"weights dtype must be one of {ds_setup.WEIGHT_DTYPES}, got {name!r}")
        return name

    def save_checkpoint(self, directory: str | Path, client_state: dict[str, Any]) -> Path:
        """All ranks: DeepSpeed's files + each rank's RNG, then (rank 0) or1_state.json and the
        completion marker (learner/checkpoint.py). `directory` is the step's folder."""
        import torch.distributed as dist

        path = Path(directory)
        ckpt.check_client_state(client_state)
        if self.rank == 0:
            ckpt.begin_save(path)
        dist.barrier()
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state={"or1_version": self.version},
                                    save_latest=False)
        ckpt.write_rng(path, self.rank, ds_setup.rng_states())
        dist.barrier()
        if self.rank == 0:
            ckpt.write_state(path, self.version, self.world_size, client_state)
            ckpt.mark_complete(path)
        dist.barrier()
        return path

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore engine (module, optimizer), version and RNG from a complete checkpoint;
        returns its client_state. All ranks call."""
        path = Path(directory)
        doc = ckpt.read_state(path)
        if doc["world_size"] != self.world_size:
            raise ValueError(f"{path} was saved by {doc['world_size']} ranks; this run has {self.world_size}")
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        self.version = int(doc["version"])
        rng = ckpt.read_rng(path, self.rank)
        if rng is not None:
            ds_setup.set_rng_states(rng)
        return doc["client_state"]


# ---- helpers ------------------------------------------------------------------------------


def _spans(n: int, k: int) -> list[tuple[int, int]]:
    """k contiguous, near-equal index ranges covering range(n) (some empty when n < k)."""
    edges = [round(i * n / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _tokens(mb: MicroBatch) -> int:
    try:
        if not np.shape(mb.loss_mask)[0]:
            return 0
        mask = np.asarray(mb.loss_mask)
        return int(((mask if mb.prompt_ids is not None else mask[:, 1:]) > 0).sum())
    except (AttributeError, IndexError, TypeError, ValueError):
        return 0  # malformed: _check reports it


# ---- log-probs without full logits (module docstring) ---------------------------------------


UNSUPPORTED_HEAD_CONFIG = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
"""Config keys of models whose CausalLM forward transforms lm_head's output (Gemma 2's softcap,
Cohere's and Granite's scales, ...): scoring from the head alone would be a different policy."""


def check_scorable(model: torch.nn.Module) -> None:
    """Raise ValueError unless `model` is a CausalLM whose logits are exactly
    lm_head(base_model(...).last_hidden_state): a backbone under `base_model` and a Linear head."""
    base, head = getattr(model, "base_model", model), model.get_output_embeddings()
    name = type(model).__name__
    if base is model:
        raise ValueError(f"{name}: no backbone under base_model; the learner needs a CausalLM with one "
                         "(Qwen2/Llama-style: model.model)")
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{name}: the output head is {type(head).__name__}, not a Linear layer")
    for key in UNSUPPORTED_HEAD_CONFIG:
        if getattr(model.config, key, None) not in (None, 1, 1.0):
            raise ValueError(f"{name}: config.{key}={getattr(model.config, key)!r} changes the logits after "
                             "lm_head; the learner's chunked log-probs do not support it")


@contextlib.contextmanager
def scoring_forward(model: torch.nn.Module, temperature: float):
    """While open, `model(input_ids, attention_mask, live, prompts)` returns (log pi, H) of the
    positions `live` (`_score_tokens`; [b, L-1] flat, [b, L] with shared prompts), and the head's
    forward is the chunked one (`_head_scores`)."""
    head = model.get_output_embeddings()
    saved = [(m, m.__dict__.get("forward")) for m in (model, head)]
    model.forward = functools.partial(_score_tokens, model, head)
    head.forward = functools.partial(_head_scores, head, temperature)
    try:
        yield
    finally:
        for module, forward in saved:
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _score_tokens(model: torch.nn.Module, head: torch.nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, live: torch.Tensor,
                  prompts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if prompts is not None:
        hidden, targets = _shared_prompt_hidden(model, input_ids, attention_mask, *prompts)
    else:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden, targets = hidden.last_hidden_state[:, :-1], input_ids[:, 1:]
    zeros = torch.zeros(live.shape, dtype=torch.float32, device=hidden.device)
    if not bool(live.any()):  # filler: the head still runs (every rank calls it once), times 0
        logp, entropy = head(hidden[:1, 0], targets[:1, 0])
        nothing = 0.0 * (logp.sum() + entropy.sum())
        return zeros + nothing, zeros + nothing
    logp, entropy = head(hidden[live], targets[live])
    return zeros.masked_scatter(live, logp), zeros.masked_scatter(live, entropy)


def _shared_prompt_hidden(model: torch.nn.Module, responses: torch.Tensor, response_mask: torch.Tensor,
                          prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, row_prompt: torch.Tensor,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict each response token, and those tokens, both [b, L], with
    every prompt run once (learner/buffer.py MicroBatch, shared form).

    The g left-padded prompts run first, keeping their keys and values; those are gathered to the
    b response rows (row i continues prompt row_prompt[i]) and the responses run on top of them,
    each position at its place in its own sequence (prompt length + t) and masked to its own
    prompt's real tokens. A causal model's prompt states do not depend on what follows, so this is
    the flat forward's arithmetic: the same states, and in backward each prompt position receives
    the sum of what its b responses send back through the gathered keys and values, which is what
    b separate copies of it would have received. Token 0 of a response is predicted by its
    prompt's last position (column P - 1: the prompts are left-padded), token t by response
    position t - 1."""
    base = model.base_model
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    first = base(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True)
    cache = first.past_key_values
    cache.batch_select_indices(row_prompt)
    steps = torch.arange(responses.shape[1], device=responses.device)
    positions = prompt_mask.sum(-1)[row_prompt, None] + steps
    mask = torch.cat([prompt_mask[row_prompt], response_mask], dim=1)
    out = base(input_ids=responses, attention_mask=mask, position_ids=positions, past_key_values=cache,
               use_cache=True).last_hidden_state
    hidden = torch.cat([first.last_hidden_state[row_prompt, -1:], out[:, :-1]], dim=1)
    return hidden, responses


def _head_scores(head: torch.nn.Linear, temperature: float, hidden: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from learner.loss import head_logprobs_and_entropy

    return head_logprobs_and_entropy(hidden, targets, head.weight, head.bias, temperature)
