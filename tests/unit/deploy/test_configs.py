"""deploy/configs/*.toml: every ready-made config loads and validates; the Skywork-OR1 ones carry the
paper's stage schedules (shared/reference/skywork-or1-recipe.md §4) and hyper-parameters (§1, §2, §5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config
from common.data import data_sources

CONFIGS = Path(__file__).resolve().parents[3] / "deploy" / "configs"
SCHEDULES = {  # (steps, context, batch, group) per stage
    "skywork-or1-7b.toml": [(660, 16384, 256, 16), (660, 32768, 160, 32)],
    "skywork-or1-32b.toml": [(760, 16384, 256, 16), (370, 24576, 160, 32)],
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.learner.stages and data_sources(cfg.learner.data)


@pytest.mark.parametrize("name, schedule", SCHEDULES.items())
def test_skywork_schedules(name, schedule):
    cfg = load_config(CONFIGS / name)
    lc = cfg.learner
    assert [(s.steps, s.max_response_tokens, s.prompts_per_batch, s.group_size) for s in lc.stages] == schedule
    assert lc.optim.lr == 1e-6 and lc.optim.weight_decay == 0.01 and lc.optim.grad_clip == 1.0
    assert lc.entropy.enabled and lc.entropy.target == 0.2 and lc.entropy.coef_max == 0.005
    assert lc.loss.eps_low == lc.loss.eps_high == 0.2 and lc.loss.kl_beta == 0 and lc.loss.sgd_steps == 1
    assert not lc.loss.mask_truncated and lc.loss.zero_truncated_reward
    assert lc.sampling.temperature == 1.0 and lc.sampling.top_p == 1.0 and lc.max_staleness == 0
    srcs = data_sources(lc.data)
    assert {s.kind for s in srcs} == {"math", "code"} and sum(s.weight for s in srcs) == pytest.approx(1.0)
    assert cfg.actor.max_model_len >= lc.data.max_prompt_tokens + max(s.max_response_tokens for s in lc.stages)
