"""Warm start of the tiny model on toy:addition: a short supervised pass so RL starts partly right.

Measured (docs/training.md#the-embedded-default): the warm start that helps RL most has the right
answer already the most likely one, with a flat enough distribution that temperature-1 samples are
right only ~30 % of the time: train clean labels first, then briefly on partly wrong labels. Here:

1. Clean phase: AdamW (lr 2e-3, no weight decay) on mini-batches of 25 of the 100 problems (seeded
   epochs), cross-entropy on the answer tokens ` \\boxed{a+b}<|im_end|>`, until greedy decoding is right
   on every problem and the mean exact probability of the right answer is ≥ 0.9 (checked every 10 steps).
2. Noisy phase: the same at lr 1e-4, except that the target of the answer's last digit is the
   expectation of "a fraction `noise` = 0.8 of the labels replaced by a uniformly drawn wrong sum with as
   many digits": 1 − noise on the right digit and noise / (k − 1) on each of the k − 1 other digits of its
   class (0–9 for a one-digit sum; 0–8 after the "1" of a two-digit one) — but only for problems whose
   right digit is still above `floor` = 0.3; below it the target is the right digit again. The phase
   stops once the mean exact P(right answer) at temperature 1 is ≤ `target_p` = 0.35 and greedy is right
   on ≥ 95 % of the problems (checked every 2 steps).
   Why each piece (all measured on this model): sampled wrong labels instead of their expectation, and
   the expectation without the floor, both flatten unevenly — some problems fall to P(right) ≈ 0.01
   under a wrong digit (often an operand) while others stay sharp, so greedy accuracy drops to 0.5–0.8 at
   the same mean; with the floor every problem settles near 0.3 (min ≈ 0.2) and greedy stays ≈ 1. Wrong
   sums keep the digit count because with sums drawn from all of 0–18 half the noise of a one-digit sum
   starts with the token "1" and outvotes the right digit token by token. Flattening by temperature
   (scaling the final norm) is no alternative: it spreads mass over the whole vocabulary and the format
   breaks (6 % well formed at T = 2).
Both phases end early if the wall-clock budget runs out (`warm/budget_hit` = 1; the result then depends on
the machine's speed; otherwise it is a deterministic function of the seed: one thread, seeded init and
order, seeded sampling).

Metrics (namespaced `warm/`): `accuracy_greedy` (exact: greedy is right iff the right token is the argmax
at every answer position), `p_correct_t1` (exact mean probability of the right answer at temperature 1),
and from 16 seeded samples per problem at temperature 1 (≤ 8 new tokens) `accuracy_t1` (well formed and
right) and `format_rate_t1` (` \\boxed{<digits>}` then eos); `clean_steps`, `noisy_steps`, `budget_hit`,
`seconds` (wall clock) and `cpu_seconds` (the cost on an idle core; one thread).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data import toy_problems
from common.tinymodel import answer_text

ANSWER_RE = re.compile(r"^ \\boxed\{(\d+)\}$")


@dataclass(frozen=True)
class WarmSchedule:
    lr_clean: float = 2e-3
    lr_noisy: float = 1e-4
    batch: int = 25
    """Problems per step; each epoch visits all 100 in a seeded order."""
    clean_greedy: float = 1.0
    """Clean phase ends once greedy accuracy reaches this …"""
    clean_p: float = 0.9
    """… and the mean probability of the right answer this."""
    noise: float = 0.8
    """Share of the last digit's target moved to the other digits in the noisy phase."""
    floor: float = 0.3
    """Problems whose right digit is at most this train on the clean label in the noisy phase."""
    target_p: float = 0.35
    """Noisy phase ends once the mean probability of the right answer is at most this …"""
    noisy_greedy: float = 0.95
    """… and greedy accuracy at least this."""
    clean_every: int = 10
    noisy_every: int = 2
    max_clean_steps: int = 2000
    max_noisy_steps: int = 400
    clean_share: float = 0.7
    """Share of the wall-clock budget the clean phase may use."""
    samples: int = 16
    """Samples per problem for the temperature-1 metrics."""
    max_new_tokens: int = 8
    threads: int = 1


@dataclass
class ToyBatch:
    """The 100 addition problems as right-padded prompt + right answer (`ids` [100, L]), the targets
    (`tgt`, -100 off the answer), the position in `tgt` of each answer's last digit (`digit_pos`), the
    token ids of the digits 0–9 (`digit_ids`), and each problem's sum (`gold`)."""

    ids: Any
    tgt: Any
    digit_pos: Any
    digit_ids: Any
    gold: Any
    prompt_len: int
    pad_id: int
    eos_id: int


