"""Reusable model blocks: extractors, MulT, the RCAB-1D refiner, fusion modules and heads.

Every feature tensor is ``(batch, channels, time)``; modalities are named (``dict[str, Tensor]``),
any set of two or more.
"""

from __future__ import annotations

from .extractors import ModalityExtractors, TemporalExtractor, common_length, resample_time
from .fusion import FUSIONS, ConcatMLPFusion, Fusion, LateFusion, MulTFusion, build_fusion
from .heads import TASKS, ClassificationHead, RegressionHead, ResidualMLPHead, build_head, task_loss
from .mult import MulT, MulTConfig, StackedTransformer, sinusoidal_positions
from .rcab import RCAB1d, ChannelAttention1d, Refiner, ResidualGroup1d

__all__ = [
    "common_length",
    "resample_time",
    "TemporalExtractor",
    "ModalityExtractors",
    "MulT",
    "MulTConfig",
    "StackedTransformer",
    "sinusoidal_positions",
    "ChannelAttention1d",
    "RCAB1d",
    "ResidualGroup1d",
    "Refiner",
    "Fusion",
    "MulTFusion",
    "ConcatMLPFusion",
    "LateFusion",
    "build_fusion",
    "FUSIONS",
    "ResidualMLPHead",
    "RegressionHead",
    "ClassificationHead",
    "build_head",
    "task_loss",
    "TASKS",
]
