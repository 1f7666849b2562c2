"""`or1 filter` (deploy/evaluate.py): Skywork-OR1's offline difficulty filter. Rows carrying
extra_info.model_difficulty are judged by it with no model at all; other rows are sampled with the
tiny model; kept rows come back exactly as they were read (jsonl bytes, parquet schema)."""

from __future__ import annotations

import json

import pytest

from common.config import load_config
from common.data import DataError
from deploy.evaluate import difficulty_key, keep, offline_filter

KEY = "DeepSeek-R1-Distill-Qwen-7B"
NO_MODEL = "/nonexistent/DeepSeek-R1-Distill-Qwen-7B"  # names the key; loading it would fail


def skywork_row(i: int, d7: int | None, kind: str = "math") -> dict:
    extra = {"index": i, "note": "ünïcode ✓", "model_difficulty": {"DeepSeek-R1-Distill-Qwen-1.5B": 0, KEY: d7}}
    if d7 is None:
        del extra["model_difficulty"]
    gt = json.dumps([str(i)]) if kind == "math" else json.dumps({"inputs": ["1\n"], "outputs": ["1\n"]})
    return {"data_source": f"train-{kind}-x", "prompt": [{"role": "user", "content": f"{i}+0"}], "ability": kind,
            "reward_model": {"ground_truth": gt, "style": "rule"}, "extra_info": extra, "zz_unknown": [1, {"a": None}]}


def cfg():
    return load_config(overrides=["actor.engine=hf", "actor.max_model_len=64", "reward.workers=1",
                                  "learner.stages=[{steps=1, max_response_tokens=8, prompts_per_batch=1, group_size=2}]"])


def test_rule_and_key():
    assert [keep(s, 16) for s in (0, 1, 15, 16)] == [False, True, True, False]
    assert difficulty_key("/m/DeepSeek-R1-Distill-Qwen-7B", [KEY, "DeepSeek-R1-Distill-Qwen-1.5B"], None) == KEY
    assert difficulty_key("/m/other", [KEY], None) is None and difficulty_key("x", [KEY], "chosen") == "chosen"


def test_by_model_difficulty_without_sampling_keeps_rows_byte_for_byte(tmp_path, capsys):
    rows = [skywork_row(0, 0), skywork_row(1, 1), skywork_row(2, 15), skywork_row(3, 16), skywork_row(4, 9, "code")]
    lines = [json.dumps(r, ensure_ascii=False, separators=(", ", ":")) for r in rows]  # odd spacing survives
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert offline_filter(NO_MODEL, str(out), cfg(), data=str(src)) == 0
    assert out.read_text(encoding="utf-8").splitlines() == [lines[1], lines[2], lines[4]]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kept"] == 3 and summary["by_difficulty"] == 5 and summary["sampled"] == 0
    assert summary["difficulty_model"] == KEY


def test_difficulty_needs_a_model_name(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(skywork_row(1, 3)) + "\n")
    with pytest.raises(DataError, match="--difficulty-model"):
        offline_filter("/m/unnamed", str(tmp_path / "o.jsonl"), cfg(), data=str(src))


def test_parquet_round_trip_keeps_the_schema(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [skywork_row(i, d) for i, d in enumerate([0, 4, 16, 8])]
    for r in rows:
        r["zz_unknown"] = [1, 2]  # Arrow holds no mixed list
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "in.parquet")
    assert offline_filter(NO_MODEL, str(tmp_path / "out.parquet"), cfg(), data=str(tmp_path / "in.parquet")) == 0
    got = pq.read_table(tmp_path / "out.parquet")
    assert got.schema == table.schema
    assert got.to_pylist() == [rows[1], rows[3]]


def test_sampled_with_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    """Rows without model_difficulty are sampled (N = 4 here): kept iff 0 < solved < 4, per the report."""
    rows = [{"id": f"q{a}{b}", "prompt": f"{a}+{b}", "answer": str(a + b), "extra": {"keep": "me"}}
            for a in range(10) for b in (0, 5, 9)]
    lines = [json.dumps(r) for r in rows]
    src = tmp_path / "plain.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out, report = tmp_path / "kept.jsonl", tmp_path / "report.jsonl"
    assert offline_filter(str(tiny_model_dir), str(out), cfg(), data=str(src), math_samples=4,
                          temperature=1.0, max_tokens=8, report=str(report)) == 0
    verdicts = [json.loads(x) for x in report.read_text().splitlines()]
    assert [v["row"] for v in verdicts] == list(range(len(rows)))
    assert all(v["method"] == "sampled" and v["samples"] == 4 for v in verdicts)
    want = [lines[v["row"]] for v in verdicts if 0 < v["solved"] < 4]
    assert out.read_text().splitlines() == want
    # the tiny model (about 35-50 % per sample) leaves some problems always or never solved, most mixed
    assert 0 < len(want) < len(rows)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kept"] == len(want) and summary["sampled"] == len(rows)
