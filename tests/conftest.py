"""Shared test fixtures: real data location, float64 helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$FLOWTRANSFER_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("FLOWTRANSFER_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set FLOWTRANSFER_DATA to point at it)")
    return path


@pytest.fixture(autouse=True)
def _torch_threads():
    """Tiny test tensors: one thread avoids synchronisation cost (and oversubscription)."""
    torch.set_num_threads(1)
    yield
