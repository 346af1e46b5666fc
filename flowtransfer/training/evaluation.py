"""Predictions and task metrics of a method on a dataset.

Evaluation runs the method in eval mode under ``torch.no_grad`` over the dataset in its stored
order (no shuffling), and restores the previous train/eval mode afterwards. Predictions must be
finite: :class:`Batch` puts NaN in every absent (sample, modality) slot, so a method that reads a
missing modality without consulting ``batch.mask`` produces NaN, and :func:`predict_dataset` stops
with :class:`NonFinitePredictionError` naming the samples. That makes evaluation a leak detector.

Example::

    pred, target = predict_dataset(method, test_ds)          # (N,) or (N, K); (N,)
    scores = evaluate(method, test_ds)                       # {"acc2_non0": ..., "mae": ...}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowtransfer.metrics import classification_metrics, regression_metrics

__all__ = [
    "NonFinitePredictionError",
    "method_device",
    "predict_dataset",
    "evaluate",
    "evaluate_loss",
]


class NonFinitePredictionError(ValueError):
    """A method returned NaN or inf predictions (typically: it read a missing modality)."""


def method_device(method: nn.Module) -> torch.device:
    """The device of the method's first parameter or buffer (CPU if it has none)."""
    for tensor in method.parameters():
        return tensor.device
    for tensor in method.buffers():
        return tensor.device
    return torch.device("cpu")


class _EvalMode:
    """Context manager: ``method.eval()`` and ``torch.no_grad()``, previous mode restored."""

    def __init__(self, method: nn.Module) -> None:
        self.method = method
        self.was_training = method.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.method.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.method.train(self.was_training)


def _ordered_batches(dataset: Any, batch_size: int) -> Iterator[Any]:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return iter(dataset.loader(int(batch_size), shuffle=False, drop_last=False))


def _method_name(method: nn.Module) -> str:
    return type(method).__name__


def predict_dataset(
    method: nn.Module,
    dataset: Any,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``method.predict`` over ``dataset`` in order.

    Args:
        method: an object with ``predict(batch) -> Tensor`` (an ``nn.Module``).
        dataset: a :class:`~flowtransfer.data.MultimodalDataset` (anything with ``task``,
            ``num_classes`` and ``loader(batch_size, shuffle, drop_last)``).
        batch_size: evaluation batch size (does not change the result).
        device: where batches go; default the method's device.

    Returns:
        ``(pred, target)``: ``pred`` is ``(N,)`` float32 for regression or ``(N, K)`` float32
        logits for classification; ``target`` is the dataset's labels ``(N,)`` in the same order.

    Raises:
        ValueError: predictions of the wrong shape for the task.
        NonFinitePredictionError: any NaN or inf prediction.
    """
    device = torch.device(device) if device is not None else method_device(method)
    task = dataset.task
    preds: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    with _EvalMode(method):
        for batch in _ordered_batches(dataset, batch_size):
            out = method.predict(batch.to(device))
            if not isinstance(out, Tensor):
                raise TypeError(f"{_method_name(method)}.predict must return a Tensor, got {type(out).__name__}")
            b = len(batch.labels)
            if task == "regression":
                if tuple(out.shape) != (b,):
                    raise ValueError(
                        f"{_method_name(method)}.predict: regression predictions must have shape ({b},), "
                        f"got {tuple(out.shape)}"
                    )
            else:
                k = dataset.num_classes
                if out.dim() != 2 or out.shape[0] != b or (k is not None and out.shape[1] != k):
                    raise ValueError(
                        f"{_method_name(method)}.predict: classification logits must have shape ({b}, {k}), "
                        f"got {tuple(out.shape)}"
                    )
            preds.append(out.detach().float().cpu().numpy())
            targets.append(batch.labels.detach().cpu().numpy())
            idx = batch.index if batch.index is not None else torch.full((b,), -1)
            indices.append(idx.detach().cpu().numpy())
    if not preds:
        raise ValueError("predict_dataset: the dataset yielded no batches")
    pred = np.concatenate(preds, axis=0)
    target = np.concatenate(targets, axis=0)
    bad = ~np.isfinite(pred) if pred.ndim == 1 else ~np.isfinite(pred).all(axis=1)
    if bad.any():
        where = np.concatenate(indices)[bad][:5].tolist()
        raise NonFinitePredictionError(
            f"{_method_name(method)} produced non-finite (NaN/inf) predictions for {int(bad.sum())} of "
            f"{len(bad)} samples (first sample indices {where}). Absent modalities hold NaN in a Batch: "
            "the method probably read a missing modality without consulting batch.mask "
            "(or training diverged)."
        )
    return pred, target


def evaluate(
    method: nn.Module,
    dataset: Any,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Task metrics of ``method`` on ``dataset`` (see :mod:`flowtransfer.metrics`).

    Regression: ``acc2_has0, f1_has0, acc2_non0, f1_non0, acc5, acc7, mae, corr`` (and ``n``,
    ``n_non0``). Classification: ``acc, f1_macro, f1_weighted`` (and ``n``).
    """
    pred, target = predict_dataset(method, dataset, batch_size=batch_size, device=device)
    if dataset.task == "regression":
        return regression_metrics(pred, target)
    if dataset.task == "classification":
        return classification_metrics(pred, target, num_classes=dataset.num_classes)
    raise ValueError(f"unknown task {dataset.task!r}; expected 'regression' or 'classification'")


def evaluate_loss(
    method: nn.Module,
    dataset: Any,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Sample-weighted mean of ``method.loss`` over ``dataset`` in eval mode, without gradients.

    Returns ``{"loss": mean total, "loss/<part>": mean of each logged part}``. A batch of size
    ``B`` counts ``B`` times, so for losses that are means over the batch the result does not
    depend on ``batch_size``; a part logged by only some batches is averaged over those batches'
    samples.

    Raises:
        FloatingPointError: the loss is NaN or inf on some batch.
    """
    device = torch.device(device) if device is not None else method_device(method)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    total = 0

    def add(key: str, value: float, weight: int) -> None:
        sums[key] = sums.get(key, 0.0) + value * weight
        counts[key] = counts.get(key, 0) + weight

    with _EvalMode(method):
        for batch in _ordered_batches(dataset, batch_size):
            loss, parts = method.loss(batch.to(device))
            value = float(loss.detach())
            if not np.isfinite(value):
                raise FloatingPointError(
                    f"{_method_name(method)}.loss is {value} on a validation batch; a method that reads a "
                    "missing modality (NaN slots) without consulting batch.mask produces this"
                )
            b = len(batch.labels)
            total += b
            add("loss", value, b)
            for key, part in parts.items():
                if key != "loss":  # the total is logged already
                    add(f"loss/{key}", float(part), b)
    if total == 0:
        raise ValueError("evaluate_loss: the dataset yielded no batches")
    return {k: v / counts[k] for k, v in sums.items()}
