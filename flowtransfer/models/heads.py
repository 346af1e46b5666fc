r"""Prediction heads and task losses, shared by DiCMoR and every baseline.

The head is MulT's (and DiCMoR's) residual two-layer MLP followed by a linear output:

.. math:: h = x + W_2\,\mathrm{Dropout}\big(\mathrm{ReLU}(W_1 x + b_1)\big) + b_2, \qquad
          \hat y = W_o h + b_o

with :math:`W_1: D \to H`, :math:`W_2: H \to D` (``H = D`` by default). DiCMoR's ``output_dropout``
(MOSI .5, MOSEI .2) is this head's ``dropout``.

Example:
    >>> import torch
    >>> head = build_head("regression", in_dim=192, dropout=0.5)
    >>> head(torch.randn(4, 192)).shape
    torch.Size([4])
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResidualMLPHead", "RegressionHead", "ClassificationHead", "build_head", "task_loss", "TASKS"]

TASKS = ("regression", "classification")


class ResidualMLPHead(nn.Module):
    """``(B, in_dim) -> (B, out_dim)`` through the residual MLP above."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = in_dim if hidden is None else hidden
        if in_dim < 1 or out_dim < 1 or hidden < 1:
            raise ValueError(f"in_dim, out_dim, hidden must be >= 1, got {in_dim}, {out_dim}, {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_dim, self.out_dim, self.dropout = in_dim, out_dim, dropout
        self.proj1 = nn.Linear(in_dim, hidden)
        self.proj2 = nn.Linear(hidden, in_dim)
        self.out = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"{type(self).__name__}: expected (batch, {self.in_dim}), got {tuple(x.shape)}")
        h = F.relu(self.proj1(x))
        if self.training and self.dropout > 0:
            h = F.dropout(h, self.dropout, True)
        return self.out(x + self.proj2(h))


class RegressionHead(ResidualMLPHead):
    """One value per sample: ``(B, in_dim) -> (B,)``."""

    def __init__(self, in_dim: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(in_dim, 1, hidden, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).squeeze(-1)


class ClassificationHead(ResidualMLPHead):
    """Logits: ``(B, in_dim) -> (B, num_classes)``."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        super().__init__(in_dim, num_classes, hidden, dropout)
        self.num_classes = num_classes


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return task


def build_head(
    task: str, in_dim: int, num_classes: int | None = None, hidden: int | None = None, dropout: float = 0.0
) -> ResidualMLPHead:
    """A :class:`RegressionHead` (``task="regression"``) or :class:`ClassificationHead`
    (``task="classification"``, needs ``num_classes``)."""
    if _check_task(task) == "regression":
        if num_classes is not None:
            raise ValueError("a regression head takes no num_classes")
        return RegressionHead(in_dim, hidden, dropout)
    if num_classes is None:
        raise ValueError("a classification head needs num_classes")
    return ClassificationHead(in_dim, num_classes, hidden, dropout)


def task_loss(task: str) -> nn.Module:
    """The task loss: L1 (mean absolute error) for regression, as DiCMoR and MulT use on
    MOSI/MOSEI; cross-entropy over logits for classification (int64 targets)."""
    return nn.L1Loss() if _check_task(task) == "regression" else nn.CrossEntropyLoss()
