"""The sandbox against hostile programs, for real: each must score 0 within its timeout, leave no
process behind (checked in /proc), and leave the scoring process (this one) alive. (Programs that
attack the verdict itself: test_forgery.py.)"""

from __future__ import annotations

import glob
import json
import os
import socket
import time

import pytest

from common.config import RewardConfig
from rewards.code import score_code
from rewards.isolation import UID_SLOTS
from rewards.sandbox import SandboxLimits, run_program, sandbox_problem

ROOT = os.geteuid() == 0
PROBLEM = "" if not ROOT else sandbox_problem()
NS_PROBLEM = "" if not ROOT else sandbox_problem(namespaces=True)
pytestmark = [
    pytest.mark.skipif(not ROOT, reason="the full sandbox (own uid per run) needs root"),
    pytest.mark.skipif(bool(PROBLEM), reason=f"sandbox unavailable here: {PROBLEM}"),
]
needs_namespaces = pytest.mark.skipif(bool(NS_PROBLEM), reason=NS_PROBLEM or "-")

CFG = RewardConfig(code_timeout_s=2.0, code_item_timeout_s=10.0, code_memory_mb=512)
STDIO = json.dumps({"inputs": [""], "outputs": ["ok"]})
LIMITS = SandboxLimits(wall_s=3.0, memory_mb=512)


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def sandbox_leftovers() -> list[int]:
    """Every process (zombies too) owned by a sandbox uid, in one pass over /proc."""
    uids = range(CFG.code_uid_base, CFG.code_uid_base + UID_SLOTS)
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{name}").st_uid in uids:
                pids.append(int(name))
        except OSError:
            continue
    return pids


@pytest.fixture(autouse=True)
def no_leftovers():
    before = set(glob.glob("/tmp/or1-sbx-*"))
    yield
    deadline = time.monotonic() + 2.0
    while sandbox_leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_leftovers() == []
    assert set(glob.glob("/tmp/or1-sbx-*")) <= before


def score_hostile(code: str, budget_s: float) -> tuple[float, str, float]:
    t0 = time.monotonic()
    out = score_code(block(code), STDIO, CFG)
    elapsed = time.monotonic() - t0
    assert elapsed < budget_s, f"took {elapsed:.1f} s"
    return out.reward, out.detail or out.error, elapsed


def test_plain_program_passes_so_the_hostile_rows_mean_something():
    assert score_hostile("print('ok')", 5.0)[0] == 1.0


def test_infinite_loop():
    reward, why, elapsed = score_hostile("while True:\n    pass", CFG.code_timeout_s + 2.0)
    assert reward == 0.0 and "timeout" in why
    assert elapsed >= CFG.code_timeout_s - 0.1


def test_fork_bomb():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    reward, why, _ = score_hostile(code, CFG.code_timeout_s + 3.0)
    assert reward == 0.0 and "timeout" in why


def test_allocating_20_gb():
    reward, why, _ = score_hostile("x = bytearray(20 * 1024**3)\nprint('ok')", 5.0)
    assert reward == 0.0 and "MemoryError" in why


def test_one_gb_to_stdout_is_cut_off():
    code = ("import sys\nchunk = 'x' * (1 << 20)\n"
            "for _ in range(1024):\n    sys.stdout.write(chunk)\nprint('ok')")
    reward, why, _ = score_hostile(code, 5.0)
    assert reward == 0.0 and "output_limit" in why
    run = run_program(code, "", LIMITS)
    assert run.killed_reason == "output_limit" and len(run.stdout) == LIMITS.max_output_bytes


@pytest.mark.netns
@needs_namespaces
def test_writing_outside_the_temp_dir():
    target = "/tmp/or1_escape_test"
    if os.path.exists(target):
        os.remove(target)
    code = (f"open({target!r}, 'w').write('escaped')\n"
            "try:\n    open('/work/or1_escape_test', 'w').write('x')\n"
            "except OSError as e:\n    print(type(e).__name__)\n"
            f"print(open({target!r}).read())")
    run = run_program(code, "", LIMITS)
    # the write "works" inside the sandbox (a private tmpfs) and is gone with it
    assert run.returncode == 0 and run.stdout.split() == ["PermissionError", "escaped"]
    assert not os.path.exists(target) and not os.path.exists("/work/or1_escape_test")
    assert score_hostile(code, 5.0)[0] == 0.0


@pytest.mark.netns
@needs_namespaces
def test_disk_quota_keeps_writes_off_the_host_disk():
    """Many files under the per-file limit once put 2.3 GB on the real disk in 6 s; now the run's
    directory is a tmpfs of code_disk_mb: writes past it fail, and the host's disk sees none."""
    cfg = RewardConfig(code_timeout_s=5.0, code_item_timeout_s=10.0, code_disk_mb=32, code_max_file_mb=4)
    chunk = 1 << 20
    code = ("import os\nst = os.statvfs('.')\n"
            "fs = [l.split()[2] for l in open('/proc/self/mounts') if l.split()[1] == os.getcwd()]\n"
            "print(st.f_blocks * st.f_frsize, fs, flush=True)\nn = 0\n"
            "try:\n    while n < 400:\n"
            f"        with open(f'f{{n}}', 'wb') as f:\n            f.write(b'x' * {chunk})\n"
            "        n += 1\nexcept OSError as e:\n    print(n, e.errno, flush=True)\n    raise\nprint('ok')")
    run = run_program(code, "", SandboxLimits(wall_s=5.0, disk_mb=32, fsize_mb=4))
    size, fs, written, errno = run.stdout.split()
    assert int(size) == 32 << 20 and fs == "['tmpfs']"  # the directory is its own 32 MiB tmpfs
    assert errno == "28" and 28 <= int(written) < 32  # ENOSPC after ~32 MiB (main.py takes a little)
    assert run.returncode != 0
    out = score_code(block(code), STDIO, cfg)
    assert out.reward == 0.0 and "No space left on device" in out.detail


