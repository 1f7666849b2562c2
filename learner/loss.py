"""The GRPO policy loss of Skywork-OR1 with an exact token-level mean and behaviour correction.

Pure tensor code: no DeepSpeed, no model, no state. All log-probs are taken at the sampling
temperature T (logits / T), the same distribution the actors sampled from.

Log-probs and entropy of a token y_t from logits z_t (or from the LM head: z_t = W h_t + b, with
h_t the final hidden state of the position that predicts y_t)::

    log pi_t = log_softmax(z_t / T)[y_t]          H_t = -sum_v p_v log p_v,   p = softmax(z_t / T)

computed over chunks of positions in float32, each chunk under activation checkpointing, so neither
pass holds more than one chunk's [rows, V] (CHUNK_BYTES) whatever L is.

Advantage (per group of n samples of one prompt, rewards r_1..r_n; computed before the loss, in
`learner/advantage.py`, the one home of reward shaping and advantages)::

    A_i = (r_i - mean(r)) / (std(r) + 1e-6)        std unbiased (n - 1); a group of one sample -> 0

and A_i arrives here broadcast over every response token of sample i.

Per response token t, with log pi_theta (current policy, carries the gradient), log pi_prox
(proximal policy; None means one optimizer step per batch, where pi_prox IS the current policy, so
its detached log-probs are used and no extra forward pass is needed) and log mu (behaviour policy,
the actor's own log-probs)::

    rho_t   = exp(clamp(log pi_theta - log pi_prox, -20, 20))
    PPO_t   = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A)
    u_t     = exp(clamp(log pi_prox - log mu, -20, 20))                    (no gradient)
    w_t     = min(u_t, C)                  tis   (truncated importance sampling, default)
            = 1 if 1/C <= u_t <= C else 0  mask
            = 1                            none
    KL_t    = exp(log mu - log pi_theta) - (log mu - log pi_theta) - 1      (k3; only when beta > 0)
    loss    = ( sum_t m_t * (w_t * PPO_t + beta * KL_t) - alpha * sum_t m_t * H_t ) / total_tokens

where m_t is the 0/1 loss mask, H_t the exact full-vocabulary entropy of pi_theta at token t, alpha
the entropy controller's coefficient, and total_tokens the number of mask tokens in the WHOLE batch
(every micro-batch on every rank). Each micro-batch's loss is therefore its share of the batch's
token mean, and summing the micro-batch losses (gradient accumulation without DeepSpeed's 1/GAS
scaling, then the data-parallel sum) gives the exact token-level mean of Skywork-OR1 Eq. 3.1, which
the released verl code only approximates.

Why the log-ratio clamps: the actor's sampler and the learner's forward differ numerically, and a
token that one side gives ~0 probability makes log pi - log mu hundreds of nats; exp() of that is
inf, and inf * 0 (a masked or clipped token) is NaN, which poisons the whole step. e^20 ~ 5e8 is far
beyond any clip or cap, so clamping there changes no finite-ratio result while keeping every term
finite. Positions outside the mask are zeroed BEFORE any exp for the same reason (padding may hold
anything), so their gradient is exactly 0.

Metrics are token-SUMS divided by total_tokens, so summing a metric over all micro-batches and ranks
gives its token mean over the batch:
    loss/policy         sum m*w*PPO                      loss/kl        sum m*KL (only if beta > 0)
    loss/clip_frac      tokens on the clipped branch     (= clip_frac_low + clip_frac_high)
    loss/clip_frac_low  A < 0 and rho < 1 - eps_low      loss/clip_frac_high  A > 0 and rho > 1 + eps_high
    loss/is_clip_frac   tokens whose w was truncated (tis: u > C) or masked (mask: u outside [1/C, C])
    loss/is_weight_mean sum m*w
    mismatch/kl         k3 estimate of KL(mu || pi_prox): u - 1 - log u, unbiased because the tokens
                        were sampled from mu
    entropy/mean        sum m*H
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from common.config import LossConfig

LOG_RATIO_CLAMP = 20.0  # |log ratio| above this is numerically broken, not information: see module doc
CHUNK_BYTES = 128 << 20  # one float32 [b, chunk, V] slab in token_logprobs_and_entropy (peak ~3x this)
KEPT_SLABS = 3  # [rows, V] float32 tensors autograd keeps for one chunk's backward (log pi, pi, pi log pi)


@dataclass
class LossInputs:
    """Per-token tensors of one micro-batch, all the same shape (e.g. [b, L]); `advantages` may
    also be any shape that broadcasts to it (e.g. [b, 1])."""

    logprobs: Tensor  # log pi_theta of each token at the sampling temperature; requires grad
    entropy: Tensor  # exact full-vocabulary entropy H_t of pi_theta at that temperature (grad flows)
    behaviour_logprobs: Tensor  # mu: the actor's log-probs of the same tokens
    advantages: Tensor  # A_i broadcast over the tokens of sample i
    mask: Tensor  # float 0/1: tokens that count
    prox_logprobs: Tensor | None = None  # pi_prox; None = the one-step shortcut logprobs.detach()


@dataclass
class LossOutputs:
    loss: Tensor  # scalar
    metrics: dict[str, Tensor]  # detached token-sums / total_tokens


def policy_loss(inp: LossInputs, cfg: LossConfig, entropy_coef: float, total_tokens: float) -> LossOutputs:
    """The micro-batch's share of the batch loss (see the module docstring for the exact formula)."""
    _check_inputs(inp, total_tokens)
    live = inp.mask > 0
    mask = live.to(inp.logprobs.dtype)
    logp = torch.where(live, inp.logprobs, 0.0)
    prox = logp.detach() if inp.prox_logprobs is None else torch.where(live, inp.prox_logprobs, 0.0).detach()
    mu = torch.where(live, inp.behaviour_logprobs.to(logp.dtype), 0.0)
    adv = inp.advantages.to(logp.dtype).expand_as(logp)

    ratio = torch.exp((logp - prox).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped_ratio = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    ppo = -torch.minimum(ratio * adv, clipped_ratio * adv)
    log_u = (prox - mu).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w, w_cut = behaviour_weight(log_u, cfg.tis_mode, cfg.tis_cap)

    per_token = w * ppo
    kl = None
    if cfg.kl_beta > 0:
        d = (mu - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + cfg.kl_beta * kl
    entropy = torch.where(live, inp.entropy, 0.0)
    loss = ((mask * per_token).sum() - entropy_coef * (mask * entropy).sum()) / total_tokens

    with torch.no_grad():
        low = (adv < 0) & (ratio < 1.0 - cfg.eps_low)
        high = (adv > 0) & (ratio > 1.0 + cfg.eps_high)
        u = torch.exp(log_u)

        def share(x: Tensor) -> Tensor:
            return (mask * x.to(mask.dtype)).sum() / total_tokens

        metrics = {
            "loss/policy": share(w * ppo),
            "loss/clip_frac": share(low | high),
            "loss/clip_frac_low": share(low),
            "loss/clip_frac_high": share(high),
            "loss/is_clip_frac": share(w_cut),
            "loss/is_weight_mean": share(w),
            "mismatch/kl": share(u - 1.0 - log_u),
            "entropy/mean": share(entropy),
        }
        if kl is not None:
            metrics["loss/kl"] = share(kl)
    return LossOutputs(loss=loss, metrics={k: v.detach() for k, v in metrics.items()})


def behaviour_weight(log_u: Tensor, mode: str, cap: float) -> tuple[Tensor, Tensor]:
    """w from log u = log pi_prox - log mu (detached), and the bool tensor of tokens it cut."""
    log_u = log_u.detach()
    u = torch.exp(log_u)
    if mode == "tis":
        cut = u > cap
        return u.clamp(max=cap), cut
    if mode == "mask":
        cut = (u < 1.0 / cap) | (u > cap)
        return (~cut).to(u.dtype), cut
    if mode == "none":
        return torch.ones_like(u), torch.zeros_like(u, dtype=torch.bool)
    raise ValueError(f"tis_mode must be tis, mask or none, got {mode!r}")


def _check_inputs(inp: LossInputs, total_tokens: float) -> None:
    if not total_tokens > 0:
        raise ValueError(f"total_tokens must be > 0 (the batch's loss tokens), got {total_tokens}")
    shape = inp.logprobs.shape
    named = {"entropy": inp.entropy, "behaviour_logprobs": inp.behaviour_logprobs, "mask": inp.mask}
    if inp.prox_logprobs is not None:
        named["prox_logprobs"] = inp.prox_logprobs
    for name, t in named.items():
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logprobs {tuple(shape)}")
    # same rank required: a [b] vector would silently broadcast along L when b == L
    adv = tuple(inp.advantages.shape)
    if len(adv) != len(shape) or any(a not in (1, s) for a, s in zip(adv, shape)):
        raise ValueError(f"advantages {adv} must broadcast to {tuple(shape)} at the same rank, e.g. [b, 1]")


def token_logprobs_and_entropy(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """log_softmax(logits / T) at `targets` and the full-vocabulary entropy -sum p log p, both
    [b, L] float32. `logits` [b, L, V] are already aligned with `targets` [b, L].

    Works in float32 over chunks of positions; under autograd each chunk is checkpointed, so
    backward recomputes its softmax instead of keeping [b, L, V] float32 activations alive: the
    extra memory is one chunk's temporaries (~3 x CHUNK_BYTES), whatever L is.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        got = f"{tuple(logits.shape)}, {tuple(targets.shape)}"
        raise ValueError(f"logits [b, L, V] and targets [b, L] expected, got {got}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, length, vocab = logits.shape
    chunk = max(1, CHUNK_BYTES // max(1, 4 * b * vocab))
    grad = torch.is_grad_enabled() and logits.requires_grad
    chunks = ((logits[:, s : s + chunk], targets[:, s : s + chunk], temperature) for s in range(0, length, chunk))
    return _over_chunks(_chunk_logprobs_entropy, chunks, grad, logits.new_zeros((b, 0), dtype=torch.float32), dim=1)


def head_logprobs_and_entropy(
    hidden: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor]:
    """The same two quantities straight from the LM head: `hidden` [N, H] (one row per scored
    position), `targets` [N], `weight` [V, H] and `bias` [V] or None of the head; returns log pi and
    H, both [N] float32. The logits z = hidden @ weight^T + bias exist only chunk by chunk
    (CHUNK_BYTES // (4 V) rows, at least 1), each chunk checkpointed, so forward and backward hold
    one chunk's [rows, V] at a time: the memory no longer grows with N x V. When what backward
    needs of all N rows (KEPT_SLABS x [N, V] float32) fits in CHUNK_BYTES anyway, there is one
    plain pass instead: the same values and memory bound, without recomputing the logits in backward.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.dim() != 2:
        got = f"{tuple(hidden.shape)}, {tuple(targets.shape)}, {tuple(weight.shape)}"
        raise ValueError(f"hidden [N, H], targets [N] and weight [V, H] expected, got {got}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = head_chunk_rows(weight.shape[0])
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if grad and hidden.shape[0] * weight.shape[0] * 4 * KEPT_SLABS <= CHUNK_BYTES:
        # everything backward needs fits one chunk's budget: keep it rather than recompute it
        # (the embedded model's ~400 scored rows x 2,048: 11 -> 7 ms a step, forward and backward)
        return _chunk_head_logprobs_entropy(hidden, targets, weight, bias, temperature)
    chunks = ((hidden[s : s + rows], targets[s : s + rows], weight, bias, temperature)
              for s in range(0, hidden.shape[0], rows))
    return _over_chunks(_chunk_head_logprobs_entropy, chunks, grad, hidden.new_zeros((0,), dtype=torch.float32), dim=0)


def _over_chunks(fn, chunks, grad: bool, empty: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """`fn(*args)` -> (log pi, H) for each chunk's args, concatenated along `dim` (`empty` when there
    is no chunk). With `grad`, each chunk runs under activation checkpointing: backward recomputes
    its [rows, V] softmax instead of keeping it, so only one chunk's logits live at a time."""
    from torch.utils.checkpoint import checkpoint

    logps, ents = [], []
    for args in chunks:
        lp, h = checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)
        logps.append(lp)
        ents.append(h)
    if not logps:
        return empty, empty
    return torch.cat(logps, dim=dim), torch.cat(ents, dim=dim)


def head_chunk_rows(vocab: int) -> int:
    """Positions per chunk in head_logprobs_and_entropy: one float32 [rows, V] slab = CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // max(1, 4 * vocab))


def _chunk_head_logprobs_entropy(
    hidden: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor]:
    return _chunk_logprobs_entropy(torch.nn.functional.linear(hidden, weight, bias), targets, temperature)


def _chunk_logprobs_entropy(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    token = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token, entropy
