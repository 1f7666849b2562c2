"""Evaluation: sample n responses per problem, score them with the reward code, report avg@n and the
unbiased pass@k per data source; and the learner's periodic validation (`Evaluator`).

Metrics, for n samples of a problem of which c are solved (reward >= SOLVED_REWARD):

    avg@n   mean reward over the problem's n samples, averaged over problems (pass@1 for 0/1 rewards)
    pass@k  1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1: the chance that k of the n samples,
            drawn without replacement, hold a solved one), averaged over problems; k ≤ n. Computed as
            1 - Π_{i=n-c+1..n} (1 - k/i), without the binomials (which overflow floats by n ~ 1000),
            and 1 when n - c < k.

Rewards are the training ones: `rewards.pool.ScorePool` (the reward workers' code), and a truncated
response scores 0 when `learner.loss.zero_truncated_reward` (as in training).

Periodic validation (`learner.eval.every`): rank 0 of the learner generates with its current weights
in-process — the exported state dict loaded into a transformers model (`actors.hf_engine.HFEngine`,
on the learner's device) — and scores with its own small ScorePool. This is the simplest design that
is exactly "the current weights": no lease to actors, no version bookkeeping, no second bus path. The
price: training pauses for the eval (ranks > 0 wait in their broadcast, actors keep generating into
the buffer) and rank 0 holds a second copy of the model. So keep eval sets small (a few dozen problems)
and, for full benchmarks, export checkpoints (`learner.export_checkpoints`) and run `or1 eval` on them.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from bus.messages import SamplingSpec, ScoreItem
from learner.advantage import SOLVED_REWARD, shape_reward

if TYPE_CHECKING:
    from common.config import Config
    from common.data import Problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c of n samples solved (see the module docstring)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, … up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [n]


def summarize(rewards: Sequence[Sequence[float]], ks: Sequence[int]) -> dict[str, float]:
    """{"problems", "avg@n", "pass@k" for each k} over problems of n rewards each."""
    r = [np.asarray(x, dtype=np.float64) for x in rewards]
    if not r:
        return {"problems": 0}
    n = len(r[0])
    if any(len(x) != n for x in r):
        raise ValueError("every problem needs the same number of samples")
    out: dict[str, float] = {"problems": len(r), f"avg@{n}": float(np.mean([x.mean() for x in r]))}
    solved = [int(np.sum(x >= SOLVED_REWARD)) for x in r]
    for k in ks:
        if k > n:
            raise ValueError(f"pass@{k} needs at least {k} samples per problem, have {n}")
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in solved]))
    return out


def summarize_by_source(results: Sequence[tuple["Problem", Sequence[float]]], ks: Sequence[int]) -> dict[str, Any]:
    """{"overall": summary, "sources": {data_source: summary}} (see `summarize`)."""
    groups: dict[str, list[Sequence[float]]] = defaultdict(list)
    for p, r in results:
        groups[p.data_source or p.source or "data"].append(r)
    return {"overall": summarize([r for _, r in results], ks),
            "sources": {name: summarize(rs, ks) for name, rs in sorted(groups.items())}}


def generate_and_score(engine: Any, pairs: Sequence[tuple["Problem", np.ndarray]], samples: dict[str, int],
                       spec: SamplingSpec, pool: Any, zero_truncated_reward: bool = True
                       ) -> list[tuple["Problem", list[float], list[Any]]]:
    """For each problem: its rewards and samples. `samples` gives n per kind ({"math": 16, "code": 8});
    problems are generated kind by kind, each with `spec` at that n."""
    out: dict[int, tuple[list[float], list[Any]]] = {}
    for kind, n in samples.items():
        idx = [i for i, (p, _) in enumerate(pairs) if p.kind == kind]
        if not idx:
            continue
        groups = engine.generate([pairs[i][1] for i in idx], SamplingSpec(n=n, temperature=spec.temperature,
                                 top_p=spec.top_p, max_tokens=spec.max_tokens, seed=spec.seed))
        futures = [[pool.submit(ScoreItem(pairs[i][0].kind, s.text, pairs[i][0].reference)) for s in group]
                   for i, group in zip(idx, groups)]
        for i, group, fs in zip(idx, groups, futures):
            rewards = [shape_reward(f.result().reward, s.finish_reason, zero_truncated_reward)
                       for s, f in zip(group, fs)]
            out[i] = (rewards, group)
    return [(pairs[i][0], *out[i]) for i in sorted(out)]


class Evaluator:
    """The learner's periodic validation (see the module docstring). Build on rank 0 only."""

    def __init__(self, cfg: "Config", model_path: str, tokenizer: Any):
        from common.config import DataConfig
        from common.data import load_problems, tokenize_prompts

        lc, ec = cfg.learner, cfg.learner.eval
        self.cfg, self.model_path = cfg, model_path
        self.max_tokens = ec.max_tokens or max(s.max_response_tokens for s in lc.stages)
        data = DataConfig(source=ec.data, split=ec.split, limit=ec.limit, prompt_suffix=lc.data.prompt_suffix)
        from actors.engine import model_context_len

        context = cfg.actor.max_model_len or model_context_len(model_path) or 0  # what its HFEngine gets
        room = max(1, context - self.max_tokens)
        self.pairs = tokenize_prompts(load_problems(data), tokenizer, max_prompt_tokens=room)
        if not self.pairs:
            from common.data import DataError

            raise DataError(f"learner.eval.data {ec.data!r}: no prompt fits in {room} tokens (context "
                            f"{context}: actor.max_model_len or the model's, less {self.max_tokens} "
                            "response tokens)")
        self.ks = default_ks(ec.samples)
        self._engine: Any = None
        self._pool: Any = None

    def due(self, version: int) -> bool:
        every = self.cfg.learner.eval.every
        return bool(every) and version > 0 and version % every == 0

    def run(self, ranks: Any, version: int) -> dict[str, float]:
        """Evaluate the current weights of `ranks` (learner.dist.RankGroup: all ranks take part in
        the export); eval/* metrics."""
        from learner.export import arrays_to_tensors

        t0 = time.perf_counter()
        lc, ec = self.cfg.learner, self.cfg.learner.eval
        exported = ranks.export_weights(lc.trainer.weights_dtype)
        engine, pool = self._resources()
        engine.load_weights(arrays_to_tensors(exported).items(), version)
        del exported
        spec = SamplingSpec(n=ec.samples, temperature=ec.temperature or lc.sampling.temperature,
                            top_p=lc.sampling.top_p, max_tokens=self.max_tokens, seed=lc.data.seed + version)
        results = generate_and_score(engine, self.pairs, {"math": ec.samples, "code": ec.samples}, spec, pool,
                                     lc.loss.zero_truncated_reward)
        summary = summarize_by_source([(p, r) for p, r, _ in results], self.ks)
        metrics = {f"eval/{k}": float(v) for k, v in summary["overall"].items()}
        for name, s in summary["sources"].items():
            name = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)  # one path segment of the metric key
            metrics.update({f"eval/{name}/{k}": float(v) for k, v in s.items() if k != "problems"})
        lengths = [len(s.token_ids) for _, _, group in results for s in group]
        metrics["eval/response_len"] = float(np.mean(lengths)) if lengths else 0.0
        metrics["eval/time_s"] = time.perf_counter() - t0
        return metrics

    def _resources(self) -> tuple[Any, Any]:
        if self._engine is None:
            from actors.hf_engine import HFEngine
            from rewards.pool import ScorePool

            self._engine = HFEngine(self.model_path, self.cfg.actor)
            self._pool = ScorePool(self.cfg.learner.eval.workers, self.cfg.reward)
        return self._engine, self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._engine is not None:
            self._engine.close()
        self._engine = self._pool = None
