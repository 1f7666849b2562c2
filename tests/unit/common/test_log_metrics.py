import io
import json

import pytest
import structlog

from common.log import get_logger, setup_logging
from common.metrics import JsonlSink, MultiSink, TensorBoardSink, read_jsonl


@pytest.fixture(autouse=True)
def _reset_logging():
    """These tests point structlog at their own buffers: put the defaults back, or every later test
    in this process would log into a dead StringIO (and capsys would see nothing)."""
    yield
    structlog.reset_defaults()


def test_json_logs_are_bound_with_role_and_worker():
    buf = io.StringIO()
    setup_logging("actor", "a7", fmt="json", stream=buf)
    get_logger(version=3).info("lease", lease_id=9)
    rec = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rec["event"] == "lease" and rec["role"] == "actor" and rec["worker_id"] == "a7"
    assert rec["version"] == 3 and rec["lease_id"] == 9 and rec["level"] == "info"


def test_console_format_is_not_json():
    buf = io.StringIO()
    setup_logging("learner", "rank0", fmt="console", stream=buf)
    get_logger().warning("hello")
    line = buf.getvalue().strip()
    assert "hello" in line and not line.startswith("{")


def test_jsonl_and_tensorboard_sinks(tmp_path):
    sink = MultiSink(JsonlSink(tmp_path / "m.jsonl"), TensorBoardSink(tmp_path / "tb"))
    sink.write(1, {"reward/mean": 0.5, "staleness/hist": [3, 1]})
    sink.write(2, {"reward/mean": 0.75})
    sink.close()
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["staleness/hist"] == [3, 1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["reward/mean"]  # the histogram list is jsonl's alone
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.5), (2, 0.75)]
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 3, "rew')  # a torn line of a live run
    assert len(read_jsonl(tmp_path / "m.jsonl")) == 2


def test_logger_made_before_setup_uses_the_later_setup():
    early = get_logger(component="x")  # as a module-level `log = get_logger()` does at import
    buf = io.StringIO()
    setup_logging("reward", "r1", fmt="json", stream=buf)
    early.info("scored", n=2)
    rec = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rec["event"] == "scored" and rec["component"] == "x" and rec["worker_id"] == "r1"


def test_jsonl_tail_reads_each_appended_record_once_and_waits_for_torn_lines(tmp_path):
    from common.metrics import JsonlTail

    path = tmp_path / "metrics.jsonl"
    tail = JsonlTail(path)
    assert tail.new() == []  # no file yet
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert [r["step"] for r in tail.new()] == [1, 2]
    assert tail.new() == []  # nothing new; the torn line waits
    with open(path, "a") as f:
        f.write('ep": 3}\nnot json\n{"step": 4}\n')
    assert [r["step"] for r in tail.new()] == [3, 4]  # the finished line, the bad one skipped
