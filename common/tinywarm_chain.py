"""Warm start of the tiny model on toy:chain: supervised on worked running sums, stopped early.

The task (common/data.py `chain`): "7+1+5+9+8+7" answered " 7+1=8, 8+5=13, 13+9=22, 22+8=30, 30+7=37.
\\boxed{37}" + eos, 35–60 tokens. The format (copy the next digit, "+", "=", ", ") is learned within a
few dozen steps; the sums themselves (a two-digit running total plus a digit) take far longer. So a
clean supervised pass stopped early leaves a model that always writes the scratchpad and gets each
step's sum right most of the time, and the whole chain right only sometimes: the start RL needs
(chain-of-thought credit assignment: the reward sees the boxed answer only, and a wrong step anywhere
makes it wrong).

Algorithm: AdamW (lr 2e-3, no weight decay) on mini-batches of 25 problems (seeded epochs),
cross-entropy on every response token, checked every `every` steps on all problems: stop once the
mean exact probability of the whole right response at temperature 1 is ≥ `target_p` (0.2), or at the
step cap or the wall-clock budget (`warm/budget_hit` = 1; the result then depends on the machine's
speed, otherwise it is a deterministic function of the seed: one thread, seeded init and order).

Metrics (namespaced `warm/`): `p_correct_t1` (exact mean P(right response)), `accuracy_greedy`
(greedy reproduces the whole response), and from `samples` seeded samples per problem at temperature
1 (≤ 80 new tokens) `accuracy_t1` (the boxed answer is the sum) and `format_rate_t1` (a `\\boxed{N}`
then eos); `steps`, `budget_hit`, `seconds`, `cpu_seconds`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data import chain_steps, tokenize_prompts, toy_problems
from common.tinymodel import answer_text
from common.tinywarm import warm_session

BOXED_RE = re.compile(r"\\boxed\{(\d+)\}$")


@dataclass(frozen=True)
class ChainSchedule:
    lr: float = 2e-3
    batch: int = 25
    target_p: float = 0.2
    """Stop once the mean probability of the whole right response is at least this."""
    every: int = 10
    max_steps: int = 3000
    samples: int = 4
    max_new_tokens: int = 80
    threads: int = 1


@dataclass
class ChainBatch:
    """Prompt + worked response + eos, right-padded (`ids` [N, L]); `tgt` the response ids (-100
    elsewhere); `gold` each problem's sum."""

    ids: Any
    tgt: Any
    gold: list[int]
    pad_id: int
    eos_id: int


def make_chain_batch(tokenizer: Any) -> ChainBatch:
    import torch

    problems = toy_problems("chain")
    pairs = tokenize_prompts(problems, tokenizer)
    eos = tokenizer.eos_token_id
    rows = []
    for p, prompt in pairs:
        answer = chain_steps(p.messages[0]["content"]) + answer_text(p.reference)
        rows.append((list(prompt), tokenizer.encode(answer, add_special_tokens=False) + [eos]))
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    tgt = torch.full_like(ids, -100)
    for i, (prompt, ans) in enumerate(rows):
        lp = len(prompt)
        ids[i, : lp + len(ans)] = torch.tensor(prompt + ans)
        tgt[i, lp : lp + len(ans)] = torch.tensor(ans)
    return ChainBatch(ids, tgt, [int(p.reference) for p in problems], tokenizer.pad_token_id, eos)


def response_logprobs(model: Any, batch: ChainBatch, rows: Any = None) -> tuple[Any, Any]:
    """Per problem: log P(the whole right response) at temperature 1, and whether greedy decodes it."""
    import torch

    ids, tgt = (batch.ids, batch.tgt) if rows is None else (batch.ids[rows], batch.tgt[rows])
    logits = model(input_ids=ids).logits[:, :-1].float()
    tgt = tgt[:, 1:]
    mask = tgt != -100
    logp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    hit = (logits.argmax(-1) == tgt) | ~mask
    return (logp * mask).sum(-1), hit.all(-1)


def train(model: Any, batch: ChainBatch, s: ChainSchedule, *, gen: Any, deadline: float) -> tuple[int, bool]:
    """Supervised steps until the mean P(right response) reaches `target_p`; (steps, budget_hit)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    n = len(batch.gold)
    order = torch.empty(0, dtype=torch.long)
    for step in range(s.max_steps):
        if step % s.every == 0:
            model.eval()
            with torch.no_grad():
                lp, _ = response_logprobs(model, batch)
            if lp.exp().mean() >= s.target_p:
                return step, False
            model.train()
        if time.perf_counter() > deadline:
            return step, True
        if len(order) < s.batch:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        rows, order = order[: s.batch], order[s.batch :]
        logits = model(input_ids=batch.ids[rows]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.tgt[rows][:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return s.max_steps, False


def sample_metrics(model: Any, batch: ChainBatch, tokenizer: Any, *, samples: int, max_new_tokens: int,
                   seed: int) -> dict[str, float]:
    """Temperature-1 sampling (transformers' generate, seeded) of `samples` completions per problem,
    one generate per prompt length (the prompts of one length need no padding)."""
    import torch

    starts = [int((t != -100).nonzero()[0, 0]) for t in batch.tgt]
    fmt = right = total = 0
    torch.manual_seed(seed)
    with torch.no_grad():
        for start in sorted(set(starts)):
            rows = [i for i, s in enumerate(starts) if s == start]
            prompt = batch.ids[rows, :start].repeat_interleave(samples, 0)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=batch.pad_id,
                                 eos_token_id=batch.eos_id)
            for k, row in enumerate(out[:, start:].tolist()):
                total += 1
                if batch.eos_id not in row:
                    continue
                m = BOXED_RE.search(tokenizer.decode(row[: row.index(batch.eos_id)]))
                if m:
                    fmt += 1
                    right += int(m.group(1)) == batch.gold[rows[k // samples]]
    return {"warm/accuracy_t1": right / total, "warm/format_rate_t1": fmt / total}


def run_chain_warm_start(model_dir: Path, *, seconds: float = 120.0, seed: int = 0,
                         schedule: ChainSchedule = ChainSchedule()) -> dict[str, float]:
    """Train the folder's model as the module docstring says, save it back, return metrics."""
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    s = schedule
    with warm_session(model_dir, threads=s.threads, seed=seed) as (tokenizer, model):
        batch = make_chain_batch(tokenizer)
        steps, hit = train(model, batch, s, gen=torch.Generator().manual_seed(seed + 1), deadline=t0 + seconds)
        with torch.no_grad():
            logp, ok = response_logprobs(model, batch)
        metrics = {"warm/accuracy_greedy": ok.float().mean().item(), "warm/p_correct_t1": logp.exp().mean().item()}
        metrics |= sample_metrics(model, batch, tokenizer, samples=s.samples, max_new_tokens=s.max_new_tokens,
                                  seed=seed + 2)
    return metrics | {"warm/steps": float(steps), "warm/budget_hit": float(hit),
                      "warm/seconds": time.perf_counter() - t0, "warm/cpu_seconds": time.process_time() - c0}
