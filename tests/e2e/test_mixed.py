"""Math + code in one run (learner.data.sources), with periodic eval and exported checkpoints: a
learner, two actors and a reward worker as real processes over the real bus, 10 steps of the tiny
model on toy:addition (weight 3) and toy:code (weight 1).

The tiny model writes no Python, so its code samples score 0 with the scorer's "no ```python code
block" error: their groups are all-wrong and filtered, yet they are scored, so the per-kind and
per-source metrics, and the error counts, appear in every step's record. The run still trains (the
math groups are useful) and every ledger invariant holds.
"""

from __future__ import annotations

import json

import pytest

from e2e_support import STARTUP_S, check_ledger, ledger, make_fleet, metrics, or1_cli, read_jsonl, small_config, wait_step

pytestmark = pytest.mark.slow
B, STEPS = 4, 10


def test_mixed_math_and_code_run(tmp_path, tiny_model_dir):
    cfg, path = small_config(tmp_path, tiny_model_dir, steps=STEPS, eta=1, batch=B, extra=(
        'learner.data.sources=[{path="toy:addition", weight=3}, {path="toy:code", weight=1}]',
        "learner.eval.every=5", "learner.eval.data=toy:addition", "learner.eval.limit=8", "learner.eval.samples=2",
        "learner.eval.workers=1", "learner.checkpoint_every=5", "learner.export_checkpoints=true",
    ))
    fleet = make_fleet(tmp_path, cfg, path)
    try:
        fleet.start_run()
        wait_step(fleet, STEPS, STARTUP_S * 2)
        assert fleet.wait_exit("learner", 180) == 0, fleet.tail("learner")
    finally:
        fleet.close()

    run = fleet.run_dir
    rows = metrics(fleet)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    math_steps = [r for r in rows if "reward/math/mean" in r]
    code_steps = [r for r in rows if "reward/code/mean" in r]
    # a kind is reported at a step when some of its groups were scored since the previous step
    # (with eta = 1 a batch can be ready before anything new is scored)
    assert len(math_steps) >= STEPS // 2 and len(code_steps) >= STEPS // 2, [sorted(r) for r in rows][:2]
    for r in math_steps:
        assert r["reward/addition/mean"] == r["reward/math/mean"]  # one math source
        assert 0 <= r["reward/math/pass_rate"] <= 1 and r["reward/math/response_len"] > 0
    for r in code_steps:
        assert r["reward/code/mean"] == 0.0 and r["reward/code-data/samples"] > 0
        assert r["reward/code-data/errors"] == r["reward/code-data/samples"]  # no code block, every sample
    assert sum(r["reward/errors/no_python_code_block"] for r in rows if "reward/errors/no_python_code_block" in r) > 0
    math_n = sum(r.get("reward/math/samples", 0) for r in rows)
    code_n = sum(r.get("reward/code/samples", 0) for r in rows)
    print(f"mixed run: {math_n} math and {code_n} code samples scored "
          f"(code share {code_n / (math_n + code_n):.2f}, weight share 0.25); "
          f"reward/math/mean {[round(r['reward/math/mean'], 2) for r in math_steps]}")
    assert 0.05 < code_n / (math_n + code_n) < 0.5

    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/avg@2" in r]
    assert [r["step"] for r in evals] == [5, 10], evals
    for r in evals:
        assert r["eval/problems"] == 8 and 0 <= r["eval/pass@1"] <= r["eval/pass@2"] <= 1
        assert r["eval/avg@2"] == pytest.approx(r["eval/pass@1"])  # 0/1 rewards
        assert "eval/addition/avg@2" in r
    print("eval:", [(r["step"], r["eval/avg@2"], r["eval/pass@2"]) for r in evals])

    for step in (5, 10):
        hf = run / "checkpoints" / f"step_{step:06d}" / "hf"
        assert (hf / "model.safetensors").is_file() and (hf / "tokenizer.json").is_file(), step
    res = or1_cli("export", str(run / "checkpoints" / "step_000010"), str(tmp_path / "exported"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["model_type"] == "qwen2"

    res = or1_cli("plot", str(run))
    assert res.returncode == 0 and (run / "curves.png").is_file(), res.stderr
    check_ledger(ledger(fleet), B, STEPS, eta_max=1)
