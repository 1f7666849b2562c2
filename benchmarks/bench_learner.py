"""Learner step time: `Trainer.train_step` (DeepSpeed engine) against a bare torch loop, and the
padding of length-sorted packing against arrival-order packing.

Both sides train the same model (the embedded tiny Qwen2, fp32) on the same micro-batches of one
realistic batch (8 prompts x 8 samples, prompts 16-48 tokens, responses 8-256 tokens, skewed short,
packed by learner/buffer.py at a 2048-token budget), with the same loss (token_logprobs_and_entropy
-> policy_loss over the batch's tokens) and the same update: the bare loop is forward, loss,
backward per micro-batch, then clip_grad_norm_(1.0) (DeepSpeed clips at 1.0 too) and a
torch.optim.AdamW(fused=True) step (torch's fastest on CPU); DeepSpeed runs its FusedAdam
(optim.impl=deepspeed, the default). Steps alternate between the two sides (and which goes first)
so background load hits both alike; after warm-up, medians of the step times give
ratio = DeepSpeed / bare (goal <= 1.10), same thread count for both (torch.set_num_threads).
ZeRO 0 and ZeRO 2 at world size 1, plus ZeRO 0 running torch's default AdamW inside DeepSpeed
(optim.impl=torch) for comparison.

The RESULT ratios are of this process's CPU time per step: at world size 1 nothing waits, so on an
idle machine CPU time is the wall time, while on a shared one (this machine: 2 cores, load often
above 4) wall times swing +-20 % with other people's work. Wall-clock medians and their ratio are
printed beside them.

Padding: padded positions / all positions of the packed micro-batches, learner/buffer.py's sorted
packing against the same greedy budget rule applied in arrival order.

Last line: RESULT zero0_ratio=... zero2_ratio=... goal=1.10 padding_frac_sorted=... padding_frac_unsorted=...
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GOAL = 1.10
TOKEN_BUDGET = 2048
PROMPTS, GROUP = 8, 8


def realistic_samples(seed: int = 0):
    from learner.buffer import TrainSample

    rng = np.random.default_rng(seed)
    out = []
    for g in range(PROMPTS):
        prompt = rng.integers(0, 2000, int(rng.integers(16, 49))).astype(np.int32)
        for _ in range(GROUP):
            r = int(np.clip(rng.lognormal(3.8, 0.8), 8, 256))  # long-tailed response lengths
            out.append(TrainSample(prompt_ids=prompt, response_ids=rng.integers(0, 2000, r).astype(np.int32),
                                   behaviour_logprobs=rng.uniform(-8.0, -7.0, r).astype(np.float32),
                                   advantage=float(rng.normal()), reward=0.0, truncated=False,
                                   weight_version=0, prompt_id=str(g)))
    return out


def padding_fraction(micro_batches) -> float:
    real = sum(int(mb.attention_mask.sum()) for mb in micro_batches)
    padded = sum(mb.input_ids.size for mb in micro_batches)
    return 1.0 - real / padded


def unsorted_micro_batches(samples, budget: int):
    """The same budget rule (b * longest <= budget) over samples in arrival order."""
    from learner.buffer import build_micro_batch

    groups: list[list] = []
    for s in samples:
        if groups and (len(groups[-1]) + 1) * max(s.length, *(x.length for x in groups[-1])) <= budget:
            groups[-1].append(s)
        else:
            groups.append([s])
    return [build_micro_batch(g) for g in groups]


class BareLoop:
    """forward -> loss -> backward per micro-batch, clip, AdamW: what the Trainer does, minus DeepSpeed."""

    def __init__(self, model_path: Path, cfg, temperature: float):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
        o = cfg.optim
        # fused=True: torch's fastest AdamW on CPU (the default for-loop one is ~8x slower)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                     weight_decay=o.weight_decay, fused=True)
        self.cfg, self.temperature = cfg, temperature

    def step(self, micro_batches, total_tokens: int) -> None:
        from learner.loss import LossInputs, policy_loss, token_logprobs_and_entropy

        for mb in micro_batches:
            ids = torch.from_numpy(mb.input_ids)
            logits = self.model(input_ids=ids, attention_mask=torch.from_numpy(mb.attention_mask), use_cache=False).logits[:, :-1]
            logp, ent = token_logprobs_and_entropy(logits, ids[:, 1:], self.temperature)
            cut = lambda a: torch.from_numpy(a[:, 1:])  # noqa: E731
            out = policy_loss(LossInputs(logp, ent, cut(mb.behaviour_logprobs), cut(mb.advantages), cut(mb.loss_mask)),
                              self.cfg.loss, 0.0, float(total_tokens))
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timed(fn) -> tuple[float, float]:
    """(wall s, this process's CPU s)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(model_path: Path, mbs, total: int, stage: int, impl: str, warmup: int, steps: int) -> dict[str, float]:
    """Median wall and CPU seconds per step of both sides, alternating which goes first."""
    from common.config import LearnerConfig
    from learner.trainer import Trainer

    cfg = LearnerConfig()
    cfg.trainer.zero_stage = stage
    cfg.optim.lr = 1e-5
    cfg.optim.impl = impl
    trainer = Trainer(model_path, cfg, temperature=1.0)
    bare = BareLoop(model_path, cfg, 1.0)
    sides = {"ds": lambda: trainer.train_step(mbs, total, 0.0), "bare": lambda: bare.step(mbs, total)}
    times: dict[str, list[tuple[float, float]]] = {"ds": [], "bare": []}
    for i in range(warmup + steps):
        for name in (("ds", "bare") if i % 2 == 0 else ("bare", "ds")):
            t = timed(sides[name])
            if i >= warmup:
                times[name].append(t)
    out = {f"{name}_{kind}": statistics.median(t[j] for t in ts)
           for name, ts in times.items() for j, kind in enumerate(("wall", "cpu"))}
    del trainer, bare
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from common.tinymodel import build_tiny_model
    from learner.buffer import make_micro_batches

    samples = realistic_samples()
    per_rank, pack_metrics = make_micro_batches(samples, TOKEN_BUDGET, 1)
    mbs = per_rank[0]
    total = sum(mb.n_tokens for mb in mbs)
    sorted_pad = padding_fraction(mbs)
    unsorted_pad = padding_fraction(unsorted_micro_batches(samples, TOKEN_BUDGET))
    print(f"batch: {len(samples)} samples, {sum(s.length for s in samples)} tokens, {total} loss tokens, "
          f"{len(mbs)} micro-batches (budget {TOKEN_BUDGET}), threads {args.threads}")
    print(f"padding: sorted {sorted_pad:.3f}  unsorted {unsorted_pad:.3f}")

    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model")
        for name, stage, impl in (("zero0", 0, "deepspeed"), ("zero2", 2, "deepspeed"), ("zero0_torchadam", 0, "torch")):
            t = compare(model, mbs, total, stage, impl, args.warmup, args.steps)
            ratios[name] = t["ds_cpu"] / t["bare_cpu"]
            print(f"{name:16s} cpu: deepspeed {t['ds_cpu'] * 1e3:7.1f} ms  bare {t['bare_cpu'] * 1e3:7.1f} ms  "
                  f"ratio {ratios[name]:.3f} | wall: {t['ds_wall'] * 1e3:7.1f} ms  {t['bare_wall'] * 1e3:7.1f} ms  "
                  f"ratio {t['ds_wall'] / t['bare_wall']:.3f}")
    print(f"RESULT zero0_ratio={ratios['zero0']:.3f} zero2_ratio={ratios['zero2']:.3f} goal={GOAL:.2f} "
          f"padding_frac_sorted={sorted_pad:.3f} padding_frac_unsorted={unsorted_pad:.3f}")


if __name__ == "__main__":
    main()
