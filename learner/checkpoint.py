"""Checkpoint directory layout, atomic completion and pruning (no DeepSpeed import: pure file logic).

Layout::

    run_dir/checkpoints/step_000123/     one checkpoint per optimizer step (the version after it)
        mp_rank_00_model_states.pt ...   DeepSpeed's own files (engine.save_checkpoint, tag = dir name)
        rng_rank_00000.json ...          each rank's torch RNG state (base64)
        or1_state.json                   {"format": 1, "version": v, "world_size": n, "client_state": {...}}
        COMPLETE                         the completion marker, written last

Atomic completion: rank 0 writes `COMPLETE` only after every rank has finished writing (a barrier
sits between), and writes it by rename from a temporary file after an fsync, so the marker exists
only if the whole checkpoint does. A directory without the marker is a save that was killed part
way: `latest_checkpoint` ignores it (a resumed learner starts from the previous complete one), and a
later save to the same step first deletes it. Pruning keeps the newest `keep` complete checkpoints
and also removes incomplete directories older than the newest complete one (they can never be
resumed from).

`or1_state.json` is JSON so a person can read it; the client state (entropy controller, scheduler,
epoch ...) must therefore be JSON-serialisable, which `check_client_state` verifies up front.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
STATE_FILE = "or1_state.json"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """run_dir/checkpoints/step_000123 (zero-padded so names sort by step)."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def checkpoint_step(path: str | Path) -> int:
    m = _STEP_DIR.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint directory (expected step_NNNNNN)")
    return int(m.group(1))


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_checkpoints(run_dir: str | Path, complete_only: bool = True) -> list[Path]:
    """Checkpoint directories under run_dir, oldest step first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    if complete_only:
        found = [p for p in found if is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the
    newest complete one. Returns what was deleted. Call on rank 0 only."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    done = list_checkpoints(run_dir)
    doomed = done[:-keep]
    if done:
        newest = checkpoint_step(done[-1])
        partial = [p for p in list_checkpoints(run_dir, complete_only=False) if not is_complete(p)]
        doomed += [p for p in partial if checkpoint_step(p) < newest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def begin_save(path: str | Path) -> Path:
    """Prepare `path` for a new save (rank 0, before the other ranks write): a stale directory of a
    save that was killed, or an older save of the same step, is deleted first so no file of it can
    be mistaken for part of the new one."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def mark_complete(path: str | Path) -> None:
    """Write the marker atomically (temp file, fsync, rename, fsync the directory)."""
    _atomic_write(Path(path) / MARKER, b"ok\n")


def check_client_state(client_state: dict[str, Any]) -> str:
    """The client state as JSON text; a clear error if it is not a JSON-serialisable dict."""
    if not isinstance(client_state, dict):
        raise ValueError(f"client_state must be a dict, got {type(client_state).__name__}")
    try:
        return json.dumps(client_state, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"client_state must be JSON-serialisable: {e}") from None


def write_state(path: str | Path, version: int, world_size: int, client_state: dict[str, Any]) -> None:
    check_client_state(client_state)
    doc = {"format": STATE_FORMAT, "version": version, "world_size": world_size, "client_state": client_state}
    _atomic_write(Path(path) / STATE_FILE, (json.dumps(doc, indent=1) + "\n").encode())


def read_state(path: str | Path) -> dict[str, Any]:
    """or1_state.json of a complete checkpoint: {"version", "world_size", "client_state"}."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    doc = json.loads((path / STATE_FILE).read_text())
    if doc.get("format") != STATE_FORMAT:
        raise ValueError(f"{path / STATE_FILE}: unknown format {doc.get('format')!r}")
    return doc


def rng_file(path: str | Path, rank: int) -> Path:
    return Path(path) / f"rng_rank_{rank:05d}.json"


def write_rng(path: str | Path, rank: int, states: dict[str, bytes]) -> None:
    """Each rank's RNG states (torch CPU, and CUDA where present) as base64 JSON."""
    doc = {k: base64.b64encode(v).decode() for k, v in states.items()}
    _atomic_write(rng_file(path, rank), json.dumps(doc).encode())


def read_rng(path: str | Path, rank: int) -> dict[str, bytes] | None:
    f = rng_file(path, rank)
    if not f.is_file():
        return None  # saved with another world size: RNG restore is best-effort
    return {k: base64.b64decode(v) for k, v in json.loads(f.read_text()).items()}


def _atomic_write(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
