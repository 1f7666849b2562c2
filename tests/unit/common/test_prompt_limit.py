"""Lengths follow the stages: the longest prompt a run takes (`prompt_limit`), the context its actors
then need (`run_context`), and prompts too long for it counted, announced and refused past
learner.data.max_unusable_frac with the setting to change (`training_data`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.config import load_config
from common.data import DataError, Problem, prompt_limit, run_context, training_data, unusable_error


class CharTokenizer:
    """One token per character of the user text plus 2 (the template's wrapper)."""

    chat_template = "x"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [1] + [ord(c) % 100 + 3 for c in messages[-1]["content"]] + [2]


def cfg_with(*sets: str, stages=((5, 64), (5, 256))):
    text = ", ".join(f"{{steps={s}, max_response_tokens={r}, prompts_per_batch=2, group_size=2}}"
                     for s, r in stages)
    return load_config(overrides=[f"learner.stages=[{text}]", *sets])


def test_nothing_set_means_no_limit_and_the_longest_prompt_decides_the_context():
    cfg = cfg_with()
    assert prompt_limit(cfg).tokens is None
    pairs = [(Problem(str(n), [], "math", "1"), np.zeros(n, np.int32)) for n in (7, 30, 12)]
    assert run_context(cfg, pairs) == 256 + 30  # longest stage + longest prompt


def test_the_tightest_bound_wins_and_is_named():
    cfg = cfg_with("learner.data.max_prompt_tokens=100")
    lim = prompt_limit(cfg, model_len=4096)
    assert lim.tokens == 100 and lim.setting == "learner.data.max_prompt_tokens"
    assert run_context(cfg, []) == 356

    cfg = cfg_with("learner.data.max_prompt_tokens=100", "actor.max_model_len=300")
    lim = prompt_limit(cfg, model_len=4096)
    assert lim.tokens == 44 and "actor.max_model_len (300)" in lim.setting and "unset it" in lim.fix
    assert run_context(cfg, []) == 300  # a set actor.max_model_len is what the run gets

    lim = prompt_limit(cfg_with(), model_len=290)
    assert lim.tokens == 34 and "model's context (290" in lim.setting and "max_response_tokens" in lim.fix


def test_no_room_for_any_prompt_is_an_error_naming_the_setting():
    with pytest.raises(DataError, match=r"actor.max_model_len \(200\).*leaves -56"):
        prompt_limit(cfg_with("actor.max_model_len=200"))
    with pytest.raises(DataError, match="model's context"):
        prompt_limit(cfg_with(), model_len=256)


def rows(tmp_path, lengths):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": "q" * n, "answer": "1"}) + "\n" for n in lengths))
    return path


def test_too_long_prompts_are_counted_and_announced(tmp_path, capsys):
    path = rows(tmp_path, [10] * 97 + [50] * 3)  # 3 % too long for 40 tokens (prompt = n + 2)
    cfg = cfg_with(f"learner.data.source={path}", "learner.data.max_prompt_tokens=40")
    data = training_data(cfg, CharTokenizer())
    assert len(data.pairs) == 97
    m = data.metrics()
    assert m["data/dropped_too_long"] == 3 and m["data/prompts"] == 97 and m["data/unparseable"] == 0
    err = capsys.readouterr()
    said = err.out + err.err
    assert "data.prompts_too_long" in said and "learner.data.max_prompt_tokens" in said
    assert run_context(cfg, data.pairs) == 256 + 40


def test_more_than_max_unusable_frac_too_long_refuses_naming_the_setting(tmp_path):
    path = rows(tmp_path, [10] * 90 + [50] * 10)  # 10 % > 5 %
    cfg = cfg_with(f"learner.data.source={path}", "actor.max_model_len=296")  # 40 after the 256-token stage
    with pytest.raises(DataError) as e:
        training_data(cfg, CharTokenizer())
    why = str(e.value)
    assert "10 prompts are longer than 40 tokens" in why and "raise actor.max_model_len, or unset it" in why
    cfg.learner.data.max_unusable_frac = 0.2
    assert len(training_data(cfg, CharTokenizer()).pairs) == 90
    # no limit at all (nothing set, no model context): every prompt fits
    cfg = cfg_with(f"learner.data.source={path}")
    data = training_data(cfg, CharTokenizer())
    assert len(data.pairs) == 100 and not unusable_error(data, 0.05)
    assert run_context(cfg, data.pairs) == 256 + 52