def make_batch(tokenizer: Any) -> ToyBatch:
    import torch

    from common.data import tokenize_prompts

    problems = toy_problems("addition")
    pairs = tokenize_prompts(problems, tokenizer)
    if len({len(ids) for _, ids in pairs}) != 1:
        raise ValueError("toy:addition prompts must all have the same token length")
    lp, eos = len(pairs[0][1]), tokenizer.eos_token_id
    digit_ids = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
    answers = [tokenizer.encode(answer_text(p.reference), add_special_tokens=False) + [eos] for p in problems]
    width = lp + max(map(len, answers))
    ids = torch.full((len(problems), width), tokenizer.pad_token_id, dtype=torch.long)
    tgt = torch.full_like(ids, -100)
    digit_pos = torch.empty(len(problems), dtype=torch.long)
    for i, ((_, prompt), ans) in enumerate(zip(pairs, answers)):
        ids[i, :lp] = torch.as_tensor(prompt, dtype=torch.long)
        ids[i, lp : lp + len(ans)] = torch.tensor(ans)
        tgt[i, lp : lp + len(ans)] = torch.tensor(ans)
        digit_pos[i] = lp + len(ans) - 3  # ..., last digit, "}", eos
        if ans[-3] != digit_ids[int(problems[i].reference) % 10]:
            raise ValueError(f"unexpected tokenization of the answer {answer_text(problems[i].reference)!r}")
    gold = torch.tensor([int(p.reference) for p in problems], dtype=torch.long)
    return ToyBatch(ids, tgt, digit_pos, digit_ids, gold, lp, tokenizer.pad_token_id, eos)


def answer_loss(model: Any, batch: ToyBatch, rows: Any, noise: float, floor: float = 0.0) -> Any:
    """Mean cross-entropy over the answer tokens of `rows`; at each last digit whose probability is
    above `floor` the target puts 1 − noise on the right digit and spreads `noise` evenly over the other
    digits of its class (below `floor` the target stays the right digit, pulling it back up)."""
    import torch

    logits = model(input_ids=batch.ids[rows]).logits[:, :-1]
    tgt = batch.tgt[rows][:, 1:]
    mask = tgt != -100
    logp = torch.log_softmax(logits.float(), -1)
    nll = -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if noise > 0:
        r = torch.arange(len(rows))
        at = batch.digit_pos[rows] - 1  # shifted: logits at t predict token t + 1
        gold = batch.gold[rows]
        k = torch.where(gold >= 10, 9, 10)  # digits of the class: 0–8 after "1", else 0–9
        digits_lp = logp[r, at][:, batch.digit_ids]  # [rows, 10]
        in_class = torch.arange(10)[None, :] < k[:, None]
        right = torch.nn.functional.one_hot(gold % 10, 10).bool()
        target = torch.where(right, 1 - noise, noise / (k[:, None] - 1)) * in_class
        above = (digits_lp.detach().exp() * right).sum(-1) > floor
        target = torch.where(above[:, None], target, right.float())
        nll[r, at] = -(target * digits_lp).sum(-1)
    return (nll * mask).sum() / mask.sum()


