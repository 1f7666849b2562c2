"""`or1 eval` and `or1 filter`: sample k responses per problem with an actor engine and score them
with the real reward code (the same path the reward workers take).

eval   avg@k = mean reward over all samples; pass@k over problems; printed as one JSON line.
filter Skywork-OR1's offline difficulty filter (§6.2): keep problems the model solves s of N times
       with 0 < s < N (drop the ones it always or never solves); writes the kept problems as JSONL
       in the plain schema {id, prompt, kind, reference}, loadable again with --set learner.data.source=FILE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.config import Config


def sample_and_score(model: str, cfg: Config, samples: int) -> list[tuple[object, list[float]]]:
    """Every problem of cfg.learner.data → (problem, k rewards)."""
    from transformers import AutoTokenizer

    from actors.engine import make_engine
    from bus.messages import ScoreItem, SamplingSpec
    from common.data import load_problems, tokenize_prompts
    from rewards.pool import ScorePool

    lc = cfg.learner
    tok = AutoTokenizer.from_pretrained(model)
    pairs = tokenize_prompts(load_problems(lc.data), tok)
    engine = make_engine(cfg.actor.engine, model, cfg.actor)
    spec = SamplingSpec(n=samples, temperature=lc.sampling.temperature, top_p=lc.sampling.top_p,
                        max_tokens=lc.stages[-1].max_response_tokens, seed=lc.data.seed)
    try:
        outs = engine.generate([ids for _, ids in pairs], spec)
    finally:
        engine.close()
    with ScorePool(cfg.reward.workers, cfg.reward) as pool:
        futures = [[pool.submit(ScoreItem(p.kind, s.text, p.reference)) for s in group]
                   for (p, _), group in zip(pairs, outs)]
        return [(p, [f.result().reward for f in fs]) for (p, _), fs in zip(pairs, futures)]


def evaluate(model: str, cfg: Config, samples: int = 4) -> int:
    results = sample_and_score(model, cfg, samples)
    rewards = np.array([r for _, r in results], dtype=np.float64)
    print(json.dumps({"model": model, "problems": len(results), "samples": samples,
                      f"avg@{samples}": float(rewards.mean()) if rewards.size else 0.0,
                      f"pass@{samples}": float((rewards.max(axis=1) >= 1.0).mean()) if rewards.size else 0.0}))
    return 0


def offline_filter(model: str, out: str, cfg: Config, samples: int = 8) -> int:
    results = sample_and_score(model, cfg, samples)
    kept = 0
    with open(Path(out), "w") as f:
        for p, r in results:
            solved = sum(x >= 1.0 for x in r)
            if 0 < solved < samples:
                kept += 1
                f.write(json.dumps({"id": p.id, "prompt": p.messages, "kind": p.kind, "reference": p.reference}) + "\n")
    print(json.dumps({"problems": len(results), "kept": kept, "dropped": len(results) - kept, "samples": samples, "out": out}))
    return 0
