"""Methods: DiCMoR and the reference models, one interface (:class:`Method`), one registry.

``build_method(name, dataset_info, **config)`` builds any registered method by name::

    from flowtransfer.methods import DatasetInfo, build_method
    model = build_method("dicmor", DatasetInfo.from_dataset(train), preset="small")

Registered here: ``dicmor``, ``dicmor_official``, ``zero_fill``, ``mean_fill``, ``upper_bound``.
Baselines in other modules of this package register themselves the same way.
"""

from __future__ import annotations

from .base import METHODS, DatasetInfo, Method, build_method, prior_labels, register_method, simulate_missing
from .dicmor import DiCMoR, Recovery
from .fusion_model import FusionModel
from .presets import DATASET_PRESETS, PRESETS, DiCMoRConfig, FusionConfig, preset_for_dataset

__all__ = [
    "METHODS",
    "DatasetInfo",
    "DiCMoR",
    "DiCMoRConfig",
    "FusionConfig",
    "FusionModel",
    "Method",
    "PRESETS",
    "DATASET_PRESETS",
    "preset_for_dataset",
    "Recovery",
    "build_method",
    "prior_labels",
    "register_method",
    "simulate_missing",
]
