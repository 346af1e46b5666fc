"""Seeding and random-number-generator state.

One call seeds every generator a run touches (Python's :mod:`random`, NumPy's global generator and
PyTorch's CPU and CUDA generators). :func:`rng_state` and :func:`set_rng_state` capture and restore
those states as plain data (tensors, ints, lists) so that a checkpoint holding them still loads with
``torch.load(weights_only=True)``; a resumed run then draws the same numbers as an uninterrupted one.

Example::

    seed_everything(1111)
    g = make_generator(1111, epoch=3)      # independent, reproducible stream for epoch 3's shuffle
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "make_generator", "derive_seed", "rng_state", "set_rng_state"]

_MASK_63 = (1 << 63) - 1


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy's global generator and torch (CPU and every CUDA device).

    Args:
        seed: any int; NumPy receives ``seed mod 2**32`` (its legal range).
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def derive_seed(seed: int, *keys: int) -> int:
    """A reproducible 63-bit seed from ``seed`` and integer ``keys`` (e.g. an epoch number).

    Different keys give unrelated streams (SplitMix64 mixing), so ``derive_seed(s, 0)`` and
    ``derive_seed(s, 1)`` do not produce shifted copies of one another's permutations.
    """
    value = int(seed) & 0xFFFFFFFFFFFFFFFF
    for key in keys:
        value = (value + 0x9E3779B97F4A7C15 + (int(key) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        z = value
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        value = z ^ (z >> 31)
    return value & _MASK_63


def make_generator(seed: int, *keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``derive_seed(seed, *keys)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *keys))
    return generator


def rng_state() -> dict[str, Any]:
    """The states of Python, NumPy and torch (CPU, CUDA) generators as ``weights_only``-safe data."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states captured by :func:`rng_state`."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
        np_state = state["numpy"]
        np.random.set_state(
            (
                np_state["name"],
                np_state["keys"].numpy().astype(np.uint32),
                int(np_state["pos"]),
                int(np_state["has_gauss"]),
                float(np_state["gauss"]),
            )
        )
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"malformed RNG state (expected the dict from rng_state()): {err}") from err
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
