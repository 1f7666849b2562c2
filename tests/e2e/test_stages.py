"""Lengths follow the stages, end to end: a two-stage run (max_response_tokens 6, then 12) of the
tiny model with a learner, two actors and a reward worker as real processes.

* The learner derives the actors' context from the data and the stages: prompts up to
  learner.data.max_prompt_tokens (16) + the longest stage (12) = 28, announced in Welcome; the actors
  (actor.max_model_len unset) build their engines with it. The 3 prompts of the source longer than
  16 tokens (3 % of it, under learner.data.max_unusable_frac) are dropped, said at start
  (`data.prompts_too_long`) and counted in the first step's record (data/dropped_too_long).
* An actor started with actor.max_model_len = 20, less than the run needs, refuses to start
  (exit 2) naming the setting.
* Sampling follows the stage: every lease before the ledger's `stage` event asks for 6 tokens, every
  one after it for 12; with η = 0 every group of steps 1-6 was generated under the first stage and
  every group of steps 7-12 under the second, whose responses do run past 6 tokens (a two-digit sum
  is ` \\boxed{1` `2}` + end: 7 tokens, cut at 6 before the switch).
* The run finishes and its ledger closes (check_ledger).
"""

from __future__ import annotations

import json

import pytest

from common.config import save_config
from e2e_support import STARTUP_S, check_ledger, ledger, log_events, make_fleet, metrics, small_config, wait_step

pytestmark = pytest.mark.slow
B, STEPS, LONG = 4, 12, 3


def data_file(path):
    """The 100 single-digit sums, plus LONG prompts longer than 16 tokens."""
    rows = [{"prompt": f"{a}+{b}", "answer": str(a + b)} for a in range(10) for b in range(10)]
    rows += [{"prompt": " + ".join(["1"] * (12 + k)), "answer": str(12 + k)} for k in range(LONG)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_stage_run(tmp_path, tiny_model_dir):
    stages = ", ".join(f"{{steps={STEPS // 2}, max_response_tokens={r}, prompts_per_batch={B}, group_size=4}}"
                       for r in (6, 12))
    cfg, path = small_config(tmp_path, tiny_model_dir, steps=STEPS, eta=0, batch=B, extra=(
        f"learner.stages=[{stages}]", f"learner.data.source={data_file(tmp_path / 'sums.jsonl')}",
        "learner.data.max_prompt_tokens=16"))
    cfg.actor.max_model_len = None  # derived: what the learner announces
    save_config(cfg, path)
    fleet = make_fleet(tmp_path, cfg, path)
    try:
        fleet.start_run()
        fleet.start("small", "actor", "--learner", fleet.endpoint, "--worker-id", "small",
                    "--set", "actor.max_model_len=20")
        assert fleet.wait_exit("small", STARTUP_S) == 2, fleet.tail("small")
        wait_step(fleet, STEPS, STARTUP_S * 2)
        assert fleet.wait_exit("learner", 180) == 0, fleet.tail("learner")
        for a in ("actor0", "actor1"):
            assert fleet.wait_exit(a, 60) == 0, fleet.tail(a)
    finally:
        fleet.close()

    assert "actor.max_model_len = 20 is less than this run needs (28" in fleet.tail("small")
    [dropped] = log_events(fleet.log("learner"), "data.prompts_too_long")
    assert dropped["dropped"] == LONG and "learner.data.max_prompt_tokens" in dropped["set_by"]
    for a in ("actor0", "actor1"):
        [engine] = log_events(fleet.log(a), "actor.engine")
        assert engine["max_model_len"] == 28 == engine["run_needs"], engine

    rows = metrics(fleet)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[0]["data/dropped_too_long"] == LONG and rows[0]["data/prompts"] == 100
    lens = [round(r["reward/response_len"], 2) for r in rows]
    print(f"reward/response_len per step: {lens}; reward/mean {[round(r['reward/mean'], 2) for r in rows]}")
    assert max(lens[:STEPS // 2]) <= 6 and max(lens[STEPS // 2:]) > 6, lens

    events = ledger(fleet)
    [switch] = [i for i, e in enumerate(events) if e["event"] == "stage"]
    before = {e["max_tokens"] for e in events[:switch] if e["event"] == "lease"}
    after = {e["max_tokens"] for e in events[switch:] if e["event"] == "lease"}
    assert before == {6} and after == {12}, (before, after)
    check_ledger(events, B, STEPS, eta_max=0)
