"""Sentiment scores to classes: one rule, used by the class prior and by Acc-7/Acc-5.

MOSI/MOSEI labels are continuous in [-3, 3]. DiCMoR's released code rounds them with ``np.round``,
which rounds halves to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2). flowtransfer rounds halves away from
zero instead (0.5 -> 1, -0.5 -> -1, 2.5 -> 3) and clips to the class range, everywhere.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["round_half_away", "sentiment_classes", "SENTIMENT_CLASSES"]

#: number of classes of the 7-class sentiment rule (-3 ... 3)
SENTIMENT_CLASSES = 7


def round_half_away(y: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Round to the nearest integer, halves away from zero: ``sign(y) * floor(|y| + 0.5)``."""
    if isinstance(y, torch.Tensor):
        return torch.sign(y) * torch.floor(torch.abs(y) + 0.5)
    y = np.asarray(y, dtype=np.float64)
    return np.sign(y) * np.floor(np.abs(y) + 0.5)


def sentiment_classes(y: np.ndarray | torch.Tensor, bound: int = 3) -> np.ndarray | torch.Tensor:
    """Class index in ``[0, 2*bound]`` of ``clip(round_half_away(y), -bound, bound)``.

    With ``bound=3`` this is the 7-class rule (class 0 is -3, class 6 is +3); ``bound=2`` gives Acc-5's
    five classes. Returns int64 of the same kind (numpy or torch) as ``y``.
    """
    r = round_half_away(y)
    if isinstance(r, torch.Tensor):
        return (torch.clamp(r, -bound, bound) + bound).long()
    return (np.clip(r, -bound, bound) + bound).astype(np.int64)
