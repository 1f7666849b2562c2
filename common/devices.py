"""The accelerators a process may use, without importing torch (`or1 run` plans with it before any
child starts; actors report it in their Hello for `or1 status`)."""

from __future__ import annotations

import os
import shutil
import subprocess


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: `CUDA_VISIBLE_DEVICES` when set (empty = none), else one
    per `nvidia-smi -L` line; [] on a machine without NVIDIA's tools."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def device_label() -> str:
    """What `or1 status` shows as a process's device: "gpu 0,1" (the ids it was given), "cuda"
    (every device of the machine), or "cpu"."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d for d in env.split(",") if d.strip()]
        return f"gpu {','.join(ids)}" if ids else "cpu"
    return "cuda" if visible_gpus() else "cpu"
