"""The one-line API: ``flowtransfer.transfer(x, src="A", dst="L")`` and ``flowtransfer.load()``.

With no model given, both use the small default model shipped in the package
(``flowtransfer/assets/default_transfer.pt``), trained on the embedded synthetic L/A/V data by
``scripts/train_default_model.py``; anyone can re-run that script and get the same file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import overload

import numpy as np
import torch
from torch import Tensor

from flowtransfer.crossmodal import CrossModalFlows

__all__ = ["load", "transfer", "default_model_path"]

_DEFAULT_CACHE: CrossModalFlows | None = None


def default_model_path() -> Path:
    """Path of the default model file inside the installed package."""
    return Path(str(resources.files("flowtransfer") / "assets" / "default_transfer.pt"))


def load(path: str | Path | None = None) -> CrossModalFlows:
    """Load a saved :class:`CrossModalFlows` (``path=None``: the shipped default, cached).

    The model is returned in eval mode. Loading never executes code from the file; a crafted or
    corrupt file raises :class:`flowtransfer.io.CheckpointError`.
    """
    global _DEFAULT_CACHE
    if path is None:
        if _DEFAULT_CACHE is None:
            _DEFAULT_CACHE = CrossModalFlows.load(default_model_path())
        return _DEFAULT_CACHE
    return CrossModalFlows.load(path)


@overload
def transfer(x: Tensor, src: str, dst: str, model: CrossModalFlows | str | Path | None = None) -> Tensor: ...
@overload
def transfer(x: np.ndarray, src: str, dst: str, model: CrossModalFlows | str | Path | None = None) -> np.ndarray: ...


def transfer(x, src, dst, model=None):
    """Recover modality ``dst`` from features ``x`` of modality ``src``.

    Args:
        x: ``(batch, channels, time)`` features of ``src`` (a tensor or a numpy array); ``channels``
            must equal ``model.input_dims[src]``.
        src, dst: modality names (the default model knows ``"L"``, ``"A"``, ``"V"``).
        model: a :class:`CrossModalFlows`, a path to a saved one, or ``None`` for the default model.

    Returns:
        ``(batch, model.input_dims[dst], time)`` recovered features, of the same kind as ``x``
        (numpy in, numpy out).

    Raises:
        ModalityError: unknown modality (the message lists the known ones), wrong channel count
            (expected vs got), wrong rank, or ``src == dst``.
        ValueError: non-finite input.
    """
    if model is None or isinstance(model, (str, Path)):
        model = load(model)
    as_numpy = isinstance(x, np.ndarray)
    tensor = torch.from_numpy(np.asarray(x)) if as_numpy else x
    if not isinstance(tensor, Tensor):
        raise TypeError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}")
    param = next(model.parameters())
    tensor = tensor.to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.transfer(tensor, src, dst)
    finally:
        model.train(was_training)
    return out.cpu().numpy() if as_numpy else out