def test_without_namespaces_files_stay_bounded_per_file():
    """The fallback has no quota in total (logged once), but RLIMIT_FSIZE still caps each file."""
    code = ("import os\ntry:\n    open('big', 'wb').write(b'x' * (2 << 20))\n"
            "except OSError as e:\n    print(e.errno)\nprint(os.path.getsize('big'))")
    run = run_program(code, "", SandboxLimits(wall_s=5.0, fsize_mb=1, network_isolation=False))
    assert run.stdout.split() == ["27", str(1 << 20)]  # EFBIG at 1 MiB


@pytest.mark.netns
@needs_namespaces
def test_no_network():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "print('connected')")
    try:
        # the listener is real: without isolation the same program connects ...
        open_run = run_program(code, "", SandboxLimits(wall_s=5.0, network_isolation=False))
        assert open_run.stdout.strip() == "connected", open_run.stderr
        # ... and in the sandbox it cannot
        run = run_program(code, "", LIMITS)
        assert run.returncode != 0 and "connected" not in run.stdout
        assert "Network is unreachable" in run.stderr
    finally:
        listener.close()
    assert score_hostile(code.replace("connected", "ok"), 5.0)[0] == 0.0


def test_parent_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("OR1_SECRET_TEST", "s3cr3t-value")
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        f"for pid in ('self', str(os.getppid()), '{os.getpid()}'):\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ').read())\n"
        "    except OSError as e:\n"
        "        print('denied', pid, type(e).__name__)\n"
    )
    run = run_program(code, "", LIMITS)
    assert run.returncode == 0, run.stderr
    assert "s3cr3t" not in run.stdout
    env_seen = json.loads(run.stdout.splitlines()[0].replace("'", '"'))
    assert env_seen == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@pytest.mark.parametrize("isolation", [True, False])
def test_killing_the_parent_and_the_scorer(isolation: bool):
    me = os.getpid()
    code = ("import os\n"
            "for pid in (os.getppid(), %d):\n"
            "    try:\n        os.kill(pid, 9)\n        print('killed', pid)\n"
            "    except OSError as e:\n        print('refused', pid, type(e).__name__)\n" % me)
    run = run_program(code, "", SandboxLimits(wall_s=3.0, network_isolation=isolation))
    assert f"refused {me}" in run.stdout  # never visible (namespaces) or not ours to signal (uid)
    assert os.getpid() == me  # still here
    assert score_hostile(code, 5.0)[0] == 0.0


@pytest.mark.parametrize("isolation", [True, False])
def test_setsid_child_does_not_survive(isolation: bool):
    code = ("import os, time\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
            "print('ok')")
    run = run_program(code, "", SandboxLimits(wall_s=3.0, network_isolation=isolation))
    assert run.stdout.strip() == "ok"
    # the autouse fixture checks that the sleeping child is gone


def test_sys_exit_before_assertion_tests_is_not_a_pass():
    ref = json.dumps({"test": "def check(candidate):\n    assert candidate(2) == 4\n",
                      "entry_point": "double"})
    assert score_code(block("def double(x):\n    return 2 * x"), ref, CFG).reward == 1.0
    for early_exit in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"):
        out = score_code(block(f"def double(x):\n    return 3 * x\n{early_exit}"), ref, CFG)
        assert out.reward == 0.0, early_exit


def test_result_channel_is_a_pipe_given_as_argv():
    code = "import os, sys\nos.write(int(sys.argv[1]), b'x' * 5000)\nprint(sys.argv[1:])"
    run = run_program(code, "", LIMITS, channel_bytes=6000)
    assert run.returncode == 0 and run.channel == b"x" * 5000
    run = run_program(code, "", LIMITS, channel_bytes=1000)  # flooding it ends the run
    assert run.killed_reason == "output_limit" and run.channel == b"x" * 1000
    assert run_program("import sys\nprint(sys.argv[1:])", "", LIMITS).stdout.strip() == "[]"  # no channel


def test_stdin_and_limits_are_applied():
    run = run_program("import resource, sys\nprint(sys.stdin.read().upper())\n"
                      "print(resource.getrlimit(resource.RLIMIT_NPROC)[0],\n"
                      "      resource.getrlimit(resource.RLIMIT_CORE)[0])",
                      "hello", SandboxLimits(wall_s=3.0, max_processes=17))
    assert run.returncode == 0 and run.stdout.split() == ["HELLO", "17", "0"]
    assert not run.timed_out and run.killed_reason == "" and 0 < run.wall_s < 3.0


def test_cpu_limit_kills_before_the_wall_clock():
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 5:\n    pass\nprint('ok')"
    run = run_program(code, "", SandboxLimits(wall_s=20.0, cpu_s=1))
    assert run.returncode == -9 and run.killed_reason == "" and "ok" not in run.stdout
    assert run.wall_s < 10.0
