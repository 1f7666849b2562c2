import subprocess
import sys

from procs import ROOT

COMMANDS = ("run", "learner", "actor", "reward", "score", "status", "set", "keys", "plot", "eval", "filter", "tiny-model",
            "check-data", "export")


def or1(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_command():
    out = or1("--help")
    assert out.returncode == 0
    for c in COMMANDS:
        assert c in out.stdout


def test_help_imports_nothing_heavy():
    """`or1 --help` stays instant: no torch, vllm, deepspeed or transformers at import time."""
    code = ("import sys, deploy.cli; heavy = [m for m in ('torch', 'vllm', 'deepspeed', 'transformers', 'zmq')"
            " if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_role_help_works():
    for c in ("learner", "actor", "reward"):
        out = or1(c, "--help")
        assert out.returncode == 0 and "--config" in out.stdout and "--set" in out.stdout


def test_bad_config_exits_2_with_one_line():
    out = or1("learner", "--set", "learner.max_staleness=-3")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "learner.max_staleness" in out.stderr
    out = or1("actor", "--set", "actor.bogus=1")
    assert out.returncode == 2 and "actor.bogus" in out.stderr


def test_score_rejects_unknown_kind(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"response": "\\\\boxed{2}", "reference": "2"}\n')
    assert or1("score", "--kind", "poetry", str(f)).returncode == 2


def test_keys_makes_the_layout(tmp_path):
    out = or1("keys", str(tmp_path / "k"))
    assert out.returncode == 0
    assert (tmp_path / "k" / "server.key_secret").exists() and (tmp_path / "k" / "clients" / "actor.key").exists()


def test_data_commands_help_and_bad_input():
    for c, flag in (("eval", "--max-tokens"), ("filter", "--difficulty-model"), ("check-data", "--json"),
                    ("export", "--dtype")):
        out = or1(c, "--help")
        assert out.returncode == 0 and flag in out.stdout, c
    out = or1("export", "/nonexistent/checkpoints/step_000001", "/tmp/never")
    assert out.returncode == 2 and "not a complete checkpoint" in out.stderr


def test_run_task_picks_an_embedded_config_and_refuses_bad_use(tmp_path):
    from deploy.cli import TASKS, default_run_config

    from common.config import load_config

    chain = load_config(default_run_config("chain"))
    assert chain.learner.data.source == "toy:chain" and chain.learner.model == "tiny"
    assert chain.learner.stages[0].max_response_tokens >= 60  # the longest worked answer + eos
    assert set(TASKS) == {"addition", "chain"}
    out = or1("run", "--task", "poetry")
    assert out.returncode == 2 and "unknown task 'poetry'" in out.stderr and "chain" in out.stderr
    out = or1("run", "--task", "chain", "--config", str(tmp_path / "x.toml"))
    assert out.returncode == 2 and "not both" in out.stderr
