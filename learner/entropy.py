"""Skywork-OR1 adaptive entropy control (paper §3.2.5, Eq. 3.2; released scripts' settings).

State: the coefficient c (c_0 = `coef_init`, 0 by default) and the last measured entropy e.
After optimizer step k, with e_k the exact full-vocabulary entropy of the policy at the sampling
temperature, averaged over the step's response tokens and all-reduced across ranks::

    c_{k+1} = clip(c_k + delta, coef_min, coef_max)   if e_k < target
            = clip(c_k - delta, coef_min, coef_max)   if e_k > target
            = c_k                                     if e_k == target
    alpha_{k+1} = c_{k+1} if e_k < target else 0     (the bonus acts only below target)

alpha_{k+1} is the coefficient applied in step k+1's loss (`policy_loss(..., entropy_coef=alpha)`).
Before any measurement alpha is 0: the gate needs an entropy known to be below target (and c_0 = 0
makes this moot by default). Disabled -> alpha is always 0 and c stays at c_0.

Defaults follow the released scripts (delta 1e-4, bounds [0, 0.005], target 0.2): 50 steps below
target reach the cap. The paper's text says delta = 0.005 with no bounds; that is one config value.
The released code gates on the sampled tokens' NLL from rank 0 only; here it is the exact entropy
over all ranks (docs/training.md#entropy-control).
"""

from __future__ import annotations

import math

from common.config import EntropyConfig


class EntropyController:
    """Skywork-OR1 adaptive entropy control (paper §3.2.5 Eq. 3.2; released scripts' Δ=1e-4,
    bounds [0, 0.005]).

    Loop::

        ctl = EntropyController(cfg.learner.entropy)
        for step in ...:
            out = policy_loss(inputs, loss_cfg, entropy_coef=ctl.alpha(), total_tokens=n)
            ...  # backward, optimizer step, all-reduce the step's mean entropy
            metrics |= ctl.update(step_entropy)
    """

    def __init__(self, cfg: EntropyConfig):
        self.cfg = cfg
        self.coef: float = cfg.coef_init
        self.last_entropy: float | None = None
        self.steps: int = 0

    def alpha(self) -> float:
        """The coefficient for the next step's loss."""
        if not self.cfg.enabled or self.last_entropy is None:
            return 0.0
        return self.coef if self.last_entropy < self.cfg.target else 0.0

    def update(self, entropy: float) -> dict[str, float]:
        """Feed the finished step's mean entropy; returns the metrics for that step."""
        entropy = float(entropy)
        if not math.isfinite(entropy):
            # A non-finite entropy means a broken step upstream; moving c on it would be a guess.
            raise ValueError(f"entropy must be finite, got {entropy}")
        self.steps += 1
        if self.cfg.enabled:
            self.last_entropy = entropy
            if entropy < self.cfg.target:
                self.coef += self.cfg.delta
            elif entropy > self.cfg.target:
                self.coef -= self.cfg.delta
            self.coef = min(max(self.coef, self.cfg.coef_min), self.cfg.coef_max)
        return {"entropy/coef": self.coef, "entropy/alpha": self.alpha()}

    def state_dict(self) -> dict:
        return {"coef": self.coef, "last_entropy": self.last_entropy, "steps": self.steps}

    def load_state_dict(self, d: dict) -> None:
        self.coef = float(d["coef"])
        self.last_entropy = None if d["last_entropy"] is None else float(d["last_entropy"])
        self.steps = int(d["steps"])