def answer_logprobs(model: Any, batch: ToyBatch) -> tuple[Any, Any]:
    """Per problem: log P(right answer) at temperature 1, and whether greedy decodes it."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch.ids).logits[:, :-1].float()
    tgt = batch.tgt[:, 1:]
    mask = tgt != -100
    logp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    hit = (logits.argmax(-1) == tgt) | ~mask
    return (logp * mask).sum(-1), hit.all(-1)


@dataclass(frozen=True)
class Phase:
    """One training phase: AdamW at `lr` until `stop(logp_right, greedy_ok)` holds at a check (every
    `every` steps), `max_steps` or the deadline; `noise`/`floor` as in `answer_loss`."""

    lr: float
    stop: Callable[[Any, Any], bool]
    every: int
    max_steps: int
    noise: float = 0.0
    floor: float = 0.0


def clean_phase(s: WarmSchedule) -> Phase:
    def stop(lp: Any, ok: Any) -> bool:
        return bool(ok.float().mean() >= s.clean_greedy and lp.exp().mean() >= s.clean_p)

    return Phase(s.lr_clean, stop, s.clean_every, s.max_clean_steps)


def noisy_phase(s: WarmSchedule) -> Phase:
    def stop(lp: Any, ok: Any) -> bool:
        return bool(lp.exp().mean() <= s.target_p and ok.float().mean() >= s.noisy_greedy)

    return Phase(s.lr_noisy, stop, s.noisy_every, s.max_noisy_steps, noise=s.noise, floor=s.floor)


def train_phase(model: Any, batch: ToyBatch, phase: Phase, *, size: int, gen: Any, deadline: float) -> tuple[int, bool]:
    """Run `phase` on mini-batches of `size` problems (seeded epochs); returns (steps, budget_hit)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=phase.lr, weight_decay=0.0)
    n = len(batch.gold)
    order = torch.empty(0, dtype=torch.long)
    for step in range(phase.max_steps):
        if step % phase.every == 0:
            model.eval()
            if phase.stop(*answer_logprobs(model, batch)):
                return step, False
            model.train()
        if time.perf_counter() > deadline:
            return step, True
        if len(order) < size:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        rows, order = order[:size], order[size:]
        loss = answer_loss(model, batch, rows, phase.noise, phase.floor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return phase.max_steps, False


def sample_metrics(
    model: Any, batch: ToyBatch, tokenizer: Any, *, samples: int, max_new_tokens: int, seed: int
) -> dict[str, float]:
    """Temperature-1 sampling (KV cache, seeded) of `samples` completions per problem."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    step_in = batch.ids[:, : batch.prompt_len].repeat_interleave(samples, 0)
    gold = batch.gold.repeat_interleave(samples, 0).tolist()
    out = torch.empty((len(step_in), 0), dtype=torch.long)
    done = torch.zeros(len(step_in), dtype=torch.bool)
    past = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            res = model(input_ids=step_in, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = torch.multinomial(torch.softmax(res.logits[:, -1].float(), -1), 1, generator=gen).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, batch.pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == batch.eos_id
            if bool(done.all()):
                break
            step_in = nxt[:, None]
    fmt = right = 0
    for row, g, finished in zip(out.tolist(), gold, done.tolist()):
        m = ANSWER_RE.match(tokenizer.decode(row[: row.index(batch.eos_id)])) if finished else None
        if m:
            fmt += 1
            right += int(m.group(1)) == g
    return {"warm/accuracy_t1": right / len(gold), "warm/format_rate_t1": fmt / len(gold)}


@contextmanager
def warm_session(model_dir: Path, *, threads: int, seed: int) -> Iterator[tuple[Any, Any]]:
    """The frame of a warm start (this one and common/tinywarm_chain.py's): `threads` torch threads
    and a forked RNG seeded with `seed` while it runs, the folder's tokenizer and float32 model, the
    model saved back into the folder when the block ends without an error."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
            yield tokenizer, model
        model.save_pretrained(str(model_dir), safe_serialization=True)
    finally:
        torch.set_num_threads(saved)


def run_warm_start(
    model_dir: Path, *, seconds: float = 20.0, seed: int = 0, schedule: WarmSchedule = WarmSchedule()
) -> dict[str, float]:
    """Train the folder's model as described in the module docstring, save it back, return metrics."""
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    s = schedule
    with warm_session(model_dir, threads=s.threads, seed=seed) as (tokenizer, model):
        batch = make_batch(tokenizer)
        gen = torch.Generator().manual_seed(seed + 1)
        clean_end = t0 + s.clean_share * seconds
        clean_steps, hit1 = train_phase(model, batch, clean_phase(s), size=s.batch, gen=gen, deadline=clean_end)
        noisy_steps, hit2 = train_phase(model, batch, noisy_phase(s), size=s.batch, gen=gen, deadline=t0 + seconds)
        logp, ok = answer_logprobs(model, batch)
        metrics = {"warm/accuracy_greedy": ok.float().mean().item()}
        metrics["warm/p_correct_t1"] = logp.exp().mean().item()
        metrics |= sample_metrics(
            model, batch, tokenizer, samples=s.samples, max_new_tokens=s.max_new_tokens, seed=seed + 2
        )
    metrics |= {
        "warm/clean_steps": float(clean_steps),
        "warm/noisy_steps": float(noisy_steps),
        "warm/budget_hit": float(hit1 or hit2),
        "warm/seconds": time.perf_counter() - t0,
        "warm/cpu_seconds": time.process_time() - c0,
    }
    return metrics
