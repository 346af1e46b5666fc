"""The one-line API: ``flowtransfer.transfer(x, src="A", dst="L")`` and ``flowtransfer.load()``.

With no model given, both use the small default model shipped in the package
(``flowtransfer/assets/default_transfer.pt``), trained on the embedded synthetic L/A/V data by
``scripts/train_default_model.py``; anyone can re-run that script and get the same file.

Every call to :func:`load` returns a model of its own: editing one (fine-tuning, moving it to a
GPU) never changes what a later ``load()`` or ``transfer(..., model=None)`` computes. Models are
refused when their file asks for absurd sizes (:func:`flowtransfer.io.check_config_limits`) or holds
non-finite weights; a transfer whose output is not finite raises :class:`NonFiniteOutputError`
instead of returning NaN.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import overload

import numpy as np
import torch
from torch import Tensor

from flowtransfer.crossmodal import CrossModalFlows
from flowtransfer.io import CheckpointError, check_finite_state

__all__ = ["load", "transfer", "default_model_path", "NonFiniteOutputError", "TRANSFER_CHUNK_ELEMENTS"]

#: the private default model behind ``transfer(..., model=None)``; never handed out
_DEFAULT_CACHE: CrossModalFlows | None = None

#: :func:`transfer` carries at most about this many latent values (``batch * width * time``) at once
TRANSFER_CHUNK_ELEMENTS = 1 << 22


class NonFiniteOutputError(ValueError):
    """A transfer produced NaN or inf from finite input (input far outside the training range, or
    a broken model)."""


def default_model_path() -> Path:
    """Path of the default model file inside the installed package."""
    return Path(str(resources.files("flowtransfer") / "assets" / "default_transfer.pt"))


def _load_checked(path: str | Path) -> CrossModalFlows:
    """:meth:`CrossModalFlows.load` with clear errors for malformed files and non-finite weights."""
    try:
        model = CrossModalFlows.load(path)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        detail = f"missing entry {err}" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"{path} is a malformed CrossModalFlows file: {detail}") from None
    check_finite_state(model.state_dict(), where=str(path))
    return model


def _default_model() -> CrossModalFlows:
    global _DEFAULT_CACHE
    if _DEFAULT_CACHE is None:
        _DEFAULT_CACHE = _load_checked(default_model_path())
    return _DEFAULT_CACHE


def load(path: str | Path | None = None) -> CrossModalFlows:
    """Load a saved :class:`CrossModalFlows` (``path=None``: the shipped default).

    The model is returned in eval mode, and is the caller's own: the default model is read once
    and each call gets an independent copy. Loading never executes code from the file.

    Raises:
        flowtransfer.io.CheckpointError: a crafted, corrupt or malformed file, a configuration
            with absurd sizes, or non-finite weights.
    """
    if path is None:
        return copy.deepcopy(_default_model())
    return _load_checked(path)


@overload
def transfer(x: Tensor, src: str, dst: str, model: CrossModalFlows | str | Path | None = None,
             *, batch_size: int | None = None) -> Tensor: ...
@overload
def transfer(x: np.ndarray, src: str, dst: str, model: CrossModalFlows | str | Path | None = None,
             *, batch_size: int | None = None) -> np.ndarray: ...


def transfer(x, src, dst, model=None, *, batch_size=None):
    """Recover modality ``dst`` from features ``x`` of modality ``src``.

    Args:
        x: ``(batch, channels, time)`` features of ``src`` (a tensor or a numeric numpy array);
            ``channels`` must equal ``model.input_dims[src]``.
        src, dst: modality names (the default model knows ``"L"``, ``"A"``, ``"V"``).
        model: a :class:`CrossModalFlows`, a path to a saved one, or ``None`` for the default model.
        batch_size: samples per forward pass; ``None`` picks chunks of about
            :data:`TRANSFER_CHUNK_ELEMENTS` latent values, so a batch of any size runs in bounded
            memory (samples are independent: the result does not depend on the chunking).

    Returns:
        ``(batch, model.input_dims[dst], time)`` recovered features, of the same kind as ``x``
        (numpy in, numpy out).

    Raises:
        ModalityError: unknown modality (the message lists the known ones), wrong channel count
            (expected vs got), wrong rank, or ``src == dst``.
        TypeError: ``x`` is neither a tensor nor a numeric array.
        ValueError: non-finite input, or a ``batch_size`` below 1.
        NonFiniteOutputError: the recovered features hold NaN or inf.
    """
    if model is None:
        model = _default_model()
    elif isinstance(model, (str, Path)):
        model = load(model)
    as_numpy = isinstance(x, np.ndarray)
    if as_numpy and x.dtype.kind not in "biuf":
        raise TypeError(f"x must hold real numbers, got a numpy array of dtype {x.dtype}")
    tensor = torch.from_numpy(np.asarray(x)) if as_numpy else x
    if not isinstance(tensor, Tensor):
        raise TypeError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"x must hold real numbers, got dtype {tensor.dtype}")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    param = next(model.parameters())
    tensor = tensor.to(device=param.device, dtype=param.dtype)
    model.check_input(tensor, src)  # one clear error for the whole batch, before any chunk runs
    n, time = tensor.shape[0], tensor.shape[2]
    if batch_size is None:
        batch_size = max(1, TRANSFER_CHUNK_ELEMENTS // max(1, model.width * time))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if n <= batch_size:
                out = model.transfer(tensor, src, dst)
            else:
                first = model.transfer(tensor[:batch_size], src, dst)
                out = first.new_empty((n, *first.shape[1:]))
                out[:batch_size] = first
                for start in range(batch_size, n, batch_size):
                    out[start:start + batch_size] = model.transfer(tensor[start:start + batch_size], src, dst)
    finally:
        model.train(was_training)
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        rows = int((~finite.reshape(n, -1).all(dim=1)).sum())
        raise NonFiniteOutputError(
            f"the transfer {src} -> {dst} gave non-finite values (NaN/inf) for {rows} of {n} samples "
            f"(largest |input| {float(tensor.abs().max()):.3g}): the input lies far outside what the model "
            "was trained on, or the model is broken"
        )
    return out.cpu().numpy() if as_numpy else out
