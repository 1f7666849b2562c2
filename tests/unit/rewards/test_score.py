"""`or1 score` (score_file): one JSON line per record, in input order, through the real pool."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from common.config import RewardConfig
from rewards.sandbox import sandbox_problem
from rewards.score import record_to_item, score_file

CFG = RewardConfig(math_timeout_s=5.0, code_timeout_s=3.0)


def run(tmp_path: Path, kind: str, lines: list[str], workers: int = 2) -> tuple[int, list[dict]]:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = io.StringIO()
    code = score_file(str(path), kind, workers, CFG, out)
    return code, [json.loads(line) for line in out.getvalue().splitlines()]


def test_math_file_good_wrong_and_malformed(tmp_path: Path):
    lines = [
        json.dumps({"id": "a", "response": "<think>...</think> so \\boxed{\\dfrac{1}{2}}",
                    "reference": "0.5"}),
        json.dumps({"id": "b", "response": "\\boxed{3}", "reference": "4"}),
        "",
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"response": 5, "reference": "1"}),
        json.dumps({"response": "\\boxed{1}"}),
        json.dumps({"id": 7, "response": "\\boxed{7}", "reference": 7}),
        json.dumps({"response": "<think>\\boxed{2}</think>", "reference": "2"}),
    ]
    code, rows = run(tmp_path, "math", lines)
    assert code == 0
    assert [r["line"] for r in rows] == [1, 2, 4, 5, 6, 7, 8, 9]  # blank line 3 skipped, order kept
    assert [r["reward"] for r in rows] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert rows[0]["id"] == "a" and "error" not in rows[0] and rows[0]["detail"] == "\\frac{1}{2}"
    assert "error" not in rows[1]
    assert rows[2]["error"].startswith("malformed record: not JSON")
    assert rows[3]["error"] == "malformed record: record must be a JSON object, got list"
    assert rows[4]["error"] == "malformed record: missing or non-string 'response'"
    assert rows[5]["error"] == "malformed record: missing 'reference'"
    assert rows[6]["id"] == 7
    assert "error" not in rows[7]


@pytest.mark.skipif(bool(sandbox_problem()), reason=f"no sandbox here: {sandbox_problem()}")
def test_code_file_with_object_and_string_references(tmp_path: Path):
    spec = {"inputs": ["2\n"], "outputs": ["4"]}
    right = "```python\nprint(int(input()) * 2)\n```"
    wrong = "```python\nprint(int(input()) + 3)\n```"
    lines = [json.dumps({"response": right, "reference": spec}),
             json.dumps({"response": right, "reference": json.dumps(spec)}),
             json.dumps({"response": wrong, "reference": spec}),
             json.dumps({"response": "no code", "reference": spec})]
    code, rows = run(tmp_path, "code", lines)
    assert code == 0
    assert [r["reward"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert rows[2]["detail"] == "case 0: wrong answer"
    assert rows[3]["error"] == "no ```python code block"


def test_unreadable_file_and_bad_kind(tmp_path: Path, capsys):
    assert score_file(str(tmp_path / "missing.jsonl"), "math", 1, CFG, io.StringIO()) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "f.jsonl").write_text("{}\n")
    assert score_file(str(tmp_path / "f.jsonl"), "poetry", 1, CFG, io.StringIO()) == 2
    assert "--kind must be one of math, code" in capsys.readouterr().err


def test_record_to_item_stringifies_references():
    assert record_to_item('{"response": "r", "reference": 3}', "math")[1].reference == "3"
    as_list = record_to_item('{"response": "r", "reference": ["2", "two"]}', "math")[1]
    assert as_list.reference == '["2", "two"]'
    as_object = record_to_item('{"response": "r", "reference": {"test": "x"}}', "code")[1]
    assert as_object.reference == '{"test": "x"}'


def test_every_record_gets_a_line_surrogates_and_bad_bytes_included(tmp_path: Path):
    """A lone surrogate in an id or an extracted answer once killed the writer (UnicodeEncodeError),
    losing every later record; so did a line that is not UTF-8. Now each yields one line."""
    path = tmp_path / "in.jsonl"
    records = [
        '{"id": "\\ud800", "response": "\\\\boxed{1}", "reference": "1"}',  # surrogate id
        '{"id": "b", "response": "\\\\boxed{\\ud800}", "reference": "1"}',  # surrogate answer
        '{"id": "c", "response": "\\\\boxed{2}", "reference": "2"}',
        '{"id": [[[[1]]]], "response": 3, "reference": "1"}',  # wrong type
        '[' * 100_000 + ']' * 100_000,  # nested past the recursion limit
        '{"id": "d", "response": "\\\\boxed{3}", "reference": {"a": 1}}',
    ]
    path.write_bytes(("\n".join(records) + "\n").encode() + b'{"id": "\xff\xfe"}\n' +
                     b'{"id": "e", "response": "\\\\boxed{5}", "reference": "5"}\n')
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)  # a real UTF-8 writer, like stdout
    assert score_file(str(path), "math", 1, CFG, out) == 0
    rows = [json.loads(line) for line in raw.getvalue().decode("utf-8").splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rows[0]["id"] == "\ud800" and rows[0]["reward"] == 1.0
    assert rows[1]["id"] == "b" and rows[1]["reward"] == 0.0
    assert rows[2]["reward"] == 1.0 and rows[7]["reward"] == 1.0
    assert rows[3]["error"] == "malformed record: missing or non-string 'response'"
    assert rows[4]["error"].startswith("malformed record: not JSON")
    assert rows[5]["reward"] == 0.0
    assert rows[6]["error"] == "malformed record: not UTF-8 text"


def test_result_line_never_raises():
    from bus.messages import ScoreOut
    from rewards.score import result_line

    line = result_line(3, "\udcff", ScoreOut(0.0, detail="x\ud800"))
    line.encode("utf-8")
    assert json.loads(line) == {"line": 3, "id": "\udcff", "reward": 0.0, "detail": "x\ud800"}
    assert json.loads(result_line(1, "é", ScoreOut(1.0))) == {"line": 1, "id": "é", "reward": 1.0}
    assert "é" in result_line(1, "é", ScoreOut(1.0))  # readable when it can be


@pytest.mark.skipif(bool(sandbox_problem()), reason=f"no sandbox here: {sandbox_problem()}")
def test_cli_stdout_holds_only_result_lines(tmp_path: Path):
    """Scoring processes log to stderr: a bad reference's warning once landed among the results."""
    import subprocess
    import sys

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"response": "```python\nprint(1)\n```", "reference": {"nope": 1}}) + "\n")
    root = Path(__file__).parents[3]
    proc = subprocess.run([sys.executable, "-m", "deploy.cli", "score", str(path), "--kind", "code",
                           "--workers", "1"], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["error"].startswith("bad_reference: ")
    assert "code/bad_reference" in proc.stderr
