"""Learner memory of log-probs and entropy for one long sequence at Qwen2.5's vocabulary (V = 151,936).

Model: a 2-layer Qwen2 with hidden 64 (4 query / 2 KV heads of 16, MLP 128, tied embeddings),
random weights built here, float32 on CPU, so the backbone is small and the vocabulary dominates.
One sequence of L = 1K, 4K, 16K tokens: a 128-token prompt and L - 128 response tokens, all in the loss.

For each L, each mode runs forward + backward once in a FRESH subprocess and reports the peak RSS
(VmHWM, reset through /proc/self/clear_refs just before the pass) minus the RSS before it:
- backbone: `model.base_model` to the final hidden states, loss = mean of the squared hidden
  states of the response positions: everything but the head (the baseline).
- chunked:  the trainer's path: `learner.trainer.scoring_forward` (the forward its engine runs)
            -> log pi and H of the loss positions -> `policy_loss` -> backward.
- full:     the old path: the model's own forward (logits [1, L, V]) -> logits[:, :-1] ->
            `token_logprobs_and_entropy` -> `policy_loss` -> backward; at 16K the logits and their
            gradient alone are 2 x 9.7 GB, more than this 24 GB machine can hold beside the rest,
            so it runs at 1K and 4K only (`--full-16k` to try anyway).
extra = peak(mode) - peak(backbone): the memory the log-probs and entropy cost. Goals: chunked
extra under 1 GB at 16K, and at most linear growth in L (extra_16k / extra_4k <= 4).

The attention mask is left out (None: causal), so the backbone runs SDPA without a [L, L] mask;
the head part, which is what is measured, is the same either way.

Last line: RESULT extra_mb_1k=... extra_mb_4k=... extra_mb_16k=... growth_4k_16k=... full_logits_mb_4k=...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB = 151_936
PROMPT = 128
LENGTHS = (1024, 4096, 16384)
GOAL_MB_16K = 1024.0
TEMPERATURE = 1.0
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=32768, tie_word_embeddings=True)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(mode: str, length: int, threads: int) -> dict:
    """One forward + backward of `mode` at `length` in this process; peak RSS over the pass."""
    import numpy as np
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from common.config import LossConfig
    from learner.loss import LossInputs, policy_loss, token_logprobs_and_entropy
    from learner.trainer import check_scorable, scoring_forward

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, **SHAPE)).float().train()
    check_scorable(model)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, VOCAB, (1, length)))
    live = torch.zeros(1, length - 1, dtype=torch.bool)
    live[:, PROMPT - 1:] = True  # targets PROMPT..L-1: the response tokens
    mask = live.float()
    mu = torch.where(live, torch.full_like(mask, -12.0), 0.0)
    adv = torch.ones(1, 1)

    def loss_of(logp, ent):
        return policy_loss(LossInputs(logp, ent, mu, adv, mask), LossConfig(), 0.003, float(mask.sum())).loss

    def step():
        if mode == "backbone":
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            loss = hidden[live].square().mean()
        elif mode == "chunked":
            with scoring_forward(model, TEMPERATURE):
                loss = loss_of(*model(ids, None, live))
        elif mode == "full":
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            loss = loss_of(*token_logprobs_and_entropy(logits, ids[:, 1:], TEMPERATURE))
        else:
            raise ValueError(f"mode must be backbone, chunked or full, got {mode!r}")
        loss.backward()
        return float(loss.detach())

    before = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    loss = step()
    took = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return {"mode": mode, "length": length, "peak_mb": (peak - before) / 1024, "seconds": took,
            "loss": loss, "hwm_reset": reset, "rss_before_mb": before / 1024}


def measure(mode: str, length: int, threads: int, timeout: float) -> dict | None:
    """run_one in a fresh interpreter (so no earlier pass's allocations count)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", mode, str(length), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"  {mode:8s} L={length:6d}: timed out after {timeout:.0f}s", flush=True)
        return None
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1:]
        print(f"  {mode:8s} L={length:6d}: failed rc={proc.returncode}: {why}", flush=True)
        return None
    r = json.loads(lines[-1])
    print(f"  {mode:8s} L={length:6d}: peak +{r['peak_mb']:8.1f} MB  {r['seconds']:6.1f}s  "
          f"loss {r['loss']:.4f}"
          + ("" if r["hwm_reset"] else "  (VmHWM not reset: peak includes model build)"), flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=2, metavar=("MODE", "L"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--full-16k", action="store_true", help="also run the full-logits path at 16K")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.threads)))
        return
    print(f"V={VOCAB}, 2-layer Qwen2 hidden 64, fp32, prompt {PROMPT}; full fp32 logits of L tokens = "
          + ", ".join(f"{L // 1024}K: {L * VOCAB * 4 / 2**20:,.0f} MB" for L in LENGTHS), flush=True)
    extra: dict[int, float] = {}
    full: dict[int, float] = {}
    for length in LENGTHS:
        base = measure("backbone", length, args.threads, args.timeout)
        chunk = measure("chunked", length, args.threads, args.timeout)
        if base and chunk:
            extra[length] = chunk["peak_mb"] - base["peak_mb"]
        if length < 16384 or args.full_16k:
            old = measure("full", length, args.threads, args.timeout)
            if base and old:
                full[length] = old["peak_mb"] - base["peak_mb"]
        line = f"L={length}: extra chunked {extra.get(length, float('nan')):.1f} MB"
        print(line + (f", full logits {full[length]:.1f} MB" if length in full else ""), flush=True)

    def mb(d: dict[int, float], k: int) -> str:
        return f"{d[k]:.0f}" if k in d else "nan"

    growth = extra[16384] / extra[4096] if 16384 in extra and extra.get(4096, 0) > 0 else float("nan")
    ok = extra.get(16384, float("inf")) < GOAL_MB_16K and growth <= 4.0
    print(f"goal: extra < {GOAL_MB_16K:.0f} MB at 16K and growth_4k_16k <= 4 (linear): "
          + ("met" if ok else "NOT met"))
    print(f"RESULT extra_mb_1k={mb(extra, 1024)} extra_mb_4k={mb(extra, 4096)} "
          f"extra_mb_16k={mb(extra, 16384)} "
          f"growth_4k_16k={growth:.2f} full_logits_mb_1k={mb(full, 1024)} full_logits_mb_4k={mb(full, 4096)} "
          f"full_logits_mb_16k={mb(full, 16384)} goal_mb_16k={GOAL_MB_16K:.0f}")


if __name__ == "__main__":
    main()
