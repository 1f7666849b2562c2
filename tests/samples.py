"""Synthetic training samples shared by the trainer tests (deterministic per seed)."""

from __future__ import annotations

import numpy as np


def train_samples(seed: int, n: int, prompt: tuple[int, int] = (2, 7), response: tuple[int, int] = (2, 10),
                  group_size: int = 1) -> list:
    """`n` TrainSamples of random lengths in [lo, hi) (prompt, response), random token ids below 2000,
    behaviour log-probs in [-8.5, -6.5) and mixed-sign advantages; samples i share the prompt (and
    prompt_id) of group i // group_size, as a GRPO group's do."""
    from learner.buffer import TrainSample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(*prompt)), int(rng.integers(*response))
        prompt_ids = rng.integers(0, 2000, p).astype(np.int32)
        if i % group_size:
            prompt_ids = out[-1].prompt_ids
        out.append(TrainSample(prompt_ids=prompt_ids,
                               response_ids=rng.integers(0, 2000, r).astype(np.int32),
                               behaviour_logprobs=rng.uniform(-8.5, -6.5, r).astype(np.float32),
                               advantage=float(rng.normal()), reward=0.0, truncated=False,
                               weight_version=0, prompt_id=str(i // group_size)))
    return out
