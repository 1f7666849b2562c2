"""common/data.py: toy sets, the Skywork-OR1 and plain schemas through real `datasets` loading of
jsonl/json/parquet files, suffixes, ids, bad rows, and tokenize_prompts through a chat template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.config import DataConfig
from common.data import DataError, Problem, load_problems, row_to_problem, tokenize_prompts, toy_problems, with_suffix

SKYWORK_SAMPLE = Path(__file__).resolve().parents[3] / "common" / "toydata" / "skywork_sample.jsonl"


def test_toy_addition_is_every_single_digit_sum_in_seeded_order():
    probs = toy_problems("addition")
    assert len(probs) == 100 and len({p.id for p in probs}) == 100
    by_id = {p.id: p for p in probs}
    assert by_id["add-3+4"].messages == [{"role": "user", "content": "3+4"}]
    assert by_id["add-3+4"].reference == "7" and by_id["add-9+9"].reference == "18"
    assert all(p.kind == "math" for p in probs)
    assert [p.id for p in toy_problems("addition", seed=0)] == [p.id for p in probs]
    assert [p.id for p in toy_problems("addition", seed=1)] != [p.id for p in probs]
    assert len(toy_problems("addition", n=7)) == 7


def test_toy_code_specs_are_consistent_stdin_stdout_tests():
    probs = toy_problems("code")
    assert {p.kind for p in probs} == {"code"}
    total = next(p for p in probs if p.id == "code-sum")
    spec = json.loads(total.reference)
    assert len(spec["inputs"]) == len(spec["outputs"]) == 3
    for inp, out in zip(spec["inputs"], spec["outputs"]):
        a, b = map(int, inp.split())
        assert out == f"{a + b}\n"


def test_toy_chain_is_running_sums_worked_step_by_step():
    from bus.messages import ScoreItem
    from common.config import RewardConfig
    from common.data import chain_steps
    from common.tinymodel import answer_text
    from rewards.core import score_one

    probs = toy_problems("chain")
    assert len(probs) == 200 and len({p.id for p in probs}) == 200
    for p in probs:
        terms = [int(t) for t in p.messages[0]["content"].split("+")]
        assert 5 <= len(terms) <= 7 and all(1 <= t <= 9 for t in terms) and p.reference == str(sum(terms))
        assert p.kind == "math" and p.id == f"chain-{p.messages[0]['content']}"
    assert chain_steps("7+1+5") == " 7+1=8, 8+5=13."
    worked = chain_steps(probs[0].messages[0]["content"]) + answer_text(probs[0].reference)
    assert score_one(ScoreItem("math", worked, probs[0].reference), RewardConfig()).reward == 1.0
    other = toy_problems("chain", seed=1)  # the same set (the warm start's), in another order
    assert [p.id for p in other] != [p.id for p in probs] and {p.id for p in other} == {p.id for p in probs}


def test_unknown_toy_set_is_a_clear_error():
    with pytest.raises(DataError, match="unknown toy set 'nope'"):
        load_problems(DataConfig(source="toy:nope"))


def test_load_toy_with_limit_and_suffix():
    probs = load_problems(DataConfig(source="toy:addition", limit=5, prompt_suffix="Answer in \\boxed{}."))
    assert len(probs) == 5
    assert all(p.messages[-1]["content"].endswith(" Answer in \\boxed{}.") for p in probs)
    # the built-in set itself is not mutated by the suffix
    assert all("boxed" not in p.messages[-1]["content"] for p in toy_problems("addition"))


def test_skywork_schema_from_shipped_sample():
    probs = load_problems(DataConfig(source=str(SKYWORK_SAMPLE)))
    assert len(probs) == 10
    by_id = {p.id: p for p in probs}
    p = by_id["train-math-numinamath1.5_olympiads-1042"]
    assert p.kind == "math" and p.reference == "8"
    assert p.messages[0]["role"] == "user" and "gcd" in p.messages[0]["content"]
    assert by_id["train-math-omnimath-415"].reference == "6\\sqrt{3}"
    assert by_id["train-math-deepscaler-12"].reference == "\\frac{1}{3}"  # ground_truth a JSON string, not a list
    code = by_id["train-code-taco-easy-884"]
    assert code.kind == "code"
    assert json.loads(code.reference) == {"inputs": ["3 4\n", "-5 5\n", "1000000000 1000000000\n"], "outputs": ["7\n", "0\n", "2000000000\n"]}
    assert json.loads(by_id["train-code-leetcode-Medium-227"].reference)["entry_point"] == "Solution().twoSum"
    assert json.loads(by_id["train-code-taco-medium_hard-9034"].reference)["fn_name"] == "max_gap"
    assert sum(p.kind == "code" for p in probs) == 4


def test_skywork_limit_and_suffix():
    suffix = "Let's think step by step and output the final answer within \\boxed{}."
    probs = load_problems(DataConfig(source=str(SKYWORK_SAMPLE), limit=3, prompt_suffix=suffix))
    assert len(probs) == 3
    assert probs[0].messages[-1]["content"].endswith("= 1$. " + suffix)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plain_schema_jsonl(tmp_path):
    rows = [
        {"id": "q1", "prompt": "What is 2+2?", "answer": "4"},
        {"prompt": "What is 3*3?", "answer": 9},
        {"id": "c1", "prompt": "print hi", "kind": "code", "reference": {"inputs": [""], "outputs": ["hi\n"]}},
    ]
    probs = load_problems(DataConfig(source=str(write_jsonl(tmp_path / "plain.jsonl", rows))))
    assert [p.id for p in probs] == ["q1", "plain-1", "c1"]
    assert probs[0].messages == [{"role": "user", "content": "What is 2+2?"}]
    assert probs[1].reference == "9"
    assert probs[2].kind == "code" and json.loads(probs[2].reference)["outputs"] == ["hi\n"]


def test_plain_schema_json_with_message_prompts(tmp_path):
    rows = [
        {"id": "m1", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}], "answer": "2"},
        {"id": "m2", "prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"},
    ]
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(rows))
    probs = load_problems(DataConfig(source=str(path), prompt_suffix="\nBox it."))
    assert probs[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert probs[0].messages[1]["content"] == "1+1?\nBox it."  # a suffix starting with whitespace is not given a space


def test_parquet_in_skywork_schema(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in SKYWORK_SAMPLE.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sky.parquet")
    probs = load_problems(DataConfig(source=str(tmp_path / "sky.parquet"), limit=4))
    assert [p.id for p in probs] == [
        "train-math-numinamath1.5_olympiads-1042",
        "train-math-deepscaler-7731",
        "train-math-still3-2208",
        "train-math-omnimath-415",
    ]
    assert probs[1].reference == "672"


def test_bad_rows_are_skipped_and_duplicate_ids_made_unique(tmp_path):
    rows = [
        {"id": "a", "prompt": "x", "answer": "1"},
        {"id": "a", "prompt": "y", "answer": "2"},
        {"id": "b", "prompt": "z"},  # no answer
        {"id": "c", "prompt": "w", "answer": "3", "kind": "poetry"},
    ]
    probs = load_problems(DataConfig(source=str(write_jsonl(tmp_path / "d.jsonl", rows))))
    assert [p.id for p in probs] == ["a", "a~1"]


def test_no_usable_row_and_missing_source_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no usable problem"):
        load_problems(DataConfig(source=str(write_jsonl(tmp_path / "bad.jsonl", [{"text": "no prompt"}]))))
    with pytest.raises(DataError, match="cannot load data source"):
        load_problems(DataConfig(source=str(tmp_path / "missing_dir_or_hub_name")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type"):
        load_problems(DataConfig(source=str(tmp_path / "x.csv")))


@pytest.mark.parametrize(
    "gt, answer",
    [('["5", "five"]', '["5", "five"]'), ('"\\\\pi"', "\\pi"), ("x^2", "x^2"), ("[3]", "3"), ("12", "12"),
     ('["8"]', "8"), ("[1, 2]", '["1", "2"]'), ('["[\\"a\\"]"]', '["[\\"a\\"]"]')],
)
def test_math_ground_truth_forms(gt, answer):
    row = {"prompt": [{"role": "user", "content": "q"}], "ability": "math", "reward_model": {"ground_truth": gt}}
    assert row_to_problem(row, "d-0").reference == answer


def test_math_ground_truth_empty_list_is_rejected():
    row = {"prompt": "q", "ability": "math", "reward_model": {"ground_truth": "[]"}}
    with pytest.raises(ValueError, match="empty list"):
        row_to_problem(row, "d-0")


def test_suffix_needs_a_user_message():
    with pytest.raises(ValueError, match="no user message"):
        with_suffix([{"role": "system", "content": "s"}], "x")


class TemplateTokenizer:
    """Stands in for a tokenizer in this pure-logic test: renders a fixed template to character codes."""

    chat_template = "<{role}>{content}…<assistant>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return [ord(c) for c in text]


def test_tokenize_prompts_uses_template_and_drops_long_prompts():
    probs = [Problem("a", [{"role": "user", "content": "1+2"}], "math", "3"), Problem("b", [{"role": "user", "content": "x" * 50}], "math", "1")]
    out = tokenize_prompts(probs, TemplateTokenizer(), max_prompt_tokens=30)
    assert [p.id for p, _ in out] == ["a"]
    ids = out[0][1]
    assert ids.dtype == np.int32
    assert "".join(map(chr, ids)) == "<user>1+2<assistant>"
    assert len(tokenize_prompts(probs, TemplateTokenizer())) == 2


def test_tokenizer_without_chat_template_is_a_clear_error():
    class Bare(TemplateTokenizer):
        chat_template = None

    with pytest.raises(DataError, match="no chat template"):
        tokenize_prompts(toy_problems("addition", n=1), Bare())
