"""The scoring pool with real worker processes: order, isolation of a crashing or hanging
worker's item from the others, and repair of the pool afterwards."""

from __future__ import annotations

import glob
import json
import os
import signal
import time

import pytest

from bus.messages import ScoreItem
from common.config import RewardConfig
from rewards.isolation import UID_SLOTS
from rewards.pool import ScorePool
from rewards.sandbox import sandbox_problem

CFG = RewardConfig(math_timeout_s=1.0, code_timeout_s=3.0, code_item_timeout_s=6.0)
SLOW_MATH = ScoreItem("math", r"\boxed{9^{9^{9^{9}}}}", "1")  # runs until its time limit
SLOW_CODE = ScoreItem("code", "```python\nimport time\ntime.sleep(2)\nprint('ok')\n```",
                      json.dumps({"inputs": [""], "outputs": ["ok"]}))


def sandbox_procs() -> list[int]:
    uids = range(CFG.code_uid_base, CFG.code_uid_base + UID_SLOTS)
    return [int(p) for p in filter(str.isdigit, os.listdir("/proc")) if _uid(p) in uids]


def _uid(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


def good(k: int) -> ScoreItem:
    return ScoreItem("math", f"so \\boxed{{{k}}}", str(k))


@pytest.fixture
def pool():
    p = ScorePool(1, CFG)
    yield p
    p.close()


def wait_busy(seconds: float = 0.5) -> None:
    time.sleep(seconds)  # an idle worker takes a submitted item at once


def test_results_in_order_and_bad_items_isolated(pool: ScorePool):
    items = [good(1), ScoreItem("math", r"\boxed{2}", "3"), ScoreItem("poetry", "x", "y"), good(4),
             ScoreItem("code", "no block", "{}")]
    outs = pool.map(items)
    assert [o.reward for o in outs] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert outs[2].error.startswith("unknown kind 'poetry'")
    assert outs[4].error.startswith("bad_reference: ")
    assert pool.stats.restarts == 0 and pool.stats.items == 5


def test_math_timeout_inside_worker_needs_no_restart(pool: ScorePool):
    t0 = time.monotonic()
    out = pool.submit(SLOW_MATH).result(timeout=10)
    assert out.reward == 0.0 and out.error == "timeout"
    assert time.monotonic() - t0 < CFG.math_timeout_s + 1.5
    assert pool.stats.restarts == 0
    assert pool.submit(good(5)).result(timeout=10).reward == 1.0


@pytest.mark.skipif(bool(sandbox_problem()), reason=f"no sandbox here: {sandbox_problem()}")
def test_worker_killed_mid_item(pool: ScorePool):
    [pid] = pool.worker_pids()
    slow = pool.submit(SLOW_CODE)
    after = [pool.submit(good(k)) for k in range(3)]
    wait_busy()
    os.kill(pid, signal.SIGKILL)
    out = slow.result(timeout=10)
    assert out.reward == 0.0 and out.error.startswith("worker crashed (exit code -9)")
    assert [f.result(timeout=10).reward for f in after] == [1.0, 1.0, 1.0]
    assert pool.stats.crashes == 1 and pool.stats.restarts == 1
    assert pool.worker_pids() != [pid]
    if os.geteuid() != 0:
        return  # the checks below are of the root sandbox's uids and run directories
    # the killed worker's sandbox died with it, and its replacement removed the run directory
    deadline = time.monotonic() + 3
    while (sandbox_procs() or glob.glob("/tmp/or1-sbx-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_procs() == [] and glob.glob("/tmp/or1-sbx-*") == []


def test_hung_worker_is_killed_at_the_deadline(pool: ScorePool):
    [pid] = pool.worker_pids()
    t0 = time.monotonic()
    hung = pool.submit(SLOW_MATH)
    after = pool.submit(good(7))
    wait_busy(0.3)
    os.kill(pid, signal.SIGSTOP)  # stands in for a hang in C code that no signal handler reaches
    out = hung.result(timeout=15)
    assert out.reward == 0.0 and out.error == "timeout"
    assert CFG.math_timeout_s + 1.5 < time.monotonic() - t0 < CFG.math_timeout_s + 5.0
    assert after.result(timeout=10).reward == 1.0
    assert pool.stats.timeouts == 1 and pool.stats.restarts == 1
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # SIGKILLed and reaped
            os.kill(pid, 0)
            time.sleep(0.05)


def test_closed_pool_answers_without_scoring():
    p = ScorePool(1, CFG)
    p.close()
    assert p.submit(good(1)).result(timeout=1).error == "pool closed"


@pytest.mark.skipif(bool(sandbox_problem()), reason=f"no sandbox here: {sandbox_problem()}")
def test_details_are_always_utf8_so_the_bus_can_pack_them():
    """A program's own error text (or an extracted answer) may hold a lone surrogate; msgpack
    refuses those, so score_one escapes them."""
    import msgpack

    from rewards.core import score_one

    program = "```python\ndef f(x):\n    raise ValueError('\\ud800')\n```"
    out = score_one(ScoreItem("code", program, '{"fn_name": "f", "inputs": [[1]], "outputs": [1]}'), CFG)
    assert out.reward == 0.0 and out.detail == "case 0: ValueError: \\ud800"
    msgpack.packb([out.error, out.detail])
