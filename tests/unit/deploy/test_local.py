"""deploy/local.py: `or1 run` stops, saying why, once every process of a role it started has failed."""

import subprocess
import sys

from deploy.local import Child, Fleet, lost_role


def child(tmp_path, name: str, code: str) -> Child:
    proc = subprocess.Popen([sys.executable, "-c", code])
    return Child(name, proc, tmp_path / f"{name}.log")


def test_a_role_with_every_process_failed_is_lost(tmp_path):
    fleet = Fleet(tmp_path, tmp_path / "config.json", "tcp://127.0.0.1:1")
    learner = child(tmp_path, "learner", "import time; time.sleep(30)")
    fleet.children = [learner, child(tmp_path, "actor0", "import time; time.sleep(30)"),
                      child(tmp_path, "actor1", "raise SystemExit(0)"), child(tmp_path, "reward0", "raise SystemExit(3)")]
    try:
        for c in fleet.children[2:]:
            c.proc.wait(30)
        msg = lost_role(fleet, learner)
        assert "every reward process exited (reward0 with 3)" in msg and "reward0.log" in msg
        fleet.children = fleet.children[:3]  # an actor left cleanly, one still runs: nothing lost
        assert lost_role(fleet, learner) == ""
        fleet.children[1].proc.kill()
        fleet.children[1].proc.wait(30)
        assert "every actor process exited (actor0 with -9)" in lost_role(fleet, learner)  # one failed, one left
    finally:
        for c in fleet.children + [learner]:
            c.proc.kill()
            c.proc.wait()
