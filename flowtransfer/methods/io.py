"""Saving and loading trained methods: one file, written atomically, loaded without running code.

A method file holds plain data only: ``{"format", "hparams", "state_dict", "stage"}`` where
``hparams`` is the method's own :attr:`Method.hparams` (registry name, dataset description and
configuration), so :func:`load_method` rebuilds the method with
:func:`~flowtransfer.methods.build_method` and loads the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowtransfer.io import CheckpointError, atomic_save, safe_load

from .base import Method, build_method

__all__ = ["save_method", "load_method"]

_FORMAT = "flowtransfer.Method/1"


def save_method(method: Method, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``method`` (configuration and weights) to ``path`` atomically."""
    payload = {
        "format": _FORMAT,
        "hparams": method.hparams,
        "stage": getattr(method, "stage", None),
        "state_dict": method.state_dict(),
        "extra": dict(extra or {}),
    }
    return atomic_save(payload, path)


def load_method(path: str | Path) -> Method:
    """Rebuild a method saved by :func:`save_method`, in eval mode."""
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a saved flowtransfer method (format {_FORMAT!r} expected)")
    hp = payload["hparams"]
    method = build_method(hp["name"], hp["dataset_info"], **hp.get("config", {}))
    if payload.get("stage") and hasattr(method, "set_stage"):
        method.set_stage(payload["stage"])
    method.load_state_dict(payload["state_dict"])
    method.eval()
    return method
