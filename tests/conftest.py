"""Shared fixtures: the tiny model (built once, cached like `or1 run` does)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path("~/.cache/or1/torch_extensions").expanduser()))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The warm-started embedded model, cached under ~/.cache/or1 like `or1 run` does."""
    from common.tinymodel import ensure_tiny_model

    return ensure_tiny_model(Path(os.environ.get("OR1_CACHE", "~/.cache/or1")).expanduser(), warm=True)


