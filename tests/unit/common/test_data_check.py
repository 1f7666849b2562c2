"""common/data.py: several sources, the pre-flight check (references parsed by the scorer's own
parsing, prompts tokenized and measured) and the learner's refusal; `or1 check-data` on top."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bus.messages import ScoreItem
from common.config import ConfigError, DataConfig, RewardConfig, load_config
from common.data import (
    DataError, data_sources, load_problems, math_reference, prepare, row_to_problem, training_prompts, unusable_error,
)
from rewards.core import score_one

ROOT = Path(__file__).resolve().parents[3]


class CharTokenizer:
    """One token per character of a fixed template (pure logic: no model needed)."""

    chat_template = "chars"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return [ord(c) for c in "".join(m["content"] for m in messages)]


def sky(i, kind, gt, content="q"):
    return {"data_source": f"train-{kind}", "prompt": [{"role": "user", "content": content}], "ability": kind,
            "reward_model": {"ground_truth": gt if isinstance(gt, str) else json.dumps(gt)}, "extra_info": {"index": i}}


def messy_file(path: Path) -> Path:
    """10 rows: 4 usable, 5 unparseable (each for another reason), 1 too long."""
    rows = [
        json.dumps(sky(0, "math", ["4", "four"])),
        json.dumps(sky(1, "code", {"inputs": ["1\n"], "outputs": ["1\n"]})),
        json.dumps(sky(2, "code", {"fn_name": "f", "inputs": [[1]], "outputs": [1]})),
        json.dumps(sky(3, "code", {"test_code": "def check(candidate):\n    assert candidate(1) == 2\n",
                                   "entry_point": "Solution().f", "import_prefix": ""})),
        "{not json",
        json.dumps(sky(5, "code", "not a json spec")),
        json.dumps(sky(6, "code", {"tests": [1, 2]})),  # no known format
        json.dumps(sky(7, "code", {"test": "def check(candidate):\n    pass\n", "entry_point": "f"})),  # checks nothing
        json.dumps(sky(8, "math", [])),
        json.dumps(sky(9, "math", ["1"], content="x" * 500)),
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_math_lists_are_any_of_in_training_as_in_scoring():
    ref = row_to_problem(sky(0, "math", ["5", "five", "\\frac{10}{2}"]), "d").reference
    for answer in ("5", "five", "\\frac{10}{2}"):
        assert score_one(ScoreItem("math", f"\\boxed{{{answer}}}", ref), RewardConfig()).reward == 1.0, answer
    assert score_one(ScoreItem("math", "\\boxed{6}", ref), RewardConfig()).reward == 0.0
    assert math_reference('["7"]') == "7" and math_reference(3) == "3"


def test_sources_named_and_weighted():
    cfg = DataConfig(sources=[{"path": "toy:addition", "weight": 3}, {"path": "toy:code", "weight": 1},
                              {"path": "toy:addition", "name": "again", "limit": 5}])
    srcs = data_sources(cfg)
    assert [(s.name, s.weight) for s in srcs] == [("addition", 3.0), ("code-data", 1.0), ("again", 1.0)]
    problems = load_problems(cfg)
    assert len(problems) == 100 + 5 + 5 and len({p.id for p in problems}) == 110
    assert {p.source for p in problems} == {"addition", "code-data", "again"}
    assert all(p.kind == "code" for p in problems if p.source == "code-data")
    assert data_sources(DataConfig())[0].name == "addition"  # the short form still works
    with pytest.raises(ConfigError, match="not both"):
        load_config(overrides=["learner.data.source=x.jsonl", 'learner.data.sources=[{path="toy:code"}]'])
    with pytest.raises(ConfigError, match="reserved"):
        load_config(overrides=['learner.data.sources=[{path="toy:code", name="code"}]'])


def test_source_kind_applies_to_rows_without_one(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"prompt": "p", "reference": {"inputs": ["1"], "outputs": ["1"]}}) + "\n"
                    + json.dumps({"prompt": "p", "kind": "math", "answer": "1"}) + "\n")
    cfg = DataConfig(sources=[{"path": str(path), "kind": "code"}])
    prepared = prepare(cfg, CharTokenizer(), None)
    assert [p.kind for p, _ in prepared.pairs] == ["code"]
    assert "differs from the source's kind" in next(iter(prepared.reports[0].reasons))


def test_prepare_counts_per_source_and_kind(tmp_path):
    cfg = DataConfig(sources=[{"path": "toy:addition"}, {"path": str(messy_file(tmp_path / "messy.jsonl"))}])
    prepared = prepare(cfg, CharTokenizer(), max_prompt_tokens=100)
    toy, messy = prepared.reports
    assert toy.rows == 100 and toy.total("usable") == 100 and toy.unusable_frac == 0
    assert messy.rows == 10
    assert dict(messy.counts["math"]) == {"usable": 1, "unparseable": 1, "too_long": 1}
    assert dict(messy.counts["code"]) == {"usable": 3, "unparseable": 3}
    assert dict(messy.counts["unknown"]) == {"unparseable": 1}  # the line that is not JSON
    reasons = " | ".join(messy.reasons)
    for why in ("not JSON", "reference is not JSON", "none of the known formats", "checks nothing",
                "empty list", "longer than 100 tokens"):
        assert why in reasons, why
    assert messy.unusable_frac == pytest.approx(0.6)
    assert len(prepared.pairs) == 104
    why = unusable_error(prepared, 0.05)
    assert "messy: 6 of 10 rows unusable" in why and "learner.data.allow_unusable = true" in why
    assert "addition" not in why.split("unusable):", 1)[1]


def test_learner_refuses_unless_allowed(tmp_path):
    messy = messy_file(tmp_path / "messy.jsonl")
    cfg = load_config(overrides=[f'learner.data.sources=[{{path="toy:addition"}}, {{path="{messy}"}}]',
                                 "actor.max_model_len=1124"])  # 100 prompt tokens after the 1024 of the stage
    with pytest.raises(DataError, match="allow_unusable"):
        training_prompts(cfg, CharTokenizer())
    cfg.learner.data.allow_unusable = True
    assert len(training_prompts(cfg, CharTokenizer())) == 104
    cfg.learner.data.allow_unusable = False
    cfg.learner.data.max_unusable_frac = 0.7
    assert len(training_prompts(cfg, CharTokenizer())) == 104


def or1(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_or1_check_data(tiny_model_dir, tmp_path):
    messy = messy_file(tmp_path / "messy.jsonl")
    config = tmp_path / "run.toml"
    config.write_text(f'[learner]\nmodel = "{tiny_model_dir}"\n[[learner.data.sources]]\npath = "toy:addition"\n'
                      f'[[learner.data.sources]]\npath = "{messy}"\nweight = 0.5\n[actor]\nmax_model_len = 1200\n')
    res = or1("check-data", str(config), "--json")
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["learner_starts"] is False and "allow_unusable" in doc["error"]
    assert doc["sources"]["messy"]["code"] == {"usable": 3, "unparseable": 3, "too_long": 0}
    assert doc["sources"]["addition"]["math"]["usable"] == 100
    res = or1("check-data", str(config), "--set", "learner.data.allow_unusable=true")
    assert res.returncode == 0, res.stderr
    assert "messy" in res.stdout and "unparseable" in res.stdout
